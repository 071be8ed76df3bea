//! `dialback import`'s readers of balance.bin and backbalance.bin (src/import.rs), on any text.
//!
//! Input layout: byte 0 selects the file (even: balance.bin, odd: backbalance.bin), the rest is
//! the file's text (lossy UTF-8, as `read_to_string` would refuse invalid UTF-8 anyway).
//!
//! Invariants: never panics; an error names a line that exists in the input; on success every
//! service name is a valid name and unique (back-connect and direct together), every password
//! non-empty and free of ';', every upstream and proxy a host:port with a non-zero port; and
//! the TOML written for the gateway parses back to the same services, passwords and upstreams
//! (quoting never breaks the file).
#![no_main]

#[path = "../../src/import.rs"]
#[allow(dead_code)]
mod import;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let lines = text.lines().count().max(1);
    if which % 2 == 0 {
        match import::parse_balance("balance.bin", &text) {
            Err(e) => assert!(e.line >= 1 && e.line <= lines, "line {} of {lines}", e.line),
            Ok(entries) => {
                let mut names = std::collections::HashSet::new();
                for s in &entries.back {
                    assert!(!s.password.is_empty() && !s.password.contains(';'));
                    assert!(names.insert(s.name.clone()), "duplicate {}", s.name);
                    assert!(s.line >= 1 && s.line <= lines);
                }
                for d in &entries.direct {
                    assert!(names.insert(d.name.clone()), "duplicate {}", d.name);
                    assert!(d.line >= 1 && d.line <= lines);
                    assert!(!d.upstreams.is_empty());
                    for u in &d.upstreams {
                        let (host, port) = u.rsplit_once(':').expect("host:port");
                        assert!(!host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
                    }
                }
                let toml_text = import::gateway_toml("balance.bin", &entries);
                let v: toml::Value = toml::from_str(&toml_text)
                    .unwrap_or_else(|e| panic!("written TOML does not parse: {e}\n{toml_text}"));
                for s in &entries.back {
                    assert_eq!(
                        v["services"][&s.name]["password"].as_str(),
                        Some(s.password.as_str())
                    );
                }
                for d in &entries.direct {
                    let ups: Vec<&str> = v["services"][&d.name]["upstreams"]
                        .as_array()
                        .expect("upstreams")
                        .iter()
                        .filter_map(|u| u.as_str())
                        .collect();
                    assert_eq!(ups, d.upstreams.iter().map(String::as_str).collect::<Vec<_>>());
                }
            }
        }
    } else {
        match import::parse_backbalance("backbalance.bin", &text) {
            Err(e) => assert!(e.line >= 1 && e.line <= lines),
            Ok(hops) => {
                for h in &hops {
                    let (host, port) = h.host_port.rsplit_once(':').expect("host:port");
                    assert!(!host.is_empty());
                    assert!(port.parse::<u16>().is_ok_and(|p| p > 0));
                }
                let toml_text = import::agent_toml("x", &[], &hops);
                toml::from_str::<toml::Value>(&toml_text)
                    .unwrap_or_else(|e| panic!("written TOML does not parse: {e}\n{toml_text}"));
            }
        }
    }
});
