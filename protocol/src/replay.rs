//! Replay protection: a message is accepted once, and only if its timestamp is within the
//! clock-skew window of `now`.
//!
//! The window remembers every accepted message id until its timestamp falls out of the
//! window. Memory is bounded by `capacity`: when full, the oldest id is forgotten and the
//! window's lower edge moves up to that id's timestamp, so a forgotten id can never be
//! accepted again (messages older than the edge are refused as too old instead).

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use crate::envelope::EnvelopeHeader;
use crate::ids::MessageId;
use crate::time::UnixMillis;

/// Why a message failed the freshness checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    #[error("message id was already seen")]
    Duplicate,
    #[error("timestamp is older than the replay window")]
    TooOld,
    #[error("timestamp is too far in the future")]
    FromFuture,
    #[error("message expired before it arrived")]
    Expired,
}

#[derive(Debug)]
pub struct ReplayWindow {
    skew: Duration,
    capacity: usize,
    ids: HashSet<MessageId>,
    by_time: BTreeSet<(UnixMillis, MessageId)>,
    /// Timestamps at or below this are refused: their ids may have been forgotten.
    floor: UnixMillis,
}

impl ReplayWindow {
    pub fn new(skew: Duration, capacity: usize) -> ReplayWindow {
        ReplayWindow {
            skew,
            capacity: capacity.max(1),
            ids: HashSet::new(),
            by_time: BTreeSet::new(),
            floor: UnixMillis(0),
        }
    }

    /// Checks freshness and expiry, then records the id. Nothing is recorded on error.
    pub fn check(&mut self, header: &EnvelopeHeader, now: UnixMillis) -> Result<(), ReplayError> {
        self.forget_before(now.saturating_sub(self.skew));
        check_time(header, now, self.skew)?;
        self.check_id(header.message_id, header.timestamp, now)
    }

    /// Records `id` seen with `timestamp`; refuses duplicates and ids the window can no
    /// longer vouch for.
    pub fn check_id(&mut self, id: MessageId, timestamp: UnixMillis, now: UnixMillis) -> Result<(), ReplayError> {
        self.forget_before(now.saturating_sub(self.skew));
        if timestamp <= self.floor {
            return Err(ReplayError::TooOld);
        }
        if !self.ids.insert(id) {
            return Err(ReplayError::Duplicate);
        }
        self.by_time.insert((timestamp, id));
        while self.by_time.len() > self.capacity {
            if let Some((oldest, oldest_id)) = self.by_time.pop_first() {
                self.ids.remove(&oldest_id);
                self.floor = self.floor.max(oldest);
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn forget_before(&mut self, edge: UnixMillis) {
        while let Some(&(timestamp, id)) = self.by_time.first() {
            if timestamp >= edge {
                break;
            }
            self.by_time.pop_first();
            self.ids.remove(&id);
        }
    }
}

/// Timestamp within `skew` of `now`, and not expired.
pub fn check_time(header: &EnvelopeHeader, now: UnixMillis, skew: Duration) -> Result<(), ReplayError> {
    if header.timestamp > now.saturating_add(skew) {
        return Err(ReplayError::FromFuture);
    }
    if header.timestamp < now.saturating_sub(skew) {
        return Err(ReplayError::TooOld);
    }
    if header.expires_at() <= now {
        return Err(ReplayError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Ttl;
    use crate::ids::AgentId;
    use proptest::prelude::*;

    const NOW: UnixMillis = UnixMillis(1_700_000_000_000);
    const SKEW: Duration = Duration::from_secs(300);

    fn header(id: u8, timestamp: UnixMillis, ttl: u32) -> EnvelopeHeader {
        EnvelopeHeader {
            message_id: MessageId::from_bytes([id; 16]),
            sender: AgentId::from_bytes([1; 16]),
            recipient: AgentId::from_bytes([2; 16]),
            timestamp,
            ttl: Ttl::from_secs(ttl).unwrap(),
        }
    }

    #[test]
    fn duplicate_refused_then_forgotten_outside_window() {
        let mut window = ReplayWindow::new(SKEW, 100);
        window.check(&header(1, NOW, 3600), NOW).unwrap();
        assert_eq!(window.check(&header(1, NOW, 3600), NOW), Err(ReplayError::Duplicate));
        // Once the timestamp is outside the window the id is forgotten, and the same
        // message is refused as too old instead.
        let later = NOW.saturating_add(SKEW + Duration::from_millis(1));
        assert_eq!(window.check(&header(1, NOW, 3600), later), Err(ReplayError::TooOld));
        assert!(window.is_empty());
    }

    #[test]
    fn time_checks() {
        let mut window = ReplayWindow::new(SKEW, 100);
        let future = NOW.saturating_add(SKEW + Duration::from_secs(1));
        assert_eq!(window.check(&header(1, future, 3600), NOW), Err(ReplayError::FromFuture));
        let old = NOW.saturating_sub(SKEW + Duration::from_secs(1));
        assert_eq!(window.check(&header(2, old, 3600), NOW), Err(ReplayError::TooOld));
        let expired = NOW.saturating_sub(Duration::from_secs(10));
        assert_eq!(window.check(&header(3, expired, 5), NOW), Err(ReplayError::Expired));
        assert!(window.is_empty(), "refused messages are not recorded");
    }

    #[test]
    fn capacity_holds_and_floor_rises() {
        let mut window = ReplayWindow::new(SKEW, 3);
        for i in 0..5u8 {
            window.check(&header(i, NOW.saturating_add(Duration::from_millis(u64::from(i))), 3600), NOW).unwrap();
            assert!(window.len() <= 3);
        }
        // Ids 0 and 1 were evicted; replaying them is refused as too old, not accepted.
        assert_eq!(window.check(&header(0, NOW, 3600), NOW), Err(ReplayError::TooOld));
        assert_eq!(
            window.check(&header(1, NOW.saturating_add(Duration::from_millis(1)), 3600), NOW),
            Err(ReplayError::TooOld)
        );
        assert_eq!(
            window.check(&header(4, NOW.saturating_add(Duration::from_millis(4)), 3600), NOW),
            Err(ReplayError::Duplicate)
        );
    }

    proptest! {
        /// A replay is the same signed bytes, so the same (id, timestamp). Whatever the
        /// order, timing and capacity pressure, such a pair is accepted at most once.
        #[test]
        fn never_accepts_a_replay(ops in proptest::collection::vec((0u8..40, 0u64..20_000), 1..300)) {
            let mut window = ReplayWindow::new(SKEW, 8);
            let mut accepted = std::collections::BTreeSet::new();
            let mut now = NOW;
            for (id, advance) in ops {
                now = now.saturating_add(Duration::from_millis(advance));
                // Each id has one fixed timestamp, spread over ten minutes.
                let timestamp = NOW.saturating_add(Duration::from_secs(u64::from(id) * 15));
                if window.check(&header(id, timestamp, 7200), now).is_ok() {
                    prop_assert!(accepted.insert(id), "replay of {} accepted", id);
                }
                prop_assert!(window.len() <= 8);
            }
        }
    }
}
