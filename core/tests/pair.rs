//! Deterministic two-sided tests of the sans-IO core, in the style of quinn-proto's `Pair`:
//! one [`Gateway`] and any number of [`AgentControl`]s joined by simulated control connections.
//!
//! * TLS is simulated: every control connection has an exporter value for each end (equal for
//!   a genuine connection, different for a relay that terminates TLS).
//! * Each direction of a connection is a byte queue delivered in chunk sizes chosen by the
//!   test (1..=N bytes, coalescing writes like TCP does) after a fixed delay.
//! * Time is virtual: `Instant::now()` is read once per [`Pair`] as the epoch, and from then
//!   on the driver only adds durations, jumping straight to the next timer or delivery.
//! * The gateway end of a control connection starts behind `data::Intake`, exactly like the
//!   runtime: the preamble is consumed there, the rest goes to `handle_control_input`.
//!
//! The driver checks invariants on every step (poll_timeout never in the past once timers
//! ran, no output for a closed connection, a client resolved at most once) and every drive
//! loop is bounded, so a livelock fails the test instead of hanging it.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dialback_core::agent::{AgentControl, AgentError, AgentEvent, ConnectRequest};
use dialback_core::crypto::{PasswordKey, SessionKeys};
use dialback_core::data::{encode_data_hello, Classified, Intake};
use dialback_core::gateway::{
    ClientId, ClientReject, ClientRoute, ConnId, DataOutcome, DataReject, Gateway, GatewayConfig,
    GatewayEvent, GatewayOutput, Paired, ServiceConfig, POOL_TOP_UP,
};
use dialback_core::wire::{
    self, msg_type, DataHello, FrameDecoder, Message, Welcome, WireError, MAX_FRAME_PAYLOAD,
};
use dialback_core::{ErrorCode, Timing};
use proptest::prelude::*;

const PASSWORD: &str = "correct horse battery staple";
const SERVICE: &str = "web";
const SOFTWARE: &str = "dialback-test/1";
/// Upper bound on driver iterations per drive call: a livelock fails instead of hanging.
const MAX_STEPS: usize = 200_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn timing() -> Timing {
    Timing {
        heartbeat: ms(200),
        dead_after: ms(600),
        token_ttl: ms(1000),
        handshake_timeout: ms(1000),
    }
}

/// The real, PBKDF2-stretched key of [`PASSWORD`] for [`SERVICE`], derived once per process.
fn password_key() -> PasswordKey {
    static KEY: OnceLock<PasswordKey> = OnceLock::new();
    KEY.get_or_init(|| PasswordKey::derive(SERVICE, PASSWORD))
        .clone()
}

fn service(name: &str, key: PasswordKey, data_tls: bool) -> ServiceConfig {
    ServiceConfig {
        name: name.to_owned(),
        password_key: key,
        data_tls,
        max_pending: 64,
        pool: 0,
        pool_max_idle: Duration::from_secs(60),
        allow_from: Default::default(),
        clients_allow: Default::default(),
        send_proxy: None,
        direct: false,
    }
}

fn client_addr(id: u64) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
        20_000 + (id % 40_000) as u16,
    )
}

fn public_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 443)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Simulated wires
// ---------------------------------------------------------------------------------------------

/// How one direction of a connection behaves.
#[derive(Debug, Clone)]
struct Link {
    delay: Duration,
    /// Chunk sizes used in turn for deliveries.
    chunks: Vec<usize>,
}

impl Link {
    fn new(delay_ms: u64, chunks: &[usize]) -> Self {
        Link {
            delay: ms(delay_ms),
            chunks: chunks.to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
struct Chunker {
    sizes: Vec<usize>,
    i: usize,
}

impl Chunker {
    fn new(sizes: Vec<usize>) -> Self {
        assert!(!sizes.is_empty());
        Chunker { sizes, i: 0 }
    }

    fn next_size(&mut self) -> usize {
        let n = self.sizes[self.i % self.sizes.len()];
        self.i += 1;
        n.max(1)
    }
}

#[derive(Debug)]
enum Item {
    Bytes(Vec<u8>),
    Eof,
}

/// One direction of a connection.
#[derive(Debug)]
struct Wire {
    delay: Duration,
    chunker: Chunker,
    queue: VecDeque<(Instant, Item)>,
    /// Everything written drops silently from now on (and what was in flight is lost).
    blackholed: bool,
    /// Every write by the sending end, delivered or not (injected bytes are not included).
    sent: Vec<(Instant, Vec<u8>)>,
}

impl Wire {
    fn new(link: &Link) -> Self {
        Wire {
            delay: link.delay,
            chunker: Chunker::new(link.chunks.clone()),
            queue: VecDeque::new(),
            blackholed: false,
            sent: Vec::new(),
        }
    }

    fn send(&mut self, now: Instant, bytes: Vec<u8>) {
        assert!(!bytes.is_empty(), "an endpoint asked to write zero bytes");
        self.sent.push((now, bytes.clone()));
        if !self.blackholed {
            self.queue.push_back((now + self.delay, Item::Bytes(bytes)));
        }
    }

    /// Bytes from somewhere other than the endpoint (an attacker), delivered even if blackholed.
    fn inject(&mut self, now: Instant, bytes: Vec<u8>) {
        assert!(!bytes.is_empty());
        self.queue.push_back((now + self.delay, Item::Bytes(bytes)));
    }

    fn send_eof(&mut self, now: Instant) {
        if !self.blackholed {
            self.queue.push_back((now + self.delay, Item::Eof));
        }
    }

    fn blackhole(&mut self) {
        self.blackholed = true;
        self.queue.clear();
    }

    fn next_ready(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _)| *t)
    }

    /// One delivery: a chunk of ready bytes (coalescing consecutive writes), or the EOF.
    fn take(&mut self, now: Instant) -> Option<Item> {
        match self.queue.front() {
            Some((t, _)) if *t <= now => {}
            _ => return None,
        }
        if matches!(self.queue.front(), Some((_, Item::Eof))) {
            return self.queue.pop_front().map(|(_, item)| item);
        }
        let want = self.chunker.next_size();
        let mut out = Vec::new();
        while out.len() < want {
            let Some((t, Item::Bytes(seg))) = self.queue.front_mut() else {
                break;
            };
            if *t > now {
                break;
            }
            let n = (want - out.len()).min(seg.len());
            out.extend(seg.drain(..n));
            if seg.is_empty() {
                self.queue.pop_front();
            }
        }
        Some(Item::Bytes(out))
    }

    /// The frames of everything written, each stamped with the time of the write that
    /// completed it. `skip` bytes (the preamble) are skipped at the start of the stream.
    fn frames(&self, mut skip: usize) -> Vec<(Instant, Message)> {
        let mut d = FrameDecoder::new();
        let mut out = Vec::new();
        for (t, bytes) in &self.sent {
            let n = skip.min(bytes.len());
            skip -= n;
            let mut input = &bytes[n..];
            while !input.is_empty() {
                match d.decode(&mut input) {
                    Ok(Some(m)) => out.push((*t, m)),
                    Ok(None) => break,
                    Err(e) => panic!("an endpoint wrote an undecodable frame: {e}"),
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The pair
// ---------------------------------------------------------------------------------------------

struct AgentSpec {
    service: String,
    key: PasswordKey,
    exporter_agent: [u8; 32],
    exporter_gw: [u8; 32],
    up: Option<Link>,
    down: Option<Link>,
}

impl AgentSpec {
    fn new(service: &str, key: PasswordKey, exporter: [u8; 32]) -> Self {
        AgentSpec {
            service: service.to_owned(),
            key,
            exporter_agent: exporter,
            exporter_gw: exporter,
            up: None,
            down: None,
        }
    }

    fn links(mut self, up: Link, down: Link) -> Self {
        self.up = Some(up);
        self.down = Some(down);
        self
    }
}

/// One control connection: the agent end and the runtime state of the gateway end.
struct Side {
    conn: ConnId,
    agent: AgentControl,
    started: Instant,
    exporter_gw: [u8; 32],
    peer: SocketAddr,
    /// Agent to gateway.
    up: Wire,
    /// Gateway to agent.
    down: Wire,
    /// Reads the preamble at the gateway end; `None` once the connection was classified.
    intake: Option<Intake>,
    opened_at: Option<Instant>,
    /// The gateway end is closed (Close output, or EOF handled): it reads nothing more.
    gw_closed: bool,
    /// The runtime dropped the agent (Closed event, polite close, or EOF): no longer driven.
    agent_dropped: bool,
    agent_eof_at: Option<Instant>,
    events: Vec<(Instant, AgentEvent)>,
    last_gw_rx: Option<Instant>,
    last_agent_rx: Option<Instant>,
}

struct Pair {
    epoch: Instant,
    now: Instant,
    timing: Timing,
    gw: Gateway,
    sides: Vec<Side>,
    link: Link,
    gw_events: Vec<(Instant, GatewayEvent)>,
    failed: Vec<(Instant, ClientId, ErrorCode)>,
    closes: Vec<(Instant, ConnId)>,
    /// How each client was resolved: "paired", "failed" or "gone" (the runtime said so).
    outcomes: BTreeMap<ClientId, &'static str>,
    clients: BTreeMap<SocketAddr, ClientId>,
    issued: BTreeMap<ClientId, Instant>,
    data_log: Vec<Vec<u8>>,
    data_chunks: Chunker,
    nonce_seed: [u8; 32],
    /// Pooled connections parked (redeemed for the pool) and not yet handed out or closed.
    parked: BTreeMap<u64, Instant>,
    /// Pooled connections handed to clients, and the client.
    bound: BTreeMap<u64, ClientId>,
    /// Pooled connections the gateway closed, and when.
    pool_closed: Vec<(Instant, u64)>,
}

/// The only clock read of a test: every later instant is this plus a duration. (`Instant` has
/// no public constructor, and the core itself must never read the clock: `core/clippy.toml`.)
#[allow(clippy::disallowed_methods)]
fn epoch() -> Instant {
    Instant::now()
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Pair {
    fn new(services: Vec<ServiceConfig>, seed: [u8; 32], link: Link) -> Self {
        let epoch = epoch();
        let timing = timing();
        let gw = Gateway::new(GatewayConfig { timing, services }, seed);
        let data_chunks = Chunker::new(link.chunks.clone());
        let mut nonce_seed = seed;
        nonce_seed.reverse();
        Pair {
            epoch,
            now: epoch,
            timing,
            gw,
            sides: Vec::new(),
            link,
            gw_events: Vec::new(),
            failed: Vec::new(),
            closes: Vec::new(),
            outcomes: BTreeMap::new(),
            clients: BTreeMap::new(),
            issued: BTreeMap::new(),
            data_log: Vec::new(),
            data_chunks,
            nonce_seed,
            parked: BTreeMap::new(),
            bound: BTreeMap::new(),
            pool_closed: Vec::new(),
        }
    }

    /// A pair with one service ([`SERVICE`], the real password key) and default wires.
    fn simple(data_tls: bool) -> Self {
        Pair::new(
            vec![service(SERVICE, password_key(), data_tls)],
            [42; 32],
            Link::new(5, &[1, 7, 3, 64, 19]),
        )
    }

    /// Virtual time since the epoch, for messages.
    fn t(&self, at: Instant) -> Duration {
        at - self.epoch
    }

    fn add_agent(&mut self, spec: AgentSpec) -> usize {
        let idx = self.sides.len();
        let conn = ConnId(idx as u64 + 1);
        let mut nonce = self.nonce_seed;
        nonce[..8].copy_from_slice(&conn.0.to_be_bytes());
        let agent = AgentControl::new(
            self.now,
            &spec.service,
            &spec.key,
            &spec.exporter_agent,
            nonce,
            &self.timing,
            SOFTWARE,
        );
        let up = spec.up.unwrap_or_else(|| self.link.clone());
        let down = spec.down.unwrap_or_else(|| self.link.clone());
        self.sides.push(Side {
            conn,
            agent,
            started: self.now,
            exporter_gw: spec.exporter_gw,
            peer: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 40_000 + idx as u16),
            up: Wire::new(&up),
            down: Wire::new(&down),
            intake: Some(Intake::new(true)),
            opened_at: None,
            gw_closed: false,
            agent_dropped: false,
            agent_eof_at: None,
            events: Vec::new(),
            last_gw_rx: None,
            last_agent_rx: None,
        });
        self.drain();
        idx
    }

    fn agent(&mut self, service: &str, key: PasswordKey, exporter: [u8; 32]) -> usize {
        self.add_agent(AgentSpec::new(service, key, exporter))
    }

    fn side_of(&self, conn: ConnId) -> usize {
        self.sides
            .iter()
            .position(|s| s.conn == conn)
            .unwrap_or_else(|| panic!("gateway output for unknown connection {conn:?}"))
    }

    // --- driving ---------------------------------------------------------------------------

    /// Delivers one chunk on every wire that has ready bytes, then drains every output.
    fn step(&mut self) -> bool {
        let mut progress = false;
        for i in 0..self.sides.len() {
            if let Some(item) = self.sides[i].up.take(self.now) {
                progress = true;
                self.deliver_to_gateway(i, item);
            }
            if let Some(item) = self.sides[i].down.take(self.now) {
                progress = true;
                self.deliver_to_agent(i, item);
            }
        }
        self.drain() || progress
    }

    fn deliver_to_gateway(&mut self, i: usize, item: Item) {
        let now = self.now;
        let side = &mut self.sides[i];
        if side.gw_closed {
            return; // the gateway closed this socket
        }
        let conn = side.conn;
        match item {
            Item::Eof => {
                side.gw_closed = true;
                if side.intake.is_none() {
                    self.gw.handle_control_closed(now, conn);
                }
            }
            Item::Bytes(bytes) => {
                side.last_gw_rx = Some(now);
                let mut input = &bytes[..];
                if let Some(intake) = side.intake.as_mut() {
                    match intake.handle_input(&mut input) {
                        Ok(None) => {
                            assert!(input.is_empty(), "intake left bytes without classifying");
                            return;
                        }
                        Ok(Some(Classified::Control)) => {
                            side.intake = None;
                            side.opened_at = Some(now);
                            let (peer, exporter) = (side.peer, side.exporter_gw);
                            self.gw.handle_control_open(now, conn, peer, exporter);
                        }
                        Ok(Some(Classified::Data(h))) => {
                            panic!("control connection classified as data: {h:?}")
                        }
                        Err(e) => panic!("intake refused a control connection: {e}"),
                    }
                }
                if !input.is_empty() {
                    self.gw.handle_control_input(now, conn, input);
                }
            }
        }
    }

    fn deliver_to_agent(&mut self, i: usize, item: Item) {
        let now = self.now;
        let side = &mut self.sides[i];
        if side.agent_dropped {
            return;
        }
        match item {
            Item::Eof => {
                side.agent_eof_at = Some(now);
                side.agent_dropped = true;
                side.up.send_eof(now);
            }
            Item::Bytes(bytes) => {
                side.last_agent_rx = Some(now);
                side.agent.handle_input(now, &bytes);
            }
        }
    }

    /// Drains every output of every endpoint. Returns whether there was any.
    fn drain(&mut self) -> bool {
        let mut any = false;
        let before = self.gw.poll_timeout();
        let mut first = true;
        while let Some(o) = self.gw.poll_output() {
            if first {
                assert_eq!(
                    before,
                    Some(self.now),
                    "with outputs queued, gateway poll_timeout must be the current time"
                );
                first = false;
            }
            any = true;
            self.on_gateway_output(o);
        }
        let now = self.now;
        for side in &mut self.sides {
            if side.agent_dropped {
                continue;
            }
            while let Some(bytes) = side.agent.poll_transmit() {
                any = true;
                side.up.send(now, bytes);
            }
            while let Some(ev) = side.agent.poll_event() {
                any = true;
                if let AgentEvent::Closed(_) = &ev {
                    assert!(side.agent.is_closed());
                    assert!(
                        side.agent.poll_transmit().is_none(),
                        "agent wrote after closing"
                    );
                    side.agent_dropped = true;
                    side.up.send_eof(now);
                }
                side.events.push((now, ev));
            }
        }
        any
    }

    fn on_gateway_output(&mut self, o: GatewayOutput) {
        let now = self.now;
        match o {
            GatewayOutput::Transmit { conn, bytes } => {
                let i = self.side_of(conn);
                assert!(
                    !self.closes.iter().any(|(_, c)| *c == conn),
                    "gateway transmitted on {conn:?} after closing it"
                );
                self.sides[i].down.send(now, bytes);
            }
            GatewayOutput::Close { conn } => {
                let i = self.side_of(conn);
                assert!(
                    !self.closes.iter().any(|(_, c)| *c == conn),
                    "gateway closed {conn:?} twice"
                );
                self.closes.push((now, conn));
                let side = &mut self.sides[i];
                side.gw_closed = true;
                side.down.send_eof(now); // after flushing what was transmitted
            }
            GatewayOutput::ClientFailed {
                client,
                code,
                reason,
            } => {
                assert!(!reason.is_empty());
                self.failed.push((now, client, code));
                self.resolve(client, "failed");
            }
            GatewayOutput::ClosePooled { pooled } => {
                assert!(
                    self.parked.remove(&pooled).is_some(),
                    "gateway closed pooled connection {pooled} that is not parked"
                );
                assert!(!self.bound.contains_key(&pooled));
                self.pool_closed.push((now, pooled));
            }
            GatewayOutput::Event(ev) => self.gw_events.push((now, ev)),
        }
    }

    fn resolve(&mut self, client: ClientId, how: &'static str) {
        assert!(
            self.issued.contains_key(&client),
            "{how} for a client never issued: {client:?}"
        );
        if let Some(prev) = self.outcomes.insert(client, how) {
            panic!("{client:?} resolved twice: {prev} then {how}");
        }
    }

    fn live_agents(&self) -> impl Iterator<Item = &Side> {
        self.sides.iter().filter(|s| !s.agent_dropped)
    }

    fn next_timer(&self) -> Option<Instant> {
        self.live_agents().fold(self.gw.poll_timeout(), |t, s| {
            min_opt(t, s.agent.poll_timeout())
        })
    }

    fn next_delivery(&self) -> Option<Instant> {
        self.sides.iter().fold(None, |t, s| {
            min_opt(t, min_opt(s.up.next_ready(), s.down.next_ready()))
        })
    }

    /// Runs every endpoint's timers at the current time, drains, and checks that no timer
    /// is left at or before now (it would mean a timer that does not clear itself).
    fn fire_timers(&mut self) {
        let now = self.now;
        self.gw.handle_timeout(now);
        for side in &mut self.sides {
            if !side.agent_dropped {
                side.agent.handle_timeout(now);
            }
        }
        self.drain();
        if let Some(t) = self.gw.poll_timeout() {
            assert!(
                t > now,
                "gateway poll_timeout {:?} not after now {:?} once timers ran",
                self.t(t),
                self.t(now)
            );
        }
        for s in self.live_agents() {
            if let Some(t) = s.agent.poll_timeout() {
                assert!(
                    t > now,
                    "agent poll_timeout {:?} not after now {:?} once timers ran",
                    self.t(t),
                    self.t(now)
                );
            }
        }
    }

    /// Drives until `end` (or, with `None`, until no bytes are in flight).
    fn drive(&mut self, end: Option<Instant>) {
        for _ in 0..MAX_STEPS {
            if self.step() {
                continue;
            }
            // Quiescent at `now`. Gateway timers are always run when due and reset by inputs
            // only to later deadlines, so nothing of the gateway may be overdue here.
            if let Some(t) = self.gw.poll_timeout() {
                assert!(
                    t > self.now,
                    "gateway timer {:?} overdue at {:?}",
                    self.t(t),
                    self.t(self.now)
                );
            }
            // An agent's deadline can be due right after an input (a late WELCOME makes a
            // heartbeat due at once): run it now.
            if self
                .live_agents()
                .any(|s| s.agent.poll_timeout().is_some_and(|t| t <= self.now))
            {
                self.fire_timers();
                continue;
            }
            let delivery = self.next_delivery();
            let next = match end {
                Some(_) => min_opt(delivery, self.next_timer()),
                None if delivery.is_none() => return,
                None => min_opt(delivery, self.next_timer()),
            };
            match next {
                Some(t) if end.is_none_or(|e| t <= e) => {
                    assert!(t > self.now, "next event not in the future");
                    self.now = t;
                    self.fire_timers();
                }
                _ => {
                    if let Some(e) = end {
                        self.now = self.now.max(e);
                    }
                    return;
                }
            }
        }
        panic!(
            "driver did not settle within {MAX_STEPS} steps (livelock?) at {:?}",
            self.t(self.now)
        );
    }

    fn settle(&mut self) {
        self.drive(None);
    }

    fn run_until(&mut self, end: Instant) {
        self.drive(Some(end));
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.drive(Some(end));
    }

    // --- runtime actions -------------------------------------------------------------------

    fn client(&mut self, id: u64, service: &str) -> Result<(), ClientReject> {
        match self.client_route(id, service)? {
            ClientRoute::Requested => Ok(()),
            r => panic!("client {id} took a pooled connection in a test without a pool: {r:?}"),
        }
    }

    fn client_route(&mut self, id: u64, service: &str) -> Result<ClientRoute, ClientReject> {
        let client = ClientId(id);
        let addr = client_addr(id);
        let r = self
            .gw
            .handle_client(self.now, client, service, Some(addr), Some(public_addr()));
        if let Ok(route) = &r {
            assert!(
                self.issued.insert(client, self.now).is_none(),
                "client id reused"
            );
            self.clients.insert(addr, client);
            if let ClientRoute::Pooled { pooled, bind, .. } = route {
                assert!(
                    self.parked.remove(pooled).is_some(),
                    "client {id} got pooled connection {pooled}, which is not parked"
                );
                assert!(self.bound.insert(*pooled, client).is_none());
                let mut input = &bind[..];
                let m = FrameDecoder::new().decode(&mut input).unwrap();
                assert!(input.is_empty());
                let Some(Message::DataBind(b)) = m else {
                    panic!("bind bytes are not a DATA_BIND: {m:?}")
                };
                assert_eq!((b.client, b.public), (Some(addr), Some(public_addr())));
                self.resolve(client, "pooled");
            }
        }
        self.drain();
        r
    }

    /// The runtime noticed that a parked connection died.
    fn pooled_gone(&mut self, pooled: u64) {
        self.gw
            .handle_pooled_gone(self.now, pooled, "closed by the agent");
        self.parked.remove(&pooled);
        self.drain();
    }

    fn client_gone(&mut self, id: ClientId) {
        self.gw.handle_client_gone(self.now, id);
        self.outcomes.entry(id).or_insert("gone");
        self.drain();
    }

    fn client_of(&self, req: &ConnectRequest) -> ClientId {
        let addr = req.client.expect("CONNECT carries the client address");
        *self
            .clients
            .get(&addr)
            .expect("CONNECT for a client the test created")
    }

    fn is_pending(&self, c: ClientId) -> bool {
        self.issued.contains_key(&c) && !self.outcomes.contains_key(&c)
    }

    /// A data connection: DATA_HELLO through a fresh `Intake`, then `handle_data_hello`.
    fn redeem(&mut self, hello: &DataHello, tls: bool) -> Result<Paired, DataReject> {
        match self.redeem_any(hello, tls)? {
            DataOutcome::Paired(p) => Ok(p),
            o => panic!("data connection parked in a test without a pool: {o:?}"),
        }
    }

    fn redeem_any(&mut self, hello: &DataHello, tls: bool) -> Result<DataOutcome, DataReject> {
        let bytes = encode_data_hello(hello);
        self.data_log.push(bytes.clone());
        let mut intake = Intake::new(tls);
        let mut rest = &bytes[..];
        let mut got = None;
        while got.is_none() {
            assert!(
                !rest.is_empty(),
                "intake wants more than a whole DATA_HELLO"
            );
            let n = self.data_chunks.next_size().min(rest.len());
            let mut chunk = &rest[..n];
            got = intake
                .handle_input(&mut chunk)
                .expect("intake accepts a DATA_HELLO");
            assert!(chunk.is_empty(), "intake left part of the DATA_HELLO");
            rest = &rest[n..];
        }
        assert!(
            rest.is_empty(),
            "intake classified before the end of the DATA_HELLO"
        );
        let Some(Classified::Data(h)) = got else {
            panic!("data connection not classified as data")
        };
        assert_eq!(&h, hello);
        let r = self.gw.handle_data_hello(self.now, &h, tls);
        match &r {
            Ok(DataOutcome::Paired(p)) => self.resolve(p.client, "paired"),
            Ok(DataOutcome::Parked { pooled, .. }) => {
                assert_eq!(*pooled, h.request_id);
                assert!(self.parked.insert(*pooled, self.now).is_none());
            }
            Err(_) => {}
        }
        self.drain();
        r
    }

    fn blackhole(&mut self, i: usize) {
        self.sides[i].up.blackhole();
        self.sides[i].down.blackhole();
    }

    /// The agent ends its session politely (ERROR frame), and the runtime drops it.
    fn agent_close(&mut self, i: usize, code: ErrorCode) {
        let now = self.now;
        let side = &mut self.sides[i];
        side.agent.close(now, code, "shutting down");
        while let Some(bytes) = side.agent.poll_transmit() {
            side.up.send(now, bytes);
        }
        assert!(side.agent.poll_event().is_none());
        side.agent_dropped = true;
        side.up.send_eof(now);
    }

    // --- observations ----------------------------------------------------------------------

    fn registered(&self, i: usize) -> Option<u64> {
        self.sides[i].events.iter().find_map(|(_, e)| match e {
            AgentEvent::Registered { session_id, .. } => Some(*session_id),
            _ => None,
        })
    }

    fn closed(&self, i: usize) -> Option<(Instant, AgentError)> {
        self.sides[i].events.iter().find_map(|(t, e)| match e {
            AgentEvent::Closed(err) => Some((*t, err.clone())),
            _ => None,
        })
    }

    fn connects(&self, i: usize) -> Vec<ConnectRequest> {
        self.sides[i]
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                AgentEvent::Connect(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn all_connects(&self) -> Vec<ConnectRequest> {
        (0..self.sides.len())
            .flat_map(|i| self.connects(i))
            .collect()
    }

    fn gw_registered(&self, conn: ConnId) -> Vec<(Instant, u64)> {
        self.gw_events
            .iter()
            .filter_map(|(t, e)| match e {
                GatewayEvent::Registered {
                    conn: c,
                    session_id,
                    ..
                } if *c == conn => Some((*t, *session_id)),
                _ => None,
            })
            .collect()
    }

    fn session_ended(&self, conn: ConnId) -> Vec<(Instant, u64, String)> {
        self.gw_events
            .iter()
            .filter_map(|(t, e)| match e {
                GatewayEvent::SessionEnded {
                    conn: c,
                    session_id,
                    reason,
                    ..
                } if *c == conn => Some((*t, *session_id, reason.clone())),
                _ => None,
            })
            .collect()
    }

    /// For each SessionEnded of `conn`: whether it was orderly.
    fn ended_orderly(&self, conn: ConnId) -> Vec<bool> {
        self.gw_events
            .iter()
            .filter_map(|(_, e)| match e {
                GatewayEvent::SessionEnded {
                    conn: c, orderly, ..
                } if *c == conn => Some(*orderly),
                _ => None,
            })
            .collect()
    }

    fn rejected(&self, conn: ConnId) -> Vec<(Instant, Option<String>, ErrorCode)> {
        self.gw_events
            .iter()
            .filter_map(|(t, e)| match e {
                GatewayEvent::Rejected {
                    conn: c,
                    service,
                    code,
                    ..
                } if *c == conn => Some((*t, service.clone(), *code)),
                _ => None,
            })
            .collect()
    }

    fn close_of(&self, conn: ConnId) -> Option<Instant> {
        self.closes
            .iter()
            .find(|(_, c)| *c == conn)
            .map(|(t, _)| *t)
    }

    fn failed_for(&self, client: ClientId) -> Vec<(Instant, ErrorCode)> {
        self.failed
            .iter()
            .filter(|(_, c, _)| *c == client)
            .map(|(t, _, code)| (*t, *code))
            .collect()
    }

    /// Registers one agent for [`SERVICE`] and returns its index and session id.
    fn registered_agent(&mut self, exporter: [u8; 32]) -> (usize, u64) {
        let a = self.agent(SERVICE, password_key(), exporter);
        self.settle();
        let sid = self
            .registered(a)
            .unwrap_or_else(|| panic!("agent did not register: {:?}", self.sides[a].events));
        (a, sid)
    }
}

fn link() -> impl Strategy<Value = Link> {
    (0u64..=40, prop::collection::vec(1usize..=64, 1..6)).prop_map(|(d, chunks)| Link {
        delay: ms(d),
        chunks,
    })
}

fn heartbeats(frames: &[(Instant, Message)], after: Instant, until: Instant) -> Vec<Instant> {
    frames
        .iter()
        .filter(|(t, m)| *m == Message::Heartbeat && *t > after && *t <= until)
        .map(|(t, _)| *t)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Handshake and pairing over randomly chunked wires
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn handshake_registers_and_every_client_is_paired_once(
        up in link(),
        down in link(),
        data_chunks in prop::collection::vec(1usize..=64, 1..6),
        n in 1u64..8,
        seed in any::<[u8; 32]>(),
        exporter in any::<[u8; 32]>(),
        reverse in any::<bool>(),
    ) {
        let mut p = Pair::new(vec![service(SERVICE, password_key(), false)], seed, up.clone());
        p.data_chunks = Chunker::new(data_chunks);
        let a = p.add_agent(AgentSpec::new(SERVICE, password_key(), exporter).links(up, down));
        p.settle();

        // Both ends agree on the session.
        let regs: Vec<_> = p.sides[a].events.iter().filter(|(_, e)| matches!(e, AgentEvent::Registered { .. })).collect();
        assert_eq!(regs.len(), 1, "agent events: {:?}", p.sides[a].events);
        let AgentEvent::Registered { session_id, heartbeat, dead_after, data_tls } = regs[0].1.clone() else { unreachable!() };
        assert_eq!((heartbeat, dead_after, data_tls), (ms(200), ms(600), false));
        assert_eq!(p.sides[a].agent.session_id(), Some(session_id));
        let conn = p.sides[a].conn;
        let gw_regs: Vec<_> = p.gw_events.iter().filter_map(|(_, e)| match e {
            GatewayEvent::Registered { conn: c, service, session_id, software, peer } => Some((*c, service.clone(), *session_id, software.clone(), *peer)),
            _ => None,
        }).collect();
        assert_eq!(gw_regs, vec![(conn, SERVICE.to_owned(), session_id, SOFTWARE.to_owned(), p.sides[a].peer)]);
        assert!(p.gw.is_online(SERVICE));
        assert_eq!(p.gw.control_connections(), 1);

        // N public clients: one CONNECT each.
        for id in 0..n {
            p.client(id, SERVICE).expect("client accepted while the agent is online");
        }
        assert_eq!(p.gw.pending_clients(), n as usize);
        p.settle();
        let mut reqs = p.connects(a);
        assert_eq!(reqs.len(), n as usize, "one CONNECT per client");
        let mut ids: Vec<u64> = reqs.iter().map(|r| r.request_id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n as usize, "request ids are distinct");
        let mut seen: Vec<ClientId> = reqs.iter().map(|r| p.client_of(r)).collect();
        seen.sort();
        assert_eq!(seen, (0..n).map(ClientId).collect::<Vec<_>>(), "each client got exactly one CONNECT");
        for r in &reqs {
            assert_eq!(r.public, Some(public_addr()));
            assert!(!r.data_tls);
            assert_eq!(r.hello.service, SERVICE);
            assert_eq!(r.hello.session_id, session_id);
            assert_eq!(r.hello.request_id, r.request_id);
        }

        if reverse {
            reqs.reverse();
        }
        for r in &reqs {
            let client = p.client_of(r);
            let paired = p.redeem(&r.hello, false).expect("first redeem pairs");
            assert_eq!(paired, Paired { client, service: SERVICE.to_owned(), session_id, request_id: r.request_id });
            let again = p.redeem(&r.hello, false).expect_err("a token is single-use");
            assert_eq!(again.code, ErrorCode::TokenInvalid);
        }
        assert!(p.failed.is_empty(), "paired clients were failed: {:?}", p.failed);
        assert_eq!(p.gw.pending_clients(), 0);

        // The expiry timers of redeemed tokens must not fail anybody later.
        p.run_for(p.timing.token_ttl + ms(100));
        assert!(p.failed.is_empty(), "late failures: {:?}", p.failed);
        assert!(p.closed(a).is_none(), "session ended: {:?}", p.closed(a));

        // Neither the password nor its stretched key ever crosses a wire.
        let key = password_key();
        let mut streams: Vec<Vec<u8>> = p.data_log.clone();
        for s in &p.sides {
            streams.push(s.up.sent.iter().flat_map(|(_, b)| b.clone()).collect());
            streams.push(s.down.sent.iter().flat_map(|(_, b)| b.clone()).collect());
        }
        assert!(streams.iter().map(Vec::len).sum::<usize>() > 100);
        for s in &streams {
            assert!(!contains(s, PASSWORD.as_bytes()), "password on the wire");
            assert!(!contains(s, &key.as_bytes()[..]), "password key on the wire");
            assert!(!contains(s, &key.as_bytes()[..12]), "part of the password key on the wire");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Heartbeats keep an idle session alive
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn idle_session_heartbeats_both_ways_and_stays_up(up in link(), down in link(), offset in 0u64..400) {
        let mut p = Pair::new(vec![service(SERVICE, password_key(), false)], [3; 32], up.clone());
        let a = p.add_agent(AgentSpec::new(SERVICE, password_key(), [9; 32]).links(up, down));
        p.settle();
        let sid = p.registered(a).expect("registered");
        p.run_for(ms(offset));

        let t0 = p.now;
        let span = p.timing.dead_after * 10;
        p.run_for(span);
        let t1 = p.now;
        assert_eq!(t1 - t0, span);

        assert!(p.closed(a).is_none(), "agent closed: {:?}", p.closed(a));
        assert!(p.session_ended(p.sides[a].conn).is_empty(), "gateway ended the session");
        assert!(p.closes.is_empty());
        assert_eq!(p.sides[a].agent.session_id(), Some(sid));
        assert!(p.gw.is_online(SERVICE));

        let hb = p.timing.heartbeat;
        let expected = (span.as_millis() / hb.as_millis()) as usize; // 30
        for (dir, frames) in [("agent->gateway", p.sides[a].up.frames(wire::PREAMBLE_LEN)), ("gateway->agent", p.sides[a].down.frames(0))] {
            let beats = heartbeats(&frames, t0, t1);
            assert!(
                (expected - 1..=expected + 1).contains(&beats.len()),
                "{dir}: {} heartbeats in {span:?}, expected about {expected}", beats.len()
            );
            for w in beats.windows(2) {
                assert_eq!(w[1] - w[0], hb, "{dir}: heartbeats of an idle session are one interval apart");
            }
            // Nothing but heartbeats flows on an idle session.
            assert!(frames.iter().filter(|(t, _)| *t > t0).all(|(_, m)| *m == Message::Heartbeat));
        }
        // Each end heard from the other within the last heartbeat interval (+ wire delay).
        let s = &p.sides[a];
        assert!(t1 - s.last_gw_rx.unwrap() <= hb + s.up.delay);
        assert!(t1 - s.last_agent_rx.unwrap() <= hb + s.down.delay);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A silent peer is declared dead after dead_after, on both ends
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn blackholed_session_dies_on_both_ends(up in link(), down in link(), offset in 0u64..400, n in 0u64..4) {
        let mut p = Pair::new(vec![service(SERVICE, password_key(), false)], [5; 32], up.clone());
        let a = p.add_agent(AgentSpec::new(SERVICE, password_key(), [1; 32]).links(up, down));
        p.settle();
        let sid = p.registered(a).expect("registered");
        p.run_for(ms(offset));
        for id in 0..n {
            p.client(id, SERVICE).unwrap();
        }
        p.settle();
        assert_eq!(p.connects(a).len(), n as usize);

        let tb = p.now;
        p.blackhole(a);
        let conn = p.sides[a].conn;
        let last_gw_rx = p.sides[a].last_gw_rx.unwrap();
        let last_agent_rx = p.sides[a].last_agent_rx.unwrap();
        let dead_after = p.timing.dead_after;
        p.run_for(dead_after + ms(300));

        // Gateway: session over exactly dead_after after it last heard from the agent.
        let ended = p.session_ended(conn);
        assert_eq!(ended.len(), 1, "gateway events: {:?}", p.gw_events);
        let (t_end, ended_sid, reason) = &ended[0];
        assert_eq!(*ended_sid, sid);
        assert_eq!(*t_end, last_gw_rx + dead_after, "gateway declared death at {:?}, last heard {:?}", p.t(*t_end), p.t(last_gw_rx));
        assert!(*t_end <= tb + dead_after && *t_end > tb);
        assert!(reason.contains("silent"), "reason: {reason}");
        // Death is silent on both ends (spec section 8): no ERROR frame in either direction.
        assert_eq!(last_error_frame(&p.sides[a].down.frames(0)), None);
        assert_eq!(last_error_frame(&p.sides[a].up.frames(wire::PREAMBLE_LEN)), None);
        assert_eq!(p.close_of(conn), Some(*t_end));
        assert!(!p.gw.is_online(SERVICE));
        assert_eq!(p.gw.control_connections(), 0);

        // Every client waiting on that session is failed right then.
        for id in 0..n {
            assert_eq!(p.failed_for(ClientId(id)), vec![(*t_end, ErrorCode::SessionGone)]);
        }
        assert_eq!(p.gw.pending_clients(), 0);

        // Agent: closed exactly dead_after after it last heard from the gateway.
        let (t_closed, err) = p.closed(a).expect("agent noticed the dead gateway");
        assert_eq!(err, AgentError::PeerDead(dead_after));
        assert_eq!(t_closed, last_agent_rx + dead_after);
        assert!(t_closed <= tb + dead_after && t_closed > tb);

        // And the dead session's tokens are worthless.
        for r in p.connects(a) {
            assert_eq!(p.redeem(&r.hello, false).unwrap_err().code, ErrorCode::TokenInvalid);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. One agent per service; a silent one is replaced after dead_after
// ---------------------------------------------------------------------------------------------

#[test]
fn second_agent_is_refused_until_the_first_is_dead() {
    let mut p = Pair::simple(false);
    let (a, sid_a) = p.registered_agent([1; 32]);
    let conn_a = p.sides[a].conn;

    let b = p.agent(SERVICE, password_key(), [2; 32]);
    p.settle();
    let (_, err) = p.closed(b).expect("B refused");
    let AgentError::Refused { code, message } = err else {
        panic!("B: {err:?}")
    };
    assert_eq!(code, ErrorCode::AlreadyRegistered);
    assert!(message.contains(SERVICE), "message: {message}");
    let conn_b = p.sides[b].conn;
    let rej = p.rejected(conn_b);
    assert_eq!(rej.len(), 1);
    assert_eq!(
        (rej[0].1.as_deref(), rej[0].2),
        (Some(SERVICE), ErrorCode::AlreadyRegistered)
    );
    assert!(p.close_of(conn_b).is_some());
    assert!(p.gw_registered(conn_b).is_empty());

    // A is untouched and keeps serving.
    p.run_for(ms(1000));
    assert!(p.session_ended(conn_a).is_empty());
    assert!(p.closed(a).is_none());
    p.client(1, SERVICE).unwrap();
    p.settle();
    assert_eq!(p.connects(a).len(), 1);
    assert!(p.connects(b).is_empty());
    let r = p.connects(a)[0].clone();
    assert_eq!(p.redeem(&r.hello, false).unwrap().client, ClientId(1));

    // A goes silent. Just before dead_after passes another agent is still refused.
    p.blackhole(a);
    let last = p.sides[a].last_gw_rx.unwrap();
    let dead_after = p.timing.dead_after;
    p.run_until(last + dead_after - ms(50));
    let b2 = p.agent(SERVICE, password_key(), [4; 32]);
    p.run_until(last + dead_after - ms(1));
    assert!(
        matches!(
            p.closed(b2),
            Some((
                _,
                AgentError::Refused {
                    code: ErrorCode::AlreadyRegistered,
                    ..
                }
            ))
        ),
        "{:?}",
        p.closed(b2)
    );
    assert!(p.session_ended(conn_a).is_empty());

    p.run_until(last + dead_after);
    assert_eq!(p.session_ended(conn_a).len(), 1);
    assert!(!p.gw.is_online(SERVICE));

    // C takes over with a new session.
    let c = p.agent(SERVICE, password_key(), [3; 32]);
    p.settle();
    let sid_c = p.registered(c).expect("C registers once A is dead");
    assert_ne!(sid_c, sid_a);
    assert_eq!(p.gw_registered(p.sides[c].conn).len(), 1);
    assert!(p.gw.is_online(SERVICE));
    p.client(2, SERVICE).unwrap();
    p.settle();
    assert_eq!(p.connects(c).len(), 1, "clients now go to C");
    assert_eq!(p.connects(a).len(), 1, "and not to A");
}

/// Spec section 9: a HELLO for a service whose registered connection has already been silent
/// for dead_after replaces it on the spot, whether or not the gateway's timer ran first (the
/// runtime's select! may read the socket before the timer at the same instant).
#[test]
fn takeover_at_dead_after_does_not_depend_on_timer_order() {
    let mut p = Pair::simple(false);
    let (a, sid_a) = p.registered_agent([1; 32]);
    p.client(1, SERVICE).unwrap();
    p.settle();
    assert_eq!(p.connects(a).len(), 1);
    p.blackhole(a);
    let last = p.sides[a].last_gw_rx.unwrap();
    let dead_after = p.timing.dead_after;
    // Just before A's deadline, C connects.
    p.run_until(last + dead_after - ms(5));
    let c = p.agent(SERVICE, password_key(), [3; 32]);
    // C's HELLO is read 10ms after A's deadline, *before* the gateway's timer runs.
    let t = last + dead_after + ms(10);
    p.now = t;
    let bytes: Vec<u8> = p.sides[c]
        .up
        .queue
        .drain(..)
        .flat_map(|(_, i)| match i {
            Item::Bytes(b) => b,
            Item::Eof => Vec::new(),
        })
        .collect();
    p.deliver_to_gateway(c, Item::Bytes(bytes));
    p.drain();
    // A was replaced right there: session ended without an ERROR, its client failed.
    let conn_a = p.sides[a].conn;
    let ended = p.session_ended(conn_a);
    assert_eq!(ended.len(), 1, "{:?}", p.gw_events);
    assert_eq!((ended[0].0, ended[0].1), (t, sid_a));
    assert!(ended[0].2.contains("replaced"), "{}", ended[0].2);
    assert_eq!(p.close_of(conn_a), Some(t));
    assert_eq!(p.failed_for(ClientId(1)), vec![(t, ErrorCode::SessionGone)]);
    assert_eq!(last_error_frame(&p.sides[a].down.frames(0)), None);
    p.fire_timers();
    p.settle();
    let sid_c = p.registered(c).unwrap_or_else(|| {
        panic!(
            "C refused although A was silent for {:?}: {:?}",
            t - last,
            p.closed(c)
        )
    });
    assert_ne!(sid_c, sid_a);
    assert_eq!(
        p.session_ended(conn_a).len(),
        1,
        "A ended once, not again by its timer"
    );
    p.client(2, SERVICE).unwrap();
    p.settle();
    assert_eq!(p.connects(c).len(), 1);
}

/// The same boundary one millisecond earlier: A is alive, C is refused, A is undisturbed.
#[test]
fn takeover_one_ms_before_dead_after_is_refused() {
    let mut p = Pair::simple(false);
    let (a, _) = p.registered_agent([1; 32]);
    p.blackhole(a);
    let last = p.sides[a].last_gw_rx.unwrap();
    let dead_after = p.timing.dead_after;
    p.run_until(last + dead_after - ms(10));
    let c = p.agent(SERVICE, password_key(), [3; 32]);
    p.now = last + dead_after - ms(1);
    let bytes: Vec<u8> = p.sides[c]
        .up
        .queue
        .drain(..)
        .flat_map(|(_, i)| match i {
            Item::Bytes(b) => b,
            Item::Eof => Vec::new(),
        })
        .collect();
    p.deliver_to_gateway(c, Item::Bytes(bytes));
    p.drain();
    p.fire_timers();
    let conn_a = p.sides[a].conn;
    let rej = p.rejected(p.sides[c].conn);
    assert_eq!(
        rej.iter().map(|r| r.2).collect::<Vec<_>>(),
        vec![ErrorCode::AlreadyRegistered]
    );
    assert!(
        p.session_ended(conn_a).is_empty(),
        "A is still alive 1ms before dead_after"
    );
    p.settle();
    assert!(
        matches!(
            p.closed(c),
            Some((
                _,
                AgentError::Refused {
                    code: ErrorCode::AlreadyRegistered,
                    ..
                }
            ))
        ),
        "{:?}",
        p.closed(c)
    );
    // A dies by its own timer, exactly at dead_after.
    let ended = p.session_ended(conn_a);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].0, last + dead_after);
}

// ---------------------------------------------------------------------------------------------
// 5. Wrong password and unknown service look the same
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_password_and_unknown_service_get_the_same_refusal() {
    let mut p = Pair::new(
        vec![
            service(SERVICE, password_key(), false),
            service("api", PasswordKey::from_bytes([0x11; 32]), false),
        ],
        [7; 32],
        Link::new(3, &[2, 9, 64]),
    );
    let wrong = p.agent(SERVICE, PasswordKey::from_bytes([0x55; 32]), [1; 32]);
    let unknown = p.agent("nope", password_key(), [2; 32]);
    // The right password of another service is a wrong password too.
    let crossed = p.agent(SERVICE, PasswordKey::from_bytes([0x11; 32]), [3; 32]);
    p.settle();

    let (t_w, e_w) = p.closed(wrong).expect("wrong password refused");
    let (t_u, e_u) = p.closed(unknown).expect("unknown service refused");
    let (_, e_c) = p.closed(crossed).expect("crossed password refused");
    let AgentError::Refused { code, .. } = &e_w else {
        panic!("{e_w:?}")
    };
    assert_eq!(*code, ErrorCode::AuthFailed);
    assert_eq!(
        e_w, e_u,
        "unknown service and wrong password must be indistinguishable"
    );
    assert_eq!(e_w, e_c);
    assert_eq!(t_w - p.sides[wrong].started, t_u - p.sides[unknown].started);
    // Byte for byte the same answer on the wire.
    assert_eq!(
        p.sides[wrong]
            .down
            .frames(0)
            .into_iter()
            .map(|(_, m)| m)
            .collect::<Vec<_>>(),
        p.sides[unknown]
            .down
            .frames(0)
            .into_iter()
            .map(|(_, m)| m)
            .collect::<Vec<_>>()
    );
    assert_eq!(p.sides[wrong].down.frames(0).len(), 1);
    // An ERROR is never answered: each refused agent wrote only its preamble and HELLO.
    for i in [wrong, unknown, crossed] {
        assert_eq!(p.sides[i].up.sent.len(), 1);
    }

    for (i, svc) in [(wrong, SERVICE), (unknown, "nope"), (crossed, SERVICE)] {
        let conn = p.sides[i].conn;
        let rej = p.rejected(conn);
        assert_eq!(rej.len(), 1);
        assert_eq!(
            (rej[0].1.as_deref(), rej[0].2),
            (Some(svc), ErrorCode::AuthFailed)
        );
        assert!(p.close_of(conn).is_some());
        assert!(p.gw_registered(conn).is_empty());
    }
    assert!(!p.gw.is_online(SERVICE));
    assert_eq!(p.gw.control_connections(), 0);

    // No lockout: the right password still works.
    let _ = p.registered_agent([4; 32]);
}

// ---------------------------------------------------------------------------------------------
// 6. Proofs are bound to the TLS channel
// ---------------------------------------------------------------------------------------------

#[test]
fn relay_terminating_tls_is_refused() {
    let mut p = Pair::simple(false);
    // The agent's TLS session ends at the relay (exporter X), the relay's own TLS session to
    // the gateway has exporter Y; the relay forwards bytes verbatim.
    let mut spec = AgentSpec::new(SERVICE, password_key(), [0xAA; 32]);
    spec.exporter_gw = [0xBB; 32];
    let a = p.add_agent(spec);
    p.settle();
    let (_, err) = p.closed(a).expect("refused");
    assert!(
        matches!(
            err,
            AgentError::Refused {
                code: ErrorCode::AuthFailed,
                ..
            }
        ),
        "{err:?}"
    );
    let rej = p.rejected(p.sides[a].conn);
    assert_eq!(rej.len(), 1);
    assert_eq!(rej[0].2, ErrorCode::AuthFailed);
    assert!(!p.gw.is_online(SERVICE));
    assert!(p.registered(a).is_none());

    // Control: the same agent on a genuine channel is accepted.
    let _ = p.registered_agent([0xAA; 32]);
}

#[test]
fn welcome_from_another_channel_is_rejected_by_the_agent() {
    let key = password_key();
    let t0 = epoch();
    let welcome_for = |channel: [u8; 32]| {
        let mut agent =
            AgentControl::new(t0, SERVICE, &key, &[0xAA; 32], [5; 32], &timing(), SOFTWARE);
        let first = agent.poll_transmit().expect("preamble and HELLO");
        let mut input = &first[wire::PREAMBLE_LEN..];
        let Ok(Some(Message::Hello(h))) = FrameDecoder::new().decode(&mut input) else {
            panic!("no HELLO")
        };
        // What a genuine gateway would answer on `channel`.
        let keys = SessionKeys::derive(&key, &channel);
        let proof = keys.gateway_proof(SERVICE, &h.agent_nonce, &[6; 32], &h.proof, 77);
        let w = Message::Welcome(Welcome {
            gateway_nonce: [6; 32],
            proof,
            session_id: 77,
            heartbeat_ms: 200,
            dead_after_ms: 600,
            flags: 0,
        });
        agent.handle_input(t0 + ms(1), &w.to_frame());
        (agent.poll_event(), agent.poll_transmit())
    };
    // Relayed from the gateway's TLS session with the relay: refused, silently.
    let (ev, tx) = welcome_for([0xBB; 32]);
    assert_eq!(
        ev,
        Some(AgentEvent::Closed(AgentError::GatewayProofInvalid))
    );
    assert_eq!(tx, None, "nothing is said to an impostor");
    // Same channel: accepted (so the check above can fail).
    let (ev, _) = welcome_for([0xAA; 32]);
    assert!(
        matches!(ev, Some(AgentEvent::Registered { session_id: 77, .. })),
        "{ev:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. One-time tokens
// ---------------------------------------------------------------------------------------------

#[test]
fn unredeemed_token_expires_at_token_ttl() {
    let mut p = Pair::simple(false);
    let (a, _) = p.registered_agent([1; 32]);
    let t0 = p.now;
    p.client(1, SERVICE).unwrap();
    p.settle();
    let req = p.connects(a)[0].clone();
    let ttl = p.timing.token_ttl;
    p.run_until(t0 + ttl - ms(1));
    assert!(p.failed.is_empty());
    assert_eq!(p.gw.pending_clients(), 1);
    p.run_until(t0 + ttl + ms(100));
    assert_eq!(
        p.failed,
        vec![(t0 + ttl, ClientId(1), ErrorCode::TokenExpired)]
    );
    assert_eq!(p.gw.pending_clients(), 0);
    let err = p.redeem(&req.hello, false).unwrap_err();
    assert_eq!(err.code, ErrorCode::TokenInvalid);
    assert_eq!(p.failed.len(), 1, "no second failure");
    assert!(p.closed(a).is_none(), "the session is unaffected");
    assert!(p.gw.is_online(SERVICE));
}

#[test]
fn token_expiry_boundary_is_the_same_with_or_without_the_timer() {
    let mut p = Pair::simple(false);
    let (a, _) = p.registered_agent([1; 32]);
    let t0 = p.now;
    p.client(1, SERVICE).unwrap();
    p.client(2, SERVICE).unwrap();
    p.settle();
    let reqs = p.connects(a);
    let ttl = p.timing.token_ttl;
    p.run_until(t0 + ttl - ms(1));
    // 1ms before expiry: still good.
    let r1 = reqs
        .iter()
        .find(|r| p.client_of(r) == ClientId(1))
        .unwrap()
        .clone();
    assert_eq!(p.redeem(&r1.hello, false).unwrap().client, ClientId(1));
    // At the expiry instant, before the timer ran: refused as expired, client failed once.
    p.now = t0 + ttl;
    let r2 = reqs
        .iter()
        .find(|r| p.client_of(r) == ClientId(2))
        .unwrap()
        .clone();
    assert_eq!(
        p.redeem(&r2.hello, false).unwrap_err().code,
        ErrorCode::TokenExpired
    );
    assert_eq!(
        p.failed_for(ClientId(2)),
        vec![(t0 + ttl, ErrorCode::TokenExpired)]
    );
    p.fire_timers();
    p.run_for(ms(100));
    assert_eq!(p.failed.len(), 1);
}

#[test]
fn token_of_an_ended_session_is_refused() {
    let mut p = Pair::simple(false);
    let (a, _) = p.registered_agent([1; 32]);
    p.client(1, SERVICE).unwrap();
    p.settle();
    let req = p.connects(a)[0].clone();
    p.agent_close(a, ErrorCode::ShuttingDown);
    p.settle();
    let conn = p.sides[a].conn;
    let ended = p.session_ended(conn);
    assert_eq!(ended.len(), 1);
    assert_eq!(
        p.failed_for(ClientId(1)),
        vec![(ended[0].0, ErrorCode::SessionGone)]
    );
    // The code deletes the session's tokens when it ends, so the hello is simply unknown.
    let err = p.redeem(&req.hello, false).unwrap_err();
    assert_eq!(err.code, ErrorCode::TokenInvalid);
    // Still refused once another session is registered for the service.
    let (_, sid2) = p.registered_agent([2; 32]);
    assert_ne!(sid2, req.hello.session_id);
    assert_eq!(
        p.redeem(&req.hello, false).unwrap_err().code,
        ErrorCode::TokenInvalid
    );
    let mut moved = req.hello.clone();
    moved.session_id = sid2;
    assert_eq!(
        p.redeem(&moved, false).unwrap_err().code,
        ErrorCode::TokenInvalid
    );
    assert_eq!(p.failed.len(), 1);
}

#[test]
fn wrong_token_is_refused_and_burns_the_request() {
    let mut p = Pair::new(
        vec![
            service(SERVICE, password_key(), false),
            service("api", PasswordKey::from_bytes([0x11; 32]), false),
        ],
        [9; 32],
        Link::new(2, &[5, 1, 33]),
    );
    let (a, _) = p.registered_agent([1; 32]);
    let api = p.agent("api", PasswordKey::from_bytes([0x11; 32]), [2; 32]);
    p.settle();
    let api_sid = p.registered(api).expect("api registered");
    for id in 1..=4 {
        p.client(id, SERVICE).unwrap();
    }
    p.client(5, "api").unwrap();
    p.settle();
    let reqs = p.connects(a);
    let by_client = |p: &Pair, c: u64| {
        reqs.iter()
            .find(|r| p.client_of(r) == ClientId(c))
            .unwrap()
            .clone()
    };

    // A flipped bit in the token.
    let r1 = by_client(&p, 1);
    let mut bad = r1.hello.clone();
    bad.token[17] ^= 0x04;
    assert_eq!(
        p.redeem(&bad, false).unwrap_err().code,
        ErrorCode::TokenInvalid
    );
    assert_eq!(
        p.failed_for(ClientId(1))
            .iter()
            .map(|f| f.1)
            .collect::<Vec<_>>(),
        vec![ErrorCode::TokenInvalid]
    );
    // The genuine hello no longer works: the request was deleted on the first attempt.
    assert_eq!(
        p.redeem(&r1.hello, false).unwrap_err().code,
        ErrorCode::TokenInvalid
    );

    // The right token presented for another service, or another session.
    let r2 = by_client(&p, 2);
    let mut other_service = r2.hello.clone();
    other_service.service = "api".into();
    assert_eq!(
        p.redeem(&other_service, false).unwrap_err().code,
        ErrorCode::TokenInvalid
    );
    assert_eq!(
        p.failed_for(ClientId(2))
            .iter()
            .map(|f| f.1)
            .collect::<Vec<_>>(),
        vec![ErrorCode::TokenInvalid]
    );
    let r3 = by_client(&p, 3);
    let mut other_session = r3.hello.clone();
    other_session.session_id = api_sid;
    assert_eq!(
        p.redeem(&other_session, false).unwrap_err().code,
        ErrorCode::TokenInvalid
    );
    assert_eq!(
        p.failed_for(ClientId(3))
            .iter()
            .map(|f| f.1)
            .collect::<Vec<_>>(),
        vec![ErrorCode::TokenInvalid]
    );

    // Other clients are unaffected.
    let r4 = by_client(&p, 4);
    assert_eq!(p.redeem(&r4.hello, false).unwrap().client, ClientId(4));
    let r5 = p.connects(api)[0].clone();
    assert_eq!(p.redeem(&r5.hello, false).unwrap().client, ClientId(5));
    assert_eq!(p.failed.len(), 3);
    assert_eq!(p.gw.pending_clients(), 0);
}

#[test]
fn client_gone_before_dial_back_kills_the_token() {
    let mut p = Pair::simple(false);
    let (a, _) = p.registered_agent([1; 32]);
    p.client(1, SERVICE).unwrap();
    p.client(2, SERVICE).unwrap();
    p.settle();
    let reqs = p.connects(a);
    p.client_gone(ClientId(1));
    assert_eq!(p.gw.pending_clients(), 1);
    let r1 = reqs
        .iter()
        .find(|r| p.client_of(r) == ClientId(1))
        .unwrap()
        .clone();
    assert_eq!(
        p.redeem(&r1.hello, false).unwrap_err().code,
        ErrorCode::TokenInvalid
    );
    p.run_for(p.timing.token_ttl + ms(100));
    assert!(
        p.failed_for(ClientId(1)).is_empty(),
        "the runtime already knows client 1 is gone"
    );
    assert_eq!(
        p.failed_for(ClientId(2))
            .iter()
            .map(|f| f.1)
            .collect::<Vec<_>>(),
        vec![ErrorCode::TokenExpired]
    );
}

#[test]
fn connect_failed_fails_the_client_but_only_from_the_asked_session() {
    let mut p = Pair::new(
        vec![
            service(SERVICE, password_key(), false),
            service("api", PasswordKey::from_bytes([0x11; 32]), false),
        ],
        [9; 32],
        Link::new(4, &[3, 64]),
    );
    let (a, _) = p.registered_agent([1; 32]);
    let api = p.agent("api", PasswordKey::from_bytes([0x11; 32]), [2; 32]);
    p.settle();
    p.client(1, SERVICE).unwrap();
    p.client(2, SERVICE).unwrap();
    p.settle();
    let reqs = p.connects(a);
    let r1 = reqs
        .iter()
        .find(|r| p.client_of(r) == ClientId(1))
        .unwrap()
        .clone();
    let r2 = reqs
        .iter()
        .find(|r| p.client_of(r) == ClientId(2))
        .unwrap()
        .clone();

    // Another service's agent cannot fail web's clients.
    let now = p.now;
    p.sides[api]
        .agent
        .connect_failed(now, r2.request_id, ErrorCode::LocalUnreachable, "nope");
    p.drain();
    p.settle();
    assert!(p.failed.is_empty());

    let now = p.now;
    p.sides[a].agent.connect_failed(
        now,
        r1.request_id,
        ErrorCode::LocalUnreachable,
        "connection refused",
    );
    p.drain();
    let sent_at = p.now;
    p.settle();
    let f = p.failed_for(ClientId(1));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].1, ErrorCode::LocalUnreachable);
    assert_eq!(
        f[0].0,
        sent_at + p.sides[a].up.delay,
        "failed as soon as CONNECT_FAILED arrives"
    );
    assert_eq!(
        p.redeem(&r1.hello, false).unwrap_err().code,
        ErrorCode::TokenInvalid
    );
    assert_eq!(p.redeem(&r2.hello, false).unwrap().client, ClientId(2));
    assert!(p.closed(a).is_none() && p.closed(api).is_none());
}

// ---------------------------------------------------------------------------------------------
// 8. data_tls
// ---------------------------------------------------------------------------------------------

#[test]
fn data_tls_service_refuses_plain_data_connections() {
    let mut p = Pair::simple(true);
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    p.settle();
    assert!(
        p.sides[a]
            .events
            .iter()
            .any(|(_, e)| matches!(e, AgentEvent::Registered { data_tls: true, .. })),
        "WELCOME announces data_tls: {:?}",
        p.sides[a].events
    );
    p.client(1, SERVICE).unwrap();
    p.client(2, SERVICE).unwrap();
    p.settle();
    let reqs = p.connects(a);
    assert!(reqs.iter().all(|r| r.data_tls));
    let r1 = reqs
        .iter()
        .find(|r| p.client_of(r) == ClientId(1))
        .unwrap()
        .clone();
    let r2 = reqs
        .iter()
        .find(|r| p.client_of(r) == ClientId(2))
        .unwrap()
        .clone();
    assert_eq!(
        p.redeem(&r1.hello, false).unwrap_err().code,
        ErrorCode::DataTlsRequired
    );
    assert_eq!(
        p.failed_for(ClientId(1))
            .iter()
            .map(|f| f.1)
            .collect::<Vec<_>>(),
        vec![ErrorCode::DataTlsRequired]
    );
    assert_eq!(p.redeem(&r2.hello, true).unwrap().client, ClientId(2));

    // A service without data_tls accepts both.
    let mut q = Pair::simple(false);
    let b = q.agent(SERVICE, password_key(), [1; 32]);
    q.settle();
    q.client(1, SERVICE).unwrap();
    q.client(2, SERVICE).unwrap();
    q.settle();
    let reqs = q.connects(b);
    assert!(reqs.iter().all(|r| !r.data_tls));
    assert!(q.redeem(&reqs[0].hello, true).is_ok());
    assert!(q.redeem(&reqs[1].hello, false).is_ok());
    assert!(q.failed.is_empty());
}

// ---------------------------------------------------------------------------------------------
// 9. Random operations against a model (the driver checks poll_timeout on every step)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Client,
    Redeem(usize, bool),
    Corrupt(usize, u8),
    Gone(usize),
    ConnectFailed(usize),
    Advance(u64),
    Blackhole,
    Close,
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Client),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(i, t)| Op::Redeem(i, t)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Op::Corrupt(i, b)),
        1 => any::<usize>().prop_map(Op::Gone),
        1 => any::<usize>().prop_map(Op::ConnectFailed),
        3 => (1u64..=700).prop_map(Op::Advance),
        1 => Just(Op::Blackhole),
        1 => Just(Op::Close),
        2 => Just(Op::Reconnect),
    ]
}

const MODEL_MAX_PENDING: usize = 4;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_every_client_accounted_for(
        ops in prop::collection::vec(op(), 1..40),
        data_tls in any::<bool>(),
        l in link(),
        seed in any::<[u8; 32]>(),
    ) {
        let mut cfg = service(SERVICE, password_key(), data_tls);
        cfg.max_pending = MODEL_MAX_PENDING;
        let mut p = Pair::new(vec![cfg], seed, l);
        let mut exporter = 0u8;
        let mut next_client = 0u64;
        let mut reconnect = |p: &mut Pair| {
            exporter = exporter.wrapping_add(1);
            p.agent(SERVICE, password_key(), [exporter; 32])
        };
        reconnect(&mut p);
        p.settle();

        let current = |p: &Pair| {
            (0..p.sides.len()).rev().find(|&i| !p.sides[i].agent_dropped && !p.sides[i].up.blackholed && p.registered(i).is_some())
        };
        let pending = |p: &Pair| p.issued.keys().filter(|c| p.is_pending(**c)).count();

        for op in ops {
            match op.clone() {
                Op::Client => {
                    let id = next_client;
                    next_client += 1;
                    let online = p.gw.is_online(SERVICE);
                    let before = pending(&p);
                    match p.client(id, SERVICE) {
                        Ok(()) => assert!(online && before < MODEL_MAX_PENDING),
                        Err(ClientReject::AgentOffline(_)) => assert!(!online),
                        Err(ClientReject::Overloaded { pending: n, .. }) => {
                            assert!(online);
                            assert_eq!((n, before), (MODEL_MAX_PENDING, MODEL_MAX_PENDING));
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                Op::Redeem(i, _) | Op::Corrupt(i, _) if !p.all_connects().is_empty() => {
                    let reqs = p.all_connects();
                    let req = reqs[i % reqs.len()].clone();
                    let client = p.client_of(&req);
                    let was_pending = p.is_pending(client);
                    let failed_before = p.failed.len();
                    let mut hello = req.hello.clone();
                    let (corrupt, tls) = match op {
                        Op::Corrupt(_, bit) => {
                            hello.token[usize::from(bit / 8) % 32] ^= 1 << (bit % 8);
                            (true, true)
                        }
                        Op::Redeem(_, tls) => (false, tls),
                        _ => unreachable!(),
                    };
                    let r = p.redeem(&hello, tls);
                    assert!(!p.is_pending(client), "a hello deletes its request whatever the outcome");
                    match (&r, was_pending) {
                        (Ok(paired), true) => {
                            assert!(!corrupt && (tls || !data_tls));
                            assert_eq!(paired.client, client);
                            assert_eq!(paired.request_id, req.request_id);
                        }
                        (Ok(_), false) => panic!("redeemed a token whose client was already resolved"),
                        (Err(e), true) => {
                            let want = if corrupt { ErrorCode::TokenInvalid } else { ErrorCode::DataTlsRequired };
                            assert!(corrupt || (data_tls && !tls), "refused {e}");
                            assert_eq!(e.code, want);
                            assert_eq!(p.failed.len(), failed_before + 1);
                            assert_eq!(p.failed.last().map(|f| (f.1, f.2)), Some((client, want)));
                        }
                        (Err(e), false) => {
                            assert_eq!(e.code, ErrorCode::TokenInvalid);
                            assert_eq!(p.failed.len(), failed_before);
                        }
                    }
                }
                Op::Redeem(..) | Op::Corrupt(..) => {}
                Op::Gone(i) => {
                    if !p.issued.is_empty() {
                        let c = *p.issued.keys().nth(i % p.issued.len()).unwrap();
                        p.client_gone(c);
                        assert!(!p.is_pending(c));
                    }
                }
                Op::ConnectFailed(i) => {
                    if let Some(s) = current(&p) {
                        let reqs = p.connects(s);
                        if !reqs.is_empty() {
                            let req = &reqs[i % reqs.len()];
                            let client = p.client_of(req);
                            let now = p.now;
                            p.sides[s].agent.connect_failed(now, req.request_id, ErrorCode::LocalUnreachable, "refused");
                            p.drain();
                            p.settle();
                            assert!(!p.is_pending(client));
                        }
                    }
                }
                Op::Advance(n) => p.run_for(ms(n)),
                Op::Blackhole => {
                    if let Some(s) = current(&p) {
                        p.blackhole(s);
                    }
                }
                Op::Close => {
                    if let Some(s) = current(&p) {
                        p.agent_close(s, ErrorCode::ShuttingDown);
                    }
                }
                Op::Reconnect => {
                    if !p.sides.iter().any(|s| !s.agent_dropped && !s.up.blackholed) {
                        let i = reconnect(&mut p);
                        p.settle();
                        let ok = p.registered(i).is_some();
                        let refused = matches!(p.closed(i), Some((_, AgentError::Refused { code: ErrorCode::AlreadyRegistered, .. })));
                        assert!(ok ^ refused, "new agent: {:?}", p.sides[i].events);
                    }
                }
            }
            p.settle();
            assert_eq!(p.gw.pending_clients(), pending(&p), "gateway and model disagree on pending clients");
            // The gateway's registration matches its events.
            let online = p.sides.iter().any(|s| !p.gw_registered(s.conn).is_empty() && p.session_ended(s.conn).is_empty());
            assert_eq!(p.gw.is_online(SERVICE), online);
        }

        // Every client ends up resolved exactly once; expiries happen at exactly token_ttl.
        p.run_for(p.timing.token_ttl + p.timing.dead_after + ms(100));
        assert_eq!(p.gw.pending_clients(), 0);
        for (c, issued) in &p.issued {
            assert!(p.outcomes.contains_key(c), "{c:?} never resolved");
            for (t, code) in p.failed_for(*c) {
                if code == ErrorCode::TokenExpired {
                    assert_eq!(t, *issued + p.timing.token_ttl);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 10. Malformed input on control connections
// ---------------------------------------------------------------------------------------------

/// Strategy for hostile bytes: pure noise, known frame types with random payloads, oversized
/// headers, and valid harmless frames followed by any of these.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    let noise = prop::collection::vec(any::<u8>(), 1..200);
    let typed = (
        prop_oneof![0u8..=0x12, 0x80u8..=0xff],
        prop::collection::vec(any::<u8>(), 0..120),
        any::<bool>(),
    )
        .prop_map(|(ty, payload, honest_len)| {
            let len = if honest_len {
                payload.len() as u16
            } else {
                (payload.len() as u16).wrapping_mul(3)
            };
            let mut v = vec![ty];
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(&payload);
            v
        });
    let oversized = (
        any::<u8>(),
        (MAX_FRAME_PAYLOAD as u16 + 1)..=u16::MAX,
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(ty, len, tail)| {
            let mut v = vec![ty];
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(&tail);
            v
        });
    let hostile = prop_oneof![noise, typed, oversized];
    let harmless = prop::collection::vec(
        prop_oneof![
            Just(Message::Heartbeat.to_frame()),
            Just(vec![0x90, 0, 2, 1, 2])
        ],
        0..3,
    );
    (harmless, hostile).prop_map(|(h, x)| h.into_iter().flatten().chain(x).collect())
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The connection is closed, with an ERROR frame of this code (or none).
    Close(Option<ErrorCode>),
    /// The bytes end inside a frame: nothing happens until a timer.
    Open,
}

/// What the gateway must do with `bytes` on a connection awaiting HELLO.
fn gateway_verdict_await_hello(bytes: &[u8]) -> Verdict {
    let mut input = bytes;
    match FrameDecoder::new().decode(&mut input) {
        Err(_) => Verdict::Close(Some(ErrorCode::Malformed)),
        Ok(None) => Verdict::Open,
        Ok(Some(Message::Hello(h)))
            if h.service.is_empty() || h.service.len() > wire::MAX_SERVICE_NAME =>
        {
            Verdict::Close(Some(ErrorCode::Malformed))
        }
        Ok(Some(Message::Hello(_))) => Verdict::Close(Some(ErrorCode::AuthFailed)),
        Ok(Some(Message::Error(_))) => Verdict::Close(None),
        Ok(Some(_)) => Verdict::Close(Some(ErrorCode::UnexpectedMessage)),
    }
}

/// What the gateway must do with `bytes` on a registered session with no pending clients.
fn gateway_verdict_registered(bytes: &[u8]) -> Verdict {
    let mut d = FrameDecoder::new();
    let mut input = bytes;
    loop {
        match d.decode(&mut input) {
            Err(_) => return Verdict::Close(Some(ErrorCode::Malformed)),
            Ok(None) => return Verdict::Open,
            Ok(Some(Message::Heartbeat | Message::Ignorable(_) | Message::ConnectFailed(_))) => {}
            Ok(Some(Message::Error(_))) => return Verdict::Close(None),
            Ok(Some(_)) => return Verdict::Close(Some(ErrorCode::UnexpectedMessage)),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum AgentVerdict {
    Closed {
        error: AgentError,
        notice: Option<ErrorCode>,
        connects: usize,
    },
    Open {
        connects: usize,
    },
}

/// What a registered agent must do with `bytes` from the gateway.
fn agent_verdict_registered(bytes: &[u8]) -> AgentVerdict {
    let mut d = FrameDecoder::new();
    let mut input = bytes;
    let mut connects = 0;
    loop {
        let (error, notice) = match d.decode(&mut input) {
            Err(e) => (AgentError::Wire(e), Some(ErrorCode::Malformed)),
            Ok(None) => return AgentVerdict::Open { connects },
            Ok(Some(Message::Heartbeat | Message::Ignorable(_))) => continue,
            Ok(Some(Message::Connect(_))) => {
                connects += 1;
                continue;
            }
            Ok(Some(Message::Error(e))) => (
                AgentError::Refused {
                    code: e.code,
                    message: e.message,
                },
                None,
            ),
            Ok(Some(m)) => (
                AgentError::Unexpected(m.name()),
                Some(ErrorCode::UnexpectedMessage),
            ),
        };
        return AgentVerdict::Closed {
            error,
            notice,
            connects,
        };
    }
}

fn last_error_frame(frames: &[(Instant, Message)]) -> Option<ErrorCode> {
    frames.iter().rev().find_map(|(_, m)| match m {
        Message::Error(e) => Some(e.code),
        _ => None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn garbage_instead_of_hello(bytes in garbage(), l in link()) {
        let mut p = Pair::new(vec![service(SERVICE, password_key(), false)], [1; 32], l);
        let a = p.agent(SERVICE, password_key(), [1; 32]);
        // The agent's own HELLO never arrives; an attacker's bytes do, after a real preamble.
        p.sides[a].up.blackhole();
        let mut raw = wire::encode_preamble(wire::ConnKind::Control).to_vec();
        raw.extend_from_slice(&bytes);
        let now = p.now;
        p.sides[a].up.inject(now, raw);
        p.settle();
        let conn = p.sides[a].conn;
        let opened = p.sides[a].opened_at.expect("preamble classified as control");
        let verdict = gateway_verdict_await_hello(&bytes);
        match verdict {
            Verdict::Close(code) => {
                let closed = p.close_of(conn).expect("connection closed");
                assert_eq!(closed, p.sides[a].last_gw_rx.unwrap(), "closed as soon as the bad frame arrived");
                let frames = p.sides[a].down.frames(0);
                assert_eq!(frames.len(), usize::from(code.is_some()), "{frames:?}");
                assert_eq!(last_error_frame(&frames), code);
                let rej = p.rejected(conn);
                match code {
                    Some(c) => {
                        assert_eq!(rej.len(), 1);
                        assert_eq!(rej[0].2, c);
                        // The agent end reads the refusal.
                        let (_, err) = p.closed(a).expect("agent read the ERROR");
                        assert!(matches!(err, AgentError::Refused { code: got, .. } if got == c), "{err:?}");
                    }
                    None => assert!(rej.is_empty()),
                }
            }
            Verdict::Open => {
                assert_eq!(p.close_of(conn), None);
                p.run_for(p.timing.handshake_timeout + ms(100));
                assert_eq!(p.close_of(conn), Some(opened + p.timing.handshake_timeout));
                assert_eq!(last_error_frame(&p.sides[a].down.frames(0)), Some(ErrorCode::Timeout));
                assert_eq!(p.rejected(conn).iter().map(|r| r.2).collect::<Vec<_>>(), vec![ErrorCode::Timeout]);
            }
        }
        assert!(p.gw_registered(conn).is_empty());
        assert_eq!(p.gw.control_connections(), 0);
    }

    #[test]
    fn garbage_on_a_registered_session_to_the_gateway(bytes in garbage(), l in link()) {
        let mut p = Pair::new(vec![service(SERVICE, password_key(), false)], [2; 32], l);
        let (a, sid) = p.registered_agent([1; 32]);
        p.run_for(ms(50));
        p.sides[a].up.blackhole(); // the agent's own heartbeats are lost from now on
        let now = p.now;
        p.sides[a].up.inject(now, bytes.clone());
        let conn = p.sides[a].conn;
        p.settle();
        let rx = p.sides[a].last_gw_rx.unwrap();
        match gateway_verdict_registered(&bytes) {
            Verdict::Close(code) => {
                let ended = p.session_ended(conn);
                assert_eq!(ended.len(), 1, "{:?}", p.gw_events);
                assert_eq!((ended[0].0, ended[0].1), (rx, sid));
                assert_eq!(p.close_of(conn), Some(rx));
                let frames = p.sides[a].down.frames(0);
                assert_eq!(last_error_frame(&frames), code);
                p.run_for(ms(100));
                match code {
                    Some(c) => {
                        let (_, err) = p.closed(a).expect("agent read the ERROR");
                        assert!(matches!(err, AgentError::Refused { code: got, .. } if got == c), "{err:?}");
                    }
                    None => assert!(p.sides[a].agent_eof_at.is_some()),
                }
            }
            Verdict::Open => {
                p.run_for(p.timing.dead_after + ms(100));
                let ended = p.session_ended(conn);
                assert_eq!(ended.len(), 1);
                assert_eq!(ended[0].0, rx + p.timing.dead_after, "dead_after counts from the last bytes read");
                assert_eq!(last_error_frame(&p.sides[a].down.frames(0)), None);
            }
        }
        assert!(!p.gw.is_online(SERVICE));
    }

    #[test]
    fn garbage_on_a_registered_session_to_the_agent(bytes in garbage(), l in link()) {
        let mut p = Pair::new(vec![service(SERVICE, password_key(), false)], [3; 32], l);
        let (a, _) = p.registered_agent([1; 32]);
        p.run_for(ms(50));
        p.sides[a].down.blackhole(); // the gateway's own heartbeats are lost from now on
        let now = p.now;
        p.sides[a].down.inject(now, bytes.clone());
        let conn = p.sides[a].conn;
        p.settle();
        let rx = p.sides[a].last_agent_rx.unwrap();
        match agent_verdict_registered(&bytes) {
            AgentVerdict::Closed { error, notice, connects } => {
                let (t, err) = p.closed(a).expect("agent closed");
                assert_eq!(t, rx);
                assert_eq!(err, error);
                assert_eq!(p.connects(a).len(), connects);
                let frames = p.sides[a].up.frames(wire::PREAMBLE_LEN);
                assert_eq!(last_error_frame(&frames), notice);
                // The gateway learns of it (ERROR or EOF) and ends the session.
                p.run_for(ms(100));
                let ended = p.session_ended(conn);
                assert_eq!(ended.len(), 1);
                if notice.is_some() {
                    assert!(ended[0].2.starts_with("agent sent error"), "{}", ended[0].2);
                }
            }
            AgentVerdict::Open { connects } => {
                assert_eq!(p.connects(a).len(), connects);
                assert!(p.closed(a).is_none());
                p.run_for(p.timing.dead_after + ms(100));
                let (t, err) = p.closed(a).expect("agent gave up on the silent gateway");
                assert_eq!(err, AgentError::PeerDead(p.timing.dead_after));
                assert_eq!(t, rx + p.timing.dead_after);
            }
        }
    }
}

#[test]
fn oversized_frame_header_is_malformed_in_every_state() {
    let header = [msg_type::HELLO, 0x10, 0x01]; // 4097 bytes announced
    assert_eq!(
        gateway_verdict_await_hello(&header),
        Verdict::Close(Some(ErrorCode::Malformed))
    );

    // Before HELLO.
    let mut p = Pair::simple(false);
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    p.sides[a].up.blackhole();
    let mut raw = wire::encode_preamble(wire::ConnKind::Control).to_vec();
    raw.extend_from_slice(&header);
    let now = p.now;
    p.sides[a].up.inject(now, raw);
    p.settle();
    let (_, err) = p.closed(a).expect("refused");
    assert!(
        matches!(
            err,
            AgentError::Refused {
                code: ErrorCode::Malformed,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(p.rejected(p.sides[a].conn)[0].2, ErrorCode::Malformed);

    // On a registered session, with a client waiting: the client fails with the session.
    let (b, _) = p.registered_agent([2; 32]);
    p.client(1, SERVICE).unwrap();
    p.settle();
    p.sides[b].up.blackhole();
    let now = p.now;
    p.sides[b]
        .up
        .inject(now, vec![msg_type::HEARTBEAT, 0xff, 0xff]);
    p.settle();
    let (_, err) = p.closed(b).expect("closed");
    assert!(
        matches!(
            err,
            AgentError::Refused {
                code: ErrorCode::Malformed,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        p.failed_for(ClientId(1))
            .iter()
            .map(|f| f.1)
            .collect::<Vec<_>>(),
        vec![ErrorCode::SessionGone]
    );
    assert!(!p.gw.is_online(SERVICE));

    // And the agent facing an oversized frame from the gateway.
    let (c, _) = p.registered_agent([3; 32]);
    p.sides[c].down.blackhole();
    let now = p.now;
    p.sides[c]
        .down
        .inject(now, vec![msg_type::CONNECT, 0x20, 0x00]);
    p.settle();
    let (_, err) = p.closed(c).expect("closed");
    assert_eq!(err, AgentError::Wire(WireError::FrameTooLarge(0x2000)));
    assert_eq!(
        last_error_frame(&p.sides[c].up.frames(wire::PREAMBLE_LEN)),
        Some(ErrorCode::Malformed)
    );
}

#[test]
fn handshake_timeouts_on_both_ends() {
    let mut p = Pair::simple(false);
    // Gateway side: a preamble and then nothing.
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    p.sides[a].up.blackhole();
    let now = p.now;
    p.sides[a]
        .up
        .inject(now, wire::encode_preamble(wire::ConnKind::Control).to_vec());
    p.settle();
    let opened = p.sides[a].opened_at.unwrap();
    let conn = p.sides[a].conn;
    p.run_for(p.timing.handshake_timeout + ms(100));
    assert_eq!(p.close_of(conn), Some(opened + p.timing.handshake_timeout));
    assert_eq!(
        p.rejected(conn).iter().map(|r| r.2).collect::<Vec<_>>(),
        vec![ErrorCode::Timeout]
    );
    // The agent (whose HELLO was lost) gives up on its own at the same deadline.
    let (t, err) = p.closed(a).expect("agent timed out");
    assert_eq!(
        err,
        AgentError::HandshakeTimeout(p.timing.handshake_timeout)
    );
    assert_eq!(t, p.sides[a].started + p.timing.handshake_timeout);
    assert_eq!(p.sides[a].up.sent.len(), 1, "the agent closes silently");
    assert_eq!(p.gw.control_connections(), 0);
}

fn hello_frame(service: &str) -> Vec<u8> {
    Message::Hello(dialback_core::wire::Hello {
        service: service.to_owned(),
        agent_nonce: [1; 32],
        proof: [2; 32],
        software: SOFTWARE.to_owned(),
    })
    .to_frame()
}

/// Spec 7.5 step 2: the service name is 1 to 64 bytes, checked before authentication.
#[test]
fn hello_service_name_bounds() {
    for (name, code) in [
        (String::new(), ErrorCode::Malformed),
        ("x".repeat(wire::MAX_SERVICE_NAME + 1), ErrorCode::Malformed),
        ("x".repeat(wire::MAX_SERVICE_NAME), ErrorCode::AuthFailed),
        (SERVICE.to_owned(), ErrorCode::AuthFailed), // right name, wrong proof
    ] {
        let mut p = Pair::simple(false);
        let a = p.agent(SERVICE, password_key(), [1; 32]);
        p.sides[a].up.blackhole();
        let mut raw = wire::encode_preamble(wire::ConnKind::Control).to_vec();
        raw.extend_from_slice(&hello_frame(&name));
        assert_eq!(
            gateway_verdict_await_hello(&raw[wire::PREAMBLE_LEN..]),
            Verdict::Close(Some(code))
        );
        let now = p.now;
        p.sides[a].up.inject(now, raw);
        p.settle();
        let (_, err) = p.closed(a).expect("refused");
        assert!(
            matches!(&err, AgentError::Refused { code: c, .. } if *c == code),
            "{}-byte name: {err:?}",
            name.len()
        );
        let rej = p.rejected(p.sides[a].conn);
        assert_eq!(rej.len(), 1);
        assert_eq!(rej[0].2, code);
        assert!(!p.gw.is_online(SERVICE));
    }
}

// ---------------------------------------------------------------------------------------------
// Data-connection pool (spec section 11.4)
// ---------------------------------------------------------------------------------------------

const POOL: usize = 3;

fn pooled_pair(max_idle: Duration) -> Pair {
    pool_of(POOL, max_idle)
}

fn pool_of(pool: usize, max_idle: Duration) -> Pair {
    let mut svc = service(SERVICE, password_key(), false);
    svc.pool = pool;
    svc.pool_max_idle = max_idle;
    Pair::new(vec![svc], [7; 32], Link::new(5, &[1, 7, 3, 64, 19]))
}

impl Pair {
    /// Pool requests the agent got and has not answered yet (by redeeming or failing them).
    fn prepares(&self, i: usize, answered: &BTreeMap<u64, ()>) -> Vec<ConnectRequest> {
        self.connects(i)
            .into_iter()
            .filter(|r| r.pooled && !answered.contains_key(&r.request_id))
            .collect()
    }

    /// Redeems every unanswered pool request of agent `i`; returns how many parked.
    fn fill(&mut self, i: usize, answered: &mut BTreeMap<u64, ()>) -> usize {
        self.settle();
        let mut parked = 0;
        for r in self.prepares(i, answered) {
            answered.insert(r.request_id, ());
            match self.redeem_any(&r.hello, false) {
                Ok(DataOutcome::Parked { .. }) => parked += 1,
                o => panic!("pool request not parked: {o:?}"),
            }
        }
        self.settle();
        parked
    }

    /// Like `fill`, for random schedules: requests whose token expired or whose session ended
    /// are refused, and that is fine.
    fn fill_some(&mut self, i: usize, answered: &mut BTreeMap<u64, ()>) {
        self.settle();
        for r in self.prepares(i, answered) {
            answered.insert(r.request_id, ());
            let _ = self.redeem_any(&r.hello, false);
        }
        self.settle();
    }

    /// Drives timers until agent `i` has an unanswered pool request (bounded).
    fn await_prepares(&mut self, i: usize, answered: &BTreeMap<u64, ()>) -> Vec<ConnectRequest> {
        for _ in 0..1000 {
            self.settle();
            let reqs = self.prepares(i, answered);
            if !reqs.is_empty() {
                return reqs;
            }
            let next = self.gw.poll_timeout().expect("a timer is pending");
            self.run_until(next);
        }
        panic!("no pool request within 1000 timer rounds");
    }

    fn pool_failures(&self) -> Vec<(Instant, Duration)> {
        self.gw_events
            .iter()
            .filter_map(|(t, e)| match e {
                GatewayEvent::PoolRequestFailed { retry_in, .. } => Some((*t, *retry_in)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn pool_fills_on_registration_and_serves_clients_without_a_round_trip() {
    let mut p = pooled_pair(Duration::from_secs(60));
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    p.settle();
    assert!(p.registered(a).is_some());
    let mut answered = BTreeMap::new();
    let first = p.prepares(a, &answered);
    assert_eq!(
        first.len(),
        POOL,
        "one PREPARE per pool slot right after WELCOME"
    );
    assert!(first
        .iter()
        .all(|r| r.client.is_none() && r.public.is_none()));
    assert_eq!(p.fill(a, &mut answered), POOL);
    assert_eq!(p.gw.pooled(SERVICE), POOL);
    assert!(
        p.prepares(a, &answered).is_empty(),
        "a full pool asks for nothing"
    );

    // Clients are bound to distinct parked connections, newest first, with no CONNECT.
    let mut got = Vec::new();
    for id in 1..=POOL as u64 {
        match p.client_route(id, SERVICE).unwrap() {
            ClientRoute::Pooled { pooled, .. } => got.push(pooled),
            r => panic!("client {id} not served from the pool: {r:?}"),
        }
    }
    p.settle();
    let mut dedup = got.clone();
    dedup.sort_unstable();
    dedup.dedup();
    assert_eq!(dedup.len(), POOL, "a pooled connection is handed out once");
    assert!(
        p.connects(a).iter().all(|r| r.pooled),
        "no CONNECT while the pool had one"
    );
    // Each use asked for a replacement; with the pool empty the next client is requested.
    assert_eq!(p.prepares(a, &answered).len(), POOL);
    assert_eq!(p.client_route(99, SERVICE).unwrap(), ClientRoute::Requested);
    p.settle();
    let connect = p
        .connects(a)
        .into_iter()
        .find(|r| !r.pooled)
        .expect("a CONNECT for the client that found the pool empty");
    assert_eq!(connect.client, Some(client_addr(99)));
    assert_eq!(p.fill(a, &mut answered), POOL);
    assert_eq!(
        p.redeem(&connect.hello, false).unwrap().client,
        ClientId(99)
    );
    assert_eq!(p.gw.pooled(SERVICE), POOL);
}

#[test]
fn a_pool_of_four_or_more_is_refilled_in_batches_and_topped_up_when_quiet() {
    for (pool, batch) in [(4usize, 2usize), (5, 2), (8, 4)] {
        let mut p = pool_of(pool, Duration::from_secs(60));
        let a = p.agent(SERVICE, password_key(), [1; 32]);
        p.settle();
        let mut answered = BTreeMap::new();
        assert_eq!(p.fill(a, &mut answered), pool, "filled at registration");
        let mut client = 0u64;
        for round in 0..3 {
            for used in 1..=batch {
                client += 1;
                assert!(
                    matches!(
                        p.client_route(client, SERVICE).unwrap(),
                        ClientRoute::Pooled { .. }
                    ),
                    "pool {pool}: client {client} served from the pool"
                );
                p.settle();
                let asked = p.prepares(a, &answered).len();
                if used < batch {
                    assert_eq!(asked, 0, "pool {pool}: {used} used, no refill yet");
                } else {
                    assert_eq!(asked, batch, "pool {pool}: half used, refilled at once");
                }
            }
            assert_eq!(p.fill(a, &mut answered), batch, "round {round}");
            assert_eq!(p.gw.pooled(SERVICE), pool, "full again after round {round}");
        }
        // A pool left short by less than a batch is topped up once it has been short for
        // POOL_TOP_UP, not before (the PREPARE then crosses the test link's latency).
        client += 1;
        let _ = p.client_route(client, SERVICE).unwrap();
        let used_at = p.now;
        p.settle();
        assert!(
            p.prepares(a, &answered).is_empty(),
            "pool {pool}: refilled at once"
        );
        let reqs = p.await_prepares(a, &answered);
        assert_eq!(reqs.len(), 1, "pool {pool}: topped up by one");
        let after = p.now - used_at;
        assert!(
            after >= POOL_TOP_UP && after <= POOL_TOP_UP + ms(200),
            "pool {pool}: topped up after {after:?}"
        );
        assert_eq!(p.fill(a, &mut answered), 1);
        assert_eq!(p.gw.pooled(SERVICE), pool, "pool {pool}: full again");
    }
}

#[test]
fn pool_tokens_are_checked_and_single_use() {
    let mut p = pooled_pair(Duration::from_secs(60));
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    p.settle();
    let reqs = p.prepares(a, &BTreeMap::new());
    let mut forged = reqs[0].hello.clone();
    forged.token[0] ^= 1;
    assert_eq!(
        p.redeem_any(&forged, false).unwrap_err().code,
        ErrorCode::TokenInvalid
    );
    // The forged attempt burned the request: the genuine token is refused too.
    assert_eq!(
        p.redeem_any(&reqs[0].hello, false).unwrap_err().code,
        ErrorCode::TokenInvalid
    );
    assert!(matches!(
        p.redeem_any(&reqs[1].hello, false),
        Ok(DataOutcome::Parked { .. })
    ));
    assert_eq!(
        p.redeem_any(&reqs[1].hello, false).unwrap_err().code,
        ErrorCode::TokenInvalid,
        "a pool token parks one connection only"
    );
    assert_eq!(p.gw.pooled(SERVICE), 1);
    assert_eq!(
        p.pool_failures().len(),
        1,
        "the forged token counts as a failure"
    );
    assert!(p.failed.is_empty(), "no client was involved");
}

#[test]
fn pooled_connections_age_out_and_are_replaced() {
    let max_idle = ms(5000);
    let mut p = pooled_pair(max_idle);
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    p.settle();
    let mut answered = BTreeMap::new();
    p.fill(a, &mut answered);
    let parked_at = p.now;
    p.run_until(parked_at + max_idle - ms(1));
    assert!(p.pool_closed.is_empty());
    p.run_until(parked_at + max_idle);
    assert_eq!(
        p.pool_closed.len(),
        POOL,
        "every connection retired at max_idle"
    );
    assert!(p
        .pool_closed
        .iter()
        .all(|(t, _)| *t == parked_at + max_idle));
    p.settle();
    assert_eq!(p.prepares(a, &answered).len(), POOL, "and replaced at once");
    assert_eq!(p.fill(a, &mut answered), POOL);
    assert!(p.pool_failures().is_empty(), "retirement is not a failure");
    assert!(p.session_ended(p.sides[a].conn).is_empty());
}

#[test]
fn session_end_closes_the_pool_and_voids_its_tokens() {
    let mut p = pooled_pair(Duration::from_secs(60));
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    p.settle();
    let mut answered = BTreeMap::new();
    let reqs = p.prepares(a, &answered);
    // Two park, one is still on its way when the agent goes away.
    for r in &reqs[..2] {
        answered.insert(r.request_id, ());
        assert!(matches!(
            p.redeem_any(&r.hello, false),
            Ok(DataOutcome::Parked { .. })
        ));
    }
    p.agent_close(a, ErrorCode::ShuttingDown);
    p.settle();
    assert_eq!(p.session_ended(p.sides[a].conn).len(), 1);
    assert_eq!(p.pool_closed.len(), 2, "both parked connections closed");
    assert!(p.parked.is_empty());
    assert_eq!(
        p.redeem_any(&reqs[2].hello, false).unwrap_err().code,
        ErrorCode::TokenInvalid
    );
    assert_eq!(p.gw.pooled(SERVICE), 0);
    assert_eq!(
        p.client_route(1, SERVICE),
        Err(ClientReject::AgentOffline(SERVICE.into()))
    );
}

#[test]
fn failing_pool_requests_back_off_exponentially() {
    let mut p = pooled_pair(Duration::from_secs(600));
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    p.settle();
    let mut answered = BTreeMap::new();
    // The agent cannot open data connections: every PREPARE is answered with CONNECT_FAILED.
    for _ in 0..12 {
        let reqs = p.await_prepares(a, &answered);
        for r in reqs {
            answered.insert(r.request_id, ());
            let now = p.now;
            p.sides[a].agent.connect_failed(
                now,
                r.request_id,
                ErrorCode::Internal,
                "gateway unreachable",
            );
        }
        p.settle();
    }
    let delays: Vec<Duration> = p.pool_failures().iter().map(|(_, d)| *d).collect();
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
    assert_eq!(delays[0], ms(250));
    assert_eq!(
        *delays.last().unwrap(),
        Duration::from_secs(30),
        "capped at 30 s"
    );
    // Requests went out no faster than the backoff allowed.
    let sent: Vec<Instant> = p.sides[a]
        .down
        .frames(0)
        .into_iter()
        .filter(|(_, m)| matches!(m, Message::Prepare(_)))
        .map(|(t, _)| t)
        .collect();
    // Each batch went out no earlier than the backoff of the failure before it allowed.
    for (t, retry_in) in p.pool_failures() {
        if let Some(next) = sent.iter().find(|s| **s > t) {
            assert!(
                *next >= t + retry_in,
                "PREPARE {:?} after a failure at {:?} with retry_in {retry_in:?}",
                p.t(*next),
                p.t(t)
            );
        }
    }
    let mut batches = sent.clone();
    batches.dedup();
    let gaps: Vec<Duration> = batches.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|w| w[0] <= w[1] + ms(20)), "{gaps:?}");
    assert!(*gaps.last().unwrap() >= Duration::from_secs(30), "{gaps:?}");

    // Once a pooled connection is used, the pool is healthy again: no more waiting.
    let last = p.pool_failures().last().unwrap().0;
    p.run_until(last + Duration::from_secs(30));
    assert_eq!(p.fill(a, &mut answered), POOL);
    let before = p.sides[a].down.frames(0).len();
    assert!(matches!(
        p.client_route(1, SERVICE),
        Ok(ClientRoute::Pooled { .. })
    ));
    assert!(
        p.sides[a].down.frames(0).len() > before,
        "the used connection is replaced at once"
    );
}

#[test]
fn a_dead_pooled_connection_is_never_handed_out() {
    let mut p = pooled_pair(Duration::from_secs(60));
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    p.settle();
    let mut answered = BTreeMap::new();
    p.fill(a, &mut answered);
    let dead: Vec<u64> = p.parked.keys().copied().collect();
    for id in &dead {
        p.pooled_gone(*id);
    }
    assert_eq!(p.gw.pooled(SERVICE), 0);
    // Reporting it twice, or reporting one that was handed out, changes nothing.
    p.pooled_gone(dead[0]);
    assert_eq!(
        p.client_route(1, SERVICE).unwrap(),
        ClientRoute::Requested,
        "no dead connection is handed to a client"
    );
    assert_eq!(p.pool_failures().len(), POOL);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random interleavings of clients, pool fills, deaths, age-outs and session ends: a
    /// pooled connection is bound at most once, only while parked, and never after it was
    /// closed (the harness asserts each of these as it drives).
    #[test]
    fn pool_operations_keep_their_invariants(
        pool in 1usize..7,
        ops in proptest::collection::vec(0u8..6, 1..60),
    ) {
        let mut p = pool_of(pool, ms(3000));
        let mut a = p.agent(SERVICE, password_key(), [1; 32]);
        p.settle();
        let mut answered = BTreeMap::new();
        let mut next_client = 1u64;
        let mut exporter = 2u8;
        for op in ops {
            match op {
                0 => p.fill_some(a, &mut answered),
                1 | 2 => {
                    let _ = p.client_route(next_client, SERVICE);
                    next_client += 1;
                    p.settle();
                }
                3 => {
                    if let Some(&id) = p.parked.keys().next() {
                        p.pooled_gone(id);
                    }
                }
                4 => p.run_for(ms(1000)),
                _ => {
                    p.agent_close(a, ErrorCode::ShuttingDown);
                    p.settle();
                    prop_assert!(p.parked.is_empty(), "session end leaves nothing parked");
                    a = p.agent(SERVICE, password_key(), [exporter; 32]);
                    exporter = exporter.wrapping_add(1);
                    p.settle();
                }
            }
            prop_assert!(p.gw.pooled(SERVICE) <= pool);
            prop_assert_eq!(p.gw.pooled(SERVICE), p.parked.len());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Access rules and the throttle on failed authentications
// ---------------------------------------------------------------------------------------------

fn with_allow_from(rules: &[&str]) -> Pair {
    let mut svc = service(SERVICE, password_key(), false);
    svc.allow_from = dialback_core::acl::AllowList::parse(rules).unwrap();
    Pair::new(vec![svc], [42; 32], Link::new(5, &[1, 7, 3, 64, 19]))
}

/// Every agent of the harness connects from 192.0.2.1.
#[test]
fn allow_from_decides_before_the_password_is_checked() {
    for (rules, allowed) in [
        (&["192.0.2.1"][..], true),
        (&["192.0.2.0/24"][..], true),
        (&["192.0."][..], true),
        (&["*"][..], true),
        (&["192.0.3.0/24", "198.51.100.1"][..], false),
        (&["192.0.3."][..], false),
        (&["home.example.org"][..], false), // not resolved: matches nothing
    ] {
        let mut p = with_allow_from(rules);
        let a = p.agent(SERVICE, password_key(), [1; 32]);
        p.settle();
        if allowed {
            assert!(p.registered(a).is_some(), "{rules:?}");
            continue;
        }
        let (_, err) = p
            .closed(a)
            .unwrap_or_else(|| panic!("{rules:?}: not refused"));
        assert!(
            matches!(
                &err,
                AgentError::Refused {
                    code: ErrorCode::NotAllowed,
                    ..
                }
            ),
            "{rules:?}: {err:?}"
        );
        let conn = p.sides[a].conn;
        assert_eq!(p.rejected(conn)[0].2, ErrorCode::NotAllowed);
        // The refused agent learns its address was refused, not what the rules are.
        let AgentError::Refused { message, .. } = &err else {
            unreachable!()
        };
        assert_eq!(
            message,
            &format!("192.0.2.1 is not allowed to register service {SERVICE:?}")
        );
        // A refused address learns nothing about the password: a wrong one gets the same.
        let mut q = with_allow_from(rules);
        let b = q.agent(SERVICE, PasswordKey::from_bytes([0x55; 32]), [1; 32]);
        q.settle();
        assert_eq!(q.closed(b).map(|c| c.1), Some(err));
        // And refusals by address do not count as failed authentications.
        assert_eq!(
            q.gw.admission_delay(q.now, p.sides[a].peer.ip()),
            Duration::ZERO
        );
    }
}

#[test]
fn allow_from_by_name_uses_the_addresses_resolved_at_connect_time() {
    let mut p = with_allow_from(&["home.example.org", "10.0.0.0/8"]);
    assert_eq!(p.gw.agent_names(), vec!["home.example.org".to_owned()]);
    let now = p.now;
    p.gw.handle_resolved(now, "home.example.org", vec!["192.0.2.1".parse().unwrap()]);
    // Names in no rule are not kept.
    p.gw.handle_resolved(now, "other.example.org", vec!["192.0.2.1".parse().unwrap()]);
    let _ = p.registered_agent([1; 32]);

    let mut p = with_allow_from(&["home.example.org"]);
    let now = p.now;
    p.gw.handle_resolved(now, "home.example.org", vec!["192.0.2.99".parse().unwrap()]);
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    p.settle();
    assert!(matches!(
        p.closed(a),
        Some((
            _,
            AgentError::Refused {
                code: ErrorCode::NotAllowed,
                ..
            }
        ))
    ));
}

#[test]
fn clients_allow_is_decided_by_the_core() {
    let mut svc = service(SERVICE, password_key(), false);
    svc.clients_allow =
        dialback_core::acl::AllowList::parse(&["198.51.100.0/24", "pc.example"]).unwrap();
    let mut p = Pair::new(vec![svc], [42; 32], Link::new(5, &[1]));
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(p.gw.client_allowed(SERVICE, ip("198.51.100.7")).is_ok());
    let err = p.gw.client_allowed(SERVICE, ip("203.0.113.5")).unwrap_err();
    assert!(
        err.contains("203.0.113.5") && err.contains("clients_allow"),
        "{err}"
    );
    assert_eq!(p.gw.client_names(SERVICE), vec!["pc.example".to_owned()]);
    let now = p.now;
    p.gw.handle_resolved(now, "pc.example", vec![ip("203.0.113.5")]);
    assert!(p.gw.client_allowed(SERVICE, ip("203.0.113.5")).is_ok());
}

#[test]
fn failed_authentications_delay_the_address_more_and_more() {
    let mut p = Pair::simple(false);
    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let mut delays = Vec::new();
    for i in 0..8u8 {
        let a = p.agent(SERVICE, PasswordKey::from_bytes([0x55; 32]), [i; 32]);
        p.settle();
        assert!(p.closed(a).is_some());
        delays.push(p.gw.admission_delay(p.now, ip));
    }
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
    assert_eq!(
        delays[0],
        Duration::ZERO,
        "a mistyped password is not punished"
    );
    assert!(delays[7] > delays[4], "{delays:?}");
    assert!(delays[7] <= dialback_core::throttle::MAX_DELAY);
    // Another address is not affected, and the right password still registers.
    assert_eq!(
        p.gw.admission_delay(p.now, "192.0.2.2".parse().unwrap()),
        Duration::ZERO
    );
    let _ = p.registered_agent([99; 32]);
}

#[test]
fn send_proxy_is_announced_in_welcome_and_reaches_every_request() {
    use dialback_core::proxy_protocol::Version;
    for want in [None, Some(Version::V1), Some(Version::V2)] {
        let mut svc = service(SERVICE, password_key(), false);
        svc.send_proxy = want;
        svc.pool = 1;
        let mut p = Pair::new(vec![svc], [42; 32], Link::new(5, &[1, 7, 3, 64, 19]));
        let (a, _) = p.registered_agent([1; 32]);
        p.client(1, SERVICE).unwrap();
        p.settle();
        let reqs = p.connects(a);
        assert!(reqs.iter().any(|r| r.pooled), "{want:?}: no PREPARE");
        assert!(
            reqs.iter().all(|r| r.send_proxy == want),
            "{want:?}: {reqs:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration reload
// ---------------------------------------------------------------------------------------------

fn reload(p: &mut Pair, services: Vec<ServiceConfig>) -> dialback_core::gateway::Reconfigured {
    let now = p.now;
    let report = p.gw.reconfigure(now, services);
    p.drain();
    p.settle();
    report
}

#[test]
fn reload_with_the_same_services_changes_nothing() {
    let mut p = Pair::simple(false);
    let (a, sid) = p.registered_agent([1; 32]);
    let report = reload(&mut p, vec![service(SERVICE, password_key(), false)]);
    assert_eq!(report, Default::default());
    assert!(p.closed(a).is_none());
    assert!(p.gw.is_online(SERVICE));
    p.client(1, SERVICE).unwrap();
    p.settle();
    let req = p.connects(a)[0].clone();
    assert_eq!(req.hello.session_id, sid);
    assert_eq!(p.redeem(&req.hello, false).unwrap().client, ClientId(1));
}

#[test]
fn a_changed_password_keeps_the_live_session_and_binds_new_registrations() {
    let mut p = Pair::simple(false);
    let (a, sid) = p.registered_agent([1; 32]);
    let new_key = PasswordKey::from_bytes([0x5a; 32]);
    let mut changed = service(SERVICE, new_key.clone(), false);
    changed.max_pending = 1;
    let report = reload(&mut p, vec![changed]);
    assert_eq!(report.changed, vec![SERVICE.to_owned()]);
    assert!(report.added.is_empty() && report.removed.is_empty());

    // The live agent keeps working on its old session, with tokens of its old keys.
    assert!(p.closed(a).is_none(), "{:?}", p.closed(a));
    p.client(1, SERVICE).unwrap();
    p.settle();
    let req = p.connects(a)[0].clone();
    assert_eq!(req.hello.session_id, sid);
    // max_pending applies at once: one client is waiting, so a second one is refused.
    assert!(matches!(
        p.client(2, SERVICE),
        Err(ClientReject::Overloaded { .. })
    ));
    assert_eq!(p.redeem(&req.hello, false).unwrap().client, ClientId(1));

    // Once it is gone, the old password no longer registers; the new one does.
    p.agent_close(a, ErrorCode::ShuttingDown);
    p.settle();
    assert!(!p.gw.is_online(SERVICE));
    let old = p.agent(SERVICE, password_key(), [2; 32]);
    p.settle();
    assert!(p.registered(old).is_none());
    let conn = p.sides[old].conn;
    assert_eq!(
        p.rejected(conn).iter().map(|r| r.2).collect::<Vec<_>>(),
        vec![ErrorCode::AuthFailed]
    );
    let new = p.agent(SERVICE, new_key, [3; 32]);
    p.settle();
    assert!(p.registered(new).is_some());
}

#[test]
fn reload_adds_and_removes_services() {
    let mut p = Pair::simple(false);
    let (a, _) = p.registered_agent([1; 32]);
    p.client(1, SERVICE).unwrap();
    p.settle();
    assert_eq!(p.connects(a).len(), 1);
    let api_key = PasswordKey::from_bytes([0x11; 32]);

    // Before the reload, "api" is unknown.
    let early = p.agent("api", api_key.clone(), [2; 32]);
    p.settle();
    assert!(p.registered(early).is_none());

    let report = reload(&mut p, vec![service("api", api_key.clone(), false)]);
    assert_eq!(report.added, vec!["api".to_owned()]);
    assert_eq!(report.removed, vec![SERVICE.to_owned()]);
    assert!(report.changed.is_empty());

    // The removed service's agent is told why, its waiting client fails, and it is offline.
    match p.closed(a) {
        Some((_, AgentError::Refused { code, message })) => {
            assert_eq!(code, ErrorCode::NotAllowed);
            assert!(message.contains("removed"), "{message}");
        }
        other => panic!("the removed service's agent was not told: {other:?}"),
    }
    assert_eq!(
        p.failed_for(ClientId(1))
            .iter()
            .map(|f| f.1)
            .collect::<Vec<_>>(),
        vec![ErrorCode::SessionGone]
    );
    assert!(!p.gw.is_online(SERVICE));
    assert!(matches!(
        p.client(2, SERVICE),
        Err(ClientReject::UnknownService(_))
    ));
    let again = p.agent(SERVICE, password_key(), [3; 32]);
    p.settle();
    assert!(p.registered(again).is_none());

    // The new service registers and serves.
    let api = p.agent("api", api_key, [4; 32]);
    p.settle();
    assert!(p.registered(api).is_some());
    p.client(3, "api").unwrap();
    p.settle();
    let req = p.connects(api)[0].clone();
    assert_eq!(p.redeem(&req.hello, false).unwrap().client, ClientId(3));
}

#[test]
fn removing_a_pooled_service_closes_its_parked_connections() {
    let mut p = pooled_pair(Duration::from_secs(60));
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    let mut answered = BTreeMap::new();
    assert_eq!(p.fill(a, &mut answered), POOL);
    assert_eq!(p.gw.pooled(SERVICE), POOL);
    let parked: Vec<u64> = p.parked.keys().copied().collect();
    let report = reload(&mut p, Vec::new());
    assert_eq!(report.removed, vec![SERVICE.to_owned()]);
    let closed: Vec<u64> = p.pool_closed.iter().map(|(_, id)| *id).collect();
    for id in &parked {
        assert!(closed.contains(id), "parked connection {id} left open");
    }
    assert_eq!(p.gw.pooled(SERVICE), 0);
}

#[test]
fn a_direct_service_takes_no_agent_but_keeps_its_client_rules() {
    let mut direct = service(SERVICE, password_key(), false);
    direct.direct = true;
    direct.clients_allow = dialback_core::acl::AllowList::parse(&["192.0.2.0/24"]).unwrap();
    let mut p = Pair::new(vec![direct], [3; 32], Link::new(2, &[64]));
    // Even with the right password, registering is refused like an unknown service.
    let a = p.agent(SERVICE, password_key(), [1; 32]);
    p.settle();
    assert!(p.registered(a).is_none());
    let conn = p.sides[a].conn;
    assert_eq!(
        p.rejected(conn).iter().map(|r| r.2).collect::<Vec<_>>(),
        vec![ErrorCode::AuthFailed]
    );
    assert!(matches!(
        p.gw.handle_client(p.now, ClientId(1), SERVICE, None, None),
        Err(ClientReject::UnknownService(_))
    ));
    assert!(p
        .gw
        .client_allowed(SERVICE, "192.0.2.9".parse().unwrap())
        .is_ok());
    assert!(p
        .gw
        .client_allowed(SERVICE, "198.51.100.1".parse().unwrap())
        .is_err());
}

/// An agent that says it is shutting down (ERROR SHUTTING_DOWN) ends its session as orderly;
/// one whose connection just ends, or that sends another error, does not. Either way the
/// service goes offline at once.
#[test]
fn an_agent_shutting_down_ends_its_session_as_orderly() {
    for how in ["shutting down", "other error", "eof"] {
        let mut p = Pair::simple(false);
        let a = p.agent(SERVICE, password_key(), [9; 32]);
        p.settle();
        assert!(p.gw.is_online(SERVICE));
        let conn = p.sides[a].conn;
        match how {
            "shutting down" => p.agent_close(a, ErrorCode::ShuttingDown),
            "other error" => p.agent_close(a, ErrorCode::Internal),
            _ => {
                let now = p.now;
                p.sides[a].up.send_eof(now);
            }
        }
        p.settle();
        assert_eq!(p.ended_orderly(conn), vec![how == "shutting down"], "{how}");
        assert!(!p.gw.is_online(SERVICE), "{how}");
        let reason = &p.session_ended(conn)[0].2;
        let expected = match how {
            "shutting down" => "the agent is shutting down",
            "other error" => "agent sent error",
            _ => "connection closed by the agent",
        };
        assert!(reason.starts_with(expected), "{how}: {reason}");
    }
}
