//! The ledger's values: amounts, account and transfer ids, accounts and transfers.

use std::fmt;

use molt_protocol::{AgentId, UnixMillis};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Micro-credits in one credit.
pub const MICROS_PER_CREDIT: u64 = 1_000_000;
/// Longest client-chosen id.
pub const CLIENT_ID_BYTES_MAX: usize = 64;

/// An amount of micro-credits. Never negative and at most `i64::MAX`, so that it is
/// stored as a signed 64-bit integer on both backends; all arithmetic is checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct Credits(u64);

impl Credits {
    pub const ZERO: Credits = Credits(0);
    pub const MAX: Credits = Credits(i64::MAX as u64);

    /// `None` above [`Credits::MAX`].
    pub const fn new(micros: u64) -> Option<Credits> {
        if micros <= Credits::MAX.0 { Some(Credits(micros)) } else { None }
    }

    pub const fn micros(self) -> u64 {
        self.0
    }

    pub fn checked_add(self, other: Credits) -> Option<Credits> {
        self.0.checked_add(other.0).and_then(Credits::new)
    }

    pub fn checked_sub(self, other: Credits) -> Option<Credits> {
        self.0.checked_sub(other.0).map(Credits)
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// `self × bps / 10 000`, rounded down.
    pub fn basis_points(self, bps: u32) -> Credits {
        // Invariant: the product fits u128 and the quotient is at most self.
        Credits((u128::from(self.0) * u128::from(bps) / 10_000) as u64)
    }

    /// The stored form.
    pub fn to_db(self) -> i64 {
        // Invariant: at most i64::MAX by construction.
        self.0 as i64
    }

    pub fn from_db(value: i64) -> Option<Credits> {
        u64::try_from(value).ok().map(Credits)
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A client-chosen id (idempotency key): 1–64 bytes of `A-Z a-z 0-9 _ . -`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(String);

/// The text is not a client id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id: 1 to 64 characters of A-Z, a-z, 0-9, '_', '.', '-'")]
pub struct InvalidClientId;

impl ClientId {
    pub fn new(text: &str) -> Result<ClientId, InvalidClientId> {
        let valid = !text.is_empty()
            && text.len() <= CLIENT_ID_BYTES_MAX
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if valid { Ok(ClientId(text.to_owned())) } else { Err(InvalidClientId) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who chose a client id: ids are unique per namespace, so agents cannot squat each
/// other's ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Namespace {
    Agent(AgentId),
    Admin,
}

/// A transfer's id in the journal: `<namespace>:<client id>` for transfers clients ask
/// for, with a `#…` suffix for the transfers derived from them (fees, resolutions,
/// maturities). Client ids cannot contain `:` or `#`, so the forms never collide.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransferId(String);

impl TransferId {
    pub fn new(namespace: Namespace, client: &ClientId) -> TransferId {
        match namespace {
            Namespace::Agent(agent) => TransferId(format!("{agent}:{}", client.as_str())),
            Namespace::Admin => TransferId(format!("admin:{}", client.as_str())),
        }
    }

    /// A full id read back from storage or a path; checked for shape only.
    pub fn parse(text: &str) -> Option<TransferId> {
        let (namespace, rest) = text.split_once(':')?;
        let client = rest.split('#').next()?;
        let namespace_ok = namespace == "admin" || namespace.parse::<AgentId>().is_ok();
        (namespace_ok && ClientId::new(client).is_ok()).then(|| TransferId(text.to_owned()))
    }

    /// The id of a transfer derived from this one.
    pub fn derived(&self, suffix: &str) -> TransferId {
        TransferId(format!("{}#{suffix}", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn from_stored(text: String) -> TransferId {
        TransferId(text)
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an account is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    /// Where minted credits come from: its debits are the money supply.
    Issuance,
    /// Receives fees and slashed stakes; admins mint into it.
    Treasury,
    /// An agent's spendable credits.
    Wallet,
    /// An agent's locked stake of one kind.
    Stake,
    /// An agent's stake of one kind waiting out its unbonding period.
    Unbonding,
}

impl AccountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::Issuance => "issuance",
            AccountKind::Treasury => "treasury",
            AccountKind::Wallet => "wallet",
            AccountKind::Stake => "stake",
            AccountKind::Unbonding => "unbonding",
        }
    }

    pub fn parse(text: &str) -> Option<AccountKind> {
        [AccountKind::Issuance, AccountKind::Treasury, AccountKind::Wallet, AccountKind::Stake, AccountKind::Unbonding]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// What a stake is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StakeKind {
    Trust,
    Governance,
    Job,
}

impl StakeKind {
    pub const ALL: [StakeKind; 3] = [StakeKind::Trust, StakeKind::Governance, StakeKind::Job];

    pub fn as_str(self) -> &'static str {
        match self {
            StakeKind::Trust => "trust",
            StakeKind::Governance => "governance",
            StakeKind::Job => "job",
        }
    }

    pub fn parse(text: &str) -> Option<StakeKind> {
        StakeKind::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// An account id: `issuance`, `treasury`, `wallet:<agent>`, `stake:<agent>:<kind>` or
/// `unbonding:<agent>:<kind>`. Ids order the row locks.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountId(String);

impl AccountId {
    pub fn issuance() -> AccountId {
        AccountId("issuance".into())
    }

    pub fn treasury() -> AccountId {
        AccountId("treasury".into())
    }

    pub fn wallet(agent: AgentId) -> AccountId {
        AccountId(format!("wallet:{agent}"))
    }

    pub fn stake(agent: AgentId, kind: StakeKind) -> AccountId {
        AccountId(format!("stake:{agent}:{}", kind.as_str()))
    }

    pub fn unbonding(agent: AgentId, kind: StakeKind) -> AccountId {
        AccountId(format!("unbonding:{agent}:{}", kind.as_str()))
    }

    /// Parses any of the forms above.
    pub fn parse(text: &str) -> Option<AccountId> {
        let mut parts = text.split(':');
        let valid = match (parts.next()?, parts.next(), parts.next(), parts.next()) {
            ("issuance" | "treasury", None, None, None) => true,
            ("wallet", Some(agent), None, None) => agent.parse::<AgentId>().is_ok(),
            ("stake" | "unbonding", Some(agent), Some(kind), None) => {
                agent.parse::<AgentId>().is_ok() && StakeKind::parse(kind).is_some()
            }
            _ => false,
        };
        valid.then(|| AccountId(text.to_owned()))
    }

    /// The kind and owner the id names.
    pub fn kind_and_owner(&self) -> (AccountKind, Option<AgentId>) {
        let mut parts = self.0.split(':');
        let kind = parts.next().and_then(AccountKind::parse).unwrap_or(AccountKind::Treasury);
        (kind, parts.next().and_then(|agent| agent.parse().ok()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Account flags, a bit set stored as an integer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AccountFlags(pub u64);

impl AccountFlags {
    /// Debits (posted + pending) may never exceed posted credits: no overdraft.
    pub const NO_OVERDRAFT: AccountFlags = AccountFlags(1);

    pub fn contains(self, other: AccountFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The flags every account of `kind` gets: all but the issuance account forbid
    /// overdraft.
    pub fn for_kind(kind: AccountKind) -> AccountFlags {
        match kind {
            AccountKind::Issuance => AccountFlags(0),
            _ => AccountFlags::NO_OVERDRAFT,
        }
    }
}

/// An account with its four totals (TigerBeetle's model): the balance is derived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub flags: AccountFlags,
    pub debits_pending: Credits,
    pub debits_posted: Credits,
    pub credits_pending: Credits,
    pub credits_posted: Credits,
    /// The journal position of the newest entry that touches this account (0: none). With
    /// [`Transfer::debit_prev`] and [`Transfer::credit_prev`] it links the account's
    /// entries newest to oldest, which is how its history is read.
    pub last_seq: u64,
}

impl Account {
    pub fn new(id: AccountId) -> Account {
        let flags = AccountFlags::for_kind(id.kind_and_owner().0);
        Account {
            id,
            flags,
            debits_pending: Credits::ZERO,
            debits_posted: Credits::ZERO,
            credits_pending: Credits::ZERO,
            credits_posted: Credits::ZERO,
            last_seq: 0,
        }
    }

    /// Posted credits − posted debits (negative only for the issuance account).
    pub fn balance(&self) -> i128 {
        self.totals().balance()
    }

    /// What can still be debited: the balance less pending debits.
    pub fn available(&self) -> i128 {
        self.totals().available()
    }

    /// Everything but the id.
    pub fn totals(&self) -> Totals {
        Totals {
            flags: self.flags,
            debits_pending: self.debits_pending,
            debits_posted: self.debits_posted,
            credits_pending: self.credits_pending,
            credits_posted: self.credits_posted,
            last_seq: self.last_seq,
        }
    }

    pub fn set_totals(&mut self, totals: Totals) {
        let Totals { flags, debits_pending, debits_posted, credits_pending, credits_posted, last_seq } = totals;
        self.flags = flags;
        self.debits_pending = debits_pending;
        self.debits_posted = debits_posted;
        self.credits_pending = credits_pending;
        self.credits_posted = credits_posted;
        self.last_seq = last_seq;
    }
}

/// An account without its id: what a transfer is checked and applied on, copied without
/// an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Totals {
    pub flags: AccountFlags,
    pub debits_pending: Credits,
    pub debits_posted: Credits,
    pub credits_pending: Credits,
    pub credits_posted: Credits,
    pub last_seq: u64,
}

impl Totals {
    /// Posted credits less posted debits.
    pub fn balance(&self) -> i128 {
        i128::from(self.credits_posted.micros()) - i128::from(self.debits_posted.micros())
    }

    /// What can still be debited: the balance less pending debits.
    pub fn available(&self) -> i128 {
        self.balance() - i128::from(self.debits_pending.micros())
    }
}

/// How a transfer moves money.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    /// Moves the amount at once.
    Posted,
    /// Reserves the amount (two-phase, first phase).
    Pending,
    /// Resolves a pending transfer by moving `amount` (at most the pending amount) and
    /// releasing the rest.
    PostPending,
    /// Resolves a pending transfer by releasing all of it.
    VoidPending,
}

impl TransferKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferKind::Posted => "posted",
            TransferKind::Pending => "pending",
            TransferKind::PostPending => "post_pending",
            TransferKind::VoidPending => "void_pending",
        }
    }

    pub fn parse(text: &str) -> Option<TransferKind> {
        [TransferKind::Posted, TransferKind::Pending, TransferKind::PostPending, TransferKind::VoidPending]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// Why a transfer was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Payment,
    Fee,
    Mint,
    Escrow,
    EscrowRelease,
    EscrowRefund,
    StakeLock,
    StakeUnlock,
    StakeUnbonded,
    StakeSlash,
}

impl Purpose {
    const ALL: [Purpose; 10] = [
        Purpose::Payment,
        Purpose::Fee,
        Purpose::Mint,
        Purpose::Escrow,
        Purpose::EscrowRelease,
        Purpose::EscrowRefund,
        Purpose::StakeLock,
        Purpose::StakeUnlock,
        Purpose::StakeUnbonded,
        Purpose::StakeSlash,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Payment => "payment",
            Purpose::Fee => "fee",
            Purpose::Mint => "mint",
            Purpose::Escrow => "escrow",
            Purpose::EscrowRelease => "escrow_release",
            Purpose::EscrowRefund => "escrow_refund",
            Purpose::StakeLock => "stake_lock",
            Purpose::StakeUnlock => "stake_unlock",
            Purpose::StakeUnbonded => "stake_unbonded",
            Purpose::StakeSlash => "stake_slash",
        }
    }

    pub fn parse(text: &str) -> Option<Purpose> {
        Purpose::ALL.into_iter().find(|purpose| purpose.as_str() == text)
    }

    /// Whether the recipient pays the transfer fee on it.
    pub fn charges_fee(self) -> bool {
        matches!(self, Purpose::Payment | Purpose::EscrowRelease)
    }
}

/// Transfer flags, a bit set stored as an integer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TransferFlags(pub u64);

impl TransferFlags {
    /// Succeeds or fails together with the next transfer of its batch.
    pub const LINKED: TransferFlags = TransferFlags(1);

    pub fn contains(self, other: TransferFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// What a client asks the ledger to do: the fields that identify a transfer. Two
/// requests with the same id must carry equal specs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferSpec {
    pub id: TransferId,
    pub debit: AccountId,
    pub credit: AccountId,
    pub amount: Credits,
    pub kind: TransferKind,
    /// For `PostPending` and `VoidPending`: the pending transfer.
    pub pending_id: Option<TransferId>,
    pub purpose: Purpose,
    pub flags: TransferFlags,
}

/// An applied transfer: immutable, in the journal at `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub seq: u64,
    pub spec: TransferSpec,
    pub created_at: UnixMillis,
    pub hash: [u8; 32],
    /// The previous entry touching the debit account (0: none), and the same for the
    /// credit account. Derived from the journal order, so not part of `hash`; the audit
    /// checks them.
    pub debit_prev: u64,
    pub credit_prev: u64,
}

/// A refused transfer, remembered under its id with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub spec: TransferSpec,
    pub error: super::TransferError,
    pub created_at: UnixMillis,
}
