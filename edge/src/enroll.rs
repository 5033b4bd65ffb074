//! `molt-edge enroll`: turns an enrollment token into a ready edge directory.
//!
//! It asks the control plane which org and region the token enrolls into, generates the
//! edge's Ed25519 key (PKCS#8, mode 0600), proves possession of it, and posts both to
//! `POST /v1/edges/enroll`. The answer (certificate chain and trust bundle) is written
//! beside the key with a config stub whose `[control_plane]` section points at the
//! control plane's gRPC service. Every file is written atomically. A directory that
//! already holds an edge certificate is refused unless `force` is set; a key already
//! there (from an enrollment that failed later) is reused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use molt_protocol::cert::Certificate;
use molt_protocol::keys::SigningKey;
use molt_protocol::request::{EDGE_PROOF_DOMAIN, possession_message};
use molt_protocol::{EdgeId, UnixMillis};
use serde::Deserialize;

use crate::trust::{Bundle, write_atomically};

/// File names inside the enrollment directory.
pub const KEY_FILE: &str = "edge.key";
pub const CHAIN_FILE: &str = "edge.pem";
pub const ANCHORS_FILE: &str = "trust-anchors.pem";
pub const BUNDLE_FILE: &str = "trust-bundle.json";
pub const CONFIG_FILE: &str = "edge.toml";
/// Longest wait for one request to the control plane.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What `molt-edge enroll` was asked to do.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// Base URL of the control plane's HTTP API, e.g. `https://cp.example:8080`.
    pub control_plane: String,
    /// The enrollment token.
    pub token: String,
    /// The control plane's gRPC address, written into the config stub.
    pub grpc_addr: SocketAddr,
    pub dir: PathBuf,
    pub force: bool,
}

/// The enrolled edge.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub edge_id: EdgeId,
    pub org_id: String,
    pub region: String,
    pub config: PathBuf,
}

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    #[error("{} already holds an edge certificate; pass --force to replace that identity", dir.display())]
    IdentityExists { dir: PathBuf },
    #[error("failed to reach the control plane at {url}: {detail}")]
    Http { url: String, detail: String },
    #[error("the control plane refused the enrollment ({status} {code}): {detail}")]
    Refused { status: u16, code: String, detail: String },
    #[error("the control plane's answer is not usable: {0}")]
    Answer(String),
    #[error("failed to write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("failed to read the existing key {}: {detail}", path.display())]
    ExistingKey { path: PathBuf, detail: String },
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
    let path = |name: &str| options.dir.join(name);
    if path(CHAIN_FILE).exists() && !options.force {
        return Err(EnrollError::IdentityExists { dir: options.dir.clone() });
    }
    std::fs::create_dir_all(&options.dir).map_err(|source| EnrollError::Write { path: options.dir.clone(), source })?;
    let key = existing_or_new_key(&path(KEY_FILE), options.force)?;

    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|error| EnrollError::Http { url: options.control_plane.clone(), detail: error.to_string() })?;
    let base = options.control_plane.trim_end_matches('/');
    let org: OrgAnswer =
        post(&client, &format!("{base}/v1/edges/enroll/org"), &serde_json::json!({ "token": options.token })).await?;
    let public_key = key.public_key();
    let now = UnixMillis::now_from_system();
    let signature = key.sign(&possession_message(EDGE_PROOF_DOMAIN, &org.org_id, &public_key, now));
    let body = serde_json::json!({
        "token": options.token,
        "public_key": hex(public_key.as_bytes()),
        "timestamp_ms": now.0,
        "signature": hex(&signature.0),
    });
    let enrolled: EnrolledAnswer = post(&client, &format!("{base}/v1/edges/enroll"), &body).await?;

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
    let write = |name: &str, bytes: &[u8], mode: u32| {
        write_atomically(&path(name), bytes, mode).map_err(|source| EnrollError::Write { path: path(name), source })
    };
    write(CHAIN_FILE, enrolled.chain_pem.as_bytes(), 0o644)?;
    let anchors: String = bundle.roots.iter().map(Certificate::to_pem).collect();
    write(ANCHORS_FILE, anchors.as_bytes(), 0o644)?;
    bundle.write_cache(&path(BUNDLE_FILE)).map_err(|source| EnrollError::Write { path: path(BUNDLE_FILE), source })?;
    write(CONFIG_FILE, config_stub(&org.region, options.grpc_addr).as_bytes(), 0o644)?;
    Ok(Enrolled { edge_id, org_id: org.org_id, region: org.region, config: path(CONFIG_FILE) })
}

/// The key already in the directory (kept, so a retried enrollment keeps its id), or a
/// new one written with mode 0600. With `force`, always a new one.
fn existing_or_new_key(path: &Path, force: bool) -> Result<SigningKey, EnrollError> {
    if path.exists() && !force {
        let text = std::fs::read_to_string(path)
            .map_err(|error| EnrollError::ExistingKey { path: path.to_owned(), detail: error.to_string() })?;
        return SigningKey::from_pkcs8_pem(&text)
            .map_err(|error| EnrollError::ExistingKey { path: path.to_owned(), detail: error.to_string() });
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    write_atomically(path, key.to_pkcs8_pem().as_bytes(), 0o600)
        .map_err(|source| EnrollError::Write { path: path.to_owned(), source })?;
    Ok(key)
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
    let http = |error: reqwest::Error| EnrollError::Http { url: url.to_owned(), detail: error.to_string() };
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

/// The config file written beside the enrolled identity.
pub fn config_stub(region: &str, grpc_addr: SocketAddr) -> String {
    format!(
        "# Written by `molt-edge enroll`. Every other key has its default: see\n\
         # `molt-edge config reference`.\n\n\
         [edge]\nregion = \"{region}\"\ndata_dir = \"data\"\n\n\
         [identity]\ncertificate_chain = \"{CHAIN_FILE}\"\nprivate_key = \"{KEY_FILE}\"\n\n\
         [trust]\nanchors = \"{ANCHORS_FILE}\"\n\n\
         [control_plane]\ngrpc_addr = \"{grpc_addr}\"\ntrust_anchor = \"{ANCHORS_FILE}\"\nbundle_cache = \"{BUNDLE_FILE}\"\n"
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn an_existing_identity_is_not_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CHAIN_FILE), "existing").unwrap();
        let options = EnrollOptions {
            control_plane: "http://127.0.0.1:1".into(),
            token: "molt_enroll_x".into(),
            grpc_addr: "127.0.0.1:1".parse().unwrap(),
            dir: dir.path().to_owned(),
            force: false,
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let error = runtime.block_on(enroll(&options)).unwrap_err();
        assert!(matches!(error, EnrollError::IdentityExists { .. }), "{error}");
        assert_eq!(std::fs::read_to_string(dir.path().join(CHAIN_FILE)).unwrap(), "existing");
        assert!(!dir.path().join(KEY_FILE).exists());
    }

    #[test]
    fn a_new_key_file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let key = existing_or_new_key(&path, false).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let again = existing_or_new_key(&path, false).unwrap();
        assert_eq!(again.public_key(), key.public_key(), "a retried enrollment keeps its key");
    }
}
