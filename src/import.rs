//! `dialback import balance.bin [backbalance.bin]`: converts the line syntax of the older
//! gateway this project replaces into dialback's TOML.
//!
//! balance.bin (gateway side), one entry per `;`-terminated line:
//!
//! ```text
//! /~~srvBACK=mypassword1234#:*;                 any address may register, password mypassword1234
//! /~~srvBACK=mypassword1234#:1;                 the same (the number after ':' is ignored)
//! /~~srvBACK=mypassword1234#:*1.2.3.4;          only from 1.2.3.4
//! /~~srvBACK=mypassword1234#:*51.254.;          only from addresses starting with 51.254.
//! /~~srvBACK=mypassword1234#:*home.dyndns.org;  only from what that name resolves to
//! SSL /~~srvBACK=mypassword1234#:*;             data connections under TLS
//! /~~srv1=10.0.0.5:80;                          direct: the gateway dials 10.0.0.5:80 itself
//! /~~srv1=10.0.0.6:80;                          the same name again: balanced over both
//! ```
//!
//! backbalance.bin (agent side), the proxy cascade: `/ -> \user:pass@proxy:port -> user2:pass@proxy2:port;`
//! (a `\` in the login means NTLM, `\user` for no domain; other logins Basic; `->` alone, no
//! login).
//!
//! Everything else is refused with the file, the line and why, never skipped silently.

use std::fmt::Write as _;

/// A line that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportError {
    pub file: String,
    pub line: usize,
    pub text: String,
    pub why: String,
}

impl std::fmt::Display for ImportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}\n  {}",
            self.file, self.line, self.why, self.text
        )
    }
}

impl std::error::Error for ImportError {}

/// One back-connect service of balance.bin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackService {
    pub name: String,
    pub password: String,
    /// `None`: any address (`*` or a bare number).
    pub allow_from: Option<String>,
    pub data_tls: bool,
    pub line: usize,
}

/// One direct (usual reverse proxy) service of balance.bin: the gateway dials its servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectService {
    pub name: String,
    /// `host:port` of each server, in the order of their lines.
    pub upstreams: Vec<String>,
    /// The first line naming it.
    pub line: usize,
}

/// Everything balance.bin defines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    pub back: Vec<BackService>,
    pub direct: Vec<DirectService>,
}

impl Entries {
    pub fn len(&self) -> usize {
        self.back.len() + self.direct.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One proxy of a backbalance.bin cascade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHop {
    pub user: Option<String>,
    pub password: Option<String>,
    pub host_port: String,
}

/// The statements of a file: `;`-terminated, with their 1-based starting line. Blank lines
/// and lines starting with `#` or `//` are comments.
fn statements(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if current.is_empty()
            && (line.is_empty() || line.starts_with('#') || line.starts_with("//"))
        {
            continue;
        }
        if current.is_empty() {
            start = i + 1;
        } else {
            current.push(' ');
        }
        current.push_str(line);
        while let Some(end) = current.find(';') {
            let stmt = current[..end].trim().to_owned();
            let rest = current[end + 1..].trim().to_owned();
            if !stmt.is_empty() {
                out.push((start, stmt));
            }
            current = rest;
        }
    }
    if !current.trim().is_empty() {
        out.push((start, current.trim().to_owned()));
    }
    out
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Reads balance.bin: back-connect entries (a password followed by `#`) and direct ones (an
/// address).
pub fn parse_balance(file: &str, text: &str) -> Result<Entries, ImportError> {
    let mut out: Vec<BackService> = Vec::new();
    let mut direct: Vec<DirectService> = Vec::new();
    for (line, stmt) in statements(text) {
        let err = |why: String| ImportError {
            file: file.to_owned(),
            line,
            text: format!("{stmt};"),
            why,
        };
        let (data_tls, rest) = match stmt.strip_prefix("SSL") {
            Some(r) if r.starts_with(char::is_whitespace) => (true, r.trim_start()),
            _ => (false, stmt.as_str()),
        };
        let Some(rest) = rest.strip_prefix("/~~") else {
            return Err(err(
                "expected an entry like /~~name=password#:*; (with an optional SSL in front)"
                    .into(),
            ));
        };
        let Some((name, value)) = rest.split_once('=') else {
            return Err(err("expected '=' after the /~~name".into()));
        };
        if !valid_name(name) {
            return Err(err(format!(
                "service name {name:?} must be 1 to 255 letters, digits, '-', '_' or '.'"
            )));
        }
        let Some((password, target)) = value.rsplit_once('#') else {
            // No '#': a direct entry, the address the gateway dials itself.
            if data_tls {
                return Err(err(format!(
                    "SSL on the direct entry /~~{name} (TLS toward its server) cannot be \
                     imported: a service with upstreams speaks plain TCP to them"
                )));
            }
            let addr = value.trim();
            let valid = match addr.rsplit_once(':') {
                Some((host, port)) => {
                    !host.is_empty()
                        && !host.contains(char::is_whitespace)
                        && port.parse::<u16>().is_ok_and(|p| p > 0)
                }
                None => false,
            };
            if !valid {
                return Err(err(format!(
                    "/~~{name}: expected a password ending in '#' (back-connect) or the \
                     host:port the gateway dials (direct), found {addr:?}"
                )));
            }
            if let Some(first) = out.iter().find(|s| s.name == name) {
                return Err(err(format!(
                    "/~~{name} is a back-connect entry on line {}; a name is either \
                     back-connect or direct",
                    first.line
                )));
            }
            match direct.iter_mut().find(|d| d.name == name) {
                Some(d) if d.upstreams.iter().any(|u| u == addr) => {
                    return Err(err(format!(
                        "/~~{name} already lists {addr} on line {}",
                        d.line
                    )));
                }
                // The same name again: one more server to balance over.
                Some(d) => d.upstreams.push(addr.to_owned()),
                None => direct.push(DirectService {
                    name: name.to_owned(),
                    upstreams: vec![addr.to_owned()],
                    line,
                }),
            }
            continue;
        };
        if password.is_empty() {
            return Err(err(format!("/~~{name} has an empty password")));
        }
        let Some(port_and_allow) = target.strip_prefix(':') else {
            return Err(err(format!(
                "expected ':' after the password's '#' (like #:*; or #:1;), found {target:?}"
            )));
        };
        let allow_from = if let Some(pattern) = port_and_allow.strip_prefix('*') {
            let pattern = pattern.trim();
            if pattern.is_empty() {
                None
            } else if pattern.contains(char::is_whitespace) || pattern.contains(',') {
                return Err(err(format!(
                    "only one address, prefix or name may follow '*', found {pattern:?}"
                )));
            } else {
                Some(pattern.to_owned())
            }
        } else if !port_and_allow.is_empty() && port_and_allow.chars().all(|c| c.is_ascii_digit()) {
            // The old port field: any positive number meant "any address".
            None
        } else {
            return Err(err(format!(
                "after ':' expected '*', '*' followed by an address, prefix or name, or a \
                 number; found {port_and_allow:?} (a port such as '3389 RDPPORT' means nothing \
                 for back-connect entries: the agent dials its local service)"
            )));
        };
        if let Some(first) = out.iter().find(|s| s.name == name) {
            return Err(err(format!(
                "/~~{name} is already defined on line {}",
                first.line
            )));
        }
        if let Some(first) = direct.iter().find(|s| s.name == name) {
            return Err(err(format!(
                "/~~{name} is a direct entry on line {}; a name is either back-connect or \
                 direct",
                first.line
            )));
        }
        out.push(BackService {
            name: name.to_owned(),
            password: password.to_owned(),
            allow_from,
            data_tls,
            line,
        });
    }
    Ok(Entries { back: out, direct })
}

/// Reads backbalance.bin: the proxy cascade (the last cascade line wins, as the last line of
/// the file was the one read).
pub fn parse_backbalance(file: &str, text: &str) -> Result<Vec<ProxyHop>, ImportError> {
    let mut cascade = Vec::new();
    for (line, stmt) in statements(text) {
        let err = |why: String| ImportError {
            file: file.to_owned(),
            line,
            text: format!("{stmt};"),
            why,
        };
        let Some(rest) = stmt.strip_prefix('/') else {
            return Err(err(
                "expected a proxy cascade like / -> \\user:pass@proxy:port; (only cascade \
                 lines can be imported from this file)"
                    .into(),
            ));
        };
        let mut hops = Vec::new();
        let mut parts = rest.split("->");
        if !parts.next().is_some_and(|p| p.trim().is_empty()) {
            return Err(err("expected '->' right after '/'".into()));
        }
        for (i, part) in parts.enumerate() {
            let part = part.trim();
            let hop_no = i + 1;
            if part.is_empty() {
                return Err(err(format!(
                    "proxy {hop_no} is empty: write its host:port after '->'"
                )));
            }
            let (login, host_port) = match part.rsplit_once('@') {
                Some((login, hp)) => (Some(login), hp),
                None => (None, part),
            };
            if host_port.is_empty() {
                return Err(err(format!("proxy {hop_no} has no host:port after '@'")));
            }
            match host_port.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
                _ => {
                    return Err(err(format!(
                        "proxy {hop_no}: expected host:port, found {host_port:?}"
                    )))
                }
            }
            let (user, password) = match login {
                None => (None, None),
                Some(l) => match l.split_once(':') {
                    Some((u, p)) => (Some(u.to_owned()), Some(p.to_owned())),
                    None => (Some(l.to_owned()), None),
                },
            };
            if user.as_deref() == Some("") {
                return Err(err(format!("proxy {hop_no} has an empty login")));
            }
            hops.push(ProxyHop {
                user,
                password,
                host_port: host_port.to_owned(),
            });
        }
        if hops.is_empty() {
            return Err(err("the cascade names no proxy".into()));
        }
        cascade = hops;
    }
    Ok(cascade)
}

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// gateway.toml for the services of balance.bin.
pub fn gateway_toml(source: &str, entries: &Entries) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Imported from {source} by `dialback import`.");
    let _ = writeln!(
        out,
        "# Agents connect to `listen`; browsers reach each service at /~~NAME on [http]."
    );
    let _ = writeln!(out, "listen = \"0.0.0.0:7000\"");
    let _ = writeln!(out, "state_dir = \"/var/lib/dialback\"");
    let _ = writeln!(out, "\n[http]\nlisten = \"0.0.0.0:8080\"");
    let _ = writeln!(
        out,
        "# tls_listen = \"0.0.0.0:8443\"  cert = \"site.crt\"  key = \"site.key\""
    );
    for s in &entries.direct {
        let _ = writeln!(out, "\n# line {}", s.line);
        let _ = writeln!(out, "[services.{}]", q(&s.name));
        let list: Vec<String> = s.upstreams.iter().map(|u| q(u)).collect();
        let _ = writeln!(out, "upstreams = [{}]", list.join(", "));
    }
    for s in &entries.back {
        let _ = writeln!(out, "\n# line {}", s.line);
        let _ = writeln!(out, "[services.{}]", q(&s.name));
        let _ = writeln!(out, "password = {}", q(&s.password));
        if let Some(a) = &s.allow_from {
            let _ = writeln!(out, "allow_from = [{}]", q(a));
        }
        if s.data_tls {
            let _ = writeln!(out, "data_tls = true");
        }
    }
    out
}

/// agent.toml for the services of balance.bin, through the cascade of backbalance.bin.
pub fn agent_toml(sources: &str, services: &[BackService], proxies: &[ProxyHop]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Imported from {sources} by `dialback import`.");
    let _ = writeln!(
        out,
        "# Fill in the gateway's address and the fingerprint `dialback fingerprint` prints there."
    );
    let _ = writeln!(out, "gateway = \"gateway.example.com:7000\"");
    let _ = writeln!(
        out,
        "fingerprint = \"sha256:REPLACE-WITH-THE-GATEWAY-FINGERPRINT\""
    );
    if !proxies.is_empty() {
        let _ = writeln!(
            out,
            "# In order; a login with '\\' means NTLM (\"\\\\user\" for no domain), others Basic."
        );
        let _ = writeln!(out, "proxies = [");
        for p in proxies {
            let mut entry = format!("  {{ url = {}", q(&format!("http://{}", p.host_port)));
            if let Some(u) = &p.user {
                let _ = write!(entry, ", user = {}", q(u));
            }
            if let Some(pw) = &p.password {
                let _ = write!(entry, ", password = {}", q(pw));
            }
            entry.push_str(" },");
            let _ = writeln!(out, "{entry}");
        }
        let _ = writeln!(out, "]");
    }
    for s in services {
        let _ = writeln!(out, "\n[services.{}]", q(&s.name));
        let _ = writeln!(out, "password = {}", q(&s.password));
        let _ = writeln!(
            out,
            "local = \"127.0.0.1:3389\"   # the private service this agent publishes"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BALANCE: &str = "\
// every form the old gateway documented
/~~srvBACK=mypassword1234#:*;
/~~srvNUM=secret#:1;
/~~srvIP=pw1#:*1.2.3.4;
/~~srvPREFIX=pw2#:*51.254.;
/~~srvDNS=pw3#:*home.dyndns.org;
SSL /~~srvTLS=pw#with#hash#:*;
";

    #[test]
    fn balance_every_documented_form() {
        let s = parse_balance("balance.bin", BALANCE).unwrap().back;
        let got: Vec<(&str, &str, Option<&str>, bool, usize)> = s
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.password.as_str(),
                    s.allow_from.as_deref(),
                    s.data_tls,
                    s.line,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("srvBACK", "mypassword1234", None, false, 2),
                ("srvNUM", "secret", None, false, 3),
                ("srvIP", "pw1", Some("1.2.3.4"), false, 4),
                ("srvPREFIX", "pw2", Some("51.254."), false, 5),
                ("srvDNS", "pw3", Some("home.dyndns.org"), false, 6),
                // The last '#' ends the password, so a password may contain '#'.
                ("srvTLS", "pw#with#hash", None, true, 7),
            ]
        );
    }

    #[test]
    fn balance_errors_name_the_line_and_why() {
        for (text, line, why) in [
            ("\n\n/~~srv1=10.0.0.5;\n", 3, "host:port the gateway dials"),
            ("SSL /~~srv1=10.0.0.5:443;", 1, "plain TCP"),
            (
                "/~~srv1=a:80;\n/~~srv1=a:80;",
                2,
                "already lists a:80 on line 1",
            ),
            ("/~~srv1=a:80;\n/~~srv1=pw#:*;", 2, "direct entry on line 1"),
            (
                "/~~srv1=pw#:*;\n/~~srv1=a:80;",
                2,
                "back-connect entry on line 1",
            ),
            ("/~~srvBACK=pw#:3389 RDPPORT;", 1, "means nothing"),
            ("/~~a b=pw#:*;", 1, "service name"),
            ("/~~srv=#:*;", 1, "empty password"),
            ("/~~srv=pw#*;", 1, "expected ':'"),
            ("/~~srv=pw#:*1.2.3.4 5.6.7.8;", 1, "only one"),
            ("srv=pw#:*;", 1, "expected an entry"),
            (
                "/~~srv=pw#:*;\n/~~srv=other#:*;",
                2,
                "already defined on line 1",
            ),
        ] {
            let e = parse_balance("balance.bin", text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.why.contains(why), "{text}: {e}");
            assert!(
                e.to_string().starts_with(&format!("balance.bin:{line}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn backbalance_cascades() {
        let text = "\
/ -> \\myuser1:mypass@proxy1.corp:8080;
/ -> mydomain\\myuser1:mypass@proxy1.corp:8080 -> myuser2:pa:ss@proxy2.corp:3128 -> plain.corp:80;
";
        let hops = parse_backbalance("backbalance.bin", text).unwrap();
        assert_eq!(
            hops,
            vec![
                ProxyHop {
                    user: Some("mydomain\\myuser1".into()),
                    password: Some("mypass".into()),
                    host_port: "proxy1.corp:8080".into()
                },
                ProxyHop {
                    user: Some("myuser2".into()),
                    password: Some("pa:ss".into()),
                    host_port: "proxy2.corp:3128".into()
                },
                ProxyHop {
                    user: None,
                    password: None,
                    host_port: "plain.corp:80".into()
                },
            ],
            "the last cascade line wins; ':' in a password stays"
        );
        for (text, why) in [
            ("/ -> ;", "empty"),
            ("/ -> \\u:p@;", "no host:port"),
            ("/ -> u:p@proxy;", "expected host:port"),
            ("/ -> :p@proxy:80;", "empty login"),
            ("/~~srv=pw#:*;", "expected '->'"),
            ("proxy:80;", "cascade"),
        ] {
            let e = parse_backbalance("backbalance.bin", text).unwrap_err();
            assert!(e.why.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn toml_output_quotes_everything() {
        let s = parse_balance("b", "/~~x=p\"w\\#:*;").unwrap();
        let t = gateway_toml("b", &s);
        assert!(t.contains("password = \"p\\\"w\\\\\""), "{t}");
        let parsed: toml::Value = toml::from_str(&t).unwrap();
        assert_eq!(parsed["services"]["x"]["password"].as_str(), Some("p\"w\\"));
    }
}

#[cfg(test)]
mod direct_tests {
    use super::*;

    #[test]
    fn direct_entries_become_upstreams_and_repeats_balance() {
        let text = "/~~srv1=10.0.0.5:80;\n/~~back=pw#:*;\n/~~srv1=web2.corp:8080;\n/~~srv2=[2001:db8::1]:443;\n";
        let e = parse_balance("balance.bin", text).unwrap();
        assert_eq!(
            e.direct,
            vec![
                DirectService {
                    name: "srv1".into(),
                    upstreams: vec!["10.0.0.5:80".into(), "web2.corp:8080".into()],
                    line: 1
                },
                DirectService {
                    name: "srv2".into(),
                    upstreams: vec!["[2001:db8::1]:443".into()],
                    line: 4
                },
            ]
        );
        assert_eq!(e.back.len(), 1);
        let t = gateway_toml("balance.bin", &e);
        let v: toml::Value = toml::from_str(&t).unwrap();
        let ups = v["services"]["srv1"]["upstreams"].as_array().unwrap();
        assert_eq!(ups.len(), 2);
        assert!(v["services"]["srv1"].get("password").is_none(), "{t}");
        assert_eq!(v["services"]["back"]["password"].as_str(), Some("pw"));
    }
}
