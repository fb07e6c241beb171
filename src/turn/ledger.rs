//! What the cores of one relay share: the allocation quotas and the ports
//! held back by EVEN-PORT reservations.
//!
//! A relay running one core per thread (turnd's shards) must hold a user to
//! its quota across all of them, and must let a RESERVATION-TOKEN from a
//! client that landed on another core claim its port. The core asks this
//! trait; [`LocalLedger`] is the single-core answer (and what tests and the
//! fuzzer use), the I/O layer provides one shared between threads.

use std::collections::HashMap;
use std::time::Instant;

/// Why an allocation was not counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaRefusal {
    /// The user holds `user_quota` allocations (486).
    User,
    /// The relay holds `total_quota` allocations (508).
    Total,
}

/// A relay port held back for a later Allocate with RESERVATION-TOKEN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub port: u16,
    pub expires: Instant,
}

/// Allocation counts and reservations, kept where every core sees them.
pub trait Ledger {
    /// Counts one more allocation for `user` when neither the user's quota
    /// nor the total allows no more (0 = unlimited). Checked and counted in
    /// one step, so two cores cannot both take the last one.
    fn take(&mut self, user: &str, user_quota: u32, total_quota: u32) -> Result<(), QuotaRefusal>;
    /// Gives back what [`Ledger::take`] counted.
    fn give_back(&mut self, user: &str);
    /// Allocations counted, on every core.
    fn allocations(&self) -> usize;
    /// Users holding allocations.
    fn users(&self) -> usize;
    /// Reservations held.
    fn reservations(&self) -> usize;
    /// Files a reservation under `token`.
    fn reserve(&mut self, token: [u8; 8], r: Reservation);
    /// The reservation filed under `token`, if any (expired or not).
    fn reservation(&self, token: &[u8; 8]) -> Option<Reservation>;
    /// Takes the reservation out (claimed, or refused as expired).
    fn unreserve(&mut self, token: &[u8; 8]) -> Option<Reservation>;
    /// Takes out every reservation expired at `now`, giving each port to `release`.
    fn expire_reservations(&mut self, now: Instant, release: &mut dyn FnMut(u16));
    /// When the next reservation expires.
    fn next_reservation_expiry(&self) -> Option<Instant>;
}

/// The ledger of a relay with one core.
#[derive(Default)]
pub struct LocalLedger {
    total: usize,
    per_user: HashMap<Box<str>, u32>,
    reservations: HashMap<[u8; 8], Reservation>,
}

/// The counting both ledgers share: refuse or count one allocation.
pub fn take_from(total: &mut usize, per_user: &mut HashMap<Box<str>, u32>, user: &str, user_quota: u32, total_quota: u32) -> Result<(), QuotaRefusal> {
    let held = per_user.get(user).copied().unwrap_or(0);
    if user_quota > 0 && held >= user_quota {
        return Err(QuotaRefusal::User);
    }
    if total_quota > 0 && *total >= total_quota as usize {
        return Err(QuotaRefusal::Total);
    }
    *total += 1;
    *per_user.entry(user.into()).or_insert(0) += 1;
    Ok(())
}

/// Gives back one allocation of `user`; forgets users who hold none.
pub fn give_back_to(total: &mut usize, per_user: &mut HashMap<Box<str>, u32>, user: &str) {
    if let Some(c) = per_user.get_mut(user) {
        *total = total.saturating_sub(1);
        *c -= 1;
        if *c == 0 {
            per_user.remove(user);
        }
    }
}

/// Takes the expired reservations out of `map`.
pub fn expire_from(map: &mut HashMap<[u8; 8], Reservation>, now: Instant, release: &mut dyn FnMut(u16)) {
    map.retain(|_, r| {
        if r.expires <= now {
            release(r.port);
            false
        } else {
            true
        }
    });
}

impl Ledger for LocalLedger {
    fn take(&mut self, user: &str, user_quota: u32, total_quota: u32) -> Result<(), QuotaRefusal> {
        take_from(&mut self.total, &mut self.per_user, user, user_quota, total_quota)
    }

    fn give_back(&mut self, user: &str) {
        give_back_to(&mut self.total, &mut self.per_user, user)
    }

    fn allocations(&self) -> usize {
        self.total
    }

    fn users(&self) -> usize {
        self.per_user.len()
    }

    fn reservations(&self) -> usize {
        self.reservations.len()
    }

    fn reserve(&mut self, token: [u8; 8], r: Reservation) {
        self.reservations.insert(token, r);
    }

    fn reservation(&self, token: &[u8; 8]) -> Option<Reservation> {
        self.reservations.get(token).copied()
    }

    fn unreserve(&mut self, token: &[u8; 8]) -> Option<Reservation> {
        self.reservations.remove(token)
    }

    fn expire_reservations(&mut self, now: Instant, release: &mut dyn FnMut(u16)) {
        expire_from(&mut self.reservations, now, release)
    }

    fn next_reservation_expiry(&self) -> Option<Instant> {
        self.reservations.values().map(|r| r.expires).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_count_per_user_and_in_total() {
        let mut l = LocalLedger::default();
        assert_eq!(l.take("a", 2, 3), Ok(()));
        assert_eq!(l.take("a", 2, 3), Ok(()));
        assert_eq!(l.take("a", 2, 3), Err(QuotaRefusal::User));
        assert_eq!(l.take("b", 2, 3), Ok(()));
        assert_eq!(l.take("c", 2, 3), Err(QuotaRefusal::Total));
        assert_eq!((l.allocations(), l.users()), (3, 2));
        l.give_back("a");
        l.give_back("b");
        // Giving back for a user who holds none changes nothing.
        l.give_back("nobody");
        assert_eq!((l.allocations(), l.users()), (1, 1));
        assert_eq!(l.take("c", 0, 0), Ok(()));
    }
}
