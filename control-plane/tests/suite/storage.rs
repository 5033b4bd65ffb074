//! The `Database` API on both backends.

use std::time::Duration;

use molt_control_plane::auth::{BOOTSTRAP_KEY_NAME, Scope, Scopes};
use molt_control_plane::db::{
    CHECK_CONNECTIONS_IDLE_FOR, CreateOrgError, Page, RevokeAdminKeyError, SQLITE_AUTOCHECKPOINT_PAGES,
    SQLITE_CHECKPOINT_INTERVAL, SQLITE_LOG_RESTART_PAGES,
};
use molt_control_plane::ids::{AdminKeyId, OrgId};
use molt_control_plane::model::{AdminKeyName, OrgName};
use molt_protocol::time::UnixMillis;

use crate::fixture::Fixture;

crate::on_both_backends!(
    migrations_apply_once_and_again,
    bootstrap_creates_exactly_one_key,
    bootstrap_does_nothing_when_keys_exist,
    concurrent_bootstrap_from_two_handles_creates_one_key,
    admin_keys_are_created_found_listed_and_revoked,
    org_names_are_unique_and_listings_page,
    a_lease_has_one_holder_until_it_expires,
    racing_replicas_never_both_win_a_lease,
);

const T0: UnixMillis = UnixMillis(1_700_000_000_000);

/// A pooled connection is checked before it is handed out only once it has been idle for
/// `CHECK_CONNECTIONS_IDLE_FOR`. Here the server closes every connection of the database:
/// a moment after their last use the pool hands one out unchecked and its statement
/// fails; after the idle time the pool checks them, replaces them, and statements
/// succeed. For the shared pool and for a native pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_are_checked_once_idle() {
    let fixture = Fixture::postgres().await;
    let native = fixture.db.native_postgres(1, "SET application_name = 'native'").await.unwrap();
    let shared = || async { sqlx::query("SELECT 1").execute(fixture.db.pool()).await.map(|_| ()) };
    let own = || async { sqlx::query("SELECT 1").execute(&native).await.map(|_| ()) };
    shared().await.unwrap();
    own().await.unwrap();
    // The pools check a connection as it comes back, in the background: let that end.
    tokio::time::sleep(Duration::from_millis(50)).await;

    fixture.terminate_connections().await;
    assert!(shared().await.is_err(), "a connection used a moment ago was checked");
    assert!(own().await.is_err(), "a native connection used a moment ago was checked");

    tokio::time::sleep(CHECK_CONNECTIONS_IDLE_FOR + Duration::from_millis(100)).await;
    shared().await.unwrap();
    own().await.unwrap();
}

/// On SQLite the write-ahead log is copied back into the database file in the background
/// (`SQLITE_CHECKPOINT_INTERVAL`), long before the committing writers' own backstop
/// (`SQLITE_AUTOCHECKPOINT_PAGES`) would: about 500 pages written here stay below the
/// backstop, yet reach the database file within a few intervals. Without the task they
/// would stay in the log and the file would not grow.
#[tokio::test]
async fn sqlite_checkpoints_run_in_the_background() {
    let fixture = Fixture::sqlite().await;
    let path = fixture.sqlite_path();
    let pragma = sqlx::query("PRAGMA wal_autocheckpoint").fetch_one(fixture.db.pool()).await.unwrap();
    let pages: i64 = sqlx::Row::try_get(&pragma, 0).unwrap();
    assert_eq!(pages, i64::from(SQLITE_AUTOCHECKPOINT_PAGES));

    sqlx::query("CREATE TABLE scratch (body BLOB)").execute(fixture.db.pool()).await.unwrap();
    let before = std::fs::metadata(&path).unwrap().len();
    for _ in 0..500 {
        sqlx::query("INSERT INTO scratch (body) VALUES (randomblob(4000))").execute(fixture.db.pool()).await.unwrap();
    }
    const { assert!(500 < SQLITE_AUTOCHECKPOINT_PAGES) };
    let deadline = std::time::Instant::now() + SQLITE_CHECKPOINT_INTERVAL * 50;
    while std::fs::metadata(&path).unwrap().len() < before + 500 * 4000 {
        assert!(std::time::Instant::now() < deadline, "the log was not checkpointed into {}", path.display());
        tokio::time::sleep(SQLITE_CHECKPOINT_INTERVAL).await;
    }
}

/// A writer that commits back to back with SQLite's own checkpoint off, as the ledger's
/// writer does, never begins with the whole log copied, so passive checkpoints alone never
/// start the log over and it grows for as long as the writes go on. Past
/// `SQLITE_LOG_RESTART_PAGES` the background task takes the writers' turn for one more
/// checkpoint and the next write starts the log over: the writer here writes more than
/// twice that many pages, and the log file ends far shorter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_log_starts_over_under_back_to_back_writes() {
    const ROWS_PER_COMMIT: i64 = 25;
    let fixture = Fixture::sqlite().await;
    let log_path = format!("{}-wal", fixture.sqlite_path().display());
    let mut writer = fixture.db.pool().acquire().await.unwrap().detach();
    sqlx::query("PRAGMA wal_autocheckpoint = 0").execute(&mut writer).await.unwrap();
    sqlx::query("CREATE TABLE scratch (body BLOB)").execute(&mut writer).await.unwrap();
    let rows = format!(
        "INSERT INTO scratch (body) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < \
         {ROWS_PER_COMMIT}) SELECT randomblob(4000) FROM n"
    );
    // One page a row, and a few more a commit.
    let pages = 25 * SQLITE_LOG_RESTART_PAGES / 10;
    for _ in 0..pages / ROWS_PER_COMMIT {
        let _turn = fixture.db.sqlite_write_turn().await;
        sqlx::query(&rows).execute(&mut writer).await.unwrap();
    }
    let frame_bytes = 24 + 4096;
    let log_bytes = std::fs::metadata(&log_path).unwrap().len();
    assert!(
        log_bytes < (18 * SQLITE_LOG_RESTART_PAGES / 10 * frame_bytes) as u64,
        "{pages} pages written, and the log holds {} frames",
        log_bytes / frame_bytes as u64
    );
}

async fn migrations_apply_once_and_again(fixture: &Fixture) {
    let org = fixture.db.create_org(&OrgName::new("acme").unwrap(), T0).await.unwrap();
    // A second process starting runs the migrator again: nothing changes, nothing is lost.
    let again = fixture.second_handle().await;
    assert_eq!(again.backend(), fixture.backend);
    assert_eq!(again.org(&org.id).await.unwrap(), Some(org));
    again.ping().await.unwrap();
}

async fn bootstrap_creates_exactly_one_key(fixture: &Fixture) {
    let token = fixture.db.bootstrap_admin_key(T0).await.unwrap().expect("first start bootstraps");
    assert!(fixture.db.bootstrap_admin_key(T0).await.unwrap().is_none(), "second start does not");
    let key = fixture.db.admin_key_by_token(&token).await.unwrap().expect("the token is a key");
    assert_eq!(key.name.as_str(), BOOTSTRAP_KEY_NAME);
    assert_eq!(key.scopes, Scopes::all());
    assert_eq!((key.created_at, key.revoked_at), (T0, None));
    // Only the hash is stored.
    let tokens_stored = fixture.count(&format!("admin_keys WHERE name = '{}'", token.expose())).await;
    assert_eq!((fixture.count("admin_keys").await, tokens_stored), (1, 0));
    // Revoking the bootstrap key does not open the door to a new one.
    fixture.db.revoke_admin_key(&key.id, T0).await.unwrap();
    assert!(fixture.db.bootstrap_admin_key(T0).await.unwrap().is_none());
}

async fn bootstrap_does_nothing_when_keys_exist(fixture: &Fixture) {
    let name = AdminKeyName::new("provisioned").unwrap();
    fixture.db.create_admin_key(&name, &Scopes::all(), T0).await.unwrap();
    assert!(fixture.db.bootstrap_admin_key(T0).await.unwrap().is_none());
    assert_eq!(fixture.count("admin_keys").await, 1);
}

async fn concurrent_bootstrap_from_two_handles_creates_one_key(fixture: &Fixture) {
    // Two processes starting together against one database, several attempts each.
    let other = fixture.second_handle().await;
    let mut attempts = Vec::new();
    for round in 0..4 {
        let db = if round % 2 == 0 { fixture.db.clone() } else { other.clone() };
        attempts.push(tokio::spawn(async move { db.bootstrap_admin_key(T0).await }));
    }
    let mut created = 0;
    for attempt in attempts {
        created += usize::from(attempt.await.unwrap().unwrap().is_some());
    }
    assert_eq!(created, 1);
    assert_eq!(fixture.count("admin_keys").await, 1);
}

async fn admin_keys_are_created_found_listed_and_revoked(fixture: &Fixture) {
    let db = &fixture.db;
    let scopes: Scopes = [Scope::Read, Scope::OrgsWrite].into_iter().collect();
    let mut created = Vec::new();
    for index in 0..5 {
        let name = AdminKeyName::new(&format!("key {index}")).unwrap();
        created.push(db.create_admin_key(&name, &scopes, T0).await.unwrap());
    }
    let (first, first_token) = &created[0];
    assert_eq!(db.admin_key_by_token(first_token).await.unwrap().as_ref(), Some(first));
    let stranger = molt_control_plane::auth::AdminToken::generate();
    assert_eq!(db.admin_key_by_token(&stranger).await.unwrap(), None);

    let mut ids: Vec<AdminKeyId> = created.iter().map(|(key, _)| key.id.clone()).collect();
    ids.sort();
    let page_one = db.list_admin_keys(&Page { after: None, limit: 3 }).await.unwrap();
    let page_two = db.list_admin_keys(&Page { after: Some(page_one[2].id.clone()), limit: 3 }).await.unwrap();
    let listed: Vec<AdminKeyId> = page_one.iter().chain(&page_two).map(|key| key.id.clone()).collect();
    assert_eq!(listed, ids);

    let revoked = db.revoke_admin_key(&first.id, UnixMillis(T0.0 + 5)).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(UnixMillis(T0.0 + 5)));
    // Revoking again keeps the first revocation time.
    let again = db.revoke_admin_key(&first.id, UnixMillis(T0.0 + 9)).await.unwrap();
    assert_eq!(again.revoked_at, Some(UnixMillis(T0.0 + 5)));
    assert_eq!(db.admin_key_by_token(first_token).await.unwrap().unwrap().revoked_at, Some(UnixMillis(T0.0 + 5)));
    assert!(matches!(db.revoke_admin_key(&AdminKeyId::generate(), T0).await, Err(RevokeAdminKeyError::NotFound)));
    assert_eq!(fixture.count("admin_keys WHERE revoked_at_ms IS NOT NULL").await, 1);
}

async fn org_names_are_unique_and_listings_page(fixture: &Fixture) {
    let db = &fixture.db;
    // Hyphens sort before digits and letters in byte order (not in some collations).
    let names = ["b", "a-b", "ab", "a", "a-a", "0"];
    for name in names {
        db.create_org(&OrgName::new(name).unwrap(), T0).await.unwrap();
    }
    let taken = db.create_org(&OrgName::new("ab").unwrap(), T0).await;
    assert!(matches!(taken, Err(CreateOrgError::NameTaken)), "{taken:?}");
    assert_eq!(fixture.count("orgs").await, names.len() as i64);

    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = db.list_orgs(&Page { after: after.clone(), limit: 4 }).await.unwrap();
        listed.extend(page.iter().map(|org| org.name.to_string()));
        match page.last() {
            Some(last) if page.len() == 4 => after = Some(last.name.clone()),
            _ => break,
        }
    }
    assert_eq!(listed, ["0", "a", "a-a", "a-b", "ab", "b"]);

    let first = db.list_orgs(&Page { after: None, limit: 1 }).await.unwrap().remove(0);
    assert_eq!(db.org(&first.id).await.unwrap(), Some(first));
    assert_eq!(db.org(&OrgId::generate()).await.unwrap(), None);
}

async fn a_lease_has_one_holder_until_it_expires(fixture: &Fixture) {
    let db = &fixture.db;
    let ttl = Duration::from_secs(10);
    let at = |seconds: u64| UnixMillis(T0.0 + seconds * 1000);
    assert!(db.try_acquire_lease("expiry-sweeper", "replica-a", ttl, at(0)).await.unwrap());
    assert!(!db.try_acquire_lease("expiry-sweeper", "replica-b", ttl, at(5)).await.unwrap());
    // Another lease is independent.
    assert!(db.try_acquire_lease("health-checker", "replica-b", ttl, at(5)).await.unwrap());
    // The holder renews: now valid until 18 s.
    assert!(db.try_acquire_lease("expiry-sweeper", "replica-a", ttl, at(8)).await.unwrap());
    assert!(!db.try_acquire_lease("expiry-sweeper", "replica-b", ttl, at(17)).await.unwrap());
    // Expired: the other replica takes over, and the old holder is out.
    assert!(db.try_acquire_lease("expiry-sweeper", "replica-b", ttl, at(18)).await.unwrap());
    assert!(!db.try_acquire_lease("expiry-sweeper", "replica-a", ttl, at(19)).await.unwrap());
    // Only the holder releases.
    assert!(!db.release_lease("expiry-sweeper", "replica-a").await.unwrap());
    assert!(db.release_lease("expiry-sweeper", "replica-b").await.unwrap());
    assert!(db.try_acquire_lease("expiry-sweeper", "replica-a", ttl, at(20)).await.unwrap());
}

async fn racing_replicas_never_both_win_a_lease(fixture: &Fixture) {
    let other = fixture.second_handle().await;
    let ttl = Duration::from_secs(30);
    for round in 0..5u64 {
        let name = format!("lease-{round}");
        let now = UnixMillis(T0.0 + round);
        let mut racers = Vec::new();
        for racer in 0..6 {
            let db = if racer % 2 == 0 { fixture.db.clone() } else { other.clone() };
            let name = name.clone();
            racers.push(tokio::spawn(async move {
                db.try_acquire_lease(&name, &format!("replica-{racer}"), ttl, now).await
            }));
        }
        let mut winners = 0;
        for racer in racers {
            winners += usize::from(racer.await.unwrap().unwrap());
        }
        assert_eq!(winners, 1, "round {round}");
    }
}
