//! Counting the connections a graceful shutdown waits for.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Live client connections; shutdown waits until there are none (or its deadline passes).
#[derive(Debug, Default)]
pub struct Drain {
    active: AtomicUsize,
    /// The most connections alive at once since [`release_memory`] last looked.
    peak: AtomicUsize,
    idle: Notify,
}

/// Held for as long as a client connection lives.
#[derive(Debug)]
pub struct DrainGuard(Arc<Drain>);

impl Drain {
    pub fn guard(self: &Arc<Self>) -> DrainGuard {
        let n = self.active.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        DrainGuard(self.clone())
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Completes once no guard is alive.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// How many connections fewer than at the peak make it worth giving memory back.
const TRIM_AFTER: usize = 256;
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Gives the memory of closed connections back to the operating system once many have closed
/// (at least 256 fewer than at the peak, looked at every second). The allocator keeps freed memory
/// for reuse, so without this a process that once held 10,000 connections kept most of their
/// memory resident long after they were gone.
pub async fn release_memory(drain: Arc<Drain>) {
    loop {
        tokio::time::sleep(TRIM_EVERY).await;
        let now = drain.active();
        let peak = drain.peak.swap(now, Ordering::Relaxed);
        if peak >= now + TRIM_AFTER {
            trim();
        }
    }
}

#[cfg(target_env = "gnu")]
fn trim() {
    // SAFETY: malloc_trim only returns free memory of the allocator to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn idle_waits_for_the_last_guard() {
        let d = Arc::new(Drain::default());
        d.idle().await;
        let (a, b) = (d.guard(), d.guard());
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.idle().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
