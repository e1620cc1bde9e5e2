//! konduit: a Konnectivity-compatible control-plane-to-node tunnel.
//!
//! Module dependencies run one way: `protocol` and `dataplane` are shared;
//! `server` and `agent` use them and never each other.

pub mod dataplane;
pub mod error;
pub mod protocol;

pub use error::{Error, ErrorKind, Result, Side};
