//! The userspace half of the sockmap engine: everything the kernel does not
//! do when it splices two TCP sockets. The kernel redirects payload between
//! the sockets; this module decides whether a pair may be spliced at all,
//! watches both sockets without ever reading them, passes half-close and
//! abort on, waits for in-flight bytes before a FIN, and removes the pair
//! when both directions are done. Rule numbers refer to SOCKMAP-NOTES.md (rule 9,
//! retransmitted bytes, to the README's "Data plane").

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::sockmap::FlowRef;
use super::tcp_state::{self, TCP_ESTABLISHED, TcpCounters};
use super::valve::{self, CreditPool, Meter};
use super::{EngineKind, SpliceStats};

/// Where pairs of sockets are joined (the eBPF SockHash, or a stand-in in tests).
pub trait PairMap: Send + Sync + 'static {
    /// What `remove` needs to undo an insert.
    type Pair: Send;
    /// Joins `a` and `b`: from now on the kernel moves every byte either
    /// receives to the other, within each direction's credit (`credit[0]` for
    /// `a` → `b`). Returns the flows of both directions, in that order.
    fn insert(
        &self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
        credit: [u64; 2],
    ) -> Result<(Self::Pair, [FlowRef; 2]), String>;
    /// Separates them again.
    fn remove(&self, pair: Self::Pair);
    /// The node's credit for spliced directions (rule 7).
    fn credit(&self) -> &Arc<CreditPool>;
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

async fn drain_pause(step: usize) {
    tokio::time::sleep(DRAIN_POLL[step.min(DRAIN_POLL.len() - 1)]).await;
}

/// Baselines of one direction, taken at insert time (rule 2).
#[derive(Debug, Clone, Copy)]
struct Direction {
    source_base: TcpCounters,
    sink_base: TcpCounters,
    sink_outq_base: usize,
}

impl Direction {
    /// Bytes the source received since the insert (FIN counts one).
    fn received(&self, source: BorrowedFd<'_>) -> io::Result<u64> {
        Ok(tcp_state::counters(source)?.bytes_received - self.source_base.bytes_received)
    }

    /// Bytes the sink's TCP stack has taken since the insert (acked, or
    /// queued to send): redirected by the kernel or written by the valve.
    fn accepted(&self, sink: BorrowedFd<'_>) -> io::Result<u64> {
        let now = tcp_state::counters(sink)?;
        Ok((now.bytes_acked + tcp_state::unacked_send_queue(sink)? as u64)
            .saturating_sub(self.sink_base.bytes_acked + self.sink_outq_base as u64))
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

/// Outcome of one direction.
type DirectionResult = Result<u64, io::Error>;

/// Classifies a readiness event of `source` that reports EOF or an error.
/// `fin_sent` says whether we already half-closed `source` ourselves.
fn closed_or_failed(source: &TcpStream, ready: tokio::io::Ready, fin_sent: &AtomicBool) -> Result<(), io::Error> {
    // A peer's FIN leaves the socket in CLOSE_WAIT (or, if we had sent our
    // FIN, in CLOSE via TIME_WAIT); a reset leaves it in CLOSE whether or not
    // its SO_ERROR is still pending (the rule-5 kick or a valve read may
    // have consumed it).
    let closed = tcp_state::counters(source.as_fd()).is_ok_and(|c| c.state == tcp_state::TCP_CLOSE);
    let reset = closed && !fin_sent.load(Ordering::Acquire);
    match tcp_state::take_error(source) {
        Ok(Some(e)) => Err(e),
        Ok(None) if ready.is_read_closed() && !reset => Ok(()),
        Ok(None) => Err(io::ErrorKind::ConnectionReset.into()),
        Err(e) => Err(e),
    }
}

/// One direction of a joined pair, from `source` to `sink`.
struct Flow<'a> {
    dir: Direction,
    meter: Meter,
    source: &'a TcpStream,
    sink: &'a TcpStream,
    /// Whether we half-closed `source` (the other direction's FIN).
    source_fin_sent: &'a AtomicBool,
    /// Set when we half-close `sink`.
    sink_fin_sent: &'a AtomicBool,
    /// Whether `source` is set to reset on close (see `move_passed`).
    abort_armed: bool,
    /// Where passed bytes pass through; grows to the largest batch moved.
    valve_buf: Vec<u8>,
}

impl Flow<'_> {
    fn accepted(&self) -> io::Result<u64> {
        self.dir.accepted(self.sink.as_fd())
    }

    /// Moves passed bytes (rule 7), if any, once the kernel's queue to the sink is empty.
    ///
    /// Meanwhile the passed bytes sit on the source outside its TCP receive queue, and
    /// may have shut its window. If this process died now, the kernel would close the
    /// source with a FIN (it sees no unread data) and the peer would probe the shut
    /// window for a minute instead of learning that the connection is gone; so until
    /// userspace has caught up, the source resets on close, as it would with unread
    /// data in the userspace engine.
    async fn move_passed(&mut self) -> io::Result<()> {
        if !self.meter.has_passed_bytes() {
            return Ok(());
        }
        if !self.abort_armed {
            tcp_state::abort_on_close(self.source)?;
            self.abort_armed = true;
        }
        let sink_has_taken = |n: u64| self.dir.accepted(self.sink.as_fd()).map(|a| a >= n);
        valve::move_passed(&self.meter, self.source, self.sink, &mut self.valve_buf, sink_has_taken, drain_pause)
            .await?;
        if !self.meter.has_passed_bytes() {
            tcp_state::close_gracefully(self.source)?;
            self.abort_armed = false;
        }
        Ok(())
    }

    fn regrant(&mut self) -> io::Result<()> {
        let accepted = self.accepted()?;
        self.meter.regrant(accepted);
        Ok(())
    }

    /// Runs the direction until the source's EOF has been passed on (the
    /// payload count) or the connection failed. Never reads the source except
    /// for bytes the verdict passed (rules 4, 7).
    async fn run(mut self) -> DirectionResult {
        let mut idle_check = tokio::time::interval(valve::IDLE_CHECK);
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        idle_check.reset();
        loop {
            tokio::select! {
                ready = self.source.ready(Interest::READABLE) => {
                    let ready = ready?;
                    self.meter.check_intact()?;
                    if ready.is_error() || ready.is_read_closed() {
                        closed_or_failed(self.source, ready, self.source_fin_sent)?;
                        return self.drain_then_shutdown().await;
                    }
                    if self.meter.has_passed_bytes() {
                        tracing::trace!(flow = ?self.meter.state(), "valve: moving passed bytes");
                        self.move_passed().await?;
                        self.regrant()?;
                    }
                    // Redirected bytes also wake readers: the common case costs no
                    // syscall, just clearing the readiness. Not if bytes were passed
                    // meanwhile (checked after tokio took its readiness snapshot, so
                    // a pass after the check comes with a newer event that survives).
                    let meter = &self.meter;
                    let _ = self.source.try_io(Interest::READABLE, || {
                        if meter.has_passed_bytes() { Ok(()) } else { Err(io::ErrorKind::WouldBlock.into()) }
                    });
                }
                () = self.meter.flow().low_credit().notified() => self.regrant()?,
                _ = idle_check.tick(), if self.meter.holds_credit() => {
                    let accepted = self.accepted()?;
                    self.meter.release_if_idle(accepted);
                }
            }
        }
    }

    /// Waits until everything the source received has reached the sink
    /// (rule 2), moving passed bytes on the way (rule 7), then half-closes
    /// the sink (rule 1). Returns the payload bytes of this direction.
    async fn drain_then_shutdown(mut self) -> DirectionResult {
        let mut step = 0;
        loop {
            self.meter.check_intact()?;
            // The FIN is in `received` but never redirected (rule 3 drops it).
            let payload = self.dir.received(self.source.as_fd())?.saturating_sub(1);
            if self.accepted()? >= payload {
                self.sink_fin_sent.store(true, Ordering::Release);
                tcp_state::shutdown_write(self.sink)?;
                return Ok(payload);
            }
            let moved_before = self.meter.state().delivered;
            self.move_passed().await?;
            if self.meter.state().delivered > moved_before {
                step = 0;
                continue;
            }
            drain_pause(step).await;
            step += 1;
        }
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
    a_to_b: (Direction, Meter),
    b_to_a: (Direction, Meter),
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
    // Rule 7: each direction starts with the credit it could reserve (maybe
    // none, on a node at its cap: then its bytes go through the valve).
    let reservations = [map.credit().reserve(), map.credit().reserve()];
    let credit = [reservations[0].bytes(), reservations[1].bytes()];
    let (pair, [a_flow, b_flow]) = match map.insert(a.as_fd(), b.as_fd(), credit) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "sockmap insert refused");
            let established =
                [&a, &b].iter().all(|s| tcp_state::counters(s.as_fd()).is_ok_and(|c| c.state == TCP_ESTABLISHED));
            let reason = if established { NotSpliced::InsertFailed } else { NotSpliced::NotEstablished };
            return Err((reason, a, b));
        }
    };
    let budget = usize::try_from(map.credit().settings().per_direction).unwrap_or(usize::MAX);
    for socket in [&a, &b] {
        bound_passed_bytes(socket, budget);
    }
    let [a_res, b_res] = reservations;
    Ok(Joined {
        map: map.clone(),
        pair,
        a,
        b,
        a_to_b: (
            Direction { source_base: a_base, sink_base: b_base, sink_outq_base: b_outq },
            Meter::new(a_flow, a_res),
        ),
        b_to_a: (
            Direction { source_base: b_base, sink_base: a_base, sink_outq_base: a_outq },
            Meter::new(b_flow, b_res),
        ),
    })
}

/// The smallest receive buffer a spliced socket is given, whatever the lag
/// budget: below it a loopback relay could no longer keep a core busy.
const MIN_SPLICED_RCVBUF: usize = 256 * 1024;

/// Rule 7, the part the valve cannot meter: once a direction's credit is out,
/// the verdict passes its skbs to the source's own receive queue, charged to
/// its receive buffer, and only a full receive buffer shuts the TCP window to
/// the sender. Autotuning would let that buffer grow to `tcp_rmem`'s maximum
/// (32 MiB on this machine kind; a CI run held 6.4 MB of passed bytes on the
/// agent's relay socket during a stalled upload), so it is fixed at the lag
/// budget: passed and redirected-but-unsent bytes together stay under it.
/// The socket was just connected, so its advertised window is still small.
/// Best effort: without CAP_NET_ADMIN the kernel caps the buffer at
/// `net.core.rmem_max`, which only makes it smaller.
fn bound_passed_bytes(socket: &TcpStream, budget: usize) {
    match tcp_state::fix_receive_buffer(socket.as_fd(), budget.max(MIN_SPLICED_RCVBUF)) {
        Ok(got) => tracing::trace!(receive_buffer = got, "spliced socket's receive buffer fixed"),
        Err(e) => tracing::debug!(error = %e, "could not fix a spliced socket's receive buffer"),
    }
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
    /// Runs both directions until both are done or one aborts, then removes
    /// the pair from the map.
    pub async fn run(self) -> SpliceStats {
        let Joined { map, pair, a, b, a_to_b, b_to_a } = self;
        let mut stats = SpliceStats { engine: EngineKind::Sockmap, ..Default::default() };
        let (a_fin_sent, b_fin_sent) = (AtomicBool::new(false), AtomicBool::new(false));
        let (a_dir, b_dir) = (a_to_b.0, b_to_a.0);
        let (a_flow, b_flow) = (a_to_b.1.flow().clone(), b_to_a.1.flow().clone());
        let forward = Flow {
            dir: a_dir,
            meter: a_to_b.1,
            source: &a,
            sink: &b,
            source_fin_sent: &a_fin_sent,
            sink_fin_sent: &b_fin_sent,
            abort_armed: false,
            valve_buf: Vec::new(),
        }
        .run();
        let backward = Flow {
            dir: b_dir,
            meter: b_to_a.1,
            source: &b,
            sink: &a,
            source_fin_sent: &b_fin_sent,
            sink_fin_sent: &a_fin_sent,
            abort_armed: false,
            valve_buf: Vec::new(),
        }
        .run();
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
        // A finished direction knows its exact payload; an aborted one reports what had moved.
        stats.a_to_b = match &fwd {
            Some(Ok(n)) => *n,
            _ => a_flow.moved(),
        };
        stats.b_to_a = match &bwd {
            Some(Ok(n)) => *n,
            _ => b_flow.moved(),
        };
        let (a_state, b_state) = (a_flow.state(), b_flow.state());
        stats.passed = a_state.delivered + b_state.delivered;
        stats.trimmed = a_state.trimmed + b_state.trimmed;
        stats.error = [fwd, bwd].into_iter().flatten().find_map(|r| r.err()).map(|e| e.to_string());
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
    struct CopyingMap {
        inserted: tokio::sync::Notify,
        credit: Arc<CreditPool>,
        flows: Arc<super::super::sockmap::FlowTable>,
    }

    impl Default for CopyingMap {
        fn default() -> Self {
            let flows = super::super::sockmap::FlowTable::anonymous(2).expect("flow table");
            CopyingMap {
                inserted: tokio::sync::Notify::new(),
                credit: Arc::new(CreditPool::unlimited()),
                flows: Arc::new(flows),
            }
        }
    }

    impl PairMap for CopyingMap {
        type Pair = (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>);

        fn credit(&self) -> &Arc<CreditPool> {
            &self.credit
        }

        fn insert(
            &self,
            a: BorrowedFd<'_>,
            b: BorrowedFd<'_>,
            credit: [u64; 2],
        ) -> Result<(Self::Pair, [FlowRef; 2]), String> {
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
            // The copies stand in for redirects: they never pass, so the flows
            // only need credit that does not run out.
            let flows = [0, 1].map(|slot| FlowRef::standalone(self.flows.clone(), slot));
            for (f, c) in flows.iter().zip(credit) {
                f.set_credit(c, c / 2);
            }
            self.inserted.notify_one();
            Ok((pair, flows))
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
