//! Bandwidth caps: token buckets counted in bytes, refilled from the time
//! the caller passes in (no clock inside).
//!
//! A bucket holds at most one second's worth, so a burst (a video key frame)
//! passes while a sustained flow is held to the rate. To keep fractions of a
//! byte across closely spaced packets, the level is kept in byte-nanoseconds:
//! refilling is `rate * elapsed_ns`, a packet costs `len * 1e9`. With rates of
//! at most 100 Gbit/s (12.5e9 bytes/s) one second's worth fits in a u64.

use std::time::Instant;

const NANOS: u64 = 1_000_000_000;

/// One direction's budget. `rate` 0 means unlimited.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    /// Byte-nanoseconds available.
    level: u64,
    last: Option<Instant>,
    /// Byte-nanoseconds spent elsewhere beyond the level (see
    /// [`Bucket::spend`]), paid from the next refills; one second's worth at most.
    debt: u64,
}

impl Bucket {
    /// A full bucket (set on the first packet).
    pub const fn new() -> Self {
        Bucket { level: u64::MAX, last: None, debt: 0 }
    }

    /// Its level (byte-nanoseconds) and last refill, to carry it to another process.
    pub fn parts(&self) -> (u64, Option<Instant>) {
        (self.level, self.last)
    }

    /// A bucket as [`Bucket::parts`] described it.
    pub fn from_parts(level: u64, last: Option<Instant>) -> Self {
        Bucket { level, last, debt: 0 }
    }

    /// Takes `len` bytes at `rate` bytes per second if the budget allows;
    /// `false` means the packet is over the cap and is to be dropped.
    #[inline]
    pub fn take(&mut self, len: usize, rate: u64, now: Instant) -> bool {
        if rate == 0 {
            return true;
        }
        self.refill(rate, now);
        let cost = (len as u64).saturating_mul(NANOS);
        if self.level >= cost {
            self.level -= cost;
            true
        } else {
            false
        }
    }
}

impl Bucket {
    /// Adds what `rate` gave since the last refill (a full bucket the first
    /// time), up to one second's worth, and pays the debt from it.
    fn refill(&mut self, rate: u64, now: Instant) {
        let cap = rate.saturating_mul(NANOS);
        let refill = match self.last {
            Some(last) => {
                let ns = now.saturating_duration_since(last).as_nanos().min(NANOS as u128) as u64;
                rate.saturating_mul(ns)
            }
            None => cap,
        };
        self.last = Some(now);
        self.level = self.level.saturating_add(refill).min(cap);
        let paid = self.level.min(self.debt);
        self.level -= paid;
        self.debt -= paid;
    }

    /// Charges `len` bytes at `rate` that were relayed elsewhere (by a fast
    /// path that keeps its own bucket): like [`Bucket::take`], but the
    /// bytes are spent whether or not the budget had them, what it lacked
    /// owed to the next refills (one second's worth at most), so that what
    /// is relayed here and there together keeps to the rate.
    pub fn spend(&mut self, len: u64, rate: u64, now: Instant) {
        if rate == 0 || len == 0 {
            return;
        }
        self.refill(rate, now);
        let cost = len.saturating_mul(NANOS);
        if self.level >= cost {
            self.level -= cost;
        } else {
            self.debt = self.debt.saturating_add(cost - self.level).min(rate.saturating_mul(NANOS));
            self.level = 0;
        }
    }
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket::new()
    }
}

#[cfg(test)]
mod tests {
    use super::Bucket;
    use std::time::{Duration, Instant};

    #[test]
    fn holds_a_flow_to_the_rate_after_one_seconds_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new();
        let rate = 125_000; // 1 Mbit/s
        // One second's worth passes at once, then nothing more at that instant.
        let burst = (0..200).filter(|_| b.take(1_000, rate, t0)).count();
        assert_eq!(burst, 125);
        // Over the next 10 s, 1,000-byte packets every 1 ms (8 Mbit/s offered):
        // 1 Mbit/s of them pass, within a packet.
        let mut passed = 0;
        for i in 1..=10_000u64 {
            passed += b.take(1_000, rate, t0 + Duration::from_millis(i)) as u64;
        }
        assert!((1_249..=1_251).contains(&passed), "{passed} packets passed");
        // Unlimited passes everything.
        assert!((0..1000).all(|_| b.take(65_535, 0, t0)));
    }

    #[test]
    fn small_steps_keep_their_fractions() {
        // 1 byte every 100 ns at 10 MB/s is exactly the rate: nothing is lost
        // to rounding once the first second's burst is spent.
        let t0 = Instant::now();
        let mut b = Bucket::new();
        assert!(b.take(10_000_000, 10_000_000, t0));
        let passed = (1..=100_000u64).filter(|i| b.take(1, 10_000_000, t0 + Duration::from_nanos(i * 100))).count();
        assert_eq!(passed, 100_000);
    }
}
