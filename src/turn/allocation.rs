//! One allocation's state: relayed addresses, permissions and channels.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::bandwidth::Bucket;
use super::{FiveTuple, RelayId};

/// After a channel binding expires, its number and peer stay reserved this long (RFC 8656 12).
pub const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug)]
pub struct Permission {
    pub ip: IpAddr,
    pub expires: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct Channel {
    pub number: u16,
    pub peer: SocketAddr,
    pub expires: Instant,
    /// Its expiry has been reported (it stays for the cooldown).
    pub ended: bool,
}

/// A relayed transport address of an allocation.
#[derive(Clone, Copy, Debug)]
pub struct Relay {
    pub id: RelayId,
    /// What the client is told (the external address behind 1:1 NAT).
    pub advertised: SocketAddr,
    /// The port the socket is bound to (equal to the advertised one).
    pub local_port: u16,
}

#[derive(Debug)]
pub struct Allocation {
    pub tuple: FiveTuple,
    pub username: Box<str>,
    pub key: [u8; 16],
    pub v4: Option<Relay>,
    pub v6: Option<Relay>,
    pub created: Instant,
    pub expires: Instant,
    /// Transaction of the Allocate that created it, to answer retransmissions.
    pub allocate_tid: [u8; 12],
    pub lifetime: u32,
    pub permissions: Vec<Permission>,
    pub channels: Vec<Channel>,
    pub bytes_to_peer: u64,
    pub bytes_from_peer: u64,
    pub packets_to_peer: u64,
    pub packets_from_peer: u64,
    /// Bandwidth budgets, client to peer and peer to client.
    pub budget_to_peer: Bucket,
    pub budget_from_peer: Bucket,
    /// Going over the cap has been reported.
    pub over_bandwidth_reported: bool,
    /// The deadline this allocation is filed under in the server's timers.
    pub timer: Option<Instant>,
    /// Made with check credentials: peers only at the relay's own relayed
    /// addresses, a small bandwidth cap, a short lifetime, counted per
    /// client address.
    pub check: bool,
    /// Each leg's health, read from the relayed packets (allocated once, with the allocation).
    pub health: Box<super::health::Health>,
}

impl Allocation {
    /// What the ledger counts it under: the user of its credentials, or
    /// for a check allocation the client's address.
    pub fn quota_user(&self) -> std::borrow::Cow<'_, str> {
        if self.check {
            std::borrow::Cow::Owned(check_quota_user(self.tuple.client.ip()))
        } else {
            std::borrow::Cow::Borrowed(crate::auth::quota_key(&self.username))
        }
    }

    pub fn relay_for(&self, peer: &SocketAddr) -> Option<Relay> {
        if peer.is_ipv4() { self.v4 } else { self.v6 }
    }

    #[inline]
    pub fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.iter().any(|p| p.ip == ip && p.expires > now)
    }

    /// Installs or refreshes a permission. The caller has checked the cap.
    pub fn permit(&mut self, ip: IpAddr, expires: Instant) {
        match self.permissions.iter_mut().find(|p| p.ip == ip) {
            Some(p) => p.expires = expires,
            None => self.permissions.push(Permission { ip, expires }),
        }
    }

    /// How many of `ips` would be new permissions.
    pub fn new_permissions(&self, ips: &[IpAddr]) -> usize {
        ips.iter()
            .enumerate()
            .filter(|(i, ip)| !ips[..*i].contains(ip) && !self.permissions.iter().any(|p| p.ip == **ip))
            .count()
    }

    /// The live channel with this number.
    #[inline]
    pub fn channel(&self, number: u16, now: Instant) -> Option<&Channel> {
        self.channels.iter().find(|c| c.number == number && c.expires > now)
    }

    /// The live channel bound to this peer.
    #[inline]
    pub fn channel_for_peer(&self, peer: SocketAddr, now: Instant) -> Option<&Channel> {
        self.channels.iter().find(|c| c.peer == peer && c.expires > now)
    }

    /// Drops expired permissions and channels whose cooldown ended, and
    /// hands each binding that expired since the last call to `ended`.
    /// When something of this allocation next expires: itself, a
    /// permission, a channel binding, or a channel's cooldown.
    pub fn deadline(&self) -> Instant {
        let perms = self.permissions.iter().map(|p| p.expires);
        let chans = self.channels.iter().map(|c| if c.ended { c.expires + CHANNEL_COOLDOWN } else { c.expires });
        perms.chain(chans).fold(self.expires, Instant::min)
    }

    pub fn prune(&mut self, now: Instant, mut ended: impl FnMut(&Channel)) {
        self.permissions.retain(|p| p.expires > now);
        for c in self.channels.iter_mut().filter(|c| c.expires <= now && !c.ended) {
            c.ended = true;
            ended(c);
        }
        self.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
    }
}

/// The ledger's key for the check allocations of one client address.
pub fn check_quota_user(ip: std::net::IpAddr) -> String {
    format!("check {}", ip.to_canonical())
}
