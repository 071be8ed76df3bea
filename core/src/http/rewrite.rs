//! Heads as they leave the gateway: the request without its prefix and with
//! `X-Forwarded-*`, the response with its `Location` under the prefix again and the route
//! cookie set.

use std::net::IpAddr;

use super::head::{Header, Headers, RequestHead, ResponseHead};
use super::route::{Route, Via, ROUTE_COOKIE};

/// What the service learns about the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarding {
    pub client: IpAddr,
    /// Whether the client reached the gateway over TLS.
    pub https: bool,
}

impl Forwarding {
    fn proto(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The request head to send to the service.
///
/// `X-Forwarded-For` gets the client's address appended; `X-Forwarded-Proto`, `-Host` and
/// `-Prefix` are replaced by what this gateway saw (a client cannot make them up). The route
/// cookie is the gateway's, so it is taken out of `Cookie`.
pub fn request_head(head: &RequestHead, route: &Route, fwd: &Forwarding) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + head.headers.len() * 32);
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(route.target.as_bytes());
    out.extend_from_slice(if head.minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let mut forwarded_for: Vec<u8> = Vec::new();
    for h in &head.headers {
        if h.is("x-forwarded-proto") || h.is("x-forwarded-host") || h.is("x-forwarded-prefix") {
            continue;
        }
        if h.is("x-forwarded-for") {
            if !forwarded_for.is_empty() {
                forwarded_for.extend_from_slice(b", ");
            }
            forwarded_for.extend_from_slice(trim(&h.value));
            continue;
        }
        if h.is("cookie") {
            if let Some(kept) = without_route_cookie(&h.value) {
                push_header(&mut out, &h.name, &kept);
            }
            continue;
        }
        push_header(&mut out, &h.name, &h.value);
    }
    if !forwarded_for.is_empty() {
        forwarded_for.extend_from_slice(b", ");
    }
    forwarded_for.extend_from_slice(fwd.client.to_string().as_bytes());
    push_header(&mut out, "X-Forwarded-For", &forwarded_for);
    push_header(&mut out, "X-Forwarded-Proto", fwd.proto().as_bytes());
    if let Some(host) = head.all("host").next() {
        push_header(&mut out, "X-Forwarded-Host", trim(&host.value));
    }
    if let Some(prefix) = &route.prefix {
        push_header(&mut out, "X-Forwarded-Prefix", prefix.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// A `Cookie` value without the route cookie; `None` when nothing else is left.
fn without_route_cookie(value: &[u8]) -> Option<Vec<u8>> {
    let Ok(text) = std::str::from_utf8(value) else {
        return Some(value.to_vec());
    };
    let kept: Vec<&str> = text
        .split(';')
        .map(str::trim)
        .filter(|pair| {
            !pair.is_empty()
                && pair
                    .split_once('=')
                    .is_none_or(|(name, _)| name.trim() != ROUTE_COOKIE)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; ").into_bytes())
}

/// The `Set-Cookie` value that routes a browser's absolute-path requests to `service`.
pub fn route_cookie_value(service: &str, https: bool) -> String {
    format!(
        "{ROUTE_COOKIE}={service}; Path=/; HttpOnly; SameSite=Lax{}",
        if https { "; Secure" } else { "" }
    )
}

/// The response head to send to the client.
///
/// For prefix routes, a `Location` that is an absolute path (`/login`), or an absolute URL
/// on the host the client asked for, is put back under the prefix; one that already is (a
/// service that honours `X-Forwarded-Prefix`) is left alone. The route cookie is set when the
/// route says so (not on `1xx`, which are interim); a service's own `Set-Cookie` for it is
/// dropped.
pub fn response_head(
    head: &ResponseHead,
    route: &Route,
    request_host: Option<&str>,
    https: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + head.headers.len() * 32);
    out.extend_from_slice(if head.minor == 0 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(head.status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in &head.headers {
        // The route cookie is the gateway's: a service cannot steer the browser elsewhere.
        if h.is("set-cookie") && sets_route_cookie(&h.value) {
            continue;
        }
        if h.is("location") {
            if let Some(rewritten) = route
                .prefix
                .as_deref()
                .filter(|_| route.via != Via::Host)
                .and_then(|p| relocate(&h.value, p, request_host))
            {
                push_header(&mut out, &h.name, rewritten.as_bytes());
                continue;
            }
        }
        push_header(&mut out, &h.name, &h.value);
    }
    if route.set_cookie && head.status >= 200 {
        push_header(
            &mut out,
            "Set-Cookie",
            route_cookie_value(&route.service, https).as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn sets_route_cookie(value: &[u8]) -> bool {
    let name = value.split(|&b| b == b'=').next().unwrap_or_default();
    trim(name) == ROUTE_COOKIE.as_bytes()
}

/// `location` under `prefix`, when it needs to be.
fn relocate(location: &[u8], prefix: &str, request_host: Option<&str>) -> Option<String> {
    let loc = std::str::from_utf8(location).ok()?.trim();
    let under = |path: &str| {
        let already = path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|r| r.starts_with(['/', '?', '#']));
        (!already).then(|| format!("{prefix}{path}"))
    };
    if loc.starts_with('/') && !loc.starts_with("//") {
        return under(loc);
    }
    let host = request_host?;
    for scheme in ["http://", "https://"] {
        let Some(rest) = loc.strip_prefix(scheme) else {
            continue;
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        if !authority.eq_ignore_ascii_case(host) {
            return None;
        }
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        return under(&path).map(|p| format!("{scheme}{authority}{p}"));
    }
    None
}

/// Rebuilds a request head as received (for tests and tools).
pub fn encode_request(head: &RequestHead) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(
        format!("{} {} HTTP/1.{}\r\n", head.method, head.target, head.minor).as_bytes(),
    );
    for Header { name, value } in &head.headers {
        push_header(&mut out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    out
}
