//! The public HTTP(S) entry point: accepts browsers and other HTTP clients on `[http]`'s
//! ports, lets the core route each request to a service (`/~~name`, host, Referer, cookie),
//! and carries it over a data connection to that service's agent.
//!
//! One client connection may carry many requests, to different services: each request is
//! routed on its own, and the data connection of the previous one is kept while the next
//! goes to the same service. A `101 Switching Protocols` ends HTTP on the connection; from
//! then on both streams are relayed byte for byte (spliced when both are plain TCP).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dialback_core::gateway::ClientReject;
use dialback_core::http::body::{request_framing, BodyState, Framing};
use dialback_core::http::head::{Limits, RequestHead, RequestReader};
use dialback_core::http::rewrite::{request_head, Forwarding};
use dialback_core::http::route::{Route, Router, ServiceRoute};
use dialback_core::http::{error_response, HttpError};
use dialback_core::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::deadline::Deadline;
use crate::gateway::{open_data, DataConn, GatewayError, OpenError, Shared};
use crate::metrics::{ConnectionGuard, GatewayMetrics};
use crate::settings::HttpSettings;
use crate::stream::MaybeTls;

mod sni;
mod transfer;

use transfer::{
    pass_response, read_more, send_body, shrink, Passed, RespError, COALESCE, HEAD_CHUNK,
};

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// How long, and how much, a refused client's remaining request is read and dropped.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// What every HTTP connection shares.
pub(crate) struct Front {
    router: Router,
    limits: Limits,
    head_timeout: Duration,
    idle_timeout: Duration,
    response_timeout: Duration,
    handshake_timeout: Duration,
    /// A data connection that fails after this long failed for lack of time: 504, not 502.
    token_ttl: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Connections start with a PROXY protocol header from a front balancer.
    accept_proxy: bool,
}

/// The current [`Front`]: a configuration reload swaps it; a connection picks it up at its
/// next request.
pub(crate) struct FrontCell(std::sync::RwLock<Arc<Front>>);

impl FrontCell {
    pub(crate) fn new(front: Front) -> Arc<Self> {
        Arc::new(FrontCell(std::sync::RwLock::new(Arc::new(front))))
    }

    pub(crate) fn load(&self) -> Arc<Front> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn store(&self, front: Front) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(front);
    }
}

fn config_error(e: impl std::fmt::Display) -> GatewayError {
    GatewayError::Http(e.to_string())
}

/// Checks the routes and loads the certificates of `[http]` (the ports are bound by the
/// gateway with its other public listeners).
pub(crate) fn front(
    settings: &HttpSettings,
    handshake_timeout: Duration,
    token_ttl: Duration,
) -> Result<Front, GatewayError> {
    let router = Router::new(
        settings
            .routes
            .iter()
            .map(|r| ServiceRoute {
                name: r.service.clone(),
                prefix: r.prefix.clone(),
                hosts: r.hosts.clone(),
            })
            .collect(),
    )
    .map_err(config_error)?;
    let tls = match settings.tls_listen {
        Some(_) => Some(tokio_rustls::TlsAcceptor::from(sni::server_config(
            &settings.certs,
        )?)),
        None => None,
    };
    Ok(Front {
        router,
        limits: Limits {
            max_head: settings.max_head,
            max_headers: 100,
        },
        head_timeout: settings.head_timeout,
        idle_timeout: settings.idle_timeout,
        response_timeout: settings.response_timeout,
        handshake_timeout,
        token_ttl,
        tls,
        accept_proxy: settings.accept_proxy,
    })
}

/// Accepts HTTP (`https == false`) or HTTPS clients on one of `[http]`'s ports until aborted.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    metrics: Arc<GatewayMetrics>,
    cell: Arc<FrontCell>,
    listener: Arc<TcpListener>,
    https: bool,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                tokio::spawn(client(
                    shared.clone(),
                    metrics.clone(),
                    cell.clone(),
                    tcp,
                    peer,
                    https,
                ));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on a failing accept.
                warn!("accept failed on the HTTP port: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn client(
    shared: Arc<Shared>,
    metrics: Arc<GatewayMetrics>,
    cell: Arc<FrontCell>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    https: bool,
) {
    let front = cell.load();
    let mut public = tcp.local_addr().ok();
    let peer = if front.accept_proxy {
        match crate::proxy_header::read(&mut tcp, peer, front.handshake_timeout).await {
            Ok(origin) => {
                public = origin.destination.or(public);
                origin.client
            }
            Err(e) => {
                info!(%peer, "HTTP client dropped: PROXY header: {e}");
                return;
            }
        }
    } else {
        peer
    };
    let stream = match (&front.tls, https) {
        (Some(acceptor), true) => {
            let mut first = [0u8; 1];
            let peeked = tokio::time::timeout(front.handshake_timeout, tcp.peek(&mut first)).await;
            if matches!(peeked, Ok(Ok(1))) && first[0] != TLS_HANDSHAKE_RECORD {
                // Plain HTTP on the TLS port: say so instead of failing a handshake.
                metrics.http_unrouted(400);
                info!(%peer, status = 400, "HTTP request refused: plain HTTP sent to the HTTPS port");
                let why = "this port speaks HTTPS: use an https:// URL";
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    let _ = tcp.write_all(&error_response(400, why)).await;
                    let _ = tcp.shutdown().await;
                })
                .await;
                return;
            }
            match tokio::time::timeout(front.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => MaybeTls::ServerTls(Box::new(s)),
                Ok(Err(e)) => {
                    info!(%peer, "HTTPS client dropped: TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    info!(%peer, "HTTPS client dropped: no TLS handshake within {:?}", front.handshake_timeout);
                    return;
                }
            }
        }
        _ => MaybeTls::Plain(tcp),
    };
    let (rd, wr) = tokio::io::split(stream);
    let conn = Conn {
        shared,
        metrics,
        front,
        cell,
        peer,
        public,
        https,
        rd,
        wr,
        buf: Vec::with_capacity(4096),
        backend: None,
        deadline: Deadline::new(),
        routed: None,
    };
    conn.serve().await;
}

/// A data connection to one service, kept between requests.
struct Backend {
    service: String,
    rd: ReadHalf<MaybeTls>,
    wr: WriteHalf<MaybeTls>,
    /// Bytes received from the service and not yet passed on.
    buf: Vec<u8>,
    /// Whether a request was already served over it (it may have been closed meanwhile).
    used: bool,
    traffic: Option<ConnectionGuard>,
    /// A direct service's server, counted as busy while this lives.
    lease: Option<crate::upstream::Lease>,
    /// The wait for each response.
    deadline: Deadline,
}

impl Backend {
    /// Whether the service closed (or sent something unasked) while the connection was idle:
    /// it cannot carry another request. Looks without waiting.
    async fn stale(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut probe = [0u8; 1];
        // One poll of a read, with a waker that does nothing: a pending EOF or byte is seen,
        // nothing waits (the next real read registers the task again). A zero
        // `tokio::time::timeout` did the same at the price of a timer per request.
        let read = self.rd.read(&mut probe);
        let mut read = std::pin::pin!(read);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        read.as_mut().poll(&mut cx).is_ready()
    }
}

/// One client connection.
struct Conn {
    shared: Arc<Shared>,
    metrics: Arc<GatewayMetrics>,
    /// The front this request is served with; `cell` holds the newest.
    front: Arc<Front>,
    cell: Arc<FrontCell>,
    peer: SocketAddr,
    public: Option<SocketAddr>,
    https: bool,
    rd: ReadHalf<MaybeTls>,
    wr: WriteHalf<MaybeTls>,
    /// Bytes received from the client and not yet passed on (a partial head, pipelined
    /// requests).
    buf: Vec<u8>,
    backend: Option<Backend>,
    /// The waits for the client (request heads, request bodies).
    deadline: Deadline,
    /// The service the current request was routed to, for metrics and logs.
    routed: Option<String>,
}

/// How an exchange ended.
enum Exchanged {
    /// Ready for the next request (or closed, if `close`).
    Done { close: bool, status: u16 },
    /// `101`: relay the rest as bytes.
    Upgraded,
}

impl Conn {
    async fn serve(mut self) {
        let mut first = true;
        loop {
            if !first {
                // A reload since the last request applies from this one on.
                self.front = self.cell.load();
            }
            let head = match self.read_head(first).await {
                Some(h) => h,
                None => return,
            };
            first = false;
            // A request in flight (its upload, its response, an upgraded connection) is
            // waited for by a graceful shutdown; an idle kept-alive connection is not.
            let _in_flight = self.shared.drain.guard();
            match self.handle(head).await {
                Some(Exchanged::Done { close: false, .. }) => {}
                Some(Exchanged::Done { close: true, .. }) | None => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), self.wr.shutdown()).await;
                    return;
                }
                Some(Exchanged::Upgraded) => {
                    self.upgrade().await;
                    return;
                }
            }
        }
    }

    /// Answers on the gateway's behalf and closes.
    async fn refuse(&mut self, status: u16, why: &str) {
        match self.routed.as_deref().and_then(|s| self.metrics.service(s)) {
            Some(m) => m.http_response(status),
            None => self.metrics.http_unrouted(status),
        }
        info!(peer = %self.peer, service = self.routed.as_deref().unwrap_or("-"), status, "HTTP request refused: {why}");
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.wr.write_all(&error_response(status, why)).await;
            let _ = self.wr.shutdown().await;
        })
        .await;
        // Closing with unread request bytes makes the kernel reset the connection, and the
        // reset can destroy the answer before the client reads it: read on for a moment.
        let _ = tokio::time::timeout(LINGER, async {
            let mut sink = [0u8; 4096];
            let mut left = LINGER_BYTES;
            while left > 0 {
                match self.rd.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }

    /// The next request head, or `None` when the connection is done (answered if needed).
    async fn read_head(&mut self, first: bool) -> Option<RequestHead> {
        self.routed = None;
        let mut reader = RequestReader::new(self.front.limits, self.front.head_timeout);
        if first {
            // A new connection owes its first head from the start: a silent client is a
            // slow one.
            reader.start(Instant::now());
        }
        loop {
            match reader.handle_input(Instant::now(), &self.buf) {
                Ok(Some((head, len))) => {
                    self.buf.drain(..len);
                    return Some(head);
                }
                Ok(None) => {}
                Err(e) => {
                    self.refuse(e.status(), &e.to_string()).await;
                    return None;
                }
            }
            let deadline = reader
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + self.front.idle_timeout);
            match self
                .deadline
                .run(
                    deadline.into(),
                    read_more(&mut self.rd, &mut self.buf, HEAD_CHUNK),
                )
                .await
            {
                Ok(Ok(0)) => {
                    if !self.buf.is_empty() {
                        debug!(peer = %self.peer, "HTTP client closed in the middle of a request head");
                    }
                    return None;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    debug!(peer = %self.peer, "HTTP client read failed: {e}");
                    return None;
                }
                Err(_) if reader.started() => {
                    let e = HttpError::Timeout;
                    self.refuse(e.status(), &format!("{e} ({:?})", self.front.head_timeout))
                        .await;
                    return None;
                }
                Err(_) => {
                    debug!(peer = %self.peer, "idle HTTP connection closed");
                    return None;
                }
            }
        }
    }

    /// Routes and carries one request and its response. `None`: the connection is over
    /// (the client was answered if it could be).
    async fn handle(&mut self, head: RequestHead) -> Option<Exchanged> {
        self.routed = None;
        let framing = match request_framing(&head) {
            Ok(f) => f,
            Err(e) => {
                self.refuse(e.status(), &e.to_string()).await;
                return None;
            }
        };
        let route = match self.front.router.route(&head) {
            Ok(r) => r,
            Err(e) => {
                self.refuse(e.status(), &e.to_string()).await;
                return None;
            }
        };
        self.routed = Some(route.service.clone());
        if self
            .backend
            .as_ref()
            .is_some_and(|b| b.service != route.service)
        {
            self.backend = None;
        }
        let fwd = Forwarding {
            client: self.peer.ip().to_canonical(),
            https: self.https,
        };
        let out = request_head(&head, &route, &fwd);
        // A kept data connection may have been closed by the service meanwhile. A close that
        // already arrived is seen here; one that crosses the request is seen as a response
        // that never comes, and a request without a body is then sent again on a fresh one.
        if let Some(be) = &mut self.backend {
            if be.stale().await {
                debug!(peer = %self.peer, service = %be.service, "kept data connection was closed by the service");
                self.backend = None;
            }
        }
        for attempt in 0..2 {
            if self.backend.is_none() {
                self.backend = Some(self.open(&route.service).await?);
            }
            let reused = self.reused();
            let result = self.exchange(&head, &route, framing, &out).await;
            shrink(&mut self.buf);
            if let Some(be) = &mut self.backend {
                shrink(&mut be.buf);
            }
            match result {
                Ok(done) => {
                    let status = match done {
                        Exchanged::Done { status, .. } => status,
                        Exchanged::Upgraded => 101,
                    };
                    if let Some(m) = self.metrics.service(&route.service) {
                        m.http_response(status);
                    }
                    debug!(status,peer = %self.peer, service = %route.service, via = route.via.name(), method = %head.method, target = %head.target, "HTTP request relayed");
                    return Some(done);
                }
                // Only what may be repeated (RFC 9110 section 9.2.2): the service may have
                // acted on the request before it closed.
                Err(RespError::Nothing)
                    if attempt == 0
                        && framing == Framing::Empty
                        && reused
                        && idempotent(&head.method) =>
                {
                    debug!(peer = %self.peer, service = %route.service, "kept data connection was closed; retrying on a fresh one");
                    self.backend = None;
                }
                Err(RespError::Nothing) => {
                    self.backend = None;
                    self.refuse(
                        502,
                        &format!(
                            "service {} closed the connection without answering",
                            route.service
                        ),
                    )
                    .await;
                    return None;
                }
                Err(RespError::Failed { status, why, sent }) => {
                    self.backend = None;
                    if sent {
                        info!(peer = %self.peer, service = %route.service, "HTTP exchange cut short: {why}");
                    } else {
                        self.refuse(status, &why).await;
                    }
                    return None;
                }
            }
        }
        None
    }

    /// Whether the current data connection already served a request.
    fn reused(&self) -> bool {
        self.backend.as_ref().is_some_and(|b| b.used)
    }

    /// A fresh data connection to `service`, or the client is answered why not.
    async fn open(&mut self, service: &str) -> Option<Backend> {
        let started = Instant::now();
        if let Err(why) = crate::gateway::client_verdict(&self.shared, service, self.peer).await {
            self.refuse(403, &why).await;
            return None;
        }
        match open_data(&self.shared, service, self.peer, self.public).await {
            Ok(DataConn {
                stream,
                early,
                lease,
            }) => {
                let (rd, wr) = tokio::io::split(stream);
                Some(Backend {
                    service: service.to_owned(),
                    rd,
                    wr,
                    buf: early,
                    used: false,
                    traffic: self.metrics.service(service).map(|m| m.connection_opened()),
                    lease,
                    deadline: Deadline::new(),
                })
            }
            Err(e) => {
                let (status, why) = match &e {
                    OpenError::Refused(ClientReject::UnknownService(_)) => {
                        (404, format!("no service {service}"))
                    }
                    OpenError::Refused(ClientReject::AgentOffline(_)) => {
                        (502, format!("the agent of service {service} is offline"))
                    }
                    OpenError::Refused(ClientReject::Overloaded { .. }) => {
                        (503, format!("service {service} is overloaded: {e}"))
                    }
                    OpenError::Failed(Some(ErrorCode::TokenExpired)) => (
                        504,
                        format!(
                            "no data connection from the agent of service {service} within {:?}",
                            self.front.token_ttl
                        ),
                    ),
                    // Without a code (a pooled connection that failed at bind, say), the time
                    // taken tells a slow agent from a failing one.
                    OpenError::Failed(None) if started.elapsed() >= self.front.token_ttl => (
                        504,
                        format!(
                            "no data connection from the agent of service {service} within {:?}",
                            self.front.token_ttl
                        ),
                    ),
                    OpenError::Failed(code) => (
                        502,
                        format!(
                            "the agent of service {service} could not open a connection ({})",
                            code.map_or("unknown reason", |c| c.name())
                        ),
                    ),
                    OpenError::Upstream(why) => (
                        502,
                        format!("no upstream of service {service} could be reached ({why})"),
                    ),
                    OpenError::Timeout(d) => (
                        504,
                        format!(
                            "no data connection from the agent of service {service} within {d:?}"
                        ),
                    ),
                };
                self.refuse(status, &why).await;
                None
            }
        }
    }

    /// Sends the request (head, then body while the response may already come) and passes
    /// the response on.
    async fn exchange(
        &mut self,
        head: &RequestHead,
        route: &Route,
        framing: Framing,
        out: &[u8],
    ) -> Result<Exchanged, RespError> {
        let Some(be) = self.backend.as_mut() else {
            return Err(RespError::Nothing);
        };
        let was_used = be.used;
        be.used = true;
        // The head and the part of the body already received go out in one write.
        let mut body = BodyState::new(framing);
        let n = body
            .advance(&self.buf[..self.buf.len().min(COALESCE)])
            .map_err(|e| RespError::Failed {
                status: 400,
                why: e.to_string(),
                sent: false,
            })?;
        let mut first = Vec::with_capacity(out.len() + n);
        first.extend_from_slice(out);
        first.extend_from_slice(&self.buf[..n]);
        self.buf.drain(..n);
        if let Err(e) = be.wr.write_all(&first).await {
            return Err(if was_used {
                RespError::Nothing
            } else {
                RespError::Failed {
                    status: 502,
                    why: format!("cannot send the request to service {}: {e}", route.service),
                    sent: false,
                }
            });
        }
        if let Some(t) = &be.traffic {
            t.add_up(first.len() as u64);
        }
        let body_pending = !body.is_done();
        let started = AtomicBool::new(false);
        let upload_done = Notify::new();
        let (outcome, uploaded) = {
            let upload = send_body(
                &mut self.rd,
                &mut self.buf,
                &mut be.wr,
                &mut body,
                be.traffic.as_ref(),
                (&mut self.deadline, self.front.idle_timeout),
            );
            let download = pass_response(
                &mut be.rd,
                &mut be.buf,
                &mut self.wr,
                head,
                route,
                self.https,
                be.traffic.as_ref(),
                (&mut be.deadline, self.front.response_timeout),
                &started,
                &upload_done,
                body_pending,
            );
            tokio::pin!(upload, download);
            let mut uploaded = false;
            loop {
                tokio::select! {
                    // The upload first: a response can be complete in the same poll.
                    biased;
                    r = &mut upload, if !uploaded => match r {
                        Ok(()) => {
                            uploaded = true;
                            upload_done.notify_one();
                        }
                        Err(why) => {
                            let sent = started.load(Ordering::Relaxed);
                            return Err(RespError::Failed { status: 400, why, sent });
                        }
                    },
                    r = &mut download => break (r, uploaded),
                }
            }
        };
        // The response may have been complete before the upload future noticed its end.
        let uploaded = uploaded || body.is_done();
        match outcome? {
            Passed::Upgraded => Ok(Exchanged::Upgraded),
            Passed::Done {
                service_closes,
                status,
            } => {
                // A response that came before the whole request body leaves the rest of it
                // unread: neither connection can carry another request.
                if service_closes || !uploaded {
                    self.backend = None;
                }
                let close = service_closes || !uploaded || head.wants_close();
                Ok(Exchanged::Done { close, status })
            }
        }
    }

    /// After a `101`: everything either side sends is the new protocol's. Bytes either side
    /// sent behind the HTTP heads are delivered first.
    async fn upgrade(self) {
        let Conn {
            rd,
            wr,
            buf,
            backend,
            peer,
            ..
        } = self;
        let Some(be) = backend else {
            return;
        };
        let Backend {
            service,
            rd: be_rd,
            wr: be_wr,
            buf: be_buf,
            traffic,
            lease: _lease,
            ..
        } = be;
        let mut backend = be_rd.unsplit(be_wr);
        if !buf.is_empty() {
            if let Err(e) = backend.write_all(&buf).await {
                debug!(%peer, %service, "upgraded connection lost: {e}");
                return;
            }
            if let Some(t) = &traffic {
                t.add_up(buf.len() as u64);
            }
        }
        debug!(%peer, %service, "HTTP connection upgraded; relaying bytes");
        let traffic = traffic.as_ref();
        let up = |n| {
            if let Some(t) = traffic {
                t.add_up(n)
            }
        };
        let down = |n| {
            if let Some(t) = traffic {
                t.add_down(n)
            }
        };
        let result = match rd.unsplit(wr) {
            MaybeTls::Plain(tcp) => crate::relay::relay(tcp, backend, &be_buf, &up, &down).await,
            mut client => {
                let copied = async {
                    client.write_all(&be_buf).await?;
                    down(be_buf.len() as u64);
                    let (a, b) = tokio::io::copy_bidirectional(&mut client, &mut backend).await?;
                    up(a);
                    down(b);
                    Ok((a, b + be_buf.len() as u64))
                };
                copied.await
            }
        };
        match result {
            Ok((up, down)) => debug!(%peer, %service, up, down, "upgraded connection done"),
            Err(e) => debug!(%peer, %service, "upgraded connection ended: {e}"),
        }
    }
}

/// Methods whose repetition has the effect of doing them once.
fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn backend_pair() -> (Backend, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (theirs, _) = l.accept().await.unwrap();
        let (rd, wr) = tokio::io::split(MaybeTls::Plain(ours));
        let be = Backend {
            service: "s".into(),
            rd,
            wr,
            buf: Vec::new(),
            used: true,
            traffic: None,
            lease: None,
            deadline: Deadline::new(),
        };
        (be, theirs)
    }

    #[tokio::test]
    async fn a_kept_connection_is_stale_once_the_service_closed_or_spoke() {
        let (mut be, theirs) = backend_pair().await;
        assert!(!be.stale().await, "an idle open connection is fine");
        drop(theirs);
        // The FIN takes a moment on loopback; it is seen without waiting once it is there.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !be.stale().await {
            assert!(Instant::now() < deadline, "the close was never seen");
            tokio::task::yield_now().await;
        }
        let (mut be, mut theirs) = backend_pair().await;
        theirs
            .write_all(b"HTTP/1.1 408 Timeout\r\n\r\n")
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !be.stale().await {
            assert!(
                Instant::now() < deadline,
                "the unasked bytes were never seen"
            );
            tokio::task::yield_now().await;
        }
    }

    /// The check runs before every request on a kept connection: it must not wait at all
    /// (a zero `tokio::time::timeout` waited for the timer's next millisecond tick, which
    /// halved the requests per second through `/~~name`). With the clock paused, any timer
    /// wait shows as time that passed.
    #[tokio::test(start_paused = true)]
    async fn checking_a_kept_connection_never_waits_for_a_timer() {
        let (mut be, _theirs) = backend_pair().await;
        // Between two ticks of the timer (1 ms), where a real clock is nearly always.
        tokio::time::advance(Duration::from_micros(500)).await;
        let before = tokio::time::Instant::now();
        for _ in 0..100 {
            assert!(!be.stale().await, "an idle open connection is fine");
        }
        assert_eq!(
            tokio::time::Instant::now(),
            before,
            "checking the connection waited for a timer"
        );
    }

    #[test]
    fn only_idempotent_methods_are_repeated() {
        assert!(idempotent("GET") && idempotent("PUT") && idempotent("DELETE"));
        assert!(!idempotent("POST") && !idempotent("PATCH") && !idempotent("get"));
    }
}
