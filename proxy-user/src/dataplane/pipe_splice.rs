//! The pipe-splice engine: joins two stream sockets with splice(2) through
//! a pipe per moving direction. The kernel moves page references from one socket
//! to the pipe and on to the other; the payload never enters userspace, which
//! only drives the loop on readiness. The server uses it to join an
//! HTTP-CONNECT frontend on a unix socket with a plaintext relay socket.
//!
//! Why not the sockmap engine for a unix socket (measured on kernel 6.18, see
//! the README's design notes): the kernel evicts a unix socket from the
//! sockmap as soon as its peer half-closes, dropping the bytes queued for it;
//! bytes redirected to a unix socket wait in its psock queue with no counter
//! that says when they have left (rule 2 cannot be obeyed: shutting down at
//! EOF truncated 1 GiB transfers); and bytes queued before the insert are
//! not kicked (rule 5). splice(2) has none of these problems, because every
//! byte has left the pipe before the loop goes on: EOF is propagated only
//! after the last byte was handed to the sink, in order. It was also faster
//! than the sockmap engine for unix ⇄ TCP on this kernel.
//!
//! Owns the process's pool of pipes. A direction takes a pipe only while
//! bytes are in it and gives it back empty, so an idle connection holds no
//! pipe: a server with thousands of open tunnels needs two fds per tunnel,
//! not six. Payload enters userspace only when no pipe can be made (the
//! process is out of file descriptors): that chunk is copied instead.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use nix::fcntl::{OFlag, SpliceFFlags};
use tokio::io::{Interest, Ready};

use super::tcp_state;
use super::{EngineKind, SpliceStats};

/// Bytes asked of one splice(2) call. The pipe's own capacity (64 KiB by
/// default) bounds what one call moves; a bigger pipe measured no faster and
/// would count against the per-user pipe quota (`pipe-user-pages-soft`).
const CHUNK: usize = 1 << 20;

/// A socket the engine can drive: its fd plus tokio's readiness for it.
pub trait PipeSocket: AsFd + Send + Sync + 'static {
    /// Runs `f` (a non-blocking syscall on this socket); a `WouldBlock` from
    /// it clears the readiness it consumed.
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Waits until the socket is ready for `interest` (or closed, or failed).
    fn ready(&self, interest: Interest) -> impl Future<Output = io::Result<Ready>> + Send;
    /// Makes the coming close an abort the peer can see, where the socket
    /// type has one.
    fn arm_abort(&self);
    /// After a read returned EOF: whether the connection was in fact reset
    /// (its error may already have been taken by an earlier call).
    /// `fin_sent` says whether we half-closed this socket ourselves.
    fn was_reset(&self, fin_sent: bool) -> bool;
}

impl PipeSocket for tokio::net::TcpStream {
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        tokio::net::TcpStream::try_io(self, interest, f)
    }

    fn ready(&self, interest: Interest) -> impl Future<Output = io::Result<Ready>> + Send {
        tokio::net::TcpStream::ready(self, interest)
    }

    fn arm_abort(&self) {
        // The close that follows sends RST.
        let _ = tcp_state::abort_on_close(self);
    }

    fn was_reset(&self, fin_sent: bool) -> bool {
        // A peer's FIN leaves the socket in CLOSE_WAIT (or, after our own
        // FIN, in CLOSE via TIME_WAIT); a reset leaves it in CLOSE.
        !fin_sent && tcp_state::counters(self.as_fd()).is_ok_and(|c| c.state == tcp_state::TCP_CLOSE)
    }
}

impl PipeSocket for tokio::net::UnixStream {
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        tokio::net::UnixStream::try_io(self, interest, f)
    }

    fn ready(&self, interest: Interest) -> impl Future<Output = io::Result<Ready>> + Send {
        tokio::net::UnixStream::ready(self, interest)
    }

    fn arm_abort(&self) {
        // A unix stream socket has no reset: its peer sees the close as EOF
        // (or ECONNRESET if it had sent bytes we never took).
    }

    fn was_reset(&self, _fin_sent: bool) -> bool {
        // A peer that closed with unread data reports ECONNRESET on the read itself.
        false
    }
}

/// A pipe, empty whenever it is not lent to a direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        Ok(Pipe { read, write })
    }
}

/// Empty pipes kept for reuse; beyond this many, a returned pipe is closed.
const POOL_MAX_IDLE: usize = 256;

/// The process's empty pipes.
static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

fn take_pipe() -> io::Result<Pipe> {
    let reused = POOL.lock().unwrap_or_else(PoisonError::into_inner).pop();
    match reused {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Gives back a pipe that is empty (everything spliced in was spliced out).
fn return_pipe(pipe: Pipe) {
    let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if pool.len() < POOL_MAX_IDLE {
        pool.push(pipe);
    }
}

/// Pipes waiting in the pool, for tests.
#[cfg(test)]
fn pooled_pipes() -> usize {
    POOL.lock().unwrap_or_else(PoisonError::into_inner).len()
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    nix::fcntl::splice(from, None, to, None, len, SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE)
        .map_err(io::Error::from)
}

/// Which end of a direction failed.
enum PumpError {
    Source(io::Error),
    Sink(io::Error),
}

impl PumpError {
    fn into_inner(self) -> io::Error {
        match self {
            PumpError::Source(e) | PumpError::Sink(e) => e,
        }
    }
}

/// One direction: where from, where to.
struct Direction<'a, S, D> {
    source: &'a S,
    sink: &'a D,
    /// Whether the other direction half-closed `source`.
    source_fin_sent: &'a AtomicBool,
    /// Set when this direction half-closes `sink`.
    sink_fin_sent: &'a AtomicBool,
}

/// What one fill of a pipe brought.
enum Filled {
    /// Bytes moved to the sink.
    Moved,
    /// The source reached EOF.
    Eof,
}

/// Moves everything the source receives to the sink until EOF, then
/// half-closes the sink; counts the bytes moved into `moved`.
async fn pump<S: PipeSocket, D: PipeSocket>(dir: Direction<'_, S, D>, moved: &mut u64) -> Result<(), PumpError> {
    loop {
        // Wait for bytes before taking a pipe, so that idle directions hold none.
        dir.source.ready(Interest::READABLE).await.map_err(PumpError::Source)?;
        let filled = match take_pipe() {
            Ok(pipe) => through_pipe(&dir, pipe, moved).await?,
            Err(e) => {
                tracing::debug!(error = %e, "no pipe for splice(2); copying one chunk");
                copy_chunk(&dir, moved).await?
            }
        };
        if let Some(Filled::Eof) = filled {
            if dir.source.was_reset(dir.source_fin_sent.load(Ordering::Acquire)) {
                return Err(PumpError::Source(io::ErrorKind::ConnectionReset.into()));
            }
            // EOF. Every byte before it has left the pipe for the sink (a
            // fill is emptied before the next), so the FIN cannot overtake data.
            dir.sink_fin_sent.store(true, Ordering::Release);
            return tcp_state::shutdown_write(dir.sink).map_err(PumpError::Sink);
        }
    }
}

/// Fills `pipe` from the source once and empties it into the sink, then
/// returns it to the pool; `None` when the readiness was stale. The pipe is
/// filled only when empty, so a non-blocking splice into it answers EAGAIN
/// only because the source has nothing: waiting for the source's readiness
/// then cannot miss a wake-up. A pipe that failed mid-way is closed, not
/// returned (it may hold bytes).
async fn through_pipe<S: PipeSocket, D: PipeSocket>(
    dir: &Direction<'_, S, D>,
    pipe: Pipe,
    moved: &mut u64,
) -> Result<Option<Filled>, PumpError> {
    let (source, sink) = (dir.source, dir.sink);
    let filled = match source.try_io(Interest::READABLE, || splice(source.as_fd(), pipe.write.as_fd(), CHUNK)) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return_pipe(pipe);
            return Ok(None);
        }
        Err(e) => return Err(PumpError::Source(e)),
    };
    if filled == 0 {
        return_pipe(pipe);
        return Ok(Some(Filled::Eof));
    }
    let mut left = filled;
    while left > 0 {
        match sink.try_io(Interest::WRITABLE, || splice(pipe.read.as_fd(), sink.as_fd(), left)) {
            Ok(0) => return Err(PumpError::Sink(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                left -= n;
                *moved += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                sink.ready(Interest::WRITABLE).await.map_err(PumpError::Sink)?;
            }
            Err(e) => return Err(PumpError::Sink(e)),
        }
    }
    return_pipe(pipe);
    Ok(Some(Filled::Moved))
}

/// Bytes copied at a time when no pipe can be made.
const COPY_CHUNK: usize = 16 * 1024;

/// The same as [`through_pipe`] through a userspace buffer, for when the
/// process has no fd left for a pipe.
async fn copy_chunk<S: PipeSocket, D: PipeSocket>(
    dir: &Direction<'_, S, D>,
    moved: &mut u64,
) -> Result<Option<Filled>, PumpError> {
    let (source, sink) = (dir.source, dir.sink);
    let mut buf = vec![0u8; COPY_CHUNK];
    let filled = match source.try_io(Interest::READABLE, || read(source.as_fd(), &mut buf)) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(PumpError::Source(e)),
    };
    if filled == 0 {
        return Ok(Some(Filled::Eof));
    }
    let mut done = 0;
    while done < filled {
        match sink.try_io(Interest::WRITABLE, || write(sink.as_fd(), &buf[done..filled])) {
            Ok(0) => return Err(PumpError::Sink(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                done += n;
                *moved += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                sink.ready(Interest::WRITABLE).await.map_err(PumpError::Sink)?;
            }
            Err(e) => return Err(PumpError::Sink(e)),
        }
    }
    Ok(Some(Filled::Moved))
}

fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(fd, buf).map_err(io::Error::from)
}

fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    nix::unistd::write(fd, buf).map_err(io::Error::from)
}

/// Two sockets, ready to be joined.
pub struct PipeSplice<A: PipeSocket, B: PipeSocket> {
    a: A,
    b: B,
}

impl<A: PipeSocket, B: PipeSocket> PipeSplice<A, B> {
    pub fn new(a: A, b: B) -> Self {
        PipeSplice { a, b }
    }

    /// Moves bytes both ways until both directions reached EOF (each
    /// half-close passed on after the bytes before it) or one end failed
    /// (then both are closed, TCP ends with RST).
    pub async fn run(self) -> SpliceStats {
        let PipeSplice { a, b } = self;
        let (mut forward_bytes, mut backward_bytes) = (0u64, 0u64);
        let (a_fin_sent, b_fin_sent) = (AtomicBool::new(false), AtomicBool::new(false));
        let error = {
            let forward = pump(
                Direction { source: &a, sink: &b, source_fin_sent: &a_fin_sent, sink_fin_sent: &b_fin_sent },
                &mut forward_bytes,
            );
            let backward = pump(
                Direction { source: &b, sink: &a, source_fin_sent: &b_fin_sent, sink_fin_sent: &a_fin_sent },
                &mut backward_bytes,
            );
            tokio::pin!(forward, backward);
            let (mut fwd_done, mut bwd_done) = (false, false);
            let mut error = None;
            while !(fwd_done && bwd_done) {
                let result = tokio::select! {
                    r = &mut forward, if !fwd_done => { fwd_done = true; r }
                    r = &mut backward, if !bwd_done => { bwd_done = true; r }
                };
                if let Err(e) = result {
                    error = Some(e);
                    break;
                }
            }
            error
        };
        if error.is_some() {
            // An abort on either side is passed on as an abort (RST on TCP).
            a.arm_abort();
            b.arm_abort();
        }
        SpliceStats {
            engine: EngineKind::Splice,
            a_to_b: forward_bytes,
            b_to_a: backward_bytes,
            passed: 0,
            trimmed: 0,
            error: error.map(|e| e.into_inner().to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

    /// (client, server side) of a unix socket, and (relay, far end) of a TCP connection.
    async fn topology() -> (UnixStream, UnixStream, TcpStream, TcpStream) {
        let dir = std::env::temp_dir().join(format!("konduit-pipe-splice-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s");
        let listener = UnixListener::bind(&path).expect("bind");
        let client = UnixStream::connect(&path).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let _ = std::fs::remove_dir_all(&dir);
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let far = TcpStream::connect(tcp.local_addr().expect("addr")).await.expect("connect");
        let (relay, _) = tcp.accept().await.expect("accept");
        (client, server, relay, far)
    }

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// One test of this module at a time: they count the process's pipes.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Open file descriptors of this process that are pipes.
    fn pipe_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("pipe:"))
            .count()
    }

    #[tokio::test]
    async fn pipe_splice_idle_connections_hold_no_pipe_and_a_transfer_gives_its_pipe_back() {
        let _serial = SERIAL.lock().await;
        let before = pipe_fds();
        let mut open = Vec::new();
        for _ in 0..50 {
            let (client, server, relay, far) = topology().await;
            open.push((client, far, start(server, relay)));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Other tests of this binary may open a few pipes meanwhile; four per
        // connection (two pipes) would be 200.
        let idle = pipe_fds();
        assert!(idle < before + 10, "50 idle joined connections hold no pipe: {before} pipe fds before, {idle} after");

        // Each moves a few bytes one way; the pipes come back to the pool, not one per connection.
        for (client, far, _) in &mut open {
            client.write_all(b"hello").await.expect("write");
            let mut got = [0u8; 5];
            far.read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"hello");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(pooled_pipes() >= 1, "the pipe went back to the pool");
        let after = pipe_fds();
        assert!(
            after < before + 10,
            "after the bytes moved only pooled pipes stay open: {before} before, {after} after"
        );
        for (client, far, splice) in open {
            drop((client, far));
            splice.await.expect("joins");
        }
    }

    fn start(server: UnixStream, relay: TcpStream) -> tokio::task::JoinHandle<SpliceStats> {
        tokio::spawn(PipeSplice::new(server, relay).run())
    }

    #[tokio::test]
    async fn pipe_splice_moves_bulk_byte_exact_both_ways_at_once() {
        let _serial = SERIAL.lock().await;
        let (client, server, relay, far) = topology().await;
        let splice = start(server, relay);
        let up = pattern(8 << 20, 1);
        let down = pattern(8 << 20, 2);
        let (mut client_read, mut client_write) = client.into_split();
        let (mut far_read, mut far_write) = far.into_split();
        let (u, d) = (up.clone(), down.clone());
        let up_writer = tokio::spawn(async move {
            client_write.write_all(&u).await.expect("write up");
            client_write.shutdown().await.expect("half-close up");
        });
        let down_writer = tokio::spawn(async move {
            far_write.write_all(&d).await.expect("write down");
            far_write.shutdown().await.expect("half-close down");
        });
        let mut at_far = Vec::new();
        let mut at_client = Vec::new();
        let (r1, r2) = tokio::join!(far_read.read_to_end(&mut at_far), client_read.read_to_end(&mut at_client));
        r1.expect("far reads to EOF");
        r2.expect("client reads to EOF");
        up_writer.await.expect("joins");
        down_writer.await.expect("joins");
        assert_eq!(Sha256::digest(&at_far), Sha256::digest(&up), "client → far is byte-exact");
        assert_eq!(Sha256::digest(&at_client), Sha256::digest(&down), "far → client is byte-exact");
        let stats = splice.await.expect("joins");
        assert_eq!(stats.engine, EngineKind::Splice);
        assert_eq!((stats.a_to_b, stats.b_to_a, stats.error), (up.len() as u64, down.len() as u64, None));
    }

    #[tokio::test]
    async fn pipe_splice_passes_half_close_each_way_after_the_bytes_before_it() {
        let _serial = SERIAL.lock().await;
        for client_closes_first in [true, false] {
            let (mut client, server, relay, mut far) = topology().await;
            let splice = start(server, relay);
            let (first, second): (&mut dyn AsyncRwShutdown, &mut dyn AsyncRwShutdown) =
                if client_closes_first { (&mut client, &mut far) } else { (&mut far, &mut client) };
            let request = pattern(1 << 20, 3);
            first.write_all(&request).await.expect("write");
            first.shutdown().await.expect("half-close");
            let mut got = Vec::new();
            second.read_to_end(&mut got).await.expect("EOF arrives");
            assert_eq!(got, request, "EOF comes after every byte");
            // The other direction still works after the half-close.
            second.write_all(b"reply after half-close").await.expect("write back");
            second.shutdown().await.expect("close");
            let mut back = Vec::new();
            first.read_to_end(&mut back).await.expect("read");
            assert_eq!(back, b"reply after half-close");
            let stats = splice.await.expect("joins");
            assert_eq!(stats.error, None);
        }
    }

    trait AsyncRwShutdown: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
    impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncRwShutdown for T {}

    #[tokio::test]
    async fn pipe_splice_turns_a_tcp_reset_into_a_closed_unix_socket_and_a_unix_abort_into_a_reset() {
        let _serial = SERIAL.lock().await;
        // Relay side resets: the unix client sees the connection end.
        let (mut client, server, relay, far) = topology().await;
        let splice = start(server, relay);
        tcp_state::abort_on_close(&far).expect("linger");
        drop(far);
        let mut buf = [0u8; 8];
        let n = client.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "the client's stream ends");
        assert!(splice.await.expect("joins").error.is_some());

        // The unix client aborts (closes with bytes it never read): the far end gets RST.
        let (client, server, relay, mut far) = topology().await;
        let splice = start(server, relay);
        far.write_all(b"never read by the client").await.expect("write");
        // Wait until the bytes sit unread in the client's socket.
        while tcp_state::readable_bytes(client.as_fd()).expect("FIONREAD") == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(client);
        let mut buf = [0u8; 8];
        let result = far.read(&mut buf).await;
        assert!(
            matches!(&result, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "the far end sees a reset, got {result:?}"
        );
        assert!(splice.await.expect("joins").error.is_some());
    }

    #[tokio::test]
    async fn pipe_splice_never_truncates_when_the_writer_closes_right_after_a_large_write() {
        let _serial = SERIAL.lock().await;
        for round in 0..50u64 {
            let (client, server, relay, far) = topology().await;
            let splice = start(server, relay);
            let data = pattern(1 << 20, round + 10);
            let (mut sender, mut receiver): (Box<dyn AsyncRwShutdown>, Box<dyn AsyncRwShutdown>) =
                if round % 2 == 0 { (Box::new(client), Box::new(far)) } else { (Box::new(far), Box::new(client)) };
            let d = data.clone();
            let writer = tokio::spawn(async move {
                sender.write_all(&d).await.expect("write");
                drop(sender);
            });
            let mut got = Vec::new();
            receiver.read_to_end(&mut got).await.expect("EOF");
            writer.await.expect("joins");
            assert_eq!(got.len(), data.len(), "round {round}: no byte lost before EOF");
            assert!(got == data, "round {round}: byte-exact");
            drop(receiver);
            splice.await.expect("joins");
        }
    }
}
