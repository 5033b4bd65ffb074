//! The trust bundle the control plane streams to the edge (`WatchTrust`): parsing and
//! checking an update, the rollback rule, and the on-disk cache of the last bundle
//! applied.
//!
//! **Rollback.** Bundle sequences only grow at the control plane. An update whose
//! sequence is lower than the one the edge holds is refused ([`Decision::Rollback`]):
//! accepting it would un-revoke certificates. The same sequence again is ignored.
//!
//! **Checks.** Every certificate must parse, the roots must be self-signed root CAs, and
//! CRL *i* must verify against org CA *i* (the control plane sends them in that order).
//!
//! **Cache.** The last bundle applied is kept as JSON (PEM texts and the sequence),
//! written atomically ([`write_atomically`]: temp file, fsync, rename, fsync of the
//! directory), so the edge can start and keep relaying while the control plane is away.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use molt_protocol::cert::{CertError, Certificate, RevocationList, Revocations, TrustAnchors};
use serde::{Deserialize, Serialize};

/// Most org CAs (and so CRLs) one bundle may carry.
pub const BUNDLE_ORG_CAS_MAX: usize = 10_000;
/// Most roots one bundle may carry.
pub const BUNDLE_ROOTS_MAX: usize = 16;
/// Largest bundle cache file read at start.
pub const BUNDLE_CACHE_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// A checked trust bundle.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub sequence: u64,
    pub roots: Vec<Certificate>,
    pub org_cas: Vec<Certificate>,
    pub crls: Vec<RevocationList>,
}

/// What to do with an offered bundle, given the sequence held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Newer: replace what is held.
    Apply,
    /// The one held: nothing to do.
    Same,
    /// Older than what is held: refuse and log.
    Rollback,
}

/// Whether a bundle numbered `offered` replaces the one numbered `held` (none held yet:
/// any bundle applies).
pub fn decide(held: Option<u64>, offered: u64) -> Decision {
    match held {
        None => Decision::Apply,
        Some(held) if offered > held => Decision::Apply,
        Some(held) if offered == held => Decision::Same,
        Some(_) => Decision::Rollback,
    }
}

/// Why a bundle (streamed or cached) was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("invalid trust bundle: it has no root")]
    NoRoot,
    #[error("invalid trust bundle: {count} {what} is more than the {max} allowed")]
    TooMany { what: &'static str, count: usize, max: usize },
    #[error("invalid trust bundle: {what} {index}: {source}")]
    Certificate { what: &'static str, index: usize, source: CertError },
    #[error("invalid trust bundle: {} CRLs for {} org CAs", crls, org_cas)]
    CrlCount { crls: usize, org_cas: usize },
    #[error("invalid trust bundle: the CRL of org CA {index} does not verify: {source}")]
    Crl { index: usize, source: CertError },
    #[error("failed to read the trust bundle cache {}", path.display())]
    ReadCache { path: PathBuf, source: std::io::Error },
    #[error("the trust bundle cache {} is larger than {BUNDLE_CACHE_BYTES_MAX} bytes", path.display())]
    CacheTooLarge { path: PathBuf },
    #[error("the trust bundle cache {} is not valid: {detail}", path.display())]
    CacheFormat { path: PathBuf, detail: String },
}

impl Bundle {
    /// Checks an update given as DER (the gRPC `TrustUpdate`).
    pub fn from_der(
        sequence: u64,
        roots: &[Vec<u8>],
        org_cas: &[Vec<u8>],
        crls: &[Vec<u8>],
    ) -> Result<Bundle, BundleError> {
        if roots.len() > BUNDLE_ROOTS_MAX {
            return Err(BundleError::TooMany { what: "roots", count: roots.len(), max: BUNDLE_ROOTS_MAX });
        }
        if org_cas.len() > BUNDLE_ORG_CAS_MAX {
            return Err(BundleError::TooMany { what: "org CAs", count: org_cas.len(), max: BUNDLE_ORG_CAS_MAX });
        }
        let parse = |what: &'static str, ders: &[Vec<u8>]| {
            ders.iter()
                .enumerate()
                .map(|(index, der)| {
                    Certificate::from_der(der).map_err(|source| BundleError::Certificate { what, index, source })
                })
                .collect::<Result<Vec<Certificate>, BundleError>>()
        };
        let roots = parse("root", roots)?;
        let org_cas = parse("org CA", org_cas)?;
        if roots.is_empty() {
            return Err(BundleError::NoRoot);
        }
        TrustAnchors::new(roots.clone()).map_err(|source| BundleError::Certificate {
            what: "root",
            index: 0,
            source,
        })?;
        if crls.len() != org_cas.len() {
            return Err(BundleError::CrlCount { crls: crls.len(), org_cas: org_cas.len() });
        }
        let crls = crls
            .iter()
            .zip(&org_cas)
            .enumerate()
            .map(|(index, (der, issuer))| {
                RevocationList::from_der_verified(der, issuer).map_err(|source| BundleError::Crl { index, source })
            })
            .collect::<Result<Vec<RevocationList>, BundleError>>()?;
        Ok(Bundle { sequence, roots, org_cas, crls })
    }

    /// Every serial the bundle's CRLs revoke.
    pub fn revocations(&self) -> Revocations {
        let mut revocations = Revocations::default();
        for crl in &self.crls {
            revocations.extend_from(crl);
        }
        revocations
    }

    /// Reads a cached bundle, checking it as a streamed one.
    pub fn read_cache(path: &Path) -> Result<Bundle, BundleError> {
        let read = |source| BundleError::ReadCache { path: path.to_owned(), source };
        let length = std::fs::metadata(path).map_err(read)?.len();
        if length > BUNDLE_CACHE_BYTES_MAX {
            return Err(BundleError::CacheTooLarge { path: path.to_owned() });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let format = |detail: String| BundleError::CacheFormat { path: path.to_owned(), detail };
        let cached: CachedBundle = serde_json::from_str(&text).map_err(|error| format(error.to_string()))?;
        let ders = |pems: &[String], label: &str| {
            pems.iter()
                .map(|pem| molt_protocol::cert::pem_decode(label, pem).map_err(|error| format(error.to_string())))
                .collect::<Result<Vec<Vec<u8>>, BundleError>>()
        };
        Bundle::from_der(
            cached.sequence,
            &ders(&cached.roots, "CERTIFICATE")?,
            &ders(&cached.org_cas, "CERTIFICATE")?,
            &ders(&cached.crls, "X509 CRL")?,
        )
    }

    /// Writes the bundle to `path` atomically.
    pub fn write_cache(&self, path: &Path) -> std::io::Result<()> {
        write_atomically(path, &self.to_cache_json()?, 0o644)
    }

    /// The bundle as the cache file holds it.
    pub fn to_cache_json(&self) -> std::io::Result<Vec<u8>> {
        let cached = CachedBundle {
            sequence: self.sequence,
            roots: self.roots.iter().map(Certificate::to_pem).collect(),
            org_cas: self.org_cas.iter().map(Certificate::to_pem).collect(),
            crls: self.crls.iter().map(RevocationList::to_pem).collect(),
        };
        serde_json::to_vec_pretty(&cached).map_err(std::io::Error::other)
    }
}

/// The cache file's shape.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CachedBundle {
    sequence: u64,
    roots: Vec<String>,
    org_cas: Vec<String>,
    crls: Vec<String>,
}

/// Replaces `path` with `bytes` so that a reader (or a crash) sees the old file or the
/// new one, never a mix: a temp file beside it, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let directory = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp = directory.join(temp_name);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(directory)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use molt_protocol::UnixMillis;
    use molt_protocol::cert::{Serial, Validity, issue_org_ca, issue_root};
    use molt_protocol::keys::SigningKey;

    struct Pki {
        root: Certificate,
        org: Certificate,
        org_key: SigningKey,
    }

    fn pki() -> Pki {
        let now = UnixMillis::now_from_system();
        let validity = Validity { not_before: UnixMillis(now.0 - 60_000), not_after: UnixMillis(now.0 + 86_400_000) };
        let root_key = SigningKey::from_bytes(&[1; 32]);
        let root = issue_root(&root_key, "root", validity, Serial([1; 16])).unwrap();
        let org_key = SigningKey::from_bytes(&[2; 32]);
        let org = issue_org_ca(&root, &root_key, &org_key.public_key(), "org", validity, Serial([2; 16])).unwrap();
        Pki { root, org, org_key }
    }

    fn crl(pki: &Pki, number: u64, revoked: &[Serial]) -> Vec<u8> {
        let now = UnixMillis::now_from_system();
        RevocationList::issue(&pki.org, &pki.org_key, number, now, UnixMillis(now.0 + 60_000), revoked)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn older_bundles_are_rollbacks_and_the_same_one_is_ignored() {
        assert_eq!(decide(None, 0), Decision::Apply);
        assert_eq!(decide(Some(4), 5), Decision::Apply);
        assert_eq!(decide(Some(5), 5), Decision::Same);
        assert_eq!(decide(Some(5), 4), Decision::Rollback);
        assert_eq!(decide(Some(u64::MAX), 0), Decision::Rollback);
    }

    #[test]
    fn a_checked_bundle_round_trips_through_the_cache() {
        let pki = pki();
        let bundle = Bundle::from_der(
            7,
            &[pki.root.der().to_vec()],
            &[pki.org.der().to_vec()],
            &[crl(&pki, 3, &[Serial([9; 16])])],
        )
        .unwrap();
        assert!(bundle.revocations().contains(Serial([9; 16])));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.json");
        bundle.write_cache(&path).unwrap();
        let read = Bundle::read_cache(&path).unwrap();
        assert_eq!(read.sequence, 7);
        assert_eq!(read.revocations(), bundle.revocations());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file is left behind");
    }

    #[test]
    fn forged_malformed_and_mismatched_bundles_are_refused() {
        let pki = pki();
        let root = pki.root.der().to_vec();
        let org = pki.org.der().to_vec();
        let good_crl = crl(&pki, 1, &[]);
        assert!(matches!(Bundle::from_der(1, &[], &[], &[]), Err(BundleError::NoRoot)));
        assert!(matches!(
            Bundle::from_der(1, &[vec![0x30, 0x01]], &[], &[]),
            Err(BundleError::Certificate { what: "root", .. })
        ));
        // An org CA is not a root.
        assert!(matches!(
            Bundle::from_der(1, std::slice::from_ref(&org), &[], &[]),
            Err(BundleError::Certificate { .. })
        ));
        assert!(matches!(
            Bundle::from_der(1, std::slice::from_ref(&root), std::slice::from_ref(&org), &[]),
            Err(BundleError::CrlCount { crls: 0, org_cas: 1 })
        ));
        // A CRL signed by another key does not verify against the org CA.
        let other_key = SigningKey::from_bytes(&[3; 32]);
        let root_key = SigningKey::from_bytes(&[1; 32]);
        let validity = pki.org.validity();
        let impostor =
            issue_org_ca(&pki.root, &root_key, &other_key.public_key(), "org", validity, Serial([4; 16])).unwrap();
        let forged = crl(&Pki { root: pki.root.clone(), org: impostor, org_key: other_key }, 1, &[]);
        assert!(matches!(
            Bundle::from_der(1, std::slice::from_ref(&root), std::slice::from_ref(&org), &[forged]),
            Err(BundleError::Crl { index: 0, .. })
        ));
        let too_many = vec![root.clone(); BUNDLE_ROOTS_MAX + 1];
        assert!(matches!(Bundle::from_der(1, &too_many, &[], &[]), Err(BundleError::TooMany { what: "roots", .. })));
        let too_many = vec![org.clone(); BUNDLE_ORG_CAS_MAX + 1];
        assert!(matches!(
            Bundle::from_der(1, std::slice::from_ref(&root), &too_many, &[]),
            Err(BundleError::TooMany { what: "org CAs", .. })
        ));
        Bundle::from_der(1, &[root], &[org], &[good_crl]).unwrap();
    }

    #[test]
    fn a_damaged_cache_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.json");
        std::fs::write(&path, "{\"sequence\": 1}").unwrap();
        assert!(matches!(Bundle::read_cache(&path), Err(BundleError::CacheFormat { .. })));
        assert!(matches!(Bundle::read_cache(&dir.path().join("absent")), Err(BundleError::ReadCache { .. })));
        let huge = std::fs::File::create(&path).unwrap();
        huge.set_len(BUNDLE_CACHE_BYTES_MAX + 1).unwrap();
        assert!(matches!(Bundle::read_cache(&path), Err(BundleError::CacheTooLarge { .. })));
    }
}
