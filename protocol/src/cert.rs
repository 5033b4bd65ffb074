//! X.509 certificates of the Molt PKI, their chains and their revocation lists.
//!
//! The model: an offline **root** CA signs **org** CAs; an org CA signs the **leaf**
//! certificates of agents and edges. Every key is Ed25519 and every certificate is a
//! standard X.509 v3 certificate, so rustls does mutual TLS with them and `openssl` reads
//! them. A leaf names its owner twice, as the URI SAN `molt://agent-…` (or
//! `molt://edge-…`), which is authoritative, and as its subject common name, for humans.
//! An edge leaf also carries the DNS names agents reach it by.
//!
//! Issuing goes through [`Signer`], so the root and org keys may live in an HSM. Parsing
//! ([`Certificate::from_der`]) checks structure only; trust comes from [`verify_chain`],
//! which walks a presented chain up to one of the [`TrustAnchors`] and checks signatures,
//! names, validity at the caller's `now`, CA constraints, key usage, the leaf's role and
//! the [`Revocations`] collected from verified [`RevocationList`]s.
//!
//! Nothing here reads a clock: issuing and verifying take times as [`UnixMillis`].
//! Certificates hold whole seconds, so issuing rounds a requested validity inwards.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use rand_core::{CryptoRng, RngCore};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
use x509_parser::oid_registry::OID_SIG_ED25519;
use x509_parser::time::ASN1Time;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo, X509Name, X509Version};

use crate::ids::{AgentId, EdgeId};
use crate::keys::{KeyError, PublicKey, SignError, Signature, Signer};
use crate::time::UnixMillis;

/// Longest certificate path, counting the leaf and the root: leaf → org CA → root.
pub const MAX_CHAIN_DEPTH: usize = 3;
/// Largest DER certificate accepted from the network.
pub const MAX_CERT_DER_BYTES: usize = 16 * 1024;
/// Largest DER CRL accepted (about 200 000 revoked serials).
pub const MAX_CRL_DER_BYTES: usize = 8 * 1024 * 1024;
/// Most DNS names an edge certificate may carry.
pub const MAX_DNS_NAMES: usize = 32;
/// Longest subject common name (X.520 `ub-common-name`).
pub const MAX_COMMON_NAME_BYTES: usize = 64;
/// Scheme of the URI SAN that names an agent or an edge.
pub const MOLT_URI_SCHEME: &str = "molt://";

/// The root may sign CAs that sign leaves (one intermediate level).
const ROOT_PATH_LEN: u8 = 1;
/// An org CA signs leaves only.
const ORG_CA_PATH_LEN: u8 = 0;
const SERIAL_LEN: usize = 16;

// A path is the leaf, at most `ROOT_PATH_LEN` intermediates and the root.
const _: () = assert!(ROOT_PATH_LEN as usize + 2 == MAX_CHAIN_DEPTH);
const _: () = assert!(ORG_CA_PATH_LEN < ROOT_PATH_LEN);
const _: () = assert!(MAX_CERT_DER_BYTES < MAX_CRL_DER_BYTES);

/// Why a certificate, a CRL or a set of trust anchors could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("reading X.509: input is not well-formed DER")]
    NotDer,
    #[error("reading X.509: input is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("reading X.509: {0}")]
    Malformed(&'static str),
    #[error("reading X.509: unsupported version")]
    UnsupportedVersion,
    #[error("reading X.509: key or signature algorithm is not Ed25519")]
    NotEd25519,
    #[error("reading certificate: {0}")]
    InvalidPublicKey(KeyError),
    #[error("reading X.509: serial number is negative or longer than {SERIAL_LEN} bytes")]
    BadSerial,
    #[error("reading certificate: leaf has no `molt://` uri naming an agent or an edge")]
    MissingRole,
    #[error("reading certificate: {0}")]
    InvalidRole(&'static str),
    #[error("reading X.509: unsupported critical extension {0}")]
    UnsupportedCriticalExtension(String),
    #[error("reading X.509: signature does not verify against the issuer")]
    BadSignature,
    #[error("reading crl: not issued by the given certificate")]
    IssuerMismatch,
    #[error("reading crl: issuer is not a CA allowed to sign crls")]
    NotCrlSigner,
    #[error("loading trust anchors: not a self-signed root CA certificate")]
    NotRoot,
    #[error("loading trust anchors: no root certificate given")]
    NoTrustAnchors,
    #[error("reading pem: {0}")]
    Pem(#[from] PemError),
}

/// Why a certificate or CRL could not be issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    #[error("issuing: {0}")]
    Sign(#[from] SignError),
    #[error("issuing: encoding failed: {0}")]
    Rcgen(String),
    #[error("issuing: invalid request: {0}")]
    InvalidRequest(&'static str),
    #[error("issuing: signer key does not match the issuer certificate")]
    SignerKeyMismatch,
    #[error("issuing: produced output does not read back: {0}")]
    BadOutput(CertError),
}

/// Why a presented certificate chain is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    #[error("verifying chain: no certificate presented")]
    Empty,
    #[error("verifying chain: longer than {MAX_CHAIN_DEPTH} certificates including the root")]
    TooDeep,
    #[error("verifying chain: {0}")]
    Parse(CertError),
    #[error("verifying chain: issuer is not in the chain nor a trust anchor")]
    UnknownIssuer,
    #[error("verifying chain: signature of certificate at depth {depth} does not verify")]
    BadSignature { depth: usize },
    #[error("verifying chain: certificate at depth {depth} has expired")]
    Expired { depth: usize },
    #[error("verifying chain: certificate at depth {depth} is not valid yet")]
    NotYetValid { depth: usize },
    #[error("verifying chain: issuer at depth {depth} is not a CA")]
    NotCa { depth: usize },
    #[error("verifying chain: path length constraint of CA at depth {depth} exceeded")]
    PathLenExceeded { depth: usize },
    #[error("verifying chain: key usage of certificate at depth {depth} does not allow this use")]
    KeyUsage { depth: usize },
    #[error("verifying chain: leaf has role {found:?}, expected {expected:?}")]
    WrongRole { expected: ExpectedRole, found: Role },
    #[error("verifying chain: certificate {0} is revoked")]
    Revoked(Serial),
}

/// Why PEM text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    #[error("no `{0}` PEM block found")]
    Missing(String),
    #[error("PEM block is not valid base64")]
    BadBase64,
}

/// Why a serial number's text form was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("serial number must be {} hexadecimal digits", SERIAL_LEN * 2)]
pub struct SerialParseError;

/// A certificate serial number: 16 bytes, a positive DER INTEGER when issued here.
/// Revocation is by serial.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(pub [u8; SERIAL_LEN]);

impl Serial {
    /// A random nonzero serial with the top bit cleared, so its INTEGER is positive.
    pub fn random<R: RngCore + CryptoRng>(rng: &mut R) -> Serial {
        loop {
            let mut bytes = [0u8; SERIAL_LEN];
            rng.fill_bytes(&mut bytes);
            bytes[0] &= 0x7f;
            if bytes != [0u8; SERIAL_LEN] {
                return Serial(bytes);
            }
        }
    }

    /// From the content octets of a DER INTEGER.
    fn from_integer_content(content: &[u8]) -> Result<Serial, CertError> {
        if content.first().is_none_or(|first| first & 0x80 != 0) {
            return Err(CertError::BadSerial);
        }
        let leading_zeros = content.iter().take_while(|byte| **byte == 0).count();
        let significant = &content[leading_zeros..];
        if significant.len() > SERIAL_LEN {
            return Err(CertError::BadSerial);
        }
        let mut bytes = [0u8; SERIAL_LEN];
        bytes[SERIAL_LEN - significant.len()..].copy_from_slice(significant);
        Ok(Serial(bytes))
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

impl FromStr for Serial {
    type Err = SerialParseError;
    fn from_str(text: &str) -> Result<Serial, SerialParseError> {
        if text.len() != SERIAL_LEN * 2 {
            return Err(SerialParseError);
        }
        let bytes = data_encoding::HEXLOWER_PERMISSIVE.decode(text.as_bytes()).map_err(|_| SerialParseError)?;
        bytes.try_into().map(Serial).map_err(|_| SerialParseError)
    }
}

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Self-issued CA: a trust anchor.
    Root,
    /// CA signed by the root; signs leaves.
    OrgCa,
    Agent(AgentId),
    Edge(EdgeId),
}

/// The role a verifier requires of a chain's leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpectedRole {
    AnyAgent,
    AnyEdge,
    Agent(AgentId),
    Edge(EdgeId),
}

impl ExpectedRole {
    pub fn matches(self, role: Role) -> bool {
        match (self, role) {
            (ExpectedRole::AnyAgent, Role::Agent(_)) | (ExpectedRole::AnyEdge, Role::Edge(_)) => true,
            (ExpectedRole::Agent(expected), Role::Agent(found)) => expected == found,
            (ExpectedRole::Edge(expected), Role::Edge(found)) => expected == found,
            _ => false,
        }
    }
}

/// When a certificate is valid, both ends inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Validity {
    pub not_before: UnixMillis,
    pub not_after: UnixMillis,
}

impl Validity {
    pub fn contains(&self, at: UnixMillis) -> bool {
        self.not_before <= at && at <= self.not_after
    }
}

/// A parsed Ed25519 X.509 certificate. Parsing does not make it trusted: see
/// [`verify_chain`].
#[derive(Clone)]
pub struct Certificate {
    der: Vec<u8>,
    /// The signed part (TBSCertificate) and its signature.
    tbs: Vec<u8>,
    signature: Signature,
    serial: Serial,
    role: Role,
    public_key: PublicKey,
    validity: Validity,
    common_name: String,
    /// Raw DER names, compared byte for byte when chaining.
    issuer_name: Vec<u8>,
    subject_name: Vec<u8>,
    extensions: CertExtensions,
}

impl Certificate {
    /// Parses `der`, checks that key and signature are Ed25519 and extracts the role.
    /// Does not verify the signature or the chain.
    pub fn from_der(der: &[u8]) -> Result<Certificate, CertError> {
        if der.len() > MAX_CERT_DER_BYTES {
            return Err(CertError::TooLarge { max: MAX_CERT_DER_BYTES });
        }
        let (rest, x509) = x509_parser::parse_x509_certificate(der).map_err(|_| CertError::NotDer)?;
        if !rest.is_empty() {
            return Err(CertError::Malformed("trailing bytes after the certificate"));
        }
        if x509.version() != X509Version::V3 {
            return Err(CertError::UnsupportedVersion);
        }
        let tbs = &x509.tbs_certificate;
        let signature = ed25519_signature(&x509.signature_algorithm, &tbs.signature, &x509.signature_value)?;
        let public_key = ed25519_public_key(tbs.public_key())?;
        let serial = Serial::from_integer_content(tbs.raw_serial())?;
        let validity = Validity {
            not_before: unix_millis(&tbs.validity().not_before)?,
            not_after: unix_millis(&tbs.validity().not_after)?,
        };
        let extensions = CertExtensions::parse(tbs.extensions())?;
        let common_name = common_name(tbs.subject())?;
        let self_issued = tbs.subject().as_raw() == tbs.issuer().as_raw();
        let role = extensions.role(&common_name, self_issued)?;
        Ok(Certificate {
            der: der.to_vec(),
            tbs: tbs.as_ref().to_vec(),
            signature,
            serial,
            role,
            public_key,
            validity,
            common_name,
            issuer_name: tbs.issuer().as_raw().to_vec(),
            subject_name: tbs.subject().as_raw().to_vec(),
            extensions,
        })
    }

    /// Reads the first `CERTIFICATE` block.
    pub fn from_pem(pem: &str) -> Result<Certificate, CertError> {
        Certificate::from_der(&pem_decode("CERTIFICATE", pem)?)
    }

    /// Reads every `CERTIFICATE` block, in order.
    pub fn chain_from_pem(pem: &str) -> Result<Vec<Certificate>, CertError> {
        pem_decode_all("CERTIFICATE", pem)?.iter().map(|der| Certificate::from_der(der)).collect()
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub fn to_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }

    pub fn serial(&self) -> Serial {
        self.serial
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    pub fn validity(&self) -> Validity {
        self.validity
    }

    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    pub fn is_ca(&self) -> bool {
        self.extensions.is_ca
    }

    /// The basicConstraints path length of a CA; `None` when unconstrained or not a CA.
    pub fn path_len(&self) -> Option<u32> {
        if self.extensions.is_ca { self.extensions.path_len } else { None }
    }

    /// DNS SANs (edge certificates).
    pub fn dns_names(&self) -> &[String] {
        &self.extensions.dns_names
    }

    fn is_self_issued(&self) -> bool {
        self.issuer_name == self.subject_name
    }

    fn verify_signed_by(&self, issuer_key: &PublicKey) -> Result<(), KeyError> {
        issuer_key.verify(&self.tbs, &self.signature)
    }

    /// Whether `issuer`'s subject (and key identifier, when both are present) names this
    /// certificate's issuer.
    fn names_as_issuer(&self, issuer: &Certificate) -> bool {
        let key_ids_agree = match (&self.extensions.authority_key_id, &issuer.extensions.subject_key_id) {
            (Some(authority), Some(subject)) => authority == subject,
            _ => true,
        };
        self.issuer_name == issuer.subject_name && key_ids_agree
    }
}

impl PartialEq for Certificate {
    fn eq(&self, other: &Certificate) -> bool {
        self.der == other.der
    }
}

impl Eq for Certificate {}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("serial", &self.serial)
            .field("role", &self.role)
            .field("common_name", &self.common_name)
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

/// Self-signed root: CA, basicConstraints pathlen 1, keyUsage keyCertSign+cRLSign.
pub fn issue_root(
    signer: &dyn Signer,
    common_name: &str,
    validity: Validity,
    serial: Serial,
) -> Result<Certificate, IssueError> {
    let mut params = base_params(common_name, validity, serial)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(ROOT_PATH_LEN));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = RcgenSigner::new(signer);
    let issued = params.self_signed(&key);
    let certificate = key.read_back(issued.map(|certificate| certificate.der().to_vec()))?;
    certificate.verify_signed_by(&key.public_key).map_err(|_| IssueError::BadOutput(CertError::BadSignature))?;
    Ok(certificate)
}

/// Org CA signed by the root: CA, pathlen 0, keyCertSign+cRLSign.
pub fn issue_org_ca(
    issuer: &Certificate,
    issuer_signer: &dyn Signer,
    subject_key: &PublicKey,
    common_name: &str,
    validity: Validity,
    serial: Serial,
) -> Result<Certificate, IssueError> {
    if !issuer.is_ca() {
        return Err(IssueError::InvalidRequest("issuer is not a CA"));
    }
    if issuer.role() != Role::Root {
        return Err(IssueError::InvalidRequest("org CAs are issued by the root"));
    }
    let mut params = base_params(common_name, validity, serial)?;
    ensure_within_issuer(issuer, &params)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(ORG_CA_PATH_LEN));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    sign_certificate(&params, subject_key, issuer, issuer_signer)
}

/// Leaf signed by an org CA: not CA, keyUsage digitalSignature, EKU clientAuth (agent) or
/// serverAuth+clientAuth (edge). The id is the URI SAN `molt://<id>` and the subject CN;
/// an edge certificate also carries `dns_names` (an agent's SNI is one of them).
pub fn issue_leaf(
    issuer: &Certificate,
    issuer_signer: &dyn Signer,
    subject_key: &PublicKey,
    role: Role,
    dns_names: &[String],
    validity: Validity,
    serial: Serial,
) -> Result<Certificate, IssueError> {
    if !issuer.is_ca() {
        return Err(IssueError::InvalidRequest("issuer is not a CA"));
    }
    if issuer.role() != Role::OrgCa {
        return Err(IssueError::InvalidRequest("leaves are issued by an org CA"));
    }
    let (id_text, extended_key_usages) = match role {
        Role::Agent(_) if !dns_names.is_empty() => {
            return Err(IssueError::InvalidRequest("agent certificates carry no dns names"));
        }
        Role::Agent(id) => (id.to_string(), vec![ExtendedKeyUsagePurpose::ClientAuth]),
        Role::Edge(id) => {
            (id.to_string(), vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth])
        }
        Role::Root | Role::OrgCa => {
            return Err(IssueError::InvalidRequest("leaves are agent or edge certificates"));
        }
    };
    let mut params = base_params(&id_text, validity, serial)?;
    ensure_within_issuer(issuer, &params)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = extended_key_usages;
    params.subject_alt_names = leaf_subject_alt_names(&id_text, dns_names)?;
    sign_certificate(&params, subject_key, issuer, issuer_signer)
}

/// Root certificates a verifier trusts.
#[derive(Clone, Debug)]
pub struct TrustAnchors {
    roots: Vec<Certificate>,
}

impl TrustAnchors {
    /// Each certificate must be a self-issued root CA with keyCertSign whose
    /// self-signature verifies.
    pub fn new(roots: Vec<Certificate>) -> Result<TrustAnchors, CertError> {
        if roots.is_empty() {
            return Err(CertError::NoTrustAnchors);
        }
        for root in &roots {
            if root.role() != Role::Root || !root.extensions.usage.key_cert_sign {
                return Err(CertError::NotRoot);
            }
            root.verify_signed_by(&root.public_key()).map_err(|_| CertError::BadSignature)?;
        }
        Ok(TrustAnchors { roots })
    }

    pub fn from_pem(pem: &str) -> Result<TrustAnchors, CertError> {
        TrustAnchors::new(Certificate::chain_from_pem(pem)?)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Certificate> {
        self.roots.iter()
    }

    fn contains(&self, certificate: &Certificate) -> bool {
        self.roots.iter().any(|root| root == certificate)
    }
}

/// A verified X.509 v2 CRL: the serials a CA has revoked.
#[derive(Clone)]
pub struct RevocationList {
    der: Vec<u8>,
    issuer_common_name: String,
    crl_number: u64,
    this_update: UnixMillis,
    next_update: UnixMillis,
    revoked: BTreeSet<Serial>,
}

impl RevocationList {
    /// X.509 CRL (v2) signed by a CA (root or org CA); `crl_number` is a sequence number
    /// that only grows.
    pub fn issue(
        issuer: &Certificate,
        issuer_signer: &dyn Signer,
        crl_number: u64,
        this_update: UnixMillis,
        next_update: UnixMillis,
        revoked: &[Serial],
    ) -> Result<RevocationList, IssueError> {
        if !issuer.is_ca() || !issuer.extensions.usage.crl_sign {
            return Err(IssueError::InvalidRequest("issuer is not a CA allowed to sign crls"));
        }
        let this_update_secs = this_update.as_secs();
        let next_update_secs = next_update.as_secs();
        if next_update_secs <= this_update_secs {
            return Err(IssueError::InvalidRequest("next update is not after this update"));
        }
        let revocation_time = offset_date_time(this_update_secs)?;
        let distinct: BTreeSet<Serial> = revoked.iter().copied().collect();
        let params = CertificateRevocationListParams {
            this_update: revocation_time,
            next_update: offset_date_time(next_update_secs)?,
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: distinct
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial.0),
                    revocation_time,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: issuer_key_id_method(issuer),
        };
        let key = RcgenSigner::for_issuer(issuer, issuer_signer)?;
        let rcgen_issuer = rcgen::Issuer::new(issuer_params(issuer), &key);
        let der = match params.signed_by(&rcgen_issuer) {
            Ok(crl) => crl.der().to_vec(),
            Err(error) => return Err(key.failure(error)),
        };
        RevocationList::from_der_verified(&der, issuer).map_err(IssueError::BadOutput)
    }

    /// Parses `der` and verifies it was signed by `issuer`: issuer name and key
    /// identifier, CA with cRLSign, Ed25519 signature over the TBS bytes.
    pub fn from_der_verified(der: &[u8], issuer: &Certificate) -> Result<RevocationList, CertError> {
        if der.len() > MAX_CRL_DER_BYTES {
            return Err(CertError::TooLarge { max: MAX_CRL_DER_BYTES });
        }
        let (rest, crl) = x509_parser::parse_x509_crl(der).map_err(|_| CertError::NotDer)?;
        if !rest.is_empty() {
            return Err(CertError::Malformed("trailing bytes after the crl"));
        }
        let tbs = &crl.tbs_cert_list;
        if tbs.version != Some(X509Version::V2) {
            return Err(CertError::UnsupportedVersion);
        }
        let signature = ed25519_signature(&crl.signature_algorithm, &tbs.signature, &crl.signature_value)?;
        if tbs.issuer.as_raw() != issuer.subject_name.as_slice() {
            return Err(CertError::IssuerMismatch);
        }
        if !issuer.is_ca() || !issuer.extensions.usage.crl_sign {
            return Err(CertError::NotCrlSigner);
        }
        issuer.public_key().verify(tbs.as_ref(), &signature).map_err(|_| CertError::BadSignature)?;
        let crl_number = crl_extensions(tbs.extensions(), issuer)?;
        let next_update = tbs.next_update.as_ref().ok_or(CertError::Malformed("crl has no next update"))?;
        let mut revoked = BTreeSet::new();
        for entry in &tbs.revoked_certificates {
            reject_unhandled_critical(entry.extensions())?;
            revoked.insert(Serial::from_integer_content(entry.raw_serial())?);
        }
        Ok(RevocationList {
            der: der.to_vec(),
            issuer_common_name: issuer.common_name().to_owned(),
            crl_number,
            this_update: unix_millis(&tbs.this_update)?,
            next_update: unix_millis(next_update)?,
            revoked,
        })
    }

    /// Reads the first `X509 CRL` block and verifies it against `issuer`.
    pub fn from_pem_verified(pem: &str, issuer: &Certificate) -> Result<RevocationList, CertError> {
        RevocationList::from_der_verified(&pem_decode("X509 CRL", pem)?, issuer)
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub fn to_pem(&self) -> String {
        pem_encode("X509 CRL", &self.der)
    }

    pub fn crl_number(&self) -> u64 {
        self.crl_number
    }

    pub fn this_update(&self) -> UnixMillis {
        self.this_update
    }

    pub fn next_update(&self) -> UnixMillis {
        self.next_update
    }

    pub fn issuer_common_name(&self) -> &str {
        &self.issuer_common_name
    }

    pub fn revoked(&self) -> &BTreeSet<Serial> {
        &self.revoked
    }
}

impl fmt::Debug for RevocationList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevocationList")
            .field("issuer", &self.issuer_common_name)
            .field("crl_number", &self.crl_number)
            .field("this_update", &self.this_update)
            .field("next_update", &self.next_update)
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

/// Every revoked serial a verifier knows of, merged from verified CRLs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revocations {
    serials: BTreeSet<Serial>,
}

impl Revocations {
    /// Returns whether the serial was new.
    pub fn insert(&mut self, serial: Serial) -> bool {
        self.serials.insert(serial)
    }

    pub fn extend_from(&mut self, list: &RevocationList) {
        self.serials.extend(list.revoked().iter().copied());
    }

    pub fn contains(&self, serial: Serial) -> bool {
        self.serials.contains(&serial)
    }

    pub fn len(&self) -> usize {
        self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }
}

/// What a verified chain says about its leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifiedCert {
    pub role: Role,
    pub public_key: PublicKey,
    pub serial: Serial,
    pub not_after: UnixMillis,
}

/// Verifies `chain` = [leaf, org CA] against `anchors` at `now`; a chain that also ends
/// with the root is accepted. Checks every Ed25519 signature up to a trust anchor, name
/// chaining, validity windows, the CA flag, path lengths and key usage, the leaf's role
/// against `expected`, and that no serial on the path is revoked.
pub fn verify_chain(
    chain: &[&[u8]],
    anchors: &TrustAnchors,
    revoked: &Revocations,
    now: UnixMillis,
    expected: ExpectedRole,
) -> Result<VerifiedCert, ChainError> {
    if chain.is_empty() {
        return Err(ChainError::Empty);
    }
    if chain.len() > MAX_CHAIN_DEPTH {
        return Err(ChainError::TooDeep);
    }
    let mut presented = chain
        .iter()
        .map(|der| Certificate::from_der(der))
        .collect::<Result<Vec<Certificate>, CertError>>()
        .map_err(ChainError::Parse)?;
    // A chain may end with the root itself; the trusted copy stands in for it.
    if presented.len() > 1 && presented.last().is_some_and(|last| anchors.contains(last)) {
        presented.pop();
    }
    if presented.len() + 1 > MAX_CHAIN_DEPTH {
        return Err(ChainError::TooDeep);
    }
    // Invariant: `presented` is not empty (the chain is not, and a lone root stays).
    let top_depth = presented.len() - 1;
    let anchor = find_anchor(&presented[top_depth], top_depth, anchors)?;
    let path: Vec<&Certificate> = presented.iter().chain(std::iter::once(anchor)).collect();
    for (depth, link) in path.windows(2).enumerate() {
        check_link(link[0], link[1], depth, &path[1..=depth])?;
    }
    for (depth, certificate) in path.iter().enumerate() {
        if now < certificate.validity.not_before {
            return Err(ChainError::NotYetValid { depth });
        }
        if now > certificate.validity.not_after {
            return Err(ChainError::Expired { depth });
        }
        if revoked.contains(certificate.serial) {
            return Err(ChainError::Revoked(certificate.serial));
        }
    }
    let leaf = path[0];
    if !expected.matches(leaf.role) {
        return Err(ChainError::WrongRole { expected, found: leaf.role });
    }
    if !leaf.extensions.usage.allows_leaf(leaf.role) {
        return Err(ChainError::KeyUsage { depth: 0 });
    }
    Ok(VerifiedCert {
        role: leaf.role,
        public_key: leaf.public_key,
        serial: leaf.serial,
        not_after: leaf.validity.not_after,
    })
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = data_encoding::BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub fn pem_decode(label: &str, text: &str) -> Result<Vec<u8>, PemError> {
    pem_decode_all(label, text)?.into_iter().next().ok_or_else(|| PemError::Missing(label.to_owned()))
}

pub fn pem_decode_all(label: &str, text: &str) -> Result<Vec<Vec<u8>>, PemError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let Some(stop) = after.find(&end) else { break };
        let body: String = after[..stop].chars().filter(|c| !c.is_whitespace()).collect();
        blocks.push(data_encoding::BASE64.decode(body.as_bytes()).map_err(|_| PemError::BadBase64)?);
        rest = &after[stop + end.len()..];
    }
    if blocks.is_empty() {
        return Err(PemError::Missing(label.to_owned()));
    }
    Ok(blocks)
}

/// The trust anchor that issued `top`, the last presented certificate.
fn find_anchor<'a>(top: &Certificate, depth: usize, anchors: &'a TrustAnchors) -> Result<&'a Certificate, ChainError> {
    let mut named = anchors.iter().filter(|anchor| top.names_as_issuer(anchor)).peekable();
    if named.peek().is_none() {
        return Err(ChainError::UnknownIssuer);
    }
    named.find(|anchor| top.verify_signed_by(&anchor.public_key).is_ok()).ok_or(ChainError::BadSignature { depth })
}

/// Checks that `issuer`, at `depth + 1`, may have issued `child` and did.
/// `intermediates` are the certificates between the leaf (excluded) and `issuer`.
fn check_link(
    child: &Certificate,
    issuer: &Certificate,
    depth: usize,
    intermediates: &[&Certificate],
) -> Result<(), ChainError> {
    let issuer_depth = depth + 1;
    if !child.names_as_issuer(issuer) {
        return Err(ChainError::UnknownIssuer);
    }
    if !issuer.is_ca() {
        return Err(ChainError::NotCa { depth: issuer_depth });
    }
    if !issuer.extensions.usage.key_cert_sign {
        return Err(ChainError::KeyUsage { depth: issuer_depth });
    }
    let below = intermediates.iter().filter(|certificate| !certificate.is_self_issued()).count();
    let below = u32::try_from(below).unwrap_or(u32::MAX);
    if issuer.path_len().is_some_and(|max| below > max) {
        return Err(ChainError::PathLenExceeded { depth: issuer_depth });
    }
    child.verify_signed_by(&issuer.public_key).map_err(|_| ChainError::BadSignature { depth })
}

/// Key usage flags read from a certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Usage {
    digital_signature: bool,
    key_cert_sign: bool,
    crl_sign: bool,
    server_auth: bool,
    client_auth: bool,
}

impl Usage {
    /// Agents authenticate as TLS clients; edges serve TLS and dial other edges.
    fn allows_leaf(&self, role: Role) -> bool {
        self.digital_signature
            && match role {
                Role::Agent(_) => self.client_auth,
                Role::Edge(_) => self.server_auth,
                Role::Root | Role::OrgCa => false,
            }
    }
}

/// The extensions this module understands.
#[derive(Clone, Debug, Default)]
struct CertExtensions {
    is_ca: bool,
    path_len: Option<u32>,
    usage: Usage,
    molt_uris: Vec<String>,
    dns_names: Vec<String>,
    subject_key_id: Option<Vec<u8>>,
    authority_key_id: Option<Vec<u8>>,
}

impl CertExtensions {
    fn parse(extensions: &[X509Extension<'_>]) -> Result<CertExtensions, CertError> {
        reject_duplicates(extensions)?;
        let mut parsed = CertExtensions::default();
        for extension in extensions {
            match extension.parsed_extension() {
                ParsedExtension::BasicConstraints(constraints) => {
                    parsed.is_ca = constraints.ca;
                    parsed.path_len = constraints.path_len_constraint;
                }
                ParsedExtension::KeyUsage(usage) => {
                    parsed.usage.digital_signature = usage.digital_signature();
                    parsed.usage.key_cert_sign = usage.key_cert_sign();
                    parsed.usage.crl_sign = usage.crl_sign();
                }
                ParsedExtension::ExtendedKeyUsage(usage) => {
                    parsed.usage.server_auth = usage.server_auth;
                    parsed.usage.client_auth = usage.client_auth;
                }
                ParsedExtension::SubjectAlternativeName(names) => {
                    for name in &names.general_names {
                        match name {
                            GeneralName::URI(uri) if uri.starts_with(MOLT_URI_SCHEME) => {
                                parsed.molt_uris.push((*uri).to_owned());
                            }
                            GeneralName::DNSName(dns) => parsed.dns_names.push((*dns).to_owned()),
                            _ => {}
                        }
                    }
                }
                ParsedExtension::SubjectKeyIdentifier(id) => parsed.subject_key_id = Some(id.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(id) => {
                    parsed.authority_key_id = id.key_identifier.as_ref().map(|id| id.0.to_vec());
                }
                _ => reject_unhandled(extension)?,
            }
        }
        Ok(parsed)
    }

    /// CAs carry no molt uri; a leaf carries exactly one, matching its common name.
    fn role(&self, common_name: &str, self_issued: bool) -> Result<Role, CertError> {
        if self.is_ca {
            if !self.molt_uris.is_empty() {
                return Err(CertError::InvalidRole("a CA certificate carries a molt uri"));
            }
            return Ok(if self_issued { Role::Root } else { Role::OrgCa });
        }
        let uri = match self.molt_uris.as_slice() {
            [] => return Err(CertError::MissingRole),
            [uri] => uri,
            _ => return Err(CertError::InvalidRole("more than one molt uri")),
        };
        let id_text = &uri[MOLT_URI_SCHEME.len()..];
        if id_text != common_name {
            return Err(CertError::InvalidRole("common name does not match the molt uri"));
        }
        if id_text.starts_with(AgentId::PREFIX) {
            let id = id_text.parse().map_err(|_| CertError::InvalidRole("molt uri has an invalid agent id"))?;
            Ok(Role::Agent(id))
        } else if id_text.starts_with(EdgeId::PREFIX) {
            let id = id_text.parse().map_err(|_| CertError::InvalidRole("molt uri has an invalid edge id"))?;
            Ok(Role::Edge(id))
        } else {
            Err(CertError::InvalidRole("molt uri names neither an agent nor an edge"))
        }
    }
}

/// Reads the CRL number and checks the authority key identifier against `issuer`.
fn crl_extensions(extensions: &[X509Extension<'_>], issuer: &Certificate) -> Result<u64, CertError> {
    reject_duplicates(extensions)?;
    let mut crl_number = None;
    for extension in extensions {
        match extension.parsed_extension() {
            ParsedExtension::CRLNumber(number) => {
                let bytes = number.to_bytes_be();
                let array: [u8; 8] = match bytes.len() {
                    0..=8 => {
                        let mut array = [0u8; 8];
                        array[8 - bytes.len()..].copy_from_slice(&bytes);
                        array
                    }
                    _ => return Err(CertError::Malformed("crl number does not fit 64 bits")),
                };
                crl_number = Some(u64::from_be_bytes(array));
            }
            ParsedExtension::AuthorityKeyIdentifier(id) => {
                let key_ids = (&id.key_identifier, &issuer.extensions.subject_key_id);
                if let (Some(authority), Some(subject)) = key_ids {
                    if authority.0 != subject.as_slice() {
                        return Err(CertError::IssuerMismatch);
                    }
                }
            }
            _ => reject_unhandled(extension)?,
        }
    }
    crl_number.ok_or(CertError::Malformed("crl has no crl number"))
}

fn reject_duplicates(extensions: &[X509Extension<'_>]) -> Result<(), CertError> {
    let mut oids: Vec<&[u8]> = extensions.iter().map(|extension| extension.oid.as_bytes()).collect();
    oids.sort_unstable();
    if oids.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(CertError::Malformed("an extension appears twice"));
    }
    Ok(())
}

fn reject_unhandled_critical(extensions: &[X509Extension<'_>]) -> Result<(), CertError> {
    extensions.iter().try_for_each(reject_unhandled)
}

/// An extension this module does not act on is refused when critical or unreadable.
fn reject_unhandled(extension: &X509Extension<'_>) -> Result<(), CertError> {
    if let ParsedExtension::ParseError { .. } = extension.parsed_extension() {
        return Err(CertError::Malformed("an extension does not parse"));
    }
    if extension.critical {
        return Err(CertError::UnsupportedCriticalExtension(extension.oid.to_id_string()));
    }
    Ok(())
}

/// Checks both algorithm fields name Ed25519 (RFC 8410: no parameters) and returns the
/// signature.
fn ed25519_signature(
    outer: &AlgorithmIdentifier<'_>,
    inner: &AlgorithmIdentifier<'_>,
    value: &x509_parser::der_parser::asn1_rs::BitString<'_>,
) -> Result<Signature, CertError> {
    if outer.algorithm != OID_SIG_ED25519 || outer.parameters.is_some() {
        return Err(CertError::NotEd25519);
    }
    if outer != inner {
        return Err(CertError::Malformed("signature algorithm fields disagree"));
    }
    if value.unused_bits != 0 {
        return Err(CertError::Malformed("signature is not a whole number of bytes"));
    }
    Signature::from_slice(&value.data).ok_or(CertError::Malformed("signature is not 64 bytes"))
}

fn ed25519_public_key(info: &SubjectPublicKeyInfo<'_>) -> Result<PublicKey, CertError> {
    if info.algorithm.algorithm != OID_SIG_ED25519 || info.algorithm.parameters.is_some() {
        return Err(CertError::NotEd25519);
    }
    if info.subject_public_key.unused_bits != 0 {
        return Err(CertError::Malformed("public key is not a whole number of bytes"));
    }
    PublicKey::from_slice(&info.subject_public_key.data).map_err(CertError::InvalidPublicKey)
}

fn common_name(name: &X509Name<'_>) -> Result<String, CertError> {
    let mut names = name.iter_common_name();
    let first = names.next().ok_or(CertError::Malformed("subject has no common name"))?;
    if names.next().is_some() {
        return Err(CertError::Malformed("subject has more than one common name"));
    }
    first.as_str().map(str::to_owned).map_err(|_| CertError::Malformed("subject common name is not a string"))
}

fn unix_millis(time: &ASN1Time) -> Result<UnixMillis, CertError> {
    u64::try_from(time.timestamp())
        .ok()
        .and_then(|secs| secs.checked_mul(1000))
        .map(UnixMillis)
        .ok_or(CertError::Malformed("time is before 1970"))
}

/// Parameters shared by every certificate: subject CN, serial and validity. The validity
/// is rounded inwards to whole seconds.
fn base_params(common_name: &str, validity: Validity, serial: Serial) -> Result<CertificateParams, IssueError> {
    check_common_name(common_name)?;
    if serial.0 == [0u8; SERIAL_LEN] {
        return Err(IssueError::InvalidRequest("serial is zero"));
    }
    let not_before_secs = validity.not_before.0.div_ceil(1000);
    let not_after_secs = validity.not_after.as_secs();
    if not_after_secs <= not_before_secs {
        return Err(IssueError::InvalidRequest("validity ends before it starts"));
    }
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, common_name);
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name;
    params.serial_number = Some(SerialNumber::from_slice(&serial.0));
    params.not_before = offset_date_time(not_before_secs)?;
    params.not_after = offset_date_time(not_after_secs)?;
    Ok(params)
}

fn check_common_name(common_name: &str) -> Result<(), IssueError> {
    if common_name.is_empty() || common_name.len() > MAX_COMMON_NAME_BYTES {
        return Err(IssueError::InvalidRequest("common name must be 1 to 64 bytes"));
    }
    if common_name.chars().any(char::is_control) {
        return Err(IssueError::InvalidRequest("common name contains control characters"));
    }
    Ok(())
}

fn ensure_within_issuer(issuer: &Certificate, params: &CertificateParams) -> Result<(), IssueError> {
    let issuer_window = issuer.validity();
    let not_before_secs = params.not_before.unix_timestamp();
    let not_after_secs = params.not_after.unix_timestamp();
    let within = i128::from(not_before_secs) * 1000 >= i128::from(issuer_window.not_before.0)
        && i128::from(not_after_secs) * 1000 <= i128::from(issuer_window.not_after.0);
    if !within {
        return Err(IssueError::InvalidRequest("validity is outside the issuer's validity"));
    }
    Ok(())
}

fn offset_date_time(secs: u64) -> Result<time::OffsetDateTime, IssueError> {
    i64::try_from(secs)
        .ok()
        .and_then(|secs| time::OffsetDateTime::from_unix_timestamp(secs).ok())
        .ok_or(IssueError::InvalidRequest("time is beyond year 9999"))
}

fn leaf_subject_alt_names(id_text: &str, dns_names: &[String]) -> Result<Vec<SanType>, IssueError> {
    if dns_names.len() > MAX_DNS_NAMES {
        return Err(IssueError::InvalidRequest("too many dns names"));
    }
    let uri = format!("{MOLT_URI_SCHEME}{id_text}");
    let mut names = vec![SanType::URI(ia5(uri)?)];
    for dns_name in dns_names {
        if !is_dns_name(dns_name) {
            return Err(IssueError::InvalidRequest("dns name is not a valid host name"));
        }
        names.push(SanType::DnsName(ia5(dns_name.clone())?));
    }
    Ok(names)
}

fn ia5(text: String) -> Result<rcgen::string::Ia5String, IssueError> {
    rcgen::string::Ia5String::try_from(text).map_err(|error| IssueError::Rcgen(error.to_string()))
}

/// A host name of letters, digits and hyphens (RFC 1123), such as `localhost` or
/// `edge-1.example.net`.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
        })
}

/// How an issuer's key is identified in the authority key identifier of what it signs:
/// its own subject key identifier when it has one.
fn issuer_key_id_method(issuer: &Certificate) -> KeyIdMethod {
    match &issuer.extensions.subject_key_id {
        Some(id) => KeyIdMethod::PreSpecified(id.clone()),
        None => KeyIdMethod::Sha256,
    }
}

/// What rcgen needs to know of an issuer: its subject name (only a common name here,
/// checked after signing), key identifier and key usages.
fn issuer_params(issuer: &Certificate) -> CertificateParams {
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, issuer.common_name());
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name;
    params.key_identifier_method = issuer_key_id_method(issuer);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Signs `params` for `subject_key` as `issuer`, without checking that the issuer may
/// (callers check), then reads the result back and verifies its signature.
fn sign_certificate(
    params: &CertificateParams,
    subject_key: &PublicKey,
    issuer: &Certificate,
    issuer_signer: &dyn Signer,
) -> Result<Certificate, IssueError> {
    let key = RcgenSigner::for_issuer(issuer, issuer_signer)?;
    let rcgen_issuer = rcgen::Issuer::new(issuer_params(issuer), &key);
    let mut params = params.clone();
    params.use_authority_key_identifier_extension = true;
    let issued = params.signed_by(&SubjectKey(subject_key), &rcgen_issuer);
    let certificate = key.read_back(issued.map(|certificate| certificate.der().to_vec()))?;
    if certificate.issuer_name != issuer.subject_name {
        return Err(IssueError::InvalidRequest("issuer subject name is not a plain common name"));
    }
    certificate.verify_signed_by(&issuer.public_key).map_err(|_| IssueError::BadOutput(CertError::BadSignature))?;
    Ok(certificate)
}

/// A subject public key as rcgen wants it.
struct SubjectKey<'a>(&'a PublicKey);

impl rcgen::PublicKeyData for SubjectKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

/// Lets rcgen sign through a [`Signer`]; keeps the signer's own error, which rcgen's
/// error type cannot carry.
struct RcgenSigner<'a> {
    signer: &'a dyn Signer,
    public_key: PublicKey,
    failure: RefCell<Option<SignError>>,
}

impl<'a> RcgenSigner<'a> {
    fn new(signer: &'a dyn Signer) -> RcgenSigner<'a> {
        RcgenSigner { signer, public_key: signer.public_key(), failure: RefCell::new(None) }
    }

    fn for_issuer(issuer: &Certificate, signer: &'a dyn Signer) -> Result<RcgenSigner<'a>, IssueError> {
        let key = RcgenSigner::new(signer);
        if key.public_key != issuer.public_key {
            return Err(IssueError::SignerKeyMismatch);
        }
        Ok(key)
    }

    fn failure(&self, error: rcgen::Error) -> IssueError {
        match self.failure.borrow_mut().take() {
            Some(sign_error) => IssueError::Sign(sign_error),
            None => IssueError::Rcgen(error.to_string()),
        }
    }

    fn read_back(&self, issued: Result<Vec<u8>, rcgen::Error>) -> Result<Certificate, IssueError> {
        let der = issued.map_err(|error| self.failure(error))?;
        Certificate::from_der(&der).map_err(IssueError::BadOutput)
    }
}

impl rcgen::PublicKeyData for RcgenSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.public_key.as_bytes()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

impl rcgen::SigningKey for RcgenSigner<'_> {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self.signer.try_sign(message) {
            Ok(signature) => Ok(signature.0.to_vec()),
            Err(error) => {
                *self.failure.borrow_mut() = Some(error);
                Err(rcgen::Error::RemoteKeyError)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::keys::SigningKey;

    const NOW: UnixMillis = UnixMillis(1_750_000_000_000);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn around_now(days_before: u32, days_after: u32) -> Validity {
        Validity { not_before: NOW.saturating_sub(DAY * days_before), not_after: NOW.saturating_add(DAY * days_after) }
    }

    fn serial(n: u8) -> Serial {
        let mut bytes = [0u8; 16];
        bytes[0] = 0x5a;
        bytes[15] = n;
        Serial(bytes)
    }

    struct Pki {
        root_key: SigningKey,
        root: Certificate,
        org_key: SigningKey,
        org: Certificate,
        agent_key: SigningKey,
        agent_id: AgentId,
        agent: Certificate,
        edge_key: SigningKey,
        edge_id: EdgeId,
        edge: Certificate,
        anchors: TrustAnchors,
    }

    fn pki() -> Pki {
        let root_key = SigningKey::from_bytes(&[1; 32]);
        let root = issue_root(&root_key, "Molt Root", around_now(3650, 3650), serial(1)).unwrap();
        let org_key = SigningKey::from_bytes(&[2; 32]);
        let org =
            issue_org_ca(&root, &root_key, &org_key.public_key(), "Molt Org Acme", around_now(365, 365), serial(2))
                .unwrap();
        let agent_key = SigningKey::from_bytes(&[3; 32]);
        let agent_id = AgentId::from_inception_key(&agent_key.public_key());
        let agent = issue_leaf(
            &org,
            &org_key,
            &agent_key.public_key(),
            Role::Agent(agent_id),
            &[],
            around_now(30, 30),
            serial(3),
        )
        .unwrap();
        let edge_key = SigningKey::from_bytes(&[4; 32]);
        let edge_id = EdgeId::from_inception_key(&edge_key.public_key());
        let dns_names = ["localhost".to_owned(), "edge-1.example.net".to_owned()];
        let edge = issue_leaf(
            &org,
            &org_key,
            &edge_key.public_key(),
            Role::Edge(edge_id),
            &dns_names,
            around_now(30, 30),
            serial(4),
        )
        .unwrap();
        let anchors = TrustAnchors::new(vec![root.clone()]).unwrap();
        Pki { root_key, root, org_key, org, agent_key, agent_id, agent, edge_key, edge_id, edge, anchors }
    }

    fn shared_pki() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(pki)
    }

    fn verify_at(
        pki: &Pki,
        chain: &[&Certificate],
        revoked: &Revocations,
        now: UnixMillis,
        expected: ExpectedRole,
    ) -> Result<VerifiedCert, ChainError> {
        let ders: Vec<&[u8]> = chain.iter().map(|certificate| certificate.der()).collect();
        verify_chain(&ders, &pki.anchors, revoked, now, expected)
    }

    fn verify(pki: &Pki, chain: &[&Certificate], expected: ExpectedRole) -> Result<VerifiedCert, ChainError> {
        verify_at(pki, chain, &Revocations::default(), NOW, expected)
    }

    /// Parameters of an agent leaf, for certificates the public functions refuse to make.
    fn agent_params(id: AgentId, validity: Validity, serial: Serial) -> CertificateParams {
        let mut params = base_params(&id.to_string(), validity, serial).unwrap();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names = leaf_subject_alt_names(&id.to_string(), &[]).unwrap();
        params
    }

    fn ca_params(common_name: &str, path_len: u8, validity: Validity, serial: Serial) -> CertificateParams {
        let mut params = base_params(common_name, validity, serial).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }

    fn flip_byte_of(der: &[u8], needle: &[u8]) -> Vec<u8> {
        let at = der.windows(needle.len()).position(|window| window == needle).unwrap() + needle.len() - 1;
        let mut tampered = der.to_vec();
        tampered[at] ^= 0x01;
        tampered
    }

    #[test]
    fn agent_and_edge_chains_verify() {
        let pki = pki();
        let verified = verify(&pki, &[&pki.agent, &pki.org], ExpectedRole::AnyAgent).unwrap();
        assert_eq!(verified.role, Role::Agent(pki.agent_id));
        assert_eq!(verified.public_key, pki.agent_key.public_key());
        assert_eq!(verified.serial, serial(3));
        assert_eq!(verified.not_after, pki.agent.validity().not_after);
        assert_eq!(verify(&pki, &[&pki.agent, &pki.org], ExpectedRole::Agent(pki.agent_id)).unwrap(), verified);
        // A chain that ends with the root is accepted too.
        assert_eq!(verify(&pki, &[&pki.agent, &pki.org, &pki.root], ExpectedRole::AnyAgent).unwrap(), verified);

        let verified = verify(&pki, &[&pki.edge, &pki.org], ExpectedRole::Edge(pki.edge_id)).unwrap();
        assert_eq!(verified.role, Role::Edge(pki.edge_id));
        assert_eq!(verified.public_key, pki.edge_key.public_key());
        assert_eq!(verify(&pki, &[&pki.edge, &pki.org], ExpectedRole::AnyEdge).unwrap(), verified);
    }

    #[test]
    fn issued_certificates_carry_the_profile() {
        let pki = pki();
        assert_eq!((pki.root.role(), pki.root.is_ca(), pki.root.path_len()), (Role::Root, true, Some(1)));
        assert_eq!((pki.org.role(), pki.org.is_ca(), pki.org.path_len()), (Role::OrgCa, true, Some(0)));
        assert_eq!((pki.agent.is_ca(), pki.agent.path_len()), (false, None));
        assert_eq!(pki.root.common_name(), "Molt Root");
        assert_eq!(pki.org.common_name(), "Molt Org Acme");
        assert_eq!(pki.agent.common_name(), pki.agent_id.to_string());
        assert_eq!(pki.edge.common_name(), pki.edge_id.to_string());
        assert_eq!(pki.edge.dns_names(), ["localhost", "edge-1.example.net"]);
        assert!(pki.agent.dns_names().is_empty());
        assert_eq!(pki.org.public_key(), pki.org_key.public_key());
        assert_eq!(pki.org.serial(), serial(2));
        assert_eq!(pki.agent.validity(), around_now(30, 30));
        assert!(pki.agent.extensions.usage.client_auth && !pki.agent.extensions.usage.server_auth);
        assert!(pki.edge.extensions.usage.client_auth && pki.edge.extensions.usage.server_auth);
        assert_eq!(pki.org.extensions.authority_key_id, pki.root.extensions.subject_key_id);
        assert_eq!(pki.agent.extensions.authority_key_id, pki.org.extensions.subject_key_id);
    }

    #[test]
    fn validity_is_rounded_inwards_to_seconds() {
        let pki = pki();
        let requested = Validity { not_before: UnixMillis(NOW.0 + 1), not_after: UnixMillis(NOW.0 + 60_999) };
        let leaf = issue_leaf(
            &pki.org,
            &pki.org_key,
            &pki.agent_key.public_key(),
            Role::Agent(pki.agent_id),
            &[],
            requested,
            serial(9),
        )
        .unwrap();
        assert_eq!(
            leaf.validity(),
            Validity { not_before: UnixMillis(NOW.0 + 1000), not_after: UnixMillis(NOW.0 + 60_000) }
        );
    }

    #[test]
    fn expired_and_not_yet_valid_leaves_are_refused() {
        let pki = pki();
        let chain = [&pki.agent, &pki.org];
        let empty = Revocations::default();
        let after = NOW.saturating_add(DAY * 31);
        assert_eq!(
            verify_at(&pki, &chain, &empty, after, ExpectedRole::AnyAgent),
            Err(ChainError::Expired { depth: 0 })
        );
        let before = NOW.saturating_sub(DAY * 31);
        assert_eq!(
            verify_at(&pki, &chain, &empty, before, ExpectedRole::AnyAgent),
            Err(ChainError::NotYetValid { depth: 0 })
        );
        // Both ends are inclusive.
        let validity = pki.agent.validity();
        assert!(verify_at(&pki, &chain, &empty, validity.not_after, ExpectedRole::AnyAgent).is_ok());
        assert!(verify_at(&pki, &chain, &empty, validity.not_before, ExpectedRole::AnyAgent).is_ok());

        let expired = issue_leaf(
            &pki.org,
            &pki.org_key,
            &pki.agent_key.public_key(),
            Role::Agent(pki.agent_id),
            &[],
            around_now(20, 0).shifted_back(DAY),
            serial(10),
        )
        .unwrap();
        assert_eq!(verify(&pki, &[&expired, &pki.org], ExpectedRole::AnyAgent), Err(ChainError::Expired { depth: 0 }));
    }

    impl Validity {
        fn shifted_back(self, by: Duration) -> Validity {
            Validity { not_before: self.not_before.saturating_sub(by), not_after: self.not_after.saturating_sub(by) }
        }
    }

    #[test]
    fn leaf_of_another_org_ca_has_an_unknown_issuer() {
        let pki = pki();
        let other_key = SigningKey::from_bytes(&[20; 32]);
        let other_org = issue_org_ca(
            &pki.root,
            &pki.root_key,
            &other_key.public_key(),
            "Molt Org Other",
            around_now(10, 10),
            serial(20),
        )
        .unwrap();
        let leaf = issue_leaf(
            &other_org,
            &other_key,
            &pki.agent_key.public_key(),
            Role::Agent(pki.agent_id),
            &[],
            around_now(1, 1),
            serial(21),
        )
        .unwrap();
        assert!(verify(&pki, &[&leaf, &other_org], ExpectedRole::AnyAgent).is_ok());
        assert_eq!(verify(&pki, &[&leaf, &pki.org], ExpectedRole::AnyAgent), Err(ChainError::UnknownIssuer));
        // Without its org CA the leaf leads nowhere.
        assert_eq!(verify(&pki, &[&pki.agent], ExpectedRole::AnyAgent), Err(ChainError::UnknownIssuer));

        // A whole hierarchy under a root that is not an anchor.
        let foreign_key = SigningKey::from_bytes(&[21; 32]);
        let foreign_root = issue_root(&foreign_key, "Foreign Root", around_now(10, 10), serial(22)).unwrap();
        let foreign_org = issue_org_ca(
            &foreign_root,
            &foreign_key,
            &other_key.public_key(),
            "Molt Org Acme",
            around_now(5, 5),
            serial(23),
        )
        .unwrap();
        let foreign_leaf = issue_leaf(
            &foreign_org,
            &other_key,
            &pki.agent_key.public_key(),
            Role::Agent(pki.agent_id),
            &[],
            around_now(1, 1),
            serial(24),
        )
        .unwrap();
        assert_eq!(
            verify(&pki, &[&foreign_leaf, &foreign_org], ExpectedRole::AnyAgent),
            Err(ChainError::UnknownIssuer)
        );
        assert_eq!(
            verify(&pki, &[&foreign_leaf, &foreign_org, &foreign_root], ExpectedRole::AnyAgent),
            Err(ChainError::TooDeep)
        );
    }

    #[test]
    fn a_root_with_the_anchor_name_but_another_key_is_refused() {
        let pki = pki();
        let impostor_key = SigningKey::from_bytes(&[30; 32]);
        let impostor_root = issue_root(&impostor_key, "Molt Root", around_now(10, 10), serial(30)).unwrap();
        let org = issue_org_ca(
            &impostor_root,
            &impostor_key,
            &pki.org_key.public_key(),
            "Molt Org Acme",
            around_now(5, 5),
            serial(31),
        )
        .unwrap();
        // The impostor root's key identifier differs, so it names no anchor.
        assert_eq!(verify(&pki, &[&pki.agent, &org], ExpectedRole::AnyAgent), Err(ChainError::UnknownIssuer));
    }

    #[test]
    fn tampered_certificates_fail_their_signature() {
        let pki = pki();
        let tampered_leaf = flip_byte_of(pki.agent.der(), &serial(3).0);
        let leaf = Certificate::from_der(&tampered_leaf).unwrap();
        assert_ne!(leaf.serial(), serial(3));
        assert_eq!(
            verify_chain(
                &[&tampered_leaf, pki.org.der()],
                &pki.anchors,
                &Revocations::default(),
                NOW,
                ExpectedRole::AnyAgent
            ),
            Err(ChainError::BadSignature { depth: 0 })
        );
        let tampered_org = flip_byte_of(pki.org.der(), &serial(2).0);
        assert_eq!(
            verify_chain(
                &[pki.agent.der(), &tampered_org],
                &pki.anchors,
                &Revocations::default(),
                NOW,
                ExpectedRole::AnyAgent
            ),
            Err(ChainError::BadSignature { depth: 1 })
        );
        let mut bad_signature = pki.edge.der().to_vec();
        let last = bad_signature.len() - 1;
        bad_signature[last] ^= 0x80;
        assert_eq!(
            verify_chain(
                &[&bad_signature, pki.org.der()],
                &pki.anchors,
                &Revocations::default(),
                NOW,
                ExpectedRole::AnyEdge
            ),
            Err(ChainError::BadSignature { depth: 0 })
        );
    }

    #[test]
    fn revoked_leaf_and_revoked_org_ca_are_refused() {
        let pki = pki();
        let chain = [&pki.agent, &pki.org];
        let mut revoked = Revocations::default();
        assert!(revoked.insert(pki.agent.serial()));
        assert!(!revoked.insert(pki.agent.serial()));
        assert_eq!(verify_at(&pki, &chain, &revoked, NOW, ExpectedRole::AnyAgent), Err(ChainError::Revoked(serial(3))));
        assert!(verify_at(&pki, &[&pki.edge, &pki.org], &revoked, NOW, ExpectedRole::AnyEdge).is_ok());

        let mut revoked = Revocations::default();
        revoked.insert(pki.org.serial());
        assert_eq!(verify_at(&pki, &chain, &revoked, NOW, ExpectedRole::AnyAgent), Err(ChainError::Revoked(serial(2))));
        assert_eq!(
            verify_at(&pki, &[&pki.edge, &pki.org], &revoked, NOW, ExpectedRole::AnyEdge),
            Err(ChainError::Revoked(serial(2)))
        );
    }

    #[test]
    fn a_leaf_cannot_act_as_an_issuer() {
        let pki = pki();
        let victim = AgentId::from_inception_key(&SigningKey::from_bytes(&[40; 32]).public_key());
        let refused = issue_leaf(
            &pki.agent,
            &pki.agent_key,
            &pki.agent_key.public_key(),
            Role::Agent(victim),
            &[],
            around_now(1, 1),
            serial(40),
        );
        assert!(matches!(refused, Err(IssueError::InvalidRequest("issuer is not a CA"))));

        let params = agent_params(victim, around_now(1, 1), serial(40));
        let forged = sign_certificate(&params, &pki.agent_key.public_key(), &pki.agent, &pki.agent_key).unwrap();
        assert_eq!(verify(&pki, &[&forged, &pki.agent, &pki.org], ExpectedRole::AnyAgent), Err(ChainError::TooDeep));
        // A leaf the root signed directly, used as an issuer, fits the depth limit.
        let root_leaf = sign_certificate(
            &agent_params(pki.agent_id, around_now(2, 2), serial(41)),
            &pki.agent_key.public_key(),
            &pki.root,
            &pki.root_key,
        )
        .unwrap();
        let forged = sign_certificate(&params, &pki.agent_key.public_key(), &root_leaf, &pki.agent_key).unwrap();
        assert_eq!(verify(&pki, &[&forged, &root_leaf], ExpectedRole::AnyAgent), Err(ChainError::NotCa { depth: 1 }));
    }

    #[test]
    fn path_length_constraints_are_enforced() {
        let pki = pki();
        // A root constrained to sign leaves directly cannot have an org CA under it.
        let mut params = ca_params("Tight Root", 0, around_now(10, 10), serial(50));
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = RcgenSigner::new(&pki.root_key);
        let tight_root = key.read_back(params.self_signed(&key).map(|c| c.der().to_vec())).unwrap();
        let org = sign_certificate(
            &ca_params("Tight Org", 0, around_now(5, 5), serial(51)),
            &pki.org_key.public_key(),
            &tight_root,
            &pki.root_key,
        )
        .unwrap();
        let leaf = sign_certificate(
            &agent_params(pki.agent_id, around_now(1, 1), serial(52)),
            &pki.agent_key.public_key(),
            &org,
            &pki.org_key,
        )
        .unwrap();
        let anchors = TrustAnchors::new(vec![tight_root.clone()]).unwrap();
        let chain = [leaf.der(), org.der()];
        assert_eq!(
            verify_chain(&chain, &anchors, &Revocations::default(), NOW, ExpectedRole::AnyAgent),
            Err(ChainError::PathLenExceeded { depth: 2 })
        );

        // An org CA (pathlen 0) that signs another CA: the path is too long anyway.
        let sub_key = SigningKey::from_bytes(&[53; 32]);
        let sub_ca = sign_certificate(
            &ca_params("Sub CA", 0, around_now(5, 5), serial(53)),
            &sub_key.public_key(),
            &pki.org,
            &pki.org_key,
        )
        .unwrap();
        let leaf = sign_certificate(
            &agent_params(pki.agent_id, around_now(1, 1), serial(54)),
            &pki.agent_key.public_key(),
            &sub_ca,
            &sub_key,
        )
        .unwrap();
        assert_eq!(verify(&pki, &[&leaf, &sub_ca, &pki.org], ExpectedRole::AnyAgent), Err(ChainError::TooDeep));
        assert!(matches!(
            issue_org_ca(&pki.org, &pki.org_key, &sub_key.public_key(), "Sub CA", around_now(5, 5), serial(55)),
            Err(IssueError::InvalidRequest(_))
        ));
    }

    #[test]
    fn chains_longer_than_the_limit_are_refused_before_parsing() {
        let pki = pki();
        let garbage: &[u8] = b"not a certificate";
        assert_eq!(
            verify_chain(
                &[pki.agent.der(), pki.org.der(), garbage, garbage],
                &pki.anchors,
                &Revocations::default(),
                NOW,
                ExpectedRole::AnyAgent
            ),
            Err(ChainError::TooDeep)
        );
        assert_eq!(
            verify(&pki, &[&pki.agent, &pki.org, &pki.org, &pki.root], ExpectedRole::AnyAgent),
            Err(ChainError::TooDeep)
        );
        assert_eq!(verify(&pki, &[&pki.agent, &pki.org, &pki.org], ExpectedRole::AnyAgent), Err(ChainError::TooDeep));
        assert_eq!(
            verify_chain(&[], &pki.anchors, &Revocations::default(), NOW, ExpectedRole::AnyAgent),
            Err(ChainError::Empty)
        );
    }

    #[test]
    fn the_leaf_role_must_match_what_is_expected() {
        let pki = pki();
        let agent_chain = [&pki.agent, &pki.org];
        assert_eq!(
            verify(&pki, &agent_chain, ExpectedRole::AnyEdge),
            Err(ChainError::WrongRole { expected: ExpectedRole::AnyEdge, found: Role::Agent(pki.agent_id) })
        );
        let other = AgentId::from_inception_key(&SigningKey::from_bytes(&[60; 32]).public_key());
        assert_eq!(
            verify(&pki, &agent_chain, ExpectedRole::Agent(other)),
            Err(ChainError::WrongRole { expected: ExpectedRole::Agent(other), found: Role::Agent(pki.agent_id) })
        );
        assert!(matches!(
            verify(&pki, &[&pki.edge, &pki.org], ExpectedRole::AnyAgent),
            Err(ChainError::WrongRole { .. })
        ));
        // A CA presented as a leaf is not an agent.
        assert!(matches!(verify(&pki, &[&pki.org], ExpectedRole::AnyAgent), Err(ChainError::WrongRole { .. })));
        assert!(matches!(verify(&pki, &[&pki.root], ExpectedRole::AnyAgent), Err(ChainError::WrongRole { .. })));
    }

    #[test]
    fn a_leaf_without_the_needed_extended_key_usage_is_refused() {
        let pki = pki();
        let mut params = agent_params(pki.agent_id, around_now(1, 1), serial(61));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = sign_certificate(&params, &pki.agent_key.public_key(), &pki.org, &pki.org_key).unwrap();
        assert_eq!(verify(&pki, &[&leaf, &pki.org], ExpectedRole::AnyAgent), Err(ChainError::KeyUsage { depth: 0 }));
    }

    #[test]
    fn garbage_and_truncated_der_give_typed_errors() {
        let pki = pki();
        assert_eq!(Certificate::from_der(b""), Err(CertError::NotDer));
        assert_eq!(Certificate::from_der(b"garbage"), Err(CertError::NotDer));
        let der = pki.agent.der();
        for cut in [1, 10, der.len() / 2, der.len() - 1] {
            assert!(Certificate::from_der(&der[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = der.to_vec();
        long.push(0);
        assert_eq!(Certificate::from_der(&long), Err(CertError::Malformed("trailing bytes after the certificate")));
        assert_eq!(
            Certificate::from_der(&vec![0x30; MAX_CERT_DER_BYTES + 1]),
            Err(CertError::TooLarge { max: MAX_CERT_DER_BYTES })
        );
        assert!(matches!(
            verify_chain(
                &[b"garbage", pki.org.der()],
                &pki.anchors,
                &Revocations::default(),
                NOW,
                ExpectedRole::AnyAgent
            ),
            Err(ChainError::Parse(CertError::NotDer))
        ));
        assert!(RevocationList::from_der_verified(b"garbage", &pki.org).is_err());
    }

    #[test]
    fn certificates_of_other_algorithms_are_refused() {
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let certificate = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&other).unwrap();
        assert_eq!(Certificate::from_der(certificate.der()), Err(CertError::NotEd25519));
    }

    #[test]
    fn issuing_refuses_invalid_requests() {
        let pki = pki();
        let agent_key = pki.agent_key.public_key();
        let agent = Role::Agent(pki.agent_id);
        let outside = around_now(400, 1);
        assert!(matches!(
            issue_leaf(&pki.org, &pki.org_key, &agent_key, agent, &[], outside, serial(70)),
            Err(IssueError::InvalidRequest("validity is outside the issuer's validity"))
        ));
        assert!(matches!(
            issue_org_ca(&pki.root, &pki.root_key, &agent_key, "Org", around_now(1, 4000), serial(70)),
            Err(IssueError::InvalidRequest("validity is outside the issuer's validity"))
        ));
        assert!(matches!(
            issue_leaf(&pki.root, &pki.root_key, &agent_key, agent, &[], around_now(1, 1), serial(70)),
            Err(IssueError::InvalidRequest("leaves are issued by an org CA"))
        ));
        assert!(matches!(
            issue_leaf(&pki.org, &pki.org_key, &agent_key, Role::OrgCa, &[], around_now(1, 1), serial(70)),
            Err(IssueError::InvalidRequest(_))
        ));
        assert!(matches!(
            issue_org_ca(&pki.agent, &pki.agent_key, &agent_key, "Org", around_now(1, 1), serial(70)),
            Err(IssueError::InvalidRequest("issuer is not a CA"))
        ));
        assert!(matches!(
            issue_leaf(
                &pki.org,
                &pki.org_key,
                &agent_key,
                agent,
                &["localhost".to_owned()],
                around_now(1, 1),
                serial(70)
            ),
            Err(IssueError::InvalidRequest(_))
        ));
        let edge = Role::Edge(pki.edge_id);
        for bad in ["", "-edge", "edge..net", "edge_1", "a b", "ünicode"] {
            let result =
                issue_leaf(&pki.org, &pki.org_key, &agent_key, edge, &[bad.to_owned()], around_now(1, 1), serial(70));
            assert!(matches!(result, Err(IssueError::InvalidRequest(_))), "{bad:?}");
        }
        assert!(matches!(
            issue_leaf(&pki.org, &pki.root_key, &agent_key, agent, &[], around_now(1, 1), serial(70)),
            Err(IssueError::SignerKeyMismatch)
        ));
        assert!(matches!(
            issue_leaf(&pki.org, &pki.org_key, &agent_key, agent, &[], around_now(1, 1), Serial([0; 16])),
            Err(IssueError::InvalidRequest("serial is zero"))
        ));
        let backwards = Validity { not_before: NOW, not_after: NOW };
        assert!(matches!(issue_root(&pki.root_key, "Root", backwards, serial(70)), Err(IssueError::InvalidRequest(_))));
        let far = Validity { not_before: NOW, not_after: UnixMillis(u64::MAX) };
        assert!(matches!(issue_root(&pki.root_key, "Root", far, serial(70)), Err(IssueError::InvalidRequest(_))));
        assert!(matches!(
            issue_root(&pki.root_key, "", around_now(1, 1), serial(70)),
            Err(IssueError::InvalidRequest(_))
        ));
        assert!(matches!(
            issue_root(&pki.root_key, &"x".repeat(65), around_now(1, 1), serial(70)),
            Err(IssueError::InvalidRequest(_))
        ));
    }

    struct BrokenSigner(PublicKey);

    impl Signer for BrokenSigner {
        fn public_key(&self) -> PublicKey {
            self.0
        }
        fn try_sign(&self, _message: &[u8]) -> Result<Signature, SignError> {
            Err(SignError("token removed".to_owned()))
        }
    }

    /// Claims one key, signs with another: a misconfigured HSM.
    struct LyingSigner(PublicKey, SigningKey);

    impl Signer for LyingSigner {
        fn public_key(&self) -> PublicKey {
            self.0
        }
        fn try_sign(&self, message: &[u8]) -> Result<Signature, SignError> {
            Ok(self.1.sign(message))
        }
    }

    #[test]
    fn signer_failures_surface_as_typed_errors() {
        let pki = pki();
        let broken = BrokenSigner(pki.org_key.public_key());
        let result = issue_leaf(
            &pki.org,
            &broken,
            &pki.agent_key.public_key(),
            Role::Agent(pki.agent_id),
            &[],
            around_now(1, 1),
            serial(80),
        );
        assert!(matches!(result, Err(IssueError::Sign(SignError(message))) if message == "token removed"));
        let result = RevocationList::issue(&pki.org, &broken, 1, NOW, NOW.saturating_add(DAY), &[]);
        assert!(matches!(result, Err(IssueError::Sign(_))));

        let lying = LyingSigner(pki.org_key.public_key(), SigningKey::from_bytes(&[81; 32]));
        let result = issue_leaf(
            &pki.org,
            &lying,
            &pki.agent_key.public_key(),
            Role::Agent(pki.agent_id),
            &[],
            around_now(1, 1),
            serial(81),
        );
        assert!(matches!(result, Err(IssueError::BadOutput(CertError::BadSignature))));
        let result = RevocationList::issue(&pki.org, &lying, 1, NOW, NOW.saturating_add(DAY), &[]);
        assert!(matches!(result, Err(IssueError::BadOutput(CertError::BadSignature))));
    }

    #[test]
    fn crl_round_trips_and_feeds_revocations() {
        let pki = pki();
        let next = NOW.saturating_add(DAY);
        let crl =
            RevocationList::issue(&pki.org, &pki.org_key, 7, NOW, next, &[serial(3), serial(99), serial(3)]).unwrap();
        assert_eq!(crl.crl_number(), 7);
        assert_eq!(crl.this_update(), NOW);
        assert_eq!(crl.next_update(), next);
        assert_eq!(crl.revoked().iter().copied().collect::<Vec<_>>(), vec![serial(3), serial(99)]);
        assert_eq!(crl.issuer_common_name(), "Molt Org Acme");

        let read = RevocationList::from_der_verified(crl.der(), &pki.org).unwrap();
        assert_eq!((read.crl_number(), read.revoked()), (7, crl.revoked()));
        let from_pem = RevocationList::from_pem_verified(&crl.to_pem(), &pki.org).unwrap();
        assert_eq!(from_pem.der(), crl.der());
        assert!(crl.to_pem().starts_with("-----BEGIN X509 CRL-----\n"));

        let mut revocations = Revocations::default();
        revocations.extend_from(&read);
        assert_eq!(revocations.len(), 2);
        assert!(revocations.contains(serial(3)) && !revocations.is_empty());
        assert_eq!(
            verify_at(&pki, &[&pki.agent, &pki.org], &revocations, NOW, ExpectedRole::AnyAgent),
            Err(ChainError::Revoked(serial(3)))
        );

        let big = RevocationList::issue(&pki.root, &pki.root_key, u64::MAX, NOW, next, &[]).unwrap();
        let big = RevocationList::from_der_verified(big.der(), &pki.root).unwrap();
        assert_eq!(big.crl_number(), u64::MAX);
        assert!(big.revoked().is_empty());
    }

    #[test]
    fn crl_from_the_wrong_issuer_or_tampered_is_refused() {
        let pki = pki();
        let crl = RevocationList::issue(&pki.org, &pki.org_key, 1, NOW, NOW.saturating_add(DAY), &[serial(3)]).unwrap();
        assert_eq!(RevocationList::from_der_verified(crl.der(), &pki.root).unwrap_err(), CertError::IssuerMismatch);
        // Same name, other key.
        let twin_key = SigningKey::from_bytes(&[90; 32]);
        let twin = issue_org_ca(
            &pki.root,
            &pki.root_key,
            &twin_key.public_key(),
            "Molt Org Acme",
            around_now(5, 5),
            serial(90),
        )
        .unwrap();
        assert!(RevocationList::from_der_verified(crl.der(), &twin).is_err());
        let tampered = flip_byte_of(crl.der(), &serial(3).0);
        assert_eq!(RevocationList::from_der_verified(&tampered, &pki.org).unwrap_err(), CertError::BadSignature);
        assert!(matches!(
            RevocationList::issue(&pki.agent, &pki.agent_key, 1, NOW, NOW.saturating_add(DAY), &[]),
            Err(IssueError::InvalidRequest(_))
        ));
        assert!(matches!(
            RevocationList::issue(&pki.org, &pki.org_key, 1, NOW, NOW, &[]),
            Err(IssueError::InvalidRequest(_))
        ));
        assert_eq!(RevocationList::from_der_verified(crl.der(), &pki.agent).unwrap_err(), CertError::IssuerMismatch);
    }

    #[test]
    fn pem_round_trips() {
        let pki = pki();
        let pem = pki.agent.to_pem();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(Certificate::from_pem(&pem).unwrap(), pki.agent);
        let bundle = format!("{}{}", pki.agent.to_pem(), pki.org.to_pem());
        assert_eq!(Certificate::chain_from_pem(&bundle).unwrap(), vec![pki.agent.clone(), pki.org.clone()]);
        assert!(matches!(Certificate::from_pem("nothing here"), Err(CertError::Pem(PemError::Missing(_)))));

        let anchors = TrustAnchors::from_pem(&pki.root.to_pem()).unwrap();
        assert_eq!(anchors.iter().collect::<Vec<_>>(), vec![&pki.root]);
        assert_eq!(TrustAnchors::from_pem(&pki.org.to_pem()).unwrap_err(), CertError::NotRoot);
        assert_eq!(TrustAnchors::new(Vec::new()).unwrap_err(), CertError::NoTrustAnchors);

        let key_pem = pki.org_key.to_pkcs8_pem();
        assert_eq!(SigningKey::from_pkcs8_pem(&key_pem).unwrap().public_key(), pki.org_key.public_key());
    }

    #[test]
    fn serials_print_as_hex_and_are_random_positive_and_nonzero() {
        let text = serial(3).to_string();
        assert_eq!(text, "5a000000000000000000000000000003");
        assert_eq!(text.parse::<Serial>(), Ok(serial(3)));
        assert_eq!("5A000000000000000000000000000003".parse::<Serial>(), Ok(serial(3)));
        assert_eq!("5a00".parse::<Serial>(), Err(SerialParseError));
        assert_eq!("zz000000000000000000000000000003".parse::<Serial>(), Err(SerialParseError));
        let random = Serial::random(&mut FakeRng { zero_draws_left: 0, byte: 0xff });
        assert_eq!(random.0[0], 0x7f);
        // All-zero draws are skipped.
        let random = Serial::random(&mut FakeRng { zero_draws_left: 3, byte: 0x01 });
        assert_eq!(random, Serial([0x01; 16]));
        let random = Serial::random(&mut rand::rngs::OsRng);
        assert!(random.0[0] < 0x80 && random != Serial([0; 16]));

        // A serial with the top bit set still round-trips as a positive INTEGER.
        let pki = pki();
        let high = Serial([0xff; 16]);
        let leaf = issue_leaf(
            &pki.org,
            &pki.org_key,
            &pki.agent_key.public_key(),
            Role::Agent(pki.agent_id),
            &[],
            around_now(1, 1),
            high,
        )
        .unwrap();
        assert_eq!(leaf.serial(), high);
    }

    /// Yields the same byte forever, or zeros first and then ones; marked cryptographic
    /// for the test only.
    struct FakeRng {
        zero_draws_left: usize,
        byte: u8,
    }

    impl rand_core::RngCore for FakeRng {
        fn next_u32(&mut self) -> u32 {
            rand_core::impls::next_u32_via_fill(self)
        }
        fn next_u64(&mut self) -> u64 {
            rand_core::impls::next_u64_via_fill(self)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            let byte = if self.zero_draws_left > 0 { 0 } else { self.byte };
            self.zero_draws_left = self.zero_draws_left.saturating_sub(1);
            dest.fill(byte);
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    impl rand_core::CryptoRng for FakeRng {}

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let pki = shared_pki();
            let _ = Certificate::from_der(&bytes);
            let _ = RevocationList::from_der_verified(&bytes, &pki.org);
            let _ = verify_chain(&[&bytes], &pki.anchors, &Revocations::default(), NOW, ExpectedRole::AnyAgent);
        }

        #[test]
        fn mutated_certificates_and_crls_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let pki = shared_pki();
            let crl = RevocationList::issue(&pki.org, &pki.org_key, 3, NOW, NOW.saturating_add(DAY), &[serial(3)]).unwrap();
            for original in [pki.edge.der(), crl.der()] {
                let mut bytes = original.to_vec();
                for (index, value) in &flips {
                    let at = index.index(bytes.len());
                    bytes[at] ^= value;
                }
                let _ = Certificate::from_der(&bytes);
                let _ = RevocationList::from_der_verified(&bytes, &pki.org);
                let _ = verify_chain(&[&bytes, pki.org.der()], &pki.anchors, &Revocations::default(), NOW, ExpectedRole::AnyEdge);
                let truncated = &original[..cut.index(original.len())];
                let _ = Certificate::from_der(truncated);
                let _ = RevocationList::from_der_verified(truncated, &pki.org);
            }
        }
    }

    /// Standard tools read our certificates and CRLs: `openssl verify` accepts the chains
    /// in strict mode and honours the CRL.
    #[test]
    fn openssl_verifies_our_chains_and_crls() {
        if std::process::Command::new("openssl").arg("version").output().is_err() {
            eprintln!("openssl not on PATH; skipping");
            return;
        }
        let pki = pki();
        let dir = std::env::temp_dir().join(format!("molt-cert-openssl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_owned()
        };
        let root = write("root.pem", pki.root.to_pem());
        let org = write("org.pem", pki.org.to_pem());
        let agent = write("agent.pem", pki.agent.to_pem());
        let edge = write("edge.pem", pki.edge.to_pem());
        let next = NOW.saturating_add(DAY);
        let clean =
            write("clean.crl.pem", RevocationList::issue(&pki.org, &pki.org_key, 1, NOW, next, &[]).unwrap().to_pem());
        let revoking = write(
            "revoking.crl.pem",
            RevocationList::issue(&pki.org, &pki.org_key, 2, NOW, next, &[serial(3)]).unwrap().to_pem(),
        );
        let at_time = NOW.as_secs().to_string();
        let openssl_verify = |extra: &[&str], leaf: &str| {
            let output = std::process::Command::new("openssl")
                .args(["verify", "-x509_strict", "-attime", &at_time, "-CAfile", &root, "-untrusted", &org])
                .args(extra)
                .arg(leaf)
                .output()
                .unwrap();
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
            )
        };
        let checks = [
            (openssl_verify(&["-purpose", "sslclient"], &agent), true),
            (openssl_verify(&["-purpose", "sslserver"], &edge), true),
            (openssl_verify(&["-crl_check", "-CRLfile", &clean], &agent), true),
            (openssl_verify(&["-crl_check", "-CRLfile", &revoking], &agent), false),
            (openssl_verify(&["-crl_check", "-CRLfile", &revoking], &edge), true),
        ];
        std::fs::remove_dir_all(&dir).unwrap();
        for (index, ((success, output), expected)) in checks.into_iter().enumerate() {
            assert_eq!(success, expected, "check {index}: {output}");
        }
    }
}
