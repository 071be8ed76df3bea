//! agent.toml `proxies`: the ordered cascade of HTTP CONNECT proxies on the way to the gateway.
//!
//! Each hop is a URL, `"http://[login[:password]@]host:port"`, or a table
//! `{ url = "...", user = "...", password / password_file / password_env = "...", auth = "..." }`.
//! The seeds' rule decides the scheme unless `auth` says otherwise: a login containing `\`
//! (`DOMAIN\user`, or `\user` for no domain) means NTLM, any other login Basic, none no auth.

use dialback_core::connect_chain::{auth_from_login, HopAuth, ProxyHop};
use dialback_core::ntlm::NtlmCredentials;
use serde::Deserialize;
use toml::Spanned;

use super::common::{EnvLookup, PasswordKeys};
use super::source::Source;
use super::ConfigError;

/// One `proxies` entry as written: a URL string or a table. (Kept as a spanned TOML value
/// because spans do not survive serde's untagged enums.)
pub type RawProxy = Spanned<toml::Value>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxyTable {
    url: String,
    user: Option<String>,
    password: Option<String>,
    password_file: Option<String>,
    password_env: Option<String>,
    auth: Option<String>,
}

/// The parts of a proxy URL.
#[derive(Debug, PartialEq, Eq)]
struct ProxyUrl {
    host: String,
    port: u16,
    user: Option<String>,
    password: Option<String>,
}

pub fn parse(
    src: &Source<'_>,
    raw: Vec<RawProxy>,
    env: EnvLookup<'_>,
) -> Result<Vec<ProxyHop>, ConfigError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, p)| hop(src, i, p, env))
        .collect()
}

fn hop(
    src: &Source<'_>,
    i: usize,
    raw: RawProxy,
    env: EnvLookup<'_>,
) -> Result<ProxyHop, ConfigError> {
    let key = format!("proxies[{}]", i + 1);
    let span = raw.span();
    let spanned = |s: String| Spanned::new(span.clone(), s);
    let (url_text, table) = match raw.into_inner() {
        toml::Value::String(u) => (spanned(u), None),
        toml::Value::Table(t) => {
            let t = RawProxyTable::deserialize(toml::Value::Table(t)).map_err(|e| {
                src.error_at(Some(span.clone()), key.as_str(), e.message().to_string())
            })?;
            (spanned(t.url.clone()), Some(t))
        }
        other => {
            return Err(src.error_at(
                Some(span),
                key.as_str(),
                format!(
                    "a proxy is a URL string or a table {{ url = \"http://host:port\", ... }}, not a {}",
                    other.type_str()
                ),
            ))
        }
    };
    let err = |span: std::ops::Range<usize>, k: &str, m: String| src.error_at(Some(span), k, m);
    let url = parse_url(url_text.get_ref()).map_err(|m| err(url_text.span(), &key, m))?;
    let mut user = url.user.clone();
    let mut password = url.password.clone();
    let mut auth_choice = None;
    if let Some(t) = table {
        let in_url = url.user.is_some() || url.password.is_some();
        if let Some(u) = t.user {
            if in_url {
                return Err(err(
                    span.clone(),
                    &format!("{key}.user"),
                    "the URL already has a login; give it in one place".into(),
                ));
            }
            user = Some(u);
        }
        let keys = PasswordKeys {
            password: t.password.map(spanned),
            password_file: t.password_file.map(spanned),
            password_env: t.password_env.map(spanned),
        };
        if keys.password.is_some() || keys.password_file.is_some() || keys.password_env.is_some() {
            if in_url {
                return Err(err(
                    url_text.span(),
                    &key,
                    "the URL already has a password; give it in one place".into(),
                ));
            }
            // Proxy passwords are the user's own; the short-password advice is for services.
            let mut ignored = Vec::new();
            password = Some(keys.resolve(src, &key, &url_text, env, &mut ignored)?.0);
        }
        if let Some(a) = t.auth {
            auth_choice = Some((a, span.clone()));
        }
    }
    if password.is_some() && user.is_none() {
        return Err(err(
            url_text.span(),
            &key,
            "a password without a login: add user = \"...\" or put login:password@ in the URL"
                .into(),
        ));
    }
    let auth = match auth_choice {
        None => auth_from_login(user.as_deref(), password.as_deref()),
        Some((choice, span)) => {
            let k = format!("{key}.auth");
            let need_login = |scheme: &str| {
                err(
                    span.clone(),
                    &k,
                    format!("auth = \"{scheme}\" needs a login: set user and password"),
                )
            };
            match choice.as_str() {
                "none" => HopAuth::None,
                "basic" => HopAuth::Basic {
                    user: user.clone().ok_or_else(|| need_login("basic"))?,
                    password: password.clone().unwrap_or_default(),
                },
                "ntlm" => {
                    let login = user.clone().ok_or_else(|| need_login("ntlm"))?;
                    let (domain, name) = match login.split_once('\\') {
                        Some((d, u)) => (d.to_owned(), u.to_owned()),
                        None => (String::new(), login),
                    };
                    HopAuth::Ntlm(NtlmCredentials {
                        domain,
                        user: name,
                        password: password.clone().unwrap_or_default(),
                        workstation: String::new(),
                    })
                }
                "auto" => HopAuth::Auto {
                    user: user.clone().ok_or_else(|| need_login("auto"))?,
                    password: password.clone().unwrap_or_default(),
                },
                other => {
                    return Err(err(
                        span,
                        &k,
                        format!(
                        "unknown value {other:?}: use \"none\", \"basic\", \"ntlm\" or \"auto\""
                    ),
                    ))
                }
            }
        }
    };
    if let HopAuth::Ntlm(c) = &auth {
        if c.user.is_empty() {
            return Err(err(
                url_text.span(),
                &key,
                "NTLM login has no user name after the backslash".into(),
            ));
        }
    }
    Ok(ProxyHop {
        host: url.host,
        port: url.port,
        auth,
    })
}

/// `http://[login[:password]@]host:port[/]`, with percent-escapes allowed in login and password.
fn parse_url(text: &str) -> Result<ProxyUrl, String> {
    let rest = match text.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(format!("proxy URL scheme {scheme:?} is not supported: use http:// (the tunnel itself carries TLS)"))
        }
        None => return Err(format!("{text:?} is not a proxy URL: write http://host:port")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err("a proxy URL has no path: write http://host:port".into());
    }
    let (login, hostport) = match rest.rsplit_once('@') {
        Some((l, h)) => (Some(l), h),
        None => (None, rest),
    };
    let (user, password) = match login {
        None => (None, None),
        Some(l) => {
            let (u, p) = match l.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (l, None),
            };
            let u = percent_decode(u)?;
            if u.is_empty() {
                return Err("empty login before '@'".into());
            }
            (Some(u), p.map(percent_decode).transpose()?)
        }
    };
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| format!("proxy {hostport:?} needs a port: http://{hostport}:3128"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("invalid proxy port {port:?}"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['[', ']', ' ', '@']) {
        return Err(format!("invalid proxy host {host:?}"));
    }
    Ok(ProxyUrl {
        host: host.to_owned(),
        port,
        user,
        password,
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .ok_or("incomplete %-escape in proxy login")?;
            let v = u8::from_str_radix(hex, 16)
                .map_err(|_| format!("invalid %-escape %{hex} in proxy login"))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "proxy login is not UTF-8 after %-decoding".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://mydomain\\myuser1:mypass@proxy1.corp:8080").unwrap(),
            ProxyUrl {
                host: "proxy1.corp".into(),
                port: 8080,
                user: Some("mydomain\\myuser1".into()),
                password: Some("mypass".into())
            }
        );
        assert_eq!(
            parse_url("http://u%40x:p%3Aw%40@[::1]:3128/").unwrap(),
            ProxyUrl {
                host: "::1".into(),
                port: 3128,
                user: Some("u@x".into()),
                password: Some("p:w@".into())
            }
        );
        assert_eq!(parse_url("http://p:3128").unwrap().user, None);
        assert!(parse_url("https://p:3128")
            .unwrap_err()
            .contains("not supported"));
        assert!(parse_url("p:3128").unwrap_err().contains("http://"));
        assert!(parse_url("http://p").unwrap_err().contains("needs a port"));
        assert!(parse_url("http://p:0").is_err());
        assert!(parse_url("http://p:3128/x").is_err());
        assert!(parse_url("http://u:%zz@p:1").is_err());
        assert!(parse_url("http://:pw@p:1").is_err());
    }
}
