//! The kernel rules of SOCKMAP-NOTES.md, each as a behaviour of the whole tunnel with the
//! agent on `--dataplane=sockmap` (the backend ports listed as plaintext relay ports):
//! a test here fails if konduit stops obeying its rule. After every scenario the agent
//! must be back to idle: no socket left in the SockHash, all valve credit returned, no
//! open endpoint, and as many open fds as before.
//!
//! Where the other rules are proven: half-close in each direction (rule 1, and rule 3 —
//! a forwarded FIN would make the peer stop sending before its reply) in `transfers.rs`
//! and the loader tests of `proxy-user/src/dataplane/sockmap.rs`; the valve (rule 7) in
//! `backpressure.rs`; data queued before the insert (rule 5) and RST propagation in the
//! loader tests, where the queue and the reset can be set up exactly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use konduit_e2e::backends::{Backend, FnBackend};
use konduit_e2e::clients::{fetch_from_source, write_pattern};
use konduit_e2e::data::{hex, pattern_sha256};
use konduit_e2e::probe::metric;
use konduit_e2e::{Frontend, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const STEP: Duration = Duration::from_secs(10);
/// The agent's default `--splice-max-lag-total`.
const NODE_CREDIT: f64 = (256 * MIB) as f64;

const SPLICED: &str = "konduit_dataplane_connections_total";
const FALLBACKS: &str = "konduit_dataplane_fallbacks_total";
const SOCKETS: &str = "konduit_dataplane_spliced_sockets";
const CREDIT: &str = "konduit_dataplane_valve_credit_available_bytes";
const OPEN_FDS: &str = "process_open_fds";
const OPEN_ENDPOINTS: &str = "konnectivity_network_proxy_agent_open_endpoint_connections";

async fn spliced_topology(tag: &str, backend_ports: &[u16]) -> Topology {
    let ports: Vec<String> = backend_ports.iter().map(u16::to_string).collect();
    Topology::builder(Frontend::HttpConnectUds)
        .tag(tag)
        .agent_args([format!("--relay-plaintext-ports={}", ports.join(",")), "--dataplane=sockmap".into()])
        .start()
        .await
}

async fn agent_metric(t: &Topology, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&t.agents[0].metrics().await, name, labels).unwrap_or(0.0)
}

/// Waits until the connection just made is counted: `true` when it fell back for
/// `reason` (the counter passed `fallbacks_before`), `false` when it was spliced.
async fn fell_back(t: &Topology, reason: &str, fallbacks_before: f64, spliced_before: f64) -> bool {
    let deadline = Instant::now() + STEP;
    loop {
        if agent_metric(t, FALLBACKS, &[("reason", reason)]).await > fallbacks_before {
            return true;
        }
        if agent_metric(t, SPLICED, &[("engine", "sockmap")]).await > spliced_before {
            return false;
        }
        assert!(Instant::now() < deadline, "the connection was neither spliced nor counted as {reason}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The agent's idle state, to come back to after a scenario.
struct Idle {
    fds: f64,
}

impl Idle {
    /// Reads the idle state once the agent has settled (its relay pool is full).
    async fn record(t: &Topology) -> Idle {
        let mut last = -1.0;
        let deadline = Instant::now() + STEP;
        loop {
            let fds = agent_metric(t, OPEN_FDS, &[]).await;
            if fds == last || Instant::now() > deadline {
                return Idle { fds };
            }
            last = fds;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until the agent holds nothing for finished connections.
    async fn assert_back(&self, t: &Topology, scenario: &str) {
        let deadline = Instant::now() + STEP;
        loop {
            let text = t.agents[0].metrics().await;
            let get = |name| metric(&text, name, &[]).unwrap_or(-1.0);
            let now = (get(SOCKETS), get(CREDIT), get(OPEN_ENDPOINTS), get(OPEN_FDS));
            if now == (0.0, NODE_CREDIT, 0.0, self.fds) {
                return;
            }
            if Instant::now() > deadline {
                t.print_logs();
                panic!(
                    "{scenario}: the agent did not return to idle: (spliced sockets, valve credit, open endpoints, \
                     fds) = {now:?}, expected (0, {NODE_CREDIT}, 0, {})",
                    self.fds
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Rule 2: redirected bytes wait in the kernel after the source's FIN; a FIN passed on
/// before they have left truncates the stream. Backends that write and close at once, and
/// clients that write and half-close at once, 1000 times over, all checksummed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_right_after_a_large_write_never_truncates_the_stream_a_thousand_times() {
    const REPETITIONS: usize = 1000;
    const SIZES: [u64; 5] = [1, 1000, 64 * KIB + 1, MIB + 3, 3 * MIB + 5];
    let source = Backend::source();
    let sink = Backend::sha256_sink();
    let t = Arc::new(spliced_topology("rule2", &[source.addr.port(), sink.addr.port()]).await);
    let idle = Idle::record(&t).await;
    let before = agent_metric(&t, SPLICED, &[("engine", "sockmap")]).await;

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
                    // The backend writes `len` bytes and closes right away.
                    let mut stream = t.http_connect(&source).await.map_err(|e| e.to_string())?;
                    fetch_from_source(&mut stream, len).await.map_err(|e| format!("download: {e}"))
                } else {
                    // We write `len` bytes and half-close right away; the backend hashes all it got.
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
    idle.assert_back(&t, "rule 2").await;
    let spliced = agent_metric(&t, SPLICED, &[("engine", "sockmap")]).await - before;
    assert_eq!(spliced, REPETITIONS as f64, "every repetition was spliced in the kernel");
}

/// Rule 5 in practice: a backend that greets before the client said anything already has
/// bytes queued when the agent would join the sockets. konduit does not splice such a
/// connection (counted as `data_queued`) and moves it in userspace, byte-exact.
///
/// The greeting races the insert: the backend writes it only once it has accepted, while
/// the agent goes on as soon as its connect returns. When the agent wins, the greeting
/// arrives after the insert and the kernel carries it, which is correct too. So each
/// attempt must be byte-exact and decided one way or the other, and the test repeats
/// until one attempt has seen the queue (locally the first one does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_speaks_first_falls_back_to_userspace_and_is_byte_exact() {
    const ATTEMPTS: usize = 20;
    let banner = b"220 greetings from a backend that speaks first\r\n".to_vec();
    let backend = Backend::speaks_first(&banner);
    let t = spliced_topology("rule5", &[backend.addr.port()]).await;
    let idle = Idle::record(&t).await;

    for attempt in 0..ATTEMPTS {
        let queued = agent_metric(&t, FALLBACKS, &[("reason", "data_queued")]).await;
        let spliced = agent_metric(&t, SPLICED, &[("engine", "sockmap")]).await;

        let mut stream = t.http_connect(&backend.target()).await.expect("CONNECT");
        let mut greeting = vec![0; banner.len()];
        stream.read_exact(&mut greeting).await.expect("banner");
        assert_eq!(greeting, banner, "attempt {attempt}: the greeting is byte-exact");
        let echo = konduit_e2e::data::pattern(0xec + attempt as u64, 256 * 1024);
        let (mut r, mut w) = tokio::io::split(stream);
        let echoed = tokio::spawn(async move {
            let mut got = vec![0; 256 * 1024];
            r.read_exact(&mut got).await.map(|_| got)
        });
        w.write_all(&echo).await.expect("write");
        assert!(echoed.await.expect("reader").expect("echo") == echo, "attempt {attempt}: echo is byte-exact");
        drop(w);

        if fell_back(&t, "data_queued", queued, spliced).await {
            idle.assert_back(&t, "rule 5").await;
            eprintln!("attempt {attempt} fell back (data_queued); the earlier ones raced the greeting");
            return;
        }
    }
    panic!("in {ATTEMPTS} attempts the greeting never arrived before the insert: no data_queued fallback was seen");
}

/// Rule 6: a socket that is no longer ESTABLISHED cannot enter the SockHash. A backend
/// that half-closes the moment it accepts has sent its FIN before the agent joins the
/// sockets: the connection falls back (`not_established`) and still carries the client's
/// bytes to the backend exactly.
///
/// The FIN races the agent's check, as the greeting of rule 5 does: when the agent checks
/// first, it splices, the verdict drops the FIN's empty skb (rule 3) and the half-close is
/// passed on by userspace, which is correct too. So every attempt must be byte-exact, and
/// the test repeats until one attempt has fallen back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_half_closed_before_the_splice_falls_back_and_still_gets_every_byte() {
    const ATTEMPTS: u64 = 20;
    const LEN: u64 = MIB + 9;
    let (report, mut reported) = tokio::sync::mpsc::unbounded_channel::<String>();
    let backend = FnBackend::start(move |mut stream| {
        let report = report.clone();
        async move {
            stream.shutdown().await?;
            let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                sha2::Digest::update(&mut hasher, &buf[..n]);
            }
            let digest: [u8; 32] = sha2::Digest::finalize(hasher).into();
            let _ = report.send(hex(&digest));
            Ok(())
        }
    });
    let t = spliced_topology("rule6", &[backend.addr.port()]).await;
    let idle = Idle::record(&t).await;

    for attempt in 0..ATTEMPTS {
        let refused = agent_metric(&t, FALLBACKS, &[("reason", "not_established")]).await;
        let spliced = agent_metric(&t, SPLICED, &[("engine", "sockmap")]).await;

        let mut stream = t.http_connect(&backend.target()).await.expect("CONNECT");
        let mut nothing = Vec::new();
        stream.read_to_end(&mut nothing).await.expect("the backend's EOF");
        assert!(nothing.is_empty(), "attempt {attempt}: the backend sent nothing");
        let seed = 0x6e + attempt;
        write_pattern(&mut stream, seed, LEN).await.expect("upload after the backend's half-close");
        stream.shutdown().await.expect("half-close");
        let digest = tokio::time::timeout(STEP, reported.recv()).await.expect("backend reports in time");
        assert_eq!(digest, Some(hex(&pattern_sha256(seed, LEN))), "attempt {attempt}: the backend got every byte");
        drop(stream);

        if fell_back(&t, "not_established", refused, spliced).await {
            idle.assert_back(&t, "rule 6").await;
            eprintln!("attempt {attempt} fell back (not_established); the earlier ones raced the FIN");
            return;
        }
    }
    panic!("in {ATTEMPTS} attempts the backend's FIN never arrived before the insert: no not_established fallback");
}
