//! `frame`: encoding and decoding of control-connection frames (`dialback_core::wire`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dialback_bench::{frame_stream, sample_connect_v6, sample_hello};
use dialback_core::wire::{FrameDecoder, Message};

const STREAM_FRAMES: usize = 1000;

fn frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    let samples = [
        ("hello", sample_hello()),
        ("connect_v6", sample_connect_v6()),
        ("heartbeat", Message::Heartbeat),
    ];
    for (name, msg) in &samples {
        let bytes = msg.to_frame();
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        let mut out = Vec::with_capacity(128);
        group.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                out.clear();
                black_box(msg).encode(&mut out);
                black_box(out.len())
            })
        });
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| {
                let mut input: &[u8] = black_box(&bytes);
                FrameDecoder::new().decode(&mut input)
            })
        });
    }

    let stream = frame_stream(STREAM_FRAMES);
    let count = |stream: &[u8], chunk: usize| {
        let mut decoder = FrameDecoder::new();
        let mut frames = 0;
        for piece in stream.chunks(chunk) {
            let mut input = piece;
            while let Ok(Some(m)) = decoder.decode(&mut input) {
                black_box(m);
                frames += 1;
            }
        }
        frames
    };
    assert_eq!(count(&stream, stream.len()), STREAM_FRAMES);
    assert_eq!(count(&stream, 1), STREAM_FRAMES);
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("decode_stream/1000_frames", |b| {
        b.iter(|| count(black_box(&stream), stream.len()))
    });
    group.bench_function("decode_stream/1000_frames_byte_by_byte", |b| {
        b.iter(|| count(black_box(&stream), 1))
    });
    // One HELLO arriving one byte per read, from a fresh decoder each time.
    let hello = sample_hello().to_frame();
    group.throughput(Throughput::Bytes(hello.len() as u64));
    group.bench_function("decode_byte_by_byte/hello", |b| {
        b.iter_batched_ref(
            FrameDecoder::new,
            |decoder| {
                let mut got = None;
                for byte in black_box(&hello) {
                    let mut input = std::slice::from_ref(byte);
                    if let Ok(Some(m)) = decoder.decode(&mut input) {
                        got = Some(m);
                    }
                }
                got
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, frame);
criterion_main!(benches);
