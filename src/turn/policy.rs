//! Which peers a client may relay to.
//!
//! By default every address that is not globally reachable is refused:
//! loopback, unspecified, private, shared, link-local (cloud metadata),
//! multicast, broadcast, reserved and documentation ranges, for IPv4 and IPv6.
//! IPv4 embedded in IPv6 (mapped, compatible, NAT64, 6to4, Teredo) is
//! extracted and judged as IPv4, so `::ffff:127.0.0.1` is loopback.
//! The `allow` list overrides the deny list, except that the server's own
//! addresses are only reachable on relay ports (other allocations), never on
//! its listener, metrics or admin ports. The same port rule covers every
//! other address of the host ([`PeerPolicy::with_host_ips`]), so allowing a
//! private range that holds the host does not open its other services.
//! An exact `IP:PORT` in `allow` ([`PeerPolicy::with_allowed_addresses`])
//! opens that one address and port, even on this host (a videobridge next to
//! the relay): a permission for its IP may be installed, and data may go to
//! that port; the IP's other ports stay as the rest of the policy says.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(|| format!("`{s}` has a bad prefix length"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Ranges refused by default. Sources: IANA IPv4/IPv6 special-purpose registries.
pub const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",       // this network, unspecified
    "10.0.0.0/8",      // private
    "100.64.0.0/10",   // shared address space (CGNAT; also some cloud metadata)
    "127.0.0.0/8",     // loopback
    "169.254.0.0/16",  // link-local, cloud metadata 169.254.169.254
    "172.16.0.0/12",   // private
    "192.0.0.0/24",    // IETF protocol assignments
    "192.0.2.0/24",    // documentation
    "192.88.99.0/24",  // 6to4 relay anycast (deprecated)
    "192.168.0.0/16",  // private
    "198.18.0.0/15",   // benchmarking
    "198.51.100.0/24", // documentation
    "203.0.113.0/24",  // documentation
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved, and 255.255.255.255 broadcast
    "::/128",          // unspecified
    "::1/128",         // loopback
    "64:ff9b:1::/48",  // local-use NAT64
    "100::/64",        // discard-only
    "2001:2::/48",     // benchmarking
    "2001:10::/28",    // ORCHID
    "2001:20::/28",    // ORCHIDv2
    "2001:db8::/32",   // documentation
    "3fff::/20",       // documentation
    "5f00::/16",       // SRv6 SIDs
    "fc00::/7",        // unique local (incl. fd00:ec2::254 metadata)
    "fe80::/10",       // link-local
    "fec0::/10",       // site-local (deprecated)
    "ff00::/8",        // multicast
];

/// IPv4 addresses carried inside an IPv6 address, per the transition scheme it belongs to.
pub fn embedded_ipv4(ip: Ipv6Addr) -> [Option<Ipv4Addr>; 2] {
    let o = ip.octets();
    let seg = ip.segments();
    let last32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible, also :: and ::1 -> 0.0.0.x)
    if seg[..5] == [0; 5] && (seg[5] == 0xffff || seg[5] == 0) {
        return [Some(last32), None];
    }
    // 64:ff9b::/96 well-known NAT64 prefix
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return [Some(last32), None];
    }
    // 2002::/16 6to4: the IPv4 address in bits 16..48
    if seg[0] == 0x2002 {
        return [Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])), None];
    }
    // 2001:0::/32 Teredo: server in bits 32..64, client (inverted) in the last 32
    if seg[0] == 0x2001 && seg[1] == 0 {
        let server = Ipv4Addr::new(o[4], o[5], o[6], o[7]);
        let client = Ipv4Addr::from(!u32::from(last32));
        return [Some(server), Some(client)];
    }
    [None, None]
}

#[derive(Clone, Debug)]
pub struct PeerPolicy {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    own_ips: Vec<IpAddr>,
    /// Other addresses of the host: reachable on relay ports only, but not
    /// allowed by being the host's (unlike `own_ips`).
    host_ips: Vec<IpAddr>,
    /// Whether `allow` names loopback itself (tests and benchmarks): then
    /// loopback peers are judged like any allowed address; otherwise they
    /// count as this host's and reach only relay ports, even under a broad
    /// allow such as 0.0.0.0/0.
    loopback_allowed: bool,
    relay_ports: (u16, u16),
    /// Exact `IP:PORT` entries of `allow`, IPv4-mapped forms made IPv4.
    allow_addrs: Vec<SocketAddr>,
}

/// Whether `c` lies inside loopback (127.0.0.0/8 or ::1).
fn within_loopback(c: &Cidr) -> bool {
    match c.addr {
        IpAddr::V4(a) => c.prefix >= 8 && a.octets()[0] == 127,
        IpAddr::V6(a) => c.prefix == 128 && a.is_loopback(),
    }
}

/// Whether `c` names exactly one address.
fn single_address(c: &Cidr) -> Option<IpAddr> {
    let full = if c.addr.is_ipv4() { 32 } else { 128 };
    (c.prefix == full).then_some(c.addr)
}

impl PeerPolicy {
    /// `deny` is added to the defaults; `own_ips` are the server's relay,
    /// external and listener addresses; `relay_ports` is the relay port range.
    pub fn new(allow: Vec<Cidr>, deny: Vec<Cidr>, own_ips: Vec<IpAddr>, relay_ports: (u16, u16)) -> Self {
        let mut all: Vec<Cidr> = DEFAULT_DENY.iter().map(|s| s.parse().expect("default list parses")).collect();
        all.extend(deny);
        let loopback_allowed = allow.iter().any(within_loopback);
        PeerPolicy { allow, deny: all, own_ips, host_ips: Vec::new(), loopback_allowed, relay_ports, allow_addrs: Vec::new() }
    }

    /// Adds exact `IP:PORT` allow entries: that address and port may be
    /// reached even when it is this host's (a videobridge on the relay's
    /// own address), and a permission for that IP may be installed. Other
    /// ports of that IP are judged as before: on this host only relay ports;
    /// elsewhere, whatever the ranges say (an IP refused by the deny list is
    /// reachable on the named port alone).
    pub fn with_allowed_addresses(mut self, addrs: Vec<SocketAddr>) -> Self {
        let mut addrs: Vec<SocketAddr> = addrs.into_iter().map(|a| SocketAddr::new(a.ip().to_canonical(), a.port())).collect();
        addrs.sort();
        addrs.dedup();
        self.allow_addrs = addrs;
        self
    }

    /// Whether `addr` is one of the exact `IP:PORT` allow entries.
    #[inline]
    fn is_allowed_address(&self, addr: SocketAddr) -> bool {
        !self.allow_addrs.is_empty() && self.allow_addrs.contains(&SocketAddr::new(addr.ip().to_canonical(), addr.port()))
    }

    /// Whether `ip` is the IP of an exact `IP:PORT` allow entry.
    fn names_address_of(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow_addrs.iter().any(|a| a.ip() == ip)
    }

    /// Adds the host's interface addresses to the port rule: on them, only
    /// relay ports may be reached. They are still judged by the allow and
    /// deny lists (a private interface address stays refused by default).
    /// An address listed alone in `allow` (a /32 or /128: a videobridge on
    /// this same machine) is exempt: that entry is the operator's intent.
    pub fn with_host_ips(mut self, mut ips: Vec<IpAddr>) -> Self {
        let exempt: Vec<IpAddr> = self.allow.iter().filter_map(single_address).collect();
        ips.retain(|ip| !self.own_ips.contains(ip) && !exempt.contains(ip));
        ips.sort();
        ips.dedup();
        self.host_ips = ips;
        self
    }

    fn forms(ip: IpAddr) -> [Option<IpAddr>; 3] {
        match ip {
            IpAddr::V4(_) => [Some(ip), None, None],
            IpAddr::V6(v6) => {
                let [a, b] = embedded_ipv4(v6);
                [Some(ip), a.map(IpAddr::V4), b.map(IpAddr::V4)]
            }
        }
    }

    fn is_own(&self, ip: IpAddr) -> bool {
        Self::forms(ip).iter().flatten().any(|f| self.own_ips.contains(f))
    }

    /// May a permission be installed for `ip`? Yes also for the IP of an
    /// exact `IP:PORT` allow entry (data is then held to that port).
    pub fn permits_ip(&self, ip: IpAddr) -> bool {
        self.permits_ip_by_ranges(ip) || self.names_address_of(ip)
    }

    /// `permits_ip` by the CIDR lists and own addresses alone.
    fn permits_ip_by_ranges(&self, ip: IpAddr) -> bool {
        let forms = Self::forms(ip);
        if forms.iter().flatten().any(|f| self.allow.iter().any(|c| c.contains(*f))) {
            return true;
        }
        if self.is_own(ip) {
            // Another allocation on this server; ports are checked per address.
            return true;
        }
        !forms.iter().flatten().any(|f| self.deny.iter().any(|c| c.contains(*f)))
    }

    /// Whether `port` is in the relay port range.
    pub fn in_relay_range(&self, port: u16) -> bool {
        (self.relay_ports.0..=self.relay_ports.1).contains(&port)
    }

    /// For a peer whose IP already has a permission: false for the server's
    /// own address on a port outside the relay range (its listener, metrics
    /// or admin port) unless that exact address is allowed, and false for
    /// an IP permitted only through an exact `IP:PORT` entry on any other
    /// port. Cheap enough per packet (the entry list is usually empty).
    #[inline]
    pub fn permits_port(&self, addr: SocketAddr) -> bool {
        if self.is_allowed_address(addr) {
            return true;
        }
        if !self.allow_addrs.is_empty() && self.names_address_of(addr.ip()) && !self.permits_ip_by_ranges(addr.ip()) {
            return false;
        }
        (self.relay_ports.0..=self.relay_ports.1).contains(&addr.port())
            || !Self::forms(addr.ip()).iter().flatten().any(|f| self.is_this_host(*f))
    }

    /// Whether `ip` reaches this host: its own and interface addresses, the
    /// unspecified address (which Linux delivers locally), and loopback
    /// unless `allow` names loopback itself.
    #[inline]
    fn is_this_host(&self, ip: IpAddr) -> bool {
        self.own_ips.contains(&ip)
            || self.host_ips.contains(&ip)
            || ip.is_unspecified()
            || (ip.is_loopback() && !self.loopback_allowed)
    }

    /// May data be sent to `addr`? Adds the rule that the server's own
    /// addresses are reachable only on relay ports.
    pub fn permits(&self, addr: SocketAddr) -> bool {
        self.is_allowed_address(addr) || (self.permits_port(addr) && self.permits_ip_by_ranges(addr.ip()))
    }

    /// Whether `ip` is one of the server's own addresses.
    pub fn is_own_ip(&self, ip: IpAddr) -> bool {
        self.own_ips.contains(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PeerPolicy {
        PeerPolicy::new(vec![], vec![], vec!["203.0.113.9".parse().unwrap()], (49152, 65535))
    }

    #[test]
    fn cidr_parsing_and_matching() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.255.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::ffff:10.1.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
        let host: Cidr = "2001:db8::1".parse().unwrap();
        assert!(host.contains("2001:db8::1".parse().unwrap()));
        assert!(!host.contains("2001:db8::2".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn public_addresses_pass() {
        let p = policy();
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"] {
            assert!(p.permits_ip(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn loopback_and_unspecified_reach_only_relay_ports_under_a_broad_allow() {
        let p = PeerPolicy::new(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()], vec![], vec![], (49152, 65535));
        for a in ["127.0.0.2:22", "127.0.0.1:9641", "0.0.0.0:22", "[::1]:22", "[::]:22", "[::ffff:127.0.0.2]:22"] {
            assert!(!p.permits(a.parse().unwrap()), "{a}");
        }
        assert!(p.permits("127.0.0.2:50000".parse().unwrap()));
        assert!(p.permits("10.1.2.3:22".parse().unwrap()), "the broad allow still applies elsewhere");
        // Naming loopback itself (tests, benchmarks) allows it on any port.
        let t = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![], vec!["127.0.0.1".parse().unwrap()], (20000, 29999));
        assert!(t.permits("127.0.0.2:12345".parse().unwrap()));
        assert!(!t.permits("127.0.0.1:3478".parse().unwrap()), "but never turnd's own ports");
        assert!(!t.permits("0.0.0.0:12345".parse().unwrap()));
    }

    #[test]
    fn a_single_address_allow_entry_exempts_that_host_address() {
        let allow = vec!["10.0.0.0/8".parse().unwrap(), "10.0.0.7/32".parse().unwrap()];
        let p = PeerPolicy::new(allow, vec![], vec![], (49152, 65535))
            .with_host_ips(vec!["10.0.0.5".parse().unwrap(), "10.0.0.7".parse().unwrap()]);
        assert!(!p.permits("10.0.0.5:10000".parse().unwrap()), "host address inside a range: relay ports only");
        assert!(p.permits("10.0.0.7:10000".parse().unwrap()), "a videobridge on this host, named alone");
    }

    #[test]
    fn host_addresses_only_on_relay_ports_and_still_judged_by_the_lists() {
        let allow = vec!["10.0.0.0/8".parse().unwrap()];
        let p = PeerPolicy::new(allow, vec![], vec!["203.0.113.9".parse().unwrap()], (49152, 65535))
            .with_host_ips(vec!["10.0.0.5".parse().unwrap(), "192.168.1.2".parse().unwrap(), "203.0.113.9".parse().unwrap()]);
        // Allowed range, host address: relay ports only (not its metrics or ssh).
        assert!(p.permits("10.0.0.5:50000".parse().unwrap()));
        assert!(!p.permits("10.0.0.5:9090".parse().unwrap()));
        assert!(!p.permits("10.0.0.5:22".parse().unwrap()));
        assert!(!p.permits("[::ffff:10.0.0.5]:22".parse().unwrap()));
        // Another host in the allowed range: any port.
        assert!(p.permits("10.0.0.6:9090".parse().unwrap()));
        // A private host address outside the allow list stays refused, even on relay ports.
        assert!(!p.permits("192.168.1.2:50000".parse().unwrap()));
        assert!(p.permits("203.0.113.9:50000".parse().unwrap()));
        assert!(!p.permits("203.0.113.9:3478".parse().unwrap()));
    }

    #[test]
    fn own_address_only_on_relay_ports() {
        let p = policy();
        assert!(p.permits("203.0.113.9:50000".parse().unwrap()));
        assert!(!p.permits("203.0.113.9:3478".parse().unwrap()));
        assert!(!p.permits("[::ffff:203.0.113.9]:9641".parse().unwrap()));
        assert!(!p.permits("203.0.113.10:50000".parse().unwrap()));
    }

    #[test]
    fn an_exact_address_entry_opens_that_port_only() {
        let own: IpAddr = "203.0.113.10".parse().unwrap();
        let p = PeerPolicy::new(vec![], vec![], vec![own], (49152, 65535))
            .with_allowed_addresses(vec!["203.0.113.10:10000".parse().unwrap(), "[::ffff:192.0.2.7]:4000".parse().unwrap()]);
        assert!(p.permits_ip(own));
        assert!(p.permits("203.0.113.10:10000".parse().unwrap()), "the videobridge on the relay's address");
        assert!(p.permits("[::ffff:203.0.113.10]:10000".parse().unwrap()), "its IPv4-mapped form");
        assert!(p.permits_port("203.0.113.10:10000".parse().unwrap()));
        for a in ["203.0.113.10:10001", "203.0.113.10:3478", "203.0.113.10:9641", "203.0.113.10:22"] {
            assert!(!p.permits(a.parse().unwrap()), "{a}");
            assert!(!p.permits_port(a.parse().unwrap()), "{a}");
        }
        assert!(p.permits("203.0.113.10:50000".parse().unwrap()), "relay ports as before");
        // A documentation address (denied by default) named with a port: that port alone.
        assert!(p.permits_ip("192.0.2.7".parse().unwrap()));
        assert!(p.permits("192.0.2.7:4000".parse().unwrap()));
        assert!(!p.permits("192.0.2.7:4001".parse().unwrap()));
        assert!(!p.permits_port("192.0.2.7:50000".parse().unwrap()));
        assert!(!p.permits_ip("192.0.2.8".parse().unwrap()));
        // IPv6, written [IPv6]:PORT.
        let v6: IpAddr = "2001:db8:5::5".parse().unwrap();
        let p6 = PeerPolicy::new(vec![], vec![], vec![v6], (49152, 65535)).with_allowed_addresses(vec!["[2001:db8:5::5]:10000".parse().unwrap()]);
        assert!(p6.permits_ip(v6));
        assert!(p6.permits("[2001:db8:5::5]:10000".parse().unwrap()));
        assert!(!p6.permits("[2001:db8:5::5]:3478".parse().unwrap()));
        assert!(!p6.permits_port("[2001:db8:5::5]:9641".parse().unwrap()));
        // A public address keeps all its ports: an entry adds, never takes away.
        let q = PeerPolicy::new(vec![], vec![], vec![], (49152, 65535)).with_allowed_addresses(vec!["8.8.8.8:53".parse().unwrap()]);
        assert!(q.permits("8.8.8.8:443".parse().unwrap()));
    }

    #[test]
    fn allow_overrides_deny() {
        let p = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec!["8.8.8.0/24".parse().unwrap()], vec![], (1, 2));
        assert!(p.permits_ip("127.0.0.1".parse().unwrap()));
        assert!(!p.permits_ip("8.8.8.8".parse().unwrap()));
        assert!(!p.permits_ip("10.0.0.1".parse().unwrap()));
    }
}
