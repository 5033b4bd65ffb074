//! Loads the edge's certificate chain, private key, trust anchors and revocation lists
//! from the files its configuration names, checking that they fit together. The private
//! key is either a file or a key inside a PKCS#11 token; either way it becomes a
//! [`Signer`] that the TLS configuration signs handshakes with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use molt_hsm::key::KeyName;
use molt_hsm::{SESSION_POOL_SIZE_DEFAULT, Token, TokenConfig, TokenSelector};
use molt_protocol::EdgeId;
use molt_protocol::cert::{Certificate, RevocationList, Revocations, Role, TrustAnchors};
use molt_protocol::keys::{Signer, SigningKey};
use molt_protocol::tls::SignerTlsIdentity;

use crate::config::{KeySource, Pkcs11KeyConfig};

/// Why the edge's identity or trust material could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("{path}: the private key does not match the certificate's public key")]
    KeyMismatch { path: PathBuf },
    #[error("{path}: the leaf certificate is for {found:?}, not an edge")]
    NotAnEdge { path: PathBuf, found: Role },
    #[error("pkcs#11 token {token:?} of {module}: {source}")]
    Token { module: PathBuf, token: String, source: Box<molt_hsm::OpenError> },
    #[error("pkcs#11 token {token:?}: {source}")]
    HsmKey { token: String, source: Box<molt_hsm::FindKeyError> },
    #[error("pkcs#11 key {key:?} on token {token:?} does not match the public key of {path}")]
    HsmKeyMismatch { key: String, token: String, path: PathBuf },
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Read { path: path.to_owned(), source })
}

fn invalid(path: &Path, detail: impl ToString) -> IdentityError {
    IdentityError::Invalid { path: path.to_owned(), detail: detail.to_string() }
}

/// The edge's TLS identity and its id.
#[derive(Debug)]
pub struct EdgeIdentity {
    pub edge_id: EdgeId,
    pub tls: SignerTlsIdentity,
}

/// Reads the chain and finds the key (in its file or on its token), and checks that they
/// belong together. A PKCS#11 key stays logged in for as long as the identity lives. With a
/// key file, a key rotation that a crash interrupted is first finished or undone
/// ([`finish_rotation`]).
pub fn load_identity(chain_path: &Path, key: &KeySource) -> Result<EdgeIdentity, IdentityError> {
    if let KeySource::File(key_path) = key {
        match finish_rotation(chain_path, key_path) {
            Ok(Rotation::None) => {}
            Ok(outcome) => tracing::warn!(?outcome, "an interrupted key rotation was found at start"),
            Err(error) => return Err(IdentityError::Read { path: staged(chain_path), source: error }),
        }
    }
    let chain = Certificate::chain_from_pem(&read(chain_path)?).map_err(|e| invalid(chain_path, e))?;
    let leaf = chain.first().ok_or_else(|| invalid(chain_path, "no certificate found"))?;
    let Role::Edge(edge_id) = leaf.role() else {
        return Err(IdentityError::NotAnEdge { path: chain_path.to_owned(), found: leaf.role() });
    };
    let signer: Arc<dyn Signer> = match key {
        KeySource::File(key_path) => {
            let key = SigningKey::from_pkcs8_pem(&read(key_path)?).map_err(|e| invalid(key_path, e))?;
            if key.public_key() != leaf.public_key() {
                return Err(IdentityError::KeyMismatch { path: key_path.to_owned() });
            }
            Arc::new(key)
        }
        KeySource::Pkcs11(config) => {
            let key = open_hsm_key(config)?;
            if key.public_key() != leaf.public_key() {
                return Err(IdentityError::HsmKeyMismatch {
                    key: config.key_label.clone(),
                    token: config.token_label.clone(),
                    path: chain_path.to_owned(),
                });
            }
            Arc::new(key)
        }
    };
    Ok(EdgeIdentity { edge_id, tls: SignerTlsIdentity { chain, signer } })
}

/// Where a rotation stages the new file beside `path`: `path.next`.
pub fn staged(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    PathBuf::from(name)
}

/// What [`finish_rotation`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// No staged files: nothing to do.
    None,
    /// The new key and chain were both staged: both were moved into place.
    Completed,
    /// The new key was already in place and the chain staged: the chain was moved.
    CompletedChain,
    /// Staged files that make no pair with the key: removed; the old identity stands.
    Discarded,
}

/// Finishes or undoes a key rotation a crash interrupted. A rotation (at certificate
/// renewal) writes the new key to `key.next`, gets the certificate, writes the chain to
/// `chain.next`, then renames the key into place and then the chain. So a staged chain
/// whose key is staged or already in place is moved in; anything else staged is removed.
pub fn finish_rotation(chain_path: &Path, key_path: &Path) -> std::io::Result<Rotation> {
    let (next_chain, next_key) = (staged(chain_path), staged(key_path));
    let staged_leaf_key = match std::fs::read_to_string(&next_chain) {
        Ok(pem) => Certificate::chain_from_pem(&pem).ok().and_then(|chain| chain.first().map(Certificate::public_key)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return match std::fs::remove_file(&next_key) {
                Ok(()) => Ok(Rotation::Discarded),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Rotation::None),
                Err(error) => Err(error),
            };
        }
        Err(error) => return Err(error),
    };
    let public_key_of = |path: &Path| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|pem| SigningKey::from_pkcs8_pem(&pem).ok())
            .map(|key| key.public_key())
    };
    let outcome = match staged_leaf_key {
        Some(leaf) if public_key_of(&next_key) == Some(leaf) => {
            std::fs::rename(&next_key, key_path)?;
            std::fs::rename(&next_chain, chain_path)?;
            Rotation::Completed
        }
        Some(leaf) if public_key_of(key_path) == Some(leaf) => {
            std::fs::rename(&next_chain, chain_path)?;
            let _ = std::fs::remove_file(&next_key);
            Rotation::CompletedChain
        }
        _ => {
            for path in [&next_chain, &next_key] {
                match std::fs::remove_file(path) {
                    Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
                    _ => {}
                }
            }
            Rotation::Discarded
        }
    };
    if let Some(directory) = chain_path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::File::open(directory)?.sync_all()?;
    }
    Ok(outcome)
}

fn open_hsm_key(config: &Pkcs11KeyConfig) -> Result<molt_hsm::HsmKey, IdentityError> {
    let token = Token::open(&TokenConfig {
        module: config.module.clone(),
        token: TokenSelector::Label(config.token_label.clone()),
        pin: config.pin.clone(),
        pool_size: SESSION_POOL_SIZE_DEFAULT,
    })
    .map_err(|source| IdentityError::Token {
        module: config.module.clone(),
        token: config.token_label.clone(),
        source: Box::new(source),
    })?;
    token
        .find_ed25519(KeyName::Label(&config.key_label))
        .map_err(|source| IdentityError::HsmKey { token: config.token_label.clone(), source: Box::new(source) })
}

pub fn load_anchors(path: &Path) -> Result<TrustAnchors, IdentityError> {
    TrustAnchors::from_pem(&read(path)?).map_err(|e| invalid(path, e))
}

/// Reads each CRL and verifies it against the certificate of the CA that issued it.
pub fn load_revocations<'a>(
    lists: impl IntoIterator<Item = (&'a Path, &'a Path)>,
) -> Result<Revocations, IdentityError> {
    let mut revocations = Revocations::default();
    for (crl_path, issuer_path) in lists {
        let issuer = Certificate::from_pem(&read(issuer_path)?).map_err(|e| invalid(issuer_path, e))?;
        let list = RevocationList::from_pem_verified(&read(crl_path)?, &issuer).map_err(|e| invalid(crl_path, e))?;
        revocations.extend_from(&list);
    }
    Ok(revocations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use molt_protocol::cert::{Serial, Validity, issue_leaf, issue_org_ca, issue_root};
    use molt_protocol::{AgentId, UnixMillis};

    struct Pki {
        dir: tempfile::TempDir,
        org: Certificate,
        org_key: SigningKey,
    }

    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let now = UnixMillis::now_from_system();
        let validity = Validity {
            not_before: now.saturating_sub(std::time::Duration::from_secs(60)),
            not_after: UnixMillis(now.0 + 86_400_000),
        };
        let root_key = SigningKey::from_bytes(&[1; 32]);
        let root = issue_root(&root_key, "root", validity, Serial([1; 16])).unwrap();
        let org_key = SigningKey::from_bytes(&[2; 32]);
        let org = issue_org_ca(&root, &root_key, &org_key.public_key(), "org", validity, Serial([2; 16])).unwrap();
        std::fs::write(dir.path().join("root.pem"), root.to_pem()).unwrap();
        std::fs::write(dir.path().join("org.pem"), org.to_pem()).unwrap();
        Pki { dir, org, org_key }
    }

    fn leaf(pki: &Pki, key: &SigningKey, role: Role) -> String {
        let validity = pki.org.validity();
        let leaf = issue_leaf(&pki.org, &pki.org_key, &key.public_key(), role, &[], validity, Serial([3; 16])).unwrap();
        format!("{}{}", leaf.to_pem(), pki.org.to_pem())
    }

    #[test]
    fn an_interrupted_key_rotation_is_finished_or_undone_at_load() {
        let pki = pki();
        let dir = pki.dir.path();
        let (chain_path, key_path) = (dir.join("edge.pem"), dir.join("edge.key"));
        let (old, new) = (SigningKey::from_bytes(&[4; 32]), SigningKey::from_bytes(&[7; 32]));
        let edge_id = EdgeId::from_inception_key(&old.public_key());
        let (old_chain, new_chain) = (leaf(&pki, &old, Role::Edge(edge_id)), leaf(&pki, &new, Role::Edge(edge_id)));
        let source = KeySource::File(key_path.clone());
        let reset = || {
            std::fs::write(&chain_path, &old_chain).unwrap();
            std::fs::write(&key_path, old.to_pkcs8_pem().as_bytes()).unwrap();
            let _ = std::fs::remove_file(staged(&chain_path));
            let _ = std::fs::remove_file(staged(&key_path));
        };
        let loaded_key = || load_identity(&chain_path, &source).unwrap().tls.signer.public_key();

        // Crashed after staging the key only: the new key is dropped.
        reset();
        std::fs::write(staged(&key_path), new.to_pkcs8_pem().as_bytes()).unwrap();
        assert_eq!(finish_rotation(&chain_path, &key_path).unwrap(), Rotation::Discarded);
        assert_eq!(loaded_key(), old.public_key());
        assert!(!staged(&key_path).exists());

        // Crashed with both staged: both move in.
        reset();
        std::fs::write(staged(&key_path), new.to_pkcs8_pem().as_bytes()).unwrap();
        std::fs::write(staged(&chain_path), &new_chain).unwrap();
        assert_eq!(loaded_key(), new.public_key());
        assert!(!staged(&key_path).exists() && !staged(&chain_path).exists());

        // Crashed between the two renames: the chain follows the key.
        reset();
        std::fs::write(&key_path, new.to_pkcs8_pem().as_bytes()).unwrap();
        std::fs::write(staged(&chain_path), &new_chain).unwrap();
        assert_eq!(finish_rotation(&chain_path, &key_path).unwrap(), Rotation::CompletedChain);
        assert_eq!(loaded_key(), new.public_key());

        // A staged chain that fits no key, or garbage: removed, the old identity stands.
        reset();
        std::fs::write(staged(&chain_path), &new_chain).unwrap();
        assert_eq!(finish_rotation(&chain_path, &key_path).unwrap(), Rotation::Discarded);
        reset();
        std::fs::write(staged(&chain_path), "not a chain").unwrap();
        std::fs::write(staged(&key_path), "not a key").unwrap();
        assert_eq!(loaded_key(), old.public_key());
        assert!(!staged(&key_path).exists() && !staged(&chain_path).exists());

        reset();
        assert_eq!(finish_rotation(&chain_path, &key_path).unwrap(), Rotation::None);
    }

    #[test]
    fn loads_a_matching_edge_identity() {
        let pki = pki();
        let key = SigningKey::from_bytes(&[4; 32]);
        let edge_id = EdgeId::from_inception_key(&key.public_key());
        std::fs::write(pki.dir.path().join("edge.pem"), leaf(&pki, &key, Role::Edge(edge_id))).unwrap();
        std::fs::write(pki.dir.path().join("edge.key"), key.to_pkcs8_pem().as_bytes()).unwrap();
        let identity =
            load_identity(&pki.dir.path().join("edge.pem"), &KeySource::File(pki.dir.path().join("edge.key"))).unwrap();
        assert_eq!(identity.edge_id, edge_id);
        assert_eq!(identity.tls.chain.len(), 2);
        load_anchors(&pki.dir.path().join("root.pem")).unwrap();
    }

    #[test]
    fn refuses_a_wrong_key_an_agent_certificate_and_garbage() {
        let pki = pki();
        let key = SigningKey::from_bytes(&[4; 32]);
        let edge_id = EdgeId::from_inception_key(&key.public_key());
        let path = |name: &str| pki.dir.path().join(name);
        std::fs::write(path("edge.pem"), leaf(&pki, &key, Role::Edge(edge_id))).unwrap();
        std::fs::write(path("other.key"), SigningKey::from_bytes(&[5; 32]).to_pkcs8_pem().as_bytes()).unwrap();
        assert!(matches!(
            load_identity(&path("edge.pem"), &KeySource::File(path("other.key"))),
            Err(IdentityError::KeyMismatch { .. })
        ));

        let agent = AgentId::from_inception_key(&key.public_key());
        std::fs::write(path("agent.pem"), leaf(&pki, &key, Role::Agent(agent))).unwrap();
        std::fs::write(path("edge.key"), key.to_pkcs8_pem().as_bytes()).unwrap();
        assert!(matches!(
            load_identity(&path("agent.pem"), &KeySource::File(path("edge.key"))),
            Err(IdentityError::NotAnEdge { .. })
        ));

        std::fs::write(path("garbage.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        assert!(matches!(
            load_identity(&path("garbage.pem"), &KeySource::File(path("edge.key"))),
            Err(IdentityError::Invalid { .. })
        ));
        assert!(matches!(
            load_identity(&path("absent.pem"), &KeySource::File(path("edge.key"))),
            Err(IdentityError::Read { .. })
        ));
        assert!(matches!(load_anchors(&path("garbage.pem")), Err(IdentityError::Invalid { .. })));
    }

    #[test]
    fn revocation_lists_must_verify_against_their_issuer() {
        let pki = pki();
        let now = UnixMillis::now_from_system();
        let list =
            RevocationList::issue(&pki.org, &pki.org_key, 1, now, UnixMillis(now.0 + 60_000), &[Serial([7; 16])])
                .unwrap();
        std::fs::write(pki.dir.path().join("org.crl"), list.to_pem()).unwrap();
        let crl = pki.dir.path().join("org.crl");
        let revocations = load_revocations([(crl.as_path(), pki.dir.path().join("org.pem").as_path())]).unwrap();
        assert!(revocations.contains(Serial([7; 16])));
        let wrong_issuer = pki.dir.path().join("root.pem");
        assert!(matches!(
            load_revocations([(crl.as_path(), wrong_issuer.as_path())]),
            Err(IdentityError::Invalid { .. })
        ));
    }
}
