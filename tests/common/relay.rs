//! A TCP relay for fault injection, run on its own small tokio runtime so that blocking tests
//! can use it too. It forwards every connection it accepts to a target (or, as an HTTP CONNECT
//! proxy, to the target each client names), and on demand it:
//!
//! - re-chunks: every read is written on in random pieces, with random pauses in between, so
//!   frame decoders and relays see every possible split;
//! - black-holes: connections open at that moment stop being forwarded in both directions, but
//!   their sockets stay open, like a NAT or a firewall that silently forgot them;
//! - dies: every socket it holds is closed at once, like a crashed middlebox or proxy.
//!
//! Half-close is passed on (a FIN becomes a write shutdown on the other side); an error in one
//! direction ends both. Only loopback targets are allowed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How a relay bends the byte stream. `Chaos::none()` forwards reads as they come.
#[derive(Clone, Copy, Debug)]
pub struct Chaos {
    /// Each read is written on in pieces of 1..=max_chunk bytes.
    pub max_chunk: usize,
    /// After a piece, a pause of up to `max_delay`, one time in `delay_one_in` (0: never).
    pub max_delay: Duration,
    pub delay_one_in: u32,
}

impl Chaos {
    pub fn none() -> Chaos {
        Chaos {
            max_chunk: usize::MAX,
            max_delay: Duration::ZERO,
            delay_one_in: 0,
        }
    }

    /// Small random pieces and frequent short pauses: what the fault tests use on every hop.
    pub fn rough() -> Chaos {
        Chaos {
            max_chunk: 700,
            max_delay: Duration::from_millis(3),
            delay_one_in: 16,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Fixed(SocketAddr),
    /// An HTTP CONNECT proxy: the client names the target.
    Connect,
}

struct Shared {
    target: Target,
    chaos: Chaos,
    /// One sender per open connection: `true` black-holes it.
    holes: Mutex<Vec<(u64, watch::Sender<bool>)>>,
    accepted: AtomicUsize,
    open: AtomicUsize,
    /// Bytes forwarded in both directions, all connections together.
    forwarded: AtomicU64,
    next_id: AtomicU64,
}

pub struct Relay {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

impl Relay {
    /// Forwards every connection to `target`.
    pub fn start(target: SocketAddr, chaos: Chaos) -> Relay {
        Relay::start_on("127.0.0.1:0".parse().unwrap(), Target::Fixed(target), chaos)
    }

    /// An HTTP CONNECT proxy (no authentication) that relays each tunnel with `chaos`.
    pub fn connect_proxy(chaos: Chaos) -> Relay {
        Relay::start_on("127.0.0.1:0".parse().unwrap(), Target::Connect, chaos)
    }

    /// Starts the same kind of relay again on the address of a dead one.
    pub fn restart(&self) -> Relay {
        Relay::start_on(self.addr, self.shared.target, self.shared.chaos)
    }

    fn start_on(listen: SocketAddr, target: Target, chaos: Chaos) -> Relay {
        let rt = runtime();
        let shared = Arc::new(Shared {
            target,
            chaos,
            holes: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            forwarded: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
        });
        // The port of a relay that just died may linger briefly: retry the bind for a while.
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match rt.block_on(async { TcpListener::bind(listen).await }) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("relay cannot bind {listen}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let s = shared.clone();
        rt.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                tokio::spawn(async move { serve(s, client).await });
            }
        });
        Relay {
            addr,
            shared,
            rt: Some(rt),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now (black-holed ones included).
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Bytes forwarded so far, both directions of all connections together.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Stops forwarding on every connection open now, without closing any; connections
    /// accepted later are forwarded normally. Returns how many were black-holed.
    pub fn blackhole_open(&self) -> usize {
        let holes = self.shared.holes.lock().unwrap();
        for (_, h) in holes.iter() {
            let _ = h.send(true);
        }
        holes.len()
    }

    /// Closes the listener and every connection at once.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Removes a connection's black-hole switch and counts it closed, however its task ends.
struct OpenGuard(Arc<Shared>, u64);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.holes.lock().unwrap().retain(|(id, _)| *id != self.1);
    }
}

async fn serve(s: Arc<Shared>, mut client: TcpStream) {
    let id = s.next_id.fetch_add(1, Ordering::SeqCst);
    let (tx, mut hole) = watch::channel(false);
    s.holes.lock().unwrap().push((id, tx));
    s.open.fetch_add(1, Ordering::SeqCst);
    let _guard = OpenGuard(s.clone(), id);

    let target = match s.target {
        Target::Fixed(t) => t,
        Target::Connect => match read_connect(&mut client).await {
            Some(t) => t,
            None => {
                let _ = client
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await;
                return;
            }
        },
    };
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        if matches!(s.target, Target::Connect) {
            let _ = client
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
        return;
    };
    if matches!(s.target, Target::Connect)
        && client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
    {
        return;
    }
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let both = async {
            tokio::try_join!(
                one_way(cr, uw, s.chaos, id * 2 + 1, &s.forwarded),
                one_way(ur, cw, s.chaos, id * 2 + 2, &s.forwarded)
            )
        };
        tokio::select! {
            _ = both => return,
            _ = hole.wait_for(|h| *h) => {}
        }
    }
    // Black-holed: hold both sockets open, forwarding nothing, until the relay dies.
    std::future::pending::<()>().await;
    drop((client, upstream));
}

/// Reads a CONNECT request head and returns its loopback target.
async fn read_connect(client: &mut TcpStream) -> Option<SocketAddr> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || client.read(&mut b).await.ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8(head).ok()?;
    let mut words = text.lines().next()?.split(' ');
    if words.next()? != "CONNECT" {
        return None;
    }
    let target: SocketAddr = words.next()?.parse().ok()?;
    target.ip().is_loopback().then_some(target)
}

async fn one_way(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    chaos: Chaos,
    seed: u64,
    forwarded: &AtomicU64,
) -> std::io::Result<()> {
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        let mut off = 0;
        while off < n {
            let piece = if chaos.max_chunk == usize::MAX {
                n - off
            } else {
                (1 + rng.below(chaos.max_chunk as u64) as usize).min(n - off)
            };
            to.write_all(&buf[off..off + piece]).await?;
            forwarded.fetch_add(piece as u64, Ordering::SeqCst);
            off += piece;
            if chaos.delay_one_in > 0 && rng.below(chaos.delay_one_in as u64) == 0 {
                let us = rng.below(chaos.max_delay.as_micros() as u64 + 1);
                tokio::time::sleep(Duration::from_micros(us)).await;
            }
        }
    }
}

pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform enough in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
