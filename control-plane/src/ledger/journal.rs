//! The journal's hash chain and the audit.
//!
//! Entry `n` has `hash_n = SHA-256(hash_{n-1} ‖ canonical(entry_n))`, with `hash_0` all
//! zeros. The canonical bytes are a domain string, then `seq` and `created_at_ms` as
//! big-endian u64, the amount as big-endian u64, then the id, debit, credit, kind,
//! pending id (empty if none) and purpose, each as a big-endian u16 length and its bytes,
//! and the flags as big-endian u64. Changing any stored field of any entry breaks every
//! later hash.
//!
//! The [`Auditor`] replays the journal in order: it checks the chain and the sequence,
//! recomputes every account's four totals from the entries, checks that each pending
//! transfer resolves at most once and that debits equal credits, then compares its totals
//! with the stored accounts and checks the no-overdraft flags.

use std::collections::{BTreeMap, HashMap, HashSet};

use molt_protocol::UnixMillis;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use utoipa::ToSchema;

use super::types::{Account, AccountFlags, AccountId, Credits, Transfer, TransferId, TransferKind, TransferSpec};

/// First bytes of every hashed entry.
pub const ENTRY_DOMAIN: &[u8] = b"molt/ledger-entry/v1\0";
/// The hash before the first entry.
pub const GENESIS_HASH: [u8; 32] = [0; 32];
/// Most problems an audit report lists (it counts all of them).
pub const AUDIT_PROBLEMS_MAX: usize = 100;

/// The hash of the entry `seq` with fields `spec`, chained to `previous`.
pub fn entry_hash(previous: &[u8; 32], seq: u64, spec: &TransferSpec, created_at: UnixMillis) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(ENTRY_DOMAIN);
    hasher.update(seq.to_be_bytes());
    hasher.update(created_at.0.to_be_bytes());
    hasher.update(spec.amount.micros().to_be_bytes());
    let pending = spec.pending_id.as_ref().map_or("", TransferId::as_str);
    for field in [
        spec.id.as_str(),
        spec.debit.as_str(),
        spec.credit.as_str(),
        spec.kind.as_str(),
        pending,
        spec.purpose.as_str(),
    ] {
        // Invariant: every field is far shorter than 64 KiB (ids are bounded).
        hasher.update((field.len() as u16).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    hasher.update(spec.flags.0.to_be_bytes());
    hasher.finalize().into()
}

/// What an audit found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct AuditReport {
    /// No problem found.
    pub ok: bool,
    /// Journal entries checked.
    pub transfers: u64,
    /// Accounts checked.
    pub accounts: u64,
    /// Sum of posted debits over all accounts (equals the credits when `ok`).
    pub debits_posted: u128,
    pub credits_posted: u128,
    /// The hex hash of the last entry.
    pub head_hash: String,
    /// Number of problems found.
    pub problem_count: u64,
    /// The first problems, in words.
    pub problems: Vec<String>,
}

/// Replays the journal; feed entries in `seq` order, then [`Auditor::finish`].
#[derive(Debug)]
pub struct Auditor {
    hash: [u8; 32],
    seq: u64,
    totals: HashMap<AccountId, [u128; 4]>,
    /// Each account's newest entry so far, to check the links between its entries.
    last: HashMap<AccountId, u64>,
    pending: HashMap<TransferId, (AccountId, AccountId, Credits)>,
    resolved: HashSet<TransferId>,
    ids: HashSet<TransferId>,
    problems: Vec<String>,
    problem_count: u64,
}

impl Default for Auditor {
    fn default() -> Self {
        Auditor::new()
    }
}

const DEBITS_PENDING: usize = 0;
const DEBITS_POSTED: usize = 1;
const CREDITS_PENDING: usize = 2;
const CREDITS_POSTED: usize = 3;

impl Auditor {
    pub fn new() -> Auditor {
        Auditor {
            hash: GENESIS_HASH,
            seq: 0,
            totals: HashMap::new(),
            last: HashMap::new(),
            pending: HashMap::new(),
            resolved: HashSet::new(),
            ids: HashSet::new(),
            problems: Vec::new(),
            problem_count: 0,
        }
    }

    /// Checks and replays one entry.
    pub fn push(&mut self, transfer: &Transfer) {
        let spec = &transfer.spec;
        if transfer.seq != self.seq + 1 {
            self.problem(format!("entry {} follows entry {}: the sequence has a gap", transfer.seq, self.seq));
        }
        self.seq = transfer.seq;
        let expected = entry_hash(&self.hash, transfer.seq, spec, transfer.created_at);
        if expected != transfer.hash {
            self.problem(format!("entry {} ({}) does not match its hash: the chain is broken", transfer.seq, spec.id));
        }
        self.hash = transfer.hash;
        if !self.ids.insert(spec.id.clone()) {
            self.problem(format!("transfer id {} appears twice", spec.id));
        }
        for (account, link) in [(&spec.debit, transfer.debit_prev), (&spec.credit, transfer.credit_prev)] {
            let previous = self.last.insert(account.clone(), transfer.seq).unwrap_or(0);
            if link != previous {
                self.problem(format!(
                    "entry {} links to entry {link} as {account}'s previous one, the journal gives {previous}",
                    transfer.seq
                ));
            }
        }
        let amount = u128::from(spec.amount.micros());
        match spec.kind {
            TransferKind::Posted => self.add(spec, amount, DEBITS_POSTED, CREDITS_POSTED),
            TransferKind::Pending => {
                self.add(spec, amount, DEBITS_PENDING, CREDITS_PENDING);
                self.pending.insert(spec.id.clone(), (spec.debit.clone(), spec.credit.clone(), spec.amount));
            }
            TransferKind::PostPending | TransferKind::VoidPending => self.resolve(spec, amount),
        }
    }

    /// Compares the replayed totals with the stored accounts and closes the report.
    pub fn finish(mut self, accounts: &[Account]) -> AuditReport {
        let mut stored: BTreeMap<&AccountId, &Account> = BTreeMap::new();
        let (mut debits, mut credits) = (0u128, 0u128);
        for account in accounts {
            stored.insert(&account.id, account);
            debits += u128::from(account.debits_posted.micros());
            credits += u128::from(account.credits_posted.micros());
            let totals = self.totals.get(&account.id).copied().unwrap_or_default();
            let actual = [
                account.debits_pending.micros(),
                account.debits_posted.micros(),
                account.credits_pending.micros(),
                account.credits_posted.micros(),
            ]
            .map(u128::from);
            if totals != actual {
                self.problem(format!("account {} has totals {actual:?}, the journal gives {totals:?}", account.id));
            }
            let newest = self.last.get(&account.id).copied().unwrap_or(0);
            if account.last_seq != newest {
                self.problem(format!(
                    "account {} names entry {} as its newest, the journal gives {newest}",
                    account.id, account.last_seq
                ));
            }
            let owed = u128::from(account.debits_posted.micros()) + u128::from(account.debits_pending.micros());
            if account.flags.contains(AccountFlags::NO_OVERDRAFT) && owed > u128::from(account.credits_posted.micros())
            {
                self.problem(format!("account {} is overdrawn although it forbids overdraft", account.id));
            }
        }
        let missing: Vec<String> =
            self.totals.keys().filter(|id| !stored.contains_key(id)).map(|id| id.to_string()).collect();
        for id in missing {
            self.problem(format!("the journal names account {id}, which does not exist"));
        }
        if debits != credits {
            self.problem(format!("posted debits {debits} differ from posted credits {credits}"));
        }
        let pending_debits: u128 = accounts.iter().map(|a| u128::from(a.debits_pending.micros())).sum();
        let pending_credits: u128 = accounts.iter().map(|a| u128::from(a.credits_pending.micros())).sum();
        if pending_debits != pending_credits {
            self.problem(format!("pending debits {pending_debits} differ from pending credits {pending_credits}"));
        }
        AuditReport {
            ok: self.problem_count == 0,
            transfers: self.seq,
            accounts: accounts.len() as u64,
            debits_posted: debits,
            credits_posted: credits,
            head_hash: hex::encode(self.hash),
            problem_count: self.problem_count,
            problems: self.problems,
        }
    }

    /// The hash and sequence replayed so far, to compare with the stored head.
    pub fn head(&self) -> (u64, [u8; 32]) {
        (self.seq, self.hash)
    }

    /// Records a problem found outside the journal (the stored head).
    pub fn problem(&mut self, text: String) {
        self.problem_count += 1;
        if self.problems.len() < AUDIT_PROBLEMS_MAX {
            self.problems.push(text);
        }
    }

    fn add(&mut self, spec: &TransferSpec, amount: u128, debit_total: usize, credit_total: usize) {
        self.totals.entry(spec.debit.clone()).or_default()[debit_total] += amount;
        self.totals.entry(spec.credit.clone()).or_default()[credit_total] += amount;
    }

    fn resolve(&mut self, spec: &TransferSpec, amount: u128) {
        let Some(pending_id) = &spec.pending_id else {
            return self.problem(format!("resolution {} names no pending transfer", spec.id));
        };
        if !self.resolved.insert(pending_id.clone()) {
            self.problem(format!("pending transfer {pending_id} is resolved more than once"));
            return;
        }
        let Some((debit, credit, pending_amount)) = self.pending.get(pending_id).cloned() else {
            return self.problem(format!("resolution {} names unknown pending transfer {pending_id}", spec.id));
        };
        if debit != spec.debit || credit != spec.credit || spec.amount > pending_amount {
            return self.problem(format!("resolution {} does not match pending transfer {pending_id}", spec.id));
        }
        let pending_amount = u128::from(pending_amount.micros());
        for (account, total) in [(&debit, DEBITS_PENDING), (&credit, CREDITS_PENDING)] {
            let totals = self.totals.entry(account.clone()).or_default();
            totals[total] = totals[total].saturating_sub(pending_amount);
        }
        if spec.kind == TransferKind::PostPending {
            self.add(spec, amount, DEBITS_POSTED, CREDITS_POSTED);
        }
    }
}
