//! No allocation per relayed chunk: a counting global allocator watches the relay of a plain
//! connection pair in steady state. Relaying 8x more bytes must not allocate more: whatever the
//! relay allocates is per connection (task, pipes), never per chunk moved.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use dialback_tokio::relay::relay;
use dialback_tokio::stream::MaybeTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

/// Relays `chunks` chunks of 16 KiB in lockstep (each one is read by the consumer before the
/// next is written, so every chunk is a separate splice through the relay); returns the
/// allocations made meanwhile and how many chunks the relay reported delivering.
async fn relay_lockstep(chunks: usize) -> (u64, u64) {
    let (mut producer, mut a) = pair().await;
    let (b, mut consumer) = pair().await;
    let chunk = vec![0x42u8; 16 * 1024];
    let mut sink = vec![0u8; 16 * 1024];
    let delivered = std::sync::Arc::new(AtomicU64::new(0));
    let d = delivered.clone();
    let relay_task = tokio::spawn(async move {
        let tally = move |_n: u64| {
            d.fetch_add(1, Ordering::Relaxed);
        };
        relay(&mut a, MaybeTls::Plain(b), &[], &tally, &|_| {})
            .await
            .unwrap()
    });
    // Warm up: the relay's task, pipes and first wake-ups are allocated here.
    for _ in 0..4 {
        producer.write_all(&chunk).await.unwrap();
        consumer.read_exact(&mut sink).await.unwrap();
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    let delivered_before = delivered.load(Ordering::Relaxed);
    for _ in 0..chunks {
        producer.write_all(&chunk).await.unwrap();
        consumer.read_exact(&mut sink).await.unwrap();
    }
    let during = ALLOCS.load(Ordering::Relaxed) - before;
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
