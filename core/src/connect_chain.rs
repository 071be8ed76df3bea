//! HTTP CONNECT through an ordered cascade of proxies, each hop with its own authentication
//! (none, Basic, NTLM, or "follow the proxy's offer"), as a sans-IO client state machine.
//!
//! The runtime owns one TCP connection, always to hop 1; later hops are reached through the
//! tunnel built so far, so every byte goes over that one connection. Drive it like this:
//!
//! 1. After [`ConnectChain::new`] and after every `handle_*` call, drain
//!    [`ConnectChain::poll_event`] and [`ConnectChain::poll_transmit`] until both return `None`
//!    (events first is simplest; transmits are held back while a `Reconnect` is unread, so no
//!    request meant for a new connection can go out on the old one).
//! 2. Feed every read to [`ConnectChain::handle_input`] and an EOF to
//!    [`ConnectChain::handle_eof`].
//! 3. On [`ChainEvent::Reconnect`], drop the connection, open a new one to hop 1, and keep
//!    draining `poll_transmit`: the chain replays the hops already passed, reusing what it
//!    learned (which scheme each hop wants).
//! 4. On [`ChainEvent::Established`] the connection is a raw stream to the target. Bytes that
//!    followed the final `2xx` head are target data: first `early`, then whatever
//!    `handle_input` left unconsumed in its slice. Never drop either.
//!
//! NTLM authenticates the connection, not the request, so the 407 that carries the challenge
//! must be drained exactly and the AUTHENTICATE sent on the same connection. A proxy that
//! closes the connection after a 407 we can continue from (the unauthenticated probe of an
//! `Auto` hop, or a bare `NTLM` offer) costs a reconnect; at most [`MAX_RECONNECTS`] per chain.
//!
//! Nothing here reads a clock or an entropy source: the wall clock for NTLM timestamps and a
//! seed for the client challenges are arguments of [`ConnectChain::new`].

use std::collections::VecDeque;
use std::fmt;

use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT};
use base64::Engine as _;

use crate::drbg::Drbg;
use crate::ntlm::{self, NtlmCredentials};

/// Largest proxy response head we accept (status line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest 407 body we drain to keep a connection for the next authentication step.
pub const MAX_BODY: u64 = 1024 * 1024;
/// Reconnects allowed per chain before giving up.
pub const MAX_RECONNECTS: u32 = 3;

const MAX_HEADERS: usize = 96;
const MAX_REASON_CHARS: usize = 200;
const MAX_OFFERS_SHOWN: usize = 16;
/// Keeps `ntlm::unix_ms_to_filetime` far from overflow whatever the runtime passes in.
const MAX_UNIX_MS: u64 = 1_000_000_000_000_000;

/// How one proxy hop authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum HopAuth {
    None,
    Basic {
        user: String,
        password: String,
    },
    Ntlm(NtlmCredentials),
    /// Follow the proxy's `Proxy-Authenticate` offer: NTLM if offered and the login has a
    /// domain form (`DOMAIN\user` or `\user`), else Basic if offered, else NTLM if offered.
    Auto {
        user: String,
        password: String,
    },
}

impl fmt::Debug for HopAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HopAuth::None => f.write_str("None"),
            HopAuth::Basic { user, .. } => f
                .debug_struct("Basic")
                .field("user", user)
                .field("password", &"***")
                .finish(),
            HopAuth::Ntlm(creds) => f.debug_tuple("Ntlm").field(creds).finish(),
            HopAuth::Auto { user, .. } => f
                .debug_struct("Auto")
                .field("user", user)
                .field("password", &"***")
                .finish(),
        }
    }
}

/// One proxy of the cascade, in order from the agent outwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHop {
    pub host: String,
    pub port: u16,
    pub auth: HopAuth,
}

impl ProxyHop {
    /// `host:port`, with an IPv6 literal in brackets.
    pub fn addr(&self) -> String {
        authority(&self.host, self.port)
    }
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The seeds' rule for a login taken from a proxy URL: a `\` in the user name means NTLM
/// (domain = the part before the first `\`, empty for `\user`), otherwise Basic; no login
/// means no authentication. Percent-decoding is the URL parser's job, before this.
pub fn auth_from_login(user: Option<&str>, password: Option<&str>) -> HopAuth {
    let Some(user) = user else {
        return HopAuth::None;
    };
    let password = password.unwrap_or("");
    if user.is_empty() && password.is_empty() {
        return HopAuth::None;
    }
    match user.split_once('\\') {
        Some((domain, name)) => HopAuth::Ntlm(NtlmCredentials {
            domain: domain.to_string(),
            user: name.to_string(),
            password: password.to_string(),
            workstation: String::new(),
        }),
        None => HopAuth::Basic {
            user: user.to_string(),
            password: password.to_string(),
        },
    }
}

/// What the runtime must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainEvent {
    /// Open a new TCP connection to hop 1 and continue with `poll_transmit` (a proxy closed the
    /// connection during authentication; the chain replays the hops already passed, reusing
    /// what it learned, e.g. that hop k wants NTLM).
    Reconnect,
    /// The tunnel reaches the target. `early`: bytes already buffered past the final 2xx head
    /// (target data; never drop them). Bytes `handle_input` left in its slice follow them.
    Established {
        early: Vec<u8>,
    },
    Failed(ChainError),
}

/// Why the chain failed, at which hop (1-based) and which proxy (`host:port`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("proxy hop {hop} ({proxy}): {kind}")]
pub struct ChainError {
    pub hop: usize,
    pub proxy: String,
    pub kind: ChainErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainErrorKind {
    /// 407 after we sent our final credentials.
    #[error(
        "the proxy rejected the {scheme} login of user \"{user}\" (wrong user name or password, \
         or the account is locked or not allowed to use this proxy)"
    )]
    WrongCredentials { scheme: &'static str, user: String },
    /// 407 and no credentials configured for this hop.
    #[error(
        "the proxy requires a login ({}) but none is configured for it; add user:password@ to \
         this proxy's URL (DOMAIN\\user or \\user for NTLM)",
        list(.offered)
    )]
    AuthRequired { offered: Vec<String> },
    /// 407 offering no scheme we can use with the configured login.
    #[error(
        "the proxy asks for a login with {} which cannot be used with the configured login \
         (supported: Basic, and NTLM for logins written DOMAIN\\user or \\user)",
        list(.offered)
    )]
    UnsupportedAuth { offered: Vec<String> },
    /// 403.
    #[error(
        "the proxy refused the connection (403 {reason}): its rules do not allow this user or \
         this destination"
    )]
    Forbidden { reason: String },
    /// Any other non-2xx answer.
    #[error("the proxy answered {code} {reason}{}", status_hint(.code))]
    Status { code: u16, reason: String },
    /// The answer is not valid HTTP, or breaks a limit.
    #[error("the proxy sent an invalid answer: {0}")]
    Malformed(String),
    /// The connection closed before a complete answer.
    #[error("the proxy closed the connection before answering")]
    Closed,
    /// The NTLM handshake needs one persistent connection, and the proxy closed it.
    #[error(
        "the proxy closed the connection in the middle of the NTLM handshake (NTLM needs a \
         persistent connection; check the keep-alive settings of this proxy and of the ones \
         before it)"
    )]
    NtlmNeedsKeepAlive,
    #[error(
        "the proxy kept closing the connection during authentication; gave up after {} \
         reconnects",
        MAX_RECONNECTS
    )]
    TooManyReconnects,
    /// A host name in the configuration cannot be sent in a CONNECT request.
    #[error("invalid host name {host:?} in the proxy chain")]
    InvalidAddress { host: String },
}

fn list(offered: &[String]) -> String {
    if offered.is_empty() {
        "no scheme named".to_string()
    } else {
        offered.join(", ")
    }
}

fn status_hint(code: &u16) -> &'static str {
    match code {
        502 | 504 => " (it could not reach the next proxy or the gateway)",
        503 => " (it is overloaded or cannot reach the next proxy or the gateway)",
        _ => "",
    }
}

/// Which authentication a hop has been found to need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    NoAuth,
    Basic,
    Ntlm,
}

/// What the request in flight for the current hop carried.
enum Stage {
    Plain,
    Basic,
    NtlmNegotiate { negotiate: Vec<u8> },
    NtlmAuthenticate,
}

/// The next request to send for the current hop.
enum Send {
    Plain,
    Basic,
    NtlmNegotiate,
    NtlmAuthenticate(Vec<u8>),
}

impl Send {
    /// Whether a new connection could carry it (everything but the NTLM AUTHENTICATE, which
    /// belongs to the connection the challenge came on).
    fn reconnectable(&self) -> bool {
        !matches!(self, Send::NtlmAuthenticate(_))
    }
}

enum Body {
    Length(u64),
    Chunked(Chunked),
}

enum Phase {
    /// A request for the current hop is queued or sent; reading its answer's head.
    AwaitHead(Stage),
    /// Draining a 407 body to send `next` on the same connection.
    Drain {
        body: Body,
        next: Send,
        drained: u64,
    },
    /// The proxy will close; discarding until EOF, then reconnecting.
    AwaitClose {
        drained: u64,
    },
    Established,
    Failed,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::AwaitHead(_) => "await-head",
            Phase::Drain { .. } => "drain-407-body",
            Phase::AwaitClose { .. } => "await-close",
            Phase::Established => "established",
            Phase::Failed => "failed",
        }
    }
}

/// Client side of a CONNECT cascade. See the module documentation for the driving order.
pub struct ConnectChain {
    hops: Vec<ProxyHop>,
    /// What hop i's CONNECT asks for: hop i+1's address, or the target for the last hop.
    authorities: Vec<String>,
    /// Learned per hop, kept across reconnects.
    resolved: Vec<Option<Scheme>>,
    /// 0-based index of the hop being negotiated; `hops.len()` once established.
    hop: usize,
    phase: Phase,
    /// Incomplete response head, at most `MAX_HEAD` bytes.
    head: Vec<u8>,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<ChainEvent>,
    unread_reconnects: usize,
    reconnects: u32,
    /// The request in flight follows a 407 on the same connection.
    followup: bool,
    drbg: Drbg,
    now_unix_ms: u64,
    workstation: String,
}

impl fmt::Debug for ConnectChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectChain")
            .field("hops", &self.hops)
            .field("current_hop", &self.current_hop())
            .field("phase", &self.phase.name())
            .field("reconnects", &self.reconnects)
            .finish_non_exhaustive()
    }
}

impl ConnectChain {
    /// `target_host`/`target_port`: what the last hop must CONNECT to (the gateway). `seed`:
    /// randomness for NTLM client challenges. `now_unix_ms`: wall clock for NTLM timestamps
    /// when the proxy sends none. An empty `hops` is established at once.
    pub fn new(
        hops: Vec<ProxyHop>,
        target_host: &str,
        target_port: u16,
        seed: [u8; 32],
        now_unix_ms: u64,
    ) -> Self {
        let mut authorities: Vec<String> = hops.iter().skip(1).map(ProxyHop::addr).collect();
        authorities.push(authority(target_host, target_port));
        let resolved = hops
            .iter()
            .map(|h| match h.auth {
                HopAuth::None => Some(Scheme::NoAuth),
                HopAuth::Basic { .. } => Some(Scheme::Basic),
                HopAuth::Ntlm(_) => Some(Scheme::Ntlm),
                HopAuth::Auto { .. } => None,
            })
            .collect();
        let mut chain = ConnectChain {
            hops,
            authorities,
            resolved,
            hop: 0,
            phase: Phase::AwaitHead(Stage::Plain),
            head: Vec::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            unread_reconnects: 0,
            reconnects: 0,
            followup: false,
            drbg: Drbg::new(seed),
            now_unix_ms: now_unix_ms.min(MAX_UNIX_MS),
            workstation: String::new(),
        };
        let bad_host = chain
            .hops
            .iter()
            .map(|h| h.host.as_str())
            .chain(std::iter::once(target_host))
            .enumerate()
            .find(|(_, h)| !valid_host(h));
        if let Some((i, host)) = bad_host {
            chain.hop = i.min(chain.hops.len().saturating_sub(1));
            let host = host.to_string();
            chain.fail(ChainErrorKind::InvalidAddress { host });
        } else {
            chain.start_connection();
        }
        chain
    }

    /// Machine name sent in NTLM messages of hops whose credentials name none (and of `Auto`
    /// hops that turn out to want NTLM).
    pub fn with_workstation(mut self, workstation: &str) -> Self {
        self.workstation = workstation.to_string();
        self
    }

    /// Bytes to write to the current TCP connection (which goes to hop 1; later hops are
    /// reached through the tunnel built so far). Held back while a `Reconnect` is unread.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.unread_reconnects > 0 {
            return None;
        }
        self.transmit.pop_front()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<ChainEvent> {
        let event = self.events.pop_front();
        if matches!(event, Some(ChainEvent::Reconnect)) {
            self.unread_reconnects = self.unread_reconnects.saturating_sub(1);
        }
        event
    }

    /// Which hop (1-based) is being negotiated now, for logs and timeouts (the last hop once
    /// established; 0 for an empty chain).
    pub fn current_hop(&self) -> usize {
        (self.hop + 1).min(self.hops.len())
    }

    /// Whether the tunnel reaches the target.
    pub fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Established)
    }

    /// Bytes read from the connection. Consumes from the front of `input` only what belongs
    /// to proxy responses: once the final hop answered 2xx (or the chain failed), the rest is
    /// left in `input`.
    pub fn handle_input(&mut self, input: &mut &[u8]) {
        loop {
            if input.is_empty() {
                return;
            }
            match &mut self.phase {
                Phase::Established | Phase::Failed => return,
                Phase::AwaitClose { drained } => {
                    *drained = drained.saturating_add(input.len() as u64);
                    *input = &[];
                    if *drained > MAX_BODY {
                        self.fail(ChainErrorKind::Malformed(
                            "407 response body larger than 1 MiB".to_string(),
                        ));
                    }
                    return;
                }
                Phase::Drain { .. } => self.drain_body(input),
                Phase::AwaitHead(_) => self.read_head(input),
            }
        }
    }

    /// The connection hit EOF.
    pub fn handle_eof(&mut self) {
        match &self.phase {
            Phase::Established | Phase::Failed => {}
            Phase::AwaitClose { .. } => self.reconnect(),
            Phase::Drain { next, .. } => {
                if next.reconnectable() {
                    self.reconnect();
                } else {
                    self.fail(ChainErrorKind::NtlmNeedsKeepAlive);
                }
            }
            // A follow-up request on a kept-alive connection met the proxy's close (the usual
            // keep-alive race): nothing was lost but the connection, so retry on a new one.
            // The NTLM AUTHENTICATE is not retried: the proxy dropping it is an answer too.
            Phase::AwaitHead(stage)
                if self.followup
                    && self.head.is_empty()
                    && !matches!(stage, Stage::NtlmAuthenticate) =>
            {
                self.reconnect()
            }
            Phase::AwaitHead(_) => self.fail(ChainErrorKind::Closed),
        }
    }

    fn start_connection(&mut self) {
        self.hop = 0;
        self.head.clear();
        self.transmit.clear();
        self.start_hop();
    }

    /// Sends the first request for the current hop, or reports the tunnel established.
    fn start_hop(&mut self) {
        if self.hop >= self.hops.len() {
            self.phase = Phase::Established;
            let early = std::mem::take(&mut self.head);
            self.events.push_back(ChainEvent::Established { early });
            return;
        }
        let send = match self.resolved.get(self.hop).copied().flatten() {
            None | Some(Scheme::NoAuth) => Send::Plain,
            Some(Scheme::Basic) => Send::Basic,
            Some(Scheme::Ntlm) => Send::NtlmNegotiate,
        };
        self.send(send, false);
    }

    /// Queues the request; `followup`: it reuses the connection after a 407.
    fn send(&mut self, send: Send, followup: bool) {
        self.followup = followup;
        let (auth, stage) = match send {
            Send::Plain => (None, Stage::Plain),
            Send::Basic => match self.basic_login() {
                Some((user, password)) => {
                    let token = STANDARD.encode(format!("{user}:{password}"));
                    (Some(format!("Basic {token}")), Stage::Basic)
                }
                None => {
                    let offered = vec!["Basic".to_string()];
                    return self.fail(ChainErrorKind::AuthRequired { offered });
                }
            },
            Send::NtlmNegotiate => {
                let negotiate = ntlm::negotiate_message();
                let header = format!("NTLM {}", STANDARD.encode(&negotiate));
                (Some(header), Stage::NtlmNegotiate { negotiate })
            }
            Send::NtlmAuthenticate(message) => {
                let header = format!("NTLM {}", STANDARD.encode(&message));
                (Some(header), Stage::NtlmAuthenticate)
            }
        };
        let target = self.authorities.get(self.hop).map_or("", String::as_str);
        self.transmit
            .push_back(connect_request(target, auth.as_deref()));
        self.phase = Phase::AwaitHead(stage);
    }

    fn read_head(&mut self, input: &mut &[u8]) {
        let buffered = self.head.len();
        let room = MAX_HEAD.saturating_sub(buffered);
        let (chunk, _) = split(input, room);
        let parsed = if buffered == 0 {
            parse_head(chunk)
        } else {
            self.head.extend_from_slice(chunk);
            // A head ends with '\n', so only a chunk holding one can complete it.
            if chunk.contains(&b'\n') || self.head.len() <= 16 {
                parse_head(&self.head)
            } else {
                Parsed::Partial
            }
        };
        match parsed {
            Parsed::Partial => {
                if buffered == 0 {
                    self.head.extend_from_slice(chunk);
                }
                *input = split(input, chunk.len()).1;
                if self.head.len() >= MAX_HEAD {
                    self.fail(ChainErrorKind::Malformed(
                        "response head larger than 16 KiB".to_string(),
                    ));
                }
            }
            Parsed::Complete(head, len) => {
                let Some(from_input) = len.checked_sub(buffered) else {
                    return self.fail(ChainErrorKind::Malformed(
                        "response head framing".to_string(),
                    ));
                };
                *input = split(input, from_input).1;
                self.head.clear();
                self.on_head(head);
            }
            Parsed::Error(message) => self.fail(ChainErrorKind::Malformed(message)),
        }
    }

    fn on_head(&mut self, head: Head) {
        let Phase::AwaitHead(stage) = std::mem::replace(&mut self.phase, Phase::Failed) else {
            return;
        };
        match head.code {
            101 => self.fail(ChainErrorKind::Status {
                code: head.code,
                reason: head.reason,
            }),
            100..=199 => self.phase = Phase::AwaitHead(stage),
            200..=299 => {
                if let Some(slot) = self.resolved.get_mut(self.hop) {
                    if slot.is_none() {
                        *slot = Some(Scheme::NoAuth);
                    }
                }
                self.hop += 1;
                self.start_hop();
            }
            403 => self.fail(ChainErrorKind::Forbidden {
                reason: head.reason,
            }),
            407 => self.on_407(stage, head),
            code => self.fail(ChainErrorKind::Status {
                code,
                reason: head.reason,
            }),
        }
    }

    fn on_407(&mut self, stage: Stage, head: Head) {
        let offered = head.offered();
        let offers = |scheme: &str| offered.iter().any(|o| o.eq_ignore_ascii_case(scheme));
        match stage {
            Stage::Plain => {
                let Some(auth) = self.hops.get(self.hop).map(|h| &h.auth) else {
                    return;
                };
                let (can_basic, can_ntlm, prefers_ntlm) = match auth {
                    HopAuth::None => {
                        return self.fail(ChainErrorKind::AuthRequired { offered });
                    }
                    HopAuth::Basic { .. } => (true, false, false),
                    HopAuth::Ntlm(_) => (false, true, true),
                    HopAuth::Auto { user, .. } => (true, true, user.contains('\\')),
                };
                let ntlm = can_ntlm && offers("NTLM");
                let basic = can_basic && offers("Basic");
                let (scheme, send) = if ntlm && (prefers_ntlm || !basic) {
                    (Scheme::Ntlm, Send::NtlmNegotiate)
                } else if basic {
                    (Scheme::Basic, Send::Basic)
                } else {
                    return self.fail(ChainErrorKind::UnsupportedAuth { offered });
                };
                if let Some(slot) = self.resolved.get_mut(self.hop) {
                    *slot = Some(scheme);
                }
                self.continue_after_407(&head, send);
            }
            Stage::Basic => {
                if !offered.is_empty() && !offers("Basic") {
                    return self.fail(ChainErrorKind::UnsupportedAuth { offered });
                }
                let user = self.basic_login().map(|(u, _)| u.to_string());
                self.fail(ChainErrorKind::WrongCredentials {
                    scheme: "Basic",
                    user: user.unwrap_or_default(),
                });
            }
            Stage::NtlmNegotiate { negotiate } => {
                if !offers("NTLM") && !offered.is_empty() {
                    return self.fail(ChainErrorKind::UnsupportedAuth { offered });
                }
                match head.ntlm_token() {
                    Some(token) => match self.authenticate(&negotiate, token) {
                        Ok(message) => {
                            self.continue_after_407(&head, Send::NtlmAuthenticate(message))
                        }
                        Err(kind) => self.fail(kind),
                    },
                    None if head.reusable() => self.fail(ChainErrorKind::Malformed(
                        "the proxy answered the NTLM negotiate message without a challenge"
                            .to_string(),
                    )),
                    // A bare offer on a closing connection: start over on a fresh one.
                    None => self.continue_after_407(&head, Send::NtlmNegotiate),
                }
            }
            Stage::NtlmAuthenticate => {
                let user = self.ntlm_login().map(|c| ntlm_display(&c, self.hop_auth()));
                self.fail(ChainErrorKind::WrongCredentials {
                    scheme: "NTLM",
                    user: user.unwrap_or_default(),
                });
            }
        }
    }

    /// After a 407 we can answer: drain its body and send `send` on this connection, or, if
    /// the proxy closes it, wait for EOF and reconnect.
    fn continue_after_407(&mut self, head: &Head, send: Send) {
        let framing = match head.framing() {
            Ok(framing) => framing,
            Err(message) => return self.fail(ChainErrorKind::Malformed(message)),
        };
        let body = match framing {
            Framing::Length(n) if head.persistent() => Body::Length(n),
            Framing::Chunked if head.persistent() => Body::Chunked(Chunked::default()),
            _ => {
                if !send.reconnectable() {
                    return self.fail(ChainErrorKind::NtlmNeedsKeepAlive);
                }
                self.phase = Phase::AwaitClose { drained: 0 };
                return;
            }
        };
        match body {
            Body::Length(0) => self.send(send, true),
            Body::Length(n) if n > MAX_BODY => self.fail(ChainErrorKind::Malformed(format!(
                "407 response body of {n} bytes is larger than 1 MiB"
            ))),
            body => {
                self.phase = Phase::Drain {
                    body,
                    next: send,
                    drained: 0,
                }
            }
        }
    }

    fn drain_body(&mut self, input: &mut &[u8]) {
        let Phase::Drain { body, drained, .. } = &mut self.phase else {
            return;
        };
        let (consumed, done) = match body {
            Body::Length(remaining) => {
                let take = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                *remaining -= take as u64;
                (take, *remaining == 0)
            }
            Body::Chunked(chunked) => match chunked.feed(input) {
                Ok(progress) => progress,
                Err(message) => {
                    return self.fail(ChainErrorKind::Malformed(format!(
                        "invalid chunked body in 407 response: {message}"
                    )));
                }
            },
        };
        *input = split(input, consumed).1;
        *drained = drained.saturating_add(consumed as u64);
        if *drained > MAX_BODY {
            return self.fail(ChainErrorKind::Malformed(
                "407 response body larger than 1 MiB".to_string(),
            ));
        }
        if done {
            if let Phase::Drain { next, .. } = std::mem::replace(&mut self.phase, Phase::Failed) {
                self.send(next, true);
            }
        }
    }

    fn authenticate(&mut self, negotiate: &[u8], token: &str) -> Result<Vec<u8>, ChainErrorKind> {
        let raw = STANDARD_PAD_INDIFFERENT.decode(token).map_err(|_| {
            ChainErrorKind::Malformed("NTLM challenge is not valid base64".to_string())
        })?;
        let challenge =
            ntlm::parse_challenge(&raw).map_err(|e| ChainErrorKind::Malformed(e.to_string()))?;
        let creds = self.ntlm_login().ok_or(ChainErrorKind::UnsupportedAuth {
            offered: vec!["NTLM".to_string()],
        })?;
        let client_challenge = self.drbg.array::<8>();
        let now = ntlm::unix_ms_to_filetime(self.now_unix_ms);
        Ok(ntlm::authenticate_message(
            &creds,
            &challenge,
            &raw,
            negotiate,
            client_challenge,
            now,
        ))
    }

    fn reconnect(&mut self) {
        self.reconnects += 1;
        if self.reconnects > MAX_RECONNECTS {
            return self.fail(ChainErrorKind::TooManyReconnects);
        }
        self.events.push_back(ChainEvent::Reconnect);
        self.unread_reconnects += 1;
        self.start_connection();
    }

    fn fail(&mut self, kind: ChainErrorKind) {
        let proxy = self
            .hops
            .get(self.hop)
            .map(ProxyHop::addr)
            .unwrap_or_default();
        self.events.push_back(ChainEvent::Failed(ChainError {
            hop: self.current_hop(),
            proxy,
            kind,
        }));
        self.phase = Phase::Failed;
        self.transmit.clear();
        self.head.clear();
    }

    fn hop_auth(&self) -> &HopAuth {
        self.hops.get(self.hop).map_or(&HopAuth::None, |h| &h.auth)
    }

    fn basic_login(&self) -> Option<(&str, &str)> {
        match self.hop_auth() {
            HopAuth::Basic { user, password } | HopAuth::Auto { user, password } => {
                Some((user, password))
            }
            HopAuth::None | HopAuth::Ntlm(_) => None,
        }
    }

    fn ntlm_login(&self) -> Option<NtlmCredentials> {
        let mut creds = match self.hop_auth() {
            HopAuth::Ntlm(creds) => creds.clone(),
            HopAuth::Auto { user, password } => {
                let (domain, user) = user.split_once('\\').unwrap_or(("", user));
                NtlmCredentials {
                    domain: domain.to_string(),
                    user: user.to_string(),
                    password: password.clone(),
                    workstation: String::new(),
                }
            }
            HopAuth::None | HopAuth::Basic { .. } => return None,
        };
        if creds.workstation.is_empty() {
            creds.workstation.clone_from(&self.workstation);
        }
        Some(creds)
    }
}

/// The login as the admin wrote it.
fn ntlm_display(creds: &NtlmCredentials, auth: &HopAuth) -> String {
    match auth {
        HopAuth::Auto { user, .. } => user.clone(),
        _ => format!("{}\\{}", creds.domain, creds.user),
    }
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| (b.is_ascii_graphic() && !matches!(b, b'/' | b'?' | b'#' | b'@')) || b >= 0x80)
}

fn connect_request(target: &str, auth: Option<&str>) -> Vec<u8> {
    let mut request =
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Connection: keep-alive\r\n");
    if let Some(auth) = auth {
        request.push_str("Proxy-Authorization: ");
        request.push_str(auth);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// `split_at` that cannot panic.
fn split(bytes: &[u8], at: usize) -> (&[u8], &[u8]) {
    bytes.split_at(at.min(bytes.len()))
}

enum Parsed {
    Partial,
    Complete(Head, usize),
    Error(String),
}

enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// The parts of a response head the chain acts on, copied out of the read buffer.
struct Head {
    code: u16,
    reason: String,
    http10: bool,
    close: bool,
    keep_alive: bool,
    /// `Some(true)` if Transfer-Encoding ends with chunked, `Some(false)` for another coding.
    chunked: Option<bool>,
    content_length: Result<Option<u64>, String>,
    offers: Vec<Offer>,
}

struct Offer {
    scheme: String,
    /// token68 or the first auth-param, as sent.
    data: String,
}

fn parse_head(bytes: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    match config.parse_response(&mut response, bytes) {
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Ok(httparse::Status::Complete(len)) => match Head::from_response(&response) {
            Some(head) => Parsed::Complete(head, len),
            None => Parsed::Error("incomplete status line".to_string()),
        },
        Err(httparse::Error::Version) => {
            Parsed::Error("not an HTTP/1.x response (expected \"HTTP/1.1 ...\")".to_string())
        }
        Err(httparse::Error::TooManyHeaders) => {
            Parsed::Error(format!("more than {MAX_HEADERS} header lines"))
        }
        Err(e) => Parsed::Error(format!("invalid HTTP response head ({e})")),
    }
}

impl Head {
    fn from_response(response: &httparse::Response<'_, '_>) -> Option<Head> {
        let mut head = Head {
            code: response.code?,
            reason: sanitize(response.reason.unwrap_or(""), MAX_REASON_CHARS),
            http10: response.version? == 0,
            close: false,
            keep_alive: false,
            chunked: None,
            content_length: Ok(None),
            offers: Vec::new(),
        };
        for header in response.headers.iter() {
            let value = String::from_utf8_lossy(header.value);
            let name = header.name;
            if name.eq_ignore_ascii_case("connection")
                || name.eq_ignore_ascii_case("proxy-connection")
            {
                for token in value.split(',').map(str::trim) {
                    head.close |= token.eq_ignore_ascii_case("close");
                    head.keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                if let Some(last) = value.split(',').map(str::trim).rfind(|c| !c.is_empty()) {
                    head.chunked = Some(last.eq_ignore_ascii_case("chunked"));
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                head.content_length = merge_length(head.content_length, &value);
            } else if name.eq_ignore_ascii_case("proxy-authenticate") {
                parse_offers(&value, &mut head.offers);
            }
        }
        Some(head)
    }

    /// Whether the proxy keeps the connection open after this response.
    fn persistent(&self) -> bool {
        !self.close && (!self.http10 || self.keep_alive)
    }

    /// How the body of this (non-2xx, non-1xx) response ends (RFC 9112, section 6.3).
    fn framing(&self) -> Result<Framing, String> {
        match self.chunked {
            Some(true) => return Ok(Framing::Chunked),
            Some(false) => return Ok(Framing::UntilClose),
            None => {}
        }
        match &self.content_length {
            Ok(Some(n)) => Ok(Framing::Length(*n)),
            Ok(None) => Ok(Framing::UntilClose),
            Err(message) => Err(message.clone()),
        }
    }

    /// Whether the next request can follow on this connection.
    fn reusable(&self) -> bool {
        self.persistent() && !matches!(self.framing(), Ok(Framing::UntilClose) | Err(_))
    }

    /// Scheme names offered in Proxy-Authenticate, deduplicated, for decisions and messages.
    fn offered(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for offer in &self.offers {
            if names.len() >= MAX_OFFERS_SHOWN {
                break;
            }
            if !names.iter().any(|n| n.eq_ignore_ascii_case(&offer.scheme)) {
                names.push(sanitize(&offer.scheme, 40));
            }
        }
        names
    }

    /// The base64 challenge of an `NTLM <token>` offer.
    fn ntlm_token(&self) -> Option<&str> {
        self.offers
            .iter()
            .filter(|o| o.scheme.eq_ignore_ascii_case("NTLM"))
            .filter_map(|o| o.data.split_whitespace().next())
            .find(|token| !token.contains('"'))
    }
}

fn merge_length(previous: Result<Option<u64>, String>, value: &str) -> Result<Option<u64>, String> {
    let mut length = previous?;
    for item in value.split(',').map(str::trim) {
        let valid =
            !item.is_empty() && item.len() <= 18 && item.bytes().all(|b| b.is_ascii_digit());
        let n = if valid {
            item.parse::<u64>().ok()
        } else {
            None
        };
        match (n, length) {
            (None, _) => return Err("invalid Content-Length".to_string()),
            (Some(n), Some(seen)) if n != seen => {
                return Err("conflicting Content-Length values".to_string())
            }
            (Some(n), _) => length = Some(n),
        }
    }
    Ok(length)
}

/// Splits a Proxy-Authenticate value into challenges: `NTLM, Basic realm="a, b"`,
/// `NTLM TlRMTVNTUAACAAAA...`. Items of the form `name=value` are parameters of the previous
/// challenge, so only their scheme's first item is kept.
fn parse_offers(value: &str, offers: &mut Vec<Offer>) {
    for item in split_commas(value) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (first, rest) = item.split_once([' ', '\t']).unwrap_or((item, ""));
        if first.contains('=') || first.contains('"') {
            continue;
        }
        offers.push(Offer {
            scheme: first.to_string(),
            data: rest.trim().to_string(),
        });
    }
}

fn split_commas(value: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(value.get(start..i).unwrap_or(""));
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(value.get(start..).unwrap_or(""));
    items
}

/// Proxy-supplied text made safe for one log line.
fn sanitize(text: &str, max_chars: usize) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(max_chars)
        .collect()
}

/// Streaming decoder of a chunked body we only need to skip (RFC 9112, section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    Size { size: u64, digits: u8 },
    Extension { size: u64 },
    SizeLf { size: u64 },
    Data(u64),
    DataCr,
    DataLf,
    Trailer { line_start: bool },
    Done,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked::Size { size: 0, digits: 0 }
    }
}

impl Chunked {
    /// Consumes from `input` up to the end of the body: (bytes consumed, body complete).
    fn feed(&mut self, input: &[u8]) -> Result<(usize, bool), &'static str> {
        let mut used = 0;
        while used < input.len() && *self != Chunked::Done {
            if let Chunked::Data(remaining) = self {
                let available = input.len() - used;
                let take = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(available);
                *remaining -= take as u64;
                used += take;
                if *remaining == 0 {
                    *self = Chunked::DataCr;
                }
                continue;
            }
            let Some(&byte) = input.get(used) else {
                break;
            };
            used += 1;
            *self = self.step(byte)?;
        }
        Ok((used, *self == Chunked::Done))
    }

    fn step(self, byte: u8) -> Result<Chunked, &'static str> {
        let end_of_size_line = |size: u64| {
            if size == 0 {
                Chunked::Trailer { line_start: true }
            } else {
                Chunked::Data(size)
            }
        };
        Ok(match self {
            Chunked::Size { size, digits } => match (byte as char).to_digit(16) {
                Some(d) if digits < 15 => Chunked::Size {
                    size: size << 4 | u64::from(d),
                    digits: digits + 1,
                },
                Some(_) => return Err("chunk size too large"),
                None if digits == 0 => return Err("missing chunk size"),
                None => match byte {
                    b'\r' => Chunked::SizeLf { size },
                    b'\n' => end_of_size_line(size),
                    b';' | b' ' | b'\t' => Chunked::Extension { size },
                    _ => return Err("invalid chunk size"),
                },
            },
            Chunked::Extension { size } => match byte {
                b'\n' => end_of_size_line(size),
                _ => self,
            },
            Chunked::SizeLf { size } => match byte {
                b'\n' => end_of_size_line(size),
                _ => return Err("chunk size line not ended by CRLF"),
            },
            Chunked::DataCr => match byte {
                b'\r' => Chunked::DataLf,
                b'\n' => Chunked::default(),
                _ => return Err("chunk data not followed by CRLF"),
            },
            Chunked::DataLf => match byte {
                b'\n' => Chunked::default(),
                _ => return Err("chunk data not followed by CRLF"),
            },
            Chunked::Trailer { line_start } => match byte {
                b'\n' if line_start => Chunked::Done,
                b'\n' => Chunked::Trailer { line_start: true },
                b'\r' => self,
                _ => Chunked::Trailer { line_start: false },
            },
            Chunked::Data(_) | Chunked::Done => self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(host: &str, port: u16, auth: HopAuth) -> ProxyHop {
        ProxyHop {
            host: host.to_string(),
            port,
            auth,
        }
    }

    fn feed_all(chain: &mut ConnectChain, bytes: &[u8]) -> Vec<u8> {
        let mut input = bytes;
        chain.handle_input(&mut input);
        input.to_vec()
    }

    fn events(chain: &mut ConnectChain) -> Vec<ChainEvent> {
        std::iter::from_fn(|| chain.poll_event()).collect()
    }

    #[test]
    fn addr_brackets_ipv6() {
        assert_eq!(
            hop("proxy.corp", 8080, HopAuth::None).addr(),
            "proxy.corp:8080"
        );
        assert_eq!(hop("10.0.0.1", 3128, HopAuth::None).addr(), "10.0.0.1:3128");
        assert_eq!(
            hop("2001:db8::1", 3128, HopAuth::None).addr(),
            "[2001:db8::1]:3128"
        );
        assert_eq!(hop("[::1]", 3128, HopAuth::None).addr(), "[::1]:3128");
    }

    #[test]
    fn login_rule_from_the_seeds() {
        assert_eq!(auth_from_login(None, None), HopAuth::None);
        assert_eq!(auth_from_login(Some(""), None), HopAuth::None);
        assert_eq!(
            auth_from_login(Some("myuser2"), Some("mypass")),
            HopAuth::Basic {
                user: "myuser2".into(),
                password: "mypass".into()
            }
        );
        let HopAuth::Ntlm(c) = auth_from_login(Some("\\myuser1"), Some("mypass")) else {
            panic!("expected NTLM");
        };
        assert_eq!((c.domain.as_str(), c.user.as_str()), ("", "myuser1"));
        assert_eq!(c.password, "mypass");
        let HopAuth::Ntlm(c) = auth_from_login(Some("mydomain\\my\\user1"), Some("p")) else {
            panic!("expected NTLM");
        };
        assert_eq!(
            (c.domain.as_str(), c.user.as_str()),
            ("mydomain", "my\\user1")
        );
        assert_eq!(
            auth_from_login(Some("user@corp"), None),
            HopAuth::Basic {
                user: "user@corp".into(),
                password: String::new()
            }
        );
    }

    #[test]
    fn debug_never_shows_passwords() {
        let hops = vec![
            hop("a", 1, auth_from_login(Some("u1"), Some("secret-basic"))),
            hop("b", 2, auth_from_login(Some("d\\u2"), Some("secret-ntlm"))),
            hop(
                "c",
                3,
                HopAuth::Auto {
                    user: "u3".into(),
                    password: "secret-auto".into(),
                },
            ),
        ];
        let chain = ConnectChain::new(hops.clone(), "gw", 7000, [0; 32], 0);
        let text = format!("{hops:?} {chain:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("u1") && text.contains("u2") && text.contains("u3"));
    }

    #[test]
    fn request_format() {
        let mut chain = ConnectChain::new(
            vec![hop("p", 8080, HopAuth::None)],
            "2001:db8::7",
            443,
            [0; 32],
            0,
        );
        assert_eq!(
            chain.poll_transmit().unwrap(),
            b"CONNECT [2001:db8::7]:443 HTTP/1.1\r\nHost: [2001:db8::7]:443\r\n\
              Proxy-Connection: keep-alive\r\n\r\n"
        );
        assert_eq!(chain.poll_transmit(), None);
    }

    #[test]
    fn offers_parsing() {
        let mut offers = Vec::new();
        parse_offers(
            "Negotiate, NTLM, Basic realm=\"Squid, proxy\", charset=\"UTF-8\"",
            &mut offers,
        );
        parse_offers("NTLM TlRMTVNTUAACAAAA==", &mut offers);
        let names: Vec<_> = offers.iter().map(|o| o.scheme.as_str()).collect();
        assert_eq!(names, ["Negotiate", "NTLM", "Basic", "NTLM"]);
        assert_eq!(offers[2].data, "realm=\"Squid, proxy\"");
        let head = Head {
            code: 407,
            reason: String::new(),
            http10: false,
            close: false,
            keep_alive: false,
            chunked: None,
            content_length: Ok(None),
            offers,
        };
        assert_eq!(head.offered(), ["Negotiate", "NTLM", "Basic"]);
        assert_eq!(head.ntlm_token(), Some("TlRMTVNTUAACAAAA=="));
    }

    #[test]
    fn content_length_rules() {
        assert_eq!(merge_length(Ok(None), "12"), Ok(Some(12)));
        assert_eq!(merge_length(Ok(Some(12)), "12, 12"), Ok(Some(12)));
        assert!(merge_length(Ok(Some(12)), "13").is_err());
        assert!(merge_length(Ok(None), "-1").is_err());
        assert!(merge_length(Ok(None), "+5").is_err());
        assert!(merge_length(Ok(None), "99999999999999999999").is_err());
    }

    #[test]
    fn chunked_decoder_stops_at_the_end() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: a\r\n\r\nNEXT";
        for step in 1..body.len() {
            let mut decoder = Chunked::default();
            let mut at = 0;
            let mut done = false;
            while !done && at < body.len() {
                let end = (at + step).min(body.len());
                let (used, finished) = decoder.feed(&body[at..end]).unwrap();
                at += used;
                done = finished;
            }
            assert!(done);
            assert_eq!(&body[at..], b"NEXT");
        }
        let mut bare = Chunked::default();
        assert_eq!(bare.feed(b"3\nabc\n0\n\nZ").unwrap(), (9, true));
        assert!(Chunked::default().feed(b"zz\r\n").is_err());
        assert!(Chunked::default().feed(b"1\r\nab").is_err());
        assert!(Chunked::default().feed(b"ffffffffffffffffff\r\n").is_err());
    }

    #[test]
    fn empty_chain_is_established_at_once() {
        let mut chain = ConnectChain::new(Vec::new(), "gw", 7000, [0; 32], 0);
        assert_eq!(chain.poll_transmit(), None);
        assert_eq!(
            events(&mut chain),
            [ChainEvent::Established { early: vec![] }]
        );
        assert_eq!(feed_all(&mut chain, b"data"), b"data");
    }

    #[test]
    fn header_injection_is_refused() {
        let mut chain = ConnectChain::new(
            vec![hop("p", 1, HopAuth::None)],
            "gw\r\nX-Evil: 1",
            7000,
            [0; 32],
            0,
        );
        assert_eq!(chain.poll_transmit(), None);
        let [ChainEvent::Failed(e)] = &events(&mut chain)[..] else {
            panic!("expected failure");
        };
        assert!(matches!(e.kind, ChainErrorKind::InvalidAddress { .. }));
        assert_eq!(e.hop, 1);
    }

    #[test]
    fn messages_an_admin_can_act_on() {
        let e = |kind| {
            ChainError {
                hop: 2,
                proxy: "proxy2.corp:3128".into(),
                kind,
            }
            .to_string()
        };
        let wrong = e(ChainErrorKind::WrongCredentials {
            scheme: "NTLM",
            user: "CORP\\alice".into(),
        });
        assert_eq!(
            wrong,
            "proxy hop 2 (proxy2.corp:3128): the proxy rejected the NTLM login of user \
             \"CORP\\alice\" (wrong user name or password, or the account is locked or not \
             allowed to use this proxy)"
        );
        let required = e(ChainErrorKind::AuthRequired {
            offered: vec!["NTLM".into(), "Basic".into()],
        });
        assert!(
            required.contains("requires a login (NTLM, Basic)"),
            "{required}"
        );
        assert!(required.contains("DOMAIN\\user"), "{required}");
        let unsupported = e(ChainErrorKind::UnsupportedAuth { offered: vec![] });
        assert!(unsupported.contains("no scheme named"), "{unsupported}");
        let status = e(ChainErrorKind::Status {
            code: 502,
            reason: "Bad Gateway".into(),
        });
        assert!(
            status.ends_with(
                "answered 502 Bad Gateway (it could not reach the next proxy or the gateway)"
            ),
            "{status}"
        );
        assert!(e(ChainErrorKind::TooManyReconnects).contains("after 3 reconnects"));
    }

    #[test]
    fn interim_responses_are_skipped() {
        let mut chain = ConnectChain::new(vec![hop("p", 1, HopAuth::None)], "gw", 7, [0; 32], 0);
        let _ = chain.poll_transmit();
        let rest = feed_all(
            &mut chain,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Connection established\r\n\r\nhi",
        );
        assert_eq!(rest, b"hi");
        assert_eq!(
            events(&mut chain),
            [ChainEvent::Established { early: vec![] }]
        );
    }

    #[test]
    fn http10_without_keep_alive_is_closing() {
        let mut chain = ConnectChain::new(
            vec![hop(
                "p",
                1,
                HopAuth::Auto {
                    user: "u".into(),
                    password: "p".into(),
                },
            )],
            "gw",
            7,
            [0; 32],
            0,
        );
        let _ = chain.poll_transmit();
        let rest = feed_all(
            &mut chain,
            b"HTTP/1.0 407 Auth\r\nProxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 2\r\n\r\nab",
        );
        assert!(rest.is_empty());
        assert_eq!(chain.poll_transmit(), None);
        chain.handle_eof();
        assert_eq!(events(&mut chain), [ChainEvent::Reconnect]);
        let replay = String::from_utf8(chain.poll_transmit().unwrap()).unwrap();
        assert!(
            replay.contains("Proxy-Authorization: Basic dTpw\r\n"),
            "{replay}"
        );
    }
}
