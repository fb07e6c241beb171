//! Per-source token buckets for answers to unauthenticated requests over UDP
//! (Binding answers, 401/438 challenges, 400/420 errors), so turnd cannot be
//! used to reflect traffic at a spoofed victim faster than `rate` answers a
//! second.
//!
//! The table is a fixed array of buckets indexed by a keyed hash of the
//! source IP, allocated once: a flood from many (spoofed) addresses costs no
//! memory and no bookkeeping. Two addresses that share a bucket share its
//! budget; the hash is SipHash-1-3 under a key the caller passes in (derived
//! from the random nonce key in turnd), so an attacker cannot aim a
//! collision at a chosen victim, while a test or a fuzz run that fixes the
//! key sees the same collisions every time.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use siphasher::sip::SipHasher13;
use std::time::Instant;

/// Buckets in the table (16 bytes each).
pub const BUCKETS: usize = 8192;

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// 1 + milliseconds since `base` when the bucket was last topped up; 0 = never used.
    stamp_ms: u64,
    /// Tokens in thousandths.
    milli: u64,
}

pub struct RateLimiter {
    /// Tokens per second; 0 disables the limiter.
    rate: u32,
    /// Capacity in thousandths of a token (a burst of `rate` answers).
    cap_milli: u64,
    buckets: Box<[Bucket]>,
    key: [u8; 16],
    base: Option<Instant>,
}

impl RateLimiter {
    /// `rate` answers a second per source, with bursts of `rate`; 0 = off.
    /// `key` keys the hash that picks a source's bucket.
    pub fn new(rate: u32, key: [u8; 16]) -> Self {
        let buckets = if rate == 0 { Box::default() } else { vec![Bucket::default(); BUCKETS].into_boxed_slice() };
        RateLimiter { rate, cap_milli: rate as u64 * 1000, buckets, key, base: None }
    }

    fn bucket_of(&self, ip: IpAddr) -> usize {
        let mut h = SipHasher13::new_with_key(&self.key);
        ip.hash(&mut h);
        (h.finish() % self.buckets.len() as u64) as usize
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Takes one token for `ip` at `now`; false when its bucket is empty.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let base = *self.base.get_or_insert(now);
        let now_ms = now.saturating_duration_since(base).as_millis() as u64 + 1;
        let i = self.bucket_of(ip);
        let b = &mut self.buckets[i];
        if b.stamp_ms == 0 {
            // Never used: starts full.
            b.milli = self.cap_milli;
        } else {
            let elapsed = now_ms.saturating_sub(b.stamp_ms);
            b.milli = b.milli.saturating_add(elapsed.saturating_mul(self.rate as u64)).min(self.cap_milli);
        }
        b.stamp_ms = now_ms.max(b.stamp_ms);
        if b.milli >= 1000 {
            b.milli -= 1000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_the_rate() {
        let mut l = RateLimiter::new(10, [1; 16]);
        let t0 = Instant::now();
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!((0..100).filter(|_| l.allow(a, t0)).count(), 10, "a burst of `rate`");
        assert!(!l.allow(a, t0 + Duration::from_millis(99)));
        assert!(l.allow(a, t0 + Duration::from_millis(100)), "one token per 100 ms");
        assert_eq!((0..100).filter(|_| l.allow(a, t0 + Duration::from_secs(60))).count(), 10, "capped at the burst");
        let mut off = RateLimiter::new(0, [1; 16]);
        assert!((0..10_000).all(|_| off.allow(a, t0)));
    }

    #[test]
    fn the_key_decides_the_buckets() {
        let ips: Vec<IpAddr> = (0..64u8).map(|i| IpAddr::from([198, 51, 100, i])).collect();
        let with = |key| {
            let l = RateLimiter::new(10, key);
            ips.iter().map(|ip| l.bucket_of(*ip)).collect::<Vec<_>>()
        };
        assert_eq!(with([1; 16]), with([1; 16]), "the same key, the same buckets");
        assert_ne!(with([1; 16]), with([2; 16]), "another key, other buckets");
    }
}
