//! A tiny HTTP/1.1 server for the admin endpoints: `/metrics` (Prometheus text format),
//! `/status` (JSON) and the status page at `/` and `/status.html`.
//!
//! Deliberately small: GET and HEAD only, one request per connection (`Connection: close`),
//! the request head bounded in size and time, a bounded number of connections at once.
//! Nothing here panics on input or waits on a peer without a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::debug;

use crate::metrics::{unix_now_ms, AgentMetrics, GatewayMetrics};

/// The status page, served at `/` and `/status.html` when [`AdminRoutes::has_status_page`].
pub const STATUS_PAGE: &str = include_str!("status.html");

pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the admin server serves. Implemented for [`GatewayMetrics`] (metrics, status and
/// page) and [`AgentMetrics`] (metrics only).
pub trait AdminRoutes: Send + Sync {
    /// The Prometheus text exposition, rendered now.
    fn metrics(&self) -> String;
    /// The JSON status document, or `None` if there is none (`/status` is then 404).
    fn status_json(&self) -> Option<String>;
    /// Whether `/` and `/status.html` serve the status page (else 404).
    fn has_status_page(&self) -> bool;
}

impl AdminRoutes for GatewayMetrics {
    fn metrics(&self) -> String {
        self.render_prometheus(Instant::now())
    }

    fn status_json(&self) -> Option<String> {
        Some(self.render_status_json(Instant::now(), unix_now_ms()))
    }

    fn has_status_page(&self) -> bool {
        true
    }
}

impl AdminRoutes for AgentMetrics {
    fn metrics(&self) -> String {
        self.render_prometheus(Instant::now())
    }

    fn status_json(&self) -> Option<String> {
        None
    }

    fn has_status_page(&self) -> bool {
        false
    }
}

/// Bounds of the admin server; [`AdminLimits::default`] is what [`serve`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminLimits {
    /// Largest request head (request line and headers); larger is answered 431.
    pub max_head: usize,
    /// Time to send the whole request head; slower is answered 408.
    pub head_timeout: Duration,
    /// Time to write the response (a client that does not read is dropped).
    pub write_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Most request headers accepted; more is answered 431.
    pub max_headers: usize,
}

impl Default for AdminLimits {
    fn default() -> Self {
        AdminLimits {
            max_head: 8 * 1024,
            head_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_connections: 64,
            max_headers: 64,
        }
    }
}

/// Serves admin requests on `listener` forever (until the task is dropped or aborted).
pub async fn serve(listener: TcpListener, routes: Arc<dyn AdminRoutes>) {
    serve_with_limits(listener, routes, AdminLimits::default()).await
}

/// [`serve`] with explicit limits (tests use short timeouts).
pub async fn serve_with_limits(
    listener: TcpListener,
    routes: Arc<dyn AdminRoutes>,
    limits: AdminLimits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = match slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return, // never closed
        };
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                debug!("admin: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(stream, &*routes, limits).await {
                debug!(%peer, "admin: connection ended: {e}");
            }
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
}

/// What reading the request head produced.
enum Head {
    Request {
        method: Option<Method>,
        path: String,
    },
    /// Answer with this status and close.
    Error(u16),
    /// The peer closed before sending a complete head; nothing to answer.
    Closed,
}

async fn connection(
    mut stream: TcpStream,
    routes: &dyn AdminRoutes,
    limits: AdminLimits,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(limits.head_timeout, read_head(&mut stream, limits)).await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return Err(e),
        Err(_) => Head::Error(408),
    };
    let response = match head {
        Head::Closed => return Ok(()),
        Head::Error(code) => {
            debug!("admin: bad request head, answering {code}");
            Response::text(code, reason(code))
        }
        Head::Request { method: None, path } => {
            debug!(%path, "admin: method not allowed");
            let mut r = Response::text(405, "only GET and HEAD are supported\n");
            r.extra = "Allow: GET, HEAD\r\n";
            r
        }
        Head::Request {
            method: Some(m),
            path,
        } => {
            let mut r = route(routes, &path);
            r.head_only = m == Method::Head;
            r
        }
    };
    let wrote = tokio::time::timeout(limits.write_timeout, async {
        stream.write_all(&response.encode()).await?;
        stream.flush().await?;
        stream.shutdown().await
    })
    .await;
    match wrote {
        Ok(r) => r?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "writing the response timed out",
            ))
        }
    }
    // Lingering close: read whatever the peer still sends (a request body, the rest of an
    // oversized head) for a moment, so that closing with unread data does not reset the
    // connection before the peer has read the response.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut sink = [0u8; 4096];
        let mut drained = 0usize;
        while drained < 1 << 20 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    Ok(())
}

async fn read_head(stream: &mut TcpStream, limits: AdminLimits) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(if buf.is_empty() {
                Head::Closed
            } else {
                Head::Error(400)
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers.max(1)];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                if len > limits.max_head {
                    return Ok(Head::Error(431));
                }
                let method = match req.method {
                    Some("GET") => Some(Method::Get),
                    Some("HEAD") => Some(Method::Head),
                    _ => None,
                };
                let path = req.path.unwrap_or("/").to_owned();
                return Ok(Head::Request { method, path });
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() >= limits.max_head {
                    return Ok(Head::Error(431));
                }
            }
            Err(httparse::Error::TooManyHeaders) => return Ok(Head::Error(431)),
            Err(_) => return Ok(Head::Error(400)),
        }
    }
}

fn route(routes: &dyn AdminRoutes, target: &str) -> Response {
    let path = target.split(['?', '#']).next().unwrap_or("");
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: METRICS_CONTENT_TYPE,
            body: routes.metrics().into_bytes(),
            extra: "",
            head_only: false,
        },
        "/status" => match routes.status_json() {
            Some(json) => Response {
                status: 200,
                content_type: "application/json",
                body: json.into_bytes(),
                extra: "",
                head_only: false,
            },
            None => not_found(),
        },
        "/" | "/status.html" if routes.has_status_page() => Response {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: STATUS_PAGE.as_bytes().to_vec(),
            // The page is self-contained: inline script and style, data only from /status.
            extra: "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; \
                    style-src 'unsafe-inline'; connect-src 'self'; img-src data:; \
                    base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\n",
            head_only: false,
        },
        _ => not_found(),
    }
}

fn not_found() -> Response {
    Response::text(404, "not found; try /metrics\n")
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Error",
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// Extra header lines, each ending in CRLF.
    extra: &'static str,
    head_only: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        let mut body = body.to_owned();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into_bytes(),
            extra: "",
            head_only: false,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n{}Connection: close\r\n\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            self.extra,
        );
        let mut out = head.into_bytes();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    struct Served {
        addr: SocketAddr,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn start(routes: Arc<dyn AdminRoutes>, limits: AdminLimits) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve_with_limits(listener, routes, limits));
        Served { addr, task }
    }

    fn gateway() -> Arc<GatewayMetrics> {
        Arc::new(crate::metrics::tests::populated())
    }

    fn test_limits() -> AdminLimits {
        AdminLimits {
            head_timeout: Duration::from_millis(300),
            ..AdminLimits::default()
        }
    }

    /// A parsed response: status, headers (lower-case names), body.
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
        fn text(&self) -> String {
            String::from_utf8(self.body.clone()).unwrap()
        }
    }

    fn parse_reply(raw: &[u8]) -> Reply {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(raw).expect("response parses") {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("incomplete response: {raw:?}"),
        };
        Reply {
            status: resp.code.unwrap(),
            headers: resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
            body: raw[len..].to_vec(),
        }
    }

    /// Sends `req` as is and reads the whole response (the server closes).
    async fn exchange(addr: SocketAddr, req: &[u8]) -> Reply {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("server answers and closes")
            .unwrap();
        let r = parse_reply(&raw);
        assert_eq!(r.header("connection"), Some("close"));
        if let Some(len) = r.header("content-length") {
            if !req.starts_with(b"HEAD ") {
                assert_eq!(len.parse::<usize>().unwrap(), r.body.len());
            }
        }
        r
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n")
                .as_bytes(),
        )
        .await
    }

    #[tokio::test]
    async fn metrics_endpoint() {
        let srv = start(gateway(), test_limits()).await;
        let r = get(srv.addr, "/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let (samples, _) = crate::metrics::tests::parse_exposition(&r.text());
        assert!(samples
            .iter()
            .any(|s| s.name == "dialback_gateway_agents_online" && s.value == 1.0));
        // A query string does not change the route.
        assert_eq!(get(srv.addr, "/metrics?x=1").await.status, 200);
    }

    #[tokio::test]
    async fn status_endpoint() {
        let srv = start(gateway(), test_limits()).await;
        let r = get(srv.addr, "/status").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["services"][0]["name"], "web");
        assert_eq!(v["services"][0]["online"], true);
    }

    #[tokio::test]
    async fn status_page() {
        let srv = start(gateway(), test_limits()).await;
        for path in ["/", "/status.html"] {
            let r = get(srv.addr, path).await;
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
            let html = r.text();
            assert!(html.contains("<title>dialback gateway</title>"));
            assert!(html.contains("/status"));
            assert!(r.header("content-security-policy").is_some());
        }
        // No external assets.
        assert!(!STATUS_PAGE.contains("http://") && !STATUS_PAGE.contains("https://"));
        assert!(!STATUS_PAGE.contains("src=\""));
    }

    #[tokio::test]
    async fn head_has_headers_without_body() {
        let srv = start(gateway(), test_limits()).await;
        let r = exchange(srv.addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
        assert!(
            r.header("content-length")
                .unwrap()
                .parse::<usize>()
                .unwrap()
                > 0
        );
    }

    #[tokio::test]
    async fn unknown_path_is_404() {
        let srv = start(gateway(), test_limits()).await;
        assert_eq!(get(srv.addr, "/nope").await.status, 404);
        assert_eq!(get(srv.addr, "/metrics/").await.status, 404);
    }

    #[tokio::test]
    async fn post_is_405() {
        let srv = start(gateway(), test_limits()).await;
        let r = exchange(
            srv.addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await;
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
    }

    #[tokio::test]
    async fn oversized_head_is_431() {
        let srv = start(gateway(), test_limits()).await;
        let mut req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..40 {
            req.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(400)).as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        assert!(req.len() > 8 * 1024);
        assert_eq!(exchange(srv.addr, &req).await.status, 431);
        // A head that never ends, sent in one go without the blank line.
        let endless = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 20_000]].concat();
        assert_eq!(exchange(srv.addr, &endless).await.status, 431);
        // Too many headers.
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(exchange(srv.addr, &many).await.status, 431);
    }

    #[tokio::test]
    async fn slow_head_is_408() {
        let srv = start(gateway(), test_limits()).await;
        let started = Instant::now();
        // Half a request line, then nothing.
        let r = exchange(srv.addr, b"GET /metr").await;
        assert_eq!(r.status, 408);
        assert!(started.elapsed() >= Duration::from_millis(250));
        // Nothing at all.
        let r = exchange(srv.addr, b"").await;
        assert_eq!(r.status, 408);
    }

    #[tokio::test]
    async fn garbage_is_400() {
        let srv = start(gateway(), test_limits()).await;
        assert_eq!(
            exchange(
                srv.addr,
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"
            )
            .await
            .status,
            400
        );
        assert_eq!(
            exchange(srv.addr, b"GET /metrics HTTP/9.9\r\n\r\n")
                .await
                .status,
            400
        );
        assert_eq!(
            exchange(srv.addr, b"GET /metrics HTTP/1.1\r\nbad header\r\n\r\n")
                .await
                .status,
            400
        );
        // A half request and then EOF.
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        s.shutdown().await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        assert_eq!(parse_reply(&raw).status, 400);
    }

    #[tokio::test]
    async fn agent_serves_metrics_only() {
        let agent = Arc::new(AgentMetrics::new(&["web".to_owned()]));
        agent.service("web").unwrap().registered();
        let srv = start(agent, test_limits()).await;
        let r = get(srv.addr, "/metrics").await;
        assert_eq!(r.status, 200);
        assert!(r
            .text()
            .contains("dialback_agent_registered{service=\"web\"} 1\n"));
        assert_eq!(get(srv.addr, "/status").await.status, 404);
        assert_eq!(get(srv.addr, "/").await.status, 404);
        assert_eq!(get(srv.addr, "/status.html").await.status, 404);
    }

    #[tokio::test]
    async fn many_concurrent_requests_and_idle_connections() {
        let srv = start(
            gateway(),
            AdminLimits {
                max_connections: 4,
                ..test_limits()
            },
        )
        .await;
        // Idle connections occupy every slot until their head times out; others queue.
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(srv.addr).await.unwrap());
        }
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let addr = srv.addr;
            tasks.push(tokio::spawn(
                async move { get(addr, "/metrics").await.status },
            ));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
        drop(idle);
    }
}
