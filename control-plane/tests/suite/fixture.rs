//! A database per test: a SQLite file in a temp dir, or a PostgreSQL database created
//! through the maintenance database and dropped (with its connections) on drop.

use std::time::Duration;

use molt_control_plane::db::{Backend, Database, DatabaseOptions};
use rand::RngCore as _;
use sqlx::Connection as _;

/// Maintenance database used to create and drop test databases.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Overrides [`DEFAULT_POSTGRES_URL`].
pub const POSTGRES_URL_VARIABLE: &str = "MOLT_TEST_POSTGRES_URL";

pub struct Fixture {
    pub db: Database,
    pub backend: Backend,
    options: DatabaseOptions,
    _dir: Option<tempfile::TempDir>,
    postgres_database: Option<String>,
}

impl Fixture {
    pub async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let url = format!("sqlite:{}", dir.path().join("control-plane.db").display());
        let options = options(url);
        let db = Database::connect(&options).await.expect("open the SQLite test database");
        Fixture { db, backend: Backend::Sqlite, options, _dir: Some(dir), postgres_database: None }
    }

    pub async fn postgres() -> Fixture {
        let maintenance = maintenance_url();
        let name = format!("molt_test_{:016x}", rand::rngs::OsRng.next_u64());
        let mut connection = sqlx::PgConnection::connect(&maintenance).await.unwrap_or_else(|error| {
            panic!(
                "PostgreSQL is not reachable at {maintenance} ({error}); the control-plane tests need it: start it, \
                 or point {POSTGRES_URL_VARIABLE} at a server where the user may create databases"
            )
        });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .unwrap_or_else(|error| panic!("create the test database {name}: {error}"));
        let _ = connection.close().await;
        let options = options(database_url(&maintenance, &name));
        let db = Database::connect(&options).await.expect("open the PostgreSQL test database");
        Fixture { db, backend: Backend::Postgres, options, _dir: None, postgres_database: Some(name) }
    }

    /// Another handle on the same database, as a second process would have.
    /// The SQLite fixture's database file.
    pub fn sqlite_path(&self) -> std::path::PathBuf {
        self._dir.as_ref().expect("a SQLite fixture").path().join("control-plane.db")
    }

    pub async fn second_handle(&self) -> Database {
        Database::connect(&self.options).await.expect("open a second handle")
    }

    /// Closes, from the server's side, every connection to the PostgreSQL test database.
    pub async fn terminate_connections(&self) {
        let name = self.postgres_database.as_deref().expect("a PostgreSQL fixture");
        let mut killer = sqlx::PgConnection::connect(&maintenance_url()).await.unwrap();
        let terminated: Vec<bool> =
            sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
                .bind(name)
                .fetch_all(&mut killer)
                .await
                .unwrap();
        assert!(!terminated.is_empty() && terminated.iter().all(|t| *t), "{terminated:?}");
        // The backends are gone once no connection to the database is listed.
        for _ in 0..100 {
            let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(name)
                .fetch_one(&mut killer)
                .await
                .unwrap();
            if left == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the server did not close the connections");
    }

    pub async fn count(&self, table: &str) -> i64 {
        use sqlx::Row as _;
        let row = sqlx::query(&format!("SELECT COUNT(*) AS n FROM {table}"))
            .fetch_one(self.db.pool())
            .await
            .expect("count rows");
        row.try_get("n").expect("read the count")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let Some(name) = self.postgres_database.take() else { return };
        drop_database(name);
    }
}

/// An empty database (no migrations applied) of the fixture's backend, for tests of
/// migrations: a SQLite file beside nothing else, or a PostgreSQL database dropped on drop.
pub struct EmptyDatabase {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    postgres_database: Option<String>,
}

impl EmptyDatabase {
    pub async fn create(backend: Backend) -> EmptyDatabase {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("create a temp dir");
                let url = format!("sqlite:{}?mode=rwc", dir.path().join("control-plane.db").display());
                EmptyDatabase { url, _dir: Some(dir), postgres_database: None }
            }
            Backend::Postgres => {
                let maintenance = maintenance_url();
                let name = format!("molt_test_{:016x}", rand::rngs::OsRng.next_u64());
                let mut connection = sqlx::PgConnection::connect(&maintenance).await.expect("connect to PostgreSQL");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut connection)
                    .await
                    .unwrap_or_else(|error| panic!("create the test database {name}: {error}"));
                let _ = connection.close().await;
                EmptyDatabase { url: database_url(&maintenance, &name), _dir: None, postgres_database: Some(name) }
            }
        }
    }

    /// Opens it as the control plane does, applying every migration not yet applied.
    pub async fn open(&self) -> Database {
        Database::connect(&options(self.url.clone())).await.expect("open and migrate the database")
    }
}

impl Drop for EmptyDatabase {
    fn drop(&mut self) {
        let Some(name) = self.postgres_database.take() else { return };
        drop_database(name);
    }
}

/// An empty PostgreSQL database (no migrations applied), dropped on drop: for tests
/// where processes of their own open it.
pub struct ScratchPostgres {
    name: String,
    url: String,
}

impl ScratchPostgres {
    pub fn create() -> ScratchPostgres {
        let name = format!("molt_test_{:016x}", rand::rngs::OsRng.next_u64());
        let maintenance = maintenance_url();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let mut connection = sqlx::PgConnection::connect(&maintenance)
                .await
                .unwrap_or_else(|error| panic!("PostgreSQL is not reachable at {maintenance} ({error})"));
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut connection)
                .await
                .unwrap_or_else(|error| panic!("create the test database {name}: {error}"));
            let _ = connection.close().await;
        });
        ScratchPostgres { url: database_url(&maintenance, &name), name }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        drop_database(self.name.clone());
    }
}

/// Drops a test database and ends its connections (FORCE). Drop runs inside the test's
/// runtime, which cannot be blocked on: a thread with its own does the work.
fn drop_database(name: String) {
    let dropper = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let mut connection = sqlx::PgConnection::connect(&maintenance_url()).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut connection).await?;
            connection.close().await
        })
    });
    if let Ok(Err(error)) = dropper.join() {
        eprintln!("warning: failed to drop a test database: {error}");
    }
}

fn options(url: String) -> DatabaseOptions {
    DatabaseOptions { url, max_connections: 4, acquire_timeout: Duration::from_secs(10) }
}

fn maintenance_url() -> String {
    std::env::var(POSTGRES_URL_VARIABLE).unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned())
}

/// The maintenance URL with its database replaced by `name`.
fn database_url(maintenance: &str, name: &str) -> String {
    let (base, query) = maintenance.split_once('?').map_or((maintenance, None), |(base, query)| (base, Some(query)));
    let (server, _) = base.rsplit_once('/').expect("the PostgreSQL url names a database");
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}
