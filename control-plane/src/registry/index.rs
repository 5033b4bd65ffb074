//! The search index: every public, unrevoked agent, held in memory by each replica and
//! fed from the database ([`super::search`] follows `agents.change_seq`).
//!
//! | structure | one entry per | read by |
//! |---|---|---|
//! | postings, per term and field (name, capability, description) | public agent whose best field for the term it is | text search, merged in impact order (field weight × trust) |
//! | capability and tag lists | public agent with that capability or tag | filters and listings by trust |
//! | the list of all | public agent | listing without filters |
//! | name vocabulary, with trigrams | term ever seen in a name | typo-tolerant and prefix names |
//!
//! Every list holds slots ordered by trust, best first, then by agent id. Changes are
//! applied in batches ([`IndexState::apply`]): a changed agent's old entries are dropped
//! from the lists it was in, its new entries are sorted and merged into the lists it is
//! in now, so a batch costs one pass over each list it touches whatever its size.
//!
//! Memory: about 4 bytes per list entry plus each agent's term ids with their fields;
//! the search benchmark's process peaks at 543 MB resident with 1,000,000 agents of 17
//! terms.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use molt_protocol::{AgentId, UnixMillis};

use super::{Agent, Capability, DESCRIPTION_TOKENS_MAX, Health, Profile, TOKEN_BYTES_MAX, Visibility};

/// Fields a term can occur in, best first; a posting is kept under the best one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Field {
    Name = 0,
    Capability = 1,
    Description = 2,
}

const FIELDS: [Field; 3] = [Field::Name, Field::Capability, Field::Description];

impl Field {
    /// Relevance of a query word found in this field.
    pub(super) fn weight(self) -> f64 {
        match self {
            Field::Name => 3.0,
            Field::Capability => 2.0,
            Field::Description => 1.0,
        }
    }
}

type Slot = u32;
pub(super) type TermId = u32;

/// What the index keeps of one agent.
#[derive(Clone, Debug)]
pub(super) struct Doc {
    pub id: AgentId,
    pub trust: f64,
    pub last_heartbeat: UnixMillis,
    pub expires_at: UnixMillis,
    /// Terms and the best field each occurs in, sorted by term.
    terms: Box<[(TermId, Field)]>,
    /// Sorted capability ids and tag ids.
    capabilities: Box<[u32]>,
    tags: Box<[u32]>,
}

impl Doc {
    pub(super) fn field_of(&self, term: TermId) -> Option<Field> {
        self.terms.binary_search_by_key(&term, |&(t, _)| t).ok().map(|at| self.terms[at].1)
    }

    pub(super) fn health(&self, now: UnixMillis) -> Health {
        Health::at(now, self.last_heartbeat, self.expires_at)
    }

    fn has(&self, list: ListRef) -> bool {
        match list {
            ListRef::All => true,
            ListRef::Posting(term, field) => self.field_of(term) == Some(field),
            ListRef::Capability(id) => self.capabilities.binary_search(&id).is_ok(),
            ListRef::Tag(id) => self.tags.binary_search(&id).is_ok(),
        }
    }
}

/// A list of the index, named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ListRef {
    All,
    Posting(TermId, Field),
    Capability(u32),
    Tag(u32),
}

/// Slots ordered by trust, best first, then by agent id. Entries past `sorted` are
/// staged by a batch and not yet merged.
#[derive(Clone, Debug, Default)]
struct TrustList {
    slots: Vec<Slot>,
    sorted: usize,
}

impl TrustList {
    fn entries(&self) -> &[Slot] {
        &self.slots[..self.sorted]
    }
}

/// An agent as the index takes it: `None` when it must not be found (revoked, not
/// public).
#[derive(Clone, Debug)]
pub(super) struct Change {
    pub id: AgentId,
    pub doc: Option<NewDoc>,
}

/// The searchable parts of a profile, before they are interned.
#[derive(Clone, Debug)]
pub(super) struct NewDoc {
    trust: f64,
    last_heartbeat: UnixMillis,
    expires_at: UnixMillis,
    postings: BTreeMap<String, Field>,
    capabilities: BTreeSet<String>,
    tags: BTreeSet<String>,
}

impl Change {
    pub(super) fn of(agent: &Agent) -> Change {
        let indexed = agent.revoked_at.is_none() && agent.profile.visibility == Visibility::Public;
        let doc = indexed.then(|| NewDoc {
            trust: agent.trust,
            last_heartbeat: agent.last_heartbeat,
            expires_at: agent.expires_at,
            postings: postings(&agent.profile),
            capabilities: agent.profile.capabilities.iter().map(|c| c.name.clone()).collect(),
            tags: agent.profile.capabilities.iter().flat_map(|c| c.tags.iter().cloned()).collect(),
        });
        Change { id: agent.id, doc }
    }
}

/// The changes of one batch so far: the slots whose old entries must go and the lists
/// to merge.
#[derive(Debug, Default)]
pub(super) struct Batch {
    changed: Vec<u64>,
    touched: HashSet<ListRef>,
    changes: usize,
}

impl Batch {
    fn mark(&mut self, slot: Slot) {
        let (word, bit) = (slot as usize / 64, slot % 64);
        if self.changed.len() <= word {
            self.changed.resize(word + 1, 0);
        }
        self.changed[word] |= 1 << bit;
    }

    fn is_marked(&self, slot: Slot) -> bool {
        self.changed.get(slot as usize / 64).is_some_and(|word| word & (1 << (slot % 64)) != 0)
    }

    /// Changes staged in this batch.
    pub(super) fn len(&self) -> usize {
        self.changes
    }
}

/// Which agents a query may return.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Filter {
    capability: Option<u32>,
    tag: Option<u32>,
}

impl Filter {
    fn admits(&self, doc: &Doc) -> bool {
        self.capability.is_none_or(|id| doc.capabilities.binary_search(&id).is_ok())
            && self.tag.is_none_or(|id| doc.tags.binary_search(&id).is_ok())
    }
}

/// Entries a filtered window or listing examines at most; past them, it returns what
/// it found.
pub const FILTERED_SCAN_MAX: usize = 50_000;

/// The in-memory index. See the module documentation.
#[derive(Clone, Debug, Default)]
pub(super) struct IndexState {
    docs: Vec<Option<Doc>>,
    free: Vec<Slot>,
    slots: HashMap<AgentId, Slot>,
    term_ids: HashMap<Box<str>, TermId>,
    term_texts: Vec<Box<str>>,
    postings: Vec<[TrustList; 3]>,
    /// Terms seen in a name, for prefixes, and their trigrams, for typos.
    name_terms: BTreeMap<Box<str>, TermId>,
    trigrams: HashMap<Box<str>, Vec<TermId>>,
    capability_ids: HashMap<Box<str>, u32>,
    capability_lists: Vec<TrustList>,
    tag_ids: HashMap<Box<str>, u32>,
    tag_lists: Vec<TrustList>,
    all: TrustList,
}

impl IndexState {
    /// Agents in the index.
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn doc(&self, slot: Slot) -> &Doc {
        // Invariant: lists hold only occupied slots once a batch is finished.
        self.docs[slot as usize].as_ref().expect("listed slots are occupied")
    }

    /// Applies changes in one batch.
    pub(super) fn apply(&mut self, changes: impl IntoIterator<Item = Change>) {
        let mut batch = Batch::default();
        for change in changes {
            self.stage(&mut batch, change);
        }
        self.finish(batch);
    }

    /// Stages a change: the agent's document is replaced at once, its list entries when
    /// the batch finishes. Lists must not be read until then.
    pub(super) fn stage(&mut self, batch: &mut Batch, change: Change) {
        batch.changes += 1;
        let existing = self.slots.get(&change.id).copied();
        if let Some(slot) = existing {
            batch.mark(slot);
            if let Some(old) = self.docs[slot as usize].take() {
                for list in self.lists_of(&old) {
                    batch.touched.insert(list);
                }
            }
        }
        let Some(new) = change.doc else {
            if let Some(slot) = existing {
                self.slots.remove(&change.id);
                self.free.push(slot);
            }
            return;
        };
        let slot = existing.unwrap_or_else(|| {
            let slot = self.free.pop().unwrap_or_else(|| {
                self.docs.push(None);
                (self.docs.len() - 1) as Slot
            });
            self.slots.insert(change.id, slot);
            slot
        });
        let mut terms: Vec<(TermId, Field)> = Vec::with_capacity(new.postings.len());
        for (text, field) in &new.postings {
            let term = self.intern_term(text);
            if *field == Field::Name {
                self.add_name_term(text, term);
            }
            terms.push((term, *field));
        }
        terms.sort_unstable_by_key(|&(term, _)| term);
        let mut capabilities: Vec<u32> = new
            .capabilities
            .iter()
            .map(|name| intern(&mut self.capability_ids, &mut self.capability_lists, name))
            .collect();
        capabilities.sort_unstable();
        let mut tags: Vec<u32> =
            new.tags.iter().map(|tag| intern(&mut self.tag_ids, &mut self.tag_lists, tag)).collect();
        tags.sort_unstable();
        let doc = Doc {
            id: change.id,
            trust: new.trust,
            last_heartbeat: new.last_heartbeat,
            expires_at: new.expires_at,
            terms: terms.into(),
            capabilities: capabilities.into(),
            tags: tags.into(),
        };
        for list in self.lists_of(&doc) {
            self.list_mut(list).slots.push(slot);
            batch.touched.insert(list);
        }
        self.docs[slot as usize] = Some(doc);
    }

    /// Merges the staged entries: each touched list drops the old entries of changed
    /// agents and takes their new ones in order.
    pub(super) fn finish(&mut self, batch: Batch) {
        let Batch { changed, touched, .. } = batch;
        let batch = Batch { changed, touched: HashSet::new(), changes: 0 };
        for list in touched {
            let mut taken = std::mem::take(self.list_mut(list));
            let staged = taken.slots.split_off(taken.sorted);
            let mut kept = taken.slots;
            kept.retain(|&slot| !batch.is_marked(slot));
            let mut staged: Vec<Slot> = staged
                .into_iter()
                .filter(|&slot| self.docs[slot as usize].as_ref().is_some_and(|doc| doc.has(list)))
                .collect();
            staged.sort_unstable_by(|&a, &b| self.order(a, b));
            staged.dedup();
            let merged = self.merge(kept, staged);
            let sorted = merged.len();
            *self.list_mut(list) = TrustList { slots: merged, sorted };
        }
    }

    /// Sets the liveness of an indexed agent; others are ignored.
    pub(super) fn set_liveness(&mut self, id: AgentId, last_heartbeat: UnixMillis, expires_at: UnixMillis) {
        if let Some(&slot) = self.slots.get(&id)
            && let Some(doc) = self.docs[slot as usize].as_mut()
        {
            doc.last_heartbeat = last_heartbeat;
            doc.expires_at = expires_at;
        }
    }

    fn order(&self, a: Slot, b: Slot) -> Ordering {
        let (a, b) = (self.doc(a), self.doc(b));
        b.trust.total_cmp(&a.trust).then_with(|| a.id.cmp(&b.id))
    }

    fn merge(&self, kept: Vec<Slot>, staged: Vec<Slot>) -> Vec<Slot> {
        if staged.is_empty() {
            return kept;
        }
        let mut out = Vec::with_capacity(kept.len() + staged.len());
        let (mut left, mut right) = (kept.into_iter().peekable(), staged.into_iter().peekable());
        while let (Some(&a), Some(&b)) = (left.peek(), right.peek()) {
            if self.order(a, b) == Ordering::Greater {
                out.push(b);
                right.next();
            } else {
                out.push(a);
                left.next();
            }
        }
        out.extend(left);
        out.extend(right);
        out
    }

    fn lists_of(&self, doc: &Doc) -> Vec<ListRef> {
        let mut lists = Vec::with_capacity(1 + doc.terms.len() + doc.capabilities.len() + doc.tags.len());
        lists.push(ListRef::All);
        lists.extend(doc.terms.iter().map(|&(term, field)| ListRef::Posting(term, field)));
        lists.extend(doc.capabilities.iter().map(|&id| ListRef::Capability(id)));
        lists.extend(doc.tags.iter().map(|&id| ListRef::Tag(id)));
        lists
    }

    fn list(&self, list: ListRef) -> &TrustList {
        match list {
            ListRef::All => &self.all,
            ListRef::Posting(term, field) => &self.postings[term as usize][field as usize],
            ListRef::Capability(id) => &self.capability_lists[id as usize],
            ListRef::Tag(id) => &self.tag_lists[id as usize],
        }
    }

    fn list_mut(&mut self, list: ListRef) -> &mut TrustList {
        match list {
            ListRef::All => &mut self.all,
            ListRef::Posting(term, field) => &mut self.postings[term as usize][field as usize],
            ListRef::Capability(id) => &mut self.capability_lists[id as usize],
            ListRef::Tag(id) => &mut self.tag_lists[id as usize],
        }
    }

    fn intern_term(&mut self, text: &str) -> TermId {
        if let Some(&id) = self.term_ids.get(text) {
            return id;
        }
        let id = self.postings.len() as TermId;
        self.postings.push(Default::default());
        self.term_ids.insert(text.into(), id);
        self.term_texts.push(text.into());
        id
    }

    fn add_name_term(&mut self, text: &str, term: TermId) {
        if self.name_terms.contains_key(text) {
            return;
        }
        self.name_terms.insert(text.into(), term);
        let mut grams = trigrams(text);
        grams.sort();
        grams.dedup();
        for gram in grams {
            self.trigrams.entry(gram.into()).or_default().push(term);
        }
    }

    /// The id of a term, if any agent ever had it.
    pub(super) fn term(&self, text: &str) -> Option<TermId> {
        self.term_ids.get(text).copied()
    }

    /// Whether some indexed agent has this term in its name now.
    pub(super) fn is_name_term(&self, term: TermId) -> bool {
        !self.postings[term as usize][Field::Name as usize].entries().is_empty()
    }

    /// Name terms that start with `prefix` (not equal to it), in order, at most `max`.
    pub(super) fn name_terms_starting_with(&self, prefix: &str, max: usize) -> Vec<(String, TermId)> {
        use std::ops::Bound::{Excluded, Unbounded};
        self.name_terms
            .range::<str, _>((Excluded(prefix), Unbounded))
            .take_while(|(text, _)| text.starts_with(prefix))
            .filter(|&(_, &term)| self.is_name_term(term))
            .take(max)
            .map(|(text, &term)| (text.to_string(), term))
            .collect()
    }

    /// Name terms sharing at least `shared_min` of `grams`, most shared first, at most `max`.
    pub(super) fn name_terms_sharing(&self, grams: &[String], shared_min: usize, max: usize) -> Vec<TermId> {
        let mut counts: HashMap<TermId, usize> = HashMap::new();
        for gram in grams {
            for &term in self.trigrams.get(gram.as_str()).map_or(&[][..], Vec::as_slice) {
                *counts.entry(term).or_default() += 1;
            }
        }
        let mut found: Vec<(usize, TermId)> = counts
            .into_iter()
            .filter(|&(term, n)| n >= shared_min && self.is_name_term(term))
            .map(|(t, n)| (n, t))
            .collect();
        found.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        found.into_iter().take(max).map(|(_, term)| term).collect()
    }

    pub(super) fn term_text(&self, term: TermId) -> &str {
        &self.term_texts[term as usize]
    }

    /// The filter for a capability and a tag, or `None` when one of them is unknown (so
    /// nothing matches).
    pub(super) fn filter(&self, capability: Option<&str>, tag: Option<&str>) -> Option<Filter> {
        let capability = match capability {
            Some(name) => Some(*self.capability_ids.get(name)?),
            None => None,
        };
        let tag = match tag {
            Some(tag) => Some(*self.tag_ids.get(tag)?),
            None => None,
        };
        Some(Filter { capability, tag })
    }

    /// Up to `depth` unexpired agents with `term` admitted by `filter`, best impact
    /// (field weight × trust) first; `name_only` reads only name postings.
    pub(super) fn window(
        &self,
        term: TermId,
        name_only: bool,
        depth: usize,
        filter: Filter,
        now: UnixMillis,
    ) -> Vec<Slot> {
        let fields: &[Field] = if name_only { &FIELDS[..1] } else { &FIELDS };
        let lists: Vec<(Field, &[Slot])> =
            fields.iter().map(|&field| (field, self.postings[term as usize][field as usize].entries())).collect();
        let filtered = filter.capability.is_some() || filter.tag.is_some();
        if filtered {
            // A short filter list is cheaper to read whole than the postings.
            let short = self.filter_list(filter).filter(|list| list.len() < lists.iter().map(|(_, l)| l.len()).sum());
            if let Some(short) = short {
                let mut found: Vec<(f64, Slot)> = short
                    .iter()
                    .take(FILTERED_SCAN_MAX)
                    .filter_map(|&slot| {
                        let doc = self.doc(slot);
                        let field = doc.field_of(term)?;
                        let admitted =
                            (!name_only || field == Field::Name) && filter.admits(doc) && doc.expires_at > now;
                        admitted.then_some((field.weight() * doc.trust, slot))
                    })
                    .collect();
                found
                    .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then_with(|| self.doc(a.1).id.cmp(&self.doc(b.1).id)));
                return found.into_iter().take(depth).map(|(_, slot)| slot).collect();
            }
        }
        let mut positions = vec![0usize; lists.len()];
        let mut out = Vec::with_capacity(depth);
        let mut examined = 0;
        while out.len() < depth && examined < FILTERED_SCAN_MAX {
            // The best head of the field lists by impact.
            let mut best: Option<(usize, f64, Slot)> = None;
            for (i, (field, list)) in lists.iter().enumerate() {
                let Some(&slot) = list.get(positions[i]) else { continue };
                let impact = field.weight() * self.doc(slot).trust;
                let better = match best {
                    None => true,
                    Some((_, top, top_slot)) => {
                        impact > top || (impact == top && self.doc(slot).id < self.doc(top_slot).id)
                    }
                };
                if better {
                    best = Some((i, impact, slot));
                }
            }
            let Some((i, _, slot)) = best else { break };
            positions[i] += 1;
            examined += 1;
            let doc = self.doc(slot);
            if doc.expires_at > now && (!filtered || filter.admits(doc)) {
                out.push(slot);
            }
        }
        out
    }

    /// Unexpired agents admitted by `filter`, best trust first, from `offset`, at most `count`.
    pub(super) fn by_trust(&self, filter: Filter, offset: usize, count: usize, now: UnixMillis) -> Vec<Slot> {
        let list = self.filter_list(filter).unwrap_or(self.all.entries());
        list.iter()
            .take(FILTERED_SCAN_MAX)
            .filter(|&&slot| {
                let doc = self.doc(slot);
                doc.expires_at > now && filter.admits(doc)
            })
            .skip(offset)
            .take(count)
            .copied()
            .collect()
    }

    /// The list a filter narrows to: the capability's, else the tag's.
    fn filter_list(&self, filter: Filter) -> Option<&[Slot]> {
        match (filter.capability, filter.tag) {
            (Some(id), _) => Some(self.list(ListRef::Capability(id)).entries()),
            (None, Some(id)) => Some(self.list(ListRef::Tag(id)).entries()),
            (None, None) => None,
        }
    }
}

fn intern(ids: &mut HashMap<Box<str>, u32>, lists: &mut Vec<TrustList>, text: &str) -> u32 {
    if let Some(&id) = ids.get(text) {
        return id;
    }
    let id = lists.len() as u32;
    lists.push(TrustList::default());
    ids.insert(text.into(), id);
    id
}

/// Distinct terms of a profile with the best field each occurs in.
fn postings(profile: &Profile) -> BTreeMap<String, Field> {
    let mut out = BTreeMap::new();
    let mut add = |token: String, field: Field| {
        let best = out.entry(token).or_insert(field);
        *best = (*best).min(field);
    };
    for token in tokens(&profile.name) {
        add(token, Field::Name);
    }
    for capability in &profile.capabilities {
        for token in capability_tokens(capability) {
            add(token, Field::Capability);
        }
    }
    for token in tokens(&profile.description).into_iter().take(DESCRIPTION_TOKENS_MAX) {
        add(token, Field::Description);
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
    use molt_protocol::keys::SigningKey;

    use super::*;

    fn agent(seed: u8, name: &str, description: &str, capabilities: &[&str], trust: f64) -> Agent {
        let key = SigningKey::from_bytes(&[seed; 32]).public_key();
        Agent {
            id: AgentId::from_inception_key(&key),
            public_key: key,
            profile: Profile {
                name: name.into(),
                description: description.into(),
                capabilities: capabilities
                    .iter()
                    .map(|name| Capability { name: (*name).into(), version: String::new(), tags: vec!["fast".into()] })
                    .collect(),
                key_binding: None,
                visibility: Visibility::Public,
                home_edge: None,
            },
            revision: 1,
            registered_at: UnixMillis(0),
            updated_at: UnixMillis(0),
            last_heartbeat: UnixMillis(0),
            expires_at: UnixMillis(1_000_000),
            revoked_at: None,
            trust,
        }
    }

    fn ids(state: &IndexState, slots: &[Slot]) -> Vec<AgentId> {
        slots.iter().map(|&slot| state.doc(slot).id).collect()
    }

    /// Every list is sorted and holds exactly the agents that belong in it.
    fn check(state: &IndexState) {
        let mut lists = vec![ListRef::All];
        for term in 0..state.postings.len() as TermId {
            lists.extend(FIELDS.iter().map(|&field| ListRef::Posting(term, field)));
        }
        lists.extend((0..state.capability_lists.len() as u32).map(ListRef::Capability));
        lists.extend((0..state.tag_lists.len() as u32).map(ListRef::Tag));
        for list in lists {
            let entries = state.list(list);
            assert_eq!(entries.sorted, entries.slots.len(), "{list:?} has staged entries");
            assert!(entries.slots.windows(2).all(|pair| state.order(pair[0], pair[1]) == Ordering::Less), "{list:?}");
            let expected = state.slots.values().filter(|&&slot| state.doc(slot).has(list)).count();
            assert_eq!(entries.slots.len(), expected, "{list:?}");
        }
    }

    #[test]
    fn a_posting_keeps_the_best_field() {
        let agent = agent(1, "Weather Bot", "weather and more", &["weather.v1"], 0.5);
        let postings = postings(&agent.profile);
        assert_eq!(postings["weather"], Field::Name);
        assert_eq!(postings["v1"], Field::Capability);
        assert_eq!(postings["more"], Field::Description);
    }

    #[test]
    fn batches_keep_every_list_sorted_and_exact() {
        let mut state = IndexState::default();
        let agents: Vec<Agent> = (0..40)
            .map(|i| {
                agent(
                    i,
                    &format!("bot{} common", i % 7),
                    "shared words here",
                    &["cap.a", "cap.b"],
                    f64::from(i % 5) / 4.0,
                )
            })
            .collect();
        state.apply(agents.iter().map(Change::of));
        check(&state);
        assert_eq!(state.len(), 40);
        // Change trust and names, hide some, revoke some, re-add one, in one batch,
        // with an agent changed twice.
        let mut changes = Vec::new();
        for (i, agent) in agents.iter().enumerate() {
            let mut changed = agent.clone();
            match i % 4 {
                0 => changed.trust = 1.0 - changed.trust,
                1 => changed.profile.visibility = Visibility::Unlisted,
                2 => changed.revoked_at = Some(UnixMillis(5)),
                _ => changed.profile.name = "renamed".into(),
            }
            changes.push(Change::of(&changed));
        }
        changes.push(Change::of(&agents[0]));
        state.apply(changes);
        check(&state);
        assert_eq!(state.len(), 20);
        state.apply(agents.iter().map(Change::of));
        check(&state);
        assert_eq!(state.len(), 40);
    }

    #[test]
    fn windows_follow_impact_and_skip_the_expired() {
        let mut state = IndexState::default();
        let named = agent(1, "Alpha", "", &[], 0.4); // name: 3 × 0.4 = 1.2
        let described = agent(2, "Other", "alpha", &[], 1.0); // description: 1 × 1.0
        let mut expired = agent(3, "Alpha two", "", &[], 0.9);
        expired.expires_at = UnixMillis(10);
        state.apply([&named, &described, &expired].map(Change::of));
        let term = state.term("alpha").unwrap();
        let now = UnixMillis(100);
        let window = state.window(term, false, 10, Filter::default(), now);
        assert_eq!(ids(&state, &window), [named.id, described.id]);
        let names = state.window(term, true, 10, Filter::default(), now);
        assert_eq!(ids(&state, &names), [named.id]);
        assert_eq!(state.window(term, false, 1, Filter::default(), now).len(), 1);
    }

    #[test]
    fn filters_narrow_windows_and_listings() {
        let mut state = IndexState::default();
        let a = agent(1, "Alpha", "", &["cap.a"], 0.4);
        let b = agent(2, "Alpha", "", &["cap.b"], 0.9);
        state.apply([&a, &b].map(Change::of));
        let now = UnixMillis(100);
        let filter = state.filter(Some("cap.a"), None).unwrap();
        let term = state.term("alpha").unwrap();
        assert_eq!(ids(&state, &state.window(term, false, 10, filter, now)), [a.id]);
        assert_eq!(ids(&state, &state.by_trust(filter, 0, 10, now)), [a.id]);
        assert_eq!(ids(&state, &state.by_trust(Filter::default(), 0, 10, now)), [b.id, a.id]);
        assert!(state.filter(Some("cap.none"), None).is_none());
        let tagged = state.filter(None, Some("fast")).unwrap();
        assert_eq!(state.by_trust(tagged, 1, 10, now).len(), 1);
    }

    #[test]
    fn the_name_vocabulary_finds_prefixes_and_near_terms() {
        let mut state = IndexState::default();
        state
            .apply([Change::of(&agent(1, "Translator", "", &[], 0.5)), Change::of(&agent(2, "Transit", "", &[], 0.5))]);
        let prefixed: Vec<String> = state.name_terms_starting_with("trans", 10).into_iter().map(|(t, _)| t).collect();
        assert_eq!(prefixed, ["transit", "translator"]);
        let mut grams = trigrams("translater");
        grams.sort();
        grams.dedup();
        let near = state.name_terms_sharing(&grams, 4, 10);
        assert_eq!(near.first().copied(), state.term("translator"));
    }

    #[test]
    fn tokens_are_lower_case_words() {
        assert_eq!(tokens("Hello, World! hello"), ["hello", "world"]);
        assert_eq!(tokens("'; DROP TABLE agents; --"), ["drop", "table", "agents"]);
        assert!(tokens("%_").is_empty());
    }

    #[test]
    fn trigrams_mark_the_boundaries() {
        assert_eq!(trigrams("abcd"), ["^ab", "abc", "bcd", "cd$"]);
        assert_eq!(trigrams("a"), ["^a$"]);
    }
}
