//! Topologies of real konduit processes on loopback: one server with a
//! chosen frontend plus N agents, started with the stock flags, each on free
//! ports, and awaited until the server routes through every agent. Hands out
//! frontend clients that match the server's frontend. Everything (processes,
//! PKI, sockets, logs) lives in one temp dir and dies with the [`Topology`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::clients::{self, ConnectError, ProxyClient};
use crate::pki::Pki;
use crate::ports::free_port;
use crate::probe::metric;
use crate::process::{Konduit, Launch, Role};
use crate::scratch::TempDir;

/// How long [`TopologyBuilder::start`] waits for everything to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's frontend: protocol × transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// `--mode=grpc --uds-name=…` (kube-apiserver's gRPC egress).
    GrpcUds,
    /// `--mode=http-connect --uds-name=…`.
    HttpConnectUds,
    /// `--mode=grpc` on TCP with mTLS.
    GrpcTls,
    /// `--mode=http-connect` on TCP with mTLS.
    HttpConnectTls,
}

impl Frontend {
    /// Whether the frontend listens on a unix socket.
    pub fn is_uds(self) -> bool {
        matches!(self, Frontend::GrpcUds | Frontend::HttpConnectUds)
    }

    /// Whether the frontend speaks gRPC.
    pub fn is_grpc(self) -> bool {
        matches!(self, Frontend::GrpcUds | Frontend::GrpcTls)
    }

    fn mode(self) -> &'static str {
        if self.is_grpc() { "grpc" } else { "http-connect" }
    }
}

/// A byte stream through an HTTP-CONNECT tunnel (unix socket or TLS underneath).
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// Builds a [`Topology`].
#[derive(Debug, Clone)]
pub struct TopologyBuilder {
    tag: String,
    frontend: Frontend,
    agents: usize,
    agent_mtls: bool,
    server_args: Vec<String>,
    agent_args: Vec<String>,
    server_sans: Vec<String>,
    binary: Option<PathBuf>,
    ready_timeout: Duration,
}

impl TopologyBuilder {
    /// Names the temp dir (`konduit-<tag>-…`), e.g. after the test.
    pub fn tag(mut self, tag: &str) -> Self {
        self.tag = tag.to_owned();
        self
    }

    /// How many agents to start (default 1).
    pub fn agents(mut self, n: usize) -> Self {
        self.agents = n;
        self
    }

    /// Whether agents authenticate with a client certificate and the server requires one
    /// (`--cluster-ca-cert`); default true.
    pub fn agent_mtls(mut self, on: bool) -> Self {
        self.agent_mtls = on;
        self
    }

    /// Extra server flags (later flags override earlier ones).
    pub fn server_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.server_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Extra flags for every agent.
    pub fn agent_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.agent_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Extra SANs for the server certificate.
    pub fn server_sans(mut self, sans: &[&str]) -> Self {
        self.server_sans.extend(sans.iter().map(|s| s.to_string()));
        self
    }

    /// Runs this konduit binary (e.g. a release build) instead of the default.
    pub fn binary(mut self, path: PathBuf) -> Self {
        self.binary = Some(path);
        self
    }

    /// How long to wait for readiness (default [`READY_TIMEOUT`]).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Starts the server and the agents and waits until the server is ready with all of
    /// them. Panics (printing the logs) if that does not happen in time.
    pub async fn start(self) -> Topology {
        let dir = TempDir::new(&self.tag);
        let sans: Vec<&str> = self.server_sans.iter().map(String::as_str).collect();
        let pki = Pki::generate(dir.path(), &sans);
        let agent_port = free_port();
        let (health, admin) = (free_port(), free_port());
        let (uds, frontend_addr) = if self.frontend.is_uds() {
            (Some(dir.join("frontend.sock")), None)
        } else {
            (None, Some(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))))
        };
        let mut args = vec![
            format!("--mode={}", self.frontend.mode()),
            format!("--agent-port={agent_port}"),
            "--agent-bind-address=127.0.0.1".into(),
            format!("--cluster-cert={}", pki.server.cert.display()),
            format!("--cluster-key={}", pki.server.key.display()),
            format!("--health-port={health}"),
            "--health-bind-address=127.0.0.1".into(),
            format!("--admin-port={admin}"),
            "--admin-bind-address=127.0.0.1".into(),
            "--server-id=server-0".into(),
            "--server-count=1".into(),
            "--backend-dial-timeout=5s".into(),
        ];
        if self.agent_mtls {
            args.push(format!("--cluster-ca-cert={}", pki.ca.display()));
        }
        match (&uds, frontend_addr) {
            (Some(path), _) => {
                args.push(format!("--uds-name={}", path.display()));
                args.push("--server-port=0".into());
            }
            (None, Some(addr)) => {
                args.push(format!("--server-port={}", addr.port()));
                args.push("--server-bind-address=127.0.0.1".into());
                args.push(format!("--server-cert={}", pki.server.cert.display()));
                args.push(format!("--server-key={}", pki.server.key.display()));
                args.push(format!("--server-ca-cert={}", pki.ca.display()));
            }
            (None, None) => unreachable!("a frontend has a socket or an address"),
        }
        args.extend(self.server_args.iter().cloned());
        let mut launch =
            Launch::new(Role::Server, "server", dir.path()).args(args).health_port(health).admin_port(admin);
        if let Some(bin) = &self.binary {
            launch = launch.binary(bin);
        }
        let server = launch.spawn();
        let mut topology = Topology {
            server,
            agents: Vec::new(),
            frontend: self.frontend,
            uds,
            frontend_addr,
            agent_port,
            builder: self.clone(),
            pki,
            dir,
        };
        // Agents started before the server listens would only back off; wait for health.
        let timeout = self.ready_timeout;
        topology
            .server
            .wait_status("/healthz", 200, timeout)
            .await
            .unwrap_or_else(|e| panic!("server did not come up: {e}"));
        for _ in 0..self.agents {
            topology.add_agent(&[]);
        }
        topology.wait_agents(self.agents, timeout).await.unwrap_or_else(|e| panic!("{e}"));
        topology
    }
}

/// A running server and its agents.
pub struct Topology {
    /// The server (dropped first: its log prints before the dir goes).
    pub server: Konduit,
    /// The agents, in start order (`agent-0`, `agent-1`, …).
    pub agents: Vec<Konduit>,
    /// The server's frontend.
    pub frontend: Frontend,
    /// The frontend's unix socket, for UDS frontends.
    pub uds: Option<PathBuf>,
    /// The frontend's TCP address, for TLS frontends.
    pub frontend_addr: Option<SocketAddr>,
    /// The server's agent port.
    pub agent_port: u16,
    builder: TopologyBuilder,
    /// The run's certificates.
    pub pki: Pki,
    /// The run's directory (PKI, socket, logs).
    pub dir: TempDir,
}

impl Topology {
    /// A builder for a server with `frontend` and (by default) one agent.
    pub fn builder(frontend: Frontend) -> TopologyBuilder {
        TopologyBuilder {
            tag: "e2e".into(),
            frontend,
            agents: 1,
            agent_mtls: true,
            server_args: Vec::new(),
            agent_args: Vec::new(),
            server_sans: Vec::new(),
            binary: None,
            ready_timeout: READY_TIMEOUT,
        }
    }

    /// The launch of the next agent (`agent-<n>`) with the topology's flags plus `extra`,
    /// not yet spawned: for tests that need to adjust it.
    pub fn agent_launch(&self, extra: &[&str]) -> Launch {
        let n = self.agents.len();
        let (health, admin) = (free_port(), free_port());
        let mut args = vec![
            format!("--ca-cert={}", self.pki.ca.display()),
            "--proxy-server-host=127.0.0.1".into(),
            format!("--proxy-server-port={}", self.agent_port),
            format!("--agent-id=agent-{n}"),
            "--health-server-host=127.0.0.1".into(),
            format!("--health-server-port={health}"),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--admin-server-port={admin}"),
            "--dial-timeout=1s".into(),
            "--sync-interval=200ms".into(),
            "--sync-interval-cap=1s".into(),
        ];
        if self.builder.agent_mtls {
            args.push(format!("--agent-cert={}", self.pki.agent.cert.display()));
            args.push(format!("--agent-key={}", self.pki.agent.key.display()));
        }
        args.extend(self.builder.agent_args.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut launch = Launch::new(Role::Agent, &format!("agent-{n}"), self.dir.path())
            .args(args)
            .health_port(health)
            .admin_port(admin);
        if let Some(bin) = &self.builder.binary {
            launch = launch.binary(bin);
        }
        launch
    }

    /// Starts one more agent with `extra` flags (without waiting for it).
    pub fn add_agent(&mut self, extra: &[&str]) -> &mut Konduit {
        let agent = self.agent_launch(extra).spawn();
        self.agents.push(agent);
        self.agents.last_mut().expect("just pushed")
    }

    /// Waits until the first `n` agents report a session and the server is ready (for
    /// `n > 0`), and, where the server exports the stock gauge
    /// `konnectivity_network_proxy_server_ready_backend_connections`, until it counts `n`.
    pub async fn wait_agents(&mut self, n: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        for agent in self.agents.iter_mut().take(n) {
            agent.wait_ready(left()).await.map_err(|e| format!("agent not ready: {e}"))?;
        }
        if n == 0 {
            return Ok(());
        }
        self.server.wait_ready(left()).await.map_err(|e| format!("server not ready: {e}"))?;
        loop {
            let text = self.server.metrics().await;
            let gauge = metric(&text, "konnectivity_network_proxy_server_ready_backend_connections", &[]);
            match gauge {
                None => return Ok(()),
                Some(v) if v >= n as f64 => return Ok(()),
                Some(v) if Instant::now() >= deadline => {
                    return Err(format!("server counts {v} ready backend connections, expected {n}"));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// A gRPC client of the frontend (panics if the frontend is not gRPC or unreachable).
    pub async fn grpc(&self) -> ProxyClient {
        assert!(self.frontend.is_grpc(), "{:?} is not a gRPC frontend", self.frontend);
        let client = match (&self.uds, self.frontend_addr) {
            (Some(path), _) => clients::grpc_uds(path).await,
            (None, Some(addr)) => clients::grpc_tls(addr, &self.pki).await,
            (None, None) => unreachable!("a frontend has a socket or an address"),
        };
        client.unwrap_or_else(|e| panic!("connect gRPC frontend: {e:?}"))
    }

    /// HTTP-CONNECT to `target` through the frontend (UDS or TLS with the frontend client
    /// certificate). Panics if the frontend is not HTTP-CONNECT.
    pub async fn http_connect(&self, target: &str) -> Result<Box<dyn ByteStream>, ConnectError> {
        assert!(!self.frontend.is_grpc(), "{:?} is not an HTTP-CONNECT frontend", self.frontend);
        match (&self.uds, self.frontend_addr) {
            (Some(path), _) => Ok(Box::new(clients::http_connect_uds(path, target).await?)),
            (None, Some(addr)) => Ok(Box::new(clients::http_connect_tls(addr, &self.pki, target).await?)),
            (None, None) => unreachable!("a frontend has a socket or an address"),
        }
    }

    /// Prints every process's log (captured by the test harness; shown on failure).
    pub fn print_logs(&self) {
        self.server.print_log();
        for agent in &self.agents {
            agent.print_log();
        }
    }
}
