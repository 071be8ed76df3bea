//! Which service a request goes to.
//!
//! In order, the first that applies wins:
//!
//! 1. `Host` is one of a service's `hosts`: the request goes there untouched.
//! 2. The path is a service's prefix (`/~~name`) or starts with it followed by `/` or `?`:
//!    the prefix is stripped. A path that starts with `/~~` but names no service is a 404.
//! 3. The `Referer` is a page of this gateway (same host) under a service's prefix: a page of
//!    that service asked for an absolute path (`/css/app.css`), which goes there as it is.
//! 4. The route cookie names a service: the same, for requests without a usable Referer.
//!
//! Routes found by prefix or Referer tell the runtime to set the route cookie on the response.

use super::head::{host_without_port, Headers, RequestHead};
use super::HttpError;

/// The cookie that remembers the last service a browser was routed to by prefix. Scoped to
/// the gateway's host (`Path=/`, no `Domain`).
pub const ROUTE_COOKIE: &str = "dialback_route";

/// The prefix a service is reached at when its config names none.
pub fn default_prefix(service: &str) -> String {
    format!("/~~{service}")
}

/// A service as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoute {
    pub name: String,
    /// `/~~name` or another absolute path without a trailing `/`.
    pub prefix: String,
    /// Host names (lower case) routed to this service whatever the path; `*.example.com`
    /// matches every name under example.com.
    pub hosts: Vec<String>,
}

/// How a route was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Host,
    Prefix,
    Referer,
    Cookie,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Host => "host",
            Via::Prefix => "prefix",
            Via::Referer => "referer",
            Via::Cookie => "cookie",
        }
    }
}

/// Where one request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub service: String,
    pub via: Via,
    /// The request target to send to the service (prefix stripped).
    pub target: String,
    /// The prefix the client sees the service under; `None` for host routes. Absolute
    /// `Location`s get it back, and the service learns it from `X-Forwarded-Prefix`.
    pub prefix: Option<String>,
    /// Whether the response should (re)set the route cookie.
    pub set_cookie: bool,
}

/// Why a router could not be built from a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterError(pub String);

impl std::fmt::Display for RouterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RouterError {}

/// Checks a configured prefix; the message says what is wrong.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') || prefix.len() < 2 {
        return Err(format!(
            "{prefix:?} must be an absolute path like \"/~~name\""
        ));
    }
    if prefix.ends_with('/') {
        return Err(format!("{prefix:?} must not end with \"/\""));
    }
    if let Some(c) = prefix
        .chars()
        .find(|c| !(c.is_ascii_graphic()) || matches!(c, '?' | '#' | '%' | '\\'))
    {
        return Err(format!("{prefix:?} must not contain {c:?}"));
    }
    if prefix.contains("//") {
        return Err(format!("{prefix:?} must not contain \"//\""));
    }
    Ok(())
}

/// Checks a configured host name (or `*.name`).
pub fn check_host(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is not a host name (letters, digits, '-' and '.'; \"*.\" in front for every name under a domain)"
        ))
    }
}

#[derive(Debug, Clone)]
pub struct Router {
    /// Longest prefix first, so `/~~a/b` beats `/~~a`.
    services: Vec<ServiceRoute>,
}

impl Router {
    pub fn new(services: Vec<ServiceRoute>) -> Result<Self, RouterError> {
        let mut services = services;
        for s in &mut services {
            check_prefix(&s.prefix)
                .map_err(|e| RouterError(format!("service {}: http_prefix {e}", s.name)))?;
            for h in &mut s.hosts {
                *h = h.to_ascii_lowercase();
                check_host(h)
                    .map_err(|e| RouterError(format!("service {}: hosts: {e}", s.name)))?;
            }
        }
        for (i, a) in services.iter().enumerate() {
            for b in &services[i + 1..] {
                if a.prefix == b.prefix {
                    return Err(RouterError(format!(
                        "services {} and {} have the same http_prefix {:?}",
                        a.name, b.name, a.prefix
                    )));
                }
                if let Some(h) = a.hosts.iter().find(|h| b.hosts.contains(h)) {
                    return Err(RouterError(format!(
                        "services {} and {} both list host {h:?}",
                        a.name, b.name
                    )));
                }
            }
        }
        services.sort_by_key(|s| std::cmp::Reverse(s.prefix.len()));
        Ok(Router { services })
    }

    pub fn services(&self) -> &[ServiceRoute] {
        &self.services
    }

    fn by_name(&self, name: &str) -> Option<&ServiceRoute> {
        self.services.iter().find(|s| s.name == name)
    }

    fn by_host(&self, host: &str) -> Option<&ServiceRoute> {
        let exact = self
            .services
            .iter()
            .find(|s| s.hosts.iter().any(|h| h == host));
        exact.or_else(|| {
            // The most specific wildcard wins.
            self.services
                .iter()
                .flat_map(|s| s.hosts.iter().map(move |h| (s, h)))
                .filter_map(|(s, h)| {
                    let suffix = h.strip_prefix("*.")?;
                    let under = host.strip_suffix(suffix)?.strip_suffix('.')?;
                    (!under.is_empty()).then_some((s, suffix.len()))
                })
                .max_by_key(|(_, len)| *len)
                .map(|(s, _)| s)
        })
    }

    /// The service whose prefix starts `target`, and the target without it.
    fn by_prefix(&self, target: &str) -> Option<(&ServiceRoute, String)> {
        self.services
            .iter()
            .find_map(|s| strip_prefix(target, &s.prefix).map(|rest| (s, rest)))
    }

    /// Chooses the service for a request (see the module documentation for the order).
    pub fn route(&self, head: &RequestHead) -> Result<Route, HttpError> {
        let host = head.host();
        if let Some(s) = host.as_deref().and_then(|h| self.by_host(h)) {
            return Ok(Route {
                service: s.name.clone(),
                via: Via::Host,
                target: head.target.clone(),
                prefix: None,
                set_cookie: false,
            });
        }
        let cookie = route_cookie(head);
        if let Some((s, target)) = self.by_prefix(&head.target) {
            return Ok(Route {
                service: s.name.clone(),
                via: Via::Prefix,
                target,
                prefix: Some(s.prefix.clone()),
                set_cookie: cookie.as_deref() != Some(s.name.as_str()),
            });
        }
        if head.target.starts_with("/~~") {
            let name = head.target[3..]
                .split(['/', '?'])
                .next()
                .unwrap_or_default();
            return Err(HttpError::NoRoute(format!(
                "no service is published at /~~{}",
                super::head::truncate(name)
            )));
        }
        let referred = head
            .get("referer")
            .and_then(|r| referer_path(r, host.as_deref()))
            .and_then(|path| self.by_prefix(path));
        if let Some((s, _)) = referred {
            return Ok(Route {
                service: s.name.clone(),
                via: Via::Referer,
                target: head.target.clone(),
                prefix: Some(s.prefix.clone()),
                set_cookie: cookie.as_deref() != Some(s.name.as_str()),
            });
        }
        if let Some(s) = cookie.as_deref().and_then(|c| self.by_name(c)) {
            return Ok(Route {
                service: s.name.clone(),
                via: Via::Cookie,
                target: head.target.clone(),
                prefix: Some(s.prefix.clone()),
                set_cookie: false,
            });
        }
        Err(HttpError::NoRoute(format!(
            "{} names no service: use a path under /~~NAME/",
            super::head::truncate(&head.target)
        )))
    }
}

/// `target` without `prefix`, when it is the prefix or continues with `/` or `?`.
fn strip_prefix(target: &str, prefix: &str) -> Option<String> {
    let rest = target.strip_prefix(prefix)?;
    match rest.as_bytes().first() {
        None => Some("/".to_owned()),
        Some(b'/') => Some(rest.to_owned()),
        Some(b'?') => Some(format!("/{rest}")),
        Some(_) => None,
    }
}

/// The path of a Referer that points at this gateway (`host`), without query or fragment.
fn referer_path<'a>(referer: &'a str, host: Option<&str>) -> Option<&'a str> {
    let rest = referer
        .strip_prefix("http://")
        .or_else(|| referer.strip_prefix("https://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host? != host_without_port(authority) {
        return None;
    }
    Some(path.split(['?', '#']).next().unwrap_or(path))
}

/// The value of the route cookie in the request, if any.
pub fn route_cookie(head: &RequestHead) -> Option<String> {
    head.all("cookie")
        .filter_map(|h| h.text())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| name.trim() == ROUTE_COOKIE)
        .map(|(_, value)| value.trim().trim_matches('"').to_owned())
}
