//! Edge enrollment: admins create, list and revoke enrollment tokens (`ca:write`); a new
//! edge enrolls with one (public: the token is the credential) and receives its
//! certificate chain and the trust bundle ([`crate::enrollment`]).

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use molt_protocol::keys::{PublicKey, Signature};
use molt_protocol::time::UnixMillis;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::ca::{CaWriteScope, TrustBundleBody};
use super::extract::{ApiJson, ApiQuery, Authorized};
use super::orgs::PageQuery;
use super::problem::{ApiError, Problem};
use crate::ca::{self, ProofError};
use crate::enrollment::{
    self, CreateTokenError, EnrollError, EnrollRequest, EnrollmentTokenId, NewToken, RevokeTokenError, TokenRecord,
};
use crate::ids::OrgId;

/// Body of `POST /v1/admin/enrollment-tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentTokenRequest {
    /// The org the edge will belong to (its certificate is issued by this org's CA).
    pub org_id: String,
    /// The region the edge serves: 1 to 63 lower-case letters, digits and `-`.
    #[schema(example = "eu-west")]
    pub region: String,
    /// How long the token can be used: 60 s to 30 days, default 24 h.
    pub ttl_secs: Option<u64>,
    /// Lifetime of the edge's certificates (first and renewed): 60 s to 90 days, default 90 days.
    pub certificate_validity_secs: Option<u64>,
}

/// An enrollment token, without its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentTokenBody {
    #[schema(example = "enr_aaaaaaaaaaaaaaaaaaaaaaaaaa")]
    pub id: String,
    pub org_id: String,
    pub region: String,
    pub certificate_validity_secs: u64,
    /// The admin key that created it.
    pub created_by: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// `active`, `used`, `revoked` or `expired`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_at_ms: Option<u64>,
    /// The edge enrolled with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_by_edge: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// A new token and its secret. The secret is shown only in this response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedEnrollmentToken {
    #[serde(flatten)]
    pub record: EnrollmentTokenBody,
    /// `molt_enroll_…`: give it to `molt-edge enroll --token`.
    pub token: String,
}

/// A page of enrollment tokens, ordered by id.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentTokenList {
    pub items: Vec<EnrollmentTokenBody>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// Body of `POST /v1/edges/enroll`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequestBody {
    /// The enrollment token (`molt_enroll_…`).
    pub token: String,
    /// The edge's Ed25519 public key, 64 hex digits. The edge id is derived from it.
    pub public_key: String,
    /// When the proof was signed, milliseconds since the Unix epoch; at most 5 minutes
    /// from the control plane's clock.
    pub timestamp_ms: u64,
    /// Ed25519 signature (128 hex digits) by the key over
    /// `"molt-control-plane edge-certificate-request v1\0" ‖ org id ‖ 0x00 ‖ public key ‖ timestamp_ms (u64 BE)`,
    /// where the org is the token's (the edge learns it from the operator or tries the token's org).
    pub signature: String,
}

/// An enrolled edge: its certificate and what it needs to verify peers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrolledEdgeBody {
    pub edge_id: String,
    pub org_id: String,
    pub region: String,
    /// 32 lower-case hex digits.
    pub serial: String,
    /// The leaf followed by the org CA: what the edge presents.
    pub chain_pem: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    pub trust_bundle: TrustBundleBody,
}

/// Body of `POST /v1/edges/enroll/org`: which org a token enrolls into, so the edge can
/// sign its proof of possession.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentOrgRequest {
    pub token: String,
}

/// The org and region a token enrolls into.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentOrgBody {
    pub org_id: String,
    pub region: String,
}

fn unprocessable(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
}

/// Creates an enrollment token for an org and region.
#[utoipa::path(post, path = "/v1/admin/enrollment-tokens", tag = "edge enrollment",
    request_body = CreateEnrollmentTokenRequest,
    security(("admin_key" = ["ca:write"])),
    responses(
        (status = 201, description = "Created; the token is shown once", body = CreatedEnrollmentToken),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ca:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such org (org_not_found)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_region, invalid_ttl, invalid_certificate_validity, or unknown or missing fields", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_enrollment_token(
    State(state): State<AppState>,
    authorized: Authorized<CaWriteScope>,
    ApiJson(request): ApiJson<CreateEnrollmentTokenRequest>,
) -> Result<(StatusCode, Json<CreatedEnrollmentToken>), ApiError> {
    let org_not_found = || ApiError::new(StatusCode::NOT_FOUND, "org_not_found", "no such org");
    let org: OrgId = request.org_id.parse().map_err(|_| org_not_found())?;
    let new = NewToken {
        org,
        region: request.region,
        ttl: request.ttl_secs.map_or(enrollment::TOKEN_TTL_DEFAULT, Duration::from_secs),
        certificate_validity: request.certificate_validity_secs.map_or(ca::LEAF_VALIDITY, Duration::from_secs),
    };
    let now = state.clock.now();
    let (record, token) =
        enrollment::create_token(&state.db, &new, &authorized.key_id, now).await.map_err(|error| match error {
            CreateTokenError::OrgNotFound => org_not_found(),
            CreateTokenError::Ttl => unprocessable("invalid_ttl", error.to_string()),
            CreateTokenError::CertificateValidity => unprocessable("invalid_certificate_validity", error.to_string()),
            CreateTokenError::Region => unprocessable("invalid_region", error.to_string()),
            other => ApiError::internal(&other),
        })?;
    let body = CreatedEnrollmentToken { record: token_body(record, now), token: token.expose().to_owned() };
    Ok((StatusCode::CREATED, Json(body)))
}

/// Lists enrollment tokens (never their secrets).
#[utoipa::path(get, path = "/v1/admin/enrollment-tokens", tag = "edge enrollment", params(PageQuery),
    security(("admin_key" = ["ca:write"])),
    responses(
        (status = 200, description = "A page of tokens", body = EnrollmentTokenList),
        (status = 400, description = "Invalid paging parameters", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ca:write", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_enrollment_tokens(
    State(state): State<AppState>,
    _authorized: Authorized<CaWriteScope>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<EnrollmentTokenList>, ApiError> {
    let page = query.page(|after| after.parse::<EnrollmentTokenId>().ok())?;
    let records = enrollment::list_tokens(&state.db, page.after.as_ref(), page.limit)
        .await
        .map_err(|error| ApiError::internal(&error))?;
    let next_after =
        (records.len() == page.limit as usize).then(|| records.last().map(|record| record.id.to_string())).flatten();
    let now = state.clock.now();
    Ok(Json(EnrollmentTokenList {
        items: records.into_iter().map(|record| token_body(record, now)).collect(),
        next_after,
    }))
}

/// Revokes an enrollment token; revoking it again changes nothing.
#[utoipa::path(delete, path = "/v1/admin/enrollment-tokens/{id}", tag = "edge enrollment",
    params(("id" = String, Path, description = "Enrollment token id")),
    security(("admin_key" = ["ca:write"])),
    responses(
        (status = 200, description = "The revoked token", body = EnrollmentTokenBody),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ca:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such token (enrollment_token_not_found)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn revoke_enrollment_token(
    State(state): State<AppState>,
    authorized: Authorized<CaWriteScope>,
    Path(id): Path<String>,
) -> Result<Json<EnrollmentTokenBody>, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "enrollment_token_not_found", "no such enrollment token");
    let id: EnrollmentTokenId = id.parse().map_err(|_| not_found())?;
    let now = state.clock.now();
    let record = enrollment::revoke_token(&state.db, &id, now).await.map_err(|error| match error {
        RevokeTokenError::NotFound => not_found(),
        other => ApiError::internal(&other),
    })?;
    tracing::info!(token = %record.id, by = %authorized.key_id, "enrollment token revocation requested");
    Ok(Json(token_body(record, now)))
}

/// Enrolls an edge with a token and a proof of possession of its key. Public: the token
/// is the credential.
#[utoipa::path(post, path = "/v1/edges/enroll", tag = "edge enrollment",
    request_body = EnrollRequestBody,
    responses(
        (status = 201, description = "Enrolled: the certificate chain and the trust bundle", body = EnrolledEdgeBody),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unknown or malformed token (invalid_enrollment_token)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The token was used already (enrollment_token_used)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The token expired (enrollment_token_expired) or was revoked (enrollment_token_revoked)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_public_key, invalid_signature, stale_timestamp, invalid_proof_of_possession, or unknown or missing fields", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No certificate authority (ca_unavailable)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn enroll_edge(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<EnrollRequestBody>,
) -> Result<(StatusCode, Json<EnrolledEdgeBody>), ApiError> {
    let authority = state.ca.as_deref().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ca_unavailable", "the certificate authority is not configured")
    })?;
    let public_key =
        decode_hex(&request.public_key).and_then(|bytes| PublicKey::from_slice(&bytes).ok()).ok_or_else(|| {
            unprocessable("invalid_public_key", "public_key is not an Ed25519 public key in 64 hex digits")
        })?;
    let signature = decode_hex(&request.signature)
        .and_then(|bytes| Signature::from_slice(&bytes))
        .ok_or_else(|| unprocessable("invalid_signature", "signature is not 128 hex digits"))?;
    let now = state.clock.now();
    let enroll =
        EnrollRequest { token: &request.token, public_key, timestamp: UnixMillis(request.timestamp_ms), signature };
    let enrolled = enrollment::enroll(&state.db, authority, &enroll, now).await.map_err(enroll_error)?;
    let bundle = authority.trust_bundle(&state.db, now).await.map_err(|error| ApiError::internal(&error))?;
    let validity = enrolled.issued.certificate.validity();
    Ok((
        StatusCode::CREATED,
        Json(EnrolledEdgeBody {
            edge_id: enrolled.edge_id.to_string(),
            org_id: enrolled.org.to_string(),
            region: enrolled.region,
            serial: enrolled.issued.certificate.serial().to_string(),
            chain_pem: format!("{}{}", enrolled.issued.certificate.to_pem(), enrolled.issued.org_ca.to_pem()),
            not_before_ms: validity.not_before.0,
            not_after_ms: validity.not_after.0,
            trust_bundle: TrustBundleBody {
                sequence: bundle.sequence,
                roots: bundle.roots.iter().map(|root| root.to_pem()).collect(),
                org_cas: bundle.org_cas.iter().map(|org_ca| org_ca.to_pem()).collect(),
                crls: bundle.crls.iter().map(|crl| crl.to_pem()).collect(),
            },
        }),
    ))
}

/// The org and region a token enrolls into (the edge signs its proof for that org).
/// Public; says nothing more than the token holder may know, and refuses a token that
/// can no longer enroll.
#[utoipa::path(post, path = "/v1/edges/enroll/org", tag = "edge enrollment",
    request_body = EnrollmentOrgRequest,
    responses(
        (status = 200, description = "The token's org and region", body = EnrollmentOrgBody),
        (status = 401, description = "Unknown or malformed token (invalid_enrollment_token)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The token was used already (enrollment_token_used)", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The token expired or was revoked", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn enrollment_org(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<EnrollmentOrgRequest>,
) -> Result<Json<EnrollmentOrgBody>, ApiError> {
    let record = enrollment::usable_token(&state.db, &request.token, state.clock.now()).await.map_err(enroll_error)?;
    Ok(Json(EnrollmentOrgBody { org_id: record.org.to_string(), region: record.region }))
}

fn enroll_error(error: EnrollError) -> ApiError {
    let detail = error.to_string();
    match error {
        EnrollError::UnknownToken => ApiError::new(StatusCode::UNAUTHORIZED, "invalid_enrollment_token", detail),
        EnrollError::TokenUsed => ApiError::new(StatusCode::CONFLICT, "enrollment_token_used", detail),
        EnrollError::TokenExpired => ApiError::new(StatusCode::GONE, "enrollment_token_expired", detail),
        EnrollError::TokenRevoked => ApiError::new(StatusCode::GONE, "enrollment_token_revoked", detail),
        EnrollError::Proof(ProofError::Stale) => unprocessable("stale_timestamp", detail),
        EnrollError::Proof(_) => unprocessable("invalid_proof_of_possession", detail),
        other => ApiError::internal(&other),
    }
}

fn token_body(record: TokenRecord, now: UnixMillis) -> EnrollmentTokenBody {
    let status = if record.revoked_at.is_some() {
        "revoked"
    } else if record.used_at.is_some() {
        "used"
    } else if record.expires_at <= now {
        "expired"
    } else {
        "active"
    };
    EnrollmentTokenBody {
        id: record.id.to_string(),
        org_id: record.org.to_string(),
        region: record.region,
        certificate_validity_secs: record.certificate_validity.as_secs(),
        created_by: record.created_by,
        created_at_ms: record.created_at.0,
        expires_at_ms: record.expires_at.0,
        status: status.to_owned(),
        used_at_ms: record.used_at.map(|at| at.0),
        used_by_edge: record.used_by_edge,
        revoked_at_ms: record.revoked_at.map(|at| at.0),
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    data_encoding::HEXLOWER_PERMISSIVE.decode(text.as_bytes()).ok()
}
