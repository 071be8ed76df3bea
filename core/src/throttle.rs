//! Slows down password guessing: each source address that fails to authenticate waits longer
//! before its next connection is served, so a flood of wrong passwords costs the attacker time
//! while agents from other addresses are not affected at all.
//!
//! The table is bounded: when it is full, the entry heard from least recently is forgotten.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::acl::canonical;

/// Failures forgiven before any delay: a mistyped password is not an attack.
pub const FREE_FAILURES: u32 = 3;
/// The first delay; it doubles with every further failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(200);
/// The longest delay, kept well below an agent's connect timeout so that a good agent behind
/// the same address (a shared NAT) still registers.
pub const MAX_DELAY: Duration = Duration::from_secs(5);
/// An address without failures for this long starts afresh.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Addresses remembered at once.
pub const MAX_ENTRIES: usize = 8192;

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last: Instant,
}

#[derive(Debug, Default)]
pub struct AuthThrottle {
    entries: BTreeMap<IpAddr, Entry>,
}

impl AuthThrottle {
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a new connection from `ip` waits before it is served.
    pub fn delay(&self, now: Instant, ip: IpAddr) -> Duration {
        match self.entries.get(&canonical(ip)) {
            Some(e) if now.saturating_duration_since(e.last) < FORGET_AFTER => {
                delay_for(e.failures)
            }
            _ => Duration::ZERO,
        }
    }

    /// Failed authentications from `ip` so far (0 once forgotten).
    pub fn failures(&self, now: Instant, ip: IpAddr) -> u32 {
        match self.entries.get(&canonical(ip)) {
            Some(e) if now.saturating_duration_since(e.last) < FORGET_AFTER => e.failures,
            _ => 0,
        }
    }

    /// Records a failed authentication from `ip`; returns the delay its next connection gets.
    pub fn record_failure(&mut self, now: Instant, ip: IpAddr) -> Duration {
        let ip = canonical(ip);
        if !self.entries.contains_key(&ip) && self.entries.len() >= MAX_ENTRIES {
            self.evict(now);
        }
        let e = self.entries.entry(ip).or_insert(Entry {
            failures: 0,
            last: now,
        });
        if now.saturating_duration_since(e.last) >= FORGET_AFTER {
            e.failures = 0;
        }
        e.failures = e.failures.saturating_add(1);
        e.last = now;
        delay_for(e.failures)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn evict(&mut self, now: Instant) {
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.last) < FORGET_AFTER);
        if self.entries.len() >= MAX_ENTRIES {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last)
                .map(|(ip, _)| *ip)
            {
                self.entries.remove(&oldest);
            }
        }
    }
}

fn delay_for(failures: u32) -> Duration {
    let Some(over) = failures.checked_sub(FREE_FAILURES).filter(|n| *n > 0) else {
        return Duration::ZERO;
    };
    FIRST_DELAY
        .saturating_mul(1u32 << (over - 1).min(16))
        .min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' only clock read; the core itself never reads the clock.
    #[allow(clippy::disallowed_methods)]
    fn epoch() -> Instant {
        Instant::now()
    }

    #[test]
    fn grows_caps_and_is_forgotten() {
        let t0 = epoch();
        let mut t = AuthThrottle::new();
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let mut last = Duration::ZERO;
        for i in 1..=20 {
            let d = t.record_failure(t0, a);
            assert!(d >= last, "failure {i}: {d:?} < {last:?}");
            if i <= FREE_FAILURES {
                assert_eq!(d, Duration::ZERO);
            }
            last = d;
        }
        assert_eq!(last, MAX_DELAY);
        assert_eq!(t.delay(t0, a), MAX_DELAY);
        assert_eq!(t.delay(t0, b), Duration::ZERO);
        // The same address seen through a dual-stack socket.
        assert_eq!(
            t.delay(t0, "::ffff:198.51.100.1".parse().unwrap()),
            MAX_DELAY
        );
        assert_eq!(t.delay(t0 + FORGET_AFTER, a), Duration::ZERO);
        assert_eq!(t.record_failure(t0 + FORGET_AFTER, a), Duration::ZERO);
    }

    #[test]
    fn bounded() {
        let t0 = epoch();
        let mut t = AuthThrottle::new();
        for i in 0..(MAX_ENTRIES as u32 + 100) {
            t.record_failure(
                t0 + Duration::from_millis(u64::from(i)),
                IpAddr::from(i.to_be_bytes()),
            );
        }
        assert_eq!(t.len(), MAX_ENTRIES);
        // The newest are kept.
        let newest = IpAddr::from((MAX_ENTRIES as u32 + 99).to_be_bytes());
        assert_eq!(t.failures(t0 + Duration::from_secs(60), newest), 1);
    }
}
