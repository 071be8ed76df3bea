//! Error and rejection codes carried in ERROR frames (`spec/protocol.md`, "Error codes").

use std::fmt;

/// A code in an ERROR frame. Unknown codes received from a newer peer are kept as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    UnsupportedVersion,
    Malformed,
    UnexpectedMessage,
    AuthFailed,
    AlreadyRegistered,
    NotAllowed,
    TokenInvalid,
    TokenExpired,
    Timeout,
    Overloaded,
    ShuttingDown,
    LocalUnreachable,
    SessionGone,
    Internal,
    DataTlsRequired,
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::UnsupportedVersion => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::UnexpectedMessage => 3,
            ErrorCode::AuthFailed => 4,
            ErrorCode::AlreadyRegistered => 5,
            ErrorCode::NotAllowed => 6,
            ErrorCode::TokenInvalid => 7,
            ErrorCode::TokenExpired => 8,
            ErrorCode::Timeout => 9,
            ErrorCode::Overloaded => 10,
            ErrorCode::ShuttingDown => 11,
            ErrorCode::LocalUnreachable => 12,
            ErrorCode::SessionGone => 13,
            ErrorCode::Internal => 14,
            ErrorCode::DataTlsRequired => 15,
            ErrorCode::Other(v) => v,
        }
    }

    pub fn from_u16(v: u16) -> Self {
        match v {
            1 => ErrorCode::UnsupportedVersion,
            2 => ErrorCode::Malformed,
            3 => ErrorCode::UnexpectedMessage,
            4 => ErrorCode::AuthFailed,
            5 => ErrorCode::AlreadyRegistered,
            6 => ErrorCode::NotAllowed,
            7 => ErrorCode::TokenInvalid,
            8 => ErrorCode::TokenExpired,
            9 => ErrorCode::Timeout,
            10 => ErrorCode::Overloaded,
            11 => ErrorCode::ShuttingDown,
            12 => ErrorCode::LocalUnreachable,
            13 => ErrorCode::SessionGone,
            14 => ErrorCode::Internal,
            15 => ErrorCode::DataTlsRequired,
            v => ErrorCode::Other(v),
        }
    }

    /// Stable snake_case name, used in logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnexpectedMessage => "unexpected_message",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::AlreadyRegistered => "already_registered",
            ErrorCode::NotAllowed => "not_allowed",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::LocalUnreachable => "local_unreachable",
            ErrorCode::SessionGone => "session_gone",
            ErrorCode::Internal => "internal",
            ErrorCode::DataTlsRequired => "data_tls_required",
            ErrorCode::Other(_) => "other",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Other(v) => write!(f, "error code {v}"),
            c => f.write_str(c.name()),
        }
    }
}
