//! The TOML config layer (`src/config.rs` and `src/config/*.rs`, included by path) on any
//! text, as a gateway or an agent config by its keys, with no environment variables set.
//!
//! Invariants: never panics (every key, type, address, duration, proxy URL, access rule and
//! HTTP setting is checked without unwrapping); an error is reported against the file name and,
//! when it names a line, a line that exists; a config that parses has at least one service.
#![no_main]

use std::path::Path;

// An inline module with a path makes `config` resolve as ../../src/config.rs and its own
// modules as ../../src/config/*.rs, exactly as in the binary.
#[path = "../../src"]
#[allow(dead_code, unused_imports)]
mod src_dir {
    pub mod config;
}

use libfuzzer_sys::fuzz_target;
use src_dir::config::{parse_text, AnyConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_text(Path::new("fuzz.toml"), text) {
        Err(e) => {
            assert!(e.to_string().starts_with("fuzz.toml"), "{e}");
            if let Some(line) = e.line() {
                let lines = text.split('\n').count();
                assert!(line >= 1 && line <= lines, "line {line} of {lines}: {e}");
            }
        }
        Ok((AnyConfig::Gateway(s), _)) => assert!(!s.services.is_empty()),
        Ok((AnyConfig::Agent(s), _)) => assert!(!s.services.is_empty() && !s.gateways.is_empty()),
    }
});
