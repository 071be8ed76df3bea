//! Checks `dialback_core::ntlm` against `spec/vectors/ntlm.json`.
//!
//! The vectors are written by `spec/vectors/ntlm_generate.py`, an independent implementation of
//! [MS-NLMP] NTLMv2 in Python (its own MD4, the standard library's HMAC-MD5), which also checks
//! itself against the values [MS-NLMP] 4.2.4 publishes; this file only reads them. Every
//! assertion names the case it checks.

use std::fs;
use std::path::PathBuf;

use dialback_core::ntlm::{
    authenticate_flags, authenticate_message, lmv2_response, negotiate_message, nt_hash,
    ntlmv2_temp, ntowfv2, ntproof_str, parse_challenge, session_base_key, unix_ms_to_filetime,
    NtlmCredentials, NEGOTIATE_FLAGS,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    negotiate: Negotiate,
    unix_ms_to_filetime: Vec<FiletimeCase>,
    cases: Vec<Case>,
    invalid_challenges: Vec<Invalid>,
}

#[derive(Deserialize)]
struct Negotiate {
    flags: u32,
    message: String,
}

#[derive(Deserialize)]
struct FiletimeCase {
    unix_ms: String,
    filetime: String,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    input: Input,
    challenge: ParsedChallenge,
    expected: Expected,
}

#[derive(Deserialize)]
struct Input {
    user: String,
    domain: String,
    password: String,
    workstation: String,
    challenge_message: String,
    client_challenge: String,
    now_filetime: String,
}

#[derive(Deserialize)]
struct ParsedChallenge {
    flags: u32,
    server_challenge: String,
    target_name: String,
    target_info: String,
    timestamp: Option<String>,
}

#[derive(Deserialize)]
struct Expected {
    nt_hash: String,
    ntowfv2: String,
    time: String,
    temp: String,
    ntproof_str: String,
    nt_response: String,
    lmv2_response: String,
    lm_response: String,
    session_base_key: String,
    authenticate_flags: u32,
    authenticate_message: String,
}

#[derive(Deserialize)]
struct Invalid {
    name: String,
    reason: String,
    message: String,
}

fn load() -> File {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors/ntlm.json");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

fn unhex(s: &str, what: &str) -> Vec<u8> {
    hex::decode(s).unwrap_or_else(|e| panic!("{what}: bad hex: {e}"))
}

fn arr<const N: usize>(s: &str, what: &str) -> [u8; N] {
    let v = unhex(s, what);
    v.try_into()
        .unwrap_or_else(|v: Vec<u8>| panic!("{what}: expected {N} bytes, got {}", v.len()))
}

fn u64s(s: &str, what: &str) -> u64 {
    s.parse()
        .unwrap_or_else(|e| panic!("{what}: bad 64-bit number {s:?}: {e}"))
}

#[test]
fn negotiate_message_matches() {
    let f = load();
    assert_eq!(f.negotiate.flags, NEGOTIATE_FLAGS, "negotiate flags");
    assert_eq!(
        hex::encode(negotiate_message()),
        f.negotiate.message,
        "negotiate message"
    );
}

#[test]
fn filetime_conversion_matches() {
    for c in load().unix_ms_to_filetime {
        assert_eq!(
            unix_ms_to_filetime(u64s(&c.unix_ms, "unix_ms")),
            u64s(&c.filetime, "filetime"),
            "unix_ms_to_filetime({})",
            c.unix_ms
        );
    }
}

#[test]
fn cases_match() {
    let f = load();
    assert!(f.cases.len() >= 2, "expected at least two cases");
    assert!(
        f.cases.iter().any(|c| c.name.contains("4.2.4")),
        "the MS-NLMP 4.2.4 case is missing"
    );
    for case in &f.cases {
        let n = case.name.as_str();
        let inp = &case.input;
        let exp = &case.expected;
        let raw = unhex(&inp.challenge_message, n);

        // CHALLENGE_MESSAGE parsing.
        let ch = parse_challenge(&raw).unwrap_or_else(|e| panic!("{n}: parse_challenge: {e}"));
        assert_eq!(ch.flags, case.challenge.flags, "{n}: challenge flags");
        assert_eq!(
            hex::encode(ch.server_challenge),
            case.challenge.server_challenge,
            "{n}: server challenge"
        );
        assert_eq!(
            ch.target_name, case.challenge.target_name,
            "{n}: target name"
        );
        assert_eq!(
            hex::encode(&ch.target_info),
            case.challenge.target_info,
            "{n}: target info"
        );
        assert_eq!(
            ch.timestamp,
            case.challenge
                .timestamp
                .as_deref()
                .map(|t| u64s(t, "timestamp")),
            "{n}: timestamp"
        );

        // The pieces.
        assert_eq!(
            hex::encode(nt_hash(&inp.password)),
            exp.nt_hash,
            "{n}: nt hash"
        );
        let key = ntowfv2(&inp.password, &inp.user, &inp.domain);
        assert_eq!(hex::encode(key), exp.ntowfv2, "{n}: NTOWFv2");
        let cc: [u8; 8] = arr(&inp.client_challenge, "client challenge");
        let now = u64s(&inp.now_filetime, "now_filetime");
        let time = ch.timestamp.unwrap_or(now);
        assert_eq!(time, u64s(&exp.time, "time"), "{n}: time");
        let temp = ntlmv2_temp(time, &cc, &ch.target_info);
        assert_eq!(hex::encode(&temp), exp.temp, "{n}: temp");
        let proof = ntproof_str(&key, &ch.server_challenge, &temp);
        assert_eq!(hex::encode(proof), exp.ntproof_str, "{n}: NTProofStr");
        assert_eq!(
            format!("{}{}", hex::encode(proof), hex::encode(&temp)),
            exp.nt_response,
            "{n}: NtChallengeResponse"
        );
        assert_eq!(
            hex::encode(lmv2_response(&key, &ch.server_challenge, &cc)),
            exp.lmv2_response,
            "{n}: LMv2"
        );
        assert_eq!(
            hex::encode(session_base_key(&key, &proof)),
            exp.session_base_key,
            "{n}: session base key"
        );
        assert_eq!(
            authenticate_flags(ch.flags),
            exp.authenticate_flags,
            "{n}: authenticate flags"
        );

        // The whole AUTHENTICATE_MESSAGE, byte for byte.
        let creds = NtlmCredentials {
            domain: inp.domain.clone(),
            user: inp.user.clone(),
            password: inp.password.clone(),
            workstation: inp.workstation.clone(),
        };
        let msg = authenticate_message(&creds, &ch, &raw, &negotiate_message(), cc, now);
        assert_eq!(
            hex::encode(&msg),
            exp.authenticate_message,
            "{n}: AUTHENTICATE_MESSAGE"
        );
        // LmChallengeResponse sits right after the 64-byte header.
        assert_eq!(
            hex::encode(&msg[64..88]),
            exp.lm_response,
            "{n}: LmChallengeResponse"
        );
    }
}

#[test]
fn invalid_challenges_are_rejected() {
    let f = load();
    assert!(!f.invalid_challenges.is_empty());
    for c in f.invalid_challenges {
        let raw = unhex(&c.message, &c.name);
        let r = parse_challenge(&raw);
        assert!(r.is_err(), "{} ({}): accepted as {:?}", c.name, c.reason, r);
    }
}
