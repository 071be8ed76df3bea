//! Hostile input against the real gateway: broken PROXY headers, garbage before the TLS
//! hello, a flood of wrong passwords, a thousand idle half-open connections, a full set of
//! handshake slots, and a graceful drain on SIGTERM. Every wait is bounded and every check is
//! on what the gateway did (closed, logged, still served), never on how fast.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::{
    agent_toml, echo_server, field, level, message_contains, message_is, wait_echo_works, Dir,
    Proc, RunningGateway,
};

const WAIT: Duration = Duration::from_secs(30);
const TIMERS: &str = "heartbeat = \"300ms\"\ndead_after = \"1500ms\"\ntoken_ttl = \"2s\"\nhandshake_timeout = \"2s\"\n";
const PW: &str = "hardening-secret-0123";

fn gateway(dir: &Dir, top: &str, service: &str) -> RunningGateway {
    let config = dir.write(
        "gateway.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n{TIMERS}{top}\n[services.web]\npassword = \"{PW}\"\ntcp_listen = \"127.0.0.1:0\"\n{service}"
        ),
    );
    RunningGateway::start(&config)
}

/// An agent for service `web`; `connect_timeout` replaces the harness's 3s when given.
fn agent(
    dir: &Dir,
    gw: &RunningGateway,
    file: &str,
    password: &str,
    connect_timeout: &str,
) -> Proc {
    let path = agent_toml(
        dir,
        file,
        gw.listen,
        &gw.fingerprint,
        &[("web", password, echo_server())],
    );
    if !connect_timeout.is_empty() {
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replace(
            "connect_timeout = \"3s\"",
            &format!("connect_timeout = \"{connect_timeout}\""),
        );
        assert!(text.contains(connect_timeout));
        std::fs::write(&path, text).unwrap();
    }
    Proc::start(file, &["agent", "-c", path.to_str().unwrap()])
}

/// Reads until the peer closes (EOF or reset); what was read. Panics if it stays open.
fn read_until_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("connection not closed within {within:?}: {e}"),
        }
    }
}

fn raise_fd_limit(want: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
        }
        assert!(
            r.rlim_cur >= want,
            "need {want} file descriptors, the hard limit is {}",
            r.rlim_max
        );
    }
}

#[test]
fn truncated_oversized_and_garbage_proxy_headers_are_dropped_with_a_reason() {
    let dir = Dir::new();
    let gw = gateway(&dir, "", "accept_proxy = true\n");
    let agent_proc = agent(&dir, &gw, "agent.toml", PW, "");
    gw.wait_registered("web", 1);
    let public = gw.service_addr("web");
    let logged = |what: &str, needle: &'static str| {
        gw.proc.wait_for(what, WAIT, move |l| {
            message_contains(l, "client dropped: PROXY header") && l.contains(needle)
        });
    };

    // Oversized v2: refused on its length field, without waiting for the 65535 bytes.
    let mut s = TcpStream::connect(public).unwrap();
    s.write_all(b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff")
        .unwrap();
    assert!(read_until_closed(&mut s, WAIT).is_empty());
    logged("oversized v2", "exceeds the limit of 2048");

    // A v1 line that never ends within 107 bytes.
    let mut s = TcpStream::connect(public).unwrap();
    s.write_all(b"PROXY TCP4 ").unwrap();
    s.write_all(&[b'1'; 200]).unwrap();
    assert!(read_until_closed(&mut s, WAIT).is_empty());
    logged("overlong v1", "longer than 107 bytes");

    // A header cut short, then silence: dropped at handshake_timeout.
    let mut s = TcpStream::connect(public).unwrap();
    s.write_all(b"PROXY TCP4 198.51.100.7 ").unwrap();
    assert!(read_until_closed(&mut s, WAIT).is_empty());
    logged("truncated v1", "no complete PROXY header within 2s");

    // A v2 header cut short by a FIN.
    let mut s = TcpStream::connect(public).unwrap();
    s.write_all(b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc6\x33")
        .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert!(read_until_closed(&mut s, WAIT).is_empty());
    logged("truncated v2", "closed before a complete PROXY header");

    // No header at all, and garbage.
    for (what, bytes, needle) in [
        (
            "tls hello",
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            "got a TLS hello",
        ),
        (
            "http",
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            "expected a PROXY protocol header",
        ),
        (
            "bad v1",
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n"[..],
            "port out of range",
        ),
        (
            "bad v2",
            &b"\r\n\r\n\0\r\nQUIT\n\x23\x11\x00\x0c"[..],
            "version/command byte 0x23",
        ),
    ] {
        let mut s = TcpStream::connect(public).unwrap();
        let _ = s.write_all(bytes);
        assert!(read_until_closed(&mut s, WAIT).is_empty(), "{what}");
        logged(what, needle);
    }

    // A balancer's health check (v2 LOCAL, then close) costs no data connection and no warning.
    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    let mut s = TcpStream::connect(public).unwrap();
    s.write_all(local).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert!(read_until_closed(&mut s, WAIT).is_empty());
    gw.proc.wait_for("health check", WAIT, |l| {
        message_is(l, "balancer health check on the public port")
    });
    // LOCAL followed by bytes is served, as the balancer's own connection.
    let mut s = TcpStream::connect(public).unwrap();
    s.write_all(&[&local[..], b"pong"].concat()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut s, WAIT), b"pong");

    // A good header still works, and the gateway tells the agent the address it carried.
    let mut s = TcpStream::connect(public).unwrap();
    s.write_all(b"PROXY TCP4 198.51.100.7 203.0.113.1 40000 443\r\nping")
        .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut s, WAIT), b"ping");
    agent_proc.wait_for("the client address from the header", WAIT, |l| {
        field(l, "client").as_deref() == Some("198.51.100.7:40000")
    });
}

#[test]
fn garbage_before_the_tls_hello_is_dropped_and_agents_still_register() {
    let dir = Dir::new();
    let gw = gateway(&dir, "", "");
    let garbage: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        // A TLS record header whose body never comes, then junk inside the "record".
        b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff",
    ];
    for bytes in garbage {
        let mut s = TcpStream::connect(gw.listen).unwrap();
        let _ = s.write_all(bytes);
        // A real TLS hello right behind the garbage does not rescue the connection.
        let _ = s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
        read_until_closed(&mut s, WAIT);
    }
    gw.proc.wait_for_nth("four drops logged", 4, WAIT, |l| {
        message_contains(l, "connection on agent port dropped")
    });
    let _agent = agent(&dir, &gw, "agent.toml", PW, "");
    gw.wait_registered("web", 1);
    wait_echo_works(gw.service_addr("web"), WAIT);
}

#[test]
fn a_flood_of_wrong_passwords_is_slowed_more_and_more_but_a_good_agent_registers() {
    let dir = Dir::new();
    let gw = gateway(&dir, "admin_listen = \"127.0.0.1:0\"\n", "");
    // The real agent with a wrong password retries every ~100ms: a steady stream of failures
    // from 127.0.0.1.
    let mut bad = agent(&dir, &gw, "bad.toml", "a-wrong-password-123", "");
    // Wait for a delay near the top of the scale: 200ms, 400ms, 800ms, 1.6s, 3.2s, ...
    gw.proc
        .wait_for("the delay to grow past 3s", Duration::from_secs(60), |l| {
            field(l, "delay_ms")
                .and_then(|d| d.parse::<u64>().ok())
                .is_some_and(|d| d >= 3000)
        });
    bad.kill9();
    let delays: Vec<u64> = gw
        .proc
        .log()
        .iter()
        .filter_map(|l| field(l, "delay_ms")?.parse().ok())
        .collect();
    assert!(delays.len() >= 5, "{delays:?}");
    assert!(
        delays.windows(2).all(|w| w[0] <= w[1]),
        "delays must grow: {delays:?}"
    );
    assert!(
        delays.iter().all(|d| *d <= 5000),
        "delays are capped: {delays:?}"
    );
    let failures = gw.proc.count(|l| {
        message_contains(l, "control connection refused")
            && field(l, "code").as_deref() == Some("auth_failed")
    });
    assert!(failures >= 8, "{failures} failures");
    gw.proc
        .wait_for("the failure count in the reason", WAIT, |l| {
            message_contains(l, "failure 8 from this address")
        });

    // The good agent, from the same address, waits its turn and registers: its connect
    // timeout (10s, the default) is longer than the longest delay.
    let _good = agent(&dir, &gw, "good.toml", PW, "10s");
    gw.wait_registered("web", 1);
    wait_echo_works(gw.service_addr("web"), WAIT);

    // Operators see it in /metrics too.
    let admin = gw.proc.wait_for("admin address", WAIT, |l| {
        message_is(l, "admin endpoint listening")
    });
    let admin: std::net::SocketAddr = field(&admin, "addr").unwrap().parse().unwrap();
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let text = String::from_utf8(read_until_closed(&mut s, WAIT)).unwrap();
    let count = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("dialback_gateway_{name} ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!(count("auth_delays_total") >= 5, "{text}");
    assert!(count("auth_failures_total") >= 8, "{text}");
}

#[test]
fn a_thousand_idle_half_open_connections_neither_stop_clients_nor_outlive_their_timeout() {
    raise_fd_limit(4096);
    let dir = Dir::new();
    let gw = gateway(&dir, "", "");
    let _agent = agent(&dir, &gw, "agent.toml", PW, "");
    gw.wait_registered("web", 1);
    let public = gw.service_addr("web");
    wait_echo_works(public, WAIT);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.proc.pid()))
            .unwrap()
            .count()
    };
    let baseline = fds();

    // Half of them send nothing, half the first bytes of a TLS hello, then both fall silent.
    let mut idle: Vec<TcpStream> = (0..1000)
        .map(|i| {
            let mut s = TcpStream::connect(gw.listen).unwrap();
            if i % 2 == 1 {
                s.write_all(b"\x16\x03\x01\x02\x00\x01\x00").unwrap();
            }
            s
        })
        .collect();
    // Real clients are served meanwhile.
    for i in 0..20u8 {
        let got = common::roundtrip(public, vec![i; 1000], WAIT);
        assert_eq!(got, vec![i; 1000]);
    }
    // Every idle connection is closed by the gateway after handshake_timeout.
    let deadline = Instant::now() + Duration::from_secs(60);
    for s in &mut idle {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        read_until_closed(s, left);
    }
    // (Each was closed at its timeout, with the reason logged once.)
    gw.proc
        .wait_for_nth("1000 timeouts logged", 1000, WAIT, |l| {
            message_contains(l, "connection on agent port dropped")
                && message_contains(l, "no hello within")
        });
    wait_echo_works(public, WAIT);
    // And none of their sockets is left behind (a few of slack for the pool's refills).
    let deadline = Instant::now() + WAIT;
    while fds() > baseline + 4 {
        assert!(
            Instant::now() < deadline,
            "gateway holds {} descriptors, {baseline} before the idle connections",
            fds()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn handshake_slots_are_capped_per_address_and_in_all_and_free_up() {
    let dir = Dir::new();
    // A long handshake_timeout, so that no idle connection gives its slot back on its own.
    let config = dir.write(
        "gateway.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\nhandshake_timeout = \"30s\"\nmax_handshakes = 32\n[services.web]\npassword = \"{PW}\"\ntcp_listen = \"127.0.0.1:0\"\n"
        ),
    );
    let gw = RunningGateway::start(&config);
    // Connections from chosen loopback addresses (all of 127/8 is local).
    let from = |src: [u8; 4]| -> TcpStream {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = rt.block_on(async {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(std::net::SocketAddr::from((src, 0))).unwrap();
            sock.connect(gw.listen).await.unwrap().into_std().unwrap()
        });
        s.set_nonblocking(false).unwrap();
        s
    };
    // One address gets a quarter of the 32 slots: its 9th connection is closed at once.
    let mut idle: Vec<TcpStream> = (0..8).map(|_| from([127, 0, 0, 1])).collect();
    let mut ninth = from([127, 0, 0, 1]);
    // (Well before handshake_timeout: refused, not timed out.)
    read_until_closed(&mut ninth, Duration::from_secs(10));
    gw.proc.wait_for("per-address refusal", WAIT, |l| {
        message_contains(l, "share of the handshake slots") && l.contains("127.0.0.1:")
    });
    // Three more addresses fill the rest; then even a fresh address is closed at once.
    for last in 2..=4 {
        idle.extend((0..8).map(|_| from([127, 0, 0, last])));
    }
    let mut extra = from([127, 0, 0, 5]);
    read_until_closed(&mut extra, Duration::from_secs(10));
    gw.proc.wait_for("global refusal", WAIT, |l| {
        message_contains(l, "every handshake slot is taken") && l.contains("127.0.0.5:")
    });
    // Closed connections give their slots back; then an agent registers as usual.
    drop(idle);
    let _agent = agent(&dir, &gw, "agent.toml", PW, "");
    gw.wait_registered("web", 1);
    wait_echo_works(gw.service_addr("web"), WAIT);
}

#[test]
fn sigterm_stops_accepting_drains_then_exits() {
    let dir = Dir::new();
    let mut gw = gateway(&dir, "drain_timeout = \"30s\"\n", "");
    let _agent = agent(&dir, &gw, "agent.toml", PW, "");
    gw.wait_registered("web", 1);
    let public = gw.service_addr("web");
    wait_echo_works(public, WAIT);

    let mut client = TcpStream::connect(public).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let echo = |c: &mut TcpStream, msg: &[u8]| {
        c.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    };
    echo(&mut client, b"before");

    gw.proc.signal("TERM");
    gw.proc.wait_for("drain start", WAIT, |l| {
        message_contains(l, "shutting down: no new clients")
    });
    // No new clients...
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(public).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the public port still accepts after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...but the client in the middle of its session keeps being served.
    echo(&mut client, b"during the drain");
    assert!(
        gw.proc
            .count(|l| message_is(l, "drained: every connection finished"))
            == 0
    );
    client.shutdown(Shutdown::Write).unwrap();
    read_until_closed(&mut client, WAIT);
    drop(client);
    gw.proc.wait_for("drained", WAIT, |l| {
        message_is(l, "drained: every connection finished")
    });
    assert_eq!(gw.proc.wait_exit(WAIT), Some(0));
}

#[test]
fn sigterm_on_the_agent_ends_its_sessions_and_lets_relays_finish() {
    let dir = Dir::new();
    let gw = gateway(&dir, "", "");
    let mut agent = agent(&dir, &gw, "agent.toml", PW, "");
    gw.wait_registered("web", 1);
    let public = gw.service_addr("web");
    wait_echo_works(public, WAIT);

    let mut client = TcpStream::connect(public).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let echo = |c: &mut TcpStream, msg: &[u8]| {
        c.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    };
    echo(&mut client, b"before");
    agent.signal("TERM");
    agent.wait_for("agent drain start", WAIT, |l| {
        message_contains(l, "shutting down: control connections closed")
    });
    // The gateway sees the agent go at once and sends it no new clients. The agent said it is
    // shutting down, so that is routine (INFO), not a lost agent (WARN)...
    let ended = gw.proc.wait_for("session ended", WAIT, |l| {
        message_contains(l, "agent session ended")
    });
    assert_eq!(level(&ended).as_deref(), Some("INFO"), "{ended}");
    assert!(
        message_contains(&ended, "the agent is shutting down"),
        "{ended}"
    );
    // ...while the relay in progress keeps working.
    echo(&mut client, b"during the drain");
    client.shutdown(Shutdown::Write).unwrap();
    read_until_closed(&mut client, WAIT);
    agent.wait_for("agent drained", WAIT, |l| {
        message_is(l, "drained: every relay finished")
    });
    assert_eq!(agent.wait_exit(WAIT), Some(0));
}
