//! The gateway's state machine: who is registered, control sessions, one-time tokens, and
//! pairing public clients with data connections (`spec/protocol.md`, "Gateway states").
//!
//! One [`Gateway`] serves every control connection and every public client of a gateway
//! process. The runtime assigns [`ConnId`]s to control connections and [`ClientId`]s to waiting
//! clients, feeds events in with `handle_*`, then drains [`Gateway::poll_output`] until `None`
//! and sleeps until [`Gateway::poll_timeout`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::acl::AllowList;
use crate::crypto::{ct_eq, PasswordKey, SessionKeys};
use crate::data::encode_bind;
use crate::drbg::Drbg;
use crate::error::ErrorCode;
use crate::throttle::AuthThrottle;
use crate::timing::Timing;
use crate::wire::{
    Connect, DataHello, ErrorFrame, FrameDecoder, Hello, Message, Prepare, Welcome, WireError,
    MAX_SERVICE_NAME,
};

/// A control connection, numbered by the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// A public client waiting for its data connection, numbered by the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub password_key: PasswordKey,
    pub data_tls: bool,
    /// Clients waiting for a data connection at once; more are refused as overloaded.
    pub max_pending: usize,
    /// Authenticated data connections kept ready for clients of this service (0: none).
    pub pool: usize,
    /// A pooled connection unused for this long is closed and replaced, before NATs and
    /// proxies on the way forget it silently.
    pub pool_max_idle: Duration,
    /// Who may register as this service's agent.
    pub allow_from: AllowList,
    /// Who may be a public client of this service.
    pub clients_allow: AllowList,
    /// The PROXY header the agent is asked to send toward its local service (announced in
    /// WELCOME).
    pub send_proxy: Option<crate::proxy_protocol::Version>,
    /// Served by the gateway dialing `upstreams` itself, not by an agent: a registration for
    /// it is refused exactly like one for an unknown service, and `handle_client` does not
    /// take its clients. Its `clients_allow` still applies ([`Gateway::client_allowed`]).
    pub direct: bool,
}

/// Longest wait before refilling a pool whose connections keep failing.
pub const POOL_BACKOFF_MAX: Duration = Duration::from_secs(30);
const POOL_BACKOFF_MIN: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub timing: Timing,
    pub services: Vec<ServiceConfig>,
}

/// Something the runtime must do, or may log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayOutput {
    /// Write these bytes to the control connection.
    Transmit { conn: ConnId, bytes: Vec<u8> },
    /// Flush what was transmitted so far, then close the control connection.
    Close { conn: ConnId },
    /// Close this pooled data connection (aged out, or its session ended).
    ClosePooled { pooled: u64 },
    /// Close this waiting client: it will not be paired.
    ClientFailed {
        client: ClientId,
        code: ErrorCode,
        reason: String,
    },
    /// For logs and metrics.
    Event(GatewayEvent),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    Registered {
        conn: ConnId,
        peer: SocketAddr,
        service: String,
        session_id: u64,
        software: String,
    },
    /// A control connection was refused or dropped; `service` when known.
    Rejected {
        conn: ConnId,
        peer: SocketAddr,
        service: Option<String>,
        code: ErrorCode,
        reason: String,
    },
    SessionEnded {
        conn: ConnId,
        service: String,
        session_id: u64,
        reason: String,
        /// The agent ended the session in order: it said it is shutting down (ERROR
        /// SHUTTING_DOWN), as when it stops or restarts. False for a lost connection, a
        /// timeout or any other error.
        orderly: bool,
    },
    /// A data connection asked for the pool did not arrive or was refused; the pool is refilled
    /// after `retry_in`.
    PoolRequestFailed {
        service: String,
        reason: String,
        retry_in: Duration,
    },
}

/// What [`Gateway::reconfigure`] changed, by service name, in configuration order (removed:
/// in name order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconfigured {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

/// How a client accepted by [`Gateway::handle_client`] gets its data connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRoute {
    /// A CONNECT went to the agent: the client is later paired by
    /// [`Gateway::handle_data_hello`] or failed by a [`GatewayOutput::ClientFailed`].
    Requested,
    /// Paired at once with pooled data connection `pooled`: write `bind` to it, then relay.
    /// If that connection turns out to be gone, report it with
    /// [`Gateway::handle_pooled_gone`] and ask again.
    Pooled {
        pooled: u64,
        bind: Vec<u8>,
        session_id: u64,
    },
}

/// What a data connection with a valid token is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataOutcome {
    /// Answer DATA_ACCEPT and relay for this client.
    Paired(Paired),
    /// Keep the connection open without answering; it is pooled connection `pooled` until
    /// [`Gateway::handle_client`] hands it to a client, or [`GatewayOutput::ClosePooled`].
    Parked {
        pooled: u64,
        service: String,
        session_id: u64,
    },
}

/// Why a public client could not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientReject {
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("no agent is connected for service {0:?}")]
    AgentOffline(String),
    #[error("service {service:?} already has {pending} clients waiting for the agent")]
    Overloaded { service: String, pending: usize },
}

/// Why a data connection was refused; `code` goes back to the agent in an ERROR frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DataReject {
    pub code: ErrorCode,
    pub message: String,
}

/// A redeemed token: pair the data connection with this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paired {
    pub client: ClientId,
    pub service: String,
    pub session_id: u64,
    pub request_id: u64,
}

#[derive(Debug)]
struct Service {
    cfg: ServiceConfig,
    /// The control connection currently registered for this service.
    session: Option<ConnId>,
    pending: usize,
}

#[derive(Debug)]
enum ConnState {
    AwaitHello { deadline: Instant },
    Registered(Box<Session>),
}

#[derive(Debug)]
struct Session {
    service: String,
    session_id: u64,
    keys: SessionKeys,
    /// Settings the session registered with; they stay until it ends, whatever reloads do.
    timing: Timing,
    data_tls: bool,
    pool: Pool,
}

/// A session's pool of ready data connections.
#[derive(Debug)]
struct Pool {
    target: usize,
    max_idle: Duration,
    /// Parked connections in the order they arrived, each with its arrival time.
    parked: VecDeque<(u64, Instant)>,
    /// PREPAREs sent and not yet answered by a data connection.
    in_flight: usize,
    /// Failures since a pooled connection last proved healthy (used, or lived to retirement).
    failures: u32,
    /// No PREPARE before this instant (backoff after failures).
    refill_at: Instant,
    /// Since when the pool has been short (parked + requested below `target`), as last seen
    /// by a refill; `None` while full.
    short_since: Option<Instant>,
}

/// How long a pool may stay short by less than a batch before it is topped up anyway.
pub const POOL_TOP_UP: Duration = Duration::from_millis(50);

impl Pool {
    fn deficit(&self) -> usize {
        self.target
            .saturating_sub(self.parked.len() + self.in_flight)
    }

    /// The shortfall at which a refill goes out at once: half the pool, rounded down, at
    /// least one.
    fn batch(&self) -> usize {
        (self.target / 2).max(1)
    }

    /// Connections to ask for now: all of the deficit once it reaches a [`batch`](Self::batch),
    /// or once the pool has been short for [`POOL_TOP_UP`]; none before. Refilling in batches
    /// lets the agent dial, and the gateway take in, several connections per wake-up instead
    /// of one per client served: with the default pool of 4, ~13% less CPU per connection
    /// served at one client at a time. A quiet pool is still full again 50 ms after a use, and
    /// pools of 1 to 3 are refilled after every use.
    fn wanted(&self, now: Instant) -> usize {
        let d = self.deficit();
        let topped_up = self.short_since.is_some_and(|t| now >= t + POOL_TOP_UP);
        if d > 0 && (d >= self.batch() || topped_up) {
            d
        } else {
            0
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let aged = self.parked.front().map(|(_, since)| *since + self.max_idle);
        let d = self.deficit();
        let refill = match self.short_since {
            _ if d == 0 => None,
            Some(t) if d < self.batch() => Some(self.refill_at.max(t + POOL_TOP_UP)),
            _ => Some(self.refill_at),
        };
        match (aged, refill) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug)]
struct Conn {
    peer: SocketAddr,
    exporter: [u8; 32],
    decoder: FrameDecoder,
    state: ConnState,
    last_rx: Instant,
    last_tx: Instant,
    /// The deadline this connection has an entry for in the timer heap.
    scheduled: Instant,
}

#[derive(Debug)]
struct Pending {
    /// `None` for a connection requested for the pool.
    client: Option<ClientId>,
    service: String,
    session_id: u64,
    conn: ConnId,
    token: [u8; 32],
    expires: Instant,
}

pub struct Gateway {
    timing: Timing,
    services: BTreeMap<String, Service>,
    conns: BTreeMap<ConnId, Conn>,
    pending: BTreeMap<u64, Pending>,
    clients: BTreeMap<ClientId, u64>,
    /// Every parked pooled connection and the session it belongs to.
    parked: BTreeMap<u64, ConnId>,
    conn_timers: BinaryHeap<Reverse<(Instant, ConnId)>>,
    token_timers: BinaryHeap<Reverse<(Instant, u64)>>,
    outputs: VecDeque<GatewayOutput>,
    rng: Drbg,
    next_session: u64,
    last_now: Option<Instant>,
    throttle: AuthThrottle,
    /// Addresses of the DNS names in access rules, as last resolved by the runtime.
    resolved: BTreeMap<String, Vec<IpAddr>>,
}

impl Gateway {
    /// `seed` must come from a cryptographically secure source: tokens, nonces and request
    /// ids are drawn from it.
    pub fn new(config: GatewayConfig, seed: [u8; 32]) -> Self {
        let mut rng = Drbg::new(seed);
        // Session ids start at a random point so that ids from before a restart never match.
        let next_session = u64::from_be_bytes(rng.array()) >> 1;
        let mut g = Gateway {
            timing: config.timing,
            services: BTreeMap::new(),
            conns: BTreeMap::new(),
            pending: BTreeMap::new(),
            clients: BTreeMap::new(),
            parked: BTreeMap::new(),
            conn_timers: BinaryHeap::new(),
            token_timers: BinaryHeap::new(),
            outputs: VecDeque::new(),
            rng,
            next_session,
            last_now: None,
            throttle: AuthThrottle::new(),
            resolved: BTreeMap::new(),
        };
        for s in config.services {
            g.services.insert(
                s.name.clone(),
                Service {
                    cfg: s,
                    session: None,
                    pending: 0,
                },
            );
        }
        g
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Installs a new list of services (a configuration reload) and says what changed.
    ///
    /// - A service that is new can register at once.
    /// - A changed service keeps its live session with the settings it registered with (its
    ///   password keys, `data_tls`, pool and PROXY header), until that session drops; new
    ///   registrations, and the rules that are checked per client (`clients_allow`,
    ///   `max_pending`) or per registration (`allow_from`), use the new settings at once.
    /// - A service that is gone loses its session: the agent is told why
    ///   (`NOT_ALLOWED`), its waiting clients fail and its pool closes. Its next registration
    ///   is refused like any unknown service's.
    ///
    /// Names that appear twice keep the first entry.
    pub fn reconfigure(&mut self, now: Instant, services: Vec<ServiceConfig>) -> Reconfigured {
        self.touch(now);
        let mut report = Reconfigured::default();
        let mut next: BTreeMap<String, Service> = BTreeMap::new();
        for cfg in services {
            if next.contains_key(&cfg.name) {
                continue;
            }
            let name = cfg.name.clone();
            let service = match self.services.remove(&name) {
                Some(old) => {
                    if old.cfg != cfg {
                        report.changed.push(name.clone());
                    }
                    Service { cfg, ..old }
                }
                None => {
                    report.added.push(name.clone());
                    Service {
                        cfg,
                        session: None,
                        pending: 0,
                    }
                }
            };
            next.insert(name, service);
        }
        let removed = std::mem::replace(&mut self.services, next);
        for (name, old) in removed {
            if let Some(conn) = old.session {
                let reason =
                    format!("service {name:?} was removed from the gateway's configuration");
                self.close(conn, Some(ErrorCode::NotAllowed), reason);
            }
            report.removed.push(name);
        }
        // Names only the removed services' rules used need not be kept.
        let still_used: Vec<String> = self
            .services
            .values()
            .flat_map(|s| {
                s.cfg
                    .allow_from
                    .names()
                    .chain(s.cfg.clients_allow.names())
                    .map(str::to_owned)
            })
            .collect();
        self.resolved.retain(|n, _| still_used.contains(n));
        report
    }

    /// Whether an agent is registered for `service` right now.
    pub fn is_online(&self, service: &str) -> bool {
        self.services
            .get(service)
            .is_some_and(|s| s.session.is_some())
    }

    /// Public clients waiting for a data connection.
    pub fn pending_clients(&self) -> usize {
        self.clients.len()
    }

    /// Pooled data connections parked for `service`'s live session.
    pub fn pooled(&self, service: &str) -> usize {
        let Some(conn) = self.services.get(service).and_then(|s| s.session) else {
            return 0;
        };
        match self.conns.get(&conn) {
            Some(Conn {
                state: ConnState::Registered(s),
                ..
            }) => s.pool.parked.len(),
            _ => 0,
        }
    }

    pub fn control_connections(&self) -> usize {
        self.conns.len()
    }

    /// The DNS names in every service's `allow_from`: the runtime resolves them when an
    /// agent's connection arrives and reports them with [`Gateway::handle_resolved`] before
    /// the connection's hello is fed in.
    pub fn agent_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .services
            .values()
            .flat_map(|s| s.cfg.allow_from.names().map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The DNS names in `service`'s `clients_allow`, to resolve before
    /// [`Gateway::client_allowed`].
    pub fn client_names(&self, service: &str) -> Vec<String> {
        self.services.get(service).map_or_else(Vec::new, |s| {
            s.cfg.clients_allow.names().map(str::to_owned).collect()
        })
    }

    /// What `name` resolved to just now (nothing, when it did not resolve). Only names that
    /// appear in a rule are kept.
    pub fn handle_resolved(&mut self, now: Instant, name: &str, addrs: Vec<IpAddr>) {
        self.touch(now);
        let used = self.services.values().any(|s| {
            s.cfg.allow_from.names().any(|n| n == name)
                || s.cfg.clients_allow.names().any(|n| n == name)
        });
        if used {
            self.resolved.insert(name.to_owned(), addrs);
        }
    }

    fn resolution(&self) -> impl Fn(&str) -> Vec<IpAddr> + '_ {
        |name| self.resolved.get(name).cloned().unwrap_or_default()
    }

    /// Whether a public client from `ip` may use `service` (`clients_allow`). The runtime
    /// refuses the client, with the reason, when not.
    pub fn client_allowed(&self, service: &str, ip: IpAddr) -> Result<(), String> {
        let Some(s) = self.services.get(service) else {
            return Ok(()); // unknown services are refused by handle_client
        };
        let rules = &s.cfg.clients_allow;
        if rules.allows(ip, &self.resolution()) {
            Ok(())
        } else {
            // Without the rules: an entry point may show this to the client (HTTP's 403).
            Err(format!(
                "{ip} is not in clients_allow of service {service:?}"
            ))
        }
    }

    /// How long a new connection from `ip` must wait before it is served: grows with the
    /// address's failed authentications (see [`crate::throttle`]).
    pub fn admission_delay(&self, now: Instant, ip: IpAddr) -> Duration {
        self.throttle.delay(now, ip)
    }

    /// A TLS control connection completed its handshake (and its preamble was read).
    /// `exporter` is the TLS exporter value the proofs are bound to.
    pub fn handle_control_open(
        &mut self,
        now: Instant,
        conn: ConnId,
        peer: SocketAddr,
        exporter: [u8; 32],
    ) {
        self.touch(now);
        let deadline = now + self.timing.handshake_timeout;
        self.conns.insert(
            conn,
            Conn {
                peer,
                exporter,
                decoder: FrameDecoder::new(),
                state: ConnState::AwaitHello { deadline },
                last_rx: now,
                last_tx: now,
                scheduled: deadline,
            },
        );
        self.conn_timers.push(Reverse((deadline, conn)));
    }

    /// Bytes read from a control connection (decrypted).
    pub fn handle_control_input(&mut self, now: Instant, conn: ConnId, mut input: &[u8]) {
        self.touch(now);
        while !input.is_empty() {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            c.last_rx = now;
            match c.decoder.decode(&mut input) {
                Ok(Some(m)) => self.on_message(now, conn, m),
                Ok(None) => return,
                Err(e) => {
                    let code = match e {
                        WireError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
                        _ => ErrorCode::Malformed,
                    };
                    self.close(conn, Some(code), e.to_string());
                    return;
                }
            }
        }
    }

    /// The control connection is gone (EOF, error, or closed after [`GatewayOutput::Close`]).
    pub fn handle_control_closed(&mut self, now: Instant, conn: ConnId) {
        self.touch(now);
        self.close(conn, None, "connection closed by the agent".into());
    }

    /// A public client arrived for `service`. It gets a pooled data connection at once when one
    /// is parked; otherwise a CONNECT goes to the agent (see [`ClientRoute`]).
    pub fn handle_client(
        &mut self,
        now: Instant,
        client: ClientId,
        service: &str,
        client_addr: Option<SocketAddr>,
        public_addr: Option<SocketAddr>,
    ) -> Result<ClientRoute, ClientReject> {
        self.touch(now);
        let svc = self
            .services
            .get(service)
            .filter(|s| !s.cfg.direct)
            .ok_or_else(|| ClientReject::UnknownService(service.to_owned()))?;
        let conn_id = svc
            .session
            .ok_or_else(|| ClientReject::AgentOffline(service.to_owned()))?;
        let max_pending = svc.cfg.max_pending;
        let waiting = svc.pending;
        if let Some(session) = self.session_mut(conn_id) {
            // The newest parked connection is the least likely to have died unnoticed.
            if let Some((pooled, _)) = session.pool.parked.pop_back() {
                // It lived until used: the pool is healthy, refill without waiting.
                session.pool.failures = 0;
                session.pool.refill_at = session.pool.refill_at.min(now);
                let session_id = session.session_id;
                self.parked.remove(&pooled);
                self.refill(now, conn_id);
                return Ok(ClientRoute::Pooled {
                    pooled,
                    bind: encode_bind(client_addr, public_addr),
                    session_id,
                });
            }
        }
        if waiting >= max_pending {
            return Err(ClientReject::Overloaded {
                service: service.to_owned(),
                pending: waiting,
            });
        }
        let Some(Conn {
            state: ConnState::Registered(session),
            ..
        }) = self.conns.get(&conn_id)
        else {
            return Err(ClientReject::AgentOffline(service.to_owned()));
        };
        let session_id = session.session_id;
        let ttl = session.timing.token_ttl;
        let request_id = self.fresh_request_id();
        let random: [u8; 16] = self.rng.array();
        let Some(session) = self.session_mut(conn_id) else {
            return Err(ClientReject::AgentOffline(service.to_owned()));
        };
        let token = session
            .keys
            .data_token(session_id, request_id, service, &random);
        let expires = now + ttl;
        self.pending.insert(
            request_id,
            Pending {
                client: Some(client),
                service: service.to_owned(),
                session_id,
                conn: conn_id,
                token,
                expires,
            },
        );
        self.clients.insert(client, request_id);
        self.token_timers.push(Reverse((expires, request_id)));
        if let Some(s) = self.services.get_mut(service) {
            s.pending += 1;
        }
        let msg = Message::Connect(Connect {
            request_id,
            token,
            client: client_addr,
            public: public_addr,
        });
        self.transmit(now, conn_id, &msg);
        Ok(ClientRoute::Requested)
    }

    /// A parked pooled connection closed, failed, or sent bytes before its DATA_BIND; it is
    /// dropped from the pool and replaced. Unknown ids (already handed out, or closed by the
    /// core) are ignored.
    pub fn handle_pooled_gone(&mut self, now: Instant, pooled: u64, reason: &str) {
        self.touch(now);
        let Some(conn) = self.parked.remove(&pooled) else {
            return;
        };
        if let Some(session) = self.session_mut(conn) {
            session.pool.parked.retain(|(id, _)| *id != pooled);
        }
        self.pool_failed(now, conn, format!("pooled data connection lost: {reason}"));
    }

    /// The waiting client hung up before it was paired; its token dies with it.
    pub fn handle_client_gone(&mut self, now: Instant, client: ClientId) {
        self.touch(now);
        if let Some(request_id) = self.clients.remove(&client) {
            self.remove_pending(request_id);
        }
    }

    /// A data connection presented its hello. The token is deleted by this call whatever the
    /// outcome, so it can never be tried twice. `tls` says whether the connection is under TLS.
    pub fn handle_data_hello(
        &mut self,
        now: Instant,
        hello: &DataHello,
        tls: bool,
    ) -> Result<DataOutcome, DataReject> {
        self.touch(now);
        let reject = |code, message: &str| DataReject {
            code,
            message: message.to_owned(),
        };
        let Some(p) = self.remove_pending(hello.request_id) else {
            return Err(reject(
                ErrorCode::TokenInvalid,
                "unknown request: token already used, expired or never issued",
            ));
        };
        let fail = |g: &mut Gateway, code: ErrorCode, message: &str| {
            match p.client {
                Some(client) => g.outputs.push_back(GatewayOutput::ClientFailed {
                    client,
                    code,
                    reason: format!("data connection refused: {message}"),
                }),
                None => g.pool_failed(
                    now,
                    p.conn,
                    format!("pooled data connection refused: {code}: {message}"),
                ),
            }
            Err(reject(code, message))
        };
        if !ct_eq(&p.token, &hello.token)
            || p.service != hello.service
            || p.session_id != hello.session_id
        {
            return fail(
                self,
                ErrorCode::TokenInvalid,
                "token does not match this request",
            );
        }
        if now >= p.expires {
            return fail(self, ErrorCode::TokenExpired, "token expired");
        }
        let live = self.services.get(&p.service).and_then(|s| s.session) == Some(p.conn);
        let Some(Conn {
            state: ConnState::Registered(session),
            ..
        }) = self.conns.get(&p.conn)
        else {
            return fail(
                self,
                ErrorCode::SessionGone,
                "the control session that issued this token has ended",
            );
        };
        if !live || session.session_id != p.session_id {
            return fail(
                self,
                ErrorCode::SessionGone,
                "the control session that issued this token has ended",
            );
        }
        if session.data_tls && !tls {
            return fail(
                self,
                ErrorCode::DataTlsRequired,
                "this service requires data connections under TLS",
            );
        }
        let Some(client) = p.client else {
            if let Some(session) = self.session_mut(p.conn) {
                session.pool.parked.push_back((hello.request_id, now));
            }
            self.parked.insert(hello.request_id, p.conn);
            self.reschedule(p.conn);
            return Ok(DataOutcome::Parked {
                pooled: hello.request_id,
                service: p.service,
                session_id: p.session_id,
            });
        };
        Ok(DataOutcome::Paired(Paired {
            client,
            service: p.service,
            session_id: p.session_id,
            request_id: hello.request_id,
        }))
    }

    /// Run every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.touch(now);
        while let Some(&Reverse((at, conn))) = self.conn_timers.peek() {
            if at > now {
                break;
            }
            self.conn_timers.pop();
            match self.conns.get(&conn) {
                Some(c) if c.scheduled == at => self.run_conn_timers(now, conn),
                _ => {} // stale entry: the connection is gone or was rescheduled
            }
        }
        while let Some(&Reverse((at, request_id))) = self.token_timers.peek() {
            if at > now {
                break;
            }
            self.token_timers.pop();
            if self
                .pending
                .get(&request_id)
                .is_some_and(|p| p.expires <= now)
            {
                if let Some(p) = self.remove_pending(request_id) {
                    let reason = format!(
                        "the agent did not dial back within {}",
                        fmt_duration(self.ttl_of(&p))
                    );
                    match p.client {
                        Some(client) => self.outputs.push_back(GatewayOutput::ClientFailed {
                            client,
                            code: ErrorCode::TokenExpired,
                            reason,
                        }),
                        None => self.pool_failed(now, p.conn, reason),
                    }
                }
            }
        }
        // Redeemed tokens leave stale heap entries behind; keep the heap proportional.
        if self.token_timers.len() > 2 * self.pending.len() + 64 {
            self.token_timers = self
                .pending
                .iter()
                .map(|(id, p)| Reverse((p.expires, *id)))
                .collect();
        }
    }

    /// The next deadline, or the last `now` while outputs are still queued, so a driver never
    /// sleeps with work pending.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.outputs.is_empty() {
            return self.last_now;
        }
        let c = self.conn_timers.peek().map(|Reverse((t, _))| *t);
        let t = self.token_timers.peek().map(|Reverse((t, _))| *t);
        match (c, t) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    #[must_use]
    pub fn poll_output(&mut self) -> Option<GatewayOutput> {
        self.outputs.pop_front()
    }

    fn touch(&mut self, now: Instant) {
        self.last_now = Some(self.last_now.map_or(now, |l| l.max(now)));
    }

    fn ttl_of(&self, p: &Pending) -> Duration {
        match self.conns.get(&p.conn) {
            Some(Conn {
                state: ConnState::Registered(s),
                ..
            }) => s.timing.token_ttl,
            _ => self.timing.token_ttl,
        }
    }

    fn remove_pending(&mut self, request_id: u64) -> Option<Pending> {
        let p = self.pending.remove(&request_id)?;
        match p.client {
            Some(client) => {
                self.clients.remove(&client);
                if let Some(s) = self.services.get_mut(&p.service) {
                    s.pending = s.pending.saturating_sub(1);
                }
            }
            None => {
                if let Some(session) = self.session_mut(p.conn) {
                    session.pool.in_flight = session.pool.in_flight.saturating_sub(1);
                }
            }
        }
        Some(p)
    }

    fn session_mut(&mut self, conn: ConnId) -> Option<&mut Session> {
        match self.conns.get_mut(&conn) {
            Some(Conn {
                state: ConnState::Registered(s),
                ..
            }) => Some(s),
            _ => None,
        }
    }

    /// A fresh request id: random, not 0, not in use by a pending request or a parked
    /// connection.
    fn fresh_request_id(&mut self) -> u64 {
        let mut request_id = 0;
        while request_id == 0
            || self.pending.contains_key(&request_id)
            || self.parked.contains_key(&request_id)
        {
            request_id = u64::from_be_bytes(self.rng.array());
        }
        request_id
    }

    /// Sends PREPAREs until the session's pool is full again, once it is half empty (see
    /// [`Pool::wanted`]), unless it is backing off.
    fn refill(&mut self, now: Instant, conn: ConnId) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        let pool = &mut session.pool;
        if pool.deficit() == 0 {
            pool.short_since = None;
        } else if pool.short_since.is_none() {
            pool.short_since = Some(now);
        }
        let wanted = pool.wanted(now);
        if wanted == 0 || now < pool.refill_at {
            self.reschedule(conn);
            return;
        }
        let (session_id, ttl, service) = (
            session.session_id,
            session.timing.token_ttl,
            session.service.clone(),
        );
        for _ in 0..wanted {
            let request_id = self.fresh_request_id();
            let random: [u8; 16] = self.rng.array();
            let Some(session) = self.session_mut(conn) else {
                return;
            };
            let token = session
                .keys
                .data_token(session_id, request_id, &service, &random);
            session.pool.in_flight += 1;
            let expires = now + ttl;
            self.pending.insert(
                request_id,
                Pending {
                    client: None,
                    service: service.clone(),
                    session_id,
                    conn,
                    token,
                    expires,
                },
            );
            self.token_timers.push(Reverse((expires, request_id)));
            self.transmit(now, conn, &Message::Prepare(Prepare { request_id, token }));
        }
        if let Some(session) = self.session_mut(conn) {
            // Full again once these arrive: the next shortfall starts its own wait.
            session.pool.short_since = None;
        }
        self.reschedule(conn);
    }

    /// Counts a failure of the pool and delays its refill: 250 ms, doubling up to 30 s, until a
    /// pooled connection proves healthy again.
    fn pool_failed(&mut self, now: Instant, conn: ConnId, reason: String) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        session.pool.failures = session.pool.failures.saturating_add(1);
        let shift = (session.pool.failures - 1).min(7);
        let retry_in = (POOL_BACKOFF_MIN * (1u32 << shift)).min(POOL_BACKOFF_MAX);
        session.pool.refill_at = now + retry_in;
        let service = session.service.clone();
        self.outputs
            .push_back(GatewayOutput::Event(GatewayEvent::PoolRequestFailed {
                service,
                reason,
                retry_in,
            }));
        self.refill(now, conn);
    }

    fn transmit(&mut self, now: Instant, conn: ConnId, msg: &Message) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.last_tx = now;
            self.outputs.push_back(GatewayOutput::Transmit {
                conn,
                bytes: msg.to_frame(),
            });
        }
    }

    fn on_message(&mut self, now: Instant, conn: ConnId, m: Message) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        match (&c.state, m) {
            (ConnState::AwaitHello { .. }, Message::Hello(h)) => self.on_hello(now, conn, h),
            (ConnState::Registered(_), Message::Heartbeat) => {}
            (ConnState::Registered(_), Message::Ignorable(_)) => {}
            (ConnState::Registered(_), Message::ConnectFailed(f)) => {
                // Only the session that was asked may fail a request.
                let mine = self
                    .pending
                    .get(&f.request_id)
                    .is_some_and(|p| p.conn == conn);
                if mine {
                    if let Some(p) = self.remove_pending(f.request_id) {
                        match p.client {
                            Some(client) => {
                                let reason = format!(
                                    "agent could not serve the client: {}: {}",
                                    f.code, f.message
                                );
                                self.outputs.push_back(GatewayOutput::ClientFailed {
                                    client,
                                    code: f.code,
                                    reason,
                                });
                            }
                            None => {
                                let reason = format!(
                                    "agent could not open a pooled data connection: {}: {}",
                                    f.code, f.message
                                );
                                self.pool_failed(now, conn, reason);
                            }
                        }
                    }
                }
            }
            (_, Message::Error(e)) if e.code == ErrorCode::ShuttingDown => {
                let reason = if e.message.is_empty() {
                    "the agent is shutting down".to_string()
                } else {
                    format!("the agent is shutting down: {}", e.message)
                };
                self.drop_conn(conn, reason, true);
            }
            (_, Message::Error(e)) => {
                self.close(
                    conn,
                    None,
                    format!("agent sent error {}: {}", e.code, e.message),
                );
            }
            (_, m) => {
                let reason = format!("unexpected {} on a control connection", m.name());
                self.close(conn, Some(ErrorCode::UnexpectedMessage), reason);
            }
        }
    }

    fn on_hello(&mut self, now: Instant, conn: ConnId, h: Hello) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (peer, exporter) = (c.peer, c.exporter);
        if h.service.is_empty() || h.service.len() > MAX_SERVICE_NAME {
            let reason = format!("service name must be 1 to {MAX_SERVICE_NAME} bytes");
            self.close(conn, Some(ErrorCode::Malformed), reason);
            return;
        }
        // A direct service has no agent: it is as unknown as a name never configured.
        let registrable = self.services.get(&h.service).is_some_and(|s| !s.cfg.direct);
        if let Some(s) = self.services.get(&h.service).filter(|_| registrable) {
            // Before the proof is looked at, so a refused address learns nothing about the
            // password.
            let rules = &s.cfg.allow_from;
            if !rules.allows(peer.ip(), &self.resolution()) {
                // The agent is told its address; only the log shows the rules.
                let told = format!(
                    "{} is not allowed to register service {:?}",
                    peer.ip(),
                    h.service
                );
                let reason = format!("address not in allow_from ({rules})");
                self.reject(
                    conn,
                    peer,
                    Some(h.service),
                    ErrorCode::NotAllowed,
                    &reason,
                    &told,
                );
                return;
            }
        }
        let svc = self
            .services
            .get(&h.service)
            .filter(|_| registrable)
            .map(|s| (s.cfg.password_key.clone(), s.cfg.data_tls, s.session));
        let send_proxy = self.services.get(&h.service).and_then(|s| s.cfg.send_proxy);
        let pool_cfg = self
            .services
            .get(&h.service)
            .map_or((0, Duration::ZERO), |s| (s.cfg.pool, s.cfg.pool_max_idle));
        // An unknown service costs the same work as a known one, so timing does not tell
        // which services exist.
        let unknown = PasswordKey::from_bytes([0; 32]);
        let keys = SessionKeys::derive(svc.as_ref().map_or(&unknown, |s| &s.0), &exporter);
        let proof_ok = ct_eq(&keys.agent_proof(&h.service, &h.agent_nonce), &h.proof);
        let (Some((_, data_tls, existing)), true) = (svc, proof_ok) else {
            let failures = self.throttle.failures(now, peer.ip()) + 1;
            let delay = self.throttle.record_failure(now, peer.ip());
            let reason = if proof_ok {
                format!("unknown service (failure {failures} from this address; its next connection waits {})", fmt_duration(delay))
            } else {
                format!("wrong password proof or unknown service (failure {failures} from this address; its next connection waits {})", fmt_duration(delay))
            };
            self.reject(
                conn,
                peer,
                Some(h.service),
                ErrorCode::AuthFailed,
                &reason,
                "authentication failed: unknown service or wrong password",
            );
            return;
        };
        if let Some(existing) = existing {
            if let Some(old) = self.conns.get(&existing) {
                let quiet = now.saturating_duration_since(old.last_rx);
                let dead_after = match &old.state {
                    ConnState::Registered(s) => s.timing.dead_after,
                    ConnState::AwaitHello { .. } => Duration::ZERO,
                };
                if quiet < dead_after {
                    let detail = format!(
                        "service {:?} already has a live agent (from {}, last heard {} ago); a new one is accepted once it has been silent for {}",
                        h.service,
                        old.peer,
                        fmt_duration(quiet),
                        fmt_duration(dead_after)
                    );
                    self.reject(
                        conn,
                        peer,
                        Some(h.service),
                        ErrorCode::AlreadyRegistered,
                        "already registered",
                        &detail,
                    );
                    return;
                }
                // Its timer has not fired yet, but it is dead all the same: replace it now.
                let reason = format!(
                    "agent silent for {} (dead_after), replaced by a new registration",
                    fmt_duration(quiet)
                );
                self.close(existing, None, reason);
            }
        }
        let session_id = self.next_session;
        self.next_session = self.next_session.wrapping_add(1);
        let gateway_nonce: [u8; 32] = self.rng.array();
        let proof = keys.gateway_proof(
            &h.service,
            &h.agent_nonce,
            &gateway_nonce,
            &h.proof,
            session_id,
        );
        let timing = self.timing;
        let welcome = Welcome {
            gateway_nonce,
            proof,
            session_id,
            heartbeat_ms: u32::try_from(timing.heartbeat.as_millis()).unwrap_or(u32::MAX),
            dead_after_ms: u32::try_from(timing.dead_after.as_millis()).unwrap_or(u32::MAX),
            flags: (if data_tls { Welcome::FLAG_DATA_TLS } else { 0 })
                | match send_proxy {
                    None => 0,
                    Some(crate::proxy_protocol::Version::V1) => Welcome::FLAG_SEND_PROXY_V1,
                    Some(crate::proxy_protocol::Version::V2) => Welcome::FLAG_SEND_PROXY_V2,
                },
        };
        if let Some(s) = self.services.get_mut(&h.service) {
            s.session = Some(conn);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = ConnState::Registered(Box::new(Session {
                service: h.service.clone(),
                session_id,
                keys,
                timing,
                data_tls,
                pool: Pool {
                    target: pool_cfg.0,
                    max_idle: pool_cfg.1,
                    parked: VecDeque::new(),
                    in_flight: 0,
                    failures: 0,
                    refill_at: now,
                    short_since: None,
                },
            }));
        }
        self.transmit(now, conn, &Message::Welcome(welcome));
        self.outputs
            .push_back(GatewayOutput::Event(GatewayEvent::Registered {
                conn,
                peer,
                service: h.service,
                session_id,
                software: h.software,
            }));
        self.refill(now, conn);
    }

    fn reject(
        &mut self,
        conn: ConnId,
        peer: SocketAddr,
        service: Option<String>,
        code: ErrorCode,
        reason: &str,
        told: &str,
    ) {
        self.outputs
            .push_back(GatewayOutput::Event(GatewayEvent::Rejected {
                conn,
                peer,
                service,
                code,
                reason: format!("{reason}: {told}"),
            }));
        self.outputs.push_back(GatewayOutput::Transmit {
            conn,
            bytes: Message::Error(ErrorFrame {
                code,
                message: told.to_owned(),
            })
            .to_frame(),
        });
        self.drop_conn(conn, "rejected".into(), false);
    }

    /// Ends a control connection: tells the agent why when `code` is given, releases the
    /// service registration, and fails every client still waiting on this session.
    fn close(&mut self, conn: ConnId, code: Option<ErrorCode>, reason: String) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if let Some(code) = code {
            self.outputs.push_back(GatewayOutput::Transmit {
                conn,
                bytes: Message::Error(ErrorFrame {
                    code,
                    message: reason.clone(),
                })
                .to_frame(),
            });
        }
        if let ConnState::AwaitHello { .. } = c.state {
            let peer = c.peer;
            if code.is_some() {
                self.outputs
                    .push_back(GatewayOutput::Event(GatewayEvent::Rejected {
                        conn,
                        peer,
                        service: None,
                        code: code.unwrap_or(ErrorCode::Malformed),
                        reason: reason.clone(),
                    }));
            }
        }
        self.drop_conn(conn, reason, false);
    }

    fn drop_conn(&mut self, conn: ConnId, reason: String, orderly: bool) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.outputs.push_back(GatewayOutput::Close { conn });
        let ConnState::Registered(session) = c.state else {
            return;
        };
        for (pooled, _) in &session.pool.parked {
            self.parked.remove(pooled);
            self.outputs
                .push_back(GatewayOutput::ClosePooled { pooled: *pooled });
        }
        if let Some(s) = self.services.get_mut(&session.service) {
            if s.session == Some(conn) {
                s.session = None;
            }
        }
        let orphans: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.conn == conn)
            .map(|(id, _)| *id)
            .collect();
        for id in orphans {
            if let Some(Pending {
                client: Some(client),
                ..
            }) = self.remove_pending(id)
            {
                self.outputs.push_back(GatewayOutput::ClientFailed {
                    client,
                    code: ErrorCode::SessionGone,
                    reason: "the agent's control connection ended".into(),
                });
            }
        }
        self.outputs
            .push_back(GatewayOutput::Event(GatewayEvent::SessionEnded {
                conn,
                service: session.service,
                session_id: session.session_id,
                reason,
                orderly,
            }));
    }

    fn run_conn_timers(&mut self, now: Instant, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        match &c.state {
            ConnState::AwaitHello { deadline } => {
                if now >= *deadline {
                    let t = self.timing.handshake_timeout;
                    self.close(
                        conn,
                        Some(ErrorCode::Timeout),
                        format!("no HELLO within {}", fmt_duration(t)),
                    );
                    return;
                }
            }
            ConnState::Registered(s) => {
                let quiet = now.saturating_duration_since(c.last_rx);
                if quiet >= s.timing.dead_after {
                    let reason = format!("agent silent for {} (dead_after)", fmt_duration(quiet));
                    self.close(conn, None, reason);
                    return;
                }
                if now.saturating_duration_since(c.last_tx) >= s.timing.heartbeat {
                    self.transmit(now, conn, &Message::Heartbeat);
                }
                self.retire_aged(now, conn);
                self.refill(now, conn);
            }
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            let next = next_deadline(c);
            c.scheduled = next;
            self.conn_timers.push(Reverse((next, conn)));
        }
    }

    /// Closes pooled connections that waited longer than `pool_max_idle`. They lived a healthy
    /// life, so the pool's failure count starts over.
    fn retire_aged(&mut self, now: Instant, conn: ConnId) {
        let Some(session) = self.session_mut(conn) else {
            return;
        };
        let mut retired = Vec::new();
        while let Some(&(pooled, since)) = session.pool.parked.front() {
            if now < since + session.pool.max_idle {
                break;
            }
            session.pool.parked.pop_front();
            session.pool.failures = 0;
            retired.push(pooled);
        }
        for pooled in retired {
            self.parked.remove(&pooled);
            self.outputs
                .push_back(GatewayOutput::ClosePooled { pooled });
        }
    }

    /// Adds an earlier timer entry when a connection's next deadline moved earlier; later
    /// deadlines are found when the old entry fires.
    fn reschedule(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn) {
            let next = next_deadline(c);
            if next < c.scheduled {
                c.scheduled = next;
                self.conn_timers.push(Reverse((next, conn)));
            }
        }
    }
}

fn next_deadline(c: &Conn) -> Instant {
    match &c.state {
        ConnState::AwaitHello { deadline } => *deadline,
        ConnState::Registered(s) => {
            let liveness = (c.last_rx + s.timing.dead_after).min(c.last_tx + s.timing.heartbeat);
            s.pool.next_deadline().map_or(liveness, |p| p.min(liveness))
        }
    }
}

/// Human duration for log lines and error messages: "10s", "1.5s", "250ms".
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms >= 1000 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else if ms >= 1000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{ms}ms")
    }
}
