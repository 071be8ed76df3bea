//! `gateway::Gateway` driven by a sequence of operations on a fake clock: control
//! connections opening and sending valid HELLOs (proof derived with `SessionKeys`, so agents
//! really register), bad HELLOs, raw bytes and other frames; public clients arriving and
//! leaving; data connections presenting the tokens the gateway sent in its CONNECT frames,
//! intact or altered; time jumps, timeouts and closes.
//!
//! Invariants:
//! - a request id is redeemed (`handle_data_hello` -> `Ok`) at most once, only with the exact
//!   token, service and session id of the CONNECT that carried it, before the token's TTL,
//!   while the issuing control connection is still open, and under TLS when the service
//!   requires it;
//! - the `Paired` result names the client that asked, the service it asked for and the
//!   session that issued the token;
//! - a CONNECT is transmitted exactly when `handle_client` returns `Ok`, to the connection
//!   registered for that service;
//! - no `Transmit` for a connection after its `Close`; `Close` at most once per connection;
//! - every `ClientId` is resolved at most once (paired, `ClientFailed`, or gone), and only
//!   clients that were accepted are ever failed or paired;
//! - pool: a PREPARE goes only to a registered connection; its token parks a connection
//!   (`DataOutcome::Parked`) and never pairs a client, a CONNECT's token never parks; a pooled
//!   connection is handed to at most one client (`ClientRoute::Pooled`), only while parked, of
//!   the service the client asked for, with a DATA_BIND naming that client; `ClosePooled` only
//!   for a parked connection that was not handed out; a pooled route sends no CONNECT;
//! - after `handle_timeout(now)` with every output drained, `poll_timeout()` is `None` or
//!   later than `now`; with outputs queued it is not later than `now`;
//! - access rules: agents connect from 192.0.2.1 to .4, and `secure` (allow_from
//!   192.0.2.0/31) only ever registers an agent from 192.0.2.1.
//!
//! With `DIALBACK_FUZZ_TRACE` set, every successful pairing is printed (to check that a corpus
//! really reaches redemption).
#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use dialback_core::crypto::{PasswordKey, SessionKeys};
use dialback_core::error::ErrorCode;
use dialback_core::gateway::{
    ClientId, ClientRoute, ConnId, DataOutcome, Gateway, GatewayConfig, GatewayEvent, GatewayOutput,
    ServiceConfig,
};
use dialback_core::wire::{ConnectFailed, DataHello, ErrorFrame, FrameDecoder, Hello, Message};
use dialback_core::Timing;
use libfuzzer_sys::fuzz_target;

const SERVICES: [&str; 4] = ["web", "secure", "unknown", ""];
/// Agents connect from 192.0.2.1 to .4; `secure` allows 192.0.2.0/31.
const SECURE_AGENTS: [&str; 2] = ["192.0.2.0", "192.0.2.1"];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Mutation {
    None,
    Token,
    Service,
    Session,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Open { exporter: u8 },
    Hello { conn: u8, service: u8, good_proof: bool, nonce: u8, split: u8 },
    Raw { conn: u8, bytes: Vec<u8> },
    Heartbeat { conn: u8 },
    Extension { conn: u8, ty: u8 },
    ConnectFailed { conn: u8, token: u8, random_id: Option<u64>, code: u16 },
    ErrorFrame { conn: u8 },
    Unexpected { conn: u8 },
    ConnClosed { conn: u8 },
    Client { service: u8, with_addr: bool },
    ClientGone { client: u8 },
    DataHello { token: u8, mutation: Mutation, tls: bool },
    DataHelloRandom { request_id: u64, service: u8, session_id: u64, token: [u8; 32], tls: bool },
    Advance(u16),
    AdvanceSecs(u8),
    Timeout,
    PooledGone { pick: u8 },
    /// A configuration reload: each service kept or removed; `web` maybe with another
    /// password and pool.
    Reconfigure { keep_web: bool, keep_secure: bool, web_password: bool, web_pool: u8 },
}

struct ConnInfo {
    id: ConnId,
    exporter: [u8; 32],
    closed_out: bool,
    registered: Option<(String, u64)>,
}

struct ClientInfo {
    id: ClientId,
    accepted: bool,
    resolved: bool,
}

struct TokenInfo {
    request_id: u64,
    token: [u8; 32],
    service: String,
    session_id: u64,
    /// `None` for a PREPARE (pool) token.
    client: Option<usize>,
    conn: usize,
    expires: Instant,
}

fn password(service: &str) -> PasswordKey {
    PasswordKey::from_bytes([service.len() as u8; 32])
}

struct H {
    gw: Gateway,
    conns: Vec<ConnInfo>,
    conn_index: HashMap<ConnId, usize>,
    clients: Vec<ClientInfo>,
    client_index: HashMap<ClientId, usize>,
    tokens: Vec<TokenInfo>,
    redeemed: HashSet<u64>,
    /// (client index, service) of the `handle_client` call being drained, if any.
    asking: Option<(usize, String)>,
    connects_seen: usize,
    ttl: Duration,
    now: Instant,
    decoders: HashMap<ConnId, FrameDecoder>,
    /// Parked pooled connections: id -> (service, control connection index).
    parked: HashMap<u64, (String, usize)>,
    /// Pooled connections handed to a client or closed; never seen again.
    finished_pooled: HashSet<u64>,
}

impl H {
    fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Some(out) = self.gw.poll_output() {
            n += 1;
            match out {
                GatewayOutput::Transmit { conn, bytes } => {
                    let ci = self.conn_index[&conn];
                    assert!(!self.conns[ci].closed_out, "Transmit to {conn:?} after its Close");
                    let d = self.decoders.entry(conn).or_default();
                    let mut rest = &bytes[..];
                    while !rest.is_empty() {
                        let m = d.decode(&mut rest).expect("gateway sent an undecodable frame");
                        let Some(m) = m else { break };
                        match m {
                            Message::Connect(c) => {
                                let (client, service) =
                                    self.asking.clone().expect("CONNECT outside handle_client");
                                let (reg_service, session_id) = self.conns[ci]
                                    .registered
                                    .clone()
                                    .expect("CONNECT to an unregistered connection");
                                assert_eq!(reg_service, service, "CONNECT sent to another service's agent");
                                self.connects_seen += 1;
                                self.tokens.push(TokenInfo {
                                    request_id: c.request_id,
                                    token: c.token,
                                    service,
                                    session_id,
                                    client: Some(client),
                                    conn: ci,
                                    expires: self.now + self.ttl,
                                });
                            }
                            Message::Prepare(p) => {
                                let (service, session_id) = self.conns[ci]
                                    .registered
                                    .clone()
                                    .expect("PREPARE to an unregistered connection");
                                self.tokens.push(TokenInfo {
                                    request_id: p.request_id,
                                    token: p.token,
                                    service,
                                    session_id,
                                    client: None,
                                    conn: ci,
                                    expires: self.now + self.ttl,
                                });
                            }
                            Message::Welcome(_) | Message::Heartbeat | Message::Error(_) => {}
                            other => panic!("gateway sent {other:?} on a control connection"),
                        }
                    }
                }
                GatewayOutput::Close { conn } => {
                    let ci = self.conn_index[&conn];
                    assert!(!self.conns[ci].closed_out, "Close twice for {conn:?}");
                    self.conns[ci].closed_out = true;
                }
                GatewayOutput::ClosePooled { pooled } => {
                    assert!(self.parked.remove(&pooled).is_some(), "ClosePooled for {pooled}, which is not parked");
                    assert!(self.finished_pooled.insert(pooled));
                }
                GatewayOutput::ClientFailed { client, .. } => {
                    let i = self.client_index[&client];
                    let c = &mut self.clients[i];
                    assert!(c.accepted, "ClientFailed for a client that was refused at once");
                    assert!(!c.resolved, "{client:?} resolved twice (ClientFailed)");
                    c.resolved = true;
                }
                GatewayOutput::Event(GatewayEvent::Registered { conn, service, session_id, peer, .. }) => {
                    // `secure` takes agents from 192.0.2.0/31 only (allow_from).
                    if service == "secure" {
                        assert!(SECURE_AGENTS.contains(&peer.ip().to_string().as_str()), "{peer} registered secure");
                    }
                    let ci = self.conn_index[&conn];
                    assert!(!self.conns[ci].closed_out);
                    assert!(self.conns[ci].registered.is_none(), "registered twice");
                    assert_eq!(self.gw.is_online(&service), true);
                    self.conns[ci].registered = Some((service, session_id));
                }
                GatewayOutput::Event(_) => {}
            }
        }
        n
    }

    fn conn(&self, sel: u8) -> Option<usize> {
        if self.conns.is_empty() {
            None
        } else {
            Some(usize::from(sel) % self.conns.len())
        }
    }

    fn input(&mut self, ci: usize, bytes: &[u8]) {
        let id = self.conns[ci].id;
        self.gw.handle_control_input(self.now, id, bytes);
    }
}

fn web_config(password_key: PasswordKey, pool: usize) -> ServiceConfig {
    ServiceConfig {
        name: "web".into(),
        password_key,
        data_tls: false,
        max_pending: 3,
        pool,
        pool_max_idle: Duration::from_secs(50),
        allow_from: Default::default(),
        clients_allow: Default::default(),
        send_proxy: None,
        direct: false,
    }
}

fn secure_config() -> ServiceConfig {
    ServiceConfig {
        name: "secure".into(),
        password_key: password("secure"),
        data_tls: true,
        max_pending: 2,
        pool: 0,
        pool_max_idle: Duration::from_secs(50),
        allow_from: dialback_core::acl::AllowList::parse(&["192.0.2.0/31"]).unwrap(),
        clients_allow: Default::default(),
        send_proxy: None,
        direct: false,
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let epoch = Instant::now();
    let timing = Timing::default();
    let services = vec![web_config(password("web"), 2), secure_config()];
    let gw = Gateway::new(GatewayConfig { timing, services }, [9; 32]);
    let mut h = H {
        gw,
        conns: Vec::new(),
        conn_index: HashMap::new(),
        clients: Vec::new(),
        client_index: HashMap::new(),
        tokens: Vec::new(),
        redeemed: HashSet::new(),
        asking: None,
        connects_seen: 0,
        ttl: timing.token_ttl,
        now: epoch,
        decoders: HashMap::new(),
        parked: HashMap::new(),
        finished_pooled: HashSet::new(),
    };
    let mut next_id = 1u64;
    for op in ops.into_iter().take(200) {
        match op {
            Op::Open { exporter } => {
                let id = ConnId(next_id);
                next_id += 1;
                h.conn_index.insert(id, h.conns.len());
                h.conns.push(ConnInfo { id, exporter: [exporter; 32], closed_out: false, registered: None });
                let peer = SocketAddr::from(([192, 0, 2, 1 + exporter % 4], 5000));
                h.gw.handle_control_open(h.now, id, peer, [exporter; 32]);
            }
            Op::Hello { conn, service, good_proof, nonce, split } => {
                let Some(ci) = h.conn(conn) else { continue };
                let service = SERVICES[usize::from(service) % SERVICES.len()];
                let keys = SessionKeys::derive(&password(service), &h.conns[ci].exporter);
                let agent_nonce = [nonce; 32];
                let mut proof = keys.agent_proof(service, &agent_nonce);
                if !good_proof {
                    proof[31] ^= 0x80;
                }
                let f = Message::Hello(Hello { service: service.into(), agent_nonce, proof, software: "fuzz".into() })
                    .to_frame();
                let at = usize::from(split).min(f.len());
                h.input(ci, &f[..at]);
                h.drain();
                h.input(ci, &f[at..]);
            }
            Op::Raw { conn, bytes } => {
                let Some(ci) = h.conn(conn) else { continue };
                h.input(ci, &bytes);
            }
            Op::Heartbeat { conn } => {
                let Some(ci) = h.conn(conn) else { continue };
                h.input(ci, &Message::Heartbeat.to_frame());
            }
            Op::Extension { conn, ty } => {
                let Some(ci) = h.conn(conn) else { continue };
                h.input(ci, &Message::Ignorable(ty | 0x80).to_frame());
            }
            Op::ConnectFailed { conn, token, random_id, code } => {
                let Some(ci) = h.conn(conn) else { continue };
                let request_id = match random_id {
                    Some(id) => id,
                    None if h.tokens.is_empty() => 1,
                    None => h.tokens[usize::from(token) % h.tokens.len()].request_id,
                };
                let f = Message::ConnectFailed(ConnectFailed {
                    request_id,
                    code: ErrorCode::from_u16(code),
                    message: "no".into(),
                })
                .to_frame();
                h.input(ci, &f);
            }
            Op::ErrorFrame { conn } => {
                let Some(ci) = h.conn(conn) else { continue };
                let f = Message::Error(ErrorFrame { code: ErrorCode::ShuttingDown, message: "bye".into() }).to_frame();
                h.input(ci, &f);
            }
            Op::Unexpected { conn } => {
                let Some(ci) = h.conn(conn) else { continue };
                h.input(ci, &Message::DataAccept.to_frame());
            }
            Op::ConnClosed { conn } => {
                let Some(ci) = h.conn(conn) else { continue };
                let id = h.conns[ci].id;
                h.gw.handle_control_closed(h.now, id);
            }
            Op::Client { service, with_addr } => {
                let service = SERVICES[usize::from(service) % SERVICES.len()].to_string();
                let id = ClientId(next_id);
                next_id += 1;
                let idx = h.clients.len();
                h.client_index.insert(id, idx);
                h.clients.push(ClientInfo { id, accepted: false, resolved: false });
                let addr = with_addr.then_some(SocketAddr::from(([198, 51, 100, 7], 40000)));
                let before = h.connects_seen;
                h.asking = Some((idx, service.clone()));
                let res = h.gw.handle_client(h.now, id, &service, addr, addr);
                h.drain();
                h.asking = None;
                match res {
                    Ok(ClientRoute::Requested) => {
                        assert_eq!(h.connects_seen, before + 1, "accepted client but no CONNECT");
                        h.clients[idx].accepted = true;
                    }
                    Ok(ClientRoute::Pooled { pooled, bind, session_id }) => {
                        assert_eq!(h.connects_seen, before, "pooled client but a CONNECT went out");
                        let (svc, ci) = h.parked.remove(&pooled).expect("handed out a connection that is not parked");
                        assert!(h.finished_pooled.insert(pooled), "pooled connection handed out twice");
                        assert_eq!(svc, service, "pooled connection of another service");
                        assert!(!h.conns[ci].closed_out, "pooled connection of a closed session");
                        assert_eq!(h.conns[ci].registered.as_ref().map(|r| r.1), Some(session_id));
                        let mut rest = &bind[..];
                        match FrameDecoder::new().decode(&mut rest) {
                            Ok(Some(Message::DataBind(b))) => assert_eq!((b.client, b.public), (addr, addr)),
                            other => panic!("bind bytes are not a DATA_BIND: {other:?}"),
                        }
                        assert!(rest.is_empty());
                        h.clients[idx].accepted = true;
                        h.clients[idx].resolved = true;
                    }
                    Err(_) => {
                        assert_eq!(h.connects_seen, before, "refused client but a CONNECT went out");
                        h.clients[idx].resolved = true;
                    }
                }
            }
            Op::ClientGone { client } => {
                let open: Vec<usize> =
                    (0..h.clients.len()).filter(|&i| h.clients[i].accepted && !h.clients[i].resolved).collect();
                if open.is_empty() {
                    continue;
                }
                let i = open[usize::from(client) % open.len()];
                h.clients[i].resolved = true;
                let id = h.clients[i].id;
                h.gw.handle_client_gone(h.now, id);
            }
            Op::DataHello { token, mutation, tls } => {
                if h.tokens.is_empty() {
                    continue;
                }
                let ti = usize::from(token) % h.tokens.len();
                let t = &h.tokens[ti];
                let mut hello = DataHello {
                    service: t.service.clone(),
                    session_id: t.session_id,
                    request_id: t.request_id,
                    token: t.token,
                };
                match mutation {
                    Mutation::None => {}
                    Mutation::Token => hello.token[0] ^= 1,
                    Mutation::Service => hello.service.push('x'),
                    Mutation::Session => hello.session_id ^= 1,
                }
                data_hello(&mut h, &hello, tls);
            }
            Op::DataHelloRandom { request_id, service, session_id, token, tls } => {
                let service = SERVICES[usize::from(service) % SERVICES.len()].to_string();
                let hello = DataHello { service, session_id, request_id, token };
                data_hello(&mut h, &hello, tls);
            }
            Op::Advance(ms) => h.now += Duration::from_millis(u64::from(ms)),
            Op::AdvanceSecs(s) => h.now += Duration::from_secs(u64::from(s % 128)),
            Op::PooledGone { pick } => {
                let mut ids: Vec<u64> = h.parked.keys().copied().collect();
                ids.extend(h.finished_pooled.iter().copied().take(2));
                if ids.is_empty() {
                    continue;
                }
                ids.sort_unstable();
                let id = ids[usize::from(pick) % ids.len()];
                h.gw.handle_pooled_gone(h.now, id, "fuzz");
                h.parked.remove(&id);
                h.finished_pooled.insert(id);
            }
            Op::Reconfigure { keep_web, keep_secure, web_password, web_pool } => {
                let mut services = Vec::new();
                if keep_web {
                    let key = if web_password { PasswordKey::from_bytes([0xee; 32]) } else { password("web") };
                    services.push(web_config(key, usize::from(web_pool % 4)));
                }
                if keep_secure {
                    services.push(secure_config());
                }
                let kept: Vec<&str> = services.iter().map(|s| if s.name == "web" { "web" } else { "secure" }).collect();
                let open_before: Vec<bool> = h.conns.iter().map(|c| !c.closed_out).collect();
                let report = h.gw.reconfigure(h.now, services);
                h.drain();
                for name in &report.removed {
                    assert!(!kept.contains(&name.as_str()), "{name} reported removed but kept");
                    assert!(!h.gw.is_online(name), "removed service {name} still online");
                }
                for (ci, c) in h.conns.iter().enumerate() {
                    let Some((svc, _)) = &c.registered else { continue };
                    if kept.contains(&svc.as_str()) {
                        // A reload never ends a session of a service that stays.
                        assert_eq!(open_before[ci], !c.closed_out, "a reload closed a session of kept service {svc}");
                    } else {
                        assert!(c.closed_out, "the session of removed service {svc} stayed open");
                    }
                }
                for (_, (svc, _)) in h.parked.iter() {
                    assert!(kept.contains(&svc.as_str()), "a pooled connection of removed service {svc} stayed parked");
                }
            }
            Op::Timeout => {
                h.gw.handle_timeout(h.now);
                check_queued(&mut h);
                if let Some(t) = h.gw.poll_timeout() {
                    assert!(
                        t > h.now,
                        "poll_timeout {:?} is not after now {:?} once handle_timeout ran",
                        t - epoch,
                        h.now - epoch
                    );
                }
            }
        }
        check_queued(&mut h);
    }
});

/// With outputs queued, `poll_timeout()` must not let a driver sleep past now; then drains.
fn check_queued(h: &mut H) {
    let before = h.gw.poll_timeout();
    if h.drain() > 0 {
        let t = before.expect("outputs queued but poll_timeout() is None");
        assert!(t <= h.now, "outputs queued but poll_timeout() is later than now");
    }
}

fn data_hello(h: &mut H, hello: &DataHello, tls: bool) {
    let res = h.gw.handle_data_hello(h.now, hello, tls);
    h.drain();
    let p = match res {
        Err(_) => return,
        Ok(DataOutcome::Paired(p)) => p,
        Ok(DataOutcome::Parked { pooled, service, session_id }) => {
            assert_eq!(pooled, hello.request_id);
            assert!(h.redeemed.insert(pooled), "request {pooled} redeemed twice");
            let t = h.tokens.iter().find(|t| t.request_id == pooled).expect("parked a request id never sent");
            assert!(t.client.is_none(), "a CONNECT token parked a connection");
            assert_eq!((hello.token, &hello.service, hello.session_id), (t.token, &t.service, t.session_id));
            assert_eq!((service.as_str(), session_id), (t.service.as_str(), t.session_id));
            assert!(h.now < t.expires, "parked with an expired token");
            assert!(!h.conns[t.conn].closed_out, "parked for a closed control connection");
            if t.service == "secure" {
                assert!(tls, "parked a TLS-only service's connection without TLS");
            }
            let conn = t.conn;
            assert!(h.parked.insert(pooled, (service, conn)).is_none());
            return;
        }
    };
    assert!(h.redeemed.insert(p.request_id), "request {} redeemed twice", p.request_id);
    assert_eq!(p.request_id, hello.request_id);
    let t = h
        .tokens
        .iter()
        .find(|t| t.request_id == hello.request_id)
        .expect("paired a request id the gateway never sent");
    assert_eq!(hello.token, t.token, "paired with a wrong token");
    assert_eq!(hello.service, t.service, "paired with a wrong service");
    assert_eq!(hello.session_id, t.session_id, "paired with a wrong session id");
    assert_eq!(p.service, t.service, "Paired.service is not what the client asked for");
    assert_eq!(p.session_id, t.session_id);
    assert!(h.now < t.expires, "paired with an expired token");
    assert!(!h.conns[t.conn].closed_out, "paired a token of a closed control connection");
    if t.service == "secure" {
        assert!(tls, "paired a TLS-only service without TLS");
    }
    let c = &mut h.clients[t.client.expect("a PREPARE token paired a client")];
    assert_eq!(p.client, c.id, "Paired.client is not the client that asked");
    assert!(c.accepted);
    assert!(!c.resolved, "{:?} resolved twice (paired)", c.id);
    c.resolved = true;
    if std::env::var_os("DIALBACK_FUZZ_TRACE").is_some() {
        eprintln!("paired request {} for service {}", p.request_id, p.service);
    }
}
