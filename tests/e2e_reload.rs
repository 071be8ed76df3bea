//! Gateway hot reload: on a changed config file and on SIGHUP, services are added, removed
//! and changed while the gateway keeps serving; an invalid or unappliable config is refused
//! whole and the running one is kept.

#[path = "common/balancers.rs"]
mod balancers;
mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use balancers::free_port;
use common::procstat;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

/// Waits until nothing listens on `addr` any more (bounded).
fn wait_port_closed(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes a new version of a file in one step (rename), as careful editors and config
/// management do.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn service_block(name: &str, password: &str, port: u16) -> String {
    format!("\n[services.{name}]\npassword = \"{password}\"\ntcp_listen = \"127.0.0.1:{port}\"\n")
}

fn gateway_text(admin: u16, services: &[String]) -> String {
    let mut s = format!(
        "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\nadmin_listen = \"127.0.0.1:{admin}\"\n{FAST_TIMERS}"
    );
    for b in services {
        s.push_str(b);
    }
    s
}

fn metrics(admin: u16) -> String {
    http_get(SocketAddr::from(([127, 0, 0, 1], admin)), "/metrics").1
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start) && l[line_start.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn reloaded(l: &str) -> bool {
    message_is(l, "configuration reloaded")
}

fn refused(l: &str) -> bool {
    message_is(
        l,
        "configuration reload refused: the running configuration is kept",
    )
}

fn agent(
    dir: &Dir,
    file: &str,
    gw: &RunningGateway,
    services: &[(&str, &str, SocketAddr)],
) -> Proc {
    let conf = agent_toml(dir, file, gw.listen, &gw.fingerprint, services);
    Proc::start(file, &["agent", "-c", conf.to_str().unwrap()])
}

#[test]
fn a_changed_file_adds_removes_and_changes_services_without_a_restart() {
    let dir = Dir::new();
    let (admin, web_port, old_port, fresh_port) =
        (free_port(), free_port(), free_port(), free_port());
    let web_addr: SocketAddr = ([127, 0, 0, 1], web_port).into();
    let old_addr: SocketAddr = ([127, 0, 0, 1], old_port).into();
    let fresh_addr: SocketAddr = ([127, 0, 0, 1], fresh_port).into();
    let conf = dir.write(
        "gateway.toml",
        &gateway_text(
            admin,
            &[
                service_block("web", "web-password-1", web_port),
                service_block("old", "old-password", old_port),
            ],
        ),
    );
    let gw = RunningGateway::start(&conf);
    let echo = echo_server();
    let mut a = agent(
        &dir,
        "agent-a.toml",
        &gw,
        &[
            ("web", "web-password-1", echo),
            ("old", "old-password", echo),
        ],
    );
    gw.wait_registered("web", 1);
    gw.wait_registered("old", 1);
    wait_echo_works(web_addr, WAIT);
    wait_echo_works(old_addr, WAIT);

    // web's password changes, old goes, fresh comes.
    replace_file(
        &conf,
        &gateway_text(
            admin,
            &[
                service_block("web", "web-password-2", web_port),
                service_block("fresh", "fresh-password", fresh_port),
            ],
        ),
    );
    let line = gw.proc.wait_for("reload", WAIT, reloaded);
    assert_eq!(
        field(&line, "trigger").as_deref(),
        Some("the config file changed")
    );
    assert_eq!(field(&line, "added").as_deref(), Some("fresh"));
    assert_eq!(field(&line, "changed").as_deref(), Some("web"));
    assert_eq!(field(&line, "removed").as_deref(), Some("old"));

    // The removed service's port closes and its agent is told why.
    wait_port_closed(old_addr);
    gw.proc.wait_for("old's session ended", WAIT, |l| {
        message_contains(l, "agent session ended")
            && field(l, "service").as_deref() == Some("old")
            && l.contains("removed from the gateway's configuration")
    });
    a.wait_for("agent told old was removed", WAIT, |l| {
        l.contains("removed from the gateway's configuration")
    });

    // The live agent keeps serving web on the session it registered with the old password.
    for i in 0..20u8 {
        assert!(
            try_echo(web_addr, &[i; 100]),
            "echo {i} through web after the reload"
        );
    }
    assert_eq!(
        gw.proc
            .count(|l| message_is(l, "agent registered")
                && field(l, "service").as_deref() == Some("web")),
        1,
        "web's agent did not have to register again"
    );

    // The added service works as soon as its agent registers.
    let _b = agent(
        &dir,
        "agent-b.toml",
        &gw,
        &[("fresh", "fresh-password", echo)],
    );
    gw.wait_registered("fresh", 1);
    wait_echo_works(fresh_addr, WAIT);

    // Once the old session is gone, the old password is refused and the new one registers.
    a.kill9();
    gw.proc.wait_for("web's session ended", WAIT, |l| {
        message_contains(l, "agent session ended") && field(l, "service").as_deref() == Some("web")
    });
    let stale = agent(
        &dir,
        "agent-c.toml",
        &gw,
        &[("web", "web-password-1", echo)],
    );
    gw.proc.wait_for("old password refused", WAIT, |l| {
        message_contains(l, "control connection refused")
            && field(l, "service").as_deref() == Some("web")
            && field(l, "code").as_deref() == Some("auth_failed")
    });
    drop(stale);
    let _d = agent(
        &dir,
        "agent-d.toml",
        &gw,
        &[("web", "web-password-2", echo)],
    );
    gw.wait_registered("web", 2);
    wait_echo_works(web_addr, WAIT);

    let m = metrics(admin);
    assert_eq!(
        metric(
            &m,
            "dialback_gateway_config_reloads_total{result=\"applied\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "dialback_gateway_config_last_reload_successful"),
        Some(1.0)
    );
    assert!(
        !m.contains("service=\"old\""),
        "the removed service left /metrics"
    );
    assert!(m.contains("service=\"fresh\""));
}

#[test]
fn an_invalid_or_unappliable_config_is_refused_whole() {
    let dir = Dir::new();
    let (admin, web_port, extra_port) = (free_port(), free_port(), free_port());
    let web_addr: SocketAddr = ([127, 0, 0, 1], web_port).into();
    let extra_addr: SocketAddr = ([127, 0, 0, 1], extra_port).into();
    let good = gateway_text(admin, &[service_block("web", "web-password", web_port)]);
    let conf = dir.write("gateway.toml", &good);
    let gw = RunningGateway::start(&conf);
    let echo = echo_server();
    let _a = agent(&dir, "agent.toml", &gw, &[("web", "web-password", echo)]);
    gw.wait_registered("web", 1);
    wait_echo_works(web_addr, WAIT);

    // A syntax error: refused with the file and line; web keeps working.
    replace_file(&conf, &format!("{good}\n[services.broken\n"));
    let line = gw.proc.wait_for("syntax refused", WAIT, refused);
    let reason = field(&line, "reason").unwrap();
    assert!(reason.contains("gateway.toml:"), "{reason}");
    assert!(try_echo(web_addr, b"still here"));
    let m = metrics(admin);
    assert_eq!(
        metric(&m, "dialback_gateway_config_last_reload_successful"),
        Some(0.0),
        "{m}"
    );

    // A port another program holds: nothing of the new config applies, not even the parts
    // that could (a new service on a free port, web's new password).
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    replace_file(
        &conf,
        &gateway_text(
            admin,
            &[
                service_block("web", "another-password", web_port),
                service_block("extra", "extra-password", extra_port),
                service_block("squatted", "squatted-password", taken),
            ],
        ),
    );
    let line = gw.proc.wait_for_nth("bind refused", 2, WAIT, refused);
    let reason = field(&line, "reason").unwrap();
    assert!(reason.contains(&format!("127.0.0.1:{taken}")), "{reason}");
    assert!(
        TcpStream::connect_timeout(&extra_addr, Duration::from_secs(1)).is_err(),
        "a refused reload opened a port"
    );
    assert!(try_echo(web_addr, b"still here"));
    let m = metrics(admin);
    assert_eq!(
        metric(
            &m,
            "dialback_gateway_config_reloads_total{result=\"refused\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert!(!m.contains("service=\"extra\""));

    // Once the port is free, the same file applies.
    drop(squatter);
    gw.proc.signal("HUP");
    let line = gw.proc.wait_for("applied", WAIT, reloaded);
    assert_eq!(field(&line, "trigger").as_deref(), Some("SIGHUP"));
    assert_eq!(field(&line, "added").as_deref(), Some("extra,squatted"));
    assert_eq!(field(&line, "changed").as_deref(), Some("web"));
    assert!(TcpStream::connect_timeout(&extra_addr, Duration::from_secs(3)).is_ok());
    assert!(try_echo(web_addr, b"the live agent keeps its session"));
    let m = metrics(admin);
    assert_eq!(
        metric(&m, "dialback_gateway_config_last_reload_successful"),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn sighup_rereads_password_files_and_http_routes() {
    let dir = Dir::new();
    let (http_port, web_port) = (free_port(), free_port());
    let pw_file = dir.write("web.password", "first-password\n");
    let text = |services: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"state\"\n{FAST_TIMERS}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n{services}"
        )
    };
    let web = format!(
        "\n[services.web]\npassword_file = \"{}\"\ntcp_listen = \"127.0.0.1:{web_port}\"\n",
        pw_file.display()
    );
    let conf = dir.write("gateway.toml", &text(&web));
    let gw = RunningGateway::start(&conf);
    let site = http_responder("web");
    let a = agent(&dir, "agent.toml", &gw, &[("web", "first-password", site)]);
    gw.wait_registered("web", 1);
    let http: SocketAddr = ([127, 0, 0, 1], http_port).into();
    wait_for_status(http, "/~~web/", 200);
    assert_eq!(status_of(http, "/~~api/"), 404);

    // The agent is not reloaded: a SIGHUP is logged and changes nothing.
    a.signal("HUP");
    a.wait_for("SIGHUP ignored", WAIT, |l| {
        message_contains(l, "SIGHUP ignored")
    });
    wait_for_status(http, "/~~web/", 200);

    // Only the password file changes: the file watch cannot see it, SIGHUP reads it.
    std::fs::write(&pw_file, "second-password\n").unwrap();
    gw.proc.signal("HUP");
    let line = gw.proc.wait_for("reload", WAIT, reloaded);
    assert_eq!(field(&line, "trigger").as_deref(), Some("SIGHUP"));
    assert_eq!(field(&line, "changed").as_deref(), Some("web"));

    // A service added by a reload is routed on the HTTP port at once.
    let api_site = http_responder("api");
    let api = "\n[services.api]\npassword = \"api-password\"\n";
    replace_file(&conf, &text(&format!("{web}{api}")));
    let line = gw.proc.wait_for_nth("reload", 2, WAIT, reloaded);
    assert_eq!(field(&line, "added").as_deref(), Some("api"));
    let _b = agent(
        &dir,
        "agent-api.toml",
        &gw,
        &[("api", "api-password", api_site)],
    );
    gw.wait_registered("api", 1);
    let body = wait_for_status(http, "/~~api/", 200);
    assert!(body.ends_with("api /"), "{body}");
    assert!(wait_for_status(http, "/~~web/", 200).ends_with("web /"));
}

fn status_of(http: SocketAddr, path: &str) -> u16 {
    http_get(http, path).0
}

/// Retries `GET path` until it answers `status` (bounded); returns the response.
fn wait_for_status(http: SocketAddr, path: &str, status: u16) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (got, text) = http_get(http, path);
        if got == status {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path}: {got}, not {status}: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn reloads_under_load_never_drop_a_connection_on_a_port_that_stays() {
    let dir = Dir::new();
    let (admin, web_port, extra_port) = (free_port(), free_port(), free_port());
    let web_addr: SocketAddr = ([127, 0, 0, 1], web_port).into();
    let base = [service_block("web", "web-password", web_port)];
    let with_extra = [
        service_block("web", "web-password", web_port),
        service_block("extra", "extra-password", extra_port),
    ];
    let conf = dir.write("gateway.toml", &gateway_text(admin, &base));
    let gw = RunningGateway::start(&conf);
    let echo = echo_server();
    let _a = agent(&dir, "agent.toml", &gw, &[("web", "web-password", echo)]);
    gw.wait_registered("web", 1);
    wait_echo_works(web_addr, WAIT);
    // Its listeners, the agent's control connection and the full pool.
    let pid = gw.proc.pid();
    let baseline = procstat::wait_sockets(pid, "gateway", 4 + 4, WAIT);

    // Clients keep coming on web's port (bounded in count and time)...
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, 0u32);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && Instant::now() < deadline
                && ok + failed < 20_000
            {
                if try_echo(web_addr, &(ok + failed).to_be_bytes()) {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            (ok, failed)
        })
    };
    // ...while another service comes and goes, ten times.
    const RELOADS: usize = 10;
    for i in 0..RELOADS {
        let text = if i % 2 == 0 {
            &with_extra[..]
        } else {
            &base[..]
        };
        replace_file(&conf, &gateway_text(admin, text));
        gw.proc.signal("HUP");
        gw.proc.wait_for_nth("reload", i + 1, WAIT, |l| {
            reloaded(l) && field(l, "trigger").as_deref() == Some("SIGHUP")
        });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed during reloads",
        ok + failed
    );
    assert!(
        ok >= RELOADS as u32,
        "only {ok} connections ran during the reloads"
    );
    assert_eq!(
        gw.proc.count(|l| message_is(l, "agent registered")),
        1,
        "web's agent kept its session"
    );
    eprintln!("{ok} connections during {RELOADS} reloads, none failed");
    // The same configuration as at the start holds the same sockets: nothing leaked.
    let after = procstat::wait_sockets(pid, "gateway", baseline.sockets, WAIT);
    assert!(
        after.fds <= baseline.fds + procstat::PIPE_STOCK_FDS,
        "{baseline:?} -> {after:?}"
    );
}
