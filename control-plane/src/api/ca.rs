//! The certificate authority's routes: org CAs, agent and edge certificates (on proof of
//! possession of the key), revocation, CRLs and the public trust bundle.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use molt_protocol::cert::Serial;
use molt_protocol::keys::{PublicKey, Signature};
use molt_protocol::time::UnixMillis;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::extract::{ApiJson, Authorized, RequiredScope};
use super::problem::{ApiError, Problem};
use crate::auth::Scope;
use crate::ca::{
    Authority, CrlError, DNS_NAMES_MAX, IssueCertificateError, IssuedCertificate, LeafKind, OrgCaError,
    PossessionProof, ProofError, RevocationReason, RevokeError,
};
use crate::ids::OrgId;

/// Content type of the CRL: PEM text.
pub const PEM_CONTENT_TYPE: &str = "application/x-pem-file";
/// Header carrying the CRL's number beside the PEM.
pub const CRL_NUMBER_HEADER: &str = "x-molt-crl-number";
/// Longest DNS name on an edge certificate.
pub const DNS_NAME_LEN_MAX: usize = 253;

/// Marker for [`Scope::CaWrite`].
#[derive(Debug)]
pub struct CaWriteScope;

impl RequiredScope for CaWriteScope {
    const SCOPE: Scope = Scope::CaWrite;
}

/// An org's CA.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrgCaBody {
    pub org_id: String,
    /// 32 lower-case hex digits.
    pub serial: String,
    pub certificate_pem: String,
    /// Number of the org's current CRL.
    pub crl_number: u64,
}

/// Body of `POST /v1/orgs/{id}/agents/certificates`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentCertificateRequest {
    /// The agent's Ed25519 public key, 64 hex digits. The agent id is derived from it.
    pub public_key: String,
    /// When the proof was signed, milliseconds since the Unix epoch; at most 5 minutes
    /// from the control plane's clock.
    pub timestamp_ms: u64,
    /// Ed25519 signature (128 hex digits) by the key over
    /// `"molt-control-plane agent-certificate-request v1\0" ‖ org id ‖ 0x00 ‖ public key ‖ timestamp_ms (u64 BE)`.
    pub signature: String,
}

/// Body of `POST /v1/orgs/{id}/edges/certificates`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeCertificateRequest {
    /// The edge's Ed25519 public key, 64 hex digits. The edge id is derived from it.
    pub public_key: String,
    /// As for agents.
    pub timestamp_ms: u64,
    /// As for agents, with the domain `"molt-control-plane edge-certificate-request v1\0"`.
    pub signature: String,
    /// 1 to 32 DNS names the edge serves (lower-case; agents send one as SNI).
    pub dns_names: Vec<String>,
}

/// A certificate just issued.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IssuedCertificateBody {
    /// 32 lower-case hex digits; revoke by it.
    pub serial: String,
    /// `agent` or `edge`.
    pub kind: String,
    /// The agent or edge id derived from the key.
    pub subject_id: String,
    /// The leaf alone.
    pub certificate_pem: String,
    /// The leaf followed by the org CA: what the holder presents.
    pub chain_pem: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// Body of `POST /v1/certificates/{serial}/revoke`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// `unspecified` (default), `key_compromise`, `affiliation_changed`, `superseded` or
    /// `cessation_of_operation`.
    pub reason: Option<String>,
}

/// A revoked certificate.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RevocationBody {
    pub serial: String,
    pub org_id: String,
    pub reason: String,
    pub revoked_at_ms: u64,
}

/// What agents and edges need to verify certificates.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TrustBundleBody {
    /// Grows with every change to the roots, org CAs or revocations.
    pub sequence: u64,
    /// Root certificates (PEM).
    pub roots: Vec<String>,
    /// Org CA certificates (PEM).
    pub org_cas: Vec<String>,
    /// Each org CA's current CRL (PEM).
    pub crls: Vec<String>,
}

pub(super) fn authority(state: &AppState) -> Result<&Authority, ApiError> {
    state.ca.as_deref().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ca_unavailable", "the certificate authority is not configured")
    })
}

fn org_not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "org_not_found", "no such org")
}

fn unprocessable(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
}

fn org_ca_error(error: OrgCaError) -> ApiError {
    match error {
        OrgCaError::OrgNotFound => org_not_found(),
        other => ApiError::internal(&other),
    }
}

/// Creates the org's CA if it has none; returns it either way.
#[utoipa::path(post, path = "/v1/orgs/{id}/ca", tag = "certificate authority",
    params(("id" = String, Path, description = "Org id")),
    security(("admin_key" = ["ca:write"])),
    responses(
        (status = 201, description = "Created", body = OrgCaBody),
        (status = 200, description = "The org already had a CA", body = OrgCaBody),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ca:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such org (org_not_found)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_org_ca(
    State(state): State<AppState>,
    _authorized: Authorized<CaWriteScope>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<OrgCaBody>), ApiError> {
    let ca = authority(&state)?;
    let org: OrgId = id.parse().map_err(|_| org_not_found())?;
    let (org_ca, created) = ca.ensure_org_ca(&state.db, &org, state.clock.now()).await.map_err(org_ca_error)?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((
        status,
        Json(OrgCaBody {
            org_id: org.to_string(),
            serial: org_ca.certificate.serial().to_string(),
            certificate_pem: org_ca.certificate.to_pem(),
            crl_number: org_ca.crl_number,
        }),
    ))
}

/// Issues an agent certificate to the holder of the key.
#[utoipa::path(post, path = "/v1/orgs/{id}/agents/certificates", tag = "certificate authority",
    params(("id" = String, Path, description = "Org id")),
    request_body = AgentCertificateRequest,
    security(("admin_key" = ["ca:write"])),
    responses(
        (status = 201, description = "Issued", body = IssuedCertificateBody),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ca:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such org (org_not_found)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_public_key, invalid_signature, stale_timestamp, invalid_proof_of_possession, or unknown or missing fields", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn issue_agent_certificate(
    State(state): State<AppState>,
    authorized: Authorized<CaWriteScope>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<AgentCertificateRequest>,
) -> Result<(StatusCode, Json<IssuedCertificateBody>), ApiError> {
    let request = LeafRequest {
        kind: LeafKind::Agent,
        public_key: &request.public_key,
        timestamp_ms: request.timestamp_ms,
        signature: &request.signature,
        dns_names: &[],
    };
    issue(&state, &authorized, &id, request).await
}

/// Issues an edge certificate to the holder of the key.
#[utoipa::path(post, path = "/v1/orgs/{id}/edges/certificates", tag = "certificate authority",
    params(("id" = String, Path, description = "Org id")),
    request_body = EdgeCertificateRequest,
    security(("admin_key" = ["ca:write"])),
    responses(
        (status = 201, description = "Issued", body = IssuedCertificateBody),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ca:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such org (org_not_found)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_public_key, invalid_signature, invalid_dns_names, stale_timestamp, invalid_proof_of_possession, or unknown or missing fields", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn issue_edge_certificate(
    State(state): State<AppState>,
    authorized: Authorized<CaWriteScope>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<EdgeCertificateRequest>,
) -> Result<(StatusCode, Json<IssuedCertificateBody>), ApiError> {
    let leaf = LeafRequest {
        kind: LeafKind::Edge,
        public_key: &request.public_key,
        timestamp_ms: request.timestamp_ms,
        signature: &request.signature,
        dns_names: &request.dns_names,
    };
    issue(&state, &authorized, &id, leaf).await
}

struct LeafRequest<'a> {
    kind: LeafKind,
    public_key: &'a str,
    timestamp_ms: u64,
    signature: &'a str,
    dns_names: &'a [String],
}

async fn issue(
    state: &AppState,
    authorized: &Authorized<CaWriteScope>,
    org: &str,
    request: LeafRequest<'_>,
) -> Result<(StatusCode, Json<IssuedCertificateBody>), ApiError> {
    let ca = authority(state)?;
    let org: OrgId = org.parse().map_err(|_| org_not_found())?;
    let public_key =
        decode_hex(request.public_key).and_then(|bytes| PublicKey::from_slice(&bytes).ok()).ok_or_else(|| {
            unprocessable("invalid_public_key", "public_key is not an Ed25519 public key in 64 hex digits")
        })?;
    let signature = decode_hex(request.signature)
        .and_then(|bytes| Signature::from_slice(&bytes))
        .ok_or_else(|| unprocessable("invalid_signature", "signature is not 128 hex digits"))?;
    if request.kind == LeafKind::Edge {
        check_dns_names(request.dns_names)?;
    }
    if state.db.org(&org).await.map_err(|error| ApiError::internal(&error))?.is_none() {
        return Err(org_not_found());
    }
    let now = state.clock.now();
    let proof =
        PossessionProof::verify(request.kind, &org, &public_key, UnixMillis(request.timestamp_ms), &signature, now)
            .map_err(|error| match error {
                ProofError::Stale => unprocessable("stale_timestamp", error.to_string()),
                _ => unprocessable("invalid_proof_of_possession", error.to_string()),
            })?;
    let issued = ca.issue(&state.db, &proof, request.dns_names, now).await.map_err(|error| match error {
        IssueCertificateError::OrgCa(OrgCaError::OrgNotFound) => org_not_found(),
        other => ApiError::internal(&other),
    })?;
    tracing::info!(key = %authorized.key_id, serial = %issued.certificate.serial(), "certificate issued by admin request");
    Ok((StatusCode::CREATED, Json(IssuedCertificateBody::new(&issued, request.kind))))
}

impl IssuedCertificateBody {
    /// The answer for a certificate just issued.
    pub(super) fn new(issued: &IssuedCertificate, kind: LeafKind) -> IssuedCertificateBody {
        let validity = issued.certificate.validity();
        let certificate_pem = issued.certificate.to_pem();
        IssuedCertificateBody {
            serial: issued.certificate.serial().to_string(),
            kind: kind.as_str().to_owned(),
            subject_id: issued.subject_id.clone(),
            chain_pem: format!("{certificate_pem}{}", issued.org_ca.to_pem()),
            certificate_pem,
            not_before_ms: validity.not_before.0,
            not_after_ms: validity.not_after.0,
        }
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER_PERMISSIVE.decode(text.as_bytes()).ok()
}

/// 1 to 32 names, each lower-case LDH labels of 1 to 63 characters, at most 253 in all.
fn check_dns_names(names: &[String]) -> Result<(), ApiError> {
    if names.is_empty() || names.len() > DNS_NAMES_MAX {
        return Err(unprocessable(
            "invalid_dns_names",
            format!("an edge certificate has 1 to {DNS_NAMES_MAX} dns names"),
        ));
    }
    let valid_label = |label: &str| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    for name in names {
        if name.len() > DNS_NAME_LEN_MAX || !name.split('.').all(valid_label) {
            return Err(unprocessable(
                "invalid_dns_names",
                "a dns name is dot-separated lower-case labels of letters, digits and hyphens",
            ));
        }
    }
    Ok(())
}

/// Revokes a certificate; revoking it again returns the first revocation.
#[utoipa::path(post, path = "/v1/certificates/{serial}/revoke", tag = "certificate authority",
    params(("serial" = String, Path, description = "Serial, 32 hex digits")),
    request_body = RevokeRequest,
    security(("admin_key" = ["ca:write"])),
    responses(
        (status = 200, description = "Revoked (now or before)", body = RevocationBody),
        (status = 400, description = "Malformed JSON or serial (invalid_serial)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ca:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No certificate has this serial (certificate_not_found)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown reason (invalid_reason) or unknown fields", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn revoke_certificate(
    State(state): State<AppState>,
    authorized: Authorized<CaWriteScope>,
    Path(serial): Path<String>,
    ApiJson(request): ApiJson<RevokeRequest>,
) -> Result<Json<RevocationBody>, ApiError> {
    let serial: Serial = serial
        .parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_serial", "a serial is 32 hex digits"))?;
    let reason = match request.reason.as_deref() {
        None => RevocationReason::Unspecified,
        Some(text) => RevocationReason::parse(text).ok_or_else(|| {
            let known: Vec<&str> = RevocationReason::ALL.iter().map(|reason| reason.as_str()).collect();
            unprocessable("invalid_reason", format!("reason is one of {}", known.join(", ")))
        })?,
    };
    let revocation =
        crate::ca::revoke(&state.db, serial, reason, state.clock.now()).await.map_err(|error| match error {
            RevokeError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "certificate_not_found", "no certificate has this serial")
            }
            other => ApiError::internal(&other),
        })?;
    tracing::info!(key = %authorized.key_id, serial = %serial, "revocation requested");
    Ok(Json(RevocationBody {
        serial: revocation.serial.to_string(),
        org_id: revocation.org_id.to_string(),
        reason: revocation.reason.as_str().to_owned(),
        revoked_at_ms: revocation.revoked_at.0,
    }))
}

fn crl_error(error: CrlError) -> ApiError {
    match error {
        CrlError::OrgNotFound => org_not_found(),
        CrlError::NoOrgCa => ApiError::new(StatusCode::NOT_FOUND, "org_ca_not_found", "the org has no CA yet"),
        other => ApiError::internal(&other),
    }
}

/// The org's current CRL (PEM), signed by its CA. Public.
#[utoipa::path(get, path = "/v1/orgs/{id}/crl", tag = "certificate authority",
    params(("id" = String, Path, description = "Org id")),
    responses(
        (status = 200, description = "The CRL; its number is also in x-molt-crl-number", body = String, content_type = "application/x-pem-file"),
        (status = 404, description = "No such org (org_not_found) or no CA yet (org_ca_not_found)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_crl(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let ca = authority(&state)?;
    let org: OrgId = id.parse().map_err(|_| org_not_found())?;
    let crl = ca.crl(&state.db, &org, state.clock.now()).await.map_err(crl_error)?;
    let mut response = crl.to_pem().into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PEM_CONTENT_TYPE));
    headers.insert(CRL_NUMBER_HEADER, HeaderValue::from(crl.crl_number()));
    Ok(response)
}

/// Roots, org CAs and their CRLs, with a sequence number. Public.
#[utoipa::path(get, path = "/v1/trust-bundle", tag = "certificate authority",
    responses((status = 200, description = "The trust bundle", body = TrustBundleBody)))]
pub async fn trust_bundle(State(state): State<AppState>) -> Result<Json<TrustBundleBody>, ApiError> {
    let ca = authority(&state)?;
    let bundle = ca.trust_bundle(&state.db, state.clock.now()).await.map_err(crl_error)?;
    Ok(Json(TrustBundleBody {
        sequence: bundle.sequence,
        roots: bundle.roots.iter().map(|root| root.to_pem()).collect(),
        org_cas: bundle.org_cas.iter().map(|org_ca| org_ca.to_pem()).collect(),
        crls: bundle.crls.iter().map(|crl| crl.to_pem()).collect(),
    }))
}
