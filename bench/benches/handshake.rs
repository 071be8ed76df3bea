//! `handshake`: the control-connection handshake on both ends, and the one-time PBKDF2 cost.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dialback_bench::{
    agent_peer, drain_gateway, gateway_config, hello_frame, new_agent, password_key, t0,
    welcome_frame, AGENT_CONN, AGENT_NONCE, EXPORTER, GATEWAY_SEED, PASSWORD, SERVICE,
};
use dialback_core::agent::AgentEvent;
use dialback_core::crypto::{PasswordKey, SessionKeys};
use dialback_core::gateway::Gateway;

fn handshake(c: &mut Criterion) {
    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    let key = password_key();

    // Per control connection, on both ends: HKDF of the session keys, then the agent's proof.
    group.bench_function("session_keys_derive+agent_proof", |b| {
        b.iter(|| {
            let keys = SessionKeys::derive(black_box(&key), black_box(&EXPORTER));
            keys.agent_proof(black_box(SERVICE), black_box(&AGENT_NONCE))
        })
    });

    // The gateway verifies a valid HELLO and answers WELCOME (fresh gateway per iteration,
    // built outside the measurement, with the PasswordKey derived at start-up).
    let hello = hello_frame();
    let config = gateway_config(1024);
    group.bench_function("gateway_hello_to_welcome", |b| {
        b.iter_batched(
            || Gateway::new(config.clone(), GATEWAY_SEED),
            |mut g| {
                g.handle_control_open(t0(), AGENT_CONN, agent_peer(), EXPORTER);
                g.handle_control_input(t0(), AGENT_CONN, black_box(&hello));
                black_box(drain_gateway(&mut g));
                g
            },
            BatchSize::SmallInput,
        )
    });

    // The agent checks the gateway's proof in WELCOME and registers (agent built outside the
    // measurement: its session keys and HELLO are the previous benchmark's work).
    let welcome = welcome_frame();
    group.bench_function("agent_welcome", |b| {
        b.iter_batched(
            || {
                let mut agent = new_agent(t0());
                let _ = agent.poll_transmit();
                agent
            },
            |mut agent| {
                agent.handle_input(t0(), black_box(&welcome));
                let registered = matches!(agent.poll_event(), Some(AgentEvent::Registered { .. }));
                assert!(registered);
                agent
            },
            BatchSize::SmallInput,
        )
    });

    // One-time start-up cost per service (PBKDF2-HMAC-SHA256, 100 000 rounds), not paid per
    // connection. Slow, so few samples.
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("password_key_derive_startup_once", |b| {
        b.iter(|| PasswordKey::derive(black_box(SERVICE), black_box(PASSWORD)))
    });
    group.finish();
}

criterion_group!(benches, handshake);
criterion_main!(benches);
