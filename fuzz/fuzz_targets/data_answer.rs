//! `data::AnswerDecoder`, input cut at arbitrary points.
//!
//! Input layout: byte 0 = split size (0 = feed whole), rest = stream.
//!
//! Invariants: only a prefix is consumed; `Ok(None)` consumes the whole slice; on
//! `Ok(Some(answer))` exactly one frame was consumed, DATA_ACCEPT (3 bytes, 0x11 0x00 0x00) or
//! a DATA_BIND that re-encodes to the same bytes, and everything after it is left for the
//! caller; chunking does not change which result comes first.
#![no_main]

use dialback_core::data::{encode_accept, encode_bind, AnswerDecoder, DataAnswer, DataAnswerError};
use libfuzzer_sys::fuzz_target;

fn run(stream: &[u8], split: usize) -> Result<Option<(usize, DataAnswer)>, DataAnswerError> {
    let mut d = AnswerDecoder::new();
    let mut pos = 0;
    while pos < stream.len() {
        let n = if split == 0 { stream.len() - pos } else { split.min(stream.len() - pos) };
        let chunk = &stream[pos..pos + n];
        let mut c = chunk;
        let res = d.handle_input(&mut c);
        assert_eq!(c, &chunk[chunk.len() - c.len()..], "consumed a non-prefix");
        if let Some(answer) = res? {
            return Ok(Some((pos + chunk.len() - c.len(), answer)));
        }
        assert!(c.is_empty(), "no answer yet but {} bytes left unconsumed", c.len());
        pos += n;
    }
    Ok(None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let res = run(stream, usize::from(split));
    assert_eq!(res, run(stream, 0), "chunking changed the outcome");
    if let Ok(Some((consumed, answer))) = res {
        let expected = match answer {
            DataAnswer::Accept => encode_accept(),
            DataAnswer::Bind(b) => encode_bind(b.client, b.public),
        };
        assert_eq!(&stream[..consumed], &expected[..], "consumed bytes are not the answer's frame");
    }
});
