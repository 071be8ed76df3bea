//! `connect_chain`: the HTTP CONNECT cascade state machine against canned proxy answers.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dialback_bench::{basic_hops, chain, ntlm_407, ntlm_hops, run_chain, PROXY_200};

fn connect_chain(c: &mut Criterion) {
    let mut group = c.benchmark_group("connect_chain");
    group.throughput(Throughput::Elements(1));

    // Two proxies with Basic logins: CONNECT with credentials, 200, CONNECT through the
    // tunnel, 200, Established.
    let basic = basic_hops();
    assert!(run_chain(chain(basic.clone()), &[PROXY_200, PROXY_200]).1);
    group.bench_function("basic_2hop_to_established", |b| {
        b.iter(|| {
            let (sent, ok) = run_chain(
                chain(black_box(&basic).clone()),
                black_box(&[PROXY_200, PROXY_200]),
            );
            assert!(ok);
            sent
        })
    });

    // One NTLM hop: NEGOTIATE, 407 with the challenge of spec/vectors/ntlm.json (base64 in
    // Proxy-Authenticate), AUTHENTICATE on the same connection, 200, Established.
    let challenge = ntlm_407();
    let responses: [&[u8]; 2] = [&challenge, PROXY_200];
    let ntlm = ntlm_hops();
    assert!(run_chain(chain(ntlm.clone()), &responses).1);
    group.bench_function("ntlm_hop_round", |b| {
        b.iter(|| {
            let (sent, ok) = run_chain(chain(black_box(&ntlm).clone()), black_box(&responses));
            assert!(ok);
            sent
        })
    });
    group.finish();
}

criterion_group!(benches, connect_chain);
criterion_main!(benches);
