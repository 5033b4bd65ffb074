//! Runs a test body in a child process that sees a SoftHSM2 token directory of its own.
//!
//! SoftHSM2 finds its tokens through `SOFTHSM2_CONF`, read once per process, and tests
//! may not set environment variables (they are process-wide and the workspace forbids
//! unsafe code). So a test re-runs its own binary, filtered to itself, with the variable
//! set; the parent checks that the child ran exactly that one test and passed.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use molt_hsm::softhsm::{SOFTHSM2_MODULE, SoftHsm};
use molt_hsm::{PinSource, Token, TokenConfig, TokenSelector};

const CHILD_DIR_VAR: &str = "MOLT_HSM_TEST_DIR";
pub const USER_PIN: &str = "4321-user";
pub const SO_PIN: &str = "8765-so";

/// In the child: the SoftHSM2 setup. In the parent: runs the child and returns `None`.
pub fn softhsm_child(test: &str) -> Option<SoftHsm> {
    if let Ok(dir) = std::env::var(CHILD_DIR_VAR) {
        let dir = PathBuf::from(dir);
        return Some(SoftHsm::existing(dir.join("softhsm2.conf"), PathBuf::from(SOFTHSM2_MODULE)));
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let softhsm = SoftHsm::create(dir.path(), SOFTHSM2_MODULE.as_ref())
        .unwrap_or_else(|error| panic!("the HSM tests need SoftHSM2: {error}"));
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

/// Creates a token and opens it. SoftHSM2 sees only the tokens that exist when the
/// module is initialised, so a test creates every token before it opens the first.
pub fn token(softhsm: &SoftHsm, label: &str, pool_size: usize) -> Token {
    init_tokens(softhsm, &[label]);
    open(softhsm, label, pool_size).expect("open token")
}

pub fn init_tokens(softhsm: &SoftHsm, labels: &[&str]) {
    for label in labels {
        softhsm.init_token(label, USER_PIN, SO_PIN).expect("init token");
    }
}

pub fn open(softhsm: &SoftHsm, label: &str, pool_size: usize) -> Result<Token, molt_hsm::OpenError> {
    let dir = softhsm.conf().parent().expect("conf has a directory").to_owned();
    let pin_file = dir.join(format!("{label}.pin"));
    write_private(&pin_file, USER_PIN);
    Token::open(&TokenConfig {
        module: softhsm.module().to_owned(),
        token: TokenSelector::Label(label.to_owned()),
        pin: PinSource::File(pin_file),
        pool_size,
    })
}

pub fn write_private(path: &std::path::Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

/// A software signer, for the software half of the shared suites.
pub fn software_signer(seed: u8) -> Arc<dyn molt_protocol::keys::Signer> {
    Arc::new(molt_protocol::keys::SigningKey::from_bytes(&[seed; 32]))
}
