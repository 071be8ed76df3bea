//! `proxy_protocol`: the per-connection cost of `accept_proxy` (parsing the header a balancer
//! sends) and of `send_proxy` (encoding the one the agent sends), v1 and v2, IPv4 and IPv6;
//! plus an access-rule decision, which every registration and (with `clients_allow`) every
//! client pays.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dialback_core::acl::AllowList;
use dialback_core::proxy_protocol::{encode_v1, encode_v2, parse};

fn proxy_protocol(c: &mut Criterion) {
    let mut group = c.benchmark_group("proxy_protocol");
    group.throughput(Throughput::Elements(1));
    let pairs: [(&str, SocketAddr, SocketAddr); 2] = [
        (
            "ipv4",
            "203.0.113.77:51234".parse().unwrap(),
            "198.51.100.1:443".parse().unwrap(),
        ),
        (
            "ipv6",
            "[2001:db8:85a3::8a2e:370:7334]:51234".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        ),
    ];
    for (family, src, dst) in pairs {
        for (version, header) in [
            ("v1", encode_v1(Some(src), Some(dst))),
            ("v2", encode_v2(Some(src), Some(dst))),
        ] {
            // The header is followed by the client's first bytes, as on the wire.
            let mut wire = header.clone();
            wire.extend_from_slice(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
            group.bench_function(BenchmarkId::new(format!("parse_{version}"), family), |b| {
                b.iter(|| parse(black_box(&wire)).unwrap().unwrap())
            });
        }
        group.bench_function(BenchmarkId::new("encode_v1", family), |b| {
            b.iter(|| encode_v1(black_box(Some(src)), black_box(Some(dst))))
        });
        group.bench_function(BenchmarkId::new("encode_v2", family), |b| {
            b.iter(|| encode_v2(black_box(Some(src)), black_box(Some(dst))))
        });
    }
    let rules = AllowList::parse(&[
        "10.0.0.0/8",
        "51.254.",
        "192.0.2.7",
        "2001:db8::/32",
        "home.example.org",
    ])
    .unwrap();
    let resolved = |_: &str| vec!["198.51.100.4".parse::<IpAddr>().unwrap()];
    for (case, ip) in [
        ("first_rule", "10.1.2.3"),
        ("by_name", "198.51.100.4"),
        ("refused", "203.0.113.9"),
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        group.bench_function(BenchmarkId::new("allow_list", case), |b| {
            b.iter(|| rules.allows(black_box(ip), &resolved))
        });
    }
    group.finish();
}

criterion_group!(benches, proxy_protocol);
criterion_main!(benches);
