//! Direct upstreams: which server of a service's `upstreams` a new client goes to, and which of
//! them are healthy, decided without I/O. The runtime dials, runs the health checks (a TCP
//! connect) and reports back; time is passed in.
//!
//! Health follows the usual load-balancer rule (HAProxy's `fall`/`rise`): a server is taken
//! out after `fall` failures in a row — failed health checks, or clients that could not connect
//! to it (passive detection) — and put back after `rise` health checks in a row succeed. Every
//! server starts healthy and is checked every `interval`, whatever its state, so a dead one is
//! noticed even without traffic and a revived one comes back without any.

use std::time::{Duration, Instant};

/// How new clients are spread over the healthy servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Each server in turn.
    #[default]
    RoundRobin,
    /// The server with the fewest connections open through the gateway (ties in turn).
    LeastConn,
}

impl Balance {
    pub fn name(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
        }
    }
}

/// Active health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between two checks of a server.
    pub interval: Duration,
    /// A check that has not connected after this long failed.
    pub timeout: Duration,
    /// Failures in a row (checks or clients) that take a server out.
    pub fall: u32,
    /// Successful checks in a row that put it back.
    pub rise: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            fall: 3,
            rise: 2,
        }
    }
}

/// A change of a server's health, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamEvent {
    Down { server: usize, reason: String },
    Up { server: usize },
}

#[derive(Debug, Clone)]
struct Server {
    up: bool,
    /// Connections open to it (reported by the runtime).
    active: u32,
    fails: u32,
    oks: u32,
    /// The last failure, for the order in which servers that are all down are tried.
    failed_at: Option<Instant>,
    next_check: Instant,
    /// A check is running: no second one until it is reported.
    checking: bool,
}

/// The balancing and health state of one direct service.
#[derive(Debug, Clone)]
pub struct Balancer {
    balance: Balance,
    health: HealthCheck,
    servers: Vec<Server>,
    /// Where the next round-robin turn starts.
    next: usize,
    events: Vec<UpstreamEvent>,
}

impl Balancer {
    /// `servers` upstreams, all healthy; their first checks are spread over one interval so
    /// that they do not all run at once.
    pub fn new(servers: usize, balance: Balance, health: HealthCheck, now: Instant) -> Self {
        let n = servers.max(1) as u32;
        let servers = (0..servers)
            .map(|i| Server {
                up: true,
                active: 0,
                fails: 0,
                oks: 0,
                failed_at: None,
                next_check: now + health.interval * (i as u32 + 1) / n,
                checking: false,
            })
            .collect();
        Balancer {
            balance,
            health,
            servers,
            next: 0,
            events: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    pub fn is_up(&self, server: usize) -> bool {
        self.servers.get(server).is_some_and(|s| s.up)
    }

    pub fn active(&self, server: usize) -> u32 {
        self.servers.get(server).map_or(0, |s| s.active)
    }

    /// The server a new connection should try, never one of `tried`. Healthy servers by the
    /// balancing rule; when none is left, the servers that are down, the longest-failed first
    /// (a check may not have noticed yet that one came back, and trying costs a refused
    /// connection, while refusing the client costs the client). `None` once every server was
    /// tried.
    pub fn pick(&mut self, tried: &[usize]) -> Option<usize> {
        let n = self.servers.len();
        let servers = &self.servers;
        let start = self.next;
        let candidates = |up: bool| {
            (0..n)
                .map(move |k| (start + k) % n)
                .filter(move |i| !tried.contains(i) && servers[*i].up == up)
        };
        let healthy = match self.balance {
            Balance::RoundRobin => candidates(true).next(),
            // `min_by_key` keeps the first of equals: ties go in turn.
            Balance::LeastConn => candidates(true).min_by_key(|i| servers[*i].active),
        };
        let chosen = healthy.or_else(|| candidates(false).min_by_key(|i| servers[*i].failed_at))?;
        self.next = (chosen + 1) % n;
        Some(chosen)
    }

    /// A client's connection to `server` succeeded: it counts as open until released.
    pub fn handle_connected(&mut self, server: usize) {
        if let Some(s) = self.servers.get_mut(server) {
            s.active += 1;
            // Passive success: failures must be in a row to count.
            if s.up {
                s.fails = 0;
            }
        }
    }

    /// A connection counted by [`Balancer::handle_connected`] closed.
    pub fn handle_released(&mut self, server: usize) {
        if let Some(s) = self.servers.get_mut(server) {
            s.active = s.active.saturating_sub(1);
        }
    }

    /// A client could not connect to `server` (passive detection).
    pub fn handle_connect_failed(&mut self, now: Instant, server: usize, reason: &str) {
        self.failure(now, server, reason);
    }

    /// The next server whose health check is due, marked as being checked; call until `None`,
    /// and report each with [`Balancer::handle_check`].
    #[must_use]
    pub fn poll_check(&mut self, now: Instant) -> Option<usize> {
        let i = self
            .servers
            .iter()
            .position(|s| !s.checking && s.next_check <= now)?;
        self.servers[i].checking = true;
        Some(i)
    }

    /// The outcome of a health check of `server` started at [`Balancer::poll_check`];
    /// `failure` says why it failed.
    pub fn handle_check(&mut self, now: Instant, server: usize, failure: Option<&str>) {
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        s.checking = false;
        s.next_check = now + self.health.interval;
        match failure {
            Some(reason) => self.failure(now, server, &format!("health check: {reason}")),
            None => {
                s.fails = 0;
                if !s.up {
                    s.oks += 1;
                    if s.oks >= self.health.rise {
                        s.up = true;
                        s.oks = 0;
                        self.events.push(UpstreamEvent::Up { server });
                    }
                }
            }
        }
    }

    fn failure(&mut self, now: Instant, server: usize, reason: &str) {
        let fall = self.health.fall;
        let Some(s) = self.servers.get_mut(server) else {
            return;
        };
        s.oks = 0;
        s.failed_at = Some(now);
        if s.up {
            s.fails += 1;
            if s.fails >= fall {
                s.up = false;
                s.fails = 0;
                self.events.push(UpstreamEvent::Down {
                    server,
                    reason: format!("{reason} ({fall} failures in a row)"),
                });
            }
        }
    }

    /// When the next health check is due (the runtime wakes then and calls
    /// [`Balancer::poll_check`]).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.servers
            .iter()
            .filter(|s| !s.checking)
            .map(|s| s.next_check)
            .min()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<UpstreamEvent> {
        if self.events.is_empty() {
            None
        } else {
            Some(self.events.remove(0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[allow(clippy::disallowed_methods)]
    fn epoch() -> Instant {
        Instant::now()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn health() -> HealthCheck {
        HealthCheck {
            interval: ms(1000),
            timeout: ms(500),
            fall: 3,
            rise: 2,
        }
    }

    #[test]
    fn round_robin_takes_each_server_in_turn() {
        let mut b = Balancer::new(3, Balance::RoundRobin, health(), epoch());
        let picks: Vec<_> = (0..7).map(|_| b.pick(&[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
        // A retry skips what was tried, and the turn goes on after it.
        assert_eq!(b.pick(&[1]), Some(2));
        assert_eq!(b.pick(&[]), Some(0));
        assert_eq!(b.pick(&[0, 1, 2]), None);
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_and_rotates_ties() {
        let mut b = Balancer::new(3, Balance::LeastConn, health(), epoch());
        for _ in 0..3 {
            b.handle_connected(0);
        }
        b.handle_connected(1);
        assert_eq!(b.pick(&[]), Some(2));
        b.handle_connected(2);
        // 1 and 2 tie at one connection: in turn, after the last pick (2).
        assert_eq!(b.pick(&[]), Some(1));
        b.handle_released(0);
        b.handle_released(0);
        b.handle_released(0);
        assert_eq!(b.pick(&[]), Some(0));
        assert_eq!(b.active(0), 0);
        b.handle_released(0);
        assert_eq!(b.active(0), 0, "never below zero");
    }

    #[test]
    fn fall_failures_in_a_row_take_a_server_out_and_rise_checks_bring_it_back() {
        let t0 = epoch();
        let mut b = Balancer::new(2, Balance::RoundRobin, health(), t0);
        b.handle_connect_failed(t0, 0, "refused");
        b.handle_connect_failed(t0, 0, "refused");
        // A success in between resets the count.
        b.handle_connected(0);
        b.handle_connect_failed(t0, 0, "refused");
        b.handle_connect_failed(t0, 0, "refused");
        assert!(b.is_up(0));
        assert_eq!(b.poll_event(), None);
        b.handle_connect_failed(t0, 0, "refused");
        assert!(!b.is_up(0));
        match b.poll_event() {
            Some(UpstreamEvent::Down { server: 0, reason }) => {
                assert!(
                    reason.contains("refused") && reason.contains("3 failures"),
                    "{reason}"
                )
            }
            e => panic!("{e:?}"),
        }
        // Down: new clients go to the other one only.
        assert_eq!(
            (0..4).map(|_| b.pick(&[]).unwrap()).collect::<Vec<_>>(),
            [1; 4]
        );
        // Checks: the first success is not enough, a failure starts over, two in a row are.
        let mut now = t0;
        let mut check = |b: &mut Balancer, ok: bool| loop {
            now += ms(100);
            while let Some(i) = b.poll_check(now) {
                if i == 0 {
                    b.handle_check(now, 0, (!ok).then_some("refused"));
                    return;
                }
                b.handle_check(now, i, None);
            }
        };
        check(&mut b, true);
        assert!(!b.is_up(0));
        check(&mut b, false);
        check(&mut b, true);
        assert!(!b.is_up(0));
        check(&mut b, true);
        assert!(b.is_up(0));
        assert_eq!(b.poll_event(), Some(UpstreamEvent::Up { server: 0 }));
        assert_eq!(b.poll_event(), None);
    }

    #[test]
    fn with_every_server_down_the_longest_failed_is_tried_first() {
        let t0 = epoch();
        let mut b = Balancer::new(3, Balance::RoundRobin, health(), t0);
        for (i, at) in [(0, 30), (1, 10), (2, 20)] {
            for _ in 0..3 {
                b.handle_connect_failed(t0 + ms(at), i, "refused");
            }
        }
        assert!((0..3).all(|i| !b.is_up(i)));
        assert_eq!(b.pick(&[]), Some(1));
        assert_eq!(b.pick(&[1]), Some(2));
        assert_eq!(b.pick(&[1, 2]), Some(0));
        assert_eq!(b.pick(&[0, 1, 2]), None);
    }

    #[test]
    fn checks_are_spread_then_every_interval_and_one_at_a_time() {
        let t0 = epoch();
        let mut b = Balancer::new(4, Balance::RoundRobin, health(), t0);
        assert_eq!(b.poll_timeout(), Some(t0 + ms(250)));
        assert_eq!(b.poll_check(t0 + ms(249)), None);
        assert_eq!(b.poll_check(t0 + ms(250)), Some(0));
        // Not checked again while its check runs.
        assert_eq!(b.poll_check(t0 + ms(5000)), Some(1));
        assert_eq!(b.poll_timeout(), Some(t0 + ms(750)));
        b.handle_check(t0 + ms(300), 0, None);
        assert!(b.poll_timeout().unwrap() <= t0 + ms(1300));
        let mut seen = vec![];
        while let Some(i) = b.poll_check(t0 + ms(1300)) {
            seen.push(i);
        }
        assert_eq!(seen, [0, 2, 3]);
    }

    #[test]
    fn out_of_range_reports_are_ignored() {
        let t0 = epoch();
        let mut b = Balancer::new(1, Balance::LeastConn, health(), t0);
        b.handle_connected(7);
        b.handle_released(7);
        b.handle_connect_failed(t0, 7, "x");
        b.handle_check(t0, 7, None);
        assert_eq!(b.poll_event(), None);
        let mut none = Balancer::new(0, Balance::RoundRobin, health(), t0);
        assert_eq!(none.pick(&[]), None);
        assert_eq!(none.poll_timeout(), None);
    }

    proptest! {
        /// Whatever happens, a pick is in range and untried, a healthy server is preferred
        /// while one is untried, and the health state only changes through fall/rise.
        #[test]
        fn random_reports_keep_the_invariants(
            n in 1usize..6,
            least in any::<bool>(),
            ops in proptest::collection::vec((0u8..5, 0usize..8, any::<bool>()), 1..200),
        ) {
            let t0 = epoch();
            let policy = if least { Balance::LeastConn } else { Balance::RoundRobin };
            let mut b = Balancer::new(n, policy, health(), t0);
            let mut now = t0;
            let mut open = vec![0u32; n];
            let mut was_up = vec![true; n];
            for (op, i, flag) in ops {
                let i = i % n;
                now += ms(137);
                match op {
                    0 => {
                        let tried: Vec<usize> = (0..n).filter(|k| (k + i) % 3 == 0).collect();
                        let any_up_untried = (0..n).any(|k| b.is_up(k) && !tried.contains(&k));
                        match b.pick(&tried) {
                            Some(p) => {
                                prop_assert!(p < n && !tried.contains(&p));
                                prop_assert!(b.is_up(p) || !any_up_untried);
                            }
                            None => prop_assert!(tried.len() == n),
                        }
                    }
                    1 => { b.handle_connected(i); open[i] += 1; }
                    2 => if open[i] > 0 { b.handle_released(i); open[i] -= 1; },
                    3 => b.handle_connect_failed(now, i, "refused"),
                    _ => while let Some(c) = b.poll_check(now) {
                        b.handle_check(now, c, flag.then_some("timeout"));
                    },
                }
                for (k, o) in open.iter().enumerate() {
                    prop_assert_eq!(b.active(k), *o);
                }
                // Every change of health is announced, and only changes are.
                let mut changed = vec![false; n];
                while let Some(e) = b.poll_event() {
                    match e {
                        UpstreamEvent::Down { server, .. } => {
                            prop_assert!(was_up[server] && !b.is_up(server));
                            changed[server] = true;
                        }
                        UpstreamEvent::Up { server } => {
                            prop_assert!(!was_up[server] && b.is_up(server));
                            changed[server] = true;
                        }
                    }
                }
                for k in 0..n {
                    prop_assert_eq!(was_up[k] != b.is_up(k), changed[k]);
                    was_up[k] = b.is_up(k);
                }
                if let Some(t) = b.poll_timeout() {
                    prop_assert!(t <= now + health().interval);
                }
            }
        }
    }
}
