//! The agent's outbound TCP connections to the gateway: direct, or tunnelled through a cascade
//! of HTTP CONNECT proxies negotiated by the core's `ConnectChain`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dialback_core::connect_chain::{ChainEvent, ConnectChain, ProxyHop};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A TCP connection to the gateway (possibly through proxies), together with bytes that were
/// already read from it while the last proxy answered: those belong to the gateway's stream
/// and are returned by the first reads, never dropped.
pub struct Outbound {
    early: Vec<u8>,
    pos: usize,
    tcp: TcpStream,
}

impl Outbound {
    /// The socket, for writes that bypass the early buffer (which only holds bytes read).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Bytes not yet read from the early buffer, and the socket.
    pub fn into_parts(self) -> (Vec<u8>, TcpStream) {
        let Outbound {
            mut early,
            pos,
            tcp,
        } = self;
        early.drain(..pos);
        (early, tcp)
    }
}

/// Connects to `gateway` (`host:port`), through `proxies` in order when there are any, within
/// `timeout`. A proxy that stops answering is named in the error.
pub async fn connect(
    gateway: &str,
    proxies: &[ProxyHop],
    timeout: Duration,
    keepalive: Duration,
) -> Result<Outbound, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let Some(first) = proxies.first() else {
        let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(gateway))
            .await
            .map_err(|_| {
                format!("cannot connect to gateway {gateway}: no answer within {timeout:?}")
            })?
            .map_err(|e| format!("cannot connect to gateway {gateway}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let _ = crate::sockopt::keepalive(&tcp, keepalive);
        return Ok(Outbound {
            early: Vec::new(),
            pos: 0,
            tcp,
        });
    };
    let (host, port) = gateway
        .rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().ok()?,
            ))
        })
        .ok_or_else(|| format!("gateway address {gateway:?} must look like host:port"))?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no randomness: {e}"))?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut chain = ConnectChain::new(proxies.to_vec(), host, port, seed, now_ms)
        .with_workstation(&workstation());
    let first_addr = first.addr();
    let dial_first = || async {
        let tcp = tokio::time::timeout_at(deadline, TcpStream::connect(&first_addr))
            .await
            .map_err(|_| format!("proxy hop 1 ({first_addr}): no answer within {timeout:?}"))?
            .map_err(|e| format!("proxy hop 1 ({first_addr}): cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let _ = crate::sockopt::keepalive(&tcp, keepalive);
        Ok::<_, String>(tcp)
    };
    let mut tcp = dial_first().await?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut rest: Vec<u8> = Vec::new();
    loop {
        while let Some(bytes) = chain.poll_transmit() {
            let hop = chain.current_hop();
            tokio::time::timeout_at(deadline, tcp.write_all(&bytes))
                .await
                .map_err(|_| format!("proxy hop {hop}: could not send within {timeout:?}"))?
                .map_err(|e| format!("proxy hop {hop}: write failed: {e}"))?;
        }
        let mut reconnect = false;
        while let Some(ev) = chain.poll_event() {
            match ev {
                ChainEvent::Reconnect => reconnect = true,
                ChainEvent::Established { mut early } => {
                    early.extend_from_slice(&rest);
                    return Ok(Outbound { early, pos: 0, tcp });
                }
                ChainEvent::Failed(e) => return Err(e.to_string()),
            }
        }
        if reconnect {
            tcp = dial_first().await?;
            continue;
        }
        let hop = chain.current_hop();
        let proxy = proxies
            .get(hop.saturating_sub(1))
            .map(ProxyHop::addr)
            .unwrap_or_default();
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .map_err(|_| format!("proxy hop {hop} ({proxy}): no answer within {timeout:?}"))?
            .map_err(|e| format!("proxy hop {hop} ({proxy}): read failed: {e}"))?;
        if n == 0 {
            chain.handle_eof();
            continue;
        }
        let mut input = &buf[..n];
        chain.handle_input(&mut input);
        rest = input.to_vec();
    }
}

/// This machine's name, which NTLM proxies log as the workstation.
fn workstation() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// One line per hop for the start-up log: address and scheme, never a password.
pub fn describe(proxies: &[ProxyHop]) -> String {
    use dialback_core::connect_chain::HopAuth;
    proxies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let auth = match &p.auth {
                HopAuth::None => "no auth".to_owned(),
                HopAuth::Basic { user, .. } => format!("Basic as {user:?}"),
                HopAuth::Ntlm(c) => format!("NTLM as \"{}\\{}\"", c.domain, c.user),
                HopAuth::Auto { user, .. } => format!("auto (as offered) as {user:?}"),
            };
            format!("hop {} {} ({auth})", i + 1, p.addr())
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

impl AsyncRead for Outbound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.early.len() {
            let n = (this.early.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.early[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.early.len() {
                this.early = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Outbound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn keepalive_idle(s: &TcpStream) -> (i32, i32) {
        let get = |level, name| {
            let mut v: i32 = -1;
            let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
            // SAFETY: `v` and `len` outlive the call; `len` is the size of `v`.
            let rc = unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    level,
                    name,
                    (&mut v as *mut i32).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0);
            v
        };
        (
            get(libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        )
    }

    #[tokio::test]
    async fn connections_to_the_gateway_get_keepalive() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let out = connect(&addr, &[], Duration::from_secs(5), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(keepalive_idle(&out.into_parts().1), (1, 30));
        let off = connect(&addr, &[], Duration::from_secs(5), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(keepalive_idle(&off.into_parts().1).0, 0);
    }
}
