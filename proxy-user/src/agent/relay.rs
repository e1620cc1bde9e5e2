//! The agent's side of the relay extension: opening relay sockets to the
//! server that issued a ticket (plaintext or TLS), and a warm pool of
//! plaintext sockets that already sent their hello, so a dial costs no
//! extra round trip.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;

use crate::dataplane::SpliceSocket;
use crate::protocol::relay::{self, ALPN_RELAY, Token, Verdict};

/// Deadline for connecting a relay socket and for the server's verdict.
const RELAY_TIMEOUT: Duration = Duration::from_secs(3);
/// Warm sockets older than this are replaced before the server's idle limit (300 s) closes them.
const WARM_MAX_AGE: Duration = Duration::from_secs(240);

/// A relay socket the server accepted for one connection.
pub enum RelayStream {
    /// Carries the tunnelled bytes as they are: the kernel may splice it.
    Plain(TcpStream),
    /// Carries them inside TLS: moved in userspace.
    Tls(Box<dyn SpliceSocket>),
}

impl RelayStream {
    pub fn is_plaintext(&self) -> bool {
        matches!(self, RelayStream::Plain(_))
    }
}

/// Opens relay sockets for one session.
pub struct RelayConnector {
    key: Token,
    address: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    pool: Mutex<VecDeque<(TcpStream, Instant)>>,
    pool_size: usize,
    wanted: Notify,
}

impl RelayConnector {
    /// `tls` is the session's client config; the relay's ALPN is set here.
    pub fn new(
        key: Token,
        address: String,
        server_name: ServerName<'static>,
        tls: &rustls::ClientConfig,
        pool_size: usize,
    ) -> Self {
        let mut relay_tls = tls.clone();
        relay_tls.alpn_protocols = vec![ALPN_RELAY.to_vec()];
        RelayConnector {
            key,
            address,
            server_name,
            tls: TlsConnector::from(Arc::new(relay_tls)),
            pool: Mutex::new(VecDeque::new()),
            pool_size,
            wanted: Notify::new(),
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, VecDeque<(TcpStream, Instant)>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Warm sockets ready now (for tests and metrics).
    pub fn warm(&self) -> usize {
        self.pool().len()
    }

    async fn connect_plain(&self) -> Result<TcpStream, String> {
        let mut tcp = tokio::time::timeout(RELAY_TIMEOUT, TcpStream::connect(&self.address))
            .await
            .map_err(|_| format!("relay connect to {}: timeout", self.address))?
            .map_err(|e| format!("relay connect to {}: {e}", self.address))?;
        crate::net::tune(&tcp);
        tcp.write_all(&relay::encode_hello(&self.key)).await.map_err(|e| format!("relay hello: {e}"))?;
        Ok(tcp)
    }

    /// Keeps the warm pool full until `stop` resolves (the session ended).
    pub async fn keep_warm(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            self.pool().retain(|(_, born)| now.duration_since(*born) < WARM_MAX_AGE);
            while self.warm() < self.pool_size {
                match self.connect_plain().await {
                    Ok(s) => self.pool().push_back((s, Instant::now())),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot warm a relay socket");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = self.wanted.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
        }
    }

    /// Presents `ticket` on a relay socket and waits for the verdict.
    pub async fn open(&self, ticket: Token, plaintext: bool) -> Result<RelayStream, String> {
        if plaintext {
            // A warm socket may have been closed by the server meanwhile: one retry on a fresh one.
            let warm = self.pool().pop_front();
            self.wanted.notify_one();
            if let Some((socket, _)) = warm
                && let Ok(s) = finish(socket, ticket).await
            {
                return Ok(s);
            }
            let fresh = self.connect_plain().await?;
            return finish(fresh, ticket).await;
        }
        let tcp = tokio::time::timeout(RELAY_TIMEOUT, TcpStream::connect(&self.address))
            .await
            .map_err(|_| format!("relay connect to {}: timeout", self.address))?
            .map_err(|e| format!("relay connect to {}: {e}", self.address))?;
        crate::net::tune(&tcp);
        let mut tls = tokio::time::timeout(RELAY_TIMEOUT, self.tls.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| "relay TLS handshake: timeout".to_owned())?
            .map_err(|e| format!("relay TLS handshake: {e}"))?;
        let mut preamble = relay::encode_hello(&self.key).to_vec();
        preamble.extend_from_slice(&ticket.0);
        tls.write_all(&preamble).await.map_err(|e| format!("relay preamble: {e}"))?;
        let verdict = read_verdict(&mut tls).await?;
        check(verdict)?;
        Ok(RelayStream::Tls(Box::new(tls)))
    }
}

async fn read_verdict<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<u8, String> {
    let mut verdict = [0u8; 1];
    tokio::time::timeout(RELAY_TIMEOUT, s.read_exact(&mut verdict))
        .await
        .map_err(|_| "relay verdict: timeout".to_owned())?
        .map_err(|e| format!("relay verdict: {e}"))?;
    Ok(verdict[0])
}

fn check(verdict: u8) -> Result<(), String> {
    match Verdict::from_byte(verdict) {
        Some(Verdict::Accepted) => Ok(()),
        Some(other) => Err(format!("relay refused: {other:?}")),
        None => Err(format!("relay answered an unknown verdict {verdict}")),
    }
}

async fn finish(mut socket: TcpStream, ticket: Token) -> Result<RelayStream, String> {
    socket.write_all(&ticket.0).await.map_err(|e| format!("relay ticket: {e}"))?;
    check(read_verdict(&mut socket).await?)?;
    Ok(RelayStream::Plain(socket))
}
