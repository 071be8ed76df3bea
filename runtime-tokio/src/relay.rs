//! Moving payload bytes between a public client (or local service) and a data connection once
//! they are paired: splice(2) when both ends are plain TCP, buffered copies under TLS.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use crate::splice::{self, Tally};
use crate::stream::MaybeTls;

/// What a [`DataPlane`] relay resolves to: (bytes a→b, bytes b→a).
pub type RelayFuture<'a> = Pin<Box<dyn Future<Output = io::Result<(u64, u64)>> + Send + 'a>>;

/// Relays plain TCP pairs somewhere other than this tokio runtime (the io_uring runtime's
/// thread-per-core loops). Installed once per process with [`set_data_plane`].
pub trait DataPlane: Send + Sync + 'static {
    /// Relays both directions between `a` and `b` until both have ended, exactly like the
    /// splice path of [`relay`] (half-close passed on; an error ends both). Reports delivered
    /// bytes to the tallies (at least when the relay ends) and returns (a→b, b→a).
    ///
    /// The plane must take its own references to the sockets (duplicate the descriptors)
    /// before this returns: the caller may drop the returned future and close its sockets at
    /// any time, and a descriptor number must never be used after that.
    fn relay<'a>(
        &'a self,
        a: &TcpStream,
        b: &TcpStream,
        tally_ab: Tally<'a>,
        tally_ba: Tally<'a>,
    ) -> RelayFuture<'a>;

    /// As [`DataPlane::relay`], taking the sockets: a plane that can should keep the only
    /// descriptors (no duplicates, so a relayed connection costs the process two descriptors,
    /// not four), close them when the relay ends, and reset both ends after an error (a
    /// broken stream must not look complete). By default, borrows them for `relay`.
    fn relay_owned<'a>(
        &'a self,
        a: TcpStream,
        b: TcpStream,
        tally_ab: Tally<'a>,
        tally_ba: Tally<'a>,
    ) -> RelayFuture<'a> {
        Box::pin(async move {
            let r = self.relay(&a, &b, tally_ab, tally_ba).await;
            if r.is_err() {
                reset_on_close(&a);
                reset_on_close(&b);
            }
            r
        })
    }

    /// For logs: which mechanism moves the bytes.
    fn name(&self) -> &'static str;
}

static DATA_PLANE: OnceLock<Box<dyn DataPlane>> = OnceLock::new();

/// Sends every later plain relay of this process to `plane`. Fails if one is already set.
pub fn set_data_plane(plane: Box<dyn DataPlane>) -> Result<(), Box<dyn DataPlane>> {
    DATA_PLANE.set(plane)
}

/// Relays both directions until both are finished. `a_early` are bytes that already arrived
/// for `a` (payload right behind a handshake frame); they are written to `a` first, never
/// dropped. An EOF in one direction is passed on as a write shutdown while the other direction
/// keeps flowing (half-close). Delivered bytes are reported to `tally_ab` / `tally_ba` as they
/// go on the splice path, and at the end on the copy path. Returns (bytes a→b, bytes b→a).
pub async fn relay(
    mut a: TcpStream,
    b: MaybeTls,
    a_early: &[u8],
    tally_ab: Tally<'_>,
    tally_ba: Tally<'_>,
) -> io::Result<(u64, u64)> {
    let mut early = a_early.len() as u64;
    if !a_early.is_empty() {
        a.write_all(a_early).await?;
        tally_ba(early);
    }
    let plain = match b {
        MaybeTls::Plain(tcp) => tcp,
        MaybeTls::Outbound(out) => {
            let (rest, tcp) = out.into_parts();
            if !rest.is_empty() {
                a.write_all(&rest).await?;
                early += rest.len() as u64;
                tally_ba(rest.len() as u64);
            }
            tcp
        }
        mut tls => {
            let (ab, ba) = copy(&mut a, &mut tls, tally_ab, tally_ba).await?;
            return Ok((ab, ba + early));
        }
    };
    if let Some(plane) = DATA_PLANE.get() {
        // The plane resets both ends itself after an error.
        let r = plane.relay_owned(a, plain, tally_ab, tally_ba).await;
        return r.map(|(ab, ba)| (ab, ba + early));
    }
    let r = match splice::Pipes::new() {
        Ok(pipes) => splice::relay(&a, &plain, pipes, tally_ab, tally_ba).await,
        Err(e) => {
            debug!("no pipes for splice ({e}); copying through user space");
            let mut plain = plain;
            let r = copy(&mut a, &mut plain, tally_ab, tally_ba).await;
            if r.is_err() {
                reset_on_close(&a);
                reset_on_close(&plain);
            }
            return r.map(|(ab, ba)| (ab, ba + early));
        }
    };
    if r.is_err() {
        // Both ends learn that the stream broke: a reset, not a FIN that would pass a
        // truncated stream off as complete.
        reset_on_close(&a);
        reset_on_close(&plain);
    }
    r.map(|(ab, ba)| (ab, ba + early))
}

/// Makes the coming close of `s` send a reset (SO_LINGER 0) instead of a FIN.
pub fn reset_on_close(s: &impl std::os::fd::AsFd) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid linger struct on a socket `s` holds open.
    unsafe {
        libc::setsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The user-space fallback; traffic is tallied when the connection ends.
async fn copy<B>(
    a: &mut TcpStream,
    b: &mut B,
    tally_ab: Tally<'_>,
    tally_ba: Tally<'_>,
) -> io::Result<(u64, u64)>
where
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (ab, ba) = tokio::io::copy_bidirectional_with_sizes(a, b, 16 * 1024, 16 * 1024).await?;
    tally_ab(ab);
    tally_ba(ba);
    Ok((ab, ba))
}
