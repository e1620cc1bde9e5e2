//! One agent session with one server: opening it (TLS, Connect metadata,
//! response headers), and serving the server's packets: dials, DATA,
//! closes, cancellations and credit. Errors on one connection never end the
//! session or touch other connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_rustls::TlsConnector;
use tonic::metadata::MetadataValue;
use tonic::transport::{Endpoint, Uri};
use tonic::{Request, Streaming};

use super::dialer;
use super::relay::{RelayConnector, RelayStream};
use crate::dataplane::EngineKind;
use crate::dataplane::SpliceStats;
use crate::dataplane::engine::{self, Dataplane, Fallback};
use crate::dataplane::flow::{DeliverError, Inbound, InboundQueue, SendWindow};
use crate::dataplane::packet_bridge::{self, PacketLink, Role};
use crate::error::{Error, ErrorKind, Result, Side};
use crate::metrics::{AgentMetrics, packet_type_label};
use crate::protocol::pb::Packet;
use crate::protocol::pb::agent_service_client::AgentServiceClient;
use crate::protocol::relay::Token;
use crate::protocol::{Features, PacketKind, metadata};

const TO_SERVER_QUEUE: usize = 256;
const H2_STREAM_WINDOW: u32 = 8 << 20;
const H2_CONN_WINDOW: u32 = 32 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything needed to open sessions, fixed at start-up.
pub struct SessionSettings {
    pub host: String,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
    pub agent_id: String,
    pub identifiers: String,
    pub token_path: Option<String>,
    pub keepalive: Duration,
    pub dial_timeout: Duration,
    /// Use relay sockets when the server offers them.
    pub relay: bool,
    /// Destination ports whose relay may be plaintext (spliceable).
    pub relay_plaintext_ports: Vec<u16>,
    pub relay_pool_size: usize,
    /// Engines for relayed connections.
    pub dataplane: Dataplane,
    pub metrics: AgentMetrics,
    /// Set on SIGTERM: new dials are refused, open connections finish.
    pub draining: AtomicBool,
}

/// An open session, before its packets are served.
pub struct OpenSession {
    pub server_id: String,
    pub server_count: u32,
    pub features: Features,
    relay_key: Option<Token>,
    relay_address: Option<String>,
    inbound: Streaming<Packet>,
    outbound: mpsc::Sender<Packet>,
}

struct ConnEntry {
    inbound: InboundQueue,
    window: Option<Arc<SendWindow>>,
}

/// The live state of a session being served.
pub struct SessionState {
    pub server_id: String,
    features: Features,
    outbound: mpsc::Sender<Packet>,
    conns: Mutex<HashMap<i64, ConnEntry>>,
    dials: Mutex<HashMap<i64, AbortHandle>>,
    next_connect_id: AtomicI64,
    relay: Option<Arc<RelayConnector>>,
}

impl SessionState {
    /// Open tunnelled connections on this session.
    pub fn connection_count(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Tells the server this agent is going away (it then prefers others).
    pub async fn send_drain(&self) {
        let _ = self.outbound.send(PacketKind::Drain.into_packet()).await;
    }

    /// Waits (bounded) until every queued packet was taken by the gRPC stream,
    /// so that a DRAIN or CLOSE_RSP is not lost when the process exits.
    pub async fn flushed(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.outbound.capacity() < self.outbound.max_capacity() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn send(&self, kind: PacketKind) {
        let _ = self.outbound.send(kind.into_packet()).await;
    }
}

fn header(headers: &tonic::metadata::MetadataMap, key: &str) -> Result<String> {
    let mut values = headers.get_all(key).iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return Err(Error::new(
            Side::Server,
            ErrorKind::Protocol,
            format!("expected exactly one {key} response header"),
        ));
    };
    v.to_str()
        .map(str::to_owned)
        .map_err(|_| Error::new(Side::Server, ErrorKind::Protocol, format!("{key} header is not ASCII")))
}

/// Opens a new TCP+TLS connection and a Connect stream on it.
pub async fn open(settings: &SessionSettings) -> Result<OpenSession> {
    let server_name = ServerName::try_from(settings.host.clone()).map_err(|e| {
        Error::config(format!("--proxy-server-host={} is not a valid TLS name", settings.host)).because(e)
    })?;
    let connector = TlsConnector::from(settings.tls.clone());
    let (host, port) = (settings.host.clone(), settings.port);
    let target = format!("{host}:{port}");
    let connect = tower::service_fn(move |_: Uri| {
        let (connector, server_name, target) = (connector.clone(), server_name.clone(), target.clone());
        async move {
            let tcp = TcpStream::connect(&target).await?;
            crate::net::tune(&tcp);
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let server = format!("{host}:{port}");
    let endpoint = Endpoint::from_shared(format!("http://{server}"))
        .map_err(|e| Error::config(format!("server address {server}")).because(e))?
        .connect_timeout(Duration::from_secs(10))
        .initial_stream_window_size(Some(H2_STREAM_WINDOW))
        .initial_connection_window_size(Some(H2_CONN_WINDOW))
        .http2_keep_alive_interval(settings.keepalive)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let channel = endpoint
        .connect_with_connector(connect)
        .await
        .map_err(|e| Error::new(Side::Server, ErrorKind::Io, format!("connect to {server}")).because(e))?;

    let (tx, rx) = mpsc::channel(TO_SERVER_QUEUE);
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let md = request.metadata_mut();
    let value = |s: &str, what: &str| {
        MetadataValue::try_from(s).map_err(|e| Error::config(format!("{what} is not valid gRPC metadata")).because(e))
    };
    md.insert(metadata::AGENT_ID, value(&settings.agent_id, "--agent-id")?);
    if !settings.identifiers.is_empty() {
        md.insert(metadata::AGENT_IDENTIFIERS, value(&settings.identifiers, "--agent-identifiers")?);
    }
    md.insert(metadata::KONDUIT_FEATURES, value(&Features::ALL.header_value(), "features")?);
    if let Some(path) = &settings.token_path {
        // Re-read each time: projected tokens rotate.
        let token = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("read service account token {path}")).because(e))?;
        md.insert(metadata::AUTHORIZATION, value(&format!("Bearer {}", token.trim()), "token")?);
    }
    let response = AgentServiceClient::new(channel)
        .connect(request)
        .await
        .map_err(|s| Error::new(Side::Server, ErrorKind::Refused, format!("Connect refused: {}", s.message())))?;
    let headers = response.metadata();
    let server_id = header(headers, metadata::SERVER_ID)?;
    let server_count = header(headers, metadata::SERVER_COUNT)?
        .parse::<u32>()
        .map_err(|e| Error::new(Side::Server, ErrorKind::Protocol, "servercount is not a number").because(e))?;
    let offered = Features { relay: settings.relay, ..Features::ALL };
    let features = headers
        .get(metadata::KONDUIT_FEATURES)
        .and_then(|v| v.to_str().ok())
        .map(Features::parse)
        .unwrap_or_default()
        .common(offered);
    let text = |key: &str| headers.get(key).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let relay_key = text(metadata::KONDUIT_RELAY_KEY).and_then(|k| Token::from_hex(&k));
    let relay_address = text(metadata::KONDUIT_RELAY_ADDRESS);
    Ok(OpenSession {
        server_id,
        server_count,
        features,
        relay_key,
        relay_address,
        inbound: response.into_inner(),
        outbound: tx,
    })
}

impl OpenSession {
    /// Splits into the shared state and the future that serves the session
    /// until the server's stream ends.
    pub fn serve(self, settings: Arc<SessionSettings>) -> (Arc<SessionState>, impl std::future::Future<Output = ()>) {
        let relay = match (self.features.relay, self.relay_key) {
            (true, Some(key)) => {
                let address =
                    self.relay_address.clone().unwrap_or_else(|| format!("{}:{}", settings.host, settings.port));
                let host = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h).trim_matches(['[', ']']);
                let name =
                    ServerName::try_from(host.to_owned()).unwrap_or_else(|_| server_name_fallback(&settings.host));
                Some(Arc::new(RelayConnector::new(key, address, name, &settings.tls, settings.relay_pool_size)))
            }
            _ => None,
        };
        let state = Arc::new(SessionState {
            server_id: self.server_id,
            features: self.features,
            outbound: self.outbound,
            conns: Mutex::new(HashMap::new()),
            dials: Mutex::new(HashMap::new()),
            next_connect_id: AtomicI64::new(1),
            relay: relay.clone(),
        });
        let mut inbound = self.inbound;
        let served = state.clone();
        let fut = async move {
            let state = served;
            let warm = relay.map(|r| tokio::spawn(r.keep_warm()));
            let metrics = settings.metrics.clone();
            loop {
                let packet = match inbound.next().await {
                    Some(Ok(p)) => p,
                    Some(Err(status)) => {
                        tracing::info!(server = %state.server_id, error = %status.message(), "session ended");
                        break;
                    }
                    None => {
                        tracing::info!(server = %state.server_id, "server closed the session");
                        break;
                    }
                };
                let label = packet_type_label(packet.r#type);
                metrics.stream_packets.with_label_values(&["from_server", label]).inc();
                match PacketKind::of(packet) {
                    Ok(kind) => handle(&state, &settings, kind).await,
                    Err(e) => {
                        metrics.stream_errors.with_label_values(&["from_server", "InvalidArgument", label]).inc();
                        tracing::warn!(server = %state.server_id, error = %e, "malformed packet from server dropped");
                    }
                }
            }
            // Session over: cancel dials, end connections (their backends close).
            if let Some(warm) = warm {
                warm.abort();
            }
            for (_, dial) in lock(&state.dials).drain() {
                dial.abort();
            }
            for (_, entry) in lock(&state.conns).drain() {
                let _ = entry.inbound.signal(Inbound::Close(Some("session ended".into())));
                if let Some(w) = entry.window {
                    w.close();
                }
            }
        };
        (state, fut)
    }
}

async fn handle(state: &Arc<SessionState>, settings: &Arc<SessionSettings>, kind: PacketKind) {
    match kind {
        PacketKind::DialRequest { protocol, address, random, half_close, relay_ticket } => {
            // The dial waits until its cancel handle is registered, so that
            // its own clean-up always finds (and removes) that entry.
            let (registered, wait) = tokio::sync::oneshot::channel::<()>();
            let (s, st) = (state.clone(), settings.clone());
            let task = tokio::spawn(async move {
                let _ = wait.await;
                let ticket = Token::from_slice(&relay_ticket);
                serve_dial(s, st, protocol, address, random, half_close, ticket).await;
            });
            lock(&state.dials).insert(random, task.abort_handle());
            let _ = registered.send(());
        }
        PacketKind::Data { connect_id, data, eof, .. } => {
            let queue = lock(&state.conns).get(&connect_id).map(|c| c.inbound.clone());
            let Some(queue) = queue else {
                tracing::debug!(server = %state.server_id, connect_id, "DATA for unknown connectID");
                state
                    .send(PacketKind::CloseResponse { connect_id, error: Some("unrecognized connectID".into()) })
                    .await;
                return;
            };
            let delivered = if data.is_empty() { Ok(()) } else { queue.deliver(data).await };
            let delivered = delivered.and_then(|()| if eof { queue.signal(Inbound::Eof) } else { Ok(()) });
            if let Err(e @ DeliverError::WindowExceeded { .. }) = delivered {
                tracing::warn!(server = %state.server_id, connect_id, error = %e, "server broke flow control; closing that connection");
                let _ = queue.signal(Inbound::Close(Some(e.to_string())));
            }
        }
        PacketKind::CloseRequest { connect_id } => {
            let queue = lock(&state.conns).get(&connect_id).map(|c| c.inbound.clone());
            match queue {
                // The bridge answers CLOSE_RSP once the backend is closed.
                Some(q) => {
                    let _ = q.signal(Inbound::Close(None));
                }
                None => {
                    state.send(PacketKind::CloseResponse { connect_id, error: Some("Unknown connectID".into()) }).await;
                }
            }
        }
        PacketKind::DialClose { random } => {
            // konduit honours DIAL_CLS (stock agents ignore it): stop dialling.
            if let Some(dial) = lock(&state.dials).remove(&random) {
                tracing::debug!(server = %state.server_id, random, "dial cancelled by the server");
                dial.abort();
            }
        }
        PacketKind::WindowUpdate { connect_id, bytes } => {
            if let Some(w) = lock(&state.conns).get(&connect_id).and_then(|c| c.window.clone()) {
                w.grant(bytes);
            }
        }
        other => {
            tracing::warn!(server = %state.server_id, packet = ?other, "server sent a packet only agents send; ignored");
        }
    }
}

async fn serve_dial(
    state: Arc<SessionState>,
    settings: Arc<SessionSettings>,
    protocol: String,
    address: String,
    random: i64,
    half_close: bool,
    ticket: Option<Token>,
) {
    let metrics = &settings.metrics;
    if settings.draining.load(Ordering::Relaxed) {
        lock(&state.dials).remove(&random);
        let error = Some("agent is draining: not taking new connections".to_owned());
        state.send(PacketKind::DialResponse { random, connect_id: 0, error, relayed: false }).await;
        return;
    }
    let started = Instant::now();
    let dialled = dialer::dial_tcp(&protocol, &address, settings.dial_timeout).await;
    // From here on the dial cannot be cancelled; a late DIAL_CLS finds nothing.
    lock(&state.dials).remove(&random);
    let stream = match dialled {
        Ok(s) => s,
        Err(error) => {
            let reason = if error.contains("timeout") { "timeout" } else { "unknown" };
            metrics.endpoint_dial_failures.with_label_values(&[reason]).inc();
            tracing::info!(server = %state.server_id, %address, %error, "dial failed");
            state.send(PacketKind::DialResponse { random, connect_id: 0, error: Some(error), relayed: false }).await;
            return;
        }
    };
    metrics.dial_duration.observe(started.elapsed().as_secs_f64());
    if let (Some(relay), Some(ticket)) = (&state.relay, ticket) {
        let plaintext = destination_port(&address).is_some_and(|p| settings.relay_plaintext_ports.contains(&p));
        match relay.open(ticket, plaintext).await {
            Ok(relayed) => {
                return serve_relayed(state.clone(), settings.clone(), address, random, stream, relayed).await;
            }
            Err(reason) => {
                metrics.dataplane.fallbacks.with_label_values(&["relay_unavailable"]).inc();
                tracing::warn!(server = %state.server_id, %address, %reason, "relay socket unavailable; using DATA packets");
            }
        }
    }
    let connect_id = state.next_connect_id.fetch_add(1, Ordering::Relaxed);
    let (inbound, from_peer) = InboundQueue::new(state.features.flow_control);
    let window = state.features.flow_control.then(|| Arc::new(SendWindow::default()));
    // Registered before DIAL_RSP so that the first DATA finds it.
    lock(&state.conns).insert(connect_id, ConnEntry { inbound, window: window.clone() });
    metrics.open_endpoint_connections.inc();
    state.send(PacketKind::DialResponse { random, connect_id, error: None, relayed: false }).await;
    tracing::debug!(server = %state.server_id, %address, connect_id, "connected");
    let link = PacketLink {
        connect_id,
        to_peer: state.outbound.clone(),
        from_peer,
        send_window: window,
        half_close: half_close && state.features.half_close,
        role: Role::Agent,
    };
    let stats = packet_bridge::bridge(stream, link, bytes::Bytes::new()).await;
    lock(&state.conns).remove(&connect_id);
    metrics.open_endpoint_connections.dec();
    metrics.dataplane.record(EngineKind::Userspace, stats.peer_to_local, stats.local_to_peer);
    if let Some(e) = stats.error {
        tracing::debug!(server = %state.server_id, %address, connect_id, error = %e, "connection ended with an error");
    }
}

fn server_name_fallback(host: &str) -> ServerName<'static> {
    ServerName::try_from(host.to_owned()).unwrap_or_else(|_| ServerName::try_from("localhost").expect("valid name"))
}

/// The port of a `host:port` dial address.
fn destination_port(address: &str) -> Option<u16> {
    address.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

/// A connection whose bytes travel on its own relay socket: answer the dial,
/// then let the engine join backend and relay until both directions are done
/// or the server closes it.
async fn serve_relayed(
    state: Arc<SessionState>,
    settings: Arc<SessionSettings>,
    address: String,
    random: i64,
    backend: TcpStream,
    relay: RelayStream,
) {
    let metrics = &settings.metrics;
    let connect_id = state.next_connect_id.fetch_add(1, Ordering::Relaxed);
    // Only control events arrive for a relayed connection (CLOSE_REQ, session end).
    let (inbound, control) = InboundQueue::new(false);
    lock(&state.conns).insert(connect_id, ConnEntry { inbound, window: None });
    metrics.open_endpoint_connections.inc();
    // The kernel engine inserts the pair before the dial is answered, so the
    // client's first byte (sent only after the answer) cannot overtake anything.
    let plaintext = relay.is_plaintext();
    let prepared = match relay {
        RelayStream::Plain(relay) => settings.dataplane.prepare(relay, backend),
        RelayStream::Tls(relay) => {
            metrics.dataplane.fallbacks.with_label_values(&[Fallback::Encrypted.as_str()]).inc();
            let splice = engine::userspace(relay, Box::new(backend));
            state.send(PacketKind::DialResponse { random, connect_id, error: None, relayed: true }).await;
            tracing::debug!(server = %state.server_id, %address, connect_id, engine = "userspace", plaintext, "connected over a TLS relay socket");
            return finish_relayed(&state, &settings, &address, connect_id, control, splice).await;
        }
    };
    if let Some(fallback) = prepared.fallback() {
        metrics.dataplane.fallbacks.with_label_values(&[fallback.as_str()]).inc();
    }
    let engine = prepared.engine();
    state.send(PacketKind::DialResponse { random, connect_id, error: None, relayed: true }).await;
    tracing::debug!(server = %state.server_id, %address, connect_id, %engine, plaintext, "connected over a relay socket");
    finish_relayed(&state, &settings, &address, connect_id, control, prepared.run()).await;
}

/// Runs a relayed connection's splice until it ends or the server closes it.
async fn finish_relayed(
    state: &Arc<SessionState>,
    settings: &Arc<SessionSettings>,
    address: &str,
    connect_id: i64,
    mut control: tokio::sync::mpsc::UnboundedReceiver<Inbound>,
    splice: impl std::future::Future<Output = SpliceStats>,
) {
    let metrics = &settings.metrics;
    let closed_by_server = async {
        while let Some(event) = control.recv().await {
            if let Inbound::Close(_) = event {
                return;
            }
        }
    };
    let stats = tokio::select! {
        stats = splice => stats,
        () = closed_by_server => SpliceStats { error: Some("closed by the server".into()), ..Default::default() },
    };
    lock(&state.conns).remove(&connect_id);
    metrics.open_endpoint_connections.dec();
    // a = relay (toward the server), b = backend (on this node).
    metrics.dataplane.record(stats.engine, stats.a_to_b, stats.b_to_a);
    metrics.dataplane.valve_bytes.inc_by(stats.passed);
    metrics.dataplane.retransmit_trimmed_bytes.inc_by(stats.trimmed);
    if stats.trimmed > 0 {
        tracing::debug!(connect_id, trimmed = stats.trimmed, "retransmitted bytes received twice were forwarded once");
    }
    state.send(PacketKind::CloseResponse { connect_id, error: None }).await;
    if let Some(e) = stats.error {
        tracing::debug!(server = %state.server_id, %address, connect_id, error = %e, "relayed connection ended with an error");
    }
}
