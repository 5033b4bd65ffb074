//! Agent-signed requests: every state-changing request by an agent carries
//!
//! ```text
//! Molt-Agent: agent-…            the agent's id
//! Molt-Timestamp: 1700000000000  milliseconds since the Unix epoch
//! Molt-Nonce: <32 hex>           16 random bytes, never reused
//! Molt-Signature: <128 hex>      Ed25519 by the agent's current key over the string below
//! ```
//!
//! The signed string is [`canonical_request`] (in [`molt_protocol::request`], shared with
//! clients): the lines `molt/agent-request/v1`, the method, the path with query, the
//! timestamp, the nonce and the lower-case hex SHA-256 of the body, joined by `\n`. The
//! server refuses timestamps more than [`TIMESTAMP_SKEW_MAX`] from its clock, and a
//! request whose agent, nonce and timestamp it has seen within that window: a replay,
//! which is the same signed bytes. Nonces live in the database (`agent_request_nonces`,
//! primary key (expires_at_ms, agent, nonce), the expiry being the timestamp plus the
//! window), so replicas agree; ordered by expiry, the records of concurrent requests are
//! written side by side, and the expired ones are the key's first rows. A
//! [`NonceRecorder`] writes them with group commit and deletes expired ones every
//! [`NONCE_PURGE_INTERVAL`].
//!
//! The ledger's agent commands take an [`AgentCall`] instead of an
//! [`AuthenticatedAgent`]: its signature is verified, but its nonce is recorded by
//! [`crate::ledger::Ledger::execute_signed`]. On SQLite that happens in the very
//! transaction that applies the command (a replay finds the nonce there and runs nothing),
//! which spares a payment a commit of its own and a turn at SQLite's one write lock.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode};
use molt_protocol::keys::{PublicKey, Signature};
use molt_protocol::{AgentId, UnixMillis};
use sqlx::Row as _;
use tokio::sync::{mpsc, oneshot};

use crate::api::AppState;
use crate::api::problem::ApiError;
use crate::batch;
use crate::db::{Backend, Database, HeldConnection};
use crate::keys::LookedUp;
use crate::registry::{self, RegistryQueryError, to_db};

/// How far a request's timestamp may be from the server's clock, either way.
pub const TIMESTAMP_SKEW_MAX: Duration = Duration::from_secs(5 * 60);

// The signed string and headers are shared with clients (the SDK) through the protocol crate.
pub use molt_protocol::request::{
    AGENT_HEADER, NONCE_BYTES, NONCE_HEADER, REQUEST_DOMAIN, SIGNATURE_HEADER, TIMESTAMP_HEADER, canonical_request,
    sign_request,
};

/// A request whose signature headers are well formed and whose timestamp is in the
/// window, with its body read. Not yet verified: see [`SignedRequest::verify`], or use
/// [`AuthenticatedAgent`] for registered agents.
#[derive(Debug)]
pub struct SignedRequest {
    pub agent: AgentId,
    timestamp: UnixMillis,
    nonce: String,
    signature: Signature,
    canonical: Arc<str>,
    pub body: Bytes,
}

/// Proof that a request was signed by the registered, unrevoked agent `agent` and that
/// its nonce was fresh. Handlers that take it cannot run unchecked.
#[derive(Debug)]
pub struct AuthenticatedAgent {
    pub agent: AgentId,
    pub body: Bytes,
    /// The request was signed by the key a rotation replaced, during its overlap. Key
    /// management refuses such requests ([`AuthenticatedAgent::require_current_key`]).
    pub by_previous_key: bool,
    /// The key that signed the request.
    pub key: PublicKey,
}

impl AuthenticatedAgent {
    /// Refuses a request signed by the replaced key: 401 `current_key_required`.
    pub fn require_current_key(&self) -> Result<(), ApiError> {
        if self.by_previous_key {
            return Err(unauthorized(
                "current_key_required",
                "this operation must be signed by the agent's current key, not the one it rotated away from",
            ));
        }
        Ok(())
    }
}

/// Proof that a request was signed by `key` with a fresh nonce.
#[derive(Debug)]
pub struct Verified {
    pub agent: AgentId,
    pub body: Bytes,
}

/// A verified request's nonce, to be recorded: by [`NonceRecorder::record`] or in the
/// ledger's transaction ([`crate::ledger::Ledger::execute_signed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestNonce {
    pub agent: AgentId,
    /// [`NONCE_BYTES`] bytes as lower-case hex.
    pub nonce: String,
    /// When the request's timestamp leaves the window: the row may go after that.
    pub expires_at: UnixMillis,
}

impl RequestNonce {
    /// What a request's record is unique by, as the database returns it: `agent_id`,
    /// `nonce`, `expires_at_ms`. A replay has the same: it carries the same signed
    /// timestamp, so the same expiry.
    pub fn stored_key(&self) -> (String, String, i64) {
        (self.agent.to_string(), self.nonce.clone(), to_db(self.expires_at))
    }
}

/// Proof that a request was signed by the registered, unrevoked agent `agent`, whose
/// nonce is still to be recorded: [`AgentCall::refuse`] records it alone, and the ledger
/// records it with the command the request makes
/// ([`crate::ledger::Ledger::execute_signed`]). Rejections as [`AuthenticatedAgent`]'s,
/// except `replayed_request`, which comes from either of those.
#[derive(Debug)]
pub struct AgentCall {
    pub agent: AgentId,
    pub body: Bytes,
    nonce: RequestNonce,
}

impl AgentCall {
    /// The nonce, for the ledger to record; consumes the call.
    pub fn into_nonce(self) -> RequestNonce {
        self.nonce
    }

    /// Records the nonce alone and returns `refusal`, for a request refused before it
    /// reached the ledger: a replay of it is refused as replayed, as for every signed
    /// request. A replayed nonce, or a failure to record it, takes the place of `refusal`.
    pub async fn refuse(self, nonces: &NonceRecorder, now: UnixMillis, refusal: ApiError) -> ApiError {
        match nonces.record_nonce(&self.nonce, now).await {
            Ok(true) => refusal,
            Ok(false) => replayed(self.agent),
            Err(error) => ApiError::internal(&error),
        }
    }
}

/// 401 `replayed_request`, logged.
pub fn replayed(agent: AgentId) -> ApiError {
    tracing::info!(%agent, "replayed agent request");
    unauthorized("replayed_request", "this Molt-Nonce was already used")
}

fn unauthorized(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, detail)
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, ApiError> {
    let value = headers.get(name).ok_or_else(|| {
        unauthorized("missing_signature", format!("agent requests must be signed: {name} is missing"))
    })?;
    value.to_str().map_err(|_| unauthorized("malformed_signature", format!("{name} is not text")))
}

impl FromRequest<AppState> for SignedRequest {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let headers = request.headers();
        let malformed = |name: &str| unauthorized("malformed_signature", format!("{name} is malformed"));
        let agent: AgentId = header(headers, AGENT_HEADER)?.parse().map_err(|_| malformed(AGENT_HEADER))?;
        let timestamp = header(headers, TIMESTAMP_HEADER)?;
        let timestamp = UnixMillis(
            timestamp
                .parse()
                .ok()
                .filter(|_| timestamp.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| malformed(TIMESTAMP_HEADER))?,
        );
        let nonce = header(headers, NONCE_HEADER)?;
        if nonce.len() != NONCE_BYTES * 2 || !nonce.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(malformed(NONCE_HEADER));
        }
        let nonce = nonce.to_owned();
        let signature = header(headers, SIGNATURE_HEADER)?;
        let signature = hex::decode(signature)
            .ok()
            .and_then(|bytes| Signature::from_slice(&bytes))
            .ok_or_else(|| malformed(SIGNATURE_HEADER))?;
        let now = state.clock.now();
        if now.since(timestamp) > TIMESTAMP_SKEW_MAX || timestamp.since(now) > TIMESTAMP_SKEW_MAX {
            return Err(unauthorized(
                "stale_request",
                format!("Molt-Timestamp is more than {} s from the server's clock", TIMESTAMP_SKEW_MAX.as_secs()),
            ));
        }
        let method = request.method().as_str().to_owned();
        let path_and_query =
            request.uri().path_and_query().map_or_else(|| request.uri().path().to_owned(), |p| p.as_str().to_owned());
        let body = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the body is larger than {} bytes", crate::api::REQUEST_BODY_BYTES_MAX),
                )
            } else {
                ApiError::new(rejection.status(), "unreadable_body", "the request body could not be read")
            }
        })?;
        let canonical = canonical_request(&method, &path_and_query, timestamp, &nonce, &body).into();
        Ok(SignedRequest { agent, timestamp, nonce, signature, canonical, body })
    }
}

impl SignedRequest {
    /// Whether `key` made the signature (nothing recorded; [`SignedRequest::verify`] still
    /// has to run).
    pub fn signed_by(&self, key: &PublicKey) -> bool {
        key.verify(self.canonical.as_bytes(), &self.signature).is_ok()
    }

    /// Whether `key` made the signature, checked in a batch with concurrent requests'
    /// ([`crate::signatures`]); nothing recorded.
    async fn signed_by_batched(&self, key: &PublicKey, state: &AppState) -> Result<bool, ApiError> {
        state.signatures.verify(key, &self.canonical, &self.signature).await.map_err(|error| ApiError::internal(&error))
    }

    /// Checks the signature with `key` and records the nonce. Rejections: 401
    /// `invalid_signature`, `replayed_request`.
    pub async fn verify(self, key: &PublicKey, nonces: &NonceRecorder, now: UnixMillis) -> Result<Verified, ApiError> {
        if !self.signed_by(key) {
            return Err(self.invalid_signature());
        }
        self.accept(nonces, now).await
    }

    /// Records the nonce of a request whose signature verified. Rejection: 401
    /// `replayed_request`.
    async fn accept(self, nonces: &NonceRecorder, now: UnixMillis) -> Result<Verified, ApiError> {
        let fresh =
            nonces.record_nonce(&self.request_nonce(), now).await.map_err(|error| ApiError::internal(&error))?;
        if !fresh {
            return Err(replayed(self.agent));
        }
        Ok(Verified { agent: self.agent, body: self.body })
    }

    fn request_nonce(&self) -> RequestNonce {
        RequestNonce {
            agent: self.agent,
            nonce: self.nonce.clone(),
            expires_at: self.timestamp.saturating_add(TIMESTAMP_SKEW_MAX),
        }
    }

    fn invalid_signature(&self) -> ApiError {
        tracing::info!(agent = %self.agent, "agent request with a bad signature");
        unauthorized("invalid_signature", "Molt-Signature does not verify with the agent's key")
    }
}

/// A signed request of a registered agent, its signature verified with the agent's key
/// (nothing recorded): the request, the key, and whether it is the replaced one.
async fn authenticate(request: Request, state: &AppState) -> Result<(SignedRequest, PublicKey, bool), ApiError> {
    let signed = SignedRequest::from_request(request, state).await?;
    let now = state.clock.now();
    let internal = |error: crate::keys::KeysError| ApiError::internal(&error);
    let mut looked_up = state.signing_keys.get(&state.db, signed.agent, now).await.map_err(internal)?;
    loop {
        let Some(LookedUp { keys, fresh }) = looked_up else {
            return Err(unauthorized("unknown_agent", "the agent is not registered"));
        };
        if keys.revoked {
            return Err(unauthorized("revoked_agent", "the agent has been revoked"));
        }
        let by_previous = match keys.previous {
            Some(previous) => signed.signed_by_batched(&previous, state).await?.then_some((previous, true)),
            None => None,
        };
        let signer = match by_previous {
            Some(signer) => Some(signer),
            None => signed.signed_by_batched(&keys.current, state).await?.then_some((keys.current, false)),
        };
        match signer {
            Some((key, by_previous_key)) => return Ok((signed, key, by_previous_key)),
            // Kept keys may predate a key change made through another replica.
            None if !fresh => {
                looked_up = state.signing_keys.read(&state.db, signed.agent, now).await.map_err(internal)?;
            }
            None => return Err(signed.invalid_signature()),
        }
    }
}

impl FromRequest<AppState> for AuthenticatedAgent {
    type Rejection = ApiError;

    /// The agent's current key signs; during a rotation's overlap the replaced key does
    /// too. Rejections: those of [`SignedRequest`], 401 `unknown_agent`, `revoked_agent`,
    /// `invalid_signature`, `replayed_request`.
    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let (signed, key, by_previous_key) = authenticate(request, state).await?;
        let verified = signed.accept(&state.nonces, state.clock.now()).await?;
        Ok(AuthenticatedAgent { agent: verified.agent, body: verified.body, by_previous_key, key })
    }
}

impl FromRequest<AppState> for AgentCall {
    type Rejection = ApiError;

    /// As [`AuthenticatedAgent`]'s, without recording the nonce. Rejections: those of
    /// [`SignedRequest`], 401 `unknown_agent`, `revoked_agent`, `invalid_signature`.
    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let (signed, _, _) = authenticate(request, state).await?;
        let nonce = signed.request_nonce();
        Ok(AgentCall { agent: signed.agent, body: signed.body, nonce })
    }
}

/// Nonce recordings queued for the writer at most; callers beyond wait for room.
pub const NONCE_QUEUE_DEPTH: usize = 4096;
/// Nonces one statement records at most.
pub const NONCE_BATCH_MAX: usize = 512;
/// How often expired nonces are deleted, on the clock the requests are checked with.
/// Expired rows are harmless meanwhile: a nonce whose row has expired is accepted again.
pub const NONCE_PURGE_INTERVAL: Duration = Duration::from_secs(10);
/// Connections of the nonce writer's own on PostgreSQL (besides the database pool).
pub const NONCE_WRITER_CONNECTIONS: u32 = 1;

/// Why a nonce could not be recorded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NonceError {
    #[error(transparent)]
    Query(Arc<RegistryQueryError>),
    #[error("the nonce writer stopped")]
    Stopped,
}

/// Records request nonces with group commit: one statement (one commit) records every
/// nonce queued meanwhile, so concurrent agent requests share an fsync. On PostgreSQL
/// the commit does not wait for the flush: the next durable commit, which any durable
/// effect of the request is, flushes it first. Its writer task
/// starts with the first nonce and stops when the recorder is dropped.
#[derive(Debug)]
pub struct NonceRecorder {
    db: Database,
    queue: OnceLock<mpsc::Sender<NonceJob>>,
}

#[derive(Debug)]
struct NonceJob {
    request: RequestNonce,
    now: UnixMillis,
    reply: oneshot::Sender<Result<bool, Arc<RegistryQueryError>>>,
}

impl NonceRecorder {
    pub fn new(db: Database) -> NonceRecorder {
        NonceRecorder { db, queue: OnceLock::new() }
    }

    /// Records `nonce` for `agent` until `expires_at`; `false` if the same is already
    /// recorded (a replay). One insert decides, against the primary key, so two replicas
    /// cannot both accept it. `now` dates the purge of expired records.
    pub async fn record(
        &self,
        agent: AgentId,
        nonce: &str,
        expires_at: UnixMillis,
        now: UnixMillis,
    ) -> Result<bool, NonceError> {
        self.record_nonce(&RequestNonce { agent, nonce: nonce.to_owned(), expires_at }, now).await
    }

    /// [`NonceRecorder::record`] of a [`RequestNonce`].
    pub async fn record_nonce(&self, nonce: &RequestNonce, now: UnixMillis) -> Result<bool, NonceError> {
        let queue = self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(NONCE_QUEUE_DEPTH);
            tokio::spawn(run_nonce_writer(self.db.clone(), receiver));
            sender
        });
        let (reply, answer) = oneshot::channel();
        let job = NonceJob { request: nonce.clone(), now, reply };
        queue.send(job).await.map_err(|_| NonceError::Stopped)?;
        answer.await.map_err(|_| NonceError::Stopped)?.map_err(NonceError::Query)
    }
}

async fn run_nonce_writer(db: Database, mut receiver: mpsc::Receiver<NonceJob>) {
    let mut purged_at: Option<UnixMillis> = None;
    let mut native = NativeWriter::default();
    while let Some(jobs) = batch::collect(&mut receiver, NONCE_BATCH_MAX, |_| 1).await {
        let now = jobs.iter().map(|job| job.now).min().unwrap_or(UnixMillis(0));
        if purged_at.is_none_or(|at| now.since(at) >= NONCE_PURGE_INTERVAL) {
            match purge_nonces(&db, now).await {
                Ok(()) => purged_at = Some(now),
                Err(error) => {
                    tracing::warn!(%error, "purging expired request nonces failed; retrying with the next batch")
                }
            }
        }
        match insert_nonces(&db, &mut native, &jobs).await {
            Ok(fresh) => {
                for (job, fresh) in jobs.into_iter().zip(fresh) {
                    let _ = job.reply.send(Ok(fresh));
                }
            }
            Err(error) => {
                let error = Arc::new(error);
                for job in jobs {
                    let _ = job.reply.send(Err(Arc::clone(&error)));
                }
            }
        }
    }
}

async fn purge_nonces(db: &Database, now: UnixMillis) -> Result<(), RegistryQueryError> {
    let _turn = db.sqlite_write_turn().await;
    sqlx::query("DELETE FROM agent_request_nonces WHERE expires_at_ms < $1")
        .bind(to_db(now))
        .execute(db.pool())
        .await
        .map_err(registry::query_error("purging expired request nonces"))?;
    Ok(())
}

/// Settings of the nonce writer's own connection on PostgreSQL. Its commits do not wait
/// for their WAL flush: PostgreSQL flushes WAL in order, so the first durable commit after
/// one (the ledger's, say) makes it durable too, and a request's nonce is never lost while
/// a durable effect of the request stays.
const NONCE_SESSION_POSTGRES: &str = "SET synchronous_commit = off; SET plan_cache_mode = force_generic_plan";

/// The batch's nonces as one array per column: one statement, prepared once, whatever the
/// batch's size, and one round trip (it commits on its own).
const INSERT_NONCES_POSTGRES: &str = "INSERT INTO agent_request_nonces (agent_id, nonce, expires_at_ms) \
     SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[]) \
     ON CONFLICT DO NOTHING RETURNING agent_id, nonce, expires_at_ms";

/// The nonce writer's own connection on PostgreSQL, kept from one batch to the next;
/// its pool is opened on first use. On SQLite, its own connection, taken out of the pool on
/// first use ([`NONCE_SESSION_SQLITE`]).
#[derive(Debug, Default)]
struct NativeWriter {
    pool: Option<sqlx::PgPool>,
    connection: HeldConnection,
    sqlite: Option<sqlx::AnyConnection>,
}

/// Settings of the nonce writer's own connection on SQLite: its commits do not sync the
/// write-ahead log, as on PostgreSQL. SQLite appends every commit to one log file, in
/// order, and the next commit that syncs it (the ledger's, whose connections sync every
/// commit) makes the nonces before it durable too; a checkpoint syncs the log before it
/// copies it back. So, as on PostgreSQL, a request's nonce is never lost while a durable
/// effect of the request stays.
const NONCE_SESSION_SQLITE: &str = "PRAGMA synchronous = NORMAL";

/// The nonce writer's connection on SQLite: one from the pool, detached from it so that its
/// setting never reaches another writer.
async fn nonce_connection_sqlite(db: &Database) -> Result<sqlx::AnyConnection, sqlx::Error> {
    let mut connection = db.pool().acquire().await?.detach();
    sqlx::Executor::execute(&mut connection, NONCE_SESSION_SQLITE).await?;
    Ok(connection)
}

/// Inserts the batch's nonces in one statement; whether each job's nonce was fresh. A
/// nonce twice in one batch is fresh the first time only. It runs on the writer's own
/// connection (`native`), given up after a failure.
async fn insert_nonces(
    db: &Database,
    native: &mut NativeWriter,
    jobs: &[NonceJob],
) -> Result<Vec<bool>, RegistryQueryError> {
    let mut firsts = HashSet::with_capacity(jobs.len());
    let first: Vec<bool> = jobs.iter().map(|job| firsts.insert(job.request.stored_key())).collect();
    let rows: Vec<&NonceJob> = jobs.iter().zip(&first).filter(|(_, first)| **first).map(|(job, _)| job).collect();
    let failed = registry::query_error("recording request nonces");
    let recorded: Vec<(String, String, i64)> = if db.backend() == Backend::Postgres {
        let connecting = registry::query_error("connecting for request nonces");
        let pool = match &mut native.pool {
            Some(pool) => pool,
            None => native.pool.insert(
                db.native_postgres(NONCE_WRITER_CONNECTIONS, NONCE_SESSION_POSTGRES).await.map_err(connecting)?,
            ),
        };
        let connection = native.connection.get(pool).await.map_err(connecting)?;
        let recorded = sqlx::query_as(INSERT_NONCES_POSTGRES)
            .bind(rows.iter().map(|job| job.request.agent.to_string()).collect::<Vec<_>>())
            .bind(rows.iter().map(|job| job.request.nonce.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|job| to_db(job.request.expires_at)).collect::<Vec<_>>())
            .fetch_all(connection)
            .await;
        if recorded.is_err() {
            native.connection.give_up();
        }
        recorded.map_err(failed)?
    } else {
        let values = (0..rows.len())
            .map(|row| format!("({})", registry::placeholders(row * 3 + 1, 3)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO agent_request_nonces (agent_id, nonce, expires_at_ms) VALUES {values} \
             ON CONFLICT DO NOTHING RETURNING agent_id, nonce, expires_at_ms"
        );
        let mut statement = sqlx::query(&sql);
        for job in &rows {
            let RequestNonce { agent, nonce, expires_at } = &job.request;
            statement = statement.bind(agent.to_string()).bind(nonce.clone()).bind(to_db(*expires_at));
        }
        let connecting = registry::query_error("connecting for request nonces");
        let connection = match &mut native.sqlite {
            Some(connection) => connection,
            None => native.sqlite.insert(nonce_connection_sqlite(db).await.map_err(connecting)?),
        };
        let recorded = {
            let _turn = db.sqlite_write_turn().await;
            statement.fetch_all(&mut *connection).await
        };
        if recorded.is_err() {
            native.sqlite = None;
        }
        let recorded = recorded.map_err(failed)?;
        let read = registry::query_error("reading recorded nonces");
        recorded
            .iter()
            .map(|row| {
                let agent = row.try_get("agent_id").map_err(read)?;
                Ok((agent, row.try_get("nonce").map_err(read)?, row.try_get("expires_at_ms").map_err(read)?))
            })
            .collect::<Result<_, RegistryQueryError>>()?
    };
    let inserted: HashSet<(String, String, i64)> = recorded.into_iter().collect();
    Ok(jobs.iter().zip(first).map(|(job, first)| first && inserted.contains(&job.request.stored_key())).collect())
}
