//! A fleet: two gateways sharing nothing but their certificate, behind a real HAProxy (TCP
//! mode, health checks), and one agent registered with both through `gateways = [...]`.

#[path = "common/balancers.rs"]
mod balancers;
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use balancers::{free_port, Server};
use common::*;

const PW: &str = "fleet-password";

fn gateway_in(dir: &Dir, tcp_port: u16) -> RunningGateway {
    let conf = gateway_toml(
        dir,
        &GatewayConf {
            listen: "127.0.0.1:0",
            timers: FAST_TIMERS,
            services: &[("web", PW)],
            extra: "",
        },
    );
    let text = std::fs::read_to_string(&conf).unwrap().replace(
        "tcp_listen = \"127.0.0.1:0\"",
        &format!("tcp_listen = \"127.0.0.1:{tcp_port}\""),
    );
    std::fs::write(&conf, text).unwrap();
    RunningGateway::start(&conf)
}

#[test]
fn two_gateways_behind_haproxy_one_agent_registered_with_both() {
    let (dir_a, dir_b) = (Dir::new(), Dir::new());
    let (port_a, port_b) = (free_port(), free_port());
    let mut gw_a = gateway_in(&dir_a, port_a);
    // The fleet shares one certificate, so one pinned fingerprint fits both gateways.
    let state_a = dir_a.path().join("state");
    let state_b = dir_b.path().join("state");
    std::fs::create_dir_all(&state_b).unwrap();
    for f in std::fs::read_dir(&state_a).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), state_b.join(f.file_name())).unwrap();
    }
    let gw_b = gateway_in(&dir_b, port_b);
    assert_eq!(
        gw_a.fingerprint, gw_b.fingerprint,
        "one certificate for the fleet"
    );

    let echo = echo_server();
    let agent_conf = agent_toml(
        &dir_a,
        "agent.toml",
        gw_a.listen,
        &gw_a.fingerprint,
        &[("web", PW, echo)],
    );
    let text = std::fs::read_to_string(&agent_conf).unwrap().replace(
        &format!("gateway = \"{}\"\n", gw_a.listen),
        &format!("gateways = [\"{}\", \"{}\"]\n", gw_a.listen, gw_b.listen),
    );
    std::fs::write(&agent_conf, text).unwrap();
    let _agent = Proc::start("agent", &["agent", "-c", agent_conf.to_str().unwrap()]);
    gw_a.wait_registered("web", 1);
    gw_b.wait_registered("web", 1);

    // HAProxy in front, TCP mode, round robin with fast health checks on both public ports.
    let front = free_port();
    let _haproxy = Server::haproxy(
        &format!(
            "listen fleet\n  mode tcp\n  bind 127.0.0.1:{front}\n  balance roundrobin\n  \
             server a 127.0.0.1:{port_a} check inter 100ms fall 1 rise 2\n  \
             server b 127.0.0.1:{port_b} check inter 100ms fall 1 rise 2\n"
        ),
        &[front],
    );
    let front: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();

    // Clients through the balancer reach the service through both gateways.
    for i in 0..20u32 {
        let msg = random_bytes(1000 + i as usize * 37, u64::from(i));
        assert!(try_echo(front, &msg), "client {i} through the fleet failed");
    }
    let served = |gw: &RunningGateway| {
        gw.proc
            .count(|l| message_is(l, "client done") || message_contains(l, "bound to a pooled"))
    };
    let deadline = Instant::now() + STARTUP;
    while served(&gw_a) == 0 || served(&gw_b) == 0 {
        assert!(
            Instant::now() < deadline,
            "round robin did not use both gateways: a {} b {}",
            served(&gw_a),
            served(&gw_b)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // One gateway dies. Once HAProxy's health check has taken it out, no new connection is
    // lost: wait (bounded) for ten successes in a row, then every one of the next 50 works.
    gw_a.proc.kill9();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut streak = 0;
    while streak < 10 {
        assert!(
            Instant::now() < deadline,
            "the fleet did not recover after losing a gateway"
        );
        if try_echo(front, b"after the loss") {
            streak += 1;
        } else {
            streak = 0;
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for i in 0..50u32 {
        let msg = random_bytes(500, 1000 + u64::from(i));
        assert!(
            try_echo(front, &msg),
            "connection {i} after the health check was lost"
        );
    }
    // The survivor still has its session: the agent never depended on the dead gateway.
    assert_eq!(
        gw_b.proc
            .count(|l| message_contains(l, "agent session ended")),
        0
    );
}
