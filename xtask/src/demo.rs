//! `cargo xtask demo`: builds konduit, starts two real servers (one per
//! frontend kind kube-apiserver uses) with two agents each on loopback, sends
//! real traffic through every frontend (curl to an HTTPS "kubelet", gRPC
//! tunnels, a bulk transfer timed against direct TCP) and narrates each step.
//! Everything it starts lives in temp dirs and dies with it, also on Ctrl-C.
//! Exits non-zero if any step failed.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use konduit_e2e::backends::{Backend, KUBELET_BODY};
use konduit_e2e::clients::{self, fetch_from_source, https_get};
use konduit_e2e::data::{PatternCheck, SOURCE_SEED, hex, pattern, sha256};
use konduit_e2e::probe::metric;
use konduit_e2e::{Frontend, GrpcTunnel, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::test::{cargo, release_binary};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Size of the bulk transfer, in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Use the existing release binary instead of running `cargo build --release` first.
    #[arg(long)]
    no_build: bool,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    println!("konduit demo: a Konnectivity-compatible tunnel, end to end on this machine.\n");
    if !args.no_build {
        println!("• Building konduit (cargo build --release -p konduit); the first build takes a few minutes.");
        cargo(&["build", "--release", "--package", "konduit", "--bin", "konduit"])?;
    }
    let binary = release_binary();
    if !binary.is_file() {
        bail!("{} does not exist: run without --no-build", binary.display());
    }
    println!("  ✓ binary: {}\n", binary.display());

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start tokio")?;
    let ending = runtime.block_on(async move {
        let mut demo = tokio::spawn(demo(binary, args.size_mib));
        tokio::select! {
            result = &mut demo => result.map(Ending::Finished).map_err(|e| anyhow::anyhow!("the demo crashed: {e}")),
            signal = interrupted() => {
                // Aborting drops every guard: processes are killed, temp dirs removed.
                demo.abort();
                let _ = demo.await;
                println!("\n{signal}: stopped every process and removed the temp files.");
                Ok(Ending::Interrupted)
            }
        }
    })?;
    drop(runtime);
    let failures = match ending {
        Ending::Finished(failures) => failures,
        // The shell convention for "ended by a signal".
        Ending::Interrupted => std::process::exit(130),
    };
    if failures > 0 {
        bail!("{failures} demo step(s) failed");
    }
    Ok(())
}

/// How the demo ended.
enum Ending {
    /// Every step ran; this many failed.
    Finished(usize),
    /// Ctrl-C or SIGTERM; everything was cleaned up.
    Interrupted,
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term.recv() => "SIGTERM",
    }
}

/// Counts step outcomes and prints them.
#[derive(Default)]
struct Steps {
    failed: usize,
    passed: usize,
}

impl Steps {
    /// Prints the narrative, runs the step (bounded by `limit`), prints ✓ or ✗.
    async fn run<F>(&mut self, narrative: &str, limit: Duration, step: F) -> bool
    where
        F: Future<Output = Result<String, String>>,
    {
        println!("• {narrative}");
        let outcome = match tokio::time::timeout(limit, step).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("did not finish within {limit:?}")),
        };
        match outcome {
            Ok(detail) => {
                self.passed += 1;
                for line in detail.lines() {
                    println!("  ✓ {line}");
                }
                true
            }
            Err(why) => {
                self.failed += 1;
                println!("  ✗ FAILED: {why}");
                false
            }
        }
    }
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9)
}

async fn demo(binary: PathBuf, size_mib: u64) -> usize {
    let mut steps = Steps::default();
    println!(
        "In a cluster, kube-apiserver cannot reach nodes directly. Each node runs a konduit agent that\n\
         dials OUT to the konduit server on the control plane; the apiserver then asks the server for a\n\
         connection to a node address, and the server tunnels it through an agent. Here everything runs\n\
         on 127.0.0.1: real processes, real TLS, throwaway certificates.\n"
    );

    // Server 1: HTTP-CONNECT on TCP with mutual TLS (how kube-apiserver's egress selector uses it).
    let start = Topology::builder(Frontend::HttpConnectTls).tag("demo-hc").agents(2).binary(binary.clone()).start();
    let mut http = None;
    steps
        .run(
            "Starting server #1 with the HTTP-CONNECT frontend on TCP+mTLS, and two agents that dial it.",
            Duration::from_secs(30),
            async {
                let t = tokio::spawn(start).await.map_err(|e| format!("start failed (logs above): {e}"))?;
                let detail = format!(
                    "certificates (CA, server, agent and apiserver client certs) in {}\n\
                     server: frontend https://{} (client certificate required), agents connect to 127.0.0.1:{}\n\
                     agents: agent-0 and agent-1 are connected; server /readyz answers 200",
                    t.pki.dir.display(),
                    t.frontend_addr.map(|a| a.to_string()).unwrap_or_default(),
                    t.agent_port,
                );
                http = Some(t);
                Ok(detail)
            },
        )
        .await;

    // Server 2: gRPC on a unix socket (kube-apiserver's gRPC egress mode).
    let start = Topology::builder(Frontend::GrpcUds).tag("demo-grpc").agents(2).binary(binary).start();
    let mut grpc = None;
    steps
        .run(
            "Starting server #2 with the gRPC frontend on a unix socket, and two agents of its own.",
            Duration::from_secs(30),
            async {
                let t = tokio::spawn(start).await.map_err(|e| format!("start failed (logs above): {e}"))?;
                let detail = format!(
                    "server: frontend unix:{} (file permissions guard it), agents connect to 127.0.0.1:{}\n\
                     agents: agent-0 and agent-1 are connected",
                    t.uds.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    t.agent_port,
                );
                grpc = Some(t);
                Ok(detail)
            },
        )
        .await;

    let (Some(http), Some(grpc)) = (http, grpc) else {
        println!("\nA server did not start, so no traffic can flow; stopping here.");
        return steps.failed;
    };

    println!(
        "• Starting stand-ins for what lives on a node: an HTTPS \"kubelet\", an echo service, a bulk data source."
    );
    let kubelet = Backend::https(&http.pki);
    let echo = Backend::echo();
    let source = Backend::source();
    let sink = Backend::sha256_sink();
    println!(
        "  ✓ kubelet https://{}/   echo {}   source {}   sha256 sink {}\n",
        kubelet.addr, echo.addr, source.addr, sink.addr
    );

    let proxy = http.frontend_addr.expect("TLS frontend has an address");
    steps
        .run(
            &format!(
                "curl → server #1 (HTTPS proxy, CONNECT) → an agent → kubelet: \
                 curl --proxy https://{proxy} --proxy-cert frontend.crt … https://{}/",
                kubelet.addr
            ),
            Duration::from_secs(20),
            curl_kubelet(&http, proxy, kubelet.addr),
        )
        .await;

    steps
        .run(
            "The same request the gRPC way: a DIAL_REQ on server #2's unix socket, then TLS to the kubelet inside the tunnel.",
            Duration::from_secs(20),
            async {
                let mut client = clients::grpc_uds(grpc.uds.as_deref().expect("uds"))
                    .await
                    .map_err(|e| format!("connect {e:?}"))?;
                let tunnel = GrpcTunnel::dial(&mut client, &kubelet.target()).await.map_err(|e| e.to_string())?;
                let id = tunnel.connect_id();
                let response = https_get(tunnel.into_stream(), &http.pki, kubelet.addr.ip(), "/")
                    .await
                    .map_err(|e| format!("HTTPS through the tunnel: {e}"))?;
                if response.status != 200 || response.body != KUBELET_BODY {
                    return Err(format!("kubelet answered {} {:?}", response.status, response.body));
                }
                Ok(format!("DIAL_RSP gave connectID {id}; kubelet answered 200: {:?}", response.body.trim()))
            },
        )
        .await;

    steps
        .run(
            "Eight short connections through server #2 to the echo service (each is DIAL_REQ, DATA both ways, CLOSE_REQ).",
            Duration::from_secs(30),
            async {
                let before = dials_per_agent(&grpc).await;
                let mut client = clients::grpc_uds(grpc.uds.as_deref().expect("uds"))
                    .await
                    .map_err(|e| format!("connect {e:?}"))?;
                for i in 0..8u64 {
                    let mut tunnel = GrpcTunnel::dial(&mut client, &echo.target()).await.map_err(|e| e.to_string())?;
                    let message = pattern(i, 4096);
                    tunnel.write(&message).await.map_err(|e| e.to_string())?;
                    let back = tunnel.read_exact(message.len()).await.map_err(|e| e.to_string())?;
                    if back != message {
                        return Err(format!("connection {i}: echoed bytes differ"));
                    }
                    tunnel.close_req().await.map_err(|e| format!("close: {e}"))?;
                }
                let after = dials_per_agent(&grpc).await;
                let spread: Vec<String> = grpc
                    .agents
                    .iter()
                    .zip(before.iter().zip(&after))
                    .map(|(agent, (b, a))| match (b, a) {
                        (Some(b), Some(a)) => format!("{} dialled {}", agent.name, a - b),
                        _ => format!("{} dialled ? (no dial metric)", agent.name),
                    })
                    .collect();
                Ok(format!("8 × 4 KiB echoed byte-exact; the server spread them: {}", spread.join(", ")))
            },
        )
        .await;

    steps
        .run(
            "Half-close through server #1: send 1 MiB to a hashing service, close our sending side, read its SHA-256.",
            Duration::from_secs(20),
            async {
                let mut stream = http.http_connect(&sink.target()).await.map_err(|e| e.to_string())?;
                let data = pattern(7, 1 << 20);
                stream.write_all(&data).await.map_err(|e| e.to_string())?;
                stream.shutdown().await.map_err(|e| e.to_string())?;
                let mut digest = Vec::new();
                stream.read_to_end(&mut digest).await.map_err(|e| e.to_string())?;
                if digest != sha256(&data) {
                    return Err(format!("got {:?}, expected {}", hex(&digest), hex(&sha256(&data))));
                }
                Ok(format!("the service saw EOF and answered sha256 {}… which matches", &hex(&digest)[..16]))
            },
        )
        .await;

    let bytes = size_mib << 20;
    let mut direct_rate = None;
    steps
        .run(
            &format!("Bulk: {size_mib} MiB straight from the source over plain TCP, no konduit (the baseline)."),
            Duration::from_secs(120),
            async {
                let started = Instant::now();
                let mut stream = tokio::net::TcpStream::connect(source.addr).await.map_err(|e| e.to_string())?;
                fetch_from_source(&mut stream, bytes).await.map_err(|e| e.to_string())?;
                let rate = mib_per_s(bytes, started.elapsed());
                direct_rate = Some(rate);
                Ok(format!("{size_mib} MiB byte-exact in {:.2?}: {rate:.0} MiB/s", started.elapsed()))
            },
        )
        .await;
    let versus = |rate: f64| direct_rate.map_or(String::new(), |d| format!(" ({:.0}% of direct)", 100.0 * rate / d));

    steps
        .run(
            &format!("Bulk: {size_mib} MiB through server #1 (HTTP-CONNECT over mTLS) and an agent."),
            Duration::from_secs(180),
            async {
                let started = Instant::now();
                let mut stream = http.http_connect(&source.target()).await.map_err(|e| e.to_string())?;
                fetch_from_source(&mut stream, bytes).await.map_err(|e| e.to_string())?;
                let rate = mib_per_s(bytes, started.elapsed());
                Ok(format!("{size_mib} MiB byte-exact in {:.2?}: {rate:.0} MiB/s{}", started.elapsed(), versus(rate)))
            },
        )
        .await;

    steps
        .run(
            &format!("Bulk: {size_mib} MiB through server #2 (gRPC DATA packets over the unix socket) and an agent."),
            Duration::from_secs(180),
            async {
                let started = Instant::now();
                let mut client =
                    clients::grpc_uds(grpc.uds.as_deref().expect("uds")).await.map_err(|e| format!("connect {e:?}"))?;
                let mut tunnel = GrpcTunnel::dial(&mut client, &source.target()).await.map_err(|e| e.to_string())?;
                tunnel.write(&bytes.to_be_bytes()).await.map_err(|e| e.to_string())?;
                let mut check = PatternCheck::new(SOURCE_SEED);
                while let Some(chunk) = tunnel.read().await.map_err(|e| e.to_string())? {
                    check.update(&chunk);
                }
                check.finish(bytes)?;
                let rate = mib_per_s(bytes, started.elapsed());
                Ok(format!("{size_mib} MiB byte-exact in {:.2?}: {rate:.0} MiB/s{}", started.elapsed(), versus(rate)))
            },
        )
        .await;

    let total = steps.passed + steps.failed;
    println!();
    if steps.failed == 0 {
        println!("All {total} steps succeeded. Stopping the 2 servers, 4 agents and backends; removing temp files.");
    } else {
        println!(
            "{} of {total} steps FAILED (see ✗ above). Process logs: rerun with KONDUIT_E2E_LOGS=1 to print them, \
             or KONDUIT_E2E_KEEP=1 to keep the temp dirs.",
            steps.failed
        );
    }
    steps.failed
}

/// Each agent's `dial_duration_seconds` sample count (dials it has made), if exported.
async fn dials_per_agent(topology: &Topology) -> Vec<Option<f64>> {
    let mut out = Vec::new();
    for agent in &topology.agents {
        let text = agent.metrics().await;
        out.push(metric(&text, "konnectivity_network_proxy_agent_dial_duration_seconds_count", &[]));
    }
    out
}

async fn curl_kubelet(http: &Topology, proxy: SocketAddr, kubelet: SocketAddr) -> Result<String, String> {
    let version = tokio::process::Command::new("curl")
        .arg("--version")
        .output()
        .await
        .map_err(|e| format!("curl is not installed ({e}); install curl to run this step"))?;
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    if !version.contains("HTTPS-proxy") {
        return Err(format!(
            "this curl cannot use an HTTPS proxy (needs the HTTPS-proxy feature): {}",
            version.lines().next().unwrap_or_default()
        ));
    }
    let pki = &http.pki;
    let output = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .arg("--proxy")
        .arg(format!("https://{proxy}"))
        .arg("--proxy-cacert")
        .arg(&pki.ca)
        .arg("--proxy-cert")
        .arg(&pki.frontend.cert)
        .arg("--proxy-key")
        .arg(&pki.frontend.key)
        .arg("--cacert")
        .arg(&pki.ca)
        .arg(format!("https://{kubelet}/"))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("run curl: {e}"))?;
    let body = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || body != KUBELET_BODY {
        return Err(format!(
            "curl exited {} with {:?}; stderr: {}",
            output.status,
            body,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(format!("kubelet answered through the tunnel: {:?}", body.trim()))
}
