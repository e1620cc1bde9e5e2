//! The agent port: one TCP listener for agents' gRPC sessions (TLS, ALPN h2)
//! and for their relay sockets, told apart by their first bytes — a relay
//! preamble ("KDRL") for plaintext relays, a TLS handshake otherwise, whose
//! ALPN then says gRPC or TLS relay. Sharing the port keeps konduit's
//! firewall and load-balancer footprint identical to stock.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::relay::RelayBroker;
use crate::net::{TLS_HANDSHAKE_TIMEOUT, tune};

pub use crate::protocol::relay::ALPN_RELAY;

/// Accepts on the agent port; gRPC sessions come out of the returned channel,
/// relay sockets go to `broker`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    broker: Arc<RelayBroker>,
) -> mpsc::Receiver<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on agent port failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            tune(&stream);
            let (acceptor, tx, broker) = (acceptor.clone(), tx.clone(), broker.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                let peeked = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await;
                match peeked {
                    Ok(Ok(1)) => {}
                    Ok(_) => return,
                    Err(_) => {
                        tracing::warn!(%peer, "agent-port client sent nothing in time");
                        return;
                    }
                }
                if first[0] == b'K' {
                    let fd = stream.as_raw_fd();
                    if let Err(e) = broker.accept(stream, true, Some(fd)).await {
                        tracing::warn!(%peer, error = %e, "relay socket refused");
                    }
                    return;
                }
                let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "TLS handshake on agent port failed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "TLS handshake on agent port timed out");
                        return;
                    }
                };
                if tls.get_ref().1.alpn_protocol() == Some(ALPN_RELAY) {
                    if let Err(e) = broker.accept(tls, false, None).await {
                        tracing::warn!(%peer, error = %e, "TLS relay socket refused");
                    }
                    return;
                }
                let _ = tx.send(Ok(tls)).await;
            });
        }
    });
    rx
}
