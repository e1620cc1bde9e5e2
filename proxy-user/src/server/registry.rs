//! Connected agents and their sessions: registration, routing a dial to an
//! agent by strategy, and per-session bookkeeping of pending dials and
//! established connections. Owns what the server knows about each agent; the
//! frontends only ask it to dial.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use crate::config::ProxyStrategy;
use crate::dataplane::flow::{DeliverError, Inbound, InboundQueue, SendWindow};
use crate::dataplane::packet_bridge::{CLOSE_RSP_WAIT, PacketLink, Role};
use crate::error::{Error, ErrorKind, Side};
use crate::metrics::ServerMetrics;
use crate::protocol::identifiers::dial_host;
use crate::protocol::pb::Packet;
use crate::protocol::relay::Token;
use crate::protocol::{AgentIdentifiers, Features, PacketKind};

use super::relay::{RelayBroker, RelaySocket};

/// How long a dial waits for its relay socket after a relayed DIAL_RSP
/// (the agent answers only after the server's verdict, so it is normally there).
const RELAY_ARRIVAL_WAIT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections leaves the
    // maps consistent (single inserts/removes), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One agent's gRPC session with this server.
pub struct AgentSession {
    pub agent_id: String,
    pub identifiers: AgentIdentifiers,
    /// konduit extensions both sides speak on this session.
    pub features: Features,
    /// Unique per session, to tell two sessions of the same agent id apart.
    pub session_no: u64,
    /// The key this session's relay sockets present, when the agent speaks the relay extension.
    pub relay_key: Option<Token>,
    broker: Arc<RelayBroker>,
    outbound: mpsc::Sender<Packet>,
    draining: AtomicBool,
    pending: Mutex<HashMap<i64, oneshot::Sender<DialOutcome>>>,
    conns: Mutex<HashMap<i64, ConnEntry>>,
    metrics: ServerMetrics,
}

struct ConnEntry {
    inbound: InboundQueue,
    window: Option<Arc<SendWindow>>,
}

/// An agent's answer to a dial.
enum DialOutcome {
    Connected(Tunnel),
    /// Connected; the bytes travel on the relay socket that presents the ticket.
    Relayed(i64),
    Failed(String),
    /// The agent cancelled the dial (DIAL_CLS) or its session ended.
    Closed(String),
}

/// An established tunnelled connection through one agent.
pub struct Tunnel {
    pub connect_id: i64,
    pub leg: Leg,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let leg = match self.leg {
            Leg::Packets(_) => "packets",
            Leg::Relay(_) => "relay",
        };
        f.debug_struct("Tunnel").field("connect_id", &self.connect_id).field("leg", &leg).finish()
    }
}

/// How a tunnelled connection's bytes reach the agent.
pub enum Leg {
    /// DATA packets on the agent's gRPC stream.
    Packets(PacketLeg),
    /// A relay socket of its own (konduit agents).
    Relay(RelaySocket),
}

/// The DATA-packet leg of a connection.
pub struct PacketLeg {
    pub inbound: mpsc::UnboundedReceiver<Inbound>,
    pub window: Option<Arc<SendWindow>>,
    pub to_agent: mpsc::Sender<Packet>,
    pub half_close: bool,
}

impl PacketLeg {
    /// The packet leg for the data plane.
    pub fn into_link(self, connect_id: i64) -> PacketLink {
        PacketLink {
            connect_id,
            to_peer: self.to_agent,
            from_peer: self.inbound,
            send_window: self.window,
            half_close: self.half_close,
            role: Role::Server,
        }
    }
}

/// Why a dial did not produce a tunnel; the frontend turns it into a status.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("No agent available")]
    NoAgent,
    /// The agent tried and failed; the text is the agent's.
    #[error("{0}")]
    Agent(String),
    #[error("timed out waiting for backend dial")]
    Timeout,
    #[error("{0}")]
    Closed(String),
}

impl From<DialError> for Error {
    fn from(e: DialError) -> Error {
        let (side, kind) = match &e {
            DialError::NoAgent => (Side::Local, ErrorKind::NoAgent),
            DialError::Agent(_) => (Side::Backend, ErrorKind::Refused),
            DialError::Timeout => (Side::Agent, ErrorKind::Timeout),
            DialError::Closed(_) => (Side::Agent, ErrorKind::Closed),
        };
        Error::new(side, kind, e.to_string())
    }
}

/// What to dial.
#[derive(Debug, Clone)]
pub struct DialSpec {
    pub protocol: String,
    pub address: String,
    /// The frontend's id for this dial (echoed in DIAL_RSP).
    pub random: i64,
    /// Whether the frontend can express half-close (HTTP-CONNECT can, gRPC cannot).
    pub half_close: bool,
}

impl DialSpec {
    pub fn tcp(address: impl Into<String>, half_close: bool) -> Self {
        DialSpec { protocol: "tcp".into(), address: address.into(), random: rand::rng().random::<i64>(), half_close }
    }
}

/// Withdraws an unused relay ticket when its dial ends.
struct TicketGuard<'a> {
    broker: &'a RelayBroker,
    ticket: Token,
}

impl Drop for TicketGuard<'_> {
    fn drop(&mut self) {
        self.broker.withdraw(&self.ticket);
    }
}

/// Removes a pending dial when the waiting frontend goes away first, and
/// tells the agent to stop (DIAL_CLS).
struct PendingGuard<'a> {
    session: &'a AgentSession,
    random: i64,
    armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.session.metrics.pending_backend_dials.dec();
        if self.armed && lock(&self.session.pending).remove(&self.random).is_some() {
            let cancel = PacketKind::DialClose { random: self.random }.into_packet();
            let _ = self.session.outbound.try_send(cancel);
        }
    }
}

impl AgentSession {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Queues a packet for the agent; fails when the session has ended.
    pub async fn send(&self, packet: Packet) -> Result<(), DialError> {
        self.outbound.send(packet).await.map_err(|_| DialError::Closed("agent session ended".into()))
    }

    /// Asks the agent to dial and waits for its answer.
    pub async fn dial(&self, spec: &DialSpec, timeout: Option<Duration>) -> Result<Tunnel, DialError> {
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(spec.random, tx);
        self.metrics.pending_backend_dials.inc();
        let mut guard = PendingGuard { session: self, random: spec.random, armed: true };
        let relay = self.relay_key.map(|_| self.broker.issue(self.session_no));
        let _ticket_guard = relay.as_ref().map(|(ticket, _)| TicketGuard { broker: &self.broker, ticket: *ticket });
        let request = PacketKind::DialRequest {
            protocol: spec.protocol.clone(),
            address: spec.address.clone(),
            random: spec.random,
            relay_ticket: relay.as_ref().map(|(t, _)| Bytes::copy_from_slice(&t.0)).unwrap_or_default(),
            half_close: spec.half_close && self.features.half_close,
        };
        self.send(request.into_packet()).await?;
        let answer = match timeout {
            Some(t) if !t.is_zero() => match tokio::time::timeout(t, rx).await {
                Ok(answer) => answer,
                Err(_) => {
                    self.metrics.dial_failures.with_label_values(&["backend_dial_timeout"]).inc();
                    return Err(DialError::Timeout);
                }
            },
            _ => rx.await,
        };
        guard.armed = false;
        match answer {
            Ok(DialOutcome::Connected(tunnel)) => {
                self.metrics.dial_duration.observe(started.elapsed().as_secs_f64());
                Ok(tunnel)
            }
            Ok(DialOutcome::Relayed(connect_id)) => {
                let arrived = match relay {
                    Some((_, rx)) => tokio::time::timeout(RELAY_ARRIVAL_WAIT, rx).await.ok().and_then(Result::ok),
                    None => None,
                };
                match arrived {
                    Some(socket) => {
                        self.metrics.dial_duration.observe(started.elapsed().as_secs_f64());
                        Ok(Tunnel { connect_id, leg: Leg::Relay(socket) })
                    }
                    None => {
                        self.metrics.dial_failures.with_label_values(&["relay_missing"]).inc();
                        let _ = self.send(PacketKind::CloseRequest { connect_id }.into_packet()).await;
                        Err(DialError::Closed("agent reported a relayed connection but no relay socket arrived".into()))
                    }
                }
            }
            Ok(DialOutcome::Failed(e)) => {
                self.metrics.dial_failures.with_label_values(&["error_response"]).inc();
                Err(DialError::Agent(e))
            }
            Ok(DialOutcome::Closed(e)) => {
                self.metrics.dial_failures.with_label_values(&["backend_close"]).inc();
                Err(DialError::Closed(e))
            }
            Err(_) => {
                self.metrics.dial_failures.with_label_values(&["backend_close"]).inc();
                Err(DialError::Closed("agent session ended".into()))
            }
        }
    }

    /// Forgets a connection whose frontend is gone; if the agent never
    /// answers our CLOSE_REQ, the entry still goes after [`CLOSE_RSP_WAIT`].
    pub fn release(self: &Arc<Self>, connect_id: i64) {
        // Most connections end with the agent's CLOSE_RSP, which already removed
        // the entry: no timer for those (this runs once per tunnel).
        if !lock(&self.conns).contains_key(&connect_id) {
            return;
        }
        let session = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_RSP_WAIT).await;
            if let Some(s) = session.upgrade() {
                s.remove_conn(connect_id);
            }
        });
    }

    fn remove_conn(&self, connect_id: i64) -> Option<ConnEntry> {
        let removed = lock(&self.conns).remove(&connect_id);
        if removed.is_some() {
            self.metrics.established_connections.dec();
        }
        removed
    }

    /// Number of established connections (for tests and drain).
    pub fn connection_count(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Handles one packet from the agent. Errors concern only the packet's
    /// own connection; the session goes on.
    pub async fn handle_from_agent(&self, kind: PacketKind) {
        match kind {
            PacketKind::DialResponse { random, connect_id, error, relayed } => {
                let waiter = lock(&self.pending).remove(&random);
                let Some(waiter) = waiter else {
                    if error.is_none() && connect_id != 0 {
                        // The frontend gave up; the agent must not keep the connection.
                        tracing::debug!(agent = %self.agent_id, random, connect_id, "dial answer after the frontend left; closing");
                        let _ = self.send(PacketKind::CloseRequest { connect_id }.into_packet()).await;
                    }
                    return;
                };
                let outcome = match error {
                    Some(e) => DialOutcome::Failed(e),
                    None if relayed => DialOutcome::Relayed(connect_id),
                    None => {
                        let (inbound, rx) = InboundQueue::new(self.features.flow_control);
                        let window = self.features.flow_control.then(|| Arc::new(SendWindow::default()));
                        lock(&self.conns).insert(connect_id, ConnEntry { inbound, window: window.clone() });
                        self.metrics.established_connections.inc();
                        DialOutcome::Connected(Tunnel {
                            connect_id,
                            leg: Leg::Packets(PacketLeg {
                                inbound: rx,
                                window,
                                to_agent: self.outbound.clone(),
                                half_close: self.features.half_close,
                            }),
                        })
                    }
                };
                match waiter.send(outcome) {
                    Err(DialOutcome::Connected(t)) => {
                        self.remove_conn(t.connect_id);
                        let _ = self.send(PacketKind::CloseRequest { connect_id: t.connect_id }.into_packet()).await;
                    }
                    Err(DialOutcome::Relayed(connect_id)) => {
                        let _ = self.send(PacketKind::CloseRequest { connect_id }.into_packet()).await;
                    }
                    _ => {}
                }
            }
            PacketKind::Data { connect_id, data, eof, .. } => {
                let queue = lock(&self.conns).get(&connect_id).map(|c| c.inbound.clone());
                let Some(queue) = queue else {
                    tracing::warn!(agent = %self.agent_id, connect_id, "DATA for unknown connectID; asking the agent to close it");
                    let _ = self.send(PacketKind::CloseRequest { connect_id }.into_packet()).await;
                    return;
                };
                let delivered = if data.is_empty() { Ok(()) } else { queue.deliver(data).await };
                let delivered = delivered.and_then(|()| if eof { queue.signal(Inbound::Eof) } else { Ok(()) });
                match delivered {
                    Ok(()) | Err(DeliverError::Gone) => {}
                    Err(e @ DeliverError::WindowExceeded { .. }) => {
                        tracing::warn!(agent = %self.agent_id, connect_id, error = %e, "agent broke flow control; closing that connection");
                        if let Some(entry) = self.remove_conn(connect_id) {
                            let _ = entry.inbound.signal(Inbound::Close(Some(e.to_string())));
                        }
                        let _ = self.send(PacketKind::CloseRequest { connect_id }.into_packet()).await;
                    }
                }
            }
            PacketKind::CloseResponse { connect_id, error } => {
                if let Some(entry) = self.remove_conn(connect_id) {
                    let _ = entry.inbound.signal(Inbound::Close(error));
                }
            }
            PacketKind::DialClose { random } => {
                if let Some(waiter) = lock(&self.pending).remove(&random) {
                    let _ = waiter.send(DialOutcome::Closed("agent closed the dial".into()));
                }
            }
            PacketKind::Drain => {
                tracing::info!(agent = %self.agent_id, "agent is draining");
                self.draining.store(true, Ordering::Relaxed);
            }
            PacketKind::WindowUpdate { connect_id, bytes } => {
                if let Some(window) = lock(&self.conns).get(&connect_id).and_then(|c| c.window.clone()) {
                    window.grant(bytes);
                }
            }
            other @ (PacketKind::DialRequest { .. } | PacketKind::CloseRequest { .. }) => {
                tracing::warn!(agent = %self.agent_id, packet = ?other, "agent sent a packet only frontends may send; ignored");
            }
        }
    }

    /// The session ended: every pending dial fails, every connection closes.
    fn fail_all(&self, reason: &str) {
        for (_, waiter) in lock(&self.pending).drain() {
            let _ = waiter.send(DialOutcome::Closed(reason.to_owned()));
        }
        let conns: Vec<_> = lock(&self.conns).drain().collect();
        self.metrics.established_connections.sub(conns.len() as i64);
        for (_, entry) in conns {
            let _ = entry.inbound.signal(Inbound::Close(Some(reason.to_owned())));
            if let Some(w) = entry.window {
                w.close();
            }
        }
    }
}

/// All connected agents.
pub struct AgentRegistry {
    sessions: Mutex<Vec<Arc<AgentSession>>>,
    pub broker: Arc<RelayBroker>,
    strategies: Vec<ProxyStrategy>,
    next_session: AtomicU64,
    metrics: ServerMetrics,
}

impl AgentRegistry {
    pub fn new(strategies: Vec<ProxyStrategy>, metrics: ServerMetrics) -> Self {
        for s in ["default", "destHost", "defaultRoute", "cidr"] {
            metrics.ready_backends.with_label_values(&[s]).set(0);
        }
        metrics.ready_backend_connections.set(0);
        AgentRegistry {
            sessions: Mutex::new(Vec::new()),
            broker: Arc::new(RelayBroker::default()),
            strategies,
            next_session: AtomicU64::new(1),
            metrics,
        }
    }

    /// Adds a session; the returned guard removes it (and fails its work) on drop.
    pub fn register(
        self: &Arc<Self>,
        agent_id: String,
        identifiers: AgentIdentifiers,
        features: Features,
        outbound: mpsc::Sender<Packet>,
    ) -> SessionGuard {
        let session_no = self.next_session.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(AgentSession {
            agent_id,
            identifiers,
            features,
            session_no,
            relay_key: features.relay.then(|| self.broker.open_session(session_no)),
            broker: self.broker.clone(),
            outbound,
            draining: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            metrics: self.metrics.clone(),
        });
        lock(&self.sessions).push(session.clone());
        self.update_gauges();
        SessionGuard { registry: self.clone(), session }
    }

    fn update_gauges(&self) {
        let sessions = lock(&self.sessions);
        self.metrics.ready_backend_connections.set(sessions.len() as i64);
        self.metrics.ready_backends.with_label_values(&["default"]).set(sessions.len() as i64);
        let dest = sessions
            .iter()
            .filter(|s| {
                !s.identifiers.hosts.is_empty() || !s.identifiers.ipv4.is_empty() || !s.identifiers.ipv6.is_empty()
            })
            .count();
        self.metrics.ready_backends.with_label_values(&["destHost"]).set(dest as i64);
        let dr = sessions.iter().filter(|s| s.identifiers.default_route).count();
        self.metrics.ready_backends.with_label_values(&["defaultRoute"]).set(dr as i64);
        let cidr = sessions.iter().filter(|s| !s.identifiers.cidrs.is_empty()).count();
        self.metrics.ready_backends.with_label_values(&["cidr"]).set(cidr as i64);
    }

    /// Ready when the first strategy has at least one agent (as stock).
    pub fn ready(&self) -> Result<(), String> {
        let sessions = lock(&self.sessions);
        let first = self.strategies.first().copied().unwrap_or(ProxyStrategy::Default);
        if sessions.iter().any(|s| Self::serves(first, s, None)) {
            Ok(())
        } else {
            Err("no connection to any proxy agent".into())
        }
    }

    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub fn sessions(&self) -> Vec<Arc<AgentSession>> {
        lock(&self.sessions).clone()
    }

    fn serves(strategy: ProxyStrategy, s: &AgentSession, host: Option<&str>) -> bool {
        match strategy {
            ProxyStrategy::Default => true,
            ProxyStrategy::DefaultRoute => s.identifiers.default_route,
            ProxyStrategy::DestHost => match host {
                Some(h) => s.identifiers.matches_host(h),
                None => {
                    !(s.identifiers.hosts.is_empty() && s.identifiers.ipv4.is_empty() && s.identifiers.ipv6.is_empty())
                }
            },
            ProxyStrategy::Cidr => match host {
                Some(h) => s.identifiers.matches_cidr(h),
                None => !s.identifiers.cidrs.is_empty(),
            },
        }
    }

    /// Picks an agent for `address`: strategies in order; within one, a
    /// random non-draining agent, else a draining one.
    pub fn pick(&self, address: &str) -> Option<Arc<AgentSession>> {
        let host = dial_host(address);
        let sessions = lock(&self.sessions);
        let mut rng = rand::rng();
        for strategy in &self.strategies {
            let candidates: Vec<&Arc<AgentSession>> =
                sessions.iter().filter(|s| Self::serves(*strategy, s, Some(host))).collect();
            if candidates.is_empty() {
                continue;
            }
            let fresh: Vec<_> = candidates.iter().filter(|s| !s.is_draining()).collect();
            let pool: Vec<&Arc<AgentSession>> =
                if fresh.is_empty() { candidates.clone() } else { fresh.into_iter().copied().collect() };
            return Some(pool[rng.random_range(0..pool.len())].clone());
        }
        None
    }
}

/// Keeps a session registered while its stream lives.
pub struct SessionGuard {
    registry: Arc<AgentRegistry>,
    pub session: Arc<AgentSession>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        lock(&self.registry.sessions).retain(|s| !Arc::ptr_eq(s, &self.session));
        self.registry.update_gauges();
        if let Some(key) = &self.session.relay_key {
            self.registry.broker.close_session(key);
        }
        self.session.fail_all("agent session ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(strategies: Vec<ProxyStrategy>) -> Arc<AgentRegistry> {
        Arc::new(AgentRegistry::new(strategies, ServerMetrics::new()))
    }

    fn add(r: &Arc<AgentRegistry>, id: &str, ids: &str) -> (SessionGuard, mpsc::Receiver<Packet>) {
        let (tx, rx) = mpsc::channel(16);
        let ids = AgentIdentifiers::parse(ids).expect("ids");
        (r.register(id.into(), ids, Features::ALL, tx), rx)
    }

    #[test]
    fn strategies_are_tried_in_order() {
        let r = registry(vec![ProxyStrategy::DestHost, ProxyStrategy::DefaultRoute]);
        let (_a, _ra) = add(&r, "a", "host=node-a");
        let (_b, _rb) = add(&r, "b", "default-route=true");
        assert_eq!(r.pick("node-a:10250").expect("a").agent_id, "a");
        assert_eq!(r.pick("10.1.1.1:80").expect("b").agent_id, "b");
        let only_dest = registry(vec![ProxyStrategy::DestHost]);
        let (_c, _rc) = add(&only_dest, "c", "host=node-c");
        assert!(only_dest.pick("node-x:1").is_none());
    }

    #[test]
    fn draining_agents_are_used_only_when_nothing_else_is_left() {
        let r = registry(vec![ProxyStrategy::Default]);
        let (a, _ra) = add(&r, "a", "");
        let (_b, _rb) = add(&r, "b", "");
        a.session.draining.store(true, Ordering::Relaxed);
        for _ in 0..20 {
            assert_eq!(r.pick("x:1").expect("some").agent_id, "b");
        }
        drop(_b);
        assert_eq!(r.pick("x:1").expect("draining one").agent_id, "a");
    }

    #[test]
    fn readiness_and_removal_follow_the_session_guard() {
        let r = registry(vec![ProxyStrategy::Default]);
        assert!(r.ready().is_err());
        let (a, _ra) = add(&r, "a", "");
        assert!(r.ready().is_ok());
        drop(a);
        assert!(r.ready().is_err());
        assert_eq!(r.session_count(), 0);
    }

    #[tokio::test]
    async fn dial_answer_creates_a_tunnel_and_session_end_fails_pending_dials() {
        let r = registry(vec![ProxyStrategy::Default]);
        let (guard, mut to_agent) = add(&r, "a", "");
        let session = guard.session.clone();
        let spec = DialSpec::tcp("127.0.0.1:80", true);
        let random = spec.random;
        let s = session.clone();
        let dial = tokio::spawn(async move { s.dial(&spec, None).await });
        let req = PacketKind::of(to_agent.recv().await.expect("DIAL_REQ")).expect("valid");
        assert!(matches!(req, PacketKind::DialRequest { random: r, half_close: true, .. } if r == random));
        session
            .handle_from_agent(PacketKind::DialResponse { random, connect_id: 7, error: None, relayed: false })
            .await;
        let tunnel = dial.await.expect("joins").expect("connected");
        assert_eq!(tunnel.connect_id, 7);
        assert_eq!(session.connection_count(), 1);

        let spec2 = DialSpec::tcp("127.0.0.1:81", false);
        let s = session.clone();
        let pending = tokio::spawn(async move { s.dial(&spec2, None).await });
        let _ = to_agent.recv().await;
        drop(guard);
        assert!(matches!(pending.await.expect("joins"), Err(DialError::Closed(_))));
        assert_eq!(session.connection_count(), 0);
    }

    #[tokio::test]
    async fn unknown_connect_id_gets_a_close_request_and_nothing_else() {
        let r = registry(vec![ProxyStrategy::Default]);
        let (guard, mut to_agent) = add(&r, "a", "");
        let data = PacketKind::Data { connect_id: 99, data: Bytes::from_static(b"x"), error: None, eof: false };
        guard.session.handle_from_agent(data).await;
        let answer = PacketKind::of(to_agent.recv().await.expect("packet")).expect("valid");
        assert_eq!(answer, PacketKind::CloseRequest { connect_id: 99 });
    }

    #[tokio::test]
    async fn dial_timeout_cancels_the_dial_at_the_agent() {
        let r = registry(vec![ProxyStrategy::Default]);
        let (guard, mut to_agent) = add(&r, "a", "");
        let spec = DialSpec::tcp("127.0.0.1:80", false);
        let err = guard.session.dial(&spec, Some(Duration::from_millis(20))).await.expect_err("times out");
        assert!(matches!(err, DialError::Timeout));
        let _dial_req = to_agent.recv().await;
        let cancel = PacketKind::of(to_agent.recv().await.expect("DIAL_CLS")).expect("valid");
        assert_eq!(cancel, PacketKind::DialClose { random: spec.random });
    }
}
