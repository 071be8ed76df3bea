//! One relay loop: a single-threaded executor whose only reactor is an io_uring. Futures wait
//! for socket readiness with [`readiness`] (IORING_OP_POLL_ADD); new jobs arrive on a channel
//! announced through an eventfd that the ring reads.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{opcode, squeue, types, IoUring};
use tracing::{error, warn};

use crate::Job;

/// user_data of the eventfd read that announces jobs.
const UD_WAKE: u64 = u64::MAX;
/// user_data of cancellations; their own completions need no handling.
const UD_CANCEL: u64 = u64::MAX - 1;

enum Op {
    Free,
    Waiting(Option<Waker>),
    Done(i32),
    /// Its future was dropped; a cancellation is on its way, then the slot is freed.
    Abandoned,
}

struct Reactor {
    ring: IoUring,
    ops: Vec<Op>,
    free: Vec<usize>,
}

impl Reactor {
    fn push(&mut self, e: &squeue::Entry) {
        // SAFETY: our entries reference only descriptors (no buffers, except the eventfd read
        // buffer, which lives as long as the loop).
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
}

thread_local! {
    static REACTOR: RefCell<Option<Reactor>> = const { RefCell::new(None) };
}

fn with_reactor<T>(f: impl FnOnce(&mut Reactor) -> T) -> T {
    REACTOR.with(|r| {
        let mut r = r.borrow_mut();
        // Only futures spawned by `run` on this thread call in here.
        f(r.as_mut()
            .expect("readiness awaited outside an io_uring loop"))
    })
}

/// Resolves when `fd` is ready for `events` (POLLIN / POLLOUT; errors and hang-ups too) with
/// the returned poll mask, or with an error if the wait itself failed.
pub(crate) fn readiness(fd: RawFd, events: u32) -> Readiness {
    Readiness {
        fd,
        events,
        key: None,
    }
}

pub(crate) struct Readiness {
    fd: RawFd,
    events: u32,
    key: Option<usize>,
}

impl Future for Readiness {
    type Output = io::Result<u32>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u32>> {
        let (fd, events, key) = (self.fd, self.events, self.key);
        let out = with_reactor(|r| match key {
            None => {
                let k = r.alloc(Op::Waiting(Some(cx.waker().clone())));
                let e = opcode::PollAdd::new(types::Fd(fd), events)
                    .build()
                    .user_data(k as u64);
                r.push(&e);
                (Some(k), Poll::Pending)
            }
            Some(k) => match &mut r.ops[k] {
                Op::Done(res) => {
                    let res = *res;
                    r.release(k);
                    let out = if res < 0 {
                        Err(io::Error::from_raw_os_error(-res))
                    } else {
                        Ok(res as u32)
                    };
                    (None, Poll::Ready(out))
                }
                Op::Waiting(w) => {
                    *w = Some(cx.waker().clone());
                    (Some(k), Poll::Pending)
                }
                Op::Free | Op::Abandoned => (None, Poll::Ready(Err(io::Error::other("lost wait")))),
            },
        });
        self.key = out.0;
        out.1
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        let Some(k) = self.key.take() else { return };
        with_reactor(|r| match r.ops[k] {
            Op::Waiting(_) => {
                // The kernel holds a reference to the socket while the poll is armed: cancel it,
                // or the socket would stay open after its last descriptor is closed.
                r.ops[k] = Op::Abandoned;
                let e = opcode::AsyncCancel::new(k as u64)
                    .build()
                    .user_data(UD_CANCEL);
                r.push(&e);
            }
            Op::Done(_) => r.release(k),
            Op::Free | Op::Abandoned => {}
        });
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
pub(crate) fn run(jobs: mpsc::Receiver<Job>, started: mpsc::SyncSender<io::Result<OwnedFd>>) {
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
    REACTOR.with(|r| {
        *r.borrow_mut() = Some(Reactor {
            ring,
            ops: Vec::new(),
            free: Vec::new(),
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
    let mut batch: Vec<usize> = Vec::new();
    let mut completions: Vec<(u64, i32)> = Vec::new();
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
            completions.extend(r.ring.completion().map(|c| (c.user_data(), c.result())));
        });
        for (ud, res) in completions.drain(..) {
            match ud {
                UD_WAKE => arm_wake(&mut wake_buf),
                UD_CANCEL => {}
                k => with_reactor(|r| {
                    let k = k as usize;
                    match std::mem::replace(&mut r.ops[k], Op::Done(res)) {
                        Op::Waiting(w) => {
                            if let Some(w) = w {
                                w.wake();
                            }
                        }
                        Op::Abandoned => r.release(k),
                        other => r.ops[k] = other,
                    }
                }),
            }
        }
    }
}
