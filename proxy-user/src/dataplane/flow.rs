//! Per-connection flow control for connections carried as DATA packets on a
//! shared gRPC stream. Owns the two halves: the credit a sender may still use
//! ([`SendWindow`]) and the bounded queue a receiver fills ([`InboundQueue`]).
//!
//! Why: one agent stream carries every connection of that agent. If the
//! reader of that stream waited for one slow consumer, every other
//! connection would stall behind it (stock Konnectivity issues #180/#881).
//! With credit, a slow consumer only stops its own sender.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};

/// Bytes a konduit peer may send on one connection before the receiver
/// grants more. 4 MiB keeps a loopback or LAN path at full speed while
/// bounding what one stalled connection can pin in memory.
pub const WINDOW_BYTES: usize = 4 << 20;

/// How much a stock peer (no credit) may queue on one connection before the
/// stream reader waits for the consumer, as stock Konnectivity does.
pub const STOCK_QUEUE_BYTES: usize = 8 << 20;

/// Largest DATA payload konduit sends: big enough to amortise per-packet
/// cost, small enough to interleave connections fairly on one stream.
pub const MAX_CHUNK: usize = 64 << 10;

/// What a session reader delivers to one connection, in stream order.
#[derive(Debug)]
pub enum Inbound {
    /// Payload; the permit returns its bytes to the queue budget when dropped.
    Data(Bytes, OwnedSemaphorePermit),
    /// The peer will send no more (half-close).
    Eof,
    /// The connection is over (CLOSE_REQ/CLOSE_RSP, or the session ended).
    Close(Option<String>),
}

/// Why a delivery was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeliverError {
    #[error("peer sent {len} bytes beyond the {window}-byte window it was granted")]
    WindowExceeded { len: usize, window: usize },
    #[error("connection is no longer read")]
    Gone,
}

/// The producer end of a connection's inbound queue (held by the session reader).
#[derive(Debug, Clone)]
pub struct InboundQueue {
    tx: mpsc::UnboundedSender<Inbound>,
    budget: Arc<Semaphore>,
    capacity: usize,
    credit_based: bool,
}

impl InboundQueue {
    /// A queue of `capacity` bytes. With `credit_based`, the peer respects our
    /// window, so a delivery that does not fit is a protocol violation;
    /// without it (stock peer) delivery waits for room.
    pub fn new(credit_based: bool) -> (Self, mpsc::UnboundedReceiver<Inbound>) {
        let capacity = if credit_based { WINDOW_BYTES } else { STOCK_QUEUE_BYTES };
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = InboundQueue { tx, budget: Arc::new(Semaphore::new(capacity)), capacity, credit_based };
        (queue, rx)
    }

    /// Queues a payload, charging its size to the budget.
    pub async fn deliver(&self, data: Bytes) -> Result<(), DeliverError> {
        if self.tx.is_closed() {
            return Err(DeliverError::Gone);
        }
        // A stock peer's packet larger than the whole budget is charged as the
        // whole budget, so it still gets through once the queue is empty.
        let charge = u32::try_from(data.len().clamp(1, self.capacity)).unwrap_or(u32::MAX);
        let permit = if self.credit_based {
            match self.budget.clone().try_acquire_many_owned(charge) {
                Ok(p) => p,
                Err(TryAcquireError::NoPermits) => {
                    return Err(DeliverError::WindowExceeded { len: data.len(), window: self.capacity });
                }
                Err(TryAcquireError::Closed) => return Err(DeliverError::Gone),
            }
        } else {
            self.budget.clone().acquire_many_owned(charge).await.map_err(|_| DeliverError::Gone)?
        };
        self.tx.send(Inbound::Data(data, permit)).map_err(|_| DeliverError::Gone)
    }

    /// Queues a control event (never blocks, never refused for size).
    pub fn signal(&self, event: Inbound) -> Result<(), DeliverError> {
        self.tx.send(event).map_err(|_| DeliverError::Gone)
    }

    /// Bytes currently queued and not yet consumed.
    pub fn queued_bytes(&self) -> usize {
        self.capacity - self.budget.available_permits()
    }
}

/// Credit granted by the peer for one connection's outgoing DATA.
#[derive(Debug)]
pub struct SendWindow {
    credit: Semaphore,
}

impl Default for SendWindow {
    fn default() -> Self {
        SendWindow { credit: Semaphore::new(WINDOW_BYTES) }
    }
}

impl SendWindow {
    /// Waits for at least one byte of credit and takes up to `want` bytes.
    /// Returns `None` when the window was closed (connection gone).
    pub async fn take(&self, want: usize) -> Option<usize> {
        self.credit.acquire().await.ok()?.forget();
        let extra = self.credit.available_permits().min(want.saturating_sub(1));
        let extra_u32 = u32::try_from(extra).unwrap_or(u32::MAX);
        let got = match self.credit.try_acquire_many(extra_u32) {
            Ok(p) => {
                p.forget();
                extra
            }
            Err(_) => 0,
        };
        Some(1 + got)
    }

    /// Returns credit that was taken but not used.
    pub fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.credit.add_permits(bytes);
        }
    }

    /// The peer consumed `bytes` (WINDOW_UPDATE).
    pub fn grant(&self, bytes: u64) {
        // A peer cannot grant more than it was sent; cap so a hostile peer
        // cannot overflow the semaphore.
        let room = WINDOW_BYTES.saturating_sub(self.credit.available_permits());
        self.credit.add_permits(usize::try_from(bytes).unwrap_or(usize::MAX).min(room));
    }

    /// Wakes a sender blocked in [`SendWindow::take`] because the connection ended.
    pub fn close(&self) {
        self.credit.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn credit_based_queue_refuses_bytes_beyond_the_window() {
        let (queue, mut rx) = InboundQueue::new(true);
        queue.deliver(Bytes::from(vec![0; WINDOW_BYTES])).await.expect("fits");
        let err = queue.deliver(Bytes::from_static(b"x")).await;
        assert!(matches!(err, Err(DeliverError::WindowExceeded { .. })));
        // Consuming the first chunk frees the budget again.
        drop(rx.recv().await);
        assert_eq!(queue.queued_bytes(), 0);
        queue.deliver(Bytes::from_static(b"x")).await.expect("fits after consume");
    }

    #[tokio::test]
    async fn stock_queue_waits_for_room_instead_of_failing() {
        let (queue, mut rx) = InboundQueue::new(false);
        queue.deliver(Bytes::from(vec![0; STOCK_QUEUE_BYTES])).await.expect("fits");
        let q = queue.clone();
        let blocked = tokio::spawn(async move { q.deliver(Bytes::from_static(b"y")).await });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished());
        drop(rx.recv().await);
        blocked.await.expect("joins").expect("delivered after room");
    }

    #[tokio::test]
    async fn send_window_takes_what_is_available_and_waits_at_zero() {
        let window = std::sync::Arc::new(SendWindow::default());
        let mut taken = 0;
        while taken < WINDOW_BYTES {
            taken += window.take(MAX_CHUNK).await.expect("open");
        }
        assert_eq!(taken, WINDOW_BYTES);
        let w = window.clone();
        let waiter = tokio::spawn(async move { w.take(MAX_CHUNK).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        window.grant(10);
        assert_eq!(waiter.await.expect("joins"), Some(10));
        window.close();
        assert_eq!(window.take(1).await, None);
    }

    #[test]
    fn grant_cannot_exceed_the_window() {
        let window = SendWindow::default();
        window.grant(u64::MAX);
        assert_eq!(window.credit.available_permits(), WINDOW_BYTES);
    }
}
