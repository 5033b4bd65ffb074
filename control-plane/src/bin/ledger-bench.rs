//! `ledger-bench`: throughput and latency of the credits ledger on PostgreSQL and SQLite,
//! with the audit run after each backend's workload. Not a test: it prints figures for
//! BENCHMARKS.md. Run it in release:
//!
//! ```sh
//! cargo run --release -p molt-control-plane --bin ledger-bench
//! cargo run --release -p molt-control-plane --bin ledger-bench -- --only sqlite --transfers 100000
//! ```
//!
//! Workloads (each on a fresh database): batched transfers (one command of
//! `--batch` transfers per transaction, two in flight), single-transfer calls
//! (`--clients` concurrent callers of `Ledger::execute`, one transfer each, group commit
//! underneath) with p50/p99, escrow operations (create then release), and a hot-account
//! run (90% of transfers touch 10 accounts) both batched and single.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Parser;
use molt_control_plane::clock::SystemClock;
use molt_control_plane::db::{Database, DatabaseOptions};
use molt_control_plane::ledger::Ledger;
use molt_control_plane::ledger::engine::{Command, Outcome, Requester};
use molt_control_plane::ledger::escrow::{EscrowEvent, OnExpiry};
use molt_control_plane::ledger::store;
use molt_control_plane::ledger::types::{
    AccountId, ClientId, Credits, Namespace, Purpose, TransferFlags, TransferId, TransferKind, TransferSpec,
};
use molt_protocol::AgentId;
use rand::{Rng as _, SeedableRng as _};
use sqlx::Connection as _;

/// The control plane's allocator (its `main.rs`), so the library's figures are the service's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "Benchmarks the credits ledger on PostgreSQL and SQLite")]
struct Args {
    /// PostgreSQL maintenance URL (a database is created and dropped).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres_url: String,
    /// Run one backend only: `postgres` or `sqlite`.
    #[arg(long)]
    only: Option<String>,
    /// Transfers in the batched runs.
    #[arg(long, default_value_t = 200_000)]
    transfers: usize,
    /// Transfers per batch (per transaction).
    #[arg(long, default_value_t = 8192)]
    batch: usize,
    /// Wallets.
    #[arg(long, default_value_t = 10_000)]
    accounts: usize,
    /// Concurrent single-transfer callers.
    #[arg(long, default_value_t = 256)]
    clients: usize,
    /// Seconds per single-call and escrow run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // `RUST_LOG=molt_control_plane::ledger=trace` prints each batch's phases.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        if args.only.as_deref() != Some("sqlite") {
            let name = format!("molt_ledger_bench_{:08x}", rand::random::<u32>());
            let mut admin =
                sqlx::PgConnection::connect(&args.postgres_url).await.context("while connecting to PostgreSQL")?;
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await?;
            let url = format!("{}/{name}", args.postgres_url.rsplit_once('/').context("a database in the url")?.0);
            let result = run_backend("PostgreSQL", &url, &args).await;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await?;
            result?;
        }
        if args.only.as_deref() != Some("postgres") {
            let dir = std::env::temp_dir().join(format!("molt-ledger-bench-{:08x}", rand::random::<u32>()));
            std::fs::create_dir_all(&dir)?;
            let url = format!("sqlite:{}", dir.join("bench.db").display());
            let result = run_backend("SQLite", &url, &args).await;
            let _ = std::fs::remove_dir_all(&dir);
            result?;
        }
        Ok(())
    })
}

async fn run_backend(label: &str, url: &str, args: &Args) -> anyhow::Result<()> {
    println!("== {label} ==");
    let options =
        DatabaseOptions { url: url.to_owned(), max_connections: 16, acquire_timeout: Duration::from_secs(30) };
    let db = Database::connect(&options).await.context("while opening the database")?;
    let ledger = Arc::new(Ledger::new(db.clone(), Arc::new(SystemClock)));
    let wallets = setup_wallets(&db, &ledger, args.accounts).await?;
    let mut seq = 0u64;

    let rate = batched(&ledger, &wallets, args, &mut seq, false).await?;
    println!("batched transfers:        {rate:>9.0} transfers/s ({} per transaction)", args.batch);
    let (rate, p50, p99) = single(&ledger, &wallets, args, false).await?;
    println!(
        "single-transfer calls:    {rate:>9.0} calls/s, p50 {p50:.2} ms, p99 {p99:.2} ms ({} callers)",
        args.clients
    );
    let (rate, p99) = escrows(&ledger, &wallets, args).await?;
    println!("escrow operations:        {rate:>9.0} ops/s (create + release), p99 {p99:.2} ms");
    let rate = batched(&ledger, &wallets, args, &mut seq, true).await?;
    println!("hot accounts, batched:    {rate:>9.0} transfers/s (90% touch 10 accounts)");
    let (rate, _, p99) = single(&ledger, &wallets, args, true).await?;
    println!("hot accounts, single:     {rate:>9.0} calls/s, p99 {p99:.2} ms");

    let started = Instant::now();
    let report = store::audit(&db).await?;
    println!(
        "audit: ok={} entries={} debits=credits={} ({:.1} s)",
        report.ok,
        report.transfers,
        report.debits_posted == report.credits_posted,
        started.elapsed().as_secs_f64()
    );
    ensure!(report.ok, "the audit failed: {:?}", report.problems);
    let mut total = 0i128;
    for wallet in &wallets {
        let account = store::account(&db, wallet).await?.context("a wallet")?;
        ensure!(account.available() >= 0, "{wallet} is overdrawn");
        total += account.balance();
    }
    ensure!(total == (wallets.len() as i128) * 1_000_000_000, "wallet balances do not add up: {total}");
    println!("invariants: no wallet overdrawn; wallets hold exactly what was minted");
    db.close().await;
    Ok(())
}

async fn setup_wallets(db: &Database, ledger: &Ledger, count: usize) -> anyhow::Result<Vec<AccountId>> {
    let wallets: Vec<AccountId> = (0..count)
        .map(|_| {
            AccountId::wallet(AgentId::from_inception_key(
                &molt_protocol::SigningKey::generate(&mut rand::rngs::OsRng).public_key(),
            ))
        })
        .collect();
    store::ensure_accounts(db, &wallets, ledger.now()).await?;
    let mints: Vec<TransferSpec> = wallets
        .iter()
        .enumerate()
        .map(|(i, wallet)| {
            spec(
                Namespace::Admin,
                &format!("mint-{i}"),
                AccountId::issuance(),
                wallet.clone(),
                1_000_000_000,
                Purpose::Mint,
            )
        })
        .collect();
    ledger.execute_now(&[Command::Transfers(mints)]).await?;
    Ok(wallets)
}

fn spec(
    namespace: Namespace,
    id: &str,
    debit: AccountId,
    credit: AccountId,
    amount: u64,
    purpose: Purpose,
) -> TransferSpec {
    TransferSpec {
        // Invariant: bench ids are short and use only valid characters.
        id: TransferId::new(namespace, &ClientId::new(id).expect("a valid id")),
        debit,
        credit,
        amount: Credits::new(amount).expect("a small amount"),
        kind: TransferKind::Posted,
        pending_id: None,
        purpose,
        flags: TransferFlags::default(),
    }
}

/// A random pair of distinct wallets; with `hot`, 90% of pairs include one of the first 10.
fn pair(rng: &mut impl rand::Rng, wallets: &[AccountId], hot: bool) -> (usize, usize) {
    loop {
        let mut a = rng.gen_range(0..wallets.len());
        let b = rng.gen_range(0..wallets.len());
        if hot && rng.gen_bool(0.9) {
            a = rng.gen_range(0..10);
        }
        if a != b {
            return if rng.gen_bool(0.5) { (a, b) } else { (b, a) };
        }
    }
}

fn admin_namespace_wallet_spec(id: String, wallets: &[AccountId], from: usize, to: usize, amount: u64) -> TransferSpec {
    spec(Namespace::Admin, &id, wallets[from].clone(), wallets[to].clone(), amount, Purpose::Payment)
}

async fn batched(
    ledger: &Arc<Ledger>,
    wallets: &[AccountId],
    args: &Args,
    seq: &mut u64,
    hot: bool,
) -> anyhow::Result<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(*seq);
    let batches: Vec<Vec<TransferSpec>> = (0..args.transfers.div_ceil(args.batch))
        .map(|_| {
            (0..args.batch)
                .map(|_| {
                    *seq += 1;
                    let (from, to) = pair(&mut rng, wallets, hot);
                    admin_namespace_wallet_spec(format!("b{seq}"), wallets, from, to, rng.gen_range(1..1000))
                })
                .collect()
        })
        .collect();
    let total: usize = batches.iter().map(Vec::len).sum();
    let started = Instant::now();
    // As many batches in flight as the service has writers: on PostgreSQL one writes
    // while the other prepares, on SQLite one writes while the other's commit syncs.
    let mut tasks = tokio::task::JoinSet::new();
    let queue = Arc::new(std::sync::Mutex::new(batches));
    let in_flight = match ledger.db().backend() {
        molt_control_plane::db::Backend::Sqlite => molt_control_plane::ledger::service::WRITER_TASKS_SQLITE,
        molt_control_plane::db::Backend::Postgres => molt_control_plane::ledger::service::WRITER_TASKS_POSTGRES,
    };
    for _ in 0..in_flight {
        let (ledger, queue) = (Arc::clone(ledger), Arc::clone(&queue));
        tasks.spawn(async move {
            loop {
                let Some(batch) = queue.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop() else {
                    return anyhow::Ok(());
                };
                let outcomes = ledger.execute_now(&[Command::Transfers(batch)]).await?;
                check_applied(&outcomes)?;
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

fn check_applied(outcomes: &[Outcome]) -> anyhow::Result<()> {
    for outcome in outcomes {
        if let Outcome::Transfers(results) = outcome {
            for result in results {
                ensure!(result.is_ok(), "a transfer failed: {result:?}");
            }
        }
    }
    Ok(())
}

async fn single(
    ledger: &Arc<Ledger>,
    wallets: &[AccountId],
    args: &Args,
    hot: bool,
) -> anyhow::Result<(f64, f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    let wallets = Arc::new(wallets.to_vec());
    let tag = if hot { "h" } else { "s" };
    for client in 0..args.clients {
        let (ledger, wallets) = (Arc::clone(ledger), Arc::clone(&wallets));
        tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(client as u64 + 7);
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let (from, to) = pair(&mut rng, &wallets, hot);
                let s = admin_namespace_wallet_spec(
                    format!("{tag}{client}-{n}"),
                    &wallets,
                    from,
                    to,
                    rng.gen_range(1..1000),
                );
                let started = Instant::now();
                let outcomes =
                    ledger.execute(vec![Command::Transfers(vec![s])]).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                latencies.push(started.elapsed());
                check_applied(&outcomes)?;
            }
            anyhow::Ok(latencies)
        });
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    while let Some(result) = tasks.join_next().await {
        latencies.extend(result??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (p50, p99) = percentiles(&mut latencies);
    Ok((latencies.len() as f64 / elapsed, p50, p99))
}

async fn escrows(ledger: &Arc<Ledger>, wallets: &[AccountId], args: &Args) -> anyhow::Result<(f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    let wallets = Arc::new(wallets.to_vec());
    let agents: Arc<Vec<AgentId>> = Arc::new(
        wallets.iter().map(|w| w.as_str().trim_start_matches("wallet:").parse().expect("a wallet id")).collect(),
    );
    for client in 0..args.clients {
        let (ledger, wallets, agents) = (Arc::clone(ledger), Arc::clone(&wallets), Arc::clone(&agents));
        tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(client as u64 + 1000);
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let (from, to) = pair(&mut rng, &wallets, false);
                let mut s = spec(
                    Namespace::Agent(agents[from]),
                    &format!("e{client}-{n}"),
                    wallets[from].clone(),
                    wallets[to].clone(),
                    rng.gen_range(1..1000),
                    Purpose::Escrow,
                );
                s.kind = TransferKind::Pending;
                let id = s.id.clone();
                let expires_at = ledger.now().saturating_add(Duration::from_secs(3600));
                let started = Instant::now();
                let create = Command::CreateEscrow { spec: s, on_expiry: OnExpiry::Refund, expires_at };
                let outcome = ledger.execute(vec![create]).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                latencies.push(started.elapsed());
                ensure!(matches!(&outcome[0], Outcome::Escrow(Ok(_))), "escrow create failed: {outcome:?}");
                let started = Instant::now();
                let release = Command::Escrow {
                    id,
                    requester: Requester::Agent(agents[from]),
                    event: EscrowEvent::Release { amount: None },
                };
                let outcome = ledger.execute(vec![release]).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                latencies.push(started.elapsed());
                ensure!(matches!(&outcome[0], Outcome::Escrow(Ok(_))), "escrow release failed: {outcome:?}");
            }
            anyhow::Ok(latencies)
        });
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    while let Some(result) = tasks.join_next().await {
        latencies.extend(result??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (_, p99) = percentiles(&mut latencies);
    Ok((latencies.len() as f64 / elapsed, p99))
}

/// p50 and p99 in milliseconds.
fn percentiles(latencies: &mut [Duration]) -> (f64, f64) {
    if latencies.is_empty() {
        return (0.0, 0.0);
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
    (at(0.50), at(0.99))
}
