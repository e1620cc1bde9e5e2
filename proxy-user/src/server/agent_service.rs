//! `/AgentService/Connect`: accepts an agent's session, checks its metadata,
//! answers with `serverid`/`servercount` headers, registers the session and
//! pumps the agent's packets into it. A malformed packet is logged and
//! dropped; it never ends other connections of the session.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use super::registry::AgentRegistry;
use crate::metrics::{ServerMetrics, packet_type_label};
use crate::protocol::pb::Packet;
use crate::protocol::pb::agent_service_server::AgentService;
use crate::protocol::{AgentIdentifiers, Features, PacketKind, metadata};

/// Packets queued toward one agent before senders wait (h2 flow control
/// behind it decides the real pace).
const TO_AGENT_QUEUE: usize = 256;

pub struct AgentServiceImpl {
    pub registry: Arc<AgentRegistry>,
    pub server_id: String,
    pub server_count: u32,
    /// Where agents should open relay sockets, when not the address they used.
    pub relay_address: Option<String>,
    /// The extensions this server offers (relay may be switched off).
    pub offered: Features,
    pub metrics: ServerMetrics,
}

fn single_value<'a>(req: &'a Request<Streaming<Packet>>, key: &str) -> Result<Option<&'a str>, Status> {
    let mut values = req.metadata().get_all(key).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Status::invalid_argument(format!("expected at most one {key} in metadata")));
    }
    first.map(|v| v.to_str().map_err(|_| Status::invalid_argument(format!("{key} is not printable ASCII")))).transpose()
}

#[tonic::async_trait]
impl AgentService for AgentServiceImpl {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

    async fn connect(&self, request: Request<Streaming<Packet>>) -> Result<Response<Self::ConnectStream>, Status> {
        let agent_id = single_value(&request, metadata::AGENT_ID)?
            .filter(|id| !id.is_empty())
            .ok_or_else(|| Status::invalid_argument("expected exactly one agentid in metadata"))?
            .to_owned();
        let identifiers = AgentIdentifiers::parse(single_value(&request, metadata::AGENT_IDENTIFIERS)?.unwrap_or(""))
            .map_err(|e| Status::invalid_argument(format!("agentidentifiers: {e}")))?;
        let features =
            Features::parse(single_value(&request, metadata::KONDUIT_FEATURES)?.unwrap_or("")).common(Features::ALL);
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();

        let (tx, rx) = mpsc::channel(TO_AGENT_QUEUE);
        let guard = self.registry.register(agent_id.clone(), identifiers, features, tx);
        let relay_key = guard.session.relay_key;
        tracing::info!(agent = %agent_id, ?peer, ?features, "agent connected");
        let metrics = self.metrics.clone();
        metrics.grpc_connections.with_label_values(&["Connect"]).inc();
        tokio::spawn(async move {
            let session = guard.session.clone();
            loop {
                match inbound.next().await {
                    Some(Ok(packet)) => {
                        let label = packet_type_label(packet.r#type);
                        metrics.stream_packets.with_label_values(&["from_agent", label]).inc();
                        match PacketKind::of(packet) {
                            Ok(kind) => session.handle_from_agent(kind).await,
                            Err(e) => {
                                metrics
                                    .stream_errors
                                    .with_label_values(&["from_agent", "InvalidArgument", label])
                                    .inc();
                                tracing::warn!(agent = %session.agent_id, error = %e, "malformed packet from agent dropped");
                            }
                        }
                    }
                    Some(Err(status)) => {
                        // A dropped connection surfaces as an h2 error; that is an ordinary disconnect.
                        tracing::info!(agent = %session.agent_id, reason = %status.message(), "agent disconnected");
                        break;
                    }
                    None => {
                        tracing::info!(agent = %session.agent_id, "agent disconnected");
                        break;
                    }
                }
            }
            metrics.grpc_connections.with_label_values(&["Connect"]).dec();
            drop(guard);
        });

        let metrics = self.metrics.clone();
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |p: Packet| {
            metrics.stream_packets.with_label_values(&["to_agent", packet_type_label(p.r#type)]).inc();
            Ok(p)
        });
        let mut response = Response::new(Box::pin(outbound) as Self::ConnectStream);
        let headers = response.metadata_mut();
        let server_id = MetadataValue::try_from(self.server_id.as_str())
            .map_err(|_| Status::internal("server id is not valid metadata"))?;
        headers.insert(metadata::SERVER_ID, server_id);
        headers.insert(metadata::SERVER_COUNT, MetadataValue::from(self.server_count));
        if let Ok(v) = MetadataValue::try_from(self.offered.header_value()) {
            headers.insert(metadata::KONDUIT_FEATURES, v);
        }
        if let Some(key) = relay_key
            && let Ok(v) = MetadataValue::try_from(key.to_hex())
        {
            headers.insert(metadata::KONDUIT_RELAY_KEY, v);
        }
        if let Some(addr) = &self.relay_address
            && let Ok(v) = MetadataValue::try_from(addr.as_str())
        {
            headers.insert(metadata::KONDUIT_RELAY_ADDRESS, v);
        }
        Ok(response)
    }
}
