//! `ledger-api`: the credits ledger's single-transfer calls through the control plane's
//! HTTP API, as agents make them.
//!
//! A real `molt-control-plane` process runs on a fresh SQLite file, then on a fresh
//! PostgreSQL database. Agents are set up through the API as the SDK does it (a key, a
//! certificate from the org CA through the admin API, registration, an open wallet), and
//! the admin API mints credits into each wallet. Then, for each caller count, C callers
//! make one signed `ApiClient::pay` after another for S seconds, each of a small amount
//! to a random other agent with a fresh transfer id; each call's latency goes into a
//! histogram and every failure is counted by kind. One untimed call per caller opens its
//! connection first.
//!
//! After each phase the books must balance: the audit passes, the journal grew by exactly
//! the payments applied (the acknowledged ones, plus any failed call the ledger applied
//! anyway, found by looking its transfer id up), every wallet moved by exactly those
//! amounts, and the wallets still hold exactly what was minted. Any failed call or check
//! is printed and makes the run fail.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use hdrhistogram::Histogram;
use hyper::header::HeaderValue;
use molt_protocol::UnixMillis;
use molt_protocol::cert::Certificate;
use molt_protocol::keys::{EncryptionSecret, SigningKey};
use molt_sdk::AgentIdentity;
use molt_sdk::api::{
    AgentCredentials, AgentProfile, ApiClient, ApiError, Credits, LedgerAudit, LedgerTransfer, MICROS_PER_CREDIT, Mint,
    MintTarget, Payment, Purpose, TransferKey, TransferKind, TransferStatus, Visibility, wallet_account,
};
use molt_tests::control_plane::{ControlPlane, run as run_command};
use tokio::sync::{Barrier, watch};
use tokio::task::JoinSet;

use crate::harness::{Bench, latency_histogram};
use crate::prepared::{self, Answer, Connection, Queue};
use crate::report::{
    QUIET_CORES_MAX, Section, Target, load_average, process_cpu_time, system_busy_time, thousands, wait_for_quiet,
};

/// The PostgreSQL server's maintenance database; the scratch database is made beside it.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Name of the scratch PostgreSQL database, before its random suffix.
const DATABASE_PREFIX: &str = "molt_ledger_api_bench_";
/// Credits minted into each wallet: far more than a run can spend.
const MINTED_PER_AGENT_MICROS: u64 = 10_000 * MICROS_PER_CREDIT;
/// Largest amount paid per call, in micro-credits (uniform from 1).
const AMOUNT_MICROS_MAX: u64 = 999;
/// Longest one call may take; a slower one counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the callers may take to sign their requests before a `prepared` phase.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest the setup of the agents, or reading the books, may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
/// Setup calls in flight.
const SETUP_CONCURRENCY: usize = 8;
/// Failed calls whose transfer id is looked up afterwards, at most.
const LOOKUPS_MAX: usize = 10_000;
/// Bounds of the flags.
const AGENTS_MAX: usize = 10_000;
const CLIENTS_MAX: usize = 4_096;
const SECONDS_MAX: u64 = 600;
/// The target of the ledger issue, per call.
const TARGET_CALLS_PER_SECOND: f64 = 10_000.0;
const TARGET_P99_MS: f64 = 10.0;
/// What one call is, for the record.
const PAY_NOTE: &str = "one call: POST /v1/ledger/transfers over HTTP/1.1 on loopback (keep-alive), a JSON body \
                         signed with Ed25519 by the payer (fresh nonce and transfer id), verified by the server, \
                         its nonce stored, then the transfer applied by the ledger's group commit and committed \
                         durably before the answer";
/// How the `prepared` callers send.
const PREPARED_NOTE: &str = "client: prepared (each caller's requests signed before the timed window, sent with \
                             hyper over one HTTP/1.1 connection per caller; latency from sending to the answer)";
/// How the `sdk` callers send.
const SDK_NOTE: &str = "client: sdk (each call signed and sent by molt_sdk's ApiClient::pay within the window; \
                        latency includes the signing)";
/// What one `--call refused` call is.
const REFUSED_NOTE: &str = "one call: a payment of 0 credits, signed, sent and verified as a payment is, its nonce \
                            stored; then refused by the handler (422 invalid_amount) before the ledger: the floor \
                            under a payment on this machine (not itself a target)";

const _: () = assert!(MINTED_PER_AGENT_MICROS <= i64::MAX as u64 / AGENTS_MAX as u64);

#[derive(Clone, Debug, clap::Args)]
pub struct LedgerApiArgs {
    /// Run on one backend only (default: SQLite, then PostgreSQL).
    #[arg(long, value_enum)]
    pub only: Option<Backend>,
    /// The PostgreSQL server on loopback, as the URL of its maintenance database (trust
    /// auth); the bench creates `molt_ledger_api_bench_<random>` beside it and drops it
    /// afterwards.
    #[arg(long, default_value = DEFAULT_POSTGRES_URL, value_name = "URL")]
    pub postgres_url: String,
    /// Seconds each timed phase lasts (1 to 600).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Agents set up through the API (2 to 10,000); each pays random others.
    #[arg(long, default_value_t = 64)]
    pub agents: usize,
    /// Concurrent callers (1 to 4096). Several values, e.g. 32,64,256, run one timed
    /// phase each, in that order, on the same control plane.
    #[arg(long, value_delimiter = ',', default_value = "64", value_name = "N[,N…]")]
    pub clients: Vec<usize>,
    /// The call each caller repeats: `pay` (the ledger's single transfer, the target), or
    /// `refused` (the same signed request for 0 credits, which the server verifies, records
    /// and then refuses before the ledger: what a payment costs without the ledger).
    #[arg(long, value_enum, default_value = "pay")]
    pub call: Call,
    /// How the callers send: `prepared` (each caller signs its requests before the timed
    /// window and sends them with hyper over one HTTP/1.1 connection, which leaves the
    /// cores to the server, as agents on other machines would), or `sdk` (each call signed
    /// and sent by `molt_sdk::api::ApiClient::pay` inside the window).
    #[arg(long, value_enum, default_value = "prepared")]
    pub client: Client,
}

/// How the callers make their calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Client {
    Prepared,
    Sdk,
}

/// The call a timed phase repeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Call {
    Pay,
    Refused,
}

/// Where the control plane keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

/// The printed sections, and every failed call or check (the run fails if there is one).
#[derive(Debug, Default)]
pub struct Outcome {
    pub sections: Vec<Section>,
    pub failures: Vec<String>,
}

/// Runs every backend and caller count; prints each section as it is done.
pub fn run(args: &LedgerApiArgs, bench: &Bench) -> anyhow::Result<Outcome> {
    ensure!((2..=AGENTS_MAX).contains(&args.agents), "--agents must be 2 to {AGENTS_MAX}");
    ensure!((1..=SECONDS_MAX).contains(&args.seconds), "--seconds must be 1 to {SECONDS_MAX}");
    ensure!(
        !args.clients.is_empty() && args.clients.iter().all(|c| (1..=CLIENTS_MAX).contains(c)),
        "--clients must be 1 to {CLIENTS_MAX}"
    );
    check_loopback(&args.postgres_url)?;
    let backends = match args.only {
        Some(backend) => vec![backend],
        None => vec![Backend::Sqlite, Backend::Postgres],
    };
    let interrupt = Interrupt::install()?;
    let mut outcome = Outcome::default();
    for backend in backends {
        run_backend(args, bench, backend, &interrupt, &mut outcome)
            .with_context(|| format!("while running on {}", backend.name()))?;
    }
    Ok(outcome)
}

/// One control plane on a fresh database; one timed phase per caller count.
fn run_backend(
    args: &LedgerApiArgs,
    bench: &Bench,
    backend: Backend,
    interrupt: &Interrupt,
    outcome: &mut Outcome,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("while making a directory for the control plane")?;
    interrupt.update(|leftovers| leftovers.dir = Some(dir.path().to_owned()));
    let database = match backend {
        Backend::Postgres => Some(ScratchDatabase::create(&args.postgres_url, interrupt)?),
        Backend::Sqlite => None,
    };
    let server = Server::start(dir.path(), database, interrupt)?;
    let admin = ApiClient::new(&server.control_plane.url())?.with_admin_token(server.control_plane.token.clone());
    let api = ApiClient::new(&server.control_plane.url())?;
    eprintln!("ledger-api ({}): setting up {} agents through the API…", backend.name(), args.agents);
    let agents = bench.runtime.block_on(async {
        let agents = tokio::time::timeout(SETUP_TIMEOUT, set_up_agents(&admin, &api, args.agents)).await;
        agents.context("setting up the agents took too long")?
    })?;
    let agents = Arc::new(agents);
    let fee = bench.runtime.block_on(admin.fee()).context("while reading the fee")?;
    ensure!(fee.fee_bps == 0, "the transfer fee is {} bps, not 0: the balance checks assume none", fee.fee_bps);
    let mut books = read_books(bench, &admin, &agents)?;
    outcome.failures.extend(books.check_minted(&format!("{} after setup", backend.name()), agents.len()));
    for &clients in &args.clients {
        let what = match args.call {
            Call::Pay => "",
            Call::Refused => ", refused payments (the floor)",
        };
        let title = format!(
            "ledger-api: {}{what}, {clients} callers, {} agents, {} s",
            backend.name(),
            args.agents,
            args.seconds
        );
        if !bench.quiet_patience.is_zero() {
            let others = wait_for_quiet(server.pid, bench.quiet_patience)?;
            if others >= QUIET_CORES_MAX {
                eprintln!("  gave up waiting: other processes use {others:.2} cores");
            }
        }
        eprintln!("{title}: running…");
        let load_before = load_average();
        let how = How { call: args.call, client: args.client, clients, seconds: args.seconds };
        let phase = bench.runtime.block_on(timed_phase(&api, &agents, how, &server))?;
        let load_after = load_average();
        let cpu = server.cpu_since(&phase.cpu_start, &phase.cpu_end);
        let resolved = bench.runtime.block_on(resolve_failures(&api, &agents, &phase.calls.failed));
        let after = read_books(bench, &admin, &agents);
        let checks = match &after {
            Ok(after) => check_phase(&books, after, &phase, &resolved, agents.len()),
            Err(error) => Checks::unread(error),
        };
        let failures: Vec<String> = checks.failures.iter().chain(&phase.failure_lines()).cloned().collect();
        outcome.failures.extend(failures.iter().map(|failure| format!("{title}: {failure}")));
        let loads = (load_before, load_after);
        let section = section(title, how, &phase, &cpu, &checks, loads, bench.reference.verify_us);
        section.print();
        outcome.sections.push(section);
        books = after?;
    }
    drop(server);
    interrupt.update(|leftovers| leftovers.dir = None);
    Ok(())
}

// ---- the control plane and its database ----

/// The control plane, and the scratch database it runs on (if not SQLite): the process
/// is killed before the database is dropped.
struct Server {
    control_plane: ControlPlane,
    pid: u32,
    database: Option<ScratchDatabase>,
    interrupt: Interrupt,
}

impl Server {
    fn start(dir: &Path, database: Option<ScratchDatabase>, interrupt: &Interrupt) -> anyhow::Result<Server> {
        // Warnings only unless the caller sets a level (to trace a run, with
        // `MOLT_TEST_CP_STDERR`): an info line per request would be part of the measurement.
        let level = std::env::var("MOLT_CP_LOG_LEVEL").unwrap_or_else(|_| "warn".to_owned());
        let mut environment = vec![("MOLT_CP_LOG_LEVEL", level)];
        let control_plane = match &database {
            None => ControlPlane::start_with_env(dir, &borrowed(&environment)),
            Some(database) => {
                // PostgreSQL has no file beside which the key-encryption key could live.
                let kek: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
                environment.push(("MOLT_CP_KEK", kek));
                ControlPlane::start_on_database(dir, &database.url, &borrowed(&environment))
            }
        }
        .context("while starting molt-control-plane (built beside molt-bench?)")?;
        let pid = control_plane.pid().context("the control plane has no process")?;
        interrupt.update(|leftovers| leftovers.control_plane = Some(pid));
        Ok(Server { control_plane, pid, database, interrupt: interrupt.clone() })
    }

    /// CPU counters of the control plane, of the PostgreSQL processes serving it, of this
    /// process and of the machine.
    fn cpu_mark(&self, postgres_pids: &[u32]) -> CpuMark {
        let postgres = postgres_pids.iter().filter_map(|&pid| Some((pid, process_cpu_time(pid).ok()?))).collect();
        CpuMark {
            control_plane: process_cpu_time(self.pid).unwrap_or_default(),
            postgres,
            bench: process_cpu_time(std::process::id()).unwrap_or_default(),
            system: system_busy_time().unwrap_or_default(),
            at: Instant::now(),
        }
    }

    fn postgres_pids(&self) -> Vec<u32> {
        self.database.as_ref().map(ScratchDatabase::server_pids).unwrap_or_default()
    }

    /// CPU used between the marks. PostgreSQL processes that appeared after the first
    /// mark count from zero.
    fn cpu_since(&self, start: &CpuMark, end: &CpuMark) -> CpuUse {
        let mut postgres = Duration::ZERO;
        for (pid, used) in &end.postgres {
            postgres += used.saturating_sub(start.postgres.get(pid).copied().unwrap_or_default());
        }
        let control_plane = end.control_plane.saturating_sub(start.control_plane);
        let bench = end.bench.saturating_sub(start.bench);
        let system = end.system.saturating_sub(start.system);
        CpuUse {
            control_plane,
            postgres: self.database.as_ref().map(|_| postgres),
            bench,
            other: system.saturating_sub(control_plane + postgres + bench),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.control_plane.stop();
        self.interrupt.update(|leftovers| leftovers.control_plane = None);
        // The database (a field) is dropped after this, with the process gone.
    }
}

fn borrowed<'a>(environment: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    environment.iter().map(|(name, value)| (*name, value.as_str())).collect()
}

/// A fresh PostgreSQL database, made and dropped with `psql`; dropped (with its
/// connections) when this is dropped, on failure too.
struct ScratchDatabase {
    maintenance: String,
    name: String,
    url: String,
    interrupt: Interrupt,
}

impl ScratchDatabase {
    fn create(maintenance: &str, interrupt: &Interrupt) -> anyhow::Result<ScratchDatabase> {
        let name = format!("{DATABASE_PREFIX}{:016x}", rand::random::<u64>());
        let (server, _) = maintenance.rsplit_once('/').context("give the PostgreSQL URL as postgres://USER@HOST/DB")?;
        interrupt.update(|leftovers| leftovers.database = Some((maintenance.to_owned(), name.clone())));
        psql(maintenance, &format!("CREATE DATABASE {name}")).context("while creating the scratch database")?;
        let url = format!("{server}/{name}");
        Ok(ScratchDatabase { maintenance: maintenance.to_owned(), name, url, interrupt: interrupt.clone() })
    }

    /// The server processes working for this database, and the background ones (WAL
    /// writer, checkpointer…) that work for every database.
    fn server_pids(&self) -> Vec<u32> {
        let query = format!(
            "SELECT pid FROM pg_stat_activity WHERE datname = '{}' OR datname IS NULL AND backend_type <> 'client \
             backend'",
            self.name
        );
        let rows = psql(&self.maintenance, &query).unwrap_or_default();
        rows.lines().filter_map(|line| line.trim().parse().ok()).collect()
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        if let Err(error) = drop_database(&self.maintenance, &self.name) {
            eprintln!("warning: {error:#}");
        }
        self.interrupt.update(|leftovers| leftovers.database = None);
    }
}

fn drop_database(maintenance: &str, name: &str) -> anyhow::Result<()> {
    psql(maintenance, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .with_context(|| format!("while dropping the scratch database {name}"))?;
    Ok(())
}

/// Runs one statement with `psql` (bounded by the harness's command timeout); its
/// unaligned, tuples-only output.
fn psql(url: &str, statement: &str) -> anyhow::Result<String> {
    let mut command = Command::new("psql");
    command.arg(url).args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", statement]);
    let (status, stdout, stderr) = run_command(command).context("while running psql (PostgreSQL's client)")?;
    ensure!(status.success(), "psql {statement:?}: {}", stderr.trim());
    Ok(stdout)
}

/// The bench talks to loopback only.
fn check_loopback(url: &str) -> anyhow::Result<()> {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = match host_port.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    ensure!(
        matches!(host, "127.0.0.1" | "localhost" | "::1"),
        "--postgres-url must name a server on loopback (127.0.0.1, localhost or ::1), not {host:?}"
    );
    Ok(())
}

/// What an interrupt (Ctrl-C) must clean up before the process exits.
#[derive(Debug, Default)]
struct Leftovers {
    control_plane: Option<u32>,
    /// The maintenance URL and the scratch database's name.
    database: Option<(String, String)>,
    dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Default)]
struct Interrupt(Arc<Mutex<Leftovers>>);

impl Interrupt {
    /// Handles Ctrl-C from now on, on a thread of its own (with a small runtime of its own,
    /// so that it answers whatever the bench is doing) that lives as long as the process:
    /// it stops the control plane, drops the scratch database, removes the directory and
    /// exits with status 130.
    fn install() -> anyhow::Result<Interrupt> {
        let interrupt = Interrupt::default();
        let leftovers = Arc::clone(&interrupt.0);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new()
            .name("interrupt".into())
            .spawn(move || {
                if runtime.block_on(tokio::signal::ctrl_c()).is_ok() {
                    eprintln!("\ninterrupted: cleaning up");
                    let leftovers = leftovers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    if let Some(pid) = leftovers.control_plane {
                        let _ = Command::new("kill").arg(pid.to_string()).status();
                    }
                    if let Some((maintenance, name)) = &leftovers.database {
                        if let Err(error) = drop_database(maintenance, name) {
                            eprintln!("warning: {error:#}");
                        }
                    }
                    if let Some(dir) = &leftovers.dir {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                    std::process::exit(130);
                }
            })
            .context("while starting the interrupt handler")?;
        Ok(interrupt)
    }

    fn update(&self, change: impl FnOnce(&mut Leftovers)) {
        change(&mut self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    }
}

// ---- agents ----

/// An org with its CA, then `count` agents, each certified, registered, with an open
/// wallet into which credits are minted.
async fn set_up_agents(admin: &ApiClient, api: &ApiClient, count: usize) -> anyhow::Result<Vec<AgentCredentials>> {
    let org = admin.create_org("ledger-api-bench").await.context("while creating the org")?;
    admin.create_org_ca(&org.id).await.context("while creating the org CA")?;
    let mut agents = Vec::with_capacity(count);
    let mut tasks = JoinSet::new();
    for index in 0..count {
        if tasks.len() >= SETUP_CONCURRENCY {
            agents.push(tasks.join_next().await.context("a setup task")???);
        }
        let (admin, api, org) = (admin.clone(), api.clone(), org.id.clone());
        tasks.spawn(async move { set_up_agent(&admin, &api, &org, index).await });
    }
    while let Some(agent) = tasks.join_next().await {
        agents.push(agent??);
    }
    Ok(agents)
}

async fn set_up_agent(admin: &ApiClient, api: &ApiClient, org: &str, index: usize) -> anyhow::Result<AgentCredentials> {
    let signing_key = SigningKey::generate(&mut rand::rngs::OsRng);
    let now = UnixMillis::now_from_system();
    let issued = admin.issue_agent_certificate(org, &signing_key, now).await.context("while certifying an agent")?;
    let chain = Certificate::chain_from_pem(&issued.chain_pem).context("while reading the issued chain")?;
    let identity = AgentIdentity::new(chain, signing_key, EncryptionSecret::generate(&mut rand::rngs::OsRng))?;
    let credentials = AgentCredentials::from(&identity);
    let profile = AgentProfile {
        name: format!("bench-{index}"),
        description: "molt-bench ledger-api".to_owned(),
        capabilities: Vec::new(),
        key_binding: Some(hex::encode(identity.key_binding(now).encode())),
        visibility: Visibility::Unlisted,
        home_edge: None,
    };
    api.register_agent(&credentials, &profile).await.context("while registering an agent")?;
    api.open_wallet(&credentials).await.context("while opening a wallet")?;
    let mint = Mint {
        key: TransferKey::new(&format!("bench-mint-{index}"))?,
        amount: Credits::from_micros(MINTED_PER_AGENT_MICROS).context("the minted amount")?,
        to: MintTarget::Wallet(credentials.agent_id),
    };
    admin.mint(&mint).await.context("while minting credits")?;
    Ok(credentials)
}

// ---- the timed phase ----

/// A call that failed, to look its transfer up afterwards: the ledger may have applied it.
#[derive(Clone, Debug)]
struct Failed {
    payer: usize,
    payee: usize,
    key: TransferKey,
}

/// One caller's record.
#[derive(Debug)]
struct Caller {
    /// Latency of the acknowledged timed calls.
    latency_us: Histogram<u64>,
    timed_acknowledged: u64,
    /// Acknowledged calls, the untimed first one included.
    acknowledged: u64,
    /// Credits each wallet gained (or lost) through the acknowledged calls.
    deltas: Vec<i64>,
    seqs: Vec<u64>,
    /// Failures by kind: count and the first message.
    errors: BTreeMap<String, (u64, String)>,
    failed: Vec<Failed>,
    /// Timed calls a `prepared` caller had to sign in the window: its requests ran out.
    signed_in_window: u64,
}

impl Caller {
    /// Adds `other`'s record to this one.
    fn absorb(&mut self, other: Caller) {
        // Invariant: every histogram has the same bounds, so adding cannot fail.
        self.latency_us.add(&other.latency_us).expect("same histogram bounds");
        self.timed_acknowledged += other.timed_acknowledged;
        self.acknowledged += other.acknowledged;
        for (total, delta) in self.deltas.iter_mut().zip(&other.deltas) {
            *total += delta;
        }
        self.seqs.extend(other.seqs);
        for (kind, (count, example)) in other.errors {
            self.errors.entry(kind).or_insert((0, example)).0 += count;
        }
        self.failed.extend(other.failed);
        self.signed_in_window += other.signed_in_window;
    }

    fn new(agents: usize) -> Caller {
        Caller {
            latency_us: latency_histogram(),
            timed_acknowledged: 0,
            acknowledged: 0,
            deltas: vec![0; agents],
            seqs: Vec::new(),
            errors: BTreeMap::new(),
            failed: Vec::new(),
            signed_in_window: 0,
        }
    }

    /// One `call` by agent `payer`, made and judged.
    async fn call(&mut self, sender: &mut Sender, agents: &[AgentCredentials], call: Call, payer: usize, timed: bool) {
        let sent = sender.send(agents, call, payer).await;
        self.signed_in_window += u64::from(timed && sent.signed_now);
        self.judge(call, agents, payer, sent, timed);
    }

    fn record(&mut self, elapsed: Duration, timed: bool) {
        self.acknowledged += 1;
        if timed {
            self.timed_acknowledged += 1;
            self.latency_us.saturating_record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
        }
    }

    fn fail(&mut self, (kind, message): (String, String), timed: bool) {
        let kind = if timed { kind } else { format!("{kind} (first call)") };
        self.errors.entry(kind).or_insert((0, message)).0 += 1;
    }

    /// Records a call's answer: acknowledged as `call` expects, or failed.
    fn judge(&mut self, call: Call, agents: &[AgentCredentials], payer: usize, sent: Sent, timed: bool) {
        let Sent { payee, amount, key, answer, elapsed, .. } = sent;
        let failure = match (call, answer) {
            (Call::Pay, Ok(Answer::Applied(transfer))) => {
                match wrong_answer(&transfer, &agents[payer], &agents[payee], amount) {
                    None => {
                        self.deltas[payer] -= amount as i64;
                        self.deltas[payee] += amount as i64;
                        self.seqs.push(transfer.seq);
                        return self.record(elapsed, timed);
                    }
                    Some(wrong) => ("wrong answer".to_owned(), wrong),
                }
            }
            (Call::Refused, Ok(Answer::Refused(problem))) if problem.code == "invalid_amount" => {
                return self.record(elapsed, timed);
            }
            (Call::Refused, Ok(Answer::Applied(transfer))) => {
                ("wrong answer".to_owned(), format!("a payment of 0 was applied: {transfer:?}"))
            }
            (_, Ok(Answer::Refused(problem))) => {
                (format!("HTTP {} {}", problem.status, problem.code), problem.to_string())
            }
            (_, Err(failure)) => failure,
        };
        self.fail(failure, timed);
        if call == Call::Pay {
            self.failed.push(Failed { payer, payee, key });
        }
    }
}

/// Whom `payer` pays and how much: a random other agent and amount, or for `refused`, 0
/// credits to the next agent.
fn pick(call: Call, payer: usize, agents: usize, rng: &mut impl rand::Rng) -> (usize, u64) {
    match call {
        Call::Pay => {
            let other = rng.gen_range(0..agents - 1);
            (if other >= payer { other + 1 } else { other }, rng.gen_range(1..=AMOUNT_MICROS_MAX))
        }
        Call::Refused => ((payer + 1) % agents, 0),
    }
}

/// What a timed phase repeats, by whom and for how long.
#[derive(Clone, Copy, Debug)]
struct How {
    call: Call,
    client: Client,
    clients: usize,
    seconds: u64,
}

/// One call as sent, and its answer.
struct Sent {
    payee: usize,
    amount: u64,
    key: TransferKey,
    answer: Result<Answer, (String, String)>,
    /// From sending (or, where the call was signed as it went, from signing) to the answer.
    elapsed: Duration,
    /// A `prepared` caller had to sign this call as it went: its requests ran out.
    signed_now: bool,
}

/// How one caller sends its calls.
enum Sender {
    Sdk(ApiClient),
    Prepared { connection: Connection, queue: Queue, host: HeaderValue },
}

impl Sender {
    /// Makes one `call` by agent `payer` and waits for its answer (at most [`CALL_TIMEOUT`]).
    async fn send(&mut self, agents: &[AgentCredentials], call: Call, payer: usize) -> Sent {
        let started = Instant::now();
        match self {
            Sender::Sdk(api) => {
                let (payee, amount) = pick(call, payer, agents.len(), &mut rand::thread_rng());
                // Invariant: AMOUNT_MICROS_MAX is far below Credits::MAX.
                let credits = Credits::from_micros(amount).expect("a small amount is valid");
                let payment =
                    Payment { key: TransferKey::random(), to: agents[payee].agent_id, amount: credits, linked: false };
                let answer = tokio::time::timeout(CALL_TIMEOUT, api.pay(&agents[payer], &payment)).await;
                let elapsed = started.elapsed();
                let answer = match answer {
                    Ok(Ok(transfer)) => Ok(Answer::Applied(Box::new(transfer))),
                    Ok(Err(ApiError::Problem { problem, .. })) => Ok(Answer::Refused(problem)),
                    Ok(Err(error)) => Err((error_kind(&error), error.to_string())),
                    Err(_) => Err(timed_out()),
                };
                Sent { payee, amount, key: payment.key, answer, elapsed, signed_now: false }
            }
            Sender::Prepared { connection, queue, host } => {
                let (prepared, started, signed_now) = match queue.next() {
                    Some(prepared) => (prepared, Instant::now(), false),
                    None => {
                        let (payee, amount) = pick(call, payer, agents.len(), &mut rand::thread_rng());
                        (prepared::prepare(agents, payer, payee, amount, host), started, true)
                    }
                };
                let (payee, amount, key) = (prepared.payee, prepared.amount, prepared.key.clone());
                let answer = tokio::time::timeout(CALL_TIMEOUT, connection.send(prepared)).await;
                let elapsed = started.elapsed();
                let answer = answer.unwrap_or_else(|_| Err(timed_out()));
                Sent { payee, amount, key, answer, elapsed, signed_now }
            }
        }
    }

    /// The sender of caller `payer` (for `prepared`, its requests signed now: this takes
    /// a while, on a thread of the blocking pool).
    async fn new(
        api: &ApiClient,
        address: std::net::SocketAddr,
        agents: &Arc<Vec<AgentCredentials>>,
        how: How,
        payer: usize,
    ) -> Sender {
        match how.client {
            Client::Sdk => Sender::Sdk(api.clone()),
            Client::Prepared => {
                let connection = Connection::new(address);
                let host = connection.host();
                // One for the untimed first call.
                let count = prepared::prepared_per_caller(how.seconds, how.clients) + 1;
                let (agents, host_for_signing) = (Arc::clone(agents), host.clone());
                let requests = tokio::task::spawn_blocking(move || {
                    let mut rng = rand::thread_rng();
                    (0..count)
                        .map(|_| {
                            let (payee, amount) = pick(how.call, payer, agents.len(), &mut rng);
                            prepared::prepare(&agents, payer, payee, amount, &host_for_signing)
                        })
                        .collect()
                })
                .await;
                // A panic while signing is a bug in the bench: the caller signs as it goes.
                Sender::Prepared { connection, queue: Queue::new(requests.unwrap_or_default()), host }
            }
        }
    }
}

fn timed_out() -> (String, String) {
    (format!("no answer within {} s", CALL_TIMEOUT.as_secs()), "timed out".to_owned())
}

/// What is wrong with an acknowledged payment's journal entry, if anything.
fn wrong_answer(
    transfer: &LedgerTransfer,
    payer: &AgentCredentials,
    payee: &AgentCredentials,
    amount: u64,
) -> Option<String> {
    let expected = (wallet_account(payer.agent_id), wallet_account(payee.agent_id), amount);
    let got = (transfer.debit_account.clone(), transfer.credit_account.clone(), transfer.amount.micros());
    let shape = transfer.kind == TransferKind::Posted && transfer.purpose == Purpose::Payment;
    (got != expected || !shape).then(|| format!("asked for {expected:?} (a posted payment), got {transfer:?}"))
}

/// A short, stable name for a kind of failure.
fn error_kind(error: &ApiError) -> String {
    match error {
        ApiError::Problem { problem, .. } => format!("HTTP {} {}", problem.status, problem.code),
        ApiError::Status { status, .. } => format!("HTTP {status} without a problem document"),
        ApiError::Transport { source, .. } if source.is_timeout() => "transport: timed out".to_owned(),
        ApiError::Transport { source, .. } if source.is_connect() => "transport: connecting".to_owned(),
        ApiError::Transport { .. } => "transport: other".to_owned(),
        ApiError::Decode { .. } => "undecodable answer".to_owned(),
        _ => "other".to_owned(),
    }
}

/// What a timed phase measured: every caller's record added up, and the phase's clock
/// and CPU counters.
#[derive(Debug)]
struct Phase {
    clients: usize,
    /// From the start signal to the last caller's last answer.
    elapsed: Duration,
    calls: Caller,
    cpu_start: CpuMark,
    cpu_end: CpuMark,
}

impl Phase {
    fn failed_calls(&self) -> u64 {
        self.calls.errors.values().map(|(count, _)| count).sum()
    }

    fn failure_lines(&self) -> Vec<String> {
        self.calls
            .errors
            .iter()
            .map(|(kind, (count, example))| format!("{count} call(s) failed: {kind}: {example}"))
            .collect()
    }
}

/// Every caller makes one untimed call (opening its connection), then all start together
/// and call until `seconds` have passed.
async fn timed_phase(
    api: &ApiClient,
    agents: &Arc<Vec<AgentCredentials>>,
    how: How,
    server: &Server,
) -> anyhow::Result<Phase> {
    let How { call, clients, seconds, .. } = how;
    let warmed_up = Arc::new(Barrier::new(clients + 1));
    let (start, start_signal) = watch::channel(None::<tokio::time::Instant>);
    let mut tasks = JoinSet::new();
    let address = server.control_plane.addr();
    for index in 0..clients {
        let (api, agents, warmed_up, mut start_signal) =
            (api.clone(), Arc::clone(agents), Arc::clone(&warmed_up), start_signal.clone());
        tasks.spawn(async move {
            let payer = index % agents.len();
            let mut caller = Caller::new(agents.len());
            let mut sender = Sender::new(&api, address, &agents, how, payer).await;
            caller.call(&mut sender, &agents, call, payer, false).await;
            warmed_up.wait().await;
            let Ok(deadline) = start_signal.wait_for(Option::is_some).await.map(|deadline| *deadline) else {
                return caller;
            };
            while deadline.is_some_and(|deadline| tokio::time::Instant::now() < deadline) {
                caller.call(&mut sender, &agents, call, payer, true).await;
            }
            caller
        });
    }
    // Every first call is bounded by CALL_TIMEOUT, so every caller reaches the barrier
    // (after signing its requests, for `prepared`).
    tokio::time::timeout(PREPARE_TIMEOUT + CALL_TIMEOUT + Duration::from_secs(5), warmed_up.wait())
        .await
        .context("the callers' first calls did not end in time")?;
    let postgres_pids = server.postgres_pids();
    let cpu_start = server.cpu_mark(&postgres_pids);
    let started = tokio::time::Instant::now();
    start.send_replace(Some(started + Duration::from_secs(seconds)));
    let run_deadline = started + Duration::from_secs(seconds) + CALL_TIMEOUT + Duration::from_secs(5);
    let mut callers = Vec::with_capacity(clients);
    while let Some(caller) =
        tokio::time::timeout_at(run_deadline, tasks.join_next()).await.context("the callers did not stop in time")?
    {
        callers.push(caller.context("a caller task failed")?);
    }
    let elapsed = started.elapsed();
    let mut cpu_end = server.cpu_mark(&postgres_pids);
    // Server processes that started during the run count from zero.
    for pid in server.postgres_pids() {
        if let std::collections::btree_map::Entry::Vacant(entry) = cpu_end.postgres.entry(pid) {
            entry.insert(process_cpu_time(pid).unwrap_or_default());
        }
    }
    Ok(merge(clients, elapsed, callers, agents.len(), cpu_start, cpu_end))
}

fn merge(
    clients: usize,
    elapsed: Duration,
    callers: Vec<Caller>,
    agents: usize,
    cpu_start: CpuMark,
    cpu_end: CpuMark,
) -> Phase {
    let mut calls = Caller::new(agents);
    for caller in callers {
        calls.absorb(caller);
    }
    Phase { clients, elapsed, calls, cpu_start, cpu_end }
}

/// CPU counters at one instant.
#[derive(Clone, Debug)]
struct CpuMark {
    control_plane: Duration,
    postgres: BTreeMap<u32, Duration>,
    bench: Duration,
    system: Duration,
    at: Instant,
}

/// CPU used over a phase.
#[derive(Clone, Copy, Debug)]
struct CpuUse {
    control_plane: Duration,
    /// `None` on SQLite.
    postgres: Option<Duration>,
    bench: Duration,
    other: Duration,
}

// ---- the books ----

/// What became of the failed calls: the payments the ledger applied anyway.
#[derive(Debug, Default)]
struct Resolved {
    applied: u64,
    deltas: Vec<i64>,
    /// Failed calls whose fate could not be learned.
    unknown: Vec<String>,
}

/// Looks every failed call's transfer id up (at most [`LOOKUPS_MAX`]).
async fn resolve_failures(api: &ApiClient, agents: &[AgentCredentials], failed: &[Failed]) -> Resolved {
    let mut resolved = Resolved { deltas: vec![0; agents.len()], ..Resolved::default() };
    if failed.len() > LOOKUPS_MAX {
        resolved.unknown.push(format!("{} failed calls, more than the {LOOKUPS_MAX} looked up", failed.len()));
        return resolved;
    }
    for call in failed {
        let lookup = tokio::time::timeout(CALL_TIMEOUT, api.transfer(&agents[call.payer], &call.key)).await;
        match lookup {
            Ok(Ok(lookup)) if lookup.status == TransferStatus::Applied => match lookup.transfer {
                Some(transfer)
                    if wrong_answer(&transfer, &agents[call.payer], &agents[call.payee], transfer.amount.micros())
                        .is_none() =>
                {
                    resolved.applied += 1;
                    resolved.deltas[call.payer] -= transfer.amount.micros() as i64;
                    resolved.deltas[call.payee] += transfer.amount.micros() as i64;
                }
                other => resolved.unknown.push(format!("{}: applied as {other:?}", call.key)),
            },
            Ok(Ok(lookup)) if lookup.status == TransferStatus::Rejected => {}
            Ok(Err(error)) if error.status() == Some(404) => {}
            Ok(Ok(lookup)) => resolved.unknown.push(format!("{}: {lookup:?}", call.key)),
            Ok(Err(error)) => resolved.unknown.push(format!("{}: {error}", call.key)),
            Err(_) => resolved.unknown.push(format!("{}: the lookup timed out", call.key)),
        }
    }
    resolved
}

/// The audit and every wallet's balance, read through the admin API.
#[derive(Debug)]
struct Books {
    audit: LedgerAudit,
    balances: Vec<i64>,
    /// The issuance account's balance: minus the money supply.
    issuance: i64,
}

fn read_books(bench: &Bench, admin: &ApiClient, agents: &[AgentCredentials]) -> anyhow::Result<Books> {
    bench.runtime.block_on(async {
        let read = async {
            let audit = admin.ledger_audit().await.context("while auditing the ledger")?;
            let mut balances = Vec::with_capacity(agents.len());
            for agent in agents {
                let account = admin.ledger_account(&wallet_account(agent.agent_id)).await?;
                balances.push(account.balance.0);
            }
            let issuance = admin.ledger_account("issuance").await.context("while reading the issuance account")?;
            anyhow::Ok(Books { audit, balances, issuance: issuance.balance.0 })
        };
        tokio::time::timeout(SETUP_TIMEOUT, read).await.context("reading the books took too long")?
    })
}

impl Books {
    /// The audit passes, and the wallets hold exactly what was minted.
    fn check_minted(&self, when: &str, agents: usize) -> Vec<String> {
        let mut failures = Vec::new();
        let audit = &self.audit;
        if !audit.ok || audit.problem_count != 0 || audit.debits_posted != audit.credits_posted {
            failures.push(format!("{when}: the audit failed: {audit:?}"));
        }
        let minted = MINTED_PER_AGENT_MICROS as i64 * agents as i64;
        let held: i64 = self.balances.iter().sum();
        if held != minted || self.issuance != -minted {
            failures.push(format!(
                "{when}: the wallets hold {held} micro-credits and the issuance account {}, for {minted} minted",
                self.issuance
            ));
        }
        failures
    }
}

/// The checks of one phase, as printed, and the failed ones.
#[derive(Debug, Default)]
struct Checks {
    audit: String,
    journal: String,
    wallets: String,
    failures: Vec<String>,
}

impl Checks {
    /// The books could not be read after the phase.
    fn unread(error: &anyhow::Error) -> Checks {
        let unchecked = "NOT CHECKED: the books could not be read".to_owned();
        Checks {
            audit: unchecked.clone(),
            journal: unchecked.clone(),
            wallets: unchecked,
            failures: vec![format!("the books could not be read after the phase: {error:#}")],
        }
    }
}

fn check_phase(before: &Books, after: &Books, phase: &Phase, resolved: &Resolved, agents: usize) -> Checks {
    let mut checks = Checks { failures: after.check_minted("after the phase", agents), ..Checks::default() };
    checks.audit = if after.audit.ok {
        format!("ok, {} entries, debits = credits", thousands(after.audit.transfers as f64))
    } else {
        format!("FAILED: {} problem(s)", after.audit.problem_count)
    };
    let added = after.audit.transfers.saturating_sub(before.audit.transfers);
    let acknowledged = phase.calls.seqs.len() as u64;
    let applied = acknowledged + resolved.applied;
    checks.journal = format!(
        "{} added; {} pays applied ({} acknowledged, {} failed yet applied)",
        thousands(added as f64),
        thousands(applied as f64),
        thousands(acknowledged as f64),
        resolved.applied
    );
    if added != applied {
        checks.failures.push(format!("the journal grew by {added} entries, but {applied} payments were applied"));
    }
    let distinct: HashSet<u64> = phase.calls.seqs.iter().copied().collect();
    if distinct.len() != phase.calls.seqs.len() {
        checks
            .failures
            .push(format!("{} acknowledged pays share a journal seq", phase.calls.seqs.len() - distinct.len()));
    }
    let wrong: Vec<usize> = (0..agents)
        .filter(|&i| after.balances[i] != before.balances[i] + phase.calls.deltas[i] + resolved.deltas[i])
        .collect();
    checks.wallets = if wrong.is_empty() {
        "each moved by exactly the pays applied; together they hold what was minted".to_owned()
    } else {
        format!("FAILED: {} wallet(s) off", wrong.len())
    };
    if !wrong.is_empty() {
        checks.failures.push(format!("{} wallet(s) did not move by the acknowledged amounts: {wrong:?}", wrong.len()));
    }
    checks.failures.extend(resolved.unknown.iter().map(|unknown| format!("failed call of unknown fate: {unknown}")));
    checks
}

// ---- the figures ----

fn section(
    title: String,
    How { call, client, .. }: How,
    phase: &Phase,
    cpu: &CpuUse,
    checks: &Checks,
    (load_before, load_after): (String, String),
    verify_us: f64,
) -> Section {
    let mut section = Section::new(title);
    section.note(match call {
        Call::Pay => PAY_NOTE,
        Call::Refused => REFUSED_NOTE,
    });
    section.note(match client {
        Client::Prepared => PREPARED_NOTE,
        Client::Sdk => SDK_NOTE,
    });
    if phase.calls.signed_in_window > 0 {
        section.note(format!(
            "{} timed calls were signed within the window: the prepared requests ran out or grew stale",
            thousands(phase.calls.signed_in_window as f64)
        ));
    }
    section.note(format!(
        "{} callers (closed loop, one call at a time each); amounts 1–{AMOUNT_MICROS_MAX} micro-credits; fee 0; one \
         Ed25519 verify on this machine: {verify_us:.1} µs",
        phase.clients
    ));
    section.note(format!("1-minute load average {load_before} before, {load_after} after"));
    let wall = phase.cpu_end.at.duration_since(phase.cpu_start.at).as_secs_f64();
    let others = cpu.other.as_secs_f64() / wall;
    if others >= 2.0 * QUIET_CORES_MAX {
        section.note(format!("WARNING: other processes used {others:.2} cores during this phase"));
    }
    let seconds = phase.elapsed.as_secs_f64();
    let rate = phase.calls.timed_acknowledged as f64 / seconds;
    let (ms, p) = (|us: u64| us as f64 / 1000.0, |q: f64| phase.calls.latency_us.value_at_quantile(q));
    let any = phase.calls.timed_acknowledged > 0;
    let p99 = if any { ms(p(0.99)) } else { f64::NAN };
    if call == Call::Pay {
        section.target(
            "acknowledged calls/s",
            rate,
            thousands(rate),
            Target::AtLeast(TARGET_CALLS_PER_SECOND),
            "≥ 10,000",
        );
        section.target("p99 latency", p99, format!("{p99:.1} ms"), Target::AtMost(TARGET_P99_MS), "≤ 10 ms");
    } else {
        // The floor under a payment, beside the payments' target.
        section.info("acknowledged calls/s (payments' target ≥ 10,000)", thousands(rate));
        section.info("p99 latency (payments' target ≤ 10 ms)", format!("{p99:.1} ms"));
    }
    section.info(
        "p50 / p99.9 / max latency",
        format!("{:.1} / {:.1} / {:.1} ms", ms(p(0.5)), ms(p(0.999)), ms(phase.calls.latency_us.max())),
    );
    section.info(
        "calls acknowledged in the timed window",
        format!("{} in {seconds:.2} s", thousands(phase.calls.timed_acknowledged as f64)),
    );
    let failed = phase.calls.errors.iter().map(|(kind, (count, _))| format!("{kind}: {count}")).collect::<Vec<_>>();
    let failed =
        if failed.is_empty() { "0".to_owned() } else { format!("{} ({})", phase.failed_calls(), failed.join("; ")) };
    section.info("calls failed", failed);
    let per_thousand = |used: Duration| {
        let per = used.as_secs_f64() * 1000.0 / phase.calls.timed_acknowledged.max(1) as f64;
        format!("{per:.3} s ({:.2} cores)", used.as_secs_f64() / wall)
    };
    section.info("control plane CPU per 1000 calls", per_thousand(cpu.control_plane));
    if let Some(postgres) = cpu.postgres {
        section.info("PostgreSQL CPU per 1000 calls", per_thousand(postgres));
    }
    section.info("bench client CPU per 1000 calls", per_thousand(cpu.bench));
    section.info("other processes", format!("{others:.2} cores"));
    section.info("audit after the phase", checks.audit.clone());
    section.info("journal", checks.journal.clone());
    section.info("wallets", checks.wallets.clone());
    section
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_servers_are_accepted() {
        for url in [DEFAULT_POSTGRES_URL, "postgres://localhost/postgres", "postgres://u@[::1]:5433/db"] {
            assert!(check_loopback(url).is_ok(), "{url}");
        }
        for url in ["postgres://postgres@db.internal:5432/postgres", "postgres://10.0.0.1/postgres"] {
            assert!(check_loopback(url).is_err(), "{url}");
        }
    }
}
