//! Listening sockets: TCP with the options every tunnel socket gets, TLS
//! handshakes off the accept path (with a deadline), and unix sockets.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::error::{Error, Result, Side};

/// Deadline for a client to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Latency matters more than packet count for tunnelled RPCs.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let keepalive =
        socket2::TcpKeepalive::new().with_time(Duration::from_secs(30)).with_interval(Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&keepalive);
}

pub async fn bind_tcp(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    // socket2 so that an all-interfaces [::] bind also takes IPv4.
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .map_err(|e| Error::io(Side::Local, format!("socket for {what}"), e))?;
    let bind_err = |e| Error::io(Side::Local, format!("bind {what} on {addr}"), e);
    socket.set_reuse_address(true).map_err(bind_err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).map_err(bind_err)?;
    }
    socket.set_nonblocking(true).map_err(bind_err)?;
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(1024).map_err(bind_err)?;
    TcpListener::from_std(socket.into()).map_err(bind_err)
}

pub fn bind_unix(path: &str, delete_existing: bool) -> Result<UnixListener> {
    if delete_existing && Path::new(path).exists() {
        std::fs::remove_file(path).map_err(|e| Error::io(Side::Local, format!("remove stale socket {path}"), e))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| Error::io(Side::Local, format!("bind unix socket {path}"), e))?;
    // Owner and group may connect (as stock): the API server often runs as
    // another user of the socket's group.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o770))
        .map_err(|e| Error::io(Side::Local, format!("set permissions of {path}"), e))?;
    Ok(listener)
}

/// Accepts TCP connections until aborted and hands each (tuned) to its own
/// task, so a slow or hostile client never delays another.
pub fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, on_accept: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tune(&stream);
                    tokio::spawn(on_accept(stream, peer));
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// Completes a TLS handshake within [`TLS_HANDSHAKE_TIMEOUT`]; a failure is
/// logged with the peer and reason and closes only that connection.
pub async fn tls_handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    what: &'static str,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::warn!(%peer, listener = what, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::warn!(%peer, listener = what, "TLS handshake timed out");
            None
        }
    }
}

/// Accepts TLS connections, handshaking concurrently, and yields the finished ones.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    what: &'static str,
) -> mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    accept_loop(listener, what, move |stream, peer| {
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        async move {
            if let Some(tls) = tls_handshake(&acceptor, stream, peer, what).await {
                let _ = tx.send(Ok(tls)).await;
            }
        }
    });
    rx
}
