//! Tokens that verified recently, so a client sending the same bearer token on every call pays for the signature
//! check once rather than per call (HS256 verification was ~13 % of a status read's instructions).
//!
//! Only the exact token text hits: a token with any byte changed is a different key and is verified in full. A hit
//! is honoured only inside the token's own validity (`nbf <= now < exp`, without the verifier's leeway), so a
//! cached token expires exactly as a verified one would. The map is bounded; when full, the oldest entry goes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use super::auth::Identity;

/// Entries kept unless configured otherwise: far more than the distinct tokens one replica sees in a token's life.
pub const DEFAULT_CAPACITY: usize = 4096;

/// What a verified token proved and for how long (seconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub identity: Identity,
    pub exp: u64,
    pub nbf: Option<u64>,
}

impl Verified {
    fn valid_at(&self, now: u64) -> bool {
        now < self.exp && self.nbf.is_none_or(|nbf| nbf <= now)
    }
}

/// A bounded map from token text to what it proved.
#[derive(Debug)]
pub struct VerifiedTokens {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Box<str>, Verified>,
    /// Insertion order, oldest first; holds exactly the keys of `entries` (a key is pushed only when new).
    order: VecDeque<Box<str>>,
}

impl VerifiedTokens {
    /// A cache of at most `capacity` tokens; 0 caches nothing.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every statement leaves the map consistent, so a panic elsewhere does not poison its meaning.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The identity `token` proved, if it verified before and is valid at `now`.
    pub fn get(&self, token: &str, now: u64) -> Option<Identity> {
        let inner = self.lock();
        let verified = inner.entries.get(token)?;
        verified.valid_at(now).then(|| verified.identity.clone())
    }

    /// Remembers a token that has just verified in full.
    pub fn insert(&self, token: &str, verified: Verified) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        if let Some(existing) = inner.entries.get_mut(token) {
            *existing = verified;
            return;
        }
        while inner.entries.len() >= self.capacity {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            inner.entries.remove(&oldest);
        }
        let key: Box<str> = token.into();
        inner.order.push_back(key.clone());
        inner.entries.insert(key, verified);
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::UserId;

    fn verified(user: &str, exp: u64, nbf: Option<u64>) -> Verified {
        Verified {
            identity: Identity {
                user: UserId::parse("sub", user).unwrap(),
                org: None,
            },
            exp,
            nbf,
        }
    }

    #[test]
    fn a_cached_token_still_expires_and_waits_for_nbf() {
        let cache = VerifiedTokens::new(8);
        cache.insert("t1", verified("alice", 100, Some(50)));
        assert_eq!(cache.get("t1", 49), None);
        assert_eq!(
            cache.get("t1", 50).map(|i| i.user.to_string()),
            Some("alice".to_owned())
        );
        assert!(cache.get("t1", 99).is_some());
        assert_eq!(cache.get("t1", 100), None);
        assert_eq!(cache.get("t1", 10_000), None);
    }

    #[test]
    fn only_the_exact_token_hits() {
        let cache = VerifiedTokens::new(8);
        cache.insert("abc.def.ghi", verified("alice", 100, None));
        assert!(cache.get("abc.def.ghi", 1).is_some());
        assert_eq!(cache.get("abc.def.ghj", 1), None);
        assert_eq!(cache.get("abc.def.gh", 1), None);
        assert_eq!(cache.get("abc.def.ghi ", 1), None);
    }

    #[test]
    fn the_bound_holds_and_the_oldest_go_first() {
        let cache = VerifiedTokens::new(4096);
        for i in 0..10_000 {
            cache.insert(&format!("token-{i}"), verified("alice", 100, None));
            assert!(cache.len() <= 4096);
        }
        assert_eq!(cache.len(), 4096);
        assert!(cache.get("token-0", 1).is_none());
        assert!(cache.get("token-9999", 1).is_some());
        // Re-inserting a present token neither grows the map nor the order.
        for _ in 0..100 {
            cache.insert("token-9999", verified("alice", 100, None));
        }
        let inner = cache.lock();
        assert_eq!(inner.entries.len(), 4096);
        assert_eq!(inner.order.len(), 4096);
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let cache = VerifiedTokens::new(0);
        cache.insert("t", verified("alice", 100, None));
        assert!(cache.is_empty());
        assert!(cache.get("t", 1).is_none());
    }
}
