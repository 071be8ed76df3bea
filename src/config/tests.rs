//! Whole-file tests of both config kinds.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dialback_core::Timing;
use dialback_tokio::settings::{
    AgentSettings, GatewaySettings, GatewayTrust, Secret, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_PENDING, DEFAULT_POOL, DEFAULT_POOL_MAX_IDLE, DEFAULT_RECONNECT_MAX,
    DEFAULT_RECONNECT_MIN,
};

use super::source::Source;
use super::*;

fn fake_env(name: &str) -> Option<OsString> {
    match name {
        "GW_PASSWORD" => Some("password-from-env".into()),
        "EMPTY_PASSWORD" => Some(OsString::new()),
        _ => None,
    }
}

fn gateway_at(path: &Path, text: &str) -> Result<(GatewaySettings, Vec<String>), ConfigError> {
    gateway::parse(&Source::new(path, text), &fake_env)
}

fn gw(text: &str) -> Result<(GatewaySettings, Vec<String>), ConfigError> {
    gateway_at(Path::new("gateway.toml"), text)
}

fn gw_err(text: &str) -> ConfigError {
    match gw(text) {
        Ok((settings, _)) => panic!("accepted: {settings:?}"),
        Err(e) => e,
    }
}

fn ag(text: &str) -> Result<(AgentSettings, Vec<String>), ConfigError> {
    agent::parse(&Source::new(Path::new("agent.toml"), text), &fake_env)
}

fn ag_err(text: &str) -> ConfigError {
    match ag(text) {
        Ok((settings, _)) => panic!("accepted: {settings:?}"),
        Err(e) => e,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const PASSWORD: &str = "correct horse battery";
const FINGERPRINT: &str = "sha256:abababababababababababababababababababababababababababababababab";

const MINIMAL_GATEWAY: &str = r#"
[services.web]
password = "correct horse battery"
tcp_listen = "0.0.0.0:9000"
"#;

const MINIMAL_AGENT: &str = r#"
gateway = "gw.example.com:7000"
fingerprint = "sha256:abababababababababababababababababababababababababababababababab"

[services.web]
password = "correct horse battery"
local = "127.0.0.1:8080"
"#;

// ---- gateway: valid files ----

#[test]
fn minimal_gateway_gets_defaults() {
    let (s, warnings) = gw(MINIMAL_GATEWAY).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(s.listen, addr("0.0.0.0:7000"));
    assert_eq!(s.identity.state_dir, PathBuf::from("dialback-state"));
    assert_eq!((s.identity.cert, s.identity.key), (None, None));
    assert_eq!(s.timing, Timing::default());
    assert_eq!(s.services.len(), 1);
    let web = &s.services[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.password, Secret(PASSWORD.into()));
    assert_eq!(web.tcp_listen, Some(addr("0.0.0.0:9000")));
    assert!(!web.data_tls);
    assert_eq!(web.max_pending, DEFAULT_MAX_PENDING);
}

#[test]
fn full_gateway() {
    let text = r#"
listen = "127.0.0.1:7100"
state_dir = "/var/lib/dialback"
cert = "tls/gw.crt"
key = "/etc/tls/gw.key"
heartbeat = "5s"
dead_after = "1m30s"
token_ttl = "2500ms"
handshake_timeout = "1h"

[services.zeta]
password_env = "GW_PASSWORD"
tcp_listen = "[::1]:13389"
data_tls = true
max_pending = 65536

[services."alpha.b_c-1"]
password = "correct horse battery"
tcp_listen = "127.0.0.1:13390"
max_pending = 1
"#;
    let (s, warnings) = gateway_at(Path::new("/etc/dialback/gateway.toml"), text).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(s.listen, addr("127.0.0.1:7100"));
    assert_eq!(s.identity.state_dir, PathBuf::from("/var/lib/dialback"));
    assert_eq!(
        s.identity.cert,
        Some(PathBuf::from("/etc/dialback/tls/gw.crt"))
    );
    assert_eq!(s.identity.key, Some(PathBuf::from("/etc/tls/gw.key")));
    assert_eq!(
        s.timing,
        Timing {
            heartbeat: Duration::from_secs(5),
            dead_after: Duration::from_secs(90),
            token_ttl: Duration::from_millis(2500),
            handshake_timeout: Duration::from_secs(3600),
        }
    );
    // File order, not alphabetical.
    let names: Vec<_> = s.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["zeta", "alpha.b_c-1"]);
    let zeta = &s.services[0];
    assert_eq!(zeta.password, Secret("password-from-env".into()));
    assert_eq!(zeta.tcp_listen, Some(addr("[::1]:13389")));
    assert!(zeta.data_tls);
    assert_eq!(zeta.max_pending, 65536);
    assert_eq!(s.services[1].max_pending, 1);
}

// ---- gateway: shape errors ----

#[test]
fn unknown_top_level_key_names_line_and_key() {
    let e = gw_err("listen = \"0.0.0.0:7000\"\nlisten_addr = \"x\"\n");
    assert_eq!(e.line(), Some(2));
    assert_eq!(e.key(), Some("listen_addr"));
    let msg = e.to_string();
    assert!(
        msg.starts_with("gateway.toml:2: listen_addr: unknown field `listen_addr`"),
        "{msg}"
    );
}

#[test]
fn unknown_service_key_names_line_and_full_key() {
    let e = gw_err(&format!("{MINIMAL_GATEWAY}tcp_listn = \"0.0.0.0:1\"\n"));
    assert_eq!(e.line(), Some(5));
    assert_eq!(e.key(), Some("services.web.tcp_listn"));
    assert!(e.to_string().contains("unknown field `tcp_listn`"), "{e}");
}

#[test]
fn wrong_type_names_line_and_key() {
    let e = gw_err(&format!("{MINIMAL_GATEWAY}data_tls = \"yes\"\n"));
    assert_eq!(e.line(), Some(5));
    assert_eq!(e.key(), Some("services.web.data_tls"));
}

#[test]
fn mistyped_password_is_not_echoed() {
    let e = gw_err("[services.web]\npassword = 123456789012345\ntcp_listen = \"0.0.0.0:9000\"\n");
    assert_eq!(
        e.to_string(),
        "gateway.toml:2: services.web.password: must be a string"
    );
}

#[test]
fn syntax_error_has_line() {
    let e = gw_err("listen = \"0.0.0.0:7000\"\n\n[services.web\n");
    assert_eq!(e.line(), Some(3));
    assert!(
        e.to_string().starts_with("gateway.toml:3: invalid TOML: "),
        "{e}"
    );
}

#[test]
fn unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.toml");
    let e = load_gateway(&path).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read: ", path.display())),
        "{e}"
    );
}

// ---- gateway: values ----

#[test]
fn bad_duration() {
    let e = gw_err(&format!("heartbeat = \"20 s\"\n{MINIMAL_GATEWAY}"));
    assert_eq!(e.line(), Some(1));
    assert_eq!(e.key(), Some("heartbeat"));
    assert!(e.to_string().contains("invalid duration \"20 s\""), "{e}");

    let e = gw_err(&format!("\ndead_after = 60\n{MINIMAL_GATEWAY}"));
    assert_eq!(
        e.to_string(),
        "gateway.toml:2: dead_after: bare number 60 is not a duration: add a unit, e.g. \"60s\" (units: ms, s, m, h)"
    );

    let e = gw_err(&format!("token_ttl = \"0s\"\n{MINIMAL_GATEWAY}"));
    assert_eq!(
        e.to_string(),
        "gateway.toml:1: token_ttl: must be greater than zero"
    );
}

#[test]
fn heartbeat_must_be_shorter_than_dead_after() {
    let e = gw_err(&format!(
        "heartbeat = \"1m\"\ndead_after = \"60s\"\n{MINIMAL_GATEWAY}"
    ));
    assert_eq!(e.line(), Some(1));
    assert_eq!(e.key(), Some("heartbeat"));
    assert!(
        e.to_string()
            .contains("heartbeat must be shorter than dead_after"),
        "{e}"
    );
    // Only dead_after written: it is the one blamed.
    let e = gw_err(&format!("dead_after = \"10s\"\n{MINIMAL_GATEWAY}"));
    assert_eq!((e.line(), e.key()), (Some(1), Some("dead_after")));
}

#[test]
fn bad_address_message_format() {
    let text = r#"# gateway
listen = "0.0.0.0:7000"

[services.web]
password = "correct horse battery"

tcp_listen = "0.0.0.0"
"#;
    let msg = gw_err(text).to_string();
    assert!(
        msg.starts_with(
            "gateway.toml:7: services.web.tcp_listen: invalid socket address \"0.0.0.0\": "
        ),
        "{msg}"
    );
    let e = gw_err(&format!(
        "listen = \"gw.example.com:7000\"\n{MINIMAL_GATEWAY}"
    ));
    assert_eq!((e.line(), e.key()), (Some(1), Some("listen")));
}

#[test]
fn cert_and_key_go_together() {
    let e = gw_err(&format!("cert = \"gw.crt\"\n{MINIMAL_GATEWAY}"));
    assert_eq!(
        e.to_string(),
        "gateway.toml:1: cert: cert and key go together: key is missing"
    );
    let e = gw_err(&format!("key = \"gw.key\"\n{MINIMAL_GATEWAY}"));
    assert_eq!(
        e.to_string(),
        "gateway.toml:1: key: cert and key go together: cert is missing"
    );
}

#[test]
fn duplicate_tcp_listen() {
    let text = r#"
[services.a]
password = "correct horse battery"
tcp_listen = "0.0.0.0:9000"

[services.b]
password = "correct horse battery"
tcp_listen = "0.0.0.0:9000"
"#;
    let e = gw_err(text);
    assert_eq!(e.line(), Some(8));
    assert_eq!(e.key(), Some("services.b.tcp_listen"));
    assert!(
        e.to_string()
            .contains("clashes with services.a.tcp_listen = \"0.0.0.0:9000\""),
        "{e}"
    );
    // A wildcard and a specific address on the same port clash too.
    let e = gw_err(&text.replacen("0.0.0.0:9000", "127.0.0.1:9000", 1));
    assert_eq!(e.key(), Some("services.b.tcp_listen"));
}

#[test]
fn tcp_listen_equal_to_listen() {
    let text = "listen = \"0.0.0.0:7000\"\n[services.web]\npassword = \"correct horse battery\"\ntcp_listen = \"0.0.0.0:7000\"\n";
    let e = gw_err(text);
    assert_eq!(e.line(), Some(4));
    assert!(
        e.to_string()
            .contains("the gateway's listen = \"0.0.0.0:7000\""),
        "{e}"
    );
    // The default listen counts as well.
    let e = gw_err(&MINIMAL_GATEWAY.replace("0.0.0.0:9000", "0.0.0.0:7000"));
    assert_eq!(e.key(), Some("services.web.tcp_listen"));
}

#[test]
fn service_needs_a_public_entry() {
    let e = gw_err("\n[services.web]\npassword = \"correct horse battery\"\n");
    assert_eq!(
        e.to_string(),
        "gateway.toml:2: services.web: service web has no public entry: set tcp_listen, or add an [http] section"
    );
}

#[test]
fn pool_defaults_values_and_range() {
    let (s, _) = gw(MINIMAL_GATEWAY).unwrap();
    assert_eq!(s.services[0].pool, DEFAULT_POOL);
    assert_eq!(s.services[0].pool_max_idle, DEFAULT_POOL_MAX_IDLE);
    let (s, _) = gw(&format!(
        "{MINIMAL_GATEWAY}pool = 0\npool_max_idle = \"2m\"\n"
    ))
    .unwrap();
    assert_eq!(s.services[0].pool, 0, "0 turns the pool off");
    assert_eq!(s.services[0].pool_max_idle, Duration::from_secs(120));
    let (s, _) = gw(&format!("{MINIMAL_GATEWAY}pool = 256\n")).unwrap();
    assert_eq!(s.services[0].pool, 256);
    for bad in ["257", "-1"] {
        let e = gw_err(&format!("{MINIMAL_GATEWAY}pool = {bad}\n"));
        assert_eq!(e.key(), Some("services.web.pool"), "{bad}");
        assert!(
            e.to_string().contains("must be from 0 (no pool) to 256"),
            "{e}"
        );
        assert!(e.to_string().starts_with("gateway.toml:5:"), "{e}");
    }
    let e = gw_err(&format!("{MINIMAL_GATEWAY}pool_max_idle = \"500ms\"\n"));
    assert_eq!(e.key(), Some("services.web.pool_max_idle"));
    assert!(e.to_string().contains("at least 1s"), "{e}");
    let e = gw_err(&format!("{MINIMAL_GATEWAY}pool_max_idle = \"soon\"\n"));
    assert_eq!(e.key(), Some("services.web.pool_max_idle"));
}

#[test]
fn max_pending_range() {
    for bad in ["0", "65537", "-1"] {
        let e = gw_err(&format!("{MINIMAL_GATEWAY}max_pending = {bad}\n"));
        assert_eq!(e.key(), Some("services.web.max_pending"), "{bad}");
        assert!(e.to_string().contains("must be from 1 to 65536"), "{e}");
    }
}

#[test]
fn at_least_one_service() {
    let e = gw_err("listen = \"0.0.0.0:7000\"\n");
    assert!(
        e.to_string().starts_with("gateway.toml: no services: "),
        "{e}"
    );
    let e = gw_err("[services]\n");
    assert!(
        e.to_string().starts_with("gateway.toml: no services: "),
        "{e}"
    );
}

// ---- service names and passwords (shared code, exercised through both kinds) ----

#[test]
fn service_name_with_a_space() {
    let e = gw_err("\n[services.\"my web\"]\npassword = \"correct horse battery\"\ntcp_listen = \"0.0.0.0:9000\"\n");
    assert_eq!(e.line(), Some(2));
    assert_eq!(e.key(), Some("services.\"my web\""));
    assert!(
        e.to_string().contains("invalid service name \"my web\""),
        "{e}"
    );
    let long = "x".repeat(65);
    let e = ag_err(&format!(
        "{MINIMAL_AGENT}[services.{long}]\npassword = \"{PASSWORD}\"\nlocal = \"a:1\"\n"
    ));
    assert!(e.to_string().contains("invalid service name"), "{e}");
}

#[test]
fn both_password_and_password_file() {
    let text = "[services.web]\npassword = \"correct horse battery\"\npassword_file = \"pw\"\ntcp_listen = \"0.0.0.0:9000\"\n";
    let e = gw_err(text);
    assert_eq!(
        e.to_string(),
        "gateway.toml:3: services.web: set only one of password, password_file or password_env (found password and password_file)"
    );
}

#[test]
fn missing_password() {
    let e = gw_err("\n\n[services.web]\ntcp_listen = \"0.0.0.0:9000\"\n");
    assert_eq!(
        e.to_string(),
        "gateway.toml:3: services.web: no password: set password, password_file or password_env"
    );
    let e = ag_err(&MINIMAL_AGENT.replace("password = \"correct horse battery\"\n", ""));
    assert_eq!(e.key(), Some("services.web"));
}

#[test]
fn password_env() {
    let text = MINIMAL_GATEWAY.replace(
        "password = \"correct horse battery\"",
        "password_env = \"NOPE_NOT_SET\"",
    );
    let e = gw_err(&text);
    assert_eq!(
        e.to_string(),
        "gateway.toml:3: services.web.password_env: environment variable NOPE_NOT_SET is not set"
    );
    let e = gw_err(&text.replace("NOPE_NOT_SET", "EMPTY_PASSWORD"));
    assert!(
        e.to_string()
            .ends_with("environment variable EMPTY_PASSWORD is empty"),
        "{e}"
    );
    let (s, _) = ag(&MINIMAL_AGENT.replace(
        "password = \"correct horse battery\"",
        "password_env = \"GW_PASSWORD\"",
    ))
    .unwrap();
    assert_eq!(s.services[0].password, Secret("password-from-env".into()));
}

#[test]
fn password_file_is_read_relative_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/web"), "password-from-file\r\n").unwrap();
    std::fs::write(dir.path().join("empty"), "\n").unwrap();
    let config = dir.path().join("gateway.toml");
    let text = MINIMAL_GATEWAY.replace(
        "password = \"correct horse battery\"",
        "password_file = \"secrets/web\"",
    );
    std::fs::write(&config, &text).unwrap();
    let (s, _) = load_gateway(&config).unwrap();
    assert_eq!(s.services[0].password, Secret("password-from-file".into()));

    std::fs::write(&config, text.replace("secrets/web", "empty")).unwrap();
    let e = load_gateway(&config).unwrap_err();
    assert_eq!(e.key(), Some("services.web.password_file"));
    assert!(e.to_string().ends_with("is empty"), "{e}");

    std::fs::write(&config, text.replace("secrets/web", "nope")).unwrap();
    let e = load_gateway(&config).unwrap_err();
    assert!(e.to_string().contains("cannot read"), "{e}");
    assert!(
        e.to_string()
            .contains(&dir.path().join("nope").display().to_string()),
        "{e}"
    );
}

#[test]
fn empty_and_short_passwords() {
    let e = gw_err(&MINIMAL_GATEWAY.replace(PASSWORD, ""));
    assert_eq!(
        e.to_string(),
        "gateway.toml:3: services.web.password: the password is empty"
    );
    let (_, warnings) = gw(&MINIMAL_GATEWAY.replace(PASSWORD, "short")).unwrap();
    assert_eq!(
        warnings,
        ["gateway.toml:3: services.web.password: the password has only 5 characters; use at least 12, ideally a long random one"]
    );
    let (_, warnings) = gw(&MINIMAL_GATEWAY.replace(PASSWORD, "exactly12chr")).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!("state_dir = \"state\"\ncert = \"./tls/gw.crt\"\nkey = \"/abs/gw.key\"\n{MINIMAL_GATEWAY}"),
    )
    .unwrap();
    let (s, _) = load_gateway(&config).unwrap();
    assert_eq!(s.identity.state_dir, dir.path().join("state"));
    assert_eq!(s.identity.cert, Some(dir.path().join("tls/gw.crt")));
    assert_eq!(s.identity.key, Some(PathBuf::from("/abs/gw.key")));

    // The default state_dir too, so the service finds it whatever its working directory.
    std::fs::write(&config, MINIMAL_GATEWAY).unwrap();
    let (s, _) = load_gateway(&config).unwrap();
    assert_eq!(s.identity.state_dir, dir.path().join("dialback-state"));
    let identity = load_gateway_identity(&config).unwrap();
    assert_eq!(identity.state_dir, dir.path().join("dialback-state"));

    let agent = dir.path().join("agent.toml");
    std::fs::write(
        &agent,
        MINIMAL_AGENT.replace(
            &format!("fingerprint = \"{}\"", &FINGERPRINT),
            "ca_file = \"ca.pem\"",
        ),
    )
    .unwrap();
    let (s, _) = load_agent(&agent).unwrap();
    assert_eq!(s.trust, GatewayTrust::CaFile(dir.path().join("ca.pem")));
}

#[test]
fn identity_alone_skips_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[services.web]\npassword_env = \"NOT_ON_THIS_MACHINE_1234\"\ntcp_listen = \"0.0.0.0:9000\"\n",
    )
    .unwrap();
    assert!(load_gateway(&config).is_err());
    assert_eq!(
        load_gateway_identity(&config).unwrap().state_dir,
        dir.path().join("dialback-state")
    );
    // Shape errors still count.
    std::fs::write(&config, "cert = \"a\"\n").unwrap();
    assert_eq!(
        load_gateway_identity(&config).unwrap_err().key(),
        Some("cert")
    );
}

// ---- agent ----

#[test]
fn minimal_agent_gets_defaults() {
    let (s, warnings) = ag(MINIMAL_AGENT).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(s.gateways, vec!["gw.example.com:7000".to_owned()]);
    assert_eq!(s.server_name, None);
    assert_eq!(s.trust, GatewayTrust::Fingerprint([0xab; 32]));
    assert_eq!(s.reconnect_min, DEFAULT_RECONNECT_MIN);
    assert_eq!(s.reconnect_max, DEFAULT_RECONNECT_MAX);
    assert_eq!(s.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(s.services.len(), 1);
    assert_eq!(s.services[0].name, "web");
    assert_eq!(s.services[0].password, Secret(PASSWORD.into()));
    assert_eq!(s.services[0].local, "127.0.0.1:8080");
}

#[test]
fn full_agent() {
    let text = r#"
gateway = "[2001:db8::1]:7000"
server_name = "gw.example.com"
ca = "system"
reconnect_min = "1s"
reconnect_max = "1m"
connect_timeout = "3s"

[services.rdp]
password = "correct horse battery"
local = "10.0.0.5:3389"

[services.app]
password_env = "GW_PASSWORD"
local = "localhost:8080"
"#;
    let (s, warnings) = ag(text).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(s.gateways, vec!["[2001:db8::1]:7000".to_owned()]);
    assert_eq!(s.server_name.as_deref(), Some("gw.example.com"));
    assert_eq!(s.trust, GatewayTrust::System);
    assert_eq!(s.reconnect_min, Duration::from_secs(1));
    assert_eq!(s.reconnect_max, Duration::from_secs(60));
    assert_eq!(s.connect_timeout, Duration::from_secs(3));
    let names: Vec<_> = s.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["rdp", "app"]);
    assert_eq!(s.services[1].password, Secret("password-from-env".into()));
    assert_eq!(s.services[1].local, "localhost:8080");
}

fn without_fingerprint() -> String {
    MINIMAL_AGENT.replace(&format!("fingerprint = \"{FINGERPRINT}\"\n"), "")
}

#[test]
fn missing_trust_option_points_to_dialback_fingerprint() {
    let e = ag_err(&without_fingerprint());
    let msg = e.to_string();
    assert!(
        msg.starts_with("agent.toml: no way to verify the gateway: "),
        "{msg}"
    );
    assert!(
        msg.contains("`dialback fingerprint -c gateway.toml`"),
        "{msg}"
    );
    assert!(msg.contains("fingerprint = \"sha256:...\""), "{msg}");
    // insecure = false is not a choice either.
    let e = ag_err(&format!("insecure = false\n{}", without_fingerprint()));
    assert!(e.to_string().contains("dialback fingerprint"), "{e}");
}

#[test]
fn only_one_trust_option() {
    let e = ag_err(&format!("ca = \"system\"\n{MINIMAL_AGENT}"));
    assert_eq!((e.line(), e.key()), (Some(1), Some("ca")));
    assert!(
        e.to_string()
            .ends_with("(found fingerprint and ca = \"system\")"),
        "{e}"
    );
    let e = ag_err(&format!(
        "ca_file = \"ca.pem\"\ninsecure = true\n{}",
        without_fingerprint()
    ));
    assert_eq!(
        e.to_string(),
        "agent.toml:2: insecure: set only one of fingerprint, ca_file, ca = \"system\" or insecure = true (found ca_file and insecure = true)"
    );
}

#[test]
fn trust_values() {
    let e = ag_err(&format!("ca = \"corporate\"\n{}", without_fingerprint()));
    assert_eq!((e.line(), e.key()), (Some(1), Some("ca")));
    let e = ag_err(&MINIMAL_AGENT.replace(FINGERPRINT, "sha256:abcd"));
    assert_eq!((e.line(), e.key()), (Some(3), Some("fingerprint")));
    assert!(e.to_string().contains("sha256:<64 hex digits>"), "{e}");
    assert!(
        e.to_string()
            .contains("dialback fingerprint -c gateway.toml"),
        "{e}"
    );
    // openssl's form is accepted as well.
    let openssl = vec!["AB"; 32].join(":");
    let (s, _) = ag(&MINIMAL_AGENT.replace(FINGERPRINT, &openssl)).unwrap();
    assert_eq!(s.trust, GatewayTrust::Fingerprint([0xab; 32]));
    let e = ag_err(&format!("server_name = \"bad name\"\n{MINIMAL_AGENT}"));
    assert_eq!((e.line(), e.key()), (Some(1), Some("server_name")));
    let (s, _) = ag(&format!("server_name = \"10.0.0.1\"\n{MINIMAL_AGENT}")).unwrap();
    assert_eq!(s.server_name.as_deref(), Some("10.0.0.1"));

    let (s, warnings) = ag(&format!("insecure = true\n{}", without_fingerprint())).unwrap();
    assert_eq!(s.trust, GatewayTrust::Insecure);
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].starts_with("agent.toml:1: insecure: "),
        "{warnings:?}"
    );
}

#[test]
fn gateway_address_needs_a_port() {
    let e = ag_err(&MINIMAL_AGENT.replace("gw.example.com:7000", "gw.example.com"));
    assert_eq!((e.line(), e.key()), (Some(2), Some("gateway")));
    assert!(e.to_string().contains("port is missing"), "{e}");
    let e = ag_err(&MINIMAL_AGENT.replace("gateway = \"gw.example.com:7000\"\n", ""));
    assert_eq!(
        e.to_string(),
        "agent.toml: gateway: missing: set gateway = \"host:port\" (the gateway's listen address), or gateways = [\"host:port\", ...] to register with each gateway of a fleet"
    );
}

#[test]
fn agent_service_needs_a_valid_local() {
    let e = ag_err(&MINIMAL_AGENT.replace("local = \"127.0.0.1:8080\"\n", ""));
    assert_eq!(
        e.to_string(),
        "agent.toml:5: services.web: no local address: set local = \"host:port\" of the service to publish"
    );
    let e = ag_err(&MINIMAL_AGENT.replace("127.0.0.1:8080", "127.0.0.1"));
    assert_eq!((e.line(), e.key()), (Some(7), Some("services.web.local")));
}

#[test]
fn reconnect_bounds() {
    let e = ag_err(&format!(
        "reconnect_min = \"2s\"\nreconnect_max = \"1s\"\n{MINIMAL_AGENT}"
    ));
    assert_eq!((e.line(), e.key()), (Some(2), Some("reconnect_max")));
    assert!(
        e.to_string()
            .contains("must not be shorter than reconnect_min"),
        "{e}"
    );
    let e = ag_err(&format!("reconnect_min = \"1m\"\n{MINIMAL_AGENT}"));
    assert_eq!((e.line(), e.key()), (Some(1), Some("reconnect_min")));
    let (s, _) = ag(&format!(
        "reconnect_min = \"1s\"\nreconnect_max = \"1s\"\n{MINIMAL_AGENT}"
    ))
    .unwrap();
    assert_eq!(s.reconnect_max, s.reconnect_min);
}

#[test]
fn agent_unknown_key_and_bad_duration() {
    let e = ag_err(&format!("{MINIMAL_AGENT}locale = \"x\"\n"));
    assert_eq!((e.line(), e.key()), (Some(8), Some("services.web.locale")));
    let e = ag_err(&format!("gateways = []\n{MINIMAL_AGENT}"));
    assert!(e.to_string().contains("not both"), "{e}");
    let e = ag_err(&format!("connect_timeout = 10\n{MINIMAL_AGENT}"));
    assert!(e.to_string().contains("\"10s\""), "{e}");
}

#[test]
fn agent_needs_a_service() {
    let text = format!("gateway = \"gw:7000\"\nfingerprint = \"{FINGERPRINT}\"\n");
    let e = ag_err(&text);
    assert!(
        e.to_string().starts_with("agent.toml: no services: "),
        "{e}"
    );
}

// ---- kind detection (dialback check) ----

#[test]
fn detects_kind() {
    assert_eq!(detect_kind(MINIMAL_AGENT), ConfigKind::Agent);
    assert_eq!(detect_kind(MINIMAL_GATEWAY), ConfigKind::Gateway);
    assert_eq!(detect_kind("[services.gateway]\n"), ConfigKind::Gateway);
    assert_eq!(detect_kind("not toml ["), ConfigKind::Gateway);

    let (any, _) = load_any_str(Path::new("a.toml"), MINIMAL_AGENT, &fake_env).unwrap();
    assert_eq!((any.kind(), any.service_count()), (ConfigKind::Agent, 1));
    let (any, _) = load_any_str(Path::new("g.toml"), MINIMAL_GATEWAY, &fake_env).unwrap();
    assert_eq!((any.kind(), any.service_count()), (ConfigKind::Gateway, 1));
    let e = load_any_str(Path::new("g.toml"), "x = [", &fake_env).unwrap_err();
    assert!(e.to_string().starts_with("g.toml:1: invalid TOML"), "{e}");
}

// ---- agent: proxies ----

#[test]
fn proxies_follow_the_seeds_login_rule() {
    use dialback_core::connect_chain::HopAuth;
    let text = format!(
        "proxies = [\n  'http://mydomain\\myuser1:mypass@proxy1.corp:8080',\n  \"http://myuser2:mypass@proxy2.corp:3128\",\n  'http://\\solo:pw@proxy3:1',\n  \"http://proxy4:3128\",\n]\n{MINIMAL_AGENT}"
    );
    let (s, _) = ag(&text).unwrap();
    assert_eq!(s.proxies.len(), 4);
    assert_eq!(s.proxies[0].addr(), "proxy1.corp:8080");
    match &s.proxies[0].auth {
        HopAuth::Ntlm(c) => assert_eq!(
            (c.domain.as_str(), c.user.as_str(), c.password.as_str()),
            ("mydomain", "myuser1", "mypass")
        ),
        other => panic!("hop 1 should be NTLM: {other:?}"),
    }
    assert!(
        matches!(&s.proxies[1].auth, HopAuth::Basic { user, password } if user == "myuser2" && password == "mypass")
    );
    assert!(
        matches!(&s.proxies[2].auth, HopAuth::Ntlm(c) if c.domain.is_empty() && c.user == "solo")
    );
    assert!(matches!(&s.proxies[3].auth, HopAuth::None));
}

#[test]
fn proxy_tables_take_passwords_from_env_and_explicit_auth() {
    use dialback_core::connect_chain::HopAuth;
    let text = format!(
        "proxies = [{{ url = \"http://p:3128\", user = \"bob\", password_env = \"GW_PASSWORD\", auth = \"ntlm\" }}, {{ url = \"http://q:8080\", user = \"x\\\\y\", password = \"z\", auth = \"basic\" }}]\n{MINIMAL_AGENT}"
    );
    let (s, _) = ag(&text).unwrap();
    assert!(
        matches!(&s.proxies[0].auth, HopAuth::Ntlm(c) if c.user == "bob" && c.domain.is_empty() && c.password == "password-from-env")
    );
    assert!(matches!(&s.proxies[1].auth, HopAuth::Basic { user, .. } if user == "x\\y"));
}

#[test]
fn bad_proxies_name_the_hop() {
    let e = ag_err(&format!(
        "proxies = [\"http://ok:1\", \"https://p:3128\"]\n{MINIMAL_AGENT}"
    ));
    assert_eq!((e.line(), e.key()), (Some(1), Some("proxies[2]")));
    assert!(e.to_string().contains("not supported"), "{e}");
    let e = ag_err(&format!("proxies = [\"http://p\"]\n{MINIMAL_AGENT}"));
    assert!(e.to_string().contains("needs a port"), "{e}");
    let e = ag_err(&format!("proxies = [{{ url = \"http://p:1\", auth = \"kerberos\", user = \"u\" }}]\n{MINIMAL_AGENT}"));
    assert!(e.to_string().contains("\"kerberos\""), "{e}");
    let e = ag_err(&format!(
        "proxies = [{{ url = \"http://p:1\", auth = \"basic\" }}]\n{MINIMAL_AGENT}"
    ));
    assert!(e.to_string().contains("needs a login"), "{e}");
    let e = ag_err(&format!(
        "proxies = [{{ url = \"http://p:1\", usr = \"u\" }}]\n{MINIMAL_AGENT}"
    ));
    assert!(e.to_string().contains("usr"), "{e}");
    let e = ag_err(&format!("proxies = [42]\n{MINIMAL_AGENT}"));
    assert!(e.to_string().contains("URL string or a table"), "{e}");
    let e = ag_err(&format!(
        "proxies = [{{ url = \"http://a:b@p:1\", password = \"c\" }}]\n{MINIMAL_AGENT}"
    ));
    assert!(e.to_string().contains("one place"), "{e}");
    // The password never shows up in an error.
    let e = ag_err(&format!(
        "proxies = [\"http://u:topsecret@p\"]\n{MINIMAL_AGENT}"
    ));
    assert!(!e.to_string().contains("topsecret"), "{e}");
}

// ---- dialback check: every problem at once ----

fn check_text(name: &str, text: &str) -> check::Report {
    check::check_str(Path::new(name), text, &fake_env)
}

fn problem_lines(report: &check::Report) -> Vec<String> {
    report.problems.iter().map(ToString::to_string).collect()
}

#[test]
fn check_reports_every_gateway_problem_sorted_by_line() {
    let text = r#"listen = "0.0.0.0:7000"
heartbeat = "20 s"
bogus = 1

[services.web]
password = "correct horse battery"
tcp_listen = "0.0.0.0:9000"

[services.api]
tcp_listen = "0.0.0.0:9000"

[services."my web"]
password = "correct horse battery"
password_file = "pw"
tcp_listen = "0.0.0.0:7000"
max_pending = 0
"#;
    let report = check_text("gateway.toml", text);
    assert_eq!(report.kind, Some(ConfigKind::Gateway));
    assert_eq!(report.service_count, 3);
    let lines = problem_lines(&report);
    let expected = [
        "gateway.toml:2: heartbeat: invalid duration \"20 s\"",
        "gateway.toml:3: bogus: unknown field `bogus`",
        "gateway.toml:9: services.api: no password",
        "gateway.toml:10: services.api.tcp_listen: 0.0.0.0:9000 clashes with services.web.tcp_listen",
        "gateway.toml:12: services.\"my web\": invalid service name",
        "gateway.toml:14: services.\"my web\": set only one of password, password_file or password_env",
        "gateway.toml:15: services.\"my web\".tcp_listen: 0.0.0.0:7000 clashes with the gateway's listen",
        "gateway.toml:16: services.\"my web\".max_pending: must be from 1 to 65536",
    ];
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
    for (line, want) in lines.iter().zip(expected) {
        assert!(
            line.starts_with(want),
            "{line:?} should start with {want:?}"
        );
    }
    let rendered = report.render();
    assert!(
        rendered.ends_with("gateway.toml: 8 problems (gateway config)\n"),
        "{rendered}"
    );
}

#[test]
fn check_does_not_report_consequences_of_a_mistyped_value() {
    // A mistyped password is not also "missing"; a mistyped tcp_listen not also "no entry";
    // a mistyped heartbeat is not compared with dead_after.
    let text =
        "heartbeat = 5\ndead_after = \"10s\"\n[services.web]\npassword = 123\ntcp_listen = 9000\n";
    let report = check_text("gateway.toml", text);
    let lines = problem_lines(&report);
    assert_eq!(
        lines,
        [
            "gateway.toml:1: heartbeat: bare number 5 is not a duration: add a unit, e.g. \"5s\" (units: ms, s, m, h)",
            "gateway.toml:4: services.web.password: must be a string",
            "gateway.toml:5: services.web.tcp_listen: invalid type: integer `9000`, expected a string",
        ]
    );
    // A mistyped listen is unknown, not the default: no clash with 0.0.0.0:7000.
    let text = "listen = 7000\n[services.web]\npassword = \"correct horse battery\"\ntcp_listen = \"0.0.0.0:7000\"\n";
    let lines = problem_lines(&check_text("gateway.toml", text));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("gateway.toml:1: listen: invalid type"),
        "{lines:?}"
    );
}

#[test]
fn check_reports_every_agent_problem() {
    let text = r#"gateway = "gw.example.com"
fingerprint = "sha256:abcd"
reconnect_min = "1m"
reconnect_max = "10"
colour = "blue"
proxies = ["http://p", "http://ok:1"]

[services.rdp]
password_env = "NOPE_NOT_SET"
local = "127.0.0.1"

[services."bad name"]
password = "correct horse battery"
local = "127.0.0.1:80"

[services.web]
password = 1234
locale = "127.0.0.1:8080"
"#;
    let report = check_text("agent.toml", text);
    assert_eq!(report.kind, Some(ConfigKind::Agent));
    let lines = problem_lines(&report);
    let expected = [
        "agent.toml:1: gateway: invalid address \"gw.example.com\": the port is missing",
        "agent.toml:2: fingerprint: ",
        "agent.toml:4: reconnect_max: invalid duration \"10\"",
        "agent.toml:5: colour: unknown field `colour`",
        "agent.toml:6: proxies[1]: ",
        "agent.toml:9: services.rdp.password_env: environment variable NOPE_NOT_SET is not set",
        "agent.toml:10: services.rdp.local: invalid address \"127.0.0.1\"",
        "agent.toml:12: services.\"bad name\": invalid service name",
        // The header line: locale is not local.
        "agent.toml:16: services.web: no local address",
        "agent.toml:17: services.web.password: must be a string",
        "agent.toml:18: services.web.locale: unknown field `locale`",
    ];
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
    for (line, want) in lines.iter().zip(expected) {
        assert!(
            line.starts_with(want),
            "{line:?} should start with {want:?}"
        );
    }
}

#[test]
fn check_agent_trust_problems_are_not_doubled() {
    // A bad value of the only trust option is not also "no way to verify".
    let text = MINIMAL_AGENT.replace(FINGERPRINT, "sha256:abcd");
    let lines = problem_lines(&check_text("agent.toml", &text));
    assert_eq!(lines.len(), 1, "{lines:?}");
    // A mistyped one neither.
    let text = format!("insecure = \"yes\"\n{}", without_fingerprint());
    let lines = problem_lines(&check_text("agent.toml", &text));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("agent.toml:1: insecure: invalid type"),
        "{lines:?}"
    );
    // But no trust option at all is a problem of its own, next to the others.
    let text = without_fingerprint().replace("127.0.0.1:8080", "nope");
    let lines = problem_lines(&check_text("agent.toml", &text));
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with("agent.toml: no way to verify"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("agent.toml:6: services.web.local"),
        "{lines:?}"
    );
}

#[test]
fn check_ok_report() {
    let report = check_text("gateway.toml", &MINIMAL_GATEWAY.replace(PASSWORD, "short"));
    assert!(report.is_ok());
    assert_eq!(
        report.render(),
        "warning: gateway.toml:3: services.web.password: the password has only 5 characters; use at least 12, ideally a long random one\ngateway.toml: ok (gateway, 1 service)\n"
    );
    let report = check_text("agent.toml", MINIMAL_AGENT);
    assert_eq!(report.render(), "agent.toml: ok (agent, 1 service)\n");
    let report = check_text("x.toml", "x = [");
    assert_eq!(report.kind, None);
    assert!(
        report.render().ends_with("x.toml: 1 problem\n"),
        "{}",
        report.render()
    );
}

/// Whatever the file, `check` passes exactly when the startup loader does, and reports the
/// loader's error among its problems.
#[test]
fn check_agrees_with_the_startup_loaders() {
    let agent_variants = [
        MINIMAL_AGENT.to_owned(),
        without_fingerprint(),
        format!("ca = \"system\"\n{MINIMAL_AGENT}"),
        format!("ca = \"corp\"\n{MINIMAL_AGENT}"),
        format!("insecure = true\nca_file = \"\"\n{}", without_fingerprint()),
        format!("reconnect_min = \"2s\"\nreconnect_max = \"1s\"\n{MINIMAL_AGENT}"),
        format!("reconnect_min = \"2x\"\nreconnect_max = \"1s\"\n{MINIMAL_AGENT}"),
        format!("server_name = \"bad name\"\n{MINIMAL_AGENT}"),
        format!("proxies = [\"https://p:1\", {{ url = \"http://q:1\", auth = \"basic\" }}]\n{MINIMAL_AGENT}"),
        format!("proxies = 5\n{MINIMAL_AGENT}"),
        format!("services = 5\n{}", MINIMAL_AGENT.split("[services").next().unwrap()),
        MINIMAL_AGENT.replace("gateway = \"gw.example.com:7000\"\n", "fingerprint2 = 1\n"),
        MINIMAL_AGENT.replace("gateway = \"gw.example.com:7000\"", "gateway = 7000"),
        MINIMAL_AGENT.replace("local = \"127.0.0.1:8080\"\n", ""),
        MINIMAL_AGENT.replace("password = \"correct horse battery\"\n", ""),
        format!("{MINIMAL_AGENT}password_env = \"GW_PASSWORD\"\n"),
        format!("{MINIMAL_AGENT}[services.x]\n[services.y]\npassword = 1\n"),
    ];
    let gateway_variants = [
        MINIMAL_GATEWAY.to_owned(),
        String::new(),
        "[services]\n".to_owned(),
        "services = 1\n".to_owned(),
        format!("cert = \"a\"\n{MINIMAL_GATEWAY}"),
        format!("cert = 1\n{MINIMAL_GATEWAY}"),
        format!("cert = \"\"\nkey = \"\"\nstate_dir = \"\"\n{MINIMAL_GATEWAY}"),
        format!("heartbeat = \"1m\"\n{MINIMAL_GATEWAY}"),
        format!("heartbeat = \"1m\"\ndead_after = \"0s\"\n{MINIMAL_GATEWAY}"),
        format!("admin_listen = \"127.0.0.1:1\"\n{MINIMAL_GATEWAY}"),
        format!("listen = \"x\"\n{MINIMAL_GATEWAY}"),
        MINIMAL_GATEWAY.replace("0.0.0.0:9000", "0.0.0.0:7000"),
        format!("{MINIMAL_GATEWAY}data_tls = \"yes\"\nmax_pending = 70000\n"),
        format!("{MINIMAL_GATEWAY}[services.b]\npassword_env = \"EMPTY_PASSWORD\"\ntcp_listen = \"0.0.0.0:9000\"\n"),
        "[services.web]\npassword = \"correct horse battery\"\n".to_owned(),
        "[services.\"\"]\n".to_owned(),
        "listen = [\n".to_owned(),
    ];
    let cases = agent_variants
        .iter()
        .map(|t| (Path::new("agent.toml"), t))
        .chain(
            gateway_variants
                .iter()
                .map(|t| (Path::new("gateway.toml"), t)),
        );
    for (path, text) in cases {
        let report = check::check_str(path, text, &fake_env);
        match load_any_str(path, text, &fake_env) {
            Ok(_) => assert!(report.is_ok(), "{text}\n{}", report.render()),
            Err(e) => {
                assert!(!report.is_ok(), "{text}");
                assert!(
                    report.problems.contains(&e),
                    "{text}\nloader: {e}\ncheck:\n{}",
                    report.render()
                );
            }
        }
        // Never an empty line, always a summary.
        let rendered = report.render();
        assert!(!rendered.contains("\n\n"), "{rendered}");
        assert!(rendered
            .lines()
            .last()
            .unwrap()
            .starts_with(path.to_str().unwrap()));
    }
}

#[test]
fn kind_detection_uses_agent_only_keys() {
    // No `gateway` key (a problem of its own), but clearly an agent config.
    assert_eq!(
        detect_kind(
            &without_fingerprint()
                .replace("gateway = \"gw.example.com:7000\"\n", "insecure = true\n")
        ),
        ConfigKind::Agent
    );
    assert_eq!(
        detect_kind("[services.web]\nlocal = \"a:1\"\n"),
        ConfigKind::Agent
    );
    assert_eq!(
        detect_kind("[services.web]\nlocal = \"a:1\"\ntcp_listen = \"0.0.0.0:1\"\n"),
        ConfigKind::Gateway
    );
    let report = check_text("agent.toml", "fingerprint = \"x\"\n[services.web]\npassword = \"correct horse battery\"\nlocal = \"a:1\"\n");
    let lines = problem_lines(&report);
    assert_eq!(report.kind, Some(ConfigKind::Agent));
    assert!(
        lines[0].starts_with("agent.toml: gateway: missing"),
        "{lines:?}"
    );
}

#[test]
fn admin_listen_is_parsed_and_must_not_clash() {
    let (s, _) = gw(&format!(
        "admin_listen = \"127.0.0.1:7001\"\n{MINIMAL_GATEWAY}"
    ))
    .unwrap();
    assert_eq!(s.admin_listen, Some(addr("127.0.0.1:7001")));
    let e = gw_err(&format!(
        "admin_listen = \"0.0.0.0:7000\"\n{MINIMAL_GATEWAY}"
    ));
    assert_eq!(e.key(), Some("admin_listen"));
    assert!(e.to_string().contains("clashes"), "{e}");
    let e = gw_err(&format!(
        "admin_listen = \"127.0.0.1:9000\"\n{MINIMAL_GATEWAY}"
    ));
    assert_eq!(e.key(), Some("services.web.tcp_listen"));
    let e = gw_err(&format!("admin_listen = \"localhost\"\n{MINIMAL_GATEWAY}"));
    assert_eq!((e.line(), e.key()), (Some(1), Some("admin_listen")));
    let (a, _) = ag(&format!(
        "admin_listen = \"127.0.0.1:7002\"\n{MINIMAL_AGENT}"
    ))
    .unwrap();
    assert_eq!(a.admin_listen, Some(addr("127.0.0.1:7002")));
    assert_eq!(ag(MINIMAL_AGENT).unwrap().0.admin_listen, None);
}

#[test]
fn gateways_fleet() {
    let fleet = MINIMAL_AGENT.replace(
        "gateway = \"gw.example.com:7000\"\n",
        "gateways = [\"gw1.example.com:7000\", \"[2001:db8::2]:7000\"]\n",
    );
    assert_ne!(
        fleet, MINIMAL_AGENT,
        "the fixture has a gateway line to replace"
    );
    let (s, _) = ag(&fleet).unwrap();
    assert_eq!(
        s.gateways,
        vec![
            "gw1.example.com:7000".to_owned(),
            "[2001:db8::2]:7000".to_owned()
        ]
    );
    for (text, key, why) in [
        (
            MINIMAL_AGENT.replace(
                "gateway = \"gw.example.com:7000\"\n",
                "gateway = \"gw.example.com:7000\"\ngateways = [\"b:1\"]\n",
            ),
            "gateways",
            "not both",
        ),
        (
            MINIMAL_AGENT.replace("gateway = \"gw.example.com:7000\"\n", "gateways = []\n"),
            "gateways",
            "empty",
        ),
        (
            MINIMAL_AGENT.replace(
                "gateway = \"gw.example.com:7000\"\n",
                "gateways = [\"a:1\", \"nohost\"]\n",
            ),
            "gateways[2]",
            "invalid address",
        ),
        (
            MINIMAL_AGENT.replace(
                "gateway = \"gw.example.com:7000\"\n",
                "gateways = [\"a:1\", \"a:1\"]\n",
            ),
            "gateways[2]",
            "twice",
        ),
    ] {
        let e = ag_err(&text);
        assert_eq!(e.key(), Some(key), "{e}");
        assert!(e.to_string().contains(why), "{e}");
    }
}

#[test]
fn tcp_keepalive_defaults_to_a_minute_and_can_be_turned_off() {
    let (s, _) = gw(MINIMAL_GATEWAY).unwrap();
    assert_eq!(s.tcp_keepalive, Duration::from_secs(60));
    for off in ["\"0s\"", "\"off\""] {
        let (s, _) = gw(&format!("tcp_keepalive = {off}\n{MINIMAL_GATEWAY}")).unwrap();
        assert_eq!(s.tcp_keepalive, Duration::ZERO);
    }
    let (a, _) = ag(MINIMAL_AGENT).unwrap();
    assert_eq!(a.tcp_keepalive, Duration::from_secs(60));
    let (a, _) = ag(&format!("tcp_keepalive = \"15s\"\n{MINIMAL_AGENT}")).unwrap();
    assert_eq!(a.tcp_keepalive, Duration::from_secs(15));
    for bad in ["\"500ms\"", "\"3h\""] {
        let e = gw_err(&format!("tcp_keepalive = {bad}\n{MINIMAL_GATEWAY}"));
        assert_eq!(e.line(), Some(1), "{e}");
        assert!(
            e.to_string()
                .contains("tcp_keepalive: must be \"off\" (or \"0s\") or from 1s to 2h"),
            "{e}"
        );
        let e = ag_err(&format!("tcp_keepalive = {bad}\n{MINIMAL_AGENT}"));
        assert_eq!(e.line(), Some(1), "{e}");
    }
}
