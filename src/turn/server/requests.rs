//! Requests: authentication, then Allocate, Refresh, CreatePermission and
//! ChannelBind (RFC 8656 7-12), each deciding an answer or an ErrorCode.

use super::*;

/// Requested address family attribute value -> family, or the error code.
/// One authenticated request: who sent it, what it says, whose key signed
/// it, when, and how its answer is to be signed and framed.
pub(super) struct Request<'r, 'm> {
    tuple: FiveTuple,
    msg: &'r Message<'m>,
    auth: Authenticated<'r>,
    now: Now,
    reply: Reply,
}

pub(super) fn family_of(v: &[u8]) -> Result<Family, ErrorCode> {
    if v.len() != 4 {
        return Err(ErrorCode::BadRequest);
    }
    match v[0] {
        attr::FAMILY_IPV4 => Ok(Family::V4),
        attr::FAMILY_IPV6 => Ok(Family::V6),
        _ => Err(ErrorCode::AddressFamilyNotSupported),
    }
}

impl Server {
    pub(super) fn request(&mut self, tuple: FiveTuple, msg: &Message, now: Now, out: &mut [u8], relays: &mut dyn RelayPorts) -> Handled {
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
                let req = Request { tuple, msg, reply: self.reply_for(msg, Some(auth.key)), auth, now };
                match msg.method() {
                    method::ALLOCATE => self.allocate(&req, out, relays),
                    method::REFRESH => self.refresh(&req, out, relays),
                    method::CREATE_PERMISSION => self.create_permission(&req, out),
                    _ => self.channel_bind(&req, out),
                }
            }
            _ => self.reply_for(msg, None).err(out, ErrorCode::BadRequest),
        }
    }

    pub(super) fn auth_failure(&mut self, tuple: FiveTuple, msg: &Message, f: AuthFailure, now: Now, out: &mut [u8]) -> Handled {
        self.stats.auth_failures[f as usize] += 1;
        let code = f.code();
        let reply = self.reply_for(msg, None);
        if code == ErrorCode::BadRequest {
            return reply.err(out, code);
        }
        // Echo a still-valid nonce: a client that sees the same nonce twice
        // knows its credentials are wrong and stops instead of retrying.
        let ip = tuple.client.ip();
        let nonce = match msg.get(attr::NONCE) {
            Some(n) if code == ErrorCode::Unauthorized && self.auth.nonce_valid(n, ip, now.unix) => n.try_into().unwrap_or_else(|_| self.auth.nonce(ip, now.unix)),
            _ => self.auth.nonce(ip, now.unix),
        };
        let realm = self.auth.realm().to_owned();
        reply.write(out, Class::Error, code.code(), |w| {
            w.error_code(code.code(), code.reason()).attr(attr::REALM, realm.as_bytes()).attr(attr::NONCE, &nonce);
        })
    }

    /// The allocation on this 5-tuple, checked against the request's user.
    pub(super) fn own_allocation(&self, tuple: &FiveTuple, auth: &Authenticated) -> Result<u32, ErrorCode> {
        let &slot = self.by_tuple.get(tuple).ok_or(ErrorCode::AllocationMismatch)?;
        let a = self.allocs.get(slot).ok_or(ErrorCode::AllocationMismatch)?;
        if &*a.username != auth.username {
            return Err(ErrorCode::WrongCredentials);
        }
        Ok(slot)
    }

    pub(super) fn allocate(&mut self, req: &Request, out: &mut [u8], relays: &mut dyn RelayPorts) -> Handled {
        let Request { tuple, msg, ref auth, now, ref reply } = *req;
        if let Some(&slot) = self.by_tuple.get(&tuple) {
            let a = self.allocs.get(slot)?;
            if a.allocate_tid == *msg.transaction_id() && &*a.username == auth.username {
                // A retransmission of the request that created it (RFC 8656 7.2).
                let remaining = a.expires.saturating_duration_since(now.mono).as_secs() as u32;
                return Self::allocate_success(reply, a, tuple, remaining, None, None, out);
            }
            return reply.err(out, ErrorCode::AllocationMismatch);
        }
        if !self.accepting {
            // Check credentials are this relay's own: no sibling takes them.
            if let Some(to) = self.alternate_for(&tuple).filter(|_| !auth.check) {
                self.stats.redirected += 1;
                return self.try_alternate(tuple, reply, to, now, out);
            }
            self.stats.capacity_refusals += 1;
            return reply.err(out, ErrorCode::InsufficientCapacity);
        }
        match msg.get(attr::REQUESTED_TRANSPORT) {
            None => return reply.err(out, ErrorCode::BadRequest),
            Some(v) if v.len() != 4 => return reply.err(out, ErrorCode::BadRequest),
            Some(v) if v[0] != 17 => return reply.err(out, ErrorCode::UnsupportedTransportProtocol),
            Some(_) => {}
        }
        let even = msg.get(attr::EVEN_PORT);
        let token = msg.get(attr::RESERVATION_TOKEN);
        let raf = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        let aaf = msg.get(attr::ADDITIONAL_ADDRESS_FAMILY);
        if (even.is_some() && token.is_some()) || (raf.is_some() && (token.is_some() || aaf.is_some())) {
            return reply.err(out, ErrorCode::BadRequest);
        }
        // A reservation is only taken out of the table once every check below
        // has passed: a request refused on the way (quota, family, LIFETIME)
        // must not swallow the reserved port (it would never be released).
        let mut claim: Option<[u8; 8]> = None;
        let placement = match (even, token) {
            (Some(v), _) if v.len() != 1 => return reply.err(out, ErrorCode::BadRequest),
            (Some(v), _) if v[0] & 0x80 != 0 => {
                if self.ledger.reservations() >= MAX_RESERVATIONS {
                    self.stats.capacity_refusals += 1;
                    return reply.err(out, ErrorCode::InsufficientCapacity);
                }
                Placement::EvenReserveNext
            }
            (Some(_), _) => Placement::Even,
            (None, Some(t)) => {
                let Ok(t) = <[u8; 8]>::try_from(t) else { return reply.err(out, ErrorCode::BadRequest) };
                match self.ledger.reservation(&t) {
                    Some(r) if r.expires > now.mono => {
                        claim = Some(t);
                        Placement::Reserved(r.port)
                    }
                    Some(_) => {
                        if let Some(r) = self.ledger.unreserve(&t) {
                            relays.release(Family::V4, r.port);
                        }
                        self.stats.capacity_refusals += 1;
                        return reply.err(out, ErrorCode::InsufficientCapacity);
                    }
                    None => {
                        self.stats.capacity_refusals += 1;
                        return reply.err(out, ErrorCode::InsufficientCapacity);
                    }
                }
            }
            (None, None) => Placement::Any,
        };
        let (primary, dual) = match (raf, aaf) {
            (Some(v), None) => match family_of(v) {
                // Reservations are kept for IPv4 relays only.
                Ok(Family::V6) if placement == Placement::EvenReserveNext => return reply.err(out, ErrorCode::InsufficientCapacity),
                Ok(f) => (f, false),
                Err(code) => return reply.err(out, code),
            },
            (None, Some(v)) => match family_of(v) {
                Ok(Family::V6) => (Family::V4, true),
                _ => return reply.err(out, ErrorCode::BadRequest),
            },
            _ => (Family::V4, false),
        };
        let (default, max) = self.lifetimes(auth.check);
        let lifetime = match msg.get(attr::LIFETIME).map(attr::decode_u32) {
            Some(Some(l)) => l.clamp(default, max),
            Some(None) => return reply.err(out, ErrorCode::BadRequest),
            None => default,
        };
        // Checked and counted at once (other cores may be counting too);
        // given back below if the relay socket cannot be opened. Check
        // credentials count per client address, not per user.
        let check_user;
        let (qkey, user_quota) = if auth.check {
            check_user = crate::turn::allocation::check_quota_user(tuple.client.ip());
            (check_user.as_str(), CHECK_ALLOCATIONS_PER_ADDRESS)
        } else {
            (quota_key(auth.username), self.cfg.user_quota)
        };
        match self.ledger.take(qkey, user_quota, self.cfg.total_quota) {
            Ok(()) => {}
            Err(QuotaRefusal::User) => {
                self.stats.quota_refusals += 1;
                return reply.err(out, ErrorCode::AllocationQuotaReached);
            }
            Err(QuotaRefusal::Total) => {
                self.stats.capacity_refusals += 1;
                return reply.err(out, ErrorCode::InsufficientCapacity);
            }
        }
        if let Some(t) = claim
            && self.ledger.unreserve(&t).is_none() {
                // Claimed meanwhile by the same token on another core.
                self.ledger.give_back(qkey);
                self.stats.capacity_refusals += 1;
                return reply.err(out, ErrorCode::InsufficientCapacity);
            }
        let (slot, generation) = self.allocs.vacant();
        // RFC 8656 7.2, 14: DONT-FRAGMENT asks for the DF bit on everything
        // the relay sends for this allocation; the socket sets it.
        let dont_fragment = msg.get(attr::DONT_FRAGMENT).is_some();
        let first = match self.open_relay(relays, slot, generation, primary, placement, dont_fragment) {
            Ok(r) => r,
            Err(code) => {
                self.ledger.give_back(qkey);
                if let Placement::Reserved(port) = placement {
                    relays.release(Family::V4, port);
                }
                self.stats.capacity_refusals += (code == ErrorCode::InsufficientCapacity) as u64;
                if code == ErrorCode::UnknownAttribute {
                    // The DF bit cannot be set: DONT-FRAGMENT is then an
                    // unknown comprehension-required attribute (RFC 8656 7.2).
                    return reply.unknown_attributes(out, &attr::DONT_FRAGMENT.to_be_bytes());
                }
                return reply.err(out, code);
            }
        };
        let token = (placement == Placement::EvenReserveNext).then(|| {
            let t = self.auth.token(slot, generation, now.unix);
            let port = first.local_port + 1;
            let expires = now.mono + RESERVATION_LIFETIME;
            self.ledger.reserve(t, Reservation { port, expires });
            self.file_timer(expires, RESERVATIONS);
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
            timer: None,
            check: auth.check,
            health: Box::default(),
        };
        let n = Self::allocate_success(reply, &a, tuple, lifetime, address_error, token, out);
        let relayed = [a.v4, a.v6].iter().flatten().map(|r| r.advertised).collect();
        let inserted = self.allocs.insert(a);
        debug_assert_eq!(inserted, slot);
        self.by_tuple.insert(tuple, slot);
        self.stats.allocations_created += 1;
        self.stats.check_allocations_created += auth.check as u64;
        self.schedule(slot);
        self.event(Event::AllocationCreated { tuple, username: auth.username.to_owned(), relayed, lifetime });
        n
    }

    /// The sibling a client at `tuple` is sent to while this relay drains:
    /// an entry of the client's address family (RFC 8489 10), and for a TLS
    /// client one that takes TLS clients, picked by the client's address so
    /// that its attempts land together and the clients spread over the
    /// siblings.
    fn alternate_for(&self, tuple: &FiveTuple) -> Option<(SocketAddr, Option<Arc<str>>)> {
        let ip = tuple.client.ip().to_canonical();
        let tls = tuple.transport == Transport::Tls;
        let fits = |a: &&Alternate| a.ip.is_ipv4() == ip.is_ipv4() && (a.tls || !tls);
        let n = self.cfg.alternates.iter().filter(fits).count();
        if n == 0 {
            return None;
        }
        // FNV-1a over the address: stable across restarts and relays.
        let octets = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let h = octets.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3));
        let a = self.cfg.alternates.iter().filter(fits).nth((h % n as u64) as usize)?;
        Some((SocketAddr::new(a.ip, a.port.unwrap_or(tuple.server.port())), a.domain.clone()))
    }

    /// 300 Try Alternate to an authenticated Allocate: signed like any
    /// answer to it, with ALTERNATE-SERVER, ALTERNATE-DOMAIN for a TLS
    /// client when the sibling's name is known, and REALM and a NONCE the
    /// sibling accepts (one made with the shared secret's fleet key), which
    /// browsers carry over to the sibling.
    fn try_alternate(&self, tuple: FiveTuple, reply: &Reply, (to, domain): (SocketAddr, Option<Arc<str>>), now: Now, out: &mut [u8]) -> Handled {
        let e = ErrorCode::TryAlternate;
        let nonce = self.auth.fleet_nonce(tuple.client.ip(), now.unix);
        let realm = self.auth.realm();
        reply.write(out, Class::Error, e.code(), |w| {
            w.error_code(e.code(), e.reason()).address(attr::ALTERNATE_SERVER, to);
            if let Some(d) = domain.filter(|_| tuple.transport == Transport::Tls) {
                w.attr(attr::ALTERNATE_DOMAIN, d.as_bytes());
            }
            w.attr(attr::REALM, realm.as_bytes());
            if let Some(n) = &nonce {
                w.attr(attr::NONCE, n);
            }
        })
    }

    /// (default, max) lifetime for an allocation of these credentials.
    fn lifetimes(&self, check: bool) -> (u32, u32) {
        let max = if check { self.cfg.max_lifetime.min(CHECK_MAX_LIFETIME) } else { self.cfg.max_lifetime };
        (self.cfg.default_lifetime.min(max), max)
    }


    pub(super) fn open_relay(
        &self,
        relays: &mut dyn RelayPorts,
        slot: u32,
        generation: u32,
        family: Family,
        placement: Placement,
        dont_fragment: bool,
    ) -> Result<Relay, ErrorCode> {
        let cfg = match family {
            Family::V4 => self.cfg.relay_v4,
            Family::V6 => self.cfg.relay_v6,
        };
        let Some(cfg) = cfg else { return Err(ErrorCode::AddressFamilyNotSupported) };
        let id = RelayId::new(slot, generation, family);
        match relays.open(id, family, placement, dont_fragment) {
            Ok(local) => Ok(Relay { id, advertised: SocketAddr::new(cfg.external, local.port()), local_port: local.port() }),
            Err(OpenError::FamilyUnsupported) => Err(ErrorCode::AddressFamilyNotSupported),
            Err(OpenError::Exhausted) => Err(ErrorCode::InsufficientCapacity),
            Err(OpenError::DontFragmentUnsupported) => Err(ErrorCode::UnknownAttribute),
        }
    }

    pub(super) fn allocate_success(
        reply: &Reply,
        a: &Allocation,
        tuple: FiveTuple,
        lifetime: u32,
        address_error: Option<ErrorCode>,
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
            if let Some(e) = address_error {
                let (code, r) = (e.code(), e.reason().as_bytes());
                let mut v = [0u8; 64];
                v[..4].copy_from_slice(&[attr::FAMILY_IPV6, 0, (code / 100) as u8, (code % 100) as u8]);
                v[4..4 + r.len()].copy_from_slice(r);
                w.attr(attr::ADDRESS_ERROR_CODE, &v[..4 + r.len()]);
            }
        })
    }

    pub(super) fn refresh(&mut self, req: &Request, out: &mut [u8], relays: &mut dyn RelayPorts) -> Handled {
        let Request { tuple, msg, ref auth, now, ref reply } = *req;
        let slot = match self.own_allocation(&tuple, auth) {
            Ok(s) => s,
            Err(code) => return reply.err(out, code),
        };
        if let Some(v) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let a = self.allocs.get(slot)?;
            match family_of(v) {
                Ok(Family::V4) if a.v4.is_some() => {}
                Ok(Family::V6) if a.v6.is_some() => {}
                Ok(_) => return reply.err(out, ErrorCode::PeerAddressFamilyMismatch),
                Err(code) => return reply.err(out, code),
            }
        }
        let requested = match msg.get(attr::LIFETIME) {
            Some(v) => match attr::decode_u32(v) {
                Some(l) => l,
                None => return reply.err(out, ErrorCode::BadRequest),
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
        let (default, max) = self.lifetimes(auth.check);
        let lifetime = requested.min(max).max(default);
        let a = self.allocs.get_mut(slot)?;
        a.expires = now.mono + Duration::from_secs(lifetime as u64);
        a.lifetime = lifetime;
        channels_refreshed(&mut self.events, &self.cfg, a, None);
        self.schedule(slot);
        reply.ok(out, |w| {
            w.u32(attr::LIFETIME, lifetime);
        })
    }

    pub(super) fn create_permission(&mut self, req: &Request, out: &mut [u8]) -> Handled {
        let (tuple, reply) = (req.tuple, &req.reply);
        let slot = match self.own_allocation(&tuple, &req.auth) {
            Ok(s) => s,
            Err(code) => return reply.err(out, code),
        };
        let mut ips = std::mem::take(&mut self.peer_scratch);
        ips.clear();
        let r = self.permit_peers(req, slot, out, &mut ips);
        self.peer_scratch = ips;
        r
    }

    /// CreatePermission for the peers in `msg` (collected into `ips`).
    pub(super) fn permit_peers(&mut self, req: &Request, slot: u32, out: &mut [u8], ips: &mut Vec<IpAddr>) -> Handled {
        let (tuple, msg, now, reply) = (req.tuple, req.msg, req.now.mono, &req.reply);
        // As many XOR-PEER-ADDRESS as the message holds; more than the cap
        // could ever grant is refused below without keeping them all.
        let cap = self.cfg.max_permissions;
        let mut n = 0usize;
        for v in msg.get_all(attr::XOR_PEER_ADDRESS) {
            let Some(p) = attr::decode_xor_address(v, msg.transaction_id()) else { return reply.err(out, ErrorCode::BadRequest) };
            n += 1;
            if ips.len() <= cap {
                ips.push(p.ip());
            }
        }
        if n == 0 {
            return reply.err(out, ErrorCode::BadRequest);
        }
        let ips = &ips[..];
        let a = self.allocs.get(slot)?;
        // All or nothing: one refused peer fails the whole request.
        for ip in ips {
            if a.relay_for(&SocketAddr::new(*ip, 0)).is_none() {
                return reply.err(out, ErrorCode::PeerAddressFamilyMismatch);
            }
        }
        for ip in ips {
            if !may_permit(&self.policy, &self.cfg, a.check, *ip) {
                self.stats.peer_refusals += 1;
                self.event(Event::PeerRefused { tuple, peer: *ip });
                return reply.err(out, ErrorCode::Forbidden);
            }
        }
        let a = self.allocs.get_mut(slot)?;
        prune(&mut self.events, a, now);
        if n > cap || a.permissions.len() + a.new_permissions(ips) > cap {
            self.stats.quota_refusals += 1;
            return reply.err(out, ErrorCode::InsufficientCapacity);
        }
        let expires = now + Duration::from_secs(self.cfg.permission_lifetime as u64);
        for ip in ips.iter() {
            a.permit(*ip, expires);
        }
        channels_refreshed(&mut self.events, &self.cfg, a, Some(ips));
        self.schedule(slot);
        reply.ok(out, |_| {})
    }

    pub(super) fn channel_bind(&mut self, req: &Request, out: &mut [u8]) -> Handled {
        let Request { tuple, msg, ref auth, ref reply, .. } = *req;
        let now = req.now.mono;
        let slot = match self.own_allocation(&tuple, auth) {
            Ok(s) => s,
            Err(code) => return reply.err(out, code),
        };
        let number = match msg.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return reply.err(out, ErrorCode::BadRequest),
        };
        if !(CHANNEL_MIN..=self.cfg.channel_max).contains(&number) {
            return reply.err(out, ErrorCode::BadRequest);
        }
        let Some(peer) = msg.get(attr::XOR_PEER_ADDRESS).and_then(|v| attr::decode_xor_address(v, msg.transaction_id()))
        else {
            return reply.err(out, ErrorCode::BadRequest);
        };
        if self.allocs.get(slot)?.relay_for(&peer).is_none() {
            return reply.err(out, ErrorCode::PeerAddressFamilyMismatch);
        }
        let check = self.allocs.get(slot)?.check;
        if !may_bind(&self.policy, &self.cfg, check, peer) {
            self.stats.peer_refusals += 1;
            self.event(Event::PeerRefused { tuple, peer: peer.ip() });
            return reply.err(out, ErrorCode::Forbidden);
        }
        let cap = self.cfg.max_permissions;
        let a = self.allocs.get_mut(slot)?;
        prune(&mut self.events, a, now);
        // A number stays tied to its peer (and the peer to its number) while
        // bound and for the cooldown after (RFC 8656 12).
        if a.channels.iter().any(|c| (c.number == number) != (c.peer == peer)) {
            return reply.err(out, ErrorCode::BadRequest);
        }
        let new_channel = !a.channels.iter().any(|c| c.number == number);
        if (new_channel && a.channels.len() >= cap) || a.permissions.len() + a.new_permissions(&[peer.ip()]) > cap {
            self.stats.quota_refusals += 1;
            return reply.err(out, ErrorCode::InsufficientCapacity);
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
        let until = a.channels.iter().find(|c| c.number == number).map_or(expires, |c| channel_until(a, c));
        let cap = allocation_cap(&self.cfg, a);
        self.schedule(slot);
        self.event(Event::ChannelBound { relay, tuple, channel: number, peer, until, cap });
        reply.ok(out, |_| {})
    }
}
