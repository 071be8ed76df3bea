//! The gateway on tokio: accepts agents' control and data connections on `listen`, public
//! clients on each service's `tcp_listen`, and lets the core decide everything else.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use dialback_core::crypto::PasswordKey;
use dialback_core::data::{encode_accept, encode_error, Classified, Intake};
use dialback_core::gateway::{
    ClientId, ClientReject, ClientRoute, ConnId, DataOutcome, Gateway, GatewayConfig, GatewayEvent,
    GatewayOutput, ServiceConfig,
};
use dialback_core::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::metrics::{unix_now_ms, GatewayMetrics};
use crate::settings::GatewaySettings;
use crate::stream::MaybeTls;
use crate::tls;

/// First byte of a TLS handshake record; anything else on `listen` is a plain data connection.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Pool failures are logged as warnings once the refill backoff reaches this (the fifth
/// failure in a row); before that, at info.
const POOL_WARN_AFTER: Duration = Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: String,
        source: std::io::Error,
    },
    #[error("invalid timers: {0}")]
    Timing(&'static str),
    #[error("cannot get randomness from the operating system: {0}")]
    Entropy(String),
    #[error("[http]: {0}")]
    Http(String),
    #[error("the gateway has stopped")]
    Stopped,
}

enum CtrlCmd {
    Write(Vec<u8>),
    Close,
}

/// A paired data connection handed to the waiting client task.
pub(crate) struct DataConn {
    pub(crate) stream: MaybeTls,
    /// Bytes the agent sent right behind its hello; they belong to the client.
    pub(crate) early: Vec<u8>,
    /// For a direct service: the server's slot, held for as long as the connection.
    pub(crate) lease: Option<crate::upstream::Lease>,
}

/// A pooled data connection parked until the core binds it to a client. The stream stays
/// here, so binding takes it without waking another task; the task that accepted it stays
/// behind as its watcher (see [`watch_parked`]) and sees it die meanwhile.
struct Parked {
    service: String,
    /// Always `Some` until a client takes it.
    stream: Option<MaybeTls>,
    /// The watcher's waker: woken when the connection leaves the pool, so that the watcher
    /// ends (the socket's own wakers are dropped, not woken, when a later owner closes it).
    watcher: Option<std::task::Waker>,
}

impl Drop for Parked {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.wake();
        }
    }
}

/// A public client waiting for its data connection.
struct Waiting {
    /// The data connection, or the code the core failed the client with.
    tx: oneshot::Sender<Result<DataConn, ErrorCode>>,
    service: String,
    since: Instant,
}

struct Inner {
    core: Gateway,
    conns: HashMap<ConnId, mpsc::UnboundedSender<CtrlCmd>>,
    clients: HashMap<ClientId, Waiting>,
    /// Parked pooled data connections.
    pooled: HashMap<u64, Parked>,
    /// Registered control connections and their service, for liveness metrics.
    registered: HashMap<ConnId, String>,
    /// The deadline the timer task sleeps until (`None`: until woken).
    armed: Option<Instant>,
}

pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the timer task whenever the core may have a new earliest deadline.
    timer: Notify,
    ids: AtomicU64,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
    token_ttl: Duration,
    metrics: Arc<GatewayMetrics>,
    /// Connections on the agent port start with a PROXY header.
    accept_proxy: bool,
    /// Connections in their handshake (agent port, or a client's PROXY header).
    handshakes: Arc<tokio::sync::Semaphore>,
    /// When connections refused for lack of handshake slots were last warned about, and how
    /// many were refused since: one warning per interval, not one per connection.
    saturated: Mutex<(Option<Instant>, u64)>,
    /// When each access-rule DNS name was last resolved (only names in rules: bounded).
    resolved_at: Mutex<HashMap<String, Instant>>,
    /// Handshake slots held per address, and the most one address may hold.
    per_address: Mutex<HashMap<std::net::IpAddr, usize>>,
    max_per_address: usize,
    /// Public clients being served; shutdown waits for them.
    pub(crate) drain: Arc<crate::drain::Drain>,
    /// Direct services (`upstreams`): their servers, balancing and health checks.
    upstreams: crate::upstream::Upstreams,
    drain_timeout: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; keep serving rather than cascade.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Carries out everything the core asked for. Call with the lock held, after every input.
    fn drive(&self, inner: &mut Inner) {
        while let Some(out) = inner.core.poll_output() {
            match out {
                GatewayOutput::Transmit { conn, bytes } => {
                    if let Some(tx) = inner.conns.get(&conn) {
                        let _ = tx.send(CtrlCmd::Write(bytes));
                    }
                }
                GatewayOutput::Close { conn } => {
                    if let Some(tx) = inner.conns.remove(&conn) {
                        let _ = tx.send(CtrlCmd::Close);
                    }
                }
                GatewayOutput::ClosePooled { pooled } => {
                    // Dropping it closes the connection; the agent sees EOF before any answer.
                    if let Some(p) = inner.pooled.remove(&pooled) {
                        debug!(service = %p.service, pooled, "closing pooled data connection");
                        self.sync_pool(inner, &p.service);
                    }
                }
                GatewayOutput::ClientFailed {
                    client,
                    code,
                    reason,
                } => {
                    // Wakes the client task, which closes the client (or answers an HTTP status).
                    if let Some(w) = inner.clients.remove(&client) {
                        if let Some(m) = self.metrics.service(&w.service) {
                            m.client_failed(code.name());
                        }
                        info!(client = client.0, service = %w.service, code = %code, "closing client: {reason}");
                        let _ = w.tx.send(Err(code));
                    }
                }
                GatewayOutput::Event(e) => self.record_event(inner, e),
            }
        }
        // Wake the timer task only for a deadline earlier than the one it sleeps until: a
        // later one is picked up when that one fires (most inputs add none earlier).
        let next = inner.core.poll_timeout();
        if next.is_some_and(|n| inner.armed.is_none_or(|a| n < a)) {
            inner.armed = next;
            self.timer.notify_one();
        }
    }
}

impl Shared {
    /// Publishes the number of parked connections of `service`.
    fn sync_pool(&self, inner: &Inner, service: &str) {
        if let Some(m) = self.metrics.service(service) {
            m.set_pool_connections(inner.core.pooled(service) as u64);
        }
    }

    /// Logs a core event once, with its reason, and counts it.
    fn record_event(&self, inner: &mut Inner, e: GatewayEvent) {
        match e {
            GatewayEvent::Registered {
                conn,
                peer,
                service,
                session_id,
                software,
            } => {
                if let Some(m) = self.metrics.service(&service) {
                    m.agent_registered(peer, session_id, &software, unix_now_ms());
                }
                inner.registered.insert(conn, service.clone());
                info!(conn = conn.0, %peer, %service, session = session_id, agent = %software, "agent registered");
            }
            GatewayEvent::Rejected {
                conn,
                peer,
                service,
                code,
                reason,
            } => {
                self.metrics.registration_rejected(code.name());
                if code == ErrorCode::AuthFailed {
                    self.metrics.auth_failure();
                }
                warn!(conn = conn.0, %peer, service = service.as_deref().unwrap_or("-"), code = %code, "control connection refused: {reason}");
            }
            GatewayEvent::SessionEnded {
                conn,
                service,
                session_id,
                reason,
                orderly,
            } => {
                if let Some(m) = self.metrics.service(&service) {
                    m.agent_gone(session_id);
                }
                inner.registered.remove(&conn);
                self.sync_pool(inner, &service);
                // An agent that stops or restarts says so: that is routine, not a warning.
                if orderly {
                    info!(conn = conn.0, %service, session = session_id, "agent session ended: {reason}");
                } else {
                    warn!(conn = conn.0, %service, session = session_id, "agent session ended: {reason}");
                }
            }
            GatewayEvent::PoolRequestFailed {
                service,
                reason,
                retry_in,
            } => {
                if let Some(m) = self.metrics.service(&service) {
                    m.pool_failure();
                }
                self.sync_pool(inner, &service);
                // One lost connection is routine (an agent restarting closes its pool before
                // its control connection); a pool that keeps failing backs off and says so.
                if retry_in >= POOL_WARN_AFTER {
                    warn!(%service, "{reason}; refilling the pool in {retry_in:?}");
                } else {
                    info!(%service, "{reason}; refilling the pool in {retry_in:?}");
                }
            }
        }
    }
}

/// What a public port serves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// A service's `tcp_listen`.
    Service { name: String, accept_proxy: bool },
    /// `[http]`'s `listen` (`https == false`) or `tls_listen`.
    Http { https: bool },
}

impl Entry {
    fn describe(&self) -> String {
        match self {
            Entry::Service { name, .. } => format!("tcp_listen of service {name}"),
            Entry::Http { https: false } => "[http] listen".into(),
            Entry::Http { https: true } => "[http] tls_listen".into(),
        }
    }
}

/// The public ports a configuration asks for, keyed by their configured address.
fn public_entries(settings: &GatewaySettings) -> Vec<(SocketAddr, Entry)> {
    let mut out: Vec<(SocketAddr, Entry)> = settings
        .services
        .iter()
        .filter_map(|s| {
            s.tcp_listen.map(|a| {
                (
                    a,
                    Entry::Service {
                        name: s.name.clone(),
                        accept_proxy: s.accept_proxy,
                    },
                )
            })
        })
        .collect();
    if let Some(h) = &settings.http {
        out.extend(h.listen.map(|a| (a, Entry::Http { https: false })));
        out.extend(h.tls_listen.map(|a| (a, Entry::Http { https: true })));
    }
    out
}

/// A bound public port and the task accepting on it. The listener is shared with the task,
/// so a reload can point the port at another entry without closing it.
struct PublicPort {
    configured: SocketAddr,
    entry: Entry,
    listener: Arc<TcpListener>,
    task: Option<tokio::task::AbortHandle>,
}

impl PublicPort {
    fn bound(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }
}

impl Drop for PublicPort {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A request to install a new configuration, sent by a [`Reloader`].
struct ReloadRequest {
    settings: GatewaySettings,
    reply: oneshot::Sender<Result<Reloaded, GatewayError>>,
}

/// Asks a running gateway to install a new configuration (see [`BoundGateway::run`]).
#[derive(Clone)]
pub struct Reloader {
    tx: mpsc::Sender<ReloadRequest>,
}

impl Reloader {
    /// Installs `settings` and says what changed, or why nothing did: on an error the running
    /// configuration is kept whole. Counted in the gateway's metrics either way.
    pub async fn reload(&self, settings: GatewaySettings) -> Result<Reloaded, GatewayError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ReloadRequest { settings, reply })
            .await
            .map_err(|_| GatewayError::Stopped)?;
        rx.await.map_err(|_| GatewayError::Stopped)?
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub services: dialback_core::gateway::Reconfigured,
    /// Public ports opened and closed (configured addresses).
    pub opened: Vec<SocketAddr>,
    pub closed: Vec<SocketAddr>,
    /// Whether `[http]` (routes, certificates, limits) was rebuilt.
    pub http: bool,
    /// Settings that differ from the running ones but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Settings a reload cannot change: each that differs in `new` gets its running value back
/// (so the next reload compares against what really runs) and is named, by the key an operator
/// would edit, in the result.
fn keep_restart_only(old: &GatewaySettings, new: &mut GatewaySettings) -> Vec<&'static str> {
    fn keep<T: PartialEq + Clone>(
        key: &'static str,
        old: &T,
        new: &mut T,
        out: &mut Vec<&'static str>,
    ) {
        if old != new {
            out.push(key);
            *new = old.clone();
        }
    }
    let mut out = Vec::new();
    keep("listen", &old.listen, &mut new.listen, &mut out);
    keep(
        "cert/key/state_dir",
        &old.identity,
        &mut new.identity,
        &mut out,
    );
    keep(
        "admin_listen",
        &old.admin_listen,
        &mut new.admin_listen,
        &mut out,
    );
    keep(
        "accept_proxy",
        &old.accept_proxy,
        &mut new.accept_proxy,
        &mut out,
    );
    keep(
        "max_handshakes",
        &old.max_handshakes,
        &mut new.max_handshakes,
        &mut out,
    );
    keep(
        "drain_timeout",
        &old.drain_timeout,
        &mut new.drain_timeout,
        &mut out,
    );
    keep(
        "tcp_keepalive",
        &old.tcp_keepalive,
        &mut new.tcp_keepalive,
        &mut out,
    );
    let (t, n) = (&old.timing, &mut new.timing);
    keep("heartbeat", &t.heartbeat, &mut n.heartbeat, &mut out);
    keep("dead_after", &t.dead_after, &mut n.dead_after, &mut out);
    keep("token_ttl", &t.token_ttl, &mut n.token_ttl, &mut out);
    keep(
        "handshake_timeout",
        &t.handshake_timeout,
        &mut n.handshake_timeout,
        &mut out,
    );
    out
}

/// Stretches the password of every service whose name or password is not in `known` (the
/// keys of the running configuration), off the async threads: tens of ms each.
async fn service_configs(
    services: &[crate::settings::GatewayService],
    known: &HashMap<String, (crate::settings::Secret, PasswordKey)>,
) -> Result<Vec<ServiceConfig>, GatewayError> {
    let services = services.to_vec();
    let known: HashMap<String, (crate::settings::Secret, PasswordKey)> = services
        .iter()
        .filter_map(|s| {
            known
                .get(&s.name)
                .filter(|(pw, _)| *pw == s.password)
                .map(|k| (s.name.clone(), k.clone()))
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        services
            .into_iter()
            .map(|s| ServiceConfig {
                password_key: match known.get(&s.name) {
                    Some((_, key)) => key.clone(),
                    // Never used: no agent registers for a direct service.
                    None if s.upstreams.is_some() => PasswordKey::from_bytes([0; 32]),
                    None => PasswordKey::derive(&s.name, &s.password.0),
                },
                name: s.name,
                data_tls: s.data_tls,
                max_pending: s.max_pending,
                pool: s.pool,
                pool_max_idle: s.pool_max_idle,
                allow_from: s.allow_from,
                clients_allow: s.clients_allow,
                send_proxy: s.send_proxy,
                direct: s.upstreams.is_some(),
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| GatewayError::Entropy(e.to_string()))
}

/// A gateway whose listeners are bound; [`BoundGateway::run`] serves until shutdown.
pub struct BoundGateway {
    shared: Arc<Shared>,
    /// The agents' port; taken by `run`.
    listener: Option<TcpListener>,
    admin: Option<TcpListener>,
    /// Public ports (services' `tcp_listen`, `[http]`'s ports), accepting once running.
    public: Vec<PublicPort>,
    http: Option<Arc<crate::http::FrontCell>>,
    fingerprint: [u8; 32],
    /// The running configuration, for the next reload to compare against.
    settings: GatewaySettings,
    /// Each service's password and its stretched key, so a reload re-stretches only changes.
    keys: HashMap<String, (crate::settings::Secret, PasswordKey)>,
    reload_tx: mpsc::Sender<ReloadRequest>,
    reload_rx: mpsc::Receiver<ReloadRequest>,
}

impl BoundGateway {
    /// Loads the TLS identity, stretches the service passwords and binds every listener, so
    /// that configuration problems surface before anything is served.
    pub async fn bind(settings: GatewaySettings) -> Result<Self, GatewayError> {
        settings.timing.validate().map_err(GatewayError::Timing)?;
        let (identity, origin) = tls::load_identity(&settings.identity)?;
        match &origin {
            tls::IdentityOrigin::Generated(p) => {
                info!(path = %p.display(), "generated a self-signed gateway certificate")
            }
            tls::IdentityOrigin::StateDir(p) => {
                info!(path = %p.display(), "using gateway certificate")
            }
            tls::IdentityOrigin::Files => info!("using the configured gateway certificate"),
        }
        let fingerprint = identity.fingerprint();
        info!(fingerprint = %tls::format_fingerprint(&fingerprint), "agents can pin this certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&identity)?);

        let services = service_configs(&settings.services, &HashMap::new()).await?;
        let keys = services
            .iter()
            .zip(&settings.services)
            .map(|(c, s)| (s.name.clone(), (s.password.clone(), c.password_key.clone())))
            .collect();

        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| GatewayError::Entropy(e.to_string()))?;
        let core = Gateway::new(
            GatewayConfig {
                timing: settings.timing,
                services,
            },
            seed,
        );

        let names: Vec<String> = settings.services.iter().map(|s| s.name.clone()).collect();
        let metrics = Arc::new(GatewayMetrics::new(&names));
        let listener = bind(settings.listen, "agents' listen", settings.tcp_keepalive).await?;
        let admin = match settings.admin_listen {
            Some(addr) => Some(bind(addr, "admin_listen", Duration::ZERO).await?),
            None => None,
        };
        let http = match &settings.http {
            Some(h) => Some(crate::http::FrontCell::new(crate::http::front(
                h,
                settings.timing.handshake_timeout,
                settings.timing.token_ttl,
            )?)),
            None => None,
        };
        let mut public = Vec::new();
        for (addr, entry) in public_entries(&settings) {
            let l = bind(addr, &entry.describe(), settings.tcp_keepalive).await?;
            public.push(PublicPort {
                configured: addr,
                entry,
                listener: Arc::new(l),
                task: None,
            });
        }
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                core,
                conns: HashMap::new(),
                clients: HashMap::new(),
                pooled: HashMap::new(),
                registered: HashMap::new(),
                armed: None,
            }),
            timer: Notify::new(),
            ids: AtomicU64::new(1),
            acceptor,
            handshake_timeout: settings.timing.handshake_timeout,
            token_ttl: settings.timing.token_ttl,
            metrics: metrics.clone(),
            accept_proxy: settings.accept_proxy,
            handshakes: Arc::new(tokio::sync::Semaphore::new(settings.max_handshakes)),
            saturated: Mutex::new((None, 0)),
            resolved_at: Mutex::new(HashMap::new()),
            per_address: Mutex::new(HashMap::new()),
            max_per_address: (settings.max_handshakes / 4).max(1),
            drain: Arc::new(crate::drain::Drain::default()),
            drain_timeout: settings.drain_timeout,
            upstreams: crate::upstream::Upstreams::new(metrics),
        });
        shared.upstreams.apply(&settings.services);
        let (reload_tx, reload_rx) = mpsc::channel(4);
        Ok(BoundGateway {
            shared,
            listener: Some(listener),
            admin,
            public,
            http,
            fingerprint,
            settings,
            keys,
            reload_tx,
            reload_rx,
        })
    }

    pub fn listen_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.listener {
            Some(l) => l.local_addr(),
            None => Err(io::Error::other("the gateway is running")),
        }
    }

    /// The bound address of `admin_listen`, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound public address of a service's `tcp_listen`.
    pub fn service_addr(&self, name: &str) -> Option<SocketAddr> {
        self.public
            .iter()
            .find(|p| matches!(&p.entry, Entry::Service { name: n, .. } if n == name))
            .and_then(PublicPort::bound)
    }

    /// The bound addresses of `[http]`'s `listen` and `tls_listen`.
    pub fn http_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let find = |https: bool| {
            self.public
                .iter()
                .find(|p| p.entry == Entry::Http { https })
                .and_then(PublicPort::bound)
        };
        (find(false), find(true))
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Counters and state shown on `/metrics` and the status page.
    pub fn metrics(&self) -> Arc<GatewayMetrics> {
        self.shared.metrics.clone()
    }

    /// A handle that installs new configurations while [`BoundGateway::run`] serves.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            tx: self.reload_tx.clone(),
        }
    }

    /// Starts (or restarts, after its entry changed) the accept loop of a public port.
    fn start(&self, port: &mut PublicPort, tasks: &mut JoinSet<()>) {
        if let Some(t) = port.task.take() {
            t.abort();
        }
        let addr = port.bound().map(|a| a.to_string()).unwrap_or_default();
        let l = port.listener.clone();
        let shared = self.shared.clone();
        let task = match (&port.entry, &self.http) {
            (Entry::Service { name, accept_proxy }, _) => {
                info!(service = %name, %addr, accept_proxy, "listening for clients");
                tasks.spawn(client_accept_loop(shared, name.clone(), l, *accept_proxy))
            }
            (Entry::Http { https }, Some(cell)) => {
                info!(%addr, "listening for {} clients", if *https { "HTTPS" } else { "HTTP" });
                let metrics = shared.metrics.clone();
                tasks.spawn(crate::http::accept_loop(
                    shared,
                    metrics,
                    cell.clone(),
                    l,
                    *https,
                ))
            }
            // Not reached: an [http] port exists only with its front.
            (Entry::Http { .. }, None) => return,
        };
        port.task = Some(task);
    }

    /// Serves until `shutdown` completes, then drains: public listeners close at once, agents
    /// stay connected so that clients already waiting still get their data connection, and
    /// relayed clients have `drain_timeout` to finish before everything stops. Meanwhile,
    /// configurations sent through a [`Reloader`] are installed.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(timer_task(shared.clone()));
        tasks.spawn(crate::drain::release_memory(shared.drain.clone()));
        if let Some(l) = self.admin.take() {
            info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin endpoint listening");
            let routes: Arc<dyn crate::admin::AdminRoutes> = shared.metrics.clone();
            tasks.spawn(crate::admin::serve(l, routes));
        }
        if let Some(l) = self.listener.take() {
            info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening for agents");
            tasks.spawn(agent_accept_loop(shared.clone(), l));
        }
        // Public entry points, closed first on shutdown.
        let mut public_tasks = JoinSet::new();
        let mut ports = std::mem::take(&mut self.public);
        for port in &mut ports {
            self.start(port, &mut public_tasks);
        }
        self.public = ports;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(req) = self.reload_rx.recv() => {
                    let result = self.apply(req.settings, &mut public_tasks).await;
                    shared.metrics.config_reload(result.is_ok());
                    let _ = req.reply.send(result);
                }
                // Reap finished accept loops (aborted by a reload) so the set stays small.
                Some(_) = public_tasks.join_next(), if !public_tasks.is_empty() => {}
            }
        }
        self.public.clear();
        public_tasks.shutdown().await;
        let (active, limit) = (shared.drain.active(), shared.drain_timeout);
        info!(active, "shutting down: no new clients; waiting up to {limit:?} for {active} connections to finish");
        match tokio::time::timeout(limit, shared.drain.idle()).await {
            Ok(()) => info!("drained: every connection finished"),
            Err(_) => warn!(
                remaining = shared.drain.active(),
                "drain_timeout passed: closing the remaining connections"
            ),
        }
        tasks.abort_all();
    }

    /// Installs `new` whole, or nothing of it: everything that can fail (stretching keys,
    /// certificates, routes, binding new ports) is done before anything changes.
    async fn apply(
        &mut self,
        mut new: GatewaySettings,
        public_tasks: &mut JoinSet<()>,
    ) -> Result<Reloaded, GatewayError> {
        let needs_restart = keep_restart_only(&self.settings, &mut new);

        let services = service_configs(&new.services, &self.keys).await?;
        let http_changed = new.http != self.settings.http;
        let front = match &new.http {
            Some(h) => Some(crate::http::front(
                h,
                new.timing.handshake_timeout,
                new.timing.token_ttl,
            )?),
            None => None,
        };
        let wanted = public_entries(&new);
        let mut fresh: Vec<PublicPort> = Vec::new();
        for (addr, entry) in &wanted {
            if self.public.iter().any(|p| p.configured == *addr) {
                continue;
            }
            let l = bind(*addr, &entry.describe(), new.tcp_keepalive).await?;
            fresh.push(PublicPort {
                configured: *addr,
                entry: entry.clone(),
                listener: Arc::new(l),
                task: None,
            });
        }

        // Nothing below fails.
        let mut report = Reloaded {
            needs_restart,
            ..Default::default()
        };
        let names: Vec<String> = new.services.iter().map(|s| s.name.clone()).collect();
        self.keys = services
            .iter()
            .zip(&new.services)
            .map(|(c, s)| (s.name.clone(), (s.password.clone(), c.password_key.clone())))
            .collect();
        // New services get their metrics before they can be used.
        let mut with_old = names.clone();
        with_old.extend(self.settings.services.iter().map(|s| s.name.clone()));
        self.shared.metrics.set_services(&with_old);
        {
            let mut inner = self.shared.lock();
            report.services = inner.core.reconfigure(Instant::now(), services);
            self.shared.drive(&mut inner);
        }
        self.shared.upstreams.apply(&new.services);
        // The core sees what agents and clients see; a service can change elsewhere too (its
        // upstreams, its port, its HTTP routes).
        for s in &new.services {
            let old = self.settings.services.iter().find(|o| o.name == s.name);
            if old.is_some_and(|o| o != s) && !report.services.changed.contains(&s.name) {
                report.services.changed.push(s.name.clone());
            }
        }
        let order = |name: &String| new.services.iter().position(|s| s.name == *name);
        report.services.changed.sort_by_key(order);
        self.shared.metrics.set_services(&names);
        match (front, &self.http) {
            (Some(f), Some(cell)) => cell.store(f),
            (Some(f), None) => self.http = Some(crate::http::FrontCell::new(f)),
            (None, _) => self.http = None,
        }
        report.http = http_changed;

        let mut ports = std::mem::take(&mut self.public);
        ports.retain(|p| {
            let keep = wanted.iter().any(|(a, _)| *a == p.configured);
            if !keep {
                info!(addr = %p.configured, "stopped listening: {} is no longer configured", p.entry.describe());
                report.closed.push(p.configured);
            }
            keep
        });
        for port in &mut ports {
            if let Some((_, entry)) = wanted.iter().find(|(a, _)| *a == port.configured) {
                // [http] ports read the new front from its cell: only a new entry restarts.
                if port.entry != *entry {
                    port.entry = entry.clone();
                    self.start(port, public_tasks);
                }
            }
        }
        for mut port in fresh {
            report.opened.push(port.configured);
            self.start(&mut port, public_tasks);
            ports.push(port);
        }
        self.public = ports;
        self.settings = new;
        Ok(report)
    }
}

/// Binds a listener whose accepted connections have TCP_NODELAY set and get TCP keepalive
/// after `keepalive` of silence (zero: none). Both are set on the listener, which Linux copies
/// to every accepted connection: no system call per connection.
async fn bind(
    addr: SocketAddr,
    what: &str,
    keepalive: Duration,
) -> Result<TcpListener, GatewayError> {
    let error = |source| GatewayError::Bind {
        addr,
        what: what.to_owned(),
        source,
    };
    let l = TcpListener::bind(addr).await.map_err(error)?;
    crate::sockopt::nodelay(&l).map_err(error)?;
    crate::sockopt::keepalive(&l, keepalive).map_err(error)?;
    Ok(l)
}

async fn timer_task(shared: Arc<Shared>) {
    loop {
        let deadline = {
            let mut inner = shared.lock();
            let d = inner.core.poll_timeout();
            inner.armed = d;
            d
        };
        let notified = shared.timer.notified();
        match deadline {
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t.into()) => {}
                    _ = notified => continue,
                }
            }
            None => {
                notified.await;
                continue;
            }
        }
        let mut inner = shared.lock();
        inner.core.handle_timeout(Instant::now());
        shared.drive(&mut inner);
    }
}

async fn accept_backoff(e: &std::io::Error) {
    // EMFILE and friends: back off instead of spinning on a failing accept.
    warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn agent_accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // IPv4 peers of a dual-stack listener arrive as ::ffff:a.b.c.d; say a.b.c.d.
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                let Some(slot) = handshake_slot(&shared, peer, "agent port") else {
                    continue; // dropping the stream closes it
                };
                tokio::spawn(agent_conn(shared.clone(), stream, peer, slot));
            }
            Err(e) => accept_backoff(&e).await,
        }
    }
}

/// One of the `max_handshakes` slots, held by a connection until its handshake is over. One
/// address holds at most a quarter of them, so a flood from one address cannot lock out the
/// others.
pub(crate) struct HandshakeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut per = self
            .shared
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

/// A handshake slot for a connection from `peer`, or `None` when every slot is taken, or a
/// quarter of them by `peer`'s address: the connection is then closed at once, so a flood of
/// idle connections cannot hold more than that many sockets.
fn handshake_slot(shared: &Arc<Shared>, peer: SocketAddr, on: &str) -> Option<HandshakeSlot> {
    const WARN_EVERY: Duration = Duration::from_secs(10);
    let ip = peer.ip();
    let refused = |why: &'static str, what: &str| {
        shared.metrics.handshake_dropped(why);
        let mut s = shared.saturated.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        let now = Instant::now();
        if s.0.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
            let refused = std::mem::take(&mut s.1);
            s.0 = Some(now);
            warn!(%peer, refused, "{what}: closing new connections on the {on} at once ({refused} since the last warning)");
        } else {
            debug!(%peer, "connection on the {on} closed: {what}");
        }
        None
    };
    // Both counts move under one lock, so concurrent accept loops cannot overshoot either.
    let outcome = {
        let mut per = shared.per_address.lock().unwrap_or_else(|p| p.into_inner());
        if per.get(&ip).is_some_and(|n| *n >= shared.max_per_address) {
            Err((
                "address_overloaded",
                "this address holds its share of the handshake slots (a quarter of max_handshakes)",
            ))
        } else {
            match shared.handshakes.clone().try_acquire_owned() {
                Ok(permit) => {
                    *per.entry(ip).or_insert(0) += 1;
                    Ok(permit)
                }
                Err(_) => Err((
                    "overloaded",
                    "every handshake slot is taken (max_handshakes)",
                )),
            }
        }
    };
    match outcome {
        Ok(permit) => Some(HandshakeSlot {
            _permit: permit,
            shared: shared.clone(),
            ip,
        }),
        Err((why, what)) => refused(why, what),
    }
}

/// Resolves the DNS names of access rules now, for the decision about a connection that just
/// arrived, and hands the addresses to the core. A name that does not resolve matches nothing.
async fn resolve_rule_names(shared: &Shared, names: Vec<String>) {
    // A burst of connections shares one lookup per name and second: a flood cannot turn into
    // a flood of DNS queries (or of blocking resolver threads).
    const FRESH: Duration = Duration::from_secs(1);
    for name in names {
        let fresh = {
            let done = shared.resolved_at.lock().unwrap_or_else(|p| p.into_inner());
            done.get(&name).is_some_and(|t| t.elapsed() < FRESH)
        };
        if fresh {
            continue;
        }
        let addrs = match tokio::time::timeout(
            shared.handshake_timeout,
            tokio::net::lookup_host((name.as_str(), 0)),
        )
        .await
        {
            Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            Ok(Err(e)) => {
                warn!(%name, "access rule name does not resolve: {e}");
                Vec::new()
            }
            Err(_) => {
                warn!(%name, "access rule name did not resolve within {:?}", shared.handshake_timeout);
                Vec::new()
            }
        };
        debug!(%name, ?addrs, "access rule name resolved");
        shared
            .lock()
            .core
            .handle_resolved(Instant::now(), &name, addrs);
        shared
            .resolved_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, Instant::now());
    }
}

/// Why a connection on the agent port was dropped before its hello: a metrics label and the
/// logged explanation.
type Dropped = (&'static str, String);

/// Reads until the intake has classified the connection. Returns the classification and the
/// bytes read past it.
async fn classify(stream: &mut MaybeTls, tls: bool) -> Result<(Classified, Vec<u8>), Dropped> {
    let mut intake = Intake::new(tls);
    let mut buf = [0u8; 512];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| ("read_error", format!("read failed: {e}")))?;
        if n == 0 {
            return Err(("closed", "closed before its hello".into()));
        }
        let mut input = &buf[..n];
        match intake.handle_input(&mut input) {
            Ok(Some(c)) => return Ok((c, input.to_vec())),
            Ok(None) => {}
            Err(e) => {
                let label = match e.code() {
                    Some(code) => {
                        let _ = stream.write_all(&encode_error(code, &e.to_string())).await;
                        let _ = stream.shutdown().await;
                        code.name()
                    }
                    None => "bad_magic",
                };
                return Err((label, e.to_string()));
            }
        }
    }
}

async fn agent_conn(shared: Arc<Shared>, mut tcp: TcpStream, via: SocketAddr, slot: HandshakeSlot) {
    let timeout = shared.handshake_timeout;
    // A balancer's health check (a LOCAL header, then close) is routine, not worth a warning.
    let mut health_check = false;
    let peer = if shared.accept_proxy {
        match crate::proxy_header::read(&mut tcp, via, timeout).await {
            Ok(origin) => {
                debug!(%via, client = %origin.client, "PROXY header on agent port");
                health_check = origin.header == dialback_core::proxy_protocol::ProxyHeader::Local;
                origin.client
            }
            Err(e) => {
                shared.metrics.handshake_dropped(e.label());
                warn!(%via, "connection on agent port dropped: PROXY header: {e}");
                return;
            }
        }
    } else {
        via
    };
    let opened = tokio::time::timeout(timeout, async {
        let mut first = [0u8; 1];
        let n = tcp
            .peek(&mut first)
            .await
            .map_err(|e| ("read_error", format!("read failed: {e}")))?;
        if n == 0 {
            return Err(("closed", "closed without sending anything".to_owned()));
        }
        let mut stream = if first[0] == TLS_HANDSHAKE_RECORD {
            let tls = shared
                .acceptor
                .accept(tcp)
                .await
                .map_err(|e| ("tls_error", format!("TLS handshake failed: {e}")))?;
            MaybeTls::ServerTls(Box::new(tls))
        } else {
            MaybeTls::Plain(tcp)
        };
        let tls = stream.is_tls();
        let (class, rest) = classify(&mut stream, tls).await?;
        Ok((stream, class, rest))
    })
    .await;
    let (stream, class, rest) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err(("closed", _))) if health_check => {
            debug!(%peer, "balancer health check on the agent port");
            return;
        }
        Ok(Err((label, reason))) => {
            shared.metrics.handshake_dropped(label);
            warn!(%peer, "connection on agent port dropped: {reason}");
            return;
        }
        Err(_) => {
            shared.metrics.handshake_dropped("timeout");
            warn!(%peer, "connection on agent port dropped: no hello within {timeout:?}");
            return;
        }
    };
    if let Classified::Control = class {
        // An address that keeps failing to authenticate waits longer and longer before its
        // hello is looked at; it keeps its handshake slot meanwhile, so a flood of them stays
        // within max_handshakes. Data connections (tokens, not passwords) never wait.
        let delay = shared
            .lock()
            .core
            .admission_delay(Instant::now(), peer.ip());
        if !delay.is_zero() {
            shared.metrics.auth_delayed();
            let delay_ms = delay.as_millis() as u64;
            info!(%peer, delay_ms, "control connection held for {delay:?} after failed authentications from this address");
            tokio::time::sleep(delay).await;
        }
        // Resolved now, for this connection's hello, while it still holds its slot.
        let names = shared.lock().core.agent_names();
        if !names.is_empty() {
            resolve_rule_names(&shared, names).await;
        }
    }
    drop(slot);
    match class {
        Classified::Control => control_conn(shared, stream, peer, rest).await,
        Classified::Data(hello) => data_conn(shared, stream, peer, hello, rest).await,
    }
}

async fn control_conn(shared: Arc<Shared>, stream: MaybeTls, peer: SocketAddr, early: Vec<u8>) {
    let exporter = match &stream {
        MaybeTls::ServerTls(s) => tls::export_keying_material(s.get_ref().1),
        _ => return, // the intake refuses control connections without TLS
    };
    let exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            warn!(%peer, "control connection dropped: {e}");
            return;
        }
    };
    let conn = ConnId(shared.next_id());
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let mut inner = shared.lock();
        inner.conns.insert(conn, tx);
        let now = Instant::now();
        inner.core.handle_control_open(now, conn, peer, exporter);
        inner.core.handle_control_input(now, conn, &early);
        shared.drive(&mut inner);
    }
    debug!(conn = conn.0, %peer, "control connection opened");
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (closed_tx, mut closed_rx) = oneshot::channel::<()>();
    // A peer that stops reading (frozen, black-holed) must not pin this task and its socket:
    // every write gets a deadline, after which the connection is given up.
    let stall = shared.handshake_timeout.max(Duration::from_secs(10));
    let writer = tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                CtrlCmd::Write(b) => {
                    if !matches!(
                        tokio::time::timeout(stall, wr.write_all(&b)).await,
                        Ok(Ok(()))
                    ) {
                        break;
                    }
                }
                CtrlCmd::Close => break,
            }
        }
        let _ = tokio::time::timeout(stall, async {
            let _ = wr.flush().await;
            let _ = wr.shutdown().await;
        })
        .await;
        let _ = closed_tx.send(());
    });
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            r = rd.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut inner = shared.lock();
                let now = Instant::now();
                inner.core.handle_control_input(now, conn, &buf[..n]);
                shared.drive(&mut inner);
                if let Some(m) = inner.registered.get(&conn).and_then(|s| shared.metrics.service(s)) {
                    m.agent_heard(now);
                }
            }
            _ = &mut closed_rx => break,
        }
    }
    {
        let mut inner = shared.lock();
        inner.core.handle_control_closed(Instant::now(), conn);
        shared.drive(&mut inner);
        if let Some(tx) = inner.conns.remove(&conn) {
            let _ = tx.send(CtrlCmd::Close);
        }
    }
    let _ = writer.await;
    debug!(conn = conn.0, %peer, "control connection closed");
}

/// What the core decided about a data connection's hello.
enum HelloOutcome {
    /// For this waiting client: answer DATA_ACCEPT and hand the connection over.
    Paired(dialback_core::gateway::Paired, Waiting, MaybeTls, Vec<u8>),
    /// Parked in the pool (to be watched), or dropped at once (`None`).
    Parked(Option<u64>),
    /// Refused with this reason; `None` when the client left meanwhile.
    Refused(Option<dialback_core::gateway::DataReject>, MaybeTls),
}

/// Hands a data connection's hello to the core and acts on the decision, in one critical
/// section.
fn decide_hello(
    shared: &Arc<Shared>,
    stream: MaybeTls,
    peer: SocketAddr,
    hello: &dialback_core::wire::DataHello,
    early: Vec<u8>,
) -> HelloOutcome {
    let tls = stream.is_tls();
    let mut inner = shared.lock();
    let r = inner.core.handle_data_hello(Instant::now(), hello, tls);
    let outcome = match r {
        Ok(DataOutcome::Paired(p)) => match inner.clients.remove(&p.client) {
            Some(w) => HelloOutcome::Paired(p, w, stream, early),
            None => HelloOutcome::Refused(None, stream),
        },
        Ok(DataOutcome::Parked {
            pooled, service, ..
        }) => {
            // In the same critical section as the core's decision: from now on a client may
            // be handed this connection, so it must already be in the map.
            let parked = park(shared, &mut inner, stream, peer, pooled, service, early);
            HelloOutcome::Parked(parked.then_some(pooled))
        }
        Err(rej) => HelloOutcome::Refused(Some(rej), stream),
    };
    shared.drive(&mut inner);
    outcome
}

async fn data_conn(
    shared: Arc<Shared>,
    stream: MaybeTls,
    peer: SocketAddr,
    hello: dialback_core::wire::DataHello,
    early: Vec<u8>,
) {
    let (paired, waiting, mut stream, early) = match decide_hello(
        &shared, stream, peer, &hello, early,
    ) {
        HelloOutcome::Paired(p, w, stream, early) => (p, w, stream, early),
        // This task stays as the parked connection's watcher.
        HelloOutcome::Parked(Some(pooled)) => return watch_parked(&shared, pooled).await,
        HelloOutcome::Parked(None) => return,
        HelloOutcome::Refused(rej, mut stream) => {
            let (code, msg) = match rej {
                Some(r) => (r.code, r.message),
                None => (
                    ErrorCode::SessionGone,
                    "the client left before the data connection arrived".to_owned(),
                ),
            };
            shared.metrics.data_refused(code.name());
            warn!(%peer, service = %hello.service, code = %code, "data connection refused: {msg}");
            let _ = stream.write_all(&encode_error(code, &msg)).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    if let Err(e) = stream.write_all(&encode_accept()).await {
        warn!(%peer, service = %paired.service, "data connection lost before pairing: {e}");
        return; // dropping the sender closes the client
    }
    if let Some(m) = shared.metrics.service(&paired.service) {
        m.pairing_latency(waiting.since.elapsed());
    }
    debug!(%peer, service = %paired.service, request = paired.request_id, "data connection paired");
    let _ = waiting.tx.send(Ok(DataConn {
        stream,
        early,
        lease: None,
    }));
}

/// Parks a pooled data connection in the shared map; the caller then watches it with
/// [`watch_parked`]. Anything the agent sends before DATA_BIND, EOF included, means the
/// connection is unusable: it is then closed, never handed out. Returns whether it was parked.
fn park(
    shared: &Arc<Shared>,
    inner: &mut Inner,
    stream: MaybeTls,
    peer: SocketAddr,
    pooled: u64,
    service: String,
    early: Vec<u8>,
) -> bool {
    let usable = if !early.is_empty() {
        Err("the agent sent payload before DATA_BIND".to_owned())
    } else if parked_tcp(&stream).is_none() {
        Err("not a gateway-side data connection".to_owned())
    } else {
        Ok(())
    };
    match usable {
        Ok(()) => {
            debug!(%peer, %service, pooled, "data connection parked in the pool");
            inner.pooled.insert(
                pooled,
                Parked {
                    service: service.clone(),
                    stream: Some(stream),
                    watcher: None,
                },
            );
            shared.sync_pool(inner, &service);
            true
        }
        Err(e) => {
            inner.core.handle_pooled_gone(Instant::now(), pooled, &e);
            debug!(%peer, %service, pooled, "pooled data connection dropped: {e}");
            false
        }
    }
}

/// The TCP socket under a gateway-side data connection.
fn parked_tcp(stream: &MaybeTls) -> Option<&TcpStream> {
    match stream {
        MaybeTls::Plain(s) => Some(s),
        MaybeTls::ServerTls(s) => Some(s.get_ref().0),
        _ => None,
    }
}

/// Whether a parked socket is still quiet: no EOF, no error, no bytes. Never consumes input.
fn still_quiet(s: &TcpStream) -> Result<(), String> {
    let mut probe = [0u8; 1];
    match s.try_io(tokio::io::Interest::READABLE, || {
        use std::os::fd::AsRawFd;
        // SAFETY: a non-blocking peek into a valid buffer on a socket fd we hold.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                probe.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n)
        }
    }) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(format!("read failed: {e}")),
        Ok(0) => Err("closed by the agent".into()),
        Ok(_) => Err("the agent sent payload before DATA_BIND".into()),
    }
}

/// Watches parked connection `pooled` from the task that accepted it, on the socket's own
/// registration (no duplicate descriptor, no extra task): it must not become readable before
/// DATA_BIND, and if it does it is taken out of the pool and closed. Returns as soon as the
/// connection has left the pool (bound to a client, or retired), which wakes this task.
async fn watch_parked(shared: &Arc<Shared>, pooled: u64) {
    let lost = std::future::poll_fn(|cx| {
        let mut inner = shared.lock();
        let Some(p) = inner.pooled.get_mut(&pooled) else {
            return Poll::Ready(None);
        };
        let Some(tcp) = p.stream.as_ref().and_then(parked_tcp) else {
            return Poll::Ready(None);
        };
        loop {
            match tcp.poll_read_ready(cx) {
                Poll::Pending => {
                    if !p.watcher.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        p.watcher = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(format!("wait failed: {e}"))),
                // A peek that would block clears the readiness: wait again.
                Poll::Ready(Ok(())) => {
                    if let Err(reason) = still_quiet(tcp) {
                        return Poll::Ready(Some(reason));
                    }
                }
            }
        }
    })
    .await;
    let Some(reason) = lost else {
        return;
    };
    let gone = {
        let mut inner = shared.lock();
        let gone = inner.pooled.remove(&pooled);
        if let Some(p) = &gone {
            inner
                .core
                .handle_pooled_gone(Instant::now(), pooled, &reason);
            shared.sync_pool(&inner, &p.service);
            shared.drive(&mut inner);
            debug!(service = %p.service, pooled, "pooled data connection dropped: {reason}");
        }
        gone
    };
    // Closes the connection, outside the lock.
    drop(gone);
}

async fn client_accept_loop(
    shared: Arc<Shared>,
    service: String,
    listener: Arc<TcpListener>,
    accept_proxy: bool,
) {
    // The address clients reached, when the listener says it without asking each connection
    // (it is bound to one address, not a wildcard).
    let bound = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                tokio::spawn(client_conn(
                    shared.clone(),
                    service.clone(),
                    stream,
                    peer,
                    bound,
                    accept_proxy,
                ));
            }
            Err(e) => accept_backoff(&e).await,
        }
    }
}

/// Refuses a public client that `clients_allow` of `service` does not cover (and says why);
/// resolves the rule's DNS names first.
pub(crate) async fn check_client(shared: &Arc<Shared>, service: &str, client: SocketAddr) -> bool {
    match client_verdict(shared, service, client).await {
        Ok(()) => true,
        Err(why) => {
            if let Some(m) = shared.metrics.service(service) {
                m.client_refused("not_allowed");
            }
            info!(%client, %service, "client refused: {why}");
            false
        }
    }
}

/// Whether `clients_allow` of `service` covers `client`, and if not why, without logging or
/// counting: for entry points that report refusals their own way (HTTP answers 403).
pub(crate) async fn client_verdict(
    shared: &Arc<Shared>,
    service: &str,
    client: SocketAddr,
) -> Result<(), String> {
    let names = shared.lock().core.client_names(service);
    if !names.is_empty() {
        resolve_rule_names(shared, names).await;
    }
    let verdict = shared.lock().core.client_allowed(service, client.ip());
    verdict
}

/// Why a public client got no data connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OpenError {
    /// Refused before anything was asked of the agent (unknown service, agent offline,
    /// overloaded).
    #[error(transparent)]
    Refused(#[from] ClientReject),
    /// The core gave up on the client with this code (TOKEN_EXPIRED: the agent did not dial
    /// back in time; LOCAL_UNREACHABLE, SESSION_GONE, …); the reason was logged when it
    /// happened. `None` when no code is known.
    #[error("the agent did not provide a data connection ({})", .0.map_or("unknown reason", |c| c.name()))]
    Failed(Option<ErrorCode>),
    /// No answer from the core within the safety-net timeout.
    #[error("no data connection within {0:?}")]
    Timeout(Duration),
    /// A direct service: none of the servers tried accepted the connection (why, per server).
    #[error("no upstream could be reached: {0}")]
    Upstream(String),
}

/// Asks the core for a data connection to `service` on behalf of a public client and waits for
/// it: a pooled one at once, or one the agent dials back for this client. Counts and logs every
/// failure.
pub(crate) async fn open_data(
    shared: &Arc<Shared>,
    service: &str,
    peer: SocketAddr,
    public: Option<SocketAddr>,
) -> Result<DataConn, OpenError> {
    open_data_for(shared, service, peer, public, None)
        .await
        .map(|(d, _)| d)
}

/// [`open_data`] for a raw TCP client: when it is bound to a pooled connection, the bytes
/// the client already sent go out in the same write as DATA_BIND (one segment, one wake-up
/// of the agent, instead of two). Returns the data connection and how many of the client's
/// bytes were sent that way.
async fn open_data_for(
    shared: &Arc<Shared>,
    service: &str,
    peer: SocketAddr,
    public: Option<SocketAddr>,
    client: Option<&TcpStream>,
) -> Result<(DataConn, usize), OpenError> {
    let svc = shared.metrics.service(service);
    if let Some(group) = shared.upstreams.get(service) {
        return match group.connect(peer).await {
            Ok((tcp, lease)) => Ok((
                DataConn {
                    stream: MaybeTls::Plain(tcp),
                    early: Vec::new(),
                    lease: Some(lease),
                },
                0,
            )),
            Err(why) => {
                if let Some(m) = svc {
                    m.client_failed("upstream_unreachable");
                }
                warn!(%peer, %service, "client dropped: no upstream could be reached: {why}");
                Err(OpenError::Upstream(why))
            }
        };
    }
    let since = Instant::now();
    // Each failed pooled connection leaves the pool, so this ends after at most the pool's
    // size in retries; the bound only guards against a bug.
    for _ in 0..=crate::settings::MAX_POOL {
        let id = ClientId(shared.next_id());
        let (tx, rx) = oneshot::channel();
        let route = {
            let mut inner = shared.lock();
            let r = inner
                .core
                .handle_client(Instant::now(), id, service, Some(peer), public);
            let route = match r {
                Ok(ClientRoute::Requested) => {
                    inner.clients.insert(
                        id,
                        Waiting {
                            tx,
                            service: service.to_owned(),
                            since,
                        },
                    );
                    Ok(None)
                }
                Ok(ClientRoute::Pooled { pooled, bind, .. }) => {
                    let parked = inner.pooled.remove(&pooled);
                    shared.sync_pool(&inner, service);
                    Ok(Some((pooled, bind, parked)))
                }
                Err(e) => Err(e),
            };
            shared.drive(&mut inner);
            route
        };
        match route {
            Err(e) => {
                if let Some(m) = svc {
                    m.client_refused(match e {
                        ClientReject::UnknownService(_) => "unknown_service",
                        ClientReject::AgentOffline(_) => "agent_offline",
                        ClientReject::Overloaded { .. } => "overloaded",
                    });
                }
                info!(%peer, %service, "client refused: {e}");
                return Err(e.into());
            }
            Ok(None) => {
                return await_dialback(shared, service, peer, id, rx)
                    .await
                    .map(|d| (d, 0))
            }
            Ok(Some((pooled, bind, parked))) => {
                match bind_pooled(shared, parked, bind, client).await {
                    Ok((stream, ahead)) => {
                        if let Some(m) = svc {
                            m.pairing_latency(since.elapsed());
                        }
                        debug!(%peer, %service, pooled, "client bound to a pooled data connection");
                        let data = DataConn {
                            stream,
                            early: Vec::new(),
                            lease: None,
                        };
                        return Ok((data, ahead));
                    }
                    Err(e) => {
                        let (BindError::ClientBytesLost(reason) | BindError::Unusable(reason)) = &e;
                        let mut inner = shared.lock();
                        inner
                            .core
                            .handle_pooled_gone(Instant::now(), pooled, reason);
                        shared.drive(&mut inner);
                        drop(inner);
                        if matches!(e, BindError::ClientBytesLost(_)) {
                            debug!(%peer, %service, pooled, "pooled data connection lost with the client's first bytes ({reason}); closing the client");
                            return Err(OpenError::Failed(None));
                        }
                        debug!(%peer, %service, pooled, "pooled data connection unusable ({reason}); trying again");
                    }
                }
            }
        }
    }
    warn!(%peer, %service, "client dropped: no usable pooled data connection");
    Err(OpenError::Failed(None))
}

/// Why a pooled connection could not be bound.
enum BindError {
    /// Unusable, and nothing of the client's was consumed: try another one.
    Unusable(String),
    /// The write failed after the client's first bytes were read: the client cannot be
    /// served without them.
    ClientBytesLost(String),
}

/// At most this many bytes the client already sent ride along with DATA_BIND.
const BIND_AHEAD: usize = 2048;

/// Checks that a pooled connection taken from the pool is still quiet, then writes DATA_BIND
/// to it, followed in the same write by what `client` has already sent (without waiting for
/// it). Returns the connection and how many client bytes went with DATA_BIND.
async fn bind_pooled(
    shared: &Shared,
    parked: Option<Parked>,
    mut bind: Vec<u8>,
    client: Option<&TcpStream>,
) -> Result<(MaybeTls, usize), BindError> {
    let gone = || BindError::Unusable("not in the pool any more".into());
    let Some(mut p) = parked else {
        return Err(gone());
    };
    let Some(mut stream) = p.stream.take() else {
        return Err(gone());
    };
    drop(p); // ends the watcher
    let tcp = parked_tcp(&stream)
        .ok_or_else(|| BindError::Unusable("not a gateway-side data connection".into()))?;
    still_quiet(tcp).map_err(BindError::Unusable)?;
    let ahead = client.map_or(0, |c| read_ahead(c, &mut bind));
    let write = async {
        // A fresh connection's send buffer is empty: this write is nearly always complete at
        // once, without arming a timer.
        let mut done = match &stream {
            MaybeTls::Plain(s) => match s.try_write(&bind) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(format!("write failed: {e}")),
            },
            _ => 0,
        };
        if done < bind.len() {
            match tokio::time::timeout(shared.handshake_timeout, stream.write_all(&bind[done..]))
                .await
            {
                Ok(Ok(())) => done = bind.len(),
                Ok(Err(e)) => return Err(format!("write failed: {e}")),
                Err(_) => return Err("stalled at DATA_BIND".into()),
            }
        }
        Ok(done)
    };
    match write.await {
        Ok(_) => Ok((stream, ahead)),
        Err(e) if ahead > 0 => Err(BindError::ClientBytesLost(e)),
        Err(e) => Err(BindError::Unusable(e)),
    }
}

/// Appends to `out` what the client has already sent, up to [`BIND_AHEAD`] bytes, without
/// waiting; returns how many. Nothing (0) when it sent nothing yet, or closed, or failed: the
/// relay then sees that for itself.
fn read_ahead(client: &TcpStream, out: &mut Vec<u8>) -> usize {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; BIND_AHEAD];
    // A plain non-blocking recv, not through tokio's readiness (which may not have seen the
    // client's bytes yet): the relay's first splice clears any readiness left stale.
    // SAFETY: a non-blocking recv into a valid buffer on a socket fd we hold.
    let n = unsafe {
        libc::recv(
            client.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    match usize::try_from(n) {
        Ok(n) if n > 0 => {
            out.extend_from_slice(&buf[..n]);
            n
        }
        _ => 0,
    }
}

/// Waits for the data connection the agent was asked to dial back for client `id`.
async fn await_dialback(
    shared: &Arc<Shared>,
    service: &str,
    peer: SocketAddr,
    id: ClientId,
    rx: oneshot::Receiver<Result<DataConn, ErrorCode>>,
) -> Result<DataConn, OpenError> {
    // The core fails the client when its token expires; the outer timeout is a safety net.
    let guard = shared.token_ttl + Duration::from_secs(5);
    match tokio::time::timeout(guard, rx).await {
        Ok(Ok(Ok(d))) => Ok(d),
        // Failed by the core; the reason was logged there.
        Ok(Ok(Err(code))) => Err(OpenError::Failed(Some(code))),
        Ok(Err(_)) => Err(OpenError::Failed(None)),
        Err(_) => {
            let mut inner = shared.lock();
            inner.core.handle_client_gone(Instant::now(), id);
            inner.clients.remove(&id);
            shared.drive(&mut inner);
            if let Some(m) = shared.metrics.service(service) {
                m.client_failed("timeout");
            }
            warn!(%peer, %service, "client dropped: no data connection within {guard:?}");
            Err(OpenError::Timeout(guard))
        }
    }
}

async fn client_conn(
    shared: Arc<Shared>,
    service: String,
    mut client: TcpStream,
    via: SocketAddr,
    bound: Option<SocketAddr>,
    accept_proxy: bool,
) {
    let _serving = shared.drain.guard();
    let mut public = bound.or_else(|| client.local_addr().ok());
    let peer = if accept_proxy {
        let Some(slot) = handshake_slot(&shared, via, "public port") else {
            return;
        };
        match crate::proxy_header::read(&mut client, via, shared.handshake_timeout).await {
            Ok(origin) => {
                if origin.header == dialback_core::proxy_protocol::ProxyHeader::Local {
                    // A balancer's health check usually closes right after its header: do not
                    // ask the agent for a connection unless a byte follows.
                    let mut first = [0u8; 1];
                    let peeked =
                        tokio::time::timeout(shared.handshake_timeout, client.peek(&mut first))
                            .await;
                    if !matches!(peeked, Ok(Ok(1))) {
                        debug!(%via, %service, "balancer health check on the public port");
                        return;
                    }
                }
                drop(slot);
                public = origin.destination.or(public);
                origin.client
            }
            Err(e) => {
                if let Some(m) = shared.metrics.service(&service) {
                    m.client_refused(e.label());
                }
                warn!(%via, %service, "client dropped: PROXY header: {e}");
                return;
            }
        }
    } else {
        via
    };
    if !check_client(&shared, &service, peer).await {
        return;
    }
    let Ok((data, ahead)) = open_data_for(&shared, &service, peer, public, Some(&client)).await
    else {
        return;
    };
    let DataConn {
        stream,
        early,
        lease: _lease,
    } = data;
    let Some(svc) = shared.metrics.service(&service) else {
        return;
    };
    let conn = svc.connection_opened();
    conn.add_up(ahead as u64);
    let (up, down) = (|n| conn.add_up(n), |n| conn.add_down(n));
    match crate::relay::relay(client, stream, &early, &up, &down).await {
        Ok((up, down)) => debug!(%peer, %service, up = up + ahead as u64, down, "client done"),
        Err(e) => debug!(%peer, %service, "client relay ended: {e}"),
    }
}
