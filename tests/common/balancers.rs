//! Real HAProxy and nginx processes for the PROXY protocol tests, on loopback, each with its
//! config in a temporary directory; dropping one stops it.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A port that is free now, for a process started later to listen on. Taken below the
/// kernel's ephemeral range (32768–60999 by default), so that the suite's own outgoing
/// connections cannot grab it in the meantime; random, so parallel tests rarely pick the same.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000 after 1000 tries");
}

pub struct Server {
    pub what: &'static str,
    dir: tempfile::TempDir,
    child: Child,
}

impl Server {
    /// `haproxy` in the foreground with `config` (global and defaults sections are added).
    pub fn haproxy(config: &str, ports: &[u16]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("haproxy.cfg");
        let text = format!(
            "global\n  maxconn 1000\n\ndefaults\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\n{config}"
        );
        std::fs::write(&cfg, text).unwrap();
        let child = Command::new(which("haproxy", "/usr/sbin/haproxy"))
            .args(["-db", "-f", cfg.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start haproxy");
        Server::ready("haproxy", dir, child, ports)
    }

    /// `nginx` in the foreground, one master process, with the `http { ... }` body `http`.
    pub fn nginx(http: &str, ports: &[u16]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_owned();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr warn;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{http}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(which("nginx", "/usr/sbin/nginx"))
            .args(["-p", &d, "-c", &format!("{d}/nginx.conf")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        Server::ready("nginx", dir, child, ports)
    }

    fn ready(
        what: &'static str,
        dir: tempfile::TempDir,
        mut child: Child,
        ports: &[u16],
    ) -> Server {
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in ports {
            while TcpStream::connect(("127.0.0.1", *port)).is_err() {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!("{what} exited at start: {st}");
                }
                assert!(
                    Instant::now() < deadline,
                    "{what} does not listen on {port}"
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
        Server { what, dir, child }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str, fallback: &str) -> String {
    assert!(
        std::path::Path::new(fallback).exists(),
        "{name} is not installed: run scripts/test.sh (it installs {name}) or apt-get install {name}"
    );
    fallback.to_owned()
}
