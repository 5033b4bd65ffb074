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
use super::extract::{ApiJson, ApiQuery, Authorized, ReadScope};
use super::orgs::PageQuery;
use super::problem::{ApiError, Problem};
use crate::edge_map::{self, EDGE_MAP_FRESH_WINDOW, EdgeEntry, EdgeStatus, EdgeSummary, EdgeWeight, SetWeightError};

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

/// One registered edge as admins see it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EdgeStatusBody {
    #[schema(example = "edge-aaaaaaaaaaaaaaaaaaaaaaaaaa")]
    pub edge_id: String,
    pub region: String,
    pub quic_addrs: Vec<String>,
    /// Where other edges link to it (ALPN `molt-edge/1`); empty if it takes no links.
    pub peer_addrs: Vec<String>,
    pub weight: u16,
    /// The edge's software version.
    pub version: String,
    pub registered_at_ms: u64,
    /// Its last registration or presence report.
    pub last_seen_ms: u64,
    /// Whether it is in the edge map (seen within the map's window).
    pub in_edge_map: bool,
    /// Agents its latest presence report named.
    pub connected_agents: u64,
    /// Its latest metrics summary; absent until it sends one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<EdgeSummary>,
    /// When that summary came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary_at_ms: Option<u64>,
}

/// A page of edges, by id.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EdgeList {
    pub items: Vec<EdgeStatusBody>,
    /// Pass as `after` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
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

/// Every registered edge, fresh or not, with its latest metrics summary.
#[utoipa::path(get, path = "/v1/admin/edges", tag = "edges", params(PageQuery),
    security(("admin_key" = ["read"])),
    responses(
        (status = 200, description = "A page of edges", body = EdgeList),
        (status = 400, description = "Invalid paging parameters", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks read", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_edges(
    State(state): State<AppState>,
    _authorized: Authorized<ReadScope>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<EdgeList>, ApiError> {
    let page = query.page(|after| after.parse::<EdgeId>().ok())?;
    let edges = edge_map::list_edges(&state.db, &page).await.map_err(|error| ApiError::internal(&error))?;
    let full = edges.len() == page.limit as usize;
    let next_after = full.then(|| edges.last().map(|edge| edge.entry.edge_id.to_string())).flatten();
    let fresh_since = state.clock.now().0.saturating_sub(EDGE_MAP_FRESH_WINDOW.as_millis() as u64);
    let items = edges.into_iter().map(|edge| status_body(edge, fresh_since)).collect();
    Ok(Json(EdgeList { items, next_after }))
}

fn status_body(status: EdgeStatus, fresh_since: u64) -> EdgeStatusBody {
    EdgeStatusBody {
        in_edge_map: status.entry.last_seen.0 >= fresh_since,
        edge_id: status.entry.edge_id.to_string(),
        region: status.entry.region,
        quic_addrs: status.entry.quic_addrs,
        peer_addrs: status.peer_addrs,
        weight: status.entry.weight.get(),
        version: status.version,
        registered_at_ms: status.registered_at.0,
        last_seen_ms: status.entry.last_seen.0,
        connected_agents: status.connected_agents,
        summary: status.summary.map(|(summary, _)| summary),
        summary_at_ms: status.summary.map(|(_, at)| at.0),
    }
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
