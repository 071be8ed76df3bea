//! The first bytes of every connection to the gateway's `listen` port, and the data-channel
//! handshake (`spec/protocol.md`, "Connection preamble" and "Data channel").

use crate::error::ErrorCode;
use std::net::SocketAddr;

use crate::wire::{
    encode_preamble, parse_preamble, ConnKind, DataBind, DataHello, ErrorFrame, FrameDecoder,
    Message, WireError, PREAMBLE_LEN,
};

/// What a new connection turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// A control connection; the remaining input belongs to its frame stream.
    Control,
    /// A data connection and its hello, ready for [`crate::gateway::Gateway::handle_data_hello`].
    Data(DataHello),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("control connections must use TLS")]
    ControlWithoutTls,
    #[error("data connection sent {0} instead of DATA_HELLO")]
    Unexpected(&'static str),
}

impl IntakeError {
    /// The code to send back in an ERROR frame, if the peer could understand one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            IntakeError::Wire(WireError::BadMagic) => None,
            IntakeError::Wire(WireError::UnsupportedVersion(_)) => {
                Some(ErrorCode::UnsupportedVersion)
            }
            IntakeError::Wire(_) => Some(ErrorCode::Malformed),
            IntakeError::ControlWithoutTls => Some(ErrorCode::UnexpectedMessage),
            IntakeError::Unexpected(_) => Some(ErrorCode::UnexpectedMessage),
        }
    }
}

/// Classifies a new connection from its first bytes (after TLS, if any). Holds at most one
/// preamble and one frame, so a connection that sends garbage costs a few bytes of memory.
#[derive(Debug)]
pub struct Intake {
    tls: bool,
    preamble: [u8; PREAMBLE_LEN],
    have: usize,
    kind: Option<ConnKind>,
    frames: FrameDecoder,
}

impl Intake {
    pub fn new(tls: bool) -> Self {
        Intake {
            tls,
            preamble: [0; PREAMBLE_LEN],
            have: 0,
            kind: None,
            frames: FrameDecoder::new(),
        }
    }

    /// Consumes from `input` what belongs to the preamble (and, for data connections, the
    /// hello). Bytes after that stay in `input`.
    pub fn handle_input(&mut self, input: &mut &[u8]) -> Result<Option<Classified>, IntakeError> {
        if self.kind.is_none() {
            let n = (PREAMBLE_LEN - self.have).min(input.len());
            self.preamble[self.have..self.have + n].copy_from_slice(&input[..n]);
            self.have += n;
            *input = &input[n..];
            match parse_preamble(&self.preamble[..self.have])? {
                None => return Ok(None),
                Some(ConnKind::Control) if !self.tls => return Err(IntakeError::ControlWithoutTls),
                Some(ConnKind::Control) => return Ok(Some(Classified::Control)),
                Some(ConnKind::Data) => self.kind = Some(ConnKind::Data),
            }
        }
        match self.frames.decode(input)? {
            None => Ok(None),
            Some(Message::DataHello(h)) => Ok(Some(Classified::Data(h))),
            Some(m) => Err(IntakeError::Unexpected(m.name())),
        }
    }
}

/// Bytes an agent writes first on a new data connection.
pub fn encode_data_hello(hello: &DataHello) -> Vec<u8> {
    let mut out = encode_preamble(ConnKind::Data).to_vec();
    Message::DataHello(hello.clone()).encode(&mut out);
    out
}

/// The gateway's answer to a valid DATA_HELLO; payload follows directly.
pub fn encode_accept() -> Vec<u8> {
    Message::DataAccept.to_frame()
}

/// An ERROR frame for a refused connection.
pub fn encode_error(code: ErrorCode, message: &str) -> Vec<u8> {
    Message::Error(ErrorFrame {
        code,
        message: message.to_owned(),
    })
    .to_frame()
}

/// A DATA_BIND frame: hands a pooled data connection to a public client. Payload follows.
pub fn encode_bind(client: Option<SocketAddr>, public: Option<SocketAddr>) -> Vec<u8> {
    Message::DataBind(DataBind { client, public }).to_frame()
}

/// What the gateway said on a data connection: payload follows either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataAnswer {
    /// DATA_ACCEPT: paired with the client this connection was requested for.
    Accept,
    /// DATA_BIND: a pooled connection is now bound to this client.
    Bind(DataBind),
}

/// The gateway's answer as the agent reads it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataAnswerError {
    #[error("gateway refused the data connection: {code}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("gateway sent {0} instead of DATA_ACCEPT or DATA_BIND")]
    Unexpected(&'static str),
}

/// Reads the gateway's DATA_ACCEPT or DATA_BIND (or ERROR) on a data connection. Bytes after it
/// are the public client's first payload and stay in `input` for the caller to forward.
#[derive(Debug, Default)]
pub struct AnswerDecoder {
    frames: FrameDecoder,
}

impl AnswerDecoder {
    pub fn new() -> Self {
        AnswerDecoder::default()
    }

    pub fn handle_input(
        &mut self,
        input: &mut &[u8],
    ) -> Result<Option<DataAnswer>, DataAnswerError> {
        match self.frames.decode(input)? {
            None => Ok(None),
            Some(Message::DataAccept) => Ok(Some(DataAnswer::Accept)),
            Some(Message::DataBind(b)) => Ok(Some(DataAnswer::Bind(b))),
            Some(Message::Error(e)) => Err(DataAnswerError::Refused {
                code: e.code,
                message: e.message,
            }),
            Some(m) => Err(DataAnswerError::Unexpected(m.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> DataHello {
        DataHello {
            service: "web".into(),
            session_id: 1,
            request_id: 2,
            token: [3; 32],
        }
    }

    #[test]
    fn classifies_byte_by_byte() {
        let bytes = encode_data_hello(&hello());
        let mut intake = Intake::new(false);
        let mut got = None;
        for b in &bytes {
            let mut one = std::slice::from_ref(b);
            if let Some(c) = intake.handle_input(&mut one).unwrap() {
                got = Some(c);
            }
            assert!(one.is_empty());
        }
        assert_eq!(got, Some(Classified::Data(hello())));
    }

    #[test]
    fn control_requires_tls_and_leaves_frames() {
        let mut bytes = encode_preamble(ConnKind::Control).to_vec();
        bytes.extend_from_slice(&Message::Heartbeat.to_frame());
        let mut input = &bytes[..];
        assert_eq!(
            Intake::new(false).handle_input(&mut input),
            Err(IntakeError::ControlWithoutTls)
        );
        let mut input = &bytes[..];
        assert_eq!(
            Intake::new(true).handle_input(&mut input),
            Ok(Some(Classified::Control))
        );
        assert_eq!(input, &Message::Heartbeat.to_frame()[..]);
    }

    #[test]
    fn garbage_is_refused_at_first_byte() {
        let mut input: &[u8] = b"GET / HTTP/1.1\r\n";
        let e = Intake::new(false).handle_input(&mut input).unwrap_err();
        assert_eq!(e, IntakeError::Wire(WireError::BadMagic));
        assert_eq!(e.code(), None);
    }

    #[test]
    fn answer_keeps_client_bytes() {
        let mut bytes = encode_accept();
        bytes.extend_from_slice(b"hello");
        let mut input = &bytes[..];
        assert_eq!(
            AnswerDecoder::new().handle_input(&mut input),
            Ok(Some(DataAnswer::Accept))
        );
        assert_eq!(input, b"hello");
        let client = Some("192.0.2.1:5000".parse().unwrap());
        let mut bytes = encode_bind(client, None);
        bytes.extend_from_slice(b"GET");
        let mut input = &bytes[..];
        assert_eq!(
            AnswerDecoder::new().handle_input(&mut input),
            Ok(Some(DataAnswer::Bind(DataBind {
                client,
                public: None
            })))
        );
        assert_eq!(input, b"GET");
        let e = encode_error(ErrorCode::TokenInvalid, "bad token");
        let mut input = &e[..];
        assert!(matches!(
            AnswerDecoder::new().handle_input(&mut input),
            Err(DataAnswerError::Refused {
                code: ErrorCode::TokenInvalid,
                ..
            })
        ));
    }
}
