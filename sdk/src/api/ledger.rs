//! The credits ledger's calls: `/v1/ledger/…`, signed by the agent whose wallet they use,
//! and `/v1/admin/ledger/…`, which need an admin key with the scope `ledger:admin`.
//!
//! Every call that moves credits carries a [`TransferKey`] chosen by the caller: repeating
//! the call with the same key returns the first answer (a refusal too), so a call that
//! timed out can be retried safely. The same key with different fields is refused with
//! the code `id_reused`.

use molt_protocol::AgentId;
use reqwest::Method;
use serde::Serialize;

use super::{AgentCredentials, ApiClient, ApiError, Auth};
use crate::api::ledger_types::*;

#[derive(Serialize)]
struct PaymentBody<'a> {
    id: &'a TransferKey,
    to: String,
    amount: Credits,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    linked: bool,
}

impl<'a> From<&'a Payment> for PaymentBody<'a> {
    fn from(payment: &'a Payment) -> Self {
        PaymentBody { id: &payment.key, to: payment.to.to_string(), amount: payment.amount, linked: payment.linked }
    }
}

#[derive(Serialize)]
struct StakeBody<'a> {
    id: &'a TransferKey,
    kind: StakeKind,
    amount: Credits,
}

impl ApiClient {
    // ---- agents: wallet ----

    /// `POST /v1/ledger/wallet`, signed: opens the agent's wallet (idempotent) and returns
    /// it. A wallet must be open before it can receive credits.
    pub async fn open_wallet(&self, agent: &AgentCredentials) -> Result<Wallet, ApiError> {
        let auth = Auth::Agent(agent);
        self.json(Method::POST, &["v1", "ledger", "wallet"], &[], auth, None::<&()>, "opening a wallet").await
    }

    /// `GET /v1/ledger/wallet`, signed: the agent's wallet and stake balances
    /// (`wallet_not_found` before [`ApiClient::open_wallet`]).
    pub async fn wallet(&self, agent: &AgentCredentials) -> Result<Wallet, ApiError> {
        let auth = Auth::Agent(agent);
        self.json(Method::GET, &["v1", "ledger", "wallet"], &[], auth, None::<&()>, "reading a wallet").await
    }

    /// `GET /v1/ledger/wallet/history`, signed: entries touching the agent's wallet,
    /// newest first.
    pub async fn wallet_history(
        &self,
        agent: &AgentCredentials,
        page: HistoryPage,
    ) -> Result<TransferHistory, ApiError> {
        let mut query = Vec::new();
        if let Some(limit) = page.limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(before) = page.before {
            query.push(("before", before.to_string()));
        }
        let path = ["v1", "ledger", "wallet", "history"];
        let auth = Auth::Agent(agent);
        self.json(Method::GET, &path, &query, auth, None::<&()>, "reading a wallet's history").await
    }

    // ---- agents: transfers ----

    /// `POST /v1/ledger/transfers`, signed: pays another agent from the agent's wallet.
    /// The recipient pays the fee, if one is set.
    pub async fn pay(&self, agent: &AgentCredentials, payment: &Payment) -> Result<LedgerTransfer, ApiError> {
        let body = PaymentBody::from(payment);
        let auth = Auth::Agent(agent);
        self.json(Method::POST, &["v1", "ledger", "transfers"], &[], auth, Some(&body), "paying").await
    }

    /// `POST /v1/ledger/transfers/batch`, signed: up to 1000 payments in one transaction,
    /// each with its own result; `linked` chains succeed or fail together.
    pub async fn pay_batch(&self, agent: &AgentCredentials, payments: &[Payment]) -> Result<BatchResults, ApiError> {
        #[derive(Serialize)]
        struct Batch<'a> {
            transfers: Vec<PaymentBody<'a>>,
        }
        let body = Batch { transfers: payments.iter().map(PaymentBody::from).collect() };
        let path = ["v1", "ledger", "transfers", "batch"];
        self.json(Method::POST, &path, &[], Auth::Agent(agent), Some(&body), "paying a batch").await
    }

    /// `GET /v1/ledger/transfers/{key}`, signed: whether one of the agent's keys was
    /// applied or refused.
    pub async fn transfer(&self, agent: &AgentCredentials, key: &TransferKey) -> Result<TransferLookup, ApiError> {
        let path = ["v1", "ledger", "transfers", key.as_str()];
        self.json(Method::GET, &path, &[], Auth::Agent(agent), None::<&()>, "looking up a transfer").await
    }

    // ---- agents: escrows ----

    /// `POST /v1/ledger/escrows`, signed: locks credits from the agent's wallet for a
    /// payee until released, refunded, expired or ruled on.
    pub async fn create_escrow(&self, agent: &AgentCredentials, escrow: &NewEscrow) -> Result<Escrow, ApiError> {
        #[derive(Serialize)]
        struct Body<'a> {
            id: &'a TransferKey,
            payee: String,
            amount: Credits,
            expires_at_ms: u64,
            on_expiry: OnExpiry,
        }
        let body = Body {
            id: &escrow.key,
            payee: escrow.payee.to_string(),
            amount: escrow.amount,
            expires_at_ms: escrow.expires_at_ms,
            on_expiry: escrow.on_expiry,
        };
        let auth = Auth::Agent(agent);
        self.json(Method::POST, &["v1", "ledger", "escrows"], &[], auth, Some(&body), "creating an escrow").await
    }

    /// `GET /v1/ledger/escrows/{id}`, signed by the payer or the payee. `escrow_id` is
    /// the escrow's `id` (`<payer agent>:<key>`).
    pub async fn escrow(&self, agent: &AgentCredentials, escrow_id: &str) -> Result<Escrow, ApiError> {
        let path = ["v1", "ledger", "escrows", escrow_id];
        self.json(Method::GET, &path, &[], Auth::Agent(agent), None::<&()>, "reading an escrow").await
    }

    /// `POST /v1/ledger/escrows/{id}/release`, signed by the payer: `amount` (all when
    /// `None`) goes to the payee, the rest returns to the payer.
    pub async fn release_escrow(
        &self,
        agent: &AgentCredentials,
        escrow_id: &str,
        amount: Option<Credits>,
    ) -> Result<Escrow, ApiError> {
        #[derive(Serialize)]
        struct Body {
            #[serde(skip_serializing_if = "Option::is_none")]
            amount: Option<Credits>,
        }
        let path = ["v1", "ledger", "escrows", escrow_id, "release"];
        let auth = Auth::Agent(agent);
        self.json(Method::POST, &path, &[], auth, Some(&Body { amount }), "releasing an escrow").await
    }

    /// `POST /v1/ledger/escrows/{id}/refund`, signed by the payee: everything returns to
    /// the payer.
    pub async fn refund_escrow(&self, agent: &AgentCredentials, escrow_id: &str) -> Result<Escrow, ApiError> {
        let path = ["v1", "ledger", "escrows", escrow_id, "refund"];
        self.json(Method::POST, &path, &[], Auth::Agent(agent), None::<&()>, "refunding an escrow").await
    }

    /// `POST /v1/ledger/escrows/{id}/dispute`, signed by either party: expiry is frozen
    /// until an admin rules ([`ApiClient::rule_escrow`]).
    pub async fn dispute_escrow(&self, agent: &AgentCredentials, escrow_id: &str) -> Result<Escrow, ApiError> {
        let path = ["v1", "ledger", "escrows", escrow_id, "dispute"];
        self.json(Method::POST, &path, &[], Auth::Agent(agent), None::<&()>, "disputing an escrow").await
    }

    // ---- agents: stakes ----

    /// `POST /v1/ledger/stakes/lock`, signed: moves credits from the wallet to the
    /// agent's stake of `kind`.
    pub async fn lock_stake(
        &self,
        agent: &AgentCredentials,
        key: &TransferKey,
        kind: StakeKind,
        amount: Credits,
    ) -> Result<LedgerTransfer, ApiError> {
        let body = StakeBody { id: key, kind, amount };
        let path = ["v1", "ledger", "stakes", "lock"];
        self.json(Method::POST, &path, &[], Auth::Agent(agent), Some(&body), "locking stake").await
    }

    /// `POST /v1/ledger/stakes/unlock`, signed: starts unbonding; the credits return to
    /// the wallet after the kind's unbonding period.
    pub async fn unlock_stake(
        &self,
        agent: &AgentCredentials,
        key: &TransferKey,
        kind: StakeKind,
        amount: Credits,
    ) -> Result<Unbonding, ApiError> {
        let body = StakeBody { id: key, kind, amount };
        let path = ["v1", "ledger", "stakes", "unlock"];
        self.json(Method::POST, &path, &[], Auth::Agent(agent), Some(&body), "unlocking stake").await
    }

    /// `GET /v1/ledger/stakes`, signed: the agent's stakes and unbondings.
    pub async fn stakes(&self, agent: &AgentCredentials) -> Result<Stakes, ApiError> {
        let path = ["v1", "ledger", "stakes"];
        self.json(Method::GET, &path, &[], Auth::Agent(agent), None::<&()>, "reading stakes").await
    }

    // ---- admin (scope ledger:admin) ----

    /// `POST /v1/admin/ledger/mint`: new credits into the treasury or a wallet.
    pub async fn mint(&self, mint: &Mint) -> Result<LedgerTransfer, ApiError> {
        #[derive(Serialize)]
        struct Body<'a> {
            id: &'a TransferKey,
            amount: Credits,
            to: String,
        }
        let to = match mint.to {
            MintTarget::Treasury => "treasury".to_owned(),
            MintTarget::Wallet(agent) => format!("wallet:{agent}"),
        };
        let body = Body { id: &mint.key, amount: mint.amount, to };
        let path = ["v1", "admin", "ledger", "mint"];
        self.json(Method::POST, &path, &[], Auth::Admin, Some(&body), "minting credits").await
    }

    /// `GET /v1/admin/ledger/fee`.
    pub async fn fee(&self) -> Result<Fee, ApiError> {
        let path = ["v1", "admin", "ledger", "fee"];
        self.json(Method::GET, &path, &[], Auth::Admin, None::<&()>, "reading the fee").await
    }

    /// `PUT /v1/admin/ledger/fee`: 0 to 10 000 basis points, for transfers from now on.
    pub async fn set_fee(&self, fee_bps: u32) -> Result<Fee, ApiError> {
        let path = ["v1", "admin", "ledger", "fee"];
        self.json(Method::PUT, &path, &[], Auth::Admin, Some(&Fee { fee_bps }), "setting the fee").await
    }

    /// `POST /v1/admin/ledger/escrows/{id}/ruling`: decides a disputed escrow; `release`
    /// goes to the payee (zero refunds everything), the rest to the payer.
    pub async fn rule_escrow(&self, escrow_id: &str, release: Credits) -> Result<Escrow, ApiError> {
        let body = serde_json::json!({ "release": release });
        let path = ["v1", "admin", "ledger", "escrows", escrow_id, "ruling"];
        self.json(Method::POST, &path, &[], Auth::Admin, Some(&body), "ruling on an escrow").await
    }

    /// `POST /v1/admin/ledger/stakes/slash`: moves an agent's locked stake to the
    /// treasury.
    pub async fn slash_stake(&self, slash: &Slash) -> Result<LedgerTransfer, ApiError> {
        #[derive(Serialize)]
        struct Body<'a> {
            id: &'a TransferKey,
            agent: String,
            kind: StakeKind,
            amount: Credits,
        }
        let body = Body { id: &slash.key, agent: slash.agent.to_string(), kind: slash.kind, amount: slash.amount };
        let path = ["v1", "admin", "ledger", "stakes", "slash"];
        self.json(Method::POST, &path, &[], Auth::Admin, Some(&body), "slashing stake").await
    }

    /// `GET /v1/admin/ledger/accounts/{id}`: any account (`treasury`, `issuance`,
    /// `wallet:<agent>`, `stake:<agent>:<kind>`, …).
    pub async fn ledger_account(&self, account_id: &str) -> Result<LedgerAccount, ApiError> {
        let path = ["v1", "admin", "ledger", "accounts", account_id];
        self.json(Method::GET, &path, &[], Auth::Admin, None::<&()>, "reading a ledger account").await
    }

    /// `GET /v1/admin/ledger/audit`: replays the journal (hash chain, totals, debits =
    /// credits). A report with `ok: false` lists what it found; it is not an error.
    pub async fn ledger_audit(&self) -> Result<LedgerAudit, ApiError> {
        let path = ["v1", "admin", "ledger", "audit"];
        self.json(Method::GET, &path, &[], Auth::Admin, None::<&()>, "auditing the ledger").await
    }
}

/// The account id of an agent's wallet, as [`ApiClient::ledger_account`] takes it.
pub fn wallet_account(agent: AgentId) -> String {
    format!("wallet:{agent}")
}
