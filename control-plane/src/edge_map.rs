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

use crate::db::{Database, Page};

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

/// The metrics summary an edge sends with its presence reports: totals since the edge
/// process started, and current levels (see the edge's `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct EdgeSummary {
    /// Milliseconds since the edge process started.
    pub uptime_ms: u64,
    /// Open agent connections.
    pub connections: u64,
    pub messages_received: u64,
    pub messages_delivered: u64,
    /// Messages refused, any reason.
    pub messages_rejected: u64,
    pub rate_limited: u64,
    /// Messages in the offline buffer now.
    pub buffered_messages: u64,
    pub buffered_bytes: u64,
    /// Open links to other edges.
    pub peer_links: u64,
    /// Messages and receipts passed to other edges.
    pub peer_forwarded: u64,
    /// Messages and receipts taken from other edges.
    pub peer_received: u64,
    /// Buffered records handed to the recipient's current edge.
    pub handoffs: u64,
}

/// An edge as admins see it: its map entry, what it registered, how many agents it
/// reported, and its latest metrics summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeStatus {
    pub entry: EdgeEntry,
    pub version: String,
    /// Where other edges link to it; empty if it takes no links.
    pub peer_addrs: Vec<String>,
    pub registered_at: UnixMillis,
    /// Agents its latest presence report named.
    pub connected_agents: u64,
    /// The latest summary and when it came; `None` until the edge sends one.
    pub summary: Option<(EdgeSummary, UnixMillis)>,
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

/// A page of every registered edge, fresh or not, by id.
pub async fn list_edges(db: &Database, page: &Page<EdgeId>) -> Result<Vec<EdgeStatus>, EdgeMapError> {
    let rows = sqlx::query(
        "SELECT e.id AS id, e.region AS region, e.quic_addrs AS quic_addrs, e.weight AS weight, \
         e.last_seen_ms AS last_seen_ms, e.version AS version, e.peer_addrs AS peer_addrs, \
         e.registered_at_ms AS registered_at_ms, e.summary AS summary, e.summary_at_ms AS summary_at_ms, \
         (SELECT COUNT(*) FROM edge_presence p WHERE p.edge_id = e.id) AS connected_agents \
         FROM edges e WHERE e.id > $1 ORDER BY e.id LIMIT $2",
    )
    .bind(page.after.map(|edge| edge.to_string()).unwrap_or_default())
    .bind(i64::from(page.limit))
    .fetch_all(db.pool())
    .await
    .map_err(EdgeMapError::Store)?;
    Ok(rows.iter().filter_map(status_from_row).collect())
}

/// Records the summary of a presence report (in the report's transaction).
pub async fn record_summary(
    connection: &mut sqlx::AnyConnection,
    edge: EdgeId,
    summary: &EdgeSummary,
    at: UnixMillis,
) -> Result<(), sqlx::Error> {
    // Invariant: a struct of integers serialises.
    let json = serde_json::to_string(summary).expect("EdgeSummary serialises");
    sqlx::query("UPDATE edges SET summary = $1, summary_at_ms = $2 WHERE id = $3")
        .bind(json)
        .bind(to_db(at))
        .bind(edge.to_string())
        .execute(connection)
        .await?;
    Ok(())
}

fn status_from_row(row: &AnyRow) -> Option<EdgeStatus> {
    let entry = entry_from_row(row)?;
    let parsed = (|| {
        let peer_addrs: String = row.try_get("peer_addrs").ok()?;
        let registered_at: i64 = row.try_get("registered_at_ms").ok()?;
        let connected_agents: i64 = row.try_get("connected_agents").ok()?;
        let summary: Option<String> = row.try_get("summary").ok()?;
        let summary_at: Option<i64> = row.try_get("summary_at_ms").ok()?;
        let summary = match (summary, summary_at) {
            (Some(json), Some(at)) => {
                Some((serde_json::from_str(&json).ok()?, UnixMillis(u64::try_from(at).unwrap_or(0))))
            }
            _ => None,
        };
        Some(EdgeStatus {
            entry: entry.clone(),
            version: row.try_get("version").ok()?,
            peer_addrs: serde_json::from_str(&peer_addrs).ok()?,
            registered_at: UnixMillis(u64::try_from(registered_at).unwrap_or(0)),
            connected_agents: u64::try_from(connected_agents).unwrap_or(0),
            summary,
        })
    })();
    if parsed.is_none() {
        tracing::error!(edge = %entry.edge_id, "an edges row is malformed; left out of the list");
    }
    parsed
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
