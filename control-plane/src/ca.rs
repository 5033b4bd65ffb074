//! The certificate authority: the root of trust, org CAs with keys encrypted at rest,
//! agent and edge certificates issued on proof of possession, revocation, CRLs and the
//! trust bundle.
//!
//! **Keys.** The root signs org CAs; each org CA signs its org's agent and edge
//! certificates and CRLs. The root comes from two files (`ca.root_certificate_file`,
//! `ca.root_key_file`) or, by default, is a development root generated on the first start
//! and stored in the database. Every private key the database holds (the development root
//! and the org CAs) is sealed with ChaCha20-Poly1305 under the *key-encryption key* (KEK),
//! with associated data naming what it is (and the org it belongs to), so a ciphertext
//! moved to another row does not open. Keys are opened in memory only, for one operation,
//! in zeroizing buffers.
//!
//! **Org CA keys in a token.** With `[ca.pkcs11]` configured ([`Pkcs11Options`]), new org
//! CA keys are generated inside that PKCS#11 token instead (sensitive, never extractable),
//! each under a label of its own: the prefix, the org id and a random suffix from the
//! token's generator. The org CA row then records the key's store (`pkcs11`) and label
//! and holds no key bytes. Rows keep saying where their key is, so sealed org CAs made
//! before the token was configured keep working beside token-held ones; a token-held org
//! CA without a configured token fails with [`OrgCaError::HsmNotConfigured`], naming the
//! org and the label. PKCS#11 calls block, so they run on tokio's blocking threads
//! (`spawn_blocking`), never on an executor thread. The root key stays in software here
//! (it comes from files or the development root); offline roots belong to `molt-hsm`'s
//! ceremonies.
//!
//! **The KEK** is 32 bytes: `MOLT_CP_KEK` (64 hex digits), or the file
//! `ca.key_encryption_key_file` (64 hex digits), or — for the embedded SQLite default
//! only — the file `<database file>.kek`, created with mode 0600 on the first start.
//! PostgreSQL deployments must give one explicitly, the same to every replica.
//!
//! **Storage rules.** Every change touching several rows runs in one transaction; races
//! between replicas are settled by the database (`ON CONFLICT DO NOTHING` then re-read,
//! conditional updates). CRL numbers and the bundle sequence only grow.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use molt_hsm::key::KeyName;
use molt_hsm::{FindKeyError, GenerateKeyError, HsmKey, PinSource, Pkcs11Failure, Token, TokenConfig, TokenSelector};
use molt_protocol::cert::{self, Certificate, IssueError, RevocationList, Role, Serial, Validity};
use molt_protocol::ids::{AgentId, EdgeId};
use molt_protocol::keys::{PublicKey, Signature, Signer, SigningKey};
use molt_protocol::time::UnixMillis;
use rand::RngCore as _;
use sqlx::Row as _;
use sqlx::any::AnyRow;
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::db::{Database, QueryError};
use crate::ids::OrgId;

/// Bytes in the key-encryption key.
pub const KEK_LEN: usize = 32;
/// Environment variable holding the KEK as hex.
pub const KEK_VARIABLE: &str = "MOLT_CP_KEK";
/// Suffix of the default KEK file beside the SQLite database.
pub const KEK_FILE_SUFFIX: &str = ".kek";
/// Bytes of the nonce in front of every sealed key.
pub const SEAL_NONCE_LEN: usize = 12;
/// How far a proof of possession's timestamp may be from the control plane's clock.
pub const PROOF_MAX_SKEW: Duration = Duration::from_secs(5 * 60);
/// Lifetime of a generated development root.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Lifetime of an org CA (cut to the root's end).
pub const ORG_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of an agent or edge certificate (cut to the org CA's end).
pub const LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// A certificate is valid from this long before its issuance, for verifiers' clock skew.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// How long a CRL is valid after it is signed (they are signed when fetched).
pub const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Most DNS names on an edge certificate.
pub const DNS_NAMES_MAX: usize = cert::MAX_DNS_NAMES;
/// Common name of the generated development root.
pub const DEVELOPMENT_ROOT_NAME: &str = "Molt development root";
/// Default `ca.pkcs11.key_label_prefix`: token labels of org CA keys start with it.
pub const DEFAULT_KEY_LABEL_PREFIX: &str = "molt-org-ca-";
/// Random bytes (from the token's generator) at the end of an org CA key's label, in hex,
/// so that every generation gets a label of its own.
pub const KEY_LABEL_SUFFIX_BYTES: usize = 4;
/// Longest `ca.pkcs11.key_label_prefix`: the label (prefix, org id, `-`, suffix) must fit
/// the token's label limit.
pub const KEY_LABEL_PREFIX_LEN_MAX: usize = molt_hsm::key::KEY_LABEL_LEN_MAX
    - (OrgId::PREFIX.len() + crate::ids::ID_ENCODED_LEN)
    - 1
    - 2 * KEY_LABEL_SUFFIX_BYTES;

const _: () = assert!(LEAF_VALIDITY.as_secs() < ORG_CA_VALIDITY.as_secs());
const _: () = assert!(ORG_CA_VALIDITY.as_secs() < ROOT_VALIDITY.as_secs());
const _: () = assert!(BACKDATE.as_secs() < CRL_VALIDITY.as_secs());
const _: () = assert!(DEFAULT_KEY_LABEL_PREFIX.len() <= KEY_LABEL_PREFIX_LEN_MAX);

/// Domain of the associated data of the sealed development root key.
const ROOT_KEY_AD: &[u8] = b"molt-control-plane root-key v1";
/// Domain of the associated data of a sealed org CA key; the org id follows.
const ORG_KEY_AD: &[u8] = b"molt-control-plane org-ca-key v1\0";
pub use molt_protocol::request::{AGENT_PROOF_DOMAIN, EDGE_PROOF_DOMAIN};

/// Columns of an [`OrgCa`] row, for `concat!`.
macro_rules! org_ca_columns {
    () => {
        "org_id, certificate_pem, key_store, key_sealed, key_ref, crl_number"
    };
}

// ---- the key-encryption key ----

/// The 32-byte key that seals private keys at rest. Zeroed on drop; `Debug` hides it.
#[derive(Clone)]
pub struct KeyEncryptionKey(Zeroizing<[u8; KEK_LEN]>);

/// The text is not 64 hexadecimal digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a key-encryption key is 64 hexadecimal digits (32 bytes)")]
pub struct InvalidKekError;

/// A sealed key did not open: wrong KEK, wrong row, or damaged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failed to open a sealed key: wrong key-encryption key or damaged ciphertext")]
pub struct OpenError;

/// Why the KEK could not be read or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadKekError {
    #[error("failed to read the key-encryption key file {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("failed to create the key-encryption key file {}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    #[error("the key-encryption key file {} does not hold 64 hexadecimal digits", path.display())]
    Invalid { path: PathBuf },
    #[error(
        "no key-encryption key: set ca.key_encryption_key_file or MOLT_CP_KEK (a generated one is only made for SQLite)"
    )]
    Missing,
}

impl KeyEncryptionKey {
    pub fn from_bytes(bytes: [u8; KEK_LEN]) -> Self {
        KeyEncryptionKey(Zeroizing::new(bytes))
    }

    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        KeyEncryptionKey(bytes)
    }

    /// 64 hex digits; surrounding whitespace is ignored.
    pub fn from_hex(text: &str) -> Result<Self, InvalidKekError> {
        let text = text.trim();
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        if text.len() != KEK_LEN * 2 {
            return Err(InvalidKekError);
        }
        data_encoding::HEXLOWER_PERMISSIVE.decode_mut(text.as_bytes(), bytes.as_mut()).map_err(|_| InvalidKekError)?;
        Ok(KeyEncryptionKey(bytes))
    }

    fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(data_encoding::HEXLOWER.encode(self.0.as_ref()))
    }

    /// Reads the KEK from `path`.
    pub fn read_file(path: &Path) -> Result<Self, LoadKekError> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| LoadKekError::Read { path: path.to_owned(), source })?,
        );
        KeyEncryptionKey::from_hex(&text).map_err(|_| LoadKekError::Invalid { path: path.to_owned() })
    }

    /// Reads the KEK from `path`, first creating the file (mode 0600, a fresh key) if it
    /// does not exist. Processes racing to create it all end up with the one written.
    pub fn read_or_create_file(path: &Path) -> Result<Self, LoadKekError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
        match created {
            Ok(mut file) => {
                let key = KeyEncryptionKey::generate();
                let create = |source| LoadKekError::Create { path: path.to_owned(), source };
                file.write_all(key.to_hex().as_bytes()).map_err(create)?;
                file.write_all(b"\n").map_err(create)?;
                file.sync_all().map_err(create)?;
                tracing::warn!(path = %path.display(), "generated a key-encryption key; back it up with the database");
                Ok(key)
            }
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => KeyEncryptionKey::read_file(path),
            Err(source) => Err(LoadKekError::Create { path: path.to_owned(), source }),
        }
    }

    /// Seals `plaintext`: a random nonce followed by the ciphertext and tag.
    pub fn seal(&self, associated_data: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; SEAL_NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(self.0.as_ref()));
        // Invariant: ChaCha20-Poly1305 encryption fails only for plaintexts over 256 GiB.
        let ciphertext = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: associated_data })
            .expect("a key is far below the AEAD's length limit");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    /// Opens what [`KeyEncryptionKey::seal`] sealed with the same associated data.
    pub fn open(&self, associated_data: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() < SEAL_NONCE_LEN {
            return Err(OpenError);
        }
        let (nonce, ciphertext) = sealed.split_at(SEAL_NONCE_LEN);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(self.0.as_ref()));
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: associated_data })
            .map(Zeroizing::new)
            .map_err(|_| OpenError)
    }

    fn seal_signing_key(&self, associated_data: &[u8], key: &SigningKey) -> Vec<u8> {
        self.seal(associated_data, key.to_bytes().as_ref())
    }

    fn open_signing_key(&self, associated_data: &[u8], sealed: &[u8]) -> Result<SigningKey, OpenError> {
        let secret = self.open(associated_data, sealed)?;
        let secret: Zeroizing<[u8; 32]> = Zeroizing::new(secret.as_slice().try_into().map_err(|_| OpenError)?);
        Ok(SigningKey::from_bytes(&secret))
    }
}

impl fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyEncryptionKey(<redacted>)")
    }
}

impl PartialEq for KeyEncryptionKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}

impl Eq for KeyEncryptionKey {}

fn org_key_ad(org: &OrgId) -> Vec<u8> {
    [ORG_KEY_AD, org.as_str().as_bytes()].concat()
}

// ---- configuration ----

/// Where the CA's secrets come from (the `[ca]` config section and `MOLT_CP_KEK`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaOptions {
    pub key_encryption_key: KekSource,
    pub root: RootSource,
    /// `[ca.pkcs11]`: the token new org CA keys are generated in; `None`: sealed keys.
    pub pkcs11: Option<Pkcs11Options>,
}

/// `[ca.pkcs11]`: the PKCS#11 token that holds org CA keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Options {
    /// Path of the module (shared library).
    pub module: PathBuf,
    pub token: TokenSelector,
    /// A file or an environment variable; never a config value.
    pub pin: PinSource,
    /// Sessions kept open at most (1 to [`molt_hsm::SESSION_POOL_SIZE_MAX`]).
    pub pool_size: usize,
    /// Start of every generated key's label (at most [`KEY_LABEL_PREFIX_LEN_MAX`] bytes).
    pub key_label_prefix: String,
}

impl Pkcs11Options {
    fn token_config(&self) -> TokenConfig {
        TokenConfig {
            module: self.module.clone(),
            token: self.token.clone(),
            pin: self.pin.clone(),
            pool_size: self.pool_size,
        }
    }
}

/// Where the KEK comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KekSource {
    /// `<database file>.kek`, created on first start; SQLite only.
    #[default]
    BesideDatabase,
    /// `ca.key_encryption_key_file`.
    File(PathBuf),
    /// `MOLT_CP_KEK`.
    Value(KeyEncryptionKey),
}

/// Where the root certificate and key come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RootSource {
    /// A development root generated on first start and stored (sealed) in the database.
    #[default]
    Generated,
    /// `ca.root_certificate_file` (PEM) and `ca.root_key_file` (PKCS#8 PEM, unencrypted;
    /// protect it with file permissions).
    Files { certificate: PathBuf, key: PathBuf },
}

impl KekSource {
    /// The KEK; `database_url` locates the default file.
    pub fn load(&self, database_url: &str) -> Result<KeyEncryptionKey, LoadKekError> {
        match self {
            KekSource::Value(key) => Ok(key.clone()),
            KekSource::File(path) => KeyEncryptionKey::read_file(path),
            KekSource::BesideDatabase => {
                let path = sqlite_path(database_url).ok_or(LoadKekError::Missing)?;
                let mut name = path.into_os_string();
                name.push(KEK_FILE_SUFFIX);
                KeyEncryptionKey::read_or_create_file(Path::new(&name))
            }
        }
    }
}

/// The file of a `sqlite:` URL.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split_once('?').map_or(rest, |(path, _)| path);
    (!path.is_empty()).then(|| PathBuf::from(path))
}

// ---- the authority ----

/// The CA: the root's certificate and key, the KEK that opens sealed org CA keys, and
/// the token that holds the others, if one is configured.
pub struct Authority {
    kek: KeyEncryptionKey,
    root: Certificate,
    root_key: SigningKey,
    org_key_token: Option<OrgKeyToken>,
}

/// The token new org CA keys are generated in.
#[derive(Clone, Debug)]
struct OrgKeyToken {
    token: Token,
    key_label_prefix: String,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority").field("root", &self.root).finish_non_exhaustive()
    }
}

/// A storage query failed; `operation` names it.
#[derive(Debug, thiserror::Error)]
#[error("certificate authority storage failed while {operation}")]
pub struct StoreError {
    operation: &'static str,
    #[source]
    source: sqlx::Error,
}

fn store_error(operation: &'static str) -> impl Fn(sqlx::Error) -> StoreError + Copy {
    move |source| StoreError { operation, source }
}

fn corrupt(operation: &'static str, message: String) -> StoreError {
    StoreError { operation, source: sqlx::Error::Decode(message.into()) }
}

/// Why [`Authority::load`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadAuthorityError {
    #[error("failed to load the certificate authority")]
    Kek(#[from] LoadKekError),
    #[error("failed to read the root file {}", path.display())]
    ReadRoot { path: PathBuf, source: std::io::Error },
    #[error("failed to load the root: {0}")]
    InvalidRoot(String),
    #[error("failed to open the stored development root key: is this the key-encryption key it was sealed with?")]
    WrongKek(#[source] OpenError),
    #[error("failed to generate the development root")]
    Issue(#[source] IssueError),
    #[error("failed to open the PKCS#11 token for org CA keys (ca.pkcs11, module {})", module.display())]
    Token { module: PathBuf, source: molt_hsm::OpenError },
    #[error("failed to open the PKCS#11 token for org CA keys: the blocking task failed")]
    TokenTask(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why an org CA could not be created or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrgCaError {
    #[error("no such org")]
    OrgNotFound,
    #[error("failed to issue the org CA certificate")]
    Issue(#[source] IssueError),
    #[error("failed to open the org CA key")]
    Open(#[source] OpenError),
    #[error(
        "the org CA key of {org} is held in a PKCS#11 token under the label {label:?}, but no token is configured \
         (ca.pkcs11)"
    )]
    HsmNotConfigured { org: OrgId, label: String },
    #[error("failed to find the org CA key of {org} (label {label:?}) on the token")]
    HsmKey { org: OrgId, label: String, source: Box<FindKeyError> },
    #[error("the token's key {label:?} does not match the org CA certificate of {org}")]
    HsmKeyMismatch { org: OrgId, label: String },
    #[error("failed to generate the org CA key of {org} on the token")]
    HsmGenerate { org: OrgId, source: Box<GenerateKeyError> },
    #[error("failed to draw the label suffix of the org CA key of {org} from the token")]
    HsmRandom { org: OrgId, source: Box<Pkcs11Failure> },
    #[error("a blocking PKCS#11 task for the org CA of {org} failed")]
    HsmTask { org: OrgId, source: tokio::task::JoinError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Query(#[from] QueryError),
}

/// Why a certificate request was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueCertificateError {
    #[error("failed to issue the certificate: {0}")]
    OrgCa(#[from] OrgCaError),
    #[error("failed to issue the certificate")]
    Issue(#[source] IssueError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a revocation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevokeError {
    #[error("failed to revoke: no certificate has this serial")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a CRL or the trust bundle could not be produced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CrlError {
    #[error("failed to sign the revocation list: no such org")]
    OrgNotFound,
    #[error("failed to sign the revocation list: the org has no CA yet")]
    NoOrgCa,
    #[error("failed to sign the revocation list: {0}")]
    OrgCa(#[from] OrgCaError),
    #[error("failed to sign the revocation list")]
    Issue(#[source] IssueError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Query(#[from] QueryError),
}

/// An org's CA as stored.
#[derive(Clone, Debug)]
pub struct OrgCa {
    pub org_id: OrgId,
    pub certificate: Certificate,
    pub crl_number: u64,
    key: OrgKeyLocation,
}

/// Where an org CA's private key is (`org_cas.key_store`).
#[derive(Clone, Debug)]
enum OrgKeyLocation {
    /// `sealed`: in `key_sealed`, under the KEK.
    Sealed(Vec<u8>),
    /// `pkcs11`: on the configured token, under the label `key_ref`; `key_sealed` is empty.
    Pkcs11 { label: String },
}

/// `org_cas.key_store` of a sealed key.
const KEY_STORE_SEALED: &str = "sealed";
/// `org_cas.key_store` of a key in a PKCS#11 token.
const KEY_STORE_PKCS11: &str = "pkcs11";

impl OrgCa {
    /// The token label of the CA's key, if the key lives in a PKCS#11 token.
    pub fn key_label(&self) -> Option<&str> {
        match &self.key {
            OrgKeyLocation::Sealed(_) => None,
            OrgKeyLocation::Pkcs11 { label } => Some(label),
        }
    }
}

/// What kind of leaf a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafKind {
    Agent,
    Edge,
}

impl LeafKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LeafKind::Agent => "agent",
            LeafKind::Edge => "edge",
        }
    }

    fn proof_domain(self) -> &'static [u8] {
        match self {
            LeafKind::Agent => AGENT_PROOF_DOMAIN,
            LeafKind::Edge => EDGE_PROOF_DOMAIN,
        }
    }
}

/// The message a key signs to prove its holder asks for a certificate:
/// domain (agent or edge) ‖ org id ‖ 0x00 ‖ public key (32 bytes) ‖ timestamp (ms,
/// 8 bytes big-endian).
pub fn proof_message(kind: LeafKind, org: &OrgId, public_key: &PublicKey, timestamp: UnixMillis) -> Vec<u8> {
    molt_protocol::request::possession_message(kind.proof_domain(), org.as_str(), public_key, timestamp)
}

/// Why a proof of possession was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    #[error("the timestamp is more than 5 minutes from the control plane's clock")]
    Stale,
    #[error("the signature does not verify with the public key")]
    BadSignature,
}

/// A checked proof that the requester holds the key; [`Authority::issue`] requires one.
#[derive(Debug, Clone)]
pub struct PossessionProof {
    kind: LeafKind,
    org: OrgId,
    public_key: PublicKey,
    /// An existing agent the key is certified for, instead of the id derived from it
    /// (key rotation and recovery, [`crate::keys`]).
    agent: Option<AgentId>,
}

impl PossessionProof {
    /// Checks `signature` over [`proof_message`] and the timestamp's distance to `now`.
    pub fn verify(
        kind: LeafKind,
        org: &OrgId,
        public_key: &PublicKey,
        timestamp: UnixMillis,
        signature: &Signature,
        now: UnixMillis,
    ) -> Result<PossessionProof, ProofError> {
        let skew = if timestamp > now { timestamp.since(now) } else { now.since(timestamp) };
        if skew > PROOF_MAX_SKEW {
            return Err(ProofError::Stale);
        }
        public_key
            .verify(&proof_message(kind, org, public_key, timestamp), signature)
            .map_err(|_| ProofError::BadSignature)?;
        Ok(PossessionProof { kind, org: org.clone(), public_key: *public_key, agent: None })
    }

    /// The proof, for certifying the key to the existing agent `agent` rather than to the
    /// id derived from the key. Only [`crate::keys`] calls it, after checking that the
    /// agent's current key (rotation) or its guardians and time lock (recovery) allow it.
    pub(crate) fn for_existing_agent(mut self, agent: AgentId) -> PossessionProof {
        self.agent = Some(agent);
        self
    }

    /// A proof for `public_key` whose possession the caller checked another way: a
    /// request signed by that key ([`crate::keys`], completing a recovery).
    pub(crate) fn checked_by_signed_request(org: &OrgId, public_key: &PublicKey, agent: AgentId) -> PossessionProof {
        PossessionProof { kind: LeafKind::Agent, org: org.clone(), public_key: *public_key, agent: Some(agent) }
    }
}

/// How [`Authority::issue_with`] shapes a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafOptions {
    /// From issuance to expiry; at most (and by default) [`LEAF_VALIDITY`].
    pub lifetime: Duration,
    /// An edge's id when it is not the key's inception id (a renewal onto a new key).
    pub edge_id: Option<EdgeId>,
}

impl Default for LeafOptions {
    fn default() -> Self {
        LeafOptions { lifetime: LEAF_VALIDITY, edge_id: None }
    }
}

/// A certificate just issued.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    pub certificate: Certificate,
    pub org_ca: Certificate,
    /// The agent or edge id, in its text form.
    pub subject_id: String,
}

/// A revoked certificate's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub serial: Serial,
    pub org_id: OrgId,
    pub reason: RevocationReason,
    pub revoked_at: UnixMillis,
}

/// Why a certificate was revoked (RFC 5280 reason names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
}

impl RevocationReason {
    pub const ALL: [RevocationReason; 5] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "key_compromise",
            RevocationReason::AffiliationChanged => "affiliation_changed",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessation_of_operation",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        RevocationReason::ALL.into_iter().find(|reason| reason.as_str() == text)
    }
}

/// What agents and edges fetch to verify certificates.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    /// Grows with every change to the roots, org CAs or revocations.
    pub sequence: u64,
    pub roots: Vec<Certificate>,
    pub org_cas: Vec<Certificate>,
    pub crls: Vec<RevocationList>,
}

impl Authority {
    /// Builds the authority from a root certificate and its key.
    pub fn new(
        kek: KeyEncryptionKey,
        root: Certificate,
        root_key: SigningKey,
    ) -> Result<Authority, LoadAuthorityError> {
        if root.role() != Role::Root || !root.is_ca() {
            return Err(LoadAuthorityError::InvalidRoot("the certificate is not a root CA".into()));
        }
        if root.public_key() != root_key.public_key() {
            return Err(LoadAuthorityError::InvalidRoot("the key does not match the root certificate".into()));
        }
        Ok(Authority { kek, root, root_key, org_key_token: None })
    }

    /// The authority with new org CA keys generated in `token`, their labels starting
    /// with `key_label_prefix`.
    pub fn with_org_key_token(mut self, token: Token, key_label_prefix: String) -> Authority {
        self.org_key_token = Some(OrgKeyToken { token, key_label_prefix });
        self
    }

    /// The token holding new org CA keys, if one is configured.
    pub fn org_key_token(&self) -> Option<&Token> {
        self.org_key_token.as_ref().map(|held| &held.token)
    }

    /// Loads the KEK and the root as `options` say; creates the development root on the
    /// first start (one replica wins, the others read its row).
    pub async fn load(
        db: &Database,
        options: &CaOptions,
        database_url: &str,
        now: UnixMillis,
    ) -> Result<Authority, LoadAuthorityError> {
        let kek = options.key_encryption_key.load(database_url)?;
        let authority = Authority::load_root(db, kek, &options.root, now).await?;
        let Some(pkcs11) = &options.pkcs11 else { return Ok(authority) };
        let config = pkcs11.token_config();
        // Opening loads the module and logs in: blocking calls.
        let token = tokio::task::spawn_blocking(move || Token::open(&config))
            .await
            .map_err(LoadAuthorityError::TokenTask)?
            .map_err(|source| LoadAuthorityError::Token { module: pkcs11.module.clone(), source })?;
        tracing::info!(
            token = token.label(),
            serial = token.serial_number(),
            "org CA keys are generated in a PKCS#11 token"
        );
        Ok(authority.with_org_key_token(token, pkcs11.key_label_prefix.clone()))
    }

    async fn load_root(
        db: &Database,
        kek: KeyEncryptionKey,
        root: &RootSource,
        now: UnixMillis,
    ) -> Result<Authority, LoadAuthorityError> {
        match root {
            RootSource::Files { certificate, key } => {
                let read = |path: &PathBuf| {
                    std::fs::read_to_string(path)
                        .map(Zeroizing::new)
                        .map_err(|source| LoadAuthorityError::ReadRoot { path: path.clone(), source })
                };
                let root = Certificate::from_pem(&read(certificate)?)
                    .map_err(|error| LoadAuthorityError::InvalidRoot(format!("root certificate: {error}")))?;
                let root_key = SigningKey::from_pkcs8_pem(&read(key)?)
                    .map_err(|error| LoadAuthorityError::InvalidRoot(format!("root key: {error}")))?;
                Authority::new(kek, root, root_key)
            }
            RootSource::Generated => Authority::load_development_root(db, kek, now).await,
        }
    }

    async fn load_development_root(
        db: &Database,
        kek: KeyEncryptionKey,
        now: UnixMillis,
    ) -> Result<Authority, LoadAuthorityError> {
        if let Some(authority) = Authority::read_development_root(db, &kek).await? {
            return Ok(authority);
        }
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let validity =
            Validity { not_before: now.saturating_sub(BACKDATE), not_after: now.saturating_add(ROOT_VALIDITY) };
        let root = cert::issue_root(&key, DEVELOPMENT_ROOT_NAME, validity, Serial::random(&mut rand::rngs::OsRng))
            .map_err(LoadAuthorityError::Issue)?;
        let mut transaction = db.pool().begin().await.map_err(store_error("starting a transaction"))?;
        let inserted = sqlx::query(
            "INSERT INTO ca_root (id, certificate_pem, key_sealed, created_at_ms) VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(root.to_pem())
        .bind(kek.seal_signing_key(ROOT_KEY_AD, &key))
        .bind(to_db(now))
        .execute(&mut *transaction)
        .await
        .map_err(store_error("storing the development root"))?
        .rows_affected();
        if inserted == 1 {
            bump_sequence(&mut transaction).await?;
            tracing::warn!("generated a development root CA; configure ca.root_certificate_file for production");
        }
        transaction.commit().await.map_err(store_error("storing the development root"))?;
        Authority::read_development_root(db, &kek)
            .await?
            .ok_or_else(|| LoadAuthorityError::InvalidRoot("the stored development root vanished".into()))
    }

    async fn read_development_root(
        db: &Database,
        kek: &KeyEncryptionKey,
    ) -> Result<Option<Authority>, LoadAuthorityError> {
        let row = sqlx::query("SELECT certificate_pem, key_sealed FROM ca_root WHERE id = 1")
            .fetch_optional(db.pool())
            .await
            .map_err(store_error("reading the development root"))?;
        let Some(row) = row else { return Ok(None) };
        let read = store_error("reading the development root");
        let pem: String = row.try_get("certificate_pem").map_err(read)?;
        let sealed: Vec<u8> = row.try_get("key_sealed").map_err(read)?;
        let root = Certificate::from_pem(&pem)
            .map_err(|error| LoadAuthorityError::InvalidRoot(format!("stored development root: {error}")))?;
        let key = kek.open_signing_key(ROOT_KEY_AD, &sealed).map_err(LoadAuthorityError::WrongKek)?;
        Authority::new(kek.clone(), root, key).map(Some)
    }

    pub fn root(&self) -> &Certificate {
        &self.root
    }

    /// The org's CA, created by [`Authority::create_org_ca`] if it has
    /// none; `true` if this call created it.
    pub async fn ensure_org_ca(
        &self,
        db: &Database,
        org: &OrgId,
        now: UnixMillis,
    ) -> Result<(OrgCa, bool), OrgCaError> {
        if let Some(existing) = read_org_ca(db, org).await? {
            return Ok((existing, false));
        }
        self.create_org_ca(db, org, now).await
    }

    /// Creates the org's CA unless it has one: generates the key (in the token if one is
    /// configured), has the root certify it, and stores it unless a concurrent caller (a
    /// replica) stored one first. The caller that loses that race destroys the key it
    /// generated and returns the winner's CA; `true` if this call created it.
    pub async fn create_org_ca(
        &self,
        db: &Database,
        org: &OrgId,
        now: UnixMillis,
    ) -> Result<(OrgCa, bool), OrgCaError> {
        if db.org(org).await?.is_none() {
            return Err(OrgCaError::OrgNotFound);
        }
        let key = self.generate_org_key(org).await?;
        let stored = self.store_org_ca(db, org, &key, now).await;
        if let NewOrgKey::Hsm(generated) = key {
            self.destroy_unless_stored(db, org, generated, &stored).await;
        }
        stored
    }

    /// Destroys a key generated on the token unless the org's stored CA uses it. When
    /// storing failed and the row cannot be read, whether the insert committed is unknown:
    /// the key is kept (a leftover is logged) rather than risk destroying a CA's key.
    async fn destroy_unless_stored(
        &self,
        db: &Database,
        org: &OrgId,
        generated: HsmKey,
        stored: &Result<(OrgCa, bool), OrgCaError>,
    ) {
        let label = generated.label().to_owned();
        let stored_label = match stored {
            Ok((org_ca, _)) => Ok(org_ca.key_label().map(str::to_owned)),
            Err(_) => {
                read_org_ca(db, org).await.map(|row| row.and_then(|org_ca| org_ca.key_label().map(str::to_owned)))
            }
        };
        match stored_label {
            Ok(Some(stored)) if stored == label => return,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(org = %org, label, error = %error, "kept an org CA key on the token: cannot tell whether it was stored");
                return;
            }
        }
        match tokio::task::spawn_blocking(move || generated.destroy()).await {
            Ok(Ok(())) => tracing::info!(org = %org, label, "destroyed an org CA key that was not stored"),
            Ok(Err(failure)) => {
                tracing::warn!(org = %org, label, %failure, "failed to destroy an unused org CA key on the token");
            }
            Err(error) => tracing::warn!(org = %org, label, %error, "failed to destroy an unused org CA key"),
        }
    }

    async fn generate_org_key(&self, org: &OrgId) -> Result<NewOrgKey, OrgCaError> {
        let Some(held) = self.org_key_token.clone() else {
            return Ok(NewOrgKey::Software(SigningKey::generate(&mut rand::rngs::OsRng)));
        };
        let org = org.clone();
        let task_org = org.clone();
        tokio::task::spawn_blocking(move || {
            let suffix = held
                .token
                .random_bytes(KEY_LABEL_SUFFIX_BYTES)
                .map_err(|source| OrgCaError::HsmRandom { org: task_org.clone(), source: Box::new(source) })?;
            let label = format!("{}{}-{}", held.key_label_prefix, task_org, data_encoding::HEXLOWER.encode(&suffix));
            let key = held
                .token
                .generate_ed25519(&label)
                .map_err(|source| OrgCaError::HsmGenerate { org: task_org.clone(), source: Box::new(source) })?;
            Ok(NewOrgKey::Hsm(key))
        })
        .await
        .map_err(|source| OrgCaError::HsmTask { org, source })?
    }

    async fn store_org_ca(
        &self,
        db: &Database,
        org: &OrgId,
        key: &NewOrgKey,
        now: UnixMillis,
    ) -> Result<(OrgCa, bool), OrgCaError> {
        let root_validity = self.root.validity();
        let validity = Validity {
            not_before: now.saturating_sub(BACKDATE).max(root_validity.not_before),
            not_after: now.saturating_add(ORG_CA_VALIDITY).min(root_validity.not_after),
        };
        let serial = Serial::random(&mut rand::rngs::OsRng);
        let common_name = format!("Molt org CA {}", org.as_str().trim_start_matches(OrgId::PREFIX));
        let certificate =
            cert::issue_org_ca(&self.root, &self.root_key, &key.public_key(), &common_name, validity, serial)
                .map_err(OrgCaError::Issue)?;
        let (key_store, key_sealed, key_ref) = match key {
            NewOrgKey::Software(key) => (KEY_STORE_SEALED, self.kek.seal_signing_key(&org_key_ad(org), key), None),
            // No key material: `key_sealed` is empty (the column is NOT NULL, see migration 0010).
            NewOrgKey::Hsm(key) => (KEY_STORE_PKCS11, Vec::new(), Some(key.label().to_owned())),
        };
        let mut transaction = db.pool().begin().await.map_err(store_error("starting a transaction"))?;
        let inserted = sqlx::query(
            "INSERT INTO org_cas (org_id, serial, certificate_pem, key_store, key_sealed, key_ref, crl_number, \
             created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, 1, $7) ON CONFLICT (org_id) DO NOTHING",
        )
        .bind(org.as_str().to_owned())
        .bind(serial.to_string())
        .bind(certificate.to_pem())
        .bind(key_store)
        .bind(key_sealed)
        .bind(key_ref)
        .bind(to_db(now))
        .execute(&mut *transaction)
        .await
        .map_err(store_error("storing an org CA"))?
        .rows_affected();
        if inserted == 1 {
            bump_sequence(&mut transaction).await?;
        }
        transaction.commit().await.map_err(store_error("storing an org CA"))?;
        let stored = read_org_ca(db, org).await?.ok_or_else(|| {
            OrgCaError::Store(corrupt("reading an org CA", "the org CA vanished after its insert".into()))
        })?;
        if inserted == 1 {
            tracing::info!(org = %org, serial = %serial, key_store, "org CA created");
        }
        Ok((stored, inserted == 1))
    }

    /// Runs `sign` with the org CA's key: a sealed key is opened for it on this thread
    /// (an in-memory signature takes microseconds); a token-held key is found and used on
    /// a blocking thread, as PKCS#11 calls block. Either way the key's public half is
    /// checked against the org CA certificate first.
    async fn with_org_key<T: Send + 'static>(
        &self,
        org_ca: &OrgCa,
        sign: impl FnOnce(&dyn Signer) -> T + Send + 'static,
    ) -> Result<T, OrgCaError> {
        let label = match &org_ca.key {
            OrgKeyLocation::Sealed(sealed) => {
                let key = self.kek.open_signing_key(&org_key_ad(&org_ca.org_id), sealed).map_err(OrgCaError::Open)?;
                if key.public_key() != org_ca.certificate.public_key() {
                    return Err(OrgCaError::Open(OpenError));
                }
                return Ok(sign(&key));
            }
            OrgKeyLocation::Pkcs11 { label } => label.clone(),
        };
        let org = org_ca.org_id.clone();
        let Some(held) = &self.org_key_token else {
            return Err(OrgCaError::HsmNotConfigured { org, label });
        };
        let token = held.token.clone();
        let expected = org_ca.certificate.public_key();
        let task_org = org.clone();
        tokio::task::spawn_blocking(move || {
            let key = token.find_ed25519(KeyName::Label(&label)).map_err(|source| OrgCaError::HsmKey {
                org: task_org.clone(),
                label: label.clone(),
                source: Box::new(source),
            })?;
            if key.public_key() != expected {
                return Err(OrgCaError::HsmKeyMismatch { org: task_org, label });
            }
            Ok(sign(&key))
        })
        .await
        .map_err(|source| OrgCaError::HsmTask { org, source })?
    }

    /// Issues an agent or edge certificate for the proven key, creating the org CA if
    /// needed, and records it.
    pub async fn issue(
        &self,
        db: &Database,
        proof: &PossessionProof,
        dns_names: &[String],
        now: UnixMillis,
    ) -> Result<IssuedCertificate, IssueCertificateError> {
        self.issue_with(db, proof, &LeafOptions::default(), dns_names, now).await
    }

    /// [`Authority::issue`] with a chosen lifetime and, for an edge renewing onto a new
    /// key, the edge id it keeps.
    pub async fn issue_with(
        &self,
        db: &Database,
        proof: &PossessionProof,
        options: &LeafOptions,
        dns_names: &[String],
        now: UnixMillis,
    ) -> Result<IssuedCertificate, IssueCertificateError> {
        let (org_ca, _) = self.ensure_org_ca(db, &proof.org, now).await?;
        let (role, subject_id) = match (proof.kind, options.edge_id) {
            (LeafKind::Agent, _) => {
                let id = proof.agent.unwrap_or_else(|| AgentId::from_inception_key(&proof.public_key));
                (Role::Agent(id), id.to_string())
            }
            (LeafKind::Edge, kept) => {
                let id = kept.unwrap_or_else(|| EdgeId::from_inception_key(&proof.public_key));
                (Role::Edge(id), id.to_string())
            }
        };
        let lifetime = options.lifetime.min(LEAF_VALIDITY);
        let ca_validity = org_ca.certificate.validity();
        let validity = Validity {
            not_before: now.saturating_sub(BACKDATE).max(ca_validity.not_before),
            not_after: now.saturating_add(lifetime).min(ca_validity.not_after),
        };
        let serial = Serial::random(&mut rand::rngs::OsRng);
        let (ca_certificate, public_key, dns_names) =
            (org_ca.certificate.clone(), proof.public_key, dns_names.to_vec());
        let certificate = self
            .with_org_key(&org_ca, move |key| {
                cert::issue_leaf(&ca_certificate, key, &public_key, role, &dns_names, validity, serial)
            })
            .await?
            .map_err(IssueCertificateError::Issue)?;
        sqlx::query(
            "INSERT INTO certificates (serial, org_id, kind, subject_id, public_key, certificate_pem, not_after_ms, \
             created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(serial.to_string())
        .bind(proof.org.as_str().to_owned())
        .bind(proof.kind.as_str())
        .bind(subject_id.clone())
        .bind(proof.public_key.as_bytes().to_vec())
        .bind(certificate.to_pem())
        .bind(to_db(validity.not_after))
        .bind(to_db(now))
        .execute(db.pool())
        .await
        .map_err(store_error("recording a certificate"))?;
        tracing::info!(org = %proof.org, kind = proof.kind.as_str(), subject = %subject_id, serial = %serial, "certificate issued");
        Ok(IssuedCertificate { certificate, org_ca: org_ca.certificate, subject_id })
    }

    /// Signs the org's current CRL: every serial it revoked, numbered by the stored
    /// `crl_number`, valid for [`CRL_VALIDITY`].
    pub async fn crl(&self, db: &Database, org: &OrgId, now: UnixMillis) -> Result<RevocationList, CrlError> {
        let Some(org_ca) = read_org_ca(db, org).await? else {
            return if db.org(org).await?.is_none() { Err(CrlError::OrgNotFound) } else { Err(CrlError::NoOrgCa) };
        };
        self.sign_crl(db, &org_ca, now).await
    }

    async fn sign_crl(&self, db: &Database, org_ca: &OrgCa, now: UnixMillis) -> Result<RevocationList, CrlError> {
        let rows = sqlx::query(
            "SELECT serial FROM certificates WHERE org_id = $1 AND revoked_at_ms IS NOT NULL ORDER BY serial",
        )
        .bind(org_ca.org_id.as_str().to_owned())
        .fetch_all(db.pool())
        .await
        .map_err(store_error("listing revoked certificates"))?;
        let serials = rows
            .iter()
            .map(|row| {
                let text: String = row.try_get("serial").map_err(store_error("reading a revoked serial"))?;
                text.parse::<Serial>()
                    .map_err(|error| corrupt("reading a revoked serial", format!("certificates.serial: {error}")))
            })
            .collect::<Result<Vec<Serial>, StoreError>>()?;
        let (ca_certificate, crl_number) = (org_ca.certificate.clone(), org_ca.crl_number);
        let (this_update, next_update) = (now.saturating_sub(BACKDATE), now.saturating_add(CRL_VALIDITY));
        self.with_org_key(org_ca, move |key| {
            RevocationList::issue(&ca_certificate, key, crl_number, this_update, next_update, &serials)
        })
        .await?
        .map_err(CrlError::Issue)
    }

    /// The trust bundle: the root, every org CA, and each org CA's signed CRL.
    ///
    /// The sequence is read in the same transaction as the org CAs, so a bundle never
    /// shows a sequence newer than its content.
    pub async fn trust_bundle(&self, db: &Database, now: UnixMillis) -> Result<TrustBundle, CrlError> {
        let mut transaction = db.pool().begin().await.map_err(store_error("starting a transaction"))?;
        let sequence: i64 = sqlx::query("SELECT bundle_sequence FROM ca_state WHERE id = 1")
            .fetch_one(&mut *transaction)
            .await
            .and_then(|row| row.try_get("bundle_sequence"))
            .map_err(store_error("reading the bundle sequence"))?;
        let rows = sqlx::query(concat!("SELECT ", org_ca_columns!(), " FROM org_cas ORDER BY org_id"))
            .fetch_all(&mut *transaction)
            .await
            .map_err(store_error("listing org CAs"))?;
        transaction.commit().await.map_err(store_error("reading the trust bundle"))?;
        let org_cas = rows.iter().map(org_ca_from_row).collect::<Result<Vec<OrgCa>, StoreError>>()?;
        let mut crls = Vec::with_capacity(org_cas.len());
        for org_ca in &org_cas {
            crls.push(self.sign_crl(db, org_ca, now).await?);
        }
        Ok(TrustBundle {
            sequence: u64::try_from(sequence).unwrap_or(0),
            roots: vec![self.root.clone()],
            org_cas: org_cas.into_iter().map(|org_ca| org_ca.certificate).collect(),
            crls,
        })
    }
}

/// Revokes the certificate `serial` at `now`. Revoking it again changes nothing and
/// returns the first revocation. The first revocation bumps the org's CRL number and the
/// bundle sequence in the same transaction.
pub async fn revoke(
    db: &Database,
    serial: Serial,
    reason: RevocationReason,
    now: UnixMillis,
) -> Result<Revocation, RevokeError> {
    let serial_text = serial.to_string();
    let mut transaction = db.pool().begin().await.map_err(store_error("starting a transaction"))?;
    let changed = sqlx::query(
        "UPDATE certificates SET revoked_at_ms = $1, revocation_reason = $2 WHERE serial = $3 AND revoked_at_ms IS NULL",
    )
    .bind(to_db(now))
    .bind(reason.as_str())
    .bind(serial_text.clone())
    .execute(&mut *transaction)
    .await
    .map_err(store_error("revoking a certificate"))?
    .rows_affected();
    if changed == 1 {
        sqlx::query(
            "UPDATE org_cas SET crl_number = crl_number + 1 \
             WHERE org_id = (SELECT org_id FROM certificates WHERE serial = $1)",
        )
        .bind(serial_text.clone())
        .execute(&mut *transaction)
        .await
        .map_err(store_error("advancing the CRL number"))?;
        bump_sequence(&mut transaction).await?;
    }
    let row = sqlx::query("SELECT org_id, revoked_at_ms, revocation_reason FROM certificates WHERE serial = $1")
        .bind(serial_text)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(store_error("reading a revoked certificate"))?;
    let Some(row) = row else { return Err(RevokeError::NotFound) };
    transaction.commit().await.map_err(store_error("revoking a certificate"))?;
    let read = store_error("reading a revoked certificate");
    let org_id: String = row.try_get("org_id").map_err(read)?;
    let revoked_at: Option<i64> = row.try_get("revoked_at_ms").map_err(read)?;
    let stored_reason: Option<String> = row.try_get("revocation_reason").map_err(read)?;
    let bad = |what: &str| corrupt("reading a revoked certificate", format!("certificates.{what}"));
    let revocation = Revocation {
        serial,
        org_id: org_id.parse().map_err(|_| bad("org_id"))?,
        reason: stored_reason.as_deref().and_then(RevocationReason::parse).ok_or_else(|| bad("revocation_reason"))?,
        revoked_at: from_db(revoked_at.ok_or_else(|| bad("revoked_at_ms"))?),
    };
    if changed == 1 {
        tracing::info!(serial = %serial, org = %revocation.org_id, reason = reason.as_str(), "certificate revoked");
    }
    Ok(revocation)
}

async fn read_org_ca(db: &Database, org: &OrgId) -> Result<Option<OrgCa>, StoreError> {
    let row = sqlx::query(concat!("SELECT ", org_ca_columns!(), " FROM org_cas WHERE org_id = $1"))
        .bind(org.as_str().to_owned())
        .fetch_optional(db.pool())
        .await
        .map_err(store_error("reading an org CA"))?;
    row.as_ref().map(org_ca_from_row).transpose()
}

fn org_ca_from_row(row: &AnyRow) -> Result<OrgCa, StoreError> {
    let read = store_error("reading an org CA");
    let org_id: String = row.try_get("org_id").map_err(read)?;
    let pem: String = row.try_get("certificate_pem").map_err(read)?;
    let key_store: String = row.try_get("key_store").map_err(read)?;
    let key_sealed: Vec<u8> = row.try_get("key_sealed").map_err(read)?;
    let key_ref: Option<String> = row.try_get("key_ref").map_err(read)?;
    let crl_number: i64 = row.try_get("crl_number").map_err(read)?;
    let key = match (key_store.as_str(), key_sealed, key_ref) {
        (KEY_STORE_SEALED, sealed, None) if !sealed.is_empty() => OrgKeyLocation::Sealed(sealed),
        (KEY_STORE_PKCS11, sealed, Some(label)) if sealed.is_empty() => OrgKeyLocation::Pkcs11 { label },
        _ => {
            let message = format!("org_cas.key_store {key_store:?} does not match key_sealed and key_ref");
            return Err(corrupt("reading an org CA", message));
        }
    };
    Ok(OrgCa {
        org_id: org_id.parse().map_err(|error| corrupt("reading an org CA", format!("org_cas.org_id: {error}")))?,
        certificate: Certificate::from_pem(&pem)
            .map_err(|error| corrupt("reading an org CA", format!("org_cas.certificate_pem: {error}")))?,
        crl_number: u64::try_from(crl_number)
            .map_err(|_| corrupt("reading an org CA", "org_cas.crl_number is negative".into()))?,
        key,
    })
}

/// A just generated org CA key, not yet stored.
enum NewOrgKey {
    Software(SigningKey),
    Hsm(HsmKey),
}

impl NewOrgKey {
    fn public_key(&self) -> PublicKey {
        match self {
            NewOrgKey::Software(key) => key.public_key(),
            NewOrgKey::Hsm(key) => key.public_key(),
        }
    }
}

async fn bump_sequence(transaction: &mut sqlx::Transaction<'static, sqlx::Any>) -> Result<(), StoreError> {
    sqlx::query("UPDATE ca_state SET bundle_sequence = bundle_sequence + 1 WHERE id = 1")
        .execute(&mut **transaction)
        .await
        .map_err(store_error("advancing the bundle sequence"))?;
    Ok(())
}

/// Times are stored as signed 64-bit milliseconds.
fn to_db(time: UnixMillis) -> i64 {
    i64::try_from(time.0).unwrap_or(i64::MAX)
}

fn from_db(millis: i64) -> UnixMillis {
    UnixMillis(u64::try_from(millis).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_with_their_key_and_associated_data() {
        let kek = KeyEncryptionKey::generate();
        let sealed = kek.seal(b"org_a", b"secret");
        assert_eq!(kek.open(b"org_a", &sealed).unwrap().as_slice(), b"secret");
        assert_eq!(kek.open(b"org_b", &sealed), Err(OpenError), "bound to the org");
        assert_eq!(KeyEncryptionKey::generate().open(b"org_a", &sealed), Err(OpenError));
        let mut damaged = sealed.clone();
        damaged[SEAL_NONCE_LEN] ^= 1;
        assert_eq!(kek.open(b"org_a", &damaged), Err(OpenError));
        assert_eq!(kek.open(b"org_a", &sealed[..4]), Err(OpenError));
    }

    #[test]
    fn kek_hex_round_trips_and_malformed_text_is_refused() {
        let kek = KeyEncryptionKey::generate();
        assert_eq!(KeyEncryptionKey::from_hex(&format!(" {}\n", kek.to_hex().as_str())), Ok(kek.clone()));
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(66)] {
            assert_eq!(KeyEncryptionKey::from_hex(bad), Err(InvalidKekError), "{bad:?}");
        }
        assert!(!format!("{kek:?}").contains(kek.to_hex().as_str()));
    }

    #[test]
    fn the_default_kek_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}?mode=rwc", dir.path().join("cp.db").display());
        let first = KekSource::BesideDatabase.load(&url).unwrap();
        let path = dir.path().join("cp.db.kek");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(KekSource::BesideDatabase.load(&url).unwrap(), first);
        assert!(matches!(KekSource::BesideDatabase.load("postgres://u@h/db"), Err(LoadKekError::Missing)));
    }

    #[test]
    fn proofs_check_the_signature_and_the_clock() {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let org = OrgId::generate();
        let now = UnixMillis(1_700_000_000_000);
        let sign = |kind, at| key.sign(&proof_message(kind, &org, &key.public_key(), at));
        let good = sign(LeafKind::Agent, now);
        assert!(PossessionProof::verify(LeafKind::Agent, &org, &key.public_key(), now, &good, now).is_ok());
        let edge = PossessionProof::verify(LeafKind::Edge, &org, &key.public_key(), now, &good, now);
        assert_eq!(edge.unwrap_err(), ProofError::BadSignature, "an agent proof is not an edge proof");
        let other_org =
            PossessionProof::verify(LeafKind::Agent, &OrgId::generate(), &key.public_key(), now, &good, now);
        assert_eq!(other_org.unwrap_err(), ProofError::BadSignature);
        let late = now.saturating_add(PROOF_MAX_SKEW + Duration::from_millis(1));
        let stale = PossessionProof::verify(LeafKind::Agent, &org, &key.public_key(), now, &good, late);
        assert_eq!(stale.unwrap_err(), ProofError::Stale);
        let future = sign(LeafKind::Agent, late);
        let early = PossessionProof::verify(LeafKind::Agent, &org, &key.public_key(), late, &future, now);
        assert_eq!(early.unwrap_err(), ProofError::Stale);
    }
}
