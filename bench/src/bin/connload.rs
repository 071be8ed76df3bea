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

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--echo") {
        let addr: SocketAddr = args
            .get(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage());
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| {
                eprintln!("cannot listen on {addr}: {e}");
                std::process::exit(1)
            });
        // On a worker thread: accepting in `block_on` (the main thread) would wake a
        // second thread for every connection.
        let _ = tokio::spawn(echo_server(l)).await;
        return;
    }
    if args.first().map(String::as_str) == Some("--open") {
        let target: SocketAddr = args
            .get(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| usage());
        let secs = args
            .get(2)
            .map_or(Some(3), |c| c.parse().ok())
            .unwrap_or_else(|| usage());
        let s = open_round_trips(target, Duration::from_secs(secs), u64::MAX).await;
        println!(
            "{} round trips on one connection, {} errors, p50 {:.0} µs, p99 {:.0} µs",
            s.ok, s.errors, s.p50_us, s.p99_us
        );
        return;
    }
    let target: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage());
    let conc = args
        .get(1)
        .map_or(Some(1), |c| c.parse().ok())
        .unwrap_or_else(|| usage());
    let secs = args
        .get(2)
        .map_or(Some(3), |c| c.parse().ok())
        .unwrap_or_else(|| usage());
    let s = conn_load(target, conc, Duration::from_secs(secs), u64::MAX).await;
    println!(
        "{} ok, {} errors, {:.0}/s, p50 {:.0} µs, p99 {:.0} µs",
        s.ok, s.errors, s.per_sec, s.p50_us, s.p99_us
    );
}
