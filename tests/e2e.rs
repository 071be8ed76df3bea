//! End-to-end tests with the real `dialback` binary on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const PW: &str = "correct horse battery staple";
const TIMERS: &str = FAST_TIMERS;

fn gateway_with(dir: &Dir, services: &[(&str, &str)]) -> RunningGateway {
    let conf = gateway_toml(
        dir,
        &GatewayConf {
            listen: "127.0.0.1:0",
            timers: TIMERS,
            services,
            extra: "",
        },
    );
    RunningGateway::start(&conf)
}

fn agent(
    dir: &Dir,
    gw: &RunningGateway,
    file: &str,
    services: &[(&str, &str, std::net::SocketAddr)],
) -> Proc {
    let conf = agent_toml(dir, file, gw.listen, &gw.fingerprint, services);
    Proc::start(file, &["agent", "-c", conf.to_str().unwrap()])
}

#[test]
fn relays_64_mib_each_way_with_matching_sha256() {
    let dir = Dir::new();
    let gw = gateway_with(&dir, &[("bulk", PW)]);
    let echo = echo_server();
    let _agent = agent(&dir, &gw, "agent.toml", &[("bulk", PW, echo)]);
    gw.wait_registered("bulk", 1);
    let public = gw.service_addr("bulk");

    let data = random_bytes(64 << 20, 0xdecaf);
    let sent = Sha256::digest(&data);
    let started = Instant::now();
    let back = roundtrip(public, data, Duration::from_secs(120));
    assert_eq!(back.len(), 64 << 20, "echoed length");
    assert_eq!(Sha256::digest(&back), sent, "SHA-256 of the echoed stream");
    eprintln!("64 MiB each way in {:?}", started.elapsed());
}

#[test]
fn hundred_concurrent_clients_each_get_their_own_bytes() {
    let dir = Dir::new();
    let gw = gateway_with(&dir, &[("echo", PW)]);
    let echo = echo_server();
    let _agent = agent(&dir, &gw, "agent.toml", &[("echo", PW, echo)]);
    gw.wait_registered("echo", 1);
    let public = gw.service_addr("echo");

    let clients: Vec<_> = (0..100u64)
        .map(|i| {
            thread::spawn(move || {
                // Different sizes and contents per client, so a mix-up cannot go unnoticed.
                let data = random_bytes(1000 + (i as usize) * 3001, i + 1);
                let back = roundtrip(public, data.clone(), Duration::from_secs(60));
                assert!(
                    back == data,
                    "client {i} got {} bytes that are not its own",
                    back.len()
                );
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
}

#[test]
fn wrong_password_is_refused_and_never_reaches_the_gateway() {
    let dir = Dir::new();
    let wrong = "wrong-password-7c1f9e";
    let gw = gateway_with(&dir, &[("svc", PW)]);
    let echo = echo_server();
    let agent = agent(&dir, &gw, "agent.toml", &[("svc", wrong, echo)]);

    agent.wait_for("auth refusal", STARTUP, |l| l.contains("auth_failed"));
    gw.proc.wait_for("refusal logged", STARTUP, |l| {
        message_contains(l, "control connection refused") && l.contains("wrong password proof")
    });
    // Refused again on retry, with backoff rather than a tight loop.
    agent.wait_for_nth("second refusal", 2, STARTUP, |l| l.contains("auth_failed"));
    assert_eq!(gw.proc.count(|l| message_is(l, "agent registered")), 0);

    // A client finds the service offline and is closed at once.
    let public = gw.service_addr("svc");
    let mut c = TcpStream::connect(public).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        c.read(&mut buf).unwrap_or(0),
        0,
        "offline service must close the client"
    );

    for line in gw.proc.log().iter().chain(agent.log().iter()) {
        assert!(
            !line.contains(wrong) && !line.contains(PW),
            "a password appeared in a log line: {line}"
        );
    }
}

#[test]
fn second_agent_is_refused_until_the_first_is_dead() {
    let dir = Dir::new();
    let gw = gateway_with(&dir, &[("solo", PW)]);
    let echo = echo_server();
    let mut first = agent(&dir, &gw, "first.toml", &[("solo", PW, echo)]);
    gw.wait_registered("solo", 1);

    // Freeze the first agent: its connection stays open but goes silent, like a dead NAT.
    first.signal("STOP");
    let frozen_at = Instant::now();
    let second = agent(&dir, &gw, "second.toml", &[("solo", PW, echo)]);
    second.wait_for("already registered refusal", STARTUP, |l| {
        l.contains("already_registered")
    });
    gw.proc.wait_for("gateway-side refusal", STARTUP, |l| {
        l.contains("already has a live agent")
    });

    // After dead_after (1.5 s) of silence the gateway drops the first and accepts the second.
    gw.proc.wait_for("dead session dropped", STARTUP, |l| {
        message_contains(l, "agent session ended") && l.contains("dead_after")
    });
    gw.wait_registered("solo", 2);
    assert!(
        frozen_at.elapsed() >= Duration::from_millis(1500),
        "registered before dead_after passed"
    );
    second.wait_for("second registered", STARTUP, |l| {
        message_is(l, "registered with gateway")
    });
    first.kill9();
    wait_echo_works(gw.service_addr("solo"), STARTUP);
}

#[test]
fn killed_agent_is_replaced_and_clients_see_a_clean_close() {
    let dir = Dir::new();
    let gw = gateway_with(&dir, &[("svc", PW)]);
    let echo = echo_server();
    let mut first = agent(&dir, &gw, "first.toml", &[("svc", PW, echo)]);
    gw.wait_registered("svc", 1);
    let public = gw.service_addr("svc");
    wait_echo_works(public, STARTUP);

    first.kill9();
    // A killed agent says nothing: a lost agent is a warning.
    let ended = gw.proc.wait_for("session end", STARTUP, |l| {
        message_contains(l, "agent session ended")
    });
    assert_eq!(level(&ended).as_deref(), Some("WARN"), "{ended}");
    let _second = agent(&dir, &gw, "second.toml", &[("svc", PW, echo)]);
    gw.wait_registered("svc", 2);
    wait_echo_works(public, STARTUP);
}

#[test]
fn agent_reregisters_after_gateway_restart() {
    let dir = Dir::new();
    let echo = echo_server();
    let mut gw = gateway_with(&dir, &[("svc", PW)]);
    let agent = agent(&dir, &gw, "agent.toml", &[("svc", PW, echo)]);
    gw.wait_registered("svc", 1);
    wait_echo_works(gw.service_addr("svc"), STARTUP);

    // Restart on the same port with the same state_dir: same certificate, same pin.
    let listen = gw.listen;
    gw.proc.kill9();
    let conf = gateway_toml(
        &dir,
        &GatewayConf {
            listen: &listen.to_string(),
            timers: TIMERS,
            services: &[("svc", PW)],
            extra: "",
        },
    );
    let gw2 = RunningGateway::start(&conf);
    assert_eq!(
        gw2.fingerprint, gw.fingerprint,
        "the generated certificate is reused"
    );
    gw2.wait_registered("svc", 1);
    agent.wait_for_nth("registered twice", 2, STARTUP, |l| {
        message_is(l, "registered with gateway")
    });
    wait_echo_works(gw2.service_addr("svc"), STARTUP);
}

#[test]
fn half_close_keeps_the_other_direction_flowing() {
    // The local service reads until EOF, then answers: only works if the client's FIN is
    // forwarded while the reverse direction stays open.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let local = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                s.write_all(format!("read {} bytes", got.len()).as_bytes())
                    .unwrap();
                s.shutdown(Shutdown::Write).unwrap();
            });
        }
    });
    let dir = Dir::new();
    let gw = gateway_with(&dir, &[("hc", PW)]);
    let _agent = agent(&dir, &gw, "agent.toml", &[("hc", PW, local)]);
    gw.wait_registered("hc", 1);
    let back = roundtrip(
        gw.service_addr("hc"),
        vec![7u8; 100_000],
        Duration::from_secs(30),
    );
    assert_eq!(String::from_utf8_lossy(&back), "read 100000 bytes");
}

#[test]
fn check_and_fingerprint_commands() {
    let dir = Dir::new();
    let conf = gateway_toml(
        &dir,
        &GatewayConf {
            listen: "127.0.0.1:0",
            timers: TIMERS,
            services: &[("svc", PW)],
            extra: "",
        },
    );
    let out = std::process::Command::new(BIN)
        .args(["fingerprint", "-c", conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fp = String::from_utf8(out.stdout).unwrap();
    assert!(
        fp.trim().starts_with("sha256:") && fp.trim().len() == 7 + 64,
        "fingerprint output: {fp:?}"
    );
    // Generated once, then stable.
    let again = std::process::Command::new(BIN)
        .args(["fingerprint", "-c", conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(again.stdout).unwrap(), fp);

    let bad = dir.write("bad.toml", "listen = \"127.0.0.1:0\"\nbogus_key = 1\n");
    let out = std::process::Command::new(BIN)
        .args(["check", "-c", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("bogus_key") && err.contains(":2"),
        "check output: {err}"
    );
}

#[test]
fn demo_serves_its_page_through_the_tunnel() {
    let out = std::process::Command::new(BIN)
        .args([
            "demo",
            "--gateway-port",
            "0",
            "--public-port",
            "0",
            "--check",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo --check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Hello through dialback"),
        "demo page: {stdout}"
    );
}

#[test]
fn data_tls_service_relays_under_tls() {
    let dir = Dir::new();
    let conf = dir.write(
        "gateway.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n{FAST_TIMERS}\n[services.sealed]\npassword = \"{PW}\"\ntcp_listen = \"127.0.0.1:0\"\ndata_tls = true\n"
        ),
    );
    let gw = RunningGateway::start(&conf);
    let echo = echo_server();
    let agent = agent(&dir, &gw, "agent.toml", &[("sealed", PW, echo)]);
    agent.wait_for("registered with data_tls", STARTUP, |l| {
        message_is(l, "registered with gateway") && field(l, "data_tls").as_deref() == Some("true")
    });
    let data = random_bytes(4 << 20, 77);
    let back = roundtrip(
        gw.service_addr("sealed"),
        data.clone(),
        Duration::from_secs(60),
    );
    assert!(
        back == data,
        "4 MiB through a TLS data channel came back different"
    );
}
