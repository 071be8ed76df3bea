//! The public HTTP entry point's decisions, sans-IO: reading request and response heads
//! (bounded in size, header count and time), choosing the service a request goes to (path
//! prefix, `Host`, Referer, route cookie), rewriting heads on the way through, and finding
//! where each message's body ends so one client connection can carry many requests.
//!
//! The runtime owns the sockets. Per client connection it:
//!
//! 1. feeds bytes into a [`head::RequestReader`] until it yields a [`head::RequestHead`]
//!    (or an [`HttpError`] whose [`HttpError::status`] is answered with [`error_response`]);
//!    the reader's [`head::RequestReader::poll_timeout`] bounds how long a head may take;
//! 2. asks the [`route::Router`] for a [`route::Route`] and opens (or reuses) a data
//!    connection to that service;
//! 3. sends [`rewrite::request_head`] to the service, then the body, cut by a
//!    [`body::BodyState`] from [`body::request_framing`];
//! 4. reads the response head with [`head::parse_response`], sends
//!    [`rewrite::response_head`] to the client, then the body cut by
//!    [`body::response_framing`]; a `101` ends HTTP and the two streams are spliced as they
//!    are.

pub mod body;
pub mod head;
pub mod rewrite;
pub mod route;

use std::fmt;

/// Why a request could not be served, with the status code it is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The head does not parse, or its framing is ambiguous (400).
    Malformed(String),
    /// The head is larger than allowed, or has too many header lines (431).
    TooLarge(String),
    /// The head did not arrive in time (408).
    Timeout,
    /// No service matches the request (404).
    NoRoute(String),
    /// A method this gateway does not relay (405).
    Method(String),
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) => 400,
            HttpError::TooLarge(_) => 431,
            HttpError::Timeout => 408,
            HttpError::NoRoute(_) => 404,
            HttpError::Method(_) => 405,
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Malformed(why) => write!(f, "malformed request: {why}"),
            HttpError::TooLarge(why) => write!(f, "request head too large: {why}"),
            HttpError::Timeout => f.write_str("the request head did not arrive in time"),
            HttpError::NoRoute(why) => write!(f, "no service for this request: {why}"),
            HttpError::Method(m) => write!(f, "method {m} is not relayed"),
        }
    }
}

impl std::error::Error for HttpError {}

/// The reason phrase of the statuses the gateway answers itself.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// A complete response the gateway sends on its own behalf: plain text, and the connection
/// closes after it (the request's body, if any, was not read).
pub fn error_response(status: u16, message: &str) -> Vec<u8> {
    let body = format!("{status} {}: {message}\n", reason_phrase(status));
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        reason_phrase(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}
