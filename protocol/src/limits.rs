//! Hard limits of the protocol and the defaults that deployments may tighten or loosen.
//! Every decoder checks its input against these before allocating.

use std::time::Duration;

/// Largest payload (ciphertext) an envelope may carry: 1 MiB.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Fixed part of an encoded envelope: version, kind, message id, sender, recipient,
/// timestamp, TTL, payload length, signature.
pub const ENVELOPE_OVERHEAD_BYTES: usize = 1 + 1 + 16 + 16 + 16 + 8 + 4 + 4 + 64;
/// Largest encoded envelope.
pub const MAX_ENVELOPE_BYTES: usize = MAX_PAYLOAD_BYTES + ENVELOPE_OVERHEAD_BYTES;
/// Largest frame body on a QUIC stream (one envelope plus the frame header).
pub const MAX_FRAME_BYTES: usize = MAX_ENVELOPE_BYTES + 64;
/// Longest human-readable detail text in an error frame.
pub const MAX_ERROR_DETAIL_BYTES: usize = 512;

/// Longest time-to-live a sender may ask for: 7 days.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default clock skew tolerated between a sender's timestamp and the edge's clock.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Default per-agent message rate.
pub const DEFAULT_MESSAGES_PER_MINUTE: u32 = 1_000;
pub const DEFAULT_MESSAGES_PER_HOUR: u32 = 50_000;
/// Default per-agent payload volume per minute: 100 MiB.
pub const DEFAULT_BYTES_PER_MINUTE: u64 = 100 * 1024 * 1024;
pub const DEFAULT_CONNECTIONS_PER_AGENT: u32 = 5;
pub const DEFAULT_CONNECTIONS_PER_IP: u32 = 100;

/// Default offline queue depth per recipient and how long messages are kept.
pub const DEFAULT_QUEUE_DEPTH_PER_AGENT: u32 = 10_000;
pub const DEFAULT_QUEUE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How many message ids a replay window remembers before it narrows its time window.
pub const DEFAULT_REPLAY_WINDOW_CAPACITY: usize = 1 << 20;

// Length prefixes on the wire are u32.
const _: () = assert!(MAX_FRAME_BYTES < u32::MAX as usize);
const _: () = assert!(MAX_ENVELOPE_BYTES < MAX_FRAME_BYTES);
const _: () = assert!(MAX_ERROR_DETAIL_BYTES < u16::MAX as usize);
const _: () = assert!(RECONNECT_BACKOFF_MIN.as_millis() < RECONNECT_BACKOFF_MAX.as_millis());
