//! What the edge changes while it runs: its own certificate (renewal), the roots and
//! revocations its verifier uses (trust bundles), and the table of live agent
//! connections by certificate serial, so a revocation closes the connections it names.
//!
//! A change of certificate or roots builds a new QUIC server config and installs it on
//! the endpoint: new handshakes use it, established connections keep theirs. A change of
//! revocations only swaps the set behind the verifier's `SharedRevocations`, which every
//! handshake reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context as _;
use molt_protocol::cert::{Certificate, ExpectedRole, RevocationList, Revocations, Serial, TrustAnchors};
use molt_protocol::tls::{self, SharedRevocations, SignerTlsIdentity};
use rustls::pki_types::CertificateDer;

use crate::config::EdgeConfig;
use crate::relay::close_code;

/// Reason sent with [`close_code::REVOKED`].
pub const REVOKED_REASON: &[u8] = b"certificate revoked";

/// The edge's TLS material, shared by the server and the control link.
pub struct LiveTls {
    endpoint: quinn::Endpoint,
    config: EdgeConfig,
    identity: RwLock<SignerTlsIdentity>,
    /// Roots from the config file; bundle roots are added to them.
    configured_roots: Vec<Certificate>,
    /// Revocations from the config file's CRLs; bundle CRLs are added to them.
    configured_revocations: Revocations,
    anchors: RwLock<Arc<TrustAnchors>>,
    revocations: SharedRevocations,
    /// The edge-to-edge endpoint, which gets the same identity and roots for edge peers.
    peer_endpoint: RwLock<Option<quinn::Endpoint>>,
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTls").finish_non_exhaustive()
    }
}

impl LiveTls {
    pub fn new(
        endpoint: quinn::Endpoint,
        config: EdgeConfig,
        identity: SignerTlsIdentity,
        anchors: TrustAnchors,
        revocations: SharedRevocations,
    ) -> LiveTls {
        let configured_revocations = revocations.read().unwrap_or_else(|p| p.into_inner()).clone();
        LiveTls {
            endpoint,
            config,
            identity: RwLock::new(identity),
            configured_roots: anchors.iter().cloned().collect(),
            configured_revocations,
            anchors: RwLock::new(Arc::new(anchors)),
            revocations,
            peer_endpoint: RwLock::new(None),
        }
    }

    /// The roots handshakes are checked against now.
    pub fn anchors(&self) -> Arc<TrustAnchors> {
        Arc::clone(&self.anchors.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Keeps the edge-to-edge endpoint's server config in step with the agent endpoint's.
    pub fn attach_peer_endpoint(&self, endpoint: quinn::Endpoint) {
        *self.peer_endpoint.write().unwrap_or_else(|p| p.into_inner()) = Some(endpoint);
    }

    /// The QUIC server config of the edge-to-edge endpoint: edge certificates only.
    pub fn peer_server_config(&self) -> anyhow::Result<quinn::ServerConfig> {
        let tls = tls::server_config_with_signer(
            &self.identity(),
            self.anchors(),
            Arc::clone(&self.revocations),
            ExpectedRole::AnyEdge,
            tls::ALPN_EDGE_LINK,
        )
        .context("while building the edge-to-edge tls configuration")?;
        crate::federation::quic_server_config(tls)
    }

    /// The QUIC client config for a link to the edge `peer`.
    pub fn peer_client_config(&self, peer: molt_protocol::EdgeId) -> anyhow::Result<quinn::ClientConfig> {
        let tls = tls::client_config_with_signer(
            &self.identity(),
            self.anchors(),
            Arc::clone(&self.revocations),
            ExpectedRole::Edge(peer),
            tls::ALPN_EDGE_LINK,
        )
        .context("while building the edge-to-edge tls configuration")?;
        crate::federation::quic_client_config(tls)
    }

    /// The edge's current certificate chain and key.
    pub fn identity(&self) -> SignerTlsIdentity {
        let identity = self.identity.read().unwrap_or_else(|p| p.into_inner());
        SignerTlsIdentity { chain: identity.chain.clone(), signer: Arc::clone(&identity.signer) }
    }

    pub fn revocations(&self) -> SharedRevocations {
        Arc::clone(&self.revocations)
    }

    /// Uses `identity` for every new handshake.
    pub fn replace_identity(&self, identity: SignerTlsIdentity) -> anyhow::Result<()> {
        *self.identity.write().unwrap_or_else(|p| p.into_inner()) = identity;
        self.install()
    }

    /// Uses the configured roots plus `roots`, and the configured CRLs plus `crls`.
    /// Returns the revocations now in force.
    pub fn replace_trust(&self, roots: &[Certificate], crls: &[RevocationList]) -> anyhow::Result<Revocations> {
        let mut merged = self.configured_revocations.clone();
        for crl in crls {
            merged.extend_from(crl);
        }
        *self.revocations.write().unwrap_or_else(|p| p.into_inner()) = merged.clone();
        let mut all = self.configured_roots.clone();
        for root in roots {
            if !all.contains(root) {
                all.push(root.clone());
            }
        }
        let current: Vec<Certificate> =
            self.anchors.read().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        if current != all {
            let anchors = TrustAnchors::new(all).context("while building the new trust anchors")?;
            *self.anchors.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(anchors);
            self.install()?;
        }
        Ok(merged)
    }

    /// Builds the QUIC server config from the current identity, roots and revocations.
    pub fn server_config(&self) -> anyhow::Result<quinn::ServerConfig> {
        let identity = self.identity();
        let tls = tls::server_config_with_signer(
            &identity,
            self.anchors(),
            Arc::clone(&self.revocations),
            ExpectedRole::AnyAgent,
            tls::ALPN_AGENT,
        )
        .context("while building the tls configuration")?;
        crate::server::quic_server_config(tls, &self.config)
    }

    fn install(&self) -> anyhow::Result<()> {
        self.endpoint.set_server_config(Some(self.server_config()?));
        if let Some(peers) = self.peer_endpoint.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            peers.set_server_config(Some(self.peer_server_config()?));
        }
        Ok(())
    }
}

/// The leaf certificate a handshaken connection's peer presented, and the serial of every
/// certificate in its chain (so revoking an org CA also closes its members' connections).
pub fn authenticated_peer(connection: &quinn::Connection) -> Option<(Certificate, Vec<Serial>)> {
    let chain = connection.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = tls::peer_identity(&chain)?;
    let serials = chain.iter().filter_map(|der| Certificate::from_der(der).ok()).map(|c| c.serial()).collect();
    Some((leaf, serials))
}

/// Live agent connections by the serials of the certificates in their chains.
#[derive(Debug, Default)]
pub struct LiveConnections {
    next: AtomicU64,
    connections: Mutex<HashMap<u64, (Vec<Serial>, quinn::Connection)>>,
}

/// Removes its connection from the table when dropped.
#[derive(Debug)]
pub struct LiveEntry {
    table: Arc<LiveConnections>,
    id: u64,
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        self.table.connections.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl LiveConnections {
    /// Records `connection`, authenticated by a chain with `serials`, until the entry drops.
    pub fn insert(self: &Arc<Self>, serials: Vec<Serial>, connection: quinn::Connection) -> LiveEntry {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (serials, connection));
        LiveEntry { table: Arc::clone(self), id }
    }

    /// Closes every connection whose chain holds a revoked serial; returns how many.
    pub fn close_revoked(&self, revocations: &Revocations) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for (serials, connection) in connections.values() {
            if serials.iter().any(|serial| revocations.contains(*serial)) {
                connection.close(close_code::REVOKED.into(), REVOKED_REASON);
                closed += 1;
            }
        }
        closed
    }

    pub fn len(&self) -> usize {
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
