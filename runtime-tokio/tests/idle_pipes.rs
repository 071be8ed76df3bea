//! An idle relay holds no pipe: 100 connections that exchanged a message and went quiet keep
//! at most the bounded stock of empty pipes open, not four pipe descriptors each.

use std::time::Duration;

use dialback_tokio::relay::relay;
use dialback_tokio::stream::MaybeTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

fn pipe_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_relays_hold_no_pipes() {
    let before = pipe_fds();
    let mut ends = Vec::new();
    for i in 0..100u32 {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        tokio::spawn(async move {
            let _ = relay(a, MaybeTls::Plain(b), &[], &|_| {}, &|_| {}).await;
        });
        let msg = format!("hello {i}");
        client.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg.as_bytes());
        server.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.unwrap();
        ends.push((client, server));
    }
    // All 100 relays are now waiting for their sources with empty pipes. Holding two pipes
    // each would be 400 descriptors; the stock keeps at most 64 pipes (128 descriptors).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let held = pipe_fds().saturating_sub(before);
        if held <= 128 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{held} pipe descriptors held by 100 idle relays"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And they still work after being idle.
    for (i, (client, server)) in ends.iter_mut().enumerate() {
        let msg = format!("again {i}");
        client.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg.as_bytes());
    }
}
