//! Real squid proxies for the proxy-cascade tests: Basic auth via basic_ncsa_auth and an
//! htpasswd file, NTLM via squid's ntlm_fake_auth helper, or no auth. Loopback only.

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub enum SquidAuth {
    None,
    Basic {
        user: &'static str,
        password: &'static str,
    },
    Ntlm,
}

pub struct Squid {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

const SQUID: &str = "/usr/sbin/squid";
const HELPERS: &str = "/usr/lib/squid";

fn proxy_uid() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("proxy:"))
        .expect("no 'proxy' user: install squid (scripts/test.sh does)");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Squid {
    pub fn start(auth: SquidAuth) -> Squid {
        assert!(
            std::path::Path::new(SQUID).exists(),
            "squid is not installed: run scripts/test.sh (it installs squid) or apt-get install squid"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let (uid, gid) = proxy_uid();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        chown(&d, Some(uid), Some(gid)).unwrap();
        let auth_conf = match auth {
            SquidAuth::None => "http_access allow localhost\nhttp_access deny all\n".to_owned(),
            SquidAuth::Basic { user, password } => {
                let ok = Command::new("htpasswd")
                    .args(["-bc", d.join("htpasswd").to_str().unwrap(), user, password])
                    .stderr(Stdio::null())
                    .status()
                    .expect("htpasswd (apache2-utils) is needed");
                assert!(ok.success());
                format!(
                    "auth_param basic program {HELPERS}/basic_ncsa_auth {}\nauth_param basic children 2\nauth_param basic realm dialback-test\nacl authed proxy_auth REQUIRED\nhttp_access allow authed\nhttp_access deny all\n",
                    d.join("htpasswd").display()
                )
            }
            SquidAuth::Ntlm => format!(
                "auth_param ntlm program {HELPERS}/ntlm_fake_auth\nauth_param ntlm children 2\nacl authed proxy_auth REQUIRED\nhttp_access allow authed\nhttp_access deny all\n"
            ),
        };
        let mut last_err = String::new();
        // The port is picked free and then bound by squid; retry if another process took it.
        for _ in 0..5 {
            let port = free_port();
            let conf = format!(
                "http_port 127.0.0.1:{port}\npid_filename {d}/squid.pid\ncache_log {d}/cache.log\naccess_log stdio:{d}/access.log\ncache_store_log none\ncache deny all\ncache_mem 8 MB\ncoredump_dir {d}\nvisible_hostname dialback-test\nshutdown_lifetime 1 seconds\ncache_effective_user proxy\n{auth_conf}",
                d = d.display()
            );
            let conf_path = d.join("squid.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let mut child = Command::new(SQUID)
                .args(["-N", "-f", conf_path.to_str().unwrap()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start squid");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Some(st) = child.try_wait().unwrap() {
                    last_err = format!(
                        "squid exited with {st}: {}",
                        std::fs::read_to_string(d.join("cache.log")).unwrap_or_default()
                    );
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Squid { port, dir, child };
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("squid did not start: {last_err}");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.access_log_path()).unwrap_or_default()
    }

    /// Waits until at least `n` access-log lines satisfy `pred` (squid writes a CONNECT line
    /// when the tunnel closes or periodically; the log is flushed promptly with stdio:).
    pub fn wait_log(&self, what: &str, n: usize, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.access_log();
            if log.lines().filter(|l| pred(l)).count() >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "squid on {}: no {what} within {timeout:?}; access log:\n{log}",
                self.port
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
