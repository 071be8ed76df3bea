//! One-time data tokens against the real gateway binary, driven by a hand-rolled agent built
//! from the core crate so the test can replay and delay tokens at will.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use dialback_core::agent::{AgentControl, AgentEvent, ConnectRequest};
use dialback_core::crypto::PasswordKey;
use dialback_core::data::{encode_data_hello, AnswerDecoder, DataAnswerError};
use dialback_core::{ErrorCode, Timing};
use dialback_tokio::settings::GatewayTrust;
use dialback_tokio::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PW: &str = "token-test-password";
/// The hand-rolled agent does not answer heartbeats while a test waits, so the session must
/// outlive the token: a long dead_after, a short token_ttl.
const TIMERS: &str =
    "heartbeat = \"10s\"\ndead_after = \"60s\"\ntoken_ttl = \"2s\"\nhandshake_timeout = \"3s\"\n";

/// A minimal agent: registers one service and hands out the CONNECT requests it receives.
struct TestAgent {
    ctrl: AgentControl,
    stream: tokio_rustls::client::TlsStream<TcpStream>,
}

impl TestAgent {
    async fn register(gateway: SocketAddr, fingerprint: &str, service: &str) -> TestAgent {
        let fp = tls::parse_fingerprint(fingerprint).unwrap();
        let connector = tokio_rustls::TlsConnector::from(
            tls::client_config(&GatewayTrust::Fingerprint(fp)).unwrap(),
        );
        let tcp = TcpStream::connect(gateway).await.unwrap();
        let stream = connector
            .connect(tls::server_name("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let exporter = tls::export_keying_material(stream.get_ref().1).unwrap();
        let key = PasswordKey::derive(service, PW);
        let ctrl = AgentControl::new(
            Instant::now(),
            service,
            &key,
            &exporter,
            [9; 32],
            &Timing::default(),
            "test-agent",
        );
        let mut a = TestAgent { ctrl, stream };
        match a.next_event().await {
            AgentEvent::Registered { .. } => a,
            other => panic!("expected registration, got {other:?}"),
        }
    }

    async fn next_event(&mut self) -> AgentEvent {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        loop {
            while let Some(b) = self.ctrl.poll_transmit() {
                self.stream.write_all(&b).await.unwrap();
            }
            if let Some(e) = self.ctrl.poll_event() {
                return e;
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .expect("no event from the gateway within 20s")
                .unwrap();
            assert!(n > 0, "gateway closed the control connection");
            self.ctrl.handle_input(Instant::now(), &buf[..n]);
        }
    }

    async fn next_connect(&mut self) -> ConnectRequest {
        match self.next_event().await {
            AgentEvent::Connect(r) => r,
            other => panic!("expected CONNECT, got {other:?}"),
        }
    }
}

/// Dials a data connection and presents `hello`; returns the gateway's verdict.
async fn redeem(gateway: SocketAddr, req: &ConnectRequest) -> Result<TcpStream, DataAnswerError> {
    let mut s = TcpStream::connect(gateway).await.unwrap();
    s.write_all(&encode_data_hello(&req.hello)).await.unwrap();
    let mut dec = AnswerDecoder::new();
    let mut buf = [0u8; 512];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(
            n > 0,
            "gateway closed the data connection without an answer"
        );
        let mut input = &buf[..n];
        if dec.handle_input(&mut input)? {
            assert!(input.is_empty());
            return Ok(s);
        }
    }
}

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
    let gw = RunningGateway::start(&conf);
    let public = gw.service_addr("tok");
    (gw, public)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_token_is_refused() {
    let dir = Dir::new();
    let (gw, public) = start_gateway(&dir);
    let mut agent = TestAgent::register(gw.listen, &gw.fingerprint, "tok").await;

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
    let mut agent = TestAgent::register(gw.listen, &gw.fingerprint, "tok").await;

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
    let mut agent = TestAgent::register(gw.listen, &gw.fingerprint, "tok").await;

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
