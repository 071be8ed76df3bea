//! No allocation per relayed chunk on the io_uring data plane: a counting global allocator
//! (every thread, the loop's included) watches a relay in steady state. Whatever the relay
//! allocates is per connection (job, task, pipes), never per chunk moved.

#[path = "../../runtime-tokio/tests/support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::{allocations, pair};
use dialback_tokio::relay::DataPlane;
use dialback_uring::UringDataPlane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Relays `chunks` chunks of 16 KiB in lockstep (each one is read by the consumer before the
/// next is written, so the loop waits on its ring and splices once per chunk); returns the
/// allocations made meanwhile, on every thread.
async fn relay_lockstep(chunks: usize) -> u64 {
    let plane = Box::leak(Box::new(UringDataPlane::start(1).unwrap()));
    let (mut producer, a) = pair().await;
    let (b, mut consumer) = pair().await;
    let chunk = vec![0x42u8; 16 * 1024];
    let mut sink = vec![0u8; 16 * 1024];
    let relay_task =
        tokio::spawn(async move { plane.relay(&a, &b, &|_| {}, &|_| {}).await.unwrap() });
    // Warm up: the job, the loop's task, the pipes and first waits are allocated here.
    for _ in 0..4 {
        producer.write_all(&chunk).await.unwrap();
        consumer.read_exact(&mut sink).await.unwrap();
    }
    let before = allocations();
    for _ in 0..chunks {
        producer.write_all(&chunk).await.unwrap();
        consumer.read_exact(&mut sink).await.unwrap();
    }
    let during = allocations() - before;
    drop(producer);
    drop(consumer);
    let (ab, _) = relay_task.await.unwrap();
    assert_eq!(ab as usize, (chunks + 4) * chunk.len());
    during
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn uring_relay_does_not_allocate_per_chunk() {
    let allocs = relay_lockstep(2000).await;
    // A few stray allocations of the runtime are tolerated, never one per chunk (a single
    // allocation per splice makes this 2000).
    assert!(
        allocs <= 16,
        "{allocs} allocations while relaying 2000 chunks in steady state"
    );
}
