//! The control plane's metrics: names, descriptions and a Prometheus recorder.
//!
//! The recorder is not installed globally: [`Metrics`] owns one, handlers record into it
//! with [`Metrics::record`], and `/metrics` renders it. So tests and several services
//! in one process never share a registry. Names follow `molt_control_plane_<noun>_<unit>`;
//! label values come from small fixed sets (route templates, methods, status codes).

use std::fmt;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Counter: HTTP requests answered, by `route`, `method` and `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "molt_control_plane_http_requests_total";
/// Histogram: seconds to answer an HTTP request, by `route` and `method`.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "molt_control_plane_http_request_duration_seconds";
/// Gauge: open database connections.
pub const DATABASE_CONNECTIONS: &str = "molt_control_plane_database_connections";
/// Gauge: idle database connections.
pub const DATABASE_CONNECTIONS_IDLE: &str = "molt_control_plane_database_connections_idle";
/// Gauge: database connections the pool may open (`database.max_connections`).
pub const DATABASE_CONNECTIONS_CAPACITY: &str = "molt_control_plane_database_connections_capacity";

/// Every metric name.
pub const ALL: [&str; 5] = [
    HTTP_REQUESTS_TOTAL,
    HTTP_REQUEST_DURATION_SECONDS,
    DATABASE_CONNECTIONS,
    DATABASE_CONNECTIONS_IDLE,
    DATABASE_CONNECTIONS_CAPACITY,
];

/// Bucket bounds of [`HTTP_REQUEST_DURATION_SECONDS`]: 1 ms to 10 s.
pub const HTTP_REQUEST_DURATION_BUCKETS_SECONDS: [f64; 13] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How often the recorder's upkeep runs: it drains histogram samples so memory stays
/// bounded between scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

const _: () = assert!(!HTTP_REQUEST_DURATION_BUCKETS_SECONDS.is_empty());

/// A private Prometheus registry.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(HTTP_REQUEST_DURATION_SECONDS.to_owned()),
                &HTTP_REQUEST_DURATION_BUCKETS_SECONDS,
            )
            // Invariant: the only error is an empty bucket list, and the list is a
            // non-empty constant.
            .expect("duration buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let metrics = Metrics { recorder, handle };
        metrics.record(describe);
        metrics
    }

    /// Runs `record` with this registry as the `metrics` facade's recorder.
    pub fn record<T>(&self, record: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, record)
    }

    /// The Prometheus text page.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

    describe_counter!(HTTP_REQUESTS_TOTAL, Unit::Count, "HTTP requests answered, by route, method and status.");
    describe_histogram!(HTTP_REQUEST_DURATION_SECONDS, Unit::Seconds, "Seconds to answer an HTTP request.");
    describe_gauge!(DATABASE_CONNECTIONS, Unit::Count, "Open database connections.");
    describe_gauge!(DATABASE_CONNECTIONS_IDLE, Unit::Count, "Idle database connections.");
    describe_gauge!(DATABASE_CONNECTIONS_CAPACITY, Unit::Count, "Database connections the pool may open.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention() {
        for name in ALL {
            assert!(name.starts_with("molt_control_plane_"), "{name}");
        }
        let metrics = Metrics::new();
        metrics.record(|| metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => "/healthz").increment(2));
        let page = metrics.render();
        assert!(page.contains("molt_control_plane_http_requests_total{route=\"/healthz\"} 2"), "{page}");
    }
}
