//! The edge map ([`crate::edge_map`]): public, so agents can choose an edge before they
//! hold anything but the control plane's URL; and the admin route that sets an edge's
//! weight (`ca:write`, like the other routes that shape the edge fleet).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use molt_protocol::ids::EdgeId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::ca::CaWriteScope;
use super::extract::{ApiJson, Authorized};
use super::problem::{ApiError, Problem};
use crate::edge_map::{self, EDGE_MAP_FRESH_WINDOW, EdgeEntry, EdgeWeight, SetWeightError};

/// One edge agents may connect to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EdgeMapEntryBody {
    #[schema(example = "edge-aaaaaaaaaaaaaaaaaaaaaaaaaa")]
    pub edge_id: String,
    #[schema(example = "eu-west")]
    pub region: String,
    /// `host:port` QUIC addresses (ALPN `molt/1`), as the edge registered them.
    pub quic_addrs: Vec<String>,
    /// 1 to 1000, 100 neutral; agents rank edges by RTT × 100 / weight.
    pub weight: u16,
    /// The edge's last registration or presence report, milliseconds since the Unix epoch.
    pub last_seen_ms: u64,
}

/// The edges seen recently.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EdgeMapBody {
    /// Edges seen within `fresh_window_ms`, by region then id.
    pub edges: Vec<EdgeMapEntryBody>,
    /// How recently an edge must have reported to be listed.
    pub fresh_window_ms: u64,
    /// The control plane's time when it answered.
    pub generated_at_ms: u64,
}

/// Body of `PUT /v1/admin/edges/{id}/weight`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeWeightRequest {
    /// 1 to 1000; 100 is the default.
    #[schema(example = 250)]
    pub weight: u64,
}

/// The edges agents may connect to: region, QUIC addresses and weight of every edge seen
/// recently. Public, like the trust bundle.
#[utoipa::path(get, path = "/v1/edge-map", tag = "edges",
    responses((status = 200, description = "The edge map", body = EdgeMapBody)))]
pub async fn edge_map(State(state): State<AppState>) -> Result<Json<EdgeMapBody>, ApiError> {
    let now = state.clock.now();
    let edges = edge_map::recent_edges(&state.db, now).await.map_err(|error| ApiError::internal(&error))?;
    Ok(Json(EdgeMapBody {
        edges: edges.into_iter().map(entry_body).collect(),
        fresh_window_ms: EDGE_MAP_FRESH_WINDOW.as_millis() as u64,
        generated_at_ms: now.0,
    }))
}

/// Sets how strongly agents should prefer an edge.
#[utoipa::path(put, path = "/v1/admin/edges/{id}/weight", tag = "edges",
    params(("id" = String, Path, description = "Edge id (`edge-…`)")),
    request_body = EdgeWeightRequest,
    security(("admin_key" = ["ca:write"])),
    responses(
        (status = 200, description = "The edge with its new weight", body = EdgeMapEntryBody),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ca:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No edge with this id has registered (edge_not_found)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_weight (not 1 to 1000), or unknown or missing fields", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn set_edge_weight(
    State(state): State<AppState>,
    authorized: Authorized<CaWriteScope>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<EdgeWeightRequest>,
) -> Result<Json<EdgeMapEntryBody>, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "edge_not_found", "no edge with this id has registered");
    let edge: EdgeId = id.parse().map_err(|_| not_found())?;
    let weight = EdgeWeight::new(request.weight).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_weight",
            format!("weight must be {} to {}", EdgeWeight::MIN, EdgeWeight::MAX),
        )
    })?;
    let entry = edge_map::set_weight(&state.db, edge, weight).await.map_err(|error| match error {
        SetWeightError::UnknownEdge(_) => not_found(),
        other => ApiError::internal(&other),
    })?;
    tracing::info!(edge = %edge, %weight, by = %authorized.key_id, "edge weight set");
    Ok(Json(entry_body(entry)))
}

fn entry_body(entry: EdgeEntry) -> EdgeMapEntryBody {
    EdgeMapEntryBody {
        edge_id: entry.edge_id.to_string(),
        region: entry.region,
        quic_addrs: entry.quic_addrs,
        weight: entry.weight.get(),
        last_seen_ms: entry.last_seen.0,
    }
}
