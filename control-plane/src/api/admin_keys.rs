//! `/v1/admin/keys`: create, list and revoke scoped admin API keys. All need `keys:admin`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::extract::{ApiJson, ApiQuery, Authorized, KeysAdminScope};
use super::orgs::PageQuery;
use super::problem::{ApiError, Problem};
use crate::auth::{Scope, Scopes};
use crate::db::RevokeAdminKeyError;
use crate::ids::AdminKeyId;
use crate::model::{AdminKey, AdminKeyName};

/// Body of `POST /v1/admin/keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAdminKeyRequest {
    /// A label for people, 1 to 100 characters.
    #[schema(example = "ci deploy")]
    pub name: String,
    /// At least one of `read`, `orgs:write`, `keys:admin`.
    #[schema(example = json!(["read", "orgs:write"]))]
    pub scopes: Vec<String>,
}

/// An admin key, without its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdminKeyBody {
    #[schema(example = "key_aaaaaaaaaaaaaaaaaaaaaaaaaa")]
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Milliseconds since the Unix epoch; absent while the key is valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// A new key and its token. The token is shown only in this response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedAdminKey {
    pub key: AdminKeyBody,
    /// `molt_admin_…`: send as `Authorization: Bearer <token>`.
    pub token: String,
}

/// A page of admin keys, ordered by id.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AdminKeyList {
    pub items: Vec<AdminKeyBody>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// Creates an admin key.
#[utoipa::path(post, path = "/v1/admin/keys", tag = "admin keys", request_body = CreateAdminKeyRequest,
    security(("admin_key" = ["keys:admin"])),
    responses(
        (status = 201, description = "Created; the token is shown once", body = CreatedAdminKey),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks keys:admin", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body larger than 64 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown or missing fields, invalid name or scopes", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_admin_key(
    State(state): State<AppState>,
    authorized: Authorized<KeysAdminScope>,
    ApiJson(request): ApiJson<CreateAdminKeyRequest>,
) -> Result<(StatusCode, Json<CreatedAdminKey>), ApiError> {
    let invalid = |code, detail: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail);
    let name = AdminKeyName::new(&request.name).map_err(|error| invalid("invalid_key_name", error.to_string()))?;
    let scopes = request
        .scopes
        .iter()
        .map(|scope| scope.parse::<Scope>())
        .collect::<Result<Scopes, _>>()
        .map_err(|error| invalid("invalid_scope", error.to_string()))?;
    if scopes.is_empty() {
        return Err(invalid("invalid_scope", "a key needs at least one scope".to_owned()));
    }
    let (key, token) = state
        .db
        .create_admin_key(&name, &scopes, state.clock.now())
        .await
        .map_err(|error| ApiError::internal(&error))?;
    tracing::info!(key = %key.id, scopes = %key.scopes.to_stored(), by = %authorized.key_id, "admin key created");
    Ok((StatusCode::CREATED, Json(CreatedAdminKey { key: key_body(key), token: token.expose().to_owned() })))
}

/// Lists admin keys, revoked ones included.
#[utoipa::path(get, path = "/v1/admin/keys", tag = "admin keys", params(PageQuery),
    security(("admin_key" = ["keys:admin"])),
    responses(
        (status = 200, description = "A page of keys", body = AdminKeyList),
        (status = 400, description = "Invalid paging parameters", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks keys:admin", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_admin_keys(
    State(state): State<AppState>,
    _authorized: Authorized<KeysAdminScope>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<AdminKeyList>, ApiError> {
    let page = query.page(|after| after.parse::<AdminKeyId>().ok())?;
    let keys = state.db.list_admin_keys(&page).await.map_err(|error| ApiError::internal(&error))?;
    let next_after = (keys.len() == page.limit as usize).then(|| keys.last().map(|key| key.id.to_string())).flatten();
    Ok(Json(AdminKeyList { items: keys.into_iter().map(key_body).collect(), next_after }))
}

/// Revokes an admin key; revoking a revoked key succeeds and changes nothing.
#[utoipa::path(delete, path = "/v1/admin/keys/{id}", tag = "admin keys",
    params(("id" = String, Path, description = "Admin key id")),
    security(("admin_key" = ["keys:admin"])),
    responses(
        (status = 200, description = "The revoked key", body = AdminKeyBody),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks keys:admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such key", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn revoke_admin_key(
    State(state): State<AppState>,
    authorized: Authorized<KeysAdminScope>,
    Path(id): Path<String>,
) -> Result<Json<AdminKeyBody>, ApiError> {
    let not_found = || ApiError::not_found("no such admin key");
    let id: AdminKeyId = id.parse().map_err(|_| not_found())?;
    let key = state.db.revoke_admin_key(&id, state.clock.now()).await.map_err(|error| match error {
        RevokeAdminKeyError::NotFound => not_found(),
        other => ApiError::internal(&other),
    })?;
    tracing::info!(key = %key.id, by = %authorized.key_id, "admin key revoked");
    Ok(Json(key_body(key)))
}

fn key_body(key: AdminKey) -> AdminKeyBody {
    AdminKeyBody {
        id: key.id.to_string(),
        name: key.name.as_str().to_owned(),
        scopes: key.scopes.iter().map(|scope| scope.as_str().to_owned()).collect(),
        created_at_ms: key.created_at.0,
        revoked_at_ms: key.revoked_at.map(|time| time.0),
    }
}
