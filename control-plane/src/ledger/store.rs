//! Persistence: loads what a batch of commands needs and writes its effects, in one
//! transaction; plus the reads the API and the audit use.
//!
//! **Locking.** A batch's first locking statement takes the journal head: `SELECT … FOR
//! UPDATE` of the head row on PostgreSQL; on SQLite its `BEGIN IMMEDIATE` takes the
//! database's single write lock at once (a transaction that read first could fail to
//! upgrade; see [`super::sqlite`]). Every ledger writer in every process takes the head
//! before it writes an account total, so writers are serialised by that one lock and
//! cannot deadlock; the
//! account updates lock their rows as they write them. The head lock also
//! gives the journal its one order. Serialization and deadlock failures, and SQLite's
//! busy errors, are retried by [`super::service::Ledger`] a bounded number of times with
//! a new transaction.
//!
//! **Reads.** A batch reads the escrows and unbondings it names, the account totals its
//! [`AccountCache`] does not hold (the cache is checked against the stored head first,
//! see [`super::cache`]), and which of its transfer ids are already known (applied or
//! refused). On SQLite it reads under the lock. On PostgreSQL it reads and runs before
//! the lock, while the previous batch is written, and under the lock checks that nothing
//! else was written since, or reads and runs again ([`super::postgres`]).
//!
//! **Hot accounts.** A batch applies its transfers in memory and writes each account row
//! once with its final totals, so a thousand transfers into the treasury in one batch
//! cost one row update.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use molt_protocol::{AgentId, UnixMillis};
use sqlx::any::AnyRow;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Any, Row as _, Transaction};
use tokio::sync::{Mutex, OnceCell};

use super::books::{Books, Known, TransferError};
use super::cache::{AccountCache, Head};
use super::engine::{self, Command, View, ViewEffects};
use super::escrow::{Escrow, EscrowState, OnExpiry};
use super::journal::{AuditReport, Auditor};
use super::postgres::OnDecided;
use super::stake::{Unbonding, UnbondingState};
use super::types::{
    Account, AccountFlags, AccountId, Credits, Purpose, StakeKind, Transfer, TransferFlags, TransferId, TransferKind,
    TransferSpec,
};
use crate::agent_auth::RequestNonce;
use crate::db::{Backend, Database};

/// Rows per multi-row statement (every backend accepts this many bound values).
pub const ROWS_PER_STATEMENT: usize = 500;
/// Journal entries read per query by the audit.
pub const AUDIT_PAGE_ROWS: i64 = 10_000;

/// A ledger query failed; `operation` names it.
#[derive(Debug, thiserror::Error)]
#[error("ledger query failed while {operation}")]
pub struct LedgerQueryError {
    operation: &'static str,
    #[source]
    source: sqlx::Error,
}

impl LedgerQueryError {
    /// The SQLite writer's basis check failed ([`super::sqlite`]): its constraint
    /// `basis_holds` refused the row.
    pub fn is_basis_moved(&self) -> bool {
        matches!(&self.source, sqlx::Error::Database(error) if error.message().contains("basis_holds"))
    }

    /// The SQLite writer committed but could not sync its log ([`super::sqlite::LogSync`]):
    /// the batch may be stored, it is not known to be durable, and must not run again.
    pub fn is_unsynced_commit(&self) -> bool {
        self.operation == super::sqlite::LOG_SYNC_OPERATION
    }

    /// A serialization failure, a deadlock or a busy database: worth running again.
    pub fn is_retryable(&self) -> bool {
        let sqlx::Error::Database(error) = &self.source else { return false };
        match error.code().as_deref() {
            // PostgreSQL: serialization_failure, deadlock_detected, lock_not_available.
            Some("40001" | "40P01" | "55P03") => true,
            // SQLite: SQLITE_BUSY and its extended codes, SQLITE_LOCKED.
            Some(code) => code == "5" || code == "6" || code.parse::<u32>().is_ok_and(|c| c & 0xff == 5),
            None => false,
        }
    }
}

pub(crate) fn query_error(operation: &'static str) -> impl Fn(sqlx::Error) -> LedgerQueryError + Copy {
    move |source| LedgerQueryError { operation, source }
}

pub(crate) fn decode_error(operation: &'static str, what: &str) -> LedgerQueryError {
    LedgerQueryError { operation, source: sqlx::Error::Decode(format!("bad stored {what}").into()) }
}

type Tx = Transaction<'static, Any>;

/// Runs ledger batches: one transaction each, with the writer's [`AccountCache`]. On
/// PostgreSQL through a pool of native connections opened beside the [`Database`]'s own
/// (array parameters, see [`super::postgres`]); on SQLite through the shared pool.
#[derive(Debug)]
pub struct BatchStore {
    db: Database,
    postgres: OnceCell<PgPool>,
    pipeline: super::postgres::Pipeline,
    /// SQLite's writer: its cache and connection (PostgreSQL's are in the pipeline).
    sqlite: Mutex<super::sqlite::Writer>,
}

impl BatchStore {
    pub fn new(db: Database) -> BatchStore {
        BatchStore {
            db,
            postgres: OnceCell::new(),
            pipeline: super::postgres::Pipeline::new(),
            sqlite: Mutex::default(),
        }
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    /// How many SQLite batches were written on their basis, without reading first
    /// ([`super::sqlite`]); 0 on PostgreSQL.
    pub async fn sqlite_batches_on_basis(&self) -> u64 {
        self.sqlite.lock().await.batches_on_basis()
    }

    /// The SQLite writer's log sync, once it has a connection to a write-ahead log
    /// ([`super::sqlite::LogSync`]).
    pub async fn sqlite_log_sync(&self) -> Option<Arc<super::sqlite::LogSync>> {
        self.sqlite.lock().await.log_sync()
    }

    /// The PostgreSQL pipeline (unused on SQLite).
    pub fn pipeline(&self) -> &super::postgres::Pipeline {
        &self.pipeline
    }

    /// Runs `commands` in one transaction, commits, and returns the outcomes. On SQLite
    /// the batches of one process run one at a time (they would queue on the database's
    /// write lock anyway); on PostgreSQL one is prepared while another is written
    /// ([`super::postgres`]).
    pub async fn execute(
        &self,
        commands: &[Command],
        now: UnixMillis,
    ) -> Result<Vec<engine::Outcome>, LedgerQueryError> {
        self.run(commands, &[], now, async {}, Box::new(|| {})).await
    }

    /// [`BatchStore::execute`], calling `on_decided` once the batch has settled what it
    /// writes (on SQLite, at once): a writer collects the next batch from then on.
    pub async fn execute_then(
        &self,
        commands: &[Command],
        now: UnixMillis,
        on_decided: OnDecided,
    ) -> Result<Vec<engine::Outcome>, LedgerQueryError> {
        self.run(commands, &[], now, async {}, on_decided).await
    }

    /// [`BatchStore::execute_then`] where some commands come from signed requests:
    /// `nonces` pairs a command's index with its request's nonce. The transaction records
    /// each nonce not yet recorded (or expired) and runs its command; a command whose nonce
    /// is recorded, or appears earlier in the batch, does not run and gets
    /// [`engine::Outcome::Replayed`]. SQLite only (on PostgreSQL nonces are recorded
    /// before, [`super::service::Ledger::execute_signed`]): there `nonces` must be empty.
    pub async fn execute_signed_then(
        &self,
        commands: &[Command],
        nonces: &[(usize, RequestNonce)],
        now: UnixMillis,
        on_decided: OnDecided,
    ) -> Result<Vec<engine::Outcome>, LedgerQueryError> {
        self.run(commands, nonces, now, async {}, on_decided).await
    }

    /// [`BatchStore::execute`]; on PostgreSQL, runs `pause` between preparing the batch
    /// and taking the head lock (tests write from another replica there).
    #[doc(hidden)]
    pub async fn execute_pausing(
        &self,
        commands: &[Command],
        now: UnixMillis,
        pause: impl std::future::Future<Output = ()>,
    ) -> Result<Vec<engine::Outcome>, LedgerQueryError> {
        self.run(commands, &[], now, pause, Box::new(|| {})).await
    }

    async fn run(
        &self,
        commands: &[Command],
        nonces: &[(usize, RequestNonce)],
        now: UnixMillis,
        pause: impl std::future::Future<Output = ()>,
        on_decided: OnDecided,
    ) -> Result<Vec<engine::Outcome>, LedgerQueryError> {
        match self.db.backend() {
            Backend::Postgres if !nonces.is_empty() => Err(query_error("running signed commands")(
                sqlx::Error::Configuration("request nonces are recorded with ledger batches on SQLite only".into()),
            )),
            Backend::Postgres => {
                let pool = self.postgres.get_or_try_init(|| super::postgres::connect(&self.db)).await?;
                super::postgres::execute(pool, &self.pipeline, commands, now, pause, on_decided).await
            }
            Backend::Sqlite => {
                let mut writer = self.sqlite.lock().await;
                let (outcomes, commit) = writer.execute(&self.db, commands, nonces, now).await?;
                drop(writer);
                // The next batch runs while this one's commit is synced.
                on_decided();
                if let Some((log, number)) = commit {
                    log.durable(number).await?;
                }
                Ok(outcomes)
            }
        }
    }
}

/// What a batch reads under the head lock besides account totals.
pub(crate) struct Loaded {
    pub fee_bps: u32,
    pub escrows: Vec<Escrow>,
    pub unbondings: Vec<Unbonding>,
    pub known: Vec<(TransferId, Known)>,
}

/// Every account the commands may touch (the treasury always: fees).
pub(crate) fn account_ids_of(
    commands: &[Command],
    escrows: &[Escrow],
    unbondings: &[Unbonding],
) -> BTreeSet<AccountId> {
    let escrow_accounts: HashMap<&TransferId, (&AccountId, &AccountId)> =
        escrows.iter().map(|e| (&e.id, (&e.payer, &e.payee))).collect();
    let unbonding_owners: HashMap<&TransferId, (AgentId, StakeKind)> =
        unbondings.iter().map(|u| (&u.id, (u.owner, u.kind))).collect();
    let mut account_ids = BTreeSet::from([AccountId::treasury()]);
    for command in commands {
        engine::accounts_of(
            command,
            |id| escrow_accounts.get(id).map(|(payer, payee)| ((*payer).clone(), (*payee).clone())),
            |id| unbonding_owners.get(id).copied(),
            &mut account_ids,
        );
    }
    account_ids
}

/// Runs the commands against the head, the cached totals and what was loaded.
pub(crate) fn run_batch(
    head: Head,
    cache: &AccountCache,
    account_ids: &BTreeSet<AccountId>,
    loaded: Loaded,
    commands: &[Command],
    now: UnixMillis,
) -> (Vec<engine::Outcome>, ViewEffects) {
    let mut books = Books::new(head.0, head.1, loaded.fee_bps, now);
    for id in account_ids {
        if let Some(account) = cache.get(id) {
            books.insert_account(account.clone());
        }
    }
    for (id, known) in loaded.known {
        books.insert_known(id, known);
    }
    let mut view = View::new(books);
    for escrow in loaded.escrows {
        view.insert_escrow(escrow);
    }
    for unbonding in loaded.unbondings {
        view.insert_unbonding(unbonding);
    }
    let outcomes = view.run(commands);
    (outcomes, view.into_effects())
}

/// Creates the accounts if missing (their own transaction per statement, before any
/// batch uses them; ids in order, so concurrent calls cannot deadlock on each other).
pub async fn ensure_accounts(db: &Database, ids: &[AccountId], now: UnixMillis) -> Result<(), LedgerQueryError> {
    let mut sorted: Vec<&AccountId> = ids.iter().collect();
    sorted.sort();
    sorted.dedup();
    for chunk in fixed_chunks(&sorted) {
        let sql = format!(
            "INSERT INTO ledger_accounts (id, kind, owner, flags, debits_pending, debits_posted, credits_pending, \
             credits_posted, created_at_ms) VALUES {} ON CONFLICT (id) DO NOTHING",
            rows_placeholders(db.backend() == Backend::Sqlite, chunk.len(), 9)
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            let (kind, owner) = id.kind_and_owner();
            query = query
                .bind(id.as_str().to_owned())
                .bind(kind.as_str())
                .bind(owner.map(|agent| agent.to_string()))
                .bind(AccountFlags::for_kind(kind).0 as i64)
                .bind(0i64)
                .bind(0i64)
                .bind(0i64)
                .bind(0i64)
                .bind(to_db(now));
        }
        query.execute(db.pool()).await.map_err(query_error("creating accounts"))?;
    }
    Ok(())
}

/// One account, if it exists.
pub async fn account(db: &Database, id: &AccountId) -> Result<Option<Account>, LedgerQueryError> {
    let mut connection = db.pool().acquire().await.map_err(query_error("reading an account"))?;
    Ok(accounts_in(&mut connection, &BTreeSet::from([id.clone()])).await?.pop())
}

/// The accounts owned by `agent` (wallet, stakes, unbondings), by id.
pub async fn accounts_of_owner(db: &Database, agent: AgentId) -> Result<Vec<Account>, LedgerQueryError> {
    let rows =
        sqlx::query(concat!("SELECT ", account_columns!(), " FROM ledger_accounts WHERE owner = $1 ORDER BY id"))
            .bind(agent.to_string())
            .fetch_all(db.pool())
            .await
            .map_err(query_error("reading accounts"))?;
    rows.iter().map(account_from_row).collect()
}

/// Journal entries touching `account`, newest first, older than `before`; `None` when
/// `before` is not the position of one of the account's own entries.
///
/// An account's entries are linked newest to oldest: the account's `last_seq`, then each
/// entry's `debit_prev` or `credit_prev`. A page is therefore `limit` primary-key lookups
/// whatever the journal's size, and the journal carries no per-account index, which would
/// cost every batch two random index insertions an entry. `before` is a previous page's
/// `next_before`, the position of the last entry it showed; any other position has no
/// link to follow and is refused rather than searched for.
pub async fn history(
    db: &Database,
    account: &AccountId,
    before: Option<u64>,
    limit: u32,
) -> Result<Option<Vec<Transfer>>, LedgerQueryError> {
    let operation = "reading account history";
    let start = match before {
        None => sqlx::query_scalar::<_, i64>("SELECT last_seq FROM ledger_accounts WHERE id = $1")
            .bind(account.as_str().to_owned())
            .fetch_optional(db.pool())
            .await
            .map_err(query_error(operation))?
            .unwrap_or(0),
        Some(before) => {
            let link = sqlx::query_scalar::<_, Option<i64>>(
                "SELECT CASE WHEN debit_account = $1 THEN debit_prev WHEN credit_account = $1 THEN credit_prev END \
                 FROM ledger_transfers WHERE seq = $2",
            )
            .bind(account.as_str().to_owned())
            .bind(to_db_position(before))
            .fetch_optional(db.pool())
            .await
            .map_err(query_error(operation))?;
            match link.flatten() {
                Some(previous) => previous,
                None => return Ok(None),
            }
        }
    };
    let rows = sqlx::query(concat!(
        "WITH RECURSIVE chain (at, depth) AS (\
             SELECT CAST($2 AS BIGINT), 1 \
             UNION ALL \
             SELECT CASE WHEN t.debit_account = $1 THEN t.debit_prev ELSE t.credit_prev END, chain.depth + 1 \
             FROM chain JOIN ledger_transfers AS t ON t.seq = chain.at WHERE chain.depth < $3) \
         SELECT ",
        transfer_columns!(),
        " FROM chain JOIN ledger_transfers ON ledger_transfers.seq = chain.at ORDER BY seq DESC"
    ))
    .bind(account.as_str().to_owned())
    .bind(start)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(query_error(operation))?;
    rows.iter().map(transfer_from_row).collect::<Result<_, _>>().map(Some)
}

/// What is known about a transfer id: applied or remembered as refused.
pub async fn transfer(db: &Database, id: &TransferId) -> Result<Option<Known>, LedgerQueryError> {
    let mut connection = db.pool().acquire().await.map_err(query_error("reading a transfer"))?;
    Ok(known_ids_on(&mut connection, std::slice::from_ref(id)).await?.pop().map(|(_, known)| known))
}

pub async fn escrow(db: &Database, id: &TransferId) -> Result<Option<Escrow>, LedgerQueryError> {
    let mut connection = db.pool().acquire().await.map_err(query_error("reading an escrow"))?;
    Ok(escrows(&mut connection, std::slice::from_ref(id)).await?.pop())
}

/// Unbondings of `agent`, newest first (at most 1000).
pub async fn unbondings_of(db: &Database, agent: AgentId) -> Result<Vec<Unbonding>, LedgerQueryError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        unbonding_columns!(),
        " FROM ledger_unbondings WHERE owner = $1 ORDER BY created_at_ms DESC, id LIMIT 1000"
    ))
    .bind(agent.to_string())
    .fetch_all(db.pool())
    .await
    .map_err(query_error("reading unbondings"))?;
    rows.iter().map(unbonding_from_row).collect()
}

/// Ids of escrows past their expiry and not disputed or resolved, oldest first.
pub async fn due_escrows(db: &Database, now: UnixMillis, limit: u32) -> Result<Vec<TransferId>, LedgerQueryError> {
    let rows = sqlx::query(
        "SELECT id FROM ledger_escrows WHERE state = 'locked' AND expires_at_ms <= $1 ORDER BY expires_at_ms LIMIT $2",
    )
    .bind(to_db(now))
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(query_error("finding expired escrows"))?;
    rows.iter()
        .map(|row| row.try_get::<String, _>("id").map(TransferId::from_stored))
        .collect::<Result<_, _>>()
        .map_err(query_error("reading expired escrows"))
}

/// Ids of unbondings that have matured, oldest first.
pub async fn due_unbondings(db: &Database, now: UnixMillis, limit: u32) -> Result<Vec<TransferId>, LedgerQueryError> {
    let rows = sqlx::query(
        "SELECT id FROM ledger_unbondings WHERE state = 'unbonding' AND matures_at_ms <= $1 \
         ORDER BY matures_at_ms LIMIT $2",
    )
    .bind(to_db(now))
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await
    .map_err(query_error("finding matured unbondings"))?;
    rows.iter()
        .map(|row| row.try_get::<String, _>("id").map(TransferId::from_stored))
        .collect::<Result<_, _>>()
        .map_err(query_error("reading matured unbondings"))
}

/// Sets the transfer fee in basis points (0–10 000).
pub async fn set_fee_bps(db: &Database, fee_bps: u32) -> Result<(), LedgerQueryError> {
    sqlx::query("UPDATE ledger_head SET fee_bps = $1 WHERE id = 1")
        .bind(i64::from(fee_bps))
        .execute(db.pool())
        .await
        .map_err(query_error("setting the fee"))?;
    Ok(())
}

pub async fn fee_bps(db: &Database) -> Result<u32, LedgerQueryError> {
    let row = sqlx::query("SELECT fee_bps FROM ledger_head WHERE id = 1")
        .fetch_one(db.pool())
        .await
        .map_err(query_error("reading the fee"))?;
    let fee: i64 = row.try_get("fee_bps").map_err(query_error("reading the fee"))?;
    u32::try_from(fee).map_err(|_| decode_error("reading the fee", "fee"))
}

/// Replays the whole journal and checks it against the accounts and the head, in one
/// read transaction (a consistent snapshot on PostgreSQL; SQLite's WAL readers too).
pub async fn audit(db: &Database) -> Result<AuditReport, LedgerQueryError> {
    let mut tx = db.pool().begin().await.map_err(query_error("starting the audit"))?;
    if db.backend() == Backend::Postgres {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(query_error("starting the audit"))?;
    }
    let mut auditor = Auditor::new();
    let mut after = 0i64;
    loop {
        let rows = sqlx::query(concat!(
            "SELECT ",
            transfer_columns!(),
            " FROM ledger_transfers WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .bind(after)
        .bind(AUDIT_PAGE_ROWS)
        .fetch_all(&mut *tx)
        .await
        .map_err(query_error("reading the journal"))?;
        for row in &rows {
            auditor.push(&transfer_from_row(row)?);
        }
        match rows.last() {
            Some(row) => after = row.try_get("seq").map_err(query_error("reading the journal"))?,
            None => break,
        }
    }
    let accounts = sqlx::query(concat!("SELECT ", account_columns!(), " FROM ledger_accounts ORDER BY id"))
        .fetch_all(&mut *tx)
        .await
        .map_err(query_error("reading accounts"))?
        .iter()
        .map(account_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let (seq, hash, _) = head(&mut tx).await?;
    if auditor.head() != (seq, hash) {
        auditor.problem(format!("the stored head (entry {seq}) does not match the journal's last entry"));
    }
    tx.rollback().await.map_err(query_error("ending the audit"))?;
    Ok(auditor.finish(&accounts))
}

macro_rules! account_columns {
    () => {
        "id, flags, debits_pending, debits_posted, credits_pending, credits_posted, last_seq"
    };
}
pub(crate) use account_columns;

macro_rules! transfer_columns {
    () => {
        "seq, id, debit_account, credit_account, amount, kind, pending_id, purpose, flags, created_at_ms, hash, \
         debit_prev, credit_prev"
    };
}
pub(crate) use transfer_columns;

macro_rules! unbonding_columns {
    () => {
        "id, owner, stake_kind, amount, matures_at_ms, state, created_at_ms"
    };
}
pub(crate) use unbonding_columns;

pub(crate) const ESCROW_COLUMNS: &str =
    "id, payer, payee, amount, state, on_expiry, expires_at_ms, released, created_at_ms, updated_at_ms";

pub(crate) fn referenced_records(commands: &[Command]) -> (Vec<TransferId>, Vec<TransferId>) {
    let (mut escrow_ids, mut unbonding_ids) = (Vec::new(), Vec::new());
    for command in commands {
        match command {
            Command::CreateEscrow { spec, .. } => escrow_ids.push(spec.id.clone()),
            Command::Escrow { id, .. } => escrow_ids.push(id.clone()),
            Command::Unlock { spec, .. } => unbonding_ids.push(spec.id.clone()),
            Command::Mature { id } => unbonding_ids.push(id.clone()),
            Command::Transfers(_) => {}
        }
    }
    (escrow_ids, unbonding_ids)
}

pub(crate) fn spec_ids(command: &Command) -> Vec<TransferId> {
    match command {
        Command::Transfers(specs) => specs.iter().map(|spec| spec.id.clone()).collect(),
        Command::CreateEscrow { spec, .. } | Command::Unlock { spec, .. } => vec![spec.id.clone()],
        Command::Escrow { .. } | Command::Mature { .. } => Vec::new(),
    }
}

async fn head(tx: &mut Tx) -> Result<(u64, [u8; 32], u32), LedgerQueryError> {
    let operation = "reading the journal head";
    let row = sqlx::query("SELECT seq, hash, fee_bps FROM ledger_head WHERE id = 1")
        .fetch_one(&mut **tx)
        .await
        .map_err(query_error(operation))?;
    let seq: i64 = row.try_get("seq").map_err(query_error(operation))?;
    let hash: Vec<u8> = row.try_get("hash").map_err(query_error(operation))?;
    let fee: i64 = row.try_get("fee_bps").map_err(query_error(operation))?;
    Ok((
        u64::try_from(seq).map_err(|_| decode_error(operation, "seq"))?,
        hash.try_into().map_err(|_| decode_error(operation, "hash"))?,
        u32::try_from(fee).map_err(|_| decode_error(operation, "fee"))?,
    ))
}

pub(crate) async fn accounts_in(
    connection: &mut sqlx::AnyConnection,
    ids: &BTreeSet<AccountId>,
) -> Result<Vec<Account>, LedgerQueryError> {
    let ids: Vec<&AccountId> = ids.iter().collect();
    let mut accounts = Vec::with_capacity(ids.len());
    for chunk in fixed_chunks(&ids) {
        let sql = format!(
            "SELECT {} FROM ledger_accounts WHERE id IN ({})",
            account_columns!(),
            placeholders(anonymous(connection), 1, chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.as_str().to_owned());
        }
        for row in query.fetch_all(&mut *connection).await.map_err(query_error("reading accounts"))? {
            accounts.push(account_from_row(&row)?);
        }
    }
    Ok(accounts)
}

async fn known_ids_on(
    connection: &mut sqlx::AnyConnection,
    ids: &[TransferId],
) -> Result<Vec<(TransferId, Known)>, LedgerQueryError> {
    let mut known = Vec::new();
    for chunk in fixed_chunks(ids) {
        let list = placeholders(anonymous(connection), 1, chunk.len());
        let sql = format!("SELECT {} FROM ledger_transfers WHERE id IN ({list})", transfer_columns!());
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.as_str().to_owned());
        }
        for row in query.fetch_all(&mut *connection).await.map_err(query_error("reading transfers"))? {
            let transfer = transfer_from_row(&row)?;
            known.push((transfer.spec.id.clone(), Known::Applied(transfer)));
        }
        let sql = format!(
            "SELECT id, debit_account, credit_account, amount, kind, pending_id, purpose, flags, code \
             FROM ledger_rejections WHERE id IN ({list})"
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.as_str().to_owned());
        }
        for row in query.fetch_all(&mut *connection).await.map_err(query_error("reading rejections"))? {
            let spec = spec_from_row(&row, "reading rejections")?;
            let code: String = row.try_get("code").map_err(query_error("reading rejections"))?;
            let error = TransferError::from_code(&code).ok_or_else(|| decode_error("reading rejections", "code"))?;
            known.push((spec.id.clone(), Known::Rejected(spec, error)));
        }
    }
    Ok(known)
}

async fn escrows(connection: &mut sqlx::AnyConnection, ids: &[TransferId]) -> Result<Vec<Escrow>, LedgerQueryError> {
    let mut escrows = Vec::new();
    for chunk in fixed_chunks(ids) {
        let sql = format!(
            "SELECT {ESCROW_COLUMNS} FROM ledger_escrows WHERE id IN ({})",
            placeholders(anonymous(connection), 1, chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(id.as_str().to_owned());
        }
        for row in query.fetch_all(&mut *connection).await.map_err(query_error("reading escrows"))? {
            escrows.push(escrow_from_row(&row)?);
        }
    }
    Ok(escrows)
}

/// Row counts of generated statements: every chunk has one of these sizes, so a few
/// distinct statements cover any batch and stay in each connection's statement cache
/// (a new size would cost a prepare round trip every time).
pub const STATEMENT_ROWS: [usize; 4] = [ROWS_PER_STATEMENT, 64, 8, 1];

fn fixed_chunks<T>(mut items: &[T]) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    for size in STATEMENT_ROWS {
        while items.len() >= size {
            let (chunk, rest) = items.split_at(size);
            chunks.push(chunk);
            items = rest;
        }
    }
    chunks
}

/// `$first, $first+1, …` (`count` of them); with `anonymous` (SQLite), `?` marks: SQLite looks numbered parameter names up
/// linearly, which makes statements with thousands of `$N` quadratic to bind.
fn placeholders(anonymous: bool, first: usize, count: usize) -> String {
    if anonymous {
        return vec!["?"; count].join(", ");
    }
    (first..first + count).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ")
}

/// Whether generated statements on this connection use `?` marks (SQLite).
fn anonymous(connection: &sqlx::AnyConnection) -> bool {
    connection.backend_name() == "SQLite"
}

/// `($1, …, $width), ($width+1, …)` for `rows` rows.
fn rows_placeholders(anonymous: bool, rows: usize, width: usize) -> String {
    (0..rows).map(|row| format!("({})", placeholders(anonymous, row * width + 1, width))).collect::<Vec<_>>().join(", ")
}

/// The column types the ledger stores, read alike from either kind of row.
pub(crate) trait StoredRow {
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    fn optional_text(&self, column: &str) -> Result<Option<String>, sqlx::Error>;
    fn bytes(&self, column: &str) -> Result<Vec<u8>, sqlx::Error>;
}

macro_rules! stored_row {
    ($row:ty) => {
        impl StoredRow for $row {
            fn int(&self, column: &str) -> Result<i64, sqlx::Error> {
                self.try_get(column)
            }
            fn text(&self, column: &str) -> Result<String, sqlx::Error> {
                self.try_get(column)
            }
            fn optional_text(&self, column: &str) -> Result<Option<String>, sqlx::Error> {
                self.try_get(column)
            }
            fn bytes(&self, column: &str) -> Result<Vec<u8>, sqlx::Error> {
                self.try_get(column)
            }
        }
    };
}
stored_row!(AnyRow);
stored_row!(PgRow);

pub(crate) fn account_from_row(row: &impl StoredRow) -> Result<Account, LedgerQueryError> {
    let operation = "reading an account";
    let read = query_error(operation);
    let id = row.text("id").map_err(read)?;
    let flags = row.int("flags").map_err(read)?;
    let total = |column: &str| -> Result<Credits, LedgerQueryError> {
        let value = row.int(column).map_err(read)?;
        Credits::from_db(value).ok_or_else(|| decode_error(operation, column))
    };
    Ok(Account {
        id: AccountId::parse(&id).ok_or_else(|| decode_error(operation, "account id"))?,
        flags: AccountFlags(flags as u64),
        debits_pending: total("debits_pending")?,
        debits_posted: total("debits_posted")?,
        credits_pending: total("credits_pending")?,
        credits_posted: total("credits_posted")?,
        last_seq: position(row, operation, "last_seq")?,
    })
}

pub(crate) fn spec_from_row(row: &impl StoredRow, operation: &'static str) -> Result<TransferSpec, LedgerQueryError> {
    let read = query_error(operation);
    let text = |column: &str| -> Result<String, LedgerQueryError> { row.text(column).map_err(read) };
    let amount = row.int("amount").map_err(read)?;
    let pending = row.optional_text("pending_id").map_err(read)?;
    let flags = row.int("flags").map_err(read)?;
    Ok(TransferSpec {
        id: TransferId::from_stored(text("id")?),
        debit: AccountId::parse(&text("debit_account")?).ok_or_else(|| decode_error(operation, "debit account"))?,
        credit: AccountId::parse(&text("credit_account")?).ok_or_else(|| decode_error(operation, "credit account"))?,
        amount: Credits::from_db(amount).ok_or_else(|| decode_error(operation, "amount"))?,
        kind: TransferKind::parse(&text("kind")?).ok_or_else(|| decode_error(operation, "kind"))?,
        pending_id: pending.map(TransferId::from_stored),
        purpose: Purpose::parse(&text("purpose")?).ok_or_else(|| decode_error(operation, "purpose"))?,
        flags: TransferFlags(flags as u64),
    })
}

pub(crate) fn transfer_from_row(row: &impl StoredRow) -> Result<Transfer, LedgerQueryError> {
    let operation = "reading a transfer";
    let read = query_error(operation);
    let seq = row.int("seq").map_err(read)?;
    let created_at_ms = row.int("created_at_ms").map_err(read)?;
    let hash = row.bytes("hash").map_err(read)?;
    Ok(Transfer {
        seq: u64::try_from(seq).map_err(|_| decode_error(operation, "seq"))?,
        spec: spec_from_row(row, operation)?,
        created_at: from_db(created_at_ms),
        hash: hash.try_into().map_err(|_| decode_error(operation, "hash"))?,
        debit_prev: position(row, operation, "debit_prev")?,
        credit_prev: position(row, operation, "credit_prev")?,
    })
}

/// A journal position column (never negative).
fn position(row: &impl StoredRow, operation: &'static str, column: &str) -> Result<u64, LedgerQueryError> {
    let value = row.int(column).map_err(query_error(operation))?;
    u64::try_from(value).map_err(|_| decode_error(operation, column))
}

pub(crate) fn escrow_from_row(row: &impl StoredRow) -> Result<Escrow, LedgerQueryError> {
    let operation = "reading an escrow";
    let read = query_error(operation);
    let text = |column: &str| -> Result<String, LedgerQueryError> { row.text(column).map_err(read) };
    let number = |column: &str| -> Result<i64, LedgerQueryError> { row.int(column).map_err(read) };
    let account = |column: &str| AccountId::parse(&text(column)?).ok_or_else(|| decode_error(operation, "account"));
    Ok(Escrow {
        id: TransferId::from_stored(text("id")?),
        payer: account("payer")?,
        payee: account("payee")?,
        amount: Credits::from_db(number("amount")?).ok_or_else(|| decode_error(operation, "amount"))?,
        state: EscrowState::parse(&text("state")?).ok_or_else(|| decode_error(operation, "state"))?,
        on_expiry: OnExpiry::parse(&text("on_expiry")?).ok_or_else(|| decode_error(operation, "on_expiry"))?,
        expires_at: from_db(number("expires_at_ms")?),
        released: Credits::from_db(number("released")?).ok_or_else(|| decode_error(operation, "released"))?,
        created_at: from_db(number("created_at_ms")?),
        updated_at: from_db(number("updated_at_ms")?),
    })
}

pub(crate) fn unbonding_from_row(row: &impl StoredRow) -> Result<Unbonding, LedgerQueryError> {
    let operation = "reading an unbonding";
    let read = query_error(operation);
    let text = |column: &str| -> Result<String, LedgerQueryError> { row.text(column).map_err(read) };
    let number = |column: &str| -> Result<i64, LedgerQueryError> { row.int(column).map_err(read) };
    Ok(Unbonding {
        id: TransferId::from_stored(text("id")?),
        owner: text("owner")?.parse().map_err(|_| decode_error(operation, "owner"))?,
        kind: StakeKind::parse(&text("stake_kind")?).ok_or_else(|| decode_error(operation, "kind"))?,
        amount: Credits::from_db(number("amount")?).ok_or_else(|| decode_error(operation, "amount"))?,
        matures_at: from_db(number("matures_at_ms")?),
        state: UnbondingState::parse(&text("state")?).ok_or_else(|| decode_error(operation, "state"))?,
        created_at: from_db(number("created_at_ms")?),
    })
}

/// A journal position as stored (positions stay far below `i64::MAX`).
pub(crate) fn to_db_position(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

pub(crate) fn to_db(time: UnixMillis) -> i64 {
    i64::try_from(time.0).unwrap_or(i64::MAX)
}

pub(crate) fn from_db(millis: i64) -> UnixMillis {
    UnixMillis(u64::try_from(millis).unwrap_or(0))
}
