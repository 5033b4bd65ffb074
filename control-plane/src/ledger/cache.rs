//! [`AccountCache`]: account totals a writer remembers between batches, so that a batch
//! reads only the accounts it has not seen before.
//!
//! **Why it is sound without a lease.** Account totals change only through journal
//! entries, and every entry moves the journal head (`seq`, `hash`). A batch reads the
//! head under the head lock, which every ledger writer in every process takes before it
//! touches an account. If the stored head is the one the cache recorded after its last
//! commit, no writer anywhere has journaled anything since, so every cached total is still
//! the stored total; if it differs, the cache starts over. Entries read during a batch are
//! read under the same lock, at the head the cache was validated against. A batch that
//! fails (or whose commit may or may not have happened) empties the cache, so it never has
//! to guess what the database kept.
//!
//! On PostgreSQL the cache runs ahead of the database: it holds the totals the batch
//! being written will leave, and the next batch is computed on them before it takes the
//! head lock. That batch checks its whole basis under the lock and empties the cache
//! when it does not hold ([`super::postgres`]).
//!
//! Pure: no I/O and no clock, like the rest of the books.

use foldhash::HashMap;

use super::types::{Account, AccountId};

/// Accounts the cache holds at most; past this it starts over (one full read).
pub const ACCOUNT_CACHE_ENTRIES_MAX: usize = 1 << 20;

/// A journal head: last sequence number and hash.
pub type Head = (u64, [u8; 32]);

/// Account totals as of `head`.
#[derive(Debug, Default)]
pub struct AccountCache {
    head: Option<Head>,
    accounts: HashMap<AccountId, Account>,
}

impl AccountCache {
    pub fn new() -> AccountCache {
        AccountCache::default()
    }

    /// Called with the stored head while holding the head lock: keeps the entries only if
    /// the journal has not moved since they were recorded.
    pub fn validate(&mut self, stored: Head) {
        if self.head != Some(stored) {
            self.accounts.clear();
            self.head = Some(stored);
        }
    }

    pub fn get(&self, id: &AccountId) -> Option<&Account> {
        self.accounts.get(id)
    }

    pub fn contains(&self, id: &AccountId) -> bool {
        self.accounts.contains_key(id)
    }

    /// Remembers an account read under the head lock at the validated head.
    pub fn insert(&mut self, account: Account) {
        if self.accounts.len() >= ACCOUNT_CACHE_ENTRIES_MAX {
            self.accounts.clear();
        }
        self.accounts.insert(account.id.clone(), account);
    }

    /// The batch committed (or, on PostgreSQL, will): its final totals and its head are
    /// now the stored ones. Every one of them stays, however full the cache was.
    pub fn committed(&mut self, accounts: &[Account], head: Head) {
        if self.accounts.len() + accounts.len() > ACCOUNT_CACHE_ENTRIES_MAX {
            self.accounts.clear();
        }
        for account in accounts {
            match self.accounts.get_mut(&account.id) {
                // Most are known already: their totals change, their ids stay.
                Some(cached) => cached.set_totals(account.totals()),
                None => {
                    self.accounts.insert(account.id.clone(), account.clone());
                }
            }
        }
        self.head = Some(head);
    }

    /// Forgets everything (a batch failed; what the database kept is unknown).
    pub fn invalidate(&mut self) {
        self.accounts.clear();
        self.head = None;
    }

    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::types::Credits;

    fn account(id: &AccountId, credits: u64) -> Account {
        let mut account = Account::new(id.clone());
        account.credits_posted = Credits::new(credits).unwrap();
        account
    }

    #[test]
    fn entries_survive_only_while_the_head_is_the_recorded_one() {
        let treasury = AccountId::treasury();
        let mut cache = AccountCache::new();
        cache.validate((0, [0; 32]));
        cache.insert(account(&treasury, 1));
        cache.committed(&[account(&treasury, 5)], (3, [3; 32]));
        cache.validate((3, [3; 32]));
        assert_eq!(cache.get(&treasury).map(|a| a.credits_posted.micros()), Some(5));
        // Another writer journaled something: everything goes.
        cache.validate((4, [4; 32]));
        assert!(cache.is_empty());
    }

    #[test]
    fn a_failed_batch_empties_the_cache() {
        let treasury = AccountId::treasury();
        let mut cache = AccountCache::new();
        cache.validate((1, [1; 32]));
        cache.insert(account(&treasury, 1));
        cache.invalidate();
        cache.validate((1, [1; 32]));
        assert!(!cache.contains(&treasury));
    }
}
