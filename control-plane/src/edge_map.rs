//! The edge map: which edges agents may connect to, where, and how much admins prefer each.
//!
//! Edges register over gRPC ([`crate::grpc`]) with their region and QUIC addresses and
//! refresh `last_seen_ms` with every presence report (at least every
//! `presence_interval_ms`, 30 s by default). The map lists the edges seen within
//! [`EDGE_MAP_FRESH_WINDOW`], so an edge that died leaves it on its own. Each edge has a
//! [`EdgeWeight`] that admins set; the SDK divides the round-trip time it measures by the
//! weight relative to [`EdgeWeight::DEFAULT`] when it ranks edges.

use std::fmt;
use std::time::Duration;

use molt_protocol::ids::EdgeId;
use molt_protocol::time::UnixMillis;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use crate::db::Database;

/// An edge is listed while its last registration or presence report is at most this old:
/// three default presence intervals (an idle edge reports every 30 s), so one or two lost
/// reports do not drop an edge. Agents notice a dead edge themselves long before.
pub const EDGE_MAP_FRESH_WINDOW: Duration = Duration::from_secs(90);
/// Most edges listed in one map; the freshest are kept.
pub const EDGE_MAP_EDGES_MAX: usize = 1_000;

/// How strongly agents should prefer an edge: 1 to 1000, 100 neutral. An agent ranks
/// edges by RTT × 100 / weight, so weight 200 counts an edge as twice as near.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeWeight(u16);

impl EdgeWeight {
    pub const MIN: EdgeWeight = EdgeWeight(1);
    pub const MAX: EdgeWeight = EdgeWeight(1000);
    /// The weight of a newly registered edge.
    pub const DEFAULT: EdgeWeight = EdgeWeight(100);

    /// The weight, if `value` is within [`EdgeWeight::MIN`]..=[`EdgeWeight::MAX`].
    pub fn new(value: u64) -> Option<EdgeWeight> {
        let value = u16::try_from(value).ok()?;
        (EdgeWeight::MIN.0..=EdgeWeight::MAX.0).contains(&value).then_some(EdgeWeight(value))
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for EdgeWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

const _: () = assert!(EdgeWeight::MIN.0 <= EdgeWeight::DEFAULT.0 && EdgeWeight::DEFAULT.0 <= EdgeWeight::MAX.0);

/// One edge in the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeEntry {
    pub edge_id: EdgeId,
    pub region: String,
    /// `host:port` QUIC addresses, as the edge registered them.
    pub quic_addrs: Vec<String>,
    pub weight: EdgeWeight,
    pub last_seen: UnixMillis,
}

/// Reading the edge map failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EdgeMapError {
    #[error("reading the edge map: {0}")]
    Store(#[source] sqlx::Error),
}

/// Setting an edge's weight failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetWeightError {
    #[error("setting the weight: no edge {0} has registered")]
    UnknownEdge(EdgeId),
    #[error("setting the weight: {0}")]
    Store(#[source] sqlx::Error),
}

/// The edges seen within [`EDGE_MAP_FRESH_WINDOW`] before `now`, by region then id.
pub async fn recent_edges(db: &Database, now: UnixMillis) -> Result<Vec<EdgeEntry>, EdgeMapError> {
    let since = now.0.saturating_sub(EDGE_MAP_FRESH_WINDOW.as_millis() as u64);
    let rows = sqlx::query(
        "SELECT id, region, quic_addrs, weight, last_seen_ms FROM edges WHERE last_seen_ms >= $1 \
         ORDER BY last_seen_ms DESC LIMIT $2",
    )
    .bind(to_db(UnixMillis(since)))
    .bind(EDGE_MAP_EDGES_MAX as i64)
    .fetch_all(db.pool())
    .await
    .map_err(EdgeMapError::Store)?;
    let mut edges = rows.iter().filter_map(entry_from_row).collect::<Vec<_>>();
    edges.sort_by(|a, b| (a.region.as_str(), a.edge_id.to_string()).cmp(&(b.region.as_str(), b.edge_id.to_string())));
    Ok(edges)
}

/// Sets an edge's weight; the edge as it now stands in the map (seen recently or not).
pub async fn set_weight(db: &Database, edge: EdgeId, weight: EdgeWeight) -> Result<EdgeEntry, SetWeightError> {
    let updated = sqlx::query("UPDATE edges SET weight = $1 WHERE id = $2")
        .bind(i64::from(weight.get()))
        .bind(edge.to_string())
        .execute(db.pool())
        .await
        .map_err(SetWeightError::Store)?
        .rows_affected();
    if updated == 0 {
        return Err(SetWeightError::UnknownEdge(edge));
    }
    let row = sqlx::query("SELECT id, region, quic_addrs, weight, last_seen_ms FROM edges WHERE id = $1")
        .bind(edge.to_string())
        .fetch_one(db.pool())
        .await
        .map_err(SetWeightError::Store)?;
    entry_from_row(&row).ok_or(SetWeightError::UnknownEdge(edge))
}

/// A row as an entry; `None` (logged) for a row the service could not have written.
fn entry_from_row(row: &AnyRow) -> Option<EdgeEntry> {
    let parsed = (|| {
        let id: String = row.try_get("id").ok()?;
        let addrs: String = row.try_get("quic_addrs").ok()?;
        let weight: i64 = row.try_get("weight").ok()?;
        let last_seen: i64 = row.try_get("last_seen_ms").ok()?;
        Some(EdgeEntry {
            edge_id: id.parse().ok()?,
            region: row.try_get("region").ok()?,
            quic_addrs: serde_json::from_str(&addrs).ok()?,
            weight: EdgeWeight::new(u64::try_from(weight).ok()?)?,
            last_seen: UnixMillis(u64::try_from(last_seen).unwrap_or(0)),
        })
    })();
    if parsed.is_none() {
        tracing::error!("an edges row is malformed; left out of the edge map");
    }
    parsed
}

fn to_db(time: UnixMillis) -> i64 {
    i64::try_from(time.0).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_bounded() {
        assert_eq!(EdgeWeight::new(0), None);
        assert_eq!(EdgeWeight::new(1), Some(EdgeWeight::MIN));
        assert_eq!(EdgeWeight::new(1000), Some(EdgeWeight::MAX));
        assert_eq!(EdgeWeight::new(1001), None);
        assert_eq!(EdgeWeight::new(u64::from(u16::MAX) + 101), None, "no wrap-around");
    }
}
