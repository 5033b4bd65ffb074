//! The certificate authority over HTTP, on both backends: org CAs, agent and edge
//! issuance with proof of possession, revocation, CRLs and the trust bundle; bad input
//! gets a problem and writes nothing.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use molt_control_plane::api::{self, AppState};
use molt_control_plane::auth::AdminToken;
use molt_control_plane::ca::{
    Authority, CaOptions, KekSource, KeyEncryptionKey, LeafKind, LoadAuthorityError, RootSource, proof_message,
};
use molt_control_plane::clock::ManualClock;
use molt_control_plane::ids::OrgId;
use molt_control_plane::metrics::Metrics;
use molt_protocol::cert::{
    Certificate, ChainError, ExpectedRole, RevocationList, Revocations, Role, TrustAnchors, verify_chain,
};
use molt_protocol::ids::{AgentId, EdgeId};
use molt_protocol::keys::SigningKey;
use molt_protocol::time::UnixMillis;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::fixture::Fixture;

crate::on_both_backends!(
    agent_and_edge_certificates_verify_against_the_trust_bundle,
    revoked_certificates_are_refused_with_the_fetched_crl,
    bad_certificate_requests_get_problems_and_write_nothing,
    org_ca_keys_are_sealed_under_the_kek_and_bound_to_their_org,
    the_development_root_is_created_once_and_needs_its_kek,
);

const T0: UnixMillis = UnixMillis(1_700_000_000_000);

struct Harness {
    app: Router,
    token: AdminToken,
    clock: Arc<ManualClock>,
}

impl Harness {
    async fn new(fixture: &Fixture, kek: &KeyEncryptionKey) -> Harness {
        let token = fixture.db.bootstrap_admin_key(T0).await.unwrap().expect("a fresh database bootstraps");
        let authority = load_authority(fixture, kek).await.expect("load the authority");
        let clock = Arc::new(ManualClock::new(T0));
        let state =
            AppState::new(fixture.db.clone(), clock.clone(), Arc::new(Metrics::new())).with_ca(Arc::new(authority));
        Harness { app: api::router(state), token, clock }
    }

    async fn send(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let (status, _, body) = self.send_raw(method, uri, token, body).await;
        let body =
            serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
        (status, body)
    }

    async fn send_raw(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(body.map_or_else(Body::empty, |body| Body::from(body.to_string()))).unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        if status.is_client_error() || status.is_server_error() {
            assert_eq!(headers.get(header::CONTENT_TYPE).unwrap(), "application/problem+json", "{status}");
        }
        (status, headers, response.into_body().collect().await.unwrap().to_bytes().to_vec())
    }

    fn admin(&self) -> Option<&str> {
        Some(self.token.expose())
    }

    async fn create_org(&self, name: &str) -> OrgId {
        let (status, body) = self.send(Method::POST, "/v1/orgs", self.admin(), Some(json!({ "name": name }))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().parse().unwrap()
    }

    /// A request body with a valid proof of possession by `key`, signed at `at`.
    fn request(&self, kind: LeafKind, org: &OrgId, key: &SigningKey, at: UnixMillis) -> Value {
        let signature = key.sign(&proof_message(kind, org, &key.public_key(), at));
        json!({
            "public_key": hex(key.public_key().as_bytes()),
            "timestamp_ms": at.0,
            "signature": hex(&signature.0),
        })
    }

    async fn issue_agent(&self, org: &OrgId, key: &SigningKey) -> Value {
        let body = self.request(LeafKind::Agent, org, key, self.clock_now());
        let (status, issued) =
            self.send(Method::POST, &format!("/v1/orgs/{org}/agents/certificates"), self.admin(), Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{issued}");
        issued
    }

    fn clock_now(&self) -> UnixMillis {
        use molt_control_plane::clock::Clock as _;
        self.clock.now()
    }

    async fn trust_bundle(&self) -> Value {
        let (status, bundle) = self.send(Method::GET, "/v1/trust-bundle", None, None).await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        bundle
    }
}

async fn load_authority(fixture: &Fixture, kek: &KeyEncryptionKey) -> Result<Authority, LoadAuthorityError> {
    let options =
        CaOptions { key_encryption_key: KekSource::Value(kek.clone()), root: RootSource::Generated, pkcs11: None };
    Authority::load(&fixture.db, &options, "postgres://unused", T0).await
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

#[track_caller]
fn assert_problem(response: &(StatusCode, Value), status: StatusCode, code: &str) {
    let (found, body) = response;
    assert_eq!((*found, body["code"].as_str()), (status, Some(code)), "{body}");
    assert_eq!(body["type"], format!("urn:molt:problem:{code}"));
}

fn chain_ders(chain_pem: &str) -> Vec<Vec<u8>> {
    Certificate::chain_from_pem(chain_pem).unwrap().iter().map(|certificate| certificate.der().to_vec()).collect()
}

fn anchors(bundle: &Value) -> TrustAnchors {
    let roots: Vec<&str> = bundle["roots"].as_array().unwrap().iter().map(|root| root.as_str().unwrap()).collect();
    TrustAnchors::from_pem(&roots.concat()).unwrap()
}

async fn sequence(fixture: &Fixture) -> i64 {
    use sqlx::Row as _;
    sqlx::query("SELECT bundle_sequence FROM ca_state").fetch_one(fixture.db.pool()).await.unwrap().get(0)
}

async fn agent_and_edge_certificates_verify_against_the_trust_bundle(fixture: &Fixture) {
    let harness = Harness::new(fixture, &KeyEncryptionKey::generate()).await;
    let org = harness.create_org("acme").await;
    let (status, created) = harness.send(Method::POST, &format!("/v1/orgs/{org}/ca"), harness.admin(), None).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["crl_number"], 1);
    let again = harness.send(Method::POST, &format!("/v1/orgs/{org}/ca"), harness.admin(), None).await;
    assert_eq!((again.0, &again.1["serial"]), (StatusCode::OK, &created["serial"]), "creating twice returns the CA");

    let agent_key = key();
    let issued = harness.issue_agent(&org, &agent_key).await;
    let agent_id = AgentId::from_inception_key(&agent_key.public_key());
    assert_eq!((issued["kind"].as_str(), issued["subject_id"].as_str()), (Some("agent"), Some(&*agent_id.to_string())));
    let bundle = harness.trust_bundle().await;
    assert_eq!(bundle["org_cas"].as_array().unwrap().len(), 1);
    assert_eq!(bundle["org_cas"][0], created["certificate_pem"]);
    let chain = chain_ders(issued["chain_pem"].as_str().unwrap());
    let chain: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    let verified =
        verify_chain(&chain, &anchors(&bundle), &Revocations::default(), T0, ExpectedRole::Agent(agent_id)).unwrap();
    assert_eq!(verified.public_key, agent_key.public_key());
    assert_eq!(verified.serial.to_string(), issued["serial"].as_str().unwrap());

    let edge_key = key();
    let mut body = harness.request(LeafKind::Edge, &org, &edge_key, T0);
    body["dns_names"] = json!(["edge-1.acme.example", "acme.example"]);
    let (status, edge) =
        harness.send(Method::POST, &format!("/v1/orgs/{org}/edges/certificates"), harness.admin(), Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{edge}");
    let leaf = Certificate::from_pem(edge["certificate_pem"].as_str().unwrap()).unwrap();
    let edge_id = EdgeId::from_inception_key(&edge_key.public_key());
    assert_eq!(leaf.role(), Role::Edge(edge_id));
    assert_eq!(leaf.dns_names(), ["edge-1.acme.example", "acme.example"]);
    let chain = chain_ders(edge["chain_pem"].as_str().unwrap());
    let chain: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    verify_chain(&chain, &anchors(&bundle), &Revocations::default(), T0, ExpectedRole::Edge(edge_id)).unwrap();
    // An agent proof does not buy an edge certificate.
    let mut body = harness.request(LeafKind::Agent, &org, &edge_key, T0);
    body["dns_names"] = json!(["acme.example"]);
    let response =
        harness.send(Method::POST, &format!("/v1/orgs/{org}/edges/certificates"), harness.admin(), Some(body)).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_proof_of_possession");
    assert_eq!(fixture.count("certificates").await, 2);
    assert_eq!(fixture.count("org_cas").await, 1);
}

async fn revoked_certificates_are_refused_with_the_fetched_crl(fixture: &Fixture) {
    let harness = Harness::new(fixture, &KeyEncryptionKey::generate()).await;
    let org = harness.create_org("acme").await;
    let agent_key = key();
    let issued = harness.issue_agent(&org, &agent_key).await;
    let other = harness.issue_agent(&org, &key()).await;
    let sequence_before = sequence(fixture).await;
    let bundle = harness.trust_bundle().await;
    assert_eq!(bundle["sequence"], sequence_before);
    let org_ca = Certificate::from_pem(bundle["org_cas"][0].as_str().unwrap()).unwrap();

    let crl_path = format!("/v1/orgs/{org}/crl");
    let (status, headers, pem) = harness.send_raw(Method::GET, &crl_path, None, None).await;
    assert_eq!((status, headers.get("x-molt-crl-number").unwrap().to_str().unwrap()), (StatusCode::OK, "1"));
    let crl = RevocationList::from_pem_verified(std::str::from_utf8(&pem).unwrap(), &org_ca).unwrap();
    assert!(crl.revoked().is_empty());

    let serial = issued["serial"].as_str().unwrap();
    let revoke_path = format!("/v1/certificates/{serial}/revoke");
    let (status, revoked) =
        harness.send(Method::POST, &revoke_path, harness.admin(), Some(json!({"reason": "key_compromise"}))).await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!((revoked["reason"].as_str(), revoked["revoked_at_ms"].as_u64()), (Some("key_compromise"), Some(T0.0)));
    // Again, later and with another reason: the first revocation stands, nothing changes.
    harness.clock.set(T0.saturating_add(std::time::Duration::from_secs(60)));
    let again = harness.send(Method::POST, &revoke_path, harness.admin(), Some(json!({}))).await;
    assert_eq!(again, (StatusCode::OK, revoked.clone()));
    assert_eq!(sequence(fixture).await, sequence_before + 1);

    let (status, headers, pem) = harness.send_raw(Method::GET, &crl_path, None, None).await;
    assert_eq!((status, headers.get("x-molt-crl-number").unwrap().to_str().unwrap()), (StatusCode::OK, "2"));
    let crl = RevocationList::from_pem_verified(std::str::from_utf8(&pem).unwrap(), &org_ca).unwrap();
    assert_eq!(crl.crl_number(), 2);
    assert_eq!(crl.revoked().iter().map(ToString::to_string).collect::<Vec<_>>(), [serial]);

    let bundle = harness.trust_bundle().await;
    assert_eq!(bundle["sequence"], sequence_before + 1);
    let mut revocations = Revocations::default();
    for crl in bundle["crls"].as_array().unwrap() {
        revocations.extend_from(&RevocationList::from_pem_verified(crl.as_str().unwrap(), &org_ca).unwrap());
    }
    let now = harness.clock_now();
    let chain = chain_ders(issued["chain_pem"].as_str().unwrap());
    let chain: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    let refused = verify_chain(&chain, &anchors(&bundle), &revocations, now, ExpectedRole::AnyAgent);
    assert!(matches!(refused, Err(ChainError::Revoked(found)) if found.to_string() == serial), "{refused:?}");
    let chain = chain_ders(other["chain_pem"].as_str().unwrap());
    let chain: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    verify_chain(&chain, &anchors(&bundle), &revocations, now, ExpectedRole::AnyAgent).expect("the other stays valid");
}

async fn bad_certificate_requests_get_problems_and_write_nothing(fixture: &Fixture) {
    let harness = Harness::new(fixture, &KeyEncryptionKey::generate()).await;
    let org = harness.create_org("acme").await;
    let path = format!("/v1/orgs/{org}/agents/certificates");
    let agent_key = key();
    let good = harness.request(LeafKind::Agent, &org, &agent_key, T0);
    let sequence_before = sequence(fixture).await;

    // Unknown org: well-formed and malformed ids.
    let unknown = OrgId::generate();
    let body = harness.request(LeafKind::Agent, &unknown, &agent_key, T0);
    let response = harness
        .send(Method::POST, &format!("/v1/orgs/{unknown}/agents/certificates"), harness.admin(), Some(body))
        .await;
    assert_problem(&response, StatusCode::NOT_FOUND, "org_not_found");
    let response =
        harness.send(Method::POST, "/v1/orgs/nope/agents/certificates", harness.admin(), Some(good.clone())).await;
    assert_problem(&response, StatusCode::NOT_FOUND, "org_not_found");
    let response = harness.send(Method::POST, &format!("/v1/orgs/{unknown}/ca"), harness.admin(), None).await;
    assert_problem(&response, StatusCode::NOT_FOUND, "org_not_found");
    assert_problem(
        &harness.send(Method::GET, &format!("/v1/orgs/{unknown}/crl"), None, None).await,
        StatusCode::NOT_FOUND,
        "org_not_found",
    );
    assert_problem(
        &harness.send(Method::GET, &format!("/v1/orgs/{org}/crl"), None, None).await,
        StatusCode::NOT_FOUND,
        "org_ca_not_found",
    );

    // Malformed keys and signatures.
    for bad_key in ["zz", "", &"ab".repeat(31), &"ab".repeat(33), "not hex at all"] {
        let mut body = good.clone();
        body["public_key"] = json!(bad_key);
        let response = harness.send(Method::POST, &path, harness.admin(), Some(body)).await;
        assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_public_key");
    }
    let mut body = good.clone();
    body["signature"] = json!("00ff");
    let response = harness.send(Method::POST, &path, harness.admin(), Some(body)).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_signature");

    // A proof by another key, for another org, or over another timestamp.
    let mut body = good.clone();
    body["signature"] = harness.request(LeafKind::Agent, &org, &key(), T0)["signature"].clone();
    let response = harness.send(Method::POST, &path, harness.admin(), Some(body)).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_proof_of_possession");
    let mut body = good.clone();
    body["signature"] = harness.request(LeafKind::Agent, &unknown, &agent_key, T0)["signature"].clone();
    let response = harness.send(Method::POST, &path, harness.admin(), Some(body)).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_proof_of_possession");
    let mut body = good.clone();
    body["timestamp_ms"] = json!(T0.0 + 1);
    let response = harness.send(Method::POST, &path, harness.admin(), Some(body)).await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_proof_of_possession");

    // Stale and future timestamps, correctly signed.
    for at in [T0.0 - 5 * 60 * 1000 - 1, T0.0 + 5 * 60 * 1000 + 1, 0] {
        let body = harness.request(LeafKind::Agent, &org, &agent_key, UnixMillis(at));
        let response = harness.send(Method::POST, &path, harness.admin(), Some(body)).await;
        assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "stale_timestamp");
    }

    // Unknown and missing fields; edge dns names.
    let mut body = good.clone();
    body["agent_name"] = json!("x");
    assert_problem(
        &harness.send(Method::POST, &path, harness.admin(), Some(body)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    );
    let edge_path = format!("/v1/orgs/{org}/edges/certificates");
    for names in [json!([]), json!(["Edge.example"]), json!(["a..b"]), json!(["-a.example"]), json!(["a b"])] {
        let mut body = harness.request(LeafKind::Edge, &org, &agent_key, T0);
        body["dns_names"] = names;
        let response = harness.send(Method::POST, &edge_path, harness.admin(), Some(body)).await;
        assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_dns_names");
    }
    assert_problem(
        &harness.send(Method::POST, &edge_path, harness.admin(), Some(good.clone())).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    );

    // Scope and credentials.
    let (status, reader) = harness
        .send(Method::POST, "/v1/admin/keys", harness.admin(), Some(json!({"name": "reader", "scopes": ["read"]})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{reader}");
    let reader = reader["token"].as_str().unwrap().to_owned();
    let response = harness.send(Method::POST, &path, Some(&reader), Some(good.clone())).await;
    assert_problem(&response, StatusCode::FORBIDDEN, "missing_scope");
    let response = harness.send(Method::POST, &format!("/v1/orgs/{org}/ca"), Some(&reader), None).await;
    assert_problem(&response, StatusCode::FORBIDDEN, "missing_scope");
    let response = harness.send(Method::POST, &path, None, Some(good.clone())).await;
    assert_problem(&response, StatusCode::UNAUTHORIZED, "missing_credentials");

    // Revocation.
    let unknown_serial = "0".repeat(32);
    let response = harness
        .send(Method::POST, &format!("/v1/certificates/{unknown_serial}/revoke"), harness.admin(), Some(json!({})))
        .await;
    assert_problem(&response, StatusCode::NOT_FOUND, "certificate_not_found");
    let response = harness.send(Method::POST, "/v1/certificates/xyz/revoke", harness.admin(), Some(json!({}))).await;
    assert_problem(&response, StatusCode::BAD_REQUEST, "invalid_serial");
    let response = harness
        .send(Method::POST, &format!("/v1/certificates/{unknown_serial}/revoke"), Some(&reader), Some(json!({})))
        .await;
    assert_problem(&response, StatusCode::FORBIDDEN, "missing_scope");

    assert_eq!(fixture.count("org_cas").await, 0, "no org CA was created by a refused request");
    assert_eq!(fixture.count("certificates").await, 0);
    assert_eq!(sequence(fixture).await, sequence_before);

    // The good request still works, and a bad reason on a real serial changes nothing.
    let issued = harness.issue_agent(&org, &agent_key).await;
    let serial = issued["serial"].as_str().unwrap();
    let response = harness
        .send(
            Method::POST,
            &format!("/v1/certificates/{serial}/revoke"),
            harness.admin(),
            Some(json!({"reason": "bored"})),
        )
        .await;
    assert_problem(&response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_reason");
    assert_eq!(fixture.count("certificates WHERE revoked_at_ms IS NOT NULL").await, 0);
}

async fn org_ca_keys_are_sealed_under_the_kek_and_bound_to_their_org(fixture: &Fixture) {
    use sqlx::Row as _;
    let harness = Harness::new(fixture, &KeyEncryptionKey::generate()).await;
    let first = harness.create_org("first").await;
    let second = harness.create_org("second").await;
    for org in [&first, &second] {
        let (status, _) = harness.send(Method::POST, &format!("/v1/orgs/{org}/ca"), harness.admin(), None).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let sealed = |org: &OrgId| {
        let org = org.to_string();
        async move {
            let row = sqlx::query("SELECT key_sealed FROM org_cas WHERE org_id = $1")
                .bind(org)
                .fetch_one(fixture.db.pool())
                .await
                .unwrap();
            row.get::<Vec<u8>, _>(0)
        }
    };
    let first_sealed = sealed(&first).await;
    assert_eq!(first_sealed.len(), 12 + 32 + 16, "nonce, Ed25519 secret, tag");
    // The first org's sealed key moved onto the second org's row does not open there.
    sqlx::query("UPDATE org_cas SET key_sealed = $1 WHERE org_id = $2")
        .bind(first_sealed)
        .bind(second.to_string())
        .execute(fixture.db.pool())
        .await
        .unwrap();
    let body = harness.request(LeafKind::Agent, &second, &key(), T0);
    let response = harness
        .send(Method::POST, &format!("/v1/orgs/{second}/agents/certificates"), harness.admin(), Some(body))
        .await;
    assert_problem(&response, StatusCode::INTERNAL_SERVER_ERROR, "internal");
    assert_eq!(response.1["detail"], "the server failed to handle the request");
    assert_eq!(fixture.count("certificates").await, 0);
    harness.issue_agent(&first, &key()).await;
}

async fn the_development_root_is_created_once_and_needs_its_kek(fixture: &Fixture) {
    let kek = KeyEncryptionKey::generate();
    let first = load_authority(fixture, &kek).await.unwrap();
    let second = load_authority(fixture, &kek).await.unwrap();
    assert_eq!(first.root(), second.root());
    assert_eq!(first.root().role(), Role::Root);
    assert_eq!(fixture.count("ca_root").await, 1);
    let wrong = load_authority(fixture, &KeyEncryptionKey::generate()).await;
    assert!(matches!(wrong, Err(LoadAuthorityError::WrongKek(_))), "{wrong:?}");
    // Replicas starting together on an empty table agree on one root.
    sqlx::query("DELETE FROM ca_root").execute(fixture.db.pool()).await.unwrap();
    let other = fixture.second_handle().await;
    let options =
        CaOptions { key_encryption_key: KekSource::Value(kek.clone()), root: RootSource::Generated, pkcs11: None };
    let (a, b) = tokio::join!(
        Authority::load(&fixture.db, &options, "postgres://unused", T0),
        Authority::load(&other, &options, "postgres://unused", T0),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.root(), b.root());
    assert_ne!(a.root(), first.root());
    assert_eq!(fixture.count("ca_root").await, 1);
}

#[test]
fn ca_settings_are_validated_with_the_rest_of_the_config() {
    use molt_control_plane::config::{ConfigError, Overrides, parse_file, validate};
    use std::collections::BTreeMap;
    let kek = "ab".repeat(32);
    let environment: BTreeMap<String, String> = [("MOLT_CP_KEK".to_owned(), kek.clone())].into();
    let file =
        parse_file("[ca]\nkey_encryption_key_file = \"/k\"\nroot_certificate_file = \"/c\"\nroot_key_file = \"/r\"\n");
    let config = validate(file.unwrap(), &environment, &Overrides::default()).unwrap();
    assert_eq!(config.ca.key_encryption_key, KekSource::Value(KeyEncryptionKey::from_hex(&kek).unwrap()));
    assert_eq!(config.ca.root, RootSource::Files { certificate: "/c".into(), key: "/r".into() });
    let config = validate(parse_file("").unwrap(), &BTreeMap::new(), &Overrides::default()).unwrap();
    assert_eq!(config.ca, CaOptions::default());

    let environment: BTreeMap<String, String> = [("MOLT_CP_KEK".to_owned(), "short".to_owned())].into();
    let file = parse_file("[ca]\nroot_key_file = \"/r\"\n").unwrap();
    let Err(ConfigError::Invalid(problems)) = validate(file, &environment, &Overrides::default()) else {
        panic!("expected invalid configuration");
    };
    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems.iter().any(|problem| problem.starts_with("MOLT_CP_KEK (environment): a key-encryption key")));
    assert!(problems.iter().any(|problem| problem.contains("both ca.root_certificate_file and ca.root_key_file")));
}
