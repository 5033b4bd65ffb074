//! The relay: per-connection sessions, routing, receipts and the drain of stored messages.
//!
//! Each agent connection is a [`Session`] with one bidirectional QUIC stream, opened by
//! the agent, carrying [`Frame`]s both ways. Three tasks serve it:
//!
//! * the **reader** decodes frames and admits messages in batches: cheap checks first
//!   (sender is the peer, rate limits, time window), then one batched Ed25519
//!   verification, then the replay window, then routing;
//! * the **writer** owns the send half: it drains the session's bounded outbound queue,
//!   waits for store commits where an answer depends on one, and coalesces frames into
//!   one stream write;
//! * the **drainer** hands the agent its stored backlog in order, a bounded window at a
//!   time, and deletes each record when the agent's receipt arrives.
//!
//! Routing: the recipient's primary session if it is connected, its backlog is drained
//! and its queue has room (answer `Forwarded`, the message is tracked until its receipt);
//! otherwise the offline store (answer `Stored` after the fsync). Messages forwarded but
//! not receipted when a session ends go back to the store.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use crate::metrics as names;
use molt_protocol::envelope::EnvelopeView;
use molt_protocol::frame::{Disposition, Frame, FrameReader, RejectCode};
use molt_protocol::keys::{PublicKey, Signature, verify_each};
use molt_protocol::receipt::Receipt;
use molt_protocol::replay::{ReplayError, ReplayWindow, check_time};
use molt_protocol::{AgentId, MessageId, UnixMillis};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use crate::federation::{Federation, LINK_ANSWER_TIMEOUT, LinkAnswer, Whereabouts};
use crate::ratelimit::MessageLimiter;
use crate::store::{OfflineStore, PutOutcome, RecordKind, StoreError};

/// Bytes asked of the stream per read.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Most bytes gathered from the stream before the envelopes read so far are admitted.
pub const GATHER_BYTES_MAX: usize = 256 * 1024;
/// Most bytes the writer coalesces into one stream write.
pub const WRITE_COALESCE_BYTES: usize = 256 * 1024;
/// Stored messages handed to a session and not yet receipted, at most.
pub const DRAIN_WINDOW: usize = 4096;
/// Forwarded messages awaiting their receipt per session, at most; beyond it messages
/// are stored instead.
pub const INFLIGHT_MAX: usize = 8192;
/// How often an idle drainer checks whether the store holds something for its agent that
/// no one woke it for (stored by a sender that routed before the session registered).
pub const DRAIN_RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// QUIC application close codes.
pub mod close_code {
    pub const NORMAL: u32 = 0;
    pub const PROTOCOL_VIOLATION: u32 = 1;
    pub const ABUSIVE: u32 = 2;
    pub const SHUTTING_DOWN: u32 = 3;
    pub const CONNECTION_LIMIT: u32 = 4;
    pub const NO_SESSION_STREAM: u32 = 5;
    pub const REVOKED: u32 = 6;
}

#[derive(Clone, Copy, Debug)]
pub struct RelayConfig {
    pub clock_skew: Duration,
    pub bad_messages_max: u32,
    pub outbound_queue_depth: usize,
    pub replay_window_capacity: usize,
    /// Longest a message is buffered, whatever its TTL says.
    pub retention: Duration,
}

/// What the writer task sends, in order.
#[derive(Debug)]
pub enum Outbound {
    Frame(Frame),
    /// A directly forwarded envelope, with when the edge received it (for latency).
    Deliver {
        bytes: Vec<u8>,
        received: Instant,
    },
    /// Answer once the store has decided; then wake the recipient's drainer.
    AfterCommit {
        message_id: MessageId,
        outcome: oneshot::Receiver<Result<PutOutcome, StoreError>>,
        wake: Option<Arc<Session>>,
    },
    /// Answer with another edge's answer; if it does not come, buffer the message here.
    Remote {
        message_id: MessageId,
        answer: oneshot::Receiver<LinkAnswer>,
        fallback: Fallback,
    },
}

/// What is needed to buffer a message here when the edge it was passed to does not answer.
#[derive(Debug)]
pub struct Fallback {
    store: OfflineStore,
    recipient: AgentId,
    expires_at: UnixMillis,
    bytes: Vec<u8>,
}

struct Inflight {
    bytes: Vec<u8>,
    expires_at: UnixMillis,
}

/// One agent connection's shared state.
pub struct Session {
    pub id: u64,
    pub agent: AgentId,
    pub key: PublicKey,
    outbound: mpsc::Sender<Outbound>,
    inflight: Mutex<HashMap<MessageId, Inflight>>,
    drained_unreceipted: Mutex<HashSet<MessageId>>,
    drain_window: Semaphore,
    direct: AtomicBool,
    wake_drain: Notify,
    closed: AtomicBool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("id", &self.id).field("agent", &self.agent).finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(id: u64, agent: AgentId, key: PublicKey, outbound: mpsc::Sender<Outbound>) -> Arc<Session> {
        Arc::new(Session {
            id,
            agent,
            key,
            outbound,
            inflight: Mutex::new(HashMap::new()),
            drained_unreceipted: Mutex::new(HashSet::new()),
            drain_window: Semaphore::new(DRAIN_WINDOW),
            direct: AtomicBool::new(false),
            wake_drain: Notify::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// Queues a frame without waiting; false if the queue is full or closed.
    pub fn try_send(&self, frame: Frame) -> bool {
        self.outbound.try_send(Outbound::Frame(frame)).is_ok()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// State shared by every session of one edge.
pub struct Relay {
    config: RelayConfig,
    store: OfflineStore,
    limiter: MessageLimiter,
    replay: Mutex<ReplayWindow>,
    sessions: RwLock<HashMap<AgentId, Vec<Arc<Session>>>>,
    next_session_id: AtomicU64,
    federation: OnceLock<Arc<Federation>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("config", &self.config).finish_non_exhaustive()
    }
}

/// A message that passed the cheap checks and awaits signature verification.
struct Candidate {
    bytes: Vec<u8>,
    signed_len: usize,
    signature: Signature,
    message_id: MessageId,
    recipient: AgentId,
    timestamp: UnixMillis,
    expires_at: UnixMillis,
}

impl Relay {
    pub fn new(config: RelayConfig, store: OfflineStore, limiter: MessageLimiter) -> Arc<Relay> {
        Arc::new(Relay {
            replay: Mutex::new(ReplayWindow::new(config.clock_skew, config.replay_window_capacity)),
            config,
            store,
            limiter,
            sessions: RwLock::new(HashMap::new()),
            next_session_id: AtomicU64::new(1),
            federation: OnceLock::new(),
        })
    }

    /// Routes messages for agents connected elsewhere through `federation` from now on.
    pub fn set_federation(&self, federation: Arc<Federation>) {
        let _ = self.federation.set(federation);
    }

    /// Whether `agent` has a session here.
    pub fn has_session(&self, agent: &AgentId) -> bool {
        self.primary(agent).is_some()
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    pub fn store(&self) -> &OfflineStore {
        &self.store
    }

    pub fn limiter(&self) -> &MessageLimiter {
        &self.limiter
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds a session; the first session of an agent is its primary.
    pub fn register(&self, session: &Arc<Session>) {
        let mut sessions = self.sessions.write().unwrap_or_else(|p| p.into_inner());
        sessions.entry(session.agent).or_default().push(session.clone());
        metrics::gauge!(names::CONNECTIONS).increment(1.0);
    }

    /// Removes a session, promotes the next one of the same agent, and puts its
    /// unreceipted forwarded messages back into the store.
    pub async fn unregister(&self, session: &Arc<Session>) {
        session.closed.store(true, Ordering::Release);
        session.wake_drain.notify_one();
        let promoted = {
            let mut sessions = self.sessions.write().unwrap_or_else(|p| p.into_inner());
            let mut promoted = None;
            if let Some(list) = sessions.get_mut(&session.agent) {
                let was_primary = list.first().is_some_and(|s| s.id == session.id);
                list.retain(|s| s.id != session.id);
                if was_primary {
                    promoted = list.first().cloned();
                }
                if list.is_empty() {
                    sessions.remove(&session.agent);
                }
            }
            promoted
        };
        metrics::gauge!(names::CONNECTIONS).decrement(1.0);
        let orphans: Vec<(MessageId, Inflight)> = lock(&session.inflight).drain().collect();
        for (message_id, inflight) in orphans {
            let outcome = self
                .store
                .put(session.agent, RecordKind::Envelope, message_id, inflight.expires_at, inflight.bytes)
                .await;
            if let Err(error) = outcome {
                tracing::warn!(%message_id, agent = %session.agent, %error, "could not keep an undelivered message");
            }
        }
        if let Some(next) = promoted {
            next.wake_drain.notify_one();
        }
    }

    /// An agent with nothing buffered can take live traffic at once; otherwise the
    /// drainer switches it to live traffic when its backlog is delivered.
    pub fn prime(&self, session: &Session) {
        if self.store.depth(session.agent) == 0 && self.is_primary(session) {
            session.direct.store(true, Ordering::Release);
        }
    }

    fn primary(&self, agent: &AgentId) -> Option<Arc<Session>> {
        let sessions = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        sessions.get(agent).and_then(|list| list.first().cloned())
    }

    fn is_primary(&self, session: &Session) -> bool {
        self.primary(&session.agent).is_some_and(|p| p.id == session.id)
    }

    /// Every live session (for go-away notices and revocation sweeps).
    pub fn all_sessions(&self) -> Vec<Arc<Session>> {
        let sessions = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        sessions.values().flatten().cloned().collect()
    }

    /// Admits the `Send` frames read in one go from `session`. Returns how many were bad
    /// (malformed, forged or spoofed) so the caller can spot an abusive peer.
    pub async fn admit(&self, session: &Arc<Session>, envelopes: Vec<Vec<u8>>, now: UnixMillis) -> u32 {
        let mut bad = 0;
        let mut candidates = Vec::with_capacity(envelopes.len());
        for bytes in envelopes {
            match self.precheck(session, bytes, now) {
                Ok(candidate) => candidates.push(candidate),
                Err((message_id, code, detail, is_bad)) => {
                    bad += u32::from(is_bad);
                    self.reject(session, message_id, code, detail).await;
                }
            }
        }
        let verified = verify_candidates(&session.key, &candidates);
        for (candidate, ok) in candidates.into_iter().zip(verified) {
            if !ok {
                bad += 1;
                metrics::counter!(names::VERIFY_FAILURES_TOTAL).increment(1);
                self.reject(
                    session,
                    candidate.message_id,
                    RejectCode::BadSignature,
                    "signature does not verify".into(),
                )
                .await;
                continue;
            }
            let replay = lock(&self.replay).check_id(candidate.message_id, candidate.timestamp, now);
            if let Err(error) = replay {
                let code = match error {
                    ReplayError::Duplicate => RejectCode::Duplicate,
                    ReplayError::FromFuture => RejectCode::FromFuture,
                    ReplayError::Expired => RejectCode::Expired,
                    _ => RejectCode::TooOld,
                };
                self.reject(session, candidate.message_id, code, error.to_string()).await;
                continue;
            }
            metrics::counter!(names::MESSAGES_RECEIVED_TOTAL).increment(1);
            self.route(session, candidate).await;
        }
        bad
    }

    #[allow(clippy::result_large_err)]
    fn precheck(
        &self,
        session: &Session,
        bytes: Vec<u8>,
        now: UnixMillis,
    ) -> Result<Candidate, (MessageId, RejectCode, String, bool)> {
        let unknown = MessageId::from_bytes([0; 16]);
        let view = EnvelopeView::decode(&bytes).map_err(|e| (unknown, RejectCode::Malformed, e.to_string(), true))?;
        let header = view.header;
        if header.sender != session.agent {
            return Err((
                header.message_id,
                RejectCode::SenderMismatch,
                format!("sender {} is not the connected agent {}", header.sender, session.agent),
                true,
            ));
        }
        if let Err(limit) = self.limiter.check(&session.agent, bytes.len()) {
            metrics::counter!(names::RATE_LIMITED_TOTAL).increment(1);
            return Err((header.message_id, RejectCode::RateLimited, limit.to_string(), false));
        }
        if let Err(error) = check_time(&header, now, self.config.clock_skew) {
            let code = match error {
                ReplayError::FromFuture => RejectCode::FromFuture,
                ReplayError::Expired => RejectCode::Expired,
                _ => RejectCode::TooOld,
            };
            return Err((header.message_id, code, error.to_string(), false));
        }
        let retention_end = now.saturating_add(self.config.retention);
        Ok(Candidate {
            signed_len: view.signed_bytes().len(),
            signature: view.signature,
            message_id: header.message_id,
            recipient: header.recipient,
            timestamp: header.timestamp,
            expires_at: header.expires_at().min(retention_end),
            bytes,
        })
    }

    async fn reject(&self, session: &Session, message_id: MessageId, code: RejectCode, detail: String) {
        metrics::counter!(names::REJECTED_TOTAL, names::LABEL_CODE => format!("{code:?}")).increment(1);
        let frame = Frame::Rejected { message_id, code, detail };
        let _ = session.outbound.send(Outbound::Frame(frame)).await;
    }

    async fn route(&self, sender: &Arc<Session>, candidate: Candidate) {
        let Candidate { bytes, message_id, recipient, expires_at, .. } = candidate;
        let target = self.primary(&recipient);
        if target.is_none()
            && let Some(federation) = self.federation.get()
            && let Whereabouts::Elsewhere { edge, addrs } = federation.whereabouts(recipient).await
            && let Some(answer) = federation.forward(edge, &addrs, bytes.clone())
        {
            let fallback = Fallback { store: self.store.clone(), recipient, expires_at, bytes };
            let _ = sender.outbound.send(Outbound::Remote { message_id, answer, fallback }).await;
            return;
        }
        if let Some(target) = &target
            && target.direct.load(Ordering::Acquire)
        {
            let has_room = {
                let mut inflight = lock(&target.inflight);
                if inflight.len() < INFLIGHT_MAX {
                    inflight.insert(message_id, Inflight { bytes: bytes.clone(), expires_at });
                    true
                } else {
                    false
                }
            };
            if has_room {
                match target.outbound.try_send(Outbound::Deliver { bytes, received: Instant::now() }) {
                    Ok(()) => {
                        let accepted = Frame::Accepted { message_id, disposition: Disposition::Forwarded };
                        let _ = sender.outbound.send(Outbound::Frame(accepted)).await;
                        return;
                    }
                    Err(error) => {
                        lock(&target.inflight).remove(&message_id);
                        let bytes = match error.into_inner() {
                            Outbound::Deliver { bytes, .. } => bytes,
                            _ => unreachable!("only a delivery was sent"),
                        };
                        return self
                            .store_for(sender, recipient, message_id, expires_at, bytes, target.clone().into())
                            .await;
                    }
                }
            }
        }
        self.store_for(sender, recipient, message_id, expires_at, bytes, target).await;
    }

    async fn store_for(
        &self,
        sender: &Arc<Session>,
        recipient: AgentId,
        message_id: MessageId,
        expires_at: UnixMillis,
        bytes: Vec<u8>,
        wake: Option<Arc<Session>>,
    ) {
        let outcome = self.store.put_deferred(recipient, RecordKind::Envelope, message_id, expires_at, bytes).await;
        let _ = sender.outbound.send(Outbound::AfterCommit { message_id, outcome, wake }).await;
    }

    /// A receipt from `session` (the recipient): forget the message and pass the receipt
    /// on to its sender. Returns false if the receipt was bad.
    ///
    /// The edge does not check the receipt's signature: the connection is authenticated
    /// by mutual TLS and the receipt must name the connected agent as its signer, so a
    /// receipt can only ever delete the peer's own messages. The signature is for the
    /// sender, whose SDK verifies it.
    pub async fn receipt(&self, session: &Arc<Session>, bytes: Vec<u8>) -> bool {
        let receipt = match Receipt::decode(&bytes) {
            Ok(receipt) => receipt,
            Err(error) => {
                self.reject(session, MessageId::from_bytes([0; 16]), RejectCode::Malformed, error.to_string()).await;
                return false;
            }
        };
        if receipt.recipient != session.agent {
            let detail = "a receipt must be signed by the connected agent".to_string();
            self.reject(session, receipt.message_id, RejectCode::NotRecipient, detail).await;
            return false;
        }
        let forwarded = lock(&session.inflight).remove(&receipt.message_id).is_some();
        if !forwarded {
            if lock(&session.drained_unreceipted).remove(&receipt.message_id) {
                session.drain_window.add_permits(1);
            }
            self.store.delete(session.agent, RecordKind::Envelope, receipt.message_id).await;
        }
        metrics::counter!(names::MESSAGES_DELIVERED_TOTAL).increment(1);
        let sender = self.primary(&receipt.sender);
        if sender.is_none()
            && let Some(federation) = self.federation.get()
            && let Whereabouts::Elsewhere { edge, addrs } = federation.whereabouts(receipt.sender).await
            && let Some(answer) = federation.forward_receipt(edge, &addrs, bytes.clone())
        {
            // The sender's edge takes it; if the link fails first, keep it here for the
            // hand-off.
            let store = self.store.clone();
            let retention = self.config.retention;
            tokio::spawn(async move {
                if !matches!(tokio::time::timeout(LINK_ANSWER_TIMEOUT, answer).await, Ok(Ok(LinkAnswer::Accepted(_)))) {
                    let expires_at = UnixMillis::now_from_system().saturating_add(retention);
                    let kept =
                        store.put(receipt.sender, RecordKind::Receipt, receipt.message_id, expires_at, bytes).await;
                    if let Err(error) = kept {
                        tracing::warn!(message_id = %receipt.message_id, %error, "could not keep a receipt");
                    }
                }
            });
            return true;
        }
        match sender {
            Some(sender) if sender.try_send(Frame::Receipt(bytes.clone())) => {}
            _ => {
                // The sender is away or busy: keep the receipt for it. Receipts are
                // advisory, so its answer is not awaited.
                let expires_at = UnixMillis::now_from_system().saturating_add(self.config.retention);
                drop(
                    self.store
                        .put_deferred(receipt.sender, RecordKind::Receipt, receipt.message_id, expires_at, bytes)
                        .await,
                );
            }
        }
        true
    }

    /// Takes an envelope another edge passed on: buffers it durably for its recipient,
    /// answers after the fsync, and wakes the recipient's session if it has one here.
    /// Returns false if the link's answer queue is closed.
    pub async fn accept_from_edge(&self, bytes: Vec<u8>, answers: &mpsc::Sender<Outbound>, now: UnixMillis) -> bool {
        let header = match EnvelopeView::decode(&bytes) {
            Ok(view) => view.header,
            Err(error) => return answer_malformed(answers, error.to_string()).await,
        };
        let refusal = if header.expires_at() <= now {
            Some((RejectCode::Expired, "the message expired".to_owned()))
        } else if header.timestamp > now.saturating_add(self.config.clock_skew) {
            Some((RejectCode::FromFuture, "the message is dated in the future".to_owned()))
        } else {
            None
        };
        if let Some((code, detail)) = refusal {
            let frame = Frame::Rejected { message_id: header.message_id, code, detail };
            return answers.send(Outbound::Frame(frame)).await.is_ok();
        }
        let expires_at = header.expires_at().min(now.saturating_add(self.config.retention));
        let wake = self.primary(&header.recipient);
        let outcome =
            self.store.put_deferred(header.recipient, RecordKind::Envelope, header.message_id, expires_at, bytes).await;
        answers.send(Outbound::AfterCommit { message_id: header.message_id, outcome, wake }).await.is_ok()
    }

    /// Takes a receipt another edge passed on: hands it to the sender's session here, or
    /// buffers it for the sender. Returns false if the link's answer queue is closed.
    pub async fn receipt_from_edge(&self, bytes: Vec<u8>, answers: &mpsc::Sender<Outbound>, now: UnixMillis) -> bool {
        let receipt = match Receipt::decode(&bytes) {
            Ok(receipt) => receipt,
            Err(error) => return answer_malformed(answers, error.to_string()).await,
        };
        let sender = self.primary(&receipt.sender);
        if let Some(sender) = &sender
            && sender.try_send(Frame::Receipt(bytes.clone()))
        {
            let frame = Frame::Accepted { message_id: receipt.message_id, disposition: Disposition::Forwarded };
            return answers.send(Outbound::Frame(frame)).await.is_ok();
        }
        let expires_at = now.saturating_add(self.config.retention);
        let outcome =
            self.store.put_deferred(receipt.sender, RecordKind::Receipt, receipt.message_id, expires_at, bytes).await;
        answers.send(Outbound::AfterCommit { message_id: receipt.message_id, outcome, wake: sender }).await.is_ok()
    }

    /// Hands `session` its stored backlog, in order, while it stays the agent's primary
    /// session. Returns when the session closes.
    pub async fn drain(&self, session: Arc<Session>) {
        let mut after = None;
        loop {
            if session.closed.load(Ordering::Acquire) {
                return;
            }
            if !self.is_primary(&session) {
                session.wake_drain.notified().await;
                continue;
            }
            let records = match self.store.pending(
                session.agent,
                after,
                crate::store::READ_BATCH_MAX,
                UnixMillis::now_from_system(),
            ) {
                Ok(records) => records,
                Err(error) => {
                    tracing::error!(%error, agent = %session.agent, "reading the offline buffer failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if records.is_empty() {
                if !session.direct.swap(true, Ordering::AcqRel) {
                    // Look once more: something may have been stored just before the switch.
                    continue;
                }
                // A message routed before this session registered, and committed after the
                // look above, wakes no one: look again while the store holds something.
                while tokio::time::timeout(DRAIN_RECHECK_INTERVAL, session.wake_drain.notified()).await.is_err()
                    && self.store.depth(session.agent) == 0
                    && !session.closed.load(Ordering::Acquire)
                {}
                continue;
            }
            for record in records {
                after = Some(record.sequence);
                match record.kind {
                    RecordKind::Envelope => {
                        let Ok(permit) = session.drain_window.acquire().await else { return };
                        permit.forget();
                        lock(&session.drained_unreceipted).insert(record.message_id);
                        if session.outbound.send(Outbound::Frame(Frame::Deliver(record.bytes))).await.is_err() {
                            return;
                        }
                    }
                    RecordKind::Receipt => {
                        if session.outbound.send(Outbound::Frame(Frame::Receipt(record.bytes))).await.is_err() {
                            return;
                        }
                        self.store.delete(session.agent, RecordKind::Receipt, record.message_id).await;
                    }
                }
            }
        }
    }
}

/// Answers a link's request that does not decode; false if the answer queue is closed.
async fn answer_malformed(answers: &mpsc::Sender<Outbound>, detail: String) -> bool {
    let frame = Frame::Rejected { message_id: MessageId::from_bytes([0; 16]), code: RejectCode::Malformed, detail };
    answers.send(Outbound::Frame(frame)).await.is_ok()
}

/// Verifies all candidates' signatures with one batch when possible.
fn verify_candidates(key: &PublicKey, candidates: &[Candidate]) -> Vec<bool> {
    let messages: Vec<&[u8]> = candidates.iter().map(|c| &c.bytes[..c.signed_len]).collect();
    let signatures: Vec<Signature> = candidates.iter().map(|c| c.signature).collect();
    verify_each(&messages, &signatures, &vec![*key; candidates.len()])
}

/// Polls a future once: its value if it is ready now, else `None`. A stream read that is
/// not ready registers a no-op waker, which the next real `.await` replaces.
fn now_or_never<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(value) => Some(value),
        std::task::Poll::Pending => None,
    }
}

/// Reads frames from the session stream until it ends. Returns the close code to use.
pub async fn read_loop(relay: &Arc<Relay>, session: &Arc<Session>, mut recv: quinn::RecvStream) -> u32 {
    let mut reader = FrameReader::new();
    let mut bad_messages: u32 = 0;
    loop {
        let chunk = match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return close_code::NORMAL,
            Err(error) => {
                tracing::debug!(agent = %session.agent, %error, "session stream ended");
                return close_code::NORMAL;
            }
        };
        reader.extend(&chunk.bytes);
        // Take whatever else the stream already holds, so one batch verification covers
        // as many envelopes as possible.
        let mut gathered = chunk.bytes.len();
        while gathered < GATHER_BYTES_MAX {
            match now_or_never(recv.read_chunk(READ_CHUNK_BYTES, true)) {
                Some(Ok(Some(more))) => {
                    gathered += more.bytes.len();
                    reader.extend(&more.bytes);
                }
                _ => break,
            }
        }
        let mut envelopes = Vec::new();
        loop {
            match reader.next_frame() {
                Ok(Some(Frame::Send(bytes))) => envelopes.push(bytes),
                Ok(Some(other)) => {
                    if !envelopes.is_empty() {
                        let now = UnixMillis::now_from_system();
                        bad_messages += relay.admit(session, std::mem::take(&mut envelopes), now).await;
                    }
                    bad_messages += u32::from(!handle_control(relay, session, other).await);
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::info!(agent = %session.agent, %error, "closing a connection that sent a malformed frame");
                    metrics::counter!(names::REJECTED_TOTAL, names::LABEL_CODE => "MalformedFrame").increment(1);
                    let _ = session.outbound.try_send(Outbound::Frame(Frame::Rejected {
                        message_id: MessageId::from_bytes([0; 16]),
                        code: RejectCode::Malformed,
                        detail: error.to_string(),
                    }));
                    return close_code::PROTOCOL_VIOLATION;
                }
            }
        }
        if !envelopes.is_empty() {
            bad_messages += relay.admit(session, envelopes, UnixMillis::now_from_system()).await;
        }
        if bad_messages > relay.config.bad_messages_max {
            tracing::warn!(agent = %session.agent, bad_messages, "closing an abusive connection");
            return close_code::ABUSIVE;
        }
    }
}

/// Handles a non-`Send` frame from an agent. Returns false if it was bad.
async fn handle_control(relay: &Arc<Relay>, session: &Arc<Session>, frame: Frame) -> bool {
    match frame {
        Frame::Receipt(bytes) => relay.receipt(session, bytes).await,
        Frame::Ping(nonce) => {
            let _ = session.outbound.send(Outbound::Frame(Frame::Pong(nonce))).await;
            true
        }
        Frame::Pong(_) => true,
        other => {
            let detail = format!("agents may not send {:?} frames", std::mem::discriminant(&other));
            relay.reject(session, MessageId::from_bytes([0; 16]), RejectCode::Malformed, detail).await;
            false
        }
    }
}

/// Writes the session's outbound queue to the stream, coalescing frames.
pub async fn write_loop(mut receiver: mpsc::Receiver<Outbound>, mut send: quinn::SendStream) {
    let mut buffer = Vec::with_capacity(WRITE_COALESCE_BYTES);
    while let Some(first) = receiver.recv().await {
        buffer.clear();
        encode_outbound(first, &mut buffer).await;
        while buffer.len() < WRITE_COALESCE_BYTES {
            match receiver.try_recv() {
                Ok(next) => encode_outbound(next, &mut buffer).await,
                Err(_) => break,
            }
        }
        if send.write_all(&buffer).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

async fn encode_outbound(item: Outbound, buffer: &mut Vec<u8>) {
    match item {
        Outbound::Frame(frame) => frame.encode_into(buffer),
        Outbound::Deliver { bytes, received } => {
            metrics::histogram!(names::DELIVERY_LATENCY_SECONDS).record(received.elapsed().as_secs_f64());
            Frame::Deliver(bytes).encode_into(buffer);
        }
        Outbound::AfterCommit { message_id, outcome, wake } => {
            let frame = stored_answer(message_id, outcome.await.ok());
            frame.encode_into(buffer);
            if let Some(session) = wake {
                session.wake_drain.notify_one();
            }
        }
        Outbound::Remote { message_id, answer, fallback } => {
            let frame = match tokio::time::timeout(LINK_ANSWER_TIMEOUT, answer).await {
                Ok(Ok(LinkAnswer::Accepted(disposition))) => {
                    metrics::counter!(names::PEER_FORWARDED_TOTAL, names::LABEL_OUTCOME => "accepted").increment(1);
                    Frame::Accepted { message_id, disposition }
                }
                Ok(Ok(LinkAnswer::Rejected { code, detail })) => {
                    metrics::counter!(names::PEER_FORWARDED_TOTAL, names::LABEL_OUTCOME => "rejected").increment(1);
                    metrics::counter!(names::REJECTED_TOTAL, names::LABEL_CODE => format!("{code:?}")).increment(1);
                    Frame::Rejected { message_id, code, detail }
                }
                Ok(Err(_)) | Err(_) => {
                    // The link failed or stalled: keep the message here; the hand-off
                    // passes it on once the recipient's edge can be reached.
                    metrics::counter!(names::PEER_FORWARDED_TOTAL, names::LABEL_OUTCOME => "kept").increment(1);
                    let Fallback { store, recipient, expires_at, bytes } = fallback;
                    let kept = store.put(recipient, RecordKind::Envelope, message_id, expires_at, bytes).await;
                    stored_answer(message_id, Some(kept))
                }
            };
            frame.encode_into(buffer);
        }
    }
}

/// The answer to a message once the buffer has decided; `None` if the buffer closed.
fn stored_answer(message_id: MessageId, outcome: Option<Result<PutOutcome, StoreError>>) -> Frame {
    let frame = match outcome {
        Some(Ok(PutOutcome::Stored)) => Frame::Accepted { message_id, disposition: Disposition::Stored },
        Some(Ok(PutOutcome::Duplicate)) => {
            Frame::Rejected { message_id, code: RejectCode::Duplicate, detail: "message is already buffered".into() }
        }
        Some(Err(error @ (StoreError::RecipientQueueFull { .. } | StoreError::BufferFull))) => {
            Frame::Rejected { message_id, code: RejectCode::QueueFull, detail: error.to_string() }
        }
        Some(Err(StoreError::Closed)) | None => {
            Frame::Rejected { message_id, code: RejectCode::ShuttingDown, detail: "edge is shutting down".into() }
        }
        Some(Err(error)) => Frame::Rejected { message_id, code: RejectCode::Internal, detail: error.to_string() },
    };
    if let Frame::Rejected { code, .. } = &frame {
        metrics::counter!(names::REJECTED_TOTAL, names::LABEL_CODE => format!("{code:?}")).increment(1);
    }
    frame
}
