//! gateway.toml → `GatewaySettings`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dialback_core::Timing;
use dialback_tokio::settings::{
    GatewayService, GatewaySettings, IdentitySource, DEFAULT_DRAIN_TIMEOUT, DEFAULT_MAX_HANDSHAKES,
    DEFAULT_MAX_PENDING, DEFAULT_POOL, DEFAULT_POOL_MAX_IDLE, MAX_POOL,
};
use dialback_tokio::sockopt::DEFAULT_TCP_KEEPALIVE;
use serde::Deserialize;
use toml::Spanned;

use super::common::{parse_socket_addr, service_path, EnvLookup, PasswordKeys};
use super::duration::RawDuration;
use super::source::{key_path, Source};
use super::ConfigError;
use dialback_tokio::settings::Secret;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:7000";
pub const DEFAULT_STATE_DIR: &str = "./dialback-state";
const MAX_PENDING_LIMIT: i64 = 65536;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    listen: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    heartbeat: Option<Spanned<RawDuration>>,
    dead_after: Option<Spanned<RawDuration>>,
    token_ttl: Option<Spanned<RawDuration>>,
    handshake_timeout: Option<Spanned<RawDuration>>,
    admin_listen: Option<Spanned<String>>,
    #[serde(default)]
    accept_proxy: bool,
    max_handshakes: Option<Spanned<i64>>,
    drain_timeout: Option<Spanned<RawDuration>>,
    tcp_keepalive: Option<Spanned<RawDuration>>,
    http: Option<Spanned<super::http::RawHttp>>,
    #[serde(default)]
    services: BTreeMap<Spanned<String>, RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) password: Option<Spanned<String>>,
    pub(super) password_file: Option<Spanned<String>>,
    pub(super) password_env: Option<Spanned<String>>,
    pub(super) tcp_listen: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) data_tls: bool,
    pub(super) max_pending: Option<Spanned<i64>>,
    pub(super) http_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) hosts: Vec<Spanned<String>>,
    pub(super) pool: Option<Spanned<i64>>,
    pub(super) pool_max_idle: Option<Spanned<RawDuration>>,
    pub(super) allow_from: Option<super::access::RawRules>,
    pub(super) clients_allow: Option<super::access::RawRules>,
    #[serde(default)]
    pub(super) accept_proxy: bool,
    pub(super) send_proxy: Option<Spanned<String>>,
    pub(super) upstreams: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) balance: Option<Spanned<String>>,
    pub(super) health_check_interval: Option<Spanned<RawDuration>>,
    pub(super) health_check_timeout: Option<Spanned<RawDuration>>,
    pub(super) fall: Option<Spanned<i64>>,
    pub(super) rise: Option<Spanned<i64>>,
    pub(super) connect_timeout: Option<Spanned<RawDuration>>,
}

pub fn parse(
    src: &Source<'_>,
    env: EnvLookup<'_>,
) -> Result<(GatewaySettings, Vec<String>), ConfigError> {
    let checked = check(src, env)?;
    match (checked.settings, checked.problems.into_iter().next()) {
        (Some(settings), None) => Ok((settings, checked.warnings)),
        (_, Some(first)) => Err(first),
        (None, None) => Err(src.error("invalid configuration")),
    }
}

/// Everything found in a gateway config: the settings when there is no problem, otherwise
/// every problem that does not depend on another (in the order of the file's checks, not
/// sorted), and the warnings.
pub struct Checked {
    pub settings: Option<GatewaySettings>,
    pub problems: Vec<ConfigError>,
    pub warnings: Vec<String>,
}

/// Checks the whole file and keeps going after a problem. Fails only when the file cannot be
/// read as a gateway config at all (a TOML syntax error, or a shape error with a strict
/// `src`). With a lenient `src`, the shape errors it got past are in `src.take_problems()`.
pub fn check(src: &Source<'_>, env: EnvLookup<'_>) -> Result<Checked, ConfigError> {
    let raw: RawGateway = src.deserialize()?;
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let listen = match &raw.listen {
        Some(text) => socket_addr(src, "listen", text)
            .map_err(|e| problems.push(e))
            .ok(),
        // A listen dropped for its shape is unknown, not the default.
        None if src.dropped("listen") => None,
        None => Some(parse_socket_addr(DEFAULT_LISTEN).map_err(|e| src.error(e))?),
    };
    let identity = identity(src, &raw, &mut problems);
    let timing = timing(src, &raw, &mut problems);
    let admin_listen = raw.admin_listen.as_ref().and_then(|text| {
        let addr = socket_addr(src, "admin_listen", text)
            .map_err(|e| problems.push(e))
            .ok()?;
        if let Some(l) = listen.filter(|l| clash(*l, addr)) {
            problems.push(src.error_at(
                Some(text.span()),
                "admin_listen",
                format!(
                    "{addr} clashes with the gateway's listen = \"{l}\": each needs its own port"
                ),
            ));
        }
        Some(addr)
    });
    let mut taken: Vec<(SocketAddr, String)> = listen
        .map(|l| (l, "listen".to_owned()))
        .into_iter()
        .collect();
    taken.extend(admin_listen.map(|a| (a, "admin_listen".to_owned())));
    let mut http = raw
        .http
        .as_ref()
        .and_then(|h| super::http::section(src, h, &mut taken, &mut problems, &mut warnings));
    let http_enabled = raw.http.is_some() || src.dropped("http");
    let routes = {
        let raw_routes: Vec<_> = raw
            .services
            .iter()
            .map(|(name, s)| super::http::RawServiceHttp {
                name,
                http_prefix: s.http_prefix.as_ref(),
                hosts: &s.hosts,
            })
            .collect();
        super::http::routes(src, &raw_routes, http_enabled, &mut problems)
    };
    if let Some(h) = &mut http {
        h.routes = routes;
    }
    let services = services(
        src,
        raw.services,
        taken,
        http_enabled,
        env,
        &mut problems,
        &mut warnings,
    );
    let max_handshakes = match &raw.max_handshakes {
        None => DEFAULT_MAX_HANDSHAKES,
        Some(v) => match usize::try_from(*v.get_ref()) {
            Ok(n) if (16..=1_000_000).contains(&n) => n,
            _ => {
                problems.push(src.error_at(
                    Some(v.span()),
                    "max_handshakes",
                    format!("must be from 16 to 1000000 (got {})", v.get_ref()),
                ));
                DEFAULT_MAX_HANDSHAKES
            }
        },
    };
    let drain_timeout = duration(
        src,
        "drain_timeout",
        &raw.drain_timeout,
        DEFAULT_DRAIN_TIMEOUT,
    )
    .map_err(|e| problems.push(e))
    .unwrap_or(DEFAULT_DRAIN_TIMEOUT);
    let tcp_keepalive = keepalive(src, &raw.tcp_keepalive)
        .map_err(|e| problems.push(e))
        .unwrap_or(DEFAULT_TCP_KEEPALIVE);
    let settings = match (listen, identity, timing) {
        (Some(listen), Some(identity), Some(timing)) if problems.is_empty() => {
            Some(GatewaySettings {
                listen,
                identity,
                timing,
                services,
                admin_listen,
                http,
                accept_proxy: raw.accept_proxy,
                max_handshakes,
                drain_timeout,
                tcp_keepalive,
            })
        }
        _ => None,
    };
    Ok(Checked {
        settings,
        problems,
        warnings,
    })
}

/// Only the identity part, for `dialback fingerprint`: it must work on a machine where the
/// services' password files or variables are not available.
pub fn parse_identity(src: &Source<'_>) -> Result<IdentitySource, ConfigError> {
    let raw: RawGateway = src.deserialize()?;
    let mut problems = Vec::new();
    match identity(src, &raw, &mut problems) {
        Some(identity) if problems.is_empty() => Ok(identity),
        _ => Err(problems
            .into_iter()
            .next()
            .unwrap_or_else(|| src.error("invalid identity"))),
    }
}

fn identity(
    src: &Source<'_>,
    raw: &RawGateway,
    problems: &mut Vec<ConfigError>,
) -> Option<IdentitySource> {
    let before = problems.len();
    let path = |value: &Spanned<String>| src.resolve(Path::new(value.get_ref()));
    let state_dir = match &raw.state_dir {
        Some(dir) if dir.get_ref().is_empty() => {
            problems.push(src.error_at(Some(dir.span()), "state_dir", "must not be empty"));
            PathBuf::new()
        }
        Some(dir) => path(dir),
        None => src.resolve(Path::new(DEFAULT_STATE_DIR)),
    };
    let (cert, key): (Option<PathBuf>, Option<PathBuf>) = match (&raw.cert, &raw.key) {
        (Some(cert), Some(key)) => {
            for (name, value) in [("cert", cert), ("key", key)] {
                if value.get_ref().is_empty() {
                    problems.push(src.error_at(Some(value.span()), name, "must not be empty"));
                }
            }
            (Some(path(cert)), Some(path(key)))
        }
        // Dropped for its shape: already reported, not "missing".
        (Some(_), None) if src.dropped("key") => (None, None),
        (None, Some(_)) if src.dropped("cert") => (None, None),
        (Some(cert), None) => {
            problems.push(src.error_at(
                Some(cert.span()),
                "cert",
                "cert and key go together: key is missing",
            ));
            (None, None)
        }
        (None, Some(key)) => {
            problems.push(src.error_at(
                Some(key.span()),
                "key",
                "cert and key go together: cert is missing",
            ));
            (None, None)
        }
        (None, None) => (None, None),
    };
    (problems.len() == before).then_some(IdentitySource {
        cert,
        key,
        state_dir,
    })
}

fn timing(src: &Source<'_>, raw: &RawGateway, problems: &mut Vec<ConfigError>) -> Option<Timing> {
    let defaults = Timing::default();
    let mut get = |key: &str, value: &Option<Spanned<RawDuration>>, default: Duration| {
        duration(src, key, value, default)
            .map_err(|e| problems.push(e))
            .ok()
    };
    let heartbeat = get("heartbeat", &raw.heartbeat, defaults.heartbeat);
    let dead_after = get("dead_after", &raw.dead_after, defaults.dead_after);
    let token_ttl = get("token_ttl", &raw.token_ttl, defaults.token_ttl);
    let handshake_timeout = get(
        "handshake_timeout",
        &raw.handshake_timeout,
        defaults.handshake_timeout,
    );
    let timing = Timing {
        heartbeat: heartbeat?,
        dead_after: dead_after?,
        token_ttl: token_ttl?,
        handshake_timeout: handshake_timeout?,
    };
    // A timer dropped for its shape has no value to compare; the default would mislead.
    if ["heartbeat", "dead_after", "token_ttl", "handshake_timeout"]
        .iter()
        .any(|key| src.dropped(key))
    {
        return None;
    }
    if let Err(why) = timing.validate() {
        // Blame the key the operator wrote; heartbeat first since it is the usual culprit.
        let (key, span) = match (&raw.heartbeat, &raw.dead_after) {
            (Some(h), _) => ("heartbeat", Some(h.span())),
            (None, Some(d)) => ("dead_after", Some(d.span())),
            (None, None) => ("heartbeat", None),
        };
        problems.push(src.error_at(
            span,
            key,
            format!(
                "{why} (heartbeat = {:?}, dead_after = {:?})",
                timing.heartbeat, timing.dead_after
            ),
        ));
        return None;
    }
    Some(timing)
}

/// `tcp_keepalive`: "0s" or "off" turns it off; otherwise from 1 s (the kernel counts in seconds) to
/// 2 h.
pub(super) fn keepalive(
    src: &Source<'_>,
    value: &Option<Spanned<RawDuration>>,
) -> Result<Duration, ConfigError> {
    if let Some(RawDuration::Text(t)) = value.as_ref().map(Spanned::get_ref) {
        if t == "off" || super::duration::parse_duration(t) == Ok(Duration::ZERO) {
            return Ok(Duration::ZERO);
        }
    }
    let d = duration(src, "tcp_keepalive", value, DEFAULT_TCP_KEEPALIVE)?;
    if !d.is_zero() && (d < Duration::from_secs(1) || d > Duration::from_secs(7200)) {
        let span = value.as_ref().map(Spanned::span);
        return Err(src.error_at(
            span,
            "tcp_keepalive",
            format!("must be \"off\" (or \"0s\") or from 1s to 2h (got {d:?})"),
        ));
    }
    Ok(d)
}

pub(super) fn duration(
    src: &Source<'_>,
    key: &str,
    value: &Option<Spanned<RawDuration>>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(value) => value
            .get_ref()
            .parse()
            .map_err(|why| src.error_at(Some(value.span()), key, why)),
    }
}

fn socket_addr(
    src: &Source<'_>,
    key: &str,
    text: &Spanned<String>,
) -> Result<SocketAddr, ConfigError> {
    parse_socket_addr(text.get_ref()).map_err(|why| src.error_at(Some(text.span()), key, why))
}

/// Checks every service, each on its own: a problem in one does not hide those of another.
/// Returns the services that are valid.
fn services(
    src: &Source<'_>,
    raw: BTreeMap<Spanned<String>, RawService>,
    // Addresses the gateway binds besides the services', with the key that binds each.
    mut bound: Vec<(SocketAddr, String)>,
    // Whether [http] exists: then tcp_listen is optional.
    http_enabled: bool,
    env: EnvLookup<'_>,
    problems: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) -> Vec<GatewayService> {
    if raw.is_empty() {
        // `services` dropped for its shape has been reported already.
        if !src.dropped("services") {
            problems.push(
                src.error(
                    "no services: add a [services.NAME] table with a password and tcp_listen",
                ),
            );
        }
        return Vec::new();
    }
    let mut raw: Vec<_> = raw.into_iter().collect();
    raw.sort_by_key(|(name, _)| name.span().start);
    // `bound` grows with every address bound so far, to catch clashes.
    let mut services = Vec::with_capacity(raw.len());
    for (name, service) in raw {
        let before = problems.len();
        let path = service_path(src, &name).unwrap_or_else(|e| {
            problems.push(e);
            key_path(["services", name.get_ref().as_str()])
        });
        let upstreams = super::upstreams::section(src, &path, &service, problems);
        let password = if service.upstreams.is_some() {
            // A direct service has no agent, hence no password (its keys were refused above).
            Ok(Secret(String::new()))
        } else {
            PasswordKeys {
                password: service.password,
                password_file: service.password_file,
                password_env: service.password_env,
            }
            .resolve(src, &path, &name, env, warnings)
        };
        let password = match password {
            Ok(password) => Some(password),
            // A password dropped for its shape is reported already; "no password" would be
            // a consequence.
            Err(_) if src_dropped_under(src, &path, "password") => None,
            Err(e) => {
                problems.push(e);
                None
            }
        };
        let key = format!("{path}.tcp_listen");
        let tcp_listen = match service.tcp_listen {
            None if src.dropped(&key) || http_enabled => None,
            None => {
                problems.push(src.error_at(
                    Some(name.span()),
                    path.as_str(),
                    format!(
                        "service {} has no public entry: set tcp_listen, or add an [http] section",
                        name.get_ref()
                    ),
                ));
                None
            }
            Some(text) => match socket_addr(src, &key, &text) {
                Err(e) => {
                    problems.push(e);
                    None
                }
                Ok(tcp_listen) => {
                    if let Some((other, other_key)) =
                        bound.iter().find(|(b, _)| clash(*b, tcp_listen))
                    {
                        let what = if other_key == "listen" {
                            format!("the gateway's listen = \"{other}\"")
                        } else {
                            format!("{other_key} = \"{other}\"")
                        };
                        problems.push(src.error_at(
                            Some(text.span()),
                            key.as_str(),
                            format!("{tcp_listen} clashes with {what}: each needs its own port"),
                        ));
                    } else {
                        bound.push((tcp_listen, key));
                    }
                    Some(tcp_listen)
                }
            },
        };
        let max_pending = match service.max_pending {
            None => DEFAULT_MAX_PENDING,
            Some(value) => match usize::try_from(*value.get_ref()) {
                Ok(n) if (1..=MAX_PENDING_LIMIT).contains(value.get_ref()) => n,
                _ => {
                    problems.push(src.error_at(
                        Some(value.span()),
                        format!("{path}.max_pending"),
                        format!(
                            "must be from 1 to {MAX_PENDING_LIMIT} (got {})",
                            value.get_ref()
                        ),
                    ));
                    DEFAULT_MAX_PENDING
                }
            },
        };
        let pool = match service.pool {
            None => DEFAULT_POOL,
            Some(value) => match usize::try_from(*value.get_ref()) {
                Ok(n) if n <= MAX_POOL => n,
                _ => {
                    problems.push(src.error_at(
                        Some(value.span()),
                        format!("{path}.pool"),
                        format!(
                            "must be from 0 (no pool) to {MAX_POOL} (got {})",
                            value.get_ref()
                        ),
                    ));
                    DEFAULT_POOL
                }
            },
        };
        let pool_max_idle = match duration(
            src,
            &format!("{path}.pool_max_idle"),
            &service.pool_max_idle,
            DEFAULT_POOL_MAX_IDLE,
        ) {
            Ok(d) if d >= Duration::from_secs(1) => d,
            Ok(d) => {
                problems.push(src.error_at(
                    service.pool_max_idle.as_ref().map(|v| v.span()),
                    format!("{path}.pool_max_idle"),
                    format!("must be at least 1s (got {d:?})"),
                ));
                DEFAULT_POOL_MAX_IDLE
            }
            Err(e) => {
                problems.push(e);
                DEFAULT_POOL_MAX_IDLE
            }
        };
        let allow_from = super::access::allow_list(
            src,
            &format!("{path}.allow_from"),
            service.allow_from.as_ref(),
            problems,
        );
        let clients_allow = super::access::allow_list(
            src,
            &format!("{path}.clients_allow"),
            service.clients_allow.as_ref(),
            problems,
        );
        let send_proxy = super::access::send_proxy(
            src,
            &format!("{path}.send_proxy"),
            service.send_proxy.as_ref(),
        )
        .map_err(|e| problems.push(e))
        .unwrap_or(None);
        if let Some(password) = password.filter(|_| tcp_listen.is_some() || http_enabled) {
            if problems.len() == before {
                services.push(GatewayService {
                    name: name.into_inner(),
                    password,
                    tcp_listen,
                    data_tls: service.data_tls,
                    max_pending,
                    pool,
                    pool_max_idle,
                    allow_from,
                    clients_allow,
                    accept_proxy: service.accept_proxy,
                    send_proxy,
                    upstreams,
                });
            }
        }
    }
    services
}

/// Whether one of the `PREFIX*` keys of the table at `path` was dropped for its shape.
fn src_dropped_under(src: &Source<'_>, path: &str, prefix: &str) -> bool {
    let under = format!("{path}.{prefix}");
    src.dropped_keys().iter().any(|k| k.starts_with(&under))
}

/// Whether binding both addresses would fail: same port, and the same IP or a wildcard that
/// covers the other (an IPv6 wildcard covers IPv4 too on a dual-stack socket).
/// Port 0 asks the kernel for a free port, so it never clashes.
pub(super) fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let covers = |wild: SocketAddr, other: SocketAddr| {
        wild.ip().is_unspecified() && (wild.is_ipv6() || wild.is_ipv4() == other.is_ipv4())
    };
    a.ip() == b.ip() || covers(a, b) || covers(b, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn clashes() {
        assert!(clash(addr("0.0.0.0:80"), addr("0.0.0.0:80")));
        assert!(clash(addr("0.0.0.0:80"), addr("127.0.0.1:80")));
        assert!(clash(addr("127.0.0.1:80"), addr("0.0.0.0:80")));
        assert!(clash(addr("[::]:80"), addr("127.0.0.1:80")));
        assert!(!clash(addr("0.0.0.0:80"), addr("[::1]:80")));
        assert!(!clash(addr("127.0.0.1:80"), addr("127.0.0.2:80")));
        assert!(!clash(addr("0.0.0.0:80"), addr("0.0.0.0:81")));
        assert!(!clash(addr("127.0.0.1:0"), addr("127.0.0.1:0")));
    }
}
