//! Ids of control-plane records: a type prefix and 26 lower-case base32 characters
//! (128 random bits), e.g. `org_5tq1…`. Random rather than sequential so that replicas
//! never coordinate to allocate one and ids reveal nothing about how many records exist.

use std::fmt;
use std::str::FromStr;

use rand::RngCore as _;

/// Random bytes in an id.
pub const ID_RANDOM_BYTES: usize = 16;
/// Characters after the prefix: 128 bits in base32 without padding.
pub const ID_ENCODED_LEN: usize = 26;

const _: () = assert!(ID_RANDOM_BYTES * 8 <= ID_ENCODED_LEN * 5);

/// The text was not an id of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {kind} id")]
pub struct ParseIdError {
    kind: &'static str,
}

macro_rules! record_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Text before the random part.
            pub const PREFIX: &'static str = $prefix;

            /// A fresh random id.
            pub fn generate() -> Self {
                $name(format!("{}{}", Self::PREFIX, random_suffix()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(text: &str) -> Result<Self, ParseIdError> {
                match text.strip_prefix(Self::PREFIX) {
                    Some(suffix) if is_valid_suffix(suffix) => Ok($name(text.to_owned())),
                    _ => Err(ParseIdError { kind: $kind }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

record_id!(
    /// Id of an organisation.
    OrgId,
    "org_",
    "org"
);
record_id!(
    /// Id of an admin API key (not the secret token).
    AdminKeyId,
    "key_",
    "admin key"
);
record_id!(
    /// Id of a social recovery of an agent's key.
    RecoveryId,
    "rec_",
    "recovery"
);

record_id!(
    /// Id of an edge enrollment token (not the secret).
    EnrollmentTokenId,
    "enr_",
    "enrollment token"
);

fn random_suffix() -> String {
    let mut bytes = [0u8; ID_RANDOM_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    data_encoding::BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
}

fn is_valid_suffix(suffix: &str) -> bool {
    suffix.len() == ID_ENCODED_LEN
        && suffix.bytes().all(|byte| byte.is_ascii_lowercase() || (b'2'..=b'7').contains(&byte))
        && data_encoding::BASE32_NOPAD.decode(suffix.to_ascii_uppercase().as_bytes()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back() {
        let id = OrgId::generate();
        assert_eq!(id.as_str().len(), OrgId::PREFIX.len() + ID_ENCODED_LEN);
        assert_eq!(id.as_str().parse::<OrgId>(), Ok(id.clone()));
        assert_ne!(OrgId::generate(), id);
    }

    #[test]
    fn malformed_ids_are_rejected() {
        let key = AdminKeyId::generate();
        assert!(key.as_str().parse::<OrgId>().is_err(), "wrong prefix");
        for bad in [
            "",
            "org_",
            "org_abc",
            "ORG_aaaaaaaaaaaaaaaaaaaaaaaaaa",
            "org_aaaaaaaaaaaaaaaaaaaaaaaaa1",
            "org_aaaaaaaaaaaaaaaaaaaaaaaaa'",
        ] {
            assert!(bad.parse::<OrgId>().is_err(), "{bad:?}");
        }
    }
}
