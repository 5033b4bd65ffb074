//! Org CA keys in a PKCS#11 token (SoftHSM2): generated on the token, never stored in the
//! database, used for leaves and CRLs that verify with `verify_chain` and with `openssl`,
//! found again after a restart, beside sealed org CAs; a replica that loses the race to
//! create an org CA destroys its key; bad token settings fail at start with clear errors.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once per process, so each test re-runs this binary,
//! filtered to itself, with the variable pointing at a throw-away token directory; the
//! parent checks that the child ran that one test and passed. Never skipped: without
//! SoftHSM2 (`apt-get install softhsm2`) these tests fail and say so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use molt_control_plane::ca::{
    Authority, CaOptions, DEFAULT_KEY_LABEL_PREFIX, IssueCertificateError, KekSource, KeyEncryptionKey, LeafKind,
    LoadAuthorityError, OrgCaError, Pkcs11Options, PossessionProof, RevocationReason, RootSource, proof_message,
};
use molt_control_plane::db::Database;
use molt_control_plane::ids::OrgId;
use molt_control_plane::model::OrgName;
use molt_hsm::key::KeyName;
use molt_hsm::softhsm::{SOFTHSM2_MODULE, SoftHsm};
use molt_hsm::{KeyProtection, OpenError, PinSource, TokenSelector};
use molt_protocol::cert::{Certificate, ExpectedRole, RevocationList, Revocations, TrustAnchors, verify_chain};
use molt_protocol::keys::SigningKey;
use molt_protocol::time::UnixMillis;
use sqlx::Row as _;

use crate::fixture::Fixture;

const CHILD_DIR_VAR: &str = "MOLT_CP_TEST_SOFTHSM_DIR";
const USER_PIN: &str = "2580-user";
const SO_PIN: &str = "1470-so";
const TOKEN: &str = "org-cas";

#[test]
fn org_ca_keys_in_a_token_sign_leaves_and_crls_on_sqlite() {
    let Some(softhsm) = softhsm_child("hsm_ca::org_ca_keys_in_a_token_sign_leaves_and_crls_on_sqlite") else { return };
    runtime().block_on(async { org_ca_keys_in_a_token_sign_leaves_and_crls(&softhsm, Fixture::sqlite().await).await });
}

#[test]
fn org_ca_keys_in_a_token_sign_leaves_and_crls_on_postgres() {
    let Some(softhsm) = softhsm_child("hsm_ca::org_ca_keys_in_a_token_sign_leaves_and_crls_on_postgres") else {
        return;
    };
    runtime()
        .block_on(async { org_ca_keys_in_a_token_sign_leaves_and_crls(&softhsm, Fixture::postgres().await).await });
}

#[test]
fn the_loser_of_a_concurrent_creation_destroys_its_key_on_sqlite() {
    let Some(softhsm) = softhsm_child("hsm_ca::the_loser_of_a_concurrent_creation_destroys_its_key_on_sqlite") else {
        return;
    };
    runtime().block_on(async {
        the_loser_of_a_concurrent_creation_destroys_its_key(&softhsm, Fixture::sqlite().await).await
    });
}

#[test]
fn the_loser_of_a_concurrent_creation_destroys_its_key_on_postgres() {
    let Some(softhsm) = softhsm_child("hsm_ca::the_loser_of_a_concurrent_creation_destroys_its_key_on_postgres") else {
        return;
    };
    runtime().block_on(async {
        the_loser_of_a_concurrent_creation_destroys_its_key(&softhsm, Fixture::postgres().await).await
    });
}

#[test]
fn bad_token_settings_fail_at_start_with_clear_errors() {
    let Some(softhsm) = softhsm_child("hsm_ca::bad_token_settings_fail_at_start_with_clear_errors") else { return };
    runtime().block_on(bad_token_settings_fail_at_start(&softhsm));
}

async fn org_ca_keys_in_a_token_sign_leaves_and_crls(softhsm: &SoftHsm, fixture: Fixture) {
    softhsm.init_token(TOKEN, USER_PIN, SO_PIN).expect("init token");
    let kek = KeyEncryptionKey::generate();
    let with_token = options(&kek, Some(pkcs11(softhsm, TOKEN, USER_PIN)));
    let now = UnixMillis::now_from_system();
    let org = create_org(&fixture.db, "acme", now).await;
    let authority = Authority::load(&fixture.db, &with_token, "postgres://unused", now).await.expect("load with token");
    let token = authority.org_key_token().expect("a token is configured").clone();

    // The org CA's key is made on the token, under a label of its own.
    let (org_ca, created) = authority.ensure_org_ca(&fixture.db, &org, now).await.unwrap();
    assert!(created);
    let label = org_ca.key_label().expect("the key lives in the token").to_owned();
    let expected_start = format!("{DEFAULT_KEY_LABEL_PREFIX}{org}-");
    assert!(label.starts_with(&expected_start) && label.len() == expected_start.len() + 8, "{label}");
    let key = token.find_ed25519(KeyName::Label(&label)).unwrap();
    assert_eq!(key.public_key(), org_ca.certificate.public_key());
    let protection = key.protection().unwrap();
    assert_eq!(
        protection,
        KeyProtection { sensitive: true, extractable: false, always_sensitive: true, never_extractable: true }
    );
    assert_eq!(token.private_key_labels().unwrap(), std::slice::from_ref(&label));

    // The row says where the key is and holds no key bytes.
    let row = sqlx::query("SELECT key_store, key_sealed, key_ref FROM org_cas WHERE org_id = $1")
        .bind(org.to_string())
        .fetch_one(fixture.db.pool())
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>("key_store"), "pkcs11");
    assert_eq!(row.get::<Vec<u8>, _>("key_sealed"), Vec::<u8>::new(), "no key bytes");
    assert_eq!(row.get::<Option<String>, _>("key_ref"), Some(label.clone()));

    // A leaf and a CRL signed by the token verify, in Rust and with openssl.
    let agent_key = SigningKey::from_bytes(&[7; 32]);
    let issued = authority.issue(&fixture.db, &proof(&org, &agent_key, now), &[], now).await.unwrap();
    assert_eq!(issued.org_ca, org_ca.certificate);
    let anchors = TrustAnchors::new(vec![authority.root().clone()]).unwrap();
    let chain = [issued.certificate.der(), issued.org_ca.der()];
    verify_chain(&chain, &anchors, &Revocations::default(), now, ExpectedRole::AnyAgent).unwrap();
    let files = tempfile::tempdir().unwrap();
    write_pems(files.path(), authority.root(), &org_ca.certificate, &issued.certificate);
    succeeded(&openssl(
        &["verify", "-x509_strict", "-CAfile", "root.pem", "-untrusted", "org.pem", "leaf.pem"],
        files.path(),
    ));
    molt_control_plane::ca::revoke(&fixture.db, issued.certificate.serial(), RevocationReason::KeyCompromise, now)
        .await
        .unwrap();
    let crl = authority.crl(&fixture.db, &org, now).await.unwrap();
    let crl = RevocationList::from_der_verified(crl.der(), &org_ca.certificate).unwrap();
    assert!(crl.revoked().contains(&issued.certificate.serial()));
    std::fs::write(files.path().join("crl.pem"), crl.to_pem()).unwrap();
    succeeded(&openssl(&["crl", "-in", "crl.pem", "-CAfile", "org.pem", "-noout"], files.path()));
    let revoked = openssl(
        &["verify", "-crl_check", "-CRLfile", "crl.pem", "-CAfile", "root.pem", "-untrusted", "org.pem", "leaf.pem"],
        files.path(),
    );
    let said = String::from_utf8_lossy(&revoked.stderr).into_owned() + &String::from_utf8_lossy(&revoked.stdout);
    assert!(!revoked.status.success() && said.contains("certificate revoked"), "{revoked:?}");

    // A replica without the token makes a sealed org CA; a replica with one uses both.
    let without_token = options(&kek, None);
    let software = Authority::load(&fixture.db, &without_token, "postgres://unused", now).await.unwrap();
    let sealed_org = create_org(&fixture.db, "sealed-co", now).await;
    let (sealed_ca, _) = software.ensure_org_ca(&fixture.db, &sealed_org, now).await.unwrap();
    assert_eq!(sealed_ca.key_label(), None);
    let other_agent = SigningKey::from_bytes(&[8; 32]);
    let mixed = authority.issue(&fixture.db, &proof(&sealed_org, &other_agent, now), &[], now).await.unwrap();
    let chain = [mixed.certificate.der(), mixed.org_ca.der()];
    verify_chain(&chain, &anchors, &Revocations::default(), now, ExpectedRole::AnyAgent).unwrap();
    let bundle = authority.trust_bundle(&fixture.db, now).await.unwrap();
    assert_eq!((bundle.org_cas.len(), bundle.crls.len()), (2, 2));
    assert_eq!(token.private_key_labels().unwrap().len(), 1, "the sealed org CA made no key on the token");

    // Without the token, the token-held org CA fails with an error naming the org and label.
    let error = software.issue(&fixture.db, &proof(&org, &other_agent, now), &[], now).await.unwrap_err();
    let IssueCertificateError::OrgCa(OrgCaError::HsmNotConfigured { org: named, label: named_label }) = &error else {
        panic!("expected HsmNotConfigured, got {error:?}");
    };
    assert_eq!((named, named_label), (&org, &label));
    let message = error.to_string();
    assert!(message.contains(org.as_str()) && message.contains(&label) && message.contains("ca.pkcs11"), "{message}");
    assert!(software.crl(&fixture.db, &org, now).await.is_err());

    // After a restart (a new authority, a new token login) the same key signs again.
    drop((authority, token, key));
    let restarted = Authority::load(&fixture.db, &with_token, "postgres://unused", now).await.unwrap();
    let later = now.saturating_add(std::time::Duration::from_secs(60));
    let third_agent = SigningKey::from_bytes(&[9; 32]);
    let again = restarted.issue(&fixture.db, &proof(&org, &third_agent, later), &[], later).await.unwrap();
    assert_eq!(again.org_ca, org_ca.certificate, "the org CA was not made again");
    let chain = [again.certificate.der(), again.org_ca.der()];
    verify_chain(&chain, &anchors, &Revocations::default(), later, ExpectedRole::AnyAgent).unwrap();
    write_pems(files.path(), restarted.root(), &org_ca.certificate, &again.certificate);
    succeeded(&openssl(
        &["verify", "-x509_strict", "-CAfile", "root.pem", "-untrusted", "org.pem", "leaf.pem"],
        files.path(),
    ));
    assert_eq!(restarted.org_key_token().unwrap().private_key_labels().unwrap(), [label]);
    let pkcs11_rows_with_bytes: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM org_cas WHERE key_store = 'pkcs11' AND length(key_sealed) > 0")
            .fetch_one(fixture.db.pool())
            .await
            .unwrap()
            .get("n");
    assert_eq!(pkcs11_rows_with_bytes, 0);
}

async fn the_loser_of_a_concurrent_creation_destroys_its_key(softhsm: &SoftHsm, fixture: Fixture) {
    softhsm.init_token(TOKEN, USER_PIN, SO_PIN).expect("init token");
    let kek = KeyEncryptionKey::generate();
    let with_token = options(&kek, Some(pkcs11(softhsm, TOKEN, USER_PIN)));
    let now = UnixMillis::now_from_system();
    // Two replicas: each its own database handle and token login.
    let first = Authority::load(&fixture.db, &with_token, "postgres://unused", now).await.unwrap();
    let second_db = fixture.second_handle().await;
    let second = Authority::load(&second_db, &with_token, "postgres://unused", now).await.unwrap();
    let token = first.org_key_token().unwrap().clone();

    // The second replica creates after the first stored its CA: it loses for certain.
    let org = create_org(&fixture.db, "race-one", now).await;
    let (won, created) = first.ensure_org_ca(&fixture.db, &org, now).await.unwrap();
    assert!(created);
    let (lost, created) = second.create_org_ca(&second_db, &org, now).await.unwrap();
    assert!(!created);
    assert_eq!(lost.certificate, won.certificate);
    assert_eq!(token.private_key_labels().unwrap(), [won.key_label().unwrap().to_owned()]);

    // Both at once, several times: one wins each org, and one key per org is left.
    for round in 0..4 {
        let org = create_org(&fixture.db, &format!("race-{round}"), now).await;
        let (a, b) =
            tokio::join!(first.create_org_ca(&fixture.db, &org, now), second.create_org_ca(&second_db, &org, now));
        let ((a, a_created), (b, b_created)) = (a.unwrap(), b.unwrap());
        assert!(a_created != b_created, "exactly one replica creates the org CA");
        assert_eq!(a.certificate, b.certificate);
        let labels = token.private_key_labels().unwrap();
        let of_org: Vec<_> = labels.iter().filter(|label| label.contains(org.as_str())).collect();
        assert_eq!(of_org, [a.key_label().unwrap()], "the loser's key is gone");
    }
    assert_eq!(token.private_key_labels().unwrap().len(), 5);
    assert_eq!(fixture.count("org_cas").await, 5);

    // A row naming a key that is not on the token, or a key that is not the org CA's,
    // signs nothing and says which org and label.
    let agent = SigningKey::from_bytes(&[3; 32]);
    let point_at = |label: &str| {
        sqlx::query("UPDATE org_cas SET key_ref = $1 WHERE org_id = $2")
            .bind(label.to_owned())
            .bind(org.to_string())
            .execute(fixture.db.pool())
    };
    point_at("molt-org-ca-missing").await.unwrap();
    let error = first.issue(&fixture.db, &proof(&org, &agent, now), &[], now).await.unwrap_err();
    assert!(
        matches!(&error, IssueCertificateError::OrgCa(OrgCaError::HsmKey { org: named, label, .. })
            if named == &org && label == "molt-org-ca-missing"),
        "{error:?}"
    );
    token.generate_ed25519("a-stranger").unwrap();
    point_at("a-stranger").await.unwrap();
    let error = first.issue(&fixture.db, &proof(&org, &agent, now), &[], now).await.unwrap_err();
    assert!(
        matches!(&error, IssueCertificateError::OrgCa(OrgCaError::HsmKeyMismatch { org: named, label })
            if named == &org && label == "a-stranger"),
        "{error:?}"
    );
    assert!(error.to_string().contains("does not match the org CA certificate"), "{error}");
    // A token-held row cannot carry key bytes, nor a sealed row lack them.
    let bytes = sqlx::query("UPDATE org_cas SET key_sealed = $1 WHERE org_id = $2")
        .bind(vec![1u8; 60])
        .bind(org.to_string())
        .execute(fixture.db.pool())
        .await;
    assert!(bytes.is_err(), "the CHECK constraint refuses key bytes beside a key_ref");
}

async fn bad_token_settings_fail_at_start(softhsm: &SoftHsm) {
    softhsm.init_token(TOKEN, USER_PIN, SO_PIN).expect("init token");
    let fixture = Fixture::sqlite().await;
    let kek = KeyEncryptionKey::generate();
    let now = UnixMillis::now_from_system();
    let load = |pkcs11: Pkcs11Options| {
        let options = options(&kek, Some(pkcs11));
        let db = fixture.db.clone();
        async move { Authority::load(&db, &options, "postgres://unused", now).await.map(drop) }
    };
    let chain = |error: &LoadAuthorityError| {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    };

    let wrong_pin = load(pkcs11(softhsm, TOKEN, "0000-wrong")).await.unwrap_err();
    assert!(
        matches!(&wrong_pin, LoadAuthorityError::Token { source: OpenError::WrongPin { label }, .. } if label == TOKEN)
    );
    assert!(chain(&wrong_pin).contains("wrong pin"), "{}", chain(&wrong_pin));

    let mut missing_module = pkcs11(softhsm, TOKEN, USER_PIN);
    missing_module.module = PathBuf::from("/nonexistent/libpkcs11-missing.so");
    let error = load(missing_module).await.unwrap_err();
    assert!(matches!(&error, LoadAuthorityError::Token { source: OpenError::ModuleNotFound { .. }, .. }));
    assert!(chain(&error).contains("/nonexistent/libpkcs11-missing.so"), "{}", chain(&error));

    let mut missing_token = pkcs11(softhsm, TOKEN, USER_PIN);
    missing_token.token = TokenSelector::Label("no-such-token".to_owned());
    let error = load(missing_token).await.unwrap_err();
    assert!(matches!(&error, LoadAuthorityError::Token { source: OpenError::TokenNotFound { .. }, .. }));
    assert!(chain(&error).contains("no-such-token") && chain(&error).contains(TOKEN), "{}", chain(&error));

    let mut missing_pin = pkcs11(softhsm, TOKEN, USER_PIN);
    missing_pin.pin = PinSource::Env("MOLT_CP_TEST_PIN_NEVER_SET".to_owned());
    let error = load(missing_pin).await.unwrap_err();
    assert!(matches!(&error, LoadAuthorityError::Token { source: OpenError::Pin(_), .. }));
    assert!(chain(&error).contains("MOLT_CP_TEST_PIN_NEVER_SET"), "{}", chain(&error));

    // The right settings still work after all that.
    load(pkcs11(softhsm, TOKEN, USER_PIN)).await.expect("the right pin opens the token");
}

// ---- helpers ----

/// In the child: the SoftHSM2 setup. In the parent: runs the child and returns `None`.
fn softhsm_child(test: &str) -> Option<SoftHsm> {
    if let Ok(dir) = std::env::var(CHILD_DIR_VAR) {
        let dir = PathBuf::from(dir);
        return Some(SoftHsm::existing(dir.join("softhsm2.conf"), PathBuf::from(SOFTHSM2_MODULE)));
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let softhsm = SoftHsm::create(dir.path(), SOFTHSM2_MODULE.as_ref())
        .unwrap_or_else(|error| panic!("the org CA token tests need SoftHSM2: {error}"));
    let exe = std::env::current_exe().expect("test binary path");
    let output = softhsm
        .command(exe)
        .env(CHILD_DIR_VAR, dir.path())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .output()
        .expect("re-run the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child test {test} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "child did not run {test}:\n{stdout}\n{stderr}");
    None
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn options(kek: &KeyEncryptionKey, pkcs11: Option<Pkcs11Options>) -> CaOptions {
    CaOptions { key_encryption_key: KekSource::Value(kek.clone()), root: RootSource::Generated, pkcs11 }
}

/// Token settings with the PIN in a private file beside the SoftHSM2 configuration.
fn pkcs11(softhsm: &SoftHsm, token: &str, pin: &str) -> Pkcs11Options {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = softhsm.conf().parent().expect("conf has a directory");
    let pin_file = dir.join(format!("{token}-{pin}.pin"));
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&pin_file).unwrap();
    file.write_all(pin.as_bytes()).unwrap();
    Pkcs11Options {
        module: softhsm.module().to_owned(),
        token: TokenSelector::Label(token.to_owned()),
        pin: PinSource::File(pin_file),
        pool_size: 2,
        key_label_prefix: DEFAULT_KEY_LABEL_PREFIX.to_owned(),
    }
}

async fn create_org(db: &Database, name: &str, now: UnixMillis) -> OrgId {
    db.create_org(&OrgName::new(name).unwrap(), now).await.unwrap().id
}

fn proof(org: &OrgId, key: &SigningKey, now: UnixMillis) -> PossessionProof {
    let public_key = key.public_key();
    let signature = key.sign(&proof_message(LeafKind::Agent, org, &public_key, now));
    PossessionProof::verify(LeafKind::Agent, org, &public_key, now, &signature, now).unwrap()
}

fn write_pems(dir: &Path, root: &Certificate, org_ca: &Certificate, leaf: &Certificate) {
    std::fs::write(dir.join("root.pem"), root.to_pem()).unwrap();
    std::fs::write(dir.join("org.pem"), org_ca.to_pem()).unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf.to_pem()).unwrap();
}

fn openssl(args: &[&str], dir: &Path) -> Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|error| panic!("openssl is needed (apt-get install openssl): {error}"))
}

fn succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "openssl failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
