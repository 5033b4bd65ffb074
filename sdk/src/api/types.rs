//! The control plane's JSON bodies, as the client sends and reads them. Responses ignore
//! members they do not know, so a newer server does not break an older client.

use molt_protocol::AgentId;
use molt_protocol::keys::{KeyBinding, PublicKey};
use serde::{Deserialize, Serialize};

use crate::identity::PeerKeys;

/// An RFC 9457 problem document with Molt's stable `code`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// `urn:molt:problem:<code>`.
    #[serde(rename = "type", default)]
    pub type_uri: String,
    /// Short summary of the status, e.g. `Conflict`.
    #[serde(default)]
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request.
    #[serde(default)]
    pub detail: String,
    /// Stable machine-readable error code, e.g. `org_name_taken`.
    pub code: String,
}

/// An organisation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Org {
    pub id: String,
    pub name: String,
    pub created_at_ms: u64,
}

/// One page of orgs, ordered by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgPage {
    pub items: Vec<Org>,
    /// Pass as `after` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// Paging of admin lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page<'a> {
    /// 1 to 1000; the server's default when `None`.
    pub limit: Option<u32>,
    /// The `next_after` of the previous page.
    pub after: Option<&'a str>,
}

/// An org's CA certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgCa {
    pub org_id: String,
    /// 32 lower-case hex digits.
    pub serial: String,
    pub certificate_pem: String,
    pub crl_number: u64,
}

/// A certificate the control plane just issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// 32 lower-case hex digits.
    pub serial: String,
    /// `agent` or `edge`.
    pub kind: String,
    /// The agent or edge id, derived from the key.
    pub subject_id: String,
    pub certificate_pem: String,
    /// The leaf, then the org CA.
    pub chain_pem: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// Why a certificate is revoked (X.509 reason codes the control plane accepts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
}

impl RevocationReason {
    /// Every reason, in the order `--help` texts list them.
    pub const ALL: [RevocationReason; 5] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "key_compromise",
            RevocationReason::AffiliationChanged => "affiliation_changed",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessation_of_operation",
        }
    }
}

/// A certificate revocation (the first one; repeating it returns the same).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRevocation {
    pub serial: String,
    pub org_id: String,
    pub reason: String,
    pub revoked_at_ms: u64,
}

/// What edges and agents trust: roots, org CAs and CRLs (PEM), with a sequence number
/// that only grows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBundle {
    pub sequence: u64,
    pub roots: Vec<String>,
    pub org_cas: Vec<String>,
    pub crls: Vec<String>,
}

/// An org's CRL as PEM, with its number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crl {
    pub pem: String,
    /// From the `x-molt-crl-number` header, if the server sent it.
    pub number: Option<u64>,
}

/// An admin key (never its token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminKey {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// A new admin key and its token, shown only this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedAdminKey {
    pub key: AdminKey,
    pub token: String,
}

/// One page of admin keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminKeyPage {
    pub items: Vec<AdminKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// Who may read a profile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Listed and searchable.
    #[default]
    Public,
    /// Readable by id, not searchable.
    Unlisted,
    /// Readable by no one but the registry.
    Private,
}

/// Health of a registration, worked out from its last heartbeat when read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Online,
    Degraded,
    Offline,
    Expired,
    /// A state this client does not know yet.
    #[serde(other)]
    Unknown,
}

/// One thing an agent can do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// 1 to 64 bytes of `a-z 0-9 . _ - / :`, e.g. `translate.text`.
    pub name: String,
    /// Free-form, up to 64 bytes.
    #[serde(default)]
    pub version: String,
    /// Up to 16 tags of `a-z 0-9 . _ -`.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// What an agent says about itself: the body of a profile update, and the part of a
/// registration after the id and key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentProfile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    /// Lower-case hex of `KeyBinding::encode()`, signed by the agent's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_binding: Option<String>,
    #[serde(default)]
    pub visibility: Visibility,
    /// An edge id, `edge-…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_edge: Option<String>,
}

/// A registered agent as readers see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub public_key: String,
    pub name: String,
    pub description: String,
    pub capabilities: Vec<Capability>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_binding: Option<String>,
    pub visibility: Visibility,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_edge: Option<String>,
    pub revision: u64,
    pub health: Health,
    pub registered_at_ms: u64,
    pub updated_at_ms: u64,
    pub last_heartbeat_ms: u64,
    pub expires_at_ms: u64,
}

impl Agent {
    /// The keys a peer needs to message this agent, from its registry entry: the
    /// Ed25519 key and the X25519 key named by the signed key binding. The binding's
    /// signature and agent are checked here; that the key belongs to the id is the
    /// registry's word (it checked the registration's signature and keeps the rotation
    /// history). Edges still check every message against the sender's certificate.
    pub fn peer_keys(&self) -> Result<(AgentId, PeerKeys), RegistryKeysError> {
        let agent_id: AgentId = self.id.parse().map_err(|_| RegistryKeysError::Id)?;
        let key_bytes: [u8; 32] = hex::decode(&self.public_key)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(RegistryKeysError::PublicKey)?;
        let signing = PublicKey::from_bytes(&key_bytes).map_err(|_| RegistryKeysError::PublicKey)?;
        let binding_hex = self.key_binding.as_deref().ok_or(RegistryKeysError::NoKeyBinding)?;
        let binding_bytes = hex::decode(binding_hex).map_err(|_| RegistryKeysError::KeyBinding)?;
        let binding = KeyBinding::decode(&binding_bytes).map_err(|_| RegistryKeysError::KeyBinding)?;
        if binding.agent != agent_id {
            return Err(RegistryKeysError::BindingForOtherAgent(binding.agent));
        }
        binding.verify(&signing).map_err(|_| RegistryKeysError::BindingSignature)?;
        Ok((agent_id, PeerKeys { signing, encryption: binding.encryption_key }))
    }
}

/// Why a registry entry gives no usable keys.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryKeysError {
    #[error("the entry's id is not an agent id")]
    Id,
    #[error("the entry's public key is not an Ed25519 key in hex")]
    PublicKey,
    #[error("the agent published no encryption key (no key binding)")]
    NoKeyBinding,
    #[error("the entry's key binding does not decode")]
    KeyBinding,
    #[error("the entry's key binding names another agent ({0})")]
    BindingForOtherAgent(AgentId),
    #[error("the entry's key binding is not signed by its key")]
    BindingSignature,
}

/// The answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub health: Health,
    pub expires_at_ms: u64,
}

/// An agent revoked by an admin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRevocation {
    pub id: String,
    /// The first revocation's time; repeating it changes nothing.
    pub revoked_at_ms: u64,
}

/// A registry search. Every filter is optional; no filter lists every public agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SearchQuery {
    /// Free text over names (typo-tolerant), descriptions and capabilities.
    pub text: Option<String>,
    pub capability: Option<String>,
    pub tag: Option<String>,
    /// 1 to 100; the server's default (20) when `None`.
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One search result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchHit {
    pub agent: Agent,
    /// relevance × liveness × trust.
    pub score: f64,
    pub relevance: f64,
    pub trust: f64,
}

/// A page of search results, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchResults {
    pub items: Vec<SearchHit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// An A2A-style agent card as the control plane exports it. Imports send the card's JSON
/// as written (see [`super::ApiClient::import_agent_card`]), so that the server, not this
/// type, decides what it cannot map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCard {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub capabilities: serde_json::Value,
    #[serde(default)]
    pub skills: Vec<AgentCardSkill>,
    #[serde(default)]
    pub default_input_modes: Vec<String>,
    #[serde(default)]
    pub default_output_modes: Vec<String>,
    pub molt: AgentCardMolt,
}

/// A card's skill: one capability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCardSkill {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub version: String,
}

/// A card's Molt extension: whom the card is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCardMolt {
    pub id: String,
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_binding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_edge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility: Option<Visibility>,
}

#[cfg(test)]
mod tests {
    use molt_protocol::UnixMillis;
    use molt_protocol::keys::{EncryptionSecret, SigningKey};

    use super::*;

    fn entry(key: &SigningKey, binding: Option<&KeyBinding>) -> Agent {
        Agent {
            id: AgentId::from_inception_key(&key.public_key()).to_string(),
            public_key: hex::encode(key.public_key().as_bytes()),
            name: "bob".into(),
            description: String::new(),
            capabilities: Vec::new(),
            key_binding: binding.map(|binding| hex::encode(binding.encode())),
            visibility: Visibility::Public,
            home_edge: None,
            revision: 1,
            health: Health::Online,
            registered_at_ms: 0,
            updated_at_ms: 0,
            last_heartbeat_ms: 0,
            expires_at_ms: 0,
        }
    }

    fn binding(agent: AgentId, key: &SigningKey, encryption: &EncryptionSecret) -> KeyBinding {
        KeyBinding::sign(agent, encryption.public_key(), UnixMillis(1), key).unwrap()
    }

    #[test]
    fn registry_entries_give_keys_only_with_a_binding_signed_for_them() {
        let mut rng = rand::rngs::OsRng;
        let (key, other_key) = (SigningKey::generate(&mut rng), SigningKey::generate(&mut rng));
        let encryption = EncryptionSecret::generate(&mut rng);
        let id = AgentId::from_inception_key(&key.public_key());
        let other_id = AgentId::from_inception_key(&other_key.public_key());

        let good = entry(&key, Some(&binding(id, &key, &encryption)));
        let (agent_id, keys) = good.peer_keys().unwrap();
        assert_eq!(agent_id, id);
        assert_eq!(keys, PeerKeys { signing: key.public_key(), encryption: encryption.public_key() });

        assert_eq!(entry(&key, None).peer_keys(), Err(RegistryKeysError::NoKeyBinding));
        let forged = entry(&key, Some(&binding(id, &other_key, &encryption)));
        assert_eq!(forged.peer_keys(), Err(RegistryKeysError::BindingSignature));
        let someone_elses = entry(&key, Some(&binding(other_id, &key, &encryption)));
        assert_eq!(someone_elses.peer_keys(), Err(RegistryKeysError::BindingForOtherAgent(other_id)));
        let garbled = Agent { key_binding: Some("00ff".into()), ..good.clone() };
        assert_eq!(garbled.peer_keys(), Err(RegistryKeysError::KeyBinding));
        let bad_key = Agent { public_key: "zz".into(), ..good.clone() };
        assert_eq!(bad_key.peer_keys(), Err(RegistryKeysError::PublicKey));
        let bad_id = Agent { id: "edge-x".into(), ..good };
        assert_eq!(bad_id.peer_keys(), Err(RegistryKeysError::Id));
    }
}
