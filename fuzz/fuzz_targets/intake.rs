//! `data::Intake` for both `tls` values, input cut at arbitrary points.
//!
//! Input layout: byte 0 = split size (0 = feed whole), rest = stream.
//!
//! Invariants:
//! - `handle_input` only consumes a prefix of its slice;
//! - until classified (and without error) it consumes the whole slice;
//! - once classified, what is left in the slice is exactly the unconsumed suffix of the
//!   stream: for Control, the stream after the 6-byte preamble; for Data, the stream after the
//!   preamble and the one DATA_HELLO frame (which re-encodes to those bytes);
//! - Control is only ever returned with `tls == true`;
//! - the result does not depend on the chunking.
#![no_main]

use dialback_core::data::{encode_data_hello, Classified, Intake, IntakeError};
use dialback_core::wire::PREAMBLE_LEN;
use libfuzzer_sys::fuzz_target;

fn run(tls: bool, stream: &[u8], split: usize) -> Result<Option<(Classified, usize)>, IntakeError> {
    let mut intake = Intake::new(tls);
    let mut pos = 0;
    while pos < stream.len() {
        let n = if split == 0 { stream.len() - pos } else { split.min(stream.len() - pos) };
        let chunk = &stream[pos..pos + n];
        let mut c = chunk;
        let res = intake.handle_input(&mut c);
        assert_eq!(c, &chunk[chunk.len() - c.len()..], "consumed a non-prefix");
        let consumed = pos + chunk.len() - c.len();
        match res? {
            Some(cl) => {
                // The leftover is the rest of this chunk; the caller keeps it plus later input.
                return Ok(Some((cl, consumed)));
            }
            None => assert!(c.is_empty(), "unclassified yet {} bytes left unconsumed", c.len()),
        }
        pos += n;
    }
    Ok(None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    for tls in [false, true] {
        let res = run(tls, stream, usize::from(split));
        let whole = run(tls, stream, 0);
        assert_eq!(res, whole, "chunking changed the outcome");
        if let Ok(Some((cl, consumed))) = res {
            match cl {
                Classified::Control => {
                    assert!(tls, "Control without TLS");
                    assert_eq!(consumed, PREAMBLE_LEN);
                }
                Classified::Data(h) => {
                    let expect = encode_data_hello(&h);
                    assert_eq!(consumed, expect.len());
                    assert_eq!(&stream[..consumed], &expect[..], "hello bytes do not round trip");
                }
            }
        }
    }
});
