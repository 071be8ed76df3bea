//! gateway.toml and agent.toml: parsing, checking, and turning them into runtime settings.
//!
//! Every error says where: `gateway.toml:7: services.web.tcp_listen: invalid socket address
//! "0.0.0.0": ...`. Nothing here prints; warnings are returned for the caller to log.

mod access;
mod agent;
mod check;
mod common;
mod duration;
mod gateway;
mod http;
mod proxies;
mod source;
mod upstreams;

use std::ffi::OsString;
use std::fmt;
use std::path::Path;

use dialback_tokio::settings::{AgentSettings, GatewaySettings, IdentitySource};

pub use check::check_file;
use source::Source;

/// What a config file configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    Gateway,
    Agent,
}

impl fmt::Display for ConfigKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigKind::Gateway => "gateway",
            ConfigKind::Agent => "agent",
        })
    }
}

/// A config problem, located as precisely as possible. Displays as the full message:
/// `FILE[:LINE]: [KEY: ]MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    file: String,
    line: Option<usize>,
    key: Option<String>,
    message: String,
}

impl ConfigError {
    /// 1-based line the problem is on, when it is on one.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// Dotted key path, e.g. `services.web.tcp_listen`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A loaded config of either kind, for `dialback check`.
// Built once per run; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyConfig {
    Gateway(GatewaySettings),
    Agent(AgentSettings),
}

impl AnyConfig {
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn kind(&self) -> ConfigKind {
        match self {
            AnyConfig::Gateway(_) => ConfigKind::Gateway,
            AnyConfig::Agent(_) => ConfigKind::Agent,
        }
    }

    pub fn service_count(&self) -> usize {
        match self {
            AnyConfig::Gateway(s) => s.services.len(),
            AnyConfig::Agent(s) => s.services.len(),
        }
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: None,
        key: None,
        message: format!("cannot read: {e}"),
    })
}

fn process_env(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

/// Loads a gateway config. Returns the settings and warnings worth showing the operator.
pub fn load_gateway(path: &Path) -> Result<(GatewaySettings, Vec<String>), ConfigError> {
    let text = read(path)?;
    let src = Source::new(path, &text);
    gateway::parse(&src, &process_env)
}

/// Parses config text as if read from `path`, as a gateway or an agent config by
/// [`detect_kind`], with no environment variables set. The binary does not call it: the config
/// fuzz target (fuzz/fuzz_targets/config_text.rs) includes this module and does.
#[allow(dead_code)]
pub fn parse_text(path: &Path, text: &str) -> Result<(AnyConfig, Vec<String>), ConfigError> {
    let src = Source::new(path, text);
    let no_env = |_: &str| None;
    match detect_kind(text) {
        ConfigKind::Gateway => {
            gateway::parse(&src, &no_env).map(|(s, w)| (AnyConfig::Gateway(s), w))
        }
        ConfigKind::Agent => agent::parse(&src, &no_env).map(|(s, w)| (AnyConfig::Agent(s), w)),
    }
}

/// Loads an agent config. Returns the settings and warnings worth showing the operator.
pub fn load_agent(path: &Path) -> Result<(AgentSettings, Vec<String>), ConfigError> {
    let text = read(path)?;
    let src = Source::new(path, &text);
    agent::parse(&src, &process_env)
}

/// Only where a gateway's TLS identity comes from; services are checked for shape but their
/// passwords are not read, so this works where the secrets are not available.
pub fn load_gateway_identity(path: &Path) -> Result<IdentitySource, ConfigError> {
    let text = read(path)?;
    let src = Source::new(path, &text);
    gateway::parse_identity(&src)
}

/// Keys only an agent config has.
const AGENT_ONLY_KEYS: &[&str] = &[
    "gateway",
    "gateways",
    "fingerprint",
    "ca_file",
    "ca",
    "insecure",
    "server_name",
    "reconnect_min",
    "reconnect_max",
    "connect_timeout",
    "proxies",
];

/// A file with a top-level `gateway` key, another key only agents have, or a service with
/// `local` and no `tcp_listen`, is an agent config; anything else (including text that is not
/// valid TOML, so that its errors are reported) is treated as a gateway config.
pub fn detect_kind(text: &str) -> ConfigKind {
    let Ok(table) = text.parse::<toml::Table>() else {
        return ConfigKind::Gateway;
    };
    let agent_key = AGENT_ONLY_KEYS.iter().any(|k| table.contains_key(*k));
    let agent_service = table
        .get("services")
        .and_then(toml::Value::as_table)
        .is_some_and(|services| {
            services
                .values()
                .filter_map(toml::Value::as_table)
                .any(|s| s.contains_key("local") && !s.contains_key("tcp_listen"))
        });
    if agent_key || agent_service {
        ConfigKind::Agent
    } else {
        ConfigKind::Gateway
    }
}

/// Loads a config of whichever kind the file is (what `check` finally relies on).
fn load_any_str(
    path: &Path,
    text: &str,
    env: common::EnvLookup<'_>,
) -> Result<(AnyConfig, Vec<String>), ConfigError> {
    let src = Source::new(path, text);
    match detect_kind(text) {
        ConfigKind::Gateway => gateway::parse(&src, env).map(|(s, w)| (AnyConfig::Gateway(s), w)),
        ConfigKind::Agent => agent::parse(&src, env).map(|(s, w)| (AnyConfig::Agent(s), w)),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_access;
#[cfg(test)]
mod tests_http;
#[cfg(test)]
mod tests_upstreams;
