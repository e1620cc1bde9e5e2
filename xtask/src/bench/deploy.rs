//! The configurations under test and how each is brought up: direct TCP, a
//! konduit server + agent per frontend and data plane, or a relay peer
//! ([`super::peers`]). A configuration either runs, or is reported as not
//! available with the reason its process gave; numbers are never made up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::backends::Backends;
use super::gateway::{Gateway, Target, Targets};
use super::peers::Peer;
use super::pki::Pki;
use super::process::{ChildGuard, Ports};

/// konduit's frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// gRPC `/ProxyService/Proxy` on a unix socket.
    GrpcUds,
    /// HTTP-CONNECT on a unix socket.
    HttpConnectUds,
    /// HTTP-CONNECT on TCP with mTLS.
    HttpConnectTls,
}

impl Frontend {
    pub const ALL: [Frontend; 3] = [Frontend::GrpcUds, Frontend::HttpConnectUds, Frontend::HttpConnectTls];

    pub fn name(self) -> &'static str {
        match self {
            Frontend::GrpcUds => "grpc-uds",
            Frontend::HttpConnectUds => "connect-uds",
            Frontend::HttpConnectTls => "connect-mtls",
        }
    }
}

/// konduit's data plane (`--dataplane`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataplane {
    Userspace,
    Sockmap,
}

impl Dataplane {
    pub const ALL: [Dataplane; 2] = [Dataplane::Userspace, Dataplane::Sockmap];

    pub fn name(self) -> &'static str {
        match self {
            Dataplane::Userspace => "userspace",
            Dataplane::Sockmap => "sockmap",
        }
    }
}

/// One configuration under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    /// Client straight to the backend: the baseline of every ratio.
    Direct,
    Konduit(Frontend, Dataplane),
    Peer(Peer),
}

impl Config {
    /// Short, stable identifier (table rows, JSON keys, log file names).
    pub fn id(&self) -> String {
        match self {
            Config::Direct => "direct".into(),
            Config::Konduit(f, d) => format!("{}/{}", f.name(), d.name()),
            Config::Peer(p) => p.name().into(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Config::Direct => "client → backend over loopback TCP, no tunnel".into(),
            Config::Konduit(Frontend::GrpcUds, d) => {
                format!(
                    "konduit gRPC frontend on a unix socket (one single-use channel per tunnel), {} data plane",
                    d.name()
                )
            }
            Config::Konduit(Frontend::HttpConnectUds, d) => {
                format!("konduit HTTP-CONNECT on a unix socket, {} data plane", d.name())
            }
            Config::Konduit(Frontend::HttpConnectTls, d) => {
                format!("konduit HTTP-CONNECT on TCP with mTLS (no resumption), {} data plane", d.name())
            }
            Config::Peer(p) => p.describe().into(),
        }
    }

    pub fn is_konduit(&self) -> bool {
        matches!(self, Config::Konduit(..))
    }

    /// Every configuration, peers only when asked for.
    pub fn all(peers: bool) -> Vec<Config> {
        let mut all = vec![Config::Direct];
        for frontend in Frontend::ALL {
            for dataplane in Dataplane::ALL {
                all.push(Config::Konduit(frontend, dataplane));
            }
        }
        if peers {
            all.extend(Peer::ALL.into_iter().map(Config::Peer));
        }
        all
    }
}

/// A running configuration. Dropping it stops its processes.
pub struct Deployment {
    pub gateway: Gateway,
    /// Control-plane side processes (konduit server, sshd, rathole server, the single relays).
    pub server: Vec<ChildGuard>,
    /// Node side processes (konduit agent, ssh client, rathole client).
    pub agent: Vec<ChildGuard>,
    /// What a reader should know about how it ran.
    pub note: Option<String>,
}

impl Deployment {
    pub fn server_pids(&self) -> Vec<u32> {
        self.server.iter().map(ChildGuard::pid).collect()
    }

    pub fn agent_pids(&self) -> Vec<u32> {
        self.agent.iter().map(ChildGuard::pid).collect()
    }

    pub fn all_pids(&self) -> Vec<u32> {
        let mut pids = self.server_pids();
        pids.extend(self.agent_pids());
        pids
    }

    /// An error naming the first of its processes that has exited, and why.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for child in self.server.iter_mut().chain(self.agent.iter_mut()) {
            if let Some(status) = child.exited() {
                return Err(anyhow!("{}: {} ({status})", child.name, child.last_words()));
            }
        }
        Ok(())
    }

    pub fn stop(self) {
        for child in self.agent.into_iter().chain(self.server) {
            child.stop(Duration::from_secs(2));
        }
    }
}

/// What every start needs.
pub struct Env<'a> {
    pub binary: &'a Path,
    pub pki: &'a Pki,
    pub scratch: &'a Path,
    pub logs: &'a Path,
    pub backends: &'a Backends,
    pub tls: TlsConnector,
    /// RLIMIT_NOFILE of the bench and what it starts.
    pub fd_limit: u64,
}

impl Env<'_> {
    pub fn backend_targets(&self) -> Targets {
        Targets { bulk: self.backends.bulk, echo: self.backends.echo, one_byte: self.backends.tunnel }
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{}.log", name.replace('/', "-").replace(' ', "_")))
    }
}

/// Why a configuration does not run: its own words, for the report.
pub type Unavailable = String;

/// Brings up the direct baseline (nothing to start).
pub fn direct(env: &Env<'_>) -> Deployment {
    Deployment { gateway: Gateway::Tcp(env.backend_targets()), server: vec![], agent: vec![], note: None }
}

/// Starts a konduit server and agent for `frontend` with `dataplane`, and waits
/// until the server reports ready (agent connected) and a tunnel works.
pub async fn konduit(
    env: &Env<'_>,
    ports: &mut Ports,
    frontend: Frontend,
    dataplane: Dataplane,
) -> anyhow::Result<Result<Deployment, Unavailable>> {
    let mut last = String::new();
    for attempt in 0..3 {
        match konduit_once(env, ports, frontend, Some(dataplane)).await? {
            Ok(deployment) => return Ok(Ok(deployment)),
            Err(reason) if dataplane == Dataplane::Userspace && mentions_dataplane_flag(&reason) => {
                // A build from before the flag existed: userspace is its only data plane.
                let mut deployment = match konduit_once(env, ports, frontend, None).await? {
                    Ok(d) => d,
                    Err(reason) => return Ok(Err(reason)),
                };
                deployment.note = Some("this build has no --dataplane flag: ran its only data plane, userspace".into());
                return Ok(Ok(deployment));
            }
            // Another process took a port between our check and konduit's bind.
            Err(reason) if reason.contains("in use") && attempt < 2 => last = reason,
            Err(reason) => return Ok(Err(reason)),
        }
    }
    Ok(Err(last))
}

/// Whether the binary refused `--dataplane` itself (clap's wording), as a build
/// from before the flag does; any other failure is reported as it is.
fn mentions_dataplane_flag(reason: &str) -> bool {
    reason.contains("unexpected argument '--dataplane")
}

async fn konduit_once(
    env: &Env<'_>,
    ports: &mut Ports,
    frontend: Frontend,
    dataplane: Option<Dataplane>,
) -> anyhow::Result<Result<Deployment, Unavailable>> {
    let id = Config::Konduit(frontend, dataplane.unwrap_or(Dataplane::Userspace)).id();
    let file_id = id.replace('/', "-");
    let (agent_port, health, admin) = (ports.take()?, ports.take()?, ports.take()?);
    let (agent_health, agent_admin) = (ports.take()?, ports.take()?);
    let server_cert = env.pki.server.cert.display().to_string();
    let server_key = env.pki.server.key.display().to_string();
    let mut server = Command::new(env.binary);
    server.arg("server").args([
        format!("--agent-port={agent_port}"),
        "--agent-bind-address=127.0.0.1".into(),
        format!("--cluster-cert={server_cert}"),
        format!("--cluster-key={server_key}"),
        format!("--health-port={health}"),
        "--health-bind-address=127.0.0.1".into(),
        format!("--admin-port={admin}"),
        "--admin-bind-address=127.0.0.1".into(),
    ]);
    let targets = env.backend_targets();
    let gateway = match frontend {
        Frontend::GrpcUds | Frontend::HttpConnectUds => {
            let path = env.scratch.join(format!("{file_id}.sock"));
            let mode = if frontend == Frontend::GrpcUds { "grpc" } else { "http-connect" };
            server.args([format!("--mode={mode}"), format!("--uds-name={}", path.display()), "--server-port=0".into()]);
            if frontend == Frontend::GrpcUds {
                Gateway::GrpcUds { path, targets }
            } else {
                Gateway::HttpConnectUds { path, targets }
            }
        }
        Frontend::HttpConnectTls => {
            let port = ports.take()?;
            server.args([
                "--mode=http-connect".into(),
                format!("--server-port={port}"),
                "--server-bind-address=127.0.0.1".into(),
                format!("--server-cert={server_cert}"),
                format!("--server-key={server_key}"),
                format!("--server-ca-cert={}", env.pki.ca.display()),
            ]);
            Gateway::HttpConnectTls { addr: SocketAddr::from(([127, 0, 0, 1], port)), tls: env.tls.clone(), targets }
        }
    };
    let mut agent = Command::new(env.binary);
    agent.arg("agent").args([
        format!("--ca-cert={}", env.pki.ca.display()),
        "--proxy-server-host=127.0.0.1".into(),
        format!("--proxy-server-port={agent_port}"),
        "--health-server-host=127.0.0.1".into(),
        format!("--health-server-port={agent_health}"),
        format!("--admin-server-port={agent_admin}"),
        format!("--agent-id=bench-{file_id}"),
        // The backends' ports carry plaintext relays, as the kubelet's 10250 does by default.
        format!("--relay-plaintext-ports={},{},{}", targets.bulk.port(), targets.echo.port(), targets.one_byte.port()),
    ]);
    if let Some(d) = dataplane {
        server.arg(format!("--dataplane={}", d.name()));
        agent.arg(format!("--dataplane={}", d.name()));
    }
    let mut deployment = Deployment {
        gateway,
        server: vec![ChildGuard::spawn("server", server, &env.log(&format!("{id}-server")))?],
        agent: vec![],
        note: None,
    };
    // The server alone first: a flag it refuses is the reason to report.
    tokio::time::sleep(Duration::from_millis(150)).await;
    if let Err(e) = deployment.check_alive() {
        return Ok(Err(format!("{e:#}")));
    }
    deployment.agent.push(ChildGuard::spawn("agent", agent, &env.log(&format!("{id}-agent")))?);
    let ready = wait_until(Duration::from_secs(20), &mut deployment, |_| async move { readyz(health).await }).await;
    if let Err(e) = ready {
        return Ok(Err(format!("{e:#}")));
    }
    if let Err(e) = probe(&deployment.gateway).await {
        let why = match deployment.check_alive() {
            Err(dead) => format!("{dead:#}"),
            Ok(()) => format!("first tunnel failed: {e:#}"),
        };
        return Ok(Err(why));
    }
    Ok(Ok(deployment))
}

/// Polls `check` until it returns true, failing early when a process of the
/// deployment exits (with that process's own words).
pub async fn wait_until<F, Fut>(limit: Duration, deployment: &mut Deployment, check: F) -> anyhow::Result<()>
where
    F: Fn(&Gateway) -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        deployment.check_alive()?;
        if check(&deployment.gateway).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!("not ready after {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the server's /readyz on `port` answers 200.
async fn readyz(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        super::gateway::response_status(&answer)
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Ok(200)))
}

/// One tunnel end to end: one byte there and back.
pub async fn probe(gateway: &Gateway) -> anyhow::Result<()> {
    let attempt = async {
        let mut tunnel = gateway.open(Target::OneByte).await?;
        tunnel.write_all(b"p").await?;
        let mut byte = [0u8; 1];
        tunnel.read_exact(&mut byte).await?;
        anyhow::ensure!(&byte == b"p", "probe answered {byte:?}");
        let _ = tunnel.shutdown().await;
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.context("probe tunnel took over 10 s")?
}
