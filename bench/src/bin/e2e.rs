//! End-to-end benchmark harness: direct vs dialback vs rathole 0.5.0 (tcp) on loopback.
//!
//! `cargo run --release -p dialback-bench --bin e2e -- [--smoke] [--out bench/RESULTS.md]`
//!
//! Every child process is held by a guard that kills it on drop (also on panic), and every
//! wait is bounded.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dialback_bench::load::{conn_load, echo_server, open_round_trips, round_trip, ConnStats};
use tokio::net::{TcpListener, TcpStream};

fn progress(msg: &str) {
    eprintln!("[e2e {:>7.1}s] {msg}", start_time().elapsed().as_secs_f64());
}

fn start_time() -> Instant {
    static T: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T.get_or_init(Instant::now)
}

/// Kills and reaps the child when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc, String> {
        let out = std::fs::File::create(log).map_err(|e| format!("{name}: log: {e}"))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{name}: spawn: {e}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "warning: {} (pid {}) not reaped",
            self.name,
            self.child.id()
        );
    }
}

/// Runs a command to completion with a deadline; returns (status ok, stdout).
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<(bool, String), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let out = reader.join().unwrap_or_default();
                return Ok((status.success(), out));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = reader.join();
                return Err(format!("timed out after {limit:?}"));
            }
        }
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS:")
}

/// Private memory: resident anonymous pages (heap, stacks), without the binary's and the
/// shared libraries' file pages that every process of the same program shares.
fn anon_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "RssAnon:")
}

/// CPU time (user + system) a process has used so far, in µs.
fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields counted here start after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    ticks_us(ticks)
}

/// Clock ticks (the unit of /proc's CPU times) in µs.
fn ticks_us(ticks: u64) -> Option<u64> {
    // SAFETY: sysconf only reads a configuration value.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (tick > 0).then(|| ticks * 1_000_000 / tick as u64)
}

/// CPU time of all of a system's own processes (none for direct), in µs.
fn procs_cpu_us(sys: &Running) -> Option<u64> {
    if sys.procs.is_empty() {
        return None;
    }
    sys.procs.iter().map(|(_, p)| cpu_us(p.pid())).sum()
}

fn first_line(cmd: &mut Command) -> String {
    match run_bounded(cmd, Duration::from_secs(10)) {
        Ok((_, out)) => out.lines().next().unwrap_or("").trim().to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

/// `rathole --version` prints "rathole" and then "Build Version:       0.5.0" on another line.
fn rathole_version(bin: &Path) -> String {
    match run_bounded(Command::new(bin).arg("--version"), Duration::from_secs(10)) {
        Ok((_, out)) => out
            .lines()
            .find_map(|l| l.strip_prefix("Build Version:"))
            .map(|v| format!("rathole {} ({})", v.trim(), bin.display()))
            .unwrap_or_else(|| format!("rathole ({})", bin.display())),
        Err(e) => format!("rathole: unknown version ({e})"),
    }
}

// ---------------------------------------------------------------- load generator (see dialback_bench::load)

async fn open_idle(target: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    let mut remaining = n;
    while remaining > 0 {
        let batch = remaining.min(50);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            set.spawn(round_trip(target));
        }
        let mut batch_failed = 0;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(s)) => held.push(s),
                _ => batch_failed += 1,
            }
        }
        failed += batch_failed;
        remaining -= batch;
        // A system that refuses a whole batch (out of descriptors, say) will not take more:
        // report what it held instead of waiting out every remaining timeout.
        if batch_failed == batch {
            failed += remaining;
            break;
        }
    }
    (held, failed)
}

/// Waits (bounded) until something accepts connections on `target`.
async fn wait_ready_http(target: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(target).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_ready(target: SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if round_trip(target).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

// ---------------------------------------------------------------- iperf3

/// (receiver bits/s, bytes received)
fn iperf(port: u16, streams: u32, secs: u32) -> Result<(f64, f64), String> {
    let mut last = String::new();
    for _attempt in 0..3 {
        let mut cmd = Command::new("iperf3");
        cmd.args(["-c", "127.0.0.1", "-p", &port.to_string()])
            .args(["-t", &secs.to_string(), "-P", &streams.to_string()])
            .args(["-J", "--connect-timeout", "3000"]);
        match run_bounded(&mut cmd, Duration::from_secs(secs as u64 + 20)) {
            Ok((_, out)) => {
                let v: serde_json::Value = match serde_json::from_str(&out) {
                    Ok(v) => v,
                    Err(e) => {
                        last = format!("bad JSON: {e}");
                        continue;
                    }
                };
                let sum = &v["end"]["sum_received"];
                if let (Some(bps), Some(bytes)) =
                    (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64())
                {
                    return Ok((bps, bytes));
                }
                last = v["error"].as_str().unwrap_or("no sum_received").to_string();
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last)
}

// ---------------------------------------------------------------- HTTP (wrk against nginx)

#[derive(Clone, Default)]
struct WrkStats {
    per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

/// `wrk --latency` duration like `1.23ms`, `850.00us` or `1.10s`, in microseconds.
fn wrk_duration(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|x| x * scale)
}

fn wrk(url: &str, secs: u32) -> Result<WrkStats, String> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c32", &format!("-d{secs}s"), "--latency", url]);
    let (ok, out) = run_bounded(&mut cmd, Duration::from_secs(u64::from(secs) + 20))?;
    let mut st = WrkStats::default();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => st.per_sec = v.parse().unwrap_or(0.0),
            ["50%", v] => st.p50_us = wrk_duration(v).unwrap_or(f64::NAN),
            ["99%", v] => st.p99_us = wrk_duration(v).unwrap_or(f64::NAN),
            _ => {}
        }
    }
    let errors = out.contains("Non-2xx") || out.contains("Socket errors");
    if !ok || st.per_sec <= 0.0 || errors {
        return Err(format!("wrk {url}: {}", out.trim()));
    }
    Ok(st)
}

/// nginx serving a 1 KiB page on loopback, as the private web service.
fn start_nginx(dir: &Path, port: u16) -> Result<Proc, String> {
    let dir = dir.join("nginx");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir.join("tmp")).map_err(|e| e.to_string())?;
    let page = format!(
        "<!doctype html><title>bench</title><p>{}</p>\n",
        "x".repeat(960)
    );
    std::fs::write(www.join("index.html"), page).map_err(|e| e.to_string())?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n\
         fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
         server {{\n    listen 127.0.0.1:{port};\n    root {d}/www;\n  }}\n}}\n"
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    Proc::spawn(
        "nginx",
        Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path),
        &dir.join("nginx.log"),
    )
}

// ---------------------------------------------------------------- systems

struct Running {
    echo: SocketAddr,
    /// 0: not measured for throughput (the bare relay pair).
    iperf: u16,
    /// The web service forwarded as a raw TCP port, and (dialback only) through `/~~web`.
    web: Option<String>,
    web_prefix: Option<String>,
    /// (role, process) pairs whose RSS is reported; empty for `direct`.
    procs: Vec<(String, Proc)>,
}

/// Two bare relays in a chain, each a process of its own (this binary with `--relay`): accept,
/// connect onwards, copy both ways, nothing else: no authentication, no pool, no encryption.
/// Measured for the connection figures only, as what the simplest tunnel of two relays costs.
fn start_bare_pair(dir: &Path, echo: u16, cmds: &mut Vec<String>) -> Result<Running, String> {
    let me = std::env::current_exe().map_err(|e| format!("bare relays: {e}"))?;
    let (front, back) = (free_port(), free_port());
    let relay = |name: &str, listen: u16, target: u16| {
        Proc::spawn(
            name,
            Command::new(&me).args([
                "--relay",
                &format!("127.0.0.1:{listen}"),
                &format!("127.0.0.1:{target}"),
            ]),
            &dir.join(format!("{}.log", name.replace(' ', "-"))),
        )
    };
    let b = relay("bare relay 2", back, echo)?;
    let f = relay("bare relay 1", front, back)?;
    cmds.push(format!(
        "e2e --relay 127.0.0.1:{back} 127.0.0.1:{echo}; e2e --relay 127.0.0.1:{front} 127.0.0.1:{back}"
    ));
    Ok(Running {
        echo: addr(front),
        iperf: 0,
        web: None,
        web_prefix: None,
        procs: vec![("relay 1".into(), f), ("relay 2".into(), b)],
    })
}

/// One bare relay (see [`start_bare_pair`]) on a single-threaded runtime, the cheapest way
/// tokio has to wait for sockets.
fn serve_relay(listen: SocketAddr, target: SocketAddr) -> i32 {
    serve(
        "relay",
        tokio::runtime::Builder::new_current_thread(),
        async {
            let l = match TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("relay: cannot listen on {listen}: {e}");
                    return 1;
                }
            };
            loop {
                let Ok((mut from, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(mut to) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = from.set_nodelay(true);
                    let _ = to.set_nodelay(true);
                    // Passes each EOF on as a half-close, as the tunnels do.
                    let _ = tokio::io::copy_bidirectional(&mut from, &mut to).await;
                });
            }
        },
    )
}

#[allow(clippy::too_many_arguments)]
fn start_dialback(
    bin: &Path,
    dir: &Path,
    runtime: &str,
    data_tls: bool,
    echo: u16,
    iperf: u16,
    web: Option<u16>,
    cmds: &mut Vec<String>,
) -> Result<Running, String> {
    let dir = dir.join(format!(
        "dialback-{runtime}{}",
        if data_tls { "-tls" } else { "" }
    ));
    let tls = if data_tls { "data_tls = true\n" } else { "" };
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (ctl, pub_echo, pub_iperf) = (free_port(), free_port(), free_port());
    let (pub_web, http) = (free_port(), free_port());
    let web_gw = match web {
        Some(_) => format!(
            "\n[services.web]\npassword = \"bench-web-password\"\ntcp_listen = \"127.0.0.1:{pub_web}\"\n{tls}"
        ),
        None => String::new(),
    };
    let web_agent = match web {
        Some(port) => format!(
            "\n[services.web]\npassword = \"bench-web-password\"\nlocal = \"127.0.0.1:{port}\"\n"
        ),
        None => String::new(),
    };
    let http_section = match web {
        Some(_) => format!("[http]\nlisten = \"127.0.0.1:{http}\"\n\n"),
        None => String::new(),
    };
    let gw = format!(
        "listen = \"127.0.0.1:{ctl}\"\nstate_dir = \"{}\"\n\n{http_section}\
         [services.echo]\npassword = \"bench-echo-password\"\ntcp_listen = \"127.0.0.1:{pub_echo}\"\n{tls}\n\
         [services.iperf]\npassword = \"bench-iperf-password\"\ntcp_listen = \"127.0.0.1:{pub_iperf}\"\n{tls}{web_gw}",
        dir.join("state").display()
    );
    let gw_path = dir.join("gateway.toml");
    std::fs::write(&gw_path, &gw).map_err(|e| e.to_string())?;
    let mut fp_cmd = Command::new(bin);
    fp_cmd.arg("fingerprint").arg("-c").arg(&gw_path);
    let (ok, out) = run_bounded(&mut fp_cmd, Duration::from_secs(30))?;
    let fp = out.trim().to_string();
    if !ok || !fp.starts_with("sha256:") {
        return Err(format!("fingerprint failed: {out}"));
    }
    let agent = format!(
        "gateway = \"127.0.0.1:{ctl}\"\nfingerprint = \"{fp}\"\n\n\
         [services.echo]\npassword = \"bench-echo-password\"\nlocal = \"127.0.0.1:{echo}\"\n\n\
         [services.iperf]\npassword = \"bench-iperf-password\"\nlocal = \"127.0.0.1:{iperf}\"\n{web_agent}"
    );
    let agent_path = dir.join("agent.toml");
    std::fs::write(&agent_path, &agent).map_err(|e| e.to_string())?;
    cmds.push(format!("{} fingerprint -c gateway.toml", bin.display()));
    cmds.push(format!(
        "RUST_LOG=warn {} gateway -c gateway.toml --runtime {runtime}",
        bin.display()
    ));
    cmds.push(format!(
        "RUST_LOG=warn {} agent -c agent.toml --runtime {runtime}",
        bin.display()
    ));
    cmds.push(format!("gateway.toml:\n{gw}"));
    cmds.push(format!("agent.toml:\n{agent}"));
    let g = Proc::spawn(
        "dialback gateway",
        Command::new(bin)
            .env("RUST_LOG", "warn")
            .args(["gateway", "--runtime", runtime, "-c"])
            .arg(&gw_path),
        &dir.join("gateway.log"),
    )?;
    let a = Proc::spawn(
        "dialback agent",
        Command::new(bin)
            .env("RUST_LOG", "warn")
            .args(["agent", "--runtime", runtime, "-c"])
            .arg(&agent_path),
        &dir.join("agent.log"),
    )?;
    Ok(Running {
        echo: addr(pub_echo),
        iperf: pub_iperf,
        web: web.map(|_| format!("http://127.0.0.1:{pub_web}/")),
        web_prefix: web.map(|_| format!("http://127.0.0.1:{http}/~~web/")),
        procs: vec![("gateway".into(), g), ("agent".into(), a)],
    })
}

/// rathole's noise transport key pair, from `rathole --genkey`: (private, public).
fn rathole_keys(bin: &Path) -> Result<(String, String), String> {
    let (ok, out) = run_bounded(Command::new(bin).arg("--genkey"), Duration::from_secs(20))?;
    let keys: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.len() == 44 && l.ends_with('='))
        .collect();
    match (ok, keys.as_slice()) {
        (true, [private, public]) => Ok((private.to_string(), public.to_string())),
        _ => Err(format!("rathole --genkey: unexpected output: {out}")),
    }
}

#[allow(clippy::too_many_arguments)]
fn start_rathole(
    bin: &Path,
    dir: &Path,
    noise: bool,
    echo: u16,
    iperf: u16,
    web: Option<u16>,
    cmds: &mut Vec<String>,
) -> Result<Running, String> {
    let dir = dir.join(if noise { "rathole-noise" } else { "rathole" });
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (ctl, pub_echo, pub_iperf) = (free_port(), free_port(), free_port());
    let pub_web = free_port();
    let (web_server, web_client) = match web {
        Some(port) => (
            format!("\n[server.services.web]\ntoken = \"bench-web-token\"\nbind_addr = \"127.0.0.1:{pub_web}\"\n"),
            format!("\n[client.services.web]\ntoken = \"bench-web-token\"\nlocal_addr = \"127.0.0.1:{port}\"\n"),
        ),
        None => (String::new(), String::new()),
    };
    let (server_transport, client_transport) = if noise {
        let (private, public) = rathole_keys(bin)?;
        cmds.push(format!("{} --genkey", bin.display()));
        (
            format!("[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n\n"),
            format!("[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n\n"),
        )
    } else {
        (String::new(), String::new())
    };
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{ctl}\"\n\n{server_transport}\
         [server.services.echo]\ntoken = \"bench-echo-token\"\nbind_addr = \"127.0.0.1:{pub_echo}\"\n\n\
         [server.services.iperf]\ntoken = \"bench-iperf-token\"\nbind_addr = \"127.0.0.1:{pub_iperf}\"\n{web_server}"
    );
    let client = format!(
        "[client]\nremote_addr = \"127.0.0.1:{ctl}\"\n\n{client_transport}\
         [client.services.echo]\ntoken = \"bench-echo-token\"\nlocal_addr = \"127.0.0.1:{echo}\"\n\n\
         [client.services.iperf]\ntoken = \"bench-iperf-token\"\nlocal_addr = \"127.0.0.1:{iperf}\"\n{web_client}"
    );
    let (sp, cp) = (dir.join("server.toml"), dir.join("client.toml"));
    std::fs::write(&sp, &server).map_err(|e| e.to_string())?;
    std::fs::write(&cp, &client).map_err(|e| e.to_string())?;
    cmds.push(format!(
        "RUST_LOG=warn {} --server server.toml",
        bin.display()
    ));
    cmds.push(format!(
        "RUST_LOG=warn {} --client client.toml",
        bin.display()
    ));
    cmds.push(format!("server.toml:\n{server}"));
    cmds.push(format!("client.toml:\n{client}"));
    let s = Proc::spawn(
        "rathole server",
        Command::new(bin)
            .env("RUST_LOG", "warn")
            .arg("--server")
            .arg(&sp),
        &dir.join("server.log"),
    )?;
    let c = Proc::spawn(
        "rathole client",
        Command::new(bin)
            .env("RUST_LOG", "warn")
            .arg("--client")
            .arg(&cp),
        &dir.join("client.log"),
    )?;
    Ok(Running {
        echo: addr(pub_echo),
        iperf: pub_iperf,
        web: web.map(|_| format!("http://127.0.0.1:{pub_web}/")),
        web_prefix: None,
        procs: vec![("server".into(), s), ("client".into(), c)],
    })
}

// ---------------------------------------------------------------- measuring

/// (role, idle kB, holding kB, after kB)
type RssRow = (String, Option<u64>, Option<u64>, Option<u64>);

#[derive(Default)]
struct Results {
    available: bool,
    note: String,
    tput1: Option<f64>,
    tput4: Option<f64>,
    /// The system's own processes' CPU per GB moved by iperf3 (1 and 4 streams), ms.
    tput1_cpu: Option<f64>,
    tput4_cpu: Option<f64>,
    c1: Option<ConnStats>,
    c32: Option<ConnStats>,
    /// Machine CPU (all cores, kernel included) per connection at concurrency 1 and 32, µs.
    c1_cpu: Option<f64>,
    c32_cpu: Option<f64>,
    /// 16-byte round trips on one connection that is already open.
    open: Option<ConnStats>,
    rss: Vec<RssRow>,
    /// Like `rss`, private (anonymous) memory only.
    anon: Vec<RssRow>,
    held: usize,
    /// (role, RSS kB, private kB) while holding `held_many` connections.
    rss_many: Vec<(String, Option<u64>, Option<u64>)>,
    held_many: usize,
    http_raw: Option<WrkStats>,
    http_prefix: Option<WrkStats>,
}

struct Plan {
    /// Rounds of the speed figures; within a round, every system takes its turn at one metric
    /// before the next metric starts, so slow drifts of the machine hit all systems alike.
    rounds: usize,
    iperf_secs: u32,
    /// wrk runs longer than iperf3: a p99 wants more requests than a few seconds give.
    wrk_secs: u32,
    conn_dur: Duration,
    conn_max: u64,
    idle_conns: usize,
    /// Second, larger step of held connections (10,000 in a full run).
    many_conns: usize,
}

/// One system for the whole run: its processes while it is up, its samples, its results.
struct System {
    name: String,
    sys: Option<Running>,
    r: Results,
    idle: Vec<Option<u64>>,
    idle_anon: Vec<Option<u64>>,
    tput1: Vec<f64>,
    tput4: Vec<f64>,
    tput1_cpu: Vec<f64>,
    tput4_cpu: Vec<f64>,
    c1: Vec<ConnStats>,
    c32: Vec<ConnStats>,
    c1_cpu: Vec<f64>,
    c32_cpu: Vec<f64>,
    open: Vec<ConnStats>,
    http_raw: Vec<WrkStats>,
    http_prefix: Vec<WrkStats>,
}

impl System {
    fn new(name: &str, sys: Option<Running>, note: String) -> System {
        System {
            name: name.to_string(),
            r: Results {
                available: sys.is_some(),
                note,
                ..Default::default()
            },
            sys,
            idle: Vec::new(),
            idle_anon: Vec::new(),
            tput1: Vec::new(),
            tput4: Vec::new(),
            tput1_cpu: Vec::new(),
            tput4_cpu: Vec::new(),
            c1: Vec::new(),
            c32: Vec::new(),
            c1_cpu: Vec::new(),
            c32_cpu: Vec::new(),
            open: Vec::new(),
            http_raw: Vec::new(),
            http_prefix: Vec::new(),
        }
    }

    fn down(name: &str, note: String) -> System {
        System::new(name, None, note)
    }
}

/// Starts a system and waits until its echo service answers. If it never does (a port taken
/// by someone else between choosing and binding it, say), it is started once more, with fresh
/// ports.
async fn bring_up(name: &str, mut start: impl FnMut() -> Result<Running, String>) -> System {
    let mut note = String::new();
    for attempt in 0..2 {
        let mut sys = match start() {
            Ok(s) => s,
            Err(e) => return System::down(name, e),
        };
        progress(&format!("{name}: waiting until the echo service answers"));
        if wait_ready(sys.echo, Duration::from_secs(20)).await {
            return System::new(name, Some(sys), String::new());
        }
        let exited: Vec<String> = sys
            .procs
            .iter_mut()
            .filter_map(|(role, p)| (!p.alive()).then(|| role.clone()))
            .collect();
        note = if exited.is_empty() {
            "did not become ready within 20 s".into()
        } else {
            format!(
                "did not become ready within 20 s ({} exited; its log is in the run's directory)",
                exited.join(", ")
            )
        };
        if attempt == 0 {
            progress(&format!(
                "{name}: {note}; starting it once more with fresh ports"
            ));
        }
    }
    System::down(name, note)
}

#[derive(Clone, Copy)]
enum Metric {
    Tput1,
    Tput4,
    Conn1,
    Conn32,
    Open,
    HttpRaw,
    HttpPrefix,
}

const METRICS: [Metric; 7] = [
    Metric::Tput1,
    Metric::Tput4,
    Metric::Conn1,
    Metric::Conn32,
    Metric::Open,
    Metric::HttpRaw,
    Metric::HttpPrefix,
];

/// One sample of `metric` for system `s`, if it is up and serves what the metric needs.
async fn sample(s: &mut System, metric: Metric, plan: &Plan, round: usize) {
    let Some(sys) = &s.sys else { return };
    let name = format!("{} (round {})", s.name, round + 1);
    if sys.iperf == 0 && matches!(metric, Metric::Tput1 | Metric::Tput4) {
        return;
    }
    match metric {
        Metric::Tput1 | Metric::Tput4 => {
            let streams = if matches!(metric, Metric::Tput1) {
                1
            } else {
                4
            };
            progress(&format!(
                "{name}: iperf3 {streams} stream(s), {} s",
                plan.iperf_secs
            ));
            let (port, secs) = (sys.iperf, plan.iperf_secs);
            let cpu_before = procs_cpu_us(sys);
            match tokio::task::spawn_blocking(move || iperf(port, streams, secs)).await {
                Ok(Ok((bps, bytes))) => {
                    let per_gb = match (cpu_before, procs_cpu_us(sys)) {
                        (Some(a), Some(b)) if bytes > 0.0 => {
                            Some(b.saturating_sub(a) as f64 / 1e3 / (bytes / 1e9))
                        }
                        _ => None,
                    };
                    progress(&format!(
                        "{name}:   {:.2} Gbit/s{}",
                        bps / 1e9,
                        per_gb.map_or(String::new(), |c| format!(", relay CPU {c:.0} ms per GB"))
                    ));
                    let (tput, cpu) = if streams == 1 {
                        (&mut s.tput1, &mut s.tput1_cpu)
                    } else {
                        (&mut s.tput4, &mut s.tput4_cpu)
                    };
                    tput.push(bps);
                    cpu.extend(per_gb);
                }
                Ok(Err(e)) => progress(&format!("{name}: iperf3 failed: {e}")),
                Err(e) => progress(&format!("{name}: iperf3 task failed: {e}")),
            }
        }
        Metric::Conn1 | Metric::Conn32 => {
            let conc = if matches!(metric, Metric::Conn1) {
                1
            } else {
                32
            };
            progress(&format!(
                "{name}: new connections, concurrency {conc}, {:?}",
                plan.conn_dur
            ));
            let busy = machine_busy_us();
            let st = conn_load(sys.echo, conc, plan.conn_dur, plan.conn_max).await;
            let cpu = match (busy, machine_busy_us()) {
                (Some(a), Some(b)) if st.ok > 0 => Some(b.saturating_sub(a) as f64 / st.ok as f64),
                _ => None,
            };
            progress(&format!(
                "{name}:   {} ok, {} errors, {:.0}/s, p50 {:.0} µs, p99 {:.0} µs, machine CPU {:.0} µs per connection",
                st.ok,
                st.errors,
                st.per_sec,
                st.p50_us,
                st.p99_us,
                cpu.unwrap_or(f64::NAN)
            ));
            let (stats, cpus) = if conc == 1 {
                (&mut s.c1, &mut s.c1_cpu)
            } else {
                (&mut s.c32, &mut s.c32_cpu)
            };
            stats.push(st);
            cpus.extend(cpu);
        }
        Metric::Open => {
            progress(&format!(
                "{name}: round trips on one open connection, {:?}",
                plan.conn_dur
            ));
            let st = open_round_trips(sys.echo, plan.conn_dur, plan.conn_max).await;
            progress(&format!(
                "{name}:   {} round trips, {} errors, p50 {:.0} µs, p99 {:.0} µs",
                st.ok, st.errors, st.p50_us, st.p99_us
            ));
            s.open.push(st);
        }
        Metric::HttpRaw | Metric::HttpPrefix => {
            let raw = matches!(metric, Metric::HttpRaw);
            let url = if raw { &sys.web } else { &sys.web_prefix };
            let Some(url) = url.clone() else { return };
            let which = if raw { "raw TCP" } else { "/~~web" };
            progress(&format!(
                "{name}: wrk -t2 -c32 -d{}s {url} ({which})",
                plan.wrk_secs
            ));
            let secs = plan.wrk_secs;
            match tokio::task::spawn_blocking(move || wrk(&url, secs)).await {
                Ok(Ok(st)) => {
                    progress(&format!(
                        "{name}:   {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs",
                        st.per_sec, st.p50_us, st.p99_us
                    ));
                    if raw {
                        &mut s.http_raw
                    } else {
                        &mut s.http_prefix
                    }
                    .push(st);
                }
                Ok(Err(e)) => progress(&format!("{name}: wrk failed: {e}")),
                Err(e) => progress(&format!("{name}: wrk task failed: {e}")),
            }
        }
    }
}

/// CPU time the whole machine spent busy so far (every core, user and kernel, interrupts
/// included), from /proc/stat, in µs.
fn machine_busy_us() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    let busy: u64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    ticks_us(busy)
}

/// The median (the upper one of an even count); `None` without samples.
fn median(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Connection rounds folded into one: every connection and error counted, rate and
/// latencies the medians of the rounds.
fn fold_conns(v: &[ConnStats]) -> Option<ConnStats> {
    if v.is_empty() {
        return None;
    }
    Some(ConnStats {
        ok: v.iter().map(|s| s.ok).sum(),
        errors: v.iter().map(|s| s.errors).sum(),
        per_sec: median(v.iter().map(|s| s.per_sec))?,
        p50_us: median(v.iter().map(|s| s.p50_us)).unwrap_or(f64::NAN),
        p99_us: median(v.iter().map(|s| s.p99_us)).unwrap_or(f64::NAN),
    })
}

fn fold_wrk(v: &[WrkStats]) -> Option<WrkStats> {
    Some(WrkStats {
        per_sec: median(v.iter().map(|s| s.per_sec))?,
        p50_us: median(v.iter().map(|s| s.p50_us)).unwrap_or(f64::NAN),
        p99_us: median(v.iter().map(|s| s.p99_us)).unwrap_or(f64::NAN),
    })
}

/// Measures every system: idle memory first, then the speed figures in interleaved rounds,
/// then, one system at a time, memory while holding connections and after closing them; each
/// system's processes stop after its turn.
async fn measure_all(systems: &mut [System], plan: &Plan) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    for s in systems.iter_mut() {
        if let Some(sys) = &s.sys {
            s.idle = sys.procs.iter().map(|(_, p)| rss_kb(p.pid())).collect();
            s.idle_anon = sys.procs.iter().map(|(_, p)| anon_kb(p.pid())).collect();
        }
    }
    let n = systems.len();
    for round in 0..plan.rounds {
        for metric in METRICS {
            // Each round starts with a different system, so none is always first or last.
            for k in 0..n {
                sample(&mut systems[(k + round) % n], metric, plan, round).await;
            }
        }
    }
    for s in systems.iter_mut() {
        s.r.tput1 = median(s.tput1.iter().copied());
        s.r.tput4 = median(s.tput4.iter().copied());
        s.r.tput1_cpu = median(s.tput1_cpu.iter().copied());
        s.r.tput4_cpu = median(s.tput4_cpu.iter().copied());
        s.r.c1 = fold_conns(&s.c1);
        s.r.c32 = fold_conns(&s.c32);
        s.r.c1_cpu = median(s.c1_cpu.iter().copied());
        s.r.c32_cpu = median(s.c32_cpu.iter().copied());
        s.r.open = fold_conns(&s.open);
        s.r.http_raw = fold_wrk(&s.http_raw);
        s.r.http_prefix = fold_wrk(&s.http_prefix);
        if let Some(sys) = s.sys.take() {
            // The bare relays serve the connection figures only.
            if sys.iperf != 0 {
                hold_and_release(&s.name, sys, plan, &mut s.r, &s.idle, &s.idle_anon).await;
            }
        }
    }
}

/// Memory while holding idle connections and after closing them; stops the system.
async fn hold_and_release(
    name: &str,
    mut sys: Running,
    plan: &Plan,
    r: &mut Results,
    idle: &[Option<u64>],
    idle_anon: &[Option<u64>],
) {
    progress(&format!(
        "{name}: holding {} idle connections",
        plan.idle_conns
    ));
    let (held, failed) = open_idle(sys.echo, plan.idle_conns).await;
    r.held = held.len();
    if failed > 0 {
        progress(&format!("{name}:   {failed} idle connections failed"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let holding: Vec<Option<u64>> = sys.procs.iter().map(|(_, p)| rss_kb(p.pid())).collect();
    let holding_anon: Vec<Option<u64>> = sys.procs.iter().map(|(_, p)| anon_kb(p.pid())).collect();
    progress(&format!(
        "{name}: holding {} idle connections",
        plan.many_conns
    ));
    let (more, failed) = open_idle(sys.echo, plan.many_conns.saturating_sub(r.held)).await;
    r.held_many = r.held + more.len();
    if failed > 0 {
        progress(&format!("{name}:   {failed} more idle connections failed"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (role, p) in &sys.procs {
        r.rss_many
            .push((role.clone(), rss_kb(p.pid()), anon_kb(p.pid())));
    }
    drop(more);
    drop(held);
    // Long enough for a process to hand freed memory back (dialback looks every second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<Option<u64>> = sys.procs.iter().map(|(_, p)| rss_kb(p.pid())).collect();
    let after_anon: Vec<Option<u64>> = sys.procs.iter().map(|(_, p)| anon_kb(p.pid())).collect();
    for (i, (role, p)) in sys.procs.iter_mut().enumerate() {
        if !p.alive() {
            r.note.push_str(&format!("{role} exited during the run; "));
        }
        let at = |v: &[Option<u64>]| v.get(i).copied().flatten();
        r.rss.push((role.clone(), at(idle), holding[i], after[i]));
        r.anon
            .push((role.clone(), at(idle_anon), holding_anon[i], after_anon[i]));
    }
    progress(&format!("{name}: done; stopping its processes"));
    drop(sys);
}

// ---------------------------------------------------------------- reporting

fn gbps(v: Option<f64>) -> String {
    v.map_or("–".into(), |b| format!("{:.2} Gbit/s", b / 1e9))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.2}x"))
}

fn mb(v: Option<u64>) -> String {
    v.map_or("–".into(), |k| format!("{:.1} MB", k as f64 / 1024.0))
}

/// One metric: the label, one cell per system, and the raw values (same order).
type Row = (String, Vec<String>, Vec<Option<f64>>);

/// `sys` is direct first, rathole last, the dialback runtimes in between.
fn table(sys: &[(&str, &Results)]) -> (String, Vec<Row>) {
    let mut rows: Vec<Row> = Vec::new();
    let mut num =
        |label: &str, f: &dyn Fn(&Results) -> Option<f64>, show: &dyn Fn(f64) -> String| {
            let vals: Vec<Option<f64>> = sys
                .iter()
                .map(|(_, r)| if r.available { f(r) } else { None })
                .collect();
            let cells = vals.iter().map(|v| v.map_or("–".into(), show)).collect();
            rows.push((label.to_string(), cells, vals));
        };
    let g = |b: f64| gbps(Some(b));
    let per = |v: f64| format!("{v:.0}/s");
    let us = |v: f64| format!("{v:.0} µs");
    num("iperf3 1 stream", &|r| r.tput1, &g);
    num("iperf3 4 streams", &|r| r.tput4, &g);
    let ms = |v: f64| format!("{v:.0} ms");
    num("relay CPU per GB, iperf3 1 stream", &|r| r.tput1_cpu, &ms);
    num("relay CPU per GB, iperf3 4 streams", &|r| r.tput4_cpu, &ms);
    num(
        "conn/s, concurrency 1",
        &|r| r.c1.as_ref().map(|s| s.per_sec),
        &per,
    );
    num(
        "p50, concurrency 1",
        &|r| r.c1.as_ref().map(|s| s.p50_us),
        &us,
    );
    num(
        "p99, concurrency 1",
        &|r| r.c1.as_ref().map(|s| s.p99_us),
        &us,
    );
    num(
        "conn/s, concurrency 32",
        &|r| r.c32.as_ref().map(|s| s.per_sec),
        &per,
    );
    num(
        "p50, concurrency 32",
        &|r| r.c32.as_ref().map(|s| s.p50_us),
        &us,
    );
    num(
        "p99, concurrency 32",
        &|r| r.c32.as_ref().map(|s| s.p99_us),
        &us,
    );
    num(
        "machine CPU per connection, concurrency 1",
        &|r| r.c1_cpu,
        &us,
    );
    num(
        "machine CPU per connection, concurrency 32",
        &|r| r.c32_cpu,
        &us,
    );
    num(
        "round trip on an open connection, p50",
        &|r| r.open.as_ref().map(|s| s.p50_us),
        &us,
    );
    num(
        "round trip on an open connection, p99",
        &|r| r.open.as_ref().map(|s| s.p99_us),
        &us,
    );
    let rps = |v: f64| format!("{v:.0}/s");
    num(
        "HTTP req/s, raw TCP port (wrk -c32)",
        &|r| r.http_raw.as_ref().map(|s| s.per_sec),
        &rps,
    );
    num(
        "HTTP p99, raw TCP port",
        &|r| r.http_raw.as_ref().map(|s| s.p99_us),
        &us,
    );
    num(
        "HTTP req/s, /~~web prefix (wrk -c32)",
        &|r| r.http_prefix.as_ref().map(|s| s.per_sec),
        &rps,
    );
    num(
        "HTTP p99, /~~web prefix",
        &|r| r.http_prefix.as_ref().map(|s| s.p99_us),
        &us,
    );
    let m = |k: f64| mb(Some(k as u64));
    for (idx, side) in [
        (0usize, "gateway (rathole server)"),
        (1, "agent (rathole client)"),
    ] {
        for (what, pick, private) in [
            ("RSS idle", 1usize, false),
            ("RSS holding idle conns", 2, false),
            ("RSS after closing", 3, false),
            ("private memory idle", 1, true),
            ("private memory holding idle conns", 2, true),
        ] {
            num(
                &format!("{what}, {side}"),
                &|r| {
                    if private { &r.anon } else { &r.rss }
                        .get(idx)
                        .and_then(|x| match pick {
                            1 => x.1,
                            2 => x.2,
                            _ => x.3,
                        })
                        .map(|k| k as f64)
                },
                &m,
            );
        }
    }
    for (idx, side) in [
        (0usize, "gateway (rathole server)"),
        (1, "agent (rathole client)"),
    ] {
        for (what, private) in [("RSS", false), ("private memory", true)] {
            num(
                &format!("{what} holding the larger number of conns, {side}"),
                &|r| {
                    r.rss_many
                        .get(idx)
                        .and_then(|x| if private { x.2 } else { x.1 })
                        .map(|k| k as f64)
                },
                &m,
            );
        }
    }
    num(
        "connections held end to end, larger step",
        &|r| {
            if r.rss.is_empty() && r.held_many == 0 {
                None
            } else {
                Some(r.held_many as f64)
            }
        },
        &|v| format!("{v:.0}"),
    );
    num(
        "connections held end to end",
        &|r| {
            if r.rss.is_empty() && r.held == 0 {
                None
            } else {
                Some(r.held as f64)
            }
        },
        &|v| format!("{v:.0}"),
    );
    let n = sys.len();
    let dialbacks = 1..n - 1;
    let mut out = String::new();
    let mut head = String::from("| metric |");
    for (name, _) in sys {
        head.push_str(&format!(" {name} |"));
    }
    for i in dialbacks.clone() {
        head.push_str(&format!(
            " {} / direct | {} / rathole |",
            sys[i].0, sys[i].0
        ));
    }
    if n == 4 {
        head.push_str(&format!(" {} / {} |", sys[2].0, sys[1].0));
    }
    let _ = writeln!(out, "{head}");
    let cols = head.matches('|').count() - 1;
    let _ = writeln!(out, "|---|{}", "---:|".repeat(cols - 1));
    for (label, cells, vals) in &rows {
        let mut line = format!("| {label} |");
        for c in cells {
            line.push_str(&format!(" {c} |"));
        }
        for i in dialbacks.clone() {
            line.push_str(&format!(
                " {} | {} |",
                fmt_ratio(ratio(vals[i], vals[0])),
                fmt_ratio(ratio(vals[i], vals[n - 1]))
            ));
        }
        if n == 4 {
            line.push_str(&format!(" {} |", fmt_ratio(ratio(vals[2], vals[1]))));
        }
        let _ = writeln!(out, "{line}");
    }
    (out, rows)
}

fn targets(rows: &[Row], rows_enc: &[Row], db: &Results) -> String {
    let find = |l: &str| rows.iter().find(|r| r.0 == l);
    let n = rows.first().map_or(0, |r| r.2.len());
    // (tokio / direct, tokio / rathole, uring / tokio)
    let rel = |r: &Row| -> (Option<f64>, Option<f64>, Option<f64>) {
        let v = &r.2;
        (
            ratio(v[1], v[0]),
            ratio(v[1], v[n - 1]),
            if n == 4 { ratio(v[2], v[1]) } else { None },
        )
    };
    let mut out = String::new();
    let _ = writeln!(out, "| target (DESIGN.md \"Targets\") | this run |");
    let _ = writeln!(out, "|---|---|");
    let mut line = |target: &str, verdict: String| {
        let _ = writeln!(out, "| {target} | {verdict} |");
    };
    let judge = |v: Option<f64>, ok: &dyn Fn(f64) -> bool| match v {
        None => "not measured".to_string(),
        Some(x) => {
            let met = ok(x);
            // Two decimals can show a miss as its bound ("not met (1.00x)"): then show three.
            let shown = format!("{x:.2}");
            let bound_like = shown.parse::<f64>().is_ok_and(|r| ok(r) != met);
            if bound_like {
                format!("{} ({x:.3}x)", if met { "met" } else { "not met" })
            } else {
                format!("{} ({shown}x)", if met { "met" } else { "not met" })
            }
        }
    };
    for l in ["iperf3 1 stream", "iperf3 4 streams"] {
        line(
            &format!("throughput, plain data channel ≥1.5x rathole tcp ({l})"),
            judge(find(l).and_then(|r| rel(r).1), &|x| x >= 1.5),
        );
    }
    line(
        "throughput aim 2x rathole tcp (iperf3 1 stream)",
        judge(find("iperf3 1 stream").and_then(|r| rel(r).1), &|x| {
            x >= 2.0
        }),
    );
    for l in ["conn/s, concurrency 1", "conn/s, concurrency 32"] {
        line(
            &format!("new connections/s ≥2x rathole ({l})"),
            judge(find(l).and_then(|r| rel(r).1), &|x| x >= 2.0),
        );
    }
    line(
        "pooled connect-to-first-byte p50 ≤1.5x direct (concurrency 1, pool = 4)",
        judge(find("p50, concurrency 1").and_then(|r| rel(r).0), &|x| {
            x <= 1.5
        }),
    );
    for (i, side) in ["gateway", "agent"].iter().enumerate() {
        let rss = db.rss.get(i);
        let j = |v: Option<u64>, lim: f64| match v {
            None => "not measured".to_string(),
            Some(k) => {
                let m = k as f64 / 1024.0;
                format!("{} ({m:.1} MB)", if m <= lim { "met" } else { "not met" })
            }
        };
        line(
            &format!("memory ≤4 MB idle, dialback {side}"),
            j(rss.and_then(|x| x.1), 4.0),
        );
        line(
            &format!(
                "memory ≤12 MB holding 1000 connections, dialback {side} ({} held)",
                db.held
            ),
            j(rss.and_then(|x| x.2), 12.0),
        );
        let anon = db.anon.get(i);
        line(
            &format!(
                "memory ≤4 MB idle, dialback {side}, private memory only (RSS minus the \
                 binary's and libraries' shared file pages)"
            ),
            j(anon.and_then(|x| x.1), 4.0),
        );
    }
    for l in [
        "iperf3 1 stream",
        "iperf3 4 streams",
        "conn/s, concurrency 1",
        "conn/s, concurrency 32",
    ] {
        line(
            &format!("io_uring runtime never slower than tokio ({l})"),
            judge(find(l).and_then(|r| rel(r).2), &|x| x >= 1.0),
        );
    }
    for l in ["iperf3 1 stream", "iperf3 4 streams"] {
        let enc = rows_enc.iter().find(|r| r.0 == l);
        line(
            &format!("TLS data channel ≥1.5x rathole noise ({l})"),
            judge(enc.and_then(|r| ratio(r.2[1], r.2[2])), &|x| x >= 1.5),
        );
    }
    {
        let v = |l: &str, i: usize| find(l).and_then(|r| r.2.get(i).copied().flatten());
        let rh_raw = v("HTTP req/s, raw TCP port (wrk -c32)", n.saturating_sub(1));
        line(
            "HTTP through /~~name: requests/s ≥ rathole's raw TCP forwarding",
            judge(
                ratio(v("HTTP req/s, /~~web prefix (wrk -c32)", 1), rh_raw),
                &|x| x >= 1.0,
            ),
        );
        line(
            "HTTP, raw TCP service ≥1.3x rathole (requests/s)",
            judge(
                ratio(v("HTTP req/s, raw TCP port (wrk -c32)", 1), rh_raw),
                &|x| x >= 1.3,
            ),
        );
        let direct_p99 = v("HTTP p99, raw TCP port", 0);
        line(
            "HTTP p99 ≤1.5x direct (raw TCP port)",
            judge(ratio(v("HTTP p99, raw TCP port", 1), direct_p99), &|x| {
                x <= 1.5
            }),
        );
        line(
            "HTTP p99 ≤1.5x direct (/~~name)",
            judge(ratio(v("HTTP p99, /~~web prefix", 1), direct_p99), &|x| {
                x <= 1.5
            }),
        );
    }
    line(
        "10,000 concurrent tunneled connections, dialback tokio",
        match db.rss_many.first() {
            None => "not measured".to_string(),
            Some(_) if db.held_many >= 10_000 => format!("met ({} held)", db.held_many),
            Some(_) => format!("not met ({} held)", db.held_many),
        },
    );
    line(
        "no allocation per relayed chunk",
        "shown by tests, not by this harness: runtime-tokio/tests/alloc.rs, \
         runtime-uring/tests/alloc.rs"
            .into(),
    );
    for t in [] {
        line(t, "not measured by this harness".into());
    }
    out
}

/// The floors under the connection targets, from figures of the same run: what any tunnel
/// (two relays and three TCP connections per client) must at least spend on this machine, and
/// what the bare relay pair (`bare`: accept, connect onwards, copy, nothing else) spends, set
/// against what each target asks for. `asks` is the most a target allows (CPU or time).
fn bounds(rows: &[Row], bare: &Results) -> String {
    let n = rows.first().map_or(0, |r| r.2.len());
    if n < 3 {
        return String::new();
    }
    let v = |l: &str, i: usize| {
        rows.iter()
            .find(|r| r.0 == l)
            .and_then(|r| r.2.get(i).copied().flatten())
    };
    let (direct, db, rh) = (0, 1, n - 1);
    let of_bare = |f: &dyn Fn(&Results) -> Option<f64>| if bare.available { f(bare) } else { None };
    let bare_c1 = of_bare(&|r| r.c1.as_ref().map(|s| s.per_sec));
    let bare_first = of_bare(&|r| r.c1.as_ref().map(|s| s.p50_us));
    let bare_c32_cpu = of_bare(&|r| r.c32_cpu);
    let bare_open = of_bare(&|r| r.open.as_ref().map(|s| s.p50_us));
    // Lower is better for both `asks` and the floors.
    let verdict = |asks: f64, strict: f64, practical: Option<f64>| match practical {
        _ if asks < strict => "**out of reach on this machine**",
        Some(p) if asks < p => "**out of reach even for the bare relay pair**",
        Some(_) => "within reach: the bare relay pair gets there",
        None => "within reach of the floor",
    };
    let shown =
        |x: Option<f64>, unit: &str| x.map_or("–".to_string(), |x| format!("{x:.0} {unit}"));
    let mut out = String::new();
    if let (Some(rate), Some(direct_rate), Some(d), Some(r), Some(t)) = (
        v("conn/s, concurrency 32", rh),
        v("conn/s, concurrency 32", direct),
        v("machine CPU per connection, concurrency 32", direct),
        v("machine CPU per connection, concurrency 32", rh),
        v("machine CPU per connection, concurrency 32", db),
    ) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // Share of all cores kept busy: rate × CPU per connection.
        let busy = |rate: f64, us: f64| 100.0 * rate * us / (cores * 1e6);
        let asks = r / 2.0;
        let _ = writeln!(
            out,
            "- new connections/s ≥2x rathole, concurrency 32 ({:.0}/s): the load keeps the \
             cores busy (direct {:.0}%, rathole {:.0}% of all {cores:.0}), so the rate is the \
             machine's CPU divided by what one connection costs it (all processes, kernel \
             included). Direct, where only the load generator and the echo server work, one \
             connection costs {d:.0} µs; through rathole {r:.0} µs; through dialback tokio \
             {t:.0} µs; through the bare relay pair {}. A tunnel runs that same client and \
             server and its relays besides, so it costs at least {d:.0} µs; twice rathole's rate \
             needs at most {asks:.0} µs: {}.",
            2.0 * rate,
            busy(direct_rate, d),
            busy(rate, r),
            shown(bare_c32_cpu, "µs"),
            verdict(asks, d, bare_c32_cpu)
        );
    }
    if let (Some(rate), Some(open_db), Some(open_rh), Some(open_d)) = (
        v("conn/s, concurrency 1", rh),
        v("round trip on an open connection, p50", db),
        v("round trip on an open connection, p50", rh),
        v("round trip on an open connection, p50", direct),
    ) {
        // As time per connection: 1 / rate.
        let asks = 1e6 / (2.0 * rate);
        let floor = open_db.min(open_rh).min(bare_open.unwrap_or(f64::INFINITY));
        let _ = writeln!(
            out,
            "- new connections/s ≥2x rathole, concurrency 1 ({:.0}/s): one connection at a time, \
             that leaves {asks:.0} µs per connection for connecting, the 16-byte round trip and \
             closing together. The round trip alone, on a connection already open through the \
             tunnel, takes {open_db:.0} µs through dialback, {open_rh:.0} µs through rathole and \
             {} through the bare relay pair ({open_d:.0} µs direct): each relay must wake up and \
             pass the bytes on, both ways. The bare relay pair makes {}: {}.",
            2.0 * rate,
            shown(bare_open, "µs"),
            shown(bare_c1, "connections/s"),
            verdict(asks, floor, bare_c1.map(|c| 1e6 / c))
        );
    }
    if let (Some(first_d), Some(open_db), Some(open_rh)) = (
        v("p50, concurrency 1", direct),
        v("round trip on an open connection, p50", db),
        v("round trip on an open connection, p50", rh),
    ) {
        let asks = 1.5 * first_d;
        let floor = open_db.min(open_rh).min(bare_open.unwrap_or(f64::INFINITY));
        let _ = writeln!(
            out,
            "- pooled connect-to-first-byte p50 ≤1.5x direct: direct takes {first_d:.0} µs, so \
             the target asks for {asks:.0} µs. A round trip on a tunneled connection that is \
             already open, with nothing left to set up, takes {floor:.0} µs at the least \
             ({:.2}x direct's connect-to-first-byte); the bare relay pair's connect-to-first-byte \
             is {}: {}.",
            floor / first_d,
            shown(bare_first, "µs"),
            verdict(asks, floor, bare_first)
        );
    }
    out
}

// ---------------------------------------------------------------- chart

/// One bar: label, ratio (dialback / peer, higher is better), target (if any).
type Bar = (String, Option<f64>, Option<f64>);

fn bars(rows: &[Row], rows_enc: &[Row]) -> Vec<Bar> {
    let n = rows.first().map_or(0, |r| r.2.len());
    let get = |rows: &[Row], l: &str| rows.iter().find(|r| r.0 == l).cloned();
    let mut out: Vec<Bar> = Vec::new();
    for (label, metric, target, lower_is_better) in [
        ("throughput, 1 stream", "iperf3 1 stream", Some(1.5), false),
        (
            "throughput, 4 streams",
            "iperf3 4 streams",
            Some(1.5),
            false,
        ),
        (
            "conn/s, concurrency 1",
            "conn/s, concurrency 1",
            Some(2.0),
            false,
        ),
        (
            "conn/s, concurrency 32",
            "conn/s, concurrency 32",
            Some(2.0),
            false,
        ),
        (
            "p50 latency, conc. 1 (inverse)",
            "p50, concurrency 1",
            None,
            true,
        ),
        (
            "gateway RSS, idle conns (inverse)",
            "RSS holding idle conns, gateway (rathole server)",
            None,
            true,
        ),
    ] {
        let Some(r) = get(rows, metric) else { continue };
        for (i, rt) in [(1usize, "tokio"), (2, "uring")] {
            if i >= n.saturating_sub(1) {
                continue;
            }
            let v = if lower_is_better {
                ratio(r.2[n - 1], r.2[i])
            } else {
                ratio(r.2[i], r.2[n - 1])
            };
            out.push((format!("{label}, {rt} vs rathole tcp"), v, target));
        }
    }
    for (label, metric) in [
        ("TLS throughput, 1 stream", "iperf3 1 stream"),
        ("TLS throughput, 4 streams", "iperf3 4 streams"),
    ] {
        if let Some(r) = get(rows_enc, metric) {
            out.push((
                format!("{label}, data_tls vs rathole noise"),
                ratio(r.2[1], r.2[2]),
                Some(1.5),
            ));
        }
    }
    out
}

/// A horizontal bar chart of the ratios against rathole, with parity and the targets marked.
fn chart_svg(bars: &[Bar], subtitle: &str) -> String {
    let (left, width, row_h, top) = (350.0, 420.0, 26.0, 70.0);
    let max = bars
        .iter()
        .filter_map(|b| b.1)
        .chain(bars.iter().filter_map(|b| b.2))
        .fold(2.5f64, f64::max)
        .ceil();
    let x = |v: f64| left + width * (v / max);
    let h = top + row_h * bars.len() as f64 + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#,
        w = left + width + 60.0
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="10" y="22" font-size="16" font-weight="bold">dialback relative to rathole 0.5.0 (higher is better)</text>"#
    );
    let _ = writeln!(
        svg,
        r##"<text x="10" y="42" fill="#555">{subtitle}</text>"##
    );
    for t in 0..=(max as u32) {
        let tx = x(f64::from(t));
        let _ = writeln!(
            svg,
            r##"<line x1="{tx}" y1="{top}" x2="{tx}" y2="{y2}" stroke="{c}" stroke-width="{sw}"/><text x="{tx}" y="{ty}" text-anchor="middle" fill="#555">{t}x</text>"##,
            y2 = h - 35.0,
            ty = h - 20.0,
            c = if t == 1 { "#333" } else { "#ddd" },
            sw = if t == 1 { 1.5 } else { 1.0 }
        );
    }
    for (i, (label, v, target)) in bars.iter().enumerate() {
        let y = top + row_h * i as f64 + 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{lx}" y="{ty}" text-anchor="end">{label}</text>"##,
            lx = left - 8.0,
            ty = y + 13.0
        );
        match v {
            Some(v) => {
                let met = target.is_none_or(|t| *v >= t);
                let _ = writeln!(
                    svg,
                    r##"<rect x="{left}" y="{y}" width="{bw:.1}" height="{bh}" fill="{c}"/><text x="{vx:.1}" y="{ty}" fill="#222">{v:.2}x</text>"##,
                    bw = (x(*v) - left).max(1.0),
                    bh = row_h - 8.0,
                    c = if met { "#4a8f4a" } else { "#c0504d" },
                    vx = x(*v) + 4.0,
                    ty = y + 13.0
                );
            }
            None => {
                let _ = writeln!(
                    svg,
                    r##"<text x="{lx}" y="{ty}" fill="#999">not measured</text>"##,
                    lx = left + 4.0,
                    ty = y + 13.0
                );
            }
        }
        if let Some(t) = target {
            let tx = x(*t);
            let _ = writeln!(
                svg,
                r##"<line x1="{tx:.1}" y1="{y1}" x2="{tx:.1}" y2="{y2}" stroke="#000" stroke-dasharray="3,2" stroke-width="1.5"/>"##,
                y1 = y - 2.0,
                y2 = y + row_h - 6.0
            );
        }
    }
    let _ = writeln!(
        svg,
        r##"<text x="10" y="{y}" fill="#555">green: DESIGN.md target met (dashed mark) or no target; red: target not met. "inverse": rathole / dialback.</text>"##,
        y = h - 4.0
    );
    svg.push_str("</svg>\n");
    svg
}

// ---------------------------------------------------------------- main

fn find_rathole() -> Option<PathBuf> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        cands.push(PathBuf::from(h).join("bin/rathole"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        cands.push(PathBuf::from(h).join(".cargo/bin/rathole"));
    }
    if let Some(p) = std::env::var_os("PATH") {
        cands.extend(std::env::split_paths(&p).map(|d| d.join("rathole")));
    }
    cands.into_iter().find(|p| p.is_file())
}

fn install_rathole() -> Option<PathBuf> {
    progress("rathole not found: `cargo install rathole --version 0.5.0` (limit 6 min)");
    let mut cmd = Command::new("cargo");
    cmd.args(["install", "rathole", "--version", "0.5.0"]);
    match run_bounded(&mut cmd, Duration::from_secs(360)) {
        Ok((true, _)) => find_rathole(),
        Ok((false, _)) => {
            progress("rathole install failed");
            None
        }
        Err(e) => {
            progress(&format!("rathole install: {e}"));
            None
        }
    }
}

/// Each held connection costs descriptors in this process (client and echo ends) and in the
/// systems under test; children inherit the limit raised here.
fn raise_fd_limit() {
    let want: libc::rlim_t = 65_536;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: want.max(lim.rlim_cur),
            rlim_max: want.max(lim.rlim_max),
        };
        // Raising the hard limit needs privileges; without them, use what the hard limit allows.
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// 10,000, or as many as the open-file limit lets every process hold: a held connection costs
/// a relay two descriptors on each side (rathole's server and client likewise), and the limit
/// cannot be raised past the hard limit without CAP_SYS_RESOURCE.
fn many_conns_allowed() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    let n = 10_000.min(soft.saturating_sub(1_000) / 2);
    if n < 10_000 {
        progress(&format!(
            "open-file limit {soft}: the larger step holds {n} connections, not 10,000"
        ));
    }
    n
}

/// Runs `service` (one of the harness's own helper processes) to its exit status on a runtime
/// from `builder`.
fn serve(
    what: &str,
    mut builder: tokio::runtime::Builder,
    service: impl std::future::Future<Output = i32>,
) -> i32 {
    match builder.enable_all().build() {
        Ok(rt) => rt.block_on(service),
        Err(e) => {
            eprintln!("{what}: tokio runtime: {e}");
            1
        }
    }
}

fn serve_echo(at: &[SocketAddr]) -> i32 {
    serve(
        "echo server",
        tokio::runtime::Builder::new_multi_thread(),
        async {
            let mut servers = Vec::new();
            for &a in at {
                match TcpListener::bind(a).await {
                    // On a worker thread: accepting in `block_on` (the main thread) would wake a
                    // second thread for every connection.
                    Ok(l) => servers.push(tokio::spawn(echo_server(l))),
                    Err(e) => {
                        eprintln!("echo server: cannot listen on {a}: {e}");
                        return 1;
                    }
                }
            }
            for s in servers {
                let _ = s.await;
            }
            0
        },
    )
}

fn main() {
    start_time();
    raise_fd_limit();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, listen, target] = args.as_slice() {
        if flag == "--relay" {
            let code = match (listen.parse(), target.parse()) {
                (Ok(l), Ok(t)) => serve_relay(l, t),
                _ => {
                    eprintln!("usage: e2e --relay LISTEN TARGET (two socket addresses)");
                    2
                }
            };
            std::process::exit(code);
        }
    }
    if let [flag, at @ ..] = args.as_slice() {
        if flag == "--echo-server" {
            // The private echo service, started by the harness itself as a separate process.
            let code = match at
                .iter()
                .map(|a| a.parse::<SocketAddr>().map_err(|e| format!("{a}: {e}")))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(at) if !at.is_empty() => serve_echo(&at),
                Ok(_) => {
                    eprintln!("--echo-server needs at least one address");
                    2
                }
                Err(e) => {
                    eprintln!("--echo-server {e}");
                    2
                }
            };
            std::process::exit(code);
        }
    }
    let mut smoke = false;
    let mut out_path = PathBuf::from("bench/RESULTS.md");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smoke" => smoke = true,
            "--out" => match it.next() {
                Some(p) => out_path = PathBuf::from(p),
                None => {
                    eprintln!("--out needs a path");
                    std::process::exit(2);
                }
            },
            "-h" | "--help" => {
                println!("usage: e2e [--smoke] [--out bench/RESULTS.md]");
                return;
            }
            other => {
                eprintln!("unknown argument {other}; usage: e2e [--smoke] [--out FILE]");
                std::process::exit(2);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(run(smoke, &out_path));
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

async fn run(smoke: bool, out_path: &Path) -> i32 {
    let plan = if smoke {
        Plan {
            rounds: 1,
            iperf_secs: 1,
            wrk_secs: 1,
            conn_dur: Duration::from_millis(300),
            conn_max: 2000,
            idle_conns: 100,
            many_conns: 300,
        }
    } else {
        Plan {
            rounds: 5,
            iperf_secs: 2,
            wrk_secs: 4,
            conn_dur: Duration::from_millis(1500),
            // Well under the 28k ephemeral ports of a default Linux: a run that nearly
            // exhausts them (direct loopback makes ~18k/s) measures the port search of
            // connect(2), not the system.
            conn_max: 12_000,
            idle_conns: 1000,
            many_conns: many_conns_allowed(),
        }
    };
    let root = std::env::var("CARGO_MANIFEST_DIR")
        .map(|d| PathBuf::from(d).join(".."))
        .unwrap_or_else(|_| PathBuf::from("."));
    let dir = std::env::temp_dir().join(format!("dialback-e2e-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mut cmds: Vec<String> = Vec::new();

    progress("building dialback: cargo build --release -p dialback");
    let mut build = Command::new("cargo");
    build
        .args(["build", "--release", "-p", "dialback"])
        .current_dir(&root);
    match run_bounded(&mut build, Duration::from_secs(900)) {
        Ok((true, _)) => {}
        Ok((false, _)) | Err(_) => {
            eprintln!("cargo build --release failed");
            return 1;
        }
    }
    cmds.push("cargo build --release -p dialback".into());
    let dialback_bin = root.join("target/release/dialback");

    let rathole = match find_rathole() {
        Some(p) => Some(p),
        None if smoke => {
            progress("rathole not installed: skipped in --smoke");
            None
        }
        None => install_rathole(),
    };
    cmds.push("cargo install rathole --version 0.5.0   # without --locked".into());

    let versions = vec![
        first_line(Command::new(&dialback_bin).arg("--version")),
        rathole
            .as_ref()
            .map(|p| rathole_version(p))
            .unwrap_or_else(|| "rathole: unavailable".into()),
        first_line(Command::new("iperf3").arg("--version")),
        first_line(Command::new("rustc").arg("--version")),
    ];

    // Private services: an echo server and an iperf3 server, each a process of its own, as a
    // service is: an echo task inside the load generator's runtime would answer without any
    // process waking up, a baseline no real client and server have.
    //
    // Each system gets a port of its own: a connection-rate run leaves tens of thousands of
    // connections in TIME_WAIT towards the port it reached (nearly the whole ephemeral range),
    // and a system whose agent then had to find free ports towards the same one would pay
    // for the previous system's run.
    let echo_ports: [u16; 7] = std::array::from_fn(|_| free_port());
    let _echo_srv = match std::env::current_exe()
        .map_err(|e| format!("echo server: {e}"))
        .and_then(|me| {
            Proc::spawn(
                "echo server",
                Command::new(me)
                    .arg("--echo-server")
                    .args(echo_ports.iter().map(|p| format!("127.0.0.1:{p}"))),
                &dir.join("echo-server.log"),
            )
        }) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    for p in echo_ports {
        if !wait_ready(addr(p), Duration::from_secs(10)).await {
            eprintln!("the echo server did not answer on 127.0.0.1:{p} within 10 s");
            return 1;
        }
    }
    let [echo_direct, echo_tokio, echo_uring, echo_rathole, echo_tls, echo_noise, echo_bare] =
        echo_ports;
    let iperf_port = free_port();
    let iperf_srv = match Proc::spawn(
        "iperf3 server",
        Command::new("iperf3").args(["-s", "-B", "127.0.0.1", "-p", &iperf_port.to_string()]),
        &dir.join("iperf3-server.log"),
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    cmds.push(format!("iperf3 -s -B 127.0.0.1 -p {iperf_port}"));
    cmds.push(format!(
        "iperf3 -c 127.0.0.1 -p <port> -t {} -P <1|4> -J --connect-timeout 3000",
        plan.iperf_secs
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The web service for the HTTP rows: nginx, measured with wrk (both optional).
    let have = |bin: &str| {
        Command::new(bin)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    let web_port = free_port();
    let nginx = if have("nginx") && have("wrk") {
        match start_nginx(&dir, web_port) {
            Ok(p) => {
                cmds.push(format!(
                    "nginx -p DIR -c nginx.conf   # 1 KiB page on 127.0.0.1:{web_port}"
                ));
                cmds.push(format!(
                    "wrk -t2 -c32 -d{}s --latency http://<public address>/",
                    plan.wrk_secs
                ));
                Some(p)
            }
            Err(e) => {
                progress(&format!("nginx: {e}; HTTP rows skipped"));
                None
            }
        }
    } else {
        progress("nginx or wrk not installed: HTTP rows skipped");
        None
    };
    let web_port = nginx.as_ref().map(|_| web_port);
    if web_port.is_some() {
        wait_ready_http(addr(web_port.unwrap_or(0))).await;
    }
    // Every system is started first and stays up (idle) while the others are measured, so
    // that the speed figures can be taken in interleaved rounds.
    let mut systems = vec![
        bring_up("direct", || {
            Ok(Running {
                echo: addr(echo_direct),
                iperf: iperf_port,
                web: web_port.map(|p| format!("http://127.0.0.1:{p}/")),
                web_prefix: None,
                procs: Vec::new(),
            })
        })
        .await,
    ];
    for (runtime, echo_port) in [("tokio", echo_tokio), ("uring", echo_uring)] {
        let name = format!("dialback {runtime}");
        progress(&format!("{name}: starting gateway and agent"));
        systems.push(
            bring_up(&name, || {
                start_dialback(
                    &dialback_bin,
                    &dir,
                    runtime,
                    false,
                    echo_port,
                    iperf_port,
                    web_port,
                    &mut cmds,
                )
            })
            .await,
        );
    }
    let no_rathole = || "rathole 0.5.0 unavailable (not installed / install failed)".to_string();
    systems.push(match &rathole {
        Some(bin) => {
            progress("rathole: starting server and client");
            bring_up("rathole", || {
                start_rathole(
                    bin,
                    &dir,
                    false,
                    echo_rathole,
                    iperf_port,
                    web_port,
                    &mut cmds,
                )
            })
            .await
        }
        None => System::down("rathole", no_rathole()),
    });
    // Encrypted data channels: dialback's data_tls against rathole's noise transport.
    progress("dialback tokio, data_tls: starting gateway and agent");
    systems.push(
        bring_up("dialback tokio data_tls", || {
            start_dialback(
                &dialback_bin,
                &dir,
                "tokio",
                true,
                echo_tls,
                iperf_port,
                None,
                &mut cmds,
            )
        })
        .await,
    );
    systems.push(match &rathole {
        Some(bin) => {
            progress("rathole noise: starting server and client");
            bring_up("rathole noise", || {
                start_rathole(bin, &dir, true, echo_noise, iperf_port, None, &mut cmds)
            })
            .await
        }
        None => System::down("rathole noise", no_rathole()),
    });
    progress("bare relay pair: starting two relays");
    systems.push(
        bring_up("bare relay pair", || {
            start_bare_pair(&dir, echo_bare, &mut cmds)
        })
        .await,
    );
    measure_all(&mut systems, &plan).await;
    let mut results = systems.into_iter().map(|s| (s.name, s.r));
    let mut next = || results.next().map(|(_, r)| r).unwrap_or_default();
    let direct = next();
    let runtimes = vec![
        ("dialback tokio".to_string(), next()),
        ("dialback uring".to_string(), next()),
    ];
    let rh = next();
    let db_tls = next();
    let rh_noise = next();
    let bare = next();
    let db = &runtimes[0].1;
    drop(iperf_srv);
    drop(nginx);

    let mut systems: Vec<(&str, &Results)> = vec![("direct", &direct)];
    for (name, r) in &runtimes {
        systems.push((name, r));
    }
    systems.push(("rathole tcp", &rh));
    let (tbl, rows) = table(&systems);
    let encrypted: Vec<(&str, &Results)> = vec![
        ("direct", &direct),
        ("dialback tokio data_tls", &db_tls),
        ("rathole noise", &rh_noise),
    ];
    let (tbl_enc, rows_enc) = table(&encrypted);
    let tgt = targets(&rows, &rows_enc, db);
    println!("{tbl}");
    println!("{tbl_enc}");
    println!("{tgt}");
    for (n, r) in systems.iter().chain(&encrypted[1..]) {
        if !r.available || !r.note.is_empty() {
            println!(
                "{n}: {}",
                if r.note.is_empty() {
                    "unavailable"
                } else {
                    &r.note
                }
            );
        }
    }

    let machine = format!(
        "- nproc: {}\n- kernel: {}\n- date: {}\n- load average at the end: {}",
        first_line(&mut Command::new("nproc")),
        first_line(Command::new("uname").arg("-srm")),
        first_line(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# End-to-end benchmark results{}\n",
        if smoke {
            " (SMOKE RUN: not a measurement)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "Generated by `cargo run --release -p dialback-bench --bin e2e --{}`; \
         all systems measured in one run on 127.0.0.1. Other work may have been running on \
         the machine at the same time (see the load average), so treat single figures with \
         care; the ratios come from the same run.\n",
        if smoke { " --smoke" } else { "" }
    );
    let _ = writeln!(md, "## Machine\n\n{machine}\n");
    let _ = writeln!(md, "## Versions\n");
    for v in &versions {
        let _ = writeln!(md, "- {v}");
    }
    let _ = writeln!(
        md,
        "\n## Method\n\n\
         - every system is started first and stays up; the speed figures (throughput, new \
         connections, HTTP) are taken in {} rounds, and within a round every system takes its \
         turn at one metric before the next metric starts (each round starting with another \
         system), so that a slow drift of the machine hits all systems alike. Each figure is \
         the median of the rounds (failed connections: the sum).\n\
         - throughput: iperf3 server on 127.0.0.1 as the private service; the client goes \
         direct or through the public port; {} s per run, 1 and 4 streams; receiver bits/s \
         from `-J`. Relay CPU per GB: the user and system time of the system's own processes \
         (dialback's gateway and agent, rathole's server and client) during the run, divided by \
         the bytes moved; the iperf3 ends are not counted. On loopback the iperf3 client and \
         server share the cores with the relays, so throughput also depends on what the relays \
         leave them; this row is the relays' own cost, the figure that sets a gateway's \
         throughput per core when the clients and services are other machines.\n\
         - new connections: the harness's tokio load generator (connect, send 16 bytes, read \
         the 16-byte echo, close) against an echo server, a process of its own (the harness \
         binary with `--echo-server`) listening on a port per system, so that the thousands of \
         connections one run leaves in TIME_WAIT do not slow the next system's connects to the \
         same port; concurrency 1 and 32, \
         {:?} or {} connections per run, whichever ends first; latency is connect start to the \
         echoed bytes. Machine CPU per connection: the busy time of every core during the run \
         (user, kernel and interrupts, from /proc/stat) divided by its connections; the other \
         systems stay up, idle.\n\
         - round trip on an open connection: one connection, then 16-byte round trips on it for \
         {:?} (at most {} of them): what the relays add to every exchange once a connection \
         stands.\n\
         - HTTP: wrk -t2 -c32, {} s per run, against nginx serving a 1 KiB page.\n\
         - memory: VmRSS from /proc/PID/status at idle (after one round trip), while holding \
         {} idle connections (each with one completed round trip), and 3 s after closing \
         them; also RssAnon, the private memory (heap, stacks): VmRSS adds the file pages of the \
         binary and the shared libraries it touched, which every process of the program \
         shares.\n\
         - dialback uses the plain (non-TLS) data channel (`data_tls = false`) and the default \
         pool of 4 ready data connections, RUST_LOG=warn; `dialback tokio` and `dialback uring` \
         differ only in `--runtime`. rathole uses its tcp transport, RUST_LOG=warn.\n\
         - encrypted: dialback with `data_tls = true` (rustls, TLS 1.3, user-space copies; no \
         kernel TLS on this kernel) against rathole's noise transport (keys from `--genkey`).\n",
        plan.rounds,
        plan.iperf_secs,
        plan.conn_dur,
        plan.conn_max,
        plan.conn_dur,
        plan.conn_max,
        plan.wrk_secs,
        plan.idle_conns
    );
    let _ = writeln!(md, "## Results\n\n### Plain data channel\n\n{tbl}");
    let _ = writeln!(
        md,
        "### Encrypted data channel (dialback `data_tls = true`: rustls; rathole: noise)\n\n{tbl_enc}"
    );
    for (n, r) in systems.iter().chain(&encrypted[1..]) {
        if !r.available || !r.note.is_empty() {
            let _ = writeln!(
                md,
                "- {n}: {}",
                if r.note.is_empty() {
                    "unavailable"
                } else {
                    &r.note
                }
            );
        }
        for (c, s) in [(1, &r.c1), (32, &r.c32)] {
            if let Some(s) = s {
                if s.errors > 0 {
                    let _ = writeln!(
                        md,
                        "- {n}: {} failed connections at concurrency {c}",
                        s.errors
                    );
                }
            }
        }
    }
    let chart_path = out_path.with_extension("svg");
    let chart = chart_svg(
        &bars(&rows, &rows_enc),
        &format!(
            "{} · {} · load average at the end {}",
            first_line(Command::new("date").args(["-u", "+%Y-%m-%d"])),
            first_line(Command::new("uname").arg("-sr")),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .next()
                .unwrap_or("?")
        ),
    );
    if let Err(e) = std::fs::write(&chart_path, chart) {
        eprintln!("writing {}: {e}", chart_path.display());
        return 1;
    }
    let chart_name = chart_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let _ = writeln!(md, "![dialback relative to rathole]({chart_name})\n");
    let _ = writeln!(md, "\n## Targets\n\n{tgt}");
    let bnd = bounds(&rows, &bare);
    if !bnd.is_empty() {
        let _ = writeln!(
            md,
            "## What bounds the connection targets\n\n\
             Floors that no tunnel with two relays gets under on this machine, from figures of \
             this run, and what the simplest such tunnel reaches: the bare relay pair, two \
             processes of this harness (`--relay`) that accept, connect onwards and copy both \
             ways on a single-threaded tokio runtime, with no authentication, no pool and no \
             encryption, measured in the same rounds.\n\n{bnd}"
        );
    }
    let _ = writeln!(md, "## Exact commands\n\n```");
    for c in &cmds {
        let _ = writeln!(md, "{c}");
    }
    let _ = writeln!(md, "```");
    if let Err(e) = std::fs::write(out_path, md) {
        eprintln!("writing {}: {e}", out_path.display());
        return 1;
    }
    progress(&format!("wrote {}", out_path.display()));
    // A smoke run judges no speed, but every dialback runtime must have carried traffic.
    let mut broken = Vec::new();
    for (name, r) in &runtimes {
        let works = r.available
            && r.tput1.is_some()
            && r.c1.as_ref().is_some_and(|c| c.ok > 0 && c.errors == 0)
            && r.c32.as_ref().is_some_and(|c| c.ok > 0 && c.errors == 0)
            && r.held == plan.idle_conns;
        if !works {
            broken.push(name.as_str());
        }
    }
    if !(db_tls.available
        && db_tls
            .c1
            .as_ref()
            .is_some_and(|c| c.ok > 0 && c.errors == 0))
    {
        broken.push("dialback tokio data_tls");
    }
    if !broken.is_empty() {
        eprintln!(
            "not working end to end: {}; logs kept in {}",
            broken.join(", "),
            dir.display()
        );
        return 1;
    }
    let _ = std::fs::remove_dir_all(&dir);
    0
}
