//! `proxy_protocol::parse` over arbitrary bytes, as a runtime sees them: a growing prefix.
//!
//! Invariants:
//! - never panics; a complete header is at most `MAX_HEADER` bytes and within the input;
//! - the decision is monotonic: while `Ok(None)`, every shorter prefix was `Ok(None)` too; once
//!   a prefix decides (a header or an error), every longer prefix decides the same way, so the
//!   bytes that follow a header never change it;
//! - an `Ok(None)` input is never longer than `MAX_HEADER` (the parser never asks for more);
//! - a parsed address header re-encodes (same version) to a header that parses the same.
#![no_main]

use dialback_core::proxy_protocol::{encode_v1, encode_v2, parse, ProxyHeader, Version, MAX_HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(None) = whole {
        assert!(data.len() < MAX_HEADER, "undecided after {} bytes", data.len());
    }
    if let Ok(Some(p)) = &whole {
        assert!(p.consumed <= data.len() && p.consumed <= MAX_HEADER);
        if let ProxyHeader::Proxied { source, destination } = p.header {
            let again = match p.version {
                Version::V1 => encode_v1(Some(source), Some(destination)),
                Version::V2 => encode_v2(Some(source), Some(destination)),
            };
            let q = parse(&again).expect("re-encoded header").expect("complete");
            assert_eq!((q.version, q.header, q.consumed), (p.version, p.header, again.len()));
        }
    }
    // The first prefix that decides, and every longer one, agree with the whole input.
    let mut decided = false;
    for k in 0..=data.len().min(MAX_HEADER + 8) {
        let r = parse(&data[..k]);
        match (&r, decided) {
            (Ok(None), false) => continue,
            (Ok(None), true) => panic!("undecided again at {k} bytes"),
            _ => decided = true,
        }
        match (&r, &whole) {
            (Ok(Some(a)), Ok(Some(b))) => assert_eq!(a, b, "header changed with more input"),
            (Err(_), Err(_)) => {}
            _ => panic!("prefix of {k} bytes decided {r:?}, the whole input {whole:?}"),
        }
    }
});
