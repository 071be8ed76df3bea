//! Starting the runtimes from the command line, and the self-contained demo.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use dialback_tokio::agent;
use dialback_tokio::gateway::BoundGateway;
use dialback_tokio::settings::{
    AgentService, AgentSettings, GatewayService, GatewaySettings, GatewayTrust, IdentitySource,
    Secret, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_PENDING, DEFAULT_POOL, DEFAULT_POOL_MAX_IDLE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::info;

pub struct DemoOptions {
    pub gateway_port: u16,
    pub public_port: u16,
    /// Fetch the demo page once through the tunnel, print it, and exit (for scripted checks).
    pub check: bool,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

/// Routes every plain relay of this process through io_uring loops, one per core.
pub fn install_uring() -> anyhow::Result<()> {
    let loops = dialback_uring::install(0).context(
        "cannot start the io_uring runtime (kernel too old, or io_uring disabled by the \
         kernel.io_uring_disabled sysctl or a seccomp profile); run with --runtime tokio",
    )?;
    tracing::info!(
        loops,
        mechanism = "io_uring: shared buffers for messages, poll + splice(2) for bulk",
        hand_over_after_turns = dialback_uring::HAND_OVER_AFTER,
        "io_uring data plane started"
    );
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Runs the gateway of the config file `path`, reloading it on SIGHUP and when the file
/// changes (see [`watch_config`]).
pub fn gateway(settings: GatewaySettings, path: PathBuf) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let gw = BoundGateway::bind(settings).await?;
        let watch = tokio::spawn(watch_config(path, gw.reloader(), gw.metrics()));
        gw.run(shutdown_signal()).await;
        watch.abort();
        Ok(())
    })
}

/// How often the config file is compared with the one running.
const CONFIG_POLL: Duration = Duration::from_secs(2);
/// A changed file must read the same this much later before it is loaded, so that a file
/// caught in the middle of being written is not taken for the new configuration.
const CONFIG_SETTLE: Duration = Duration::from_millis(250);

/// Reloads the gateway's configuration on SIGHUP, and when the bytes of `path` change. A file
/// that does not load (syntax, a bad value, a missing password file) is refused with its
/// reason and the running configuration is kept; so is one the gateway cannot apply (a port
/// in use, an unreadable certificate).
async fn watch_config(
    path: PathBuf,
    reloader: dialback_tokio::gateway::Reloader,
    metrics: std::sync::Arc<dialback_tokio::metrics::GatewayMetrics>,
) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot handle SIGHUP ({e}); the config file is still watched");
            None
        }
    };
    let mut seen = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(CONFIG_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            _ = tick.tick() => {
                let now = std::fs::read(&path).ok();
                if now == seen || now.is_none() {
                    // Unchanged, or gone for a moment (an editor replacing it).
                    continue;
                }
                tokio::time::sleep(CONFIG_SETTLE).await;
                let settled = std::fs::read(&path).ok();
                if settled != now {
                    continue; // still being written: look again at the next tick
                }
                "the config file changed"
            }
        };
        seen = std::fs::read(&path).ok();
        info!(path = %path.display(), trigger = why, "reloading the configuration");
        let settings = match crate::config::load_gateway(&path) {
            Ok((settings, warnings)) => {
                for w in warnings {
                    tracing::warn!("{w}");
                }
                settings
            }
            Err(e) => {
                metrics.config_reload(false);
                tracing::error!(
                    reason = %e,
                    hint = %format!("dialback check -c {} lists every problem", path.display()),
                    "configuration reload refused: the running configuration is kept"
                );
                continue;
            }
        };
        match reloader.reload(settings).await {
            Ok(r) => {
                if !r.needs_restart.is_empty() {
                    tracing::warn!(
                        keys = %r.needs_restart.join(", "),
                        "changed settings that only take effect after a restart are kept as they run"
                    );
                }
                let s = &r.services;
                let addrs = |v: &[SocketAddr]| {
                    v.iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                info!(
                    trigger = why,
                    added = %s.added.join(","),
                    changed = %s.changed.join(","),
                    removed = %s.removed.join(","),
                    opened = %addrs(&r.opened),
                    closed = %addrs(&r.closed),
                    http = r.http,
                    "configuration reloaded"
                );
            }
            Err(e) => tracing::error!(
                reason = %e,
                "configuration reload refused: the running configuration is kept"
            ),
        }
    }
}

pub fn agent(settings: AgentSettings) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        // The agent reads its config once; a SIGHUP meant for a gateway must not kill it.
        if let Ok(mut hup) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::warn!(
                        "SIGHUP ignored: the agent reads its configuration only at start; restart it to apply changes"
                    );
                }
            });
        }
        agent::run(settings, shutdown_signal()).await?;
        Ok(())
    })
}

pub fn demo(opts: DemoOptions) -> anyhow::Result<()> {
    runtime()?.block_on(demo_async(opts))
}

async fn demo_async(opts: DemoOptions) -> anyhow::Result<()> {
    let loopback = Ipv4Addr::LOCALHOST;
    let web = TcpListener::bind((loopback, 0))
        .await
        .context("cannot start the demo web service")?;
    let web_addr = web.local_addr()?;
    tokio::spawn(demo_web(web));

    let state = std::env::temp_dir().join(format!("dialback-demo-{}", std::process::id()));
    let password = {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        hex::encode(b)
    };
    let gw_settings = GatewaySettings {
        listen: SocketAddr::from((loopback, opts.gateway_port)),
        identity: IdentitySource {
            cert: None,
            key: None,
            state_dir: state.clone(),
        },
        timing: Default::default(),
        services: vec![GatewayService {
            name: "demo".into(),
            password: Secret(password.clone()),
            tcp_listen: Some(SocketAddr::from((loopback, opts.public_port))),
            data_tls: false,
            max_pending: DEFAULT_MAX_PENDING,
            pool: DEFAULT_POOL,
            pool_max_idle: DEFAULT_POOL_MAX_IDLE,
            allow_from: Default::default(),
            clients_allow: Default::default(),
            accept_proxy: false,
            send_proxy: None,
            upstreams: None,
        }],
        admin_listen: Some(SocketAddr::from((loopback, 0))),
        http: None,
        accept_proxy: false,
        max_handshakes: dialback_tokio::settings::DEFAULT_MAX_HANDSHAKES,
        drain_timeout: Duration::from_secs(1),
        tcp_keepalive: dialback_tokio::sockopt::DEFAULT_TCP_KEEPALIVE,
    };
    let gw = BoundGateway::bind(gw_settings).await.context("cannot start the demo gateway (is another program using the port? try --gateway-port/--public-port)")?;
    let gw_addr = gw.listen_addr()?;
    let public = gw
        .service_addr("demo")
        .context("demo service has no public address")?;
    let fingerprint = gw.fingerprint();
    let status_page = gw.admin_addr().map(|a| format!("http://{a}/"));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut gw_stop = stop_rx.clone();
    let gw_task = tokio::spawn(gw.run(async move {
        let _ = gw_stop.wait_for(|s| *s).await;
    }));

    let agent_settings = AgentSettings {
        gateways: vec![gw_addr.to_string()],
        server_name: None,
        trust: GatewayTrust::Fingerprint(fingerprint),
        services: vec![AgentService {
            name: "demo".into(),
            password: Secret(password),
            local: web_addr.to_string(),
            send_proxy: None,
        }],
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(5),
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        proxies: Vec::new(),
        admin_listen: None,
        tcp_keepalive: dialback_tokio::sockopt::DEFAULT_TCP_KEEPALIVE,
    };
    let mut agent_stop = stop_rx.clone();
    let agent_task = tokio::spawn(agent::run(agent_settings, async move {
        let _ = agent_stop.wait_for(|s| *s).await;
    }));

    let url = format!("http://{public}/");
    info!(gateway = %gw_addr, web = %web_addr, "demo running: gateway, agent and a web service on loopback");
    let result = if opts.check {
        let page = fetch_through_tunnel(public).await;
        match &page {
            Ok(body) => println!("{body}"),
            Err(e) => eprintln!("error: {e:#}"),
        }
        page.map(|_| ())
    } else {
        // Announce the URL only once the page really comes through the tunnel.
        if let Err(e) = fetch_through_tunnel(public).await {
            let _ = stop_tx.send(true);
            return Err(e);
        }
        println!("dialback demo is up: open {url}");
        if let Some(status) = &status_page {
            println!("the gateway's status page is at {status} (metrics: {status}metrics)");
        }
        println!("(the page is served by a private web service, reached through the agent's tunnel; Ctrl-C stops)");
        shutdown_signal().await;
        Ok(())
    };
    let _ = stop_tx.send(true);
    let _ = gw_task.await;
    let _ = agent_task.await;
    let _ = std::fs::remove_dir_all(&state);
    result
}

/// GETs the demo page through the gateway, retrying while the agent registers.
async fn fetch_through_tunnel(public: SocketAddr) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut last_err = anyhow::anyhow!("no attempt made");
    while tokio::time::Instant::now() < deadline {
        match get(public).await {
            Ok(body) if body.starts_with("HTTP/1.0 200") => return Ok(body),
            Ok(body) => {
                last_err =
                    anyhow::anyhow!("unexpected answer: {}", body.lines().next().unwrap_or(""))
            }
            Err(e) => last_err = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last_err.context("the demo page could not be fetched through the tunnel within 20s"))
}

async fn get(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: demo\r\n\r\n").await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A tiny HTTP/1.0 responder standing in for the private service an agent publishes.
async fn demo_web(listener: TcpListener) {
    loop {
        let Ok((mut s, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!(
                "<!doctype html><html><head><title>dialback demo</title></head><body>\
                 <h1>Hello through dialback</h1>\
                 <p>This page comes from a private web service at {}, reached by the gateway \
                 through a data connection the agent dialed back.</p>\
                 <p>The web service saw the agent connecting from {}.</p></body></html>\n",
                s.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                peer
            );
            let resp = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                body.len(),
                body
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
