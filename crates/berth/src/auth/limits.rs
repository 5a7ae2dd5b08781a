//! How much one client may ask: failed logins (always throttled, so password guessing is
//! slow), and, when configured, request rates per client address and per account and uploads
//! in flight per client. Rates are GCRA buckets from `governor`, keyed by address or account;
//! every map here is pruned, so a flood of distinct keys costs bounded memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Limits as configured; 0 means off for the request limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitOptions {
    /// Failed logins per minute one account may have before further attempts wait.
    pub failed_logins_per_account: u32,
    /// Failed logins per minute from one client address.
    pub failed_logins_per_address: u32,
    /// Requests per second from one client address (0: unlimited).
    pub requests_per_address: u32,
    /// Requests per second by one account (0: unlimited).
    pub requests_per_account: u32,
    /// Upload requests (PATCH, PUT, POST with a body) in flight per account, or per address
    /// for anonymous clients (0: unlimited).
    pub concurrent_uploads: u32,
}

impl Default for LimitOptions {
    fn default() -> Self {
        LimitOptions {
            failed_logins_per_account: 10,
            failed_logins_per_address: 30,
            requests_per_address: 0,
            requests_per_account: 0,
            concurrent_uploads: 0,
        }
    }
}

/// Most keys any one map here holds; past it, it is emptied (forgetting limits briefly is
/// better than unbounded memory under a flood of distinct keys).
const MAX_KEYS: usize = 100_000;

fn keyed<K: Hash + Eq + Clone>(quota: Quota) -> DefaultKeyedRateLimiter<K> {
    RateLimiter::keyed(quota)
}

fn nonzero(n: u32) -> Option<NonZeroU32> {
    NonZeroU32::new(n)
}

/// Who a limit is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Address(IpAddr),
    Account(String),
}

/// Failed-login throttle: each failure takes a cell from the account's and the address's
/// bucket; once a bucket is empty, attempts for that key wait until it refills.
pub struct LoginThrottle {
    per_account: Option<DefaultKeyedRateLimiter<String>>,
    per_address: Option<DefaultKeyedRateLimiter<IpAddr>>,
    blocked: Mutex<HashMap<ClientKey, Instant>>,
}

impl LoginThrottle {
    pub fn new(options: &LimitOptions) -> LoginThrottle {
        LoginThrottle {
            per_account: nonzero(options.failed_logins_per_account)
                .map(|n| keyed(Quota::per_minute(n))),
            per_address: nonzero(options.failed_logins_per_address)
                .map(|n| keyed(Quota::per_minute(n))),
            blocked: Mutex::default(),
        }
    }

    /// How long `account` from `address` must still wait, if at all.
    pub fn wait(&self, account: &str, address: Option<IpAddr>) -> Option<Duration> {
        let now = Instant::now();
        let blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let until = [
            blocked.get(&ClientKey::Account(account.to_string())),
            address.and_then(|a| blocked.get(&ClientKey::Address(a))),
        ]
        .into_iter()
        .flatten()
        .max()
        .copied()?;
        (until > now).then(|| until - now)
    }

    /// Records a failed login.
    pub fn failed(&self, account: &str, address: Option<IpAddr>) {
        let clock = DefaultClock::default();
        let mut newly_blocked = Vec::new();
        if let Some(limiter) = &self.per_account
            && let Err(not_until) = limiter.check_key(&account.to_string())
        {
            newly_blocked.push((
                ClientKey::Account(account.to_string()),
                not_until.wait_time_from(clock.now()),
            ));
        }
        if let (Some(limiter), Some(address)) = (&self.per_address, address)
            && let Err(not_until) = limiter.check_key(&address)
        {
            newly_blocked.push((
                ClientKey::Address(address),
                not_until.wait_time_from(clock.now()),
            ));
        }
        if newly_blocked.is_empty() {
            return;
        }
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        if blocked.len() >= MAX_KEYS {
            blocked.clear();
        }
        let now = Instant::now();
        for (key, wait) in newly_blocked {
            blocked.insert(key, now + wait);
        }
    }

    /// Forgets what no longer matters (called periodically).
    pub fn prune(&self) {
        let now = Instant::now();
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, until| *until > now);
        if let Some(l) = &self.per_account {
            l.retain_recent();
        }
        if let Some(l) = &self.per_address {
            l.retain_recent();
        }
    }
}

/// Request rates and uploads in flight.
pub struct RequestLimits {
    per_address: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_account: Option<DefaultKeyedRateLimiter<String>>,
    concurrent_uploads: u32,
    uploads: Arc<Mutex<HashMap<ClientKey, u32>>>,
}

/// Refused: retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited(pub Duration);

impl RequestLimits {
    pub fn new(options: &LimitOptions) -> RequestLimits {
        RequestLimits {
            per_address: nonzero(options.requests_per_address).map(|n| keyed(Quota::per_second(n))),
            per_account: nonzero(options.requests_per_account).map(|n| keyed(Quota::per_second(n))),
            concurrent_uploads: options.concurrent_uploads,
            uploads: Arc::default(),
        }
    }

    pub fn is_off(&self) -> bool {
        self.per_address.is_none() && self.per_account.is_none() && self.concurrent_uploads == 0
    }

    pub fn check_address(&self, address: IpAddr) -> Result<(), Limited> {
        match &self.per_address {
            Some(l) => l
                .check_key(&address)
                .map_err(|n| Limited(n.wait_time_from(DefaultClock::default().now()))),
            None => Ok(()),
        }
    }

    pub fn check_account(&self, account: &str) -> Result<(), Limited> {
        match &self.per_account {
            Some(l) => l
                .check_key(&account.to_string())
                .map_err(|n| Limited(n.wait_time_from(DefaultClock::default().now()))),
            None => Ok(()),
        }
    }

    /// A slot for one upload request; released when the returned guard drops.
    pub fn start_upload(&self, key: ClientKey) -> Result<Option<UploadSlot>, Limited> {
        if self.concurrent_uploads == 0 {
            return Ok(None);
        }
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        let n = uploads.entry(key.clone()).or_insert(0);
        if *n >= self.concurrent_uploads {
            return Err(Limited(Duration::from_secs(1)));
        }
        *n += 1;
        Ok(Some(UploadSlot {
            key,
            uploads: self.uploads.clone(),
        }))
    }

    pub fn prune(&self) {
        if let Some(l) = &self.per_address {
            l.retain_recent();
        }
        if let Some(l) = &self.per_account {
            l.retain_recent();
        }
    }
}

/// One upload request in flight.
pub struct UploadSlot {
    key: ClientKey,
    uploads: Arc<Mutex<HashMap<ClientKey, u32>>>,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut uploads = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = uploads.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                uploads.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is the failure
mod tests {
    use super::*;

    #[test]
    fn failed_logins_block_after_the_burst() {
        let t = LoginThrottle::new(&LimitOptions {
            failed_logins_per_account: 3,
            failed_logins_per_address: 100,
            ..LimitOptions::default()
        });
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(t.wait("alice", Some(addr)), None);
            t.failed("alice", Some(addr));
        }
        t.failed("alice", Some(addr));
        let wait = t.wait("alice", Some(addr)).expect("blocked");
        assert!(wait <= Duration::from_secs(20), "{wait:?}");
        assert_eq!(
            t.wait("bob", Some(addr)),
            None,
            "other accounts are not blocked"
        );
    }

    #[test]
    fn uploads_in_flight_are_counted_per_client() {
        let l = RequestLimits::new(&LimitOptions {
            concurrent_uploads: 2,
            ..LimitOptions::default()
        });
        let key = ClientKey::Account("ci".into());
        let a = l.start_upload(key.clone()).unwrap();
        let _b = l.start_upload(key.clone()).unwrap();
        assert!(l.start_upload(key.clone()).is_err());
        assert!(l.start_upload(ClientKey::Account("other".into())).is_ok());
        drop(a);
        assert!(l.start_upload(key).is_ok());
    }

    #[test]
    fn request_rates() {
        let l = RequestLimits::new(&LimitOptions {
            requests_per_address: 5,
            ..LimitOptions::default()
        });
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let ok = (0..20).filter(|_| l.check_address(addr).is_ok()).count();
        assert_eq!(ok, 5, "a burst of one second's worth");
        assert!(l.check_account("anyone").is_ok(), "per-account limit off");
    }
}
