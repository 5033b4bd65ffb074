//! Search over public, unrevoked, unexpired agents.
//!
//! **With text**, each query word becomes one or more *terms*: the word itself (matched
//! in names, capabilities and descriptions) and, for words of 3 or more characters, name
//! terms from the vocabulary that are within the word's typo budget or start with it.
//! Each term reads a bounded window of postings in impact order (weight × trust): the
//! [`RANK_WINDOW_MIN`] best for the first pages, as deep as the page for deeper ones (a
//! quarter of that for an expanded term). The windows give the candidates, so a query
//! costs the same whether a word occurs in ten agents or in a million, and a deeper page
//! costs what it reaches. One statement then scores each candidate from all its postings
//! of the query's terms (an agent matching every word scores for each, however deep its
//! postings lie), taking per query word the best match and summing them into the
//! relevance, multiplies by liveness (from the last heartbeat or edge presence) and
//! trust, and returns the requested page. Ranking is exact among the candidates; as the
//! windows grow with the offset, pages past the first window can shift slightly against
//! earlier ones. Scores: a name word 3, within the typo budget 2 − 0.5 per edit, a prefix
//! of a name word 1.5, a capability or tag word 2, a description word 1.
//!
//! **Without text** (filters only, or nothing), results are listed by trust, best first,
//! straight from the `(capability or tag, trust)` indexes; liveness is shown, not ranked.
//!
//! Every value from the query is a bound parameter; only placeholders and the module's
//! own constants are formatted into SQL.

use std::collections::BTreeMap;

use molt_protocol::UnixMillis;
use sqlx::Row as _;

use super::index::{Bind, WEIGHT_NAME, bind, tokens, trigrams};
use super::{
    AGENT_COLUMNS, DEGRADED_WITHIN, Health, ONLINE_WITHIN, RegistryQueryError, SEARCH_CANDIDATES_MAX, agent_from_row,
    is_capability_name, is_tag, query_error, to_db,
};
use crate::db::Database;

/// Most query words used; further words are ignored.
pub const QUERY_TOKENS_MAX: usize = 8;
/// Postings read per query word, best impact first, for pages within the first window;
/// a deeper page reads as deep as it reaches (`offset + limit`).
pub const RANK_WINDOW_MIN: u32 = 50;
/// Postings read per vocabulary term a word expands to, as a fraction of the above.
pub const EXPANSION_WINDOW_DIVISOR: u32 = 4;
/// Name terms within the typo budget taken per word, nearest first.
pub const TYPO_TERMS_MAX: usize = 4;
/// Name terms that start with the word taken per word.
pub const PREFIX_TERMS_MAX: u32 = 4;
/// Vocabulary terms sharing trigrams with a word that are checked for edit distance.
pub const TYPO_CANDIDATES_MAX: u32 = 64;

/// Liveness factors of the ranking.
const LIVENESS_ONLINE: f64 = 1.0;
const LIVENESS_DEGRADED: f64 = 0.6;
const LIVENESS_OFFLINE: f64 = 0.2;
/// Score of a name word that starts with the query word.
const SCORE_PREFIX: f64 = 1.5;

pub(super) fn liveness(health: Health) -> f64 {
    match health {
        Health::Online => LIVENESS_ONLINE,
        Health::Degraded => LIVENESS_DEGRADED,
        Health::Offline => LIVENESS_OFFLINE,
        Health::Expired => 0.0,
    }
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
    pub agent: super::Agent,
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

impl SearchPage {
    fn empty() -> SearchPage {
        SearchPage { hits: Vec::new(), next_offset: None }
    }
}

/// Searches public, unrevoked, unexpired agents. See the module documentation.
pub async fn search(db: &Database, query: &SearchQuery, now: UnixMillis) -> Result<SearchPage, RegistryQueryError> {
    // A filter no capability could satisfy matches nothing; it never reaches the database.
    if query.capability.as_deref().is_some_and(|name| !is_capability_name(name))
        || query.tag.as_deref().is_some_and(|tag| !is_tag(tag))
        || query.offset >= SEARCH_CANDIDATES_MAX
        || query.limit == 0
    {
        return Ok(SearchPage::empty());
    }
    let words: Vec<String> = tokens(&query.text).into_iter().take(QUERY_TOKENS_MAX).collect();
    if words.is_empty() { list_by_trust(db, query, now).await } else { ranked(db, query, &words, now).await }
}

/// Binds and SQL of the optional filters, as conditions on `column` (an agent id).
struct Filters {
    sql: String,
    binds: Vec<Bind>,
}

impl Filters {
    /// Conditions numbered from `$first`.
    fn new(query: &SearchQuery, column: &str, first: usize) -> Filters {
        let mut sql = String::new();
        let mut binds = Vec::new();
        if let Some(capability) = &query.capability {
            let n = first + binds.len();
            sql.push_str(&format!(" AND {column} IN (SELECT agent_id FROM agent_capabilities WHERE name = ${n})"));
            binds.push(Bind::Text(capability.clone()));
        }
        if let Some(tag) = &query.tag {
            let n = first + binds.len();
            sql.push_str(&format!(" AND {column} IN (SELECT agent_id FROM agent_tags WHERE tag = ${n})"));
            binds.push(Bind::Text(tag.clone()));
        }
        Filters { sql, binds }
    }
}

/// Filters only (or nothing): by trust, best first, from the trust-ordered indexes.
async fn list_by_trust(db: &Database, query: &SearchQuery, now: UnixMillis) -> Result<SearchPage, RegistryQueryError> {
    let columns = prefixed_agent_columns();
    // $1 now, $2 limit, $3 offset, then the filters.
    let (sql, filters) = match (&query.capability, &query.tag) {
        (Some(capability), tag) => {
            let mut binds = vec![Bind::Text(capability.clone())];
            let mut tag_sql = "";
            if let Some(tag) = tag {
                tag_sql = " AND c.agent_id IN (SELECT agent_id FROM agent_tags WHERE tag = $5)";
                binds.push(Bind::Text(tag.clone()));
            }
            let sql = format!(
                "SELECT {columns} FROM agent_capabilities c JOIN agents a ON a.id = c.agent_id \
                 WHERE c.name = $4{tag_sql} AND a.expires_at_ms > $1 AND a.revoked_at_ms IS NULL \
                 ORDER BY c.trust DESC, c.agent_id LIMIT $2 OFFSET $3"
            );
            (sql, binds)
        }
        (None, Some(tag)) => {
            let sql = format!(
                "SELECT {columns} FROM agent_tags t JOIN agents a ON a.id = t.agent_id \
                 WHERE t.tag = $4 AND a.expires_at_ms > $1 AND a.revoked_at_ms IS NULL \
                 ORDER BY t.trust DESC, t.agent_id LIMIT $2 OFFSET $3"
            );
            (sql, vec![Bind::Text(tag.clone())])
        }
        (None, None) => {
            let sql = format!(
                "SELECT {columns} FROM agents a WHERE a.visibility = 'public' AND a.expires_at_ms > $1 \
                 AND a.revoked_at_ms IS NULL ORDER BY a.trust DESC, a.id LIMIT $2 OFFSET $3"
            );
            (sql, Vec::new())
        }
    };
    let mut statement =
        sqlx::query(&sql).bind(to_db(now)).bind(i64::from(query.limit) + 1).bind(i64::from(query.offset));
    for value in filters {
        statement = bind(statement, value);
    }
    let rows = statement.fetch_all(db.pool()).await.map_err(query_error("listing agents"))?;
    let mut hits = Vec::with_capacity(rows.len());
    for row in &rows {
        let agent = agent_from_row(row)?;
        let health = agent.health(now);
        let trust = agent.trust;
        hits.push(SearchHit { agent, health, relevance: 1.0, trust, score: trust });
    }
    Ok(page(hits, query))
}

/// One term a query word expands to: the word itself (any field) or a name term.
#[derive(Clone, Debug, PartialEq)]
struct Term {
    word: usize,
    term: String,
    /// `None`: the word itself, scored by the field it occurs in; `Some(s)`: a name term
    /// scored `s`.
    name_score: Option<f64>,
}

async fn ranked(
    db: &Database,
    query: &SearchQuery,
    words: &[String],
    now: UnixMillis,
) -> Result<SearchPage, RegistryQueryError> {
    let mut terms = Vec::new();
    for (word, text) in words.iter().enumerate() {
        terms.push(Term { word, term: text.clone(), name_score: None });
        for (term, score) in expansions(db, text).await? {
            terms.push(Term { word, term, name_score: Some(score) });
        }
    }
    // One more than the page reaches, to know whether another page follows.
    let window =
        query.offset.saturating_add(query.limit).saturating_add(1).clamp(RANK_WINDOW_MIN, SEARCH_CANDIDATES_MAX);
    let expansion_window = (window / EXPANSION_WINDOW_DIVISOR).max(1);
    // $1 now, $2 limit, $3 offset, $4… the filters, then per term its text, its word and
    // its score (-1: the word itself, scored by the field it occurs in).
    let filters = Filters::new(query, "s.agent_id", 4);
    let mut binds = filters.binds.clone();
    let placeholder = |binds: &mut Vec<Bind>, value: Bind| {
        binds.push(value);
        format!("${}", 3 + binds.len())
    };
    let mut branches = Vec::with_capacity(terms.len());
    let mut scoring = Vec::with_capacity(terms.len());
    for (i, term) in terms.iter().enumerate() {
        let token = placeholder(&mut binds, Bind::Text(term.term.clone()));
        let word = placeholder(&mut binds, Bind::Int(term.word as i64));
        let score = placeholder(&mut binds, Bind::Real(term.name_score.unwrap_or(-1.0)));
        scoring.push(format!("({token}, {word}, {score})"));
        let (name_only, depth) = match term.name_score {
            None => ("", window),
            Some(_) => (" AND s.weight = 3", expansion_window),
        };
        branches.push(format!(
            "SELECT agent_id FROM (SELECT s.agent_id FROM agent_search s WHERE s.token = {token}{name_only}{} \
             ORDER BY s.impact DESC LIMIT {depth}) AS b{i}",
            filters.sql
        ));
    }
    let online = i64::try_from(ONLINE_WITHIN.as_millis()).unwrap_or(i64::MAX);
    let degraded = i64::try_from(DEGRADED_WITHIN.as_millis()).unwrap_or(i64::MAX);
    let columns = prefixed_agent_columns();
    // Candidates come from the windows; their relevance from all their postings of the
    // query's terms, however deep, so an agent matching every word scores for each.
    let sql = format!(
        "SELECT {columns}, r.relevance AS relevance FROM (\
            SELECT agent_id, SUM(best) AS relevance FROM (\
                SELECT s.agent_id AS agent_id, q.column2 AS word, MAX(CASE WHEN q.column3 < 0 \
                    THEN CAST(s.weight AS DOUBLE PRECISION) WHEN s.weight = {WEIGHT_NAME} THEN q.column3 ELSE 0.0 END) AS best \
                FROM (SELECT DISTINCT agent_id FROM ({}) AS h) AS c \
                JOIN agent_search s ON s.agent_id = c.agent_id \
                JOIN (VALUES {}) AS q ON q.column1 = s.token \
                GROUP BY s.agent_id, q.column2\
            ) AS m GROUP BY agent_id\
         ) AS r JOIN agents a ON a.id = r.agent_id \
         WHERE a.expires_at_ms > $1 AND a.revoked_at_ms IS NULL AND r.relevance > 0 \
         ORDER BY r.relevance * (CASE WHEN a.last_heartbeat_ms > $1 - {online} THEN {LIVENESS_ONLINE:?} \
             WHEN a.last_heartbeat_ms > $1 - {degraded} THEN {LIVENESS_DEGRADED:?} ELSE {LIVENESS_OFFLINE:?} END) \
             * a.trust DESC, a.id LIMIT $2 OFFSET $3",
        branches.join(" UNION ALL "),
        scoring.join(", ")
    );
    let mut statement =
        sqlx::query(&sql).bind(to_db(now)).bind(i64::from(query.limit) + 1).bind(i64::from(query.offset));
    for value in binds {
        statement = bind(statement, value);
    }
    let rows = statement.fetch_all(db.pool()).await.map_err(query_error("ranking search results"))?;
    let mut hits = Vec::with_capacity(rows.len());
    for row in &rows {
        let agent = agent_from_row(row)?;
        let relevance: f64 = row.try_get("relevance").map_err(query_error("ranking search results"))?;
        let health = agent.health(now);
        let trust = agent.trust;
        let score = relevance * liveness(health) * trust;
        hits.push(SearchHit { agent, health, relevance, trust, score });
    }
    Ok(page(hits, query))
}

/// Name terms of the vocabulary a query word also matches, with their scores: within
/// the word's typo budget (nearest first) or starting with it. A word that is itself a
/// name term is taken as typed: it expands to nothing.
async fn expansions(db: &Database, word: &str) -> Result<Vec<(String, f64)>, RegistryQueryError> {
    let chars = word.chars().count();
    if chars < 3 {
        return Ok(Vec::new());
    }
    let budget = typo_budget(chars);
    let mut sql = String::new();
    let mut binds = Vec::new();
    let word_trigrams: Vec<String> = {
        let mut all = trigrams(word);
        all.sort();
        all.dedup();
        all
    };
    if budget > 0 {
        // A term within `budget` edits keeps at least `chars - 3 × budget` of the word's trigrams.
        let shared_min = chars.saturating_sub(3 * budget).max(1) as i64;
        let placeholders: Vec<String> = (1..=word_trigrams.len()).map(|n| format!("${n}")).collect();
        binds.extend(word_trigrams.iter().cloned().map(Bind::Text));
        binds.push(Bind::Int(shared_min));
        sql.push_str(&format!(
            "SELECT term, CAST(0 AS BIGINT) AS prefix FROM (SELECT term, COUNT(*) AS shared FROM search_term_trigrams \
             WHERE trigram IN ({}) AND NOT EXISTS (SELECT 1 FROM search_terms WHERE term = $WORD) \
             GROUP BY term HAVING COUNT(*) >= ${} \
             ORDER BY shared DESC, term LIMIT {TYPO_CANDIDATES_MAX}) AS typo UNION ALL ",
            placeholders.join(", "),
            binds.len()
        ));
    }
    let (low, high) = (binds.len() + 1, binds.len() + 2);
    binds.push(Bind::Text(word.to_owned()));
    binds.push(Bind::Text(format!("{word}{}", char::MAX)));
    sql.push_str(&format!(
        "SELECT term, CAST(1 AS BIGINT) AS prefix FROM (SELECT term FROM search_terms WHERE term > ${low} AND term < ${high} \
         AND NOT EXISTS (SELECT 1 FROM search_terms WHERE term = ${low}) ORDER BY term LIMIT {PREFIX_TERMS_MAX}) AS prefixed"
    ));
    let sql = sql.replace("$WORD", &format!("${low}"));
    let mut statement = sqlx::query(&sql);
    for value in binds {
        statement = bind(statement, value);
    }
    let rows = statement.fetch_all(db.pool()).await.map_err(query_error("expanding a search word"))?;
    let mut typos = Vec::new();
    let mut best: BTreeMap<String, f64> = BTreeMap::new();
    for row in &rows {
        let read = query_error("expanding a search word");
        let term: String = row.try_get("term").map_err(read)?;
        let prefix: i64 = row.try_get("prefix").map_err(read)?;
        if term == word {
            continue;
        }
        if prefix == 1 {
            let score = best.entry(term).or_insert(SCORE_PREFIX);
            *score = score.max(SCORE_PREFIX);
        } else if let Some(distance) = bounded_edit_distance(word, &term, budget) {
            typos.push((distance, term));
        }
    }
    typos.sort();
    for (distance, term) in typos.into_iter().take(TYPO_TERMS_MAX) {
        let typo_score = f64::from(2u32) - 0.5 * distance as f64;
        let score = best.entry(term).or_insert(typo_score);
        *score = score.max(typo_score);
    }
    Ok(best.into_iter().collect())
}

/// Cuts the `limit + 1` rows read into a page and says whether another follows.
fn page(mut hits: Vec<SearchHit>, query: &SearchQuery) -> SearchPage {
    let more = hits.len() > query.limit as usize;
    hits.truncate(query.limit as usize);
    let end = query.offset.saturating_add(query.limit);
    let next_offset = (more && end < SEARCH_CANDIDATES_MAX).then_some(end);
    SearchPage { hits, next_offset }
}

fn prefixed_agent_columns() -> String {
    AGENT_COLUMNS.split(',').map(|column| format!("a.{}", column.trim())).collect::<Vec<_>>().join(", ")
}

/// Edits a query word of this many characters may be off by and still match a name.
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
    fn pages_say_when_more_follow() {
        let query = SearchQuery { limit: 2, offset: 0, ..SearchQuery::default() };
        assert_eq!(page(Vec::new(), &query), SearchPage::empty());
        let capped = SearchQuery { limit: 100, offset: SEARCH_CANDIDATES_MAX - 100, ..SearchQuery::default() };
        assert_eq!(page(Vec::new(), &capped).next_offset, None);
    }

    #[test]
    fn agent_columns_are_prefixed() {
        assert!(prefixed_agent_columns().starts_with("a.id, a.public_key, "));
        assert!(prefixed_agent_columns().ends_with("a.trust"));
    }
}
