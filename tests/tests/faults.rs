//! Faults: failed dials, missing agents, agents and servers killed or
//! restarted, bad input on every listener, and drain on SIGTERM. Each test
//! starts its own server and agents on loopback (see `konduit_e2e::topology`)
//! and checks that the failure is reported the stock way, ends only what it
//! concerns, leaks nothing, and that the next dial works.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use konduit::protocol::PacketKind;
use konduit::protocol::pb::Packet;
use konduit_e2e::backends::Backend;
use konduit_e2e::clients::{
    self, ConnectError, DialError, ProxyClient, close_request_packet, connect_request, data_packet,
    dial_request_packet, tls_connect,
};
use konduit_e2e::data::{PatternCheck, SOURCE_SEED, pattern, pattern_fill};
use konduit_e2e::probe::metric;
use konduit_e2e::process::Launch;
use konduit_e2e::topology::ByteStream;
use konduit_e2e::{Frontend, GrpcTunnel, Konduit, Role, Topology};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Bound on one step (an answer, a close, a transfer's tail).
const STEP: Duration = Duration::from_secs(5);

const SERVER_PENDING_DIALS: &str = "konnectivity_network_proxy_server_pending_backend_dials";
const SERVER_READY_AGENTS: &str = "konnectivity_network_proxy_server_ready_backend_connections";
const SERVER_HTTP_CONNECTIONS: &str = "konnectivity_network_proxy_server_http_connections";
const AGENT_OPEN_ENDPOINTS: &str = "konnectivity_network_proxy_agent_open_endpoint_connections";
const AGENT_DIALS: &str = "konnectivity_network_proxy_agent_dial_duration_seconds_count";

// ---------------------------------------------------------------------------
// Helpers (the harness in tests/src is not ours to change).
// ---------------------------------------------------------------------------

/// Polls `check` until it returns `Ok` or `timeout` passes; the error is the last failure.
async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!("not within {timeout:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gauge or counter of `process`'s `/metrics` (health port).
async fn sample(process: &Konduit, name: &str) -> Option<f64> {
    metric(&process.metrics().await, name, &[])
}

/// Waits until `name` on `process` reads exactly `want`.
async fn wait_metric(process: &Konduit, name: &str, want: f64, timeout: Duration) -> Result<(), String> {
    eventually(timeout, || async {
        match sample(process, name).await {
            Some(v) if v == want => Ok(()),
            other => Err(format!("{}: {name} is {other:?}, expected {want}", process.name)),
        }
    })
    .await
}

/// Everything is back to idle: no pending dial and (HTTP-CONNECT) no open frontend
/// connection on the server, no open endpoint at any running agent.
async fn assert_no_leaks(t: &mut Topology) {
    let mut problems = Vec::new();
    if let Err(e) = wait_metric(&t.server, SERVER_PENDING_DIALS, 0.0, STEP).await {
        problems.push(e);
    }
    for agent in t.agents.iter_mut() {
        if agent.is_running()
            && let Err(e) = wait_metric(agent, AGENT_OPEN_ENDPOINTS, 0.0, STEP).await
        {
            problems.push(e);
        }
    }
    if !t.frontend.is_grpc()
        && let Err(e) = wait_metric(&t.server, SERVER_HTTP_CONNECTIONS, 0.0, STEP).await
    {
        problems.push(e);
    }
    if !problems.is_empty() {
        t.print_logs();
        panic!("leaks: {problems:#?}");
    }
}

/// Waits until `agent` is ready and the server counts `n` ready agents.
async fn wait_agent_and_server(t: &mut Topology, agent: usize, n: usize, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    t.agents[agent].wait_ready(timeout).await?;
    t.server.wait_ready(deadline.saturating_duration_since(Instant::now())).await?;
    wait_metric(&t.server, SERVER_READY_AGENTS, n as f64, deadline.saturating_duration_since(Instant::now())).await
}

/// A byte stream that also keeps the gRPC client it came from alive.
struct Held<S> {
    stream: S,
    _client: ProxyClient,
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A tunnel to `target` through whatever frontend `t` has, as a byte stream (a gRPC
/// tunnel is pumped into a stream: EOF from us becomes CLOSE_REQ).
async fn open(t: &Topology, target: &str) -> Result<Box<dyn ByteStream>, String> {
    if t.frontend.is_grpc() {
        let mut client = t.grpc().await;
        let tunnel = GrpcTunnel::dial(&mut client, target).await.map_err(|e| e.to_string())?;
        Ok(Box::new(Held { stream: tunnel.into_stream(), _client: client }))
    } else {
        t.http_connect(target).await.map_err(|e| e.to_string())
    }
}

/// Sends `len` pattern bytes to an echo backend while reading them back, checks them,
/// then closes our side and expects a clean end with nothing more.
async fn echo_exact<S: AsyncRead + AsyncWrite + Unpin>(stream: S, seed: u64, len: usize) -> Result<(), String> {
    let (mut r, mut w) = tokio::io::split(stream);
    let sent = pattern(seed, len);
    let write = async {
        w.write_all(&sent).await?;
        w.flush().await
    };
    let read = async {
        let mut got = vec![0; len];
        r.read_exact(&mut got).await.map(|_| got)
    };
    let (wrote, got) = tokio::time::timeout(STEP, async { tokio::join!(write, read) })
        .await
        .map_err(|_| format!("echo of {len} bytes did not complete in {STEP:?}"))?;
    wrote.map_err(|e| format!("write: {e}"))?;
    let got = got.map_err(|e| format!("read: {e}"))?;
    if got != sent {
        let at = got.iter().zip(&sent).position(|(a, b)| a != b);
        return Err(format!("echoed bytes differ from the sent ones (first at {at:?})"));
    }
    let mut stream = r.unsplit(w);
    stream.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut rest))
        .await
        .map_err(|_| "no EOF after our close".to_string())?
        .map_err(|e| format!("read to EOF: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} unexpected bytes after the echo", rest.len()));
    }
    Ok(())
}

/// One full echo exchange of `len` bytes through a fresh tunnel.
async fn echo_through(t: &Topology, target: &str, seed: u64, len: usize) -> Result<(), String> {
    let stream = open(t, target).await.map_err(|e| format!("dial {target}: {e}"))?;
    echo_exact(stream, seed, len).await
}

/// How a connection we fed bad input ended.
#[derive(Debug)]
struct Ending {
    /// Everything received before the end.
    received: Vec<u8>,
    /// `None` for a clean EOF, else the error (reset, TLS alert…).
    error: Option<String>,
}

impl Ending {
    /// The status code of the HTTP response received, if any.
    fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.received);
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}

/// Writes `input` (ignoring write errors: the peer may close first), then reads until
/// the peer ends the connection. Errs if it is still open after `timeout`.
async fn feed<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    input: &[u8],
    timeout: Duration,
) -> Result<Ending, String> {
    let _ = stream.write_all(input).await;
    let _ = stream.flush().await;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return None,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) => return Some(e.to_string()),
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(error) => Ok(Ending { received, error }),
        Err(_) => {
            Err(format!("connection still open after {timeout:?}; received {:?}", String::from_utf8_lossy(&received)))
        }
    }
}

/// A transfer through an echo tunnel that runs until told to stop: 16 KiB pattern chunks
/// out and back, each checked, paced so that it spans whatever the test does meanwhile.
struct Paced {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Result<u64, String>>,
}

const PACED_CHUNK: usize = 16 * 1024;

impl Paced {
    fn start<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(mut stream: S, seed: u64) -> Paced {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (stop2, rounds2) = (stop.clone(), rounds.clone());
        let task = tokio::spawn(async move {
            let mut offset = 0u64;
            let mut out = vec![0u8; PACED_CHUNK];
            let mut back = vec![0u8; PACED_CHUNK];
            while !stop2.load(Ordering::SeqCst) {
                pattern_fill(seed, offset, &mut out);
                let round = async {
                    stream.write_all(&out).await?;
                    stream.flush().await?;
                    stream.read_exact(&mut back).await
                };
                tokio::time::timeout(STEP, round)
                    .await
                    .map_err(|_| format!("transfer stalled at byte {offset}"))?
                    .map_err(|e| format!("transfer failed at byte {offset}: {e}"))?;
                if back != out {
                    return Err(format!("transfer corrupted in the chunk at byte {offset}"));
                }
                offset += PACED_CHUNK as u64;
                rounds2.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stream.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            let mut rest = Vec::new();
            tokio::time::timeout(STEP, stream.read_to_end(&mut rest))
                .await
                .map_err(|_| "no EOF at the end of the transfer".to_string())?
                .map_err(|e| format!("read to EOF: {e}"))?;
            if !rest.is_empty() {
                return Err(format!("{} unexpected bytes at the end of the transfer", rest.len()));
            }
            Ok(offset)
        });
        Paced { stop, rounds, task }
    }

    /// Waits until at least `n` rounds went through.
    async fn wait_rounds(&self, n: u64) {
        let rounds = self.rounds.clone();
        eventually(STEP, || {
            let rounds = rounds.clone();
            async move {
                let r = rounds.load(Ordering::SeqCst);
                if r >= n { Ok(()) } else { Err(format!("{r} rounds")) }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("the healthy transfer is not moving: {e}"));
    }

    fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops after the current round, closes, and returns the bytes moved each way.
    async fn finish(self) -> Result<u64, String> {
        let before = self.rounds.load(Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        let moved = tokio::time::timeout(STEP * 2, self.task)
            .await
            .map_err(|_| "the transfer did not finish".to_string())?
            .map_err(|e| format!("transfer task: {e}"))??;
        if moved < before * PACED_CHUNK as u64 {
            return Err(format!("moved {moved} bytes, fewer than the {before} rounds seen"));
        }
        Ok(moved)
    }
}

/// A 127.0.0.1 port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A loopback destination where connects time out: a listener with backlog 0 whose
/// accept queue is full (never accepted), so the kernel drops further SYNs. Keep the
/// returned value alive while it is used.
struct Blackhole {
    addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _fillers: Vec<TcpStream>,
}

async fn blackhole() -> Blackhole {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind");
    let listener = socket.listen(0).expect("listen(0)");
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("filling the accept queue of {addr}: {e}"),
            Err(_) => {
                // This connect's SYN was dropped: the queue is full. Check it stays so.
                let probe = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await;
                assert!(probe.is_err(), "a connect to the full listener {addr} completed");
                return Blackhole { addr, _listener: listener, _fillers: fillers };
            }
        }
    }
    panic!("the accept queue of {addr} never filled (backlog 0, {} connections)", fillers.len());
}

/// The konduit command line of a running process, from /proc (binary, subcommand, flags).
fn command_line(process: &Konduit) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{}/cmdline", process.pid())).expect("read /proc/<pid>/cmdline");
    raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// Kills the server and starts it again with the very same command line (same ports,
/// same socket, same certificates), logging to `<name>.log`.
fn restart_server(t: &mut Topology, name: &str) {
    let argv = command_line(&t.server);
    assert_eq!(argv.get(1).map(String::as_str), Some("server"), "server command line {argv:?}");
    t.server.kill();
    let launch = Launch::new(Role::Server, name, t.dir.path())
        .binary(std::path::Path::new(&argv[0]))
        .args(argv[2..].iter().cloned())
        .health_port(t.server.health_port)
        .admin_port(t.server.admin_port);
    // The old (dead) server's log is kept on disk as server.log.
    t.server = launch.spawn();
}

/// Reads a tunnel until it ends; returns the bytes seen and how it ended. Errs if it is
/// still open after `timeout`.
async fn read_until_end<S: AsyncRead + Unpin>(
    stream: &mut S,
    check: &mut PatternCheck,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let mut buf = vec![0u8; 256 * 1024];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return None,
                Ok(n) => check.update(&buf[..n]),
                Err(e) => return Some(e.to_string()),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| format!("tunnel still open {timeout:?} later, after {} bytes", check.received()))
}

// ---------------------------------------------------------------------------
// 1. Dial to a closed port.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_dial_to_a_closed_port_gets_dial_rsp_error_and_leaks_nothing() {
    let echo = Backend::echo();
    let mut t = Topology::builder(Frontend::GrpcUds).tag("f-refused-g").start().await;
    let port = closed_port();
    let target = format!("127.0.0.1:{port}");
    let mut client = t.grpc().await;
    for _ in 0..5 {
        match GrpcTunnel::dial(&mut client, &target).await {
            Err(DialError::Refused(e)) => {
                assert!(e.contains("connection refused"), "DIAL_RSP error {e:?} names the refusal")
            }
            Err(other) => panic!("expected a DIAL_RSP error, got {other}"),
            Ok(_) => panic!("dial to the closed port {target} succeeded"),
        }
    }
    // The same stream kind still works, and everything returns to idle.
    echo_through(&t, &echo.target(), 1, 64 * 1024).await.expect("a healthy dial after the refusals");
    assert_no_leaks(&mut t).await;
    eventually(STEP, || async {
        if echo.open() == 0 { Ok(()) } else { Err(format!("{} backend connections open", echo.open())) }
    })
    .await
    .expect("backend connections are closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_to_a_closed_port_gets_502_with_the_dial_error_and_leaks_nothing() {
    let echo = Backend::echo();
    let mut t = Topology::builder(Frontend::HttpConnectUds).tag("f-refused-h").start().await;
    let port = closed_port();
    let target = format!("127.0.0.1:{port}");
    for _ in 0..5 {
        match t.http_connect(&target).await {
            Err(ConnectError::Refused { status, head, body }) => {
                assert_eq!(status, 502, "status for a refused dial; head {head:?}");
                assert_eq!(body.trim_end(), format!("dial tcp {target}: connect: connection refused"), "502 body");
            }
            Err(e) => panic!("expected 502, got {e}"),
            Ok(_) => panic!("CONNECT to the closed port {target} succeeded"),
        }
    }
    echo_through(&t, &echo.target(), 2, 64 * 1024).await.expect("a healthy CONNECT after the refusals");
    assert_no_leaks(&mut t).await;
    eventually(STEP, || async {
        if echo.open() == 0 { Ok(()) } else { Err(format!("{} backend connections open", echo.open())) }
    })
    .await
    .expect("backend connections are closed");
}

// ---------------------------------------------------------------------------
// 2. Dial timeout.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_that_times_out_at_the_agent_gets_504_and_a_timeout_dial_rsp() {
    let hole = blackhole().await;
    let target = hole.addr.to_string();
    // The agent's --dial-timeout is 1s (the server's --backend-dial-timeout is 5s).
    let agent_flags = ["--dial-timeout=1s"];

    let mut hc = Topology::builder(Frontend::HttpConnectUds).tag("f-timeout-h").agent_args(agent_flags).start().await;
    let started = Instant::now();
    match hc.http_connect(&target).await {
        Err(ConnectError::Refused { status, head, body }) => {
            assert_eq!(status, 504, "status for a dial timeout; head {head:?} body {body:?}");
            assert!(body.contains("i/o timeout"), "504 body {body:?} names the timeout");
        }
        Err(e) => panic!("expected 504, got {e}"),
        Ok(_) => panic!("CONNECT to the blackhole {target} succeeded"),
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "504 after {took:?}, expected ~1s");
    assert_no_leaks(&mut hc).await;
    drop(hc);

    let mut grpc = Topology::builder(Frontend::GrpcUds).tag("f-timeout-g").agent_args(agent_flags).start().await;
    let mut client = grpc.grpc().await;
    let started = Instant::now();
    match GrpcTunnel::dial(&mut client, &target).await {
        Err(DialError::Refused(e)) => assert!(e.contains("timeout"), "DIAL_RSP error {e:?} names the timeout"),
        Err(other) => panic!("expected a DIAL_RSP error, got {other}"),
        Ok(_) => panic!("dial to the blackhole {target} succeeded"),
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "DIAL_RSP after {took:?}");
    assert_no_leaks(&mut grpc).await;
}

// ---------------------------------------------------------------------------
// 3. No agent.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_agents_http_connect_gets_500_and_grpc_gets_no_agent_available() {
    let echo = Backend::echo();
    let mut hc = Topology::builder(Frontend::HttpConnectUds).tag("f-noagent-h").agents(0).start().await;
    match hc.http_connect(&echo.target()).await {
        Err(ConnectError::Refused { status, head, body }) => {
            assert_eq!(status, 500, "status without agents; head {head:?}");
            assert_eq!(body.trim_end(), "currently no tunnels available: No agent available");
        }
        Err(e) => panic!("expected 500, got {e}"),
        Ok(_) => panic!("CONNECT succeeded without any agent"),
    }
    assert_no_leaks(&mut hc).await;
    drop(hc);

    let mut grpc = Topology::builder(Frontend::GrpcUds).tag("f-noagent-g").agents(0).start().await;
    let mut client = grpc.grpc().await;
    match GrpcTunnel::dial(&mut client, &echo.target()).await {
        Err(DialError::Refused(e)) => assert_eq!(e, "No agent available"),
        Err(other) => panic!("expected DIAL_RSP \"No agent available\", got {other}"),
        Ok(_) => panic!("dial succeeded without any agent"),
    }
    assert_no_leaks(&mut grpc).await;
    assert_eq!(echo.accepted(), 0, "nothing reached the backend");
}

// ---------------------------------------------------------------------------
// 4. Agent killed mid-transfer.
// ---------------------------------------------------------------------------

/// How a tunnelled connection's bytes travel between server and agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataPath {
    /// `--relay=false`: DATA packets on the agent's gRPC stream.
    Packets,
    /// Default relay: a rustls relay socket per connection, copied in userspace.
    TlsRelay,
    /// Relay with the destination port in `--relay-plaintext-ports`: a plaintext relay
    /// socket spliced to the backend in the kernel (sockmap).
    SplicedRelay,
}

impl DataPath {
    fn agent_flags(self, ports: &[u16]) -> Vec<String> {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        match self {
            DataPath::Packets => vec!["--relay=false".into()],
            DataPath::TlsRelay => vec!["--relay=true".into()],
            DataPath::SplicedRelay => {
                vec![
                    "--relay=true".into(),
                    "--dataplane=sockmap".into(),
                    format!("--relay-plaintext-ports={}", ports.join(",")),
                ]
            }
        }
    }

    /// The engine the agent reports for such connections.
    fn engine(self) -> &'static str {
        if self == DataPath::SplicedRelay { "sockmap" } else { "userspace" }
    }
}

/// A 1 GiB download is running through agent-0 when it is SIGKILLed: the tunnel must end
/// within a few seconds with intact bytes so far, and a new agent must serve new dials.
async fn agent_killed_mid_transfer(frontend: Frontend, path: DataPath, tag: &str) {
    const ASKED: u64 = 1 << 30;
    let source = Backend::source();
    let echo = Backend::echo();
    let flags = path.agent_flags(&[source.addr.port(), echo.addr.port()]);
    let mut t = Topology::builder(frontend).tag(tag).agent_args(flags).start().await;

    let mut check = PatternCheck::new(SOURCE_SEED);
    let ending = if frontend.is_grpc() {
        let mut client = t.grpc().await;
        let mut tunnel = GrpcTunnel::dial(&mut client, &source.target()).await.expect("dial the source");
        tunnel.write(&ASKED.to_be_bytes()).await.expect("ask for 1 GiB");
        while check.received() < (1 << 20) {
            let chunk = tokio::time::timeout(STEP, tunnel.read()).await.expect("data in time").expect("read");
            check.update(&chunk.expect("the download is still running"));
        }
        t.agents[0].kill();
        let killed = Instant::now();
        let end = async {
            loop {
                match tunnel.read().await {
                    Ok(Some(chunk)) => check.update(&chunk),
                    Ok(None) => return format!("ended: {:?}", tunnel.close_response()),
                    Err(e) => return format!("error: {e}"),
                }
            }
        };
        let ending = tokio::time::timeout(STEP, end).await.unwrap_or_else(|_| {
            t.print_logs();
            panic!("gRPC tunnel still open {STEP:?} after the agent was killed ({} bytes)", check.received())
        });
        (ending, killed.elapsed())
    } else {
        let mut stream = t.http_connect(&source.target()).await.expect("CONNECT to the source");
        stream.write_all(&ASKED.to_be_bytes()).await.expect("ask for 1 GiB");
        let mut buf = vec![0u8; 64 * 1024];
        while check.received() < (1 << 20) {
            let n = tokio::time::timeout(STEP, stream.read(&mut buf)).await.expect("data in time").expect("read");
            assert!(n > 0, "the download ended early");
            check.update(&buf[..n]);
        }
        t.agents[0].kill();
        let killed = Instant::now();
        let ending = read_until_end(&mut stream, &mut check, STEP).await.unwrap_or_else(|e| {
            t.print_logs();
            panic!("HTTP-CONNECT tunnel did not end after the agent was killed: {e}")
        });
        (format!("{ending:?}"), killed.elapsed())
    };
    eprintln!("tunnel ended {:?} after the kill ({}): {} bytes", ending.1, ending.0, check.received());
    assert!(check.received() < ASKED, "all of 1 GiB arrived although the agent was killed");
    check.finish(check.received()).expect("the bytes that did arrive are intact");

    // The server forgets the dead agent; the backend sees its connection closed.
    wait_metric(&t.server, SERVER_READY_AGENTS, 0.0, STEP).await.expect("server drops the killed agent");
    eventually(STEP, || async {
        if source.open() == 0 { Ok(()) } else { Err(format!("{} source connections open", source.open())) }
    })
    .await
    .expect("the backend connection of the killed agent is closed");

    // A restarted agent serves new dials, over the same data path.
    t.add_agent(&[]);
    wait_agent_and_server(&mut t, 1, 1, STEP).await.expect("the restarted agent becomes ready");
    echo_through(&t, &echo.target(), 4, 256 * 1024).await.expect("a new dial through the restarted agent");
    let mut stream = open(&t, &source.target()).await.expect("a new download");
    clients::fetch_from_source(&mut stream, 3 << 20).await.expect("3 MiB downloaded byte-exact");
    drop(stream);
    assert_no_leaks(&mut t).await;
    let agent = &t.agents[1];
    eventually(STEP, || async {
        let text = agent.metrics().await;
        match metric(&text, "konduit_dataplane_connections_total", &[("engine", path.engine())]) {
            Some(2.0) => Ok(()),
            other => Err(format!("{} connections with the {} engine:\n{text}", other.unwrap_or(0.0), path.engine())),
        }
    })
    .await
    .expect("the restarted agent moved both new connections on the expected data path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_transfer_ends_http_connect_tunnel_over_data_packets_and_a_new_agent_serves() {
    agent_killed_mid_transfer(Frontend::HttpConnectUds, DataPath::Packets, "f-kill-hp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_transfer_ends_http_connect_tunnel_over_tls_relay_and_a_new_agent_serves() {
    agent_killed_mid_transfer(Frontend::HttpConnectUds, DataPath::TlsRelay, "f-kill-ht").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_transfer_ends_http_connect_tunnel_over_spliced_relay_and_a_new_agent_serves() {
    agent_killed_mid_transfer(Frontend::HttpConnectUds, DataPath::SplicedRelay, "f-kill-hs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_transfer_ends_grpc_tunnel_over_data_packets_and_a_new_agent_serves() {
    agent_killed_mid_transfer(Frontend::GrpcUds, DataPath::Packets, "f-kill-gp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_transfer_ends_grpc_tunnel_over_tls_relay_and_a_new_agent_serves() {
    agent_killed_mid_transfer(Frontend::GrpcUds, DataPath::TlsRelay, "f-kill-gt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_transfer_ends_grpc_tunnel_over_spliced_relay_and_a_new_agent_serves() {
    agent_killed_mid_transfer(Frontend::GrpcUds, DataPath::SplicedRelay, "f-kill-gs").await;
}

// ---------------------------------------------------------------------------
// 5. Server restarted.
// ---------------------------------------------------------------------------

async fn server_restarted(frontend: Frontend, tag: &str) {
    let echo = Backend::echo();
    let mut t = Topology::builder(frontend)
        .tag(tag)
        .agents(2)
        .agent_args(["--sync-interval=200ms", "--sync-interval-cap=1s"])
        .start()
        .await;
    echo_through(&t, &echo.target(), 5, 64 * 1024).await.expect("a dial before the restart");
    let in_flight = Paced::start(open(&t, &echo.target()).await.expect("dial"), 6);
    in_flight.wait_rounds(3).await;

    restart_server(&mut t, "server-restarted");
    let restarted = Instant::now();
    // The transfer through the killed server ends with an error; it does not hang.
    let ended = tokio::time::timeout(STEP, in_flight.task).await.expect("the cut transfer ends in time");
    match ended.expect("transfer task") {
        Err(e) => eprintln!("transfer through the killed server: {e}"),
        Ok(n) => panic!("a transfer through the killed server completed ({n} bytes)"),
    }
    t.server.wait_status("/healthz", 200, STEP).await.expect("the restarted server comes up on the same ports");
    for i in 0..2 {
        t.agents[i].wait_ready(STEP).await.expect("agent reconnects");
    }
    wait_metric(&t.server, SERVER_READY_AGENTS, 2.0, STEP).await.expect("both agents reconnect");
    let reconnected = restarted.elapsed();
    for i in 0..4 {
        echo_through(&t, &echo.target(), 50 + i, 64 * 1024).await.expect("a dial after the restart");
    }
    let served = restarted.elapsed();
    eprintln!("agents back after {reconnected:?}, dials served after {served:?}");
    assert!(served < Duration::from_secs(6), "new dials succeeded only {served:?} after the restart");
    assert_no_leaks(&mut t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarted_on_the_same_ports_agents_reconnect_and_http_connect_tls_dials_succeed() {
    server_restarted(Frontend::HttpConnectTls, "f-srvrestart-h").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarted_on_the_same_socket_agents_reconnect_and_grpc_dials_succeed() {
    server_restarted(Frontend::GrpcUds, "f-srvrestart-g").await;
}

// ---------------------------------------------------------------------------
// 6. Bad input closes only its own connection.
// ---------------------------------------------------------------------------

const GARBAGE: &[u8] = b"\x00\xff\xfe GARBAGE \x01\x02\x03 not a protocol at all\r\n\r\n\x7f\x80";

/// A 20 KiB request header, over the default --http-connect-max-header-bytes (16384).
fn oversized_header() -> Vec<u8> {
    let mut h = b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\nX-Padding: ".to_vec();
    h.resize(20 * 1024, b'a');
    h.extend_from_slice(b"\r\n\r\n");
    h
}

/// Bad HTTP-CONNECT input on `connect()`-ed streams: garbage (400), an oversized header
/// (431), a header that never completes (408 after --http-connect-header-timeout=1s).
async fn bad_http_connect_input<S, F, Fut>(connect: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let ending = feed(connect().await, GARBAGE, STEP).await.expect("garbage gets an answer and a close");
    assert_eq!(ending.status(), Some(400), "answer to garbage: {:?}", ending.text());

    let ending = feed(connect().await, &oversized_header(), STEP).await.expect("oversized header is closed");
    assert_eq!(ending.status(), Some(431), "answer to an oversized header: {:?} ({:?})", ending.text(), ending.error);

    let started = Instant::now();
    let ending =
        feed(connect().await, b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n", STEP).await.expect("a stalled header is closed");
    let took = started.elapsed();
    assert_eq!(ending.status(), Some(408), "answer to a stalled header: {:?}", ending.text());
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "408 after {took:?}, expected ~1s");
    let ending = feed(connect().await, b"", STEP).await.expect("a silent client is closed");
    assert_eq!(ending.status(), Some(408), "answer to a client that sends nothing: {:?}", ending.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_mtls_http_connect_frontend_closes_only_its_own_connection() {
    let echo = Backend::echo();
    let mut t = Topology::builder(Frontend::HttpConnectTls)
        .tag("f-bad-tls")
        .server_args(["--http-connect-header-timeout=1s"])
        .start()
        .await;
    let addr = t.frontend_addr.expect("TCP frontend");
    let healthy = Paced::start(t.http_connect(&echo.target()).await.expect("healthy CONNECT"), 61);
    healthy.wait_rounds(3).await;

    // Not TLS at all.
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let ending = feed(tcp, GARBAGE, STEP).await.expect("raw garbage on the TLS port is closed");
    eprintln!("raw garbage on the TLS port: {ending:?}");

    // TLS with a good certificate, then bad HTTP.
    let pki = &t.pki;
    bad_http_connect_input(move || async move {
        tls_connect(addr, pki, Some(&pki.frontend), &[b"http/1.1"]).await.expect("TLS handshake")
    })
    .await;

    // A client certificate from an unrelated CA, and none at all: the handshake fails.
    for (who, identity) in [("rogue CA", Some(&pki.rogue_client)), ("no certificate", None)] {
        let outcome = clients::http_connect_tls_as(addr, pki, identity, &echo.target()).await;
        match outcome {
            Err(ConnectError::Io(e)) => eprintln!("{who}: refused at the TLS layer: {e}"),
            Err(e) => panic!("{who}: expected a TLS failure, got {e}"),
            Ok(_) => panic!("{who}: the mTLS frontend let the client in"),
        }
    }

    assert!(healthy.is_running(), "the healthy transfer is still running");
    let moved = healthy.finish().await.unwrap_or_else(|e| {
        t.print_logs();
        panic!("healthy transfer: {e}")
    });
    eprintln!("healthy transfer moved {moved} bytes each way");
    echo_through(&t, &echo.target(), 62, 128 * 1024).await.expect("a new CONNECT after the bad input");
    assert!(t.server.is_running() && t.agents[0].is_running(), "server and agent survive");
    assert_no_leaks(&mut t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_http_connect_unix_socket_closes_only_its_own_connection() {
    let echo = Backend::echo();
    let mut t = Topology::builder(Frontend::HttpConnectUds)
        .tag("f-bad-uds")
        .server_args(["--http-connect-header-timeout=1s"])
        .start()
        .await;
    let path = t.uds.clone().expect("unix socket frontend");
    let healthy = Paced::start(t.http_connect(&echo.target()).await.expect("healthy CONNECT"), 71);
    healthy.wait_rounds(3).await;

    let socket = &path;
    bad_http_connect_input(move || async move { UnixStream::connect(socket).await.expect("connect to the socket") })
        .await;
    // A whole valid request followed by garbage in the tunnel position, to a closed port:
    // the 502 still arrives and only this connection closes.
    let mut request = connect_request(&format!("127.0.0.1:{}", closed_port())).into_bytes();
    request.extend_from_slice(GARBAGE);
    let ending = feed(UnixStream::connect(&path).await.expect("connect"), &request, STEP).await.expect("closed");
    assert_eq!(ending.status(), Some(502), "answer: {:?}", ending.text());

    assert!(healthy.is_running(), "the healthy transfer is still running");
    let moved = healthy.finish().await.unwrap_or_else(|e| {
        t.print_logs();
        panic!("healthy transfer: {e}")
    });
    eprintln!("healthy transfer moved {moved} bytes each way");
    echo_through(&t, &echo.target(), 72, 128 * 1024).await.expect("a new CONNECT after the bad input");
    assert_no_leaks(&mut t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_agent_port_and_an_agent_from_an_unrelated_ca_leave_the_good_agent_serving() {
    let echo = Backend::echo();
    // Agents authenticate with client certificates: the server has --cluster-ca-cert.
    let mut t = Topology::builder(Frontend::HttpConnectUds).tag("f-bad-agent").agent_mtls(true).start().await;
    let healthy = Paced::start(t.http_connect(&echo.target()).await.expect("healthy CONNECT"), 81);
    healthy.wait_rounds(3).await;

    let agent_port = SocketAddr::from((Ipv4Addr::LOCALHOST, t.agent_port));
    for (what, input) in [
        ("garbage", GARBAGE.to_vec()),
        ("a bad relay preamble", b"KDRLxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx".to_vec()),
        ("a TLS record header then junk", b"\x16\x03\x01\x00\x10junkjunkjunkjunk".to_vec()),
    ] {
        let tcp = TcpStream::connect(agent_port).await.expect("connect to the agent port");
        let ending = feed(tcp, &input, STEP).await.unwrap_or_else(|e| panic!("{what} on the agent port: {e}"));
        eprintln!("{what} on the agent port: {ending:?}");
    }

    // An agent whose certificate comes from an unrelated CA never becomes ready.
    let (cert, key) = t.pki.rogue_client.paths();
    t.add_agent(&[&format!("--agent-cert={cert}"), &format!("--agent-key={key}")]);
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        let ready = t.agents[1].get("/readyz").await.map(|r| r.status).unwrap_or(0);
        assert_ne!(ready, 200, "the agent with a rogue certificate became ready");
        let counted = sample(&t.server, SERVER_READY_AGENTS).await;
        assert_eq!(counted, Some(1.0), "the server counts only the good agent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t.agents[1].is_running(), "the rejected agent keeps retrying rather than crashing");
    t.agents[1].kill();

    assert!(healthy.is_running(), "the healthy transfer is still running");
    let moved = healthy.finish().await.unwrap_or_else(|e| {
        t.print_logs();
        panic!("healthy transfer: {e}")
    });
    eprintln!("healthy transfer moved {moved} bytes each way");
    echo_through(&t, &echo.target(), 82, 128 * 1024).await.expect("a new CONNECT through the good agent");
    assert_no_leaks(&mut t).await;
}

/// Receives the next packet on a raw Proxy stream within [`STEP`].
async fn next(inbound: &mut tonic::Streaming<Packet>) -> PacketKind {
    loop {
        let packet = tokio::time::timeout(STEP, inbound.message())
            .await
            .expect("a packet in time")
            .expect("stream healthy")
            .expect("stream not ended");
        match PacketKind::of(packet).expect("valid packet") {
            PacketKind::WindowUpdate { .. } => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_data_for_an_unknown_connect_id_gets_close_rsp_and_the_stream_stays_usable() {
    let echo = Backend::echo();
    let mut t = Topology::builder(Frontend::GrpcUds).tag("f-bad-grpc").start().await;
    let healthy = Paced::start(open(&t, &echo.target()).await.expect("healthy dial"), 91);
    healthy.wait_rounds(3).await;

    let mut client = t.grpc().await;
    let (outbound, rx) = mpsc::channel::<Packet>(16);
    const UNKNOWN: i64 = 987_654_321;
    outbound.send(data_packet(UNKNOWN, Bytes::from_static(b"to nowhere"))).await.expect("queue");
    let mut inbound = client.proxy(ReceiverStream::new(rx)).await.expect("Proxy stream").into_inner();
    match next(&mut inbound).await {
        PacketKind::CloseResponse { connect_id, error } => {
            assert_eq!(connect_id, UNKNOWN);
            assert!(error.is_some_and(|e| !e.is_empty()), "CLOSE_RSP for an unknown connectID carries an error");
        }
        other => panic!("expected CLOSE_RSP for DATA to an unknown connectID, got {other:?}"),
    }
    outbound.send(close_request_packet(UNKNOWN + 1)).await.expect("queue");
    match next(&mut inbound).await {
        PacketKind::CloseResponse { connect_id, error } => {
            assert_eq!(connect_id, UNKNOWN + 1);
            assert!(error.is_some(), "CLOSE_RSP for CLOSE_REQ of an unknown connectID carries an error");
        }
        other => panic!("expected CLOSE_RSP for CLOSE_REQ to an unknown connectID, got {other:?}"),
    }

    // The same stream still dials, moves bytes and closes.
    let random = clients::dial_random();
    outbound.send(dial_request_packet(&echo.target(), random)).await.expect("queue");
    let connect_id = match next(&mut inbound).await {
        PacketKind::DialResponse { random: r, connect_id, error: None, .. } if r == random => connect_id,
        other => panic!("expected a successful DIAL_RSP on the same stream, got {other:?}"),
    };
    let sent = pattern(92, 100_000);
    for chunk in sent.chunks(32 * 1024) {
        outbound.send(data_packet(connect_id, Bytes::copy_from_slice(chunk))).await.expect("queue");
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        match next(&mut inbound).await {
            PacketKind::Data { connect_id: c, data, .. } if c == connect_id => got.extend_from_slice(&data),
            other => panic!("expected echoed DATA, got {other:?}"),
        }
    }
    assert!(got == sent, "echo on the reused stream is byte-exact");
    outbound.send(close_request_packet(connect_id)).await.expect("queue");
    match next(&mut inbound).await {
        PacketKind::CloseResponse { connect_id: c, error } => {
            assert_eq!(c, connect_id);
            assert_eq!(error, None, "clean CLOSE_RSP");
        }
        other => panic!("expected CLOSE_RSP, got {other:?}"),
    }
    drop(outbound);

    assert!(healthy.is_running(), "the healthy transfer is still running");
    let moved = healthy.finish().await.unwrap_or_else(|e| {
        t.print_logs();
        panic!("healthy transfer: {e}")
    });
    eprintln!("healthy transfer moved {moved} bytes each way");
    assert_no_leaks(&mut t).await;
}

/// Open file descriptors of a process.
fn fd_count(process: &Konduit) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", process.pid())).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_grpc_unix_socket_is_closed_and_leaks_nothing() {
    let echo = Backend::echo();
    let t = Topology::builder(Frontend::GrpcUds).tag("f-bad-grpcuds").start().await;
    let path = t.uds.clone().expect("unix socket frontend");
    let healthy = Paced::start(open(&t, &echo.target()).await.expect("healthy dial"), 95);
    healthy.wait_rounds(3).await;
    let fds_before = fd_count(&t.server);

    // Garbage instead of the HTTP/2 client preface: the server must close (stock closes
    // at once), and the connection's descriptor must not outlive it.
    let outcome = feed(UnixStream::connect(&path).await.expect("connect"), GARBAGE, STEP).await;
    const MORE: usize = 10;
    for _ in 0..MORE {
        let mut s = UnixStream::connect(&path).await.expect("connect");
        let _ = s.write_all(GARBAGE).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fds = eventually(STEP, || async {
        let now = fd_count(&t.server);
        if now <= fds_before { Ok(()) } else { Err(format!("server holds {now} fds, {fds_before} before")) }
    })
    .await;

    assert!(healthy.is_running(), "the healthy transfer is still running");
    let moved = healthy.finish().await.unwrap_or_else(|e| {
        t.print_logs();
        panic!("healthy transfer: {e}")
    });
    eprintln!("healthy transfer moved {moved} bytes each way");
    echo_through(&t, &echo.target(), 96, 64 * 1024).await.expect("a new dial after the garbage");
    let mut problems = Vec::new();
    match outcome {
        Ok(ending) => eprintln!("garbage on the gRPC socket: {ending:?}"),
        Err(e) => problems.push(format!("garbage instead of the HTTP/2 preface: {e}")),
    }
    if let Err(e) = fds {
        problems.push(format!("after {} garbage connections, all closed by their clients: {e}", MORE + 1));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---------------------------------------------------------------------------
// 7. Drain.
// ---------------------------------------------------------------------------

/// agent-0 carries a paced echo transfer when it gets SIGTERM: it sends DRAIN, the server
/// sends new dials to agent-1, the transfer completes byte-exact, agent-0 refuses dials
/// when it is the only agent left, and it exits once its transfer is done, within grace.
async fn sigterm_drains(path: DataPath, tag: &str) {
    const GRACE: Duration = Duration::from_secs(10);
    let echo = Backend::echo();
    let mut flags = path.agent_flags(&[echo.addr.port()]);
    flags.push(format!("--graceful-shutdown-timeout={}s", GRACE.as_secs()));
    let mut t = Topology::builder(Frontend::HttpConnectUds).tag(tag).agent_args(flags).start().await;
    // With one agent, the in-flight transfer is certainly agent-0's.
    let in_flight = Paced::start(t.http_connect(&echo.target()).await.expect("CONNECT"), 101);
    in_flight.wait_rounds(3).await;
    t.add_agent(&[]);
    t.wait_agents(2, STEP).await.expect("second agent ready");
    wait_metric(&t.server, SERVER_READY_AGENTS, 2.0, STEP).await.expect("server counts both agents");
    let dials_0 = sample(&t.agents[0], AGENT_DIALS).await.expect("agent-0 dial count");
    let dials_1 = sample(&t.agents[1], AGENT_DIALS).await.expect("agent-1 dial count");
    assert_eq!(dials_0, 1.0, "agent-0 carries the in-flight transfer");

    t.agents[0].sigterm();
    let terminated = Instant::now();
    // The server has the DRAIN once it logs it; dials from then on avoid agent-0.
    eventually(STEP, || async {
        if t.server.log().contains("agent is draining") { Ok(()) } else { Err("no DRAIN seen".into()) }
    })
    .await
    .expect("the server receives DRAIN");
    const NEW_DIALS: usize = 6;
    for i in 0..NEW_DIALS {
        echo_through(&t, &echo.target(), 110 + i as u64, 64 * 1024).await.expect("a new dial during the drain");
    }
    let after_0 = sample(&t.agents[0], AGENT_DIALS).await.expect("agent-0 dial count");
    let after_1 = sample(&t.agents[1], AGENT_DIALS).await.expect("agent-1 dial count");
    assert_eq!(after_0, dials_0, "the draining agent took no new dial");
    assert_eq!(after_1 - dials_1, NEW_DIALS as f64, "agent-1 served every new dial");
    let agent_1 = &t.agents[1];
    eventually(STEP, || async {
        let text = agent_1.metrics().await;
        match metric(&text, "konduit_dataplane_connections_total", &[("engine", path.engine())]) {
            Some(n) if n == NEW_DIALS as f64 => Ok(()),
            other => Err(format!("{other:?} connections with the {} engine", path.engine())),
        }
    })
    .await
    .expect("the new dials used the expected data path");

    // With agent-1 gone, the server can only ask the draining agent, which refuses.
    t.agents[1].kill();
    wait_metric(&t.server, SERVER_READY_AGENTS, 1.0, STEP).await.expect("server drops agent-1");
    match t.http_connect(&echo.target()).await {
        Err(ConnectError::Refused { status, body, .. }) => {
            assert!((500..600).contains(&status), "refusal status {status}");
            assert!(body.contains("draining"), "refusal body {body:?} says the agent is draining");
        }
        Err(e) => panic!("expected the draining agent to refuse the dial, got {e}"),
        Ok(_) => panic!("the draining agent accepted a new dial"),
    }
    assert_eq!(sample(&t.agents[0], AGENT_DIALS).await, Some(dials_0), "the draining agent dialled nothing");

    // The transfer keeps going well after SIGTERM, and the agent waits for it.
    while terminated.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(t.agents[0].is_running(), "agent-0 waits for its in-flight transfer");
    assert!(in_flight.is_running(), "the in-flight transfer is still running");
    let moved = in_flight.finish().await.unwrap_or_else(|e| {
        t.print_logs();
        panic!("in-flight transfer during the drain: {e}")
    });
    eprintln!("in-flight transfer moved {moved} bytes each way across the drain");
    let status = t.agents[0].wait_exit(GRACE).await.unwrap_or_else(|| {
        t.print_logs();
        panic!("agent-0 still running {GRACE:?} after its last connection ended")
    });
    let took = terminated.elapsed();
    eprintln!("agent-0 exited {took:?} after SIGTERM: {status}");
    assert!(took < GRACE, "agent-0 exited {took:?} after SIGTERM, beyond its {GRACE:?} grace");
    assert!(status.success(), "agent-0 exits cleanly after the drain: {status}");

    wait_metric(&t.server, SERVER_READY_AGENTS, 0.0, STEP).await.expect("server drops the drained agent");
    t.add_agent(&[]);
    wait_agent_and_server(&mut t, 2, 1, STEP).await.expect("a new agent");
    echo_through(&t, &echo.target(), 120, 64 * 1024).await.expect("dials work again with a new agent");
    assert_no_leaks(&mut t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_agent_tls_relay_transfer_completes_and_new_dials_go_to_the_other_agent() {
    sigterm_drains(DataPath::TlsRelay, "f-drain-t").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_agent_spliced_relay_transfer_completes_and_new_dials_go_to_the_other_agent() {
    sigterm_drains(DataPath::SplicedRelay, "f-drain-s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_agent_data_packet_transfer_completes_and_new_dials_go_to_the_other_agent() {
    sigterm_drains(DataPath::Packets, "f-drain-p").await;
}
