//! The double-entry core: applies transfer specs to an in-memory view of the accounts and
//! transfers they touch. Pure: the caller loads the view, passes `now`, and persists what
//! [`Books::into_effects`] returns.
//!
//! Rules (TigerBeetle's semantics, with remembered failures):
//! - a posted transfer moves `amount` from the debit to the credit account; a pending one
//!   reserves it (pending totals) until a `PostPending` (moves up to the pending amount and
//!   releases the rest) or a `VoidPending` (releases all) resolves it, at most once;
//! - an account flagged `NO_OVERDRAFT` never has posted + pending debits above its posted
//!   credits;
//! - an id seen before returns its original result — the transfer or the failure — if the
//!   spec is equal, and `IdReused` otherwise;
//! - a chain of `LINKED` specs (each linked to the next; the last not linked) is applied
//!   all or none;
//! - a payment or escrow release costs its recipient `fee_bps` of the amount, moved to the
//!   treasury by a derived transfer (`<id>#fee`) in the same chain.

use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use molt_protocol::UnixMillis;

use super::journal;
use super::types::{
    Account, AccountFlags, AccountId, Credits, Purpose, Rejection, Totals, Transfer, TransferFlags, TransferId,
    TransferKind, TransferSpec,
};

/// Why the ledger refused a transfer. Every variant but [`TransferError::IdReused`] is
/// remembered under the transfer's id, so a retry gets the same answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    #[error("transfer refused: the amount is zero")]
    ZeroAmount,
    #[error("transfer refused: debit and credit are the same account")]
    SameAccount,
    #[error("transfer refused: an account does not exist")]
    UnknownAccount,
    #[error("transfer refused: insufficient funds")]
    InsufficientFunds,
    #[error("transfer refused: an account total would overflow")]
    Overflow,
    #[error("transfer refused: the id was used before with different fields")]
    IdReused,
    #[error("transfer refused: a transfer linked with it failed")]
    LinkedTransferFailed,
    #[error("transfer refused: the pending transfer does not exist")]
    PendingNotFound,
    #[error("transfer refused: the pending transfer is already resolved")]
    PendingResolved,
    #[error("transfer refused: the amount exceeds the pending amount")]
    ExceedsPending,
    #[error("transfer refused: the batch ends inside a linked chain")]
    LinkedChainOpen,
}

impl TransferError {
    const ALL: [TransferError; 11] = [
        TransferError::ZeroAmount,
        TransferError::SameAccount,
        TransferError::UnknownAccount,
        TransferError::InsufficientFunds,
        TransferError::Overflow,
        TransferError::IdReused,
        TransferError::LinkedTransferFailed,
        TransferError::PendingNotFound,
        TransferError::PendingResolved,
        TransferError::ExceedsPending,
        TransferError::LinkedChainOpen,
    ];

    /// The stable code (stored, and sent in problem documents).
    pub fn code(self) -> &'static str {
        match self {
            TransferError::ZeroAmount => "zero_amount",
            TransferError::SameAccount => "same_account",
            TransferError::UnknownAccount => "unknown_account",
            TransferError::InsufficientFunds => "insufficient_funds",
            TransferError::Overflow => "balance_overflow",
            TransferError::IdReused => "id_reused",
            TransferError::LinkedTransferFailed => "linked_transfer_failed",
            TransferError::PendingNotFound => "pending_not_found",
            TransferError::PendingResolved => "pending_resolved",
            TransferError::ExceedsPending => "exceeds_pending",
            TransferError::LinkedChainOpen => "linked_chain_open",
        }
    }

    pub fn from_code(code: &str) -> Option<TransferError> {
        TransferError::ALL.into_iter().find(|error| error.code() == code)
    }
}

/// A transfer's result: applied now, or applied by an earlier request with this id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Created(Transfer),
    Existed(Transfer),
}

impl Applied {
    pub fn transfer(&self) -> &Transfer {
        match self {
            Applied::Created(transfer) | Applied::Existed(transfer) => transfer,
        }
    }
}

/// A pending transfer known to the view and whether it has been resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingEntry {
    pub spec: TransferSpec,
    pub resolved: bool,
}

/// What the view knows about an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Known {
    Applied(Transfer),
    Rejected(TransferSpec, TransferError),
}

/// What a batch wrote, for the storage layer to persist.
#[derive(Debug, Default)]
pub struct Effects {
    /// New journal entries, in `seq` order.
    pub transfers: Vec<Transfer>,
    pub rejections: Vec<Rejection>,
    /// Accounts whose totals changed, with their final totals.
    pub accounts: Vec<Account>,
    /// The journal head after the batch.
    pub head: (u64, [u8; 32]),
}

/// The in-memory view of the books a batch needs.
///
/// Its maps hash with foldhash, seeded at random per process like the standard library's
/// (ids are client-chosen, so a fixed seed would let a client collide them), and several
/// times faster on the short keys of a batch of thousands.
#[derive(Debug)]
pub struct Books {
    accounts: HashMap<AccountId, Account>,
    known: HashMap<TransferId, Slot>,
    pending: HashMap<TransferId, PendingEntry>,
    fee_bps: u32,
    seq: u64,
    hash: [u8; 32],
    now: UnixMillis,
    transfers: Vec<Transfer>,
    rejections: Vec<Rejection>,
    /// Accounts changed by the batch (sorted when taken).
    dirty: HashSet<AccountId>,
    undo: Option<Undo>,
}

/// Where the view finds what it knows about an id: loaded from storage, or a journal
/// entry of this batch (an index into `transfers`, so an entry is not kept twice).
#[derive(Debug)]
enum Slot {
    Loaded(Known),
    Journaled(usize),
}

/// What to restore when a linked chain fails.
#[derive(Debug)]
struct Undo {
    accounts: Vec<(AccountId, Totals)>,
    resolved: Vec<TransferId>,
    pending: Vec<TransferId>,
    transfers_len: usize,
    seq: u64,
    hash: [u8; 32],
}

impl Books {
    /// A view with the journal head (`seq`, `hash`), the fee, and the time of the batch.
    pub fn new(seq: u64, hash: [u8; 32], fee_bps: u32, now: UnixMillis) -> Books {
        Books {
            accounts: HashMap::new(),
            known: HashMap::new(),
            pending: HashMap::new(),
            fee_bps,
            seq,
            hash,
            now,
            transfers: Vec::new(),
            rejections: Vec::new(),
            dirty: HashSet::new(),
            undo: None,
        }
    }

    pub fn insert_account(&mut self, account: Account) {
        self.accounts.insert(account.id.clone(), account);
    }

    pub fn insert_known(&mut self, id: TransferId, known: Known) {
        self.known.insert(id, Slot::Loaded(known));
    }

    pub fn insert_pending(&mut self, entry: PendingEntry) {
        self.pending.insert(entry.spec.id.clone(), entry);
    }

    pub fn account(&self, id: &AccountId) -> Option<&Account> {
        self.accounts.get(id)
    }

    /// What the view knows about `id`: its journal entry, or the refused spec and why.
    fn known(&self, id: &TransferId) -> Option<Result<&Transfer, (&TransferSpec, TransferError)>> {
        match self.known.get(id)? {
            Slot::Loaded(Known::Applied(transfer)) => Some(Ok(transfer)),
            Slot::Loaded(Known::Rejected(spec, error)) => Some(Err((spec, *error))),
            Slot::Journaled(index) => self.transfers.get(*index).map(Ok),
        }
    }

    pub fn fee_bps(&self) -> u32 {
        self.fee_bps
    }

    pub fn now(&self) -> UnixMillis {
        self.now
    }

    /// Applies a batch: each spec alone, or each chain of linked specs all or none.
    /// Returns one result per spec, in order.
    pub fn apply_batch(&mut self, specs: &[TransferSpec]) -> Vec<Result<Applied, TransferError>> {
        let mut results = Vec::with_capacity(specs.len());
        let mut start = 0;
        while start < specs.len() {
            let end = specs[start..]
                .iter()
                .position(|spec| !spec.flags.contains(TransferFlags::LINKED))
                .map(|offset| start + offset + 1);
            match end {
                Some(end) => results.extend(self.apply_chain(&specs[start..end])),
                None => {
                    // The batch ends inside a chain: refuse the open chain.
                    for spec in &specs[start..] {
                        results.push(Err(self.remember(spec, TransferError::LinkedChainOpen)));
                    }
                    break;
                }
            }
            start = end.unwrap_or(specs.len());
        }
        results
    }

    /// Applies specs all or none (a single spec is a chain of one).
    pub fn apply_chain(&mut self, chain: &[TransferSpec]) -> Vec<Result<Applied, TransferError>> {
        // A lone transfer without a fee fails, if it does, before it changes anything
        // (`apply_one` checks everything before it commits): nothing to undo, nothing to
        // record.
        let may_fail_after_a_change = chain.len() > 1 || self.fee_bps > 0;
        self.undo = may_fail_after_a_change.then(|| Undo {
            accounts: Vec::new(),
            resolved: Vec::new(),
            pending: Vec::new(),
            transfers_len: self.transfers.len(),
            seq: self.seq,
            hash: self.hash,
        });
        let mut results = Vec::with_capacity(chain.len());
        let mut failed = None;
        for (index, spec) in chain.iter().enumerate() {
            match self.apply_with_fee(spec) {
                Ok(applied) => results.push(applied),
                Err(error) => {
                    failed = Some((index, error));
                    break;
                }
            }
        }
        let undo = self.undo.take();
        let Some((failed_index, error)) = failed else {
            return results.into_iter().map(Ok).collect();
        };
        if let Some(undo) = undo {
            self.roll_back(undo);
        }
        chain
            .iter()
            .enumerate()
            .map(|(index, spec)| {
                let error = if index == failed_index { error } else { TransferError::LinkedTransferFailed };
                if error == TransferError::IdReused {
                    return Err(error);
                }
                // An id already known keeps its original answer.
                match self.known(&spec.id) {
                    Some(Err((_, original))) => Err(original),
                    _ => Err(self.remember(spec, error)),
                }
            })
            .collect()
    }

    /// Everything the batch changed (changed accounts in id order); ends the view.
    pub fn into_effects(mut self) -> Effects {
        let mut dirty: Vec<AccountId> = self.dirty.into_iter().collect();
        dirty.sort_unstable();
        let accounts = dirty.into_iter().filter_map(|id| self.accounts.remove(&id)).collect();
        Effects { transfers: self.transfers, rejections: self.rejections, accounts, head: (self.seq, self.hash) }
    }

    fn apply_with_fee(&mut self, spec: &TransferSpec) -> Result<Applied, TransferError> {
        let applied = self.apply_one(spec)?;
        if let Applied::Created(transfer) = &applied {
            let fee = transfer.spec.amount.basis_points(self.fee_bps);
            let treasury = AccountId::treasury();
            if spec.purpose.charges_fee() && !fee.is_zero() && spec.credit != treasury {
                let fee_spec = TransferSpec {
                    id: spec.id.derived("fee"),
                    debit: spec.credit.clone(),
                    credit: treasury,
                    amount: fee,
                    kind: TransferKind::Posted,
                    pending_id: None,
                    purpose: Purpose::Fee,
                    flags: TransferFlags::default(),
                };
                self.apply_one(&fee_spec)?;
            }
        }
        Ok(applied)
    }

    fn apply_one(&mut self, spec: &TransferSpec) -> Result<Applied, TransferError> {
        if let Some(known) = self.known(&spec.id) {
            return match known {
                Ok(transfer) if transfer.spec == *spec => Ok(Applied::Existed(transfer.clone())),
                Err((original, error)) if original == spec => Err(error),
                _ => Err(TransferError::IdReused),
            };
        }
        if spec.debit == spec.credit {
            return Err(TransferError::SameAccount);
        }
        let (Some(debit), Some(credit)) = (self.accounts.get(&spec.debit), self.accounts.get(&spec.credit)) else {
            return Err(TransferError::UnknownAccount);
        };
        let (mut debit, mut credit) = (debit.totals(), credit.totals());
        match spec.kind {
            TransferKind::Posted | TransferKind::Pending => {
                if spec.amount.is_zero() {
                    return Err(TransferError::ZeroAmount);
                }
                move_new(&mut debit, &mut credit, spec.amount, spec.kind == TransferKind::Pending)?;
            }
            TransferKind::PostPending | TransferKind::VoidPending => {
                let pending = self.resolvable(spec)?;
                release_pending(&mut debit, &mut credit, pending.amount)?;
                if spec.kind == TransferKind::PostPending {
                    move_new(&mut debit, &mut credit, spec.amount, false)?;
                }
            }
        }
        Ok(Applied::Created(self.commit(spec, debit, credit)))
    }

    /// The pending transfer `spec` resolves, if it may.
    fn resolvable(&self, spec: &TransferSpec) -> Result<TransferSpec, TransferError> {
        let entry =
            spec.pending_id.as_ref().and_then(|id| self.pending.get(id)).ok_or(TransferError::PendingNotFound)?;
        if entry.spec.debit != spec.debit || entry.spec.credit != spec.credit {
            return Err(TransferError::PendingNotFound);
        }
        if entry.resolved {
            return Err(TransferError::PendingResolved);
        }
        match spec.kind {
            TransferKind::PostPending if spec.amount > entry.spec.amount => Err(TransferError::ExceedsPending),
            TransferKind::PostPending if spec.amount.is_zero() => Err(TransferError::ZeroAmount),
            TransferKind::VoidPending if spec.amount != entry.spec.amount => Err(TransferError::ExceedsPending),
            _ => Ok(entry.spec.clone()),
        }
    }

    /// Journals `spec` with the accounts' new totals (both accounts are in the view).
    fn commit(&mut self, spec: &TransferSpec, mut debit: Totals, mut credit: Totals) -> Transfer {
        let seq = self.seq + 1;
        let (debit_prev, credit_prev) = (debit.last_seq, credit.last_seq);
        debit.last_seq = seq;
        credit.last_seq = seq;
        for (id, totals) in [(&spec.debit, debit), (&spec.credit, credit)] {
            if !self.dirty.contains(id) {
                self.dirty.insert(id.clone());
            }
            if let Some(account) = self.accounts.get_mut(id) {
                let old = account.totals();
                account.set_totals(totals);
                if let Some(undo) = self.undo.as_mut() {
                    undo.accounts.push((id.clone(), old));
                }
            }
        }
        if let Some(pending_id) = &spec.pending_id
            && let Some(entry) = self.pending.get_mut(pending_id)
        {
            entry.resolved = true;
            if let Some(undo) = self.undo.as_mut() {
                undo.resolved.push(pending_id.clone());
            }
        }
        if spec.kind == TransferKind::Pending {
            self.pending.insert(spec.id.clone(), PendingEntry { spec: spec.clone(), resolved: false });
            if let Some(undo) = self.undo.as_mut() {
                undo.pending.push(spec.id.clone());
            }
        }
        self.seq = seq;
        let hash = journal::entry_hash(&self.hash, seq, spec, self.now);
        self.hash = hash;
        let transfer = Transfer { seq, spec: spec.clone(), created_at: self.now, hash, debit_prev, credit_prev };
        self.known.insert(spec.id.clone(), Slot::Journaled(self.transfers.len()));
        self.transfers.push(transfer.clone());
        transfer
    }

    fn roll_back(&mut self, undo: Undo) {
        // Restore in reverse, so an account changed twice ends with its first old value.
        for (id, totals) in undo.accounts.into_iter().rev() {
            if let Some(account) = self.accounts.get_mut(&id) {
                account.set_totals(totals);
            }
        }
        // The chain's entries are the journal's last; their ids were unknown before.
        for transfer in &self.transfers[undo.transfers_len..] {
            self.known.remove(&transfer.spec.id);
        }
        for id in undo.pending {
            self.pending.remove(&id);
        }
        for id in undo.resolved {
            if let Some(entry) = self.pending.get_mut(&id) {
                entry.resolved = false;
            }
        }
        self.transfers.truncate(undo.transfers_len);
        self.seq = undo.seq;
        self.hash = undo.hash;
    }

    /// Records a failure under the spec's id (client ids only: derived ids are retried by
    /// the ledger itself) and returns it.
    fn remember(&mut self, spec: &TransferSpec, error: TransferError) -> TransferError {
        if error != TransferError::IdReused && !spec.id.as_str().contains('#') && !self.known.contains_key(&spec.id) {
            self.known.insert(spec.id.clone(), Slot::Loaded(Known::Rejected(spec.clone(), error)));
            self.rejections.push(Rejection { spec: spec.clone(), error, created_at: self.now });
        }
        error
    }
}

/// Adds `amount` to the debit's and the credit's posted (or pending) totals.
fn move_new(debit: &mut Totals, credit: &mut Totals, amount: Credits, pending: bool) -> Result<(), TransferError> {
    let add = |total: Credits| total.checked_add(amount).ok_or(TransferError::Overflow);
    if pending {
        debit.debits_pending = add(debit.debits_pending)?;
        credit.credits_pending = add(credit.credits_pending)?;
    } else {
        debit.debits_posted = add(debit.debits_posted)?;
        credit.credits_posted = add(credit.credits_posted)?;
    }
    if debit.flags.contains(AccountFlags::NO_OVERDRAFT) && debit.available() < 0 {
        return Err(TransferError::InsufficientFunds);
    }
    Ok(())
}

/// Takes a pending amount off both accounts' pending totals.
fn release_pending(debit: &mut Totals, credit: &mut Totals, amount: Credits) -> Result<(), TransferError> {
    // Invariant: the pending totals include every unresolved pending amount, so these
    // cannot fail unless the stored books are corrupt; refuse rather than panic.
    debit.debits_pending = debit.debits_pending.checked_sub(amount).ok_or(TransferError::PendingNotFound)?;
    credit.credits_pending = credit.credits_pending.checked_sub(amount).ok_or(TransferError::PendingNotFound)?;
    Ok(())
}
