//! Counters and gauges for the gateway and the agent, rendered in the Prometheus text
//! exposition format 0.0.4 and (gateway only) as a JSON status document.
//!
//! Everything on the hot path (a client connecting, bytes moving, a latency sample) is a
//! relaxed atomic operation. Rare events (an agent registering or leaving) take a short
//! mutex. Labelled counters keyed by a `&'static str` are append-only slot lists: the first
//! time a label value is seen it claims a slot, after that counting it is an atomic load and
//! an atomic add.
//!
//! Byte directions, on both sides: **up** is public client → private service (on the
//! gateway client → agent, on the agent gateway → local service), **down** is the reverse.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const GW: &str = "dialback_gateway_";
const AG: &str = "dialback_agent_";

/// Milliseconds since the Unix epoch by the system clock (0 if the clock is before 1970).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

/// How many distinct label values one labelled counter keeps apart; further values are
/// counted under `other`. Label values come from `&'static str` in the code, so this is never
/// reached in practice.
const LABEL_SLOTS: usize = 32;
const OVERFLOW_LABEL: &str = "other";

struct LabelSlot {
    label: OnceLock<&'static str>,
    count: AtomicU64,
}

/// A counter family with one label, keyed by static strings.
struct LabelCounters {
    slots: Box<[LabelSlot]>,
    overflow: AtomicU64,
}

impl LabelCounters {
    fn new() -> Self {
        LabelCounters {
            slots: (0..LABEL_SLOTS)
                .map(|_| LabelSlot {
                    label: OnceLock::new(),
                    count: AtomicU64::new(0),
                })
                .collect(),
            overflow: AtomicU64::new(0),
        }
    }

    /// Slots are claimed in order and never released, so every caller scanning from the start
    /// meets the one slot that holds a given label before any free slot.
    fn add(&self, label: &'static str, n: u64) {
        for slot in self.slots.iter() {
            let held = match slot.label.get() {
                Some(l) => *l,
                None => *slot.label.get_or_init(|| label),
            };
            if held == label {
                slot.count.fetch_add(n, Ordering::Relaxed);
                return;
            }
        }
        self.overflow.fetch_add(n, Ordering::Relaxed);
    }

    fn inc(&self, label: &'static str) {
        self.add(label, 1)
    }

    /// (label, count) pairs sorted by label, overflow last under `other`.
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<(&'static str, u64)> = self
            .slots
            .iter()
            .map_while(|s| s.label.get().map(|l| (*l, s.count.load(Ordering::Relaxed))))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        let over = self.overflow.load(Ordering::Relaxed);
        if over > 0 {
            match v.iter_mut().find(|(l, _)| *l == OVERFLOW_LABEL) {
                Some(e) => e.1 += over,
                None => v.push((OVERFLOW_LABEL, over)),
            }
        }
        v
    }

    fn sum(&self) -> u64 {
        self.snapshot().iter().map(|(_, n)| n).sum()
    }
}

/// Upper bounds of the pairing latency histogram, as written in the `le` label.
pub const PAIRING_BUCKETS: [&str; 15] = [
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "5", "10", "+Inf",
];
/// The same bounds in nanoseconds (the last bucket, +Inf, has none).
const PAIRING_BOUNDS_NS: [u64; 14] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram: one atomic per bucket (not cumulative; cumulated when rendered) and
/// the sum in nanoseconds. The count is the sum of the buckets, so `+Inf` and `_count`
/// always agree.
struct Histogram {
    buckets: [AtomicU64; 15],
    sum_ns: AtomicU64,
}

/// A consistent copy of a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts, one per entry of [`PAIRING_BUCKETS`]; the last equals `count`.
    pub cumulative: [u64; 15],
    pub count: u64,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    /// Estimates a quantile (0..=1) in seconds by linear interpolation inside the bucket, as
    /// Prometheus' `histogram_quantile` does. `None` without samples. Samples above the last
    /// finite bound are reported as that bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !q.is_finite() {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut lower_bound = 0.0;
        let mut lower_count = 0u64;
        for (i, &upto) in self.cumulative.iter().enumerate() {
            if i == PAIRING_BOUNDS_NS.len() {
                return Some(lower_bound);
            }
            let upper = PAIRING_BOUNDS_NS[i] as f64 / 1e9;
            if upto as f64 >= rank && upto > lower_count {
                let in_bucket = (upto - lower_count) as f64;
                let frac = ((rank - lower_count as f64) / in_bucket).clamp(0.0, 1.0);
                return Some(lower_bound + (upper - lower_bound) * frac);
            }
            lower_bound = upper;
            lower_count = upto;
        }
        Some(lower_bound)
    }
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = PAIRING_BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(PAIRING_BOUNDS_NS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [0u64; 15];
        let mut acc = 0u64;
        for (c, b) in cumulative.iter_mut().zip(&self.buckets) {
            acc += b.load(Ordering::Relaxed);
            *c = acc;
        }
        HistogramSnapshot {
            cumulative,
            count: acc,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// Counters of relayed connections, shared with the guards so that a guard is `'static`.
#[derive(Default)]
struct ConnCounters {
    active: AtomicU64,
    total: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

impl ConnCounters {
    fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            counters: self.clone(),
        }
    }
}

/// One relayed connection: counted as active until dropped. Owned (`'static`, `Send`,
/// `Sync`), so it can move into a spawned task or be shared by reference between the two
/// directions of a relay.
pub struct ConnectionGuard {
    counters: Arc<ConnCounters>,
}

impl ConnectionGuard {
    /// Adds bytes that went up (public client → private service).
    pub fn add_up(&self, n: u64) {
        self.counters.up.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds bytes that went down (private service → public client).
    pub fn add_down(&self, n: u64) {
        self.counters.down.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionGuard")
    }
}

// ---------------------------------------------------------------------------------------------
// Text exposition helpers
// ---------------------------------------------------------------------------------------------

/// A status code as a metrics label: the codes seen in practice as themselves, others by class.
pub fn status_label(status: u16) -> &'static str {
    const KNOWN: [(u16, &str); 24] = [
        (101, "101"),
        (200, "200"),
        (201, "201"),
        (204, "204"),
        (206, "206"),
        (301, "301"),
        (302, "302"),
        (303, "303"),
        (304, "304"),
        (307, "307"),
        (308, "308"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (408, "408"),
        (413, "413"),
        (429, "429"),
        (431, "431"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    if let Some((_, label)) = KNOWN.iter().find(|(code, _)| *code == status) {
        return label;
    }
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// Escapes a label value: `\` → `\\`, `"` → `\"`, newline → `\n`.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes HELP text: `\` → `\\`, newline → `\n`.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Formats a float sample value the way Prometheus reads it.
fn fmt_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

struct Exposition {
    out: String,
    prefix: &'static str,
}

impl Exposition {
    fn new(prefix: &'static str) -> Self {
        Exposition {
            out: String::with_capacity(8 * 1024),
            prefix,
        }
    }

    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let p = self.prefix;
        let _ = writeln!(self.out, "# HELP {p}{name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {p}{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.out.push_str(self.prefix);
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label_value(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(value);
        self.out.push('\n');
    }

    /// A family with one integer sample per service.
    fn per_service<'a>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        rows: impl Iterator<Item = (&'a str, u64)>,
    ) {
        self.family(name, kind, help);
        for (service, v) in rows {
            self.int(name, &[("service", service)], v);
        }
    }

    fn int(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        self.sample(name, labels, &v.to_string());
    }

    fn float(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.sample(name, labels, &fmt_float(v));
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let bucket = format!("{name}_bucket");
        for (le, c) in PAIRING_BUCKETS.iter().zip(h.cumulative) {
            let mut l = labels.to_vec();
            l.push(("le", le));
            self.int(&bucket, &l, c);
        }
        self.float(&format!("{name}_sum"), labels, h.sum_seconds);
        self.int(&format!("{name}_count"), labels, h.count);
    }
}

// ---------------------------------------------------------------------------------------------
// JSON helpers (the status document is written by hand)
// ---------------------------------------------------------------------------------------------

/// Writes `s` as a JSON string literal, quotes included.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // Keeps the document safe to embed in HTML too.
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A finite float with millisecond-ish precision, or `null`.
fn json_f64(out: &mut String, v: Option<f64>) {
    match v {
        Some(v) if v.is_finite() => {
            let _ = write!(out, "{:.3}", v);
        }
        _ => out.push_str("null"),
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------------------------

/// The agent currently registered for a service.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AgentInfo {
    peer: SocketAddr,
    session_id: u64,
    software: String,
    since_unix_ms: u64,
}

/// Everything counted for one gateway service. Obtained with [`GatewayMetrics::service`].
pub struct ServiceMetrics {
    name: String,
    /// The gateway's start, the origin of `last_heard_ns`.
    epoch: Instant,
    agent: Mutex<Option<AgentInfo>>,
    /// Mirrors `agent.is_some()` for lock-free reads.
    online: AtomicBool,
    /// Nanoseconds after `epoch` + 1 of the last control traffic; 0 = never.
    last_heard_ns: AtomicU64,
    registrations: AtomicU64,
    conns: Arc<ConnCounters>,
    refused: LabelCounters,
    failed: LabelCounters,
    pairing: Histogram,
    pool: AtomicU64,
    pool_failures: AtomicU64,
    http: LabelCounters,
}

impl ServiceMetrics {
    fn new(name: &str, epoch: Instant) -> Self {
        ServiceMetrics {
            name: name.to_owned(),
            epoch,
            agent: Mutex::new(None),
            online: AtomicBool::new(false),
            last_heard_ns: AtomicU64::new(0),
            registrations: AtomicU64::new(0),
            conns: Arc::new(ConnCounters::default()),
            refused: LabelCounters::new(),
            failed: LabelCounters::new(),
            pairing: Histogram::new(),
            pool: AtomicU64::new(0),
            pool_failures: AtomicU64::new(0),
            http: LabelCounters::new(),
        }
    }

    fn agent_lock(&self) -> std::sync::MutexGuard<'_, Option<AgentInfo>> {
        self.agent.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// An agent registered for this service (replacing any previous one). Counts a
    /// registration and marks the agent as heard now.
    pub fn agent_registered(
        &self,
        peer: SocketAddr,
        session_id: u64,
        software: &str,
        now_unix_ms: u64,
    ) {
        let mut a = self.agent_lock();
        *a = Some(AgentInfo {
            peer,
            session_id,
            software: software.to_owned(),
            since_unix_ms: now_unix_ms,
        });
        self.online.store(true, Ordering::Relaxed);
        self.registrations.fetch_add(1, Ordering::Relaxed);
        drop(a);
        self.agent_heard(Instant::now());
    }

    /// The session `session_id` ended. Ignored if another session has registered since.
    pub fn agent_gone(&self, session_id: u64) {
        let mut a = self.agent_lock();
        if a.as_ref().is_some_and(|i| i.session_id == session_id) {
            *a = None;
            self.online.store(false, Ordering::Relaxed);
        }
    }

    /// Control traffic (a heartbeat or anything else) arrived from the agent at `now`.
    pub fn agent_heard(&self, now: Instant) {
        let ns = now.saturating_duration_since(self.epoch).as_nanos();
        let v = u64::try_from(ns).unwrap_or(u64::MAX - 1) + 1;
        self.last_heard_ns.fetch_max(v, Ordering::Relaxed);
    }

    /// True while an agent is registered.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    /// Time since the last control traffic, `None` when offline or never heard.
    pub fn last_heard_ago(&self, now: Instant) -> Option<Duration> {
        if !self.is_online() {
            return None;
        }
        match self.last_heard_ns.load(Ordering::Relaxed) {
            0 => None,
            v => {
                let at = self.epoch + Duration::from_nanos(v - 1);
                Some(now.saturating_duration_since(at))
            }
        }
    }

    /// A public client was refused before a data connection was asked for
    /// (`agent_offline`, `overloaded`, ...).
    pub fn client_refused(&self, reason: &'static str) {
        self.refused.inc(reason);
    }

    /// A public client that had been accepted was closed without being paired (an
    /// [`ErrorCode`](dialback_core::ErrorCode) name such as `timeout`, `session_gone`, or a
    /// runtime reason).
    pub fn client_failed(&self, code: &'static str) {
        self.failed.inc(code);
    }

    /// A client was paired with a data connection and its relay starts: counts it as active
    /// until the guard drops, and in the total.
    pub fn connection_opened(&self) -> ConnectionGuard {
        self.conns.open()
    }

    /// Time from accepting a public client to having its data connection.
    pub fn pairing_latency(&self, d: Duration) {
        self.pairing.observe(d);
    }

    pub fn connections_active(&self) -> u64 {
        self.conns.active.load(Ordering::Relaxed)
    }

    pub fn connections_total(&self) -> u64 {
        self.conns.total.load(Ordering::Relaxed)
    }

    pub fn bytes_up(&self) -> u64 {
        self.conns.up.load(Ordering::Relaxed)
    }

    pub fn bytes_down(&self) -> u64 {
        self.conns.down.load(Ordering::Relaxed)
    }

    pub fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Relaxed)
    }

    /// (reason, count) of refused clients, sorted by reason.
    pub fn clients_refused(&self) -> Vec<(&'static str, u64)> {
        self.refused.snapshot()
    }

    /// (code, count) of failed clients, sorted by code.
    pub fn clients_failed(&self) -> Vec<(&'static str, u64)> {
        self.failed.snapshot()
    }

    pub fn pairing(&self) -> HistogramSnapshot {
        self.pairing.snapshot()
    }

    /// Authenticated data connections parked in the pool, ready for clients.
    pub fn pool_connections(&self) -> u64 {
        self.pool.load(Ordering::Relaxed)
    }

    pub fn set_pool_connections(&self, n: u64) {
        self.pool.store(n, Ordering::Relaxed);
    }

    /// A data connection asked for the pool failed (not opened, refused, or lost while parked).
    pub fn pool_failure(&self) {
        self.pool_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn pool_failures(&self) -> u64 {
        self.pool_failures.load(Ordering::Relaxed)
    }

    /// An HTTP request routed to this service was answered with `status` (by the service, or
    /// by the gateway on its behalf: 502, 504, ...).
    pub fn http_response(&self, status: u16) {
        self.http.inc(status_label(status));
    }

    /// (status, count) of HTTP responses, sorted by status.
    pub fn http_responses(&self) -> Vec<(&'static str, u64)> {
        self.http.snapshot()
    }

    fn status(&self, now: Instant) -> ServiceStatus {
        let agent = self.agent_lock().clone();
        let pairing = self.pairing();
        ServiceStatus {
            name: self.name.clone(),
            online: agent.is_some(),
            agent: agent.map(|a| AgentStatus {
                peer: a.peer,
                session_id: a.session_id,
                software: a.software,
                since_unix_ms: a.since_unix_ms,
                last_heard_seconds_ago: self.last_heard_ago(now).map(|d| d.as_secs_f64()),
            }),
            registrations: self.registrations(),
            connections_active: self.connections_active(),
            connections_total: self.connections_total(),
            bytes_up: self.bytes_up(),
            bytes_down: self.bytes_down(),
            clients_refused: self.refused.sum(),
            clients_failed: self.failed.sum(),
            pairing_count: pairing.count,
            pairing_p50_ms: pairing.quantile(0.5).map(|s| s * 1e3),
            pool_connections: self.pool_connections(),
        }
    }
}

/// One server of a direct service (`upstreams`).
#[derive(Debug)]
pub struct UpstreamStats {
    pub service: String,
    pub addr: String,
    /// As the health checks and clients last found it.
    pub up: AtomicBool,
    /// Clients connected through it now.
    pub active: AtomicU64,
    pub total: AtomicU64,
    /// Clients that could not connect to it (each then tried another server).
    pub connect_failures: AtomicU64,
    pub check_failures: AtomicU64,
}

impl UpstreamStats {
    pub fn new(service: &str, addr: &str) -> Self {
        UpstreamStats {
            service: service.to_owned(),
            addr: addr.to_owned(),
            up: AtomicBool::new(true),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            check_failures: AtomicU64::new(0),
        }
    }
}

/// The gateway's metrics. Create once with the configured service names, share as
/// `Arc<GatewayMetrics>`.
pub struct GatewayMetrics {
    started: Instant,
    /// Replaced as a whole by a configuration reload ([`GatewayMetrics::set_services`]).
    services: std::sync::RwLock<Vec<Arc<ServiceMetrics>>>,
    reloads: LabelCounters,
    /// 1 when the last reload was applied (or none was tried), 0 when it was refused.
    reload_ok: AtomicBool,
    /// Unix time in ms of the last successful reload, or of the start; 0 = never.
    reloaded_at_ms: AtomicU64,
    upstreams: std::sync::RwLock<Vec<Arc<UpstreamStats>>>,
    registration_rejections: LabelCounters,
    auth_failures: AtomicU64,
    auth_delays: AtomicU64,
    handshake_drops: LabelCounters,
    data_refusals: LabelCounters,
    http_unrouted: LabelCounters,
}

/// A point-in-time copy of the gateway's state for the status page.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusSnapshot {
    pub uptime_seconds: f64,
    pub now_unix_ms: u64,
    pub services: Vec<ServiceStatus>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub online: bool,
    pub agent: Option<AgentStatus>,
    pub registrations: u64,
    pub connections_active: u64,
    pub connections_total: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// All reasons added up.
    pub clients_refused: u64,
    /// All codes added up.
    pub clients_failed: u64,
    pub pairing_count: u64,
    /// Median pairing latency estimated from the histogram; `None` without samples.
    pub pairing_p50_ms: Option<f64>,
    /// Data connections parked in the pool.
    pub pool_connections: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentStatus {
    pub peer: SocketAddr,
    pub session_id: u64,
    pub software: String,
    pub since_unix_ms: u64,
    pub last_heard_seconds_ago: Option<f64>,
}

impl GatewayMetrics {
    /// One entry per service, in the given (configuration) order. Duplicate names keep the
    /// first.
    pub fn new(services: &[String]) -> Self {
        let started = Instant::now();
        let m = GatewayMetrics {
            started,
            services: std::sync::RwLock::new(Vec::new()),
            reloads: LabelCounters::new(),
            reload_ok: AtomicBool::new(true),
            reloaded_at_ms: AtomicU64::new(unix_now_ms()),
            upstreams: std::sync::RwLock::new(Vec::new()),
            registration_rejections: LabelCounters::new(),
            auth_failures: AtomicU64::new(0),
            auth_delays: AtomicU64::new(0),
            handshake_drops: LabelCounters::new(),
            data_refusals: LabelCounters::new(),
            http_unrouted: LabelCounters::new(),
        };
        m.set_services(services);
        m
    }

    fn services_lock(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<ServiceMetrics>>> {
        self.services.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn service(&self, name: &str) -> Option<Arc<ServiceMetrics>> {
        self.services_lock()
            .iter()
            .find(|s| s.name == name)
            .cloned()
    }

    /// All services in configuration order.
    pub fn services(&self) -> Vec<Arc<ServiceMetrics>> {
        self.services_lock().clone()
    }

    /// Installs the service list of a (re)loaded configuration, in its order: a service that
    /// stays keeps its counters, a new one starts from zero, a removed one disappears (its
    /// relays still running count into its old entry, which no one reads any more). Duplicate
    /// names keep the first.
    pub fn set_services(&self, names: &[String]) {
        let mut list = self.services.write().unwrap_or_else(|p| p.into_inner());
        let mut next: Vec<Arc<ServiceMetrics>> = Vec::with_capacity(names.len());
        for n in names {
            if next.iter().any(|m| m.name == *n) {
                continue;
            }
            let kept = list.iter().find(|m| m.name == *n).cloned();
            next.push(kept.unwrap_or_else(|| Arc::new(ServiceMetrics::new(n, self.started))));
        }
        *list = next;
    }

    /// The servers of every direct service, in configuration order.
    pub fn set_upstreams(&self, stats: Vec<Arc<UpstreamStats>>) {
        *self.upstreams.write().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    pub fn upstreams(&self) -> Vec<Arc<UpstreamStats>> {
        self.upstreams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A configuration reload was applied (`ok`) or refused, and the old one kept.
    pub fn config_reload(&self, ok: bool) {
        self.reloads.inc(if ok { "applied" } else { "refused" });
        self.reload_ok.store(ok, Ordering::Relaxed);
        if ok {
            self.reloaded_at_ms.store(unix_now_ms(), Ordering::Relaxed);
        }
    }

    /// Reloads by outcome (`applied`, `refused`).
    pub fn config_reloads(&self) -> Vec<(&'static str, u64)> {
        self.reloads.snapshot()
    }

    /// Whether the last reload was applied (true before any).
    pub fn config_last_reload_ok(&self) -> bool {
        self.reload_ok.load(Ordering::Relaxed)
    }

    /// A control connection was refused (an `ErrorCode` name: `auth_failed`,
    /// `already_registered`, `malformed`, `timeout`, ...).
    pub fn registration_rejected(&self, reason: &'static str) {
        self.registration_rejections.inc(reason);
    }

    /// An agent failed to prove it knows a service password. Independent of
    /// [`registration_rejected`](Self::registration_rejected): call both.
    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A control connection was held because its address failed to authenticate before.
    pub fn auth_delayed(&self) {
        self.auth_delays.fetch_add(1, Ordering::Relaxed);
    }

    pub fn auth_delays(&self) -> u64 {
        self.auth_delays.load(Ordering::Relaxed)
    }

    /// A connection on the agent port was dropped before its hello (`bad_magic`,
    /// `tls_error`, `timeout`, `closed`, ...).
    pub fn handshake_dropped(&self, reason: &'static str) {
        self.handshake_drops.inc(reason);
    }

    /// A data connection was refused (an `ErrorCode` name: `token_invalid`, `token_expired`,
    /// `session_gone`, ...).
    pub fn data_refused(&self, code: &'static str) {
        self.data_refusals.inc(code);
    }

    pub fn uptime(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    pub fn auth_failures(&self) -> u64 {
        self.auth_failures.load(Ordering::Relaxed)
    }

    pub fn registration_rejections(&self) -> Vec<(&'static str, u64)> {
        self.registration_rejections.snapshot()
    }

    pub fn handshake_drops(&self) -> Vec<(&'static str, u64)> {
        self.handshake_drops.snapshot()
    }

    pub fn data_refusals(&self) -> Vec<(&'static str, u64)> {
        self.data_refusals.snapshot()
    }

    /// An HTTP request the gateway answered before it reached any service (400, 404, 408,
    /// 431, ...).
    pub fn http_unrouted(&self, status: u16) {
        self.http_unrouted.inc(status_label(status));
    }

    pub fn http_unrouted_responses(&self) -> Vec<(&'static str, u64)> {
        self.http_unrouted.snapshot()
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render_prometheus(&self, now: Instant) -> String {
        let mut e = Exposition::new(GW);
        let svcs = &self.services();

        e.family(
            "uptime_seconds",
            "gauge",
            "Seconds since the gateway started.",
        );
        e.float("uptime_seconds", &[], self.uptime(now).as_secs_f64());

        e.family("services", "gauge", "Configured services.");
        e.int("services", &[], svcs.len() as u64);

        e.family(
            "agents_online",
            "gauge",
            "Services that have a registered agent.",
        );
        let online = svcs.iter().filter(|s| s.is_online()).count();
        e.int("agents_online", &[], online as u64);

        e.family(
            "agent_online",
            "gauge",
            "1 if an agent is registered for the service, else 0.",
        );
        for s in svcs {
            e.int(
                "agent_online",
                &[("service", &s.name)],
                s.is_online() as u64,
            );
        }

        e.family(
            "agent_last_heard_seconds",
            "gauge",
            "Seconds since the service's agent last sent anything on its control connection; absent while offline.",
        );
        for s in svcs {
            if let Some(d) = s.last_heard_ago(now) {
                e.float(
                    "agent_last_heard_seconds",
                    &[("service", &s.name)],
                    d.as_secs_f64(),
                );
            }
        }

        e.per_service(
            "registrations_total",
            "counter",
            "Successful agent registrations.",
            svcs.iter().map(|s| (s.name.as_str(), s.registrations())),
        );

        e.family(
            "registration_rejections_total",
            "counter",
            "Control connections refused, by reason.",
        );
        for (r, n) in self.registration_rejections() {
            e.int("registration_rejections_total", &[("reason", r)], n);
        }

        e.family(
            "auth_failures_total",
            "counter",
            "Agents that failed to prove a service password.",
        );
        e.int("auth_failures_total", &[], self.auth_failures());

        e.family(
            "auth_delays_total",
            "counter",
            "Control connections held before their hello because their address failed to authenticate before.",
        );
        e.int("auth_delays_total", &[], self.auth_delays());

        let ups = self.upstreams();
        let labels =
            |u: &UpstreamStats| [("service", u.service.clone()), ("upstream", u.addr.clone())];
        for (name, kind, help, value) in [
            (
                "upstream_up",
                "gauge",
                "1 while a direct service's upstream is healthy (health checks and clients), else 0.",
                (|u: &UpstreamStats| u.up.load(Ordering::Relaxed) as u64) as fn(&UpstreamStats) -> u64,
            ),
            (
                "upstream_connections_active",
                "gauge",
                "Clients connected through the upstream now.",
                |u| u.active.load(Ordering::Relaxed),
            ),
            (
                "upstream_connections_total",
                "counter",
                "Clients connected through the upstream.",
                |u| u.total.load(Ordering::Relaxed),
            ),
            (
                "upstream_connect_failures_total",
                "counter",
                "Clients that could not connect to the upstream (each then tried another).",
                |u| u.connect_failures.load(Ordering::Relaxed),
            ),
            (
                "upstream_check_failures_total",
                "counter",
                "Failed health checks of the upstream.",
                |u| u.check_failures.load(Ordering::Relaxed),
            ),
        ] {
            e.family(name, kind, help);
            for u in &ups {
                let l = labels(u);
                e.int(name, &[(l[0].0, &l[0].1), (l[1].0, &l[1].1)], value(u));
            }
        }

        e.family(
            "config_reloads_total",
            "counter",
            "Configuration reloads (SIGHUP or a changed file), by outcome: applied, or refused with the old configuration kept.",
        );
        for (r, n) in self.config_reloads() {
            e.int("config_reloads_total", &[("result", r)], n);
        }

        e.family(
            "config_last_reload_successful",
            "gauge",
            "1 if the last configuration reload was applied (or none was tried), 0 if it was refused.",
        );
        e.int(
            "config_last_reload_successful",
            &[],
            self.config_last_reload_ok() as u64,
        );

        e.family(
            "config_last_reload_success_timestamp_seconds",
            "gauge",
            "Unix time of the last applied configuration (the start, before any reload).",
        );
        e.float(
            "config_last_reload_success_timestamp_seconds",
            &[],
            self.reloaded_at_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        );

        e.family(
            "handshake_drops_total",
            "counter",
            "Connections on the agent port dropped before their hello, by reason.",
        );
        for (r, n) in self.handshake_drops() {
            e.int("handshake_drops_total", &[("reason", r)], n);
        }

        e.per_service(
            "connections_active",
            "gauge",
            "Public clients being relayed now.",
            svcs.iter()
                .map(|s| (s.name.as_str(), s.connections_active())),
        );

        e.per_service(
            "connections_total",
            "counter",
            "Public clients paired with a data connection.",
            svcs.iter()
                .map(|s| (s.name.as_str(), s.connections_total())),
        );

        e.family(
            "clients_refused_total",
            "counter",
            "Public clients refused before a data connection was requested, by reason.",
        );
        for s in svcs {
            for (r, n) in s.clients_refused() {
                e.int(
                    "clients_refused_total",
                    &[("service", &s.name), ("reason", r)],
                    n,
                );
            }
        }

        e.family(
            "clients_failed_total",
            "counter",
            "Accepted public clients closed without a data connection, by error code.",
        );
        for s in svcs {
            for (c, n) in s.clients_failed() {
                e.int(
                    "clients_failed_total",
                    &[("service", &s.name), ("code", c)],
                    n,
                );
            }
        }

        e.family(
            "data_refusals_total",
            "counter",
            "Data connections refused, by error code.",
        );
        for (c, n) in self.data_refusals() {
            e.int("data_refusals_total", &[("code", c)], n);
        }

        e.family(
            "bytes_total",
            "counter",
            "Payload bytes relayed; up is client to agent, down is agent to client.",
        );
        for s in svcs {
            e.int(
                "bytes_total",
                &[("service", &s.name), ("direction", "up")],
                s.bytes_up(),
            );
            e.int(
                "bytes_total",
                &[("service", &s.name), ("direction", "down")],
                s.bytes_down(),
            );
        }

        e.family(
            "pairing_seconds",
            "histogram",
            "Time from accepting a public client to pairing it with a data connection.",
        );
        for s in svcs {
            e.histogram("pairing_seconds", &[("service", &s.name)], &s.pairing());
        }

        e.per_service(
            "pool_connections",
            "gauge",
            "Authenticated data connections parked in the pool, ready for clients.",
            svcs.iter().map(|s| (s.name.as_str(), s.pool_connections())),
        );
        e.per_service(
            "pool_failures_total",
            "counter",
            "Data connections asked for the pool that were not opened, were refused, or were lost while parked.",
            svcs.iter().map(|s| (s.name.as_str(), s.pool_failures())),
        );

        e.family(
            "http_responses_total",
            "counter",
            "HTTP responses to requests routed to the service, by status (the gateway's own 502/503/504 included).",
        );
        for s in svcs {
            for (c, n) in s.http_responses() {
                e.int(
                    "http_responses_total",
                    &[("service", &s.name), ("code", c)],
                    n,
                );
            }
        }
        e.family(
            "http_unrouted_total",
            "counter",
            "HTTP requests answered by the gateway before reaching a service (400, 404, 408, 431, ...), by status.",
        );
        for (c, n) in self.http_unrouted_responses() {
            e.int("http_unrouted_total", &[("code", c)], n);
        }

        e.out
    }

    pub fn status(&self, now: Instant, now_unix_ms: u64) -> StatusSnapshot {
        StatusSnapshot {
            uptime_seconds: self.uptime(now).as_secs_f64(),
            now_unix_ms,
            services: self.services().iter().map(|s| s.status(now)).collect(),
        }
    }

    /// The status document served at `/status`.
    pub fn render_status_json(&self, now: Instant, now_unix_ms: u64) -> String {
        let st = self.status(now, now_unix_ms);
        let ups = self.upstreams();
        let mut o = String::with_capacity(256 + 512 * st.services.len());
        o.push_str("{\"uptime_seconds\":");
        json_f64(&mut o, Some(st.uptime_seconds));
        let _ = write!(o, ",\"now_unix_ms\":{}", st.now_unix_ms);
        o.push_str(",\"services\":[");
        for (i, s) in st.services.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            o.push_str("{\"name\":");
            json_str(&mut o, &s.name);
            let _ = write!(o, ",\"online\":{}", s.online);
            o.push_str(",\"agent\":");
            match &s.agent {
                None => o.push_str("null"),
                Some(a) => {
                    o.push_str("{\"peer\":");
                    json_str(&mut o, &a.peer.to_string());
                    o.push_str(",\"session\":");
                    json_str(&mut o, &a.session_id.to_string());
                    o.push_str(",\"software\":");
                    json_str(&mut o, &a.software);
                    let _ = write!(o, ",\"since_unix_ms\":{}", a.since_unix_ms);
                    o.push_str(",\"last_heard_seconds_ago\":");
                    json_f64(&mut o, a.last_heard_seconds_ago);
                    o.push('}');
                }
            }
            let _ = write!(
                o,
                ",\"registrations\":{},\"connections_active\":{},\"connections_total\":{},\
                 \"bytes_up\":{},\"bytes_down\":{},\"clients_refused\":{},\"clients_failed\":{},\
                 \"pairing_count\":{},\"pool_connections\":{}",
                s.registrations,
                s.connections_active,
                s.connections_total,
                s.bytes_up,
                s.bytes_down,
                s.clients_refused,
                s.clients_failed,
                s.pairing_count,
                s.pool_connections,
            );
            o.push_str(",\"pairing_p50_ms\":");
            json_f64(&mut o, s.pairing_p50_ms);
            // A direct service's servers (empty for a service served by an agent).
            o.push_str(",\"upstreams\":[");
            for (k, u) in ups.iter().filter(|u| u.service == s.name).enumerate() {
                if k > 0 {
                    o.push(',');
                }
                o.push_str("{\"addr\":");
                json_str(&mut o, &u.addr);
                let _ = write!(
                    o,
                    ",\"up\":{},\"active\":{}}}",
                    u.up.load(Ordering::Relaxed),
                    u.active.load(Ordering::Relaxed)
                );
            }
            o.push_str("]}");
        }
        o.push_str("]}");
        o
    }
}

// ---------------------------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------------------------

/// Everything counted for one agent service. Obtained with [`AgentMetrics::service`].
pub struct AgentServiceMetrics {
    name: String,
    /// Live control sessions of this service (one per gateway it is registered with).
    registered: AtomicU64,
    registrations: AtomicU64,
    registration_failures: LabelCounters,
    data: Arc<ConnCounters>,
    data_failures: LabelCounters,
}

impl AgentServiceMetrics {
    fn new(name: &str) -> Self {
        AgentServiceMetrics {
            name: name.to_owned(),
            registered: AtomicU64::new(0),
            registrations: AtomicU64::new(0),
            registration_failures: LabelCounters::new(),
            data: Arc::new(ConnCounters::default()),
            data_failures: LabelCounters::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A gateway accepted the registration: one more live session.
    pub fn registered(&self) {
        self.registered.fetch_add(1, Ordering::Relaxed);
        self.registrations.fetch_add(1, Ordering::Relaxed);
    }

    /// A registered control session ended; does not count a failure.
    pub fn unregistered(&self) {
        let _ = self
            .registered
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// An attempt to register, or a registered session, ended (`connect`, `tls`, `proxy`,
    /// `timeout`, `auth_failed`, `already_registered`, `lost`, ...).
    pub fn registration_failed(&self, reason: &'static str) {
        self.registration_failures.inc(reason);
    }

    /// Gateways this service is registered with right now.
    pub fn sessions(&self) -> u64 {
        self.registered.load(Ordering::Relaxed)
    }

    /// A data connection was accepted by the gateway and its relay starts: active until the
    /// guard drops.
    pub fn data_connection_opened(&self) -> ConnectionGuard {
        self.data.open()
    }

    /// A data connection could not be set up (`connect`, `refused`, `timeout`,
    /// `local_unreachable`, ...).
    pub fn data_failed(&self, reason: &'static str) {
        self.data_failures.inc(reason);
    }

    pub fn is_registered(&self) -> bool {
        self.sessions() > 0
    }

    pub fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Relaxed)
    }

    pub fn registration_failures(&self) -> Vec<(&'static str, u64)> {
        self.registration_failures.snapshot()
    }

    pub fn data_connections_total(&self) -> u64 {
        self.data.total.load(Ordering::Relaxed)
    }

    pub fn data_connections_active(&self) -> u64 {
        self.data.active.load(Ordering::Relaxed)
    }

    pub fn data_failures(&self) -> Vec<(&'static str, u64)> {
        self.data_failures.snapshot()
    }

    pub fn bytes_up(&self) -> u64 {
        self.data.up.load(Ordering::Relaxed)
    }

    pub fn bytes_down(&self) -> u64 {
        self.data.down.load(Ordering::Relaxed)
    }
}

/// The agent's metrics, shared as `Arc<AgentMetrics>`.
pub struct AgentMetrics {
    started: Instant,
    services: Vec<AgentServiceMetrics>,
}

impl AgentMetrics {
    /// One entry per service, in the given (configuration) order.
    pub fn new(services: &[String]) -> Self {
        let mut list: Vec<AgentServiceMetrics> = Vec::with_capacity(services.len());
        for s in services {
            if !list.iter().any(|m| m.name == *s) {
                list.push(AgentServiceMetrics::new(s));
            }
        }
        AgentMetrics {
            started: Instant::now(),
            services: list,
        }
    }

    pub fn service(&self, name: &str) -> Option<&AgentServiceMetrics> {
        self.services.iter().find(|s| s.name == name)
    }

    pub fn services(&self) -> impl Iterator<Item = &AgentServiceMetrics> {
        self.services.iter()
    }

    pub fn render_prometheus(&self, now: Instant) -> String {
        let mut e = Exposition::new(AG);
        let svcs = &self.services;

        e.family(
            "uptime_seconds",
            "gauge",
            "Seconds since the agent started.",
        );
        e.float(
            "uptime_seconds",
            &[],
            now.saturating_duration_since(self.started).as_secs_f64(),
        );

        e.family("services", "gauge", "Configured services.");
        e.int("services", &[], svcs.len() as u64);

        e.family(
            "registered",
            "gauge",
            "Gateways the service is registered with right now (1 with a single gateway; 0: none).",
        );
        for s in svcs {
            e.int("registered", &[("service", &s.name)], s.sessions());
        }

        e.per_service(
            "registrations_total",
            "counter",
            "Successful registrations with the gateway.",
            svcs.iter().map(|s| (s.name.as_str(), s.registrations())),
        );

        e.family(
            "registration_failures_total",
            "counter",
            "Registration attempts that failed and registered sessions that were lost, by reason.",
        );
        for s in svcs {
            for (r, n) in s.registration_failures() {
                e.int(
                    "registration_failures_total",
                    &[("service", &s.name), ("reason", r)],
                    n,
                );
            }
        }

        e.per_service(
            "data_connections_total",
            "counter",
            "Data connections accepted by the gateway and relayed.",
            svcs.iter()
                .map(|s| (s.name.as_str(), s.data_connections_total())),
        );

        e.per_service(
            "data_connections_active",
            "gauge",
            "Data connections being relayed now.",
            svcs.iter()
                .map(|s| (s.name.as_str(), s.data_connections_active())),
        );

        e.family(
            "data_failures_total",
            "counter",
            "Data connections that could not be set up, by reason.",
        );
        for s in svcs {
            for (r, n) in s.data_failures() {
                e.int(
                    "data_failures_total",
                    &[("service", &s.name), ("reason", r)],
                    n,
                );
            }
        }

        e.family(
            "bytes_total",
            "counter",
            "Payload bytes relayed; up is gateway to local service, down is local service to gateway.",
        );
        for s in svcs {
            e.int(
                "bytes_total",
                &[("service", &s.name), ("direction", "up")],
                s.bytes_up(),
            );
            e.int(
                "bytes_total",
                &[("service", &s.name), ("direction", "down")],
                s.bytes_down(),
            );
        }

        e.out
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    /// One parsed sample line.
    #[derive(Debug, Clone, PartialEq)]
    pub(crate) struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    fn is_name(s: &str) -> bool {
        let mut cs = s.chars();
        matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// A strict parser for the text format 0.0.4 as we emit it. Panics with the offending line
    /// on anything malformed. Returns the samples and the TYPE of each family.
    pub(crate) fn parse_exposition(text: &str) -> (Vec<Sample>, HashMap<String, String>) {
        assert!(text.ends_with('\n'), "exposition must end with a newline");
        let mut helps: HashMap<String, usize> = HashMap::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            assert!(!line.is_empty(), "empty line");
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect(line);
                assert!(is_name(name), "bad name in {line:?}");
                assert!(!help.contains('\n'));
                *helps.entry(name.into()).or_default() += 1;
                assert!(
                    !types.contains_key(name),
                    "HELP after TYPE/samples: {line:?}"
                );
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect(line);
                assert!(is_name(name), "bad name in {line:?}");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad type {line:?}"
                );
                assert!(
                    types.insert(name.into(), kind.into()).is_none(),
                    "TYPE twice: {line:?}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            // name{labels} value
            let name_end = line.find(['{', ' ']).expect(line);
            let name = &line[..name_end];
            assert!(is_name(name), "bad metric name in {line:?}");
            let mut rest = &line[name_end..];
            let mut labels = BTreeMap::new();
            if let Some(r) = rest.strip_prefix('{') {
                let mut chars = r.char_indices().peekable();
                let consumed;
                loop {
                    // label name
                    let start = chars.peek().expect(line).0;
                    let mut eq = None;
                    for (i, c) in chars.by_ref() {
                        if c == '=' {
                            eq = Some(i);
                            break;
                        }
                    }
                    let eq = eq.expect(line);
                    let lname = &r[start..eq];
                    assert!(is_name(lname), "bad label name in {line:?}");
                    assert_eq!(chars.next().map(|c| c.1), Some('"'), "{line:?}");
                    let mut val = String::new();
                    loop {
                        match chars.next().expect(line).1 {
                            '\\' => match chars.next().expect(line).1 {
                                '\\' => val.push('\\'),
                                '"' => val.push('"'),
                                'n' => val.push('\n'),
                                c => panic!("bad escape \\{c} in {line:?}"),
                            },
                            '"' => break,
                            '\n' => panic!("raw newline in {line:?}"),
                            c => val.push(c),
                        }
                    }
                    assert!(
                        labels.insert(lname.to_owned(), val).is_none(),
                        "label twice in {line:?}"
                    );
                    match chars.next().expect(line) {
                        (_, ',') => continue,
                        (i, '}') => {
                            consumed = i + 1;
                            break;
                        }
                        (_, c) => panic!("unexpected {c:?} in {line:?}"),
                    }
                }
                rest = &r[consumed..];
            }
            let value = rest.strip_prefix(' ').expect(line);
            assert!(!value.contains(' '), "timestamps are not emitted: {line:?}");
            let v: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                "NaN" => f64::NAN,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            // The family of a sample: the name itself, or a histogram's base name.
            let family = if types.contains_key(name) {
                name.to_owned()
            } else {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suf| {
                        name.strip_suffix(suf)
                            .filter(|b| types.get(*b).map(String::as_str) == Some("histogram"))
                    })
                    .unwrap_or_else(|| panic!("sample before its TYPE: {line:?}"))
                    .to_owned()
            };
            assert_eq!(helps.get(&family), Some(&1), "HELP once for {family}");
            samples.push(Sample {
                name: name.into(),
                labels,
                value: v,
            });
        }
        for (name, n) in &helps {
            assert_eq!(*n, 1, "HELP for {name} {n} times");
            assert!(types.contains_key(name), "HELP without TYPE for {name}");
        }
        for name in types.keys() {
            assert!(helps.contains_key(name), "TYPE without HELP for {name}");
        }
        // Families are contiguous: a family's samples never reappear after another family.
        let mut seen_families: Vec<String> = Vec::new();
        for s in &samples {
            let fam = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| {
                    s.name
                        .strip_suffix(suf)
                        .filter(|b| types.get(*b).map(String::as_str) == Some("histogram"))
                })
                .unwrap_or(&s.name)
                .to_owned();
            if seen_families.last() != Some(&fam) {
                assert!(
                    !seen_families.contains(&fam),
                    "family {fam} is not contiguous"
                );
                seen_families.push(fam);
            }
        }
        (samples, types)
    }

    fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
        samples.iter().find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        find(samples, name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
            .value
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn peer() -> SocketAddr {
        "192.0.2.7:40000".parse().unwrap()
    }

    /// A registry with something in every family.
    pub(crate) fn populated() -> GatewayMetrics {
        let m = GatewayMetrics::new(&names(&["web", "rdp", "idle"]));
        m.set_upstreams(vec![Arc::new(UpstreamStats::new("api", "10.0.0.5:80"))]);
        let web = m.service("web").unwrap();
        web.agent_registered(peer(), 123, "dialback 0.1.0", 1_700_000_000_000);
        web.agent_heard(Instant::now());
        web.client_refused("overloaded");
        web.client_failed("timeout");
        web.pairing_latency(Duration::from_millis(3));
        let g = web.connection_opened();
        g.add_up(100);
        g.add_down(2000);
        std::mem::forget(g); // stays active
        let rdp = m.service("rdp").unwrap();
        rdp.client_refused("agent_offline");
        rdp.client_refused("agent_offline");
        m.registration_rejected("auth_failed");
        m.registration_rejected("already_registered");
        m.auth_failure();
        m.handshake_dropped("tls_error");
        m.data_refused("token_invalid");
        web.http_response(200);
        web.http_response(200);
        web.http_response(504);
        m.http_unrouted(404);
        m
    }

    #[test]
    fn a_reload_keeps_the_counters_of_services_that_stay() {
        let m = GatewayMetrics::new(&names(&["a", "b"]));
        let a = m.service("a").unwrap();
        a.client_refused("overloaded");
        let _held = a.connection_opened();
        m.set_services(&names(&["c", "a"]));
        let order: Vec<String> = m.services().iter().map(|s| s.name().to_owned()).collect();
        assert_eq!(order, ["c", "a"]);
        assert!(m.service("b").is_none());
        let a2 = m.service("a").unwrap();
        assert!(Arc::ptr_eq(&a, &a2));
        assert_eq!(a2.connections_active(), 1);
        assert_eq!(m.service("c").unwrap().connections_total(), 0);
        m.config_reload(false);
        assert!(!m.config_last_reload_ok());
        m.config_reload(true);
        assert!(m.config_last_reload_ok());
        let text = m.render_prometheus(Instant::now());
        assert!(
            text.contains("dialback_gateway_config_reloads_total{result=\"applied\"} 1"),
            "{text}"
        );
        assert!(text.contains("dialback_gateway_config_reloads_total{result=\"refused\"} 1"));
        assert!(text.contains("dialback_gateway_config_last_reload_successful 1"));
        assert!(!text.contains("service=\"b\""));
    }

    #[test]
    fn services_in_config_order_and_lookup() {
        let m = GatewayMetrics::new(&names(&["b", "a", "c", "a"]));
        let order: Vec<String> = m.services().iter().map(|s| s.name().to_owned()).collect();
        assert_eq!(order, ["b", "a", "c"]);
        assert!(m.service("a").is_some());
        assert!(m.service("zz").is_none());
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<GatewayMetrics>();
        assert_send_sync::<AgentMetrics>();
        assert_send_sync::<ConnectionGuard>();
    }

    #[test]
    fn counters_move() {
        let m = GatewayMetrics::new(&names(&["web"]));
        let s = m.service("web").unwrap();
        assert!(!s.is_online());
        s.agent_registered(peer(), 7, "dialback 0.1.0", 1);
        assert!(s.is_online());
        assert_eq!(s.registrations(), 1);
        // A stale session's end does not clear the newer one.
        s.agent_registered(peer(), 8, "dialback 0.1.0", 2);
        s.agent_gone(7);
        assert!(s.is_online());
        assert_eq!(s.registrations(), 2);
        s.agent_gone(8);
        assert!(!s.is_online());
        assert_eq!(s.last_heard_ago(Instant::now()), None);

        {
            let g1 = s.connection_opened();
            let g2 = s.connection_opened();
            assert_eq!(s.connections_active(), 2);
            g1.add_up(10);
            g2.add_up(5);
            g2.add_down(7);
            assert_eq!((s.bytes_up(), s.bytes_down()), (15, 7));
            drop(g1);
            assert_eq!(s.connections_active(), 1);
        }
        assert_eq!(s.connections_active(), 0);
        assert_eq!(s.connections_total(), 2);
        assert_eq!((s.bytes_up(), s.bytes_down()), (15, 7));

        s.client_refused("agent_offline");
        s.client_refused("overloaded");
        s.client_refused("agent_offline");
        assert_eq!(
            s.clients_refused(),
            vec![("agent_offline", 2), ("overloaded", 1)]
        );
        s.client_failed("timeout");
        assert_eq!(s.clients_failed(), vec![("timeout", 1)]);

        m.registration_rejected("timeout");
        m.registration_rejected("auth_failed");
        m.registration_rejected("timeout");
        assert_eq!(
            m.registration_rejections(),
            vec![("auth_failed", 1), ("timeout", 2)]
        );
        m.auth_failure();
        assert_eq!(m.auth_failures(), 1);
        m.handshake_dropped("bad_magic");
        assert_eq!(m.handshake_drops(), vec![("bad_magic", 1)]);
        m.data_refused("token_expired");
        assert_eq!(m.data_refusals(), vec![("token_expired", 1)]);
    }

    #[test]
    fn label_values_compared_by_content_and_overflow_to_other() {
        let c = LabelCounters::new();
        let owned: &'static str = Box::leak(String::from("x").into_boxed_str());
        c.inc("x");
        c.inc(owned);
        assert_eq!(c.snapshot(), vec![("x", 2)]);
        let many: Vec<&'static str> = (0..LABEL_SLOTS + 3)
            .map(|i| &*Box::leak(format!("l{i:03}").into_boxed_str()))
            .collect();
        for l in &many {
            c.inc(l);
        }
        let snap = c.snapshot();
        assert_eq!(snap.len(), LABEL_SLOTS + 1);
        assert_eq!(snap.last(), Some(&("other", 4)));
        assert_eq!(c.sum(), LABEL_SLOTS as u64 + 3 + 2);
    }

    #[test]
    fn labels_concurrently_get_one_slot_each() {
        let c = Arc::new(LabelCounters::new());
        let labels = ["a", "b", "c", "d", "e"];
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        c.inc(labels[(i + t) % labels.len()]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snap = c.snapshot();
        assert_eq!(snap.len(), 5, "{snap:?}");
        assert_eq!(snap.iter().map(|x| x.1).sum::<u64>(), 4000);
    }

    #[test]
    fn histogram_buckets_cumulative_and_consistent() {
        let m = GatewayMetrics::new(&names(&["web"]));
        let s = m.service("web").unwrap();
        let samples = [
            Duration::from_micros(100),  // 0.0005
            Duration::from_micros(500),  // exactly 0.0005: le is inclusive
            Duration::from_micros(501),  // 0.001
            Duration::from_millis(7),    // 0.01
            Duration::from_millis(300),  // 0.5
            Duration::from_secs(1),      // 1
            Duration::from_secs(11),     // +Inf
            Duration::from_secs(100000), // +Inf
        ];
        for d in samples {
            s.pairing_latency(d);
        }
        let h = s.pairing();
        assert_eq!(h.count, samples.len() as u64);
        assert_eq!(h.cumulative, [2, 3, 3, 3, 4, 4, 4, 4, 4, 5, 6, 6, 6, 6, 8]);
        assert!(h.cumulative.windows(2).all(|w| w[0] <= w[1]));
        let sum: f64 = samples.iter().map(|d| d.as_secs_f64()).sum();
        assert!((h.sum_seconds - sum).abs() < 1e-6);

        let (parsed, types) = parse_exposition(&m.render_prometheus(Instant::now()));
        assert_eq!(types["dialback_gateway_pairing_seconds"], "histogram");
        let buckets: Vec<(String, f64)> = parsed
            .iter()
            .filter(|x| x.name == "dialback_gateway_pairing_seconds_bucket")
            .map(|x| (x.labels["le"].clone(), x.value))
            .collect();
        assert_eq!(buckets.len(), PAIRING_BUCKETS.len());
        assert_eq!(buckets.last().unwrap().0, "+Inf");
        let mut prev_le = f64::NEG_INFINITY;
        let mut prev = 0.0;
        for (le, v) in &buckets {
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            assert!(le > prev_le && *v >= prev);
            prev_le = le;
            prev = *v;
        }
        let count = value(
            &parsed,
            "dialback_gateway_pairing_seconds_count",
            &[("service", "web")],
        );
        assert_eq!(count, prev);
        assert_eq!(count, 8.0);
        let psum = value(
            &parsed,
            "dialback_gateway_pairing_seconds_sum",
            &[("service", "web")],
        );
        assert!((psum - sum).abs() < 1e-6);
    }

    #[test]
    fn quantile_interpolates() {
        let m = GatewayMetrics::new(&names(&["web"]));
        let s = m.service("web").unwrap();
        assert_eq!(s.pairing().quantile(0.5), None);
        for _ in 0..10 {
            s.pairing_latency(Duration::from_millis(3)); // bucket (0.0025, 0.005]
        }
        let p50 = s.pairing().quantile(0.5).unwrap();
        assert!(p50 > 0.0025 && p50 <= 0.005, "{p50}");
        s.pairing_latency(Duration::from_secs(60));
        assert_eq!(s.pairing().quantile(1.0), Some(10.0));
    }

    #[test]
    fn prometheus_output_parses_and_has_every_metric() {
        let m = populated();
        let text = m.render_prometheus(Instant::now());
        let (s, types) = parse_exposition(&text);
        let p = |n: &str| format!("dialback_gateway_{n}");
        for (name, kind) in [
            ("uptime_seconds", "gauge"),
            ("services", "gauge"),
            ("agents_online", "gauge"),
            ("agent_online", "gauge"),
            ("agent_last_heard_seconds", "gauge"),
            ("registrations_total", "counter"),
            ("registration_rejections_total", "counter"),
            ("auth_failures_total", "counter"),
            ("auth_delays_total", "counter"),
            ("config_reloads_total", "counter"),
            ("upstream_up", "gauge"),
            ("upstream_connections_active", "gauge"),
            ("upstream_connections_total", "counter"),
            ("upstream_connect_failures_total", "counter"),
            ("upstream_check_failures_total", "counter"),
            ("config_last_reload_successful", "gauge"),
            ("config_last_reload_success_timestamp_seconds", "gauge"),
            ("handshake_drops_total", "counter"),
            ("connections_active", "gauge"),
            ("connections_total", "counter"),
            ("clients_refused_total", "counter"),
            ("clients_failed_total", "counter"),
            ("data_refusals_total", "counter"),
            ("bytes_total", "counter"),
            ("pairing_seconds", "histogram"),
            ("pool_connections", "gauge"),
            ("pool_failures_total", "counter"),
            ("http_responses_total", "counter"),
            ("http_unrouted_total", "counter"),
        ] {
            assert_eq!(
                types.get(&p(name)).map(String::as_str),
                Some(kind),
                "{name}"
            );
        }
        assert_eq!(value(&s, &p("services"), &[]), 3.0);
        assert_eq!(value(&s, &p("agents_online"), &[]), 1.0);
        assert_eq!(value(&s, &p("agent_online"), &[("service", "web")]), 1.0);
        assert_eq!(value(&s, &p("agent_online"), &[("service", "rdp")]), 0.0);
        let heard = value(&s, &p("agent_last_heard_seconds"), &[("service", "web")]);
        assert!((0.0..5.0).contains(&heard));
        assert!(find(&s, &p("agent_last_heard_seconds"), &[("service", "rdp")]).is_none());
        assert_eq!(
            value(&s, &p("registrations_total"), &[("service", "web")]),
            1.0
        );
        assert_eq!(
            value(&s, &p("registrations_total"), &[("service", "idle")]),
            0.0
        );
        assert_eq!(
            value(
                &s,
                &p("registration_rejections_total"),
                &[("reason", "auth_failed")]
            ),
            1.0
        );
        assert_eq!(value(&s, &p("auth_failures_total"), &[]), 1.0);
        assert_eq!(
            value(&s, &p("handshake_drops_total"), &[("reason", "tls_error")]),
            1.0
        );
        assert_eq!(
            value(&s, &p("connections_active"), &[("service", "web")]),
            1.0
        );
        assert_eq!(
            value(&s, &p("connections_total"), &[("service", "web")]),
            1.0
        );
        assert_eq!(
            value(
                &s,
                &p("clients_refused_total"),
                &[("service", "rdp"), ("reason", "agent_offline")]
            ),
            2.0
        );
        assert_eq!(
            value(
                &s,
                &p("clients_failed_total"),
                &[("service", "web"), ("code", "timeout")]
            ),
            1.0
        );
        assert_eq!(
            value(&s, &p("data_refusals_total"), &[("code", "token_invalid")]),
            1.0
        );
        assert_eq!(
            value(
                &s,
                &p("bytes_total"),
                &[("service", "web"), ("direction", "up")]
            ),
            100.0
        );
        assert_eq!(
            value(
                &s,
                &p("bytes_total"),
                &[("service", "web"), ("direction", "down")]
            ),
            2000.0
        );
        assert_eq!(
            value(
                &s,
                &p("pairing_seconds_bucket"),
                &[("service", "web"), ("le", "0.005")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                &p("pairing_seconds_bucket"),
                &[("service", "web"), ("le", "0.0025")]
            ),
            0.0
        );
        assert_eq!(
            value(&s, &p("pool_connections"), &[("service", "idle")]),
            0.0
        );
        assert!(value(&s, &p("uptime_seconds"), &[]) >= 0.0);
        // Every counter family's samples end in _total.
        for (name, kind) in &types {
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let weird = "we\"ird\\na\nme";
        let m = GatewayMetrics::new(&[weird.to_owned()]);
        m.registration_rejected("quo\"te\\back\nline");
        let s = m.service(weird).unwrap();
        s.client_refused("agent_offline");
        let text = m.render_prometheus(Instant::now());
        assert!(text.contains(r#"service="we\"ird\\na\nme""#), "{text}");
        assert!(text.contains(r#"reason="quo\"te\\back\nline""#), "{text}");
        let (samples, _) = parse_exposition(&text);
        assert_eq!(
            value(
                &samples,
                "dialback_gateway_clients_refused_total",
                &[("service", weird), ("reason", "agent_offline")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &samples,
                "dialback_gateway_registration_rejections_total",
                &[("reason", "quo\"te\\back\nline")]
            ),
            1.0
        );
        assert_eq!(escape_label_value("a\"b\\c\nd"), r#"a\"b\\c\nd"#);
    }

    #[test]
    fn empty_registry_renders() {
        let m = GatewayMetrics::new(&[]);
        let (s, types) = parse_exposition(&m.render_prometheus(Instant::now()));
        assert_eq!(value(&s, "dialback_gateway_services", &[]), 0.0);
        assert!(types.contains_key("dialback_gateway_pairing_seconds"));
        let v: serde_json::Value =
            serde_json::from_str(&m.render_status_json(Instant::now(), 5)).unwrap();
        assert_eq!(v["services"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn status_json_parses_and_describes_services() {
        let m = populated();
        let s = m.service("web").unwrap();
        s.agent_registered(
            peer(),
            18_446_744_073_709_551_615,
            "evil\"</script>\n\u{1}",
            42,
        );
        let json = m.render_status_json(Instant::now(), 1_700_000_001_000);
        assert!(!json.contains("</script>"));
        let v: serde_json::Value = serde_json::from_str(&json).expect(&json);
        assert!(v["uptime_seconds"].as_f64().unwrap() >= 0.0);
        assert_eq!(v["now_unix_ms"], 1_700_000_001_000u64);
        let svcs = v["services"].as_array().unwrap();
        let names: Vec<&str> = svcs.iter().map(|s| s["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["web", "rdp", "idle"]);
        let web = &svcs[0];
        assert_eq!(web["online"], true);
        assert_eq!(web["agent"]["peer"], "192.0.2.7:40000");
        assert_eq!(web["agent"]["session"], "18446744073709551615");
        assert_eq!(web["agent"]["software"], "evil\"</script>\n\u{1}");
        assert_eq!(web["agent"]["since_unix_ms"], 42);
        assert!(web["agent"]["last_heard_seconds_ago"].as_f64().unwrap() < 5.0);
        assert_eq!(web["connections_active"], 1);
        assert_eq!(web["connections_total"], 1);
        assert_eq!(web["bytes_up"], 100);
        assert_eq!(web["bytes_down"], 2000);
        assert_eq!(web["clients_refused"], 1);
        assert_eq!(web["clients_failed"], 1);
        assert_eq!(web["registrations"], 2);
        let p50 = web["pairing_p50_ms"].as_f64().unwrap();
        assert!(p50 > 2.5 && p50 <= 5.0, "{p50}");
        let rdp = &svcs[1];
        assert_eq!(rdp["online"], false);
        assert!(rdp["agent"].is_null());
        assert!(rdp["pairing_p50_ms"].is_null());
        assert_eq!(rdp["clients_refused"], 2);

        let snap = m.status(Instant::now(), 1);
        assert_eq!(snap.services.len(), 3);
        assert_eq!(
            snap.services[0].agent.as_ref().unwrap().session_id,
            u64::MAX
        );
    }

    #[test]
    fn last_heard_tracks_latest() {
        let m = GatewayMetrics::new(&names(&["web"]));
        let s = m.service("web").unwrap();
        s.agent_registered(peer(), 1, "x", 0);
        let t = Instant::now();
        s.agent_heard(t);
        let later = t + Duration::from_secs(3);
        let ago = s.last_heard_ago(later).unwrap();
        assert!(ago <= Duration::from_secs(3) && ago > Duration::from_millis(2900));
        // An older timestamp arriving late does not move it back.
        s.agent_heard(t - Duration::from_millis(1));
        assert_eq!(s.last_heard_ago(later), Some(ago));
        s.agent_heard(later);
        assert_eq!(s.last_heard_ago(later), Some(Duration::ZERO));
    }

    #[test]
    fn agent_metrics_move_and_render() {
        let m = AgentMetrics::new(&names(&["web", "rdp"]));
        let web = m.service("web").unwrap();
        assert!(m.service("nope").is_none());
        web.registration_failed("connect");
        web.registration_failed("connect");
        web.registration_failed("auth_failed");
        web.registered();
        assert!(web.is_registered());
        {
            let g = web.data_connection_opened();
            g.add_up(11);
            g.add_down(22);
            assert_eq!(web.data_connections_active(), 1);
        }
        assert_eq!(web.data_connections_active(), 0);
        assert_eq!(web.data_connections_total(), 1);
        web.data_failed("local_unreachable");
        // A lost session: it ends (unregistered) and counts as a failure.
        web.unregistered();
        web.registration_failed("lost");
        assert!(!web.is_registered());
        // Two gateways of a fleet: the gauge counts live sessions; a failed attempt with a
        // third does not touch them.
        web.registered();
        web.registered();
        web.registration_failed("connect");
        assert_eq!(web.sessions(), 2);
        web.unregistered();
        assert!(web.is_registered());
        web.unregistered();
        web.unregistered();
        assert_eq!(web.sessions(), 0, "never below zero");
        assert_eq!(web.registrations(), 3);

        let (s, types) = parse_exposition(&m.render_prometheus(Instant::now()));
        let p = |n: &str| format!("dialback_agent_{n}");
        for (name, kind) in [
            ("uptime_seconds", "gauge"),
            ("services", "gauge"),
            ("registered", "gauge"),
            ("registrations_total", "counter"),
            ("registration_failures_total", "counter"),
            ("data_connections_total", "counter"),
            ("data_connections_active", "gauge"),
            ("data_failures_total", "counter"),
            ("bytes_total", "counter"),
        ] {
            assert_eq!(
                types.get(&p(name)).map(String::as_str),
                Some(kind),
                "{name}"
            );
        }
        assert_eq!(value(&s, &p("services"), &[]), 2.0);
        assert_eq!(value(&s, &p("registered"), &[("service", "web")]), 0.0);
        assert_eq!(
            value(&s, &p("registrations_total"), &[("service", "web")]),
            3.0
        );
        assert_eq!(
            value(
                &s,
                &p("registration_failures_total"),
                &[("service", "web"), ("reason", "connect")]
            ),
            3.0
        );
        assert_eq!(
            value(
                &s,
                &p("registration_failures_total"),
                &[("service", "web"), ("reason", "lost")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                &p("data_failures_total"),
                &[("service", "web"), ("reason", "local_unreachable")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                &p("bytes_total"),
                &[("service", "web"), ("direction", "up")]
            ),
            11.0
        );
        assert_eq!(
            value(
                &s,
                &p("bytes_total"),
                &[("service", "web"), ("direction", "down")]
            ),
            22.0
        );
        assert_eq!(
            value(&s, &p("data_connections_total"), &[("service", "rdp")]),
            0.0
        );
    }
}
