//! The agent registry: profiles, registration expiry renewed by heartbeats and edge
//! presence, health read from the last sign of life, and search.
//!
//! **Storage.** `agents` holds one row per agent (its profile, with capabilities as JSON,
//! and the trust factor the trust engine writes). Every write that changes what search
//! finds numbers itself in `agents.change_seq` ([`next_change_seqs`]); each replica's
//! [`SearchIndex`] follows those numbers into memory ([`index`], [`search`]).
//!
//! Health is computed at read time from the last heartbeat or presence report: no
//! background pinging.

mod index;
mod rows;
pub(crate) use rows::placeholders;
mod search;

pub use index::{FILTERED_SCAN_MAX, tokens};
pub use search::{
    EXPANSION_WINDOW_DIVISOR, FEED_PAGE, LIVENESS_INTERVAL, LIVENESS_LOOKBACK, LIVENESS_PAGE, LIVENESS_PAGES_MAX,
    PREFIX_TERMS_MAX, QUERY_TOKENS_MAX, RANK_WINDOW_MIN, REFRESH_WAIT_MAX, Refreshed, SearchHit, SearchIndex,
    SearchPage, SearchQuery, TYPO_CANDIDATES_MAX, TYPO_TERMS_MAX,
};

use std::collections::BTreeSet;
use std::time::Duration;

use molt_protocol::keys::{KeyBinding, PublicKey};
use molt_protocol::{AgentId, EdgeId, UnixMillis};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{Any, Row as _, Transaction};

use crate::db::Database;

/// How long a registration lasts without a heartbeat.
pub const REGISTRATION_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Heartbeats younger than this: online.
pub const ONLINE_WITHIN: Duration = Duration::from_secs(2 * 60);
/// Heartbeats younger than this (and not online): degraded; older: offline.
pub const DEGRADED_WITHIN: Duration = Duration::from_secs(10 * 60);
const _: () = assert!(ONLINE_WITHIN.as_millis() < DEGRADED_WITHIN.as_millis());
const _: () = assert!(DEGRADED_WITHIN.as_millis() < REGISTRATION_TTL.as_millis());

/// Longest name, in characters.
pub const NAME_CHARS_MAX: usize = 100;
/// Longest description, in characters.
pub const DESCRIPTION_CHARS_MAX: usize = 2000;
/// Most capabilities per agent.
pub const CAPABILITIES_MAX: usize = 32;
/// Most tags per capability.
pub const TAGS_PER_CAPABILITY_MAX: usize = 16;
/// Longest capability name, version or tag, in bytes.
pub const CAPABILITY_FIELD_BYTES_MAX: usize = 64;
/// Most tokens indexed from a description.
pub const DESCRIPTION_TOKENS_MAX: usize = 200;
/// Longest indexed token, in bytes; longer ones are cut.
pub const TOKEN_BYTES_MAX: usize = 64;
/// Deepest result a search reaches: pages end there.
pub const SEARCH_CANDIDATES_MAX: u32 = 1000;
/// Results per page when the caller does not say, and at most.
pub const SEARCH_LIMIT_DEFAULT: u32 = 20;
pub const SEARCH_LIMIT_MAX: u32 = 100;
const _: () = assert!(SEARCH_LIMIT_MAX <= SEARCH_CANDIDATES_MAX);

/// Lowest and highest trust factor; [`set_trust`] refuses anything outside.
pub const TRUST_MIN: f64 = 0.0;
pub const TRUST_MAX: f64 = 1.0;
/// Trust factor until the trust engine writes one: the middle of [`TRUST_MIN`]..[`TRUST_MAX`].
pub const TRUST_NEUTRAL: f64 = 0.5;

/// Who may read a profile: public agents are listed and searchable, unlisted ones are
/// readable by id, private ones by no one but the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    Public,
    Unlisted,
    Private,
}

impl Visibility {
    fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Unlisted => "unlisted",
            Visibility::Private => "private",
        }
    }

    fn from_stored(text: &str) -> Option<Visibility> {
        match text {
            "public" => Some(Visibility::Public),
            "unlisted" => Some(Visibility::Unlisted),
            "private" => Some(Visibility::Private),
            _ => None,
        }
    }
}

/// Health of a registration, from its last heartbeat at read time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Online,
    Degraded,
    Offline,
    Expired,
}

impl Health {
    pub fn at(now: UnixMillis, last_heartbeat: UnixMillis, expires_at: UnixMillis) -> Health {
        let age = now.since(last_heartbeat);
        if now >= expires_at {
            Health::Expired
        } else if age < ONLINE_WITHIN {
            Health::Online
        } else if age < DEGRADED_WITHIN {
            Health::Degraded
        } else {
            Health::Offline
        }
    }
}

/// One thing an agent can do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Capability {
    /// 1 to 64 bytes of `a-z 0-9 . _ - / :`, e.g. `translate.text`.
    #[schema(example = "translate.text")]
    pub name: String,
    /// Free-form version, up to 64 bytes, e.g. `1.2.0`.
    #[serde(default)]
    #[schema(example = "1.0.0")]
    pub version: String,
    /// Up to 16 tags of 1 to 64 bytes of `a-z 0-9 . _ -`.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A validated profile: what an agent says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub capabilities: Vec<Capability>,
    pub key_binding: Option<KeyBinding>,
    pub visibility: Visibility,
    pub home_edge: Option<EdgeId>,
}

/// A profile as submitted, before [`ProfileInput::validate`].
#[derive(Clone, Debug)]
pub struct ProfileInput {
    pub name: String,
    pub description: String,
    pub capabilities: Vec<Capability>,
    /// Lower-case hex of [`KeyBinding::encode`].
    pub key_binding: Option<String>,
    pub visibility: Visibility,
    pub home_edge: Option<String>,
}

/// Why a profile was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    #[error("invalid profile: {0}")]
    Invalid(String),
    #[error("invalid key binding: {0}")]
    KeyBinding(&'static str),
}

impl ProfileInput {
    /// Checks every field; the key binding must name `agent` and verify with `key`.
    pub fn validate(self, agent: AgentId, key: &PublicKey) -> Result<Profile, ProfileError> {
        let invalid = |message: String| Err(ProfileError::Invalid(message));
        let name = self.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > NAME_CHARS_MAX || name.chars().any(char::is_control) {
            return invalid(format!("name must be 1 to {NAME_CHARS_MAX} characters without control characters"));
        }
        if self.description.chars().count() > DESCRIPTION_CHARS_MAX {
            return invalid(format!("description is longer than {DESCRIPTION_CHARS_MAX} characters"));
        }
        if self.capabilities.len() > CAPABILITIES_MAX {
            return invalid(format!("more than {CAPABILITIES_MAX} capabilities"));
        }
        let mut seen = BTreeSet::new();
        for capability in &self.capabilities {
            if !is_capability_name(&capability.name) {
                return invalid(format!(
                    "capability name {:?} is not 1 to 64 bytes of a-z 0-9 . _ - / :",
                    capability.name
                ));
            }
            if !seen.insert(capability.name.as_str()) {
                return invalid(format!("capability {} is listed twice", capability.name));
            }
            if capability.version.len() > CAPABILITY_FIELD_BYTES_MAX || capability.version.chars().any(char::is_control)
            {
                return invalid(format!("capability {} has an invalid version", capability.name));
            }
            if capability.tags.len() > TAGS_PER_CAPABILITY_MAX {
                return invalid(format!("capability {} has more than {TAGS_PER_CAPABILITY_MAX} tags", capability.name));
            }
            if let Some(tag) = capability.tags.iter().find(|tag| !is_tag(tag)) {
                return invalid(format!("tag {tag:?} is not 1 to 64 bytes of a-z 0-9 . _ -"));
            }
        }
        let home_edge = match &self.home_edge {
            None => None,
            Some(text) => {
                Some(text.parse::<EdgeId>().map_err(|_| ProfileError::Invalid("home_edge is not an edge id".into()))?)
            }
        };
        let key_binding = match &self.key_binding {
            None => None,
            Some(text) => {
                let bytes = hex::decode(text).map_err(|_| ProfileError::KeyBinding("not hexadecimal"))?;
                let binding = KeyBinding::decode(&bytes).map_err(|_| ProfileError::KeyBinding("malformed"))?;
                if binding.agent != agent {
                    return Err(ProfileError::KeyBinding("it names another agent"));
                }
                binding.verify(key).map_err(|_| ProfileError::KeyBinding("the signature does not verify"))?;
                Some(binding)
            }
        };
        Ok(Profile {
            name,
            description: self.description,
            capabilities: self.capabilities,
            key_binding,
            visibility: self.visibility,
            home_edge,
        })
    }
}

fn is_capability_name(name: &str) -> bool {
    (1..=CAPABILITY_FIELD_BYTES_MAX).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b))
}

fn is_tag(tag: &str) -> bool {
    (1..=CAPABILITY_FIELD_BYTES_MAX).contains(&tag.len())
        && tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// A registered agent as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Agent {
    pub id: AgentId,
    pub public_key: PublicKey,
    pub profile: Profile,
    pub revision: u64,
    pub registered_at: UnixMillis,
    pub updated_at: UnixMillis,
    pub last_heartbeat: UnixMillis,
    pub expires_at: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
    /// Trust factor from [`TRUST_MIN`] to [`TRUST_MAX`]; [`TRUST_NEUTRAL`] until the
    /// trust engine writes one.
    pub trust: f64,
}

impl Agent {
    pub fn health(&self, now: UnixMillis) -> Health {
        Health::at(now, self.last_heartbeat, self.expires_at)
    }
}

/// A storage failure; `operation` names what was being done.
#[derive(Debug, thiserror::Error)]
#[error("registry query failed while {operation}")]
pub struct RegistryQueryError {
    operation: &'static str,
    #[source]
    source: sqlx::Error,
}

pub(crate) fn query_error(operation: &'static str) -> impl Fn(sqlx::Error) -> RegistryQueryError + Copy {
    move |source| RegistryQueryError { operation, source }
}

/// Why [`register`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    #[error("failed to register the agent: it is already registered")]
    AlreadyRegistered,
    #[error(transparent)]
    Query(#[from] RegistryQueryError),
}

/// Why [`update_profile`], [`heartbeat`] or [`revoke`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentWriteError {
    #[error("failed to change the agent: it is not registered")]
    NotFound,
    #[error(transparent)]
    Query(#[from] RegistryQueryError),
}

const AGENT_COLUMNS: &str = "id, public_key, name, description, capabilities, key_binding, visibility, home_edge, \
                             revision, registered_at_ms, updated_at_ms, last_heartbeat_ms, expires_at_ms, revoked_at_ms, \
                             trust";

/// Registers a new agent with `profile`, its registration valid until `now + REGISTRATION_TTL`.
/// The profile and its change number are written in one transaction.
pub async fn register(
    db: &Database,
    id: AgentId,
    key: &PublicKey,
    profile: &Profile,
    now: UnixMillis,
) -> Result<Agent, RegisterError> {
    let mut tx = db.pool().begin().await.map_err(query_error("starting a registration"))?;
    let seq = next_change_seqs(&mut tx, 1).await?;
    let inserted = sqlx::query(
        "INSERT INTO agents (id, public_key, name, description, capabilities, key_binding, visibility, home_edge, \
         revision, registered_at_ms, updated_at_ms, last_heartbeat_ms, expires_at_ms, change_seq) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9, $9, $10, $11) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id.to_string())
    .bind(key.as_bytes().to_vec())
    .bind(profile.name.clone())
    .bind(profile.description.clone())
    .bind(capabilities_json(&profile.capabilities))
    .bind(profile.key_binding.map(|binding| binding.encode()))
    .bind(profile.visibility.as_str())
    .bind(profile.home_edge.map(|edge| edge.to_string()))
    .bind(to_db(now))
    .bind(to_db(now.saturating_add(REGISTRATION_TTL)))
    .bind(seq)
    .execute(&mut *tx)
    .await
    .map_err(query_error("inserting an agent"))?
    .rows_affected();
    if inserted == 0 {
        return Err(RegisterError::AlreadyRegistered);
    }
    tx.commit().await.map_err(query_error("committing a registration"))?;
    Ok(Agent {
        id,
        public_key: *key,
        profile: profile.clone(),
        revision: 1,
        registered_at: now,
        updated_at: now,
        last_heartbeat: now,
        expires_at: now.saturating_add(REGISTRATION_TTL),
        revoked_at: None,
        trust: TRUST_NEUTRAL,
    })
}

/// Replaces the profile of a registered agent.
pub async fn update_profile(
    db: &Database,
    id: AgentId,
    profile: &Profile,
    now: UnixMillis,
) -> Result<(), AgentWriteError> {
    let mut tx = db.pool().begin().await.map_err(query_error("starting a profile update"))?;
    let seq = next_change_seqs(&mut tx, 1).await?;
    let updated = sqlx::query(
        "UPDATE agents SET name = $1, description = $2, capabilities = $3, key_binding = $4, visibility = $5, \
         home_edge = $6, revision = revision + 1, updated_at_ms = $7, change_seq = $9 \
         WHERE id = $8 AND revoked_at_ms IS NULL",
    )
    .bind(profile.name.clone())
    .bind(profile.description.clone())
    .bind(capabilities_json(&profile.capabilities))
    .bind(profile.key_binding.map(|binding| binding.encode()))
    .bind(profile.visibility.as_str())
    .bind(profile.home_edge.map(|edge| edge.to_string()))
    .bind(to_db(now))
    .bind(id.to_string())
    .bind(seq)
    .execute(&mut *tx)
    .await
    .map_err(query_error("updating an agent"))?
    .rows_affected();
    if updated == 0 {
        return Err(AgentWriteError::NotFound);
    }
    tx.commit().await.map_err(query_error("committing a profile update"))?;
    Ok(())
}

/// Records a heartbeat: the agent is alive at `now` and registered until
/// `now + REGISTRATION_TTL`. Returns the new expiry.
pub async fn heartbeat(db: &Database, id: AgentId, now: UnixMillis) -> Result<UnixMillis, AgentWriteError> {
    let expires_at = now.saturating_add(REGISTRATION_TTL);
    let updated = sqlx::query("UPDATE agents SET last_heartbeat_ms = $1, expires_at_ms = $2 WHERE id = $3")
        .bind(to_db(now))
        .bind(to_db(expires_at))
        .bind(id.to_string())
        .execute(db.pool())
        .await
        .map_err(query_error("recording a heartbeat"))?
        .rows_affected();
    if updated == 0 {
        return Err(AgentWriteError::NotFound);
    }
    Ok(expires_at)
}

/// Revokes an agent: its signed requests are refused and search no longer finds it.
/// Idempotent.
pub async fn revoke(db: &Database, id: AgentId, now: UnixMillis) -> Result<(), AgentWriteError> {
    let mut tx = db.pool().begin().await.map_err(query_error("starting a revocation"))?;
    // The counter first: it is a write, so a SQLite transaction starts as a writer
    // instead of failing to upgrade from a read.
    let seq = next_change_seqs(&mut tx, 1).await?;
    let exists = sqlx::query("SELECT id FROM agents WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_error("revoking an agent"))?;
    if exists.is_none() {
        return Err(AgentWriteError::NotFound);
    }
    sqlx::query("UPDATE agents SET revoked_at_ms = $1, change_seq = $3 WHERE id = $2 AND revoked_at_ms IS NULL")
        .bind(to_db(now))
        .bind(id.to_string())
        .bind(seq)
        .execute(&mut *tx)
        .await
        .map_err(query_error("revoking an agent"))?;
    tx.commit().await.map_err(query_error("committing a revocation"))?;
    Ok(())
}

/// Renews the registrations of agents an edge reports connected: alive at `now`,
/// registered until `now + REGISTRATION_TTL`. Unknown and revoked agents are skipped.
/// Returns how many were renewed.
pub async fn renew_by_presence(
    tx: &mut Transaction<'static, Any>,
    agents: &[AgentId],
    now: UnixMillis,
) -> Result<u64, RegistryQueryError> {
    let mut renewed = 0;
    let mut sorted: Vec<String> = agents.iter().map(AgentId::to_string).collect();
    sorted.sort();
    sorted.dedup();
    for chunk in sorted.chunks(rows::BIND_PARAMETERS_MAX - 2) {
        let sql = format!(
            "UPDATE agents SET last_heartbeat_ms = $1, expires_at_ms = $2 \
             WHERE revoked_at_ms IS NULL AND last_heartbeat_ms < $1 AND id IN ({})",
            rows::placeholders(3, chunk.len())
        );
        let mut statement = sqlx::query(&sql).bind(to_db(now)).bind(to_db(now.saturating_add(REGISTRATION_TTL)));
        for id in chunk {
            statement = statement.bind(id.clone());
        }
        renewed += statement.execute(&mut **tx).await.map_err(query_error("renewing by presence"))?.rows_affected();
    }
    Ok(renewed)
}

/// An agent brought in whole, as from a backup or another registry: [`import_agents`].
#[derive(Clone, Debug)]
pub struct ImportedAgent {
    pub id: AgentId,
    pub public_key: PublicKey,
    pub profile: Profile,
    pub trust: f64,
    pub registered_at: UnixMillis,
    pub last_heartbeat: UnixMillis,
}

/// Why [`import_agents`] failed; nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    #[error("failed to import agents: {0} is already registered")]
    AlreadyRegistered(AgentId),
    #[error("failed to import agents: {0} has a trust outside 0 to 1")]
    Trust(AgentId),
    #[error(transparent)]
    Query(#[from] RegistryQueryError),
}

/// Registers many agents in one transaction, with few statements: all or nothing.
/// Registrations expire `REGISTRATION_TTL` after their last heartbeat.
pub async fn import_agents(db: &Database, agents: &[ImportedAgent]) -> Result<(), ImportError> {
    use rows::Bind;
    if let Some(agent) = agents.iter().find(|agent| !(TRUST_MIN..=TRUST_MAX).contains(&agent.trust)) {
        return Err(ImportError::Trust(agent.id));
    }
    let mut ids = BTreeSet::new();
    if let Some(agent) = agents.iter().find(|agent| !ids.insert(agent.id)) {
        return Err(ImportError::AlreadyRegistered(agent.id));
    }
    if agents.is_empty() {
        return Ok(());
    }
    let mut tx = db.pool().begin().await.map_err(query_error("starting an import"))?;
    let first_seq = next_change_seqs(&mut tx, agents.len()).await?;
    let mut values = Vec::with_capacity(agents.len() * 16);
    for (seq, agent) in (first_seq..).zip(agents) {
        let profile = &agent.profile;
        values.extend([
            Bind::Text(agent.id.to_string()),
            Bind::Blob(agent.public_key.as_bytes().to_vec()),
            Bind::Text(profile.name.clone()),
            Bind::Text(profile.description.clone()),
            Bind::Text(capabilities_json(&profile.capabilities)),
            profile.key_binding.map_or(Bind::NullBlob, |binding| Bind::Blob(binding.encode().to_vec())),
            Bind::Text(profile.visibility.as_str().to_owned()),
            profile.home_edge.map_or(Bind::NullText, |edge| Bind::Text(edge.to_string())),
            Bind::Int(1),
            Bind::Int(to_db(agent.registered_at)),
            Bind::Int(to_db(agent.registered_at)),
            Bind::Int(to_db(agent.last_heartbeat)),
            Bind::Int(to_db(agent.last_heartbeat.saturating_add(REGISTRATION_TTL))),
            Bind::NullInt,
            Bind::Real(agent.trust),
            Bind::Int(seq),
        ]);
    }
    let ids: Vec<String> = ids.iter().map(AgentId::to_string).collect();
    for chunk in ids.chunks(rows::BIND_PARAMETERS_MAX) {
        let sql = format!("SELECT id FROM agents WHERE id IN ({}) LIMIT 1", rows::placeholders(1, chunk.len()));
        let mut statement = sqlx::query(&sql);
        for id in chunk {
            statement = statement.bind(id.clone());
        }
        if let Some(row) = statement.fetch_optional(&mut *tx).await.map_err(query_error("checking an import"))? {
            let id: String = row.try_get("id").map_err(query_error("checking an import"))?;
            let id =
                id.parse().map_err(|_| query_error("checking an import")(sqlx::Error::Decode("agents.id".into())))?;
            return Err(ImportError::AlreadyRegistered(id));
        }
    }
    // A concurrent registration of the same id makes this insert fail: nothing is written.
    let sql = "INSERT INTO agents (id, public_key, name, description, capabilities, key_binding, visibility, \
               home_edge, revision, registered_at_ms, updated_at_ms, last_heartbeat_ms, expires_at_ms, revoked_at_ms, \
               trust, change_seq) VALUES";
    rows::insert_rows(&mut tx, sql, 16, values, "importing agents").await?;
    tx.commit().await.map_err(query_error("committing an import"))?;
    Ok(())
}

/// Why [`set_trust`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetTrustError {
    #[error("failed to set the trust of {0}: it is not registered")]
    NotFound(AgentId),
    #[error("failed to set a trust of {0}: it must be a number from 0 to 1")]
    OutOfRange(f64),
    #[error(transparent)]
    Query(#[from] RegistryQueryError),
}

/// Sets the trust factors of agents (as the trust engine computes them), in one
/// transaction: all or nothing. Writers should send only the scores that changed.
pub async fn set_trust(db: &Database, scores: &[(AgentId, f64)]) -> Result<(), SetTrustError> {
    if let Some(&(_, bad)) = scores.iter().find(|(_, trust)| !(TRUST_MIN..=TRUST_MAX).contains(trust)) {
        return Err(SetTrustError::OutOfRange(bad));
    }
    let scores: std::collections::BTreeMap<AgentId, f64> = scores.iter().copied().collect();
    if scores.is_empty() {
        return Ok(());
    }
    let mut tx = db.pool().begin().await.map_err(query_error("starting a trust update"))?;
    let first_seq = next_change_seqs(&mut tx, scores.len()).await?;
    for (seq, (id, trust)) in (first_seq..).zip(scores) {
        let updated = sqlx::query("UPDATE agents SET trust = $1, change_seq = $2 WHERE id = $3")
            .bind(trust)
            .bind(seq)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(query_error("setting trust"))?
            .rows_affected();
        if updated == 0 {
            return Err(SetTrustError::NotFound(id));
        }
    }
    tx.commit().await.map_err(query_error("committing a trust update"))?;
    Ok(())
}

/// Takes `count` numbers of the change feed and returns the first. The counter's row
/// stays locked until `tx` ends, so numbers commit in the order they are taken (and a
/// rolled-back transaction gives its numbers back): a reader that has seen number *n*
/// committed has seen every number below it. Registry writers take it as their first
/// statement: they cannot deadlock on it, and on SQLite the transaction starts as the
/// writer (a read first would fail to upgrade when another writer committed meanwhile).
pub(crate) async fn next_change_seqs(
    tx: &mut Transaction<'static, Any>,
    count: usize,
) -> Result<i64, RegistryQueryError> {
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    let last: i64 =
        sqlx::query_scalar("UPDATE registry_meta SET value = value + $1 WHERE key = 'change_seq' RETURNING value")
            .bind(count)
            .fetch_one(&mut **tx)
            .await
            .map_err(query_error("numbering a registry change"))?;
    Ok(last - count + 1)
}

/// The stored agent, whatever its visibility or state.
pub async fn agent(db: &Database, id: AgentId) -> Result<Option<Agent>, RegistryQueryError> {
    let row = sqlx::query(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"))
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(query_error("reading an agent"))?;
    row.as_ref().map(agent_from_row).transpose()
}

/// The key and revocation time of an agent, for request authentication.
pub async fn agent_key(db: &Database, id: AgentId) -> Result<Option<(PublicKey, bool)>, RegistryQueryError> {
    let row = sqlx::query("SELECT public_key, revoked_at_ms FROM agents WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(db.pool())
        .await
        .map_err(query_error("reading an agent key"))?;
    let Some(row) = row else { return Ok(None) };
    let read = query_error("reading an agent key");
    let key: Vec<u8> = row.try_get("public_key").map_err(read)?;
    let revoked: Option<i64> = row.try_get("revoked_at_ms").map_err(read)?;
    let key = PublicKey::from_slice(&key).map_err(|_| read(sqlx::Error::Decode("agents.public_key".into())))?;
    Ok(Some((key, revoked.is_some())))
}

fn capabilities_json(capabilities: &[Capability]) -> String {
    // Invariant: strings and lists of strings always serialise.
    serde_json::to_string(capabilities).expect("capabilities serialise")
}

fn agent_from_row(row: &AnyRow) -> Result<Agent, RegistryQueryError> {
    let read = query_error("reading an agent");
    let decode = |what: &'static str| read(sqlx::Error::Decode(format!("agents.{what}").into()));
    let id: String = row.try_get("id").map_err(read)?;
    let public_key: Vec<u8> = row.try_get("public_key").map_err(read)?;
    let capabilities: String = row.try_get("capabilities").map_err(read)?;
    let key_binding: Option<Vec<u8>> = row.try_get("key_binding").map_err(read)?;
    let visibility: String = row.try_get("visibility").map_err(read)?;
    let home_edge: Option<String> = row.try_get("home_edge").map_err(read)?;
    let revision: i64 = row.try_get("revision").map_err(read)?;
    let time = |column: &'static str| row.try_get::<i64, _>(column).map(from_db).map_err(read);
    let revoked_at: Option<i64> = row.try_get("revoked_at_ms").map_err(read)?;
    Ok(Agent {
        id: id.parse().map_err(|_| decode("id"))?,
        public_key: PublicKey::from_slice(&public_key).map_err(|_| decode("public_key"))?,
        profile: Profile {
            name: row.try_get("name").map_err(read)?,
            description: row.try_get("description").map_err(read)?,
            capabilities: serde_json::from_str(&capabilities).map_err(|_| decode("capabilities"))?,
            key_binding: key_binding
                .map(|bytes| KeyBinding::decode(&bytes))
                .transpose()
                .map_err(|_| decode("key_binding"))?,
            visibility: Visibility::from_stored(&visibility).ok_or_else(|| decode("visibility"))?,
            home_edge: home_edge.map(|edge| edge.parse()).transpose().map_err(|_| decode("home_edge"))?,
        },
        revision: u64::try_from(revision).unwrap_or(0),
        registered_at: time("registered_at_ms")?,
        updated_at: time("updated_at_ms")?,
        last_heartbeat: time("last_heartbeat_ms")?,
        expires_at: time("expires_at_ms")?,
        revoked_at: revoked_at.map(from_db),
        trust: row.try_get("trust").map_err(read)?,
    })
}

/// Times are stored as signed 64-bit milliseconds.
pub(crate) fn to_db(time: UnixMillis) -> i64 {
    i64::try_from(time.0).unwrap_or(i64::MAX)
}

pub(crate) fn from_db(millis: i64) -> UnixMillis {
    UnixMillis(u64::try_from(millis).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_last_heartbeat() {
        let t = UnixMillis(1_000_000_000);
        let expiry = t.saturating_add(REGISTRATION_TTL);
        assert_eq!(Health::at(t.saturating_add(Duration::from_secs(119)), t, expiry), Health::Online);
        assert_eq!(Health::at(t.saturating_add(Duration::from_secs(120)), t, expiry), Health::Degraded);
        assert_eq!(Health::at(t.saturating_add(Duration::from_secs(600)), t, expiry), Health::Offline);
        assert_eq!(Health::at(expiry, t, expiry), Health::Expired);
    }
}
