//! `/v1/ledger` (agent-signed: wallets, balances, history, transfers, escrows, stakes)
//! and `/v1/admin/ledger` (scope `ledger:admin`: mint, fee, rulings, slashing, accounts,
//! audit). The ledger itself is [`crate::ledger`]; handlers turn requests into commands
//! and outcomes into bodies or problems.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use molt_protocol::{AgentId, UnixMillis};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::extract::{ApiJson, ApiQuery, Authorized, RequiredScope};
use super::problem::{ApiError, Problem};
use crate::agent_auth::{AgentCall, AuthenticatedAgent, replayed};
use crate::auth::Scope;
use crate::ledger::books::Known;
use crate::ledger::engine::{Command, CommandError, Outcome, Requester};
use crate::ledger::escrow::{Escrow, EscrowError, EscrowEvent, EscrowState, OnExpiry};
use crate::ledger::journal::AuditReport;
use crate::ledger::service::LedgerError;
use crate::ledger::stake::{self, MatureError, Unbonding, UnbondingState};
use crate::ledger::store;
use crate::ledger::types::{
    Account, AccountId, ClientId, Credits, Namespace, Purpose, StakeKind, Transfer, TransferFlags, TransferId,
    TransferKind, TransferSpec,
};
use crate::ledger::{Applied, TransferError};

/// Transfers one batch request may carry.
pub const BATCH_TRANSFERS_MAX: usize = 1000;
/// History entries per page at most (default 100).
pub const HISTORY_LIMIT_MAX: u32 = 1000;
/// Longest escrow lifetime accepted: one year.
pub const ESCROW_LIFETIME_MAX_MS: u64 = 366 * 24 * 3600 * 1000;

/// Marker for [`Scope::LedgerAdmin`].
#[derive(Debug)]
pub struct LedgerAdminScope;

impl RequiredScope for LedgerAdminScope {
    const SCOPE: Scope = Scope::LedgerAdmin;
}

/// An amount of micro-credits: a JSON integer or a string of digits (for clients whose
/// numbers are doubles). Must be 1 to 2^63 − 1.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AmountInput {
    Number(serde_json::Number),
    Text(String),
}

/// Body of `POST /v1/ledger/transfers` (and one item of a batch).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    /// Your idempotency key: 1–64 of `A-Z a-z 0-9 _ . -`, unique among your transfers.
    pub id: String,
    /// The recipient agent.
    pub to: String,
    #[schema(value_type = u64)]
    pub amount: AmountInput,
    /// Succeed or fail together with the next transfer of the batch.
    #[serde(default)]
    pub linked: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub transfers: Vec<TransferRequest>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEscrowRequest {
    pub id: String,
    pub payee: String,
    #[schema(value_type = u64)]
    pub amount: AmountInput,
    /// When the escrow expires (unless disputed).
    pub expires_at_ms: u64,
    /// What expiry does: `refund` (default) or `release`.
    #[serde(default = "refund")]
    pub on_expiry: OnExpiry,
}

fn refund() -> OnExpiry {
    OnExpiry::Refund
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// Part of the escrow to release (all if absent); the rest returns to the payer.
    #[schema(value_type = Option<u64>)]
    pub amount: Option<AmountInput>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StakeRequest {
    pub id: String,
    pub kind: StakeKind,
    #[schema(value_type = u64)]
    pub amount: AmountInput,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MintRequest {
    pub id: String,
    #[schema(value_type = u64)]
    pub amount: AmountInput,
    /// The account credited: `treasury` (default) or `wallet:<agent>`.
    pub to: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeeBody {
    /// Fee on payments and escrow releases, paid by the recipient, in basis points.
    pub fee_bps: u32,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RulingRequest {
    /// What the payee gets; the rest returns to the payer (0 refunds everything).
    #[schema(value_type = u64)]
    pub release: AmountInput,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SlashRequest {
    pub id: String,
    pub agent: String,
    pub kind: StakeKind,
    #[schema(value_type = u64)]
    pub amount: AmountInput,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryParams {
    /// Entries per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// The `next_before` of the previous page (any other position is refused).
    pub before: Option<u64>,
}

/// An account and its totals, in micro-credits.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccountBody {
    pub id: String,
    /// Posted credits − posted debits.
    pub balance: i64,
    /// The balance less pending debits: what can be spent.
    pub available: i64,
    pub debits_pending: u64,
    pub debits_posted: u64,
    pub credits_pending: u64,
    pub credits_posted: u64,
    pub no_overdraft: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WalletBody {
    pub agent: String,
    pub wallet: AccountBody,
    /// Stake and unbonding accounts.
    pub stakes: Vec<AccountBody>,
}

/// A journal entry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TransferBody {
    pub id: String,
    pub seq: u64,
    pub debit_account: String,
    pub credit_account: String,
    pub amount: u64,
    pub kind: TransferKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_id: Option<String>,
    pub purpose: Purpose,
    pub linked: bool,
    pub created_at_ms: u64,
    /// Hex SHA-256 chain hash of the entry.
    pub hash: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryPage {
    pub items: Vec<TransferBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
}

/// One result of a batch: the transfer, or the problem code.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchItemBody {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchBody {
    pub results: Vec<BatchItemBody>,
}

/// What the ledger knows about one of your transfer ids.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TransferLookup {
    pub id: String,
    /// `applied` or `rejected`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EscrowBody {
    /// `<payer agent>:<your id>`: use it in escrow paths.
    pub id: String,
    pub payer: String,
    pub payee: String,
    pub amount: u64,
    pub state: EscrowState,
    pub on_expiry: OnExpiry,
    pub expires_at_ms: u64,
    pub released: u64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UnbondingBody {
    pub id: String,
    pub kind: StakeKind,
    pub amount: u64,
    pub matures_at_ms: u64,
    pub state: UnbondingState,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StakesBody {
    pub stakes: Vec<AccountBody>,
    pub unbondings: Vec<UnbondingBody>,
}

// ---- agent routes ----

/// Opens the signer's wallet (idempotent) and returns it.
#[utoipa::path(post, path = "/v1/ledger/wallet", tag = "ledger",
    responses(
        (status = 200, description = "The wallet", body = WalletBody),
        (status = 401, description = "Unsigned, unknown agent, bad, stale or replayed signature", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn open_wallet(
    State(state): State<AppState>,
    caller: AuthenticatedAgent,
) -> Result<Json<WalletBody>, ApiError> {
    let now = state.clock.now();
    store::ensure_accounts(&state.db, &[AccountId::wallet(caller.agent)], now)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    wallet_body(&state, caller.agent).await.map(Json)
}

/// The signer's wallet and stake balances.
#[utoipa::path(get, path = "/v1/ledger/wallet", tag = "ledger",
    responses(
        (status = 200, description = "The wallet", body = WalletBody),
        (status = 401, description = "Unsigned, unknown agent, bad, stale or replayed signature", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No wallet yet (wallet_not_found)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_wallet(
    State(state): State<AppState>,
    caller: AuthenticatedAgent,
) -> Result<Json<WalletBody>, ApiError> {
    wallet_body(&state, caller.agent).await.map(Json)
}

/// The signer's wallet history, newest first.
#[utoipa::path(get, path = "/v1/ledger/wallet/history", tag = "ledger", params(HistoryParams),
    responses(
        (status = 200, description = "A page of journal entries", body = HistoryPage),
        (status = 400, description = "Bad paging parameters", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unsigned, unknown agent, bad, stale or replayed signature", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn wallet_history(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<HistoryParams>,
    caller: AuthenticatedAgent,
) -> Result<Json<HistoryPage>, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=HISTORY_LIMIT_MAX).contains(&limit) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", "limit must be 1 to 1000"));
    }
    let wallet = AccountId::wallet(caller.agent);
    let items = store::history(&state.db, &wallet, params.before, limit)
        .await
        .map_err(|e| ApiError::internal(&e))?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "before must be the next_before of a previous page (the position of one of this wallet's entries)",
            )
        })?;
    // The last entry links to an older one of this wallet's exactly when there is more.
    let next_before =
        items.last().filter(|last| items.len() == limit as usize && link_for(last, &wallet) != 0).map(|last| last.seq);
    Ok(Json(HistoryPage { items: items.iter().map(transfer_body).collect(), next_before }))
}

/// Pays another agent from the signer's wallet. A retry with the same id returns the
/// original result (also the original failure).
#[utoipa::path(post, path = "/v1/ledger/transfers", tag = "ledger", request_body = TransferRequest,
    responses(
        (status = 201, description = "Applied (now or by an earlier request with this id)", body = TransferBody),
        (status = 401, description = "Unsigned, unknown agent, bad, stale or replayed signature", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "insufficient_funds, id_reused, balance_overflow", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_amount, invalid_id, invalid_account, unknown_account, same_account, invalid_body", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_transfer(
    State(state): State<AppState>,
    call: AgentCall,
) -> Result<(StatusCode, Json<TransferBody>), ApiError> {
    let outcome = run_call(&state, call, |agent, body| {
        let request: TransferRequest = parse_json(body)?;
        Ok(Command::Transfers(vec![payment_spec(agent, &request)?]))
    })
    .await?;
    let applied = first_transfer(outcome)?;
    Ok((StatusCode::CREATED, Json(transfer_body(applied.transfer()))))
}

/// Up to 1000 payments from the signer's wallet in one transaction; `linked` chains
/// succeed or fail together. Each item has its own result.
#[utoipa::path(post, path = "/v1/ledger/transfers/batch", tag = "ledger", request_body = BatchRequest,
    responses(
        (status = 200, description = "One result per transfer", body = BatchBody),
        (status = 401, description = "Unsigned, unknown agent, bad, stale or replayed signature", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A malformed item (nothing applied), or too many", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_transfer_batch(
    State(state): State<AppState>,
    call: AgentCall,
) -> Result<Json<BatchBody>, ApiError> {
    let mut ids: Vec<String> = Vec::new();
    let outcome = run_call(&state, call, |agent, body| {
        let request: BatchRequest = parse_json(body)?;
        if request.transfers.is_empty() || request.transfers.len() > BATCH_TRANSFERS_MAX {
            return Err(unprocessable("invalid_batch", format!("a batch has 1 to {BATCH_TRANSFERS_MAX} transfers")));
        }
        let specs = request.transfers.iter().map(|item| payment_spec(agent, item)).collect::<Result<Vec<_>, _>>()?;
        ids = specs.iter().map(|spec| spec.id.to_string()).collect();
        Ok(Command::Transfers(specs))
    })
    .await?;
    let Outcome::Transfers(results) = outcome else {
        return Err(unexpected_outcome());
    };
    let results = ids
        .into_iter()
        .zip(results)
        .map(|(id, result)| match result {
            Ok(applied) => BatchItemBody { id, transfer: Some(transfer_body(applied.transfer())), code: None },
            Err(error) => BatchItemBody { id, transfer: None, code: Some(error.code().to_owned()) },
        })
        .collect();
    Ok(Json(BatchBody { results }))
}

/// What the ledger knows about one of the signer's transfer ids.
#[utoipa::path(get, path = "/v1/ledger/transfers/{id}", tag = "ledger",
    params(("id" = String, Path, description = "Your transfer id")),
    responses(
        (status = 200, description = "Applied or rejected", body = TransferLookup),
        (status = 404, description = "Unknown id", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_transfer(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: AuthenticatedAgent,
) -> Result<Json<TransferLookup>, ApiError> {
    let id = TransferId::new(Namespace::Agent(caller.agent), &client_id(&id)?);
    let known = store::transfer(&state.db, &id).await.map_err(|e| ApiError::internal(&e))?;
    let lookup = match known {
        None => return Err(ApiError::not_found("no transfer with this id")),
        Some(Known::Applied(transfer)) => TransferLookup {
            id: id.to_string(),
            status: "applied".into(),
            transfer: Some(transfer_body(&transfer)),
            code: None,
        },
        Some(Known::Rejected(_, error)) => TransferLookup {
            id: id.to_string(),
            status: "rejected".into(),
            transfer: None,
            code: Some(error.code().into()),
        },
    };
    Ok(Json(lookup))
}

/// Locks credits from the signer's wallet in escrow for `payee`.
#[utoipa::path(post, path = "/v1/ledger/escrows", tag = "ledger", request_body = CreateEscrowRequest,
    responses(
        (status = 201, description = "Locked (now or by an earlier request with this id)", body = EscrowBody),
        (status = 409, description = "insufficient_funds, id_reused", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_amount, invalid_expiry, unknown_account, same_account", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_escrow(
    State(state): State<AppState>,
    call: AgentCall,
) -> Result<(StatusCode, Json<EscrowBody>), ApiError> {
    let now = state.clock.now();
    let outcome = run_call(&state, call, |agent, body| {
        let request: CreateEscrowRequest = parse_json(body)?;
        let id = TransferId::new(Namespace::Agent(agent), &client_id(&request.id)?);
        let payee = agent_id(&request.payee, "payee")?;
        let amount = amount(&request.amount)?;
        if request.expires_at_ms <= now.0 || request.expires_at_ms - now.0 > ESCROW_LIFETIME_MAX_MS {
            return Err(unprocessable("invalid_expiry", "expires_at_ms must be in the future, within a year"));
        }
        let spec = TransferSpec {
            id,
            debit: AccountId::wallet(agent),
            credit: AccountId::wallet(payee),
            amount,
            kind: TransferKind::Pending,
            pending_id: None,
            purpose: Purpose::Escrow,
            flags: TransferFlags::default(),
        };
        Ok(Command::CreateEscrow { spec, on_expiry: request.on_expiry, expires_at: UnixMillis(request.expires_at_ms) })
    })
    .await?;
    let escrow = escrow_outcome(outcome)?;
    Ok((StatusCode::CREATED, Json(escrow_body(&escrow))))
}

/// An escrow the signer is a party to.
#[utoipa::path(get, path = "/v1/ledger/escrows/{id}", tag = "ledger",
    params(("id" = String, Path, description = "Escrow id (`<payer>:<id>`)")),
    responses(
        (status = 200, description = "The escrow", body = EscrowBody),
        (status = 404, description = "No such escrow of yours (escrow_not_found)", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_escrow(
    State(state): State<AppState>,
    Path(id): Path<String>,
    caller: AuthenticatedAgent,
) -> Result<Json<EscrowBody>, ApiError> {
    let id = escrow_id(&id)?;
    let escrow = store::escrow(&state.db, &id).await.map_err(|e| ApiError::internal(&e))?;
    let wallet = AccountId::wallet(caller.agent);
    match escrow {
        Some(escrow) if escrow.payer == wallet || escrow.payee == wallet => Ok(Json(escrow_body(&escrow))),
        _ => Err(escrow_problem(EscrowError::NotFound)),
    }
}

/// The payer releases all or part of an escrow to the payee; the rest returns.
#[utoipa::path(post, path = "/v1/ledger/escrows/{id}/release", tag = "ledger", request_body = ReleaseRequest,
    params(("id" = String, Path, description = "Escrow id")),
    responses(
        (status = 200, description = "Released", body = EscrowBody),
        (status = 403, description = "Not the payer (not_escrow_party)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "escrow_not_found", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "escrow_resolved (already released or refunded)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_amount, invalid_release_amount", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn release_escrow(
    State(state): State<AppState>,
    Path(id): Path<String>,
    call: AgentCall,
) -> Result<Json<EscrowBody>, ApiError> {
    agent_escrow_event(&state, &id, call, |body| {
        let request: ReleaseRequest = if body.is_empty() { ReleaseRequest::default() } else { parse_json(body)? };
        let amount = request.amount.as_ref().map(amount).transpose()?;
        Ok(EscrowEvent::Release { amount })
    })
    .await
}

/// The payee returns everything to the payer.
#[utoipa::path(post, path = "/v1/ledger/escrows/{id}/refund", tag = "ledger",
    params(("id" = String, Path, description = "Escrow id")),
    responses(
        (status = 200, description = "Refunded", body = EscrowBody),
        (status = 403, description = "Not the payee (not_escrow_party)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "escrow_resolved", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn refund_escrow(
    State(state): State<AppState>,
    Path(id): Path<String>,
    call: AgentCall,
) -> Result<Json<EscrowBody>, ApiError> {
    agent_escrow_event(&state, &id, call, |_| Ok(EscrowEvent::Refund)).await
}

/// Either party disputes: expiry is frozen until an admin's ruling.
#[utoipa::path(post, path = "/v1/ledger/escrows/{id}/dispute", tag = "ledger",
    params(("id" = String, Path, description = "Escrow id")),
    responses(
        (status = 200, description = "Disputed", body = EscrowBody),
        (status = 409, description = "escrow_resolved, escrow_disputed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn dispute_escrow(
    State(state): State<AppState>,
    Path(id): Path<String>,
    call: AgentCall,
) -> Result<Json<EscrowBody>, ApiError> {
    agent_escrow_event(&state, &id, call, |_| Ok(EscrowEvent::Dispute)).await
}

/// Locks credits from the signer's wallet as stake of a kind.
#[utoipa::path(post, path = "/v1/ledger/stakes/lock", tag = "ledger", request_body = StakeRequest,
    responses(
        (status = 201, description = "Locked", body = TransferBody),
        (status = 409, description = "insufficient_funds, id_reused", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn lock_stake(
    State(state): State<AppState>,
    caller: AuthenticatedAgent,
) -> Result<(StatusCode, Json<TransferBody>), ApiError> {
    let request: StakeRequest = parse_json(&caller.body)?;
    let spec = stake_spec(caller.agent, &request, true)?;
    let accounts = [AccountId::stake(caller.agent, request.kind), AccountId::unbonding(caller.agent, request.kind)];
    store::ensure_accounts(&state.db, &accounts, state.clock.now()).await.map_err(|e| ApiError::internal(&e))?;
    let applied = first_transfer(run_one(&state, Command::Transfers(vec![spec])).await?)?;
    Ok((StatusCode::CREATED, Json(transfer_body(applied.transfer()))))
}

/// Starts unbonding stake: it returns to the wallet after the kind's unbonding period.
#[utoipa::path(post, path = "/v1/ledger/stakes/unlock", tag = "ledger", request_body = StakeRequest,
    responses(
        (status = 201, description = "Unbonding", body = UnbondingBody),
        (status = 409, description = "insufficient_funds (not that much staked), id_reused", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn unlock_stake(
    State(state): State<AppState>,
    call: AgentCall,
) -> Result<(StatusCode, Json<UnbondingBody>), ApiError> {
    let now = state.clock.now();
    let outcome = run_call(&state, call, |agent, body| {
        let request: StakeRequest = parse_json(body)?;
        let spec = stake_spec(agent, &request, false)?;
        let matures_at = now.saturating_add(stake::unbonding_period(request.kind));
        Ok(Command::Unlock { spec, owner: agent, kind: request.kind, matures_at })
    })
    .await?;
    let Outcome::Unbonding(result) = outcome else { return Err(unexpected_outcome()) };
    let unbonding = result.map_err(command_problem)?;
    Ok((StatusCode::CREATED, Json(unbonding_body(&unbonding))))
}

/// The signer's stakes and unbondings.
#[utoipa::path(get, path = "/v1/ledger/stakes", tag = "ledger",
    responses((status = 200, description = "Stakes", body = StakesBody)))]
pub async fn get_stakes(
    State(state): State<AppState>,
    caller: AuthenticatedAgent,
) -> Result<Json<StakesBody>, ApiError> {
    let accounts = store::accounts_of_owner(&state.db, caller.agent).await.map_err(|e| ApiError::internal(&e))?;
    let unbondings = store::unbondings_of(&state.db, caller.agent).await.map_err(|e| ApiError::internal(&e))?;
    Ok(Json(StakesBody {
        stakes: accounts.iter().filter(|a| !a.id.as_str().starts_with("wallet:")).map(account_body).collect(),
        unbondings: unbondings.iter().map(unbonding_body).collect(),
    }))
}

// ---- admin routes ----

/// Mints new credits into the treasury (or a wallet): the issuance account is debited.
#[utoipa::path(post, path = "/v1/admin/ledger/mint", tag = "ledger", request_body = MintRequest,
    security(("admin_key" = ["ledger:admin"])),
    responses(
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ledger:admin", body = Problem, content_type = "application/problem+json"),
        (status = 201, description = "Minted", body = TransferBody),
        (status = 409, description = "id_reused, balance_overflow", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_amount, invalid_account, unknown_account", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn mint(
    State(state): State<AppState>,
    _admin: Authorized<LedgerAdminScope>,
    ApiJson(request): ApiJson<MintRequest>,
) -> Result<(StatusCode, Json<TransferBody>), ApiError> {
    let to = match &request.to {
        None => AccountId::treasury(),
        Some(text) => AccountId::parse(text)
            .filter(|id| id.as_str() == "treasury" || id.as_str().starts_with("wallet:"))
            .ok_or_else(|| unprocessable("invalid_account", "to must be treasury or wallet:<agent>"))?,
    };
    let spec = TransferSpec {
        id: TransferId::new(Namespace::Admin, &client_id(&request.id)?),
        debit: AccountId::issuance(),
        credit: to,
        amount: amount(&request.amount)?,
        kind: TransferKind::Posted,
        pending_id: None,
        purpose: Purpose::Mint,
        flags: TransferFlags::default(),
    };
    let applied = first_transfer(run_one(&state, Command::Transfers(vec![spec])).await?)?;
    Ok((StatusCode::CREATED, Json(transfer_body(applied.transfer()))))
}

/// The transfer fee.
#[utoipa::path(get, path = "/v1/admin/ledger/fee", tag = "ledger", security(("admin_key" = ["ledger:admin"])),
    responses(
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ledger:admin", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "The fee", body = FeeBody)))]
pub async fn get_fee(
    State(state): State<AppState>,
    _admin: Authorized<LedgerAdminScope>,
) -> Result<Json<FeeBody>, ApiError> {
    let fee_bps = store::fee_bps(&state.db).await.map_err(|e| ApiError::internal(&e))?;
    Ok(Json(FeeBody { fee_bps }))
}

/// Sets the transfer fee (0 to 10 000 basis points) for transfers from now on.
#[utoipa::path(put, path = "/v1/admin/ledger/fee", tag = "ledger", request_body = FeeBody,
    security(("admin_key" = ["ledger:admin"])),
    responses(
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ledger:admin", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "Set", body = FeeBody),
        (status = 422, description = "invalid_fee", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn set_fee(
    State(state): State<AppState>,
    _admin: Authorized<LedgerAdminScope>,
    ApiJson(request): ApiJson<FeeBody>,
) -> Result<Json<FeeBody>, ApiError> {
    if request.fee_bps > 10_000 {
        return Err(unprocessable("invalid_fee", "fee_bps must be 0 to 10000"));
    }
    store::set_fee_bps(&state.db, request.fee_bps).await.map_err(|e| ApiError::internal(&e))?;
    Ok(Json(request))
}

/// Decides a disputed escrow: `release` to the payee, the rest to the payer.
#[utoipa::path(post, path = "/v1/admin/ledger/escrows/{id}/ruling", tag = "ledger", request_body = RulingRequest,
    security(("admin_key" = ["ledger:admin"])),
    params(("id" = String, Path, description = "Escrow id")),
    responses(
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ledger:admin", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "Resolved", body = EscrowBody),
        (status = 409, description = "escrow_not_disputed, escrow_resolved", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn rule_escrow(
    State(state): State<AppState>,
    Path(id): Path<String>,
    _admin: Authorized<LedgerAdminScope>,
    ApiJson(request): ApiJson<RulingRequest>,
) -> Result<Json<EscrowBody>, ApiError> {
    let release = amount_allowing_zero(&request.release)?;
    escrow_event(&state, &id, Requester::Admin, EscrowEvent::Ruling { release }).await
}

/// Slashes an agent's locked stake to the treasury (the hook for disputes).
#[utoipa::path(post, path = "/v1/admin/ledger/stakes/slash", tag = "ledger", request_body = SlashRequest,
    security(("admin_key" = ["ledger:admin"])),
    responses(
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ledger:admin", body = Problem, content_type = "application/problem+json"),
        (status = 201, description = "Slashed", body = TransferBody),
        (status = 409, description = "insufficient_funds (less staked), id_reused", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn slash_stake(
    State(state): State<AppState>,
    _admin: Authorized<LedgerAdminScope>,
    ApiJson(request): ApiJson<SlashRequest>,
) -> Result<(StatusCode, Json<TransferBody>), ApiError> {
    let agent = agent_id(&request.agent, "agent")?;
    let spec = slash_spec(&client_id(&request.id)?, agent, request.kind, amount(&request.amount)?);
    let applied = first_transfer(run_one(&state, Command::Transfers(vec![spec])).await?)?;
    Ok((StatusCode::CREATED, Json(transfer_body(applied.transfer()))))
}

/// Any account.
#[utoipa::path(get, path = "/v1/admin/ledger/accounts/{id}", tag = "ledger", security(("admin_key" = ["ledger:admin"])),
    params(("id" = String, Path, description = "Account id: treasury, issuance, wallet:<agent>, …")),
    responses(
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ledger:admin", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "The account", body = AccountBody),
        (status = 404, description = "account_not_found", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_account(
    State(state): State<AppState>,
    Path(id): Path<String>,
    _admin: Authorized<LedgerAdminScope>,
) -> Result<Json<AccountBody>, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "account_not_found", "no such account");
    let id = AccountId::parse(&id).ok_or_else(not_found)?;
    let account = store::account(&state.db, &id).await.map_err(|e| ApiError::internal(&e))?.ok_or_else(not_found)?;
    Ok(Json(account_body(&account)))
}

/// Replays the journal: hash chain, totals, debits = credits, overdraft flags.
#[utoipa::path(get, path = "/v1/admin/ledger/audit", tag = "ledger", security(("admin_key" = ["ledger:admin"])),
    responses(
        (status = 401, description = "Missing, unknown or revoked admin key", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks ledger:admin", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "The report (`ok` false lists problems)", body = AuditReport)))]
pub async fn audit(
    State(state): State<AppState>,
    _admin: Authorized<LedgerAdminScope>,
) -> Result<Json<AuditReport>, ApiError> {
    let report = store::audit(&state.db).await.map_err(|e| ApiError::internal(&e))?;
    if !report.ok {
        tracing::error!(problems = report.problem_count, "ledger audit found problems");
    }
    Ok(Json(report))
}

// ---- helpers ----

/// The spec of a slash: locked stake of `kind` → treasury.
pub fn slash_spec(id: &ClientId, agent: AgentId, kind: StakeKind, amount: Credits) -> TransferSpec {
    TransferSpec {
        id: TransferId::new(Namespace::Admin, id),
        debit: AccountId::stake(agent, kind),
        credit: AccountId::treasury(),
        amount,
        kind: TransferKind::Posted,
        pending_id: None,
        purpose: Purpose::StakeSlash,
        flags: TransferFlags::default(),
    }
}

fn payment_spec(agent: AgentId, request: &TransferRequest) -> Result<TransferSpec, ApiError> {
    let to = agent_id(&request.to, "to")?;
    Ok(TransferSpec {
        id: TransferId::new(Namespace::Agent(agent), &client_id(&request.id)?),
        debit: AccountId::wallet(agent),
        credit: AccountId::wallet(to),
        amount: amount(&request.amount)?,
        kind: TransferKind::Posted,
        pending_id: None,
        purpose: Purpose::Payment,
        flags: if request.linked { TransferFlags::LINKED } else { TransferFlags::default() },
    })
}

fn stake_spec(agent: AgentId, request: &StakeRequest, lock: bool) -> Result<TransferSpec, ApiError> {
    let (wallet, stake, unbonding) =
        (AccountId::wallet(agent), AccountId::stake(agent, request.kind), AccountId::unbonding(agent, request.kind));
    let (debit, credit, purpose) =
        if lock { (wallet, stake, Purpose::StakeLock) } else { (stake, unbonding, Purpose::StakeUnlock) };
    Ok(TransferSpec {
        id: TransferId::new(Namespace::Agent(agent), &client_id(&request.id)?),
        debit,
        credit,
        amount: amount(&request.amount)?,
        kind: TransferKind::Posted,
        pending_id: None,
        purpose,
        flags: TransferFlags::default(),
    })
}

async fn escrow_event(
    state: &AppState,
    id: &str,
    requester: Requester,
    event: EscrowEvent,
) -> Result<Json<EscrowBody>, ApiError> {
    let id = escrow_id(id)?;
    let escrow = escrow_outcome(run_one(state, Command::Escrow { id, requester, event }).await?)?;
    Ok(Json(escrow_body(&escrow)))
}

/// An agent's event on an escrow; `event` makes it of the request's body.
async fn agent_escrow_event(
    state: &AppState,
    id: &str,
    call: AgentCall,
    event: impl FnOnce(&[u8]) -> Result<EscrowEvent, ApiError>,
) -> Result<Json<EscrowBody>, ApiError> {
    let outcome = run_call(state, call, |agent, body| {
        Ok(Command::Escrow { id: escrow_id(id)?, requester: Requester::Agent(agent), event: event(body)? })
    })
    .await?;
    Ok(Json(escrow_body(&escrow_outcome(outcome)?)))
}

/// Runs the command `build` makes of an agent's signed call (from the signer and the
/// body), recording the call's nonce with it ([`crate::ledger::Ledger::execute_signed`]).
/// A call `build` refuses has its nonce recorded alone ([`AgentCall::refuse`]), so a
/// replay of any signed call is refused as one.
async fn run_call(
    state: &AppState,
    call: AgentCall,
    build: impl FnOnce(AgentId, &[u8]) -> Result<Command, ApiError>,
) -> Result<Outcome, ApiError> {
    let agent = call.agent;
    let command = match build(agent, &call.body) {
        Ok(command) => command,
        Err(refusal) => return Err(call.refuse(&state.nonces, state.clock.now(), refusal).await),
    };
    state.ledger.execute_signed(call.into_nonce(), command, &state.nonces).await.map_err(|error| match error.as_ref() {
        LedgerError::Replayed => replayed(agent),
        other => ApiError::internal(other),
    })
}

async fn run_one(state: &AppState, command: Command) -> Result<Outcome, ApiError> {
    let mut outcomes = state.ledger.execute(vec![command]).await.map_err(|error| ApiError::internal(error.as_ref()))?;
    outcomes.pop().ok_or_else(unexpected_outcome)
}

fn first_transfer(outcome: Outcome) -> Result<Applied, ApiError> {
    let Outcome::Transfers(mut results) = outcome else { return Err(unexpected_outcome()) };
    if results.is_empty() {
        return Err(unexpected_outcome());
    }
    results.swap_remove(0).map_err(transfer_problem)
}

fn escrow_outcome(outcome: Outcome) -> Result<Escrow, ApiError> {
    let Outcome::Escrow(result) = outcome else { return Err(unexpected_outcome()) };
    result.map_err(command_problem)
}

fn unexpected_outcome() -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the server failed to handle the request")
}

async fn wallet_body(state: &AppState, agent: AgentId) -> Result<WalletBody, ApiError> {
    let accounts = store::accounts_of_owner(&state.db, agent).await.map_err(|e| ApiError::internal(&e))?;
    let wallet_id = AccountId::wallet(agent);
    let wallet = accounts.iter().find(|account| account.id == wallet_id).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "wallet_not_found", "open a wallet first: POST /v1/ledger/wallet")
    })?;
    Ok(WalletBody {
        agent: agent.to_string(),
        wallet: account_body(wallet),
        stakes: accounts.iter().filter(|account| account.id != wallet_id).map(account_body).collect(),
    })
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let axum::Json(value) = axum::Json::<T>::from_bytes(body)?;
    Ok(value)
}

fn unprocessable(code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
}

fn client_id(text: &str) -> Result<ClientId, ApiError> {
    ClientId::new(text).map_err(|error| unprocessable("invalid_id", error.to_string()))
}

fn agent_id(text: &str, field: &str) -> Result<AgentId, ApiError> {
    text.parse().map_err(|_| unprocessable("invalid_account", format!("{field} is not an agent id")))
}

fn escrow_id(text: &str) -> Result<TransferId, ApiError> {
    TransferId::parse(text).filter(|id| !id.as_str().contains('#')).ok_or_else(|| escrow_problem(EscrowError::NotFound))
}

/// A positive amount within range.
fn amount(input: &AmountInput) -> Result<Credits, ApiError> {
    let value = amount_allowing_zero(input)?;
    if value.is_zero() {
        return Err(unprocessable("invalid_amount", "the amount must be positive"));
    }
    Ok(value)
}

fn amount_allowing_zero(input: &AmountInput) -> Result<Credits, ApiError> {
    let invalid = |detail: &str| unprocessable("invalid_amount", detail.to_owned());
    let micros = match input {
        AmountInput::Number(number) if number.as_i64().is_some_and(|n| n < 0) => {
            return Err(invalid("the amount must not be negative"));
        }
        AmountInput::Number(number) => {
            number.as_u64().ok_or_else(|| invalid("the amount must be an integer of micro-credits"))?
        }
        AmountInput::Text(text) if text.starts_with('-') => return Err(invalid("the amount must not be negative")),
        AmountInput::Text(text) if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(invalid("the amount must be an integer of micro-credits"));
        }
        AmountInput::Text(text) => text.parse::<u64>().map_err(|_| invalid("the amount is too large"))?,
    };
    Credits::new(micros).ok_or_else(|| invalid("the amount is too large (at most 2^63 - 1)"))
}

fn transfer_problem(error: TransferError) -> ApiError {
    let status = match error {
        TransferError::InsufficientFunds
        | TransferError::Overflow
        | TransferError::IdReused
        | TransferError::LinkedTransferFailed
        | TransferError::PendingResolved => StatusCode::CONFLICT,
        TransferError::PendingNotFound => StatusCode::NOT_FOUND,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError::new(status, error.code(), error.to_string())
}

fn escrow_problem(error: EscrowError) -> ApiError {
    let status = match error {
        EscrowError::NotFound => StatusCode::NOT_FOUND,
        EscrowError::NotAllowed => StatusCode::FORBIDDEN,
        EscrowError::InvalidAmount => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::CONFLICT,
    };
    ApiError::new(status, error.code(), error.to_string())
}

fn command_problem(error: CommandError) -> ApiError {
    match error {
        CommandError::Transfer(error) => transfer_problem(error),
        CommandError::Escrow(error) => escrow_problem(error),
        CommandError::Mature(MatureError::NotMatured) => {
            ApiError::new(StatusCode::CONFLICT, "not_matured", error.to_string())
        }
        other => ApiError::new(StatusCode::CONFLICT, "unbonding_unavailable", other.to_string()),
    }
}

pub fn account_body(account: &Account) -> AccountBody {
    AccountBody {
        id: account.id.to_string(),
        balance: clamp_i64(account.balance()),
        available: clamp_i64(account.available()),
        debits_pending: account.debits_pending.micros(),
        debits_posted: account.debits_posted.micros(),
        credits_pending: account.credits_pending.micros(),
        credits_posted: account.credits_posted.micros(),
        no_overdraft: account.flags.contains(crate::ledger::types::AccountFlags::NO_OVERDRAFT),
    }
}

/// The entry before `transfer` among `account`'s (0: none).
fn link_for(transfer: &Transfer, account: &AccountId) -> u64 {
    if transfer.spec.debit == *account { transfer.debit_prev } else { transfer.credit_prev }
}

pub fn transfer_body(transfer: &Transfer) -> TransferBody {
    let spec = &transfer.spec;
    TransferBody {
        id: spec.id.to_string(),
        seq: transfer.seq,
        debit_account: spec.debit.to_string(),
        credit_account: spec.credit.to_string(),
        amount: spec.amount.micros(),
        kind: spec.kind,
        pending_id: spec.pending_id.as_ref().map(ToString::to_string),
        purpose: spec.purpose,
        linked: spec.flags.contains(TransferFlags::LINKED),
        created_at_ms: transfer.created_at.0,
        hash: hex::encode(transfer.hash),
    }
}

pub fn escrow_body(escrow: &Escrow) -> EscrowBody {
    EscrowBody {
        id: escrow.id.to_string(),
        payer: escrow.payer.to_string(),
        payee: escrow.payee.to_string(),
        amount: escrow.amount.micros(),
        state: escrow.state,
        on_expiry: escrow.on_expiry,
        expires_at_ms: escrow.expires_at.0,
        released: escrow.released.micros(),
        created_at_ms: escrow.created_at.0,
        updated_at_ms: escrow.updated_at.0,
    }
}

fn unbonding_body(unbonding: &Unbonding) -> UnbondingBody {
    UnbondingBody {
        id: unbonding.id.to_string(),
        kind: unbonding.kind,
        amount: unbonding.amount.micros(),
        matures_at_ms: unbonding.matures_at.0,
        state: unbonding.state,
    }
}

fn clamp_i64(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}
