//! Search over public, unrevoked, unexpired agents, answered from each replica's
//! in-memory [index](super::index) and the page's rows read from the database.
//!
//! **Freshness.** Every write a search must see (registration, profile, revocation,
//! trust) takes the next number of one counter in its transaction and stores it in
//! `agents.change_seq`; the counter's row lock makes numbers commit in order, so a
//! replica that has read every change up to *n* has missed none below it. A search
//! computes its page from the index, then reads the page's rows in one statement that
//! also asks whether any change is numbered after the last one the index holds (one
//! snapshot, so one round trip answers both). If one is, the index reads the changes
//! (a refresh that searches arriving together share) and the page is computed again:
//! a search sees every change committed before it began, on any replica. A backlog of a
//! full page or more (a bulk import, the first build) is applied to a copy that replaces
//! the index when complete; searches arriving meanwhile wait at most
//! [`REFRESH_WAIT_MAX`] and then answer from the index as it is. Heartbeats are not
//! numbered (they would serialise on the counter): at most every [`LIVENESS_INTERVAL`]
//! the index reads those newer than the newest it has seen less [`LIVENESS_LOOKBACK`],
//! so liveness in the ranking is about a second behind; the health shown is read with
//! the page.
//!
//! **With text**, each query word becomes one or more *terms*: the word itself (matched
//! in names, capabilities and descriptions) and, for words of 3 or more characters that
//! are not themselves a name word, name words of the vocabulary within the word's typo
//! budget (1 edit for 4–7 characters, 2 for 8+) or starting with it. Each term reads a
//! bounded window of postings in impact order (field weight × trust): the
//! [`RANK_WINDOW_MIN`] best for the first pages, as deep as the page for deeper ones (a
//! quarter of that for an expanded term). The windows give the candidates, so a query
//! costs the same whether a word occurs in ten agents or in a million. Each candidate is
//! scored from all its terms: per query word the best match, summed into the relevance,
//! times liveness (from the last heartbeat or edge presence) and trust. Ranking is exact
//! among the candidates; as the windows grow with the offset, pages past the first
//! window can shift slightly against earlier ones. Scores: a name word 3, within the
//! typo budget 2 − 0.5 per edit, a prefix of a name word 1.5, a capability or tag word
//! 2, a description word 1.
//!
//! **Without text** (filters only, or nothing), results are listed by trust, best first;
//! liveness is shown, not ranked.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use molt_protocol::{AgentId, UnixMillis};
use sqlx::Row as _;

use super::index::{Batch, Change, Field, Filter, IndexState, TermId, tokens, trigrams};
use super::rows::placeholders;
use super::{
    AGENT_COLUMNS, Agent, Health, RegistryQueryError, SEARCH_CANDIDATES_MAX, Visibility, agent_from_row, from_db,
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
pub const PREFIX_TERMS_MAX: usize = 4;
/// Vocabulary terms sharing trigrams with a word that are checked for edit distance.
pub const TYPO_CANDIDATES_MAX: usize = 64;
/// Changed agents read per statement while following the change feed; a backlog of this
/// many or more is applied to a copy of the index.
pub const FEED_PAGE: u32 = 2_000;
/// How long a search waits for another one's refresh before answering from the index
/// as it is (the first build is always waited for).
pub const REFRESH_WAIT_MAX: Duration = Duration::from_millis(250);
/// How often heartbeats are read into the index.
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);
/// Heartbeats are read again from this far behind the newest seen, so one whose
/// transaction committed late is not missed.
pub const LIVENESS_LOOKBACK: Duration = Duration::from_secs(10);
/// Heartbeats read per statement, and statements per refresh.
pub const LIVENESS_PAGE: u32 = 5_000;
pub const LIVENESS_PAGES_MAX: usize = 20;
/// Times a search computes its page before it answers without checking for changes
/// again (each check that finds one refreshes the index first).
pub const SEARCH_ATTEMPTS: usize = 3;

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

impl SearchPage {
    fn empty() -> SearchPage {
        SearchPage { hits: Vec::new(), next_offset: None }
    }
}

/// What one refresh read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Changed agents applied.
    pub changes: usize,
    /// Heartbeats read.
    pub heartbeats: usize,
    /// Agents in the index afterwards.
    pub agents: usize,
}

/// Where this replica is in the change feed.
#[derive(Debug)]
struct Feed {
    /// The last change applied: its number and agent id (rows migrated from before
    /// the feed share number 0).
    seq: i64,
    id: String,
    /// The newest heartbeat seen, in milliseconds.
    heartbeat_high: i64,
}

/// The search index of one replica and the database it follows. Cheap to share
/// behind an `Arc`; see the module documentation.
#[derive(Debug)]
pub struct SearchIndex {
    db: Database,
    /// The index and the last change it holds (`(change_seq, id)`), swapped together.
    state: RwLock<(IndexState, (i64, String))>,
    feed: tokio::sync::Mutex<Feed>,
    /// When heartbeats are next due, in milliseconds since `created`.
    liveness_due_ms: AtomicU64,
    created: Instant,
    /// Refreshes started: a search that sees this move while it waits was covered.
    polls: AtomicU64,
    built: AtomicBool,
    liveness_interval: Duration,
}

impl SearchIndex {
    /// An empty index over `db`; the first [`SearchIndex::refresh`] (or search) builds it.
    pub fn new(db: Database) -> SearchIndex {
        SearchIndex {
            db,
            state: RwLock::new((IndexState::default(), (-1, String::new()))),
            liveness_due_ms: AtomicU64::new(0),
            created: Instant::now(),
            feed: tokio::sync::Mutex::new(Feed { seq: -1, id: String::new(), heartbeat_high: 0 }),
            polls: AtomicU64::new(0),
            built: AtomicBool::new(false),
            liveness_interval: LIVENESS_INTERVAL,
        }
    }

    /// The index with heartbeats read at most every `interval` instead of
    /// [`LIVENESS_INTERVAL`] (zero: before every search).
    pub fn with_liveness_interval(mut self, interval: Duration) -> SearchIndex {
        self.liveness_interval = interval;
        self
    }

    /// Takes a heartbeat this replica recorded, so its own searches rank by it at once;
    /// other replicas read it within their liveness interval.
    pub fn note_heartbeat(&self, id: AgentId, last_heartbeat: UnixMillis, expires_at: UnixMillis) {
        self.write().0.set_liveness(id, last_heartbeat, expires_at);
    }

    /// Agents in the index now.
    pub fn len(&self) -> usize {
        self.read().0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads every change committed since the last refresh (all agents the first time)
    /// and, when due, recent heartbeats.
    pub async fn refresh(&self) -> Result<Refreshed, RegistryQueryError> {
        let mut feed = self.feed.lock().await;
        self.refresh_locked(&mut feed).await
    }

    async fn refresh_locked(&self, feed: &mut Feed) -> Result<Refreshed, RegistryQueryError> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        let mut refreshed = Refreshed::default();
        let mut page = self.changes_after(feed.seq, &feed.id).await?;
        if (page.len() as u32) < FEED_PAGE {
            refreshed.changes = page.len();
            if !page.is_empty() {
                advance(feed, &page);
                let mut state = self.write();
                state.0.apply(page.iter().map(|(_, agent)| Change::of(agent)));
                state.1 = (feed.seq, feed.id.clone());
            }
        } else {
            // A large backlog: build on a copy, so searches go on meanwhile.
            let started = Instant::now();
            let mut next = self.read().0.clone();
            let mut batch = Batch::default();
            let (mut seq, mut id, mut high) = (feed.seq, feed.id.clone(), feed.heartbeat_high);
            loop {
                for (_, agent) in &page {
                    next.stage(&mut batch, Change::of(agent));
                    high = high.max(to_db(agent.last_heartbeat));
                }
                if let Some((last_seq, last)) = page.last() {
                    (seq, id) = (*last_seq, last.id.to_string());
                }
                if (page.len() as u32) < FEED_PAGE {
                    break;
                }
                page = self.changes_after(seq, &id).await?;
            }
            refreshed.changes = batch.len();
            next.finish(batch);
            let old = std::mem::replace(&mut *self.write(), (next, (seq, id.clone())));
            drop(old);
            (feed.seq, feed.id, feed.heartbeat_high) = (seq, id, high);
            tracing::info!(
                changes = refreshed.changes,
                agents = self.len(),
                seconds = started.elapsed().as_secs_f64(),
                "search index caught up with a backlog"
            );
        }
        self.built.store(true, Ordering::SeqCst);
        if self.liveness_due() {
            refreshed.heartbeats = self.read_heartbeats(feed).await?;
            let next = self.created.elapsed().saturating_add(self.liveness_interval);
            self.liveness_due_ms.store(u64::try_from(next.as_millis()).unwrap_or(u64::MAX), Ordering::SeqCst);
        }
        refreshed.agents = self.len();
        Ok(refreshed)
    }

    fn liveness_due(&self) -> bool {
        let now = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        now >= self.liveness_due_ms.load(Ordering::SeqCst)
    }

    /// Refreshes before a search: joins a refresh that started after the search arrived,
    /// or runs one; waits at most [`REFRESH_WAIT_MAX`] for a long one once the index is built.
    async fn catch_up(&self) -> Result<(), RegistryQueryError> {
        let arrived = self.polls.load(Ordering::SeqCst);
        let mut feed = if self.built.load(Ordering::SeqCst) {
            match tokio::time::timeout(REFRESH_WAIT_MAX, self.feed.lock()).await {
                Ok(feed) => feed,
                Err(_) => return Ok(()),
            }
        } else {
            self.feed.lock().await
        };
        if self.polls.load(Ordering::SeqCst) != arrived {
            return Ok(());
        }
        self.refresh_locked(&mut feed).await.map(|_| ())
    }

    /// Changed agents after `(seq, id)`, in feed order, at most a page.
    async fn changes_after(&self, seq: i64, id: &str) -> Result<Vec<(i64, Agent)>, RegistryQueryError> {
        let rows = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS}, change_seq FROM agents WHERE (change_seq, id) > ($1, $2) \
             ORDER BY change_seq, id LIMIT {FEED_PAGE}"
        ))
        .bind(seq)
        .bind(id.to_owned())
        .fetch_all(self.db.pool())
        .await
        .map_err(query_error("reading registry changes"))?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.try_get("change_seq").map_err(query_error("reading registry changes"))?;
                Ok((seq, agent_from_row(row)?))
            })
            .collect()
    }

    /// Reads heartbeats from [`LIVENESS_LOOKBACK`] behind the newest seen into the index.
    async fn read_heartbeats(&self, feed: &mut Feed) -> Result<usize, RegistryQueryError> {
        let lookback = i64::try_from(LIVENESS_LOOKBACK.as_millis()).unwrap_or(i64::MAX);
        let (mut after, mut after_id) = (feed.heartbeat_high.saturating_sub(lookback), String::new());
        let mut read = 0;
        for _ in 0..LIVENESS_PAGES_MAX {
            let rows = sqlx::query(&format!(
                "SELECT id, last_heartbeat_ms, expires_at_ms FROM agents \
                 WHERE (last_heartbeat_ms, id) > ($1, $2) ORDER BY last_heartbeat_ms, id LIMIT {LIVENESS_PAGE}"
            ))
            .bind(after)
            .bind(after_id.clone())
            .fetch_all(self.db.pool())
            .await
            .map_err(query_error("reading heartbeats"))?;
            let mut beats = Vec::with_capacity(rows.len());
            for row in &rows {
                let decode = query_error("reading heartbeats");
                let id: String = row.try_get("id").map_err(decode)?;
                let heartbeat: i64 = row.try_get("last_heartbeat_ms").map_err(decode)?;
                let expires: i64 = row.try_get("expires_at_ms").map_err(decode)?;
                (after, after_id) = (heartbeat, id.clone());
                if let Ok(id) = id.parse::<AgentId>() {
                    beats.push((id, heartbeat, expires));
                }
            }
            {
                let mut state = self.write();
                for &(id, heartbeat, expires) in &beats {
                    state.0.set_liveness(id, from_db(heartbeat), from_db(expires));
                }
            }
            read += rows.len();
            feed.heartbeat_high = feed.heartbeat_high.max(after);
            if (rows.len() as u32) < LIVENESS_PAGE {
                break;
            }
        }
        Ok(read)
    }

    /// Searches public, unrevoked, unexpired agents. See the module documentation.
    pub async fn search(&self, query: &SearchQuery, now: UnixMillis) -> Result<SearchPage, RegistryQueryError> {
        // A filter no capability could satisfy matches nothing.
        if query.capability.as_deref().is_some_and(|name| !is_capability_name(name))
            || query.tag.as_deref().is_some_and(|tag| !is_tag(tag))
            || query.offset >= SEARCH_CANDIDATES_MAX
            || query.limit == 0
        {
            return Ok(SearchPage::empty());
        }
        if !self.built.load(Ordering::SeqCst) || self.liveness_due() {
            self.catch_up().await?;
        }
        let words: Vec<String> = tokens(&query.text).into_iter().take(QUERY_TOKENS_MAX).collect();
        for attempt in 1..=SEARCH_ATTEMPTS {
            let (found, applied) = {
                let state = self.read();
                (find(&state.0, query, &words, now), state.1.clone())
            };
            let more = found.len() > query.limit as usize;
            let found = &found[..found.len().min(query.limit as usize)];
            // The page's rows and, in the same statement (one snapshot), whether a change
            // committed after the index's last; on the last attempt, rows only. (The
            // check is ordered so that PostgreSQL's generic plan walks the index instead
            // of scanning the table for a row that is usually not there.)
            let check = (attempt < SEARCH_ATTEMPTS).then_some(&applied);
            let (mut agents, stale) = self.page_rows(found.iter().map(|(id, _)| *id), check).await?;
            if stale {
                self.catch_up().await?;
                continue;
            }
            let mut hits = Vec::with_capacity(found.len());
            for (id, relevance) in found {
                // Changed since the index saw it (a last attempt only): left out.
                let Some(agent) = agents.remove(id) else { continue };
                let health = agent.health(now);
                if agent.revoked_at.is_some()
                    || agent.profile.visibility != Visibility::Public
                    || health == Health::Expired
                {
                    continue;
                }
                let trust = agent.trust;
                let (relevance, score) = match relevance {
                    Some(relevance) => (*relevance, relevance * liveness(health) * trust),
                    None => (1.0, trust),
                };
                hits.push(SearchHit { agent, health, relevance, trust, score });
            }
            let end = query.offset.saturating_add(query.limit);
            let next_offset = (more && end < SEARCH_CANDIDATES_MAX).then_some(end);
            return Ok(SearchPage { hits, next_offset });
        }
        unreachable!("the last attempt does not check for changes")
    }

    /// The stored rows of a page's agents and, when `after` is given, whether some change
    /// is numbered after it.
    async fn page_rows(
        &self,
        ids: impl Iterator<Item = AgentId>,
        after: Option<&(i64, String)>,
    ) -> Result<(HashMap<AgentId, Agent>, bool), RegistryQueryError> {
        let ids: Vec<String> = ids.map(|id| id.to_string()).collect();
        let mut branches = Vec::with_capacity(2);
        let mut first = 1;
        if after.is_some() {
            branches.push(format!(
                "SELECT * FROM (SELECT {AGENT_COLUMNS}, CAST(1 AS BIGINT) AS stale FROM agents \
                 WHERE (change_seq, id) > ($1, $2) ORDER BY change_seq, id LIMIT 1) AS changed"
            ));
            first = 3;
        }
        if !ids.is_empty() {
            branches.push(format!(
                "SELECT {AGENT_COLUMNS}, CAST(0 AS BIGINT) AS stale FROM agents WHERE id IN ({})",
                placeholders(first, ids.len())
            ));
        }
        if branches.is_empty() {
            return Ok((HashMap::new(), false));
        }
        let sql = branches.join(" UNION ALL ");
        let mut statement = sqlx::query(&sql);
        if let Some((seq, id)) = after {
            statement = statement.bind(*seq).bind(id.clone());
        }
        for id in ids {
            statement = statement.bind(id);
        }
        let rows = statement.fetch_all(self.db.pool()).await.map_err(query_error("reading search results"))?;
        let mut agents = HashMap::with_capacity(rows.len());
        let mut stale = false;
        for row in &rows {
            if row.try_get::<i64, _>("stale").map_err(query_error("reading search results"))? == 1 {
                stale = true;
            } else {
                let agent = agent_from_row(row)?;
                agents.insert(agent.id, agent);
            }
        }
        Ok((agents, stale))
    }

    fn read(&self) -> RwLockReadGuard<'_, (IndexState, (i64, String))> {
        // A panic while the lock was held leaves a consistent index: batches are built
        // and then swapped or applied without a fallible step.
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, (IndexState, (i64, String))> {
        self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn advance(feed: &mut Feed, page: &[(i64, Agent)]) {
    for (_, agent) in page {
        feed.heartbeat_high = feed.heartbeat_high.max(to_db(agent.last_heartbeat));
    }
    if let Some((seq, agent)) = page.last() {
        (feed.seq, feed.id) = (*seq, agent.id.to_string());
    }
}

/// One term a query word expands to: the word itself (any field) or a name term.
#[derive(Clone, Copy, Debug, PartialEq)]
struct QueryTerm {
    word: usize,
    term: TermId,
    /// `None`: the word itself, scored by the field it occurs in; `Some(s)`: a name
    /// term scored `s`.
    name_score: Option<f64>,
}

/// The agents of a page from `offset`, at most `limit + 1`: listed by trust (no
/// relevance) without text, ranked with it.
fn find(state: &IndexState, query: &SearchQuery, words: &[String], now: UnixMillis) -> Vec<(AgentId, Option<f64>)> {
    // An unknown capability or tag matches nothing (yet: the page statement still checks
    // for changes).
    let Some(filter) = state.filter(query.capability.as_deref(), query.tag.as_deref()) else {
        return Vec::new();
    };
    if words.is_empty() {
        let slots = state.by_trust(filter, query.offset as usize, query.limit as usize + 1, now);
        slots.into_iter().map(|slot| (state.doc(slot).id, None)).collect()
    } else {
        rank(state, words, filter, query, now)
    }
}

/// The ranked agents of a text query from `offset`, at most `limit + 1`, with relevance.
fn rank(
    state: &IndexState,
    words: &[String],
    filter: Filter,
    query: &SearchQuery,
    now: UnixMillis,
) -> Vec<(AgentId, Option<f64>)> {
    let mut terms = Vec::new();
    for (word, text) in words.iter().enumerate() {
        if let Some(term) = state.term(text) {
            terms.push(QueryTerm { word, term, name_score: None });
        }
        for (term, score) in expansions(state, text) {
            terms.push(QueryTerm { word, term, name_score: Some(score) });
        }
    }
    // One more than the page reaches, to know whether another page follows.
    let window =
        query.offset.saturating_add(query.limit).saturating_add(1).clamp(RANK_WINDOW_MIN, SEARCH_CANDIDATES_MAX);
    let expansion_window = (window / EXPANSION_WINDOW_DIVISOR).max(1);
    let mut candidates = Vec::new();
    for term in &terms {
        let (name_only, depth) = match term.name_score {
            None => (false, window),
            Some(_) => (true, expansion_window),
        };
        candidates.extend(state.window(term.term, name_only, depth as usize, filter, now));
    }
    candidates.sort_unstable();
    candidates.dedup();
    let mut scored: Vec<(f64, AgentId, f64)> = Vec::with_capacity(candidates.len());
    let mut best = vec![0.0f64; words.len()];
    for slot in candidates {
        let doc = state.doc(slot);
        best.iter_mut().for_each(|score| *score = 0.0);
        for term in &terms {
            let Some(field) = doc.field_of(term.term) else { continue };
            let score = match term.name_score {
                None => field.weight(),
                Some(score) if field == Field::Name => score,
                Some(_) => 0.0,
            };
            best[term.word] = best[term.word].max(score);
        }
        let relevance: f64 = best.iter().sum();
        if relevance > 0.0 {
            scored.push((relevance * liveness(doc.health(now)) * doc.trust, doc.id, relevance));
        }
    }
    scored.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    scored
        .into_iter()
        .skip(query.offset as usize)
        .take(query.limit as usize + 1)
        .map(|(_, id, relevance)| (id, Some(relevance)))
        .collect()
}

/// Name terms a query word also matches, with their scores: within the word's typo
/// budget (nearest first) or starting with it. A word that is itself a name term is
/// taken as typed: it expands to nothing.
fn expansions(state: &IndexState, word: &str) -> Vec<(TermId, f64)> {
    let chars = word.chars().count();
    if chars < 3 || state.term(word).is_some_and(|term| state.is_name_term(term)) {
        return Vec::new();
    }
    let mut best: BTreeMap<TermId, f64> = BTreeMap::new();
    for (_, term) in state.name_terms_starting_with(word, PREFIX_TERMS_MAX) {
        best.insert(term, SCORE_PREFIX);
    }
    let budget = typo_budget(chars);
    if budget > 0 {
        let mut grams = trigrams(word);
        grams.sort();
        grams.dedup();
        // A term within `budget` edits keeps at least `chars - 3 × budget` of the word's trigrams.
        let shared_min = chars.saturating_sub(3 * budget).max(1);
        let mut typos: Vec<(usize, TermId)> = state
            .name_terms_sharing(&grams, shared_min, TYPO_CANDIDATES_MAX)
            .into_iter()
            .filter_map(|term| {
                let text = state.term_text(term);
                if text == word {
                    return None;
                }
                bounded_edit_distance(word, text, budget).map(|distance| (distance, term))
            })
            .collect();
        typos.sort_unstable();
        for (distance, term) in typos.into_iter().take(TYPO_TERMS_MAX) {
            let score = 2.0 - 0.5 * distance as f64;
            let entry = best.entry(term).or_insert(score);
            *entry = entry.max(score);
        }
    }
    best.into_iter().collect()
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
    fn typo_budgets_grow_with_the_word() {
        assert_eq!(typo_budget(3), 0);
        assert_eq!(typo_budget(4), 1);
        assert_eq!(typo_budget(8), 2);
    }
}
