//! Ending allocations: expiry (a sweep spread over calls), deletion,
//! closed connections and the admin API's disconnect.

use super::*;

impl Server {
    pub(super) fn remove(&mut self, slot: u32, reason: EndReason, now: Instant, relays: &mut dyn RelayPorts) {
        let Some(a) = self.allocs.remove(slot) else { return };
        self.by_tuple.remove(&a.tuple);
        let qkey = quota_key(&a.username);
        if let Some(c) = self.per_user.get_mut(qkey) {
            *c -= 1;
            if *c == 0 {
                self.per_user.remove(qkey);
            }
        }
        for r in [a.v4, a.v6].iter().flatten() {
            relays.close(r.id);
        }
        for c in a.channels.iter().filter(|c| !c.ended) {
            channel_unbound(&mut self.events, a.tuple, a.v4, a.v6, c);
        }
        self.stats.allocations_ended[reason as usize] += 1;
        self.event(Event::AllocationEnded {
            tuple: a.tuple,
            username: a.username.into(),
            reason,
            duration: now.saturating_duration_since(a.created),
            bytes_to_peer: a.bytes_to_peer,
            bytes_from_peer: a.bytes_from_peer,
        });
    }

    /// Expires allocations, permissions, channels and reservations: a whole
    /// sweep. Call about once a second, or spread the work with [`Server::sweep`].
    pub fn handle_timeout(&mut self, now: Instant, relays: &mut dyn RelayPorts) {
        self.sweep_at = 0;
        self.sweep(now, relays, usize::MAX);
    }

    /// Visits at most `max` allocation slots, from where the last call
    /// stopped (wrapping), expiring what is due; and every expired
    /// reservation. Calling it ten times a second with a tenth of
    /// [`Server::slot_count`] visits every allocation about once a second
    /// without a pause that grows with their number.
    pub fn sweep(&mut self, now: Instant, relays: &mut dyn RelayPorts, max: usize) {
        self.reservations.retain(|_, r| {
            if r.expires <= now {
                relays.release(Family::V4, r.port);
                false
            } else {
                true
            }
        });
        let slots = self.allocs.slot_count();
        for _ in 0..max.min(slots) {
            if self.sweep_at as usize >= slots {
                self.sweep_at = 0;
            }
            let s = self.sweep_at;
            self.sweep_at += 1;
            let Some(a) = self.allocs.get_mut(s) else { continue };
            if a.expires <= now {
                self.remove(s, EndReason::Expired, now, relays);
                continue;
            }
            prune(&mut self.events, a, now);
        }
    }

    /// Allocation slots (live or free) a full sweep visits.
    pub fn slot_count(&self) -> usize {
        self.allocs.slot_count()
    }

    /// Frees the allocation of a closed TCP/TLS connection.
    pub fn connection_closed(&mut self, tuple: &FiveTuple, now: Instant, relays: &mut dyn RelayPorts) {
        if let Some(&slot) = self.by_tuple.get(tuple) {
            self.remove(slot, EndReason::ConnectionClosed, now, relays);
        }
    }

    /// Ends every allocation `pred` selects (admin disconnect). Returns how many.
    pub fn disconnect(&mut self, pred: impl Fn(&Allocation) -> bool, now: Instant, relays: &mut dyn RelayPorts) -> usize {
        let hit: Vec<u32> = self.allocs.slots().filter(|(_, a)| pred(a)).map(|(s, _)| s).collect();
        for &s in &hit {
            self.remove(s, EndReason::Disconnected, now, relays);
        }
        hit.len()
    }
}
