//! Verified tokens, remembered until they expire (or for [`TTL`], whichever
//! comes first), so a client sending the same bearer token on every request
//! pays for the signature check once, not per request.
//!
//! Only tokens that passed every check are kept: a failure is never cached,
//! so a bad token costs its verification each time, as before. A signing
//! key that leaves the Auth Service's JWKS stops admitting the tokens it
//! signed within [`TTL`]. At most [`MAX_ENTRIES`] tokens are kept; past that
//! the expired ones go, and if that is not enough, all of them.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;

use super::Principal;

/// How long a verified token is trusted without a new check.
pub const TTL: Duration = Duration::from_secs(60);
/// Most tokens remembered at once: a token for each of 10,000 tenants'
/// several users (an entry is a few hundred bytes: about 25 MB at most).
pub const MAX_ENTRIES: usize = 50_000;

#[derive(Debug, Default)]
pub struct TokenCache {
    entries: DashMap<Box<str>, (Principal, Instant)>,
}

impl TokenCache {
    /// The principal of a token verified earlier and not expired since.
    pub fn get(&self, token: &str) -> Option<Principal> {
        let hit = self.entries.get(token)?;
        let (principal, until) = hit.value();
        if Instant::now() < *until {
            return Some(principal.clone());
        }
        drop(hit);
        self.entries.remove(token);
        None
    }

    /// Remembers a token that was just verified; `exp` is its expiry
    /// (seconds since the epoch).
    pub fn put(&self, token: &str, principal: &Principal, exp: u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Some(left) = exp.checked_sub(now).filter(|s| *s > 0) else {
            return;
        };
        let until = Instant::now() + TTL.min(Duration::from_secs(left));
        if self.entries.len() >= MAX_ENTRIES {
            let now = Instant::now();
            self.entries.retain(|_, (_, until)| *until > now);
            if self.entries.len() >= MAX_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries
            .insert(token.into(), (principal.clone(), until));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal() -> Principal {
        Principal {
            subject: "u".into(),
            tenant: None,
            role: None,
            platform_admin: true,
        }
    }

    fn in_secs(s: u64) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + s
    }

    #[test]
    fn a_verified_token_is_remembered() {
        let cache = TokenCache::default();
        assert!(cache.get("t").is_none());
        cache.put("t", &principal(), in_secs(3600));
        assert_eq!(cache.get("t").map(|p| p.subject), Some("u".into()));
        assert!(cache.get("other").is_none());
    }

    #[test]
    fn an_expired_token_is_not_kept() {
        let cache = TokenCache::default();
        cache.put("t", &principal(), in_secs(0));
        assert!(cache.get("t").is_none());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = TokenCache::default();
        for i in 0..MAX_ENTRIES + 10 {
            cache.put(&format!("t{i}"), &principal(), in_secs(3600));
        }
        assert!(cache.entries.len() <= MAX_ENTRIES);
        assert!(cache.get(&format!("t{}", MAX_ENTRIES + 9)).is_some());
    }
}
