//! The edge's link to the control plane (`molt.edge.v1.EdgeControl` over gRPC with mutual
//! TLS, the edge's own certificate as client certificate).
//!
//! One task owns the link. Each connection: `Register` (region, QUIC address, version),
//! then `WatchTrust` from the sequence held, while presence is reported when the set of
//! connected agents changes (checked every [`PRESENCE_CHECK_INTERVAL`]) and at least every
//! `presence_interval`, and the certificate is renewed once less than
//! `renew_at_remaining_percent` of its lifetime is left. Any failure ends the connection;
//! the task waits a back-off (doubling from `reconnect_backoff_min` to
//! `reconnect_backoff_max`, with jitter) and starts again, from the sequence it holds, so
//! it catches up with what it missed. Meanwhile the edge keeps relaying with the bundle it
//! holds (also cached on disk, [`crate::trust`]).
//!
//! A trust update is applied by [`TrustKeeper::offer`]: an older sequence is refused and
//! logged (rollback), a newer one replaces the verifier's roots and revocations, is cached,
//! and every live connection whose certificate is now revoked is closed with
//! [`crate::relay::close_code::REVOKED`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use molt_protocol::cert::{Certificate, ExpectedRole, Role};
use molt_protocol::ids::{AgentId, EdgeId};
use molt_protocol::keys::{Signer, SigningKey};
use molt_protocol::request::{EDGE_PROOF_DOMAIN, possession_message};
use molt_protocol::tls::{self, SignerTlsIdentity};
use molt_protocol::{UnixMillis, cert::TrustAnchors};
use rand::Rng as _;
use rustls::pki_types::ServerName;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::config::ControlPlaneConfig;
use crate::live::{LiveConnections, LiveTls};
use crate::relay::Relay;
use crate::trust::{Bundle, BundleError, Decision, decide, write_atomically};

/// Generated gRPC client.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("molt.edge.v1");
}

use proto::edge_control_client::EdgeControlClient;

/// How often the set of connected agents is compared with the last one reported.
pub const PRESENCE_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// Longest wait for the TCP and TLS handshakes with the control plane.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for one unary call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on an idle link, so a vanished control plane is noticed.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most agents named in one presence report (the control plane's limit).
pub const PRESENCE_AGENTS_MAX: usize = 100_000;
/// Prefix of an org CA's common name; the org id is `org_` and the rest.
pub const ORG_CA_NAME_PREFIX: &str = "Molt org CA ";
/// ALPN of gRPC over TLS.
const ALPN_H2: &[u8] = b"h2";

/// The running link; stops when dropped.
#[derive(Debug)]
pub struct ControlLink {
    task: JoinHandle<()>,
}

impl Drop for ControlLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the link works on.
#[derive(Debug)]
pub struct LinkContext {
    pub config: ControlPlaneConfig,
    pub edge_id: EdgeId,
    pub region: String,
    pub quic_addr: SocketAddr,
    pub chain_path: PathBuf,
    pub tls: Arc<LiveTls>,
    pub trust: Arc<TrustKeeper>,
    pub relay: Arc<Relay>,
    /// Where other edges reach this one (`[federation]`), if it takes links.
    pub peer_addr: Option<SocketAddr>,
    /// The connected client, shared with the presence lookups of edge-to-edge routing.
    pub client: Arc<ControlClient>,
    /// Where the edge's key lives: a key file is replaced at every renewal.
    pub key: crate::config::KeySource,
    /// The edge's metrics, summarised into every presence report.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// When the edge started, for the summary's uptime.
    pub started: Instant,
}

/// The control plane's gRPC client while the link is up; `None` while it is down, so
/// lookups fail at once instead of waiting for a dead connection.
#[derive(Debug, Default)]
pub struct ControlClient(std::sync::RwLock<Option<EdgeControlClient<Channel>>>);

impl ControlClient {
    pub fn get(&self) -> Option<EdgeControlClient<Channel>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, client: Option<EdgeControlClient<Channel>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = client;
    }
}

impl ControlLink {
    pub fn spawn(context: LinkContext) -> ControlLink {
        ControlLink { task: tokio::spawn(run(Arc::new(context))) }
    }
}

/// Why one connection of the link ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error("control plane link: connecting: {0}")]
    Connect(String),
    #[error("control plane link: {call} failed: {status}")]
    Call { call: &'static str, status: Box<tonic::Status> },
    #[error("control plane link: {call} timed out")]
    Timeout { call: &'static str },
    #[error("control plane link: the trust stream ended")]
    StreamEnded,
    #[error("control plane link: renewal: {0}")]
    Renewal(String),
}

/// Holds the trust bundle in force and applies updates to it.
#[derive(Debug)]
pub struct TrustKeeper {
    held: Mutex<Option<u64>>,
    cache: PathBuf,
    tls: Arc<LiveTls>,
    connections: Arc<LiveConnections>,
}

/// Why an offered bundle was not applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    #[error("trust update refused: sequence {offered} is older than the {held} held (rollback)")]
    Rollback { held: u64, offered: u64 },
    #[error(transparent)]
    Invalid(#[from] BundleError),
    #[error("trust update not applied: {0:#}")]
    Install(anyhow::Error),
}

impl TrustKeeper {
    pub fn new(cache: PathBuf, tls: Arc<LiveTls>, connections: Arc<LiveConnections>) -> TrustKeeper {
        TrustKeeper { held: Mutex::new(None), cache, tls, connections }
    }

    /// The sequence held, if any bundle was applied.
    pub fn held(&self) -> Option<u64> {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies the cached bundle, if there is one; a missing cache is not an error.
    pub fn load_cache(&self) -> Result<Option<u64>, ApplyError> {
        if !self.cache.exists() {
            return Ok(None);
        }
        let bundle = Bundle::read_cache(&self.cache)?;
        self.offer(bundle, false)
    }

    /// Applies `bundle` if it is newer than the one held (see the module docs); returns
    /// the sequence applied, or `None` for the one already held.
    pub fn offer(&self, bundle: Bundle, write_cache: bool) -> Result<Option<u64>, ApplyError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match decide(*held, bundle.sequence) {
            Decision::Same => return Ok(None),
            Decision::Rollback => {
                let (held, offered) = (held.unwrap_or(0), bundle.sequence);
                tracing::warn!(held, offered, "refusing a trust bundle older than the one held (rollback)");
                return Err(ApplyError::Rollback { held, offered });
            }
            Decision::Apply => {}
        }
        let revocations = self.tls.replace_trust(&bundle.roots, &bundle.crls).map_err(ApplyError::Install)?;
        *held = Some(bundle.sequence);
        drop(held);
        let closed = self.connections.close_revoked(&revocations);
        tracing::info!(sequence = bundle.sequence, revoked = revocations.len(), closed, "trust bundle applied");
        if write_cache && let Err(error) = bundle.write_cache(&self.cache) {
            tracing::warn!(%error, path = %self.cache.display(), "caching the trust bundle failed");
        }
        Ok(Some(bundle.sequence))
    }
}

async fn run(context: Arc<LinkContext>) {
    let mut backoff = context.config.reconnect_backoff_min;
    loop {
        let started = Instant::now();
        let error = match connection(&context, &mut backoff).await {
            Ok(never) => match never {},
            Err(error) => error,
        };
        context.client.set(None);
        tracing::warn!(%error, after_ms = started.elapsed().as_millis() as u64, "control plane link down; reconnecting");
        let jitter = rand::thread_rng().gen_range(0.5..=1.0);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(context.config.reconnect_backoff_max);
    }
}

enum Never {}

/// One connection: register, then watch trust, report presence and renew until a failure.
async fn connection(context: &LinkContext, backoff: &mut Duration) -> Result<Never, LinkError> {
    let mut client = connect(context).await?;
    let advertised = context.config.advertise_addr.unwrap_or(context.quic_addr);
    let register = proto::RegisterRequest {
        region: context.region.clone(),
        quic_addrs: vec![advertised.to_string()],
        version: env!("CARGO_PKG_VERSION").to_owned(),
        peer_addrs: context.peer_addr.iter().map(ToString::to_string).collect(),
    };
    let registered = call("Register", client.register(register)).await?;
    context.client.set(Some(client.clone()));
    tracing::info!(edge = %context.edge_id, bundle_sequence = registered.trust_bundle_sequence, "registered with the control plane");
    *backoff = context.config.reconnect_backoff_min;

    let after_sequence = context.trust.held().unwrap_or(0);
    let watch = call("WatchTrust", client.watch_trust(proto::WatchTrustRequest { after_sequence })).await?;
    let mut updates = watch;
    let mut presence_check = tokio::time::interval(PRESENCE_CHECK_INTERVAL);
    let mut renew_check = tokio::time::interval(context.config.renew_check_interval);
    let mut reported: Option<(BTreeSet<AgentId>, Instant)> = None;
    loop {
        tokio::select! {
            update = updates.message() => {
                let update = update.map_err(|status| LinkError::Call { call: "WatchTrust", status: Box::new(status) })?;
                let Some(update) = update else { return Err(LinkError::StreamEnded) };
                apply_update(context, &update);
            }
            _ = presence_check.tick() => report_presence(context, &mut client, &mut reported).await?,
            _ = renew_check.tick() => {
                if needs_renewal(&context.tls.identity(), context.config.renew_at_remaining_percent, UnixMillis::now_from_system()) {
                    renew(context, &mut client).await?;
                }
            }
        }
    }
}

fn apply_update(context: &LinkContext, update: &proto::TrustUpdate) {
    let bundle = match Bundle::from_der(update.sequence, &update.roots, &update.org_cas, &update.crls) {
        Ok(bundle) => bundle,
        Err(error) => {
            tracing::warn!(%error, sequence = update.sequence, "refusing an invalid trust update");
            return;
        }
    };
    if let Err(error) = context.trust.offer(bundle, true) {
        tracing::warn!(%error, "trust update not applied");
    }
}

async fn report_presence(
    context: &LinkContext,
    client: &mut EdgeControlClient<Channel>,
    reported: &mut Option<(BTreeSet<AgentId>, Instant)>,
) -> Result<(), LinkError> {
    let agents: BTreeSet<AgentId> =
        context.relay.all_sessions().iter().map(|session| session.agent).take(PRESENCE_AGENTS_MAX).collect();
    let due = match reported {
        None => true,
        Some((last, at)) => *last != agents || at.elapsed() >= context.config.presence_interval,
    };
    if !due {
        return Ok(());
    }
    let report = proto::PresenceReport {
        connected_agents: agents.iter().map(ToString::to_string).collect(),
        at_ms: UnixMillis::now_from_system().0,
        summary: Some(summary(context)),
    };
    call("ReportPresence", client.report_presence(report)).await?;
    tracing::debug!(agents = agents.len(), "presence reported");
    *reported = Some((agents, Instant::now()));
    Ok(())
}

/// The metrics summary sent with a presence report.
fn summary(context: &LinkContext) -> proto::EdgeSummary {
    let uptime_ms = u64::try_from(context.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    proto::EdgeSummary { uptime_ms, ..crate::metrics::summary_from_page(&context.metrics.render()) }
}

/// Whether less than `percent` of the leaf's lifetime is left at `now`.
pub fn needs_renewal(identity: &SignerTlsIdentity, percent: u8, now: UnixMillis) -> bool {
    let Some(leaf) = identity.chain.first() else { return false };
    let validity = leaf.validity();
    let lifetime = validity.not_after.0.saturating_sub(validity.not_before.0);
    let remaining = validity.not_after.0.saturating_sub(now.0);
    u128::from(remaining) * 100 < u128::from(lifetime) * u128::from(percent)
}

/// The org id an org CA certificate was issued for (its common name).
pub fn org_of(org_ca: &Certificate) -> Option<String> {
    org_ca.common_name().strip_prefix(ORG_CA_NAME_PREFIX).map(|suffix| format!("org_{suffix}"))
}

/// Asks for a new certificate for the same key, writes the chain atomically and installs
/// it for new handshakes.
async fn renew(context: &LinkContext, client: &mut EdgeControlClient<Channel>) -> Result<(), LinkError> {
    let identity = context.tls.identity();
    let org = identity
        .chain
        .get(1)
        .and_then(org_of)
        .ok_or_else(|| LinkError::Renewal("the chain does not name its org CA".into()))?;
    // A key file is rotated: the new key is staged beside the old one first, so that a
    // crash at any point leaves a pair that `identity::finish_rotation` can settle. A key
    // in a PKCS#11 token stays.
    let rotation = match &context.key {
        crate::config::KeySource::File(key_path) => {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let staged = crate::identity::staged(key_path);
            write_atomically(&staged, key.to_pkcs8_pem().as_bytes(), 0o600)
                .map_err(|error| LinkError::Renewal(format!("staging the new key in {}: {error}", staged.display())))?;
            Some((key_path.clone(), key))
        }
        crate::config::KeySource::Pkcs11(_) => None,
    };
    let result = renew_onto(context, client, &org, &identity, rotation.as_ref()).await;
    if let (Err(_), Some((key_path, _))) = (&result, &rotation) {
        let _ = std::fs::remove_file(crate::identity::staged(key_path));
    }
    result
}

/// Asks for a certificate for the rotated key (or the current one), checks it, writes it
/// and installs it.
async fn renew_onto(
    context: &LinkContext,
    client: &mut EdgeControlClient<Channel>,
    org: &str,
    identity: &SignerTlsIdentity,
    rotation: Option<&(PathBuf, SigningKey)>,
) -> Result<(), LinkError> {
    let signer: Arc<dyn Signer> = match rotation {
        Some((_, key)) => Arc::new(key.clone()),
        None => Arc::clone(&identity.signer),
    };
    let public_key = signer.public_key();
    let now = UnixMillis::now_from_system();
    let signature = signer
        .try_sign(&possession_message(EDGE_PROOF_DOMAIN, org, &public_key, now))
        .map_err(|error| LinkError::Renewal(format!("signing the proof: {error}")))?;
    let request = proto::RenewCertificateRequest {
        public_key: public_key.as_bytes().to_vec(),
        timestamp_ms: now.0,
        signature: signature.0.to_vec(),
    };
    let renewed = call("RenewCertificate", client.renew_certificate(request)).await?;
    let chain = renewed
        .chain
        .iter()
        .map(|der| Certificate::from_der(der))
        .collect::<Result<Vec<Certificate>, _>>()
        .map_err(|error| LinkError::Renewal(format!("the renewed chain does not parse: {error}")))?;
    let Some(leaf) = chain.first() else { return Err(LinkError::Renewal("an empty chain".into())) };
    if leaf.role() != Role::Edge(context.edge_id) || leaf.public_key() != public_key {
        return Err(LinkError::Renewal("the renewed certificate is not for this edge and key".into()));
    }
    let pem: String = chain.iter().map(Certificate::to_pem).collect();
    let failed =
        |path: &Path, error: std::io::Error| LinkError::Renewal(format!("writing {}: {error}", path.display()));
    match rotation {
        Some((key_path, _)) => {
            // Staged, then the key, then the chain: the order `finish_rotation` expects.
            let staged_chain = crate::identity::staged(&context.chain_path);
            write_atomically(&staged_chain, pem.as_bytes(), 0o644).map_err(|error| failed(&staged_chain, error))?;
            std::fs::rename(crate::identity::staged(key_path), key_path).map_err(|error| failed(key_path, error))?;
            std::fs::rename(&staged_chain, &context.chain_path).map_err(|error| failed(&context.chain_path, error))?;
            if let Some(directory) = context.chain_path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
                std::fs::File::open(directory)
                    .and_then(|directory| directory.sync_all())
                    .map_err(|error| failed(directory, error))?;
            }
        }
        None => write_atomically(&context.chain_path, pem.as_bytes(), 0o644)
            .map_err(|error| failed(&context.chain_path, error))?,
    }
    let serial = leaf.serial();
    let not_after = leaf.validity().not_after.0;
    context
        .tls
        .replace_identity(SignerTlsIdentity { chain, signer })
        .map_err(|error| LinkError::Renewal(format!("installing the certificate: {error:#}")))?;
    tracing::info!(%serial, not_after_ms = not_after, rotated_key = rotation.is_some(), "edge certificate renewed");
    Ok(())
}

async fn call<T>(
    name: &'static str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, LinkError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(LinkError::Call { call: name, status: Box::new(status) }),
        Err(_) => Err(LinkError::Timeout { call: name }),
    }
}

async fn connect(context: &LinkContext) -> Result<EdgeControlClient<Channel>, LinkError> {
    let anchors = std::fs::read_to_string(&context.config.trust_anchor)
        .map_err(|error| format!("reading {}: {error}", context.config.trust_anchor.display()))
        .and_then(|pem| TrustAnchors::from_pem(&pem).map_err(|error| error.to_string()))
        .map_err(LinkError::Connect)?;
    let config = tls::client_config_with_signer(
        &context.tls.identity(),
        Arc::new(anchors),
        context.tls.revocations(),
        ExpectedRole::AnyEdge,
        ALPN_H2,
    )
    .map_err(|error| LinkError::Connect(error.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(context.config.server_name.clone())
        .map_err(|error| LinkError::Connect(format!("server name: {error}")))?;
    let addr = context.config.grpc_addr;
    let endpoint = Endpoint::from_static("http://control-plane.molt")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let connecting = endpoint.connect_with_connector(tower::service_fn(move |_| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }));
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| LinkError::Connect(format!("{addr}: timed out")))?
        .map_err(|error| LinkError::Connect(format!("{addr}: {error}")))?;
    Ok(EdgeControlClient::new(channel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use molt_protocol::cert::{Serial, Validity, issue_leaf, issue_org_ca, issue_root};
    use molt_protocol::keys::SigningKey;

    fn identity(not_before: u64, not_after: u64) -> SignerTlsIdentity {
        let validity = Validity { not_before: UnixMillis(not_before), not_after: UnixMillis(not_after) };
        let root_key = SigningKey::from_bytes(&[1; 32]);
        let root = issue_root(&root_key, "root", validity, Serial([1; 16])).unwrap();
        let org_key = SigningKey::from_bytes(&[2; 32]);
        let name = format!("{ORG_CA_NAME_PREFIX}aaaaaaaaaaaaaaaaaaaaaaaaaa");
        let org = issue_org_ca(&root, &root_key, &org_key.public_key(), &name, validity, Serial([2; 16])).unwrap();
        let key = SigningKey::from_bytes(&[3; 32]);
        let role = Role::Edge(EdgeId::from_inception_key(&key.public_key()));
        let leaf = issue_leaf(&org, &org_key, &key.public_key(), role, &[], validity, Serial([3; 16])).unwrap();
        SignerTlsIdentity { chain: vec![leaf, org], signer: Arc::new(key) }
    }

    #[test]
    fn renewal_starts_when_the_remaining_share_falls_below_the_threshold() {
        let start = 1_700_000_000_000;
        let identity = identity(start, start + 300_000);
        assert!(!needs_renewal(&identity, 33, UnixMillis(start)));
        assert!(!needs_renewal(&identity, 33, UnixMillis(start + 201_000)), "33 % left");
        assert!(needs_renewal(&identity, 33, UnixMillis(start + 202_000)));
        assert!(needs_renewal(&identity, 33, UnixMillis(start + 400_000)), "expired");
        assert!(needs_renewal(&identity, 90, UnixMillis(start + 31_000)));
    }

    #[tokio::test]
    async fn a_newer_bundle_replaces_the_revocations_and_an_older_one_is_refused() {
        use molt_protocol::cert::{RevocationList, Revocations};
        let now = UnixMillis::now_from_system();
        let identity = identity(now.0 - 60_000, now.0 + 3_600_000);
        let org = identity.chain[1].clone();
        let root = root_of(&identity);
        let org_key = SigningKey::from_bytes(&[2; 32]);
        let crl = |number: u64, revoked: &[Serial]| {
            RevocationList::issue(&org, &org_key, number, now, UnixMillis(now.0 + 60_000), revoked).unwrap()
        };
        let bundle = |sequence: u64, revoked: &[Serial]| {
            Bundle::from_der(
                sequence,
                &[root.der().to_vec()],
                &[org.der().to_vec()],
                &[crl(sequence, revoked).der().to_vec()],
            )
            .unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let text = "[identity]\ncertificate_chain = \"e.pem\"\nprivate_key = \"e.key\"\n[trust]\nanchors = \"r.pem\"\n";
        let config = crate::config::parse(text, dir.path()).unwrap();
        let revocations = Arc::new(std::sync::RwLock::new(Revocations::default()));
        let anchors = TrustAnchors::new(vec![root.clone()]).unwrap();
        let tls_identity = SignerTlsIdentity { chain: identity.chain.clone(), signer: Arc::clone(&identity.signer) };
        let server = molt_protocol::tls::server_config_with_signer(
            &tls_identity,
            Arc::new(anchors.clone()),
            Arc::clone(&revocations),
            ExpectedRole::AnyAgent,
            molt_protocol::tls::ALPN_AGENT,
        )
        .unwrap();
        let quic = crate::server::quic_server_config(server, &config).unwrap();
        let endpoint = quinn::Endpoint::server(quic, "127.0.0.1:0".parse().unwrap()).unwrap();
        let live = Arc::new(LiveTls::new(endpoint, config, tls_identity, anchors, Arc::clone(&revocations)));
        let cache = dir.path().join("bundle.json");
        let keeper = TrustKeeper::new(cache.clone(), live, Arc::new(LiveConnections::default()));

        assert_eq!(keeper.offer(bundle(5, &[Serial([9; 16])]), true).unwrap(), Some(5));
        assert!(revocations.read().unwrap().contains(Serial([9; 16])));
        assert_eq!(Bundle::read_cache(&cache).unwrap().sequence, 5);
        // Older: refused, nothing changes (an attacker replaying an old bundle would
        // un-revoke the serial).
        let rollback = keeper.offer(bundle(4, &[]), true).unwrap_err();
        assert!(matches!(rollback, ApplyError::Rollback { held: 5, offered: 4 }), "{rollback}");
        assert!(revocations.read().unwrap().contains(Serial([9; 16])));
        assert_eq!(Bundle::read_cache(&cache).unwrap().sequence, 5);
        assert_eq!(keeper.offer(bundle(5, &[]), true).unwrap(), None, "the same sequence is ignored");
        assert_eq!(keeper.held(), Some(5));
        // Newer: replaces (a serial can leave the set only through a newer bundle).
        assert_eq!(keeper.offer(bundle(6, &[Serial([8; 16])]), true).unwrap(), Some(6));
        assert!(revocations.read().unwrap().contains(Serial([8; 16])));
        assert!(!revocations.read().unwrap().contains(Serial([9; 16])));
    }

    /// The root that issued `identity`'s org CA (the helper's fixed key).
    fn root_of(identity: &SignerTlsIdentity) -> Certificate {
        let validity = identity.chain[1].validity();
        issue_root(&SigningKey::from_bytes(&[1; 32]), "root", validity, Serial([1; 16])).unwrap()
    }

    #[test]
    fn the_org_comes_from_the_org_ca_name() {
        let identity = identity(0, 1_000_000);
        assert_eq!(org_of(&identity.chain[1]).as_deref(), Some("org_aaaaaaaaaaaaaaaaaaaaaaaaaa"));
        assert_eq!(org_of(&identity.chain[0]), None);
    }
}
