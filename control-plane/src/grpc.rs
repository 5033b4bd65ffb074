//! The gRPC service edges call (`molt.edge.v1.EdgeControl`, `proto/`), over mutual TLS.
//!
//! **Transport.** TCP, then TLS 1.3 built by [`molt_protocol::tls::server_config`] with ALPN
//! `h2`: the client must present an edge certificate that chains to the trust bundle's
//! root and is not revoked ([`ExpectedRole::AnyEdge`]). Agent certificates and clients
//! without a certificate fail the handshake. The authenticated edge id (from the peer
//! certificate) is attached to every request; no message carries an edge id.
//!
//! **The server's identity** is an edge-role certificate issued at start by the CA to a
//! fresh key, under the reserved org [`CONTROL_PLANE_ORG`] (created on first use), so an
//! edge verifies it with `tls::client_config(.., ExpectedRole::AnyEdge, b"h2")`.
//!
//! **Trust stream.** Several replicas share one database, so a bundle change made by
//! another replica is only seen by polling: `WatchTrust` and the server's own revocation
//! list re-read `ca_state.bundle_sequence` every [`TRUST_POLL_INTERVAL`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use molt_protocol::cert::{ExpectedRole, Revocations, Role, Serial, TrustAnchors};
use molt_protocol::ids::{AgentId, EdgeId};
use molt_protocol::keys::{PublicKey, Signature, SigningKey};
use molt_protocol::time::UnixMillis;
use molt_protocol::tls::{self, SharedRevocations, TlsIdentity};
use sqlx::Row as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::ca::{self, Authority, LeafKind, LeafOptions, PossessionProof, TrustBundle};
use crate::clock::Clock;
use crate::db::Database;
use crate::ids::OrgId;
use crate::model::OrgName;

/// Generated messages, client and server.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("molt.edge.v1");
}

use proto::edge_control_server::{EdgeControl, EdgeControlServer};

/// How often trust watchers and the server's revocation list re-read the bundle sequence.
pub const TRUST_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Updates buffered per `WatchTrust` stream before the watcher waits for the edge.
pub const WATCH_QUEUE_DEPTH: usize = 4;
/// Handshaken connections waiting for the HTTP/2 server.
pub const ACCEPT_QUEUE_DEPTH: usize = 64;
/// A client that has not finished the TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Limits on requests.
pub const REGION_BYTES_MAX: usize = 64;
pub const VERSION_BYTES_MAX: usize = 64;
pub const QUIC_ADDRS_MAX: usize = 16;
pub const PRESENCE_AGENTS_MAX: usize = 100_000;
/// An edge that has not registered or reported presence for this long is not named as
/// any agent's home edge.
pub const PRESENCE_STALE_AFTER: Duration = Duration::from_secs(120);

impl From<&proto::EdgeSummary> for crate::edge_map::EdgeSummary {
    fn from(summary: &proto::EdgeSummary) -> Self {
        crate::edge_map::EdgeSummary {
            uptime_ms: summary.uptime_ms,
            connections: summary.connections,
            messages_received: summary.messages_received,
            messages_delivered: summary.messages_delivered,
            messages_rejected: summary.messages_rejected,
            rate_limited: summary.rate_limited,
            buffered_messages: summary.buffered_messages,
            buffered_bytes: summary.buffered_bytes,
            peer_links: summary.peer_links,
            peer_forwarded: summary.peer_forwarded,
            peer_received: summary.peer_received,
            handoffs: summary.handoffs,
        }
    }
}

/// The edge that last reported `agent` as connected to it, if one did (whether that edge
/// is still alive is not checked). For tools that wait until presence has propagated.
pub async fn reported_home_edge(db: &Database, agent: AgentId) -> Result<Option<String>, sqlx::Error> {
    let row = sqlx::query("SELECT edge_id FROM edge_presence WHERE agent_id = $1")
        .bind(agent.to_string())
        .fetch_optional(db.pool())
        .await?;
    row.map(|row| row.try_get("edge_id")).transpose()
}
/// The reserved org under which the control plane's own TLS certificate is issued.
pub const CONTROL_PLANE_ORG: &str = "molt-control-plane";
/// ALPN of gRPC over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// Why the gRPC server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcStartError {
    #[error("failed to start the gRPC server: {0}")]
    Setup(String),
    #[error("failed to start the gRPC server: binding the listener")]
    Bind(#[source] io::Error),
}

/// A running gRPC server; stops when dropped.
#[derive(Debug)]
pub struct GrpcServer {
    local_addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl GrpcServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and ends every connection.
    pub fn shutdown(mut self) {
        self.tasks.abort_all();
    }
}

/// Issues the control plane's TLS identity (see the module docs): a fresh key, an
/// edge-role certificate under [`CONTROL_PLANE_ORG`], and that org's CA.
pub async fn issue_server_identity(
    db: &Database,
    authority: &Authority,
    now: UnixMillis,
) -> Result<TlsIdentity, GrpcStartError> {
    let org = control_plane_org(db, now).await?;
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let public_key = key.public_key();
    let signature = key.sign(&ca::proof_message(LeafKind::Edge, &org, &public_key, now));
    let proof = PossessionProof::verify(LeafKind::Edge, &org, &public_key, now, &signature, now)
        .map_err(|error| GrpcStartError::Setup(format!("proving the server key: {error}")))?;
    let issued = authority
        .issue(db, &proof, &[], now)
        .await
        .map_err(|error| GrpcStartError::Setup(format!("issuing the server certificate: {error}")))?;
    Ok(TlsIdentity { chain: vec![issued.certificate, issued.org_ca], key })
}

/// Binds `addr` and serves `EdgeControl` with `identity` as the server certificate.
pub async fn serve(
    addr: SocketAddr,
    identity: &TlsIdentity,
    db: Database,
    authority: Arc<Authority>,
    clock: Arc<dyn Clock>,
) -> Result<GrpcServer, GrpcStartError> {
    let bundle = authority
        .trust_bundle(&db, clock.now())
        .await
        .map_err(|error| GrpcStartError::Setup(format!("reading the trust bundle: {error}")))?;
    let anchors = TrustAnchors::new(bundle.roots.clone())
        .map_err(|error| GrpcStartError::Setup(format!("building trust anchors: {error}")))?;
    let revocations: SharedRevocations = Arc::new(RwLock::new(revocations_of(&bundle)));
    let config =
        tls::server_config(identity, Arc::new(anchors), Arc::clone(&revocations), ExpectedRole::AnyEdge, ALPN_H2)
            .map_err(|error| GrpcStartError::Setup(format!("building the TLS configuration: {error}")))?;
    let listener = TcpListener::bind(addr).await.map_err(GrpcStartError::Bind)?;
    let local_addr = listener.local_addr().map_err(GrpcStartError::Bind)?;

    let (connections, incoming) = mpsc::channel::<io::Result<EdgeStream>>(ACCEPT_QUEUE_DEPTH);
    let mut tasks = JoinSet::new();
    tasks.spawn(accept_loop(listener, TlsAcceptor::from(Arc::new(config)), connections));
    tasks.spawn(refresh_revocations(
        db.clone(),
        Arc::clone(&authority),
        Arc::clone(&clock),
        revocations,
        bundle.sequence,
    ));
    let service = EdgeControlService { db, authority, clock };
    tasks.spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(EdgeControlServer::new(service))
            .serve_with_incoming(ReceiverStream::new(incoming))
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "gRPC server stopped");
        }
    });
    tracing::info!(%local_addr, "gRPC server for edges listening");
    Ok(GrpcServer { local_addr, tasks })
}

/// The edge a connection authenticated as, and the serial of the certificate it
/// presented; in every request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthenticatedEdge(pub EdgeId, pub Serial);

/// A handshaken TLS stream and the edge its certificate names.
#[derive(Debug)]
pub struct EdgeStream {
    inner: TlsStream<TcpStream>,
    edge: EdgeId,
    serial: Serial,
}

impl Connected for EdgeStream {
    type ConnectInfo = AuthenticatedEdge;

    fn connect_info(&self) -> AuthenticatedEdge {
        AuthenticatedEdge(self.edge, self.serial)
    }
}

impl AsyncRead for EdgeStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct EdgeControlService {
    db: Database,
    authority: Arc<Authority>,
    clock: Arc<dyn Clock>,
}

#[tonic::async_trait]
impl EdgeControl for EdgeControlService {
    type WatchTrustStream = ReceiverStream<Result<proto::TrustUpdate, Status>>;

    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let edge = caller(&request)?;
        let request = request.into_inner();
        if request.region.is_empty() || request.region.len() > REGION_BYTES_MAX {
            return Err(Status::invalid_argument(format!("region must be 1 to {REGION_BYTES_MAX} bytes")));
        }
        if request.version.len() > VERSION_BYTES_MAX {
            return Err(Status::invalid_argument(format!("version must be at most {VERSION_BYTES_MAX} bytes")));
        }
        if request.quic_addrs.len() > QUIC_ADDRS_MAX {
            return Err(Status::invalid_argument(format!("at most {QUIC_ADDRS_MAX} QUIC addresses")));
        }
        if request.peer_addrs.len() > QUIC_ADDRS_MAX {
            return Err(Status::invalid_argument(format!("at most {QUIC_ADDRS_MAX} peer addresses")));
        }
        let all_addrs = request.quic_addrs.iter().chain(&request.peer_addrs);
        if let Some(bad) = all_addrs.into_iter().find(|addr| addr.parse::<SocketAddr>().is_err()) {
            return Err(Status::invalid_argument(format!("{bad:?} is not a host:port socket address")));
        }
        let now = to_db(self.clock.now());
        let addrs = serde_json::to_string(&request.quic_addrs).map_err(|_| Status::internal("encoding addresses"))?;
        let peer_addrs =
            serde_json::to_string(&request.peer_addrs).map_err(|_| Status::internal("encoding addresses"))?;
        sqlx::query(
            "INSERT INTO edges (id, region, quic_addrs, version, registered_at_ms, last_seen_ms, peer_addrs) \
             VALUES ($1, $2, $3, $4, $5, $5, $6) ON CONFLICT (id) DO UPDATE SET region = $2, quic_addrs = $3, \
             version = $4, last_seen_ms = $5, peer_addrs = $6",
        )
        .bind(edge.to_string())
        .bind(request.region.clone())
        .bind(addrs)
        .bind(request.version)
        .bind(now)
        .bind(peer_addrs)
        .execute(self.db.pool())
        .await
        .map_err(internal("recording the edge"))?;
        let sequence = bundle_sequence(&self.db).await.map_err(internal("reading the bundle sequence"))?;
        tracing::info!(edge = %edge, region = %request.region, "edge registered");
        Ok(Response::new(proto::RegisterResponse { edge_id: edge.to_string(), trust_bundle_sequence: sequence }))
    }

    async fn watch_trust(
        &self,
        request: Request<proto::WatchTrustRequest>,
    ) -> Result<Response<Self::WatchTrustStream>, Status> {
        let edge = caller(&request)?;
        let after = request.into_inner().after_sequence;
        let (updates, stream) = mpsc::channel(WATCH_QUEUE_DEPTH);
        // Owned by the stream: it ends when the edge goes away and `send` fails.
        tokio::spawn(watch_trust(
            self.db.clone(),
            Arc::clone(&self.authority),
            Arc::clone(&self.clock),
            after,
            updates,
        ));
        tracing::debug!(edge = %edge, after, "trust watch started");
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn report_presence(
        &self,
        request: Request<proto::PresenceReport>,
    ) -> Result<Response<proto::PresenceAck>, Status> {
        let edge = caller(&request)?;
        let report = request.into_inner();
        if report.connected_agents.len() > PRESENCE_AGENTS_MAX {
            return Err(Status::invalid_argument(format!("at most {PRESENCE_AGENTS_MAX} agents per report")));
        }
        let agents =
            report.connected_agents.iter().map(|text| parse_agent(text)).collect::<Result<Vec<AgentId>, Status>>()?;
        let now = to_db(self.clock.now());
        let mut transaction = self.db.begin().await.map_err(|_| Status::internal("starting a transaction"))?;
        let seen = sqlx::query("UPDATE edges SET last_seen_ms = $1 WHERE id = $2")
            .bind(now)
            .bind(edge.to_string())
            .execute(&mut *transaction)
            .await
            .map_err(internal("refreshing the edge"))?
            .rows_affected();
        if seen == 0 {
            return Err(Status::failed_precondition("the edge must call Register first"));
        }
        if let Some(summary) = &report.summary {
            crate::edge_map::record_summary(&mut transaction, edge, &summary.into(), self.clock.now())
                .await
                .map_err(internal("recording the metrics summary"))?;
        }
        sqlx::query("DELETE FROM edge_presence WHERE edge_id = $1")
            .bind(edge.to_string())
            .execute(&mut *transaction)
            .await
            .map_err(internal("clearing presence"))?;
        for agent in &agents {
            sqlx::query(
                "INSERT INTO edge_presence (agent_id, edge_id, reported_at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (agent_id) DO UPDATE SET edge_id = $2, reported_at_ms = $3",
            )
            .bind(agent.to_string())
            .bind(edge.to_string())
            .bind(now)
            .execute(&mut *transaction)
            .await
            .map_err(internal("recording presence"))?;
        }
        crate::registry::renew_by_presence(&mut transaction, &agents, self.clock.now()).await.map_err(|error| {
            tracing::error!(error = %error, "gRPC request failed");
            Status::internal("renewing registrations")
        })?;
        transaction.commit().await.map_err(internal("recording presence"))?;
        let accepted = u32::try_from(agents.len()).unwrap_or(u32::MAX);
        Ok(Response::new(proto::PresenceAck { accepted }))
    }

    async fn renew_certificate(
        &self,
        request: Request<proto::RenewCertificateRequest>,
    ) -> Result<Response<proto::RenewCertificateResponse>, Status> {
        let edge = caller_certificate(&request)?;
        let request = request.into_inner();
        let public_key = PublicKey::from_slice(&request.public_key)
            .map_err(|_| Status::invalid_argument("public_key is not a 32-byte Ed25519 public key"))?;
        let signature = Signature::from_slice(&request.signature)
            .ok_or_else(|| Status::invalid_argument("signature is not a 64-byte Ed25519 signature"))?;
        let current = current_certificate(&self.db, edge).await?;
        let now = self.clock.now();
        let proof = PossessionProof::verify(
            LeafKind::Edge,
            &current.org,
            &public_key,
            UnixMillis(request.timestamp_ms),
            &signature,
            now,
        )
        .map_err(|error| Status::invalid_argument(format!("proof of possession refused: {error}")))?;
        let options = LeafOptions { lifetime: current.lifetime, edge_id: Some(edge.0) };
        let issued = self.authority.issue_with(&self.db, &proof, &options, &[], now).await.map_err(|error| {
            tracing::error!(%error, "gRPC RenewCertificate failed");
            Status::internal("issuing the certificate")
        })?;
        let not_after_ms = issued.certificate.validity().not_after.0;
        tracing::info!(edge = %edge.0, old = %edge.1, new = %issued.certificate.serial(), "edge certificate renewed");
        Ok(Response::new(proto::RenewCertificateResponse {
            chain: vec![issued.certificate.der().to_vec(), issued.org_ca.der().to_vec()],
            not_after_ms,
        }))
    }

    async fn lookup_agent(
        &self,
        request: Request<proto::LookupAgentRequest>,
    ) -> Result<Response<proto::LookupAgentResponse>, Status> {
        caller(&request)?;
        let agent = parse_agent(&request.into_inner().agent_id)?;
        let registered = crate::registry::agent(&self.db, agent).await.map_err(|error| {
            tracing::error!(%error, "gRPC LookupAgent failed");
            Status::internal("reading the registry")
        })?;
        if registered.as_ref().is_some_and(|agent| agent.revoked_at.is_some()) {
            return Ok(Response::new(proto::LookupAgentResponse::default()));
        }
        // An edge silent for longer than PRESENCE_STALE_AFTER is taken to be gone.
        let seen_since = to_db(self.clock.now()).saturating_sub(PRESENCE_STALE_AFTER.as_millis() as i64);
        let row = sqlx::query(
            "SELECT p.edge_id AS edge_id, e.quic_addrs AS quic_addrs, e.peer_addrs AS peer_addrs \
             FROM edge_presence p JOIN edges e ON e.id = p.edge_id WHERE p.agent_id = $1 AND e.last_seen_ms >= $2",
        )
        .bind(agent.to_string())
        .bind(seen_since)
        .fetch_optional(self.db.pool())
        .await
        .map_err(internal("reading presence"))?;
        let Some(row) = row else { return Ok(Response::new(proto::LookupAgentResponse::default())) };
        let home_edge_id: String = row.try_get("edge_id").map_err(internal("reading presence"))?;
        let addrs: String = row.try_get("quic_addrs").map_err(internal("reading presence"))?;
        let edge_quic_addrs: Vec<String> =
            serde_json::from_str(&addrs).map_err(|_| Status::internal("reading edge addresses"))?;
        let peer_addrs: String = row.try_get("peer_addrs").map_err(internal("reading presence"))?;
        let edge_peer_addrs: Vec<String> =
            serde_json::from_str(&peer_addrs).map_err(|_| Status::internal("reading edge addresses"))?;
        let key_binding = registered.and_then(|agent| agent.profile.key_binding).map(|b| b.encode());
        Ok(Response::new(proto::LookupAgentResponse {
            found: true,
            home_edge_id,
            edge_quic_addrs,
            key_binding: key_binding.unwrap_or_default(),
            edge_peer_addrs,
        }))
    }
}

/// The renewing edge's current certificate as the CA recorded it.
struct CurrentCertificate {
    org: OrgId,
    lifetime: Duration,
}

async fn current_certificate(db: &Database, edge: AuthenticatedEdge) -> Result<CurrentCertificate, Status> {
    let row = sqlx::query(
        "SELECT org_id, kind, subject_id, not_after_ms, created_at_ms, revoked_at_ms FROM certificates WHERE serial = $1",
    )
    .bind(edge.1.to_string())
    .fetch_optional(db.pool())
    .await
    .map_err(internal("reading the current certificate"))?
    .ok_or_else(|| Status::permission_denied("the presented certificate was not issued by this control plane"))?;
    let read = internal("reading the current certificate");
    let kind: String = row.try_get("kind").map_err(read)?;
    let subject: String = row.try_get("subject_id").map_err(read)?;
    let revoked: Option<i64> = row.try_get("revoked_at_ms").map_err(read)?;
    if kind != LeafKind::Edge.as_str() || subject != edge.0.to_string() || revoked.is_some() {
        return Err(Status::permission_denied("the presented certificate cannot be renewed"));
    }
    let not_after: i64 = row.try_get("not_after_ms").map_err(read)?;
    let created: i64 = row.try_get("created_at_ms").map_err(read)?;
    let org: String = row.try_get("org_id").map_err(read)?;
    let lifetime = Duration::from_millis(u64::try_from(not_after.saturating_sub(created)).unwrap_or(0))
        .clamp(crate::enrollment::CERTIFICATE_VALIDITY_MIN, ca::LEAF_VALIDITY);
    Ok(CurrentCertificate {
        org: org.parse().map_err(|_| Status::internal("reading the current certificate"))?,
        lifetime,
    })
}

fn caller<T>(request: &Request<T>) -> Result<EdgeId, Status> {
    caller_certificate(request).map(|edge| edge.0)
}

fn caller_certificate<T>(request: &Request<T>) -> Result<AuthenticatedEdge, Status> {
    request
        .extensions()
        .get::<AuthenticatedEdge>()
        .copied()
        .ok_or_else(|| Status::unauthenticated("no edge certificate on this connection"))
}

fn parse_agent(text: &str) -> Result<AgentId, Status> {
    text.parse().map_err(|_| Status::invalid_argument(format!("{text:?} is not an agent id")))
}

fn internal(operation: &'static str) -> impl Fn(sqlx::Error) -> Status + Copy {
    move |error| {
        tracing::error!(%error, operation, "gRPC request failed");
        Status::internal(operation)
    }
}

async fn watch_trust(
    db: Database,
    authority: Arc<Authority>,
    clock: Arc<dyn Clock>,
    mut last: u64,
    updates: mpsc::Sender<Result<proto::TrustUpdate, Status>>,
) {
    loop {
        match bundle_sequence(&db).await {
            Ok(sequence) if sequence > last => match authority.trust_bundle(&db, clock.now()).await {
                // The bundle read may be newer than the sequence polled; never go back.
                Ok(bundle) if bundle.sequence > last => {
                    last = bundle.sequence;
                    if updates.send(Ok(trust_update(&bundle))).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "trust watch: reading the bundle failed"),
            },
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "trust watch: reading the sequence failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(TRUST_POLL_INTERVAL) => {}
            () = updates.closed() => return,
        }
    }
}

async fn refresh_revocations(
    db: Database,
    authority: Arc<Authority>,
    clock: Arc<dyn Clock>,
    revocations: SharedRevocations,
    mut last: u64,
) {
    loop {
        tokio::time::sleep(TRUST_POLL_INTERVAL).await;
        let Ok(sequence) = bundle_sequence(&db).await else { continue };
        if sequence <= last {
            continue;
        }
        match authority.trust_bundle(&db, clock.now()).await {
            Ok(bundle) => {
                last = bundle.sequence;
                *revocations.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = revocations_of(&bundle);
            }
            Err(error) => tracing::warn!(%error, "gRPC server: refreshing revocations failed"),
        }
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, connections: mpsc::Sender<io::Result<EdgeStream>>) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let acceptor = acceptor.clone();
                    let connections = connections.clone();
                    handshakes.spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, tcp)).await {
                            Ok(Ok(stream)) => {
                                let _ = connections.send(Ok(stream)).await;
                            }
                            Ok(Err(error)) => tracing::debug!(%peer, %error, "gRPC TLS handshake refused"),
                            Err(_) => tracing::debug!(%peer, "gRPC TLS handshake timed out"),
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = handshakes.join_next() => {}
        }
    }
}

async fn handshake(acceptor: &TlsAcceptor, tcp: TcpStream) -> io::Result<EdgeStream> {
    let stream = acceptor.accept(tcp).await?;
    let (_, connection) = stream.get_ref();
    let certificate = connection.peer_certificates().and_then(tls::peer_identity);
    match certificate.map(|certificate| (certificate.role(), certificate.serial())) {
        Some((Role::Edge(edge), serial)) => Ok(EdgeStream { inner: stream, edge, serial }),
        _ => Err(io::Error::new(io::ErrorKind::PermissionDenied, "the peer is not an edge")),
    }
}

fn revocations_of(bundle: &TrustBundle) -> Revocations {
    let mut revocations = Revocations::default();
    for crl in &bundle.crls {
        revocations.extend_from(crl);
    }
    revocations
}

fn trust_update(bundle: &TrustBundle) -> proto::TrustUpdate {
    proto::TrustUpdate {
        sequence: bundle.sequence,
        roots: bundle.roots.iter().map(|c| c.der().to_vec()).collect(),
        org_cas: bundle.org_cas.iter().map(|c| c.der().to_vec()).collect(),
        crls: bundle.crls.iter().map(|crl| crl.der().to_vec()).collect(),
    }
}

async fn bundle_sequence(db: &Database) -> Result<u64, sqlx::Error> {
    let sequence: i64 = sqlx::query("SELECT bundle_sequence FROM ca_state WHERE id = 1")
        .fetch_one(db.pool())
        .await?
        .try_get("bundle_sequence")?;
    Ok(u64::try_from(sequence).unwrap_or(0))
}

async fn control_plane_org(db: &Database, now: UnixMillis) -> Result<OrgId, GrpcStartError> {
    let setup = |error: &dyn std::fmt::Display| GrpcStartError::Setup(format!("the control-plane org: {error}"));
    let name = OrgName::new(CONTROL_PLANE_ORG).map_err(|error| setup(&error))?;
    match db.create_org(&name, now).await {
        Ok(org) => return Ok(org.id),
        Err(crate::db::CreateOrgError::NameTaken) => {}
        Err(error) => return Err(setup(&error)),
    }
    let id: String = sqlx::query("SELECT id FROM orgs WHERE name = $1")
        .bind(CONTROL_PLANE_ORG)
        .fetch_one(db.pool())
        .await
        .and_then(|row| row.try_get("id"))
        .map_err(|error| setup(&error))?;
    id.parse().map_err(|error| setup(&error))
}

fn to_db(time: UnixMillis) -> i64 {
    i64::try_from(time.0).unwrap_or(i64::MAX)
}
