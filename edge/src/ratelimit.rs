//! Admission limits: GCRA rate limits per agent (messages per minute and per hour, payload
//! bytes per minute) and concurrency limits on connections (per agent, per source IP).
//!
//! Connection slots are RAII guards: a slot is returned when its guard drops, whatever way
//! the connection ends.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use molt_protocol::AgentId;

/// Per-agent message limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageLimits {
    pub messages_per_minute: NonZeroU32,
    pub messages_per_hour: NonZeroU32,
    pub bytes_per_minute: NonZeroU32,
}

/// Which limit refused a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateLimited {
    #[error("more than the allowed messages per minute")]
    MessagesPerMinute,
    #[error("more than the allowed messages per hour")]
    MessagesPerHour,
    #[error("more than the allowed bytes per minute")]
    BytesPerMinute,
}

/// The per-agent limiters. Their limits can be replaced while the edge runs
/// ([`MessageLimiter::set_limits`], on a config reload).
#[derive(Debug)]
pub struct MessageLimiter {
    buckets: RwLock<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    limits: MessageLimits,
    per_minute: DefaultKeyedRateLimiter<AgentId>,
    per_hour: DefaultKeyedRateLimiter<AgentId>,
    bytes: DefaultKeyedRateLimiter<AgentId>,
}

impl Buckets {
    fn new(limits: MessageLimits) -> Buckets {
        Buckets {
            limits,
            per_minute: RateLimiter::keyed(Quota::per_minute(limits.messages_per_minute)),
            per_hour: RateLimiter::keyed(Quota::per_hour(limits.messages_per_hour)),
            bytes: RateLimiter::keyed(Quota::per_minute(limits.bytes_per_minute)),
        }
    }
}

impl MessageLimiter {
    pub fn new(limits: MessageLimits) -> MessageLimiter {
        MessageLimiter { buckets: RwLock::new(Buckets::new(limits)) }
    }

    /// Admits one message of `bytes` from `agent`, or says which limit it broke.
    pub fn check(&self, agent: &AgentId, bytes: usize) -> Result<(), RateLimited> {
        let buckets = self.buckets.read().unwrap_or_else(|p| p.into_inner());
        buckets.per_minute.check_key(agent).map_err(|_| RateLimited::MessagesPerMinute)?;
        buckets.per_hour.check_key(agent).map_err(|_| RateLimited::MessagesPerHour)?;
        let cells = NonZeroU32::new(u32::try_from(bytes).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        match buckets.bytes.check_key_n(agent, cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(RateLimited::BytesPerMinute),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> MessageLimits {
        self.buckets.read().unwrap_or_else(|p| p.into_inner()).limits
    }

    /// Replaces the limits. Every agent starts again with a full allowance under the new
    /// limits: GCRA state is not portable between quotas.
    pub fn set_limits(&self, limits: MessageLimits) {
        *self.buckets.write().unwrap_or_else(|p| p.into_inner()) = Buckets::new(limits);
    }

    /// Forgets agents whose buckets are full again; bounds memory. Call periodically.
    pub fn housekeeping(&self) {
        let buckets = self.buckets.read().unwrap_or_else(|p| p.into_inner());
        buckets.per_minute.retain_recent();
        buckets.per_hour.retain_recent();
        buckets.bytes.retain_recent();
        buckets.per_minute.shrink_to_fit();
        buckets.per_hour.shrink_to_fit();
        buckets.bytes.shrink_to_fit();
    }
}

/// Counts concurrent holders per key, up to a maximum.
#[derive(Debug)]
pub struct SlotTable<K: Eq + Hash> {
    max: AtomicU32,
    held: Mutex<HashMap<K, u32>>,
}

/// A held slot; returned on drop.
#[derive(Debug)]
pub struct Slot<K: Eq + Hash + Clone> {
    table: Arc<SlotTable<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> SlotTable<K> {
    pub fn new(max: u32) -> Arc<SlotTable<K>> {
        Arc::new(SlotTable { max: AtomicU32::new(max), held: Mutex::new(HashMap::new()) })
    }

    /// The maximum per key.
    pub fn max(&self) -> u32 {
        self.max.load(Ordering::Relaxed)
    }

    /// Changes the maximum per key. Slots already held are kept; a key above a lowered
    /// maximum gets no new slot until it is below it.
    pub fn set_max(&self, max: u32) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Takes a slot for `key`, or `None` if `key` already holds the maximum.
    pub fn acquire(self: &Arc<Self>, key: K) -> Option<Slot<K>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let count = held.entry(key.clone()).or_default();
        if *count >= self.max.load(Ordering::Relaxed) {
            return None;
        }
        *count += 1;
        Some(Slot { table: self.clone(), key })
    }

    pub fn held(&self, key: &K) -> u32 {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0)
    }
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut held = self.table.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

pub type IpSlots = SlotTable<IpAddr>;
pub type AgentSlots = SlotTable<AgentId>;

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn per_minute_limit_holds_per_agent() {
        let limiter = MessageLimiter::new(MessageLimits {
            messages_per_minute: nz(10),
            messages_per_hour: nz(100),
            bytes_per_minute: nz(1 << 20),
        });
        let flooder = AgentId::from_bytes([1; 16]);
        let quiet = AgentId::from_bytes([2; 16]);
        let admitted = (0..50).filter(|_| limiter.check(&flooder, 100).is_ok()).count();
        assert_eq!(admitted, 10);
        assert_eq!(limiter.check(&flooder, 100), Err(RateLimited::MessagesPerMinute));
        assert!(limiter.check(&quiet, 100).is_ok(), "another agent is not affected");
    }

    #[test]
    fn hour_and_byte_limits_hold() {
        let limiter = MessageLimiter::new(MessageLimits {
            messages_per_minute: nz(100),
            messages_per_hour: nz(3),
            bytes_per_minute: nz(1000),
        });
        let agent = AgentId::from_bytes([1; 16]);
        for _ in 0..3 {
            limiter.check(&agent, 10).unwrap();
        }
        assert_eq!(limiter.check(&agent, 10), Err(RateLimited::MessagesPerHour));
        let other = AgentId::from_bytes([2; 16]);
        assert_eq!(limiter.check(&other, 1001), Err(RateLimited::BytesPerMinute));
        limiter.check(&other, 600).unwrap();
        assert_eq!(limiter.check(&other, 600), Err(RateLimited::BytesPerMinute));
    }

    #[test]
    fn slots_are_bounded_and_returned_on_drop() {
        let table: Arc<SlotTable<u8>> = SlotTable::new(2);
        let a = table.acquire(1).unwrap();
        let b = table.acquire(1).unwrap();
        assert!(table.acquire(1).is_none());
        assert!(table.acquire(2).is_some());
        drop(a);
        assert_eq!(table.held(&1), 1);
        assert!(table.acquire(1).is_some());
        drop(b);
    }
}
