//! Request handling: Binding, Allocate, Refresh, CreatePermission,
//! ChannelBind, Send indications and ChannelData, per RFC 8489 and RFC 8656.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::allocation::{Allocation, Channel, Relay};
use super::bandwidth::Bucket;
use super::ratelimit::RateLimiter;
use super::slab::Slab;
use super::{EndReason, Event, Family, FiveTuple, Now, OpenError, Output, PeerPolicy, Placement, RelayId, RelayPorts, Stats, Transport};
use crate::auth::{quota_key, Authenticated, AuthFailure, Authenticator};
use crate::stun::attr::{self, comprehension_required};
use crate::stun::{method, ChannelData, Class, IntegrityKind, Message, MessageWriter, CHANNEL_MAX, CHANNEL_MIN};

/// Queued events beyond which refused-peer reports are dropped.
const MAX_EVENTS: usize = 4096;
/// UNKNOWN-ATTRIBUTES lists at most this many types.
const MAX_UNKNOWN: usize = 8;
/// How long a port reserved by EVEN-PORT's R bit waits for its token (RFC 8656: about 30 s).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Reservations held at once; beyond this, EVEN-PORT with R gets 508.
const MAX_RESERVATIONS: usize = 4096;
/// An answer without MESSAGE-INTEGRITY over UDP (the source address is
/// unproven) is at most this many times the request (QUIC's anti-amplification
/// bound, RFC 9000 8.1). Larger ones lose SOFTWARE and the reason phrase, and
/// are dropped when that is not enough.
pub const AMPLIFICATION_FACTOR: usize = 3;
/// Default answers per second per source IP to unauthenticated UDP requests.
pub const DEFAULT_UNAUTH_RATE: u32 = 100;

/// A relay port held back for a later Allocate with RESERVATION-TOKEN.
struct Reservation {
    port: u16,
    expires: Instant,
}

/// A relay address: where sockets bind, and what clients are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayAddr {
    pub local: IpAddr,
    pub external: IpAddr,
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
        }
    }
}

pub struct Server {
    cfg: ServerConfig,
    auth: Authenticator,
    policy: PeerPolicy,
    allocs: Slab<Allocation>,
    by_tuple: HashMap<FiveTuple, u32>,
    per_user: HashMap<Box<str>, u32>,
    events: VecDeque<Event>,
    reservations: HashMap<[u8; 8], Reservation>,
    accepting: bool,
    data_tid: u64,
    unauth: RateLimiter,
    /// Where the next partial sweep starts (see [`Server::sweep`]).
    sweep_at: u32,
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

/// How to sign and frame a response to one request.
struct Reply {
    method: u16,
    tid: [u8; 12],
    key: Option<[u8; 16]>,
    sha256: bool,
    fingerprint: bool,
    software: Option<Arc<str>>,
}

impl Reply {
    /// Writes the response; `code` is 200 for a success.
    fn write(&self, out: &mut [u8], class: Class, code: u16, f: impl FnOnce(&mut MessageWriter)) -> Handled {
        let mut w = MessageWriter::new(out, self.method, class, &self.tid);
        f(&mut w);
        if let Some(s) = &self.software {
            w.attr(attr::SOFTWARE, s.as_bytes());
        }
        if let Some(k) = &self.key {
            if self.sha256 {
                w.integrity_sha256(k);
            } else {
                w.integrity(k);
            }
        }
        if self.fingerprint {
            w.fingerprint();
        }
        let len = w.finish().ok()?;
        Some(Answer { len, code, signed: self.key.is_some() })
    }

    fn ok(&self, out: &mut [u8], f: impl FnOnce(&mut MessageWriter)) -> Handled {
        self.write(out, Class::Success, 200, f)
    }

    fn err(&self, out: &mut [u8], code: u16) -> Handled {
        self.write(out, Class::Error, code, |w| {
            w.error_code(code, reason(code));
        })
    }
}

/// Short reason phrases (short keeps unauthenticated answers small).
fn reason(code: u16) -> &'static str {
    match code {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        508 => "Insufficient Capacity",
        _ => "Error",
    }
}

fn known_attribute(m: u16, t: u16) -> bool {
    use attr::*;
    if matches!(t, USERNAME | REALM | NONCE) {
        return true;
    }
    match m {
        method::BINDING => matches!(t, 0x0024 | 0x0025), // ICE PRIORITY, USE-CANDIDATE
        method::ALLOCATE => matches!(
            t,
            REQUESTED_TRANSPORT | LIFETIME | DONT_FRAGMENT | EVEN_PORT | RESERVATION_TOKEN | REQUESTED_ADDRESS_FAMILY
        ),
        method::REFRESH => matches!(t, LIFETIME | REQUESTED_ADDRESS_FAMILY),
        method::CREATE_PERMISSION => t == XOR_PEER_ADDRESS,
        method::CHANNEL_BIND => matches!(t, CHANNEL_NUMBER | XOR_PEER_ADDRESS),
        method::SEND => matches!(t, XOR_PEER_ADDRESS | DATA | DONT_FRAGMENT),
        _ => false,
    }
}

/// Requested address family attribute value -> family, or the error code.
fn family_of(v: &[u8]) -> Result<Family, u16> {
    if v.len() != 4 {
        return Err(400);
    }
    match v[0] {
        attr::FAMILY_IPV4 => Ok(Family::V4),
        attr::FAMILY_IPV6 => Ok(Family::V6),
        _ => Err(440),
    }
}

/// A response written into the output buffer.
struct Answer {
    len: usize,
    /// 200 for a success, else the error code (for the metrics).
    code: u16,
    /// Whether it carries MESSAGE-INTEGRITY (unsigned UDP answers are capped).
    signed: bool,
}

/// The outcome of a handler: a response to send, or nothing.
type Handled = Option<Answer>;

/// Rewrites the unsigned response in `out[..n]` smaller: without SOFTWARE,
/// and with `no_reason` also with an empty reason phrase. Returns the new length.
fn compact(out: &mut [u8], n: usize, no_reason: bool) -> Option<usize> {
    let mut orig = [0u8; 576];
    orig.get_mut(..n)?.copy_from_slice(out.get(..n)?);
    let m = Message::parse(&orig[..n]).ok()?;
    let mut w = MessageWriter::new(out, m.method(), m.class(), m.transaction_id());
    for (t, v) in m.attributes() {
        match t {
            attr::SOFTWARE => {}
            attr::ERROR_CODE if no_reason => {
                w.attr(t, v.get(..4)?);
            }
            _ => {
                w.attr(t, v);
            }
        }
    }
    if m.has_fingerprint() {
        w.fingerprint();
    }
    w.finish().ok()
}

#[derive(Clone, Copy)]
enum Direction {
    ToPeer,
    FromPeer,
}

/// Takes `len` bytes from the allocation's and the server's budgets for
/// `dir`; `false` drops the packet, counted by the cap that stopped it. The
/// first time an allocation goes over its own cap is reported as an event.
#[allow(clippy::too_many_arguments)]
#[inline]
fn within_budget(
    dir: Direction,
    a: &mut Allocation,
    total: &mut Bucket,
    cfg: &ServerConfig,
    stats: &mut Stats,
    events: &mut VecDeque<Event>,
    len: usize,
    now: Instant,
) -> bool {
    let own = match dir {
        Direction::ToPeer => &mut a.budget_to_peer,
        Direction::FromPeer => &mut a.budget_from_peer,
    };
    if !own.take(len, cfg.allocation_bytes_per_second, now) {
        stats.dropped_allocation_bandwidth += 1;
        if !a.over_bandwidth_reported {
            a.over_bandwidth_reported = true;
            push_event(events, Event::OverBandwidth { tuple: a.tuple, username: a.username.to_string() });
        }
        return false;
    }
    if !total.take(len, cfg.total_bytes_per_second, now) {
        stats.dropped_total_bandwidth += 1;
        return false;
    }
    true
}

impl Server {
    pub fn new(cfg: ServerConfig, auth: Authenticator, policy: PeerPolicy) -> Self {
        let unauth = RateLimiter::new(cfg.unauth_rate, auth.subkey(b"unauth-rate"));
        Server {
            cfg,
            auth,
            policy,
            allocs: Slab::new(),
            by_tuple: HashMap::new(),
            per_user: HashMap::new(),
            events: VecDeque::new(),
            reservations: HashMap::new(),
            accepting: true,
            data_tid: 0,
            unauth,
            sweep_at: 0,
            total_to_peer: Bucket::new(),
            total_from_peer: Bucket::new(),
            peer_scratch: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// Swaps in new settings (reload). Existing allocations keep running;
    /// new limits apply to new requests.
    pub fn reconfigure(&mut self, cfg: ServerConfig, auth: Authenticator, policy: PeerPolicy) {
        if cfg.unauth_rate != self.unauth.rate() {
            self.unauth = RateLimiter::new(cfg.unauth_rate, auth.subkey(b"unauth-rate"));
        }
        self.cfg = cfg;
        self.auth = auth;
        self.policy = policy;
    }

    /// Stops or resumes accepting new allocations (graceful drain).
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
            users: self.per_user.len(),
            reservations: self.reservations.len(),
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
        !self.events.is_empty()
    }

    /// The client an allocation's relay socket belongs to.
    #[inline]
    pub fn client_of(&mut self, relay: RelayId) -> Option<FiveTuple> {
        self.allocs.get_gen_mut(relay.slot(), relay.generation()).map(|a| a.tuple)
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn event(&mut self, e: Event) {
        push_event(&mut self.events, e);
    }

    /// Handles one datagram (or one framed stream message) from a client.
    pub fn handle_client<'a>(
        &mut self,
        tuple: FiveTuple,
        pkt: &'a [u8],
        now: Now,
        out: &'a mut [u8],
        relays: &mut dyn RelayPorts,
    ) -> Output<'a> {
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
                    let out: &'a [u8] = out;
                    Output::Reply(&out[..n])
                }
                None => Output::None,
            },
            Class::Indication if msg.method() == method::SEND => self.send_indication(tuple, &msg, now.mono),
            _ => Output::None,
        }
    }

    #[inline]
    fn client_channel_data<'a>(&mut self, tuple: FiveTuple, pkt: &'a [u8], now: Instant) -> Output<'a> {
        let Some(cd) = ChannelData::parse(pkt) else {
            self.stats.dropped_malformed += 1;
            return Output::None;
        };
        let Some(&slot) = self.by_tuple.get(&tuple) else {
            self.stats.dropped_no_allocation += 1;
            return Output::None;
        };
        let Some(a) = self.allocs.get_mut(slot) else { return Output::None };
        let Some(peer) = a.channel(cd.channel, now).map(|c| c.peer) else {
            self.stats.dropped_no_channel += 1;
            return Output::None;
        };
        if !a.has_permission(peer.ip(), now) {
            self.stats.dropped_no_permission += 1;
            return Output::None;
        }
        let Some(relay) = a.relay_for(&peer) else { return Output::None };
        if !within_budget(Direction::ToPeer, a, &mut self.total_to_peer, &self.cfg, &mut self.stats, &mut self.events, cd.data.len(), now) {
            return Output::None;
        }
        a.bytes_to_peer += cd.data.len() as u64;
        a.packets_to_peer += 1;
        let f = &mut self.stats.to_peer[tuple.transport as usize];
        f.packets += 1;
        f.bytes += cd.data.len() as u64;
        Output::Relay { relay: relay.id, peer: self.to_wire(peer), data: cd.data, dont_fragment: false }
    }

    fn send_indication<'a>(&mut self, tuple: FiveTuple, msg: &Message<'a>, now: Instant) -> Output<'a> {
        let Some(&slot) = self.by_tuple.get(&tuple) else {
            self.stats.dropped_no_allocation += 1;
            return Output::None;
        };
        // One walk over the attributes: the two it needs, DONT-FRAGMENT, and
        // whether any comprehension-required one is unknown (RFC 8489 6.3.1:
        // such an indication is discarded, not relayed).
        let (mut peer, mut data, mut dont_fragment) = (None, None, false);
        for (t, v) in msg.attributes() {
            match t {
                attr::XOR_PEER_ADDRESS if peer.is_none() => peer = Some(v),
                attr::DATA if data.is_none() => data = Some(v),
                attr::DONT_FRAGMENT => dont_fragment = true,
                _ if comprehension_required(t) && !known_attribute(method::SEND, t) => {
                    self.stats.dropped_unknown_attribute += 1;
                    return Output::None;
                }
                _ => {}
            }
        }
        let peer = peer.and_then(|v| attr::decode_xor_address(v, msg.transaction_id()));
        let (Some(peer), Some(data)) = (peer, data) else {
            self.stats.dropped_malformed += 1;
            return Output::None;
        };
        if !self.policy.permits_port(peer) {
            self.stats.peer_refusals += 1;
            return Output::None;
        }
        let Some(a) = self.allocs.get_mut(slot) else { return Output::None };
        if !a.has_permission(peer.ip(), now) {
            self.stats.dropped_no_permission += 1;
            return Output::None;
        }
        let Some(relay) = a.relay_for(&peer) else { return Output::None };
        if !within_budget(Direction::ToPeer, a, &mut self.total_to_peer, &self.cfg, &mut self.stats, &mut self.events, data.len(), now) {
            return Output::None;
        }
        a.bytes_to_peer += data.len() as u64;
        a.packets_to_peer += 1;
        let f = &mut self.stats.to_peer[tuple.transport as usize];
        f.packets += 1;
        f.bytes += data.len() as u64;
        Output::Relay { relay: relay.id, peer: self.to_wire(peer), data, dont_fragment }
    }

    /// Handles a datagram that arrived on relay socket `relay` from `from`.
    /// Returns the client to send to and the ChannelData or Data indication
    /// written into `out`; `None` drops it (no permission, or gone).
    pub fn handle_peer<'a>(
        &mut self,
        relay: RelayId,
        from: SocketAddr,
        data: &[u8],
        now: Instant,
        out: &'a mut [u8],
    ) -> Option<(FiveTuple, &'a [u8])> {
        let from = self.from_wire(from);
        let Some(a) = self.allocs.get_gen_mut(relay.slot(), relay.generation()) else {
            self.stats.dropped_no_allocation += 1;
            return None;
        };
        if !a.has_permission(from.ip(), now) {
            self.stats.dropped_no_permission += 1;
            return None;
        }
        if !within_budget(Direction::FromPeer, a, &mut self.total_from_peer, &self.cfg, &mut self.stats, &mut self.events, data.len(), now) {
            return None;
        }
        let n = if let Some(ch) = a.channel_for_peer(from, now) {
            let total = 4 + data.len();
            let padded = if a.tuple.transport.is_stream() { (total + 3) & !3 } else { total };
            if data.len() > u16::MAX as usize || out.len() < padded {
                self.stats.dropped_malformed += 1;
                return None;
            }
            out[..4].copy_from_slice(&ChannelData::header(ch.number, data.len()));
            out[4..total].copy_from_slice(data);
            out[total..padded].fill(0);
            padded
        } else {
            self.data_tid = self.data_tid.wrapping_add(1);
            let mut tid = [0u8; 12];
            tid[4..].copy_from_slice(&self.data_tid.to_be_bytes());
            let mut w = MessageWriter::new(out, method::DATA, Class::Indication, &tid);
            w.xor_address(attr::XOR_PEER_ADDRESS, from).attr(attr::DATA, data);
            match w.finish() {
                Ok(n) => n,
                Err(_) => {
                    self.stats.dropped_malformed += 1;
                    return None;
                }
            }
        };
        a.bytes_from_peer += data.len() as u64;
        a.packets_from_peer += 1;
        let tuple = a.tuple;
        let f = &mut self.stats.from_peer[tuple.transport as usize];
        f.packets += 1;
        f.bytes += data.len() as u64;
        let out: &'a [u8] = out;
        Some((tuple, &out[..n]))
    }

    /// Our external relay address -> the local one sockets bind (hairpin
    /// between two allocations behind 1:1 NAT).
    #[inline]
    fn to_wire(&self, peer: SocketAddr) -> SocketAddr {
        let r = if peer.is_ipv4() { self.cfg.relay_v4 } else { self.cfg.relay_v6 };
        match r {
            Some(r) if r.local != r.external && peer.ip() == r.external => SocketAddr::new(r.local, peer.port()),
            _ => peer,
        }
    }

    #[inline]
    fn from_wire(&self, from: SocketAddr) -> SocketAddr {
        let r = if from.is_ipv4() { self.cfg.relay_v4 } else { self.cfg.relay_v6 };
        match r {
            Some(r) if r.local != r.external && from.ip() == r.local => SocketAddr::new(r.external, from.port()),
            _ => from,
        }
    }

    fn reply_for(&self, msg: &Message, key: Option<[u8; 16]>) -> Reply {
        Reply {
            method: msg.method(),
            tid: *msg.transaction_id(),
            key,
            sha256: msg.integrity_kind() == Some(IntegrityKind::Sha256),
            fingerprint: msg.has_fingerprint(),
            software: self.cfg.software.clone(),
        }
    }

    /// Lists comprehension-required attributes this method does not know.
    fn unknown_attributes(msg: &Message) -> ([u16; MAX_UNKNOWN], usize) {
        let mut list = [0u16; MAX_UNKNOWN];
        let mut n = 0;
        for t in msg.attribute_types() {
            if comprehension_required(t) && !known_attribute(msg.method(), t) && n < MAX_UNKNOWN && !list[..n].contains(&t) {
                list[n] = t;
                n += 1;
            }
        }
        (list, n)
    }

    fn unknown_reply(&self, msg: &Message, key: Option<[u8; 16]>, out: &mut [u8]) -> Handled {
        let (list, n) = Self::unknown_attributes(msg);
        if n == 0 {
            return None;
        }
        let mut v = [0u8; 2 * MAX_UNKNOWN];
        for (i, t) in list[..n].iter().enumerate() {
            v[2 * i..2 * i + 2].copy_from_slice(&t.to_be_bytes());
        }
        self.reply_for(msg, key).write(out, Class::Error, 420, |w| {
            w.error_code(420, reason(420)).attr(attr::UNKNOWN_ATTRIBUTES, &v[..2 * n]);
        })
    }

    fn request(&mut self, tuple: FiveTuple, msg: &Message, now: Now, out: &mut [u8], relays: &mut dyn RelayPorts) -> Handled {
        match msg.method() {
            method::BINDING => {
                if let Some(a) = self.unknown_reply(msg, None, out) {
                    return Some(a);
                }
                self.reply_for(msg, None).ok(out, |w| {
                    w.xor_address(attr::XOR_MAPPED_ADDRESS, tuple.client);
                })
            }
            method::ALLOCATE | method::REFRESH | method::CREATE_PERMISSION | method::CHANNEL_BIND => {
                let auth = match self.auth.authenticate(msg, tuple.client.ip(), now.unix) {
                    Ok(a) => a,
                    Err(f) => return self.auth_failure(tuple, msg, f, now, out),
                };
                if let Some(a) = self.unknown_reply(msg, Some(auth.key), out) {
                    return Some(a);
                }
                let reply = self.reply_for(msg, Some(auth.key));
                match msg.method() {
                    method::ALLOCATE => self.allocate(tuple, msg, auth, now, &reply, out, relays),
                    method::REFRESH => self.refresh(tuple, msg, auth, now, &reply, out, relays),
                    method::CREATE_PERMISSION => self.create_permission(tuple, msg, auth, now.mono, &reply, out),
                    _ => self.channel_bind(tuple, msg, auth, now.mono, &reply, out),
                }
            }
            _ => self.reply_for(msg, None).err(out, 400),
        }
    }

    fn auth_failure(&mut self, tuple: FiveTuple, msg: &Message, f: AuthFailure, now: Now, out: &mut [u8]) -> Handled {
        self.stats.auth_failures[f as usize] += 1;
        let code = f.code();
        let reply = self.reply_for(msg, None);
        if code == 400 {
            return reply.err(out, 400);
        }
        // Echo a still-valid nonce: a client that sees the same nonce twice
        // knows its credentials are wrong and stops instead of retrying.
        let ip = tuple.client.ip();
        let nonce = match msg.get(attr::NONCE) {
            Some(n) if code == 401 && self.auth.nonce_valid(n, ip, now.unix) => n.try_into().unwrap_or_else(|_| self.auth.nonce(ip, now.unix)),
            _ => self.auth.nonce(ip, now.unix),
        };
        let realm = self.auth.realm().to_owned();
        reply.write(out, Class::Error, code, |w| {
            w.error_code(code, reason(code)).attr(attr::REALM, realm.as_bytes()).attr(attr::NONCE, &nonce);
        })
    }

    /// The allocation on this 5-tuple, checked against the request's user.
    fn own_allocation(&self, tuple: &FiveTuple, auth: &Authenticated) -> Result<u32, u16> {
        let &slot = self.by_tuple.get(tuple).ok_or(437u16)?;
        let a = self.allocs.get(slot).ok_or(437u16)?;
        if &*a.username != auth.username {
            return Err(441);
        }
        Ok(slot)
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate(
        &mut self,
        tuple: FiveTuple,
        msg: &Message,
        auth: Authenticated,
        now: Now,
        reply: &Reply,
        out: &mut [u8],
        relays: &mut dyn RelayPorts,
    ) -> Handled {
        if let Some(&slot) = self.by_tuple.get(&tuple) {
            let a = self.allocs.get(slot)?;
            if a.allocate_tid == *msg.transaction_id() && &*a.username == auth.username {
                // A retransmission of the request that created it (RFC 8656 7.2).
                let remaining = a.expires.saturating_duration_since(now.mono).as_secs() as u32;
                return Self::allocate_success(reply, a, tuple, remaining, None, None, out);
            }
            return reply.err(out, 437);
        }
        if !self.accepting {
            self.stats.capacity_refusals += 1;
            return reply.err(out, 508);
        }
        match msg.get(attr::REQUESTED_TRANSPORT) {
            None => return reply.err(out, 400),
            Some(v) if v.len() != 4 => return reply.err(out, 400),
            Some(v) if v[0] != 17 => return reply.err(out, 442),
            Some(_) => {}
        }
        let even = msg.get(attr::EVEN_PORT);
        let token = msg.get(attr::RESERVATION_TOKEN);
        let raf = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        let aaf = msg.get(attr::ADDITIONAL_ADDRESS_FAMILY);
        if (even.is_some() && token.is_some()) || (raf.is_some() && (token.is_some() || aaf.is_some())) {
            return reply.err(out, 400);
        }
        // A reservation is only taken out of the table once every check below
        // has passed: a request refused on the way (quota, family, LIFETIME)
        // must not swallow the reserved port (it would never be released).
        let mut claim: Option<[u8; 8]> = None;
        let placement = match (even, token) {
            (Some(v), _) if v.len() != 1 => return reply.err(out, 400),
            (Some(v), _) if v[0] & 0x80 != 0 => {
                if self.reservations.len() >= MAX_RESERVATIONS {
                    self.stats.capacity_refusals += 1;
                    return reply.err(out, 508);
                }
                Placement::EvenReserveNext
            }
            (Some(_), _) => Placement::Even,
            (None, Some(t)) => {
                let Ok(t) = <[u8; 8]>::try_from(t) else { return reply.err(out, 400) };
                match self.reservations.get(&t) {
                    Some(r) if r.expires > now.mono => {
                        claim = Some(t);
                        Placement::Reserved(r.port)
                    }
                    Some(_) => {
                        if let Some(r) = self.reservations.remove(&t) {
                            relays.release(Family::V4, r.port);
                        }
                        self.stats.capacity_refusals += 1;
                        return reply.err(out, 508);
                    }
                    None => {
                        self.stats.capacity_refusals += 1;
                        return reply.err(out, 508);
                    }
                }
            }
            (None, None) => Placement::Any,
        };
        let (primary, dual) = match (raf, aaf) {
            (Some(v), None) => match family_of(v) {
                // Reservations are kept for IPv4 relays only.
                Ok(Family::V6) if placement == Placement::EvenReserveNext => return reply.err(out, 508),
                Ok(f) => (f, false),
                Err(code) => return reply.err(out, code),
            },
            (None, Some(v)) => match family_of(v) {
                Ok(Family::V6) => (Family::V4, true),
                _ => return reply.err(out, 400),
            },
            _ => (Family::V4, false),
        };
        let qkey = quota_key(auth.username);
        if self.cfg.user_quota > 0 && self.per_user.get(qkey).copied().unwrap_or(0) >= self.cfg.user_quota {
            self.stats.quota_refusals += 1;
            return reply.err(out, 486);
        }
        if self.cfg.total_quota > 0 && self.allocs.len() >= self.cfg.total_quota as usize {
            self.stats.capacity_refusals += 1;
            return reply.err(out, 508);
        }
        let lifetime = match msg.get(attr::LIFETIME).map(attr::decode_u32) {
            Some(Some(l)) => l.clamp(self.cfg.default_lifetime.min(self.cfg.max_lifetime), self.cfg.max_lifetime),
            Some(None) => return reply.err(out, 400),
            None => self.cfg.default_lifetime.min(self.cfg.max_lifetime),
        };
        if let Some(t) = claim {
            self.reservations.remove(&t);
        }
        let (slot, generation) = self.allocs.vacant();
        // RFC 8656 7.2, 14: DONT-FRAGMENT asks for the DF bit on everything
        // the relay sends for this allocation; the socket sets it.
        let dont_fragment = msg.get(attr::DONT_FRAGMENT).is_some();
        let first = match self.open_relay(relays, slot, generation, primary, placement, dont_fragment) {
            Ok(r) => r,
            Err(code) => {
                if let Placement::Reserved(port) = placement {
                    relays.release(Family::V4, port);
                }
                self.stats.capacity_refusals += (code == 508) as u64;
                if code == 420 {
                    // The DF bit cannot be set: DONT-FRAGMENT is then an
                    // unknown comprehension-required attribute (RFC 8656 7.2).
                    return reply.write(out, Class::Error, 420, |w| {
                        w.error_code(420, reason(420)).attr(attr::UNKNOWN_ATTRIBUTES, &attr::DONT_FRAGMENT.to_be_bytes());
                    });
                }
                return reply.err(out, code);
            }
        };
        let token = (placement == Placement::EvenReserveNext).then(|| {
            let t = self.auth.token(slot, generation, now.unix);
            let port = first.local_port + 1;
            self.reservations.insert(t, Reservation { port, expires: now.mono + RESERVATION_LIFETIME });
            t
        });
        let (v4, mut v6) = match primary {
            Family::V4 => (Some(first), None),
            Family::V6 => (None, Some(first)),
        };
        let mut address_error = None;
        if dual {
            let second = if placement == Placement::Even { Placement::Even } else { Placement::Any };
            match self.open_relay(relays, slot, generation, Family::V6, second, dont_fragment) {
                Ok(r) => v6 = Some(r),
                Err(code) => address_error = Some(code),
            }
        }
        let a = Allocation {
            tuple,
            username: auth.username.into(),
            key: auth.key,
            v4,
            v6,
            created: now.mono,
            expires: now.mono + Duration::from_secs(lifetime as u64),
            allocate_tid: *msg.transaction_id(),
            lifetime,
            permissions: Vec::new(),
            channels: Vec::new(),
            bytes_to_peer: 0,
            bytes_from_peer: 0,
            packets_to_peer: 0,
            packets_from_peer: 0,
            budget_to_peer: Bucket::new(),
            budget_from_peer: Bucket::new(),
            over_bandwidth_reported: false,
        };
        let n = Self::allocate_success(reply, &a, tuple, lifetime, address_error, token, out);
        let relayed = [a.v4, a.v6].iter().flatten().map(|r| r.advertised).collect();
        let inserted = self.allocs.insert(a);
        debug_assert_eq!(inserted, slot);
        self.by_tuple.insert(tuple, slot);
        *self.per_user.entry(qkey.into()).or_insert(0) += 1;
        self.stats.allocations_created += 1;
        self.event(Event::AllocationCreated { tuple, username: auth.username.to_owned(), relayed, lifetime });
        n
    }

    fn open_relay(
        &self,
        relays: &mut dyn RelayPorts,
        slot: u32,
        generation: u32,
        family: Family,
        placement: Placement,
        dont_fragment: bool,
    ) -> Result<Relay, u16> {
        let cfg = match family {
            Family::V4 => self.cfg.relay_v4,
            Family::V6 => self.cfg.relay_v6,
        };
        let Some(cfg) = cfg else { return Err(440) };
        let id = RelayId::new(slot, generation, family);
        match relays.open(id, family, placement, dont_fragment) {
            Ok(local) => Ok(Relay { id, advertised: SocketAddr::new(cfg.external, local.port()), local_port: local.port() }),
            Err(OpenError::FamilyUnsupported) => Err(440),
            Err(OpenError::Exhausted) => Err(508),
            Err(OpenError::DontFragmentUnsupported) => Err(420),
        }
    }

    fn allocate_success(
        reply: &Reply,
        a: &Allocation,
        tuple: FiveTuple,
        lifetime: u32,
        address_error: Option<u16>,
        token: Option<[u8; 8]>,
        out: &mut [u8],
    ) -> Handled {
        reply.ok(out, |w| {
            if let Some(t) = token {
                w.attr(attr::RESERVATION_TOKEN, &t);
            }
            for r in [a.v4, a.v6].iter().flatten() {
                w.xor_address(attr::XOR_RELAYED_ADDRESS, r.advertised);
            }
            w.u32(attr::LIFETIME, lifetime);
            w.xor_address(attr::XOR_MAPPED_ADDRESS, tuple.client);
            if let Some(code) = address_error {
                let r = reason(code).as_bytes();
                let mut v = [0u8; 64];
                v[..4].copy_from_slice(&[attr::FAMILY_IPV6, 0, (code / 100) as u8, (code % 100) as u8]);
                v[4..4 + r.len()].copy_from_slice(r);
                w.attr(attr::ADDRESS_ERROR_CODE, &v[..4 + r.len()]);
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn refresh(
        &mut self,
        tuple: FiveTuple,
        msg: &Message,
        auth: Authenticated,
        now: Now,
        reply: &Reply,
        out: &mut [u8],
        relays: &mut dyn RelayPorts,
    ) -> Handled {
        let slot = match self.own_allocation(&tuple, &auth) {
            Ok(s) => s,
            Err(code) => return reply.err(out, code),
        };
        if let Some(v) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let a = self.allocs.get(slot)?;
            match family_of(v) {
                Ok(Family::V4) if a.v4.is_some() => {}
                Ok(Family::V6) if a.v6.is_some() => {}
                Ok(_) => return reply.err(out, 443),
                Err(code) => return reply.err(out, code),
            }
        }
        let requested = match msg.get(attr::LIFETIME) {
            Some(v) => match attr::decode_u32(v) {
                Some(l) => l,
                None => return reply.err(out, 400),
            },
            None => self.cfg.default_lifetime,
        };
        if requested == 0 {
            self.remove(slot, EndReason::Deleted, now.mono, relays);
            return reply.ok(out, |w| {
                w.u32(attr::LIFETIME, 0);
            });
        }
        // RFC 8656 7.3: min(requested, max), but never below the default.
        let max = self.cfg.max_lifetime;
        let lifetime = requested.min(max).max(self.cfg.default_lifetime.min(max));
        let a = self.allocs.get_mut(slot)?;
        a.expires = now.mono + Duration::from_secs(lifetime as u64);
        a.lifetime = lifetime;
        reply.ok(out, |w| {
            w.u32(attr::LIFETIME, lifetime);
        })
    }

    fn create_permission(
        &mut self,
        tuple: FiveTuple,
        msg: &Message,
        auth: Authenticated,
        now: Instant,
        reply: &Reply,
        out: &mut [u8],
    ) -> Handled {
        let slot = match self.own_allocation(&tuple, &auth) {
            Ok(s) => s,
            Err(code) => return reply.err(out, code),
        };
        let mut ips = std::mem::take(&mut self.peer_scratch);
        ips.clear();
        let r = self.permit_peers(tuple, msg, slot, now, reply, out, &mut ips);
        self.peer_scratch = ips;
        r
    }

    /// CreatePermission for the peers in `msg` (collected into `ips`).
    #[allow(clippy::too_many_arguments)]
    fn permit_peers(
        &mut self,
        tuple: FiveTuple,
        msg: &Message,
        slot: u32,
        now: Instant,
        reply: &Reply,
        out: &mut [u8],
        ips: &mut Vec<IpAddr>,
    ) -> Handled {
        // As many XOR-PEER-ADDRESS as the message holds; more than the cap
        // could ever grant is refused below without keeping them all.
        let cap = self.cfg.max_permissions;
        let mut n = 0usize;
        for v in msg.get_all(attr::XOR_PEER_ADDRESS) {
            let Some(p) = attr::decode_xor_address(v, msg.transaction_id()) else { return reply.err(out, 400) };
            n += 1;
            if ips.len() <= cap {
                ips.push(p.ip());
            }
        }
        if n == 0 {
            return reply.err(out, 400);
        }
        let ips = &ips[..];
        let a = self.allocs.get(slot)?;
        // All or nothing: one refused peer fails the whole request.
        for ip in ips {
            if a.relay_for(&SocketAddr::new(*ip, 0)).is_none() {
                return reply.err(out, 443);
            }
        }
        for ip in ips {
            if !self.policy.permits_ip(*ip) {
                self.stats.peer_refusals += 1;
                self.event(Event::PeerRefused { tuple, peer: *ip });
                return reply.err(out, 403);
            }
        }
        let a = self.allocs.get_mut(slot)?;
        prune(&mut self.events, a, now);
        if n > cap || a.permissions.len() + a.new_permissions(ips) > cap {
            self.stats.quota_refusals += 1;
            return reply.err(out, 508);
        }
        let expires = now + Duration::from_secs(self.cfg.permission_lifetime as u64);
        for ip in ips {
            a.permit(*ip, expires);
        }
        reply.ok(out, |_| {})
    }

    fn channel_bind(
        &mut self,
        tuple: FiveTuple,
        msg: &Message,
        auth: Authenticated,
        now: Instant,
        reply: &Reply,
        out: &mut [u8],
    ) -> Handled {
        let slot = match self.own_allocation(&tuple, &auth) {
            Ok(s) => s,
            Err(code) => return reply.err(out, code),
        };
        let number = match msg.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return reply.err(out, 400),
        };
        if !(CHANNEL_MIN..=self.cfg.channel_max).contains(&number) {
            return reply.err(out, 400);
        }
        let Some(peer) = msg.get(attr::XOR_PEER_ADDRESS).and_then(|v| attr::decode_xor_address(v, msg.transaction_id()))
        else {
            return reply.err(out, 400);
        };
        if self.allocs.get(slot)?.relay_for(&peer).is_none() {
            return reply.err(out, 443);
        }
        if !self.policy.permits(peer) {
            self.stats.peer_refusals += 1;
            self.event(Event::PeerRefused { tuple, peer: peer.ip() });
            return reply.err(out, 403);
        }
        let cap = self.cfg.max_permissions;
        let a = self.allocs.get_mut(slot)?;
        prune(&mut self.events, a, now);
        // A number stays tied to its peer (and the peer to its number) while
        // bound and for the cooldown after (RFC 8656 12).
        if a.channels.iter().any(|c| (c.number == number) != (c.peer == peer)) {
            return reply.err(out, 400);
        }
        let new_channel = !a.channels.iter().any(|c| c.number == number);
        if (new_channel && a.channels.len() >= cap) || a.permissions.len() + a.new_permissions(&[peer.ip()]) > cap {
            self.stats.quota_refusals += 1;
            return reply.err(out, 508);
        }
        let expires = now + Duration::from_secs(self.cfg.channel_lifetime as u64);
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => {
                c.expires = expires;
                c.ended = false;
            }
            None => a.channels.push(Channel { number, peer, expires, ended: false }),
        }
        a.permit(peer.ip(), now + Duration::from_secs(self.cfg.permission_lifetime as u64));
        let relay = a.relay_for(&peer)?.id;
        self.event(Event::ChannelBound { relay, tuple, channel: number, peer });
        reply.ok(out, |_| {})
    }

    fn remove(&mut self, slot: u32, reason: EndReason, now: Instant, relays: &mut dyn RelayPorts) {
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
