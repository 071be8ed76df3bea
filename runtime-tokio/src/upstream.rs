//! Direct services on tokio: the gateway dials one of a service's `upstreams` for each client,
//! as the core's [`Balancer`] decides, and runs its health checks (a TCP connect that must
//! succeed within `health_check_timeout`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use dialback_core::upstream::{Balancer, UpstreamEvent};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::metrics::{GatewayMetrics, UpstreamStats};
use crate::settings::{GatewayService, UpstreamSettings};

/// A client tries at most this many servers before it is given up.
const MAX_ATTEMPTS: usize = 3;

/// Every direct service of the gateway, replaced as a whole by a configuration reload.
pub(crate) struct Upstreams {
    groups: RwLock<HashMap<String, Arc<Group>>>,
    metrics: Arc<GatewayMetrics>,
}

/// One direct service: its servers, their balancer and their health-check task.
pub(crate) struct Group {
    service: String,
    settings: UpstreamSettings,
    balancer: Mutex<Balancer>,
    /// Wakes the health-check task when a check finished (its next deadline moved).
    wake: Arc<Notify>,
    stats: Vec<Arc<UpstreamStats>>,
    checker: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(t) = self.checker.get_mut().ok().and_then(Option::take) {
            t.abort();
        }
    }
}

/// A client's connection to one server, counted (for least_conn and metrics) until dropped.
pub(crate) struct Lease {
    group: Arc<Group>,
    server: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.group.lock().handle_released(self.server);
        self.group.stats[self.server]
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({}, {})", self.group.service, self.server)
    }
}

impl Upstreams {
    pub(crate) fn new(metrics: Arc<GatewayMetrics>) -> Self {
        Upstreams {
            groups: RwLock::new(HashMap::new()),
            metrics,
        }
    }

    /// The direct service `name`, if it is one.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Group>> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Installs the direct services of a (re)loaded configuration. A service whose upstream
    /// settings did not change keeps its group: health, counts and connections in progress.
    /// Others start afresh (every server healthy); removed ones stop their checks, and their
    /// connections in progress run on. Must run inside the tokio runtime.
    pub(crate) fn apply(&self, services: &[GatewayService]) {
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::new();
        let mut stats = Vec::new();
        for s in services {
            let Some(settings) = &s.upstreams else {
                continue;
            };
            let group = match groups.remove(&s.name) {
                Some(g) if g.settings == *settings => g,
                _ => Group::start(&s.name, settings.clone()),
            };
            stats.extend(group.stats.iter().cloned());
            next.insert(s.name.clone(), group);
        }
        *groups = next;
        self.metrics.set_upstreams(stats);
    }
}

impl Group {
    fn start(service: &str, settings: UpstreamSettings) -> Arc<Group> {
        let balancer = Balancer::new(
            settings.addrs.len(),
            settings.balance,
            settings.health,
            Instant::now(),
        );
        let stats = settings
            .addrs
            .iter()
            .map(|a| Arc::new(UpstreamStats::new(service, a)))
            .collect();
        let group = Arc::new(Group {
            service: service.to_owned(),
            settings,
            balancer: Mutex::new(balancer),
            wake: Arc::new(Notify::new()),
            stats,
            checker: Mutex::new(None),
        });
        let task = tokio::spawn(checker(Arc::downgrade(&group)));
        *group.checker.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        info!(
            service,
            upstreams = %group.settings.addrs.join(", "),
            balance = group.settings.balance.name(),
            "serving directly from upstreams"
        );
        group
    }

    fn lock(&self) -> MutexGuard<'_, Balancer> {
        self.balancer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs and counts what the balancer announced.
    fn drain_events(&self, b: &mut Balancer) {
        while let Some(e) = b.poll_event() {
            match e {
                UpstreamEvent::Down { server, reason } => {
                    self.stats[server].up.store(false, Ordering::Relaxed);
                    warn!(service = %self.service, upstream = %self.settings.addrs[server], "upstream down: {reason}");
                }
                UpstreamEvent::Up { server } => {
                    self.stats[server].up.store(true, Ordering::Relaxed);
                    info!(service = %self.service, upstream = %self.settings.addrs[server], "upstream up again: its health checks succeed");
                }
            }
        }
    }

    /// Connects a client to a server: the one the balancer picks, then (when that fails)
    /// others, at most [`MAX_ATTEMPTS`] in all. Each failure counts against its server.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        peer: SocketAddr,
    ) -> Result<(TcpStream, Lease), String> {
        let mut tried = Vec::new();
        let mut failures = Vec::new();
        while tried.len() < MAX_ATTEMPTS {
            let Some(server) = self.lock().pick(&tried) else {
                break;
            };
            tried.push(server);
            let addr = &self.settings.addrs[server];
            let why = match tokio::time::timeout(
                self.settings.connect_timeout,
                TcpStream::connect(addr.as_str()),
            )
            .await
            {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    self.lock().handle_connected(server);
                    let st = &self.stats[server];
                    st.active.fetch_add(1, Ordering::Relaxed);
                    st.total.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, service = %self.service, upstream = %addr, "client connected to upstream");
                    return Ok((
                        stream,
                        Lease {
                            group: self.clone(),
                            server,
                        },
                    ));
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no connection within {:?}", self.settings.connect_timeout),
            };
            self.stats[server]
                .connect_failures
                .fetch_add(1, Ordering::Relaxed);
            {
                let mut b = self.lock();
                b.handle_connect_failed(Instant::now(), server, &why);
                self.drain_events(&mut b);
            }
            info!(%peer, service = %self.service, upstream = %addr, "cannot connect to upstream: {why}; trying another");
            failures.push(format!("{addr}: {why}"));
        }
        Err(failures.join("; "))
    }
}

/// Runs the health checks of `group` until it is dropped.
async fn checker(group: Weak<Group>) {
    loop {
        let Some(g) = group.upgrade() else {
            return;
        };
        let now = Instant::now();
        let (due, next) = {
            let mut b = g.lock();
            let mut due = Vec::new();
            while let Some(i) = b.poll_check(now) {
                due.push(i);
            }
            (due, b.poll_timeout())
        };
        for server in due {
            tokio::spawn(check(Arc::downgrade(&g), server));
        }
        // The task must not keep its group alive: dropping the group is what stops it.
        let wake = g.wake.clone();
        drop(g);
        let sleep = next.map_or(Duration::from_secs(3600), |t| {
            t.saturating_duration_since(Instant::now())
        });
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// One health check: a TCP connection to the server, closed at once.
async fn check(group: Weak<Group>, server: usize) {
    let Some((addr, timeout)) = group
        .upgrade()
        .map(|g| (g.settings.addrs[server].clone(), g.settings.health.timeout))
    else {
        return;
    };
    let failure = match tokio::time::timeout(timeout, TcpStream::connect(addr.as_str())).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no connection within {timeout:?}")),
    };
    let Some(g) = group.upgrade() else {
        return;
    };
    if failure.is_some() {
        g.stats[server]
            .check_failures
            .fetch_add(1, Ordering::Relaxed);
    }
    {
        let mut b = g.lock();
        b.handle_check(Instant::now(), server, failure.as_deref());
        g.drain_events(&mut b);
    }
    g.wake.notify_one();
}
