//! Reading the PROXY protocol header a front balancer sends (`accept_proxy`), for every
//! gateway listener: the agents' port, services' `tcp_listen`, and the HTTP entry point.
//!
//! The header is consumed exactly: bytes are peeked, the core's parser decides, and only the
//! header's own bytes are read, so whatever follows (a TLS hello, a DIALBACK preamble, client
//! payload) stays in the socket for the next reader.

use std::net::SocketAddr;
use std::time::Duration;

use dialback_core::proxy_protocol::{self, Parsed, ProxyError, ProxyHeader, MAX_HEADER};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{0}")]
    Invalid(#[from] ProxyError),
    #[error("closed before a complete PROXY header")]
    Closed,
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

impl HeaderError {
    /// Metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            HeaderError::Invalid(_) => "proxy_header_invalid",
            HeaderError::Closed => "closed",
            HeaderError::Timeout(_) => "timeout",
            HeaderError::Io(_) => "read_error",
        }
    }
}

/// Who is really on the other end of a connection that came through a balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The real client: the header's source, or the socket's peer for LOCAL and UNKNOWN
    /// headers (health checks, unknown families).
    pub client: SocketAddr,
    /// The address the client connected to, when the header says.
    pub destination: Option<SocketAddr>,
    /// The balancer the connection came from (the socket's peer).
    pub via: SocketAddr,
    pub header: ProxyHeader,
}

impl Origin {
    fn new(parsed: &Parsed, via: SocketAddr) -> Self {
        let (client, destination) = match parsed.header {
            ProxyHeader::Proxied {
                source,
                destination,
            } => (source, Some(destination)),
            ProxyHeader::Local | ProxyHeader::Unknown => (via, None),
        };
        Origin {
            client,
            destination,
            via,
            header: parsed.header,
        }
    }
}

/// Reads the PROXY header at the start of `tcp` within `timeout`, consuming exactly its bytes.
/// `via` is the socket's peer address (the balancer).
pub async fn read(
    tcp: &mut TcpStream,
    via: SocketAddr,
    timeout: Duration,
) -> Result<Origin, HeaderError> {
    match tokio::time::timeout(timeout, read_inner(tcp)).await {
        Ok(Ok(parsed)) => Ok(Origin::new(&parsed, via)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(HeaderError::Timeout(timeout)),
    }
}

async fn read_inner(tcp: &mut TcpStream) -> Result<Parsed, HeaderError> {
    let mut buf = vec![0u8; MAX_HEADER];
    // buf[..taken] has been read from the socket; buf[taken..taken + n] is only peeked.
    let mut taken = 0;
    loop {
        let n = tcp.peek(&mut buf[taken..]).await?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        match proxy_protocol::parse(&buf[..taken + n])? {
            Some(parsed) => {
                tcp.read_exact(&mut buf[taken..parsed.consumed]).await?;
                return Ok(parsed);
            }
            None => {
                // Take what was peeked, so the next peek waits for new bytes instead of
                // returning the same ones again. The parser decides within MAX_HEADER bytes,
                // so the buffer never fills up.
                tcp.read_exact(&mut buf[taken..taken + n]).await?;
                taken += n;
                if taken >= buf.len() {
                    return Err(HeaderError::Invalid(ProxyError::V2TooLong(taken)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        (c, s, peer)
    }

    #[tokio::test]
    async fn consumes_exactly_the_header_sent_in_pieces() {
        let (mut c, mut s, peer) = pair().await;
        let src: SocketAddr = "203.0.113.9:5555".parse().unwrap();
        let dst: SocketAddr = "198.51.100.1:443".parse().unwrap();
        let mut bytes = proxy_protocol::encode_v2(Some(src), Some(dst));
        bytes.extend_from_slice(b"\x16hello");
        let writer = tokio::spawn(async move {
            for chunk in bytes.chunks(5) {
                c.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            c
        });
        let origin = read(&mut s, peer, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            (origin.client, origin.destination, origin.via),
            (src, Some(dst), peer)
        );
        let mut rest = [0u8; 6];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"\x16hello");
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn v1_local_and_garbage() {
        let (mut c, mut s, peer) = pair().await;
        c.write_all(b"PROXY UNKNOWN\r\nGET").await.unwrap();
        let origin = read(&mut s, peer, Duration::from_secs(5)).await.unwrap();
        assert_eq!(origin.client, peer);
        let mut rest = [0u8; 3];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"GET");

        let (mut c, mut s, peer) = pair().await;
        c.write_all(b"\x16\x03\x01").await.unwrap();
        let e = read(&mut s, peer, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("TLS hello"), "{e}");

        let (mut c, mut s, peer) = pair().await;
        c.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
        let e = read(&mut s, peer, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, HeaderError::Timeout(_)), "{e}");
        drop(c);
        let e = read(&mut s, peer, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, HeaderError::Closed), "{e}");
    }
}
