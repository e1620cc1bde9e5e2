//! `/ProxyService/Proxy`: the gRPC frontend (kube-apiserver's egress over a
//! unix socket, or TCP with mTLS). Each frontend stream may carry several
//! dials; packets are relayed to the chosen agent by connectID, with
//! konduit's per-connection credit toward konduit agents.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, Streaming};

use bytes::Bytes;

use super::registry::{AgentRegistry, AgentSession, DialSpec, Leg, PacketLeg};
use crate::dataplane::flow::{Inbound, InboundQueue, SendWindow, WINDOW_BYTES};
use crate::dataplane::packet_bridge::{self, PacketLink, Role};
use crate::metrics::{ServerMetrics, packet_type_label};
use crate::protocol::PacketKind;
use crate::protocol::pb::Packet;
use crate::protocol::pb::proxy_service_server::ProxyService;

/// Packets queued toward one frontend stream.
const TO_FRONTEND_QUEUE: usize = 64;

pub struct ProxyServiceImpl {
    pub registry: Arc<AgentRegistry>,
    pub dial_timeout: Option<Duration>,
    pub metrics: ServerMetrics,
}

/// A connection of this frontend stream, by connectID.
struct FrontendConn {
    session: Arc<AgentSession>,
    route: Route,
    /// Moves the agent's side toward the frontend (set once DIAL_RSP is sent).
    task: Option<JoinHandle<()>>,
}

/// Where the frontend's DATA for a connection goes.
enum Route {
    /// Re-sent as DATA on the agent's stream, within the agent's credit (if any).
    Packets(Option<Arc<SendWindow>>),
    /// Written to the connection's relay socket by its bridge.
    Relay(InboundQueue),
}

type Conns = Arc<Mutex<HashMap<i64, FrontendConn>>>;
type Pending = Arc<Mutex<HashMap<i64, JoinHandle<()>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[tonic::async_trait]
impl ProxyService for ProxyServiceImpl {
    type ProxyStream = Pin<Box<dyn Stream<Item = Result<Packet, Status>> + Send>>;

    async fn proxy(&self, request: Request<Streaming<Packet>>) -> Result<Response<Self::ProxyStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Packet>(TO_FRONTEND_QUEUE);
        let registry = self.registry.clone();
        let dial_timeout = self.dial_timeout;
        let metrics = self.metrics.clone();
        metrics.grpc_connections.with_label_values(&["Proxy"]).inc();
        tokio::spawn(async move {
            let conns: Conns = Arc::default();
            let pending: Pending = Arc::default();
            while let Some(item) = inbound.next().await {
                let packet = match item {
                    Ok(p) => p,
                    Err(status) => {
                        tracing::debug!(error = %status.message(), "frontend stream ended with an error");
                        break;
                    }
                };
                let label = packet_type_label(packet.r#type);
                metrics.stream_packets.with_label_values(&["from_client", label]).inc();
                let kind = match PacketKind::of(packet) {
                    Ok(k) => k,
                    Err(e) => {
                        metrics.stream_errors.with_label_values(&["from_client", "InvalidArgument", label]).inc();
                        tracing::warn!(error = %e, "malformed packet from frontend dropped");
                        continue;
                    }
                };
                match kind {
                    PacketKind::DialRequest { protocol, address, random, .. } => {
                        let Some(session) = registry.pick(&address) else {
                            metrics.dial_failures.with_label_values(&["no_agent"]).inc();
                            let rsp = PacketKind::DialResponse {
                                random,
                                connect_id: 0,
                                error: Some("No agent available".into()),
                                relayed: false,
                            };
                            let _ = tx.send(rsp.into_packet()).await;
                            continue;
                        };
                        let spec = DialSpec { protocol, address, random, half_close: false };
                        let task =
                            tokio::spawn(dial(session, spec, dial_timeout, tx.clone(), conns.clone(), pending.clone()));
                        lock(&pending).insert(random, task);
                    }
                    PacketKind::Data { connect_id, data, .. } => {
                        let target = lock(&conns).get(&connect_id).map(|c| {
                            let route = match &c.route {
                                Route::Packets(window) => Ok(window.clone()),
                                Route::Relay(queue) => Err(queue.clone()),
                            };
                            (c.session.clone(), route)
                        });
                        let Some((session, route)) = target else {
                            let rsp =
                                PacketKind::CloseResponse { connect_id, error: Some("unrecognized connectID".into()) };
                            let _ = tx.send(rsp.into_packet()).await;
                            continue;
                        };
                        let window = match route {
                            Ok(window) => window,
                            Err(relay) => {
                                // A slow relay reader stops this frontend stream only.
                                let _ = relay.deliver(data).await;
                                continue;
                            }
                        };
                        if let Some(window) = window {
                            // Credit first: a slow backend stops this frontend, not the agent's other connections.
                            let mut need = data.len();
                            while need > 0 {
                                match window.take(need.min(WINDOW_BYTES)).await {
                                    Some(got) => need -= got.min(need),
                                    None => break,
                                }
                            }
                        }
                        let _ = session.send(crate::protocol::packet::data(connect_id, data)).await;
                    }
                    PacketKind::CloseRequest { connect_id } => {
                        let target = lock(&conns).get(&connect_id).map(|c| match &c.route {
                            Route::Packets(_) => Ok(c.session.clone()),
                            Route::Relay(queue) => Err(queue.clone()),
                        });
                        match target {
                            Some(Ok(s)) => {
                                let _ = s.send(PacketKind::CloseRequest { connect_id }.into_packet()).await;
                            }
                            // The relay bridge closes the socket and answers CLOSE_RSP.
                            Some(Err(relay)) => {
                                let _ = relay.signal(Inbound::Close(None));
                            }
                            None => {
                                let rsp =
                                    PacketKind::CloseResponse { connect_id, error: Some("Unknown connectID".into()) };
                                let _ = tx.send(rsp.into_packet()).await;
                            }
                        }
                    }
                    PacketKind::DialClose { random } => {
                        // Aborting the dial drops its pending entry, which sends DIAL_CLS to the agent.
                        if let Some(task) = lock(&pending).remove(&random) {
                            task.abort();
                        }
                    }
                    other => {
                        tracing::warn!(packet = ?other, "frontend sent a packet only agents may send; ignored");
                    }
                }
            }
            // The frontend is gone: cancel its dials and close its connections at the agents.
            for (_, task) in lock(&pending).drain() {
                task.abort();
            }
            let leftovers: Vec<_> = lock(&conns).drain().collect();
            for (connect_id, conn) in leftovers {
                if let Some(task) = &conn.task {
                    task.abort();
                }
                // A relayed connection ends when its socket drops (with the task).
                if let Route::Packets(_) = conn.route {
                    let _ = conn.session.send(PacketKind::CloseRequest { connect_id }.into_packet()).await;
                    conn.session.release(connect_id);
                }
            }
            metrics.grpc_connections.with_label_values(&["Proxy"]).dec();
        });

        let metrics = self.metrics.clone();
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |p: Packet| {
            metrics.stream_packets.with_label_values(&["to_client", packet_type_label(p.r#type)]).inc();
            Ok(p)
        });
        Ok(Response::new(Box::pin(outbound)))
    }
}

async fn dial(
    session: Arc<AgentSession>,
    spec: DialSpec,
    timeout: Option<Duration>,
    to_frontend: mpsc::Sender<Packet>,
    conns: Conns,
    pending: Pending,
) {
    let random = spec.random;
    let result = session.dial(&spec, timeout).await;
    lock(&pending).remove(&random);
    let tunnel = match result {
        Ok(t) => t,
        Err(e) => {
            let rsp = PacketKind::DialResponse { random, connect_id: 0, error: Some(e.to_string()), relayed: false };
            let _ = to_frontend.send(rsp.into_packet()).await;
            return;
        }
    };
    let connect_id = tunnel.connect_id;
    // The route is registered before the frontend hears DIAL_RSP (its first DATA
    // may follow at once), and the task that sends toward the frontend starts
    // only after DIAL_RSP was queued (nothing may overtake it).
    let (route, start): (Route, Box<dyn FnOnce() -> JoinHandle<()> + Send>) = match tunnel.leg {
        Leg::Packets(leg) => {
            let (to_frontend, conns) = (to_frontend.clone(), conns.clone());
            (
                Route::Packets(leg.window.clone()),
                Box::new(move || tokio::spawn(forward_to_frontend(connect_id, leg, to_frontend, conns))),
            )
        }
        Leg::Relay(socket) => {
            // The frontend speaks DATA, the relay is a raw socket: bridge them here,
            // answering the frontend as an agent would.
            let (queue, from_frontend) = InboundQueue::new(false);
            let link = PacketLink {
                connect_id,
                to_peer: to_frontend.clone(),
                from_peer: from_frontend,
                send_window: None,
                half_close: false,
                role: Role::Agent,
            };
            let conns = conns.clone();
            let start = move || {
                tokio::spawn(async move {
                    packet_bridge::bridge(socket.stream.into_boxed(), link, Bytes::new()).await;
                    lock(&conns).remove(&connect_id);
                })
            };
            (Route::Relay(queue), Box::new(start))
        }
    };
    let packets = matches!(route, Route::Packets(_));
    lock(&conns).insert(connect_id, FrontendConn { session: session.clone(), route, task: None });
    let rsp = PacketKind::DialResponse { random, connect_id, error: None, relayed: false };
    if to_frontend.send(rsp.into_packet()).await.is_err() {
        lock(&conns).remove(&connect_id);
        if packets {
            let _ = session.send(PacketKind::CloseRequest { connect_id }.into_packet()).await;
            session.release(connect_id);
        }
        return;
    }
    let task = start();
    match lock(&conns).get_mut(&connect_id) {
        Some(conn) => conn.task = Some(task),
        // The frontend went away meanwhile; its clean-up did not see the task.
        None => task.abort(),
    }
}

/// Moves one connection's packets from the agent to the frontend, granting
/// the agent credit as the frontend stream takes them.
async fn forward_to_frontend(connect_id: i64, mut leg: PacketLeg, to_frontend: mpsc::Sender<Packet>, conns: Conns) {
    let mut consumed = 0usize;
    while let Some(event) = leg.inbound.recv().await {
        match event {
            Inbound::Data(bytes, permit) => {
                let len = bytes.len();
                if to_frontend.send(crate::protocol::packet::data(connect_id, bytes)).await.is_err() {
                    break;
                }
                drop(permit);
                consumed += len;
                if leg.window.is_some() && consumed >= WINDOW_BYTES / 4 {
                    let update = PacketKind::WindowUpdate { connect_id, bytes: consumed as u64 };
                    let _ = leg.to_agent.send(update.into_packet()).await;
                    consumed = 0;
                }
            }
            // gRPC frontends cannot half-close; the server never asks for it on their dials.
            Inbound::Eof => {}
            Inbound::Close(error) => {
                let rsp = PacketKind::CloseResponse { connect_id, error };
                let _ = to_frontend.send(rsp.into_packet()).await;
                break;
            }
        }
    }
    lock(&conns).remove(&connect_id);
}
