//! Who an agent is (its certificate chain, signing key and encryption key) and what it
//! knows of its peers (their verified signing and encryption keys).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use molt_protocol::cert::{Certificate, ChainError, ExpectedRole, Revocations, Role, TrustAnchors, verify_chain};
use molt_protocol::keys::{EncryptionPublicKey, EncryptionSecret, KeyBinding, KeyError, PublicKey, SigningKey};
use molt_protocol::tls::TlsIdentity;
use molt_protocol::{AgentId, UnixMillis};

/// An agent's own keys and certificate chain (leaf first, then its org CA).
pub struct AgentIdentity {
    pub agent_id: AgentId,
    pub chain: Vec<Certificate>,
    pub signing_key: SigningKey,
    pub encryption_secret: EncryptionSecret,
}

impl fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentIdentity").field("agent_id", &self.agent_id).finish_non_exhaustive()
    }
}

/// Why an identity or a peer's keys were refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("the leaf certificate is for {0:?}, not an agent")]
    NotAnAgent(Role),
    #[error("the signing key does not match the leaf certificate")]
    KeyMismatch,
    #[error("the certificate chain does not verify: {0}")]
    Chain(#[from] ChainError),
    #[error("the key binding names {binding}, but the certificate is for {certificate}")]
    BindingForOtherAgent { binding: AgentId, certificate: AgentId },
    #[error("the key binding does not verify: {0}")]
    Binding(#[from] KeyError),
}

impl AgentIdentity {
    /// Checks the key matches the leaf and the leaf is an agent certificate.
    pub fn new(
        chain: Vec<Certificate>,
        signing_key: SigningKey,
        encryption_secret: EncryptionSecret,
    ) -> Result<AgentIdentity, IdentityError> {
        let leaf = chain.first().ok_or(IdentityError::EmptyChain)?;
        let Role::Agent(agent_id) = leaf.role() else { return Err(IdentityError::NotAnAgent(leaf.role())) };
        if leaf.public_key() != signing_key.public_key() {
            return Err(IdentityError::KeyMismatch);
        }
        Ok(AgentIdentity { agent_id, chain, signing_key, encryption_secret })
    }

    pub fn tls(&self) -> TlsIdentity {
        TlsIdentity { chain: self.chain.clone(), key: self.signing_key.clone() }
    }

    /// This agent's own keys as a peer sees them.
    pub fn peer_keys(&self) -> PeerKeys {
        PeerKeys { signing: self.signing_key.public_key(), encryption: self.encryption_secret.public_key() }
    }

    /// A fresh signed binding of this agent's encryption key, for publishing.
    pub fn key_binding(&self, now: UnixMillis) -> KeyBinding {
        // Invariant: a software key cannot fail to sign.
        KeyBinding::sign(self.agent_id, self.encryption_secret.public_key(), now, &self.signing_key)
            .expect("software signing does not fail")
    }
}

/// A peer's current keys, checked against its certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerKeys {
    pub signing: PublicKey,
    pub encryption: EncryptionPublicKey,
}

impl PeerKeys {
    /// Verifies a peer's certificate chain and its signed encryption-key binding.
    pub fn verify(
        chain: &[Certificate],
        binding: &KeyBinding,
        anchors: &TrustAnchors,
        revocations: &Revocations,
        now: UnixMillis,
    ) -> Result<(AgentId, PeerKeys), IdentityError> {
        let ders: Vec<&[u8]> = chain.iter().map(Certificate::der).collect();
        let verified = verify_chain(&ders, anchors, revocations, now, ExpectedRole::AnyAgent)?;
        let Role::Agent(agent_id) = verified.role else { return Err(IdentityError::NotAnAgent(verified.role)) };
        if binding.agent != agent_id {
            return Err(IdentityError::BindingForOtherAgent { binding: binding.agent, certificate: agent_id });
        }
        binding.verify(&verified.public_key)?;
        Ok((agent_id, PeerKeys { signing: verified.public_key, encryption: binding.encryption_key }))
    }
}

/// The peers an agent can talk to: their verified keys by id. Shared and cheap to clone.
/// Filled from agent cards now, from the registry later.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    peers: Arc<RwLock<HashMap<AgentId, PeerKeys>>>,
}

impl Directory {
    pub fn new() -> Directory {
        Directory::default()
    }

    pub fn insert(&self, agent: AgentId, keys: PeerKeys) {
        self.peers.write().unwrap_or_else(|p| p.into_inner()).insert(agent, keys);
    }

    pub fn get(&self, agent: &AgentId) -> Option<PeerKeys> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).get(agent).copied()
    }

    pub fn len(&self) -> usize {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
