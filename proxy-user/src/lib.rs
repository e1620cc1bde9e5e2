//! konduit: a Konnectivity-compatible control-plane-to-node tunnel.
//!
//! Module dependencies run one way: `protocol` and `dataplane` are shared;
//! `server` and `agent` use them and never each other.

pub mod admin;
pub mod agent;
pub mod config;
pub mod dataplane;
pub mod error;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod tls;

pub use error::{Error, ErrorKind, Result, Side};
