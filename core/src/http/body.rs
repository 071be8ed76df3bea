//! Where a message body ends (RFC 9112 section 6). Bodies pass through unchanged; this only
//! counts, so the runtime knows which bytes belong to this message and which to the next.

use super::head::{Headers, RequestHead, ResponseHead};
use super::HttpError;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the sender closes (responses only); the connection ends with it.
    UntilClose,
    /// `101 Switching Protocols`: HTTP ends here; the rest is the new protocol's bytes.
    Upgrade,
}

/// The body framing of a request. Requests that could be read two ways (both
/// `Content-Length` and `Transfer-Encoding`, differing lengths, a transfer coding other than
/// chunked last) are refused: a proxy that guesses differently from the service behind it is
/// how requests get smuggled.
pub fn request_framing(head: &RequestHead) -> Result<Framing, HttpError> {
    let te = head.all("transfer-encoding").count() > 0;
    let length = content_length(head).map_err(HttpError::Malformed)?;
    match (te, length) {
        (true, Some(_)) => Err(HttpError::Malformed(
            "both Transfer-Encoding and Content-Length".into(),
        )),
        (true, None) if chunked_last(head) => Ok(Framing::Chunked),
        (true, None) => Err(HttpError::Malformed(
            "a Transfer-Encoding other than chunked last".into(),
        )),
        (false, Some(0)) | (false, None) => Ok(Framing::Empty),
        (false, Some(n)) => Ok(Framing::Length(n)),
    }
}

/// The body framing of a response to a request with `method`. A response from the service
/// that cannot be framed is an error for the log (the client gets a 502).
pub fn response_framing(method: &str, head: &ResponseHead) -> Result<Framing, String> {
    if head.status == 101 {
        return Ok(Framing::Upgrade);
    }
    if method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&head.status)
        || head.status == 204
        || head.status == 304
    {
        return Ok(Framing::Empty);
    }
    if head.all("transfer-encoding").count() > 0 {
        return Ok(if chunked_last(head) {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    match content_length(head) {
        Ok(Some(0)) => Ok(Framing::Empty),
        Ok(Some(n)) => Ok(Framing::Length(n)),
        Ok(None) => Ok(Framing::UntilClose),
        Err(why) => Err(format!("the service's response has {why}")),
    }
}

fn chunked_last<H: Headers>(head: &H) -> bool {
    let last = head
        .all("transfer-encoding")
        .filter_map(|h| h.text())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .last();
    last.is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
}

/// The one `Content-Length` (repeats must agree), if any.
fn content_length<H: Headers>(head: &H) -> Result<Option<u64>, String> {
    let mut found: Option<u64> = None;
    for h in head.all("content-length") {
        for part in h.text().unwrap_or("").split(',') {
            let part = part.trim();
            if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "an invalid Content-Length {:?}",
                    String::from_utf8_lossy(&h.value)
                ));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| format!("an invalid Content-Length {part:?}"))?;
            if found.is_some_and(|f| f != n) {
                return Err("differing Content-Length values".into());
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// The longest chunk-size line extension or trailer section accepted.
const MAX_EXTENSION: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// Hex digits of a chunk size (2^64 - 1 has 16).
const MAX_SIZE_DIGITS: u8 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size { value: u64, digits: u8 },
    Extension { value: u64, len: usize },
    SizeLf { value: u64 },
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart { total: usize },
    TrailerLine { total: usize },
    TrailerLf { total: usize },
    FinalLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// Counts a body as its bytes go by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyState {
    state: State,
}

/// A chunked body that does not follow the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError(pub &'static str);

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad chunked encoding: {}", self.0)
    }
}

impl std::error::Error for ChunkError {}

impl BodyState {
    /// `Upgrade` has no HTTP body: it starts done.
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Upgrade | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size {
                value: 0,
                digits: 0,
            }),
            Framing::UntilClose => State::UntilClose,
        };
        BodyState { state }
    }

    /// Whether the body is complete. An `UntilClose` body is complete only at the sender's
    /// EOF, which the caller sees, not this.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the sender's EOF is the proper end of this body.
    pub fn ends_at_eof(&self) -> bool {
        matches!(self.state, State::UntilClose | State::Done)
    }

    /// Bytes still owed by a `Content-Length` body; `None` for other framings.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Takes as much of `input` as belongs to this body and returns how many bytes that is.
    /// Bytes past the returned count belong to whatever follows the body.
    pub fn advance(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        match self.state {
            State::Done => Ok(0),
            State::UntilClose => Ok(input.len()),
            State::Length(n) => {
                let take = usize::try_from(n).unwrap_or(usize::MAX).min(input.len());
                let left = n - take as u64;
                self.state = if left == 0 {
                    State::Done
                } else {
                    State::Length(left)
                };
                Ok(take)
            }
            State::Chunked(_) => self.advance_chunked(input),
        }
    }

    fn advance_chunked(&mut self, input: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let State::Chunked(chunk) = self.state else {
                break;
            };
            if let Chunk::Data(n) = chunk {
                let take = usize::try_from(n)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - i);
                i += take;
                let left = n - take as u64;
                self.state = State::Chunked(if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                });
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = step(chunk, b)?;
        }
        Ok(i)
    }
}

fn step(chunk: Chunk, b: u8) -> Result<State, ChunkError> {
    let next = match chunk {
        Chunk::Size { value, digits } => match b {
            b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                if digits >= MAX_SIZE_DIGITS {
                    return Err(ChunkError("chunk size too long"));
                }
                let d = (b as char).to_digit(16).unwrap_or(0);
                Chunk::Size {
                    value: (value << 4) | u64::from(d),
                    digits: digits + 1,
                }
            }
            _ if digits == 0 => return Err(ChunkError("chunk size missing")),
            b';' | b' ' | b'\t' => Chunk::Extension { value, len: 0 },
            b'\r' => Chunk::SizeLf { value },
            _ => return Err(ChunkError("invalid character in chunk size")),
        },
        Chunk::Extension { value, len } => match b {
            b'\r' => Chunk::SizeLf { value },
            b'\n' => return Err(ChunkError("bare LF after chunk size")),
            _ if len >= MAX_EXTENSION => return Err(ChunkError("chunk extension too long")),
            _ => Chunk::Extension {
                value,
                len: len + 1,
            },
        },
        Chunk::SizeLf { value } => match b {
            b'\n' if value == 0 => Chunk::TrailerStart { total: 0 },
            b'\n' => Chunk::Data(value),
            _ => return Err(ChunkError("CR without LF after chunk size")),
        },
        // Data is consumed in bulk by the caller.
        Chunk::Data(n) => Chunk::Data(n),
        Chunk::DataCr => match b {
            b'\r' => Chunk::DataLf,
            _ => return Err(ChunkError("chunk data longer than its size")),
        },
        Chunk::DataLf => match b {
            b'\n' => Chunk::Size {
                value: 0,
                digits: 0,
            },
            _ => return Err(ChunkError("CR without LF after chunk data")),
        },
        Chunk::TrailerStart { total } => match b {
            b'\r' => Chunk::FinalLf,
            b'\n' => return Err(ChunkError("bare LF in trailers")),
            _ => Chunk::TrailerLine { total: total + 1 },
        },
        Chunk::TrailerLine { total } => match b {
            b'\r' => Chunk::TrailerLf { total },
            b'\n' => return Err(ChunkError("bare LF in trailers")),
            _ if total >= MAX_TRAILERS => return Err(ChunkError("trailers too long")),
            _ => Chunk::TrailerLine { total: total + 1 },
        },
        Chunk::TrailerLf { total } => match b {
            b'\n' => Chunk::TrailerStart { total },
            _ => return Err(ChunkError("CR without LF in trailers")),
        },
        Chunk::FinalLf => match b {
            b'\n' => return Ok(State::Done),
            _ => return Err(ChunkError("CR without LF after the last chunk")),
        },
    };
    Ok(State::Chunked(next))
}
