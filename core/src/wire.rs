//! Byte-level encoding of every message (`spec/protocol.md`, "Framing" and "Messages").
//!
//! Every connection to the gateway's `listen` port starts with a 6-byte preamble (inside TLS
//! when TLS is used), followed by frames `type:u8 | length:u16be | payload`. Payloads are at
//! most [`MAX_FRAME_PAYLOAD`] bytes, so a decoder never buffers more than one small frame.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::ErrorCode;

pub const MAGIC: [u8; 4] = *b"DLBK";
pub const VERSION: u8 = 1;
pub const PREAMBLE_LEN: usize = 6;
pub const FRAME_HEADER_LEN: usize = 3;
pub const MAX_FRAME_PAYLOAD: usize = 4096;
/// Service names travel as `str8`; config validation keeps them far below this.
pub const MAX_SERVICE_NAME: usize = 64;

/// What a connection to the gateway's `listen` port is for, announced in its preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    Control,
    Data,
}

impl ConnKind {
    fn to_u8(self) -> u8 {
        match self {
            ConnKind::Control => 1,
            ConnKind::Data => 2,
        }
    }
}

pub mod msg_type {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const HEARTBEAT: u8 = 0x03;
    pub const CONNECT: u8 = 0x04;
    pub const CONNECT_FAILED: u8 = 0x05;
    pub const ERROR: u8 = 0x06;
    pub const PREPARE: u8 = 0x07;
    pub const DATA_HELLO: u8 = 0x10;
    pub const DATA_ACCEPT: u8 = 0x11;
    pub const DATA_BIND: u8 = 0x12;
    /// Types from here up are extensions a receiver that does not know them ignores.
    pub const FIRST_IGNORABLE: u8 = 0x80;
}

/// Why bytes could not be decoded. Every variant is the peer's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a dialback connection (bad magic)")]
    BadMagic,
    #[error("unsupported protocol version {0} (this side speaks version {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown connection kind {0}")]
    BadKind(u8),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_PAYLOAD}-byte limit")]
    FrameTooLarge(usize),
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("malformed {msg}: {what}")]
    Malformed {
        msg: &'static str,
        what: &'static str,
    },
}

pub fn encode_preamble(kind: ConnKind) -> [u8; PREAMBLE_LEN] {
    [
        MAGIC[0],
        MAGIC[1],
        MAGIC[2],
        MAGIC[3],
        VERSION,
        kind.to_u8(),
    ]
}

/// Parses the preamble once [`PREAMBLE_LEN`] bytes are available; `Ok(None)` until then.
/// Rejects early: the first byte that cannot start a preamble is an error at once.
pub fn parse_preamble(buf: &[u8]) -> Result<Option<ConnKind>, WireError> {
    let magic_seen = buf.len().min(MAGIC.len());
    if buf[..magic_seen] != MAGIC[..magic_seen] {
        return Err(WireError::BadMagic);
    }
    let (Some(&version), Some(&kind)) = (buf.get(4), buf.get(5)) else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    match kind {
        1 => Ok(Some(ConnKind::Control)),
        2 => Ok(Some(ConnKind::Data)),
        k => Err(WireError::BadKind(k)),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub service: String,
    pub agent_nonce: [u8; 32],
    pub proof: [u8; 32],
    /// Free-form software name and version of the agent, for the gateway's logs.
    pub software: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub gateway_nonce: [u8; 32],
    pub proof: [u8; 32],
    pub session_id: u64,
    pub heartbeat_ms: u32,
    pub dead_after_ms: u32,
    pub flags: u8,
}

impl Welcome {
    pub const FLAG_DATA_TLS: u8 = 0x01;
    /// The agent starts every connection to its local service with a PROXY v1 header.
    pub const FLAG_SEND_PROXY_V1: u8 = 0x02;
    /// The same with a v2 header (wins over v1 if both are set).
    pub const FLAG_SEND_PROXY_V2: u8 = 0x04;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub request_id: u64,
    pub token: [u8; 32],
    /// The public client's address as the gateway saw it.
    pub client: Option<SocketAddr>,
    /// The gateway address the client connected to.
    pub public: Option<SocketAddr>,
}

/// Asks the agent for a data connection to keep ready in the gateway's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    pub request_id: u64,
    pub token: [u8; 32],
}

/// Binds a pooled data connection to a public client; payload follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataBind {
    pub client: Option<SocketAddr>,
    pub public: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailed {
    pub request_id: u64,
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataHello {
    pub service: String,
    pub session_id: u64,
    pub request_id: u64,
    pub token: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Heartbeat,
    Connect(Connect),
    ConnectFailed(ConnectFailed),
    Error(ErrorFrame),
    Prepare(Prepare),
    DataHello(DataHello),
    DataAccept,
    DataBind(DataBind),
    /// An extension type (>= 0x80) this side does not know; ignore it.
    Ignorable(u8),
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "HELLO",
            Message::Welcome(_) => "WELCOME",
            Message::Heartbeat => "HEARTBEAT",
            Message::Connect(_) => "CONNECT",
            Message::ConnectFailed(_) => "CONNECT_FAILED",
            Message::Error(_) => "ERROR",
            Message::Prepare(_) => "PREPARE",
            Message::DataHello(_) => "DATA_HELLO",
            Message::DataAccept => "DATA_ACCEPT",
            Message::DataBind(_) => "DATA_BIND",
            Message::Ignorable(_) => "extension",
        }
    }

    /// Appends this message as one frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0]);
        let ty = match self {
            Message::Hello(h) => {
                put_str8(out, &h.service);
                out.extend_from_slice(&h.agent_nonce);
                out.extend_from_slice(&h.proof);
                put_str8(out, &h.software);
                msg_type::HELLO
            }
            Message::Welcome(w) => {
                out.extend_from_slice(&w.gateway_nonce);
                out.extend_from_slice(&w.proof);
                out.extend_from_slice(&w.session_id.to_be_bytes());
                out.extend_from_slice(&w.heartbeat_ms.to_be_bytes());
                out.extend_from_slice(&w.dead_after_ms.to_be_bytes());
                out.push(w.flags);
                msg_type::WELCOME
            }
            Message::Heartbeat => msg_type::HEARTBEAT,
            Message::Connect(c) => {
                out.extend_from_slice(&c.request_id.to_be_bytes());
                out.extend_from_slice(&c.token);
                put_addr(out, c.client);
                put_addr(out, c.public);
                msg_type::CONNECT
            }
            Message::ConnectFailed(f) => {
                out.extend_from_slice(&f.request_id.to_be_bytes());
                out.extend_from_slice(&f.code.to_u16().to_be_bytes());
                put_str16(out, &f.message, MAX_FRAME_PAYLOAD - 12);
                msg_type::CONNECT_FAILED
            }
            Message::Error(e) => {
                out.extend_from_slice(&e.code.to_u16().to_be_bytes());
                put_str16(out, &e.message, MAX_FRAME_PAYLOAD - 4);
                msg_type::ERROR
            }
            Message::Prepare(p) => {
                out.extend_from_slice(&p.request_id.to_be_bytes());
                out.extend_from_slice(&p.token);
                msg_type::PREPARE
            }
            Message::DataHello(d) => {
                put_str8(out, &d.service);
                out.extend_from_slice(&d.session_id.to_be_bytes());
                out.extend_from_slice(&d.request_id.to_be_bytes());
                out.extend_from_slice(&d.token);
                msg_type::DATA_HELLO
            }
            Message::DataAccept => msg_type::DATA_ACCEPT,
            Message::DataBind(b) => {
                put_addr(out, b.client);
                put_addr(out, b.public);
                msg_type::DATA_BIND
            }
            Message::Ignorable(t) => *t,
        };
        let len = out.len() - start - FRAME_HEADER_LEN;
        // Every field above is bounded so that len <= MAX_FRAME_PAYLOAD < u16::MAX.
        let len = u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes();
        out[start] = ty;
        out[start + 1] = len[0];
        out[start + 2] = len[1];
    }

    pub fn to_frame(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.encode(&mut out);
        out
    }

    /// Decodes one frame's payload of type `ty`.
    pub fn decode(ty: u8, payload: &[u8]) -> Result<Message, WireError> {
        let mut r = Reader {
            buf: payload,
            msg: type_name(ty),
        };
        let m = match ty {
            msg_type::HELLO => Message::Hello(Hello {
                service: r.str8()?,
                agent_nonce: r.array()?,
                proof: r.array()?,
                software: r.str8()?,
            }),
            msg_type::WELCOME => Message::Welcome(Welcome {
                gateway_nonce: r.array()?,
                proof: r.array()?,
                session_id: r.u64()?,
                heartbeat_ms: r.u32()?,
                dead_after_ms: r.u32()?,
                flags: r.u8()?,
            }),
            msg_type::HEARTBEAT => Message::Heartbeat,
            msg_type::CONNECT => Message::Connect(Connect {
                request_id: r.u64()?,
                token: r.array()?,
                client: r.addr()?,
                public: r.addr()?,
            }),
            msg_type::CONNECT_FAILED => Message::ConnectFailed(ConnectFailed {
                request_id: r.u64()?,
                code: ErrorCode::from_u16(r.u16()?),
                message: r.str16()?,
            }),
            msg_type::ERROR => Message::Error(ErrorFrame {
                code: ErrorCode::from_u16(r.u16()?),
                message: r.str16()?,
            }),
            msg_type::PREPARE => Message::Prepare(Prepare {
                request_id: r.u64()?,
                token: r.array()?,
            }),
            msg_type::DATA_HELLO => Message::DataHello(DataHello {
                service: r.str8()?,
                session_id: r.u64()?,
                request_id: r.u64()?,
                token: r.array()?,
            }),
            msg_type::DATA_ACCEPT => Message::DataAccept,
            msg_type::DATA_BIND => Message::DataBind(DataBind {
                client: r.addr()?,
                public: r.addr()?,
            }),
            t if t >= msg_type::FIRST_IGNORABLE => return Ok(Message::Ignorable(t)),
            t => return Err(WireError::UnknownType(t)),
        };
        r.finish()?;
        Ok(m)
    }
}

fn type_name(ty: u8) -> &'static str {
    match ty {
        msg_type::HELLO => "HELLO",
        msg_type::WELCOME => "WELCOME",
        msg_type::HEARTBEAT => "HEARTBEAT",
        msg_type::CONNECT => "CONNECT",
        msg_type::CONNECT_FAILED => "CONNECT_FAILED",
        msg_type::ERROR => "ERROR",
        msg_type::PREPARE => "PREPARE",
        msg_type::DATA_HELLO => "DATA_HELLO",
        msg_type::DATA_ACCEPT => "DATA_ACCEPT",
        msg_type::DATA_BIND => "DATA_BIND",
        _ => "frame",
    }
}

/// Longest prefix of `s` that fits in `max` bytes without splitting a character.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Appends `s` as a `str8` (length byte, then at most 255 bytes cut at a character boundary).
/// The proofs hash names in this same encoding, so both must come from here.
pub(crate) fn put_str8(out: &mut Vec<u8>, s: &str) {
    let s = clip(s, usize::from(u8::MAX));
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn put_str16(out: &mut Vec<u8>, s: &str, room: usize) {
    let s = clip(s, room.saturating_sub(2));
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_addr(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr {
        None => out.push(0),
        Some(SocketAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    msg: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &'static str) -> WireError {
        WireError::Malformed {
            msg: self.msg,
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(self.err(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1, "truncated")?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, "truncated")?);
        Ok(a)
    }

    fn utf8(&self, b: &[u8]) -> Result<String, WireError> {
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| self.err("string is not UTF-8"))
    }

    fn str8(&mut self) -> Result<String, WireError> {
        let n = usize::from(self.u8()?);
        let b = self.take(n, "string runs past the end")?;
        self.utf8(b)
    }

    fn str16(&mut self) -> Result<String, WireError> {
        let n = usize::from(self.u16()?);
        let b = self.take(n, "string runs past the end")?;
        self.utf8(b)
    }

    fn addr(&mut self) -> Result<Option<SocketAddr>, WireError> {
        let ip = match self.u8()? {
            0 => return Ok(None),
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>()?)),
            _ => return Err(self.err("unknown address family")),
        };
        Ok(Some(SocketAddr::new(ip, self.u16()?)))
    }

    fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}

/// Reassembles frames from arbitrarily chunked input while holding at most one frame.
///
/// [`FrameDecoder::decode`] consumes from the front of `input` only the bytes of the frame it
/// returns, so bytes after the last frame (payload after DATA_ACCEPT, say) stay with the caller.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        FrameDecoder { buf: Vec::new() }
    }

    /// Bytes of a partial frame held back.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next whole frame, `Ok(None)` when `input` is used up without completing one.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Message>, WireError> {
        if self.buf.is_empty() {
            // Fast path: a whole frame in the input is decoded in place.
            if let Some((ty, len)) = header(input)? {
                if input.len() >= FRAME_HEADER_LEN + len {
                    let payload = &input[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
                    let m = Message::decode(ty, payload)?;
                    *input = &input[FRAME_HEADER_LEN + len..];
                    return Ok(Some(m));
                }
            }
        }
        if self.buf.len() < FRAME_HEADER_LEN {
            let n = (FRAME_HEADER_LEN - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..n]);
            *input = &input[n..];
        }
        let Some((ty, len)) = header(&self.buf)? else {
            return Ok(None);
        };
        let want = FRAME_HEADER_LEN + len - self.buf.len();
        let n = want.min(input.len());
        self.buf.extend_from_slice(&input[..n]);
        *input = &input[n..];
        if self.buf.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        let m = Message::decode(ty, &self.buf[FRAME_HEADER_LEN..]);
        self.buf.clear();
        m.map(Some)
    }
}

fn header(b: &[u8]) -> Result<Option<(u8, usize)>, WireError> {
    let (Some(&ty), Some(&hi), Some(&lo)) = (b.first(), b.get(1), b.get(2)) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_FRAME_PAYLOAD {
        return Err(WireError::FrameTooLarge(len));
    }
    Ok(Some((ty, len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                service: "srvBACK".into(),
                agent_nonce: [1; 32],
                proof: [2; 32],
                software: "dialback 0.1.0".into(),
            }),
            Message::Welcome(Welcome {
                gateway_nonce: [3; 32],
                proof: [4; 32],
                session_id: 0x0102030405060708,
                heartbeat_ms: 20_000,
                dead_after_ms: 60_000,
                flags: Welcome::FLAG_DATA_TLS,
            }),
            Message::Heartbeat,
            Message::Connect(Connect {
                request_id: 42,
                token: [5; 32],
                client: Some("203.0.113.7:51000".parse().unwrap()),
                public: Some("[2001:db8::1]:443".parse().unwrap()),
            }),
            Message::Connect(Connect {
                request_id: 1,
                token: [0; 32],
                client: None,
                public: None,
            }),
            Message::ConnectFailed(ConnectFailed {
                request_id: 7,
                code: ErrorCode::LocalUnreachable,
                message: "connection refused".into(),
            }),
            Message::Error(ErrorFrame {
                code: ErrorCode::AuthFailed,
                message: "nope".into(),
            }),
            Message::DataHello(DataHello {
                service: "web".into(),
                session_id: 9,
                request_id: 10,
                token: [6; 32],
            }),
            Message::DataAccept,
            Message::Prepare(Prepare {
                request_id: 11,
                token: [7; 32],
            }),
            Message::DataBind(DataBind {
                client: Some("198.51.100.4:40000".parse().unwrap()),
                public: None,
            }),
        ]
    }

    #[test]
    fn round_trip_samples() {
        for m in samples() {
            let f = m.to_frame();
            let mut input = &f[..];
            let got = FrameDecoder::new().decode(&mut input).unwrap().unwrap();
            assert_eq!(got, m);
            assert!(input.is_empty());
        }
    }

    #[test]
    fn leftover_bytes_stay_with_caller() {
        let mut f = Message::DataAccept.to_frame();
        f.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut input = &f[..];
        assert_eq!(
            FrameDecoder::new().decode(&mut input).unwrap(),
            Some(Message::DataAccept)
        );
        assert_eq!(input, b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn rejects_oversized_and_unknown_and_trailing() {
        let mut d = FrameDecoder::new();
        let mut input: &[u8] = &[msg_type::HELLO, 0x10, 0x01];
        assert_eq!(d.decode(&mut input), Err(WireError::FrameTooLarge(4097)));
        let mut input: &[u8] = &[0x42, 0, 0];
        assert_eq!(
            FrameDecoder::new().decode(&mut input),
            Err(WireError::UnknownType(0x42))
        );
        let mut input: &[u8] = &[0x90, 0, 1, 0xff];
        assert_eq!(
            FrameDecoder::new().decode(&mut input),
            Ok(Some(Message::Ignorable(0x90)))
        );
        let mut input: &[u8] = &[msg_type::HEARTBEAT, 0, 1, 0];
        assert!(matches!(
            FrameDecoder::new().decode(&mut input),
            Err(WireError::Malformed {
                what: "trailing bytes",
                ..
            })
        ));
        let mut input: &[u8] = &[msg_type::ERROR, 0, 4, 0, 1, 0, 9];
        assert!(matches!(
            FrameDecoder::new().decode(&mut input),
            Err(WireError::Malformed { .. })
        ));
    }

    #[test]
    fn preamble() {
        assert_eq!(parse_preamble(b"DL"), Ok(None));
        assert_eq!(
            parse_preamble(&encode_preamble(ConnKind::Data)),
            Ok(Some(ConnKind::Data))
        );
        assert_eq!(parse_preamble(b"GET / "), Err(WireError::BadMagic));
        assert_eq!(parse_preamble(b"X"), Err(WireError::BadMagic));
        assert_eq!(
            parse_preamble(b"DLBK\x02\x01"),
            Err(WireError::UnsupportedVersion(2))
        );
        assert_eq!(parse_preamble(b"DLBK\x01\x07"), Err(WireError::BadKind(7)));
    }

    #[test]
    fn long_strings_are_clipped_not_overflowing() {
        let m = Message::Error(ErrorFrame {
            code: ErrorCode::Internal,
            message: "é".repeat(5000),
        });
        let f = m.to_frame();
        assert!(f.len() <= FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD);
        let mut input = &f[..];
        let Message::Error(e) = FrameDecoder::new().decode(&mut input).unwrap().unwrap() else {
            panic!("not an error frame")
        };
        assert!(e.message.len() <= MAX_FRAME_PAYLOAD - 4);
    }

    proptest! {
        #[test]
        fn chunked_decode_matches(split in proptest::collection::vec(1usize..40, 1..50)) {
            let mut stream = Vec::new();
            for m in samples() { m.encode(&mut stream); }
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            let mut rest = &stream[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = split[i % split.len()].min(rest.len());
                i += 1;
                let mut chunk = &rest[..n];
                while let Some(m) = d.decode(&mut chunk).unwrap() { got.push(m); }
                prop_assert!(chunk.is_empty());
                rest = &rest[n..];
            }
            prop_assert_eq!(got, samples());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut d = FrameDecoder::new();
            let mut input = &bytes[..];
            while let Ok(Some(_)) = d.decode(&mut input) {}
            let _ = parse_preamble(&bytes);
        }

        #[test]
        fn connect_round_trip(id in any::<u64>(), token in any::<[u8; 32]>(), port in any::<u16>(), ip in any::<[u8; 16]>()) {
            let m = Message::Connect(Connect {
                request_id: id, token,
                client: Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
                public: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])), port)),
            });
            let f = m.to_frame();
            let mut input = &f[..];
            prop_assert_eq!(FrameDecoder::new().decode(&mut input).unwrap(), Some(m));
        }
    }
}
