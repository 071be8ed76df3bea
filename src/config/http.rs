//! gateway.toml's `[http]` section and the per-service `http_prefix` / `hosts` keys →
//! `HttpSettings`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use dialback_core::http::route::{check_host, check_prefix, default_prefix};
use dialback_tokio::settings::{
    HttpCert, HttpRoute, HttpSettings, DEFAULT_HTTP_HEAD_TIMEOUT, DEFAULT_HTTP_IDLE_TIMEOUT,
    DEFAULT_HTTP_MAX_HEAD, DEFAULT_HTTP_RESPONSE_TIMEOUT,
};
use serde::Deserialize;
use toml::Spanned;

use super::common::{is_valid_service_name, parse_socket_addr};
use super::duration::RawDuration;
use super::gateway::duration;
use super::source::{key_path, Source};
use super::ConfigError;

const MIN_MAX_HEAD: i64 = 1024;
const MAX_MAX_HEAD: i64 = 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    listen: Option<Spanned<String>>,
    tls_listen: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    #[serde(default)]
    certs: Vec<RawCert>,
    head_timeout: Option<Spanned<RawDuration>>,
    idle_timeout: Option<Spanned<RawDuration>>,
    response_timeout: Option<Spanned<RawDuration>>,
    max_head: Option<Spanned<i64>>,
    #[serde(default)]
    accept_proxy: bool,
}

/// One `[[http.certs]]` entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCert {
    names: Vec<Spanned<String>>,
    cert: Spanned<String>,
    key: Spanned<String>,
}

/// A service's HTTP keys, as found in its table.
pub(super) struct RawServiceHttp<'a> {
    pub name: &'a Spanned<String>,
    pub http_prefix: Option<&'a Spanned<String>>,
    pub hosts: &'a [Spanned<String>],
}

/// The `[http]` section without its routes; `None` if it has problems (pushed to `problems`).
/// Its addresses are added to `bound`, for the clash checks of the ports bound later.
pub(super) fn section(
    src: &Source<'_>,
    raw: &Spanned<RawHttp>,
    bound: &mut Vec<(SocketAddr, String)>,
    problems: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> Option<HttpSettings> {
    let before = problems.len();
    let http = raw.get_ref();
    let mut addr = |key: &str, text: &Option<Spanned<String>>| -> Option<SocketAddr> {
        let text = text.as_ref()?;
        let full = format!("http.{key}");
        let addr = parse_socket_addr(text.get_ref())
            .map_err(|why| problems.push(src.error_at(Some(text.span()), full.as_str(), why)))
            .ok()?;
        if let Some((other, other_key)) =
            bound.iter().find(|(b, _)| super::gateway::clash(*b, addr))
        {
            problems.push(src.error_at(
                Some(text.span()),
                full.as_str(),
                format!("{addr} clashes with {other_key} = \"{other}\": each needs its own port"),
            ));
        } else {
            bound.push((addr, full));
        }
        Some(addr)
    };
    let listen = addr("listen", &http.listen);
    let tls_listen = addr("tls_listen", &http.tls_listen);
    if http.listen.is_none()
        && http.tls_listen.is_none()
        && !src.dropped("http.listen")
        && !src.dropped("http.tls_listen")
    {
        problems.push(src.error_at(
            Some(raw.span()),
            "http",
            "set listen (plain HTTP), tls_listen (HTTPS) or both",
        ));
    }
    let path = |value: &Spanned<String>| src.resolve(Path::new(value.get_ref()));
    let mut certs = Vec::new();
    match (&http.cert, &http.key) {
        (Some(cert), Some(key)) => certs.push(HttpCert {
            names: Vec::new(),
            cert: path(cert),
            key: path(key),
        }),
        (Some(cert), None) => problems.push(src.error_at(
            Some(cert.span()),
            "http.cert",
            "cert and key go together: key is missing",
        )),
        (None, Some(key)) => problems.push(src.error_at(
            Some(key.span()),
            "http.key",
            "cert and key go together: cert is missing",
        )),
        (None, None) => {}
    }
    for c in &http.certs {
        let mut names = Vec::new();
        for n in &c.names {
            let name = n.get_ref().to_ascii_lowercase();
            match check_host(&name) {
                Ok(()) => names.push(name),
                Err(why) => problems.push(src.error_at(Some(n.span()), "http.certs.names", why)),
            }
        }
        if c.names.is_empty() {
            problems.push(src.error_at(
                Some(c.cert.span()),
                "http.certs.names",
                "list the names this certificate is for (the default one goes in [http] cert and key)",
            ));
        }
        certs.push(HttpCert {
            names,
            cert: path(&c.cert),
            key: path(&c.key),
        });
    }
    match (&http.tls_listen, certs.is_empty()) {
        (Some(t), true) => problems.push(src.error_at(
            Some(t.span()),
            "http.tls_listen",
            "HTTPS needs a certificate: set cert and key in [http], or add [[http.certs]]",
        )),
        (None, false) => warnings.push(src.warning_at(
            raw.span(),
            "http",
            "certificates are only used by tls_listen, which is not set",
        )),
        _ => {}
    }
    let mut timeout = |key: &str, value: &Option<Spanned<RawDuration>>, default: Duration| {
        let full = format!("http.{key}");
        match duration(src, &full, value, default) {
            Ok(d) if d.is_zero() => {
                problems.push(src.error_at(
                    value.as_ref().map(|v| v.span()),
                    full,
                    "must be longer than 0s",
                ));
                default
            }
            Ok(d) => d,
            Err(e) => {
                problems.push(e);
                default
            }
        }
    };
    let head_timeout = timeout(
        "head_timeout",
        &http.head_timeout,
        DEFAULT_HTTP_HEAD_TIMEOUT,
    );
    let idle_timeout = timeout(
        "idle_timeout",
        &http.idle_timeout,
        DEFAULT_HTTP_IDLE_TIMEOUT,
    );
    let response_timeout = timeout(
        "response_timeout",
        &http.response_timeout,
        DEFAULT_HTTP_RESPONSE_TIMEOUT,
    );
    let max_head = match &http.max_head {
        None => DEFAULT_HTTP_MAX_HEAD,
        Some(v) if (MIN_MAX_HEAD..=MAX_MAX_HEAD).contains(v.get_ref()) => {
            usize::try_from(*v.get_ref()).unwrap_or(DEFAULT_HTTP_MAX_HEAD)
        }
        Some(v) => {
            problems.push(src.error_at(
                Some(v.span()),
                "http.max_head",
                format!(
                    "must be from {MIN_MAX_HEAD} to {MAX_MAX_HEAD} bytes (got {})",
                    v.get_ref()
                ),
            ));
            DEFAULT_HTTP_MAX_HEAD
        }
    };
    (problems.len() == before).then_some(HttpSettings {
        listen,
        tls_listen,
        certs,
        routes: Vec::new(),
        head_timeout,
        idle_timeout,
        response_timeout,
        max_head,
        accept_proxy: raw.get_ref().accept_proxy,
    })
}

/// Every service's route: its `http_prefix` (default `/~~NAME`) and `hosts`. Without an
/// `[http]` section these keys have nothing to apply to, which is a problem.
pub(super) fn routes(
    src: &Source<'_>,
    services: &[RawServiceHttp<'_>],
    http_enabled: bool,
    problems: &mut Vec<ConfigError>,
) -> Vec<HttpRoute> {
    let mut routes: Vec<HttpRoute> = Vec::new();
    // Where each prefix and host came from, for clash messages.
    let mut prefixes: BTreeMap<String, String> = BTreeMap::new();
    let mut hosts: BTreeMap<String, String> = BTreeMap::new();
    for s in services {
        let name = s.name.get_ref();
        if !is_valid_service_name(name) {
            continue; // reported with the service
        }
        let path = key_path(["services", name.as_str()]);
        if !http_enabled {
            if let Some(p) = s.http_prefix {
                problems.push(src.error_at(
                    Some(p.span()),
                    format!("{path}.http_prefix"),
                    "there is no [http] section to route from",
                ));
            }
            if let Some(h) = s.hosts.first() {
                problems.push(src.error_at(
                    Some(h.span()),
                    format!("{path}.hosts"),
                    "there is no [http] section to route from",
                ));
            }
            continue;
        }
        let (prefix, span) = match s.http_prefix {
            Some(p) => (p.get_ref().clone(), p.span()),
            None => (default_prefix(name), s.name.span()),
        };
        let key = format!("{path}.http_prefix");
        if let Err(why) = check_prefix(&prefix) {
            problems.push(src.error_at(Some(span), key, why));
            continue;
        }
        if let Some(other) = prefixes.get(&prefix) {
            problems.push(src.error_at(
                Some(span),
                key,
                format!("service {other} is already published at {prefix:?}"),
            ));
            continue;
        }
        prefixes.insert(prefix.clone(), name.clone());
        let mut names = Vec::new();
        for h in s.hosts {
            let host = h.get_ref().to_ascii_lowercase();
            let key = format!("{path}.hosts");
            if let Err(why) = check_host(&host) {
                problems.push(src.error_at(Some(h.span()), key, why));
            } else if let Some(other) = hosts.get(&host) {
                problems.push(src.error_at(
                    Some(h.span()),
                    key,
                    format!("host {host:?} is already routed to service {other}"),
                ));
            } else {
                hosts.insert(host.clone(), name.clone());
                names.push(host);
            }
        }
        routes.push(HttpRoute {
            service: name.clone(),
            prefix,
            hosts: names,
        });
    }
    routes
}
