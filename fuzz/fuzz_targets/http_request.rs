//! The HTTP entry point's request path: head parsing, routing, rewriting, body framing.
//!
//! Input layout: byte 0 = split size for the body (0 = feed whole), byte 1 = head limit
//! selector, rest = a client's byte stream (head, then body and whatever follows).
//!
//! Invariants:
//! - parsing never panics and never returns a head longer than the limit;
//! - a routed request, once rewritten, parses back as one complete head with the route's
//!   target, the same method and the same body framing (nothing is smuggled in or out);
//! - where a body ends does not depend on how its bytes arrive, and is never past the input.
#![no_main]

use dialback_core::http::body::{request_framing, BodyState, Framing};
use dialback_core::http::head::{parse_request, Limits};
use dialback_core::http::rewrite::{request_head, Forwarding};
use dialback_core::http::route::{Router, ServiceRoute};
use libfuzzer_sys::fuzz_target;

fn router() -> Router {
    let s = |name: &str, prefix: &str, hosts: &[&str]| ServiceRoute {
        name: name.into(),
        prefix: prefix.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
    };
    Router::new(vec![
        s("app", "/~~app", &[]),
        s("portal", "/~~srvBACK", &["portal.example.com", "*.apps.example.com"]),
        s("deep", "/~~app/deep", &[]),
    ])
    .expect("fixed router")
}

/// Where the body ends, feeding `chunk` bytes at a time; `None` if it does not end in `input`.
fn body_end(framing: Framing, input: &[u8], chunk: usize) -> Result<Option<usize>, ()> {
    let mut state = BodyState::new(framing);
    let mut pos = 0;
    while !state.is_done() && pos < input.len() {
        let end = if chunk == 0 { input.len() } else { (pos + chunk).min(input.len()) };
        let n = state.advance(&input[pos..end]).map_err(|_| ())?;
        assert!(n <= end - pos, "consumed more than offered");
        pos += n;
        if pos < end {
            assert!(state.is_done(), "stopped early without being done");
        }
    }
    Ok(state.is_done().then_some(pos))
}

fuzz_target!(|data: &[u8]| {
    let [split, limit, stream @ ..] = data else {
        return;
    };
    let limits = Limits {
        max_head: 64 + usize::from(*limit) * 16,
        max_headers: 1 + usize::from(*limit % 32),
    };
    let Ok(Some((head, len))) = parse_request(stream, &limits) else {
        return;
    };
    assert!(len <= limits.max_head && len <= stream.len());
    assert!(head.headers.len() <= limits.max_headers);
    let Ok(framing) = request_framing(&head) else {
        return;
    };
    let rest = &stream[len..];
    let whole = body_end(framing, rest, 0);
    assert_eq!(body_end(framing, rest, usize::from(*split)), whole, "chunking changed the end");
    if let Ok(Some(end)) = whole {
        assert!(end <= rest.len());
    }
    let Ok(route) = router().route(&head) else {
        return;
    };
    let fwd = Forwarding { client: [192, 0, 2, 1].into(), https: split % 2 == 0 };
    let out = request_head(&head, &route, &fwd);
    let big = Limits { max_head: out.len() + 1, max_headers: 256 };
    let (back, back_len) = parse_request(&out, &big)
        .expect("the rewritten head parses")
        .expect("the rewritten head is complete");
    assert_eq!(back_len, out.len());
    assert_eq!(back.method, head.method);
    assert_eq!(back.target, route.target);
    assert_eq!(request_framing(&back), Ok(framing));
});
