//! Edge enrollment tokens: `/v1/admin/enrollment-tokens`, which need an admin key with
//! the scope `ca:write`. A token is shown once, when it is created; the control plane keeps
//! only its hash. `molt-edge enroll` spends it.

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::{ApiClient, ApiError, Auth, Page, page_query};

/// What to create.
#[derive(Clone, Debug, Serialize)]
pub struct NewEnrollmentToken {
    pub org_id: String,
    /// 1 to 63 lower-case letters, digits and `-`.
    pub region: String,
    /// Seconds the token can be used (server default 24 h, at most 30 days).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Lifetime of the enrolled edge's certificates (server default 90 days).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_validity_secs: Option<u64>,
}

/// A token as listed: never its secret.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrollmentToken {
    pub id: String,
    pub org_id: String,
    pub region: String,
    pub certificate_validity_secs: u64,
    pub created_by: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// `active`, `used`, `revoked` or `expired`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by_edge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// A token just created, with its secret.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreatedEnrollmentToken {
    #[serde(flatten)]
    pub record: EnrollmentToken,
    /// `molt_enroll_…`, shown only now.
    pub token: String,
}

/// A page of tokens.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollmentTokenPage {
    pub items: Vec<EnrollmentToken>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

impl ApiClient {
    /// `POST /v1/admin/enrollment-tokens` (scope `ca:write`).
    pub async fn create_enrollment_token(
        &self,
        request: &NewEnrollmentToken,
    ) -> Result<CreatedEnrollmentToken, ApiError> {
        let path = ["v1", "admin", "enrollment-tokens"];
        self.json(Method::POST, &path, &[], Auth::Admin, Some(request), "creating an enrollment token").await
    }

    /// `GET /v1/admin/enrollment-tokens` (scope `ca:write`).
    pub async fn list_enrollment_tokens(&self, page: Page<'_>) -> Result<EnrollmentTokenPage, ApiError> {
        let path = ["v1", "admin", "enrollment-tokens"];
        let query = page_query(&page);
        self.json(Method::GET, &path, &query, Auth::Admin, None::<&()>, "listing enrollment tokens").await
    }

    /// `DELETE /v1/admin/enrollment-tokens/{id}` (scope `ca:write`); idempotent.
    pub async fn revoke_enrollment_token(&self, token_id: &str) -> Result<EnrollmentToken, ApiError> {
        let path = ["v1", "admin", "enrollment-tokens", token_id];
        self.json(Method::DELETE, &path, &[], Auth::Admin, None::<&()>, "revoking an enrollment token").await
    }
}
