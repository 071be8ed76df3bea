//! Short messages back and forth through a relay, then a half-close each way: what a relay
//! that waits right after a short read must never stall on. Shared by the tokio splice tests
//! and the io_uring plane tests.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any one message may take before the relay counts as stalled.
pub const WAIT: Duration = Duration::from_secs(10);

/// `rounds` pings from `client`, each answered by a pong from `server`, then a last message
/// and EOF from the client, then EOF from the server. Returns the bytes sent each way
/// (client → server, server → client).
pub async fn ping_pong(client: &mut TcpStream, server: &mut TcpStream, rounds: u32) -> (u64, u64) {
    let (mut up, mut down) = (0u64, 0u64);
    for i in 0..rounds {
        let ping = format!("ping {i}");
        pass(client, server, ping.as_bytes(), "forward message stalled").await;
        let pong = format!("pong {i}!");
        pass(server, client, pong.as_bytes(), "backward message stalled").await;
        up += ping.len() as u64;
        down += pong.len() as u64;
    }
    client.write_all(b"last").await.unwrap();
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, server.read_to_end(&mut rest))
        .await
        .expect("EOF after a short message stalled")
        .unwrap();
    assert_eq!(rest, b"last");
    server.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .expect("EOF back to the client stalled")
        .unwrap();
    assert!(rest.is_empty());
    (up + 4, down)
}

/// Writes `msg` to `from` and expects exactly it at `to` within [`WAIT`].
async fn pass(from: &mut TcpStream, to: &mut TcpStream, msg: &[u8], stalled: &str) {
    from.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, to.read_exact(&mut got))
        .await
        .expect(stalled)
        .unwrap();
    assert_eq!(got, msg);
}
