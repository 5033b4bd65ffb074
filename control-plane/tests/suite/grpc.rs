//! The edge gRPC service over real TCP and mutual TLS on loopback, on both backends, with
//! certificates issued by the CA: registration, the trust stream, presence and lookup,
//! and refusals (agent certificate, no certificate, malformed agent id).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use molt_control_plane::ca::{
    self, Authority, CaOptions, KekSource, KeyEncryptionKey, LeafKind, PossessionProof, RevocationReason, RootSource,
};
use molt_control_plane::clock::{Clock, SystemClock};
use molt_control_plane::grpc::proto::edge_control_client::EdgeControlClient;
use molt_control_plane::grpc::proto::{
    EdgeSummary, LookupAgentRequest, PresenceReport, RegisterRequest, RenewCertificateRequest, WatchTrustRequest,
};
use molt_control_plane::grpc::{self, GrpcServer};
use molt_control_plane::ids::OrgId;
use molt_control_plane::model::OrgName;
use molt_control_plane::registry;
use molt_protocol::cert::{Certificate, ExpectedRole, Revocations, Role, TrustAnchors, verify_chain};
use molt_protocol::ids::{AgentId, EdgeId};
use molt_protocol::keys::SigningKey;
use molt_protocol::time::UnixMillis;
use molt_protocol::tls::{self, TlsIdentity};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::fixture::Fixture;

crate::on_both_backends!(
    an_edge_registers_and_watches_the_trust_bundle_grow,
    presence_then_lookup_finds_the_agent_at_its_edge,
    presence_reports_carry_the_metrics_summary_admins_list,
    an_agent_certificate_is_refused_at_the_handshake,
    a_client_without_certificate_is_refused,
    a_malformed_agent_id_is_an_invalid_argument,
    an_edge_renews_its_certificate_with_the_same_or_a_new_key,
    a_renewal_with_a_bad_proof_or_a_revoked_certificate_is_refused,
);

/// Longest wait for a trust update; several poll intervals.
const UPDATE_WAIT: Duration = Duration::from_secs(10);

struct Harness {
    db: molt_control_plane::db::Database,
    authority: Arc<Authority>,
    server: GrpcServer,
    org: OrgId,
}

impl Harness {
    async fn new(fixture: &Fixture) -> Harness {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let options = CaOptions {
            key_encryption_key: KekSource::Value(KeyEncryptionKey::generate()),
            root: RootSource::Generated,
            pkcs11: None,
        };
        let authority =
            Arc::new(Authority::load(&fixture.db, &options, "postgres://unused", clock.now()).await.expect("load CA"));
        let identity = grpc::issue_server_identity(&fixture.db, &authority, clock.now()).await.expect("identity");
        let server =
            grpc::serve("127.0.0.1:0".parse().unwrap(), &identity, fixture.db.clone(), Arc::clone(&authority), clock)
                .await
                .expect("start the gRPC server");
        let org = fixture.db.create_org(&OrgName::new("acme").unwrap(), SystemClock.now()).await.unwrap().id;
        Harness { db: fixture.db.clone(), authority, server, org }
    }

    async fn issue(&self, kind: LeafKind) -> TlsIdentity {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let now = SystemClock.now();
        let public_key = key.public_key();
        let signature = key.sign(&ca::proof_message(kind, &self.org, &public_key, now));
        let proof = PossessionProof::verify(kind, &self.org, &public_key, now, &signature, now).unwrap();
        let issued = self.authority.issue(&self.db, &proof, &[], now).await.expect("issue a certificate");
        TlsIdentity { chain: vec![issued.certificate, issued.org_ca], key }
    }

    fn client_config(&self, identity: &TlsIdentity) -> rustls::ClientConfig {
        let anchors = TrustAnchors::new(vec![self.authority.root().clone()]).unwrap();
        let revocations = Arc::new(std::sync::RwLock::new(Revocations::default()));
        tls::client_config(identity, Arc::new(anchors), revocations, ExpectedRole::AnyEdge, grpc::ALPN_H2).unwrap()
    }

    async fn connect(
        &self,
        config: rustls::ClientConfig,
    ) -> Result<EdgeControlClient<Channel>, tonic::transport::Error> {
        let addr = self.server.local_addr();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let channel = Endpoint::from_static("http://control-plane.molt")
            .connect_with_connector(tower::service_fn(move |_| {
                let connector = connector.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let tls = connector.connect(ServerName::try_from("control-plane.molt").unwrap(), tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await?;
        Ok(EdgeControlClient::new(channel))
    }

    async fn edge_client(&self) -> (EdgeId, EdgeControlClient<Channel>) {
        let identity = self.issue(LeafKind::Edge).await;
        let edge = EdgeId::from_inception_key(&identity.key.public_key());
        (edge, self.connect(self.client_config(&identity)).await.expect("connect as an edge"))
    }
}

fn renew_request(org: &OrgId, key: &SigningKey, at: UnixMillis) -> RenewCertificateRequest {
    let signature = key.sign(&ca::proof_message(LeafKind::Edge, org, &key.public_key(), at));
    RenewCertificateRequest {
        public_key: key.public_key().as_bytes().to_vec(),
        timestamp_ms: at.0,
        signature: signature.0.to_vec(),
    }
}

fn register_request() -> RegisterRequest {
    RegisterRequest {
        region: "eu-west".into(),
        quic_addrs: vec!["127.0.0.1:4433".into()],
        version: "0.1.0".into(),
        peer_addrs: vec!["127.0.0.1:4434".into()],
    }
}

async fn an_edge_registers_and_watches_the_trust_bundle_grow(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let (edge, mut client) = harness.edge_client().await;
    let registered = client.register(register_request()).await.expect("register").into_inner();
    assert_eq!(registered.edge_id, edge.to_string());
    assert!(registered.trust_bundle_sequence > 0);
    assert_eq!(fixture.count("edges").await, 1);

    let mut stream = client.watch_trust(WatchTrustRequest { after_sequence: 0 }).await.expect("watch").into_inner();
    let first = tokio::time::timeout(UPDATE_WAIT, stream.message()).await.unwrap().unwrap().expect("first update");
    assert_eq!(first.sequence, registered.trust_bundle_sequence);
    assert_eq!(first.roots, vec![harness.authority.root().der().to_vec()]);
    assert_eq!(first.org_cas.len(), 2, "the control plane's org and acme");
    assert_eq!(first.crls.len(), 2);

    let victim = harness.issue(LeafKind::Agent).await;
    ca::revoke(&harness.db, victim.chain[0].serial(), RevocationReason::KeyCompromise, SystemClock.now())
        .await
        .expect("revoke");
    let second = tokio::time::timeout(UPDATE_WAIT, stream.message()).await.unwrap().unwrap().expect("second update");
    assert!(second.sequence > first.sequence, "{} after {}", second.sequence, first.sequence);
    assert_ne!(second.crls, first.crls);

    // A watcher already at the current sequence gets nothing until it grows.
    let mut caught_up =
        client.watch_trust(WatchTrustRequest { after_sequence: second.sequence }).await.unwrap().into_inner();
    assert!(tokio::time::timeout(Duration::from_millis(1500), caught_up.message()).await.is_err());
}

async fn presence_then_lookup_finds_the_agent_at_its_edge(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let (edge, mut client) = harness.edge_client().await;
    let key = SigningKey::generate(&mut rand::rngs::OsRng).public_key();
    let agent = AgentId::from_inception_key(&key);
    // Registered an hour ago, quiet since: presence renews the registration.
    let hour_ago = UnixMillis(SystemClock.now().0 - 3_600_000);
    let profile = registry::ProfileInput {
        name: "roaming".into(),
        description: String::new(),
        capabilities: Vec::new(),
        key_binding: None,
        visibility: registry::Visibility::Public,
        home_edge: None,
    }
    .validate(agent, &key)
    .unwrap();
    registry::register(&harness.db, agent, &key, &profile, hour_ago).await.expect("register the agent");
    let report =
        PresenceReport { connected_agents: vec![agent.to_string()], at_ms: SystemClock.now().0, summary: None };
    let refused = client.report_presence(report.clone()).await.expect_err("presence before Register");
    assert_eq!(refused.code(), Code::FailedPrecondition);

    client.register(register_request()).await.expect("register");
    let ack = client.report_presence(report).await.expect("presence").into_inner();
    assert_eq!(ack.accepted, 1);
    let renewed = registry::agent(&harness.db, agent).await.unwrap().unwrap();
    assert_eq!(renewed.health(SystemClock.now()), registry::Health::Online, "presence renews the registration");
    assert!(renewed.expires_at > hour_ago.saturating_add(registry::REGISTRATION_TTL));
    let found = client.lookup_agent(LookupAgentRequest { agent_id: agent.to_string() }).await.unwrap().into_inner();
    assert!(found.found);
    assert_eq!(found.home_edge_id, edge.to_string());
    assert_eq!(found.edge_quic_addrs, ["127.0.0.1:4433"]);
    assert_eq!(found.edge_peer_addrs, ["127.0.0.1:4434"], "where other edges reach it");
    assert!(found.key_binding.is_empty(), "the agent published no key binding");

    // A malformed peer address is refused and changes nothing.
    let mut bad = register_request();
    bad.peer_addrs = vec!["edge.example:4434".into()];
    let refused = client.register(bad).await.expect_err("a host name is not a socket address");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let mut many = register_request();
    many.peer_addrs = vec!["127.0.0.1:1".into(); grpc::QUIC_ADDRS_MAX + 1];
    assert_eq!(client.register(many).await.expect_err("too many").code(), Code::InvalidArgument);
    let still = client.lookup_agent(LookupAgentRequest { agent_id: agent.to_string() }).await.unwrap().into_inner();
    assert_eq!(still.edge_peer_addrs, ["127.0.0.1:4434"]);

    // An edge silent for longer than the staleness window is no agent's home.
    let stale = SystemClock.now().0 as i64 - grpc::PRESENCE_STALE_AFTER.as_millis() as i64 - 1000;
    sqlx::query("UPDATE edges SET last_seen_ms = $1").bind(stale).execute(harness.db.pool()).await.unwrap();
    let silent = client.lookup_agent(LookupAgentRequest { agent_id: agent.to_string() }).await.unwrap().into_inner();
    assert!(!silent.found, "a silent edge is not named");
    client.register(register_request()).await.expect("register again");

    let empty = PresenceReport { connected_agents: vec![], at_ms: SystemClock.now().0, summary: None };
    client.report_presence(empty).await.expect("empty presence");
    let gone = client.lookup_agent(LookupAgentRequest { agent_id: agent.to_string() }).await.unwrap().into_inner();
    assert!(!gone.found);
}

async fn presence_reports_carry_the_metrics_summary_admins_list(fixture: &Fixture) {
    use molt_control_plane::db::Page;
    use molt_control_plane::edge_map;

    let harness = Harness::new(fixture).await;
    let (edge, mut client) = harness.edge_client().await;
    client.register(register_request()).await.expect("register");
    let all = Page { after: None, limit: 100 };
    let listed = edge_map::list_edges(&harness.db, &all).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].entry.edge_id, edge);
    assert_eq!(listed[0].summary, None, "no summary before the first report");
    assert_eq!(listed[0].peer_addrs, ["127.0.0.1:4434"]);

    let key = SigningKey::generate(&mut rand::rngs::OsRng).public_key();
    let agent = AgentId::from_inception_key(&key);
    let summary = EdgeSummary {
        uptime_ms: 60_000,
        connections: 3,
        messages_received: 1_000,
        messages_delivered: 990,
        messages_rejected: 4,
        rate_limited: 2,
        buffered_messages: 6,
        buffered_bytes: 1_536,
        peer_links: 1,
        peer_forwarded: 40,
        peer_received: 30,
        handoffs: 5,
    };
    let report = PresenceReport {
        connected_agents: vec![agent.to_string()],
        at_ms: SystemClock.now().0,
        summary: Some(summary),
    };
    client.report_presence(report).await.expect("presence with a summary");
    let listed = edge_map::list_edges(&harness.db, &all).await.unwrap();
    let (stored, at) = listed[0].summary.expect("the summary is kept");
    assert_eq!(stored, edge_map::EdgeSummary::from(&summary));
    assert_eq!((stored.messages_received, stored.buffered_bytes, stored.handoffs), (1_000, 1_536, 5));
    assert!(at.0 > 0);
    assert_eq!(listed[0].connected_agents, 1);

    // A report without a summary (an older edge) keeps the last one.
    let bare = PresenceReport { connected_agents: vec![], at_ms: SystemClock.now().0, summary: None };
    client.report_presence(bare).await.expect("presence without a summary");
    let listed = edge_map::list_edges(&harness.db, &all).await.unwrap();
    assert_eq!(listed[0].summary.map(|(summary, _)| summary.messages_received), Some(1_000));
    assert_eq!(listed[0].connected_agents, 0);

    // Paging: nothing after the last edge.
    let after = Page { after: Some(edge), limit: 100 };
    assert!(edge_map::list_edges(&harness.db, &after).await.unwrap().is_empty());
}

async fn an_agent_certificate_is_refused_at_the_handshake(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let identity = harness.issue(LeafKind::Agent).await;
    assert_refused(&harness, harness.client_config(&identity)).await;
}

async fn a_client_without_certificate_is_refused(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let identity = harness.issue(LeafKind::Edge).await;
    let mut config = harness.client_config(&identity);
    config.client_auth_cert_resolver = Arc::new(NoClientCertificate);
    assert_refused(&harness, config).await;
}

async fn a_malformed_agent_id_is_an_invalid_argument(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let (_, mut client) = harness.edge_client().await;
    let status = client.lookup_agent(LookupAgentRequest { agent_id: "not-an-agent".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    client.register(register_request()).await.expect("register");
    let report = PresenceReport { connected_agents: vec!["agent:nope".into()], at_ms: 0, summary: None };
    let status = client.report_presence(report).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
}

async fn an_edge_renews_its_certificate_with_the_same_or_a_new_key(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let identity = harness.issue(LeafKind::Edge).await;
    let edge = EdgeId::from_inception_key(&identity.key.public_key());
    let mut client = harness.connect(harness.client_config(&identity)).await.expect("connect");
    let anchors = TrustAnchors::new(vec![harness.authority.root().clone()]).unwrap();

    let same = client.renew_certificate(renew_request(&harness.org, &identity.key, SystemClock.now())).await;
    let same = same.expect("renew with the same key").into_inner();
    let new_key = SigningKey::generate(&mut rand::rngs::OsRng);
    let rotated = client.renew_certificate(renew_request(&harness.org, &new_key, SystemClock.now())).await;
    let rotated = rotated.expect("renew onto a new key").into_inner();
    for (renewed, key) in [(&same, &identity.key), (&rotated, &new_key)] {
        let chain: Vec<&[u8]> = renewed.chain.iter().map(Vec::as_slice).collect();
        verify_chain(&chain, &anchors, &Revocations::default(), SystemClock.now(), ExpectedRole::AnyEdge)
            .expect("the renewed chain verifies");
        let leaf = Certificate::from_der(&renewed.chain[0]).unwrap();
        assert_eq!(leaf.role(), Role::Edge(edge), "the edge id is kept");
        assert_eq!(leaf.public_key(), key.public_key());
        assert_ne!(leaf.serial(), identity.chain[0].serial());
    }
    // The new certificate works for the next connection.
    let renewed = TlsIdentity {
        chain: rotated.chain.iter().map(|der| Certificate::from_der(der).unwrap()).collect(),
        key: new_key,
    };
    let mut again = harness.connect(harness.client_config(&renewed)).await.expect("connect with the renewed chain");
    let registered = again.register(register_request()).await.expect("register").into_inner();
    assert_eq!(registered.edge_id, edge.to_string());
}

async fn a_renewal_with_a_bad_proof_or_a_revoked_certificate_is_refused(fixture: &Fixture) {
    let harness = Harness::new(fixture).await;
    let identity = harness.issue(LeafKind::Edge).await;
    let mut client = harness.connect(harness.client_config(&identity)).await.expect("connect");
    let issued = fixture.count("certificates").await;
    let other_org = OrgId::generate();
    let now = SystemClock.now();
    let mut forged = renew_request(&harness.org, &identity.key, now);
    forged.public_key = SigningKey::generate(&mut rand::rngs::OsRng).public_key().as_bytes().to_vec();
    let stale = renew_request(&harness.org, &identity.key, UnixMillis(now.0 - 10 * 60 * 1000));
    let mut short = renew_request(&harness.org, &identity.key, now);
    short.signature.truncate(10);
    for request in [forged, stale, short, renew_request(&other_org, &identity.key, now)] {
        let status = client.renew_certificate(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    }
    assert_eq!(fixture.count("certificates").await, issued, "nothing issued");

    ca::revoke(&harness.db, identity.chain[0].serial(), RevocationReason::KeyCompromise, SystemClock.now())
        .await
        .unwrap();
    // The open connection was authenticated before the revocation; the record says no.
    let status = client.renew_certificate(renew_request(&harness.org, &identity.key, now)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert_eq!(fixture.count("certificates").await, issued);
}

/// In TLS 1.3 the server judges the client certificate after the client's handshake
/// finished, so the refusal shows either at connect or at the first call; either way no
/// call succeeds and nothing is written.
async fn assert_refused(harness: &Harness, config: rustls::ClientConfig) {
    if let Ok(mut client) = harness.connect(config).await {
        let status = client.register(register_request()).await.expect_err("a non-edge client was served");
        assert_ne!(status.code(), Code::Ok);
    }
    let edges: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM edges").fetch_one(harness.db.pool()).await.unwrap();
    assert_eq!(edges, 0);
}

#[derive(Debug)]
struct NoClientCertificate;

impl ResolvesClientCert for NoClientCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}
