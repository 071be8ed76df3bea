//! Plain settings the runtime is started with. The binary's TOML layer fills these in; tests
//! build them directly.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dialback_core::Timing;

/// A password that never appears in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where the gateway's TLS identity comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentitySource {
    /// PEM certificate chain and key given by the operator; both or neither.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Where a self-signed certificate is generated on first start and reused afterwards.
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySettings {
    /// Agents' control and data connections.
    pub listen: SocketAddr,
    pub identity: IdentitySource,
    pub timing: Timing,
    pub services: Vec<GatewayService>,
    /// Serves `/metrics`, `/status` and the status page when set.
    pub admin_listen: Option<SocketAddr>,
    /// The public HTTP(S) entry point routing `/~~name` to services, when set.
    pub http: Option<HttpSettings>,
    /// Connections on `listen` start with a PROXY protocol header from a front balancer.
    pub accept_proxy: bool,
    /// Connections on `listen` (and clients still sending their PROXY header) that may be in
    /// their handshake at once; more are closed at once.
    pub max_handshakes: usize,
    /// On shutdown, how long relayed clients may take to finish before they are cut.
    pub drain_timeout: Duration,
    /// Keepalive on every connection accepted (see [`crate::sockopt::keepalive`]); zero: off.
    pub tcp_keepalive: Duration,
}

/// The `[http]` section: public HTTP and HTTPS ports that route requests to services by path
/// prefix or host name.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    pub listen: Option<SocketAddr>,
    pub tls_listen: Option<SocketAddr>,
    /// Certificates for `tls_listen`, chosen by the name the client asks for (SNI); the
    /// first one is served to clients whose name matches none.
    pub certs: Vec<HttpCert>,
    /// The services reachable over HTTP, with their prefix and host names.
    pub routes: Vec<HttpRoute>,
    /// A request head must be complete this long after its first byte (408 otherwise).
    pub head_timeout: Duration,
    /// A kept-alive connection with no new request for this long is closed.
    pub idle_timeout: Duration,
    /// A service must start its response this long after the request was sent (504).
    pub response_timeout: Duration,
    /// Largest request head in bytes (431 above).
    pub max_head: usize,
    /// Connections on both ports start with a PROXY protocol header from a front balancer.
    pub accept_proxy: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpCert {
    /// Names (or `*.domain`) this certificate is chosen for; may be empty for the default.
    pub names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpRoute {
    pub service: String,
    /// `/~~name` unless configured otherwise.
    pub prefix: String,
    /// Host names routed to this service whatever the path.
    pub hosts: Vec<String>,
}

pub const DEFAULT_HTTP_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_HTTP_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_HTTP_MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayService {
    pub name: String,
    pub password: Secret,
    /// Raw TCP port for public clients.
    pub tcp_listen: Option<SocketAddr>,
    /// Data connections for this service must be under TLS.
    pub data_tls: bool,
    /// Clients that may wait for a data connection at once; more are refused.
    pub max_pending: usize,
    /// Data connections kept ready at the gateway (0 turns the pool off).
    pub pool: usize,
    /// A pooled connection unused this long is replaced by a fresh one.
    pub pool_max_idle: Duration,
    /// Who may register as this service's agent.
    pub allow_from: dialback_core::acl::AllowList,
    /// Who may be a public client of this service.
    pub clients_allow: dialback_core::acl::AllowList,
    /// Connections on `tcp_listen` start with a PROXY protocol header from a front balancer.
    pub accept_proxy: bool,
    /// Ask the agent to send a PROXY header toward its local service.
    pub send_proxy: Option<dialback_core::proxy_protocol::Version>,
    /// Served by the gateway dialing these itself instead of by an agent (then `password`,
    /// the pool, `data_tls` and `send_proxy` do not apply).
    pub upstreams: Option<UpstreamSettings>,
}

/// A direct service's servers and how they are balanced and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    /// `host:port` of each server; a name is resolved at every dial.
    pub addrs: Vec<String>,
    pub balance: dialback_core::upstream::Balance,
    pub health: dialback_core::upstream::HealthCheck,
    /// A client's connection to one server must be up within this; then the next is tried.
    pub connect_timeout: Duration,
}

pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How the agent decides that it talks to the real gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayTrust {
    /// SHA-256 of the gateway's end-entity certificate (DER).
    Fingerprint([u8; 32]),
    /// PEM file of CA certificates that sign the gateway's certificate.
    CaFile(PathBuf),
    /// The operating system's root store.
    System,
    /// No verification at all. Logged loudly at start and on every connection.
    Insecure,
}

#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// `host:port` of each gateway's `listen` (at least one). Every service registers with
    /// every gateway independently: a fleet behind a balancer or DNS shares no state.
    pub gateways: Vec<String>,
    /// Name to verify in the gateways' certificates (CA and system trust); defaults to the
    /// host part of each gateway's address.
    pub server_name: Option<String>,
    pub trust: GatewayTrust,
    pub services: Vec<AgentService>,
    /// First reconnect delay; doubles on every failure up to `reconnect_max`, with jitter.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Timeout for TCP connect + TLS handshake + registration, and for dialing `local`.
    pub connect_timeout: Duration,
    /// HTTP CONNECT proxies to pass through, in order, for control and data connections.
    pub proxies: Vec<dialback_core::connect_chain::ProxyHop>,
    /// Serves the agent's `/metrics` when set.
    pub admin_listen: Option<SocketAddr>,
    /// Keepalive on the connections to the gateway (see [`crate::sockopt::keepalive`]);
    /// zero: off.
    pub tcp_keepalive: Duration,
}

#[derive(Debug, Clone)]
pub struct AgentService {
    pub name: String,
    pub password: Secret,
    /// `host:port` of the private service this agent publishes.
    pub local: String,
    /// Prepend a PROXY protocol header with the public client's address toward `local`; when
    /// `None`, whatever the gateway asks for its service.
    pub send_proxy: Option<dialback_core::proxy_protocol::Version>,
}

pub const DEFAULT_MAX_PENDING: usize = 1024;
pub const DEFAULT_POOL: usize = 4;
/// Below the idle timeouts of common NATs and proxies, so a pooled connection is replaced
/// before anything on the way can forget it silently.
pub const DEFAULT_POOL_MAX_IDLE: Duration = Duration::from_secs(50);
/// Largest pool a service may ask for.
pub const MAX_POOL: usize = 256;
pub const DEFAULT_MAX_HANDSHAKES: usize = 4096;
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(500);
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
