//! `/v1/agents`: registration, profile updates and heartbeats signed by the agent
//! ([`crate::agent_auth`]), public reads, search, A2A-style agent cards (export and
//! signed import, [`crate::a2a`]) and the admin revocation of agents.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use molt_protocol::AgentId;
use molt_protocol::keys::PublicKey;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::ca::CaWriteScope;
use super::extract::{ApiQuery, Authorized};
use super::problem::{ApiError, Problem};
use crate::a2a::{CardError, ImportedCard};
use crate::agent_auth::{AuthenticatedAgent, SignedRequest};
use crate::registry::{
    self, Agent, AgentWriteError, Capability, Health, ProfileError, ProfileInput, RegisterError, SEARCH_CANDIDATES_MAX,
    SEARCH_LIMIT_DEFAULT, SEARCH_LIMIT_MAX, SearchQuery, Visibility,
};

/// Body of `POST /v1/agents`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterAgentRequest {
    /// `AgentId::from_inception_key(public_key)`.
    pub id: String,
    /// Lower-case hex of the 32-byte Ed25519 inception key.
    pub public_key: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    /// Lower-case hex of `KeyBinding::encode()`, signed by `public_key`.
    pub key_binding: Option<String>,
    #[serde(default = "public")]
    pub visibility: Visibility,
    /// An edge id, `edge-…`.
    pub home_edge: Option<String>,
}

/// Body of `PUT /v1/agents/{id}`: the whole new profile.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAgentRequest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    pub key_binding: Option<String>,
    #[serde(default = "public")]
    pub visibility: Visibility,
    pub home_edge: Option<String>,
}

fn public() -> Visibility {
    Visibility::Public
}

/// A registered agent as readers see it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentBody {
    pub id: String,
    pub public_key: String,
    pub name: String,
    pub description: String,
    pub capabilities: Vec<Capability>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_binding: Option<String>,
    pub visibility: Visibility,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home_edge: Option<String>,
    pub revision: u64,
    pub health: Health,
    pub registered_at_ms: u64,
    pub updated_at_ms: u64,
    pub last_heartbeat_ms: u64,
    pub expires_at_ms: u64,
}

/// Answer to a heartbeat.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatBody {
    pub health: Health,
    pub expires_at_ms: u64,
}

/// Search parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// Free text over names (typo-tolerant), descriptions and capabilities.
    pub q: Option<String>,
    /// Only agents with this capability name.
    pub capability: Option<String>,
    /// Only agents with a capability carrying this tag.
    pub tag: Option<String>,
    /// Results per page, 1 to 100 (default 20).
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One search result.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchResultBody {
    pub agent: AgentBody,
    /// relevance × liveness × trust.
    pub score: f64,
    pub relevance: f64,
    pub trust: f64,
}

/// A page of search results, best first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchResults {
    pub items: Vec<SearchResultBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The card types live with their mapping in [`crate::a2a`].
pub use crate::a2a::{AgentCard as AgentCardBody, AgentCardMolt, AgentCardSkill};

/// Answer to `POST /v1/agents/{id}/revoke`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RevokedAgentBody {
    pub id: String,
    /// When the agent was first revoked; later calls return the same time.
    pub revoked_at_ms: u64,
}

pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let axum::Json(value) = axum::Json::<T>::from_bytes(body)?;
    Ok(value)
}

fn profile_error(error: ProfileError) -> ApiError {
    match error {
        ProfileError::KeyBinding(_) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_key_binding", error.to_string())
        }
        other => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_profile", other.to_string()),
    }
}

/// Registers an agent. Signed by the key being registered.
#[utoipa::path(post, path = "/v1/agents", tag = "registry", request_body = RegisterAgentRequest,
    responses(
        (status = 201, description = "Registered", body = AgentBody),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, malformed, stale, replayed or invalid signature", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already registered (agent_exists)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body larger than 64 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown fields, an id not derived from the key (agent_id_not_derived), an invalid key, profile or key binding", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn register_agent(
    State(state): State<AppState>,
    signed: SignedRequest,
) -> Result<(StatusCode, Json<AgentBody>), ApiError> {
    let request: RegisterAgentRequest = parse_json(&signed.body)?;
    let unprocessable = |code, detail: &str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail.to_owned());
    let key = hex::decode(&request.public_key)
        .ok()
        .and_then(|bytes| PublicKey::from_slice(&bytes).ok())
        .ok_or_else(|| unprocessable("invalid_public_key", "public_key is not the hex of an Ed25519 public key"))?;
    let id: AgentId = request.id.parse().map_err(|_| unprocessable("invalid_agent_id", "id is not an agent id"))?;
    if AgentId::from_inception_key(&key) != id {
        return Err(unprocessable("agent_id_not_derived", "id is not derived from public_key"));
    }
    if signed.agent != id {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "agent_mismatch", "Molt-Agent is not the id registered"));
    }
    let input = ProfileInput {
        name: request.name,
        description: request.description,
        capabilities: request.capabilities,
        key_binding: request.key_binding,
        visibility: request.visibility,
        home_edge: request.home_edge,
    };
    let now = state.clock.now();
    signed.verify(&key, &state.nonces, now).await?;
    let profile = input.validate(id, &key).map_err(profile_error)?;
    let agent = registry::register(&state.db, id, &key, &profile, now).await.map_err(|error| match error {
        RegisterError::AlreadyRegistered => {
            ApiError::new(StatusCode::CONFLICT, "agent_exists", format!("{id} is already registered"))
        }
        other => ApiError::internal(&other),
    })?;
    tracing::info!(agent = %id, "agent registered");
    Ok((StatusCode::CREATED, Json(agent_body(&agent, now))))
}

/// Replaces an agent's profile. Signed by the agent.
#[utoipa::path(put, path = "/v1/agents/{id}", tag = "registry", request_body = UpdateAgentRequest,
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, description = "Updated", body = AgentBody),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unknown or revoked agent, bad, stale or replayed signature", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Signed by another agent (not_your_agent)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown fields, an invalid profile or key binding", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn update_agent(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: AuthenticatedAgent,
) -> Result<Json<AgentBody>, ApiError> {
    let id = own_agent(&id, &caller)?;
    let request: UpdateAgentRequest = parse_json(&caller.body)?;
    let now = state.clock.now();
    let stored = read_agent(&state, id).await?;
    let input = ProfileInput {
        name: request.name,
        description: request.description,
        capabilities: request.capabilities,
        key_binding: request.key_binding,
        visibility: request.visibility,
        home_edge: request.home_edge,
    };
    let profile = input.validate(id, &stored.public_key).map_err(profile_error)?;
    registry::update_profile(&state.db, id, &profile, now).await.map_err(write_error)?;
    let agent = read_agent(&state, id).await?;
    Ok(Json(agent_body(&agent, now)))
}

/// Renews an agent's registration and marks it alive. Signed by the agent.
#[utoipa::path(post, path = "/v1/agents/{id}/heartbeat", tag = "registry",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, description = "Renewed", body = HeartbeatBody),
        (status = 401, description = "Unknown or revoked agent, bad, stale or replayed signature", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Signed by another agent (not_your_agent)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn heartbeat(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: AuthenticatedAgent,
) -> Result<Json<HeartbeatBody>, ApiError> {
    let id = own_agent(&id, &caller)?;
    let now = state.clock.now();
    let expires_at = registry::heartbeat(&state.db, id, now).await.map_err(write_error)?;
    state.search.note_heartbeat(id, now, expires_at);
    Ok(Json(HeartbeatBody { health: Health::at(now, now, expires_at), expires_at_ms: expires_at.0 }))
}

/// Reads a public or unlisted agent.
#[utoipa::path(get, path = "/v1/agents/{id}", tag = "registry",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, description = "The agent", body = AgentBody),
        (status = 404, description = "No such agent, private or revoked", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_agent(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<AgentBody>, ApiError> {
    let agent = visible_agent(&state, &id).await?;
    Ok(Json(agent_body(&agent, state.clock.now())))
}

/// The agent's A2A-style card.
#[utoipa::path(get, path = "/v1/agents/{id}/agent-card.json", tag = "registry",
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, description = "The card", body = AgentCardBody),
        (status = 404, description = "No such agent, private or revoked", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn agent_card(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<AgentCardBody>, ApiError> {
    let agent = visible_agent(&state, &id).await?;
    Ok(Json(AgentCardBody::from_agent(&agent)))
}

/// Registers or updates an agent from an A2A-style card. Signed by the agent.
///
/// The card maps to a profile as [`crate::a2a`] describes; members with no place in a
/// profile are refused (`unmappable_card`), never dropped. An unregistered agent is
/// registered with the key in `molt.public_key` (201), a registered one gets its whole
/// profile replaced (200).
#[utoipa::path(put, path = "/v1/agents/{id}/agent-card.json", tag = "registry", request_body = AgentCardBody,
    params(("id" = String, Path, description = "Agent id")),
    responses(
        (status = 200, description = "Profile replaced", body = AgentBody),
        (status = 201, description = "Registered", body = AgentBody),
        (status = 400, description = "Malformed JSON (malformed_json)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, malformed, stale, replayed or invalid signature; revoked agent; Molt-Agent not the card's agent (agent_mismatch)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Signed by another agent (not_your_agent)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Malformed agent id in the path", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body larger than 64 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown or mistyped members (invalid_body), members with no place in a profile (unmappable_card), a card for another agent (card_agent_mismatch), an invalid key, id, profile or key binding", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn import_agent_card(
    State(state): State<AppState>,
    Path(id): Path<String>,
    signed: SignedRequest,
) -> Result<(StatusCode, Json<AgentBody>), ApiError> {
    let id: AgentId = id.parse().map_err(|_| ApiError::not_found("no such agent"))?;
    let now = state.clock.now();
    let stored = registry::agent_key(&state.db, signed.agent).await.map_err(|error| ApiError::internal(&error))?;
    let Some((stored_key, revoked)) = stored else {
        return register_from_card(&state, id, signed).await;
    };
    if revoked {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "revoked_agent", "the agent has been revoked"));
    }
    let verified = signed.verify(&stored_key, &state.nonces, now).await?;
    if verified.agent != id {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "not_your_agent", "agents may only change themselves"));
    }
    let card = ImportedCard::from_json(&verified.body).map_err(card_error)?;
    if card.id != id {
        return Err(card_agent_mismatch());
    }
    if card.public_key != stored_key {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "card_key_mismatch",
            "molt.public_key is not the agent's registered key",
        ));
    }
    let profile = card.profile.validate(id, &stored_key).map_err(card_profile_error)?;
    registry::update_profile(&state.db, id, &profile, now).await.map_err(write_error)?;
    let agent = read_agent(&state, id).await?;
    tracing::info!(agent = %id, "agent profile imported from a card");
    Ok((StatusCode::OK, Json(agent_body(&agent, now))))
}

/// Revokes an agent: it leaves reads and search, its signed requests are refused, and its
/// certificates are revoked (reason `cessation_of_operation`), so edges refuse it too.
/// Idempotent: later calls change nothing and return the first revocation time.
#[utoipa::path(post, path = "/v1/agents/{id}/revoke", tag = "registry",
    params(("id" = String, Path, description = "Agent id")),
    security(("admin_key" = [])),
    responses(
        (status = 200, description = "Revoked (now or earlier)", body = RevokedAgentBody),
        (status = 400, description = "Malformed agent id (invalid_agent_id)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing, invalid or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The admin key lacks ca:write (missing_scope)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such agent", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn revoke_agent(
    State(state): State<AppState>,
    Path(id): Path<String>,
    authorized: Authorized<CaWriteScope>,
) -> Result<Json<RevokedAgentBody>, ApiError> {
    let id: AgentId = id.parse().map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_agent_id", "the path does not name an agent id (agent-…)")
    })?;
    let now = state.clock.now();
    let revoked = registry::revoke(&state.db, id, now).await;
    state.signing_keys.forget(id);
    revoked.map_err(write_error)?;
    crate::keys::revoke_agent_certificates(&state.db, id, crate::ca::RevocationReason::CessationOfOperation, now)
        .await
        .map_err(|error| ApiError::internal(&error))?;
    let agent = read_agent(&state, id).await?;
    // Invariant: `registry::revoke` succeeded, so the agent is revoked.
    let revoked_at = agent.revoked_at.expect("a revoked agent has a revocation time");
    tracing::info!(agent = %id, key = %authorized.key_id, "agent revoked");
    Ok(Json(RevokedAgentBody { id: id.to_string(), revoked_at_ms: revoked_at.0 }))
}

/// Searches public agents, ranked by relevance × liveness × trust.
#[utoipa::path(get, path = "/v1/agents", tag = "registry", params(SearchParams),
    responses(
        (status = 200, description = "A page of results", body = SearchResults),
        (status = 400, description = "Invalid parameters or cursor (invalid_query)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn search_agents(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<SearchParams>,
) -> Result<Json<SearchResults>, ApiError> {
    let invalid = |detail: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", detail);
    let limit = params.limit.unwrap_or(SEARCH_LIMIT_DEFAULT);
    if !(1..=SEARCH_LIMIT_MAX).contains(&limit) {
        return Err(invalid(format!("limit must be between 1 and {SEARCH_LIMIT_MAX}")));
    }
    let text = params.q.unwrap_or_default();
    if text.len() > 1024 {
        return Err(invalid("q is longer than 1024 bytes".to_owned()));
    }
    let offset = match &params.cursor {
        None => 0,
        Some(cursor) => decode_cursor(cursor)
            .ok_or_else(|| invalid("cursor is not a next_cursor from a previous page".to_owned()))?,
    };
    let query = SearchQuery { text, capability: params.capability, tag: params.tag, limit, offset };
    let now = state.clock.now();
    let page = state.search.search(&query, now).await.map_err(|error| ApiError::internal(&error))?;
    Ok(Json(SearchResults {
        items: page
            .hits
            .iter()
            .map(|hit| SearchResultBody {
                agent: agent_body(&hit.agent, now),
                score: hit.score,
                relevance: hit.relevance,
                trust: hit.trust,
            })
            .collect(),
        next_cursor: page.next_offset.map(encode_cursor),
    }))
}

/// Cursors are opaque to clients: base64url of `o:<offset>`.
fn encode_cursor(offset: u32) -> String {
    data_encoding::BASE64URL_NOPAD.encode(format!("o:{offset}").as_bytes())
}

fn decode_cursor(cursor: &str) -> Option<u32> {
    let bytes = data_encoding::BASE64URL_NOPAD.decode(cursor.as_bytes()).ok()?;
    let offset: u32 = std::str::from_utf8(&bytes).ok()?.strip_prefix("o:")?.parse().ok()?;
    (offset < SEARCH_CANDIDATES_MAX).then_some(offset)
}

pub(super) fn own_agent(id: &str, caller: &AuthenticatedAgent) -> Result<AgentId, ApiError> {
    let id: AgentId = id.parse().map_err(|_| ApiError::not_found("no such agent"))?;
    if id != caller.agent {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "not_your_agent", "agents may only change themselves"));
    }
    Ok(id)
}

async fn read_agent(state: &AppState, id: AgentId) -> Result<Agent, ApiError> {
    registry::agent(&state.db, id)
        .await
        .map_err(|error| ApiError::internal(&error))?
        .ok_or_else(|| ApiError::not_found("no such agent"))
}

async fn visible_agent(state: &AppState, id: &str) -> Result<Agent, ApiError> {
    let not_found = || ApiError::not_found("no such agent");
    let id: AgentId = id.parse().map_err(|_| not_found())?;
    let agent = read_agent(state, id).await?;
    if agent.profile.visibility == Visibility::Private || agent.revoked_at.is_some() {
        return Err(not_found());
    }
    Ok(agent)
}

fn write_error(error: AgentWriteError) -> ApiError {
    match error {
        AgentWriteError::NotFound => ApiError::not_found("no such agent"),
        other => ApiError::internal(&other),
    }
}

/// Registration through a card: the key comes from the card, as with `POST /v1/agents`.
async fn register_from_card(
    state: &AppState,
    id: AgentId,
    signed: SignedRequest,
) -> Result<(StatusCode, Json<AgentBody>), ApiError> {
    let card = ImportedCard::from_json(&signed.body).map_err(card_error)?;
    if card.id != id {
        return Err(card_agent_mismatch());
    }
    if signed.agent != id {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "agent_mismatch", "Molt-Agent is not the card's agent"));
    }
    let now = state.clock.now();
    signed.verify(&card.public_key, &state.nonces, now).await?;
    let profile = card.profile.validate(id, &card.public_key).map_err(card_profile_error)?;
    let agent =
        registry::register(&state.db, id, &card.public_key, &profile, now).await.map_err(|error| match error {
            RegisterError::AlreadyRegistered => {
                ApiError::new(StatusCode::CONFLICT, "agent_exists", format!("{id} is already registered"))
            }
            other => ApiError::internal(&other),
        })?;
    tracing::info!(agent = %id, "agent registered from a card");
    Ok((StatusCode::CREATED, Json(agent_body(&agent, now))))
}

fn card_error(error: CardError) -> ApiError {
    let unprocessable = |code| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, error.to_string());
    match &error {
        CardError::Malformed(_) => ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", error.to_string()),
        CardError::Invalid(_) => unprocessable("invalid_body"),
        CardError::Unmappable(_) => unprocessable("unmappable_card"),
        CardError::PublicKey => unprocessable("invalid_public_key"),
        CardError::AgentId => unprocessable("invalid_agent_id"),
        CardError::NotDerived => unprocessable("agent_id_not_derived"),
    }
}

fn card_profile_error(error: ProfileError) -> ApiError {
    let mut problem = profile_error(error);
    problem.detail = format!("the card does not make a valid profile: {}", problem.detail);
    problem
}

fn card_agent_mismatch() -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "card_agent_mismatch", "molt.id is not the agent in the path")
}

fn agent_body(agent: &Agent, now: molt_protocol::UnixMillis) -> AgentBody {
    let profile = &agent.profile;
    AgentBody {
        id: agent.id.to_string(),
        public_key: hex::encode(agent.public_key.as_bytes()),
        name: profile.name.clone(),
        description: profile.description.clone(),
        capabilities: profile.capabilities.clone(),
        key_binding: profile.key_binding.map(|binding| hex::encode(binding.encode())),
        visibility: profile.visibility,
        home_edge: profile.home_edge.map(|edge| edge.to_string()),
        revision: agent.revision,
        health: agent.health(now),
        registered_at_ms: agent.registered_at.0,
        updated_at_ms: agent.updated_at.0,
        last_heartbeat_ms: agent.last_heartbeat.0,
        expires_at_ms: agent.expires_at.0,
    }
}
