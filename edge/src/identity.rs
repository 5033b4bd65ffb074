//! Loads the edge's certificate chain, private key, trust anchors and revocation lists
//! from the files its configuration names, checking that they fit together.

use std::path::{Path, PathBuf};

use molt_protocol::EdgeId;
use molt_protocol::cert::{Certificate, RevocationList, Revocations, Role, TrustAnchors};
use molt_protocol::keys::SigningKey;
use molt_protocol::tls::TlsIdentity;

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
    pub tls: TlsIdentity,
}

pub fn load_identity(chain_path: &Path, key_path: &Path) -> Result<EdgeIdentity, IdentityError> {
    let chain = Certificate::chain_from_pem(&read(chain_path)?).map_err(|e| invalid(chain_path, e))?;
    let leaf = chain.first().ok_or_else(|| invalid(chain_path, "no certificate found"))?;
    let Role::Edge(edge_id) = leaf.role() else {
        return Err(IdentityError::NotAnEdge { path: chain_path.to_owned(), found: leaf.role() });
    };
    let key = SigningKey::from_pkcs8_pem(&read(key_path)?).map_err(|e| invalid(key_path, e))?;
    if key.public_key() != leaf.public_key() {
        return Err(IdentityError::KeyMismatch { path: key_path.to_owned() });
    }
    Ok(EdgeIdentity { edge_id, tls: TlsIdentity { chain, key } })
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
