//! Checks shared by both config kinds: service names, passwords, addresses.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;

use dialback_tokio::settings::Secret;
use toml::Spanned;

use super::source::{key_path, Source};
use super::ConfigError;

/// Shorter passwords are within reach of guessing; they get a warning rather than an error so
/// that demos and tests stay easy.
pub const MIN_GOOD_PASSWORD_CHARS: usize = 12;
pub const MAX_SERVICE_NAME_LEN: usize = 64;

/// Looks up an environment variable; injectable so tests need not touch the process env.
pub type EnvLookup<'e> = &'e dyn Fn(&str) -> Option<OsString>;

/// Returns the service's key path (`services.NAME`) after checking the name.
pub fn service_path(src: &Source<'_>, name: &Spanned<String>) -> Result<String, ConfigError> {
    let path = key_path(["services", name.get_ref().as_str()]);
    if !is_valid_service_name(name.get_ref()) {
        return Err(src.error_at(
            Some(name.span()),
            path,
            format!(
                "invalid service name {:?}: use 1-{MAX_SERVICE_NAME_LEN} characters from A-Z, a-z, 0-9, '.', '_' and '-'",
                name.get_ref()
            ),
        ));
    }
    Ok(path)
}

pub fn is_valid_service_name(name: &str) -> bool {
    (1..=MAX_SERVICE_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The three mutually exclusive ways to give a service's password.
pub struct PasswordKeys {
    pub password: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    pub password_env: Option<Spanned<String>>,
}

impl PasswordKeys {
    /// Reads the password from wherever it is configured. `service` is the key path of the
    /// service and `header` the span of its name, for "nothing given" errors.
    pub fn resolve(
        self,
        src: &Source<'_>,
        service: &str,
        header: &Spanned<String>,
        env: EnvLookup<'_>,
        warnings: &mut Vec<String>,
    ) -> Result<Secret, ConfigError> {
        let given: Vec<(&str, Spanned<String>)> = [
            ("password", self.password),
            ("password_file", self.password_file),
            ("password_env", self.password_env),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| (key, v)))
        .collect();
        let (key, value) = match given.as_slice() {
            [] => {
                return Err(src.error_at(
                    Some(header.span()),
                    service,
                    "no password: set password, password_file or password_env",
                ))
            }
            [one] => one,
            [first, second, ..] => {
                return Err(src.error_at(
                    Some(second.1.span()),
                    service,
                    format!(
                        "set only one of password, password_file or password_env (found {} and {})",
                        first.0, second.0
                    ),
                ))
            }
        };
        let path = format!("{service}.{key}");
        let at = |message: String| src.error_at(Some(value.span()), path.as_str(), message);
        let password = match *key {
            "password_file" => {
                let file = src.resolve(Path::new(value.get_ref()));
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    at(format!("cannot read {:?}: {e}", file.display().to_string()))
                })?;
                let password = text.trim_end_matches(['\r', '\n']).to_owned();
                if password.is_empty() {
                    return Err(at(format!("{:?} is empty", file.display().to_string())));
                }
                password
            }
            "password_env" => {
                let name = value.get_ref();
                if name.is_empty() {
                    return Err(at("the environment variable name is empty".to_owned()));
                }
                let raw = env(name)
                    .ok_or_else(|| at(format!("environment variable {name} is not set")))?;
                let password = raw
                    .into_string()
                    .map_err(|_| at(format!("environment variable {name} is not valid UTF-8")))?;
                if password.is_empty() {
                    return Err(at(format!("environment variable {name} is empty")));
                }
                password
            }
            _ => {
                if value.get_ref().is_empty() {
                    return Err(at("the password is empty".to_owned()));
                }
                value.get_ref().clone()
            }
        };
        let chars = password.chars().count();
        if chars < MIN_GOOD_PASSWORD_CHARS {
            warnings.push(src.warning_at(
                value.span(),
                &path,
                &format!(
                    "the password has only {chars} characters; use at least {MIN_GOOD_PASSWORD_CHARS}, ideally a long random one"
                ),
            ));
        }
        Ok(Secret(password))
    }
}

/// An `IP:port` to listen on.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|e| {
        if let Ok(ip) = text.parse::<IpAddr>() {
            let example = SocketAddr::new(ip, 7000);
            format!("invalid socket address {text:?}: the port is missing, e.g. \"{example}\"")
        } else {
            format!(
                "invalid socket address {text:?}: {e} (expected IP:port, e.g. \"0.0.0.0:7000\")"
            )
        }
    })
}

/// A `host:port` to dial; the host may be a name, an IPv4 address or a bracketed IPv6 address.
pub fn check_host_port(text: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid address {text:?}: {why}"));
    if text.contains("://") {
        return bad("write host:port without a scheme, e.g. \"gw.example.com:7000\"");
    }
    if text.chars().any(|c| c.is_whitespace() || c == '/') {
        return bad("expected host:port, e.g. \"gw.example.com:7000\"");
    }
    let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let Some((host, rest)) = bracketed.split_once(']') else {
            return bad("unclosed '['");
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return bad("not an IPv6 address between '[' and ']'");
        }
        let Some(port) = rest.strip_prefix(':') else {
            return bad("the port is missing, e.g. \"[::1]:7000\"");
        };
        (host, port)
    } else {
        let Some((host, port)) = text.rsplit_once(':') else {
            return bad(&format!("the port is missing, e.g. \"{text}:7000\""));
        };
        if host.contains(':') {
            return bad("IPv6 addresses need brackets, e.g. \"[::1]:7000\"");
        }
        (host, port)
    };
    if host.is_empty() {
        return bad("the host is missing");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => bad("the port must be a number from 1 to 65535"),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for good in ["web", "srvBACK", "a", "a.b_c-d", &"x".repeat(64)] {
            assert!(is_valid_service_name(good), "{good:?}");
        }
        for bad in ["", "my web", "a/b", "é", "a:b", &"x".repeat(65)] {
            assert!(!is_valid_service_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn socket_addrs() {
        assert_eq!(
            parse_socket_addr("0.0.0.0:7000"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 7000)))
        );
        assert!(parse_socket_addr("[::]:7000").is_ok());
        let err = parse_socket_addr("0.0.0.0").unwrap_err();
        assert!(
            err.starts_with("invalid socket address \"0.0.0.0\": "),
            "{err}"
        );
        assert!(err.contains("\"0.0.0.0:7000\""), "{err}");
        let err = parse_socket_addr("localhost:80").unwrap_err();
        assert!(err.contains("expected IP:port"), "{err}");
    }

    #[test]
    fn host_ports() {
        for good in [
            "gw.example.com:7000",
            "127.0.0.1:1",
            "[::1]:65535",
            "localhost:80",
        ] {
            assert_eq!(check_host_port(good), Ok(()), "{good}");
        }
        for bad in [
            "gw.example.com",
            ":7000",
            "host:",
            "host:0",
            "host:65536",
            "::1:7000",
            "[::1]",
            "[nope]:1",
            "[::1:7000",
            "http://gw:7000",
            "gw :7000",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
        let err = check_host_port("gw.example.com").unwrap_err();
        assert!(err.contains("port is missing"), "{err}");
    }
}
