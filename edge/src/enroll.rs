//! Enrollment: turns an enrollment token into a ready edge directory. Used by
//! `molt-edge enroll` and by `molt-provision enroll` / `batch`.
//!
//! The model: an enrollment is one transaction over a handful of files (key, chain, trust
//! anchors, trust bundle, config and the provisioning record). It either leaves all of
//! them replaced or all of them as they were.
//!
//! 1. *Decide* from what the directory holds ([`inspect`]). An empty directory is
//!    enrolled. A directory whose provisioning record names the same control plane and
//!    the same token, and whose identity still loads and is within its validity, is
//!    already done: nothing is written and nothing is sent ([`Outcome::AlreadyEnrolled`]),
//!    which makes a re-run safe. Any other identity is refused unless `force` is set.
//! 2. *Preflight*: every directory to write is probed with a small write, so that a
//!    read-only or full disk fails before the single-use token is spent.
//! 3. *Enroll*: generate the key (in memory, or in the PKCS#11 token when one is given),
//!    ask the control plane which org and region the token enrolls into, prove possession
//!    and post to `POST /v1/edges/enroll`. A key made in a token for an enrollment that
//!    then fails is destroyed.
//! 4. *Stage* every file beside its target (`.NAME.enroll-new`, fsynced), then *commit*:
//!    back up each existing target (`.NAME.enroll-old`, a hard link), rename the staged
//!    file over it, fsync the directory. A failure while staging removes the staged
//!    files; a failure while committing puts the backups back. The provisioning record is
//!    written last. New files take the owner of their directory (see
//!    [`owned_like_parent`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use molt_hsm::key::KeyName;
use molt_hsm::{PinSource, SESSION_POOL_SIZE_DEFAULT, Token, TokenConfig, TokenSelector};
use molt_protocol::cert::Certificate;
use molt_protocol::keys::{PublicKey, Signature, SigningKey};
use molt_protocol::request::{EDGE_PROOF_DOMAIN, possession_message};
use molt_protocol::{EdgeId, UnixMillis};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use zeroize::Zeroizing;

use crate::config;
use crate::trust::{Bundle, write_atomically};

/// File names inside the enrollment directory.
pub const KEY_FILE: &str = "edge.key";
pub const CHAIN_FILE: &str = "edge.pem";
pub const ANCHORS_FILE: &str = "trust-anchors.pem";
pub const BUNDLE_FILE: &str = "trust-bundle.json";
pub const CONFIG_FILE: &str = "edge.toml";
/// What was provisioned and with which token (its SHA-256), for idempotent re-runs.
pub const RECORD_FILE: &str = "provisioned.json";
/// Longest wait for one request to the control plane.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest wait to connect to the control plane.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Bytes the preflight probe writes in each target directory: more than the files of an
/// enrollment together (a chain and a bundle are a few KiB).
pub const PREFLIGHT_PROBE_BYTES: usize = 64 * 1024;
/// Default label prefix of a key generated in a PKCS#11 token; a random suffix follows.
pub const DEFAULT_KEY_LABEL_PREFIX: &str = "molt-edge";
/// Longest label prefix (PKCS#11 labels are 32 bytes in many tokens' UIs; keep room).
pub const KEY_LABEL_PREFIX_LEN_MAX: usize = 48;
/// Random bytes of the label suffix, drawn from the token.
const KEY_LABEL_SUFFIX_BYTES: usize = 4;
/// Version of the provisioning record's layout.
const RECORD_VERSION: u32 = 1;

// A generated label (prefix, `-`, hex suffix) fits the token's label limit.
const _: () = assert!(KEY_LABEL_PREFIX_LEN_MAX + 1 + 2 * KEY_LABEL_SUFFIX_BYTES <= molt_hsm::key::KEY_LABEL_LEN_MAX);

/// What an enrollment was asked to do.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// Base URL of the control plane's HTTP API, e.g. `https://cp.example:8080`.
    pub control_plane: String,
    /// The enrollment token.
    pub token: String,
    /// The control plane's gRPC address, written into the config.
    pub grpc_addr: SocketAddr,
    /// Directory of the key, chain, trust anchors, bundle and record.
    pub dir: PathBuf,
    /// Where the config is written; `dir/edge.toml` when `None`.
    pub config: Option<PathBuf>,
    /// Where the edge's key is generated.
    pub key: KeyPlan,
    /// Replace a different identity already in `dir`.
    pub force: bool,
}

/// Where a new edge key is generated.
#[derive(Debug, Clone, Default)]
pub enum KeyPlan {
    /// A PKCS#8 file in the directory, mode 0600.
    #[default]
    File,
    /// A key generated inside a PKCS#11 token; it never leaves the token.
    Pkcs11(Pkcs11Plan),
}

/// The token a key is generated in, and how the edge will log in to it.
#[derive(Debug, Clone)]
pub struct Pkcs11Plan {
    pub module: PathBuf,
    pub token_label: String,
    /// The key's label is this prefix, `-` and 8 random hex digits.
    pub key_label_prefix: String,
    /// Where the PIN comes from, now and (as `pin_env` / `pin_file`) when the edge runs.
    pub pin: PinSource,
}

/// What an enrollment did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new identity was written.
    Enrolled,
    /// The same enrollment was already in place and valid; nothing was sent or written.
    AlreadyEnrolled,
}

/// The enrolled edge.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub outcome: Outcome,
    pub edge_id: EdgeId,
    pub org_id: String,
    pub region: String,
    pub config: PathBuf,
}

/// Why enrollment failed. Whatever the variant, the files the directory held before are
/// as they were.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    #[error(
        "{} already holds a different edge identity{}; pass --force to replace it",
        dir.display(),
        edge_id.as_ref().map(|id| format!(" ({id})")).unwrap_or_default()
    )]
    IdentityExists { dir: PathBuf, edge_id: Option<String> },
    #[error(
        "{} was enrolled with this token but its identity is no longer usable ({detail}); enroll again with a new token and --force",
        dir.display()
    )]
    IdentityDamaged { dir: PathBuf, detail: String },
    #[error("failed to reach the control plane at {url}: {detail}")]
    Http { url: String, detail: String },
    #[error("the control plane refused the enrollment ({status} {code}): {detail}")]
    Refused { status: u16, code: String, detail: String },
    #[error("the control plane's answer is not usable: {0}")]
    Answer(String),
    #[error("cannot write to {} (nothing was sent, the token is unspent): {source}", path.display())]
    NotWritable { path: PathBuf, source: std::io::Error },
    #[error("failed to write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error(
        "enrolled as {edge_id} but failed to write {}: {source}; the previous files are intact and the token is spent",
        path.display()
    )]
    Commit { edge_id: EdgeId, path: PathBuf, source: std::io::Error },
    #[error("pkcs#11 token {token:?}: {detail}")]
    Hsm { token: String, detail: String },
    #[error("invalid enrollment options: {0}")]
    Options(String),
}

/// The provisioning record, `provisioned.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub record_version: u32,
    pub edge_id: String,
    pub org_id: String,
    pub region: String,
    /// The control plane's base URL, without a trailing `/`.
    pub control_plane: String,
    /// Lower-case hex SHA-256 of the enrollment token.
    pub token_sha256: String,
    /// The config written, absolute.
    pub config: PathBuf,
    pub enrolled_at_ms: u64,
}

/// What a directory holds.
#[derive(Debug)]
pub enum Existing {
    /// No identity.
    Empty,
    /// A chain or a record: an identity, maybe without a record (enrolled by hand or by
    /// an older `molt-edge enroll`).
    Identity { record: Option<Record> },
}

#[derive(Debug, Deserialize)]
struct OrgAnswer {
    org_id: String,
    region: String,
}

#[derive(Debug, Deserialize)]
struct EnrolledAnswer {
    edge_id: String,
    chain_pem: String,
    trust_bundle: BundleAnswer,
}

#[derive(Debug, Deserialize)]
struct BundleAnswer {
    sequence: u64,
    roots: Vec<String>,
    org_cas: Vec<String>,
    crls: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Problem {
    code: Option<String>,
    detail: Option<String>,
}

/// Enrolls as the module docs describe.
pub async fn enroll(options: &EnrollOptions) -> Result<Enrolled, EnrollError> {
    let control_plane = options.control_plane.trim_end_matches('/').to_owned();
    let config_path = config_path(options)?;
    if let Existing::Identity { record } = inspect(&options.dir) {
        if !options.force {
            return already_enrolled(options, record, &control_plane).await;
        }
    }
    preflight(&options.dir)?;
    if let Some(config_dir) = config_path.parent().filter(|parent| *parent != options.dir) {
        preflight(config_dir)?;
    }

    let key = NewKey::generate(&options.key).await?;
    let result = enroll_with(options, &control_plane, &config_path, &key).await;
    if result.is_err() {
        key.discard().await;
    }
    result
}

/// What `dir` holds.
pub fn inspect(dir: &Path) -> Existing {
    let record = read_record(dir);
    if record.is_none() && !dir.join(CHAIN_FILE).exists() {
        return Existing::Empty;
    }
    Existing::Identity { record }
}

/// The provisioning record in `dir`, if it has one that parses.
pub fn read_record(dir: &Path) -> Option<Record> {
    let text = std::fs::read_to_string(dir.join(RECORD_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Lower-case hex SHA-256 of a token, as the record keeps it.
pub fn token_sha256(token: &str) -> String {
    hex(&sha2::Sha256::digest(token.as_bytes()))
}

/// The config file's path: as given, or `dir/edge.toml`; absolute.
fn config_path(options: &EnrollOptions) -> Result<PathBuf, EnrollError> {
    let path = options.config.clone().unwrap_or_else(|| options.dir.join(CONFIG_FILE));
    let absolute = std::path::absolute(&path).map_err(|error| EnrollError::Options(error.to_string()))?;
    if absolute.file_name().is_none() {
        return Err(EnrollError::Options(format!("{} names no file", path.display())));
    }
    Ok(absolute)
}

/// The answer when `dir` already holds an identity and `force` is not set.
async fn already_enrolled(
    options: &EnrollOptions,
    record: Option<Record>,
    control_plane: &str,
) -> Result<Enrolled, EnrollError> {
    let same = record
        .as_ref()
        .filter(|record| record.control_plane == control_plane && record.token_sha256 == token_sha256(&options.token));
    match same {
        Some(record) => verify_record(&options.dir, record).await,
        None => {
            Err(EnrollError::IdentityExists { dir: options.dir.clone(), edge_id: record.map(|record| record.edge_id) })
        }
    }
}

/// The enrollment already in `dir` for `control_plane`, whatever token made it, checked as
/// a re-run checks it: `None` when `dir` holds no identity, an error when it holds a
/// different one (another control plane, or none recorded) or a damaged one.
pub async fn existing_enrollment(dir: &Path, control_plane: &str) -> Result<Option<Enrolled>, EnrollError> {
    let control_plane = control_plane.trim_end_matches('/');
    match inspect(dir) {
        Existing::Empty => Ok(None),
        Existing::Identity { record: Some(record) } if record.control_plane == control_plane => {
            verify_record(dir, &record).await.map(Some)
        }
        Existing::Identity { record } => {
            Err(EnrollError::IdentityExists { dir: dir.to_owned(), edge_id: record.map(|record| record.edge_id) })
        }
    }
}

/// Checks that the identity a record describes is still in place and valid.
async fn verify_record(dir: &Path, record: &Record) -> Result<Enrolled, EnrollError> {
    let damaged = |detail: String| EnrollError::IdentityDamaged { dir: dir.to_owned(), detail };
    let config_file = record.config.clone();
    // Opening a PKCS#11 token blocks: a blocking thread, never the executor.
    let edge_id = tokio::task::spawn_blocking(move || check_identity(&config_file))
        .await
        .map_err(|error| damaged(error.to_string()))?
        .map_err(damaged)?;
    if edge_id.to_string() != record.edge_id {
        return Err(damaged(format!("the certificate names {edge_id}, the record {}", record.edge_id)));
    }
    Ok(Enrolled {
        outcome: Outcome::AlreadyEnrolled,
        edge_id,
        org_id: record.org_id.clone(),
        region: record.region.clone(),
        config: record.config.clone(),
    })
}

/// Loads the config and the identity it names (key in its file or token) and checks that
/// the certificate is valid now.
fn check_identity(config_file: &Path) -> Result<EdgeId, String> {
    let config = config::load(config_file).map_err(|error| error.to_string())?;
    let identity = crate::identity::load_identity(&config.identity.certificate_chain, &config.identity.key)
        .map_err(|error| error.to_string())?;
    let leaf = identity.tls.chain.first().ok_or("the chain is empty")?;
    let validity = leaf.validity();
    if !validity.contains(UnixMillis::now_from_system()) {
        return Err(format!("the certificate is not valid now (not after {} ms)", validity.not_after.0));
    }
    Ok(identity.edge_id)
}

/// Probes `dir` (created if absent) with a write of [`PREFLIGHT_PROBE_BYTES`], fsynced.
fn preflight(dir: &Path) -> Result<(), EnrollError> {
    let not_writable = |source| EnrollError::NotWritable { path: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(not_writable)?;
    let probe = dir.join(format!(".enroll-probe-{}", std::process::id()));
    let result = (|| {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&probe)?;
        file.write_all(&[0u8; PREFLIGHT_PROBE_BYTES])?;
        file.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    result.map_err(not_writable)
}

async fn enroll_with(
    options: &EnrollOptions,
    control_plane: &str,
    config_path: &Path,
    key: &NewKey,
) -> Result<Enrolled, EnrollError> {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|error| EnrollError::Http { url: control_plane.to_owned(), detail: error.to_string() })?;
    let org: OrgAnswer =
        post(&client, &format!("{control_plane}/v1/edges/enroll/org"), &serde_json::json!({ "token": options.token }))
            .await?;
    let public_key = key.public_key();
    let now = UnixMillis::now_from_system();
    let signature = key.sign(possession_message(EDGE_PROOF_DOMAIN, &org.org_id, &public_key, now)).await?;
    let body = serde_json::json!({
        "token": options.token,
        "public_key": hex(public_key.as_bytes()),
        "timestamp_ms": now.0,
        "signature": hex(&signature.0),
    });
    let enrolled: EnrolledAnswer = post(&client, &format!("{control_plane}/v1/edges/enroll"), &body).await?;

    let edge_id = EdgeId::from_inception_key(&public_key);
    if enrolled.edge_id != edge_id.to_string() {
        return Err(EnrollError::Answer(format!("the certificate names {}, not {edge_id}", enrolled.edge_id)));
    }
    let chain =
        Certificate::chain_from_pem(&enrolled.chain_pem).map_err(|error| EnrollError::Answer(error.to_string()))?;
    if chain.first().map(Certificate::public_key) != Some(public_key) {
        return Err(EnrollError::Answer("the certificate is not for the key sent".into()));
    }
    let bundle = bundle_of(&enrolled.trust_bundle)?;
    let record = Record {
        record_version: RECORD_VERSION,
        edge_id: edge_id.to_string(),
        org_id: org.org_id.clone(),
        region: org.region.clone(),
        control_plane: control_plane.to_owned(),
        token_sha256: token_sha256(&options.token),
        config: config_path.to_owned(),
        enrolled_at_ms: now.0,
    };
    let files = files_to_write(options, config_path, key, &enrolled.chain_pem, &bundle, &record)?;
    commit_files(&files).map_err(|(path, source)| EnrollError::Commit { edge_id, path, source })?;
    Ok(Enrolled {
        outcome: Outcome::Enrolled,
        edge_id,
        org_id: org.org_id,
        region: org.region,
        config: config_path.to_owned(),
    })
}

/// One file of an enrollment: its target, contents and mode.
#[derive(Debug)]
struct NewFile {
    target: PathBuf,
    /// Zeroized on drop: one of them is the private key.
    bytes: Zeroizing<Vec<u8>>,
    mode: u32,
}

fn files_to_write(
    options: &EnrollOptions,
    config_path: &Path,
    key: &NewKey,
    chain_pem: &str,
    bundle: &Bundle,
    record: &Record,
) -> Result<Vec<NewFile>, EnrollError> {
    let dir = std::path::absolute(&options.dir).map_err(|error| EnrollError::Options(error.to_string()))?;
    let file =
        |name: &str, bytes: Vec<u8>, mode: u32| NewFile { target: dir.join(name), bytes: Zeroizing::new(bytes), mode };
    let mut files = Vec::new();
    if let NewKey::File(signing_key) = key {
        files.push(file(KEY_FILE, signing_key.to_pkcs8_pem().as_bytes().to_vec(), 0o600));
    }
    files.push(file(CHAIN_FILE, chain_pem.as_bytes().to_vec(), 0o644));
    let anchors: String = bundle.roots.iter().map(Certificate::to_pem).collect();
    files.push(file(ANCHORS_FILE, anchors.into_bytes(), 0o644));
    files.push(file(BUNDLE_FILE, bundle.to_cache_json().map_err(|e| EnrollError::Answer(e.to_string()))?, 0o644));
    // Paths in the config are relative to its own directory when it sits in `dir`.
    let base = if config_path.parent() == Some(dir.as_path()) { PathBuf::new() } else { dir.clone() };
    let stub = StubSettings { region: &record.region, grpc_addr: options.grpc_addr, base: &base, key: key.stub_key() };
    files.push(NewFile {
        target: config_path.to_owned(),
        bytes: Zeroizing::new(stub.render().into_bytes()),
        mode: 0o644,
    });
    let record_json = serde_json::to_vec_pretty(record).map_err(|e| EnrollError::Answer(e.to_string()))?;
    files.push(file(RECORD_FILE, record_json, 0o644));
    Ok(files)
}

/// Stages every file, then renames them into place in order (the record last), with
/// backups; see the module docs. The error names the file that failed.
fn commit_files(files: &[NewFile]) -> Result<(), (PathBuf, std::io::Error)> {
    let staged: Vec<PathBuf> = files.iter().map(|file| sibling(&file.target, "enroll-new")).collect();
    let backups: Vec<PathBuf> = files.iter().map(|file| sibling(&file.target, "enroll-old")).collect();
    for (file, staged_path) in files.iter().zip(&staged) {
        let written =
            write_atomically(staged_path, &file.bytes, file.mode).and_then(|()| owned_like_parent(staged_path));
        if let Err(source) = written {
            staged.iter().for_each(|path| drop(std::fs::remove_file(path)));
            return Err((file.target.clone(), source));
        }
    }
    let mut committed = 0;
    let mut failure = None;
    for ((file, staged_path), backup) in files.iter().zip(&staged).zip(&backups) {
        let _ = std::fs::remove_file(backup);
        let step = (|| {
            if file.target.exists() {
                std::fs::hard_link(&file.target, backup)?;
            }
            std::fs::rename(staged_path, &file.target)?;
            sync_parent(&file.target)
        })();
        if let Err(source) = step {
            failure = Some((file.target.clone(), source));
            break;
        }
        committed += 1;
    }
    if let Some(failure) = failure {
        roll_back(&files[..committed], &backups[..committed]);
        staged.iter().for_each(|path| drop(std::fs::remove_file(path)));
        backups.iter().for_each(|path| drop(std::fs::remove_file(path)));
        return Err(failure);
    }
    backups.iter().for_each(|path| drop(std::fs::remove_file(path)));
    Ok(())
}

/// Gives a new file the owner of its directory, so that files written by root into the
/// service user's directory (`/var/lib/molt-edge`) stay readable by the service. A no-op
/// when they already match, which is the case for anyone but root.
fn owned_like_parent(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let directory = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (parent, file) = (std::fs::metadata(directory)?, std::fs::metadata(path)?);
    if (parent.uid(), parent.gid()) == (file.uid(), file.gid()) {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(parent.uid()), Some(parent.gid()))
}

/// Puts back what the first files of a failed commit replaced.
fn roll_back(files: &[NewFile], backups: &[PathBuf]) {
    for (file, backup) in files.iter().zip(backups).rev() {
        let restored =
            if backup.exists() { std::fs::rename(backup, &file.target) } else { std::fs::remove_file(&file.target) };
        if let Err(error) = restored {
            tracing::error!(path = %file.target.display(), %error, "failed to roll back an enrollment file");
        }
        let _ = sync_parent(&file.target);
    }
}

/// `DIR/.NAME.SUFFIX` beside `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{suffix}"))
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    let directory = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(directory)?.sync_all()
}

/// The key of a new enrollment.
enum NewKey {
    File(SigningKey),
    Hsm { key: Box<molt_hsm::HsmKey>, plan: Pkcs11Plan },
}

impl NewKey {
    async fn generate(plan: &KeyPlan) -> Result<NewKey, EnrollError> {
        let plan = match plan {
            KeyPlan::File => return Ok(NewKey::File(SigningKey::generate(&mut rand::rngs::OsRng))),
            KeyPlan::Pkcs11(plan) => plan.clone(),
        };
        if plan.key_label_prefix.is_empty() || plan.key_label_prefix.len() > KEY_LABEL_PREFIX_LEN_MAX {
            return Err(EnrollError::Options(format!(
                "the key label prefix must be 1 to {KEY_LABEL_PREFIX_LEN_MAX} bytes"
            )));
        }
        if matches!(plan.pin, PinSource::Prompt) {
            return Err(EnrollError::Options("the edge reads its PIN from a variable or a file; give one".into()));
        }
        let token_label = plan.token_label.clone();
        let hsm = |detail: String| EnrollError::Hsm { token: token_label.clone(), detail };
        // PKCS#11 calls block: they run on a blocking thread, never on the executor.
        let generated = tokio::task::spawn_blocking(move || {
            let token = Token::open(&TokenConfig {
                module: plan.module.clone(),
                token: TokenSelector::Label(plan.token_label.clone()),
                pin: plan.pin.clone(),
                pool_size: SESSION_POOL_SIZE_DEFAULT,
            })
            .map_err(|error| error.to_string())?;
            let suffix = token.random_bytes(KEY_LABEL_SUFFIX_BYTES).map_err(|error| error.to_string())?;
            let label = format!("{}-{}", plan.key_label_prefix, hex(&suffix));
            if token.find_ed25519(KeyName::Label(&label)).is_ok() {
                return Err(format!("a key labelled {label:?} already exists"));
            }
            let key = token.generate_ed25519(&label).map_err(|error| error.to_string())?;
            Ok(NewKey::Hsm { key: Box::new(key), plan })
        })
        .await
        .map_err(|error| hsm(error.to_string()))?;
        generated.map_err(hsm)
    }

    fn public_key(&self) -> PublicKey {
        match self {
            NewKey::File(key) => key.public_key(),
            NewKey::Hsm { key, .. } => key.public_key(),
        }
    }

    async fn sign(&self, message: Vec<u8>) -> Result<Signature, EnrollError> {
        match self {
            NewKey::File(key) => Ok(key.sign(&message)),
            NewKey::Hsm { key, plan } => {
                let key = key.clone();
                let hsm = |detail: String| EnrollError::Hsm { token: plan.token_label.clone(), detail };
                tokio::task::spawn_blocking(move || key.sign(&message))
                    .await
                    .map_err(|error| hsm(error.to_string()))?
                    .map_err(|error| hsm(error.to_string()))
            }
        }
    }

    /// Destroys a key made in a token for an enrollment that failed.
    async fn discard(self) {
        let NewKey::Hsm { key, plan } = self else { return };
        let label = key.label().to_owned();
        let destroyed = tokio::task::spawn_blocking(move || key.destroy()).await;
        match destroyed {
            Ok(Ok(())) => tracing::info!(%label, token = %plan.token_label, "destroyed the key of a failed enrollment"),
            Ok(Err(error)) => tracing::warn!(%label, %error, "failed to destroy the key of a failed enrollment"),
            Err(error) => tracing::warn!(%label, %error, "failed to destroy the key of a failed enrollment"),
        }
    }

    fn stub_key(&self) -> StubKey<'_> {
        match self {
            NewKey::File(_) => StubKey::File,
            NewKey::Hsm { key, plan } => StubKey::Pkcs11 { plan, key_label: key.label() },
        }
    }
}

fn bundle_of(answer: &BundleAnswer) -> Result<Bundle, EnrollError> {
    let ders = |pems: &[String], label: &str| {
        pems.iter()
            .map(|pem| {
                molt_protocol::cert::pem_decode(label, pem).map_err(|error| EnrollError::Answer(error.to_string()))
            })
            .collect::<Result<Vec<Vec<u8>>, EnrollError>>()
    };
    Bundle::from_der(
        answer.sequence,
        &ders(&answer.roots, "CERTIFICATE")?,
        &ders(&answer.org_cas, "CERTIFICATE")?,
        &ders(&answer.crls, "X509 CRL")?,
    )
    .map_err(|error| EnrollError::Answer(error.to_string()))
}

async fn post<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> Result<T, EnrollError> {
    let http = |error: reqwest::Error| EnrollError::Http { url: url.to_owned(), detail: error_chain(&error) };
    let response = client.post(url).json(body).send().await.map_err(http)?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(http)?;
    if !status.is_success() {
        let problem: Option<Problem> = serde_json::from_slice(&bytes).ok();
        return Err(EnrollError::Refused {
            status: status.as_u16(),
            code: problem.as_ref().and_then(|p| p.code.clone()).unwrap_or_default(),
            detail: problem.and_then(|p| p.detail).unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()),
        });
    }
    serde_json::from_slice(&bytes).map_err(|error| EnrollError::Answer(error.to_string()))
}

/// An error and its sources, `: `-separated (reqwest's own message omits the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How the config stub names the key.
enum StubKey<'a> {
    File,
    Pkcs11 { plan: &'a Pkcs11Plan, key_label: &'a str },
}

/// What the config stub is written from.
struct StubSettings<'a> {
    region: &'a str,
    grpc_addr: SocketAddr,
    /// Prefix of the identity files' paths: empty when the config sits beside them.
    base: &'a Path,
    key: StubKey<'a>,
}

impl StubSettings<'_> {
    fn render(&self) -> String {
        let path = |name: &str| quote(&self.base.join(name).to_string_lossy());
        let mut text = format!(
            "# Written by molt enrollment. Every other key has its default: see\n\
             # `molt-edge config reference`.\n\
             config_version = {current}\n\n\
             [edge]\nregion = {region}\ndata_dir = {data}\n\n\
             [identity]\ncertificate_chain = {chain}\n",
            current = config::CONFIG_VERSION_CURRENT,
            region = quote(self.region),
            data = path(config::DEFAULT_DATA_DIR),
            chain = path(CHAIN_FILE),
        );
        match &self.key {
            StubKey::File => text.push_str(&format!("private_key = {}\n", path(KEY_FILE))),
            StubKey::Pkcs11 { plan, key_label } => {
                let pin = match &plan.pin {
                    PinSource::Env(name) => format!("pin_env = {}", quote(name)),
                    PinSource::File(file) => format!("pin_file = {}", quote(&file.to_string_lossy())),
                    // Refused by `NewKey::generate`.
                    PinSource::Prompt => String::new(),
                };
                text.push_str(&format!(
                    "key_source = \"pkcs11\"\n\n[identity.pkcs11]\nmodule = {}\ntoken_label = {}\nkey_label = {}\n{pin}\n",
                    quote(&plan.module.to_string_lossy()),
                    quote(&plan.token_label),
                    quote(key_label),
                ));
            }
        }
        text.push_str(&format!(
            "\n[trust]\nanchors = {anchors}\n\n\
             [control_plane]\ngrpc_addr = \"{grpc}\"\ntrust_anchor = {anchors}\nbundle_cache = {bundle}\n",
            anchors = path(ANCHORS_FILE),
            grpc = self.grpc_addr,
            bundle = path(BUNDLE_FILE),
        ));
        text
    }
}

/// A TOML basic string.
fn quote(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The config file written beside an identity enrolled with a key file.
pub fn config_stub(region: &str, grpc_addr: SocketAddr) -> String {
    StubSettings { region, grpc_addr, base: Path::new(""), key: StubKey::File }.render()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path) -> EnrollOptions {
        EnrollOptions {
            control_plane: "http://127.0.0.1:1".into(),
            token: "molt_enroll_x".into(),
            grpc_addr: "127.0.0.1:1".parse().unwrap(),
            dir: dir.to_owned(),
            config: None,
            key: KeyPlan::File,
            force: false,
        }
    }

    #[test]
    fn the_config_stub_is_a_valid_config() {
        let stub = config_stub("eu-west", "10.0.0.1:7443".parse().unwrap());
        let config = crate::config::parse(&stub, Path::new("/srv/edge")).expect("the stub parses");
        assert_eq!(config.edge.region.as_str(), "eu-west");
        let link = config.control_plane.expect("a link");
        assert_eq!(link.grpc_addr, "10.0.0.1:7443".parse().unwrap());
        assert_eq!(link.bundle_cache, Path::new("/srv/edge").join(BUNDLE_FILE));
    }

    #[test]
    fn a_pkcs11_stub_with_an_outside_config_is_valid() {
        let plan = Pkcs11Plan {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_label: "edge \"token\"".into(),
            key_label_prefix: "molt-edge".into(),
            pin: PinSource::Env("MOLT_EDGE_PIN".into()),
        };
        let stub = StubSettings {
            region: "eu-west",
            grpc_addr: "10.0.0.1:7443".parse().unwrap(),
            base: Path::new("/var/lib/molt-edge"),
            key: StubKey::Pkcs11 { plan: &plan, key_label: "molt-edge-0a1b2c3d" },
        }
        .render();
        let config = crate::config::parse(&stub, Path::new("/etc/molt-edge")).expect("the stub parses");
        use crate::config::KeySource;
        assert_eq!(config.identity.certificate_chain, Path::new("/var/lib/molt-edge").join(CHAIN_FILE));
        let KeySource::Pkcs11(key) = config.identity.key else { panic!("a pkcs11 key") };
        assert_eq!(key.token_label, "edge \"token\"");
        assert_eq!(key.key_label, "molt-edge-0a1b2c3d");
        assert_eq!(key.pin, PinSource::Env("MOLT_EDGE_PIN".into()));
    }

    #[test]
    fn an_existing_identity_is_not_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CHAIN_FILE), "existing").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let error = runtime.block_on(enroll(&options(dir.path()))).unwrap_err();
        assert!(matches!(error, EnrollError::IdentityExists { .. }), "{error}");
        assert_eq!(std::fs::read_to_string(dir.path().join(CHAIN_FILE)).unwrap(), "existing");
        assert!(!dir.path().join(KEY_FILE).exists());
    }

    #[test]
    fn a_commit_writes_every_file_and_leaves_no_temporary() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b"), "old b").unwrap();
        let files = vec![
            NewFile { target: dir.path().join("a"), bytes: Zeroizing::new(b"new a".to_vec()), mode: 0o600 },
            NewFile { target: dir.path().join("b"), bytes: Zeroizing::new(b"new b".to_vec()), mode: 0o644 },
        ];
        commit_files(&files).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("a")).unwrap(), "new a");
        assert_eq!(std::fs::read_to_string(dir.path().join("b")).unwrap(), "new b");
        assert_eq!(std::fs::metadata(dir.path().join("a")).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_failed_commit_rolls_back_what_it_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "old a").unwrap();
        // The second target is a directory: renaming a file over it fails.
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("b").join("inside"), "x").unwrap();
        let files = vec![
            NewFile { target: dir.path().join("a"), bytes: Zeroizing::new(b"new a".to_vec()), mode: 0o644 },
            NewFile { target: dir.path().join("b"), bytes: Zeroizing::new(b"new b".to_vec()), mode: 0o644 },
            NewFile { target: dir.path().join("c"), bytes: Zeroizing::new(b"new c".to_vec()), mode: 0o644 },
        ];
        let (path, _) = commit_files(&files).unwrap_err();
        assert_eq!(path, dir.path().join("b"));
        assert_eq!(std::fs::read_to_string(dir.path().join("a")).unwrap(), "old a");
        assert!(!dir.path().join("c").exists());
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["a", "b"], "no staged file or backup is left");
    }

    #[test]
    fn the_record_round_trips_and_hashes_the_token() {
        assert_eq!(token_sha256("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(inspect(dir.path()), Existing::Empty));
        let record = Record {
            record_version: RECORD_VERSION,
            edge_id: "edge-x".into(),
            org_id: "org".into(),
            region: "eu".into(),
            control_plane: "http://cp".into(),
            token_sha256: token_sha256("t"),
            config: dir.path().join(CONFIG_FILE),
            enrolled_at_ms: 1,
        };
        std::fs::write(dir.path().join(RECORD_FILE), serde_json::to_vec(&record).unwrap()).unwrap();
        let Existing::Identity { record: Some(read) } = inspect(dir.path()) else { panic!("an identity") };
        assert_eq!(read, record);
    }
}
