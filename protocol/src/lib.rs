//! Sans-IO core of Molt, shared by the edge, the control plane, the SDK and the CLI.
//!
//! The model: every agent and edge has a stable id derived from its first (inception)
//! Ed25519 key; certificates bind its *current* key to that id. Agents exchange
//! [`envelope`]s: the payload is encrypted for the recipient with HPKE ([`e2e`]) and the
//! whole encoded envelope is signed by the sender. Edges verify signatures, replay windows
//! ([`replay`]) and certificates ([`cert`]) and move envelopes over QUIC streams as
//! [`frame`]s. Hard limits live in [`limits`].
//!
//! Nothing here touches sockets, clocks, threads or an async runtime: time is passed in as
//! [`time::UnixMillis`], randomness as an RNG argument.
#![forbid(unsafe_code)]

pub mod cert;
pub mod e2e;
pub mod envelope;
pub mod frame;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod receipt;
pub mod replay;
pub mod request;
pub mod time;
#[cfg(feature = "tls")]
pub mod tls;
mod wire;

pub use ids::{AgentId, EdgeId, MessageId};
pub use keys::{PublicKey, Signature, SigningKey};
pub use time::UnixMillis;
