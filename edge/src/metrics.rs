//! The edge's metrics: names, descriptions and the Prometheus recorder.
//!
//! Code records through the `metrics` facade (`metrics::counter!(MESSAGES_RECEIVED_TOTAL)`)
//! using the constants below; names follow `molt_edge_<noun>_<unit>`, counters end in
//! `_total`, and every queue exports its depth next to its capacity. The binary installs
//! one global recorder with [`install_recorder`] and serves its handle on the admin
//! endpoint; tests build a private one with [`recorder`] and record into it with
//! [`::metrics::with_local_recorder`], so they never race for the global slot.
//!
//! Label values must come from a small fixed set (an error code, a refusal reason),
//! never from agent ids or addresses: every distinct value is a new time series.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Gauge: open agent connections.
pub const CONNECTIONS: &str = "molt_edge_connections";
/// Counter: messages accepted from agents.
pub const MESSAGES_RECEIVED_TOTAL: &str = "molt_edge_messages_received_total";
/// Counter: messages handed to a recipient's connection.
pub const MESSAGES_DELIVERED_TOTAL: &str = "molt_edge_messages_delivered_total";
/// Counter: messages whose signature or certificate failed verification.
pub const VERIFY_FAILURES_TOTAL: &str = "molt_edge_verify_failures_total";
/// Counter: messages refused by a rate limit.
pub const RATE_LIMITED_TOTAL: &str = "molt_edge_rate_limited_total";
/// Counter: messages rejected, labelled with [`LABEL_CODE`].
pub const REJECTED_TOTAL: &str = "molt_edge_rejected_total";
/// Gauge: messages in the offline buffer.
pub const BUFFER_MESSAGES: &str = "molt_edge_buffer_messages";
/// Gauge: messages the offline buffer may hold (`buffer.messages_max`).
pub const BUFFER_CAPACITY_MESSAGES: &str = "molt_edge_buffer_capacity_messages";
/// Gauge: payload bytes in the offline buffer.
pub const BUFFER_BYTES: &str = "molt_edge_buffer_bytes";
/// Gauge: payload bytes the offline buffer may hold (`buffer.bytes_max`).
pub const BUFFER_CAPACITY_BYTES: &str = "molt_edge_buffer_capacity_bytes";
/// Histogram: seconds from a message's arrival to its delivery.
pub const DELIVERY_LATENCY_SECONDS: &str = "molt_edge_delivery_latency_seconds";
/// Counter: connections refused, labelled with [`LABEL_REASON`].
pub const CONNECTIONS_REFUSED_TOTAL: &str = "molt_edge_connections_refused_total";

/// Counter: messages and receipts passed to other edges, labelled with [`LABEL_OUTCOME`].
pub const PEER_FORWARDED_TOTAL: &str = "molt_edge_peer_forwarded_total";
/// Counter: messages and receipts taken from other edges.
pub const PEER_RECEIVED_TOTAL: &str = "molt_edge_peer_received_total";
/// Counter: buffered records handed to the edge their recipient is connected to.
pub const HANDOFFS_TOTAL: &str = "molt_edge_handoffs_total";
/// Gauge: open links to other edges (dialled by this edge).
pub const PEER_LINKS: &str = "molt_edge_peer_links";

/// Label of [`REJECTED_TOTAL`]: the protocol error code sent to the agent.
pub const LABEL_CODE: &str = "code";
/// Label of [`CONNECTIONS_REFUSED_TOTAL`]: why the connection was refused.
pub const LABEL_REASON: &str = "reason";
/// Label of [`PEER_FORWARDED_TOTAL`]: `accepted`, `rejected` or `kept` (stored here
/// because the link failed).
pub const LABEL_OUTCOME: &str = "outcome";

/// Every metric name, for checks and dashboards.
pub const ALL: [&str; 16] = [
    CONNECTIONS,
    MESSAGES_RECEIVED_TOTAL,
    MESSAGES_DELIVERED_TOTAL,
    VERIFY_FAILURES_TOTAL,
    RATE_LIMITED_TOTAL,
    REJECTED_TOTAL,
    BUFFER_MESSAGES,
    BUFFER_CAPACITY_MESSAGES,
    BUFFER_BYTES,
    BUFFER_CAPACITY_BYTES,
    DELIVERY_LATENCY_SECONDS,
    CONNECTIONS_REFUSED_TOTAL,
    PEER_FORWARDED_TOTAL,
    PEER_RECEIVED_TOTAL,
    HANDOFFS_TOTAL,
    PEER_LINKS,
];

/// Bucket bounds of [`DELIVERY_LATENCY_SECONDS`]: 100 µs to 10 s.
pub const DELIVERY_LATENCY_BUCKETS_SECONDS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How often the recorder's upkeep should run (the admin server does it): it drains
/// histogram samples so memory stays bounded between scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Why the global metrics recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallRecorderError {
    #[error("failed to install the global metrics recorder: one is already installed")]
    AlreadyInstalled,
}

/// Installs the edge's Prometheus recorder as the process-wide recorder, registers the
/// metric descriptions, and returns the handle that renders the scrape page.
pub fn install_recorder() -> Result<PrometheusHandle, InstallRecorderError> {
    let handle = install_global()?;
    // Only the first successful installation reaches this point, so the slot is empty
    // unless `prometheus_handle` filled it with this same handle.
    let _ = GLOBAL_HANDLE.set(handle.clone());
    Ok(handle)
}

/// The global recorder's handle, installing the recorder on first use; for callers (like
/// an edge started several times in one process) that must not fail when it is already
/// installed. If some other recorder holds the global slot, the edge's metrics cannot be
/// collected: this logs a warning and returns the handle of an empty recorder.
pub fn prometheus_handle() -> PrometheusHandle {
    GLOBAL_HANDLE
        .get_or_init(|| {
            install_global().unwrap_or_else(|error| {
                tracing::warn!(%error, "metrics are not collected: a foreign recorder is installed");
                recorder().handle()
            })
        })
        .clone()
}

static GLOBAL_HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

fn install_global() -> Result<PrometheusHandle, InstallRecorderError> {
    let recorder = recorder();
    let handle = recorder.handle();
    ::metrics::set_global_recorder(recorder).map_err(|_| InstallRecorderError::AlreadyInstalled)?;
    describe();
    Ok(handle)
}

/// A recorder configured like the global one but not installed: for tests, with
/// [`::metrics::with_local_recorder`], and for embedding several edges in one process.
pub fn recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(DELIVERY_LATENCY_SECONDS.to_owned()), &DELIVERY_LATENCY_BUCKETS_SECONDS)
        // Invariant: the only error is an empty bucket list, and the list is a non-empty
        // constant.
        .expect("latency buckets are not empty")
        .build_recorder()
}

/// The totals and levels the edge reports to the control plane with its presence (the
/// control plane's `EdgeSummary` message): each metric of the scrape page summed over its
/// labels. The uptime is the caller's to fill in.
pub type Summary = crate::control::proto::EdgeSummary;

/// Reads a Prometheus text page (as [`PrometheusHandle::render`] writes it). Lines
/// that are not `name[{labels}] value` with a finite, non-negative value are skipped.
pub fn summary_from_page(page: &str) -> Summary {
    let mut summary = Summary::default();
    for line in page.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let name = series.split_once('{').map_or(series, |(name, _labels)| name);
        let Ok(value) = value.parse::<f64>() else { continue };
        if !value.is_finite() || value < 0.0 {
            continue;
        }
        // Counters and gauges here are whole numbers far below 2^53.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let value = value as u64;
        let slot = match name {
            CONNECTIONS => &mut summary.connections,
            MESSAGES_RECEIVED_TOTAL => &mut summary.messages_received,
            MESSAGES_DELIVERED_TOTAL => &mut summary.messages_delivered,
            REJECTED_TOTAL => &mut summary.messages_rejected,
            RATE_LIMITED_TOTAL => &mut summary.rate_limited,
            BUFFER_MESSAGES => &mut summary.buffered_messages,
            BUFFER_BYTES => &mut summary.buffered_bytes,
            PEER_LINKS => &mut summary.peer_links,
            PEER_FORWARDED_TOTAL => &mut summary.peer_forwarded,
            PEER_RECEIVED_TOTAL => &mut summary.peer_received,
            HANDOFFS_TOTAL => &mut summary.handoffs,
            _ => continue,
        };
        *slot = slot.saturating_add(value);
    }
    summary
}

/// Registers the unit and help text of every metric with the current recorder.
pub fn describe() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

    describe_gauge!(CONNECTIONS, Unit::Count, "Open agent connections.");
    describe_counter!(MESSAGES_RECEIVED_TOTAL, Unit::Count, "Messages accepted from agents.");
    describe_counter!(MESSAGES_DELIVERED_TOTAL, Unit::Count, "Messages handed to a recipient's connection.");
    describe_counter!(
        VERIFY_FAILURES_TOTAL,
        Unit::Count,
        "Messages whose signature or certificate failed verification."
    );
    describe_counter!(RATE_LIMITED_TOTAL, Unit::Count, "Messages refused by a rate limit.");
    describe_counter!(REJECTED_TOTAL, Unit::Count, "Messages rejected, by error code.");
    describe_gauge!(BUFFER_MESSAGES, Unit::Count, "Messages in the offline buffer.");
    describe_gauge!(BUFFER_CAPACITY_MESSAGES, Unit::Count, "Messages the offline buffer may hold.");
    describe_gauge!(BUFFER_BYTES, Unit::Bytes, "Payload bytes in the offline buffer.");
    describe_gauge!(BUFFER_CAPACITY_BYTES, Unit::Bytes, "Payload bytes the offline buffer may hold.");
    describe_histogram!(
        DELIVERY_LATENCY_SECONDS,
        Unit::Seconds,
        "Seconds from a message's arrival at the edge to its delivery."
    );
    describe_counter!(CONNECTIONS_REFUSED_TOTAL, Unit::Count, "Connections refused, by reason.");
    describe_counter!(PEER_FORWARDED_TOTAL, Unit::Count, "Messages and receipts passed to other edges, by outcome.");
    describe_counter!(PEER_RECEIVED_TOTAL, Unit::Count, "Messages and receipts taken from other edges.");
    describe_counter!(HANDOFFS_TOTAL, Unit::Count, "Buffered records handed to the recipient's current edge.");
    describe_gauge!(PEER_LINKS, Unit::Count, "Open links to other edges.");
}

const _: () = assert!(!DELIVERY_LATENCY_BUCKETS_SECONDS.is_empty());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention() {
        let mut seen = std::collections::BTreeSet::new();
        for name in ALL {
            assert!(name.starts_with("molt_edge_"), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{name}");
            assert!(seen.insert(name), "{name} is listed twice");
        }
        for counter in [
            MESSAGES_RECEIVED_TOTAL,
            MESSAGES_DELIVERED_TOTAL,
            VERIFY_FAILURES_TOTAL,
            RATE_LIMITED_TOTAL,
            REJECTED_TOTAL,
            CONNECTIONS_REFUSED_TOTAL,
        ] {
            assert!(counter.ends_with("_total"), "{counter}");
        }
    }

    #[test]
    fn buckets_are_increasing_from_100_microseconds_to_10_seconds() {
        let buckets = DELIVERY_LATENCY_BUCKETS_SECONDS;
        assert!(buckets.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!((buckets[0], buckets[buckets.len() - 1]), (0.0001, 10.0));
    }

    #[test]
    fn local_recorder_renders_descriptions_labels_and_buckets() {
        let recorder = recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            describe();
            ::metrics::counter!(MESSAGES_RECEIVED_TOTAL).increment(3);
            ::metrics::counter!(REJECTED_TOTAL, LABEL_CODE => "expired").increment(1);
            ::metrics::gauge!(BUFFER_CAPACITY_MESSAGES).set(1000.0);
            ::metrics::histogram!(DELIVERY_LATENCY_SECONDS).record(0.003);
        });
        let page = handle.render();
        assert!(page.contains("# HELP molt_edge_messages_received_total Messages accepted"), "{page}");
        assert!(page.contains("molt_edge_messages_received_total 3\n"), "{page}");
        assert!(page.contains("molt_edge_rejected_total{code=\"expired\"} 1\n"), "{page}");
        assert!(page.contains("molt_edge_buffer_capacity_messages 1000\n"), "{page}");
        assert!(page.contains("molt_edge_delivery_latency_seconds_bucket{le=\"0.0025\"} 0\n"), "{page}");
        assert!(page.contains("molt_edge_delivery_latency_seconds_bucket{le=\"0.005\"} 1\n"), "{page}");
        assert!(page.contains("molt_edge_delivery_latency_seconds_count 1\n"), "{page}");
    }

    #[test]
    fn a_summary_sums_each_metric_over_its_labels() {
        let recorder = recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            describe();
            ::metrics::counter!(MESSAGES_RECEIVED_TOTAL).increment(7);
            ::metrics::counter!(REJECTED_TOTAL, LABEL_CODE => "expired").increment(2);
            ::metrics::counter!(REJECTED_TOTAL, LABEL_CODE => "bad_signature").increment(3);
            ::metrics::counter!(PEER_FORWARDED_TOTAL, LABEL_OUTCOME => "stored").increment(4);
            ::metrics::gauge!(CONNECTIONS).set(5.0);
            ::metrics::gauge!(BUFFER_BYTES).set(4096.0);
            ::metrics::histogram!(DELIVERY_LATENCY_SECONDS).record(0.003);
        });
        let summary = summary_from_page(&handle.render());
        assert_eq!(
            summary,
            Summary {
                connections: 5,
                messages_received: 7,
                messages_rejected: 5,
                buffered_bytes: 4096,
                peer_forwarded: 4,
                ..Summary::default()
            }
        );
        let odd = "molt_edge_connections NaN\nmolt_edge_connections -3\nmolt_edge_handoffs_total\nmolt_edge_handoffs_total 2\n";
        assert_eq!(summary_from_page(odd), Summary { handoffs: 2, ..Summary::default() });
    }

    #[test]
    fn local_recorders_are_independent() {
        let first = recorder();
        let second = recorder();
        ::metrics::with_local_recorder(&first, || {
            ::metrics::counter!(RATE_LIMITED_TOTAL).increment(1);
        });
        assert!(first.handle().render().contains(RATE_LIMITED_TOTAL));
        assert!(!second.handle().render().contains(RATE_LIMITED_TOTAL));
    }

    #[test]
    fn the_global_recorder_installs_once() {
        // Another test in this binary may have installed it first; either way a second
        // installation must fail.
        let _first = install_recorder();
        assert!(matches!(install_recorder(), Err(InstallRecorderError::AlreadyInstalled)));
        // Whoever installed it, the shared handle is stable and renders.
        let handle = prometheus_handle();
        let _page = handle.render();
        let _same = prometheus_handle();
    }
}
