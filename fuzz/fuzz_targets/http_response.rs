//! The HTTP entry point's response path: a service's response head parsed, framed and
//! rewritten for the browser.
//!
//! Input layout: byte 0 = flags (bit 0: the request was HEAD; bit 1: routed by host instead of
//! prefix; bit 2: HTTPS; bits 3-7: body split size), rest = the service's byte stream.
//!
//! Invariants:
//! - parsing never panics; a head is never longer than the limit;
//! - the rewritten head parses back complete with the same status and the same framing, so the
//!   browser cuts the body where the service meant it to end;
//! - on prefix routes, an absolute-path `Location` ends up under the prefix; the route cookie
//!   is set on final responses only;
//! - where the body ends does not depend on how its bytes arrive.
#![no_main]

use dialback_core::http::body::{response_framing, BodyState, Framing};
use dialback_core::http::head::{parse_response, Headers, Limits};
use dialback_core::http::rewrite::response_head;
use dialback_core::http::route::{Route, Via};
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "/~~app";

fn body_end(framing: Framing, input: &[u8], chunk: usize) -> Result<Option<usize>, ()> {
    let mut state = BodyState::new(framing);
    let mut pos = 0;
    while !state.is_done() && pos < input.len() {
        let end = if chunk == 0 { input.len() } else { (pos + chunk).min(input.len()) };
        let n = state.advance(&input[pos..end]).map_err(|_| ())?;
        pos += n;
        if pos < end {
            assert!(state.is_done(), "stopped early without being done");
        }
    }
    Ok(state.is_done().then_some(pos))
}

fuzz_target!(|data: &[u8]| {
    let [flags, stream @ ..] = data else {
        return;
    };
    let method = if flags & 1 == 1 { "HEAD" } else { "GET" };
    let by_host = flags & 2 == 2;
    let https = flags & 4 == 4;
    let split = usize::from(flags >> 3);
    let limits = Limits { max_head: 8192, max_headers: 64 };
    let Ok(Some((head, len))) = parse_response(stream, &limits) else {
        return;
    };
    assert!(len <= stream.len());
    let Ok(framing) = response_framing(method, &head) else {
        return;
    };
    let rest = &stream[len..];
    assert_eq!(body_end(framing, rest, split), body_end(framing, rest, 0), "chunking changed the end");

    let route = Route {
        service: "app".into(),
        via: if by_host { Via::Host } else { Via::Prefix },
        target: "/".into(),
        prefix: (!by_host).then(|| PREFIX.to_owned()),
        set_cookie: !by_host,
    };
    let out = response_head(&head, &route, Some("gw.example.com:8443"), https);
    let big = Limits { max_head: out.len() + 1, max_headers: 256 };
    let (back, back_len) = parse_response(&out, &big)
        .expect("the rewritten head parses")
        .expect("the rewritten head is complete");
    assert_eq!(back_len, out.len());
    assert_eq!(back.status, head.status);
    assert_eq!(response_framing(method, &back), Ok(framing));
    let cookies = back.all("set-cookie").filter(|h| h.value.starts_with(b"dialback_route=")).count();
    assert_eq!(cookies, usize::from(!by_host && head.status >= 200));
    if !by_host {
        for (before, after) in head.all("location").zip(back.all("location")) {
            let Some(loc) = before.text() else { continue };
            if loc.starts_with('/') && !loc.starts_with("//") {
                assert!(after.text().is_some_and(|a| a.starts_with(PREFIX)), "{loc:?}");
            }
        }
    }
});
