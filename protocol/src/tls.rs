//! rustls configurations for Molt's mutual TLS (feature `tls`): both sides present
//! certificates from the Molt PKI and each checks the other's chain with
//! [`cert::verify_chain`](crate::cert::verify_chain) — the same check used everywhere
//! else — instead of Web PKI rules. Identity is the agent or edge id in the certificate,
//! not a DNS name. Only TLS 1.3 and Ed25519 are offered.
//!
//! Still sans-IO: rustls hands the verifiers the current time; nothing here reads a clock
//! or opens a socket.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::cert::{Certificate, ExpectedRole, Revocations, TrustAnchors, VerifiedCert, verify_chain};
use crate::keys::{Signer, SigningKey};
use crate::time::UnixMillis;

/// ALPN for agent ↔ edge connections.
pub const ALPN_AGENT: &[u8] = b"molt/1";
/// ALPN for edge ↔ edge links.
pub const ALPN_EDGE_LINK: &[u8] = b"molt-edge/1";

/// Revocations shared between a verifier and whoever updates them (the edge reloads its
/// revocation list at run time).
pub type SharedRevocations = Arc<RwLock<Revocations>>;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    #[error("rustls refused the configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A certificate chain (leaf first) and the private key of its leaf.
pub struct TlsIdentity {
    pub chain: Vec<Certificate>,
    pub key: SigningKey,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity").field("leaf", &self.chain.first().map(Certificate::role)).finish_non_exhaustive()
    }
}

impl TlsIdentity {
    fn chain_der(&self) -> Vec<CertificateDer<'static>> {
        self.chain.iter().map(|c| CertificateDer::from(c.der().to_vec())).collect()
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.to_pkcs8_der().to_vec()))
    }
}

/// A certificate chain (leaf first) whose leaf key is held by a [`Signer`], such as an
/// HSM key: the private key never reaches rustls, which asks the signer for one Ed25519
/// signature per handshake.
#[derive(Clone)]
pub struct SignerTlsIdentity {
    pub chain: Vec<Certificate>,
    pub signer: Arc<dyn Signer>,
}

impl fmt::Debug for SignerTlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignerTlsIdentity")
            .field("leaf", &self.chain.first().map(Certificate::role))
            .field("public_key", &self.signer.public_key())
            .finish_non_exhaustive()
    }
}

impl SignerTlsIdentity {
    fn certified_key(&self) -> Arc<rustls::sign::CertifiedKey> {
        let chain = self.chain.iter().map(|c| CertificateDer::from(c.der().to_vec())).collect();
        let key: Arc<dyn rustls::sign::SigningKey> = Arc::new(SignerKey(self.signer.clone()));
        Arc::new(rustls::sign::CertifiedKey::new(chain, key))
    }
}

/// Server side with the key in a [`Signer`]; otherwise as [`server_config`].
pub fn server_config_with_signer(
    identity: &SignerTlsIdentity,
    anchors: Arc<TrustAnchors>,
    revocations: SharedRevocations,
    expected: ExpectedRole,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let verifier = Arc::new(PeerVerifier { anchors, revocations, expected });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedKey(identity.certified_key())));
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Client side with the key in a [`Signer`]; otherwise as [`client_config`].
pub fn client_config_with_signer(
    identity: &SignerTlsIdentity,
    anchors: Arc<TrustAnchors>,
    revocations: SharedRevocations,
    expected: ExpectedRole,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let verifier = Arc::new(PeerVerifier { anchors, revocations, expected });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedKey(identity.certified_key())));
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A rustls signing key that signs through a Molt [`Signer`] (Ed25519 only).
pub struct SignerKey(pub Arc<dyn Signer>);

impl fmt::Debug for SignerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SignerKey").field(&self.0.public_key()).finish()
    }
}

impl rustls::sign::SigningKey for SignerKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&SignatureScheme::ED25519)
            .then(|| Box::new(SignerKey(self.0.clone())) as Box<dyn rustls::sign::Signer>)
    }

    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        // SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING { 0 unused bits, key } }
        let mut der = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
        der.extend_from_slice(self.0.public_key().as_bytes());
        Some(rustls::pki_types::SubjectPublicKeyInfoDer::from(der))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ED25519
    }
}

impl rustls::sign::Signer for SignerKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0
            .try_sign(message)
            .map(|signature| signature.0.to_vec())
            .map_err(|error| rustls::Error::General(format!("tls signature: {error}")))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// Always presents the same certificate and key.
#[derive(Debug)]
struct FixedKey(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedKey {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for FixedKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        sigschemes.contains(&SignatureScheme::ED25519).then(|| self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side (the edge): requires a client certificate of `expected` role.
pub fn server_config(
    identity: &TlsIdentity,
    anchors: Arc<TrustAnchors>,
    revocations: SharedRevocations,
    expected: ExpectedRole,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let verifier = Arc::new(PeerVerifier { anchors, revocations, expected });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain_der(), identity.key_der())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Client side (an agent, or an edge dialling another edge): presents `identity` and
/// requires a server certificate of `expected` role.
pub fn client_config(
    identity: &TlsIdentity,
    anchors: Arc<TrustAnchors>,
    revocations: SharedRevocations,
    expected: ExpectedRole,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let verifier = Arc::new(PeerVerifier { anchors, revocations, expected });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain_der(), identity.key_der())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Re-reads a peer's verified chain after the handshake (the verifier already checked it)
/// to learn its role and key.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Option<Certificate> {
    chain.first().and_then(|leaf| Certificate::from_der(leaf).ok())
}

struct PeerVerifier {
    anchors: Arc<TrustAnchors>,
    revocations: SharedRevocations,
    expected: ExpectedRole,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier").field("expected", &self.expected).finish_non_exhaustive()
    }
}

impl PeerVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<VerifiedCert, rustls::Error> {
        let mut chain: Vec<&[u8]> = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.as_ref());
        chain.extend(intermediates.iter().map(|c| c.as_ref()));
        let now = UnixMillis(now.as_secs().saturating_mul(1000));
        let revocations = self.revocations.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        verify_chain(&chain, &self.anchors, &revocations, now, self.expected)
            .map_err(|error| rustls::Error::General(format!("molt certificate refused: {error}")))
    }

    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::NoSignatureSchemesInCommon));
        }
        let leaf = Certificate::from_der(cert)
            .map_err(|e| rustls::Error::General(format!("peer certificate unreadable: {e}")))?;
        let signature = crate::keys::Signature::from_slice(dss.signature())
            .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))?;
        leaf.public_key()
            .verify(message, &signature)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))?;
        Ok(HandshakeSignatureValid::assertion())
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}
