//! Extractors whose rejections are problem documents: [`ApiJson`], [`ApiQuery`], and
//! [`Authorized`], the admin bearer-token check.

use std::marker::PhantomData;

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::AppState;
use super::problem::ApiError;
use crate::auth::{AdminToken, Scope};
use crate::ids::AdminKeyId;

/// A JSON body; bad input becomes a 400, 413, 415 or 422 problem.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<T>::from_request(request, state).await?;
        Ok(ApiJson(value))
    }
}

/// Query parameters; bad input becomes a 400 problem.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(value) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(value))
    }
}

/// A scope a route requires, as a type, so that a handler cannot run without the check.
pub trait RequiredScope {
    const SCOPE: Scope;
}

/// Marker for [`Scope::Read`].
#[derive(Debug)]
pub struct ReadScope;
/// Marker for [`Scope::OrgsWrite`].
#[derive(Debug)]
pub struct OrgsWriteScope;
/// Marker for [`Scope::KeysAdmin`].
#[derive(Debug)]
pub struct KeysAdminScope;

impl RequiredScope for ReadScope {
    const SCOPE: Scope = Scope::Read;
}
impl RequiredScope for OrgsWriteScope {
    const SCOPE: Scope = Scope::OrgsWrite;
}
impl RequiredScope for KeysAdminScope {
    const SCOPE: Scope = Scope::KeysAdmin;
}

/// Proof that the request carries a valid, unrevoked admin key holding scope `S`.
/// Rejections: 401 `missing_credentials`, `invalid_credentials`, `revoked_credentials`;
/// 403 `missing_scope`.
#[derive(Debug)]
pub struct Authorized<S> {
    /// The key that authorised the request.
    pub key_id: AdminKeyId,
    scope: PhantomData<S>,
}

impl<S: RequiredScope + Send> FromRequestParts<AppState> for Authorized<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(parts)?;
        let key = state.db.admin_key_by_token(&token).await.map_err(|error| ApiError::internal(&error))?;
        let Some(key) = key else {
            tracing::info!("admin request with an unknown token");
            return Err(unauthorized("invalid_credentials", "the bearer token is not a valid admin key"));
        };
        if key.revoked_at.is_some() {
            tracing::info!(key = %key.id, "admin request with a revoked key");
            return Err(unauthorized("revoked_credentials", "the admin key has been revoked"));
        }
        if !key.scopes.contains(S::SCOPE) {
            tracing::info!(key = %key.id, scope = %S::SCOPE, "admin request without the required scope");
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "missing_scope",
                format!("the admin key lacks the scope {}", S::SCOPE),
            ));
        }
        Ok(Authorized { key_id: key.id, scope: PhantomData })
    }
}

fn bearer_token(parts: &Parts) -> Result<AdminToken, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized("missing_credentials", "send an admin key as Authorization: Bearer <token>"));
    };
    let malformed = || unauthorized("invalid_credentials", "the bearer token is not a valid admin key");
    let text = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = text.split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(malformed());
    }
    AdminToken::parse(token.trim()).ok_or_else(malformed)
}

fn unauthorized(code: &'static str, detail: &'static str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, detail)
}
