//! The relay a loop runs for one job: both directions at once, messages through the loop's
//! shared buffers and bulk streams socket → pipe → socket with splice(2), all waiting on
//! io_uring. Same rules as the tokio splice path: half-close passed on, an error ends both
//! directions, empty pipes go back to the shared stock.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use dialback_tokio::relay::reset_on_close;
use dialback_tokio::splice::{recycle, shutdown_write_fd, splice, Pipe, CHUNK};

use crate::executor::{readiness, recv, send, Lent, BUF_SIZE};
use crate::{Job, Start};

const POLLIN: u32 = libc::POLLIN as u32;
const POLLOUT: u32 = libc::POLLOUT as u32;

pub(crate) async fn run_job(job: Job) {
    let Job {
        a,
        b,
        start: (ab, ba),
        progress,
        done,
    } = job;
    let early = (ab.moved, ba.moved);
    let r = relay(a.as_raw_fd(), b.as_raw_fd(), (ab, ba), &progress)
        .await
        .map(|(ab, ba)| (ab + early.0, ba + early.1));
    if r.is_err() {
        // A broken stream must not look complete: both ends get a reset, not a FIN.
        reset_on_close(&a);
        reset_on_close(&b);
    }
    // Close our descriptors (the only ones, or duplicates) before reporting, so that the
    // caller's close really ends the sockets.
    drop((a, b));
    let _ = done.send(r);
}

async fn relay(
    a: RawFd,
    b: RawFd,
    (ab, ba): (Start, Start),
    progress: &crate::Progress,
) -> io::Result<(u64, u64)> {
    // A pipe from the first pass may still hold bytes: one_way delivers them first.
    let (mut pab, mut pba) = (ab.pipe, ba.pipe);
    let r = TryJoin {
        a: Some(Box::pin(one_way(a, b, &mut pab, &progress.ab))),
        b: Some(Box::pin(one_way(b, a, &mut pba, &progress.ba))),
        ra: None,
        rb: None,
    }
    .await;
    // After an error a pipe may hold bytes of this connection: `recycle` closes those.
    for p in [pab, pba].into_iter().flatten() {
        recycle(p);
    }
    r
}

/// One direction. Messages (what one receive gets, up to a loop buffer) go through the loop's
/// shared buffers with IORING_OP_RECV / IORING_OP_SEND, which the ring batches: no system call
/// per message. A receive that fills a whole buffer means a bulk stream, which then moves
/// socket → pipe → socket with splice(2) for as long as it flows; when the source runs dry the
/// direction goes back to receiving messages. Like the tokio path, a pipe is held only while
/// bytes move and a buffer only between its receive and its send, so an idle relay holds
/// neither.
async fn one_way(
    from: RawFd,
    to: RawFd,
    slot: &mut Option<Pipe>,
    moved: &AtomicU64,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut eof = false;
    // Every loop buffer was lent when this direction asked for one: it splices instead, after
    // waiting for the source.
    let mut no_buffers = false;
    // Used only while no pipe can be had (out of descriptors): the direction then copies
    // through this buffer instead of failing the connection.
    let mut fallback: Option<Vec<u8>> = None;
    loop {
        if slot.is_none() && !no_buffers {
            match recv(from).await {
                Ok(Some(lent)) => {
                    let n = lent.len();
                    send_all(to, lent).await?;
                    total += n as u64;
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    if n < BUF_SIZE {
                        continue;
                    }
                }
                Ok(None) => {
                    shutdown_write_fd(to);
                    return Ok(total);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => no_buffers = true,
                Err(e) => return Err(e),
            }
        }
        let pipe = match slot {
            Some(p) => p,
            None => match Pipe::take() {
                Ok(p) => slot.insert(p),
                Err(_) => {
                    let buf = fallback.get_or_insert_with(|| vec![0u8; 16 * 1024]);
                    match copy_once(from, to, buf).await? {
                        0 => {
                            shutdown_write_fd(to);
                            return Ok(total);
                        }
                        n => {
                            total += n as u64;
                            moved.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    continue;
                }
            },
        };
        let mut progress = false;
        // The source is known to be empty for now, so once the pipe is delivered the next
        // step is to wait, not a splice that would only get EAGAIN.
        let mut drained = false;
        if !eof {
            match splice(from, pipe.write_fd(), CHUNK) {
                Ok(0) => eof = true,
                Ok(n) => {
                    drained = pipe.pending == 0 && pipe.drained_by(n);
                    pipe.pending += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if pipe.pending > 0 {
            match splice(pipe.read_fd(), to, pipe.pending) {
                Ok(n) => {
                    pipe.pending -= n;
                    total += n as u64;
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    progress |= n > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if eof && pipe.pending == 0 {
            shutdown_write_fd(to);
            return Ok(total);
        }
        if progress && !(drained && pipe.pending == 0) {
            continue;
        }
        if pipe.pending > 0 {
            // Poll readiness is level-triggered (checked when the poll is armed): no wake-up
            // is lost between the splice that found the send buffer full and this wait.
            readiness(to, POLLOUT).await?;
        } else {
            if let Some(p) = slot.take() {
                recycle(p);
            }
            if no_buffers {
                readiness(from, POLLIN).await?;
                no_buffers = false;
            }
        }
    }
}

/// Sends the whole of a received message.
async fn send_all(to: RawFd, mut lent: Lent) -> io::Result<()> {
    let mut done = 0;
    while done < lent.len() {
        let (l, n) = send(to, lent, done).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        lent = l;
        done += n;
    }
    Ok(())
}

fn sys(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Reads what `from` has (waiting on the ring if need be) and writes all of it to `to`.
/// Returns the bytes moved; 0 at EOF.
async fn copy_once(from: RawFd, to: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let n = loop {
        // SAFETY: a non-blocking read into a buffer we own, on a socket we hold open.
        match sys(unsafe {
            libc::recv(from, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                readiness(from, POLLIN).await?;
            }
            Err(e) => return Err(e),
        }
    };
    let mut done = 0;
    while done < n {
        let rest = &buf[done..n];
        // SAFETY: a non-blocking send from a buffer we own, on a socket we hold open.
        match sys(unsafe {
            libc::send(
                to,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        }) {
            Ok(m) => done += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                readiness(to, POLLOUT).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

type Dir<'a> = Pin<Box<dyn Future<Output = io::Result<u64>> + 'a>>;

/// Both directions; the first error ends the relay (dropping the other direction cancels its
/// wait).
struct TryJoin<'a> {
    a: Option<Dir<'a>>,
    b: Option<Dir<'a>>,
    ra: Option<u64>,
    rb: Option<u64>,
}

impl Future for TryJoin<'_> {
    type Output = io::Result<(u64, u64)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(f) = this.a.as_mut() {
            if let Poll::Ready(r) = f.as_mut().poll(cx) {
                this.a = None;
                match r {
                    Ok(n) => this.ra = Some(n),
                    Err(e) => {
                        this.b = None;
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
        if let Some(f) = this.b.as_mut() {
            if let Poll::Ready(r) = f.as_mut().poll(cx) {
                this.b = None;
                match r {
                    Ok(n) => this.rb = Some(n),
                    Err(e) => {
                        this.a = None;
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
        match (this.ra, this.rb) {
            (Some(a), Some(b)) => Poll::Ready(Ok((a, b))),
            _ => Poll::Pending,
        }
    }
}
