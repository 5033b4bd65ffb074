//! A2A card import (`PUT /v1/agents/{id}/agent-card.json`) and the admin revocation of
//! agents (`POST /v1/agents/{id}/revoke`) through `Router::oneshot`, on both backends:
//! export → import round trips, registration from a card, and every refused input with its
//! problem code and nothing written.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use molt_control_plane::agent_auth::{self, NONCE_BYTES};
use molt_control_plane::api::{self, AppState, REQUEST_BODY_BYTES_MAX};
use molt_control_plane::auth::AdminToken;
use molt_control_plane::clock::{Clock as _, ManualClock};
use molt_control_plane::metrics::Metrics;
use molt_protocol::keys::{EncryptionSecret, KeyBinding, SigningKey};
use molt_protocol::{AgentId, EdgeId, UnixMillis};
use rand::RngCore as _;
use rand::rngs::OsRng;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::fixture::Fixture;

crate::on_both_backends!(
    exported_cards_import_to_the_same_profile,
    a_card_registers_a_new_agent,
    bad_cards_get_problems_and_change_nothing,
    bad_card_requests_are_refused,
    admins_revoke_agents_idempotently,
    card_import_and_agent_revocation_are_documented,
);

const T0: UnixMillis = UnixMillis(1_700_000_000_000);

struct TestAgent {
    key: SigningKey,
    id: AgentId,
}

impl TestAgent {
    fn new() -> TestAgent {
        let key = SigningKey::generate(&mut OsRng);
        TestAgent { id: AgentId::from_inception_key(&key.public_key()), key }
    }

    fn card_uri(&self) -> String {
        format!("/v1/agents/{}/agent-card.json", self.id)
    }

    /// A card for this agent, as a client would write it.
    fn card(&self, name: &str) -> Value {
        json!({
            "name": name,
            "description": "reads the weather",
            "version": "1",
            "capabilities": {},
            "skills": [{"id": "weather.forecast", "name": "weather.forecast", "description": "", "tags": ["weather"], "version": "2.1"}],
            "defaultInputModes": ["application/json"],
            "defaultOutputModes": ["application/json"],
            "molt": {"id": self.id.to_string(), "public_key": hex::encode(self.key.public_key().as_bytes())}
        })
    }
}

struct Harness {
    app: Router,
    clock: Arc<ManualClock>,
    token: AdminToken,
}

impl Harness {
    async fn new(fixture: &Fixture) -> Harness {
        let token = fixture.db.bootstrap_admin_key(T0).await.unwrap().expect("a fresh database bootstraps");
        let clock = Arc::new(ManualClock::new(T0));
        let state = AppState::new(fixture.db.clone(), clock.clone(), Arc::new(Metrics::new()));
        Harness { app: api::router(state), clock, token }
    }

    async fn signed(&self, agent: &TestAgent, method: Method, uri: &str, body: &str) -> (StatusCode, Value) {
        self.signed_with_nonce(agent, method, uri, body, fresh_nonce()).await
    }

    async fn signed_with_nonce(
        &self,
        agent: &TestAgent,
        method: Method,
        uri: &str,
        body: &str,
        nonce: [u8; NONCE_BYTES],
    ) -> (StatusCode, Value) {
        let headers = agent_auth::sign_request(
            &agent.key,
            agent.id,
            method.as_str(),
            uri,
            self.clock.now(),
            nonce,
            body.as_bytes(),
        );
        let mut request = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        self.call(request.body(Body::from(body.to_owned())).unwrap()).await
    }

    async fn put_card(&self, agent: &TestAgent, card: &Value) -> (StatusCode, Value) {
        self.signed(agent, Method::PUT, &agent.card_uri(), &card.to_string()).await
    }

    async fn revoke(&self, id: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut request = Request::builder().method(Method::POST).uri(format!("/v1/agents/{id}/revoke"));
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        self.call(request.body(Body::empty()).unwrap()).await
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
}

fn fresh_nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    OsRng.fill_bytes(&mut nonce);
    nonce
}

#[track_caller]
fn assert_problem(response: &(StatusCode, Value), status: StatusCode, code: &str) {
    let (found, body) = response;
    assert_eq!((*found, body["code"].as_str()), (status, Some(code)), "{body}");
}

/// The profile part of an agent body: what an import must preserve.
fn profile(agent: &Value) -> Value {
    let fields = ["id", "public_key", "name", "description", "capabilities", "key_binding", "visibility", "home_edge"];
    fields.iter().map(|field| (field.to_string(), agent.get(*field).cloned().unwrap_or(Value::Null))).collect()
}

async fn exported_cards_import_to_the_same_profile(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let agent = TestAgent::new();
    let encryption = EncryptionSecret::generate(&mut OsRng).public_key();
    let binding = hex::encode(KeyBinding::sign(agent.id, encryption, T0, &agent.key).unwrap().encode());
    let home = EdgeId::from_inception_key(&SigningKey::generate(&mut OsRng).public_key());
    let registration = json!({
        "id": agent.id.to_string(),
        "public_key": hex::encode(agent.key.public_key().as_bytes()),
        "name": "Polyglot Translator",
        "description": "Translates between forty languages",
        "capabilities": [
            {"name": "translate.text", "version": "1.2.0", "tags": ["nlp", "text"]},
            {"name": "detect/language", "version": "", "tags": []},
        ],
        "key_binding": binding,
        "visibility": "unlisted",
        "home_edge": home.to_string(),
    });
    let (status, registered) = harness.signed(&agent, Method::POST, "/v1/agents", &registration.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{registered}");

    let (status, card) = harness.get(&agent.card_uri()).await;
    assert_eq!(status, StatusCode::OK, "{card}");
    assert_eq!(card["molt"]["visibility"], "unlisted");
    let (status, imported) = harness.put_card(&agent, &card).await;
    assert_eq!(status, StatusCode::OK, "{imported}");
    assert_eq!(profile(&imported), profile(&registered));
    assert_eq!(imported["revision"], 2, "an import is a profile update");
    let (_, card_again) = harness.get(&agent.card_uri()).await;
    assert_eq!(card_again["skills"], card["skills"]);
    assert_eq!(card_again["molt"], card["molt"]);

    // A change made through the card shows in the profile.
    let mut changed = card.clone();
    changed["name"] = json!("Polyglot");
    changed["skills"][0]["tags"] = json!(["nlp"]);
    changed["molt"]["visibility"] = json!("public");
    let (status, updated) = harness.put_card(&agent, &changed).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["name"], "Polyglot");
    assert_eq!(updated["visibility"], "public");
    assert_eq!(updated["capabilities"][0], json!({"name": "translate.text", "version": "1.2.0", "tags": ["nlp"]}));
}

async fn a_card_registers_a_new_agent(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let agent = TestAgent::new();
    let (status, registered) = harness.put_card(&agent, &agent.card("Weather Oracle")).await;
    assert_eq!(status, StatusCode::CREATED, "{registered}");
    assert_eq!(registered["id"], agent.id.to_string());
    assert_eq!(registered["visibility"], "public");
    assert_eq!(
        registered["capabilities"],
        json!([{"name": "weather.forecast", "version": "2.1", "tags": ["weather"]}])
    );

    let (status, page) = harness.get("/v1/agents?capability=weather.forecast").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"][0]["agent"]["id"], agent.id.to_string(), "{page}");

    // The exported card imports back unchanged, and a plain signed update still works.
    let (_, card) = harness.get(&agent.card_uri()).await;
    let (status, again) = harness.put_card(&agent, &card).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(profile(&again), profile(&registered));
}

async fn bad_cards_get_problems_and_change_nothing(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let agent = TestAgent::new();
    let (status, registered) = harness.put_card(&agent, &agent.card("Weather Oracle")).await;
    assert_eq!(status, StatusCode::CREATED, "{registered}");
    let uri = agent.card_uri();

    let malformed = harness.signed(&agent, Method::PUT, &uri, r#"{"name": "x","#).await;
    assert_problem(&malformed, StatusCode::BAD_REQUEST, "malformed_json");
    let not_an_object = harness.signed(&agent, Method::PUT, &uri, "[1, 2]").await;
    assert_problem(&not_an_object, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");

    let with = |pointer: &str, value: Value| {
        let mut card = agent.card("Weather Oracle");
        let (parent, member) = pointer.rsplit_once('/').unwrap();
        card.pointer_mut(parent).unwrap().as_object_mut().unwrap().insert(member.to_owned(), value);
        card
    };
    let cases = [
        (with("/colour", json!("blue")), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (with("/molt/extra", json!(1)), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (with("/skills/0/extra", json!(1)), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (with("/name", json!(7)), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (with("/url", json!("https://agent.example/a2a")), StatusCode::UNPROCESSABLE_ENTITY, "unmappable_card"),
        (with("/provider", json!({"organization": "Example"})), StatusCode::UNPROCESSABLE_ENTITY, "unmappable_card"),
        (with("/capabilities", json!({"streaming": true})), StatusCode::UNPROCESSABLE_ENTITY, "unmappable_card"),
        (with("/defaultOutputModes", json!(["text/plain"])), StatusCode::UNPROCESSABLE_ENTITY, "unmappable_card"),
        (with("/skills/0/description", json!("forecasts")), StatusCode::UNPROCESSABLE_ENTITY, "unmappable_card"),
        (with("/skills/0/name", json!("Forecast")), StatusCode::UNPROCESSABLE_ENTITY, "unmappable_card"),
        (with("/skills/0/examples", json!(["rain?"])), StatusCode::UNPROCESSABLE_ENTITY, "unmappable_card"),
        (with("/skills", json!([{"id": "Weather Forecast"}])), StatusCode::UNPROCESSABLE_ENTITY, "invalid_profile"),
        (with("/name", json!("")), StatusCode::UNPROCESSABLE_ENTITY, "invalid_profile"),
        (with("/molt/key_binding", json!("00ff")), StatusCode::UNPROCESSABLE_ENTITY, "invalid_key_binding"),
        (with("/molt/public_key", json!("zz")), StatusCode::UNPROCESSABLE_ENTITY, "invalid_public_key"),
        (with("/molt/id", json!("agent-nope")), StatusCode::UNPROCESSABLE_ENTITY, "invalid_agent_id"),
    ];
    for (card, status, code) in cases {
        let response = harness.put_card(&agent, &card).await;
        assert_problem(&response, status, code);
        if code == "unmappable_card" {
            let detail = response.1["detail"].as_str().unwrap();
            assert!(detail.contains("skills[0].") || !detail.contains("skills"), "names the member: {detail}");
        }
    }
    let mut no_molt = agent.card("Weather Oracle");
    no_molt.as_object_mut().unwrap().remove("molt");
    assert_problem(&harness.put_card(&agent, &no_molt).await, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body");

    // A card naming another agent, or another key for this one.
    let other = TestAgent::new();
    let foreign = other.card("Someone Else");
    assert_problem(&harness.put_card(&agent, &foreign).await, StatusCode::UNPROCESSABLE_ENTITY, "card_agent_mismatch");

    let oversize = json!({"name": "x".repeat(REQUEST_BODY_BYTES_MAX)}).to_string();
    let response = harness.signed(&agent, Method::PUT, &uri, &oversize).await;
    assert_problem(&response, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");

    let (_, unchanged) = harness.get(&format!("/v1/agents/{}", agent.id)).await;
    assert_eq!(unchanged["revision"], 1, "{unchanged}");
    assert_eq!(profile(&unchanged), profile(&registered));
    assert_eq!(fixture.count("agents").await, 1);
}

async fn bad_card_requests_are_refused(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let alice = TestAgent::new();
    let bob = TestAgent::new();
    assert_eq!(harness.put_card(&alice, &alice.card("Alice")).await.0, StatusCode::CREATED);
    assert_eq!(harness.put_card(&bob, &bob.card("Bob")).await.0, StatusCode::CREATED);
    let uri = alice.card_uri();
    let card = alice.card("Alice Renamed").to_string();

    // Unsigned.
    let unsigned = Request::builder()
        .method(Method::PUT)
        .uri(&uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(card.clone()))
        .unwrap();
    assert_problem(&harness.call(unsigned).await, StatusCode::UNAUTHORIZED, "missing_signature");

    // Replayed: the same nonce twice.
    let nonce = fresh_nonce();
    let first = harness.signed_with_nonce(&alice, Method::PUT, &uri, &card, nonce).await;
    assert_eq!(first.0, StatusCode::OK, "{}", first.1);
    let replay = harness.signed_with_nonce(&alice, Method::PUT, &uri, &card, nonce).await;
    assert_problem(&replay, StatusCode::UNAUTHORIZED, "replayed_request");

    // Bob signing Alice's card: refused whether he sends her card or his own.
    assert_problem(&harness.signed(&bob, Method::PUT, &uri, &card).await, StatusCode::FORBIDDEN, "not_your_agent");
    let bobs = bob.card("Bob").to_string();
    assert_problem(&harness.signed(&bob, Method::PUT, &uri, &bobs).await, StatusCode::FORBIDDEN, "not_your_agent");

    // An unregistered agent signing a card for a registered one.
    let mallory = TestAgent::new();
    let response = harness.signed(&mallory, Method::PUT, &uri, &card).await;
    assert_problem(&response, StatusCode::UNAUTHORIZED, "agent_mismatch");
    // A card for an unregistered agent signed with another key: the signature cannot verify.
    let carol = TestAgent::new();
    let impostor = TestAgent { key: SigningKey::generate(&mut OsRng), id: carol.id };
    let response = harness.signed(&impostor, Method::PUT, &carol.card_uri(), &carol.card("Carol").to_string()).await;
    assert_problem(&response, StatusCode::UNAUTHORIZED, "invalid_signature");

    let (_, alice_now) = harness.get(&format!("/v1/agents/{}", alice.id)).await;
    assert_eq!((alice_now["name"].as_str(), alice_now["revision"].as_u64()), (Some("Alice Renamed"), Some(2)));
    assert_eq!(fixture.count("agents").await, 2, "nothing registered by the refused requests");
}

async fn admins_revoke_agents_idempotently(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let token = harness.token.expose().to_owned();
    let agent = TestAgent::new();
    assert_eq!(harness.put_card(&agent, &agent.card("Doomed")).await.0, StatusCode::CREATED);
    let id = agent.id.to_string();

    assert_problem(&harness.revoke(&id, None).await, StatusCode::UNAUTHORIZED, "missing_credentials");
    let forged = "molt_admin_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    assert_problem(&harness.revoke(&id, Some(forged)).await, StatusCode::UNAUTHORIZED, "invalid_credentials");
    assert_problem(&harness.revoke("agent-nope", Some(&token)).await, StatusCode::BAD_REQUEST, "invalid_agent_id");
    let stranger = TestAgent::new().id.to_string();
    assert_problem(&harness.revoke(&stranger, Some(&token)).await, StatusCode::NOT_FOUND, "not_found");

    let (status, first) = harness.revoke(&id, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!((first["id"].as_str(), first["revoked_at_ms"].as_u64()), (Some(id.as_str()), Some(T0.0)));
    harness.clock.set(T0.saturating_add(std::time::Duration::from_secs(60)));
    let (status, second) = harness.revoke(&id, Some(&token)).await;
    assert_eq!((status, &second), (StatusCode::OK, &first), "a second revocation changes nothing");

    // The revoked agent is gone from reads and search, and its signed requests are refused.
    assert_problem(&harness.get(&format!("/v1/agents/{id}")).await, StatusCode::NOT_FOUND, "not_found");
    let (_, page) = harness.get("/v1/agents?capability=weather.forecast").await;
    assert_eq!(page["items"], json!([]), "{page}");
    let heartbeat = harness.signed(&agent, Method::POST, &format!("/v1/agents/{id}/heartbeat"), "").await;
    assert_problem(&heartbeat, StatusCode::UNAUTHORIZED, "revoked_agent");
    let card = agent.card("Back Again");
    assert_problem(&harness.put_card(&agent, &card).await, StatusCode::UNAUTHORIZED, "revoked_agent");
}

async fn card_import_and_agent_revocation_are_documented(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let (status, document) = harness.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let import = &document["paths"]["/v1/agents/{id}/agent-card.json"]["put"];
    assert!(import["requestBody"].is_object() && import["responses"]["201"].is_object(), "{import}");
    assert!(import["responses"]["422"].is_object(), "{import}");
    assert!(import.get("security").is_none(), "signed by the agent, not an admin: {import}");
    let revoke = &document["paths"]["/v1/agents/{id}/revoke"]["post"];
    assert!(revoke["security"][0]["admin_key"].is_array(), "{revoke}");
    assert!(revoke["responses"]["401"].is_object() && revoke["responses"]["404"].is_object(), "{revoke}");
}
