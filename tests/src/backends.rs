//! Destinations for agents to dial, each on its own thread and tokio runtime
//! (so a test that blocks its own runtime cannot stall them): echo, a SHA-256
//! sink, a deterministic source, an HTTPS server standing in for a kubelet,
//! and a backend that speaks first. Each counts accepted and open
//! connections. Stops when dropped. Never talks to konduit directly.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::data::{SOURCE_SEED, pattern_fill};

/// The body the HTTPS backend answers `GET /` with.
pub const KUBELET_BODY: &str = "ok: hello from the fake kubelet behind konduit\n";

/// What a backend does with each connection.
#[derive(Clone)]
pub enum Kind {
    /// Writes back everything it reads; half-closes after the client's EOF.
    Echo,
    /// Reads to EOF, then writes the 32-byte SHA-256 of what it read and closes.
    Sha256Sink,
    /// Reads an 8-byte big-endian length `n`, writes the first `n` bytes of pattern
    /// [`SOURCE_SEED`], then closes.
    Source,
    /// TLS with this config; answers `GET /` with [`KUBELET_BODY`] (404 otherwise), then closes.
    Https(Arc<rustls::ServerConfig>),
    /// Writes these bytes as soon as it accepts, then echoes.
    SpeaksFirst(Vec<u8>),
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
}

/// A running backend; stopped on drop.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    /// Starts a backend of `kind` on 127.0.0.1 (kernel-chosen port).
    pub fn start(kind: Kind) -> Backend {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind backend");
        Backend::start_on(listener, kind)
    }

    /// Starts a backend of `kind` on an already bound listener (e.g. one inside a netns).
    pub fn start_on(listener: std::net::TcpListener, kind: Kind) -> Backend {
        let addr = listener.local_addr().expect("backend address");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let counters = Arc::new(Counters::default());
        let (stop, stopped) = oneshot::channel();
        let thread_counters = counters.clone();
        let thread = std::thread::Builder::new()
            .name(format!("backend-{addr}"))
            .spawn(move || {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("backend runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = accept_loop(listener, kind, thread_counters) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime cancels the connection tasks.
            })
            .expect("spawn backend thread");
        Backend { addr, counters, stop: Some(stop), thread: Some(thread) }
    }

    /// An echo backend.
    pub fn echo() -> Backend {
        Backend::start(Kind::Echo)
    }

    /// A SHA-256 sink backend.
    pub fn sha256_sink() -> Backend {
        Backend::start(Kind::Sha256Sink)
    }

    /// A pattern source backend.
    pub fn source() -> Backend {
        Backend::start(Kind::Source)
    }

    /// An HTTPS backend presenting the PKI's server certificate (SAN 127.0.0.1).
    pub fn https(pki: &crate::Pki) -> Backend {
        Backend::start(Kind::Https(Arc::new(pki.server_config(&pki.server))))
    }

    /// A backend that writes `banner` on accept, then echoes.
    pub fn speaks_first(banner: &[u8]) -> Backend {
        Backend::start(Kind::SpeaksFirst(banner.to_vec()))
    }

    /// `host:port`, the address to dial through konduit.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently open (accepted and not yet finished).
    pub fn open(&self) -> u64 {
        self.counters.open.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct OpenGuard(Arc<Counters>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(listener: TcpListener, kind: Kind, counters: Arc<Counters>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        counters.accepted.fetch_add(1, Ordering::SeqCst);
        counters.open.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard(counters.clone());
        let kind = kind.clone();
        tokio::spawn(async move {
            let _guard = guard;
            // A failing connection (reset by a test on purpose) ends only itself.
            let _ = serve(stream, kind).await;
        });
    }
}

async fn serve(mut stream: TcpStream, kind: Kind) -> std::io::Result<()> {
    match kind {
        Kind::Echo => echo(&mut stream).await,
        Kind::Sha256Sink => {
            let mut hasher = Sha256::new();
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            let digest: [u8; 32] = hasher.finalize().into();
            stream.write_all(&digest).await?;
            stream.shutdown().await
        }
        Kind::Source => {
            let len = stream.read_u64().await?;
            let mut buf = vec![0; 64 * 1024];
            let mut sent = 0u64;
            while sent < len {
                let n = (len - sent).min(buf.len() as u64) as usize;
                pattern_fill(SOURCE_SEED, sent, &mut buf[..n]);
                stream.write_all(&buf[..n]).await?;
                sent += n as u64;
            }
            stream.shutdown().await
        }
        Kind::Https(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let mut tls = acceptor.accept(stream).await?;
            let head = read_head(&mut tls).await?;
            let (status, body) =
                if head.starts_with("GET / ") { ("200 OK", KUBELET_BODY) } else { ("404 Not Found", "not found\n") };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            tls.write_all(response.as_bytes()).await?;
            tls.shutdown().await
        }
        Kind::SpeaksFirst(banner) => {
            stream.write_all(&banner).await?;
            echo(&mut stream).await
        }
    }
}

async fn echo(stream: &mut TcpStream) -> std::io::Result<()> {
    let (mut r, mut w) = stream.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

/// Reads an HTTP request head (up to the blank line, at most 16 KiB).
async fn read_head<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 || stream.read(&mut byte).await? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// A backend running `handler` for each accepted connection, for behaviour [`Kind`] does
/// not offer (a source that reports progress, a sink that waits before reading, ...). Like
/// [`Backend`] it runs on its own thread and runtime, sets TCP_NODELAY, and stops on drop.
pub struct FnBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FnBackend {
    /// Starts on 127.0.0.1 (kernel-chosen port).
    pub fn start<F, Fut>(handler: F) -> FnBackend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
    {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind test backend");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("test backend address");
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("fn-backend-{addr}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("tokio listener");
                    let handler = Arc::new(handler);
                    let accept = async {
                        loop {
                            match listener.accept().await {
                                Ok((stream, _)) => {
                                    let _ = stream.set_nodelay(true);
                                    let handler = handler.clone();
                                    tokio::spawn(async move {
                                        let _ = handler(stream).await;
                                    });
                                }
                                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                            }
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
            })
            .expect("spawn test backend thread");
        FnBackend { addr, stop: Some(stop), thread: Some(thread) }
    }

    /// `host:port` to dial.
    pub fn target(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for FnBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
