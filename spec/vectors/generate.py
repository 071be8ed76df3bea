#!/usr/bin/env python3
"""Known-answer test vectors for the dialback wire protocol, version 1.

This is an independent implementation of `spec/protocol.md` in the Python 3 standard library
only (hashlib, hmac, struct, ipaddress, json). It does not read or call the Rust code. It
computes every value from fixed inputs, checks itself (RFC 5869 test case 1 for HKDF, its own
decoder against its own encoder, the expected errors of every invalid input), and writes:

    keys.json      password stretching and HKDF session keys
    proofs.json    agent and gateway proofs
    tokens.json    one-time data tokens
    frames.json    every message type as an exact frame, invalid frames, frame streams
    preamble.json  the connection preamble and the classification of a new connection

Usage (from anywhere):  python3 spec/vectors/generate.py [--check]
With --check nothing is written; the script fails if a file on disk differs from what it
would write. Output is deterministic: running it twice gives identical files.

Conventions in the JSON files: byte strings are lowercase hex; 64-bit integers (session and
request ids) are decimal strings, so that readers whose JSON numbers are doubles keep them
exact; smaller integers are JSON numbers; text is UTF-8 JSON strings.
"""

import hashlib
import hmac
import ipaddress
import json
import os
import struct
import sys

# --------------------------------------------------------------------------------------------
# Constants of protocol version 1
# --------------------------------------------------------------------------------------------

MAGIC = b"DLBK"
VERSION = 1
KIND_CONTROL = 1
KIND_DATA = 2
MAX_FRAME_PAYLOAD = 4096

HELLO = 0x01
WELCOME = 0x02
HEARTBEAT = 0x03
CONNECT = 0x04
CONNECT_FAILED = 0x05
ERROR = 0x06
PREPARE = 0x07
DATA_HELLO = 0x10
DATA_ACCEPT = 0x11
DATA_BIND = 0x12
FIRST_IGNORABLE = 0x80

TYPE_NAMES = {
    HELLO: "HELLO",
    WELCOME: "WELCOME",
    HEARTBEAT: "HEARTBEAT",
    CONNECT: "CONNECT",
    CONNECT_FAILED: "CONNECT_FAILED",
    ERROR: "ERROR",
    PREPARE: "PREPARE",
    DATA_HELLO: "DATA_HELLO",
    DATA_ACCEPT: "DATA_ACCEPT",
    DATA_BIND: "DATA_BIND",
}
TYPE_BY_NAME = {v: k for k, v in TYPE_NAMES.items()}

ERROR_CODES = [
    (1, "UNSUPPORTED_VERSION"),
    (2, "MALFORMED"),
    (3, "UNEXPECTED_MESSAGE"),
    (4, "AUTH_FAILED"),
    (5, "ALREADY_REGISTERED"),
    (6, "NOT_ALLOWED"),
    (7, "TOKEN_INVALID"),
    (8, "TOKEN_EXPIRED"),
    (9, "TIMEOUT"),
    (10, "OVERLOADED"),
    (11, "SHUTTING_DOWN"),
    (12, "LOCAL_UNREACHABLE"),
    (13, "SESSION_GONE"),
    (14, "INTERNAL"),
    (15, "DATA_TLS_REQUIRED"),
]
CODE = {name: num for num, name in ERROR_CODES}

PBKDF2_ROUNDS = 100_000
PASSWORD_SALT_PREFIX = b"dialback v1 password|"
LABEL_AGENT_PROOF_KEY = b"dialback v1 agent proof"
LABEL_GATEWAY_PROOF_KEY = b"dialback v1 gateway proof"
LABEL_SESSION_KEY = b"dialback v1 session"
LABEL_HELLO = b"dialback v1 hello"
LABEL_WELCOME = b"dialback v1 welcome"
LABEL_TOKEN = b"dialback v1 token"

# --------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------


def hmac_sha256(key, *parts):
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def hkdf_extract(salt, ikm):
    """RFC 5869 section 2.2 with SHA-256. An absent salt is HashLen zero bytes."""
    if not salt:
        salt = bytes(32)
    return hmac_sha256(salt, ikm)


def hkdf_expand(prk, info, length):
    """RFC 5869 section 2.3 with SHA-256."""
    if length > 255 * 32:
        raise ValueError("HKDF-Expand length too large")
    okm, t, i = b"", b"", 1
    while len(okm) < length:
        t = hmac_sha256(prk, t, info, bytes([i]))
        okm += t
        i += 1
    return okm[:length]


def self_check_hkdf():
    """RFC 5869, appendix A.1 (test case 1)."""
    ikm = bytes([0x0B] * 22)
    salt = bytes(range(0x00, 0x0D))
    info = bytes(range(0xF0, 0xFA))
    prk = hkdf_extract(salt, ikm)
    okm = hkdf_expand(prk, info, 42)
    assert prk.hex() == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5", prk.hex()
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    ), okm.hex()


def self_check_pbkdf2():
    """RFC 7914 section 11, PBKDF2-HMAC-SHA-256 test vector 1 (c = 1, dkLen = 64)."""
    dk = hashlib.pbkdf2_hmac("sha256", b"passwd", b"salt", 1, 64)
    assert dk.hex() == (
        "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
    ), dk.hex()


def u8(v):
    return struct.pack(">B", v)


def u16(v):
    return struct.pack(">H", v)


def u32(v):
    return struct.pack(">I", v)


def u64(v):
    return struct.pack(">Q", v)


def str8(s):
    b = s.encode("utf-8")
    if len(b) > 255:
        raise ValueError("str8 longer than 255 bytes")
    return u8(len(b)) + b


def str16(s):
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise ValueError("str16 longer than 65535 bytes")
    return u16(len(b)) + b


def addr(a):
    """None, or "1.2.3.4:80", or "[2001:db8::1]:443"."""
    if a is None:
        return u8(0)
    host, _, port = a.rpartition(":")
    if host.startswith("["):
        ip = ipaddress.IPv6Address(host[1:-1])
        return u8(6) + ip.packed + u16(int(port))
    ip = ipaddress.IPv4Address(host)
    return u8(4) + ip.packed + u16(int(port))


def fixed(label, n):
    """Reproducible, random-looking bytes for test inputs."""
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"dialback test vector|" + label.encode() + u32(i)).digest()
        i += 1
    return out[:n]


# --------------------------------------------------------------------------------------------
# Keys, proofs, tokens (spec: "Authentication", "Data tokens")
# --------------------------------------------------------------------------------------------


def password_salt(service):
    return PASSWORD_SALT_PREFIX + service.encode("utf-8")


def password_key(service, password):
    return hashlib.pbkdf2_hmac(
        "sha256", password.encode("utf-8"), password_salt(service), PBKDF2_ROUNDS, 32
    )


def session_keys(pw_key, exporter):
    prk = hkdf_extract(exporter, pw_key)
    return {
        "prk": prk,
        "agent_proof_key": hkdf_expand(prk, LABEL_AGENT_PROOF_KEY, 32),
        "gateway_proof_key": hkdf_expand(prk, LABEL_GATEWAY_PROOF_KEY, 32),
        "session_key": hkdf_expand(prk, LABEL_SESSION_KEY, 32),
    }


def agent_proof(keys, service, agent_nonce):
    return hmac_sha256(keys["agent_proof_key"], LABEL_HELLO, str8(service), agent_nonce)


def gateway_proof(keys, service, agent_nonce, gateway_nonce, a_proof, session_id):
    return hmac_sha256(
        keys["gateway_proof_key"],
        LABEL_WELCOME,
        str8(service),
        agent_nonce,
        gateway_nonce,
        a_proof,
        u64(session_id),
    )


def data_token(keys, session_id, request_id, service, random16):
    assert len(random16) == 16
    return hmac_sha256(
        keys["session_key"], LABEL_TOKEN, u64(session_id), u64(request_id), str8(service), random16
    )


# --------------------------------------------------------------------------------------------
# Framing (spec: "Framing", "Messages")
# --------------------------------------------------------------------------------------------


def frame(ty, payload):
    assert len(payload) <= MAX_FRAME_PAYLOAD
    return u8(ty) + u16(len(payload)) + payload


def encode(msg, f):
    """Encodes message `msg` (a name such as "HELLO") with JSON-style fields `f`."""
    h = bytes.fromhex
    if msg == "HELLO":
        p = str8(f["service"]) + h(f["agent_nonce"]) + h(f["proof"]) + str8(f["software"])
    elif msg == "WELCOME":
        p = (
            h(f["gateway_nonce"])
            + h(f["proof"])
            + u64(int(f["session_id"]))
            + u32(f["heartbeat_ms"])
            + u32(f["dead_after_ms"])
            + u8(f["flags"])
        )
    elif msg in ("HEARTBEAT", "DATA_ACCEPT"):
        p = b""
    elif msg == "CONNECT":
        p = u64(int(f["request_id"])) + h(f["token"]) + addr(f["client"]) + addr(f["public"])
    elif msg == "CONNECT_FAILED":
        p = u64(int(f["request_id"])) + u16(f["code"]) + str16(f["message"])
    elif msg == "ERROR":
        p = u16(f["code"]) + str16(f["message"])
    elif msg == "DATA_HELLO":
        p = str8(f["service"]) + u64(int(f["session_id"])) + u64(int(f["request_id"])) + h(f["token"])
    elif msg == "PREPARE":
        p = u64(int(f["request_id"])) + h(f["token"])
    elif msg == "DATA_BIND":
        p = addr(f["client"]) + addr(f["public"])
    elif msg == "EXTENSION":
        return frame(f["type"], h(f.get("payload", "")))
    else:
        raise ValueError(msg)
    for name in ("agent_nonce", "proof", "gateway_nonce", "token"):
        if name in f:
            assert len(h(f[name])) == 32, (msg, name)
    return frame(TYPE_BY_NAME[msg], p)


class WireErr(Exception):
    def __init__(self, kind, value=None, msg=None, what=None):
        super().__init__(kind, value, msg, what)
        self.kind, self.value, self.msg, self.what = kind, value, msg, what

    def as_json(self):
        d = {"kind": self.kind}
        if self.value is not None:
            d["value"] = self.value
        if self.msg is not None:
            d["msg"] = self.msg
            d["what"] = self.what
        return d


class Reader:
    def __init__(self, buf, msg):
        self.buf, self.pos, self.msg = buf, 0, msg

    def err(self, what):
        return WireErr("Malformed", msg=self.msg, what=what)

    def take(self, n, what="truncated"):
        if len(self.buf) - self.pos < n:
            raise self.err(what)
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def int(self, n):
        return int.from_bytes(self.take(n), "big")

    def text(self, b):
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise self.err("string is not UTF-8") from None

    def str8(self):
        return self.text(self.take(self.int(1), "string runs past the end"))

    def str16(self):
        return self.text(self.take(self.int(2), "string runs past the end"))

    def addr(self):
        fam = self.int(1)
        if fam == 0:
            return None
        if fam == 4:
            ip = ipaddress.IPv4Address(self.take(4))
            return f"{ip}:{self.int(2)}"
        if fam == 6:
            ip = ipaddress.IPv6Address(self.take(16))
            # Text form only: IPv4-mapped addresses are written ::ffff:a.b.c.d (RFC 5952 4.1).
            text = f"::ffff:{ip.ipv4_mapped}" if ip.ipv4_mapped else ip.compressed
            return f"[{text}]:{self.int(2)}"
        raise self.err("unknown address family")

    def finish(self):
        if self.pos != len(self.buf):
            raise self.err("trailing bytes")


def decode_frame(data):
    """Decodes the first frame of `data`. Returns (message, fields, bytes consumed), or None when
    more bytes are needed. Raises WireErr for invalid input."""
    if len(data) < 3:
        return None
    ty = data[0]
    length = int.from_bytes(data[1:3], "big")
    if length > MAX_FRAME_PAYLOAD:
        raise WireErr("FrameTooLarge", value=length)
    if len(data) < 3 + length:
        return None
    payload = data[3 : 3 + length]
    used = 3 + length
    if ty >= FIRST_IGNORABLE:
        return "EXTENSION", {"type": ty}, used
    if ty not in TYPE_NAMES:
        raise WireErr("UnknownType", value=ty)
    name = TYPE_NAMES[ty]
    r = Reader(payload, name)
    if name == "HELLO":
        f = {
            "service": r.str8(),
            "agent_nonce": r.take(32).hex(),
            "proof": r.take(32).hex(),
            "software": r.str8(),
        }
    elif name == "WELCOME":
        f = {
            "gateway_nonce": r.take(32).hex(),
            "proof": r.take(32).hex(),
            "session_id": str(r.int(8)),
            "heartbeat_ms": r.int(4),
            "dead_after_ms": r.int(4),
            "flags": r.int(1),
        }
    elif name in ("HEARTBEAT", "DATA_ACCEPT"):
        f = {}
    elif name == "CONNECT":
        f = {
            "request_id": str(r.int(8)),
            "token": r.take(32).hex(),
            "client": r.addr(),
            "public": r.addr(),
        }
    elif name == "CONNECT_FAILED":
        f = {"request_id": str(r.int(8)), "code": r.int(2), "message": r.str16()}
    elif name == "ERROR":
        f = {"code": r.int(2), "message": r.str16()}
    elif name == "DATA_HELLO":
        f = {
            "service": r.str8(),
            "session_id": str(r.int(8)),
            "request_id": str(r.int(8)),
            "token": r.take(32).hex(),
        }
    elif name == "PREPARE":
        f = {"request_id": str(r.int(8)), "token": r.take(32).hex()}
    elif name == "DATA_BIND":
        f = {"client": r.addr(), "public": r.addr()}
    r.finish()
    return name, f, used


# --------------------------------------------------------------------------------------------
# Preamble and connection intake (spec: "Connection preamble", "Data channel")
# --------------------------------------------------------------------------------------------


def encode_preamble(kind):
    return MAGIC + u8(VERSION) + u8(kind)


def parse_preamble(buf):
    """None while more bytes are needed; "control" or "data"; raises WireErr."""
    seen = min(len(buf), 4)
    if buf[:seen] != MAGIC[:seen]:
        raise WireErr("BadMagic")
    if len(buf) < 6:
        return None
    if buf[4] != VERSION:
        raise WireErr("UnsupportedVersion", value=buf[4])
    if buf[5] == KIND_CONTROL:
        return "control"
    if buf[5] == KIND_DATA:
        return "data"
    raise WireErr("BadKind", value=buf[5])


def intake(tls, data):
    """What the gateway makes of the first bytes of a connection on `listen` (after TLS when
    `tls`). Returns a JSON-ready result."""
    pre = data[:6]
    rest = data[6:]
    try:
        kind = parse_preamble(pre)
    except WireErr as e:
        code = None if e.kind == "BadMagic" else (
            CODE["UNSUPPORTED_VERSION"] if e.kind == "UnsupportedVersion" else CODE["MALFORMED"]
        )
        return {"result": "error", "error": e.as_json(), "code": code}
    if kind is None:
        return {"result": "need_more"}
    if kind == "control":
        if not tls:
            return {"result": "error", "error": {"kind": "ControlWithoutTls"}, "code": CODE["UNEXPECTED_MESSAGE"]}
        return {"result": "control", "rest": rest.hex()}
    try:
        got = decode_frame(rest)
    except WireErr as e:
        return {"result": "error", "error": e.as_json(), "code": CODE["MALFORMED"]}
    if got is None:
        return {"result": "need_more"}
    name, f, used = got
    if name != "DATA_HELLO":
        return {
            "result": "error",
            "error": {"kind": "Unexpected", "value": "extension" if name == "EXTENSION" else name},
            "code": CODE["UNEXPECTED_MESSAGE"],
        }
    return {"result": "data", "hello": f, "rest": rest[used:].hex()}


# --------------------------------------------------------------------------------------------
# Vector sets
# --------------------------------------------------------------------------------------------

KEY_INPUTS = [
    {
        "name": "typical service, random-looking exporter",
        "service": "srvBACK",
        "password": "mypassword1234",
        "exporter": fixed("exporter 1", 32),
    },
    {
        "name": "same password, other TLS connection: same password_key, different session keys",
        "service": "srvBACK",
        "password": "mypassword1234",
        "exporter": fixed("exporter 2", 32),
    },
    {
        "name": "all-zero exporter",
        "service": "web",
        "password": "correct horse battery staple",
        "exporter": bytes(32),
    },
    {
        "name": "non-ASCII service name and password (UTF-8, no normalization)",
        "service": "сервис-Ω",
        "password": "pässwörd 🔑",
        "exporter": bytes([0xFF] * 32),
    },
    {
        "name": "empty password",
        "service": "a",
        "password": "",
        "exporter": fixed("exporter 5", 32),
    },
]


def build_keys():
    cases = []
    derived = []
    for inp in KEY_INPUTS:
        pk = password_key(inp["service"], inp["password"])
        ks = session_keys(pk, inp["exporter"])
        derived.append((inp, pk, ks))
        cases.append(
            {
                "name": inp["name"],
                "service": inp["service"],
                "service_utf8": inp["service"].encode("utf-8").hex(),
                "password": inp["password"],
                "password_utf8": inp["password"].encode("utf-8").hex(),
                "salt": password_salt(inp["service"]).hex(),
                "exporter": inp["exporter"].hex(),
                "password_key": pk.hex(),
                "prk": ks["prk"].hex(),
                "agent_proof_key": ks["agent_proof_key"].hex(),
                "gateway_proof_key": ks["gateway_proof_key"].hex(),
                "session_key": ks["session_key"].hex(),
            }
        )
    doc = {
        "description": "password_key = PBKDF2-HMAC-SHA256(password, salt, rounds, 32) with salt = "
        "'dialback v1 password|' || service (both UTF-8); PRK = HKDF-Extract(salt = exporter, "
        "IKM = password_key); each key = HKDF-Expand(PRK, label, 32). 'prk' is informative.",
        "pbkdf2_rounds": PBKDF2_ROUNDS,
        "labels": {
            "agent_proof_key": LABEL_AGENT_PROOF_KEY.decode(),
            "gateway_proof_key": LABEL_GATEWAY_PROOF_KEY.decode(),
            "session_key": LABEL_SESSION_KEY.decode(),
        },
        "cases": cases,
    }
    return doc, derived


def build_proofs(derived):
    cases = []
    specs = [
        (0, fixed("agent nonce 1", 32), fixed("gateway nonce 1", 32), 0x0123456789ABCDEF),
        (1, fixed("agent nonce 1", 32), fixed("gateway nonce 1", 32), 0x0123456789ABCDEF),
        (2, bytes(32), bytes(32), 0),
        (3, fixed("agent nonce 4", 32), fixed("gateway nonce 4", 32), 2**64 - 1),
        (4, bytes(range(32)), bytes(range(32, 64)), 1),
    ]
    for idx, an, gn, sid in specs:
        inp, pk, ks = derived[idx]
        ap = agent_proof(ks, inp["service"], an)
        gp = gateway_proof(ks, inp["service"], an, gn, ap, sid)
        cases.append(
            {
                "name": f"{inp['name']}; session_id {sid}",
                "service": inp["service"],
                "password_key": pk.hex(),
                "exporter": inp["exporter"].hex(),
                "agent_nonce": an.hex(),
                "gateway_nonce": gn.hex(),
                "session_id": str(sid),
                "agent_proof": ap.hex(),
                "gateway_proof": gp.hex(),
            }
        )
    # A 255-byte service name: the longest a str8 can carry.
    long_service = "s" * 255
    pk = fixed("password key long", 32)
    ex = fixed("exporter long", 32)
    ks = session_keys(pk, ex)
    an, gn, sid = fixed("agent nonce long", 32), fixed("gateway nonce long", 32), 77
    ap = agent_proof(ks, long_service, an)
    cases.append(
        {
            "name": "255-byte service name (longest str8); password_key given directly",
            "service": long_service,
            "password_key": pk.hex(),
            "exporter": ex.hex(),
            "agent_nonce": an.hex(),
            "gateway_nonce": gn.hex(),
            "session_id": str(sid),
            "agent_proof": ap.hex(),
            "gateway_proof": gateway_proof(ks, long_service, an, gn, ap, sid).hex(),
        }
    )
    return {
        "description": "agent_proof = HMAC-SHA256(agent_proof_key, 'dialback v1 hello' || "
        "str8(service) || agent_nonce); gateway_proof = HMAC-SHA256(gateway_proof_key, "
        "'dialback v1 welcome' || str8(service) || agent_nonce || gateway_nonce || agent_proof || "
        "u64be(session_id)). Keys from password_key and exporter as in keys.json.",
        "cases": cases,
    }


def build_tokens(derived):
    cases = []
    specs = [
        (0, 0x0123456789ABCDEF, 0x0F1E2D3C4B5A6978, fixed("token random 1", 16)),
        (0, 0x0123456789ABCDEF, 0x0F1E2D3C4B5A6979, fixed("token random 1", 16)),
        (1, 1, 1, bytes(16)),
        (3, 2**64 - 1, 2**64 - 1, bytes([0xFF] * 16)),
        (2, 42, 0x8000000000000000, fixed("token random 5", 16)),
    ]
    for idx, sid, rid, rnd in specs:
        inp, pk, ks = derived[idx]
        cases.append(
            {
                "name": f"{inp['name']}; session {sid}, request {rid}",
                "service": inp["service"],
                "password_key": pk.hex(),
                "exporter": inp["exporter"].hex(),
                "session_key": ks["session_key"].hex(),
                "session_id": str(sid),
                "request_id": str(rid),
                "random16": rnd.hex(),
                "token": data_token(ks, sid, rid, inp["service"], rnd).hex(),
            }
        )
    return {
        "description": "token = HMAC-SHA256(session_key, 'dialback v1 token' || u64be(session_id) "
        "|| u64be(request_id) || str8(service) || random16). session_key from password_key and "
        "exporter as in keys.json. The token is opaque to the agent; only the gateway computes it.",
        "cases": cases,
    }


def build_frames():
    valid = []

    def add(name, msg, fields, round_trip=True, frame_hex=None):
        enc = encode(msg, fields).hex() if frame_hex is None else frame_hex
        valid.append(
            {"name": name, "message": msg, "fields": fields, "frame": enc, "round_trip": round_trip}
        )

    add(
        "HELLO, typical",
        "HELLO",
        {
            "service": "srvBACK",
            "agent_nonce": fixed("frame agent nonce", 32).hex(),
            "proof": fixed("frame agent proof", 32).hex(),
            "software": "dialback 0.1.0",
        },
    )
    add(
        "HELLO, non-ASCII service, empty software",
        "HELLO",
        {"service": "сервис-Ω", "agent_nonce": "01" * 32, "proof": "02" * 32, "software": ""},
    )
    add(
        "WELCOME, data_tls flag, default timers",
        "WELCOME",
        {
            "gateway_nonce": fixed("frame gateway nonce", 32).hex(),
            "proof": fixed("frame gateway proof", 32).hex(),
            "session_id": str(0x0102030405060708),
            "heartbeat_ms": 20000,
            "dead_after_ms": 60000,
            "flags": 1,
        },
    )
    add(
        "WELCOME, no flags, session 0, short timers",
        "WELCOME",
        {
            "gateway_nonce": "00" * 32,
            "proof": "ff" * 32,
            "session_id": "0",
            "heartbeat_ms": 250,
            "dead_after_ms": 1000,
            "flags": 0,
        },
    )
    add("HEARTBEAT", "HEARTBEAT", {})
    add(
        "CONNECT, IPv4 client and IPv6 public address",
        "CONNECT",
        {
            "request_id": "42",
            "token": fixed("frame token 1", 32).hex(),
            "client": "203.0.113.7:51000",
            "public": "[2001:db8::1]:443",
        },
    )
    add(
        "CONNECT, no addresses",
        "CONNECT",
        {"request_id": "1", "token": "00" * 32, "client": None, "public": None},
    )
    add(
        "CONNECT, IPv6 client, IPv4 public, largest request id",
        "CONNECT",
        {
            "request_id": str(2**64 - 1),
            "token": fixed("frame token 2", 32).hex(),
            "client": "[2001:db8:85a3::8a2e:370:7334]:65535",
            "public": "198.51.100.1:0",
        },
    )
    add(
        "CONNECT, IPv4-mapped IPv6 client (family 6), no public address",
        "CONNECT",
        {
            "request_id": str(0x1122334455667788),
            "token": fixed("frame token 3", 32).hex(),
            "client": "[::ffff:192.0.2.1]:8080",
            "public": None,
        },
    )
    add(
        "CONNECT_FAILED, LOCAL_UNREACHABLE",
        "CONNECT_FAILED",
        {"request_id": "7", "code": CODE["LOCAL_UNREACHABLE"], "message": "connection refused"},
    )
    add(
        "CONNECT_FAILED, INTERNAL, empty message",
        "CONNECT_FAILED",
        {"request_id": str(0xDEADBEEFCAFEF00D), "code": CODE["INTERNAL"], "message": ""},
    )
    for num, cname in ERROR_CODES:
        add(f"ERROR, code {num} ({cname})", "ERROR", {"code": num, "message": cname.lower()})
    add(
        "ERROR, AUTH_FAILED as the gateway sends it",
        "ERROR",
        {"code": CODE["AUTH_FAILED"], "message": "authentication failed: unknown service or wrong password"},
    )
    add(
        "ERROR, code 0 (not assigned) is carried as an unknown code",
        "ERROR",
        {"code": 0, "message": ""},
    )
    add(
        "ERROR, unknown code 4660 from a newer peer is carried as is",
        "ERROR",
        {"code": 0x1234, "message": "ünknown ✓"},
    )
    big = "x" * (MAX_FRAME_PAYLOAD - 4)
    add(
        "ERROR, largest payload (4096 bytes): decodes; an encoder may clip messages this long",
        "ERROR",
        {"code": CODE["INTERNAL"], "message": big},
        round_trip=False,
    )
    add(
        "DATA_HELLO, typical",
        "DATA_HELLO",
        {
            "service": "web",
            "session_id": "9",
            "request_id": "10",
            "token": fixed("frame token 4", 32).hex(),
        },
    )
    add(
        "DATA_HELLO, non-ASCII service, large ids",
        "DATA_HELLO",
        {
            "service": "сервис-Ω",
            "session_id": str(0x7FFFFFFFFFFFFFFF),
            "request_id": str(2**64 - 1),
            "token": "ab" * 32,
        },
    )
    add("DATA_ACCEPT", "DATA_ACCEPT", {})
    add(
        "PREPARE, typical",
        "PREPARE",
        {"request_id": str(0x0123456789ABCDEF), "token": fixed("frame token 5", 32).hex()},
    )
    add(
        "DATA_BIND, IPv4 client and public address",
        "DATA_BIND",
        {"client": "203.0.113.7:51000", "public": "198.51.100.1:443"},
    )
    add(
        "DATA_BIND, IPv6 client, no public address",
        "DATA_BIND",
        {"client": "[2001:db8::7]:40000", "public": None},
    )
    add("DATA_BIND, no addresses", "DATA_BIND", {"client": None, "public": None})
    add("extension 0x80 (first ignorable type), empty", "EXTENSION", {"type": 0x80})
    add("extension 0xff, empty", "EXTENSION", {"type": 0xFF})
    add(
        "extension 0x90 with a payload: decoded as 'ignore type 0x90', payload skipped",
        "EXTENSION",
        {"type": 0x90},
        round_trip=False,
        frame_hex=frame(0x90, bytes.fromhex("ff")).hex(),
    )
    add(
        "extension 0xc3 with a 4096-byte payload",
        "EXTENSION",
        {"type": 0xC3},
        round_trip=False,
        frame_hex=frame(0xC3, fixed("extension payload", 4096)).hex(),
    )

    invalid = []

    def bad(name, data, kind, value=None, msg=None, what=None):
        invalid.append(
            {"name": name, "frame": data.hex(), "error": WireErr(kind, value, msg, what).as_json()}
        )

    bad("length 4097 (one over the limit)", bytes.fromhex("011001"), "FrameTooLarge", 4097)
    bad("length 65535 on an extension type", bytes.fromhex("ffffff"), "FrameTooLarge", 65535)
    bad("length 4097 on an unknown type: length is checked first", bytes.fromhex("421001"), "FrameTooLarge", 4097)
    bad("unknown type 0x42", bytes.fromhex("420000"), "UnknownType", 0x42)
    bad("unknown type 0x00", bytes.fromhex("000000"), "UnknownType", 0x00)
    bad("unknown type 0x08 (first unassigned after PREPARE)", bytes.fromhex("080000"), "UnknownType", 0x08)
    bad("unknown type 0x13 (first unassigned after DATA_BIND)", bytes.fromhex("130000"), "UnknownType", 0x13)
    bad("PREPARE truncated (token cut short)", frame(PREPARE, bytes(39)), "Malformed", None, "PREPARE", "truncated")
    bad("DATA_BIND with a trailing byte", frame(DATA_BIND, b"\x00\x00\x00"), "Malformed", None, "DATA_BIND", "trailing bytes")
    bad("unknown type 0x7f with a payload", bytes.fromhex("7f000100"), "UnknownType", 0x7F)
    bad("HEARTBEAT with one trailing byte", bytes.fromhex("03000100"), "Malformed", None, "HEARTBEAT", "trailing bytes")
    bad("DATA_ACCEPT with two trailing bytes", bytes.fromhex("110002abcd"), "Malformed", None, "DATA_ACCEPT", "trailing bytes")
    welcome = bytes.fromhex(encode("WELCOME", valid[2]["fields"]).hex())[3:]
    bad("WELCOME with one trailing byte (82 bytes)", frame(WELCOME, welcome + b"\x00"), "Malformed", None, "WELCOME", "trailing bytes")
    bad("WELCOME truncated (80 bytes, flags missing)", frame(WELCOME, welcome[:-1]), "Malformed", None, "WELCOME", "truncated")
    bad("HELLO, empty payload", frame(HELLO, b""), "Malformed", None, "HELLO", "truncated")
    bad("HELLO, service str8 runs past the end", frame(HELLO, b"\x0aABCD"), "Malformed", None, "HELLO", "string runs past the end")
    bad(
        "HELLO, software length byte missing",
        frame(HELLO, str8("web") + bytes(64)),
        "Malformed", None, "HELLO", "truncated",
    )
    bad(
        "HELLO, software str8 runs past the end",
        frame(HELLO, str8("web") + bytes(64) + b"\x05abc"),
        "Malformed", None, "HELLO", "string runs past the end",
    )
    bad("ERROR, str16 runs past the end", bytes.fromhex("06000400010009"), "Malformed", None, "ERROR", "string runs past the end")
    bad("ERROR, message not UTF-8", frame(ERROR, u16(2) + u16(2) + b"\xc3\x28"), "Malformed", None, "ERROR", "string is not UTF-8")
    bad("CONNECT_FAILED, empty payload", frame(CONNECT_FAILED, b""), "Malformed", None, "CONNECT_FAILED", "truncated")
    tok = fixed("frame token 1", 32)
    bad(
        "CONNECT, address family 5",
        frame(CONNECT, u64(1) + tok + b"\x05" + bytes(6) + b"\x00"),
        "Malformed", None, "CONNECT", "unknown address family",
    )
    bad(
        "CONNECT, IPv4 address truncated (port missing)",
        frame(CONNECT, u64(1) + tok + b"\x04\xc0\x00\x02\x01"),
        "Malformed", None, "CONNECT", "truncated",
    )
    bad(
        "CONNECT, public address missing",
        frame(CONNECT, u64(1) + tok + b"\x00"),
        "Malformed", None, "CONNECT", "truncated",
    )
    bad(
        "DATA_HELLO, service not UTF-8",
        frame(DATA_HELLO, b"\x02\xff\xfe" + u64(1) + u64(2) + tok),
        "Malformed", None, "DATA_HELLO", "string is not UTF-8",
    )
    bad(
        "DATA_HELLO, token one byte short",
        frame(DATA_HELLO, str8("web") + u64(1) + u64(2) + tok[:31]),
        "Malformed", None, "DATA_HELLO", "truncated",
    )

    streams = []
    payload = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
    streams.append(
        {
            "name": "DATA_ACCEPT followed directly by payload: the payload is not a frame and stays",
            "bytes": (encode("DATA_ACCEPT", {}) + payload).hex(),
            "frames": [{"message": "DATA_ACCEPT", "fields": {}}],
            "rest": payload.hex(),
        }
    )
    seq = [
        ("HEARTBEAT", {}),
        ("CONNECT", valid[5]["fields"]),
        ("EXTENSION", {"type": 0x90}),
        ("CONNECT_FAILED", valid[9]["fields"]),
        ("HEARTBEAT", {}),
    ]
    data = b"".join(
        frame(0x90, b"\x01\x02\x03") if m == "EXTENSION" else encode(m, f) for m, f in seq
    )
    streams.append(
        {
            "name": "several frames in one read, an extension among them",
            "bytes": data.hex(),
            "frames": [{"message": m, "fields": f} for m, f in seq],
            "rest": "",
        }
    )

    # Self-check: our decoder agrees with our encoder and with every expected error.
    for c in valid:
        got = decode_frame(bytes.fromhex(c["frame"]))
        assert got is not None and got[2] == len(c["frame"]) // 2, c["name"]
        assert (got[0], got[1]) == (c["message"], c["fields"]), (c["name"], got)
        if c["round_trip"]:
            assert encode(c["message"], c["fields"]).hex() == c["frame"], c["name"]
        assert len(bytes.fromhex(c["frame"])) <= 3 + MAX_FRAME_PAYLOAD
    for c in invalid:
        try:
            decode_frame(bytes.fromhex(c["frame"]))
        except WireErr as e:
            assert e.as_json() == c["error"], (c["name"], e.as_json())
        else:
            raise AssertionError(c["name"] + ": decoded without error")
    for s in streams:
        rest = bytes.fromhex(s["bytes"])
        for want in s["frames"]:
            m, f, used = decode_frame(rest)
            assert {"message": m, "fields": f} == want, s["name"]
            rest = rest[used:]
        assert rest.hex() == s["rest"], s["name"]

    return {
        "description": "Frames are type:u8 | length:u16be | payload (length <= 4096). 'frame' is the "
        "complete frame. round_trip = true: encoding 'fields' gives exactly 'frame', and decoding "
        "'frame' gives 'fields'. round_trip = false: decoding only. Message EXTENSION stands for a "
        "type >= 0x80 that the receiver ignores (its payload is skipped). Addresses are "
        "'a.b.c.d:port', '[v6]:port' or null. invalid: decoding 'frame' (fed whole) fails with "
        "'error'; kind is normative, msg/what are this implementation's wording. streams: decode "
        "the listed frames one after another from 'bytes'; 'rest' is left undecoded.",
        "max_frame_payload": MAX_FRAME_PAYLOAD,
        "types": {name: num for num, name in TYPE_NAMES.items()},
        "error_codes": {name: num for num, name in ERROR_CODES},
        "valid": valid,
        "invalid": invalid,
        "streams": streams,
    }


def build_preamble():
    enc = [
        {"kind": "control", "bytes": encode_preamble(KIND_CONTROL).hex()},
        {"kind": "data", "bytes": encode_preamble(KIND_DATA).hex()},
    ]
    inputs = [
        ("empty input: need more", b""),
        ("'D': need more", b"D"),
        ("'DLBK': need more", b"DLBK"),
        ("'DLBK' + version: need more", b"DLBK\x01"),
        ("'DLBK' + version 2 only: the version is judged once the kind byte is there", b"DLBK\x02"),
        ("control preamble", encode_preamble(KIND_CONTROL)),
        ("data preamble", encode_preamble(KIND_DATA)),
        ("control preamble followed by a frame: only the first 6 bytes are the preamble", encode_preamble(KIND_CONTROL) + bytes.fromhex("030000")),
        ("first byte wrong: rejected at once", b"X"),
        ("HTTP request", b"GET / HTTP/1.1\r\n"),
        ("TLS record seen where a plain preamble is expected", bytes.fromhex("160301")),
        ("lower-case magic", b"dlbk\x01\x01"),
        ("fourth byte wrong", b"DLBX"),
        ("version 2", b"DLBK\x02\x01"),
        ("version 0", b"DLBK\x00\x02"),
        ("version 255", b"DLBK\xff\x01"),
        ("kind 0", b"DLBK\x01\x00"),
        ("kind 3", b"DLBK\x01\x03"),
        ("kind 7", b"DLBK\x01\x07"),
    ]
    parse = []
    for name, b in inputs:
        try:
            k = parse_preamble(b)
            res = {"result": "need_more"} if k is None else {"result": k}
        except WireErr as e:
            res = {"result": "error", "error": e.as_json()}
        parse.append({"name": name, "bytes": b.hex(), **res})

    hello = {"service": "web", "session_id": "1", "request_id": "2", "token": "03" * 32}
    data_open = encode_preamble(KIND_DATA) + encode("DATA_HELLO", hello)
    intake_inputs = [
        ("plain data connection: preamble and DATA_HELLO", False, data_open),
        ("data connection under TLS", True, data_open),
        (
            "data connection with bytes after DATA_HELLO: they stay with the caller",
            False,
            data_open + b"early",
        ),
        ("data connection, DATA_HELLO incomplete: need more", False, data_open[:-1]),
        ("control connection under TLS; its frames follow", True, encode_preamble(KIND_CONTROL) + encode("HEARTBEAT", {})),
        ("control connection without TLS: refused", False, encode_preamble(KIND_CONTROL)),
        ("not dialback: closed without an ERROR frame", False, b"GET / HTTP/1.1\r\n"),
        ("unsupported version: ERROR UNSUPPORTED_VERSION", False, b"DLBK\x02\x02"),
        ("unsupported version under TLS", True, b"DLBK\x07\x01"),
        ("unknown kind: ERROR MALFORMED", False, b"DLBK\x01\x09"),
        ("data connection whose first frame is HEARTBEAT", False, encode_preamble(KIND_DATA) + encode("HEARTBEAT", {})),
        (
            "data connection whose first frame is an extension: not ignored here",
            False,
            encode_preamble(KIND_DATA) + frame(0x80, b"") + encode("DATA_HELLO", hello),
        ),
        ("data connection with an oversized frame", False, encode_preamble(KIND_DATA) + bytes.fromhex("101001")),
        ("data connection with a malformed DATA_HELLO", False, encode_preamble(KIND_DATA) + frame(DATA_HELLO, b"\x03web")),
    ]
    intakes = []
    for name, tls, b in intake_inputs:
        intakes.append({"name": name, "tls": tls, "bytes": b.hex(), **intake(tls, b)})

    return {
        "description": "Every connection to the gateway's listen port starts with 'DLBK' | version "
        "(1) | kind (1 = control, 2 = data), inside TLS when TLS is used. parse: the preamble "
        "parser on a prefix of the input ('need_more' until 6 bytes; a byte that cannot start "
        "'DLBK' is an error at once). intake: what the gateway makes of the first bytes of a "
        "connection; 'tls' = whether they arrived inside TLS; 'code' = the error code of the ERROR "
        "frame the gateway answers with before closing (null: close without an answer); 'rest' = "
        "bytes left for what follows.",
        "encode": enc,
        "parse": parse,
        "intake": intakes,
    }


def main():
    self_check_hkdf()
    self_check_pbkdf2()
    keys, derived = build_keys()
    files = {
        "keys.json": keys,
        "proofs.json": build_proofs(derived),
        "tokens.json": build_tokens(derived),
        "frames.json": build_frames(),
        "preamble.json": build_preamble(),
    }
    here = os.path.dirname(os.path.abspath(__file__))
    check = "--check" in sys.argv[1:]
    stale = []
    for name, doc in files.items():
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        path = os.path.join(here, name)
        if check:
            try:
                with open(path, encoding="utf-8") as f:
                    if f.read() != text:
                        stale.append(name)
            except FileNotFoundError:
                stale.append(name)
        else:
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        sys.exit(1)
    counts = {
        "keys.json": len(keys["cases"]),
        "proofs.json": len(files["proofs.json"]["cases"]),
        "tokens.json": len(files["tokens.json"]["cases"]),
        "frames.json": "{} valid, {} invalid, {} streams".format(
            len(files["frames.json"]["valid"]),
            len(files["frames.json"]["invalid"]),
            len(files["frames.json"]["streams"]),
        ),
        "preamble.json": "{} encode, {} parse, {} intake".format(
            len(files["preamble.json"]["encode"]),
            len(files["preamble.json"]["parse"]),
            len(files["preamble.json"]["intake"]),
        ),
    }
    for name, n in counts.items():
        print(f"{'checked' if check else 'wrote'} {name}: {n}")


if __name__ == "__main__":
    main()
