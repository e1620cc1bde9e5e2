//! Prometheus metrics of the server and the agent. Names follow stock
//! Konnectivity where the meaning is the same
//! (`konnectivity_network_proxy_{server,agent}_*`); konduit's own carry the
//! `konduit_` prefix. Each process owns one [`Registry`].

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::dataplane::EngineKind;
use crate::dataplane::sockmap::SockmapDataplane;

const SERVER: &str = "konnectivity_network_proxy_server";
const AGENT: &str = "konnectivity_network_proxy_agent";

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    // Names are static and unique per registry, so registration cannot clash.
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    metric
}

fn opts(prefix: &str, name: &str, help: &str) -> Opts {
    Opts::new(format!("{prefix}_{name}"), help)
}

fn counter_vec(r: &Registry, o: Opts, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(o, labels).expect("valid metric"))
}

fn gauge(r: &Registry, o: Opts) -> IntGauge {
    register(r, IntGauge::with_opts(o).expect("valid metric"))
}

fn gauge_vec(r: &Registry, o: Opts, labels: &[&str]) -> IntGaugeVec {
    register(r, IntGaugeVec::new(o, labels).expect("valid metric"))
}

fn histogram(r: &Registry, name: String, help: &str, buckets: Vec<f64>) -> Histogram {
    register(r, Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric"))
}

/// Per-engine connection and byte counts, shared by server and agent.
#[derive(Clone)]
pub struct DataplaneMetrics {
    pub connections: IntCounterVec,
    pub bytes: IntCounterVec,
    pub fallbacks: IntCounterVec,
    /// Bytes of spliced connections the valve moved in userspace (rule 7).
    pub valve_bytes: prometheus::IntCounter,
    /// Bytes the verdict cut off retransmitted segments it had seen before (rule 9).
    pub retransmit_trimmed_bytes: prometheus::IntCounter,
}

impl DataplaneMetrics {
    fn new(r: &Registry) -> Self {
        DataplaneMetrics {
            connections: counter_vec(
                r,
                Opts::new("konduit_dataplane_connections_total", "Tunnelled connections by engine"),
                &["engine"],
            ),
            bytes: counter_vec(
                r,
                Opts::new("konduit_dataplane_bytes_total", "Tunnelled bytes by engine and direction"),
                &["engine", "direction"],
            ),
            fallbacks: counter_vec(
                r,
                Opts::new("konduit_dataplane_fallbacks_total", "Connections that fell back from the preferred path"),
                &["reason"],
            ),
            valve_bytes: register(
                r,
                prometheus::IntCounter::with_opts(Opts::new(
                    "konduit_dataplane_valve_bytes_total",
                    "Bytes of kernel-spliced connections moved in userspace while their reader lagged",
                ))
                .expect("valid metric"),
            ),
            retransmit_trimmed_bytes: register(
                r,
                prometheus::IntCounter::with_opts(Opts::new(
                    "konduit_dataplane_retransmit_trimmed_bytes_total",
                    "Bytes of retransmitted segments the kernel data plane had already received and did not forward again",
                ))
                .expect("valid metric"),
            ),
        }
    }

    /// Records one finished connection.
    pub fn record(&self, engine: EngineKind, to_node: u64, from_node: u64) {
        self.connections.with_label_values(&[engine.as_str()]).inc();
        self.bytes.with_label_values(&[engine.as_str(), "to_node"]).inc_by(to_node);
        self.bytes.with_label_values(&[engine.as_str(), "from_node"]).inc_by(from_node);
    }
}

/// Server metrics (stock names).
#[derive(Clone)]
pub struct ServerMetrics {
    pub registry: Registry,
    pub dial_duration: Histogram,
    pub connection_duration: Histogram,
    pub grpc_connections: IntGaugeVec,
    pub http_connections: IntGauge,
    pub ready_backend_connections: IntGauge,
    pub ready_backends: IntGaugeVec,
    pub pending_backend_dials: IntGauge,
    pub established_connections: IntGauge,
    pub dial_failures: IntCounterVec,
    pub stream_packets: IntCounterVec,
    pub stream_errors: IntCounterVec,
    pub dataplane: DataplaneMetrics,
}

impl ServerMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let fast = vec![1e-6, 1e-5, 1e-4, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5];
        let long = vec![1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0];
        ServerMetrics {
            dial_duration: histogram(
                &r,
                format!("{SERVER}_dial_duration_seconds"),
                "Latency of dial to the remote endpoint in seconds",
                fast,
            ),
            connection_duration: histogram(
                &r,
                format!("{SERVER}_connection_duration_seconds"),
                "Duration of established tunnelled connections",
                long,
            ),
            grpc_connections: gauge_vec(
                &r,
                opts(SERVER, "grpc_connections", "Open gRPC streams by service method"),
                &["service_method"],
            ),
            http_connections: gauge(&r, opts(SERVER, "http_connections", "Open HTTP-CONNECT frontend connections")),
            ready_backend_connections: gauge(
                &r,
                opts(SERVER, "ready_backend_connections", "Connected agents (deprecated: see ready_backends)"),
            ),
            ready_backends: gauge_vec(
                &r,
                opts(SERVER, "ready_backends", "Agents available per proxy strategy"),
                &["proxy_strategy"],
            ),
            pending_backend_dials: gauge(
                &r,
                opts(SERVER, "pending_backend_dials", "Dials waiting for an agent's answer"),
            ),
            established_connections: gauge(
                &r,
                opts(SERVER, "established_connections", "Established tunnelled connections"),
            ),
            dial_failures: counter_vec(&r, opts(SERVER, "dial_failure_count", "Failed dials by reason"), &["reason"]),
            stream_packets: counter_vec(
                &r,
                opts(SERVER, "stream_packets_total", "Packets on gRPC streams"),
                &["segment", "packet_type"],
            ),
            stream_errors: counter_vec(
                &r,
                opts(SERVER, "stream_errors_total", "Errors on gRPC streams"),
                &["segment", "code", "packet_type"],
            ),
            dataplane: DataplaneMetrics::new(&r),
            registry: {
                register_process(&r);
                r
            },
        }
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Agent metrics (stock names).
#[derive(Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    pub dial_duration: Histogram,
    pub endpoint_dial_failures: IntCounterVec,
    pub open_server_connections: IntGauge,
    pub known_server_count: IntGauge,
    pub open_endpoint_connections: IntGauge,
    pub stream_packets: IntCounterVec,
    pub stream_errors: IntCounterVec,
    pub server_connection_failures: IntCounterVec,
    pub dataplane: DataplaneMetrics,
}

impl AgentMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        AgentMetrics {
            dial_duration: histogram(
                &r,
                format!("{AGENT}_dial_duration_seconds"),
                "Latency of dial to the remote endpoint in seconds",
                vec![0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0],
            ),
            endpoint_dial_failures: counter_vec(
                &r,
                opts(AGENT, "endpoint_dial_failure_total", "Failed dials to endpoints by reason"),
                &["reason"],
            ),
            open_server_connections: gauge(&r, opts(AGENT, "open_server_connections", "Open sessions to servers")),
            known_server_count: gauge(
                &r,
                opts(AGENT, "known_server_count", "Servers the agent knows of (servercount)"),
            ),
            open_endpoint_connections: gauge(
                &r,
                opts(AGENT, "open_endpoint_connections", "Open connections to endpoints"),
            ),
            stream_packets: counter_vec(
                &r,
                opts(AGENT, "stream_packets_total", "Packets on gRPC streams"),
                &["segment", "packet_type"],
            ),
            stream_errors: counter_vec(
                &r,
                opts(AGENT, "stream_errors_total", "Errors on gRPC streams"),
                &["segment", "code", "packet_type"],
            ),
            server_connection_failures: counter_vec(
                &r,
                opts(AGENT, "server_connection_failure_count", "Failed session attempts"),
                &["direction"],
            ),
            dataplane: DataplaneMetrics::new(&r),
            registry: {
                register_process(&r);
                r
            },
        }
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `process_*` metrics of this process (open fds, RSS, CPU), as Go processes export them.
fn register_process(r: &Registry) {
    if let Err(e) = r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())) {
        tracing::error!(error = %e, "process metrics registration failed");
    }
}

/// State of the loaded sockmap engine, read at each scrape: sockets in its
/// SockHash and node-wide valve credit not held by any connection. Both
/// return to their idle values (0, `--splice-max-lag-total`) when no
/// connection is spliced, which makes them leak checks as well.
#[derive(Clone)]
struct SockmapCollector {
    dataplane: Arc<SockmapDataplane>,
    sockets: IntGauge,
    credit: IntGauge,
}

impl Collector for SockmapCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.sockets.desc().into_iter().chain(self.credit.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match self.dataplane.occupancy() {
            Ok(o) => self.sockets.set(o.sockets as i64),
            Err(e) => tracing::warn!(error = %e, "reading the sockmap occupancy"),
        }
        self.credit.set(i64::try_from(self.dataplane.valve_credit_available()).unwrap_or(i64::MAX));
        self.sockets.collect().into_iter().chain(self.credit.collect()).collect()
    }
}

/// Exports the sockmap engine's state on `registry` (once, when it loaded).
pub fn register_sockmap(registry: &Registry, dataplane: Arc<SockmapDataplane>) {
    let gauge = |name: &str, help: &str| IntGauge::with_opts(Opts::new(name, help)).expect("valid metric");
    register(
        registry,
        SockmapCollector {
            dataplane,
            sockets: gauge("konduit_dataplane_spliced_sockets", "Sockets in the sockmap engine's SockHash"),
            credit: gauge(
                "konduit_dataplane_valve_credit_available_bytes",
                "Node-wide splice credit not held by any connection direction",
            ),
        },
    );
}

/// The stock `packet_type` label for a packet type number.
pub fn packet_type_label(kind: i32) -> &'static str {
    use crate::protocol::pb::PacketType;
    PacketType::try_from(kind).map(|t| t.as_str_name()).unwrap_or("Unknown")
}

/// Histogram buckets are labelled in seconds.
pub fn seconds(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}
