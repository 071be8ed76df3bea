//! The data-connection pool against the real gateway binary (spec section 11.4): a
//! hand-rolled agent sees every PREPARE and DATA_BIND, so the tests can check that clients are
//! bound to pooled connections without a round trip, that a dead pooled connection is never
//! handed out, and that idle ones are retired; the real agent shows that nothing leaks.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::test_agent::{open_data, read_answer, redeem, TestAgent};
use common::*;
use dialback_core::data::DataAnswer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PW: &str = "pool-test-password";
/// The hand-rolled agent does not answer heartbeats while a test waits: a long dead_after.
const TIMERS: &str =
    "heartbeat = \"10s\"\ndead_after = \"60s\"\ntoken_ttl = \"5s\"\nhandshake_timeout = \"3s\"\n";

fn pooled_gateway_toml(dir: &Dir, timers: &str, service_extra: &str) -> PathBuf {
    let conf = gateway_toml(
        dir,
        &GatewayConf {
            listen: "127.0.0.1:0",
            timers,
            services: &[("pooled", PW)],
            extra: "",
        },
    );
    // The service's table is the last one in the file.
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(service_extra);
    std::fs::write(&conf, text).unwrap();
    conf
}

/// Takes the next `n` requests, asserting that each is a PREPARE.
async fn prepares(agent: &mut TestAgent, n: usize) -> Vec<dialback_core::agent::ConnectRequest> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = agent.next_request().await;
        assert!(r.pooled, "expected PREPARE, got CONNECT for {:?}", r.client);
        assert_eq!((r.client, r.public), (None, None));
        out.push(r);
    }
    out
}

/// Parks one data connection per request; the gateway answers nothing until it binds one.
async fn park(
    gateway: SocketAddr,
    reqs: &[dialback_core::agent::ConnectRequest],
) -> Vec<TcpStream> {
    let mut parked = Vec::new();
    for r in reqs {
        parked.push(open_data(gateway, r).await);
    }
    parked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_bound_to_pooled_connections_without_a_round_trip() {
    let dir = Dir::new();
    let conf = pooled_gateway_toml(&dir, TIMERS, "pool = 2\n");
    let gw = RunningGateway::start(&conf);
    let public = gw.service_addr("pooled");
    let mut agent = TestAgent::register(gw.listen, &gw.fingerprint, "pooled", PW).await;

    // Right after WELCOME, one PREPARE per pool slot, and nothing else.
    let reqs = prepares(&mut agent, 2).await;
    let mut parked = park(gw.listen, &reqs).await;
    assert!(
        agent
            .next_event_within(Duration::from_millis(300))
            .await
            .is_none(),
        "a full pool asks for nothing more"
    );

    let mut client = TcpStream::connect(public).await.unwrap();
    client.write_all(b"first bytes").await.unwrap();
    // One of the parked connections is bound to this client: DATA_BIND names it, and the
    // client's bytes follow on the same connection. No CONNECT went to the agent.
    let (mut p0, mut p1) = (parked.remove(0), parked.remove(0));
    let wait = Duration::from_secs(10);
    let (which, (answer, mut early)) = tokio::select! {
        r = read_answer(&mut p0, wait) => (0, r.unwrap()),
        r = read_answer(&mut p1, wait) => (1, r.unwrap()),
    };
    let (mut bound, mut other) = if which == 0 { (p0, p1) } else { (p1, p0) };
    let DataAnswer::Bind(bind) = answer else {
        panic!("a pooled connection must be bound with DATA_BIND, got {answer:?}")
    };
    assert_eq!(bind.client, Some(client.local_addr().unwrap()));
    assert_eq!(bind.public, Some(public));
    while early.len() < 11 {
        let mut buf = [0u8; 64];
        let n = bound.read(&mut buf).await.unwrap();
        assert!(n > 0);
        early.extend_from_slice(&buf[..n]);
    }
    assert_eq!(&early, b"first bytes");
    bound.write_all(b"answer").await.unwrap();
    let mut got = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
        .await
        .expect("no answer through the pooled connection")
        .unwrap();
    assert_eq!(&got, b"answer");

    // The used connection is replaced at once.
    let refill = agent.next_request().await;
    assert!(refill.pooled, "the replacement is a PREPARE, not a CONNECT");

    // The other parked connection was not touched.
    let mut probe = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), other.read(&mut probe))
            .await
            .is_err(),
        "the other pooled connection got bytes or was closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pooled_connection_is_never_handed_to_a_client() {
    let dir = Dir::new();
    let conf = pooled_gateway_toml(&dir, TIMERS, "pool = 2\n");
    let gw = RunningGateway::start(&conf);
    let public = gw.service_addr("pooled");
    let mut agent = TestAgent::register(gw.listen, &gw.fingerprint, "pooled", PW).await;
    let reqs = prepares(&mut agent, 2).await;
    let parked = park(gw.listen, &reqs).await;
    // Both parked connections die (as if a proxy on the way dropped them).
    drop(parked);
    gw.proc
        .wait_for_nth("both losses noticed", 2, STARTUP, |l| {
            message_contains(l, "pooled data connection lost")
        });

    // A client now must not be bound to either: it is served by a fresh CONNECT.
    let mut client = TcpStream::connect(public).await.unwrap();
    let req = loop {
        let r = agent.next_request().await;
        if !r.pooled {
            break r;
        }
        // Replacement PREPAREs may arrive first; leave them unanswered.
    };
    assert_eq!(req.client, Some(client.local_addr().unwrap()));
    let mut data = redeem(gw.listen, &req).await.expect("CONNECT redeemed");
    client.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    data.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    // The gateway backs off before refilling a pool whose connections keep dying.
    let warn = gw.proc.wait_for("backoff logged", STARTUP, |l| {
        message_contains(l, "refilling the pool in")
    });
    assert!(warn.contains("closed by the agent"), "{warn}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_retired_and_replaced() {
    let dir = Dir::new();
    let conf = pooled_gateway_toml(&dir, TIMERS, "pool = 1\npool_max_idle = \"1s\"\n");
    let gw = RunningGateway::start(&conf);
    let mut agent = TestAgent::register(gw.listen, &gw.fingerprint, "pooled", PW).await;
    let reqs = prepares(&mut agent, 1).await;
    let mut parked = park(gw.listen, &reqs).await;
    let parked_at = Instant::now();
    // The gateway closes it once it has been idle for pool_max_idle, without an answer...
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), parked[0].read(&mut buf))
        .await
        .expect("idle pooled connection not retired")
        .unwrap_or(0);
    assert_eq!(n, 0, "a retired pooled connection is closed without a word");
    assert!(
        parked_at.elapsed() >= Duration::from_millis(900),
        "retired after {:?}, before pool_max_idle",
        parked_at.elapsed()
    );
    // ...and asks for a fresh one at once.
    let again = prepares(&mut agent, 1).await;
    assert_ne!(again[0].request_id, reqs[0].request_id);
    assert_eq!(
        gw.proc
            .count(|l| message_contains(l, "pooled data connection lost")),
        0,
        "retirement is not a failure"
    );
}

/// Distinct sockets the process holds (a duplicated descriptor counts once), and how many
/// pipe descriptors it holds.
fn open_sockets_and_pipes(pid: u32) -> (usize, usize) {
    let mut sockets = std::collections::BTreeSet::new();
    let mut pipes = 0;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let t = target.to_string_lossy().into_owned();
            if t.starts_with("socket:") {
                sockets.insert(t);
            } else if t.starts_with("pipe:") {
                pipes += 1;
            }
        }
    }
    (sockets.len(), pipes)
}

/// Polls until the process holds exactly `want` sockets; returns its pipe descriptors then.
fn wait_sockets(pid: u32, what: &str, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (n, pipes) = open_sockets_and_pipes(pid);
        if n == want {
            return pipes;
        }
        if Instant::now() >= deadline {
            let ss = std::process::Command::new("ss")
                .args(["-tanp"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let mine: Vec<&str> = ss
                .lines()
                .filter(|l| l.contains(&format!("pid={pid},")))
                .collect();
            panic!(
                "{what}: gateway holds {n} sockets, expected {want}:\n{}",
                mine.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pool_is_filled_used_and_released_without_leaking() {
    let dir = Dir::new();
    let conf = pooled_gateway_toml(&dir, FAST_TIMERS, "pool = 3\n");
    let gw = RunningGateway::start(&conf);
    let public = gw.service_addr("pooled");
    let pid = gw.proc.pid();
    let (baseline, _) = open_sockets_and_pipes(pid);

    let echo = echo_server();
    let agent_conf = agent_toml(
        &dir,
        "agent.toml",
        gw.listen,
        &gw.fingerprint,
        &[("pooled", PW, echo)],
    );
    let mut agent = Proc::start("agent", &["agent", "-c", agent_conf.to_str().unwrap()]);
    gw.wait_registered("pooled", 1);
    // One control connection and three parked data connections.
    wait_sockets(pid, "pool filled", baseline + 4);

    // Clients come and go, through the pool and (when it runs dry) through CONNECT.
    for i in 0..200u64 {
        let data = random_bytes(1 + (i as usize * 97) % 5000, i);
        assert_eq!(
            echo_exact(public, data.clone(), Duration::from_secs(10)),
            data,
            "client {i}"
        );
    }
    let threads: Vec<_> = (0..20u64)
        .map(|i| {
            std::thread::spawn(move || {
                let data = random_bytes(20_000, 1000 + i);
                assert_eq!(
                    echo_exact(public, data.clone(), Duration::from_secs(20)),
                    data
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Afterwards the pool is full again and no client socket is left open; empty pipes are
    // kept for reuse, but only a bounded stock of them.
    let pipes = wait_sockets(pid, "pool refilled", baseline + 4);
    assert!(pipes <= 2 * 64, "{pipes} pipe descriptors kept");

    // The agent dies: its control connection and every pooled connection are released.
    agent.kill9();
    wait_sockets(pid, "back to baseline", baseline);
}
