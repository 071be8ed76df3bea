//! The gateway's admin endpoint: Prometheus `/metrics` checked by the reference parser while
//! traffic flows, and the status page rendered by headless Chromium.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PW: &str = "admin-test-service-password";

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Samples of the exposition, parsed by prometheus_client (fails the test on a parse error).
fn parse_metrics(text: &str) -> Vec<serde_json::Value> {
    let mut child = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/prom_parse.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn sample(samples: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .and_then(|s| s["value"].as_f64())
}

fn start(dir: &Dir) -> (RunningGateway, SocketAddr, Proc) {
    let conf = gateway_toml(
        dir,
        &GatewayConf {
            listen: "127.0.0.1:0",
            timers: FAST_TIMERS,
            services: &[("web", PW)],
            extra: "admin_listen = \"127.0.0.1:0\"\n",
        },
    );
    let gw = RunningGateway::start(&conf);
    let line = gw.proc.wait_for("admin listener", STARTUP, |l| {
        message_is(l, "admin endpoint listening")
    });
    let admin: SocketAddr = field(&line, "addr").unwrap().parse().unwrap();
    let agent_conf = agent_toml(
        dir,
        "agent.toml",
        gw.listen,
        &gw.fingerprint,
        &[("web", PW, echo_server())],
    );
    let agent = Proc::start("agent", &["agent", "-c", agent_conf.to_str().unwrap()]);
    gw.wait_registered("web", 1);
    (gw, admin, agent)
}

#[test]
fn metrics_parse_and_counters_move_with_traffic() {
    let dir = Dir::new();
    let (gw, admin, _agent) = start(&dir);
    let (status, before) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    let before = parse_metrics(&before);
    assert_eq!(
        sample(&before, "dialback_gateway_agents_online", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &before,
            "dialback_gateway_agent_online",
            &[("service", "web")]
        ),
        Some(1.0)
    );
    let total0 = sample(
        &before,
        "dialback_gateway_connections_total",
        &[("service", "web")],
    )
    .unwrap_or(0.0);

    let public = gw.service_addr("web");
    for i in 0..3u64 {
        let data = random_bytes(100_000, i + 9);
        assert!(roundtrip(public, data.clone(), Duration::from_secs(30)) == data);
    }
    // Counters settle when the relays finish; wait for them with a bound.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = http_get(admin, "/metrics");
        let after = parse_metrics(&text);
        let total = sample(
            &after,
            "dialback_gateway_connections_total",
            &[("service", "web")],
        )
        .unwrap_or(0.0);
        let up = sample(
            &after,
            "dialback_gateway_bytes_total",
            &[("service", "web"), ("direction", "up")],
        )
        .unwrap_or(0.0);
        let down = sample(
            &after,
            "dialback_gateway_bytes_total",
            &[("service", "web"), ("direction", "down")],
        )
        .unwrap_or(0.0);
        let pairings = sample(
            &after,
            "dialback_gateway_pairing_seconds_count",
            &[("service", "web")],
        )
        .unwrap_or(0.0);
        let active = sample(
            &after,
            "dialback_gateway_connections_active",
            &[("service", "web")],
        )
        .unwrap_or(-1.0);
        if total >= total0 + 3.0
            && up >= 300_000.0
            && down >= 300_000.0
            && pairings >= 3.0
            && active == 0.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "counters did not move: total {total} (from {total0}), up {up}, down {down}, pairings {pairings}, active {active}\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, json) = http_get(admin, "/status");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["services"][0]["name"], "web");
    assert_eq!(v["services"][0]["online"], true);
}

#[test]
fn status_page_shows_service_and_agent_in_chromium() {
    let dir = Dir::new();
    let (_gw, admin, _agent) = start(&dir);
    // The pool (4 by default) fills right after registration; wait until /status says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, json) = http_get(admin, "/status");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        if v["services"][0]["pool_connections"] == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "the pool did not fill: {json}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("http://{admin}/");
    let chromium = Chromium::new(&dir);
    let (dom, _) = chromium.dump_dom(&url);
    assert!(
        dom.contains("data-service=\"web\""),
        "the page shows no row for service web:\n{dom}"
    );
    assert!(
        dom.contains("data-state=\"online\""),
        "the service is not shown online:\n{dom}"
    );
    let agent_cell = dom.split("class=\"agent\"").nth(1).unwrap_or("");
    assert!(
        agent_cell.contains("127.0.0.1:"),
        "the agent's address is not shown:\n{dom}"
    );
    assert!(
        dom.contains("class=\"num pool\">4<"),
        "the pool's four ready connections are not shown:\n{dom}"
    );

    // Keep a screenshot as an artifact for people to look at.
    chromium.screenshot(&url, "status-page.png", "1200,700");
}

#[test]
fn agent_metrics_show_registration_and_traffic() {
    let dir = Dir::new();
    let conf = gateway_toml(
        &dir,
        &GatewayConf {
            listen: "127.0.0.1:0",
            timers: FAST_TIMERS,
            services: &[("web", PW)],
            extra: "",
        },
    );
    let gw = RunningGateway::start(&conf);
    let agent_conf = agent_toml(
        &dir,
        "agent.toml",
        gw.listen,
        &gw.fingerprint,
        &[("web", PW, echo_server())],
    );
    let text = std::fs::read_to_string(&agent_conf).unwrap();
    std::fs::write(
        &agent_conf,
        format!("admin_listen = \"127.0.0.1:0\"\n{text}"),
    )
    .unwrap();
    let agent = Proc::start("agent", &["agent", "-c", agent_conf.to_str().unwrap()]);
    let line = agent.wait_for("agent admin listener", STARTUP, |l| {
        message_is(l, "admin endpoint listening")
    });
    let admin: SocketAddr = field(&line, "addr").unwrap().parse().unwrap();
    gw.wait_registered("web", 1);
    let data = random_bytes(50_000, 5);
    assert!(
        roundtrip(
            gw.service_addr("web"),
            data.clone(),
            Duration::from_secs(30)
        ) == data
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = http_get(admin, "/metrics");
        assert_eq!(status, 200);
        let m = parse_metrics(&text);
        let registered = sample(&m, "dialback_agent_registered", &[("service", "web")]);
        let total = sample(
            &m,
            "dialback_agent_data_connections_total",
            &[("service", "web")],
        )
        .unwrap_or(0.0);
        let up = sample(
            &m,
            "dialback_agent_bytes_total",
            &[("service", "web"), ("direction", "up")],
        )
        .unwrap_or(0.0);
        if registered == Some(1.0) && total >= 1.0 && up >= 50_000.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent metrics did not move:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The agent has no status page.
    assert_eq!(http_get(admin, "/").0, 404);
}
