//! Agent key management: rotation, guardians and social recovery
//! (`/v1/agents/{id}/key-rotations`, `…/keys`, `…/guardians`, `…/recoveries`).
//!
//! Rotation, guardian changes and cancelling a recovery are signed by the agent's current
//! key; opening and approving a recovery by a guardian; completing it by the new key, on
//! the recovered agent's behalf.

use std::time::Duration;

use molt_protocol::keys::{KeyBinding, PublicKey, SigningKey};
use molt_protocol::{AgentId, UnixMillis};
use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::{AGENT_PROOF_DOMAIN, AgentCredentials, ApiClient, ApiError, Auth, IssuedCertificate, possession_message};

/// A rotation done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    pub agent_id: String,
    /// How many times the agent's key has changed.
    pub epoch: u64,
    /// The new key's certificate, for the same agent id.
    pub certificate: IssuedCertificate,
    /// Until when the old key still signs and its certificates stay valid.
    pub previous_key_until_ms: u64,
    /// The old certificates, revoked at `previous_key_until_ms`.
    pub superseded_serials: Vec<String>,
}

/// One change of an agent's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEvent {
    pub epoch: u64,
    /// `rotation` or `recovery`.
    pub kind: String,
    pub old_public_key: String,
    pub new_public_key: String,
    pub serial: String,
    pub at_ms: u64,
}

/// An agent's keys and how they changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHistory {
    pub agent_id: String,
    /// The org of its latest certificate (a rotation's proof names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    pub current_public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_public_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_until_ms: Option<u64>,
    pub epoch: u64,
    pub events: Vec<KeyEvent>,
}

/// An agent's guardians.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guardians {
    pub agent_id: String,
    pub threshold: u32,
    pub guardians: Vec<String>,
    pub updated_at_ms: u64,
}

/// A guardian's approval of a recovery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub guardian_id: String,
    pub approved_at_ms: u64,
}

/// A recovery of an agent's key by its guardians.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    pub id: String,
    pub agent_id: String,
    pub new_public_key: String,
    /// `collecting`, `time_locked`, `completed` or `cancelled`.
    pub state: String,
    pub threshold: u32,
    pub guardians: Vec<String>,
    pub approvals: Vec<Approval>,
    pub opened_by: String,
    pub opened_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlocks_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at_ms: Option<u64>,
}

/// A completed recovery and the new key's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedRecovery {
    pub recovery: Recovery,
    pub certificate: IssuedCertificate,
}

#[derive(Serialize)]
struct RotateBody {
    new_public_key: String,
    timestamp_ms: u64,
    signature: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    overlap_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_binding: Option<String>,
}

#[derive(Serialize)]
struct GuardiansBody<'a> {
    threshold: u32,
    guardians: &'a [String],
}

#[derive(Serialize)]
struct RecoveryKeyBody {
    new_public_key: String,
}

fn key_hex(key: &PublicKey) -> String {
    hex::encode(key.as_bytes())
}

impl ApiClient {
    /// `GET /v1/agents/{id}/keys` (public).
    pub async fn key_history(&self, agent_id: AgentId) -> Result<KeyHistory, ApiError> {
        let id = agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "keys"];
        self.json(Method::GET, &path, &[], Auth::Public, None::<&()>, "reading an agent's keys").await
    }

    /// `POST /v1/agents/{id}/key-rotations`, signed by `agent`'s current key: certifies
    /// `new_key` for the same id. The proof of possession names the org of the agent's
    /// latest certificate, read first from [`ApiClient::key_history`]. `overlap` is how
    /// long the old key keeps working (server default 24 h); `key_binding` is the X25519
    /// binding signed by the new key.
    pub async fn rotate_key(
        &self,
        agent: &AgentCredentials,
        new_key: &SigningKey,
        overlap: Option<Duration>,
        key_binding: Option<&KeyBinding>,
        now: UnixMillis,
    ) -> Result<Rotation, ApiError> {
        let operation = "rotating an agent's key";
        let history = self.key_history(agent.agent_id).await?;
        let org = history.org_id.unwrap_or_default();
        let public_key = new_key.public_key();
        let signature = new_key.sign(&possession_message(AGENT_PROOF_DOMAIN, &org, &public_key, now));
        let body = RotateBody {
            new_public_key: key_hex(&public_key),
            timestamp_ms: now.0,
            signature: hex::encode(signature.0),
            overlap_seconds: overlap.map(|overlap| overlap.as_secs()),
            key_binding: key_binding.map(|binding| hex::encode(binding.encode())),
        };
        let id = agent.agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "key-rotations"];
        self.json(Method::POST, &path, &[], Auth::Agent(agent), Some(&body), operation).await
    }

    /// `PUT /v1/agents/{id}/guardians`, signed by the agent's current key.
    pub async fn set_guardians(
        &self,
        agent: &AgentCredentials,
        threshold: u32,
        guardians: &[AgentId],
    ) -> Result<Guardians, ApiError> {
        let guardians: Vec<String> = guardians.iter().map(ToString::to_string).collect();
        let body = GuardiansBody { threshold, guardians: &guardians };
        let id = agent.agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "guardians"];
        self.json(Method::PUT, &path, &[], Auth::Agent(agent), Some(&body), "naming guardians").await
    }

    /// `GET /v1/agents/{id}/guardians` (public).
    pub async fn guardians(&self, agent_id: AgentId) -> Result<Guardians, ApiError> {
        let id = agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "guardians"];
        self.json(Method::GET, &path, &[], Auth::Public, None::<&()>, "reading guardians").await
    }

    /// `DELETE /v1/agents/{id}/guardians`, signed by the agent's current key.
    pub async fn clear_guardians(&self, agent: &AgentCredentials) -> Result<(), ApiError> {
        let id = agent.agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "guardians"];
        self.send(Method::DELETE, &path, &[], Auth::Agent(agent), None::<&()>, "removing guardians").await?;
        Ok(())
    }

    /// `POST /v1/agents/{id}/recoveries`, signed by `guardian`: opens a recovery of
    /// `agent_id` to `new_key` (the owner's new public key) and approves it.
    pub async fn open_recovery(
        &self,
        guardian: &AgentCredentials,
        agent_id: AgentId,
        new_key: &PublicKey,
    ) -> Result<Recovery, ApiError> {
        let id = agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "recoveries"];
        let body = RecoveryKeyBody { new_public_key: key_hex(new_key) };
        self.json(Method::POST, &path, &[], Auth::Agent(guardian), Some(&body), "opening a recovery").await
    }

    /// `POST /v1/agents/{id}/recoveries/{recovery}/approve`, signed by `guardian`, for
    /// exactly `new_key`.
    pub async fn approve_recovery(
        &self,
        guardian: &AgentCredentials,
        agent_id: AgentId,
        recovery_id: &str,
        new_key: &PublicKey,
    ) -> Result<Recovery, ApiError> {
        let id = agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "recoveries", recovery_id, "approve"];
        let body = RecoveryKeyBody { new_public_key: key_hex(new_key) };
        self.json(Method::POST, &path, &[], Auth::Agent(guardian), Some(&body), "approving a recovery").await
    }

    /// `GET /v1/agents/{id}/recoveries/{recovery}` (public).
    pub async fn recovery(&self, agent_id: AgentId, recovery_id: &str) -> Result<Recovery, ApiError> {
        let id = agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "recoveries", recovery_id];
        self.json(Method::GET, &path, &[], Auth::Public, None::<&()>, "reading a recovery").await
    }

    /// `POST /v1/agents/{id}/recoveries/{recovery}/cancel`, signed by the agent's current key.
    pub async fn cancel_recovery(&self, agent: &AgentCredentials, recovery_id: &str) -> Result<Recovery, ApiError> {
        let id = agent.agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "recoveries", recovery_id, "cancel"];
        self.json(Method::POST, &path, &[], Auth::Agent(agent), None::<&()>, "cancelling a recovery").await
    }

    /// `POST /v1/agents/{id}/recoveries/{recovery}/complete`, signed by the recovery's
    /// new key (`recovered` holds the agent id and that key), after the time lock.
    pub async fn complete_recovery(
        &self,
        recovered: &AgentCredentials,
        recovery_id: &str,
    ) -> Result<CompletedRecovery, ApiError> {
        let id = recovered.agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "recoveries", recovery_id, "complete"];
        self.json(Method::POST, &path, &[], Auth::Agent(recovered), None::<&()>, "completing a recovery").await
    }
}
