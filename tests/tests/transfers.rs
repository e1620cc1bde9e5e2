//! Transfers through konduit, checked byte for byte: every size both ways on every
//! frontend and every data path (DATA packets, TLS relay, plaintext relay spliced by
//! the kernel), 200 concurrent connections through one agent, per-connection flow
//! control on a shared agent stream (a slow reader or a slow backend stalls only its
//! own connection), and half-close in both directions on HTTP-CONNECT. Backpressure
//! through the kernel splice is in `backpressure.rs`.
//!
//! Each test starts its own server and agent on loopback (see `konduit_e2e::topology`).
//! Backends that need behaviour the harness does not offer (a length-prefixed sink for
//! gRPC, which cannot half-close; a source that reports progress; a sink that does not
//! read until told; backends that report the client's EOF) live at the end of this file.

use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use konduit_e2e::backends::{Backend, FnBackend, Kind};
use konduit_e2e::clients::{self, fetch_from_source, read_pattern, write_pattern};
use konduit_e2e::data::{PatternCheck, SOURCE_SEED, hex, pattern_fill, pattern_sha256};
use konduit_e2e::probe::metric;
use konduit_e2e::{Frontend, GrpcTunnel, Topology};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The big transfer; run for every frontend on one path and every path on one frontend.
const BIG: u64 = 64 * MIB;
/// Sizes every (path, frontend) pair moves both ways.
const SMALL_SIZES: &[u64] = &[0, 1, 64 * KIB];
const ALL_SIZES: &[u64] = &[0, 1, 64 * KIB, BIG];

/// Generous on purpose: a loaded 2-core machine runs several debug konduits at once.
fn transfer_deadline(len: u64) -> Duration {
    Duration::from_secs(5) + Duration::from_millis(len / MIB * 150)
}

const STEP: Duration = Duration::from_secs(5);

const AGENT_DATA_PACKETS: &str = "konnectivity_network_proxy_agent_stream_packets_total";
const CONNECTIONS: &str = "konduit_dataplane_connections_total";
const FALLBACKS: &str = "konduit_dataplane_fallbacks_total";

// ---------------------------------------------------------------------------------------
// Data paths
// ---------------------------------------------------------------------------------------

/// How the agent carries a connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataPath {
    /// `--relay=false`: stock DATA packets on the agent's gRPC stream.
    Packets,
    /// Default flags: a TLS relay socket per connection (the backend port is not plaintext).
    TlsRelay,
    /// `--relay-plaintext-ports=<backend ports> --dataplane=sockmap`: a plaintext relay
    /// socket spliced to the backend socket by the eBPF program.
    Sockmap,
}

impl DataPath {
    fn agent_args(self, backend_ports: &[u16]) -> Vec<String> {
        match self {
            DataPath::Packets => vec!["--relay=false".into()],
            DataPath::TlsRelay => vec![],
            DataPath::Sockmap => {
                let ports: Vec<String> = backend_ports.iter().map(u16::to_string).collect();
                vec![format!("--relay-plaintext-ports={}", ports.join(",")), "--dataplane=sockmap".into()]
            }
        }
    }

    fn tag(self) -> &'static str {
        match self {
            DataPath::Packets => "pkt",
            DataPath::TlsRelay => "tls",
            DataPath::Sockmap => "skm",
        }
    }
}

/// The agent's counters that tell the data paths apart.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct PathCounters {
    /// DATA packets the agent received from the server.
    data_from_server: f64,
    /// Connections finished by the userspace engine (DATA packets or a tokio copy).
    userspace: f64,
    /// Connections finished by the kernel engine.
    sockmap: f64,
    /// Connections that used a TLS relay socket.
    tls_relay: f64,
}

async fn path_counters(topology: &Topology) -> PathCounters {
    let text = topology.agents[0].metrics().await;
    let get = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels).unwrap_or(0.0);
    PathCounters {
        data_from_server: get(AGENT_DATA_PACKETS, &[("segment", "from_server"), ("packet_type", "DATA")]),
        userspace: get(CONNECTIONS, &[("engine", "userspace")]),
        sockmap: get(CONNECTIONS, &[("engine", "sockmap")]),
        tls_relay: get(FALLBACKS, &[("reason", "tls_relay")]),
    }
}

/// Waits until the agent has finished `connections` more connections than `before` (the
/// engines count a connection when it ends), then checks they took `path`.
async fn assert_path_taken(topology: &Topology, path: DataPath, before: PathCounters, connections: u64) {
    let n = connections as f64;
    let deadline = Instant::now() + STEP;
    let after = loop {
        let now = path_counters(topology).await;
        let finished = (now.userspace - before.userspace) + (now.sockmap - before.sockmap);
        if finished >= n || Instant::now() >= deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = topology.agents[0].metrics().await;
    let dataplane: Vec<&str> = text.lines().filter(|l| l.starts_with("konduit_dataplane_")).collect();
    let context = format!("{path:?}: before {before:?}, after {after:?}; agent metrics:\n{}", dataplane.join("\n"));
    match path {
        DataPath::Packets => {
            assert_eq!(after.userspace - before.userspace, n, "every connection in userspace; {context}");
            assert!(after.data_from_server > before.data_from_server, "uploads arrive as DATA packets; {context}");
            assert_eq!(after.tls_relay, before.tls_relay, "no relay socket with --relay=false; {context}");
        }
        DataPath::TlsRelay => {
            assert_eq!(after.tls_relay - before.tls_relay, n, "every connection on a TLS relay; {context}");
            assert_eq!(after.data_from_server, before.data_from_server, "no DATA packets on a relay; {context}");
        }
        DataPath::Sockmap => {
            assert_eq!(after.sockmap - before.sockmap, n, "every connection spliced by sockmap; {context}");
            assert_eq!(after.data_from_server, before.data_from_server, "no DATA packets on a relay; {context}");
            assert_eq!(after.tls_relay, before.tls_relay, "plaintext relay, not TLS; {context}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Transfers
// ---------------------------------------------------------------------------------------

/// The destinations of the byte-exact transfer tests.
struct TransferBackends {
    /// Reads to EOF, answers the SHA-256 (HTTP-CONNECT uploads end with a half-close).
    sink: Backend,
    /// Reads a length, then that many bytes, answers the SHA-256 (gRPC cannot half-close).
    sized_sink: FnBackend,
    /// Sends the requested number of pattern bytes.
    source: Backend,
}

impl TransferBackends {
    fn start() -> Self {
        TransferBackends { sink: Backend::sha256_sink(), sized_sink: sized_sink(), source: Backend::source() }
    }

    fn ports(&self) -> Vec<u16> {
        vec![self.sink.addr.port(), self.sized_sink.addr.port(), self.source.addr.port()]
    }
}

/// Uploads `len` pattern bytes of `seed`; the backend's SHA-256 of what it got must match.
async fn upload(topology: &Topology, backends: &TransferBackends, seed: u64, len: u64) -> Result<(), String> {
    let expected = pattern_sha256(seed, len);
    let digest = if topology.frontend.is_grpc() {
        let mut client = topology.grpc().await;
        let mut tunnel = GrpcTunnel::dial(&mut client, &backends.sized_sink.target())
            .await
            .map_err(|e| format!("dial sized sink: {e}"))?;
        tunnel.write(&len.to_be_bytes()).await.map_err(|e| format!("write length: {e}"))?;
        grpc_write_pattern(&tunnel, seed, len, None).await.map_err(|e| format!("write: {e}"))?;
        let digest = tunnel.read_exact(32).await.map_err(|e| format!("read digest: {e}"))?;
        let rest = tunnel.read_to_end().await.map_err(|e| format!("read after digest: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("{} bytes after the digest", rest.len()));
        }
        if tunnel.close_response() != Some(None) {
            return Err(format!("the sink's close ends as {:?}, not a clean CLOSE_RSP", tunnel.close_response()));
        }
        digest
    } else {
        let mut stream =
            topology.http_connect(&backends.sink.target()).await.map_err(|e| format!("CONNECT to sink: {e}"))?;
        write_pattern(&mut stream, seed, len).await.map_err(|e| format!("write: {e}"))?;
        stream.shutdown().await.map_err(|e| format!("shutdown(WR): {e}"))?;
        let mut digest = Vec::new();
        stream.read_to_end(&mut digest).await.map_err(|e| format!("read digest: {e}"))?;
        digest
    };
    if digest != expected {
        return Err(format!("sink hashed {}, sent bytes hash {}", hex(&digest), hex(&expected)));
    }
    Ok(())
}

/// Downloads `len` bytes from the source backend and checks every byte and the length.
async fn download(topology: &Topology, backends: &TransferBackends, len: u64) -> Result<(), String> {
    if topology.frontend.is_grpc() {
        let mut client = topology.grpc().await;
        let mut tunnel =
            GrpcTunnel::dial(&mut client, &backends.source.target()).await.map_err(|e| format!("dial source: {e}"))?;
        tunnel.write(&len.to_be_bytes()).await.map_err(|e| format!("write length: {e}"))?;
        grpc_read_pattern(&mut tunnel, SOURCE_SEED, len).await?;
        if tunnel.close_response() != Some(None) {
            return Err(format!("the source's close ends as {:?}, not a clean CLOSE_RSP", tunnel.close_response()));
        }
        Ok(())
    } else {
        let mut stream =
            topology.http_connect(&backends.source.target()).await.map_err(|e| format!("CONNECT to source: {e}"))?;
        fetch_from_source(&mut stream, len).await.map_err(|e| format!("download: {e}"))
    }
}

/// Moves every size in `sizes` up and down on `path` through `frontend`, each on its own
/// connection, then checks the agent counted them all on `path`.
async fn transfers_are_byte_exact(path: DataPath, frontend: Frontend, sizes: &[u64]) {
    let backends = TransferBackends::start();
    let topology = Topology::builder(frontend)
        .tag(&format!("xfer-{}", path.tag()))
        .agent_args(path.agent_args(&backends.ports()))
        .start()
        .await;
    let before = path_counters(&topology).await;
    for (i, &len) in sizes.iter().enumerate() {
        let seed = 0x7570_0000 + i as u64;
        let started = Instant::now();
        tokio::time::timeout(transfer_deadline(len), upload(&topology, &backends, seed, len))
            .await
            .unwrap_or_else(|_| Err(format!("not done within {:?}", transfer_deadline(len))))
            .unwrap_or_else(|e| panic!("{path:?} {frontend:?}: upload of {len} bytes: {e}"));
        let up = started.elapsed();
        let started = Instant::now();
        tokio::time::timeout(transfer_deadline(len), download(&topology, &backends, len))
            .await
            .unwrap_or_else(|_| Err(format!("not done within {:?}", transfer_deadline(len))))
            .unwrap_or_else(|e| panic!("{path:?} {frontend:?}: download of {len} bytes: {e}"));
        eprintln!("{path:?} {frontend:?}: {len} bytes up in {up:?}, down in {:?}", started.elapsed());
    }
    assert_path_taken(&topology, path, before, 2 * sizes.len() as u64).await;
}

macro_rules! transfer_tests {
    ($($name:ident: $path:expr, $frontend:expr, $sizes:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            transfers_are_byte_exact($path, $frontend, $sizes).await;
        }
    )*};
}

transfer_tests! {
    // DATA packets (--relay=false).
    data_packets_over_grpc_uds_are_byte_exact_both_ways: DataPath::Packets, Frontend::GrpcUds, SMALL_SIZES;
    data_packets_over_grpc_tls_are_byte_exact_both_ways: DataPath::Packets, Frontend::GrpcTls, SMALL_SIZES;
    data_packets_over_http_connect_uds_are_byte_exact_both_ways_up_to_64_mib:
        DataPath::Packets, Frontend::HttpConnectUds, ALL_SIZES;
    data_packets_over_http_connect_tls_are_byte_exact_both_ways:
        DataPath::Packets, Frontend::HttpConnectTls, SMALL_SIZES;
    // TLS relay (default flags): the 64 MiB case on every frontend.
    tls_relay_over_grpc_uds_is_byte_exact_both_ways_up_to_64_mib: DataPath::TlsRelay, Frontend::GrpcUds, ALL_SIZES;
    tls_relay_over_grpc_tls_is_byte_exact_both_ways_up_to_64_mib: DataPath::TlsRelay, Frontend::GrpcTls, ALL_SIZES;
    tls_relay_over_http_connect_uds_is_byte_exact_both_ways_up_to_64_mib:
        DataPath::TlsRelay, Frontend::HttpConnectUds, ALL_SIZES;
    tls_relay_over_http_connect_tls_is_byte_exact_both_ways_up_to_64_mib:
        DataPath::TlsRelay, Frontend::HttpConnectTls, ALL_SIZES;
    // Plaintext relay spliced in the kernel (--dataplane=sockmap).
    sockmap_splice_over_grpc_uds_is_byte_exact_both_ways: DataPath::Sockmap, Frontend::GrpcUds, SMALL_SIZES;
    sockmap_splice_over_grpc_tls_is_byte_exact_both_ways: DataPath::Sockmap, Frontend::GrpcTls, SMALL_SIZES;
    sockmap_splice_over_http_connect_uds_is_byte_exact_both_ways_up_to_64_mib:
        DataPath::Sockmap, Frontend::HttpConnectUds, ALL_SIZES;
    sockmap_splice_over_http_connect_tls_is_byte_exact_both_ways:
        DataPath::Sockmap, Frontend::HttpConnectTls, SMALL_SIZES;
}

// ---------------------------------------------------------------------------------------
// Many connections
// ---------------------------------------------------------------------------------------

const CONCURRENT: usize = 200;
const CONCURRENT_BYTES: u64 = 4 * KIB + 123;

/// Opens `CONCURRENT` tunnels to an echo backend through one agent, holds them all open
/// at once (the agent has that many backend connections), then moves a few KiB of a
/// different pattern through each, both ways, and checks every connection got exactly
/// its own bytes back.
async fn concurrent_connections_are_byte_exact(frontend: Frontend, path: DataPath) {
    // std's listeners queue 128 connections; 200 simultaneous dials overflow that when the
    // backend thread is slow to accept (loaded machine), and dropped SYNs outlast the 1 s
    // dial timeout.
    let echo = Backend::start_on(listener_with_backlog(4 * CONCURRENT as u32).await, Kind::Echo);
    let topology = Topology::builder(frontend)
        .tag(&format!("many-{}", path.tag()))
        .agent_args(path.agent_args(&[echo.addr.port()]))
        .start()
        .await;
    let uds = topology.uds.clone().expect("a unix-socket frontend");
    let target = echo.target();
    let all_open = Arc::new(tokio::sync::Barrier::new(CONCURRENT + 1));
    let open_failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONCURRENT {
        let (uds, target, all_open, open_failures) =
            (uds.clone(), target.clone(), all_open.clone(), open_failures.clone());
        let seed = 0x6d61_6e79_0000 + i as u64;
        tasks.spawn(async move {
            let result = if frontend.is_grpc() {
                // One client per tunnel, like kube-apiserver's single-use gRPC tunnels.
                let opened = async {
                    let mut client = clients::grpc_uds(&uds).await.map_err(|e| format!("gRPC connect: {e}"))?;
                    let tunnel = GrpcTunnel::dial(&mut client, &target).await.map_err(|e| format!("dial: {e}"))?;
                    Ok::<_, String>((client, tunnel))
                };
                let opened = opened.await;
                if let Err(e) = &opened {
                    open_failures.lock().expect("lock").push(format!("connection {i}: {e}"));
                }
                all_open.wait().await; // all tunnels open
                all_open.wait().await; // go
                match opened {
                    Ok((_client, mut tunnel)) => grpc_echo_once(&mut tunnel, seed, CONCURRENT_BYTES).await,
                    Err(e) => Err(e),
                }
            } else {
                let opened = clients::http_connect_uds(&uds, &target).await.map_err(|e| format!("CONNECT: {e}"));
                if let Err(e) = &opened {
                    open_failures.lock().expect("lock").push(format!("connection {i}: {e}"));
                }
                all_open.wait().await;
                all_open.wait().await;
                match opened {
                    Ok(mut stream) => stream_echo_once(&mut stream, seed, CONCURRENT_BYTES).await,
                    Err(e) => Err(e),
                }
            };
            (i, result)
        });
    }
    let open = tokio::time::timeout(Duration::from_secs(20), all_open.wait()).await;
    assert!(open.is_ok(), "{CONCURRENT} tunnels not all answered within 20 s");
    let failed = open_failures.lock().expect("lock").clone();
    assert!(failed.is_empty(), "{} of {CONCURRENT} tunnels were not opened:\n{}", failed.len(), failed.join("\n"));
    // Each tunnel was answered only after the agent dialled, so all are open at once now.
    let deadline = Instant::now() + STEP;
    while echo.open() < CONCURRENT as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let agent_open =
        metric(&topology.agents[0].metrics().await, "konnectivity_network_proxy_agent_open_endpoint_connections", &[]);
    assert_eq!(echo.open(), CONCURRENT as u64, "backend connections open at once");
    assert_eq!(agent_open, Some(CONCURRENT as f64), "the agent holds every connection");
    let started = Instant::now();
    all_open.wait().await;
    let mut failures = Vec::new();
    let all_done = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(joined) = tasks.join_next().await {
            let (i, result) = joined.expect("connection task");
            if let Err(e) = result {
                failures.push(format!("connection {i}: {e}"));
            }
        }
    })
    .await;
    assert!(all_done.is_ok(), "not all {CONCURRENT} connections finished within 20 s; failed so far: {failures:?}");
    assert!(failures.is_empty(), "{} of {CONCURRENT} connections failed:\n{}", failures.len(), failures.join("\n"));
    eprintln!("{frontend:?} {path:?}: {CONCURRENT} connections echoed in {:?}", started.elapsed());
    assert_eq!(echo.accepted(), CONCURRENT as u64, "one backend connection per tunnel");
}

/// HTTP-CONNECT: writes, half-closes, and reads the echo to EOF.
async fn stream_echo_once<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    seed: u64,
    len: u64,
) -> Result<(), String> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        write_pattern(&mut writer, seed, len).await?;
        writer.shutdown().await
    };
    let (written, read) = tokio::join!(write, read_pattern(&mut reader, seed, len));
    written.map_err(|e| format!("write: {e}"))?;
    read.map_err(|e| format!("echo: {e}"))
}

/// gRPC: writes, reads the echo back, then closes with CLOSE_REQ.
async fn grpc_echo_once(tunnel: &mut GrpcTunnel, seed: u64, len: u64) -> Result<(), String> {
    grpc_write_pattern(tunnel, seed, len, None).await.map_err(|e| format!("write: {e}"))?;
    let echoed = tunnel.read_exact(len as usize).await.map_err(|e| format!("echo: {e}"))?;
    let mut check = PatternCheck::new(seed);
    check.update(&echoed);
    check.finish(len)?;
    match tunnel.close_req().await {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(format!("CLOSE_RSP carried {e:?}")),
        Err(e) => Err(format!("close: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_http_connect_tunnels_over_tls_relays_are_byte_exact() {
    concurrent_connections_are_byte_exact(Frontend::HttpConnectUds, DataPath::TlsRelay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_grpc_tunnels_on_one_agent_stream_are_byte_exact() {
    concurrent_connections_are_byte_exact(Frontend::GrpcUds, DataPath::Packets).await;
}

// ---------------------------------------------------------------------------------------
// Per-connection flow control on a shared agent stream (stock issues #180/#881)
// ---------------------------------------------------------------------------------------

/// What connection A moves while it is stalled.
const STALLED_BYTES: u64 = 64 * MIB;
/// What connection B moves meanwhile, through the same agent stream.
const BYSTANDER_BYTES: u64 = 16 * MIB;
/// How long A stays stalled at least.
const STALL: Duration = Duration::from_secs(3);
/// B's deadline. B runs only while A is stalled; A stays stalled until B is done (or
/// this passes), so B's success cannot depend on A moving.
const BYSTANDER_DEADLINE: Duration = Duration::from_secs(10);

/// Waits until `progress` stops growing (unchanged for 500 ms) above `floor`, i.e. the
/// stalled connection has filled every buffer between its two ends. Returns the value.
async fn wait_until_stalled(progress: &AtomicU64, floor: u64, total: u64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = progress.load(Ordering::SeqCst);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = progress.load(Ordering::SeqCst);
        assert!(now < total, "{what}: all {total} bytes went through; nothing was held back");
        if now != last {
            (last, since) = (now, Instant::now());
        } else if now > floor && since.elapsed() >= Duration::from_millis(500) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: did not stall above {floor} bytes within 10 s (at {now})");
    }
}

/// Slow reader: A downloads 64 MiB but its client does not read; meanwhile B downloads
/// 16 MiB through the same agent (one gRPC stream, `--relay=false`). B must finish while
/// A is still stalled; then A reads and gets every byte.
async fn slow_reader_stalls_only_its_own_connection(frontend: Frontend) {
    let progress = Arc::new(AtomicU64::new(0));
    let counting_source = counting_source(progress.clone());
    let source = Backend::source();
    let topology =
        Topology::builder(frontend).tag("slow-reader").agent_args(DataPath::Packets.agent_args(&[])).start().await;

    // A: ask for 64 MiB, read nothing.
    let mut a_grpc = None;
    let mut a_stream = None;
    if frontend.is_grpc() {
        let mut client = topology.grpc().await;
        let tunnel = GrpcTunnel::dial(&mut client, &counting_source.target()).await.expect("A: dial");
        tunnel.write(&STALLED_BYTES.to_be_bytes()).await.expect("A: write length");
        a_grpc = Some((client, tunnel));
    } else {
        let mut stream = topology.http_connect(&counting_source.target()).await.expect("A: CONNECT");
        stream.write_all(&STALLED_BYTES.to_be_bytes()).await.expect("A: write length");
        a_stream = Some(stream);
    }
    let stalled_at = wait_until_stalled(&progress, 4 * MIB, STALLED_BYTES, "A (not reading)").await;
    let stall_began = Instant::now();

    // B: a full download through the same agent stream while A is stuck.
    let started = Instant::now();
    let b = async {
        if frontend.is_grpc() {
            let mut client = topology.grpc().await;
            let mut tunnel = GrpcTunnel::dial(&mut client, &source.target()).await.map_err(|e| format!("dial: {e}"))?;
            tunnel.write(&BYSTANDER_BYTES.to_be_bytes()).await.map_err(|e| format!("write length: {e}"))?;
            grpc_read_pattern(&mut tunnel, SOURCE_SEED, BYSTANDER_BYTES).await
        } else {
            let mut stream = topology.http_connect(&source.target()).await.map_err(|e| format!("CONNECT: {e}"))?;
            fetch_from_source(&mut stream, BYSTANDER_BYTES).await.map_err(|e| format!("download: {e}"))
        }
    };
    let b = tokio::time::timeout(BYSTANDER_DEADLINE, b).await;
    let b_took = started.elapsed();
    let a_now = progress.load(Ordering::SeqCst);
    match b {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("B failed while A was stalled: {e}"),
        Err(_) => panic!(
            "B's {BYSTANDER_BYTES}-byte download did not finish within {BYSTANDER_DEADLINE:?} while A (stalled at \
             {stalled_at} bytes) was not read: one slow reader blocks the shared agent stream"
        ),
    }
    // A few more bytes may trickle in (the stall is judged by a quiet period), but A stays
    // held back far from its total while B runs.
    assert!(
        a_now < STALLED_BYTES / 2,
        "A's source sent {a_now} of {STALLED_BYTES} bytes while A's client read nothing (stalled at {stalled_at})"
    );
    eprintln!("{frontend:?}: A stalled at {stalled_at} bytes; B moved {BYSTANDER_BYTES} bytes in {b_took:?}");

    // A: keep it stalled for the full STALL, then read everything.
    tokio::time::sleep(STALL.saturating_sub(stall_began.elapsed())).await;
    let started = Instant::now();
    let a = async {
        if let Some((_client, mut tunnel)) = a_grpc {
            grpc_read_pattern(&mut tunnel, SOURCE_SEED, STALLED_BYTES).await
        } else {
            let mut stream = a_stream.expect("A is a stream");
            read_pattern(&mut stream, SOURCE_SEED, STALLED_BYTES).await.map_err(|e| e.to_string())
        }
    };
    tokio::time::timeout(transfer_deadline(STALLED_BYTES), a)
        .await
        .unwrap_or_else(|_| Err("not done in time".into()))
        .unwrap_or_else(|e| panic!("A after its stall: {e}"));
    eprintln!("{frontend:?}: A read its {STALLED_BYTES} bytes in {:?} after the stall", started.elapsed());
}

/// Slow backend: A's client pushes 64 MiB to a backend that does not read; meanwhile B
/// uploads 16 MiB through the same agent. B must finish while A is still stalled; then
/// A's backend reads and hashes every byte.
async fn slow_backend_stalls_only_its_own_connection(frontend: Frontend) {
    let (release, released) = watch::channel(false);
    let lazy = lazy_sized_sink(released);
    let backends = TransferBackends::start();
    let topology =
        Topology::builder(frontend).tag("slow-backend").agent_args(DataPath::Packets.agent_args(&[])).start().await;

    // A: push 64 MiB (length first) in a task that counts what the client got rid of.
    let progress = Arc::new(AtomicU64::new(0));
    let a_task = if frontend.is_grpc() {
        let mut client = topology.grpc().await;
        let mut tunnel = GrpcTunnel::dial(&mut client, &lazy.target()).await.expect("A: dial");
        let progress = progress.clone();
        tokio::spawn(async move {
            let _client = client;
            tunnel.write(&STALLED_BYTES.to_be_bytes()).await.map_err(|e| format!("write length: {e}"))?;
            grpc_write_pattern(&tunnel, 0xa, STALLED_BYTES, Some(&progress))
                .await
                .map_err(|e| format!("write: {e}"))?;
            let digest = tunnel.read_exact(32).await.map_err(|e| format!("read digest: {e}"))?;
            Ok::<_, String>(digest)
        })
    } else {
        let mut stream = topology.http_connect(&lazy.target()).await.expect("A: CONNECT");
        let progress = progress.clone();
        tokio::spawn(async move {
            stream.write_all(&STALLED_BYTES.to_be_bytes()).await.map_err(|e| format!("write length: {e}"))?;
            let mut buf = vec![0; 64 * KIB as usize];
            let mut sent = 0;
            while sent < STALLED_BYTES {
                pattern_fill(0xa, sent, &mut buf);
                stream.write_all(&buf).await.map_err(|e| format!("write: {e}"))?;
                sent += buf.len() as u64;
                progress.store(sent, Ordering::SeqCst);
            }
            let mut digest = vec![0; 32];
            stream.read_exact(&mut digest).await.map_err(|e| format!("read digest: {e}"))?;
            Ok(digest)
        })
    };
    let stalled_at = wait_until_stalled(&progress, 4 * MIB, STALLED_BYTES, "A (backend not reading)").await;
    let stall_began = Instant::now();

    // B: a full upload through the same agent stream while A is stuck.
    let started = Instant::now();
    let b = tokio::time::timeout(BYSTANDER_DEADLINE, upload(&topology, &backends, 0xb, BYSTANDER_BYTES)).await;
    let b_took = started.elapsed();
    let a_now = progress.load(Ordering::SeqCst);
    match b {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("B failed while A was stalled: {e}"),
        Err(_) => panic!(
            "B's {BYSTANDER_BYTES}-byte upload did not finish within {BYSTANDER_DEADLINE:?} while A's backend (A \
             stalled at {stalled_at} bytes) did not read: one slow backend blocks the shared agent stream"
        ),
    }
    assert!(
        a_now < STALLED_BYTES / 2,
        "A's client got rid of {a_now} of {STALLED_BYTES} bytes while its backend read nothing (stalled at \
         {stalled_at})"
    );
    assert!(!a_task.is_finished(), "A finished while its backend was not reading");
    eprintln!("{frontend:?}: A stalled at {stalled_at} bytes; B moved {BYSTANDER_BYTES} bytes in {b_took:?}");

    tokio::time::sleep(STALL.saturating_sub(stall_began.elapsed())).await;
    let started = Instant::now();
    release.send(true).expect("release the backend");
    let digest = tokio::time::timeout(transfer_deadline(STALLED_BYTES), a_task)
        .await
        .expect("A done in time after its backend started reading")
        .expect("A's task")
        .unwrap_or_else(|e| panic!("A after its stall: {e}"));
    assert_eq!(hex(&digest), hex(&pattern_sha256(0xa, STALLED_BYTES)), "A's backend hashed other bytes");
    eprintln!("{frontend:?}: A's {STALLED_BYTES} bytes arrived in {:?} after the stall", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_slow_reader_does_not_stall_other_connections_of_the_agent() {
    slow_reader_stalls_only_its_own_connection(Frontend::HttpConnectUds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_slow_reader_does_not_stall_other_connections_of_the_agent() {
    slow_reader_stalls_only_its_own_connection(Frontend::GrpcUds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_slow_backend_does_not_stall_other_connections_of_the_agent() {
    slow_backend_stalls_only_its_own_connection(Frontend::HttpConnectUds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_slow_backend_does_not_stall_other_connections_of_the_agent() {
    slow_backend_stalls_only_its_own_connection(Frontend::GrpcUds).await;
}

// ---------------------------------------------------------------------------------------
// Half-close
// ---------------------------------------------------------------------------------------

/// What the client sends before its FIN (big enough to be in flight when the FIN goes).
const BEFORE_FIN: u64 = MIB + 7;
/// What the backend answers after it saw that FIN.
const AFTER_FIN: u64 = MIB + 11;
/// How long the backend waits after the FIN before it answers: the half-closed
/// connection must stay open meanwhile.
const REPLY_DELAY: Duration = Duration::from_millis(500);
const REPLY_SEED: u64 = 0x6661_6c66;

/// The client sends 1 MiB and shuts down its write side; the backend must see exactly
/// those bytes and then EOF; its answer, sent afterwards, must reach the client whole,
/// followed by EOF.
async fn half_close_reaches_the_backend_and_the_reply_comes_back(path: DataPath) {
    let (eofs, mut eof_seen) = mpsc::unbounded_channel();
    let backend = half_close_backend(eofs);
    let topology = Topology::builder(Frontend::HttpConnectUds)
        .tag(&format!("half-{}", path.tag()))
        .agent_args(path.agent_args(&[backend.addr.port()]))
        .start()
        .await;
    let before = path_counters(&topology).await;

    let stream = topology.http_connect(&backend.target()).await.expect("CONNECT");
    let (mut reader, mut writer) = tokio::io::split(stream);
    write_pattern(&mut writer, 0xf1, BEFORE_FIN).await.expect("write");
    writer.shutdown().await.expect("shutdown(WR)");
    let fin_sent = Instant::now();

    let reply = tokio::spawn(async move {
        let mut check = PatternCheck::new(REPLY_SEED);
        let mut first_byte = None;
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            first_byte.get_or_insert_with(Instant::now);
            check.update(&buf[..n]);
        }
        Ok::<_, io::Error>((check, first_byte))
    });

    let seen = tokio::time::timeout(STEP, eof_seen.recv())
        .await
        .unwrap_or_else(|_| panic!("{path:?}: the backend did not see EOF within {STEP:?} of the client's FIN"))
        .expect("backend report");
    let (received, digest, eof_at) = seen.unwrap_or_else(|e| panic!("{path:?}: backend: {e}"));
    assert_eq!(received, BEFORE_FIN, "{path:?}: bytes the backend read before EOF");
    assert_eq!(hex(&digest), hex(&pattern_sha256(0xf1, BEFORE_FIN)), "{path:?}: backend got other bytes");
    eprintln!("{path:?}: the backend saw EOF {:?} after the client's FIN", eof_at.duration_since(fin_sent));

    let (check, first_byte) = tokio::time::timeout(STEP + REPLY_DELAY, reply)
        .await
        .unwrap_or_else(|_| panic!("{path:?}: the reply did not arrive to EOF in time"))
        .expect("reader task")
        .unwrap_or_else(|e| panic!("{path:?}: reading the reply: {e}"));
    check.finish(AFTER_FIN).unwrap_or_else(|e| panic!("{path:?}: reply after the half-close: {e}"));
    let first_byte = first_byte.expect("reply bytes arrived");
    assert!(first_byte >= eof_at + REPLY_DELAY, "{path:?}: reply bytes arrived before the backend sent them");
    assert_path_taken(&topology, path, before, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_half_close_on_data_packets_reaches_the_backend_and_the_reply_follows() {
    half_close_reaches_the_backend_and_the_reply_comes_back(DataPath::Packets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_half_close_on_a_tls_relay_reaches_the_backend_and_the_reply_follows() {
    half_close_reaches_the_backend_and_the_reply_comes_back(DataPath::TlsRelay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_half_close_on_a_sockmap_splice_reaches_the_backend_and_the_reply_follows() {
    half_close_reaches_the_backend_and_the_reply_comes_back(DataPath::Sockmap).await;
}

/// The other way round, over TCP+mTLS: the backend answers the client's first byte with
/// 1 MiB and shuts down its write side; the client reads that to EOF, then (after a
/// pause) still sends 1 MiB and half-closes; the backend must get exactly those bytes.
async fn backend_half_close_leaves_the_client_direction_open(path: DataPath) {
    let (eofs, mut eof_seen) = mpsc::unbounded_channel();
    let backend = backend_closes_first(eofs);
    let topology = Topology::builder(Frontend::HttpConnectTls)
        .tag(&format!("rhalf-{}", path.tag()))
        .agent_args(path.agent_args(&[backend.addr.port()]))
        .start()
        .await;
    let before = path_counters(&topology).await;

    let mut stream = topology.http_connect(&backend.target()).await.expect("CONNECT");
    stream.write_all(b"?").await.expect("first byte");
    tokio::time::timeout(STEP, read_pattern(&mut stream, REPLY_SEED, AFTER_FIN))
        .await
        .unwrap_or_else(|_| panic!("{path:?}: the backend's bytes and FIN did not arrive in time"))
        .unwrap_or_else(|e| panic!("{path:?}: the backend's bytes before its FIN: {e}"));
    // The half-closed connection stays open for the client's direction.
    tokio::time::sleep(REPLY_DELAY).await;
    write_pattern(&mut stream, 0xf2, BEFORE_FIN).await.expect("write after the backend's FIN");
    stream.shutdown().await.expect("shutdown(WR)");
    let (received, digest, _) = tokio::time::timeout(STEP, eof_seen.recv())
        .await
        .unwrap_or_else(|_| panic!("{path:?}: the backend did not see the client's EOF within {STEP:?}"))
        .expect("backend report")
        .unwrap_or_else(|e| panic!("{path:?}: backend: {e}"));
    assert_eq!(received, BEFORE_FIN, "{path:?}: bytes the backend read after its own FIN");
    assert_eq!(hex(&digest), hex(&pattern_sha256(0xf2, BEFORE_FIN)), "{path:?}: backend got other bytes");
    assert_path_taken(&topology, path, before, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_on_data_packets_leaves_the_client_direction_open() {
    backend_half_close_leaves_the_client_direction_open(DataPath::Packets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_on_a_tls_relay_leaves_the_client_direction_open() {
    backend_half_close_leaves_the_client_direction_open(DataPath::TlsRelay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_on_a_sockmap_splice_leaves_the_client_direction_open() {
    backend_half_close_leaves_the_client_direction_open(DataPath::Sockmap).await;
}

// ---------------------------------------------------------------------------------------
// gRPC tunnel helpers
// ---------------------------------------------------------------------------------------

/// Sends `len` pattern bytes of `seed` as DATA packets, counting them into `progress`.
async fn grpc_write_pattern(tunnel: &GrpcTunnel, seed: u64, len: u64, progress: Option<&AtomicU64>) -> io::Result<()> {
    let mut buf = vec![0; 256 * 1024];
    let mut sent = 0;
    while sent < len {
        let n = (len - sent).min(buf.len() as u64) as usize;
        pattern_fill(seed, sent, &mut buf[..n]);
        tunnel.write(&buf[..n]).await?;
        sent += n as u64;
        if let Some(p) = progress {
            p.store(sent, Ordering::SeqCst);
        }
    }
    Ok(())
}

/// Reads DATA until CLOSE_RSP and checks it is exactly the first `len` bytes of `seed`.
async fn grpc_read_pattern(tunnel: &mut GrpcTunnel, seed: u64, len: u64) -> Result<(), String> {
    let mut check = PatternCheck::new(seed);
    while let Some(chunk) = tunnel.read().await.map_err(|e| format!("read: {e}"))? {
        check.update(&chunk);
    }
    check.finish(len)
}

// ---------------------------------------------------------------------------------------
// Test backends
// ---------------------------------------------------------------------------------------

/// A loopback listener on a kernel-chosen port whose accept queue holds `backlog`
/// connections.
async fn listener_with_backlog(backlog: u32) -> std::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind((Ipv4Addr::LOCALHOST, 0).into()).expect("bind");
    socket.listen(backlog).expect("listen").into_std().expect("std listener")
}

/// Reads an 8-byte big-endian length `n`, then exactly `n` bytes; answers their SHA-256
/// and closes.
async fn serve_sized_sink(mut stream: TcpStream) -> io::Result<()> {
    let len = stream.read_u64().await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = stream.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("EOF with {left} of {len} bytes due")));
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    let digest: [u8; 32] = hasher.finalize().into();
    stream.write_all(&digest).await?;
    stream.shutdown().await
}

fn sized_sink() -> FnBackend {
    FnBackend::start(serve_sized_sink)
}

/// A sized sink that reads nothing until `released` turns true.
fn lazy_sized_sink(released: watch::Receiver<bool>) -> FnBackend {
    FnBackend::start(move |stream| {
        let mut released = released.clone();
        async move {
            released.wait_for(|r| *r).await.map_err(|_| io::Error::other("released dropped"))?;
            serve_sized_sink(stream).await
        }
    })
}

/// Like the harness's source (8-byte length, then that many bytes of [`SOURCE_SEED`]),
/// storing how many bytes the kernel has taken so far in `progress`.
fn counting_source(progress: Arc<AtomicU64>) -> FnBackend {
    FnBackend::start(move |mut stream| {
        let progress = progress.clone();
        async move {
            let len = stream.read_u64().await?;
            let mut buf = vec![0; 64 * 1024];
            let mut sent = 0u64;
            while sent < len {
                let n = (len - sent).min(buf.len() as u64) as usize;
                pattern_fill(SOURCE_SEED, sent, &mut buf[..n]);
                stream.write_all(&buf[..n]).await?;
                sent += n as u64;
                progress.store(sent, Ordering::SeqCst);
            }
            stream.shutdown().await
        }
    })
}

/// Half-closes first: waits for the client's first byte, answers [`AFTER_FIN`] bytes of
/// [`REPLY_SEED`], shuts down its write side, then reads the client's bytes to EOF and
/// reports them.
fn backend_closes_first(reports: mpsc::UnboundedSender<EofReport>) -> FnBackend {
    FnBackend::start(move |mut stream| {
        let reports = reports.clone();
        async move {
            let mut first = [0u8; 1];
            stream.read_exact(&mut first).await?;
            let mut buf = vec![0; 64 * 1024];
            let mut sent = 0;
            while sent < AFTER_FIN {
                let n = (AFTER_FIN - sent).min(buf.len() as u64) as usize;
                pattern_fill(REPLY_SEED, sent, &mut buf[..n]);
                stream.write_all(&buf[..n]).await?;
                sent += n as u64;
            }
            stream.shutdown().await?;
            let report = read_to_eof_hashing(&mut stream, &mut buf).await;
            let failed = report.as_ref().err().map(|e| io::Error::other(e.clone()));
            let _ = reports.send(report);
            failed.map_or(Ok(()), Err)
        }
    })
}

/// Reads to EOF; the count, SHA-256 and time of EOF, or what failed.
async fn read_to_eof_hashing(stream: &mut TcpStream, buf: &mut [u8]) -> EofReport {
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    loop {
        match stream.read(buf).await {
            Ok(0) => return Ok((received, hasher.finalize().into(), Instant::now())),
            Ok(n) => {
                hasher.update(&buf[..n]);
                received += n as u64;
            }
            Err(e) => return Err(format!("read before EOF ({received} bytes): {e}")),
        }
    }
}

/// What the half-close backend reports when it sees EOF: bytes read, their SHA-256, when.
type EofReport = Result<(u64, [u8; 32], Instant), String>;

/// Reads to EOF, reports it, waits [`REPLY_DELAY`], answers [`AFTER_FIN`] bytes of
/// [`REPLY_SEED`] and closes.
fn half_close_backend(reports: mpsc::UnboundedSender<EofReport>) -> FnBackend {
    FnBackend::start(move |mut stream| {
        let reports = reports.clone();
        async move {
            let mut buf = vec![0; 64 * 1024];
            let report = read_to_eof_hashing(&mut stream, &mut buf).await;
            if let Err(e) = &report {
                let _ = reports.send(Err(e.clone()));
                return Err(io::Error::other(e.clone()));
            }
            let _ = reports.send(report);
            tokio::time::sleep(REPLY_DELAY).await;
            let mut sent = 0;
            while sent < AFTER_FIN {
                let n = (AFTER_FIN - sent).min(buf.len() as u64) as usize;
                pattern_fill(REPLY_SEED, sent, &mut buf[..n]);
                stream.write_all(&buf[..n]).await?;
                sent += n as u64;
            }
            stream.shutdown().await
        }
    })
}
