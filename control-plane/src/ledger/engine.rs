//! Commands over the books: escrows and stakes turned into transfers. Pure, like
//! [`Books`]: the storage layer loads a [`View`], runs [`View::run`] with the time of the
//! batch, and persists [`View::into_effects`].

use std::collections::{BTreeMap, BTreeSet};

use molt_protocol::{AgentId, UnixMillis};

use super::books::{Applied, Books, Effects, PendingEntry, TransferError};
use super::escrow::{self, Actor, Escrow, EscrowEffect, EscrowError, EscrowEvent, EscrowState, OnExpiry};
use super::stake::{self, MatureError, Unbonding, UnbondingState};
use super::types::{AccountId, Purpose, StakeKind, TransferFlags, TransferId, TransferKind, TransferSpec};

/// Who asks for an escrow action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requester {
    Agent(AgentId),
    Admin,
    System,
}

/// One thing to do in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Transfers (payments, mints, stake locks, slashes), linked as their flags say.
    Transfers(Vec<TransferSpec>),
    /// Locks `spec.amount` (a pending transfer payer → payee) in a new escrow.
    CreateEscrow { spec: TransferSpec, on_expiry: OnExpiry, expires_at: UnixMillis },
    /// An event on an existing escrow.
    Escrow { id: TransferId, requester: Requester, event: EscrowEvent },
    /// Moves stake to unbonding (`spec`: stake → unbonding account) and opens an unbonding.
    Unlock { spec: TransferSpec, owner: AgentId, kind: StakeKind, matures_at: UnixMillis },
    /// Releases a matured unbonding to the owner's wallet.
    Mature { id: TransferId },
}

impl Command {
    /// The transfers the command may write (at least 1): what sizes a batch.
    pub fn weight(&self) -> usize {
        match self {
            Command::Transfers(specs) => specs.len().max(1),
            _ => 1,
        }
    }
}

/// Why a command other than plain transfers failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error(transparent)]
    Escrow(#[from] EscrowError),
    #[error(transparent)]
    Mature(#[from] MatureError),
    #[error("unbonding not found")]
    UnbondingNotFound,
}

/// A command's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Transfers(Vec<Result<Applied, TransferError>>),
    Escrow(Result<Escrow, CommandError>),
    Unbonding(Result<Unbonding, CommandError>),
    /// The signed request that carried the command had been made before: its nonce was
    /// already recorded, so the command did not run ([`super::store::BatchStore::execute_signed_then`]).
    Replayed,
}

/// The books plus the escrows and unbondings a batch touches.
#[derive(Debug)]
pub struct View {
    pub books: Books,
    escrows: BTreeMap<TransferId, Escrow>,
    unbondings: BTreeMap<TransferId, Unbonding>,
    dirty_escrows: BTreeSet<TransferId>,
    dirty_unbondings: BTreeSet<TransferId>,
}

/// What a batch wrote.
#[derive(Debug, Default)]
pub struct ViewEffects {
    pub books: Effects,
    pub escrows: Vec<Escrow>,
    pub unbondings: Vec<Unbonding>,
}

impl View {
    pub fn new(books: Books) -> View {
        View {
            books,
            escrows: BTreeMap::new(),
            unbondings: BTreeMap::new(),
            dirty_escrows: BTreeSet::new(),
            dirty_unbondings: BTreeSet::new(),
        }
    }

    /// Adds a stored escrow, and its pending transfer to the books.
    pub fn insert_escrow(&mut self, escrow: Escrow) {
        self.books.insert_pending(PendingEntry { spec: pending_spec(&escrow), resolved: escrow.state.is_resolved() });
        self.escrows.insert(escrow.id.clone(), escrow);
    }

    pub fn insert_unbonding(&mut self, unbonding: Unbonding) {
        self.unbondings.insert(unbonding.id.clone(), unbonding);
    }

    /// Runs the commands in order.
    pub fn run(&mut self, commands: &[Command]) -> Vec<Outcome> {
        commands.iter().map(|command| self.run_one(command)).collect()
    }

    /// Everything the batch changed; ends the view.
    pub fn into_effects(mut self) -> ViewEffects {
        let escrows = self.dirty_escrows.iter().filter_map(|id| self.escrows.remove(id)).collect();
        let unbondings = self.dirty_unbondings.iter().filter_map(|id| self.unbondings.remove(id)).collect();
        ViewEffects { books: self.books.into_effects(), escrows, unbondings }
    }

    fn run_one(&mut self, command: &Command) -> Outcome {
        match command {
            Command::Transfers(specs) => Outcome::Transfers(self.books.apply_batch(specs)),
            Command::CreateEscrow { spec, on_expiry, expires_at } => {
                Outcome::Escrow(self.create_escrow(spec, *on_expiry, *expires_at))
            }
            Command::Escrow { id, requester, event } => Outcome::Escrow(self.escrow_event(id, *requester, *event)),
            Command::Unlock { spec, owner, kind, matures_at } => {
                Outcome::Unbonding(self.unlock(spec, *owner, *kind, *matures_at))
            }
            Command::Mature { id } => Outcome::Unbonding(self.mature(id)),
        }
    }

    fn create_escrow(
        &mut self,
        spec: &TransferSpec,
        on_expiry: OnExpiry,
        expires_at: UnixMillis,
    ) -> Result<Escrow, CommandError> {
        let applied = single(self.books.apply_chain(std::slice::from_ref(spec)))?;
        if let Applied::Existed(_) = applied {
            // A retry: the escrow as it is now.
            return self.escrows.get(&spec.id).cloned().ok_or(CommandError::Escrow(EscrowError::NotFound));
        }
        let now = self.books.now();
        let escrow = Escrow {
            id: spec.id.clone(),
            payer: spec.debit.clone(),
            payee: spec.credit.clone(),
            amount: spec.amount,
            state: EscrowState::Locked,
            on_expiry,
            expires_at,
            released: super::types::Credits::ZERO,
            created_at: now,
            updated_at: now,
        };
        self.escrows.insert(escrow.id.clone(), escrow.clone());
        self.dirty_escrows.insert(escrow.id.clone());
        Ok(escrow)
    }

    fn escrow_event(
        &mut self,
        id: &TransferId,
        requester: Requester,
        event: EscrowEvent,
    ) -> Result<Escrow, CommandError> {
        let escrow = self.escrows.get(id).ok_or(EscrowError::NotFound)?;
        let actor = match requester {
            Requester::Admin => Actor::Admin,
            Requester::System => Actor::System,
            Requester::Agent(agent) if AccountId::wallet(agent) == escrow.payer => Actor::Payer,
            Requester::Agent(agent) if AccountId::wallet(agent) == escrow.payee => Actor::Payee,
            // Not a party: the escrow is not theirs to see.
            Requester::Agent(_) => return Err(EscrowError::NotFound.into()),
        };
        let (next, effect) = escrow::step(escrow, actor, event, self.books.now())?;
        if let Some(effect) = effect {
            let mut spec = pending_spec(escrow);
            spec.id = escrow.id.derived("resolve");
            spec.pending_id = Some(escrow.id.clone());
            match effect {
                EscrowEffect::Post { amount } => {
                    spec.kind = TransferKind::PostPending;
                    spec.amount = amount;
                    spec.purpose = Purpose::EscrowRelease;
                }
                EscrowEffect::Void => {
                    spec.kind = TransferKind::VoidPending;
                    spec.purpose = Purpose::EscrowRefund;
                }
            }
            single(self.books.apply_chain(&[spec]))?;
        }
        self.escrows.insert(id.clone(), next.clone());
        self.dirty_escrows.insert(id.clone());
        Ok(next)
    }

    fn unlock(
        &mut self,
        spec: &TransferSpec,
        owner: AgentId,
        kind: StakeKind,
        matures_at: UnixMillis,
    ) -> Result<Unbonding, CommandError> {
        let applied = single(self.books.apply_chain(std::slice::from_ref(spec)))?;
        if let Applied::Existed(_) = applied {
            return self.unbondings.get(&spec.id).cloned().ok_or(CommandError::UnbondingNotFound);
        }
        let unbonding = Unbonding {
            id: spec.id.clone(),
            owner,
            kind,
            amount: spec.amount,
            matures_at,
            state: UnbondingState::Unbonding,
            created_at: self.books.now(),
        };
        self.unbondings.insert(unbonding.id.clone(), unbonding.clone());
        self.dirty_unbondings.insert(unbonding.id.clone());
        Ok(unbonding)
    }

    fn mature(&mut self, id: &TransferId) -> Result<Unbonding, CommandError> {
        let unbonding = self.unbondings.get(id).ok_or(CommandError::UnbondingNotFound)?;
        let next = stake::mature(unbonding, self.books.now())?;
        let spec = TransferSpec {
            id: id.derived("mature"),
            debit: AccountId::unbonding(unbonding.owner, unbonding.kind),
            credit: AccountId::wallet(unbonding.owner),
            amount: unbonding.amount,
            kind: TransferKind::Posted,
            pending_id: None,
            purpose: Purpose::StakeUnbonded,
            flags: TransferFlags::default(),
        };
        single(self.books.apply_chain(&[spec]))?;
        self.unbondings.insert(id.clone(), next.clone());
        self.dirty_unbondings.insert(id.clone());
        Ok(next)
    }
}

/// The pending transfer behind an escrow.
pub fn pending_spec(escrow: &Escrow) -> TransferSpec {
    TransferSpec {
        id: escrow.id.clone(),
        debit: escrow.payer.clone(),
        credit: escrow.payee.clone(),
        amount: escrow.amount,
        kind: TransferKind::Pending,
        pending_id: None,
        purpose: Purpose::Escrow,
        flags: TransferFlags::default(),
    }
}

fn single(mut results: Vec<Result<Applied, TransferError>>) -> Result<Applied, TransferError> {
    // Invariant: a chain of one spec yields one result.
    results.pop().unwrap_or(Err(TransferError::LinkedChainOpen))
}

/// The accounts a command may touch, for locking; escrows and unbondings named by the
/// command must be passed in (`escrow`, `unbonding`).
pub fn accounts_of(
    command: &Command,
    escrow: impl Fn(&TransferId) -> Option<(AccountId, AccountId)>,
    unbonding: impl Fn(&TransferId) -> Option<(AgentId, StakeKind)>,
    into: &mut BTreeSet<AccountId>,
) {
    let mut spec_accounts = |spec: &TransferSpec| {
        for id in [&spec.debit, &spec.credit] {
            // Most accounts of a large batch recur: clone only the first time.
            if !into.contains(id) {
                into.insert(id.clone());
            }
        }
    };
    match command {
        Command::Transfers(specs) => specs.iter().for_each(&mut spec_accounts),
        Command::CreateEscrow { spec, .. } | Command::Unlock { spec, .. } => spec_accounts(spec),
        Command::Escrow { id, .. } => {
            if let Some((payer, payee)) = escrow(id) {
                into.insert(payer);
                into.insert(payee);
            }
        }
        Command::Mature { id } => {
            if let Some((owner, kind)) = unbonding(id) {
                into.insert(AccountId::unbonding(owner, kind));
                into.insert(AccountId::wallet(owner));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::types::Credits;

    fn payment(n: u32) -> TransferSpec {
        TransferSpec {
            id: TransferId::from_stored(format!("admin:w{n}")),
            debit: AccountId::treasury(),
            credit: AccountId::issuance(),
            amount: Credits::new(1).unwrap(),
            kind: TransferKind::Posted,
            pending_id: None,
            purpose: Purpose::Payment,
            flags: TransferFlags::default(),
        }
    }

    /// A batch is sized by the transfers it may write: a command of 8192 transfers is a
    /// large batch on its own, and every command counts at least once.
    #[test]
    fn a_command_weighs_its_transfers() {
        assert_eq!(Command::Transfers((0..8192).map(payment).collect()).weight(), 8192);
        assert_eq!(Command::Transfers(vec![payment(1)]).weight(), 1);
        assert_eq!(Command::Transfers(Vec::new()).weight(), 1);
        assert_eq!(Command::Mature { id: TransferId::from_stored("admin:u1".into()) }.weight(), 1);
        let escrow = Command::Escrow {
            id: TransferId::from_stored("admin:e1".into()),
            requester: Requester::System,
            event: EscrowEvent::Expire,
        };
        assert_eq!(escrow.weight(), 1);
    }
}
