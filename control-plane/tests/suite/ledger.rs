//! The credits ledger on both backends: the HTTP API (signed agent requests, admin
//! routes, every refused input with its problem code and nothing written), escrow and
//! stake lifecycles with the expiry worker's pass, a property test of random operation
//! sequences against an in-memory model, and concurrent clients on two handles.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use molt_control_plane::agent_auth::{self, NONCE_BYTES};
use molt_control_plane::api::{self, AppState};
use molt_control_plane::auth::AdminToken;
use molt_control_plane::clock::{Clock as _, ManualClock};
use molt_control_plane::db::{Backend, CHECK_CONNECTIONS_IDLE_FOR, Database};
use molt_control_plane::ledger::engine::{Command, Outcome, Requester};
use molt_control_plane::ledger::escrow::{EscrowEvent, EscrowState, OnExpiry};
use molt_control_plane::ledger::store;
use molt_control_plane::ledger::types::{
    AccountId, ClientId, Credits, Namespace, Purpose, StakeKind, TransferFlags, TransferId, TransferKind, TransferSpec,
};
use molt_control_plane::ledger::{Applied, Ledger, TransferError};
use molt_control_plane::metrics::Metrics;
use molt_protocol::keys::SigningKey;
use molt_protocol::{AgentId, UnixMillis};
use proptest::prelude::*;
use rand::RngCore as _;
use rand::rngs::OsRng;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::fixture::{EmptyDatabase, Fixture};

crate::on_both_backends!(
    payments_fees_history_and_audit,
    bad_transfers_get_problems_and_write_nothing,
    unsigned_and_replayed_requests_are_refused,
    linked_batches_are_all_or_none,
    escrow_release_refund_dispute_and_expiry,
    stakes_lock_unbond_mature_and_slash,
    random_operations_match_the_model,
    concurrent_clients_keep_the_books,
    an_older_journal_gets_its_links_when_migrated,
);

/// A PostgreSQL batch connection keeps its statements prepared for as long as it lives.
/// One prepared on an empty journal must still find ids through the index once the
/// journal has grown, instead of hashing the whole table on every batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_connections_look_ids_up_by_index_however_small_the_journal_was() {
    let fixture = Fixture::postgres().await;
    sqlx::raw_sql("VACUUM ANALYZE ledger_transfers").execute(fixture.db.pool()).await.unwrap();
    let pool = molt_control_plane::ledger::postgres::connect(&fixture.db).await.unwrap();
    let mut connection = pool.acquire().await.unwrap();
    let lookup = "SELECT t.seq FROM UNNEST($1::text[]) AS q (id) JOIN ledger_transfers AS t ON t.id = q.id";
    sqlx::raw_sql(&format!(
        "SET plan_cache_mode = force_generic_plan; PREPARE known (text[]) AS {lookup}; EXECUTE known ('{{a,b}}')"
    ))
    .execute(&mut *connection)
    .await
    .unwrap();
    sqlx::raw_sql(
        "INSERT INTO ledger_transfers (seq, id, debit_account, credit_account, amount, kind, pending_id, purpose, \
         flags, created_at_ms, hash, debit_prev, credit_prev) \
         SELECT g, 'agent:x:' || md5(g::text), 'issuance', 'treasury', 1, 'posted', NULL, 'mint', 0, 0, '\\x00', 0, 0 \
         FROM generate_series(1, 20000) AS g",
    )
    .execute(fixture.db.pool())
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::raw_sql("EXPLAIN EXECUTE known ('{a,b}')")
        .fetch_all(&mut *connection)
        .await
        .unwrap()
        .iter()
        .map(|row| sqlx::Row::get::<String, _>(row, 0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("Index Scan") && !plan.contains("Seq Scan on ledger_transfers"), "{plan}");
}

/// A PostgreSQL batch is computed before it takes the head lock, on the state the batch
/// before it leaves, and written as computed only if nothing else was written meanwhile.
/// Here another replica writes exactly between the two: a payment that makes this one
/// unaffordable, a chain of refusals (which leaves the journal head as it was) that this
/// batch repeats, and a fee change. Each time the batch must run again under the lock and
/// get what running it after the other replica's write gives. And a batch dropped between
/// the two stages must leave nothing in the next one's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_prepared_before_another_replica_wrote_runs_again_under_the_lock() {
    let fixture = Fixture::postgres().await;
    let here = store::BatchStore::new(fixture.db.clone());
    let there_db = fixture.second_handle().await;
    let there = store::BatchStore::new(there_db.clone());
    let [a, b, c] = [TestAgent::new().id, TestAgent::new().id, TestAgent::new().id].map(AccountId::wallet);
    store::ensure_accounts(&fixture.db, &[a.clone(), b.clone(), c.clone()], T0).await.unwrap();
    let pay = |id: &str, from: &AccountId, to: &AccountId, amount: u64, linked: bool| {
        spec(Namespace::Admin, id, from.clone(), to.clone(), amount, Purpose::Payment, linked)
    };
    let mint = spec(Namespace::Admin, "mint", AccountId::issuance(), a.clone(), 100, Purpose::Mint, false);
    assert_eq!(run_transfers(&here, vec![mint]).await, [None]);
    // Nothing else writes: the next batch is written as prepared.
    assert_eq!(run_transfers(&here, vec![pay("warm", &a, &b, 1, false)]).await, [None]);
    assert_eq!(here.pipeline().decisions(), (1, 1));

    // A payment from the same wallet lands between prepare and lock.
    let commands = [Command::Transfers(vec![pay("p1", &a, &b, 60, false)])];
    let outcomes = here
        .execute_pausing(&commands, T0, async {
            assert_eq!(run_transfers(&there, vec![pay("p2", &a, &c, 60, false)]).await, [None]);
        })
        .await
        .unwrap();
    assert_eq!(codes(&outcomes[0]), [Some("insufficient_funds")]);
    assert_eq!(here.pipeline().decisions(), (1, 2));
    assert_eq!(
        (
            stored_balance(&fixture.db, &a).await,
            stored_balance(&fixture.db, &b).await,
            stored_balance(&fixture.db, &c).await
        ),
        (39, 1, 60)
    );

    // The other replica refuses a chain, "r1" with it; this batch, prepared before, holds
    // the same "r1" in a chain that would pass. "r1" keeps its first answer.
    let commands = [Command::Transfers(vec![pay("r1", &a, &b, 10, true), pay("r2", &a, &b, 5, false)])];
    let outcomes = here
        .execute_pausing(&commands, T0, async {
            let refused =
                run_transfers(&there, vec![pay("r1", &a, &b, 10, true), pay("x", &a, &b, 1_000, false)]).await;
            assert_eq!(refused, [Some("linked_transfer_failed"), Some("insufficient_funds")]);
        })
        .await
        .unwrap();
    assert_eq!(codes(&outcomes[0]), [Some("linked_transfer_failed"), Some("linked_transfer_failed")]);
    assert_eq!(here.pipeline().decisions(), (1, 3));
    assert_eq!(fixture.count("ledger_transfers WHERE id LIKE '%r1' OR id LIKE '%r2'").await, 0);

    // The fee changes between prepare and lock: the payment pays the new fee.
    let treasury_before = stored_balance(&fixture.db, &AccountId::treasury()).await;
    let commands = [Command::Transfers(vec![pay("f1", &a, &b, 20, false)])];
    let outcomes =
        here.execute_pausing(&commands, T0, async { store::set_fee_bps(&there_db, 500).await.unwrap() }).await.unwrap();
    assert_eq!(codes(&outcomes[0]), [None]);
    assert_eq!(here.pipeline().decisions(), (1, 4));
    assert_eq!(stored_balance(&fixture.db, &AccountId::treasury()).await - treasury_before, 1);

    // A batch dropped between prepare and lock (its caller gone) leaves nothing behind:
    // the next one, prepared on the same basis, is written as prepared with true totals.
    let (a_before, b_before) = (stored_balance(&fixture.db, &a).await, stored_balance(&fixture.db, &b).await);
    let commands = [Command::Transfers(vec![pay("gone", &a, &b, 5, false)])];
    let dropped = here.execute_pausing(&commands, T0, std::future::pending());
    assert!(tokio::time::timeout(Duration::from_millis(200), dropped).await.is_err());
    assert_eq!(run_transfers(&here, vec![pay("q1", &a, &b, 1, false)]).await, [None]);
    assert_eq!(here.pipeline().decisions(), (2, 4));
    assert_eq!(
        (stored_balance(&fixture.db, &a).await, stored_balance(&fixture.db, &b).await),
        (a_before - 1, b_before + 1)
    );

    // Quiet again: prepared batches are written as prepared, and the books balance.
    assert_eq!(run_transfers(&here, vec![pay("q2", &b, &c, 1, false)]).await, [None]);
    assert_eq!(here.pipeline().decisions(), (3, 4));
    assert_audit_passes(&fixture.db).await;
}

/// A small prepared batch takes its transfer ids as new without reading them; the
/// statement that writes it checks that the ledger knows none of them. Retries of ids
/// applied or refused batches ago (no longer in flight) must make that statement write
/// nothing, and the batch then runs again under the lock: each retry gets its first
/// answer (a refusal even where the payment would now pass), a reused id with other
/// fields is refused, and nothing is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_an_earlier_id_is_caught_by_the_statement_that_writes_it() {
    let fixture = Fixture::postgres().await;
    let (here, a, b) = store_with_two_wallets(&fixture).await;
    let pay = |id: &str, amount: u64| spec(Namespace::Admin, id, a.clone(), b.clone(), amount, Purpose::Payment, false);
    let mint = |id: &str, amount: u64| {
        spec(Namespace::Admin, id, AccountId::issuance(), a.clone(), amount, Purpose::Mint, false)
    };
    assert_eq!(run_transfers(&here, vec![mint("m1", 100)]).await, [None]);
    assert_eq!(run_transfers(&here, vec![pay("paid", 10)]).await, [None]);
    assert_eq!(run_transfers(&here, vec![pay("big", 500)]).await, [Some("insufficient_funds")]);
    // Now a could pay "big"; and "paid" and "big" are two batches back.
    assert_eq!(run_transfers(&here, vec![mint("m2", 1_000)]).await, [None]);
    assert_eq!(run_transfers(&here, vec![pay("between", 1)]).await, [None]);
    assert_eq!(here.pipeline().decisions(), (4, 1));
    let journal = fixture.count("ledger_transfers").await;

    let retried = run_transfers(&here, vec![pay("new1", 1), pay("paid", 10), pay("big", 500)]).await;
    assert_eq!(retried, [None, None, Some("insufficient_funds")]);
    assert_eq!(here.pipeline().decisions(), (4, 2), "the statement wrote a batch with known ids");
    let reused = run_transfers(&here, vec![pay("new2", 1), pay("paid", 11)]).await;
    assert_eq!(reused, [None, Some("id_reused")]);
    assert_eq!(here.pipeline().decisions(), (4, 3));
    // Only the two new payments were applied.
    assert_eq!(fixture.count("ledger_transfers").await, journal + 2);
    assert_eq!((stored_balance(&fixture.db, &a).await, stored_balance(&fixture.db, &b).await), (1_100 - 13, 13));

    // New ids again: written as prepared.
    assert_eq!(run_transfers(&here, vec![pay("new3", 1)]).await, [None]);
    assert_eq!(here.pipeline().decisions(), (5, 3));
    assert_audit_passes(&fixture.db).await;
}

/// A large batch (at least `LARGE_BATCH_TRANSFERS`) takes the path under the lock, both
/// when it runs there (the first batch) and when it was prepared. Its journal entries must
/// read back exactly as journaled, which the audit checks: it recomputes every entry's
/// hash from the stored columns (a pending id, present or absent, included) and follows
/// every account's links. A retry of a whole large batch gets its first answers and
/// writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_reads_back_exactly_and_its_retry_gets_the_first_answers() {
    let fixture = Fixture::postgres().await;
    let (here, a, b) = store_with_two_wallets(&fixture).await;
    let transfers = molt_control_plane::ledger::postgres::LARGE_BATCH_TRANSFERS + 10;
    let pay = |id: String, from: &AccountId, to: &AccountId, amount: u64| {
        spec(Namespace::Admin, &id, from.clone(), to.clone(), amount, Purpose::Payment, false)
    };
    let mut first =
        vec![spec(Namespace::Admin, "mint", AccountId::issuance(), a.clone(), 1_000_000, Purpose::Mint, false)];
    first.extend((0..transfers).map(|n| pay(format!("ab{n}"), &a, &b, 2)));
    first.push(pay("too-much".into(), &a, &b, 10_000_000));
    let outcomes = run_transfers(&here, first).await;
    assert!(outcomes[..outcomes.len() - 1].iter().all(Option::is_none), "{outcomes:?}");
    assert_eq!(outcomes.last(), Some(&Some("insufficient_funds")));
    assert_eq!(here.pipeline().decisions(), (0, 1));

    let mut second: Vec<TransferSpec> = (0..transfers).map(|n| pay(format!("ba{n}"), &b, &a, 1)).collect();
    let mut hold = pay("hold".into(), &a, &b, 50);
    hold.kind = TransferKind::Pending;
    second.push(hold);
    let mut post = pay("post".into(), &a, &b, 30);
    post.kind = TransferKind::PostPending;
    post.pending_id = Some(TransferId::new(Namespace::Admin, &ClientId::new("hold").unwrap()));
    second.push(post);
    let commands = [Command::Transfers(second)];
    let outcomes = here.execute(&commands, T0).await.unwrap();
    let refused: Vec<_> = codes(&outcomes[0]).into_iter().flatten().collect();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(here.pipeline().decisions(), (1, 1), "the second batch was not written as prepared");
    let journal = fixture.count("ledger_transfers").await;
    assert_eq!(journal, 1 + transfers as i64 + 1 + transfers as i64 + 1);
    assert_eq!(fixture.count("ledger_transfers WHERE pending_id IS NOT NULL").await, 1);
    assert_eq!(fixture.count("ledger_rejections").await, 1);

    let retried = here.execute(&commands, T0).await.unwrap();
    let entries = |outcomes: &[Outcome]| match &outcomes[0] {
        Outcome::Transfers(results) => results
            .iter()
            .map(|result| match result {
                Ok(Applied::Created(transfer)) => ("created", transfer.clone()),
                Ok(Applied::Existed(transfer)) => ("existed", transfer.clone()),
                Err(error) => panic!("{error}"),
            })
            .collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    let (first, again) = (entries(&outcomes), entries(&retried));
    assert_eq!(first.len(), again.len());
    for ((created, entry), (existed, same)) in first.iter().zip(&again) {
        assert_eq!((*created, *existed), ("created", "existed"));
        assert_eq!(entry, same);
    }
    assert_eq!(fixture.count("ledger_transfers").await, journal);
    let moved = 2 * transfers as i128 - transfers as i128 + 30;
    assert_eq!(
        (stored_balance(&fixture.db, &a).await, stored_balance(&fixture.db, &b).await),
        (1_000_000 - moved, moved)
    );
    assert_audit_passes(&fixture.db).await;
}

/// On SQLite a ledger batch waits for its turn among the process's hot writers
/// (`Database::sqlite_write_turn`) rather than in SQLite's busy handler: while the turn is
/// held it does not start, and it runs as soon as the turn is free. On PostgreSQL there is
/// no turn to take.
#[tokio::test]
async fn sqlite_ledger_batches_wait_for_their_turn() {
    let fixture = Fixture::sqlite().await;
    let (here, a, _) = store_with_two_wallets(&fixture).await;
    let mint = spec(Namespace::Admin, "mint", AccountId::issuance(), a.clone(), 100, Purpose::Mint, false);
    let turn = fixture.db.sqlite_write_turn().await;
    assert!(turn.is_some());
    let commands = [Command::Transfers(vec![mint])];
    let batch = here.execute(&commands, T0);
    tokio::pin!(batch);
    assert!(tokio::time::timeout(Duration::from_millis(200), &mut batch).await.is_err(), "it did not wait");
    assert_eq!(fixture.count("ledger_transfers").await, 0);
    drop(turn);
    assert_eq!(codes(&batch.await.unwrap()[0]), [None]);
    assert_eq!(fixture.count("ledger_transfers").await, 1);
    assert!(Fixture::postgres().await.db.sqlite_write_turn().await.is_none());
}

/// On SQLite, statements of a full `ROWS_PER_STATEMENT` rows run on their own, the rest
/// in the batch's scripts. A batch of two full chunks and a remainder writes every entry,
/// a retry of it finds every id (read through both kinds of statement) and gets the
/// first answers, writes nothing, and the books audit.
#[tokio::test]
async fn a_large_sqlite_batch_is_written_and_read_back_whole() {
    let fixture = Fixture::sqlite().await;
    let (here, a, b) = store_with_two_wallets(&fixture).await;
    let transfers = 2 * store::ROWS_PER_STATEMENT + 7;
    let mut specs =
        vec![spec(Namespace::Admin, "mint", AccountId::issuance(), a.clone(), 1_000_000, Purpose::Mint, false)];
    specs.extend(
        (0..transfers)
            .map(|n| spec(Namespace::Admin, &format!("ab{n}"), a.clone(), b.clone(), 3, Purpose::Payment, false)),
    );
    specs.push(spec(Namespace::Admin, "too-much", a.clone(), b.clone(), 10_000_000, Purpose::Payment, false));
    let commands = [Command::Transfers(specs)];
    let first = here.execute(&commands, T0).await.unwrap();
    let codes_first = codes(&first[0]);
    assert!(codes_first[..codes_first.len() - 1].iter().all(Option::is_none), "{codes_first:?}");
    assert_eq!(codes_first.last(), Some(&Some("insufficient_funds")));
    assert_eq!(fixture.count("ledger_transfers").await, 1 + transfers as i64);
    assert_eq!(fixture.count("ledger_rejections").await, 1);

    let again = here.execute(&commands, T0).await.unwrap();
    assert_eq!(codes(&again[0]), codes_first);
    let existed = match &again[0] {
        Outcome::Transfers(results) => results.iter().filter(|r| matches!(r, Ok(Applied::Existed(_)))).count(),
        other => panic!("{other:?}"),
    };
    assert_eq!(existed, 1 + transfers);
    assert_eq!(fixture.count("ledger_transfers").await, 1 + transfers as i64);
    assert_eq!(stored_balance(&fixture.db, &b).await, 3 * transfers as i128);
    assert_audit_passes(&fixture.db).await;
}

/// A SQLite batch is two scripts of several statements each, the second ending in its
/// `COMMIT`. A statement that fails late in it (here the head update, after the journal
/// entries and account totals were written) fails the batch, and nothing of it stays:
/// the writer drops its connection, which rolls the transaction back. The next batch
/// runs on a new connection, with the same id, and the books audit.
#[tokio::test]
async fn a_sqlite_batch_that_fails_late_leaves_nothing_and_the_next_runs() {
    let (fixture, here, a, b) = sqlite_store_with_minted(100).await;
    sqlx::query(
        "CREATE TRIGGER refuse_head BEFORE UPDATE ON ledger_head BEGIN SELECT RAISE(ABORT, 'refused by test'); END",
    )
    .execute(fixture.db.pool())
    .await
    .unwrap();
    let pay = || spec(Namespace::Admin, "p1", a.clone(), b.clone(), 7, Purpose::Payment, false);
    let failed = here.execute(&[Command::Transfers(vec![pay()])], T0).await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(fixture.count("ledger_transfers").await, 1);
    assert_eq!((stored_balance(&fixture.db, &a).await, stored_balance(&fixture.db, &b).await), (100, 0));

    sqlx::query("DROP TRIGGER refuse_head").execute(fixture.db.pool()).await.unwrap();
    assert_eq!(run_transfers(&here, vec![pay()]).await, [None]);
    assert_eq!(fixture.count("ledger_transfers").await, 2);
    assert_eq!((stored_balance(&fixture.db, &a).await, stored_balance(&fixture.db, &b).await), (93, 7));
    assert_audit_passes(&fixture.db).await;
}

/// The SQLite writer commits without syncing its log, and a batch returns (so is
/// answered) only once a sync that began after its commit has ended: after every call,
/// every commit so far is covered by a sync. Batches committed while a sync runs share
/// the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_batch_returns_once_its_commit_is_synced() {
    let (_fixture, here, a, b) = sqlite_store_with_minted(1000).await;
    let log = here.sqlite_log_sync().await.expect("a file database in WAL mode has a log to sync");
    for i in 0..5 {
        let pay = spec(Namespace::Admin, &format!("p{i}"), a.clone(), b.clone(), 1, Purpose::Payment, false);
        assert_eq!(run_transfers(&here, vec![pay]).await, [None]);
        let (_, synced_through) = log.synced();
        assert_eq!(synced_through, log.commits(), "batch {i} returned before its commit was synced");
    }

    let here = Arc::new(here);
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let (here, a, b) = (Arc::clone(&here), a.clone(), b.clone());
            tokio::spawn(async move {
                let pay = spec(Namespace::Admin, &format!("c{i}"), a, b, 1, Purpose::Payment, false);
                run_transfers(&here, vec![pay]).await
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), [None]);
    }
    let (syncs, synced_through) = log.synced();
    assert_eq!(synced_through, log.commits());
    assert!(syncs <= log.commits(), "{syncs} syncs for {} commits", log.commits());
}

/// A SQLite batch's inserts end the transaction on a failed constraint (`OR ROLLBACK`),
/// in the middle of the script: here a journal entry's position is taken by a row another
/// handle wrote behind the ledger's back. The rest of the script must not run on its own
/// (no account total, head or nonce written without the entries), and once the row is
/// gone the next batch, with the same id and a new nonce, runs.
#[tokio::test]
async fn a_sqlite_insert_that_fails_its_constraint_ends_the_batch_and_writes_nothing() {
    let (fixture, here, a, b) = sqlite_store_with_minted(100).await;
    let pay =
        || Command::Transfers(vec![spec(Namespace::Admin, "p1", a.clone(), b.clone(), 7, Purpose::Payment, false)]);
    assert!(
        run_transfers(&here, vec![spec(Namespace::Admin, "p0", a.clone(), b.clone(), 1, Purpose::Payment, false)])
            .await
            .iter()
            .all(Option::is_none)
    );
    let head: (i64, Vec<u8>) =
        sqlx::query_as("SELECT seq, hash FROM ledger_head WHERE id = 1").fetch_one(fixture.db.pool()).await.unwrap();
    sqlx::query(
        "INSERT INTO ledger_transfers (seq, id, debit_account, credit_account, amount, kind, purpose, flags, \
         created_at_ms, hash) VALUES ($1, 'squatter', 'x', 'y', 1, 'posted', 'payment', 0, 0, zeroblob(32))",
    )
    .bind(head.0 + 1)
    .execute(fixture.db.pool())
    .await
    .unwrap();
    let agent = AgentId::from_inception_key(&SigningKey::generate(&mut OsRng).public_key());
    let nonce = |value: &str| agent_auth::RequestNonce {
        agent,
        nonce: value.to_owned(),
        expires_at: T0.saturating_add(agent_auth::TIMESTAMP_SKEW_MAX),
    };
    let failed = here.execute_signed_then(&[pay()], &[(0, nonce("first"))], T0, Box::new(|| {})).await;
    assert!(failed.is_err(), "{failed:?}");
    let after: (i64, Vec<u8>) =
        sqlx::query_as("SELECT seq, hash FROM ledger_head WHERE id = 1").fetch_one(fixture.db.pool()).await.unwrap();
    assert_eq!(after, head, "the head moved without its entries");
    assert_eq!((stored_balance(&fixture.db, &a).await, stored_balance(&fixture.db, &b).await), (99, 1));
    assert_eq!(fixture.count("agent_request_nonces").await, 0);
    assert_eq!(fixture.count("ledger_transfers WHERE id LIKE '%p1'").await, 0);

    sqlx::query("DELETE FROM ledger_transfers WHERE id = 'squatter'").execute(fixture.db.pool()).await.unwrap();
    let outcomes = here.execute_signed_then(&[pay()], &[(0, nonce("second"))], T0, Box::new(|| {})).await.unwrap();
    assert_eq!(codes(&outcomes[0]), [None]);
    assert_eq!((stored_balance(&fixture.db, &a).await, stored_balance(&fixture.db, &b).await), (92, 8));
    assert_eq!(fixture.count("agent_request_nonces").await, 1);
    assert_audit_passes(&fixture.db).await;
}

/// A SQLite batch cancelled while it waits for the write lock (held here by another
/// handle, as another process would) leaves no transaction open on the writer's
/// connection: the next batch runs once the lock is free.
#[tokio::test]
async fn a_cancelled_sqlite_batch_leaves_no_transaction_behind() {
    let (fixture, here, a, b) = sqlite_store_with_minted(100).await;

    let other = fixture.second_handle().await;
    let mut holder = other.pool().begin().await.unwrap();
    sqlx::query("UPDATE ledger_head SET seq = seq WHERE id = 1").execute(&mut *holder).await.unwrap();
    let pay = |id: &str| spec(Namespace::Admin, id, a.clone(), b.clone(), 1, Purpose::Payment, false);
    let commands = [Command::Transfers(vec![pay("cancelled")])];
    let waited = tokio::time::timeout(Duration::from_millis(300), here.execute(&commands, T0)).await;
    assert!(waited.is_err(), "the batch did not wait for the lock: {waited:?}");
    holder.rollback().await.unwrap();

    assert_eq!(run_transfers(&here, vec![pay("next")]).await, [None]);
    assert_eq!(fixture.count("ledger_transfers").await, 2);
    assert_eq!(fixture.count("ledger_transfers WHERE id LIKE '%cancelled'").await, 0);
    assert_audit_passes(&fixture.db).await;
}

/// The pipeline's stages keep their connections between batches. When the server closes
/// them: after a second of quiet the next batch finds that out before using them and
/// succeeds; right after a batch, the batches in flight fail (at most one per stage),
/// write nothing, and the next one takes new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_takes_new_connections_after_the_server_closed_its_own() {
    let fixture = Fixture::postgres().await;
    let (here, a, b) = store_with_two_wallets(&fixture).await;
    let pay = |id: &str| spec(Namespace::Admin, id, a.clone(), b.clone(), 1, Purpose::Payment, false);
    let mint = spec(Namespace::Admin, "mint", AccountId::issuance(), a.clone(), 100, Purpose::Mint, false);
    assert_eq!(run_transfers(&here, vec![mint]).await, [None]);
    assert_eq!(run_transfers(&here, vec![pay("p1")]).await, [None]);

    fixture.terminate_connections().await;
    tokio::time::sleep(CHECK_CONNECTIONS_IDLE_FOR + Duration::from_millis(100)).await;
    assert_eq!(run_transfers(&here, vec![pay("p2")]).await, [None]);

    fixture.terminate_connections().await;
    let mut failed = Vec::new();
    for attempt in 0.. {
        let id = format!("q{attempt}");
        match here.execute(&[Command::Transfers(vec![pay(&id)])], T0).await {
            Ok(outcomes) => {
                assert_eq!(codes(&outcomes[0]), [None]);
                break;
            }
            Err(_) if attempt < 2 => failed.push(id),
            Err(error) => panic!("the ledger still fails after {attempt} attempts: {error}"),
        }
    }
    for id in &failed {
        assert_eq!(fixture.count(&format!("ledger_transfers WHERE id LIKE '%{id}'")).await, 0, "{id}");
    }
    assert_eq!(fixture.count("ledger_transfers").await, 4);
    assert_audit_passes(&fixture.db).await;
}

/// A batch store on the fixture's database, and two fresh, empty wallets.
async fn store_with_two_wallets(fixture: &Fixture) -> (store::BatchStore, AccountId, AccountId) {
    let [a, b] = [TestAgent::new().id, TestAgent::new().id].map(AccountId::wallet);
    store::ensure_accounts(&fixture.db, &[a.clone(), b.clone()], T0).await.unwrap();
    (store::BatchStore::new(fixture.db.clone()), a, b)
}

/// A SQLite fixture, its store and two wallets, `amount` minted into the first.
async fn sqlite_store_with_minted(amount: u64) -> (Fixture, store::BatchStore, AccountId, AccountId) {
    let fixture = Fixture::sqlite().await;
    let (here, a, b) = store_with_two_wallets(&fixture).await;
    let mint = spec(Namespace::Admin, "mint", AccountId::issuance(), a.clone(), amount, Purpose::Mint, false);
    assert_eq!(run_transfers(&here, vec![mint]).await, [None]);
    (fixture, here, a, b)
}

/// The ledger's audit (balances against the journal, the hash chain) passes.
async fn assert_audit_passes(db: &Database) {
    let report = store::audit(db).await.unwrap();
    assert!(report.ok, "{report:?}");
}

/// An account's balance as stored.
async fn stored_balance(db: &Database, id: &AccountId) -> i128 {
    store::account(db, id).await.unwrap().unwrap().balance()
}

/// Runs one batch of transfers on `store`; the error codes, `None` for applied.
async fn run_transfers(store: &store::BatchStore, specs: Vec<TransferSpec>) -> Vec<Option<&'static str>> {
    codes(&store.execute(&[Command::Transfers(specs)], T0).await.unwrap()[0])
}

const T0: UnixMillis = UnixMillis(1_700_000_000_000);
const CREDIT: u64 = 1_000_000;

struct TestAgent {
    key: SigningKey,
    id: AgentId,
}

impl TestAgent {
    fn new() -> TestAgent {
        let key = SigningKey::generate(&mut OsRng);
        let id = AgentId::from_inception_key(&key.public_key());
        TestAgent { key, id }
    }

    fn wallet(&self) -> String {
        format!("wallet:{}", self.id)
    }
}

struct Harness {
    app: Router,
    clock: Arc<ManualClock>,
    token: AdminToken,
    state: AppState,
}

fn nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    OsRng.fill_bytes(&mut nonce);
    nonce
}

impl Harness {
    async fn new(fixture: &Fixture) -> Harness {
        let token = fixture.db.bootstrap_admin_key(T0).await.unwrap().expect("a fresh database bootstraps");
        let clock = Arc::new(ManualClock::new(T0));
        let state = AppState::new(fixture.db.clone(), clock.clone(), Arc::new(Metrics::new()));
        Harness { app: api::router(state.clone()), clock, token, state }
    }

    fn advance(&self, by: Duration) {
        self.clock.set(self.clock.now().saturating_add(by));
    }

    /// A registered agent with an open wallet.
    async fn agent(&self) -> TestAgent {
        let agent = TestAgent::new();
        let body = json!({"id": agent.id.to_string(), "public_key": hex::encode(agent.key.public_key().as_bytes()), "name": "ledger test"});
        let (status, _) = self.signed(&agent, Method::POST, "/v1/agents", &body.to_string()).await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, wallet) = self.signed(&agent, Method::POST, "/v1/ledger/wallet", "").await;
        assert_eq!(status, StatusCode::OK, "{wallet}");
        assert_eq!(wallet["wallet"]["balance"], 0);
        agent
    }

    async fn signed(&self, agent: &TestAgent, method: Method, uri: &str, body: &str) -> (StatusCode, Value) {
        self.signed_with_nonce(agent, method, uri, body, nonce()).await
    }

    async fn signed_with_nonce(
        &self,
        agent: &TestAgent,
        method: Method,
        uri: &str,
        body: &str,
        nonce: [u8; NONCE_BYTES],
    ) -> (StatusCode, Value) {
        self.call(self.signed_request(agent, method, uri, body, nonce)).await
    }

    fn signed_request(
        &self,
        agent: &TestAgent,
        method: Method,
        uri: &str,
        body: &str,
        nonce: [u8; NONCE_BYTES],
    ) -> Request<Body> {
        let headers = agent_auth::sign_request(
            &agent.key,
            agent.id,
            method.as_str(),
            uri,
            self.clock.now(),
            nonce,
            body.as_bytes(),
        );
        let mut request = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.body(Body::from(body.to_owned())).unwrap()
    }

    async fn admin(&self, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token.expose()));
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let body = body.map_or_else(Body::empty, |body| Body::from(body.to_string()));
        self.call(request.body(body).unwrap()).await
    }

    async fn call(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).map(|value| value.to_str().unwrap().to_owned());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        if status.is_client_error() || status.is_server_error() {
            assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{status}");
        }
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn mint(&self, id: &str, to: &str, amount: u64) {
        let (status, body) = self
            .admin(Method::POST, "/v1/admin/ledger/mint", Some(json!({"id": id, "amount": amount, "to": to})))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    async fn balance(&self, account: &str) -> i64 {
        let (status, body) = self.admin(Method::GET, &format!("/v1/admin/ledger/accounts/{account}"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["balance"].as_i64().unwrap()
    }

    async fn available(&self, account: &str) -> i64 {
        let (_, body) = self.admin(Method::GET, &format!("/v1/admin/ledger/accounts/{account}"), None).await;
        body["available"].as_i64().unwrap()
    }

    async fn pay(&self, from: &TestAgent, to: &TestAgent, id: &str, amount: Value) -> (StatusCode, Value) {
        let body = json!({"id": id, "to": to.id.to_string(), "amount": amount}).to_string();
        self.signed(from, Method::POST, "/v1/ledger/transfers", &body).await
    }

    async fn assert_audit_ok(&self) -> Value {
        let (status, report) = self.admin(Method::GET, "/v1/admin/ledger/audit", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(report["ok"], true, "{report}");
        assert_eq!(report["debits_posted"], report["credits_posted"]);
        report
    }
}

async fn payments_fees_history_and_audit(fixture: &Fixture) {
    let h = Harness::new(fixture).await;
    let (alice, bob) = (h.agent().await, h.agent().await);
    h.mint("m1", &alice.wallet(), 100 * CREDIT).await;
    let (status, fee) = h.admin(Method::PUT, "/v1/admin/ledger/fee", Some(json!({"fee_bps": 100}))).await;
    assert_eq!((status, fee["fee_bps"].as_u64()), (StatusCode::OK, Some(100)));

    let (status, first) = h.pay(&alice, &bob, "pay-1", json!(10 * CREDIT)).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(first["purpose"], "payment");
    assert_eq!(h.balance(&alice.wallet()).await, 90 * CREDIT as i64);
    // 1% fee paid by the recipient, to the treasury.
    assert_eq!(h.balance(&bob.wallet()).await, (10 * CREDIT - CREDIT / 10) as i64);
    assert_eq!(h.balance("treasury").await, (CREDIT / 10) as i64);

    // A retry returns the original result and moves nothing.
    let (status, again) = h.pay(&alice, &bob, "pay-1", json!(10 * CREDIT)).await;
    assert_eq!((status, &again), (StatusCode::CREATED, &first));
    assert_eq!(h.balance(&alice.wallet()).await, 90 * CREDIT as i64);
    // Amounts as strings work too; the fee can be zero.
    h.admin(Method::PUT, "/v1/admin/ledger/fee", Some(json!({"fee_bps": 0}))).await;
    let (status, _) = h.pay(&alice, &bob, "pay-2", json!("5")).await;
    assert_eq!(status, StatusCode::CREATED);

    let (status, wallet) = h.signed(&bob, Method::GET, "/v1/ledger/wallet", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(wallet["wallet"]["balance"], (10 * CREDIT - CREDIT / 10 + 5) as i64);
    // History: newest first, paged.
    let (status, page) = h.signed(&bob, Method::GET, "/v1/ledger/wallet/history?limit=2", "").await;
    assert_eq!(status, StatusCode::OK);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], format!("{}:pay-2", alice.id));
    assert_eq!(items[1]["purpose"], "fee");
    let before = page["next_before"].as_u64().unwrap();
    let (_, page) =
        h.signed(&bob, Method::GET, &format!("/v1/ledger/wallet/history?limit=2&before={before}"), "").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert!(page.get("next_before").is_none());
    // A full last page says there is no more, rather than sending the client to an empty one.
    let (_, page) = h.signed(&bob, Method::GET, "/v1/ledger/wallet/history?limit=3", "").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    assert!(page.get("next_before").is_none(), "{page}");
    // A cursor that is not one of the wallet's entries is refused: another wallet's
    // entry (alice's mint), a position past the journal's end, position 0.
    let (_, alices) = h.signed(&alice, Method::GET, "/v1/ledger/wallet/history?limit=1000", "").await;
    let mint_seq = alices["items"].as_array().unwrap().last().unwrap()["seq"].as_u64().unwrap();
    for before in [mint_seq, 1 << 40, 0] {
        let (status, problem) =
            h.signed(&bob, Method::GET, &format!("/v1/ledger/wallet/history?before={before}"), "").await;
        assert_eq!((status, problem["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_query")), "{before}");
    }
    let (status, _) = h.signed(&bob, Method::GET, "/v1/ledger/wallet/history?limit=0", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, lookup) = h.signed(&alice, Method::GET, "/v1/ledger/transfers/pay-1", "").await;
    assert_eq!((status, lookup["status"].as_str()), (StatusCode::OK, Some("applied")));
    let (status, _) = h.signed(&bob, Method::GET, "/v1/ledger/transfers/pay-1", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "ids are per agent");

    let report = h.assert_audit_ok().await;
    assert_eq!(report["transfers"], 4, "mint, payment, fee, payment");
    let (status, body) = h.admin(Method::PUT, "/v1/admin/ledger/fee", Some(json!({"fee_bps": 10_001}))).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_fee")));
}

async fn bad_transfers_get_problems_and_write_nothing(fixture: &Fixture) {
    let h = Harness::new(fixture).await;
    let (alice, bob) = (h.agent().await, h.agent().await);
    h.mint("m1", &alice.wallet(), 10).await;
    let journal = fixture.count("ledger_transfers").await;

    let cases: Vec<(Value, StatusCode, &str)> = vec![
        (json!({"id": "z", "to": bob.id.to_string(), "amount": 0}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_amount"),
        (
            json!({"id": "n", "to": bob.id.to_string(), "amount": -5}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_amount",
        ),
        (
            json!({"id": "f", "to": bob.id.to_string(), "amount": 1.5}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_amount",
        ),
        (
            json!({"id": "o", "to": bob.id.to_string(), "amount": 9_223_372_036_854_775_808u64}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_amount",
        ),
        (
            json!({"id": "o2", "to": bob.id.to_string(), "amount": "99999999999999999999999"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_amount",
        ),
        (
            json!({"id": "bad id!", "to": bob.id.to_string(), "amount": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_id",
        ),
        (json!({"id": "x", "to": "nobody", "amount": 1}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_account"),
        (
            json!({"id": "x", "to": bob.id.to_string(), "amount": 1, "extra": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            json!({"id": "u", "to": TestAgent::new().id.to_string(), "amount": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_account",
        ),
        (json!({"id": "s", "to": alice.id.to_string(), "amount": 1}), StatusCode::UNPROCESSABLE_ENTITY, "same_account"),
        (json!({"id": "i", "to": bob.id.to_string(), "amount": 11}), StatusCode::CONFLICT, "insufficient_funds"),
    ];
    for (body, status, code) in cases {
        let (got, problem) = h.signed(&alice, Method::POST, "/v1/ledger/transfers", &body.to_string()).await;
        assert_eq!((got, problem["code"].as_str()), (status, Some(code)), "{body}");
    }
    assert_eq!(fixture.count("ledger_transfers").await, journal, "no refused transfer is journaled");
    assert_eq!(h.balance(&alice.wallet()).await, 10);
    assert_eq!(h.balance(&bob.wallet()).await, 0);

    // The failure is remembered: after a top-up, the same request still fails.
    h.mint("m2", &alice.wallet(), 100).await;
    let (status, problem) = h.pay(&alice, &bob, "i", json!(11)).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("insufficient_funds")));
    let (_, lookup) = h.signed(&alice, Method::GET, "/v1/ledger/transfers/i", "").await;
    assert_eq!((lookup["status"].as_str(), lookup["code"].as_str()), (Some("rejected"), Some("insufficient_funds")));
    // The same id with other fields is refused, applied or not.
    let (status, problem) = h.pay(&alice, &bob, "i", json!(12)).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("id_reused")));
    let (status, _) = h.pay(&alice, &bob, "ok", json!(3)).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, problem) = h.pay(&alice, &bob, "ok", json!(4)).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("id_reused")));
    assert_eq!(h.balance(&alice.wallet()).await, 107);

    // Admin routes need the scope; mint refuses bad input.
    let (status, problem) =
        h.admin(Method::POST, "/v1/admin/ledger/mint", Some(json!({"id": "m3", "amount": 0}))).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_amount")));
    let (status, problem) =
        h.admin(Method::POST, "/v1/admin/ledger/mint", Some(json!({"id": "m3", "amount": 1, "to": "issuance"}))).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_account")));
    let (status, problem) = h
        .admin(
            Method::POST,
            "/v1/admin/ledger/mint",
            Some(json!({"id": "m4", "amount": i64::MAX, "to": alice.wallet()})),
        )
        .await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("balance_overflow")));
    let (status, problem) = h.call(Request::builder().uri("/v1/admin/ledger/audit").body(Body::empty()).unwrap()).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("missing_credentials")));
    h.assert_audit_ok().await;
}

async fn unsigned_and_replayed_requests_are_refused(fixture: &Fixture) {
    let h = Harness::new(fixture).await;
    let (alice, bob) = (h.agent().await, h.agent().await);
    h.mint("m1", &alice.wallet(), 100).await;
    let body = json!({"id": "p", "to": bob.id.to_string(), "amount": 1}).to_string();
    let unsigned = Request::builder()
        .method(Method::POST)
        .uri("/v1/ledger/transfers")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.clone()))
        .unwrap();
    let (status, problem) = h.call(unsigned).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("missing_signature")));
    let fixed = nonce();
    let (status, _) = h.signed_with_nonce(&alice, Method::POST, "/v1/ledger/transfers", &body, fixed).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, problem) = h.signed_with_nonce(&alice, Method::POST, "/v1/ledger/transfers", &body, fixed).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("replayed_request")));
    // An unregistered agent cannot open a wallet.
    let (status, problem) = h.signed(&TestAgent::new(), Method::POST, "/v1/ledger/wallet", "").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unknown_agent")));
    assert_eq!(h.balance(&bob.wallet()).await, 1);

    // The signer reusing its nonce for another payment: refused, nothing written.
    let other = json!({"id": "q", "to": bob.id.to_string(), "amount": 2}).to_string();
    let (status, problem) = h.signed_with_nonce(&alice, Method::POST, "/v1/ledger/transfers", &other, fixed).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("replayed_request")));
    let (status, _) = h.signed(&alice, Method::GET, "/v1/ledger/transfers/q", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The same signed payment sent eight times at once is applied once.
    let body = json!({"id": "r", "to": bob.id.to_string(), "amount": 3}).to_string();
    let spent = nonce();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let request = h.signed_request(&alice, Method::POST, "/v1/ledger/transfers", &body, spent);
        calls.spawn(h.app.clone().oneshot(request));
    }
    let mut statuses: Vec<StatusCode> = calls.join_all().await.into_iter().map(|r| r.unwrap().status()).collect();
    statuses.sort();
    assert_eq!(statuses, [[StatusCode::CREATED].as_slice(), &[StatusCode::UNAUTHORIZED; 7]].concat());
    assert_eq!(h.balance(&bob.wallet()).await, 1 + 3);
    // A payment refused before the ledger still spends its nonce.
    let zero = json!({"id": "z", "to": bob.id.to_string(), "amount": 0}).to_string();
    let spent = nonce();
    let (status, problem) = h.signed_with_nonce(&alice, Method::POST, "/v1/ledger/transfers", &zero, spent).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_amount")));
    let (status, problem) = h.signed_with_nonce(&alice, Method::POST, "/v1/ledger/transfers", &zero, spent).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("replayed_request")));
    // Nonces spent by other routes and by the ledger are one set.
    let spent = nonce();
    assert_eq!(h.signed_with_nonce(&alice, Method::GET, "/v1/ledger/wallet", "", spent).await.0, StatusCode::OK);
    let body = json!({"id": "s", "to": bob.id.to_string(), "amount": 4}).to_string();
    let (status, problem) = h.signed_with_nonce(&alice, Method::POST, "/v1/ledger/transfers", &body, spent).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("replayed_request")));
    let spent = nonce();
    assert_eq!(
        h.signed_with_nonce(&alice, Method::POST, "/v1/ledger/transfers", &body, spent).await.0,
        StatusCode::CREATED
    );
    let (status, problem) = h.signed_with_nonce(&alice, Method::GET, "/v1/ledger/wallet", "", spent).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("replayed_request")));
    // An escrow event replayed: refused, the escrow untouched.
    let escrow = json!({"id": "e", "payee": bob.id.to_string(), "amount": 5, "expires_at_ms": T0.0 + 60_000});
    assert_eq!(h.signed(&alice, Method::POST, "/v1/ledger/escrows", &escrow.to_string()).await.0, StatusCode::CREATED);
    let dispute = format!("/v1/ledger/escrows/{}:e/dispute", alice.id);
    let spent = nonce();
    assert_eq!(h.signed_with_nonce(&bob, Method::POST, &dispute, "", spent).await.0, StatusCode::OK);
    let (status, problem) = h.signed_with_nonce(&bob, Method::POST, &dispute, "", spent).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("replayed_request")));
    assert_eq!(h.balance(&bob.wallet()).await, 1 + 3 + 4);
    h.assert_audit_ok().await;
}

/// On SQLite a signed request's nonce is checked and recorded in the ledger batch that
/// runs its command: a recorded request (same agent, nonce and expiry, as a replay has),
/// or one repeated in the batch, runs nothing; the others are recorded with the batch,
/// and expired records are deleted. A nonce recorded with another expiry belongs to
/// another signed request (its timestamp differs), which runs.
#[tokio::test]
async fn a_sqlite_batch_records_its_nonces_and_skips_replays() {
    let (fixture, here, a, b) = sqlite_store_with_minted(100).await;
    let agent = AgentId::from_inception_key(&SigningKey::generate(&mut OsRng).public_key());
    let expires = T0.saturating_add(agent_auth::TIMESTAMP_SKEW_MAX);
    let request = |nonce: &str| agent_auth::RequestNonce { agent, nonce: nonce.to_owned(), expires_at: expires };
    for (nonce, expires_at) in [("recorded", expires.0), ("reused", T0.0 + 1), ("stale", T0.0 - 1)] {
        sqlx::query("INSERT INTO agent_request_nonces (agent_id, nonce, expires_at_ms) VALUES ($1, $2, $3)")
            .bind(agent.to_string())
            .bind(nonce)
            .bind(expires_at as i64)
            .execute(fixture.db.pool())
            .await
            .unwrap();
    }
    let pay = |id: &str| {
        Command::Transfers(vec![spec(Namespace::Admin, id, a.clone(), b.clone(), 1, Purpose::Payment, false)])
    };
    let commands = [pay("p1"), pay("p2"), pay("p3"), pay("p4"), pay("unsigned")];
    let nonces = [(0, request("recorded")), (1, request("fresh")), (2, request("fresh")), (3, request("reused"))];
    let outcomes = here.execute_signed_then(&commands, &nonces, T0, Box::new(|| {})).await.unwrap();
    let replayed: Vec<bool> = outcomes.iter().map(|outcome| *outcome == Outcome::Replayed).collect();
    assert_eq!(replayed, [true, false, true, false, false], "{outcomes:?}");
    assert_eq!(stored_balance(&fixture.db, &b).await, 3);
    let stored: Vec<(String, i64)> =
        sqlx::query_as("SELECT nonce, expires_at_ms FROM agent_request_nonces ORDER BY nonce, expires_at_ms")
            .fetch_all(fixture.db.pool())
            .await
            .unwrap();
    let expires_ms = expires.0 as i64;
    // `stale` expired and went with the first signed batch.
    assert_eq!(
        stored,
        [
            ("fresh".into(), expires_ms),
            ("recorded".into(), expires_ms),
            ("reused".into(), T0.0 as i64 + 1),
            ("reused".into(), expires_ms)
        ]
    );

    // A later batch, before the next purge, finds the request recorded by the first.
    let later = UnixMillis(T0.0 + 1);
    let outcomes =
        here.execute_signed_then(&[pay("p5")], &[(0, request("fresh"))], later, Box::new(|| {})).await.unwrap();
    assert_eq!(outcomes, [Outcome::Replayed]);
    assert_eq!(stored_balance(&fixture.db, &b).await, 3);
    assert_audit_passes(&fixture.db).await;
}

/// A SQLite batch of plain transfers is written on the basis the writer's last commit
/// left, without reading first. When the basis moved (another process paid from a cached
/// wallet, the fee changed, an id is a retry), the check refuses it, nothing of the
/// attempt stays, and the batch reads and runs as usual: no overdraft from a stale
/// cache, the new fee charged, the retry answered as before.
#[tokio::test]
async fn a_sqlite_batch_on_its_basis_runs_again_when_the_basis_moved() {
    let (fixture, here, a, b) = sqlite_store_with_minted(1000).await;
    let pay = |id: &str, amount| spec(Namespace::Admin, id, a.clone(), b.clone(), amount, Purpose::Payment, false);
    assert_eq!(run_transfers(&here, vec![pay("p1", 1)]).await, [None]);
    let first = here.sqlite_batches_on_basis().await;
    assert_eq!(run_transfers(&here, vec![pay("p2", 1)]).await, [None]);
    assert_eq!(here.sqlite_batches_on_basis().await, first + 1, "the second batch was written on its basis");

    // Another process pays 900 from the wallet this writer has cached at 998.
    let other = store::BatchStore::new(fixture.second_handle().await);
    assert_eq!(run_transfers(&other, vec![pay("o1", 900)]).await, [None]);
    assert_eq!(run_transfers(&here, vec![pay("p3", 500)]).await, [Some("insufficient_funds")]);
    assert_eq!(here.sqlite_batches_on_basis().await, first + 1, "the moved basis was noticed");
    assert_eq!(stored_balance(&fixture.db, &a).await, 98);

    // An admin changes the fee; the next payment pays it.
    store::set_fee_bps(&fixture.db, 1000).await.unwrap();
    assert_eq!(run_transfers(&here, vec![pay("p4", 50)]).await, [None]);
    assert_eq!(stored_balance(&fixture.db, &AccountId::treasury()).await, 5);
    assert_eq!(stored_balance(&fixture.db, &b).await, 2 + 900 + 45);

    // A retry of an applied id gets its first answer and writes nothing.
    let on_basis = here.sqlite_batches_on_basis().await;
    assert_eq!(run_transfers(&here, vec![pay("p5", 1)]).await, [None]);
    assert_eq!(here.sqlite_batches_on_basis().await, on_basis + 1);
    let entries = fixture.count("ledger_transfers").await;
    assert_eq!(run_transfers(&here, vec![pay("p5", 1)]).await, [None]);
    assert_eq!(here.sqlite_batches_on_basis().await, on_basis + 1, "a known id is not written on the basis");
    assert_eq!(fixture.count("ledger_transfers").await, entries);
    assert_eq!(stored_balance(&fixture.db, &a).await, 98 - 50 - 1);

    // Up to ON_BASIS_TRANSFERS_MAX transfers go on the basis; one more reads first.
    store::set_fee_bps(&fixture.db, 0).await.unwrap();
    let max = molt_control_plane::ledger::sqlite::ON_BASIS_TRANSFERS_MAX;
    let mint = spec(Namespace::Admin, "m2", AccountId::issuance(), a.clone(), 1000, Purpose::Mint, false);
    assert_eq!(run_transfers(&here, vec![mint]).await, [None]);
    let many = |prefix: &str, n: usize| (0..n).map(|i| pay(&format!("{prefix}{i}"), 1)).collect::<Vec<_>>();
    assert!(run_transfers(&here, many("warm", 1)).await.iter().all(Option::is_none));
    let on_basis = here.sqlite_batches_on_basis().await;
    assert!(run_transfers(&here, many("full", max)).await.iter().all(Option::is_none));
    assert_eq!(here.sqlite_batches_on_basis().await, on_basis + 1);
    assert!(run_transfers(&here, many("over", max + 1)).await.iter().all(Option::is_none));
    assert_eq!(here.sqlite_batches_on_basis().await, on_basis + 1, "a batch over the limit reads first");
    assert_audit_passes(&fixture.db).await;
}

/// PostgreSQL records nonces before the ledger: a batch given any is refused whole.
#[tokio::test]
async fn postgres_batches_refuse_nonces() {
    let fixture = Fixture::postgres().await;
    let (here, a, b) = store_with_two_wallets(&fixture).await;
    let agent = AgentId::from_inception_key(&SigningKey::generate(&mut OsRng).public_key());
    let nonce = agent_auth::RequestNonce { agent, nonce: "n".into(), expires_at: T0 };
    let pay = Command::Transfers(vec![spec(Namespace::Admin, "p", a, b, 1, Purpose::Payment, false)]);
    let refused = here.execute_signed_then(&[pay], &[(0, nonce)], T0, Box::new(|| {})).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(fixture.count("ledger_transfers").await, 0);
}

async fn linked_batches_are_all_or_none(fixture: &Fixture) {
    let h = Harness::new(fixture).await;
    let (alice, bob, carol) = (h.agent().await, h.agent().await, h.agent().await);
    h.mint("m1", &alice.wallet(), 100).await;
    let batch = |items: Value| json!({"transfers": items}).to_string();
    let body = batch(json!([
        {"id": "a", "to": bob.id.to_string(), "amount": 60, "linked": true},
        {"id": "b", "to": carol.id.to_string(), "amount": 60},
        {"id": "c", "to": carol.id.to_string(), "amount": 30},
    ]));
    let (status, results) = h.signed(&alice, Method::POST, "/v1/ledger/transfers/batch", &body).await;
    assert_eq!(status, StatusCode::OK, "{results}");
    let codes: Vec<Option<&str>> = results["results"].as_array().unwrap().iter().map(|r| r["code"].as_str()).collect();
    assert_eq!(codes, vec![Some("linked_transfer_failed"), Some("insufficient_funds"), None]);
    assert_eq!((h.balance(&bob.wallet()).await, h.balance(&carol.wallet()).await), (0, 30));
    // Retrying the batch gives the same answers.
    let (_, again) = h.signed(&alice, Method::POST, "/v1/ledger/transfers/batch", &body).await;
    assert_eq!(again, results);
    // A chain that fits succeeds as a whole.
    let body = batch(json!([
        {"id": "d", "to": bob.id.to_string(), "amount": 40, "linked": true},
        {"id": "e", "to": carol.id.to_string(), "amount": 30},
    ]));
    let (_, results) = h.signed(&alice, Method::POST, "/v1/ledger/transfers/batch", &body).await;
    assert!(results["results"].as_array().unwrap().iter().all(|r| r["transfer"].is_object()), "{results}");
    assert_eq!(h.balance(&alice.wallet()).await, 0);
    // An open chain at the end of a batch is refused.
    let body = batch(json!([{"id": "f", "to": bob.id.to_string(), "amount": 0, "linked": true}]));
    let (status, problem) = h.signed(&alice, Method::POST, "/v1/ledger/transfers/batch", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_amount")));
    let body = batch(json!([{"id": "g", "to": bob.id.to_string(), "amount": 1, "linked": true}]));
    let (_, results) = h.signed(&alice, Method::POST, "/v1/ledger/transfers/batch", &body).await;
    assert_eq!(results["results"][0]["code"], "linked_chain_open");
    let (status, _) = h.signed(&alice, Method::POST, "/v1/ledger/transfers/batch", &batch(json!([]))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    h.assert_audit_ok().await;
}

async fn escrow_release_refund_dispute_and_expiry(fixture: &Fixture) {
    let h = Harness::new(fixture).await;
    let (payer, payee, stranger) = (h.agent().await, h.agent().await, h.agent().await);
    h.mint("m1", &payer.wallet(), 1000).await;
    let expires = T0.0 + 60_000;
    let create = |id: &str, amount: u64, on_expiry: &str| {
        json!({"id": id, "payee": payee.id.to_string(), "amount": amount, "expires_at_ms": expires, "on_expiry": on_expiry})
            .to_string()
    };
    let (status, escrow) = h.signed(&payer, Method::POST, "/v1/ledger/escrows", &create("job-1", 300, "refund")).await;
    assert_eq!(status, StatusCode::CREATED, "{escrow}");
    assert_eq!(escrow["state"], "locked");
    let e1 = escrow["id"].as_str().unwrap().to_owned();
    assert_eq!((h.balance(&payer.wallet()).await, h.available(&payer.wallet()).await), (1000, 700));
    let (status, again) = h.signed(&payer, Method::POST, "/v1/ledger/escrows", &create("job-1", 300, "refund")).await;
    assert_eq!((status, &again), (StatusCode::CREATED, &escrow), "a retry returns the escrow");
    let (status, problem) = h.signed(&payer, Method::POST, "/v1/ledger/escrows", &create("job-9", 701, "refund")).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("insufficient_funds")));

    // Only the parties see it; only the payer releases; partial release returns the rest.
    let (status, _) = h.signed(&stranger, Method::GET, &format!("/v1/ledger/escrows/{e1}"), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, problem) = h.signed(&payee, Method::POST, &format!("/v1/ledger/escrows/{e1}/release"), "").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::FORBIDDEN, Some("not_escrow_party")));
    let (status, problem) =
        h.signed(&payer, Method::POST, &format!("/v1/ledger/escrows/{e1}/release"), r#"{"amount": 301}"#).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_release_amount")));
    let (status, released) =
        h.signed(&payer, Method::POST, &format!("/v1/ledger/escrows/{e1}/release"), r#"{"amount": 200}"#).await;
    assert_eq!(
        (status, released["state"].as_str(), released["released"].as_u64()),
        (StatusCode::OK, Some("released"), Some(200))
    );
    assert_eq!((h.balance(&payer.wallet()).await, h.available(&payer.wallet()).await), (800, 800));
    assert_eq!(h.balance(&payee.wallet()).await, 200);
    // Double release, refund after release: refused, nothing moves.
    for action in ["release", "refund", "dispute"] {
        let who = if action == "refund" { &payee } else { &payer };
        let (status, problem) = h.signed(who, Method::POST, &format!("/v1/ledger/escrows/{e1}/{action}"), "").await;
        assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("escrow_resolved")), "{action}");
    }
    assert_eq!(h.balance(&payee.wallet()).await, 200);

    // Refund, then release after refund is refused.
    let (_, escrow) = h.signed(&payer, Method::POST, "/v1/ledger/escrows", &create("job-2", 100, "release")).await;
    let e2 = escrow["id"].as_str().unwrap().to_owned();
    let (status, refunded) = h.signed(&payee, Method::POST, &format!("/v1/ledger/escrows/{e2}/refund"), "").await;
    assert_eq!((status, refunded["state"].as_str()), (StatusCode::OK, Some("refunded")));
    let (status, problem) = h.signed(&payer, Method::POST, &format!("/v1/ledger/escrows/{e2}/release"), "").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("escrow_resolved")));
    assert_eq!(h.available(&payer.wallet()).await, 800);

    // Expiry: job-3 releases on expiry, job-4 refunds, job-5 is disputed and waits.
    let mut ids = Vec::new();
    for (id, on_expiry) in [("job-3", "release"), ("job-4", "refund"), ("job-5", "refund")] {
        let (_, escrow) = h.signed(&payer, Method::POST, "/v1/ledger/escrows", &create(id, 100, on_expiry)).await;
        ids.push(escrow["id"].as_str().unwrap().to_owned());
    }
    let (status, disputed) =
        h.signed(&payee, Method::POST, &format!("/v1/ledger/escrows/{}/dispute", ids[2]), "").await;
    assert_eq!((status, disputed["state"].as_str()), (StatusCode::OK, Some("disputed")));
    assert_eq!(h.state.ledger.run_expiry_once().await.unwrap(), 0, "nothing is due yet");
    h.advance(Duration::from_secs(61));
    assert_eq!(h.state.ledger.run_expiry_once().await.unwrap(), 2);
    let state_of = |id: String| {
        let h = &h;
        let payer = &payer;
        async move { h.signed(payer, Method::GET, &format!("/v1/ledger/escrows/{id}"), "").await.1["state"].clone() }
    };
    assert_eq!(state_of(ids[0].clone()).await, "released");
    assert_eq!(state_of(ids[1].clone()).await, "refunded");
    assert_eq!(state_of(ids[2].clone()).await, "disputed", "a dispute freezes expiry");
    assert_eq!(h.balance(&payee.wallet()).await, 300);
    // The ruling resolves it; a second ruling is refused.
    let uri = format!("/v1/admin/ledger/escrows/{}/ruling", ids[2]);
    let (status, ruled) = h.admin(Method::POST, &uri, Some(json!({"release": 40}))).await;
    assert_eq!((status, ruled["state"].as_str()), (StatusCode::OK, Some("released")), "{ruled}");
    let (status, problem) = h.admin(Method::POST, &uri, Some(json!({"release": 40}))).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("escrow_resolved")));
    let uri = format!("/v1/admin/ledger/escrows/{}/ruling", ids[0]);
    let (status, _) = h.admin(Method::POST, &uri, Some(json!({"release": 0}))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(h.balance(&payee.wallet()).await, 340);
    assert_eq!((h.balance(&payer.wallet()).await, h.available(&payer.wallet()).await), (660, 660));
    h.assert_audit_ok().await;
}

async fn stakes_lock_unbond_mature_and_slash(fixture: &Fixture) {
    let h = Harness::new(fixture).await;
    let agent = h.agent().await;
    h.mint("m1", &agent.wallet(), 1000).await;
    let stake = |id: &str, amount: i64| json!({"id": id, "kind": "trust", "amount": amount}).to_string();
    let (status, locked) = h.signed(&agent, Method::POST, "/v1/ledger/stakes/lock", &stake("s1", 600)).await;
    assert_eq!((status, locked["purpose"].as_str()), (StatusCode::CREATED, Some("stake_lock")), "{locked}");
    let (status, problem) = h.signed(&agent, Method::POST, "/v1/ledger/stakes/lock", &stake("s2", 401)).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("insufficient_funds")));
    let (status, unbonding) = h.signed(&agent, Method::POST, "/v1/ledger/stakes/unlock", &stake("u1", 200)).await;
    assert_eq!((status, unbonding["state"].as_str()), (StatusCode::CREATED, Some("unbonding")), "{unbonding}");
    let (status, problem) = h.signed(&agent, Method::POST, "/v1/ledger/stakes/unlock", &stake("u2", 401)).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("insufficient_funds")));
    let stake_account = format!("stake:{}:trust", agent.id);
    assert_eq!(h.balance(&stake_account).await, 400);
    // Slashing hook: locked stake to the treasury.
    let slash = json!({"id": "sl1", "agent": agent.id.to_string(), "kind": "trust", "amount": 100});
    let (status, slashed) = h.admin(Method::POST, "/v1/admin/ledger/stakes/slash", Some(slash)).await;
    assert_eq!((status, slashed["purpose"].as_str()), (StatusCode::CREATED, Some("stake_slash")), "{slashed}");
    assert_eq!(h.balance(&stake_account).await, 300);
    // Maturity after the unbonding period returns the credits to the wallet.
    h.advance(Duration::from_secs(6 * 24 * 3600));
    assert_eq!(h.state.ledger.run_expiry_once().await.unwrap(), 0);
    h.advance(Duration::from_secs(24 * 3600));
    assert_eq!(h.state.ledger.run_expiry_once().await.unwrap(), 1);
    assert_eq!(h.balance(&agent.wallet()).await, 600);
    let (_, stakes) = h.signed(&agent, Method::GET, "/v1/ledger/stakes", "").await;
    assert_eq!(stakes["unbondings"][0]["state"], "released", "{stakes}");
    assert_eq!(h.state.ledger.run_expiry_once().await.unwrap(), 0, "released once");
    h.assert_audit_ok().await;
}

// ---- the property test ----

/// One random operation over a few agents (indices) and small amounts.
#[derive(Clone, Debug)]
enum Op {
    Mint {
        to: usize,
        amount: u64,
    },
    Pay {
        from: usize,
        to: usize,
        amount: u64,
    },
    Linked {
        from: usize,
        to: [usize; 2],
        amounts: [u64; 2],
    },
    Escrow {
        from: usize,
        to: usize,
        amount: u64,
        release_on_expiry: bool,
    },
    Release {
        escrow: usize,
        amount: u64,
    },
    Refund {
        escrow: usize,
    },
    Dispute {
        escrow: usize,
    },
    Expire {
        advance_ms: u64,
    },
    Lock {
        who: usize,
        amount: u64,
    },
    Unlock {
        who: usize,
        amount: u64,
    },
    /// Sends an earlier operation's transfer again, the same or changed.
    Retry {
        op: usize,
        change: bool,
    },
}

const AGENTS: usize = 3;

fn op_strategy() -> impl Strategy<Value = Op> {
    let agent = 0..AGENTS;
    let amount = 0u64..60;
    prop_oneof![
        (agent.clone(), 1u64..200).prop_map(|(to, amount)| Op::Mint { to, amount }),
        (agent.clone(), agent.clone(), amount.clone()).prop_map(|(from, to, amount)| Op::Pay { from, to, amount }),
        (agent.clone(), agent.clone(), agent.clone(), amount.clone(), amount.clone())
            .prop_map(|(from, a, b, x, y)| Op::Linked { from, to: [a, b], amounts: [x, y] }),
        (agent.clone(), agent.clone(), 1u64..80, any::<bool>())
            .prop_map(|(from, to, amount, release_on_expiry)| Op::Escrow { from, to, amount, release_on_expiry }),
        (0usize..8, 0u64..80).prop_map(|(escrow, amount)| Op::Release { escrow, amount }),
        (0usize..8).prop_map(|escrow| Op::Refund { escrow }),
        (0usize..8).prop_map(|escrow| Op::Dispute { escrow }),
        (0u64..120_000).prop_map(|advance_ms| Op::Expire { advance_ms }),
        (agent.clone(), 1u64..60).prop_map(|(who, amount)| Op::Lock { who, amount }),
        (agent.clone(), 1u64..60).prop_map(|(who, amount)| Op::Unlock { who, amount }),
        (0usize..40, any::<bool>()).prop_map(|(op, change)| Op::Retry { op, change }),
    ]
}

/// The model: balances per account, escrows, remembered results per transfer id.
#[derive(Debug, Default)]
struct Model {
    balances: BTreeMap<AccountId, i128>,
    pending_out: BTreeMap<AccountId, i128>,
    escrows: Vec<ModelEscrow>,
    /// Client transfer id → (spec, result code or None for success).
    results: HashMap<TransferId, (TransferSpec, Option<&'static str>)>,
    sent: Vec<TransferSpec>,
}

#[derive(Debug, Clone)]
struct ModelEscrow {
    id: TransferId,
    payer: AccountId,
    payee: AccountId,
    amount: u64,
    release_on_expiry: bool,
    expires_at: u64,
    state: EscrowState,
}

impl Model {
    fn available(&self, account: &AccountId) -> i128 {
        self.balances.get(account).copied().unwrap_or(0) - self.pending_out.get(account).copied().unwrap_or(0)
    }

    fn moved(&mut self, from: &AccountId, to: &AccountId, amount: u64) {
        *self.balances.entry(from.clone()).or_default() -= i128::from(amount);
        *self.balances.entry(to.clone()).or_default() += i128::from(amount);
    }

    /// The model's answer to a transfer spec (issuance may go negative).
    fn transfer(&mut self, spec: &TransferSpec) -> Option<&'static str> {
        if let Some((original, result)) = self.results.get(&spec.id) {
            return if original == spec { *result } else { Some("id_reused") };
        }
        let result = if spec.debit == spec.credit {
            Some("same_account")
        } else if spec.debit != AccountId::issuance() && self.available(&spec.debit) < i128::from(spec.amount.micros())
        {
            Some("insufficient_funds")
        } else {
            self.moved(&spec.debit, &spec.credit, spec.amount.micros());
            None
        };
        self.results.insert(spec.id.clone(), (spec.clone(), result));
        result
    }

    fn resolve(&mut self, index: usize, release: u64) {
        let escrow = self.escrows[index].clone();
        *self.pending_out.entry(escrow.payer.clone()).or_default() -= i128::from(escrow.amount);
        if release > 0 {
            self.moved(&escrow.payer, &escrow.payee, release);
        }
        self.escrows[index].state = if release > 0 { EscrowState::Released } else { EscrowState::Refunded };
    }
}

struct PropCase<'a> {
    ledger: &'a Ledger,
    clock: &'a ManualClock,
    agents: Vec<AgentId>,
    model: Model,
    case: u64,
}

fn spec(
    namespace: Namespace,
    id: &str,
    debit: AccountId,
    credit: AccountId,
    amount: u64,
    purpose: Purpose,
    linked: bool,
) -> TransferSpec {
    TransferSpec {
        id: TransferId::new(namespace, &ClientId::new(id).unwrap()),
        debit,
        credit,
        amount: Credits::new(amount).unwrap(),
        kind: TransferKind::Posted,
        pending_id: None,
        purpose,
        flags: if linked { TransferFlags::LINKED } else { TransferFlags::default() },
    }
}

fn codes(outcome: &Outcome) -> Vec<Option<&'static str>> {
    match outcome {
        Outcome::Transfers(results) => results.iter().map(|r| r.as_ref().err().map(|e| e.code())).collect(),
        Outcome::Escrow(result) => vec![result.as_ref().err().map(|e| match e {
            molt_control_plane::ledger::engine::CommandError::Transfer(t) => t.code(),
            molt_control_plane::ledger::engine::CommandError::Escrow(e) => e.code(),
            _ => "other",
        })],
        Outcome::Unbonding(result) => vec![result.as_ref().err().map(|_| "unbonding")],
        Outcome::Replayed => vec![Some("replayed")],
    }
}

impl PropCase<'_> {
    async fn run_op(&mut self, step: usize, op: &Op) {
        let ns = |agent: AgentId| Namespace::Agent(agent);
        let wallet = |i: usize| AccountId::wallet(self.agents[i]);
        let id = format!("c{}-s{step}", self.case);
        match op.clone() {
            Op::Mint { to, amount } => {
                let s = spec(Namespace::Admin, &id, AccountId::issuance(), wallet(to), amount, Purpose::Mint, false);
                self.transfers(vec![s]).await;
            }
            Op::Pay { from, to, amount } if amount > 0 => {
                let s = spec(ns(self.agents[from]), &id, wallet(from), wallet(to), amount, Purpose::Payment, false);
                self.transfers(vec![s]).await;
            }
            Op::Linked { from, to, amounts } if amounts.iter().all(|a| *a > 0) => {
                let first = spec(
                    ns(self.agents[from]),
                    &format!("{id}a"),
                    wallet(from),
                    wallet(to[0]),
                    amounts[0],
                    Purpose::Payment,
                    true,
                );
                let second = spec(
                    ns(self.agents[from]),
                    &format!("{id}b"),
                    wallet(from),
                    wallet(to[1]),
                    amounts[1],
                    Purpose::Payment,
                    false,
                );
                self.transfers(vec![first, second]).await;
            }
            Op::Pay { .. } | Op::Linked { .. } => {}
            Op::Escrow { from, to, amount, release_on_expiry } => {
                self.escrow(&id, from, to, amount, release_on_expiry).await
            }
            Op::Release { escrow, amount } => {
                self.escrow_event(
                    escrow,
                    |e| EscrowEvent::Release { amount: Credits::new(amount.min(e)).filter(|a| !a.is_zero()) },
                    true,
                )
                .await;
            }
            Op::Refund { escrow } => self.escrow_event(escrow, |_| EscrowEvent::Refund, false).await,
            Op::Dispute { escrow } => self.escrow_event(escrow, |_| EscrowEvent::Dispute, false).await,
            Op::Expire { advance_ms } => {
                self.clock.set(self.clock.now().saturating_add(Duration::from_millis(advance_ms)));
                let now = self.clock.now().0;
                self.ledger.run_expiry_once().await.unwrap();
                for index in 0..self.model.escrows.len() {
                    let escrow = &self.model.escrows[index];
                    if escrow.state == EscrowState::Locked && escrow.expires_at <= now {
                        let release = if escrow.release_on_expiry { escrow.amount } else { 0 };
                        self.model.resolve(index, release);
                    }
                }
            }
            Op::Lock { who, amount } => {
                let agent = self.agents[who];
                let s = spec(
                    ns(agent),
                    &id,
                    wallet(who),
                    AccountId::stake(agent, StakeKind::Job),
                    amount,
                    Purpose::StakeLock,
                    false,
                );
                self.transfers(vec![s]).await;
            }
            Op::Unlock { who, amount } => {
                let agent = self.agents[who];
                let s = spec(
                    ns(agent),
                    &id,
                    AccountId::stake(agent, StakeKind::Job),
                    AccountId::unbonding(agent, StakeKind::Job),
                    amount,
                    Purpose::StakeUnlock,
                    false,
                );
                let expected = self.model.transfer(&s);
                let command =
                    Command::Unlock { spec: s, owner: agent, kind: StakeKind::Job, matures_at: self.clock.now() };
                let outcome = self.ledger.execute(vec![command]).await.unwrap().pop().unwrap();
                assert_eq!(codes(&outcome)[0].is_none(), expected.is_none(), "unlock {outcome:?}");
                if expected.is_none() {
                    // Matures at once: the next expiry pass returns it to the wallet.
                    self.model.moved(&AccountId::unbonding(agent, StakeKind::Job), &wallet(who), amount);
                    self.ledger.run_expiry_once().await.unwrap();
                }
            }
            Op::Retry { op, change } => {
                let Some(mut s) = self.model.sent.get(op % self.model.sent.len().max(1)).cloned() else { return };
                if change {
                    s.amount = Credits::new(s.amount.micros() + 1).unwrap();
                }
                s.flags = TransferFlags::default();
                self.transfers(vec![s]).await;
            }
        }
    }

    async fn transfers(&mut self, specs: Vec<TransferSpec>) {
        let outcome = self.ledger.execute(vec![Command::Transfers(specs.clone())]).await.unwrap().pop().unwrap();
        let mut expected: Vec<Option<&'static str>> = Vec::new();
        if specs.len() == 2 {
            // Linked: all or none, in the model too.
            let saved = (self.model.balances.clone(), self.model.results.clone());
            let a = self.model.transfer(&specs[0]);
            let b = self.model.transfer(&specs[1]);
            if a.is_some() || b.is_some() {
                (self.model.balances, self.model.results) = saved;
                let (ea, eb) =
                    if a.is_some() { (a, Some("linked_transfer_failed")) } else { (Some("linked_transfer_failed"), b) };
                for (s, e) in [(&specs[0], ea), (&specs[1], eb)] {
                    if e != Some("id_reused") {
                        self.model.results.entry(s.id.clone()).or_insert((s.clone(), e));
                    }
                }
                expected = vec![ea, eb];
            } else {
                expected = vec![a, b];
            }
        } else {
            for s in &specs {
                expected.push(self.model.transfer(s));
            }
        }
        self.model.sent.extend(specs.iter().cloned());
        assert_eq!(codes(&outcome), expected, "{specs:?}");
    }

    async fn escrow(&mut self, id: &str, from: usize, to: usize, amount: u64, release_on_expiry: bool) {
        let (payer, payee) = (AccountId::wallet(self.agents[from]), AccountId::wallet(self.agents[to]));
        let mut s =
            spec(Namespace::Agent(self.agents[from]), id, payer.clone(), payee.clone(), amount, Purpose::Escrow, false);
        s.kind = TransferKind::Pending;
        let expires_at = self.clock.now().0 + 60_000;
        let on_expiry = if release_on_expiry { OnExpiry::Release } else { OnExpiry::Refund };
        let command = Command::CreateEscrow { spec: s.clone(), on_expiry, expires_at: UnixMillis(expires_at) };
        let outcome = self.ledger.execute(vec![command]).await.unwrap().pop().unwrap();
        let expected = if payer == payee {
            Some("same_account")
        } else if self.model.available(&payer) < i128::from(amount) {
            Some("insufficient_funds")
        } else {
            *self.model.pending_out.entry(payer.clone()).or_default() += i128::from(amount);
            self.model.escrows.push(ModelEscrow {
                id: s.id.clone(),
                payer,
                payee,
                amount,
                release_on_expiry,
                expires_at,
                state: EscrowState::Locked,
            });
            None
        };
        assert_eq!(codes(&outcome), vec![expected]);
    }

    async fn escrow_event(&mut self, index: usize, event: impl Fn(u64) -> EscrowEvent, by_payer: bool) {
        if self.model.escrows.is_empty() {
            return;
        }
        let index = index % self.model.escrows.len();
        let escrow = self.model.escrows[index].clone();
        let event = event(escrow.amount);
        let requester_wallet = if by_payer { &escrow.payer } else { &escrow.payee };
        let agent = self.agents.iter().copied().find(|a| AccountId::wallet(*a) == *requester_wallet).unwrap();
        let command = Command::Escrow { id: escrow.id.clone(), requester: Requester::Agent(agent), event };
        let outcome = self.ledger.execute(vec![command]).await.unwrap().pop().unwrap();
        let resolved = matches!(escrow.state, EscrowState::Released | EscrowState::Refunded);
        let expected = match event {
            _ if resolved => Some("escrow_resolved"),
            EscrowEvent::Release { amount: None } => Some("invalid_release_amount"),
            EscrowEvent::Release { amount: Some(amount) } => {
                self.model.resolve(index, amount.micros());
                None
            }
            EscrowEvent::Refund => {
                self.model.resolve(index, 0);
                None
            }
            EscrowEvent::Dispute if escrow.state == EscrowState::Disputed => Some("escrow_disputed"),
            EscrowEvent::Dispute => {
                self.model.escrows[index].state = EscrowState::Disputed;
                None
            }
            _ => unreachable!(),
        };
        // Release with no amount means "all": the strategy never sends it, the ledger
        // would accept it; the model maps a zero request to None → full release.
        let expected = if matches!(event, EscrowEvent::Release { amount: None }) && !resolved {
            self.model.resolve(index, escrow.amount);
            None
        } else {
            expected
        };
        assert_eq!(codes(&outcome), vec![expected], "{event:?} on {escrow:?}");
    }

    /// Every account of the case against the model, and the audit.
    async fn check(&self, db: &Database) {
        for (account, balance) in &self.model.balances {
            if account == &AccountId::issuance() || account == &AccountId::treasury() {
                continue;
            }
            let stored = store::account(db, account).await.unwrap().unwrap();
            assert_eq!(stored.balance(), *balance, "{account}");
            assert_eq!(stored.available(), self.model.available(account), "{account}");
            assert!(stored.available() >= 0, "{account} overdrawn");
        }
        for agent in &self.agents {
            check_history(db, &AccountId::wallet(*agent)).await;
        }
        let report = store::audit(db).await.unwrap();
        assert!(report.ok, "{report:?}");
    }
}

/// Pages through `account`'s history three entries at a time: every entry touches the
/// account, positions fall, and the pages hold exactly the journal's entries for it.
async fn check_history(db: &Database, account: &AccountId) {
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = store::history(db, account, before, 3).await.unwrap().expect("a cursor from the last page");
        for transfer in &page {
            assert!(transfer.spec.debit == *account || transfer.spec.credit == *account, "{transfer:?}");
            assert!(seen.last().is_none_or(|&last| transfer.seq < last), "{account}: {seen:?} then {}", transfer.seq);
            seen.push(transfer.seq);
        }
        match page.last() {
            Some(last) if page.len() == 3 => before = Some(last.seq),
            _ => break,
        }
    }
    let count: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM ledger_transfers WHERE debit_account = $1 OR credit_account = $1")
            .bind(account.as_str().to_owned())
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(seen.len() as i64, count, "{account}: history {seen:?}");
}

async fn random_operations_match_the_model(fixture: &Fixture) {
    let clock = Arc::new(ManualClock::new(T0));
    let ledger = Ledger::new(fixture.db.clone(), clock.clone());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 12,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    });
    let case = std::sync::atomic::AtomicU64::new(0);
    let handle = tokio::runtime::Handle::current();
    let result = runner.run(&proptest::collection::vec(op_strategy(), 1..40), |ops| {
        tokio::task::block_in_place(|| {
            handle.block_on(async {
                let agents: Vec<AgentId> = (0..AGENTS).map(|_| TestAgent::new().id).collect();
                let mut accounts = Vec::new();
                for agent in &agents {
                    accounts.push(AccountId::wallet(*agent));
                    accounts.push(AccountId::stake(*agent, StakeKind::Job));
                    accounts.push(AccountId::unbonding(*agent, StakeKind::Job));
                }
                store::ensure_accounts(&fixture.db, &accounts, clock.now()).await.unwrap();
                let mut prop = PropCase {
                    ledger: &ledger,
                    clock: &clock,
                    agents,
                    model: Model::default(),
                    case: case.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                };
                for (step, op) in ops.iter().enumerate() {
                    prop.run_op(step, op).await;
                    prop.check(&fixture.db).await;
                }
            })
        });
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}

// ---- concurrency ----

async fn concurrent_clients_keep_the_books(fixture: &Fixture) {
    const CLIENTS: usize = 12;
    const TRANSFERS_PER_CLIENT: usize = 60;
    const HOT_ACCOUNTS: usize = 6;
    let clock: Arc<ManualClock> = Arc::new(ManualClock::new(T0));
    // Two handles with their own writers: two replicas on one database.
    let replicas = [
        Arc::new(Ledger::new(fixture.db.clone(), clock.clone())),
        Arc::new(Ledger::new(fixture.second_handle().await, clock.clone())),
    ];
    let agents: Vec<AgentId> = (0..HOT_ACCOUNTS).map(|_| TestAgent::new().id).collect();
    let wallets: Vec<AccountId> = agents.iter().map(|a| AccountId::wallet(*a)).collect();
    store::ensure_accounts(&fixture.db, &wallets, T0).await.unwrap();
    let mints: Vec<TransferSpec> = wallets
        .iter()
        .enumerate()
        .map(|(i, w)| {
            spec(Namespace::Admin, &format!("m{i}"), AccountId::issuance(), w.clone(), 1_000, Purpose::Mint, false)
        })
        .collect();
    replicas[0].execute(vec![Command::Transfers(mints)]).await.unwrap();

    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let ledger = Arc::clone(&replicas[client % 2]);
        let agents = agents.clone();
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for n in 0..TRANSFERS_PER_CLIENT {
                let from = (client + n) % HOT_ACCOUNTS;
                let to = (client * 7 + n * 3 + 1) % HOT_ACCOUNTS;
                if from == to {
                    continue;
                }
                let s = spec(
                    Namespace::Agent(agents[from]),
                    &format!("c{client}-{n}"),
                    AccountId::wallet(agents[from]),
                    AccountId::wallet(agents[to]),
                    1 + (n as u64 % 50),
                    Purpose::Payment,
                    false,
                );
                // Half go through the group-commit queue, half straight in their own
                // transactions, so that row locks really contend.
                let outcome = if n % 2 == 0 {
                    ledger.execute(vec![Command::Transfers(vec![s.clone()])]).await.expect("no error reaches clients")
                } else {
                    ledger.execute_now(&[Command::Transfers(vec![s.clone()])]).await.expect("no error reaches clients")
                };
                let Outcome::Transfers(results) = &outcome[0] else { panic!("a transfer outcome") };
                match &results[0] {
                    Ok(Applied::Created(_)) => acknowledged.push(s.id.clone()),
                    Err(TransferError::InsufficientFunds) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            acknowledged
        }));
    }
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap());
    }
    assert!(acknowledged.len() > CLIENTS * TRANSFERS_PER_CLIENT / 2, "most transfers succeed");
    let mut total = 0i128;
    for wallet in &wallets {
        let account = store::account(&fixture.db, wallet).await.unwrap().unwrap();
        assert!(account.available() >= 0);
        total += account.balance();
    }
    assert_eq!(total, 1_000 * HOT_ACCOUNTS as i128, "no credit lost or made");
    for id in &acknowledged {
        assert!(matches!(
            store::transfer(&fixture.db, id).await.unwrap(),
            Some(molt_control_plane::ledger::books::Known::Applied(_))
        ));
    }
    let report = store::audit(&fixture.db).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.transfers as usize, acknowledged.len() + HOT_ACCOUNTS);
}

// ---- migration ----

/// A journal written before entries were linked (migrations up to 0014) is linked by
/// migration 0015: the audit checks every link and each account's newest entry, and
/// history pages follow them.
async fn an_older_journal_gets_its_links_when_migrated(fixture: &Fixture) {
    let empty = EmptyDatabase::create(fixture.backend).await;
    let folder = match fixture.backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(folder);
    let mut migrator = sqlx::migrate::Migrator::new(path).await.unwrap();
    let older: Vec<_> = migrator.migrations.iter().filter(|m| m.version < 15).cloned().collect();
    assert_eq!(older.len(), 14);
    migrator.migrations = older.into();
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&empty.url).await.unwrap();
    migrator.run(&pool).await.unwrap();

    // Entries as the older code wrote them: seq, spec, hash chain, totals and head.
    let [a, b, c] = [(); 3].map(|_| AccountId::wallet(TestAgent::new().id));
    let entries = [
        (AccountId::issuance(), a.clone(), 100),
        (a.clone(), b.clone(), 10),
        (b.clone(), c.clone(), 5),
        (a.clone(), c.clone(), 1),
        (AccountId::issuance(), b.clone(), 7),
    ];
    let mut hash = molt_control_plane::ledger::journal::GENESIS_HASH;
    let mut totals: BTreeMap<AccountId, (i64, i64)> = BTreeMap::new();
    for (index, (debit, credit, amount)) in entries.iter().enumerate() {
        let seq = index as u64 + 1;
        let s =
            spec(Namespace::Admin, &format!("old-{seq}"), debit.clone(), credit.clone(), *amount, Purpose::Mint, false);
        hash = molt_control_plane::ledger::journal::entry_hash(&hash, seq, &s, T0);
        sqlx::query(
            "INSERT INTO ledger_transfers (seq, id, debit_account, credit_account, amount, kind, pending_id, purpose, \
             flags, created_at_ms, hash) VALUES ($1, $2, $3, $4, $5, 'posted', NULL, 'mint', 0, $6, $7)",
        )
        .bind(seq as i64)
        .bind(s.id.as_str().to_owned())
        .bind(debit.as_str().to_owned())
        .bind(credit.as_str().to_owned())
        .bind(*amount as i64)
        .bind(T0.0 as i64)
        .bind(hash.to_vec())
        .execute(&pool)
        .await
        .unwrap();
        totals.entry(debit.clone()).or_default().0 += *amount as i64;
        totals.entry(credit.clone()).or_default().1 += *amount as i64;
    }
    for (account, (debits, credits)) in &totals {
        let flags = if *account == AccountId::issuance() { 0 } else { 1 };
        sqlx::query(
            "INSERT INTO ledger_accounts (id, kind, owner, flags, debits_pending, debits_posted, credits_pending, \
             credits_posted, created_at_ms) VALUES ($1, $2, NULL, $3, 0, $4, 0, $5, 0) ON CONFLICT (id) DO UPDATE \
             SET debits_posted = excluded.debits_posted, credits_posted = excluded.credits_posted",
        )
        .bind(account.as_str().to_owned())
        .bind(account.kind_and_owner().0.as_str())
        .bind(flags)
        .bind(debits)
        .bind(credits)
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query("UPDATE ledger_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(entries.len() as i64)
        .bind(hash.to_vec())
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let db = empty.open().await;
    let report = store::audit(&db).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.transfers, entries.len() as u64);
    let seqs = |page: Vec<molt_control_plane::ledger::types::Transfer>| page.iter().map(|t| t.seq).collect::<Vec<_>>();
    for (account, expected) in [(&a, vec![4, 2, 1]), (&b, vec![5, 3, 2]), (&c, vec![4, 3])] {
        assert_eq!(seqs(store::history(&db, account, None, 10).await.unwrap().unwrap()), expected, "{account}");
        check_history(&db, account).await;
    }
    assert_eq!(seqs(store::history(&db, &a, Some(4), 10).await.unwrap().unwrap()), vec![2, 1]);
    assert_eq!(store::history(&db, &a, Some(3), 10).await.unwrap(), None, "entry 3 is not a's");

    // The ledger writes on from there, linking new entries to the migrated ones.
    let ledger = Ledger::new(db.clone(), Arc::new(ManualClock::new(T0)));
    let s = spec(Namespace::Admin, "new-1", AccountId::issuance(), c.clone(), 3, Purpose::Mint, false);
    ledger.execute(vec![Command::Transfers(vec![s])]).await.unwrap();
    assert_eq!(seqs(store::history(&db, &c, None, 10).await.unwrap().unwrap()), vec![6, 4, 3]);
    let report = store::audit(&db).await.unwrap();
    assert!(report.ok, "{report:?}");
}
