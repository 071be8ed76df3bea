#!/usr/bin/env python3
"""Known-answer vectors for dialback's NTLMv2 client (core/src/ntlm.rs), per [MS-NLMP].

An independent implementation in the Python 3 standard library only (hashlib for MD5, hmac,
struct, json) plus its own MD4 (RFC 1320), since OpenSSL 3 no longer offers MD4 to hashlib.
It does not read or call the Rust code. It checks itself (RFC 1320 test suite for MD4,
RFC 2104/2202 for HMAC-MD5, and the values that [MS-NLMP] section 4.2.4 publishes), and writes
`ntlm.json` beside this file:

    negotiate            the NEGOTIATE_MESSAGE dialback sends (always the same bytes)
    cases                CHALLENGE_MESSAGE in, every intermediate value and the exact
                         AUTHENTICATE_MESSAGE out
    invalid_challenges   CHALLENGE_MESSAGEs a client must reject

If pyspnego is importable, the generator also cross-checks its values against pyspnego's
internals (NTOWFv2, the NTLMv2 response, its AUTHENTICATE_MESSAGE parser); without it that
extra check is skipped and said so.

Usage (from anywhere):  python3 spec/vectors/ntlm_generate.py [--check]
With --check nothing is written; the script fails if ntlm.json differs from what it would
write. Output is deterministic.

Conventions in the JSON: byte strings are lowercase hex; FILETIMEs (64-bit) are decimal
strings; flags are JSON numbers; text is UTF-8 JSON strings.

The rules implemented here (and in core/src/ntlm.rs) on top of [MS-NLMP]:

  NEGOTIATE: 32 bytes, flags NEGOTIATE_FLAGS below, empty DomainName and Workstation fields
    (length 0, offset 32), no Version.
  CHALLENGE parsing:
    - at least 32 bytes, signature "NTLMSSP\\0", MessageType 2;
    - TargetName is informational: UTF-16LE if NEGOTIATE_UNICODE else OEM (bytes >= 0x80
      read as U+FFFD), decoded lossily; a TargetName buffer outside the message is read as
      "" (squid's ntlm_fake_auth sends a garbage offset);
    - TargetInfoFields (bytes 40..48) are read only when NEGOTIATE_TARGET_INFO is set, and
      then must lie inside the message; the AV_PAIR list must end in MsvAvEOL (AvLen 0),
      every AV_PAIR must fit, MsvAvTimestamp must have AvLen 8 (the first one counts);
      bytes after MsvAvEOL are kept (TargetInfo is echoed as received);
    - TargetInfo longer than 65487 bytes is rejected (the NtChallengeResponse, 48 bytes
      longer, must fit a 16-bit length).
  AUTHENTICATE:
    - flags = CHALLENGE.flags & (NEGOTIATE_FLAGS | NEGOTIATE_TARGET_INFO) | NEGOTIATE_NTLM,
      then NEGOTIATE_OEM cleared if NEGOTIATE_UNICODE is set, else NEGOTIATE_OEM set;
    - no Version, no MIC, no EncryptedRandomSessionKey (no NEGOTIATE_KEY_EXCH): the payload
      starts at offset 64 and holds LmChallengeResponse, NtChallengeResponse, DomainName,
      UserName, Workstation in that order; the session key field is (0, 0, end of message);
    - text is UTF-16LE under NEGOTIATE_UNICODE, else OEM: ASCII, any other character '?';
    - Time = the challenge's MsvAvTimestamp if present, else the caller's clock;
    - LmChallengeResponse = Z(24) if the challenge carried MsvAvTimestamp, else LMv2.
"""

import hashlib
import hmac
import json
import os
import struct
import sys

# --------------------------------------------------------------------------------------------
# Constants ([MS-NLMP] 2.2.2.5 flags, 2.2.2.1 AvIds)
# --------------------------------------------------------------------------------------------

NEGOTIATE_UNICODE = 0x00000001
NEGOTIATE_OEM = 0x00000002
REQUEST_TARGET = 0x00000004
NEGOTIATE_SIGN = 0x00000010
NEGOTIATE_SEAL = 0x00000020
NEGOTIATE_NTLM = 0x00000200
NEGOTIATE_ALWAYS_SIGN = 0x00008000
TARGET_TYPE_DOMAIN = 0x00010000
TARGET_TYPE_SERVER = 0x00020000
NEGOTIATE_EXTENDED_SESSIONSECURITY = 0x00080000
NEGOTIATE_TARGET_INFO = 0x00800000
NEGOTIATE_VERSION = 0x02000000
NEGOTIATE_128 = 0x20000000
NEGOTIATE_KEY_EXCH = 0x40000000
NEGOTIATE_56 = 0x80000000

# What dialback's NEGOTIATE_MESSAGE asks for. NEGOTIATE_TARGET_INFO is deliberately not in it:
# it is a server-set flag, and squid's ntlm_fake_auth echoes it back without TargetInfo fields.
NEGOTIATE_FLAGS = (
    NEGOTIATE_UNICODE
    | NEGOTIATE_OEM
    | REQUEST_TARGET
    | NEGOTIATE_NTLM
    | NEGOTIATE_ALWAYS_SIGN
    | NEGOTIATE_EXTENDED_SESSIONSECURITY
    | NEGOTIATE_128
    | NEGOTIATE_56
)
AUTHENTICATE_MASK = NEGOTIATE_FLAGS | NEGOTIATE_TARGET_INFO

MSV_AV_EOL = 0
MSV_AV_NB_COMPUTER_NAME = 1
MSV_AV_NB_DOMAIN_NAME = 2
MSV_AV_DNS_COMPUTER_NAME = 3
MSV_AV_DNS_DOMAIN_NAME = 4
MSV_AV_TIMESTAMP = 7

SIGNATURE = b"NTLMSSP\x00"
MAX_TARGET_INFO = 0xFFFF - 48
FILETIME_UNIX_EPOCH_MS = 11_644_473_600_000


# --------------------------------------------------------------------------------------------
# MD4 (RFC 1320) and HMAC-MD5
# --------------------------------------------------------------------------------------------


def _rotl(x, n):
    x &= 0xFFFFFFFF
    return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF


def md4(data):
    msg = bytearray(data)
    bit_len = (8 * len(data)) & 0xFFFFFFFFFFFFFFFF
    msg.append(0x80)
    while len(msg) % 64 != 56:
        msg.append(0)
    msg += struct.pack("<Q", bit_len)
    a, b, c, d = 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476
    f = lambda x, y, z: (x & y) | (~x & z)
    g = lambda x, y, z: (x & y) | (x & z) | (y & z)
    h = lambda x, y, z: x ^ y ^ z
    for off in range(0, len(msg), 64):
        x = struct.unpack("<16I", bytes(msg[off : off + 64]))
        aa, bb, cc, dd = a, b, c, d
        for i in range(16):
            k, s = i, (3, 7, 11, 19)[i % 4]
            if i % 4 == 0:
                a = _rotl(a + f(b, c, d) + x[k], s)
            elif i % 4 == 1:
                d = _rotl(d + f(a, b, c) + x[k], s)
            elif i % 4 == 2:
                c = _rotl(c + f(d, a, b) + x[k], s)
            else:
                b = _rotl(b + f(c, d, a) + x[k], s)
        for i in range(16):
            k, s = (i % 4) * 4 + i // 4, (3, 5, 9, 13)[i % 4]
            if i % 4 == 0:
                a = _rotl(a + g(b, c, d) + x[k] + 0x5A827999, s)
            elif i % 4 == 1:
                d = _rotl(d + g(a, b, c) + x[k] + 0x5A827999, s)
            elif i % 4 == 2:
                c = _rotl(c + g(d, a, b) + x[k] + 0x5A827999, s)
            else:
                b = _rotl(b + g(c, d, a) + x[k] + 0x5A827999, s)
        order = (0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15)
        for i in range(16):
            k, s = order[i], (3, 9, 11, 15)[i % 4]
            if i % 4 == 0:
                a = _rotl(a + h(b, c, d) + x[k] + 0x6ED9EBA1, s)
            elif i % 4 == 1:
                d = _rotl(d + h(a, b, c) + x[k] + 0x6ED9EBA1, s)
            elif i % 4 == 2:
                c = _rotl(c + h(d, a, b) + x[k] + 0x6ED9EBA1, s)
            else:
                b = _rotl(b + h(c, d, a) + x[k] + 0x6ED9EBA1, s)
        a = (a + aa) & 0xFFFFFFFF
        b = (b + bb) & 0xFFFFFFFF
        c = (c + cc) & 0xFFFFFFFF
        d = (d + dd) & 0xFFFFFFFF
    return struct.pack("<4I", a, b, c, d)


def hmac_md5(key, *parts):
    return hmac.new(key, b"".join(parts), hashlib.md5).digest()


def self_check_primitives():
    # RFC 1320 appendix A.5.
    md4_suite = [
        (b"", "31d6cfe0d16ae931b73c59d7e0c089c0"),
        (b"a", "bde52cb31de33e46245e05fbdbd6fb24"),
        (b"abc", "a448017aaf21d8525fc10ae87aa6729d"),
        (b"message digest", "d9130a8164549fe818874806e1c7014b"),
        (b"abcdefghijklmnopqrstuvwxyz", "d79e1c308aa5bbcdeea8ed63df412da9"),
        (
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            "043f8582f241db351ce627e153e7f0e4",
        ),
        (b"1234567890" * 8, "e33b4ddc9c38f2199c3e7b164fcc0536"),
    ]
    for msg, want in md4_suite:
        got = md4(msg).hex()
        assert got == want, f"MD4({msg!r}) = {got}, want {want}"
    # RFC 2202 test cases 1 and 2 for HMAC-MD5.
    assert hmac_md5(b"\x0b" * 16, b"Hi There").hex() == "9294727a3638bb1c13f48ef8158bfc9d"
    assert (
        hmac_md5(b"Jefe", b"what do ya want for nothing?").hex()
        == "750c783e6ab0b503eaa86e310a5db738"
    )


# --------------------------------------------------------------------------------------------
# NTLMv2 ([MS-NLMP] 3.3.2)
# --------------------------------------------------------------------------------------------


def utf16(s):
    return s.encode("utf-16-le")


def windows_upper(s):
    """Uppercase one character at a time, keeping characters whose uppercase is not a single
    character (Windows' RtlUpcaseUnicodeString maps 1:1, e.g. 'ß' stays 'ß')."""
    out = []
    for ch in s:
        up = ch.upper()
        out.append(up if len(up) == 1 else ch)
    return "".join(out)


def nt_hash(password):
    return md4(utf16(password))


def ntowfv2(password, user, domain):
    return hmac_md5(nt_hash(password), utf16(windows_upper(user) + domain))


def ntlmv2_temp(timestamp, client_challenge, target_info):
    return (
        b"\x01\x01"
        + bytes(6)
        + struct.pack("<Q", timestamp)
        + client_challenge
        + bytes(4)
        + target_info
        + bytes(4)
    )


def ntproof_str(response_key, server_challenge, temp):
    return hmac_md5(response_key, server_challenge, temp)


def lmv2_response(response_key, server_challenge, client_challenge):
    return hmac_md5(response_key, server_challenge, client_challenge) + client_challenge


def session_base_key(response_key, proof):
    return hmac_md5(response_key, proof)


def unix_ms_to_filetime(ms):
    return (ms + FILETIME_UNIX_EPOCH_MS) * 10_000


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


class Invalid(Exception):
    pass


def negotiate_message():
    return SIGNATURE + struct.pack("<II", 1, NEGOTIATE_FLAGS) + struct.pack("<HHI", 0, 0, 32) * 2


def av_pairs(pairs):
    """Encodes [(AvId, value bytes)] and appends MsvAvEOL."""
    out = b""
    for av_id, value in pairs:
        out += struct.pack("<HH", av_id, len(value)) + value
    return out + struct.pack("<HH", MSV_AV_EOL, 0)


def challenge_message(flags, server_challenge, target_name, target_info, version=None):
    """Builds a well-formed CHALLENGE_MESSAGE; payload after the 48-byte header (+ Version)."""
    header_len = 48 + (8 if version is not None else 0)
    name_off = header_len
    info_off = name_off + len(target_name)
    out = SIGNATURE + struct.pack("<I", 2)
    out += struct.pack("<HHI", len(target_name), len(target_name), name_off)
    out += struct.pack("<I", flags) + server_challenge + bytes(8)
    out += struct.pack("<HHI", len(target_info), len(target_info), info_off)
    if version is not None:
        out += version
    return out + target_name + target_info


def parse_challenge(msg):
    if len(msg) < 32:
        raise Invalid("shorter than 32 bytes")
    if msg[:8] != SIGNATURE:
        raise Invalid("bad signature")
    if struct.unpack_from("<I", msg, 8)[0] != 2:
        raise Invalid("not a CHALLENGE_MESSAGE")
    flags = struct.unpack_from("<I", msg, 20)[0]
    server_challenge = msg[24:32]

    name_len, _, name_off = struct.unpack_from("<HHI", msg, 12)
    target_name = ""
    if name_len and name_off + name_len <= len(msg):
        raw = msg[name_off : name_off + name_len]
        if flags & NEGOTIATE_UNICODE:
            target_name = raw.decode("utf-16-le", errors="replace")
        else:
            target_name = raw.decode("ascii", errors="replace")

    target_info, timestamp = b"", None
    if flags & NEGOTIATE_TARGET_INFO:
        if len(msg) < 48:
            raise Invalid("NEGOTIATE_TARGET_INFO set but no TargetInfoFields")
        info_len, _, info_off = struct.unpack_from("<HHI", msg, 40)
        if info_len:
            if info_off + info_len > len(msg):
                raise Invalid("TargetInfo outside the message")
            if info_len > MAX_TARGET_INFO:
                raise Invalid("TargetInfo too long")
            target_info = msg[info_off : info_off + info_len]
            pos = 0
            while True:
                if pos + 4 > len(target_info):
                    raise Invalid("AV_PAIR list ends without MsvAvEOL")
                av_id, av_len = struct.unpack_from("<HH", target_info, pos)
                if pos + 4 + av_len > len(target_info):
                    raise Invalid("AV_PAIR value overruns TargetInfo")
                if av_id == MSV_AV_EOL:
                    if av_len:
                        raise Invalid("MsvAvEOL with nonzero AvLen")
                    break
                if av_id == MSV_AV_TIMESTAMP:
                    if av_len != 8:
                        raise Invalid("MsvAvTimestamp AvLen is not 8")
                    if timestamp is None:
                        timestamp = struct.unpack_from("<Q", target_info, pos + 4)[0]
                pos += 4 + av_len
    return {
        "flags": flags,
        "server_challenge": server_challenge,
        "target_name": target_name,
        "target_info": target_info,
        "timestamp": timestamp,
    }


def authenticate_flags(challenge_flags):
    flags = (challenge_flags & AUTHENTICATE_MASK) | NEGOTIATE_NTLM
    if flags & NEGOTIATE_UNICODE:
        flags &= ~NEGOTIATE_OEM
    else:
        flags |= NEGOTIATE_OEM
    return flags


def encode_text(s, flags):
    if flags & NEGOTIATE_UNICODE:
        return utf16(s)
    return s.encode("ascii", errors="replace")


def authenticate(creds, challenge, client_challenge, now_filetime):
    """Returns (message, intermediates)."""
    key = ntowfv2(creds["password"], creds["user"], creds["domain"])
    time = challenge["timestamp"] if challenge["timestamp"] is not None else now_filetime
    temp = ntlmv2_temp(time, client_challenge, challenge["target_info"])
    proof = ntproof_str(key, challenge["server_challenge"], temp)
    nt = proof + temp
    lmv2 = lmv2_response(key, challenge["server_challenge"], client_challenge)
    lm = bytes(24) if challenge["timestamp"] is not None else lmv2
    flags = authenticate_flags(challenge["flags"])
    fields = [
        lm,
        nt,
        encode_text(creds["domain"], flags),
        encode_text(creds["user"], flags),
        encode_text(creds["workstation"], flags),
    ]
    header = SIGNATURE + struct.pack("<I", 3)
    payload = b""
    offset = 64
    for f in fields:
        header += struct.pack("<HHI", len(f), len(f), offset)
        payload += f
        offset += len(f)
    header += struct.pack("<HHI", 0, 0, offset)  # EncryptedRandomSessionKey: none
    header += struct.pack("<I", flags)
    assert len(header) == 64
    return header + payload, {
        "nt_hash": nt_hash(creds["password"]),
        "ntowfv2": key,
        "time": time,
        "temp": temp,
        "ntproof_str": proof,
        "nt_response": nt,
        "lmv2_response": lmv2,
        "lm_response": lm,
        "session_base_key": session_base_key(key, proof),
        "authenticate_flags": flags,
    }


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

# [MS-NLMP] 4.2.4.3: the CHALLENGE_MESSAGE of the NTLMv2 example (flags 0xe28a8233, target
# name "Server", Version 6.0.6000 rev 15, TargetInfo = NbDomainName "Domain",
# NbComputerName "Server", EOL). 4.2.4.1 and 4.2.4.2 publish the values checked below.
SPEC_CHALLENGE = bytes.fromhex(
    "4e544c4d53535000020000000c000c003800000033828ae20123456789abcdef"
    "00000000000000002400240044000000060070170000000f5300650072007600"
    "6500720002000c0044006f006d00610069006e0001000c005300650072007600"
    "6500720000000000"
)
SPEC_PUBLISHED = {
    "nt_hash": "a4f49c406510bdcab6824ee7c30fd852",  # 4.2.2.1.2 NTOWFv1
    "ntowfv2": "0c868a403bfd7a93a3001ef22ef02e3f",  # 4.2.4.1.1
    "ntproof_str": "68cd0ab851e51c96aabc927bebef6a1c",  # 4.2.4.2.2
    "lmv2_response": "86c35097ac9cec102554764a57cccc19aaaaaaaaaaaaaaaa",  # 4.2.4.2.1
    "session_base_key": "8de40ccadbc14a82f15cb0ad0de95ca3",  # 4.2.4.1.2
}

# A CHALLENGE_MESSAGE exactly as squid 5.7's ntlm_fake_auth answered dialback's NEGOTIATE:
# 40-byte header, OEM target name "WORKGROUP" at offset 40 while the TargetNameFields offset is
# garbage (0xaaaaaaae), our flags echoed, no TargetInfo.
SQUID_FAKE_CHALLENGE = bytes.fromhex(
    "4e544c4d535350000200000009000900aeaaaaaa078208a06167850ed26efb5a"
    "0000000000003a00574f524b47524f5550"
)


def build_cases():
    cases = []

    def add(name, source, creds, challenge_msg, client_challenge, now_filetime):
        challenge = parse_challenge(challenge_msg)
        message, v = authenticate(creds, challenge, client_challenge, now_filetime)
        cases.append(
            {
                "name": name,
                "source": source,
                "input": {
                    "user": creds["user"],
                    "domain": creds["domain"],
                    "password": creds["password"],
                    "workstation": creds["workstation"],
                    "challenge_message": challenge_msg.hex(),
                    "client_challenge": client_challenge.hex(),
                    "now_filetime": str(now_filetime),
                },
                "challenge": {
                    "flags": challenge["flags"],
                    "server_challenge": challenge["server_challenge"].hex(),
                    "target_name": challenge["target_name"],
                    "target_info": challenge["target_info"].hex(),
                    "timestamp": None if challenge["timestamp"] is None else str(challenge["timestamp"]),
                },
                "expected": {
                    "nt_hash": v["nt_hash"].hex(),
                    "ntowfv2": v["ntowfv2"].hex(),
                    "time": str(v["time"]),
                    "temp": v["temp"].hex(),
                    "ntproof_str": v["ntproof_str"].hex(),
                    "nt_response": v["nt_response"].hex(),
                    "lmv2_response": v["lmv2_response"].hex(),
                    "lm_response": v["lm_response"].hex(),
                    "session_base_key": v["session_base_key"].hex(),
                    "authenticate_flags": v["authenticate_flags"],
                    "authenticate_message": message.hex(),
                },
            }
        )
        return cases[-1], v

    # 1. [MS-NLMP] 4.2.4. No MsvAvTimestamp in the challenge: Time = now_filetime = 0 (the
    #    spec's Time), and the LMv2 response is sent.
    case, v = add(
        "MS-NLMP 4.2.4 NTLMv2 example",
        "[MS-NLMP] 4.2.4: inputs of 4.2.1/4.2.4, CHALLENGE_MESSAGE of 4.2.4.3",
        {"user": "User", "domain": "Domain", "password": "Password", "workstation": "COMPUTER"},
        SPEC_CHALLENGE,
        b"\xaa" * 8,
        0,
    )
    for key, want in SPEC_PUBLISHED.items():
        assert v[key].hex() == want, f"4.2.4 {key}: computed {v[key].hex()}, spec says {want}"
    ch = parse_challenge(SPEC_CHALLENGE)
    assert ch["target_name"] == "Server" and ch["timestamp"] is None
    assert ch["target_info"] == av_pairs(
        [(MSV_AV_NB_DOMAIN_NAME, utf16("Domain")), (MSV_AV_NB_COMPUTER_NAME, utf16("Server"))]
    )

    # 2. Non-ASCII password, user and workstation (a character outside the BMP in the
    #    password: a UTF-16 surrogate pair), a challenge with MsvAvTimestamp and Version: Time
    #    comes from the challenge, not from now_filetime, and LmChallengeResponse is Z(24).
    ts = unix_ms_to_filetime(1_700_000_000_000)
    info = av_pairs(
        [
            (MSV_AV_NB_DOMAIN_NAME, utf16("EXAMPLE")),
            (MSV_AV_NB_COMPUTER_NAME, utf16("PROXY")),
            (MSV_AV_DNS_DOMAIN_NAME, utf16("example.test")),
            (MSV_AV_DNS_COMPUTER_NAME, utf16("proxy.example.test")),
            (MSV_AV_TIMESTAMP, struct.pack("<Q", ts)),
        ]
    )
    flags = (
        NEGOTIATE_UNICODE
        | REQUEST_TARGET
        | NEGOTIATE_NTLM
        | NEGOTIATE_ALWAYS_SIGN
        | TARGET_TYPE_DOMAIN
        | NEGOTIATE_EXTENDED_SESSIONSECURITY
        | NEGOTIATE_TARGET_INFO
        | NEGOTIATE_VERSION
        | NEGOTIATE_128
        | NEGOTIATE_56
    )
    msg = challenge_message(
        flags, bytes.fromhex("f1e2d3c4b5a69788"), utf16("EXAMPLE"), info, bytes.fromhex("0a0063450000000f")
    )
    add(
        "non-ASCII credentials, challenge with MsvAvTimestamp",
        "generated",
        {
            "user": "jürgen.müller",
            "domain": "EXAMPLE",
            "password": "Pässwörd-€-\U0001F511",
            "workstation": "WS-ÆØÅ",
        },
        msg,
        bytes.fromhex("0102030405060708"),
        unix_ms_to_filetime(1_700_000_123_456),
    )

    # 3. OEM-only server without TargetInfo, 40-byte header, empty domain (login "\user").
    name = b"WORKGROUP"
    msg = (
        SIGNATURE
        + struct.pack("<I", 2)
        + struct.pack("<HHI", len(name), len(name), 40)
        + struct.pack("<I", NEGOTIATE_OEM | REQUEST_TARGET | NEGOTIATE_NTLM | NEGOTIATE_ALWAYS_SIGN)
        + bytes.fromhex("5566778899aabbcc")
        + bytes(8)
        + name
    )
    add(
        "OEM server, no TargetInfo, empty domain",
        "generated",
        {"user": "proxyuser", "domain": "", "password": "s3cret", "workstation": "AGENT-1"},
        msg,
        bytes.fromhex("fedcba9876543210"),
        unix_ms_to_filetime(1_700_000_123_456),
    )

    # 4. What squid 5.7's ntlm_fake_auth really sends (see SQUID_FAKE_CHALLENGE).
    add(
        "squid 5.7 ntlm_fake_auth challenge (garbage TargetName offset)",
        "captured from /usr/lib/squid/ntlm_fake_auth answering dialback's NEGOTIATE_MESSAGE",
        {"user": "carol", "domain": "", "password": "pw-two", "workstation": ""},
        SQUID_FAKE_CHALLENGE,
        bytes.fromhex("0011223344556677"),
        unix_ms_to_filetime(1_700_000_999_000),
    )
    return cases


def build_invalid():
    good = SPEC_CHALLENGE
    cases = []

    def bad(name, msg):
        try:
            parse_challenge(msg)
        except Invalid as e:
            cases.append({"name": name, "reason": str(e), "message": msg.hex()})
            return
        raise AssertionError(f"invalid challenge {name!r} was accepted")

    def patch(msg, off, data):
        return msg[:off] + data + msg[off + len(data) :]

    bad("empty", b"")
    bad("31 bytes", good[:31])
    bad("bad signature", patch(good, 0, b"NTLMSSQ\x00"))
    bad("NEGOTIATE_MESSAGE type", patch(good, 8, struct.pack("<I", 1)))
    bad("AUTHENTICATE_MESSAGE type", patch(good, 8, struct.pack("<I", 3)))
    bad("TARGET_INFO flag but only 40 bytes", patch(good[:40], 12, struct.pack("<HHI", 0, 0, 0)))
    bad("TargetInfo one byte past the end", good[:-1])
    bad("TargetInfo offset past the end", patch(good, 40, struct.pack("<HHI", 4, 4, len(good))))
    bad("TargetInfo offset near 2^32", patch(good, 40, struct.pack("<HHI", 0x24, 0x24, 0xFFFFFFF0)))
    info_off = 0x44

    def with_info(info):
        return patch(good[:info_off], 40, struct.pack("<HHI", len(info), len(info), info_off)) + info

    bad("AV_PAIR list without MsvAvEOL", with_info(struct.pack("<HH", 1, 2) + b"S\x00"))
    bad("AV_PAIR header cut", with_info(struct.pack("<HH", 1, 2) + b"S\x00" + b"\x00\x00"))
    bad("AV_PAIR value overruns", with_info(struct.pack("<HH", 1, 200) + b"S\x00" + bytes(4)))
    bad("MsvAvTimestamp of 4 bytes", with_info(struct.pack("<HH", 7, 4) + bytes(4) + bytes(4)))
    bad("MsvAvEOL with AvLen 4", with_info(struct.pack("<HH", 0, 4) + bytes(4)))
    return cases


def build():
    cases = build_cases()
    invalid = build_invalid()
    return {
        "description": (
            "NTLMv2 client vectors for core/src/ntlm.rs, written by spec/vectors/ntlm_generate.py "
            "(an independent Python implementation of [MS-NLMP]; its docstring states the "
            "encoding rules). nt_hash = MD4(UTF-16LE(password)); ntowfv2 = HMAC_MD5(nt_hash, "
            "UTF-16LE(UPPER(user) || domain)); temp = 01 01 Z(6) time(8, LE) client_challenge "
            "Z(4) target_info Z(4); ntproof_str = HMAC_MD5(ntowfv2, server_challenge || temp); "
            "nt_response = ntproof_str || temp; lmv2_response = HMAC_MD5(ntowfv2, "
            "server_challenge || client_challenge) || client_challenge; lm_response = Z(24) if "
            "the challenge carried MsvAvTimestamp else lmv2_response; session_base_key = "
            "HMAC_MD5(ntowfv2, ntproof_str); time = the challenge's MsvAvTimestamp, else "
            "now_filetime. Byte strings are hex; FILETIMEs are decimal strings."
        ),
        "negotiate": {"flags": NEGOTIATE_FLAGS, "message": negotiate_message().hex()},
        "unix_ms_to_filetime": [
            {"unix_ms": str(ms), "filetime": str(unix_ms_to_filetime(ms))}
            for ms in (0, 1_700_000_000_000, 1_700_000_123_456)
        ],
        "cases": cases,
        "invalid_challenges": invalid,
    }


def cross_check_pyspnego(doc):
    """Optional: the same values from pyspnego's own NTLM code, where it is installed."""
    try:
        from spnego._ntlm_raw.crypto import compute_response_v2, ntowfv1
        from spnego._ntlm_raw.crypto import ntowfv2 as sp_ntowfv2
        from spnego._ntlm_raw.messages import Authenticate, Challenge, FileTime, TargetInfo
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"skipped (pyspnego not importable: {e.__class__.__name__})"
    for case in doc["cases"]:
        inp, exp, ch = case["input"], case["expected"], case["challenge"]
        key = sp_ntowfv2(inp["user"], ntowfv1(inp["password"]), inp["domain"])
        # pyspnego uppercases with str.upper(); identical for these inputs.
        assert key.hex() == exp["ntowfv2"], case["name"]
        if ch["target_info"]:
            sp_ch = Challenge.unpack(bytes.fromhex(inp["challenge_message"]))
            assert sp_ch.server_challenge.hex() == ch["server_challenge"], case["name"]
            assert sp_ch.flags == ch["flags"], case["name"]
            info = TargetInfo.unpack(bytes.fromhex(ch["target_info"]))
            assert info.pack().hex() == ch["target_info"], case["name"]
            nt, lm, kek = compute_response_v2(
                key,
                bytes.fromhex(ch["server_challenge"]),
                bytes.fromhex(inp["client_challenge"]),
                FileTime.unpack(struct.pack("<Q", int(exp["time"]))),
                info,
            )
            assert nt.hex() == exp["nt_response"], case["name"]
            assert lm.hex() == exp["lmv2_response"], case["name"]
            assert kek.hex() == exp["session_base_key"], case["name"]
        auth = Authenticate.unpack(bytes.fromhex(exp["authenticate_message"]))
        assert auth.flags == exp["authenticate_flags"], case["name"]
        assert auth.lm_challenge_response.hex() == exp["lm_response"], case["name"]
        assert auth.nt_challenge_response.hex() == exp["nt_response"], case["name"]
        assert (auth.user_name or "") == inp["user"], case["name"]
        assert (auth.domain_name or "") == inp["domain"], case["name"]
        assert (auth.workstation or "") == inp["workstation"], case["name"]
        assert auth.mic is None and auth.version is None, case["name"]
    return f"agrees on {len(doc['cases'])} cases"


def main():
    self_check_primitives()
    doc = build()
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ntlm.json")
    if "--check" in sys.argv[1:]:
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print("out of date: ntlm.json", file=sys.stderr)
            sys.exit(1)
        verb = "checked"
    else:
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        verb = "wrote"
    print(
        f"{verb} ntlm.json: {len(doc['cases'])} cases, "
        f"{len(doc['invalid_challenges'])} invalid challenges"
    )
    print(f"pyspnego cross-check: {cross_check_pyspnego(doc)}")


if __name__ == "__main__":
    main()
