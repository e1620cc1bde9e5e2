//! One agent session with one server: opening it (TLS, Connect metadata,
//! response headers), and serving the server's packets: dials, DATA,
//! closes, cancellations and credit. Errors on one connection never end the
//! session or touch other connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
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
use crate::dataplane::EngineKind;
use crate::dataplane::flow::{DeliverError, Inbound, InboundQueue, SendWindow};
use crate::dataplane::packet_bridge::{self, PacketLink, Role};
use crate::error::{Error, ErrorKind, Result, Side};
use crate::metrics::{AgentMetrics, packet_type_label};
use crate::protocol::pb::Packet;
use crate::protocol::pb::agent_service_client::AgentServiceClient;
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
    pub metrics: AgentMetrics,
}

/// An open session, before its packets are served.
pub struct OpenSession {
    pub server_id: String,
    pub server_count: u32,
    pub features: Features,
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
    v.to_str().map(str::to_owned).map_err(|_| {
        Error::new(
            Side::Server,
            ErrorKind::Protocol,
            format!("{key} header is not ASCII"),
        )
    })
}

/// Opens a new TCP+TLS connection and a Connect stream on it.
pub async fn open(settings: &SessionSettings) -> Result<OpenSession> {
    let server_name = ServerName::try_from(settings.host.clone()).map_err(|e| {
        Error::config(format!(
            "--proxy-server-host={} is not a valid TLS name",
            settings.host
        ))
        .because(e)
    })?;
    let connector = TlsConnector::from(settings.tls.clone());
    let (host, port) = (settings.host.clone(), settings.port);
    let target = format!("{host}:{port}");
    let connect = tower::service_fn(move |_: Uri| {
        let (connector, server_name, target) =
            (connector.clone(), server_name.clone(), target.clone());
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
        .map_err(|e| {
            Error::new(Side::Server, ErrorKind::Io, format!("connect to {server}")).because(e)
        })?;

    let (tx, rx) = mpsc::channel(TO_SERVER_QUEUE);
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let md = request.metadata_mut();
    let value = |s: &str, what: &str| {
        MetadataValue::try_from(s)
            .map_err(|e| Error::config(format!("{what} is not valid gRPC metadata")).because(e))
    };
    md.insert(metadata::AGENT_ID, value(&settings.agent_id, "--agent-id")?);
    if !settings.identifiers.is_empty() {
        md.insert(
            metadata::AGENT_IDENTIFIERS,
            value(&settings.identifiers, "--agent-identifiers")?,
        );
    }
    md.insert(
        metadata::KONDUIT_FEATURES,
        value(&Features::ALL.header_value(), "features")?,
    );
    if let Some(path) = &settings.token_path {
        // Re-read each time: projected tokens rotate.
        let token = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("read service account token {path}")).because(e))?;
        md.insert(
            metadata::AUTHORIZATION,
            value(&format!("Bearer {}", token.trim()), "token")?,
        );
    }
    let response = AgentServiceClient::new(channel)
        .connect(request)
        .await
        .map_err(|s| {
            Error::new(
                Side::Server,
                ErrorKind::Refused,
                format!("Connect refused: {}", s.message()),
            )
        })?;
    let headers = response.metadata();
    let server_id = header(headers, metadata::SERVER_ID)?;
    let server_count = header(headers, metadata::SERVER_COUNT)?
        .parse::<u32>()
        .map_err(|e| {
            Error::new(
                Side::Server,
                ErrorKind::Protocol,
                "servercount is not a number",
            )
            .because(e)
        })?;
    let features = headers
        .get(metadata::KONDUIT_FEATURES)
        .and_then(|v| v.to_str().ok())
        .map(Features::parse)
        .unwrap_or_default()
        .common(Features::ALL);
    Ok(OpenSession {
        server_id,
        server_count,
        features,
        inbound: response.into_inner(),
        outbound: tx,
    })
}

impl OpenSession {
    /// Splits into the shared state and the future that serves the session
    /// until the server's stream ends.
    pub fn serve(
        self,
        settings: Arc<SessionSettings>,
    ) -> (Arc<SessionState>, impl std::future::Future<Output = ()>) {
        let state = Arc::new(SessionState {
            server_id: self.server_id,
            features: self.features,
            outbound: self.outbound,
            conns: Mutex::new(HashMap::new()),
            dials: Mutex::new(HashMap::new()),
            next_connect_id: AtomicI64::new(1),
        });
        let mut inbound = self.inbound;
        let served = state.clone();
        let fut = async move {
            let state = served;
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
                metrics
                    .stream_packets
                    .with_label_values(&["from_server", label])
                    .inc();
                match PacketKind::of(packet) {
                    Ok(kind) => handle(&state, &settings, kind).await,
                    Err(e) => {
                        metrics
                            .stream_errors
                            .with_label_values(&["from_server", "InvalidArgument", label])
                            .inc();
                        tracing::warn!(server = %state.server_id, error = %e, "malformed packet from server dropped");
                    }
                }
            }
            // Session over: cancel dials, end connections (their backends close).
            for (_, dial) in lock(&state.dials).drain() {
                dial.abort();
            }
            for (_, entry) in lock(&state.conns).drain() {
                let _ = entry
                    .inbound
                    .signal(Inbound::Close(Some("session ended".into())));
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
        PacketKind::DialRequest {
            protocol,
            address,
            random,
            half_close,
            ..
        } => {
            // The dial waits until its cancel handle is registered, so that
            // its own clean-up always finds (and removes) that entry.
            let (registered, wait) = tokio::sync::oneshot::channel::<()>();
            let (s, st) = (state.clone(), settings.clone());
            let task = tokio::spawn(async move {
                let _ = wait.await;
                serve_dial(s, st, protocol, address, random, half_close).await;
            });
            lock(&state.dials).insert(random, task.abort_handle());
            let _ = registered.send(());
        }
        PacketKind::Data {
            connect_id,
            data,
            eof,
            ..
        } => {
            let queue = lock(&state.conns)
                .get(&connect_id)
                .map(|c| c.inbound.clone());
            let Some(queue) = queue else {
                tracing::debug!(server = %state.server_id, connect_id, "DATA for unknown connectID");
                state
                    .send(PacketKind::CloseResponse {
                        connect_id,
                        error: Some("unrecognized connectID".into()),
                    })
                    .await;
                return;
            };
            let delivered = if data.is_empty() {
                Ok(())
            } else {
                queue.deliver(data).await
            };
            let delivered = delivered.and_then(|()| {
                if eof {
                    queue.signal(Inbound::Eof)
                } else {
                    Ok(())
                }
            });
            if let Err(e @ DeliverError::WindowExceeded { .. }) = delivered {
                tracing::warn!(server = %state.server_id, connect_id, error = %e, "server broke flow control; closing that connection");
                let _ = queue.signal(Inbound::Close(Some(e.to_string())));
            }
        }
        PacketKind::CloseRequest { connect_id } => {
            let queue = lock(&state.conns)
                .get(&connect_id)
                .map(|c| c.inbound.clone());
            match queue {
                // The bridge answers CLOSE_RSP once the backend is closed.
                Some(q) => {
                    let _ = q.signal(Inbound::Close(None));
                }
                None => {
                    state
                        .send(PacketKind::CloseResponse {
                            connect_id,
                            error: Some("Unknown connectID".into()),
                        })
                        .await;
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
            if let Some(w) = lock(&state.conns)
                .get(&connect_id)
                .and_then(|c| c.window.clone())
            {
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
) {
    let metrics = &settings.metrics;
    let started = Instant::now();
    let dialled = dialer::dial_tcp(&protocol, &address, settings.dial_timeout).await;
    // From here on the dial cannot be cancelled; a late DIAL_CLS finds nothing.
    lock(&state.dials).remove(&random);
    let stream = match dialled {
        Ok(s) => s,
        Err(error) => {
            let reason = if error.contains("timeout") {
                "timeout"
            } else {
                "unknown"
            };
            metrics
                .endpoint_dial_failures
                .with_label_values(&[reason])
                .inc();
            tracing::info!(server = %state.server_id, %address, %error, "dial failed");
            state
                .send(PacketKind::DialResponse {
                    random,
                    connect_id: 0,
                    error: Some(error),
                })
                .await;
            return;
        }
    };
    metrics
        .dial_duration
        .observe(started.elapsed().as_secs_f64());
    let connect_id = state.next_connect_id.fetch_add(1, Ordering::Relaxed);
    let (inbound, from_peer) = InboundQueue::new(state.features.flow_control);
    let window = state
        .features
        .flow_control
        .then(|| Arc::new(SendWindow::default()));
    // Registered before DIAL_RSP so that the first DATA finds it.
    lock(&state.conns).insert(
        connect_id,
        ConnEntry {
            inbound,
            window: window.clone(),
        },
    );
    metrics.open_endpoint_connections.inc();
    state
        .send(PacketKind::DialResponse {
            random,
            connect_id,
            error: None,
        })
        .await;
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
    metrics.dataplane.record(
        EngineKind::Userspace,
        stats.peer_to_local,
        stats.local_to_peer,
    );
    if let Some(e) = stats.error {
        tracing::debug!(server = %state.server_id, %address, connect_id, error = %e, "connection ended with an error");
    }
}
