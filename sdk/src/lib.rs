//! What an agent links against to use Molt: connect to an edge over QUIC with mutual TLS,
//! send end-to-end encrypted and signed messages, receive and verify them, and keep the
//! connection up with back-off and jitter; choose the nearest of several edges and fail
//! over between them ([`edges`]); and call the control plane's HTTP API
//! ([`api::ApiClient`]).
#![forbid(unsafe_code)]

pub mod api;
pub mod client;
pub mod dev;
pub mod edges;
pub mod identity;

pub use client::{Client, ClientConfig, Event, IncomingMessage, SendError, SendReport};
pub use edges::{EdgeCandidate, EdgeSelector, EdgeSource, EdgeWeight};
pub use identity::{AgentIdentity, Directory, IdentityError, PeerKeys};
pub use molt_protocol as protocol;
