//! Nearest-edge selection.
//!
//! The model: a client is given candidate edges ([`EdgeSource`]: a fixed list, or the
//! control plane's edge map). It measures each one's round-trip time as the time of a
//! QUIC + TLS handshake, [`PROBES_PER_EDGE`] times in a row, and takes the median; an edge
//! that does not answer within [`PROBE_TIMEOUT`] is unreachable. Each reachable edge gets
//! a score, the RTT scaled by the edge's weight ([`score`]); lower is better.
//!
//! [`EdgeSelector`] is the pure part: measurements in, a choice out. It keeps the edge in
//! use unless another one is better by a clear margin ([`clearly_better`]: at least
//! [`SWITCH_MARGIN_PERCENT`] % and [`SWITCH_MARGIN_MIN`]), so small differences and noise
//! never make a client flap between edges. When the edge in use dies the client does not
//! wait for a new measurement: it walks [`EdgeSelector::failover_order`], the last
//! ranking without the dead edge.
//!
//! The client re-measures every [`REPROBE_INTERVAL`] (fetching the edge map again first)
//! and moves when the selector says so.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use molt_protocol::EdgeId;
use tokio::task::JoinSet;

use crate::api::{ApiClient, ApiError, EdgeMap};

/// Handshakes timed per edge in one round; the median counts.
pub const PROBES_PER_EDGE: usize = 3;
/// A handshake that takes longer marks the edge unreachable for the round.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a connected client measures its candidates again.
pub const REPROBE_INTERVAL: Duration = Duration::from_secs(30);
/// Another edge must score at least this much better (in percent of the current edge's
/// score) before the client moves…
pub const SWITCH_MARGIN_PERCENT: u32 = 30;
/// …and at least this much better in absolute terms.
pub const SWITCH_MARGIN_MIN: Duration = Duration::from_millis(5);
/// Candidate addresses considered, at most (the rest of a large map is ignored).
pub const CANDIDATES_MAX: usize = 64;
/// Edges probed at the same time.
pub const PROBE_CONCURRENCY_MAX: usize = 16;

const _: () = assert!(SWITCH_MARGIN_PERCENT > 0 && SWITCH_MARGIN_PERCENT < 100);
const _: () = assert!(PROBES_PER_EDGE % 2 == 1, "an odd count has a true median");
const _: () = assert!(PROBE_TIMEOUT.as_millis() * (PROBES_PER_EDGE as u128) < REPROBE_INTERVAL.as_millis());

/// How strongly the control plane asks agents to prefer an edge: 1 to 1000, 100 neutral.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeWeight(u16);

impl EdgeWeight {
    pub const MIN: EdgeWeight = EdgeWeight(1);
    pub const MAX: EdgeWeight = EdgeWeight(1000);
    pub const NEUTRAL: EdgeWeight = EdgeWeight(100);

    pub fn new(value: u16) -> Option<EdgeWeight> {
        (EdgeWeight::MIN.0..=EdgeWeight::MAX.0).contains(&value).then_some(EdgeWeight(value))
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl Default for EdgeWeight {
    fn default() -> Self {
        EdgeWeight::NEUTRAL
    }
}

/// One address of an edge the client may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeCandidate {
    pub addr: SocketAddr,
    /// When known (from the edge map), the TLS handshake accepts only this edge's
    /// certificate at `addr`.
    pub edge_id: Option<EdgeId>,
    pub region: String,
    pub weight: EdgeWeight,
}

impl EdgeCandidate {
    /// An edge known only by its address, with the neutral weight.
    pub fn at(addr: SocketAddr) -> EdgeCandidate {
        EdgeCandidate { addr, edge_id: None, region: String::new(), weight: EdgeWeight::NEUTRAL }
    }
}

/// Where a client finds its candidate edges.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum EdgeSource {
    /// These edges.
    Candidates(Vec<EdgeCandidate>),
    /// The control plane's edge map (`GET /v1/edge-map`), fetched when connecting and
    /// before every re-measurement. When the control plane cannot be reached the last
    /// map fetched stays in use.
    EdgeMap(ApiClient),
}

/// Finding candidate edges failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CandidatesError {
    #[error("fetching the edge map: {0}")]
    EdgeMap(#[from] ApiError),
    #[error("finding edges: the edge map lists no usable edge")]
    NoEdges,
}

impl EdgeSource {
    /// The candidates now, at most [`CANDIDATES_MAX`].
    pub async fn candidates(&self) -> Result<Vec<EdgeCandidate>, CandidatesError> {
        let mut candidates = match self {
            EdgeSource::Candidates(candidates) => candidates.clone(),
            EdgeSource::EdgeMap(api) => candidates_from_map(&api.edge_map().await?),
        };
        candidates.truncate(CANDIDATES_MAX);
        if candidates.is_empty() {
            return Err(CandidatesError::NoEdges);
        }
        Ok(candidates)
    }
}

/// Every usable address in the map; entries with a malformed id, address or weight are
/// skipped (and logged), since the map comes from the network.
pub fn candidates_from_map(map: &EdgeMap) -> Vec<EdgeCandidate> {
    let mut candidates = Vec::new();
    for entry in &map.edges {
        let (Ok(edge_id), Some(weight)) = (entry.edge_id.parse::<EdgeId>(), EdgeWeight::new(entry.weight)) else {
            tracing::warn!(edge = %entry.edge_id, weight = entry.weight, "edge map entry skipped");
            continue;
        };
        for addr in &entry.quic_addrs {
            match addr.parse::<SocketAddr>() {
                Ok(addr) => candidates.push(EdgeCandidate {
                    addr,
                    edge_id: Some(edge_id),
                    region: entry.region.clone(),
                    weight,
                }),
                Err(_) => tracing::warn!(edge = %entry.edge_id, %addr, "edge map address skipped"),
            }
        }
    }
    candidates
}

/// An RTT scaled by the edge's weight: `rtt × 100 / weight`. Lower is better.
pub fn score(rtt: Duration, weight: EdgeWeight) -> Duration {
    rtt.saturating_mul(u32::from(EdgeWeight::NEUTRAL.0)) / u32::from(weight.0)
}

/// True if `candidate` beats `current` by the hysteresis margin: by at least
/// [`SWITCH_MARGIN_PERCENT`] % of `current` and by at least [`SWITCH_MARGIN_MIN`].
pub fn clearly_better(candidate: Duration, current: Duration) -> bool {
    let Some(gain) = current.checked_sub(candidate) else { return false };
    gain >= SWITCH_MARGIN_MIN && gain.saturating_mul(100) >= current.saturating_mul(SWITCH_MARGIN_PERCENT)
}

/// The median of the samples (the upper one of an even count); `None` if empty.
pub fn median(samples: &mut [Duration]) -> Option<Duration> {
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied()
}

/// One edge's result in a round of probes: its median RTT, or `None` if unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub addr: SocketAddr,
    pub rtt: Option<Duration>,
}

/// Chooses the edge to use from rounds of measurements, with hysteresis. Pure: no I/O,
/// no clock.
#[derive(Clone, Debug, Default)]
pub struct EdgeSelector {
    current: Option<SocketAddr>,
    /// The last round, best first: reachable edges by score, then unreachable ones in
    /// candidate order.
    ranking: Vec<(SocketAddr, Option<Duration>)>,
}

impl EdgeSelector {
    pub fn new() -> EdgeSelector {
        EdgeSelector::default()
    }

    /// The edge in use, as last recorded by [`EdgeSelector::connected`].
    pub fn current(&self) -> Option<SocketAddr> {
        self.current
    }

    /// The last ranking, best first, with each edge's score (`None`: unreachable).
    pub fn ranking(&self) -> &[(SocketAddr, Option<Duration>)] {
        &self.ranking
    }

    /// Takes a round of probes of `candidates` and returns the edge to use: the current
    /// one unless it is gone from the candidates, unreachable, or clearly beaten by the
    /// best; `None` only if no candidate is reachable and none is in use.
    pub fn update(&mut self, candidates: &[EdgeCandidate], probes: &[Probe]) -> Option<SocketAddr> {
        let mut reachable = Vec::new();
        let mut unreachable = Vec::new();
        for candidate in candidates {
            let rtt = probes.iter().find(|probe| probe.addr == candidate.addr).and_then(|probe| probe.rtt);
            match rtt {
                Some(rtt) => reachable.push((candidate.addr, Some(score(rtt, candidate.weight)))),
                None => unreachable.push((candidate.addr, None)),
            }
        }
        // Stable: equal scores keep the candidates' order.
        reachable.sort_by_key(|(_, score)| *score);
        self.ranking = reachable.into_iter().chain(unreachable).collect();
        let best = self.ranking.first().and_then(|(addr, score)| score.map(|score| (*addr, score)));
        let current = self.current.and_then(|addr| self.ranking.iter().find(|(ranked, _)| *ranked == addr).copied());
        match (current, best) {
            (Some((addr, Some(current))), Some((best_addr, best))) => {
                Some(if clearly_better(best, current) { best_addr } else { addr })
            }
            (_, Some((best_addr, _))) => Some(best_addr),
            (_, None) => self.current,
        }
    }

    /// As [`EdgeSelector::update`], for a round measured while the link to the current
    /// edge is up: a failed probe of the current edge does not count against it (the edge
    /// may refuse an extra connection, say over the agent's connection limit), because
    /// the live link decides whether that edge is alive.
    pub fn update_while_connected(&mut self, candidates: &[EdgeCandidate], probes: &[Probe]) -> Option<SocketAddr> {
        let current_listed = self.current.filter(|current| candidates.iter().any(|c| c.addr == *current));
        let current_measured =
            current_listed.is_some_and(|current| probes.iter().any(|p| p.addr == current && p.rtt.is_some()));
        if current_listed.is_some() && !current_measured {
            return self.current;
        }
        self.update(candidates, probes)
    }

    /// Records that the client is now connected to `addr`.
    pub fn connected(&mut self, addr: SocketAddr) {
        self.current = Some(addr);
    }

    /// The edges to try, best first, when `failed` is lost: the last ranking without it,
    /// reachable edges first. The unreachable ones come last because they may be back.
    pub fn failover_order(&self, failed: Option<SocketAddr>) -> Vec<SocketAddr> {
        self.ranking.iter().map(|(addr, _)| *addr).filter(|addr| Some(*addr) != failed).collect()
    }
}

/// Times one QUIC + TLS handshake with each candidate, [`PROBES_PER_EDGE`] times, up to
/// [`PROBE_CONCURRENCY_MAX`] edges at once. `configs` gives the client config for a
/// candidate (it pins the edge's id when known).
pub(crate) async fn probe_round(
    endpoint: &quinn::Endpoint,
    candidates: &[EdgeCandidate],
    server_name: &str,
    configs: &(dyn Fn(&EdgeCandidate) -> Option<quinn::ClientConfig> + Send + Sync),
) -> Vec<Probe> {
    let mut probes = Vec::with_capacity(candidates.len());
    for chunk in candidates.chunks(PROBE_CONCURRENCY_MAX) {
        let mut tasks = JoinSet::new();
        for candidate in chunk {
            let Some(config) = configs(candidate) else {
                probes.push(Probe { addr: candidate.addr, rtt: None });
                continue;
            };
            let endpoint = endpoint.clone();
            let addr = candidate.addr;
            let server_name: Arc<str> = server_name.into();
            tasks.spawn(async move { Probe { addr, rtt: probe_edge(&endpoint, config, addr, &server_name).await } });
        }
        while let Some(probe) = tasks.join_next().await {
            if let Ok(probe) = probe {
                probes.push(probe);
            }
        }
    }
    probes
}

/// The median handshake time with one edge; `None` if a handshake failed or timed out.
async fn probe_edge(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Option<Duration> {
    let mut samples = Vec::with_capacity(PROBES_PER_EDGE);
    for _ in 0..PROBES_PER_EDGE {
        let started = Instant::now();
        let connecting = endpoint.connect_with(config.clone(), addr, server_name).ok()?;
        match tokio::time::timeout(PROBE_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => {
                samples.push(started.elapsed());
                connection.close(0u32.into(), b"probe");
            }
            Ok(Err(error)) => {
                tracing::debug!(%addr, %error, "edge probe failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(%addr, "edge probe timed out");
                return None;
            }
        }
    }
    median(&mut samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn candidate(port: u16, weight: u16) -> EdgeCandidate {
        EdgeCandidate { weight: EdgeWeight::new(weight).unwrap(), ..EdgeCandidate::at(addr(port)) }
    }

    fn probe(port: u16, rtt_ms: Option<u64>) -> Probe {
        Probe { addr: addr(port), rtt: rtt_ms.map(Duration::from_millis) }
    }

    /// A selector connected to whatever it chose from `probes`.
    fn settled(candidates: &[EdgeCandidate], probes: &[Probe]) -> EdgeSelector {
        let mut selector = EdgeSelector::new();
        let chosen = selector.update(candidates, probes).expect("a reachable edge");
        selector.connected(chosen);
        selector
    }

    #[test]
    fn the_nearest_edge_is_chosen_first() {
        let candidates = [candidate(1, 100), candidate(2, 100), candidate(3, 100)];
        let mut selector = EdgeSelector::new();
        let probes = [probe(1, Some(40)), probe(2, Some(12)), probe(3, None)];
        assert_eq!(selector.update(&candidates, &probes), Some(addr(2)));
        assert_eq!(selector.failover_order(Some(addr(2))), vec![addr(1), addr(3)], "unreachable last");
    }

    #[test]
    fn small_rtt_differences_do_not_move_the_client() {
        let candidates = [candidate(1, 100), candidate(2, 100)];
        let mut selector = settled(&candidates, &[probe(1, Some(20)), probe(2, Some(21))]);
        assert_eq!(selector.current(), Some(addr(1)));
        // Edge 2 is now a little better, then noise swings back and forth: no flapping.
        for (one, two) in [(20, 18), (22, 17), (19, 20), (21, 16), (20, 15)] {
            let chosen = selector.update(&candidates, &[probe(1, Some(one)), probe(2, Some(two))]);
            assert_eq!(chosen, Some(addr(1)), "{one} ms vs {two} ms");
        }
    }

    #[test]
    fn a_clearly_better_edge_takes_over() {
        let candidates = [candidate(1, 100), candidate(2, 100)];
        let mut selector = settled(&candidates, &[probe(1, Some(20)), probe(2, Some(25))]);
        assert_eq!(selector.update(&candidates, &[probe(1, Some(20)), probe(2, Some(13))]), Some(addr(2)));
    }

    #[test]
    fn a_relative_gain_below_the_absolute_minimum_is_ignored() {
        // 2 ms → 1 ms halves the RTT but gains less than SWITCH_MARGIN_MIN.
        let candidates = [candidate(1, 100), candidate(2, 100)];
        let mut selector = settled(&candidates, &[probe(1, Some(2)), probe(2, Some(3))]);
        assert_eq!(selector.update(&candidates, &[probe(1, Some(2)), probe(2, Some(1))]), Some(addr(1)));
        // And a big absolute gain that is a small fraction is ignored too.
        let mut selector = settled(&candidates, &[probe(1, Some(300)), probe(2, Some(310))]);
        assert_eq!(selector.update(&candidates, &[probe(1, Some(300)), probe(2, Some(250))]), Some(addr(1)));
    }

    #[test]
    fn weights_scale_the_rtt() {
        // Edge 2 is twice as far but weighs four times as much: it scores half.
        let candidates = [candidate(1, 100), candidate(2, 400)];
        let mut selector = EdgeSelector::new();
        assert_eq!(selector.update(&candidates, &[probe(1, Some(10)), probe(2, Some(20))]), Some(addr(2)));
        assert_eq!(score(Duration::from_millis(20), EdgeWeight::new(400).unwrap()), Duration::from_millis(5));
        assert_eq!(score(Duration::from_millis(20), EdgeWeight::MIN), Duration::from_millis(2000));
    }

    #[test]
    fn an_unreachable_or_vanished_current_edge_is_left_at_once() {
        let candidates = [candidate(1, 100), candidate(2, 100)];
        let mut selector = settled(&candidates, &[probe(1, Some(10)), probe(2, Some(11))]);
        assert_eq!(selector.update(&candidates, &[probe(1, None), probe(2, Some(11))]), Some(addr(2)));
        let mut selector = settled(&candidates, &[probe(1, Some(10)), probe(2, Some(11))]);
        assert_eq!(selector.update(&candidates[1..], &[probe(2, Some(11))]), Some(addr(2)));
        // With nothing reachable the client stays where it is (it may come back).
        let mut selector = settled(&candidates, &[probe(1, Some(10)), probe(2, Some(11))]);
        assert_eq!(selector.update(&candidates, &[probe(1, None), probe(2, None)]), Some(addr(1)));
        assert_eq!(EdgeSelector::new().update(&candidates, &[]), None);
    }

    #[test]
    fn a_failed_probe_of_the_live_edge_does_not_move_a_connected_client() {
        let candidates = [candidate(1, 100), candidate(2, 100)];
        let mut selector = settled(&candidates, &[probe(1, Some(10)), probe(2, Some(11))]);
        assert_eq!(selector.update_while_connected(&candidates, &[probe(1, None), probe(2, Some(2))]), Some(addr(1)));
        // Measured, it is judged as usual.
        assert_eq!(
            selector.update_while_connected(&candidates, &[probe(1, Some(10)), probe(2, Some(2))]),
            Some(addr(2))
        );
    }

    #[test]
    fn the_margin_is_both_relative_and_absolute() {
        let ms = Duration::from_millis;
        assert!(clearly_better(ms(70), ms(100)));
        assert!(!clearly_better(ms(71), ms(100)));
        assert!(clearly_better(ms(10), ms(15)));
        assert!(!clearly_better(ms(11), ms(15)));
        assert!(!clearly_better(ms(100), ms(100)));
        assert!(!clearly_better(ms(120), ms(100)));
    }

    #[test]
    fn the_median_resists_one_outlier() {
        let ms = Duration::from_millis;
        assert_eq!(median(&mut [ms(5), ms(900), ms(6)]), Some(ms(6)));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn malformed_map_entries_are_skipped() {
        let edge =
            EdgeId::from_inception_key(&molt_protocol::keys::SigningKey::generate(&mut rand::rngs::OsRng).public_key());
        let entry = |id: &str, addrs: &[&str], weight| crate::api::EdgeMapEntry {
            edge_id: id.to_owned(),
            region: "eu-west".to_owned(),
            quic_addrs: addrs.iter().map(|addr| (*addr).to_owned()).collect(),
            weight,
            last_seen_ms: 0,
        };
        let map = EdgeMap {
            edges: vec![
                entry(&edge.to_string(), &["127.0.0.1:4433", "not an address", "[::1]:4433"], 250),
                entry("edge-bogus", &["127.0.0.1:4434"], 100),
                entry(&edge.to_string(), &["127.0.0.1:4435"], 0),
            ],
            fresh_window_ms: 30_000,
            generated_at_ms: 0,
        };
        let candidates = candidates_from_map(&map);
        let addrs: Vec<SocketAddr> = candidates.iter().map(|candidate| candidate.addr).collect();
        assert_eq!(addrs, vec![addr(4433), "[::1]:4433".parse().unwrap()]);
        assert!(candidates.iter().all(|candidate| candidate.edge_id == Some(edge) && candidate.weight.get() == 250));
    }
}
