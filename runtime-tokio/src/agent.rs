//! The agent on tokio: one control connection per service, reconnecting with backoff; a fresh
//! data connection back to the gateway for every public client, or ready in advance in the
//! gateway's pool.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dialback_core::agent::{AgentControl, AgentEvent, ConnectRequest};
use dialback_core::crypto::PasswordKey;
use dialback_core::data::{encode_data_hello, AnswerDecoder, DataAnswer};
use dialback_core::{ErrorCode, Timing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::metrics::AgentMetrics;
use crate::settings::{AgentService, AgentSettings, GatewayTrust};
use crate::stream::MaybeTls;
use crate::tls;

const SOFTWARE: &str = concat!("dialback ", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum AgentSetupError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("gateway address {0:?} must look like host:port")]
    BadGateway(String),
    #[error("cannot listen on {addr} (admin_listen): {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Why one attempt to hold a control session ended.
impl SessionEnd {
    /// Metrics label for why a registration attempt failed.
    fn reason(&self, via_proxy: bool) -> &'static str {
        match self {
            SessionEnd::Connect(_) if via_proxy => "proxy",
            SessionEnd::Connect(_) => "connect",
            SessionEnd::Tls { .. } => "tls",
            SessionEnd::ConnectTimeout(_) => "timeout",
            SessionEnd::Protocol(dialback_core::agent::AgentError::Refused { code, .. }) => {
                code.name()
            }
            SessionEnd::Protocol(dialback_core::agent::AgentError::GatewayProofInvalid) => {
                "gateway_proof_invalid"
            }
            SessionEnd::Protocol(_) => "protocol",
            SessionEnd::Io(_) => "io",
            SessionEnd::Stopping => "stopping",
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Connect(String),
    #[error("TLS handshake with gateway {addr} failed: {err}")]
    Tls { addr: String, err: String },
    #[error("timed out after {0:?} connecting to the gateway")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Protocol(#[from] dialback_core::agent::AgentError),
    #[error("connection to the gateway lost: {0}")]
    Io(String),
    /// The agent is stopping (a session that was registered told its gateway: ERROR
    /// SHUTTING_DOWN).
    #[error("the agent is stopping")]
    Stopping,
}

struct Ctx {
    gateway: String,
    server_name: rustls_pki_types::ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
    tcp_keepalive: Duration,
    timing: Timing,
    proxies: Vec<dialback_core::connect_chain::ProxyHop>,
    metrics: Arc<AgentMetrics>,
    /// Relays in progress; shutdown waits for them.
    drain: Arc<crate::drain::Drain>,
    /// Becomes true when the agent stops: registered sessions tell the gateway so.
    stopping: watch::Receiver<bool>,
}

/// Completes once the agent is stopping (at once if it already is).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which happens only as the agent ends.
    let _ = stopping.wait_for(|s| *s).await;
}

/// How long a stopping agent gives its sessions to tell their gateways (ERROR SHUTTING_DOWN and
/// the TLS close) before it drops them.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// On shutdown, how long relays in progress may take to finish.
pub const AGENT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs every configured service until `shutdown` completes. Then the control connections
/// close (the gateway stops sending clients) and relays in progress get
/// [`AGENT_DRAIN_TIMEOUT`] to finish.
pub async fn run(
    settings: AgentSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentSetupError> {
    let names: Vec<String> = settings.services.iter().map(|s| s.name.clone()).collect();
    run_with_metrics(settings, Arc::new(AgentMetrics::new(&names)), shutdown).await
}

/// [`run`] with counters the caller can serve (the agent's optional `/metrics`).
pub async fn run_with_metrics(
    settings: AgentSettings,
    metrics: Arc<AgentMetrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentSetupError> {
    if settings.gateways.is_empty() {
        return Err(AgentSetupError::BadGateway(String::new()));
    }
    if settings.trust == GatewayTrust::Insecure {
        warn!("insecure = true: the gateway's certificate is NOT verified; anyone on the path can impersonate it and learn enough to guess the service passwords offline");
    }
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(&settings.trust)?);
    let drain = Arc::new(crate::drain::Drain::default());
    let (stop_tx, stopping) = watch::channel(false);
    // One context per gateway: every service registers with each of them independently.
    let mut contexts = Vec::new();
    for gateway in &settings.gateways {
        let host =
            split_host(gateway).ok_or_else(|| AgentSetupError::BadGateway(gateway.clone()))?;
        let name = settings
            .server_name
            .clone()
            .unwrap_or_else(|| host.to_owned());
        let server_name = match tls::server_name(&name) {
            Ok(n) => n,
            // Pinned and insecure trust do not look at the name, so any placeholder works.
            Err(_)
                if matches!(
                    settings.trust,
                    GatewayTrust::Fingerprint(_) | GatewayTrust::Insecure
                ) =>
            {
                tls::server_name("dialback-gateway")?
            }
            Err(e) => return Err(e.into()),
        };
        contexts.push(Arc::new(Ctx {
            gateway: gateway.clone(),
            server_name,
            connector: connector.clone(),
            connect_timeout: settings.connect_timeout,
            tcp_keepalive: settings.tcp_keepalive,
            timing: Timing {
                handshake_timeout: settings.connect_timeout,
                ..Timing::default()
            },
            proxies: settings.proxies.clone(),
            metrics: metrics.clone(),
            drain: drain.clone(),
            stopping: stopping.clone(),
        }));
        if !settings.proxies.is_empty() {
            info!(
                "reaching gateway {} through {} proxies: {}",
                gateway,
                settings.proxies.len(),
                crate::outbound::describe(&settings.proxies)
            );
        }
    }
    if settings.gateways.len() > 1 {
        info!(
            gateways = settings.gateways.join(", "),
            "registering every service with each of {} gateways",
            settings.gateways.len()
        );
    }
    let mut tasks = JoinSet::new();
    let mut sessions = JoinSet::new();
    tasks.spawn(crate::drain::release_memory(drain.clone()));
    if let Some(addr) = settings.admin_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentSetupError::Bind { addr, source })?;
        info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin endpoint listening");
        let routes: Arc<dyn crate::admin::AdminRoutes> = metrics.clone();
        tasks.spawn(crate::admin::serve(l, routes));
    }
    for svc in settings.services.clone() {
        let name = svc.name.clone();
        let pw = svc.password.0.clone();
        // Stretched once per service, shared by its sessions with every gateway.
        let key = match tokio::task::spawn_blocking(move || PasswordKey::derive(&name, &pw)).await {
            Ok(k) => k,
            Err(e) => {
                error!(service = %svc.name, "cannot derive password key: {e}");
                continue;
            }
        };
        for ctx in &contexts {
            let (ctx, svc, key) = (ctx.clone(), svc.clone(), key.clone());
            let (min, max) = (settings.reconnect_min, settings.reconnect_max);
            sessions.spawn(async move { service_loop(ctx, svc, key, min, max).await });
        }
    }
    shutdown.await;
    // Registered sessions say goodbye (the gateway then logs a routine end, not a lost agent);
    // sessions still connecting or waiting to retry just stop.
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    sessions.abort_all();
    tasks.abort_all();
    let active = drain.active();
    info!(active, "shutting down: control connections closed; waiting up to {AGENT_DRAIN_TIMEOUT:?} for {active} relays to finish");
    match tokio::time::timeout(AGENT_DRAIN_TIMEOUT, drain.idle()).await {
        Ok(()) => info!("drained: every relay finished"),
        Err(_) => warn!(
            remaining = drain.active(),
            "drain timeout passed: closing the remaining relays"
        ),
    }
    Ok(())
}

fn split_host(addr: &str) -> Option<&str> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

/// Exponential backoff with jitter: the n-th retry waits a random time in [d/2, d] where
/// d = min(max, min * 2^n).
fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let d = min.saturating_mul(1u32 << attempt.min(20)).min(max);
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    let frac = 0.5 + 0.5 * f64::from(u32::from_be_bytes(r)) / f64::from(u32::MAX);
    d.mul_f64(frac)
}

async fn service_loop(
    ctx: Arc<Ctx>,
    svc: AgentService,
    key: PasswordKey,
    min: Duration,
    max: Duration,
) {
    let mut attempt: u32 = 0;
    let mut stopping = ctx.stopping.clone();
    loop {
        let mut registered = false;
        let end = session(&ctx, &svc, &key, &mut registered).await;
        if matches!(end, SessionEnd::Stopping) {
            return;
        }
        if registered {
            attempt = 0;
        }
        let wait = backoff(attempt, min, max);
        attempt = attempt.saturating_add(1);
        if let Some(m) = ctx.metrics.service(&svc.name) {
            if registered {
                m.unregistered();
                m.registration_failed("lost");
            } else {
                m.registration_failed(end.reason(!ctx.proxies.is_empty()));
            }
        }
        match &end {
            SessionEnd::Protocol(dialback_core::agent::AgentError::Refused {
                code: ErrorCode::AuthFailed,
                ..
            })
            | SessionEnd::Protocol(dialback_core::agent::AgentError::GatewayProofInvalid) => {
                error!(service = %svc.name, gateway = %ctx.gateway, "{end}; check the service password on both sides; retrying in {wait:.1?}")
            }
            _ if registered => {
                warn!(service = %svc.name, gateway = %ctx.gateway, "control session ended: {end}; reconnecting in {wait:.1?}")
            }
            _ => {
                warn!(service = %svc.name, gateway = %ctx.gateway, attempt, "registration failed: {end}; retrying in {wait:.1?}")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            () = stopped(&mut stopping) => return,
        }
    }
}

async fn dial(ctx: &Ctx, tls: bool) -> Result<MaybeTls, SessionEnd> {
    if !tls {
        // `outbound::connect` keeps to the timeout by itself.
        return crate::outbound::connect(
            &ctx.gateway,
            &ctx.proxies,
            ctx.connect_timeout,
            ctx.tcp_keepalive,
        )
        .await
        .map(MaybeTls::Outbound)
        .map_err(SessionEnd::Connect);
    }
    let fut = async {
        let out = crate::outbound::connect(
            &ctx.gateway,
            &ctx.proxies,
            ctx.connect_timeout,
            ctx.tcp_keepalive,
        )
        .await
        .map_err(SessionEnd::Connect)?;
        let s = ctx
            .connector
            .connect(ctx.server_name.clone(), out)
            .await
            .map_err(|e| SessionEnd::Tls {
                addr: ctx.gateway.clone(),
                err: e.to_string(),
            })?;
        Ok(MaybeTls::ClientTls(Box::new(s)))
    };
    tokio::time::timeout(ctx.connect_timeout, fut)
        .await
        .map_err(|_| SessionEnd::ConnectTimeout(ctx.connect_timeout))?
}

async fn session(
    ctx: &Arc<Ctx>,
    svc: &AgentService,
    key: &PasswordKey,
    registered: &mut bool,
) -> SessionEnd {
    let mut stopping = ctx.stopping.clone();
    // Still connecting: nothing to tell the gateway when the agent stops.
    let dialed = tokio::select! {
        r = dial(ctx, true) => r,
        () = stopped(&mut stopping) => return SessionEnd::Stopping,
    };
    let stream = match dialed {
        Ok(s) => s,
        Err(e) => return e,
    };
    let exporter = match &stream {
        MaybeTls::ClientTls(s) => tls::export_keying_material(s.get_ref().1),
        _ => return SessionEnd::Io("control connection without TLS".into()),
    };
    let exporter = match exporter {
        Ok(e) => e,
        Err(e) => return SessionEnd::Io(e.to_string()),
    };
    let mut nonce = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut nonce) {
        return SessionEnd::Io(format!("no randomness: {e}"));
    }
    let mut ctrl = AgentControl::new(
        Instant::now(),
        &svc.name,
        key,
        &exporter,
        nonce,
        &ctx.timing,
        SOFTWARE,
    );
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<(u64, ErrorCode, String)>();
    // Dropped when this session ends: pooled data connections still waiting for a client
    // belong to it and close with it.
    let (_session_alive, session_ended) = watch::channel(());
    let mut buf = vec![0u8; 4096];
    loop {
        while let Some(bytes) = ctrl.poll_transmit() {
            // A gateway that stops reading must not freeze this loop (and its liveness timers).
            match tokio::time::timeout(ctx.connect_timeout, wr.write_all(&bytes)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return SessionEnd::Io(e.to_string()),
                Err(_) => {
                    return SessionEnd::Io(format!(
                        "gateway stopped reading for {:?}",
                        ctx.connect_timeout
                    ))
                }
            }
        }
        while let Some(ev) = ctrl.poll_event() {
            match ev {
                AgentEvent::Registered {
                    session_id,
                    heartbeat,
                    dead_after,
                    data_tls,
                } => {
                    *registered = true;
                    if let Some(m) = ctx.metrics.service(&svc.name) {
                        m.registered();
                    }
                    info!(service = %svc.name, gateway = %ctx.gateway, session = session_id, ?heartbeat, ?dead_after, data_tls, "registered with gateway");
                }
                AgentEvent::Connect(req) => {
                    tokio::spawn(data_task(
                        ctx.clone(),
                        svc.local.clone(),
                        svc.send_proxy,
                        svc.name.clone(),
                        req,
                        failed_tx.clone(),
                        session_ended.clone(),
                    ));
                }
                AgentEvent::Closed(e) => {
                    let _ = wr.shutdown().await;
                    return SessionEnd::Protocol(e);
                }
            }
        }
        let deadline = ctrl
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) => return SessionEnd::Io("gateway closed the connection".into()),
                Ok(n) => ctrl.handle_input(Instant::now(), &buf[..n]),
                Err(e) => return SessionEnd::Io(e.to_string()),
            },
            _ = tokio::time::sleep_until(deadline.into()) => ctrl.handle_timeout(Instant::now()),
            Some((id, code, msg)) = failed_rx.recv() => ctrl.connect_failed(Instant::now(), id, code, &msg),
            () = stopped(&mut stopping) => {
                // The code says it all: the gateway logs "the agent is shutting down".
                ctrl.close(Instant::now(), ErrorCode::ShuttingDown, "");
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
                    while let Some(bytes) = ctrl.poll_transmit() {
                        wr.write_all(&bytes).await?;
                    }
                    wr.shutdown().await
                })
                .await;
                return SessionEnd::Stopping;
            }
        }
    }
}

/// A public client's address for logs: `-` when unknown.
#[derive(Clone, Copy)]
struct ClientAddr(Option<std::net::SocketAddr>);

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}

async fn data_task(
    ctx: Arc<Ctx>,
    local: String,
    send_proxy: Option<dialback_core::proxy_protocol::Version>,
    service: String,
    req: ConnectRequest,
    failed: mpsc::UnboundedSender<(u64, ErrorCode, String)>,
    mut session_ended: watch::Receiver<()>,
) {
    let id = req.request_id;
    let metrics = ctx.metrics.clone();
    let svc = metrics.service(&service);
    let fail = |reason: &'static str| {
        if let Some(m) = svc {
            m.data_failed(reason);
        }
    };
    // Formatted only if a log line is written.
    let client = ClientAddr(req.client);
    let opened = async {
        let mut gw = dial(&ctx, req.data_tls).await.map_err(|e| e.to_string())?;
        let hello = encode_data_hello(&req.hello);
        // A fresh plain connection takes the hello at once; only a TLS one, or a full send
        // buffer, needs the timed write.
        let done = match &gw {
            MaybeTls::Outbound(out) => match out.tcp().try_write(&hello) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e.to_string()),
            },
            _ => 0,
        };
        if done < hello.len() {
            tokio::time::timeout(ctx.connect_timeout, gw.write_all(&hello[done..]))
                .await
                .map_err(|_| "gateway did not take the data hello in time".to_owned())?
                .map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(gw)
    };
    let mut gw = match opened.await {
        Ok(s) => s,
        Err(e) => {
            fail("connect");
            let what = if req.pooled { "pooled " } else { "" };
            warn!(%service, %client, "cannot open {what}data connection: {e}");
            let _ = failed.send((id, ErrorCode::Internal, e));
            return;
        }
    };
    let answer = async {
        let mut dec = AnswerDecoder::new();
        let mut buf = [0u8; 512];
        loop {
            let n = gw.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(None);
            }
            let mut input = &buf[..n];
            if let Some(a) = dec
                .handle_input(&mut input)
                .map_err(|e| Some(e.to_string()))?
            {
                return Ok((a, input.to_vec()));
            }
        }
    };
    let answer = if req.pooled {
        // Parked at the gateway until a client comes, the gateway retires it, or the session
        // that asked for it ends.
        tokio::select! {
            r = answer => Some(r),
            _ = session_ended.changed() => None,
        }
    } else {
        tokio::time::timeout(ctx.connect_timeout, answer).await.ok()
    };
    // The public client and the gateway address it reached, for logs and the PROXY header.
    let mut origin = (req.client, req.public);
    let (client, early) = match answer {
        Some(Ok((DataAnswer::Accept, early))) => (client, early),
        Some(Ok((DataAnswer::Bind(b), early))) => {
            origin = (b.client, b.public);
            (ClientAddr(b.client), early)
        }
        Some(Err(None)) if req.pooled => {
            debug!(%service, "pooled data connection retired by the gateway");
            return;
        }
        Some(Err(e)) => {
            let e =
                e.unwrap_or_else(|| "gateway closed the data connection before answering".into());
            fail("refused");
            warn!(%service, %client, "data connection refused: {e}");
            return;
        }
        None if req.pooled => {
            debug!(%service, "pooled data connection dropped: its control session ended");
            return;
        }
        None => {
            fail("timeout");
            warn!(%service, %client, "no answer to data hello within {:?}", ctx.connect_timeout);
            return;
        }
    };
    let local_conn =
        match tokio::time::timeout(ctx.connect_timeout, TcpStream::connect(&local)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                fail("local_unreachable");
                warn!(%service, %client, %local, "cannot reach local service: {e}");
                return;
            }
            Err(_) => {
                fail("local_unreachable");
                warn!(%service, %client, %local, "timed out connecting to local service");
                return;
            }
        };
    let _ = local_conn.set_nodelay(true);
    // The header goes out in the same write as the first client bytes, ahead of them. The
    // agent's own setting wins over the gateway's.
    let early = match send_proxy.or(req.send_proxy) {
        None => early,
        Some(version) => {
            let (src, dst) = origin;
            let mut header = match version {
                dialback_core::proxy_protocol::Version::V1 => {
                    dialback_core::proxy_protocol::encode_v1(src, dst)
                }
                dialback_core::proxy_protocol::Version::V2 => {
                    dialback_core::proxy_protocol::encode_v2(src, dst)
                }
            };
            header.extend_from_slice(&early);
            header
        }
    };
    debug!(%service, %client, pooled = req.pooled, "relaying");
    let _relaying = ctx.drain.guard();
    let Some(svc) = svc else { return };
    let conn = svc.data_connection_opened();
    // Local service -> gateway is the "down" direction, towards the public client.
    let (down, up) = (|n| conn.add_down(n), |n| conn.add_up(n));
    match crate::relay::relay(local_conn, gw, &early, &down, &up).await {
        Ok((up, down)) => debug!(%service, %client, up, down, "data connection done"),
        Err(e) => debug!(%service, %client, "data connection ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        for attempt in 0..40 {
            let d = backoff(attempt, min, max);
            let cap = min.saturating_mul(1u32 << attempt.min(20)).min(max);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
        }
        assert!(backoff(30, min, max) <= max);
    }

    #[test]
    fn host_splitting() {
        assert_eq!(split_host("gw.example.com:7000"), Some("gw.example.com"));
        assert_eq!(split_host("[::1]:7000"), Some("::1"));
        assert_eq!(split_host("127.0.0.1:7000"), Some("127.0.0.1"));
        assert_eq!(split_host("nohost"), None);
        assert_eq!(split_host(":7000"), None);
        assert_eq!(split_host("h:99999"), None);
    }
}
