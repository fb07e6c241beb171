//! Ending allocations: expiry (deadlines filed in a heap; the I/O layer
//! sleeps until [`Server::poll_timeout`]), deletion, closed connections and
//! the admin API's disconnect.

use super::*;

impl Server {
    pub(super) fn remove(&mut self, slot: u32, reason: EndReason, now: Instant, relays: &mut dyn RelayPorts) {
        let Some(a) = self.allocs.remove(slot) else { return };
        self.by_tuple.remove(&a.tuple);
        self.ledger.give_back(&a.quota_user());
        for r in [a.v4, a.v6].iter().flatten() {
            relays.close(r.id);
        }
        for c in a.channels.iter().filter(|c| !c.ended) {
            channel_unbound(&mut self.events, a.tuple, a.v4, a.v6, c);
        }
        self.stats.allocations_ended[reason as usize] += 1;
        let health = a.health.summary();
        self.stats.legs.observe(&health);
        self.event(Event::AllocationEnded {
            tuple: a.tuple,
            username: a.username.into(),
            reason,
            duration: now.saturating_duration_since(a.created),
            bytes_to_peer: a.bytes_to_peer,
            bytes_from_peer: a.bytes_from_peer,
            health,
        });
    }

    /// Files `slot` under its next deadline when that is earlier than the
    /// one it is filed under (a later one is found when the earlier fires).
    pub(super) fn schedule(&mut self, slot: u32) {
        let Some(a) = self.allocs.get_mut(slot) else { return };
        let d = a.deadline();
        if a.timer.is_none_or(|t| d < t) {
            a.timer = Some(d);
            self.file_timer(d, slot);
        }
    }

    pub(super) fn file_timer(&mut self, at: Instant, slot: u32) {
        if self.timers.peek().is_none_or(|Reverse((first, _))| at < *first) {
            self.timer_moved = true;
        }
        self.timers.push(Reverse((at, slot)));
        // Stale entries (a deadline moved earlier, then the later one's
        // allocation refreshed again and again) are bounded: past a few per
        // allocation, file everything anew.
        if self.timers.len() > 4 * (self.allocs.len() + self.ledger.reservations()) + 1024 {
            self.timers.clear();
            let slots: Vec<u32> = self.allocs.slots().map(|(s, _)| s).collect();
            for s in slots {
                if let Some(a) = self.allocs.get_mut(s) {
                    a.timer = None;
                }
                self.schedule(s);
            }
            if let Some(e) = self.ledger.next_reservation_expiry() {
                self.timers.push(Reverse((e, RESERVATIONS)));
            }
        }
    }

    /// When [`Server::handle_timeout`] next has something to do: the
    /// earliest deadline filed (an allocation, permission, channel or
    /// reservation expiring). `None` when nothing is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Expires everything due at `now`: allocations, permissions, channels
    /// and reservations.
    pub fn handle_timeout(&mut self, now: Instant, relays: &mut dyn RelayPorts) {
        while self.expire(now, relays, usize::MAX) {}
    }

    /// Handles at most `max` due deadlines, so that a mass expiry does not
    /// stall the relay; returns whether more are due (call again soon).
    pub fn expire(&mut self, now: Instant, relays: &mut dyn RelayPorts, max: usize) -> bool {
        for _ in 0..max {
            match self.timers.peek() {
                Some(Reverse((at, _))) if *at <= now => {}
                _ => return false,
            }
            let Some(Reverse((at, slot))) = self.timers.pop() else { return false };
            if slot == RESERVATIONS {
                self.ledger.expire_reservations(now, &mut |port| relays.release(Family::V4, port));
                // Shared with other cores, the table may hold later expiries
                // this core did not file (or filed before a rebuild).
                if let Some(e) = self.ledger.next_reservation_expiry() {
                    self.file_timer(e, RESERVATIONS);
                }
                continue;
            }
            let Some(a) = self.allocs.get_mut(slot) else { continue };
            if a.timer != Some(at) {
                continue; // stale: filed again since
            }
            a.timer = None;
            if a.expires <= now {
                self.remove(slot, EndReason::Expired, now, relays);
                continue;
            }
            prune(&mut self.events, a, now);
            self.schedule(slot);
        }
        self.timers.peek().is_some_and(|Reverse((at, _))| *at <= now)
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
