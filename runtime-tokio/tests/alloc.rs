//! No allocation per relayed chunk: a counting global allocator watches the relay of a plain
//! connection pair in steady state. Relaying 8x more bytes must not allocate more: whatever the
//! relay allocates is per connection (task, pipes), never per chunk moved.

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{allocations, pair};
use dialback_tokio::relay::relay;
use dialback_tokio::stream::MaybeTls;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Relays `chunks` chunks of 16 KiB in lockstep (each one is read by the consumer before the
/// next is written, so every chunk is a separate splice through the relay); returns the
/// allocations made meanwhile and how many chunks the relay reported delivering.
async fn relay_lockstep(chunks: usize) -> (u64, u64) {
    let (mut producer, a) = pair().await;
    let (b, mut consumer) = pair().await;
    let chunk = vec![0x42u8; 16 * 1024];
    let mut sink = vec![0u8; 16 * 1024];
    let delivered = std::sync::Arc::new(AtomicU64::new(0));
    let d = delivered.clone();
    let relay_task = tokio::spawn(async move {
        let tally = move |_n: u64| {
            d.fetch_add(1, Ordering::Relaxed);
        };
        relay(a, MaybeTls::Plain(b), &[], &tally, &|_| {})
            .await
            .unwrap()
    });
    // Warm up: the relay's task, pipes and first wake-ups are allocated here.
    for _ in 0..4 {
        producer.write_all(&chunk).await.unwrap();
        consumer.read_exact(&mut sink).await.unwrap();
    }
    let before = allocations();
    let delivered_before = delivered.load(Ordering::Relaxed);
    for _ in 0..chunks {
        producer.write_all(&chunk).await.unwrap();
        consumer.read_exact(&mut sink).await.unwrap();
    }
    let during = allocations() - before;
    let moved = delivered.load(Ordering::Relaxed) - delivered_before;
    drop(producer);
    drop(consumer);
    let (ab, _) = relay_task.await.unwrap();
    assert_eq!(ab as usize, (chunks + 4) * chunk.len());
    (during, moved)
}

#[tokio::test(flavor = "current_thread")]
async fn splice_relay_does_not_allocate_per_chunk() {
    let (allocs, chunks) = relay_lockstep(2000).await;
    assert!(
        chunks >= 2000,
        "only {chunks} deliveries: the chunks were not separate"
    );
    // A few stray allocations of the runtime are tolerated, never one per chunk.
    assert!(
        allocs <= 16,
        "{allocs} allocations while relaying {chunks} chunks in steady state"
    );
}
