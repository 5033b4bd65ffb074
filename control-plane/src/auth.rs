//! Admin credentials: bearer tokens, their hashes and scopes.
//!
//! A token is `molt_admin_` followed by 32 random bytes in unpadded base64url. Only its
//! SHA-256 hash is stored. A request's token is hashed and the row is looked up by that
//! hash; as the token has 256 bits of entropy, the lookup's timing says nothing useful
//! about other tokens, and the final equality check is constant-time anyway. Keys are
//! revoked, never deleted, so the audit trail stays.
//!
//! The first start against an empty database creates the *bootstrap* credential with
//! every scope ([`crate::db::Database::bootstrap_admin_key`]). The database decides who
//! creates it (a unique slot), so replicas starting together create exactly one.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

/// Text every admin token starts with, so that scanners recognise leaked ones.
pub const ADMIN_TOKEN_PREFIX: &str = "molt_admin_";
/// Random bytes in a token.
pub const ADMIN_TOKEN_RANDOM_BYTES: usize = 32;
/// Length of the base64url part of a token.
pub const ADMIN_TOKEN_ENCODED_LEN: usize = 43;
/// Name given to the bootstrap credential.
pub const BOOTSTRAP_KEY_NAME: &str = "bootstrap";

const _: () = assert!(ADMIN_TOKEN_ENCODED_LEN == (ADMIN_TOKEN_RANDOM_BYTES * 8).div_ceil(6));

/// What an admin key may do. Scopes are independent: none implies another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// `read`: list and read orgs.
    Read,
    /// `orgs:write`: create orgs.
    OrgsWrite,
    /// `keys:admin`: create, list and revoke admin keys.
    KeysAdmin,
    /// `ca:write`: create org CAs, issue and revoke certificates.
    CaWrite,
    /// `ledger:admin`: mint credits, set the fee, rule on escrow disputes, slash stakes,
    /// read any account and audit the ledger.
    LedgerAdmin,
}

impl Scope {
    /// Every scope; the bootstrap credential holds all of them.
    pub const ALL: [Scope; 5] = [Scope::Read, Scope::OrgsWrite, Scope::KeysAdmin, Scope::CaWrite, Scope::LedgerAdmin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::OrgsWrite => "orgs:write",
            Scope::KeysAdmin => "keys:admin",
            Scope::CaWrite => "ca:write",
            Scope::LedgerAdmin => "ledger:admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text is not a known scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?} (known: read, orgs:write, keys:admin, ca:write, ledger:admin)")]
pub struct UnknownScopeError(pub String);

impl FromStr for Scope {
    type Err = UnknownScopeError;

    fn from_str(text: &str) -> Result<Self, UnknownScopeError> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == text).ok_or_else(|| UnknownScopeError(text.to_owned()))
    }
}

/// A set of scopes; stored as the scope names separated by spaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scopes(BTreeSet<Scope>);

impl Scopes {
    pub fn all() -> Self {
        Scopes(Scope::ALL.into_iter().collect())
    }

    pub fn contains(&self, scope: Scope) -> bool {
        self.0.contains(&scope)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = Scope> + '_ {
        self.0.iter().copied()
    }

    /// The stored form: names in a fixed order, separated by single spaces.
    pub fn to_stored(&self) -> String {
        self.iter().map(Scope::as_str).collect::<Vec<_>>().join(" ")
    }

    /// Parses the stored form.
    pub fn from_stored(text: &str) -> Result<Self, UnknownScopeError> {
        text.split_ascii_whitespace().map(str::parse).collect::<Result<_, _>>().map(Scopes)
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Scopes(iter.into_iter().collect())
    }
}

/// A secret admin token. Zeroed on drop; `Debug` does not show it.
pub struct AdminToken(Zeroizing<String>);

impl AdminToken {
    /// A fresh random token.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; ADMIN_TOKEN_RANDOM_BYTES]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        let encoded = Zeroizing::new(data_encoding::BASE64URL_NOPAD.encode(bytes.as_ref()));
        AdminToken(Zeroizing::new(format!("{ADMIN_TOKEN_PREFIX}{}", encoded.as_str())))
    }

    /// Accepts text of the token's shape; anything else cannot be a token.
    pub fn parse(text: &str) -> Option<Self> {
        let encoded = text.strip_prefix(ADMIN_TOKEN_PREFIX)?;
        let well_formed = encoded.len() == ADMIN_TOKEN_ENCODED_LEN
            && data_encoding::BASE64URL_NOPAD.decode(encoded.as_bytes()).is_ok_and(|bytes| bytes.len() == 32);
        well_formed.then(|| AdminToken(Zeroizing::new(text.to_owned())))
    }

    /// The token text, to show the user once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.0.as_bytes()).into())
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// SHA-256 of an admin token: what the database stores.
#[derive(Clone, Copy, Debug)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Constant-time equality.
    pub fn matches(&self, stored: &[u8]) -> bool {
        self.0.as_slice().ct_eq(stored).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_documented_shape_and_parse_back() {
        let token = AdminToken::generate();
        assert!(token.expose().starts_with(ADMIN_TOKEN_PREFIX));
        assert_eq!(token.expose().len(), ADMIN_TOKEN_PREFIX.len() + ADMIN_TOKEN_ENCODED_LEN);
        let parsed = AdminToken::parse(token.expose()).expect("a generated token parses");
        assert!(parsed.hash().matches(&token.hash().0));
        assert!(!AdminToken::generate().hash().matches(&token.hash().0));
        assert!(!token.hash().matches(&token.hash().0[..31]), "length differs");
        assert!(!format!("{token:?}").contains(token.expose()));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let token = AdminToken::generate();
        let body = &token.expose()[ADMIN_TOKEN_PREFIX.len()..];
        for bad in [String::new(), body.to_owned(), format!("molt_adm_{body}"), format!("{}x", token.expose())] {
            assert!(AdminToken::parse(&bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn scopes_round_trip_through_the_stored_form() {
        let scopes: Scopes = [Scope::KeysAdmin, Scope::Read].into_iter().collect();
        assert_eq!(scopes.to_stored(), "read keys:admin");
        assert_eq!(Scopes::from_stored(&scopes.to_stored()), Ok(scopes));
        assert_eq!(Scopes::from_stored("read bogus"), Err(UnknownScopeError("bogus".into())));
        assert_eq!(Scopes::all().iter().count(), Scope::ALL.len());
    }
}
