//! The Molt edge relay.
//!
//! Agents connect over QUIC (ALPN `molt/1`) with mutual TLS. For every message the edge
//! checks the sender is the authenticated peer, the timestamp, TTL and replay window, the
//! rate limits and the Ed25519 signature, then forwards it to the recipient's live
//! connection or writes it to the durable offline buffer ([`store`]). The recipient's
//! signed receipt deletes the buffered copy and travels back to the sender.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod control;
pub mod enroll;
pub mod federation;
pub mod identity;
pub mod live;
pub mod metrics;
pub mod migrate;
pub mod ratelimit;
pub mod relay;
pub mod reload;
pub mod server;
pub mod store;
pub mod trust;

pub use server::{Edge, EdgeHandle};
