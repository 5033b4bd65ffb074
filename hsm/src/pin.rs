//! Where a token's user PIN comes from: a prompt, a file or an environment variable.
//! Never from a ceremony file or a config file: those are reviewed and copied around.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use zeroize::Zeroizing;

/// Longest PIN accepted (PKCS#11 modules allow far less in practice).
pub const PIN_LEN_MAX: usize = 256;

/// Where to read the PIN from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// Ask on the terminal (echo off), or read one line from standard input.
    Prompt,
    /// A file holding the PIN (a trailing newline is ignored); must not be readable by
    /// group or others.
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

/// Why the PIN could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    #[error("environment variable {name} is not set")]
    EnvMissing { name: String },
    #[error("cannot read pin file {path}: {source}")]
    FileRead { path: PathBuf, source: std::io::Error },
    #[error("pin file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    FilePermissions { path: PathBuf, mode: u32 },
    #[error("cannot read the pin from the terminal: {0}")]
    Prompt(std::io::Error),
    #[error("the pin is empty")]
    Empty,
    #[error("the pin is longer than {PIN_LEN_MAX} bytes")]
    TooLong,
}

impl PinSource {
    /// Reads the PIN. `prompt` names what it is for, e.g. `token "molt-root"`.
    pub fn read(&self, prompt: &str) -> Result<Zeroizing<String>, PinError> {
        let raw = match self {
            PinSource::Env(name) => {
                Zeroizing::new(std::env::var(name).map_err(|_| PinError::EnvMissing { name: name.clone() })?)
            }
            PinSource::File(path) => read_pin_file(path)?,
            PinSource::Prompt => prompt_for_pin(prompt).map_err(PinError::Prompt)?,
        };
        let pin = Zeroizing::new(raw.trim_end_matches(['\n', '\r']).to_owned());
        if pin.is_empty() {
            return Err(PinError::Empty);
        }
        if pin.len() > PIN_LEN_MAX {
            return Err(PinError::TooLong);
        }
        Ok(pin)
    }
}

fn read_pin_file(path: &PathBuf) -> Result<Zeroizing<String>, PinError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|source| PinError::FileRead { path: path.clone(), source })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PinError::FilePermissions { path: path.clone(), mode });
    }
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|source| PinError::FileRead { path: path.clone(), source })
}

/// Turns terminal echo off with `stty` (no unsafe code needed) while reading one line.
fn prompt_for_pin(prompt: &str) -> std::io::Result<Zeroizing<String>> {
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    if terminal {
        eprint!("PIN for {prompt}: ");
        std::io::stderr().flush()?;
        let _ = std::process::Command::new("stty").arg("-echo").stdin(std::process::Stdio::inherit()).status();
    }
    let mut line = Zeroizing::new(String::new());
    let result = stdin.lock().read_line(&mut line);
    if terminal {
        let _ = std::process::Command::new("stty").arg("echo").stdin(std::process::Stdio::inherit()).status();
        eprintln!();
    }
    result?;
    Ok(line)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn pin_files_must_be_private_and_non_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "1234\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(PinSource::File(path.clone()).read("test").unwrap().as_str(), "1234");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(PinSource::File(path.clone()).read("test"), Err(PinError::FilePermissions { .. })));
        std::fs::write(&path, "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(PinSource::File(path).read("test"), Err(PinError::Empty)));
        assert!(matches!(PinSource::File(dir.path().join("absent")).read("test"), Err(PinError::FileRead { .. })));
        assert!(matches!(
            PinSource::Env("MOLT_HSM_TEST_UNSET_VARIABLE".into()).read("test"),
            Err(PinError::EnvMissing { .. })
        ));
    }
}
