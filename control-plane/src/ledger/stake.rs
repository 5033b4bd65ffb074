//! Stakes: credits an agent locks (for trust, governance or a job commitment) in a stake
//! account of that kind. Unlocking moves them to the unbonding account at once and opens
//! an [`Unbonding`]; when it matures (after [`unbonding_period`]), the expiry worker moves
//! them back to the wallet. Slashing ([`crate::api::ledger::slash_spec`], behind the
//! admin route [`crate::api::ledger::slash_stake`]) moves locked stake to the treasury; it
//! is the hook disputes and arbitration will call.

use std::time::Duration;

use molt_protocol::{AgentId, UnixMillis};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::types::{Credits, StakeKind, TransferId};

/// How long unlocked stake of `kind` waits before it is spendable again.
pub fn unbonding_period(kind: StakeKind) -> Duration {
    match kind {
        StakeKind::Trust => Duration::from_secs(7 * 24 * 3600),
        StakeKind::Governance => Duration::from_secs(14 * 24 * 3600),
        StakeKind::Job => Duration::from_secs(24 * 3600),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UnbondingState {
    /// Waiting out the period.
    Unbonding,
    /// Moved back to the wallet.
    Released,
}

impl UnbondingState {
    pub fn as_str(self) -> &'static str {
        match self {
            UnbondingState::Unbonding => "unbonding",
            UnbondingState::Released => "released",
        }
    }

    pub fn parse(text: &str) -> Option<UnbondingState> {
        [UnbondingState::Unbonding, UnbondingState::Released].into_iter().find(|state| state.as_str() == text)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unbonding {
    /// The id of the unlock transfer.
    pub id: TransferId,
    pub owner: AgentId,
    pub kind: StakeKind,
    pub amount: Credits,
    pub matures_at: UnixMillis,
    pub state: UnbondingState,
    pub created_at: UnixMillis,
}

/// Why an unbonding cannot be released now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MatureError {
    #[error("unbonding not released: it has not matured")]
    NotMatured,
    #[error("unbonding not released: it was released before")]
    AlreadyReleased,
}

/// The maturity transition: the unbonding is released if its time has come.
pub fn mature(unbonding: &Unbonding, now: UnixMillis) -> Result<Unbonding, MatureError> {
    match unbonding.state {
        UnbondingState::Released => Err(MatureError::AlreadyReleased),
        UnbondingState::Unbonding if now < unbonding.matures_at => Err(MatureError::NotMatured),
        UnbondingState::Unbonding => Ok(Unbonding { state: UnbondingState::Released, ..unbonding.clone() }),
    }
}
