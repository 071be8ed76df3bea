//! `ntlm`: the NTLM client messages (`dialback_core::ntlm`) on the vectors of
//! `spec/vectors/ntlm.json`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dialback_bench::ntlm_cases;
use dialback_core::ntlm::{authenticate_message, negotiate_message, parse_challenge};

fn ntlm(c: &mut Criterion) {
    let mut group = c.benchmark_group("ntlm");
    group.throughput(Throughput::Elements(1));
    group.bench_function("negotiate_message", |b| b.iter(negotiate_message));

    let negotiate = negotiate_message();
    for (i, case) in ntlm_cases().iter().enumerate() {
        let id = format!("case{}", i + 1);
        let challenge =
            parse_challenge(&case.challenge).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        group.throughput(Throughput::Bytes(case.challenge.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("parse_challenge", &id),
            &case.challenge,
            |b, raw| b.iter(|| parse_challenge(black_box(raw))),
        );
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::new("authenticate_message", &id),
            &challenge,
            |b, challenge| {
                b.iter(|| {
                    authenticate_message(
                        black_box(&case.creds),
                        black_box(challenge),
                        &case.challenge,
                        &negotiate,
                        black_box(case.client_challenge),
                        case.now_filetime,
                    )
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, ntlm);
criterion_main!(benches);
