//! The health and admin HTTP endpoints: `/healthz` (alive), `/readyz` and
//! `/ready` (serving), `/metrics` (Prometheus text). Owns no state of its
//! own: readiness is a check supplied by the server or agent.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::error::{Error, Result, Side};

/// Answers "is this process ready to serve?"; `Err` carries the reason.
pub type ReadinessCheck = Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    ready: ReadinessCheck,
    not_ready_status: StatusCode,
}

/// What the endpoints serve.
pub struct AdminEndpoints {
    pub registry: Registry,
    pub ready: ReadinessCheck,
    /// Stock servers answer 500 when not ready, stock agents 503.
    pub not_ready_status: StatusCode,
}

impl AdminEndpoints {
    fn router(self) -> Router {
        let state = AdminState { registry: self.registry, ready: self.ready, not_ready_status: self.not_ready_status };
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/livez", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/ready", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(state)
    }

    /// Binds `addr` now (so a taken port fails start-up) and serves in the background.
    pub async fn serve(self, addr: SocketAddr, what: &'static str) -> Result<SocketAddr> {
        let listener =
            TcpListener::bind(addr).await.map_err(|e| Error::io(Side::Local, format!("bind {what} port {addr}"), e))?;
        let bound = listener.local_addr().map_err(|e| Error::io(Side::Local, "local_addr", e))?;
        let router = self.router();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, endpoint = what, "admin endpoint stopped");
            }
        });
        tracing::info!(%bound, endpoint = what, "serving /healthz /readyz /metrics");
        Ok(bound)
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match (state.ready)() {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(reason) => (state.not_ready_status, reason).into_response(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = Vec::new();
    let encoder = TextEncoder::new();
    match encoder.encode(&state.registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, encoder.format_type().to_owned())], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn readiness_follows_the_check_and_metrics_are_prometheus_text() {
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        let registry = Registry::new();
        let counter = prometheus::IntCounter::new("konduit_test_total", "test").expect("metric");
        registry.register(Box::new(counter.clone())).expect("register");
        counter.inc();
        let endpoints = AdminEndpoints {
            registry,
            ready: Arc::new(move || if flag.load(Ordering::SeqCst) { Ok(()) } else { Err("no agents".into()) }),
            not_ready_status: StatusCode::INTERNAL_SERVER_ERROR,
        };
        let addr = endpoints.serve("127.0.0.1:0".parse().expect("addr"), "health").await.expect("serve");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let not_ready = get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 500") && not_ready.ends_with("no agents"));
        ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").await.contains("konduit_test_total 1"));
    }
}
