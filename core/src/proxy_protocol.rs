//! The PROXY protocol, versions 1 (text) and 2 (binary), as written by HAProxy, nginx and
//! cloud balancers: a header in front of a TCP stream that says who the real client is.
//!
//! [`parse`] is stateless and bounded: it looks at the bytes received so far and says either
//! "need more", "here is the header and it is `consumed` bytes long", or why the bytes are not
//! a header. It never asks for more than [`MAX_HEADER`] bytes, so a runtime can peek, decide,
//! and then consume exactly the header, leaving whatever follows (a TLS hello, a DIALBACK
//! preamble, client payload) untouched in the socket.
//!
//! [`encode_v1`] and [`encode_v2`] write the header the agent prepends toward a local service.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str;

/// Longest v1 line, CRLF included (the spec's own bound: "PROXY UNKNOWN" with two IPv6
/// addresses and ports).
pub const MAX_V1: usize = 107;
/// The fixed part of a v2 header.
pub const V2_FIXED: usize = 16;
/// Largest v2 address block (addresses plus TLVs) accepted. Balancers add a few TLVs (AWS
/// VPC endpoint ids, GCP PSC ids, SSL details) that fit well within this; anything larger is
/// refused rather than buffered.
pub const MAX_V2_BLOCK: usize = 2048;
/// The most bytes [`parse`] ever needs to decide.
pub const MAX_HEADER: usize = V2_FIXED + MAX_V2_BLOCK;

pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";

const V2_VERSION: u8 = 0x20;
const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;
const FAM_UNSPEC: u8 = 0x0;
const FAM_INET: u8 = 0x1;
const FAM_INET6: u8 = 0x2;
const FAM_UNIX: u8 = 0x3;
const PROTO_UNSPEC: u8 = 0x0;
const PROTO_STREAM: u8 = 0x1;
const PROTO_DGRAM: u8 = 0x2;
const INET_BLOCK: usize = 12;
const INET6_BLOCK: usize = 36;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What a header says about the connection it precedes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The balancer's own connection (a health check, v2 LOCAL): use the socket's addresses.
    Local,
    /// A relayed connection whose addresses the sender did not give (v1 UNKNOWN; v2 UNSPEC,
    /// UNIX or datagram families): use the socket's addresses.
    Unknown,
    /// A relayed TCP connection from `source` to `destination`.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
}

impl ProxyHeader {
    /// The real client, when the header names one.
    pub fn source(&self) -> Option<SocketAddr> {
        match self {
            ProxyHeader::Proxied { source, .. } => Some(*source),
            _ => None,
        }
    }
}

/// A complete header at the start of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub version: Version,
    pub header: ProxyHeader,
    /// Length of the header in bytes; what follows belongs to the stream.
    pub consumed: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("expected a PROXY protocol header, got {0}")]
    NotProxy(String),
    #[error("PROXY v1 line longer than {MAX_V1} bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 line: {0}")]
    V1Malformed(&'static str),
    #[error("unsupported PROXY v2 version/command byte 0x{0:02x}")]
    V2Command(u8),
    #[error("unsupported PROXY v2 address family/protocol byte 0x{0:02x}")]
    V2Family(u8),
    #[error("PROXY v2 address block of {0} bytes exceeds the limit of {MAX_V2_BLOCK}")]
    V2TooLong(usize),
    #[error("PROXY v2 address block of {len} bytes is too short for its family (needs {need})")]
    V2Short { len: usize, need: usize },
    #[error("PROXY v2 TLV at offset {0} runs past the end of the header")]
    V2BadTlv(usize),
}

/// Looks for a PROXY header at the start of `buf`. `Ok(None)`: every byte so far fits a header
/// and more are needed. Decides as soon as the bytes allow: garbage fails on its first bytes,
/// and an oversized v2 header fails on its length field.
pub fn parse(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first == V2_SIGNATURE[0] {
        parse_v2(buf)
    } else if first == V1_PREFIX[0] {
        parse_v1(buf)
    } else {
        Err(not_proxy(buf))
    }
}

fn not_proxy(buf: &[u8]) -> ProxyError {
    let shown = &buf[..buf.len().min(8)];
    let mut hex = String::with_capacity(shown.len() * 3);
    for b in shown {
        if !hex.is_empty() {
            hex.push(' ');
        }
        hex.push_str(&format!("{b:02x}"));
    }
    let what = if shown.first() == Some(&0x16) {
        "a TLS hello"
    } else {
        "other bytes"
    };
    ProxyError::NotProxy(format!("{what} ({hex})"))
}

fn parse_v1(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(not_proxy(buf));
    }
    let window = &buf[..buf.len().min(MAX_V1)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        if window.len() >= MAX_V1 {
            return Err(ProxyError::V1TooLong);
        }
        if window
            .iter()
            .any(|&b| b != b'\r' && !(0x20..0x7f).contains(&b))
        {
            return Err(ProxyError::V1Malformed("non-printable byte"));
        }
        return Ok(None);
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(ProxyError::V1Malformed("line must end with CRLF"));
    }
    let line = str::from_utf8(&window[V1_PREFIX.len()..lf - 1])
        .map_err(|_| ProxyError::V1Malformed("non-ASCII byte"))?;
    if line.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
        return Err(ProxyError::V1Malformed("non-printable byte"));
    }
    let mut fields = line.split(' ');
    let header = match fields.next() {
        // The sender may append anything after UNKNOWN; the receiver ignores it.
        Some("UNKNOWN") => ProxyHeader::Unknown,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let v6 = proto == "TCP6";
            let mut next = |what| fields.next().ok_or(ProxyError::V1Malformed(what));
            let src = v1_ip(next("missing source address")?, v6)?;
            let dst = v1_ip(next("missing destination address")?, v6)?;
            let sport = v1_port(next("missing source port")?)?;
            let dport = v1_port(next("missing destination port")?)?;
            if fields.next().is_some() {
                return Err(ProxyError::V1Malformed("trailing fields"));
            }
            ProxyHeader::Proxied {
                source: SocketAddr::new(src, sport),
                destination: SocketAddr::new(dst, dport),
            }
        }
        _ => {
            return Err(ProxyError::V1Malformed(
                "protocol must be TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    Ok(Some(Parsed {
        version: Version::V1,
        header,
        consumed: lf + 1,
    }))
}

fn v1_ip(text: &str, v6: bool) -> Result<IpAddr, ProxyError> {
    if v6 {
        text.parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| ProxyError::V1Malformed("bad IPv6 address"))
    } else {
        text.parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .map_err(|_| ProxyError::V1Malformed("bad IPv4 address"))
    }
}

fn v1_port(text: &str) -> Result<u16, ProxyError> {
    let digits_only =
        !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    let no_leading_zero = text == "0" || !text.starts_with('0');
    if !(digits_only && no_leading_zero) {
        return Err(ProxyError::V1Malformed("bad port"));
    }
    text.parse::<u16>()
        .map_err(|_| ProxyError::V1Malformed("port out of range"))
}

fn parse_v2(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(not_proxy(buf));
    }
    if buf.len() < V2_FIXED {
        // Check what has arrived of the fixed part, so bad bytes fail without waiting.
        if let Some(&vc) = buf.get(12) {
            check_command(vc)?;
        }
        return Ok(None);
    }
    let (vc, fam) = (buf[12], buf[13]);
    let cmd = check_command(vc)?;
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_V2_BLOCK {
        return Err(ProxyError::V2TooLong(len));
    }
    let total = V2_FIXED + len;
    if cmd == CMD_LOCAL {
        // The sender's own connection: the spec has the receiver discard the whole block,
        // family included, and use the socket's addresses.
        if buf.len() < total {
            return Ok(None);
        }
        return Ok(Some(Parsed {
            version: Version::V2,
            header: ProxyHeader::Local,
            consumed: total,
        }));
    }
    let family = fam >> 4;
    let proto = fam & 0x0f;
    if family > FAM_UNIX || proto > PROTO_DGRAM {
        return Err(ProxyError::V2Family(fam));
    }
    let need = match (family, proto) {
        (FAM_INET, PROTO_STREAM) => INET_BLOCK,
        (FAM_INET6, PROTO_STREAM) => INET6_BLOCK,
        _ => 0,
    };
    if len < need {
        return Err(ProxyError::V2Short { len, need });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let block = &buf[V2_FIXED..total];
    // TLVs are checked where addresses are used; a block without usable addresses (UNSPEC,
    // UNIX, datagrams) is discarded whole.
    if need > 0 {
        check_tlvs(&block[need..], V2_FIXED + need)?;
    }
    let header = {
        match (family, proto) {
            (FAM_INET, PROTO_STREAM) => {
                let ip =
                    |o: usize| Ipv4Addr::new(block[o], block[o + 1], block[o + 2], block[o + 3]);
                let port = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
                ProxyHeader::Proxied {
                    source: SocketAddr::new(IpAddr::V4(ip(0)), port(8)),
                    destination: SocketAddr::new(IpAddr::V4(ip(4)), port(10)),
                }
            }
            (FAM_INET6, PROTO_STREAM) => {
                let ip = |o: usize| {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&block[o..o + 16]);
                    Ipv6Addr::from(a)
                };
                let port = |o: usize| u16::from_be_bytes([block[o], block[o + 1]]);
                ProxyHeader::Proxied {
                    source: SocketAddr::new(IpAddr::V6(ip(0)), port(32)),
                    destination: SocketAddr::new(IpAddr::V6(ip(16)), port(34)),
                }
            }
            // UNSPEC, UNIX sockets, or datagrams on a stream listener: no usable address.
            (FAM_UNSPEC | FAM_UNIX, _) | (_, PROTO_UNSPEC | PROTO_DGRAM) => ProxyHeader::Unknown,
            _ => return Err(ProxyError::V2Family(fam)),
        }
    };
    Ok(Some(Parsed {
        version: Version::V2,
        header,
        consumed: total,
    }))
}

fn check_command(vc: u8) -> Result<u8, ProxyError> {
    let cmd = vc & 0x0f;
    if vc & 0xf0 != V2_VERSION || (cmd != CMD_LOCAL && cmd != CMD_PROXY) {
        return Err(ProxyError::V2Command(vc));
    }
    Ok(cmd)
}

/// TLVs are not interpreted, but they must tile the rest of the block exactly.
fn check_tlvs(mut tlvs: &[u8], mut offset: usize) -> Result<(), ProxyError> {
    while !tlvs.is_empty() {
        if tlvs.len() < 3 {
            return Err(ProxyError::V2BadTlv(offset));
        }
        let len = 3 + usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]]));
        if tlvs.len() < len {
            return Err(ProxyError::V2BadTlv(offset));
        }
        tlvs = &tlvs[len..];
        offset += len;
    }
    Ok(())
}

/// Both addresses in one family: an IPv4 address next to an IPv6 one is written IPv4-mapped.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (src, dst),
        _ => (v6(src), v6(dst)),
    }
}

/// A v1 line for a connection from `source` to `destination`; `UNKNOWN` when either is not
/// known.
pub fn encode_v1(source: Option<SocketAddr>, destination: Option<SocketAddr>) -> Vec<u8> {
    let (Some(src), Some(dst)) = (source, destination) else {
        return b"PROXY UNKNOWN\r\n".to_vec();
    };
    let (src, dst) = same_family(src, dst);
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A v2 header for a connection from `source` to `destination`, without TLVs; a PROXY command
/// with the UNSPEC family when either is not known.
pub fn encode_v2(source: Option<SocketAddr>, destination: Option<SocketAddr>) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED + INET6_BLOCK);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_VERSION | CMD_PROXY);
    let (Some(src), Some(dst)) = (source, destination) else {
        out.extend_from_slice(&[(FAM_UNSPEC << 4) | PROTO_UNSPEC, 0, 0]);
        return out;
    };
    match same_family(src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push((FAM_INET << 4) | PROTO_STREAM);
            out.extend_from_slice(&(INET_BLOCK as u16).to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V6(ip) => ip.octets(),
                IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
            };
            out.push((FAM_INET6 << 4) | PROTO_STREAM);
            out.extend_from_slice(&(INET6_BLOCK as u16).to_be_bytes());
            out.extend_from_slice(&v6(s));
            out.extend_from_slice(&v6(d));
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

/// A v2 LOCAL header: the sender's own connection, no client behind it.
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[V2_VERSION | CMD_LOCAL, 0, 0, 0]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn full(buf: &[u8]) -> Parsed {
        parse(buf).unwrap().unwrap()
    }

    #[test]
    fn v1_spec_examples() {
        let p = full(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n");
        assert_eq!(p.version, Version::V1);
        assert_eq!(p.consumed, 47);
        assert_eq!(
            p.header,
            ProxyHeader::Proxied {
                source: sa("192.168.0.1:56324"),
                destination: sa("192.168.0.11:443")
            }
        );
        let p = full(b"PROXY TCP6 ffff:f::ffff ::1 65535 1\r\n");
        assert_eq!(p.header.source(), Some(sa("[ffff:f::ffff]:65535")));
        assert_eq!(full(b"PROXY UNKNOWN\r\n").header, ProxyHeader::Unknown);
        let p = full(b"PROXY UNKNOWN ffff:f::ffff ::1 65535 1\r\nrest");
        assert_eq!((p.header, p.consumed), (ProxyHeader::Unknown, 40));
    }

    #[test]
    fn v1_longest_line_fits() {
        let line = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(line.len(), MAX_V1);
        assert_eq!(full(line).consumed, MAX_V1);
        let mut longer = line[..MAX_V1 - 2].to_vec();
        longer.extend_from_slice(b"5\r\n");
        assert_eq!(parse(&longer), Err(ProxyError::V1TooLong));
    }

    #[test]
    fn v1_needs_more_until_crlf() {
        let line = b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 2000\r\n";
        for n in 0..line.len() {
            assert_eq!(parse(&line[..n]), Ok(None), "{n} bytes");
        }
        assert!(parse(line).unwrap().is_some());
    }

    #[test]
    fn v1_rejects() {
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 2000\n",
            b"PROXY TCP4 10.0.0.1 10.0.0.2 1000\r\n",
            b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 2000 3\r\n",
            b"PROXY TCP4 10.0.0.1  10.0.0.2 1000 2000\r\n",
            b"PROXY TCP4 ::1 ::1 1000 2000\r\n",
            b"PROXY TCP6 10.0.0.1 10.0.0.2 1000 2000\r\n",
            b"PROXY TCP4 10.0.0.1 10.0.0.2 65536 2000\r\n",
            b"PROXY TCP4 10.0.0.1 10.0.0.2 01 2000\r\n",
            b"PROXY TCP4 10.0.0.1 10.0.0.2 -1 2000\r\n",
            b"PROXY TCP4 010.0.0.1 10.0.0.2 1 2000\r\n",
            b"PROXY UDP4 10.0.0.1 10.0.0.2 1 2\r\n",
            b"PROXY TCP4 10.0.0.1 10.0.0.2 1\x00 2\r\n",
            b"PROXY\r\n",
            b"PROXX TCP4",
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01\x02\x00",
        ];
        for b in bad {
            assert!(
                parse(b).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(b)
            );
        }
        // Garbage is refused on its first bytes, without waiting for more.
        assert!(parse(b"PX").is_err());
        assert!(matches!(parse(b"\x16"), Err(ProxyError::NotProxy(m)) if m.contains("TLS")));
    }

    fn v2(cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(cmd);
        b.push(fam);
        b.extend_from_slice(&(block.len() as u16).to_be_bytes());
        b.extend_from_slice(block);
        b
    }

    #[test]
    fn v2_tcp4_with_tlvs() {
        let mut block = vec![10, 0, 0, 1, 10, 0, 0, 2, 0x04, 0xd2, 0x01, 0xbb];
        block.extend_from_slice(&[0x04, 0x00, 0x02, 0, 0]); // NOOP padding
        block.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']); // ALPN
        let mut b = v2(0x21, 0x11, &block);
        b.extend_from_slice(b"payload");
        let p = full(&b);
        assert_eq!(p.version, Version::V2);
        assert_eq!(p.consumed, b.len() - 7);
        assert_eq!(
            p.header,
            ProxyHeader::Proxied {
                source: sa("10.0.0.1:1234"),
                destination: sa("10.0.0.2:443")
            }
        );
        for n in 0..p.consumed {
            assert_eq!(parse(&b[..n]), Ok(None), "{n} bytes");
        }
    }

    #[test]
    fn v2_tcp6_local_unspec_unix() {
        let mut block = [0u8; 36];
        block[15] = 1;
        block[31] = 2;
        block[32..34].copy_from_slice(&80u16.to_be_bytes());
        block[34..36].copy_from_slice(&81u16.to_be_bytes());
        assert_eq!(
            full(&v2(0x21, 0x21, &block)).header.source(),
            Some(sa("[::1]:80"))
        );
        assert_eq!(full(&v2(0x20, 0x00, &[])).header, ProxyHeader::Local);
        // LOCAL with addresses (HAProxy health checks may send them): ignored.
        assert_eq!(full(&v2(0x20, 0x11, &[0; 12])).header, ProxyHeader::Local);
        // LOCAL discards the block whatever its family says, even one too short for it.
        assert_eq!(full(&v2(0x20, 0x41, &[1, 2, 3])).header, ProxyHeader::Local);
        assert_eq!(full(&v2(0x20, 0x21, &[])).header, ProxyHeader::Local);
        // Without usable addresses the block is discarded too, TLV-shaped or not.
        assert_eq!(full(&v2(0x21, 0x00, &[9, 9])).header, ProxyHeader::Unknown);
        assert_eq!(full(&v2(0x21, 0x00, &[])).header, ProxyHeader::Unknown);
        assert_eq!(
            full(&v2(0x21, 0x31, &[0; 216])).header,
            ProxyHeader::Unknown
        );
        assert_eq!(full(&v2(0x21, 0x12, &[0; 12])).header, ProxyHeader::Unknown);
        assert_eq!(full(&encode_v2_local()).header, ProxyHeader::Local);
    }

    #[test]
    fn v2_rejects() {
        assert_eq!(
            parse(&v2(0x11, 0x11, &[0; 12])),
            Err(ProxyError::V2Command(0x11))
        );
        assert_eq!(
            parse(&v2(0x22, 0x11, &[0; 12])),
            Err(ProxyError::V2Command(0x22))
        );
        // A bad command fails before the rest of the fixed part arrives.
        assert!(parse(&v2(0x22, 0x11, &[])[..13]).is_err());
        assert_eq!(
            parse(&v2(0x21, 0x41, &[0; 12])),
            Err(ProxyError::V2Family(0x41))
        );
        assert_eq!(
            parse(&v2(0x21, 0x13, &[0; 12])),
            Err(ProxyError::V2Family(0x13))
        );
        assert_eq!(
            parse(&v2(0x21, 0x11, &[0; 8])),
            Err(ProxyError::V2Short { len: 8, need: 12 })
        );
        assert_eq!(
            parse(&v2(0x21, 0x11, &[0; 14])),
            Err(ProxyError::V2BadTlv(28))
        );
        let mut bad_tlv = vec![0; 12];
        bad_tlv.extend_from_slice(&[0x01, 0x00, 0x09, 1]);
        assert_eq!(
            parse(&v2(0x21, 0x11, &bad_tlv)),
            Err(ProxyError::V2BadTlv(28))
        );
        // Oversized: refused on the length field alone, without reading the block.
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(ProxyError::V2TooLong(65535)));
        assert!(parse(b"\r\n\r\n\0\r\nQUIX").is_err());
        assert_eq!(parse(&V2_SIGNATURE[..5]), Ok(None));
    }

    #[test]
    fn encodings() {
        assert_eq!(
            encode_v1(Some(sa("192.168.0.1:56324")), Some(sa("192.168.0.11:443"))),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        assert_eq!(encode_v1(None, Some(sa("1.2.3.4:5"))), b"PROXY UNKNOWN\r\n");
        assert_eq!(
            encode_v1(Some(sa("1.2.3.4:5")), Some(sa("[::1]:6"))),
            b"PROXY TCP6 ::ffff:1.2.3.4 ::1 5 6\r\n"
        );
        let v2b = encode_v2(Some(sa("10.0.0.1:1234")), Some(sa("10.0.0.2:443")));
        assert_eq!(
            v2b,
            [
                &V2_SIGNATURE[..],
                &[0x21, 0x11, 0, 12, 10, 0, 0, 1, 10, 0, 0, 2, 0x04, 0xd2, 0x01, 0xbb]
            ]
            .concat()
        );
        assert_eq!(full(&encode_v2(None, None)).header, ProxyHeader::Unknown);
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(ip.into()), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(ip.into()), p)),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(src in addr(), dst in addr(), tail in proptest::collection::vec(any::<u8>(), 0..32)) {
            let (s, d) = same_family(src, dst);
            for (enc, version) in [(encode_v1(Some(src), Some(dst)), Version::V1), (encode_v2(Some(src), Some(dst)), Version::V2)] {
                prop_assert!(enc.len() <= MAX_HEADER);
                let mut buf = enc.clone();
                buf.extend_from_slice(&tail);
                let p = parse(&buf).unwrap().unwrap();
                prop_assert_eq!(p.version, version);
                prop_assert_eq!(p.consumed, enc.len());
                prop_assert_eq!(p.header, ProxyHeader::Proxied { source: s, destination: d });
            }
        }

        #[test]
        fn never_panics_and_consumes_within_bounds(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some(p)) = parse(&buf) {
                prop_assert!(p.consumed <= buf.len() && p.consumed <= MAX_HEADER);
            }
        }
    }
}
