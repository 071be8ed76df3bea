//! Zero-copy relay between two TCP sockets with splice(2): socket → pipe → socket, so payload
//! bytes never enter user space. One pipe per direction, owned by [`Pipe`] and closed on drop.
//! Readiness comes from tokio; every splice is non-blocking.
//!
//! Pipes that end a relay empty go back to a small process-wide stock and serve the next
//! relay: creating, sizing and closing two pipes per connection would otherwise be a fifth of
//! the system calls a short connection costs.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::Poll;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::debug;

/// Bytes moved per splice call; also the pipe capacity we ask for.
pub const CHUNK: usize = 1 << 20;

/// Empty pipes kept for reuse (each holds two file descriptors and no buffered pages).
const STOCK_MAX: usize = 64;

static STOCK: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

fn stock() -> std::sync::MutexGuard<'static, Vec<Pipe>> {
    STOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Returns a pipe to the stock if it is certainly empty; otherwise it is closed.
pub fn recycle(pipe: Pipe) {
    if pipe.pending == 0 {
        let mut s = stock();
        if s.len() < STOCK_MAX {
            s.push(pipe);
        }
    }
}

/// A non-blocking pipe; both ends close when it is dropped. Shared with other data planes
/// (the io_uring runtime) so that every relay uses the same stock and accounting.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes sitting in the pipe, spliced in but not yet out.
    pub pending: usize,
    /// How many buffers (pages) the pipe holds; each spliced-in buffer fills one, whatever
    /// its size. 0 when unknown.
    slots: usize,
}

impl Pipe {
    /// An empty pipe from the stock, or a new one.
    pub fn take() -> io::Result<Pipe> {
        let stocked = stock().pop();
        match stocked {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// True when `n` bytes spliced into this pipe while it was empty show that the socket
    /// had nothing more: fewer bytes than the pipe has buffers (each spliced-in buffer takes
    /// one, however small) means the pipe did not fill, and `n` is below [`CHUNK`].
    pub fn drained_by(&self, n: usize) -> bool {
        n > 0 && n < self.slots
    }

    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub fn write_fd(&self) -> RawFd {
        self.write.as_raw_fd()
    }

    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe means fewer wake-ups per megabyte; if the limit refuses, the default works.
        // SAFETY: plain fcntl on an fd we own.
        let mut bytes =
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        if bytes < 0 {
            // SAFETY: plain fcntl on an fd we own.
            bytes = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let slots = match (usize::try_from(bytes), usize::try_from(page)) {
            (Ok(b), Ok(p)) if p > 0 => b / p,
            _ => 0,
        };
        Ok(Pipe {
            read,
            write,
            pending: 0,
            slots,
        })
    }
}

/// One non-blocking splice(2) between a socket and a pipe.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets are allowed for pipes and sockets; the fds are valid for the call.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn shutdown_write(s: &TcpStream) {
    shutdown_write_fd(s.as_raw_fd());
}

/// Passes an EOF on (half-close): no more bytes will be written to this socket.
pub fn shutdown_write_fd(fd: RawFd) {
    // SAFETY: shutdown on a socket fd the caller holds open.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Moves bytes from `from` to `to` until EOF, then shuts down `to`'s write side (half-close)
/// after everything pending in the pipe has been delivered. Returns the bytes moved.
///
/// The pipe is held only while bytes move: a direction that waits for its source with an
/// empty pipe gives the pipe back to the stock, so an idle connection holds no pipe (10,000
/// idle connections would otherwise keep 40,000 pipe descriptors open).
///
/// `turns` (when given) learns when this direction waits for its source with nothing
/// pending, see [`relay_until_idle`].
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    slot: &mut Option<Pipe>,
    tally: Tally<'_>,
    turns: Option<(&Turns, &AtomicBool)>,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut eof = false;
    // Used only while no pipe can be had (out of descriptors): the direction then copies
    // through this buffer instead of failing the connection.
    let mut fallback: Option<Vec<u8>> = None;
    loop {
        let pipe = match slot {
            Some(p) => p,
            None => match Pipe::take() {
                Ok(p) => slot.insert(p),
                Err(e) => {
                    let buf = fallback.get_or_insert_with(|| {
                        debug!("no pipe for a relay ({e}); copying through user space");
                        vec![0u8; FALLBACK_BUF]
                    });
                    match copy_once(from, to, buf).await? {
                        0 => {
                            shutdown_write(to);
                            return Ok(total);
                        }
                        n => {
                            total += n as u64;
                            tally(n as u64);
                        }
                    }
                    continue;
                }
            },
        };
        let mut moved = false;
        // Fill the pipe from the source. EAGAIN from splice means "socket empty" or "pipe
        // full", and only the first may clear the socket's readiness (it is edge-triggered: a
        // wrongly cleared readiness never comes back once the peer has sent everything). So
        // the readiness-clearing call is made only with an empty pipe.
        if !eof {
            let fill = || splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK);
            let r = if pipe.pending == 0 {
                // Fewer bytes than the empty pipe has buffers means the pipe did not fill up
                // (each buffer holds at least one byte) and CHUNK was not reached: the socket
                // had nothing more. Telling tokio so (as if the call had failed with EAGAIN)
                // clears the readiness now and saves the call that would only get EAGAIN;
                // bytes or an EOF arriving later raise a new readiness.
                let mut short = 0;
                let r = from.try_io(Interest::READABLE, || match fill() {
                    Ok(n) if pipe.drained_by(n) => {
                        short = n;
                        Err(io::ErrorKind::WouldBlock.into())
                    }
                    r => r,
                });
                match r {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok(short),
                    r => r,
                }
            } else {
                fill()
            };
            match r {
                Ok(0) => eof = true,
                Ok(n) => {
                    pipe.pending += n;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        // Drain the pipe into the destination; with bytes in the pipe, EAGAIN can only mean
        // the socket's send buffer is full.
        if pipe.pending > 0 {
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), pipe.pending)
            }) {
                Ok(n) => {
                    pipe.pending -= n;
                    total += n as u64;
                    tally(n as u64);
                    moved |= n > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if eof && pipe.pending == 0 {
            shutdown_write(to);
            return Ok(total);
        }
        if moved {
            continue;
        }
        if pipe.pending > 0 {
            to.writable().await?;
        } else {
            if let Some(p) = slot.take() {
                recycle(p);
            }
            match turns {
                Some((turns, waiting)) => {
                    turns.waits.fetch_add(1, Ordering::Relaxed);
                    waiting.store(true, Ordering::Relaxed);
                    let r = from.readable().await;
                    waiting.store(false, Ordering::Relaxed);
                    r?;
                }
                None => from.readable().await?,
            }
        }
    }
}

/// Shared by the two directions of a relay run by [`relay_until_idle`].
#[derive(Default)]
struct Turns {
    /// Times either direction waited for its source with nothing pending: one per message
    /// (a request, a reply) in a conversation.
    waits: AtomicU32,
    /// Each direction is waiting so, right now.
    waiting_ab: AtomicBool,
    waiting_ba: AtomicBool,
}

/// How [`relay_until_idle`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both directions finished; bytes (a→b, b→a).
    Done(u64, u64),
    /// After at least the given number of waits, both directions were waiting for their
    /// sources with no pipe held, no byte pending and no EOF seen: the relay stopped there and
    /// the sockets may be relayed by someone else from scratch. Bytes moved so far (a→b, b→a).
    Idle(u64, u64),
}

/// [`relay`], stopping at the first moment both directions are idle once the conversation has
/// had `waits` turns (see [`Ended::Idle`]). A short connection ends here; a long one is
/// handed on at a quiet moment.
pub async fn relay_until_idle(
    a: &TcpStream,
    b: &TcpStream,
    tally_ab: Tally<'_>,
    tally_ba: Tally<'_>,
    waits: u32,
) -> io::Result<Ended> {
    let (mut ab, mut ba) = (None, None);
    let turns = Turns::default();
    let moved_ab = AtomicU64::new(0);
    let moved_ba = AtomicU64::new(0);
    let count_ab = |n: u64| {
        moved_ab.fetch_add(n, Ordering::Relaxed);
        tally_ab(n);
    };
    let count_ba = |n: u64| {
        moved_ba.fetch_add(n, Ordering::Relaxed);
        tally_ba(n);
    };
    let r = {
        let mut both = pin!(async {
            tokio::try_join!(
                one_way(a, b, &mut ab, &count_ab, Some((&turns, &turns.waiting_ab))),
                one_way(b, a, &mut ba, &count_ba, Some((&turns, &turns.waiting_ba)))
            )
        });
        std::future::poll_fn(|cx| match both.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(r.map(|(x, y)| Ended::Done(x, y))),
            Poll::Pending
                if turns.waits.load(Ordering::Relaxed) >= waits
                    && turns.waiting_ab.load(Ordering::Relaxed)
                    && turns.waiting_ba.load(Ordering::Relaxed) =>
            {
                // Both wait in `readable()` with their pipes given back: dropping them here
                // loses nothing.
                Poll::Ready(Ok(Ended::Idle(
                    moved_ab.load(Ordering::Relaxed),
                    moved_ba.load(Ordering::Relaxed),
                )))
            }
            Poll::Pending => Poll::Pending,
        })
        .await
    };
    // After an error a pipe may hold bytes of this connection: `recycle` closes those.
    for p in [ab, ba].into_iter().flatten() {
        recycle(p);
    }
    r
}

/// Size of the buffer a direction copies through when it cannot get a pipe.
const FALLBACK_BUF: usize = 16 * 1024;

/// Reads what `from` has (waiting for it if need be) and writes all of it to `to`. Returns the
/// bytes moved; 0 at EOF.
async fn copy_once(from: &TcpStream, to: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let n = loop {
        match from.try_read(buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => from.readable().await?,
            Err(e) => return Err(e),
        }
    };
    let mut done = 0;
    while done < n {
        match to.try_write(&buf[done..n]) {
            Ok(m) => done += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The two pipes of one relay. Created before relaying so that a failure to get pipes (fd
/// limit) can fall back to copying instead of failing the connection.
pub struct Pipes(Pipe, Pipe);

impl Pipes {
    /// Two empty pipes, from the stock when it has them.
    pub fn new() -> io::Result<Pipes> {
        Ok(Pipes(Pipe::take()?, Pipe::take()?))
    }
}

/// Called with every batch of bytes delivered, for live traffic counters.
pub type Tally<'a> = &'a (dyn Fn(u64) + Sync);

/// Relays both directions with splice until both have ended, reporting delivered bytes to
/// `tally_ab` / `tally_ba` as they go. Returns (bytes a→b, bytes b→a).
pub async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    pipes: Pipes,
    tally_ab: Tally<'_>,
    tally_ba: Tally<'_>,
) -> io::Result<(u64, u64)> {
    let Pipes(ab, ba) = pipes;
    let (mut ab, mut ba) = (Some(ab), Some(ba));
    // An error in either direction (a reset, say) ends the relay at once; the caller then
    // closes both sockets, so the other direction cannot wait forever.
    let r = tokio::try_join!(
        one_way(a, b, &mut ab, tally_ab, None),
        one_way(b, a, &mut ba, tally_ba, None)
    );
    // After an error a pipe may hold bytes of this connection: `recycle` closes those.
    for p in [ab, ba].into_iter().flatten() {
        recycle(p);
    }
    r
}

#[cfg(test)]
#[path = "../tests/support/ping_pong.rs"]
mod ping_pong;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        // client <-> (a | relay | b) <-> server
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay =
            tokio::spawn(
                async move { relay(&a, &b, Pipes::new().unwrap(), &|_| {}, &|_| {}).await },
            );
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let expect = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == expect, "forward direction corrupted");
        // The reverse direction still flows after the forward half-close.
        server.write_all(b"reply after EOF").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after EOF");
        let (ab, ba) = relay.await.unwrap().unwrap();
        assert_eq!((ab, ba), (5_000_000, 15));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_messages_back_and_forth_never_stall() {
        // Short splices clear the socket's readiness without a call that gets EAGAIN; every
        // later message must still wake the relay, in both directions, and the EOF too.
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay =
            tokio::spawn(
                async move { relay(&a, &b, Pipes::new().unwrap(), &|_| {}, &|_| {}).await },
            );
        let moved = super::ping_pong::ping_pong(&mut client, &mut server, 200).await;
        let result = tokio::time::timeout(super::ping_pong::WAIT, relay)
            .await
            .expect("relay did not end")
            .unwrap()
            .unwrap();
        assert_eq!(result, moved);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relay_stopped_when_idle_can_be_continued_without_losing_a_byte() {
        // The conversation goes on across the stop: the second relay picks up exactly where
        // the first left the sockets.
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let first = relay_until_idle(&a, &b, &|_| {}, &|_| {}, 6).await.unwrap();
            let rest = relay(&a, &b, Pipes::new().unwrap(), &|_| {}, &|_| {})
                .await
                .unwrap();
            (first, rest)
        });
        let moved = super::ping_pong::ping_pong(&mut client, &mut server, 100).await;
        let (first, rest) = tokio::time::timeout(super::ping_pong::WAIT, relay)
            .await
            .expect("relay did not end")
            .unwrap();
        let Ended::Idle(ab, ba) = first else {
            panic!("the first relay did not stop when idle: {first:?}");
        };
        assert!(ab > 0 && ba > 0, "stopped before the conversation went on");
        assert_eq!((ab + rest.0, ba + rest.1), moved);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relay_never_stops_while_one_direction_holds_bytes() {
        // The forward direction is stuck behind a server that does not read yet (bytes wait
        // in its pipe) while messages flow back and count turns: stopping then would lose the
        // pipe's bytes. The stream must arrive whole.
        let (client, a) = pair().await;
        let (b, mut server) = pair().await;
        // Small buffers between the relay and the server: the relay blocks on it at once.
        for (s, opt) in [(&b, libc::SO_SNDBUF), (&server, libc::SO_RCVBUF)] {
            let size: libc::c_int = 128 * 1024;
            // SAFETY: setsockopt with a valid int on a socket this test holds open.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
        }
        let (mut client_rd, mut client_wr) = client.into_split();
        const TOTAL: usize = 24 << 20;
        let stream = |i: usize| (i.wrapping_mul(31) ^ (i >> 13)) as u8;
        let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = written.clone();
        let writer = tokio::spawn(async move {
            let chunk: Vec<u8> = (0..TOTAL).map(stream).collect();
            for part in chunk.chunks(64 * 1024) {
                client_wr.write_all(part).await.unwrap();
                w.fetch_add(part.len(), std::sync::atomic::Ordering::Relaxed);
            }
            client_wr.shutdown().await.unwrap();
        });
        let wait = super::ping_pong::WAIT;
        tokio::time::timeout(wait, async {
            while written.load(std::sync::atomic::Ordering::Relaxed) < (1 << 20) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the writer never got going");
        // The relay starts with its source full, so the forward direction fills the pipe
        // and blocks on the server before it ever waits for its source.
        let relay = tokio::spawn(async move {
            let first = relay_until_idle(&a, &b, &|_| {}, &|_| {}, 16)
                .await
                .unwrap();
            let rest = relay(&a, &b, Pipes::new().unwrap(), &|_| {}, &|_| {})
                .await
                .unwrap();
            (first, rest)
        });
        for i in 0..40u8 {
            server.write_all(&[i; 10]).await.unwrap();
            let mut got = [0u8; 10];
            tokio::time::timeout(wait, client_rd.read_exact(&mut got))
                .await
                .expect("a message back stalled")
                .unwrap();
            assert_eq!(got, [i; 10]);
        }
        let mut got = Vec::with_capacity(TOTAL);
        tokio::time::timeout(wait * 3, server.read_to_end(&mut got))
            .await
            .expect("the stream stalled")
            .unwrap();
        assert_eq!(got.len(), TOTAL, "bytes lost");
        assert!(
            got.iter().enumerate().all(|(i, &b)| b == stream(i)),
            "bytes out of order"
        );
        writer.await.unwrap();
        server.shutdown().await.unwrap();
        let (first, rest) = tokio::time::timeout(wait, relay)
            .await
            .expect("relay did not end")
            .unwrap();
        let (ab, ba) = match first {
            Ended::Idle(ab, ba) => (ab + rest.0, ba + rest.1),
            Ended::Done(ab, ba) => (ab, ba),
        };
        assert_eq!((ab, ba), (TOTAL as u64, 400));
    }

    #[tokio::test]
    async fn a_relay_that_ends_before_it_is_idle_long_enough_is_done() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay =
            tokio::spawn(async move { relay_until_idle(&a, &b, &|_| {}, &|_| {}, 8).await });
        let (up, down) = super::ping_pong::ping_pong(&mut client, &mut server, 1).await;
        let ended = tokio::time::timeout(super::ping_pong::WAIT, relay)
            .await
            .expect("relay did not end")
            .unwrap()
            .unwrap();
        assert_eq!(ended, Ended::Done(up, down));
    }

    #[tokio::test]
    async fn reused_pipes_never_carry_bytes_between_connections() {
        // Many short relays in a row reuse the same stocked pipes; each must see exactly its
        // own bytes.
        for i in 0..50u32 {
            let (mut client, a) = pair().await;
            let (b, mut server) = pair().await;
            let relay = tokio::spawn(async move {
                relay(&a, &b, Pipes::new().unwrap(), &|_| {}, &|_| {}).await
            });
            let msg = format!("connection {i} payload");
            client.write_all(msg.as_bytes()).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, msg.as_bytes());
            server.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert!(back.is_empty());
            relay.await.unwrap().unwrap();
        }
        assert!(!stock().is_empty(), "empty pipes went back to the stock");
        assert!(stock().iter().all(|p| p.pending == 0));
    }
}
