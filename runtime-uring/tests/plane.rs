//! The io_uring data plane on its own: byte-exact relays both ways with half-close, many at
//! once on few loops, live tallies, and no socket kept open after a relay ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[path = "../../runtime-tokio/tests/support/ping_pong.rs"]
mod ping_pong;

use dialback_tokio::relay::DataPlane;
use dialback_uring::UringDataPlane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

fn data(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_both_ways_with_half_close_and_live_tallies() {
    let plane = UringDataPlane::start(1).unwrap();
    let (mut client, a) = pair().await;
    let (b, mut server) = pair().await;
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let payload = data(8_000_000, 7);
    let expect = payload.clone();
    let writer = tokio::spawn(async move {
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        back
    });
    let tally_up = |n| {
        up.fetch_add(n, Ordering::Relaxed);
    };
    let tally_down = |n| {
        down.fetch_add(n, Ordering::Relaxed);
    };
    let relay = plane.relay(&a, &b, &tally_up, &tally_down);
    let server_side = async {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == expect, "forward direction corrupted");
        // The reverse direction still flows after the forward half-close.
        server.write_all(b"reply after EOF").await.unwrap();
        server.shutdown().await.unwrap();
    };
    let (r, ()) = tokio::join!(relay, server_side);
    assert_eq!(r.unwrap(), (8_000_000, 15));
    assert_eq!(writer.await.unwrap(), b"reply after EOF");
    assert_eq!(up.load(Ordering::Relaxed), 8_000_000);
    assert_eq!(down.load(Ordering::Relaxed), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_relays_at_once_keep_their_own_bytes() {
    let plane = std::sync::Arc::new(UringDataPlane::start(2).unwrap());
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let plane = plane.clone();
        tasks.push(tokio::spawn(async move {
            let (mut client, a) = pair().await;
            let (b, mut server) = pair().await;
            let msg = data(10_000 + i as usize * 997, i);
            let expect = msg.clone();
            let echo = tokio::spawn(async move {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                server.write_all(&got).await.unwrap();
                server.shutdown().await.unwrap();
            });
            let none = |_| {};
            let relay = plane.relay(&a, &b, &none, &none);
            let client_side = async {
                client.write_all(&msg).await.unwrap();
                client.shutdown().await.unwrap();
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.unwrap();
                back
            };
            let (r, back) = tokio::join!(relay, client_side);
            r.unwrap();
            echo.await.unwrap();
            assert!(back == expect, "relay {i} got someone else's bytes");
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("relay hung")
            .unwrap();
    }
}

/// Descriptors of this process that refer to the same socket as `fd`.
fn fds_of_socket(fd: i32) -> usize {
    let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else {
        return 0;
    };
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == target))
        .count()
}

#[tokio::test(flavor = "current_thread")]
async fn a_reset_ends_the_relay_and_its_duplicates_are_closed() {
    use std::os::fd::AsRawFd;
    let plane = UringDataPlane::start(1).unwrap();
    let (client, a) = pair().await;
    let (b, _server) = pair().await;
    // Abortive close on the client side: the relay must end (with or without an error)
    // instead of waiting on the other direction forever.
    let sock = socket2_linger_zero(client);
    drop(sock);
    let none = |_| {};
    let r = tokio::time::timeout(Duration::from_secs(10), plane.relay(&a, &b, &none, &none))
        .await
        .expect("relay did not end after a reset");
    let _ = r;
    // The loop closed its duplicates (and cancelled its waits): only our own descriptors
    // still refer to the two sockets.
    assert_eq!(
        fds_of_socket(a.as_raw_fd()),
        1,
        "the loop kept a duplicate of a"
    );
    assert_eq!(
        fds_of_socket(b.as_raw_fd()),
        1,
        "the loop kept a duplicate of b"
    );
}

/// Sets SO_LINGER to zero so that closing sends a reset.
fn socket2_linger_zero(s: TcpStream) -> std::net::TcpStream {
    use std::os::fd::AsRawFd;
    let s = s.into_std().unwrap();
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid linger struct on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    s
}

/// Socket inodes of this process's descriptors, each counted once per descriptor.
fn socket_fds() -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("socket:"))
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn an_owned_relay_holds_no_duplicate_and_a_broken_one_resets_the_other_end() {
    use std::os::fd::AsRawFd;
    let plane = UringDataPlane::start(1).unwrap();
    let none = |_| {};
    let (mut client, a) = pair().await;
    let (b, server) = pair().await;
    let a_sock = std::fs::read_link(format!("/proc/self/fd/{}", a.as_raw_fd())).unwrap();
    let b_sock = std::fs::read_link(format!("/proc/self/fd/{}", b.as_raw_fd())).unwrap();
    let fut = plane.relay_owned(a, b, &none, &none);
    let driver = async {
        client.write_all(b"ping").await.unwrap();
        let mut server = server;
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        // While the relay runs, each of its sockets is held by exactly one descriptor.
        let held = socket_fds();
        assert_eq!(
            held.iter().filter(|t| **t == a_sock).count(),
            1,
            "a is duplicated"
        );
        assert_eq!(
            held.iter().filter(|t| **t == b_sock).count(),
            1,
            "b is duplicated"
        );
        // The service side breaks (a reset): the client must see a reset too, not an EOF
        // that would pass a truncated stream off as complete.
        drop(socket2_linger_zero(server));
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
            .await
            .expect("the client was left waiting");
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "the client got an EOF after the service broke"
        );
    };
    let (r, ()) = tokio::join!(
        async { tokio::time::timeout(Duration::from_secs(10), fut).await },
        driver
    );
    assert!(r.expect("relay did not end").is_err());
    let held = socket_fds();
    assert!(
        !held.contains(&a_sock) && !held.contains(&b_sock),
        "the relay's sockets are still open"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_owned_relay_dropped_before_it_ran_closes_its_sockets() {
    let plane = UringDataPlane::start(1).unwrap();
    let none = |_| {};
    let (mut client, a) = pair().await;
    let (b, mut server) = pair().await;
    drop(plane.relay_owned(a, b, &none, &none));
    let mut buf = [0u8; 1];
    for s in [&mut client, &mut server] {
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    }
}

/// Short messages back and forth: each one drains its socket, so the loop waits right after
/// delivering it instead of splicing again; no message and no EOF may be left waiting. The
/// first bytes of each side are sent before the hand-over (the first pass moves them, and a
/// direction whose source was found empty starts by waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_back_and_forth_never_stall() {
    let plane = std::sync::Arc::new(UringDataPlane::start(1).unwrap());
    let wait = Duration::from_secs(10);
    for before in [&b""[..], b"hello", b"hello and more"] {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        client.write_all(before).await.unwrap();
        if before.len() > 5 {
            server.write_all(b"banner").await.unwrap();
        }
        // The bytes have reached the sockets the plane takes over.
        if !before.is_empty() {
            tokio::time::timeout(wait, a.readable())
                .await
                .unwrap()
                .unwrap();
        }
        if before.len() > 5 {
            tokio::time::timeout(wait, b.readable())
                .await
                .unwrap()
                .unwrap();
        }
        let p = plane.clone();
        let relay = tokio::spawn(async move { p.relay_owned(a, b, &|_| {}, &|_| {}).await });
        let mut got = vec![0u8; before.len()];
        tokio::time::timeout(wait, server.read_exact(&mut got))
            .await
            .expect("bytes sent before the hand-over stalled")
            .unwrap();
        assert_eq!(got, before);
        let mut banner = 0;
        if before.len() > 5 {
            let mut got = [0u8; 6];
            tokio::time::timeout(wait, client.read_exact(&mut got))
                .await
                .expect("server's first bytes stalled")
                .unwrap();
            assert_eq!(&got, b"banner");
            banner = 6;
        }
        let (up, down) = ping_pong::ping_pong(&mut client, &mut server, 200).await;
        let moved = tokio::time::timeout(wait, relay)
            .await
            .expect("relay did not end")
            .unwrap()
            .unwrap();
        assert_eq!(moved, (before.len() as u64 + up, banner + down));
    }
    assert_eq!(
        plane.handed_over(),
        3,
        "each conversation moved to the loop"
    );
}

/// Receive buffers are shared by a loop's relays and lent only between a receive and its
/// send. With far fewer buffers than relays exchanging messages at once (and with none), every
/// relay must still deliver exactly its own bytes, in order: a relay that finds them all lent
/// splices instead, and a buffer is never handed out while a send still reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_keep_their_own_bytes_when_receive_buffers_run_out() {
    let wait = Duration::from_secs(20);
    for buffers in [2u16, 0] {
        let plane = std::sync::Arc::new(UringDataPlane::start_with_buffers(1, buffers).unwrap());
        let mut tasks = Vec::new();
        for i in 0..48u32 {
            let plane = plane.clone();
            tasks.push(tokio::spawn(async move {
                let (mut client, a) = pair().await;
                let (b, mut server) = pair().await;
                for s in [&client, &server] {
                    s.set_nodelay(true).unwrap();
                }
                let relay =
                    tokio::spawn(async move { plane.relay_owned(a, b, &|_| {}, &|_| {}).await });
                let (mut up, mut down) = (0u64, 0u64);
                for round in 0..20u32 {
                    let size = 100 + ((i * 997 + round * 131) % 20_000) as usize;
                    let msg = data(size, i << 8 | round);
                    client.write_all(&msg).await.unwrap();
                    let mut got = vec![0u8; size];
                    server.read_exact(&mut got).await.unwrap();
                    assert!(got == msg, "relay {i} round {round}: forward bytes mixed");
                    let reply = data(size / 2 + 1, !(i << 8 | round));
                    server.write_all(&reply).await.unwrap();
                    let mut got = vec![0u8; reply.len()];
                    client.read_exact(&mut got).await.unwrap();
                    assert!(
                        got == reply,
                        "relay {i} round {round}: backward bytes mixed"
                    );
                    up += size as u64;
                    down += reply.len() as u64;
                }
                client.shutdown().await.unwrap();
                let mut rest = Vec::new();
                server.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
                server.shutdown().await.unwrap();
                client.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
                let moved = relay.await.unwrap().unwrap();
                assert_eq!(moved, (up, down), "relay {i}: byte counts");
            }));
        }
        for t in tasks {
            tokio::time::timeout(wait, t)
                .await
                .unwrap_or_else(|_| panic!("a relay stalled with {buffers} buffers"))
                .unwrap();
        }
        assert_eq!(
            plane.handed_over(),
            48,
            "every conversation moved to the loop"
        );
    }
}

/// A relay taken with `relay_owned` starts on tokio and moves to a loop only once its
/// conversation has gone on for a while, at a moment both directions are idle: a one-request
/// connection never pays for the hand-over, a long one keeps every byte, in order, and the
/// counts and live tallies of both phases add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_conversation_moves_to_a_loop_and_a_short_one_stays() {
    let plane = std::sync::Arc::new(UringDataPlane::start(1).unwrap());
    let wait = Duration::from_secs(10);
    for (rounds, handed) in [(1u32, 0u64), (200, 1)] {
        let before = plane.handed_over();
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let p = plane.clone();
        let tallied = std::sync::Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let t = tallied.clone();
        let relay = tokio::spawn(async move {
            let up = |n| {
                t.0.fetch_add(n, Ordering::Relaxed);
            };
            let down = |n| {
                t.1.fetch_add(n, Ordering::Relaxed);
            };
            p.relay_owned(a, b, &up, &down).await
        });
        let (up, down) = ping_pong::ping_pong(&mut client, &mut server, rounds).await;
        let moved = tokio::time::timeout(wait, relay)
            .await
            .expect("relay did not end")
            .unwrap()
            .unwrap();
        assert_eq!(moved, (up, down), "{rounds} rounds: byte counts");
        assert_eq!(
            (
                tallied.0.load(Ordering::Relaxed),
                tallied.1.load(Ordering::Relaxed)
            ),
            (up, down),
            "{rounds} rounds: live tallies"
        );
        assert_eq!(
            plane.handed_over() - before,
            handed,
            "{rounds} rounds: hand-overs"
        );
    }
}
