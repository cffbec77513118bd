//! Per-tenant token buckets: how fast a tenant may invoke and deploy. A bucket holds up to
//! `burst` tokens and refills at `per_second`; each request takes one, or is refused with how
//! long until one is back. Pure: the caller passes the time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Tokens added per second.
    pub per_second: f64,
    /// The most tokens a bucket holds (requests at once after a quiet spell).
    pub burst: f64,
}

/// Buckets per tenant under one limit (none: every request passes).
#[derive(Debug)]
pub struct Buckets {
    limit: Option<Limit>,
    tenants: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept before the full ones are forgotten (a full bucket is the same as none).
const KEPT: usize = 10_000;

impl Buckets {
    pub fn new(limit: Option<Limit>) -> Buckets {
        Buckets {
            limit: limit.filter(|l| l.per_second > 0.0 && l.burst >= 1.0),
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// The limit in force.
    pub fn limit(&self) -> Option<Limit> {
        self.limit
    }

    /// Takes a token of `tenant`'s bucket at `now`, or says how long until one is back.
    pub fn take(&self, tenant: &str, now: Instant) -> Result<(), Duration> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if tenants.len() >= KEPT && !tenants.contains_key(tenant) {
            tenants.retain(|_, b| refilled(b, limit, now) < limit.burst);
        }
        let bucket = tenants.entry(tenant.to_string()).or_insert(Bucket {
            tokens: limit.burst,
            at: now,
        });
        bucket.tokens = refilled(bucket, limit, now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / limit.per_second,
            ))
        }
    }
}

fn refilled(b: &Bucket, limit: Limit, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * limit.per_second).min(limit.burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_tenant() {
        let b = Buckets::new(Some(Limit {
            per_second: 2.0,
            burst: 3.0,
        }));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.take("a", t0), Ok(()));
        }
        let wait = b.take("a", t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        // Another tenant has its own bucket.
        assert_eq!(b.take("b", t0), Ok(()));
        // Half a second later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take("a", t1), Ok(()));
        assert!(b.take("a", t1).is_err());
        // A long quiet spell refills up to the burst, no more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.take("a", t2), Ok(()));
        }
        assert!(b.take("a", t2).is_err());
    }

    #[test]
    fn no_limit_lets_everything_through() {
        let b = Buckets::new(None);
        let now = Instant::now();
        assert!((0..10_000).all(|_| b.take("a", now).is_ok()));
    }
}
