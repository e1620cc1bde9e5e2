//! The data plane: how the bytes of one established tunnelled connection
//! move. Owns the engine interface and its implementations; knows nothing of
//! sessions, routing or authentication.
//!
//! Two kinds of leg exist:
//! - a DATA-packet leg on a shared gRPC stream ([`packet_bridge`]), the stock
//!   protocol, always moved in userspace;
//! - a socket leg (a raw relay socket, one per tunnelled connection), moved by
//!   a [`SpliceEngine`] in userspace, by the eBPF sockmap engine where it loads
//!   (agent: relay ⇄ backend), or by splice(2) through pipes ([`pipe_splice`];
//!   server: unix-socket frontend ⇄ plaintext relay).

pub mod engine;
pub mod flow;
pub mod kernel_splice;
pub mod packet_bridge;
pub mod pipe_splice;
pub mod sockmap;
pub mod tcp_state;
pub mod userspace_copy;
pub mod valve;

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// Which engine moved a connection's bytes (logged and counted per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EngineKind {
    /// Userspace: DATA packets or a tokio copy between two sockets.
    #[default]
    Userspace,
    /// Kernel: the eBPF sockmap program joins the two sockets.
    Sockmap,
    /// Kernel pages moved by splice(2) through a pipe, driven from userspace
    /// (the server's unix-socket frontend and a plaintext relay).
    Splice,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Userspace => "userspace",
            EngineKind::Sockmap => "sockmap",
            EngineKind::Splice => "splice",
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bytes moved by a splice, each direction, and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpliceStats {
    pub engine: EngineKind,
    pub a_to_b: u64,
    pub b_to_a: u64,
    /// Of those, bytes the sockmap engine's valve moved in userspace (rule 7).
    pub passed: u64,
    /// Bytes of retransmitted segments the sockmap engine received twice and
    /// forwarded once (rule 9).
    pub trimmed: u64,
    pub error: Option<String>,
}

/// A stream socket an engine can join to another.
pub trait SpliceSocket: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Makes the coming close an abort the peer can see (RST on TCP), so that
    /// a connection reset on one side does not end as a clean EOF on the
    /// other. Sockets without an abort (unix, in-memory) close as usual.
    fn abort_on_close(&self) {}
}

impl SpliceSocket for tokio::net::TcpStream {
    fn abort_on_close(&self) {
        // Best effort: the socket is about to close either way.
        let _ = tcp_state::abort_on_close(self);
    }
}

impl SpliceSocket for tokio::net::UnixStream {}

impl SpliceSocket for tokio::io::DuplexStream {}

impl<S: SpliceSocket> SpliceSocket for tokio_rustls::server::TlsStream<S> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close();
    }
}

impl<S: SpliceSocket> SpliceSocket for tokio_rustls::client::TlsStream<S> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close();
    }
}

pub type SpliceFuture = Pin<Box<dyn Future<Output = SpliceStats> + Send>>;

/// Joins two stream sockets of one tunnelled connection until both
/// directions are done, propagating half-close.
pub trait SpliceEngine: Send + Sync {
    fn kind(&self) -> EngineKind;
    fn splice(&self, a: Box<dyn SpliceSocket>, b: Box<dyn SpliceSocket>) -> SpliceFuture;
}

/// The userspace engine: a copy in each direction ([`userspace_copy`]), with half-close.
#[derive(Debug, Default, Clone, Copy)]
pub struct UserspaceEngine;

impl SpliceEngine for UserspaceEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Userspace
    }

    fn splice(&self, a: Box<dyn SpliceSocket>, b: Box<dyn SpliceSocket>) -> SpliceFuture {
        Box::pin(async move {
            let (copied, error, a, b) = userspace_copy::copy_both_ways(a, b).await;
            // One side was reset: a plain close would tell the other side the
            // connection ended cleanly. Other failures (a TLS peer that closed
            // without close_notify) still end with a close.
            if let Some(e) = &error
                && matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted)
            {
                a.abort_on_close();
                b.abort_on_close();
            }
            SpliceStats {
                a_to_b: copied.a_to_b,
                b_to_a: copied.b_to_a,
                error: error.map(|e| e.to_string()),
                ..Default::default()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn userspace_engine_copies_both_ways_and_propagates_half_close() {
        let (a_outer, a_inner) = tokio::io::duplex(1024);
        let (b_outer, b_inner) = tokio::io::duplex(1024);
        let engine = UserspaceEngine;
        let splice = tokio::spawn(engine.splice(Box::new(a_inner), Box::new(b_inner)));
        let (mut a_read, mut a_write) = tokio::io::split(a_outer);
        let (mut b_read, mut b_write) = tokio::io::split(b_outer);
        a_write.write_all(b"ping").await.expect("write");
        a_write.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        b_read.read_to_end(&mut got).await.expect("read to EOF");
        assert_eq!(got, b"ping");
        b_write.write_all(b"pong").await.expect("write back after half-close");
        b_write.shutdown().await.expect("close");
        let mut back = Vec::new();
        a_read.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"pong");
        let stats = splice.await.expect("joins");
        assert_eq!((stats.a_to_b, stats.b_to_a), (4, 4));
    }

    /// (outer, inner) ends of a loopback TCP connection.
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let outer = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (inner, _) = listener.accept().await.expect("accept");
        (outer, inner)
    }

    #[tokio::test]
    async fn userspace_engine_passes_a_reset_on_as_a_reset_not_as_a_clean_end() {
        for reset_first_side in [true, false] {
            let (mut a_outer, a_inner) = tcp_pair().await;
            let (mut b_outer, b_inner) = tcp_pair().await;
            let splice = tokio::spawn(UserspaceEngine.splice(Box::new(a_inner), Box::new(b_inner)));
            a_outer.write_all(b"request").await.expect("write");
            let mut got = [0u8; 7];
            b_outer.read_exact(&mut got).await.expect("request arrives");
            let (resetting, mut survivor) = if reset_first_side { (a_outer, b_outer) } else { (b_outer, a_outer) };
            tcp_state::abort_on_close(&resetting).expect("linger 0");
            drop(resetting);
            let mut buf = [0u8; 8];
            let result = survivor.read(&mut buf).await;
            assert!(
                matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "the other side sees a reset (reset side first: {reset_first_side}), got {result:?}"
            );
            assert!(splice.await.expect("joins").error.is_some(), "the engine reports the failure");
        }
    }
}
