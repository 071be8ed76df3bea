//! The agent reaches the gateway through real squid proxies: Basic, NTLM, and cascades.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::squid::{Squid, SquidAuth};
use common::*;
use sha2::{Digest, Sha256};

const PW: &str = "proxy-test-service-password";

fn gateway(dir: &Dir) -> RunningGateway {
    let conf = gateway_toml(
        dir,
        &GatewayConf {
            listen: "127.0.0.1:0",
            timers: FAST_TIMERS,
            services: &[("web", PW)],
            extra: "",
        },
    );
    RunningGateway::start(&conf)
}

/// An agent whose `proxies` list is given as TOML array items.
fn agent_via(dir: &Dir, gw: &RunningGateway, local: SocketAddr, proxies: &[String]) -> Proc {
    let list = proxies.join(",\n  ");
    let conf = dir.write(
        "agent.toml",
        &format!(
            "gateway = \"{}\"\nfingerprint = \"{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nconnect_timeout = \"5s\"\nproxies = [\n  {list}\n]\n\n[services.web]\npassword = \"{PW}\"\nlocal = \"{local}\"\n",
            gw.listen, gw.fingerprint
        ),
    );
    Proc::start("agent", &["agent", "-c", conf.to_str().unwrap()])
}

/// squid ends a CONNECT tunnel on the first FIN it sees, so this transfer does not half-close.
fn transfer_checks_out(public: SocketAddr) {
    let data = random_bytes(8 << 20, 4242);
    let back = echo_exact(public, data.clone(), Duration::from_secs(60));
    assert_eq!(back.len(), data.len());
    assert_eq!(
        Sha256::digest(&back),
        Sha256::digest(&data),
        "bytes through the tunnel differ"
    );
}

fn connects_logged(squid: &Squid, user: &str, n: usize) {
    squid.wait_log(&format!("{n} CONNECTs by {user}"), n, STARTUP, |l| {
        l.contains(" CONNECT ") && l.contains(user)
    });
}

#[test]
fn through_squid_with_basic_auth() {
    let dir = Dir::new();
    let squid = Squid::start(SquidAuth::Basic {
        user: "alice",
        password: "s3cret:with@signs",
    });
    let gw = gateway(&dir);
    let echo = echo_server();
    // Reserved characters in the password are %-escaped in the URL.
    let mut agent = agent_via(
        &dir,
        &gw,
        echo,
        &[format!(
            "\"http://alice:s3cret%3Awith%40signs@{}\"",
            squid.addr()
        )],
    );
    gw.wait_registered("web", 1);
    let public = gw.service_addr("web");
    transfer_checks_out(public);
    connects_logged(&squid, "alice", 1); // the data connection, logged when it closed
    agent.kill9();
    connects_logged(&squid, "alice", 2); // and the control connection
    for line in agent.log() {
        assert!(
            !line.contains("s3cret"),
            "proxy password in the agent's log: {line}"
        );
    }
}

#[test]
fn through_squid_with_ntlm_auth() {
    let dir = Dir::new();
    let squid = Squid::start(SquidAuth::Ntlm);
    let gw = gateway(&dir);
    let echo = echo_server();
    let mut agent = agent_via(
        &dir,
        &gw,
        echo,
        &[format!("'http://CORP\\bob:hunter2@{}'", squid.addr())],
    );
    gw.wait_registered("web", 1);
    transfer_checks_out(gw.service_addr("web"));
    connects_logged(&squid, "bob", 1);
    agent.kill9();
    connects_logged(&squid, "bob", 2);
}

#[test]
fn cascade_basic_then_ntlm() {
    let dir = Dir::new();
    let basic = Squid::start(SquidAuth::Basic {
        user: "alice",
        password: "pw-one",
    });
    let ntlm = Squid::start(SquidAuth::Ntlm);
    let gw = gateway(&dir);
    let echo = echo_server();
    let _agent = agent_via(
        &dir,
        &gw,
        echo,
        &[
            format!("\"http://alice:pw-one@{}\"", basic.addr()),
            format!("'http://\\carol:pw-two@{}'", ntlm.addr()),
        ],
    );
    gw.wait_registered("web", 1);
    transfer_checks_out(gw.service_addr("web"));
    connects_logged(&ntlm, "carol", 1);
    connects_logged(&basic, "alice", 1);
}

#[test]
fn cascade_ntlm_then_basic_with_table_syntax() {
    let dir = Dir::new();
    let ntlm = Squid::start(SquidAuth::Ntlm);
    let basic = Squid::start(SquidAuth::Basic {
        user: "dave",
        password: "pw-three",
    });
    let gw = gateway(&dir);
    let echo = echo_server();
    let _agent = agent_via(
        &dir,
        &gw,
        echo,
        &[
            format!("'http://DOM\\erin:pw@{}'", ntlm.addr()),
            format!("{{ url = \"http://{}\", user = \"dave\", password = \"pw-three\", auth = \"auto\" }}", basic.addr()),
        ],
    );
    gw.wait_registered("web", 1);
    transfer_checks_out(gw.service_addr("web"));
    connects_logged(&basic, "dave", 1);
    connects_logged(&ntlm, "erin", 1);
}

fn hop2_refusal(l: &str) -> bool {
    message_contains(l, "registration failed") && l.contains("hop 2")
}

#[test]
fn wrong_credentials_at_hop_two_are_named() {
    let dir = Dir::new();
    let ntlm = Squid::start(SquidAuth::Ntlm);
    let basic = Squid::start(SquidAuth::Basic {
        user: "dave",
        password: "right",
    });
    let gw = gateway(&dir);
    let echo = echo_server();
    let agent = agent_via(
        &dir,
        &gw,
        echo,
        &[
            format!("'http://DOM\\erin:pw@{}'", ntlm.addr()),
            format!("\"http://dave:wrong@{}\"", basic.addr()),
        ],
    );
    let line = agent.wait_for("hop 2 refusal", STARTUP, hop2_refusal);
    assert!(
        line.contains(&basic.addr())
            && line.contains("dave")
            && line.contains("wrong user name or password"),
        "unclear error: {line}"
    );
    // It keeps retrying with backoff, not in a tight loop: a few attempts, not hundreds.
    agent.wait_for_nth("second attempt", 2, STARTUP, hop2_refusal);
    std::thread::sleep(Duration::from_secs(2));
    let attempts = agent.count(hop2_refusal);
    assert!(
        attempts <= 10,
        "{attempts} attempts in a few seconds: backoff not applied"
    );
    assert_eq!(gw.proc.count(|l| message_is(l, "agent registered")), 0);
    assert!(
        agent.log().iter().all(|l| !l.contains("wrong@")),
        "password leaked into the log"
    );
}

#[test]
fn unreachable_first_hop_is_named() {
    let dir = Dir::new();
    let gw = gateway(&dir);
    let echo = echo_server();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let agent = agent_via(&dir, &gw, echo, &[format!("\"http://{closed}\"")]);
    let line = agent.wait_for("hop 1 error", STARTUP, |l| {
        message_contains(l, "registration failed") && l.contains("hop 1")
    });
    assert!(line.contains(&closed.to_string()), "{line}");
}

#[test]
fn silent_proxy_times_out_naming_the_hop() {
    // A "proxy" that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().take(4).flatten() {
            held.push(s);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let dir = Dir::new();
    let gw = gateway(&dir);
    let agent = agent_via(&dir, &gw, echo_server(), &[format!("\"http://{addr}\"")]);
    let line = agent.wait_for("hop 1 timeout", STARTUP, |l| {
        message_contains(l, "registration failed") && l.contains("hop 1")
    });
    assert!(
        line.contains(&addr.to_string()) && line.contains("no answer within"),
        "{line}"
    );
}
