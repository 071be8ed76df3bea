//! Harness for end-to-end tests: runs the real `dialback` binary on loopback, reads its JSON
//! logs, and provides echo services and clients. Every wait is bounded.
#![allow(dead_code)]

pub mod procstat;
pub mod relay;
pub mod squid;
pub mod test_agent;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_dialback");

/// A running `dialback` process whose stderr log lines are collected as they arrive.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

/// The runtime every gateway and agent of the suite runs on: `DIALBACK_TEST_RUNTIME=uring`
/// runs the whole end-to-end suite again on the io_uring runtime (scripts/test.sh does both).
pub fn test_runtime() -> &'static str {
    match std::env::var("DIALBACK_TEST_RUNTIME").as_deref() {
        Ok("uring") => "uring",
        Ok("tokio") | Err(_) => "tokio",
        Ok(other) => panic!("DIALBACK_TEST_RUNTIME={other:?}: expected tokio or uring"),
    }
}

impl Proc {
    pub fn start(name: &str, args: &[&str]) -> Proc {
        Proc::start_logging(name, args, "info,dialback_tokio=debug")
    }

    /// As `start`, with `RUST_LOG` set to `rust_log` (a soak keeps per-connection lines out).
    pub fn start_logging(name: &str, args: &[&str], rust_log: &str) -> Proc {
        let serves = matches!(args.first(), Some(&"gateway" | &"agent"));
        let runtime: &[&str] = if serves {
            &["--runtime", test_runtime()]
        } else {
            &[]
        };
        let mut cmd = Command::new(BIN);
        cmd.args(["--log-format", "json"])
            .args(args)
            .args(runtime)
            .env("RUST_LOG", rust_log);
        Proc::spawn(name, cmd)
    }

    /// Runs `cmd` (any program, e.g. inside a network namespace) and collects its stdout and
    /// stderr lines as they arrive.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        for pipe in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let lines = lines.clone();
            let tag = name.to_owned();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("E2E_VERBOSE").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    let (m, cv) = &*lines;
                    m.lock().unwrap().push(line);
                    cv.notify_all();
                }
            });
        }
        Proc {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> Vec<String> {
        self.lines.0.lock().unwrap().clone()
    }

    /// Waits until a log line satisfies `pred`, returning it; panics with the log after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_nth(what, 1, timeout, pred)
    }

    /// Waits until `n` log lines satisfy `pred`; returns the n-th.
    pub fn wait_for_nth(
        &self,
        what: &str,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.lines;
        let mut lines = m.lock().unwrap();
        loop {
            let hits: Vec<&String> = lines.iter().filter(|l| pred(l)).collect();
            if hits.len() >= n {
                return hits[n - 1].clone();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "{}: timed out after {timeout:?} waiting for {what}; log:\n{}",
                    self.name,
                    lines.join("\n")
                );
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pred(l))
            .count()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.name);
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself; returns its exit status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() >= deadline {
                panic!("{} did not exit within {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Field `key` of a JSON log line, as a string.
pub fn field(line: &str, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let f = v.get("fields")?.get(key)?;
    Some(match f {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// The level of a JSON log line: "INFO", "WARN", ...
pub fn level(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get("level")?.as_str().map(str::to_owned)
}

pub fn message_is(line: &str, msg: &str) -> bool {
    field(line, "message").is_some_and(|m| m == msg)
}

pub fn message_contains(line: &str, needle: &str) -> bool {
    field(line, "message").is_some_and(|m| m.contains(needle))
}

pub struct Dir(pub tempfile::TempDir);

impl Dir {
    pub fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

/// Short timers so liveness tests take seconds, not minutes.
pub const FAST_TIMERS: &str = "heartbeat = \"300ms\"\ndead_after = \"1500ms\"\ntoken_ttl = \"2s\"\nhandshake_timeout = \"3s\"\n";

pub struct GatewayConf<'a> {
    pub listen: &'a str,
    /// Timer settings; `FAST_TIMERS` unless a test needs others.
    pub timers: &'a str,
    pub services: &'a [(&'a str, &'a str)], // (name, password)
    pub extra: &'a str,
}

pub fn gateway_toml(dir: &Dir, c: &GatewayConf) -> PathBuf {
    let mut s = format!(
        "listen = \"{}\"\nstate_dir = \"state\"\n{}{}\n",
        c.listen, c.timers, c.extra
    );
    for (name, pw) in c.services {
        s.push_str(&format!(
            "\n[services.{name}]\npassword = \"{pw}\"\ntcp_listen = \"127.0.0.1:0\"\n"
        ));
    }
    dir.write("gateway.toml", &s)
}

pub fn agent_toml(
    dir: &Dir,
    file: &str,
    gateway: SocketAddr,
    fingerprint: &str,
    services: &[(&str, &str, SocketAddr)],
) -> PathBuf {
    let mut s = format!(
        "gateway = \"{gateway}\"\nfingerprint = \"{fingerprint}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nconnect_timeout = \"3s\"\n"
    );
    for (name, pw, local) in services {
        s.push_str(&format!(
            "\n[services.{name}]\npassword = \"{pw}\"\nlocal = \"{local}\"\n"
        ));
    }
    dir.write(file, &s)
}

pub const STARTUP: Duration = Duration::from_secs(20);

/// A started gateway with the addresses it bound.
pub struct RunningGateway {
    pub proc: Proc,
    pub listen: SocketAddr,
    pub fingerprint: String,
    pub config: PathBuf,
}

impl RunningGateway {
    pub fn start(config: &Path) -> RunningGateway {
        let proc = Proc::start("gateway", &["gateway", "-c", config.to_str().unwrap()]);
        if test_runtime() == "uring" {
            proc.wait_for("io_uring data plane", STARTUP, |l| {
                message_is(l, "io_uring data plane started")
            });
        }
        let fp_line = proc.wait_for("fingerprint", STARTUP, |l| {
            field(l, "fingerprint").is_some()
        });
        let fingerprint = field(&fp_line, "fingerprint").unwrap();
        let l = proc.wait_for("listening for agents", STARTUP, |l| {
            message_is(l, "listening for agents")
        });
        let listen = field(&l, "addr").unwrap().parse().unwrap();
        RunningGateway {
            proc,
            listen,
            fingerprint,
            config: config.to_owned(),
        }
    }

    pub fn service_addr(&self, service: &str) -> SocketAddr {
        let l = self.proc.wait_for("service listener", STARTUP, |l| {
            message_is(l, "listening for clients")
                && field(l, "service").as_deref() == Some(service)
        });
        field(&l, "addr").unwrap().parse().unwrap()
    }

    pub fn wait_registered(&self, service: &str, nth: usize) {
        self.proc
            .wait_for_nth("agent registered", nth, STARTUP, |l| {
                message_is(l, "agent registered") && field(l, "service").as_deref() == Some(service)
            });
    }
}

/// An echo server on loopback: every connection gets its bytes back, and a FIN is answered
/// with a FIN once everything was echoed.
pub fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let _ = std::io::copy(&mut s, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// Sends `data`, half-closes, and returns everything read back until EOF.
pub fn roundtrip(addr: SocketAddr, data: Vec<u8>, timeout: Duration) -> Vec<u8> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut out = Vec::new();
    let mut r = s;
    r.read_to_end(&mut out).expect("read echo");
    writer.join().unwrap();
    out
}

/// Retries a small echo through `addr` until it works (the agent may still be registering).
pub fn wait_echo_works(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = (|| -> std::io::Result<bool> {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"ping")?;
            s.shutdown(Shutdown::Write)?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(out == b"ping")
        })();
        if matches!(ok, Ok(true)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "echo through {addr} did not work within {timeout:?}: {ok:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: fast, deterministic, incompressible enough for a relay.
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Sends `data` and reads exactly as many bytes back, without half-closing first: for paths
/// (like squid's CONNECT tunnels) that end the whole tunnel on the first FIN.
pub fn echo_exact(addr: SocketAddr, data: Vec<u8>, timeout: Duration) -> Vec<u8> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let n = data.len();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || w.write_all(&data).unwrap());
    let mut out = vec![0u8; n];
    let mut r = s;
    r.read_exact(&mut out).expect("read echo");
    writer.join().unwrap();
    out
}

/// Headless Chromium (Debian's package), with its own profile directory under a test's `Dir`.
pub struct Chromium {
    bin: &'static str,
    profile: PathBuf,
}

impl Chromium {
    pub fn new(dir: &Dir) -> Chromium {
        let bin = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect(
                "chromium is not installed: scripts/test.sh installs it (apt-get install chromium)",
            );
        Chromium {
            bin,
            profile: dir.path().join("chromium-profile"),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(self.bin);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", self.profile.display()));
        cmd
    }

    /// The DOM of `url` once its scripts have run, and what Chromium wrote to stderr.
    pub fn dump_dom(&self, url: &str) -> (String, String) {
        let out = self.command().arg("--dump-dom").arg(url).output().unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// A screenshot of `url` kept as an artifact in target/artifacts/`name` for people to look
    /// at; panics if none was written.
    pub fn screenshot(&self, url: &str, name: &str, size: &str) {
        let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
        std::fs::create_dir_all(&artifacts).unwrap();
        let shot = artifacts.join(name);
        let _ = std::fs::remove_file(&shot);
        let out = self
            .command()
            .arg(format!("--window-size={size}"))
            .arg(format!("--screenshot={}", shot.display()))
            .arg(url)
            .output()
            .unwrap();
        assert!(
            shot.exists(),
            "no screenshot written: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One echo round trip through `addr` (send, half-close, read to EOF); false on any failure
/// (refused, reset, short or wrong answer).
pub fn try_echo(addr: SocketAddr, msg: &[u8]) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(msg).is_err() || s.shutdown(Shutdown::Write).is_err() {
        return false;
    }
    let mut back = Vec::new();
    s.read_to_end(&mut back).is_ok() && back == msg
}

/// Reads an HTTP request head, through its blank line; `None` if the connection ends first.
pub fn read_request_head(s: &mut TcpStream) -> Option<String> {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// An HTTP/1.1 service on loopback answering every request with `200` and the body
/// `NAME PATH`, then closing.
pub fn http_responder(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let Some(head) = read_request_head(&mut s) else {
                    return;
                };
                let path = head.split(' ').nth(1).unwrap_or("?").to_owned();
                let body = format!("{name} {path}");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

/// `GET path` on a fresh connection to `addr` (`Connection: close`): the status (0 when there
/// is none) and the whole response.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}
