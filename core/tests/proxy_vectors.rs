//! Checks `proxy_protocol` against `spec/vectors/proxy_protocol.json`, written by
//! `spec/vectors/proxy_protocol_generate.py` (an independent Python implementation of the
//! PROXY protocol). Every assertion names its case.

use std::net::SocketAddr;
use std::path::PathBuf;

use dialback_core::proxy_protocol::{encode_v1, encode_v2, parse, ProxyHeader, Version};
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    hex: String,
    #[serde(default)]
    error: bool,
    version: Option<u8>,
    command: Option<String>,
    consumed: Option<usize>,
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    #[serde(default)]
    encode: bool,
}

#[test]
fn proxy_protocol_vectors() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors/proxy_protocol.json");
    let file: File = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(file.cases.len() >= 20);
    for c in &file.cases {
        let bytes = hex::decode(&c.hex).unwrap();
        let got = parse(&bytes);
        if c.error {
            assert!(got.is_err(), "{}: accepted as {got:?}", c.name);
            continue;
        }
        let p = got
            .unwrap_or_else(|e| panic!("{}: {e}", c.name))
            .unwrap_or_else(|| panic!("{}: incomplete", c.name));
        let version = match p.version {
            Version::V1 => 1,
            Version::V2 => 2,
        };
        assert_eq!(Some(version), c.version, "{}: version", c.name);
        assert_eq!(Some(p.consumed), c.consumed, "{}: consumed", c.name);
        let command = match p.header {
            ProxyHeader::Proxied {
                source,
                destination,
            } => {
                assert_eq!(
                    (Some(source), Some(destination)),
                    (c.source, c.destination),
                    "{}",
                    c.name
                );
                "proxy"
            }
            ProxyHeader::Local => "local",
            ProxyHeader::Unknown => "unknown",
        };
        assert_eq!(Some(command), c.command.as_deref(), "{}: command", c.name);
        // Every shorter prefix needs more bytes, never decides otherwise.
        for k in 0..p.consumed {
            assert_eq!(
                parse(&bytes[..k]),
                Ok(None),
                "{}: prefix of {k} bytes",
                c.name
            );
        }
        if c.encode {
            let enc = match p.version {
                Version::V1 => encode_v1(c.source, c.destination),
                Version::V2 => encode_v2(c.source, c.destination),
            };
            assert_eq!(enc, bytes[..p.consumed], "{}: encoding", c.name);
        }
    }
}
