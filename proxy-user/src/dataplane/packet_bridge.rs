//! The DATA-packet leg of a tunnelled connection: moves bytes between a local
//! stream socket (a backend on the agent, an HTTP-CONNECT client on the
//! server) and one connection of a shared gRPC packet stream, with konduit's
//! per-connection credit and half-close where the peer speaks them.
//!
//! It owns the connection's close handshake on the packet side; it never
//! touches other connections of the same stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

use super::flow::{Inbound, MAX_CHUNK, SendWindow, WINDOW_BYTES};
use crate::protocol::PacketKind;
use crate::protocol::pb::Packet;

/// Which end of the packet protocol this bridge speaks for; it decides which
/// close packet is ours to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Agent: answers with CLOSE_RSP and finishes the connection.
    Agent,
    /// Server: asks with CLOSE_REQ and waits for the agent's CLOSE_RSP.
    Server,
}

/// How long a server waits for CLOSE_RSP after its CLOSE_REQ before it gives
/// the connection up (stock clients wait 10 s too).
pub const CLOSE_RSP_WAIT: Duration = Duration::from_secs(10);

/// One connection's view of the packet stream.
#[derive(Debug)]
pub struct PacketLink {
    pub connect_id: i64,
    /// Packets toward the peer (the session's writer drains it).
    pub to_peer: mpsc::Sender<Packet>,
    /// Events for this connection from the session's reader.
    pub from_peer: mpsc::UnboundedReceiver<Inbound>,
    /// The peer's credit for our DATA, when flow control was negotiated.
    pub send_window: Option<Arc<SendWindow>>,
    /// Whether EOF travels as DATA{eof} instead of closing the connection.
    pub half_close: bool,
    pub role: Role,
}

/// How a bridged connection ended, and what it carried.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BridgeStats {
    /// Bytes read from the local socket and sent to the peer.
    pub local_to_peer: u64,
    /// Bytes received from the peer and written to the local socket.
    pub peer_to_local: u64,
    /// The error that ended it, if any (local socket or peer).
    pub error: Option<String>,
}

/// Why the local-to-peer direction stopped early (EOF is `Ok`).
enum UpEnd {
    Failed(String),
    PeerGone,
}

enum DownEnd {
    /// CLOSE_REQ/CLOSE_RSP or session end; the optional error came from the peer.
    Closed(Option<String>),
    WriteFailed(String),
}

fn packet_gone<T>(_: T) -> UpEnd {
    UpEnd::PeerGone
}

/// Runs the connection until both directions are done or either side fails.
/// `initial` holds bytes already read from the local socket (sent first).
pub async fn bridge<S>(stream: S, link: PacketLink, initial: Bytes) -> BridgeStats
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let PacketLink { connect_id, to_peer, mut from_peer, send_window, half_close, role } = link;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let peer_eof = AtomicBool::new(false);
    let peer_eof_seen = Notify::new();
    let local_to_peer = AtomicU64::new(0);
    let peer_to_local = AtomicU64::new(0);

    let up = async {
        if !initial.is_empty() {
            local_to_peer.fetch_add(initial.len() as u64, Ordering::Relaxed);
            to_peer.send(crate::protocol::packet::data(connect_id, initial)).await.map_err(packet_gone)?;
        }
        let mut buf = BytesMut::new();
        loop {
            let budget = match &send_window {
                Some(window) => window.take(MAX_CHUNK).await.ok_or(UpEnd::PeerGone)?,
                None => MAX_CHUNK,
            };
            buf.reserve(budget);
            let read = reader.read_buf(&mut (&mut buf).limit(budget)).await;
            let n = match read {
                Ok(n) => n,
                Err(e) => return Err(UpEnd::Failed(format!("read local socket: {e}"))),
            };
            if let Some(window) = &send_window {
                window.give_back(budget - n);
            }
            if n == 0 {
                return Ok::<(), UpEnd>(());
            }
            local_to_peer.fetch_add(n as u64, Ordering::Relaxed);
            let chunk = buf.split().freeze();
            to_peer.send(crate::protocol::packet::data(connect_id, chunk)).await.map_err(packet_gone)?;
        }
    };

    let down = async {
        let mut consumed = 0usize;
        while let Some(event) = from_peer.recv().await {
            match event {
                Inbound::Data(bytes, permit) => {
                    if let Err(e) = writer.write_all(&bytes).await {
                        return DownEnd::WriteFailed(format!("write local socket: {e}"));
                    }
                    peer_to_local.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    consumed += bytes.len();
                    drop(permit);
                    if send_window.is_some() && consumed >= WINDOW_BYTES / 4 {
                        let update = PacketKind::WindowUpdate { connect_id, bytes: consumed as u64 };
                        if to_peer.send(update.into_packet()).await.is_err() {
                            return DownEnd::Closed(None);
                        }
                        consumed = 0;
                    }
                }
                Inbound::Eof => {
                    // Half-close: pass the peer's FIN on, keep our direction open.
                    if let Err(e) = writer.shutdown().await {
                        return DownEnd::WriteFailed(format!("shut down local socket: {e}"));
                    }
                    peer_eof.store(true, Ordering::Release);
                    peer_eof_seen.notify_one();
                }
                Inbound::Close(error) => return DownEnd::Closed(error),
            }
        }
        DownEnd::Closed(None)
    };

    tokio::pin!(up);
    tokio::pin!(down);
    let mut up_result: Option<Result<(), UpEnd>> = None;
    let mut sent_close_req = false;
    let close_req = || PacketKind::CloseRequest { connect_id }.into_packet();

    let ending: Result<(), String> = loop {
        tokio::select! {
            result = &mut up, if up_result.is_none() => {
                match result {
                    Ok(()) if half_close => {
                        let eof = PacketKind::Data { connect_id, data: Bytes::new(), error: None, eof: true };
                        if to_peer.send(eof.into_packet()).await.is_err() {
                            break Err("peer stream ended".into());
                        }
                    }
                    Ok(()) => {}
                    Err(UpEnd::Failed(e)) => {
                        if role == Role::Server {
                            let _ = to_peer.send(close_req()).await;
                        }
                        break Err(e);
                    }
                    Err(UpEnd::PeerGone) => break Err("peer stream ended".into()),
                }
                up_result = Some(Ok(()));
                match role {
                    // Without half-close the agent's EOF ends the connection (stock).
                    Role::Agent if !half_close => break Ok(()),
                    Role::Agent if peer_eof.load(Ordering::Acquire) => break Ok(()),
                    Role::Server if !half_close => {
                        // Stock: ask the agent to close, keep delivering until it answers.
                        let _ = to_peer.send(close_req()).await;
                        sent_close_req = true;
                    }
                    _ => {}
                }
            }
            end = &mut down => {
                match end {
                    DownEnd::Closed(error) => break error.map_or(Ok(()), Err),
                    DownEnd::WriteFailed(e) => {
                        if role == Role::Server && !sent_close_req {
                            let _ = to_peer.send(close_req()).await;
                        }
                        break Err(e);
                    }
                }
            }
            _ = peer_eof_seen.notified(), if role == Role::Agent && up_result.is_some() => {
                break Ok(());
            }
            _ = tokio::time::sleep(CLOSE_RSP_WAIT), if sent_close_req => {
                break Err("agent did not answer CLOSE_REQ".into());
            }
        }
    };

    if role == Role::Agent {
        let rsp = PacketKind::CloseResponse { connect_id, error: ending.clone().err() };
        let _ = to_peer.send(rsp.into_packet()).await;
    }
    if let Some(window) = &send_window {
        window.close();
    }
    BridgeStats {
        local_to_peer: local_to_peer.load(Ordering::Relaxed),
        peer_to_local: peer_to_local.load(Ordering::Relaxed),
        error: ending.err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::flow::InboundQueue;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct FakePeer {
        sent: mpsc::Receiver<Packet>,
        queue: InboundQueue,
    }

    fn link(role: Role, half_close: bool, flow_control: bool) -> (PacketLink, FakePeer) {
        let (to_peer, sent) = mpsc::channel(1024);
        let (queue, from_peer) = InboundQueue::new(flow_control);
        let link = PacketLink {
            connect_id: 5,
            to_peer,
            from_peer,
            send_window: flow_control.then(|| Arc::new(SendWindow::default())),
            half_close,
            role,
        };
        (link, FakePeer { sent, queue })
    }

    async fn next(peer: &mut FakePeer) -> PacketKind {
        PacketKind::of(peer.sent.recv().await.expect("a packet")).expect("valid")
    }

    #[tokio::test]
    async fn agent_half_close_keeps_the_other_direction_open_until_both_finish() {
        let (local, mut app) = tokio::io::duplex(1 << 16);
        let (link, mut peer) = link(Role::Agent, true, true);
        let bridge = tokio::spawn(bridge(local, link, Bytes::new()));
        // The backend answers and half-closes.
        app.write_all(b"reply").await.expect("write");
        app.shutdown().await.expect("shutdown");
        assert!(matches!(next(&mut peer).await, PacketKind::Data { ref data, eof: false, .. } if data == "reply"));
        assert!(matches!(next(&mut peer).await, PacketKind::Data { eof: true, .. }));
        // The server side still sends, then half-closes too.
        peer.queue.deliver(Bytes::from_static(b"late")).await.expect("deliver");
        peer.queue.signal(Inbound::Eof).expect("eof");
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"late");
        assert_eq!(next(&mut peer).await, PacketKind::CloseResponse { connect_id: 5, error: None });
        let stats = bridge.await.expect("joins");
        assert_eq!((stats.local_to_peer, stats.peer_to_local, stats.error), (5, 4, None));
    }

    #[tokio::test]
    async fn stock_agent_closes_on_backend_eof() {
        let (local, mut app) = tokio::io::duplex(1 << 16);
        let (link, mut peer) = link(Role::Agent, false, false);
        let bridge = tokio::spawn(bridge(local, link, Bytes::new()));
        app.write_all(b"x").await.expect("write");
        drop(app);
        assert!(matches!(next(&mut peer).await, PacketKind::Data { .. }));
        assert_eq!(next(&mut peer).await, PacketKind::CloseResponse { connect_id: 5, error: None });
        bridge.await.expect("joins");
    }

    #[tokio::test]
    async fn server_without_half_close_asks_to_close_and_still_delivers_until_answered() {
        let (local, mut app) = tokio::io::duplex(1 << 16);
        let (link, mut peer) = link(Role::Server, false, false);
        let bridge = tokio::spawn(bridge(local, link, Bytes::from_static(b"early")));
        assert!(matches!(next(&mut peer).await, PacketKind::Data { ref data, .. } if data == "early"));
        let (mut app_read, mut app_write) = tokio::io::split(&mut app);
        app_write.shutdown().await.expect("client EOF");
        assert_eq!(next(&mut peer).await, PacketKind::CloseRequest { connect_id: 5 });
        peer.queue.deliver(Bytes::from_static(b"tail")).await.expect("deliver");
        peer.queue.signal(Inbound::Close(None)).expect("close");
        let mut got = Vec::new();
        app_read.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"tail");
        assert_eq!(bridge.await.expect("joins").error, None);
    }

    #[tokio::test]
    async fn sender_stops_at_the_window_and_resumes_on_update() {
        let (local, mut app) = tokio::io::duplex(1 << 20);
        let (link, mut peer) = link(Role::Agent, true, true);
        let window = link.send_window.clone().expect("window");
        let bridge = tokio::spawn(bridge(local, link, Bytes::new()));
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 1 << 16];
            for _ in 0..(2 * WINDOW_BYTES / chunk.len()) {
                app.write_all(&chunk).await.expect("write");
            }
            app
        });
        let mut received = 0;
        while received < WINDOW_BYTES {
            if let PacketKind::Data { data, .. } = next(&mut peer).await {
                received += data.len();
            }
        }
        assert_eq!(received, WINDOW_BYTES, "exactly one window before any update");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(peer.sent.try_recv().is_err(), "nothing beyond the window");
        window.grant(WINDOW_BYTES as u64);
        while received < 2 * WINDOW_BYTES {
            if let PacketKind::Data { data, .. } = next(&mut peer).await {
                received += data.len();
            }
        }
        drop(writer.await.expect("writer"));
        peer.queue.signal(Inbound::Close(None)).expect("close");
        bridge.await.expect("joins");
    }
}
