//! The search index through the library, on both backends: trust ordering and its
//! updates, prefix and typo expansion through the vocabulary, bounded posting depth,
//! renewal by edge presence, bulk import, and how replicas follow the change feed
//! (concurrent writers, backlogs, heartbeats).

use std::sync::Arc;
use std::time::Duration;

use molt_control_plane::registry::{
    self, Capability, FEED_PAGE, Health, ImportError, ImportedAgent, Profile, RANK_WINDOW_MIN, SearchIndex,
    SearchQuery, SetTrustError, Visibility,
};
use molt_protocol::keys::SigningKey;
use molt_protocol::{AgentId, UnixMillis};
use rand::rngs::OsRng;

use crate::fixture::Fixture;

crate::on_both_backends!(
    trust_orders_listings_and_ranking,
    trust_updates_are_all_or_nothing,
    names_match_by_prefix_and_typo,
    deep_postings_are_cut_at_a_fixed_depth,
    presence_renews_registrations,
    imports_are_all_or_nothing,
    revoked_agents_leave_the_index,
    replicas_see_every_change_of_concurrent_writers,
    a_backlog_is_applied_whole,
    heartbeats_reach_other_replicas,
);

const T0: UnixMillis = UnixMillis(1_700_000_000_000);

/// An index that reads heartbeats before every search, as a test needs.
fn index(fixture: &Fixture) -> SearchIndex {
    SearchIndex::new(fixture.db.clone()).with_liveness_interval(Duration::ZERO)
}

fn profile(name: &str, capabilities: &[(&str, &[&str])]) -> Profile {
    Profile {
        name: name.to_owned(),
        description: format!("the {name} agent"),
        capabilities: capabilities
            .iter()
            .map(|(capability, tags)| Capability {
                name: (*capability).to_owned(),
                version: "1".to_owned(),
                tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
            })
            .collect(),
        key_binding: None,
        visibility: Visibility::Public,
        home_edge: None,
    }
}

fn imported(profile: Profile, trust: f64) -> ImportedAgent {
    let key = SigningKey::generate(&mut OsRng).public_key();
    ImportedAgent {
        id: AgentId::from_inception_key(&key),
        public_key: key,
        profile,
        trust,
        registered_at: T0,
        last_heartbeat: T0,
    }
}

fn query(text: &str) -> SearchQuery {
    SearchQuery { text: text.to_owned(), limit: 20, ..SearchQuery::default() }
}

async fn names(index: &SearchIndex, query: &SearchQuery) -> Vec<String> {
    let page = index.search(query, T0).await.expect("search");
    page.hits.into_iter().map(|hit| hit.agent.profile.name).collect()
}

async fn trust_orders_listings_and_ranking(fixture: &Fixture) {
    let search = index(fixture);
    let agents: Vec<ImportedAgent> = [("low", 0.1), ("high", 0.9), ("middle", 0.5)]
        .into_iter()
        .map(|(name, trust)| imported(profile(&format!("{name} forecaster"), &[("weather.v1", &["rain"])]), trust))
        .collect();
    registry::import_agents(&fixture.db, &agents).await.expect("import");
    let by_capability = SearchQuery { capability: Some("weather.v1".into()), limit: 10, ..SearchQuery::default() };
    let expected = ["high forecaster", "middle forecaster", "low forecaster"];
    assert_eq!(names(&search, &by_capability).await, expected);
    let by_tag = SearchQuery { tag: Some("rain".into()), limit: 10, ..SearchQuery::default() };
    assert_eq!(names(&search, &by_tag).await, expected);
    assert_eq!(names(&search, &SearchQuery { limit: 10, ..SearchQuery::default() }).await, expected);
    assert_eq!(names(&search, &query("forecaster")).await, expected, "equal relevance: trust decides");

    // The trust engine reverses the order; listings and ranked text follow.
    let reversed: Vec<(AgentId, f64)> = agents.iter().map(|agent| (agent.id, 1.0 - agent.trust)).collect();
    registry::set_trust(&fixture.db, &reversed).await.expect("set trust");
    let expected = ["low forecaster", "middle forecaster", "high forecaster"];
    assert_eq!(names(&search, &by_capability).await, expected);
    assert_eq!(names(&search, &by_tag).await, expected);
    assert_eq!(names(&search, &query("forecaster")).await, expected);
    let page = search.search(&query("forecaster"), T0).await.unwrap();
    assert!((page.hits[0].trust - 0.9).abs() < 1e-9);
    assert!((page.hits[0].score - 3.0 * 0.9).abs() < 1e-9, "name word 3 × online 1 × trust 0.9");

    // Liveness ranks text: the most trusted goes quiet and falls behind.
    let later = T0.saturating_add(Duration::from_secs(11 * 60));
    for agent in &agents[1..] {
        registry::heartbeat(&fixture.db, agent.id, later).await.expect("heartbeat");
    }
    let page = search.search(&query("forecaster"), later).await.unwrap();
    let order: Vec<&str> = page.hits.iter().map(|hit| hit.agent.profile.name.as_str()).collect();
    assert_eq!(order, ["middle forecaster", "low forecaster", "high forecaster"], "1.5, 0.2 × 0.9 × 3, 0.1 × 3");
    assert_eq!(page.hits[1].health, Health::Offline);
}

async fn trust_updates_are_all_or_nothing(fixture: &Fixture) {
    let search = index(fixture);
    let agent = imported(profile("steady", &[("x", &[])]), 0.5);
    registry::import_agents(&fixture.db, std::slice::from_ref(&agent)).await.unwrap();
    let stranger = AgentId::from_inception_key(&SigningKey::generate(&mut OsRng).public_key());
    let error = registry::set_trust(&fixture.db, &[(agent.id, 0.8), (stranger, 0.8)]).await.unwrap_err();
    assert!(matches!(error, SetTrustError::NotFound(id) if id == stranger), "{error}");
    for bad in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
        let error = registry::set_trust(&fixture.db, &[(agent.id, bad)]).await.unwrap_err();
        assert!(matches!(error, SetTrustError::OutOfRange(_)), "{error}");
    }
    let stored = registry::agent(&fixture.db, agent.id).await.unwrap().unwrap();
    assert_eq!(stored.trust, 0.5, "nothing was written");
    let page = search.search(&query("steady"), T0).await.unwrap();
    assert_eq!(page.hits[0].trust, 0.5);
}

async fn names_match_by_prefix_and_typo(fixture: &Fixture) {
    let search = index(fixture);
    let agents = vec![
        imported(profile("Meteorologist Prime", &[]), 0.5),
        imported(profile("Translator", &[]), 0.5),
        imported(profile("Transcriber", &[]), 0.5),
    ];
    registry::import_agents(&fixture.db, &agents).await.unwrap();
    assert_eq!(names(&search, &query("meteo")).await, ["Meteorologist Prime"], "prefix");
    assert_eq!(names(&search, &query("meteorolgist")).await, ["Meteorologist Prime"], "one edit");
    assert_eq!(names(&search, &query("metaorolgist")).await, ["Meteorologist Prime"], "two edits");
    assert!(names(&search, &query("mateorolgsit")).await.is_empty(), "three edits");
    assert_eq!(names(&search, &query("translater")).await, ["Translator"], "one edit in 10 letters");
    let mut both = names(&search, &query("trans")).await;
    both.sort();
    assert_eq!(both, ["Transcriber", "Translator"], "prefix of two names");
    assert!(names(&search, &query("tra")).await.len() == 2, "3 letters are a prefix too");
    assert!(names(&search, &query("tr")).await.is_empty(), "2 letters are not");
    // Relevance: exact 3, one edit 1.5, prefix 1.5.
    let page = search.search(&query("translator"), T0).await.unwrap();
    assert_eq!(page.hits[0].relevance, 3.0);
    let page = search.search(&query("translater"), T0).await.unwrap();
    assert_eq!(page.hits[0].relevance, 1.5);
}

async fn deep_postings_are_cut_at_a_fixed_depth(fixture: &Fixture) {
    let search = index(fixture);
    let count = RANK_WINDOW_MIN as usize * 3;
    let agents: Vec<ImportedAgent> = (0..count)
        .map(|i| imported(profile(&format!("common {i}"), &[]), (i as f64 + 1.0) / (count as f64 + 1.0)))
        .collect();
    registry::import_agents(&fixture.db, &agents).await.unwrap();
    let most_trusted = |n: usize| -> Vec<f64> { agents.iter().rev().take(n).map(|agent| agent.trust).collect() };
    let trusts = |page: &registry::SearchPage| -> Vec<f64> { page.hits.iter().map(|hit| hit.trust).collect() };

    // A first page reads the window of most trusted postings and ranks within it.
    let first = search.search(&SearchQuery { limit: 10, ..query("common") }, T0).await.unwrap();
    assert_eq!(trusts(&first), most_trusted(10));
    assert_eq!(first.next_offset, Some(10));
    // Paging walks every posting, best trust first: deeper pages read deeper.
    let mut seen = Vec::new();
    let mut offset = 0;
    loop {
        let page = search.search(&SearchQuery { offset, limit: 40, ..query("common") }, T0).await.unwrap();
        seen.extend(trusts(&page));
        match page.next_offset {
            Some(next) => offset = next,
            None => break,
        }
    }
    assert_eq!(seen, most_trusted(count), "every agent once, best trust first");
}

async fn presence_renews_registrations(fixture: &Fixture) {
    let search = index(fixture);
    let agent = imported(profile("wanderer", &[]), 0.5);
    registry::import_agents(&fixture.db, std::slice::from_ref(&agent)).await.unwrap();
    let revoked = imported(profile("revoked", &[]), 0.5);
    registry::import_agents(&fixture.db, std::slice::from_ref(&revoked)).await.unwrap();
    registry::revoke(&fixture.db, revoked.id, T0).await.unwrap();
    let later = T0.saturating_add(registry::REGISTRATION_TTL).saturating_add(Duration::from_secs(1));
    assert_eq!(registry::agent(&fixture.db, agent.id).await.unwrap().unwrap().health(later), Health::Expired);

    let stranger = AgentId::from_inception_key(&SigningKey::generate(&mut OsRng).public_key());
    let mut tx = fixture.db.begin().await.unwrap();
    let renewed = registry::renew_by_presence(&mut tx, &[agent.id, revoked.id, stranger, agent.id], later).await;
    tx.commit().await.unwrap();
    assert_eq!(renewed.unwrap(), 1, "only the registered, unrevoked agent");
    let stored = registry::agent(&fixture.db, agent.id).await.unwrap().unwrap();
    assert_eq!(stored.health(later), Health::Online);
    assert_eq!(stored.expires_at, later.saturating_add(registry::REGISTRATION_TTL));
    let page = search.search(&query("wanderer"), later).await.unwrap();
    assert_eq!(page.hits.len(), 1);
}

async fn imports_are_all_or_nothing(fixture: &Fixture) {
    let search = index(fixture);
    let first = imported(profile("first", &[("a", &["t"])]), 0.5);
    registry::import_agents(&fixture.db, std::slice::from_ref(&first)).await.unwrap();
    let before = fixture.count("agents").await;
    let fresh = imported(profile("fresh", &[("b", &["u"])]), 0.5);
    let error = registry::import_agents(&fixture.db, &[fresh.clone(), first.clone()]).await.unwrap_err();
    assert!(matches!(error, ImportError::AlreadyRegistered(id) if id == first.id), "{error}");
    let error = registry::import_agents(&fixture.db, &[fresh.clone(), fresh.clone()]).await.unwrap_err();
    assert!(matches!(error, ImportError::AlreadyRegistered(id) if id == fresh.id), "{error}");
    let error = registry::import_agents(&fixture.db, &[imported(profile("bad", &[]), 2.0)]).await.unwrap_err();
    assert!(matches!(error, ImportError::Trust(_)), "{error}");
    assert_eq!(fixture.count("agents").await, before, "nothing was written");
    assert!(names(&search, &query("fresh")).await.is_empty());
    assert!(registry::agent(&fixture.db, fresh.id).await.unwrap().is_none());
}

async fn revoked_agents_leave_the_index(fixture: &Fixture) {
    let search = index(fixture);
    let agent = imported(profile("leaving", &[("gone.v1", &["bye"])]), 0.5);
    registry::import_agents(&fixture.db, std::slice::from_ref(&agent)).await.unwrap();
    assert_eq!(names(&search, &query("leaving")).await, ["leaving"]);
    assert_eq!(search.len(), 1);
    registry::revoke(&fixture.db, agent.id, T0).await.unwrap();
    registry::revoke(&fixture.db, agent.id, T0).await.expect("revocation is idempotent");
    assert!(names(&search, &query("leaving")).await.is_empty());
    assert_eq!(search.len(), 0, "the index dropped it");
    let listing = SearchQuery { capability: Some("gone.v1".into()), limit: 5, ..SearchQuery::default() };
    assert!(names(&search, &listing).await.is_empty());
}

/// Writers on several connections register, update, hide and revoke agents while a
/// second replica's index refreshes again and again: when they are done, one more
/// refresh leaves it holding exactly the agents the database says are searchable.
async fn replicas_see_every_change_of_concurrent_writers(fixture: &Fixture) {
    let search = Arc::new(index(fixture));
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let db = fixture.db.clone();
            tokio::spawn(async move {
                let mut kept = Vec::new();
                for i in 0..25 {
                    let agent = imported(profile(&format!("racer w{writer} n{i}"), &[("race.v1", &[])]), 0.5);
                    registry::register(&db, agent.id, &agent.public_key, &agent.profile, T0).await.unwrap();
                    match i % 5 {
                        0 => registry::revoke(&db, agent.id, T0).await.unwrap(),
                        1 => {
                            let hidden = Profile { visibility: Visibility::Private, ..agent.profile.clone() };
                            registry::update_profile(&db, agent.id, &hidden, T0).await.unwrap();
                        }
                        2 => registry::set_trust(&db, &[(agent.id, 0.9)]).await.unwrap(),
                        _ => {}
                    }
                    if i % 5 >= 2 {
                        kept.push(agent.id);
                    }
                }
                kept
            })
        })
        .collect();
    let reader = {
        let search = Arc::clone(&search);
        tokio::spawn(async move {
            for _ in 0..200 {
                search.refresh().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let mut expected = Vec::new();
    for writer in writers {
        expected.extend(writer.await.unwrap());
    }
    reader.await.unwrap();
    let listing = SearchQuery { capability: Some("race.v1".into()), limit: 100, ..SearchQuery::default() };
    let page = search.search(&listing, T0).await.unwrap();
    let mut found: Vec<AgentId> = page.hits.iter().map(|hit| hit.agent.id).collect();
    found.sort();
    expected.sort();
    assert_eq!(found, expected);
    assert_eq!(search.len(), expected.len(), "nothing hidden or revoked stays in the index");
    assert!(page.hits.iter().take(20).all(|hit| hit.trust == 0.9), "trust updates reached the order");
}

/// A backlog of a full feed page or more is applied to a copy and swapped in whole.
async fn a_backlog_is_applied_whole(fixture: &Fixture) {
    let search = index(fixture);
    let first = imported(profile("early bird", &[("bulk.v1", &[])]), 0.5);
    registry::import_agents(&fixture.db, std::slice::from_ref(&first)).await.unwrap();
    assert_eq!(search.refresh().await.unwrap().changes, 1);
    let count = FEED_PAGE as usize + 150;
    let agents: Vec<ImportedAgent> = (0..count)
        .map(|i| imported(profile(&format!("bulk {i}"), &[("bulk.v1", &["many"])]), (i % 100) as f64 / 100.0))
        .collect();
    for chunk in agents.chunks(500) {
        registry::import_agents(&fixture.db, chunk).await.unwrap();
    }
    registry::revoke(&fixture.db, first.id, T0).await.unwrap();
    let refreshed = search.refresh().await.unwrap();
    assert_eq!(refreshed.changes, count + 1);
    assert_eq!(refreshed.agents, count);
    let listing = SearchQuery { tag: Some("many".into()), limit: 100, ..SearchQuery::default() };
    let page = search.search(&listing, T0).await.unwrap();
    assert_eq!(page.hits.len(), 100);
    assert!(page.hits.windows(2).all(|pair| pair[0].trust >= pair[1].trust), "by trust");
    assert_eq!(names(&search, &query("2049")).await, ["bulk 2049"]);
    assert!(names(&search, &query("early")).await.is_empty());
}

/// Heartbeats are not numbered: another replica reads them by time.
async fn heartbeats_reach_other_replicas(fixture: &Fixture) {
    let search = index(fixture);
    let agents: Vec<ImportedAgent> =
        ["quiet", "chatty"].iter().map(|name| imported(profile(&format!("{name} pinger"), &[]), 0.5)).collect();
    registry::import_agents(&fixture.db, &agents).await.unwrap();
    let later = T0.saturating_add(Duration::from_secs(30 * 60));
    let first = search.search(&query("pinger"), later).await.unwrap();
    assert!(first.hits.iter().all(|hit| hit.health == Health::Offline));
    registry::heartbeat(&fixture.db, agents[1].id, later).await.unwrap();
    let page = search.search(&query("pinger"), later).await.unwrap();
    assert_eq!(page.hits[0].agent.profile.name, "chatty pinger", "online ranks first");
    assert_eq!(page.hits[0].health, Health::Online);
    assert!((page.hits[0].score - 3.0 * 0.5).abs() < 1e-9);
    assert!((page.hits[1].score - 3.0 * 0.2 * 0.5).abs() < 1e-9);
}
