//! Agent-signed HTTP requests to the control plane: the string an agent signs and the
//! four headers that carry the signature.
//!
//! ```text
//! Molt-Agent: agent-…            the agent's id
//! Molt-Timestamp: 1700000000000  milliseconds since the Unix epoch
//! Molt-Nonce: <32 hex>           16 random bytes, never reused
//! Molt-Signature: <128 hex>      Ed25519 by the agent's current key over the string below
//! ```
//!
//! The signed string is [`canonical_request`]: the lines [`REQUEST_DOMAIN`], the method,
//! the path with query, the timestamp, the nonce and the lower-case hex SHA-256 of the
//! body, joined by `\n`. The server side (timestamp window, nonce store) lives in the
//! control plane; clients call [`sign_request`] with the time and nonce they chose.

use data_encoding::HEXLOWER;
use sha2::{Digest as _, Sha256};

use crate::ids::AgentId;
use crate::keys::{PublicKey, SigningKey};
use crate::time::UnixMillis;

/// Domain separator, the first line of the signed string.
pub const REQUEST_DOMAIN: &str = "molt/agent-request/v1";
/// Bytes of a nonce (32 hex digits).
pub const NONCE_BYTES: usize = 16;

/// Header naming the signing agent.
pub const AGENT_HEADER: &str = "molt-agent";
/// Header carrying the signing time, milliseconds since the Unix epoch.
pub const TIMESTAMP_HEADER: &str = "molt-timestamp";
/// Header carrying the nonce, [`NONCE_BYTES`] as lower-case hex.
pub const NONCE_HEADER: &str = "molt-nonce";
/// Header carrying the Ed25519 signature as lower-case hex.
pub const SIGNATURE_HEADER: &str = "molt-signature";

/// The string an agent signs.
pub fn canonical_request(
    method: &str,
    path_and_query: &str,
    timestamp: UnixMillis,
    nonce: &str,
    body: &[u8],
) -> String {
    let body_hash = HEXLOWER.encode(&Sha256::digest(body));
    format!("{REQUEST_DOMAIN}\n{method}\n{path_and_query}\n{}\n{nonce}\n{body_hash}", timestamp.0)
}

/// The four headers of a request signed by `key` for `agent`, as (lower-case name, value).
pub fn sign_request(
    key: &SigningKey,
    agent: AgentId,
    method: &str,
    path_and_query: &str,
    timestamp: UnixMillis,
    nonce: [u8; NONCE_BYTES],
    body: &[u8],
) -> [(&'static str, String); 4] {
    let nonce = HEXLOWER.encode(&nonce);
    let signature = key.sign(canonical_request(method, path_and_query, timestamp, &nonce, body).as_bytes());
    [
        (AGENT_HEADER, agent.to_string()),
        (TIMESTAMP_HEADER, timestamp.0.to_string()),
        (NONCE_HEADER, nonce),
        (SIGNATURE_HEADER, HEXLOWER.encode(&signature.0)),
    ]
}

/// Domain of the proof of possession that asks for an agent certificate.
pub const AGENT_PROOF_DOMAIN: &[u8] = b"molt-control-plane agent-certificate-request v1\0";
/// Domain of the proof of possession that asks for an edge certificate.
pub const EDGE_PROOF_DOMAIN: &[u8] = b"molt-control-plane edge-certificate-request v1\0";

/// The message a key signs to prove its holder asks the control plane for a
/// certificate: domain (agent or edge) ‖ org id ‖ 0x00 ‖ public key (32 bytes) ‖
/// timestamp (ms, 8 bytes big-endian).
pub fn possession_message(domain: &[u8], org_id: &str, public_key: &PublicKey, timestamp: UnixMillis) -> Vec<u8> {
    let mut message = domain.to_vec();
    message.extend_from_slice(org_id.as_bytes());
    message.push(0);
    message.extend_from_slice(public_key.as_bytes());
    message.extend_from_slice(&timestamp.0.to_be_bytes());
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_request_is_line_separated() {
        let text = canonical_request("POST", "/v1/agents?x=1", UnixMillis(5), "00ff", b"");
        assert_eq!(
            text,
            "molt/agent-request/v1\nPOST\n/v1/agents?x=1\n5\n00ff\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn signed_headers_verify_over_the_canonical_string() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let agent = AgentId::from_inception_key(&key.public_key());
        let headers = sign_request(&key, agent, "PUT", "/v1/agents/x", UnixMillis(9), [0xab; NONCE_BYTES], b"{}");
        assert_eq!(headers[0], (AGENT_HEADER, agent.to_string()));
        assert_eq!(headers[1], (TIMESTAMP_HEADER, "9".to_owned()));
        assert_eq!(headers[2], (NONCE_HEADER, "ab".repeat(NONCE_BYTES)));
        let signature = HEXLOWER.decode(headers[3].1.as_bytes()).unwrap();
        let signature = crate::keys::Signature::from_slice(&signature).unwrap();
        let canonical = canonical_request("PUT", "/v1/agents/x", UnixMillis(9), &headers[2].1, b"{}");
        key.public_key().verify(canonical.as_bytes(), &signature).unwrap();
        assert!(key.public_key().verify(canonical.replace("PUT", "GET").as_bytes(), &signature).is_err());
    }
}
