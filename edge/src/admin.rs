//! The admin HTTP endpoint: `GET /healthz` for load balancers and orchestrators,
//! `GET /metrics` for Prometheus.
//!
//! It listens on `edge.admin_addr`, by default loopback only: it has no authentication
//! and says how busy the edge is. `/healthz` answers 200 only while the edge is serving,
//! so that a load balancer stops sending agents as soon as draining starts.

use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use crate::metrics::UPKEEP_INTERVAL;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// What the admin endpoint needs from the rest of the edge.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// `true` while the edge accepts agents; the server clears it when draining starts.
    pub ready: Arc<AtomicBool>,
    /// Renders the metrics page.
    pub metrics: PrometheusHandle,
}

/// Builds the admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serves the admin endpoint on `listener` until `shutdown` completes, then lets
/// in-flight requests finish. Also runs the metrics recorder's upkeep for as long as it
/// serves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "admin endpoint listening");
    }
    let handle = state.metrics.clone();
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(shutdown);
    tokio::select! {
        result = server.into_future() => result,
        never = run_upkeep(handle) => match never {},
    }
}

impl AdminState {
    pub fn new(ready: Arc<AtomicBool>, metrics: PrometheusHandle) -> Self {
        AdminState { ready, metrics }
    }
}

/// Body of `/healthz`.
#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'static str>,
}

async fn healthz(State(state): State<AdminState>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        let body = Health { status: "ok", version: Some(env!("CARGO_PKG_VERSION")) };
        (StatusCode::OK, Json(body)).into_response()
    } else {
        let body = Health { status: "draining", version: None };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let page = state.metrics.render();
    ([(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], page).into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound { path: uri.path().to_owned() }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Errors the admin endpoint answers with, as `{"code": …, "message": …}`.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("no such endpoint: {path}")]
    NotFound { path: String },
    #[error("method not allowed")]
    MethodNotAllowed,
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        };
        (status, Json(ErrorBody { code, message: self.to_string() })).into_response()
    }
}

async fn run_upkeep(handle: PrometheusHandle) -> Infallible {
    let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        handle.run_upkeep();
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;

    /// A running admin server, stopped by dropping `shutdown`'s sender.
    struct TestServer {
        address: SocketAddr,
        ready: Arc<AtomicBool>,
        shutdown: Option<oneshot::Sender<()>>,
        task: JoinHandle<std::io::Result<()>>,
    }

    #[derive(Debug)]
    struct HttpResponse {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl HttpResponse {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
        }
    }

    async fn start(handle: PrometheusHandle) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(true));
        let state = AdminState::new(ready.clone(), handle);
        let (sender, receiver) = oneshot::channel();
        let shutdown = async move {
            let _ = receiver.await;
        };
        let task = tokio::spawn(serve(listener, state, shutdown));
        TestServer { address, ready, shutdown: Some(sender), task }
    }

    /// A minimal HTTP/1.1 client: one request per connection, `Connection: close`.
    async fn request(address: SocketAddr, method: &str, path: &str) -> HttpResponse {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .expect("response within 10 s")
            .unwrap();
        let raw = String::from_utf8(raw).expect("utf-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("header terminator");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<_> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.trim().to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        let response = HttpResponse { status, headers, body: body.to_owned() };
        assert!(response.header("transfer-encoding").is_none(), "{response:?}");
        let length: usize = response.header("content-length").unwrap().parse().unwrap();
        assert_eq!(length, response.body.len());
        response
    }

    #[tokio::test]
    async fn healthz_follows_the_ready_flag() {
        let server = start(crate::metrics::recorder().handle()).await;

        let ok = request(server.address, "GET", "/healthz").await;
        assert_eq!(ok.status, 200);
        assert_eq!(ok.header("content-type"), Some("application/json"));
        assert_eq!(ok.body, format!(r#"{{"status":"ok","version":"{}"}}"#, env!("CARGO_PKG_VERSION")));

        server.ready.store(false, Ordering::Release);
        let draining = request(server.address, "GET", "/healthz").await;
        assert_eq!(draining.status, 503);
        assert_eq!(draining.body, r#"{"status":"draining"}"#);
    }

    #[tokio::test]
    async fn metrics_renders_the_recorder() {
        let recorder = crate::metrics::recorder();
        ::metrics::with_local_recorder(&recorder, || {
            ::metrics::counter!(crate::metrics::MESSAGES_DELIVERED_TOTAL).increment(7);
        });
        let server = start(recorder.handle()).await;
        let response = request(server.address, "GET", "/metrics").await;
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some(PROMETHEUS_CONTENT_TYPE));
        assert!(response.body.contains("molt_edge_messages_delivered_total 7\n"), "{}", response.body);
    }

    #[tokio::test]
    async fn unknown_paths_and_methods_get_json_errors() {
        let server = start(crate::metrics::recorder().handle()).await;
        let missing = request(server.address, "GET", "/admin/secrets").await;
        assert_eq!(missing.status, 404);
        assert_eq!(missing.header("content-type"), Some("application/json"));
        assert_eq!(missing.body, r#"{"code":"not_found","message":"no such endpoint: /admin/secrets"}"#);
        let wrong_method = request(server.address, "POST", "/healthz").await;
        assert_eq!(wrong_method.status, 405);
        assert!(wrong_method.body.contains(r#""code":"method_not_allowed""#));
    }

    #[tokio::test]
    async fn serve_returns_after_shutdown() {
        let mut server = start(crate::metrics::recorder().handle()).await;
        assert_eq!(request(server.address, "GET", "/healthz").await.status, 200);
        drop(server.shutdown.take());
        let result = tokio::time::timeout(Duration::from_secs(10), &mut server.task)
            .await
            .expect("server stops within 10 s")
            .expect("server task did not panic");
        assert!(result.is_ok(), "{result:?}");
        assert!(tokio::net::TcpStream::connect(server.address).await.is_err());
    }
}
