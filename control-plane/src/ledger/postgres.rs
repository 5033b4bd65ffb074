//! The PostgreSQL batch: native statements with array parameters, so a batch is a
//! handful of statements whatever its size; and a two-stage pipeline, so one batch is
//! prepared while the one before it is written.
//!
//! [`crate::db::Database`] speaks `sqlx::Any`, which has no array types; ledger batches
//! run instead on a small pool of native connections ([`connect`]) opened with the same
//! connection options. Each stage below keeps its own connection from one batch to the
//! next ([`crate::db::HeldConnection`]), so a batch pays no pool round trips.
//!
//! **Pipeline.** A batch of one process goes through two stages, each held by one batch
//! at a time ([`Pipeline`]):
//!
//! 1. *Prepare*, without any database lock: read what the batch needs that this process
//!    does not already know (escrows and unbondings it names, account totals missing from
//!    the [`AccountCache`], which of its transfer ids are known), overlay what the batch
//!    still being written changes ([`InFlight`]), and run the commands in memory on the
//!    state that batch leaves. The result says which stored head it was computed on (its
//!    [`Basis`]).
//! 2. *Write*: `BEGIN`; the head row `FOR UPDATE` (the one lock that serialises ledger
//!    writers, see [`super::store`]); if the stored head is the basis and the previous
//!    batch of this process committed, the prepared effects are exactly what running the
//!    commands now would give, and are written; otherwise (another replica wrote, the fee
//!    changed, the previous batch failed, or this is the first batch) the cache is emptied
//!    and the batch is read and run again under the lock, as a batch without the pipeline
//!    would. Then every write in one statement (data-modifying `WITH` clauses fed by
//!    `UNNEST` of one array per column), and `COMMIT`.
//!
//! A smaller batch (under [`LARGE_BATCH_TRANSFERS`]) that was prepared, after a previous
//! batch that committed, is written instead by one auto-committed statement
//! ([`PERSIST_IF_BASIS`]): its first clause locks the head row only if it still is the
//! basis, and every write is conditional on that row. If it matched nothing, nothing was
//! written and the batch runs again under the lock as above. It saves the `BEGIN`, the
//! lock's round trip and the `COMMIT` that a few-millisecond batch would spend.
//!
//! Such a batch does not read which of its transfer ids are known, either
//! ([`Ids::CheckWhenWritten`]): it runs as if none were (ids of the in-flight batch
//! aside, which the overlay knows), and [`PERSIST_IF_BASIS`] writes it only if the
//! journal and the refusals hold none of them. A retry, which finds its id there, makes
//! the batch run again under the lock, where every id is read. New ids, nearly all of
//! them, save the prepare stage its one round trip.
//!
//! The next batch starts preparing once this one has decided, under the head lock, what it
//! writes, so its reads see every earlier batch committed except this one, whose changes
//! it takes from the overlay. The journal head alone would not prove that nothing else
//! was written: a batch of refusals, a dispute or a fee change leaves `seq` and `hash` as
//! they were. So the head row also counts its updates (`writes`, bumped by a trigger on
//! every update whoever makes it, migration 0016), and every ledger batch updates it once.
//! A basis names `seq`, `hash`, `writes` and `fee_bps`.
//!
//! With a warm cache a small batch of plain transfers with new ids is one round trip:
//! its statement. A large one is one round trip of reads (known ids, on the prepare
//! stage's connection while the previous batch writes) and four under the lock.

use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use molt_protocol::UnixMillis;
use sqlx::postgres::{PgArguments, PgConnection, PgPool};
use sqlx::{Connection as _, Postgres, Row as _, Transaction};
use tokio::sync::Mutex;

use super::books::{Known, TransferError};
use super::cache::AccountCache;
use super::engine::{Command, Outcome, ViewEffects};
use super::escrow::Escrow;
use super::stake::Unbonding;
use super::store::{
    ESCROW_COLUMNS, LedgerQueryError, Loaded, account_columns, account_from_row, account_ids_of, decode_error,
    escrow_from_row, query_error, referenced_records, run_batch, spec_from_row, spec_ids, to_db, to_db_position,
    transfer_from_row, unbonding_columns, unbonding_from_row,
};
use super::types::{Account, Rejection, Transfer, TransferId};
use crate::db::{Database, HeldConnection};

/// Native connections for ledger batches: the write stage and the prepare stage each keep
/// one ([`crate::db::HeldConnection`]); the other two stand in for one given up after a
/// failure while the pool checks and closes it.
pub const BATCH_POOL_CONNECTIONS: u32 = 4;

/// Every lookup and update here finds a batch's rows by key: nested loops over the
/// primary and unique indexes. A connection keeps its statements prepared, and a plan made
/// while the journal was small (a fresh database) hashed or scanned whole tables for as
/// long as the connection lived: the known-ids lookup took 13 ms at 40,000 entries instead
/// of 0.06 ms, and grew with the journal. Without these settings the planner may still
/// choose that; with them it takes an index whenever one serves, however small the table.
const PLANNER_SETTINGS: &str = "SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off";

type Tx<'c> = Transaction<'c, Postgres>;

/// Opens the batch pool with the options of `db`'s own pool.
pub async fn connect(db: &Database) -> Result<PgPool, LedgerQueryError> {
    db.native_postgres(BATCH_POOL_CONNECTIONS, PLANNER_SETTINGS)
        .await
        .map_err(query_error("connecting for ledger batches"))
}

/// The stored state a batch was computed on, or found under the head lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Basis {
    pub seq: u64,
    pub hash: [u8; 32],
    /// Updates of the head row so far (migration 0016).
    pub writes: i64,
    pub fee_bps: u32,
}

/// The two stages of one process's ledger batches (see the module docs).
#[derive(Debug, Default)]
pub struct Pipeline {
    prepare: Mutex<Speculation>,
    write: Mutex<LastWrite>,
    written_as_prepared: AtomicU64,
    run_under_lock: AtomicU64,
}

impl Pipeline {
    pub fn new() -> Pipeline {
        Pipeline::default()
    }

    /// Batches decided so far: (written as prepared, run again or first run under the
    /// head lock).
    pub fn decisions(&self) -> (u64, u64) {
        (self.written_as_prepared.load(Ordering::Relaxed), self.run_under_lock.load(Ordering::Relaxed))
    }
}

/// What the next batch prepares on: the state the last decided batch leaves.
#[derive(Debug, Default)]
struct Speculation {
    /// Totals as they will be once the last decided batch commits: its own accounts with
    /// its results, any other with totals stored before it.
    cache: AccountCache,
    /// The stored state once the last decided batch commits; `None`: unknown, so the next
    /// batch runs under the lock.
    basis: Option<Basis>,
    in_flight: InFlight,
    /// The prepare stage's connection, kept between batches.
    connection: HeldConnection,
}

impl Speculation {
    /// Forgets everything: the next batch reads and runs under the head lock.
    fn reset(&mut self) {
        self.cache.invalidate();
        self.basis = None;
        self.in_flight = InFlight::default();
    }

    /// After a failure: forgets everything, and gives up the connection.
    fn fail(&mut self) {
        self.reset();
        self.connection.give_up();
    }
}

/// What the last decided batch writes that a read made before its commit may not see.
#[derive(Debug, Default)]
struct InFlight {
    accounts: Vec<Account>,
    transfers: Vec<Transfer>,
    rejections: Vec<Rejection>,
    /// Every id of `transfers` (`Ok`) and `rejections` (`Err`), with its index.
    known: HashMap<TransferId, Result<usize, usize>>,
    escrows: HashMap<TransferId, Escrow>,
    unbondings: HashMap<TransferId, Unbonding>,
}

impl InFlight {
    fn new(effects: ViewEffects) -> InFlight {
        let books = effects.books;
        let applied = books.transfers.iter().enumerate().map(|(index, t)| (t.spec.id.clone(), Ok(index)));
        let refused = books.rejections.iter().enumerate().map(|(index, r)| (r.spec.id.clone(), Err(index)));
        let known = applied.chain(refused).collect();
        InFlight {
            accounts: books.accounts,
            transfers: books.transfers,
            rejections: books.rejections,
            known,
            escrows: effects.escrows.into_iter().map(|e| (e.id.clone(), e)).collect(),
            unbondings: effects.unbondings.into_iter().map(|u| (u.id.clone(), u)).collect(),
        }
    }

    /// Splits `ids` into what the batch knows of them and the ids it does not know.
    fn known(&self, ids: Vec<TransferId>) -> (Vec<(TransferId, Known)>, Vec<TransferId>) {
        let (mut found, mut missing) = (Vec::new(), Vec::new());
        for id in ids {
            let known = match self.known.get(&id) {
                Some(Ok(index)) => self.transfers.get(*index).map(|t| Known::Applied(t.clone())),
                Some(Err(index)) => self.rejections.get(*index).map(|r| Known::Rejected(r.spec.clone(), r.error)),
                None => None,
            };
            match known {
                Some(known) => found.push((id, known)),
                None => missing.push(id),
            }
        }
        (found, missing)
    }
}

/// The write stage: whether the batch before this one committed, and the stage's
/// connection, kept between batches.
#[derive(Debug, Default)]
struct LastWrite {
    committed: bool,
    connection: HeldConnection,
}

/// A batch run: what to answer, what to write, and what the next batch prepares on.
struct Ran {
    outcomes: Vec<Outcome>,
    head: (u64, [u8; 32]),
    in_flight: InFlight,
    write: WriteStatement,
}

impl Ran {
    fn new(outcomes: Vec<Outcome>, effects: ViewEffects) -> Result<Ran, LedgerQueryError> {
        let write = write_statement(&effects)?;
        Ok(Ran { outcomes, head: effects.books.head, in_flight: InFlight::new(effects), write })
    }
}

/// A batch run ahead of the head lock, on `basis`.
struct Prepared {
    basis: Basis,
    ran: Ran,
    /// Transfer ids the batch was run as new without looking them up
    /// ([`Ids::CheckWhenWritten`]); empty if they were looked up.
    unchecked: Vec<TransferId>,
}

/// How a prepared batch learns which of its transfer ids the ledger already knows (the
/// in-flight batch's ids it knows either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ids {
    /// Read them before running the batch.
    LookUp,
    /// Run the batch as if none were known; [`PERSIST_IF_BASIS`] writes it only if none
    /// is. Saves a round trip on every small batch, whose ids are almost always new (a
    /// retry is the exception, and runs again under the lock).
    CheckWhenWritten,
}

/// Called (or dropped) when the next batch may be collected: once a batch of at least
/// [`LARGE_BATCH_TRANSFERS`] transfers ([`Command::weight`]) has decided what it writes;
/// for a smaller batch, when it has committed or failed. On SQLite, when the batch has
/// committed (before its commit is synced) or failed.
pub type OnDecided = Box<dyn FnOnce() + Send>;

/// A batch of this many transfers lets the writers collect the next one as soon as it has decided,
/// so the next one's reads and computation overlap its write. A smaller batch is written
/// in a few milliseconds, and its callers are the ones that would fill the next batch:
/// collecting earlier only split the queue into a large batch and a tiny one, which
/// closed-loop callers then alternated between, a commit each (measured: 64 callers,
/// 17k calls/s against 21k with one batch at a time).
pub const LARGE_BATCH_TRANSFERS: usize = 1024;

/// Runs `commands` in one transaction and commits; keeps the pipeline's state in step.
/// `pause` runs once the batch is prepared and before it takes the head lock (tests write
/// from another replica exactly there; otherwise `async {}`).
pub async fn execute(
    pool: &PgPool,
    pipeline: &Pipeline,
    commands: &[Command],
    now: UnixMillis,
    pause: impl std::future::Future<Output = ()>,
    on_decided: OnDecided,
) -> Result<Vec<Outcome>, LedgerQueryError> {
    let started = std::time::Instant::now();
    let weight: usize = commands.iter().map(Command::weight).sum();
    let mut speculation = pipeline.prepare.lock().await;
    let ids = if weight < LARGE_BATCH_TRANSFERS { Ids::CheckWhenWritten } else { Ids::LookUp };
    let prepared = match speculation.basis {
        Some(basis) => match prepare(pool, &mut speculation, basis, ids, commands, now).await {
            Ok(prepared) => Some(prepared),
            Err(error) => {
                speculation.fail();
                return Err(error);
            }
        },
        None => None,
    };
    let prepared_us = started.elapsed().as_micros() as u64;
    pause.await;
    let mut last_write = pipeline.write.lock().await;
    let last_write = &mut *last_write;
    // A small batch is written as one statement (one round trip, no BEGIN, lock or COMMIT
    // of its own); the next batch is collected once it has committed anyway.
    let prepared = match prepared {
        Some(prepared) if weight < LARGE_BATCH_TRANSFERS && last_write.committed => {
            match write_if_basis(pool, pipeline, &mut speculation, last_write, prepared).await {
                Ok(Some(outcomes)) => {
                    tracing::trace!(
                        commands = commands.len(),
                        prepared_us,
                        committed_us = started.elapsed().as_micros() as u64,
                        "ledger batch committed in one statement"
                    );
                    return Ok(outcomes);
                }
                // Something else was written since the basis: run it under the lock.
                Ok(None) => None,
                // (`write_if_basis` gave up the write stage's connection.)
                Err(error) => {
                    speculation.reset();
                    return Err(error);
                }
            }
        }
        prepared => prepared,
    };
    // The connection is put back only once the batch has committed.
    let mut connection =
        last_write.connection.take(pool).await.map_err(query_error("connecting for a ledger batch"))?;
    let (mut tx, Ran { outcomes, write, .. }, speculated) =
        match decide(&mut connection, &mut speculation, prepared, last_write.committed, commands, now).await {
            Ok(decided) => decided,
            // (The write stage's connection is dropped with `connection`.)
            Err(error) => {
                speculation.reset();
                last_write.committed = false;
                return Err(error);
            }
        };
    // The next batch may prepare now, on what this one leaves.
    drop(speculation);
    // (A smaller batch drops `on_decided` when it returns.)
    let on_decided = if weight >= LARGE_BATCH_TRANSFERS {
        on_decided();
        None
    } else {
        Some(on_decided)
    };
    let counter = if speculated { &pipeline.written_as_prepared } else { &pipeline.run_under_lock };
    counter.fetch_add(1, Ordering::Relaxed);
    let decided_us = started.elapsed().as_micros() as u64;
    last_write.committed = false;
    sqlx::query_with(PERSIST, write).execute(&mut *tx).await.map_err(query_error("writing a ledger batch"))?;

    let written_us = started.elapsed().as_micros() as u64;
    tx.commit().await.map_err(query_error("committing a ledger batch"))?;
    last_write.committed = true;
    last_write.connection.keep(connection);
    drop(on_decided);
    tracing::trace!(
        commands = commands.len(),
        speculated,
        prepared_us,
        decided_us,
        written_us,
        committed_us = started.elapsed().as_micros() as u64,
        "ledger batch committed"
    );
    Ok(outcomes)
}

/// Takes the head lock and settles what the batch writes: the prepared effects if their
/// basis is the stored state and the previous batch committed, else the batch run again
/// under the lock. Records in `speculation` what the next batch prepares on.
async fn decide<'c>(
    connection: &'c mut PgConnection,
    speculation: &mut Speculation,
    prepared: Option<Prepared>,
    previous_committed: bool,
    commands: &[Command],
    now: UnixMillis,
) -> Result<(Tx<'c>, Ran, bool), LedgerQueryError> {
    let mut tx = connection.begin().await.map_err(query_error("starting a ledger transaction"))?;
    let stored = lock_head(&mut tx).await?;
    let (mut ran, speculated) = match prepared {
        Some(prepared) if previous_committed && prepared.basis == stored && prepared.unchecked.is_empty() => {
            (prepared.ran, true)
        }
        _ => {
            // The cache may hold totals another writer has changed since, or that a
            // batch which failed would have left.
            speculation.reset();
            let (outcomes, effects) = run_locked(&mut tx, &mut speculation.cache, stored, commands, now).await?;
            (Ran::new(outcomes, effects)?, false)
        }
    };
    // Decided, and nothing below waits: the next batch prepares on what this one leaves.
    speculation.cache.committed(&ran.in_flight.accounts, ran.head);
    let (seq, hash) = ran.head;
    speculation.basis = Some(Basis { seq, hash, writes: stored.writes + 1, fee_bps: stored.fee_bps });
    speculation.in_flight = std::mem::take(&mut ran.in_flight);
    Ok((tx, ran, speculated))
}

/// Writes a prepared batch with [`PERSIST_IF_BASIS`] and, if it was written, records what
/// the next batch prepares on; `None` if the stored head had moved or an unchecked id was
/// known (nothing written). On an error the batch may or may not have committed:
/// `last_write` says it did not, so the next batch reads again under the lock, and gives
/// up its connection.
async fn write_if_basis(
    pool: &PgPool,
    pipeline: &Pipeline,
    speculation: &mut Speculation,
    last_write: &mut LastWrite,
    prepared: Prepared,
) -> Result<Option<Vec<Outcome>>, LedgerQueryError> {
    let Prepared { basis, ran: Ran { outcomes, head, in_flight, write }, unchecked } = prepared;
    let write = Params { arguments: write, error: None }
        .bind(to_db_position(basis.seq))
        .bind(&basis.hash[..])
        .bind(basis.writes)
        .bind(i64::from(basis.fee_bps))
        .bind(texts(&unchecked))
        .finish()?;
    last_write.committed = false;
    let connection = last_write.connection.get(pool).await.map_err(query_error("connecting for a ledger batch"))?;
    let written = sqlx::query_with(PERSIST_IF_BASIS, write).fetch_optional(connection).await;
    if written.is_err() {
        last_write.connection.give_up();
    }
    let written = written.map_err(query_error("writing a ledger batch"))?;
    // Written or not, what the previous batch left is committed.
    last_write.committed = true;
    if written.is_none() {
        return Ok(None);
    }
    pipeline.written_as_prepared.fetch_add(1, Ordering::Relaxed);
    speculation.cache.committed(&in_flight.accounts, head);
    let (seq, hash) = head;
    speculation.basis = Some(Basis { seq, hash, writes: basis.writes + 1, fee_bps: basis.fee_bps });
    speculation.in_flight = in_flight;
    Ok(Some(outcomes))
}

/// Runs the batch ahead of the head lock on the state the in-flight batch leaves.
async fn prepare(
    pool: &PgPool,
    speculation: &mut Speculation,
    basis: Basis,
    ids: Ids,
    commands: &[Command],
    now: UnixMillis,
) -> Result<Prepared, LedgerQueryError> {
    let Speculation { cache, in_flight, connection, .. } = speculation;
    let connection = connection.get(pool).await.map_err(query_error("connecting for a ledger batch"))?;
    let (outcomes, effects, unchecked) = read_and_run(connection, cache, in_flight, basis, ids, commands, now).await?;
    // The cache takes the batch's totals only once the batch is decided: a batch
    // dropped before (its caller gone) must leave nothing of itself behind.
    Ok(Prepared { basis, ran: Ran::new(outcomes, effects)?, unchecked })
}

/// Reads what the batch needs under the head lock and runs it: the batch as it would run
/// without the pipeline. `cache` is empty or holds totals as of `stored`.
async fn run_locked(
    tx: &mut Tx<'_>,
    cache: &mut AccountCache,
    stored: Basis,
    commands: &[Command],
    now: UnixMillis,
) -> Result<(Vec<Outcome>, ViewEffects), LedgerQueryError> {
    cache.validate((stored.seq, stored.hash));
    let (outcomes, effects, _) =
        read_and_run(tx, cache, &InFlight::default(), stored, Ids::LookUp, commands, now).await?;
    Ok((outcomes, effects))
}

/// Reads what the batch needs and `cache` and `in_flight` do not hold, and runs it on
/// `basis`. Read accounts join the cache; the batch's own totals do not. Returns the
/// transfer ids it took as new without reading them (none with [`Ids::LookUp`]).
async fn read_and_run(
    connection: &mut PgConnection,
    cache: &mut AccountCache,
    in_flight: &InFlight,
    basis: Basis,
    ids: Ids,
    commands: &[Command],
    now: UnixMillis,
) -> Result<(Vec<Outcome>, ViewEffects, Vec<TransferId>), LedgerQueryError> {
    let (escrow_ids, unbonding_ids) = referenced_records(commands);
    let (found, escrow_ids) = overlay(&in_flight.escrows, escrow_ids);
    let mut escrows: Vec<Escrow> = found.into_iter().map(|(_, escrow)| escrow).collect();
    escrows.extend(self::escrows(connection, &escrow_ids).await?);
    let (found, unbonding_ids) = overlay(&in_flight.unbondings, unbonding_ids);
    let mut unbondings: Vec<Unbonding> = found.into_iter().map(|(_, unbonding)| unbonding).collect();
    unbondings.extend(self::unbondings(connection, &unbonding_ids).await?);
    let account_ids = account_ids_of(commands, &escrows, &unbondings);
    // Room for every account of the batch, keeping the in-flight batch's totals (its
    // rows still hold the totals before it).
    if cache.len() + account_ids.len() > super::cache::ACCOUNT_CACHE_ENTRIES_MAX {
        cache.invalidate();
        for account in &in_flight.accounts {
            cache.insert(account.clone());
        }
    }
    let missing: Vec<String> =
        account_ids.iter().filter(|id| !cache.contains(id)).map(|id| id.as_str().to_owned()).collect();
    for account in accounts(connection, &missing).await? {
        cache.insert(account);
    }
    let (mut known, unread) = in_flight.known(commands.iter().flat_map(spec_ids).collect());
    let unchecked = match ids {
        Ids::LookUp => {
            known.extend(known_ids(connection, &unread).await?);
            Vec::new()
        }
        Ids::CheckWhenWritten => unread,
    };
    let loaded = Loaded { fee_bps: basis.fee_bps, escrows, unbondings, known };
    let (outcomes, effects) = run_batch((basis.seq, basis.hash), cache, &account_ids, loaded, commands, now);
    Ok((outcomes, effects, unchecked))
}

/// Splits `ids` into the records the in-flight batch writes (cloned) and the ids to read.
fn overlay<V: Clone>(
    in_flight: &HashMap<TransferId, V>,
    ids: Vec<TransferId>,
) -> (Vec<(TransferId, V)>, Vec<TransferId>) {
    let (mut found, mut missing) = (Vec::new(), Vec::new());
    for id in ids {
        match in_flight.get(&id) {
            Some(record) => found.push((id, record.clone())),
            None => missing.push(id),
        }
    }
    (found, missing)
}

async fn lock_head(tx: &mut Tx<'_>) -> Result<Basis, LedgerQueryError> {
    let operation = "locking the journal head";
    let row = sqlx::query("SELECT seq, hash, writes, fee_bps FROM ledger_head WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut **tx)
        .await
        .map_err(query_error(operation))?;
    let seq: i64 = row.try_get("seq").map_err(query_error(operation))?;
    let hash: Vec<u8> = row.try_get("hash").map_err(query_error(operation))?;
    let fee: i64 = row.try_get("fee_bps").map_err(query_error(operation))?;
    Ok(Basis {
        seq: u64::try_from(seq).map_err(|_| decode_error(operation, "seq"))?,
        hash: hash.try_into().map_err(|_| decode_error(operation, "hash"))?,
        writes: row.try_get("writes").map_err(query_error(operation))?,
        fee_bps: u32::try_from(fee).map_err(|_| decode_error(operation, "fee"))?,
    })
}

fn texts(ids: &[TransferId]) -> Vec<String> {
    ids.iter().map(|id| id.as_str().to_owned()).collect()
}

async fn escrows(connection: &mut PgConnection, ids: &[TransferId]) -> Result<Vec<Escrow>, LedgerQueryError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(&format!(
        "SELECT {ESCROW_COLUMNS} FROM UNNEST($1::text[]) AS q (wanted) JOIN ledger_escrows ON id = q.wanted"
    ))
    .bind(texts(ids))
    .fetch_all(&mut *connection)
    .await
    .map_err(query_error("reading escrows"))?;
    rows.iter().map(escrow_from_row).collect()
}

async fn unbondings(connection: &mut PgConnection, ids: &[TransferId]) -> Result<Vec<Unbonding>, LedgerQueryError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(concat!(
        "SELECT ",
        unbonding_columns!(),
        " FROM UNNEST($1::text[]) AS q (wanted) JOIN ledger_unbondings ON id = q.wanted"
    ))
    .bind(texts(ids))
    .fetch_all(&mut *connection)
    .await
    .map_err(query_error("reading unbondings"))?;
    rows.iter().map(unbonding_from_row).collect()
}

async fn accounts(connection: &mut PgConnection, ids: &[String]) -> Result<Vec<Account>, LedgerQueryError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(concat!(
        "SELECT ",
        account_columns!(),
        " FROM UNNEST($1::text[]) AS q (wanted) JOIN ledger_accounts ON id = q.wanted"
    ))
    .bind(ids)
    .fetch_all(&mut *connection)
    .await
    .map_err(query_error("reading accounts"))?;
    rows.iter().map(account_from_row).collect()
}

/// Ids already applied (with their journal entry) or refused (with the reason).
async fn known_ids(
    connection: &mut PgConnection,
    ids: &[TransferId],
) -> Result<Vec<(TransferId, Known)>, LedgerQueryError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // Like every lookup here, a join with the unnested ids rather than `id = ANY($1)`: a
    // plan made while a table was small would scan it and test each row against the
    // whole array.
    let rows = sqlx::query(
        "SELECT t.seq, t.id, t.debit_account, t.credit_account, t.amount, t.kind, t.pending_id, t.purpose, t.flags, \
         t.created_at_ms, t.hash, t.debit_prev, t.credit_prev, NULL::text AS code \
         FROM UNNEST($1::text[]) AS q (id) JOIN ledger_transfers AS t ON t.id = q.id \
         UNION ALL SELECT NULL, r.id, r.debit_account, r.credit_account, r.amount, r.kind, r.pending_id, r.purpose, \
         r.flags, r.created_at_ms, NULL, NULL, NULL, r.code \
         FROM UNNEST($1::text[]) AS q (id) JOIN ledger_rejections AS r ON r.id = q.id",
    )
    .bind(texts(ids))
    .fetch_all(&mut *connection)
    .await
    .map_err(query_error("reading known transfer ids"))?;
    let mut known = Vec::with_capacity(rows.len());
    for row in &rows {
        let code: Option<String> = row.try_get("code").map_err(query_error("reading rejections"))?;
        match code {
            None => {
                let transfer = transfer_from_row(row)?;
                known.push((transfer.spec.id.clone(), Known::Applied(transfer)));
            }
            Some(code) => {
                let spec = spec_from_row(row, "reading rejections")?;
                let error =
                    TransferError::from_code(&code).ok_or_else(|| decode_error("reading rejections", "code"))?;
                known.push((spec.id.clone(), Known::Rejected(spec, error)));
            }
        }
    }
    Ok(known)
}

/// Every write of a batch in one statement: journal entries, refusals, account totals,
/// escrows, unbondings and the head, each only where `$guard` holds (a `$head` clause
/// may come first). Empty arrays write nothing.
macro_rules! persist {
    ($head:literal, $guard:literal, $returning:literal) => {
        concat!(
            "WITH ",
            $head,
            "new_transfers AS (
    INSERT INTO ledger_transfers (seq, id, debit_account, credit_account, amount, kind, pending_id, purpose, flags,
        created_at_ms, hash, debit_prev, credit_prev)
    SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
        $8::text[], $9::bigint[], $10::bigint[], $11::bytea[], $12::bigint[], $13::bigint[]) WHERE ",
            $guard,
            "
), new_rejections AS (
    INSERT INTO ledger_rejections (id, debit_account, credit_account, amount, kind, pending_id, purpose, flags, code,
        created_at_ms)
    SELECT * FROM UNNEST($14::text[], $15::text[], $16::text[], $17::bigint[], $18::text[], $19::text[],
        $20::text[], $21::bigint[], $22::text[], $23::bigint[]) WHERE ",
            $guard,
            "
), totals AS (
    UPDATE ledger_accounts AS a SET debits_pending = t.debits_pending, debits_posted = t.debits_posted,
        credits_pending = t.credits_pending, credits_posted = t.credits_posted, last_seq = t.last_seq
    FROM UNNEST($24::text[], $25::bigint[], $26::bigint[], $27::bigint[], $28::bigint[], $29::bigint[])
        AS t (id, debits_pending, debits_posted, credits_pending, credits_posted, last_seq)
    WHERE a.id = t.id AND ",
            $guard,
            "
), escrows AS (
    INSERT INTO ledger_escrows (id, payer, payee, amount, state, on_expiry, expires_at_ms, released, created_at_ms,
        updated_at_ms)
    SELECT * FROM UNNEST($30::text[], $31::text[], $32::text[], $33::bigint[], $34::text[], $35::text[],
        $36::bigint[], $37::bigint[], $38::bigint[], $39::bigint[]) WHERE ",
            $guard,
            "
    ON CONFLICT (id) DO UPDATE SET state = excluded.state, released = excluded.released,
        updated_at_ms = excluded.updated_at_ms
), unbondings AS (
    INSERT INTO ledger_unbondings (id, owner, stake_kind, amount, matures_at_ms, state, created_at_ms)
    SELECT * FROM UNNEST($40::text[], $41::text[], $42::text[], $43::bigint[], $44::bigint[], $45::text[],
        $46::bigint[]) WHERE ",
            $guard,
            "
    ON CONFLICT (id) DO UPDATE SET state = excluded.state
)
UPDATE ledger_head SET seq = $47, hash = $48 WHERE id = 1 AND ",
            $guard,
            $returning
        )
    };
}

/// The batch's writes, in the transaction that holds the head lock.
const PERSIST: &str = persist!("", "TRUE", "");

/// The batch's writes as one auto-committed statement, if the stored head is still the
/// basis (`$49`–`$52`: seq, hash, writes, fee) and the ledger knows none of the transfer
/// ids the batch took as new without reading them (`$53`, [`Ids::CheckWhenWritten`]). Its
/// first clause takes the head lock, as a batch's transaction does; if the head has moved
/// or an id is known it matches no row and nothing is written. Returns a row if it wrote.
///
/// The ids are read in the statement's snapshot, taken before it waits for the lock. That
/// suffices: the head row unmoved means nothing was written since the basis, and the
/// basis is this process's previous batch, committed before the statement began.
const PERSIST_IF_BASIS: &str = persist!(
    "head AS (
    SELECT 1 FROM ledger_head WHERE id = 1 AND seq = $49 AND hash = $50 AND writes = $51 AND fee_bps = $52
        AND NOT EXISTS (SELECT 1 FROM UNNEST($53::text[]) AS q (id) JOIN ledger_transfers AS t ON t.id = q.id)
        AND NOT EXISTS (SELECT 1 FROM UNNEST($53::text[]) AS q (id) JOIN ledger_rejections AS r ON r.id = q.id)
    FOR UPDATE
), ",
    "EXISTS (SELECT 1 FROM head)",
    " RETURNING seq"
);

/// The parameters of [`PERSIST`] for a batch, encoded already (built while the batch
/// before is written, not under the head lock).
type WriteStatement = PgArguments;

/// Encodes parameters in order, borrowing the batch's strings; keeps the first error.
struct Params {
    arguments: PgArguments,
    error: Option<sqlx::error::BoxDynError>,
}

impl Params {
    fn new() -> Params {
        Params { arguments: PgArguments::default(), error: None }
    }

    fn bind<'q, T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>>(mut self, value: T) -> Params {
        if self.error.is_none()
            && let Err(error) = sqlx::Arguments::add(&mut self.arguments, value)
        {
            self.error = Some(error);
        }
        self
    }

    fn finish(self) -> Result<PgArguments, LedgerQueryError> {
        match self.error {
            None => Ok(self.arguments),
            Some(error) => Err(query_error("encoding a ledger batch")(sqlx::Error::Encode(error))),
        }
    }
}

fn write_statement(effects: &ViewEffects) -> Result<WriteStatement, LedgerQueryError> {
    let books = &effects.books;
    let transfers: Vec<_> = books.transfers.iter().map(|t| &t.spec).collect();
    let rejections: Vec<_> = books.rejections.iter().map(|r| &r.spec).collect();
    let query = Params::new();
    // Journal entries.
    let query = query
        .bind(books.transfers.iter().map(|t| i64::try_from(t.seq).unwrap_or(i64::MAX)).collect::<Vec<_>>())
        .bind(column(&transfers, |s| s.id.as_str()))
        .bind(column(&transfers, |s| s.debit.as_str()))
        .bind(column(&transfers, |s| s.credit.as_str()))
        .bind(column(&transfers, |s| s.amount.to_db()))
        .bind(column(&transfers, |s| s.kind.as_str()))
        .bind(column(&transfers, |s| s.pending_id.as_ref().map(|id| id.as_str())))
        .bind(column(&transfers, |s| s.purpose.as_str()))
        .bind(column(&transfers, |s| s.flags.0 as i64))
        .bind(books.transfers.iter().map(|t| to_db(t.created_at)).collect::<Vec<_>>())
        .bind(books.transfers.iter().map(|t| &t.hash[..]).collect::<Vec<_>>())
        .bind(books.transfers.iter().map(|t| to_db_position(t.debit_prev)).collect::<Vec<_>>())
        .bind(books.transfers.iter().map(|t| to_db_position(t.credit_prev)).collect::<Vec<_>>());
    // Refusals.
    let query = query
        .bind(column(&rejections, |s| s.id.as_str()))
        .bind(column(&rejections, |s| s.debit.as_str()))
        .bind(column(&rejections, |s| s.credit.as_str()))
        .bind(column(&rejections, |s| s.amount.to_db()))
        .bind(column(&rejections, |s| s.kind.as_str()))
        .bind(column(&rejections, |s| s.pending_id.as_ref().map(|id| id.as_str())))
        .bind(column(&rejections, |s| s.purpose.as_str()))
        .bind(column(&rejections, |s| s.flags.0 as i64))
        .bind(books.rejections.iter().map(|r| r.error.code()).collect::<Vec<_>>())
        .bind(books.rejections.iter().map(|r| to_db(r.created_at)).collect::<Vec<_>>());
    // Account totals.
    let accounts = &books.accounts;
    let query = query
        .bind(column(accounts, |a| a.id.as_str()))
        .bind(column(accounts, |a| a.debits_pending.to_db()))
        .bind(column(accounts, |a| a.debits_posted.to_db()))
        .bind(column(accounts, |a| a.credits_pending.to_db()))
        .bind(column(accounts, |a| a.credits_posted.to_db()))
        .bind(column(accounts, |a| to_db_position(a.last_seq)));
    // Escrows.
    let escrows = &effects.escrows;
    let query = query
        .bind(column(escrows, |e| e.id.as_str()))
        .bind(column(escrows, |e| e.payer.as_str()))
        .bind(column(escrows, |e| e.payee.as_str()))
        .bind(column(escrows, |e| e.amount.to_db()))
        .bind(column(escrows, |e| e.state.as_str()))
        .bind(column(escrows, |e| e.on_expiry.as_str()))
        .bind(column(escrows, |e| to_db(e.expires_at)))
        .bind(column(escrows, |e| e.released.to_db()))
        .bind(column(escrows, |e| to_db(e.created_at)))
        .bind(column(escrows, |e| to_db(e.updated_at)));
    // Unbondings.
    let unbondings = &effects.unbondings;
    let query = query
        .bind(column(unbondings, |u| u.id.as_str()))
        .bind(column(unbondings, |u| u.owner.to_string()))
        .bind(column(unbondings, |u| u.kind.as_str()))
        .bind(column(unbondings, |u| u.amount.to_db()))
        .bind(column(unbondings, |u| to_db(u.matures_at)))
        .bind(column(unbondings, |u| u.state.as_str()))
        .bind(column(unbondings, |u| to_db(u.created_at)));
    // Head.
    let (seq, hash) = books.head;
    let query = query
        .bind(i64::try_from(seq).map_err(|_| decode_error("writing the journal head", "seq"))?)
        .bind(hash.to_vec());
    query.finish()
}

/// One array parameter: `value` of every row.
fn column<'a, R, T>(rows: &'a [R], value: impl Fn(&'a R) -> T) -> Vec<T> {
    rows.iter().map(value).collect()
}
