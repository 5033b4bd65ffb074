//! The agent's connection to its edge.
//!
//! [`Client::connect`] starts a driver task that owns the QUIC connection and its one
//! session stream. The driver seals nothing itself: [`Client::send`] encrypts and signs on
//! the caller's task, the driver writes the frame and matches the edge's answer to the
//! waiting caller. Incoming envelopes are verified against the [`Directory`], decrypted,
//! deduplicated by message id, receipted, and queued for [`Client::next_event`].
//!
//! When the connection drops the driver reconnects with exponential back-off and jitter,
//! then resends every message the edge has not confirmed durably: those awaiting an
//! answer and those forwarded live whose receipt has not come back. The edge and the
//! recipient both deduplicate by message id, so resending is safe.
//!
//! Given several candidate edges ([`ClientConfig::with_edges`]), the client measures them
//! and connects to the best ([`crate::edges`]). It keeps its QUIC link alive every
//! [`LIVENESS_KEEP_ALIVE`] with an idle timeout of [`LIVENESS_IDLE_TIMEOUT`], so a dead
//! edge is noticed within [`DEAD_EDGE_DETECTION_MAX`]; it then connects to the next edge
//! of the last ranking at once, without back-off, and resends as above. Every
//! [`ClientConfig::reprobe_interval`] it measures again (fetching the edge map again) and
//! moves to a clearly better edge.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use molt_protocol::cert::{ExpectedRole, TrustAnchors};
use molt_protocol::envelope::{self, EnvelopeError, EnvelopeHeader, EnvelopeView, Ttl};
use molt_protocol::frame::{Disposition, Frame, FrameReader, RejectCode};
use molt_protocol::limits::{DEFAULT_KEEP_ALIVE, RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_MIN};
use molt_protocol::receipt::Receipt;
use molt_protocol::tls::{self, SharedRevocations};
use molt_protocol::{AgentId, MessageId, UnixMillis};
use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::edges::{self, CandidatesError, EdgeCandidate, EdgeSelector, EdgeSource, Probe};
use crate::identity::{AgentIdentity, Directory};

/// Commands queued from the API to the driver.
pub const COMMAND_QUEUE_DEPTH: usize = 4096;
/// Messages sent and not yet confirmed (answered `Stored`, or receipted), at most; `send`
/// waits for room beyond it.
pub const UNCONFIRMED_MAX: usize = 65_536;
/// Message ids remembered for deduplication of incoming messages.
pub const DEDUP_CAPACITY: usize = 1 << 17;
/// Bytes asked of the stream per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// QUIC keep-alive interval of a client with candidate edges.
pub const LIVENESS_KEEP_ALIVE: Duration = Duration::from_millis(500);
/// QUIC idle timeout of a client with candidate edges: the link is declared dead when
/// nothing arrives for this long.
pub const LIVENESS_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest a client with candidate edges takes to notice that its edge died: the idle
/// timeout, restarted at most once by a keep-alive sent after the last packet received.
pub const DEAD_EDGE_DETECTION_MAX: Duration = Duration::from_secs(3);
/// How long one attempt to reach an edge may take while failing over, so that a dead
/// candidate does not hold up the next one.
pub const FAILOVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Probe rounds from the re-measuring task waiting for the driver.
const PROBE_ROUND_QUEUE_DEPTH: usize = 1;

const _: () = assert!(LIVENESS_KEEP_ALIVE.as_millis() * 2 <= LIVENESS_IDLE_TIMEOUT.as_millis());
const _: () =
    assert!(LIVENESS_KEEP_ALIVE.as_millis() + LIVENESS_IDLE_TIMEOUT.as_millis() <= DEAD_EDGE_DETECTION_MAX.as_millis());

/// How to reach the edge and who we are.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub identity: Arc<AgentIdentity>,
    pub anchors: Arc<TrustAnchors>,
    pub revocations: SharedRevocations,
    pub edge_addr: SocketAddr,
    /// TLS server name (SNI); Molt identifies the edge by its certificate role, not by it.
    pub server_name: String,
    pub expected_edge: ExpectedRole,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub default_ttl: Ttl,
    pub inbox_capacity: usize,
    pub connect_timeout: Duration,
    /// Candidate edges to choose from; `edge_addr` is not used when set.
    pub edges: Option<EdgeSource>,
    /// How often a client with candidate edges measures them again.
    pub reprobe_interval: Duration,
}

impl ClientConfig {
    pub fn new(identity: Arc<AgentIdentity>, anchors: Arc<TrustAnchors>, edge_addr: SocketAddr) -> ClientConfig {
        ClientConfig {
            identity,
            anchors,
            revocations: SharedRevocations::default(),
            edge_addr,
            server_name: "localhost".into(),
            expected_edge: ExpectedRole::AnyEdge,
            keep_alive: DEFAULT_KEEP_ALIVE,
            idle_timeout: DEFAULT_KEEP_ALIVE * 3,
            backoff_min: RECONNECT_BACKOFF_MIN,
            backoff_max: RECONNECT_BACKOFF_MAX,
            default_ttl: Ttl::from_secs(24 * 3600).unwrap_or(Ttl::MAX),
            inbox_capacity: 4096,
            connect_timeout: Duration::from_secs(10),
            edges: None,
            reprobe_interval: edges::REPROBE_INTERVAL,
        }
    }

    /// A client that chooses its edge from `source` and fails over between them, with the
    /// liveness keep-alive and idle timeout.
    pub fn with_edges(identity: Arc<AgentIdentity>, anchors: Arc<TrustAnchors>, source: EdgeSource) -> ClientConfig {
        let unused = SocketAddr::from(([0, 0, 0, 0], 0));
        ClientConfig {
            edges: Some(source),
            keep_alive: LIVENESS_KEEP_ALIVE,
            idle_timeout: LIVENESS_IDLE_TIMEOUT,
            ..ClientConfig::new(identity, anchors, unused)
        }
    }
}

/// Why connecting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("tls configuration: {0}")]
    Tls(#[from] tls::TlsConfigError),
    #[error("quic configuration: {0}")]
    Quic(String),
    #[error("cannot open a local udp socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("could not reach the edge at {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("could not find candidate edges: {0}")]
    Candidates(#[from] CandidatesError),
    #[error("could not reach any of {tried} candidate edges: {last}")]
    NoEdgeReachable { tried: usize, last: String },
}

/// Why a message was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    #[error("no keys known for recipient {0}")]
    UnknownRecipient(AgentId),
    #[error("edge refused the message ({code:?}): {detail}")]
    Rejected { code: RejectCode, detail: String },
    #[error("cannot build the envelope: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("the client is closed")]
    Closed,
}

/// The edge's answer to a send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendReport {
    pub message_id: MessageId,
    pub disposition: Disposition,
}

/// A verified, decrypted message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncomingMessage {
    pub message_id: MessageId,
    pub sender: AgentId,
    pub timestamp: UnixMillis,
    pub plaintext: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    Message(IncomingMessage),
    /// The recipient confirmed it received `message_id`.
    Receipt {
        message_id: MessageId,
        from: AgentId,
    },
    /// A message arrived that could not be verified or decrypted; it was receipted so the
    /// edge stops redelivering it, and not passed on.
    Unverified {
        message_id: MessageId,
        sender: AgentId,
        reason: String,
    },
    Connected,
    Disconnected {
        reason: String,
    },
    /// The edge is going away; the client reconnects after the delay.
    GoAway {
        reconnect_after: Duration,
    },
}

/// Where the edge's answer to one send goes.
type AnswerSender = oneshot::Sender<Result<Disposition, SendError>>;

enum Command {
    Send { message_id: MessageId, bytes: Vec<u8>, reply: AnswerSender },
    Close,
}

/// A connected agent. Dropping it stops the driver.
#[derive(Debug)]
pub struct Client {
    agent_id: AgentId,
    identity: Arc<AgentIdentity>,
    directory: Directory,
    default_ttl: Ttl,
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<Event>,
    edge: watch::Receiver<Option<SocketAddr>>,
    driver: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Client {
    /// Connects and returns once the first connection is up; later drops reconnect on
    /// their own.
    ///
    /// With candidate edges ([`ClientConfig::with_edges`]) it measures them first and
    /// connects to the best one that answers.
    pub async fn connect(config: ClientConfig, directory: Directory) -> Result<Client, ConnectError> {
        let quic_config = quic_client_config(&config, config.expected_edge)?;
        let candidates = match &config.edges {
            Some(source) => source.candidates().await?,
            None => Vec::new(),
        };
        let ipv6 = match &config.edges {
            Some(_) => candidates.iter().any(|candidate| candidate.addr.is_ipv6()),
            None => config.edge_addr.is_ipv6(),
        };
        let bind: SocketAddr =
            if ipv6 { "[::]:0" } else { "0.0.0.0:0" }.parse().map_err(|_| ConnectError::Quic("bind address".into()))?;
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(quic_config.clone());
        let (mut choice, (link, addr)) = match config.edges.clone() {
            None => {
                let link = open_link(&endpoint, &config, config.edge_addr, quic_config.clone(), config.connect_timeout)
                    .await
                    .map_err(|reason| ConnectError::Unreachable { addr: config.edge_addr, reason })?;
                (None, (link, config.edge_addr))
            }
            Some(source) => {
                let mut choice = EdgeChoice::new(source, candidates);
                let best = choice.measure(&endpoint, &config).await;
                let opened = choice
                    .connect(&endpoint, &config, best, None)
                    .await
                    .map_err(|last| ConnectError::NoEdgeReachable { tried: choice.candidates.len(), last })?;
                (Some(choice), opened)
            }
        };
        if let Some(choice) = &mut choice {
            choice.start_remeasuring(&endpoint, &config);
        }
        let (commands, command_receiver) = mpsc::channel(COMMAND_QUEUE_DEPTH);
        let (event_sender, events) = mpsc::channel(config.inbox_capacity.max(1));
        let (edge_sender, edge) = watch::channel(Some(addr));
        let driver = Driver {
            endpoint,
            config: config.clone(),
            quic_config,
            directory: directory.clone(),
            commands: command_receiver,
            events: event_sender,
            edge: edge_sender,
            choice,
            unanswered: HashMap::new(),
            unreceipted: HashMap::new(),
            resend: VecDeque::new(),
            seen: Dedup::new(DEDUP_CAPACITY),
        };
        let driver = tokio::spawn(driver.run(link, addr));
        Ok(Client {
            agent_id: config.identity.agent_id,
            identity: config.identity.clone(),
            directory,
            default_ttl: config.default_ttl,
            commands,
            events,
            edge,
            driver,
        })
    }

    /// The address of the edge the client is connected to now; `None` while it is
    /// reconnecting.
    pub fn edge(&self) -> Option<SocketAddr> {
        *self.edge.borrow()
    }

    /// Follows [`Client::edge`] as it changes.
    pub fn edge_changes(&self) -> watch::Receiver<Option<SocketAddr>> {
        self.edge.clone()
    }

    pub fn agent_id(&self) -> AgentId {
        self.agent_id
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// Encrypts `plaintext` for `recipient`, signs it and sends it with the default TTL.
    pub async fn send(&self, recipient: AgentId, plaintext: &[u8]) -> Result<SendReport, SendError> {
        self.send_with_ttl(recipient, plaintext, self.default_ttl).await
    }

    pub async fn send_with_ttl(&self, recipient: AgentId, plaintext: &[u8], ttl: Ttl) -> Result<SendReport, SendError> {
        let keys = self.directory.get(&recipient).ok_or(SendError::UnknownRecipient(recipient))?;
        let mut rng = rand::rngs::OsRng;
        let header = EnvelopeHeader {
            message_id: MessageId::random(&mut rng),
            sender: self.agent_id,
            recipient,
            timestamp: UnixMillis::now_from_system(),
            ttl,
        };
        let bytes = envelope::seal(&header, &keys.encryption, plaintext, &self.identity.signing_key, &mut rng)?;
        self.send_envelope(bytes).await
    }

    /// Sends an envelope that is already sealed and signed by this agent.
    pub async fn send_envelope(&self, bytes: Vec<u8>) -> Result<SendReport, SendError> {
        let message_id = EnvelopeView::decode(&bytes)?.header.message_id;
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Send { message_id, bytes, reply }).await.map_err(|_| SendError::Closed)?;
        let disposition = answer.await.map_err(|_| SendError::Closed)??;
        Ok(SendReport { message_id, disposition })
    }

    /// Queues an envelope and returns a future for the edge's answer, so callers can keep
    /// many messages in flight.
    pub async fn send_envelope_pipelined(
        &self,
        bytes: Vec<u8>,
    ) -> Result<oneshot::Receiver<Result<Disposition, SendError>>, SendError> {
        let message_id = EnvelopeView::decode(&bytes)?.header.message_id;
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Send { message_id, bytes, reply }).await.map_err(|_| SendError::Closed)?;
        Ok(answer)
    }

    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next message, skipping other events.
    pub async fn recv(&mut self) -> Option<IncomingMessage> {
        loop {
            if let Event::Message(message) = self.events.recv().await? {
                return Some(message);
            }
        }
    }

    /// Closes the connection politely and stops the driver.
    pub async fn close(mut self) {
        let _ = self.commands.send(Command::Close).await;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut self.driver).await;
    }
}

/// How long [`Client::close`] waits for the driver to say goodbye.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long closing waits for the edge to acknowledge the session stream's last bytes.
const LINK_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
const _: () = assert!(LINK_FLUSH_TIMEOUT.as_millis() < CLOSE_TIMEOUT.as_millis());

fn quic_client_config(config: &ClientConfig, expected_edge: ExpectedRole) -> Result<quinn::ClientConfig, ConnectError> {
    let tls = tls::client_config(
        &config.identity.tls(),
        config.anchors.clone(),
        config.revocations.clone(),
        expected_edge,
        tls::ALPN_AGENT,
    )?;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| ConnectError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(config.keep_alive));
    transport.max_idle_timeout(Some(
        config.idle_timeout.try_into().map_err(|_| ConnectError::Quic("idle timeout too long".into()))?,
    ));
    transport.stream_receive_window((4u32 * 1024 * 1024).into());
    transport.receive_window((16u32 * 1024 * 1024).into());
    transport.send_window(16 * 1024 * 1024);
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// A link just opened: the reader may hold bytes past the pong, `early` the frames before it.
type OpenLink = (Link, FrameReader, Vec<Frame>);

struct Link {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// Connects, opens the session stream and pings over it: the edge registers a session
/// only once its stream carries data, so the pong proves the edge is ready to route to
/// us. Frames that arrive before the pong are returned with the reader's leftover bytes.
async fn open_link(
    endpoint: &quinn::Endpoint,
    config: &ClientConfig,
    addr: SocketAddr,
    quic_config: quinn::ClientConfig,
    timeout: Duration,
) -> Result<OpenLink, String> {
    let attempt = async {
        let connecting = endpoint.connect_with(quic_config, addr, &config.server_name).map_err(|e| e.to_string())?;
        let connection = connecting.await.map_err(|e| e.to_string())?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        let nonce: u64 = rand::random();
        send.write_all(&Frame::Ping(nonce).encode()).await.map_err(|e| describe_close(&connection, e))?;
        let mut reader = FrameReader::new();
        let mut early = Vec::new();
        loop {
            let chunk = recv
                .read_chunk(READ_CHUNK_BYTES, true)
                .await
                .map_err(|e| describe_close(&connection, e))?
                .ok_or_else(|| "edge closed the session stream".to_string())?;
            reader.extend(&chunk.bytes);
            while let Some(frame) = reader.next_frame().map_err(|e| format!("edge sent a malformed frame: {e}"))? {
                match frame {
                    Frame::Pong(answer) if answer == nonce => {
                        return Ok::<_, String>((Link { connection, send, recv }, reader, early));
                    }
                    other => early.push(other),
                }
            }
        }
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| "connection attempt timed out".to_string())?
}

/// The candidate edges of a client that chooses, the selector, and the task that
/// measures them again; the task stops when this is dropped.
struct EdgeChoice {
    source: EdgeSource,
    candidates: Vec<EdgeCandidate>,
    selector: EdgeSelector,
    rounds: Option<mpsc::Receiver<ProbeRound>>,
    remeasuring: Option<JoinHandle<()>>,
}

/// One round of measurements by the re-measuring task.
struct ProbeRound {
    candidates: Vec<EdgeCandidate>,
    probes: Vec<Probe>,
}

impl Drop for EdgeChoice {
    fn drop(&mut self) {
        if let Some(task) = &self.remeasuring {
            task.abort();
        }
    }
}

impl EdgeChoice {
    fn new(source: EdgeSource, candidates: Vec<EdgeCandidate>) -> EdgeChoice {
        EdgeChoice { source, candidates, selector: EdgeSelector::new(), rounds: None, remeasuring: None }
    }

    /// Probes the candidates and lets the selector choose; the edge to try first.
    async fn measure(&mut self, endpoint: &quinn::Endpoint, config: &ClientConfig) -> Option<SocketAddr> {
        let configs = |candidate: &EdgeCandidate| candidate_quic_config(config, candidate);
        let probes = edges::probe_round(endpoint, &self.candidates, &config.server_name, &configs).await;
        let chosen = self.selector.update(&self.candidates, &probes);
        tracing::debug!(ranking = ?self.selector.ranking(), ?chosen, "edges measured");
        chosen
    }

    /// Fetches the candidates again (keeping the last ones if that fails) and measures.
    async fn refresh(&mut self, endpoint: &quinn::Endpoint, config: &ClientConfig) -> Option<SocketAddr> {
        match self.source.candidates().await {
            Ok(candidates) => self.candidates = candidates,
            Err(error) => tracing::info!(%error, "keeping the last candidate edges"),
        }
        self.measure(endpoint, config).await
    }

    /// Connects to `first`, then down the last ranking without `lost`, then to `lost`
    /// itself; every attempt bounded by [`FAILOVER_CONNECT_TIMEOUT`].
    async fn connect(
        &mut self,
        endpoint: &quinn::Endpoint,
        config: &ClientConfig,
        first: Option<SocketAddr>,
        lost: Option<SocketAddr>,
    ) -> Result<(OpenLink, SocketAddr), String> {
        let mut order: Vec<SocketAddr> = first.into_iter().collect();
        for addr in self.selector.failover_order(lost).into_iter().chain(lost) {
            if !order.contains(&addr) {
                order.push(addr);
            }
        }
        let timeout = config.connect_timeout.min(FAILOVER_CONNECT_TIMEOUT);
        let mut last = "no candidate edge".to_owned();
        for addr in order {
            let Some(candidate) = self.candidates.iter().find(|candidate| candidate.addr == addr) else { continue };
            let Some(quic_config) = candidate_quic_config(config, candidate) else { continue };
            match open_link(endpoint, config, addr, quic_config, timeout).await {
                Ok(link) => {
                    self.selector.connected(addr);
                    tracing::info!(%addr, region = %candidate.region, "connected to edge");
                    return Ok((link, addr));
                }
                Err(reason) => {
                    tracing::debug!(%addr, %reason, "edge unreachable");
                    last = format!("{addr}: {reason}");
                }
            }
        }
        Err(last)
    }

    /// Starts the task that measures the edges every `reprobe_interval`.
    fn start_remeasuring(&mut self, endpoint: &quinn::Endpoint, config: &ClientConfig) {
        let (rounds, receiver) = mpsc::channel(PROBE_ROUND_QUEUE_DEPTH);
        let task = remeasure(endpoint.clone(), self.source.clone(), config.clone(), self.candidates.clone(), rounds);
        self.remeasuring = Some(tokio::spawn(task));
        self.rounds = Some(receiver);
    }

    /// Takes a round from the task; the edge to move to, if the selector says so.
    fn take_round(&mut self, round: ProbeRound) -> Option<SocketAddr> {
        self.candidates = round.candidates;
        let chosen = self.selector.update_while_connected(&self.candidates, &round.probes);
        tracing::debug!(ranking = ?self.selector.ranking(), ?chosen, "edges measured again");
        chosen.filter(|chosen| Some(*chosen) != self.selector.current())
    }
}

/// The re-measuring task: every `reprobe_interval`, fetch the candidates and probe them.
async fn remeasure(
    endpoint: quinn::Endpoint,
    source: EdgeSource,
    config: ClientConfig,
    mut candidates: Vec<EdgeCandidate>,
    rounds: mpsc::Sender<ProbeRound>,
) {
    loop {
        tokio::time::sleep(config.reprobe_interval).await;
        match source.candidates().await {
            Ok(fresh) => candidates = fresh,
            Err(error) => tracing::info!(%error, "keeping the last candidate edges"),
        }
        let configs = |candidate: &EdgeCandidate| candidate_quic_config(&config, candidate);
        let probes = edges::probe_round(&endpoint, &candidates, &config.server_name, &configs).await;
        if rounds.send(ProbeRound { candidates: candidates.clone(), probes }).await.is_err() {
            return;
        }
    }
}

/// The QUIC config for one candidate: it accepts only the candidate's edge id when the
/// edge map gave one. `None` (logged) if it cannot be built.
fn candidate_quic_config(config: &ClientConfig, candidate: &EdgeCandidate) -> Option<quinn::ClientConfig> {
    let expected = candidate.edge_id.map_or(config.expected_edge, ExpectedRole::Edge);
    quic_client_config(config, expected)
        .inspect_err(|error| tracing::warn!(%error, addr = %candidate.addr, "no client config for the edge"))
        .ok()
}

/// Prefers the connection's close reason (say, a refused certificate) over the stream error.
fn describe_close(connection: &quinn::Connection, error: impl std::fmt::Display) -> String {
    match connection.close_reason() {
        Some(reason) => reason.to_string(),
        None => error.to_string(),
    }
}

/// Remembers recent message ids, forgetting the oldest beyond its capacity.
struct Dedup {
    capacity: usize,
    ids: HashSet<MessageId>,
    order: VecDeque<MessageId>,
}

impl Dedup {
    fn new(capacity: usize) -> Dedup {
        Dedup { capacity, ids: HashSet::new(), order: VecDeque::new() }
    }

    /// True the first time an id is seen.
    fn first_time(&mut self, id: MessageId) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        true
    }
}

struct Driver {
    endpoint: quinn::Endpoint,
    config: ClientConfig,
    /// For the fixed edge (`config.edge_addr`).
    quic_config: quinn::ClientConfig,
    directory: Directory,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    /// The edge connected to now, for [`Client::edge`].
    edge: watch::Sender<Option<SocketAddr>>,
    /// Candidate edges, when the client chooses.
    choice: Option<EdgeChoice>,
    /// Sent, no answer from the edge yet: bytes kept for a resend, caller waiting.
    unanswered: HashMap<MessageId, (Vec<u8>, Option<AnswerSender>)>,
    /// Forwarded live, no receipt yet: resent after a reconnect.
    unreceipted: HashMap<MessageId, Vec<u8>>,
    /// To write once connected, in order.
    resend: VecDeque<MessageId>,
    seen: Dedup,
}

enum LinkEnd {
    Closed,
    Lost(String),
    GoAway(Duration),
    /// The selector chose another edge; the link was closed politely.
    Switch(SocketAddr),
}

impl Driver {
    async fn run(mut self, first: OpenLink, first_addr: SocketAddr) {
        let mut link = Some((first, first_addr));
        let mut failures: u32 = 0;
        // With candidate edges: where to go first, and the edge just lost (tried last).
        let mut preferred: Option<SocketAddr> = None;
        let mut lost: Option<SocketAddr> = None;
        loop {
            let (current, addr) = match link.take() {
                Some(current) => current,
                None => match self.reconnect(preferred.take(), lost.take()).await {
                    Ok(current) => current,
                    Err(reason) => {
                        failures = failures.saturating_add(1);
                        let delay = backoff(self.config.backoff_min, self.config.backoff_max, failures);
                        tracing::debug!(%reason, ?delay, "reconnect failed");
                        if self.wait_or_close(delay).await {
                            return;
                        }
                        if let Some(choice) = &mut self.choice {
                            preferred = choice.refresh(&self.endpoint, &self.config).await;
                        }
                        continue;
                    }
                },
            };
            failures = 0;
            self.edge.send_replace(Some(addr));
            let _ = self.events.try_send(Event::Connected);
            let end = self.serve(current).await;
            self.edge.send_replace(None);
            match end {
                LinkEnd::Closed => {
                    self.endpoint.close(0u32.into(), b"closed");
                    // The close frame leaves only while the endpoint is driven.
                    self.endpoint.wait_idle().await;
                    return;
                }
                LinkEnd::Lost(reason) => {
                    let _ = self.events.try_send(Event::Disconnected { reason });
                    if self.choice.is_some() {
                        // Fail over at once: the next edge is (most likely) alive.
                        lost = Some(addr);
                    } else {
                        let delay = backoff(self.config.backoff_min, self.config.backoff_max, 1);
                        if self.wait_or_close(delay).await {
                            return;
                        }
                    }
                }
                LinkEnd::GoAway(after) => {
                    let _ = self.events.try_send(Event::GoAway { reconnect_after: after });
                    if self.choice.is_some() {
                        lost = Some(addr);
                    } else if self.wait_or_close(jitter(after)).await {
                        return;
                    }
                }
                LinkEnd::Switch(to) => {
                    tracing::info!(from = %addr, %to, "moving to a clearly better edge");
                    preferred = Some(to);
                }
            }
            self.requeue_unconfirmed();
        }
    }

    /// A new link: to the fixed edge, or to the candidates in order.
    async fn reconnect(
        &mut self,
        preferred: Option<SocketAddr>,
        lost: Option<SocketAddr>,
    ) -> Result<(OpenLink, SocketAddr), String> {
        match &mut self.choice {
            None => {
                let (addr, quic_config) = (self.config.edge_addr, self.quic_config.clone());
                let link =
                    open_link(&self.endpoint, &self.config, addr, quic_config, self.config.connect_timeout).await?;
                Ok((link, addr))
            }
            Some(choice) => choice.connect(&self.endpoint, &self.config, preferred, lost).await,
        }
    }

    /// Sleeps, still accepting sends (queued for the next link). True if asked to close.
    async fn wait_or_close(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return false,
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => return true,
                    Some(Command::Send { message_id, bytes, reply }) => {
                        self.unanswered.insert(message_id, (bytes, Some(reply)));
                        self.resend.push_back(message_id);
                    }
                },
            }
        }
    }

    /// Everything not confirmed goes out again on the next link.
    fn requeue_unconfirmed(&mut self) {
        let queued: HashSet<MessageId> = self.resend.iter().copied().collect();
        for id in self.unanswered.keys() {
            if !queued.contains(id) {
                self.resend.push_back(*id);
            }
        }
        let unreceipted: Vec<(MessageId, Vec<u8>)> = self.unreceipted.drain().collect();
        for (id, bytes) in unreceipted {
            self.unanswered.insert(id, (bytes, None));
            self.resend.push_back(id);
        }
    }

    async fn serve(&mut self, (mut link, mut reader, early): OpenLink) -> LinkEnd {
        let mut out = Vec::new();
        for frame in early {
            if let Some(end) = self.handle(frame, &mut out).await {
                link.connection.close(0u32.into(), b"reconnecting");
                return end;
            }
        }
        // Frames that came in the pong's chunk, after it: nothing may follow to wake the
        // read below (say, the only buffered message), so handle them now.
        if let Some(end) = self.handle_buffered(&mut reader, &mut out, &link).await {
            return end;
        }
        while let Some(id) = self.resend.pop_front() {
            if let Some((bytes, _)) = self.unanswered.get(&id) {
                Frame::Send(bytes.clone()).encode_into(&mut out);
            }
        }
        if !out.is_empty() && link.send.write_all(&out).await.is_err() {
            return LinkEnd::Lost("write failed".into());
        }
        loop {
            let room = self.unanswered.len() + self.unreceipted.len() < UNCONFIRMED_MAX;
            tokio::select! {
                command = self.commands.recv(), if room => {
                    out.clear();
                    let Some(first) = command else { return self.close_link(link).await };
                    if self.take_command(first, &mut out) {
                        return self.close_link(link).await;
                    }
                    while out.len() < READ_CHUNK_BYTES * 4 {
                        match self.commands.try_recv() {
                            Ok(next) => if self.take_command(next, &mut out) { return self.close_link(link).await },
                            Err(_) => break,
                        }
                    }
                    if let Err(error) = link.send.write_all(&out).await {
                        return LinkEnd::Lost(format!("write failed: {error}"));
                    }
                }
                round = next_round(&mut self.choice) => {
                    if let Some(target) = self.choice.as_mut().and_then(|choice| choice.take_round(round)) {
                        self.close_link(link).await;
                        return LinkEnd::Switch(target);
                    }
                }
                chunk = link.recv.read_chunk(READ_CHUNK_BYTES, true) => {
                    let chunk = match chunk {
                        Ok(Some(chunk)) => chunk,
                        Ok(None) => return LinkEnd::Lost("edge closed the session".into()),
                        Err(error) => return LinkEnd::Lost(error.to_string()),
                    };
                    reader.extend(&chunk.bytes);
                    out.clear();
                    if let Some(end) = self.handle_buffered(&mut reader, &mut out, &link).await {
                        return end;
                    }
                    if !out.is_empty() && let Err(error) = link.send.write_all(&out).await {
                        return LinkEnd::Lost(format!("write failed: {error}"));
                    }
                }
            }
        }
    }

    /// Handles every complete frame the reader holds, appending answers to `out`.
    async fn handle_buffered(&mut self, reader: &mut FrameReader, out: &mut Vec<u8>, link: &Link) -> Option<LinkEnd> {
        loop {
            match reader.next_frame() {
                Ok(Some(frame)) => {
                    if let Some(end) = self.handle(frame, out).await {
                        link.connection.close(0u32.into(), b"reconnecting");
                        return Some(end);
                    }
                }
                Ok(None) => return None,
                Err(error) => return Some(LinkEnd::Lost(format!("edge sent a malformed frame: {error}"))),
            }
        }
    }

    async fn close_link(&mut self, mut link: Link) -> LinkEnd {
        // Closing a connection discards unsent stream data: let the edge acknowledge what
        // was written (receipts above all) first.
        if link.send.finish().is_ok() {
            let _ = tokio::time::timeout(LINK_FLUSH_TIMEOUT, link.send.stopped()).await;
        }
        link.connection.close(0u32.into(), b"bye");
        LinkEnd::Closed
    }

    /// Encodes a command; true if it asks to close.
    fn take_command(&mut self, command: Command, out: &mut Vec<u8>) -> bool {
        match command {
            Command::Close => true,
            Command::Send { message_id, bytes, reply } => {
                Frame::Send(bytes.clone()).encode_into(out);
                self.unanswered.insert(message_id, (bytes, Some(reply)));
                false
            }
        }
    }

    /// Handles one frame from the edge, appending any answer to `out`.
    async fn handle(&mut self, frame: Frame, out: &mut Vec<u8>) -> Option<LinkEnd> {
        match frame {
            Frame::Accepted { message_id, disposition } => {
                if let Some((bytes, reply)) = self.unanswered.remove(&message_id) {
                    if disposition == Disposition::Forwarded {
                        self.unreceipted.insert(message_id, bytes);
                    }
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(disposition));
                    }
                }
            }
            Frame::Rejected { message_id, code, detail } => self.rejected(message_id, code, detail),
            Frame::Deliver(bytes) => self.deliver(&bytes, out).await,
            Frame::Receipt(bytes) => self.receipt(&bytes).await,
            Frame::GoAway { reconnect_after_ms, detail } => {
                tracing::info!(%detail, reconnect_after_ms, "edge is going away");
                return Some(LinkEnd::GoAway(Duration::from_millis(u64::from(reconnect_after_ms))));
            }
            Frame::Ping(nonce) => Frame::Pong(nonce).encode_into(out),
            Frame::Pong(_) | Frame::Send(_) => {}
        }
        None
    }

    fn rejected(&mut self, message_id: MessageId, code: RejectCode, detail: String) {
        let Some((bytes, reply)) = self.unanswered.remove(&message_id) else {
            tracing::warn!(%message_id, ?code, %detail, "edge rejected a frame");
            return;
        };
        match (code, reply) {
            // A resend the edge already holds: it is on its way, keep waiting for the receipt.
            (RejectCode::Duplicate, None) => {
                self.unreceipted.insert(message_id, bytes);
            }
            (code, Some(reply)) => {
                let _ = reply.send(Err(SendError::Rejected { code, detail }));
            }
            (code, None) => tracing::warn!(%message_id, ?code, %detail, "edge refused a resent message"),
        }
    }

    async fn deliver(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let view = match EnvelopeView::decode(bytes) {
            Ok(view) => view,
            Err(error) => {
                tracing::warn!(%error, "edge delivered an undecodable envelope");
                return;
            }
        };
        let header = view.header;
        let identity = &self.config.identity;
        if header.recipient != identity.agent_id {
            tracing::warn!(message_id = %header.message_id, "edge delivered a message for another agent");
            return;
        }
        let opened = match self.directory.get(&header.sender) {
            None => Err(format!("sender {} is not in the directory", header.sender)),
            Some(keys) => view.open(&keys.signing, &identity.encryption_secret).map_err(|e| e.to_string()),
        };
        let now = UnixMillis::now_from_system();
        // Invariant: a software key cannot fail to sign.
        let receipt = Receipt::sign(header.message_id, identity.agent_id, header.sender, now, &identity.signing_key)
            .expect("software signing does not fail");
        let event = match opened {
            Ok(plaintext) => {
                if !self.seen.first_time(header.message_id) {
                    Frame::Receipt(receipt.encode()).encode_into(out);
                    return;
                }
                Event::Message(IncomingMessage {
                    message_id: header.message_id,
                    sender: header.sender,
                    timestamp: header.timestamp,
                    plaintext,
                })
            }
            Err(reason) => Event::Unverified { message_id: header.message_id, sender: header.sender, reason },
        };
        // Waiting for room in the inbox holds back reading: backpressure up to the edge.
        // The receipt follows the hand-over, so a message is receipted only once the
        // application's inbox has it.
        if self.events.send(event).await.is_ok() {
            Frame::Receipt(receipt.encode()).encode_into(out);
        }
    }

    async fn receipt(&mut self, bytes: &[u8]) {
        let Ok(receipt) = Receipt::decode(bytes) else { return };
        if receipt.sender != self.config.identity.agent_id {
            return;
        }
        let verified = self.directory.get(&receipt.recipient).is_some_and(|keys| receipt.verify(&keys.signing).is_ok());
        if !verified {
            tracing::debug!(message_id = %receipt.message_id, "receipt from an unknown or unverifiable recipient");
            return;
        }
        self.unreceipted.remove(&receipt.message_id);
        if let Some((_, reply)) = self.unanswered.remove(&receipt.message_id)
            && let Some(reply) = reply
        {
            let _ = reply.send(Ok(Disposition::Forwarded));
        }
        let _ = self.events.send(Event::Receipt { message_id: receipt.message_id, from: receipt.recipient }).await;
    }
}

/// The next round of measurements, for a client with candidate edges; never otherwise.
async fn next_round(choice: &mut Option<EdgeChoice>) -> ProbeRound {
    match choice.as_mut().and_then(|choice| choice.rounds.as_mut()) {
        Some(rounds) => match rounds.recv().await {
            Some(round) => round,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Exponential back-off from `min` to `max` with ±25 % jitter.
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    let base = min.saturating_mul(1u32 << exponent).min(max);
    jitter(base).min(max)
}

fn jitter(base: Duration) -> Duration {
    let factor = rand::thread_rng().gen_range(0.75..=1.25);
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let min = Duration::from_secs(1);
        let max = Duration::from_secs(30);
        for failures in 1..40 {
            let delay = backoff(min, max, failures);
            assert!(delay >= min.mul_f64(0.75) && delay <= max, "{failures}: {delay:?}");
        }
        assert!(backoff(min, max, 1) <= Duration::from_millis(1250));
        assert!(backoff(min, max, 10) >= Duration::from_millis(22_500));
    }

    #[test]
    fn dedup_remembers_recent_ids_within_capacity() {
        let mut dedup = Dedup::new(3);
        let id = |n: u8| MessageId::from_bytes([n; 16]);
        assert!(dedup.first_time(id(1)));
        assert!(!dedup.first_time(id(1)));
        for n in 2..=4 {
            assert!(dedup.first_time(id(n)));
        }
        assert_eq!(dedup.ids.len(), 3);
        assert!(dedup.first_time(id(1)), "the oldest id was forgotten");
    }
}
