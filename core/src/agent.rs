//! The agent's side of one control connection (`spec/protocol.md`, "Agent states").
//!
//! Create an [`AgentControl`] once the TLS handshake to the gateway is done, write out what
//! [`AgentControl::poll_transmit`] returns, feed what the gateway sends to
//! [`AgentControl::handle_input`], drain [`AgentControl::poll_event`], and call
//! [`AgentControl::handle_timeout`] at [`AgentControl::poll_timeout`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::crypto::{ct_eq, PasswordKey, SessionKeys};
use crate::error::ErrorCode;
use crate::proxy_protocol::Version;
use crate::timing::Timing;
use crate::wire::{
    encode_preamble, ConnKind, ConnectFailed, DataHello, ErrorFrame, FrameDecoder, Hello, Message,
    Welcome, WireError,
};

/// Why a control session ended, from the agent's point of view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("gateway refused: {code}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("the gateway could not prove it knows the service password (wrong password configured on the gateway, or not the real gateway)")]
    GatewayProofInvalid,
    #[error("gateway sent a malformed message: {0}")]
    Wire(#[from] WireError),
    #[error("gateway sent an unexpected {0}")]
    Unexpected(&'static str),
    #[error("gateway announced unusable timers (heartbeat {heartbeat_ms} ms, dead_after {dead_after_ms} ms)")]
    BadTimers {
        heartbeat_ms: u32,
        dead_after_ms: u32,
    },
    #[error("no WELCOME from the gateway within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("gateway silent for {0:?}: connection presumed dead")]
    PeerDead(Duration),
}

/// A request to open a data connection: for one public client (CONNECT), or to keep ready in
/// the gateway's pool (PREPARE), in which case the client is named later by a DATA_BIND on the
/// data connection itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub request_id: u64,
    /// Whether this connection waits in the gateway's pool for DATA_BIND instead of being
    /// accepted at once.
    pub pooled: bool,
    pub client: Option<SocketAddr>,
    pub public: Option<SocketAddr>,
    /// The DATA_HELLO to send on the new data connection.
    pub hello: DataHello,
    /// Whether the data connection must be under TLS.
    pub data_tls: bool,
    /// The PROXY header the gateway asks for toward the local service (its service's
    /// `send_proxy`), if any.
    pub send_proxy: Option<Version>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    Registered {
        session_id: u64,
        heartbeat: Duration,
        dead_after: Duration,
        data_tls: bool,
    },
    Connect(ConnectRequest),
    /// The session is over; drop the connection and reconnect after a backoff.
    Closed(AgentError),
}

#[derive(Debug)]
enum State {
    AwaitWelcome {
        deadline: Instant,
    },
    Registered {
        session_id: u64,
        data_tls: bool,
        send_proxy: Option<Version>,
        heartbeat: Duration,
        dead_after: Duration,
    },
    Closed,
}

pub struct AgentControl {
    service: String,
    keys: SessionKeys,
    agent_nonce: [u8; 32],
    agent_proof: [u8; 32],
    decoder: FrameDecoder,
    out: Vec<u8>,
    events: VecDeque<AgentEvent>,
    state: State,
    last_rx: Instant,
    last_tx: Instant,
    handshake_timeout: Duration,
}

impl AgentControl {
    /// Starts a session on a fresh TLS connection: queues the preamble and HELLO.
    /// `nonce` must be fresh random bytes; `exporter` is the connection's TLS exporter value.
    pub fn new(
        now: Instant,
        service: &str,
        password: &PasswordKey,
        exporter: &[u8; 32],
        nonce: [u8; 32],
        timing: &Timing,
        software: &str,
    ) -> Self {
        let keys = SessionKeys::derive(password, exporter);
        let proof = keys.agent_proof(service, &nonce);
        let mut out = encode_preamble(ConnKind::Control).to_vec();
        Message::Hello(Hello {
            service: service.to_owned(),
            agent_nonce: nonce,
            proof,
            software: software.to_owned(),
        })
        .encode(&mut out);
        AgentControl {
            service: service.to_owned(),
            keys,
            agent_nonce: nonce,
            agent_proof: proof,
            decoder: FrameDecoder::new(),
            out,
            events: VecDeque::new(),
            state: State::AwaitWelcome {
                deadline: now + timing.handshake_timeout,
            },
            last_rx: now,
            last_tx: now,
            handshake_timeout: timing.handshake_timeout,
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    pub fn session_id(&self) -> Option<u64> {
        match self.state {
            State::Registered { session_id, .. } => Some(session_id),
            _ => None,
        }
    }

    /// Bytes read from the gateway (decrypted).
    pub fn handle_input(&mut self, now: Instant, mut input: &[u8]) {
        if self.is_closed() {
            return;
        }
        self.last_rx = now;
        while !input.is_empty() && !self.is_closed() {
            match self.decoder.decode(&mut input) {
                Ok(Some(m)) => self.on_message(now, m),
                Ok(None) => return,
                Err(e) => {
                    let code = match e {
                        WireError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
                        _ => ErrorCode::Malformed,
                    };
                    self.fail_with_notice(now, code, AgentError::Wire(e));
                }
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::AwaitWelcome { deadline } => {
                if now >= deadline {
                    self.fail(AgentError::HandshakeTimeout(self.handshake_timeout));
                }
            }
            State::Registered {
                heartbeat,
                dead_after,
                ..
            } => {
                let quiet = now.saturating_duration_since(self.last_rx);
                if quiet >= dead_after {
                    self.fail(AgentError::PeerDead(quiet));
                } else if now.saturating_duration_since(self.last_tx) >= heartbeat {
                    self.send(now, &Message::Heartbeat);
                }
            }
        }
    }

    /// Tell the gateway this request cannot be served, so it fails the client at once instead
    /// of waiting for the token to expire.
    pub fn connect_failed(
        &mut self,
        now: Instant,
        request_id: u64,
        code: ErrorCode,
        message: &str,
    ) {
        if matches!(self.state, State::Registered { .. }) {
            let m = Message::ConnectFailed(ConnectFailed {
                request_id,
                code,
                message: message.to_owned(),
            });
            self.send(now, &m);
        }
    }

    /// Ends the session politely (e.g. on shutdown): queues an ERROR frame for the gateway.
    pub fn close(&mut self, now: Instant, code: ErrorCode, message: &str) {
        if !self.is_closed() {
            self.send(
                now,
                &Message::Error(ErrorFrame {
                    code,
                    message: message.to_owned(),
                }),
            );
            self.state = State::Closed;
        }
    }

    /// Bytes to write to the gateway, if any.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.out))
        }
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed => None,
            State::AwaitWelcome { deadline } => Some(deadline),
            State::Registered {
                heartbeat,
                dead_after,
                ..
            } => Some((self.last_rx + dead_after).min(self.last_tx + heartbeat)),
        }
    }

    fn send(&mut self, now: Instant, m: &Message) {
        m.encode(&mut self.out);
        self.last_tx = now;
    }

    fn fail(&mut self, e: AgentError) {
        if !self.is_closed() {
            self.state = State::Closed;
            self.events.push_back(AgentEvent::Closed(e));
        }
    }

    fn fail_with_notice(&mut self, now: Instant, code: ErrorCode, e: AgentError) {
        if !self.is_closed() {
            self.send(
                now,
                &Message::Error(ErrorFrame {
                    code,
                    message: e.to_string(),
                }),
            );
            self.fail(e);
        }
    }

    fn on_message(&mut self, now: Instant, m: Message) {
        match (&self.state, m) {
            (State::AwaitWelcome { .. }, Message::Welcome(w)) => self.on_welcome(w),
            (
                State::Registered {
                    session_id,
                    data_tls,
                    send_proxy,
                    ..
                },
                Message::Connect(c),
            ) => {
                let hello = DataHello {
                    service: self.service.clone(),
                    session_id: *session_id,
                    request_id: c.request_id,
                    token: c.token,
                };
                let req = ConnectRequest {
                    request_id: c.request_id,
                    pooled: false,
                    client: c.client,
                    public: c.public,
                    hello,
                    data_tls: *data_tls,
                    send_proxy: *send_proxy,
                };
                self.events.push_back(AgentEvent::Connect(req));
            }
            (
                State::Registered {
                    session_id,
                    data_tls,
                    send_proxy,
                    ..
                },
                Message::Prepare(p),
            ) => {
                let hello = DataHello {
                    service: self.service.clone(),
                    session_id: *session_id,
                    request_id: p.request_id,
                    token: p.token,
                };
                let req = ConnectRequest {
                    request_id: p.request_id,
                    pooled: true,
                    client: None,
                    public: None,
                    hello,
                    data_tls: *data_tls,
                    send_proxy: *send_proxy,
                };
                self.events.push_back(AgentEvent::Connect(req));
            }
            (State::Registered { .. }, Message::Heartbeat | Message::Ignorable(_)) => {}
            (_, Message::Error(e)) => self.fail(AgentError::Refused {
                code: e.code,
                message: e.message,
            }),
            (_, m) => self.fail_with_notice(
                now,
                ErrorCode::UnexpectedMessage,
                AgentError::Unexpected(m.name()),
            ),
        }
    }

    fn on_welcome(&mut self, w: Welcome) {
        let expected = self.keys.gateway_proof(
            &self.service,
            &self.agent_nonce,
            &w.gateway_nonce,
            &self.agent_proof,
            w.session_id,
        );
        if !ct_eq(&expected, &w.proof) {
            // Say nothing to an impostor; just leave.
            self.fail(AgentError::GatewayProofInvalid);
            return;
        }
        if w.heartbeat_ms == 0 || w.heartbeat_ms >= w.dead_after_ms {
            self.fail(AgentError::BadTimers {
                heartbeat_ms: w.heartbeat_ms,
                dead_after_ms: w.dead_after_ms,
            });
            return;
        }
        let heartbeat = Duration::from_millis(u64::from(w.heartbeat_ms));
        let dead_after = Duration::from_millis(u64::from(w.dead_after_ms));
        let data_tls = w.flags & Welcome::FLAG_DATA_TLS != 0;
        let send_proxy = if w.flags & Welcome::FLAG_SEND_PROXY_V2 != 0 {
            Some(Version::V2)
        } else if w.flags & Welcome::FLAG_SEND_PROXY_V1 != 0 {
            Some(Version::V1)
        } else {
            None
        };
        self.state = State::Registered {
            session_id: w.session_id,
            data_tls,
            send_proxy,
            heartbeat,
            dead_after,
        };
        self.events.push_back(AgentEvent::Registered {
            session_id: w.session_id,
            heartbeat,
            dead_after,
            data_tls,
        });
    }
}
