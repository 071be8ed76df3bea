//! Direct services: the gateway dials a service's `upstreams` itself, spreads clients over them
//! (round robin, least connections), takes a killed server out (clients that hit it are
//! retried on another, the health checks confirm) and puts it back when it answers again;
//! through a raw TCP port and through the HTTP entry point.

#[path = "common/balancers.rs"]
mod balancers;
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use balancers::free_port;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

/// A server that answers `?` with its name, then holds the connection until the client
/// closes it. Health checks (connections that send nothing) are not counted.
struct Upstream {
    addr: SocketAddr,
    answered: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    fn start(name: &'static str, port: u16) -> Upstream {
        Upstream::start_counting(name, port, Arc::new(AtomicUsize::new(0)))
    }

    fn start_counting(name: &'static str, port: u16, answered: Arc<AtomicUsize>) -> Upstream {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let count = answered.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                // Restarted on the same port while old connections linger in TIME_WAIT.
                socket.set_reuseaddr(true).unwrap();
                socket
                    .bind(SocketAddr::from(([127, 0, 0, 1], port)))
                    .unwrap();
                let l = socket.listen(128).unwrap();
                ready_tx.send(l.local_addr().unwrap()).unwrap();
                let mut conns = tokio::task::JoinSet::new();
                let mut stopped = stopped;
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        Ok((mut s, _)) = l.accept() => {
                            let count = count.clone();
                            conns.spawn(async move {
                                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                                let mut b = [0u8; 1];
                                if !matches!(s.read(&mut b).await, Ok(1)) {
                                    return;
                                }
                                count.fetch_add(1, Ordering::SeqCst);
                                let _ = s.write_all(name.as_bytes()).await;
                                let mut rest = [0u8; 64];
                                while matches!(s.read(&mut rest).await, Ok(n) if n > 0) {}
                            });
                        }
                    }
                }
                // Dropping the listener and every connection: the server is gone.
                conns.abort_all();
            });
        });
        let addr = ready.recv_timeout(WAIT).expect("upstream started");
        Upstream {
            addr,
            answered,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects through `public`, asks who answers, and keeps the connection open.
fn who(public: SocketAddr) -> (String, TcpStream) {
    let mut s = TcpStream::connect_timeout(&public, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"?").unwrap();
    let mut name = [0u8; 5];
    s.read_exact(&mut name)
        .unwrap_or_else(|e| panic!("no answer through {public}: {e}"));
    (String::from_utf8_lossy(&name).into_owned(), s)
}

fn metrics(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").1
}

/// The value of `name{service="SERVICE",upstream="ADDR"}`.
fn upstream_metric(text: &str, name: &str, service: &str, addr: SocketAddr) -> Option<f64> {
    let prefix = format!("dialback_gateway_{name}{{service=\"{service}\",upstream=\"{addr}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn wait_metric(admin: SocketAddr, name: &str, service: &str, addr: SocketAddr, want: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = metrics(admin);
        if upstream_metric(&m, name, service, addr) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} of {addr} is not {want}:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn gateway(dir: &Dir, services: &str) -> (RunningGateway, SocketAddr) {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let conf = dir.write(
        "gateway.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\nadmin_listen = \"{admin}\"\n{FAST_TIMERS}\n{services}"
        ),
    );
    let gw = RunningGateway::start(&conf);
    (gw, admin)
}

fn list(ups: &[&Upstream]) -> String {
    ups.iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn round_robin_spreads_evenly_and_a_killed_upstream_is_taken_out_and_comes_back() {
    let dir = Dir::new();
    let (a, mut b, c) = (
        Upstream::start("alpha", 0),
        Upstream::start("bravo", 0),
        Upstream::start("delta", 0),
    );
    let (gw, admin) = gateway(
        &dir,
        &format!(
            "[services.site]\nupstreams = [{}]\ntcp_listen = \"127.0.0.1:0\"\nhealth_check_interval = \"200ms\"\nhealth_check_timeout = \"200ms\"\n",
            list(&[&a, &b, &c])
        ),
    );
    let public = gw.service_addr("site");

    // One client at a time: each server in turn, exactly.
    for _ in 0..30 {
        drop(who(public));
    }
    let counts: Vec<usize> = [&a, &b, &c]
        .iter()
        .map(|u| u.answered.load(Ordering::SeqCst))
        .collect();
    assert_eq!(counts, [10, 10, 10]);
    assert_eq!(
        gw.proc.count(|l| message_is(l, "agent registered")),
        0,
        "no agent involved"
    );

    // bravo dies. Every client still gets an answer, from the others.
    let bravo = b.addr;
    b.kill();
    for i in 0..30 {
        let (name, _) = who(public);
        assert_ne!(name, "bravo", "client {i} reached the killed server");
    }
    gw.proc.wait_for("bravo down", WAIT, |l| {
        message_contains(l, "upstream down")
            && field(l, "upstream").as_deref() == Some(&bravo.to_string())
    });
    wait_metric(admin, "upstream_up", "site", bravo, 0.0);
    // The status document and page say which server is down.
    let (_, status) = http_get(admin, "/status");
    let v: serde_json::Value =
        serde_json::from_str(status.rsplit("\r\n\r\n").next().unwrap()).unwrap();
    let site = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "site")
        .unwrap();
    let states: Vec<(String, bool)> = site["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["addr"].as_str().unwrap().to_owned(),
                u["up"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (a.addr.to_string(), true),
            (bravo.to_string(), false),
            (c.addr.to_string(), true)
        ]
    );
    let (dom, log) = Chromium::new(&dir).dump_dom(&format!("http://{admin}/"));
    assert!(dom.contains("direct 2/3 up"), "{dom}\n{log}");
    assert!(dom.contains(&format!("{bravo} (down)")), "{dom}");
    let m = metrics(admin);
    assert!(
        upstream_metric(&m, "upstream_connect_failures_total", "site", bravo).unwrap() >= 1.0
            || upstream_metric(&m, "upstream_check_failures_total", "site", bravo).unwrap() >= 1.0,
        "{m}"
    );

    // It comes back on the same port: the health checks bring it back, clients reach it.
    let b2 = Upstream::start("bravo", bravo.port());
    gw.proc.wait_for("bravo up", WAIT, |l| {
        message_contains(l, "upstream up again")
            && field(l, "upstream").as_deref() == Some(&bravo.to_string())
    });
    wait_metric(admin, "upstream_up", "site", bravo, 1.0);
    for _ in 0..9 {
        drop(who(public));
    }
    assert_eq!(
        b2.answered.load(Ordering::SeqCst),
        3,
        "bravo gets its turn again"
    );
}

#[test]
fn least_conn_sends_new_clients_to_the_least_loaded_upstream() {
    let dir = Dir::new();
    let ups = [
        Upstream::start("alpha", 0),
        Upstream::start("bravo", 0),
        Upstream::start("delta", 0),
    ];
    let (gw, admin) = gateway(
        &dir,
        &format!(
            "[services.site]\nupstreams = [{}]\ntcp_listen = \"127.0.0.1:0\"\nbalance = \"least_conn\"\n",
            list(&[&ups[0], &ups[1], &ups[2]])
        ),
    );
    let public = gw.service_addr("site");
    let (n1, c1) = who(public);
    let (n2, c2) = who(public);
    let (n3, c3) = who(public);
    assert_eq!([n1.as_str(), &n2, &n3], ["alpha", "bravo", "delta"]);
    // bravo and delta are released; alpha keeps its client.
    drop((c2, c3));
    wait_metric(
        admin,
        "upstream_connections_active",
        "site",
        ups[1].addr,
        0.0,
    );
    wait_metric(
        admin,
        "upstream_connections_active",
        "site",
        ups[2].addr,
        0.0,
    );
    // Round robin would go to alpha next; the least loaded are bravo, then delta.
    let (n4, _c4) = who(public);
    let (n5, _c5) = who(public);
    assert_eq!([n4.as_str(), &n5], ["bravo", "delta"]);
    wait_metric(
        admin,
        "upstream_connections_active",
        "site",
        ups[0].addr,
        1.0,
    );
    drop(c1);
}

#[test]
fn the_http_entry_point_reaches_upstreams_and_says_when_none_answers() {
    let dir = Dir::new();
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (one, two) = (http_responder("one"), http_responder("two"));
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (gw, _admin) = gateway(
        &dir,
        &format!(
            "[http]\nlisten = \"{http}\"\n\n[services.site]\nupstreams = [\"{one}\", \"{two}\"]\n\n[services.gone]\nupstreams = [\"{dead}\"]\nconnect_timeout = \"500ms\"\n"
        ),
    );
    let _ = gw.proc.wait_for("http", WAIT, |l| {
        message_is(l, "listening for HTTP clients")
    });
    let mut seen = Vec::new();
    for _ in 0..4 {
        let (status, body) = http_get(http, "/~~site/who");
        assert_eq!(status, 200, "{body}");
        seen.push(body.rsplit("\r\n\r\n").next().unwrap_or("").to_owned());
    }
    assert_eq!(seen, ["one /who", "two /who", "one /who", "two /who"]);
    let (status, body) = http_get(http, "/~~gone/");
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("no upstream of service gone could be reached"),
        "{body}"
    );
    gw.proc.wait_for("logged", WAIT, |l| {
        message_contains(l, "client dropped: no upstream could be reached")
            && field(l, "service").as_deref() == Some("gone")
    });
}

#[test]
fn a_reload_changes_upstreams_and_keeps_the_health_of_unchanged_services() {
    let dir = Dir::new();
    let (a, b) = (Upstream::start("alpha", 0), Upstream::start("bravo", 0));
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (site_port, more_port) = (free_port(), free_port());
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let text = |site: &str, more: bool| {
        let mut t = format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\nadmin_listen = \"{admin}\"\n{FAST_TIMERS}\n\
             [services.site]\nupstreams = [{site}]\ntcp_listen = \"127.0.0.1:{site_port}\"\n\n\
             [services.steady]\nupstreams = [\"{}\", \"{dead}\"]\ntcp_listen = \"127.0.0.1:0\"\nhealth_check_interval = \"1s\"\nfall = 1\n",
            a.addr
        );
        if more {
            t.push_str(&format!(
                "\n[services.more]\nupstreams = [\"{}\"]\ntcp_listen = \"127.0.0.1:{more_port}\"\n",
                b.addr
            ));
        }
        t
    };
    let conf = dir.write("gateway.toml", &text(&format!("\"{}\"", a.addr), false));
    let gw = RunningGateway::start(&conf);
    let site = SocketAddr::from(([127, 0, 0, 1], site_port));
    for _ in 0..3 {
        assert_eq!(who(site).0, "alpha");
    }
    // steady's dead server is found out by its checks.
    wait_metric(admin, "upstream_up", "steady", dead, 0.0);

    // site gets a second server, and a new direct service appears.
    let new = dir.path().join("gateway.toml.new");
    std::fs::write(&new, text(&format!("\"{}\", \"{}\"", a.addr, b.addr), true)).unwrap();
    std::fs::rename(&new, &conf).unwrap();
    let line = gw
        .proc
        .wait_for("reload", WAIT, |l| message_is(l, "configuration reloaded"));
    assert_eq!(field(&line, "changed").as_deref(), Some("site"), "{line}");
    assert_eq!(field(&line, "added").as_deref(), Some("more"), "{line}");
    // steady did not change: its dead server is still known to be down, not healthy afresh.
    assert_eq!(
        upstream_metric(&metrics(admin), "upstream_up", "steady", dead),
        Some(0.0)
    );
    let names: Vec<String> = (0..4).map(|_| who(site).0).collect();
    assert_eq!(names, ["alpha", "bravo", "alpha", "bravo"]);
    assert_eq!(
        who(SocketAddr::from(([127, 0, 0, 1], more_port))).0,
        "bravo"
    );
}
