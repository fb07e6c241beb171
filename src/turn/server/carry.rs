//! An allocation's state as it passes from one turnd process to the next
//! during an upgrade in place: what [`Server::carry`] writes down in the old
//! process and [`Server::adopt`] takes up in the new one.
//!
//! Times travel as signed microseconds from a moment both sides agree on
//! (the export), since an `Instant` means nothing in another process: the
//! I/O layer passes the exporting side's "now" to `carry`, and to `adopt`
//! the instant in the new process that corresponds to it (its own now, less
//! the time the handover took). The relay sockets travel beside this record
//! (the I/O layer passes their descriptors), found again by port through
//! [`Placement::Carried`].

use serde::{Deserialize, Serialize};

use super::*;
use crate::turn::Permission;

/// The version of this record and of the handover around it. A process
/// that reads another version refuses the handover (the old one serves on).
pub const FORMAT: u32 = 1;

/// One UDP allocation, whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    pub client: SocketAddr,
    /// The listener address the client sends to (`FiveTuple::server`).
    pub server: SocketAddr,
    pub username: String,
    pub key: [u8; 16],
    pub v4: Option<CarriedRelay>,
    pub v6: Option<CarriedRelay>,
    /// Microseconds since creation (non-negative).
    pub age_us: i64,
    /// Microseconds until it expires.
    pub expires_in_us: i64,
    pub allocate_tid: [u8; 12],
    pub lifetime: u32,
    /// (peer address, microseconds until the permission expires).
    pub permissions: Vec<(IpAddr, i64)>,
    pub channels: Vec<CarriedChannel>,
    pub bytes_to_peer: u64,
    pub bytes_from_peer: u64,
    pub packets_to_peer: u64,
    pub packets_from_peer: u64,
    pub budget_to_peer: CarriedBucket,
    pub budget_from_peer: CarriedBucket,
    pub over_bandwidth_reported: bool,
    pub check: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedRelay {
    pub advertised: SocketAddr,
    pub local_port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedChannel {
    pub number: u16,
    pub peer: SocketAddr,
    /// Microseconds until the binding expires (negative: expired, cooling down).
    pub expires_in_us: i64,
    pub ended: bool,
}

/// A bandwidth bucket: its level in byte-nanoseconds and when it was last
/// refilled (microseconds before the export), if ever.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedBucket {
    pub level: u64,
    pub last_us_ago: Option<i64>,
}

/// Why an allocation could not be taken up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdoptError {
    /// Not a UDP allocation, or one already served here.
    Conflict,
    /// The relay address family is not configured here.
    FamilyUnsupported,
    /// The relay socket for this port did not come with the handover.
    NoSocket,
}

/// Microseconds from `at` to `t`, negative when `t` is earlier.
pub fn offset(t: Instant, at: Instant) -> i64 {
    match t.checked_duration_since(at) {
        Some(d) => d.as_micros().min(i64::MAX as u128) as i64,
        None => -(at.duration_since(t).as_micros().min(i64::MAX as u128) as i64),
    }
}

/// The instant `us` microseconds from `at` (saturating at what `Instant` can hold).
pub fn shifted(at: Instant, us: i64) -> Instant {
    let d = Duration::from_micros(us.unsigned_abs());
    if us >= 0 { at.checked_add(d).unwrap_or(at) } else { at.checked_sub(d).unwrap_or(at) }
}

impl CarriedBucket {
    fn of(b: &Bucket, at: Instant) -> Self {
        let (level, last) = b.parts();
        CarriedBucket { level, last_us_ago: last.map(|l| offset(at, l)) }
    }

    fn bucket(&self, at: Instant) -> Bucket {
        Bucket::from_parts(self.level, self.last_us_ago.map(|us| shifted(at, -us)))
    }
}

impl Carried {
    /// Writes down `a` as of `now`.
    pub fn of(a: &Allocation, now: Instant) -> Self {
        let relay = |r: Option<Relay>| r.map(|r| CarriedRelay { advertised: r.advertised, local_port: r.local_port });
        Carried {
            client: a.tuple.client,
            server: a.tuple.server,
            username: a.username.to_string(),
            key: a.key,
            v4: relay(a.v4),
            v6: relay(a.v6),
            age_us: offset(now, a.created),
            expires_in_us: offset(a.expires, now),
            allocate_tid: a.allocate_tid,
            lifetime: a.lifetime,
            permissions: a.permissions.iter().map(|p| (p.ip, offset(p.expires, now))).collect(),
            channels: a
                .channels
                .iter()
                .map(|c| CarriedChannel { number: c.number, peer: c.peer, expires_in_us: offset(c.expires, now), ended: c.ended })
                .collect(),
            bytes_to_peer: a.bytes_to_peer,
            bytes_from_peer: a.bytes_from_peer,
            packets_to_peer: a.packets_to_peer,
            packets_from_peer: a.packets_from_peer,
            budget_to_peer: CarriedBucket::of(&a.budget_to_peer, now),
            budget_from_peer: CarriedBucket::of(&a.budget_from_peer, now),
            over_bandwidth_reported: a.over_bandwidth_reported,
            check: a.check,
        }
    }

    /// The relay ports whose sockets travel with it, by family.
    pub fn relay_ports(&self) -> impl Iterator<Item = (Family, u16)> + '_ {
        let v4 = self.v4.map(|r| (Family::V4, r.local_port));
        let v6 = self.v6.map(|r| (Family::V6, r.local_port));
        v4.into_iter().chain(v6)
    }
}

impl Server {
    /// The UDP allocations `select` picks, written down as of `now`, for a
    /// new process to take up. Nothing changes here: the I/O layer stops
    /// reading their sockets meanwhile, and either [`Server::forget`]s them
    /// once the new process serves them or goes on serving them.
    /// Each comes with its relay sockets' ids, in [`Carried::relay_ports`] order.
    pub fn carry(&self, now: Instant, select: impl Fn(&FiveTuple) -> bool) -> Vec<(Carried, Vec<RelayId>)> {
        self.allocations()
            .filter(|a| a.tuple.transport == Transport::Udp && select(&a.tuple))
            .map(|a| (Carried::of(a, now), [a.v4, a.v6].iter().flatten().map(|r| r.id).collect()))
            .collect()
    }

    /// Lets go of the allocations `select` picks, which another process now
    /// serves: no event (they did not end), their quota given back, their
    /// relay sockets closed here (the other process holds its own
    /// descriptors of the same sockets). Returns how many.
    pub fn forget(&mut self, select: impl Fn(&FiveTuple) -> bool, relays: &mut dyn RelayPorts) -> usize {
        let gone: Vec<u32> = self.allocs.slots().filter(|(_, a)| a.tuple.transport == Transport::Udp && select(&a.tuple)).map(|(s, _)| s).collect();
        for &slot in &gone {
            let Some(a) = self.allocs.remove(slot) else { continue };
            self.by_tuple.remove(&a.tuple);
            self.ledger.give_back(&a.quota_user());
            for r in [a.v4, a.v6].iter().flatten() {
                relays.close(r.id);
            }
        }
        gone.len()
    }

    /// Takes up an allocation another process carried, for the client of
    /// `tuple` (the I/O layer's handle for the listener it arrives on).
    /// `at` is the instant here that corresponds to the export. Its relay
    /// sockets are opened as [`Placement::Carried`]; it counts toward the
    /// quotas without being refused by them (it exists already).
    pub fn adopt(&mut self, c: &Carried, tuple: FiveTuple, at: Instant, relays: &mut dyn RelayPorts) -> Result<(), AdoptError> {
        if tuple.transport != Transport::Udp || self.by_tuple.contains_key(&tuple) {
            return Err(AdoptError::Conflict);
        }
        let (slot, generation) = self.allocs.vacant();
        let mut opened: Vec<RelayId> = Vec::new();
        let (relay_v4, relay_v6) = (self.cfg.relay_v4.is_some(), self.cfg.relay_v6.is_some());
        let mut open = |family: Family, r: Option<CarriedRelay>, opened: &mut Vec<RelayId>| -> Result<Option<Relay>, AdoptError> {
            let Some(r) = r else { return Ok(None) };
            if !match family {
                Family::V4 => relay_v4,
                Family::V6 => relay_v6,
            } {
                return Err(AdoptError::FamilyUnsupported);
            }
            let id = RelayId::new(slot, generation, family);
            match relays.open(id, family, Placement::Carried(r.local_port), false) {
                Ok(_) => {
                    opened.push(id);
                    Ok(Some(Relay { id, advertised: r.advertised, local_port: r.local_port }))
                }
                Err(OpenError::FamilyUnsupported) => Err(AdoptError::FamilyUnsupported),
                Err(_) => Err(AdoptError::NoSocket),
            }
        };
        let relayed = open(Family::V4, c.v4, &mut opened).and_then(|v4| Ok((v4, open(Family::V6, c.v6, &mut opened)?)));
        let (v4, v6) = match relayed {
            Ok(r) => r,
            Err(e) => {
                for id in opened {
                    relays.close(id);
                }
                return Err(e);
            }
        };
        let a = Allocation {
            tuple,
            username: c.username.as_str().into(),
            key: c.key,
            v4,
            v6,
            created: shifted(at, -c.age_us),
            expires: shifted(at, c.expires_in_us),
            allocate_tid: c.allocate_tid,
            lifetime: c.lifetime,
            permissions: c.permissions.iter().map(|&(ip, us)| Permission { ip, expires: shifted(at, us) }).collect(),
            channels: c.channels.iter().map(|ch| Channel { number: ch.number, peer: ch.peer, expires: shifted(at, ch.expires_in_us), ended: ch.ended }).collect(),
            bytes_to_peer: c.bytes_to_peer,
            bytes_from_peer: c.bytes_from_peer,
            packets_to_peer: c.packets_to_peer,
            packets_from_peer: c.packets_from_peer,
            budget_to_peer: c.budget_to_peer.bucket(at),
            budget_from_peer: c.budget_from_peer.bucket(at),
            over_bandwidth_reported: c.over_bandwidth_reported,
            timer: None,
            check: c.check,
            health: Box::default(),
        };
        // It exists already: counted without a quota that could refuse it.
        let _ = self.ledger.take(&a.quota_user(), 0, 0);
        let inserted = self.allocs.insert(a);
        debug_assert_eq!(inserted, slot);
        self.by_tuple.insert(tuple, slot);
        self.schedule(slot);
        Ok(())
    }
}
