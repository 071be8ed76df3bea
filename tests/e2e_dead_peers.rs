//! A public client that vanishes without a word (its network gone: no FIN, no RST) does not
//! hold its relay forever: TCP keepalive, set on the gateway's listeners and inherited by
//! every accepted connection, ends it and both of its descriptors.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{field, message_contains, message_is, Dir, FAST_TIMERS, STARTUP};
use netns::{Net, NsProc};

#[test]
fn a_client_whose_network_vanished_is_dropped_by_keepalive() {
    let net = Net::new("ka", 1);
    let dir = Dir::new();
    let config = dir.write(
        "gateway.toml",
        &format!(
            "listen = \"127.0.0.1:7000\"\nstate_dir = \"state\"\ntcp_keepalive = \"2s\"\n{FAST_TIMERS}\n[services.web]\npassword = \"web-password\"\ntcp_listen = \"0.0.0.0:9000\"\n"
        ),
    );
    let gw = NsProc::dialback(
        &net,
        &net.hub,
        "gateway",
        &["gateway", "-c", config.to_str().unwrap()],
    );
    let fp = gw.wait_for("fingerprint", STARTUP, |l| {
        field(l, "fingerprint").is_some()
    });
    let fingerprint = field(&fp, "fingerprint").unwrap();
    let echo = net.within(&net.hub, common::echo_server);
    let agent_conf = dir.write(
        "agent.toml",
        &format!(
            "gateway = \"127.0.0.1:7000\"\nfingerprint = \"{fingerprint}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n\n[services.web]\npassword = \"web-password\"\nlocal = \"{echo}\"\n"
        ),
    );
    let agent = NsProc::dialback(
        &net,
        &net.hub,
        "agent",
        &["agent", "-c", agent_conf.to_str().unwrap()],
    );
    gw.wait_for("registered", STARTUP, |l| message_is(l, "agent registered"));

    // A client in the spoke namespace, one round trip, then it stays connected.
    let public = SocketAddr::from((Net::hub_addr(1), 9000));
    let mut client = net.within(net.spoke(1), move || {
        let deadline = Instant::now() + STARTUP;
        loop {
            match TcpStream::connect_timeout(&public, Duration::from_secs(2)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("connect {public}: {e}; again");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("connect {public}: {e}"),
            }
        }
    });
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"are you there?").unwrap();
    let mut back = [0u8; 14];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"are you there?");
    let spoke_ip = Net::spoke_addr(1).to_string();

    // The client's link goes down: nothing it could send arrives, nothing is sent back.
    let gone = Instant::now();
    let ok = Command::new("ip")
        .args(["-n", net.spoke(1), "link", "set", "up0", "down"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip link set down");

    // Keepalive (2 s idle, then probes; 4 s without an answer) ends the relay.
    let line = gw.wait_for(
        "the dead client's relay ends",
        Duration::from_secs(30),
        |l| {
            (message_contains(l, "client relay ended") || message_is(l, "client done"))
                && field(l, "peer").is_some_and(|p| p.starts_with(&format!("{spoke_ip}:")))
        },
    );
    let after = gone.elapsed();
    assert!(
        after >= Duration::from_secs(2),
        "ended after {after:?}, before any probe: {line}"
    );
    eprintln!("the relay of the vanished client ended after {after:?}: {line}");
    // The gateway reset its data connection, so the agent let go of its side too.
    agent.wait_for("the agent's side ends", Duration::from_secs(10), |l| {
        (message_contains(l, "data connection ended") || message_is(l, "data connection done"))
            && field(l, "client").is_some_and(|p| p.starts_with(&format!("{spoke_ip}:")))
    });
    drop(client);
}
