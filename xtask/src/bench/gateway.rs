//! How a client reaches a backend in each configuration: straight over TCP
//! (direct, or a relay peer's forwarded port), HTTP-CONNECT on konduit's unix
//! socket or mTLS TCP frontend, or konduit's gRPC frontend. Every way yields
//! the same byte stream ([`Tunnel`]), so the workloads never know which one
//! they measure. Clients behave as kube-apiserver does: one connection per
//! tunnel, no TLS session resumption, one single-use gRPC channel per tunnel.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll, ready};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use konduit::protocol::PacketKind;
use konduit::protocol::pb::Packet;
use konduit::protocol::pb::proxy_service_client::ProxyServiceClient;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

/// A byte stream to a backend, whatever carries it.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub type Tunnel = Box<dyn Io>;

/// Which backend a tunnel goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Bulk,
    Echo,
    OneByte,
}

/// An address per backend.
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    pub bulk: SocketAddr,
    pub echo: SocketAddr,
    pub one_byte: SocketAddr,
}

impl Targets {
    pub fn get(&self, target: Target) -> SocketAddr {
        match target {
            Target::Bulk => self.bulk,
            Target::Echo => self.echo,
            Target::OneByte => self.one_byte,
        }
    }
}

/// The entry point of one configuration.
#[derive(Clone)]
pub enum Gateway {
    /// Plain TCP to these addresses (the backends themselves, or a peer's forwarded ports).
    Tcp(Targets),
    /// HTTP-CONNECT on konduit's unix socket frontend; `targets` are what the agent dials.
    HttpConnectUds { path: PathBuf, targets: Targets },
    /// HTTP-CONNECT on konduit's mTLS TCP frontend.
    HttpConnectTls { addr: SocketAddr, tls: TlsConnector, targets: Targets },
    /// `/ProxyService/Proxy` on konduit's unix socket frontend.
    GrpcUds { path: PathBuf, targets: Targets },
}

impl Gateway {
    /// Opens one tunnel to `target`, ready for the client's first byte.
    pub async fn open(&self, target: Target) -> anyhow::Result<Tunnel> {
        match self {
            Gateway::Tcp(targets) => {
                let stream = TcpStream::connect(targets.get(target)).await?;
                stream.set_nodelay(true)?;
                Ok(Box::new(stream))
            }
            Gateway::HttpConnectUds { path, targets } => {
                let stream = UnixStream::connect(path).await.with_context(|| format!("connect {}", path.display()))?;
                Ok(Box::new(http_connect(stream, targets.get(target)).await?))
            }
            Gateway::HttpConnectTls { addr, tls, targets } => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls_pki_types::ServerName::try_from("localhost")?;
                let stream = tls.connect(name, tcp).await.context("TLS handshake with the frontend")?;
                Ok(Box::new(http_connect(stream, targets.get(target)).await?))
            }
            Gateway::GrpcUds { path, targets } => {
                Ok(Box::new(GrpcTunnel::open(path.clone(), targets.get(target)).await?))
            }
        }
    }
}

/// Where an HTTP response header ends (just past the blank line).
pub fn header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The status code of an HTTP/1.x response header.
pub fn response_status(header: &[u8]) -> anyhow::Result<u16> {
    let line = header.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).context("status line is not UTF-8")?.trim_end();
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 status line: {line:?}");
    }
    parts.next().and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("no status code in {line:?}"))
}

async fn http_connect<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, target: SocketAddr) -> anyhow::Result<S> {
    stream.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await?;
    let mut header = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("frontend closed before answering CONNECT ({} bytes read)", header.len());
        }
        header.extend_from_slice(&chunk[..n]);
        if let Some(end) = header_end(&header) {
            let status = response_status(&header)?;
            if status != 200 {
                bail!("CONNECT {target} answered {status}: {}", String::from_utf8_lossy(&header[end..]));
            }
            if end != header.len() {
                bail!("bytes arrived after the CONNECT answer, before the client spoke");
            }
            return Ok(stream);
        }
        if header.len() > 16 * 1024 {
            bail!("CONNECT answer header is larger than 16 KiB");
        }
    }
}

/// Largest DATA packet the client sends (one per write, as the stock client does).
const MAX_DATA: usize = 64 * 1024;
/// Packets queued toward the frontend stream.
const SEND_QUEUE: usize = 64;

static NEXT_RANDOM: AtomicI64 = AtomicI64::new(1);

/// One dial on `/ProxyService/Proxy`, over its own gRPC channel (kube-apiserver's
/// single-use tunnel), as a byte stream.
pub struct GrpcTunnel {
    tx: PollSender<Packet>,
    rx: Streaming<Packet>,
    connect_id: i64,
    pending: Bytes,
    ended: bool,
    _channel: Channel,
}

impl GrpcTunnel {
    pub async fn open(path: PathBuf, target: SocketAddr) -> anyhow::Result<Self> {
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }))
            .await
            .context("connect the gRPC frontend")?;
        let mut client = ProxyServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let random = NEXT_RANDOM.fetch_add(1, Ordering::Relaxed);
        let dial = PacketKind::DialRequest {
            protocol: "tcp".into(),
            address: target.to_string(),
            random,
            relay_ticket: Bytes::new(),
            half_close: false,
        };
        tx.send(dial.into_packet()).await.map_err(|_| anyhow!("gRPC request stream closed"))?;
        let mut inbound = client.proxy(ReceiverStream::new(rx)).await.context("open /ProxyService/Proxy")?.into_inner();
        loop {
            let packet = inbound.message().await?.ok_or_else(|| anyhow!("frontend stream ended before DIAL_RSP"))?;
            if let Ok(PacketKind::DialResponse { random: r, connect_id, error, .. }) = PacketKind::of(packet) {
                if r != random {
                    continue;
                }
                if let Some(error) = error {
                    bail!("dial {target} failed: {error}");
                }
                return Ok(GrpcTunnel {
                    tx: PollSender::new(tx),
                    rx: inbound,
                    connect_id,
                    pending: Bytes::new(),
                    ended: false,
                    _channel: channel,
                });
            }
        }
    }

    fn close_request(&self) -> Packet {
        PacketKind::CloseRequest { connect_id: self.connect_id }.into_packet()
    }
}

impl AsyncRead for GrpcTunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.rx).poll_next(cx)) {
                None => self.ended = true,
                Some(Err(status)) => return Poll::Ready(Err(io::Error::other(status.message().to_owned()))),
                Some(Ok(packet)) => match PacketKind::of(packet) {
                    Ok(PacketKind::Data { error: Some(error), .. }) => {
                        return Poll::Ready(Err(io::Error::other(error)));
                    }
                    Ok(PacketKind::Data { data, .. }) => self.pending = data,
                    Ok(PacketKind::CloseResponse { .. }) => self.ended = true,
                    _ => {}
                },
            }
        }
    }
}

impl AsyncWrite for GrpcTunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "gRPC request stream closed");
        ready!(self.tx.poll_reserve(cx)).map_err(|_| closed())?;
        let n = buf.len().min(MAX_DATA);
        let packet = konduit::protocol::packet::data(self.connect_id, Bytes::copy_from_slice(&buf[..n]));
        self.tx.send_item(packet).map_err(|_| closed())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The stock protocol has no half-close: shutting down closes the connection.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.tx.is_closed() {
            return Poll::Ready(Ok(()));
        }
        if ready!(self.tx.poll_reserve(cx)).is_ok() {
            let close = self.close_request();
            let _ = self.tx.send_item(close);
        }
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

impl Drop for GrpcTunnel {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.get_ref() {
            let _ = tx.try_send(self.close_request());
        }
    }
}

/// The rustls client of the mTLS frontend: trusts only the run's CA, presents
/// the frontend client certificate, never resumes sessions (as kube-apiserver).
pub fn tls_connector(ca_der: &[u8], cert_der: &[u8], key_der: &[u8]) -> anyhow::Result<TlsConnector> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(cert_der.to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.to_vec())),
        )?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_answer_parsing() {
        let ok = b"HTTP/1.1 200 Connection Established\r\n\r\n";
        assert_eq!(header_end(ok), Some(ok.len()));
        assert_eq!(response_status(ok).expect("status"), 200);
        assert_eq!(header_end(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(response_status(b"HTTP/1.0 503 Service Unavailable\r\n\r\nno agent").expect("status"), 503);
        assert!(response_status(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }
}
