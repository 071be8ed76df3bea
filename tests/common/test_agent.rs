//! A hand-rolled agent built from the core crate, for tests that must see and bend the
//! protocol: it registers one service, hands out the CONNECT and PREPARE requests it receives,
//! and dials data connections on demand (replaying, delaying or forging tokens at will).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dialback_core::agent::{AgentControl, AgentEvent, ConnectRequest};
use dialback_core::crypto::PasswordKey;
use dialback_core::data::{encode_data_hello, AnswerDecoder, DataAnswer, DataAnswerError};
use dialback_core::Timing;
use dialback_tokio::settings::GatewayTrust;
use dialback_tokio::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct TestAgent {
    ctrl: AgentControl,
    stream: tokio_rustls::client::TlsStream<TcpStream>,
}

impl TestAgent {
    pub async fn register(
        gateway: SocketAddr,
        fingerprint: &str,
        service: &str,
        password: &str,
    ) -> TestAgent {
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
        let key = PasswordKey::derive(service, password);
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

    pub async fn next_event(&mut self) -> AgentEvent {
        self.next_event_within(Duration::from_secs(20))
            .await
            .expect("no event from the gateway within 20s")
    }

    /// The next event, or `None` if the gateway says nothing for `wait`.
    pub async fn next_event_within(&mut self, wait: Duration) -> Option<AgentEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 4096];
        loop {
            while let Some(b) = self.ctrl.poll_transmit() {
                self.stream.write_all(&b).await.unwrap();
            }
            if let Some(e) = self.ctrl.poll_event() {
                return Some(e);
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .ok()?
                .unwrap();
            assert!(n > 0, "gateway closed the control connection");
            self.ctrl.handle_input(Instant::now(), &buf[..n]);
        }
    }

    /// The next CONNECT (for a client) or PREPARE (for the pool).
    pub async fn next_request(&mut self) -> ConnectRequest {
        match self.next_event().await {
            AgentEvent::Connect(r) => r,
            other => panic!("expected CONNECT or PREPARE, got {other:?}"),
        }
    }

    /// The next CONNECT for a client.
    pub async fn next_connect(&mut self) -> ConnectRequest {
        let r = self.next_request().await;
        assert!(!r.pooled, "expected CONNECT, got PREPARE");
        r
    }
}

/// Opens a data connection and presents the request's DATA_HELLO; does not wait for an answer.
pub async fn open_data(gateway: SocketAddr, req: &ConnectRequest) -> TcpStream {
    let mut s = TcpStream::connect(gateway).await.unwrap();
    s.write_all(&encode_data_hello(&req.hello)).await.unwrap();
    s
}

/// Reads the gateway's answer on a data connection: DATA_ACCEPT or DATA_BIND (with the
/// payload that followed it in the same read), or ERROR. Waits at most `wait`.
pub async fn read_answer(
    s: &mut TcpStream,
    wait: Duration,
) -> Result<(DataAnswer, Vec<u8>), DataAnswerError> {
    let mut dec = AnswerDecoder::new();
    let mut buf = [0u8; 512];
    loop {
        let n = tokio::time::timeout(wait, s.read(&mut buf))
            .await
            .expect("no answer on the data connection")
            .unwrap();
        assert!(
            n > 0,
            "gateway closed the data connection without an answer"
        );
        let mut input = &buf[..n];
        if let Some(answer) = dec.handle_input(&mut input)? {
            return Ok((answer, input.to_vec()));
        }
    }
}

/// Dials a data connection for a CONNECT and returns it once the gateway accepted it.
pub async fn redeem(
    gateway: SocketAddr,
    req: &ConnectRequest,
) -> Result<TcpStream, DataAnswerError> {
    let mut s = open_data(gateway, req).await;
    let (answer, early) = read_answer(&mut s, Duration::from_secs(10)).await?;
    assert_eq!(answer, DataAnswer::Accept);
    assert!(early.is_empty());
    Ok(s)
}
