//! Edge enrollment over HTTP, on both backends: admins create, list and revoke tokens;
//! an edge enrolls once with a proof of possession and gets a chain that verifies
//! against the returned bundle; reused, expired, revoked, forged and malformed tokens and
//! bad proofs are refused with their own problem codes and write nothing; of concurrent
//! enrollments with one token exactly one wins.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use molt_control_plane::api::{self, AppState};
use molt_control_plane::auth::AdminToken;
use molt_control_plane::ca::{Authority, CaOptions, KekSource, KeyEncryptionKey, LeafKind, RootSource, proof_message};
use molt_control_plane::clock::{Clock as _, ManualClock};
use molt_control_plane::enrollment::{self, EnrollError, EnrollRequest};
use molt_control_plane::ids::OrgId;
use molt_control_plane::metrics::Metrics;
use molt_protocol::cert::{Certificate, ExpectedRole, Revocations, Role, TrustAnchors, verify_chain};
use molt_protocol::ids::EdgeId;
use molt_protocol::keys::SigningKey;
use molt_protocol::time::UnixMillis;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::fixture::Fixture;

crate::on_both_backends!(
    tokens_are_created_listed_and_revoked_and_only_their_hash_is_stored,
    an_edge_enrolls_once_and_its_chain_verifies_against_the_bundle,
    expired_revoked_forged_tokens_and_bad_proofs_are_refused_and_write_nothing,
    concurrent_enrollments_with_one_token_have_exactly_one_winner,
);

const T0: UnixMillis = UnixMillis(1_700_000_000_000);
/// Attempts racing for one token.
const RACERS: usize = 8;

struct Harness {
    app: Router,
    admin: AdminToken,
    clock: Arc<ManualClock>,
    authority: Arc<Authority>,
    org: OrgId,
}

impl Harness {
    async fn new(fixture: &Fixture) -> Harness {
        let admin = fixture.db.bootstrap_admin_key(T0).await.unwrap().expect("a fresh database bootstraps");
        let options = CaOptions {
            key_encryption_key: KekSource::Value(KeyEncryptionKey::generate()),
            root: RootSource::Generated,
            pkcs11: None,
        };
        let authority = Arc::new(Authority::load(&fixture.db, &options, "postgres://unused", T0).await.unwrap());
        let clock = Arc::new(ManualClock::new(T0));
        let state =
            AppState::new(fixture.db.clone(), clock.clone(), Arc::new(Metrics::new())).with_ca(Arc::clone(&authority));
        let app = api::router(state);
        let mut harness =
            Harness { app, admin, clock, authority, org: "org_aaaaaaaaaaaaaaaaaaaaaaaaaa".parse().unwrap() };
        let (status, org) = harness.send(Method::POST, "/v1/orgs", Some(json!({ "name": "acme" })), true).await;
        assert_eq!(status, StatusCode::CREATED, "{org}");
        harness.org = org["id"].as_str().unwrap().parse().unwrap();
        harness
    }

    async fn send(&self, method: Method, uri: &str, body: Option<Value>, admin: bool) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if admin {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", self.admin.expose()));
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(body.map_or_else(Body::empty, |body| Body::from(body.to_string()))).unwrap();
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        if status.is_client_error() || status.is_server_error() {
            assert_eq!(response.headers().get(header::CONTENT_TYPE).unwrap(), "application/problem+json");
        }
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn create_token(&self, extra: Value) -> Value {
        let mut body = json!({ "org_id": self.org.to_string(), "region": "eu-west" });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (status, created) = self.send(Method::POST, "/v1/admin/enrollment-tokens", Some(body), true).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created
    }

    fn enroll_body(&self, token: &str, key: &SigningKey, org: &OrgId) -> Value {
        let now = self.clock.now();
        let signature = key.sign(&proof_message(LeafKind::Edge, org, &key.public_key(), now));
        json!({
            "token": token,
            "public_key": hex(key.public_key().as_bytes()),
            "timestamp_ms": now.0,
            "signature": hex(&signature.0),
        })
    }

    async fn enroll(&self, token: &str, key: &SigningKey) -> (StatusCode, Value) {
        let body = self.enroll_body(token, key, &self.org);
        self.send(Method::POST, "/v1/edges/enroll", Some(body), false).await
    }
}

async fn tokens_are_created_listed_and_revoked_and_only_their_hash_is_stored(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let created = harness.create_token(json!({ "ttl_secs": 3600 })).await;
    let token = created["token"].as_str().unwrap();
    assert!(token.starts_with(enrollment::ENROLLMENT_TOKEN_PREFIX));
    assert_eq!(created["org_id"], harness.org.to_string());
    assert_eq!(created["region"], "eu-west");
    assert_eq!(created["status"], "active");
    assert_eq!(created["expires_at_ms"], T0.0 + 3_600_000);
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT token_hash FROM enrollment_tokens").fetch_one(fixture.db.pool()).await.unwrap();
    assert_eq!(stored.len(), 32, "a SHA-256, not the token");
    assert!(!String::from_utf8_lossy(&stored).contains(token));

    let default = harness.create_token(json!({})).await;
    assert_eq!(default["expires_at_ms"], T0.0 + enrollment::TOKEN_TTL_DEFAULT.as_millis() as u64);
    let (status, list) = harness.send(Method::GET, "/v1/admin/enrollment-tokens", None, true).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains("molt_enroll_"), "a list shows no secret: {list}");

    let id = created["id"].as_str().unwrap();
    let (status, revoked) =
        harness.send(Method::DELETE, &format!("/v1/admin/enrollment-tokens/{id}"), None, true).await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    let (again, _) = harness.send(Method::DELETE, &format!("/v1/admin/enrollment-tokens/{id}"), None, true).await;
    assert_eq!(again, StatusCode::OK, "revoking twice changes nothing");
    let (missing, problem) =
        harness.send(Method::DELETE, "/v1/admin/enrollment-tokens/enr_aaaaaaaaaaaaaaaaaaaaaaaaaa", None, true).await;
    assert_eq!((missing, problem["code"].as_str()), (StatusCode::NOT_FOUND, Some("enrollment_token_not_found")));

    // Bad requests: each its own code, nothing stored.
    let max_ttl = enrollment::TOKEN_TTL_MAX.as_secs() + 1;
    let min_validity = enrollment::CERTIFICATE_VALIDITY_MIN.as_secs() - 1;
    for (body, status, code) in [
        (json!({ "org_id": harness.org.to_string(), "region": "EU" }), 422, "invalid_region"),
        (json!({ "org_id": harness.org.to_string(), "region": "eu", "ttl_secs": max_ttl }), 422, "invalid_ttl"),
        (json!({ "org_id": harness.org.to_string(), "region": "eu", "ttl_secs": 59 }), 422, "invalid_ttl"),
        (
            json!({ "org_id": harness.org.to_string(), "region": "eu", "certificate_validity_secs": min_validity }),
            422,
            "invalid_certificate_validity",
        ),
        (json!({ "org_id": "org_bbbbbbbbbbbbbbbbbbbbbbbbbb", "region": "eu" }), 404, "org_not_found"),
    ] {
        let (got, problem) = harness.send(Method::POST, "/v1/admin/enrollment-tokens", Some(body), true).await;
        assert_eq!((got.as_u16(), problem["code"].as_str()), (status, Some(code)), "{problem}");
    }
    let body = json!({ "org_id": harness.org.to_string(), "region": "eu" });
    let (unauthorized, _) = harness.send(Method::POST, "/v1/admin/enrollment-tokens", Some(body), false).await;
    assert_eq!(unauthorized, StatusCode::UNAUTHORIZED);
    assert_eq!(fixture.count("enrollment_tokens").await, 2);
}

async fn an_edge_enrolls_once_and_its_chain_verifies_against_the_bundle(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let created = harness.create_token(json!({ "certificate_validity_secs": 600 })).await;
    let token = created["token"].as_str().unwrap();
    let (status, org) =
        harness.send(Method::POST, "/v1/edges/enroll/org", Some(json!({ "token": token })), false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((org["org_id"].as_str(), org["region"].as_str()), (Some(harness.org.as_str()), Some("eu-west")));

    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let (status, enrolled) = harness.enroll(token, &key).await;
    assert_eq!(status, StatusCode::CREATED, "{enrolled}");
    let edge = EdgeId::from_inception_key(&key.public_key());
    assert_eq!(enrolled["edge_id"], edge.to_string());
    assert_eq!(enrolled["region"], "eu-west");
    assert_eq!(enrolled["not_after_ms"], T0.0 + 600_000, "the token's certificate validity");

    let chain = Certificate::chain_from_pem(enrolled["chain_pem"].as_str().unwrap()).unwrap();
    assert_eq!(chain[0].role(), Role::Edge(edge));
    let roots: Vec<Certificate> = enrolled["trust_bundle"]["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pem| Certificate::from_pem(pem.as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(roots[0].der(), harness.authority.root().der());
    let anchors = TrustAnchors::new(roots).unwrap();
    let ders: Vec<&[u8]> = chain.iter().map(Certificate::der).collect();
    verify_chain(&ders, &anchors, &Revocations::default(), harness.clock.now(), ExpectedRole::AnyEdge)
        .expect("the enrolled chain verifies");
    assert!(enrolled["trust_bundle"]["sequence"].as_u64().unwrap() > 0);

    // Used: refused, and nothing more is issued.
    let certificates = fixture.count("certificates").await;
    let other = SigningKey::generate(&mut rand::rngs::OsRng);
    let (status, problem) = harness.enroll(token, &other).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("enrollment_token_used")));
    assert_eq!(fixture.count("certificates").await, certificates);
    let (_, list) = harness.send(Method::GET, "/v1/admin/enrollment-tokens", None, true).await;
    assert_eq!(list["items"][0]["status"], "used");
    assert_eq!(list["items"][0]["used_by_edge"], edge.to_string());
}

async fn expired_revoked_forged_tokens_and_bad_proofs_are_refused_and_write_nothing(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let certificates = fixture.count("certificates").await;

    let expiring = harness.create_token(json!({ "ttl_secs": 60 })).await;
    let revoked = harness.create_token(json!({})).await;
    let good = harness.create_token(json!({})).await;
    let id = revoked["id"].as_str().unwrap();
    harness.send(Method::DELETE, &format!("/v1/admin/enrollment-tokens/{id}"), None, true).await;

    let (status, problem) = harness.enroll(revoked["token"].as_str().unwrap(), &key).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::GONE, Some("enrollment_token_revoked")));

    // A forged token of the right shape, and malformed text.
    let forged = enrollment::EnrollmentToken::generate();
    for text in [forged.expose(), "molt_enroll_short", "", "molt_admin_AAAA"] {
        let (status, problem) = harness.enroll(text, &key).await;
        assert_eq!((status, problem["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_enrollment_token")));
    }

    // A proof signed by another key, for another org, or too long ago.
    let good_token = good["token"].as_str().unwrap();
    let mut wrong_key = harness.enroll_body(good_token, &key, &harness.org);
    wrong_key["public_key"] = hex(SigningKey::generate(&mut rand::rngs::OsRng).public_key().as_bytes()).into();
    let other_org = OrgId::generate();
    let wrong_org = harness.enroll_body(good_token, &key, &other_org);
    for body in [wrong_key, wrong_org] {
        let (status, problem) = harness.send(Method::POST, "/v1/edges/enroll", Some(body), false).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_proof_of_possession")),
            "{problem}"
        );
    }
    let mut stale = harness.enroll_body(good_token, &key, &harness.org);
    harness.clock.set(T0.saturating_add(Duration::from_secs(30)));
    let at = T0.saturating_sub(Duration::from_secs(10 * 60));
    stale["timestamp_ms"] = at.0.into();
    stale["signature"] = hex(&key.sign(&proof_message(LeafKind::Edge, &harness.org, &key.public_key(), at)).0).into();
    let (status, problem) = harness.send(Method::POST, "/v1/edges/enroll", Some(stale), false).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("stale_timestamp")));
    let mut garbage = harness.enroll_body(good_token, &key, &harness.org);
    garbage["signature"] = "zz".into();
    let (status, problem) = harness.send(Method::POST, "/v1/edges/enroll", Some(garbage), false).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_signature")));

    // Past its expiry.
    harness.clock.set(T0.saturating_add(Duration::from_secs(61)));
    let (status, problem) = harness.enroll(expiring["token"].as_str().unwrap(), &key).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::GONE, Some("enrollment_token_expired")));

    // Nothing was written by any refusal; the good token is still usable.
    assert_eq!(fixture.count("certificates").await, certificates);
    let used: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM enrollment_tokens WHERE used_at_ms IS NOT NULL")
        .fetch_one(fixture.db.pool())
        .await
        .unwrap();
    assert_eq!(used, 0);
    let (status, enrolled) = harness.enroll(good_token, &key).await;
    assert_eq!(status, StatusCode::CREATED, "{enrolled}");
}

async fn concurrent_enrollments_with_one_token_have_exactly_one_winner(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let created = harness.create_token(json!({})).await;
    let token = created["token"].as_str().unwrap().to_owned();
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..RACERS {
        // Each racer has its own pool, as a separate replica would.
        let db = fixture.second_handle().await;
        let authority = Arc::clone(&harness.authority);
        let token = token.clone();
        let org = harness.org.clone();
        let now = harness.clock.now();
        attempts.spawn(async move {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let signature = key.sign(&proof_message(LeafKind::Edge, &org, &key.public_key(), now));
            let request = EnrollRequest { token: &token, public_key: key.public_key(), timestamp: now, signature };
            enrollment::enroll(&db, &authority, &request, now).await.map(|enrolled| enrolled.edge_id)
        });
    }
    let results = attempts.join_all().await;
    let winners: Vec<EdgeId> = results.iter().filter_map(|result| result.as_ref().ok().copied()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for result in &results {
        if let Err(error) = result {
            assert!(matches!(error, EnrollError::TokenUsed), "{error}");
        }
    }
    let edge_certificates: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM certificates WHERE kind = 'edge'")
        .fetch_one(fixture.db.pool())
        .await
        .unwrap();
    assert_eq!(edge_certificates, 1, "one certificate for one winner");
    let used_by: Option<String> =
        sqlx::query_scalar("SELECT used_by_edge FROM enrollment_tokens").fetch_one(fixture.db.pool()).await.unwrap();
    assert_eq!(used_by, Some(winners[0].to_string()));
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}
