//! The load generator of the end-to-end harness, shared with `connload`: an echo server, and
//! connection-rate load (connect, 16 bytes each way, close) with latency percentiles.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const PAYLOAD: [u8; 16] = *b"dialback-bench16";

/// Echoes every connection's bytes back until it closes.
pub async fn echo_server(listener: TcpListener) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(echo(s));
    }
}

/// Echoes one connection's bytes back until it closes.
pub async fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One round trip: connect, send 16 bytes, read 16 bytes back. Returns the open stream.
pub async fn round_trip(target: SocketAddr) -> Result<TcpStream, String> {
    let op = async {
        let mut s = TcpStream::connect(target)
            .await
            .map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.write_all(&PAYLOAD).await.map_err(|e| e.to_string())?;
        let mut back = [0u8; 16];
        s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        if back != PAYLOAD {
            return Err("echo mismatch".to_string());
        }
        Ok(s)
    };
    tokio::time::timeout(Duration::from_secs(3), op)
        .await
        .map_err(|_| "round trip timed out".to_string())?
}

#[derive(Clone, Default)]
pub struct ConnStats {
    pub ok: u64,
    pub errors: u64,
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Round trips on one open connection: 16 bytes out, the same 16 back, again and again until
/// `dur` passes or `max` were made. Measures what every relay on the path adds to each
/// exchange once the connection stands (no connection set-up in the figure).
pub async fn open_round_trips(target: SocketAddr, dur: Duration, max: u64) -> ConnStats {
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut errors = 0u64;
    match round_trip(target).await {
        Err(_) => errors += 1,
        Ok(mut s) => {
            let deadline = start + dur;
            let mut back = [0u8; 16];
            while Instant::now() < deadline && (lat.len() as u64) < max {
                let t0 = Instant::now();
                let exchange = async {
                    s.write_all(&PAYLOAD).await?;
                    s.read_exact(&mut back).await?;
                    Ok::<_, std::io::Error>(())
                };
                match tokio::time::timeout(Duration::from_secs(3), exchange).await {
                    Ok(Ok(())) if back == PAYLOAD => lat.push(t0.elapsed()),
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
        }
    }
    stats(lat, errors, start.elapsed())
}

/// `concurrency` workers make round trips until `dur` passes or `max` were started.
pub async fn conn_load(
    target: SocketAddr,
    concurrency: usize,
    dur: Duration,
    max: u64,
) -> ConnStats {
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let issued = issued.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < max {
                let t0 = Instant::now();
                match round_trip(target).await {
                    Ok(s) => {
                        lat.push(t0.elapsed());
                        drop(s);
                    }
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            lat.extend(l);
            errors += e;
        }
    }
    stats(lat, errors, start.elapsed())
}

fn stats(mut lat: Vec<Duration>, errors: u64, elapsed: Duration) -> ConnStats {
    let elapsed = elapsed.as_secs_f64();
    lat.sort();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1e6
    };
    ConnStats {
        ok: lat.len() as u64,
        errors,
        per_sec: lat.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_at() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        tokio::spawn(echo_server(l));
        at
    }

    #[tokio::test]
    async fn open_round_trips_stay_on_one_connection_and_stop_at_max() {
        // Serves exactly one connection and then stops listening: a second connection would
        // be refused and show as an error.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            drop(l);
            echo(s).await;
        });
        let s = open_round_trips(at, Duration::from_secs(5), 200).await;
        assert_eq!((s.ok, s.errors), (200, 0));
        assert!(
            s.p50_us > 0.0 && s.p50_us <= s.p99_us,
            "p50 {} p99 {}",
            s.p50_us,
            s.p99_us
        );
    }

    #[tokio::test]
    async fn a_server_that_hangs_up_is_counted_as_an_error_not_waited_for() {
        // Accepts, reads the first round trip's bytes, answers them once, then closes: the
        // second exchange must fail at once.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 16];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
        });
        let t0 = Instant::now();
        let s = open_round_trips(at, Duration::from_secs(5), 100).await;
        assert_eq!((s.ok, s.errors), (0, 1));
        // A hang would last the 3 s timeout of an exchange.
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t0.elapsed()
        );
    }

    #[tokio::test]
    async fn conn_load_counts_every_connection_up_to_max() {
        let at = echo_at().await;
        let s = conn_load(at, 4, Duration::from_secs(5), 100).await;
        assert_eq!(s.ok + s.errors, 100);
        assert_eq!(s.errors, 0);
        assert!(s.per_sec > 0.0);
    }
}
