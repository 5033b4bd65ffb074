//! The credits ledger: double-entry accounts, immutable transfers, escrow, stakes and fees,
//! with a hash-chained journal.
//!
//! **Model** (after TigerBeetle). Every account has four totals — debits and credits,
//! pending and posted — and its balance is derived from them. A transfer moves an integer
//! amount of micro-credits ([`Credits`]) between exactly two accounts, so every movement
//! is a debit of one and a credit of the other and, over all accounts, posted debits
//! equal posted credits. Pending (two-phase) transfers reserve an amount until they are
//! posted (fully or partly) or voided, at most once. Transfer ids are chosen by clients
//! and are idempotency keys: a retry gets the original result, including the original
//! failure; the same id with other fields is refused. Transfers can be linked: a chain
//! succeeds or fails as one.
//!
//! **Accounts**: `issuance` (the only account allowed below zero: minting debits it),
//! `treasury` (fees, slashed stake, minted credits), and per agent `wallet:<agent>`,
//! `stake:<agent>:<kind>` and `unbonding:<agent>:<kind>`.
//!
//! **Layers.** [`books`] applies transfer specs to an in-memory view; [`escrow`] and
//! [`stake`] are the state machines; [`engine`] turns escrow and stake commands into
//! transfers. These are pure: time comes in as an argument. [`journal`] computes the
//! hash chain and audits. [`store`] loads what a batch needs and persists its effects,
//! in one transaction per batch that takes the journal head lock first (on PostgreSQL
//! through native array statements and a two-stage pipeline, [`postgres`]; on SQLite in
//! two scripts of several statements, [`sqlite`]); [`cache`]
//! keeps account totals between a writer's batches while the journal head shows no other
//! writer has moved them. [`service::Ledger`] feeds commands to group-commit writer
//! tasks and runs the expiry work under a lease.

pub mod books;
pub mod cache;
pub mod engine;
pub mod escrow;
pub mod journal;
pub mod postgres;
pub mod service;
pub mod sqlite;
pub mod stake;
pub mod store;
pub mod types;

pub use books::{Applied, TransferError};
pub use service::Ledger;
pub use types::{AccountId, ClientId, Credits, StakeKind, TransferId};
