//! What a process holds, read from /proc, for leak checks: distinct TCP sockets (a duplicated
//! descriptor counts once; the unix socket pair of a signal handler does not count), pipe
//! descriptors, all descriptors and resident memory. Also an
//! echo service that counts the connections it holds, and raising the descriptor limit.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// Distinct TCP sockets (listeners included).
    pub sockets: usize,
    /// Pipe descriptors, and distinct pipes among them.
    pub pipes: usize,
    pub distinct_pipes: usize,
    /// Socket descriptors of any kind and state (a closed TCP socket still held counts here).
    pub socket_fds: usize,
    pub fds: usize,
}

/// Inodes of every TCP socket of this network namespace.
fn tcp_inodes() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            if let Some(inode) = line.split_whitespace().nth(9) {
                out.insert(format!("socket:[{inode}]"));
            }
        }
    }
    out
}

pub fn held(pid: u32) -> Held {
    let mut sockets = BTreeSet::new();
    let mut pipe_inodes = BTreeSet::new();
    let (mut pipes, mut fds, mut socket_fds) = (0, 0, 0);
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            fds += 1;
            let t = target.to_string_lossy().into_owned();
            if t.starts_with("socket:") {
                socket_fds += 1;
                sockets.insert(t);
            } else if t.starts_with("pipe:") {
                pipes += 1;
                pipe_inodes.insert(t);
            }
        }
    }
    let tcp = tcp_inodes();
    Held {
        sockets: sockets.intersection(&tcp).count(),
        pipes,
        distinct_pipes: pipe_inodes.len(),
        socket_fds,
        fds,
    }
}

/// Resident memory in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Stable ways the gateway and agent keep descriptors for reuse: empty pipes (up to 64 pairs).
pub const PIPE_STOCK_FDS: usize = 2 * 64;

/// Polls until `pid` holds exactly `want` distinct TCP sockets; returns what it holds then.
/// Panics after `timeout` with the process's TCP sockets listed.
pub fn wait_sockets(pid: u32, who: &str, want: usize, timeout: Duration) -> Held {
    let deadline = Instant::now() + timeout;
    loop {
        let h = held(pid);
        if h.sockets == want {
            return h;
        }
        if Instant::now() >= deadline {
            let ss = std::process::Command::new("ss")
                .args(["-tanp"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let mine: Vec<&str> = ss
                .lines()
                .filter(|l| l.contains(&format!("pid={pid},")))
                .take(40)
                .collect();
            panic!(
                "{who} (pid {pid}) holds {} sockets after {timeout:?}, expected {want}:\n{}",
                h.sockets,
                mine.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Raises this process's descriptor limit (soft and, when allowed, hard) to at least `want`,
/// so that it and the processes it starts afterwards can hold that many. Returns the soft
/// limit in force afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    let pid = std::process::id().to_string();
    let current = || -> (u64, u64) {
        let out = std::process::Command::new("prlimit")
            .args([
                "--pid",
                &pid,
                "--nofile",
                "--raw",
                "--noheadings",
                "-o",
                "SOFT,HARD",
            ])
            .output()
            .expect("prlimit (util-linux)");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|w| {
            if w == "unlimited" {
                u64::MAX
            } else {
                w.parse().unwrap_or(0)
            }
        });
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    let (soft, hard) = current();
    if soft >= want {
        return soft;
    }
    // Raising the hard limit needs privileges; without them, go as far as the hard limit.
    let set = |s: u64, h: u64| {
        std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={s}:{h}")])
            .status()
            .is_ok_and(|st| st.success())
    };
    let raised = if hard >= want {
        set(want, hard)
    } else {
        set(want, want)
    };
    if !raised {
        set(hard, hard);
    }
    current().0
}

/// A stream pattern a `Local::source` repeats forever; clients check what they read against it.
pub fn pattern() -> Arc<Vec<u8>> {
    Arc::new(super::random_bytes(1 << 20, 0x50_0ce))
}

/// A local service on loopback that counts the connections it holds: an echo (every
/// connection gets its bytes back, and a FIN is answered with a FIN once everything was
/// echoed) or a source (writes `pattern()` over and over until the connection fails).
pub struct Local {
    pub addr: SocketAddr,
    live: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

pub type Echo = Local;

impl Local {
    pub fn start() -> Local {
        Local::spawn(None)
    }

    pub fn source() -> Local {
        Local::spawn(Some(pattern()))
    }

    fn spawn(source: Option<Arc<Vec<u8>>>) -> Local {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let live = Arc::new(AtomicUsize::new(0));
        let total = Arc::new(AtomicUsize::new(0));
        let (l2, t2) = (live.clone(), total.clone());
        rt.spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    // Out of descriptors, say: wait instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                l2.fetch_add(1, Ordering::SeqCst);
                t2.fetch_add(1, Ordering::SeqCst);
                let live = l2.clone();
                let source = source.clone();
                tokio::spawn(async move {
                    match source {
                        None => {
                            let (mut r, mut w) = s.split();
                            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                                let _ = w.shutdown().await;
                            }
                        }
                        Some(p) => while s.write_all(&p).await.is_ok() {},
                    }
                    drop(s);
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Local {
            addr,
            live,
            total,
            _rt: rt,
        }
    }

    /// Connections open now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Waits until it holds no connection; panics after `timeout`.
    pub fn wait_idle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.live() != 0 {
            assert!(
                Instant::now() < deadline,
                "the local service still holds {} connections after {timeout:?}",
                self.live()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
