//! The edge map over HTTP, on both backends: the public map lists the edges seen within
//! the fresh window with their region, addresses and weight; admins with `ca:write` set
//! weights; unknown edges, out-of-range weights, missing credentials and scopes are
//! refused with their own problem codes and change nothing. Edges are written as the
//! gRPC `Register` writes them (the service itself is tested in `grpc`, and end to end
//! in `tests/tests/edge_failover.rs`).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use molt_control_plane::api::{self, AppState};
use molt_control_plane::auth::AdminToken;
use molt_control_plane::clock::ManualClock;
use molt_control_plane::edge_map::EDGE_MAP_FRESH_WINDOW;
use molt_control_plane::metrics::Metrics;
use molt_protocol::ids::EdgeId;
use molt_protocol::keys::SigningKey;
use molt_protocol::time::UnixMillis;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::fixture::Fixture;

crate::on_both_backends!(
    the_map_lists_recent_edges_with_their_weights,
    bad_weight_requests_are_refused_and_change_nothing,
);

const T0: UnixMillis = UnixMillis(1_700_000_000_000);

struct Harness {
    app: Router,
    admin: AdminToken,
    clock: Arc<ManualClock>,
}

impl Harness {
    async fn new(fixture: &Fixture) -> Harness {
        let admin = fixture.db.bootstrap_admin_key(T0).await.unwrap().expect("a fresh database bootstraps");
        let clock = Arc::new(ManualClock::new(T0));
        let state = AppState::new(fixture.db.clone(), clock.clone(), Arc::new(Metrics::new()));
        Harness { app: api::router(state), admin, clock }
    }

    async fn send(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
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
        if status.is_client_error() || status.is_server_error() {
            assert_eq!(response.headers().get(header::CONTENT_TYPE).unwrap(), "application/problem+json");
        }
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    fn admin(&self) -> Option<&str> {
        Some(self.admin.expose())
    }

    async fn map(&self) -> Value {
        let (status, map) = self.send(Method::GET, "/v1/edge-map", None, None).await;
        assert_eq!(status, StatusCode::OK, "{map}");
        map
    }

    async fn set_weight(&self, edge: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.send(Method::PUT, &format!("/v1/admin/edges/{edge}/weight"), token, Some(body)).await
    }
}

/// Records an edge the way the gRPC `Register` does.
async fn register(fixture: &Fixture, region: &str, addr: &str, seen: UnixMillis) -> EdgeId {
    let edge = EdgeId::from_inception_key(&SigningKey::generate(&mut rand::rngs::OsRng).public_key());
    sqlx::query(
        "INSERT INTO edges (id, region, quic_addrs, version, registered_at_ms, last_seen_ms) \
         VALUES ($1, $2, $3, '0.1.0', $4, $4)",
    )
    .bind(edge.to_string())
    .bind(region)
    .bind(serde_json::to_string(&[addr]).unwrap())
    .bind(i64::try_from(seen.0).unwrap())
    .execute(fixture.db.pool())
    .await
    .expect("insert an edge");
    edge
}

fn assert_problem(response: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(response.0, status, "{}", response.1);
    assert_eq!(response.1["code"], code, "{}", response.1);
}

async fn the_map_lists_recent_edges_with_their_weights(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    assert_eq!(harness.map().await["edges"], json!([]), "no edge yet");
    let window = EDGE_MAP_FRESH_WINDOW.as_millis() as u64;
    let west = register(fixture, "eu-west", "127.0.0.1:4433", T0).await;
    let east = register(fixture, "us-east", "127.0.0.1:4434", UnixMillis(T0.0 - 1_000)).await;
    let stale = register(fixture, "ap-south", "127.0.0.1:4435", UnixMillis(T0.0 - window - 1)).await;

    let map = harness.map().await;
    assert_eq!(map["fresh_window_ms"], window);
    assert_eq!(map["generated_at_ms"], T0.0);
    assert_eq!(
        map["edges"],
        json!([
            { "edge_id": west.to_string(), "region": "eu-west", "quic_addrs": ["127.0.0.1:4433"], "weight": 100, "last_seen_ms": T0.0 },
            { "edge_id": east.to_string(), "region": "us-east", "quic_addrs": ["127.0.0.1:4434"], "weight": 100, "last_seen_ms": T0.0 - 1_000 },
        ]),
        "fresh edges by region; the stale one is left out"
    );

    let (status, updated) = harness.set_weight(&east.to_string(), harness.admin(), json!({ "weight": 250 })).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!((updated["edge_id"].as_str(), updated["weight"].as_u64()), (Some(east.to_string().as_str()), Some(250)));
    assert_eq!(harness.map().await["edges"][1]["weight"], 250);
    // A stale edge is still known: its weight can be set before it comes back.
    let (status, updated) = harness.set_weight(&stale.to_string(), harness.admin(), json!({ "weight": 1 })).await;
    assert_eq!((status, updated["weight"].as_u64()), (StatusCode::OK, Some(1)));
    for bound in [1, 1000] {
        let (status, _) = harness.set_weight(&west.to_string(), harness.admin(), json!({ "weight": bound })).await;
        assert_eq!(status, StatusCode::OK, "{bound} is within range");
    }

    // Without reports, every edge leaves the map once the window has passed.
    harness.clock.set(UnixMillis(T0.0 + window + 1));
    assert_eq!(harness.map().await["edges"], json!([]));
}

async fn bad_weight_requests_are_refused_and_change_nothing(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let edge = register(fixture, "eu-west", "127.0.0.1:4433", T0).await.to_string();
    let admin = harness.admin();
    let unknown = EdgeId::from_inception_key(&SigningKey::generate(&mut rand::rngs::OsRng).public_key());

    let cases = [
        (
            harness.set_weight(&unknown.to_string(), admin, json!({ "weight": 200 })).await,
            StatusCode::NOT_FOUND,
            "edge_not_found",
        ),
        (
            harness.set_weight("edge-not-an-id", admin, json!({ "weight": 200 })).await,
            StatusCode::NOT_FOUND,
            "edge_not_found",
        ),
        (
            harness.set_weight(&edge, admin, json!({ "weight": 0 })).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_weight",
        ),
        (
            harness.set_weight(&edge, admin, json!({ "weight": 1001 })).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_weight",
        ),
        (
            harness.set_weight(&edge, admin, json!({ "weight": 65_636 })).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_weight",
        ),
        (
            harness.set_weight(&edge, admin, json!({ "weight": -5 })).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            harness.set_weight(&edge, admin, json!({ "weight": 200, "region": "x" })).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            harness.set_weight(&edge, None, json!({ "weight": 200 })).await,
            StatusCode::UNAUTHORIZED,
            "missing_credentials",
        ),
        (
            harness.set_weight(&edge, Some("molt_admin_forged"), json!({ "weight": 200 })).await,
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
        ),
    ];
    for (response, status, code) in &cases {
        assert_problem(response, *status, code);
    }

    let body = json!({ "name": "reader", "scopes": ["read", "orgs:write"] });
    let (status, created) = harness.send(Method::POST, "/v1/admin/keys", admin, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let reader = created["token"].as_str().unwrap();
    let forbidden = harness.set_weight(&edge, Some(reader), json!({ "weight": 200 })).await;
    assert_problem(&forbidden, StatusCode::FORBIDDEN, "missing_scope");

    assert_eq!(harness.map().await["edges"][0]["weight"], 100, "no refused request changed the weight");
    assert_eq!(fixture.count("edges").await, 1, "no refused request created an edge");
}
