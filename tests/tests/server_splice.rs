//! The server's kernel data path, end to end: an HTTP-CONNECT client on the unix socket,
//! a plaintext relay (the agent on `--dataplane=sockmap` with the backend ports listed as
//! plaintext), so the server joins the client's socket and the relay with splice(2) and
//! the agent joins the relay and the backend with the sockmap: no byte of the tunnelled
//! connection enters userspace on either host. Each test checks the server's `/metrics`
//! says the `splice` engine moved its connections.
//!
//! Bulk both ways, half-close both ways, aborts both ways, and a close right after a
//! large write a thousand times, all checksummed; and the counted fallbacks where the
//! server cannot splice (TLS frontend, `--dataplane=userspace`).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use konduit_e2e::backends::{Backend, FnBackend};
use konduit_e2e::clients::{fetch_from_source, read_pattern, write_pattern};
use konduit_e2e::data::{hex, pattern_fill, pattern_sha256};
use konduit_e2e::probe::metric;
use konduit_e2e::{Frontend, Topology};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const STEP: Duration = Duration::from_secs(10);
const BULK: u64 = 64 * MIB;

const CONNECTIONS: &str = "konduit_dataplane_connections_total";
const FALLBACKS: &str = "konduit_dataplane_fallbacks_total";

/// A server on `frontend` and one agent that splices relays to `backend_ports` in the kernel.
async fn spliced_topology(tag: &str, frontend: Frontend, server_args: &[&str], backend_ports: &[u16]) -> Topology {
    let ports: Vec<String> = backend_ports.iter().map(u16::to_string).collect();
    Topology::builder(frontend)
        .tag(tag)
        .server_args(server_args.iter().copied())
        .agent_args([format!("--relay-plaintext-ports={}", ports.join(",")), "--dataplane=sockmap".into()])
        .start()
        .await
}

async fn server_metric(t: &Topology, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&t.server.metrics().await, name, labels).unwrap_or(0.0)
}

async fn agent_metric(t: &Topology, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&t.agents[0].metrics().await, name, labels).unwrap_or(0.0)
}

/// Waits until the server counted `n` more connections of `engine` than `before` (an
/// engine counts a connection when it ends), and fails with the server's data-plane
/// metrics if it does not.
async fn assert_server_engine(t: &Topology, engine: &str, before: f64, n: f64) {
    let deadline = Instant::now() + STEP;
    loop {
        let now = server_metric(t, CONNECTIONS, &[("engine", engine)]).await;
        if now - before >= n {
            assert_eq!(now - before, n, "exactly {n} connections on the {engine} engine");
            return;
        }
        if Instant::now() > deadline {
            let text = t.server.metrics().await;
            let dataplane: Vec<&str> = text.lines().filter(|l| l.starts_with("konduit_dataplane_")).collect();
            t.print_logs();
            panic!("the server counted {} of {n} connections on {engine}:\n{}", now - before, dataplane.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_splice_moves_64_mib_each_way_byte_exact_and_counts_the_splice_engine() {
    let sink = Backend::sha256_sink();
    let source = Backend::source();
    let t = spliced_topology(
        "ssplice-bulk",
        Frontend::HttpConnectUds,
        &["--dataplane=sockmap"],
        &[sink.addr.port(), source.addr.port()],
    )
    .await;
    let spliced = server_metric(&t, CONNECTIONS, &[("engine", "splice")]).await;
    let agent_spliced = agent_metric(&t, CONNECTIONS, &[("engine", "sockmap")]).await;

    let started = Instant::now();
    let mut up = t.http_connect(&sink.target()).await.expect("CONNECT to sink");
    write_pattern(&mut up, 0xb01c, BULK).await.expect("upload");
    up.shutdown().await.expect("half-close");
    let mut digest = Vec::new();
    up.read_to_end(&mut digest).await.expect("digest");
    assert_eq!(hex(&digest), hex(&pattern_sha256(0xb01c, BULK)), "the sink got every byte, in order");
    let up_took = started.elapsed();

    let started = Instant::now();
    let mut down = t.http_connect(&source.target()).await.expect("CONNECT to source");
    fetch_from_source(&mut down, BULK).await.expect("download is byte-exact");
    down.shutdown().await.expect("close");
    drop((up, down));
    eprintln!("64 MiB up in {up_took:?}, down in {:?}", started.elapsed());

    assert_server_engine(&t, "splice", spliced, 2.0).await;
    let agent_now = agent_metric(&t, CONNECTIONS, &[("engine", "sockmap")]).await;
    assert_eq!(agent_now - agent_spliced, 2.0, "the agent spliced its side in the kernel too");
    let text = t.server.metrics().await;
    let bytes =
        |direction| metric(&text, "konduit_dataplane_bytes_total", &[("engine", "splice"), ("direction", direction)]);
    assert!(bytes("to_node").unwrap_or(0.0) >= BULK as f64, "upload bytes counted on the splice engine");
    assert!(bytes("from_node").unwrap_or(0.0) >= BULK as f64, "download bytes counted on the splice engine");
}

/// What a backend saw before EOF: byte count and SHA-256, or the error that ended it.
type Seen = Result<(u64, [u8; 32]), io::ErrorKind>;

async fn read_to_eof(stream: &mut TcpStream) -> Seen {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    let mut received = 0;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return Ok((received, hasher.finalize().into())),
            Ok(n) => {
                hasher.update(&buf[..n]);
                received += n as u64;
            }
            Err(e) => return Err(e.kind()),
        }
    }
}

async fn write_fill(stream: &mut TcpStream, seed: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0; 64 * 1024];
    let mut sent = 0;
    while sent < len {
        let n = (len - sent).min(buf.len() as u64) as usize;
        pattern_fill(seed, sent, &mut buf[..n]);
        stream.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    Ok(())
}

const HALF: u64 = MIB + 17;
const REPLY_SEED: u64 = 0x7265_706c;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_splice_passes_half_close_in_each_direction_after_the_bytes_before_it() {
    // Client first: the backend reads to EOF, reports, then answers and closes.
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let reads_then_answers = FnBackend::start(move |mut stream| {
        let seen_tx = seen_tx.clone();
        async move {
            let got = read_to_eof(&mut stream).await;
            let _ = seen_tx.send(got);
            write_fill(&mut stream, REPLY_SEED, HALF).await?;
            stream.shutdown().await
        }
    });
    // Backend first: it sends and half-closes at once, then reads what the client sends after.
    let (late_tx, mut late) = mpsc::unbounded_channel::<Seen>();
    let answers_then_reads = FnBackend::start(move |mut stream| {
        let late_tx = late_tx.clone();
        async move {
            write_fill(&mut stream, REPLY_SEED, HALF).await?;
            stream.shutdown().await?;
            let _ = late_tx.send(read_to_eof(&mut stream).await);
            Ok(())
        }
    });
    let t = spliced_topology(
        "ssplice-half",
        Frontend::HttpConnectUds,
        &["--dataplane=sockmap"],
        &[reads_then_answers.addr.port(), answers_then_reads.addr.port()],
    )
    .await;
    let spliced = server_metric(&t, CONNECTIONS, &[("engine", "splice")]).await;

    let stream = t.http_connect(&reads_then_answers.target()).await.expect("CONNECT");
    let (mut reader, mut writer) = tokio::io::split(stream);
    write_pattern(&mut writer, 0x6861, HALF).await.expect("write");
    writer.shutdown().await.expect("half-close");
    let got = tokio::time::timeout(STEP, seen.recv()).await.expect("the backend saw EOF in time").expect("report");
    let (n, digest) = got.unwrap_or_else(|e| panic!("backend read failed: {e:?}"));
    assert_eq!((n, hex(&digest)), (HALF, hex(&pattern_sha256(0x6861, HALF))), "every byte, then EOF");
    tokio::time::timeout(STEP, read_pattern(&mut reader, REPLY_SEED, HALF))
        .await
        .expect("the reply arrived in time")
        .expect("the reply after the client's half-close is whole, then EOF");

    let mut stream = t.http_connect(&answers_then_reads.target()).await.expect("CONNECT");
    tokio::time::timeout(STEP, read_pattern(&mut stream, REPLY_SEED, HALF))
        .await
        .expect("in time")
        .expect("the backend's bytes, then its FIN");
    write_pattern(&mut stream, 0x6862, HALF).await.expect("write after the backend's FIN");
    stream.shutdown().await.expect("half-close");
    let got = tokio::time::timeout(STEP, late.recv()).await.expect("the backend saw EOF in time").expect("report");
    let (n, digest) = got.unwrap_or_else(|e| panic!("backend read failed: {e:?}"));
    assert_eq!((n, hex(&digest)), (HALF, hex(&pattern_sha256(0x6862, HALF))), "every byte after its own FIN");

    assert_server_engine(&t, "splice", spliced, 2.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_splice_passes_an_abort_on_either_side_through() {
    // The backend resets: the client's stream must end (a unix socket has no reset). It
    // speaks only after the client, so that the agent splices it too (a backend that
    // speaks first is moved in userspace by the agent, which passes a reset on as FIN).
    let resets = FnBackend::start(|stream| async move {
        let mut stream = stream;
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await?;
        stream.write_all(b"about to reset").await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // SO_LINGER 0: the close sends RST (it does not block with a zero timeout).
        let linger = nix::libc::linger { l_onoff: 1, l_linger: 0 };
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger).map_err(io::Error::from)?;
        drop(stream);
        Ok(())
    });
    // The client aborts: the backend must see a reset.
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let watches = FnBackend::start(move |mut stream| {
        let seen_tx = seen_tx.clone();
        async move {
            // After the client has read the 200 (so these bytes stay unread in its socket).
            tokio::time::sleep(Duration::from_millis(100)).await;
            stream.write_all(b"bytes the client never reads").await?;
            let _ = seen_tx.send(read_to_eof(&mut stream).await);
            Ok(())
        }
    });
    let t = spliced_topology(
        "ssplice-rst",
        Frontend::HttpConnectUds,
        &["--dataplane=sockmap"],
        &[resets.addr.port(), watches.addr.port()],
    )
    .await;
    let spliced = server_metric(&t, CONNECTIONS, &[("engine", "splice")]).await;

    let mut stream = t.http_connect(&resets.target()).await.expect("CONNECT");
    stream.write_all(b"?").await.expect("first byte");
    let mut buf = vec![0; 1024];
    let mut got = Vec::new();
    let ended = tokio::time::timeout(STEP, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the client's stream ended after the backend's reset");
    assert_eq!(got, b"about to reset", "bytes before the reset arrived");
    assert_server_engine(&t, "splice", spliced, 1.0).await;

    let stream = t.http_connect(&watches.target()).await.expect("CONNECT");
    // Let the backend's bytes reach the client's socket unread, then close it: an abort.
    tokio::time::sleep(Duration::from_millis(400)).await;
    drop(stream);
    let seen = tokio::time::timeout(STEP, seen.recv()).await.expect("the backend heard in time").expect("report");
    assert_eq!(seen.map(|_| ()), Err(io::ErrorKind::ConnectionReset), "the backend sees a reset");
    assert_server_engine(&t, "splice", spliced, 2.0).await;
}

/// Rule 2's hazard on the server's path: a FIN passed on before the last bytes left
/// truncates the stream. Backends that write and close at once, and clients that write and
/// half-close at once, a thousand times, all checksummed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_splice_never_truncates_a_close_right_after_a_large_write_a_thousand_times() {
    const REPETITIONS: usize = 1000;
    const SIZES: [u64; 5] = [1, 1000, 64 * KIB + 1, MIB + 3, 3 * MIB + 5];
    let source = Backend::source();
    let sink = Backend::sha256_sink();
    let t = Arc::new(
        spliced_topology(
            "ssplice-close",
            Frontend::HttpConnectUds,
            &["--dataplane=sockmap"],
            &[source.addr.port(), sink.addr.port()],
        )
        .await,
    );
    let spliced = server_metric(&t, CONNECTIONS, &[("engine", "splice")]).await;

    let parallel = Arc::new(Semaphore::new(4));
    let mut runs = Vec::new();
    for i in 0..REPETITIONS {
        let permit = parallel.clone().acquire_owned().await.expect("semaphore");
        let (t, len) = (t.clone(), SIZES[i % SIZES.len()]);
        let (source, sink) = (source.target(), sink.target());
        runs.push(tokio::spawn(async move {
            let _permit = permit;
            let run = async {
                if i % 2 == 0 {
                    let mut stream = t.http_connect(&source).await.map_err(|e| e.to_string())?;
                    fetch_from_source(&mut stream, len).await.map_err(|e| format!("download: {e}"))
                } else {
                    let mut stream = t.http_connect(&sink).await.map_err(|e| e.to_string())?;
                    write_pattern(&mut stream, 0x5eed + i as u64, len).await.map_err(|e| format!("upload: {e}"))?;
                    stream.shutdown().await.map_err(|e| format!("half-close: {e}"))?;
                    let mut digest = Vec::new();
                    stream.read_to_end(&mut digest).await.map_err(|e| format!("digest: {e}"))?;
                    let want = hex(&pattern_sha256(0x5eed + i as u64, len));
                    if hex(&digest) == want { Ok(()) } else { Err("the backend hashed other bytes".into()) }
                }
            };
            tokio::time::timeout(STEP, run)
                .await
                .unwrap_or_else(|_| Err(format!("not done in {STEP:?}")))
                .map_err(|e| format!("repetition {i} ({len} bytes): {e}"))
        }));
    }
    let mut failures = Vec::new();
    for run in runs {
        if let Err(e) = run.await.expect("repetition task") {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {REPETITIONS} truncated or corrupted: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_server_engine(&t, "splice", spliced, REPETITIONS as f64).await;
}

/// Where the server cannot splice it says why: a TLS frontend's bytes are not the
/// tunnelled bytes, and `--dataplane=userspace` turns the kernel path off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_counts_why_a_relayed_connection_was_not_spliced() {
    let source = Backend::source();
    for (frontend, flag, reason) in [
        (Frontend::HttpConnectTls, "--dataplane=sockmap", "tls_frontend"),
        (Frontend::HttpConnectUds, "--dataplane=userspace", "dataplane_userspace"),
    ] {
        let t = spliced_topology("ssplice-fallback", frontend, &[flag], &[source.addr.port()]).await;
        let mut stream = t.http_connect(&source.target()).await.expect("CONNECT");
        fetch_from_source(&mut stream, MIB + 1).await.expect("byte-exact in userspace");
        drop(stream);
        assert_server_engine(&t, "userspace", 0.0, 1.0).await;
        assert_eq!(server_metric(&t, FALLBACKS, &[("reason", reason)]).await, 1.0, "{frontend:?} {flag}: {reason}");
        assert_eq!(server_metric(&t, CONNECTIONS, &[("engine", "splice")]).await, 0.0, "nothing spliced");
    }
}
