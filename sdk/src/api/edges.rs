//! The edge map: `GET /v1/edge-map` (public), which agents choose their edge from
//! ([`crate::edges`]); the fleet view `GET /v1/admin/edges` (scope `read`); and
//! `PUT /v1/admin/edges/{id}/weight` (scope `ca:write`).

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::{ApiClient, ApiError, Auth, Page, page_query};

/// One edge agents may connect to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EdgeMapEntry {
    /// `edge-…`.
    pub edge_id: String,
    pub region: String,
    /// `host:port` QUIC addresses.
    pub quic_addrs: Vec<String>,
    /// 1 to 1000, 100 neutral; a higher weight counts an edge as nearer.
    pub weight: u16,
    pub last_seen_ms: u64,
}

/// The edges seen within `fresh_window_ms` of `generated_at_ms`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EdgeMap {
    pub edges: Vec<EdgeMapEntry>,
    pub fresh_window_ms: u64,
    pub generated_at_ms: u64,
}

/// The metrics summary an edge sends with its presence reports: totals since the edge
/// process started, and current levels.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct EdgeSummary {
    pub uptime_ms: u64,
    pub connections: u64,
    pub messages_received: u64,
    pub messages_delivered: u64,
    pub messages_rejected: u64,
    pub rate_limited: u64,
    pub buffered_messages: u64,
    pub buffered_bytes: u64,
    pub peer_links: u64,
    pub peer_forwarded: u64,
    pub peer_received: u64,
    pub handoffs: u64,
}

/// A registered edge as admins see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EdgeStatus {
    pub edge_id: String,
    pub region: String,
    pub quic_addrs: Vec<String>,
    #[serde(default)]
    pub peer_addrs: Vec<String>,
    pub weight: u16,
    pub version: String,
    pub registered_at_ms: u64,
    pub last_seen_ms: u64,
    /// Seen recently enough to be in the edge map.
    pub in_edge_map: bool,
    pub connected_agents: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<EdgeSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary_at_ms: Option<u64>,
}

/// A page of edges, by id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EdgeList {
    pub items: Vec<EdgeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

#[derive(Serialize)]
struct WeightBody {
    weight: u16,
}

impl ApiClient {
    /// `GET /v1/edge-map`: the edges seen recently. Public.
    pub async fn edge_map(&self) -> Result<EdgeMap, ApiError> {
        let path = ["v1", "edge-map"];
        self.json(Method::GET, &path, &[], Auth::Public, None::<&()>, "fetching the edge map").await
    }

    /// `GET /v1/admin/edges` (scope `read`): every registered edge with its latest
    /// metrics summary.
    pub async fn list_edges(&self, page: Page<'_>) -> Result<EdgeList, ApiError> {
        let query = page_query(&page);
        self.json(Method::GET, &["v1", "admin", "edges"], &query, Auth::Admin, None::<&()>, "listing edges").await
    }

    /// `PUT /v1/admin/edges/{id}/weight` (scope `ca:write`): 1 to 1000.
    pub async fn set_edge_weight(&self, edge_id: &str, weight: u16) -> Result<EdgeMapEntry, ApiError> {
        let path = ["v1", "admin", "edges", edge_id, "weight"];
        let body = WeightBody { weight };
        self.json(Method::PUT, &path, &[], Auth::Admin, Some(&body), "setting an edge's weight").await
    }
}
