//! agent.toml → `AgentSettings`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use dialback_tokio::settings::{
    AgentService, AgentSettings, GatewayTrust, DEFAULT_CONNECT_TIMEOUT, DEFAULT_RECONNECT_MAX,
    DEFAULT_RECONNECT_MIN,
};
use dialback_tokio::tls::{parse_fingerprint, server_name};
use serde::Deserialize;
use toml::Spanned;

use super::common::{check_host_port, parse_socket_addr, service_path, EnvLookup, PasswordKeys};
use super::duration::RawDuration;
use super::gateway::duration;
use super::source::Source;
use super::ConfigError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    gateway: Option<Spanned<String>>,
    gateways: Option<Spanned<Vec<Spanned<String>>>>,
    server_name: Option<Spanned<String>>,
    fingerprint: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    ca: Option<Spanned<String>>,
    insecure: Option<Spanned<bool>>,
    reconnect_min: Option<Spanned<RawDuration>>,
    reconnect_max: Option<Spanned<RawDuration>>,
    connect_timeout: Option<Spanned<RawDuration>>,
    tcp_keepalive: Option<Spanned<RawDuration>>,
    #[serde(default)]
    proxies: Vec<super::proxies::RawProxy>,
    admin_listen: Option<Spanned<String>>,
    #[serde(default)]
    services: BTreeMap<Spanned<String>, RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    password: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    local: Option<Spanned<String>>,
    send_proxy: Option<Spanned<String>>,
}

pub const NO_TRUST_MESSAGE: &str = "no way to verify the gateway: run `dialback fingerprint -c gateway.toml` on the gateway and set fingerprint = \"sha256:...\" here (or ca_file = \"ca.pem\", ca = \"system\", or insecure = true to skip verification)";

pub fn parse(
    src: &Source<'_>,
    env: EnvLookup<'_>,
) -> Result<(AgentSettings, Vec<String>), ConfigError> {
    let raw: RawAgent = src.deserialize()?;
    let mut warnings = Vec::new();
    let gateways = match (raw.gateway, raw.gateways) {
        (None, None) => {
            return Err(src.error_at(
                None,
                "gateway",
                "missing: set gateway = \"host:port\" (the gateway's listen address), or \
                 gateways = [\"host:port\", ...] to register with each gateway of a fleet",
            ))
        }
        (Some(_), Some(list)) => {
            return Err(src.error_at(
                Some(list.span()),
                "gateways",
                "set either gateway or gateways, not both",
            ))
        }
        (Some(gateway), None) => {
            check_host_port(gateway.get_ref())
                .map_err(|why| src.error_at(Some(gateway.span()), "gateway", why))?;
            vec![gateway.into_inner()]
        }
        (None, Some(list)) => {
            let span = list.span();
            let list = list.into_inner();
            if list.is_empty() {
                return Err(src.error_at(
                    Some(span),
                    "gateways",
                    "empty: name at least one gateway",
                ));
            }
            let mut out: Vec<String> = Vec::new();
            for (i, g) in list.into_iter().enumerate() {
                let key = format!("gateways[{}]", i + 1);
                check_host_port(g.get_ref())
                    .map_err(|why| src.error_at(Some(g.span()), &key, why))?;
                if out.contains(g.get_ref()) {
                    return Err(src.error_at(
                        Some(g.span()),
                        &key,
                        format!("{:?} is listed twice", g.get_ref()),
                    ));
                }
                out.push(g.into_inner());
            }
            out
        }
    };
    let server_name = match raw.server_name {
        None => None,
        Some(name) => {
            // Checked now with the same rules the TLS layer applies at connect time.
            server_name(name.get_ref())
                .map_err(|e| src.error_at(Some(name.span()), "server_name", e.to_string()))?;
            Some(name.into_inner())
        }
    };
    let trust = trust(
        src,
        raw.fingerprint,
        raw.ca_file,
        raw.ca,
        raw.insecure,
        &mut warnings,
    )?;
    let reconnect_min = duration(
        src,
        "reconnect_min",
        &raw.reconnect_min,
        DEFAULT_RECONNECT_MIN,
    )?;
    let reconnect_max = duration(
        src,
        "reconnect_max",
        &raw.reconnect_max,
        DEFAULT_RECONNECT_MAX,
    )?;
    if reconnect_max < reconnect_min {
        let (key, span) = match (&raw.reconnect_max, &raw.reconnect_min) {
            (Some(max), _) => ("reconnect_max", Some(max.span())),
            (None, min) => ("reconnect_min", min.as_ref().map(Spanned::span)),
        };
        return Err(src.error_at(
            span,
            key,
            format!(
                "reconnect_max ({reconnect_max:?}) must not be shorter than reconnect_min ({reconnect_min:?})"
            ),
        ));
    }
    let connect_timeout = duration(
        src,
        "connect_timeout",
        &raw.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    )?;
    let tcp_keepalive = super::gateway::keepalive(src, &raw.tcp_keepalive)?;
    let proxies = super::proxies::parse(src, raw.proxies, env)?;
    let admin_listen = match &raw.admin_listen {
        None => None,
        Some(text) => Some(
            parse_socket_addr(text.get_ref())
                .map_err(|why| src.error_at(Some(text.span()), "admin_listen", why))?,
        ),
    };
    let services = services(src, raw.services, env, &mut warnings)?;
    Ok((
        AgentSettings {
            gateways,
            server_name,
            trust,
            services,
            reconnect_min,
            reconnect_max,
            connect_timeout,
            proxies,
            admin_listen,
            tcp_keepalive,
        },
        warnings,
    ))
}

fn trust(
    src: &Source<'_>,
    fingerprint: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    ca: Option<Spanned<String>>,
    insecure: Option<Spanned<bool>>,
    warnings: &mut Vec<String>,
) -> Result<GatewayTrust, ConfigError> {
    // (key, how it reads in a message, where, what)
    let mut chosen: Vec<(&str, &str, Range<usize>, GatewayTrust)> = Vec::new();
    if let Some(fp) = fingerprint {
        let parsed = parse_fingerprint(fp.get_ref()).map_err(|e| {
            src.error_at(
                Some(fp.span()),
                "fingerprint",
                format!("{e}; `dialback fingerprint -c gateway.toml` on the gateway prints it"),
            )
        })?;
        chosen.push((
            "fingerprint",
            "fingerprint",
            fp.span(),
            GatewayTrust::Fingerprint(parsed),
        ));
    }
    if let Some(file) = ca_file {
        if file.get_ref().is_empty() {
            return Err(src.error_at(Some(file.span()), "ca_file", "must not be empty"));
        }
        let path = src.resolve(Path::new(file.get_ref()));
        chosen.push((
            "ca_file",
            "ca_file",
            file.span(),
            GatewayTrust::CaFile(path),
        ));
    }
    if let Some(ca) = ca {
        if ca.get_ref() != "system" {
            return Err(src.error_at(
                Some(ca.span()),
                "ca",
                format!(
                    "unknown value {:?}: the only value is \"system\" (for a CA file use ca_file = \"...\")",
                    ca.get_ref()
                ),
            ));
        }
        chosen.push(("ca", "ca = \"system\"", ca.span(), GatewayTrust::System));
    }
    if let Some(insecure) = insecure.filter(|i| *i.get_ref()) {
        warnings.push(src.warning_at(
            insecure.span(),
            "insecure",
            "the gateway's identity is not verified: anyone on the path can pose as the gateway; pin its fingerprint instead",
        ));
        chosen.push((
            "insecure",
            "insecure = true",
            insecure.span(),
            GatewayTrust::Insecure,
        ));
    }
    let mut chosen = chosen.into_iter();
    match (chosen.next(), chosen.next()) {
        (None, _) => Err(src.error(NO_TRUST_MESSAGE)),
        (Some((_, _, _, trust)), None) => Ok(trust),
        (Some((_, first, _, _)), Some((key, second, span, _))) => Err(src.error_at(
                Some(span),
                key,
                format!(
                    "set only one of fingerprint, ca_file, ca = \"system\" or insecure = true (found {first} and {second})"
                ),
            )),
    }
}

fn services(
    src: &Source<'_>,
    raw: BTreeMap<Spanned<String>, RawService>,
    env: EnvLookup<'_>,
    warnings: &mut Vec<String>,
) -> Result<Vec<AgentService>, ConfigError> {
    if raw.is_empty() {
        return Err(src.error(
            "no services: add a [services.NAME] table with a password and local = \"host:port\"",
        ));
    }
    let mut raw: Vec<_> = raw.into_iter().collect();
    raw.sort_by_key(|(name, _)| name.span().start);
    let mut services = Vec::with_capacity(raw.len());
    for (name, service) in raw {
        let path = service_path(src, &name)?;
        let password = PasswordKeys {
            password: service.password,
            password_file: service.password_file,
            password_env: service.password_env,
        }
        .resolve(src, &path, &name, env, warnings)?;
        let Some(local) = service.local else {
            return Err(src.error_at(
                Some(name.span()),
                path,
                "no local address: set local = \"host:port\" of the service to publish",
            ));
        };
        check_host_port(local.get_ref())
            .map_err(|why| src.error_at(Some(local.span()), format!("{path}.local"), why))?;
        let send_proxy = super::access::send_proxy(
            src,
            &format!("{path}.send_proxy"),
            service.send_proxy.as_ref(),
        )?;
        services.push(AgentService {
            name: name.into_inner(),
            password,
            local: local.into_inner(),
            send_proxy,
        });
    }
    Ok(services)
}
