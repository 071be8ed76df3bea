//! The `[http]` section and the services' `http_prefix` / `hosts`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dialback_tokio::settings::GatewaySettings;

use super::source::Source;
use super::*;

fn no_env(_: &str) -> Option<OsString> {
    None
}

fn gw(text: &str) -> Result<(GatewaySettings, Vec<String>), ConfigError> {
    gateway::parse(
        &Source::new(Path::new("/etc/dialback/gateway.toml"), text),
        &no_env,
    )
}

fn gw_err(text: &str) -> ConfigError {
    match gw(text) {
        Ok((settings, _)) => panic!("accepted: {settings:?}"),
        Err(e) => e,
    }
}

const SERVICES: &str = r#"
[services.portal]
password = "correct horse battery"
http_prefix = "/~~srvBACK"
hosts = ["Portal.example.com", "*.apps.example.com"]

[services.rdp]
password = "correct horse battery"
tcp_listen = "0.0.0.0:13389"
"#;

#[test]
fn http_section_routes_every_service() {
    let (s, warnings) = gw(&format!(
        "[http]\nlisten = \"0.0.0.0:8080\"\ntls_listen = \"0.0.0.0:8443\"\ncert = \"site.crt\"\nkey = \"site.key\"\nhead_timeout = \"5s\"\n\n[[http.certs]]\nnames = [\"b.example.com\"]\ncert = \"b.crt\"\nkey = \"/keys/b.key\"\n{SERVICES}"
    ))
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let http = s.http.unwrap();
    assert_eq!(http.listen, Some("0.0.0.0:8080".parse().unwrap()));
    assert_eq!(http.tls_listen, Some("0.0.0.0:8443".parse().unwrap()));
    assert_eq!(http.head_timeout, Duration::from_secs(5));
    assert_eq!(http.certs.len(), 2);
    assert!(http.certs[0].names.is_empty());
    assert_eq!(http.certs[0].cert, PathBuf::from("/etc/dialback/site.crt"));
    assert_eq!(http.certs[1].names, vec!["b.example.com".to_owned()]);
    assert_eq!(http.certs[1].key, PathBuf::from("/keys/b.key"));
    let portal = http.routes.iter().find(|r| r.service == "portal").unwrap();
    assert_eq!(portal.prefix, "/~~srvBACK");
    assert_eq!(
        portal.hosts,
        vec![
            "portal.example.com".to_owned(),
            "*.apps.example.com".to_owned()
        ]
    );
    // Without http_prefix a service is reachable at /~~NAME.
    let rdp = http.routes.iter().find(|r| r.service == "rdp").unwrap();
    assert_eq!(rdp.prefix, "/~~rdp");
    // With [http], tcp_listen is optional.
    let portal = s.services.iter().find(|s| s.name == "portal").unwrap();
    assert_eq!(portal.tcp_listen, None);
}

#[test]
fn http_problems_name_line_and_key() {
    let e = gw_err("[http]\n\n[services.a]\npassword = \"correct horse battery\"\n");
    assert_eq!(e.key(), Some("http"));
    assert!(e.to_string().contains("set listen"), "{e}");

    let e = gw_err(&format!(
        "[http]\ntls_listen = \"0.0.0.0:8443\"\n{SERVICES}"
    ));
    assert_eq!((e.line(), e.key()), (Some(2), Some("http.tls_listen")));
    assert!(e.to_string().contains("needs a certificate"), "{e}");

    let e = gw_err(&format!("[http]\nlisten = \"0.0.0.0:13389\"\n{SERVICES}"));
    assert_eq!(e.key(), Some("services.rdp.tcp_listen"));
    assert!(e.to_string().contains("clashes with http.listen"), "{e}");

    let e = gw_err(&format!("[http]\nlisten = \"0.0.0.0:7000\"\n{SERVICES}"));
    assert_eq!((e.line(), e.key()), (Some(2), Some("http.listen")));

    let e = gw_err(&format!(
        "[http]\nlisten = \"0.0.0.0:80\"\nmax_head = 10\n{SERVICES}"
    ));
    assert_eq!((e.line(), e.key()), (Some(3), Some("http.max_head")));

    let e = gw_err(&format!(
        "[http]\nlisten = \"0.0.0.0:80\"\nbogus = 1\n{SERVICES}"
    ));
    assert_eq!((e.line(), e.key()), (Some(3), Some("http.bogus")));

    let e = gw_err(&format!(
        "[http]\nlisten = \"0.0.0.0:80\"\naccept_proxy = \"yes\"\n{SERVICES}"
    ));
    assert_eq!((e.line(), e.key()), (Some(3), Some("http.accept_proxy")));
}

#[test]
fn prefixes_and_hosts_are_checked() {
    let text = |prefix: &str, hosts: &str| {
        format!(
            "[http]\nlisten = \"0.0.0.0:80\"\n\n[services.a]\npassword = \"correct horse battery\"\nhttp_prefix = \"{prefix}\"\nhosts = [{hosts}]\n\n[services.b]\npassword = \"correct horse battery\"\nhosts = [\"b.example.com\"]\n"
        )
    };
    let e = gw_err(&text("~~a", ""));
    assert_eq!(
        (e.line(), e.key()),
        (Some(6), Some("services.a.http_prefix"))
    );
    let e = gw_err(&text("/~~b", ""));
    assert_eq!(e.key(), Some("services.b.http_prefix"));
    assert!(e.to_string().contains("already published"), "{e}");
    let e = gw_err(&text("/~~a", "\"B.example.com\""));
    assert_eq!(e.key(), Some("services.b.hosts"));
    let e = gw_err(&text("/~~a", "\"not a host\""));
    assert_eq!((e.line(), e.key()), (Some(7), Some("services.a.hosts")));
    assert!(gw(&text("/portal/a", "\"a.example.com\"")).is_ok());
}

#[test]
fn http_keys_need_the_http_section() {
    let e = gw_err(
        "[services.a]\npassword = \"correct horse battery\"\ntcp_listen = \"0.0.0.0:1\"\nhttp_prefix = \"/~~x\"\n",
    );
    assert_eq!(
        (e.line(), e.key()),
        (Some(4), Some("services.a.http_prefix"))
    );
    assert!(e.to_string().contains("no [http] section"), "{e}");
    let (s, _) =
        gw("[services.a]\npassword = \"correct horse battery\"\ntcp_listen = \"0.0.0.0:1\"\n")
            .unwrap();
    assert!(s.http.is_none());
}
