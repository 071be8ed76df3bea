//! NTLMv2 for HTTP proxy authentication ([MS-NLMP]), sans-IO: message encoding and parsing and
//! the NTLMv2 response computation.
//!
//! The exchange, as a client of a proxy that answers `407` with `Proxy-Authenticate: NTLM`:
//!
//! 1. send [`negotiate_message`] (base64, `Proxy-Authorization: NTLM …`);
//! 2. parse the proxy's CHALLENGE_MESSAGE with [`parse_challenge`];
//! 3. send [`authenticate_message`] on the same connection.
//!
//! Only NTLMv2 is produced (never NTLMv1 or LM). No key exchange is negotiated
//! (`NEGOTIATE_KEY_EXCH` is never set), no MIC is sent and no MsvAvFlags is added, so the
//! target info of the challenge is echoed unchanged inside the NTLMv2 response. Randomness (the
//! client challenge) and time (`now_filetime`) are parameters.
//!
//! Layout decisions beyond [MS-NLMP] (the NEGOTIATE flags, the AUTHENTICATE payload order, the
//! leniency towards a bad TargetName) are written down in `spec/vectors/ntlm_generate.py`, an
//! independent implementation whose output `spec/vectors/ntlm.json` pins every byte.

use hmac::{Hmac, KeyInit, Mac};
use md4::{Digest, Md4};
use md5::Md5;

/// NEGOTIATE flags ([MS-NLMP] 2.2.2.5).
pub mod flags {
    pub const NEGOTIATE_UNICODE: u32 = 0x0000_0001;
    pub const NEGOTIATE_OEM: u32 = 0x0000_0002;
    pub const REQUEST_TARGET: u32 = 0x0000_0004;
    pub const NEGOTIATE_SIGN: u32 = 0x0000_0010;
    pub const NEGOTIATE_SEAL: u32 = 0x0000_0020;
    pub const NEGOTIATE_DATAGRAM: u32 = 0x0000_0040;
    pub const NEGOTIATE_LM_KEY: u32 = 0x0000_0080;
    pub const NEGOTIATE_NTLM: u32 = 0x0000_0200;
    pub const NEGOTIATE_ANONYMOUS: u32 = 0x0000_0800;
    pub const NEGOTIATE_OEM_DOMAIN_SUPPLIED: u32 = 0x0000_1000;
    pub const NEGOTIATE_OEM_WORKSTATION_SUPPLIED: u32 = 0x0000_2000;
    pub const NEGOTIATE_ALWAYS_SIGN: u32 = 0x0000_8000;
    pub const TARGET_TYPE_DOMAIN: u32 = 0x0001_0000;
    pub const TARGET_TYPE_SERVER: u32 = 0x0002_0000;
    pub const NEGOTIATE_EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
    pub const NEGOTIATE_IDENTIFY: u32 = 0x0010_0000;
    pub const REQUEST_NON_NT_SESSION_KEY: u32 = 0x0040_0000;
    pub const NEGOTIATE_TARGET_INFO: u32 = 0x0080_0000;
    pub const NEGOTIATE_VERSION: u32 = 0x0200_0000;
    pub const NEGOTIATE_128: u32 = 0x2000_0000;
    pub const NEGOTIATE_KEY_EXCH: u32 = 0x4000_0000;
    pub const NEGOTIATE_56: u32 = 0x8000_0000;
}

/// AV_PAIR identifiers ([MS-NLMP] 2.2.2.1) that this module looks at.
pub mod av_id {
    pub const MSV_AV_EOL: u16 = 0x0000;
    pub const MSV_AV_NB_COMPUTER_NAME: u16 = 0x0001;
    pub const MSV_AV_NB_DOMAIN_NAME: u16 = 0x0002;
    pub const MSV_AV_DNS_COMPUTER_NAME: u16 = 0x0003;
    pub const MSV_AV_DNS_DOMAIN_NAME: u16 = 0x0004;
    pub const MSV_AV_FLAGS: u16 = 0x0006;
    pub const MSV_AV_TIMESTAMP: u16 = 0x0007;
}

/// The flags of our NEGOTIATE_MESSAGE: what browsers send, plus 128/56-bit.
///
/// `NEGOTIATE_TARGET_INFO` is deliberately absent: it is a flag the server sets, and squid's
/// `ntlm_fake_auth` echoes our flags back, answering a client that sets it with a challenge
/// claiming TargetInfo fields it does not have. Servers that do NTLMv2 send TargetInfo anyway.
pub const NEGOTIATE_FLAGS: u32 = flags::NEGOTIATE_UNICODE
    | flags::NEGOTIATE_OEM
    | flags::REQUEST_TARGET
    | flags::NEGOTIATE_NTLM
    | flags::NEGOTIATE_ALWAYS_SIGN
    | flags::NEGOTIATE_EXTENDED_SESSIONSECURITY
    | flags::NEGOTIATE_128
    | flags::NEGOTIATE_56;

/// The flags an AUTHENTICATE_MESSAGE may carry: whatever of these the challenge offered.
const AUTHENTICATE_MASK: u32 = NEGOTIATE_FLAGS | flags::NEGOTIATE_TARGET_INFO;

/// The longest target info accepted: the NtChallengeResponse echoing it is 48 bytes longer and
/// its length field has 16 bits.
pub const MAX_TARGET_INFO_LEN: usize = 0xFFFF - NTLMV2_RESPONSE_OVERHEAD;

/// NTProofStr (16) + the fixed part of `temp` (28) + its trailing Z(4).
const NTLMV2_RESPONSE_OVERHEAD: usize = 16 + 28 + 4;

/// Longest text field written into an AUTHENTICATE_MESSAGE (an even number, for UTF-16).
const MAX_TEXT_FIELD: usize = 0xFFFE;

const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";
const NEGOTIATE_LEN: usize = 32;
const AUTHENTICATE_HEADER_LEN: usize = 64;
/// 1601-01-01 to 1970-01-01 in milliseconds.
const FILETIME_UNIX_EPOCH_MS: u64 = 11_644_473_600_000;

/// Credentials for one proxy hop. `domain` may be empty (login written `\user`).
#[derive(Clone, PartialEq, Eq)]
pub struct NtlmCredentials {
    pub domain: String,
    pub user: String,
    pub password: String,
    /// Our machine name as sent to the proxy; may be empty.
    pub workstation: String,
}

impl std::fmt::Debug for NtlmCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NtlmCredentials")
            .field("domain", &self.domain)
            .field("user", &self.user)
            .field("password", &"***")
            .field("workstation", &self.workstation)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NtlmError {
    #[error("malformed NTLM challenge: {0}")]
    Malformed(&'static str),
}

/// A parsed CHALLENGE_MESSAGE (type 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub flags: u32,
    pub server_challenge: [u8; 8],
    pub target_name: String,
    /// Raw AV_PAIR list, echoed inside the NTLMv2 response.
    pub target_info: Vec<u8>,
    /// MsvAvTimestamp from target_info (FILETIME), if the server sent one.
    pub timestamp: Option<u64>,
}

impl Challenge {
    /// Whether text in the exchange is UTF-16LE (else OEM).
    pub fn is_unicode(&self) -> bool {
        self.flags & flags::NEGOTIATE_UNICODE != 0
    }
}

/// NEGOTIATE_MESSAGE (type 1) bytes: [`NEGOTIATE_FLAGS`], no domain, no workstation, no
/// Version; always the same 32 bytes.
pub fn negotiate_message() -> Vec<u8> {
    let mut out = Vec::with_capacity(NEGOTIATE_LEN);
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&NEGOTIATE_FLAGS.to_le_bytes());
    // DomainNameFields and WorkstationFields: empty, pointing at the (empty) payload.
    for _ in 0..2 {
        push_security_buffer(&mut out, 0, NEGOTIATE_LEN as u32);
    }
    out
}

/// Parses a CHALLENGE_MESSAGE ([MS-NLMP] 2.2.1.2).
///
/// Rejects: fewer than 32 bytes, a bad signature or message type; when
/// `NEGOTIATE_TARGET_INFO` is set, missing TargetInfoFields, a TargetInfo buffer outside the
/// message or longer than [`MAX_TARGET_INFO_LEN`], and an AV_PAIR list that is not well formed
/// (every pair inside the buffer, terminated by MsvAvEOL of length 0, MsvAvTimestamp of length
/// 8). TargetInfoFields are ignored when `NEGOTIATE_TARGET_INFO` is clear (old servers end the
/// header at byte 40). The TargetName is informational: it is decoded lossily, and read as empty
/// when its buffer lies outside the message (squid's `ntlm_fake_auth` sends a garbage offset).
pub fn parse_challenge(bytes: &[u8]) -> Result<Challenge, NtlmError> {
    let header = bytes
        .get(..32)
        .ok_or(NtlmError::Malformed("shorter than 32 bytes"))?;
    if header.get(..8) != Some(&SIGNATURE[..]) {
        return Err(NtlmError::Malformed("bad signature"));
    }
    if read_u32(bytes, 8) != Some(2) {
        return Err(NtlmError::Malformed("not a CHALLENGE_MESSAGE"));
    }
    let flags = read_u32(bytes, 20).ok_or(NtlmError::Malformed("shorter than 32 bytes"))?;
    let server_challenge: [u8; 8] = bytes
        .get(24..32)
        .and_then(|s| s.try_into().ok())
        .ok_or(NtlmError::Malformed("shorter than 32 bytes"))?;

    let target_name =
        match read_security_buffer(bytes, 12).and_then(|(len, off)| slice(bytes, len, off)) {
            Some(raw) if flags & flags::NEGOTIATE_UNICODE != 0 => decode_utf16_lossy(raw),
            Some(raw) => decode_oem_lossy(raw),
            None => String::new(),
        };

    let mut target_info = Vec::new();
    let mut timestamp = None;
    if flags & flags::NEGOTIATE_TARGET_INFO != 0 {
        let (len, off) = read_security_buffer(bytes, 40).ok_or(NtlmError::Malformed(
            "NEGOTIATE_TARGET_INFO set but no TargetInfoFields",
        ))?;
        let raw =
            slice(bytes, len, off).ok_or(NtlmError::Malformed("TargetInfo outside the message"))?;
        if raw.len() > MAX_TARGET_INFO_LEN {
            return Err(NtlmError::Malformed("TargetInfo too long"));
        }
        if !raw.is_empty() {
            timestamp = parse_av_pairs(raw)?;
        }
        target_info = raw.to_vec();
    }

    Ok(Challenge {
        flags,
        server_challenge,
        target_name,
        target_info,
        timestamp,
    })
}

/// Walks an AV_PAIR list to its MsvAvEOL; returns the first MsvAvTimestamp. At most
/// `list.len() / 4` iterations.
fn parse_av_pairs(list: &[u8]) -> Result<Option<u64>, NtlmError> {
    let mut pos = 0usize;
    let mut timestamp = None;
    loop {
        let (id, len) = match (read_u16(list, pos), read_u16(list, pos.saturating_add(2))) {
            (Some(id), Some(len)) => (id, usize::from(len)),
            _ => return Err(NtlmError::Malformed("AV_PAIR list ends without MsvAvEOL")),
        };
        let value_start = pos.saturating_add(4);
        let value = slice(list, len, value_start)
            .ok_or(NtlmError::Malformed("AV_PAIR value overruns TargetInfo"))?;
        match id {
            av_id::MSV_AV_EOL if len != 0 => {
                return Err(NtlmError::Malformed("MsvAvEOL with nonzero AvLen"));
            }
            av_id::MSV_AV_EOL => return Ok(timestamp),
            av_id::MSV_AV_TIMESTAMP => {
                let v: [u8; 8] = value
                    .try_into()
                    .map_err(|_| NtlmError::Malformed("MsvAvTimestamp AvLen is not 8"))?;
                timestamp.get_or_insert(u64::from_le_bytes(v));
            }
            _ => {}
        }
        pos = value_start.saturating_add(len);
    }
}

/// AUTHENTICATE_MESSAGE (type 3) bytes. `client_challenge` must be fresh random bytes;
/// `now_filetime` (100 ns ticks since 1601-01-01 UTC) is used when the challenge carries no
/// timestamp. `negotiate` and `challenge_raw` are the exact messages exchanged (for the MIC).
///
/// No MIC is sent (the MsvAvFlags that would announce one is not added), so the two raw
/// messages are currently unused. The NtChallengeResponse is NTLMv2 over the challenge's target
/// info; the LmChallengeResponse is Z(24) when the challenge carried MsvAvTimestamp ([MS-NLMP]
/// 3.1.5.1.2), else LMv2. Flags: [`authenticate_flags`]. Text is UTF-16LE when the challenge
/// offered Unicode, else OEM (ASCII; any other character becomes `?`). Payload order: LM, NT,
/// domain, user, workstation; no Version, no MIC, no session key.
///
/// Never panics: a text field longer than 65534 bytes once encoded, or a hand-made
/// [`Challenge`] whose target info exceeds [`MAX_TARGET_INFO_LEN`] (which [`parse_challenge`]
/// never returns), is cut to fit its 16-bit length, and the proxy will refuse the result.
pub fn authenticate_message(
    creds: &NtlmCredentials,
    challenge: &Challenge,
    _challenge_raw: &[u8],
    _negotiate: &[u8],
    client_challenge: [u8; 8],
    now_filetime: u64,
) -> Vec<u8> {
    let flags = authenticate_flags(challenge.flags);
    let key = ntowfv2(&creds.password, &creds.user, &creds.domain);
    let time = challenge.timestamp.unwrap_or(now_filetime);
    let temp = ntlmv2_temp(time, &client_challenge, &challenge.target_info);
    let proof = ntproof_str(&key, &challenge.server_challenge, &temp);
    let mut nt = Vec::with_capacity(16 + temp.len());
    nt.extend_from_slice(&proof);
    nt.extend_from_slice(&temp);
    let lm = if challenge.timestamp.is_some() {
        [0u8; 24]
    } else {
        lmv2_response(&key, &challenge.server_challenge, &client_challenge)
    };

    let mut fields: [Vec<u8>; 5] = [
        lm.to_vec(),
        nt,
        encode_text(&creds.domain, flags),
        encode_text(&creds.user, flags),
        encode_text(&creds.workstation, flags),
    ];
    for f in &mut fields {
        f.truncate(0xFFFF);
    }
    let payload_len: usize = fields.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(AUTHENTICATE_HEADER_LEN + payload_len);
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&3u32.to_le_bytes());
    let mut offset = AUTHENTICATE_HEADER_LEN as u32;
    for f in &fields {
        let len = u16::try_from(f.len()).unwrap_or(u16::MAX);
        push_security_buffer(&mut out, len, offset);
        offset = offset.saturating_add(u32::from(len));
    }
    // EncryptedRandomSessionKeyFields: none (no NEGOTIATE_KEY_EXCH).
    push_security_buffer(&mut out, 0, offset);
    out.extend_from_slice(&flags.to_le_bytes());
    for f in &fields {
        out.extend_from_slice(f);
    }
    out
}

/// The NegotiateFlags of our AUTHENTICATE_MESSAGE for a challenge with `challenge_flags`:
/// those of [`NEGOTIATE_FLAGS`] and `NEGOTIATE_TARGET_INFO` that the server offered, plus
/// `NEGOTIATE_NTLM`, with exactly one of `NEGOTIATE_UNICODE` (preferred) and `NEGOTIATE_OEM`.
/// Never `NEGOTIATE_KEY_EXCH`, `SIGN`, `SEAL`, `LM_KEY` or `VERSION`.
pub fn authenticate_flags(challenge_flags: u32) -> u32 {
    let f = (challenge_flags & AUTHENTICATE_MASK) | flags::NEGOTIATE_NTLM;
    if f & flags::NEGOTIATE_UNICODE != 0 {
        f & !flags::NEGOTIATE_OEM
    } else {
        f | flags::NEGOTIATE_OEM
    }
}

/// NTOWFv1: MD4(UTF-16LE(password)), the "NT hash".
pub fn nt_hash(password: &str) -> [u8; 16] {
    let mut h = Md4::new();
    h.update(utf16le(password));
    h.finalize().into()
}

/// NTOWFv2 ([MS-NLMP] 3.3.2) = HMAC_MD5(MD4(UTF-16LE(password)), UTF-16LE(UPPERCASE(user) ||
/// domain)); also LMOWFv2, the key of the LMv2 response. The user name is uppercased one
/// character at a time, a character whose uppercase is several characters (`ß`) staying as it
/// is, like Windows' 1:1 upcase table; the domain is used as given.
pub fn ntowfv2(password: &str, user: &str, domain: &str) -> [u8; 16] {
    let mut who = String::with_capacity(user.len() + domain.len());
    who.extend(user.chars().map(upcase_char));
    who.push_str(domain);
    hmac_md5(&nt_hash(password), &[&utf16le(&who)])
}

/// The NTLMv2_CLIENT_CHALLENGE `temp` of [MS-NLMP] 3.3.2: 0x01 0x01 Z(6) timestamp (LE)
/// client_challenge Z(4) target_info Z(4).
pub fn ntlmv2_temp(timestamp: u64, client_challenge: &[u8; 8], target_info: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(28 + target_info.len() + 4);
    t.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0]);
    t.extend_from_slice(&timestamp.to_le_bytes());
    t.extend_from_slice(client_challenge);
    t.extend_from_slice(&[0; 4]);
    t.extend_from_slice(target_info);
    t.extend_from_slice(&[0; 4]);
    t
}

/// NTProofStr = HMAC_MD5(NTOWFv2, server_challenge || temp); the NtChallengeResponse is
/// NTProofStr || temp.
pub fn ntproof_str(response_key: &[u8; 16], server_challenge: &[u8; 8], temp: &[u8]) -> [u8; 16] {
    hmac_md5(response_key, &[server_challenge, temp])
}

/// LMv2 response = HMAC_MD5(NTOWFv2, server_challenge || client_challenge) || client_challenge.
pub fn lmv2_response(
    response_key: &[u8; 16],
    server_challenge: &[u8; 8],
    client_challenge: &[u8; 8],
) -> [u8; 24] {
    let mac = hmac_md5(response_key, &[server_challenge, client_challenge]);
    let mut out = [0u8; 24];
    let (head, tail) = out.split_at_mut(16);
    head.copy_from_slice(&mac);
    tail.copy_from_slice(client_challenge);
    out
}

/// SessionBaseKey = HMAC_MD5(NTOWFv2, NTProofStr). Without key exchange this is also the
/// exported session key (unused for HTTP proxy authentication).
pub fn session_base_key(response_key: &[u8; 16], ntproof_str: &[u8; 16]) -> [u8; 16] {
    hmac_md5(response_key, &[ntproof_str])
}

/// Converts Unix time in milliseconds to a Windows FILETIME (saturating, never panics).
pub fn unix_ms_to_filetime(unix_ms: u64) -> u64 {
    unix_ms
        .saturating_add(FILETIME_UNIX_EPOCH_MS)
        .saturating_mul(10_000)
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut mac = match <Hmac<Md5> as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm exists only to avoid a panic path.
        Err(_) => return [0; 16],
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn upcase_char(c: char) -> char {
    let mut up = c.to_uppercase();
    match (up.next(), up.next()) {
        (Some(u), None) => u,
        _ => c,
    }
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Text of an AUTHENTICATE_MESSAGE, cut to [`MAX_TEXT_FIELD`] bytes.
fn encode_text(s: &str, flags: u32) -> Vec<u8> {
    let mut v: Vec<u8> = if flags & flags::NEGOTIATE_UNICODE != 0 {
        utf16le(s)
    } else {
        s.chars()
            .map(|c| if c.is_ascii() { c as u8 } else { b'?' })
            .collect()
    };
    v.truncate(MAX_TEXT_FIELD);
    v
}

fn decode_utf16_lossy(raw: &[u8]) -> String {
    let units = raw.chunks_exact(2).map(|c| match c {
        [a, b] => u16::from_le_bytes([*a, *b]),
        _ => 0xFFFD,
    });
    let mut s: String = char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect();
    if raw.len() % 2 == 1 {
        s.push(char::REPLACEMENT_CHARACTER);
    }
    s
}

fn decode_oem_lossy(raw: &[u8]) -> String {
    raw.iter()
        .map(|&b| {
            if b.is_ascii() {
                char::from(b)
            } else {
                char::REPLACEMENT_CHARACTER
            }
        })
        .collect()
}

fn push_security_buffer(out: &mut Vec<u8>, len: u16, offset: u32) {
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    let raw: [u8; 2] = b.get(at..at.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_le_bytes(raw))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let raw: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(raw))
}

/// (Len, BufferOffset) of the security buffer descriptor at `at`; MaxLen is ignored.
fn read_security_buffer(b: &[u8], at: usize) -> Option<(usize, usize)> {
    let len = read_u16(b, at)?;
    let off = read_u32(b, at.checked_add(4)?)?;
    Some((usize::from(len), usize::try_from(off).ok()?))
}

/// `len` bytes of `b` from `off`, if all inside; an empty buffer is valid wherever it points.
fn slice(b: &[u8], len: usize, off: usize) -> Option<&[u8]> {
    if len == 0 {
        return Some(&[]);
    }
    b.get(off..off.checked_add(len)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    // [MS-NLMP] 4.2.4.3, the CHALLENGE_MESSAGE of the NTLMv2 example.
    const SPEC_CHALLENGE: &str = "4e544c4d53535000020000000c000c003800000033828ae20123456789abcdef\
        00000000000000002400240044000000060070170000000f5300650072007600\
        6500720002000c0044006f006d00610069006e0001000c005300650072007600\
        6500720000000000";
    const SPEC_TARGET_INFO: &str =
        "02000c0044006f006d00610069006e0001000c0053006500720076006500720000000000";
    const SC: [u8; 8] = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
    const CC: [u8; 8] = [0xaa; 8];

    fn spec_creds() -> NtlmCredentials {
        NtlmCredentials {
            domain: "Domain".into(),
            user: "User".into(),
            password: "Password".into(),
            workstation: "COMPUTER".into(),
        }
    }

    /// A decoded AUTHENTICATE_MESSAGE, read back with checks that every buffer is in bounds.
    struct Auth {
        flags: u32,
        lm: Vec<u8>,
        nt: Vec<u8>,
        domain: Vec<u8>,
        user: Vec<u8>,
        workstation: Vec<u8>,
        session_key: Vec<u8>,
    }

    fn read_auth(m: &[u8]) -> Auth {
        assert!(m.len() >= 64, "AUTHENTICATE shorter than its header");
        assert_eq!(&m[..8], b"NTLMSSP\0");
        assert_eq!(read_u32(m, 8), Some(3));
        let field = |at: usize| {
            let len = read_u16(m, at).unwrap() as usize;
            assert_eq!(read_u16(m, at + 2).unwrap() as usize, len, "MaxLen == Len");
            let off = read_u32(m, at + 4).unwrap() as usize;
            assert!(
                off >= 64 && off + len <= m.len(),
                "buffer at {at} out of bounds"
            );
            m[off..off + len].to_vec()
        };
        Auth {
            lm: field(12),
            nt: field(20),
            domain: field(28),
            user: field(36),
            workstation: field(44),
            session_key: field(52),
            flags: read_u32(m, 60).unwrap(),
        }
    }

    #[test]
    fn ms_nlmp_4_2_4_known_answers() {
        // 4.2.2.1.2 NTOWFv1, 4.2.4.1.1 NTOWFv2, 4.2.4.2.2 NTProofStr, 4.2.4.2.1 LMv2,
        // 4.2.4.1.2 session base key.
        assert_eq!(
            nt_hash("Password").to_vec(),
            h("a4f49c406510bdcab6824ee7c30fd852")
        );
        let key = ntowfv2("Password", "User", "Domain");
        assert_eq!(key.to_vec(), h("0c868a403bfd7a93a3001ef22ef02e3f"));
        let temp = ntlmv2_temp(0, &CC, &h(SPEC_TARGET_INFO));
        assert_eq!(
            temp,
            h("01010000000000000000000000000000aaaaaaaaaaaaaaaa00000000\
               02000c0044006f006d00610069006e0001000c0053006500720076006500720000000000\
               00000000")
        );
        let proof = ntproof_str(&key, &SC, &temp);
        assert_eq!(proof.to_vec(), h("68cd0ab851e51c96aabc927bebef6a1c"));
        assert_eq!(
            lmv2_response(&key, &SC, &CC).to_vec(),
            h("86c35097ac9cec102554764a57cccc19aaaaaaaaaaaaaaaa")
        );
        assert_eq!(
            session_base_key(&key, &proof).to_vec(),
            h("8de40ccadbc14a82f15cb0ad0de95ca3")
        );
    }

    #[test]
    fn user_is_uppercased_domain_is_not() {
        let key = ntowfv2("Password", "User", "Domain");
        assert_eq!(ntowfv2("Password", "user", "Domain"), key);
        assert_eq!(ntowfv2("Password", "USER", "Domain"), key);
        assert_ne!(ntowfv2("Password", "User", "DOMAIN"), key);
        // 1:1 uppercasing: 'ü' -> 'Ü', but 'ß' (uppercase "SS") stays.
        assert_eq!(ntowfv2("p", "jürgen", ""), ntowfv2("p", "JÜRGEN", ""));
        assert_eq!(upcase_char('ß'), 'ß');
        assert_ne!(ntowfv2("p", "straße", ""), ntowfv2("p", "STRASSE", ""));
    }

    #[test]
    fn parses_the_spec_challenge() {
        let c = parse_challenge(&h(SPEC_CHALLENGE)).unwrap();
        assert_eq!(c.flags, 0xe28a_8233);
        assert_eq!(c.server_challenge, SC);
        assert_eq!(c.target_name, "Server");
        assert_eq!(c.target_info, h(SPEC_TARGET_INFO));
        assert_eq!(c.timestamp, None);
        assert!(c.is_unicode());
    }

    #[test]
    fn negotiate_message_bytes() {
        let m = negotiate_message();
        assert_eq!(
            m,
            h("4e544c4d5353500001000000078208a000000000200000000000000020000000")
        );
        let f = read_u32(&m, 12).unwrap();
        assert_eq!(f, NEGOTIATE_FLAGS);
        for required in [
            flags::NEGOTIATE_UNICODE,
            flags::REQUEST_TARGET,
            flags::NEGOTIATE_NTLM,
            flags::NEGOTIATE_ALWAYS_SIGN,
            flags::NEGOTIATE_EXTENDED_SESSIONSECURITY,
            flags::NEGOTIATE_128,
            flags::NEGOTIATE_56,
        ] {
            assert_ne!(f & required, 0, "{required:#x}");
        }
        assert_eq!(f & (flags::NEGOTIATE_KEY_EXCH | flags::NEGOTIATE_LM_KEY), 0);
    }

    #[test]
    fn authenticate_for_the_spec_challenge() {
        let raw = h(SPEC_CHALLENGE);
        let c = parse_challenge(&raw).unwrap();
        let m = authenticate_message(&spec_creds(), &c, &raw, &negotiate_message(), CC, 0);
        let a = read_auth(&m);
        // The spec challenge has no MsvAvTimestamp: LMv2 is sent, Time = now_filetime.
        assert_eq!(a.lm, h("86c35097ac9cec102554764a57cccc19aaaaaaaaaaaaaaaa"));
        assert_eq!(&a.nt[..16], &h("68cd0ab851e51c96aabc927bebef6a1c")[..]);
        assert_eq!(a.nt[16..], ntlmv2_temp(0, &CC, &c.target_info)[..]);
        assert_eq!(a.domain, utf16le("Domain"));
        assert_eq!(a.user, utf16le("User"));
        assert_eq!(a.workstation, utf16le("COMPUTER"));
        assert!(a.session_key.is_empty());
        // 0xe28a8233 offered; we keep UNICODE, NTLM, ALWAYS_SIGN, ESS, TARGET_INFO, 128, 56,
        // and drop OEM, SIGN, SEAL, KEY_EXCH, VERSION, TARGET_TYPE_SERVER (no REQUEST_TARGET
        // was echoed).
        assert_eq!(a.flags, 0xa088_8201);
        assert_eq!(m.len(), 64 + 24 + a.nt.len() + 12 + 8 + 16);
    }

    fn challenge_with_info(flags: u32, info: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(b"NTLMSSP\0");
        m.extend_from_slice(&2u32.to_le_bytes());
        push_security_buffer(&mut m, 0, 48);
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&SC);
        m.extend_from_slice(&[0; 8]);
        push_security_buffer(&mut m, info.len() as u16, 48);
        m.extend_from_slice(info);
        m
    }

    fn av(id: u16, value: &[u8]) -> Vec<u8> {
        let mut v = id.to_le_bytes().to_vec();
        v.extend_from_slice(&(value.len() as u16).to_le_bytes());
        v.extend_from_slice(value);
        v
    }

    const V2_FLAGS: u32 = flags::NEGOTIATE_UNICODE
        | flags::NEGOTIATE_NTLM
        | flags::NEGOTIATE_TARGET_INFO
        | flags::NEGOTIATE_EXTENDED_SESSIONSECURITY;

    #[test]
    fn timestamp_from_the_challenge_wins_and_lm_is_zero() {
        let ts: u64 = 0x01d9_0000_1234_5678;
        let mut info = av(av_id::MSV_AV_NB_COMPUTER_NAME, &utf16le("P"));
        info.extend(av(av_id::MSV_AV_TIMESTAMP, &ts.to_le_bytes()));
        info.extend(av(av_id::MSV_AV_TIMESTAMP, &7u64.to_le_bytes())); // the first one counts
        info.extend(av(av_id::MSV_AV_EOL, &[]));
        let raw = challenge_with_info(V2_FLAGS, &info);
        let c = parse_challenge(&raw).unwrap();
        assert_eq!(c.timestamp, Some(ts));
        assert_eq!(c.target_info, info);
        let m = authenticate_message(&spec_creds(), &c, &raw, &[], CC, 42);
        let a = read_auth(&m);
        assert_eq!(a.lm, vec![0; 24]);
        assert_eq!(a.nt[16..], ntlmv2_temp(ts, &CC, &info)[..]);
        let key = ntowfv2("Password", "User", "Domain");
        assert_eq!(a.nt[..16], ntproof_str(&key, &SC, &a.nt[16..])[..]);
    }

    #[test]
    fn oem_server_gets_oem_text_and_no_target_info_is_fine() {
        // 40-byte header as old servers (and squid) send, OEM target name at 40.
        let mut raw = Vec::new();
        raw.extend_from_slice(b"NTLMSSP\0");
        raw.extend_from_slice(&2u32.to_le_bytes());
        push_security_buffer(&mut raw, 4, 40);
        raw.extend_from_slice(&(flags::NEGOTIATE_OEM | flags::NEGOTIATE_NTLM).to_le_bytes());
        raw.extend_from_slice(&SC);
        raw.extend_from_slice(&[0; 8]);
        raw.extend_from_slice(b"WG\xe9X");
        let c = parse_challenge(&raw).unwrap();
        assert_eq!(c.target_name, "WG\u{fffd}X");
        assert!(c.target_info.is_empty() && c.timestamp.is_none());
        let creds = NtlmCredentials {
            domain: String::new(),
            user: "jürgen".into(),
            password: "pw".into(),
            workstation: "W".into(),
        };
        let m = authenticate_message(&creds, &c, &raw, &[], CC, 99);
        let a = read_auth(&m);
        assert_eq!(a.flags, flags::NEGOTIATE_OEM | flags::NEGOTIATE_NTLM);
        assert_eq!(a.user, b"j?rgen");
        assert!(a.domain.is_empty());
        assert_eq!(a.lm.len(), 24);
        assert_eq!(a.nt[16..], ntlmv2_temp(99, &CC, &[])[..]);
    }

    #[test]
    fn authenticate_flags_never_carry_key_exchange_or_signing() {
        for offered in [
            0u32,
            u32::MAX,
            0xe28a_8233,
            flags::NEGOTIATE_OEM,
            flags::NEGOTIATE_UNICODE,
        ] {
            let f = authenticate_flags(offered);
            let bad = flags::NEGOTIATE_KEY_EXCH
                | flags::NEGOTIATE_SIGN
                | flags::NEGOTIATE_SEAL
                | flags::NEGOTIATE_LM_KEY
                | flags::NEGOTIATE_VERSION;
            assert_eq!(f & bad, 0, "{offered:#x}");
            let text = f & (flags::NEGOTIATE_UNICODE | flags::NEGOTIATE_OEM);
            assert!(
                text == flags::NEGOTIATE_UNICODE || text == flags::NEGOTIATE_OEM,
                "{offered:#x}"
            );
            assert_ne!(f & flags::NEGOTIATE_NTLM, 0);
        }
    }

    #[test]
    fn squid_fake_auth_challenge_is_accepted() {
        // Captured from squid 5.7's ntlm_fake_auth: TargetName offset 0xaaaaaaae.
        let raw = h(
            "4e544c4d535350000200000009000900aeaaaaaa078208a06167850ed26efb5a\
                     0000000000003a00574f524b47524f5550",
        );
        let c = parse_challenge(&raw).unwrap();
        assert_eq!(c.flags, 0xa008_8207);
        assert_eq!(c.target_name, "");
        assert!(c.target_info.is_empty());
        assert_eq!(c.server_challenge.to_vec(), h("6167850ed26efb5a"));
    }

    #[test]
    fn every_truncation_of_the_spec_challenge_is_rejected() {
        let raw = h(SPEC_CHALLENGE);
        for n in 0..raw.len() {
            assert!(
                parse_challenge(&raw[..n]).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
    }

    #[test]
    fn bad_headers_are_rejected() {
        let raw = h(SPEC_CHALLENGE);
        let mut m = raw.clone();
        m[0] = b'X';
        assert_eq!(
            parse_challenge(&m),
            Err(NtlmError::Malformed("bad signature"))
        );
        for t in [0u32, 1, 3, 0x0200_0000] {
            let mut m = raw.clone();
            m[8..12].copy_from_slice(&t.to_le_bytes());
            assert_eq!(
                parse_challenge(&m),
                Err(NtlmError::Malformed("not a CHALLENGE_MESSAGE"))
            );
        }
    }

    #[test]
    fn overlong_fields_are_rejected_or_ignored() {
        let raw = h(SPEC_CHALLENGE);
        // TargetInfo: Len one past the end, offset past the end, offset near 2^32.
        for (len, off) in [
            (0x25u16, 0x44u32),
            (4, raw.len() as u32),
            (0x24, 0xFFFF_FFF0),
            (0xFFFF, 0xFFFF_FFFF),
        ] {
            let mut m = raw.clone();
            m[40..42].copy_from_slice(&len.to_le_bytes());
            m[42..44].copy_from_slice(&len.to_le_bytes());
            m[44..48].copy_from_slice(&off.to_le_bytes());
            assert_eq!(
                parse_challenge(&m),
                Err(NtlmError::Malformed("TargetInfo outside the message")),
                "len {len} off {off:#x}"
            );
        }
        // TargetName out of bounds: informational, read as empty.
        for (len, off) in [
            (0xFFFFu16, 0x38u32),
            (12, 0xFFFF_FFFF),
            (2, raw.len() as u32 - 1),
        ] {
            let mut m = raw.clone();
            m[12..14].copy_from_slice(&len.to_le_bytes());
            m[16..20].copy_from_slice(&off.to_le_bytes());
            let c = parse_challenge(&m).unwrap();
            assert_eq!(c.target_name, "");
            assert_eq!(c.target_info, h(SPEC_TARGET_INFO));
        }
        // Odd-length Unicode target name: decoded lossily.
        let mut m = raw.clone();
        m[12..14].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(parse_challenge(&m).unwrap().target_name, "S\u{fffd}");
        // TARGET_INFO flag but the header ends at 40 bytes.
        let mut m = raw[..40].to_vec();
        m[12..20].copy_from_slice(&[0; 8]);
        m[20..24].copy_from_slice(&V2_FLAGS.to_le_bytes());
        assert!(parse_challenge(&m).is_err());
        // Without the flag the same 40 bytes are a fine (NTLMv1-era) challenge.
        m[20..24].copy_from_slice(&flags::NEGOTIATE_UNICODE.to_le_bytes());
        assert!(parse_challenge(&m).unwrap().target_info.is_empty());
    }

    #[test]
    fn bad_av_pair_lists_are_rejected() {
        let eol = av(av_id::MSV_AV_EOL, &[]);
        let name = av(av_id::MSV_AV_NB_COMPUTER_NAME, &utf16le("S"));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (name.clone(), "AV_PAIR list ends without MsvAvEOL"),
            (
                [name.clone(), vec![0, 0]].concat(),
                "AV_PAIR list ends without MsvAvEOL",
            ),
            (
                [&[1u8, 0, 200, 0][..], &[0; 8]].concat(),
                "AV_PAIR value overruns TargetInfo",
            ),
            (
                [av(av_id::MSV_AV_TIMESTAMP, &[0; 4]), eol.clone()].concat(),
                "MsvAvTimestamp AvLen is not 8",
            ),
            (
                [av(av_id::MSV_AV_TIMESTAMP, &[0; 9]), eol.clone()].concat(),
                "MsvAvTimestamp AvLen is not 8",
            ),
            (
                av(av_id::MSV_AV_EOL, &[0; 4]),
                "MsvAvEOL with nonzero AvLen",
            ),
            (vec![0], "AV_PAIR list ends without MsvAvEOL"),
        ];
        for (info, why) in cases {
            assert_eq!(
                parse_challenge(&challenge_with_info(V2_FLAGS, &info)),
                Err(NtlmError::Malformed(why)),
                "{}",
                hex::encode(&info)
            );
        }
        // Well formed: empty list, EOL only, bytes after EOL kept as received.
        for info in [
            vec![],
            eol.clone(),
            [name.clone(), eol.clone(), vec![9, 9]].concat(),
        ] {
            let c = parse_challenge(&challenge_with_info(V2_FLAGS, &info)).unwrap();
            assert_eq!(c.target_info, info);
            assert_eq!(c.timestamp, None);
        }
    }

    #[test]
    fn target_info_length_limit() {
        let at_limit = [
            av(
                av_id::MSV_AV_NB_COMPUTER_NAME,
                &vec![b'x'; MAX_TARGET_INFO_LEN - 8],
            ),
            av(av_id::MSV_AV_EOL, &[]),
        ]
        .concat();
        assert_eq!(at_limit.len(), MAX_TARGET_INFO_LEN);
        let raw = challenge_with_info(V2_FLAGS, &at_limit);
        let c = parse_challenge(&raw).unwrap();
        let m = authenticate_message(&spec_creds(), &c, &raw, &[], CC, 0);
        let a = read_auth(&m);
        assert_eq!(a.nt.len(), 0xFFFF);
        assert_eq!(a.nt[16..], ntlmv2_temp(0, &CC, &at_limit)[..]);

        let over = [
            av(
                av_id::MSV_AV_NB_COMPUTER_NAME,
                &vec![b'x'; MAX_TARGET_INFO_LEN - 7],
            ),
            av(av_id::MSV_AV_EOL, &[]),
        ]
        .concat();
        assert_eq!(
            parse_challenge(&challenge_with_info(V2_FLAGS, &over)),
            Err(NtlmError::Malformed("TargetInfo too long"))
        );
    }

    #[test]
    fn oversized_inputs_do_not_panic() {
        let long = "é".repeat(40_000);
        let creds = NtlmCredentials {
            domain: long.clone(),
            user: long.clone(),
            password: long.clone(),
            workstation: long,
        };
        let c = Challenge {
            flags: V2_FLAGS,
            server_challenge: SC,
            target_name: String::new(),
            target_info: vec![0; 70_000],
            timestamp: None,
        };
        let m = authenticate_message(&creds, &c, &[], &[], CC, u64::MAX);
        let a = read_auth(&m);
        assert_eq!(a.user.len(), MAX_TEXT_FIELD);
        assert_eq!(a.nt.len(), 0xFFFF);
    }

    #[test]
    fn filetime_conversion() {
        assert_eq!(unix_ms_to_filetime(0), 116_444_736_000_000_000);
        assert_eq!(
            unix_ms_to_filetime(1_700_000_000_000),
            133_444_736_000_000_000
        );
        assert_eq!(unix_ms_to_filetime(u64::MAX), u64::MAX);
    }

    #[test]
    fn debug_hides_the_password() {
        let s = format!("{:?}", spec_creds());
        assert!(!s.contains("Password\""), "{s}");
        assert!(s.contains("***") && s.contains("User"));
    }

    fn check_message_bounds(creds: &NtlmCredentials, bytes: &[u8]) {
        if let Ok(c) = parse_challenge(bytes) {
            assert!(c.target_info.len() <= MAX_TARGET_INFO_LEN);
            let m = authenticate_message(creds, &c, bytes, &negotiate_message(), CC, 1);
            let a = read_auth(&m);
            assert_eq!(a.nt.len(), NTLMV2_RESPONSE_OVERHEAD + c.target_info.len());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parse_challenge_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            check_message_bounds(&spec_creds(), &bytes);
        }

        #[test]
        fn mutated_spec_challenge_never_panics(
            edits in proptest::collection::vec((0usize..104, any::<u8>()), 1..8),
            cut in 0usize..110,
        ) {
            let mut m = h(SPEC_CHALLENGE);
            for (i, b) in edits {
                if let Some(x) = m.get_mut(i) { *x = b; }
            }
            m.truncate(cut.max(32));
            check_message_bounds(&spec_creds(), &m);
        }

        #[test]
        fn arbitrary_av_lists_never_panic(
            info in proptest::collection::vec(any::<u8>(), 0..128),
            user in "\\PC{0,12}",
        ) {
            let creds = NtlmCredentials { user, ..spec_creds() };
            check_message_bounds(&creds, &challenge_with_info(V2_FLAGS, &info));
        }
    }
}
