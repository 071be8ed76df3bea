//! Shared fixtures for the criterion benchmarks of `dialback-core` (see `benches/`).
//!
//! Every fixture is built once, outside the measured closures, from the public API of the core
//! only, and is checked (`assert!`) so that a benchmark can never silently measure an error
//! path. Times are fixed `Instant`s: the core never reads a clock itself.

pub mod load;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use dialback_core::agent::{AgentControl, AgentEvent};
use dialback_core::connect_chain::{ChainEvent, ConnectChain, HopAuth, ProxyHop};
use dialback_core::crypto::PasswordKey;
use dialback_core::gateway::{
    ClientId, ClientRoute, ConnId, DataOutcome, Gateway, GatewayConfig, GatewayOutput,
    ServiceConfig,
};
use dialback_core::ntlm::NtlmCredentials;
use dialback_core::wire::{Connect, Hello, Message, PREAMBLE_LEN};
use dialback_core::Timing;

pub const SERVICE: &str = "web";
pub const PASSWORD: &str = "correct horse battery staple";
pub const SOFTWARE: &str = "dialback 0.1.0";
pub const EXPORTER: [u8; 32] = [0x5a; 32];
pub const AGENT_NONCE: [u8; 32] = [0x11; 32];
pub const GATEWAY_SEED: [u8; 32] = [0x22; 32];
pub const AGENT_CONN: ConnId = ConnId(1);

/// The NTLM test vectors shipped with the protocol spec.
pub const NTLM_VECTORS: &str = include_str!("../../spec/vectors/ntlm.json");

/// `PasswordKey::derive(SERVICE, PASSWORD)`, computed once (PBKDF2 is a start-up cost).
pub fn password_key() -> PasswordKey {
    static KEY: OnceLock<PasswordKey> = OnceLock::new();
    KEY.get_or_init(|| PasswordKey::derive(SERVICE, PASSWORD))
        .clone()
}

pub fn agent_peer() -> SocketAddr {
    "198.51.100.20:40000".parse().expect("valid address")
}

/// A public client's address as a dual-stack gateway sees it.
pub fn client_v6() -> SocketAddr {
    "[2001:db8:85a3::8a2e:370:7334]:51234"
        .parse()
        .expect("valid address")
}

pub fn public_v4() -> SocketAddr {
    "203.0.113.5:443".parse().expect("valid address")
}

/// The gateway's start instant for every fixture.
pub fn t0() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// One service, default timers, room for `max_pending` waiting clients.
pub fn gateway_config(max_pending: usize) -> GatewayConfig {
    GatewayConfig {
        timing: Timing::default(),
        services: vec![ServiceConfig {
            name: SERVICE.to_string(),
            password_key: password_key(),
            data_tls: false,
            max_pending,
            // The pool is measured separately; these fixtures measure the CONNECT path.
            pool: 0,
            pool_max_idle: std::time::Duration::from_secs(50),
            allow_from: Default::default(),
            clients_allow: Default::default(),
            send_proxy: None,
            direct: false,
        }],
    }
}

pub fn new_agent(now: Instant) -> AgentControl {
    AgentControl::new(
        now,
        SERVICE,
        &password_key(),
        &EXPORTER,
        AGENT_NONCE,
        &Timing::default(),
        SOFTWARE,
    )
}

/// The HELLO frame a fresh [`new_agent`] sends, without the connection preamble (which the
/// runtime reads before [`Gateway::handle_control_open`]).
pub fn hello_frame() -> Vec<u8> {
    let mut agent = new_agent(t0());
    let bytes = agent.poll_transmit().expect("agent queues its HELLO");
    bytes[PREAMBLE_LEN..].to_vec()
}

/// Drains every gateway output; returns the bytes transmitted on control connections.
pub fn drain_gateway(g: &mut Gateway) -> Vec<u8> {
    let mut tx = Vec::new();
    while let Some(out) = g.poll_output() {
        if let GatewayOutput::Transmit { bytes, .. } = out {
            tx.extend_from_slice(&bytes);
        }
    }
    tx
}

/// A gateway whose control connection [`AGENT_CONN`] is registered for [`SERVICE`], and the
/// agent at the other end, registered too.
pub fn registered_pair(max_pending: usize) -> (Gateway, AgentControl) {
    let now = t0();
    let mut g = Gateway::new(gateway_config(max_pending), GATEWAY_SEED);
    g.handle_control_open(now, AGENT_CONN, agent_peer(), EXPORTER);
    g.handle_control_input(now, AGENT_CONN, &hello_frame());
    let welcome = drain_gateway(&mut g);
    assert!(g.is_online(SERVICE), "HELLO was accepted");
    let mut agent = new_agent(now);
    let _ = agent.poll_transmit();
    agent.handle_input(now, &welcome);
    let mut registered = false;
    while let Some(ev) = agent.poll_event() {
        registered |= matches!(ev, AgentEvent::Registered { .. });
    }
    assert!(registered, "agent accepted the WELCOME");
    (g, agent)
}

/// The WELCOME frame the gateway answers [`hello_frame`] with; valid for any [`new_agent`].
pub fn welcome_frame() -> Vec<u8> {
    let now = t0();
    let mut g = Gateway::new(gateway_config(64), GATEWAY_SEED);
    g.handle_control_open(now, AGENT_CONN, agent_peer(), EXPORTER);
    g.handle_control_input(now, AGENT_CONN, &hello_frame());
    drain_gateway(&mut g)
}

/// One full client cycle: the client arrives, the gateway mints a token and sends CONNECT,
/// the agent turns it into a DATA_HELLO, the gateway verifies it and pairs. Returns whether it
/// paired.
pub fn client_cycle(g: &mut Gateway, agent: &mut AgentControl, client: ClientId) -> bool {
    let now = t0();
    if g.handle_client(now, client, SERVICE, Some(client_v6()), Some(public_v4()))
        .is_err()
    {
        return false;
    }
    let connect = drain_gateway(g);
    agent.handle_input(now, &connect);
    let mut paired = false;
    while let Some(ev) = agent.poll_event() {
        if let AgentEvent::Connect(req) = ev {
            paired |= g.handle_data_hello(now, &req.hello, false).is_ok();
        }
    }
    paired
}

/// A registered gateway and agent whose pool of `pool` data connections is full.
pub fn registered_pooled_pair(pool: usize) -> (Gateway, AgentControl) {
    let now = t0();
    let mut cfg = gateway_config(64);
    cfg.services[0].pool = pool;
    let mut g = Gateway::new(cfg, GATEWAY_SEED);
    g.handle_control_open(now, AGENT_CONN, agent_peer(), EXPORTER);
    g.handle_control_input(now, AGENT_CONN, &hello_frame());
    let out = drain_gateway(&mut g);
    let mut agent = new_agent(now);
    let _ = agent.poll_transmit();
    agent.handle_input(now, &out);
    while let Some(ev) = agent.poll_event() {
        if let AgentEvent::Connect(req) = ev {
            let parked = matches!(
                g.handle_data_hello(now, &req.hello, false),
                Ok(DataOutcome::Parked { .. })
            );
            assert!(parked, "a PREPARE's connection parks");
        }
    }
    assert_eq!(g.pooled(SERVICE), pool, "pool full");
    let _ = drain_gateway(&mut g);
    (g, agent)
}

/// One client served from the pool, in steady state: the client is bound to a parked
/// connection (DATA_BIND built); when that leaves the pool half empty, the gateway sends
/// PREPAREs to refill it, the agent turns them into DATA_HELLOs, the gateway verifies the
/// tokens and parks the new connections. Returns `None` if the client was not bound from the
/// pool, else how many connections were parked (0 between refills).
pub fn pooled_cycle(g: &mut Gateway, agent: &mut AgentControl, client: ClientId) -> Option<usize> {
    let now = t0();
    let Ok(ClientRoute::Pooled { bind, .. }) =
        g.handle_client(now, client, SERVICE, Some(client_v6()), Some(public_v4()))
    else {
        return None;
    };
    std::hint::black_box(bind);
    let prepare = drain_gateway(g);
    agent.handle_input(now, &prepare);
    let mut parked = 0;
    while let Some(ev) = agent.poll_event() {
        if let AgentEvent::Connect(req) = ev {
            if let Ok(DataOutcome::Parked { .. }) = g.handle_data_hello(now, &req.hello, false) {
                parked += 1;
            }
        }
    }
    Some(parked)
}

/// A registered gateway (and its agent) with `background` clients already waiting for their
/// data connections, each with a live token in the map.
pub fn gateway_with_pending(background: usize) -> (Gateway, AgentControl) {
    let (mut g, agent) = registered_pair(background + 16);
    let now = t0();
    for i in 0..background {
        let client = ClientId(1_000_000_000 + i as u64);
        g.handle_client(now, client, SERVICE, Some(client_v6()), Some(public_v4()))
            .expect("room for the background client");
    }
    // The agent never sees these CONNECTs: those clients just keep waiting.
    let _ = drain_gateway(&mut g);
    assert_eq!(g.pending_clients(), background);
    (g, agent)
}

pub fn sample_hello() -> Message {
    Message::Hello(Hello {
        service: SERVICE.to_string(),
        agent_nonce: AGENT_NONCE,
        proof: [0xa7; 32],
        software: SOFTWARE.to_string(),
    })
}

pub fn sample_connect_v6() -> Message {
    Message::Connect(Connect {
        request_id: 0x1f2e_3d4c_5b6a_7988,
        token: [0xc3; 32],
        client: Some(client_v6()),
        public: Some(public_v4()),
    })
}

/// `n` back-to-back frames as a control connection carries them: CONNECTs to the agent with
/// a HEARTBEAT every fourth frame and a HELLO first.
pub fn frame_stream(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let m = match i {
            0 => sample_hello(),
            i if i % 4 == 3 => Message::Heartbeat,
            _ => sample_connect_v6(),
        };
        m.encode(&mut out);
    }
    out
}

fn vectors() -> serde_json::Value {
    serde_json::from_str(NTLM_VECTORS).expect("spec/vectors/ntlm.json is JSON")
}

/// An NTLM case of `spec/vectors/ntlm.json`: its raw CHALLENGE_MESSAGE and credentials.
pub struct NtlmCase {
    pub name: String,
    pub challenge: Vec<u8>,
    pub creds: NtlmCredentials,
    pub client_challenge: [u8; 8],
    pub now_filetime: u64,
}

pub fn ntlm_cases() -> Vec<NtlmCase> {
    let v = vectors();
    let cases = v["cases"].as_array().expect("cases");
    cases
        .iter()
        .map(|c| {
            let input = &c["input"];
            let s = |k: &str| input[k].as_str().expect("string field").to_string();
            let cc = hex_decode(&s("client_challenge"));
            NtlmCase {
                name: c["name"].as_str().expect("name").to_string(),
                challenge: hex_decode(&s("challenge_message")),
                creds: NtlmCredentials {
                    domain: s("domain"),
                    user: s("user"),
                    password: s("password"),
                    workstation: s("workstation"),
                },
                client_challenge: cc.try_into().expect("8-byte client challenge"),
                now_filetime: s("now_filetime").parse().expect("decimal FILETIME"),
            }
        })
        .collect()
}

pub fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// What a squid-like proxy answers a CONNECT it accepts.
pub const PROXY_200: &[u8] =
    b"HTTP/1.1 200 Connection established\r\nProxy-Agent: squid/6.10\r\n\r\n";

fn hop(host: &str, port: u16, auth: HopAuth) -> ProxyHop {
    ProxyHop {
        host: host.to_string(),
        port,
        auth,
    }
}

/// Two proxies, each with a Basic login configured (sent pre-emptively).
pub fn basic_hops() -> Vec<ProxyHop> {
    vec![
        hop(
            "proxy1.corp.example",
            3128,
            HopAuth::Basic {
                user: "alice".into(),
                password: "s3cret-one".into(),
            },
        ),
        hop(
            "proxy2.dmz.example",
            8080,
            HopAuth::Basic {
                user: "svc-dialback".into(),
                password: "s3cret-two".into(),
            },
        ),
    ]
}

/// One NTLM proxy with the credentials of the first case of `spec/vectors/ntlm.json`.
pub fn ntlm_hops() -> Vec<ProxyHop> {
    let case = ntlm_cases().into_iter().next().expect("an NTLM case");
    vec![hop("proxy.corp.example", 3128, HopAuth::Ntlm(case.creds))]
}

/// The 407 carrying the CHALLENGE_MESSAGE of the first NTLM case, on a kept-alive connection.
pub fn ntlm_407() -> Vec<u8> {
    let case = ntlm_cases().into_iter().next().expect("an NTLM case");
    format!(
        "HTTP/1.1 407 Proxy Authentication Required\r\nServer: squid/6.10\r\n\
         Proxy-Authenticate: NTLM {}\r\nContent-Type: text/html\r\n\
         Content-Length: 0\r\nProxy-Connection: keep-alive\r\n\r\n",
        STANDARD.encode(&case.challenge)
    )
    .into_bytes()
}

pub const GATEWAY_HOST: &str = "gw.example.net";
pub const GATEWAY_PORT: u16 = 443;
pub const CHAIN_SEED: [u8; 32] = [0x33; 32];
pub const NOW_UNIX_MS: u64 = 1_700_000_000_000;

/// Drives `chain` against `responses` (one per request, in order): drains transmits, feeds
/// the next response, until it is established. Returns the request bytes sent and whether
/// it was established.
pub fn run_chain(mut chain: ConnectChain, responses: &[&[u8]]) -> (usize, bool) {
    let mut sent = 0;
    let mut responses = responses.iter();
    loop {
        if let Some(ev) = chain.poll_event() {
            return (sent, matches!(ev, ChainEvent::Established { .. }));
        }
        let mut wrote = false;
        while let Some(req) = chain.poll_transmit() {
            sent += req.len();
            wrote = true;
        }
        let Some(resp) = responses.next() else {
            return (sent, false);
        };
        if !wrote {
            return (sent, false);
        }
        let mut input: &[u8] = resp;
        chain.handle_input(&mut input);
    }
}

/// A chain through `hops` to the gateway. Benchmarks clone prepared hops into it, as the
/// agent clones them from its configuration for every control connection.
pub fn chain(hops: Vec<ProxyHop>) -> ConnectChain {
    ConnectChain::new(hops, GATEWAY_HOST, GATEWAY_PORT, CHAIN_SEED, NOW_UNIX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_take_the_happy_path() {
        let (mut g, mut agent) = gateway_with_pending(10);
        assert!(client_cycle(&mut g, &mut agent, ClientId(1)));
        assert_eq!(g.pending_clients(), 10);
        assert!(run_chain(chain(basic_hops()), &[PROXY_200, PROXY_200]).1);
        let r = ntlm_407();
        assert!(run_chain(chain(ntlm_hops()), &[&r, PROXY_200]).1);
        assert!(!ntlm_cases().is_empty());
        let mut agent = new_agent(t0());
        agent.handle_input(t0(), &welcome_frame());
        assert!(matches!(
            agent.poll_event(),
            Some(AgentEvent::Registered { .. })
        ));
    }
}
