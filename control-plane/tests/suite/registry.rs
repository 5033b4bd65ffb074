//! The registry through `Router::oneshot`, on both backends: signed registration,
//! updates and heartbeats, health over time, agent cards, every refused input (with its
//! problem code and nothing written) and search ranking.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use molt_control_plane::agent_auth::{self, NONCE_BYTES, NonceRecorder};
use molt_control_plane::api::{self, AppState, REQUEST_BODY_BYTES_MAX};
use molt_control_plane::clock::{Clock as _, ManualClock};
use molt_control_plane::metrics::Metrics;
use molt_control_plane::registry;
use molt_protocol::keys::{EncryptionSecret, KeyBinding, SigningKey};
use molt_protocol::{AgentId, UnixMillis};
use rand::RngCore as _;
use rand::rngs::OsRng;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::fixture::Fixture;

crate::on_both_backends!(
    agents_register_update_heartbeat_and_age,
    bad_registrations_get_problems_and_write_nothing,
    bad_signed_requests_are_refused,
    nonces_are_shared_by_replicas_and_purged,
    search_filters_ranks_pages_and_tolerates_typos,
    injection_in_search_is_harmless,
);

const T0: UnixMillis = UnixMillis(1_700_000_000_000);

struct TestAgent {
    key: SigningKey,
    id: AgentId,
}

impl TestAgent {
    fn new() -> TestAgent {
        let key = SigningKey::generate(&mut OsRng);
        let id = AgentId::from_inception_key(&key.public_key());
        TestAgent { key, id }
    }

    fn public_key_hex(&self) -> String {
        hex::encode(self.key.public_key().as_bytes())
    }

    fn key_binding_hex(&self, at: UnixMillis) -> String {
        let encryption = EncryptionSecret::generate(&mut OsRng).public_key();
        hex::encode(KeyBinding::sign(self.id, encryption, at, &self.key).unwrap().encode())
    }

    fn registration(&self, name: &str, extra: Value) -> String {
        let mut body = json!({"id": self.id.to_string(), "public_key": self.public_key_hex(), "name": name});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body.to_string()
    }
}

struct Harness {
    app: Router,
    clock: Arc<ManualClock>,
}

/// How to sign a request, for the tests that break one part.
struct Signing<'a> {
    agent: &'a TestAgent,
    header_agent: Option<AgentId>,
    timestamp: Option<UnixMillis>,
    nonce: Option<[u8; NONCE_BYTES]>,
    tamper: bool,
}

impl<'a> Signing<'a> {
    fn by(agent: &'a TestAgent) -> Self {
        Signing { agent, header_agent: None, timestamp: None, nonce: None, tamper: false }
    }
}

fn fresh_nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    OsRng.fill_bytes(&mut nonce);
    nonce
}

impl Harness {
    fn new(fixture: &Fixture) -> Harness {
        let clock = Arc::new(ManualClock::new(T0));
        let state = AppState::new(fixture.db.clone(), clock.clone(), Arc::new(Metrics::new()));
        Harness { app: api::router(state), clock }
    }

    fn advance(&self, by: Duration) {
        self.clock.set(self.clock.now().saturating_add(by));
    }

    async fn signed(&self, agent: &TestAgent, method: Method, uri: &str, body: &str) -> (StatusCode, Value) {
        self.signed_with(Signing::by(agent), method, uri, body).await
    }

    async fn signed_with(&self, signing: Signing<'_>, method: Method, uri: &str, body: &str) -> (StatusCode, Value) {
        let timestamp = signing.timestamp.unwrap_or_else(|| self.clock.now());
        let nonce = signing.nonce.unwrap_or_else(fresh_nonce);
        let signed_body = if signing.tamper { format!("{body} ") } else { body.to_owned() };
        let headers = agent_auth::sign_request(
            &signing.agent.key,
            signing.header_agent.unwrap_or(signing.agent.id),
            method.as_str(),
            uri,
            timestamp,
            nonce,
            signed_body.as_bytes(),
        );
        let mut request = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        self.call(request.body(Body::from(body.to_owned())).unwrap()).await
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Request::builder().uri(uri).body(Body::empty()).unwrap()).await
    }

    async fn call(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).map(|value| value.to_str().unwrap().to_owned());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        if status.is_client_error() || status.is_server_error() {
            assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{status}");
        }
        let body =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, body)
    }

    async fn register(&self, agent: &TestAgent, name: &str, extra: Value) -> Value {
        let (status, body) = self.signed(agent, Method::POST, "/v1/agents", &agent.registration(name, extra)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }
}

#[track_caller]
fn assert_problem(response: &(StatusCode, Value), status: StatusCode, code: &str) {
    let (found, body) = response;
    assert_eq!((*found, body["code"].as_str()), (status, Some(code)), "{body}");
    assert_eq!(body["type"], format!("urn:molt:problem:{code}"));
}

/// Agents, the change counter and the sum of revisions: what a registry write moves.
async fn registry_rows(fixture: &Fixture) -> [i64; 3] {
    let scalar = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(fixture.db.pool()).await.expect("read the registry")
    };
    [
        fixture.count("agents").await,
        scalar("SELECT value FROM registry_meta WHERE key = 'change_seq'").await,
        scalar("SELECT CAST(COALESCE(SUM(revision), 0) AS BIGINT) FROM agents").await,
    ]
}

async fn agents_register_update_heartbeat_and_age(fixture: &Fixture) {
    let harness = Harness::new(fixture);
    let agent = TestAgent::new();
    let binding = agent.key_binding_hex(T0);
    let edge = molt_protocol::EdgeId::from_inception_key(&SigningKey::generate(&mut OsRng).public_key());
    let created = harness
        .register(
            &agent,
            "Polyglot Translator",
            json!({
                "description": "Translates documents between languages",
                "capabilities": [{"name": "translate.text", "version": "1.2.0", "tags": ["nlp", "text"]}],
                "key_binding": binding,
                "visibility": "public",
                "home_edge": edge.to_string(),
            }),
        )
        .await;
    assert_eq!(created["id"], agent.id.to_string());
    assert_eq!((created["health"].as_str(), created["revision"].as_u64()), (Some("online"), Some(1)));
    assert_eq!(created["expires_at_ms"].as_u64(), Some(T0.saturating_add(registry::REGISTRATION_TTL).0));
    assert_eq!(created["key_binding"], binding);
    assert_eq!(created["home_edge"], edge.to_string());

    let uri = format!("/v1/agents/{}", agent.id);
    let health = |response: (StatusCode, Value)| {
        assert_eq!(response.0, StatusCode::OK, "{}", response.1);
        response.1["health"].as_str().unwrap().to_owned()
    };
    assert_eq!(health(harness.get(&uri).await), "online");
    harness.advance(Duration::from_secs(3 * 60));
    assert_eq!(health(harness.get(&uri).await), "degraded");
    harness.advance(Duration::from_secs(8 * 60));
    assert_eq!(health(harness.get(&uri).await), "offline");
    let beat = harness.signed(&agent, Method::POST, &format!("{uri}/heartbeat"), "").await;
    assert_eq!(beat.0, StatusCode::OK, "{}", beat.1);
    assert_eq!(beat.1["health"], "online");
    assert_eq!(health(harness.get(&uri).await), "online");
    harness.advance(registry::REGISTRATION_TTL);
    assert_eq!(health(harness.get(&uri).await), "expired");
    harness.signed(&agent, Method::POST, &format!("{uri}/heartbeat"), "").await;
    assert_eq!(health(harness.get(&uri).await), "online");

    // A profile update replaces the profile and its search rows.
    let update = json!({"name": "Polyglot", "description": "now unlisted", "visibility": "unlisted",
        "capabilities": [{"name": "summarise", "tags": ["nlp"]}]});
    let (status, updated) = harness.signed(&agent, Method::PUT, &uri, &update.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!((updated["name"].as_str(), updated["revision"].as_u64()), (Some("Polyglot"), Some(2)));
    assert_eq!(updated["visibility"], "unlisted");
    assert!(updated.get("key_binding").is_none());
    let (status, found) = harness.get("/v1/agents?q=polyglot").await;
    assert_eq!((status, found["items"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)), "unlisted: not found");
    let (_, listed) = harness.get("/v1/agents?capability=summarise").await;
    assert_eq!(listed["items"], json!([]));
    assert_eq!(harness.get(&uri).await.0, StatusCode::OK, "unlisted agents are readable by id");

    // The card.
    let (status, card) = harness.get(&format!("{uri}/agent-card.json")).await;
    assert_eq!(status, StatusCode::OK, "{card}");
    assert_eq!(card["name"], "Polyglot");
    assert_eq!(card["version"], "2");
    assert_eq!(card["skills"][0]["id"], "summarise");
    assert_eq!(card["skills"][0]["tags"], json!(["nlp"]));
    assert_eq!(card["defaultInputModes"], json!(["application/json"]));
    assert_eq!(card["molt"]["id"], agent.id.to_string());
    assert_eq!(card["molt"]["public_key"], agent.public_key_hex());

    // Private agents are hidden.
    let update = json!({"name": "Polyglot", "visibility": "private"});
    assert_eq!(harness.signed(&agent, Method::PUT, &uri, &update.to_string()).await.0, StatusCode::OK);
    assert_problem(&harness.get(&uri).await, StatusCode::NOT_FOUND, "not_found");
    assert_problem(&harness.get(&format!("{uri}/agent-card.json")).await, StatusCode::NOT_FOUND, "not_found");
    assert_problem(&harness.get("/v1/agents/agent-nonsense").await, StatusCode::NOT_FOUND, "not_found");
}

async fn bad_registrations_get_problems_and_write_nothing(fixture: &Fixture) {
    let harness = Harness::new(fixture);
    let agent = TestAgent::new();
    let post = |body: String| {
        let harness = &harness;
        let agent = &agent;
        async move { harness.signed(agent, Method::POST, "/v1/agents", &body).await }
    };
    let nothing = registry_rows(fixture).await;
    assert_eq!(nothing, [0; 3]);

    assert_problem(&post("{\"id\": ".to_owned()).await, StatusCode::BAD_REQUEST, "malformed_json");
    assert_problem(
        &post(agent.registration("a", json!({"surprise": 1}))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    );
    assert_problem(
        &post(json!({"id": agent.id.to_string(), "public_key": agent.public_key_hex()}).to_string()).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    );
    let huge = "x".repeat(REQUEST_BODY_BYTES_MAX + 1);
    assert_problem(
        &post(agent.registration("a", json!({"description": huge}))).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    );
    // An id derived from another key, signed by that other key.
    let other = TestAgent::new();
    let forged = json!({"id": other.id.to_string(), "public_key": agent.public_key_hex(), "name": "a"}).to_string();
    assert_problem(
        &harness.signed(&other, Method::POST, "/v1/agents", &forged).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "agent_id_not_derived",
    );
    assert_problem(
        &post(json!({"id": agent.id.to_string(), "public_key": "zz", "name": "a"}).to_string()).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_public_key",
    );
    // Signed by a key other than the one registered.
    let body = agent.registration("a", json!({}));
    let response = harness
        .signed_with(Signing { header_agent: Some(agent.id), ..Signing::by(&other) }, Method::POST, "/v1/agents", &body)
        .await;
    assert_problem(&response, StatusCode::UNAUTHORIZED, "invalid_signature");
    let response =
        harness.signed_with(Signing { tamper: true, ..Signing::by(&agent) }, Method::POST, "/v1/agents", &body).await;
    assert_problem(&response, StatusCode::UNAUTHORIZED, "invalid_signature");
    let response = harness
        .signed_with(
            Signing { timestamp: Some(T0.saturating_sub(Duration::from_secs(301))), ..Signing::by(&agent) },
            Method::POST,
            "/v1/agents",
            &body,
        )
        .await;
    assert_problem(&response, StatusCode::UNAUTHORIZED, "stale_request");
    let response = harness
        .signed_with(
            Signing { timestamp: Some(T0.saturating_add(Duration::from_secs(301))), ..Signing::by(&agent) },
            Method::POST,
            "/v1/agents",
            &body,
        )
        .await;
    assert_problem(&response, StatusCode::UNAUTHORIZED, "stale_request");
    let unsigned = Request::builder()
        .method(Method::POST)
        .uri("/v1/agents")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.clone()))
        .unwrap();
    assert_problem(&harness.call(unsigned).await, StatusCode::UNAUTHORIZED, "missing_signature");
    // A key binding signed by another key, one for another agent, and garbage.
    let foreign = TestAgent::new();
    let other_key_binding = hex::encode(
        KeyBinding::sign(agent.id, EncryptionSecret::generate(&mut OsRng).public_key(), T0, &foreign.key)
            .unwrap()
            .encode(),
    );
    for binding in [other_key_binding, foreign.key_binding_hex(T0), "00ff".to_owned(), "not hex".to_owned()] {
        assert_problem(
            &post(agent.registration("a", json!({"key_binding": binding}))).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_key_binding",
        );
    }
    for profile in [
        json!({"name": ""}),
        json!({"name": "a", "capabilities": [{"name": "Bad Name"}]}),
        json!({"name": "a", "capabilities": [{"name": "x", "tags": ["%_"]}]}),
        json!({"name": "a", "capabilities": [{"name": "x"}, {"name": "x"}]}),
        json!({"name": "a", "home_edge": "edge-nope"}),
    ] {
        let mut body = json!({"id": agent.id.to_string(), "public_key": agent.public_key_hex()});
        body.as_object_mut().unwrap().extend(profile.as_object().unwrap().clone());
        assert_problem(&post(body.to_string()).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_profile");
    }
    assert_problem(
        &post(agent.registration("a", json!({"visibility": "secret"}))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    );
    assert_eq!(registry_rows(fixture).await, nothing, "refused registrations write nothing");

    // A replayed registration, then a duplicate one.
    let nonce = fresh_nonce();
    let body = agent.registration("Agent A", json!({"capabilities": [{"name": "x", "tags": ["t"]}]}));
    let first = harness
        .signed_with(Signing { nonce: Some(nonce), ..Signing::by(&agent) }, Method::POST, "/v1/agents", &body)
        .await;
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    let written = registry_rows(fixture).await;
    let replay = harness
        .signed_with(Signing { nonce: Some(nonce), ..Signing::by(&agent) }, Method::POST, "/v1/agents", &body)
        .await;
    assert_problem(&replay, StatusCode::UNAUTHORIZED, "replayed_request");
    assert_problem(&post(body).await, StatusCode::CONFLICT, "agent_exists");
    assert_eq!(registry_rows(fixture).await, written, "a duplicate registration changes nothing");
}

async fn bad_signed_requests_are_refused(fixture: &Fixture) {
    let harness = Harness::new(fixture);
    let agent = TestAgent::new();
    let other = TestAgent::new();
    harness.register(&agent, "Agent A", json!({})).await;
    harness.register(&other, "Agent B", json!({})).await;
    let uri = format!("/v1/agents/{}", agent.id);
    let update = json!({"name": "Renamed"}).to_string();

    let stranger = TestAgent::new();
    assert_problem(
        &harness.signed(&stranger, Method::PUT, &uri, &update).await,
        StatusCode::UNAUTHORIZED,
        "unknown_agent",
    );
    assert_problem(&harness.signed(&other, Method::PUT, &uri, &update).await, StatusCode::FORBIDDEN, "not_your_agent");
    let forged = Signing { header_agent: Some(agent.id), ..Signing::by(&other) };
    assert_problem(
        &harness.signed_with(forged, Method::PUT, &uri, &update).await,
        StatusCode::UNAUTHORIZED,
        "invalid_signature",
    );
    // The signature covers the path: a signature for another path does not verify.
    let headers = agent_auth::sign_request(
        &agent.key,
        agent.id,
        "PUT",
        "/v1/agents/elsewhere",
        T0,
        fresh_nonce(),
        update.as_bytes(),
    );
    let mut request = Request::builder().method(Method::PUT).uri(&uri).header(header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(name, value);
    }
    assert_problem(
        &harness.call(request.body(Body::from(update.clone())).unwrap()).await,
        StatusCode::UNAUTHORIZED,
        "invalid_signature",
    );
    let mut request = Request::builder().method(Method::PUT).uri(&uri).header(header::CONTENT_TYPE, "application/json");
    for (name, value) in
        agent_auth::sign_request(&agent.key, agent.id, "PUT", &uri, T0, fresh_nonce(), update.as_bytes())
    {
        let value = if name == agent_auth::NONCE_HEADER { "xyz".to_owned() } else { value };
        request = request.header(name, value);
    }
    assert_problem(
        &harness.call(request.body(Body::from(update.clone())).unwrap()).await,
        StatusCode::UNAUTHORIZED,
        "malformed_signature",
    );
    assert_problem(&harness.signed(&agent, Method::PUT, &uri, "{").await, StatusCode::BAD_REQUEST, "malformed_json");
    assert_problem(
        &harness.signed(&agent, Method::PUT, &uri, &json!({"name": "x", "id": "y"}).to_string()).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    );
    let nonce = fresh_nonce();
    let ok =
        harness.signed_with(Signing { nonce: Some(nonce), ..Signing::by(&agent) }, Method::PUT, &uri, &update).await;
    assert_eq!(ok.0, StatusCode::OK, "{}", ok.1);
    let replay =
        harness.signed_with(Signing { nonce: Some(nonce), ..Signing::by(&agent) }, Method::PUT, &uri, &update).await;
    assert_problem(&replay, StatusCode::UNAUTHORIZED, "replayed_request");
    assert_eq!(harness.get(&uri).await.1["revision"], 2, "the replay changed nothing");

    // Revoked behind the API's back, as through another replica: refused once the keys
    // this replica keeps are older than their TTL.
    registry::revoke(&fixture.db, agent.id, T0).await.unwrap();
    tokio::time::sleep(molt_control_plane::keys::SIGNING_KEYS_CACHE_TTL).await;
    assert_problem(
        &harness.signed(&agent, Method::POST, &format!("{uri}/heartbeat"), "").await,
        StatusCode::UNAUTHORIZED,
        "revoked_agent",
    );
    assert_problem(&harness.get(&uri).await, StatusCode::NOT_FOUND, "not_found");
}

async fn nonces_are_shared_by_replicas_and_purged(fixture: &Fixture) {
    let first = Arc::new(NonceRecorder::new(fixture.db.clone()));
    let second = Arc::new(NonceRecorder::new(fixture.second_handle().await));
    let agent = TestAgent::new().id;
    let expiry = T0.saturating_add(agent_auth::TIMESTAMP_SKEW_MAX);
    let nonce = hex::encode(fresh_nonce());
    assert!(first.record(agent, &nonce, expiry, T0).await.unwrap());
    assert!(!second.record(agent, &nonce, expiry, T0).await.unwrap(), "the other replica sees it");
    assert!(second.record(TestAgent::new().id, &nonce, expiry, T0).await.unwrap(), "nonces are per agent");
    // Concurrent attempts: exactly one wins, on two replicas and within one batch.
    let racing = hex::encode(fresh_nonce());
    let (a, b) = tokio::join!(first.record(agent, &racing, expiry, T0), second.record(agent, &racing, expiry, T0));
    assert!(a.unwrap() ^ b.unwrap());
    let same_batch = hex::encode(fresh_nonce());
    let attempts = record_at_once(&first, vec![(agent, same_batch); 8], expiry).await;
    assert_eq!(attempts.into_iter().filter(|fresh| *fresh).count(), 1);
    // Many agents at once, more than one statement holds: each fresh nonce is recorded.
    let many: Vec<_> =
        (0..agent_auth::NONCE_BATCH_MAX + 100).map(|_| (TestAgent::new().id, hex::encode(fresh_nonce()))).collect();
    assert!(record_at_once(&first, many.clone(), expiry).await.into_iter().all(|fresh| fresh));
    let replays = record_at_once(&second, many.clone(), expiry).await;
    assert!(replays.into_iter().all(|fresh| !fresh), "every one is a replay now");
    assert_eq!(fixture.count("agent_request_nonces").await, 4 + many.len() as i64);
    // The same nonce with another expiry belongs to another signed request (its timestamp
    // differs; a replay's cannot): accepted, on a row of its own, and again refused.
    let short = hex::encode(fresh_nonce());
    let second_later = T0.saturating_add(Duration::from_secs(2));
    assert!(first.record(agent, &short, T0.saturating_add(Duration::from_secs(1)), T0).await.unwrap());
    assert!(first.record(agent, &short, expiry.saturating_add(Duration::from_secs(1)), second_later).await.unwrap());
    assert!(!second.record(agent, &short, expiry.saturating_add(Duration::from_secs(1)), second_later).await.unwrap());
    assert_eq!(fixture.count("agent_request_nonces").await, 6 + many.len() as i64);
    // Once the purge interval has passed, the next batch deletes what has expired.
    let later = expiry.saturating_add(Duration::from_millis(1));
    assert!(later.since(second_later) >= agent_auth::NONCE_PURGE_INTERVAL);
    let fresh = hex::encode(fresh_nonce());
    assert!(first.record(agent, &fresh, later.saturating_add(agent_auth::TIMESTAMP_SKEW_MAX), later).await.unwrap());
    assert_eq!(fixture.count("agent_request_nonces").await, 2, "expired nonces are purged");
}

/// On SQLite the nonce writer commits without syncing, on a connection of its own. That
/// setting must stay on that connection: every connection the pool hands out afterwards,
/// the ledger's among them, still syncs each commit (`synchronous` 2, FULL).
#[tokio::test]
async fn on_sqlite_only_the_nonce_writer_commits_without_a_sync() {
    let fixture = Fixture::sqlite().await;
    let recorder = Arc::new(NonceRecorder::new(fixture.db.clone()));
    let expiry = T0.saturating_add(agent_auth::TIMESTAMP_SKEW_MAX);
    let nonces: Vec<_> = (0..64).map(|_| (TestAgent::new().id, hex::encode(fresh_nonce()))).collect();
    assert!(record_at_once(&recorder, nonces, expiry).await.into_iter().all(|fresh| fresh));
    let pool = fixture.db.pool();
    let mut held = Vec::new();
    for _ in 0..pool.options().get_max_connections() {
        let mut connection = pool.acquire().await.unwrap();
        let row = sqlx::query("PRAGMA synchronous").fetch_one(&mut *connection).await.unwrap();
        assert_eq!(sqlx::Row::get::<i64, _>(&row, 0), 2, "a pooled connection commits without a sync");
        held.push(connection);
    }
    assert!(recorder.record(TestAgent::new().id, &hex::encode(fresh_nonce()), expiry, T0).await.unwrap());
}

/// Records every (agent, nonce) at once from its own task, at `T0`.
async fn record_at_once(
    recorder: &Arc<NonceRecorder>,
    nonces: Vec<(AgentId, String)>,
    expiry: UnixMillis,
) -> Vec<bool> {
    let mut tasks = tokio::task::JoinSet::new();
    for (agent, nonce) in nonces {
        let recorder = Arc::clone(recorder);
        tasks.spawn(async move { recorder.record(agent, &nonce, expiry, T0).await.unwrap() });
    }
    tasks.join_all().await
}

async fn search(harness: &Harness, query: &str) -> Value {
    let (status, body) = harness.get(&format!("/v1/agents?{query}")).await;
    assert_eq!(status, StatusCode::OK, "{query}: {body}");
    body
}

fn names(page: &Value) -> Vec<String> {
    page["items"].as_array().unwrap().iter().map(|item| item["agent"]["name"].as_str().unwrap().to_owned()).collect()
}

async fn search_filters_ranks_pages_and_tolerates_typos(fixture: &Fixture) {
    let harness = Harness::new(fixture);
    let topics = ["weather", "translate", "finance", "calendar", "search"];
    let mut agents = Vec::new();
    for i in 0..50 {
        let topic = topics[i % topics.len()];
        let agent = TestAgent::new();
        let visibility = if i == 49 { "private" } else { "public" };
        harness
            .register(
                &agent,
                &format!("{topic} helper {i}"),
                json!({
                    "description": format!("agent number {i} for {topic} tasks"),
                    "capabilities": [{"name": format!("{topic}.v1"), "version": "1", "tags": [topic, if i % 2 == 0 { "even" } else { "odd" }]}],
                    "visibility": visibility,
                }),
            )
            .await;
        agents.push(agent);
    }
    let special = TestAgent::new();
    harness
        .register(
            &special,
            "Meteorologist Prime",
            json!({"description": "forecasts", "capabilities": [{"name": "weather.v1", "tags": ["weather"]}]}),
        )
        .await;

    // Capability filter: exactly the ten weather agents and the special one.
    let page = search(&harness, "capability=weather.v1&limit=100").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 11, "{page}");
    assert!(page.get("next_cursor").is_none());
    let page = search(&harness, "capability=weather.v1&tag=even&limit=100").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 5, "{page}");
    assert!(search(&harness, "capability=nothing").await["items"].as_array().unwrap().is_empty());
    // Private agents never appear: agent 49 (search topic) is private.
    let page = search(&harness, "capability=search.v1&limit=100").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 9);

    // Typo-tolerant names: one and two edits away.
    assert_eq!(names(&search(&harness, "q=meteorolgist").await), ["Meteorologist Prime"]);
    assert_eq!(names(&search(&harness, "q=metaorolgist").await), ["Meteorologist Prime"]);
    assert_eq!(names(&search(&harness, "q=Meteorologist%20prime").await)[0], "Meteorologist Prime");
    // Full text: a name word ranks above a description-only word.
    let page = search(&harness, "q=prime%20weather&limit=100").await;
    assert_eq!(names(&page)[0], "Meteorologist Prime", "{page}");
    assert_eq!(page["items"][0]["relevance"], 5.0, "name 3 + capability 2");
    assert_eq!(page["items"][1]["relevance"], 3.0, "name 3");
    let page = search(&harness, "q=helper%2017").await;
    assert_eq!(names(&page)[0], "finance helper 17", "{page}");

    // Liveness ranks: the weather helpers go quiet except one that keeps beating.
    harness.advance(Duration::from_secs(11 * 60));
    let awake = &agents[5];
    let beat = harness.signed(awake, Method::POST, &format!("/v1/agents/{}/heartbeat", awake.id), "").await;
    assert_eq!(beat.0, StatusCode::OK);
    let page = search(&harness, "q=weather&capability=weather.v1&limit=100").await;
    assert_eq!(names(&page)[0], "weather helper 5", "{page}");
    assert_eq!(page["items"][0]["agent"]["health"], "online");
    assert_eq!(page["items"][1]["agent"]["health"], "offline");
    assert_eq!(page["items"][0]["trust"], registry::TRUST_NEUTRAL);
    let scores: Vec<f64> =
        page["items"].as_array().unwrap().iter().map(|item| item["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|pair| pair[0] >= pair[1]), "{scores:?}");

    // Pagination covers every public agent once.
    let mut seen = std::collections::BTreeSet::new();
    let mut uri = "limit=7".to_owned();
    loop {
        let page = search(&harness, &uri).await;
        for item in page["items"].as_array().unwrap() {
            assert!(seen.insert(item["agent"]["id"].as_str().unwrap().to_owned()), "no duplicates");
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => uri = format!("limit=7&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 50);
    for bad in ["limit=0", "limit=101", "cursor=bogus", "cursor=bzo5OTk5", "unknown=1"] {
        assert_problem(&harness.get(&format!("/v1/agents?{bad}")).await, StatusCode::BAD_REQUEST, "invalid_query");
    }
    // Expired agents leave search.
    harness.advance(registry::REGISTRATION_TTL);
    assert!(names(&search(&harness, "q=weather").await).is_empty());
}

async fn injection_in_search_is_harmless(fixture: &Fixture) {
    let harness = Harness::new(fixture);
    let agent = TestAgent::new();
    harness.register(&agent, "Drop Table Agent", json!({"capabilities": [{"name": "x", "tags": ["agents"]}]})).await;
    let before = registry_rows(fixture).await;
    for q in
        ["'; DROP TABLE agents; --", "%_", "%", "_", "\\", "' OR '1'='1", "\"; DELETE FROM agents; --", "$1", "\u{0}"]
    {
        let encoded: String = q.bytes().map(|b| format!("%{b:02X}")).collect();
        for query in [
            format!("q={encoded}"),
            format!("capability={encoded}"),
            format!("tag={encoded}"),
            format!("q={encoded}&capability={encoded}&tag={encoded}"),
        ] {
            let (status, body) = harness.get(&format!("/v1/agents?{query}")).await;
            assert_eq!(status, StatusCode::OK, "{q:?}: {body}");
            // Only real words match: the wildcards match nothing.
            let matched = names(&body);
            assert!(matched.is_empty() || matched == ["Drop Table Agent"], "{q:?}: {matched:?}");
        }
    }
    assert!(names(&search(&harness, "capability=%25").await).is_empty(), "% is not a wildcard");
    assert_eq!(registry_rows(fixture).await, before, "the tables are intact");
}
