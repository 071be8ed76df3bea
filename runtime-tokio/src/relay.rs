//! Moving payload bytes between a public client and a data connection once they are paired.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Relays both directions until both are finished. `a_early` are bytes already read from `b`'s
/// peer side that belong to `a` (e.g. payload that arrived right behind a handshake frame);
/// they are written to `a` first, never dropped. An EOF in one direction is passed on as a
/// write shutdown while the other direction keeps flowing (half-close).
/// Returns (bytes a→b, bytes b→a).
pub async fn relay<A, B>(a: &mut A, b: &mut B, a_early: &[u8]) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if !a_early.is_empty() {
        a.write_all(a_early).await?;
    }
    let (ab, ba) = tokio::io::copy_bidirectional_with_sizes(a, b, 64 * 1024, 64 * 1024).await?;
    Ok((ab, ba + a_early.len() as u64))
}
