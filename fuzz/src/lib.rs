//! Fixtures shared by the fuzz targets and the seed generator: fixed keys, a fixed PKI
//! (root, org CA, anchors) built once, and a helper that signs fuzzed TBS bytes so the
//! certificate and CRL targets reach the checks that run after signature verification.
//!
//! Everything is deterministic (fixed key bytes, fixed serials and times), so a seed or a
//! crashing input replays identically on any machine.

#![forbid(unsafe_code)]

use std::sync::OnceLock;
use std::time::Duration;

use molt_protocol::cert::{self, Certificate, Serial, TrustAnchors, Validity};
use molt_protocol::keys::{EncryptionSecret, Signer};
use molt_protocol::{AgentId, SigningKey, UnixMillis};

/// The clock every target uses; inside every fixture's validity window.
pub const NOW: UnixMillis = UnixMillis(1_750_000_000_000);

/// DER of the Ed25519 AlgorithmIdentifier: SEQUENCE { OID 1.3.101.112 }.
const ED25519_ALGORITHM: [u8; 7] = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Signs envelopes, receipts and key bindings in the seeds; their decoders verify against
/// its public key.
pub fn sender_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_bytes(&[1; 32]))
}

pub fn sender_id() -> AgentId {
    AgentId::from_inception_key(&sender_key().public_key())
}

/// The recipient of the seed envelopes.
pub fn recipient_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_bytes(&[2; 32]))
}

pub fn recipient_secret() -> EncryptionSecret {
    EncryptionSecret::from_bytes([3; 32])
}

/// A root and an org CA issued by it, with keys, built once per process.
#[derive(Debug)]
pub struct Pki {
    pub root_key: SigningKey,
    pub root: Certificate,
    pub org_key: SigningKey,
    pub org: Certificate,
    pub anchors: TrustAnchors,
}

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let root_key = SigningKey::from_bytes(&[10; 32]);
        // Invariant: issuing from fixed, valid parameters succeeds.
        let root = cert::issue_root(&root_key, "Molt Fuzz Root", around_now(3650), serial(1)).expect("root issues");
        let org_key = SigningKey::from_bytes(&[11; 32]);
        let org =
            cert::issue_org_ca(&root, &root_key, &org_key.public_key(), "Molt Fuzz Org", around_now(365), serial(2))
                .expect("org CA issues");
        let anchors = TrustAnchors::new(vec![root.clone()]).expect("root is a trust anchor");
        Pki { root_key, root, org_key, org, anchors }
    })
}

pub fn around_now(days: u32) -> Validity {
    Validity { not_before: NOW.saturating_sub(DAY * days), not_after: NOW.saturating_add(DAY * days) }
}

/// A positive 16-byte serial ending in `n`.
pub fn serial(n: u8) -> Serial {
    let mut bytes = [0x5a; 16];
    bytes[15] = n;
    Serial(bytes)
}

/// Wraps `tbs` (a TBSCertificate or TBSCertList) as `SEQUENCE { tbs, ed25519, BIT STRING
/// signature }` signed by `signer`: the outer shape of both certificates and CRLs.
pub fn sign_tbs(tbs: &[u8], signer: &dyn Signer) -> Option<Vec<u8>> {
    let signature = signer.try_sign(tbs).ok()?;
    let mut bit_string = vec![0x00];
    bit_string.extend_from_slice(&signature.0);
    let mut content = tbs.to_vec();
    content.extend_from_slice(&ED25519_ALGORITHM);
    push_element(&mut content, 0x03, &bit_string);
    let mut out = Vec::with_capacity(content.len() + 6);
    push_element(&mut out, 0x30, &content);
    Some(out)
}

/// Whether `data` is exactly one DER SEQUENCE (the only TBS shape worth signing).
pub fn is_one_sequence(data: &[u8]) -> bool {
    first_element(data).is_some_and(|(tag, element)| tag == 0x30 && element.len() == data.len())
}

/// The first element of the first element of `der`: the TBS part of a certificate or CRL.
pub fn tbs_of(der: &[u8]) -> Option<&[u8]> {
    let (_, outer) = first_element(der)?;
    let header_len = header_len(outer)?;
    first_element(&outer[header_len..]).map(|(_, tbs)| tbs)
}

/// `(tag, whole element)` of the DER element at the start of `data`.
fn first_element(data: &[u8]) -> Option<(u8, &[u8])> {
    let header = header_len(data)?;
    let content = content_len(data)?;
    let end = header.checked_add(content)?;
    Some((data[0], data.get(..end)?))
}

fn header_len(data: &[u8]) -> Option<usize> {
    let first_length_byte = *data.get(1)?;
    if first_length_byte < 0x80 { Some(2) } else { Some(2 + usize::from(first_length_byte & 0x7f)) }
}

fn content_len(data: &[u8]) -> Option<usize> {
    let first_length_byte = *data.get(1)?;
    if first_length_byte < 0x80 {
        return Some(usize::from(first_length_byte));
    }
    let count = usize::from(first_length_byte & 0x7f);
    if count == 0 || count > 4 {
        return None;
    }
    let bytes = data.get(2..2 + count)?;
    Some(bytes.iter().fold(0usize, |length, byte| (length << 8) | usize::from(*byte)))
}

fn push_element(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let length = content.len();
    if length < 0x80 {
        out.push(length as u8);
    } else {
        let bytes = (length as u32).to_be_bytes();
        let skip = bytes.iter().take_while(|byte| **byte == 0).count();
        out.push(0x80 | (4 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
}
