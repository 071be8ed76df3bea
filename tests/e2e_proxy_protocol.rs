//! The PROXY protocol both ways, against real implementations: HAProxy (`accept-proxy`) and
//! nginx (`listen ... proxy_protocol`) behind the agent read the header dialback sends, and
//! HAProxy (`send-proxy`, `send-proxy-v2`) in front of the gateway is understood by
//! `accept_proxy`, on a service's port and on the agents' port.

#[path = "common/balancers.rs"]
mod balancers;
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use balancers::{free_port, Server};
use common::{field, message_is, Dir, Proc, RunningGateway, FAST_TIMERS, STARTUP};

const WAIT: Duration = Duration::from_secs(20);

/// A plain HTTP/1.0 GET through `addr`; the body, or why there was none.
fn get(addr: SocketAddr) -> Result<(SocketAddr, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let me = s.local_addr().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok((me, body.trim().to_owned()))
        }
        _ => Err(format!("not a 200 response: {text:?}")),
    }
}

/// Retries until the whole path works (the agent may still be registering).
fn get_eventually(addr: SocketAddr) -> (SocketAddr, String) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match get(addr) {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() >= deadline => panic!("GET via {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// HAProxy that answers every request with the client address it was told about.
fn haproxy_reporter(port: u16) -> Server {
    Server::haproxy(
        &format!(
            "frontend report\n  mode http\n  bind 127.0.0.1:{port} accept-proxy\n  http-request return status 200 content-type text/plain lf-string \"%[src]:%[src_port] %[dst]:%[dst_port]\"\n"
        ),
        &[port],
    )
}

fn gateway(dir: &Dir, top: &str, services: &str) -> RunningGateway {
    let config = dir.write(
        "gateway.toml",
        &format!("listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n{FAST_TIMERS}{top}\n{services}"),
    );
    RunningGateway::start(&config)
}

/// An agent for `services` (name, password, local, send_proxy) reaching the gateway at `gw`.
fn agent(
    dir: &Dir,
    gw: SocketAddr,
    fingerprint: &str,
    services: &[(&str, &str, u16, &str)],
) -> Proc {
    let mut text = format!(
        "gateway = \"{gw}\"\nfingerprint = \"{fingerprint}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nconnect_timeout = \"3s\"\n"
    );
    for (name, pw, local, send_proxy) in services {
        text.push_str(&format!(
            "\n[services.{name}]\npassword = \"{pw}\"\nlocal = \"127.0.0.1:{local}\"\nsend_proxy = \"{send_proxy}\"\n"
        ));
    }
    let path = dir.write("agent.toml", &text);
    Proc::start("agent", &["agent", "-c", path.to_str().unwrap()])
}

const PW1: &str = "pp-v1-secret-0123";
const PW2: &str = "pp-v2-secret-0123";
const SERVICES: &str = "[services.ppv1]\npassword = \"pp-v1-secret-0123\"\ntcp_listen = \"127.0.0.1:0\"\n\n[services.ppv2]\npassword = \"pp-v2-secret-0123\"\ntcp_listen = \"127.0.0.1:0\"\n";

#[test]
fn haproxy_behind_the_agent_sees_the_true_client_with_v1_and_v2() {
    let port = free_port();
    let _haproxy = haproxy_reporter(port);
    let dir = Dir::new();
    // v1 is the agent's own setting; v2 is asked for by the gateway (announced in WELCOME).
    let gw = gateway(&dir, "", &format!("{SERVICES}send_proxy = \"v2\"\n"));
    let _agent = agent(
        &dir,
        gw.listen,
        &gw.fingerprint,
        &[("ppv1", PW1, port, "v1"), ("ppv2", PW2, port, "off")],
    );
    for service in ["ppv1", "ppv2"] {
        let public = gw.service_addr(service);
        // Twice: once through a dial-back, once (likely) through a pooled connection.
        for _ in 0..2 {
            let (me, body) = get_eventually(public);
            assert_eq!(body, format!("{me} {public}"), "{service}");
        }
    }
}

#[test]
fn nginx_behind_the_agent_reads_v1_and_v2() {
    let port = free_port();
    let _nginx = Server::nginx(
        &format!(
            "  server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n    location / {{ return 200 \"$proxy_protocol_addr:$proxy_protocol_port $proxy_protocol_server_addr:$proxy_protocol_server_port\"; }}\n  }}\n"
        ),
        &[port],
    );
    let dir = Dir::new();
    let gw = gateway(&dir, "", SERVICES);
    let _agent = agent(
        &dir,
        gw.listen,
        &gw.fingerprint,
        &[("ppv1", PW1, port, "v1"), ("ppv2", PW2, port, "v2")],
    );
    for service in ["ppv1", "ppv2"] {
        let public = gw.service_addr(service);
        let (me, body) = get_eventually(public);
        assert_eq!(body, format!("{me} {public}"), "{service}");
    }
}

/// HAProxy in front of everything: clients reach a service through it, the agent reaches the
/// agents' port through it, and it connects to the gateway from 127.0.0.2, so only the PROXY
/// header can tell the gateway that the real peers are on 127.0.0.1.
#[test]
fn haproxy_send_proxy_in_front_of_the_gateway() {
    let report = free_port();
    let _reporter = haproxy_reporter(report);
    let dir = Dir::new();
    let gw = gateway(
        &dir,
        "accept_proxy = true\n",
        "[services.ppv1]\npassword = \"pp-v1-secret-0123\"\ntcp_listen = \"127.0.0.1:0\"\naccept_proxy = true\nallow_from = [\"127.0.0.1\"]\nclients_allow = [\"127.0.0.1\"]\n\n[services.ppv2]\npassword = \"pp-v2-secret-0123\"\ntcp_listen = \"127.0.0.1:0\"\naccept_proxy = true\nallow_from = [\"127.0.0.1\"]\nclients_allow = [\"127.0.0.1\"]\n",
    );
    let (agents_front, v1_front, v2_front) = (free_port(), free_port(), free_port());
    let backend = |name: &str, front: u16, to: SocketAddr, send: &str| {
        format!(
            "listen {name}\n  mode tcp\n  bind 127.0.0.1:{front}\n  server gw {to} {send} source 127.0.0.2\n\n"
        )
    };
    let _front = Server::haproxy(
        &[
            backend("agents", agents_front, gw.listen, "send-proxy-v2"),
            backend("v1", v1_front, gw.service_addr("ppv1"), "send-proxy"),
            backend("v2", v2_front, gw.service_addr("ppv2"), "send-proxy-v2"),
        ]
        .concat(),
        &[agents_front, v1_front, v2_front],
    );
    let via: SocketAddr = format!("127.0.0.1:{agents_front}").parse().unwrap();
    let _agent = agent(
        &dir,
        via,
        &gw.fingerprint,
        &[("ppv1", PW1, report, "v1"), ("ppv2", PW2, report, "v2")],
    );
    for service in ["ppv1", "ppv2"] {
        let line = gw
            .proc
            .wait_for("registration through haproxy", STARTUP, |l| {
                message_is(l, "agent registered") && field(l, "service").as_deref() == Some(service)
            });
        let peer = field(&line, "peer").unwrap();
        assert!(
            peer.starts_with("127.0.0.1:"),
            "{service}: registered from {peer}"
        );
    }
    for (service, front) in [("ppv1", v1_front), ("ppv2", v2_front)] {
        let front: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
        let (me, body) = get_eventually(front);
        // The client address survives two hops: HAProxy to the gateway, the agent to HAProxy.
        let (client, _) = body.split_once(' ').unwrap();
        assert_eq!(client, me.to_string(), "{service}");
    }
    // A connection that skips the balancer has no header: dropped, with the reason logged.
    let mut direct = TcpStream::connect(gw.service_addr("ppv1")).unwrap();
    direct.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    direct.set_read_timeout(Some(WAIT)).unwrap();
    let mut out = Vec::new();
    let _ = direct.read_to_end(&mut out);
    assert!(out.is_empty());
    gw.proc.wait_for("missing header logged", WAIT, |l| {
        l.contains("PROXY header") && l.contains("expected a PROXY protocol header")
    });
}

/// HAProxy with send-proxy-v2 in front of the HTTP entry point, connecting from 127.0.0.2:
/// the service sees the real client (127.0.0.1) in X-Forwarded-For, and `clients_allow`
/// decides on that address (403 for a service that does not allow it).
#[test]
fn haproxy_send_proxy_in_front_of_the_http_entry_point() {
    let report = free_port();
    let _reporter = Server::haproxy(
        &format!(
            "frontend report\n  mode http\n  bind 127.0.0.1:{report}\n  http-request return status 200 content-type text/plain lf-string \"%[req.hdr(x-forwarded-for)]\"\n"
        ),
        &[report],
    );
    let dir = Dir::new();
    let gw = gateway(
        &dir,
        "[http]\nlisten = \"127.0.0.1:0\"\naccept_proxy = true\n",
        "[services.open]\npassword = \"pp-v1-secret-0123\"\nclients_allow = [\"127.0.0.1\"]\n\n[services.closed]\npassword = \"pp-v2-secret-0123\"\nclients_allow = [\"10.0.0.0/8\"]\n",
    );
    let http: SocketAddr = {
        let l = gw.proc.wait_for("HTTP listener", STARTUP, |l| {
            message_is(l, "listening for HTTP clients")
        });
        field(&l, "addr").unwrap().parse().unwrap()
    };
    let front = free_port();
    let _front = Server::haproxy(
        &format!(
            "listen http_front\n  mode tcp\n  bind 127.0.0.1:{front}\n  server gw {http} send-proxy-v2 source 127.0.0.2\n"
        ),
        &[front],
    );
    let _agent = agent(
        &dir,
        gw.listen,
        &gw.fingerprint,
        &[("open", PW1, report, "off"), ("closed", PW2, report, "off")],
    );
    let request = |path: &str| -> (u16, String) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let mut s = TcpStream::connect(("127.0.0.1", front)).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            let text = String::from_utf8_lossy(&out).into_owned();
            let status: u16 = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            // 502 while the agent is still registering.
            if status != 502 || std::time::Instant::now() >= deadline {
                let body = text
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.trim().to_owned())
                    .unwrap_or_default();
                return (status, body);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(request("/~~open/"), (200, "127.0.0.1".to_owned()));
    let (status, body) = request("/~~closed/");
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("127.0.0.1") && body.contains("clients_allow"),
        "{body}"
    );
}
