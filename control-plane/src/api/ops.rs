//! Operations routes: `/healthz`, `/readyz`, `/metrics`, `/openapi.json`. No
//! authentication: they say nothing an admin key protects.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::problem::{ApiError, Problem};
use super::{AppState, READY_CHECK_TIMEOUT};
use crate::metrics;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Body of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    /// `ok` or `ready`.
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up", body = Status)))]
pub async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// The database is reachable: route traffic here.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "The database answers", body = Status),
        (status = 503, description = "The database does not answer", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    let unavailable =
        || ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "database_unavailable", "the database does not answer");
    match tokio::time::timeout(READY_CHECK_TIMEOUT, state.db.ping()).await {
        Ok(Ok(())) => Ok(Json(Status { status: "ready" })),
        Ok(Err(error)) => {
            tracing::warn!(error = %error, cause = ?std::error::Error::source(&error), "readiness check failed");
            Err(unavailable())
        }
        Err(_) => {
            tracing::warn!(timeout = ?READY_CHECK_TIMEOUT, "readiness check timed out");
            Err(unavailable())
        }
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let (open, idle, capacity) = state.db.pool_usage();
    state.metrics.record(|| {
        ::metrics::gauge!(metrics::DATABASE_CONNECTIONS).set(f64::from(open));
        ::metrics::gauge!(metrics::DATABASE_CONNECTIONS_IDLE).set(idle as f64);
        ::metrics::gauge!(metrics::DATABASE_CONNECTIONS_CAPACITY).set(f64::from(capacity));
    });
    ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], state.metrics.render()).into_response()
}

/// This OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], state.openapi.to_string()).into_response()
}
