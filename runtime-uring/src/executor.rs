//! One relay loop: a single-threaded executor whose only reactor is an io_uring. Futures wait
//! for socket readiness with [`readiness`] (IORING_OP_POLL_ADD) or move messages through the
//! loop's shared buffers with [`recv`] and [`send`]; new jobs arrive on a channel announced
//! through an eventfd that the ring reads.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{opcode, squeue, types, IoUring};
use tracing::{error, warn};

use crate::Job;

/// user_data of the eventfd read that announces jobs.
const UD_WAKE: u64 = u64::MAX;
/// user_data of cancellations; their own completions need no handling.
const UD_IGNORE: u64 = u64::MAX - 1;

/// The loop's receive buffers, shared by all its relays through a buffer ring
/// (IORING_REGISTER_PBUF_RING): the kernel takes one only when bytes arrive, so an idle relay
/// holds none and the loop's memory does not grow with the number of connections; giving one
/// back is a write to the shared ring, not a request.
pub(crate) const BUF_SIZE: usize = 8 * 1024;
/// Receive buffers per loop by default: 512 KiB, touched only as they are used.
pub(crate) const BUF_COUNT: u16 = 64;
/// Buffer group id of the loop's receive buffers.
const BGID: u16 = 1;

enum Op {
    Free,
    /// Submitted. `holds`: a loop buffer the kernel reads from while the operation runs (a
    /// send's), which must not be handed out again before it completes.
    Waiting {
        waker: Option<Waker>,
        holds: Option<u16>,
    },
    Done {
        res: i32,
        flags: u32,
        holds: Option<u16>,
    },
    /// Its future was dropped; a cancellation is on its way. When the operation completes,
    /// the buffers it held or received go back to the kernel and the slot is freed.
    Abandoned {
        holds: Option<u16>,
    },
}

struct Reactor {
    ring: IoUring,
    ops: Vec<Op>,
    free: Vec<usize>,
    /// The loop's receive buffers of BUF_SIZE each, leaked: the kernel may write into them until the ring
    /// is gone, and a loop lives as long as its process.
    bufs: &'static mut [u8],
    /// None when the kernel refused the buffer ring (or there are no buffers): every
    /// receive then fails with ENOBUFS and the relays splice.
    pool: Option<BufRing>,
}

/// The ring the kernel picks receive buffers from.
struct BufRing {
    /// Page-aligned, leaked like the buffers.
    entries: *mut types::BufRingEntry,
    mask: u16,
    /// Entries published so far (wrapping); the kernel consumes from its own head.
    tail: u16,
}

impl BufRing {
    /// Registers a ring for `count` buffers, or says why not.
    fn register(ring: &IoUring, count: u16) -> io::Result<BufRing> {
        let size = count
            .max(1)
            .checked_next_power_of_two()
            .filter(|n| *n <= 32768);
        let size = size.ok_or_else(|| io::Error::other("too many receive buffers"))?;
        let layout = std::alloc::Layout::from_size_align(usize::from(size) * 16, 4096)
            .map_err(io::Error::other)?;
        // SAFETY: a non-zero size; the memory is checked for null, then leaked on success.
        let mem = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        if mem.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // SAFETY: `mem` holds `size` entries and stays valid for the ring's life (leaked).
        let r = unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(mem as u64, size, BGID, 0)
        };
        if let Err(e) = r {
            // SAFETY: allocated above with this layout, not registered.
            unsafe { std::alloc::dealloc(mem.cast(), layout) };
            return Err(e);
        }
        Ok(BufRing {
            entries: mem,
            mask: size - 1,
            tail: 0,
        })
    }

    /// Publishes buffer `bid` at `addr` for the kernel to fill.
    fn publish(&mut self, addr: *const u8, bid: u16) {
        // SAFETY: the index is masked into the ring; the kernel reads entries only up to the
        // tail, which is released below, after the entry is written.
        unsafe {
            let e = &mut *self.entries.add(usize::from(self.tail & self.mask));
            e.set_addr(addr as u64);
            e.set_len(BUF_SIZE as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.entries).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Reactor {
    fn push(&mut self, e: &squeue::Entry) {
        // SAFETY: our entries reference descriptors, the leaked eventfd read buffer, and the
        // leaked loop buffers, which outlive the ring; a buffer is never lent to two
        // operations at once (see `Lent`).
        while unsafe { self.ring.submission().push(e) }.is_err() {
            if let Err(err) = self.ring.submit() {
                warn!("io_uring submit failed: {err}");
            }
        }
    }

    fn alloc(&mut self, op: Op) -> usize {
        match self.free.pop() {
            Some(k) => {
                self.ops[k] = op;
                k
            }
            None => {
                self.ops.push(op);
                self.ops.len() - 1
            }
        }
    }

    fn release(&mut self, k: usize) {
        self.ops[k] = Op::Free;
        self.free.push(k);
    }

    /// Gives loop buffer `bid` back to the kernel's pool.
    fn give_back(&mut self, bid: u16) {
        let addr = self.bufs[usize::from(bid) * BUF_SIZE..].as_ptr();
        if let Some(pool) = &mut self.pool {
            pool.publish(addr, bid);
        }
    }

    /// Gives back what a finished operation held or received.
    fn give_back_all(&mut self, holds: Option<u16>, flags: u32) {
        if let Some(bid) = holds {
            self.give_back(bid);
        }
        if let Some(bid) = io_uring::cqueue::buffer_select(flags) {
            self.give_back(bid);
        }
    }

    fn buf(&self, bid: u16, from: usize, to: usize) -> *const u8 {
        self.bufs[usize::from(bid) * BUF_SIZE..][from..to].as_ptr()
    }
}

thread_local! {
    static REACTOR: RefCell<Option<Reactor>> = const { RefCell::new(None) };
}

fn with_reactor<T>(f: impl FnOnce(&mut Reactor) -> T) -> T {
    REACTOR.with(|r| {
        let mut r = r.borrow_mut();
        // Only futures spawned by `run` on this thread call in here.
        f(r.as_mut()
            .expect("io_uring operation awaited outside an io_uring loop"))
    })
}

/// One io_uring operation: submitted when first polled, resolved with the completion's result
/// and flags. Dropped before it completes, it is cancelled.
struct Submit {
    entry: Option<squeue::Entry>,
    holds: Option<u16>,
    key: Option<usize>,
}

impl Submit {
    fn new(entry: squeue::Entry, holds: Option<u16>) -> Submit {
        Submit {
            entry: Some(entry),
            holds,
            key: None,
        }
    }

    /// Submitted and not yet resolved: the kernel may still use what the operation holds.
    fn in_flight(&self) -> bool {
        self.key.is_some()
    }
}

impl Future for Submit {
    type Output = (i32, u32);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, u32)> {
        let this = &mut *self;
        with_reactor(|r| match this.key {
            None => {
                let Some(entry) = this.entry.take() else {
                    // Polled again after it resolved: a bug of the caller, not of the input.
                    return Poll::Ready((-libc::EINVAL, 0));
                };
                let k = r.alloc(Op::Waiting {
                    waker: Some(cx.waker().clone()),
                    holds: this.holds,
                });
                r.push(&entry.user_data(k as u64));
                this.key = Some(k);
                Poll::Pending
            }
            Some(k) => match &mut r.ops[k] {
                Op::Done { res, flags, .. } => {
                    let out = (*res, *flags);
                    r.release(k);
                    this.key = None;
                    Poll::Ready(out)
                }
                Op::Waiting { waker, .. } => {
                    *waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                Op::Free | Op::Abandoned { .. } => {
                    this.key = None;
                    Poll::Ready((-libc::ECANCELED, 0))
                }
            },
        })
    }
}

impl Drop for Submit {
    fn drop(&mut self) {
        let Some(k) = self.key.take() else { return };
        with_reactor(|r| match r.ops[k] {
            Op::Waiting { holds, .. } => {
                // The kernel holds a reference to the socket (and maybe a buffer) while the
                // operation runs: cancel it, or the socket would stay open after its last
                // descriptor is closed.
                r.ops[k] = Op::Abandoned { holds };
                let e = opcode::AsyncCancel::new(k as u64)
                    .build()
                    .user_data(UD_IGNORE);
                r.push(&e);
            }
            Op::Done { flags, holds, .. } => {
                r.give_back_all(holds, flags);
                r.release(k);
            }
            Op::Free | Op::Abandoned { .. } => {}
        });
    }
}

fn result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

/// Resolves when `fd` is ready for `events` (POLLIN / POLLOUT; errors and hang-ups too) with
/// the returned poll mask, or with an error if the wait itself failed.
pub(crate) async fn readiness(fd: RawFd, events: u32) -> io::Result<u32> {
    let e = opcode::PollAdd::new(types::Fd(fd), events).build();
    let (res, _) = Submit::new(e, None).await;
    result(res).map(|m| m as u32)
}

/// Bytes received into one of the loop's buffers. It goes back to the kernel's pool when
/// dropped, or, if dropped while a send of it runs, when that send completes.
pub(crate) struct Lent {
    bid: u16,
    len: usize,
}

impl Lent {
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        with_reactor(|r| r.give_back(self.bid));
    }
}

/// Receives what `fd` has into one of the loop's buffers, waiting for it (on the ring) if
/// need be. `Ok(None)` at EOF; `ENOBUFS` when every buffer is lent.
pub(crate) async fn recv(fd: RawFd) -> io::Result<Option<Lent>> {
    let e = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), BUF_SIZE as u32)
        .buf_group(BGID)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT);
    let (res, flags) = Submit::new(e, None).await;
    let bid = io_uring::cqueue::buffer_select(flags);
    let lent = bid.map(|bid| Lent { bid, len: 0 });
    let n = result(res)?;
    match lent {
        Some(mut l) if n > 0 => {
            l.len = n;
            Ok(Some(l))
        }
        // EOF (a buffer taken for it goes back as `lent` drops).
        _ if n == 0 => Ok(None),
        _ => Err(io::Error::other(
            "io_uring receive completed without a buffer",
        )),
    }
}

/// Sends `lent[from..]` to `fd`, waiting (on the ring) for room if need be; returns the
/// buffer and how many bytes went.
pub(crate) async fn send(fd: RawFd, lent: Lent, from: usize) -> io::Result<(Lent, usize)> {
    let ptr = with_reactor(|r| r.buf(lent.bid, from, lent.len));
    let e = opcode::Send::new(types::Fd(fd), ptr, (lent.len - from) as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build();
    let mut op = Sending {
        op: Submit::new(e, Some(lent.bid)),
        lent: Some(lent),
    };
    let (res, _) = (&mut op.op).await;
    let lent = op
        .lent
        .take()
        .expect("the buffer stays with its send until it completes");
    Ok((lent, result(res)?))
}

/// A send and the buffer it reads: dropped while the kernel still reads the buffer, the
/// buffer is left to the abandoned operation, which gives it back when it completes.
struct Sending {
    op: Submit,
    lent: Option<Lent>,
}

impl Drop for Sending {
    fn drop(&mut self) {
        if self.op.in_flight() {
            if let Some(l) = self.lent.take() {
                std::mem::forget(l);
            }
        }
    }
}

struct TaskWaker {
    id: usize,
    ready: Arc<Mutex<Vec<usize>>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.id);
    }
}

/// A relay and the waker that re-queues it (made once, so polling never allocates).
type Task = (Pin<Box<dyn Future<Output = ()>>>, Waker);

/// The loop's ring. Only this thread ever submits, so the kernel can keep completion work
/// for the moment the loop asks for events (DEFER_TASKRUN, Linux 6.1) instead of interrupting
/// the thread for each socket event with an inter-processor wake-up: under small keep-alive
/// requests that wake-up was the largest single cost of the loop (15.8% of the gateway's
/// cycles in `sock_def_readable`, against 7.4% for the epoll runtime). Older kernels get
/// COOP_TASKRUN (5.19), or a plain ring.
fn new_ring() -> io::Result<IoUring> {
    const ENTRIES: u32 = 1024;
    if let Ok(ring) = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(ENTRIES)
    {
        return Ok(ring);
    }
    if let Ok(ring) = IoUring::builder().setup_coop_taskrun().build(ENTRIES) {
        return Ok(ring);
    }
    IoUring::new(ENTRIES)
}

/// Runs one loop until the job channel closes (the process exits first, in practice).
/// Reports the eventfd that wakes it, or why it could not start.
pub(crate) fn run(
    jobs: mpsc::Receiver<Job>,
    buffers: u16,
    started: mpsc::SyncSender<io::Result<OwnedFd>>,
) {
    let setup = (|| {
        let ring = new_ring()?;
        // SAFETY: plain eventfd creation.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nothing else.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let dup = efd.try_clone()?;
        Ok((ring, efd, dup))
    })();
    let (ring, efd, wake_fd) = match setup {
        Ok(v) => v,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    // Should the kernel refuse the buffer ring, every message is spliced instead.
    let pool = match buffers {
        0 => None,
        n => match BufRing::register(&ring, n) {
            Ok(p) => Some(p),
            Err(e) => {
                warn!("io_uring buffer ring refused ({e}): relays splice every message");
                None
            }
        },
    };
    REACTOR.with(|r| {
        *r.borrow_mut() = Some(Reactor {
            ring,
            ops: Vec::new(),
            free: Vec::new(),
            bufs: vec![0u8; usize::from(buffers) * BUF_SIZE].leak(),
            pool,
        })
    });
    if started.send(Ok(wake_fd)).is_err() {
        return;
    }
    let ready: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks: Vec<Option<Task>> = Vec::new();
    let mut free_tasks: Vec<usize> = Vec::new();
    let mut wake_buf: Box<[u8; 8]> = Box::new([0; 8]);
    let arm_wake = |buf: &mut [u8; 8]| {
        let e = opcode::Read::new(types::Fd(efd.as_raw_fd()), buf.as_mut_ptr(), 8)
            .build()
            .user_data(UD_WAKE);
        with_reactor(|r| r.push(&e));
    };
    arm_wake(&mut wake_buf);
    with_reactor(|r| {
        for bid in 0..buffers {
            r.give_back(bid);
        }
    });
    let mut batch: Vec<usize> = Vec::new();
    let mut completions: Vec<(u64, i32, u32)> = Vec::new();
    loop {
        // New jobs become tasks.
        loop {
            match jobs.try_recv() {
                Ok(job) => {
                    let fut = Box::pin(crate::relay::run_job(job));
                    let id = free_tasks.pop().unwrap_or_else(|| {
                        tasks.push(None);
                        tasks.len() - 1
                    });
                    let waker = Waker::from(Arc::new(TaskWaker {
                        id,
                        ready: ready.clone(),
                    }));
                    tasks[id] = Some((fut, waker));
                    ready.lock().unwrap_or_else(|p| p.into_inner()).push(id);
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        }
        // Poll every woken task.
        std::mem::swap(
            &mut batch,
            &mut ready.lock().unwrap_or_else(|p| p.into_inner()),
        );
        for id in batch.drain(..) {
            let Some(Some((task, waker))) = tasks.get_mut(id) else {
                continue;
            };
            let mut cx = Context::from_waker(waker);
            if task.as_mut().poll(&mut cx).is_ready() {
                tasks[id] = None;
                free_tasks.push(id);
            }
        }
        let more = !ready.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
        // Submit what the tasks queued; sleep for a completion only when nothing is runnable.
        let submitted = with_reactor(|r| {
            if more {
                r.ring.submit()
            } else {
                r.ring.submit_and_wait(1)
            }
        });
        if let Err(e) = submitted {
            if e.raw_os_error() != Some(libc::EINTR) {
                error!("io_uring wait failed: {e}");
            }
        }
        with_reactor(|r| {
            completions.extend(
                r.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
        });
        for (ud, res, flags) in completions.drain(..) {
            match ud {
                UD_WAKE => arm_wake(&mut wake_buf),
                UD_IGNORE => {}
                k => with_reactor(|r| {
                    let k = k as usize;
                    match std::mem::replace(&mut r.ops[k], Op::Free) {
                        Op::Waiting { waker, holds } => {
                            r.ops[k] = Op::Done { res, flags, holds };
                            if let Some(w) = waker {
                                w.wake();
                            }
                        }
                        Op::Abandoned { holds } => {
                            r.give_back_all(holds, flags);
                            r.release(k);
                        }
                        other => r.ops[k] = other,
                    }
                }),
            }
        }
    }
}
