//! `/v1/orgs`: create, list and read organisations.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::extract::{ApiJson, ApiQuery, Authorized, OrgsWriteScope, ReadScope};
use super::problem::{ApiError, Problem};
use crate::db::{CreateOrgError, PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX, Page};
use crate::ids::OrgId;
use crate::model::{Org, OrgName};

/// Body of `POST /v1/orgs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrgRequest {
    /// Unique name: 1 to 63 lower-case letters, digits and hyphens, not starting with a hyphen.
    #[schema(example = "acme")]
    pub name: String,
}

/// An organisation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrgBody {
    #[schema(example = "org_aaaaaaaaaaaaaaaaaaaaaaaaaa")]
    pub id: String,
    pub name: String,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// A page of orgs, ordered by name.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrgList {
    pub items: Vec<OrgBody>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// Paging of listings.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Rows per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// The `next_after` of the previous page.
    pub after: Option<String>,
}

impl PageQuery {
    /// The validated page, with the cursor parsed by `parse_after`.
    pub fn page<C>(&self, parse_after: impl FnOnce(&str) -> Option<C>) -> Result<Page<C>, ApiError> {
        let limit = self.limit.unwrap_or(PAGE_LIMIT_DEFAULT);
        if !(1..=PAGE_LIMIT_MAX).contains(&limit) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("limit must be between 1 and {PAGE_LIMIT_MAX}"),
            ));
        }
        let after = match &self.after {
            None => None,
            Some(text) => Some(parse_after(text).ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", "after is not a cursor from a previous page")
            })?),
        };
        Ok(Page { after, limit })
    }
}

/// Creates an org.
#[utoipa::path(post, path = "/v1/orgs", tag = "orgs", request_body = CreateOrgRequest,
    security(("admin_key" = ["orgs:write"])),
    responses(
        (status = 201, description = "Created", body = OrgBody),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks orgs:write", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The name is taken (org_name_taken)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body larger than 64 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown or missing fields, or an invalid name", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_org(
    State(state): State<AppState>,
    authorized: Authorized<OrgsWriteScope>,
    ApiJson(request): ApiJson<CreateOrgRequest>,
) -> Result<(StatusCode, Json<OrgBody>), ApiError> {
    let name = OrgName::new(&request.name)
        .map_err(|error| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_org_name", error.to_string()))?;
    let org = state.db.create_org(&name, state.clock.now()).await.map_err(|error| match error {
        CreateOrgError::NameTaken => {
            ApiError::new(StatusCode::CONFLICT, "org_name_taken", format!("an org named {name} exists"))
        }
        other => ApiError::internal(&other),
    })?;
    tracing::info!(org = %org.id, name = %org.name, key = %authorized.key_id, "org created");
    Ok((StatusCode::CREATED, Json(org_body(org))))
}

/// Lists orgs by name.
#[utoipa::path(get, path = "/v1/orgs", tag = "orgs", params(PageQuery),
    security(("admin_key" = ["read"])),
    responses(
        (status = 200, description = "A page of orgs", body = OrgList),
        (status = 400, description = "Invalid paging parameters", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks read", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_orgs(
    State(state): State<AppState>,
    _authorized: Authorized<ReadScope>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<OrgList>, ApiError> {
    let page = query.page(|after| OrgName::new(after).ok())?;
    let orgs = state.db.list_orgs(&page).await.map_err(|error| ApiError::internal(&error))?;
    let next_after = (orgs.len() == page.limit as usize).then(|| orgs.last().map(|org| org.name.to_string())).flatten();
    Ok(Json(OrgList { items: orgs.into_iter().map(org_body).collect(), next_after }))
}

/// Reads one org.
#[utoipa::path(get, path = "/v1/orgs/{id}", tag = "orgs",
    params(("id" = String, Path, description = "Org id")),
    security(("admin_key" = ["read"])),
    responses(
        (status = 200, description = "The org", body = OrgBody),
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such org", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_org(
    State(state): State<AppState>,
    _authorized: Authorized<ReadScope>,
    Path(id): Path<String>,
) -> Result<Json<OrgBody>, ApiError> {
    let not_found = || ApiError::not_found("no such org");
    let id: OrgId = id.parse().map_err(|_| not_found())?;
    let org = state.db.org(&id).await.map_err(|error| ApiError::internal(&error))?.ok_or_else(not_found)?;
    Ok(Json(org_body(org)))
}

fn org_body(org: Org) -> OrgBody {
    OrgBody { id: org.id.to_string(), name: org.name.to_string(), created_at_ms: org.created_at.0 }
}
