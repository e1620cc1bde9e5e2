//! Rule 7 of SOCKMAP-NOTES: the kernel gives a spliced connection no
//! backpressure (a stalled reader lets the node absorb the whole transfer),
//! so konduit meters every direction itself. This module owns that policy:
//! how many bytes a direction may have redirected that its sink has not yet
//! taken (per direction, and node-wide), granting and reclaiming that credit,
//! and moving the bytes the verdict left on the source once credit ran out.
//!
//! It never reads a socket while the verdict may redirect from it (rule 4):
//! it reads only after the verdict started passing, and only as many bytes
//! as the verdict passed.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use konduit_common::FlowState;
use nix::sys::socket::{MsgFlags, recv};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::sockmap::FlowRef;

/// Limits of the valve (`--splice-max-lag`, `--splice-max-lag-total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValveSettings {
    /// Bytes one direction of one connection may have redirected but not yet
    /// taken by its sink. Also the refill step: the verdict asks for more
    /// credit when half of it is left.
    pub per_direction: u64,
    /// The same, summed over every spliced direction on this node.
    pub node: u64,
}

impl Default for ValveSettings {
    fn default() -> Self {
        ValveSettings { per_direction: 4 << 20, node: 256 << 20 }
    }
}

/// Node-wide credit not reserved by any direction.
#[derive(Debug)]
pub struct CreditPool {
    settings: ValveSettings,
    available: AtomicU64,
}

impl CreditPool {
    pub fn new(settings: ValveSettings) -> Self {
        CreditPool { settings, available: AtomicU64::new(settings.node) }
    }

    /// A pool that never runs out (stand-ins in tests).
    pub fn unlimited() -> Self {
        CreditPool::new(ValveSettings { per_direction: u64::MAX / 4, node: u64::MAX / 2 })
    }

    pub fn settings(&self) -> ValveSettings {
        self.settings
    }

    /// Node-wide credit left.
    pub fn available(&self) -> u64 {
        self.available.load(Ordering::Acquire)
    }

    /// Takes up to `want` bytes; less (even 0) when the node is at its cap.
    fn take(&self, want: u64) -> u64 {
        let mut got = 0;
        let _ = self.available.fetch_update(Ordering::AcqRel, Ordering::Acquire, |avail| {
            got = want.min(avail);
            Some(avail - got)
        });
        got
    }

    fn give(&self, n: u64) {
        self.available.fetch_add(n, Ordering::AcqRel);
    }

    /// A reservation for a new direction, taken before its socket enters the
    /// map (the flow's first limit).
    pub fn reserve(self: &Arc<Self>) -> Reservation {
        let bytes = self.take(self.settings.per_direction);
        Reservation { pool: self.clone(), bytes }
    }
}

/// Credit one direction holds from the pool; goes back when dropped.
#[derive(Debug)]
pub struct Reservation {
    pool: Arc<CreditPool>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn top_up(&mut self) {
        let want = self.pool.settings.per_direction;
        if self.bytes < want {
            self.bytes += self.pool.take(want - self.bytes);
        }
    }

    fn release(&mut self) {
        self.pool.give(std::mem::take(&mut self.bytes));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

/// The valve of one direction: its flow in the kernel and its reservation.
#[derive(Debug)]
pub struct Meter {
    flow: FlowRef,
    reservation: Reservation,
    /// `redirected + passed` at the last idle check.
    sent_at_last_check: u64,
}

/// How often an active direction checks whether it went idle.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

impl Meter {
    pub fn new(flow: FlowRef, reservation: Reservation) -> Self {
        Meter { flow, reservation, sent_at_last_check: u64::MAX }
    }

    pub fn flow(&self) -> &FlowRef {
        &self.flow
    }

    /// Whether the verdict has passed bytes userspace has not moved yet.
    pub fn has_passed_bytes(&self) -> bool {
        let s = self.flow.state();
        s.passed > s.delivered
    }

    /// Whether this direction holds credit (and so needs idle checks).
    pub fn holds_credit(&self) -> bool {
        self.reservation.bytes > 0
    }

    /// Grants credit up to `accepted` (bytes the sink has taken in this
    /// direction) plus the reservation, topping the reservation up from the
    /// pool first. While passed bytes wait, nothing changes: the verdict keeps
    /// passing until userspace has moved them, whatever the credit.
    pub fn regrant(&mut self, accepted: u64) {
        let s = self.flow.state();
        if s.passed != s.delivered {
            return;
        }
        self.reservation.top_up();
        let limit = accepted + self.reservation.bytes;
        if limit > s.limit {
            self.flow.set_credit(limit, limit - self.reservation.bytes / 2);
        }
    }

    /// Called every [`IDLE_CHECK`]: a direction that sent nothing since the
    /// last check and whose sink has taken everything gives its reservation
    /// back, so idle connections do not hold the node's credit. Its limit
    /// drops to what it has sent: the next skb is passed, userspace moves it
    /// and regrants (from the pool again).
    pub fn release_if_idle(&mut self, accepted: u64) {
        let s = self.flow.state();
        let sent = s.redirected + s.passed;
        let idle = sent == self.sent_at_last_check && accepted >= sent;
        self.sent_at_last_check = sent;
        if idle && self.reservation.bytes > 0 {
            self.flow.set_credit(sent, sent);
            self.reservation.release();
        }
    }

    /// Fails once the verdict had to drop new bytes of a retransmitted skb it
    /// could not trim (rule 9): the stream has a hole, so the connection is
    /// reset rather than continued.
    pub fn check_intact(&self) -> io::Result<()> {
        if !self.flow.is_broken() {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the kernel data plane could not separate new bytes from a retransmitted copy; resetting",
        ))
    }

    /// A snapshot of the flow.
    pub fn state(&self) -> FlowState {
        self.flow.state()
    }
}

/// Moves the bytes the verdict passed on `source` to `sink`, each only once
/// `sink_has_taken(redirected + delivered)` says every byte the kernel
/// redirected to the sink before it is in the sink (else a passed byte would
/// overtake a redirected one still queued in the kernel). Reads at most what
/// was passed: the source's receive queue holds nothing else while its
/// verdict passes (rule 4).
///
/// Each read takes every passed byte queued at that moment (one syscall per
/// batch); what is queued is bounded by the source's receive buffer, which
/// the sockmap engine fixes at the lag budget, and so is `buf`, which the
/// caller keeps between calls.
///
/// Returns when nothing more can be read now. Reads go through tokio's
/// readiness, so an empty read clears the source's readiness only if no newer
/// event arrived meanwhile: passed bytes that land later wake the caller.
pub async fn move_passed<F, W>(
    meter: &Meter,
    source: &TcpStream,
    sink: &TcpStream,
    buf: &mut Vec<u8>,
    mut sink_has_taken: F,
    wait: W,
) -> io::Result<()>
where
    F: FnMut(u64) -> io::Result<bool>,
    W: AsyncFn(usize),
{
    loop {
        let first = meter.state();
        if first.passed == first.delivered {
            return Ok(());
        }
        // While passed bytes wait the verdict redirects nothing, so the
        // redirected bytes these must follow are all counted in `first`.
        let mut step = 0;
        while !sink_has_taken(first.redirected + first.delivered)? {
            wait(step).await;
            step += 1;
        }
        loop {
            let s = meter.state();
            if s.redirected != first.redirected {
                // Once `delivered` caught up with `passed` the verdict was free
                // to redirect again: bytes it passed after that must wait until
                // the kernel has handed those to the sink.
                break;
            }
            let due = usize::try_from(s.passed - s.delivered).unwrap_or(usize::MAX);
            if due == 0 {
                return Ok(());
            }
            if buf.len() < due {
                buf.resize(due, 0);
            }
            let fd = source.as_fd().as_raw_fd();
            let read = source.try_io(Interest::READABLE, || {
                recv(fd, &mut buf[..due], MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
            });
            let n = match read {
                // 0: the source is at EOF and the rest is still on its way to the queue.
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            write_all(sink, &buf[..n]).await?;
            meter.flow.add_delivered(n as u64);
        }
    }
}

async fn write_all(sink: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        sink.writable().await?;
        match sink.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_hands_out_at_most_its_cap_and_gets_every_reservation_back() {
        let pool = Arc::new(CreditPool::new(ValveSettings { per_direction: 4, node: 10 }));
        let a = pool.reserve();
        let b = pool.reserve();
        let c = pool.reserve();
        assert_eq!((a.bytes(), b.bytes(), c.bytes()), (4, 4, 2), "the third gets what is left");
        assert_eq!(pool.reserve().bytes(), 0, "an exhausted pool grants nothing");
        drop(b);
        assert_eq!(pool.available(), 4);
        drop((a, c));
        assert_eq!(pool.available(), 10);
    }

    fn meter(pool: &Arc<CreditPool>) -> (Meter, Arc<crate::dataplane::sockmap::FlowTable>) {
        let table = Arc::new(crate::dataplane::sockmap::FlowTable::anonymous(1).expect("table"));
        let flow = FlowRef::standalone(table.clone(), 0);
        let reservation = pool.reserve();
        flow.set_credit(reservation.bytes(), reservation.bytes() / 2);
        (Meter::new(flow, reservation), table)
    }

    #[test]
    fn credit_follows_what_the_sink_took_and_idle_directions_give_theirs_back() {
        let pool = Arc::new(CreditPool::new(ValveSettings { per_direction: 100, node: 150 }));
        let (mut m, _table) = meter(&pool);
        assert_eq!((m.state().limit, m.state().wake_at), (100, 50));
        m.regrant(30);
        assert_eq!((m.state().limit, m.state().wake_at), (130, 80), "the sink took 30: 100 beyond that");
        m.regrant(10);
        assert_eq!(m.state().limit, 130, "credit never shrinks on a regrant");
        m.release_if_idle(0);
        assert!(m.holds_credit(), "the first check only records where the flow is");
        m.release_if_idle(0);
        assert!(!m.holds_credit(), "nothing sent since, nothing in flight: idle");
        assert_eq!(pool.available(), 150);
        assert_eq!(m.state().limit, 0, "the next byte is passed to userspace, which regrants");
        m.regrant(0);
        assert_eq!((m.state().limit, pool.available()), (100, 50));
    }

    #[test]
    fn a_node_at_its_cap_grants_what_it_has_and_tops_up_later() {
        let pool = Arc::new(CreditPool::new(ValveSettings { per_direction: 100, node: 150 }));
        let (first, _t1) = meter(&pool);
        let (mut second, _t2) = meter(&pool);
        assert_eq!(second.state().limit, 50, "only half a budget was left");
        drop(first);
        second.regrant(0);
        assert_eq!(second.state().limit, 100, "topped up once the first direction ended");
    }
}
