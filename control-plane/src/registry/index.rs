//! The search index: rows derived from a profile, written in the transaction that writes
//! the profile, and rebuilt from `agents` when their layout changes.
//!
//! | table | one row per | read by |
//! |---|---|---|
//! | `agent_search` | (term, public agent): best field weight, impact = weight × trust | text search, in impact order |
//! | `agent_capabilities`, `agent_tags` | (capability or tag, public agent), with trust | filters and listings by trust |
//! | `search_terms`, `search_term_trigrams` | term ever seen in a public name, and its trigrams | typo-tolerant and prefix names |
//!
//! Only public agents are indexed; revoking an agent removes its rows. Trust is copied
//! into every row search orders by, so [`set_trust`] rewrites them all in one transaction.

use std::collections::{BTreeMap, BTreeSet};

use molt_protocol::AgentId;
use sqlx::{Any, Row as _, Transaction};

use super::{
    Agent, Capability, DESCRIPTION_TOKENS_MAX, Profile, RegistryQueryError, TOKEN_BYTES_MAX, Visibility, query_error,
};
use crate::db::Database;

/// Relevance weights of the fields a term can occur in.
pub(super) const WEIGHT_NAME: i64 = 3;
pub(super) const WEIGHT_CAPABILITY: i64 = 2;
pub(super) const WEIGHT_DESCRIPTION: i64 = 1;

/// Version of the index layout; [`ensure_index`] rebuilds an index older than this.
pub const INDEX_VERSION: i64 = 1;
/// Agents rebuilt per transaction by [`ensure_index`].
pub const REBUILD_BATCH: usize = 500;
/// Bound parameters per multi-row statement. Both databases allow far more (32,766 and
/// 65,535), but SQLite resolves `$N` names by a linear search, so a statement's parse
/// time grows with the square of its parameters.
pub(super) const BIND_PARAMETERS_MAX: usize = 1_000;

/// Lowest and highest trust factor; [`set_trust`] refuses anything outside.
pub const TRUST_MIN: f64 = 0.0;
pub const TRUST_MAX: f64 = 1.0;

/// A value bound into a multi-row statement.
#[derive(Clone, Debug)]
pub(super) enum Bind {
    Text(String),
    Int(i64),
    Real(f64),
    Blob(Vec<u8>),
    NullText,
    NullInt,
    NullBlob,
}

/// Inserts `values` (row after row, `width` per row) with as few statements as the bind
/// limit allows: `{prefix} ($1, $2), ($3, $4)… {suffix}`. Returns the rows affected.
pub(super) async fn insert_rows(
    tx: &mut Transaction<'static, Any>,
    prefix: &str,
    width: usize,
    values: Vec<Bind>,
    suffix: &str,
    operation: &'static str,
) -> Result<u64, RegistryQueryError> {
    debug_assert!(width > 0 && values.len() % width == 0);
    let rows_per_statement = (BIND_PARAMETERS_MAX / width).max(1);
    let mut affected = 0;
    for chunk in values.chunks(rows_per_statement * width) {
        let rows = chunk.len() / width;
        let mut sql = String::with_capacity(prefix.len() + rows * width * 6 + suffix.len());
        sql.push_str(prefix);
        sql.push(' ');
        for row in 0..rows {
            if row > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for column in 0..width {
                if column > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("${}", row * width + column + 1));
            }
            sql.push(')');
        }
        sql.push_str(suffix);
        let mut statement = sqlx::query(&sql);
        for value in chunk {
            statement = bind(statement, value.clone());
        }
        affected += statement.execute(&mut **tx).await.map_err(query_error(operation))?.rows_affected();
    }
    Ok(affected)
}

pub(super) fn bind<'q>(
    statement: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    value: Bind,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    match value {
        Bind::Text(text) => statement.bind(text),
        Bind::Int(int) => statement.bind(int),
        Bind::Real(real) => statement.bind(real),
        Bind::Blob(blob) => statement.bind(blob),
        Bind::NullText => statement.bind(None::<String>),
        Bind::NullInt => statement.bind(None::<i64>),
        Bind::NullBlob => statement.bind(None::<Vec<u8>>),
    }
}

/// The index rows of many agents, gathered so they are written with few statements.
#[derive(Debug, Default)]
pub(super) struct IndexRows {
    postings: Vec<Bind>,
    capabilities: Vec<Bind>,
    tags: Vec<Bind>,
    terms: BTreeSet<String>,
}

impl IndexRows {
    /// Adds the rows of one agent; nothing unless the profile is public.
    pub(super) fn add(&mut self, id: AgentId, profile: &Profile, trust: f64) {
        if profile.visibility != Visibility::Public {
            return;
        }
        let id = id.to_string();
        let capability_names: BTreeSet<&str> = profile.capabilities.iter().map(|c| c.name.as_str()).collect();
        for name in capability_names {
            self.capabilities.extend([Bind::Text(name.to_owned()), Bind::Text(id.clone()), Bind::Real(trust)]);
        }
        let tags: BTreeSet<&str> =
            profile.capabilities.iter().flat_map(|c| c.tags.iter().map(String::as_str)).collect();
        for tag in tags {
            self.tags.extend([Bind::Text(tag.to_owned()), Bind::Text(id.clone()), Bind::Real(trust)]);
        }
        for (token, weight) in postings(profile) {
            self.postings.extend([
                Bind::Text(token),
                Bind::Text(id.clone()),
                Bind::Int(weight),
                Bind::Real(weight as f64 * trust),
            ]);
        }
        self.terms.extend(tokens(&profile.name));
    }

    pub(super) async fn write(self, tx: &mut Transaction<'static, Any>) -> Result<(), RegistryQueryError> {
        let IndexRows { postings, capabilities, tags, terms } = self;
        if !postings.is_empty() {
            let sql = "INSERT INTO agent_search (token, agent_id, weight, impact) VALUES";
            insert_rows(tx, sql, 4, postings, "", "indexing search terms").await?;
        }
        if !capabilities.is_empty() {
            let sql = "INSERT INTO agent_capabilities (name, agent_id, trust) VALUES";
            insert_rows(tx, sql, 3, capabilities, "", "indexing capabilities").await?;
        }
        if !tags.is_empty() {
            let sql = "INSERT INTO agent_tags (tag, agent_id, trust) VALUES";
            insert_rows(tx, sql, 3, tags, "", "indexing tags").await?;
        }
        write_terms(tx, terms).await
    }
}

/// Adds name terms to the vocabulary, with the trigrams of those that are new. Terms are
/// inserted in sorted order, so concurrent writers lock them in one order.
async fn write_terms(tx: &mut Transaction<'static, Any>, terms: BTreeSet<String>) -> Result<(), RegistryQueryError> {
    let mut new_terms = Vec::new();
    let terms: Vec<String> = terms.into_iter().collect();
    // RETURNING names only the rows this statement inserted.
    for chunk in terms.chunks(BIND_PARAMETERS_MAX) {
        let sql = format!(
            "INSERT INTO search_terms (term) VALUES {} ON CONFLICT (term) DO NOTHING RETURNING term",
            (1..=chunk.len()).map(|n| format!("(${n})")).collect::<Vec<_>>().join(", ")
        );
        let mut statement = sqlx::query(&sql);
        for term in chunk {
            statement = statement.bind(term.clone());
        }
        let rows = statement.fetch_all(&mut **tx).await.map_err(query_error("adding name terms"))?;
        for row in rows {
            new_terms.push(row.try_get::<String, _>("term").map_err(query_error("adding name terms"))?);
        }
    }
    new_terms.sort();
    let mut trigram_rows = BTreeSet::new();
    for term in &new_terms {
        for trigram in trigrams(term) {
            trigram_rows.insert((trigram, term.clone()));
        }
    }
    if trigram_rows.is_empty() {
        return Ok(());
    }
    let values = trigram_rows.into_iter().flat_map(|(trigram, term)| [Bind::Text(trigram), Bind::Text(term)]).collect();
    let sql = "INSERT INTO search_term_trigrams (trigram, term) VALUES";
    insert_rows(tx, sql, 2, values, " ON CONFLICT (trigram, term) DO NOTHING", "adding name trigrams").await?;
    Ok(())
}

/// Writes the index rows of one agent.
pub(super) async fn write_index(
    tx: &mut Transaction<'static, Any>,
    id: AgentId,
    profile: &Profile,
    trust: f64,
) -> Result<(), RegistryQueryError> {
    let mut rows = IndexRows::default();
    rows.add(id, profile, trust);
    rows.write(tx).await
}

/// Removes the index rows of one agent (the vocabulary keeps its terms).
pub(super) async fn clear_index(tx: &mut Transaction<'static, Any>, id: AgentId) -> Result<(), RegistryQueryError> {
    for table in ["agent_search", "agent_capabilities", "agent_tags"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE agent_id = $1"))
            .bind(id.to_string())
            .execute(&mut **tx)
            .await
            .map_err(query_error("clearing index rows"))?;
    }
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

/// Sets the trust factors of agents (as the trust engine computes them) and the index
/// rows ordered by them, in one transaction: all or nothing. Writers should send only
/// the scores that changed.
pub async fn set_trust(db: &Database, scores: &[(AgentId, f64)]) -> Result<(), SetTrustError> {
    if let Some(&(_, bad)) = scores.iter().find(|(_, trust)| !(TRUST_MIN..=TRUST_MAX).contains(trust)) {
        return Err(SetTrustError::OutOfRange(bad));
    }
    // One order for every writer: no deadlock between two batches.
    let scores: BTreeMap<AgentId, f64> = scores.iter().copied().collect();
    let mut tx = db.pool().begin().await.map_err(query_error("starting a trust update"))?;
    for (id, trust) in scores {
        let updated = sqlx::query("UPDATE agents SET trust = $1 WHERE id = $2")
            .bind(trust)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(query_error("setting trust"))?
            .rows_affected();
        if updated == 0 {
            return Err(SetTrustError::NotFound(id));
        }
        for sql in [
            "UPDATE agent_search SET impact = weight * $1 WHERE agent_id = $2",
            "UPDATE agent_capabilities SET trust = $1 WHERE agent_id = $2",
            "UPDATE agent_tags SET trust = $1 WHERE agent_id = $2",
        ] {
            sqlx::query(sql)
                .bind(trust)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(query_error("setting trust in the index"))?;
        }
    }
    tx.commit().await.map_err(query_error("committing a trust update"))?;
    Ok(())
}

/// Why [`ensure_index`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnsureIndexError {
    #[error("failed to rebuild the search index: taking its lease")]
    Lease(#[from] crate::db::QueryError),
    #[error("failed to rebuild the search index")]
    Query(#[from] RegistryQueryError),
}

/// Rebuilds the index from `agents` if it is older than [`INDEX_VERSION`] (after a
/// migration that changed its layout). One replica does it, under a lease; the others
/// go on serving. Returns the number of agents reindexed.
pub async fn ensure_index(
    db: &Database,
    holder: &str,
    now: molt_protocol::UnixMillis,
) -> Result<u64, EnsureIndexError> {
    const LEASE: &str = "registry-reindex";
    let version = index_version(db).await?;
    if version >= INDEX_VERSION {
        return Ok(0);
    }
    let lease_ttl = std::time::Duration::from_secs(10 * 60);
    let acquired = db.try_acquire_lease(LEASE, holder, lease_ttl, now).await?;
    if !acquired {
        tracing::info!("another replica is rebuilding the search index");
        return Ok(0);
    }
    let mut after = String::new();
    let mut count = 0;
    loop {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM agents WHERE id > $1 AND revoked_at_ms IS NULL ORDER BY id LIMIT {REBUILD_BATCH}",
            super::AGENT_COLUMNS
        ))
        .bind(after.clone())
        .fetch_all(db.pool())
        .await
        .map_err(query_error("reading agents to reindex"))?;
        let Some(last) = rows.last() else { break };
        after = last.try_get("id").map_err(query_error("reading agents to reindex"))?;
        let agents: Vec<Agent> = rows.iter().map(super::agent_from_row).collect::<Result<_, _>>()?;
        let mut tx = db.pool().begin().await.map_err(query_error("starting a reindex batch"))?;
        let mut index = IndexRows::default();
        for agent in &agents {
            clear_index(&mut tx, agent.id).await?;
            index.add(agent.id, &agent.profile, agent.trust);
        }
        index.write(&mut tx).await?;
        tx.commit().await.map_err(query_error("committing a reindex batch"))?;
        count += agents.len() as u64;
    }
    sqlx::query("UPDATE registry_meta SET value = $1 WHERE key = 'index_version'")
        .bind(INDEX_VERSION)
        .execute(db.pool())
        .await
        .map_err(query_error("recording the index version"))?;
    let _ = db.release_lease(LEASE, holder).await;
    tracing::info!(agents = count, version = INDEX_VERSION, "search index rebuilt");
    Ok(count)
}

async fn index_version(db: &Database) -> Result<i64, RegistryQueryError> {
    let row = sqlx::query("SELECT value FROM registry_meta WHERE key = 'index_version'")
        .fetch_optional(db.pool())
        .await
        .map_err(query_error("reading the index version"))?;
    match row {
        Some(row) => row.try_get("value").map_err(query_error("reading the index version")),
        None => Ok(0),
    }
}

/// Distinct terms of a profile with the best field each occurs in.
fn postings(profile: &Profile) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let mut add = |token: String, weight: i64| {
        let best = out.entry(token).or_insert(weight);
        *best = (*best).max(weight);
    };
    for token in tokens(&profile.name) {
        add(token, WEIGHT_NAME);
    }
    for capability in &profile.capabilities {
        for token in capability_tokens(capability) {
            add(token, WEIGHT_CAPABILITY);
        }
    }
    for token in tokens(&profile.description).into_iter().take(DESCRIPTION_TOKENS_MAX) {
        add(token, WEIGHT_DESCRIPTION);
    }
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

/// Trigrams of a term with boundary marks, e.g. `^ab`, `abc`, `bc$`.
pub(super) fn trigrams(term: &str) -> Vec<String> {
    let chars: Vec<char> = std::iter::once('^').chain(term.chars()).chain(std::iter::once('$')).collect();
    chars.windows(3).map(|window| window.iter().collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_lower_case_words() {
        assert_eq!(tokens("Hello, World! hello"), ["hello", "world"]);
        assert_eq!(tokens("'; DROP TABLE agents; --"), ["drop", "table", "agents"]);
        assert!(tokens("%_").is_empty());
    }

    #[test]
    fn a_posting_keeps_the_best_field() {
        let profile = Profile {
            name: "Weather Bot".into(),
            description: "weather and more".into(),
            capabilities: vec![Capability { name: "weather.v1".into(), version: String::new(), tags: vec![] }],
            key_binding: None,
            visibility: Visibility::Public,
            home_edge: None,
        };
        let postings = postings(&profile);
        assert_eq!(postings["weather"], WEIGHT_NAME);
        assert_eq!(postings["v1"], WEIGHT_CAPABILITY);
        assert_eq!(postings["more"], WEIGHT_DESCRIPTION);
    }

    #[test]
    fn trigrams_mark_the_boundaries() {
        assert_eq!(trigrams("abcd"), ["^ab", "abc", "bcd", "cd$"]);
        assert_eq!(trigrams("a"), ["^a$"]);
    }
}
