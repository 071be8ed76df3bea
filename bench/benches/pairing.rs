//! `pairing`: classifying a new data connection from its first bytes (`data::Intake`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dialback_core::data::{encode_data_hello, Classified, Intake};
use dialback_core::wire::DataHello;

fn pairing(c: &mut Criterion) {
    let mut group = c.benchmark_group("pairing");
    let hello = DataHello {
        service: dialback_bench::SERVICE.to_string(),
        session_id: 0x3a5f_0c21_9b7e_4d10,
        request_id: 0x1f2e_3d4c_5b6a_7988,
        token: [0xc3; 32],
    };
    // Preamble and DATA_HELLO, followed by the first bytes of the agent's payload.
    let mut bytes = encode_data_hello(&hello);
    let hello_len = bytes.len();
    bytes.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    group.throughput(Throughput::Bytes(hello_len as u64));
    group.bench_function("intake_data_hello", |b| {
        b.iter(|| {
            let mut input: &[u8] = black_box(&bytes);
            let got = Intake::new(false).handle_input(&mut input);
            assert!(matches!(got, Ok(Some(Classified::Data(_)))));
            (got, input.len())
        })
    });
    group.bench_function("intake_data_hello_byte_by_byte", |b| {
        b.iter(|| {
            let mut intake = Intake::new(false);
            for byte in black_box(&bytes[..hello_len]) {
                let mut input = std::slice::from_ref(byte);
                if let Ok(Some(c)) = intake.handle_input(&mut input) {
                    return Some(c);
                }
            }
            None
        })
    });
    group.finish();
}

criterion_group!(benches, pairing);
criterion_main!(benches);
