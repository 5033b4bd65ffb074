//! The agent registry: profiles, registration expiry renewed by heartbeats, health read
//! from the last heartbeat, and search.
//!
//! **Storage.** `agents` holds one row per agent (its profile, with capabilities as JSON).
//! Search reads denormalised tables written in the same transaction as the profile:
//! `agent_search` (token, agent, weight: name 3, capability 2, description 1),
//! `agent_name_trigrams` (for typo-tolerant names), `agent_capabilities` and `agent_tags`
//! (exact filters). Only public agents get search rows; capability rows exist for all.
//!
//! **Search** ([`search`]) is portable SQL plus a little Rust: the database returns a
//! bounded candidate set (exact token hits, and the agents sharing the most name
//! trigrams with the query), filtered by capability, tag, visibility, expiry and
//! revocation; Rust then scores each candidate — relevance (exact and edit-distance
//! matches) × liveness × trust — and pages the ranked list. Every value from the query is
//! a bound parameter; only placeholders (`$3, $4…`) are formatted into the SQL.
//!
//! Health is computed at read time from the last heartbeat: no background pinging.

use std::collections::{BTreeMap, BTreeSet};
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
/// Most query tokens used; further words are ignored.
pub const QUERY_TOKENS_MAX: usize = 8;
/// Most agents ranked per search: pages reach this far.
pub const SEARCH_CANDIDATES_MAX: u32 = 1000;
/// Most agents considered for typo-tolerant name matches.
pub const FUZZY_CANDIDATES_MAX: u32 = 200;
/// Results per page when the caller does not say, and at most.
pub const SEARCH_LIMIT_DEFAULT: u32 = 20;
pub const SEARCH_LIMIT_MAX: u32 = 100;
const _: () = assert!(SEARCH_LIMIT_MAX <= SEARCH_CANDIDATES_MAX);

/// Relevance weights of the fields a query token can match.
const WEIGHT_NAME: i64 = 3;
const WEIGHT_CAPABILITY: i64 = 2;
const WEIGHT_DESCRIPTION: i64 = 1;
/// Liveness factors of the ranking.
const LIVENESS_ONLINE: f64 = 1.0;
const LIVENESS_DEGRADED: f64 = 0.6;
const LIVENESS_OFFLINE: f64 = 0.2;
/// Trust factor until the trust engine exists.
pub const TRUST_NEUTRAL: f64 = 1.0;

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

    fn liveness(self) -> f64 {
        match self {
            Health::Online => LIVENESS_ONLINE,
            Health::Degraded => LIVENESS_DEGRADED,
            Health::Offline => LIVENESS_OFFLINE,
            Health::Expired => 0.0,
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
                             revision, registered_at_ms, updated_at_ms, last_heartbeat_ms, expires_at_ms, revoked_at_ms";

/// Registers a new agent with `profile`, its registration valid until `now + REGISTRATION_TTL`.
/// The profile and its search rows are written in one transaction.
pub async fn register(
    db: &Database,
    id: AgentId,
    key: &PublicKey,
    profile: &Profile,
    now: UnixMillis,
) -> Result<Agent, RegisterError> {
    let mut tx = db.pool().begin().await.map_err(query_error("starting a registration"))?;
    let inserted = sqlx::query(
        "INSERT INTO agents (id, public_key, name, description, capabilities, key_binding, visibility, home_edge, \
         revision, registered_at_ms, updated_at_ms, last_heartbeat_ms, expires_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9, $9, $10) ON CONFLICT (id) DO NOTHING",
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
    .execute(&mut *tx)
    .await
    .map_err(query_error("inserting an agent"))?
    .rows_affected();
    if inserted == 0 {
        return Err(RegisterError::AlreadyRegistered);
    }
    write_index(&mut tx, id, profile).await?;
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
    })
}

/// Replaces the profile of a registered agent (and its search rows), in one transaction.
pub async fn update_profile(
    db: &Database,
    id: AgentId,
    profile: &Profile,
    now: UnixMillis,
) -> Result<(), AgentWriteError> {
    let mut tx = db.pool().begin().await.map_err(query_error("starting a profile update"))?;
    let updated = sqlx::query(
        "UPDATE agents SET name = $1, description = $2, capabilities = $3, key_binding = $4, visibility = $5, \
         home_edge = $6, revision = revision + 1, updated_at_ms = $7 WHERE id = $8",
    )
    .bind(profile.name.clone())
    .bind(profile.description.clone())
    .bind(capabilities_json(&profile.capabilities))
    .bind(profile.key_binding.map(|binding| binding.encode()))
    .bind(profile.visibility.as_str())
    .bind(profile.home_edge.map(|edge| edge.to_string()))
    .bind(to_db(now))
    .bind(id.to_string())
    .execute(&mut *tx)
    .await
    .map_err(query_error("updating an agent"))?
    .rows_affected();
    if updated == 0 {
        return Err(AgentWriteError::NotFound);
    }
    for table in ["agent_search", "agent_name_trigrams", "agent_capabilities", "agent_tags"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE agent_id = $1"))
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(query_error("clearing search rows"))?;
    }
    write_index(&mut tx, id, profile).await?;
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

/// Revokes an agent: its signed requests are refused and it leaves search. Idempotent.
pub async fn revoke(db: &Database, id: AgentId, now: UnixMillis) -> Result<(), AgentWriteError> {
    sqlx::query("UPDATE agents SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL")
        .bind(to_db(now))
        .bind(id.to_string())
        .execute(db.pool())
        .await
        .map_err(query_error("revoking an agent"))?;
    match agent(db, id).await? {
        Some(_) => Ok(()),
        None => Err(AgentWriteError::NotFound),
    }
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

async fn write_index(
    tx: &mut Transaction<'static, Any>,
    id: AgentId,
    profile: &Profile,
) -> Result<(), RegistryQueryError> {
    let id = id.to_string();
    for capability in &profile.capabilities {
        sqlx::query("INSERT INTO agent_capabilities (name, agent_id) VALUES ($1, $2)")
            .bind(capability.name.clone())
            .bind(id.clone())
            .execute(&mut **tx)
            .await
            .map_err(query_error("indexing a capability"))?;
    }
    let tags: BTreeSet<&str> = profile.capabilities.iter().flat_map(|c| c.tags.iter().map(String::as_str)).collect();
    for tag in tags {
        sqlx::query("INSERT INTO agent_tags (tag, agent_id) VALUES ($1, $2)")
            .bind(tag.to_owned())
            .bind(id.clone())
            .execute(&mut **tx)
            .await
            .map_err(query_error("indexing a tag"))?;
    }
    if profile.visibility != Visibility::Public {
        return Ok(());
    }
    for (token, weight) in index_tokens(profile) {
        sqlx::query("INSERT INTO agent_search (token, agent_id, weight) VALUES ($1, $2, $3)")
            .bind(token)
            .bind(id.clone())
            .bind(weight)
            .execute(&mut **tx)
            .await
            .map_err(query_error("indexing a search token"))?;
    }
    let trigrams: BTreeSet<String> = tokens(&profile.name).iter().flat_map(|token| trigrams(token)).collect();
    for trigram in trigrams {
        sqlx::query("INSERT INTO agent_name_trigrams (trigram, agent_id) VALUES ($1, $2)")
            .bind(trigram)
            .bind(id.clone())
            .execute(&mut **tx)
            .await
            .map_err(query_error("indexing a name trigram"))?;
    }
    Ok(())
}

/// Distinct (token, weight) pairs of a profile.
fn index_tokens(profile: &Profile) -> BTreeSet<(String, i64)> {
    let mut out = BTreeSet::new();
    out.extend(tokens(&profile.name).into_iter().map(|token| (token, WEIGHT_NAME)));
    for capability in &profile.capabilities {
        out.extend(capability_tokens(capability).into_iter().map(|token| (token, WEIGHT_CAPABILITY)));
    }
    out.extend(
        tokens(&profile.description).into_iter().take(DESCRIPTION_TOKENS_MAX).map(|token| (token, WEIGHT_DESCRIPTION)),
    );
    out
}

fn capability_tokens(capability: &Capability) -> Vec<String> {
    let mut out = tokens(&capability.name);
    for tag in &capability.tags {
        out.extend(tokens(tag));
    }
    out
}

/// Lower-case alphanumeric words, in order, duplicates removed, each cut to
/// [`TOKEN_BYTES_MAX`].
pub fn tokens(text: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for word in text.split(|c: char| !c.is_alphanumeric()).filter(|word| !word.is_empty()) {
        let mut token = word.to_lowercase();
        if token.len() > TOKEN_BYTES_MAX {
            let mut end = TOKEN_BYTES_MAX;
            while !token.is_char_boundary(end) {
                end -= 1;
            }
            token.truncate(end);
        }
        if seen.insert(token.clone()) {
            out.push(token);
        }
    }
    out
}

/// Trigrams of a token with boundary marks, e.g. `^ab`, `abc`, `bc$`.
fn trigrams(token: &str) -> Vec<String> {
    let chars: Vec<char> = std::iter::once('^').chain(token.chars()).chain(std::iter::once('$')).collect();
    chars.windows(3).map(|window| window.iter().collect()).collect()
}

/// Edits a query token of this many characters may be off by and still match a name.
fn typo_budget(chars: usize) -> usize {
    match chars {
        0..=3 => 0,
        4..=7 => 1,
        _ => 2,
    }
}

/// Levenshtein distance if it is at most `max`, else `None`.
fn bounded_edit_distance(a: &str, b: &str, max: usize) -> Option<usize> {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.len().abs_diff(b.len()) > max {
        return None;
    }
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        if current.iter().min().is_some_and(|&best| best > max) {
            return None;
        }
        previous = current;
    }
    previous.last().copied().filter(|&distance| distance <= max)
}

/// Relevance of an agent to the query tokens: for each token its best match among name
/// (exact 3, within the typo budget 2 minus 0.5 per edit, prefix 1.5), capability (2) and
/// description (1) tokens.
fn relevance(query: &[String], profile: &Profile) -> f64 {
    let name = tokens(&profile.name);
    let capabilities: BTreeSet<String> = profile.capabilities.iter().flat_map(capability_tokens).collect();
    let description: BTreeSet<String> = tokens(&profile.description).into_iter().take(DESCRIPTION_TOKENS_MAX).collect();
    query
        .iter()
        .map(|token| {
            let mut best: f64 = 0.0;
            let budget = typo_budget(token.chars().count());
            for candidate in &name {
                let score = if candidate == token {
                    WEIGHT_NAME as f64
                } else if let Some(distance) = bounded_edit_distance(token, candidate, budget) {
                    2.0 - 0.5 * distance as f64
                } else if token.chars().count() >= 3 && candidate.starts_with(token.as_str()) {
                    1.5
                } else {
                    0.0
                };
                best = best.max(score);
            }
            if capabilities.contains(token) {
                best = best.max(WEIGHT_CAPABILITY as f64);
            }
            if description.contains(token) {
                best = best.max(WEIGHT_DESCRIPTION as f64);
            }
            best
        })
        .sum()
}

/// A search request, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SearchQuery {
    pub text: String,
    pub capability: Option<String>,
    pub tag: Option<String>,
    pub limit: u32,
    pub offset: u32,
}

/// One ranked result.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchHit {
    pub agent: Agent,
    pub health: Health,
    pub relevance: f64,
    pub trust: f64,
    pub score: f64,
}

/// One page of results; `next_offset` is set when more follow.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchPage {
    pub hits: Vec<SearchHit>,
    pub next_offset: Option<u32>,
}

/// Searches public, unrevoked, unexpired agents. See the module documentation.
pub async fn search(db: &Database, query: &SearchQuery, now: UnixMillis) -> Result<SearchPage, RegistryQueryError> {
    // A filter no capability could satisfy matches nothing; it never reaches the database.
    if query.capability.as_deref().is_some_and(|name| !is_capability_name(name))
        || query.tag.as_deref().is_some_and(|tag| !is_tag(tag))
    {
        return Ok(SearchPage { hits: Vec::new(), next_offset: None });
    }
    let query_tokens: Vec<String> = tokens(&query.text).into_iter().take(QUERY_TOKENS_MAX).collect();
    let candidates = candidates(db, query, &query_tokens, now).await?;
    let mut hits = Vec::new();
    for chunk in candidates.chunks(500) {
        let placeholders = placeholders(1, chunk.len());
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id IN ({placeholders})");
        let mut statement = sqlx::query(&sql);
        for id in chunk {
            statement = statement.bind(id.clone());
        }
        let rows = statement.fetch_all(db.pool()).await.map_err(query_error("reading search candidates"))?;
        for row in &rows {
            let agent = agent_from_row(row)?;
            let relevance = if query_tokens.is_empty() { 1.0 } else { relevance(&query_tokens, &agent.profile) };
            if relevance <= 0.0 {
                continue;
            }
            let health = agent.health(now);
            let trust = TRUST_NEUTRAL;
            let score = relevance * health.liveness() * trust;
            hits.push(SearchHit { agent, health, relevance, trust, score });
        }
    }
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.agent.id.cmp(&b.agent.id)));
    let start = (query.offset as usize).min(hits.len());
    let end = start.saturating_add(query.limit as usize).min(hits.len());
    let next_offset = (end < hits.len()).then(|| u32::try_from(end).unwrap_or(u32::MAX));
    let hits = hits.drain(start..end).collect();
    Ok(SearchPage { hits, next_offset })
}

/// Ids of agents that may match: exact token hits and fuzzy name candidates, filtered.
async fn candidates(
    db: &Database,
    query: &SearchQuery,
    query_tokens: &[String],
    now: UnixMillis,
) -> Result<Vec<String>, RegistryQueryError> {
    // $1 now, then the optional filters, then the tokens: all bound.
    let mut filter = String::from("a.visibility = 'public' AND a.revoked_at_ms IS NULL AND a.expires_at_ms > $1");
    let mut binds: Vec<String> = Vec::new();
    let mut next = 2;
    if let Some(capability) = &query.capability {
        filter.push_str(&format!(" AND a.id IN (SELECT agent_id FROM agent_capabilities WHERE name = ${next})"));
        binds.push(capability.clone());
        next += 1;
    }
    if let Some(tag) = &query.tag {
        filter.push_str(&format!(" AND a.id IN (SELECT agent_id FROM agent_tags WHERE tag = ${next})"));
        binds.push(tag.clone());
        next += 1;
    }
    let run = |sql: String, extra: Vec<String>| {
        let binds = binds.clone();
        async move {
            let mut statement = sqlx::query(&sql).bind(to_db(now));
            for value in binds.into_iter().chain(extra) {
                statement = statement.bind(value);
            }
            let rows = statement.fetch_all(db.pool()).await.map_err(query_error("finding search candidates"))?;
            rows.iter()
                .map(|row| row.try_get::<String, _>("agent_id").map_err(query_error("reading search candidates")))
                .collect::<Result<Vec<String>, _>>()
        }
    };
    if query_tokens.is_empty() {
        let sql = format!(
            "SELECT a.id AS agent_id FROM agents a WHERE {filter} ORDER BY a.last_heartbeat_ms DESC LIMIT {SEARCH_CANDIDATES_MAX}"
        );
        return run(sql, Vec::new()).await;
    }
    let exact_sql = format!(
        "SELECT DISTINCT s.agent_id AS agent_id FROM agent_search s JOIN agents a ON a.id = s.agent_id \
         WHERE s.token IN ({}) AND {filter} LIMIT {SEARCH_CANDIDATES_MAX}",
        placeholders(next, query_tokens.len())
    );
    let mut found: BTreeMap<String, ()> =
        run(exact_sql, query_tokens.to_vec()).await?.into_iter().map(|id| (id, ())).collect();
    let query_trigrams: Vec<String> = query_tokens
        .iter()
        .filter(|token| token.chars().count() >= 4)
        .flat_map(|token| trigrams(token))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if !query_trigrams.is_empty() {
        let fuzzy_sql = format!(
            "SELECT t.agent_id AS agent_id, COUNT(*) AS hits FROM agent_name_trigrams t JOIN agents a ON a.id = t.agent_id \
             WHERE t.trigram IN ({}) AND {filter} GROUP BY t.agent_id ORDER BY hits DESC, t.agent_id LIMIT {FUZZY_CANDIDATES_MAX}",
            placeholders(next, query_trigrams.len())
        );
        found.extend(run(fuzzy_sql, query_trigrams).await?.into_iter().map(|id| (id, ())));
    }
    Ok(found.into_keys().take(SEARCH_CANDIDATES_MAX as usize).collect())
}

/// `$first, $first+1, …`: only placeholders are ever formatted into SQL.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ")
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
    })
}

/// Times are stored as signed 64-bit milliseconds.
pub(crate) fn to_db(time: UnixMillis) -> i64 {
    i64::try_from(time.0).unwrap_or(i64::MAX)
}

fn from_db(millis: i64) -> UnixMillis {
    UnixMillis(u64::try_from(millis).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_is_bounded() {
        assert_eq!(bounded_edit_distance("translator", "translater", 2), Some(1));
        assert_eq!(bounded_edit_distance("kitten", "sitting", 2), None);
        assert_eq!(bounded_edit_distance("kitten", "sitting", 3), Some(3));
        assert_eq!(bounded_edit_distance("abc", "abc", 0), Some(0));
    }

    #[test]
    fn tokens_are_lower_case_words() {
        assert_eq!(tokens("Hello, World! hello"), ["hello", "world"]);
        assert_eq!(tokens("'; DROP TABLE agents; --"), ["drop", "table", "agents"]);
        assert!(tokens("%_").is_empty());
    }

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
