//! Agent key management: rotation, guardians and social recovery ([`crate::keys`]).
//!
//! Rotation, guardian changes and cancelling a recovery are signed by the agent's current
//! key; opening and approving a recovery by a guardian; completing it by the recovery's
//! new key, on the agent's behalf (`Molt-Agent` is the agent being recovered).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use molt_protocol::keys::{KeyBinding, PublicKey, Signature};
use molt_protocol::{AgentId, UnixMillis};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::ca::{IssuedCertificateBody, authority};
use super::problem::{ApiError, Problem};
use super::registry::{own_agent, parse_json};
use crate::agent_auth::{AuthenticatedAgent, SignedRequest};
use crate::ca::LeafKind;
use crate::ids::RecoveryId;
use crate::keys::{self, KeysError, ROTATION_OVERLAP_DEFAULT, Recovery, RotationRequest};

/// Body of `POST /v1/agents/{id}/key-rotations`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKeyRequest {
    /// The new Ed25519 public key, 64 hex digits.
    pub new_public_key: String,
    /// When the new key signed its proof, milliseconds since the Unix epoch (within 5 minutes).
    pub timestamp_ms: u64,
    /// The new key's signature (128 hex digits) over the CA's agent proof of possession:
    /// `"molt-control-plane agent-certificate-request v1\0" ‖ org id ‖ 0x00 ‖ new key ‖ timestamp_ms (u64 BE)`,
    /// where the org is that of the agent's latest certificate.
    pub signature: String,
    /// How long the old key keeps signing and its certificates stay valid, in seconds
    /// (default 86400, at most 604800; 0 revokes them at once).
    pub overlap_seconds: Option<u64>,
    /// The agent's X25519 key binding (hex of `KeyBinding::encode()`) signed by the new
    /// key. Without it the registry drops the old binding.
    pub key_binding: Option<String>,
}

/// A rotation done.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RotationBody {
    pub agent_id: String,
    /// The agent's key epoch: how many times its key changed.
    pub epoch: u64,
    /// The new key's certificate, for the same agent id.
    pub certificate: IssuedCertificateBody,
    /// Until when the old key still signs and its certificates stay valid.
    pub previous_key_until_ms: u64,
    /// Serials of the old certificates, revoked at `previous_key_until_ms`.
    pub superseded_serials: Vec<String>,
}

/// Body of `PUT /v1/agents/{id}/guardians`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuardiansRequest {
    /// How many guardians must approve a recovery: 1 to the number of guardians.
    pub threshold: u32,
    /// 1 to 16 distinct registered agents, not the agent itself.
    pub guardians: Vec<String>,
}

/// An agent's guardians.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GuardiansBody {
    pub agent_id: String,
    pub threshold: u32,
    pub guardians: Vec<String>,
    pub updated_at_ms: u64,
}

/// Body of `POST /v1/agents/{id}/recoveries` and of its `approve`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoveryKeyRequest {
    /// The key the agent's owner will hold (64 hex digits). Guardians approve this exact key.
    pub new_public_key: String,
}

/// A guardian's approval.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApprovalBody {
    pub guardian_id: String,
    pub approved_at_ms: u64,
}

/// A recovery.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecoveryBody {
    pub id: String,
    pub agent_id: String,
    pub new_public_key: String,
    /// `collecting`, `time_locked`, `completed` or `cancelled`.
    pub state: String,
    pub threshold: u32,
    /// The guardian set when the recovery opened.
    pub guardians: Vec<String>,
    pub approvals: Vec<ApprovalBody>,
    pub opened_by: String,
    pub opened_at_ms: u64,
    /// When the time lock ends (once enough guardians approved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unlocks_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_at_ms: Option<u64>,
}

/// A recovery completed: the new key's certificate.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompletedRecoveryBody {
    pub recovery: RecoveryBody,
    pub certificate: IssuedCertificateBody,
}

/// One change of an agent's key.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyEventBody {
    pub epoch: u64,
    /// `rotation` or `recovery`.
    pub kind: String,
    pub old_public_key: String,
    pub new_public_key: String,
    /// The certificate issued for the new key.
    pub serial: String,
    pub at_ms: u64,
}

/// An agent's keys and how they changed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyHistoryBody {
    pub agent_id: String,
    /// The org of the agent's latest certificate, which a rotation's proof of possession
    /// names; absent if it never had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    pub current_public_key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_public_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_key_until_ms: Option<u64>,
    pub epoch: u64,
    pub events: Vec<KeyEventBody>,
}

fn keys_error(error: KeysError) -> ApiError {
    let (status, code) = match &error {
        KeysError::UnknownAgent => (StatusCode::NOT_FOUND, "agent_not_found"),
        KeysError::RevokedAgent => (StatusCode::CONFLICT, "revoked_agent"),
        KeysError::NoCertificate => (StatusCode::CONFLICT, "no_certificate"),
        KeysError::SameKey => (StatusCode::UNPROCESSABLE_ENTITY, "same_key"),
        KeysError::KeyInUse => (StatusCode::CONFLICT, "key_in_use"),
        KeysError::OverlapTooLong => (StatusCode::UNPROCESSABLE_ENTITY, "overlap_too_long"),
        KeysError::KeyBinding(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_key_binding"),
        KeysError::Proof(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_proof_of_possession"),
        KeysError::InvalidGuardians(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_guardians"),
        KeysError::UnknownGuardian(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_guardian"),
        KeysError::NoGuardians => (StatusCode::NOT_FOUND, "no_guardians"),
        KeysError::NotAGuardian => (StatusCode::FORBIDDEN, "not_a_guardian"),
        KeysError::RecoveryInProgress(_) => (StatusCode::CONFLICT, "recovery_in_progress"),
        KeysError::RecoveryNotFound => (StatusCode::NOT_FOUND, "recovery_not_found"),
        KeysError::WrongKey => (StatusCode::CONFLICT, "recovery_key_mismatch"),
        KeysError::RecoveryClosed(_) => (StatusCode::CONFLICT, "recovery_closed"),
        KeysError::RecoveryCollecting => (StatusCode::CONFLICT, "recovery_not_approved"),
        KeysError::TimeLocked(_) => (StatusCode::CONFLICT, "recovery_time_locked"),
        KeysError::Conflict => (StatusCode::CONFLICT, "key_change_conflict"),
        KeysError::Issue(_) | KeysError::Revoke(_) | KeysError::Query(_) => return ApiError::internal(&error),
    };
    ApiError::new(status, code, error.to_string())
}

fn parse_key(text: &str, field: &str) -> Result<PublicKey, ApiError> {
    hex::decode(text).ok().and_then(|bytes| PublicKey::from_slice(&bytes).ok()).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_public_key",
            format!("{field} is not the hex of an Ed25519 public key"),
        )
    })
}

fn parse_agent_id(id: &str) -> Result<AgentId, ApiError> {
    id.parse().map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "agent_not_found", "no such agent"))
}

fn parse_recovery_id(id: &str) -> Result<RecoveryId, ApiError> {
    id.parse().map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "recovery_not_found", "no such recovery"))
}

fn recovery_body(recovery: &Recovery) -> RecoveryBody {
    RecoveryBody {
        id: recovery.id.as_str().to_owned(),
        agent_id: recovery.agent.to_string(),
        new_public_key: hex::encode(recovery.new_key.as_bytes()),
        state: recovery.state.as_str().to_owned(),
        threshold: recovery.threshold,
        guardians: recovery.guardians.iter().map(ToString::to_string).collect(),
        approvals: recovery
            .approvals
            .iter()
            .map(|(guardian, at)| ApprovalBody { guardian_id: guardian.to_string(), approved_at_ms: at.0 })
            .collect(),
        opened_by: recovery.opened_by.to_string(),
        opened_at_ms: recovery.opened_at.0,
        unlocks_at_ms: recovery.unlocks_at.map(|at| at.0),
        closed_at_ms: recovery.closed_at.map(|at| at.0),
    }
}

fn guardians_body(agent: AgentId, guardians: &keys::Guardians) -> GuardiansBody {
    GuardiansBody {
        agent_id: agent.to_string(),
        threshold: guardians.threshold,
        guardians: guardians.guardians.iter().map(ToString::to_string).collect(),
        updated_at_ms: guardians.updated_at.0,
    }
}

/// Rotates the agent's key: certifies a new key for the same id. Signed by the current key.
#[utoipa::path(post, path = "/v1/agents/{id}/key-rotations", tag = "agent keys", request_body = RotateKeyRequest,
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 201, description = "Rotated; the old key lasts for the overlap", body = RotationBody),
        (status = 401, description = "Bad, stale or replayed signature, unknown or revoked agent, or signed by the replaced key (current_key_required)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Signed by another agent (not_your_agent)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "no_certificate, key_in_use, key_change_conflict", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown fields, invalid key, same_key, overlap_too_long, invalid_proof_of_possession, invalid_key_binding", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No certificate authority (ca_unavailable)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn rotate_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: AuthenticatedAgent,
) -> Result<(StatusCode, Json<RotationBody>), ApiError> {
    let agent = own_agent(&id, &caller)?;
    caller.require_current_key()?;
    let request: RotateKeyRequest = parse_json(&caller.body)?;
    let ca = authority(&state)?;
    let unprocessable = |code, detail: &str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail.to_owned());
    let new_key = parse_key(&request.new_public_key, "new_public_key")?;
    let signature = hex::decode(&request.signature)
        .ok()
        .and_then(|bytes| <[u8; 64]>::try_from(bytes).ok())
        .map(Signature)
        .ok_or_else(|| unprocessable("invalid_signature_encoding", "signature is not 128 hex digits"))?;
    let key_binding = request
        .key_binding
        .as_deref()
        .map(|text| {
            hex::decode(text).ok().and_then(|bytes| KeyBinding::decode(&bytes).ok()).ok_or_else(|| {
                unprocessable("invalid_key_binding", "key_binding is not the hex of an encoded key binding")
            })
        })
        .transpose()?;
    let overlap = request.overlap_seconds.map_or(ROTATION_OVERLAP_DEFAULT, std::time::Duration::from_secs);
    let rotation = RotationRequest {
        new_key,
        proof_timestamp: UnixMillis(request.timestamp_ms),
        proof_signature: signature,
        overlap,
        key_binding,
    };
    let now = state.clock.now();
    let rotation = keys::rotate(&state.db, ca, agent, &caller.key, &rotation, now).await;
    // Whatever the outcome, kept keys may no longer be the stored ones.
    state.signing_keys.forget(agent);
    let rotation = rotation.map_err(keys_error)?;
    Ok((
        StatusCode::CREATED,
        Json(RotationBody {
            agent_id: agent.to_string(),
            epoch: rotation.epoch,
            certificate: IssuedCertificateBody::new(&rotation.issued, LeafKind::Agent),
            previous_key_until_ms: rotation.previous_key_until.0,
            superseded_serials: rotation.superseded.iter().map(ToString::to_string).collect(),
        }),
    ))
}

/// The agent's current key, the key a rotation replaced (while it lasts) and every change.
#[utoipa::path(get, path = "/v1/agents/{id}/keys", tag = "agent keys",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, description = "The key history", body = KeyHistoryBody),
        (status = 404, description = "No such agent (agent_not_found)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn key_history(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<KeyHistoryBody>, ApiError> {
    let agent = parse_agent_id(&id)?;
    let history = keys::key_history(&state.db, agent).await.map_err(keys_error)?;
    Ok(Json(KeyHistoryBody {
        agent_id: agent.to_string(),
        org_id: history.org.as_ref().map(|org| org.as_str().to_owned()),
        current_public_key: hex::encode(history.current.as_bytes()),
        previous_public_key: history.previous.map(|(key, _)| hex::encode(key.as_bytes())),
        previous_key_until_ms: history.previous.map(|(_, until)| until.0),
        epoch: history.epoch,
        events: history
            .events
            .iter()
            .map(|event| KeyEventBody {
                epoch: event.epoch,
                kind: event.kind.clone(),
                old_public_key: hex::encode(event.old_key.as_bytes()),
                new_public_key: hex::encode(event.new_key.as_bytes()),
                serial: event.serial.to_string(),
                at_ms: event.at.0,
            })
            .collect(),
    }))
}

/// Names the agent's guardians, replacing any. Signed by the current key.
#[utoipa::path(put, path = "/v1/agents/{id}/guardians", tag = "agent keys", request_body = GuardiansRequest,
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, description = "The guardians", body = GuardiansBody),
        (status = 401, description = "Bad, stale or replayed signature, or signed by the replaced key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Signed by another agent (not_your_agent)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_guardians (count, threshold, self, duplicates, malformed id) or unknown_guardian", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn set_guardians(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: AuthenticatedAgent,
) -> Result<Json<GuardiansBody>, ApiError> {
    let agent = own_agent(&id, &caller)?;
    caller.require_current_key()?;
    let request: GuardiansRequest = parse_json(&caller.body)?;
    let guardians = request
        .guardians
        .iter()
        .map(|text| {
            text.parse::<AgentId>().map_err(|_| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_guardians",
                    format!("{text:?} is not an agent id"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let now = state.clock.now();
    let set = keys::set_guardians(&state.db, agent, request.threshold, &guardians, now).await.map_err(keys_error)?;
    Ok(Json(guardians_body(agent, &set)))
}

/// The agent's guardians (public: guardians need to know).
#[utoipa::path(get, path = "/v1/agents/{id}/guardians", tag = "agent keys",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, description = "The guardians", body = GuardiansBody),
        (status = 404, description = "No guardians (no_guardians)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_guardians(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<GuardiansBody>, ApiError> {
    let agent = parse_agent_id(&id)?;
    let set = keys::guardians(&state.db, agent)
        .await
        .map_err(keys_error)?
        .ok_or_else(|| keys_error(KeysError::NoGuardians))?;
    Ok(Json(guardians_body(agent, &set)))
}

/// Removes the agent's guardians. Signed by the current key. An open recovery keeps its set.
#[utoipa::path(delete, path = "/v1/agents/{id}/guardians", tag = "agent keys",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Bad, stale or replayed signature, or signed by the replaced key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No guardians (no_guardians)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn clear_guardians(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: AuthenticatedAgent,
) -> Result<StatusCode, ApiError> {
    let agent = own_agent(&id, &caller)?;
    caller.require_current_key()?;
    if keys::clear_guardians(&state.db, agent).await.map_err(keys_error)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(keys_error(KeysError::NoGuardians))
    }
}

/// Opens a recovery of the agent to a new key. Signed by one of its guardians, whose
/// approval it counts.
#[utoipa::path(post, path = "/v1/agents/{id}/recoveries", tag = "agent keys", request_body = RecoveryKeyRequest,
    params(("id" = String, Path, description = "The agent to recover")),
    responses(
        (status = 201, description = "Opened", body = RecoveryBody),
        (status = 401, description = "Bad, stale or replayed signature; unknown or revoked guardian", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The signer is not a guardian (not_a_guardian)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "agent_not_found, no_guardians", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "recovery_in_progress, key_in_use, no_certificate, revoked_agent", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_public_key, same_key", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn open_recovery(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: AuthenticatedAgent,
) -> Result<(StatusCode, Json<RecoveryBody>), ApiError> {
    let agent = parse_agent_id(&id)?;
    let request: RecoveryKeyRequest = parse_json(&caller.body)?;
    let new_key = parse_key(&request.new_public_key, "new_public_key")?;
    let now = state.clock.now();
    let recovery =
        keys::open_recovery(&state.db, &state.keys, caller.agent, agent, new_key, now).await.map_err(keys_error)?;
    Ok((StatusCode::CREATED, Json(recovery_body(&recovery))))
}

/// A recovery (public).
#[utoipa::path(get, path = "/v1/agents/{id}/recoveries/{recovery}", tag = "agent keys",
    params(("id" = String, Path, description = "Agent id"), ("recovery" = String, Path, description = "Recovery id")),
    responses(
        (status = 200, description = "The recovery", body = RecoveryBody),
        (status = 404, description = "recovery_not_found", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_recovery(
    State(state): State<AppState>,
    Path((id, recovery)): Path<(String, String)>,
) -> Result<Json<RecoveryBody>, ApiError> {
    let agent = parse_agent_id(&id)?;
    let recovery = parse_recovery_id(&recovery)?;
    let found = keys::recovery(&state.db, agent, &recovery).await.map_err(keys_error)?;
    Ok(Json(recovery_body(&found)))
}

/// A guardian approves the recovery's new key. Idempotent.
#[utoipa::path(post, path = "/v1/agents/{id}/recoveries/{recovery}/approve", tag = "agent keys",
    request_body = RecoveryKeyRequest,
    params(("id" = String, Path, description = "Agent id"), ("recovery" = String, Path, description = "Recovery id")),
    responses(
        (status = 200, description = "Approved; `time_locked` once enough guardians have", body = RecoveryBody),
        (status = 403, description = "not_a_guardian", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "recovery_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "recovery_key_mismatch, recovery_closed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn approve_recovery(
    State(state): State<AppState>,
    Path((id, recovery)): Path<(String, String)>,
    caller: AuthenticatedAgent,
) -> Result<Json<RecoveryBody>, ApiError> {
    let agent = parse_agent_id(&id)?;
    let recovery = parse_recovery_id(&recovery)?;
    let request: RecoveryKeyRequest = parse_json(&caller.body)?;
    let new_key = parse_key(&request.new_public_key, "new_public_key")?;
    let now = state.clock.now();
    let approved = keys::approve_recovery(&state.db, &state.keys, caller.agent, agent, &recovery, &new_key, now)
        .await
        .map_err(keys_error)?;
    Ok(Json(recovery_body(&approved)))
}

/// Cancels a recovery. Signed by the agent's current key: the owner still holds it.
#[utoipa::path(post, path = "/v1/agents/{id}/recoveries/{recovery}/cancel", tag = "agent keys",
    params(("id" = String, Path, description = "Agent id"), ("recovery" = String, Path, description = "Recovery id")),
    responses(
        (status = 200, description = "Cancelled", body = RecoveryBody),
        (status = 401, description = "Bad signature, or signed by the replaced key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Signed by another agent (not_your_agent)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "recovery_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "recovery_closed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn cancel_recovery(
    State(state): State<AppState>,
    Path((id, recovery)): Path<(String, String)>,
    caller: AuthenticatedAgent,
) -> Result<Json<RecoveryBody>, ApiError> {
    let agent = own_agent(&id, &caller)?;
    caller.require_current_key()?;
    let recovery = parse_recovery_id(&recovery)?;
    let cancelled = keys::cancel_recovery(&state.db, agent, &recovery, state.clock.now()).await.map_err(keys_error)?;
    Ok(Json(recovery_body(&cancelled)))
}

/// Completes a recovery after its time lock. Signed by the recovery's new key, with
/// `Molt-Agent` naming the agent recovered.
#[utoipa::path(post, path = "/v1/agents/{id}/recoveries/{recovery}/complete", tag = "agent keys",
    params(("id" = String, Path, description = "Agent id"), ("recovery" = String, Path, description = "Recovery id")),
    responses(
        (status = 200, description = "Completed: the new key is current and certified; every older certificate is revoked", body = CompletedRecoveryBody),
        (status = 401, description = "Not signed by the recovery's new key, stale or replayed", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Molt-Agent is not the agent in the path (not_your_agent)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "recovery_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "recovery_not_approved, recovery_time_locked, recovery_closed, revoked_agent", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No certificate authority (ca_unavailable)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn complete_recovery(
    State(state): State<AppState>,
    Path((id, recovery)): Path<(String, String)>,
    signed: SignedRequest,
) -> Result<Json<CompletedRecoveryBody>, ApiError> {
    let agent = parse_agent_id(&id)?;
    if signed.agent != agent {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "not_your_agent", "Molt-Agent must name the agent recovered"));
    }
    let recovery = parse_recovery_id(&recovery)?;
    let ca = authority(&state)?;
    let found = keys::recovery(&state.db, agent, &recovery).await.map_err(keys_error)?;
    let now = state.clock.now();
    signed.verify(&found.new_key, &state.nonces, now).await?;
    let completed = keys::complete_recovery(&state.db, ca, agent, &recovery, now).await;
    // Whatever the outcome, kept keys may no longer be the stored ones.
    state.signing_keys.forget(agent);
    let (completed, issued) = completed.map_err(keys_error)?;
    Ok(Json(CompletedRecoveryBody {
        recovery: recovery_body(&completed),
        certificate: IssuedCertificateBody::new(&issued, LeafKind::Agent),
    }))
}
