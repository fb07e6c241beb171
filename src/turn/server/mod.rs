//! The TURN server: its state and settings, and where a client's packet goes
//! (RFC 8489, RFC 8656). Requests are answered in `requests.rs` (with the
//! framing in `reply.rs`), ChannelData, Send and peer datagrams take the data
//! path in `relaying.rs`, and allocations end in `expiry.rs`.

mod carry;
mod expiry;
mod relaying;
mod reply;
mod requests;

pub use carry::{AdoptError, Carried, CarriedBucket, CarriedChannel, CarriedRelay, FORMAT as HANDOVER_FORMAT};
use reply::{compact, known_attribute, Answer, Handled, Reply};

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::allocation::{Allocation, Channel, Relay};
use super::bandwidth::Bucket;
use super::ratelimit::RateLimiter;
use super::slab::Slab;
use super::{EndReason, Event, Family, FiveTuple, Now, OpenError, Output, PeerPolicy, Placement, RelayId, RelayPorts, Stats, Transport};
use super::{Ledger, LocalLedger, QuotaRefusal, Reservation};
use crate::auth::{quota_key, Authenticated, AuthFailure, Authenticator};
use crate::stun::attr::{self, comprehension_required};
use crate::stun::{method, ChannelData, Class, ErrorCode, IntegrityKind, Message, MessageWriter, CHANNEL_MAX, CHANNEL_MIN};

/// Queued events beyond which refused-peer reports are dropped.
const MAX_EVENTS: usize = 4096;
/// UNKNOWN-ATTRIBUTES lists at most this many types.
const MAX_UNKNOWN: usize = 8;
/// How long a port reserved by EVEN-PORT's R bit waits for its token (RFC 8656: about 30 s).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// The slot number under which reservation expiries are filed in the timers.
const RESERVATIONS: u32 = u32::MAX;
/// Reservations held at once; beyond this, EVEN-PORT with R gets 508.
const MAX_RESERVATIONS: usize = 4096;
/// An answer without MESSAGE-INTEGRITY over UDP (the source address is
/// unproven) is at most this many times the request (QUIC's anti-amplification
/// bound, RFC 9000 8.1). Larger ones lose SOFTWARE and the reason phrase, and
/// are dropped when that is not enough.
pub const AMPLIFICATION_FACTOR: usize = 3;
/// Default answers per second per source IP to unauthenticated UDP requests.
pub const DEFAULT_UNAUTH_RATE: u32 = 100;
/// Allocations one client address may hold with check credentials. The
/// page tries one transport at a time with two peer connections, and
/// Chromium opens a TURN TCP or TLS connection for each of its IPv4 and
/// IPv6 default networks, both over IPv4 when the relay's name has no AAAA
/// record: four allocations from one address. With two, one peer connection
/// could take both and leave the other none.
pub const CHECK_ALLOCATIONS_PER_ADDRESS: u32 = 4;
/// The longest lifetime of an allocation made with check credentials.
pub const CHECK_MAX_LIFETIME: u32 = 60;
/// A check allocation's bandwidth cap, each way (512 kbit/s: a data
/// channel's burst, not a call).
pub const CHECK_BYTES_PER_SECOND: u64 = 64_000;

/// A relay address: where sockets bind, and what clients are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayAddr {
    pub local: IpAddr,
    pub external: IpAddr,
}

/// A sibling relay that new clients are sent to while this one drains
/// (300 Try Alternate, RFC 8489 10).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alternate {
    /// Its address (ALTERNATE-SERVER is an IP address, never a name).
    pub ip: IpAddr,
    /// Its port; `None`: the port the request arrived on (a fleet serves
    /// the same ports everywhere: 3478 for UDP and TCP, 443 for TLS).
    pub port: Option<u16>,
    /// Whether clients that came over TLS are sent here too. Browsers check
    /// the sibling's certificate against the address of ALTERNATE-SERVER
    /// (they do not read ALTERNATE-DOMAIN), so only a sibling whose
    /// certificate names its IP address serves them; otherwise they get 508.
    pub tls: bool,
    /// The name in its certificate, sent as ALTERNATE-DOMAIN to clients on
    /// TLS (RFC 8489 14.16) for the clients that read it.
    pub domain: Option<Arc<str>>,
}

/// The core's settings. Lifetimes in seconds; a quota of 0 means unlimited.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub software: Option<Arc<str>>,
    pub default_lifetime: u32,
    pub max_lifetime: u32,
    pub permission_lifetime: u32,
    pub channel_lifetime: u32,
    pub user_quota: u32,
    pub total_quota: u32,
    pub max_permissions: usize,
    /// Highest channel number accepted: 0x4FFF (RFC 8656) or 0x7FFF (RFC 5766 clients).
    pub channel_max: u16,
    pub relay_v4: Option<RelayAddr>,
    pub relay_v6: Option<RelayAddr>,
    /// Answers a second (and burst) per source IP to UDP requests that are
    /// not authenticated (Binding, 401/438 challenges, 400/420); 0 = no limit.
    pub unauth_rate: u32,
    /// Bytes a second one allocation may relay in each direction; 0 = unlimited.
    pub allocation_bytes_per_second: u64,
    /// Bytes a second the whole server may relay in each direction; 0 = unlimited.
    pub total_bytes_per_second: u64,
    /// Where authenticated Allocates go while draining (300 Try Alternate):
    /// one of the entries of the client's address family, the same one for
    /// the same client address. Empty, or none of that family: 508.
    pub alternates: Vec<Alternate>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            software: None,
            default_lifetime: 600,
            max_lifetime: 3600,
            permission_lifetime: 300,
            channel_lifetime: 600,
            user_quota: 0,
            total_quota: 0,
            max_permissions: 64,
            channel_max: CHANNEL_MAX,
            relay_v4: None,
            relay_v6: None,
            // Off in the bare core, as quotas are; turnd's configuration
            // turns it on (limits.unauth_rate, DEFAULT_UNAUTH_RATE).
            unauth_rate: 0,
            allocation_bytes_per_second: 0,
            total_bytes_per_second: 0,
            alternates: Vec::new(),
        }
    }
}

pub struct Server {
    cfg: ServerConfig,
    auth: Authenticator,
    policy: PeerPolicy,
    allocs: Slab<Allocation>,
    by_tuple: HashMap<FiveTuple, u32>,
    events: VecDeque<Event>,
    /// Quotas and reservations: this core's own, or shared with the other
    /// cores of the relay.
    ledger: Box<dyn Ledger>,
    accepting: bool,
    data_tid: u64,
    unauth: RateLimiter,
    /// Allocations by the deadline they are filed under (see
    /// `Allocation::timer`); entries whose deadline no longer matches are
    /// stale and skipped.
    timers: BinaryHeap<Reverse<(Instant, u32)>>,
    /// A deadline earlier than any before was filed since the I/O layer
    /// last asked (it may be sleeping until a later one).
    timer_moved: bool,
    /// The whole server's bandwidth budgets, client to peer and peer to client.
    total_to_peer: Bucket,
    total_from_peer: Bucket,
    /// The peers of the CreatePermission being handled: reused, so it grows
    /// once to `max_permissions` + 1 and no request allocates.
    peer_scratch: Vec<IpAddr>,
    pub stats: Stats,
}

/// Queues an event. Beyond MAX_EVENTS, refused-peer reports (which a flood
/// can make without end) are dropped; allocation and channel events are
/// always kept, so a mirror of the bindings stays exact. Those are bounded by
/// the allocations and channels the quotas allow, and the I/O layer drains
/// the queue after every call.
fn push_event(events: &mut VecDeque<Event>, e: Event) {
    if events.len() >= MAX_EVENTS && matches!(e, Event::PeerRefused { .. } | Event::OverBandwidth { .. }) {
        return;
    }
    events.push_back(e);
}

/// Reports that channel `c` of the allocation with these relays ended.
fn channel_unbound(events: &mut VecDeque<Event>, tuple: FiveTuple, v4: Option<Relay>, v6: Option<Relay>, c: &Channel) {
    if let Some(r) = if c.peer.is_ipv4() { v4 } else { v6 } {
        push_event(events, Event::ChannelUnbound { relay: r.id, tuple, channel: c.number, peer: c.peer });
    }
}

/// Until when channel `c` of `a` relays: the earliest of its binding, its
/// peer's permission and the allocation.
pub(super) fn channel_until(a: &Allocation, c: &Channel) -> Instant {
    let perm = a.permissions.iter().find(|p| p.ip == c.peer.ip()).map_or(a.expires, |p| p.expires);
    c.expires.min(perm).min(a.expires)
}

/// Whether `ip` is one of the relayed addresses of `cfg` (local or
/// advertised): all a check allocation may reach.
pub(super) fn is_relay_ip(cfg: &ServerConfig, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    [cfg.relay_v4, cfg.relay_v6].iter().flatten().any(|r| r.local == ip || r.external == ip)
}

/// Whether an allocation (a check allocation when `check`) may hold a
/// permission for `ip`: CreatePermission's rule, and a reload's.
pub(super) fn may_permit(policy: &PeerPolicy, cfg: &ServerConfig, check: bool, ip: IpAddr) -> bool {
    policy.permits_ip(ip) && (!check || is_relay_ip(cfg, ip))
}

/// Whether an allocation (a check allocation when `check`) may bind a
/// channel to `peer`: ChannelBind's rule, and a reload's.
pub(super) fn may_bind(policy: &PeerPolicy, cfg: &ServerConfig, check: bool, peer: SocketAddr) -> bool {
    policy.permits(peer) && (!check || (is_relay_ip(cfg, peer.ip()) && policy.in_relay_range(peer.port())))
}

/// `a`'s own bandwidth cap in bytes per second in each direction (0: none):
/// the configured one, and for a check allocation its own or the configured
/// one if lower.
pub(super) fn allocation_cap(cfg: &ServerConfig, a: &Allocation) -> u64 {
    match (a.check, cfg.allocation_bytes_per_second) {
        (true, 0) => CHECK_BYTES_PER_SECOND,
        (true, c) => c.min(CHECK_BYTES_PER_SECOND),
        (false, c) => c,
    }
}

/// Reports the live channels of `a` (those to a peer in `only`, when given)
/// as refreshed, for a fast path that mirrors them.
/// (One whose expiry is due but not yet handled is reported too, with an
/// `until` in the past: harmless, and it keeps the core off the clock.)
pub(super) fn channels_refreshed(events: &mut VecDeque<Event>, cfg: &ServerConfig, a: &Allocation, only: Option<&[IpAddr]>) {
    let cap = allocation_cap(cfg, a);
    for c in a.channels.iter().filter(|c| !c.ended) {
        if only.is_some_and(|ips| !ips.contains(&c.peer.ip())) {
            continue;
        }
        if let Some(r) = a.relay_for(&c.peer) {
            let until = channel_until(a, c);
            push_event(events, Event::ChannelRefreshed { relay: r.id, tuple: a.tuple, channel: c.number, peer: c.peer, until, cap });
        }
    }
}

/// Prunes `a`, reporting the channel bindings that expired.
fn prune(events: &mut VecDeque<Event>, a: &mut Allocation, now: Instant) {
    let (tuple, v4, v6) = (a.tuple, a.v4, a.v6);
    a.prune(now, |c| channel_unbound(events, tuple, v4, v6, c));
}

/// Sizes of the core's tables (see [`Server::footprint`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    pub allocations: usize,
    pub tuples: usize,
    pub users: usize,
    pub reservations: usize,
    pub permissions: usize,
    pub channels: usize,
    pub events: usize,
}

impl Server {
    pub fn new(cfg: ServerConfig, auth: Authenticator, policy: PeerPolicy) -> Self {
        Self::with_ledger(cfg, auth, policy, Box::new(LocalLedger::default()))
    }

    /// A core that counts quotas and keeps reservations in `ledger` (shared
    /// with the relay's other cores).
    pub fn with_ledger(cfg: ServerConfig, auth: Authenticator, policy: PeerPolicy, ledger: Box<dyn Ledger>) -> Self {
        let unauth = RateLimiter::new(cfg.unauth_rate, auth.subkey(b"unauth-rate"));
        Server {
            cfg,
            auth,
            policy,
            allocs: Slab::new(),
            by_tuple: HashMap::new(),
            events: VecDeque::new(),
            ledger,
            accepting: true,
            data_tid: 0,
            unauth,
            timers: BinaryHeap::new(),
            timer_moved: false,
            total_to_peer: Bucket::new(),
            total_from_peer: Bucket::new(),
            peer_scratch: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// Swaps in new settings (reload). Existing allocations keep running;
    /// new limits apply to new requests, and the peers the new policy
    /// refuses lose their permissions and channels at once (see
    /// `revoke_refused_peers`; the count is returned).
    pub fn reconfigure(&mut self, cfg: ServerConfig, auth: Authenticator, policy: PeerPolicy, now: Instant) -> usize {
        if cfg.unauth_rate != self.unauth.rate() {
            self.unauth = RateLimiter::new(cfg.unauth_rate, auth.subkey(b"unauth-rate"));
        }
        self.cfg = cfg;
        self.auth = auth;
        self.policy = policy;
        let revoked = self.revoke_refused_peers(now);
        // The caps may have changed, and with them which channels a fast path may take.
        self.announce_channels();
        revoked
    }

    /// After the peer policy changed: the permissions and channels of peers
    /// it now refuses (a range taken out of `peers.allow`) end at once, as
    /// CreatePermission and ChannelBind would refuse them now; channels are
    /// reported unbound, so a fast path stops relaying them too. Returns
    /// how many permissions and channels ended.
    fn revoke_refused_peers(&mut self, now: Instant) -> usize {
        let (policy, cfg, events) = (&self.policy, &self.cfg, &mut self.events);
        let mut revoked = 0;
        for a in self.allocs.values_mut() {
            let check = a.check;
            let before = a.permissions.len();
            a.permissions.retain(|p| may_permit(policy, cfg, check, p.ip));
            revoked += before - a.permissions.len();
            let (tuple, v4, v6) = (a.tuple, a.v4, a.v6);
            for c in a.channels.iter_mut().filter(|c| !c.ended) {
                if !may_bind(policy, cfg, check, c.peer) || !may_permit(policy, cfg, check, c.peer.ip()) {
                    // Expired now: its number and peer stay taken for the cooldown.
                    c.expires = c.expires.min(now);
                    c.ended = true;
                    revoked += 1;
                    channel_unbound(events, tuple, v4, v6, c);
                }
            }
        }
        revoked
    }

    /// Reports every live channel binding as [`Event::ChannelRefreshed`]:
    /// what a fast path needs after the configuration changed, or to take up
    /// allocations adopted from a previous process.
    pub fn announce_channels(&mut self) {
        for (_, a) in self.allocs.slots() {
            channels_refreshed(&mut self.events, &self.cfg, a, None);
        }
    }

    /// Takes in what a fast path (the XDP program) relayed and dropped on
    /// relayed address `relay` since it last said: the allocation's and the
    /// relay's counters, and the allocation's and this shard's bandwidth
    /// budgets are charged what its packets took on the wire, so what the
    /// socket path may still relay for the same allocation (Send
    /// indications, other peers' datagrams) is what is left of the cap.
    /// Those of an allocation already gone count in the relay's totals
    /// only: `false` then, and the I/O layer adds them to the allocation's
    /// [`Event::AllocationEnded`] itself.
    pub fn credit_fast_path(&mut self, relay: RelayId, transport: Transport, n: super::FastPathCounts, now: Instant) -> bool {
        let live = match self.allocs.get_gen_mut(relay.slot(), relay.generation()) {
            Some(a) => {
                a.bytes_to_peer += n.to_peer.bytes;
                a.packets_to_peer += n.to_peer.packets;
                a.bytes_from_peer += n.from_peer.bytes;
                a.packets_from_peer += n.from_peer.packets;
                let framing = relaying::framing(a.v4.is_some_and(|r| r.id == relay)) as u64;
                let wire = |f: super::Flow| f.bytes.saturating_add(f.packets.saturating_mul(framing));
                let (to, from) = (wire(n.to_peer), wire(n.from_peer));
                let cap = allocation_cap(&self.cfg, a);
                a.budget_to_peer.spend(to, cap, now);
                a.budget_from_peer.spend(from, cap, now);
                self.total_to_peer.spend(to, self.cfg.total_bytes_per_second, now);
                self.total_from_peer.spend(from, self.cfg.total_bytes_per_second, now);
                if n.dropped_allocation_bandwidth > 0 && !a.over_bandwidth_reported {
                    a.over_bandwidth_reported = true;
                    push_event(&mut self.events, Event::OverBandwidth { tuple: a.tuple, username: a.username.to_string() });
                }
                true
            }
            None => false,
        };
        let (t, f) = (&mut self.stats.to_peer[transport as usize], &mut self.stats.from_peer[transport as usize]);
        t.packets += n.to_peer.packets;
        t.bytes += n.to_peer.bytes;
        f.packets += n.from_peer.packets;
        f.bytes += n.from_peer.bytes;
        for (fast, n) in self.stats.fast_path.iter_mut().zip([n.to_peer, n.from_peer]) {
            fast.packets += n.packets;
            fast.bytes += n.bytes;
        }
        self.stats.dropped_allocation_bandwidth += n.dropped_allocation_bandwidth;
        self.stats.dropped_total_bandwidth += n.dropped_total_bandwidth;
        live
    }

    /// Stops or resumes accepting new allocations (graceful drain). While
    /// it does not, an authenticated Allocate gets 300 Try Alternate toward
    /// one of `ServerConfig::alternates` (508 when there is none).
    pub fn set_accepting(&mut self, accepting: bool) {
        self.accepting = accepting;
    }

    pub fn has_allocation(&self, tuple: &FiveTuple) -> bool {
        self.by_tuple.contains_key(tuple)
    }

    pub fn allocation_count(&self) -> usize {
        self.allocs.len()
    }

    /// How many entries each table holds: what a flood would have to grow.
    /// Unauthenticated traffic leaves all of them at zero (the rate limiter's
    /// table is fixed-size and allocated up front).
    pub fn footprint(&self) -> Footprint {
        Footprint {
            allocations: self.allocs.len(),
            tuples: self.by_tuple.len(),
            users: self.ledger.users(),
            reservations: self.ledger.reservations(),
            permissions: self.allocations().map(|a| a.permissions.len()).sum(),
            channels: self.allocations().map(|a| a.channels.len()).sum(),
            events: self.events.len(),
        }
    }

    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocs.slots().map(|(_, a)| a)
    }

    /// Whether events wait to be polled (cheap check for the hot path).
    #[inline]
    pub fn has_events(&self) -> bool {
        !self.events.is_empty() || self.timer_moved
    }

    /// The client an allocation's relay socket belongs to.
    #[inline]
    pub fn client_of(&mut self, relay: RelayId) -> Option<FiveTuple> {
        self.allocs.get_gen_mut(relay.slot(), relay.generation()).map(|a| a.tuple)
    }

    /// The next event for the I/O layer (see [`Event`]); a moved deadline first.
    pub fn poll_event(&mut self) -> Option<Event> {
        if std::mem::take(&mut self.timer_moved) {
            return Some(Event::DeadlineMoved);
        }
        self.events.pop_front()
    }

    fn event(&mut self, e: Event) {
        push_event(&mut self.events, e);
    }

    /// Handles one datagram (or one framed stream message) from a client.
    pub fn handle_client<'p, 'o>(
        &mut self,
        tuple: FiveTuple,
        pkt: &'p [u8],
        now: Now,
        out: &'o mut [u8],
        relays: &mut dyn RelayPorts,
    ) -> Output<'p, 'o> {
        if ChannelData::is_channel_data(pkt) {
            return self.client_channel_data(tuple, pkt, now.mono);
        }
        let msg = match Message::parse(pkt) {
            Ok(m) => m,
            Err(_) => {
                self.stats.dropped_malformed += 1;
                return Output::None;
            }
        };
        let udp = tuple.transport == Transport::Udp;
        // A request without integrity only ever gets an unsigned answer: spend
        // the source's token before doing any work for it.
        if udp && msg.class() == Class::Request && !msg.has_integrity() && !self.unauth.allow(tuple.client.ip(), now.mono) {
            self.stats.dropped_rate_limited += 1;
            return Output::None;
        }
        match msg.class() {
            Class::Request => match self.request(tuple, &msg, now, &mut *out, relays) {
                Some(Answer { len: mut n, code, signed }) => {
                    // An unsigned answer over UDP may go to a spoofed source:
                    // rate-limit it per source and keep it small.
                    if !signed && udp {
                        // (Requests without integrity were counted above.)
                        if msg.has_integrity() && !self.unauth.allow(tuple.client.ip(), now.mono) {
                            self.stats.dropped_rate_limited += 1;
                            return Output::None;
                        }
                        let limit = AMPLIFICATION_FACTOR * pkt.len();
                        if n > limit {
                            // Without SOFTWARE first, then without the reason phrase too.
                            for no_reason in [false, true] {
                                if n > limit {
                                    n = compact(out, n, no_reason).unwrap_or(usize::MAX);
                                }
                            }
                            if n > limit {
                                self.stats.dropped_amplification += 1;
                                return Output::None;
                            }
                        }
                    }
                    *self.stats.responses.entry((msg.method(), code)).or_insert(0) += 1;
                    let out: &'o [u8] = out;
                    Output::Reply(&out[..n])
                }
                None => Output::None,
            },
            Class::Indication if msg.method() == method::SEND => self.send_indication(tuple, &msg, now.mono),
            _ => Output::None,
        }
    }

}
