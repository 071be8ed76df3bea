//! The HTTP entry point's sans-IO parts: head parsing and its limits, routing, rewriting and
//! body framing, with fixed cases and properties over random chunking.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use dialback_core::http::body::{request_framing, response_framing, BodyState, Framing};
use dialback_core::http::head::{
    parse_request, parse_response, Headers, Limits, RequestHead, RequestReader,
};
use dialback_core::http::rewrite::{request_head, response_head, Forwarding};
use dialback_core::http::route::{Route, Router, ServiceRoute, Via};
use dialback_core::http::{error_response, HttpError};
use proptest::prelude::*;

fn req(text: &str) -> RequestHead {
    parse_request(text.as_bytes(), &Limits::default())
        .unwrap()
        .unwrap()
        .0
}

fn router() -> Router {
    Router::new(vec![
        ServiceRoute {
            name: "app".into(),
            prefix: "/~~app".into(),
            hosts: vec![],
        },
        ServiceRoute {
            name: "portal".into(),
            prefix: "/~~srvBACK".into(),
            hosts: vec!["portal.example.com".into(), "*.apps.example.com".into()],
        },
        ServiceRoute {
            name: "deep".into(),
            prefix: "/~~app/deep".into(),
            hosts: vec![],
        },
    ])
    .unwrap()
}

fn route(text: &str) -> Result<Route, HttpError> {
    router().route(&req(text))
}

#[test]
fn parses_a_request_and_reports_its_length() {
    let text = "GET /~~app/x?y=1 HTTP/1.1\r\nHost: gw:8080\r\nAccept: */*\r\n\r\nBODY";
    let (head, len) = parse_request(text.as_bytes(), &Limits::default())
        .unwrap()
        .unwrap();
    assert_eq!(len, text.len() - 4);
    assert_eq!(head.method, "GET");
    assert_eq!(head.target, "/~~app/x?y=1");
    assert_eq!(head.minor, 1);
    assert_eq!(head.get("accept"), Some("*/*"));
    assert_eq!(head.host().as_deref(), Some("gw"));
}

#[test]
fn absolute_form_targets_become_paths_with_their_host() {
    let head = req("GET HTTP://Gw.example:8080/~~app/x?y HTTP/1.1\r\nHost: other\r\n\r\n");
    assert_eq!(head.target, "/~~app/x?y");
    assert_eq!(head.get("host"), Some("Gw.example:8080"));
    assert_eq!(head.all("host").count(), 1);
    let head = req("GET https://gw?q HTTP/1.1\r\n\r\n");
    assert_eq!(
        (head.target.as_str(), head.get("host")),
        ("/?q", Some("gw"))
    );
    let r = router()
        .route(&req(
            "GET http://gw/~~app/a.css HTTP/1.1\r\nHost: gw\r\n\r\n",
        ))
        .unwrap();
    assert_eq!((r.service.as_str(), r.target.as_str()), ("app", "/a.css"));
}

#[test]
fn partial_heads_wait_and_oversized_ones_are_431() {
    let limits = Limits {
        max_head: 64,
        max_headers: 4,
    };
    assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHo", &limits), Ok(None));
    let big = format!("GET /{} HTTP/1.1\r\n", "a".repeat(80));
    assert_eq!(
        parse_request(big.as_bytes(), &limits).unwrap_err().status(),
        431
    );
    let many = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
    let limits = Limits {
        max_head: 4096,
        max_headers: 4,
    };
    assert_eq!(
        parse_request(many.as_bytes(), &limits)
            .unwrap_err()
            .status(),
        431
    );
}

#[test]
fn malformed_requests_are_400() {
    for bad in [
        "GET / HTTP/1.1\r\nHost a\r\n\r\n",
        "GET http://user@example.com/ HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET ftp://example.com/ HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "\x16\x03\x01\x02\x00\x01\x00\x01\x03\x03",
        "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    ] {
        let r = parse_request(bad.as_bytes(), &Limits::default());
        assert_eq!(r.map_err(|e| e.status()), Err(400), "{bad:?}");
    }
    assert_eq!(
        parse_request(
            b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            &Limits::default()
        )
        .unwrap_err()
        .status(),
        405
    );
}

/// The epoch of virtual time: read once, then only offsets from it are used.
#[allow(clippy::disallowed_methods)]
fn epoch() -> Instant {
    Instant::now()
}

#[test]
fn the_reader_times_out_slow_heads() {
    let t0 = epoch();
    let mut r = RequestReader::new(Limits::default(), Duration::from_secs(5));
    assert_eq!(r.poll_timeout(), None);
    assert_eq!(r.handle_input(t0, b"GET / HT"), Ok(None));
    assert_eq!(r.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    assert!(r.handle_timeout(t0 + Duration::from_secs(4)).is_ok());
    assert_eq!(
        r.handle_timeout(t0 + Duration::from_secs(5)),
        Err(HttpError::Timeout)
    );
    assert_eq!(
        r.handle_input(
            t0 + Duration::from_secs(6),
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
        ),
        Err(HttpError::Timeout)
    );
    // A complete head stops the clock.
    let mut r = RequestReader::new(Limits::default(), Duration::from_secs(5));
    r.start(t0);
    assert!(r
        .handle_input(t0, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap()
        .is_some());
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn prefix_routes_strip_the_prefix() {
    let r = route("GET /~~app/css/a.css?v=1 HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap();
    assert_eq!((r.service.as_str(), r.via), ("app", Via::Prefix));
    assert_eq!(r.target, "/css/a.css?v=1");
    assert_eq!(r.prefix.as_deref(), Some("/~~app"));
    assert!(r.set_cookie);
    assert_eq!(
        route("GET /~~app HTTP/1.1\r\nHost: gw\r\n\r\n")
            .unwrap()
            .target,
        "/"
    );
    assert_eq!(
        route("GET /~~app?q HTTP/1.1\r\nHost: gw\r\n\r\n")
            .unwrap()
            .target,
        "/?q"
    );
    // The longest prefix wins.
    let r = route("GET /~~app/deep/x HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap();
    assert_eq!((r.service.as_str(), r.target.as_str()), ("deep", "/x"));
    // A prefix is a whole path segment.
    let e = route("GET /~~application/ HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap_err();
    assert_eq!(e.status(), 404);
    assert!(e.to_string().contains("/~~application"), "{e}");
    // The cookie is not set again when it already names the service.
    let r = route("GET /~~app/ HTTP/1.1\r\nHost: gw\r\nCookie: a=b; dialback_route=app\r\n\r\n")
        .unwrap();
    assert!(!r.set_cookie);
}

#[test]
fn absolute_paths_follow_referer_then_cookie() {
    let r = route(
        "GET /css/app.css HTTP/1.1\r\nHost: gw:8080\r\nReferer: http://gw:8080/~~srvBACK/index.html\r\nCookie: dialback_route=app\r\n\r\n",
    )
    .unwrap();
    assert_eq!((r.service.as_str(), r.via), ("portal", Via::Referer));
    assert_eq!(r.target, "/css/app.css");
    assert_eq!(r.prefix.as_deref(), Some("/~~srvBACK"));
    // A Referer from another site does not count.
    let r = route(
        "GET /img.png HTTP/1.1\r\nHost: gw\r\nReferer: http://evil/~~srvBACK/\r\nCookie: x=1; dialback_route=app\r\n\r\n",
    )
    .unwrap();
    assert_eq!((r.service.as_str(), r.via), ("app", Via::Cookie));
    assert!(!r.set_cookie);
    // Nothing to go by.
    let e = route("GET /img.png HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap_err();
    assert_eq!(e.status(), 404);
    // A cookie naming a service that does not exist.
    let e = route("GET / HTTP/1.1\r\nHost: gw\r\nCookie: dialback_route=gone\r\n\r\n");
    assert_eq!(e.unwrap_err().status(), 404);
}

#[test]
fn host_routes_come_first_and_keep_the_path() {
    let r = route("GET /~~app/x HTTP/1.1\r\nHost: Portal.Example.com:443\r\n\r\n").unwrap();
    assert_eq!((r.service.as_str(), r.via), ("portal", Via::Host));
    assert_eq!(r.target, "/~~app/x");
    assert_eq!(r.prefix, None);
    let r = route("GET / HTTP/1.1\r\nHost: a.b.apps.example.com\r\n\r\n").unwrap();
    assert_eq!(r.service, "portal");
    assert!(route("GET / HTTP/1.1\r\nHost: apps.example.com\r\n\r\n").is_err());
}

#[test]
fn routers_refuse_clashing_or_bad_configs() {
    let s = |name: &str, prefix: &str, hosts: &[&str]| ServiceRoute {
        name: name.into(),
        prefix: prefix.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
    };
    assert!(Router::new(vec![s("a", "/~~x", &[]), s("b", "/~~x", &[])]).is_err());
    assert!(Router::new(vec![s("a", "/~~a", &["h"]), s("b", "/~~b", &["H"])]).is_err());
    for bad in ["", "/", "~~a", "/~~a/", "/~~a?b", "/a b", "/a//b"] {
        assert!(Router::new(vec![s("a", bad, &[])]).is_err(), "{bad:?}");
    }
    assert!(Router::new(vec![s("a", "/~~a", &["bad host!"])]).is_err());
}

fn fwd() -> Forwarding {
    Forwarding {
        client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        https: true,
    }
}

#[test]
fn requests_are_rewritten_for_the_service() {
    let head = req("POST /~~app/api?x HTTP/1.1\r\nHost: gw:8443\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: forged\r\nCookie: sid=1; dialback_route=app\r\nContent-Length: 3\r\n\r\n");
    let r = router().route(&head).unwrap();
    let out = String::from_utf8(request_head(&head, &r, &fwd())).unwrap();
    assert!(out.starts_with("POST /api?x HTTP/1.1\r\n"), "{out}");
    assert!(out.contains("\r\nHost: gw:8443\r\n"), "{out}");
    assert!(out.contains("\r\nCookie: sid=1\r\n"), "{out}");
    assert!(
        out.contains("\r\nX-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n"),
        "{out}"
    );
    assert!(out.contains("\r\nX-Forwarded-Proto: https\r\n"), "{out}");
    assert!(out.contains("\r\nX-Forwarded-Host: gw:8443\r\n"), "{out}");
    assert!(out.contains("\r\nX-Forwarded-Prefix: /~~app\r\n"), "{out}");
    assert!(!out.contains("forged"), "{out}");
    assert!(out.ends_with("\r\n\r\n"));
    // Parses back as one request with the same framing.
    let back = req(&out);
    assert_eq!(request_framing(&back), Ok(Framing::Length(3)));
    // Only the route cookie: no Cookie line at all.
    let head = req("GET /~~app/ HTTP/1.1\r\nHost: gw\r\nCookie: dialback_route=app\r\n\r\n");
    let out =
        String::from_utf8(request_head(&head, &router().route(&head).unwrap(), &fwd())).unwrap();
    assert!(!out.to_ascii_lowercase().contains("cookie"), "{out}");
}

#[test]
fn responses_get_their_location_back_under_the_prefix_and_the_cookie() {
    let head = req("GET /~~app/old HTTP/1.1\r\nHost: gw:8080\r\n\r\n");
    let r = router().route(&head).unwrap();
    let resp = |loc: &str| {
        let text = format!("HTTP/1.1 302 Found\r\nLocation: {loc}\r\nContent-Length: 0\r\n\r\n");
        let (h, _) = parse_response(text.as_bytes(), &Limits::default())
            .unwrap()
            .unwrap();
        String::from_utf8(response_head(&h, &r, head.get("host"), false)).unwrap()
    };
    assert!(resp("/new").contains("\r\nLocation: /~~app/new\r\n"));
    assert!(resp("/~~app/new").contains("\r\nLocation: /~~app/new\r\n"));
    assert!(resp("http://gw:8080/new?a").contains("\r\nLocation: http://gw:8080/~~app/new?a\r\n"));
    assert!(resp("https://other/new").contains("\r\nLocation: https://other/new\r\n"));
    assert!(resp("//other/new").contains("\r\nLocation: //other/new\r\n"));
    assert!(resp("relative").contains("\r\nLocation: relative\r\n"));
    let out = resp("/new");
    assert!(out.starts_with("HTTP/1.1 302 Found\r\n"));
    // A service cannot set the gateway's route cookie itself.
    let text =
        "HTTP/1.1 200 OK\r\nSet-Cookie: dialback_route=other; Path=/\r\nSet-Cookie: sid=1\r\n\r\n";
    let (h, _) = parse_response(text.as_bytes(), &Limits::default())
        .unwrap()
        .unwrap();
    let out = String::from_utf8(response_head(&h, &r, None, true)).unwrap();
    assert!(!out.contains("dialback_route=other"), "{out}");
    assert!(out.contains("\r\nSet-Cookie: sid=1\r\n"), "{out}");
    assert!(
        out.contains("dialback_route=app; Path=/; HttpOnly; SameSite=Lax; Secure"),
        "{out}"
    );
    let out = resp("/new");
    assert!(
        out.contains("\r\nSet-Cookie: dialback_route=app; Path=/; HttpOnly; SameSite=Lax\r\n"),
        "{out}"
    );
}

#[test]
fn framing_follows_rfc_9112() {
    let f = |t: &str| request_framing(&req(t));
    assert_eq!(f("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(Framing::Empty));
    assert_eq!(
        f("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n"),
        Ok(Framing::Length(10))
    );
    assert_eq!(
        f("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nContent-Length: 10\r\n\r\n"),
        Ok(Framing::Length(10))
    );
    assert_eq!(
        f("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        Ok(Framing::Chunked)
    );
    for bad in [
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    ] {
        assert_eq!(f(bad).map_err(|e| e.status()), Err(400), "{bad:?}");
    }
    let resp = |method: &str, t: &str| {
        let (h, _) = parse_response(t.as_bytes(), &Limits::default())
            .unwrap()
            .unwrap();
        response_framing(method, &h)
    };
    assert_eq!(
        resp("GET", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        Ok(Framing::Length(5))
    );
    assert_eq!(
        resp("HEAD", "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        Ok(Framing::Empty)
    );
    assert_eq!(resp("GET", "HTTP/1.1 304 NM\r\n\r\n"), Ok(Framing::Empty));
    assert_eq!(
        resp("GET", "HTTP/1.0 200 OK\r\n\r\n"),
        Ok(Framing::UntilClose)
    );
    assert_eq!(
        resp(
            "GET",
            "HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\n\r\n"
        ),
        Ok(Framing::Upgrade)
    );
    assert_eq!(
        resp(
            "GET",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        ),
        Ok(Framing::Chunked)
    );
}

fn body_len(framing: Framing, stream: &[u8], chunk: usize) -> Result<Option<usize>, String> {
    let mut state = BodyState::new(framing);
    let mut pos = 0;
    while !state.is_done() && pos < stream.len() {
        let end = (pos + chunk.max(1)).min(stream.len());
        let n = state
            .advance(&stream[pos..end])
            .map_err(|e| e.to_string())?;
        pos += n;
        if n < end - (pos - n) {
            break;
        }
    }
    Ok(state.is_done().then_some(pos))
}

#[test]
fn chunked_bodies_end_where_they_end() {
    let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: 1\r\n\r\nGET /next";
    let end = body.len() - "GET /next".len();
    for chunk in [1, 2, 3, 7, 100] {
        assert_eq!(body_len(Framing::Chunked, body, chunk), Ok(Some(end)));
    }
    assert_eq!(body_len(Framing::Chunked, b"0\r\n\r\n", 1), Ok(Some(5)));
    assert_eq!(body_len(Framing::Chunked, b"4\r\nWiki\r\n", 3), Ok(None));
    for bad in [
        &b"x\r\n"[..],
        b"4\r\nWikiX\r\n",
        b"4\nWiki\r\n",
        b"11111111111111111\r\n",
        b"\r\n",
    ] {
        assert!(body_len(Framing::Chunked, bad, 1).is_err(), "{bad:?}");
    }
    assert_eq!(body_len(Framing::Length(3), b"abcdef", 2), Ok(Some(3)));
}

#[test]
fn odd_statuses_from_services_are_refused() {
    for bad in [
        "HTTP/1.1 002 OK\r\n\r\n",
        "HTTP/1.1 099 X\r\n\r\n",
        "HTTP/1.1 20 OK\r\n\r\n",
    ] {
        assert!(
            parse_response(bad.as_bytes(), &Limits::default()).is_err(),
            "{bad:?}"
        );
    }
    assert!(parse_response(b"HTTP/1.1 599 X\r\n\r\n", &Limits::default()).is_ok());
}

#[test]
fn error_responses_are_complete_and_close() {
    let out = error_response(502, "the agent of service app is offline");
    let (h, len) = parse_response(&out, &Limits::default()).unwrap().unwrap();
    assert_eq!(h.status, 502);
    assert!(h.closes());
    assert_eq!(
        response_framing("GET", &h),
        Ok(Framing::Length((out.len() - len) as u64))
    );
}

/// Encodes `data` as chunks of the given sizes.
fn chunked(data: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
        i += 1;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

proptest! {
    #[test]
    fn chunked_length_does_not_depend_on_how_bytes_arrive(
        data in proptest::collection::vec(any::<u8>(), 0..2000),
        sizes in proptest::collection::vec(1usize..300, 1..8),
        split in 1usize..64,
        tail in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut stream = chunked(&data, &sizes);
        let end = stream.len();
        stream.extend_from_slice(&tail);
        prop_assert_eq!(body_len(Framing::Chunked, &stream, split), Ok(Some(end)));
    }

    #[test]
    fn parse_never_panics_and_respects_limits(bytes in proptest::collection::vec(any::<u8>(), 0..600), max_head in 16usize..512) {
        let limits = Limits { max_head, max_headers: 8 };
        if let Ok(Some((head, len))) = parse_request(&bytes, &limits) {
            prop_assert!(len <= max_head);
            prop_assert!(head.headers.len() <= 8);
            let _ = router().route(&head);
        }
    }

    #[test]
    fn rewritten_requests_parse_back(
        path in "/[a-z0-9/._-]{0,40}",
        prefix_routed in any::<bool>(),
        extra in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,10}", "[ -~]{0,30}"), 0..6),
    ) {
        let target = if prefix_routed { format!("/~~app{path}") } else { path.clone() };
        let mut text = format!("GET {target} HTTP/1.1\r\nHost: gw\r\nCookie: dialback_route=app\r\n");
        for (n, v) in &extra {
            if n.eq_ignore_ascii_case("host") || n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("transfer-encoding") || n.eq_ignore_ascii_case("cookie") {
                continue;
            }
            text.push_str(&format!("{n}: {v}\r\n"));
        }
        text.push_str("\r\n");
        let Ok(Some((head, _))) = parse_request(text.as_bytes(), &Limits::default()) else {
            return Ok(());
        };
        let r = router().route(&head).unwrap();
        let out = request_head(&head, &r, &fwd());
        let (back, len) = parse_request(&out, &Limits { max_head: 64 * 1024, max_headers: 200 }).unwrap().unwrap();
        prop_assert_eq!(len, out.len());
        prop_assert_eq!(&back.target, &r.target);
        prop_assert_eq!(back.get("x-forwarded-prefix"), r.prefix.as_deref());
        prop_assert_eq!(request_framing(&back), Ok(Framing::Empty));
    }
}

/// One generated request: its bytes on the wire, its target and its body as sent.
#[derive(Debug, Clone)]
struct Generated {
    wire: Vec<u8>,
    target: String,
    body_wire: Vec<u8>,
}

fn generated_request() -> impl Strategy<Value = Generated> {
    (
        prop_oneof![Just("GET"), Just("POST"), Just("PUT")],
        prop_oneof![Just("/~~app"), Just("/~~srvBACK"), Just("")],
        "/[a-z0-9/._-]{0,20}",
        0u8..3,
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(1usize..64, 1..4),
        proptest::collection::vec(("X-[A-Za-z]{1,8}", "[ -~]{0,20}"), 0..4),
    )
        .prop_map(|(method, prefix, path, kind, body, sizes, extra)| {
            let target = format!("{prefix}{path}");
            let mut head = format!("{method} {target} HTTP/1.1\r\nHost: gw\r\n");
            for (n, v) in extra {
                head.push_str(&format!("{n}: {}\r\n", v.trim()));
            }
            let body_wire = match kind {
                0 => Vec::new(),
                1 => {
                    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
                    body.clone()
                }
                _ => {
                    head.push_str("Transfer-Encoding: chunked\r\n");
                    chunked(&body, &sizes)
                }
            };
            head.push_str("\r\n");
            let mut wire = head.into_bytes();
            wire.extend_from_slice(&body_wire);
            Generated {
                wire,
                target,
                body_wire,
            }
        })
}

/// Reads pipelined requests the way the runtime does: a head from the buffer, then as much
/// of the buffer as the body takes, reading more input only when the buffer runs dry.
fn read_pipeline(stream: &[u8], chunk: usize) -> Vec<(String, Vec<u8>)> {
    let mut pieces = stream.chunks(chunk.max(1));
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    loop {
        let (head, len) = loop {
            match parse_request(&buf, &Limits::default()).unwrap() {
                Some(parsed) => break parsed,
                None => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => {
                        assert!(buf.is_empty(), "left over: {buf:?}");
                        return out;
                    }
                },
            }
        };
        buf.drain(..len);
        let mut state = BodyState::new(request_framing(&head).unwrap());
        let mut body = Vec::new();
        loop {
            let n = state.advance(&buf).unwrap();
            body.extend_from_slice(&buf[..n]);
            buf.drain(..n);
            if state.is_done() {
                break;
            }
            buf.extend_from_slice(pieces.next().expect("the body ends before the input"));
        }
        out.push((head.target, body));
    }
}

proptest! {
    #[test]
    fn pipelined_requests_come_apart_as_they_were_sent(
        requests in proptest::collection::vec(generated_request(), 1..6),
        chunk in 1usize..200,
    ) {
        let stream: Vec<u8> = requests.iter().flat_map(|r| r.wire.clone()).collect();
        let got = read_pipeline(&stream, chunk);
        let want: Vec<(String, Vec<u8>)> = requests
            .iter()
            .map(|r| (r.target.clone(), r.body_wire.clone()))
            .collect();
        prop_assert_eq!(got, want);
    }
}
