//! Leaf certificate issuances per second with the org CA key in SoftHSM2 versus sealed in
//! software, measured in the same run on the same SQLite database:
//!
//! * `Authority::issue`: the whole issuance (org CA read, key opened or found on the
//!   token, certificate signed, row written), one at a time and from several tasks;
//! * signing alone: `cert::issue_leaf` with the key in memory versus an `HsmKey`.
//!
//! Run: `cargo bench -p molt-control-plane --bench org_ca_keys` (needs `softhsm2`).
//! `MOLT_BENCH_ISSUANCES` sets the issuances per measurement (default 400). SoftHSM2 reads
//! `SOFTHSM2_CONF` once per process, so the bench re-runs itself with it set.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use molt_control_plane::ca::{
    Authority, CaOptions, DEFAULT_KEY_LABEL_PREFIX, KekSource, KeyEncryptionKey, LeafKind, Pkcs11Options,
    PossessionProof, RootSource, proof_message,
};
use molt_control_plane::db::{Database, DatabaseOptions};
use molt_control_plane::ids::OrgId;
use molt_control_plane::model::OrgName;
use molt_hsm::key::KeyName;
use molt_hsm::softhsm::{SOFTHSM2_MODULE, SoftHsm};
use molt_hsm::{PinSource, TokenSelector};
use molt_protocol::cert::{self, Role, Serial, Validity};
use molt_protocol::ids::AgentId;
use molt_protocol::keys::{Signer, SigningKey};
use molt_protocol::time::UnixMillis;

const CHILD_DIR_VAR: &str = "MOLT_BENCH_SOFTHSM_DIR";
const ISSUANCES_VAR: &str = "MOLT_BENCH_ISSUANCES";
const ISSUANCES_DEFAULT: usize = 400;
/// Tasks issuing at once in the concurrent measurement.
const CONCURRENT_TASKS: usize = 4;
const USER_PIN: &str = "2580-user";
const TOKEN: &str = "bench-org-cas";

fn main() {
    let Ok(dir) = std::env::var(CHILD_DIR_VAR) else {
        let dir = tempfile::tempdir().expect("temporary directory");
        let softhsm = SoftHsm::create(dir.path(), SOFTHSM2_MODULE.as_ref()).expect("SoftHSM2 is installed");
        softhsm.init_token(TOKEN, USER_PIN, "1470-so").expect("init token");
        let exe = std::env::current_exe().expect("bench binary path");
        let status = softhsm.command(exe).env(CHILD_DIR_VAR, dir.path()).status().expect("re-run the bench");
        assert!(status.success(), "the bench failed");
        return;
    };
    let issuances = std::env::var(ISSUANCES_VAR).ok().and_then(|n| n.parse().ok()).unwrap_or(ISSUANCES_DEFAULT);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run(PathBuf::from(dir), issuances));
}

async fn run(dir: PathBuf, issuances: usize) {
    let softhsm = SoftHsm::existing(dir.join("softhsm2.conf"), PathBuf::from(SOFTHSM2_MODULE));
    let pin_file = dir.join("pin");
    write_private(&pin_file, USER_PIN);
    let url = format!("sqlite:{}", dir.join("bench.db").display());
    let options = DatabaseOptions { url, max_connections: 8, acquire_timeout: Duration::from_secs(30) };
    let db = Database::connect(&options).await.unwrap();
    let kek = KeyEncryptionKey::generate();
    let now = UnixMillis::now_from_system();
    let ca_options =
        |pkcs11| CaOptions { key_encryption_key: KekSource::Value(kek.clone()), root: RootSource::Generated, pkcs11 };
    let pkcs11 = Pkcs11Options {
        module: softhsm.module().to_owned(),
        token: TokenSelector::Label(TOKEN.to_owned()),
        pin: PinSource::File(pin_file),
        pool_size: CONCURRENT_TASKS,
        key_label_prefix: DEFAULT_KEY_LABEL_PREFIX.to_owned(),
    };
    let software = Authority::load(&db, &ca_options(None), "postgres://unused", now).await.unwrap();
    let with_token = Arc::new(Authority::load(&db, &ca_options(Some(pkcs11)), "postgres://unused", now).await.unwrap());
    let sealed_org = db.create_org(&OrgName::new("sealed").unwrap(), now).await.unwrap().id;
    let token_org = db.create_org(&OrgName::new("token").unwrap(), now).await.unwrap().id;
    software.ensure_org_ca(&db, &sealed_org, now).await.unwrap();
    let (token_ca, _) = with_token.ensure_org_ca(&db, &token_org, now).await.unwrap();
    drop(software);

    println!("org CA key: sealed in software vs in SoftHSM2 ({issuances} issuances each, same run)");
    // Both orgs are served by the authority with the token: only the key's store differs.
    for (name, org) in [("sealed", &sealed_org), ("softhsm2", &token_org)] {
        let rate = issue_sequentially(&with_token, &db, org, issuances, now).await;
        println!("  Authority::issue, 1 at a time, {name:>8}: {rate:>8.0} issuances/s");
    }
    for (name, org) in [("sealed", &sealed_org), ("softhsm2", &token_org)] {
        let rate = issue_concurrently(&with_token, &db, org, issuances, now).await;
        println!("  Authority::issue, {CONCURRENT_TASKS} tasks,     {name:>8}: {rate:>8.0} issuances/s");
    }

    // Signing alone: the key in memory versus the key on the token.
    let token = with_token.org_key_token().unwrap();
    let hsm_key = token.find_ed25519(KeyName::Label(token_ca.key_label().unwrap())).unwrap();
    // A sealed key cannot be taken out of the authority, so the in-memory key gets an org
    // CA certificate of its own, under a root made here.
    let memory_key = SigningKey::generate(&mut rand::rngs::OsRng);
    let memory_ca = memory_org_ca(&memory_key, now);
    for (name, key, ca) in [
        ("memory", &memory_key as &dyn Signer, &memory_ca),
        ("softhsm2", &hsm_key as &dyn Signer, &token_ca.certificate),
    ] {
        let rate = sign_only(key, ca, issuances, now);
        println!("  cert::issue_leaf only,       {name:>8}: {rate:>8.0} issuances/s");
    }
}

async fn issue_sequentially(authority: &Authority, db: &Database, org: &OrgId, count: usize, now: UnixMillis) -> f64 {
    let proofs: Vec<_> = (0..count).map(|_| proof(org, now)).collect();
    let started = Instant::now();
    for proof in &proofs {
        authority.issue(db, proof, &[], now).await.unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

async fn issue_concurrently(
    authority: &Arc<Authority>,
    db: &Database,
    org: &OrgId,
    count: usize,
    now: UnixMillis,
) -> f64 {
    let per_task = count / CONCURRENT_TASKS;
    let batches: Vec<Vec<_>> =
        (0..CONCURRENT_TASKS).map(|_| (0..per_task).map(|_| proof(org, now)).collect()).collect();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for batch in batches {
        let (authority, db) = (Arc::clone(authority), db.clone());
        tasks.spawn(async move {
            for proof in &batch {
                authority.issue(&db, proof, &[], now).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    (per_task * CONCURRENT_TASKS) as f64 / started.elapsed().as_secs_f64()
}

fn sign_only(key: &dyn Signer, ca: &molt_protocol::cert::Certificate, count: usize, now: UnixMillis) -> f64 {
    let validity = Validity { not_before: now, not_after: now.saturating_add(Duration::from_secs(3600)) };
    let subjects: Vec<_> = (0..count).map(|_| SigningKey::generate(&mut rand::rngs::OsRng).public_key()).collect();
    let started = Instant::now();
    for subject in &subjects {
        let role = Role::Agent(AgentId::from_inception_key(subject));
        let serial = Serial::random(&mut rand::rngs::OsRng);
        cert::issue_leaf(ca, key, subject, role, &[], validity, serial).unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

fn memory_org_ca(org_key: &SigningKey, now: UnixMillis) -> molt_protocol::cert::Certificate {
    let root_key = SigningKey::generate(&mut rand::rngs::OsRng);
    let validity = Validity { not_before: now, not_after: now.saturating_add(Duration::from_secs(24 * 3600)) };
    let root = cert::issue_root(&root_key, "Bench root", validity, Serial::random(&mut rand::rngs::OsRng)).unwrap();
    let serial = Serial::random(&mut rand::rngs::OsRng);
    cert::issue_org_ca(&root, &root_key, &org_key.public_key(), "Bench org CA", validity, serial).unwrap()
}

fn proof(org: &OrgId, now: UnixMillis) -> PossessionProof {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let public_key = key.public_key();
    let signature = key.sign(&proof_message(LeafKind::Agent, org, &public_key, now));
    PossessionProof::verify(LeafKind::Agent, org, &public_key, now, &signature, now).unwrap()
}

fn write_private(path: &std::path::Path, text: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}
