//! `data::AnswerDecoder`, input cut at arbitrary points.
//!
//! Input layout: byte 0 = split size (0 = feed whole), rest = stream.
//!
//! Invariants: only a prefix is consumed; `Ok(false)` consumes the whole slice; on `Ok(true)`
//! exactly one DATA_ACCEPT frame (3 bytes, 0x11 0x00 0x00) was consumed and everything after
//! it is left for the caller; an error is sticky in the sense that chunking does not change
//! which result comes first.
#![no_main]

use dialback_core::data::{encode_accept, AnswerDecoder, DataAnswerError};
use libfuzzer_sys::fuzz_target;

fn run(stream: &[u8], split: usize) -> Result<Option<usize>, DataAnswerError> {
    let mut d = AnswerDecoder::new();
    let mut pos = 0;
    while pos < stream.len() {
        let n = if split == 0 { stream.len() - pos } else { split.min(stream.len() - pos) };
        let chunk = &stream[pos..pos + n];
        let mut c = chunk;
        let res = d.handle_input(&mut c);
        assert_eq!(c, &chunk[chunk.len() - c.len()..], "consumed a non-prefix");
        if res? {
            return Ok(Some(pos + chunk.len() - c.len()));
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
    if let Ok(Some(consumed)) = res {
        let accept = encode_accept();
        assert_eq!(&stream[..consumed], &accept[..], "accepted something else than DATA_ACCEPT");
    }
});
