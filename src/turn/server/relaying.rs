//! The data path: ChannelData and Send indications from clients to peers,
//! datagrams from peers back as ChannelData or Data indications, each held
//! to the permissions and the bandwidth caps. No allocation, no hashing
//! beyond the 5-tuple lookup.

use super::*;

#[derive(Clone, Copy)]
pub(super) enum Direction {
    ToPeer,
    FromPeer,
}

/// What a relayed payload of `len` bytes to or from `peer` costs against the
/// caps: what it takes on the wire, not only its payload. The datagram on the
/// peer's leg carries IP and UDP headers (28 bytes over IPv4, 48 over IPv6)
/// and the client's leg at least the 4-byte ChannelData header. So an empty
/// ChannelData message is worth 32 bytes (over IPv4): relayed, as RFC 8656
/// allows, but a flood of empty or tiny messages is held to the cap in wire
/// bytes like any other.
#[inline]
pub(super) fn wire_cost(len: usize, peer: &SocketAddr) -> usize {
    len + framing(peer.is_ipv4())
}

/// The headers [`wire_cost`] adds to a payload to or from a peer of that family.
pub(super) fn framing(ipv4: bool) -> usize {
    let ip_udp = if ipv4 { 28 } else { 48 };
    ip_udp + CHANNEL_HEADER
}

/// The ChannelData header, the least framing a relayed payload has on the client's leg.
const CHANNEL_HEADER: usize = 4;

/// Takes `len` bytes (see [`wire_cost`]) from the allocation's and the
/// server's budgets for `dir`; `false` drops the packet, counted by the cap
/// that stopped it. The first time an allocation goes over its own cap is
/// reported as an event.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) fn within_budget(
    dir: Direction,
    a: &mut Allocation,
    total: &mut Bucket,
    cfg: &ServerConfig,
    stats: &mut Stats,
    events: &mut VecDeque<Event>,
    len: usize,
    now: Instant,
) -> bool {
    let cap = allocation_cap(cfg, a);
    let own = match dir {
        Direction::ToPeer => &mut a.budget_to_peer,
        Direction::FromPeer => &mut a.budget_from_peer,
    };
    if !own.take(len, cap, now) {
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
    #[inline]
    pub(super) fn client_channel_data<'p, 'o>(&mut self, tuple: FiveTuple, pkt: &'p [u8], now: Instant) -> Output<'p, 'o> {
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
        // As it arrived: what the relay drops itself is not the leg's loss.
        a.health.from_client(cd.data, now);
        if !within_budget(Direction::ToPeer, a, &mut self.total_to_peer, &self.cfg, &mut self.stats, &mut self.events, wire_cost(cd.data.len(), &peer), now) {
            return Output::None;
        }
        a.bytes_to_peer += cd.data.len() as u64;
        a.packets_to_peer += 1;
        let f = &mut self.stats.to_peer[tuple.transport as usize];
        f.packets += 1;
        f.bytes += cd.data.len() as u64;
        Output::Relay { relay: relay.id, peer: self.bound_address(peer), data: cd.data, dont_fragment: false }
    }

    pub(super) fn send_indication<'p, 'o>(&mut self, tuple: FiveTuple, msg: &Message<'p>, now: Instant) -> Output<'p, 'o> {
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
        // Its permissions name relay addresses only; whatever peers.allow
        // says of other ports there, the relay range alone.
        if a.check && !self.policy.in_relay_range(peer.port()) {
            self.stats.peer_refusals += 1;
            return Output::None;
        }
        if !a.has_permission(peer.ip(), now) {
            self.stats.dropped_no_permission += 1;
            return Output::None;
        }
        let Some(relay) = a.relay_for(&peer) else { return Output::None };
        a.health.from_client(data, now);
        if !within_budget(Direction::ToPeer, a, &mut self.total_to_peer, &self.cfg, &mut self.stats, &mut self.events, wire_cost(data.len(), &peer), now) {
            return Output::None;
        }
        a.bytes_to_peer += data.len() as u64;
        a.packets_to_peer += 1;
        let f = &mut self.stats.to_peer[tuple.transport as usize];
        f.packets += 1;
        f.bytes += data.len() as u64;
        Output::Relay { relay: relay.id, peer: self.bound_address(peer), data, dont_fragment }
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
        let from = self.advertised_address(from);
        let Some(a) = self.allocs.get_gen_mut(relay.slot(), relay.generation()) else {
            self.stats.dropped_no_allocation += 1;
            return None;
        };
        if !a.has_permission(from.ip(), now) {
            self.stats.dropped_no_permission += 1;
            return None;
        }
        a.health.from_peer(data, now);
        if !within_budget(Direction::FromPeer, a, &mut self.total_from_peer, &self.cfg, &mut self.stats, &mut self.events, wire_cost(data.len(), &from), now) {
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
    pub(super) fn bound_address(&self, peer: SocketAddr) -> SocketAddr {
        let r = if peer.is_ipv4() { self.cfg.relay_v4 } else { self.cfg.relay_v6 };
        match r {
            Some(r) if r.local != r.external && peer.ip() == r.external => SocketAddr::new(r.local, peer.port()),
            _ => peer,
        }
    }

    /// The local relay address a datagram came from -> the external one
    /// clients know (hairpin from another allocation behind 1:1 NAT).
    #[inline]
    pub(super) fn advertised_address(&self, from: SocketAddr) -> SocketAddr {
        let r = if from.is_ipv4() { self.cfg.relay_v4 } else { self.cfg.relay_v6 };
        match r {
            Some(r) if r.local != r.external && from.ip() == r.local => SocketAddr::new(r.external, from.port()),
            _ => from,
        }
    }
}
