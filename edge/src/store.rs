//! The durable offline buffer: per-recipient FIFO queues in redb.
//!
//! One writer thread owns every write and commits in groups: it takes whatever requests
//! are queued (up to [`GROUP_COMMIT_MAX`]), applies them in one transaction, fsyncs once,
//! then answers them all. An answer of [`PutOutcome::Stored`] therefore means the message
//! is on disk. Readers use redb's snapshots and never wait for the writer.
//!
//! Layout: one table, `queue`, maps `recipient ‖ sequence` to
//! `expires_at ‖ kind ‖ message id ‖ bytes`. The writer keeps an in-memory index from
//! `(kind, message id)` to queue key, rebuilt by one scan at open, so a message is stored
//! at most once and a receipt deletes it by id with a single B-tree operation. Quotas (per
//! recipient, total messages, total bytes) are checked by the writer against counters
//! rebuilt by the same scan. A failed commit rolls the in-memory state back from an undo
//! log, so memory never runs ahead of disk.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use molt_protocol::{AgentId, MessageId, UnixMillis};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

const QUEUE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("queue");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQUENCE: &str = "next_sequence";

/// Most requests applied in one transaction (one fsync).
pub const GROUP_COMMIT_MAX: usize = 8192;
/// Requests waiting for the writer thread; senders wait (backpressure) beyond this.
pub const WRITE_QUEUE_DEPTH_MAX: usize = 65_536;
/// Most messages one [`OfflineStore::pending`] call returns.
pub const READ_BATCH_MAX: usize = 4096;

const KEY_LEN: usize = 16 + 8;
const VALUE_HEADER_LEN: usize = 8 + 1 + 16;

/// What a stored record is: an envelope for the recipient, or a receipt for a sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Envelope = 1,
    Receipt = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    pub queue_depth_per_agent_max: u32,
    pub messages_max: u64,
    pub bytes_max: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    /// Already stored under this id: nothing written.
    Duplicate,
}

/// Why the store refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("recipient queue is full ({depth} messages)")]
    RecipientQueueFull { depth: u32 },
    #[error("offline buffer is full")]
    BufferFull,
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("store is shut down")]
    Closed,
}

fn storage<E: std::fmt::Display>(error: E) -> StoreError {
    StoreError::Storage(error.to_string())
}

/// A record read back for delivery.
#[derive(Clone, Debug)]
pub struct StoredRecord {
    pub sequence: u64,
    pub kind: RecordKind,
    pub message_id: MessageId,
    pub expires_at: UnixMillis,
    pub bytes: Vec<u8>,
}

/// Occupancy, for metrics and admission.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub messages: u64,
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    per_recipient: HashMap<AgentId, u32>,
    total: Occupancy,
}

enum Request {
    Put {
        recipient: AgentId,
        kind: RecordKind,
        message_id: MessageId,
        expires_at: UnixMillis,
        bytes: Vec<u8>,
        reply: Option<oneshot::Sender<Result<PutOutcome, StoreError>>>,
    },
    Delete {
        recipient: AgentId,
        kind: RecordKind,
        message_id: MessageId,
    },
    Purge {
        now: UnixMillis,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

/// Handle to the offline buffer; cheap to clone.
#[derive(Clone, Debug)]
pub struct OfflineStore {
    db: Arc<Database>,
    counters: Arc<Mutex<Counters>>,
    requests: mpsc::Sender<Request>,
    /// Shared with the writer thread, which reads it for every put: a config reload can
    /// change the quotas while the edge runs.
    limits: Arc<std::sync::RwLock<StoreLimits>>,
}

/// Joins the writer thread when the last store handle is gone and its queue drained.
#[derive(Debug)]
pub struct WriterGuard(Option<thread::JoinHandle<()>>);

impl WriterGuard {
    /// Waits until every queued request is committed. Call after dropping all handles.
    pub fn join(mut self) {
        if let Some(handle) = self.0.take() {
            let _ = handle.join();
        }
    }
}

impl OfflineStore {
    /// Opens (or creates) the buffer at `path`, rebuilding quota counters from disk.
    pub fn open(path: &Path, limits: StoreLimits) -> Result<(OfflineStore, WriterGuard), StoreError> {
        let db = Arc::new(Database::create(path).map_err(storage)?);
        let state = rebuild(&db)?;
        let counters =
            Arc::new(Mutex::new(Counters { per_recipient: state.per_recipient.clone(), total: state.total }));
        let (requests, receiver) = mpsc::channel(WRITE_QUEUE_DEPTH_MAX);
        let limits = Arc::new(std::sync::RwLock::new(limits));
        let writer =
            Writer { db: db.clone(), published: counters.clone(), limits: limits.clone(), state, undo: Vec::new() };
        let handle = thread::Builder::new()
            .name("molt-store-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(storage)?;
        Ok((OfflineStore { db, counters, requests, limits }, WriterGuard(Some(handle))))
    }

    /// Stores a record; resolves once it is fsynced (or refused).
    pub async fn put(
        &self,
        recipient: AgentId,
        kind: RecordKind,
        message_id: MessageId,
        expires_at: UnixMillis,
        bytes: Vec<u8>,
    ) -> Result<PutOutcome, StoreError> {
        let answer = self.put_deferred(recipient, kind, message_id, expires_at, bytes).await;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues a put and returns at once; the receiver resolves after the fsync. A closed
    /// store drops the request, and the caller sees a closed receiver.
    pub async fn put_deferred(
        &self,
        recipient: AgentId,
        kind: RecordKind,
        message_id: MessageId,
        expires_at: UnixMillis,
        bytes: Vec<u8>,
    ) -> oneshot::Receiver<Result<PutOutcome, StoreError>> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Put { recipient, kind, message_id, expires_at, bytes, reply: Some(reply) };
        let _ = self.requests.send(request).await;
        answer
    }

    /// Deletes a record (a receipt arrived, or a receipt record was handed over). Batched
    /// with the next commit; deleting what is not there is not an error.
    pub async fn delete(&self, recipient: AgentId, kind: RecordKind, message_id: MessageId) {
        let _ = self.requests.send(Request::Delete { recipient, kind, message_id }).await;
    }

    /// Drops expired records; returns how many.
    pub async fn purge_expired(&self, now: UnixMillis) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(Request::Purge { now, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Up to `limit` unexpired records for `recipient` with sequence > `after`, in order.
    pub fn pending(
        &self,
        recipient: AgentId,
        after: Option<u64>,
        limit: usize,
        now: UnixMillis,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let start = queue_key(recipient, after.map_or(0, |s| s.saturating_add(1)));
        let end = queue_key(recipient, u64::MAX);
        let read = self.db.begin_read().map_err(storage)?;
        let table = match read.open_table(QUEUE) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(error) => return Err(storage(error)),
        };
        let mut records = Vec::new();
        for entry in table.range::<&[u8]>(start.as_slice()..=end.as_slice()).map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            let Some(record) = decode_record(key.value(), value.value()) else { continue };
            if record.expires_at <= now {
                continue;
            }
            records.push(record);
            if records.len() >= limit.min(READ_BATCH_MAX) {
                break;
            }
        }
        Ok(records)
    }

    /// Up to `limit` recipients with at least one buffered record.
    pub fn backlogged(&self, limit: usize) -> Vec<AgentId> {
        let counters = self.lock_counters();
        counters.per_recipient.iter().filter(|(_, depth)| **depth > 0).map(|(agent, _)| *agent).take(limit).collect()
    }

    pub fn depth(&self, recipient: AgentId) -> u32 {
        self.lock_counters().per_recipient.get(&recipient).copied().unwrap_or(0)
    }

    pub fn occupancy(&self) -> Occupancy {
        self.lock_counters().total
    }

    pub fn limits(&self) -> StoreLimits {
        *self.limits.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Changes the quotas for every later put. Messages already buffered stay, even above
    /// a lowered quota; new ones are refused until the buffer is below it.
    pub fn set_limits(&self, limits: StoreLimits) {
        *self.limits.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = limits;
    }

    fn lock_counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn queue_key(recipient: AgentId, sequence: u64) -> [u8; KEY_LEN] {
    let mut key = [0u8; KEY_LEN];
    key[..16].copy_from_slice(recipient.as_bytes());
    key[16..].copy_from_slice(&sequence.to_be_bytes());
    key
}

type IdKey = (RecordKind, MessageId);
type QueueKey = [u8; KEY_LEN];

fn decode_record(key: &[u8], value: &[u8]) -> Option<StoredRecord> {
    if key.len() != KEY_LEN || value.len() < VALUE_HEADER_LEN {
        return None;
    }
    let sequence = u64::from_be_bytes(key[16..].try_into().ok()?);
    let expires_at = UnixMillis(u64::from_be_bytes(value[..8].try_into().ok()?));
    let kind = match value[8] {
        1 => RecordKind::Envelope,
        2 => RecordKind::Receipt,
        _ => return None,
    };
    let message_id = MessageId::from_bytes(value[9..25].try_into().ok()?);
    Some(StoredRecord { sequence, kind, message_id, expires_at, bytes: value[VALUE_HEADER_LEN..].to_vec() })
}

fn recipient_of(key: &[u8]) -> Option<AgentId> {
    AgentId::from_slice(key.get(..16)?).ok()
}

/// The writer's view of what is on disk.
#[derive(Debug, Default)]
struct State {
    index: HashMap<IdKey, QueueKey>,
    per_recipient: HashMap<AgentId, u32>,
    total: Occupancy,
}

fn rebuild(db: &Database) -> Result<State, StoreError> {
    let mut state = State::default();
    let read = db.begin_read().map_err(storage)?;
    let table = match read.open_table(QUEUE) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(state),
        Err(error) => return Err(storage(error)),
    };
    for entry in table.iter().map_err(storage)? {
        let (key, value) = entry.map_err(storage)?;
        let (Some(record), Some(recipient)) = (decode_record(key.value(), value.value()), recipient_of(key.value()))
        else {
            continue;
        };
        let Ok(queue_key) = QueueKey::try_from(key.value()) else { continue };
        state.index.insert((record.kind, record.message_id), queue_key);
        state.count(recipient, value.value().len() as u64, true);
    }
    Ok(state)
}

impl State {
    fn count(&mut self, recipient: AgentId, size: u64, added: bool) {
        let depth = self.per_recipient.entry(recipient).or_default();
        if added {
            *depth += 1;
            self.total.messages += 1;
            self.total.bytes += size;
        } else {
            *depth = depth.saturating_sub(1);
            if *depth == 0 {
                self.per_recipient.remove(&recipient);
            }
            self.total.messages = self.total.messages.saturating_sub(1);
            self.total.bytes = self.total.bytes.saturating_sub(size);
        }
    }
}

/// How to take back one change to [`State`] if its commit fails.
enum Undo {
    Indexed(IdKey),
    Unindexed(IdKey, QueueKey),
    Counted { recipient: AgentId, size: u64, added: bool },
}

struct Writer {
    db: Arc<Database>,
    /// Counters as of the last successful commit, for readers.
    published: Arc<Mutex<Counters>>,
    limits: Arc<std::sync::RwLock<StoreLimits>>,
    state: State,
    undo: Vec<Undo>,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

impl Writer {
    fn run(mut self, mut receiver: mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(GROUP_COMMIT_MAX);
        while let Some(first) = receiver.blocking_recv() {
            batch.push(first);
            while batch.len() < GROUP_COMMIT_MAX {
                match receiver.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.commit(&mut batch);
        }
    }

    /// Applies a batch in one transaction. On a storage failure every request in the
    /// batch is answered with the error and the in-memory state is rolled back.
    fn commit(&mut self, batch: &mut Vec<Request>) {
        let mut put_replies: Vec<(Reply<PutOutcome>, Result<PutOutcome, StoreError>)> = Vec::new();
        let mut purge_replies: Vec<(Reply<u64>, u64)> = Vec::new();
        self.undo.clear();
        let result = self.apply(batch, &mut put_replies, &mut purge_replies);
        if let Err(error) = result {
            self.roll_back();
            tracing::error!(%error, "offline buffer commit failed");
            for (reply, _) in put_replies {
                let _ = reply.send(Err(error.clone()));
            }
            for (reply, _) in purge_replies {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        self.publish();
        for (reply, outcome) in put_replies {
            let _ = reply.send(outcome);
        }
        for (reply, purged) in purge_replies {
            let _ = reply.send(Ok(purged));
        }
    }

    fn roll_back(&mut self) {
        while let Some(undo) = self.undo.pop() {
            match undo {
                Undo::Indexed(id) => {
                    self.state.index.remove(&id);
                }
                Undo::Unindexed(id, key) => {
                    self.state.index.insert(id, key);
                }
                Undo::Counted { recipient, size, added } => self.state.count(recipient, size, !added),
            }
        }
    }

    /// Copies the counters the batch touched to where readers see them.
    fn publish(&mut self) {
        let mut published = self.published.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for undo in &self.undo {
            if let Undo::Counted { recipient, .. } = undo {
                match self.state.per_recipient.get(recipient) {
                    Some(depth) => published.per_recipient.insert(*recipient, *depth),
                    None => published.per_recipient.remove(recipient),
                };
            }
        }
        published.total = self.state.total;
    }

    fn apply(
        &mut self,
        batch: &mut Vec<Request>,
        put_replies: &mut Vec<(Reply<PutOutcome>, Result<PutOutcome, StoreError>)>,
        purge_replies: &mut Vec<(Reply<u64>, u64)>,
    ) -> Result<(), StoreError> {
        let write = self.db.begin_write().map_err(storage)?;
        {
            let mut queue = write.open_table(QUEUE).map_err(storage)?;
            let mut meta = write.open_table(META).map_err(storage)?;
            let mut next_sequence = meta.get(NEXT_SEQUENCE).map_err(storage)?.map_or(1, |v| v.value());
            for request in batch.drain(..) {
                match request {
                    Request::Put { recipient, kind, message_id, expires_at, bytes, reply } => {
                        let record = NewRecord { recipient, kind, message_id, expires_at, bytes: &bytes };
                        let outcome = self.put_one(&mut queue, &mut next_sequence, record)?;
                        if let Some(reply) = reply {
                            put_replies.push((reply, outcome));
                        }
                    }
                    Request::Delete { recipient, kind, message_id } => {
                        self.delete_one(&mut queue, recipient, (kind, message_id))?;
                    }
                    Request::Purge { now, reply } => {
                        let purged = self.purge(&mut queue, now)?;
                        purge_replies.push((reply, purged));
                    }
                }
            }
            meta.insert(NEXT_SEQUENCE, next_sequence).map_err(storage)?;
        }
        write.commit().map_err(storage)
    }

    fn put_one(
        &mut self,
        queue: &mut redb::Table<&[u8], &[u8]>,
        next_sequence: &mut u64,
        record: NewRecord<'_>,
    ) -> Result<Result<PutOutcome, StoreError>, StoreError> {
        let id = (record.kind, record.message_id);
        if self.state.index.contains_key(&id) {
            return Ok(Ok(PutOutcome::Duplicate));
        }
        let limits = *self.limits.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let depth = self.state.per_recipient.get(&record.recipient).copied().unwrap_or(0);
        if depth >= limits.queue_depth_per_agent_max {
            return Ok(Err(StoreError::RecipientQueueFull { depth }));
        }
        let size = (VALUE_HEADER_LEN + record.bytes.len()) as u64;
        let total = self.state.total;
        if total.messages >= limits.messages_max || total.bytes + size > limits.bytes_max {
            return Ok(Err(StoreError::BufferFull));
        }
        let key = queue_key(record.recipient, *next_sequence);
        *next_sequence += 1;
        let mut value = Vec::with_capacity(VALUE_HEADER_LEN + record.bytes.len());
        value.extend_from_slice(&record.expires_at.0.to_be_bytes());
        value.push(record.kind as u8);
        value.extend_from_slice(record.message_id.as_bytes());
        value.extend_from_slice(record.bytes);
        queue.insert(key.as_slice(), value.as_slice()).map_err(storage)?;
        self.state.index.insert(id, key);
        self.undo.push(Undo::Indexed(id));
        self.state.count(record.recipient, size, true);
        self.undo.push(Undo::Counted { recipient: record.recipient, size, added: true });
        Ok(Ok(PutOutcome::Stored))
    }

    fn delete_one(
        &mut self,
        queue: &mut redb::Table<&[u8], &[u8]>,
        recipient: AgentId,
        id: IdKey,
    ) -> Result<(), StoreError> {
        let Some(key) = self.state.index.get(&id).copied() else { return Ok(()) };
        // Only the recipient a record is queued for can delete it.
        if recipient_of(&key) != Some(recipient) {
            return Ok(());
        }
        self.forget(queue, id, key)
    }

    fn purge(&mut self, queue: &mut redb::Table<&[u8], &[u8]>, now: UnixMillis) -> Result<u64, StoreError> {
        let mut expired = Vec::new();
        for entry in queue.iter().map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            if let Some(record) = decode_record(key.value(), value.value())
                && record.expires_at <= now
                && let Ok(key) = QueueKey::try_from(key.value())
            {
                expired.push(((record.kind, record.message_id), key));
            }
        }
        for (id, key) in &expired {
            self.forget(queue, *id, *key)?;
        }
        Ok(expired.len() as u64)
    }

    fn forget(&mut self, queue: &mut redb::Table<&[u8], &[u8]>, id: IdKey, key: QueueKey) -> Result<(), StoreError> {
        let removed = queue.remove(key.as_slice()).map_err(storage)?.map(|value| value.value().len() as u64);
        self.state.index.remove(&id);
        self.undo.push(Undo::Unindexed(id, key));
        if let (Some(size), Some(recipient)) = (removed, recipient_of(&key)) {
            self.state.count(recipient, size, false);
            self.undo.push(Undo::Counted { recipient, size, added: false });
        }
        Ok(())
    }
}

/// A record about to be stored.
struct NewRecord<'a> {
    recipient: AgentId,
    kind: RecordKind,
    message_id: MessageId,
    expires_at: UnixMillis,
    bytes: &'a [u8],
}

/// How often the edge purges expired records.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMillis = UnixMillis(1_700_000_000_000);

    fn limits() -> StoreLimits {
        StoreLimits { queue_depth_per_agent_max: 5, messages_max: 8, bytes_max: 1 << 20 }
    }

    fn agent(n: u8) -> AgentId {
        AgentId::from_bytes([n; 16])
    }

    fn id(n: u32) -> MessageId {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&n.to_be_bytes());
        MessageId::from_bytes(bytes)
    }

    #[tokio::test]
    async fn put_pending_delete_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = OfflineStore::open(&dir.path().join("buffer.redb"), limits()).unwrap();
        let later = UnixMillis(NOW.0 + 60_000);
        for n in 0..3 {
            let outcome = store.put(agent(1), RecordKind::Envelope, id(n), later, vec![n as u8; 10]).await.unwrap();
            assert_eq!(outcome, PutOutcome::Stored);
        }
        assert_eq!(
            store.put(agent(1), RecordKind::Envelope, id(1), later, vec![1; 10]).await.unwrap(),
            PutOutcome::Duplicate
        );
        let records = store.pending(agent(1), None, 100, NOW).unwrap();
        assert_eq!(records.iter().map(|r| r.message_id).collect::<Vec<_>>(), vec![id(0), id(1), id(2)]);
        assert_eq!(store.pending(agent(1), Some(records[0].sequence), 100, NOW).unwrap().len(), 2);
        assert!(store.pending(agent(2), None, 100, NOW).unwrap().is_empty());

        // Another recipient cannot delete agent 1's message.
        store.delete(agent(2), RecordKind::Envelope, id(0)).await;
        store.delete(agent(1), RecordKind::Envelope, id(1)).await;
        store.purge_expired(NOW).await.unwrap(); // a round trip through the writer
        let ids: Vec<_> = store.pending(agent(1), None, 100, NOW).unwrap().iter().map(|r| r.message_id).collect();
        assert_eq!(ids, vec![id(0), id(2)]);
        assert_eq!(store.depth(agent(1)), 2);
        drop(store);
        writer.join();
    }

    #[tokio::test]
    async fn quotas_hold_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.redb");
        let later = UnixMillis(NOW.0 + 60_000);
        {
            let (store, writer) = OfflineStore::open(&path, limits()).unwrap();
            for n in 0..5 {
                store.put(agent(1), RecordKind::Envelope, id(n), later, vec![0; 10]).await.unwrap();
            }
            assert_eq!(
                store.put(agent(1), RecordKind::Envelope, id(99), later, vec![0; 10]).await,
                Err(StoreError::RecipientQueueFull { depth: 5 })
            );
            for n in 10..13 {
                store.put(agent(2), RecordKind::Envelope, id(n), later, vec![0; 10]).await.unwrap();
            }
            assert_eq!(
                store.put(agent(3), RecordKind::Envelope, id(20), later, vec![0; 10]).await,
                Err(StoreError::BufferFull)
            );
            drop(store);
            writer.join();
        }
        let (store, writer) = OfflineStore::open(&path, limits()).unwrap();
        assert_eq!(store.occupancy().messages, 8);
        assert_eq!(store.depth(agent(1)), 5);
        assert_eq!(
            store.put(agent(3), RecordKind::Envelope, id(21), later, vec![0; 10]).await,
            Err(StoreError::BufferFull)
        );
        drop(store);
        writer.join();
    }

    #[tokio::test]
    async fn byte_quota_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let small = StoreLimits { queue_depth_per_agent_max: 100, messages_max: 100, bytes_max: 200 };
        let (store, writer) = OfflineStore::open(&dir.path().join("b.redb"), small).unwrap();
        let soon = UnixMillis(NOW.0 + 1_000);
        store.put(agent(1), RecordKind::Envelope, id(1), soon, vec![0; 100]).await.unwrap();
        assert_eq!(
            store.put(agent(1), RecordKind::Envelope, id(2), soon, vec![0; 100]).await,
            Err(StoreError::BufferFull)
        );
        let after_expiry = UnixMillis(NOW.0 + 2_000);
        assert!(
            store.pending(agent(1), None, 10, after_expiry).unwrap().is_empty(),
            "expired records are not delivered"
        );
        assert_eq!(store.purge_expired(after_expiry).await.unwrap(), 1);
        assert_eq!(store.occupancy(), Occupancy::default());
        store
            .put(agent(1), RecordKind::Envelope, id(2), UnixMillis(after_expiry.0 + 1000), vec![0; 100])
            .await
            .unwrap();
        drop(store);
        writer.join();
    }

    #[tokio::test]
    async fn quotas_can_change_while_the_store_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = OfflineStore::open(&dir.path().join("b.redb"), limits()).unwrap();
        let later = UnixMillis(NOW.0 + 60_000);
        store.put(agent(1), RecordKind::Envelope, id(1), later, vec![1]).await.unwrap();
        store.set_limits(StoreLimits { queue_depth_per_agent_max: 1, ..limits() });
        assert_eq!(store.limits().queue_depth_per_agent_max, 1);
        let refused = store.put(agent(1), RecordKind::Envelope, id(2), later, vec![2]).await;
        assert!(matches!(refused, Err(StoreError::RecipientQueueFull { depth: 1 })), "{refused:?}");
        store.set_limits(limits());
        assert_eq!(store.put(agent(1), RecordKind::Envelope, id(2), later, vec![2]).await.unwrap(), PutOutcome::Stored);
        drop(store);
        writer.join();
    }

    #[tokio::test]
    async fn envelope_and_receipt_with_one_id_are_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = OfflineStore::open(&dir.path().join("b.redb"), limits()).unwrap();
        let later = UnixMillis(NOW.0 + 60_000);
        assert_eq!(store.put(agent(1), RecordKind::Envelope, id(7), later, vec![1]).await.unwrap(), PutOutcome::Stored);
        assert_eq!(store.put(agent(2), RecordKind::Receipt, id(7), later, vec![2]).await.unwrap(), PutOutcome::Stored);
        let receipts = store.pending(agent(2), None, 10, NOW).unwrap();
        assert_eq!(receipts[0].kind, RecordKind::Receipt);
        drop(store);
        writer.join();
    }

    #[derive(Clone, Debug)]
    enum Op {
        Put { recipient: u8, id: u8, receipt: bool, size: u8 },
        Delete { recipient: u8, id: u8 },
        Reopen,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0u8..3, 0u8..12, any::<bool>(), 0u8..50).prop_map(|(recipient, id, receipt, size)| Op::Put { recipient, id, receipt, size }),
            3 => (0u8..3, 0u8..12).prop_map(|(recipient, id)| Op::Delete { recipient, id }),
            1 => Just(Op::Reopen),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Random puts, deletes and restarts against a model: same contents in the same
        /// order per recipient, quotas respected, duplicates refused.
        #[test]
        fn store_matches_a_model(ops in proptest::collection::vec(op(), 1..60)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("b.redb");
                let limits = StoreLimits { queue_depth_per_agent_max: 4, messages_max: 9, bytes_max: 1 << 20 };
                let (mut store, mut writer) = OfflineStore::open(&path, limits).unwrap();
                // Model: per recipient, the queued (kind, id) in order.
                let mut model: std::collections::BTreeMap<u8, Vec<(RecordKind, u8)>> = Default::default();
                let later = UnixMillis(NOW.0 + 60_000);
                for op in ops {
                    match op {
                        Op::Put { recipient, id, receipt, size } => {
                            let kind = if receipt { RecordKind::Receipt } else { RecordKind::Envelope };
                            let outcome = store.put(agent(recipient), kind, MessageId::from_bytes([id; 16]), later, vec![id; size as usize]).await;
                            let exists = model.values().flatten().any(|entry| *entry == (kind, id));
                            let depth = model.get(&recipient).map_or(0, Vec::len);
                            let total: usize = model.values().map(Vec::len).sum();
                            let expected = if exists {
                                Ok(PutOutcome::Duplicate)
                            } else if depth >= 4 {
                                Err(StoreError::RecipientQueueFull { depth: depth as u32 })
                            } else if total >= 9 {
                                Err(StoreError::BufferFull)
                            } else {
                                model.entry(recipient).or_default().push((kind, id));
                                Ok(PutOutcome::Stored)
                            };
                            assert_eq!(outcome, expected);
                        }
                        Op::Delete { recipient, id } => {
                            store.delete(agent(recipient), RecordKind::Envelope, MessageId::from_bytes([id; 16])).await;
                            if let Some(queue) = model.get_mut(&recipient) {
                                queue.retain(|entry| *entry != (RecordKind::Envelope, id));
                            }
                        }
                        Op::Reopen => {
                            drop(store);
                            writer.join();
                            (store, writer) = OfflineStore::open(&path, limits).unwrap();
                        }
                    }
                    store.purge_expired(NOW).await.unwrap(); // a barrier: every request before it is committed
                    for recipient in 0..3u8 {
                        let stored: Vec<(RecordKind, u8)> = store
                            .pending(agent(recipient), None, 100, NOW)
                            .unwrap()
                            .iter()
                            .map(|r| (r.kind, r.message_id.as_bytes()[0]))
                            .collect();
                        let expected = model.get(&recipient).cloned().unwrap_or_default();
                        assert_eq!(stored, expected, "recipient {}", recipient);
                        assert_eq!(store.depth(agent(recipient)) as usize, expected.len());
                    }
                }
                drop(store);
                writer.join();
            });
        }
    }
}
