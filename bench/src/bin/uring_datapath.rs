//! Which data path should the io_uring runtime use? Relays one direction of a loopback TCP
//! stream (a producer writes `SIZE` bytes, a consumer reads and discards them) through each
//! mechanism in turn, on one relay thread, and prints GiB/s.
//!
//! `cargo run --release -p dialback-bench --bin uring_datapath [-- GIB]`
//!
//! Mechanisms: `splice(2)` socket→pipe→socket (blocking), `read/write` through a 256 KiB
//! buffer (blocking), and on io_uring: IORING_OP_SPLICE pairs, RECV + SEND with two 256 KiB
//! buffers in flight, POLL_ADD + splice(2), and RECV + SEND_ZC. Results and the choice are in
//! bench/URING.md.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use io_uring::{opcode, types, IoUring};

const BUF: usize = 256 * 1024;

fn pair() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    // producer -> relay_in | relay_out -> consumer
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    let producer = TcpStream::connect(a.local_addr().unwrap()).unwrap();
    let (relay_in, _) = a.accept().unwrap();
    let relay_out = TcpStream::connect(b.local_addr().unwrap()).unwrap();
    let (consumer, _) = b.accept().unwrap();
    (producer, relay_in, relay_out, consumer)
}

fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid out-array for pipe2.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fcntl on the pipe we just made.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 1 << 20) };
    (fds[0], fds[1])
}

/// Relays `size` bytes through `relay`; returns GiB/s.
fn run(size: u64, relay: impl FnOnce(TcpStream, TcpStream, u64) + Send + 'static) -> f64 {
    let (mut producer, relay_in, relay_out, mut consumer) = pair();
    let p = std::thread::spawn(move || {
        let buf = vec![0x5au8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            producer.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
    });
    let c = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < size {
            let n = consumer.read(&mut buf).unwrap();
            assert!(n > 0, "consumer saw EOF early");
            got += n as u64;
        }
    });
    let t = Instant::now();
    relay(relay_in, relay_out, size);
    c.join().unwrap();
    let secs = t.elapsed().as_secs_f64();
    p.join().unwrap();
    size as f64 / secs / (1u64 << 30) as f64
}

fn blocking_splice(i: TcpStream, o: TcpStream, size: u64) {
    let (r, w) = pipe();
    let mut moved = 0u64;
    while moved < size {
        // SAFETY: valid fds, null offsets for sockets and pipes.
        let n = unsafe {
            libc::splice(
                i.as_raw_fd(),
                std::ptr::null_mut(),
                w,
                std::ptr::null_mut(),
                1 << 20,
                libc::SPLICE_F_MOVE,
            )
        };
        assert!(n > 0);
        let mut left = n as usize;
        while left > 0 {
            // SAFETY: as above.
            let m = unsafe {
                libc::splice(
                    r,
                    std::ptr::null_mut(),
                    o.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_MOVE,
                )
            };
            assert!(m > 0);
            left -= m as usize;
        }
        moved += n as u64;
    }
}

fn blocking_copy(mut i: TcpStream, mut o: TcpStream, size: u64) {
    let mut buf = vec![0u8; BUF];
    let mut moved = 0u64;
    while moved < size {
        let n = i.read(&mut buf).unwrap();
        assert!(n > 0);
        o.write_all(&buf[..n]).unwrap();
        moved += n as u64;
    }
}

fn submit_one(ring: &mut IoUring, e: io_uring::squeue::Entry) -> i32 {
    // SAFETY: every buffer and fd referenced by `e` outlives the wait below.
    unsafe { ring.submission().push(&e).unwrap() };
    ring.submit_and_wait(1).unwrap();
    ring.completion().next().unwrap().result()
}

fn uring_splice(i: TcpStream, o: TcpStream, size: u64) {
    let mut ring = IoUring::new(64).unwrap();
    let (r, w) = pipe();
    let mut moved = 0u64;
    while moved < size {
        let n = submit_one(
            &mut ring,
            opcode::Splice::new(types::Fd(i.as_raw_fd()), -1, types::Fd(w), -1, 1 << 20).build(),
        );
        assert!(n > 0, "splice in: {n}");
        let mut left = n as u32;
        while left > 0 {
            let m = submit_one(
                &mut ring,
                opcode::Splice::new(types::Fd(r), -1, types::Fd(o.as_raw_fd()), -1, left).build(),
            );
            assert!(m > 0, "splice out: {m}");
            left -= m as u32;
        }
        moved += n as u64;
    }
}

fn uring_poll_splice(i: TcpStream, o: TcpStream, size: u64) {
    i.set_nonblocking(true).unwrap();
    let mut ring = IoUring::new(64).unwrap();
    let (r, w) = pipe();
    let mut moved = 0u64;
    while moved < size {
        // SAFETY: valid fds, null offsets.
        let n = unsafe {
            libc::splice(
                i.as_raw_fd(),
                std::ptr::null_mut(),
                w,
                std::ptr::null_mut(),
                1 << 20,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
            let res = submit_one(
                &mut ring,
                opcode::PollAdd::new(types::Fd(i.as_raw_fd()), libc::POLLIN as u32).build(),
            );
            assert!(res >= 0);
            continue;
        }
        let mut left = n as usize;
        while left > 0 {
            // SAFETY: as above; the output socket is blocking.
            let m = unsafe {
                libc::splice(
                    r,
                    std::ptr::null_mut(),
                    o.as_raw_fd(),
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_MOVE,
                )
            };
            assert!(m > 0);
            left -= m as usize;
        }
        moved += n as u64;
    }
}

/// RECV into one buffer while the other is being sent.
fn uring_recv_send(i: TcpStream, o: TcpStream, size: u64, zc: bool) {
    let mut ring = IoUring::new(64).unwrap();
    let mut bufs = [vec![0u8; BUF], vec![0u8; BUF]];
    let (ifd, ofd) = (types::Fd(i.as_raw_fd()), types::Fd(o.as_raw_fd()));
    let mut moved = 0u64;
    let mut cur = 0usize;
    let mut sending: Option<(usize, usize, usize)> = None; // (buf, offset, len)
    let mut inflight_send = false;
    let mut recv_posted = false;
    let mut recv_done: Option<usize> = None;
    let mut zc_notifs = 0u32;
    let mut received = 0u64;
    while moved < size || inflight_send || zc_notifs > 0 {
        if !recv_posted && recv_done.is_none() && received < size {
            let e = opcode::Recv::new(ifd, bufs[cur].as_mut_ptr(), BUF as u32)
                .build()
                .user_data(1);
            // SAFETY: the buffer lives until its completion is reaped below.
            unsafe { ring.submission().push(&e).unwrap() };
            recv_posted = true;
        }
        if !inflight_send {
            if let Some((b, off, len)) = sending {
                let ptr = bufs[b][off..].as_ptr();
                let e = if zc {
                    opcode::SendZc::new(ofd, ptr, (len - off) as u32)
                        .build()
                        .user_data(2)
                } else {
                    opcode::Send::new(ofd, ptr, (len - off) as u32)
                        .build()
                        .user_data(2)
                };
                // SAFETY: as above.
                unsafe { ring.submission().push(&e).unwrap() };
                inflight_send = true;
            }
        }
        ring.submit_and_wait(1).unwrap();
        let cqes: Vec<(u64, i32, u32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (ud, res, flags) in cqes {
            match ud {
                1 => {
                    assert!(res > 0, "recv: {res}");
                    recv_posted = false;
                    received += res as u64;
                    recv_done = Some(res as usize);
                }
                2 => {
                    if zc && io_uring::cqueue::notif(flags) {
                        zc_notifs -= 1;
                        continue;
                    }
                    if zc && io_uring::cqueue::more(flags) {
                        zc_notifs += 1;
                    }
                    assert!(res > 0, "send: {res}");
                    inflight_send = false;
                    let (b, off, len) = sending.take().unwrap();
                    let off = off + res as usize;
                    if off < len {
                        sending = Some((b, off, len));
                    } else {
                        moved += len as u64;
                    }
                }
                _ => unreachable!(),
            }
        }
        // A received buffer becomes the one to send once the previous send is finished.
        if sending.is_none() && !inflight_send && zc_notifs == 0 {
            if let Some(n) = recv_done.take() {
                sending = Some((cur, 0, n));
                cur ^= 1;
            }
        }
    }
    let _ = &mut bufs;
}

type Mechanism = (&'static str, fn(TcpStream, TcpStream, u64));

fn main() {
    let gib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    let rounds: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let size = gib << 30;
    let mechanisms: [Mechanism; 6] = [
        ("splice(2)", blocking_splice),
        ("read/write 256K", blocking_copy),
        ("uring SPLICE", uring_splice),
        ("uring POLL+splice(2)", uring_poll_splice),
        ("uring RECV+SEND", |i, o, s| uring_recv_send(i, o, s, false)),
        ("uring RECV+SEND_ZC", |i, o, s| {
            uring_recv_send(i, o, s, true)
        }),
    ];
    println!("relaying {gib} GiB one way on loopback through one relay thread, {rounds} rounds");
    // Rounds interleave the mechanisms so that background load hits them all alike.
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); mechanisms.len()];
    for _ in 0..rounds {
        for (i, (_, f)) in mechanisms.iter().enumerate() {
            results[i].push(run(size, *f));
        }
    }
    println!(
        "{:<22} {:>8} {:>8} {:>8}",
        "mechanism", "median", "min", "max"
    );
    for (i, (name, _)) in mechanisms.iter().enumerate() {
        let mut r = results[i].clone();
        r.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{name:<22} {:>8.2} {:>8.2} {:>8.2}   GiB/s",
            r[r.len() / 2],
            r[0],
            r[r.len() - 1]
        );
    }
}
