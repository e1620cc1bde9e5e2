//! The proxy-agent: keeps one session per server (up to `servercount`),
//! reconnecting with jittered exponential backoff; serves dials on each;
//! drains on SIGTERM. Wired from validated [`AgentArgs`].

mod dialer;
mod relay;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use rand::Rng;

use crate::admin::AdminEndpoints;
use crate::config::{AgentArgs, listen_addr};
use crate::dataplane::engine::Dataplane;
use crate::dataplane::valve::ValveSettings;
use crate::error::Result;
use crate::metrics::AgentMetrics;
use crate::shutdown::{Phase, Shutdown};
use crate::tls;
use session::{SessionSettings, SessionState};

/// Jitter factor on every pause, so a fleet of agents does not reconnect in step.
const JITTER: f64 = 0.1;
/// Growth of the pause after each failed attempt.
const BACKOFF_FACTOR: f64 = 1.5;

fn jittered(d: Duration) -> Duration {
    d.mul_f64(1.0 + rand::rng().random_range(0.0..JITTER))
}

/// Exponential backoff between failed session attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap, current: base }
    }

    /// The pause after a failure (grows up to the cap).
    pub fn failed(&mut self) -> Duration {
        let pause = self.current;
        self.current = self.current.mul_f64(BACKOFF_FACTOR).min(self.cap);
        jittered(pause)
    }

    /// The pause after a success (resets growth).
    pub fn succeeded(&mut self) -> Duration {
        self.current = self.base;
        jittered(self.base)
    }
}

type Sessions = Arc<Mutex<HashMap<String, Arc<SessionState>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the agent until stopped, or until a drain finishes.
pub async fn run(args: AgentArgs, shutdown: Shutdown) -> Result<()> {
    args.validate()?;
    for warning in args.unenforced() {
        tracing::warn!("{warning}");
    }
    let agent_id = if args.agent_id.is_empty() { crate::config::random_id() } else { args.agent_id.clone() };
    let metrics = AgentMetrics::new();
    let sessions: Sessions = Arc::default();

    let ready_sessions = sessions.clone();
    let ready: crate::admin::ReadinessCheck = Arc::new(move || {
        if lock(&ready_sessions).is_empty() {
            Err("[+]ping ok\n[-]server-connected failed: no servers connected\n".into())
        } else {
            Ok(())
        }
    });
    for (addr, what) in [
        (listen_addr(&args.health_server_host, args.health_server_port)?, "health"),
        (listen_addr(&args.admin_bind_address, args.admin_server_port)?, "admin"),
    ] {
        AdminEndpoints {
            registry: metrics.registry.clone(),
            ready: ready.clone(),
            not_ready_status: StatusCode::SERVICE_UNAVAILABLE,
        }
        .serve(addr, what)
        .await?;
    }

    let identity = (!args.agent_cert.is_empty()).then_some((args.agent_cert.as_str(), args.agent_key.as_str()));
    let dataplane = Dataplane::start(
        args.dataplane,
        ValveSettings { per_direction: args.splice_max_lag, node: args.splice_max_lag_total },
    )?;
    if let Some(sockmap) = dataplane.sockmap() {
        crate::metrics::register_sockmap(&metrics.registry, sockmap.clone());
    }
    let settings = Arc::new(SessionSettings {
        host: args.proxy_server_host.clone(),
        port: args.proxy_server_port,
        tls: tls::client_config(&args.ca_cert, identity, &args.alpn_proto, &args.tls)?,
        agent_id: agent_id.clone(),
        identifiers: args.agent_identifiers.clone(),
        token_path: (!args.service_account_token_path.is_empty()).then(|| args.service_account_token_path.clone()),
        keepalive: args.keepalive_time,
        dial_timeout: args.dial_timeout,
        relay: args.relay,
        relay_plaintext_ports: args.relay_plaintext_ports.clone(),
        relay_pool_size: args.relay_pool_size,
        dataplane,
        metrics: metrics.clone(),
        draining: AtomicBool::new(false),
    });
    tracing::info!(%agent_id, server = %format!("{}:{}", args.proxy_server_host, args.proxy_server_port), "agent starting");

    let sync = tokio::spawn(sync_sessions(args.clone(), settings.clone(), sessions.clone(), shutdown.clone()));
    shutdown.reached(Phase::Draining).await;
    if shutdown.phase() == Phase::Draining {
        settings.draining.store(true, Ordering::Relaxed);
        drain(&sessions, args.graceful_shutdown_timeout, &shutdown).await;
    }
    sync.abort();
    tracing::info!("agent stopped");
    Ok(())
}

/// DRAIN every session, then wait for open connections to finish (bounded).
async fn drain(sessions: &Sessions, grace: Duration, shutdown: &Shutdown) {
    let open: Vec<_> = lock(sessions).values().cloned().collect();
    for s in &open {
        s.send_drain().await;
    }
    tracing::info!(sessions = open.len(), ?grace, "draining: DRAIN sent; finishing open connections");
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let remaining: usize = lock(sessions).values().map(|s| s.connection_count()).sum();
        if remaining == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(remaining, "grace period over; closing remaining connections");
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = shutdown.reached(Phase::Stopping) => break,
        }
    }
    for s in &open {
        s.flushed(Duration::from_secs(1)).await;
    }
    // The stream took the packets; give HTTP/2 a moment to put them on the wire.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Keeps one session per server: opens sessions until `servercount` distinct
/// servers are connected (or forever with --sync-forever).
async fn sync_sessions(args: AgentArgs, settings: Arc<SessionSettings>, sessions: Sessions, shutdown: Shutdown) {
    let mut backoff = Backoff::new(args.sync_interval, args.sync_interval_cap);
    let mut server_count: u32 = 1;
    loop {
        if shutdown.phase() >= Phase::Draining {
            return;
        }
        let connected = lock(&sessions).len();
        let pause = if args.sync_forever || connected < server_count as usize {
            match session::open(&settings).await {
                Ok(open) => {
                    server_count = open.server_count.max(1);
                    settings.metrics.known_server_count.set(i64::from(server_count));
                    let server_id = open.server_id.clone();
                    if lock(&sessions).contains_key(&server_id) {
                        // The load balancer sent us to a server we already have;
                        // try again without growing the backoff (as stock).
                        tracing::debug!(server = %server_id, "already connected to this server");
                        backoff.succeeded()
                    } else {
                        tracing::info!(server = %server_id, server_count, features = ?open.features, "session open");
                        let (state, serve) = open.serve(settings.clone());
                        lock(&sessions).insert(server_id.clone(), state);
                        settings.metrics.open_server_connections.inc();
                        let (sessions, metrics) = (sessions.clone(), settings.metrics.clone());
                        tokio::spawn(async move {
                            serve.await;
                            lock(&sessions).remove(&server_id);
                            metrics.open_server_connections.dec();
                        });
                        backoff.succeeded()
                    }
                }
                Err(e) => {
                    settings.metrics.server_connection_failures.with_label_values(&["to_server"]).inc();
                    let pause = backoff.failed();
                    tracing::warn!(error = %e.chain(), retry_in = ?pause, "cannot open a session");
                    pause
                }
            }
        } else {
            jittered(args.sync_interval)
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.reached(Phase::Draining) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_half_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(3));
        let pauses: Vec<_> = (0..5).map(|_| b.failed()).collect();
        assert!(pauses[0] >= Duration::from_secs(1) && pauses[0] < Duration::from_millis(1100));
        assert!(pauses[1] >= Duration::from_millis(1500) && pauses[1] < Duration::from_millis(1650));
        assert!(pauses[4] >= Duration::from_secs(3) && pauses[4] < Duration::from_millis(3300));
        let after = b.succeeded();
        assert!(after < Duration::from_millis(1100));
        assert!(b.failed() < Duration::from_millis(1100));
    }
}
