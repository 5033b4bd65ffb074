//! Storage: one [`Database`] handle over SQLite (the embedded default) or PostgreSQL.
//!
//! **Design.** The handle wraps a [`sqlx::AnyPool`] plus the [`Backend`] it talks to.
//! Every statement is written once, with `$N` placeholders, which both SQLite and
//! PostgreSQL accept; the SQL used sticks to what both implement (`ON CONFLICT … DO
//! UPDATE … WHERE`, `RETURNING`-free inserts, 64-bit integers, byte strings, text). Where
//! a later feature needs dialect-specific SQL (full-text search), it branches on
//! [`Database::backend`]. The DDL differs per backend, so each has its own migrations
//! (`migrations/sqlite`, `migrations/postgres`), embedded in the binary and applied by
//! [`Database::connect`]; on PostgreSQL sqlx serialises concurrent migration runs with an
//! advisory lock, so replicas may start together.
//!
//! **Rules for callers and for new queries.** Every change touching more than one row
//! runs in one transaction ([`Database::begin`]). Races between replicas are settled by
//! the database in a single statement (a unique index, a conditional upsert), never by a
//! read followed by a write. Times are passed in (`now`), never read here.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use molt_protocol::time::UnixMillis;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::pool::{PoolConnection, PoolConnectionMetadata};
use sqlx::{AnyPool, Row as _};

use crate::auth::{AdminToken, BOOTSTRAP_KEY_NAME, Scopes};
use crate::ids::{AdminKeyId, OrgId};
use crate::model::{AdminKey, AdminKeyName, Org, OrgName};

/// Rows a listing returns when the caller does not say.
pub const PAGE_LIMIT_DEFAULT: u32 = 100;
/// Most rows one listing returns.
pub const PAGE_LIMIT_MAX: u32 = 1000;

/// Columns of an [`AdminKey`] row, for `concat!`.
macro_rules! admin_key_columns {
    () => {
        "id, name, scopes, created_at_ms, revoked_at_ms"
    };
}

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// Which database server the handle talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a connection URL selects, if any.
    pub fn from_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// Bytes of a SQLite file read through a memory mapping (address space, not memory).
pub const SQLITE_MMAP_BYTES: u64 = 4 << 30;
/// Page cache of each SQLite connection, in KiB: writes go through it, and index
/// inserts into a large file miss a small one on almost every row.
pub const SQLITE_CACHE_KIB: u64 = 64 * 1024;
/// A pooled connection idle for at least this long is checked (a round trip) before it is
/// handed out, so that one the server closed meanwhile (a restart, an idle timeout) is
/// replaced instead of failing a query. One in steady use skips the check: it answered a
/// moment ago, and checking on every acquire cost a round trip per query (sqlx's default).
pub const CHECK_CONNECTIONS_IDLE_FOR: Duration = Duration::from_secs(1);

/// The pools' `before_acquire`: see [`CHECK_CONNECTIONS_IDLE_FOR`]. An error closes the
/// connection and the pool hands out another.
fn check_if_idle<C: sqlx::Connection>(
    connection: &mut C,
    metadata: PoolConnectionMetadata,
) -> std::pin::Pin<Box<dyn Future<Output = Result<bool, sqlx::Error>> + Send + '_>> {
    Box::pin(async move {
        if metadata.idle_for >= CHECK_CONNECTIONS_IDLE_FOR {
            connection.ping().await?;
        }
        Ok(true)
    })
}

/// SQLite: how often a background task copies the write-ahead log back into the database
/// file (a passive checkpoint: it neither waits for nor blocks a writer or a reader).
pub const SQLITE_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// SQLite: pages the write-ahead log may reach before a committing connection checkpoints
/// it itself, inside its commit (SQLite's automatic checkpoint, whose default is 1,000).
/// The ledger's writer, which commits most, has none (`wal_autocheckpoint = 0`) and leaves
/// the log to the background task; the other connections keep it as a backstop.
pub const SQLITE_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// SQLite: pages past which the background checkpoint catches the log up with the writers
/// held off ([`run_sqlite_checkpoints`]), so that the next write starts the log over.
pub const SQLITE_LOG_RESTART_PAGES: i64 = 10_000;

const SQLITE_PRAGMAS: &str =
    "PRAGMA mmap_size = 4294967296; PRAGMA cache_size = -65536; PRAGMA wal_autocheckpoint = 10000";
const _: () =
    assert!(SQLITE_MMAP_BYTES == 4_294_967_296 && SQLITE_CACHE_KIB == 65_536 && SQLITE_AUTOCHECKPOINT_PAGES == 10_000);

/// How to reach the database.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseOptions {
    /// `sqlite:PATH` (created if missing) or `postgres://…`.
    pub url: String,
    /// Connections in the pool.
    pub max_connections: u32,
    /// How long a query waits for a free connection (and a new connection to open).
    pub acquire_timeout: Duration,
}

impl fmt::Debug for DatabaseOptions {
    // The URL may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseOptions")
            .field("backend", &Backend::from_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish_non_exhaustive()
    }
}

/// The control plane's storage handle; cheap to clone (a pool).
#[derive(Clone, Debug)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    /// On SQLite, the turn of this process's hot writers ([`Database::sqlite_write_turn`]).
    sqlite_writes: Arc<tokio::sync::Mutex<()>>,
    /// On SQLite, stops the checkpoint task when the last handle is dropped.
    _checkpoints: Option<Arc<AbortOnDrop>>,
}

/// Aborts a background task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Checkpoints the write-ahead log every [`SQLITE_CHECKPOINT_INTERVAL`] on a connection of
/// its own, so that the writers' commits never do (see [`SQLITE_AUTOCHECKPOINT_PAGES`]).
/// Ends when the pool is closed.
///
/// A passive checkpoint copies what was committed before it began, but SQLite starts the
/// log over only when a write begins with the whole log copied, which a writer committing
/// every millisecond or two never finds. So once the log holds [`SQLITE_LOG_RESTART_PAGES`]
/// the task takes the hot writers' turn (`writes`) for one more checkpoint, of what was
/// committed since the last (a few milliseconds' worth); the next write then starts the
/// log over. Without it the log would grow for as long as the writes go on.
async fn run_sqlite_checkpoints(pool: AnyPool, writes: Arc<tokio::sync::Mutex<()>>) {
    let mut connection: Option<sqlx::AnyConnection> = None;
    let mut ticks = tokio::time::interval(SQLITE_CHECKPOINT_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if pool.is_closed() {
            return;
        }
        let checkpointed = async {
            let connection = match &mut connection {
                Some(connection) => connection,
                None => connection.insert(pool.acquire().await?.detach()),
            };
            let (_, log, _) = checkpoint(connection).await?;
            if log >= SQLITE_LOG_RESTART_PAGES {
                let _turn = writes.lock().await;
                checkpoint(connection).await?;
            }
            Ok::<_, sqlx::Error>(())
        }
        .await;
        if let Err(error) = checkpointed {
            connection = None;
            if !pool.is_closed() {
                tracing::warn!(%error, "checkpointing the SQLite write-ahead log failed; trying again");
            }
        }
    }
}

/// A passive checkpoint: whether it was blocked, the pages in the log, and those copied.
async fn checkpoint(connection: &mut sqlx::AnyConnection) -> Result<(i64, i64, i64), sqlx::Error> {
    sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(connection).await
}

/// Why [`Database::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("failed to connect: the database url is neither sqlite: nor postgres://")]
    UnsupportedUrl,
    #[error("failed to connect to the database")]
    Connect(#[source] sqlx::Error),
    #[error("failed to configure the database")]
    Configure(#[source] sqlx::Error),
    #[error("failed to apply the database migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// A query failed; `operation` names it.
#[derive(Debug, thiserror::Error)]
#[error("database query failed while {operation}")]
pub struct QueryError {
    operation: &'static str,
    #[source]
    source: sqlx::Error,
}

/// Why [`Database::create_org`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateOrgError {
    #[error("failed to create the org: the name is taken")]
    NameTaken,
    #[error(transparent)]
    Query(#[from] QueryError),
}

/// Why [`Database::revoke_admin_key`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevokeAdminKeyError {
    #[error("failed to revoke the admin key: no such key")]
    NotFound,
    #[error(transparent)]
    Query(#[from] QueryError),
}

/// One page of a listing ordered by a unique column: rows after `after`, at most `limit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<C> {
    pub after: Option<C>,
    pub limit: u32,
}

/// A native PostgreSQL connection kept by its one user between statements: a writer
/// task, a pipeline stage. sqlx checks a connection with a round trip each time one
/// returns to its pool; a kept connection never returns, so it is checked only as a
/// pooled one is, once idle for [`CHECK_CONNECTIONS_IDLE_FOR`]. After a failure the user
/// gives it up ([`HeldConnection::give_up`]): the pool checks it as it returns, closes it
/// if it is broken, and the next use takes another.
#[derive(Debug, Default)]
pub struct HeldConnection {
    connection: Option<PoolConnection<sqlx::Postgres>>,
    used_at: Option<Instant>,
}

impl HeldConnection {
    /// The kept connection, or one from `pool` if none is kept or the kept one, idle for
    /// a while, does not answer.
    pub async fn get(&mut self, pool: &sqlx::PgPool) -> Result<&mut sqlx::PgConnection, sqlx::Error> {
        let connection = self.take(pool).await?;
        Ok(&mut **self.connection.insert(connection))
    }

    /// As [`HeldConnection::get`], handing the connection over (for a transaction, which
    /// borrows it); [`HeldConnection::keep`] takes it back once the work succeeded.
    pub async fn take(&mut self, pool: &sqlx::PgPool) -> Result<PoolConnection<sqlx::Postgres>, sqlx::Error> {
        let idle = self.used_at.is_none_or(|at| at.elapsed() >= CHECK_CONNECTIONS_IDLE_FOR);
        self.used_at = Some(Instant::now());
        if let Some(mut connection) = self.connection.take()
            && (!idle || sqlx::Connection::ping(&mut *connection).await.is_ok())
        {
            return Ok(connection);
        }
        pool.acquire().await
    }

    pub fn keep(&mut self, connection: PoolConnection<sqlx::Postgres>) {
        self.connection = Some(connection);
    }

    /// Gives up the kept connection after a failure.
    pub fn give_up(&mut self) {
        self.connection = None;
    }
}

impl Database {
    /// Opens the pool and applies the migrations. A missing SQLite file is created.
    pub async fn connect(options: &DatabaseOptions) -> Result<Database, ConnectError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(&options.url).ok_or(ConnectError::UnsupportedUrl)?;
        let url = match backend {
            Backend::Sqlite => sqlite_url_creating_file(&options.url),
            Backend::Postgres => options.url.clone(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .test_before_acquire(false)
            .before_acquire(check_if_idle)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    let setting = match backend {
                        // Statements are prepared once per connection and their shape never
                        // depends on a value's selectivity: plan them once, not per call.
                        // No parallel workers: starting one costs more than these queries.
                        Backend::Postgres => {
                            "SET plan_cache_mode = force_generic_plan; SET max_parallel_workers_per_gather = 0"
                        }
                        // Read pages through a shared mapping instead of a read() per page,
                        // and keep a page cache large enough for index inserts.
                        Backend::Sqlite => SQLITE_PRAGMAS,
                    };
                    sqlx::Executor::execute(&mut *connection, setting).await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(ConnectError::Connect)?;
        if backend == Backend::Sqlite {
            // Readers do not block the writer; the mode is stored in the file.
            sqlx::query("PRAGMA journal_mode = WAL").execute(&pool).await.map_err(ConnectError::Configure)?;
        }
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&pool).await.map_err(ConnectError::Migrate)?;
        let sqlite_writes = Arc::new(tokio::sync::Mutex::new(()));
        let checkpoints = (backend == Backend::Sqlite).then(|| {
            let task = tokio::spawn(run_sqlite_checkpoints(pool.clone(), Arc::clone(&sqlite_writes)));
            Arc::new(AbortOnDrop(task.abort_handle()))
        });
        Ok(Database { pool, backend, sqlite_writes, _checkpoints: checkpoints })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool, for queries this module does not offer yet.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// On SQLite, waits for this process's hot writers (the ledger's batches, the request
    /// nonces) to finish their transactions, and holds the others off until the guard is
    /// dropped; `None` on PostgreSQL. SQLite has one write lock, and a writer that finds
    /// it taken waits in SQLite's busy handler, which sleeps 1, 2, 5, 10… ms between
    /// tries: with two writers committing in turn, those sleeps were the tail of every
    /// call. Queued here, the next writer starts the moment the last one commits.
    pub async fn sqlite_write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.backend {
            Backend::Sqlite => Some(self.sqlite_writes.lock().await),
            Backend::Postgres => None,
        }
    }

    /// A pool of `connections` native PostgreSQL connections, with this handle's connect
    /// options, each running `session` (settings) when it opens; for the hot paths that
    /// need array parameters or session settings `sqlx::Any` does not offer. It opens
    /// connections as they are needed.
    pub async fn native_postgres(&self, connections: u32, session: &'static str) -> Result<sqlx::PgPool, sqlx::Error> {
        let any_options = self.pool.connect_options();
        let options = sqlx::postgres::PgConnectOptions::try_from(&*any_options)?;
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(self.pool.options().get_acquire_timeout())
            .test_before_acquire(false)
            .before_acquire(check_if_idle)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    sqlx::Executor::execute(&mut *connection, session).await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
    }

    /// Starts a transaction: every change touching several rows goes through one.
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, QueryError> {
        self.pool.begin().await.map_err(query_error("starting a transaction"))
    }

    /// Closes every connection; later queries fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Open connections, idle connections and the pool's capacity.
    pub fn pool_usage(&self) -> (u32, usize, u32) {
        (self.pool.size(), self.pool.num_idle(), self.pool.options().get_max_connections())
    }

    /// Runs a trivial query: the database is reachable and answering.
    pub async fn ping(&self) -> Result<(), QueryError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(query_error("pinging"))?;
        Ok(())
    }

    // ---- admin keys ----

    /// Creates the bootstrap credential, with every scope, if the database has no admin
    /// key and never had a bootstrap credential. Returns its token, to show once, or
    /// `None` when there was nothing to do.
    ///
    /// One statement decides: the insert is conditional on the table being empty, and
    /// the unique `bootstrap_slot` makes a concurrent second insert a no-op, so any number
    /// of processes starting together create exactly one.
    pub async fn bootstrap_admin_key(&self, now: UnixMillis) -> Result<Option<AdminToken>, QueryError> {
        let token = AdminToken::generate();
        let inserted = sqlx::query(
            "INSERT INTO admin_keys (id, name, scopes, token_hash, bootstrap_slot, created_at_ms) \
             SELECT $1, $2, $3, $4, 1, $5 WHERE NOT EXISTS (SELECT 1 FROM admin_keys) \
             ON CONFLICT DO NOTHING",
        )
        .bind(AdminKeyId::generate().as_str().to_owned())
        .bind(BOOTSTRAP_KEY_NAME)
        .bind(Scopes::all().to_stored())
        .bind(token.hash().0.to_vec())
        .bind(to_db(now))
        .execute(&self.pool)
        .await
        .map_err(query_error("creating the bootstrap admin key"))?
        .rows_affected();
        Ok((inserted == 1).then_some(token))
    }

    /// Creates an admin key and returns it with its token, to show once.
    pub async fn create_admin_key(
        &self,
        name: &AdminKeyName,
        scopes: &Scopes,
        now: UnixMillis,
    ) -> Result<(AdminKey, AdminToken), QueryError> {
        let token = AdminToken::generate();
        let key = AdminKey {
            id: AdminKeyId::generate(),
            name: name.clone(),
            scopes: scopes.clone(),
            created_at: now,
            revoked_at: None,
        };
        sqlx::query("INSERT INTO admin_keys (id, name, scopes, token_hash, created_at_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(key.id.as_str().to_owned())
            .bind(key.name.as_str().to_owned())
            .bind(key.scopes.to_stored())
            .bind(token.hash().0.to_vec())
            .bind(to_db(now))
            .execute(&self.pool)
            .await
            .map_err(query_error("creating an admin key"))?;
        Ok((key, token))
    }

    /// The key whose token this is, revoked or not; `None` if no key has this token.
    pub async fn admin_key_by_token(&self, token: &AdminToken) -> Result<Option<AdminKey>, QueryError> {
        let hash = token.hash();
        let row =
            sqlx::query(concat!("SELECT ", admin_key_columns!(), ", token_hash FROM admin_keys WHERE token_hash = $1"))
                .bind(hash.0.to_vec())
                .fetch_optional(&self.pool)
                .await
                .map_err(query_error("looking up an admin key"))?;
        let Some(row) = row else { return Ok(None) };
        let stored: Vec<u8> = row.try_get("token_hash").map_err(query_error("reading an admin key"))?;
        if !hash.matches(&stored) {
            return Ok(None);
        }
        admin_key_from_row(&row).map(Some)
    }

    /// Admin keys ordered by id, revoked ones included.
    pub async fn list_admin_keys(&self, page: &Page<AdminKeyId>) -> Result<Vec<AdminKey>, QueryError> {
        let rows = match &page.after {
            None => sqlx::query(concat!("SELECT ", admin_key_columns!(), " FROM admin_keys ORDER BY id LIMIT $1"))
                .bind(i64::from(page.limit)),
            Some(after) => sqlx::query(concat!(
                "SELECT ",
                admin_key_columns!(),
                " FROM admin_keys WHERE id > $1 ORDER BY id LIMIT $2"
            ))
            .bind(after.as_str().to_owned())
            .bind(i64::from(page.limit)),
        }
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("listing admin keys"))?;
        rows.iter().map(admin_key_from_row).collect()
    }

    /// Revokes a key from `now` on. Revoking a revoked key changes nothing and succeeds.
    pub async fn revoke_admin_key(&self, id: &AdminKeyId, now: UnixMillis) -> Result<AdminKey, RevokeAdminKeyError> {
        sqlx::query("UPDATE admin_keys SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL")
            .bind(to_db(now))
            .bind(id.as_str().to_owned())
            .execute(&self.pool)
            .await
            .map_err(query_error("revoking an admin key"))?;
        let row = sqlx::query(concat!("SELECT ", admin_key_columns!(), " FROM admin_keys WHERE id = $1"))
            .bind(id.as_str().to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a revoked admin key"))?;
        Ok(admin_key_from_row(&row.ok_or(RevokeAdminKeyError::NotFound)?)?)
    }

    // ---- orgs ----

    /// Creates an org; its name must be free.
    pub async fn create_org(&self, name: &OrgName, now: UnixMillis) -> Result<Org, CreateOrgError> {
        let org = Org { id: OrgId::generate(), name: name.clone(), created_at: now };
        let inserted =
            sqlx::query("INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
                .bind(org.id.as_str().to_owned())
                .bind(org.name.as_str().to_owned())
                .bind(to_db(now))
                .execute(&self.pool)
                .await
                .map_err(query_error("creating an org"))?
                .rows_affected();
        if inserted == 0 {
            return Err(CreateOrgError::NameTaken);
        }
        Ok(org)
    }

    pub async fn org(&self, id: &OrgId) -> Result<Option<Org>, QueryError> {
        let row = sqlx::query("SELECT id, name, created_at_ms FROM orgs WHERE id = $1")
            .bind(id.as_str().to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading an org"))?;
        row.as_ref().map(org_from_row).transpose()
    }

    /// Orgs ordered by name (byte order).
    pub async fn list_orgs(&self, page: &Page<OrgName>) -> Result<Vec<Org>, QueryError> {
        let rows = match &page.after {
            None => sqlx::query("SELECT id, name, created_at_ms FROM orgs ORDER BY name LIMIT $1")
                .bind(i64::from(page.limit)),
            Some(after) => {
                sqlx::query("SELECT id, name, created_at_ms FROM orgs WHERE name > $1 ORDER BY name LIMIT $2")
                    .bind(after.as_str().to_owned())
                    .bind(i64::from(page.limit))
            }
        }
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("listing orgs"))?;
        rows.iter().map(org_from_row).collect()
    }

    // ---- leases ----

    /// Takes or renews the lease `name` for `holder` until `now + ttl`; `true` if
    /// `holder` holds it now. It succeeds when the lease is free, expired, or already
    /// `holder`'s. One conditional upsert decides, so two replicas racing for a lease
    /// cannot both win: the database serialises the writes to the row and re-checks the
    /// condition against the winner's version.
    pub async fn try_acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
        now: UnixMillis,
    ) -> Result<bool, QueryError> {
        let acquired = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms \
             WHERE leases.holder = excluded.holder OR leases.expires_at_ms <= $4",
        )
        .bind(name.to_owned())
        .bind(holder.to_owned())
        .bind(to_db(now.saturating_add(ttl)))
        .bind(to_db(now))
        .execute(&self.pool)
        .await
        .map_err(query_error("acquiring a lease"))?
        .rows_affected();
        Ok(acquired == 1)
    }

    /// Gives the lease up early if `holder` holds it; `true` if it did.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<bool, QueryError> {
        let released = sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name.to_owned())
            .bind(holder.to_owned())
            .execute(&self.pool)
            .await
            .map_err(query_error("releasing a lease"))?
            .rows_affected();
        Ok(released == 1)
    }
}

/// `sqlite:PATH` opens an existing file only; the control plane creates it.
fn sqlite_url_creating_file(url: &str) -> String {
    match url.split_once('?') {
        Some((_, query)) if query.split('&').any(|pair| pair.starts_with("mode=")) => url.to_owned(),
        Some(_) => format!("{url}&mode=rwc"),
        None => format!("{url}?mode=rwc"),
    }
}

fn admin_key_from_row(row: &AnyRow) -> Result<AdminKey, QueryError> {
    let read = query_error("reading an admin key");
    let decode = |message: String| read(sqlx::Error::Decode(message.into()));
    let id: String = row.try_get("id").map_err(read)?;
    let name: String = row.try_get("name").map_err(read)?;
    let scopes: String = row.try_get("scopes").map_err(read)?;
    let created_at_ms: i64 = row.try_get("created_at_ms").map_err(read)?;
    let revoked_at_ms: Option<i64> = row.try_get("revoked_at_ms").map_err(read)?;
    Ok(AdminKey {
        id: id.parse().map_err(|error| decode(format!("admin_keys.id: {error}")))?,
        name: AdminKeyName::new(&name).map_err(|error| decode(format!("admin_keys.name: {error}")))?,
        scopes: Scopes::from_stored(&scopes).map_err(|error| decode(format!("admin_keys.scopes: {error}")))?,
        created_at: from_db(created_at_ms),
        revoked_at: revoked_at_ms.map(from_db),
    })
}

fn org_from_row(row: &AnyRow) -> Result<Org, QueryError> {
    let read = query_error("reading an org");
    let decode = |message: String| read(sqlx::Error::Decode(message.into()));
    let id: String = row.try_get("id").map_err(read)?;
    let name: String = row.try_get("name").map_err(read)?;
    let created_at_ms: i64 = row.try_get("created_at_ms").map_err(read)?;
    Ok(Org {
        id: id.parse().map_err(|error| decode(format!("orgs.id: {error}")))?,
        name: OrgName::new(&name).map_err(|error| decode(format!("orgs.name: {error}")))?,
        created_at: from_db(created_at_ms),
    })
}

fn query_error(operation: &'static str) -> impl Fn(sqlx::Error) -> QueryError + Copy {
    move |source| QueryError { operation, source }
}

/// Times are stored as signed 64-bit milliseconds; later than year 292 million saturates.
fn to_db(time: UnixMillis) -> i64 {
    i64::try_from(time.0).unwrap_or(i64::MAX)
}

fn from_db(millis: i64) -> UnixMillis {
    UnixMillis(u64::try_from(millis).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_are_chosen_by_scheme() {
        assert_eq!(Backend::from_url("sqlite:cp.db"), Some(Backend::Sqlite));
        assert_eq!(Backend::from_url("sqlite:///var/lib/cp.db"), Some(Backend::Sqlite));
        assert_eq!(Backend::from_url("postgres://u@h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::from_url("postgresql://u@h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::from_url("mysql://u@h/db"), None);
    }

    #[test]
    fn sqlite_urls_create_the_file_unless_told_otherwise() {
        assert_eq!(sqlite_url_creating_file("sqlite:a.db"), "sqlite:a.db?mode=rwc");
        assert_eq!(sqlite_url_creating_file("sqlite:a.db?cache=private"), "sqlite:a.db?cache=private&mode=rwc");
        assert_eq!(sqlite_url_creating_file("sqlite:a.db?mode=ro"), "sqlite:a.db?mode=ro");
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(from_db(to_db(UnixMillis(1_700_000_000_000))), UnixMillis(1_700_000_000_000));
        assert_eq!(to_db(UnixMillis(u64::MAX)), i64::MAX);
        assert_eq!(from_db(-1), UnixMillis(0));
    }
}
