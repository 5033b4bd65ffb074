//! Ceremony dry runs: the whole ceremony, rehearsed on a throw-away SoftHSM2 token.
//!
//! [`start`] checks the ceremony as the real run would, creates a SoftHSM2 token with the
//! ceremony's token label in a fresh directory and starts `program` (the `molt-hsm`
//! binary) again with `SOFTHSM2_CONF` pointing there, because SoftHSM2 reads it once per
//! process. That process calls [`run`]. The rehearsal token is deleted afterwards; the
//! outputs stay in the directory for inspection. The real module and token are never
//! opened, and no PIN is asked for.

use std::path::{Path, PathBuf};

use crate::PinSource;
use crate::ceremony::{Ceremony, CeremonyError, Mode, Report};
use crate::error::OpenError;
use crate::softhsm::{SoftHsm, SoftHsmError};
use crate::token::{SESSION_POOL_SIZE_DEFAULT, Token, TokenConfig, TokenSelector};
use crate::transcript::{hex, sha256};

/// Variable that carries the throw-away PIN to the rehearsal process.
pub const REHEARSAL_PIN_VAR: &str = "MOLT_HSM_REHEARSAL_PIN";

/// Why a dry run could not be carried out (a failing ceremony is reported by the
/// rehearsal process itself, then as [`RehearsalError::Failed`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RehearsalError {
    #[error(transparent)]
    Ceremony(#[from] CeremonyError),
    #[error(transparent)]
    SoftHsm(#[from] SoftHsmError),
    #[error("opening the rehearsal token: {0}")]
    Open(#[from] OpenError),
    #[error("creating {path}: {source}")]
    Directory { path: PathBuf, source: std::io::Error },
    #[error("starting the rehearsal: {0}")]
    Spawn(std::io::Error),
    #[error("the dry run failed; the real ceremony would fail the same way")]
    Failed,
}

/// Prepares the rehearsal token and runs `program ceremony FILE --softhsm-module MODULE
/// --rehearse-into DIR` with it. Returns the directory holding the rehearsal's outputs.
pub fn start(
    ceremony: &Ceremony,
    ceremony_file: &Path,
    softhsm_module: &Path,
    program: &Path,
) -> Result<PathBuf, RehearsalError> {
    ceremony.check_outputs_absent(&Mode::Real)?;
    let stamp = molt_protocol::UnixMillis::now_from_system().0;
    let out_dir = std::env::temp_dir().join(format!("molt-ceremony-dry-run-{}-{stamp}", std::process::id()));
    std::fs::create_dir(&out_dir).map_err(|source| RehearsalError::Directory { path: out_dir.clone(), source })?;
    let result = rehearse_in(ceremony, ceremony_file, softhsm_module, program, &out_dir);
    let _ = std::fs::remove_dir_all(out_dir.join("softhsm"));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&out_dir);
    }
    result.map(|()| out_dir)
}

fn rehearse_in(
    ceremony: &Ceremony,
    ceremony_file: &Path,
    softhsm_module: &Path,
    program: &Path,
    out_dir: &Path,
) -> Result<(), RehearsalError> {
    let softhsm = SoftHsm::create(&out_dir.join("softhsm"), softhsm_module)?;
    let label = match ceremony.token_selector() {
        TokenSelector::Label(label) => label,
        TokenSelector::SlotIndex(_) => "rehearsal".to_owned(),
    };
    // Not a secret: the token is thrown away. Unique per directory all the same.
    let pin = hex(&sha256(out_dir.as_os_str().as_encoded_bytes()))[..16].to_owned();
    softhsm.init_token(&label, &pin, &pin)?;
    let status = softhsm
        .command(program)
        .arg("ceremony")
        .arg(ceremony_file)
        .arg("--softhsm-module")
        .arg(softhsm_module)
        .arg("--rehearse-into")
        .arg(out_dir)
        .env(REHEARSAL_PIN_VAR, &pin)
        .status()
        .map_err(RehearsalError::Spawn)?;
    if !status.success() {
        return Err(RehearsalError::Failed);
    }
    Ok(())
}

/// The rehearsal itself, in the process [`start`] started: runs the ceremony on the
/// rehearsal token, writing into `out_dir`.
pub fn run(ceremony: &Ceremony, softhsm_module: &Path, out_dir: PathBuf) -> Result<Report, RehearsalError> {
    let token = Token::open(&TokenConfig {
        module: softhsm_module.to_owned(),
        token: TokenSelector::SlotIndex(0),
        pin: PinSource::Env(REHEARSAL_PIN_VAR.to_owned()),
        pool_size: SESSION_POOL_SIZE_DEFAULT,
    })?;
    Ok(ceremony.run(&token, &Mode::Rehearsal { out_dir })?)
}
