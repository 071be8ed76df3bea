#!/usr/bin/env python3
"""Parses Prometheus text exposition from stdin with the reference client library's parser
(an implementation independent of ours) and prints every sample as JSON lines:
{"name": ..., "labels": {...}, "value": ...}. Exits non-zero on a parse error."""
import json
import sys

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    sys.stderr.write("prometheus_client is missing: python3 -m pip install prometheus_client\n")
    sys.exit(3)

text = sys.stdin.read()
try:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            print(json.dumps({"name": s.name, "labels": s.labels, "value": s.value, "type": family.type}))
except Exception as e:  # any parse error fails the test with the reason
    sys.stderr.write(f"parse error: {e}\n")
    sys.exit(2)
