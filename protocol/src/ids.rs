//! Identifiers: agents and edges are named by a hash of their inception key, messages by
//! 128 random bits.
//!
//! An agent's id never changes when it rotates its key: the id is derived once from the
//! first (inception) Ed25519 public key, and each later certificate binds a new key to the
//! same id. The canonical text form is `agent-` (or `edge-`) followed by 26 lower-case
//! RFC 4648 base32 characters without padding; parsing accepts exactly that form, so
//! `parse(display(id)) == id` and `display(parse(s)) == s` for every accepted `s`.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use data_encoding::{BASE32_NOPAD, Encoding};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};

use crate::keys::PublicKey;

/// Length in bytes of every id in the protocol.
pub const ID_LEN: usize = 16;
/// Length of the base32 part of an agent or edge id's text form.
pub const ID_TEXT_LEN: usize = 26;

/// Why a text or byte string is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdParseError {
    #[error("id must start with `{expected}`")]
    WrongPrefix { expected: &'static str },
    #[error("id must have {expected} characters after its prefix, got {actual}")]
    WrongLength { expected: usize, actual: usize },
    #[error("id is not canonical lower-case base32")]
    NotCanonical,
    #[error("id must be {ID_LEN} bytes, got {0}")]
    WrongByteLength(usize),
}

fn lower_base32() -> &'static Encoding {
    static ENCODING: OnceLock<Encoding> = OnceLock::new();
    ENCODING.get_or_init(|| {
        let mut spec = BASE32_NOPAD.specification();
        spec.symbols = "abcdefghijklmnopqrstuvwxyz234567".to_owned();
        spec.check_trailing_bits = true;
        // Invariant: the specification above is a valid base32 alphabet.
        spec.encoding().expect("lower-case base32 specification is valid")
    })
}

fn encode_text(bytes: &[u8; ID_LEN]) -> String {
    lower_base32().encode(bytes)
}

fn decode_text(prefix: &'static str, text: &str) -> Result<[u8; ID_LEN], IdParseError> {
    let rest = text.strip_prefix(prefix).ok_or(IdParseError::WrongPrefix { expected: prefix })?;
    if rest.len() != ID_TEXT_LEN {
        return Err(IdParseError::WrongLength { expected: ID_TEXT_LEN, actual: rest.len() });
    }
    // The decoder rejects upper case and non-zero trailing bits, so every id has exactly
    // one accepted text form.
    let decoded = lower_base32().decode(rest.as_bytes()).map_err(|_| IdParseError::NotCanonical)?;
    decoded.try_into().map_err(|v: Vec<u8>| IdParseError::WrongByteLength(v.len()))
}

fn derive(domain: &[u8], key: &PublicKey) -> [u8; ID_LEN] {
    let digest = Sha256::new().chain_update(domain).chain_update(key.as_bytes()).finalize();
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&digest[..ID_LEN]);
    id
}

macro_rules! principal_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $domain:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; ID_LEN]);

        impl $name {
            /// Text prefix of the canonical form.
            pub const PREFIX: &'static str = $prefix;

            /// Derives the id from the inception public key. Later keys keep this id.
            pub fn from_inception_key(key: &PublicKey) -> Self {
                Self(derive($domain, key))
            }

            pub const fn from_bytes(bytes: [u8; ID_LEN]) -> Self {
                Self(bytes)
            }

            pub fn from_slice(bytes: &[u8]) -> Result<Self, IdParseError> {
                bytes
                    .try_into()
                    .map(Self)
                    .map_err(|_| IdParseError::WrongByteLength(bytes.len()))
            }

            pub const fn as_bytes(&self) -> &[u8; ID_LEN] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, encode_text(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(text: &str) -> Result<Self, IdParseError> {
                decode_text($prefix, text).map(Self)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

principal_id!(
    /// Stable id of an agent, derived from its inception key.
    AgentId,
    "agent-",
    b"molt/agent-id/v1"
);
principal_id!(
    /// Stable id of an edge relay, derived from its inception key.
    EdgeId,
    "edge-",
    b"molt/edge-id/v1"
);

/// 128-bit message id chosen at random by the sender. Text form: 32 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId([u8; ID_LEN]);

impl MessageId {
    pub fn random<R: RngCore + CryptoRng>(rng: &mut R) -> MessageId {
        let mut bytes = [0u8; ID_LEN];
        rng.fill_bytes(&mut bytes);
        MessageId(bytes)
    }

    pub const fn from_bytes(bytes: [u8; ID_LEN]) -> MessageId {
        MessageId(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MessageId {
    type Err = IdParseError;
    fn from_str(text: &str) -> Result<MessageId, IdParseError> {
        if text.len() != ID_LEN * 2 {
            return Err(IdParseError::WrongLength { expected: ID_LEN * 2, actual: text.len() });
        }
        let decoded = data_encoding::HEXLOWER.decode(text.as_bytes()).map_err(|_| IdParseError::NotCanonical)?;
        let bytes: [u8; ID_LEN] = decoded.try_into().map_err(|v: Vec<u8>| IdParseError::WrongByteLength(v.len()))?;
        Ok(MessageId(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;
    use proptest::prelude::*;

    #[test]
    fn agent_id_text_form_is_prefixed_lower_base32() {
        let key = SigningKey::from_bytes(&[7u8; 32]).public_key();
        let id = AgentId::from_inception_key(&key);
        let text = id.to_string();
        assert!(text.starts_with("agent-"));
        assert_eq!(text.len(), "agent-".len() + ID_TEXT_LEN);
        assert!(text["agent-".len()..].chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_eq!(text.parse::<AgentId>().unwrap(), id);
    }

    #[test]
    fn agent_and_edge_ids_of_one_key_differ() {
        let key = SigningKey::from_bytes(&[9u8; 32]).public_key();
        assert_ne!(AgentId::from_inception_key(&key).as_bytes(), EdgeId::from_inception_key(&key).as_bytes());
    }

    #[test]
    fn non_canonical_text_is_refused() {
        let id = AgentId::from_bytes([0x5a; ID_LEN]);
        let text = id.to_string();
        assert_eq!(
            text.to_uppercase().parse::<AgentId>().unwrap_err(),
            IdParseError::WrongPrefix { expected: "agent-" }
        );
        let upper_body = format!("agent-{}", text["agent-".len()..].to_uppercase());
        assert_eq!(upper_body.parse::<AgentId>().unwrap_err(), IdParseError::NotCanonical);
        // The last character carries two unused bits: setting them gives another string for
        // the same bytes, which must be refused.
        let mut trailing = text.clone().into_bytes();
        let last = trailing.len() - 1;
        trailing[last] = b'7';
        assert_eq!(String::from_utf8(trailing).unwrap().parse::<AgentId>().unwrap_err(), IdParseError::NotCanonical);
        assert!("edge-aaaaaaaaaaaaaaaaaaaaaaaaaa".parse::<AgentId>().is_err());
        assert!("agent-".parse::<AgentId>().is_err());
        assert!("agent-aaaaaaaaaaaaaaaaaaaaaaaaaaa".parse::<AgentId>().is_err());
        assert!("agent-aaaaaaaaaaaaaaaaaaaaaaaaa1".parse::<AgentId>().is_err());
    }

    proptest! {
        #[test]
        fn agent_id_round_trips(bytes in any::<[u8; ID_LEN]>()) {
            let id = AgentId::from_bytes(bytes);
            prop_assert_eq!(id.to_string().parse::<AgentId>().unwrap(), id);
        }

        #[test]
        fn edge_id_round_trips(bytes in any::<[u8; ID_LEN]>()) {
            let id = EdgeId::from_bytes(bytes);
            prop_assert_eq!(id.to_string().parse::<EdgeId>().unwrap(), id);
        }

        #[test]
        fn accepted_text_is_canonical(text in "agent-[a-z2-7]{26}") {
            if let Ok(id) = text.parse::<AgentId>() {
                prop_assert_eq!(id.to_string(), text);
            }
        }

        #[test]
        fn message_id_round_trips(bytes in any::<[u8; ID_LEN]>()) {
            let id = MessageId::from_bytes(bytes);
            prop_assert_eq!(id.to_string().parse::<MessageId>().unwrap(), id);
        }
    }
}
