//! Fault injection, end to end, with the real binary: an agent killed mid-transfer, a control
//! connection black-holed, the gateway restarted mid-transfer, a proxy hop dying, and every
//! hop re-chunking and delaying the byte stream. Each test checks that no client got a wrong
//! byte, that nobody hangs, and that every process lets go of every connection it held.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::procstat::{held, pattern, wait_sockets, Local, PIPE_STOCK_FDS};
use common::relay::{Chaos, Relay};
use common::squid::{Squid, SquidAuth};
use common::*;

const PW: &str = "fault-injection-password";
const DEAD_AFTER: Duration = Duration::from_millis(1500);
const HEARTBEAT: Duration = Duration::from_millis(300);
/// How long anything may take to notice a closed connection before the test calls it a hang.
const SETTLE: Duration = Duration::from_secs(15);

/// A gateway config with the given `[services.NAME]` bodies (password and tcp_listen added).
fn gateway_conf(dir: &Dir, listen: &str, services: &[(&str, &str)]) -> PathBuf {
    let mut s = format!("listen = \"{listen}\"\nstate_dir = \"state\"\n{FAST_TIMERS}");
    for (name, body) in services {
        s.push_str(&format!(
            "\n[services.{name}]\npassword = \"{PW}\"\ntcp_listen = \"127.0.0.1:0\"\n{body}"
        ));
    }
    dir.write("gateway.toml", &s)
}

/// An agent for `services` (name, local) reaching the gateway at `gateway`, through
/// `proxies` (TOML array items) if any.
fn agent(
    dir: &Dir,
    file: &str,
    gateway: SocketAddr,
    fingerprint: &str,
    proxies: &[String],
    services: &[(&str, SocketAddr)],
) -> Proc {
    let mut s = format!(
        "gateway = \"{gateway}\"\nfingerprint = \"{fingerprint}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\nconnect_timeout = \"3s\"\n"
    );
    if !proxies.is_empty() {
        s.push_str(&format!("proxies = [{}]\n", proxies.join(", ")));
    }
    for (name, local) in services {
        s.push_str(&format!(
            "\n[services.{name}]\npassword = \"{PW}\"\nlocal = \"{local}\"\n"
        ));
    }
    let conf = dir.write(file, &s);
    Proc::start(file, &["agent", "-c", conf.to_str().unwrap()])
}

/// How a long-running client's connection ended.
#[derive(Debug, PartialEq)]
enum End {
    /// A FIN: read returned 0.
    Eof,
    /// Reset or another error.
    Error(ErrorKind),
}

/// A client in the middle of a long transfer. `upload`: it also writes the pattern over and
/// over (to an echo service) and checks the echo; otherwise it only reads (from a source
/// service). Every byte read is checked against the pattern as it arrives.
struct Transfer {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    reader: JoinHandle<(End, u64)>,
}

impl Transfer {
    fn start(addr: SocketAddr, upload: bool) -> Transfer {
        let p = pattern();
        let s = TcpStream::connect(addr).unwrap();
        // A read that waits this long means the connection hangs: the test fails on it.
        s.set_read_timeout(Some(SETTLE)).unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        if upload {
            let mut w = s.try_clone().unwrap();
            let (p, stop) = (p.clone(), stop.clone());
            thread::spawn(move || {
                // At most 1 GiB, in case nothing stops it.
                for _ in 0..1024 {
                    if stop.load(Ordering::SeqCst) || w.write_all(&p).is_err() {
                        return;
                    }
                }
            });
        }
        let r = received.clone();
        let reader = thread::spawn(move || {
            let mut s = s;
            let mut buf = vec![0u8; 64 * 1024];
            let mut pos = 0u64;
            let end = loop {
                let n = match s.read(&mut buf) {
                    Ok(0) => break End::Eof,
                    Ok(n) => n,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        panic!("connection hangs: no byte and no close for {SETTLE:?} after {pos} bytes")
                    }
                    Err(e) => break End::Error(e.kind()),
                };
                for (i, b) in buf[..n].iter().enumerate() {
                    let at = pos + i as u64;
                    assert_eq!(
                        *b,
                        p[(at % p.len() as u64) as usize],
                        "wrong byte at offset {at}"
                    );
                }
                pos += n as u64;
                r.store(pos, Ordering::SeqCst);
            };
            (end, pos)
        });
        Transfer {
            received,
            stop,
            reader,
        }
    }

    /// Waits until at least `n` bytes came back.
    fn wait_received(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.received.load(Ordering::SeqCst) < n {
            assert!(
                !self.reader.is_finished() && Instant::now() < deadline,
                "transfer stalled at {} bytes",
                self.received.load(Ordering::SeqCst)
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// How the connection ended (after a fault), and the bytes it carried.
    fn end(self) -> (End, u64) {
        let r = self.reader.join().expect("client reader");
        self.stop.store(true, Ordering::SeqCst);
        r
    }
}

/// A fresh connection gets exactly its bytes back, through a FIN in both directions.
fn echo_checks_out(addr: SocketAddr, size: usize, seed: u64) {
    let data = random_bytes(size, seed);
    let back = roundtrip(addr, data.clone(), Duration::from_secs(30));
    assert!(
        back == data,
        "{size} bytes through {addr} came back as {} different bytes",
        back.len()
    );
}

/// Starts `n` uploading clients on `echo` and `n` downloading ones on `source`, and waits
/// until each has moved at least 256 KiB.
fn transfers_in_flight(echo: SocketAddr, source: SocketAddr, n: usize) -> Vec<(bool, Transfer)> {
    let t: Vec<(bool, Transfer)> = (0..n)
        .flat_map(|_| {
            [
                (true, Transfer::start(echo, true)),
                (false, Transfer::start(source, false)),
            ]
        })
        .collect();
    for (_, x) in &t {
        x.wait_received(256 << 10);
    }
    t
}

/// After a fault, every client's connection ends (none hangs) with only right bytes, and a
/// client that was only reading sees a clean close (FIN), not a reset.
fn all_end_cleanly(transfers: Vec<(bool, Transfer)>) {
    for (upload, t) in transfers {
        let (end, bytes) = t.end();
        eprintln!("upload {upload}: {end:?} after {bytes} bytes");
        assert!(bytes >= 256 << 10);
        if !upload {
            assert_eq!(end, End::Eof, "a downloading client was not closed cleanly");
        }
    }
}

fn fill(gw: &RunningGateway, service: &str, n: usize) {
    gw.proc.wait_for_nth("pool filled", n, STARTUP, |l| {
        message_is(l, "data connection parked in the pool")
            && field(l, "service").as_deref() == Some(service)
    });
}

#[test]
fn agent_killed_mid_transfer_closes_clients_and_the_gateway_frees_everything() {
    let dir = Dir::new();
    let conf = gateway_conf(
        &dir,
        "127.0.0.1:0",
        &[("echo", "pool = 2\n"), ("source", "pool = 2\n")],
    );
    let gw = RunningGateway::start(&conf);
    let (echo_addr, source_addr) = (gw.service_addr("echo"), gw.service_addr("source"));
    let gw_pid = gw.proc.pid();
    let idle = held(gw_pid);
    let (echo, source) = (Local::start(), Local::source());
    let mut a = agent(
        &dir,
        "agent.toml",
        gw.listen,
        &gw.fingerprint,
        &[],
        &[("echo", echo.addr), ("source", source.addr)],
    );
    gw.wait_registered("echo", 1);
    gw.wait_registered("source", 1);
    // Two control connections and two pooled connections per service.
    wait_sockets(gw_pid, "gateway, pools filled", idle.sockets + 6, SETTLE);

    let transfers = transfers_in_flight(echo_addr, source_addr, 4);
    let busy = held(gw_pid);
    assert!(
        busy.sockets >= idle.sockets + 2 + 16,
        "8 clients and their data connections are open: {busy:?}"
    );
    a.kill9();
    all_end_cleanly(transfers);

    for service in ["echo", "source"] {
        gw.proc.wait_for("session end", SETTLE, |l| {
            message_contains(l, "agent session ended")
                && field(l, "service").as_deref() == Some(service)
        });
    }
    // Every client, data, pooled and control connection is released; only a bounded stock of
    // empty pipes is kept for reuse.
    let after = wait_sockets(gw_pid, "gateway after the agent died", idle.sockets, SETTLE);
    assert!(after.pipes <= idle.pipes + PIPE_STOCK_FDS, "{after:?}");
    assert!(
        after.fds <= idle.fds + PIPE_STOCK_FDS,
        "{after:?} vs idle {idle:?}"
    );
    // The service is offline now: a new client is closed at once.
    let mut c = TcpStream::connect(echo_addr).unwrap();
    c.set_read_timeout(Some(SETTLE)).unwrap();
    assert_eq!(c.read(&mut [0u8; 8]).unwrap_or(0), 0);
}

#[test]
fn black_holed_control_connection_is_detected_within_dead_after_and_re_registered() {
    let dir = Dir::new();
    let conf = gateway_conf(&dir, "127.0.0.1:0", &[("svc", "pool = 2\n")]);
    let gw = RunningGateway::start(&conf);
    let public = gw.service_addr("svc");
    let gw_pid = gw.proc.pid();
    let idle = held(gw_pid);
    let echo = Local::start();
    // The agent reaches the gateway only through the relay: control and data connections.
    let relay = Relay::start(gw.listen, Chaos::none());
    let a = agent(
        &dir,
        "agent.toml",
        relay.addr,
        &gw.fingerprint,
        &[],
        &[("svc", echo.addr)],
    );
    gw.wait_registered("svc", 1);
    fill(&gw, "svc", 2);
    echo_checks_out(public, 100_000, 1);
    wait_sockets(gw_pid, "gateway, pool filled", idle.sockets + 3, SETTLE);
    let agent_pid = a.pid();
    wait_sockets(agent_pid, "agent, pool filled", 3, SETTLE);

    // Everything open goes silent, both ways; no socket is closed.
    let holed = relay.blackhole_open();
    let at = Instant::now();
    assert!(holed >= 3, "control and two pooled connections: {holed}");

    let line = gw
        .proc
        .wait_for("dead agent dropped", DEAD_AFTER + SETTLE, |l| {
            message_contains(l, "agent session ended")
        });
    let noticed = at.elapsed();
    assert!(line.contains("dead_after"), "{line}");
    // The last byte the gateway heard came at most one heartbeat before the black hole.
    assert!(
        noticed + HEARTBEAT + Duration::from_millis(100) >= DEAD_AFTER,
        "declared dead after {noticed:?}, before dead_after"
    );
    // The agent, hearing nothing either, gives up the session and registers again through a
    // fresh connection, which the gateway accepts.
    a.wait_for("agent-side session end", SETTLE, |l| {
        message_contains(l, "control session ended")
    });
    gw.wait_registered("svc", 2);
    a.wait_for_nth("agent registered again", 2, SETTLE, |l| {
        message_is(l, "registered with gateway")
    });
    echo_checks_out(public, 1 << 20, 2);

    // Both sides let go of the black-holed connections: one live control connection and a
    // full pool each, nothing more.
    wait_sockets(
        gw_pid,
        "gateway after re-registration",
        idle.sockets + 3,
        SETTLE,
    );
    wait_sockets(agent_pid, "agent after re-registration", 3, SETTLE);
    echo.wait_idle(SETTLE);
}

#[test]
fn gateway_restarted_mid_transfer_agent_frees_everything_and_re_registers() {
    let dir = Dir::new();
    let services = [("echo", "pool = 2\n"), ("source", "pool = 2\n")];
    let conf = gateway_conf(&dir, "127.0.0.1:0", &services);
    let mut gw = RunningGateway::start(&conf);
    let (echo, source) = (Local::start(), Local::source());
    let a = agent(
        &dir,
        "agent.toml",
        gw.listen,
        &gw.fingerprint,
        &[],
        &[("echo", echo.addr), ("source", source.addr)],
    );
    gw.wait_registered("echo", 1);
    gw.wait_registered("source", 1);
    let agent_pid = a.pid();
    // Two control connections, two pooled connections per service.
    let idle = wait_sockets(agent_pid, "agent, pools filled", 6, SETTLE);

    let transfers = transfers_in_flight(gw.service_addr("echo"), gw.service_addr("source"), 4);
    assert_eq!((echo.live(), source.live()), (4, 4));
    gw.proc.kill9();
    all_end_cleanly(transfers);
    // The agent closes every data connection and every connection to its local services.
    echo.wait_idle(SETTLE);
    source.wait_idle(SETTLE);
    a.wait_for_nth("both sessions ended", 2, SETTLE, |l| {
        message_contains(l, "control session ended")
    });

    // The same gateway comes back on the same port, with the same certificate.
    let conf = gateway_conf(&dir, &gw.listen.to_string(), &services);
    let gw2 = RunningGateway::start(&conf);
    assert_eq!(gw2.fingerprint, gw.fingerprint);
    gw2.wait_registered("echo", 1);
    gw2.wait_registered("source", 1);
    let after = wait_sockets(agent_pid, "agent after the restart", 6, SETTLE);
    assert!(after.pipes <= idle.pipes + PIPE_STOCK_FDS, "{after:?}");
    assert!(
        after.fds <= idle.fds + PIPE_STOCK_FDS,
        "{after:?} vs {idle:?}"
    );
    echo_checks_out(gw2.service_addr("echo"), 4 << 20, 3);
    let t = Transfer::start(gw2.service_addr("source"), false);
    t.wait_received(1 << 20);
}

#[test]
fn proxy_hop_dying_mid_transfer_is_survived() {
    let squid = Squid::start(SquidAuth::None);
    // The second hop is an in-test CONNECT proxy that can die and come back on its port.
    let mut hop2 = Relay::connect_proxy(Chaos::none());
    let dir = Dir::new();
    let conf = gateway_conf(&dir, "127.0.0.1:0", &[("echo", "pool = 2\n")]);
    let gw = RunningGateway::start(&conf);
    let public = gw.service_addr("echo");
    let gw_pid = gw.proc.pid();
    let idle = held(gw_pid);
    let echo = Local::start();
    let a = agent(
        &dir,
        "agent.toml",
        gw.listen,
        &gw.fingerprint,
        &[
            format!("\"http://{}\"", squid.addr()),
            format!("\"http://{}\"", hop2.addr),
        ],
        &[("echo", echo.addr)],
    );
    gw.wait_registered("echo", 1);
    fill(&gw, "echo", 2);
    let agent_pid = a.pid();
    let agent_idle = wait_sockets(agent_pid, "agent, pool filled", 3, SETTLE);
    assert!(hop2.accepted() >= 3, "the agent's connections take hop 2");

    // squid ends a tunnel on the first FIN, so these clients never half-close: they upload
    // and check the echo until the hop dies.
    let transfers: Vec<Transfer> = (0..4).map(|_| Transfer::start(public, true)).collect();
    for t in &transfers {
        t.wait_received(256 << 10);
    }
    let failed = |l: &str| message_contains(l, "registration failed");
    let failures_before = a.count(failed);
    hop2.kill();
    for t in transfers {
        let (_, bytes) = t.end();
        assert!(bytes >= 256 << 10);
    }
    gw.proc.wait_for("session end", SETTLE, |l| {
        message_contains(l, "agent session ended")
    });
    let after = wait_sockets(gw_pid, "gateway after the hop died", idle.sockets, SETTLE);
    assert!(after.pipes <= idle.pipes + PIPE_STOCK_FDS, "{after:?}");
    echo.wait_idle(SETTLE);
    // While hop 2 is down, squid (hop 1) cannot reach it; the agent says so in every
    // failed attempt, naming the hop that answered.
    let line = a.wait_for_nth(
        "failure naming the hop",
        failures_before + 1,
        SETTLE,
        failed,
    );
    assert!(
        line.contains(&format!("proxy hop 1 ({})", squid.addr()))
            && line.contains("503")
            && line.contains("cannot reach the next proxy"),
        "{line}"
    );

    let hop2 = hop2.restart();
    gw.wait_registered("echo", 2);
    let again = echo_exact(public, random_bytes(2 << 20, 9), Duration::from_secs(30));
    assert!(
        again == random_bytes(2 << 20, 9),
        "bytes differ after the hop came back"
    );
    wait_sockets(
        agent_pid,
        "agent after recovery",
        agent_idle.sockets,
        SETTLE,
    );
    assert!(hop2.accepted() >= 3);
}

#[test]
fn every_hop_rechunks_and_delays_and_every_byte_arrives() {
    let dir = Dir::new();
    let conf = gateway_conf(
        &dir,
        "127.0.0.1:0",
        &[
            ("pooled", "pool = 2\n"),
            ("sealed", "pool = 2\ndata_tls = true\n"),
            ("direct", "pool = 0\n"),
        ],
    );
    let gw = RunningGateway::start(&conf);
    let gw_pid = gw.proc.pid();
    let idle = held(gw_pid);
    let echo = Local::start();
    // Agent → gateway (control and data), agent → local service, and client → gateway: each
    // hop cuts the stream into random pieces and pauses at random.
    let to_gateway = Relay::start(gw.listen, Chaos::rough());
    let to_local = Relay::start(echo.addr, Chaos::rough());
    let services = ["pooled", "sealed", "direct"];
    let _a = agent(
        &dir,
        "agent.toml",
        to_gateway.addr,
        &gw.fingerprint,
        &[],
        &services.map(|s| (s, to_local.addr)),
    );
    let publics: Vec<Relay> = services
        .iter()
        .map(|s| {
            gw.wait_registered(s, 1);
            Relay::start(gw.service_addr(s), Chaos::rough())
        })
        .collect();

    let sizes = [0usize, 1, 17, 1000, 65_537, 300_000, 1 << 20];
    let mut clients = Vec::new();
    for (k, front) in publics.iter().enumerate() {
        for (j, size) in sizes.iter().enumerate() {
            let addr = front.addr;
            let (size, seed) = (*size, (k * 100 + j) as u64 + 1);
            clients.push(thread::spawn(move || echo_checks_out(addr, size, seed)));
        }
        // And some in a row, so that pooled connections are used and refilled under chaos.
        let addr = front.addr;
        clients.push(thread::spawn(move || {
            for i in 0..20u64 {
                echo_checks_out(addr, 1 + (i as usize * 7919) % 20_000, 1000 + i);
            }
        }));
    }
    for c in clients {
        c.join().expect("a client got wrong bytes");
    }
    let per_service = (sizes.len() + 20) as u64;
    let payload: u64 = 2
        * (sizes.iter().sum::<usize>() as u64
            + (0..20u64).map(|i| 1 + (i * 7919) % 20_000).sum::<u64>());
    for r in &publics {
        assert!(
            r.forwarded() >= payload,
            "a public hop carried less than the payload"
        );
    }
    assert!(
        to_local.forwarded() >= 3 * payload,
        "the local hop carried less"
    );
    assert_eq!(
        echo.total() as u64,
        3 * per_service,
        "one local connection per client"
    );
    echo.wait_idle(SETTLE);
    // Three control connections and two full pools, nothing else.
    wait_sockets(gw_pid, "gateway afterwards", idle.sockets + 3 + 4, SETTLE);
}

/// Sets the open-file limit (soft and hard) of a running process; lowering needs no privilege.
fn limit_open_files(pid: u32, n: usize) {
    let ok = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={n}:{n}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "prlimit --pid {pid}");
}

#[test]
fn descriptor_pressure_never_resets_an_established_connection() {
    let dir = Dir::new();
    let conf = gateway_conf(&dir, "127.0.0.1:0", &[("echo", "pool = 0\n")]);
    let gw = RunningGateway::start(&conf);
    let public = gw.service_addr("echo");
    let echo = Local::start();
    let a = agent(
        &dir,
        "agent.toml",
        gw.listen,
        &gw.fingerprint,
        &[],
        &[("echo", echo.addr)],
    );
    gw.wait_registered("echo", 1);
    echo_checks_out(public, 1000, 1);
    // 60 idle connections take 120 sockets at each end (each held twice on io_uring); the
    // limit leaves room for them but not for a pipe per direction once all of them move bytes
    // at the same moment.
    const N: usize = 60;
    let per_connection = if test_runtime() == "uring" { 4 } else { 2 };
    let slack = 8;
    limit_open_files(
        gw.proc.pid(),
        held(gw.proc.pid()).fds + per_connection * N + slack,
    );
    limit_open_files(a.pid(), held(a.pid()).fds + per_connection * N + slack);
    let clients: Vec<TcpStream> = (0..N)
        .map(|i| {
            let mut c = TcpStream::connect(public).unwrap();
            c.set_read_timeout(Some(SETTLE)).unwrap();
            c.write_all(&[i as u8]).unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            assert_eq!(b[0], i as u8);
            c
        })
        .collect();
    // Now every connection sends at once; none may be reset for want of a pipe.
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            thread::spawn(move || -> Result<(), String> {
                let data = random_bytes(1 << 20, i as u64 + 7);
                let mut w = c.try_clone().unwrap();
                let d = data.clone();
                let writer = thread::spawn(move || {
                    let _ = w.write_all(&d);
                    let _ = w.shutdown(std::net::Shutdown::Write);
                });
                let mut back = Vec::new();
                let r = c.read_to_end(&mut back);
                writer.join().unwrap();
                match r {
                    Ok(_) if back == data => Ok(()),
                    Ok(_) => Err(format!("connection {i}: {} bytes, not its own", back.len())),
                    Err(e) => Err(format!("connection {i}: {e}")),
                }
            })
        })
        .collect();
    let failed: Vec<String> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap().err())
        .collect();
    let emfile = |p: &Proc| p.count(|l| l.contains("Too many open files"));
    assert!(
        failed.is_empty(),
        "{} of {N} connections failed under descriptor pressure, first: {}; \
         \"Too many open files\" logged {} times by the gateway, {} by the agent",
        failed.len(),
        failed[0],
        emfile(&gw.proc),
        emfile(&a)
    );
}
