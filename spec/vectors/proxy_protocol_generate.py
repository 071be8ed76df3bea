#!/usr/bin/env python3
"""Writes proxy_protocol.json: PROXY protocol v1/v2 headers (HAProxy's proxy-protocol.txt),
built here independently of the Rust core, with what a receiver must make of them.

Run from anywhere: python3 spec/vectors/proxy_protocol_generate.py

Each case: "hex" is the bytes received (a header, possibly followed by stream bytes), and
either "error": true (the bytes are not an acceptable header) or the parse result: "version"
(1 or 2), "command" ("proxy", "local" or "unknown": addresses not usable), "source" and
"destination" (for "proxy"), and "consumed" (the header length). "encode": true marks headers
that are exactly what an encoder writes for those addresses (v1, and v2 without TLVs).
"""
import ipaddress
import json
import pathlib
import struct

OUT = pathlib.Path(__file__).resolve().parent / "proxy_protocol.json"
SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(line, tail=b""):
    return line.encode() + b"\r\n" + tail


def v2(cmd, fam, block, tail=b""):
    return SIG + bytes([0x20 | cmd, fam]) + struct.pack(">H", len(block)) + block + tail


def inet(src, dst, sport, dport):
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return s.packed + d.packed + struct.pack(">HH", sport, dport)


def sock(ip, port):
    ip = ipaddress.ip_address(ip)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def tlv(t, value):
    return bytes([t]) + struct.pack(">H", len(value)) + value


cases = []


def ok(name, data, version, command, consumed, src=None, dst=None, encode=False):
    c = {"name": name, "hex": data.hex(), "version": version, "command": command, "consumed": consumed}
    if src:
        c["source"], c["destination"] = src, dst
    if encode:
        c["encode"] = True
    cases.append(c)


def bad(name, data):
    cases.append({"name": name, "hex": data.hex(), "error": True})


# v1, from the spec's own examples.
line = "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443"
ok("v1 tcp4 spec example", v1(line, b"GET / HTTP/1.1\r\n"), 1, "proxy", len(line) + 2,
   "192.168.0.1:56324", "192.168.0.11:443", encode=True)
line = "PROXY TCP6 2001:db8::1 2001:db8::2 65535 1"
ok("v1 tcp6", v1(line), 1, "proxy", len(line) + 2, "[2001:db8::1]:65535", "[2001:db8::2]:1", encode=True)
ok("v1 unknown", v1("PROXY UNKNOWN"), 1, "unknown", 15)
longest = "PROXY UNKNOWN " + ":".join(["ffff"] * 8) + " " + ":".join(["ffff"] * 8) + " 65535 65535"
assert len(longest) + 2 == 107
ok("v1 unknown, the longest line", v1(longest), 1, "unknown", 107)
bad("v1 one byte over 107", v1(longest + "5"))
bad("v1 LF without CR", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n")
bad("v1 port out of range", v1("PROXY TCP4 1.2.3.4 5.6.7.8 65536 2"))
bad("v1 IPv6 address in TCP4", v1("PROXY TCP4 ::1 ::1 1 2"))
bad("v1 missing field", v1("PROXY TCP4 1.2.3.4 5.6.7.8 1"))
bad("v1 double space", v1("PROXY TCP4  1.2.3.4 5.6.7.8 1 2"))
bad("v1 unknown protocol", v1("PROXY UDP4 1.2.3.4 5.6.7.8 1 2"))
bad("not a header: HTTP", b"GET / HTTP/1.1\r\n\r\n")
bad("not a header: TLS hello", bytes.fromhex("160301020001000001fc0303"))

# v2.
blk = inet("10.0.0.1", "10.0.0.2", 1234, 443)
ok("v2 tcp4", v2(1, 0x11, blk, b"\x16\x03\x01"), 2, "proxy", 28, "10.0.0.1:1234", "10.0.0.2:443", encode=True)
blk6 = inet("2001:db8::1", "2001:db8::2", 80, 8080)
ok("v2 tcp6", v2(1, 0x21, blk6), 2, "proxy", 52, "[2001:db8::1]:80", "[2001:db8::2]:8080", encode=True)
tlvs = tlv(0x01, b"h2") + tlv(0x04, b"\x00\x00\x00") + tlv(0xEA, b"vpce-0123456789abcdef0")
ok("v2 tcp4 with ALPN, NOOP and AWS TLVs", v2(1, 0x11, blk + tlvs), 2, "proxy", 16 + len(blk + tlvs),
   "10.0.0.1:1234", "10.0.0.2:443")
ok("v2 local", v2(0, 0x00, b""), 2, "local", 16)
ok("v2 local with addresses", v2(0, 0x11, blk), 2, "local", 28)
ok("v2 local: block discarded whatever the family", v2(0, 0x41, b"\x01\x02\x03"), 2, "local", 19)
ok("v2 proxy unspec with a non-TLV block", v2(1, 0x00, b"\x09\x09"), 2, "unknown", 18)
ok("v2 proxy unspec", v2(1, 0x00, b""), 2, "unknown", 16)
ok("v2 proxy unix", v2(1, 0x31, b"\x00" * 216), 2, "unknown", 232)
ok("v2 proxy udp4", v2(1, 0x12, blk), 2, "unknown", 28)
bad("v2 version 1", SIG + bytes([0x11, 0x11]) + struct.pack(">H", 12) + blk)
bad("v2 command 2", SIG + bytes([0x22, 0x11]) + struct.pack(">H", 12) + blk)
bad("v2 family 4", v2(1, 0x41, blk))
bad("v2 block shorter than its family", v2(1, 0x11, blk[:8]))
bad("v2 TLV past the end", v2(1, 0x11, blk + b"\x01\x00\x09\x00"))
bad("v2 length over the limit", SIG + bytes([0x21, 0x11, 0xFF, 0xFF]))
bad("v2 broken signature", b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + blk)

OUT.write_text(json.dumps({"cases": cases}, indent=1) + "\n")
print(f"{OUT.name}: {len(cases)} cases")
