//! One-time data tokens against the real gateway binary, driven by a hand-rolled agent built
//! from the core crate so the test can replay and delay tokens at will.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::test_agent::{redeem, TestAgent};
use common::*;
use dialback_core::data::DataAnswerError;
use dialback_core::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PW: &str = "token-test-password";
/// The hand-rolled agent does not answer heartbeats while a test waits, so the session must
/// outlive the token: a long dead_after, a short token_ttl.
const TIMERS: &str =
    "heartbeat = \"10s\"\ndead_after = \"60s\"\ntoken_ttl = \"2s\"\nhandshake_timeout = \"3s\"\n";

fn start_gateway(dir: &Dir) -> (RunningGateway, SocketAddr) {
    let conf = gateway_toml(
        dir,
        &GatewayConf {
            listen: "127.0.0.1:0",
            timers: TIMERS,
            services: &[("tok", PW)],
            extra: "",
        },
    );
    // These tests drive the CONNECT path by hand; the pool has its own tests (e2e_pool.rs).
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("pool = 0\n");
    std::fs::write(&conf, text).unwrap();
    let gw = RunningGateway::start(&conf);
    let public = gw.service_addr("tok");
    (gw, public)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_token_is_refused() {
    let dir = Dir::new();
    let (gw, public) = start_gateway(&dir);
    let mut agent = TestAgent::register(gw.listen, &gw.fingerprint, "tok", PW).await;

    let mut client = TcpStream::connect(public).await.unwrap();
    let req = agent.next_connect().await;
    assert_eq!(
        req.client,
        Some(client.local_addr().unwrap()),
        "the client's address travels to the agent"
    );

    let mut data = redeem(gw.listen, &req)
        .await
        .expect("first redeem is accepted");
    // The pair works: bytes flow from the client to the data connection and back.
    client.write_all(b"hello agent").await.unwrap();
    let mut got = [0u8; 11];
    data.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello agent");
    data.write_all(b"hi client").await.unwrap();
    let mut got = [0u8; 9];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hi client");

    match redeem(gw.listen, &req).await {
        Err(DataAnswerError::Refused {
            code: ErrorCode::TokenInvalid,
            ..
        }) => {}
        other => panic!(
            "replayed token must be refused with token_invalid, got {:?}",
            other.map(|_| ())
        ),
    }
    gw.proc.wait_for("refusal logged", STARTUP, |l| {
        message_contains(l, "data connection refused") && l.contains("token_invalid")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refused_and_client_closed() {
    let dir = Dir::new();
    let (gw, public) = start_gateway(&dir);
    let mut agent = TestAgent::register(gw.listen, &gw.fingerprint, "tok", PW).await;

    let mut client = TcpStream::connect(public).await.unwrap();
    let req = agent.next_connect().await;
    // token_ttl is 2s in the test config: the gateway closes the client when it expires.
    let started = Instant::now();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(15), client.read(&mut buf))
        .await
        .expect("client not closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "expired client must be closed");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed before the token expired"
    );
    match redeem(gw.listen, &req).await {
        Err(DataAnswerError::Refused {
            code: ErrorCode::TokenInvalid | ErrorCode::TokenExpired,
            ..
        }) => {}
        other => panic!("expired token must be refused, got {:?}", other.map(|_| ())),
    }
    gw.proc.wait_for("expiry logged", STARTUP, |l| {
        l.contains("did not dial back")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_token_is_refused_and_burns_the_request() {
    let dir = Dir::new();
    let (gw, public) = start_gateway(&dir);
    let mut agent = TestAgent::register(gw.listen, &gw.fingerprint, "tok", PW).await;

    let mut client = TcpStream::connect(public).await.unwrap();
    let req = agent.next_connect().await;
    let mut forged = req.clone();
    forged.hello.token[0] ^= 1;
    match redeem(gw.listen, &forged).await {
        Err(DataAnswerError::Refused {
            code: ErrorCode::TokenInvalid,
            ..
        }) => {}
        other => panic!("forged token must be refused, got {:?}", other.map(|_| ())),
    }
    // The genuine token was deleted by the failed attempt, and the client is closed at once.
    assert!(
        redeem(gw.listen, &req).await.is_err(),
        "token must not survive a failed attempt"
    );
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(1), client.read(&mut buf))
        .await
        .expect("client not closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_agent_port_is_dropped_with_a_reason() {
    let dir = Dir::new();
    let (gw, _public) = start_gateway(&dir);
    let mut s = TcpStream::connect(gw.listen).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("not closed");
    assert!(
        r.is_err() || buf.is_empty(),
        "garbage got an answer: {buf:?}"
    );
    gw.proc
        .wait_for("drop logged", STARTUP, |l| l.contains("bad magic"));
}
