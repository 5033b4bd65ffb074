//! The SQLite batch: few round trips to the connection's thread.
//!
//! sqlx runs each SQLite connection on a thread of its own, and every statement is a
//! message to that thread and a wake-up back. A batch therefore sends whole scripts, on
//! the writer's own connection:
//!
//! 1. the read script: `BEGIN IMMEDIATE`, which takes the database's one write lock
//!    before anything is read (a transaction that read first could fail to upgrade its
//!    lock), then the journal head, the escrows and unbondings the commands name, and
//!    which of their transfer ids are already applied or refused, and which of the
//!    signed requests' nonces are recorded and unexpired;
//! 2. the account totals the [`AccountCache`] does not hold, only if there are any;
//! 3. the write script: the new journal entries, the refusals, the final account totals,
//!    the escrows and unbondings, the new head, the fresh nonces (and, every
//!    [`NONCE_PURGE_INTERVAL`], the deletion of expired ones), and `COMMIT`.
//!
//! A command whose request's nonce the read script found, or which repeats a nonce
//! earlier in the batch, does not run: its outcome is [`engine::Outcome::Replayed`].
//!
//! **On its basis.** Most batches need no read at all. After a commit the writer knows
//! what it left stored: the journal head, the fee, and (in its cache) every account
//! total it touched. A batch of plain transfers, at most [`ON_BASIS_TRANSFERS_MAX`],
//! whose accounts are all cached, is computed on that basis and sent as one script:
//! `BEGIN IMMEDIATE`, a check that the basis still holds (head and fee unchanged, none
//! of its transfer ids known, none of its nonces recorded), the writes, `COMMIT`. The
//! check is an insert into a temporary table whose constraint refuses a false row, which
//! stops the script before any write; the writer then rolls back and runs the batch the
//! long way above. It fails when another process has written, an admin changed the fee,
//! or a request is a retry or a replay ([`execute_on_basis`]).
//!
//! **Synced off the lock.** The writer's connection commits without syncing the log
//! (`synchronous = NORMAL`); [`LogSync`] then syncs the log file itself (`fdatasync`),
//! after the write lock is released, and the batch is answered only once a sync that
//! began after its commit has ended. Meanwhile the other SQLite writer task runs the next
//! batch, and syncs its commit without waiting for this sync to end. A commit is as
//! durable when answered as with SQLite's own sync (the log is written in order, and a
//! checkpoint syncs it before copying it into the database), but the sync no longer holds
//! the lock: it was a third of the time a batch held it. A sync that fails fails the batch
//! with an error that is not retried ([`LedgerQueryError::is_unsynced_commit`]): the
//! batch may be stored.
//!
//! A script is several statements in one query string with `?` parameters, which sqlx
//! binds in order across its statements. Each row of the read script starts with a
//! `part` column that names the statement it came from.
//!
//! **Prepared once.** A statement's rows are padded with rows of NULLs up to the next of
//! a few sizes ([`ROW_BUCKETS`]), and every statement skips such a row (an insert reads
//! its rows through `SELECT * … WHERE column1 IS NOT NULL`). So a script's text depends
//! only on which sizes its batch falls into, a few texts recur, and each stays prepared
//! on the writer's connection instead of being parsed again for every batch (parsing was
//! a fifth of the writer's time). A statement of a full [`ROWS_PER_STATEMENT`] rows runs
//! on its own (after the read script, before the write script).
//!
//! **No statement journal.** Inside a transaction SQLite keeps a copy of every page a
//! statement of several rows changes, so that a failed constraint can undo that statement
//! alone. The inserts here say `OR ROLLBACK` instead: a failed constraint ends the whole
//! transaction, which is what happens to a failed batch anyway, and SQLite skips the
//! copies (they were a sixth of the writer's time). Nonces are recorded by deleting any
//! expired record of the same nonce, then inserting, rather than by an upsert, whose
//! update would need the journal again.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use molt_protocol::UnixMillis;
use sqlx::AnyConnection;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::{Any, Arguments as _, Encode, Row as _, Type};

use super::books::{Known, TransferError};
use super::cache::{AccountCache, Head};
use super::engine::{self, Command, ViewEffects};
use super::escrow::Escrow;
use super::stake::Unbonding;
use super::store::{
    ESCROW_COLUMNS, LedgerQueryError, Loaded, ROWS_PER_STATEMENT, account_ids_of, accounts_in, decode_error,
    escrow_from_row, query_error, referenced_records, run_batch, spec_from_row, spec_ids, to_db, to_db_position,
    transfer_columns, transfer_from_row, unbonding_columns, unbonding_from_row,
};
use super::types::{AccountId, TransferId, TransferSpec};
use crate::agent_auth::{NONCE_PURGE_INTERVAL, RequestNonce};
use crate::db::Database;

/// What a row of the read script is.
const PART_HEAD: i64 = 0;
const PART_ESCROW: i64 = 1;
const PART_UNBONDING: i64 = 2;
const PART_TRANSFER: i64 = 3;
const PART_REJECTION: i64 = 4;
const PART_NONCE: i64 = 5;

/// Nonces the read script found recorded, as [`RequestNonce::stored_key`].
type RecordedNonces = HashSet<(String, String, i64)>;

/// Ends `… FROM (VALUES (?, ?, ?), …` with the join of that list of (expiry, agent,
/// nonce) to the recorded nonces, as `n`: the list's nonces that are recorded. A join
/// on the primary key, not `(…) IN (VALUES …)`, which SQLite answers with a scan. Its
/// rows: [`bind_nonce_keys`].
const NONCE_LOOKUP: &str = ") AS v JOIN agent_request_nonces AS n \
                            ON n.expires_at_ms = v.column1 AND n.agent_id = v.column2 AND n.nonce = v.column3";

/// Values in a row of a [`NONCE_LOOKUP`]'s list.
const NONCE_KEY_WIDTH: usize = 3;

/// Transfers (and nonces) a batch may have at most to be written on its basis, without
/// reading first: its statements then stay short of [`ROWS_PER_STATEMENT`] rows.
pub const ON_BASIS_TRANSFERS_MAX: usize = 200;

/// The table the basis check writes to, on the writer's connection only: its one
/// constraint fails the check's statement, and with it the script, if the basis moved.
const BASIS_TABLE: &str =
    "CREATE TEMP TABLE IF NOT EXISTS ledger_basis (holds INTEGER, CONSTRAINT basis_holds CHECK (holds IS 1))";

/// The row counts a statement's text is written for. A batch's rows are padded up to the
/// next of these with rows of NULLs, which every statement skips, so that a few texts
/// recur from batch to batch and stay prepared on the writer's connection.
const ROW_BUCKETS: [usize; 15] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, ROWS_PER_STATEMENT];
const _: () = assert!(ROW_BUCKETS[ROW_BUCKETS.len() - 2] < ROWS_PER_STATEMENT);

/// The row count a statement of `rows` rows is written for: the next of [`ROW_BUCKETS`].
fn padded_rows(rows: usize) -> usize {
    ROW_BUCKETS.into_iter().find(|&bucket| bucket >= rows).unwrap_or(rows)
}

/// Appends `rows` groups of `width` parameters padded to [`padded_rows`]: ` (?, ?), (?, ?)`,
/// or ` ?, ?` for a width of one.
fn padded_list(sql: &mut String, rows: usize, width: usize) {
    for row in 0..padded_rows(rows) {
        sql.push_str(if row == 0 { " " } else { ", " });
        if width > 1 {
            sql.push('(');
        }
        for column in 0..width {
            sql.push_str(if column == 0 { "?" } else { ", ?" });
        }
        if width > 1 {
            sql.push(')');
        }
    }
}

fn bind_ids(script: &mut Script, ids: &[TransferId]) -> Result<(), LedgerQueryError> {
    ids.iter().try_for_each(|id| script.bind(id.as_str().to_owned()))
}

/// What the writer's last commit left stored: the journal head and the fee.
type Basis = (Head, u32);

/// The operation a failed sync of the log reports ([`LedgerQueryError::is_unsynced_commit`]).
pub const LOG_SYNC_OPERATION: &str = "syncing the ledger's log";

/// Syncs of the ledger's log that may run at once: one for each writer's batch, so a
/// commit made while the other writer's sync runs need not wait for that sync to end
/// before its own begins.
pub const LOG_SYNCS_IN_FLIGHT_MAX: usize = 2;

/// Makes the writer's commits durable after the fact (see the module's text): its
/// connection commits without syncing the log (`synchronous = NORMAL`), and a batch is
/// answered once a sync of the log that began after its commit has ended. A sync covers
/// every commit before it began, so a batch whose commit an ended sync covers needs none
/// of its own; up to [`LOG_SYNCS_IN_FLIGHT_MAX`] run at once, and commits made while that
/// many run share the next one.
#[derive(Debug)]
pub struct LogSync {
    /// The write-ahead log, open for as long as the writer's connection is (SQLite keeps
    /// the file while a connection is open).
    log: std::fs::File,
    committed: AtomicU64,
    synced: AtomicU64,
    in_flight: tokio::sync::Semaphore,
    syncs: AtomicU64,
}

/// A commit to wait for: [`LogSync::durable`].
pub type Commit = (Arc<LogSync>, u64);

impl LogSync {
    fn new(log: std::fs::File) -> LogSync {
        LogSync {
            log,
            committed: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            in_flight: tokio::sync::Semaphore::new(LOG_SYNCS_IN_FLIGHT_MAX),
            syncs: AtomicU64::new(0),
        }
    }

    /// Counts a commit whose writes have returned; its number, for [`LogSync::durable`].
    fn committed(&self) -> u64 {
        self.committed.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Waits until commit `number` is synced, syncing the log if no sync under way covers it.
    pub async fn durable(self: &Arc<Self>, number: u64) -> Result<(), LedgerQueryError> {
        if self.synced.load(Ordering::Acquire) >= number {
            return Ok(());
        }
        // Invariant: the semaphore is never closed.
        let _sync = self.in_flight.acquire().await.expect("the log's sync semaphore is never closed");
        if self.synced.load(Ordering::Acquire) >= number {
            return Ok(());
        }
        let through = self.committed.load(Ordering::Acquire);
        let sync = Arc::clone(self);
        let synced = tokio::task::spawn_blocking(move || sync.log.sync_data())
            .await
            .unwrap_or_else(|join| Err(std::io::Error::other(join)));
        synced.map_err(|error| query_error(LOG_SYNC_OPERATION)(sqlx::Error::Io(error)))?;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.synced.fetch_max(through, Ordering::AcqRel);
        Ok(())
    }

    /// Syncs of the log so far, and the last commit they covered, for tests.
    pub fn synced(&self) -> (u64, u64) {
        (self.syncs.load(Ordering::Relaxed), self.synced.load(Ordering::Acquire))
    }

    /// Commits so far.
    pub fn commits(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }
}

/// The SQLite writer's state from one batch to the next: its account cache, its own
/// connection, taken out of the pool on first use, the basis its last batch left, and
/// when it last deleted expired nonces.
#[derive(Debug, Default)]
pub struct Writer {
    cache: AccountCache,
    connection: Option<AnyConnection>,
    /// The log's sync, with the connection; `None` where the connection syncs its own
    /// commits (no write-ahead log, or no file).
    log: Option<Arc<LogSync>>,
    basis: Option<Basis>,
    nonces_purged_at: Option<UnixMillis>,
    /// Batches written on their basis, for tests and traces.
    on_basis: u64,
}

impl Writer {
    /// Runs `commands` in one transaction and commits (see the module's text). After a
    /// failure the cache is emptied and the connection closed, which rolls back whatever
    /// the batch had begun; so is a connection whose batch was cancelled.
    /// `nonces` pairs a command's index with its signed request's nonce
    /// ([`super::store::BatchStore::execute_signed_then`]). The batch is committed but
    /// durable only once the returned [`Commit`], if any, is ([`LogSync::durable`]).
    pub async fn execute(
        &mut self,
        db: &Database,
        commands: &[Command],
        nonces: &[(usize, RequestNonce)],
        now: UnixMillis,
    ) -> Result<(Vec<engine::Outcome>, Option<Commit>), LedgerQueryError> {
        let (escrow_ids, unbonding_ids) = referenced_records(commands);
        let ids: Vec<TransferId> = commands.iter().flat_map(spec_ids).collect();
        let purge = !nonces.is_empty() && self.nonces_purged_at.is_none_or(|at| now.since(at) >= NONCE_PURGE_INTERVAL);
        let _turn = db.sqlite_write_turn().await;
        let mut connection = match self.connection.take() {
            Some(connection) => connection,
            None => {
                let (connection, log) =
                    writer_connection(db).await.map_err(query_error("connecting the ledger writer"))?;
                self.log = log.map(Arc::new);
                connection
            }
        };
        let batch =
            Batch { commands, nonces, now, purge, escrow_ids: &escrow_ids, unbonding_ids: &unbonding_ids, ids: &ids };
        let basis = self.basis.take().filter(|_| batch.may_go_on_basis());
        let result = match basis {
            Some(basis) => match execute_on_basis(&mut connection, &mut self.cache, &batch, basis).await {
                Ok(Some(done)) => {
                    self.on_basis += 1;
                    Ok(done)
                }
                Ok(None) => execute_on(&mut connection, &mut self.cache, &batch).await,
                Err(error) => Err(error),
            },
            None => execute_on(&mut connection, &mut self.cache, &batch).await,
        };
        match result {
            Ok((outcomes, basis)) => {
                self.connection = Some(connection);
                self.basis = Some(basis);
                if purge {
                    self.nonces_purged_at = Some(now);
                }
                let commit = self.log.as_ref().map(|log| (Arc::clone(log), log.committed()));
                Ok((outcomes, commit))
            }
            Err(error) => {
                self.cache.invalidate();
                Err(error)
            }
        }
    }

    /// The log's sync, if the connection has one.
    pub fn log_sync(&self) -> Option<Arc<LogSync>> {
        self.log.clone()
    }

    /// How many batches were written on their basis, without reading first.
    pub fn batches_on_basis(&self) -> u64 {
        self.on_basis
    }
}

/// The writer's own connection: one from the pool, detached from it, with the basis
/// check's table.
async fn writer_connection(db: &Database) -> Result<(AnyConnection, Option<LogSync>), sqlx::Error> {
    let mut connection = db.pool().acquire().await?.detach();
    sqlx::Executor::execute(&mut connection, BASIS_TABLE).await?;
    // A read opens the log, if there is one.
    sqlx::Executor::execute(&mut connection, "SELECT count(*) FROM sqlite_schema").await?;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut connection).await?;
    let file: String = sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
        .fetch_one(&mut connection)
        .await?;
    if mode != "wal" || file.is_empty() {
        return Ok((connection, None));
    }
    let path = format!("{file}-wal");
    match std::fs::File::open(&path) {
        Ok(log) => {
            // The background checkpoint keeps the log short (`db::run_sqlite_checkpoints`):
            // a checkpoint inside a commit would hold the write lock for milliseconds.
            sqlx::Executor::execute(&mut connection, "PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0")
                .await?;
            Ok((connection, Some(LogSync::new(log))))
        }
        Err(error) => {
            tracing::warn!(%error, path, "cannot open the ledger's log to sync it; every commit syncs it instead");
            Ok((connection, None))
        }
    }
}

/// What one batch is given and reads.
struct Batch<'a> {
    commands: &'a [Command],
    nonces: &'a [(usize, RequestNonce)],
    now: UnixMillis,
    /// Whether to delete expired nonces.
    purge: bool,
    escrow_ids: &'a [TransferId],
    unbonding_ids: &'a [TransferId],
    ids: &'a [TransferId],
}

impl Batch<'_> {
    /// Plain transfers, few enough: what [`execute_on_basis`] may write.
    fn may_go_on_basis(&self) -> bool {
        self.escrow_ids.is_empty()
            && self.unbonding_ids.is_empty()
            && self.ids.len() <= ON_BASIS_TRANSFERS_MAX
            && self.nonces.len() <= ON_BASIS_TRANSFERS_MAX
    }

    /// The commands that run: all but the replayed ones (a copy only if there are any).
    fn running(&self, replayed: &HashSet<usize>) -> std::borrow::Cow<'_, [Command]> {
        if replayed.is_empty() {
            return self.commands.into();
        }
        self.commands
            .iter()
            .enumerate()
            .filter(|(index, _)| !replayed.contains(index))
            .map(|(_, c)| c.clone())
            .collect()
    }
}

/// Each command's outcome: [`engine::Outcome::Replayed`] for the replayed ones, in
/// order, then those of the commands that ran.
fn merged_outcomes(
    commands: usize,
    replayed: &HashSet<usize>,
    ran: Vec<engine::Outcome>,
) -> Result<Vec<engine::Outcome>, LedgerQueryError> {
    let mut ran = ran.into_iter();
    (0..commands)
        .map(|index| if replayed.contains(&index) { Some(engine::Outcome::Replayed) } else { ran.next() })
        .collect::<Option<_>>()
        .ok_or_else(|| decode_error("running a ledger batch", "outcome (missing)"))
}

/// Writes a batch of plain transfers without reading first, in one script: `BEGIN
/// IMMEDIATE`, a check that the basis the writer's last commit left still holds (the
/// head and fee unchanged, none of the transfer ids known, none of the nonces recorded
/// and unexpired), then the writes computed on it and `COMMIT`. Every ledger write of a
/// process goes through its one writer, so the check holds unless another process wrote,
/// an admin set the fee, or a request is a retry or a replay. `None` when it does not: the
/// check's statement failed, and the transaction is rolled back; every account must be
/// in the cache, or it is `None` at once.
async fn execute_on_basis(
    connection: &mut AnyConnection,
    cache: &mut AccountCache,
    batch: &Batch<'_>,
    (head, fee_bps): Basis,
) -> Result<Option<(Vec<engine::Outcome>, Basis)>, LedgerQueryError> {
    let started = Instant::now();
    let (replayed, fresh) = replayed_commands(batch.nonces, &RecordedNonces::new());
    let running = batch.running(&replayed);
    let account_ids = account_ids_of(&running, &[], &[]);
    if !account_ids.iter().all(|id| cache.contains(id)) {
        return Ok(None);
    }
    let loaded = Loaded { fee_bps, escrows: Vec::new(), unbondings: Vec::new(), known: Vec::new() };
    let (ran, effects) = run_batch(head, cache, &account_ids, loaded, &running, batch.now);
    let outcomes = merged_outcomes(batch.commands.len(), &replayed, ran)?;
    let mut script = basis_check(head, fee_bps, batch.ids, batch.nonces)?;
    write_into(&mut script, &effects, &fresh, batch.purge.then_some(batch.now))?;
    if !script.full.is_empty() {
        return Ok(None);
    }
    let built = started.elapsed();
    if let Err(error) = script.run(connection, "writing a ledger batch on its basis").await {
        if !error.is_basis_moved() {
            return Err(error);
        }
        sqlx::Executor::execute(&mut *connection, "ROLLBACK").await.map_err(query_error("rolling back a batch"))?;
        tracing::debug!("ledger basis moved; reading the batch's records first");
        return Ok(None);
    }
    cache.committed(&effects.books.accounts, effects.books.head);
    tracing::trace!(
        commands = batch.commands.len(),
        transfers = effects.books.transfers.len(),
        built_us = built.as_micros() as u64,
        committed_us = started.elapsed().as_micros() as u64,
        "sqlite ledger batch on its basis"
    );
    Ok(Some((outcomes, (effects.books.head, fee_bps))))
}

/// Binds the rows of a [`NONCE_LOOKUP`]'s list: each nonce's expiry, agent and value.
fn bind_nonce_keys<'a>(
    script: &mut Script,
    nonces: impl IntoIterator<Item = &'a RequestNonce>,
) -> Result<(), LedgerQueryError> {
    for nonce in nonces {
        script.bind(to_db(nonce.expires_at))?;
        script.bind(nonce.agent.to_string())?;
        script.bind(nonce.nonce.clone())?;
    }
    Ok(())
}

/// `BEGIN IMMEDIATE` and the basis check (see [`execute_on_basis`]).
fn basis_check(
    head: Head,
    fee_bps: u32,
    ids: &[TransferId],
    nonces: &[(usize, RequestNonce)],
) -> Result<Script, LedgerQueryError> {
    let mut script = Script::new();
    script.push("BEGIN IMMEDIATE");
    let mut check = String::from(
        "INSERT INTO temp.ledger_basis (holds) SELECT \
         (SELECT seq = ? AND hash = ? AND fee_bps = ? FROM ledger_head WHERE id = 1)",
    );
    if !ids.is_empty() {
        for table in ["ledger_transfers", "ledger_rejections"] {
            check.push_str(&format!(" AND NOT EXISTS (SELECT 1 FROM {table} WHERE id IN ("));
            padded_list(&mut check, ids.len(), 1);
            check.push_str("))");
        }
    }
    if !nonces.is_empty() {
        check.push_str(" AND NOT EXISTS (SELECT 1 FROM (VALUES");
        padded_list(&mut check, nonces.len(), NONCE_KEY_WIDTH);
        check.push_str(NONCE_LOOKUP);
        check.push(')');
    }
    script.push(&check);
    script.bind(i64::try_from(head.0).map_err(|_| decode_error("checking a batch's basis", "seq"))?)?;
    script.bind(head.1.to_vec())?;
    script.bind(i64::from(fee_bps))?;
    if !ids.is_empty() {
        for _ in 0..2 {
            bind_ids(&mut script, ids)?;
            script.bind_nulls(padded_rows(ids.len()) - ids.len())?;
        }
    }
    if !nonces.is_empty() {
        bind_nonce_keys(&mut script, nonces.iter().map(|(_, nonce)| nonce))?;
        script.bind_nulls((padded_rows(nonces.len()) - nonces.len()) * NONCE_KEY_WIDTH)?;
    }
    script.push("DELETE FROM temp.ledger_basis");
    Ok(script)
}

async fn execute_on(
    connection: &mut AnyConnection,
    cache: &mut AccountCache,
    batch: &Batch<'_>,
) -> Result<(Vec<engine::Outcome>, Basis), LedgerQueryError> {
    let Batch { commands, nonces, now, purge, escrow_ids, unbonding_ids, ids } = *batch;
    let started = Instant::now();
    let mut read = read_script(escrow_ids, unbonding_ids, ids, nonces)?;
    let full = std::mem::take(&mut read.full);
    let mut rows = read.run(connection, "reading a ledger batch").await?;
    rows.extend(Script::run_full(full, connection, "reading a ledger batch").await?);
    let (head, loaded, recorded) = loaded_from(&rows)?;
    let fee_bps = loaded.fee_bps;
    let (replayed, fresh) = replayed_commands(nonces, &recorded);
    let running = batch.running(&replayed);
    cache.validate(head);
    let account_ids = account_ids_of(&running, &loaded.escrows, &loaded.unbondings);
    let missing: BTreeSet<AccountId> = account_ids.iter().filter(|id| !cache.contains(id)).cloned().collect();
    if !missing.is_empty() {
        for account in accounts_in(connection, &missing).await? {
            cache.insert(account);
        }
    }
    let read_done = started.elapsed();

    let (ran, effects) = run_batch(head, cache, &account_ids, loaded, &running, now);
    let outcomes = merged_outcomes(commands.len(), &replayed, ran)?;
    let decided = started.elapsed();
    let mut write = Script::new();
    write_into(&mut write, &effects, &fresh, purge.then_some(now))?;
    Script::run_full(std::mem::take(&mut write.full), connection, "writing a ledger batch").await?;
    write.run(connection, "writing a ledger batch").await?;
    cache.committed(&effects.books.accounts, effects.books.head);
    tracing::trace!(
        commands = commands.len(),
        transfers = effects.books.transfers.len(),
        replayed = replayed.len(),
        missing_accounts = missing.len(),
        read_us = read_done.as_micros() as u64,
        decided_us = decided.as_micros() as u64,
        committed_us = started.elapsed().as_micros() as u64,
        "sqlite ledger batch"
    );
    Ok((outcomes, (effects.books.head, fee_bps)))
}

/// Statements with `?` parameters, and the values for them in order; statements of a
/// full [`ROWS_PER_STATEMENT`] rows go to `full` instead, one each (see the module's text).
struct Script {
    sql: String,
    args: AnyArguments<'static>,
    full: Vec<Script>,
    /// Whether values go to the last of `full`.
    in_full: bool,
}

impl Script {
    fn new() -> Script {
        Script { sql: String::new(), args: AnyArguments::default(), full: Vec::new(), in_full: false }
    }

    /// Appends a statement without parameters.
    fn push(&mut self, statement: &str) {
        self.in_full = false;
        self.sql.push_str(statement);
        self.sql.push_str(";\n");
    }

    /// The script that takes a statement of `rows` rows.
    fn target(&mut self, rows: usize) -> &mut Script {
        self.in_full = rows == ROWS_PER_STATEMENT;
        if self.in_full {
            self.full.push(Script::new());
            return self.full.last_mut().unwrap_or_else(|| unreachable!("just pushed"));
        }
        self
    }

    /// Appends the statement `head`, a [`padded_list`] of `rows` rows of `width`, `tail`;
    /// `bind` binds the rows, then the padding's NULLs are bound.
    fn rows(
        &mut self,
        head: &str,
        rows: usize,
        width: usize,
        tail: &str,
        bind: impl FnOnce(&mut Script) -> Result<(), LedgerQueryError>,
    ) -> Result<(), LedgerQueryError> {
        let padded = padded_rows(rows);
        let script = self.target(padded);
        script.sql.push_str(head);
        padded_list(&mut script.sql, rows, width);
        script.sql.push_str(tail);
        script.sql.push_str(";\n");
        bind(self)?;
        self.bind_nulls((padded - rows) * width)
    }

    /// Appends an insert of `rows` rows of `width` columns, padded: `{insert} SELECT *
    /// FROM (VALUES …) WHERE column1 IS NOT NULL{conflict}`, which skips the padding.
    /// `insert` ends with the column list, which the rows follow in order.
    fn insert_rows(
        &mut self,
        insert: &str,
        rows: usize,
        width: usize,
        conflict: &str,
        bind: impl FnOnce(&mut Script) -> Result<(), LedgerQueryError>,
    ) -> Result<(), LedgerQueryError> {
        let head = format!("{insert} SELECT * FROM (VALUES");
        self.rows(&head, rows, width, &format!(") WHERE column1 IS NOT NULL{conflict}"), bind)
    }

    /// Appends `SELECT {part} AS part, {columns} FROM {table} WHERE id IN (?, …)` for
    /// every chunk of `ids`, binding them.
    fn select_in(&mut self, part: i64, columns: &str, table: &str, ids: &[TransferId]) -> Result<(), LedgerQueryError> {
        let head = format!("SELECT {part} AS part, {columns} FROM {table} WHERE id IN (");
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            self.rows(&head, chunk.len(), 1, ")", |script| bind_ids(script, chunk))?;
        }
        Ok(())
    }

    fn bind_nulls(&mut self, count: usize) -> Result<(), LedgerQueryError> {
        (0..count).try_for_each(|_| self.bind(None::<String>))
    }

    fn bind<T: Encode<'static, Any> + Type<Any> + 'static>(&mut self, value: T) -> Result<(), LedgerQueryError> {
        let args = match self.full.last_mut() {
            Some(full) if self.in_full => &mut full.args,
            _ => &mut self.args,
        };
        args.add(value).map_err(|source| query_error("binding a ledger batch")(sqlx::Error::Encode(source)))
    }

    /// Binds a transfer's spec as its columns `id` to `flags` are stored, in that order.
    fn bind_spec(&mut self, spec: &TransferSpec) -> Result<(), LedgerQueryError> {
        self.bind(spec.id.as_str().to_owned())?;
        self.bind(spec.debit.as_str().to_owned())?;
        self.bind(spec.credit.as_str().to_owned())?;
        self.bind(spec.amount.to_db())?;
        self.bind(spec.kind.as_str())?;
        self.bind(spec.pending_id.as_ref().map(|id| id.as_str().to_owned()))?;
        self.bind(spec.purpose.as_str())?;
        self.bind(spec.flags.0 as i64)
    }

    /// Runs the statements of `full`, each prepared once per connection; their rows.
    async fn run_full(
        full: Vec<Script>,
        connection: &mut AnyConnection,
        operation: &'static str,
    ) -> Result<Vec<AnyRow>, LedgerQueryError> {
        let mut rows = Vec::new();
        for script in full {
            rows.extend(
                sqlx::query_with(&script.sql, script.args)
                    .fetch_all(&mut *connection)
                    .await
                    .map_err(query_error(operation))?,
            );
        }
        Ok(rows)
    }

    /// Runs the script's own statements, prepared once per connection; their rows.
    async fn run(
        self,
        connection: &mut AnyConnection,
        operation: &'static str,
    ) -> Result<Vec<AnyRow>, LedgerQueryError> {
        sqlx::query_with(&self.sql, self.args).fetch_all(&mut *connection).await.map_err(query_error(operation))
    }
}

/// The commands (by index) whose nonce is recorded or repeats one earlier in the batch,
/// and the nonces to record.
fn replayed_commands<'a>(
    nonces: &'a [(usize, RequestNonce)],
    recorded: &RecordedNonces,
) -> (HashSet<usize>, Vec<&'a RequestNonce>) {
    let mut replayed = HashSet::new();
    let mut fresh = Vec::with_capacity(nonces.len());
    let mut seen = HashSet::with_capacity(nonces.len());
    for (index, nonce) in nonces {
        let key = nonce.stored_key();
        if recorded.contains(&key) || !seen.insert(key) {
            replayed.insert(*index);
        } else {
            fresh.push(nonce);
        }
    }
    (replayed, fresh)
}

fn read_script(
    escrow_ids: &[TransferId],
    unbonding_ids: &[TransferId],
    ids: &[TransferId],
    nonces: &[(usize, RequestNonce)],
) -> Result<Script, LedgerQueryError> {
    let mut script = Script::new();
    script.push("BEGIN IMMEDIATE");
    script.push(&format!("SELECT {PART_HEAD} AS part, seq, hash, fee_bps FROM ledger_head WHERE id = 1"));
    script.select_in(PART_ESCROW, ESCROW_COLUMNS, "ledger_escrows", escrow_ids)?;
    script.select_in(PART_UNBONDING, unbonding_columns!(), "ledger_unbondings", unbonding_ids)?;
    script.select_in(PART_TRANSFER, transfer_columns!(), "ledger_transfers", ids)?;
    script.select_in(
        PART_REJECTION,
        "id, debit_account, credit_account, amount, kind, pending_id, purpose, flags, code",
        "ledger_rejections",
        ids,
    )?;
    for chunk in nonces.chunks(ROWS_PER_STATEMENT) {
        let head = format!("SELECT {PART_NONCE} AS part, n.agent_id, n.nonce, n.expires_at_ms FROM (VALUES");
        script.rows(&head, chunk.len(), NONCE_KEY_WIDTH, NONCE_LOOKUP, |script| {
            bind_nonce_keys(script, chunk.iter().map(|(_, nonce)| nonce))
        })?;
    }
    Ok(script)
}

/// The head and what the read script found (the fee with it), and the recorded nonces as
/// (agent, nonce).
fn loaded_from(rows: &[AnyRow]) -> Result<(Head, Loaded, RecordedNonces), LedgerQueryError> {
    let operation = "reading a ledger batch";
    let read = query_error(operation);
    let mut head = None;
    let mut loaded = Loaded { fee_bps: 0, escrows: Vec::new(), unbondings: Vec::new(), known: Vec::new() };
    let mut recorded = HashSet::new();
    for row in rows {
        match row.try_get::<i64, _>("part").map_err(read)? {
            PART_HEAD => {
                let seq: i64 = row.try_get("seq").map_err(read)?;
                let hash: Vec<u8> = row.try_get("hash").map_err(read)?;
                let fee: i64 = row.try_get("fee_bps").map_err(read)?;
                head = Some((
                    (
                        u64::try_from(seq).map_err(|_| decode_error(operation, "seq"))?,
                        hash.try_into().map_err(|_| decode_error(operation, "hash"))?,
                    ),
                    u32::try_from(fee).map_err(|_| decode_error(operation, "fee"))?,
                ));
            }
            PART_ESCROW => loaded.escrows.push(escrow_from_row(row)?),
            PART_UNBONDING => loaded.unbondings.push(unbonding_from_row(row)?),
            PART_TRANSFER => {
                let transfer = transfer_from_row(row)?;
                loaded.known.push((transfer.spec.id.clone(), Known::Applied(transfer)));
            }
            PART_REJECTION => {
                let spec = spec_from_row(row, "reading rejections")?;
                let code: String = row.try_get("code").map_err(read)?;
                let error = TransferError::from_code(&code).ok_or_else(|| decode_error(operation, "code"))?;
                loaded.known.push((spec.id.clone(), Known::Rejected(spec, error)));
            }
            PART_NONCE => {
                let agent = row.try_get("agent_id").map_err(read)?;
                recorded.insert((
                    agent,
                    row.try_get("nonce").map_err(read)?,
                    row.try_get("expires_at_ms").map_err(read)?,
                ));
            }
            _ => return Err(decode_error(operation, "part")),
        }
    }
    let (head, fee_bps) = head.ok_or_else(|| decode_error(operation, "journal head (missing)"))?;
    loaded.fee_bps = fee_bps;
    Ok((head, loaded, recorded))
}

/// Appends every write of the batch and `COMMIT`: `nonces` are recorded, and with
/// `purge_before` the nonces that expired before it are deleted first.
fn write_into(
    script: &mut Script,
    effects: &ViewEffects,
    nonces: &[&RequestNonce],
    purge_before: Option<UnixMillis>,
) -> Result<(), LedgerQueryError> {
    if let Some(now) = purge_before {
        script.push("DELETE FROM agent_request_nonces WHERE expires_at_ms < ?");
        script.bind(to_db(now))?;
    }
    // The read (or the basis check) found none of them recorded, under the write lock, so
    // the insert cannot conflict. Inserts end the transaction on a failed constraint
    // (`OR ROLLBACK`, as the batch is then dropped anyway), which spares SQLite a
    // statement journal.
    for chunk in nonces.chunks(ROWS_PER_STATEMENT) {
        script.insert_rows(
            "INSERT OR ROLLBACK INTO agent_request_nonces (agent_id, nonce, expires_at_ms)",
            chunk.len(),
            3,
            "",
            |script| {
                for nonce in chunk {
                    script.bind(nonce.agent.to_string())?;
                    script.bind(nonce.nonce.clone())?;
                    script.bind(to_db(nonce.expires_at))?;
                }
                Ok(())
            },
        )?;
    }
    for chunk in effects.books.transfers.chunks(ROWS_PER_STATEMENT) {
        let insert = concat!("INSERT OR ROLLBACK INTO ledger_transfers (", transfer_columns!(), ")");
        script.insert_rows(insert, chunk.len(), 13, "", |script| {
            for transfer in chunk {
                script.bind(to_db_position(transfer.seq))?;
                script.bind_spec(&transfer.spec)?;
                script.bind(to_db(transfer.created_at))?;
                script.bind(transfer.hash.to_vec())?;
                script.bind(to_db_position(transfer.debit_prev))?;
                script.bind(to_db_position(transfer.credit_prev))?;
            }
            Ok(())
        })?;
    }
    for chunk in effects.books.rejections.chunks(ROWS_PER_STATEMENT) {
        let insert = "INSERT OR ROLLBACK INTO ledger_rejections (id, debit_account, credit_account, amount, kind, \
                      pending_id, purpose, flags, code, created_at_ms)";
        script.insert_rows(insert, chunk.len(), 10, "", |script| {
            for rejection in chunk {
                script.bind_spec(&rejection.spec)?;
                script.bind(rejection.error.code())?;
                script.bind(to_db(rejection.created_at))?;
            }
            Ok(())
        })?;
    }
    // The rows exist and the batch holds the write lock: an upsert that always updates.
    for chunk in effects.books.accounts.chunks(ROWS_PER_STATEMENT) {
        script.insert_rows(
            "INSERT INTO ledger_accounts (id, kind, flags, debits_pending, debits_posted, credits_pending, \
             credits_posted, last_seq, created_at_ms)",
            chunk.len(),
            9,
            " ON CONFLICT (id) DO UPDATE SET debits_pending = excluded.debits_pending, \
             debits_posted = excluded.debits_posted, credits_pending = excluded.credits_pending, \
             credits_posted = excluded.credits_posted, last_seq = excluded.last_seq",
            |script| {
                for account in chunk {
                    script.bind(account.id.as_str().to_owned())?;
                    script.bind(account.id.kind_and_owner().0.as_str())?;
                    script.bind(account.flags.0 as i64)?;
                    script.bind(account.debits_pending.to_db())?;
                    script.bind(account.debits_posted.to_db())?;
                    script.bind(account.credits_pending.to_db())?;
                    script.bind(account.credits_posted.to_db())?;
                    script.bind(to_db_position(account.last_seq))?;
                    script.bind(0i64)?;
                }
                Ok(())
            },
        )?;
    }
    for chunk in effects.escrows.chunks(ROWS_PER_STATEMENT) {
        write_escrows(script, chunk)?;
    }
    for chunk in effects.unbondings.chunks(ROWS_PER_STATEMENT) {
        write_unbondings(script, chunk)?;
    }
    let (seq, hash) = effects.books.head;
    script.push("UPDATE ledger_head SET seq = ?, hash = ? WHERE id = 1");
    script.bind(i64::try_from(seq).map_err(|_| decode_error("writing the journal head", "seq"))?)?;
    script.bind(hash.to_vec())?;
    script.push("COMMIT");
    Ok(())
}

fn write_escrows(script: &mut Script, chunk: &[Escrow]) -> Result<(), LedgerQueryError> {
    script.insert_rows(
        &format!("INSERT INTO ledger_escrows ({ESCROW_COLUMNS})"),
        chunk.len(),
        10,
        " ON CONFLICT (id) DO UPDATE SET state = excluded.state, released = excluded.released, \
         updated_at_ms = excluded.updated_at_ms",
        |script| {
            for escrow in chunk {
                script.bind(escrow.id.as_str().to_owned())?;
                script.bind(escrow.payer.as_str().to_owned())?;
                script.bind(escrow.payee.as_str().to_owned())?;
                script.bind(escrow.amount.to_db())?;
                script.bind(escrow.state.as_str())?;
                script.bind(escrow.on_expiry.as_str())?;
                script.bind(to_db(escrow.expires_at))?;
                script.bind(escrow.released.to_db())?;
                script.bind(to_db(escrow.created_at))?;
                script.bind(to_db(escrow.updated_at))?;
            }
            Ok(())
        },
    )
}

fn write_unbondings(script: &mut Script, chunk: &[Unbonding]) -> Result<(), LedgerQueryError> {
    script.insert_rows(
        concat!("INSERT INTO ledger_unbondings (", unbonding_columns!(), ")"),
        chunk.len(),
        7,
        " ON CONFLICT (id) DO UPDATE SET state = excluded.state",
        |script| {
            for unbonding in chunk {
                script.bind(unbonding.id.as_str().to_owned())?;
                script.bind(unbonding.owner.to_string())?;
                script.bind(unbonding.kind.as_str())?;
                script.bind(unbonding.amount.to_db())?;
                script.bind(to_db(unbonding.matures_at))?;
                script.bind(unbonding.state.as_str())?;
                script.bind(to_db(unbonding.created_at))?;
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ids(n: usize) -> Vec<TransferId> {
        (0..n).map(|i| TransferId::from_stored(format!("t{i}"))).collect()
    }

    #[test]
    fn a_read_script_has_one_statement_per_part_and_chunk_and_binds_every_id() {
        let script = read_script(&ids(2), &[], &ids(ROWS_PER_STATEMENT + 1), &[]).unwrap();
        let statements: Vec<&str> = script.sql.split(";\n").filter(|s| !s.is_empty()).collect();
        // begin, head, one escrow statement, the last chunk each of transfers and rejections
        assert_eq!(statements.len(), 5, "{}", script.sql);
        assert_eq!(script.sql.matches('?').count(), 2 + 2);
        assert_eq!(script.args.len(), 2 + 2);
        // the full chunks: one statement each, of the same text every time
        assert_eq!(script.full.len(), 2);
        for full in &script.full {
            assert_eq!(full.sql.matches(";\n").count(), 1);
            assert_eq!(full.sql.matches('?').count(), ROWS_PER_STATEMENT);
            assert_eq!(full.args.len(), ROWS_PER_STATEMENT);
        }
        let again = read_script(&[], &[], &ids(ROWS_PER_STATEMENT), &[]).unwrap();
        assert_eq!(
            again.full.iter().map(|s| &s.sql).collect::<Vec<_>>(),
            script.full.iter().map(|s| &s.sql).collect::<Vec<_>>()
        );
    }

    fn nonces(n: usize) -> Vec<(usize, RequestNonce)> {
        let key = molt_protocol::keys::SigningKey::generate(&mut rand::rngs::OsRng);
        let agent = molt_protocol::AgentId::from_inception_key(&key.public_key());
        (0..n).map(|i| (i, RequestNonce { agent, nonce: format!("n{i}"), expires_at: UnixMillis(1) })).collect()
    }

    #[test]
    fn statements_are_padded_to_a_few_sizes_and_every_mark_is_bound() {
        let sizes = [1, 2, 3, 5, 9, 17, 25, 200, 385, 499, ROWS_PER_STATEMENT];
        assert_eq!(sizes.map(padded_rows), [1, 2, 4, 8, 16, 24, 32, 256, 500, 500, 500]);
        let head = (7, [1; 32]);
        for (n, same, other) in [(17, 24, 25), (3, 4, 5), (97, 128, 129)] {
            let read = |n| read_script(&ids(n), &[], &ids(n), &nonces(n)).unwrap();
            let check = |n| basis_check(head, 0, &ids(n), &nonces(n)).unwrap();
            for script in [read(n), check(n)] {
                assert_eq!(script.sql.matches('?').count(), script.args.len(), "{}", script.sql);
            }
            assert_eq!(read(n).sql, read(same).sql);
            assert_ne!(read(n).sql, read(other).sql);
            assert_eq!(check(n).sql, check(same).sql);
            assert_ne!(check(n).sql, check(other).sql);
        }
    }

    /// A sync that fails is reported as an unsynced commit (never retried, never split
    /// into its jobs), and covers nothing. A pipe cannot be synced: `fdatasync` refuses it.
    #[tokio::test]
    async fn a_failed_sync_reports_an_unsynced_commit_and_covers_nothing() {
        let (reader, _writer) = std::io::pipe().unwrap();
        let log = Arc::new(LogSync::new(std::fs::File::from(std::os::fd::OwnedFd::from(reader))));
        let number = log.committed();
        let error = log.durable(number).await.unwrap_err();
        assert!(error.is_unsynced_commit(), "{error:?}");
        assert!(!error.is_retryable());
        assert_eq!(log.synced(), (0, 0));

        let file = tempfile::NamedTempFile::new().unwrap();
        let log = Arc::new(LogSync::new(file.reopen().unwrap()));
        let (first, second) = (log.committed(), log.committed());
        log.durable(first).await.unwrap();
        assert_eq!(log.synced(), (1, second), "one sync covers every commit before it began");
        log.durable(second).await.unwrap();
        assert_eq!(log.synced(), (1, second));
    }

    /// A commit need not wait for a sync already under way to end (it begins its own),
    /// but no more than [`LOG_SYNCS_IN_FLIGHT_MAX`] syncs run at once.
    #[tokio::test]
    async fn a_sync_under_way_does_not_hold_back_the_next_but_syncs_in_flight_are_bounded() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let log = Arc::new(LogSync::new(file.reopen().unwrap()));
        // Syncs under way, all but one of the permits.
        let under_way = log.in_flight.acquire_many(LOG_SYNCS_IN_FLIGHT_MAX as u32 - 1).await.unwrap();
        let first = log.committed();
        let wait = Duration::from_secs(10);
        tokio::time::timeout(wait, log.durable(first)).await.expect("a free slot syncs at once").unwrap();
        assert_eq!(log.synced(), (1, first));

        // Every slot taken: the next commit waits until one is free, then syncs.
        let last = log.in_flight.acquire().await.unwrap();
        let second = log.committed();
        let durable = tokio::spawn({
            let log = Arc::clone(&log);
            async move { log.durable(second).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!durable.is_finished(), "a sync began beyond the bound");
        assert_eq!(log.synced(), (1, first));
        drop(last);
        tokio::time::timeout(wait, durable).await.expect("a freed slot syncs").unwrap().unwrap();
        assert_eq!(log.synced(), (2, second));
        drop(under_way);
    }

    #[test]
    fn an_empty_batch_reads_only_the_head() {
        let script = read_script(&[], &[], &[], &[]).unwrap();
        assert_eq!(script.sql.matches(";\n").count(), 2);
        assert!(script.sql.contains("ledger_head"));
    }
}
