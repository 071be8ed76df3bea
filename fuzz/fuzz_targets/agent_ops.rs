//! `agent::AgentControl` driven by a sequence of operations on a fake clock: raw bytes,
//! well-formed frames (a WELCOME with a valid or an invalid gateway proof, CONNECT, HEARTBEAT,
//! ERROR, extensions, HELLO), time jumps, `handle_timeout`, `connect_failed` and `close`.
//!
//! Invariants:
//! - the first transmit is the preamble + HELLO; everything transmitted later decodes as
//!   whole frames (HEARTBEAT, CONNECT_FAILED, ERROR only);
//! - at most one `Closed` event and at most one `Registered`; `Connect` only while
//!   registered, carrying the session id of the registration and the agent's service;
//! - after `Closed` (or `close()`), once the bytes queued by that same call are drained: no
//!   transmit, no event, `poll_timeout()` is `None`, `is_closed()`;
//! - after `handle_timeout(now)`, `poll_timeout()` is `None` or later than `now`;
//! - `session_id()` is `Some` exactly while registered.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use dialback_core::agent::{AgentControl, AgentEvent};
use dialback_core::crypto::{PasswordKey, SessionKeys};
use dialback_core::error::ErrorCode;
use dialback_core::wire::{
    encode_preamble, Connect, ConnKind, ErrorFrame, FrameDecoder, Hello, Message, Welcome,
};
use dialback_core::Timing;
use libfuzzer_sys::fuzz_target;

const SERVICE: &str = "web";

#[derive(Arbitrary, Debug)]
enum Op {
    Raw(Vec<u8>),
    Welcome { good_proof: bool, session_id: u64, heartbeat_ms: u32, dead_after_ms: u32, flags: u8 },
    Connect { request_id: u64, token: [u8; 32] },
    Heartbeat,
    Error { code: u16, message: String },
    Extension(u8),
    Hello,
    /// Feed the next frame split in two at this point.
    SplitNext(u8),
    Advance(u16),
    AdvanceSecs(u8),
    Timeout,
    ConnectFailed { request_id: u64, code: u16 },
    Close,
}

#[derive(Arbitrary, Debug)]
struct Input {
    exporter: [u8; 32],
    nonce: [u8; 32],
    ops: Vec<Op>,
}

struct State {
    agent: AgentControl,
    closed: bool,
    registered: Option<u64>,
    first_tx: bool,
    expected_hello: Vec<u8>,
}

impl State {
    /// Drains everything; `closing`: this call may have closed the agent, so bytes it queued
    /// before closing are allowed.
    fn drain(&mut self, was_closed: bool) {
        while let Some(t) = self.agent.poll_transmit() {
            assert!(!was_closed, "transmit after Closed: {t:02x?}");
            let mut rest = &t[..];
            if self.first_tx {
                self.first_tx = false;
                assert!(t.starts_with(&self.expected_hello), "first transmit is not preamble+HELLO");
                rest = &rest[self.expected_hello.len()..];
            }
            let mut d = FrameDecoder::new();
            while !rest.is_empty() {
                match d.decode(&mut rest) {
                    Ok(Some(Message::Heartbeat | Message::ConnectFailed(_) | Message::Error(_))) => {}
                    other => panic!("agent transmitted {other:?}"),
                }
            }
        }
        while let Some(ev) = self.agent.poll_event() {
            assert!(!was_closed, "event after Closed: {ev:?}");
            assert!(!self.closed, "event after Closed in the same drain: {ev:?}");
            match ev {
                AgentEvent::Registered { session_id, heartbeat, dead_after, .. } => {
                    assert!(self.registered.is_none(), "registered twice");
                    assert!(!heartbeat.is_zero() && heartbeat < dead_after);
                    self.registered = Some(session_id);
                }
                AgentEvent::Connect(req) => {
                    let sid = self.registered.expect("CONNECT event before registration");
                    assert_eq!(req.hello.session_id, sid);
                    assert_eq!(req.hello.service, SERVICE);
                    assert_eq!(req.hello.request_id, req.request_id);
                }
                AgentEvent::Closed(_) => self.closed = true,
            }
        }
        if self.agent.is_closed() {
            self.closed = true;
        }
        assert_eq!(self.agent.is_closed(), self.closed);
        if self.closed {
            assert_eq!(self.agent.poll_timeout(), None);
            assert_eq!(self.agent.session_id(), None);
        } else {
            assert_eq!(self.agent.session_id(), self.registered);
        }
    }
}

fuzz_target!(|input: Input| {
    let epoch = Instant::now();
    let mut now = epoch;
    let timing = Timing::default();
    let password = PasswordKey::from_bytes([0x42; 32]);
    let keys = SessionKeys::derive(&password, &input.exporter);
    let agent_proof = keys.agent_proof(SERVICE, &input.nonce);
    let mut expected_hello = encode_preamble(ConnKind::Control).to_vec();
    Message::Hello(Hello {
        service: SERVICE.into(),
        agent_nonce: input.nonce,
        proof: agent_proof,
        software: "fuzz".into(),
    })
    .encode(&mut expected_hello);
    let agent = AgentControl::new(now, SERVICE, &password, &input.exporter, input.nonce, &timing, "fuzz");
    let mut s = State { agent, closed: false, registered: None, first_tx: true, expected_hello };
    s.drain(false);
    let mut split: Option<usize> = None;
    for op in input.ops {
        let was_closed = s.closed;
        let frame = match op {
            Op::Raw(b) => Some(b),
            Op::Welcome { good_proof, session_id, heartbeat_ms, dead_after_ms, flags } => {
                let gateway_nonce = [session_id as u8; 32];
                let mut proof =
                    keys.gateway_proof(SERVICE, &input.nonce, &gateway_nonce, &agent_proof, session_id);
                if !good_proof {
                    proof[0] ^= 1;
                }
                Some(
                    Message::Welcome(Welcome {
                        gateway_nonce,
                        proof,
                        session_id,
                        heartbeat_ms: heartbeat_ms % 100_000,
                        dead_after_ms: dead_after_ms % 300_000,
                        flags,
                    })
                    .to_frame(),
                )
            }
            Op::Connect { request_id, token } => Some(
                Message::Connect(Connect { request_id, token, client: None, public: None }).to_frame(),
            ),
            Op::Heartbeat => Some(Message::Heartbeat.to_frame()),
            Op::Error { code, message } => Some(
                Message::Error(ErrorFrame { code: ErrorCode::from_u16(code), message }).to_frame(),
            ),
            Op::Extension(t) => Some(Message::Ignorable(t | 0x80).to_frame()),
            Op::Hello => Some(
                Message::Hello(Hello {
                    service: SERVICE.into(),
                    agent_nonce: [0; 32],
                    proof: [0; 32],
                    software: String::new(),
                })
                .to_frame(),
            ),
            Op::SplitNext(n) => {
                split = Some(usize::from(n));
                None
            }
            Op::Advance(ms) => {
                now += Duration::from_millis(u64::from(ms));
                None
            }
            Op::AdvanceSecs(secs) => {
                now += Duration::from_secs(u64::from(secs));
                None
            }
            Op::Timeout => {
                s.agent.handle_timeout(now);
                s.drain(was_closed);
                if let Some(t) = s.agent.poll_timeout() {
                    assert!(t > now, "poll_timeout {:?} not after now {:?}", t - epoch, now - epoch);
                }
                continue;
            }
            Op::ConnectFailed { request_id, code } => {
                s.agent.connect_failed(now, request_id, ErrorCode::from_u16(code), "refused");
                None
            }
            Op::Close => {
                s.agent.close(now, ErrorCode::ShuttingDown, "bye");
                None
            }
        };
        if let Some(f) = frame {
            match split.take() {
                Some(at) if at < f.len() => {
                    s.agent.handle_input(now, &f[..at]);
                    s.drain(was_closed);
                    let was_closed = s.closed;
                    s.agent.handle_input(now, &f[at..]);
                    s.drain(was_closed);
                }
                _ => {
                    s.agent.handle_input(now, &f);
                    s.drain(was_closed);
                }
            }
        } else {
            s.drain(was_closed);
        }
    }
});
