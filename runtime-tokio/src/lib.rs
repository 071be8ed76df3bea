//! Runs the dialback core on tokio, with rustls for the control channel.

pub mod admin;
pub mod agent;
mod deadline;
pub mod drain;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod outbound;
pub mod proxy_header;
pub mod relay;
pub mod settings;
pub mod sockopt;
pub mod splice;
pub mod stream;
pub mod tls;
pub mod upstream;
