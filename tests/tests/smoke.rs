//! Smoke tests: the shortest paths through konduit that must always work.
//! Each starts its own server and agents on loopback (see `konduit_e2e::topology`).

use std::time::Duration;

use konduit_e2e::backends::Backend;
use konduit_e2e::data::{SOURCE_SEED, pattern};
use konduit_e2e::{Frontend, GrpcTunnel, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STEP: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_over_uds_echoes_bytes_and_passes_half_close() {
    let echo = Backend::echo();
    let topology = Topology::builder(Frontend::HttpConnectUds).tag("smoke-hc").start().await;

    let mut stream = topology.http_connect(&echo.target()).await.expect("CONNECT is established");
    stream.write_all(b"hello through konduit").await.expect("write");
    let mut reply = [0u8; 21];
    tokio::time::timeout(STEP, stream.read_exact(&mut reply)).await.expect("echo in time").expect("read");
    assert_eq!(&reply, b"hello through konduit");

    // Half-close: the backend sees EOF, and its own EOF still comes back.
    stream.write_all(b" and goodbye").await.expect("write");
    stream.shutdown().await.expect("shutdown(WR)");
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut rest)).await.expect("EOF in time").expect("read");
    assert_eq!(rest, b" and goodbye");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_uds_moves_64_kib_byte_exact_both_ways() {
    const LEN: usize = 64 * 1024;
    let echo = Backend::echo();
    let source = Backend::source();
    let topology = Topology::builder(Frontend::GrpcUds).tag("smoke-grpc").start().await;
    let mut client = topology.grpc().await;

    // Up and back: 64 KiB to an echo backend, the same 64 KiB returned.
    let mut tunnel = GrpcTunnel::dial(&mut client, &echo.target()).await.expect("dial echo");
    let sent = pattern(42, LEN);
    tunnel.write(&sent).await.expect("write");
    let echoed = tokio::time::timeout(STEP, tunnel.read_exact(LEN)).await.expect("echo in time").expect("read");
    assert!(echoed == sent, "echoed bytes differ from the sent ones");
    assert_eq!(tunnel.close_req().await.expect("CLOSE_RSP"), None);

    // Down: 64 KiB from a source backend, then the backend's close arrives as CLOSE_RSP.
    let mut tunnel = GrpcTunnel::dial(&mut client, &source.target()).await.expect("dial source");
    tunnel.write(&(LEN as u64).to_be_bytes()).await.expect("write length");
    let received = tokio::time::timeout(STEP, tunnel.read_to_end()).await.expect("data in time").expect("read");
    assert_eq!(received.len(), LEN);
    assert!(received == pattern(SOURCE_SEED, LEN), "received bytes differ from the source's");
    assert!(tunnel.close_response().is_some(), "the backend's close arrives as CLOSE_RSP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_agent_report_readiness() {
    let mut topology = Topology::builder(Frontend::GrpcUds).tag("smoke-ready").agents(0).start().await;

    let healthz = topology.server.get("/healthz").await.expect("GET /healthz");
    assert_eq!(healthz.status, 200);
    let readyz = topology.server.get("/readyz").await.expect("GET /readyz");
    assert_eq!(readyz.status, 500, "no agent yet: {}", readyz.body);
    let metrics = topology.server.metrics().await;
    assert!(metrics.contains("konnectivity_network_proxy_server_"), "server metrics:\n{metrics}");

    topology.add_agent(&[]);
    topology.wait_agents(1, STEP).await.expect("agent connects and the server becomes ready");
    let agent_metrics = topology.agents[0].metrics().await;
    assert!(agent_metrics.contains("konnectivity_network_proxy_agent_"), "agent metrics:\n{agent_metrics}");

    // Without its server the agent is alive but not ready.
    topology.server.kill();
    topology.agents[0].wait_status("/readyz", 503, STEP).await.expect("agent turns unready");
    let healthz = topology.agents[0].get("/healthz").await.expect("GET /healthz");
    assert_eq!(healthz.status, 200);
}
