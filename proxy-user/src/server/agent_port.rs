//! The agent port: one TCP listener for agents' gRPC sessions (TLS, ALPN h2)
//! and for their relay sockets, told apart by their first bytes — a relay
//! preamble ("KDRL") for plaintext relays, a TLS handshake otherwise, whose
//! ALPN then says gRPC or TLS relay. Sharing the port keeps konduit's
//! firewall and load-balancer footprint identical to stock.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::relay::{RelayBroker, RelayStream};
use crate::net::{TLS_HANDSHAKE_TIMEOUT, accept_loop, tls_handshake};

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
    accept_loop(listener, "agent", move |stream, peer| {
        let (acceptor, tx, broker) = (acceptor.clone(), tx.clone(), broker.clone());
        async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
                Ok(Ok(1)) => {}
                Ok(_) => return,
                Err(_) => {
                    tracing::warn!(%peer, "agent-port client sent nothing in time");
                    return;
                }
            }
            if first[0] == b'K' {
                if let Err(e) = broker.accept(stream, RelayStream::Plain).await {
                    tracing::warn!(%peer, error = %e, "relay socket refused");
                }
                return;
            }
            let Some(tls) = tls_handshake(&acceptor, stream, peer, "agent").await else { return };
            if tls.get_ref().1.alpn_protocol() == Some(ALPN_RELAY) {
                if let Err(e) = broker.accept(tls, RelayStream::tls).await {
                    tracing::warn!(%peer, error = %e, "TLS relay socket refused");
                }
                return;
            }
            let _ = tx.send(Ok(tls)).await;
        }
    });
    rx
}
