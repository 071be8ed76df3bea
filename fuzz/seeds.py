#!/usr/bin/env python3
"""Writes the seed corpora of the byte-oriented targets from spec/vectors/*.json.

Run from anywhere: python3 fuzz/seeds.py. Files are named seed-<target>-<n>; existing seeds
of these targets are replaced. The structured targets (connect_response, gateway_ops,
agent_ops) take `arbitrary`-encoded inputs; their seeds are minimized inputs from a fuzzing
run (see README.md), kept as they are.
"""
import json
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
VEC = ROOT / "spec" / "vectors"
CORPUS = ROOT / "fuzz" / "corpus"
LIMIT = 45


def load(name):
    return json.loads((VEC / name).read_text())


def write(target, blobs):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    for f in d.glob("seed-*"):
        f.unlink()
    seen = set()
    n = 0
    for b in blobs:
        if b in seen or n >= LIMIT:
            continue
        seen.add(b)
        (d / f"seed-{n:03d}").write_bytes(b)
        n += 1
    print(f"{target}: {n} seeds")


frames = load("frames.json")
preamble = load("preamble.json")
ntlm = load("ntlm.json")

# frame_decoder: byte 0 = number of split sizes, then split sizes, then the stream.
fd = []
for v in frames["valid"]:
    fd.append(b"\x00" + bytes.fromhex(v["frame"]))
for v in frames["invalid"]:
    fd.append(b"\x00" + bytes.fromhex(v["frame"]))
for s in frames["streams"]:
    fd.append(b"\x00" + bytes.fromhex(s["bytes"]))
    fd.append(b"\x03\x01\x05\x02" + bytes.fromhex(s["bytes"]))
every = b"".join(bytes.fromhex(v["frame"]) for v in frames["valid"])
fd.append(b"\x02\x07\x01" + every)
write("frame_decoder", fd)

# intake and data_answer: byte 0 = chunk size (0 = whole), then the stream.
ik = []
for v in preamble["intake"]:
    b = bytes.fromhex(v["bytes"])
    ik += [b"\x00" + b, b"\x01" + b, b"\x05" + b]
for v in preamble["parse"]:
    ik.append(b"\x00" + bytes.fromhex(v["bytes"]))
write("intake", ik)

accept = bytes.fromhex("110000")
da = [b"\x00" + accept, b"\x01" + accept + b"GET / HTTP/1.1\r\n", b"\x02" + accept + accept]
for v in frames["valid"] + frames["invalid"]:
    if v.get("message") in ("ERROR", "DATA_ACCEPT", "HEARTBEAT", None):
        da.append(b"\x00" + bytes.fromhex(v["frame"]))
write("data_answer", da)

# ntlm_challenge: byte 0 = credential/flag selector, then the CHALLENGE_MESSAGE.
nc = []
for i, c in enumerate(ntlm["cases"]):
    nc.append(bytes([i]) + bytes.fromhex(c["input"]["challenge_message"]))
    nc.append(bytes([0x32 + i]) + bytes.fromhex(c["input"]["challenge_message"]))
for c in ntlm["invalid_challenges"]:
    nc.append(b"\x00" + bytes.fromhex(c["message"]))
write("ntlm_challenge", nc)
