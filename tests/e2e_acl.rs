//! Access rules against real source addresses: the gateway runs in a network namespace of its
//! own, agents and clients in others, each reaching it over its own veth link, so every
//! registration and every client really comes from a different address.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::net::SocketAddr;
use std::time::Duration;

use common::{field, message_contains, message_is, roundtrip, Dir, FAST_TIMERS, STARTUP};
use netns::{Net, NsProc};

const WAIT: Duration = Duration::from_secs(20);

fn start_gateway(net: &Net, dir: &Dir, services: &str) -> (NsProc, String) {
    start_gateway_on(net, dir, "0.0.0.0:7000", services)
}

fn start_gateway_on(net: &Net, dir: &Dir, listen: &str, services: &str) -> (NsProc, String) {
    let config = dir.write(
        "gateway.toml",
        &format!("listen = \"{listen}\"\nstate_dir = \"state\"\n{FAST_TIMERS}\n{services}"),
    );
    let gw = NsProc::dialback(
        net,
        &net.hub,
        "gateway",
        &["gateway", "-c", config.to_str().unwrap()],
    );
    let fp = gw.wait_for("fingerprint", STARTUP, |l| {
        field(l, "fingerprint").is_some()
    });
    gw.wait_for("listening for agents", STARTUP, |l| {
        message_is(l, "listening for agents")
    });
    (gw, field(&fp, "fingerprint").unwrap())
}

/// An agent in spoke `i`, publishing `services` (name, password) all to `local`.
fn start_agent(
    net: &Net,
    dir: &Dir,
    i: usize,
    fingerprint: &str,
    services: &[(&str, &str)],
    local: SocketAddr,
) -> NsProc {
    let gateway = SocketAddr::from((Net::hub_addr(i), 7000));
    start_agent_to(net, dir, i, gateway, fingerprint, services, local)
}

fn start_agent_to(
    net: &Net,
    dir: &Dir,
    i: usize,
    gateway: SocketAddr,
    fingerprint: &str,
    services: &[(&str, &str)],
    local: SocketAddr,
) -> NsProc {
    let mut text = format!(
        "gateway = \"{gateway}\"\nfingerprint = \"{fingerprint}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\nconnect_timeout = \"3s\"\n"
    );
    for (name, pw) in services {
        text.push_str(&format!(
            "\n[services.{name}]\npassword = \"{pw}\"\nlocal = \"{local}\"\n"
        ));
    }
    let name = format!("agent{i}-{}", if gateway.is_ipv6() { "v6" } else { "v4" });
    let config = dir.write(&format!("{name}.toml"), &text);
    NsProc::dialback(
        net,
        net.spoke(i),
        &name,
        &["agent", "-c", config.to_str().unwrap()],
    )
}

fn registered_from(gw: &NsProc, service: &str, ip: &str) {
    gw.wait_for(&format!("{service} registered from {ip}"), WAIT, |l| {
        message_is(l, "agent registered")
            && field(l, "service").as_deref() == Some(service)
            && field(l, "peer").is_some_and(|p| p.starts_with(&format!("{ip}:")))
    });
}

fn refused_from(gw: &NsProc, service: &str, ip: &str) -> String {
    gw.wait_for(&format!("{service} refused for {ip}"), WAIT, |l| {
        message_contains(l, "control connection refused")
            && field(l, "service").as_deref() == Some(service)
            && field(l, "code").as_deref() == Some("not_allowed")
            && field(l, "peer").is_some_and(|p| p.starts_with(&format!("{ip}:")))
    })
}

#[test]
fn allow_from_exact_cidr_prefix_and_dns_name_against_real_source_addresses() {
    let net = Net::new("acl", 2);
    let (a1, a2) = (
        Net::spoke_addr(1).to_string(),
        Net::spoke_addr(2).to_string(),
    );
    net.set_hub_hosts(&format!("127.0.0.1 localhost\n{a1} home.dialback.test\n"));
    let dir = Dir::new();
    let service = |name: &str, rule: &str, port: u16| {
        format!(
            "[services.{name}]\npassword = \"pw-{name}-0123456789\"\ntcp_listen = \"0.0.0.0:{port}\"\nallow_from = [{rule}]\n\n"
        )
    };
    let services = [
        service("exact", &format!("\"{a1}\""), 9001),
        service("cidr", "\"10.77.1.0/24\"", 9002),
        service("prefix", "\"10.77.1.\"", 9003),
        service("named", "\"home.dialback.test\"", 9004),
        service("open", "\"*\"", 9005),
    ]
    .concat();
    let (gw, fp) = start_gateway(&net, &dir, &services);
    let pw: Vec<(String, String)> = ["exact", "cidr", "prefix", "named", "open"]
        .iter()
        .map(|n| (n.to_string(), format!("pw-{n}-0123456789")))
        .collect();
    let pairs = |names: &[&str]| -> Vec<(&str, &str)> {
        pw.iter()
            .filter(|(n, _)| names.contains(&n.as_str()))
            .map(|(n, p)| (n.as_str(), p.as_str()))
            .collect()
    };
    let local: SocketAddr = "127.0.0.1:9".parse().unwrap(); // registration needs no service
    let mut agent1 = start_agent(
        &net,
        &dir,
        1,
        &fp,
        &pairs(&["exact", "cidr", "prefix", "named"]),
        local,
    );
    let agent2 = start_agent(
        &net,
        &dir,
        2,
        &fp,
        &pairs(&["exact", "cidr", "prefix", "named", "open"]),
        local,
    );

    for s in ["exact", "cidr", "prefix", "named"] {
        registered_from(&gw, s, &a1);
        let line = refused_from(&gw, s, &a2);
        assert!(
            message_contains(&line, &format!("{a2} is not allowed to register service")),
            "{line}"
        );
    }
    // The same agent is welcome where the rules say so.
    registered_from(&gw, "open", &a2);
    // The agent is told why, and keeps retrying with its backoff.
    let told = agent2.wait_for("refusal reason at the agent", WAIT, |l| {
        l.contains(&format!("{a2} is not allowed to register service"))
    });
    // It learns that its address was refused, not what the rules are.
    assert!(
        !told.contains("10.77.1.") && !told.contains("home.dialback.test"),
        "{told}"
    );

    // Dynamic DNS: the name now points at spoke 2. The name is resolved when a connection
    // arrives, so spoke 2's next attempt is accepted once spoke 1's session is gone.
    net.set_hub_hosts(&format!("127.0.0.1 localhost\n{a2} home.dialback.test\n"));
    agent1.kill9();
    registered_from(&gw, "named", &a2);
    // Address rules are not affected by the name.
    let before = gw.count(|l| {
        message_contains(l, "control connection refused")
            && field(l, "service").as_deref() == Some("exact")
    });
    gw.wait_for_nth("exact still refused for spoke 2", before + 1, WAIT, |l| {
        message_contains(l, "control connection refused")
            && field(l, "service").as_deref() == Some("exact")
    });
    assert_eq!(
        gw.count(|l| message_is(l, "agent registered")
            && field(l, "service").as_deref() == Some("exact")
            && field(l, "peer").is_some_and(|p| p.starts_with(&format!("{a2}:")))),
        0
    );
}

#[test]
fn clients_allow_refuses_clients_from_other_addresses() {
    let net = Net::new("cli", 3);
    let dir = Dir::new();
    let (gw, fp) = start_gateway(
        &net,
        &dir,
        "[services.web]\npassword = \"pw-web-0123456789\"\ntcp_listen = \"0.0.0.0:9000\"\nclients_allow = [\"10.77.1.0/24\"]\n",
    );
    // The private service lives next to its agent, in spoke 3.
    let echo = net.within(net.spoke(3), common::echo_server);
    let _agent = start_agent(&net, &dir, 3, &fp, &[("web", "pw-web-0123456789")], echo);
    registered_from(&gw, "web", &Net::spoke_addr(3).to_string());

    let allowed: SocketAddr = format!("{}:9000", Net::hub_addr(1)).parse().unwrap();
    net.within(net.spoke(1), move || common::wait_echo_works(allowed, WAIT));
    let got = net.within(net.spoke(1), move || {
        roundtrip(allowed, b"from spoke 1".to_vec(), Duration::from_secs(10))
    });
    assert_eq!(got, b"from spoke 1");

    let refused: SocketAddr = format!("{}:9000", Net::hub_addr(2)).parse().unwrap();
    // Closed without an answer: EOF, or a reset since the gateway never read the bytes.
    let got = net.within(net.spoke(2), move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(refused).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(b"from spoke 2");
        let mut out = Vec::new();
        match s.read_to_end(&mut out) {
            Ok(_) => out,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => out,
            Err(e) => panic!("refused client: {e}"),
        }
    });
    assert!(got.is_empty(), "a refused client got {got:?}");
    let line = gw.wait_for("client refused", WAIT, |l| {
        message_contains(l, "client refused") && message_contains(l, "clients_allow")
    });
    assert!(
        message_contains(
            &line,
            &format!("{} is not in clients_allow", Net::spoke_addr(2))
        ),
        "{line}"
    );
    assert_eq!(
        field(&line, "client")
            .as_deref()
            .map(|c| c.starts_with("10.77.2.2:")),
        Some(true),
        "{line}"
    );
}

#[test]
fn allow_from_over_ipv6_and_ipv4_on_a_dual_stack_listener() {
    let net = Net::new("acl6", 2);
    let dir = Dir::new();
    let service = |name: &str, rule: &str| {
        format!(
            "[services.{name}]\npassword = \"pw-{name}-0123456789\"\ntcp_listen = \"[::]:0\"\nallow_from = [{rule}]\n\n"
        )
    };
    let services = [
        service("v6net", "\"fd77:1::/64\""),
        service("v6exact", &format!("\"{}\"", Net::spoke_addr6(2))),
        service("v4net", "\"10.77.1.0/24\""),
    ]
    .concat();
    // One dual-stack socket: IPv4 agents arrive as ::ffff:10.77.x.2 and must match IPv4 rules.
    let (gw, fp) = start_gateway_on(&net, &dir, "[::]:7000", &services);
    let pw = |n: &str| format!("pw-{n}-0123456789");
    let (p6n, p6e, p4n) = (pw("v6net"), pw("v6exact"), pw("v4net"));
    let all = [
        ("v6net", p6n.as_str()),
        ("v6exact", p6e.as_str()),
        ("v4net", p4n.as_str()),
    ];
    let local: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let v6 = |i| SocketAddr::from((Net::hub_addr6(i), 7000));
    let v4 = |i| SocketAddr::from((Net::hub_addr(i), 7000));
    let _a1v6 = start_agent_to(&net, &dir, 1, v6(1), &fp, &all[..2], local);
    let _a2v6 = start_agent_to(&net, &dir, 2, v6(2), &fp, &all[..2], local);
    let _a1v4 = start_agent_to(&net, &dir, 1, v4(1), &fp, &all[2..], local);
    let _a2v4 = start_agent_to(&net, &dir, 2, v4(2), &fp, &all[2..], local);
    let (s1, s2) = (
        Net::spoke_addr6(1).to_string(),
        Net::spoke_addr6(2).to_string(),
    );
    let in_brackets = |ip: &str| format!("[{ip}]");
    registered_from(&gw, "v6net", &in_brackets(&s1));
    refused_from(&gw, "v6net", &in_brackets(&s2));
    registered_from(&gw, "v6exact", &in_brackets(&s2));
    refused_from(&gw, "v6exact", &in_brackets(&s1));
    // Logged as plain IPv4 addresses, and matched by the IPv4 rule.
    registered_from(&gw, "v4net", &Net::spoke_addr(1).to_string());
    refused_from(&gw, "v4net", &Net::spoke_addr(2).to_string());
}
