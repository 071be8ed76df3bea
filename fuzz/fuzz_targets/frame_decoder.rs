//! `wire::FrameDecoder` fed arbitrary bytes in arbitrary chunks.
//!
//! Input layout: byte 0 = number of split-size bytes `k` (mod 16), then `k` split sizes
//! (each 0..=255, 0 meaning "rest"), then the stream.
//!
//! Invariants:
//! - every decoded message re-encodes to a frame that decodes to the same message (with the
//!   documented exception: ERROR / CONNECT_FAILED messages longer than the encoder's clip
//!   limits of 4090 / 4082 bytes come back clipped), and that frame is byte-identical to the
//!   one consumed (except for extensions, whose payload is not kept);
//! - the decoder never buffers more than FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD bytes;
//! - `decode` only consumes from the front of its slice; `Ok(None)` consumes all of it;
//! - chunking does not matter: the messages (and the first error) equal those of decoding
//!   the whole stream at once.
#![no_main]

use dialback_core::wire::{FrameDecoder, Message, WireError, FRAME_HEADER_LEN, MAX_FRAME_PAYLOAD};
use libfuzzer_sys::fuzz_target;

/// Longest prefix of `s` of at most `max` bytes ending on a character boundary.
fn clip(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// What `m` is expected to decode back to after re-encoding: the same message, except that
/// the encoder clips ERROR messages at 4090 bytes and CONNECT_FAILED messages at 4082
/// (spec/protocol.md, "Strings"), while a decoder accepts up to 4092 and 4084.
fn canonical(m: &Message) -> (Message, bool) {
    match m {
        Message::Error(e) if e.message.len() > MAX_FRAME_PAYLOAD - 6 => {
            let mut e = e.clone();
            e.message = clip(&e.message, MAX_FRAME_PAYLOAD - 6);
            (Message::Error(e), true)
        }
        Message::ConnectFailed(f) if f.message.len() > MAX_FRAME_PAYLOAD - 14 => {
            let mut f = f.clone();
            f.message = clip(&f.message, MAX_FRAME_PAYLOAD - 14);
            (Message::ConnectFailed(f), true)
        }
        m => (m.clone(), false),
    }
}

fn round_trip(m: &Message) {
    let (expect, _) = canonical(m);
    let frame = m.to_frame();
    assert!(frame.len() <= FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD);
    let mut input = &frame[..];
    let mut d = FrameDecoder::new();
    let back = d.decode(&mut input);
    assert!(back == Ok(Some(expect)), "re-encoding {m:?} does not decode back");
    assert!(input.is_empty(), "re-encoded frame left bytes");
    assert_eq!(d.buffered(), 0);
}

/// Decodes `stream` cut at `splits`; returns the messages and the first error.
fn run(stream: &[u8], splits: &[usize]) -> (Vec<Message>, Option<WireError>, Vec<Vec<u8>>) {
    let mut d = FrameDecoder::new();
    let mut got = Vec::new();
    let mut raw = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    let mut frame_start = 0usize; // offset in `stream` where the current frame began
    while !rest.is_empty() {
        let n = match splits.get(i % splits.len().max(1)) {
            Some(&0) | None => rest.len(),
            Some(&s) => s.min(rest.len()),
        };
        i += 1;
        let (chunk, after) = rest.split_at(n);
        let mut c = chunk;
        loop {
            let before = c.len();
            let res = d.decode(&mut c);
            assert!(c.len() <= before, "decode grew its input");
            assert_eq!(c, &chunk[chunk.len() - c.len()..], "decode must only consume a prefix");
            assert!(
                d.buffered() <= FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD,
                "decoder buffers {} bytes",
                d.buffered()
            );
            match res {
                Ok(Some(m)) => {
                    let end = stream.len() - after.len() - c.len();
                    raw.push(stream[frame_start..end].to_vec());
                    frame_start = end;
                    assert_eq!(d.buffered(), 0, "a whole frame was returned but bytes remain held");
                    got.push(m);
                }
                Ok(None) => {
                    assert!(c.is_empty(), "Ok(None) left {} bytes unconsumed", c.len());
                    break;
                }
                Err(e) => return (got, Some(e), raw),
            }
            if c.is_empty() {
                break;
            }
        }
        rest = after;
    }
    (got, None, raw)
}

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(k % 16).min(rest.len());
    let (split_bytes, stream) = rest.split_at(k);
    let splits: Vec<usize> = split_bytes.iter().map(|&b| usize::from(b)).collect();

    let (msgs, err, raw) = run(stream, &splits);
    for (m, r) in msgs.iter().zip(&raw) {
        round_trip(m);
        // Frames re-encode byte for byte, except extensions (their payload is dropped) and
        // the few messages the encoder clips.
        if !matches!(m, Message::Ignorable(_)) && !canonical(m).1 {
            assert_eq!(&m.to_frame(), r, "re-encoding {m:?} differs from the frame read");
        }
    }
    // Chunking must not change the result.
    let (whole, whole_err, _) = run(stream, &[]);
    assert_eq!(msgs, whole);
    assert_eq!(err, whole_err);
});
