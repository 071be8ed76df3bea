//! `http_route`: the per-request work of the HTTP entry point (`dialback_core::http`) on
//! realistic browser requests: parse the head, route it, rewrite it for the service, rewrite
//! the response head for the browser, and find where a chunked body ends.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dialback_core::http::body::{request_framing, BodyState, Framing};
use dialback_core::http::head::{parse_request, parse_response, Headers, Limits};
use dialback_core::http::rewrite::{request_head, response_head, Forwarding};
use dialback_core::http::route::{Router, ServiceRoute, Via};

/// A first visit: Chrome's headers for a page under a prefix.
const PAGE: &str = "GET /~~srvBACK/portal/index.html?lang=en HTTP/1.1\r\nHost: gw.example.com:8443\r\nConnection: keep-alive\r\nsec-ch-ua: \"Chromium\";v=\"120\", \"Not?A_Brand\";v=\"8\"\r\nsec-ch-ua-mobile: ?0\r\nsec-ch-ua-platform: \"Linux\"\r\nUpgrade-Insecure-Requests: 1\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8\r\nSec-Fetch-Site: none\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-User: ?1\r\nSec-Fetch-Dest: document\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n\r\n";

/// The page's stylesheet, requested by absolute path: routed by Referer.
const ASSET: &str = "GET /css/app.css?v=3 HTTP/1.1\r\nHost: gw.example.com:8443\r\nConnection: keep-alive\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\nAccept: text/css,*/*;q=0.1\r\nSec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Dest: style\r\nReferer: https://gw.example.com:8443/~~srvBACK/portal/index.html?lang=en\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\nCookie: dialback_route=srvBACK; session=5f2c9a1e0b7d4e3f8a6c\r\n\r\n";

/// An API call without Referer: routed by the cookie, with a JSON body.
const API: &str = "POST /api/v2/items HTTP/1.1\r\nHost: gw.example.com:8443\r\nContent-Type: application/json\r\nContent-Length: 27\r\nCookie: session=5f2c9a1e0b7d4e3f8a6c; dialback_route=srvBACK\r\nX-Forwarded-For: 198.51.100.4\r\n\r\n{\"name\":\"x\",\"count\":42000}";

const RESPONSE: &str = "HTTP/1.1 302 Found\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 07:31:29 GMT\r\nContent-Type: text/html\r\nContent-Length: 145\r\nConnection: keep-alive\r\nLocation: /portal/login?next=%2Fportal%2F\r\nCache-Control: no-store\r\nSet-Cookie: session=5f2c9a1e0b7d4e3f8a6c; Path=/; HttpOnly\r\n\r\n";

fn router() -> Router {
    let mut services: Vec<ServiceRoute> = (0..50)
        .map(|i| ServiceRoute {
            name: format!("srv{i}"),
            prefix: format!("/~~srv{i}"),
            hosts: vec![format!("srv{i}.apps.example.com")],
        })
        .collect();
    services.push(ServiceRoute {
        name: "srvBACK".into(),
        prefix: "/~~srvBACK".into(),
        hosts: vec![],
    });
    Router::new(services).expect("router")
}

fn http_route(c: &mut Criterion) {
    let mut group = c.benchmark_group("http_route");
    let router = router();
    let limits = Limits::default();
    let fwd = Forwarding {
        client: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
        https: true,
    };
    for (name, text, via) in [
        ("page_by_prefix", PAGE, Via::Prefix),
        ("asset_by_referer", ASSET, Via::Referer),
        ("api_by_cookie", API, Via::Cookie),
    ] {
        let bytes = text.as_bytes();
        // Check the fixture takes the path its name says, so the bench never measures an error.
        let (head, _) = parse_request(bytes, &limits).unwrap().unwrap();
        let route = router.route(&head).unwrap();
        assert_eq!((route.service.as_str(), route.via), ("srvBACK", via));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(format!("parse_route_rewrite/{name}"), |b| {
            b.iter(|| {
                let (head, len) = parse_request(black_box(bytes), &limits).unwrap().unwrap();
                let framing = request_framing(&head).unwrap();
                let route = router.route(&head).unwrap();
                let out = request_head(&head, &route, &fwd);
                (len, framing, out.len())
            })
        });
    }
    group.bench_function("parse_only/page", |b| {
        b.iter(|| {
            parse_request(black_box(PAGE.as_bytes()), &limits)
                .unwrap()
                .unwrap()
                .1
        })
    });

    let (head, _) = parse_request(PAGE.as_bytes(), &limits).unwrap().unwrap();
    let route = router.route(&head).unwrap();
    let host = head.get("host").map(str::to_owned);
    let rewritten = {
        let (resp, _) = parse_response(RESPONSE.as_bytes(), &limits)
            .unwrap()
            .unwrap();
        String::from_utf8(response_head(&resp, &route, host.as_deref(), true)).unwrap()
    };
    assert!(
        rewritten.contains("Location: /~~srvBACK/portal/login"),
        "{rewritten}"
    );
    assert!(
        rewritten.contains("Set-Cookie: dialback_route=srvBACK"),
        "{rewritten}"
    );
    group.throughput(Throughput::Bytes(RESPONSE.len() as u64));
    group.bench_function("response_rewrite/redirect", |b| {
        b.iter(|| {
            let (resp, _) = parse_response(black_box(RESPONSE.as_bytes()), &limits)
                .unwrap()
                .unwrap();
            response_head(&resp, &route, host.as_deref(), true).len()
        })
    });

    // A 1 MiB chunked body in 8 KiB chunks: the framing cost per body byte.
    let chunk = vec![b'x'; 8192];
    let mut body = Vec::new();
    for _ in 0..128 {
        body.extend_from_slice(b"2000\r\n");
        body.extend_from_slice(&chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("chunked_body/1MiB_in_64KiB_reads", |b| {
        b.iter(|| {
            let mut state = BodyState::new(Framing::Chunked);
            let mut total = 0;
            for piece in black_box(&body).chunks(64 * 1024) {
                total += state.advance(piece).unwrap();
            }
            assert!(state.is_done());
            total
        })
    });
    group.finish();
}

criterion_group!(benches, http_route);
criterion_main!(benches);
