//! Connection-rate load against any TCP echo service, as the end-to-end harness measures it:
//! each connection connects, sends 16 bytes, reads them back and closes.
//!
//! `connload TARGET [CONCURRENCY] [SECONDS]` prints connections/s and latency p50/p99.
//! `connload --open TARGET [SECONDS]` makes 16-byte round trips on one open connection instead.
//! `connload --echo ADDR` serves as the echo service instead (for a tunnel's private side).

use std::net::SocketAddr;
use std::time::Duration;

use dialback_bench::load::{conn_load, echo_server, open_round_trips};

fn usage() -> ! {
    eprintln!(
        "usage: connload TARGET [CONCURRENCY] [SECONDS] | connload --open TARGET [SECONDS] | connload --echo ADDR"
    );
    std::process::exit(2)
}

/// Argument `i` parsed, `default` when absent; usage and exit when it does not parse.
fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: Option<T>) -> T {
    match args.get(i) {
        Some(a) => a.parse().ok(),
        None => default,
    }
    .unwrap_or_else(|| usage())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--echo") => {
            let addr: SocketAddr = arg(&args, 1, None);
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| {
                    eprintln!("cannot listen on {addr}: {e}");
                    std::process::exit(1)
                });
            // On a worker thread: accepting in `block_on` (the main thread) would wake a
            // second thread for every connection.
            let _ = tokio::spawn(echo_server(l)).await;
        }
        Some("--open") => {
            let target: SocketAddr = arg(&args, 1, None);
            let secs = arg(&args, 2, Some(3));
            let s = open_round_trips(target, Duration::from_secs(secs), u64::MAX).await;
            println!(
                "{} round trips on one connection, {} errors, p50 {:.0} µs, p99 {:.0} µs",
                s.ok, s.errors, s.p50_us, s.p99_us
            );
        }
        _ => {
            let target: SocketAddr = arg(&args, 0, None);
            let conc = arg(&args, 1, Some(1));
            let secs = arg(&args, 2, Some(3));
            let s = conn_load(target, conc, Duration::from_secs(secs), u64::MAX).await;
            println!(
                "{} ok, {} errors, {:.0}/s, p50 {:.0} µs, p99 {:.0} µs",
                s.ok, s.errors, s.per_sec, s.p50_us, s.p99_us
            );
        }
    }
}
