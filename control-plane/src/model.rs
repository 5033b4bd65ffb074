//! Records the control plane keeps, as the API and the storage layer share them.

use std::fmt;

use molt_protocol::time::UnixMillis;

use crate::auth::Scopes;
use crate::ids::{AdminKeyId, OrgId};

/// Longest org name.
pub const ORG_NAME_LEN_MAX: usize = 63;
/// Longest admin key name.
pub const ADMIN_KEY_NAME_LEN_MAX: usize = 100;

/// An organisation: the unit that will own a CA, agents and edges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Org {
    pub id: OrgId,
    pub name: OrgName,
    pub created_at: UnixMillis,
}

/// An admin API key, without its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminKey {
    pub id: AdminKeyId,
    pub name: AdminKeyName,
    pub scopes: Scopes,
    pub created_at: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

/// An org's unique name: 1 to 63 lower-case ASCII letters, digits and hyphens, starting
/// with a letter or digit (a DNS label, so it can appear in hostnames and URLs).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrgName(String);

/// A human label for an admin key: 1 to 100 characters, no control characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AdminKeyName(String);

/// Why a name was refused; the message is meant for the API client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidNameError(&'static str);

impl OrgName {
    pub fn new(name: &str) -> Result<Self, InvalidNameError> {
        let allowed = |byte: u8| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-';
        if name.is_empty() || name.len() > ORG_NAME_LEN_MAX {
            return Err(InvalidNameError("an org name has 1 to 63 characters"));
        }
        if !name.bytes().all(allowed) || name.starts_with('-') {
            return Err(InvalidNameError(
                "an org name has only lower-case letters, digits and hyphens, and does not start with a hyphen",
            ));
        }
        Ok(OrgName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AdminKeyName {
    pub fn new(name: &str) -> Result<Self, InvalidNameError> {
        let length = name.chars().count();
        if length == 0 || length > ADMIN_KEY_NAME_LEN_MAX {
            return Err(InvalidNameError("a key name has 1 to 100 characters"));
        }
        if name.chars().any(char::is_control) {
            return Err(InvalidNameError("a key name has no control characters"));
        }
        Ok(AdminKeyName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrgName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_names_are_dns_labels() {
        for good in ["a", "acme", "acme-2", "0x", &"a".repeat(ORG_NAME_LEN_MAX)] {
            assert!(OrgName::new(good).is_ok(), "{good:?}");
        }
        for bad in ["", "-acme", "Acme", "acme corp", "acme_2", "acmé", "a'; DROP TABLE orgs;--", &"a".repeat(64)] {
            assert!(OrgName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_names_are_printable_and_bounded() {
        assert!(AdminKeyName::new("CI deploy key — prod").is_ok());
        assert!(AdminKeyName::new("").is_err());
        assert!(AdminKeyName::new("a\nb").is_err());
        assert!(AdminKeyName::new(&"é".repeat(ADMIN_KEY_NAME_LEN_MAX)).is_ok());
        assert!(AdminKeyName::new(&"é".repeat(ADMIN_KEY_NAME_LEN_MAX + 1)).is_err());
    }
}
