//! A development PKI and agent files on disk, for the `molt` CLI and end-to-end tests.
//!
//! The model: a [`DevCa`] directory holds a root CA and one org CA (keys and certificates
//! as PEM files) and the org CA's revocation list. An agent directory is made in two steps:
//! [`AgentFiles::generate`] writes the agent's keys and records its id, then
//! [`DevCa::issue_agent`] certifies the agent's *current* key and writes its certificate
//! chain and its [`AgentCard`], the JSON document peers load to encrypt to it and verify
//! its messages. [`DevCa::issue_edge`] writes everything an edge relay needs.
//!
//! ```text
//! CA_DIR/     root.key root.pem org.key org.pem revoked.crl
//! AGENT_DIR/  agent.key encryption.key agent.id agent.pem card.json
//! EDGE_DIR/   edge.key edge.pem root.pem org.pem revoked.crl
//! ```
//!
//! Private keys are created with mode 0600 and never overwritten. Files that are meant to
//! change (certificates, cards, the CRL) are replaced atomically: written to a temporary
//! file, synced, then renamed over the old one.
//!
//! This is for development and tests only: the root key sits on disk next to the org key.
//! Nothing here reads the clock; callers pass `now`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use molt_protocol::cert::{
    CertError, Certificate, IssueError, RevocationList, Revocations, Role, Serial, TrustAnchors, Validity, issue_leaf,
    issue_org_ca, issue_root,
};
use molt_protocol::ids::IdParseError;
use molt_protocol::keys::{EncryptionSecret, KeyBinding, KeyError, PublicKey, SigningKey};
use molt_protocol::{AgentId, EdgeId, UnixMillis};
use rand::rngs::OsRng;
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::identity::{AgentIdentity, IdentityError, PeerKeys};

/// Root CA private key (PKCS#8 PEM, mode 0600) in a CA directory.
pub const ROOT_KEY_FILE: &str = "root.key";
/// Root CA certificate: the trust anchor agents and edges are given.
pub const ROOT_CERT_FILE: &str = "root.pem";
/// Org CA private key (PKCS#8 PEM, mode 0600); signs leaves and the CRL.
pub const ORG_KEY_FILE: &str = "org.key";
/// Org CA certificate.
pub const ORG_CERT_FILE: &str = "org.pem";
/// The org CA's revocation list (PEM X.509 CRL).
pub const CRL_FILE: &str = "revoked.crl";
/// An agent's Ed25519 private key (PKCS#8 PEM, mode 0600).
pub const AGENT_KEY_FILE: &str = "agent.key";
/// An agent's X25519 private key: 64 hexadecimal digits and a newline, mode 0600.
pub const ENCRYPTION_KEY_FILE: &str = "encryption.key";
/// An agent's id (text form and a newline), fixed by its inception key.
pub const AGENT_ID_FILE: &str = "agent.id";
/// An agent's certificate chain: its leaf, then the org CA (PEM).
pub const AGENT_CHAIN_FILE: &str = "agent.pem";
/// An agent's card (JSON), for its peers.
pub const CARD_FILE: &str = "card.json";
/// A key staged for a rotation or recovery (PKCS#8 PEM, mode 0600), until the control
/// plane certifies it; an interrupted rotation resumes with it.
pub const NEXT_AGENT_KEY_FILE: &str = "agent.key.next";
/// The certificate chain of the staged key, written before the keys are swapped.
pub const NEXT_AGENT_CHAIN_FILE: &str = "agent.pem.next";
/// The key the last rotation replaced (mode 0600): it still signs during the overlap.
pub const PREVIOUS_AGENT_KEY_FILE: &str = "agent.key.previous";
/// An edge's Ed25519 private key (PKCS#8 PEM, mode 0600).
pub const EDGE_KEY_FILE: &str = "edge.key";
/// An edge's certificate chain: its leaf, then the org CA (PEM).
pub const EDGE_CHAIN_FILE: &str = "edge.pem";

const DAY: Duration = Duration::from_secs(24 * 3600);
/// How long the development root CA is valid.
pub const ROOT_VALIDITY: Duration = DAY.saturating_mul(10 * 365);
/// How long the development org CA is valid.
pub const ORG_CA_VALIDITY: Duration = DAY.saturating_mul(5 * 365);
/// How long agent and edge certificates are valid (cut short by the org CA's expiry).
pub const LEAF_VALIDITY: Duration = DAY.saturating_mul(365);
/// Every CRL announces its successor this far after it is issued.
pub const CRL_UPDATE_INTERVAL: Duration = DAY.saturating_mul(7);
/// Certificates are valid from this long before `now`, so that a peer whose clock is a
/// little behind accepts them at once.
pub const NOT_BEFORE_BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Largest agent card file read: a card holds two certificates and a key binding.
pub const MAX_CARD_BYTES: u64 = 64 * 1024;

const ROOT_COMMON_NAME: &str = "Molt Development Root CA";
const ORG_COMMON_NAME: &str = "Molt Development Org CA";
const FIRST_CRL_NUMBER: u64 = 1;
const PRIVATE_FILE_MODE: u32 = 0o600;
const PUBLIC_FILE_MODE: u32 = 0o644;
/// Hexadecimal digits of an encryption key file, before its newline.
const ENCRYPTION_KEY_HEX_LEN: usize = 64;

const _: () = assert!(LEAF_VALIDITY.as_secs() < ORG_CA_VALIDITY.as_secs());
const _: () = assert!(ORG_CA_VALIDITY.as_secs() < ROOT_VALIDITY.as_secs());
const _: () = assert!(NOT_BEFORE_BACKDATE.as_secs() < CRL_UPDATE_INTERVAL.as_secs());
const _: () = assert!(ENCRYPTION_KEY_HEX_LEN == 2 * 32);

/// Why a development CA, agent or edge file operation failed.
///
/// Messages include the underlying cause, so printing this error alone says everything.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    #[error("{} already exists; refusing to overwrite it", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("reading {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("writing {}: {error}", path.display())]
    Write { path: PathBuf, error: io::Error },
    #[error("no agent keys in {}: generate them first", dir.display())]
    NoAgentKeys { dir: PathBuf },
    #[error("no certificate at {}: have the CA issue one first", path.display())]
    NotIssued { path: PathBuf },
    #[error("reading {}: {error}", path.display())]
    Certificate { path: PathBuf, error: CertError },
    #[error("reading private key {}: {error}", path.display())]
    PrivateKey { path: PathBuf, error: KeyError },
    #[error("reading {}: expected {ENCRYPTION_KEY_HEX_LEN} hexadecimal digits (an X25519 private key)", path.display())]
    EncryptionKey { path: PathBuf },
    #[error("reading {}: {error}", path.display())]
    AgentIdFile { path: PathBuf, error: IdParseError },
    #[error("{} holds a key that does not match certificate {}", key.display(), certificate.display())]
    KeyMismatch { key: PathBuf, certificate: PathBuf },
    #[error("{} is for {certificate}, but {AGENT_ID_FILE} says {recorded}", path.display())]
    AgentIdMismatch { path: PathBuf, recorded: AgentId, certificate: AgentId },
    #[error("loading the agent in {}: {error}", dir.display())]
    Identity { dir: PathBuf, error: IdentityError },
    #[error("issuing {what}: {error}")]
    Issue { what: &'static str, error: IssueError },
    #[error("the org CA is not valid now (valid from {} to {} seconds after the epoch); create a new CA", validity.not_before.as_secs(), validity.not_after.as_secs())]
    OrgCaNotValid { validity: Validity },
    #[error("revoking: the crl number cannot grow past {0}")]
    CrlNumberExhausted(u64),
    #[error("reading agent card {}: {error}", path.display())]
    CardJson { path: PathBuf, error: serde_json::Error },
    #[error("reading agent card {}: larger than {MAX_CARD_BYTES} bytes", path.display())]
    CardTooLarge { path: PathBuf },
    #[error("agent card: certificate chain: {0}")]
    CardChain(CertError),
    #[error("agent card: key binding is not hexadecimal")]
    CardBindingHex,
    #[error("agent card: key binding: {0}")]
    CardBinding(KeyError),
    #[error("agent card does not verify: {0}")]
    CardVerify(IdentityError),
    #[error("agent card says {claimed}, but its certificate is for {certificate}")]
    CardAgentMismatch { claimed: AgentId, certificate: AgentId },
}

/// A development CA directory: a root CA, an org CA that signs leaves, and its CRL.
#[derive(Debug)]
pub struct DevCa {
    dir: PathBuf,
    anchors: TrustAnchors,
    root: Certificate,
    org: Certificate,
    org_key: SigningKey,
}

impl DevCa {
    /// Creates `dir` (if needed) and a fresh root CA ([`ROOT_VALIDITY`]), org CA
    /// ([`ORG_CA_VALIDITY`]) and empty CRL (number 1). Refuses a directory that already
    /// holds a CA.
    pub fn init(dir: &Path, now: UnixMillis) -> Result<DevCa, DevError> {
        fs::create_dir_all(dir).map_err(|error| DevError::Write { path: dir.to_owned(), error })?;
        for name in [ROOT_CERT_FILE, ROOT_KEY_FILE, ORG_KEY_FILE, ORG_CERT_FILE, CRL_FILE] {
            refuse_existing(&dir.join(name))?;
        }
        let mut rng = OsRng;
        let root_key = SigningKey::generate(&mut rng);
        let org_key = SigningKey::generate(&mut rng);
        let not_before = now.saturating_sub(NOT_BEFORE_BACKDATE);
        let root_validity = Validity { not_before, not_after: now.saturating_add(ROOT_VALIDITY) };
        let root = issue_root(&root_key, ROOT_COMMON_NAME, root_validity, Serial::random(&mut rng))
            .map_err(|error| DevError::Issue { what: "the root CA certificate", error })?;
        let org_validity = Validity { not_before, not_after: now.saturating_add(ORG_CA_VALIDITY) };
        let org = issue_org_ca(
            &root,
            &root_key,
            &org_key.public_key(),
            ORG_COMMON_NAME,
            org_validity,
            Serial::random(&mut rng),
        )
        .map_err(|error| DevError::Issue { what: "the org CA certificate", error })?;
        let crl = RevocationList::issue(&org, &org_key, FIRST_CRL_NUMBER, now, crl_next_update(now), &[])
            .map_err(|error| DevError::Issue { what: "the first revocation list", error })?;
        let anchors = TrustAnchors::new(vec![root.clone()])
            .map_err(|error| DevError::Certificate { path: dir.join(ROOT_CERT_FILE), error })?;

        write_new_file(&dir.join(ROOT_KEY_FILE), root_key.to_pkcs8_pem().as_bytes(), PRIVATE_FILE_MODE)?;
        write_new_file(&dir.join(ORG_KEY_FILE), org_key.to_pkcs8_pem().as_bytes(), PRIVATE_FILE_MODE)?;
        write_new_file(&dir.join(ORG_CERT_FILE), org.to_pem().as_bytes(), PUBLIC_FILE_MODE)?;
        write_new_file(&dir.join(CRL_FILE), crl.to_pem().as_bytes(), PUBLIC_FILE_MODE)?;
        // Written last: its presence marks a complete CA directory.
        write_new_file(&dir.join(ROOT_CERT_FILE), root.to_pem().as_bytes(), PUBLIC_FILE_MODE)?;
        Ok(DevCa { dir: dir.to_owned(), anchors, root, org, org_key })
    }

    /// Opens a CA directory made by [`DevCa::init`]; checks the root is a valid trust
    /// anchor and the org key matches the org certificate.
    pub fn load(dir: &Path) -> Result<DevCa, DevError> {
        let root_path = dir.join(ROOT_CERT_FILE);
        let root = read_certificate(&root_path)?;
        let anchors =
            TrustAnchors::new(vec![root.clone()]).map_err(|error| DevError::Certificate { path: root_path, error })?;
        let org_path = dir.join(ORG_CERT_FILE);
        let org = read_certificate(&org_path)?;
        let org_key_path = dir.join(ORG_KEY_FILE);
        let org_key = read_signing_key(&org_key_path)?;
        if org_key.public_key() != org.public_key() {
            return Err(DevError::KeyMismatch { key: org_key_path, certificate: org_path });
        }
        Ok(DevCa { dir: dir.to_owned(), anchors, root, org, org_key })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn root(&self) -> &Certificate {
        &self.root
    }

    pub fn org(&self) -> &Certificate {
        &self.org
    }

    /// The root as the only trust anchor.
    pub fn anchors(&self) -> &TrustAnchors {
        &self.anchors
    }

    /// The current CRL, read from disk and verified against the org CA.
    pub fn revocation_list(&self) -> Result<RevocationList, DevError> {
        read_revocation_list(&self.dir.join(CRL_FILE), &self.org)
    }

    /// The serials on the current CRL.
    pub fn revocations(&self) -> Result<Revocations, DevError> {
        let mut revocations = Revocations::default();
        revocations.extend_from(&self.revocation_list()?);
        Ok(revocations)
    }

    /// Certifies the current key of the agent in `agent_dir` (made by
    /// [`AgentFiles::generate`]) for [`LEAF_VALIDITY`], then writes `agent.pem` (leaf and
    /// org CA) and `card.json`, replacing earlier ones.
    pub fn issue_agent(&self, agent_dir: &Path, now: UnixMillis) -> Result<AgentFiles, DevError> {
        let agent_id = read_agent_id(agent_dir)?;
        let signing_key = read_agent_signing_key(agent_dir)?;
        let encryption_secret = read_encryption_secret(&agent_dir.join(ENCRYPTION_KEY_FILE))?;
        let leaf =
            self.issue_leaf(&signing_key.public_key(), Role::Agent(agent_id), &[], now, "the agent certificate")?;
        let chain = vec![leaf.clone(), self.org.clone()];
        let identity = AgentIdentity::new(chain, signing_key, encryption_secret)
            .map_err(|error| DevError::Identity { dir: agent_dir.to_owned(), error })?;
        write_replacing(&agent_dir.join(AGENT_CHAIN_FILE), chain_pem(&identity.chain).as_bytes())?;
        AgentCard::from_identity(&identity, now).save(&agent_dir.join(CARD_FILE))?;
        Ok(AgentFiles { dir: agent_dir.to_owned(), agent_id, leaf: Some(leaf) })
    }

    /// Generates an edge key and certifies it for `dns_names`, writing `edge.key` (refused
    /// if present), `edge.pem`, and copies of `root.pem`, `org.pem` and `revoked.crl` into
    /// `out_dir`.
    pub fn issue_edge(&self, out_dir: &Path, dns_names: &[String], now: UnixMillis) -> Result<EdgeFiles, DevError> {
        fs::create_dir_all(out_dir).map_err(|error| DevError::Write { path: out_dir.to_owned(), error })?;
        let key_path = out_dir.join(EDGE_KEY_FILE);
        refuse_existing(&key_path)?;
        let key = SigningKey::generate(&mut OsRng);
        let edge_id = EdgeId::from_inception_key(&key.public_key());
        let leaf = self.issue_leaf(&key.public_key(), Role::Edge(edge_id), dns_names, now, "the edge certificate")?;
        write_new_file(&key_path, key.to_pkcs8_pem().as_bytes(), PRIVATE_FILE_MODE)?;
        let chain = [leaf.clone(), self.org.clone()];
        write_replacing(&out_dir.join(EDGE_CHAIN_FILE), chain_pem(&chain).as_bytes())?;
        for name in [ROOT_CERT_FILE, ORG_CERT_FILE, CRL_FILE] {
            // Read whole before writing, so an `out_dir` equal to the CA dir is harmless.
            let contents = read_text(&self.dir.join(name))?;
            write_replacing(&out_dir.join(name), contents.as_bytes())?;
        }
        Ok(EdgeFiles { dir: out_dir.to_owned(), edge_id, leaf })
    }

    /// Adds `serial` to the CRL and replaces `revoked.crl` atomically with the reissued
    /// list (crl number one higher, next update [`CRL_UPDATE_INTERVAL`] from `now`).
    pub fn revoke(&self, serial: Serial, now: UnixMillis) -> Result<RevocationList, DevError> {
        let current = self.revocation_list()?;
        let crl_number =
            current.crl_number().checked_add(1).ok_or(DevError::CrlNumberExhausted(current.crl_number()))?;
        let mut revoked: Vec<Serial> = current.revoked().iter().copied().collect();
        revoked.push(serial);
        let next = RevocationList::issue(&self.org, &self.org_key, crl_number, now, crl_next_update(now), &revoked)
            .map_err(|error| DevError::Issue { what: "the revocation list", error })?;
        write_replacing(&self.dir.join(CRL_FILE), next.to_pem().as_bytes())?;
        Ok(next)
    }

    fn issue_leaf(
        &self,
        subject_key: &PublicKey,
        role: Role,
        dns_names: &[String],
        now: UnixMillis,
        what: &'static str,
    ) -> Result<Certificate, DevError> {
        let org_validity = self.org.validity();
        if !org_validity.contains(now) {
            return Err(DevError::OrgCaNotValid { validity: org_validity });
        }
        let validity = Validity {
            not_before: now.saturating_sub(NOT_BEFORE_BACKDATE).max(org_validity.not_before),
            not_after: now.saturating_add(LEAF_VALIDITY).min(org_validity.not_after),
        };
        let serial = Serial::random(&mut OsRng);
        issue_leaf(&self.org, &self.org_key, subject_key, role, dns_names, validity, serial)
            .map_err(|error| DevError::Issue { what, error })
    }
}

/// An agent directory.
#[derive(Clone, Debug)]
pub struct AgentFiles {
    pub dir: PathBuf,
    /// Derived from the inception key and recorded in `agent.id`.
    pub agent_id: AgentId,
    /// The leaf certificate, once a CA has issued one.
    pub leaf: Option<Certificate>,
}

impl AgentFiles {
    /// Creates `dir` (if needed) and writes a new agent's `agent.key`, `encryption.key`
    /// and `agent.id`. Refuses to overwrite any of them.
    pub fn generate<R: RngCore + CryptoRng>(dir: &Path, rng: &mut R) -> Result<AgentFiles, DevError> {
        fs::create_dir_all(dir).map_err(|error| DevError::Write { path: dir.to_owned(), error })?;
        for name in [AGENT_KEY_FILE, ENCRYPTION_KEY_FILE, AGENT_ID_FILE] {
            refuse_existing(&dir.join(name))?;
        }
        let signing_key = SigningKey::generate(rng);
        let encryption_secret = EncryptionSecret::generate(rng);
        let agent_id = AgentId::from_inception_key(&signing_key.public_key());
        write_new_file(&dir.join(AGENT_KEY_FILE), signing_key.to_pkcs8_pem().as_bytes(), PRIVATE_FILE_MODE)?;
        let mut encryption_text = Zeroizing::new([0u8; ENCRYPTION_KEY_HEX_LEN + 1]);
        // Invariant: 32 bytes encode to exactly ENCRYPTION_KEY_HEX_LEN digits.
        hex::encode_to_slice(encryption_secret.as_bytes(), &mut encryption_text[..ENCRYPTION_KEY_HEX_LEN])
            .expect("32 bytes are 64 hex digits");
        encryption_text[ENCRYPTION_KEY_HEX_LEN] = b'\n';
        write_new_file(&dir.join(ENCRYPTION_KEY_FILE), encryption_text.as_slice(), PRIVATE_FILE_MODE)?;
        write_new_file(&dir.join(AGENT_ID_FILE), format!("{agent_id}\n").as_bytes(), PUBLIC_FILE_MODE)?;
        Ok(AgentFiles { dir: dir.to_owned(), agent_id, leaf: None })
    }

    /// Reads the agent's keys and certificate chain and checks they belong together and
    /// to the id in `agent.id`.
    pub fn load(dir: &Path) -> Result<AgentIdentity, DevError> {
        let agent_id = read_agent_id(dir)?;
        let signing_key = read_agent_signing_key(dir)?;
        let encryption_secret = read_encryption_secret(&dir.join(ENCRYPTION_KEY_FILE))?;
        let chain_path = dir.join(AGENT_CHAIN_FILE);
        let chain_text = match fs::read_to_string(&chain_path) {
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(DevError::NotIssued { path: chain_path });
            }
            result => result.map_err(|error| DevError::Read { path: chain_path.clone(), error })?,
        };
        let chain = Certificate::chain_from_pem(&chain_text)
            .map_err(|error| DevError::Certificate { path: chain_path.clone(), error })?;
        let identity = AgentIdentity::new(chain, signing_key, encryption_secret)
            .map_err(|error| DevError::Identity { dir: dir.to_owned(), error })?;
        if identity.agent_id != agent_id {
            return Err(DevError::AgentIdMismatch {
                path: chain_path,
                recorded: agent_id,
                certificate: identity.agent_id,
            });
        }
        Ok(identity)
    }
}

/// An agent's keys, read without its certificate: what signing control plane requests
/// needs (see [`crate::api::AgentCredentials`]).
pub struct AgentKeys {
    pub agent_id: AgentId,
    pub signing_key: SigningKey,
    pub encryption_secret: EncryptionSecret,
}

impl std::fmt::Debug for AgentKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentKeys").field("agent_id", &self.agent_id).finish_non_exhaustive()
    }
}

impl AgentKeys {
    /// A key binding of the agent's encryption key, signed now.
    pub fn key_binding(&self, now: UnixMillis) -> KeyBinding {
        // Invariant: a software key cannot fail to sign.
        KeyBinding::sign(self.agent_id, self.encryption_secret.public_key(), now, &self.signing_key)
            .expect("software signing does not fail")
    }
}

impl AgentFiles {
    /// Reads the agent's id and keys from `dir` (made by [`AgentFiles::generate`]); no
    /// certificate needed.
    pub fn load_keys(dir: &Path) -> Result<AgentKeys, DevError> {
        let agent_id = read_agent_id(dir)?;
        let signing_key = read_agent_signing_key(dir)?;
        let encryption_secret = read_encryption_secret(&dir.join(ENCRYPTION_KEY_FILE))?;
        Ok(AgentKeys { agent_id, signing_key, encryption_secret })
    }

    /// Installs a certificate chain issued elsewhere (the control plane's CA) for the agent
    /// in `dir`: checks that it certifies the agent's key and id, then writes `agent.pem`
    /// and `card.json` as [`DevCa::issue_agent`] does.
    pub fn install_chain(dir: &Path, chain_pem_text: &str, now: UnixMillis) -> Result<AgentIdentity, DevError> {
        let keys = AgentFiles::load_keys(dir)?;
        let chain_path = dir.join(AGENT_CHAIN_FILE);
        let chain = Certificate::chain_from_pem(chain_pem_text)
            .map_err(|error| DevError::Certificate { path: chain_path.clone(), error })?;
        let identity = AgentIdentity::new(chain, keys.signing_key, keys.encryption_secret)
            .map_err(|error| DevError::Identity { dir: dir.to_owned(), error })?;
        if identity.agent_id != keys.agent_id {
            return Err(DevError::AgentIdMismatch {
                path: chain_path,
                recorded: keys.agent_id,
                certificate: identity.agent_id,
            });
        }
        write_replacing(&chain_path, chain_pem(&identity.chain).as_bytes())?;
        AgentCard::from_identity(&identity, now).save(&dir.join(CARD_FILE))?;
        Ok(identity)
    }
}

impl AgentFiles {
    /// The staged next key of the agent in `dir`: read from [`NEXT_AGENT_KEY_FILE`] if an
    /// earlier rotation or recovery left one, else generated and written (mode 0600). The
    /// flag is `true` if it was generated.
    pub fn stage_next_key<R: RngCore + CryptoRng>(dir: &Path, rng: &mut R) -> Result<(SigningKey, bool), DevError> {
        read_agent_id(dir)?;
        let path = dir.join(NEXT_AGENT_KEY_FILE);
        if path.exists() {
            return Ok((read_signing_key(&path)?, false));
        }
        let key = SigningKey::generate(rng);
        write_new_file(&path, key.to_pkcs8_pem().as_bytes(), PRIVATE_FILE_MODE)?;
        Ok((key, true))
    }

    /// Makes the staged key current once the CA certified it: checks that `chain_pem_text`
    /// certifies the staged key for the id in `agent.id`, writes it as
    /// [`NEXT_AGENT_CHAIN_FILE`], then moves `agent.key` to [`PREVIOUS_AGENT_KEY_FILE`],
    /// the staged key to `agent.key` and the chain to `agent.pem` (each rename atomic; an
    /// interruption is finished by [`AgentFiles::finish_key_change`]), and rewrites the card.
    pub fn commit_next_key(dir: &Path, chain_pem_text: &str, now: UnixMillis) -> Result<AgentIdentity, DevError> {
        let agent_id = read_agent_id(dir)?;
        let next_path = dir.join(NEXT_AGENT_KEY_FILE);
        let next_key = read_signing_key(&next_path)?;
        let encryption_secret = read_encryption_secret(&dir.join(ENCRYPTION_KEY_FILE))?;
        let staged_chain = dir.join(NEXT_AGENT_CHAIN_FILE);
        let chain = Certificate::chain_from_pem(chain_pem_text)
            .map_err(|error| DevError::Certificate { path: staged_chain.clone(), error })?;
        let identity = AgentIdentity::new(chain, next_key, encryption_secret)
            .map_err(|error| DevError::Identity { dir: dir.to_owned(), error })?;
        if identity.agent_id != agent_id {
            return Err(DevError::AgentIdMismatch {
                path: staged_chain,
                recorded: agent_id,
                certificate: identity.agent_id,
            });
        }
        write_replacing(&staged_chain, chain_pem(&identity.chain).as_bytes())?;
        AgentFiles::finish_key_change(dir, now)?;
        AgentFiles::load(dir)
    }

    /// Finishes a key change that [`AgentFiles::commit_next_key`] began: if both the
    /// staged key and its chain are present, swaps them in. `false` if there was nothing
    /// to finish.
    pub fn finish_key_change(dir: &Path, now: UnixMillis) -> Result<bool, DevError> {
        let next_key = dir.join(NEXT_AGENT_KEY_FILE);
        let next_chain = dir.join(NEXT_AGENT_CHAIN_FILE);
        if !next_key.exists() || !next_chain.exists() {
            return Ok(false);
        }
        let current = dir.join(AGENT_KEY_FILE);
        if current.exists() {
            rename_durably(&current, &dir.join(PREVIOUS_AGENT_KEY_FILE))?;
        }
        rename_durably(&next_key, &current)?;
        rename_durably(&next_chain, &dir.join(AGENT_CHAIN_FILE))?;
        let identity = AgentFiles::load(dir)?;
        AgentCard::from_identity(&identity, now).save(&dir.join(CARD_FILE))?;
        Ok(true)
    }

    /// Removes a staged key the control plane refused (nothing else changes).
    pub fn discard_next_key(dir: &Path) -> Result<(), DevError> {
        for name in [NEXT_AGENT_KEY_FILE, NEXT_AGENT_CHAIN_FILE] {
            let path = dir.join(name);
            match fs::remove_file(&path) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => {
                    return Err(DevError::Write { path, error });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Prepares `dir` for recovering `agent_id`, whose key is lost: writes `agent.id` (or
    /// checks that it names the same agent), an encryption key if there is none, and
    /// stages the next key, whose public half the guardians approve.
    pub fn prepare_recovery<R: RngCore + CryptoRng>(
        dir: &Path,
        agent_id: AgentId,
        rng: &mut R,
    ) -> Result<SigningKey, DevError> {
        fs::create_dir_all(dir).map_err(|error| DevError::Write { path: dir.to_owned(), error })?;
        let id_path = dir.join(AGENT_ID_FILE);
        if id_path.exists() {
            let recorded = read_agent_id(dir)?;
            if recorded != agent_id {
                return Err(DevError::AgentIdMismatch { path: id_path, recorded, certificate: agent_id });
            }
        } else {
            write_new_file(&id_path, format!("{agent_id}\n").as_bytes(), PUBLIC_FILE_MODE)?;
        }
        let encryption_path = dir.join(ENCRYPTION_KEY_FILE);
        if !encryption_path.exists() {
            let secret = EncryptionSecret::generate(rng);
            let mut text = Zeroizing::new(hex::encode(secret.as_bytes()));
            text.push('\n');
            write_new_file(&encryption_path, text.as_bytes(), PRIVATE_FILE_MODE)?;
        }
        Ok(AgentFiles::stage_next_key(dir, rng)?.0)
    }
}

/// Renames `from` to `to` (replacing it) and syncs the directory.
fn rename_durably(from: &Path, to: &Path) -> Result<(), DevError> {
    fs::rename(from, to)
        .and_then(|()| match to.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
            _ => Ok(()),
        })
        .map_err(|error| DevError::Write { path: to.to_owned(), error })
}

/// The edge key in `dir`: read if `edge.key` exists, else generated and written (mode
/// 0600). The flag is `true` if it was generated.
pub fn edge_key(dir: &Path) -> Result<(SigningKey, bool), DevError> {
    fs::create_dir_all(dir).map_err(|error| DevError::Write { path: dir.to_owned(), error })?;
    let path = dir.join(EDGE_KEY_FILE);
    if path.exists() {
        return Ok((read_signing_key(&path)?, false));
    }
    let key = SigningKey::generate(&mut OsRng);
    write_new_file(&path, key.to_pkcs8_pem().as_bytes(), PRIVATE_FILE_MODE)?;
    Ok((key, true))
}

/// Writes an edge's files issued elsewhere (the control plane's CA) into `dir`, beside
/// its `edge.key`: `edge.pem` (leaf, then org CA), `org.pem`, `root.pem` and
/// `revoked.crl`, the layout [`DevCa::issue_edge`] writes. Checks that the chain certifies
/// the key in `edge.key`.
pub fn install_edge_files(
    dir: &Path,
    chain_pem_text: &str,
    root_pem: &str,
    crl_pem: &str,
) -> Result<EdgeFiles, DevError> {
    let key_path = dir.join(EDGE_KEY_FILE);
    let key = read_signing_key(&key_path)?;
    let chain_path = dir.join(EDGE_CHAIN_FILE);
    let chain = Certificate::chain_from_pem(chain_pem_text)
        .map_err(|error| DevError::Certificate { path: chain_path.clone(), error })?;
    let (Some(leaf), Some(org)) = (chain.first(), chain.get(1)) else {
        return Err(DevError::Certificate {
            path: chain_path,
            error: CertError::Malformed("expected a leaf and its org CA"),
        });
    };
    if leaf.public_key() != key.public_key() {
        return Err(DevError::KeyMismatch { key: key_path, certificate: chain_path });
    }
    let edge_id = EdgeId::from_inception_key(&key.public_key());
    write_replacing(&chain_path, chain_pem(&chain).as_bytes())?;
    write_replacing(&dir.join(ORG_CERT_FILE), org.to_pem().as_bytes())?;
    write_replacing(&dir.join(ROOT_CERT_FILE), root_pem.as_bytes())?;
    write_replacing(&dir.join(CRL_FILE), crl_pem.as_bytes())?;
    Ok(EdgeFiles { dir: dir.to_owned(), edge_id, leaf: leaf.clone() })
}

/// An edge directory written by [`DevCa::issue_edge`].
#[derive(Clone, Debug)]
pub struct EdgeFiles {
    pub dir: PathBuf,
    pub edge_id: EdgeId,
    pub leaf: Certificate,
}

impl EdgeFiles {
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(EDGE_KEY_FILE)
    }

    pub fn chain_path(&self) -> PathBuf {
        self.dir.join(EDGE_CHAIN_FILE)
    }

    pub fn root_path(&self) -> PathBuf {
        self.dir.join(ROOT_CERT_FILE)
    }

    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(CRL_FILE)
    }

    pub fn crl_issuer_path(&self) -> PathBuf {
        self.dir.join(ORG_CERT_FILE)
    }
}

/// What a peer needs to talk to an agent: its certificate chain and its signed
/// encryption-key binding. Trusted only after [`AgentCard::verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCard {
    pub agent_id: AgentId,
    /// PEM: the agent's leaf certificate, then its org CA.
    pub certificate_chain: String,
    /// Lower-case hexadecimal of [`KeyBinding::encode`].
    pub key_binding: String,
}

impl AgentCard {
    /// The card of `identity`, with a key binding signed now.
    pub fn from_identity(identity: &AgentIdentity, now: UnixMillis) -> AgentCard {
        AgentCard {
            agent_id: identity.agent_id,
            certificate_chain: chain_pem(&identity.chain),
            key_binding: hex::encode(identity.key_binding(now).encode()),
        }
    }

    /// Reads a card from a JSON file of at most [`MAX_CARD_BYTES`]. Does not verify it.
    pub fn load(path: &Path) -> Result<AgentCard, DevError> {
        let file = File::open(path).map_err(|error| DevError::Read { path: path.to_owned(), error })?;
        let mut text = Vec::new();
        file.take(MAX_CARD_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|error| DevError::Read { path: path.to_owned(), error })?;
        if text.len() as u64 > MAX_CARD_BYTES {
            return Err(DevError::CardTooLarge { path: path.to_owned() });
        }
        serde_json::from_slice(&text).map_err(|error| DevError::CardJson { path: path.to_owned(), error })
    }

    /// Writes the card as pretty JSON, replacing any file at `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), DevError> {
        let mut json = self.to_json_pretty();
        json.push('\n');
        write_replacing(path, json.as_bytes())
    }

    pub fn to_json_pretty(&self) -> String {
        // Invariant: three string-like fields always serialize.
        serde_json::to_string_pretty(self).expect("an agent card serializes to JSON")
    }

    /// Verifies the chain up to `anchors` at `now` (and not revoked), the key binding
    /// against the certified key, and that the card's `agent_id` is the certified one.
    pub fn verify(
        &self,
        anchors: &TrustAnchors,
        revocations: &Revocations,
        now: UnixMillis,
    ) -> Result<(AgentId, PeerKeys), DevError> {
        let chain = Certificate::chain_from_pem(&self.certificate_chain).map_err(DevError::CardChain)?;
        let binding_bytes = hex::decode(&self.key_binding).map_err(|_| DevError::CardBindingHex)?;
        let binding = KeyBinding::decode(&binding_bytes).map_err(DevError::CardBinding)?;
        let (agent_id, keys) =
            PeerKeys::verify(&chain, &binding, anchors, revocations, now).map_err(DevError::CardVerify)?;
        if agent_id != self.agent_id {
            return Err(DevError::CardAgentMismatch { claimed: self.agent_id, certificate: agent_id });
        }
        Ok((agent_id, keys))
    }
}

/// Reads a PEM CRL and verifies it was issued by `issuer`.
pub fn read_revocation_list(path: &Path, issuer: &Certificate) -> Result<RevocationList, DevError> {
    let text = read_text(path)?;
    RevocationList::from_pem_verified(&text, issuer)
        .map_err(|error| DevError::Certificate { path: path.to_owned(), error })
}

/// Reads the first certificate of a PEM file.
pub fn read_certificate(path: &Path) -> Result<Certificate, DevError> {
    let text = read_text(path)?;
    Certificate::from_pem(&text).map_err(|error| DevError::Certificate { path: path.to_owned(), error })
}

fn crl_next_update(now: UnixMillis) -> UnixMillis {
    now.saturating_add(CRL_UPDATE_INTERVAL)
}

fn chain_pem(chain: &[Certificate]) -> String {
    chain.iter().map(Certificate::to_pem).collect()
}

fn read_text(path: &Path) -> Result<String, DevError> {
    fs::read_to_string(path).map_err(|error| DevError::Read { path: path.to_owned(), error })
}

fn read_agent_id(dir: &Path) -> Result<AgentId, DevError> {
    let path = dir.join(AGENT_ID_FILE);
    let text = match fs::read_to_string(&path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(DevError::NoAgentKeys { dir: dir.to_owned() });
        }
        result => result.map_err(|error| DevError::Read { path: path.clone(), error })?,
    };
    text.trim_end().parse().map_err(|error| DevError::AgentIdFile { path, error })
}

fn read_agent_signing_key(dir: &Path) -> Result<SigningKey, DevError> {
    let path = dir.join(AGENT_KEY_FILE);
    if !path.exists() {
        return Err(DevError::NoAgentKeys { dir: dir.to_owned() });
    }
    read_signing_key(&path)
}

fn read_signing_key(path: &Path) -> Result<SigningKey, DevError> {
    let text = read_private_text(path)?;
    SigningKey::from_pkcs8_pem(&text).map_err(|error| DevError::PrivateKey { path: path.to_owned(), error })
}

fn read_encryption_secret(path: &Path) -> Result<EncryptionSecret, DevError> {
    let text = read_private_text(path)?;
    let digits = text.trim_end_matches(['\n', '\r']);
    if digits.len() != ENCRYPTION_KEY_HEX_LEN {
        return Err(DevError::EncryptionKey { path: path.to_owned() });
    }
    let mut bytes = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(digits, bytes.as_mut_slice())
        .map_err(|_| DevError::EncryptionKey { path: path.to_owned() })?;
    Ok(EncryptionSecret::from_bytes(*bytes))
}

/// Reads a private key file into memory that is zeroed on drop; warns when others may
/// read the file.
fn read_private_text(path: &Path) -> Result<Zeroizing<String>, DevError> {
    let text = Zeroizing::new(read_text(path)?);
    if let Ok(metadata) = fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format_args!("{mode:o}"), "private key file is readable by others");
        }
    }
    Ok(text)
}

fn refuse_existing(path: &Path) -> Result<(), DevError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Err(DevError::AlreadyExists { path: path.to_owned() }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(DevError::Read { path: path.to_owned(), error }),
    }
}

/// Creates `path` with `mode` (refusing an existing file), writes and syncs it.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), DevError> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|error| {
        if error.kind() == io::ErrorKind::AlreadyExists {
            DevError::AlreadyExists { path: path.to_owned() }
        } else {
            DevError::Write { path: path.to_owned(), error }
        }
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|error| DevError::Write { path: path.to_owned(), error })
}

/// Replaces `path` atomically: a reader sees the old contents or the new, never a mix.
fn write_replacing(path: &Path, contents: &[u8]) -> Result<(), DevError> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let file_name = path.file_name().map(|name| name.to_string_lossy()).unwrap_or_default();
    let temporary = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file =
            OpenOptions::new().write(true).create(true).truncate(true).mode(PUBLIC_FILE_MODE).open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        // Makes the rename itself durable.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result.map_err(|error| DevError::Write { path: path.to_owned(), error })
}

#[cfg(test)]
mod tests {
    use super::*;
    use molt_protocol::cert::{ChainError, ExpectedRole, verify_chain};

    const NOW: UnixMillis = UnixMillis(1_750_000_000_000);

    struct Setup {
        _temp: tempfile::TempDir,
        ca: DevCa,
        agent_dir: PathBuf,
        agent: AgentFiles,
    }

    fn setup() -> Setup {
        let temp = tempfile::tempdir().unwrap();
        let ca = DevCa::init(&temp.path().join("ca"), NOW).unwrap();
        let agent_dir = temp.path().join("alice");
        AgentFiles::generate(&agent_dir, &mut OsRng).unwrap();
        let agent = ca.issue_agent(&agent_dir, NOW).unwrap();
        Setup { _temp: temp, ca, agent_dir, agent }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_generate_issue_load_and_verify_the_card() {
        let setup = setup();
        let identity = AgentFiles::load(&setup.agent_dir).unwrap();
        assert_eq!(identity.agent_id, setup.agent.agent_id);
        assert_eq!(identity.agent_id, AgentId::from_inception_key(&identity.signing_key.public_key()));
        assert_eq!(identity.chain.len(), 2);
        assert_eq!(Some(&identity.chain[0]), setup.agent.leaf.as_ref());
        assert_eq!(identity.chain[0].validity().not_after, NOW.saturating_add(LEAF_VALIDITY));
        let recorded = fs::read_to_string(setup.agent_dir.join(AGENT_ID_FILE)).unwrap();
        assert_eq!(recorded, format!("{}\n", identity.agent_id));

        let card = AgentCard::load(&setup.agent_dir.join(CARD_FILE)).unwrap();
        let (agent_id, keys) = card.verify(setup.ca.anchors(), &Revocations::default(), NOW).unwrap();
        assert_eq!(agent_id, identity.agent_id);
        assert_eq!(keys, identity.peer_keys());
        let fresh = AgentCard::from_identity(&identity, NOW.saturating_add(DAY));
        assert_eq!(fresh.verify(setup.ca.anchors(), &Revocations::default(), NOW).unwrap().1, keys);

        // A reloaded CA issues too, and the first CRL is empty and numbered 1.
        let reloaded = DevCa::load(setup.ca.dir()).unwrap();
        assert_eq!(reloaded.root(), setup.ca.root());
        let crl = reloaded.revocation_list().unwrap();
        assert_eq!((crl.crl_number(), crl.revoked().len()), (FIRST_CRL_NUMBER, 0));
        assert_eq!(crl.next_update(), NOW.saturating_add(CRL_UPDATE_INTERVAL));
        let again = reloaded.issue_agent(&setup.agent_dir, NOW.saturating_add(DAY)).unwrap();
        assert_ne!(again.leaf.unwrap().serial(), setup.agent.leaf.unwrap().serial());
        AgentFiles::load(&setup.agent_dir).unwrap();
    }

    #[test]
    fn existing_files_are_never_overwritten() {
        let setup = setup();
        let root_before = fs::read(setup.ca.dir().join(ROOT_KEY_FILE)).unwrap();
        assert!(matches!(
            DevCa::init(setup.ca.dir(), NOW),
            Err(DevError::AlreadyExists { path }) if path.ends_with(ROOT_CERT_FILE)
        ));
        assert_eq!(fs::read(setup.ca.dir().join(ROOT_KEY_FILE)).unwrap(), root_before);

        let key_before = fs::read(setup.agent_dir.join(AGENT_KEY_FILE)).unwrap();
        assert!(matches!(
            AgentFiles::generate(&setup.agent_dir, &mut OsRng),
            Err(DevError::AlreadyExists { path }) if path.ends_with(AGENT_KEY_FILE)
        ));
        assert_eq!(fs::read(setup.agent_dir.join(AGENT_KEY_FILE)).unwrap(), key_before);

        let edge_dir = setup.ca.dir().parent().unwrap().join("edge");
        setup.ca.issue_edge(&edge_dir, &["localhost".to_owned()], NOW).unwrap();
        assert!(matches!(
            setup.ca.issue_edge(&edge_dir, &["localhost".to_owned()], NOW),
            Err(DevError::AlreadyExists { path }) if path.ends_with(EDGE_KEY_FILE)
        ));
    }

    #[test]
    fn private_keys_have_mode_0600() {
        let setup = setup();
        let edge_dir = setup.ca.dir().parent().unwrap().join("edge");
        setup.ca.issue_edge(&edge_dir, &["localhost".to_owned()], NOW).unwrap();
        for path in [
            setup.ca.dir().join(ROOT_KEY_FILE),
            setup.ca.dir().join(ORG_KEY_FILE),
            setup.agent_dir.join(AGENT_KEY_FILE),
            setup.agent_dir.join(ENCRYPTION_KEY_FILE),
            edge_dir.join(EDGE_KEY_FILE),
        ] {
            assert_eq!(mode_of(&path), 0o600, "{}", path.display());
        }
        let encryption = fs::read_to_string(setup.agent_dir.join(ENCRYPTION_KEY_FILE)).unwrap();
        assert_eq!(encryption.len(), ENCRYPTION_KEY_HEX_LEN + 1);
        assert!(encryption.ends_with('\n'));
    }

    #[test]
    fn revoking_the_agent_makes_its_card_fail() {
        let setup = setup();
        let serial = setup.agent.leaf.as_ref().unwrap().serial();
        let crl = setup.ca.revoke(serial, NOW).unwrap();
        assert_eq!(crl.crl_number(), FIRST_CRL_NUMBER + 1);
        assert!(crl.revoked().contains(&serial));

        let on_disk = read_revocation_list(&setup.ca.dir().join(CRL_FILE), setup.ca.org()).unwrap();
        let mut revocations = Revocations::default();
        revocations.extend_from(&on_disk);
        let card = AgentCard::load(&setup.agent_dir.join(CARD_FILE)).unwrap();
        assert!(matches!(
            card.verify(setup.ca.anchors(), &revocations, NOW),
            Err(DevError::CardVerify(IdentityError::Chain(ChainError::Revoked(revoked)))) if revoked == serial
        ));

        let other = Serial::random(&mut OsRng);
        let next = setup.ca.revoke(other, NOW.saturating_add(DAY)).unwrap();
        assert_eq!(next.crl_number(), FIRST_CRL_NUMBER + 2);
        assert_eq!(setup.ca.revocations().unwrap().len(), 2);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(setup.ca.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 5, "{names:?}");
    }

    #[test]
    fn tampered_cards_fail() {
        let setup = setup();
        let bob_dir = setup.agent_dir.parent().unwrap().join("bob");
        AgentFiles::generate(&bob_dir, &mut OsRng).unwrap();
        setup.ca.issue_agent(&bob_dir, NOW).unwrap();
        let alice = AgentCard::load(&setup.agent_dir.join(CARD_FILE)).unwrap();
        let bob = AgentCard::load(&bob_dir.join(CARD_FILE)).unwrap();
        let none = Revocations::default();

        let swapped_binding = AgentCard { key_binding: bob.key_binding.clone(), ..alice.clone() };
        assert!(matches!(
            swapped_binding.verify(setup.ca.anchors(), &none, NOW),
            Err(DevError::CardVerify(IdentityError::BindingForOtherAgent { .. }))
        ));
        let swapped_id = AgentCard { agent_id: bob.agent_id, ..alice.clone() };
        assert!(matches!(swapped_id.verify(setup.ca.anchors(), &none, NOW), Err(DevError::CardAgentMismatch { .. })));
        let mut forged_bytes = hex::decode(&alice.key_binding).unwrap();
        forged_bytes[20] ^= 1;
        let forged = AgentCard { key_binding: hex::encode(forged_bytes), ..alice.clone() };
        assert!(matches!(
            forged.verify(setup.ca.anchors(), &none, NOW),
            Err(DevError::CardVerify(IdentityError::Binding(KeyError::BadSignature)))
        ));
        let not_hex = AgentCard { key_binding: "zz".to_owned(), ..alice.clone() };
        assert!(matches!(not_hex.verify(setup.ca.anchors(), &none, NOW), Err(DevError::CardBindingHex)));
        let short = AgentCard { key_binding: "00".to_owned(), ..alice.clone() };
        assert!(matches!(short.verify(setup.ca.anchors(), &none, NOW), Err(DevError::CardBinding(_))));
        let no_chain = AgentCard { certificate_chain: String::new(), ..alice.clone() };
        assert!(matches!(no_chain.verify(setup.ca.anchors(), &none, NOW), Err(DevError::CardChain(_))));

        // A card from another CA is not trusted.
        let other_ca = DevCa::init(&setup.agent_dir.parent().unwrap().join("other-ca"), NOW).unwrap();
        assert!(matches!(
            alice.verify(other_ca.anchors(), &none, NOW),
            Err(DevError::CardVerify(IdentityError::Chain(ChainError::UnknownIssuer)))
        ));
        let expired = NOW.saturating_add(LEAF_VALIDITY).saturating_add(DAY);
        assert!(matches!(
            alice.verify(setup.ca.anchors(), &none, expired),
            Err(DevError::CardVerify(IdentityError::Chain(ChainError::Expired { .. })))
        ));
    }

    #[test]
    fn mismatched_agent_files_are_refused() {
        let setup = setup();
        let bob_dir = setup.agent_dir.parent().unwrap().join("bob");
        AgentFiles::generate(&bob_dir, &mut OsRng).unwrap();
        assert!(matches!(AgentFiles::load(&bob_dir), Err(DevError::NotIssued { .. })));
        fs::copy(setup.agent_dir.join(AGENT_CHAIN_FILE), bob_dir.join(AGENT_CHAIN_FILE)).unwrap();
        assert!(matches!(
            AgentFiles::load(&bob_dir),
            Err(DevError::Identity { error: IdentityError::KeyMismatch, .. })
        ));

        let empty_dir = setup.agent_dir.parent().unwrap().join("nobody");
        assert!(matches!(setup.ca.issue_agent(&empty_dir, NOW), Err(DevError::NoAgentKeys { .. })));

        fs::write(setup.agent_dir.join(AGENT_ID_FILE), format!("{}\n", AgentId::from_bytes([1; 16]))).unwrap();
        assert!(matches!(AgentFiles::load(&setup.agent_dir), Err(DevError::AgentIdMismatch { .. })));
        fs::write(setup.agent_dir.join(AGENT_ID_FILE), "agent-nonsense\n").unwrap();
        assert!(matches!(AgentFiles::load(&setup.agent_dir), Err(DevError::AgentIdFile { .. })));
    }

    #[test]
    fn bad_key_files_are_refused() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path();
        AgentFiles::generate(dir, &mut OsRng).unwrap();
        let path = dir.join(ENCRYPTION_KEY_FILE);
        fs::write(&path, "abcd\n").unwrap();
        assert!(matches!(read_encryption_secret(&path), Err(DevError::EncryptionKey { .. })));
        fs::write(&path, format!("{}\n", "g".repeat(ENCRYPTION_KEY_HEX_LEN))).unwrap();
        assert!(matches!(read_encryption_secret(&path), Err(DevError::EncryptionKey { .. })));
        let key_path = dir.join(AGENT_KEY_FILE);
        fs::write(&key_path, "not a key").unwrap();
        assert!(matches!(read_signing_key(&key_path), Err(DevError::PrivateKey { .. })));

        let card_path = dir.join(CARD_FILE);
        fs::write(&card_path, "{}").unwrap();
        assert!(matches!(AgentCard::load(&card_path), Err(DevError::CardJson { .. })));
        fs::write(&card_path, vec![b' '; MAX_CARD_BYTES as usize + 1]).unwrap();
        assert!(matches!(AgentCard::load(&card_path), Err(DevError::CardTooLarge { .. })));
    }

    #[test]
    fn edge_files_chain_to_the_root_with_their_dns_names() {
        let setup = setup();
        let edge_dir = setup.ca.dir().parent().unwrap().join("edge");
        let names = vec!["localhost".to_owned(), "edge.example".to_owned()];
        let edge = setup.ca.issue_edge(&edge_dir, &names, NOW).unwrap();
        assert_eq!(edge.leaf.role(), Role::Edge(edge.edge_id));
        assert_eq!(edge.leaf.dns_names(), names.as_slice());
        let key = read_signing_key(&edge.key_path()).unwrap();
        assert_eq!(edge.edge_id, EdgeId::from_inception_key(&key.public_key()));
        let chain = Certificate::chain_from_pem(&fs::read_to_string(edge.chain_path()).unwrap()).unwrap();
        let ders: Vec<&[u8]> = chain.iter().map(Certificate::der).collect();
        let anchors = TrustAnchors::from_pem(&fs::read_to_string(edge.root_path()).unwrap()).unwrap();
        let verified =
            verify_chain(&ders, &anchors, &Revocations::default(), NOW, ExpectedRole::Edge(edge.edge_id)).unwrap();
        assert_eq!(verified.public_key, key.public_key());
        let issuer = read_certificate(&edge.crl_issuer_path()).unwrap();
        read_revocation_list(&edge.crl_path(), &issuer).unwrap();
        // Issuing into the CA directory itself leaves the CA intact.
        setup.ca.issue_edge(setup.ca.dir(), &names, NOW).unwrap();
        DevCa::load(setup.ca.dir()).unwrap().revocation_list().unwrap();
    }

    #[test]
    fn an_expired_org_ca_issues_nothing() {
        let setup = setup();
        let late = NOW.saturating_add(ORG_CA_VALIDITY).saturating_add(DAY);
        assert!(matches!(setup.ca.issue_agent(&setup.agent_dir, late), Err(DevError::OrgCaNotValid { .. })));
        // Near the org CA's end, leaves end with it.
        let near_end = NOW.saturating_add(ORG_CA_VALIDITY).saturating_sub(DAY);
        let agent = setup.ca.issue_agent(&setup.agent_dir, near_end).unwrap();
        assert_eq!(agent.leaf.unwrap().validity().not_after, setup.ca.org().validity().not_after);
    }
}
