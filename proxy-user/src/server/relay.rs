//! The server's side of the relay extension: session keys, single-use
//! tickets, and accepting relay sockets on the agent port. A relay socket
//! presents its session key (hello) and then one ticket; a valid ticket hands
//! the socket to the dial that issued it, anything else closes only that
//! socket.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::dataplane::SpliceSocket;
use crate::protocol::relay::{self, HELLO_LEN, TOKEN_LEN, Token, Verdict};

/// Deadline for the hello after the socket is accepted.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a warm relay socket may wait for a ticket before it is closed.
pub const WARM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a ticket stays valid after its DIAL_REQ.
pub const TICKET_TTL: Duration = Duration::from_secs(60);

/// A relay socket that presented a valid ticket.
pub struct RelaySocket {
    pub stream: RelayStream,
}

/// What a relay socket is, after its preamble: the data plane may join a
/// plaintext one in the kernel.
pub enum RelayStream {
    /// Plain TCP: the bytes on it are the tunnelled bytes themselves. Nothing
    /// was read from it beyond the preamble (read exactly, unbuffered), so
    /// the next byte in its receive queue is the backend's first.
    Plain(TcpStream),
    /// A TLS relay: only userspace can move its bytes.
    Tls(Box<dyn SpliceSocket>),
}

impl RelayStream {
    /// Wraps a TLS relay.
    pub fn tls<S: SpliceSocket>(stream: S) -> Self {
        RelayStream::Tls(Box::new(stream))
    }

    /// The socket for a userspace engine, whatever it is.
    pub fn into_boxed(self) -> Box<dyn SpliceSocket> {
        match self {
            RelayStream::Plain(s) => Box::new(s),
            RelayStream::Tls(s) => s,
        }
    }
}

struct PendingTicket {
    session_no: u64,
    expires: Instant,
    deliver: oneshot::Sender<RelaySocket>,
}

/// Session keys and outstanding tickets of this server.
#[derive(Default)]
pub struct RelayBroker {
    sessions: Mutex<HashMap<Token, u64>>,
    tickets: Mutex<HashMap<Token, PendingTicket>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a relay socket was refused (logged; the socket gets a verdict byte or is closed).
#[derive(Debug, thiserror::Error)]
pub enum RelayAcceptError {
    #[error("relay socket sent no hello in time")]
    HelloTimeout,
    #[error("relay socket: {0}")]
    Preamble(#[from] relay::PreambleError),
    #[error("relay socket presented an unknown session key")]
    BadSession,
    #[error("relay socket presented an unknown, expired or used ticket")]
    BadTicket,
    #[error("relay socket idle for too long without a ticket")]
    Idle,
    #[error("relay socket i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl RelayBroker {
    /// A key for a new session's relay sockets.
    pub fn open_session(&self, session_no: u64) -> Token {
        let key = Token::random();
        lock(&self.sessions).insert(key, session_no);
        key
    }

    /// Forgets a session's key and its tickets.
    pub fn close_session(&self, key: &Token) {
        if let Some(no) = lock(&self.sessions).remove(key) {
            lock(&self.tickets).retain(|_, t| t.session_no != no);
        }
    }

    /// Issues a ticket for one dial of `session_no`.
    pub fn issue(&self, session_no: u64) -> (Token, oneshot::Receiver<RelaySocket>) {
        let ticket = Token::random();
        let (deliver, rx) = oneshot::channel();
        let now = Instant::now();
        let mut tickets = lock(&self.tickets);
        // Expired tickets go whenever a new one is issued: no timer per ticket.
        tickets.retain(|_, t| t.expires > now && !t.deliver.is_closed());
        tickets.insert(ticket, PendingTicket { session_no, expires: now + TICKET_TTL, deliver });
        (ticket, rx)
    }

    /// Withdraws a ticket whose dial ended without using it.
    pub fn withdraw(&self, ticket: &Token) {
        lock(&self.tickets).remove(ticket);
    }

    /// Number of outstanding tickets (for leak checks).
    pub fn outstanding(&self) -> usize {
        lock(&self.tickets).len()
    }

    /// Serves one relay socket: hello, then (after any idle time) one
    /// ticket; `into_relay` says what kind of relay it is
    /// ([`RelayStream::Plain`] or [`RelayStream::tls`]).
    pub async fn accept<S>(
        &self,
        mut stream: S,
        into_relay: impl FnOnce(S) -> RelayStream,
    ) -> Result<(), RelayAcceptError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let mut hello = [0u8; HELLO_LEN];
        tokio::time::timeout(HELLO_TIMEOUT, stream.read_exact(&mut hello))
            .await
            .map_err(|_| RelayAcceptError::HelloTimeout)??;
        let key = relay::parse_hello(&hello)?;
        let Some(session_no) = lock(&self.sessions).get(&key).copied() else {
            let _ = stream.write_all(&[Verdict::BadSession as u8]).await;
            return Err(RelayAcceptError::BadSession);
        };
        let mut ticket = [0u8; TOKEN_LEN];
        match tokio::time::timeout(WARM_IDLE_TIMEOUT, stream.read_exact(&mut ticket)).await {
            Err(_) => return Err(RelayAcceptError::Idle),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let pending = {
            let mut tickets = lock(&self.tickets);
            match tickets.get(&Token(ticket)) {
                Some(t) if t.session_no == session_no && t.expires > Instant::now() => tickets.remove(&Token(ticket)),
                _ => None,
            }
        };
        let Some(pending) = pending else {
            let _ = stream.write_all(&[Verdict::BadTicket as u8]).await;
            return Err(RelayAcceptError::BadTicket);
        };
        stream.write_all(&[Verdict::Accepted as u8]).await?;
        let socket = RelaySocket { stream: into_relay(stream) };
        // If the dial gave up meanwhile, dropping the socket closes it.
        let _ = pending.deliver.send(socket);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::relay::encode_hello;
    use std::sync::Arc;

    async fn present(broker: Arc<RelayBroker>, key: Token, ticket: Token) -> (Result<(), RelayAcceptError>, u8) {
        let (mut agent, server) = tokio::io::duplex(256);
        let accept = tokio::spawn(async move { broker.accept(server, RelayStream::tls).await });
        agent.write_all(&encode_hello(&key)).await.expect("hello");
        agent.write_all(&ticket.0).await.expect("ticket");
        let mut verdict = [0u8; 1];
        agent.read_exact(&mut verdict).await.expect("verdict");
        (accept.await.expect("joins"), verdict[0])
    }

    #[tokio::test]
    async fn a_ticket_is_single_use_and_bound_to_its_session() {
        let broker = Arc::new(RelayBroker::default());
        let key_a = broker.open_session(1);
        let key_b = broker.open_session(2);
        let (ticket, rx) = broker.issue(1);
        let (wrong_session, verdict) = present(broker.clone(), key_b, ticket).await;
        assert!(matches!(wrong_session, Err(RelayAcceptError::BadTicket)));
        assert_eq!(verdict, Verdict::BadTicket as u8);
        let (ok, verdict) = present(broker.clone(), key_a, ticket).await;
        assert!(ok.is_ok());
        assert_eq!(verdict, Verdict::Accepted as u8);
        assert!(rx.await.is_ok(), "the dial gets the socket");
        let (reused, _) = present(broker.clone(), key_a, ticket).await;
        assert!(matches!(reused, Err(RelayAcceptError::BadTicket)));
        assert_eq!(broker.outstanding(), 0);
    }

    #[tokio::test]
    async fn unknown_session_key_is_refused_before_any_ticket() {
        let broker = Arc::new(RelayBroker::default());
        let (mut agent, server) = tokio::io::duplex(256);
        let b = broker.clone();
        let accept = tokio::spawn(async move { b.accept(server, RelayStream::tls).await });
        agent.write_all(&encode_hello(&Token::random())).await.expect("hello");
        let mut verdict = [0u8; 1];
        agent.read_exact(&mut verdict).await.expect("verdict");
        assert_eq!(verdict[0], Verdict::BadSession as u8);
        assert!(matches!(accept.await.expect("joins"), Err(RelayAcceptError::BadSession)));
    }

    #[tokio::test]
    async fn closing_a_session_voids_its_tickets() {
        let broker = RelayBroker::default();
        let key = broker.open_session(1);
        let (_ticket, _rx) = broker.issue(1);
        broker.close_session(&key);
        assert_eq!(broker.outstanding(), 0);
    }
}
