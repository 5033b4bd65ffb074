//! The HTTP API: routes, shared state, the OpenAPI document and the server loop.
//!
//! Handlers are thin: extract (rejections are problem documents), call [`Database`],
//! map domain errors to stable problem codes. Admin routes take an
//! [`extract::Authorized`] for the scope they need, so a handler cannot run unchecked.

pub mod admin_keys;
pub mod ca;
pub mod edges;
pub mod enrollment;
pub mod extract;
pub mod keys;
pub mod ledger;
pub mod ops;
pub mod orgs;
pub mod problem;
pub mod registry;

use std::convert::Infallible;
use std::future::{Future, IntoFuture as _};
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::clock::Clock;
use crate::db::Database;
use crate::metrics::{self, Metrics};
use problem::ApiError;

/// Largest request body accepted; larger ones get a 413 problem.
pub const REQUEST_BODY_BYTES_MAX: usize = 64 * 1024;
/// How long `/readyz` waits for the database.
pub const READY_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What handlers share; cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub db: Database,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    /// The certificate authority; its routes answer 503 `ca_unavailable` without one.
    pub ca: Option<Arc<crate::ca::Authority>>,
    /// The credits ledger (its writer tasks start with the first command).
    pub ledger: Arc<crate::ledger::Ledger>,
    /// This replica's search index (built by the first search if `start` did not).
    pub search: Arc<crate::registry::SearchIndex>,
    /// Recovery time lock and other key-management settings.
    pub keys: crate::keys::KeyPolicy,
    /// Records agent request nonces (its writer task starts with the first request).
    pub nonces: Arc<crate::agent_auth::NonceRecorder>,
    /// Agents' signing keys read recently (`keys::SIGNING_KEYS_CACHE_TTL`).
    pub signing_keys: Arc<crate::keys::SigningKeysCache>,
    /// Verifies concurrent agent requests' signatures in batches.
    pub signatures: Arc<crate::signatures::SignatureVerifier>,
    openapi: Arc<str>,
}

impl AppState {
    pub fn new(db: Database, clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Self {
        // Invariant: the document is built from static derive output; serialising it
        // cannot fail.
        let openapi = ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serialises");
        let ledger = Arc::new(crate::ledger::Ledger::new(db.clone(), Arc::clone(&clock)));
        let search = Arc::new(crate::registry::SearchIndex::new(db.clone()));
        let nonces = Arc::new(crate::agent_auth::NonceRecorder::new(db.clone()));
        AppState {
            db,
            clock,
            metrics,
            ca: None,
            ledger,
            search,
            keys: crate::keys::KeyPolicy::default(),
            nonces,
            signing_keys: Arc::new(crate::keys::SigningKeysCache::default()),
            signatures: Arc::new(crate::signatures::SignatureVerifier::new()),
            openapi: openapi.into(),
        }
    }

    /// The state with a certificate authority.
    pub fn with_ca(mut self, ca: Arc<crate::ca::Authority>) -> Self {
        self.ca = Some(ca);
        self
    }

    /// The state keeping agents' signing keys for `ttl` instead of
    /// [`crate::keys::SIGNING_KEYS_CACHE_TTL`].
    pub fn with_signing_keys_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.signing_keys = Arc::new(crate::keys::SigningKeysCache::new(ttl));
        self
    }

    /// The state with these key-management settings.
    pub fn with_key_policy(mut self, keys: crate::keys::KeyPolicy) -> Self {
        self.keys = keys;
        self
    }
}

/// The OpenAPI 3.1 document of every route.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Molt control plane",
        description = "Admin API of the Molt control plane. Errors are RFC 9457 problem documents \
                       (application/problem+json) with a stable `code`."
    ),
    paths(
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::openapi,
        admin_keys::create_admin_key,
        admin_keys::list_admin_keys,
        admin_keys::revoke_admin_key,
        orgs::create_org,
        orgs::list_orgs,
        orgs::get_org,
        ca::create_org_ca,
        ca::issue_agent_certificate,
        ca::issue_edge_certificate,
        ca::revoke_certificate,
        ca::get_crl,
        ca::trust_bundle,
        enrollment::create_enrollment_token,
        enrollment::list_enrollment_tokens,
        enrollment::revoke_enrollment_token,
        enrollment::enrollment_org,
        enrollment::enroll_edge,
        edges::edge_map,
        edges::set_edge_weight,
        edges::list_edges,
        registry::register_agent,
        registry::search_agents,
        registry::get_agent,
        registry::update_agent,
        registry::heartbeat,
        registry::agent_card,
        registry::import_agent_card,
        registry::revoke_agent,
        keys::rotate_key, keys::key_history, keys::set_guardians, keys::get_guardians, keys::clear_guardians,
        keys::open_recovery, keys::get_recovery, keys::approve_recovery, keys::cancel_recovery,
        keys::complete_recovery,
        ledger::open_wallet, ledger::get_wallet, ledger::wallet_history, ledger::create_transfer,
        ledger::create_transfer_batch, ledger::get_transfer, ledger::create_escrow, ledger::get_escrow,
        ledger::release_escrow, ledger::refund_escrow, ledger::dispute_escrow, ledger::lock_stake,
        ledger::unlock_stake, ledger::get_stakes, ledger::mint, ledger::get_fee, ledger::set_fee,
        ledger::rule_escrow, ledger::slash_stake, ledger::get_account, ledger::audit,
    ),
    components(schemas(problem::Problem)),
    modifiers(&BearerSecurity),
    tags(
        (name = "operations", description = "Health, readiness, metrics and this document"),
        (name = "ledger", description = "Credits: wallets, transfers, escrows, stakes; admin mint, fee, rulings, audit"),
        (name = "admin keys", description = "Scoped admin API keys"),
        (name = "orgs", description = "Organisations"),
        (name = "certificate authority", description = "Org CAs, certificates, revocation, CRLs, trust bundle"),
        (name = "agent keys", description = "Key rotation, guardians and social recovery of agents"),
        (name = "edge enrollment", description = "Enrollment tokens and the enrollment of new edges"),
        (name = "edges", description = "The edge map agents choose their edge from, and edge weights"),
        (name = "registry", description = "Agent registry: signed registration, heartbeats, search, agent cards"),
    )
)]
pub struct ApiDoc;

/// Name of the security scheme admin routes use (the `security(("admin_key" = …))` literals).
pub const BEARER_SCHEME: &str = "admin_key";

#[derive(Debug)]
struct BearerSecurity;

impl Modify for BearerSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An admin key: `molt_admin_…`"))
                    .build(),
            ),
        );
    }
}

/// Builds every route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route("/v1/admin/keys", post(admin_keys::create_admin_key).get(admin_keys::list_admin_keys))
        .route("/v1/admin/keys/{id}", delete(admin_keys::revoke_admin_key))
        .route("/v1/orgs", post(orgs::create_org).get(orgs::list_orgs))
        .route("/v1/orgs/{id}", get(orgs::get_org))
        .route("/v1/orgs/{id}/ca", post(ca::create_org_ca))
        .route("/v1/orgs/{id}/agents/certificates", post(ca::issue_agent_certificate))
        .route("/v1/orgs/{id}/edges/certificates", post(ca::issue_edge_certificate))
        .route("/v1/orgs/{id}/crl", get(ca::get_crl))
        .route("/v1/certificates/{serial}/revoke", post(ca::revoke_certificate))
        .route("/v1/trust-bundle", get(ca::trust_bundle))
        .route(
            "/v1/admin/enrollment-tokens",
            post(enrollment::create_enrollment_token).get(enrollment::list_enrollment_tokens),
        )
        .route("/v1/admin/enrollment-tokens/{id}", delete(enrollment::revoke_enrollment_token))
        .route("/v1/edges/enroll", post(enrollment::enroll_edge))
        .route("/v1/edges/enroll/org", post(enrollment::enrollment_org))
        .route("/v1/edge-map", get(edges::edge_map))
        .route("/v1/admin/edges", get(edges::list_edges))
        .route("/v1/admin/edges/{id}/weight", put(edges::set_edge_weight))
        .route("/v1/agents", post(registry::register_agent).get(registry::search_agents))
        .route("/v1/agents/{id}", get(registry::get_agent).put(registry::update_agent))
        .route("/v1/agents/{id}/heartbeat", post(registry::heartbeat))
        .route("/v1/agents/{id}/agent-card.json", get(registry::agent_card).put(registry::import_agent_card))
        .route("/v1/agents/{id}/revoke", post(registry::revoke_agent))
        .route("/v1/agents/{id}/key-rotations", post(keys::rotate_key))
        .route("/v1/agents/{id}/keys", get(keys::key_history))
        .route(
            "/v1/agents/{id}/guardians",
            get(keys::get_guardians).put(keys::set_guardians).delete(keys::clear_guardians),
        )
        .route("/v1/agents/{id}/recoveries", post(keys::open_recovery))
        .route("/v1/agents/{id}/recoveries/{recovery}", get(keys::get_recovery))
        .route("/v1/agents/{id}/recoveries/{recovery}/approve", post(keys::approve_recovery))
        .route("/v1/agents/{id}/recoveries/{recovery}/cancel", post(keys::cancel_recovery))
        .route("/v1/agents/{id}/recoveries/{recovery}/complete", post(keys::complete_recovery))
        .merge(ledger_routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), record_request))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX))
        .with_state(state)
}

/// The ledger's routes ([`ledger`]).
fn ledger_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/ledger/wallet", post(ledger::open_wallet).get(ledger::get_wallet))
        .route("/v1/ledger/wallet/history", get(ledger::wallet_history))
        .route("/v1/ledger/transfers", post(ledger::create_transfer))
        .route("/v1/ledger/transfers/batch", post(ledger::create_transfer_batch))
        .route("/v1/ledger/transfers/{id}", get(ledger::get_transfer))
        .route("/v1/ledger/escrows", post(ledger::create_escrow))
        .route("/v1/ledger/escrows/{id}", get(ledger::get_escrow))
        .route("/v1/ledger/escrows/{id}/release", post(ledger::release_escrow))
        .route("/v1/ledger/escrows/{id}/refund", post(ledger::refund_escrow))
        .route("/v1/ledger/escrows/{id}/dispute", post(ledger::dispute_escrow))
        .route("/v1/ledger/stakes", get(ledger::get_stakes))
        .route("/v1/ledger/stakes/lock", post(ledger::lock_stake))
        .route("/v1/ledger/stakes/unlock", post(ledger::unlock_stake))
        .route("/v1/admin/ledger/mint", post(ledger::mint))
        .route("/v1/admin/ledger/fee", get(ledger::get_fee).put(ledger::set_fee))
        .route("/v1/admin/ledger/escrows/{id}/ruling", post(ledger::rule_escrow))
        .route("/v1/admin/ledger/stakes/slash", post(ledger::slash_stake))
        .route("/v1/admin/ledger/accounts/{id}", get(ledger::get_account))
        .route("/v1/admin/ledger/audit", get(ledger::audit))
}

/// Serves the API on `listener` until `shutdown` completes, then lets in-flight requests
/// finish. Runs the metrics upkeep for as long as it serves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "control plane API listening");
    }
    let metrics = state.metrics.clone();
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(shutdown);
    tokio::select! {
        result = server.into_future() => result,
        never = run_upkeep(metrics) => match never {},
    }
}

async fn run_upkeep(metrics: Arc<Metrics>) -> Infallible {
    let mut interval = tokio::time::interval(metrics::UPKEEP_INTERVAL);
    loop {
        interval.tick().await;
        metrics.run_upkeep();
    }
}

async fn record_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map_or_else(String::new, |path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    state.metrics.record(|| {
        ::metrics::counter!(metrics::HTTP_REQUESTS_TOTAL, "route" => route.clone(), "method" => method.clone(), "status" => status)
            .increment(1);
        ::metrics::histogram!(metrics::HTTP_REQUEST_DURATION_SECONDS, "route" => route, "method" => method)
            .record(started.elapsed().as_secs_f64());
    });
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "the route does not accept this method")
}
