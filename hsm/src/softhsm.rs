//! Throw-away SoftHSM2 token directories, for ceremony rehearsals (`--dry-run`), tests
//! and benchmarks. SoftHSM2 reads its token directory from the file `SOFTHSM2_CONF`
//! names, once per process; so whoever uses a [`SoftHsm`] runs the PKCS#11 work in a
//! process started with [`SoftHsm::command`] (environment variables are process-wide).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's `softhsm2` package installs the module.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The variable SoftHSM2 reads its configuration path from.
pub const SOFTHSM2_CONF_VAR: &str = "SOFTHSM2_CONF";

/// Why a SoftHSM2 directory or token could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SoftHsmError {
    #[error("SoftHSM2 module {path} is missing: install it with `apt-get install softhsm2`")]
    ModuleMissing { path: PathBuf },
    #[error("writing the SoftHSM2 configuration in {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("running softhsm2-util (install it with `apt-get install softhsm2`): {0}")]
    Spawn(std::io::Error),
    #[error("softhsm2-util --init-token failed for token {label:?}: {output}")]
    InitToken { label: String, output: String },
}

/// A SoftHSM2 configuration whose tokens live in a directory of their own.
#[derive(Debug, Clone)]
pub struct SoftHsm {
    conf: PathBuf,
    module: PathBuf,
}

impl SoftHsm {
    /// Writes `softhsm2.conf` and a `tokens/` directory under `dir`.
    pub fn create(dir: &Path, module: &Path) -> Result<SoftHsm, SoftHsmError> {
        if !module.exists() {
            return Err(SoftHsmError::ModuleMissing { path: module.to_owned() });
        }
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).map_err(|source| SoftHsmError::Write { path: tokens.clone(), source })?;
        let conf = dir.join("softhsm2.conf");
        let text = format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        );
        std::fs::write(&conf, text).map_err(|source| SoftHsmError::Write { path: conf.clone(), source })?;
        Ok(SoftHsm { conf, module: module.to_owned() })
    }

    /// The configuration at `conf`, as left by [`SoftHsm::create`].
    pub fn existing(conf: PathBuf, module: PathBuf) -> SoftHsm {
        SoftHsm { conf, module }
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }

    pub fn module(&self) -> &Path {
        &self.module
    }

    /// Initialises a new token in the first free slot with `softhsm2-util`.
    pub fn init_token(&self, label: &str, user_pin: &str, so_pin: &str) -> Result<(), SoftHsmError> {
        let output = self
            .command("softhsm2-util")
            .args(["--init-token", "--free", "--label", label, "--pin", user_pin, "--so-pin", so_pin])
            .output()
            .map_err(SoftHsmError::Spawn)?;
        if !output.status.success() {
            let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
            return Err(SoftHsmError::InitToken { label: label.to_owned(), output: text.trim().to_owned() });
        }
        Ok(())
    }

    /// A command whose process sees this configuration.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command.env(SOFTHSM2_CONF_VAR, &self.conf);
        command
    }
}
