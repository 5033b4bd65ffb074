//! Molt keys in PKCS#11 hardware.
//!
//! The model: a [`Token`] is one logged-in PKCS#11 token of one module (a shared
//! library). It owns a bounded pool of sessions, because a PKCS#11 session may be used
//! by one thread at a time. An [`HsmKey`] is an Ed25519 key pair generated inside the
//! token (the private half sensitive and never extractable); it implements
//! [`molt_protocol::keys::Signer`], the one signing abstraction shared with software
//! keys, so certificate issuance, TLS and the ceremony do not care where a key lives.
//!
//! On top of that: [`ceremony`] runs reviewed key ceremonies with a hash-chained,
//! signed [`transcript`], [`doctor`] checks a module for real, and [`softhsm`] sets up
//! throw-away SoftHSM2 tokens for rehearsals and tests. HSM-held TLS keys go through
//! `molt_protocol::tls::server_config_with_signer` and friends with an `Arc<HsmKey>`.
//!
//! PINs come from a prompt, a file or an environment variable ([`PinSource`]), never
//! from a ceremony file.

pub mod ceremony;
pub mod doctor;
pub mod error;
pub mod key;
pub mod pin;
pub mod rehearsal;
pub mod softhsm;
pub mod token;
pub mod transcript;

pub use error::{FindKeyError, GenerateKeyError, OpenError, Pkcs11Failure};
pub use key::{HsmKey, KeyProtection};
pub use pin::{PinError, PinSource};
pub use token::{SESSION_POOL_SIZE_DEFAULT, SESSION_POOL_SIZE_MAX, Token, TokenConfig, TokenSelector};
