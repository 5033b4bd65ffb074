//! `molt-provision batch FILE`: provisions every device a batch file lists.
//!
//! The model: the file ([`BatchFile`], TOML) names the control plane, the org, and one
//! `[[device]]` table per device (its name, directory, region, and optionally its own org,
//! config path, PKCS#11 token and `force`). Devices are provisioned one after the other;
//! each gets its own enrollment token, created through the admin API just before it is
//! spent and revoked if the enrollment fails. A device whose directory already holds a
//! valid enrollment with this control plane is reported as already provisioned and gets no
//! token, so a batch can be re-run after a partial failure. A failure is recorded and the
//! batch goes on; [`Summary::failed`] counts them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use molt_edge::enroll::{self, EnrollOptions, KeyPlan, Outcome, Pkcs11Plan};
use molt_sdk::api::ApiClient;
use molt_sdk::api::enrollment::NewEnrollmentToken;
use serde::{Deserialize, Serialize};

/// Most devices one batch file may list.
pub const DEVICES_MAX: usize = 10_000;
/// Largest batch file read.
pub const BATCH_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Lifetime of each device's token: it is spent seconds after it is made.
pub const DEVICE_TOKEN_TTL: Duration = Duration::from_secs(600);
/// Longest device name.
pub const DEVICE_NAME_LEN_MAX: usize = 64;

/// A batch file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchFile {
    /// Base URL of the control plane's HTTP API.
    pub control_plane: String,
    /// The control plane's gRPC address, written into each device's config.
    pub grpc_addr: SocketAddr,
    /// Org the devices enroll into, unless a device names its own.
    #[serde(default)]
    pub org: Option<String>,
    /// Lifetime of the devices' certificates in seconds (server default when absent).
    #[serde(default)]
    pub certificate_validity_secs: Option<u64>,
    #[serde(rename = "device", default)]
    pub devices: Vec<Device>,
}

/// One `[[device]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// A name for reports: 1 to [`DEVICE_NAME_LEN_MAX`] characters, unique in the file.
    pub name: String,
    /// Directory of the device's identity; relative to the batch file's directory.
    pub dir: PathBuf,
    pub region: String,
    #[serde(default)]
    pub org: Option<String>,
    /// Where the config is written (default `dir/edge.toml`); relative to the batch file.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Generate the key in this token instead of a file.
    #[serde(default)]
    pub pkcs11: Option<DevicePkcs11>,
    /// Replace a different identity in `dir`.
    #[serde(default)]
    pub force: bool,
}

/// A device's `[device.pkcs11]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePkcs11 {
    pub module: PathBuf,
    pub token_label: String,
    #[serde(default)]
    pub pin_env: Option<String>,
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    #[serde(default)]
    pub key_label_prefix: Option<String>,
}

/// Why a batch file is unusable; nothing was provisioned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchFileError {
    #[error("failed to read batch file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("batch file {} is larger than {BATCH_FILE_BYTES_MAX} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("invalid batch file {}: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
}

/// What happened to one device.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceReport {
    pub name: String,
    /// `enrolled`, `already_provisioned` or `failed`.
    pub status: DeviceStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A device's outcome.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    Enrolled,
    AlreadyProvisioned,
    Failed,
}

/// The batch's report.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub enrolled: usize,
    pub already_provisioned: usize,
    pub failed: usize,
    pub devices: Vec<DeviceReport>,
}

impl BatchFile {
    /// Reads and checks a batch file; paths in it become relative to its directory.
    pub fn load(path: &Path) -> Result<BatchFile, BatchFileError> {
        let read = |source| BatchFileError::Read { path: path.to_owned(), source };
        if std::fs::metadata(path).map_err(read)?.len() > BATCH_FILE_BYTES_MAX {
            return Err(BatchFileError::TooLarge { path: path.to_owned() });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let invalid = |detail: String| BatchFileError::Invalid { path: path.to_owned(), detail };
        let mut file: BatchFile =
            toml::from_str(&text).map_err(|error| invalid(error.to_string().trim().to_owned()))?;
        let base = std::path::absolute(path).map_err(read)?;
        let base = base.parent().unwrap_or(Path::new("/"));
        for device in &mut file.devices {
            device.dir = base.join(&device.dir);
            device.config = device.config.as_ref().map(|config| base.join(config));
        }
        let problems = file.problems();
        if !problems.is_empty() {
            return Err(invalid(problems.join("; ")));
        }
        Ok(file)
    }

    /// Every problem of the file's values, each naming its device.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.devices.is_empty() {
            problems.push("no [[device]] listed".to_owned());
        }
        if self.devices.len() > DEVICES_MAX {
            problems.push(format!("{} devices listed, at most {DEVICES_MAX}", self.devices.len()));
        }
        for (index, device) in self.devices.iter().enumerate() {
            let at = format!("device[{index}] ({:?})", device.name);
            if device.name.is_empty() || device.name.chars().count() > DEVICE_NAME_LEN_MAX {
                problems.push(format!("{at}: name must be 1 to {DEVICE_NAME_LEN_MAX} characters"));
            }
            if let Err(error) = device.region.parse::<molt_edge::config::Region>() {
                problems.push(format!("{at}: region: {error}"));
            }
            if device.org.is_none() && self.org.is_none() {
                problems.push(format!("{at}: no org (set `org` at the top or in the device)"));
            }
            if let Some(pkcs11) = &device.pkcs11 {
                if pkcs11.pin_env.is_some() == pkcs11.pin_file.is_some() {
                    problems.push(format!("{at}: pkcs11: give exactly one of pin_env and pin_file"));
                }
            }
            let earlier = &self.devices[..index];
            if earlier.iter().any(|other| other.name == device.name) {
                problems.push(format!("{at}: name used twice"));
            }
            if earlier.iter().any(|other| other.dir == device.dir) {
                problems.push(format!("{at}: dir {} used twice", device.dir.display()));
            }
        }
        problems
    }
}

/// Provisions every device, calling `progress` after each one.
pub async fn run(file: &BatchFile, admin: &ApiClient, mut progress: impl FnMut(&DeviceReport)) -> Summary {
    let mut devices = Vec::with_capacity(file.devices.len());
    for device in &file.devices {
        let report = match provision(file, admin, device).await {
            Ok((outcome, edge_id)) => DeviceReport {
                name: device.name.clone(),
                status: match outcome {
                    Outcome::Enrolled => DeviceStatus::Enrolled,
                    Outcome::AlreadyEnrolled => DeviceStatus::AlreadyProvisioned,
                },
                edge_id: Some(edge_id),
                error: None,
            },
            Err(error) => DeviceReport {
                name: device.name.clone(),
                status: DeviceStatus::Failed,
                edge_id: None,
                error: Some(format!("{error:#}")),
            },
        };
        progress(&report);
        devices.push(report);
    }
    let count = |status| devices.iter().filter(|report| report.status == status).count();
    Summary {
        enrolled: count(DeviceStatus::Enrolled),
        already_provisioned: count(DeviceStatus::AlreadyProvisioned),
        failed: count(DeviceStatus::Failed),
        devices,
    }
}

/// One device: already provisioned, or a new token spent on it.
async fn provision(file: &BatchFile, admin: &ApiClient, device: &Device) -> anyhow::Result<(Outcome, String)> {
    use anyhow::Context as _;
    if !device.force {
        if let Some(existing) = enroll::existing_enrollment(&device.dir, &file.control_plane).await? {
            return Ok((existing.outcome, existing.edge_id.to_string()));
        }
    }
    // Invariant: `BatchFile::problems` refused a device without an org.
    let org_id = device.org.clone().or_else(|| file.org.clone()).context("no org")?;
    let token = admin
        .create_enrollment_token(&NewEnrollmentToken {
            org_id,
            region: device.region.clone(),
            ttl_secs: Some(DEVICE_TOKEN_TTL.as_secs()),
            certificate_validity_secs: file.certificate_validity_secs,
        })
        .await
        .context("while creating the device's enrollment token")?;
    let options = EnrollOptions {
        control_plane: file.control_plane.clone(),
        token: token.token.clone(),
        grpc_addr: file.grpc_addr,
        dir: device.dir.clone(),
        config: device.config.clone(),
        key: key_plan(device.pkcs11.as_ref()),
        force: device.force,
    };
    match enroll::enroll(&options).await {
        Ok(enrolled) => Ok((enrolled.outcome, enrolled.edge_id.to_string())),
        Err(error) => {
            // An unspent token should not outlive the attempt.
            if let Err(revoke) = admin.revoke_enrollment_token(&token.record.id).await {
                tracing::warn!(device = %device.name, error = %revoke, "failed to revoke the device's token");
            }
            Err(anyhow::Error::new(error).context("while enrolling"))
        }
    }
}

/// The key plan of a device.
pub fn key_plan(pkcs11: Option<&DevicePkcs11>) -> KeyPlan {
    let Some(pkcs11) = pkcs11 else { return KeyPlan::File };
    let pin = match (&pkcs11.pin_env, &pkcs11.pin_file) {
        (Some(name), _) => molt_hsm::PinSource::Env(name.clone()),
        (None, Some(path)) => molt_hsm::PinSource::File(path.clone()),
        // Refused by `BatchFile::problems`; `enroll` refuses a prompt too.
        (None, None) => molt_hsm::PinSource::Prompt,
    };
    KeyPlan::Pkcs11(Pkcs11Plan {
        module: pkcs11.module.clone(),
        token_label: pkcs11.token_label.clone(),
        key_label_prefix: pkcs11
            .key_label_prefix
            .clone()
            .unwrap_or_else(|| enroll::DEFAULT_KEY_LABEL_PREFIX.to_owned()),
        pin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<BatchFile, BatchFileError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.toml");
        std::fs::write(&path, text).unwrap();
        BatchFile::load(&path)
    }

    const HEAD: &str = "control_plane = \"http://127.0.0.1:8080\"\ngrpc_addr = \"127.0.0.1:7443\"\norg = \"org-1\"\n";

    #[test]
    fn a_batch_file_resolves_paths_against_its_directory() {
        let file = load(&format!("{HEAD}[[device]]\nname = \"a\"\ndir = \"a\"\nregion = \"eu-west\"\n")).unwrap();
        assert_eq!(file.devices.len(), 1);
        assert!(file.devices[0].dir.is_absolute());
        assert!(matches!(key_plan(file.devices[0].pkcs11.as_ref()), KeyPlan::File));
    }

    #[test]
    fn every_problem_of_a_batch_file_is_named() {
        let text = format!(
            "{HEAD}[[device]]\nname = \"a\"\ndir = \"a\"\nregion = \"EU\"\n\
             [[device]]\nname = \"a\"\ndir = \"a\"\nregion = \"eu\"\n[device.pkcs11]\nmodule = \"m\"\ntoken_label = \"t\"\n"
        );
        let error = load(&text).unwrap_err().to_string();
        for expected in ["device[0] (\"a\"): region", "name used twice", "used twice", "exactly one of pin_env"] {
            assert!(error.contains(expected), "{expected:?} not in {error}");
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        let error = load(&format!("{HEAD}[[device]]\nname = \"a\"\ndir = \"a\"\nregion = \"eu\"\ncolour = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `colour`"), "{error}");
        let error = load("control_plane = 1\n").unwrap_err().to_string();
        assert!(error.contains("invalid type"), "{error}");
    }
}
