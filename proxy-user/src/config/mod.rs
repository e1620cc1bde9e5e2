//! All configuration: command-line flags with the stock Konnectivity names and
//! meanings, klog-style logging flags, an optional YAML file whose keys are
//! flag names, and validation. The rest of konduit receives these typed
//! values and never reads flags or the environment itself.

mod klog;

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser};

pub use klog::KlogFlags;

use crate::error::{Error, Result};

/// Parses Go-style durations (`1h`, `30s`, `1m30s`, `500ms`, `0`).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Parses a byte count: a plain number or a size such as `4MiB`.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    s.parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|e| format!("invalid size {s:?}: {e}"))
}

/// Frontend protocol of the server (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
pub enum FrontendMode {
    #[value(name = "grpc")]
    Grpc,
    #[value(name = "http-connect")]
    HttpConnect,
}

/// How the server picks an agent for a dial (`--proxy-strategies`, in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyStrategy {
    /// Random among non-draining agents.
    Default,
    /// The agent whose identifiers name the dial host exactly.
    DestHost,
    /// Agents that advertise `default-route=true`.
    DefaultRoute,
    /// konduit: the agent whose `cidr` identifiers contain the dial host.
    Cidr,
}

fn parse_strategies(s: &str) -> std::result::Result<Vec<ProxyStrategy>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p {
            "default" => Ok(ProxyStrategy::Default),
            "destHost" => Ok(ProxyStrategy::DestHost),
            "defaultRoute" => Ok(ProxyStrategy::DefaultRoute),
            "cidr" => Ok(ProxyStrategy::Cidr),
            other => Err(format!("unknown proxy strategy {other:?} (expected default, destHost, defaultRoute, cidr)")),
        })
        .collect()
}

fn bind_ip(s: &str) -> Result<IpAddr> {
    if s.is_empty() {
        return Ok(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }
    s.parse().map_err(|_| Error::config(format!("bind address {s:?} is not an IP address")))
}

/// A listen address from a stock bind-address flag ("" = all interfaces) and port.
pub fn listen_addr(bind: &str, port: u16) -> Result<SocketAddr> {
    Ok(SocketAddr::new(bind_ip(bind)?, port))
}

/// `konduit server` / `proxy-server`.
#[derive(Debug, Clone, Parser)]
#[command(name = "proxy-server", version, args_override_self = true)]
pub struct ServerArgs {
    /// YAML file whose keys are flag names (e.g. `agent-port: 8132`); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Frontend protocol: grpc or http-connect.
    #[arg(long, value_enum, default_value = "grpc")]
    pub mode: FrontendMode,
    /// Serve the frontend on this unix socket (plaintext; file permissions guard it).
    #[arg(long, default_value = "")]
    pub uds_name: String,
    /// Remove a stale socket file before listening.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub delete_existing_uds_file: bool,
    /// Frontend TCP port (mTLS); must be 0 when --uds-name is set.
    #[arg(long, default_value_t = 8090)]
    pub server_port: u16,
    #[arg(long, default_value = "")]
    pub server_bind_address: String,
    /// Certificate of the TCP frontend.
    #[arg(long, default_value = "")]
    pub server_cert: String,
    #[arg(long, default_value = "")]
    pub server_key: String,
    /// CA that signs frontend client certificates (the TCP frontend always requires one).
    #[arg(long, default_value = "")]
    pub server_ca_cert: String,

    /// Agent listener port (gRPC over TLS).
    #[arg(long, default_value_t = 8091)]
    pub agent_port: u16,
    #[arg(long, default_value = "")]
    pub agent_bind_address: String,
    /// Certificate of the agent listener.
    #[arg(long, default_value = "")]
    pub cluster_cert: String,
    #[arg(long, default_value = "")]
    pub cluster_key: String,
    /// CA that signs agent client certificates; when set, agents must present one.
    #[arg(long, default_value = "")]
    pub cluster_ca_cert: String,

    /// Admin port: /metrics (and /healthz, /readyz).
    #[arg(long, default_value_t = 8095)]
    pub admin_port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_bind_address: String,
    /// Health port: /healthz, /readyz, /metrics.
    #[arg(long, default_value_t = 8092)]
    pub health_port: u16,
    #[arg(long, default_value = "")]
    pub health_bind_address: String,

    /// This server's id, sent to agents; default $PROXY_SERVER_ID or a random id.
    #[arg(long, env = "PROXY_SERVER_ID", default_value = "")]
    pub server_id: String,
    /// Number of servers behind the agents' server address.
    #[arg(long, default_value_t = 1)]
    pub server_count: u32,
    /// Ordered agent selection strategies: default, destHost, defaultRoute, cidr.
    #[arg(long, default_value = "default", value_parser = parse_strategies)]
    pub proxy_strategies: std::vec::Vec<ProxyStrategy>,
    /// Bound on waiting for an agent's DIAL_RSP (0 = no bound).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    pub backend_dial_timeout: Duration,
    /// Time to finish in-flight connections after SIGTERM (0 = stop at once).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    pub graceful_shutdown_timeout: Duration,
    /// HTTP/2 keepalive ping interval on the agent listener.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub keepalive_time: Duration,
    /// HTTP/2 keepalive ping interval on the frontend listener.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub frontend_keepalive_time: Duration,
    /// Largest HTTP-CONNECT request header, in bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    pub http_connect_max_header_bytes: usize,
    /// Deadline for a client to send its whole HTTP-CONNECT request header.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub http_connect_header_timeout: Duration,

    /// konduit: offer relay sockets (one raw socket per tunnelled connection) to konduit agents.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub relay: bool,
    /// konduit: host:port agents open relay sockets to, when it differs from the address they
    /// reached this server at (HA behind a load balancer: this server's own reachable address).
    #[arg(long, default_value = "")]
    pub relay_advertise_address: String,

    /// konduit: engine for spliced connections: auto, sockmap, userspace. On the server,
    /// auto and sockmap join an HTTP-CONNECT unix-socket frontend and a plaintext relay
    /// with splice(2) (no eBPF: the sockmap cannot splice unix sockets soundly, see the
    /// README); userspace copies them. TLS frontends and TLS relays are always copied.
    #[arg(long, value_enum, default_value = "auto")]
    pub dataplane: crate::dataplane::engine::DataplaneMode,

    // Token review of agents. Accepted so stock manifests start; see `unenforced`.
    #[arg(long, default_value = "")]
    pub agent_namespace: String,
    #[arg(long, default_value = "")]
    pub agent_service_account: String,
    #[arg(long, default_value = "")]
    pub authentication_audience: String,
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    #[arg(long, default_value_t = 0.0)]
    pub kubeconfig_qps: f32,
    #[arg(long, default_value_t = 0)]
    pub kubeconfig_burst: u32,
    #[arg(long, default_value = "application/vnd.kubernetes.protobuf")]
    pub kube_api_content_type: String,

    #[command(flatten)]
    pub stock_only: ServerStockOnlyFlags,
    #[command(flatten)]
    pub tls: TlsFlags,
    #[command(flatten)]
    pub klog: KlogFlags,
}

/// Stock server flags konduit accepts but does not act on; each is named at start-up.
#[derive(Debug, Clone, Args)]
pub struct ServerStockOnlyFlags {
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub enable_profiling: bool,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub enable_contention_profiling: bool,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub enable_lease_controller: bool,
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    #[arg(long, default_value = "k8s-app=konnectivity-server")]
    pub lease_label: String,
    /// Stock: receive channel depth. konduit sizes per-connection queues in bytes instead.
    #[arg(long, default_value_t = 10)]
    pub xfr_channel_size: u32,
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub warn_on_channel_limit: bool,
}

/// TLS policy flags shared by every listener.
#[derive(Debug, Clone, Args)]
pub struct TlsFlags {
    /// Allowed TLS 1.2 cipher suites (Go names); TLS 1.3 suites are always on.
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub cipher_suites: Vec<String>,
    /// Minimum TLS version: VersionTLS12 or VersionTLS13.
    #[arg(long, default_value = "")]
    pub tls_min_version: String,
}

/// `konduit agent` / `proxy-agent`.
#[derive(Debug, Clone, Parser)]
#[command(name = "proxy-agent", version, args_override_self = true)]
pub struct AgentArgs {
    /// YAML file whose keys are flag names; flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// CA bundle that signs the server's agent-listener certificate.
    #[arg(long, default_value = "")]
    pub ca_cert: String,
    /// Client certificate for mTLS to the server.
    #[arg(long, default_value = "")]
    pub agent_cert: String,
    #[arg(long, default_value = "")]
    pub agent_key: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub proxy_server_host: String,
    #[arg(long, default_value_t = 8091)]
    pub proxy_server_port: u16,
    /// Extra ALPN protocols to offer (h2 is always offered).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub alpn_proto: Vec<String>,

    #[arg(long, default_value = "")]
    pub health_server_host: String,
    /// Health port: /healthz, /readyz, /metrics.
    #[arg(long, default_value_t = 8093)]
    pub health_server_port: u16,
    /// Admin port: /metrics (and /healthz, /readyz).
    #[arg(long, default_value_t = 8094)]
    pub admin_server_port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub admin_bind_address: String,

    /// This agent's id; default $PROXY_AGENT_ID or a random id.
    #[arg(long, env = "PROXY_AGENT_ID", default_value = "")]
    pub agent_id: String,
    /// What this agent serves, URL-query form: host=…&ipv4=…&ipv6=…&cidr=…&default-route=true.
    #[arg(long, default_value = "")]
    pub agent_identifiers: String,
    /// File whose content is sent as `authorization: Bearer <token>`.
    #[arg(long, default_value = "")]
    pub service_account_token_path: String,

    /// Pause between connection attempts while all sessions are up.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub sync_interval: Duration,
    /// Cap of the jittered exponential backoff after failures.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub sync_interval_cap: Duration,
    /// Keep opening sessions even when connected to servercount servers.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub sync_forever: bool,
    /// HTTP/2 keepalive ping interval.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub keepalive_time: Duration,
    /// How often a session's liveness is checked.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub probe_interval: Duration,

    /// konduit: carry tunnelled bytes on relay sockets when the server offers them.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub relay: bool,
    /// konduit: destination ports whose traffic may use a plaintext relay socket (the payload
    /// is end-to-end TLS already, e.g. the kubelet's 10250, or the node network is trusted).
    /// Other ports use a TLS relay.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "10250")]
    pub relay_plaintext_ports: Vec<u16>,
    /// konduit: relay sockets kept open and authenticated ahead of dials, per server.
    #[arg(long, default_value_t = 8)]
    pub relay_pool_size: usize,

    /// konduit: engine for spliced connections: auto (sockmap when the eBPF program loads,
    /// else userspace with a warning), sockmap (or refuse to start), userspace.
    #[arg(long, value_enum, default_value = "auto")]
    pub dataplane: crate::dataplane::engine::DataplaneMode,
    /// konduit: with the sockmap engine, bytes each direction of one connection may have in
    /// flight in the kernel (redirected, not yet taken by the receiving socket); beyond it the
    /// connection continues through userspace until the reader catches up.
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    pub splice_max_lag: u64,
    /// konduit: the same, summed over every spliced connection on this node (at least twice
    /// --splice-max-lag: each connection has two directions). Connections beyond it move
    /// their bytes through userspace until credit frees up.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub splice_max_lag_total: u64,

    /// konduit: timeout for dialling a destination (stock: fixed 5s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// konduit: after SIGTERM, how long in-flight connections may finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub graceful_shutdown_timeout: Duration,

    #[command(flatten)]
    pub stock_only: AgentStockOnlyFlags,
    #[command(flatten)]
    pub tls: TlsFlags,
    #[command(flatten)]
    pub klog: KlogFlags,
}

/// Stock agent flags konduit accepts but does not act on; each is named at start-up.
#[derive(Debug, Clone, Args)]
pub struct AgentStockOnlyFlags {
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub enable_profiling: bool,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub enable_contention_profiling: bool,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub warn_on_channel_limit: bool,
    #[arg(long, default_value_t = 150)]
    pub xfr_channel_size: u32,
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub count_server_leases: bool,
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    #[arg(long, alias = "lease-label", default_value = "k8s-app=konnectivity-server")]
    pub lease_label_selector: String,
    #[arg(long, default_value = "default")]
    pub server_count_source: String,
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    #[arg(long, default_value = "application/vnd.kubernetes.protobuf")]
    pub kube_api_content_type: String,
}

/// Parses flags after merging the YAML file named by `--config` (flags win).
pub fn parse_with_file<P: Parser>(argv: Vec<OsString>) -> Result<P> {
    let first = P::try_parse_from(argv.clone()).map_err(clap_error)?;
    let Some(path) = config_path(&argv) else {
        return Ok(first);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::config(format!("read config file {}", path.display())).because(e))?;
    let from_file = yaml_to_flags(&text).map_err(|e| Error::config(format!("config file {}: {e}", path.display())))?;
    // File values come first so that any flag given on the command line overrides them.
    let mut merged = vec![argv[0].clone()];
    merged.extend(from_file.into_iter().map(OsString::from));
    merged.extend(argv.into_iter().skip(1));
    P::try_parse_from(merged).map_err(clap_error)
}

fn clap_error(e: clap::Error) -> Error {
    use clap::error::ErrorKind as K;
    if matches!(e.kind(), K::DisplayHelp | K::DisplayVersion) {
        // Help and version are answers, not failures.
        let _ = e.print();
        std::process::exit(0);
    }
    Error::config(e.to_string().trim_end().to_owned())
}

fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter().skip(1);
    while let Some(arg) = it.next() {
        let arg = arg.to_string_lossy();
        if let Some(v) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
        if arg == "--config" {
            return it.next().map(PathBuf::from);
        }
    }
    None
}

/// Turns `{agent-port: 8132, cipher-suites: [a, b]}` into `--agent-port=8132 --cipher-suites=a,b`.
pub fn yaml_to_flags(text: &str) -> std::result::Result<Vec<String>, String> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let serde_yaml::Value::Mapping(map) = value else {
        return Err("expected a mapping of flag names to values".into());
    };
    let mut flags = Vec::new();
    for (key, value) in map {
        let key = key.as_str().ok_or("flag names must be strings")?.to_owned();
        if key == "config" {
            return Err("a config file cannot name another config file".into());
        }
        let scalar = |v: &serde_yaml::Value| -> std::result::Result<String, String> {
            match v {
                serde_yaml::Value::String(s) => Ok(s.clone()),
                serde_yaml::Value::Bool(b) => Ok(b.to_string()),
                serde_yaml::Value::Number(n) => Ok(n.to_string()),
                _ => Err(format!("value of {key:?} must be a scalar or a list of scalars")),
            }
        };
        let rendered = match &value {
            serde_yaml::Value::Sequence(items) => {
                items.iter().map(scalar).collect::<std::result::Result<Vec<_>, _>>()?.join(",")
            }
            other => scalar(other)?,
        };
        flags.push(format!("--{key}={rendered}"));
    }
    Ok(flags)
}

fn check_port(name: &str, port: u16, allow_zero: bool) -> Result<()> {
    // Stock refuses ephemeral ports, which the kernel may hand to outgoing connections.
    if port > 49151 {
        return Err(Error::config(format!("--{name}={port} is in the ephemeral range (> 49151)")));
    }
    if port == 0 && !allow_zero {
        return Err(Error::config(format!("--{name} must be set")));
    }
    Ok(())
}

fn check_pair(cert_flag: &str, cert: &str, key_flag: &str, key: &str) -> Result<()> {
    if cert.is_empty() != key.is_empty() {
        return Err(Error::config(format!("--{cert_flag} and --{key_flag} must be set together")));
    }
    for (flag, path) in [(cert_flag, cert), (key_flag, key)] {
        if !path.is_empty() && !std::path::Path::new(path).exists() {
            return Err(Error::config(format!("--{flag}={path}: file does not exist")));
        }
    }
    Ok(())
}

impl ServerArgs {
    /// Stock's validation rules, with konduit's messages.
    pub fn validate(&self) -> Result<()> {
        check_port("agent-port", self.agent_port, false)?;
        check_port("admin-port", self.admin_port, false)?;
        check_port("health-port", self.health_port, false)?;
        check_port("server-port", self.server_port, !self.uds_name.is_empty())?;
        if !self.uds_name.is_empty() {
            if self.server_port != 0 {
                return Err(Error::config("--server-port must be 0 when --uds-name is set"));
            }
            if !(self.server_cert.is_empty() && self.server_key.is_empty() && self.server_ca_cert.is_empty()) {
                return Err(Error::config(
                    "--server-cert/--server-key/--server-ca-cert do not apply to --uds-name (unix sockets are plaintext)",
                ));
            }
        } else {
            if self.server_cert.is_empty() || self.server_ca_cert.is_empty() {
                return Err(Error::config(
                    "the TCP frontend requires mTLS: set --server-cert, --server-key and --server-ca-cert (or use --uds-name)",
                ));
            }
            check_pair("server-cert", &self.server_cert, "server-key", &self.server_key)?;
        }
        if self.cluster_cert.is_empty() {
            return Err(Error::config("--cluster-cert and --cluster-key are required (agent listener TLS)"));
        }
        check_pair("cluster-cert", &self.cluster_cert, "cluster-key", &self.cluster_key)?;
        for (flag, path) in [("server-ca-cert", &self.server_ca_cert), ("cluster-ca-cert", &self.cluster_ca_cert)] {
            if !path.is_empty() && !std::path::Path::new(path).exists() {
                return Err(Error::config(format!("--{flag}={path}: file does not exist")));
            }
        }
        if self.server_count == 0 {
            return Err(Error::config("--server-count must be at least 1"));
        }
        if self.proxy_strategies.is_empty() {
            return Err(Error::config("--proxy-strategies must name at least one strategy"));
        }
        let token_flags = [&self.agent_namespace, &self.agent_service_account, &self.authentication_audience];
        let set = token_flags.iter().filter(|f| !f.is_empty()).count();
        if set != 0 && set != token_flags.len() {
            return Err(Error::config(
                "--agent-namespace, --agent-service-account and --authentication-audience must be set together",
            ));
        }
        if set != 0 && !self.cluster_ca_cert.is_empty() {
            return Err(Error::config(
                "token authentication (--agent-namespace …) and --cluster-ca-cert are mutually exclusive",
            ));
        }
        if !self.kubeconfig.is_empty() && !std::path::Path::new(&self.kubeconfig).exists() {
            return Err(Error::config(format!("--kubeconfig={}: file does not exist", self.kubeconfig)));
        }
        if self.http_connect_max_header_bytes < 256 {
            return Err(Error::config("--http-connect-max-header-bytes must be at least 256"));
        }
        Ok(())
    }

    /// Flags accepted for compatibility that this build does not enforce or act on.
    pub fn unenforced(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.agent_namespace.is_empty() {
            out.push(format!(
                "agent token review (--agent-namespace={} --agent-service-account={} --authentication-audience={} --kubeconfig={}) is NOT enforced yet: any agent that completes TLS is accepted",
                self.agent_namespace, self.agent_service_account, self.authentication_audience, self.kubeconfig
            ));
        }
        let s = &self.stock_only;
        if s.enable_profiling || s.enable_contention_profiling {
            out.push("--enable-profiling: Go pprof endpoints have no konduit equivalent".into());
        }
        if s.enable_lease_controller {
            out.push("--enable-lease-controller: server leases are not published".into());
        }
        out
    }
}

impl AgentArgs {
    pub fn validate(&self) -> Result<()> {
        if self.ca_cert.is_empty() {
            return Err(Error::config("--ca-cert is required (CA of the server's agent-listener certificate)"));
        }
        if !std::path::Path::new(&self.ca_cert).exists() {
            return Err(Error::config(format!("--ca-cert={}: file does not exist", self.ca_cert)));
        }
        check_pair("agent-cert", &self.agent_cert, "agent-key", &self.agent_key)?;
        if self.proxy_server_port == 0 {
            return Err(Error::config("--proxy-server-port must be set"));
        }
        if self.health_server_port == 0 || self.admin_server_port == 0 {
            return Err(Error::config("--health-server-port and --admin-server-port must be set"));
        }
        if self.sync_interval_cap < self.sync_interval {
            return Err(Error::config("--sync-interval-cap must be at least --sync-interval"));
        }
        if self.dial_timeout.is_zero() {
            return Err(Error::config("--dial-timeout must be positive"));
        }
        // Below one loopback skb (64 KiB) every byte would take the valve's userspace path.
        // A connection has two directions, each with its own budget.
        if self.splice_max_lag < 64 * 1024 || self.splice_max_lag_total / 2 < self.splice_max_lag {
            return Err(Error::config(
                "--splice-max-lag must be at least 64KiB and --splice-max-lag-total at least twice --splice-max-lag",
            ));
        }
        crate::protocol::AgentIdentifiers::parse(&self.agent_identifiers)
            .map_err(|e| Error::config(format!("--agent-identifiers: {e}")))?;
        if !self.service_account_token_path.is_empty()
            && !std::path::Path::new(&self.service_account_token_path).exists()
        {
            return Err(Error::config(format!(
                "--service-account-token-path={}: file does not exist",
                self.service_account_token_path
            )));
        }
        Ok(())
    }

    pub fn unenforced(&self) -> Vec<String> {
        let s = &self.stock_only;
        let mut out = Vec::new();
        if s.enable_profiling || s.enable_contention_profiling {
            out.push("--enable-profiling: Go pprof endpoints have no konduit equivalent".into());
        }
        if s.count_server_leases {
            out.push("--count-server-leases: server count comes from the servercount header only".into());
        }
        out
    }
}

/// The loopback address, for defaults in tests and the demo.
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A random id in UUID form, the default server and agent id (as stock).
pub fn random_id() -> String {
    use rand::Rng;
    let bits: u128 = rand::rng().random();
    let hex = format!("{bits:032x}");
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn kubernetes_setup_task_server_args_parse() {
        let parsed: ServerArgs = parse_with_file(args(&[
            "proxy-server",
            "--logtostderr=true",
            "--uds-name=/tmp/k.sock",
            "--cluster-cert=/c.crt",
            "--cluster-key=/c.key",
            "--mode=grpc",
            "--server-port=0",
            "--agent-port=8132",
            "--admin-port=8133",
            "--health-port=8134",
            "--agent-namespace=kube-system",
            "--agent-service-account=konnectivity-agent",
            "--kubeconfig=/etc/kubernetes/konnectivity-server.conf",
            "--authentication-audience=system:konnectivity-server",
        ]))
        .expect("parses");
        assert_eq!(parsed.agent_port, 8132);
        assert_eq!(parsed.server_port, 0);
        assert_eq!(parsed.mode, FrontendMode::Grpc);
        assert!(parsed.delete_existing_uds_file);
        assert!(parsed.unenforced()[0].contains("NOT enforced"));
    }

    #[test]
    fn kubernetes_setup_task_agent_args_parse() {
        let parsed: AgentArgs = parse_with_file(args(&[
            "proxy-agent",
            "--logtostderr=true",
            "--ca-cert=/ca.crt",
            "--proxy-server-host=10.0.0.1",
            "--proxy-server-port=8132",
            "--admin-server-port=8133",
            "--health-server-port=8134",
            "--service-account-token-path=/t",
            "-v=3",
        ]))
        .expect("parses");
        assert_eq!(parsed.proxy_server_port, 8132);
        assert_eq!(parsed.klog.v, 3);
        assert_eq!(parsed.dial_timeout, Duration::from_secs(5));
        assert_eq!((parsed.splice_max_lag, parsed.splice_max_lag_total), (4 << 20, 256 << 20));
    }

    #[test]
    fn splice_lag_limits_take_sizes_and_reject_useless_values() {
        let agent = |extra: &[&str]| {
            let mut list = vec!["proxy-agent", "--proxy-server-port=8132"];
            list.extend_from_slice(extra);
            parse_with_file::<AgentArgs>(args(&list))
        };
        let parsed = agent(&["--splice-max-lag=1MiB", "--splice-max-lag-total=1073741824"]).expect("parses");
        assert_eq!((parsed.splice_max_lag, parsed.splice_max_lag_total), (1 << 20, 1 << 30));
        assert!(agent(&["--splice-max-lag=lots"]).is_err());
        let too_small = agent(&["--splice-max-lag=1KiB", "--ca-cert=/"]).expect("parses");
        assert!(too_small.validate().unwrap_err().to_string().contains("--splice-max-lag"));
        let one_direction = agent(&["--splice-max-lag=1MiB", "--splice-max-lag-total=1MiB", "--ca-cert=/"]);
        assert!(one_direction.expect("parses").validate().unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn go_style_booleans_and_durations() {
        let parsed: ServerArgs = parse_with_file(args(&[
            "proxy-server",
            "--delete-existing-uds-file=false",
            "--backend-dial-timeout=1m30s",
            "--proxy-strategies=destHost,default",
        ]))
        .expect("parses");
        assert!(!parsed.delete_existing_uds_file);
        assert_eq!(parsed.backend_dial_timeout, Duration::from_secs(90));
        assert_eq!(parsed.proxy_strategies, vec![ProxyStrategy::DestHost, ProxyStrategy::Default]);
        let bad = parse_with_file::<ServerArgs>(args(&["proxy-server", "--proxy-strategies=nearest"]));
        assert!(bad.unwrap_err().to_string().contains("unknown proxy strategy"));
    }

    #[test]
    fn yaml_file_sets_defaults_and_flags_override_it() {
        let dir = std::env::temp_dir().join(format!("konduit-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("server.yaml");
        std::fs::write(&file, "agent-port: 9000\nadmin-port: 9001\ncipher-suites: [A, B]\n").expect("write");
        let parsed: ServerArgs =
            parse_with_file(args(&["proxy-server", &format!("--config={}", file.display()), "--agent-port=9100"]))
                .expect("parses");
        assert_eq!(parsed.agent_port, 9100, "flag wins");
        assert_eq!(parsed.admin_port, 9001, "file applies");
        assert_eq!(parsed.tls.cipher_suites, vec!["A".to_string(), "B".to_string()]);
        std::fs::write(&file, "no-such-flag: 1\n").expect("write");
        let err = parse_with_file::<ServerArgs>(args(&["proxy-server", "--config", file.to_str().expect("utf8")]));
        assert!(err.is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn validation_rejects_what_stock_rejects() {
        let base = |extra: &[&str]| {
            let mut v = vec!["proxy-server", "--cluster-cert=Cargo.toml", "--cluster-key=Cargo.toml"];
            v.extend_from_slice(extra);
            parse_with_file::<ServerArgs>(args(&v)).expect("parses")
        };
        assert!(base(&["--uds-name=/x.sock"]).validate().unwrap_err().to_string().contains("server-port must be 0"));
        assert!(base(&[]).validate().unwrap_err().to_string().contains("requires mTLS"));
        assert!(base(&["--uds-name=/x", "--server-port=0", "--agent-port=60000"]).validate().is_err());
        assert!(base(&["--uds-name=/x", "--server-port=0", "--agent-namespace=a"]).validate().is_err());
        base(&["--uds-name=/x", "--server-port=0"]).validate().expect("valid");
    }
}
