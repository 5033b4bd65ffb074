//! HTTP handlers through `Router::oneshot`, on both backends: each bad input gets its
//! status and problem code, and nothing is written.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use molt_control_plane::api::{self, AppState, REQUEST_BODY_BYTES_MAX};
use molt_control_plane::auth::AdminToken;
use molt_control_plane::clock::ManualClock;
use molt_control_plane::metrics::Metrics;
use molt_protocol::time::UnixMillis;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::fixture::Fixture;

crate::on_both_backends!(
    operations_routes_answer,
    readyz_fails_when_the_database_is_gone,
    orgs_are_created_listed_and_read,
    bad_org_requests_get_problems_and_write_nothing,
    scoped_keys_are_created_used_and_revoked,
    bad_key_requests_get_problems_and_write_nothing,
    every_route_is_documented,
);

const T0: UnixMillis = UnixMillis(1_700_000_000_000);

struct Harness {
    app: Router,
    token: AdminToken,
}

impl Harness {
    async fn new(fixture: &Fixture) -> Harness {
        let token = fixture.db.bootstrap_admin_key(T0).await.unwrap().expect("a fresh database bootstraps");
        let state = AppState::new(fixture.db.clone(), Arc::new(ManualClock::new(T0)), Arc::new(Metrics::new()));
        Harness { app: api::router(state), token }
    }

    async fn send(&self, method: Method, uri: &str, token: Option<&str>, body: Option<&str>) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(body.map_or_else(Body::empty, |body| Body::from(body.to_owned()))).unwrap();
        self.call(request).await
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

    fn admin(&self) -> Option<&str> {
        Some(self.token.expose())
    }
}

/// Asserts a problem response: status, code, and the RFC 9457 members.
#[track_caller]
fn assert_problem(response: &(StatusCode, Value), status: StatusCode, code: &str) {
    let (found, body) = response;
    assert_eq!((*found, body["code"].as_str()), (status, Some(code)), "{body}");
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(body["type"], format!("urn:molt:problem:{code}"));
    assert!(body["title"].is_string() && body["detail"].is_string(), "{body}");
}

async fn operations_routes_answer(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    assert_eq!(harness.send(Method::GET, "/healthz", None, None).await, (StatusCode::OK, json!({"status": "ok"})));
    assert_eq!(harness.send(Method::GET, "/readyz", None, None).await, (StatusCode::OK, json!({"status": "ready"})));
    let (status, page) = harness.send(Method::GET, "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let page = page.as_str().unwrap();
    assert!(
        page.contains("molt_control_plane_http_requests_total{route=\"/healthz\",method=\"GET\",status=\"200\"} 1"),
        "{page}"
    );
    assert!(page.contains("molt_control_plane_database_connections_capacity 4"), "{page}");
    assert_problem(&harness.send(Method::GET, "/nowhere", None, None).await, StatusCode::NOT_FOUND, "not_found");
    assert_problem(
        &harness.send(Method::PUT, "/v1/orgs", harness.admin(), None).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

async fn readyz_fails_when_the_database_is_gone(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    fixture.db.close().await;
    let response = harness.send(Method::GET, "/readyz", None, None).await;
    assert_problem(&response, StatusCode::SERVICE_UNAVAILABLE, "database_unavailable");
    // A failed query on an admin route is a 500 that does not say why.
    let response = harness.send(Method::GET, "/v1/orgs", harness.admin(), None).await;
    assert_problem(&response, StatusCode::INTERNAL_SERVER_ERROR, "internal");
    assert_eq!(response.1["detail"], "the server failed to handle the request");
}

async fn orgs_are_created_listed_and_read(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let (status, created) = harness.send(Method::POST, "/v1/orgs", harness.admin(), Some(r#"{"name":"acme"}"#)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!((created["name"].as_str(), created["created_at_ms"].as_u64()), (Some("acme"), Some(T0.0)));
    let id = created["id"].as_str().unwrap();
    assert_eq!(
        harness.send(Method::GET, &format!("/v1/orgs/{id}"), harness.admin(), None).await,
        (StatusCode::OK, created.clone())
    );
    harness.send(Method::POST, "/v1/orgs", harness.admin(), Some(r#"{"name":"beta"}"#)).await;

    let (status, page) = harness.send(Method::GET, "/v1/orgs?limit=1", harness.admin(), None).await;
    assert_eq!(
        (status, page["items"][0]["name"].as_str(), page["next_after"].as_str()),
        (StatusCode::OK, Some("acme"), Some("acme"))
    );
    let (_, page) = harness.send(Method::GET, "/v1/orgs?limit=1&after=acme", harness.admin(), None).await;
    assert_eq!(page["items"][0]["name"], "beta");
    let (_, page) = harness.send(Method::GET, "/v1/orgs?after=beta", harness.admin(), None).await;
    assert_eq!(page, json!({"items": []}));

    let unknown = molt_control_plane::ids::OrgId::generate();
    for path in [format!("/v1/orgs/{unknown}"), "/v1/orgs/not-an-id".to_owned()] {
        assert_problem(
            &harness.send(Method::GET, &path, harness.admin(), None).await,
            StatusCode::NOT_FOUND,
            "not_found",
        );
    }
    for query in ["limit=0", "limit=1001", "limit=x", "after=NOT_A_NAME", "color=red"] {
        let response = harness.send(Method::GET, &format!("/v1/orgs?{query}"), harness.admin(), None).await;
        assert_problem(&response, StatusCode::BAD_REQUEST, "invalid_query");
    }
}

async fn bad_org_requests_get_problems_and_write_nothing(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let admin = harness.admin();
    let (status, _) = harness.send(Method::POST, "/v1/orgs", admin, Some(r#"{"name":"acme"}"#)).await;
    assert_eq!(status, StatusCode::CREATED);

    let oversize = format!(r#"{{"name":"{}"}}"#, "a".repeat(REQUEST_BODY_BYTES_MAX));
    let unknown = AdminToken::generate();
    let cases: [(Option<&str>, &str, StatusCode, &str); 12] = [
        (admin, r#"{"name":"#, StatusCode::BAD_REQUEST, "malformed_json"),
        (admin, r#"{"name":"other","plan":"gold"}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (admin, r#"{}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (admin, r#"{"name":7}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (admin, &oversize, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
        (admin, r#"{"name":"Robert'); DROP TABLE orgs;--"}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_org_name"),
        (admin, r#"{"name":"acme"}"#, StatusCode::CONFLICT, "org_name_taken"),
        (None, r#"{"name":"other"}"#, StatusCode::UNAUTHORIZED, "missing_credentials"),
        (Some("molt_admin_tooshort"), r#"{"name":"other"}"#, StatusCode::UNAUTHORIZED, "invalid_credentials"),
        (Some(unknown.expose()), r#"{"name":"other"}"#, StatusCode::UNAUTHORIZED, "invalid_credentials"),
        // Authentication comes before the body is read.
        (None, r#"{"name":"#, StatusCode::UNAUTHORIZED, "missing_credentials"),
        (Some(unknown.expose()), &oversize, StatusCode::UNAUTHORIZED, "invalid_credentials"),
    ];
    for (token, body, status, code) in cases {
        let response = harness.send(Method::POST, "/v1/orgs", token, Some(body)).await;
        assert_problem(&response, status, code);
    }
    let malformed_json = harness.send(Method::POST, "/v1/orgs", admin, Some(r#"{"name":"x","plan":1}"#)).await;
    assert!(malformed_json.1["detail"].as_str().unwrap().contains("unknown field `plan`"), "{}", malformed_json.1);

    let no_content_type = Request::post("/v1/orgs")
        .header(header::AUTHORIZATION, format!("Bearer {}", harness.token.expose()))
        .body(Body::from(r#"{"name":"other"}"#))
        .unwrap();
    assert_problem(&harness.call(no_content_type).await, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let not_bearer =
        Request::get("/v1/orgs").header(header::AUTHORIZATION, "Basic dXNlcjpwYXNz").body(Body::empty()).unwrap();
    assert_problem(&harness.call(not_bearer).await, StatusCode::UNAUTHORIZED, "invalid_credentials");

    assert_eq!(fixture.count("orgs").await, 1, "only the first org was written");
}

async fn scoped_keys_are_created_used_and_revoked(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let body = r#"{"name":"reader","scopes":["read"]}"#;
    let (status, created) = harness.send(Method::POST, "/v1/admin/keys", harness.admin(), Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["key"]["scopes"], json!(["read"]));
    assert!(created["key"].get("revoked_at_ms").is_none());
    let reader = created["token"].as_str().unwrap().to_owned();
    let reader_id = created["key"]["id"].as_str().unwrap().to_owned();

    assert_eq!(harness.send(Method::GET, "/v1/orgs", Some(&reader), None).await.0, StatusCode::OK);
    let forbidden = harness.send(Method::POST, "/v1/orgs", Some(&reader), Some(r#"{"name":"acme"}"#)).await;
    assert_problem(&forbidden, StatusCode::FORBIDDEN, "missing_scope");
    assert_problem(
        &harness.send(Method::GET, "/v1/admin/keys", Some(&reader), None).await,
        StatusCode::FORBIDDEN,
        "missing_scope",
    );
    let revoke_path = format!("/v1/admin/keys/{reader_id}");
    assert_problem(
        &harness.send(Method::DELETE, &revoke_path, Some(&reader), None).await,
        StatusCode::FORBIDDEN,
        "missing_scope",
    );

    let (status, page) = harness.send(Method::GET, "/v1/admin/keys", harness.admin(), None).await;
    assert_eq!((status, page["items"].as_array().map(Vec::len)), (StatusCode::OK, Some(2)));
    assert!(!page.to_string().contains(&reader), "listings never show tokens");

    let (status, revoked) = harness.send(Method::DELETE, &revoke_path, harness.admin(), None).await;
    assert_eq!((status, revoked["revoked_at_ms"].as_u64()), (StatusCode::OK, Some(T0.0)));
    let response = harness.send(Method::GET, "/v1/orgs", Some(&reader), None).await;
    assert_problem(&response, StatusCode::UNAUTHORIZED, "revoked_credentials");
    assert_eq!(harness.send(Method::DELETE, &revoke_path, harness.admin(), None).await.0, StatusCode::OK, "idempotent");
    let unknown = format!("/v1/admin/keys/{}", molt_control_plane::ids::AdminKeyId::generate());
    assert_problem(
        &harness.send(Method::DELETE, &unknown, harness.admin(), None).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

async fn bad_key_requests_get_problems_and_write_nothing(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let admin = harness.admin();
    let cases = [
        (r#"{"name":"k","scopes":["read","root"]}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_scope"),
        (r#"{"name":"k","scopes":[]}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_scope"),
        (r#"{"name":"","scopes":["read"]}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_key_name"),
        (r#"{"name":"k"}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (r#"{"name":"k","scopes":["read"],"expires":1}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (r#"["k"]"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (r#"{"name":"k","scopes":["read"]"#, StatusCode::BAD_REQUEST, "malformed_json"),
    ];
    for (body, status, code) in cases {
        assert_problem(&harness.send(Method::POST, "/v1/admin/keys", admin, Some(body)).await, status, code);
    }
    assert_eq!(fixture.count("admin_keys").await, 1, "only the bootstrap key exists");
}

async fn every_route_is_documented(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let (status, document) = harness.send(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let routes = [
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("post", "/v1/admin/keys"),
        ("get", "/v1/admin/keys"),
        ("delete", "/v1/admin/keys/{id}"),
        ("post", "/v1/orgs"),
        ("get", "/v1/orgs"),
        ("get", "/v1/orgs/{id}"),
        ("post", "/v1/orgs/{id}/ca"),
        ("post", "/v1/orgs/{id}/agents/certificates"),
        ("post", "/v1/orgs/{id}/edges/certificates"),
        ("post", "/v1/certificates/{serial}/revoke"),
        ("get", "/v1/orgs/{id}/crl"),
        ("get", "/v1/trust-bundle"),
        ("post", "/v1/admin/enrollment-tokens"),
        ("get", "/v1/admin/enrollment-tokens"),
        ("delete", "/v1/admin/enrollment-tokens/{id}"),
        ("post", "/v1/edges/enroll/org"),
        ("post", "/v1/edges/enroll"),
        ("get", "/v1/edge-map"),
        ("put", "/v1/admin/edges/{id}/weight"),
        ("get", "/v1/admin/edges"),
        ("post", "/v1/agents"),
        ("get", "/v1/agents"),
        ("get", "/v1/agents/{id}"),
        ("put", "/v1/agents/{id}"),
        ("post", "/v1/agents/{id}/heartbeat"),
        ("get", "/v1/agents/{id}/agent-card.json"),
        ("put", "/v1/agents/{id}/agent-card.json"),
        ("post", "/v1/agents/{id}/revoke"),
        ("post", "/v1/agents/{id}/key-rotations"),
        ("get", "/v1/agents/{id}/keys"),
        ("put", "/v1/agents/{id}/guardians"),
        ("get", "/v1/agents/{id}/guardians"),
        ("delete", "/v1/agents/{id}/guardians"),
        ("post", "/v1/agents/{id}/recoveries"),
        ("get", "/v1/agents/{id}/recoveries/{recovery}"),
        ("post", "/v1/agents/{id}/recoveries/{recovery}/approve"),
        ("post", "/v1/agents/{id}/recoveries/{recovery}/cancel"),
        ("post", "/v1/agents/{id}/recoveries/{recovery}/complete"),
        ("post", "/v1/ledger/wallet"),
        ("get", "/v1/ledger/wallet"),
        ("get", "/v1/ledger/wallet/history"),
        ("post", "/v1/ledger/transfers"),
        ("post", "/v1/ledger/transfers/batch"),
        ("get", "/v1/ledger/transfers/{id}"),
        ("post", "/v1/ledger/escrows"),
        ("get", "/v1/ledger/escrows/{id}"),
        ("post", "/v1/ledger/escrows/{id}/release"),
        ("post", "/v1/ledger/escrows/{id}/refund"),
        ("post", "/v1/ledger/escrows/{id}/dispute"),
        ("post", "/v1/ledger/stakes/lock"),
        ("post", "/v1/ledger/stakes/unlock"),
        ("get", "/v1/ledger/stakes"),
        ("post", "/v1/admin/ledger/mint"),
        ("get", "/v1/admin/ledger/fee"),
        ("put", "/v1/admin/ledger/fee"),
        ("post", "/v1/admin/ledger/escrows/{id}/ruling"),
        ("post", "/v1/admin/ledger/stakes/slash"),
        ("get", "/v1/admin/ledger/accounts/{id}"),
        ("get", "/v1/admin/ledger/audit"),
    ];
    // Fetched by agents and edges without credentials (enrollment: the token is the credential).
    let public = ["/v1/orgs/{id}/crl", "/v1/trust-bundle", "/v1/edges/enroll", "/v1/edges/enroll/org", "/v1/edge-map"];
    let paths = document["paths"].as_object().expect("paths");
    let documented: usize = paths.values().map(|item| item.as_object().unwrap().len()).sum();
    assert_eq!(documented, routes.len(), "{paths:#?}");
    for (method, path) in routes {
        let operation = &paths[path][method];
        assert!(operation.is_object(), "{method} {path} is not documented");
        // Registry and wallet routes are public or signed by the agent (`agent_auth`), not
        // admin; revoking an agent is admin.
        let by_agent = (path.starts_with("/v1/agents") || path.starts_with("/v1/ledger")) && !path.ends_with("/revoke");
        if path.starts_with("/v1/") && !public.contains(&path) && !by_agent {
            assert!(operation["security"][0]["admin_key"].is_array(), "{method} {path} has no security");
            assert!(operation["responses"]["401"].is_object(), "{method} {path} has no 401");
        }
        // And the router serves it: no 404 or 405 from routing.
        let uri = path.replace("{id}", "x").replace("{serial}", "x").replace("{recovery}", "x");
        let request = Request::builder().method(method.to_uppercase().as_str()).uri(uri).body(Body::empty()).unwrap();
        let (status, body) = harness.call(request).await;
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && body["detail"] != "no such route",
            "{method} {path} is not routed"
        );
    }
    assert!(document["components"]["securitySchemes"]["admin_key"].is_object());
    assert!(document["components"]["schemas"]["Problem"].is_object());
}
