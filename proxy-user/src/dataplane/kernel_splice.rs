//! The userspace half of the sockmap engine: everything the kernel does not
//! do when it splices two TCP sockets. The kernel redirects payload between
//! the sockets; this module decides whether a pair may be spliced at all,
//! watches both sockets without ever reading them, passes half-close and
//! abort on, waits for in-flight bytes before a FIN, and removes the pair
//! when both directions are done. Rule numbers refer to SOCKMAP-NOTES.md.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::tcp_state::{self, TCP_ESTABLISHED, TcpCounters};
use super::{EngineKind, SpliceStats};

/// Where pairs of sockets are joined (the eBPF SockHash, or a stand-in in tests).
pub trait PairMap: Send + Sync + 'static {
    /// What `remove` needs to undo an insert.
    type Pair: Send;
    /// Joins `a` and `b`: from now on the kernel moves every byte either receives to the other.
    fn insert(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<Self::Pair, String>;
    /// Separates them again.
    fn remove(&self, pair: Self::Pair);
}

/// Why a pair is moved in userspace instead (counted per reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSpliced {
    /// Bytes were already queued on a socket (a backend that speaks first):
    /// joining now could reorder them against what the kernel redirects.
    DataQueued,
    /// A socket had left ESTABLISHED (rule 6: the map refuses it).
    NotEstablished,
    /// The map refused the pair for another reason.
    InsertFailed,
}

impl NotSpliced {
    pub fn as_str(self) -> &'static str {
        match self {
            NotSpliced::DataQueued => "data_queued",
            NotSpliced::NotEstablished => "not_established",
            NotSpliced::InsertFailed => "insert_failed",
        }
    }
}

/// How long to wait between checks that redirected bytes have left
/// (rule 2), growing from the first to the last.
const DRAIN_POLL: [Duration; 4] =
    [Duration::from_micros(50), Duration::from_micros(500), Duration::from_millis(2), Duration::from_millis(10)];

/// Baselines of one direction, taken at insert time (rule 2).
#[derive(Debug, Clone, Copy)]
struct Direction {
    source_base: TcpCounters,
    sink_base: TcpCounters,
    sink_outq_base: usize,
}

impl Direction {
    /// Bytes the source received since the insert, and how many of them the
    /// sink has passed to its TCP stack (acked or queued). FIN counts one on
    /// the source side, hence `- 1` once EOF was seen.
    fn progress(&self, source: BorrowedFd<'_>, sink: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
        let received = tcp_state::counters(source)?.bytes_received - self.source_base.bytes_received;
        let sink_now = tcp_state::counters(sink)?;
        let passed = (sink_now.bytes_acked + tcp_state::unacked_send_queue(sink)? as u64)
            .saturating_sub(self.sink_base.bytes_acked + self.sink_outq_base as u64);
        Ok((received, passed))
    }
}

/// Decides whether `a` and `b` can be joined in the kernel right now.
pub fn spliceable(a: &TcpStream, b: &TcpStream) -> Result<(), NotSpliced> {
    for s in [a, b] {
        let fd = s.as_fd();
        match tcp_state::counters(fd) {
            Ok(c) if c.state == TCP_ESTABLISHED => {}
            _ => return Err(NotSpliced::NotEstablished),
        }
        if tcp_state::readable_bytes(fd).unwrap_or(1) > 0 {
            return Err(NotSpliced::DataQueued);
        }
    }
    Ok(())
}

/// Outcome of watching one socket.
enum Event {
    /// The peer sent FIN: this direction has no more bytes to come.
    Eof,
    /// The connection failed (RST or error): abort the other side too.
    Failed(io::Error),
}

/// Waits until `s` reports EOF or an error, never reading it (rule 4).
/// `fin_sent` says whether we already half-closed `s` ourselves.
async fn watch(s: &TcpStream, fin_sent: &AtomicBool) -> Event {
    loop {
        let ready = match s.ready(Interest::READABLE).await {
            Ok(r) => r,
            Err(e) => return Event::Failed(e),
        };
        if ready.is_error() || ready.is_read_closed() {
            // A peer's FIN leaves the socket in CLOSE_WAIT (or, if we had sent our
            // FIN, in CLOSE via TIME_WAIT); a reset leaves it in CLOSE whether or
            // not its SO_ERROR is still pending.
            let closed = tcp_state::counters(s.as_fd()).is_ok_and(|c| c.state == tcp_state::TCP_CLOSE);
            let reset = closed && !fin_sent.load(Ordering::Acquire);
            return match tcp_state::take_error(s) {
                Ok(Some(e)) => Event::Failed(e),
                Ok(None) if ready.is_read_closed() && !reset => Event::Eof,
                Ok(None) => Event::Failed(io::ErrorKind::ConnectionReset.into()),
                Err(e) => Event::Failed(e),
            };
        }
        // Readable without EOF: the verdict takes the bytes; clear the readiness and wait again.
        let _ = s.try_io(Interest::READABLE, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
        tokio::task::yield_now().await;
    }
}

/// Waits until everything `source` received has left `sink` toward its peer
/// (rule 2), then half-closes `sink` (rule 1).
async fn drain_then_shutdown(
    dir: Direction,
    source: &TcpStream,
    sink: &TcpStream,
    sink_fin_sent: &AtomicBool,
) -> io::Result<u64> {
    let mut step = 0;
    loop {
        let (received, passed) = dir.progress(source.as_fd(), sink.as_fd())?;
        // The FIN is in `received` but never redirected (rule 3 drops it).
        let payload = received.saturating_sub(1);
        if passed >= payload {
            sink_fin_sent.store(true, Ordering::Release);
            tcp_state::shutdown_write(sink)?;
            return Ok(payload);
        }
        tokio::time::sleep(DRAIN_POLL[step]).await;
        step = (step + 1).min(DRAIN_POLL.len() - 1);
    }
}

/// A pair joined in the kernel, not yet watched. Made by [`join`]; the
/// caller answers the dial in between, so that the client's first byte comes
/// after the insert (no reordering).
pub struct Joined<M: PairMap> {
    map: Arc<M>,
    pair: M::Pair,
    a: TcpStream,
    b: TcpStream,
    a_to_b: Direction,
    b_to_a: Direction,
}

/// Joins `a` and `b` in `map` (the caller checked [`spliceable`]). On
/// refusal both sockets come back with the reason, for the userspace engine.
pub fn join<M: PairMap>(
    map: &Arc<M>,
    a: TcpStream,
    b: TcpStream,
) -> Result<Joined<M>, (NotSpliced, TcpStream, TcpStream)> {
    let base = |s: &TcpStream| tcp_state::counters(s.as_fd()).ok().zip(tcp_state::unacked_send_queue(s.as_fd()).ok());
    let (Some((a_base, a_outq)), Some((b_base, b_outq))) = (base(&a), base(&b)) else {
        return Err((NotSpliced::NotEstablished, a, b));
    };
    let pair = match map.insert(a.as_fd(), b.as_fd()) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "sockmap insert refused");
            let established =
                [&a, &b].iter().all(|s| tcp_state::counters(s.as_fd()).is_ok_and(|c| c.state == TCP_ESTABLISHED));
            let reason = if established { NotSpliced::InsertFailed } else { NotSpliced::NotEstablished };
            return Err((reason, a, b));
        }
    };
    Ok(Joined {
        map: map.clone(),
        pair,
        a,
        b,
        a_to_b: Direction { source_base: a_base, sink_base: b_base, sink_outq_base: b_outq },
        b_to_a: Direction { source_base: b_base, sink_base: a_base, sink_outq_base: a_outq },
    })
}

/// Splices `a` and `b` with `map` until both directions are done (join, then run).
pub async fn splice<M: PairMap>(
    map: &Arc<M>,
    a: TcpStream,
    b: TcpStream,
) -> Result<SpliceStats, (NotSpliced, TcpStream, TcpStream)> {
    Ok(join(map, a, b)?.run().await)
}

impl<M: PairMap> Joined<M> {
    /// Watches the pair until both directions are done or one aborts, then
    /// removes it from the map.
    pub async fn run(self) -> SpliceStats {
        let Joined { map, pair, a, b, a_to_b, b_to_a } = self;
        let mut stats = SpliceStats { engine: EngineKind::Sockmap, ..Default::default() };
        let (a_fin_sent, b_fin_sent) = (AtomicBool::new(false), AtomicBool::new(false));
        let forward = async {
            match watch(&a, &a_fin_sent).await {
                Event::Eof => drain_then_shutdown(a_to_b, &a, &b, &b_fin_sent).await.map_err(Some),
                Event::Failed(e) => Err(Some(e)),
            }
        };
        let backward = async {
            match watch(&b, &b_fin_sent).await {
                Event::Eof => drain_then_shutdown(b_to_a, &b, &a, &a_fin_sent).await.map_err(Some),
                Event::Failed(e) => Err(Some(e)),
            }
        };
        tokio::pin!(forward, backward);
        let (mut fwd, mut bwd) = (None, None);
        while fwd.is_none() || bwd.is_none() {
            tokio::select! {
                r = &mut forward, if fwd.is_none() => fwd = Some(r),
                r = &mut backward, if bwd.is_none() => bwd = Some(r),
            }
            // An abort on either side is passed on as an abort (RST) at once.
            let failed = matches!(fwd, Some(Err(_))) || matches!(bwd, Some(Err(_)));
            if failed {
                let _ = tcp_state::abort_on_close(&a);
                let _ = tcp_state::abort_on_close(&b);
                break;
            }
        }
        map.remove(pair);
        let moved =
            |d: &Direction, s: &TcpStream, k: &TcpStream| d.progress(s.as_fd(), k.as_fd()).map(|(_, p)| p).unwrap_or(0);
        // A finished direction knows its exact payload; an aborted one reports what had passed.
        stats.a_to_b = match &fwd {
            Some(Ok(n)) => *n,
            _ => moved(&a_to_b, &a, &b),
        };
        stats.b_to_a = match &bwd {
            Some(Ok(n)) => *n,
            _ => moved(&b_to_a, &b, &a),
        };
        stats.error = [fwd, bwd].into_iter().flatten().find_map(|r| r.err().flatten()).map(|e| e.to_string());
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Stands in for the kernel: moves payload between the pair in tasks,
    /// and, like the verdict program, never forwards EOF (rule 1).
    #[derive(Default)]
    struct CopyingMap {
        inserted: tokio::sync::Notify,
    }

    impl PairMap for CopyingMap {
        type Pair = (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>);

        fn insert(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> Result<Self::Pair, String> {
            let open = |fd: BorrowedFd<'_>| -> Result<TcpStream, String> {
                let owned = fd.try_clone_to_owned().map_err(|e| e.to_string())?;
                TcpStream::from_std(std::net::TcpStream::from(owned)).map_err(|e| e.to_string())
            };
            // tokio::io::split halves never shut the socket down when dropped.
            let (a_read, a_write) = tokio::io::split(open(a)?);
            let (b_read, b_write) = tokio::io::split(open(b)?);
            async fn pump(mut from: tokio::io::ReadHalf<TcpStream>, mut to: tokio::io::WriteHalf<TcpStream>) {
                let mut buf = vec![0u8; 64 * 1024];
                // Slow on purpose, so that EOF is seen while bytes are still in flight.
                while let Ok(n) = from.read(&mut buf).await {
                    if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            let pair = (tokio::spawn(pump(a_read, b_write)), tokio::spawn(pump(b_read, a_write)));
            self.inserted.notify_one();
            Ok(pair)
        }

        fn remove(&self, pair: Self::Pair) {
            pair.0.abort();
            pair.1.abort();
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    #[tokio::test]
    async fn fin_waits_for_in_flight_bytes_and_half_close_passes_both_ways() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        spliceable(&a, &b).expect("fresh pairs are spliceable");
        let map = Arc::new(CopyingMap::default());
        let m = map.clone();
        let splice = tokio::spawn(async move { splice(&m, a, b).await });
        // As in the agent: the client speaks only after the pair is joined.
        map.inserted.notified().await;
        let payload = vec![0x5a; 1 << 20];
        client.write_all(&payload).await.expect("write");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read to EOF");
        assert_eq!(got.len(), payload.len(), "FIN must not overtake redirected bytes");
        server.write_all(b"reply after half-close").await.expect("write back");
        server.shutdown().await.expect("close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"reply after half-close");
        let stats = splice.await.expect("joins").map_err(|(r, _, _)| r).expect("spliced");
        assert_eq!(stats.engine, EngineKind::Sockmap);
        assert_eq!((stats.a_to_b, stats.b_to_a, stats.error), (1 << 20, 22, None));
    }

    #[tokio::test]
    async fn a_reset_on_one_side_is_passed_on_as_a_reset() {
        let (client, a) = pair().await;
        let (b, mut server) = pair().await;
        let map = Arc::new(CopyingMap::default());
        let m = map.clone();
        let splice = tokio::spawn(async move { splice(&m, a, b).await });
        map.inserted.notified().await;
        tcp_state::abort_on_close(&client).expect("linger");
        drop(client);
        let mut buf = [0u8; 8];
        let err = server.read(&mut buf).await.expect_err("reset propagates");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        let stats = splice.await.expect("joins").map_err(|(r, _, _)| r).expect("spliced");
        assert!(stats.error.is_some());
    }

    #[tokio::test]
    async fn a_socket_with_queued_bytes_is_not_spliced() {
        let (mut client, a) = pair().await;
        let (b, _server) = pair().await;
        client.write_all(b"early").await.expect("write");
        while tcp_state::readable_bytes(a.as_fd()).expect("inq") == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(spliceable(&a, &b), Err(NotSpliced::DataQueued));
    }
}
