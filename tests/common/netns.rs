//! Network namespaces a test creates for itself, so that connections really come from
//! different source addresses: a hub namespace (where the gateway runs) and spokes, each
//! linked to the hub by its own veth pair. Spoke `i` is `10.77.i.2` and `fd77:i::2`, the hub
//! is `10.77.i.1` and `fd77:i::1` on that link. Everything lives inside the namespaces (the
//! veth ends are created there directly), so parallel tests only need distinct namespace
//! names, and dropping the `Net` deletes it all, even when the test panics.
#![allow(dead_code)]

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Net {
    pub hub: String,
    pub spokes: Vec<String>,
    hosts_dir: PathBuf,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// A hub and `spokes` spokes, named after `tag` and this process so that tests running
    /// at the same time never share one.
    pub fn new(tag: &str, spokes: usize) -> Net {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("dbk{}-{tag}{n}", std::process::id());
        let hub = format!("{base}-hub");
        let mut net = Net {
            hub: hub.clone(),
            spokes: Vec::new(),
            hosts_dir: PathBuf::from("/etc/netns").join(&hub),
        };
        // Registered before creation, so a failure halfway is cleaned up too.
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        for i in 1..=spokes {
            let ns = format!("{base}-s{i}");
            ip(&["netns", "add", &ns]);
            net.spokes.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            let (hub_if, spoke_if) = (format!("h{i}"), "up0".to_owned());
            ip(&[
                "-n", &hub, "link", "add", &hub_if, "type", "veth", "peer", "name", &spoke_if,
                "netns", &ns,
            ]);
            ip(&[
                "-n",
                &hub,
                "addr",
                "add",
                &format!("{}/24", Net::hub_addr(i)),
                "dev",
                &hub_if,
            ]);
            ip(&["-n", &hub, "link", "set", &hub_if, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", Net::spoke_addr(i)),
                "dev",
                &spoke_if,
            ]);
            ip(&["-n", &ns, "link", "set", &spoke_if, "up"]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &Net::hub_addr(i).to_string(),
            ]);
            // IPv6 too, usable at once (no duplicate address detection on a private link).
            let v6 = |ns: &str, dev: &str, a: Ipv6Addr| {
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{a}/64"),
                    "dev",
                    dev,
                    "nodad",
                ]);
            };
            v6(&hub, &hub_if, Net::hub_addr6(i));
            v6(&ns, &spoke_if, Net::spoke_addr6(i));
        }
        net
    }

    pub fn spoke_addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, i as u8, 2)
    }

    pub fn hub_addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, i as u8, 1)
    }

    /// Spoke `i` on IPv6: `fd77:i::2`; the hub is `fd77:i::1` on that link.
    pub fn spoke_addr6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, i as u16, 0, 0, 0, 0, 0, 2)
    }

    pub fn hub_addr6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, i as u16, 0, 0, 0, 0, 0, 1)
    }

    /// The spoke namespace `i` (1-based).
    pub fn spoke(&self, i: usize) -> &str {
        &self.spokes[i - 1]
    }

    /// `/etc/hosts` as seen by processes started in the hub with [`Net::command`]
    /// (`ip netns exec` mounts `/etc/netns/NAME/hosts` over it).
    pub fn set_hub_hosts(&self, text: &str) {
        std::fs::create_dir_all(&self.hosts_dir).unwrap();
        // Written in place: the bind mount of a running process follows the inode.
        std::fs::write(self.hosts_dir.join("hosts"), text).unwrap();
    }

    /// `program args...` to run inside namespace `ns`.
    pub fn command(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// Runs `f` on a thread that has entered namespace `ns`: sockets it opens (listeners
    /// included, for as long as they live) belong to that namespace.
    pub fn within<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a namespace fd we hold open; it only affects this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends inside it.
        for ns in self.spokes.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.hosts_dir);
    }
}

/// A process started inside a namespace, its JSON log lines collected as they arrive: the
/// suite's [`crate::common::Proc`], started through `ip netns exec`.
pub type NsProc = crate::common::Proc;

impl NsProc {
    /// `dialback ARGS` inside `ns`, with JSON logs.
    pub fn dialback(net: &Net, ns: &str, name: &str, args: &[&str]) -> NsProc {
        let mut cmd = net.command(ns, crate::common::BIN);
        cmd.args(["--log-format", "json"]).args(args);
        if matches!(args.first(), Some(&"gateway" | &"agent")) {
            cmd.args(["--runtime", crate::common::test_runtime()]);
        }
        cmd.env("RUST_LOG", "info,dialback_tokio=debug");
        NsProc::spawn(name, cmd)
    }
}
