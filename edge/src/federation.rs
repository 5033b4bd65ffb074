//! Edge-to-edge routing (`[federation]`).
//!
//! Edges talk to each other over QUIC with ALPN `molt-edge/1` and mutual TLS: both sides
//! present edge certificates checked against the same roots and revocations as agents'
//! (a link to a given edge expects that edge's id). A link carries one bidirectional
//! stream of [`Frame`]s. The dialling edge sends `Send` (an envelope) and `Receipt`
//! frames; the answering edge answers each with one `Accepted` or `Rejected`, in order,
//! so answers need no ids of their own.
//!
//! * **Where an agent is**: [`Federation::whereabouts`] asks the control plane
//!   (`LookupAgent`) and keeps the answer for `presence_fresh`. While the control plane
//!   cannot be reached the last answer stays in use, so traffic between known agents
//!   goes on.
//! * **Sending**: a message whose recipient has no session here and is connected to
//!   another edge goes over the link to that edge. The far edge buffers it durably (an
//!   fsync) before it answers `Stored`, then delivers it from its buffer; the sender gets
//!   that answer. If the link fails or its queue is full, the message is buffered here.
//! * **Hand-off**: every `handoff_interval`, buffered records whose recipient has no
//!   session here but is connected to another edge are passed to that edge in order, and
//!   each is deleted here once the far edge has stored it. A crash between the two leaves
//!   a copy at both; the far edge's buffer drops a second copy of what it still holds,
//!   and the recipient's SDK drops one already delivered. Delivery is at least once at
//!   the edges and exactly once to the application.
//! * **Receipts** follow the same path back to the sender's edge.
//!
//! The far edge trusts what a link brings: the dialling edge authenticated the sender and
//! checked its signature, rate and replay window. It checks the frame's shape and the
//! message's expiry, and buffers at most what its quotas allow.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use molt_protocol::cert::Role;
use molt_protocol::frame::{Disposition, Frame, FrameReader, RejectCode};
use molt_protocol::{AgentId, EdgeId, UnixMillis};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::config::FederationConfig;
use crate::control::{ControlClient, proto};
use crate::live::{LiveConnections, LiveTls};
use crate::metrics as names;
use crate::relay::{self, Outbound, Relay, close_code};
use crate::store::{RecordKind, StoredRecord};

/// Longest wait for the control plane's answer to a presence lookup.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_millis(500);
/// Presence answers kept, at most; when full, the oldest half is forgotten.
pub const PRESENCE_CACHE_MAX: usize = 100_000;
/// Longest wait for a link's QUIC and TLS handshakes.
pub const LINK_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Keep-alive and idle timeout of a link: a dead peer is noticed within the timeout.
pub const LINK_KEEP_ALIVE: Duration = Duration::from_secs(1);
pub const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the far edge's answer before the message is buffered here instead.
pub const LINK_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Wait before dialling an edge again after a link to it failed; doubles up to the max.
pub const LINK_RETRY_MIN: Duration = Duration::from_millis(250);
pub const LINK_RETRY_MAX: Duration = Duration::from_secs(10);
/// Edges this edge keeps links to, at most.
pub const PEERS_MAX: usize = 1024;
/// Links from other edges served at once, at most.
pub const PEER_CONNECTIONS_MAX: usize = 1024;
/// Answers a served link queues for its writer.
pub const PEER_OUTBOUND_DEPTH: usize = 8192;
/// How long a dialling edge has to open its stream.
pub const PEER_STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Records handed off per recipient per round, and recipients looked at per round.
pub const HANDOFF_BATCH: usize = 512;
pub const HANDOFF_RECIPIENTS_MAX: usize = 4096;
/// Malformed or forbidden frames tolerated from a peer edge before its link is closed.
pub const PEER_BAD_FRAMES_MAX: u32 = 0;
/// Server name sent to other edges (informational: the certificate names the edge).
const PEER_SERVER_NAME: &str = "edge.molt";
/// QUIC windows of a link: it carries many agents' traffic.
const LINK_STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
const LINK_CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;

/// Where an agent is connected, as far as this edge knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Whereabouts {
    /// Connected to another edge, reachable at these addresses.
    Elsewhere { edge: EdgeId, addrs: Vec<SocketAddr> },
    /// The control plane names this edge (the session may be opening or closing).
    Here,
    /// Connected nowhere, unknown, or at an edge that takes no links.
    Nowhere,
    /// Never learned: the control plane could not be asked.
    Unknown,
}

/// The far edge's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkAnswer {
    Accepted(Disposition),
    Rejected { code: RejectCode, detail: String },
}

/// One request on a link, with where its answer goes.
#[derive(Debug)]
struct LinkRequest {
    frame: Frame,
    answer: oneshot::Sender<LinkAnswer>,
}

#[derive(Debug)]
struct PeerEntry {
    queue: Option<mpsc::Sender<LinkRequest>>,
    retry_at: Option<Instant>,
    retry_after: Duration,
}

#[derive(Clone, Debug)]
struct Cached {
    at: Instant,
    whereabouts: Whereabouts,
}

/// Edge-to-edge routing state: presence answers and links to other edges.
pub struct Federation {
    edge_id: EdgeId,
    config: FederationConfig,
    endpoint: quinn::Endpoint,
    tls: Arc<LiveTls>,
    control: Arc<ControlClient>,
    presence: Mutex<HashMap<AgentId, Cached>>,
    peers: Mutex<HashMap<EdgeId, PeerEntry>>,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation").field("edge_id", &self.edge_id).finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Federation {
    /// Binds the edge-to-edge endpoint (also used to dial other edges).
    pub fn bind(
        edge_id: EdgeId,
        config: FederationConfig,
        tls: Arc<LiveTls>,
        control: Arc<ControlClient>,
    ) -> anyhow::Result<Arc<Federation>> {
        let server = tls.peer_server_config()?;
        let endpoint = quinn::Endpoint::server(server, config.listen_addr)
            .with_context(|| format!("while binding the edge-to-edge port udp {}", config.listen_addr))?;
        tls.attach_peer_endpoint(endpoint.clone());
        Ok(Arc::new(Federation {
            edge_id,
            config,
            endpoint,
            tls,
            control,
            presence: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
        }))
    }

    /// The bound address (with the real port when 0 was configured).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.endpoint.local_addr().context("while reading the edge-to-edge address")
    }

    /// The address other edges are told to dial.
    pub fn advertised_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.config.advertise_addr.unwrap_or(self.local_addr()?))
    }

    pub fn config(&self) -> &FederationConfig {
        &self.config
    }

    /// Where `agent` is connected: a fresh answer from the cache, else the control
    /// plane's, else the last answer (the control plane is away), else `Unknown`.
    pub async fn whereabouts(&self, agent: AgentId) -> Whereabouts {
        let cached = lock(&self.presence).get(&agent).cloned();
        if let Some(cached) = &cached
            && cached.at.elapsed() < self.config.presence_fresh
        {
            return cached.whereabouts.clone();
        }
        let whereabouts = match self.ask(agent).await {
            Some(answer) => answer,
            // Keep using what we knew, and do not ask again for a while.
            None => cached.map_or(Whereabouts::Unknown, |cached| cached.whereabouts),
        };
        let mut presence = lock(&self.presence);
        if presence.len() >= PRESENCE_CACHE_MAX && !presence.contains_key(&agent) {
            forget_oldest_half(&mut presence);
        }
        presence.insert(agent, Cached { at: Instant::now(), whereabouts: whereabouts.clone() });
        whereabouts
    }

    /// Forgets what is known about `agent` (it connected here, or a link to its edge
    /// failed), so the next lookup asks again.
    pub fn forget(&self, agent: AgentId) {
        lock(&self.presence).remove(&agent);
    }

    async fn ask(&self, agent: AgentId) -> Option<Whereabouts> {
        let mut client = self.control.get()?;
        let request = proto::LookupAgentRequest { agent_id: agent.to_string() };
        let answer = match tokio::time::timeout(LOOKUP_TIMEOUT, client.lookup_agent(request)).await {
            Ok(Ok(answer)) => answer.into_inner(),
            Ok(Err(status)) => {
                tracing::debug!(%agent, %status, "presence lookup failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(%agent, "presence lookup timed out");
                return None;
            }
        };
        Some(whereabouts_of(&answer, self.edge_id))
    }

    /// Queues `frame` on the link to `edge`, dialling it if needed. `None` when the edge
    /// was unreachable a moment ago or its link is full: the caller keeps the message.
    fn submit(
        self: &Arc<Self>,
        edge: EdgeId,
        addrs: &[SocketAddr],
        frame: Frame,
    ) -> Option<oneshot::Receiver<LinkAnswer>> {
        let queue = self.queue_for(edge, addrs)?;
        let (answer, receiver) = oneshot::channel();
        queue.try_send(LinkRequest { frame, answer }).ok()?;
        Some(receiver)
    }

    fn queue_for(self: &Arc<Self>, edge: EdgeId, addrs: &[SocketAddr]) -> Option<mpsc::Sender<LinkRequest>> {
        if edge == self.edge_id || addrs.is_empty() {
            return None;
        }
        let mut peers = lock(&self.peers);
        if !peers.contains_key(&edge) && peers.len() >= PEERS_MAX {
            peers.retain(|_, entry| entry.queue.as_ref().is_some_and(|queue| !queue.is_closed()));
            if peers.len() >= PEERS_MAX {
                tracing::warn!(%edge, limit = PEERS_MAX, "too many edge links; keeping the message here");
                return None;
            }
        }
        let entry = peers.entry(edge).or_insert(PeerEntry { queue: None, retry_at: None, retry_after: LINK_RETRY_MIN });
        if let Some(queue) = &entry.queue
            && !queue.is_closed()
        {
            return Some(queue.clone());
        }
        if entry.retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let (queue, requests) = mpsc::channel(self.config.link_queue_depth.get());
        entry.queue = Some(queue.clone());
        entry.retry_at = None;
        tokio::spawn(run_link(Arc::clone(self), edge, addrs.to_vec(), requests));
        Some(queue)
    }

    fn link_up(&self, edge: EdgeId) {
        if let Some(entry) = lock(&self.peers).get_mut(&edge) {
            entry.retry_after = LINK_RETRY_MIN;
        }
    }

    fn link_down(&self, edge: EdgeId) {
        if let Some(entry) = lock(&self.peers).get_mut(&edge) {
            entry.queue = None;
            entry.retry_at = Some(Instant::now() + entry.retry_after);
            entry.retry_after = (entry.retry_after * 2).min(LINK_RETRY_MAX);
        }
    }

    /// Passes an envelope to `edge`. The answer is what the sender is told; if the link
    /// fails first, the relay buffers the message here.
    pub fn forward(
        self: &Arc<Self>,
        edge: EdgeId,
        addrs: &[SocketAddr],
        envelope: Vec<u8>,
    ) -> Option<oneshot::Receiver<LinkAnswer>> {
        self.submit(edge, addrs, Frame::Send(envelope))
    }

    /// Passes a receipt to `edge`.
    pub fn forward_receipt(
        self: &Arc<Self>,
        edge: EdgeId,
        addrs: &[SocketAddr],
        receipt: Vec<u8>,
    ) -> Option<oneshot::Receiver<LinkAnswer>> {
        self.submit(edge, addrs, Frame::Receipt(receipt))
    }

    /// Stops taking and making links.
    pub fn close(&self) {
        self.endpoint.close(close_code::SHUTTING_DOWN.into(), b"edge is shutting down");
    }
}

/// What a `LookupAgent` answer says about an agent, seen from edge `me`.
pub fn whereabouts_of(answer: &proto::LookupAgentResponse, me: EdgeId) -> Whereabouts {
    if !answer.found {
        return Whereabouts::Nowhere;
    }
    let Ok(edge) = answer.home_edge_id.parse::<EdgeId>() else { return Whereabouts::Nowhere };
    if edge == me {
        return Whereabouts::Here;
    }
    let addrs: Vec<SocketAddr> = answer.edge_peer_addrs.iter().filter_map(|addr| addr.parse().ok()).collect();
    if addrs.is_empty() { Whereabouts::Nowhere } else { Whereabouts::Elsewhere { edge, addrs } }
}

fn forget_oldest_half(presence: &mut HashMap<AgentId, Cached>) {
    let mut ages: Vec<Instant> = presence.values().map(|cached| cached.at).collect();
    ages.sort_unstable();
    if let Some(cutoff) = ages.get(ages.len() / 2).copied() {
        presence.retain(|_, cached| cached.at > cutoff);
    }
}

pub(crate) fn quic_server_config(tls: rustls::ServerConfig) -> anyhow::Result<quinn::ServerConfig> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("while adapting tls to quic")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(link_transport()?));
    Ok(server)
}

pub fn quic_client_config(tls: rustls::ClientConfig) -> anyhow::Result<quinn::ClientConfig> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("while adapting tls to quic")?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(link_transport()?));
    Ok(client)
}

fn link_transport() -> anyhow::Result<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(LINK_IDLE_TIMEOUT.try_into().context("link idle timeout")?))
        .keep_alive_interval(Some(LINK_KEEP_ALIVE))
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(LINK_STREAM_WINDOW_BYTES.into())
        .receive_window(LINK_CONNECTION_WINDOW_BYTES.into())
        .send_window(u64::from(LINK_CONNECTION_WINDOW_BYTES));
    Ok(transport)
}

// ---------------------------------------------------------------------------------------
// The dialling side.

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("edge link to {edge}: {detail}")]
    Connect { edge: EdgeId, detail: String },
    #[error("edge link to {edge} lost: {detail}")]
    Lost { edge: EdgeId, detail: String },
    #[error("edge link to {edge}: the peer broke the protocol: {detail}")]
    Protocol { edge: EdgeId, detail: String },
}

async fn run_link(
    federation: Arc<Federation>,
    edge: EdgeId,
    addrs: Vec<SocketAddr>,
    mut requests: mpsc::Receiver<LinkRequest>,
) {
    let connection = match dial(&federation, edge, &addrs).await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::warn!(%error, "could not reach another edge; keeping its messages here");
            federation.link_down(edge);
            return;
        }
    };
    federation.link_up(edge);
    metrics::gauge!(names::PEER_LINKS).increment(1.0);
    tracing::info!(%edge, addr = %connection.remote_address(), "edge link up");
    let outcome = serve_link(&connection, edge, &mut requests, federation.config.link_queue_depth.get()).await;
    metrics::gauge!(names::PEER_LINKS).decrement(1.0);
    // Requests still queued are dropped with their answer channels: their senders see
    // the link fail and keep the messages.
    requests.close();
    federation.link_down(edge);
    connection.close(close_code::NORMAL.into(), b"link closed");
    if let Err(error) = outcome {
        tracing::warn!(%error, "edge link down");
    }
}

async fn dial(federation: &Federation, edge: EdgeId, addrs: &[SocketAddr]) -> Result<quinn::Connection, LinkError> {
    let config = federation
        .tls
        .peer_client_config(edge)
        .map_err(|error| LinkError::Connect { edge, detail: format!("{error:#}") })?;
    let mut last = String::from("no address");
    for addr in addrs {
        let connecting = match federation.endpoint.connect_with(config.clone(), *addr, PEER_SERVER_NAME) {
            Ok(connecting) => connecting,
            Err(error) => {
                last = format!("{addr}: {error}");
                continue;
            }
        };
        match tokio::time::timeout(LINK_CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(error)) => last = format!("{addr}: {error}"),
            Err(_) => last = format!("{addr}: no answer within {LINK_CONNECT_TIMEOUT:?}"),
        }
    }
    Err(LinkError::Connect { edge, detail: last })
}

/// Writes requests and matches answers to them, in order, until the link fails.
async fn serve_link(
    connection: &quinn::Connection,
    edge: EdgeId,
    requests: &mut mpsc::Receiver<LinkRequest>,
    inflight_max: usize,
) -> Result<(), LinkError> {
    let lost = |error: &dyn std::fmt::Display| LinkError::Lost { edge, detail: error.to_string() };
    let (mut send, mut recv) = connection.open_bi().await.map_err(|error| lost(&error))?;
    let waiting: Mutex<VecDeque<oneshot::Sender<LinkAnswer>>> = Mutex::new(VecDeque::new());
    let inflight = Semaphore::new(inflight_max);
    let writer = async {
        let mut buffer = Vec::with_capacity(relay::WRITE_COALESCE_BYTES);
        loop {
            let Ok(permit) = inflight.acquire().await else { return Ok(()) };
            permit.forget();
            let Some(first) = requests.recv().await else { return Ok(()) };
            buffer.clear();
            first.frame.encode_into(&mut buffer);
            lock(&waiting).push_back(first.answer);
            while buffer.len() < relay::WRITE_COALESCE_BYTES {
                let Ok(permit) = inflight.try_acquire() else { break };
                let Ok(next) = requests.try_recv() else { break };
                permit.forget();
                next.frame.encode_into(&mut buffer);
                lock(&waiting).push_back(next.answer);
            }
            send.write_all(&buffer).await.map_err(|error| lost(&error))?;
        }
    };
    let reader = async {
        let mut frames = FrameReader::new();
        loop {
            let chunk = match recv.read_chunk(relay::READ_CHUNK_BYTES, true).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Err(lost(&"the peer finished its stream")),
                Err(error) => return Err(lost(&error)),
            };
            frames.extend(&chunk.bytes);
            loop {
                let frame =
                    frames.next_frame().map_err(|error| LinkError::Protocol { edge, detail: error.to_string() })?;
                let answer = match frame {
                    None => break,
                    Some(Frame::Accepted { disposition, .. }) => LinkAnswer::Accepted(disposition),
                    Some(Frame::Rejected { code, detail, .. }) => LinkAnswer::Rejected { code, detail },
                    Some(Frame::Pong(_)) => continue,
                    Some(Frame::GoAway { detail, .. }) => {
                        return Err(lost(&format!("the peer is going away: {detail}")));
                    }
                    Some(other) => {
                        let detail = format!("unexpected {:?} frame", std::mem::discriminant(&other));
                        return Err(LinkError::Protocol { edge, detail });
                    }
                };
                let Some(waiter) = lock(&waiting).pop_front() else {
                    return Err(LinkError::Protocol { edge, detail: "an answer to no request".into() });
                };
                inflight.add_permits(1);
                let _ = waiter.send(answer);
            }
        }
    };
    tokio::select! {
        written = writer => written,
        read = reader => read,
    }
}

// ---------------------------------------------------------------------------------------
// The answering side.

/// Accepts links from other edges until `shutdown` turns true.
pub async fn serve(
    federation: Arc<Federation>,
    relay: Arc<Relay>,
    live: Arc<LiveConnections>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut links = JoinSet::new();
    loop {
        tokio::select! {
            incoming = federation.endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if links.len() >= PEER_CONNECTIONS_MAX {
                    tracing::warn!(remote = %incoming.remote_address(), limit = PEER_CONNECTIONS_MAX, "refusing an edge link: too many");
                    incoming.refuse();
                    continue;
                }
                links.spawn(serve_peer(Arc::clone(&relay), Arc::clone(&live), incoming));
            }
            Some(_) = links.join_next(), if !links.is_empty() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    links.shutdown().await;
}

async fn serve_peer(relay: Arc<Relay>, live: Arc<LiveConnections>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::info!(%remote, %error, "edge link handshake failed");
            return;
        }
    };
    let Some((leaf, serials)) = crate::live::authenticated_peer(&connection) else {
        connection.close(close_code::PROTOCOL_VIOLATION.into(), b"no client certificate");
        return;
    };
    let Role::Edge(peer) = leaf.role() else {
        connection.close(close_code::PROTOCOL_VIOLATION.into(), b"not an edge certificate");
        return;
    };
    let _live = live.insert(serials, connection.clone());
    let (send, mut recv) = match tokio::time::timeout(PEER_STREAM_TIMEOUT, connection.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "edge link ended before its stream");
            return;
        }
        Err(_) => {
            connection.close(close_code::NO_SESSION_STREAM.into(), b"no stream opened");
            return;
        }
    };
    tracing::info!(%peer, %remote, "edge link accepted");
    let (answers, answers_receiver) = mpsc::channel(PEER_OUTBOUND_DEPTH);
    let writer = tokio::spawn(relay::write_loop(answers_receiver, send));
    let mut frames = FrameReader::new();
    let code = 'read: loop {
        let chunk = match recv.read_chunk(relay::READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) | Err(_) => break close_code::NORMAL,
        };
        frames.extend(&chunk.bytes);
        loop {
            let frame = match frames.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%peer, %error, "closing an edge link that sent a malformed frame");
                    break 'read close_code::PROTOCOL_VIOLATION;
                }
            };
            metrics::counter!(names::PEER_RECEIVED_TOTAL).increment(1);
            let now = UnixMillis::now_from_system();
            let answered = match frame {
                Frame::Send(envelope) => relay.accept_from_edge(envelope, &answers, now).await,
                Frame::Receipt(receipt) => relay.receipt_from_edge(receipt, &answers, now).await,
                Frame::Ping(nonce) => answers.send(Outbound::Frame(Frame::Pong(nonce))).await.is_ok(),
                other => {
                    let detail = format!("edges may not send {:?} frames on a link", std::mem::discriminant(&other));
                    tracing::warn!(%peer, detail, "closing an edge link");
                    break 'read close_code::PROTOCOL_VIOLATION;
                }
            };
            if !answered {
                break 'read close_code::SHUTTING_DOWN;
            }
        }
    };
    drop(answers);
    if code == close_code::NORMAL {
        let _ = writer.await;
    } else {
        writer.abort();
        connection.close(code.into(), b"closing");
    }
    tracing::info!(%peer, code, "edge link closed");
}

// ---------------------------------------------------------------------------------------
// Hand-off of buffered records.

/// Every `handoff_interval`, passes buffered records to the edge their recipient is
/// connected to now.
pub async fn handoff_loop(federation: Arc<Federation>, relay: Arc<Relay>) {
    let mut tick = tokio::time::interval(federation.config.handoff_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for agent in relay.store().backlogged(HANDOFF_RECIPIENTS_MAX) {
            if relay.has_session(&agent) {
                continue;
            }
            if let Whereabouts::Elsewhere { edge, addrs } = federation.whereabouts(agent).await {
                hand_off(&federation, &relay, agent, edge, &addrs).await;
            }
        }
    }
}

/// Passes `agent`'s records, oldest first, to `edge`; deletes each once stored there.
async fn hand_off(federation: &Arc<Federation>, relay: &Relay, agent: AgentId, edge: EdgeId, addrs: &[SocketAddr]) {
    let records = match relay.store().pending(agent, None, HANDOFF_BATCH, UnixMillis::now_from_system()) {
        Ok(records) => records,
        Err(error) => {
            tracing::warn!(%agent, %error, "reading the buffer for a hand-off failed");
            return;
        }
    };
    let mut sent: Vec<(StoredRecord, oneshot::Receiver<LinkAnswer>)> = Vec::with_capacity(records.len());
    for record in records {
        let frame = match record.kind {
            RecordKind::Envelope => Frame::Send(record.bytes.clone()),
            RecordKind::Receipt => Frame::Receipt(record.bytes.clone()),
        };
        let Some(answer) = federation.submit(edge, addrs, frame) else { break };
        sent.push((record, answer));
    }
    let mut moved = 0u64;
    for (record, answer) in sent {
        match tokio::time::timeout(LINK_ANSWER_TIMEOUT, answer).await {
            Ok(Ok(LinkAnswer::Accepted(_)))
            | Ok(Ok(LinkAnswer::Rejected { code: RejectCode::Duplicate | RejectCode::Expired, .. })) => {
                relay.store().delete(agent, record.kind, record.message_id).await;
                moved += 1;
            }
            Ok(Ok(LinkAnswer::Rejected { code, detail })) => {
                tracing::info!(%agent, %edge, ?code, detail, "the recipient's edge refused a hand-off; keeping it here");
                break;
            }
            Ok(Err(_)) | Err(_) => {
                federation.forget(agent);
                break;
            }
        }
    }
    if moved > 0 {
        metrics::counter!(names::HANDOFFS_TOTAL).increment(moved);
        tracing::info!(%agent, %edge, moved, "handed buffered messages to the recipient's edge");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use molt_protocol::keys::SigningKey;

    fn edge(seed: u8) -> EdgeId {
        EdgeId::from_inception_key(&SigningKey::from_bytes(&[seed; 32]).public_key())
    }

    #[test]
    fn a_lookup_answer_says_where_the_agent_is() {
        let me = edge(1);
        let other = edge(2);
        let answer = |found: bool, home: EdgeId, peers: &[&str]| proto::LookupAgentResponse {
            found,
            home_edge_id: home.to_string(),
            edge_quic_addrs: vec!["127.0.0.1:1".into()],
            key_binding: Vec::new(),
            edge_peer_addrs: peers.iter().map(|addr| (*addr).to_owned()).collect(),
        };
        assert_eq!(
            whereabouts_of(&answer(true, other, &["127.0.0.1:4434", "bad"]), me),
            Whereabouts::Elsewhere { edge: other, addrs: vec!["127.0.0.1:4434".parse().unwrap()] }
        );
        assert_eq!(whereabouts_of(&answer(true, me, &["127.0.0.1:4434"]), me), Whereabouts::Here);
        assert_eq!(whereabouts_of(&answer(false, other, &["127.0.0.1:4434"]), me), Whereabouts::Nowhere);
        assert_eq!(whereabouts_of(&answer(true, other, &[]), me), Whereabouts::Nowhere, "takes no links");
        let mut garbled = answer(true, other, &["127.0.0.1:4434"]);
        garbled.home_edge_id = "edge-???".into();
        assert_eq!(whereabouts_of(&garbled, me), Whereabouts::Nowhere);
    }

    #[test]
    fn a_full_presence_cache_forgets_its_oldest_half() {
        let start = Instant::now();
        let mut presence: HashMap<AgentId, Cached> = (0..10u8)
            .map(|i| {
                let agent = AgentId::from_inception_key(&SigningKey::from_bytes(&[i + 1; 32]).public_key());
                (agent, Cached { at: start + Duration::from_millis(u64::from(i)), whereabouts: Whereabouts::Nowhere })
            })
            .collect();
        forget_oldest_half(&mut presence);
        assert_eq!(presence.len(), 4, "strictly newer than the median is kept");
        assert!(presence.values().all(|cached| cached.at > start + Duration::from_millis(5)));
    }
}
