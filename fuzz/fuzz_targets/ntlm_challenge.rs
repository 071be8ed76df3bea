//! `ntlm::parse_challenge` on arbitrary bytes, then `authenticate_message` with the result.
//!
//! Input layout: byte 0 selects credentials and flags of the run, the rest is the challenge.
//!
//! Invariants when the challenge parses:
//! - the parsed fields agree with the raw bytes (flags at 20, server challenge at 24..32);
//!   target_info is empty unless NEGOTIATE_TARGET_INFO is set, is a slice of the message
//!   described by TargetInfoFields, and is at most MAX_TARGET_INFO_LEN bytes;
//! - `authenticate_message` does not panic, and its output is a well-formed
//!   AUTHENTICATE_MESSAGE: signature, type 3, six security buffers whose len == maxlen and
//!   whose offset + len lie inside the message, laid out back to back from byte 64 in the
//!   order LM, NT, domain, user, workstation (session key empty), ending exactly at the end;
//!   LM is 24 bytes, NT is 16 + 28 + target_info + 4 bytes (NTLMv2) and echoes target_info;
//!   flags are `authenticate_flags(challenge.flags)`;
//! - parsing is deterministic and the output does not depend on the unused raw messages.
#![no_main]

use dialback_core::ntlm::{
    authenticate_flags, authenticate_message, negotiate_message, parse_challenge, NtlmCredentials,
    MAX_TARGET_INFO_LEN,
};
use libfuzzer_sys::fuzz_target;

const NEGOTIATE_TARGET_INFO: u32 = 0x0080_0000;

fn u16le(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, raw)) = data.split_first() else {
        return;
    };
    let Ok(ch) = parse_challenge(raw) else {
        return;
    };
    assert_eq!(parse_challenge(raw).as_ref(), Ok(&ch), "parsing is not deterministic");
    assert_eq!(ch.flags, u32le(raw, 20));
    assert_eq!(&ch.server_challenge[..], &raw[24..32]);
    assert!(ch.target_info.len() <= MAX_TARGET_INFO_LEN);
    if ch.flags & NEGOTIATE_TARGET_INFO == 0 {
        assert!(ch.target_info.is_empty());
    } else {
        let len = u16le(raw, 40);
        let off = u32le(raw, 44) as usize;
        assert_eq!(len, ch.target_info.len());
        // An empty buffer's offset is not checked (nothing is read from it).
        if len > 0 {
            assert!(off + len <= raw.len(), "TargetInfo outside the message accepted");
            assert_eq!(&raw[off..off + len], &ch.target_info[..]);
        }
    }

    let long = "ü".repeat(usize::from(sel >> 4) * 50);
    let creds = match sel & 3 {
        0 => NtlmCredentials {
            domain: "DOMAIN".into(),
            user: "User".into(),
            password: "Password".into(),
            workstation: "COMPUTER".into(),
        },
        1 => NtlmCredentials {
            domain: String::new(),
            user: "ü€".into(),
            password: String::new(),
            workstation: String::new(),
        },
        2 => NtlmCredentials {
            domain: long.clone(),
            user: long.clone(),
            password: long.clone(),
            workstation: long,
        },
        _ => NtlmCredentials {
            domain: "d".into(),
            user: "u".into(),
            password: "p".into(),
            workstation: "w".repeat(300),
        },
    };
    let client_challenge = [sel; 8];
    let now = u64::from(sel) << 50;
    let msg = authenticate_message(&creds, &ch, raw, &negotiate_message(), client_challenge, now);
    let again = authenticate_message(&creds, &ch, &[], &[], client_challenge, now);
    assert_eq!(msg, again, "output depends on the unused raw messages");

    assert!(msg.len() >= 64, "AUTHENTICATE shorter than its header");
    assert_eq!(&msg[..8], b"NTLMSSP\0");
    assert_eq!(u32le(&msg, 8), 3);
    assert_eq!(u32le(&msg, 60), authenticate_flags(ch.flags));
    let mut expect_off = 64usize;
    let mut fields = Vec::new();
    for i in 0..6 {
        let at = 12 + 8 * i;
        let len = u16le(&msg, at);
        let max = u16le(&msg, at + 2);
        let off = u32le(&msg, at + 4) as usize;
        assert_eq!(len, max, "security buffer {i}: len != maxlen");
        assert_eq!(off, expect_off, "security buffer {i}: not laid out back to back");
        assert!(off + len <= msg.len(), "security buffer {i} runs past the message");
        fields.push(&msg[off..off + len]);
        expect_off = off + len;
    }
    assert_eq!(expect_off, msg.len(), "bytes after the last field");
    assert!(fields[5].is_empty(), "session key sent");
    assert_eq!(fields[0].len(), 24, "LM response length");
    let nt = fields[1];
    assert_eq!(nt.len(), 16 + 28 + ch.target_info.len() + 4, "NTLMv2 response length");
    assert_eq!(&nt[16..18], &[1, 1], "NTLMv2 blob header");
    assert_eq!(&nt[16 + 28..16 + 28 + ch.target_info.len()], &ch.target_info[..]);
    if let Some(ts) = ch.timestamp {
        assert_eq!(&nt[24..32], &ts.to_le_bytes());
        assert_eq!(fields[0], &[0u8; 24][..]);
    }
});
