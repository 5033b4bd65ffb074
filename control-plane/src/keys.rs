//! An agent's keys after its inception key: rotation, guardians and social recovery.
//!
//! An agent's id is derived from its first key and never changes; `agents.public_key` is
//! its *current* key, the one its certificate binds and its requests are signed with.
//!
//! **Rotation.** The agent signs, with its current key, a request naming a new key and
//! carrying the new key's proof of possession. The CA certifies the new key for the same
//! id; the old key keeps signing requests, and its certificates stay valid, for an overlap
//! window ([`ROTATION_OVERLAP_DEFAULT`], at most [`ROTATION_OVERLAP_MAX`]) so connections
//! and processes still holding it can move over. Then the revocation worker revokes the
//! old certificates (reason `superseded`). Every key change is recorded in
//! `agent_key_events` with its epoch.
//!
//! **Recovery.** An agent names `threshold` of up to [`GUARDIANS_MAX`] other agents as its
//! guardians. If it loses its key, one guardian opens a recovery naming the new key; when
//! `threshold` guardians (the opener included) have approved that same key, a time lock
//! starts ([`RECOVERY_TIME_LOCK_DEFAULT`], 7 days, configurable). Until it ends the current
//! key can cancel the recovery, so guardians alone cannot take an agent whose owner still
//! holds its key. After it, a request signed by the new key completes the recovery: the new
//! key is certified for the same id, and every earlier certificate is revoked at once
//! (reason `key_compromise`). A recovery keeps the guardian set it opened with.
//!
//! **Consistency.** Key changes are conditional updates on `agents.key_epoch`, so two
//! concurrent changes of one agent cannot both apply; the loser's fresh certificate is
//! revoked. A recovery's approvals are counted on its row (`approvals`), under the row's
//! lock, so concurrent approvals reach the threshold exactly once. Scheduled revocations
//! (`certificates.revoke_at_ms`) are carried out by one replica at a time (lease
//! [`REVOCATION_LEASE`]), every [`REVOCATION_INTERVAL`], and at once by the request that
//! made them due; a crash in between leaves them for the worker.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use molt_protocol::cert::Serial;
use molt_protocol::keys::{KeyBinding, PublicKey, Signature};
use molt_protocol::{AgentId, UnixMillis};
use sqlx::Row as _;
use sqlx::any::AnyRow;

use crate::ca::{
    self, Authority, IssueCertificateError, IssuedCertificate, LeafKind, PossessionProof, ProofError, RevocationReason,
    RevokeError,
};
use crate::clock::Clock;
use crate::db::Database;
use crate::ids::{OrgId, RecoveryId};
use crate::registry::{RegistryQueryError, from_db, query_error, to_db};

/// How long the replaced key stays valid after a rotation, unless the request says.
pub const ROTATION_OVERLAP_DEFAULT: Duration = Duration::from_secs(24 * 3600);
/// Longest overlap a rotation may ask for.
pub const ROTATION_OVERLAP_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Time between the last needed guardian approval and the earliest completion.
pub const RECOVERY_TIME_LOCK_DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest configurable time lock.
pub const RECOVERY_TIME_LOCK_MIN: Duration = Duration::from_secs(1);
/// Longest configurable time lock.
pub const RECOVERY_TIME_LOCK_MAX: Duration = Duration::from_secs(90 * 24 * 3600);
/// Most guardians an agent may name.
pub const GUARDIANS_MAX: usize = 16;
/// How often the revocation worker looks for due revocations.
pub const REVOCATION_INTERVAL: Duration = Duration::from_secs(1);
/// Name of the revocation worker's lease.
pub const REVOCATION_LEASE: &str = "key-revocations";
/// How long that lease lasts without renewal.
pub const REVOCATION_LEASE_TTL: Duration = Duration::from_secs(15);
/// Revocations one pass carries out at most.
pub const REVOCATION_BATCH_MAX: i64 = 500;

const _: () = assert!(RECOVERY_TIME_LOCK_MIN.as_secs() <= RECOVERY_TIME_LOCK_DEFAULT.as_secs());
const _: () = assert!(RECOVERY_TIME_LOCK_DEFAULT.as_secs() <= RECOVERY_TIME_LOCK_MAX.as_secs());
const _: () = assert!(ROTATION_OVERLAP_DEFAULT.as_secs() <= ROTATION_OVERLAP_MAX.as_secs());

/// The configurable part of key management (`[keys]` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyPolicy {
    pub recovery_time_lock: Duration,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        KeyPolicy { recovery_time_lock: RECOVERY_TIME_LOCK_DEFAULT }
    }
}

/// Why a key operation was refused or failed. Each refusal has its own problem code in
/// the API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    #[error("no such agent")]
    UnknownAgent,
    #[error("the agent has been revoked")]
    RevokedAgent,
    #[error("the agent has never held a certificate, so there is no org to certify a new key in")]
    NoCertificate,
    #[error("the new key is the agent's current key")]
    SameKey,
    #[error("the new key is, or derives the id of, another agent's key")]
    KeyInUse,
    #[error("the overlap may be at most {} seconds", ROTATION_OVERLAP_MAX.as_secs())]
    OverlapTooLong,
    #[error("the key binding {0}")]
    KeyBinding(&'static str),
    #[error("the new key's proof of possession was refused: {0}")]
    Proof(ProofError),
    #[error("invalid guardians: {0}")]
    InvalidGuardians(String),
    #[error("{0} is not a registered, unrevoked agent")]
    UnknownGuardian(AgentId),
    #[error("the agent has named no guardians")]
    NoGuardians,
    #[error("the caller is not one of this recovery's guardians")]
    NotAGuardian,
    #[error("recovery {0} is already open for this agent")]
    RecoveryInProgress(RecoveryId),
    #[error("no such recovery for this agent")]
    RecoveryNotFound,
    #[error("the recovery is for another key")]
    WrongKey,
    #[error("the recovery is {0}")]
    RecoveryClosed(RecoveryState),
    #[error("the recovery still needs guardian approvals")]
    RecoveryCollecting,
    #[error("the recovery's time lock ends at {0} ms after the epoch")]
    TimeLocked(UnixMillis),
    #[error("the agent's keys changed meanwhile; nothing was applied")]
    Conflict,
    #[error("failed to certify the new key")]
    Issue(#[from] IssueCertificateError),
    #[error("failed to revoke a replaced certificate")]
    Revoke(#[from] RevokeError),
    #[error(transparent)]
    Query(#[from] RegistryQueryError),
}

/// The keys a request from an agent may be signed with now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SigningKeys {
    pub current: PublicKey,
    /// The key a rotation replaced, while its overlap lasts.
    pub previous: Option<PublicKey>,
    pub revoked: bool,
}

/// An agent's keys as stored: the replaced key with the end of its overlap.
#[derive(Clone, Debug)]
struct StoredKeys {
    current: PublicKey,
    previous: Option<(PublicKey, UnixMillis)>,
    revoked: bool,
}

impl StoredKeys {
    fn at(&self, now: UnixMillis) -> SigningKeys {
        let previous = self.previous.and_then(|(key, until)| (until > now).then_some(key));
        SigningKeys { current: self.current, previous, revoked: self.revoked }
    }
}

/// Reads an agent's keys.
async fn stored_keys(db: &Database, agent: AgentId) -> Result<Option<StoredKeys>, KeysError> {
    let read = query_error("reading an agent's keys");
    let row =
        sqlx::query("SELECT public_key, previous_key, previous_key_until_ms, revoked_at_ms FROM agents WHERE id = $1")
            .bind(agent.to_string())
            .fetch_optional(db.pool())
            .await
            .map_err(read)?;
    let Some(row) = row else { return Ok(None) };
    let current = key_column(&row, "public_key")?;
    let until: Option<i64> = row.try_get("previous_key_until_ms").map_err(read)?;
    let previous = match until {
        Some(until) => optional_key_column(&row, "previous_key")?.map(|key| (key, from_db(until))),
        None => None,
    };
    let revoked: Option<i64> = row.try_get("revoked_at_ms").map_err(read)?;
    Ok(Some(StoredKeys { current, previous, revoked: revoked.is_some() }))
}

/// How long a replica answers agent requests from the keys it last read for an agent,
/// without reading them again. A key change or revocation made through this replica
/// takes effect here at once ([`SigningKeysCache::forget`]); one made through another
/// replica, within this time. A request signed by a key the cached entry does not hold
/// reads the keys again at once, so a new key signs everywhere from the start.
pub const SIGNING_KEYS_CACHE_TTL: Duration = Duration::from_secs(1);
/// Agents whose keys a replica keeps at most; a fuller cache starts over.
pub const SIGNING_KEYS_CACHE_ENTRIES_MAX: usize = 65_536;

/// Recently read signing keys, per agent: a signed request otherwise reads the agent's
/// row before anything else, and that read was about half of PostgreSQL's CPU per
/// ledger call (BENCHMARKS.md, "Credits ledger through the HTTP API"). Unknown agents
/// are not kept, so a registration signs at once.
#[derive(Debug)]
pub struct SigningKeysCache {
    ttl: Duration,
    entries_max: usize,
    kept: std::sync::Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    entries: HashMap<AgentId, (Instant, StoredKeys)>,
    /// [`SigningKeysCache::forget`] calls so far: keys read while one ran are not kept,
    /// as the read may predate the change it followed.
    forgets: u64,
}

/// Signing keys and where they came from.
#[derive(Clone, Debug)]
pub struct LookedUp {
    pub keys: SigningKeys,
    /// Whether they were read for this lookup (else: kept from an earlier one).
    pub fresh: bool,
}

impl Default for SigningKeysCache {
    fn default() -> SigningKeysCache {
        SigningKeysCache::new(SIGNING_KEYS_CACHE_TTL)
    }
}

impl SigningKeysCache {
    pub fn new(ttl: Duration) -> SigningKeysCache {
        SigningKeysCache {
            ttl,
            entries_max: SIGNING_KEYS_CACHE_ENTRIES_MAX,
            kept: std::sync::Mutex::new(Kept::default()),
        }
    }

    /// `agent`'s signing keys at `now`: kept ones if read within the TTL, else read now.
    pub async fn get(&self, db: &Database, agent: AgentId, now: UnixMillis) -> Result<Option<LookedUp>, KeysError> {
        let kept = self.kept().entries.get(&agent).filter(|(read_at, _)| read_at.elapsed() < self.ttl).cloned();
        match kept {
            Some((_, keys)) => Ok(Some(LookedUp { keys: keys.at(now), fresh: false })),
            None => self.read(db, agent, now).await,
        }
    }

    /// `agent`'s signing keys at `now`, read now (and kept).
    pub async fn read(&self, db: &Database, agent: AgentId, now: UnixMillis) -> Result<Option<LookedUp>, KeysError> {
        let (read_at, forgets) = (Instant::now(), self.kept().forgets);
        let Some(keys) = stored_keys(db, agent).await? else {
            self.kept().entries.remove(&agent);
            return Ok(None);
        };
        let looked_up = LookedUp { keys: keys.at(now), fresh: true };
        self.keep(agent, read_at, forgets, keys);
        Ok(Some(looked_up))
    }

    /// Keeps keys read at `read_at`, unless a `forget` ran since `forgets` was counted.
    fn keep(&self, agent: AgentId, read_at: Instant, forgets: u64, keys: StoredKeys) {
        let mut kept = self.kept();
        if kept.forgets != forgets {
            return;
        }
        if kept.entries.len() >= self.entries_max && !kept.entries.contains_key(&agent) {
            kept.entries.clear();
        }
        kept.entries.insert(agent, (read_at, keys));
    }

    /// Drops what is kept for `agent` (its keys changed or it was revoked), and keeps
    /// nothing read before this call.
    pub fn forget(&self, agent: AgentId) {
        let mut kept = self.kept();
        kept.entries.remove(&agent);
        kept.forgets += 1;
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        // A panic while holding the lock leaves a map that is still whole.
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

// ---- rotation ----

/// A rotation as the agent asked for it; the new key's proof of possession is the CA's
/// agent proof ([`ca::proof_message`]) for the agent's org.
#[derive(Clone, Debug)]
pub struct RotationRequest {
    pub new_key: PublicKey,
    pub proof_timestamp: UnixMillis,
    pub proof_signature: Signature,
    pub overlap: Duration,
    /// The agent's X25519 key binding signed by the new key; without one the registry
    /// drops the old binding (it was signed by the old key).
    pub key_binding: Option<KeyBinding>,
}

/// A rotation done.
#[derive(Clone, Debug)]
pub struct Rotation {
    pub issued: IssuedCertificate,
    /// The agent's key epoch now (1 after its first change).
    pub epoch: u64,
    /// Until when the replaced key still signs and its certificates stay valid.
    pub previous_key_until: UnixMillis,
    /// The certificates that will be revoked then.
    pub superseded: Vec<Serial>,
}

/// Certifies `request.new_key` for `agent`, whose current key `signed_by` signed the
/// request, and makes it current; the old key and certificates last for the overlap. If
/// the key changed since the request was authenticated, nothing is applied.
pub async fn rotate(
    db: &Database,
    authority: &Authority,
    agent: AgentId,
    signed_by: &PublicKey,
    request: &RotationRequest,
    now: UnixMillis,
) -> Result<Rotation, KeysError> {
    if request.overlap > ROTATION_OVERLAP_MAX {
        return Err(KeysError::OverlapTooLong);
    }
    let state = agent_state(db, agent).await?;
    if state.current != *signed_by {
        return Err(KeysError::Conflict);
    }
    if request.new_key == state.current {
        return Err(KeysError::SameKey);
    }
    if let Some(binding) = &request.key_binding {
        if binding.agent != agent {
            return Err(KeysError::KeyBinding("names another agent"));
        }
        binding.verify(&request.new_key).map_err(|_| KeysError::KeyBinding("is not signed by the new key"))?;
    }
    let org = agent_org(db, agent).await?.ok_or(KeysError::NoCertificate)?;
    let proof = PossessionProof::verify(
        LeafKind::Agent,
        &org,
        &request.new_key,
        request.proof_timestamp,
        &request.proof_signature,
        now,
    )
    .map_err(KeysError::Proof)?
    .for_existing_agent(agent);
    ensure_key_unused(db, &request.new_key).await?;
    let issued = authority.issue(db, &proof, &[], now).await?;
    let serial = issued.certificate.serial();
    let until = now.saturating_add(request.overlap);
    let applied = apply_key_change(
        db,
        KeyChange {
            agent,
            kind: KeyChangeKind::Rotation,
            old_key: state.current,
            new_key: request.new_key,
            epoch: state.epoch,
            previous_until: Some(until),
            key_binding: request.key_binding,
            serial,
            now,
        },
    )
    .await;
    let superseded = match applied {
        Ok(superseded) => superseded,
        Err(error) => return Err(discard_certificate(db, serial, error, now).await),
    };
    if request.overlap.is_zero() {
        revoke_due(db, now).await?;
    }
    tracing::info!(agent = %agent, serial = %serial, overlap_s = request.overlap.as_secs(), "agent key rotated");
    Ok(Rotation { issued, epoch: state.epoch + 1, previous_key_until: until, superseded })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyChangeKind {
    Rotation,
    Recovery,
}

impl KeyChangeKind {
    fn as_str(self) -> &'static str {
        match self {
            KeyChangeKind::Rotation => "rotation",
            KeyChangeKind::Recovery => "recovery",
        }
    }

    fn revocation(self) -> RevocationReason {
        match self {
            KeyChangeKind::Rotation => RevocationReason::Superseded,
            KeyChangeKind::Recovery => RevocationReason::KeyCompromise,
        }
    }
}

struct KeyChange {
    agent: AgentId,
    kind: KeyChangeKind,
    old_key: PublicKey,
    new_key: PublicKey,
    /// The epoch the change was decided on; the change applies only if it still holds.
    epoch: u64,
    /// Rotation: until when the old key still signs. Recovery: `None`, it never does again.
    previous_until: Option<UnixMillis>,
    key_binding: Option<KeyBinding>,
    serial: Serial,
    now: UnixMillis,
}

/// Makes the new key current and schedules the revocation of the agent's other
/// certificates, in one transaction whose first statement (the conditional update of the
/// agent) takes the write lock. Returns the serials scheduled.
async fn apply_key_change_in(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    change: &KeyChange,
) -> Result<Vec<Serial>, KeysError> {
    let write = query_error("changing an agent's key");
    let updated = sqlx::query(
        "UPDATE agents SET public_key = $1, previous_key = $2, previous_key_until_ms = $3, key_binding = $4, \
         key_epoch = key_epoch + 1, revision = revision + 1, updated_at_ms = $5 \
         WHERE id = $6 AND key_epoch = $7 AND public_key = $8 AND revoked_at_ms IS NULL",
    )
    .bind(change.new_key.as_bytes().to_vec())
    .bind(change.previous_until.map(|_| change.old_key.as_bytes().to_vec()))
    .bind(change.previous_until.map(to_db))
    .bind(change.key_binding.map(|binding| binding.encode().to_vec()))
    .bind(to_db(change.now))
    .bind(change.agent.to_string())
    .bind(epoch_to_db(change.epoch))
    .bind(change.old_key.as_bytes().to_vec())
    .execute(&mut **transaction)
    .await
    .map_err(write)?
    .rows_affected();
    if updated != 1 {
        return Err(KeysError::Conflict);
    }
    sqlx::query(
        "INSERT INTO agent_key_events (agent_id, epoch, kind, old_key, new_key, serial, at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(change.agent.to_string())
    .bind(epoch_to_db(change.epoch + 1))
    .bind(change.kind.as_str())
    .bind(change.old_key.as_bytes().to_vec())
    .bind(change.new_key.as_bytes().to_vec())
    .bind(change.serial.to_string())
    .bind(to_db(change.now))
    .execute(&mut **transaction)
    .await
    .map_err(write)?;
    let revoke_at = change.previous_until.unwrap_or(change.now);
    // A rotation keeps an earlier rotation's schedule; a recovery revokes everything now.
    let keep_schedule = if change.kind == KeyChangeKind::Rotation { " AND revoke_at_ms IS NULL" } else { "" };
    sqlx::query(&format!(
        "UPDATE certificates SET revoke_at_ms = $1, revoke_reason = $2 \
         WHERE kind = 'agent' AND subject_id = $3 AND revoked_at_ms IS NULL AND serial <> $4{keep_schedule}"
    ))
    .bind(to_db(revoke_at))
    .bind(change.kind.revocation().as_str())
    .bind(change.agent.to_string())
    .bind(change.serial.to_string())
    .execute(&mut **transaction)
    .await
    .map_err(write)?;
    let rows = sqlx::query(
        "SELECT serial FROM certificates \
         WHERE kind = 'agent' AND subject_id = $1 AND revoked_at_ms IS NULL AND serial <> $2 ORDER BY serial",
    )
    .bind(change.agent.to_string())
    .bind(change.serial.to_string())
    .fetch_all(&mut **transaction)
    .await
    .map_err(write)?;
    rows.iter().map(serial_column).collect()
}

async fn apply_key_change(db: &Database, change: KeyChange) -> Result<Vec<Serial>, KeysError> {
    let write = query_error("changing an agent's key");
    let mut transaction = db.pool().begin().await.map_err(write)?;
    let superseded = apply_key_change_in(&mut transaction, &change).await?;
    transaction.commit().await.map_err(write)?;
    Ok(superseded)
}

/// A certificate issued for a change that then did not apply must not stay valid:
/// revokes it and returns the change's error.
async fn discard_certificate(db: &Database, serial: Serial, error: KeysError, now: UnixMillis) -> KeysError {
    if let Err(revoke) = ca::revoke(db, serial, RevocationReason::Superseded, now).await {
        tracing::error!(%serial, error = %revoke, "failed to revoke the certificate of a key change that did not apply");
    }
    error
}

/// Revokes every certificate whose scheduled revocation is due at `now` (at most
/// [`REVOCATION_BATCH_MAX`]); returns how many.
pub async fn revoke_due(db: &Database, now: UnixMillis) -> Result<usize, KeysError> {
    let read = query_error("listing due revocations");
    let rows = sqlx::query(
        "SELECT serial, revoke_reason FROM certificates \
         WHERE revoke_at_ms IS NOT NULL AND revoked_at_ms IS NULL AND revoke_at_ms <= $1 \
         ORDER BY revoke_at_ms, serial LIMIT $2",
    )
    .bind(to_db(now))
    .bind(REVOCATION_BATCH_MAX)
    .fetch_all(db.pool())
    .await
    .map_err(read)?;
    for row in &rows {
        let serial = serial_column(row)?;
        let reason: Option<String> = row.try_get("revoke_reason").map_err(read)?;
        let reason = reason.as_deref().and_then(RevocationReason::parse).unwrap_or(RevocationReason::Superseded);
        ca::revoke(db, serial, reason, now).await?;
        tracing::info!(%serial, reason = reason.as_str(), "replaced agent certificate revoked");
    }
    Ok(rows.len())
}

/// Revokes every valid certificate of `agent` now with `reason` (an agent revoked in the
/// registry keeps no certificate); returns how many were due. Idempotent: the schedule is
/// written first, so a crash leaves the rest to the worker.
pub async fn revoke_agent_certificates(
    db: &Database,
    agent: AgentId,
    reason: RevocationReason,
    now: UnixMillis,
) -> Result<usize, KeysError> {
    sqlx::query(
        "UPDATE certificates SET revoke_at_ms = $1, revoke_reason = $2 \
         WHERE kind = 'agent' AND subject_id = $3 AND revoked_at_ms IS NULL",
    )
    .bind(to_db(now))
    .bind(reason.as_str())
    .bind(agent.to_string())
    .execute(db.pool())
    .await
    .map_err(query_error("scheduling an agent's revocations"))?;
    revoke_due(db, now).await
}

/// The revocation worker; stops when dropped.
#[derive(Debug)]
pub struct RevocationWorker {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RevocationWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs [`revoke_due`] every [`REVOCATION_INTERVAL`] while `holder` holds the lease.
pub fn spawn_revocation_worker(db: Database, clock: Arc<dyn Clock>, holder: String) -> RevocationWorker {
    let task = tokio::spawn(async move {
        let mut interval = tokio::time::interval(REVOCATION_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let now = clock.now();
            match db.try_acquire_lease(REVOCATION_LEASE, &holder, REVOCATION_LEASE_TTL, now).await {
                Ok(true) => {
                    if let Err(error) = revoke_due(&db, now).await {
                        tracing::warn!(%error, "scheduled certificate revocations failed");
                    }
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "revocation lease check failed"),
            }
        }
    });
    RevocationWorker { task }
}

// ---- guardians ----

/// An agent's guardians.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guardians {
    pub threshold: u32,
    pub guardians: Vec<AgentId>,
    pub updated_at: UnixMillis,
}

/// Names `agent`'s guardians (replacing any): 1 to [`GUARDIANS_MAX`] distinct registered,
/// unrevoked agents other than itself, of which `threshold` (1 to their number) recover it.
pub async fn set_guardians(
    db: &Database,
    agent: AgentId,
    threshold: u32,
    guardians: &[AgentId],
    now: UnixMillis,
) -> Result<Guardians, KeysError> {
    let invalid = |message: String| Err(KeysError::InvalidGuardians(message));
    if guardians.is_empty() || guardians.len() > GUARDIANS_MAX {
        return invalid(format!("name 1 to {GUARDIANS_MAX} guardians"));
    }
    if threshold == 0 || threshold as usize > guardians.len() {
        return invalid(format!("the threshold must be 1 to the number of guardians ({})", guardians.len()));
    }
    if guardians.contains(&agent) {
        return invalid("an agent cannot be its own guardian".into());
    }
    if guardians.iter().collect::<BTreeSet<_>>().len() != guardians.len() {
        return invalid("a guardian is named twice".into());
    }
    for guardian in guardians {
        let state = agent_state(db, *guardian).await;
        match state {
            Ok(_) => {}
            Err(KeysError::UnknownAgent | KeysError::RevokedAgent) => {
                return Err(KeysError::UnknownGuardian(*guardian));
            }
            Err(other) => return Err(other),
        }
    }
    agent_state(db, agent).await?;
    sqlx::query(
        "INSERT INTO agent_guardians (agent_id, threshold, guardians, updated_at_ms) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (agent_id) DO UPDATE SET threshold = excluded.threshold, guardians = excluded.guardians, \
         updated_at_ms = excluded.updated_at_ms",
    )
    .bind(agent.to_string())
    .bind(i64::from(threshold))
    .bind(ids_json(guardians))
    .bind(to_db(now))
    .execute(db.pool())
    .await
    .map_err(query_error("storing guardians"))?;
    tracing::info!(agent = %agent, threshold, guardians = guardians.len(), "guardians named");
    Ok(Guardians { threshold, guardians: guardians.to_vec(), updated_at: now })
}

/// `agent`'s guardians, if it named any.
pub async fn guardians(db: &Database, agent: AgentId) -> Result<Option<Guardians>, KeysError> {
    let read = query_error("reading guardians");
    let row = sqlx::query("SELECT threshold, guardians, updated_at_ms FROM agent_guardians WHERE agent_id = $1")
        .bind(agent.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(read)?;
    let Some(row) = row else { return Ok(None) };
    let threshold: i64 = row.try_get("threshold").map_err(read)?;
    let list: String = row.try_get("guardians").map_err(read)?;
    let updated_at: i64 = row.try_get("updated_at_ms").map_err(read)?;
    Ok(Some(Guardians {
        threshold: u32::try_from(threshold).map_err(|_| corrupt("agent_guardians.threshold"))?,
        guardians: ids_from_json(&list, "agent_guardians.guardians")?,
        updated_at: from_db(updated_at),
    }))
}

/// Removes `agent`'s guardians; `false` if it had none. Open recoveries keep theirs.
pub async fn clear_guardians(db: &Database, agent: AgentId) -> Result<bool, KeysError> {
    let removed = sqlx::query("DELETE FROM agent_guardians WHERE agent_id = $1")
        .bind(agent.to_string())
        .execute(db.pool())
        .await
        .map_err(query_error("removing guardians"))?
        .rows_affected();
    Ok(removed == 1)
}

// ---- recovery ----

/// Where a recovery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryState {
    /// Waiting for guardian approvals.
    Collecting,
    /// Approved; completes after `unlocks_at` unless cancelled.
    TimeLocked,
    Completed,
    Cancelled,
}

impl RecoveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryState::Collecting => "collecting",
            RecoveryState::TimeLocked => "time_locked",
            RecoveryState::Completed => "completed",
            RecoveryState::Cancelled => "cancelled",
        }
    }

    fn parse(text: &str) -> Option<RecoveryState> {
        [RecoveryState::Collecting, RecoveryState::TimeLocked, RecoveryState::Completed, RecoveryState::Cancelled]
            .into_iter()
            .find(|state| state.as_str() == text)
    }
}

impl std::fmt::Display for RecoveryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A recovery as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    pub id: RecoveryId,
    pub agent: AgentId,
    pub new_key: PublicKey,
    pub threshold: u32,
    pub guardians: Vec<AgentId>,
    /// Who approved, in order.
    pub approvals: Vec<(AgentId, UnixMillis)>,
    pub state: RecoveryState,
    pub opened_by: AgentId,
    pub opened_at: UnixMillis,
    pub unlocks_at: Option<UnixMillis>,
    pub closed_at: Option<UnixMillis>,
}

/// Opens a recovery of `agent` to `new_key`, by its guardian `guardian` (whose approval it
/// counts). With a threshold of 1 the time lock starts at once.
pub async fn open_recovery(
    db: &Database,
    policy: &KeyPolicy,
    guardian: AgentId,
    agent: AgentId,
    new_key: PublicKey,
    now: UnixMillis,
) -> Result<Recovery, KeysError> {
    let state = agent_state(db, agent).await?;
    let set = guardians(db, agent).await?.ok_or(KeysError::NoGuardians)?;
    if !set.guardians.contains(&guardian) {
        return Err(KeysError::NotAGuardian);
    }
    if new_key == state.current {
        return Err(KeysError::SameKey);
    }
    ensure_key_unused(db, &new_key).await?;
    agent_org(db, agent).await?.ok_or(KeysError::NoCertificate)?;
    let id = RecoveryId::generate();
    let locked = set.threshold <= 1;
    let write = query_error("opening a recovery");
    let mut transaction = db.pool().begin().await.map_err(write)?;
    let inserted = sqlx::query(
        "INSERT INTO agent_recoveries (id, agent_id, new_key, threshold, guardians, approvals, state, opened_by, \
         opened_at_ms, unlocks_at_ms) VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8, $9)",
    )
    .bind(id.as_str().to_owned())
    .bind(agent.to_string())
    .bind(new_key.as_bytes().to_vec())
    .bind(i64::from(set.threshold))
    .bind(ids_json(&set.guardians))
    .bind(if locked { RecoveryState::TimeLocked } else { RecoveryState::Collecting }.as_str())
    .bind(guardian.to_string())
    .bind(to_db(now))
    .bind(locked.then(|| to_db(now.saturating_add(policy.recovery_time_lock))))
    .execute(&mut *transaction)
    .await;
    if let Err(error) = inserted {
        if error.as_database_error().is_some_and(|error| error.is_unique_violation()) {
            drop(transaction);
            let open = open_recovery_id(db, agent).await?;
            return Err(match open {
                Some(open) => KeysError::RecoveryInProgress(open),
                None => KeysError::Conflict,
            });
        }
        return Err(write(error).into());
    }
    insert_approval(&mut transaction, &id, guardian, now).await?;
    transaction.commit().await.map_err(write)?;
    tracing::info!(agent = %agent, recovery = %id.as_str(), guardian = %guardian, "recovery opened");
    recovery(db, agent, &id).await
}

/// Records `guardian`'s approval of recovery `id` to `new_key`. Approving twice, or
/// after the threshold was reached, changes nothing.
pub async fn approve_recovery(
    db: &Database,
    policy: &KeyPolicy,
    guardian: AgentId,
    agent: AgentId,
    id: &RecoveryId,
    new_key: &PublicKey,
    now: UnixMillis,
) -> Result<Recovery, KeysError> {
    let found = recovery(db, agent, id).await?;
    if !found.guardians.contains(&guardian) {
        return Err(KeysError::NotAGuardian);
    }
    if found.new_key != *new_key {
        return Err(KeysError::WrongKey);
    }
    match found.state {
        RecoveryState::Collecting => {}
        RecoveryState::TimeLocked => return Ok(found),
        closed => return Err(KeysError::RecoveryClosed(closed)),
    }
    let write = query_error("approving a recovery");
    let mut transaction = db.pool().begin().await.map_err(write)?;
    if !insert_approval(&mut transaction, id, guardian, now).await? {
        drop(transaction);
        return recovery(db, agent, id).await;
    }
    // The row's lock orders concurrent approvals; each sees the count the one before left.
    let counted = sqlx::query(
        "UPDATE agent_recoveries SET approvals = approvals + 1, \
         state = CASE WHEN approvals + 1 >= threshold THEN 'time_locked' ELSE 'collecting' END, \
         unlocks_at_ms = CASE WHEN approvals + 1 >= threshold THEN $1 ELSE NULL END \
         WHERE id = $2 AND state = 'collecting'",
    )
    .bind(to_db(now.saturating_add(policy.recovery_time_lock)))
    .bind(id.as_str().to_owned())
    .execute(&mut *transaction)
    .await
    .map_err(write)?
    .rows_affected();
    if counted != 1 {
        drop(transaction);
        let current = recovery(db, agent, id).await?;
        return match current.state {
            RecoveryState::Collecting | RecoveryState::TimeLocked => Ok(current),
            closed => Err(KeysError::RecoveryClosed(closed)),
        };
    }
    transaction.commit().await.map_err(write)?;
    let approved = recovery(db, agent, id).await?;
    tracing::info!(
        agent = %agent, recovery = %id.as_str(), guardian = %guardian, state = approved.state.as_str(),
        "recovery approved"
    );
    Ok(approved)
}

/// Cancels recovery `id`; the request was signed by the agent's current key.
pub async fn cancel_recovery(
    db: &Database,
    agent: AgentId,
    id: &RecoveryId,
    now: UnixMillis,
) -> Result<Recovery, KeysError> {
    let cancelled = sqlx::query(
        "UPDATE agent_recoveries SET state = 'cancelled', closed_at_ms = $1 \
         WHERE id = $2 AND agent_id = $3 AND state IN ('collecting', 'time_locked')",
    )
    .bind(to_db(now))
    .bind(id.as_str().to_owned())
    .bind(agent.to_string())
    .execute(db.pool())
    .await
    .map_err(query_error("cancelling a recovery"))?
    .rows_affected();
    let current = recovery(db, agent, id).await?;
    if cancelled != 1 {
        return Err(KeysError::RecoveryClosed(current.state));
    }
    tracing::info!(agent = %agent, recovery = %id.as_str(), "recovery cancelled by the agent's key");
    Ok(current)
}

/// Completes recovery `id` after its time lock: certifies the new key for the agent,
/// makes it current and revokes every other certificate of the agent. The caller has
/// checked that the request was signed by the recovery's new key.
pub async fn complete_recovery(
    db: &Database,
    authority: &Authority,
    agent: AgentId,
    id: &RecoveryId,
    now: UnixMillis,
) -> Result<(Recovery, IssuedCertificate), KeysError> {
    let found = recovery(db, agent, id).await?;
    match (found.state, found.unlocks_at) {
        (RecoveryState::Collecting, _) => return Err(KeysError::RecoveryCollecting),
        (RecoveryState::TimeLocked, Some(unlocks_at)) if now < unlocks_at => {
            return Err(KeysError::TimeLocked(unlocks_at));
        }
        (RecoveryState::TimeLocked, _) => {}
        (closed, _) => return Err(KeysError::RecoveryClosed(closed)),
    }
    let state = agent_state(db, agent).await?;
    let org = agent_org(db, agent).await?.ok_or(KeysError::NoCertificate)?;
    let proof = PossessionProof::checked_by_signed_request(&org, &found.new_key, agent);
    let issued = authority.issue(db, &proof, &[], now).await?;
    let serial = issued.certificate.serial();
    let change = KeyChange {
        agent,
        kind: KeyChangeKind::Recovery,
        old_key: state.current,
        new_key: found.new_key,
        epoch: state.epoch,
        previous_until: None,
        key_binding: None,
        serial,
        now,
    };
    if let Err(error) = finish_recovery(db, id, &change).await {
        return Err(discard_certificate(db, serial, error, now).await);
    }
    revoke_due(db, now).await?;
    tracing::warn!(agent = %agent, recovery = %id.as_str(), serial = %serial, "agent recovered by its guardians");
    Ok((recovery(db, agent, id).await?, issued))
}

async fn finish_recovery(db: &Database, id: &RecoveryId, change: &KeyChange) -> Result<(), KeysError> {
    let write = query_error("completing a recovery");
    let mut transaction = db.pool().begin().await.map_err(write)?;
    let claimed = sqlx::query(
        "UPDATE agent_recoveries SET state = 'completed', closed_at_ms = $1 WHERE id = $2 AND state = 'time_locked'",
    )
    .bind(to_db(change.now))
    .bind(id.as_str().to_owned())
    .execute(&mut *transaction)
    .await
    .map_err(write)?
    .rows_affected();
    if claimed != 1 {
        return Err(KeysError::Conflict);
    }
    apply_key_change_in(&mut transaction, change).await?;
    transaction.commit().await.map_err(write)?;
    Ok(())
}

/// Recovery `id` of `agent`.
pub async fn recovery(db: &Database, agent: AgentId, id: &RecoveryId) -> Result<Recovery, KeysError> {
    let read = query_error("reading a recovery");
    let row = sqlx::query(
        "SELECT agent_id, new_key, threshold, guardians, state, opened_by, opened_at_ms, unlocks_at_ms, \
         closed_at_ms FROM agent_recoveries WHERE id = $1 AND agent_id = $2",
    )
    .bind(id.as_str().to_owned())
    .bind(agent.to_string())
    .fetch_optional(db.pool())
    .await
    .map_err(read)?;
    let Some(row) = row else { return Err(KeysError::RecoveryNotFound) };
    let approvals = sqlx::query(
        "SELECT guardian_id, approved_at_ms FROM agent_recovery_approvals WHERE recovery_id = $1 \
         ORDER BY approved_at_ms, guardian_id",
    )
    .bind(id.as_str().to_owned())
    .fetch_all(db.pool())
    .await
    .map_err(read)?
    .iter()
    .map(|row| {
        let guardian: String = row.try_get("guardian_id").map_err(read)?;
        let at: i64 = row.try_get("approved_at_ms").map_err(read)?;
        Ok((guardian.parse().map_err(|_| corrupt("agent_recovery_approvals.guardian_id"))?, from_db(at)))
    })
    .collect::<Result<Vec<_>, KeysError>>()?;
    let threshold: i64 = row.try_get("threshold").map_err(read)?;
    let guardians: String = row.try_get("guardians").map_err(read)?;
    let state: String = row.try_get("state").map_err(read)?;
    let opened_by: String = row.try_get("opened_by").map_err(read)?;
    let time = |column: &'static str| row.try_get::<Option<i64>, _>(column).map(|at| at.map(from_db)).map_err(read);
    Ok(Recovery {
        id: id.clone(),
        agent,
        new_key: key_column(&row, "new_key")?,
        threshold: u32::try_from(threshold).map_err(|_| corrupt("agent_recoveries.threshold"))?,
        guardians: ids_from_json(&guardians, "agent_recoveries.guardians")?,
        approvals,
        state: RecoveryState::parse(&state).ok_or_else(|| corrupt("agent_recoveries.state"))?,
        opened_by: opened_by.parse().map_err(|_| corrupt("agent_recoveries.opened_by"))?,
        opened_at: time("opened_at_ms")?.ok_or_else(|| corrupt("agent_recoveries.opened_at_ms"))?,
        unlocks_at: time("unlocks_at_ms")?,
        closed_at: time("closed_at_ms")?,
    })
}

async fn open_recovery_id(db: &Database, agent: AgentId) -> Result<Option<RecoveryId>, KeysError> {
    let read = query_error("reading the open recovery");
    let row =
        sqlx::query("SELECT id FROM agent_recoveries WHERE agent_id = $1 AND state IN ('collecting', 'time_locked')")
            .bind(agent.to_string())
            .fetch_optional(db.pool())
            .await
            .map_err(read)?;
    row.map(|row| {
        let id: String = row.try_get("id").map_err(read)?;
        id.parse().map_err(|_| corrupt("agent_recoveries.id"))
    })
    .transpose()
}

/// `true` if the approval is new.
async fn insert_approval(
    transaction: &mut sqlx::Transaction<'static, sqlx::Any>,
    id: &RecoveryId,
    guardian: AgentId,
    now: UnixMillis,
) -> Result<bool, KeysError> {
    let inserted = sqlx::query(
        "INSERT INTO agent_recovery_approvals (recovery_id, guardian_id, approved_at_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (recovery_id, guardian_id) DO NOTHING",
    )
    .bind(id.as_str().to_owned())
    .bind(guardian.to_string())
    .bind(to_db(now))
    .execute(&mut **transaction)
    .await
    .map_err(query_error("recording an approval"))?
    .rows_affected();
    Ok(inserted == 1)
}

// ---- history ----

/// One key change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEvent {
    pub epoch: u64,
    /// `rotation` or `recovery`.
    pub kind: String,
    pub old_key: PublicKey,
    pub new_key: PublicKey,
    pub serial: Serial,
    pub at: UnixMillis,
}

/// An agent's keys now and how they came to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyHistory {
    pub current: PublicKey,
    pub previous: Option<(PublicKey, UnixMillis)>,
    pub epoch: u64,
    pub events: Vec<KeyEvent>,
    /// The org of the agent's latest certificate: a new key's proof of possession names it.
    pub org: Option<OrgId>,
}

/// `agent`'s keys and their changes, oldest first.
pub async fn key_history(db: &Database, agent: AgentId) -> Result<KeyHistory, KeysError> {
    let read = query_error("reading an agent's key history");
    let row =
        sqlx::query("SELECT public_key, previous_key, previous_key_until_ms, key_epoch FROM agents WHERE id = $1")
            .bind(agent.to_string())
            .fetch_optional(db.pool())
            .await
            .map_err(read)?
            .ok_or(KeysError::UnknownAgent)?;
    let until: Option<i64> = row.try_get("previous_key_until_ms").map_err(read)?;
    let previous = match (optional_key_column(&row, "previous_key")?, until) {
        (Some(key), Some(until)) => Some((key, from_db(until))),
        _ => None,
    };
    let epoch: i64 = row.try_get("key_epoch").map_err(read)?;
    let events = sqlx::query(
        "SELECT epoch, kind, old_key, new_key, serial, at_ms FROM agent_key_events WHERE agent_id = $1 ORDER BY epoch",
    )
    .bind(agent.to_string())
    .fetch_all(db.pool())
    .await
    .map_err(read)?
    .iter()
    .map(|row| {
        let epoch: i64 = row.try_get("epoch").map_err(read)?;
        let at: i64 = row.try_get("at_ms").map_err(read)?;
        Ok(KeyEvent {
            epoch: u64::try_from(epoch).map_err(|_| corrupt("agent_key_events.epoch"))?,
            kind: row.try_get("kind").map_err(read)?,
            old_key: key_column(row, "old_key")?,
            new_key: key_column(row, "new_key")?,
            serial: serial_column(row)?,
            at: from_db(at),
        })
    })
    .collect::<Result<Vec<_>, KeysError>>()?;
    let org = agent_org(db, agent).await?;
    Ok(KeyHistory {
        org,
        current: key_column(&row, "public_key")?,
        previous,
        epoch: u64::try_from(epoch).map_err(|_| corrupt("agents.key_epoch"))?,
        events,
    })
}

// ---- shared reads ----

struct AgentState {
    current: PublicKey,
    epoch: u64,
}

/// A registered, unrevoked agent's current key and epoch.
async fn agent_state(db: &Database, agent: AgentId) -> Result<AgentState, KeysError> {
    let read = query_error("reading an agent's keys");
    let row = sqlx::query("SELECT public_key, key_epoch, revoked_at_ms FROM agents WHERE id = $1")
        .bind(agent.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(read)?
        .ok_or(KeysError::UnknownAgent)?;
    let revoked: Option<i64> = row.try_get("revoked_at_ms").map_err(read)?;
    if revoked.is_some() {
        return Err(KeysError::RevokedAgent);
    }
    let epoch: i64 = row.try_get("key_epoch").map_err(read)?;
    Ok(AgentState {
        current: key_column(&row, "public_key")?,
        epoch: u64::try_from(epoch).map_err(|_| corrupt("agents.key_epoch"))?,
    })
}

/// The org of the agent's most recent certificate: where its new keys are certified.
async fn agent_org(db: &Database, agent: AgentId) -> Result<Option<OrgId>, KeysError> {
    let read = query_error("finding an agent's org");
    let row = sqlx::query(
        "SELECT org_id FROM certificates WHERE kind = 'agent' AND subject_id = $1 \
         ORDER BY created_at_ms DESC, serial LIMIT 1",
    )
    .bind(agent.to_string())
    .fetch_optional(db.pool())
    .await
    .map_err(read)?;
    row.map(|row| {
        let org: String = row.try_get("org_id").map_err(read)?;
        org.parse().map_err(|_| corrupt("certificates.org_id"))
    })
    .transpose()
}

/// Refuses a key that is an agent's current key or whose derived id is an agent's.
async fn ensure_key_unused(db: &Database, key: &PublicKey) -> Result<(), KeysError> {
    let used = sqlx::query("SELECT id FROM agents WHERE public_key = $1 OR id = $2 LIMIT 1")
        .bind(key.as_bytes().to_vec())
        .bind(AgentId::from_inception_key(key).to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(query_error("checking a new key"))?;
    match used {
        Some(_) => Err(KeysError::KeyInUse),
        None => Ok(()),
    }
}

fn key_column(row: &AnyRow, column: &'static str) -> Result<PublicKey, KeysError> {
    optional_key_column(row, column)?.ok_or_else(|| corrupt(column))
}

fn optional_key_column(row: &AnyRow, column: &'static str) -> Result<Option<PublicKey>, KeysError> {
    let bytes: Option<Vec<u8>> = row.try_get(column).map_err(query_error("reading a key"))?;
    bytes.map(|bytes| PublicKey::from_slice(&bytes).map_err(|_| corrupt(column))).transpose()
}

fn serial_column(row: &AnyRow) -> Result<Serial, KeysError> {
    let text: String = row.try_get("serial").map_err(query_error("reading a serial"))?;
    text.parse().map_err(|_| corrupt("serial"))
}

fn ids_json(ids: &[AgentId]) -> String {
    // Invariant: a list of strings serialises.
    serde_json::to_string(&ids.iter().map(ToString::to_string).collect::<Vec<_>>()).expect("ids serialise")
}

fn ids_from_json(text: &str, column: &'static str) -> Result<Vec<AgentId>, KeysError> {
    let texts: Vec<String> = serde_json::from_str(text).map_err(|_| corrupt(column))?;
    texts.iter().map(|id| id.parse().map_err(|_| corrupt(column))).collect()
}

fn epoch_to_db(epoch: u64) -> i64 {
    i64::try_from(epoch).unwrap_or(i64::MAX)
}

fn corrupt(what: &'static str) -> KeysError {
    KeysError::Query(query_error("decoding stored keys")(sqlx::Error::Decode(format!("{what} is malformed").into())))
}

#[cfg(test)]
mod tests {
    use molt_protocol::keys::SigningKey;
    use rand::rngs::OsRng;

    use super::*;

    fn agent_keys() -> (AgentId, StoredKeys) {
        let key = SigningKey::generate(&mut OsRng).public_key();
        (AgentId::from_inception_key(&key), StoredKeys { current: key, previous: None, revoked: false })
    }

    #[test]
    fn the_signing_keys_cache_holds_at_most_its_limit() {
        let cache = SigningKeysCache { entries_max: 4, ..SigningKeysCache::default() };
        let kept: Vec<(AgentId, StoredKeys)> = (0..4).map(|_| agent_keys()).collect();
        for (agent, keys) in &kept {
            cache.keep(*agent, Instant::now(), 0, keys.clone());
        }
        assert_eq!(cache.kept().entries.len(), 4);
        // Reading a kept agent again at the limit keeps everything.
        cache.keep(kept[0].0, Instant::now(), 0, kept[0].1.clone());
        assert_eq!(cache.kept().entries.len(), 4);
        // A new agent at the limit starts over.
        let (agent, keys) = agent_keys();
        cache.keep(agent, Instant::now(), 0, keys);
        assert_eq!(cache.kept().entries.len(), 1);
        assert!(cache.kept().entries.contains_key(&agent));
    }

    #[test]
    fn keys_read_before_a_forget_are_not_kept() {
        let cache = SigningKeysCache::default();
        let (agent, keys) = agent_keys();
        // A read starts (counting forgets), the agent's key changes and is forgotten, and
        // the read ends with the keys from before the change.
        let forgets = cache.kept().forgets;
        cache.forget(agent);
        cache.keep(agent, Instant::now(), forgets, keys.clone());
        assert!(cache.kept().entries.is_empty(), "the stale read is not kept");
        let forgets = cache.kept().forgets;
        cache.keep(agent, Instant::now(), forgets, keys);
        assert_eq!(cache.kept().entries.len(), 1, "a read after the forget is");
    }

    #[test]
    fn kept_keys_say_whether_the_replaced_key_still_signs_at_each_moment() {
        let (_, mut keys) = agent_keys();
        let previous = SigningKey::generate(&mut OsRng).public_key();
        keys.previous = Some((previous, UnixMillis(2_000)));
        assert_eq!(keys.at(UnixMillis(1_999)).previous, Some(previous));
        assert_eq!(keys.at(UnixMillis(2_000)).previous, None, "the overlap ends at its instant");
    }
}
