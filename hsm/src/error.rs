//! Typed errors. Each names the PKCS#11 call that failed and its `CKR_` return value.

use std::fmt;
use std::path::PathBuf;

use cryptoki::error::{Error as CryptokiError, RvError};

use crate::pin::PinError;

/// One PKCS#11 call that failed: `C_Login returned CKR_PIN_INCORRECT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{function} returned {code}")]
pub struct Pkcs11Failure {
    /// The PKCS#11 function, e.g. `C_Sign`.
    pub function: String,
    /// The return value, e.g. `CKR_PIN_INCORRECT`, or what went wrong outside the module.
    pub code: String,
    /// The return value as cryptoki knows it, when the module returned one.
    pub rv: Option<RvError>,
}

impl Pkcs11Failure {
    /// Wraps a cryptoki error; `call` names the operation when cryptoki does not.
    pub fn from_cryptoki(call: &str, error: CryptokiError) -> Pkcs11Failure {
        match error {
            CryptokiError::Pkcs11(rv, function) => {
                Pkcs11Failure { function: format!("C_{function:?}"), code: ckr_name(rv), rv: Some(rv) }
            }
            other => Pkcs11Failure { function: call.to_owned(), code: other.to_string(), rv: None },
        }
    }

    pub fn is(&self, rv: RvError) -> bool {
        self.rv == Some(rv)
    }

    /// Whether the session that saw this failure can no longer be used.
    pub fn session_is_dead(&self) -> bool {
        matches!(
            self.rv,
            Some(
                RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::DeviceRemoved
                    | RvError::DeviceError
                    | RvError::TokenNotPresent
                    | RvError::UserNotLoggedIn
            )
        )
    }
}

/// `PinIncorrect` → `CKR_PIN_INCORRECT`.
fn ckr_name(rv: RvError) -> String {
    let debug = format!("{rv:?}");
    let mut name = String::from("CKR");
    for character in debug.chars() {
        if character.is_ascii_uppercase() {
            name.push('_');
        }
        if character.is_ascii_alphanumeric() {
            name.push(character.to_ascii_uppercase());
        } else {
            break;
        }
    }
    name
}

/// Why a module could not be opened or a token could not be selected or logged into.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error(
        "opening pkcs#11 module {path}: no such file (is the module installed? for SoftHSM2: apt-get install softhsm2)"
    )]
    ModuleNotFound { path: PathBuf },
    #[error("opening pkcs#11 module {path}: {detail}")]
    ModuleLoad { path: PathBuf, detail: String },
    #[error("opening pkcs#11 module: {0}")]
    Module(Pkcs11Failure),
    #[error("selecting token: no initialised token is labelled {label:?} (tokens present: {})", Available(.available))]
    TokenNotFound { label: String, available: Vec<String> },
    #[error("selecting token: more than one token is labelled {label:?}")]
    TokenAmbiguous { label: String },
    #[error("selecting token: slot index {index} is out of range ({count} slots with a token)")]
    SlotIndexOutOfRange { index: usize, count: usize },
    #[error("selecting token: {0}")]
    Slot(Pkcs11Failure),
    #[error("opening a session: {0}")]
    Session(Pkcs11Failure),
    #[error("reading the pin: {0}")]
    Pin(#[from] PinError),
    #[error("logging in to token {label:?}: wrong pin (C_Login returned CKR_PIN_INCORRECT)")]
    WrongPin { label: String },
    #[error("logging in to token {label:?}: the pin is locked (C_Login returned CKR_PIN_LOCKED)")]
    PinLocked { label: String },
    #[error("logging in to token {label:?}: {failure}")]
    Login { label: String, failure: Pkcs11Failure },
}

struct Available<'a>(&'a [String]);

impl fmt::Display for Available<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let quoted: Vec<String> = self.0.iter().map(|label| format!("{label:?}")).collect();
        f.write_str(&quoted.join(", "))
    }
}

/// Why an Ed25519 key pair could not be generated on the token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateKeyError {
    #[error("generating key {label:?}: the token already holds an object with this label")]
    LabelExists { label: String },
    #[error("generating key {label:?}: the label must be 1 to 64 printable characters")]
    InvalidLabel { label: String },
    #[error("generating key {label:?}: the token does not support Ed25519 key generation ({failure})")]
    Unsupported { label: String, failure: Pkcs11Failure },
    #[error("generating key {label:?}: {failure}")]
    Pkcs11 { label: String, failure: Pkcs11Failure },
    #[error("generating key {label:?}: the token returned an unusable public key: {detail}")]
    BadPublicKey { label: String, detail: String },
}

/// Why a key could not be found on the token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FindKeyError {
    #[error("finding key {name}: no Ed25519 private key with this name on the token")]
    NotFound { name: String },
    #[error("finding key {name}: {count} private keys carry this name")]
    Ambiguous { name: String, count: usize },
    #[error("finding key {name}: the key is not an Ed25519 key")]
    NotEd25519 { name: String },
    #[error("finding key {name}: no public key object shares the private key's id")]
    NoPublicKey { name: String },
    #[error("finding key {name}: {failure}")]
    Pkcs11 { name: String, failure: Pkcs11Failure },
    #[error("finding key {name}: the token returned an unusable public key: {detail}")]
    BadPublicKey { name: String, detail: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_values_print_as_ckr_names() {
        assert_eq!(ckr_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(ckr_name(RvError::MechanismInvalid), "CKR_MECHANISM_INVALID");
        let failure = Pkcs11Failure::from_cryptoki(
            "C_Login",
            CryptokiError::Pkcs11(RvError::PinIncorrect, cryptoki::context::Function::Login),
        );
        assert_eq!(failure.to_string(), "C_Login returned CKR_PIN_INCORRECT");
        assert!(failure.is(RvError::PinIncorrect));
    }
}
