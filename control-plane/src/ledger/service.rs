//! [`Ledger`]: the handle the API and the background work use.
//!
//! **Group commit.** Requests queue their commands ([`LEDGER_QUEUE_DEPTH`] jobs at most);
//! a writer task takes every queued job up to [`BATCH_COMMANDS_MAX`] commands
//! ([`crate::batch::collect`]) and runs them in one transaction
//! ([`BatchStore::execute`]), then answers each job. Under load one commit (one fsync)
//! carries hundreds of requests; idle, a request is a transaction of its own. On
//! PostgreSQL [`WRITER_TASKS_POSTGRES`] writers share the queue: while one batch is
//! written the other writer collects and prepares the next
//! ([`super::postgres`]). On SQLite the batches of a process run one at a time (they
//! queue on the database's write lock anyway), but a batch's commit is synced after the
//! lock is released ([`super::sqlite`]), so [`WRITER_TASKS_SQLITE`] is two: one writes
//! while the other waits for its sync. A writer keeps the queue until its batch has
//! committed, so the next batch is everything queued meanwhile.
//!
//! **Retries.** A batch that fails with a serialization failure, a deadlock or a busy
//! database is run again from the start in a new transaction, up to
//! [`RETRY_ATTEMPTS_MAX`] times with a growing pause; clients never see these. A batch
//! of several jobs failing otherwise is split and each job run alone, so one job cannot
//! fail another.
//!
//! **Signed requests.** [`Ledger::execute_signed`] runs an agent's command together with
//! its request's nonce. On SQLite the nonce goes into the batch: the batch's transaction
//! reads which of its nonces are recorded, runs nothing for those (a replay), and records
//! the others with the batch's writes. So a signed payment is one commit, not two, and
//! takes one turn at the database's write lock. On PostgreSQL the
//! [`crate::agent_auth::NonceRecorder`] records the nonce first, as for any signed request.
//!
//! **Expiry.** [`Ledger::spawn_expiry_worker`] runs [`Ledger::run_expiry_once`] every
//! [`EXPIRY_INTERVAL`] while this replica holds the `ledger-expiry` lease: expired escrows
//! are voided or released as each says, and matured unbondings return to the wallet.
//! Both are commands like any other, so an escrow resolved meanwhile is simply skipped.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use molt_protocol::UnixMillis;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::engine::{Command, Outcome, Requester};
use super::escrow::EscrowEvent;
use super::postgres::OnDecided;
use super::store::{self, BatchStore, LedgerQueryError};
use crate::agent_auth::{NonceError, NonceRecorder, RequestNonce};
use crate::batch;
use crate::clock::Clock;
use crate::db::{Backend, Database};

/// Jobs waiting for a writer.
pub const LEDGER_QUEUE_DEPTH: usize = 4096;
/// Most commands one transaction carries (a job larger than this runs alone).
pub const BATCH_COMMANDS_MAX: usize = 8192;
/// Writer tasks per process on PostgreSQL: one writing, one preparing (module docs).
pub const WRITER_TASKS_POSTGRES: usize = 2;
/// Writer tasks per process on SQLite: one writing, one syncing its commit (module docs).
pub const WRITER_TASKS_SQLITE: usize = 2;
/// Attempts at a batch that keeps failing with retryable errors.
pub const RETRY_ATTEMPTS_MAX: u32 = 10;
/// How often the expiry worker looks for due escrows and unbondings.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long the expiry lease lasts without renewal.
pub const EXPIRY_LEASE_TTL: Duration = Duration::from_secs(15);
/// Name of the expiry lease.
pub const EXPIRY_LEASE: &str = "ledger-expiry";
/// Escrows and unbondings one expiry pass handles at most (each kind).
pub const EXPIRY_BATCH_MAX: u32 = 1000;

/// Why a ledger call failed (the ledger's own refusals are in the outcomes).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("ledger unavailable")]
    Query(#[from] LedgerQueryError),
    #[error("ledger unavailable: the writer stopped")]
    Stopped,
    #[error("ledger unavailable: the request's nonce could not be recorded")]
    Nonce(#[from] NonceError),
    /// The signed request was made before (its nonce is recorded); nothing ran.
    #[error("the request was replayed")]
    Replayed,
}

type Reply = oneshot::Sender<Result<Vec<Outcome>, Arc<LedgerError>>>;

#[derive(Debug)]
struct Job {
    commands: Vec<Command>,
    /// The nonce of the signed request that made the job's one command (SQLite only).
    nonce: Option<RequestNonce>,
    reply: Reply,
}

/// The ledger service; cheap to share (`Arc`). Its writer tasks start with the first
/// command and stop when the handle is dropped.
#[derive(Debug)]
pub struct Ledger {
    db: Database,
    store: Arc<BatchStore>,
    clock: Arc<dyn Clock>,
    queue: OnceLock<mpsc::Sender<Job>>,
}

impl Ledger {
    pub fn new(db: Database, clock: Arc<dyn Clock>) -> Ledger {
        Ledger { store: Arc::new(BatchStore::new(db.clone())), db, clock, queue: OnceLock::new() }
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    pub fn now(&self) -> UnixMillis {
        self.clock.now()
    }

    /// Runs commands through the group-commit writers; one outcome per command.
    pub async fn execute(&self, commands: Vec<Command>) -> Result<Vec<Outcome>, Arc<LedgerError>> {
        self.enqueue(commands, None).await
    }

    /// Runs the command of an agent's signed request and records the request's nonce
    /// (module docs): [`LedgerError::Replayed`] if it was recorded already, and then the
    /// command did not run. `nonces` records it on PostgreSQL.
    pub async fn execute_signed(
        &self,
        nonce: RequestNonce,
        command: Command,
        nonces: &NonceRecorder,
    ) -> Result<Outcome, Arc<LedgerError>> {
        let outcomes = match self.db.backend() {
            Backend::Sqlite => self.enqueue(vec![command], Some(nonce)).await?,
            Backend::Postgres => {
                let fresh = nonces.record_nonce(&nonce, self.clock.now()).await.map_err(|e| Arc::new(e.into()))?;
                if !fresh {
                    return Err(Arc::new(LedgerError::Replayed));
                }
                self.enqueue(vec![command], None).await?
            }
        };
        match outcomes.into_iter().next() {
            Some(Outcome::Replayed) => Err(Arc::new(LedgerError::Replayed)),
            Some(outcome) => Ok(outcome),
            None => Err(Arc::new(LedgerError::Stopped)),
        }
    }

    async fn enqueue(
        &self,
        commands: Vec<Command>,
        nonce: Option<RequestNonce>,
    ) -> Result<Vec<Outcome>, Arc<LedgerError>> {
        let queue = self.queue.get_or_init(|| spawn_writers(Arc::clone(&self.store), Arc::clone(&self.clock)));
        let (reply, answer) = oneshot::channel();
        queue.send(Job { commands, nonce, reply }).await.map_err(|_| Arc::new(LedgerError::Stopped))?;
        answer.await.map_err(|_| Arc::new(LedgerError::Stopped))?
    }

    /// Runs commands in the caller's task, in one transaction, with retries.
    pub async fn execute_now(&self, commands: &[Command]) -> Result<Vec<Outcome>, LedgerError> {
        execute_with_retries(&self.store, self.clock.as_ref(), commands, &[], None).await
    }

    /// One expiry pass: resolves expired escrows and releases matured unbondings.
    /// Returns how many commands it ran.
    pub async fn run_expiry_once(&self) -> Result<usize, Arc<LedgerError>> {
        let now = self.clock.now();
        let escrows = store::due_escrows(&self.db, now, EXPIRY_BATCH_MAX).await.map_err(|e| Arc::new(e.into()))?;
        let unbondings =
            store::due_unbondings(&self.db, now, EXPIRY_BATCH_MAX).await.map_err(|e| Arc::new(e.into()))?;
        let commands: Vec<Command> = escrows
            .into_iter()
            .map(|id| Command::Escrow { id, requester: Requester::System, event: EscrowEvent::Expire })
            .chain(unbondings.into_iter().map(|id| Command::Mature { id }))
            .collect();
        let count = commands.len();
        if count > 0 {
            self.execute(commands).await?;
        }
        Ok(count)
    }

    /// Runs the expiry work while `holder` holds the lease; stops when the returned
    /// handle is dropped.
    pub fn spawn_expiry_worker(self: &Arc<Self>, holder: String) -> ExpiryWorker {
        let ledger = Arc::clone(self);
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(EXPIRY_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let now = ledger.clock.now();
                match ledger.db.try_acquire_lease(EXPIRY_LEASE, &holder, EXPIRY_LEASE_TTL, now).await {
                    Ok(true) => {
                        if let Err(error) = ledger.run_expiry_once().await {
                            tracing::warn!(error = %error, "ledger expiry pass failed");
                        }
                    }
                    Ok(false) => {}
                    Err(error) => tracing::warn!(%error, "ledger expiry lease check failed"),
                }
            }
        });
        ExpiryWorker { task }
    }
}

/// The expiry worker; stops when dropped.
#[derive(Debug)]
pub struct ExpiryWorker {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ExpiryWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spawn_writers(store: Arc<BatchStore>, clock: Arc<dyn Clock>) -> mpsc::Sender<Job> {
    let (sender, receiver) = mpsc::channel(LEDGER_QUEUE_DEPTH);
    let receiver = Arc::new(Mutex::new(receiver));
    let writers = match store.db().backend() {
        Backend::Postgres => WRITER_TASKS_POSTGRES,
        Backend::Sqlite => WRITER_TASKS_SQLITE,
    };
    for _ in 0..writers {
        // The tasks end when every sender (the Ledger) is gone and the queue is empty.
        tokio::spawn(run_writer(Arc::clone(&store), Arc::clone(&clock), Arc::clone(&receiver)));
    }
    sender
}

/// One writer: takes the queue, collects a batch, and keeps the queue until a large batch
/// has decided what it writes, or a small one has committed
/// ([`super::postgres::LARGE_BATCH_TRANSFERS`]; on SQLite, until any batch has committed,
/// before its sync); so the other writer collects the next batch from everything queued
/// meanwhile, not the moment this one was collected.
async fn run_writer(store: Arc<BatchStore>, clock: Arc<dyn Clock>, receiver: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let mut queue = Arc::clone(&receiver).lock_owned().await;
        let Some(jobs) = batch::collect(&mut queue, BATCH_COMMANDS_MAX, |job| job.commands.len()).await else {
            return;
        };
        run_jobs(&store, clock.as_ref(), jobs, Box::new(move || drop(queue))).await;
    }
}

async fn run_jobs(store: &BatchStore, clock: &dyn Clock, jobs: Vec<Job>, on_decided: OnDecided) {
    let mut commands: Vec<Command> = Vec::with_capacity(jobs.iter().map(|job| job.commands.len()).sum());
    let mut nonces = Vec::new();
    for job in &jobs {
        if let Some(nonce) = &job.nonce {
            nonces.push((commands.len(), nonce.clone()));
        }
        commands.extend(job.commands.iter().cloned());
    }
    match execute_with_retries(store, clock, &commands, &nonces, Some(on_decided)).await {
        Ok(mut outcomes) => {
            for job in jobs.into_iter().rev() {
                let rest = outcomes.split_off(outcomes.len() - job.commands.len());
                let _ = job.reply.send(Ok(rest));
            }
        }
        // A batch committed but not synced must not run again: its jobs share the error.
        Err(error) if jobs.len() == 1 || matches!(&error, LedgerError::Query(e) if e.is_unsynced_commit()) => {
            let error = Arc::new(error);
            for job in jobs {
                let _ = job.reply.send(Err(Arc::clone(&error)));
            }
        }
        Err(error) => {
            tracing::warn!(%error, jobs = jobs.len(), "ledger batch failed; running its jobs one by one");
            for job in jobs {
                let nonces: Vec<(usize, RequestNonce)> = job.nonce.iter().map(|nonce| (0, nonce.clone())).collect();
                let result = execute_with_retries(store, clock, &job.commands, &nonces, None).await.map_err(Arc::new);
                let _ = job.reply.send(result);
            }
        }
    }
}

async fn execute_with_retries(
    store: &BatchStore,
    clock: &dyn Clock,
    commands: &[Command],
    nonces: &[(usize, RequestNonce)],
    mut on_decided: Option<OnDecided>,
) -> Result<Vec<Outcome>, LedgerError> {
    let mut attempt = 0;
    loop {
        // The first attempt calls it (or drops it, failing early); retries need not.
        let on_decided = on_decided.take().unwrap_or_else(|| Box::new(|| {}));
        match store.execute_signed_then(commands, nonces, clock.now(), on_decided).await {
            Ok(outcomes) => return Ok(outcomes),
            Err(error) if error.is_retryable() && attempt + 1 < RETRY_ATTEMPTS_MAX => {
                attempt += 1;
                tracing::debug!(%error, attempt, "ledger batch conflicted; retrying");
                let jitter = u64::from(rand::random::<u8>() % 8);
                tokio::time::sleep(Duration::from_millis((2u64 << attempt.min(6)) + jitter)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}
