//! The PostgreSQL batch: native statements with array parameters, so a batch is a
//! handful of statements whatever its size.
//!
//! [`crate::db::Database`] speaks `sqlx::Any`, which has no array types; ledger batches
//! run instead on a small pool of native connections ([`connect`]) opened with the same
//! connection options. A batch is, in order: `BEGIN`; the head row `FOR UPDATE` (the one
//! lock that serialises ledger writers, see [`super::store`]); the escrows and unbondings
//! it names, if any; the account totals its cache lacks, if any; its ids already known,
//! applied or refused (one statement); then every write in one statement (data-modifying
//! `WITH` clauses fed by `UNNEST` of one array per column); `COMMIT`. With a warm cache a
//! batch of plain transfers is five round trips.

use molt_protocol::UnixMillis;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row as _, Transaction};

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
use super::types::{Account, TransferId};
use crate::db::Database;

/// Native connections for ledger batches (each process runs one batch at a time; the rest
/// serve `execute_now` callers waiting for their turn).
pub const BATCH_POOL_CONNECTIONS: u32 = 4;

/// Every lookup and update here finds a batch's rows by key: nested loops over the
/// primary and unique indexes. A connection keeps its statements prepared, and a plan made
/// while the journal was small (a fresh database) hashed or scanned whole tables for as
/// long as the connection lived: the known-ids lookup took 13 ms at 40,000 entries instead
/// of 0.06 ms, and grew with the journal. Without these settings the planner may still
/// choose that; with them it takes an index whenever one serves, however small the table.
const PLANNER_SETTINGS: &str = "SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off";

type Tx = Transaction<'static, Postgres>;

/// Opens the batch pool with the options of `db`'s own pool.
pub async fn connect(db: &Database) -> Result<PgPool, LedgerQueryError> {
    let any_options = db.pool().connect_options();
    let options = PgConnectOptions::try_from(&*any_options).map_err(query_error("connecting for ledger batches"))?;
    PgPoolOptions::new()
        .max_connections(BATCH_POOL_CONNECTIONS)
        .acquire_timeout(db.pool().options().get_acquire_timeout())
        .after_connect(|connection, _| {
            Box::pin(async move {
                sqlx::Executor::execute(&mut *connection, PLANNER_SETTINGS).await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(query_error("connecting for ledger batches"))
}

/// Runs `commands` in one transaction and commits; keeps `cache` in step.
pub async fn execute(
    pool: &PgPool,
    cache: &mut AccountCache,
    commands: &[Command],
    now: UnixMillis,
) -> Result<Vec<Outcome>, LedgerQueryError> {
    let (escrow_ids, unbonding_ids) = referenced_records(commands);
    let started = std::time::Instant::now();
    let mut tx = pool.begin().await.map_err(query_error("starting a ledger transaction"))?;
    let (seq, hash, fee_bps) = lock_head(&mut tx).await?;
    cache.validate((seq, hash));
    let escrows = escrows(&mut tx, &escrow_ids).await?;
    let unbondings = unbondings(&mut tx, &unbonding_ids).await?;
    let account_ids = account_ids_of(commands, &escrows, &unbondings);
    let missing: Vec<String> =
        account_ids.iter().filter(|id| !cache.contains(id)).map(|id| id.as_str().to_owned()).collect();
    for account in accounts(&mut tx, &missing).await? {
        cache.insert(account);
    }
    let ids: Vec<TransferId> = commands.iter().flat_map(spec_ids).collect();
    let known = known_ids(&mut tx, &ids).await?;
    let read = started.elapsed();
    let loaded = Loaded { fee_bps, escrows, unbondings, known };
    let (outcomes, effects) = run_batch((seq, hash), cache, &account_ids, loaded, commands, now);
    let computed = started.elapsed();
    persist(&mut tx, &effects).await?;
    let written = started.elapsed();
    tx.commit().await.map_err(query_error("committing a ledger batch"))?;
    tracing::trace!(
        commands = commands.len(),
        accounts_read = missing.len(),
        read_us = read.as_micros() as u64,
        computed_us = computed.as_micros() as u64,
        written_us = written.as_micros() as u64,
        committed_us = started.elapsed().as_micros() as u64,
        "ledger batch committed"
    );
    cache.committed(&effects.books.accounts, effects.books.head);
    Ok(outcomes)
}

async fn lock_head(tx: &mut Tx) -> Result<(u64, [u8; 32], u32), LedgerQueryError> {
    let operation = "locking the journal head";
    let row = sqlx::query("SELECT seq, hash, fee_bps FROM ledger_head WHERE id = 1 FOR UPDATE")
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

fn texts(ids: &[TransferId]) -> Vec<String> {
    ids.iter().map(|id| id.as_str().to_owned()).collect()
}

async fn escrows(tx: &mut Tx, ids: &[TransferId]) -> Result<Vec<Escrow>, LedgerQueryError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(&format!(
        "SELECT {ESCROW_COLUMNS} FROM UNNEST($1::text[]) AS q (wanted) JOIN ledger_escrows ON id = q.wanted"
    ))
    .bind(texts(ids))
    .fetch_all(&mut **tx)
    .await
    .map_err(query_error("reading escrows"))?;
    rows.iter().map(escrow_from_row).collect()
}

async fn unbondings(tx: &mut Tx, ids: &[TransferId]) -> Result<Vec<Unbonding>, LedgerQueryError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(concat!(
        "SELECT ",
        unbonding_columns!(),
        " FROM UNNEST($1::text[]) AS q (wanted) JOIN ledger_unbondings ON id = q.wanted"
    ))
    .bind(texts(ids))
    .fetch_all(&mut **tx)
    .await
    .map_err(query_error("reading unbondings"))?;
    rows.iter().map(unbonding_from_row).collect()
}

async fn accounts(tx: &mut Tx, ids: &[String]) -> Result<Vec<Account>, LedgerQueryError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(concat!(
        "SELECT ",
        account_columns!(),
        " FROM UNNEST($1::text[]) AS q (wanted) JOIN ledger_accounts ON id = q.wanted"
    ))
    .bind(ids)
    .fetch_all(&mut **tx)
    .await
    .map_err(query_error("reading accounts"))?;
    rows.iter().map(account_from_row).collect()
}

/// Ids already applied (with their journal entry) or refused (with the reason).
async fn known_ids(tx: &mut Tx, ids: &[TransferId]) -> Result<Vec<(TransferId, Known)>, LedgerQueryError> {
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
    .fetch_all(&mut **tx)
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

/// Every write of the batch in one statement: journal entries, refusals, account totals,
/// escrows, unbondings and the head. Empty arrays write nothing.
const PERSIST: &str = "WITH new_transfers AS (
    INSERT INTO ledger_transfers (seq, id, debit_account, credit_account, amount, kind, pending_id, purpose, flags,
        created_at_ms, hash, debit_prev, credit_prev)
    SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
        $8::text[], $9::bigint[], $10::bigint[], $11::bytea[], $12::bigint[], $13::bigint[])
), new_rejections AS (
    INSERT INTO ledger_rejections (id, debit_account, credit_account, amount, kind, pending_id, purpose, flags, code,
        created_at_ms)
    SELECT * FROM UNNEST($14::text[], $15::text[], $16::text[], $17::bigint[], $18::text[], $19::text[],
        $20::text[], $21::bigint[], $22::text[], $23::bigint[])
), totals AS (
    UPDATE ledger_accounts AS a SET debits_pending = t.debits_pending, debits_posted = t.debits_posted,
        credits_pending = t.credits_pending, credits_posted = t.credits_posted, last_seq = t.last_seq
    FROM UNNEST($24::text[], $25::bigint[], $26::bigint[], $27::bigint[], $28::bigint[], $29::bigint[])
        AS t (id, debits_pending, debits_posted, credits_pending, credits_posted, last_seq)
    WHERE a.id = t.id
), escrows AS (
    INSERT INTO ledger_escrows (id, payer, payee, amount, state, on_expiry, expires_at_ms, released, created_at_ms,
        updated_at_ms)
    SELECT * FROM UNNEST($30::text[], $31::text[], $32::text[], $33::bigint[], $34::text[], $35::text[],
        $36::bigint[], $37::bigint[], $38::bigint[], $39::bigint[])
    ON CONFLICT (id) DO UPDATE SET state = excluded.state, released = excluded.released,
        updated_at_ms = excluded.updated_at_ms
), unbondings AS (
    INSERT INTO ledger_unbondings (id, owner, stake_kind, amount, matures_at_ms, state, created_at_ms)
    SELECT * FROM UNNEST($40::text[], $41::text[], $42::text[], $43::bigint[], $44::bigint[], $45::text[],
        $46::bigint[])
    ON CONFLICT (id) DO UPDATE SET state = excluded.state
)
UPDATE ledger_head SET seq = $47, hash = $48 WHERE id = 1";

async fn persist(tx: &mut Tx, effects: &ViewEffects) -> Result<(), LedgerQueryError> {
    let books = &effects.books;
    let transfers: Vec<_> = books.transfers.iter().map(|t| &t.spec).collect();
    let rejections: Vec<_> = books.rejections.iter().map(|r| &r.spec).collect();
    let query = sqlx::query(PERSIST);
    // Journal entries.
    let query = query
        .bind(books.transfers.iter().map(|t| i64::try_from(t.seq).unwrap_or(i64::MAX)).collect::<Vec<_>>())
        .bind(column(&transfers, |s| s.id.as_str().to_owned()))
        .bind(column(&transfers, |s| s.debit.as_str().to_owned()))
        .bind(column(&transfers, |s| s.credit.as_str().to_owned()))
        .bind(column(&transfers, |s| s.amount.to_db()))
        .bind(column(&transfers, |s| s.kind.as_str().to_owned()))
        .bind(column(&transfers, |s| s.pending_id.as_ref().map(|id| id.as_str().to_owned())))
        .bind(column(&transfers, |s| s.purpose.as_str().to_owned()))
        .bind(column(&transfers, |s| s.flags.0 as i64))
        .bind(books.transfers.iter().map(|t| to_db(t.created_at)).collect::<Vec<_>>())
        .bind(books.transfers.iter().map(|t| t.hash.to_vec()).collect::<Vec<_>>())
        .bind(books.transfers.iter().map(|t| to_db_position(t.debit_prev)).collect::<Vec<_>>())
        .bind(books.transfers.iter().map(|t| to_db_position(t.credit_prev)).collect::<Vec<_>>());
    // Refusals.
    let query = query
        .bind(column(&rejections, |s| s.id.as_str().to_owned()))
        .bind(column(&rejections, |s| s.debit.as_str().to_owned()))
        .bind(column(&rejections, |s| s.credit.as_str().to_owned()))
        .bind(column(&rejections, |s| s.amount.to_db()))
        .bind(column(&rejections, |s| s.kind.as_str().to_owned()))
        .bind(column(&rejections, |s| s.pending_id.as_ref().map(|id| id.as_str().to_owned())))
        .bind(column(&rejections, |s| s.purpose.as_str().to_owned()))
        .bind(column(&rejections, |s| s.flags.0 as i64))
        .bind(books.rejections.iter().map(|r| r.error.code().to_owned()).collect::<Vec<_>>())
        .bind(books.rejections.iter().map(|r| to_db(r.created_at)).collect::<Vec<_>>());
    // Account totals.
    let accounts = &books.accounts;
    let query = query
        .bind(column(accounts, |a| a.id.as_str().to_owned()))
        .bind(column(accounts, |a| a.debits_pending.to_db()))
        .bind(column(accounts, |a| a.debits_posted.to_db()))
        .bind(column(accounts, |a| a.credits_pending.to_db()))
        .bind(column(accounts, |a| a.credits_posted.to_db()))
        .bind(column(accounts, |a| to_db_position(a.last_seq)));
    // Escrows.
    let escrows = &effects.escrows;
    let query = query
        .bind(column(escrows, |e| e.id.as_str().to_owned()))
        .bind(column(escrows, |e| e.payer.as_str().to_owned()))
        .bind(column(escrows, |e| e.payee.as_str().to_owned()))
        .bind(column(escrows, |e| e.amount.to_db()))
        .bind(column(escrows, |e| e.state.as_str().to_owned()))
        .bind(column(escrows, |e| e.on_expiry.as_str().to_owned()))
        .bind(column(escrows, |e| to_db(e.expires_at)))
        .bind(column(escrows, |e| e.released.to_db()))
        .bind(column(escrows, |e| to_db(e.created_at)))
        .bind(column(escrows, |e| to_db(e.updated_at)));
    // Unbondings.
    let unbondings = &effects.unbondings;
    let query = query
        .bind(column(unbondings, |u| u.id.as_str().to_owned()))
        .bind(column(unbondings, |u| u.owner.to_string()))
        .bind(column(unbondings, |u| u.kind.as_str().to_owned()))
        .bind(column(unbondings, |u| u.amount.to_db()))
        .bind(column(unbondings, |u| to_db(u.matures_at)))
        .bind(column(unbondings, |u| u.state.as_str().to_owned()))
        .bind(column(unbondings, |u| to_db(u.created_at)));
    // Head.
    let (seq, hash) = books.head;
    let query = query
        .bind(i64::try_from(seq).map_err(|_| decode_error("writing the journal head", "seq"))?)
        .bind(hash.to_vec());
    query.execute(&mut **tx).await.map_err(query_error("writing a ledger batch"))?;
    Ok(())
}

/// One array parameter: `value` of every row.
fn column<R, T>(rows: &[R], value: impl Fn(&R) -> T) -> Vec<T> {
    rows.iter().map(value).collect()
}
