//! The escrow state machine: `step(escrow, actor, event, now) → (escrow, effect)`.
//!
//! An escrow is a pending transfer payer → payee. Its state:
//!
//! ```text
//!   Locked ──release (payer) / expiry with on_expiry=release──▶ Released
//!     │  ╲──refund (payee) / expiry with on_expiry=refund─────▶ Refunded
//!     └─dispute (payer or payee)─▶ Disputed ──ruling (admin)──▶ Released | Refunded
//! ```
//!
//! A release may be partial: the rest goes back to the payer, and the escrow is done (a
//! pending amount resolves at most once). A disputed escrow does not expire: the expiry
//! is frozen until an admin's ruling (or the payer's release, or the payee's refund).
//! The effect is what the ledger must do to the pending transfer: post `amount` or void.

use molt_protocol::UnixMillis;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::types::{AccountId, Credits, TransferId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EscrowState {
    Locked,
    Disputed,
    Released,
    Refunded,
}

impl EscrowState {
    pub fn as_str(self) -> &'static str {
        match self {
            EscrowState::Locked => "locked",
            EscrowState::Disputed => "disputed",
            EscrowState::Released => "released",
            EscrowState::Refunded => "refunded",
        }
    }

    pub fn parse(text: &str) -> Option<EscrowState> {
        [EscrowState::Locked, EscrowState::Disputed, EscrowState::Released, EscrowState::Refunded]
            .into_iter()
            .find(|state| state.as_str() == text)
    }

    pub fn is_resolved(self) -> bool {
        matches!(self, EscrowState::Released | EscrowState::Refunded)
    }
}

/// What happens when an undisputed escrow reaches its expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnExpiry {
    /// The payer gets everything back (the default).
    Refund,
    /// The payee gets everything.
    Release,
}

impl OnExpiry {
    pub fn as_str(self) -> &'static str {
        match self {
            OnExpiry::Refund => "refund",
            OnExpiry::Release => "release",
        }
    }

    pub fn parse(text: &str) -> Option<OnExpiry> {
        [OnExpiry::Refund, OnExpiry::Release].into_iter().find(|value| value.as_str() == text)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Escrow {
    /// The id of its pending transfer.
    pub id: TransferId,
    pub payer: AccountId,
    pub payee: AccountId,
    pub amount: Credits,
    pub state: EscrowState,
    pub on_expiry: OnExpiry,
    pub expires_at: UnixMillis,
    /// What the payee got (when released).
    pub released: Credits,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

/// Who acts on an escrow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor {
    Payer,
    Payee,
    /// An admin (arbiter) with ledger rights.
    Admin,
    /// The expiry worker.
    System,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EscrowEvent {
    /// The payer releases `amount` (all if `None`) to the payee; the rest is refunded.
    Release { amount: Option<Credits> },
    /// The payee gives everything back.
    Refund,
    /// Either party contests: expiry is frozen until a ruling.
    Dispute,
    /// An admin decides a dispute: `release` to the payee, the rest to the payer.
    Ruling { release: Credits },
    /// The clock passed the expiry.
    Expire,
}

/// What the ledger must do with the pending transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EscrowEffect {
    Post { amount: Credits },
    Void,
}

/// Why an escrow event was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EscrowError {
    #[error("escrow action refused: the escrow does not exist")]
    NotFound,
    #[error("escrow action refused: this party may not do that")]
    NotAllowed,
    #[error("escrow action refused: the escrow is already resolved")]
    AlreadyResolved,
    #[error("escrow action refused: the escrow is already disputed")]
    AlreadyDisputed,
    #[error("escrow action refused: the escrow is not disputed")]
    NotDisputed,
    #[error("escrow action refused: the amount is zero or exceeds the escrow")]
    InvalidAmount,
    #[error("escrow action refused: the escrow has not expired")]
    NotExpired,
}

impl EscrowError {
    pub fn code(self) -> &'static str {
        match self {
            EscrowError::NotFound => "escrow_not_found",
            EscrowError::NotAllowed => "not_escrow_party",
            EscrowError::AlreadyResolved => "escrow_resolved",
            EscrowError::AlreadyDisputed => "escrow_disputed",
            EscrowError::NotDisputed => "escrow_not_disputed",
            EscrowError::InvalidAmount => "invalid_release_amount",
            EscrowError::NotExpired => "escrow_not_expired",
        }
    }
}

/// One transition. Pure: the caller applies the effect and stores the new escrow in one
/// transaction.
pub fn step(
    escrow: &Escrow,
    actor: Actor,
    event: EscrowEvent,
    now: UnixMillis,
) -> Result<(Escrow, Option<EscrowEffect>), EscrowError> {
    if escrow.state.is_resolved() {
        return Err(EscrowError::AlreadyResolved);
    }
    let disputed = escrow.state == EscrowState::Disputed;
    let mut next = escrow.clone();
    next.updated_at = now;
    let effect = match (event, actor) {
        (EscrowEvent::Release { amount }, Actor::Payer) => {
            let amount = amount.unwrap_or(escrow.amount);
            if amount.is_zero() || amount > escrow.amount {
                return Err(EscrowError::InvalidAmount);
            }
            Some(resolve_with(&mut next, amount))
        }
        (EscrowEvent::Refund, Actor::Payee) => Some(resolve_with(&mut next, Credits::ZERO)),
        (EscrowEvent::Dispute, Actor::Payer | Actor::Payee) if disputed => return Err(EscrowError::AlreadyDisputed),
        (EscrowEvent::Dispute, Actor::Payer | Actor::Payee) => {
            next.state = EscrowState::Disputed;
            None
        }
        (EscrowEvent::Ruling { .. }, Actor::Admin) if !disputed => return Err(EscrowError::NotDisputed),
        (EscrowEvent::Ruling { release }, Actor::Admin) => {
            if release > escrow.amount {
                return Err(EscrowError::InvalidAmount);
            }
            Some(resolve_with(&mut next, release))
        }
        (EscrowEvent::Expire, Actor::System) if disputed || now < escrow.expires_at => {
            return Err(EscrowError::NotExpired);
        }
        (EscrowEvent::Expire, Actor::System) => {
            let release = match escrow.on_expiry {
                OnExpiry::Refund => Credits::ZERO,
                OnExpiry::Release => escrow.amount,
            };
            Some(resolve_with(&mut next, release))
        }
        _ => return Err(EscrowError::NotAllowed),
    };
    Ok((next, effect))
}

/// Resolves: `release` to the payee (a post), or all back to the payer (a void).
fn resolve_with(escrow: &mut Escrow, release: Credits) -> EscrowEffect {
    escrow.released = release;
    if release.is_zero() {
        escrow.state = EscrowState::Refunded;
        EscrowEffect::Void
    } else {
        escrow.state = EscrowState::Released;
        EscrowEffect::Post { amount: release }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escrow() -> Escrow {
        Escrow {
            id: TransferId::from_stored("admin:e1".into()),
            payer: AccountId::treasury(),
            payee: AccountId::issuance(),
            amount: Credits::new(100).unwrap(),
            state: EscrowState::Locked,
            on_expiry: OnExpiry::Release,
            expires_at: UnixMillis(1_000),
            released: Credits::ZERO,
            created_at: UnixMillis(0),
            updated_at: UnixMillis(0),
        }
    }

    #[test]
    fn release_partial_then_nothing_more() {
        let half = Some(Credits::new(40).unwrap());
        let (released, effect) =
            step(&escrow(), Actor::Payer, EscrowEvent::Release { amount: half }, UnixMillis(5)).unwrap();
        assert_eq!(effect, Some(EscrowEffect::Post { amount: Credits::new(40).unwrap() }));
        assert_eq!(released.state, EscrowState::Released);
        for (actor, event) in [
            (Actor::Payer, EscrowEvent::Release { amount: None }),
            (Actor::Payee, EscrowEvent::Refund),
            (Actor::System, EscrowEvent::Expire),
            (Actor::Payer, EscrowEvent::Dispute),
        ] {
            assert_eq!(step(&released, actor, event, UnixMillis(5_000)), Err(EscrowError::AlreadyResolved));
        }
    }

    #[test]
    fn only_the_right_party_acts() {
        let e = escrow();
        assert_eq!(
            step(&e, Actor::Payee, EscrowEvent::Release { amount: None }, UnixMillis(1)),
            Err(EscrowError::NotAllowed)
        );
        assert_eq!(step(&e, Actor::Payer, EscrowEvent::Refund, UnixMillis(1)), Err(EscrowError::NotAllowed));
        assert_eq!(
            step(&e, Actor::Admin, EscrowEvent::Ruling { release: Credits::ZERO }, UnixMillis(1)),
            Err(EscrowError::NotDisputed)
        );
        let too_much = Some(Credits::new(101).unwrap());
        assert_eq!(
            step(&e, Actor::Payer, EscrowEvent::Release { amount: too_much }, UnixMillis(1)),
            Err(EscrowError::InvalidAmount)
        );
    }

    #[test]
    fn dispute_freezes_expiry_until_a_ruling() {
        let (disputed, effect) = step(&escrow(), Actor::Payee, EscrowEvent::Dispute, UnixMillis(10)).unwrap();
        assert_eq!(effect, None);
        assert_eq!(
            step(&disputed, Actor::System, EscrowEvent::Expire, UnixMillis(1_000_000)),
            Err(EscrowError::NotExpired)
        );
        assert_eq!(
            step(&disputed, Actor::Payer, EscrowEvent::Dispute, UnixMillis(11)),
            Err(EscrowError::AlreadyDisputed)
        );
        let (ruled, effect) =
            step(&disputed, Actor::Admin, EscrowEvent::Ruling { release: Credits::ZERO }, UnixMillis(2_000)).unwrap();
        assert_eq!((ruled.state, effect), (EscrowState::Refunded, Some(EscrowEffect::Void)));
    }

    #[test]
    fn expiry_follows_the_escrow() {
        assert_eq!(step(&escrow(), Actor::System, EscrowEvent::Expire, UnixMillis(999)), Err(EscrowError::NotExpired));
        let (expired, effect) = step(&escrow(), Actor::System, EscrowEvent::Expire, UnixMillis(1_000)).unwrap();
        assert_eq!(
            (expired.state, effect),
            (EscrowState::Released, Some(EscrowEffect::Post { amount: Credits::new(100).unwrap() }))
        );
        let refunding = Escrow { on_expiry: OnExpiry::Refund, ..escrow() };
        let (expired, effect) = step(&refunding, Actor::System, EscrowEvent::Expire, UnixMillis(1_000)).unwrap();
        assert_eq!((expired.state, effect), (EscrowState::Refunded, Some(EscrowEffect::Void)));
    }
}
