//! The edge map: `GET /v1/edge-map` (public), which agents choose their edge from
//! ([`crate::edges`]), and `PUT /v1/admin/edges/{id}/weight` (scope `ca:write`).

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::{ApiClient, ApiError, Auth};

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

    /// `PUT /v1/admin/edges/{id}/weight` (scope `ca:write`): 1 to 1000.
    pub async fn set_edge_weight(&self, edge_id: &str, weight: u16) -> Result<EdgeMapEntry, ApiError> {
        let path = ["v1", "admin", "edges", edge_id, "weight"];
        let body = WeightBody { weight };
        self.json(Method::PUT, &path, &[], Auth::Admin, Some(&body), "setting an edge's weight").await
    }
}
