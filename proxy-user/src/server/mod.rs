//! The proxy-server: the agent listener (gRPC over TLS), one frontend
//! (gRPC or HTTP-CONNECT, on a unix socket or TCP with mTLS), and the health
//! and admin endpoints, wired together from validated [`ServerArgs`].

pub mod agent_port;
pub mod agent_service;
pub mod grpc_frontend;
pub mod http_connect;
pub mod registry;
pub mod relay;
pub mod uds_authority;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::Server;

use crate::admin::AdminEndpoints;
use crate::config::{FrontendMode, ServerArgs, listen_addr};
use crate::error::Result;
use crate::metrics::ServerMetrics;
use crate::net;
use crate::protocol::Features;
use crate::protocol::pb::agent_service_server::AgentServiceServer;
use crate::protocol::pb::proxy_service_server::ProxyServiceServer;
use crate::shutdown::{Phase, Shutdown};
use crate::tls;
use registry::AgentRegistry;

/// HTTP/2 windows: big enough that one stream can fill a fast link.
const H2_STREAM_WINDOW: u32 = 8 << 20;
const H2_CONN_WINDOW: u32 = 32 << 20;

fn server_builder(keepalive: Duration) -> Server {
    Server::builder()
        .initial_stream_window_size(Some(H2_STREAM_WINDOW))
        .initial_connection_window_size(Some(H2_CONN_WINDOW))
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_nodelay(true)
}

/// Runs the server until `shutdown` says stop (or drains on SIGTERM).
pub async fn run(args: ServerArgs, shutdown: Shutdown) -> Result<()> {
    args.validate()?;
    for warning in args.unenforced() {
        tracing::warn!("{warning}");
    }
    let server_id = if args.server_id.is_empty() { crate::config::random_id() } else { args.server_id.clone() };
    let metrics = ServerMetrics::new();
    let registry = Arc::new(AgentRegistry::new(args.proxy_strategies.clone(), metrics.clone()));
    let dial_timeout = (!args.backend_dial_timeout.is_zero()).then_some(args.backend_dial_timeout);

    // Health and admin first, so probes answer while the rest starts.
    let ready_registry = registry.clone();
    let ready: crate::admin::ReadinessCheck = Arc::new(move || ready_registry.ready());
    for (addr, what) in [
        (listen_addr(&args.health_bind_address, args.health_port)?, "health"),
        (listen_addr(&args.admin_bind_address, args.admin_port)?, "admin"),
    ] {
        AdminEndpoints {
            registry: metrics.registry.clone(),
            ready: ready.clone(),
            not_ready_status: StatusCode::INTERNAL_SERVER_ERROR,
        }
        .serve(addr, what)
        .await?;
    }

    // Agent listener.
    let cluster_ca = (!args.cluster_ca_cert.is_empty()).then_some(args.cluster_ca_cert.as_str());
    let agent_tls = tls::server_config(
        &args.cluster_cert,
        &args.cluster_key,
        cluster_ca,
        &[tls::ALPN_H2, agent_port::ALPN_RELAY],
        &args.tls,
    )?;
    let agent_addr = listen_addr(&args.agent_bind_address, args.agent_port)?;
    let agent_listener = net::bind_tcp(agent_addr, "agent listener").await?;
    let agent_incoming = ReceiverStream::new(agent_port::incoming(agent_listener, agent_tls, registry.broker.clone()));
    let agent_service = agent_service::AgentServiceImpl {
        registry: registry.clone(),
        server_id: server_id.clone(),
        server_count: args.server_count,
        relay_address: (!args.relay_advertise_address.is_empty()).then(|| args.relay_advertise_address.clone()),
        offered: Features { relay: args.relay, ..Features::ALL },
        metrics: metrics.clone(),
    };
    let stop = shutdown.clone();
    let agents = tokio::spawn(
        server_builder(args.keepalive_time)
            .add_service(AgentServiceServer::new(agent_service))
            .serve_with_incoming_shutdown(agent_incoming, async move { stop.reached(Phase::Stopping).await }),
    );
    tracing::info!(%server_id, %agent_addr, mtls = cluster_ca.is_some(), "agent listener up");

    // Frontend.
    let drain = shutdown.clone();
    let frontend_stopped = async move { drain.reached(Phase::Draining).await };
    // Each arm yields the task that accepts new frontend connections; it stops
    // at SIGTERM (drain), while connections already accepted run on.
    let frontend: tokio::task::JoinHandle<()> = match args.mode {
        FrontendMode::Grpc => {
            let service = ProxyServiceServer::new(grpc_frontend::ProxyServiceImpl {
                registry: registry.clone(),
                dial_timeout,
                metrics: metrics.clone(),
            });
            let builder = server_builder(args.frontend_keepalive_time);
            if !args.uds_name.is_empty() {
                let listener = net::bind_unix(&args.uds_name, args.delete_existing_uds_file)?;
                tracing::info!(uds = %args.uds_name, "gRPC frontend up");
                let mut builder = builder;
                let router = builder.add_service(service);
                // Go clients send an :authority h2 rejects on unix sockets; see uds_authority.
                let incoming = UnixListenerStream::new(listener).map(|accepted| accepted.map(uds_authority::wrap));
                tokio::spawn(async move {
                    if let Err(e) = router.serve_with_incoming_shutdown(incoming, frontend_stopped).await {
                        tracing::error!(error = %e, "gRPC frontend stopped");
                    }
                })
            } else {
                let config = frontend_tls(&args, tls::ALPN_H2)?;
                let addr = listen_addr(&args.server_bind_address, args.server_port)?;
                let listener = net::bind_tcp(addr, "frontend").await?;
                tracing::info!(%addr, "gRPC frontend up (mTLS)");
                let incoming = ReceiverStream::new(net::tls_incoming(listener, config, "frontend"));
                let mut builder = builder;
                let router = builder.add_service(service);
                tokio::spawn(async move {
                    if let Err(e) = router.serve_with_incoming_shutdown(incoming, frontend_stopped).await {
                        tracing::error!(error = %e, "gRPC frontend stopped");
                    }
                })
            }
        }
        FrontendMode::HttpConnect => {
            let settings = Arc::new(http_connect::HttpConnectSettings {
                max_header_bytes: args.http_connect_max_header_bytes,
                header_timeout: args.http_connect_header_timeout,
                dial_timeout,
                kernel_splice: args.dataplane != crate::dataplane::engine::DataplaneMode::Userspace,
            });
            if !args.uds_name.is_empty() {
                let listener = net::bind_unix(&args.uds_name, args.delete_existing_uds_file)?;
                tracing::info!(uds = %args.uds_name, "HTTP-CONNECT frontend up");
                let (registry, metrics) = (registry.clone(), metrics.clone());
                let accept = async move {
                    loop {
                        let stream = match listener.accept().await {
                            Ok((stream, _)) => stream,
                            Err(e) => {
                                tracing::warn!(error = %e, "accept on frontend socket failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        let peer = stream
                            .peer_cred()
                            .map(|c| format!("uds pid={:?} uid={}", c.pid(), c.uid()))
                            .unwrap_or_else(|_| "uds".into());
                        let serve = http_connect::serve_connection(
                            stream,
                            peer,
                            registry.clone(),
                            settings.clone(),
                            metrics.clone(),
                        );
                        tokio::spawn(serve);
                    }
                };
                tokio::spawn(async move {
                    tokio::select! {
                        () = accept => {}
                        () = frontend_stopped => {}
                    }
                })
            } else {
                let config = frontend_tls(&args, tls::ALPN_HTTP1)?;
                let addr = listen_addr(&args.server_bind_address, args.server_port)?;
                let listener = net::bind_tcp(addr, "frontend").await?;
                tracing::info!(%addr, "HTTP-CONNECT frontend up (mTLS)");
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let (registry, metrics) = (registry.clone(), metrics.clone());
                let accept = net::accept_loop(listener, "frontend", move |stream, peer| {
                    let (acceptor, registry, settings, metrics) =
                        (acceptor.clone(), registry.clone(), settings.clone(), metrics.clone());
                    async move {
                        if let Some(tls) = net::tls_handshake(&acceptor, stream, peer, "frontend").await {
                            http_connect::serve_connection(tls, peer.to_string(), registry, settings, metrics).await;
                        }
                    }
                });
                tokio::spawn(async move {
                    frontend_stopped.await;
                    accept.abort();
                })
            }
        }
    };

    shutdown.reached(Phase::Draining).await;
    if shutdown.phase() == Phase::Draining && !args.graceful_shutdown_timeout.is_zero() {
        tracing::info!(timeout = ?args.graceful_shutdown_timeout, "draining: no new frontend connections; waiting for open ones");
        let deadline = tokio::time::Instant::now() + args.graceful_shutdown_timeout;
        while registry.sessions().iter().any(|s| s.connection_count() > 0) && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.reached(Phase::Stopping) => break,
            }
        }
    }
    frontend.abort();
    agents.abort();
    if !args.uds_name.is_empty() {
        let _ = std::fs::remove_file(&args.uds_name);
    }
    tracing::info!("server stopped");
    Ok(())
}

fn frontend_tls(args: &ServerArgs, alpn: &[u8]) -> Result<Arc<rustls::ServerConfig>> {
    tls::server_config(&args.server_cert, &args.server_key, Some(&args.server_ca_cert), &[alpn], &args.tls)
}
