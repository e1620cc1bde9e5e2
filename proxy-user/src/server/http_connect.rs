//! The HTTP-CONNECT frontend (unix socket, or TCP with mTLS): reads one
//! CONNECT request under a size limit and deadline, asks an agent to dial,
//! answers 200 only once the agent has dialled (or the stock error status),
//! then hands the socket to the data plane. Bad input closes only its own
//! connection.
//!
//! Data plane: a unix-socket frontend and a plaintext relay socket are joined
//! by splice(2) ([`crate::dataplane::pipe_splice`]); a TLS frontend or a TLS
//! relay is moved in userspace, counted in `konduit_dataplane_fallbacks_total`
//! with the reason. (Stock serves HTTP-CONNECT over TCP only with TLS, so
//! there is no plain TCP frontend to splice.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;

use super::registry::{AgentRegistry, DialError, DialSpec, Leg};
use super::relay::RelayStream;
use crate::dataplane::pipe_splice::PipeSplice;
use crate::dataplane::{EngineKind, SpliceStats, engine, packet_bridge};
use crate::metrics::ServerMetrics;
use crate::protocol::http_connect::{self, RequestError};

/// Settings of the HTTP-CONNECT frontend.
#[derive(Debug, Clone)]
pub struct HttpConnectSettings {
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub dial_timeout: Option<Duration>,
    /// Join unix-socket frontends and plaintext relays in the kernel
    /// (`--dataplane` other than `userspace`).
    pub kernel_splice: bool,
}

/// A frontend connection as the data plane sees it.
pub trait FrontendStream: crate::dataplane::SpliceSocket {
    /// The plain unix socket this stream is, if it is one (the kernel can
    /// splice it); anything else comes back unchanged.
    fn into_unix(self) -> Result<UnixStream, Self>
    where
        Self: Sized;
}

impl FrontendStream for UnixStream {
    fn into_unix(self) -> Result<UnixStream, Self> {
        Ok(self)
    }
}

impl FrontendStream for TlsStream<TcpStream> {
    fn into_unix(self) -> Result<UnixStream, Self> {
        Err(self)
    }
}

/// Why a relayed HTTP-CONNECT connection was moved in userspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpliceFallback {
    /// `--dataplane=userspace`.
    Disabled,
    /// The frontend is TLS (TCP with mTLS): its bytes are not the tunnelled bytes.
    TlsFrontend,
    /// The relay is TLS (the destination port is not in the agent's plaintext list).
    TlsRelay,
}

impl SpliceFallback {
    fn as_str(self) -> &'static str {
        match self {
            SpliceFallback::Disabled => "dataplane_userspace",
            SpliceFallback::TlsFrontend => "tls_frontend",
            SpliceFallback::TlsRelay => "tls_relay",
        }
    }
}

enum HeaderError {
    Request(RequestError),
    Timeout,
    Io(std::io::Error),
    /// The client closed before sending a whole header.
    Eof,
}

async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    settings: &HttpConnectSettings,
) -> Result<(http_connect::ConnectRequest, BytesMut), HeaderError> {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            if let Some(req) =
                http_connect::parse_request(&buf, settings.max_header_bytes).map_err(HeaderError::Request)?
            {
                return Ok(req);
            }
            let room = settings.max_header_bytes + 1 - buf.len().min(settings.max_header_bytes);
            let mut limited = (&mut buf).limit(room);
            let n = stream.read_buf(&mut limited).await.map_err(HeaderError::Io)?;
            if n == 0 {
                return Err(HeaderError::Eof);
            }
        }
    };
    let req = tokio::time::timeout(settings.header_timeout, read).await.map_err(|_| HeaderError::Timeout)??;
    let rest = buf.split_off(req.header_len);
    Ok((req, rest))
}

use bytes::BufMut;

/// Serves one frontend connection to the end.
pub async fn serve_connection<S: FrontendStream>(
    mut stream: S,
    peer: String,
    registry: Arc<AgentRegistry>,
    settings: Arc<HttpConnectSettings>,
    metrics: ServerMetrics,
) {
    metrics.http_connections.inc();
    let _gauge = scopeguard(metrics.http_connections.clone());
    let (request, rest) = match read_header(&mut stream, &settings).await {
        Ok(x) => x,
        Err(HeaderError::Request(e)) => {
            tracing::info!(%peer, error = %e, "bad CONNECT request");
            let (code, reason) = e.status();
            let body = match &e {
                // Stock's body for other methods.
                RequestError::MethodNotAllowed(_) => "this proxy only supports CONNECT passthrough\n".to_owned(),
                other => format!("{other}\n"),
            };
            let _ = stream.write_all(&http_connect::error_response(code, reason, &body)).await;
            lingering_close(&mut stream).await;
            return;
        }
        Err(HeaderError::Timeout) => {
            tracing::info!(%peer, "client did not send its CONNECT header in time");
            let body = "timed out waiting for the request header\n";
            let _ = stream.write_all(&http_connect::error_response(408, "Request Timeout", body)).await;
            let _ = stream.shutdown().await;
            return;
        }
        Err(HeaderError::Io(e)) => {
            tracing::debug!(%peer, error = %e, "frontend connection failed while reading its header");
            return;
        }
        Err(HeaderError::Eof) => return,
    };

    let address = request.authority;
    let Some(session) = registry.pick(&address) else {
        metrics.dial_failures.with_label_values(&["no_agent"]).inc();
        tracing::info!(%peer, %address, "no agent available");
        let body = "currently no tunnels available: No agent available";
        let _ = stream.write_all(&http_connect::error_response(500, "Internal Server Error", body)).await;
        let _ = stream.shutdown().await;
        return;
    };
    let spec = DialSpec::tcp(address.clone(), true);
    let tunnel = match session.dial(&spec, settings.dial_timeout).await {
        Ok(t) => t,
        Err(e) => {
            let (code, reason, body) = match &e {
                DialError::Agent(msg) => {
                    let (code, reason) = http_connect::dial_error_status(msg);
                    (code, reason, msg.clone())
                }
                DialError::Timeout => (504, "Gateway Timeout", format!("Backend dial timeout: {e}")),
                DialError::Closed(msg) => (502, "Bad Gateway", format!("Backend context error: {msg}")),
                DialError::NoAgent => (500, "Internal Server Error", format!("currently no tunnels available: {e}")),
            };
            tracing::info!(%peer, %address, agent = %session.agent_id, status = code, error = %body, "dial failed");
            let _ = stream.write_all(&http_connect::error_response(code, reason, &body)).await;
            let _ = stream.shutdown().await;
            return;
        }
    };
    if let Err(e) = stream.write_all(http_connect::ESTABLISHED).await {
        tracing::debug!(%peer, error = %e, "frontend left before the tunnel was established");
        let _ = session
            .send(crate::protocol::PacketKind::CloseRequest { connect_id: tunnel.connect_id }.into_packet())
            .await;
        session.release(tunnel.connect_id);
        return;
    }
    let connect_id = tunnel.connect_id;
    tracing::debug!(%peer, %address, agent = %session.agent_id, connect_id, "tunnel established");
    let started = Instant::now();
    let (engine, to_node, from_node, error) = match tunnel.leg {
        Leg::Packets(leg) => {
            let stats = packet_bridge::bridge(stream, leg.into_link(connect_id), Bytes::from(rest)).await;
            session.release(connect_id);
            (EngineKind::Userspace, stats.local_to_peer, stats.peer_to_local, stats.error)
        }
        Leg::Relay(relay) => {
            // Order of the bytes. The "200" is already written, before any
            // byte from the relay is moved, so it precedes the backend's
            // bytes. Bytes the client sent right after its header (`rest`,
            // read with the header) go to the relay now, completely, before
            // either engine starts, so they precede whatever the client sends
            // later. Nothing was read from the relay beyond its preamble, so
            // the backend's bytes all wait, in order, in its receive queue.
            // From here each direction has exactly one path (a pipe, or a
            // userspace buffer) that the engine empties before it refills:
            // unlike a sockmap insert, there is no moment when bytes queued
            // earlier and bytes arriving later take different paths.
            let mut relay = relay.stream;
            let written = match &mut relay {
                RelayStream::Plain(s) => s.write_all(&rest).await,
                RelayStream::Tls(s) => s.write_all(&rest).await,
            };
            if let Err(e) = written {
                tracing::info!(%peer, %address, connect_id, error = %e, "relay socket failed");
                return;
            }
            let stats = join_frontend_and_relay(stream, relay, &settings, &metrics).await;
            (stats.engine, stats.a_to_b + rest.len() as u64, stats.b_to_a, stats.error)
        }
    };
    metrics.connection_duration.observe(started.elapsed().as_secs_f64());
    metrics.dataplane.record(engine, to_node, from_node);
    match error {
        Some(e) => tracing::info!(%peer, %address, connect_id, %engine, error = %e, "tunnel ended with an error"),
        None => tracing::debug!(%peer, %address, connect_id, %engine, up = to_node, down = from_node, "tunnel closed"),
    }
}

/// Moves the bytes of a relayed connection until both directions are done:
/// splice(2) for a unix frontend and a plaintext relay, userspace otherwise
/// (with the reason counted).
async fn join_frontend_and_relay<S: FrontendStream>(
    frontend: S,
    relay: RelayStream,
    settings: &HttpConnectSettings,
    metrics: &ServerMetrics,
) -> SpliceStats {
    let fall_back = |reason: SpliceFallback| {
        metrics.dataplane.fallbacks.with_label_values(&[reason.as_str()]).inc();
    };
    if !settings.kernel_splice {
        fall_back(SpliceFallback::Disabled);
        return engine::userspace(Box::new(frontend), relay.into_boxed()).await;
    }
    let frontend = match frontend.into_unix() {
        Ok(unix) => unix,
        Err(other) => {
            fall_back(SpliceFallback::TlsFrontend);
            return engine::userspace(Box::new(other), relay.into_boxed()).await;
        }
    };
    let relay = match relay {
        RelayStream::Plain(tcp) => tcp,
        tls @ RelayStream::Tls(_) => {
            fall_back(SpliceFallback::TlsRelay);
            return engine::userspace(Box::new(frontend), tls.into_boxed()).await;
        }
    };
    bound_relay_receive_buffer(&relay);
    PipeSplice::new(frontend, relay).run().await
}

/// The receive buffer of a spliced relay socket.
const SPLICED_RELAY_RCVBUF: usize = 2 << 20;

/// For a client that stops reading, the server holds what the relay socket's
/// receive buffer holds (the pipe and the unix socket's buffers are small and
/// fixed). Autotuning would let it grow to `tcp_rmem`'s maximum (32 MiB on
/// this machine kind; 9.8 MB sat there in a stalled 2 GiB download under
/// CPU load), so it is fixed. 2 MiB keeps a window of about 1 MiB open:
/// plenty on loopback and in a data centre, the limit on a long fat link.
fn bound_relay_receive_buffer(relay: &TcpStream) {
    use std::os::fd::AsFd;
    if let Err(e) = crate::dataplane::tcp_state::fix_receive_buffer(relay.as_fd(), SPLICED_RELAY_RCVBUF) {
        tracing::debug!(error = %e, "could not fix the spliced relay's receive buffer");
    }
}

/// Closes after an error reply without resetting the connection: unread
/// request bytes at close would make the kernel send RST, and the client
/// might lose the reply. Reads (and drops) what the client still sends, bounded.
async fn lingering_close<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    const LINGER: Duration = Duration::from_millis(500);
    const MAX_DISCARD: usize = 1 << 20;
    let _ = stream.shutdown().await;
    let mut discarded = 0;
    let mut buf = [0u8; 8192];
    let drain = async {
        while discarded < MAX_DISCARD {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Decrements a gauge when the connection ends, however it ends.
struct GaugeGuard(prometheus::IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn scopeguard(g: prometheus::IntGauge) -> GaugeGuard {
    GaugeGuard(g)
}
