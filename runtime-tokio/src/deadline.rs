//! A deadline for a connection's successive waits that costs no timer operation per wait.
//!
//! `tokio::time::timeout` registers a timer in the runtime's timer wheel each time a wait does
//! not finish at once, and takes it out again when the wait ends: two operations on a lock that
//! every worker thread shares, for each read of a keep-alive HTTP connection. Here a connection
//! keeps one timer. A wait whose deadline is later than the armed time (the usual case: each
//! request's deadline is later than the last one's) leaves the timer alone; when the timer
//! fires early, the wait checks its own deadline and moves the timer to it. Only a deadline
//! earlier than the armed time moves the timer at once.

use std::future::Future;
use std::pin::Pin;
use tokio::time::{Instant, Sleep};

/// The wait did not finish by its deadline.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Elapsed;

pub(crate) struct Deadline {
    sleep: Pin<Box<Sleep>>,
    /// When the timer fires (it may be in the past: fired, not yet moved). `None` until the
    /// first wait.
    armed: Option<Instant>,
}

impl Deadline {
    pub(crate) fn new() -> Deadline {
        // Not registered with the timer wheel until the first wait polls it.
        let far = Instant::now() + std::time::Duration::from_secs(86_400 * 365);
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(far)),
            armed: None,
        }
    }

    /// Runs `fut` until `at` (a `std::time::Instant` converts with `.into()`).
    pub(crate) async fn run<F: Future>(
        &mut self,
        at: Instant,
        fut: F,
    ) -> Result<F::Output, Elapsed> {
        if self.armed.is_none_or(|t| t > at) {
            self.arm(at);
        }
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                biased;
                r = &mut fut => return Ok(r),
                () = &mut self.sleep => {
                    if Instant::now() >= at {
                        return Err(Elapsed);
                    }
                    self.arm(at);
                }
            }
        }
    }

    fn arm(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
        self.armed = Some(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_ends_in_time_returns_its_output() {
        let mut d = Deadline::new();
        let at = Instant::now() + Duration::from_secs(5);
        let r = d
            .run(at, async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                7
            })
            .await;
        assert_eq!(r, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_its_deadline_elapses_at_the_deadline() {
        let mut d = Deadline::new();
        let start = Instant::now();
        let at = Instant::now() + Duration::from_secs(3);
        let r = d.run(at, std::future::pending::<()>()).await;
        assert_eq!(r, Err(Elapsed));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_millis(3100),
            "{waited:?}"
        );
    }

    /// Later deadlines leave the timer where it is; when it fires early, the wait goes on to
    /// its own deadline. An earlier deadline moves the timer at once.
    #[tokio::test(start_paused = true)]
    async fn later_and_earlier_deadlines_are_both_kept() {
        let mut d = Deadline::new();
        let start = Instant::now();
        // Arms the timer at +2 s.
        let quick = d.run(Instant::now() + Duration::from_secs(2), async { 1 });
        assert_eq!(quick.await, Ok(1));
        // A later deadline (+10 s): the timer at +2 s fires first and must not end the wait.
        let r = d
            .run(Instant::now() + Duration::from_secs(10), async {
                tokio::time::sleep(Duration::from_secs(6)).await;
                2
            })
            .await;
        assert_eq!(r, Ok(2));
        let r = d
            .run(
                Instant::now() + Duration::from_secs(10),
                std::future::pending::<()>(),
            )
            .await;
        assert_eq!(r, Err(Elapsed));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(16) && waited < Duration::from_millis(16_100),
            "{waited:?}"
        );
        // An earlier deadline than the armed one (+1 s after a wait armed far out).
        let _ = d
            .run(Instant::now() + Duration::from_secs(60), async { 3 })
            .await;
        let before = Instant::now();
        let r = d
            .run(
                Instant::now() + Duration::from_secs(1),
                std::future::pending::<()>(),
            )
            .await;
        assert_eq!(r, Err(Elapsed));
        let waited = before.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_millis(1100),
            "{waited:?}"
        );
    }
}
