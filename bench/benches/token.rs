//! `token`: the gateway's one-time data tokens in steady state: a full client cycle
//! (client arrives → token minted, CONNECT sent → agent turns it into a DATA_HELLO →
//! gateway verifies the token and pairs).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dialback_bench::{client_cycle, gateway_with_pending, pooled_cycle, registered_pooled_pair};
use dialback_core::gateway::ClientId;

fn token(c: &mut Criterion) {
    let mut group = c.benchmark_group("token");
    group.throughput(Throughput::Elements(1));
    // `pending`: tokens in the map while this client's is redeemed (its own included).
    for pending in [1usize, 1000] {
        let (mut g, mut agent) = gateway_with_pending(pending - 1);
        let mut next = 0u64;
        group.bench_function(BenchmarkId::new("client_cycle", pending), |b| {
            b.iter(|| {
                next += 1;
                let paired = client_cycle(&mut g, &mut agent, black_box(ClientId(next)));
                assert!(paired);
            })
        });
        assert_eq!(g.pending_clients(), pending - 1, "steady state");
    }
    // The same client served from a pool of 4: bind; every second client, two refill
    // PREPAREs and two new connections parked.
    let (mut g, mut agent) = registered_pooled_pair(4);
    let mut next = 0u64;
    let mut parked = 0usize;
    group.bench_function("pooled_cycle", |b| {
        b.iter(|| {
            next += 1;
            parked += pooled_cycle(&mut g, &mut agent, black_box(ClientId(next)))
                .expect("served from the pool");
        })
    });
    assert_eq!(parked as u64, next - next % 2, "two parked per two clients");
    assert!(
        (3..=4).contains(&g.pooled(dialback_bench::SERVICE)),
        "steady state"
    );
    group.finish();
}

criterion_group!(benches, token);
criterion_main!(benches);
