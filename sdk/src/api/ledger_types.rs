//! The credits ledger's JSON bodies ([`super::ApiClient`]'s `/v1/ledger` and
//! `/v1/admin/ledger` calls), and [`Credits`], the amount type with its exact text form.
//!
//! Amounts are integer micro-credits on the wire: one credit is [`MICROS_PER_CREDIT`].
//! People read and write credits with up to six decimals (`1.5` is 1 500 000
//! micro-credits), or micro-credits with a `u` suffix (`1500000u`). Parsing is exact,
//! with no floating point anywhere.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore as _;
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};

/// Micro-credits in one credit.
pub const MICROS_PER_CREDIT: u64 = 1_000_000;
/// Decimals of a credit amount: micro-credits are the smallest unit.
pub const CREDIT_DECIMALS: usize = 6;
/// Longest transfer key the control plane accepts.
pub const TRANSFER_KEY_BYTES_MAX: usize = 64;

const _: () = assert!(10u64.pow(CREDIT_DECIMALS as u32) == MICROS_PER_CREDIT);

/// An amount of micro-credits, 0 to [`Credits::MAX`] (the ledger's `i64` range).
///
/// Its text form is credits with six decimals (`1.500000`); [`FromStr`] also reads
/// fewer decimals (`1.5`, `2`) and micro-credits with a `u` suffix (`1500000u`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Credits(u64);

impl Credits {
    pub const ZERO: Credits = Credits(0);
    /// The largest amount the ledger holds: 2^63 − 1 micro-credits.
    pub const MAX: Credits = Credits(i64::MAX as u64);

    /// `None` above [`Credits::MAX`].
    pub const fn from_micros(micros: u64) -> Option<Credits> {
        if micros <= Credits::MAX.0 { Some(Credits(micros)) } else { None }
    }

    pub const fn micros(self) -> u64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Like [`FromStr`], but refuses zero: what every transfer, escrow, stake and mint
    /// amount must be.
    pub fn parse_positive(text: &str) -> Result<Credits, ParseCreditsError> {
        let credits: Credits = text.parse()?;
        if credits.is_zero() {
            return Err(ParseCreditsError::Zero);
        }
        Ok(credits)
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_micros(f, false, u128::from(self.0))
    }
}

impl FromStr for Credits {
    type Err = ParseCreditsError;

    fn from_str(text: &str) -> Result<Credits, ParseCreditsError> {
        if text.is_empty() {
            return Err(ParseCreditsError::Empty);
        }
        if text.starts_with('-') {
            return Err(ParseCreditsError::Negative);
        }
        let micros = match text.strip_suffix('u') {
            Some(digits) => parse_digits(digits)?,
            None => parse_decimal_credits(text)?,
        };
        let micros = micros.ok_or(ParseCreditsError::TooLarge)?;
        Credits::from_micros(micros).ok_or(ParseCreditsError::TooLarge)
    }
}

/// The text is not an amount of credits. Messages name what is accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseCreditsError {
    #[error("the amount is empty: give credits such as 1.5, or micro-credits such as 1500000u")]
    Empty,
    #[error("the amount must not be negative")]
    Negative,
    #[error("the amount must be positive")]
    Zero,
    #[error("credits have at most {CREDIT_DECIMALS} decimals (micro-credits); for micro-credits write e.g. 1500000u")]
    TooManyDecimals,
    #[error("the amount is too large: at most {max} credits", max = Credits::MAX)]
    TooLarge,
    #[error(
        "{0:?} is not an amount: give credits such as 1.5 (up to {CREDIT_DECIMALS} decimals), or micro-credits such as 1500000u"
    )]
    Malformed(String),
}

/// A signed amount of micro-credits: an account's balance (the issuance account's is
/// negative: its debits are the money supply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Balance(pub i64);

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_micros(f, self.0 < 0, u128::from(self.0.unsigned_abs()))
    }
}

/// A total of micro-credits over many accounts (the audit's sums).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CreditsTotal(pub u128);

impl fmt::Display for CreditsTotal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_micros(f, false, self.0)
    }
}

/// A client-chosen id of a transfer, escrow, stake change, mint or slash: its
/// idempotency key. 1 to 64 of `A-Z a-z 0-9 _ . -`, unique among the caller's ids (an
/// agent's, or the admins'). Repeating a request with the same key returns the first
/// answer, a refusal included; the same key with different fields is refused
/// (`id_reused`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TransferKey(String);

/// The 48 bits of milliseconds a [`TransferKey::random`] starts with (until the year 10889).
const TIME_MASK: u64 = (1 << 48) - 1;

/// The text is not a [`TransferKey`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {0:?}: 1 to {TRANSFER_KEY_BYTES_MAX} characters of A-Z, a-z, 0-9, '_', '.', '-'")]
pub struct InvalidTransferKey(pub String);

impl TransferKey {
    pub fn new(text: &str) -> Result<TransferKey, InvalidTransferKey> {
        let valid = !text.is_empty()
            && text.len() <= TRANSFER_KEY_BYTES_MAX
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if valid { Ok(TransferKey(text.to_owned())) } else { Err(InvalidTransferKey(text.to_owned())) }
    }

    /// A fresh key: `t-`, the time in milliseconds since the Unix epoch (12 hex digits),
    /// then 80 random bits (20 hex digits). Keys made later sort later, as ULIDs and UUIDv7
    /// do, so the ledger's index of ids grows at its end: a batch of payments changes a
    /// page or two of it rather than one page at a random place each. 80 random bits keep
    /// keys made in the same millisecond apart.
    pub fn random() -> TransferKey {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let millis = u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX) & TIME_MASK;
        let mut bytes = [0u8; 10];
        OsRng.fill_bytes(&mut bytes);
        TransferKey(format!("t-{millis:012x}{}", hex::encode(bytes)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TransferKey {
    type Err = InvalidTransferKey;

    fn from_str(text: &str) -> Result<TransferKey, InvalidTransferKey> {
        TransferKey::new(text)
    }
}

impl fmt::Display for TransferKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An account and its totals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerAccount {
    /// `wallet:<agent>`, `stake:<agent>:<kind>`, `unbonding:<agent>:<kind>`, `treasury`,
    /// `issuance`.
    pub id: String,
    /// Posted credits − posted debits.
    pub balance: Balance,
    /// The balance less pending debits (escrows): what can be spent.
    pub available: Balance,
    pub debits_pending: Credits,
    pub debits_posted: Credits,
    pub credits_pending: Credits,
    pub credits_posted: Credits,
    pub no_overdraft: bool,
}

/// An agent's wallet and its stake and unbonding accounts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wallet {
    pub agent: String,
    pub wallet: LedgerAccount,
    pub stakes: Vec<LedgerAccount>,
}

/// How a transfer moves its amount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    Posted,
    /// Reserved, not moved (an escrow).
    Pending,
    PostPending,
    VoidPending,
    /// A kind this client does not know yet.
    #[serde(other)]
    Unknown,
}

/// Why a transfer happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// A purpose this client does not know yet.
    #[serde(other)]
    Unknown,
}

impl Purpose {
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
            Purpose::Unknown => "unknown",
        }
    }
}

/// A journal entry: an applied transfer, immutable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerTransfer {
    /// `<agent>:<key>` or `admin:<key>`, with a `#…` suffix for derived transfers (fees,
    /// escrow resolutions, maturities).
    pub id: String,
    /// Position in the journal.
    pub seq: u64,
    pub debit_account: String,
    pub credit_account: String,
    pub amount: Credits,
    pub kind: TransferKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_id: Option<String>,
    pub purpose: Purpose,
    pub linked: bool,
    pub created_at_ms: u64,
    /// Hex SHA-256 chain hash of the entry.
    pub hash: String,
}

/// Paging of a wallet's history (newest first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryPage {
    /// 1 to 1000; the server's default (100) when `None`.
    pub limit: Option<u32>,
    /// The `next_before` of the previous page.
    pub before: Option<u64>,
}

/// One page of a wallet's journal entries, newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferHistory {
    pub items: Vec<LedgerTransfer>,
    /// Pass as `before` for the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
}

/// A payment from the signer's wallet to another agent's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    pub key: TransferKey,
    pub to: molt_protocol::AgentId,
    pub amount: Credits,
    /// In a batch: succeed or fail together with the next payment.
    pub linked: bool,
}

/// One result of a batch: the entry, or the refusal's code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItem {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<LedgerTransfer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// The results of a batch, in the order of its payments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResults {
    pub results: Vec<BatchItem>,
}

/// What became of a transfer key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    Applied,
    /// Refused; the refusal is remembered, so a retry with this key gets it again.
    Rejected,
    #[serde(other)]
    Unknown,
}

/// What the ledger knows about one of the signer's transfer keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferLookup {
    pub id: String,
    pub status: TransferStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<LedgerTransfer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// What an undisputed escrow does when it expires.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExpiry {
    /// Everything returns to the payer.
    #[default]
    Refund,
    /// Everything goes to the payee.
    Release,
    #[serde(other)]
    Unknown,
}

impl OnExpiry {
    pub fn as_str(self) -> &'static str {
        match self {
            OnExpiry::Refund => "refund",
            OnExpiry::Release => "release",
            OnExpiry::Unknown => "unknown",
        }
    }
}

/// Where an escrow stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscrowState {
    Locked,
    /// Frozen until an admin's ruling.
    Disputed,
    Released,
    Refunded,
    #[serde(other)]
    Unknown,
}

impl EscrowState {
    pub fn as_str(self) -> &'static str {
        match self {
            EscrowState::Locked => "locked",
            EscrowState::Disputed => "disputed",
            EscrowState::Released => "released",
            EscrowState::Refunded => "refunded",
            EscrowState::Unknown => "unknown",
        }
    }

    /// Released or refunded: nothing more can happen to it.
    pub fn is_resolved(self) -> bool {
        matches!(self, EscrowState::Released | EscrowState::Refunded)
    }
}

/// Credits locked from the signer's wallet for a payee.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEscrow {
    pub key: TransferKey,
    pub payee: molt_protocol::AgentId,
    pub amount: Credits,
    /// In the future, within a year.
    pub expires_at_ms: u64,
    pub on_expiry: OnExpiry,
}

/// An escrow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escrow {
    /// `<payer agent>:<key>`: what the escrow calls take.
    pub id: String,
    /// The payer's wallet account.
    pub payer: String,
    /// The payee's wallet account.
    pub payee: String,
    pub amount: Credits,
    pub state: EscrowState,
    pub on_expiry: OnExpiry,
    pub expires_at_ms: u64,
    /// What the payee got (after a release or a ruling).
    pub released: Credits,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// What a stake backs; each kind has its own unbonding period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StakeKind {
    /// Unbonds in 7 days.
    Trust,
    /// Unbonds in 14 days.
    Governance,
    /// Unbonds in 1 day.
    Job,
    #[serde(other)]
    Unknown,
}

impl StakeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StakeKind::Trust => "trust",
            StakeKind::Governance => "governance",
            StakeKind::Job => "job",
            StakeKind::Unknown => "unknown",
        }
    }
}

/// Where an unbonding stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnbondingState {
    /// Waiting out the period.
    Unbonding,
    /// Back in the wallet.
    Released,
    #[serde(other)]
    Unknown,
}

/// Stake on its way back to the wallet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unbonding {
    pub id: String,
    pub kind: StakeKind,
    pub amount: Credits,
    pub matures_at_ms: u64,
    pub state: UnbondingState,
}

/// The signer's stake and unbonding accounts, and its unbondings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stakes {
    pub stakes: Vec<LedgerAccount>,
    pub unbondings: Vec<Unbonding>,
}

/// Where minted credits go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MintTarget {
    #[default]
    Treasury,
    Wallet(molt_protocol::AgentId),
}

/// New credits, debited from the issuance account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mint {
    pub key: TransferKey,
    pub amount: Credits,
    pub to: MintTarget,
}

/// An agent's locked stake moved to the treasury.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slash {
    pub key: TransferKey,
    pub agent: molt_protocol::AgentId,
    pub kind: StakeKind,
    pub amount: Credits,
}

/// The transfer fee, paid by the recipient of payments and escrow releases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fee {
    /// Basis points: 0 to 10 000 (100 = 1 %).
    pub fee_bps: u32,
}

/// What a replay of the whole journal found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerAudit {
    /// No problem found.
    pub ok: bool,
    /// Journal entries checked.
    pub transfers: u64,
    /// Accounts checked.
    pub accounts: u64,
    /// Sum of posted debits over all accounts (equal to the credits when `ok`).
    pub debits_posted: CreditsTotal,
    pub credits_posted: CreditsTotal,
    /// Hex hash of the last entry.
    pub head_hash: String,
    pub problem_count: u64,
    /// The first problems, in words.
    pub problems: Vec<String>,
}

/// Writes `magnitude` micro-credits as credits with six decimals.
fn write_micros(f: &mut fmt::Formatter<'_>, negative: bool, magnitude: u128) -> fmt::Result {
    let per_credit = u128::from(MICROS_PER_CREDIT);
    let sign = if negative { "-" } else { "" };
    write!(f, "{sign}{}.{:06}", magnitude / per_credit, magnitude % per_credit)
}

/// `DIGITS`, as micro-credits; `None` on overflow.
fn parse_digits(digits: &str) -> Result<Option<u64>, ParseCreditsError> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(digits));
    }
    Ok(digits.bytes().try_fold(0u64, |value, digit| value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))))
}

/// `DIGITS[.DIGITS]` credits, as micro-credits; `None` on overflow.
fn parse_decimal_credits(text: &str) -> Result<Option<u64>, ParseCreditsError> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let fraction_ok = fraction.bytes().all(|b| b.is_ascii_digit()) && !(text.contains('.') && fraction.is_empty());
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction_ok {
        return Err(malformed(text));
    }
    if fraction.len() > CREDIT_DECIMALS {
        return Err(ParseCreditsError::TooManyDecimals);
    }
    // Right-pad the fraction to six digits: "5" is 500000 micro-credits.
    let mut fraction_micros = 0u64;
    for position in 0..CREDIT_DECIMALS {
        let digit = fraction.as_bytes().get(position).map_or(0, |b| u64::from(b - b'0'));
        fraction_micros = fraction_micros * 10 + digit;
    }
    let whole_micros = parse_digits(whole)?.and_then(|credits| credits.checked_mul(MICROS_PER_CREDIT));
    Ok(whole_micros.and_then(|micros| micros.checked_add(fraction_micros)))
}

fn malformed(text: &str) -> ParseCreditsError {
    // Bounded: a pasted megabyte should not come back in an error message.
    ParseCreditsError::Malformed(text.chars().take(40).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(text: &str) -> Result<u64, ParseCreditsError> {
        text.parse::<Credits>().map(Credits::micros)
    }

    #[test]
    fn fresh_keys_are_valid_distinct_and_sort_by_time() {
        let first = TransferKey::random();
        assert_eq!(TransferKey::new(first.as_str()).as_ref(), Ok(&first));
        assert_eq!(first.as_str().len(), 34);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let stamped = u64::from_str_radix(&first.as_str()[2..14], 16).unwrap();
        assert!(now.abs_diff(stamped) < 60_000, "{first} is stamped {stamped}, now is {now}");
        // Made in the same millisecond, keys still differ.
        let many: std::collections::HashSet<TransferKey> = (0..10_000).map(|_| TransferKey::random()).collect();
        assert_eq!(many.len(), 10_000);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = TransferKey::random();
        assert!(many.iter().all(|key| *key < later) && first < later);
    }

    #[test]
    fn credits_parse_exactly() {
        assert_eq!(micros("1.5"), Ok(1_500_000));
        assert_eq!(micros("1"), Ok(1_000_000));
        assert_eq!(micros("0.000001"), Ok(1));
        assert_eq!(micros("0.1"), Ok(100_000));
        assert_eq!(micros("007.250000"), Ok(7_250_000));
        assert_eq!(micros("1500000u"), Ok(1_500_000));
        assert_eq!(micros("1u"), Ok(1));
        assert_eq!(micros("0"), Ok(0));
        assert_eq!(micros("0u"), Ok(0));
        // 0.1 + 0.2 is exact here, unlike in binary floating point.
        assert_eq!(micros("0.3"), Ok(micros("0.1").unwrap() + micros("0.2").unwrap()));
    }

    #[test]
    fn credits_refuse_malformed_text() {
        for text in ["abc", "1.2.3", "1,5", " 1", "1 ", "+1", "1e6", ".5", "1.", "u", "1.5u", "0x10", "1_000", "١"] {
            assert!(matches!(micros(text), Err(ParseCreditsError::Malformed(_))), "{text:?}: {:?}", micros(text));
        }
        assert_eq!(micros(""), Err(ParseCreditsError::Empty));
        assert_eq!(micros("-1"), Err(ParseCreditsError::Negative));
        assert_eq!(micros("-0.5"), Err(ParseCreditsError::Negative));
        assert_eq!(micros("-5u"), Err(ParseCreditsError::Negative));
        assert_eq!(micros("1.0000001"), Err(ParseCreditsError::TooManyDecimals));
        assert_eq!(micros("0.0000000"), Err(ParseCreditsError::TooManyDecimals));
    }

    #[test]
    fn credits_refuse_overflow() {
        // The ledger's largest amount, and one micro-credit more, in both forms.
        assert_eq!(micros("9223372036854.775807"), Ok(i64::MAX as u64));
        assert_eq!(micros("9223372036854775807u"), Ok(i64::MAX as u64));
        assert_eq!(micros("9223372036854.775808"), Err(ParseCreditsError::TooLarge));
        assert_eq!(micros("9223372036854775808u"), Err(ParseCreditsError::TooLarge));
        // Beyond u64 while multiplying into micro-credits, and while reading digits.
        assert_eq!(micros("18446744073710"), Err(ParseCreditsError::TooLarge));
        assert_eq!(micros("99999999999999999999999999"), Err(ParseCreditsError::TooLarge));
        assert_eq!(micros("99999999999999999999999999u"), Err(ParseCreditsError::TooLarge));
    }

    #[test]
    fn positive_amounts_refuse_zero() {
        for text in ["0", "0.0", "0.000000", "0u", "000u"] {
            assert_eq!(Credits::parse_positive(text), Err(ParseCreditsError::Zero), "{text:?}");
        }
        assert_eq!(Credits::parse_positive("0.000001").map(Credits::micros), Ok(1));
        assert_eq!(Credits::parse_positive("-1"), Err(ParseCreditsError::Negative));
    }

    #[test]
    fn amounts_print_as_credits_with_six_decimals() {
        assert_eq!(Credits(1_500_000).to_string(), "1.500000");
        assert_eq!(Credits(1).to_string(), "0.000001");
        assert_eq!(Credits::ZERO.to_string(), "0.000000");
        assert_eq!(Credits::MAX.to_string(), "9223372036854.775807");
        assert_eq!(Balance(-2_000_001).to_string(), "-2.000001");
        assert_eq!(Balance(i64::MIN).to_string(), "-9223372036854.775808");
        assert_eq!(Balance(0).to_string(), "0.000000");
        assert_eq!(CreditsTotal(u128::MAX).to_string(), "340282366920938463463374607431768.211455");
        for micros in [0, 1, 999_999, 1_000_000, 123_456_789, i64::MAX as u64] {
            let credits = Credits(micros);
            assert_eq!(credits.to_string().parse::<Credits>(), Ok(credits), "round trip of {micros}");
        }
    }

    #[test]
    fn errors_say_what_is_accepted() {
        let error = micros("1.2.3").unwrap_err().to_string();
        assert!(error.contains("1.5") && error.contains("1500000u"), "{error}");
        assert!(ParseCreditsError::TooLarge.to_string().contains("9223372036854.775807"));
    }

    #[test]
    fn transfer_keys_are_checked_and_random_ones_are_valid() {
        assert!(TransferKey::new("pay-1_a.B").is_ok());
        assert!(TransferKey::new(&"a".repeat(64)).is_ok());
        for text in ["", "a:b", "a#b", "a b", "é", &"a".repeat(65)] {
            assert!(TransferKey::new(text).is_err(), "{text:?}");
        }
        let (first, second) = (TransferKey::random(), TransferKey::random());
        assert_ne!(first, second);
        assert_eq!(TransferKey::new(first.as_str()), Ok(first));
    }

    #[test]
    fn server_bodies_decode() {
        let transfer: LedgerTransfer = serde_json::from_str(
            r#"{"id":"agent-x:p1","seq":3,"debit_account":"wallet:a","credit_account":"wallet:b","amount":1500000,
                "kind":"posted","purpose":"payment","linked":false,"created_at_ms":1,"hash":"00","extra":1}"#,
        )
        .unwrap();
        assert_eq!((transfer.amount, transfer.purpose), (Credits(1_500_000), Purpose::Payment));
        let audit: LedgerAudit = serde_json::from_str(
            r#"{"ok":true,"transfers":1,"accounts":2,"debits_posted":340282366920938463463374607431768211455,
                "credits_posted":5,"head_hash":"ab","problem_count":0,"problems":[]}"#,
        )
        .unwrap();
        assert_eq!(audit.debits_posted, CreditsTotal(u128::MAX));
        let state: EscrowState = serde_json::from_str(r#""expired_somehow""#).unwrap();
        assert_eq!(state, EscrowState::Unknown);
        for purpose in [Purpose::Payment, Purpose::EscrowRelease, Purpose::StakeSlash] {
            assert_eq!(serde_json::to_value(purpose).unwrap(), purpose.as_str());
        }
    }
}
