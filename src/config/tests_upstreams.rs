//! `upstreams` and the keys of direct services.

use std::path::Path;
use std::time::Duration;

use dialback_core::upstream::{Balance, HealthCheck};
use dialback_tokio::settings::GatewaySettings;

use super::source::Source;
use super::*;

fn no_env(_: &str) -> Option<std::ffi::OsString> {
    None
}

fn gw(text: &str) -> Result<GatewaySettings, ConfigError> {
    gateway::parse(&Source::new(Path::new("gateway.toml"), text), &no_env).map(|(s, _)| s)
}

/// Every problem of a gateway config, as `LINE: KEY: message`.
fn problems(text: &str) -> Vec<String> {
    let r = check::check_str(Path::new("gateway.toml"), text, &no_env);
    r.problems
        .iter()
        .map(|e| {
            format!(
                "{}: {}: {}",
                e.line().unwrap_or(0),
                e.key().unwrap_or("-"),
                e.message
            )
        })
        .collect()
}

const DIRECT: &str = "[services.site]\nupstreams = [\"10.0.0.5:80\", \"web2.internal:8080\", \"[2001:db8::7]:80\"]\ntcp_listen = \"0.0.0.0:8000\"\n";

#[test]
fn a_direct_service_with_defaults() {
    let s = gw(DIRECT).unwrap();
    let site = &s.services[0];
    let up = site.upstreams.as_ref().expect("upstreams");
    assert_eq!(
        up.addrs,
        ["10.0.0.5:80", "web2.internal:8080", "[2001:db8::7]:80"]
    );
    assert_eq!(up.balance, Balance::RoundRobin);
    assert_eq!(up.health, HealthCheck::default());
    assert_eq!(up.connect_timeout, Duration::from_secs(3));
    assert!(site.password.0.is_empty());
}

#[test]
fn every_upstream_key() {
    let s = gw(&format!(
        "{DIRECT}balance = \"least_conn\"\nhealth_check_interval = \"500ms\"\nhealth_check_timeout = \"200ms\"\nfall = 2\nrise = 5\nconnect_timeout = \"1s\"\nclients_allow = [\"10.0.0.0/8\"]\naccept_proxy = true\n"
    ))
    .unwrap();
    let site = &s.services[0];
    let up = site.upstreams.as_ref().unwrap();
    assert_eq!(up.balance, Balance::LeastConn);
    assert_eq!(
        up.health,
        HealthCheck {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(200),
            fall: 2,
            rise: 5,
        }
    );
    assert_eq!(up.connect_timeout, Duration::from_secs(1));
    assert!(site.accept_proxy);
    assert!(!site.clients_allow.allows_everyone());
}

#[test]
fn a_direct_service_through_the_http_entry_needs_no_tcp_listen() {
    let s = gw("[http]\nlisten = \"0.0.0.0:8080\"\n\n[services.site]\nupstreams = [\"127.0.0.1:9000\"]\nhttp_prefix = \"/~~site\"\n").unwrap();
    assert!(s.services[0].tcp_listen.is_none());
    assert!(s.services[0].upstreams.is_some());
}

#[test]
fn agent_keys_on_a_direct_service_are_each_refused_with_their_line() {
    let text = "[services.site]\nupstreams = [\"10.0.0.5:80\"]\ntcp_listen = \"0.0.0.0:8000\"\npassword = \"x\"\npool = 2\nallow_from = [\"*\"]\nsend_proxy = \"v1\"\ndata_tls = true\nmax_pending = 5\npool_max_idle = \"5s\"\n";
    let p = problems(text);
    for (line, key) in [
        (4, "password"),
        (5, "pool"),
        (6, "allow_from"),
        (7, "send_proxy"),
        (9, "max_pending"),
        (10, "pool_max_idle"),
    ] {
        assert!(
            p.iter().any(|e| e.starts_with(&format!(
                "{line}: services.site.{key}: has no meaning for a service with upstreams"
            ))),
            "{key} on line {line} not refused: {p:#?}"
        );
    }
    assert!(
        p.iter().any(|e| e
            .contains("services.site.data_tls: data_tls is about the agent's data connections")),
        "{p:#?}"
    );
}

#[test]
fn upstream_keys_without_upstreams_are_refused() {
    let text = "[services.web]\npassword = \"correct horse battery\"\ntcp_listen = \"0.0.0.0:9000\"\nbalance = \"least_conn\"\nfall = 2\n";
    let p = problems(text);
    assert_eq!(
        p,
        [
            "4: services.web.balance: only for a service with upstreams (the gateway dials them itself)",
            "5: services.web.fall: only for a service with upstreams (the gateway dials them itself)",
        ]
    );
}

#[test]
fn bad_upstream_values_name_their_line() {
    let cases: &[(&str, &str)] = &[
        ("upstreams = []", "an empty list"),
        (
            "upstreams = [\"10.0.0.5\"]",
            "services.site.upstreams[0]: invalid address",
        ),
        ("upstreams = [\"http://a:80\"]", "without a scheme"),
        (
            "upstreams = [\"a:80\", \"A:80\"]",
            "services.site.upstreams[1]: A:80 is listed twice",
        ),
        (
            "upstreams = [\"a:80\"]\nbalance = \"random\"",
            "expected \"round_robin\" or \"least_conn\" (got \"random\")",
        ),
        (
            "upstreams = [\"a:80\"]\nfall = 0",
            "services.site.fall: must be from 1 to 100 (got 0)",
        ),
        (
            "upstreams = [\"a:80\"]\nrise = 101",
            "services.site.rise: must be from 1 to 100 (got 101)",
        ),
        (
            "upstreams = [\"a:80\"]\nhealth_check_interval = \"10ms\"",
            "must be at least 100ms",
        ),
        (
            "upstreams = [\"a:80\"]\nconnect_timeout = \"1ms\"",
            "must be at least 10ms",
        ),
    ];
    for (keys, want) in cases {
        let text = format!("[services.site]\ntcp_listen = \"0.0.0.0:8000\"\n{keys}\n");
        let p = problems(&text);
        assert!(
            p.iter()
                .any(|e| e.starts_with("3: ") || e.starts_with("4: "))
                && p.iter().any(|e| e.contains(want)),
            "{keys:?}: wanted {want:?} at its line, got {p:#?}"
        );
    }
}
