//! A typed client for the control plane's HTTP API.
//!
//! The model: one [`ApiClient`] per control plane, cheap to clone. Admin calls send the
//! admin key given with [`ApiClient::with_admin_token`] as a bearer token; agent calls
//! (register, update, heartbeat, card import, and every `/v1/ledger` call) are signed
//! with the agent's key ([`AgentCredentials`], [`molt_protocol::request`]) with a fresh
//! nonce and the current time; reads and search are public. Every refusal by the server
//! arrives as [`ApiError::Problem`], carrying its problem document: the stable `code`, the
//! `title`, the `detail` and the HTTP status. Ledger amounts are [`Credits`] (integer
//! micro-credits) and every call that moves credits carries a [`TransferKey`], its
//! idempotency key.
//!
//! Responses are read up to [`RESPONSE_BYTES_MAX`]; every request is bounded by
//! [`REQUEST_TIMEOUT`] (and connecting by [`CONNECT_TIMEOUT`]). Redirects are not followed,
//! so neither a token nor a signature goes anywhere but the given URL.

mod edges;
pub mod enrollment;
mod keys;
mod ledger;
mod ledger_types;
mod types;

use std::fmt;
use std::time::Duration;

use molt_protocol::keys::{PublicKey, SigningKey};
use molt_protocol::request::{NONCE_BYTES, sign_request};
use molt_protocol::{AgentId, UnixMillis};
use rand::RngCore as _;
use rand::rngs::OsRng;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

pub use edges::{EdgeList, EdgeMap, EdgeMapEntry, EdgeStatus, EdgeSummary};
pub use keys::{Approval, CompletedRecovery, Guardians, KeyEvent, KeyHistory, Recovery, Rotation};
pub use ledger::wallet_account;
pub use ledger_types::*;
pub use types::*;

use crate::identity::AgentIdentity;

/// The proof-of-possession layout is the control plane's, defined once in protocol.
pub use molt_protocol::request::{AGENT_PROOF_DOMAIN, EDGE_PROOF_DOMAIN, possession_message};

/// Largest response body read; a larger one fails with [`ApiError::ResponseTooLarge`].
/// The biggest legitimate answer is the trust bundle, a few KiB per org.
pub const RESPONSE_BYTES_MAX: usize = 8 * 1024 * 1024;
/// How long one request may take, from connecting to the last byte of the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the control plane may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The control plane's default listen address, as a base URL.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";
/// Media type of problem documents.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";
/// Header carrying a CRL's number beside its PEM.
pub const CRL_NUMBER_HEADER: &str = "x-molt-crl-number";

const _: () = assert!(CONNECT_TIMEOUT.as_secs() < REQUEST_TIMEOUT.as_secs());

/// Why a call to the control plane failed. Each variant names the operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The server refused the request with a problem document.
    #[error("{operation}: {problem}")]
    Problem { operation: &'static str, problem: Problem },
    /// The server answered an error status without a problem document (a proxy, say).
    #[error("{operation}: the server answered HTTP {status}: {excerpt}")]
    Status { operation: &'static str, status: u16, excerpt: String },
    /// Connecting, sending or receiving failed, or the request timed out.
    #[error("{operation}: {source}")]
    Transport {
        operation: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("{operation}: the response is larger than {RESPONSE_BYTES_MAX} bytes")]
    ResponseTooLarge { operation: &'static str },
    #[error("{operation}: the response is not what the API documents: {source}")]
    Decode {
        operation: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{operation}: an admin token is needed (--token or MOLT_ADMIN_TOKEN)")]
    MissingAdminToken { operation: &'static str },
}

impl ApiError {
    /// The server's problem document, if it sent one.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ApiError::Problem { problem, .. } => Some(problem),
            _ => None,
        }
    }

    /// The problem's stable code, e.g. `org_name_taken`.
    pub fn code(&self) -> Option<&str> {
        self.problem().map(|problem| problem.code.as_str())
    }

    /// The HTTP status the server answered, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Problem { problem, .. } => Some(problem.status),
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, HTTP {} {})", self.detail, self.code, self.status, self.title)
    }
}

/// The base URL is not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiClientError {
    #[error("invalid control plane URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("building the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

/// An agent's id and the key that signs its requests.
#[derive(Clone)]
pub struct AgentCredentials {
    pub agent_id: AgentId,
    pub signing_key: SigningKey,
}

impl AgentCredentials {
    /// Credentials of an agent whose current key is its inception key.
    pub fn from_inception_key(signing_key: SigningKey) -> AgentCredentials {
        AgentCredentials { agent_id: AgentId::from_inception_key(&signing_key.public_key()), signing_key }
    }

    pub fn public_key(&self) -> PublicKey {
        self.signing_key.public_key()
    }
}

impl From<&AgentIdentity> for AgentCredentials {
    fn from(identity: &AgentIdentity) -> Self {
        AgentCredentials { agent_id: identity.agent_id, signing_key: identity.signing_key.clone() }
    }
}

impl fmt::Debug for AgentCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCredentials").field("agent_id", &self.agent_id).finish_non_exhaustive()
    }
}

/// A client for one control plane.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    admin_token: Option<Zeroizing<String>>,
}

impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base.as_str())
            .field("admin_token", &self.admin_token.as_ref().map(|_| "…"))
            .finish()
    }
}

/// What a signed or admin request carries besides its method and path.
enum Auth<'a> {
    Public,
    Admin,
    Agent(&'a AgentCredentials),
}

impl ApiClient {
    /// A client for the control plane at `base_url` (`http://` or `https://`; a path
    /// prefix is kept).
    pub fn new(base_url: &str) -> Result<ApiClient, ApiClientError> {
        let url_error = |reason: &str| ApiClientError::Url { url: base_url.to_owned(), reason: reason.to_owned() };
        let mut base = Url::parse(base_url).map_err(|error| url_error(&error.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(url_error("the scheme must be http or https"));
        }
        if base.query().is_some() || base.fragment().is_some() || base.cannot_be_a_base() {
            return Err(url_error("give the base URL without a query or fragment"));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("molt-sdk/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ApiClientError::Build)?;
        Ok(ApiClient { http, base, admin_token: None })
    }

    /// The client with an admin key (`molt_admin_…`) for admin calls.
    pub fn with_admin_token(mut self, token: impl Into<String>) -> ApiClient {
        self.admin_token = Some(Zeroizing::new(token.into()));
        self
    }

    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    // ---- admin: orgs and admin keys ----

    /// `POST /v1/orgs` (scope `orgs:write`). `name` is a DNS label.
    pub async fn create_org(&self, name: &str) -> Result<Org, ApiError> {
        let body = serde_json::json!({ "name": name });
        self.json(Method::POST, &["v1", "orgs"], &[], Auth::Admin, Some(&body), "creating an org").await
    }

    /// `GET /v1/orgs` (scope `read`).
    pub async fn list_orgs(&self, page: Page<'_>) -> Result<OrgPage, ApiError> {
        let query = page_query(&page);
        self.json(Method::GET, &["v1", "orgs"], &query, Auth::Admin, None::<&()>, "listing orgs").await
    }

    /// `GET /v1/orgs/{id}` (scope `read`).
    pub async fn org(&self, org_id: &str) -> Result<Org, ApiError> {
        self.json(Method::GET, &["v1", "orgs", org_id], &[], Auth::Admin, None::<&()>, "reading an org").await
    }

    /// `POST /v1/admin/keys` (scope `keys:admin`). The token is in the answer only.
    pub async fn create_admin_key(&self, name: &str, scopes: &[String]) -> Result<CreatedAdminKey, ApiError> {
        let body = serde_json::json!({ "name": name, "scopes": scopes });
        self.json(Method::POST, &["v1", "admin", "keys"], &[], Auth::Admin, Some(&body), "creating an admin key").await
    }

    /// `GET /v1/admin/keys` (scope `keys:admin`), revoked keys included.
    pub async fn list_admin_keys(&self, page: Page<'_>) -> Result<AdminKeyPage, ApiError> {
        let query = page_query(&page);
        self.json(Method::GET, &["v1", "admin", "keys"], &query, Auth::Admin, None::<&()>, "listing admin keys").await
    }

    /// `DELETE /v1/admin/keys/{id}` (scope `keys:admin`); idempotent.
    pub async fn revoke_admin_key(&self, key_id: &str) -> Result<AdminKey, ApiError> {
        let path = ["v1", "admin", "keys", key_id];
        self.json(Method::DELETE, &path, &[], Auth::Admin, None::<&()>, "revoking an admin key").await
    }

    // ---- admin: certificate authority ----

    /// `POST /v1/orgs/{id}/ca` (scope `ca:write`): creates the org's CA, or returns the
    /// existing one. The flag is `true` if it was created now.
    pub async fn create_org_ca(&self, org_id: &str) -> Result<(OrgCa, bool), ApiError> {
        let operation = "creating an org CA";
        let path = ["v1", "orgs", org_id, "ca"];
        let (status, bytes) = self.send(Method::POST, &path, &[], Auth::Admin, None::<&()>, operation).await?;
        Ok((decode(&bytes, operation)?, status == StatusCode::CREATED))
    }

    /// `POST /v1/orgs/{id}/agents/certificates` (scope `ca:write`): certifies `key` for
    /// the agent derived from it, proving possession of the key with a signature made at
    /// `now`.
    pub async fn issue_agent_certificate(
        &self,
        org_id: &str,
        key: &SigningKey,
        now: UnixMillis,
    ) -> Result<IssuedCertificate, ApiError> {
        let body = possession_request(AGENT_PROOF_DOMAIN, org_id, key, now, None);
        let path = ["v1", "orgs", org_id, "agents", "certificates"];
        self.json(Method::POST, &path, &[], Auth::Admin, Some(&body), "issuing an agent certificate").await
    }

    /// `POST /v1/orgs/{id}/edges/certificates` (scope `ca:write`), for the DNS names the
    /// edge serves.
    pub async fn issue_edge_certificate(
        &self,
        org_id: &str,
        key: &SigningKey,
        dns_names: &[String],
        now: UnixMillis,
    ) -> Result<IssuedCertificate, ApiError> {
        let body = possession_request(EDGE_PROOF_DOMAIN, org_id, key, now, Some(dns_names));
        let path = ["v1", "orgs", org_id, "edges", "certificates"];
        self.json(Method::POST, &path, &[], Auth::Admin, Some(&body), "issuing an edge certificate").await
    }

    /// `POST /v1/certificates/{serial}/revoke` (scope `ca:write`); idempotent.
    pub async fn revoke_certificate(
        &self,
        serial: &str,
        reason: Option<RevocationReason>,
    ) -> Result<CertificateRevocation, ApiError> {
        let body = match reason {
            Some(reason) => serde_json::json!({ "reason": reason.as_str() }),
            None => serde_json::json!({}),
        };
        let path = ["v1", "certificates", serial, "revoke"];
        self.json(Method::POST, &path, &[], Auth::Admin, Some(&body), "revoking a certificate").await
    }

    /// `GET /v1/orgs/{id}/crl` (public): the org's signed CRL.
    pub async fn crl(&self, org_id: &str) -> Result<Crl, ApiError> {
        let operation = "fetching a CRL";
        let url = self.url(&["v1", "orgs", org_id, "crl"], &[]);
        let response = self.http.get(url).send().await.map_err(|source| ApiError::Transport { operation, source })?;
        let number = response
            .headers()
            .get(CRL_NUMBER_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.parse().ok());
        let (_, bytes) = read_response(response, operation).await?;
        let pem = String::from_utf8(bytes).map_err(|_| ApiError::Status {
            operation,
            status: 200,
            excerpt: "the CRL is not PEM text".to_owned(),
        })?;
        Ok(Crl { pem, number })
    }

    /// `GET /v1/trust-bundle` (public).
    pub async fn trust_bundle(&self) -> Result<TrustBundle, ApiError> {
        let path = ["v1", "trust-bundle"];
        self.json(Method::GET, &path, &[], Auth::Public, None::<&()>, "fetching the trust bundle").await
    }

    /// `POST /v1/agents/{id}/revoke` (scope `ca:write`); idempotent.
    pub async fn revoke_agent(&self, agent_id: AgentId) -> Result<AgentRevocation, ApiError> {
        let id = agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "revoke"];
        self.json(Method::POST, &path, &[], Auth::Admin, None::<&()>, "revoking an agent").await
    }

    // ---- agents ----

    /// `POST /v1/agents`, signed by the agent: registers it with `profile`.
    pub async fn register_agent(&self, agent: &AgentCredentials, profile: &AgentProfile) -> Result<Agent, ApiError> {
        #[derive(Serialize)]
        struct Registration<'a> {
            id: String,
            public_key: String,
            #[serde(flatten)]
            profile: &'a AgentProfile,
        }
        let body = Registration {
            id: agent.agent_id.to_string(),
            public_key: hex::encode(agent.public_key().as_bytes()),
            profile,
        };
        let auth = Auth::Agent(agent);
        self.json(Method::POST, &["v1", "agents"], &[], auth, Some(&body), "registering an agent").await
    }

    /// `PUT /v1/agents/{id}`, signed by the agent: replaces its whole profile.
    pub async fn update_agent(&self, agent: &AgentCredentials, profile: &AgentProfile) -> Result<Agent, ApiError> {
        let id = agent.agent_id.to_string();
        let auth = Auth::Agent(agent);
        self.json(Method::PUT, &["v1", "agents", id.as_str()], &[], auth, Some(profile), "updating an agent").await
    }

    /// `POST /v1/agents/{id}/heartbeat`, signed by the agent: renews its registration.
    pub async fn heartbeat(&self, agent: &AgentCredentials) -> Result<Heartbeat, ApiError> {
        let id = agent.agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "heartbeat"];
        self.json(Method::POST, &path, &[], Auth::Agent(agent), None::<&()>, "sending a heartbeat").await
    }

    /// `GET /v1/agents/{id}` (public): public and unlisted agents.
    pub async fn agent(&self, agent_id: &str) -> Result<Agent, ApiError> {
        self.json(Method::GET, &["v1", "agents", agent_id], &[], Auth::Public, None::<&()>, "reading an agent").await
    }

    /// `GET /v1/agents?…` (public): a page of public agents, best first.
    pub async fn search_agents(&self, query: &SearchQuery) -> Result<SearchResults, ApiError> {
        let mut pairs = Vec::new();
        let optional = [("q", &query.text), ("capability", &query.capability), ("tag", &query.tag)];
        for (name, value) in optional {
            if let Some(value) = value {
                pairs.push((name, value.clone()));
            }
        }
        if let Some(limit) = query.limit {
            pairs.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = &query.cursor {
            pairs.push(("cursor", cursor.clone()));
        }
        self.json(Method::GET, &["v1", "agents"], &pairs, Auth::Public, None::<&()>, "searching agents").await
    }

    /// `GET /v1/agents/{id}/agent-card.json` (public): the agent's A2A-style card.
    pub async fn agent_card(&self, agent_id: &str) -> Result<AgentCard, ApiError> {
        let path = ["v1", "agents", agent_id, "agent-card.json"];
        self.json(Method::GET, &path, &[], Auth::Public, None::<&()>, "exporting an agent card").await
    }

    /// `PUT /v1/agents/{id}/agent-card.json`, signed by the agent: registers it (`true`)
    /// or replaces its profile (`false`) from an A2A-style card. The card is sent as given,
    /// so the server refuses what it cannot map rather than this client dropping it.
    pub async fn import_agent_card(
        &self,
        agent: &AgentCredentials,
        card: &serde_json::Value,
    ) -> Result<(Agent, bool), ApiError> {
        let operation = "importing an agent card";
        let id = agent.agent_id.to_string();
        let path = ["v1", "agents", id.as_str(), "agent-card.json"];
        let (status, bytes) = self.send(Method::PUT, &path, &[], Auth::Agent(agent), Some(card), operation).await?;
        Ok((decode(&bytes, operation)?, status == StatusCode::CREATED))
    }

    // ---- plumbing ----

    async fn json<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, String)],
        auth: Auth<'_>,
        body: Option<&B>,
        operation: &'static str,
    ) -> Result<T, ApiError> {
        let (_, bytes) = self.send(method, path, query, auth, body, operation).await?;
        decode(&bytes, operation)
    }

    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, String)],
        auth: Auth<'_>,
        body: Option<&B>,
        operation: &'static str,
    ) -> Result<(StatusCode, Vec<u8>), ApiError> {
        let url = self.url(path, query);
        let body = match body {
            // Invariant: the bodies are plain structs and JSON values; they serialise.
            Some(body) => serde_json::to_vec(body).expect("request bodies serialise to JSON"),
            None => Vec::new(),
        };
        let mut request = self.http.request(method.clone(), url.clone());
        if !body.is_empty() {
            request = request.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        match auth {
            Auth::Public => {}
            Auth::Admin => {
                let token = self.admin_token.as_ref().ok_or(ApiError::MissingAdminToken { operation })?;
                request = request.header(AUTHORIZATION, format!("Bearer {}", token.as_str()));
            }
            Auth::Agent(agent) => {
                let path_and_query = match url.query() {
                    Some(query) => format!("{}?{query}", url.path()),
                    None => url.path().to_owned(),
                };
                let mut nonce = [0u8; NONCE_BYTES];
                OsRng.fill_bytes(&mut nonce);
                let headers = sign_request(
                    &agent.signing_key,
                    agent.agent_id,
                    method.as_str(),
                    &path_and_query,
                    UnixMillis::now_from_system(),
                    nonce,
                    &body,
                );
                for (name, value) in headers {
                    request = request.header(name, value);
                }
            }
        }
        let response = request.body(body).send().await.map_err(|source| ApiError::Transport { operation, source })?;
        read_response(response, operation).await
    }

    fn url(&self, path: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        {
            // Invariant: `new` refused cannot-be-a-base URLs.
            let mut segments = url.path_segments_mut().expect("the base URL can have a path");
            segments.pop_if_empty();
            segments.extend(path);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().map(|(name, value)| (*name, value.as_str())));
        }
        url
    }
}

/// Whether an answer's `Content-Type` says it is a problem document
/// ([`PROBLEM_CONTENT_TYPE`]), as every refusal by the control plane is.
pub fn is_problem_document(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with(PROBLEM_CONTENT_TYPE))
}

/// Reads a response up to [`RESPONSE_BYTES_MAX`]; error statuses become
/// [`ApiError::Problem`] or [`ApiError::Status`].
async fn read_response(
    mut response: reqwest::Response,
    operation: &'static str,
) -> Result<(StatusCode, Vec<u8>), ApiError> {
    let status = response.status();
    let is_problem = is_problem_document(response.headers());
    if response.content_length().is_some_and(|length| length > RESPONSE_BYTES_MAX as u64) {
        return Err(ApiError::ResponseTooLarge { operation });
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|source| ApiError::Transport { operation, source })? {
        if bytes.len() + chunk.len() > RESPONSE_BYTES_MAX {
            return Err(ApiError::ResponseTooLarge { operation });
        }
        bytes.extend_from_slice(&chunk);
    }
    if status.is_success() {
        return Ok((status, bytes));
    }
    if is_problem {
        if let Ok(problem) = serde_json::from_slice::<Problem>(&bytes) {
            return Err(ApiError::Problem { operation, problem });
        }
    }
    let excerpt: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
    Err(ApiError::Status { operation, status: status.as_u16(), excerpt })
}

fn decode<T: DeserializeOwned>(bytes: &[u8], operation: &'static str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|source| ApiError::Decode { operation, source })
}

fn page_query(page: &Page<'_>) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    if let Some(limit) = page.limit {
        query.push(("limit", limit.to_string()));
    }
    if let Some(after) = page.after {
        query.push(("after", after.to_owned()));
    }
    query
}

fn possession_request(
    domain: &[u8],
    org_id: &str,
    key: &SigningKey,
    now: UnixMillis,
    dns_names: Option<&[String]>,
) -> serde_json::Value {
    let public_key = key.public_key();
    let signature = key.sign(&possession_message(domain, org_id, &public_key, now));
    let mut body = serde_json::json!({
        "public_key": hex::encode(public_key.as_bytes()),
        "timestamp_ms": now.0,
        "signature": hex::encode(signature.0),
    });
    if let Some(dns_names) = dns_names {
        body["dns_names"] = serde_json::json!(dns_names);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_the_base_path_and_escape_segments() {
        let client = ApiClient::new("https://cp.example/molt").unwrap();
        let url = client.url(&["v1", "orgs", "a/b c"], &[("q", "x&y".to_owned())]);
        assert_eq!(url.as_str(), "https://cp.example/molt/v1/orgs/a%2Fb%20c?q=x%26y");
        let client = ApiClient::new("http://127.0.0.1:8080").unwrap();
        assert_eq!(client.url(&["v1", "trust-bundle"], &[]).as_str(), "http://127.0.0.1:8080/v1/trust-bundle");
        assert!(ApiClient::new("ftp://x").is_err());
        assert!(ApiClient::new("http://x/?a=1").is_err());
    }

    #[test]
    fn problems_display_detail_code_and_status() {
        let problem: Problem = serde_json::from_str(
            r#"{"type":"urn:molt:problem:org_name_taken","title":"Conflict","status":409,"detail":"the name is taken","code":"org_name_taken"}"#,
        )
        .unwrap();
        let error = ApiError::Problem { operation: "creating an org", problem };
        assert_eq!(error.to_string(), "creating an org: the name is taken (org_name_taken, HTTP 409 Conflict)");
        assert_eq!((error.code(), error.status()), (Some("org_name_taken"), Some(409)));
    }

    #[test]
    fn possession_message_layout() {
        let key = SigningKey::from_bytes(&[1; 32]).public_key();
        let message = possession_message(AGENT_PROOF_DOMAIN, "org_x", &key, UnixMillis(0x0102));
        let mut expected = AGENT_PROOF_DOMAIN.to_vec();
        expected.extend_from_slice(b"org_x\0");
        expected.extend_from_slice(key.as_bytes());
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(message, expected);
    }
}
