//! allow_from, clients_allow, accept_proxy, send_proxy and the hardening keys.

use std::path::Path;
use std::time::Duration;

use dialback_core::proxy_protocol::Version;
use dialback_tokio::settings::{AgentSettings, GatewaySettings, DEFAULT_MAX_HANDSHAKES};

use super::source::Source;
use super::*;

fn no_env(_: &str) -> Option<std::ffi::OsString> {
    None
}

fn gw(text: &str) -> Result<GatewaySettings, ConfigError> {
    gateway::parse(&Source::new(Path::new("gateway.toml"), text), &no_env).map(|(s, _)| s)
}

fn ag(text: &str) -> Result<AgentSettings, ConfigError> {
    agent::parse(&Source::new(Path::new("agent.toml"), text), &no_env).map(|(s, _)| s)
}

const SERVICE: &str =
    "[services.web]\npassword = \"correct horse battery\"\ntcp_listen = \"0.0.0.0:9000\"\n";

#[test]
fn defaults_allow_everyone_and_expect_no_proxy_header() {
    let s = gw(SERVICE).unwrap();
    assert!(!s.accept_proxy);
    assert_eq!(s.max_handshakes, DEFAULT_MAX_HANDSHAKES);
    assert_eq!(s.drain_timeout, Duration::from_secs(30));
    let web = &s.services[0];
    assert!(web.allow_from.allows_everyone() && web.clients_allow.allows_everyone());
    assert!(!web.accept_proxy);
}

#[test]
fn every_rule_form_is_accepted() {
    let s = gw(&format!(
        "accept_proxy = true\nmax_handshakes = 100\ndrain_timeout = \"5s\"\n{SERVICE}allow_from = [\"51.254.\", \"10.0.0.0/8\", \"203.0.113.7\", \"2001:db8::/32\", \"home.example.org\"]\nclients_allow = [\"*\"]\naccept_proxy = true\n"
    ))
    .unwrap();
    assert!(s.accept_proxy);
    assert_eq!(
        (s.max_handshakes, s.drain_timeout),
        (100, Duration::from_secs(5))
    );
    let web = &s.services[0];
    assert!(web.accept_proxy);
    assert_eq!(
        web.allow_from.to_string(),
        "51.254.0.0/16, 10.0.0.0/8, 203.0.113.7, 2001:db8::/32, home.example.org"
    );
    assert_eq!(
        web.allow_from.names().collect::<Vec<_>>(),
        ["home.example.org"]
    );
}

#[test]
fn bad_rules_name_line_key_and_rule() {
    let e = gw(&format!(
        "{SERVICE}allow_from = [\"*\",\n  \"10.0.0.1/8\"]\n"
    ))
    .unwrap_err();
    assert_eq!(
        (e.line(), e.key()),
        (Some(5), Some("services.web.allow_from"))
    );
    assert!(
        e.to_string()
            .contains("\"10.0.0.1/8\": address has bits set"),
        "{e}"
    );
    let e = gw(&format!("{SERVICE}clients_allow = []\n")).unwrap_err();
    assert_eq!(e.key(), Some("services.web.clients_allow"));
    assert!(e.to_string().contains("allows nobody"), "{e}");
    let e = gw(&format!("{SERVICE}allow_from = [\"1.2.3.4.\"]\n")).unwrap_err();
    assert!(e.to_string().contains("at most 3 numbers"), "{e}");
    let e = gw(&format!("max_handshakes = 0\n{SERVICE}")).unwrap_err();
    assert_eq!(e.key(), Some("max_handshakes"));
}

#[test]
fn send_proxy_on_the_gateway() {
    assert_eq!(gw(SERVICE).unwrap().services[0].send_proxy, None);
    let s = gw(&format!("{SERVICE}send_proxy = \"v2\"\n")).unwrap();
    assert_eq!(s.services[0].send_proxy, Some(Version::V2));
    let e = gw(&format!("{SERVICE}send_proxy = \"yes\"\n")).unwrap_err();
    assert_eq!(
        (e.line(), e.key()),
        (Some(4), Some("services.web.send_proxy"))
    );
}

#[test]
fn send_proxy_on_the_agent() {
    let base = "gateway = \"gw.example.com:7000\"\ninsecure = true\n[services.web]\npassword = \"correct horse battery\"\nlocal = \"127.0.0.1:8080\"\n";
    assert_eq!(ag(base).unwrap().services[0].send_proxy, None);
    for (text, want) in [
        ("off", None),
        ("v1", Some(Version::V1)),
        ("v2", Some(Version::V2)),
    ] {
        let s = ag(&format!("{base}send_proxy = \"{text}\"\n")).unwrap();
        assert_eq!(s.services[0].send_proxy, want);
    }
    let e = ag(&format!("{base}send_proxy = \"v3\"\n")).unwrap_err();
    assert_eq!(
        (e.line(), e.key()),
        (Some(6), Some("services.web.send_proxy"))
    );
    assert!(e.to_string().contains("\"v1\""), "{e}");
}
