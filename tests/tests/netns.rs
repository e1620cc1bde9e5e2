//! konduit across network namespaces, as on a real cluster: the server runs in a
//! "control-plane" namespace, the agent and the backends in a "node" namespace,
//! joined only by a veth pair. The backends listen on an address the control
//! plane has no route to, so the only way from the control plane to them is the
//! tunnel the agent dialled out. Run once with the default data path (TLS relay,
//! userspace) and once with the kernel splice (plaintext relay, eBPF sockmap).
//!
//! ```text
//!  test process (host ns) ──unix socket──▶ server ┃ cp ns   10.211.0.1/30 ─┐ veth
//!                                          agent  ┃ node ns 10.211.0.2/30 ─┘
//!                                          backends on 10.212.0.1 (node's lo; cp has no route)
//! ```
//!
//! Needs root (creates namespaces); they are removed on drop, also on panic.
//! Addresses are private and exist only inside the namespaces the test creates;
//! neither namespace has a default route, so no packet can leave them.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use konduit_e2e::backends::{Backend, KUBELET_BODY, Kind};
use konduit_e2e::clients::{fetch_from_source, http_connect_uds, https_get, write_pattern};
use konduit_e2e::data::{hex, pattern_sha256};
use konduit_e2e::netns::{NetNs, Veth};
use konduit_e2e::pki::Usage;
use konduit_e2e::probe::metric;
use konduit_e2e::process::{Konduit, Launch, Role};
use konduit_e2e::{Pki, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The control plane's end of the veth (the server's agent port listens here).
const CP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 1);
/// The node's end of the veth.
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 2);
/// The backends' address: on the node's loopback, outside the veth subnet, so the
/// control plane has no route to it.
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 212, 0, 1);
/// HTTPS backend (a kubelet stand-in), a pattern source and a SHA-256 sink. Not 10250, the
/// agent's default plaintext-relay port: the default run must take the default (TLS) relay.
const HTTPS_PORT: u16 = 8443;
const SOURCE_PORT: u16 = 9100;
const SINK_PORT: u16 = 9101;
/// Stock konnectivity ports; the namespaces are fresh, so they are free.
const AGENT_PORT: u16 = 8132;
const SERVER_ADMIN_PORT: u16 = 8133;
const SERVER_HEALTH_PORT: u16 = 8134;
const AGENT_HEALTH_PORT: u16 = 8093;
const AGENT_ADMIN_PORT: u16 = 8094;

const BULK: u64 = 16 * 1024 * 1024;
const UPLOAD_SEED: u64 = 0x6e65_746e_7321;
const READY: Duration = Duration::from_secs(10);
const STEP: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataPath {
    /// The agent's defaults: `--dataplane=auto`, plaintext relays only for 10250, so
    /// these backends get a TLS relay moved in userspace.
    Default,
    /// `--relay-plaintext-ports=<backend ports> --dataplane=sockmap`: plaintext relays
    /// spliced in the kernel on the node.
    Sockmap,
}

impl DataPath {
    fn tag(self) -> &'static str {
        match self {
            DataPath::Default => "default",
            DataPath::Sockmap => "sockmap",
        }
    }

    fn agent_args(self) -> Vec<String> {
        match self {
            DataPath::Default => Vec::new(),
            DataPath::Sockmap => vec![
                format!("--relay-plaintext-ports={HTTPS_PORT},{SOURCE_PORT},{SINK_PORT}"),
                "--dataplane=sockmap".into(),
            ],
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_reaches_node_backend_only_through_the_tunnel_default_data_path() {
    run(DataPath::Default).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_reaches_node_backend_only_through_the_tunnel_kernel_splice() {
    run(DataPath::Sockmap).await;
}

async fn run(path: DataPath) {
    let names: [String; 2];
    {
        // Declared first so they are dropped last: processes and backends go before
        // their namespaces (the guards also remove them when a step below panics).
        let cp = NetNs::new("cp");
        let node = NetNs::new("node");
        names = [cp.name().to_owned(), node.name().to_owned()];
        Veth::connect(&cp, &format!("{CP_ADDR}/30"), &node, &format!("{NODE_ADDR}/30"));
        node.add_address("lo", &format!("{BACKEND_IP}/32"));
        for ns in [&cp, &node] {
            let routes = ns.ip(&["-4", "route", "show"]);
            let routes = String::from_utf8_lossy(&routes.stdout);
            assert!(!routes.contains("default"), "{} must have no default route:\n{routes}", ns.name());
        }

        let dir = TempDir::new(&format!("netns-{}", path.tag()));
        let pki = Pki::generate(dir.path(), &[&CP_ADDR.to_string()]);
        let kubelet_id = pki.issue("kubelet", "kubelet", &[&BACKEND_IP.to_string()], Usage::Server);

        let https_addr = SocketAddr::from((BACKEND_IP, HTTPS_PORT));
        let source_addr = SocketAddr::from((BACKEND_IP, SOURCE_PORT));
        let sink_addr = SocketAddr::from((BACKEND_IP, SINK_PORT));
        let https = Backend::start_on(node.bind(https_addr), Kind::Https(Arc::new(pki.server_config(&kubelet_id))));
        let source = Backend::start_on(node.bind(source_addr), Kind::Source);
        let sink = Backend::start_on(node.bind(sink_addr), Kind::Sha256Sink);

        // (1) The control plane cannot open a connection to the backends: no route to
        // their address, and nothing listens on the node address it can reach.
        for addr in [https_addr, source_addr, sink_addr] {
            let direct = tokio::time::timeout(Duration::from_secs(3), cp.connect(addr)).await;
            assert!(
                matches!(&direct, Ok(Err(e)) if e.kind() == ErrorKind::NetworkUnreachable),
                "a direct connect from the control plane to {addr} must fail (no route), got {direct:?}"
            );
        }
        for port in [HTTPS_PORT, SOURCE_PORT, SINK_PORT] {
            let via_veth = SocketAddr::from((NODE_ADDR, port));
            let direct = tokio::time::timeout(Duration::from_secs(3), cp.connect(via_veth)).await;
            assert!(
                matches!(&direct, Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused),
                "the node's veth address {via_veth} must not expose a backend, got {direct:?}"
            );
        }
        // …while inside the node the backend is up (so the failures above are about reachability).
        let local = node.connect(https_addr).await.expect("the backend answers inside the node namespace");
        let response = https_get(local, &pki, IpAddr::V4(BACKEND_IP), "/").await.expect("HTTPS GET inside the node");
        assert_eq!((response.status, response.body.as_str()), (200, KUBELET_BODY));
        let accepted_directly = https.accepted();

        // The server in the control plane: HTTP-CONNECT on a unix socket (as kube-apiserver
        // uses it), agent port on the veth address only.
        let uds = dir.join("frontend.sock");
        let mut server = server_launch(&dir, &pki, &uds).netns(cp.name()).spawn();
        server.wait_status("/healthz", 200, READY).await.unwrap_or_else(|e| panic!("server did not come up: {e}"));

        // The agent in the node dials out to the control plane.
        let mut agent = agent_launch(&dir, &pki, path).netns(node.name()).spawn();
        wait_connected(&mut server, &mut agent).await;

        // (2) Through the tunnel: a real TLS GET to the HTTPS backend…
        let tunnel = http_connect_uds(&uds, &https_addr.to_string())
            .await
            .unwrap_or_else(|e| panic!("CONNECT {https_addr}: {e}"));
        let response = tokio::time::timeout(STEP, https_get(tunnel, &pki, IpAddr::V4(BACKEND_IP), "/"))
            .await
            .expect("HTTPS GET through the tunnel in time")
            .expect("HTTPS GET through the tunnel");
        assert_eq!((response.status, response.body.as_str()), (200, KUBELET_BODY));
        assert_eq!(https.accepted(), accepted_directly + 1, "the GET reached the backend through the agent");

        // …16 MiB down from the node, byte-exact, ending with the backend's FIN…
        let mut tunnel = http_connect_uds(&uds, &source_addr.to_string())
            .await
            .unwrap_or_else(|e| panic!("CONNECT {source_addr}: {e}"));
        tokio::time::timeout(STEP, fetch_from_source(&mut tunnel, BULK))
            .await
            .expect("16 MiB download in time")
            .expect("16 MiB download is byte-exact");
        drop(tunnel);

        // …and 16 MiB up to the node, byte-exact (the sink hashes what arrives before our FIN).
        let mut tunnel =
            http_connect_uds(&uds, &sink_addr.to_string()).await.unwrap_or_else(|e| panic!("CONNECT {sink_addr}: {e}"));
        let upload = async {
            write_pattern(&mut tunnel, UPLOAD_SEED, BULK).await?;
            tunnel.shutdown().await?;
            let mut digest = Vec::new();
            tunnel.read_to_end(&mut digest).await?;
            Ok::<_, std::io::Error>(digest)
        };
        let digest = tokio::time::timeout(STEP, upload).await.expect("16 MiB upload in time").expect("16 MiB upload");
        assert_eq!(hex(&digest), hex(&pattern_sha256(UPLOAD_SEED, BULK)), "the sink hashed other bytes");
        drop(tunnel);

        // (3) The data path that moved them, from the agent's own counters (recorded when
        // each connection ends).
        let engine = match path {
            DataPath::Default => "userspace",
            DataPath::Sockmap => "sockmap",
        };
        let text = wait_metric(&agent, "konduit_dataplane_connections_total", &[("engine", engine)], 3.0).await;
        let count = |labels: &[(&str, &str)]| metric(&text, "konduit_dataplane_connections_total", labels);
        let bytes = |engine: &str, direction: &str| {
            metric(&text, "konduit_dataplane_bytes_total", &[("engine", engine), ("direction", direction)])
                .unwrap_or(0.0)
        };
        let fallbacks = |reason: &str| metric(&text, "konduit_dataplane_fallbacks_total", &[("reason", reason)]);
        match path {
            DataPath::Default => {
                assert_eq!(count(&[("engine", "sockmap")]).unwrap_or(0.0), 0.0, "nothing spliced by default:\n{text}");
                assert!(fallbacks("tls_relay").unwrap_or(0.0) >= 3.0, "TLS relays for these ports:\n{text}");
            }
            DataPath::Sockmap => {
                assert!(count(&[("engine", "sockmap")]).unwrap_or(0.0) > 0.0, "spliced in the kernel:\n{text}");
                assert_eq!(count(&[("engine", "userspace")]).unwrap_or(0.0), 0.0, "no userspace fallback:\n{text}");
                let total_fallbacks = metric(&text, "konduit_dataplane_fallbacks_total", &[]).unwrap_or(0.0);
                assert_eq!(total_fallbacks, 0.0, "no connection fell back:\n{text}");
            }
        }
        // Both bulk transfers' bytes passed through the engine that was counted.
        assert!(bytes(engine, "to_node") >= BULK as f64, "{engine} to_node bytes:\n{text}");
        assert!(bytes(engine, "from_node") >= BULK as f64, "{engine} from_node bytes:\n{text}");

        assert!(server.is_running(), "server still running");
        assert!(agent.is_running(), "agent still running");
        if std::env::var_os("KONDUIT_E2E_LOGS").is_some() {
            eprintln!("agent metrics ({}):\n{text}", path.tag());
        }
        drop(agent);
        drop(server);
        drop((https, source, sink));
    }
    // Every namespace the test created is gone.
    let list = std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    for name in names {
        assert!(
            !list.lines().any(|l| l.split_whitespace().next() == Some(name.as_str())),
            "{name} left behind:\n{list}"
        );
    }
}

fn server_launch(dir: &TempDir, pki: &Pki, uds: &Path) -> Launch {
    Launch::new(Role::Server, "server", dir.path())
        .args([
            "--mode=http-connect".to_owned(),
            format!("--uds-name={}", uds.display()),
            "--server-port=0".into(),
            format!("--agent-port={AGENT_PORT}"),
            format!("--agent-bind-address={CP_ADDR}"),
            format!("--cluster-cert={}", pki.server.cert.display()),
            format!("--cluster-key={}", pki.server.key.display()),
            format!("--cluster-ca-cert={}", pki.ca.display()),
            format!("--health-port={SERVER_HEALTH_PORT}"),
            "--health-bind-address=127.0.0.1".into(),
            format!("--admin-port={SERVER_ADMIN_PORT}"),
            "--admin-bind-address=127.0.0.1".into(),
            "--server-id=cp-server".into(),
            "--server-count=1".into(),
            "--backend-dial-timeout=5s".into(),
        ])
        .health_port(SERVER_HEALTH_PORT)
        .admin_port(SERVER_ADMIN_PORT)
}

fn agent_launch(dir: &TempDir, pki: &Pki, path: DataPath) -> Launch {
    Launch::new(Role::Agent, "agent", dir.path())
        .args([
            format!("--ca-cert={}", pki.ca.display()),
            format!("--agent-cert={}", pki.agent.cert.display()),
            format!("--agent-key={}", pki.agent.key.display()),
            format!("--proxy-server-host={CP_ADDR}"),
            format!("--proxy-server-port={AGENT_PORT}"),
            "--agent-id=node-agent".into(),
            "--health-server-host=127.0.0.1".into(),
            format!("--health-server-port={AGENT_HEALTH_PORT}"),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--admin-server-port={AGENT_ADMIN_PORT}"),
            "--dial-timeout=2s".into(),
            "--sync-interval=200ms".into(),
            "--sync-interval-cap=1s".into(),
        ])
        .args(path.agent_args())
        .health_port(AGENT_HEALTH_PORT)
        .admin_port(AGENT_ADMIN_PORT)
}

/// Waits until the agent has its session to the server and the server routes through it.
async fn wait_connected(server: &mut Konduit, agent: &mut Konduit) {
    let deadline = Instant::now() + READY;
    let left = || deadline.saturating_duration_since(Instant::now());
    agent.wait_ready(left()).await.unwrap_or_else(|e| panic!("agent not ready: {e}"));
    server.wait_ready(left()).await.unwrap_or_else(|e| panic!("server not ready: {e}"));
    loop {
        let text = server.metrics().await;
        match metric(&text, "konnectivity_network_proxy_server_ready_backend_connections", &[]) {
            None => return,
            Some(v) if v >= 1.0 => return,
            Some(v) if Instant::now() >= deadline => panic!("server counts {v} ready backend connections"),
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Polls the agent's `/metrics` until `name{labels}` reaches `at_least`; returns the text.
async fn wait_metric(agent: &Konduit, name: &str, labels: &[(&str, &str)], at_least: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = agent.metrics().await;
        if metric(&text, name, labels).is_some_and(|v| v >= at_least) || Instant::now() >= deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
