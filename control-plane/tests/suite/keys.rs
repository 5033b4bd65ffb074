//! Agent key rotation, guardians and social recovery over HTTP, on both backends: the new
//! key is certified for the same id, the old key and certificates last for the overlap
//! and are then revoked, guardians recover a lost key only after the time lock, the old
//! key cancels, races apply once, and every bad request gets its problem and changes
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use molt_control_plane::agent_auth::{self, NONCE_BYTES};
use molt_control_plane::api::{self, AppState};
use molt_control_plane::auth::AdminToken;
use molt_control_plane::ca::{Authority, CaOptions, KekSource, KeyEncryptionKey, LeafKind, RootSource, proof_message};
use molt_control_plane::clock::{Clock as _, ManualClock};
use molt_control_plane::ids::OrgId;
use molt_control_plane::keys::{self, GUARDIANS_MAX, RECOVERY_TIME_LOCK_DEFAULT};
use molt_control_plane::metrics::Metrics;
use molt_protocol::cert::{Certificate, ExpectedRole, Revocations, TrustAnchors, verify_chain};
use molt_protocol::keys::{EncryptionSecret, KeyBinding, SigningKey};
use molt_protocol::{AgentId, UnixMillis};
use rand::RngCore as _;
use rand::rngs::OsRng;
use serde_json::{Value, json};
use sqlx::Row as _;
use tower::ServiceExt as _;

use crate::fixture::Fixture;

crate::on_both_backends!(
    rotation_certifies_a_new_key_for_the_same_id_and_retires_the_old_one,
    bad_rotations_are_refused_and_change_nothing,
    concurrent_rotations_apply_once,
    guardians_recover_a_lost_key_after_the_time_lock,
    the_current_key_cancels_a_recovery,
    concurrent_approvals_reach_the_threshold_once,
    bad_guardian_sets_and_recovery_requests_are_refused,
    revoking_an_agent_revokes_its_certificates,
    key_changes_through_another_replica_reach_this_one,
);

const T0: UnixMillis = UnixMillis(1_700_000_000_000);
const HOUR: Duration = Duration::from_secs(3600);

/// An agent: its id and the key it signs with now.
struct TestAgent {
    id: AgentId,
    key: SigningKey,
}

impl TestAgent {
    fn new() -> TestAgent {
        let key = SigningKey::generate(&mut OsRng);
        TestAgent { id: AgentId::from_inception_key(&key.public_key()), key }
    }

    /// The same agent holding another key.
    fn with_key(&self, key: &SigningKey) -> TestAgent {
        TestAgent { id: self.id, key: key.clone() }
    }
}

struct Harness {
    app: Router,
    clock: Arc<ManualClock>,
    token: AdminToken,
    org: OrgId,
}

impl Harness {
    async fn new(fixture: &Fixture) -> Harness {
        let token = fixture.db.bootstrap_admin_key(T0).await.unwrap().expect("a fresh database bootstraps");
        let options = CaOptions {
            key_encryption_key: KekSource::Value(KeyEncryptionKey::generate()),
            root: RootSource::Generated,
            pkcs11: None,
        };
        let authority = Authority::load(&fixture.db, &options, "postgres://unused", T0).await.unwrap();
        let clock = Arc::new(ManualClock::new(T0));
        let state =
            AppState::new(fixture.db.clone(), clock.clone(), Arc::new(Metrics::new())).with_ca(Arc::new(authority));
        let mut harness = Harness { app: api::router(state), clock, token, org: OrgId::generate() };
        let (status, org) = harness.admin(Method::POST, "/v1/orgs", json!({"name": "acme"})).await;
        assert_eq!(status, StatusCode::CREATED, "{org}");
        harness.org = org["id"].as_str().unwrap().parse().unwrap();
        harness
    }

    fn now(&self) -> UnixMillis {
        self.clock.now()
    }

    /// Another replica on the same database and clock, keeping agents' keys for `ttl`.
    fn replica(&self, fixture: &Fixture, ttl: Duration) -> Router {
        let state = AppState::new(fixture.db.clone(), self.clock.clone(), Arc::new(Metrics::new()));
        api::router(state.with_signing_keys_ttl(ttl))
    }

    /// Sends the following requests to `app`; returns the replica served so far.
    fn switch_to(&mut self, app: Router) -> Router {
        std::mem::replace(&mut self.app, app)
    }

    fn advance(&self, by: Duration) {
        self.clock.set(self.now().saturating_add(by));
    }

    async fn call(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).map(|value| value.to_str().unwrap().to_owned());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        if status.is_client_error() || status.is_server_error() {
            assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{status}");
        }
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, body)
    }

    async fn admin(&self, method: Method, uri: &str, body: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token.expose()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        self.call(request).await
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(Request::builder().uri(uri).body(Body::empty()).unwrap()).await
    }

    async fn signed(&self, agent: &TestAgent, method: Method, uri: &str, body: Value) -> (StatusCode, Value) {
        self.signed_with_nonce(agent, method, uri, body, fresh_nonce()).await
    }

    async fn signed_with_nonce(
        &self,
        agent: &TestAgent,
        method: Method,
        uri: &str,
        body: Value,
        nonce: [u8; NONCE_BYTES],
    ) -> (StatusCode, Value) {
        let body = if body.is_null() { String::new() } else { body.to_string() };
        let headers =
            agent_auth::sign_request(&agent.key, agent.id, method.as_str(), uri, self.now(), nonce, body.as_bytes());
        let mut request = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        self.call(request.body(Body::from(body)).unwrap()).await
    }

    /// A registered agent with a certificate from the org.
    async fn certified_agent(&self, name: &str) -> TestAgent {
        let agent = self.registered_agent(name).await;
        let (status, issued) = self
            .admin(
                Method::POST,
                &format!("/v1/orgs/{}/agents/certificates", self.org),
                proof(&self.org, &agent.key, self.now()),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{issued}");
        agent
    }

    async fn registered_agent(&self, name: &str) -> TestAgent {
        let agent = TestAgent::new();
        let body =
            json!({"id": agent.id.to_string(), "public_key": hex(agent.key.public_key().as_bytes()), "name": name});
        let (status, registered) = self.signed(&agent, Method::POST, "/v1/agents", body).await;
        assert_eq!(status, StatusCode::CREATED, "{registered}");
        agent
    }

    fn rotation(&self, new_key: &SigningKey, overlap_seconds: Option<u64>) -> Value {
        let mut body = proof(&self.org, new_key, self.now());
        let body_map = body.as_object_mut().unwrap();
        let new_public_key = body_map.remove("public_key").unwrap();
        body_map.insert("new_public_key".into(), new_public_key);
        if let Some(overlap) = overlap_seconds {
            body_map.insert("overlap_seconds".into(), json!(overlap));
        }
        body
    }

    async fn rotate(
        &self,
        agent: &TestAgent,
        new_key: &SigningKey,
        overlap_seconds: Option<u64>,
    ) -> (StatusCode, Value) {
        let body = self.rotation(new_key, overlap_seconds);
        self.signed(agent, Method::POST, &format!("/v1/agents/{}/key-rotations", agent.id), body).await
    }

    async fn heartbeat(&self, agent: &TestAgent) -> (StatusCode, Value) {
        self.signed(agent, Method::POST, &format!("/v1/agents/{}/heartbeat", agent.id), Value::Null).await
    }

    async fn set_guardians(&self, agent: &TestAgent, threshold: u32, guardians: &[&TestAgent]) -> (StatusCode, Value) {
        let ids: Vec<String> = guardians.iter().map(|guardian| guardian.id.to_string()).collect();
        let body = json!({"threshold": threshold, "guardians": ids});
        self.signed(agent, Method::PUT, &format!("/v1/agents/{}/guardians", agent.id), body).await
    }

    async fn open_recovery(&self, guardian: &TestAgent, agent: AgentId, new_key: &SigningKey) -> (StatusCode, Value) {
        let body = json!({"new_public_key": hex(new_key.public_key().as_bytes())});
        self.signed(guardian, Method::POST, &format!("/v1/agents/{agent}/recoveries"), body).await
    }

    async fn approve(
        &self,
        guardian: &TestAgent,
        agent: AgentId,
        recovery: &str,
        new_key: &SigningKey,
    ) -> (StatusCode, Value) {
        let body = json!({"new_public_key": hex(new_key.public_key().as_bytes())});
        let uri = format!("/v1/agents/{agent}/recoveries/{recovery}/approve");
        self.signed(guardian, Method::POST, &uri, body).await
    }

    async fn trust_anchors(&self) -> TrustAnchors {
        let (status, bundle) = self.get("/v1/trust-bundle").await;
        assert_eq!(status, StatusCode::OK);
        let roots: Vec<&str> = bundle["roots"].as_array().unwrap().iter().map(|root| root.as_str().unwrap()).collect();
        TrustAnchors::from_pem(&roots.concat()).unwrap()
    }
}

fn fresh_nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    OsRng.fill_bytes(&mut nonce);
    nonce
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn new_key() -> SigningKey {
    SigningKey::generate(&mut OsRng)
}

/// The CA's agent proof of possession by `key` for `org`, signed at `at`.
fn proof(org: &OrgId, key: &SigningKey, at: UnixMillis) -> Value {
    let signature = key.sign(&proof_message(LeafKind::Agent, org, &key.public_key(), at));
    json!({"public_key": hex(key.public_key().as_bytes()), "timestamp_ms": at.0, "signature": hex(&signature.0)})
}

#[track_caller]
fn assert_problem(response: &(StatusCode, Value), status: StatusCode, code: &str) {
    let (found, body) = response;
    assert_eq!((*found, body["code"].as_str()), (status, Some(code)), "{body}");
}

/// The certificate of an issuance answer verifies for `agent` and holds `key`.
fn assert_certifies(anchors: &TrustAnchors, certificate: &Value, agent: AgentId, key: &SigningKey, now: UnixMillis) {
    let chain = Certificate::chain_from_pem(certificate["chain_pem"].as_str().unwrap()).unwrap();
    let ders: Vec<&[u8]> = chain.iter().map(Certificate::der).collect();
    let verified = verify_chain(&ders, anchors, &Revocations::default(), now, ExpectedRole::Agent(agent)).unwrap();
    assert_eq!(verified.public_key, key.public_key());
    assert_eq!(certificate["subject_id"], agent.to_string());
}

/// (serial, revoked_at_ms, revocation_reason, revoke_at_ms) of every certificate of `agent`.
async fn certificates(fixture: &Fixture, agent: AgentId) -> Vec<(String, Option<i64>, Option<String>, Option<i64>)> {
    sqlx::query(
        "SELECT serial, revoked_at_ms, revocation_reason, revoke_at_ms FROM certificates WHERE subject_id = $1 \
         ORDER BY created_at_ms, serial",
    )
    .bind(agent.to_string())
    .fetch_all(fixture.db.pool())
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
    .collect()
}

/// Serials of the agent's certificates that are valid and not scheduled for revocation.
async fn live_serials(fixture: &Fixture, agent: AgentId) -> Vec<String> {
    certificates(fixture, agent)
        .await
        .into_iter()
        .filter(|(_, revoked, _, scheduled)| revoked.is_none() && scheduled.is_none())
        .map(|(serial, ..)| serial)
        .collect()
}

async fn rotation_certifies_a_new_key_for_the_same_id_and_retires_the_old_one(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let alice = harness.certified_agent("alice").await;
    let [old_serial] = <[String; 1]>::try_from(live_serials(fixture, alice.id).await).unwrap();

    let second = new_key();
    let (status, rotation) = harness.rotate(&alice, &second, Some(3600)).await;
    assert_eq!(status, StatusCode::CREATED, "{rotation}");
    assert_eq!(rotation["epoch"], 1);
    assert_eq!(rotation["superseded_serials"], json!([old_serial]));
    assert_eq!(rotation["previous_key_until_ms"], harness.now().saturating_add(HOUR).0);
    let anchors = harness.trust_anchors().await;
    assert_certifies(&anchors, &rotation["certificate"], alice.id, &second, harness.now());

    // The registry serves the new key; the history records the change.
    let (_, profile) = harness.get(&format!("/v1/agents/{}", alice.id)).await;
    assert_eq!(profile["public_key"], hex(second.public_key().as_bytes()));
    let (status, history) = harness.get(&format!("/v1/agents/{}/keys", alice.id)).await;
    assert_eq!(status, StatusCode::OK, "{history}");
    assert_eq!(history["epoch"], 1);
    assert_eq!(history["org_id"], harness.org.as_str());
    assert_eq!(history["previous_public_key"], hex(alice.key.public_key().as_bytes()));
    assert_eq!(history["events"][0]["kind"], "rotation");
    assert_eq!(history["events"][0]["new_public_key"], hex(second.public_key().as_bytes()));

    // During the overlap both keys sign ordinary requests, but only the new one manages keys.
    let alice_new = alice.with_key(&second);
    assert_eq!(harness.heartbeat(&alice).await.0, StatusCode::OK);
    assert_eq!(harness.heartbeat(&alice_new).await.0, StatusCode::OK);
    assert_problem(&harness.rotate(&alice, &new_key(), None).await, StatusCode::UNAUTHORIZED, "current_key_required");
    let guardian = harness.registered_agent("guardian").await;
    assert_problem(
        &harness.set_guardians(&alice, 1, &[&guardian]).await,
        StatusCode::UNAUTHORIZED,
        "current_key_required",
    );
    assert_eq!(keys::revoke_due(&fixture.db, harness.now()).await.unwrap(), 0, "not due during the overlap");
    let before = certificates(fixture, alice.id).await;
    assert_eq!(before[0].1, None, "the old certificate stays valid during the overlap");

    // After it the old key is refused and the worker's pass revokes its certificate.
    harness.advance(HOUR + Duration::from_millis(1));
    assert_problem(&harness.heartbeat(&alice).await, StatusCode::UNAUTHORIZED, "invalid_signature");
    assert_eq!(harness.heartbeat(&alice_new).await.0, StatusCode::OK);
    assert_eq!(keys::revoke_due(&fixture.db, harness.now()).await.unwrap(), 1);
    assert_eq!(keys::revoke_due(&fixture.db, harness.now()).await.unwrap(), 0, "revoked once");
    let after = certificates(fixture, alice.id).await;
    let old = after.iter().find(|(serial, ..)| *serial == old_serial).unwrap();
    assert_eq!((old.1.is_some(), old.2.as_deref()), (true, Some("superseded")));
    let second_serial = rotation["certificate"]["serial"].as_str().unwrap().to_owned();
    let new = after.iter().find(|(serial, ..)| *serial == second_serial).unwrap();
    assert_eq!(new.1, None, "the new certificate is valid");
    let (_, crl) = harness.get("/v1/trust-bundle").await;
    assert!(crl["sequence"].as_u64().unwrap() > 0);

    // A rotation with no overlap revokes the replaced certificate at once.
    let third = new_key();
    let (status, rotation) = harness.rotate(&alice_new, &third, Some(0)).await;
    assert_eq!(status, StatusCode::CREATED, "{rotation}");
    assert_eq!(rotation["epoch"], 2);
    let certs = certificates(fixture, alice.id).await;
    let second = certs.iter().find(|(serial, ..)| *serial == second_serial).unwrap();
    assert!(second.1.is_some(), "the second certificate is revoked at once: {certs:?}");
    assert_problem(&harness.heartbeat(&alice_new).await, StatusCode::UNAUTHORIZED, "invalid_signature");
    assert_eq!(harness.heartbeat(&alice.with_key(&third)).await.0, StatusCode::OK);

    // A rotation can carry the X25519 binding signed by the new key.
    let fourth = new_key();
    let binding =
        KeyBinding::sign(alice.id, EncryptionSecret::generate(&mut OsRng).public_key(), harness.now(), &fourth)
            .unwrap();
    let mut body = harness.rotation(&fourth, Some(60));
    body["key_binding"] = json!(hex(&binding.encode()));
    let uri = format!("/v1/agents/{}/key-rotations", alice.id);
    let (status, rotation) = harness.signed(&alice.with_key(&third), Method::POST, &uri, body).await;
    assert_eq!(status, StatusCode::CREATED, "{rotation}");
    let (_, profile) = harness.get(&format!("/v1/agents/{}", alice.id)).await;
    assert_eq!(profile["key_binding"], hex(&binding.encode()));
}

async fn bad_rotations_are_refused_and_change_nothing(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let alice = harness.certified_agent("alice").await;
    let bob = harness.certified_agent("bob").await;
    let uri = format!("/v1/agents/{}/key-rotations", alice.id);
    let snapshot = || async {
        (
            fixture.count("certificates").await,
            fixture.count("agent_key_events").await,
            harness.get(&format!("/v1/agents/{}/keys", alice.id)).await.1,
        )
    };
    let before = snapshot().await;
    let fresh = new_key();

    assert_problem(&harness.rotate(&alice, &alice.key, None).await, StatusCode::UNPROCESSABLE_ENTITY, "same_key");
    assert_problem(&harness.rotate(&alice, &bob.key, None).await, StatusCode::CONFLICT, "key_in_use");
    // A key whose derived id is a registered agent's is refused too.
    let carol = harness.registered_agent("carol").await;
    assert_problem(&harness.rotate(&alice, &carol.key, None).await, StatusCode::CONFLICT, "key_in_use");
    let too_long = keys::ROTATION_OVERLAP_MAX.as_secs() + 1;
    let response = harness.rotate(&alice, &fresh, Some(too_long)).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "overlap_too_long");

    // The proof must be the new key's, for the agent's org, and fresh.
    let mut forged = harness.rotation(&fresh, None);
    forged["signature"] = harness.rotation(&new_key(), None)["signature"].clone();
    let response = harness.signed(&alice, Method::POST, &uri, forged).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_proof_of_possession");
    let mut other_org = proof(&OrgId::generate(), &fresh, harness.now());
    other_org["new_public_key"] = other_org.as_object_mut().unwrap().remove("public_key").unwrap();
    let response = harness.signed(&alice, Method::POST, &uri, other_org).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_proof_of_possession");
    let stale = harness.rotation(&fresh, None);
    harness.advance(Duration::from_secs(6 * 60));
    let response = harness.signed(&alice, Method::POST, &uri, stale).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_proof_of_possession");

    // A binding not signed by the new key, malformed fields, unknown fields.
    let old_binding =
        KeyBinding::sign(alice.id, EncryptionSecret::generate(&mut OsRng).public_key(), harness.now(), &alice.key)
            .unwrap();
    let mut body = harness.rotation(&fresh, None);
    body["key_binding"] = json!(hex(&old_binding.encode()));
    let response = harness.signed(&alice, Method::POST, &uri, body).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_key_binding");
    let mut body = harness.rotation(&fresh, None);
    body["key_binding"] = json!("zz");
    assert_problem(
        &harness.signed(&alice, Method::POST, &uri, body).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_key_binding",
    );
    let mut body = harness.rotation(&fresh, None);
    body["new_public_key"] = json!("00");
    assert_problem(
        &harness.signed(&alice, Method::POST, &uri, body).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_public_key",
    );
    let mut body = harness.rotation(&fresh, None);
    body["signature"] = json!("abc");
    let response = harness.signed(&alice, Method::POST, &uri, body).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_signature_encoding");
    let mut body = harness.rotation(&fresh, None);
    body["surprise"] = json!(1);
    assert_eq!(harness.signed(&alice, Method::POST, &uri, body).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(harness.signed(&alice, Method::POST, &uri, json!("[")).await.0, StatusCode::UNPROCESSABLE_ENTITY);

    // Another agent, a forged signer, a replay, an agent with no certificate.
    let response = harness.signed(&bob, Method::POST, &uri, harness.rotation(&fresh, None)).await;
    assert_problem(&response, StatusCode::FORBIDDEN, "not_your_agent");
    let impostor = alice.with_key(&new_key());
    let response = harness.signed(&impostor, Method::POST, &uri, harness.rotation(&fresh, None)).await;
    assert_problem(&response, StatusCode::UNAUTHORIZED, "invalid_signature");
    let nonce = fresh_nonce();
    let body = harness.rotation(&fresh, Some(0));
    let first = harness.signed_with_nonce(&alice, Method::POST, &uri, json!({"bad": 1}), nonce).await;
    assert_eq!(first.0, StatusCode::UNPROCESSABLE_ENTITY);
    let replay = harness.signed_with_nonce(&alice, Method::POST, &uri, body, nonce).await;
    assert_problem(&replay, StatusCode::UNAUTHORIZED, "replayed_request");
    let uncertified = harness.registered_agent("dave").await;
    let response = harness.rotate(&uncertified, &fresh, None).await;
    assert_problem(&response, StatusCode::CONFLICT, "no_certificate");

    assert_eq!(snapshot().await, before, "refusals change nothing");
}

async fn concurrent_rotations_apply_once(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let alice = harness.certified_agent("alice").await;
    let (first, second) = (new_key(), new_key());
    let (a, b) = tokio::join!(harness.rotate(&alice, &first, None), harness.rotate(&alice, &second, None));
    let wins = [&a, &b].iter().filter(|(status, _)| *status == StatusCode::CREATED).count();
    assert_eq!(wins, 1, "{a:?} {b:?}");
    let loser = if a.0 == StatusCode::CREATED { &b } else { &a };
    // The loser either lost the conditional update or arrived after the key changed.
    let code = loser.1["code"].as_str().unwrap();
    assert!(["key_change_conflict", "current_key_required"].contains(&code), "{loser:?}");
    let (_, history) = harness.get(&format!("/v1/agents/{}/keys", alice.id)).await;
    assert_eq!(history["epoch"], 1);
    // Exactly one certificate is live: the winner's. A loser's fresh certificate is revoked.
    let live = live_serials(fixture, alice.id).await;
    let winner = if a.0 == StatusCode::CREATED { &a } else { &b };
    assert_eq!(live, vec![winner.1["certificate"]["serial"].as_str().unwrap().to_owned()]);
}

async fn guardians_recover_a_lost_key_after_the_time_lock(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let alice = harness.certified_agent("alice").await;
    let guardians = [
        harness.registered_agent("g1").await,
        harness.registered_agent("g2").await,
        harness.registered_agent("g3").await,
    ];
    let outsider = harness.registered_agent("mallory").await;
    let (status, set) = harness.set_guardians(&alice, 2, &[&guardians[0], &guardians[1], &guardians[2]]).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    let (_, shown) = harness.get(&format!("/v1/agents/{}/guardians", alice.id)).await;
    assert_eq!((shown["threshold"].as_u64(), shown["guardians"].as_array().unwrap().len()), (Some(2), 3));

    // Alice loses her key; a guardian opens a recovery to the key she holds now.
    let recovered = new_key();
    let response = harness.open_recovery(&outsider, alice.id, &recovered).await;
    assert_problem(&response, StatusCode::FORBIDDEN, "not_a_guardian");
    let (status, opened) = harness.open_recovery(&guardians[0], alice.id, &recovered).await;
    assert_eq!(status, StatusCode::CREATED, "{opened}");
    assert_eq!(opened["state"], "collecting");
    let id = opened["id"].as_str().unwrap().to_owned();
    let response = harness.open_recovery(&guardians[1], alice.id, &new_key()).await;
    assert_problem(&response, StatusCode::CONFLICT, "recovery_in_progress");
    let response = harness.approve(&guardians[1], alice.id, &id, &new_key()).await;
    assert_problem(&response, StatusCode::CONFLICT, "recovery_key_mismatch");
    let response = harness.approve(&outsider, alice.id, &id, &recovered).await;
    assert_problem(&response, StatusCode::FORBIDDEN, "not_a_guardian");

    let complete_uri = format!("/v1/agents/{}/recoveries/{id}/complete", alice.id);
    let holder = alice.with_key(&recovered);
    let response = harness.signed(&holder, Method::POST, &complete_uri, Value::Null).await;
    assert_problem(&response, StatusCode::CONFLICT, "recovery_not_approved");

    let (status, approved) = harness.approve(&guardians[1], alice.id, &id, &recovered).await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    assert_eq!(approved["state"], "time_locked");
    let unlocks_at = harness.now().saturating_add(RECOVERY_TIME_LOCK_DEFAULT);
    assert_eq!(approved["unlocks_at_ms"], unlocks_at.0, "the default time lock is 7 days");
    let (status, again) = harness.approve(&guardians[1], alice.id, &id, &recovered).await;
    assert_eq!((status, again["approvals"].as_array().unwrap().len()), (StatusCode::OK, 2), "idempotent");

    // Not before the time lock ends, and only with the recovery's key.
    harness.advance(RECOVERY_TIME_LOCK_DEFAULT - HOUR);
    let response = harness.signed(&holder, Method::POST, &complete_uri, Value::Null).await;
    assert_problem(&response, StatusCode::CONFLICT, "recovery_time_locked");
    assert_eq!(harness.heartbeat(&alice).await.0, StatusCode::OK, "the old key still works meanwhile");
    harness.advance(HOUR);
    let wrong = alice.with_key(&new_key());
    let response = harness.signed(&wrong, Method::POST, &complete_uri, Value::Null).await;
    assert_problem(&response, StatusCode::UNAUTHORIZED, "invalid_signature");
    let as_other = TestAgent { id: outsider.id, key: recovered.clone() };
    let response = harness.signed(&as_other, Method::POST, &complete_uri, Value::Null).await;
    assert_problem(&response, StatusCode::FORBIDDEN, "not_your_agent");

    let (status, completed) = harness.signed(&holder, Method::POST, &complete_uri, Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{completed}");
    assert_eq!(completed["recovery"]["state"], "completed");
    let anchors = harness.trust_anchors().await;
    assert_certifies(&anchors, &completed["certificate"], alice.id, &recovered, harness.now());

    // The lost key is finished: its certificates revoked as compromised, its signatures refused.
    let certs = certificates(fixture, alice.id).await;
    assert_eq!(certs.len(), 2);
    let new_serial = completed["certificate"]["serial"].as_str().unwrap();
    for (serial, revoked, reason, _) in &certs {
        if serial == new_serial {
            assert_eq!(*revoked, None, "the recovered key's certificate is valid");
        } else {
            assert_eq!((revoked.is_some(), reason.as_deref()), (true, Some("key_compromise")));
        }
    }
    assert_problem(&harness.heartbeat(&alice).await, StatusCode::UNAUTHORIZED, "invalid_signature");
    assert_eq!(harness.heartbeat(&holder).await.0, StatusCode::OK);
    let (_, history) = harness.get(&format!("/v1/agents/{}/keys", alice.id)).await;
    assert_eq!((history["epoch"].as_u64(), history["events"][0]["kind"].as_str()), (Some(1), Some("recovery")));
    assert!(history.get("previous_public_key").is_none(), "a recovered key has no overlap");
    let response = harness.signed(&holder, Method::POST, &complete_uri, Value::Null).await;
    assert_problem(&response, StatusCode::CONFLICT, "recovery_closed");
}

async fn the_current_key_cancels_a_recovery(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let alice = harness.certified_agent("alice").await;
    let guardian = harness.registered_agent("g1").await;
    assert_eq!(harness.set_guardians(&alice, 1, &[&guardian]).await.0, StatusCode::OK);
    let stolen = new_key();
    let (status, opened) = harness.open_recovery(&guardian, alice.id, &stolen).await;
    assert_eq!(status, StatusCode::CREATED, "{opened}");
    assert_eq!(opened["state"], "time_locked", "a threshold of one locks at once");
    let id = opened["id"].as_str().unwrap().to_owned();

    let cancel_uri = format!("/v1/agents/{}/recoveries/{id}/cancel", alice.id);
    let response = harness.signed(&guardian, Method::POST, &cancel_uri, Value::Null).await;
    assert_problem(&response, StatusCode::FORBIDDEN, "not_your_agent");
    let (status, cancelled) = harness.signed(&alice, Method::POST, &cancel_uri, Value::Null).await;
    assert_eq!((status, cancelled["state"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
    let response = harness.signed(&alice, Method::POST, &cancel_uri, Value::Null).await;
    assert_problem(&response, StatusCode::CONFLICT, "recovery_closed");

    harness.advance(RECOVERY_TIME_LOCK_DEFAULT + HOUR);
    let complete_uri = format!("/v1/agents/{}/recoveries/{id}/complete", alice.id);
    let response = harness.signed(&alice.with_key(&stolen), Method::POST, &complete_uri, Value::Null).await;
    assert_problem(&response, StatusCode::CONFLICT, "recovery_closed");
    assert_problem(&harness.approve(&guardian, alice.id, &id, &stolen).await, StatusCode::CONFLICT, "recovery_closed");
    assert_eq!(harness.heartbeat(&alice).await.0, StatusCode::OK, "alice keeps her key");
    assert_eq!(live_serials(fixture, alice.id).await.len(), 1);
    // Another recovery may open once the first is closed.
    assert_eq!(harness.open_recovery(&guardian, alice.id, &new_key()).await.0, StatusCode::CREATED);
    let response = harness.get(&format!("/v1/agents/{}/recoveries/rec_nope", alice.id)).await;
    assert_problem(&response, StatusCode::NOT_FOUND, "recovery_not_found");
}

async fn concurrent_approvals_reach_the_threshold_once(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let alice = harness.certified_agent("alice").await;
    let mut guardians = Vec::new();
    for index in 0..6 {
        guardians.push(harness.registered_agent(&format!("g{index}")).await);
    }
    let refs: Vec<&TestAgent> = guardians.iter().collect();
    assert_eq!(harness.set_guardians(&alice, 3, &refs).await.0, StatusCode::OK);
    let recovered = new_key();
    let (_, opened) = harness.open_recovery(&guardians[0], alice.id, &recovered).await;
    let id = opened["id"].as_str().unwrap().to_owned();
    let approve = |index: usize| harness.approve(&guardians[index], alice.id, &id, &recovered);
    let results = tokio::join!(approve(1), approve(2), approve(3), approve(4), approve(5));
    for (status, body) in [results.0, results.1, results.2, results.3, results.4] {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, recovery) = harness.get(&format!("/v1/agents/{}/recoveries/{id}", alice.id)).await;
    assert_eq!(recovery["state"], "time_locked");
    assert_eq!(recovery["approvals"].as_array().unwrap().len(), 3, "approvals stop at the threshold: {recovery}");
    let counter: i64 = sqlx::query_scalar("SELECT approvals FROM agent_recoveries WHERE id = $1")
        .bind(id.clone())
        .fetch_one(fixture.db.pool())
        .await
        .unwrap();
    assert_eq!(counter, 3);
}

async fn bad_guardian_sets_and_recovery_requests_are_refused(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let alice = harness.certified_agent("alice").await;
    let g1 = harness.registered_agent("g1").await;
    let g2 = harness.registered_agent("g2").await;
    let uri = format!("/v1/agents/{}/guardians", alice.id);
    let invalid = |body: Value| {
        let harness = &harness;
        let alice = &alice;
        let uri = uri.clone();
        async move { harness.signed(alice, Method::PUT, &uri, body).await }
    };
    let unknown = AgentId::from_inception_key(&new_key().public_key()).to_string();
    let too_many: Vec<String> =
        (0..=GUARDIANS_MAX).map(|_| AgentId::from_inception_key(&new_key().public_key()).to_string()).collect();
    for (body, code) in [
        (json!({"threshold": 1, "guardians": []}), "invalid_guardians"),
        (json!({"threshold": 1, "guardians": too_many}), "invalid_guardians"),
        (json!({"threshold": 0, "guardians": [g1.id.to_string()]}), "invalid_guardians"),
        (json!({"threshold": 2, "guardians": [g1.id.to_string()]}), "invalid_guardians"),
        (json!({"threshold": 1, "guardians": [alice.id.to_string()]}), "invalid_guardians"),
        (json!({"threshold": 1, "guardians": [g1.id.to_string(), g1.id.to_string()]}), "invalid_guardians"),
        (json!({"threshold": 1, "guardians": ["agent-nope"]}), "invalid_guardians"),
        (json!({"threshold": 1, "guardians": [unknown]}), "unknown_guardian"),
    ] {
        assert_problem(&invalid(body).await, StatusCode::UNPROCESSABLE_ENTITY, code);
    }
    assert_eq!(invalid(json!({"threshold": -1, "guardians": []})).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(invalid(json!({"threshold": 1})).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(fixture.count("agent_guardians").await, 0, "nothing stored");
    let response =
        harness.signed(&g1, Method::PUT, &uri, json!({"threshold": 1, "guardians": [g2.id.to_string()]})).await;
    assert_problem(&response, StatusCode::FORBIDDEN, "not_your_agent");

    // No guardians yet: nobody can open a recovery.
    assert_problem(&harness.get(&uri).await, StatusCode::NOT_FOUND, "no_guardians");
    let response = harness.open_recovery(&g1, alice.id, &new_key()).await;
    assert_problem(&response, StatusCode::NOT_FOUND, "no_guardians");

    assert_eq!(harness.set_guardians(&alice, 1, &[&g1, &g2]).await.0, StatusCode::OK);
    let response = harness.open_recovery(&g1, alice.id, &alice.key).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "same_key");
    let response = harness.open_recovery(&g1, alice.id, &g2.key).await;
    assert_problem(&response, StatusCode::CONFLICT, "key_in_use");
    let body = json!({"new_public_key": "xyz"});
    let response = harness.signed(&g1, Method::POST, &format!("/v1/agents/{}/recoveries", alice.id), body).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_public_key");
    let stranger = AgentId::from_inception_key(&new_key().public_key());
    let response = harness.open_recovery(&g1, stranger, &new_key()).await;
    assert_problem(&response, StatusCode::NOT_FOUND, "agent_not_found");
    assert_eq!(fixture.count("agent_recoveries").await, 0, "nothing opened");

    // Removing guardians leaves none; removing again is a 404.
    let (status, _) = harness.signed(&alice, Method::DELETE, &uri, Value::Null).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_problem(
        &harness.signed(&alice, Method::DELETE, &uri, Value::Null).await,
        StatusCode::NOT_FOUND,
        "no_guardians",
    );
}

async fn revoking_an_agent_revokes_its_certificates(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let alice = harness.certified_agent("alice").await;
    let bob = harness.certified_agent("bob").await;
    let (status, _) = harness.rotate(&alice, &new_key(), Some(3600)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(live_serials(fixture, alice.id).await.len(), 1);
    let uri = format!("/v1/agents/{}/revoke", alice.id);
    for _ in 0..2 {
        let (status, body) = harness.admin(Method::POST, &uri, Value::Null).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let certs = certificates(fixture, alice.id).await;
    assert_eq!(certs.len(), 2);
    for (serial, revoked, reason, _) in &certs {
        assert!(revoked.is_some(), "{serial} is revoked with the agent");
        assert_eq!(reason.as_deref(), Some("cessation_of_operation"), "the overlap's schedule is overridden");
    }
    assert_eq!(live_serials(fixture, bob.id).await.len(), 1, "other agents keep theirs");
}

/// A replica keeps the keys it read for an agent for `SIGNING_KEYS_CACHE_TTL`: a rotation
/// or revocation made through another replica takes effect there within that time, and a
/// new key signs there at once.
async fn key_changes_through_another_replica_reach_this_one(fixture: &Fixture) {
    const TTL: Duration = Duration::from_millis(300);
    let mut harness = Harness::new(fixture).await;
    let alice = harness.certified_agent("alice").await;
    let b = harness.replica(fixture, TTL);
    let a = harness.switch_to(b);
    // B keeps alice's first key.
    assert_eq!(harness.heartbeat(&alice).await.0, StatusCode::OK);

    // A rotation without overlap through A: the new key signs at B at once, and the
    // old key is refused at A at once and at B once B's entry is older than the TTL.
    let b = harness.switch_to(a);
    let second = new_key();
    let (status, rotation) = harness.rotate(&alice, &second, Some(0)).await;
    assert_eq!(status, StatusCode::CREATED, "{rotation}");
    assert_problem(&harness.heartbeat(&alice).await, StatusCode::UNAUTHORIZED, "invalid_signature");
    let a = harness.switch_to(b);
    tokio::time::sleep(TTL).await;
    assert_problem(&harness.heartbeat(&alice).await, StatusCode::UNAUTHORIZED, "invalid_signature");
    let alice_second = alice.with_key(&second);
    assert_eq!(harness.heartbeat(&alice_second).await.0, StatusCode::OK);

    // B keeps the second key; after another rotation through A the third signs at B at once.
    let b = harness.switch_to(a);
    let third = new_key();
    let (status, rotation) = harness.rotate(&alice_second, &third, Some(0)).await;
    assert_eq!(status, StatusCode::CREATED, "{rotation}");
    let a = harness.switch_to(b);
    let alice_third = alice.with_key(&third);
    assert_eq!(harness.heartbeat(&alice_third).await.0, StatusCode::OK, "the new key at once");

    // A revocation through A: refused there at once, and at B within the TTL.
    let b = harness.switch_to(a);
    let (status, body) = harness.admin(Method::POST, &format!("/v1/agents/{}/revoke", alice.id), Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_problem(&harness.heartbeat(&alice_third).await, StatusCode::UNAUTHORIZED, "revoked_agent");
    drop(harness.switch_to(b));
    tokio::time::sleep(TTL).await;
    assert_problem(&harness.heartbeat(&alice_third).await, StatusCode::UNAUTHORIZED, "revoked_agent");
}
