//! The wire protocol: generated Konnectivity messages, packet constructors,
//! gRPC metadata keys, agent identifiers and konduit's feature negotiation.
//!
//! Everything here is pure (values in, values or errors out); no sockets.

pub mod http_connect;
pub mod identifiers;
pub mod packet;
pub mod relay;

pub use identifiers::AgentIdentifiers;
pub use packet::{Features, PacketKind};

/// Generated from `proto/konnectivity.proto` (no protobuf package, hence `_`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("_");
}

/// gRPC metadata keys used on `/AgentService/Connect`.
pub mod metadata {
    /// The agent's id; exactly one per stream.
    pub const AGENT_ID: &str = "agentid";
    /// The agent's identifiers in URL-query form.
    pub const AGENT_IDENTIFIERS: &str = "agentidentifiers";
    /// `Bearer <service-account token>`.
    pub const AUTHORIZATION: &str = "authorization";
    /// Response header: the server's id.
    pub const SERVER_ID: &str = "serverid";
    /// Response header: how many servers sit behind the agent's server address.
    pub const SERVER_COUNT: &str = "servercount";
    /// konduit extension (both directions): comma-separated feature names.
    pub const KONDUIT_FEATURES: &str = "konduit-features";
    /// konduit extension (server → agent): the session key relay sockets present (hex).
    pub const KONDUIT_RELAY_KEY: &str = "konduit-relay-key";
    /// konduit extension (server → agent): where relay sockets connect, when it is
    /// not the address the agent used for its session (HA behind a load balancer).
    pub const KONDUIT_RELAY_ADDRESS: &str = "konduit-relay-address";
}
