//! `upstreams` and its keys: a service the gateway serves by dialing servers itself.

use std::time::Duration;

use dialback_core::upstream::{Balance, HealthCheck};
use dialback_tokio::settings::{UpstreamSettings, DEFAULT_UPSTREAM_CONNECT_TIMEOUT};
use toml::Spanned;

use super::common::check_host_port;
use super::duration::RawDuration;
use super::gateway::{duration, RawService};
use super::source::Source;
use super::ConfigError;

/// Most servers one service may list.
const MAX_UPSTREAMS: usize = 64;

/// The upstream settings of the service at `path`, when it has `upstreams`; every problem
/// (including keys that do not fit the kind of service) goes to `problems`.
pub fn section(
    src: &Source<'_>,
    path: &str,
    s: &RawService,
    problems: &mut Vec<ConfigError>,
) -> Option<UpstreamSettings> {
    let Some(list) = &s.upstreams else {
        refuse_upstream_keys(src, path, s, problems);
        return None;
    };
    refuse_agent_keys(src, path, s, problems);
    let key = format!("{path}.upstreams");
    let before = problems.len();
    if list.get_ref().is_empty() {
        problems.push(src.error_at(
            Some(list.span()),
            key.as_str(),
            "an empty list: give at least one \"host:port\" to dial",
        ));
    } else if list.get_ref().len() > MAX_UPSTREAMS {
        problems.push(src.error_at(
            Some(list.span()),
            key.as_str(),
            format!(
                "at most {MAX_UPSTREAMS} servers (got {})",
                list.get_ref().len()
            ),
        ));
    }
    let mut addrs: Vec<String> = Vec::new();
    for (i, a) in list.get_ref().iter().enumerate() {
        let at = format!("{key}[{i}]");
        if let Err(why) = check_host_port(a.get_ref()) {
            problems.push(src.error_at(Some(a.span()), at.as_str(), why));
        } else if addrs.iter().any(|b| b.eq_ignore_ascii_case(a.get_ref())) {
            problems.push(src.error_at(
                Some(a.span()),
                at.as_str(),
                format!("{} is listed twice", a.get_ref()),
            ));
        } else {
            addrs.push(a.get_ref().clone());
        }
    }
    let balance = match &s.balance {
        None => Balance::default(),
        Some(b) => match b.get_ref().as_str() {
            "round_robin" => Balance::RoundRobin,
            "least_conn" => Balance::LeastConn,
            other => {
                problems.push(src.error_at(
                    Some(b.span()),
                    format!("{path}.balance"),
                    format!("expected \"round_robin\" or \"least_conn\" (got {other:?})"),
                ));
                Balance::default()
            }
        },
    };
    let defaults = HealthCheck::default();
    let mut at_least = |name: &str, value: &Option<Spanned<RawDuration>>, default, min| {
        let key = format!("{path}.{name}");
        match duration(src, &key, value, default) {
            Ok(d) if d >= min => d,
            Ok(d) => {
                problems.push(src.error_at(
                    value.as_ref().map(Spanned::span),
                    key.as_str(),
                    format!("must be at least {min:?} (got {d:?})"),
                ));
                default
            }
            Err(e) => {
                problems.push(e);
                default
            }
        }
    };
    let ms = Duration::from_millis;
    let interval = at_least(
        "health_check_interval",
        &s.health_check_interval,
        defaults.interval,
        ms(100),
    );
    let timeout = at_least(
        "health_check_timeout",
        &s.health_check_timeout,
        defaults.timeout,
        ms(10),
    );
    let connect_timeout = at_least(
        "connect_timeout",
        &s.connect_timeout,
        DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
        ms(10),
    );
    let mut count = |name: &str, value: &Option<Spanned<i64>>, default: u32| match value {
        None => default,
        Some(v) => match u32::try_from(*v.get_ref()) {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                problems.push(src.error_at(
                    Some(v.span()),
                    format!("{path}.{name}"),
                    format!("must be from 1 to 100 (got {})", v.get_ref()),
                ));
                default
            }
        },
    };
    let fall = count("fall", &s.fall, defaults.fall);
    let rise = count("rise", &s.rise, defaults.rise);
    (problems.len() == before).then_some(UpstreamSettings {
        addrs,
        balance,
        health: HealthCheck {
            interval,
            timeout,
            fall,
            rise,
        },
        connect_timeout,
    })
}

/// Keys of a service served by an agent, refused on a direct one.
fn refuse_agent_keys(
    src: &Source<'_>,
    path: &str,
    s: &RawService,
    problems: &mut Vec<ConfigError>,
) {
    let why = "has no meaning for a service with upstreams (the gateway dials them itself; \
               no agent registers for it)";
    let spans: [(&str, Option<std::ops::Range<usize>>); 8] = [
        ("password", s.password.as_ref().map(Spanned::span)),
        ("password_file", s.password_file.as_ref().map(Spanned::span)),
        ("password_env", s.password_env.as_ref().map(Spanned::span)),
        ("pool", s.pool.as_ref().map(Spanned::span)),
        ("pool_max_idle", s.pool_max_idle.as_ref().map(Spanned::span)),
        ("allow_from", s.allow_from.as_ref().map(Spanned::span)),
        ("send_proxy", s.send_proxy.as_ref().map(Spanned::span)),
        ("max_pending", s.max_pending.as_ref().map(Spanned::span)),
    ];
    for (key, span) in spans {
        if let Some(span) = span {
            problems.push(src.error_at(Some(span), format!("{path}.{key}"), why));
        }
    }
    if s.data_tls {
        let span = s.upstreams.as_ref().map(Spanned::span);
        problems.push(src.error_at(
            span,
            format!("{path}.data_tls"),
            "data_tls is about the agent's data connections; a service with upstreams has none",
        ));
    }
}

/// Keys of a direct service, refused on one served by an agent.
fn refuse_upstream_keys(
    src: &Source<'_>,
    path: &str,
    s: &RawService,
    problems: &mut Vec<ConfigError>,
) {
    let spans: [(&str, Option<std::ops::Range<usize>>); 6] = [
        ("balance", s.balance.as_ref().map(Spanned::span)),
        (
            "health_check_interval",
            s.health_check_interval.as_ref().map(Spanned::span),
        ),
        (
            "health_check_timeout",
            s.health_check_timeout.as_ref().map(Spanned::span),
        ),
        ("fall", s.fall.as_ref().map(Spanned::span)),
        ("rise", s.rise.as_ref().map(Spanned::span)),
        (
            "connect_timeout",
            s.connect_timeout.as_ref().map(Spanned::span),
        ),
    ];
    for (key, span) in spans {
        if let Some(span) = span {
            problems.push(src.error_at(
                Some(span),
                format!("{path}.{key}"),
                "only for a service with upstreams (the gateway dials them itself)",
            ));
        }
    }
}
