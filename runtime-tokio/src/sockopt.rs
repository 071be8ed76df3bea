//! Socket options. TCP keepalive, so that a peer that vanished without a word (a client behind a NAT that
//! forgot the connection, a machine switched off, a cable pulled) does not hold a relay and
//! its descriptors forever.
//!
//! Set on listening sockets, the options are inherited by every accepted connection (Linux
//! copies them when the connection is created), so the gateway pays no system call per
//! client. The agent sets them on each connection it makes to the gateway (or to its first
//! proxy).

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

/// Probes sent per `idle` once probing started.
const PROBES: u32 = 4;

/// The default `tcp_keepalive`: a silent peer is probed after a minute and dropped after two.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);

fn set(fd: i32, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` outlives the call and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets TCP_NODELAY: small writes (a request, a keystroke) leave at once instead of waiting for
/// an acknowledgement. Set on a listener, accepted connections have it too.
pub fn nodelay(socket: &impl AsFd) -> io::Result<()> {
    set(
        socket.as_fd().as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_NODELAY,
        1,
    )
}

/// Turns keepalive on for `socket`: after `idle` without any segment from the peer, probes
/// every `idle / 4` (at least 1 s); when nothing has been heard for `2 × idle` (or sent data
/// stays unacknowledged that long) the connection fails: reads and writes return an error.
/// TCP_USER_TIMEOUT decides that moment, so the probe count is left alone (one system call
/// less per connection the agent makes). `idle == 0` leaves the socket as it is.
pub fn keepalive(socket: &impl AsFd, idle: Duration) -> io::Result<()> {
    if idle.is_zero() {
        return Ok(());
    }
    let fd = socket.as_fd().as_raw_fd();
    let secs = |d: Duration| i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX);
    let interval = (idle / PROBES).max(Duration::from_secs(1));
    set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(idle))?;
    set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(interval))?;
    let user_timeout = i32::try_from((idle * 2).as_millis()).unwrap_or(i32::MAX);
    set(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(fd: i32, level: i32, name: i32) -> i32 {
        let mut v: i32 = -1;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: `v` and `len` outlive the call; `len` is the size of `v`.
        let rc =
            unsafe { libc::getsockopt(fd, level, name, (&mut v as *mut i32).cast(), &mut len) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        v
    }

    fn options(s: &impl AsFd) -> [i32; 4] {
        let fd = s.as_fd().as_raw_fd();
        [
            get(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            get(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            get(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
        ]
    }

    #[test]
    fn accepted_connections_inherit_the_listeners_keepalive() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        keepalive(&l, Duration::from_secs(60)).unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        assert_eq!(options(&accepted), [1, 60, 15, 120_000]);
        // The connecting side has none of it unless set.
        assert_eq!(options(&c)[0], 0);
    }

    #[test]
    fn accepted_connections_inherit_the_listeners_nodelay() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        nodelay(&l).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        assert_eq!(
            get(accepted.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY),
            1
        );
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn short_and_zero_idle_times() {
        let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        keepalive(&s, Duration::from_secs(2)).unwrap();
        assert_eq!(options(&s), [1, 2, 1, 4_000]);
        let off = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        keepalive(&off, Duration::ZERO).unwrap();
        assert_eq!(options(&off)[0], 0);
    }
}
