//! The sans-IO protocol core of dialback.
//!
//! Nothing in this crate touches a socket, a clock or an entropy source: time arrives as the
//! `now` argument of every `handle_*` call, randomness as a seed given at construction, and
//! bytes as slices. Outputs are drained with `poll_*` until they return `None`; after every
//! `handle_*` call, drain them all, then sleep until [`gateway::Gateway::poll_timeout`] (or the
//! agent's) and call `handle_timeout`.
//!
//! The wire format implemented here is specified byte for byte in `spec/protocol.md`.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod acl;
pub mod agent;
pub mod connect_chain;
pub mod crypto;
pub mod data;
pub mod drbg;
pub mod error;
pub mod gateway;
pub mod http;
pub mod ntlm;
pub mod proxy_protocol;
pub mod throttle;
pub mod timing;
pub mod upstream;
pub mod wire;

pub use error::ErrorCode;
pub use timing::Timing;
