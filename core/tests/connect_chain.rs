//! The CONNECT cascade against scripted in-memory proxies, with every response delivered in
//! random chunks (down to one byte at a time).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use dialback_core::connect_chain::{
    auth_from_login, ChainError, ChainErrorKind, ChainEvent, ConnectChain, HopAuth, ProxyHop,
};
use dialback_core::drbg::Drbg;
use dialback_core::ntlm::{self, NtlmCredentials};
use proptest::prelude::*;

const SEED: [u8; 32] = [42; 32];
const NOW_MS: u64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------------
// The scripted wire
// ---------------------------------------------------------------------------------------------

/// One CONNECT request as a proxy saw it.
#[derive(Debug, Clone)]
struct Request {
    /// TCP connection number, from 1 (a `Reconnect` opens the next one).
    conn: usize,
    /// Which proxy (1-based) received it.
    hop: usize,
    /// Requests already seen by this proxy on this connection.
    seq_on_conn: usize,
    target: String,
    auth: Option<String>,
    raw: String,
}

/// What a proxy sends back: `bytes`, then a close if `close`. `opens` says the tunnel now
/// reaches the next hop (or the target), so later requests go to the next proxy.
struct Reply {
    bytes: Vec<u8>,
    close: bool,
    opens: bool,
}

fn established() -> Reply {
    reply(b"HTTP/1.1 200 Connection established\r\n\r\n", false, true)
}

fn reply(bytes: &[u8], close: bool, opens: bool) -> Reply {
    Reply {
        bytes: bytes.to_vec(),
        close,
        opens,
    }
}

#[derive(Debug, Default)]
struct Outcome {
    requests: Vec<Request>,
    events: Vec<ChainEvent>,
    /// `early` of `Established`, then what `handle_input` left unconsumed, then what was
    /// never fed: the target stream.
    after: Vec<u8>,
    error: Option<ChainError>,
    established: bool,
}

impl Outcome {
    fn reconnects(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, ChainEvent::Reconnect))
            .count()
    }

    fn kind(&self) -> &ChainErrorKind {
        &self
            .error
            .as_ref()
            .expect("the chain should have failed")
            .kind
    }
}

/// xorshift64*: deterministic chunk sizes without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

fn parse_request(raw: &[u8]) -> (String, Option<String>, String) {
    let text = String::from_utf8(raw.to_vec()).expect("requests are ASCII");
    assert!(
        text.ends_with("\r\n\r\n"),
        "request not terminated: {text:?}"
    );
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap();
    let target = first
        .strip_prefix("CONNECT ")
        .and_then(|r| r.strip_suffix(" HTTP/1.1"))
        .unwrap_or_else(|| panic!("bad request line {first:?}"))
        .to_string();
    let mut host = None;
    let mut keep_alive = false;
    let mut auth = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(": ").expect("header line");
        match name {
            "Host" => host = Some(value.to_string()),
            "Proxy-Connection" => keep_alive = value == "keep-alive",
            "Proxy-Authorization" => auth = Some(value.to_string()),
            other => panic!("unexpected header {other}"),
        }
    }
    assert_eq!(
        host.as_deref(),
        Some(target.as_str()),
        "Host == request target"
    );
    assert!(keep_alive, "Proxy-Connection: keep-alive");
    (target, auth, text)
}

/// Runs `chain` against `proxy` (called with each request, in order), delivering responses in
/// random chunks of 1..=`max_chunk` bytes.
fn run(
    mut chain: ConnectChain,
    mut proxy: impl FnMut(&Request) -> Reply,
    chunk_seed: u64,
    max_chunk: usize,
) -> Outcome {
    let mut rng = Rng(chunk_seed | 1);
    let mut out = Outcome::default();
    let mut conn = 1;
    let mut depth = 0; // proxies passed on this connection
    let mut seq = vec![0usize; 16];
    let mut pending: Vec<u8> = Vec::new();
    let mut closing = false;
    let mut closed = false;
    for _ in 0..100_000 {
        while let Some(event) = chain.poll_event() {
            match &event {
                ChainEvent::Reconnect => {
                    conn += 1;
                    depth = 0;
                    seq = vec![0; 16];
                    pending.clear();
                    closing = false;
                    closed = false;
                }
                ChainEvent::Established { early } => {
                    assert!(!out.established, "established twice");
                    out.established = true;
                    out.after.extend_from_slice(early);
                }
                ChainEvent::Failed(e) => {
                    assert!(out.error.is_none(), "failed twice");
                    out.error = Some(e.clone());
                }
            }
            out.events.push(event);
        }
        if out.established || out.error.is_some() {
            assert_eq!(chain.poll_transmit(), None, "nothing to send after the end");
            out.after.extend_from_slice(&pending);
            return out;
        }
        while let Some(raw) = chain.poll_transmit() {
            assert!(
                !closed && !closing,
                "request written to a closing connection"
            );
            let (target, auth, raw) = parse_request(&raw);
            let request = Request {
                conn,
                hop: depth + 1,
                seq_on_conn: seq[depth],
                target,
                auth,
                raw,
            };
            seq[depth] += 1;
            let answer = proxy(&request);
            out.requests.push(request);
            if answer.opens {
                depth += 1;
            }
            pending.extend_from_slice(&answer.bytes);
            closing |= answer.close;
        }
        if !pending.is_empty() {
            let n = 1 + rng.below(max_chunk);
            let take = n.min(pending.len());
            let chunk: Vec<u8> = pending.drain(..take).collect();
            let mut input = &chunk[..];
            chain.handle_input(&mut input);
            if !input.is_empty() {
                // Only the end of negotiation may leave bytes: they belong to the target.
                let mut rest = input.to_vec();
                rest.extend_from_slice(&pending);
                pending = rest;
                expect_end(&mut chain, &mut out);
            }
            continue;
        }
        if closing && !closed {
            closed = true;
            closing = false;
            chain.handle_eof();
            continue;
        }
        panic!(
            "chain stalled at hop {} after {:#?}",
            chain.current_hop(),
            out.requests
        );
    }
    panic!("no end after 100000 steps");
}

/// Checks that leaving input unconsumed coincides with the end of negotiation.
fn expect_end(chain: &mut ConnectChain, out: &mut Outcome) {
    let mut ended = false;
    while let Some(event) = chain.poll_event() {
        match &event {
            ChainEvent::Established { early } => {
                out.established = true;
                out.after.extend_from_slice(early);
                ended = true;
            }
            ChainEvent::Failed(e) => {
                out.error = Some(e.clone());
                ended = true;
            }
            ChainEvent::Reconnect => panic!("reconnect while input was left unconsumed"),
        }
        out.events.push(event);
    }
    assert!(ended, "input left unconsumed in the middle of negotiation");
}

/// Runs the scenario with many chunkings (1 byte, small, random, whole) and checks that they
/// all agree; returns the one-byte-at-a-time run.
fn run_all(make_chain: impl Fn() -> ConnectChain, proxy: impl Fn(&Request) -> Reply) -> Outcome {
    let reference = run(make_chain(), &proxy, 1, 1);
    for (seed, max_chunk) in [(2, 2), (3, 3), (4, 7), (5, 16), (6, 100), (7, 100_000)] {
        for round in 0..4u64 {
            let other = run(make_chain(), &proxy, seed * 1000 + round, max_chunk);
            assert_eq!(other.error, reference.error, "chunking {max_chunk}");
            assert_eq!(other.events, reference.events, "chunking {max_chunk}");
            if reference.established {
                assert_eq!(other.after, reference.after, "chunking {max_chunk}");
            }
            let raw = |o: &Outcome| o.requests.iter().map(|r| r.raw.clone()).collect::<Vec<_>>();
            assert_eq!(raw(&other), raw(&reference), "chunking {max_chunk}");
        }
    }
    reference
}

fn hop(host: &str, port: u16, auth: HopAuth) -> ProxyHop {
    ProxyHop {
        host: host.to_string(),
        port,
        auth,
    }
}

fn basic(user: &str, password: &str) -> HopAuth {
    HopAuth::Basic {
        user: user.into(),
        password: password.into(),
    }
}

fn chain(hops: Vec<ProxyHop>) -> ConnectChain {
    ConnectChain::new(hops, "gw.example.com", 7000, SEED, NOW_MS)
}

fn basic_header(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

// ---------------------------------------------------------------------------------------------
// NTLM helpers
// ---------------------------------------------------------------------------------------------

const SERVER_CHALLENGE: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// A CHALLENGE_MESSAGE as a Windows proxy sends it (target info, optionally a timestamp).
fn challenge_message(timestamp: Option<u64>) -> Vec<u8> {
    let mut info = Vec::new();
    let mut av = |id: u16, value: &[u8]| {
        info.extend_from_slice(&id.to_le_bytes());
        info.extend_from_slice(&(value.len() as u16).to_le_bytes());
        info.extend_from_slice(value);
    };
    av(2, &utf16("CORP"));
    av(1, &utf16("PROXY1"));
    if let Some(ts) = timestamp {
        av(7, &ts.to_le_bytes());
    }
    av(0, &[]);
    let name = utf16("CORP");
    let flags: u32 = 0x0000_0001
        | 0x0000_0004
        | 0x0000_0200
        | 0x0000_8000
        | 0x0001_0000
        | 0x0008_0000
        | 0x0080_0000
        | 0x2000_0000
        | 0x8000_0000;
    let mut m = Vec::new();
    m.extend_from_slice(b"NTLMSSP\0");
    m.extend_from_slice(&2u32.to_le_bytes());
    let name_off = 48u32;
    m.extend_from_slice(&(name.len() as u16).to_le_bytes());
    m.extend_from_slice(&(name.len() as u16).to_le_bytes());
    m.extend_from_slice(&name_off.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&SERVER_CHALLENGE);
    m.extend_from_slice(&[0; 8]);
    let info_off = name_off + name.len() as u32;
    m.extend_from_slice(&(info.len() as u16).to_le_bytes());
    m.extend_from_slice(&(info.len() as u16).to_le_bytes());
    m.extend_from_slice(&info_off.to_le_bytes());
    m.extend_from_slice(&name);
    m.extend_from_slice(&info);
    m
}

fn ntlm_token(header: Option<&str>) -> Option<Vec<u8>> {
    let token = header?.strip_prefix("NTLM ")?;
    STANDARD.decode(token).ok()
}

fn is_negotiate(header: Option<&str>) -> bool {
    ntlm_token(header).is_some_and(|m| m == ntlm::negotiate_message())
}

fn is_authenticate(header: Option<&str>) -> bool {
    ntlm_token(header).is_some_and(|m| m.starts_with(b"NTLMSSP\0\x03\0\0\0"))
}

/// The 407 carrying a challenge, with the given body framing.
fn challenge_407(body_framing: &str, body: &[u8], challenge: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 407 Proxy Authentication Required\r\n\
         Proxy-Authenticate: NTLM {}\r\n\
         Content-Type: text/html\r\n\
         {body_framing}\
         \r\n",
        STANDARD.encode(challenge)
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn ntlm_creds(domain: &str, user: &str, password: &str) -> NtlmCredentials {
    NtlmCredentials {
        domain: domain.into(),
        user: user.into(),
        password: password.into(),
        workstation: "AGENT".into(),
    }
}

/// A proxy doing NTLM on one connection: negotiate → 407 with challenge → authenticate → 200.
fn ntlm_proxy(
    body_framing: &'static str,
    body: &'static [u8],
) -> impl Fn(&Request) -> Reply + Clone {
    move |req: &Request| {
        let auth = req.auth.as_deref();
        if is_negotiate(auth) {
            assert_eq!(req.seq_on_conn, 0);
            reply(
                &challenge_407(body_framing, body, &challenge_message(None)),
                false,
                false,
            )
        } else if is_authenticate(auth) {
            assert_eq!(
                req.seq_on_conn, 1,
                "type 3 on the connection of the challenge"
            );
            established()
        } else {
            panic!("unexpected auth {auth:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

#[test]
fn no_auth_single_hop() {
    let out = run_all(
        || chain(vec![hop("proxy.corp", 8080, HopAuth::None)]),
        |req| {
            assert_eq!(req.target, "gw.example.com:7000");
            assert_eq!(req.auth, None);
            established()
        },
    );
    assert!(out.established);
    assert_eq!(out.requests.len(), 1);
    assert_eq!(
        out.requests[0].raw,
        "CONNECT gw.example.com:7000 HTTP/1.1\r\nHost: gw.example.com:7000\r\n\
         Proxy-Connection: keep-alive\r\n\r\n"
    );
    assert_eq!(out.events, [ChainEvent::Established { early: vec![] }]);
}

#[test]
fn basic_single_hop_is_preemptive() {
    let out = run_all(
        || chain(vec![hop("proxy.corp", 8080, basic("user", "pass"))]),
        |req| {
            assert_eq!(req.auth.as_deref(), Some("Basic dXNlcjpwYXNz"));
            established()
        },
    );
    assert!(out.established);
    assert_eq!(out.requests.len(), 1);
}

#[test]
fn two_hop_cascade_goes_through_the_first_tunnel() {
    let out = run_all(
        || {
            chain(vec![
                hop("proxy1.corp", 8080, HopAuth::None),
                hop("proxy2.corp", 3128, basic("u2", "p2")),
            ])
        },
        |req| match req.hop {
            1 => {
                assert_eq!(req.target, "proxy2.corp:3128");
                assert_eq!(req.auth, None);
                established()
            }
            2 => {
                assert_eq!(req.target, "gw.example.com:7000");
                assert_eq!(req.auth.as_deref(), Some(basic_header("u2", "p2").as_str()));
                reply(
                    b"HTTP/1.0 200 OK\r\nProxy-Agent: squid\r\n\r\n",
                    false,
                    true,
                )
            }
            _ => unreachable!(),
        },
    );
    assert!(out.established);
    let hops: Vec<_> = out.requests.iter().map(|r| (r.conn, r.hop)).collect();
    assert_eq!(hops, [(1, 1), (1, 2)]);
}

#[test]
fn hop_two_connect_waits_for_hop_one_200() {
    let mut c = chain(vec![
        hop("proxy1.corp", 8080, HopAuth::None),
        hop("proxy2.corp", 3128, HopAuth::None),
    ]);
    assert_eq!(c.current_hop(), 1);
    let first = c.poll_transmit().unwrap();
    assert!(first.starts_with(b"CONNECT proxy2.corp:3128 "));
    assert_eq!(c.poll_transmit(), None);
    let response = b"HTTP/1.1 200 Connection established\r\n\r\n";
    let (a, b) = response.split_at(response.len() - 1);
    let mut input = a;
    c.handle_input(&mut input);
    assert!(input.is_empty());
    assert_eq!(
        c.poll_transmit(),
        None,
        "nothing before the 200 is complete"
    );
    let mut input = b;
    c.handle_input(&mut input);
    assert!(input.is_empty());
    assert_eq!(c.current_hop(), 2);
    let second = c.poll_transmit().unwrap();
    assert!(second.starts_with(b"CONNECT gw.example.com:7000 "));
    assert_eq!(c.poll_event(), None);
}

#[test]
fn bytes_after_the_final_200_are_never_dropped() {
    let target_bytes = b"\x16\x03\x01 gateway hello, and more";
    for hops in 1..=3 {
        let out = run_all(
            || {
                let list = (0..hops)
                    .map(|i| hop(&format!("p{i}"), 3128, HopAuth::None))
                    .collect();
                chain(list)
            },
            |req| {
                if req.hop == hops {
                    let mut r = b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec();
                    r.extend_from_slice(target_bytes);
                    reply(&r, false, true)
                } else {
                    established()
                }
            },
        );
        assert!(out.established);
        assert_eq!(out.after, target_bytes, "{hops} hops");
    }
    // One read holding the whole answer: the rest stays in the caller's slice.
    let mut c = chain(vec![hop("p", 1, HopAuth::None)]);
    let _ = c.poll_transmit();
    let mut input: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nTARGET";
    c.handle_input(&mut input);
    assert_eq!(input, b"TARGET");
    let Some(ChainEvent::Established { early }) = c.poll_event() else {
        panic!("expected Established");
    };
    assert!(early.is_empty());
    // Later calls consume nothing.
    let mut more: &[u8] = b"MORE";
    c.handle_input(&mut more);
    assert_eq!(more, b"MORE");
}

#[test]
fn ntlm_407_with_content_length_body_is_drained_on_the_same_connection() {
    let body: &[u8] = b"<html><body>Access denied: authentication required</body></html>";
    let framing: &'static str =
        Box::leak(format!("Content-Length: {}\r\n", body.len()).into_boxed_str());
    let proxy = ntlm_proxy(framing, body);
    let out = run_all(
        || {
            chain(vec![hop(
                "proxy.corp",
                8080,
                HopAuth::Ntlm(ntlm_creds("CORP", "alice", "pw")),
            )])
        },
        proxy,
    );
    assert!(out.established, "{:?}", out.error);
    assert_eq!(out.reconnects(), 0);
    let conns: Vec<_> = out
        .requests
        .iter()
        .map(|r| (r.conn, r.seq_on_conn))
        .collect();
    assert_eq!(conns, [(1, 0), (1, 1)]);
    assert!(out.requests[1]
        .auth
        .as_deref()
        .unwrap()
        .starts_with("NTLM "));
}

#[test]
fn ntlm_407_with_chunked_body_is_drained_on_the_same_connection() {
    let proxy = ntlm_proxy(
        "Transfer-Encoding: chunked\r\n",
        b"1a;name=x\r\n<html>denied, try again</h\r\n3\r\ntml\r\n0\r\nX-Trailer: 1\r\n\r\n",
    );
    let out = run_all(
        || {
            chain(vec![hop(
                "proxy.corp",
                8080,
                HopAuth::Ntlm(ntlm_creds("CORP", "alice", "pw")),
            )])
        },
        proxy,
    );
    assert!(out.established, "{:?}", out.error);
    assert_eq!(out.requests.len(), 2);
    assert_eq!(out.requests[1].conn, 1);
}

#[test]
fn ntlm_authenticate_is_the_exact_ntlmv2_answer() {
    let creds = ntlm_creds("CORP", "alice", "pw");
    for timestamp in [None, Some(0x01da_0000_0000_0000u64)] {
        let challenge = challenge_message(timestamp);
        let c2 = challenge.clone();
        let out = run_all(
            || chain(vec![hop("proxy.corp", 8080, HopAuth::Ntlm(creds.clone()))]),
            move |req| {
                if req.seq_on_conn == 0 {
                    reply(
                        &challenge_407("Content-Length: 0\r\n", b"", &c2),
                        false,
                        false,
                    )
                } else {
                    established()
                }
            },
        );
        assert!(out.established);
        let sent = ntlm_token(out.requests[1].auth.as_deref()).unwrap();
        let parsed = ntlm::parse_challenge(&challenge).unwrap();
        let client_challenge = Drbg::new(SEED).array::<8>();
        let expected = ntlm::authenticate_message(
            &creds,
            &parsed,
            &challenge,
            &ntlm::negotiate_message(),
            client_challenge,
            ntlm::unix_ms_to_filetime(NOW_MS),
        );
        assert_eq!(sent, expected, "timestamp {timestamp:?}");
    }
}

#[test]
fn seed_determinism() {
    let transcript = |seed: [u8; 32]| {
        let c = ConnectChain::new(
            vec![
                hop("p1", 1, HopAuth::Ntlm(ntlm_creds("D", "u", "p"))),
                hop("p2", 2, HopAuth::Ntlm(ntlm_creds("D", "v", "q"))),
            ],
            "gw",
            7000,
            seed,
            NOW_MS,
        );
        let out = run(
            c,
            |req| {
                if is_negotiate(req.auth.as_deref()) {
                    reply(
                        &challenge_407("Content-Length: 0\r\n", b"", &challenge_message(None)),
                        false,
                        false,
                    )
                } else {
                    established()
                }
            },
            9,
            5,
        );
        assert!(out.established);
        out.requests.into_iter().map(|r| r.raw).collect::<Vec<_>>()
    };
    let a = transcript([1; 32]);
    assert_eq!(a.len(), 4);
    assert_eq!(a, transcript([1; 32]));
    let b = transcript([2; 32]);
    assert_ne!(a[1], b[1], "the client challenge comes from the seed");
    assert_eq!(a[0], b[0], "the negotiate message does not");
    // Two hops draw two different client challenges.
    let tail = |s: &str| {
        ntlm_token(
            s.lines()
                .find_map(|l| l.strip_prefix("Proxy-Authorization: ")),
        )
    };
    assert_ne!(tail(&a[1]).unwrap()[64..], tail(&a[3]).unwrap()[64..]);
}

#[test]
fn connection_close_407_reconnects_and_replays_earlier_hops() {
    // Hop 1 needs Basic; hop 2 is Auto, probes without credentials, gets a closing 407 offering
    // Basic, then on a new connection hop 1 is replayed before hop 2 gets its credentials.
    let out = run_all(
        || {
            chain(vec![
                hop("proxy1.corp", 8080, basic("u1", "p1")),
                hop(
                    "proxy2.corp",
                    3128,
                    HopAuth::Auto {
                        user: "u2".into(),
                        password: "p2".into(),
                    },
                ),
            ])
        },
        |req| match (req.hop, req.auth.as_deref()) {
            (1, Some(a)) if a == basic_header("u1", "p1") => established(),
            (2, None) => reply(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                  Proxy-Authenticate: Basic realm=\"corp\"\r\n\
                  Connection: close\r\n\
                  Content-Length: 5\r\n\r\nnope!",
                true,
                false,
            ),
            (2, Some(a)) if a == basic_header("u2", "p2") => established(),
            other => panic!("unexpected {other:?}"),
        },
    );
    assert!(out.established, "{:?}", out.error);
    assert_eq!(out.reconnects(), 1);
    let seen: Vec<_> = out
        .requests
        .iter()
        .map(|r| (r.conn, r.hop, r.auth.is_some()))
        .collect();
    assert_eq!(
        seen,
        [(1, 1, true), (1, 2, false), (2, 1, true), (2, 2, true)]
    );
    assert_eq!(
        out.requests[0].raw, out.requests[2].raw,
        "hop 1 replayed as before"
    );
}

#[test]
fn auto_hop_learns_ntlm_and_keeps_it_across_a_reconnect() {
    // The classic corporate proxy: a bare "NTLM" offer on a closing connection, then the
    // handshake on a fresh keep-alive connection.
    let out = run_all(
        || {
            chain(vec![hop(
                "proxy.corp",
                8080,
                HopAuth::Auto {
                    user: "CORP\\alice".into(),
                    password: "pw".into(),
                },
            )])
        },
        |req| {
            let auth = req.auth.as_deref();
            match auth {
                None => reply(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                      Proxy-Authenticate: Negotiate\r\nProxy-Authenticate: NTLM\r\n\
                      Proxy-Authenticate: Basic realm=\"corp\"\r\n\
                      Proxy-Connection: close\r\n\r\n<html>",
                    true,
                    false,
                ),
                _ if is_negotiate(auth) => reply(
                    &challenge_407("Content-Length: 3\r\n", b"abc", &challenge_message(None)),
                    false,
                    false,
                ),
                _ if is_authenticate(auth) => established(),
                _ => panic!("unexpected {auth:?}"),
            }
        },
    );
    assert!(out.established, "{:?}", out.error);
    assert_eq!(out.reconnects(), 1);
    let seen: Vec<_> = out
        .requests
        .iter()
        .map(|r| (r.conn, r.seq_on_conn))
        .collect();
    assert_eq!(seen, [(1, 0), (2, 0), (2, 1)]);
}

#[test]
fn auto_hop_on_a_kept_alive_connection_continues_in_place() {
    let out = run_all(
        || {
            chain(vec![hop(
                "proxy.corp",
                8080,
                HopAuth::Auto {
                    user: "bob".into(),
                    password: "pw".into(),
                },
            )])
        },
        |req| match req.auth.as_deref() {
            None => reply(
                b"HTTP/1.1 407 Auth\r\nProxy-Authenticate: NTLM, Basic realm=\"x, y\"\r\n\
                  Content-Length: 4\r\n\r\nbody",
                false,
                false,
            ),
            Some(a) => {
                // No '\' in the login: Basic is preferred over NTLM.
                assert_eq!(a, basic_header("bob", "pw"));
                assert_eq!(req.seq_on_conn, 1);
                established()
            }
        },
    );
    assert!(out.established);
    assert_eq!(out.reconnects(), 0);
}

#[test]
fn close_instead_of_an_answer_to_a_follow_up_request_reconnects_once() {
    let auto = || {
        chain(vec![hop(
            "proxy.corp",
            8080,
            HopAuth::Auto {
                user: "bob".into(),
                password: "pw".into(),
            },
        )])
    };
    let challenge = |req: &Request| match (req.conn, req.seq_on_conn) {
        (1, 0) => reply(
            b"HTTP/1.1 407 Auth\r\nProxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n",
            false,
            false,
        ),
        (1, 1) => reply(b"", true, false),
        _ => {
            assert_eq!(
                req.auth.as_deref(),
                Some(basic_header("bob", "pw").as_str())
            );
            established()
        }
    };
    let out = run_all(auto, challenge);
    assert!(out.established, "{:?}", out.error);
    assert_eq!(out.reconnects(), 1);
    assert_eq!(out.requests.len(), 3);
    // A first request met by a close is not retried.
    let out = run_all(auto, |_| reply(b"", true, false));
    assert_eq!(out.kind(), &ChainErrorKind::Closed);
    assert_eq!(out.reconnects(), 0);
}

#[test]
fn bare_ntlm_answer_to_negotiate_on_closing_connection_retries_then_gives_up() {
    let out = run_all(
        || {
            chain(vec![hop(
                "proxy.corp",
                8080,
                HopAuth::Ntlm(ntlm_creds("", "u", "p")),
            )])
        },
        |_| {
            reply(
                b"HTTP/1.1 407 Auth\r\nProxy-Authenticate: NTLM\r\nConnection: close\r\n\r\n",
                true,
                false,
            )
        },
    );
    assert_eq!(out.reconnects(), 3);
    assert_eq!(out.kind(), &ChainErrorKind::TooManyReconnects);
    assert_eq!(out.requests.len(), 4);
    assert!(out
        .requests
        .iter()
        .all(|r| r.hop == 1 && r.seq_on_conn == 0));
}

#[test]
fn ntlm_challenge_on_a_closing_connection_is_explained() {
    let out = run_all(
        || {
            chain(vec![hop(
                "proxy.corp",
                8080,
                HopAuth::Ntlm(ntlm_creds("D", "u", "p")),
            )])
        },
        |_| {
            reply(
                &challenge_407("Connection: close\r\n", b"", &challenge_message(None)),
                true,
                false,
            )
        },
    );
    assert_eq!(out.kind(), &ChainErrorKind::NtlmNeedsKeepAlive);
    assert!(out.error.unwrap().to_string().contains("NTLM"));
}

#[test]
fn wrong_basic_credentials_at_hop_two() {
    let out = run_all(
        || {
            chain(vec![
                hop("proxy1.corp", 8080, HopAuth::None),
                hop("proxy2.corp", 3128, basic("myuser2", "s3cret-pw")),
            ])
        },
        |req| match req.hop {
            1 => established(),
            _ => reply(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                  Proxy-Authenticate: Basic realm=\"Squid\"\r\nContent-Length: 0\r\n\r\n",
                false,
                false,
            ),
        },
    );
    let error = out.error.clone().unwrap();
    assert_eq!(error.hop, 2);
    assert_eq!(error.proxy, "proxy2.corp:3128");
    assert_eq!(
        error.kind,
        ChainErrorKind::WrongCredentials {
            scheme: "Basic",
            user: "myuser2".into()
        }
    );
    let text = error.to_string();
    assert!(text.contains("hop 2"), "{text}");
    assert!(
        text.contains("proxy2.corp:3128") && text.contains("myuser2"),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");
    assert!(!format!("{:?}", out.events).contains("s3cret"));
}

#[test]
fn wrong_ntlm_credentials_name_the_login() {
    let out = run_all(
        || {
            chain(vec![hop(
                "p",
                8080,
                HopAuth::Ntlm(ntlm_creds("CORP", "alice", "pw")),
            )])
        },
        |req| {
            if is_negotiate(req.auth.as_deref()) {
                reply(
                    &challenge_407("Content-Length: 0\r\n", b"", &challenge_message(None)),
                    false,
                    false,
                )
            } else {
                reply(
                    b"HTTP/1.1 407 Denied\r\nProxy-Authenticate: NTLM\r\nContent-Length: 0\r\n\r\n",
                    false,
                    false,
                )
            }
        },
    );
    assert_eq!(
        out.kind(),
        &ChainErrorKind::WrongCredentials {
            scheme: "NTLM",
            user: "CORP\\alice".into()
        }
    );
}

#[test]
fn auth_required_and_unsupported_list_the_offers() {
    let offer = |_: &Request| {
        reply(
            b"HTTP/1.1 407 Auth\r\nProxy-Authenticate: Negotiate\r\n\
              Proxy-Authenticate: Digest realm=\"a\", nonce=\"b\"\r\nContent-Length: 0\r\n\r\n",
            false,
            false,
        )
    };
    let none = run_all(|| chain(vec![hop("p", 1, HopAuth::None)]), offer);
    assert_eq!(
        none.kind(),
        &ChainErrorKind::AuthRequired {
            offered: vec!["Negotiate".into(), "Digest".into()]
        }
    );
    let auto = run_all(
        || {
            chain(vec![hop(
                "p",
                1,
                HopAuth::Auto {
                    user: "u".into(),
                    password: "p".into(),
                },
            )])
        },
        offer,
    );
    assert!(
        matches!(auto.kind(), ChainErrorKind::UnsupportedAuth { offered } if offered.len() == 2)
    );
    assert!(auto
        .error
        .unwrap()
        .to_string()
        .contains("Negotiate, Digest"));
    // Basic configured, proxy wants only NTLM: the login needs a '\'.
    let ntlm_only = run_all(
        || chain(vec![hop("p", 1, basic("u", "p"))]),
        |_| {
            reply(
                b"HTTP/1.1 407 Auth\r\nProxy-Authenticate: NTLM\r\nContent-Length: 0\r\n\r\n",
                false,
                false,
            )
        },
    );
    assert_eq!(
        ntlm_only.kind(),
        &ChainErrorKind::UnsupportedAuth {
            offered: vec!["NTLM".into()]
        }
    );
}

#[test]
fn forbidden_and_bad_gateway() {
    let forbidden = run_all(
        || {
            chain(vec![
                hop("p1", 1, HopAuth::None),
                hop("p2", 2, HopAuth::None),
            ])
        },
        |req| match req.hop {
            1 => established(),
            _ => reply(
                b"HTTP/1.1 403 Forbidden by policy\r\nContent-Length: 0\r\n\r\n",
                false,
                false,
            ),
        },
    );
    let e = forbidden.error.clone().unwrap();
    assert_eq!((e.hop, e.proxy.as_str()), (2, "p2:2"));
    assert_eq!(
        e.kind,
        ChainErrorKind::Forbidden {
            reason: "Forbidden by policy".into()
        }
    );
    assert!(e.to_string().contains("403"));

    let bad_gateway = run_all(
        || chain(vec![hop("p1", 1, HopAuth::None)]),
        |_| reply(b"HTTP/1.1 502 Bad Gateway\r\n\r\n", true, false),
    );
    assert_eq!(
        bad_gateway.kind(),
        &ChainErrorKind::Status {
            code: 502,
            reason: "Bad Gateway".into()
        }
    );
    assert!(bad_gateway
        .error
        .unwrap()
        .to_string()
        .contains("502 Bad Gateway"));
}

#[test]
fn garbage_response_is_malformed() {
    for garbage in [
        &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
        b"\x16\x03\x01\x00\x05hello",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
    ] {
        let out = run_all(
            || chain(vec![hop("p", 1, HopAuth::None)]),
            |_| reply(garbage, false, false),
        );
        assert!(
            matches!(out.kind(), ChainErrorKind::Malformed(_)),
            "{:?}",
            out.error
        );
    }
}

#[test]
fn oversized_head_is_refused() {
    let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
    while big.len() < 20_000 {
        big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    big.extend_from_slice(b"\r\n");
    let mut one_header = b"HTTP/1.1 200 OK\r\nX-Long: ".to_vec();
    one_header.resize(17_000, b'a');
    for response in [big, one_header] {
        let out = run(
            chain(vec![hop("p", 1, HopAuth::None)]),
            |_| reply(&response, false, false),
            3,
            4096,
        );
        let ChainErrorKind::Malformed(message) = out.kind() else {
            panic!("{:?}", out.error);
        };
        assert!(
            message.contains("16 KiB") || message.contains("header lines"),
            "{message}"
        );
    }
}

#[test]
fn oversized_407_body_is_refused() {
    let out = run_all(
        || chain(vec![hop("p", 1, HopAuth::Ntlm(ntlm_creds("D", "u", "p")))]),
        |_| {
            reply(
                &challenge_407("Content-Length: 2000000\r\n", b"", &challenge_message(None)),
                false,
                false,
            )
        },
    );
    assert!(matches!(out.kind(), ChainErrorKind::Malformed(m) if m.contains("1 MiB")));
}

#[test]
fn eof_before_an_answer_is_closed() {
    let out = run_all(
        || {
            chain(vec![
                hop("p1", 1, HopAuth::None),
                hop("p2", 2, HopAuth::None),
            ])
        },
        |req| match req.hop {
            1 => established(),
            _ => reply(b"HTTP/1.1 200 Conn", true, false),
        },
    );
    let e = out.error.unwrap();
    assert_eq!((e.hop, e.kind), (2, ChainErrorKind::Closed));
}

#[test]
fn seeds_login_rule_drives_the_scheme() {
    let hops = [
        ("\\myuser1", ChainSchemeSeen::Ntlm),
        ("mydomain\\myuser1", ChainSchemeSeen::Ntlm),
        ("myuser2", ChainSchemeSeen::Basic),
    ];
    for (login, want) in hops {
        let auth = auth_from_login(Some(login), Some("mypass"));
        let mut c = chain(vec![hop("p", 1, auth)]);
        let first = String::from_utf8(c.poll_transmit().unwrap()).unwrap();
        let seen = if first.contains("Proxy-Authorization: NTLM ") {
            ChainSchemeSeen::Ntlm
        } else if first.contains("Proxy-Authorization: Basic ") {
            ChainSchemeSeen::Basic
        } else {
            ChainSchemeSeen::None
        };
        assert_eq!(seen, want, "{login}");
    }
    let mut c = chain(vec![hop("p", 1, auth_from_login(None, None))]);
    assert!(!String::from_utf8(c.poll_transmit().unwrap())
        .unwrap()
        .contains("Proxy-Authorization"));
}

#[derive(Debug, PartialEq, Eq)]
enum ChainSchemeSeen {
    None,
    Basic,
    Ntlm,
}

#[test]
fn reconnect_holds_back_the_replay_until_read() {
    let mut c = chain(vec![hop(
        "p",
        1,
        HopAuth::Auto {
            user: "u".into(),
            password: "p".into(),
        },
    )]);
    let _ = c.poll_transmit();
    let mut input: &[u8] =
        b"HTTP/1.1 407 A\r\nProxy-Authenticate: Basic\r\nConnection: close\r\n\r\n";
    c.handle_input(&mut input);
    c.handle_eof();
    assert_eq!(
        c.poll_transmit(),
        None,
        "the replay must not go to the old connection"
    );
    assert_eq!(c.poll_event(), Some(ChainEvent::Reconnect));
    assert!(c.poll_transmit().is_some());
}

// ---------------------------------------------------------------------------------------------
// Arbitrary input
// ---------------------------------------------------------------------------------------------

fn drive_arbitrary(auth: HopAuth, hops: usize, data: &[u8], cuts: &[usize], eof: bool) {
    let list = (0..hops)
        .map(|i| hop(&format!("p{i}"), 1, auth.clone()))
        .collect();
    let mut c = chain(list);
    let mut at: usize = 0;
    for &cut in cuts.iter().chain(std::iter::once(&usize::MAX)) {
        let end = at.saturating_add(cut).min(data.len());
        let mut input = &data[at..end];
        let before = input.len();
        c.handle_input(&mut input);
        assert!(input.len() <= before);
        let left = input.len();
        while c.poll_transmit().is_some() {}
        while let Some(event) = c.poll_event() {
            if let ChainEvent::Failed(e) = &event {
                assert!(e.hop >= 1 && e.hop <= hops);
                let _ = e.to_string();
            }
        }
        if left > 0 {
            // Only an ended chain leaves bytes behind.
            assert!(c.is_established() || c.poll_transmit().is_none());
            break;
        }
        at = end;
        if at >= data.len() {
            break;
        }
    }
    if eof {
        c.handle_eof();
        while c.poll_event().is_some() {}
        while c.poll_transmit().is_some() {}
    }
    let _ = c.current_hop();
}

fn any_auth() -> impl Strategy<Value = HopAuth> {
    prop_oneof![
        Just(HopAuth::None),
        Just(basic("u", "p")),
        Just(HopAuth::Ntlm(ntlm_creds("D", "u", "p"))),
        Just(HopAuth::Auto {
            user: "D\\u".into(),
            password: "p".into()
        }),
    ]
}

/// Plausible response fragments, so the fuzzing reaches deep states.
fn fragment() -> impl Strategy<Value = Vec<u8>> {
    let challenge = STANDARD.encode(challenge_message(None));
    prop_oneof![
        Just(b"HTTP/1.1 200 OK\r\n\r\n".to_vec()),
        Just(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()),
        Just(b"HTTP/1.1 407 A\r\nProxy-Authenticate: NTLM, Basic\r\nContent-Length: 3\r\n\r\n".to_vec()),
        Just(format!("HTTP/1.1 407 A\r\nProxy-Authenticate: NTLM {challenge}\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes()),
        Just(b"HTTP/1.0 407 A\r\nProxy-Authenticate: Basic\r\n\r\n".to_vec()),
        Just(b"HTTP/1.1 407 A\r\nProxy-Authenticate: NTLM\r\nConnection: close\r\n\r\n".to_vec()),
        Just(b"5\r\nhello\r\n0\r\n\r\n".to_vec()),
        Just(b"Content-Length: 99999999999999999999\r\n".to_vec()),
        Just(b"\r\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(
        auth in any_auth(),
        hops in 1usize..4,
        data in proptest::collection::vec(any::<u8>(), 0..600),
        cuts in proptest::collection::vec(0usize..64, 0..40),
        eof in any::<bool>(),
    ) {
        drive_arbitrary(auth, hops, &data, &cuts, eof);
    }

    #[test]
    fn plausible_fragments_never_panic(
        auth in any_auth(),
        hops in 1usize..4,
        parts in proptest::collection::vec(fragment(), 0..12),
        cuts in proptest::collection::vec(0usize..32, 0..60),
        eof in any::<bool>(),
    ) {
        let data: Vec<u8> = parts.concat();
        drive_arbitrary(auth, hops, &data, &cuts, eof);
    }

    #[test]
    fn target_bytes_survive_any_split(
        hops in 1usize..4,
        target in proptest::collection::vec(any::<u8>(), 0..64),
        cut in 0usize..400,
    ) {
        let mut data = Vec::new();
        for _ in 0..hops {
            data.extend_from_slice(b"HTTP/1.1 200 Connection established\r\nVia: 1.1 p\r\n\r\n");
        }
        data.extend_from_slice(&target);
        let list = (0..hops).map(|i| hop(&format!("p{i}"), 1, HopAuth::None)).collect();
        let mut c = chain(list);
        let cut = cut.min(data.len());
        let mut received = Vec::new();
        for part in [&data[..cut], &data[cut..]] {
            let mut input = part;
            c.handle_input(&mut input);
            while let Some(event) = c.poll_event() {
                if let ChainEvent::Established { early } = event {
                    received.extend_from_slice(&early);
                }
            }
            if c.is_established() {
                received.extend_from_slice(input);
            } else {
                prop_assert!(input.is_empty());
            }
        }
        prop_assert!(c.is_established());
        prop_assert_eq!(received, target);
    }
}
