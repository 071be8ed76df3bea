//! `connect_chain::ConnectChain` (1 to 3 hops, every kind of `HopAuth`) driven by proxy
//! answers: raw fuzz bytes, canned HTTP heads (200, 100, 407 Basic/NTLM with and without
//! keep-alive, chunked and sized bodies, 403, 5xx), NTLM challenges (a spec vector or fuzz
//! bytes, base64-encoded in a 407), all cut at arbitrary points, plus EOFs.
//!
//! Invariants:
//! - `handle_input` consumes only a prefix of its slice;
//! - `Established` and `Failed` are terminal: at most one of them, never twice, and after it
//!   `handle_input` consumes nothing, `handle_eof` does nothing, and no event or transmit
//!   ever comes out again;
//! - on `Established { early }`, `early` followed by the bytes `handle_input` left in its
//!   slice are exactly the bytes after the final 2xx head on the current connection (the
//!   connection's stream ends with `early ++ rest`, and the bytes before are a response head
//!   ending in an empty line);
//! - at most `MAX_RECONNECTS` `Reconnect` events; an EOF either leads to a `Reconnect` or
//!   ends the chain;
//! - nothing is transmitted while the chain awaits nothing (no transmit after terminal).
#![no_main]

use arbitrary::Arbitrary;
use dialback_core::connect_chain::{ChainEvent, ConnectChain, HopAuth, ProxyHop, MAX_RECONNECTS};
use dialback_core::ntlm::NtlmCredentials;
use libfuzzer_sys::fuzz_target;

const VECTOR_CHALLENGE: &str = "4e544c4d53535000020000000c000c003800000033828ae20123456789abcdef00000000000000002400240044000000060070170000000f53006500720076006500720002000c0044006f006d00610069006e0001000c0053006500720076006500720000000000";
const SQUID_CHALLENGE: &str = "4e544c4d535350000200000009000900aeaaaaaa078208a06167850ed26efb5a0000000000003a00574f524b47524f5550";

#[derive(Arbitrary, Debug, Clone, Copy)]
enum HopKind {
    None,
    Basic,
    Ntlm,
    NtlmNoDomain,
    AutoPlain,
    AutoDomain,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Canned {
    Ok200,
    Ok200Http10,
    Ok200WithLength,
    Continue100,
    Switching101,
    P407Basic,
    P407BasicClose,
    P407Ntlm,
    P407NtlmClose,
    P407Both,
    P407Chunked,
    P407Http10,
    P407None,
    P403,
    P502,
    Garbage,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Framing {
    Length0,
    LengthBody,
    Chunked,
    Close,
}

#[derive(Arbitrary, Debug)]
enum Step {
    Raw(Vec<u8>),
    Canned(Canned, Vec<u8>),
    /// A 407 carrying an NTLM challenge: 0 = spec vector, 1 = squid, else the fuzz bytes.
    Challenge { which: u8, bytes: Vec<u8>, framing: Framing },
    Eof,
}

#[derive(Arbitrary, Debug)]
struct Input {
    hops: [HopKind; 3],
    n_hops: u8,
    split: u8,
    steps: Vec<Step>,
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
}

fn canned(c: Canned, tail: &[u8]) -> Vec<u8> {
    let head: &str = match c {
        Canned::Ok200 => "HTTP/1.1 200 Connection established\r\n\r\n",
        Canned::Ok200Http10 => "HTTP/1.0 200 OK\r\nProxy-Agent: x\r\n\r\n",
        Canned::Ok200WithLength => "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        Canned::Continue100 => "HTTP/1.1 100 Continue\r\n\r\n",
        Canned::Switching101 => "HTTP/1.1 101 Switching\r\n\r\n",
        Canned::P407Basic => "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 4\r\n\r\nnope",
        Canned::P407BasicClose => "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\nConnection: close\r\n\r\n",
        Canned::P407Ntlm => "HTTP/1.1 407 Auth\r\nProxy-Authenticate: NTLM\r\nContent-Length: 0\r\n\r\n",
        Canned::P407NtlmClose => "HTTP/1.1 407 Auth\r\nProxy-Authenticate: NTLM\r\nProxy-Connection: close\r\nContent-Length: 0\r\n\r\n",
        Canned::P407Both => "HTTP/1.1 407 Auth\r\nProxy-Authenticate: NTLM\r\nProxy-Authenticate: Basic realm=\"r\"\r\nContent-Length: 2\r\n\r\nhi",
        Canned::P407Chunked => "HTTP/1.1 407 Auth\r\nProxy-Authenticate: Basic realm=x, NTLM\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Canned::P407Http10 => "HTTP/1.0 407 Auth\r\nProxy-Authenticate: Basic\r\n\r\n",
        Canned::P407None => "HTTP/1.1 407 Auth\r\nContent-Length: 0\r\n\r\n",
        Canned::P403 => "HTTP/1.1 403 Forbidden\r\n\r\n",
        Canned::P502 => "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
        Canned::Garbage => "SSH-2.0-OpenSSH\r\n\r\n",
    };
    let mut v = head.as_bytes().to_vec();
    v.extend_from_slice(tail);
    v
}

fn challenge(which: u8, bytes: &[u8], framing: Framing) -> Vec<u8> {
    let raw = match which {
        0 => unhex(VECTOR_CHALLENGE),
        1 => unhex(SQUID_CHALLENGE),
        2 => {
            // The vector with fuzz bytes patched over it: keeps the signature most of the time.
            let mut v = unhex(VECTOR_CHALLENGE);
            for (i, b) in bytes.iter().enumerate().take(64) {
                let at = usize::from(*b) % v.len();
                v[at] ^= (i as u8).wrapping_add(1);
            }
            v
        }
        _ => bytes.to_vec(),
    };
    let (framing_hdr, body) = match framing {
        Framing::Length0 => ("Content-Length: 0\r\n", ""),
        Framing::LengthBody => ("Content-Length: 3\r\n", "abc"),
        Framing::Chunked => ("Transfer-Encoding: chunked\r\n", "3\r\nabc\r\n0\r\n\r\n"),
        Framing::Close => ("Connection: close\r\n", ""),
    };
    format!(
        "HTTP/1.1 407 Auth\r\nProxy-Authenticate: NTLM {}\r\n{framing_hdr}\r\n{body}",
        b64(&raw)
    )
    .into_bytes()
}

fn hop(i: usize, kind: HopKind) -> ProxyHop {
    let auth = match kind {
        HopKind::None => HopAuth::None,
        HopKind::Basic => HopAuth::Basic { user: "alice".into(), password: "pw".into() },
        HopKind::Ntlm => HopAuth::Ntlm(NtlmCredentials {
            domain: "DOMAIN".into(),
            user: "User".into(),
            password: "Password".into(),
            workstation: "COMPUTER".into(),
        }),
        HopKind::NtlmNoDomain => HopAuth::Ntlm(NtlmCredentials {
            domain: String::new(),
            user: "bob".into(),
            password: "é".into(),
            workstation: String::new(),
        }),
        HopKind::AutoPlain => HopAuth::Auto { user: "carol".into(), password: "pw".into() },
        HopKind::AutoDomain => HopAuth::Auto { user: "CORP\\dave".into(), password: "pw".into() },
    };
    ProxyHop { host: format!("proxy{i}.example"), port: 3128 + i as u16, auth }
}

struct Driver {
    chain: ConnectChain,
    /// Bytes received on the current connection.
    stream: Vec<u8>,
    terminal: bool,
    established: bool,
    reconnects: u32,
}

impl Driver {
    /// Drains events and transmits; returns (saw Reconnect, saw Established{early}).
    fn drain(&mut self) -> (bool, Option<Vec<u8>>) {
        let mut reconnect = false;
        let mut est = None;
        let was_terminal = self.terminal;
        while let Some(ev) = self.chain.poll_event() {
            assert!(!was_terminal, "event {ev:?} after a terminal event");
            assert!(!self.terminal, "event {ev:?} after a terminal event in the same drain");
            match ev {
                ChainEvent::Reconnect => {
                    self.reconnects += 1;
                    assert!(self.reconnects <= MAX_RECONNECTS, "too many reconnects");
                    reconnect = true;
                    self.stream.clear();
                }
                ChainEvent::Established { early } => {
                    self.terminal = true;
                    self.established = true;
                    assert!(self.chain.is_established());
                    est = Some(early);
                }
                ChainEvent::Failed(_) => {
                    self.terminal = true;
                    assert!(!self.chain.is_established());
                }
            }
        }
        while let Some(t) = self.chain.poll_transmit() {
            assert!(!was_terminal, "transmit after a terminal event: {t:02x?}");
            assert!(!t.is_empty());
        }
        (reconnect, est)
    }

    fn input(&mut self, chunk: &[u8]) {
        let was_terminal = self.terminal;
        self.stream.extend_from_slice(chunk);
        let mut c = chunk;
        self.chain.handle_input(&mut c);
        assert_eq!(c, &chunk[chunk.len() - c.len()..], "consumed a non-prefix");
        if was_terminal {
            assert_eq!(c.len(), chunk.len(), "consumed input after Established/Failed");
        }
        let (_, est) = self.drain();
        if let Some(early) = est {
            let mut tail = early.clone();
            tail.extend_from_slice(c);
            assert!(
                self.stream.ends_with(&tail),
                "early ({} bytes) + rest ({} bytes) is not the end of the stream",
                early.len(),
                c.len()
            );
            let head = &self.stream[..self.stream.len() - tail.len()];
            assert!(
                head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"),
                "bytes before early data are not a complete head: {:?}",
                String::from_utf8_lossy(&head[head.len().saturating_sub(64)..])
            );
        }
    }

    fn eof(&mut self) {
        let was_terminal = self.terminal;
        let before = self.reconnects;
        self.chain.handle_eof();
        let (reconnect, est) = self.drain();
        assert!(est.is_none(), "established by an EOF");
        if !was_terminal {
            assert!(
                reconnect || self.terminal,
                "EOF neither reconnected nor ended the chain"
            );
        } else {
            assert_eq!(before, self.reconnects);
        }
    }
}

fuzz_target!(|input: Input| {
    let n = 1 + usize::from(input.n_hops % 3);
    let hops: Vec<ProxyHop> = input.hops[..n].iter().enumerate().map(|(i, k)| hop(i, *k)).collect();
    let chain = ConnectChain::new(hops, "gateway.example", 443, [7; 32], 1_700_000_000_000)
        .with_workstation("WS");
    let mut d = Driver { chain, stream: Vec::new(), terminal: false, established: false, reconnects: 0 };
    let _ = d.drain();
    let split = usize::from(input.split).max(1);
    for step in &input.steps {
        let bytes = match step {
            Step::Raw(b) => b.clone(),
            Step::Canned(c, tail) => canned(*c, tail),
            Step::Challenge { which, bytes, framing } => challenge(*which % 4, bytes, *framing),
            Step::Eof => {
                d.eof();
                continue;
            }
        };
        for chunk in bytes.chunks(split) {
            d.input(chunk);
        }
    }
});
