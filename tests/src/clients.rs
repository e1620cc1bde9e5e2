//! The frontends' side of konduit (what kube-apiserver does): HTTP-CONNECT
//! over a unix socket or TCP+mTLS, and gRPC `/ProxyService/Proxy` streams with
//! a [`GrpcTunnel`] that speaks the packet protocol for one dial. Plus stream
//! helpers that move deterministic data and check it. Only a client: never
//! listens.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use konduit::protocol::PacketKind;
use konduit::protocol::pb::proxy_service_client::ProxyServiceClient;
use konduit::protocol::pb::{self, Packet, PacketType, packet::Payload};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::data::{PatternCheck, pattern_fill};
use crate::pki::{Identity, Pki, server_name};

/// A gRPC client of konduit's frontend.
pub type ProxyClient = ProxyServiceClient<Channel>;

/// How long a client waits for the server's answer to a CONNECT or DIAL_REQ.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// Why an HTTP-CONNECT did not produce a tunnel.
#[derive(Debug)]
pub enum ConnectError {
    /// The connection or TLS handshake failed, or the server closed without an answer.
    Io(io::Error),
    /// The server answered with a status other than 200.
    Refused {
        /// The status code (405, 500, 502, 503, 504…).
        status: u16,
        /// The whole response head (status line and headers).
        head: String,
        /// The body (the error text).
        body: String,
    },
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Io(e) => write!(f, "CONNECT failed: {e}"),
            ConnectError::Refused { status, body, .. } => {
                write!(f, "CONNECT refused with {status}: {}", body.trim())
            }
        }
    }
}

impl std::error::Error for ConnectError {}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        ConnectError::Io(e)
    }
}

impl ConnectError {
    /// The refusal's status code, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ConnectError::Refused { status, .. } => Some(*status),
            ConnectError::Io(_) => None,
        }
    }
}

/// The request kube-apiserver sends for `target` (`host:port`).
pub fn connect_request(target: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
}

/// Sends `request` (normally [`connect_request`]) and reads the answer. On 200 the stream
/// is returned positioned at the first tunnelled byte (the head is read byte by byte, so
/// nothing after it is consumed).
pub async fn http_connect_with<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
) -> Result<S, ConnectError> {
    stream.write_all(request).await?;
    let head = tokio::time::timeout(ANSWER_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer to CONNECT"))??;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad answer {head:?}")))?;
    if status == 200 {
        return Ok(stream);
    }
    let content_length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
    });
    let mut body = Vec::new();
    let read_body = async {
        match content_length {
            Some(n) => {
                body.resize(n, 0);
                stream.read_exact(&mut body).await.map(|_| ())
            }
            None => stream.read_to_end(&mut body).await.map(|_| ()),
        }
    };
    // A body that never ends is still a refusal; report what arrived.
    let _ = tokio::time::timeout(Duration::from_secs(5), read_body).await;
    Err(ConnectError::Refused { status, head, body: String::from_utf8_lossy(&body).into_owned() })
}

/// Reads up to and including the blank line; returns the head without it.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "answer head over 64 KiB"));
        }
        if stream.read(&mut byte).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed after {:?}", String::from_utf8_lossy(&head)),
            ));
        }
        head.push(byte[0]);
    }
    head.truncate(head.len() - 4);
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// HTTP-CONNECT to `target` through the unix-socket frontend at `path`.
pub async fn http_connect_uds(path: &Path, target: &str) -> Result<UnixStream, ConnectError> {
    let stream = UnixStream::connect(path).await?;
    http_connect_with(stream, connect_request(target).as_bytes()).await
}

/// A TLS connection to `addr` trusting the PKI's CA, presenting `identity` if given.
pub async fn tls_connect(
    addr: SocketAddr,
    pki: &Pki,
    identity: Option<&Identity>,
    alpn: &[&[u8]],
) -> io::Result<TlsStream<TcpStream>> {
    let config = Arc::new(pki.client_config(identity, alpn));
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(config).connect(server_name(addr.ip()), tcp).await
}

/// HTTP-CONNECT to `target` through the TCP+mTLS frontend at `addr`, presenting the
/// PKI's frontend client certificate.
pub async fn http_connect_tls(addr: SocketAddr, pki: &Pki, target: &str) -> Result<TlsStream<TcpStream>, ConnectError> {
    http_connect_tls_as(addr, pki, Some(&pki.frontend), target).await
}

/// Like [`http_connect_tls`] with another (or no) client certificate.
pub async fn http_connect_tls_as(
    addr: SocketAddr,
    pki: &Pki,
    identity: Option<&Identity>,
    target: &str,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let mut stream = tls_connect(addr, pki, identity, &[b"http/1.1"]).await?;
    // TLS 1.3 client-certificate rejections arrive with the first read, not the handshake;
    // flushing here makes them surface as an I/O error from the exchange below.
    stream.flush().await?;
    http_connect_with(stream, connect_request(target).as_bytes()).await
}

/// A gRPC client over the unix-socket frontend at `path`.
pub async fn grpc_uds(path: &Path) -> Result<ProxyClient, tonic::transport::Error> {
    let path: PathBuf = path.to_path_buf();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(ProxyServiceClient::new(channel))
}

/// A gRPC client over the TCP+mTLS frontend at `addr` with the PKI's frontend certificate.
pub async fn grpc_tls(addr: SocketAddr, pki: &Pki) -> Result<ProxyClient, tonic::transport::Error> {
    grpc_tls_as(addr, pki, Some(&pki.frontend)).await
}

/// Like [`grpc_tls`] with another (or no) client certificate.
pub async fn grpc_tls_as(
    addr: SocketAddr,
    pki: &Pki,
    identity: Option<&Identity>,
) -> Result<ProxyClient, tonic::transport::Error> {
    let config = Arc::new(pki.client_config(identity, &[b"h2"]));
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let config = config.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let tls = TlsConnector::from(config).connect(server_name(addr.ip()), tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(ProxyServiceClient::new(channel))
}

/// Why a gRPC dial did not produce a tunnel.
#[derive(Debug)]
pub enum DialError {
    /// The RPC itself failed (connection, TLS, status).
    Rpc(tonic::Status),
    /// DIAL_RSP carried this error (e.g. `No agent available`, a dial error).
    Refused(String),
    /// The stream ended before DIAL_RSP.
    Ended,
    /// No DIAL_RSP within [`ANSWER_TIMEOUT`].
    Timeout,
    /// Something other than DIAL_RSP arrived first.
    Unexpected(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Rpc(s) => write!(f, "Proxy RPC failed: {s}"),
            DialError::Refused(e) => write!(f, "dial refused: {e}"),
            DialError::Ended => f.write_str("stream ended before DIAL_RSP"),
            DialError::Timeout => f.write_str("no DIAL_RSP in time"),
            DialError::Unexpected(p) => write!(f, "unexpected packet before DIAL_RSP: {p}"),
        }
    }
}

impl std::error::Error for DialError {}

/// A non-negative random dial id, like stock's `rand.Int63()`.
pub fn dial_random() -> i64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    (crate::data::splitmix64(nanos ^ NEXT.fetch_add(1, Ordering::Relaxed)) & i64::MAX as u64) as i64
}

// Packets are built from the generated structs with `..Default::default()`, so konduit's
// extension fields keep their stock (absent) values: this client behaves like stock.

/// DIAL_REQ{protocol "tcp", address, random}, as a stock frontend sends it.
pub fn dial_request_packet(address: &str, random: i64) -> Packet {
    Packet {
        r#type: PacketType::DialReq as i32,
        payload: Some(Payload::DialRequest(pb::DialRequest {
            protocol: "tcp".into(),
            address: address.into(),
            random,
            ..Default::default()
        })),
    }
}

/// DATA{connectID, data}.
pub fn data_packet(connect_id: i64, data: Bytes) -> Packet {
    Packet {
        r#type: PacketType::Data as i32,
        payload: Some(Payload::Data(pb::Data { connect_id, data, ..Default::default() })),
    }
}

/// CLOSE_REQ{connectID}.
pub fn close_request_packet(connect_id: i64) -> Packet {
    Packet {
        r#type: PacketType::CloseReq as i32,
        payload: Some(Payload::CloseRequest(pb::CloseRequest { connect_id })),
    }
}

/// DIAL_CLS{random}: cancels a pending dial.
pub fn dial_close_packet(random: i64) -> Packet {
    Packet { r#type: PacketType::DialCls as i32, payload: Some(Payload::CloseDial(pb::CloseDial { random })) }
}

/// Largest DATA payload [`GrpcTunnel::write`] sends (stock frontends send 32 KiB reads).
pub const DATA_CHUNK: usize = 32 * 1024;

/// One dialled connection on a `/ProxyService/Proxy` stream.
pub struct GrpcTunnel {
    outbound: mpsc::Sender<Packet>,
    inbound: tonic::Streaming<Packet>,
    connect_id: i64,
    pending: Bytes,
    close: Option<Option<String>>,
}

fn closed_stream() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "Proxy stream closed")
}

impl GrpcTunnel {
    /// Opens a Proxy stream, sends DIAL_REQ{tcp, address, random} and waits for DIAL_RSP.
    pub async fn dial(client: &mut ProxyClient, address: &str) -> Result<GrpcTunnel, DialError> {
        let random = dial_random();
        let request = dial_request_packet(address, random);
        let (outbound, rx) = mpsc::channel(64);
        // Queued before the call: a server may send its response headers only with DIAL_RSP.
        outbound.send(request).await.map_err(|_| DialError::Ended)?;
        let answer = async {
            let mut inbound = client.proxy(ReceiverStream::new(rx)).await.map_err(DialError::Rpc)?.into_inner();
            loop {
                let packet = inbound.message().await.map_err(DialError::Rpc)?.ok_or(DialError::Ended)?;
                match PacketKind::of(packet) {
                    Ok(PacketKind::DialResponse { random: r, connect_id, error, .. }) if r == random => {
                        return match error {
                            Some(e) => Err(DialError::Refused(e)),
                            None => Ok((inbound, connect_id)),
                        };
                    }
                    Ok(PacketKind::WindowUpdate { .. }) => continue,
                    Ok(other) => return Err(DialError::Unexpected(format!("{other:?}"))),
                    Err(e) => return Err(DialError::Unexpected(e.to_string())),
                }
            }
        };
        let (inbound, connect_id) =
            tokio::time::timeout(ANSWER_TIMEOUT, answer).await.map_err(|_| DialError::Timeout)??;
        Ok(GrpcTunnel { outbound, inbound, connect_id, pending: Bytes::new(), close: None })
    }

    /// The connectID the agent assigned.
    pub fn connect_id(&self) -> i64 {
        self.connect_id
    }

    /// Sends any packet on the stream (for protocol-level tests).
    pub async fn send_packet(&self, packet: Packet) -> io::Result<()> {
        self.outbound.send(packet).await.map_err(|_| closed_stream())
    }

    /// The next packet from the server, whatever it is; `None` when the stream ended.
    pub async fn next_packet(&mut self) -> io::Result<Option<PacketKind>> {
        match self.inbound.message().await {
            Ok(Some(p)) => PacketKind::of(p).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Ok(None) => Ok(None),
            Err(status) => Err(io::Error::other(status)),
        }
    }

    /// Sends `data` as DATA packets of at most [`DATA_CHUNK`] bytes.
    pub async fn write(&self, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(DATA_CHUNK) {
            self.send_packet(data_packet(self.connect_id, Bytes::copy_from_slice(chunk))).await?;
        }
        Ok(())
    }

    /// The next DATA payload; `None` once CLOSE_RSP arrived or the stream ended.
    pub async fn read(&mut self) -> io::Result<Option<Bytes>> {
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(&mut self.pending)));
        }
        if self.close.is_some() {
            return Ok(None);
        }
        loop {
            match self.next_packet().await? {
                Some(PacketKind::Data { connect_id, data, error, .. }) if connect_id == self.connect_id => {
                    if let Some(e) = error {
                        return Err(io::Error::other(format!("DATA carried error {e:?}")));
                    }
                    if !data.is_empty() {
                        return Ok(Some(data));
                    }
                }
                Some(PacketKind::CloseResponse { connect_id, error, .. }) if connect_id == self.connect_id => {
                    self.close = Some(error);
                    return Ok(None);
                }
                Some(PacketKind::WindowUpdate { .. }) => {}
                Some(other) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected {other:?}")));
                }
                None => {
                    self.close = Some(Some("stream ended".into()));
                    return Ok(None);
                }
            }
        }
    }

    /// Reads exactly `n` bytes.
    pub async fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let mut chunk = self.read().await?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, format!("closed after {} of {n} bytes", out.len()))
            })?;
            let take = (n - out.len()).min(chunk.len());
            out.extend_from_slice(&chunk.split_to(take));
            self.pending = chunk;
        }
        Ok(out)
    }

    /// Reads until CLOSE_RSP (the backend closed) or the stream ends.
    pub async fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(chunk) = self.read().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// The CLOSE_RSP seen so far: `Some(None)` clean, `Some(Some(e))` with an error.
    pub fn close_response(&self) -> Option<Option<&str>> {
        self.close.as_ref().map(|e| e.as_deref())
    }

    /// Sends CLOSE_REQ and waits (dropping any DATA still in flight) for CLOSE_RSP.
    /// Returns the CLOSE_RSP's error, if any.
    pub async fn close_req(&mut self) -> io::Result<Option<String>> {
        if self.close.is_none() {
            self.send_packet(close_request_packet(self.connect_id)).await?;
        }
        let wait = async {
            while self.read().await?.is_some() {}
            Ok::<_, io::Error>(())
        };
        tokio::time::timeout(ANSWER_TIMEOUT, wait)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no CLOSE_RSP"))??;
        Ok(self.close.clone().flatten())
    }
}

impl GrpcTunnel {
    /// Turns the tunnel into an ordinary byte stream (for TLS or HTTP through a gRPC
    /// tunnel): two tasks pump bytes between the returned stream and DATA packets. EOF
    /// from the caller sends CLOSE_REQ (the gRPC protocol cannot half-close); CLOSE_RSP
    /// ends the returned stream's read side. Needs a tokio runtime.
    pub fn into_stream(self) -> tokio::io::DuplexStream {
        let (user, pump) = tokio::io::duplex(256 * 1024);
        let (mut from_user, mut to_user) = tokio::io::split(pump);
        let outbound = self.outbound.clone();
        let connect_id = self.connect_id;
        let mut tunnel = self;
        tokio::spawn(async move {
            let mut buf = vec![0; DATA_CHUNK];
            loop {
                match from_user.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let packet = data_packet(connect_id, Bytes::copy_from_slice(&buf[..n]));
                        if outbound.send(packet).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = outbound.send(close_request_packet(connect_id)).await;
        });
        tokio::spawn(async move {
            while let Ok(Some(chunk)) = tunnel.read().await {
                if to_user.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = to_user.shutdown().await;
        });
        user
    }
}

/// `GET path` over HTTPS on an established stream (e.g. a tunnel to a kubelet), trusting
/// the PKI's CA for server `ip`. Returns the parsed response.
pub async fn https_get<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    pki: &Pki,
    ip: std::net::IpAddr,
    path: &str,
) -> io::Result<crate::probe::HttpResponse> {
    let config = Arc::new(pki.client_config(None, &[b"http/1.1"]));
    let tls = TlsConnector::from(config).connect(server_name(ip), stream).await?;
    crate::probe::http_get_on(tls, &ip.to_string(), path).await
}

/// Writes the first `len` bytes of pattern `seed` to `w`.
pub async fn write_pattern<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0; 256 * 1024];
    let mut sent = 0;
    while sent < len {
        let n = (len - sent).min(buf.len() as u64) as usize;
        pattern_fill(seed, sent, &mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    w.flush().await
}

/// Reads `r` to EOF and checks it is exactly the first `len` bytes of pattern `seed`.
pub async fn read_pattern<R: AsyncRead + Unpin>(r: &mut R, seed: u64, len: u64) -> io::Result<()> {
    let mut check = PatternCheck::new(seed);
    let mut buf = vec![0; 256 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        check.update(&buf[..n]);
    }
    check.finish(len).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Asks a [`crate::backends::Kind::Source`] backend (at the far end of `stream`) for
/// `len` bytes and checks them, reading to EOF.
pub async fn fetch_from_source<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, len: u64) -> io::Result<()> {
    stream.write_all(&len.to_be_bytes()).await?;
    stream.flush().await?;
    read_pattern(stream, crate::data::SOURCE_SEED, len).await
}
