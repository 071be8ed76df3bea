//! gateway.toml → `GatewaySettings`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dialback_core::Timing;
use dialback_tokio::settings::{
    GatewayService, GatewaySettings, IdentitySource, DEFAULT_MAX_PENDING,
};
use serde::Deserialize;
use toml::Spanned;

use super::common::{parse_socket_addr, service_path, EnvLookup, PasswordKeys};
use super::duration::RawDuration;
use super::source::Source;
use super::ConfigError;

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
    #[serde(default)]
    services: BTreeMap<Spanned<String>, RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    password: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    tcp_listen: Option<Spanned<String>>,
    #[serde(default)]
    data_tls: bool,
    max_pending: Option<Spanned<i64>>,
}

pub fn parse(
    src: &Source<'_>,
    env: EnvLookup<'_>,
) -> Result<(GatewaySettings, Vec<String>), ConfigError> {
    let raw: RawGateway = src.deserialize()?;
    let mut warnings = Vec::new();
    let listen = match &raw.listen {
        Some(text) => socket_addr(src, "listen", text)?,
        None => parse_socket_addr(DEFAULT_LISTEN).map_err(|e| src.error(e))?,
    };
    let identity = identity(src, &raw)?;
    let timing = timing(src, &raw)?;
    let services = services(src, raw.services, listen, env, &mut warnings)?;
    Ok((
        GatewaySettings {
            listen,
            identity,
            timing,
            services,
        },
        warnings,
    ))
}

/// Only the identity part, for `dialback fingerprint`: it must work on a machine where the
/// services' password files or variables are not available.
pub fn parse_identity(src: &Source<'_>) -> Result<IdentitySource, ConfigError> {
    let raw: RawGateway = src.deserialize()?;
    identity(src, &raw)
}

fn identity(src: &Source<'_>, raw: &RawGateway) -> Result<IdentitySource, ConfigError> {
    let path = |value: &Spanned<String>| src.resolve(Path::new(value.get_ref()));
    let state_dir = match &raw.state_dir {
        Some(dir) if dir.get_ref().is_empty() => {
            return Err(src.error_at(Some(dir.span()), "state_dir", "must not be empty"))
        }
        Some(dir) => path(dir),
        None => src.resolve(Path::new(DEFAULT_STATE_DIR)),
    };
    let (cert, key): (Option<PathBuf>, Option<PathBuf>) = match (&raw.cert, &raw.key) {
        (Some(cert), Some(key)) => {
            for (name, value) in [("cert", cert), ("key", key)] {
                if value.get_ref().is_empty() {
                    return Err(src.error_at(Some(value.span()), name, "must not be empty"));
                }
            }
            (Some(path(cert)), Some(path(key)))
        }
        (Some(cert), None) => {
            return Err(src.error_at(
                Some(cert.span()),
                "cert",
                "cert and key go together: key is missing",
            ))
        }
        (None, Some(key)) => {
            return Err(src.error_at(
                Some(key.span()),
                "key",
                "cert and key go together: cert is missing",
            ))
        }
        (None, None) => (None, None),
    };
    Ok(IdentitySource {
        cert,
        key,
        state_dir,
    })
}

fn timing(src: &Source<'_>, raw: &RawGateway) -> Result<Timing, ConfigError> {
    let defaults = Timing::default();
    let timing = Timing {
        heartbeat: duration(src, "heartbeat", &raw.heartbeat, defaults.heartbeat)?,
        dead_after: duration(src, "dead_after", &raw.dead_after, defaults.dead_after)?,
        token_ttl: duration(src, "token_ttl", &raw.token_ttl, defaults.token_ttl)?,
        handshake_timeout: duration(
            src,
            "handshake_timeout",
            &raw.handshake_timeout,
            defaults.handshake_timeout,
        )?,
    };
    timing.validate().map_err(|why| {
        // Blame the key the operator wrote; heartbeat first since it is the usual culprit.
        let (key, span) = match (&raw.heartbeat, &raw.dead_after) {
            (Some(h), _) => ("heartbeat", Some(h.span())),
            (None, Some(d)) => ("dead_after", Some(d.span())),
            (None, None) => ("heartbeat", None),
        };
        src.error_at(
            span,
            key,
            format!(
                "{why} (heartbeat = {:?}, dead_after = {:?})",
                timing.heartbeat, timing.dead_after
            ),
        )
    })?;
    Ok(timing)
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

fn services(
    src: &Source<'_>,
    raw: BTreeMap<Spanned<String>, RawService>,
    listen: SocketAddr,
    env: EnvLookup<'_>,
    warnings: &mut Vec<String>,
) -> Result<Vec<GatewayService>, ConfigError> {
    if raw.is_empty() {
        return Err(
            src.error("no services: add a [services.NAME] table with a password and tcp_listen")
        );
    }
    let mut raw: Vec<_> = raw.into_iter().collect();
    raw.sort_by_key(|(name, _)| name.span().start);
    // Every address bound so far with the key that binds it, to catch clashes.
    let mut bound: Vec<(SocketAddr, String)> = vec![(listen, "listen".to_owned())];
    let mut services = Vec::with_capacity(raw.len());
    for (name, service) in raw {
        let path = service_path(src, &name)?;
        let password = PasswordKeys {
            password: service.password,
            password_file: service.password_file,
            password_env: service.password_env,
        }
        .resolve(src, &path, &name, env, warnings)?;
        let Some(tcp_listen_text) = service.tcp_listen else {
            return Err(src.error_at(
                Some(name.span()),
                path,
                format!(
                    "service {} has no public entry: set tcp_listen",
                    name.get_ref()
                ),
            ));
        };
        let key = format!("{path}.tcp_listen");
        let tcp_listen = socket_addr(src, &key, &tcp_listen_text)?;
        if let Some((other, other_key)) = bound.iter().find(|(b, _)| clash(*b, tcp_listen)) {
            let what = if other_key == "listen" {
                format!("the gateway's listen = \"{other}\"")
            } else {
                format!("{other_key} = \"{other}\"")
            };
            return Err(src.error_at(
                Some(tcp_listen_text.span()),
                key,
                format!("{tcp_listen} clashes with {what}: each needs its own port"),
            ));
        }
        bound.push((tcp_listen, key));
        let max_pending = match service.max_pending {
            None => DEFAULT_MAX_PENDING,
            Some(value) => match usize::try_from(*value.get_ref()) {
                Ok(n) if (1..=MAX_PENDING_LIMIT).contains(value.get_ref()) => n,
                _ => {
                    return Err(src.error_at(
                        Some(value.span()),
                        format!("{path}.max_pending"),
                        format!(
                            "must be from 1 to {MAX_PENDING_LIMIT} (got {})",
                            value.get_ref()
                        ),
                    ))
                }
            },
        };
        services.push(GatewayService {
            name: name.into_inner(),
            password,
            tcp_listen: Some(tcp_listen),
            data_tls: service.data_tls,
            max_pending,
        });
    }
    Ok(services)
}

/// Whether binding both addresses would fail: same port, and the same IP or a wildcard that
/// covers the other (an IPv6 wildcard covers IPv4 too on a dual-stack socket).
/// Port 0 asks the kernel for a free port, so it never clashes.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
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
