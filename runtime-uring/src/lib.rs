//! The io_uring runtime's data plane: plain relays of the process (public client ↔ data
//! connection at the gateway, data connection ↔ local service at the agent) that go on for
//! more than a few requests run on one of a few thread-per-core loops whose only reactor is an
//! io_uring.
//!
//! How bytes move (measured on the target kernel, `bench/URING.md`):
//! - Messages — what one receive finds, up to 8 KiB — go through buffers the loop shares
//!   between its relays (a registered buffer ring): IORING_OP_RECV picks one only when bytes
//!   arrive, IORING_OP_SEND passes it on, and the ring batches both, so a request or a reply
//!   costs no system call of its own. Keep-alive HTTP through a raw port: ~20% more requests
//!   per second than polling + splice(2), and faster than the epoll runtime.
//! - A receive that fills a whole buffer means a bulk stream: it then moves socket → pipe →
//!   socket with splice(2), waiting with IORING_OP_POLL_ADD, for as long as it flows. Relaying
//!   one TCP stream through one thread, POLL_ADD + splice(2) matched plain splice(2) (~1.9
//!   GiB/s), while IORING_OP_SPLICE and RECV/SEND through per-connection buffers were slower.
//! - Rings are created with DEFER_TASKRUN: the kernel runs completion work when the loop
//!   waits, instead of interrupting the thread with a wake-up per socket event.
//!
//! The sockets handed over are expected to have TCP_NODELAY (every socket the runtimes relay
//! has it): a message may leave in two sends, and Nagle's algorithm would hold the second.
//!
//! The control plane (TLS handshakes, the sans-IO core, timers, the admin endpoint) stays on
//! tokio. A paired connection is relayed there first and handed to a loop through
//! [`UringDataPlane`] (which implements `dialback_tokio::relay::DataPlane`) once its
//! conversation goes on past [`HAND_OVER_AFTER`] turns: a one-request connection never pays
//! for the hand-over.

mod executor;
mod relay;

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use dialback_tokio::relay::{reset_on_close, DataPlane, RelayFuture};
use dialback_tokio::splice::{recycle, relay_until_idle, splice, Ended, Pipe, Tally, CHUNK};
use tokio::net::TcpStream;

/// Bytes delivered so far in each direction, written by the loop, read by the waiting task.
#[derive(Default)]
pub(crate) struct Progress {
    pub(crate) ab: AtomicU64,
    pub(crate) ba: AtomicU64,
}

/// Where the first pass left one direction.
pub(crate) struct Start {
    /// A pipe still holding bytes the destination did not take yet.
    pub(crate) pipe: Option<Pipe>,
    /// Bytes the first pass delivered.
    pub(crate) moved: u64,
}

impl Start {
    const NOTHING: Start = Start {
        pipe: None,
        moved: 0,
    };
}

/// One relay handed to a loop: both sockets (the loop's own descriptors), and where the first
/// pass made before the hand-over left each direction (a→b, b→a).
pub(crate) struct Job {
    pub(crate) a: OwnedFd,
    pub(crate) b: OwnedFd,
    pub(crate) start: (Start, Start),
    pub(crate) progress: Arc<Progress>,
    pub(crate) done: tokio::sync::oneshot::Sender<io::Result<(u64, u64)>>,
}

struct Worker {
    jobs: mpsc::Sender<Job>,
    /// Written to wake the loop when a job is queued.
    wake: Arc<OwnedFd>,
}

/// Thread-per-core io_uring relay loops.
pub struct UringDataPlane {
    workers: Vec<Worker>,
    next: AtomicUsize,
    /// Relays handed to a loop so far.
    handed: AtomicU64,
}

/// Turns (a direction waiting for its source: one per request or reply) a relay taken with
/// [`DataPlane::relay_owned`] has on the tokio side before it moves to a loop. Handing a
/// relay over costs each side a wake-up of the loop and one of tokio at the end, about 10% of
/// the connection rate when every connection carries one request; a conversation that goes on
/// pays it once and then runs on the ring (`bench/URING.md`).
pub const HAND_OVER_AFTER: u32 = 8;

impl UringDataPlane {
    /// Starts `threads` loops (0: half the available cores, at least one — the other half
    /// runs the tokio control plane; one loop per core oversubscribed a 2-core machine and
    /// cost 40% of the connection rate). Fails with a clear error when the kernel refuses
    /// io_uring (too old, or disabled by `kernel.io_uring_disabled`).
    pub fn start(threads: usize) -> io::Result<UringDataPlane> {
        Self::start_with_buffers(threads, executor::BUF_COUNT)
    }

    /// [`start`](Self::start) with `buffers` receive buffers of 8 KiB per loop (64 by
    /// default). When all are lent at once, relays splice instead of waiting for one; 0 makes
    /// every relay splice.
    pub fn start_with_buffers(threads: usize, buffers: u16) -> io::Result<UringDataPlane> {
        let threads = if threads == 0 {
            (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(1)
        } else {
            threads
        };
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (tx, rx) = mpsc::channel();
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name(format!("dialback-uring-{i}"))
                .spawn(move || executor::run(rx, buffers, ready_tx))?;
            let wake = ready_rx
                .recv()
                .map_err(|_| io::Error::other("io_uring loop died while starting"))??;
            workers.push(Worker {
                jobs: tx,
                wake: Arc::new(wake),
            });
        }
        Ok(UringDataPlane {
            workers,
            next: AtomicUsize::new(0),
            handed: AtomicU64::new(0),
        })
    }

    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Relays handed to a loop so far.
    pub fn handed_over(&self) -> u64 {
        self.handed.load(Ordering::Relaxed)
    }

    fn submit(&self, job: Job) -> io::Result<()> {
        self.handed.fetch_add(1, Ordering::Relaxed);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let w = &self.workers[i];
        w.jobs
            .send(job)
            .map_err(|_| io::Error::other("io_uring loop is gone"))?;
        let one: u64 = 1;
        // SAFETY: an 8-byte write from a valid u64 to an eventfd we own.
        let n = unsafe { libc::write(w.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if n != 8 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// One non-blocking pass `from` → `to` before the relay is handed over, so bytes that are
/// already waiting (a client's request, typically) do not wait for the loop to wake up.
/// An error (a reset, say) ends the relay here, as it would in the loop: a socket reports its
/// error once, so it must not be swallowed.
fn first_pass(from: &OwnedFd, to: &OwnedFd) -> io::Result<Start> {
    let Ok(mut pipe) = Pipe::take() else {
        return Ok(Start::NOTHING);
    };
    match splice(from.as_raw_fd(), pipe.write_fd(), CHUNK) {
        Ok(n) if n > 0 => pipe.pending = n,
        // EOF is seen again by the loop, which passes it on.
        Ok(_) => {
            recycle(pipe);
            return Ok(Start::NOTHING);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            recycle(pipe);
            return Ok(Start::NOTHING);
        }
        Err(e) => {
            recycle(pipe);
            return Err(e);
        }
    }
    let moved = match splice(pipe.read_fd(), to.as_raw_fd(), pipe.pending) {
        Ok(m) => {
            pipe.pending -= m;
            m as u64
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        // The pipe holds bytes of this connection: dropping it closes it.
        Err(e) => return Err(e),
    };
    let pipe = if pipe.pending == 0 {
        recycle(pipe);
        None
    } else {
        Some(pipe)
    };
    Ok(Start { pipe, moved })
}

fn dup(s: &TcpStream) -> io::Result<OwnedFd> {
    s.as_fd().try_clone_to_owned()
}

/// How often live traffic counters are brought up to date while a relay runs.
const TALLY_EVERY: Duration = Duration::from_millis(500);

/// Takes a socket out of tokio's reactor: the descriptor itself, no duplicate.
fn owned(s: TcpStream) -> io::Result<OwnedFd> {
    Ok(OwnedFd::from(s.into_std()?))
}

impl DataPlane for UringDataPlane {
    /// Hands the relay to a loop at once (after one pass here).
    fn relay<'a>(
        &'a self,
        a: &TcpStream,
        b: &TcpStream,
        tally_ab: Tally<'a>,
        tally_ba: Tally<'a>,
    ) -> RelayFuture<'a> {
        // Duplicate now, before returning: from here on the loop owns its own descriptors.
        let fds = dup(a).and_then(|a| Ok((a, dup(b)?)));
        Box::pin(async move {
            let (a, b) = fds?;
            let passes = first_pass(&a, &b).and_then(|ab| Ok((ab, first_pass(&b, &a)?)));
            let start = match passes {
                Ok(p) => p,
                Err(e) => {
                    // A broken stream must not look complete: reset both ends.
                    reset_on_close(&a);
                    reset_on_close(&b);
                    return Err(e);
                }
            };
            self.hand_over(a, b, start, tally_ab, tally_ba).await
        })
    }

    /// Relays on tokio (splice(2)) for the first [`HAND_OVER_AFTER`] turns, then, at the
    /// first moment both directions wait with nothing pending, hands the relay to a loop. A
    /// connection that ends sooner never leaves tokio.
    fn relay_owned<'a>(
        &'a self,
        a: TcpStream,
        b: TcpStream,
        tally_ab: Tally<'a>,
        tally_ba: Tally<'a>,
    ) -> RelayFuture<'a> {
        Box::pin(async move {
            let early = match relay_until_idle(&a, &b, tally_ab, tally_ba, HAND_OVER_AFTER).await {
                Ok(Ended::Done(ab, ba)) => return Ok((ab, ba)),
                Ok(Ended::Idle(ab, ba)) => (ab, ba),
                Err(e) => {
                    // A broken stream must not look complete: reset both ends.
                    reset_on_close(&a);
                    reset_on_close(&b);
                    return Err(e);
                }
            };
            let (a, b) = (owned(a)?, owned(b)?);
            // Both directions were idle: nothing is waiting for a first pass.
            let start = (Start::NOTHING, Start::NOTHING);
            let (ab, ba) = self.hand_over(a, b, start, tally_ab, tally_ba).await?;
            Ok((ab + early.0, ba + early.1))
        })
    }

    fn name(&self) -> &'static str {
        "io_uring (shared buffers, poll + splice(2))"
    }
}

impl UringDataPlane {
    /// Relays between sockets the loop now owns, from where `start` left each direction, as
    /// a loop's job; reports the loop's progress to the tallies while it runs.
    async fn hand_over(
        &self,
        a: OwnedFd,
        b: OwnedFd,
        (ab, ba): (Start, Start),
        tally_ab: Tally<'_>,
        tally_ba: Tally<'_>,
    ) -> io::Result<(u64, u64)> {
        let progress = Arc::new(Progress::default());
        progress.ab.store(ab.moved, Ordering::Relaxed);
        progress.ba.store(ba.moved, Ordering::Relaxed);
        let (done, mut result) = tokio::sync::oneshot::channel();
        self.submit(Job {
            a,
            b,
            start: (ab, ba),
            progress: progress.clone(),
            done,
        })?;
        let (mut told_ab, mut told_ba) = (0u64, 0u64);
        let mut tell = |p: &Progress| {
            let (ab, ba) = (p.ab.load(Ordering::Relaxed), p.ba.load(Ordering::Relaxed));
            if ab > told_ab {
                tally_ab(ab - told_ab);
                told_ab = ab;
            }
            if ba > told_ba {
                tally_ba(ba - told_ba);
                told_ba = ba;
            }
        };
        loop {
            tokio::select! {
                r = &mut result => {
                    tell(&progress);
                    return r.map_err(|_| io::Error::other("io_uring loop dropped the relay"))?;
                }
                _ = tokio::time::sleep(TALLY_EVERY) => tell(&progress),
            }
        }
    }
}

/// Starts the loops and routes every later plain relay of this process through them.
pub fn install(threads: usize) -> io::Result<usize> {
    let plane = UringDataPlane::start(threads)?;
    let n = plane.threads();
    dialback_tokio::relay::set_data_plane(Box::new(plane))
        .map_err(|_| io::Error::other("a data plane is already installed"))?;
    Ok(n)
}
