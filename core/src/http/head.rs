//! Request and response heads: parsed with httparse into owned values, bounded in bytes,
//! header lines and (for requests) time.

use std::time::{Duration, Instant};

use super::HttpError;

/// httparse needs a header array up front; no limit may exceed it.
pub const MAX_HEADERS_CAP: usize = 256;

/// How much a head may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes from the request line to the blank line, inclusive.
    pub max_head: usize,
    /// Header lines (capped at [`MAX_HEADERS_CAP`]).
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 16 * 1024,
            max_headers: 100,
        }
    }
}

impl Limits {
    fn headers(&self) -> usize {
        self.max_headers.clamp(1, MAX_HEADERS_CAP)
    }
}

/// One header line. Names keep the case they arrived in; compare with [`Header::is`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

impl Header {
    pub fn new(name: &str, value: &[u8]) -> Self {
        Header {
            name: name.to_owned(),
            value: value.to_vec(),
        }
    }

    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    /// The value as text, when it is visible ASCII.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok().map(str::trim)
    }
}

/// Header lookups shared by requests and responses.
pub trait Headers {
    fn headers(&self) -> &[Header];

    /// Every line named `name`.
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Header> + 'a {
        self.headers().iter().filter(move |h| h.is(name))
    }

    /// The first line named `name`, as text.
    fn get(&self, name: &str) -> Option<&str> {
        self.headers()
            .iter()
            .find(|h| h.is(name))
            .and_then(Header::text)
    }

    /// Whether a comma-separated header (`Connection`, `Transfer-Encoding`) lists `token`.
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.all(name)
            .filter_map(Header::text)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target as sent (origin form `/path?query`, or `*`).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: Vec<Header>,
}

impl Headers for RequestHead {
    fn headers(&self) -> &[Header] {
        &self.headers
    }
}

impl RequestHead {
    /// Whether the client wants the connection closed after this exchange.
    pub fn wants_close(&self) -> bool {
        self.has_token("connection", "close")
            || (self.minor == 0 && !self.has_token("connection", "keep-alive"))
    }

    /// Whether the client asks to switch protocols (WebSocket and friends).
    pub fn is_upgrade(&self) -> bool {
        self.get("upgrade").is_some() && self.has_token("connection", "upgrade")
    }

    /// The host the client addressed, lower-case and without a port.
    pub fn host(&self) -> Option<String> {
        self.get("host").map(host_without_port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub minor: u8,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<Header>,
}

impl Headers for ResponseHead {
    fn headers(&self) -> &[Header] {
        &self.headers
    }
}

impl ResponseHead {
    /// Whether the service closes its connection after this response.
    pub fn closes(&self) -> bool {
        self.has_token("connection", "close")
            || (self.minor == 0 && !self.has_token("connection", "keep-alive"))
    }
}

/// `Example.COM:8080` → `example.com`; `[::1]:80` → `[::1]`.
pub fn host_without_port(host: &str) -> String {
    let host = host.trim();
    let bare = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    bare.to_ascii_lowercase()
}

fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<Header> {
    headers
        .iter()
        .map(|h| Header::new(h.name, h.value))
        .collect()
}

/// Parses a request head at the start of `buf`. `Ok(None)`: more bytes are needed (and fit
/// the limit). On success, returns the head and its length in bytes; the body (or the next
/// request) starts right behind it.
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut storage[..limits.headers()]);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooLarge(format!(
                "more than {} header lines",
                limits.headers()
            )))
        }
        Err(e) => {
            // A head too long to fit is reported as such even when the cut-off part is odd.
            if buf.len() > limits.max_head {
                return Err(too_large(limits));
            }
            return Err(HttpError::Malformed(e.to_string()));
        }
    };
    let len = match status {
        httparse::Status::Partial if buf.len() >= limits.max_head => return Err(too_large(limits)),
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(len) if len > limits.max_head => return Err(too_large(limits)),
        httparse::Status::Complete(len) => len,
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HttpError::Malformed("incomplete request line".into()));
    };
    let mut head = RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        minor,
        headers: owned_headers(req.headers),
    };
    absolute_form_to_origin_form(&mut head, limits)?;
    validate_request(&head)?;
    Ok(Some((head, len)))
}

/// `GET http://host/path` (absolute form, RFC 9112 section 3.2.2) becomes `GET /path` with
/// `Host: host`: the target's authority replaces any `Host` the client sent.
fn absolute_form_to_origin_form(head: &mut RequestHead, limits: &Limits) -> Result<(), HttpError> {
    let lower = head
        .target
        .get(..8)
        .unwrap_or(&head.target)
        .to_ascii_lowercase();
    let skip = if lower.starts_with("http://") {
        7
    } else if lower.starts_with("https://") {
        8
    } else {
        return Ok(());
    };
    let rest = &head.target[skip..];
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(HttpError::Malformed(format!(
            "request target {:?} has no usable host",
            truncate(&head.target)
        )));
    }
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let authority = authority.to_owned();
    head.headers.retain(|h| !h.is("host"));
    if head.headers.len() >= limits.headers() {
        return Err(HttpError::TooLarge(format!(
            "more than {} header lines",
            limits.headers()
        )));
    }
    head.headers
        .insert(0, Header::new("Host", authority.as_bytes()));
    head.target = path;
    Ok(())
}

fn too_large(limits: &Limits) -> HttpError {
    HttpError::TooLarge(format!("more than {} bytes", limits.max_head))
}

fn validate_request(head: &RequestHead) -> Result<(), HttpError> {
    if head.method == "CONNECT" {
        return Err(HttpError::Method("CONNECT".into()));
    }
    if !(head.target.starts_with('/') || (head.target == "*" && head.method == "OPTIONS")) {
        return Err(HttpError::Malformed(format!(
            "request target {:?} is not a path",
            truncate(&head.target)
        )));
    }
    let hosts = head.all("host").count();
    if hosts > 1 {
        return Err(HttpError::Malformed("more than one Host header".into()));
    }
    if hosts == 0 && head.minor == 1 {
        return Err(HttpError::Malformed("HTTP/1.1 request without Host".into()));
    }
    Ok(())
}

/// At most 64 characters of something the peer sent, for messages.
pub(crate) fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Parses a response head from a service. `Ok(None)`: more bytes are needed. The error is
/// a message for the log; the client gets a 502.
pub fn parse_response(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(ResponseHead, usize)>, String> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let mut resp = httparse::Response::new(&mut storage[..limits.headers()]);
    let status = match resp.parse(buf) {
        Ok(s) => s,
        Err(e) => return Err(format!("the service sent a malformed response head: {e}")),
    };
    let len = match status {
        httparse::Status::Partial if buf.len() >= limits.max_head => {
            return Err(format!(
                "the service's response head is larger than {} bytes",
                limits.max_head
            ))
        }
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(len) => len,
    };
    let (Some(minor), Some(status)) = (resp.version, resp.code) else {
        return Err("the service sent an incomplete status line".into());
    };
    // httparse reads any three digits; "002" would not survive being written out again.
    if !(100..=999).contains(&status) {
        return Err(format!("the service sent status {status:03}"));
    }
    Ok(Some((
        ResponseHead {
            minor,
            status,
            reason: resp.reason.unwrap_or("").to_owned(),
            headers: owned_headers(resp.headers),
        },
        len,
    )))
}

/// Collects one request head from a client connection, with a deadline.
///
/// The clock starts at [`RequestReader::start`] (a new connection's accept, or the first
/// byte of a later request on a kept-alive connection); a head that is not complete by
/// `start + timeout` is an [`HttpError::Timeout`]. The caller keeps the bytes: every call to
/// [`RequestReader::handle_input`] gets everything received so far for this head.
#[derive(Debug, Clone)]
pub struct RequestReader {
    limits: Limits,
    timeout: Duration,
    deadline: Option<Instant>,
}

impl RequestReader {
    pub fn new(limits: Limits, timeout: Duration) -> Self {
        RequestReader {
            limits,
            timeout,
            deadline: None,
        }
    }

    /// Starts the clock, unless it already runs.
    pub fn start(&mut self, now: Instant) {
        if self.deadline.is_none() {
            self.deadline = Some(now + self.timeout);
        }
    }

    pub fn started(&self) -> bool {
        self.deadline.is_some()
    }

    /// Looks for a complete head in `buf` (everything received so far). Starts the clock if
    /// `buf` holds anything.
    pub fn handle_input(
        &mut self,
        now: Instant,
        buf: &[u8],
    ) -> Result<Option<(RequestHead, usize)>, HttpError> {
        if !buf.is_empty() {
            self.start(now);
        }
        if self.deadline.is_some_and(|d| now >= d) {
            return Err(HttpError::Timeout);
        }
        let parsed = parse_request(buf, &self.limits)?;
        if parsed.is_some() {
            self.deadline = None;
        }
        Ok(parsed)
    }

    /// When the head is due, while one is being read.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// `Err(Timeout)` once the deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), HttpError> {
        match self.deadline {
            Some(d) if now >= d => Err(HttpError::Timeout),
            _ => Ok(()),
        }
    }
}
