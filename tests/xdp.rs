//! The XDP fast path (feature `xdp`) on real interfaces: two network
//! namespaces, a client's and a peer's, each joined to the host by a veth
//! pair (tests/common/netns.rs, 198.18.0.0/15); turnd on the host listens
//! on the client's host end and relays from the peer's, with the program
//! attached in native mode to both host ends. The far ends run a
//! pass-through XDP program (native XDP on veth delivers redirected frames
//! only to an end that has one) and send with checksum offload off (a veth
//! leaves UDP checksums partial, which a forwarded frame cannot carry).
//!
//! Proves: both directions are relayed by the program (the veths'
//! `xdp_redirect` counters move by one per packet) with the same bytes and
//! addresses the socket path sends; turnd counts them (metrics and
//! sessions); after a permission expires, after a disconnect, for a peer
//! whose ChannelBind was refused, and once a reload sets a bandwidth cap,
//! nothing is relayed by the program; IPv6 as IPv4;
//! and a datagram that would not fit the client's MTU with the ChannelData
//! header goes the socket path, whole.
//!
//! Compiled only with `--features xdp`. Needs root, `ip netns`, ethtool.
//! Fails, never skips.
#![cfg(feature = "xdp")]

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
mod common;
#[path = "common/netns.rs"]
mod netns;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Turnd;
use harness::A;
use netns::NetNs;
use turnd::stun::{attr, method, ChannelData, Class};
use wire::{peer_at, UdpClient};

const SECRET: &str = "xdp-secret";

/// The client's and the peer's namespaces, turnd between them.
struct Rig {
    // turnd goes first, then the namespaces (and with them the veths and
    // their XDP programs and sysctls).
    turnd: Turnd,
    client_ns: NetNs,
    peer_ns: NetNs,
    server: SocketAddr,
    /// The IPv6 listener, and the IPv6 ends of the veths: (client ns, peer ns).
    server6: SocketAddr,
    ns6: (std::net::Ipv6Addr, std::net::Ipv6Addr),
}

fn must(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Frames the program sent on with a redirect, as counted on `iface` (a host end).
fn redirects(iface: &str) -> u64 {
    must(Command::new("ethtool").args(["-S", iface]))
        .lines()
        .filter(|l| l.contains("xdp_redirect") && !l.contains("err"))
        .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
        .sum()
}

impl Rig {
    fn start(extra: &str) -> Rig {
        let (client_ns, peer_ns) = (NetNs::create_open(), NetNs::create_open());
        // IPv6 too, from 2001:2::/48 (RFC 5180), a /64 per veth named after
        // this process so parallel runs on the host do not clash.
        let p = std::process::id() & 0xffff;
        let v6 = |k: u32, host: u8| format!("2001:2:0:{:x}::{host}", (p << 1 | k) & 0xffff);
        for (k, ns) in [&client_ns, &peer_ns].into_iter().enumerate() {
            let (hif, nif) = (ns.host_if(), ns.ns_if());
            must(Command::new("ip").args(["addr", "add", &format!("{}/64", v6(k as u32, 1)), "dev", &hif, "nodad"]));
            must(ns.command("ip").args(["addr", "add", &format!("{}/64", v6(k as u32, 2)), "dev", &nif, "nodad"]));
            must(Command::new("sysctl").args(["-qw", &format!("net.ipv6.conf.{hif}.forwarding=1")]));
        }
        let ns6 = (v6(0, 2).parse().unwrap(), v6(1, 2).parse().unwrap());
        for ns in [&client_ns, &peer_ns] {
            let nif = ns.ns_if();
            must(ns.command("ip").args(["link", "set", "dev", &nif, "xdpdrv", "obj", env!("TURND_XDP_OBJECT"), "program", "xdp_pass"]));
            must(ns.command("ethtool").args(["-K", &nif, "tx", "off"]));
            // The program's route lookup answers only on a forwarding interface.
            must(Command::new("sysctl").args(["-qw", &format!("net.ipv4.conf.{}.forwarding=1", ns.host_if())]));
        }
        let port = common::free_port();
        let server: SocketAddr = format!("{}:{port}", client_ns.host_ip()).parse().unwrap();
        let server6: SocketAddr = format!("[{}]:{port}", v6(0, 1)).parse().unwrap();
        let cfg = format!(
            "realm = \"xdp.test\"\nthreads = 2\n[auth]\nsecrets = [\"{SECRET}\"]\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"{server}\"\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"{server6}\"\n\
             [relay]\nip = \"{}\"\nipv6 = \"{}\"\nports = \"41000-41999\"\n\
             [peers]\nallow = [\"{}/32\", \"{}/128\"]\n\
             [limits]\nallocation_bandwidth = 0\ntotal_bandwidth = 0\n{extra}\n\
             [xdp]\ninterfaces = [\"{}\", \"{}\"]\nmode = \"native\"\n",
            peer_ns.host_ip(),
            v6(1, 1),
            peer_ns.ns_ip(),
            ns6.1,
            client_ns.host_if(),
            peer_ns.host_if()
        );
        let turnd = Turnd::builder().config(server, move |_| cfg).start();
        turnd.wait_log("XDP fast path attached");
        Rig { turnd, client_ns, peer_ns, server, server6, ns6 }
    }

    fn client(&self) -> UdpClient {
        let mut c = UdpClient::new("127.0.0.1", self.server);
        c.sock = self.client_ns.udp_socket(SocketAddr::new(self.client_ns.ns_ip().into(), 0));
        c
    }

    /// A client over IPv6 with an IPv6 relayed address.
    fn client6(&self) -> (UdpClient, SocketAddr) {
        let mut c = UdpClient::new("127.0.0.1", self.server6);
        c.sock = self.client_ns.udp_socket(SocketAddr::new(self.ns6.0.into(), 0));
        let family = || A::Raw(attr::REQUESTED_ADDRESS_FAMILY, vec![0x02, 0, 0, 0]);
        let r = c.transact(method::ALLOCATE, &[harness::transport_udp(), family()]);
        c.creds = Some(wire::rest_creds(&r, "vic", SECRET));
        let r = c.transact(method::ALLOCATE, &[harness::transport_udp(), family()]);
        assert_eq!(r.class(), Class::Success, "allocate over IPv6: {:?}", r.code());
        (c, r.addr(attr::XOR_RELAYED_ADDRESS).unwrap())
    }

    fn peer6(&self) -> UdpSocket {
        self.peer_ns.udp_socket(SocketAddr::new(self.ns6.1.into(), 0))
    }

    fn peer(&self) -> UdpSocket {
        let s = self.peer_ns.udp_socket(SocketAddr::new(self.peer_ns.ns_ip().into(), 0));
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        s
    }

    /// (client side, peer side) redirect counts.
    fn redirects(&self) -> (u64, u64) {
        (redirects(&self.client_ns.host_if()), redirects(&self.peer_ns.host_if()))
    }

    fn admin_sessions(&self) -> serde_json::Value {
        let out = must(
            Command::new(env!("CARGO_BIN_EXE_turnctl"))
                .args(["sessions", "--json", "--admin", &format!("127.0.0.1:{}", self.turnd.metrics_port), "--token-file"])
                .arg(self.turnd.dir.join("admin-token")),
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("turnctl sessions: {e}: {out}"))
    }
}

fn bind(c: &mut UdpClient, number: u16, peer: SocketAddr) -> Class {
    let b = number.to_be_bytes();
    c.transact(method::CHANNEL_BIND, &[A::Raw(attr::CHANNEL_NUMBER, vec![b[0], b[1], 0, 0]), peer_at(peer)]).class()
}

/// The next datagram on `s` within 500 ms: bytes and source.
fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 70_000];
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    s.recv_from(&mut buf).ok().map(|(n, from)| (buf[..n].to_vec(), from))
}

/// A payload of `len` bytes, varied by `i`; some start like ChannelData or STUN.
fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i * 31 + k * 7) as u8 ^ if k == 0 { [0x40, 0x00, 0x7f, 0x01][i % 4] } else { 0 }).collect()
}

fn channel_data(number: u16, data: &[u8]) -> Vec<u8> {
    let mut v = ChannelData::header(number, data.len()).to_vec();
    v.extend_from_slice(data);
    v
}

/// One datagram each way through channel `number` (the first may take the
/// socket path while neighbours are resolved); returns what arrived.
fn warm(c: &UdpClient, peer: &UdpSocket, number: u16, relayed: SocketAddr) -> (Vec<u8>, Vec<u8>) {
    c.send_channel(number, b"warm-to-peer");
    let (to_peer, from) = recv(peer).expect("the peer gets the first datagram");
    assert_eq!(from, relayed);
    peer.send_to(b"warm-to-client", relayed).unwrap();
    let (to_client, _) = recv(&c.sock).expect("the client gets the first datagram");
    (to_peer, to_client)
}

#[test]
fn both_directions_are_relayed_in_the_kernel_with_the_socket_paths_bytes() {
    let rig = Rig::start("");
    let mut c = rig.client();
    let relayed = c.allocate("alice", SECRET);
    let peer = rig.peer();
    let peer_addr = peer.local_addr().unwrap();
    assert_eq!(bind(&mut c, 0x4000, peer_addr), Class::Success);
    // The first datagrams (the socket path, until neighbours are known) set
    // the reference: what turnd's sockets send.
    let (to_peer, to_client) = warm(&c, &peer, 0x4000, relayed);
    assert_eq!(to_peer, b"warm-to-peer");
    assert_eq!(to_client, channel_data(0x4000, b"warm-to-client"));
    std::thread::sleep(Duration::from_millis(200));

    let before = rig.redirects();
    let n = 200usize;
    let (mut bytes_to, mut bytes_from) = (0u64, 0u64);
    for i in 0..n {
        let d = payload(i, [0, 1, 3, 4, 100, 1000, 1400][i % 7]);
        c.send_channel(0x4000, &d);
        let (got, from) = recv(&peer).unwrap_or_else(|| panic!("datagram {i} to the peer lost"));
        assert_eq!((got.as_slice(), from), (d.as_slice(), relayed), "datagram {i} to the peer");
        bytes_to += d.len() as u64;
        // (Not empty: turnd's socket path drops an empty datagram from a peer, XDP or not.)
        let d = payload(i + 1000, [1, 2, 5, 64, 999, 1400][i % 6]);
        peer.send_to(&d, relayed).unwrap();
        let (got, from) = recv(&c.sock).unwrap_or_else(|| panic!("datagram {i} to the client lost"));
        assert_eq!(from, rig.server, "from the listener's address");
        assert_eq!(got, channel_data(0x4000, &d), "datagram {i} to the client: ChannelData, unpadded over UDP");
        bytes_from += d.len() as u64;
    }
    let after = rig.redirects();
    assert_eq!(after.0 - before.0, n as u64, "every ChannelData was redirected by the program (client side)");
    assert_eq!(after.1 - before.1, n as u64, "every peer datagram was redirected by the program (peer side)");

    // turnd counts them: metrics and sessions (read back about once a second).
    std::thread::sleep(Duration::from_millis(1500));
    let warm_len = (b"warm-to-peer".len() as u64, b"warm-to-client".len() as u64);
    let m = |s: &str| rig.turnd.metric(s) as u64;
    assert_eq!(m("turnd_relayed_packets_total{direction=\"to_peer\",transport=\"udp\"}"), n as u64 + 1);
    assert_eq!(m("turnd_relayed_packets_total{direction=\"to_client\",transport=\"udp\"}"), n as u64 + 1);
    assert_eq!(m("turnd_relayed_bytes_total{direction=\"to_peer\",transport=\"udp\"}"), bytes_to + warm_len.0);
    assert_eq!(m("turnd_relayed_bytes_total{direction=\"to_client\",transport=\"udp\"}"), bytes_from + warm_len.1);
    let sessions = rig.admin_sessions();
    let s = sessions.as_array().and_then(|a| a.iter().find(|s| s["client"] == c.sock.local_addr().unwrap().to_string())).cloned();
    let s = s.unwrap_or_else(|| panic!("no session: {sessions:#}"));
    assert_eq!(s["packets_to_peer"], n as u64 + 1, "{s:#}");
    assert_eq!(s["packets_from_peer"], n as u64 + 1, "{s:#}");
    assert_eq!(s["bytes_to_peer"], bytes_to + warm_len.0, "{s:#}");
    assert_eq!(s["bytes_from_peer"], bytes_from + warm_len.1, "{s:#}");

    // A reload that sets a bandwidth cap hands the channel back to the
    // socket path, where the caps are kept.
    let cfg = std::fs::read_to_string(&rig.turnd.config).unwrap();
    std::fs::write(&rig.turnd.config, cfg.replace("allocation_bandwidth = 0", "allocation_bandwidth = \"50 Mbit/s\"")).unwrap();
    let (rc, out) = common::turnctl_reload(&rig.turnd);
    assert_eq!(rc, 0, "reload: {out}");
    let before = rig.redirects();
    c.send_channel(0x4000, b"capped");
    assert_eq!(recv(&peer).map(|r| r.0), Some(b"capped".to_vec()));
    peer.send_to(b"capped back", relayed).unwrap();
    assert_eq!(recv(&c.sock).map(|r| r.0), Some(channel_data(0x4000, b"capped back")));
    assert_eq!(rig.redirects(), before, "under a cap the program relays nothing");
}

#[test]
fn ipv6_both_directions_are_relayed_in_the_kernel() {
    let rig = Rig::start("");
    let (mut c, relayed) = rig.client6();
    assert!(relayed.is_ipv6(), "{relayed}");
    let peer = rig.peer6();
    assert_eq!(bind(&mut c, 0x4001, peer.local_addr().unwrap()), Class::Success);
    let (to_peer, to_client) = warm(&c, &peer, 0x4001, relayed);
    assert_eq!((to_peer.as_slice(), to_client), (&b"warm-to-peer"[..], channel_data(0x4001, b"warm-to-client")));
    std::thread::sleep(Duration::from_millis(200));
    let before = rig.redirects();
    let n = 100usize;
    for i in 0..n {
        let d = payload(i, [0, 1, 3, 4, 100, 1000, 1400][i % 7]);
        c.send_channel(0x4001, &d);
        assert_eq!(recv(&peer), Some((d, relayed)), "datagram {i} to the peer");
        let d = payload(i + 1000, [1, 2, 5, 64, 999, 1400][i % 6]);
        peer.send_to(&d, relayed).unwrap();
        assert_eq!(recv(&c.sock), Some((channel_data(0x4001, &d), rig.server6)), "datagram {i} to the client");
    }
    let after = rig.redirects();
    assert_eq!((after.0 - before.0, after.1 - before.1), (n as u64, n as u64), "every datagram was redirected by the program");
    std::thread::sleep(Duration::from_millis(1500));
    let m = |s: &str| rig.turnd.metric(s) as u64;
    assert_eq!(m("turnd_relayed_packets_total{direction=\"to_peer\",transport=\"udp\"}"), n as u64 + 1);
    assert_eq!(m("turnd_relayed_packets_total{direction=\"to_client\",transport=\"udp\"}"), n as u64 + 1);
}

#[test]
fn nothing_is_relayed_in_the_kernel_after_expiry_disconnect_or_for_another_peer() {
    let rig = Rig::start("permission_lifetime = 30\n");
    let peer = rig.peer();
    let peer_addr = peer.local_addr().unwrap();

    // A disconnect removes the allocation's channels at once.
    let mut d = rig.client();
    let relayed_d = d.allocate("dora", SECRET);
    assert_eq!(bind(&mut d, 0x4000, peer_addr), Class::Success);
    warm(&d, &peer, 0x4000, relayed_d);
    let before = rig.redirects();
    d.send_channel(0x4000, b"fast");
    assert_eq!(recv(&peer).map(|r| r.0), Some(b"fast".to_vec()));
    assert_eq!(rig.redirects().0, before.0 + 1, "relayed by the program before the disconnect");
    must(
        Command::new(env!("CARGO_BIN_EXE_turnctl"))
            .args(["disconnect", "--user", "dora", "--admin", &format!("127.0.0.1:{}", rig.turnd.metrics_port), "--token-file"])
            .arg(rig.turnd.dir.join("admin-token")),
    );
    let before = rig.redirects();
    d.send_channel(0x4000, b"after disconnect");
    peer.send_to(b"after disconnect", relayed_d).unwrap();
    assert_eq!(recv(&peer), None, "nothing reaches the peer after a disconnect");
    assert_eq!(recv(&d.sock), None, "nothing reaches the client after a disconnect");
    assert_eq!(rig.redirects(), before, "the program relays nothing after a disconnect");
    // The ended allocation's log line counts what the program relayed in
    // its last second too ("warm-to-peer" and "fast"; "warm-to-client").
    let ended = |log: String| log.lines().find(|l| l.contains("allocation ended") && l.contains("dora")).map(str::to_owned);
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        match ended(rig.turnd.log()) {
            Some(l) => break l,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!("no allocation ended line for dora:\n{}", rig.turnd.log()),
        }
    };
    assert!(line.contains("bytes_to_peer=16") && line.contains("bytes_from_peer=14"), "{line}");

    // A peer the client has no channel to: its datagrams stay Data
    // indications (the socket path), and a ChannelBind of the bound number
    // to it is refused, so the channel keeps its peer.
    let mut c = rig.client();
    let relayed = c.allocate("carl", SECRET);
    assert_eq!(bind(&mut c, 0x4000, peer_addr), Class::Success);
    let bound_at = Instant::now();
    warm(&c, &peer, 0x4000, relayed);
    let other = rig.peer();
    let other_addr = other.local_addr().unwrap();
    assert_eq!(bind(&mut c, 0x4000, other_addr), Class::Error, "a bound number keeps its peer");
    let before = rig.redirects();
    other.send_to(b"from another peer", relayed).unwrap();
    match c.recv(Duration::from_millis(500)) {
        Some(wire::Incoming::Data { peer, data }) => assert_eq!((peer, data.as_slice()), (other_addr, &b"from another peer"[..])),
        other => panic!("expected a Data indication, got {other:?}"),
    }
    c.send_channel(0x4000, b"to the bound peer");
    assert_eq!(recv(&peer).map(|r| r.0), Some(b"to the bound peer".to_vec()));
    assert_eq!(recv(&other), None);
    let after = rig.redirects();
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 0), "the program relays the bound channel only");

    // Once the permission (30 s) has expired, the program relays nothing,
    // though the binding (600 s) still stands: turnd drops both ways.
    let expired = bound_at + Duration::from_secs(31);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    let before = rig.redirects();
    c.send_channel(0x4000, b"after expiry");
    peer.send_to(b"after expiry", relayed).unwrap();
    assert_eq!(recv(&peer), None, "nothing reaches the peer after the permission expired");
    assert_eq!(recv(&c.sock), None, "nothing reaches the client after the permission expired");
    assert_eq!(rig.redirects(), before, "the program relays nothing once the permission expired");
}

#[test]
fn a_datagram_that_would_not_fit_the_clients_mtu_goes_the_socket_path() {
    let rig = Rig::start("");
    // The client's link carries 1400-byte packets; the peer's 1500.
    must(Command::new("ip").args(["link", "set", "dev", &rig.client_ns.host_if(), "mtu", "1400"]));
    must(rig.client_ns.command("ip").args(["link", "set", "dev", &rig.client_ns.ns_if(), "mtu", "1400"]));
    let mut c = rig.client();
    let relayed = c.allocate("mia", SECRET);
    let peer = rig.peer();
    assert_eq!(bind(&mut c, 0x4000, peer.local_addr().unwrap()), Class::Success);
    warm(&c, &peer, 0x4000, relayed);
    // 1368 + 4 + 28 = 1400: fits, relayed by the program.
    let before = rig.redirects();
    let fits = payload(1, 1368);
    peer.send_to(&fits, relayed).unwrap();
    assert_eq!(recv(&c.sock).map(|r| r.0), Some(channel_data(0x4000, &fits)));
    assert_eq!(rig.redirects().1, before.1 + 1, "a datagram that fits is relayed by the program");
    // One byte more would not fit: the socket path sends it (fragmented), whole.
    let big = payload(2, 1369);
    peer.send_to(&big, relayed).unwrap();
    assert_eq!(recv(&c.sock).map(|r| r.0), Some(channel_data(0x4000, &big)));
    assert_eq!(rig.redirects().1, before.1 + 1, "one that does not fit is left to the socket path");
}

/// Relays a datagram each way through a channel of a turnd on 127.0.0.1.
fn relays_on_loopback(t: &Turnd) {
    let mut c = UdpClient::new("127.0.0.1", t.addr);
    let relayed = c.allocate("lou", common::SECRET);
    let peer = UdpSocket::bind("127.0.0.2:0").unwrap();
    assert_eq!(bind(&mut c, 0x4000, peer.local_addr().unwrap()), Class::Success);
    c.send_channel(0x4000, b"over the sockets");
    assert_eq!(recv(&peer), Some((b"over the sockets".to_vec(), relayed)));
    peer.send_to(b"and back", relayed).unwrap();
    assert_eq!(recv(&c.sock).map(|r| r.0), Some(channel_data(0x4000, b"and back")));
}

#[test]
fn without_the_program_turnd_relays_on_the_socket_path_and_says_why() {
    // No such interface.
    let t = Turnd::start("[limits]\nallocation_bandwidth = 0\n[xdp]\ninterfaces = [\"turnd-nope0\"]\n");
    t.wait_log("XDP fast path off, relaying on the socket path");
    assert!(t.log().contains("turnd-nope0"), "{}", t.log());
    relays_on_loopback(&t);
    // No privileges: root without capabilities (an empty bounding set).
    let wrap = ["setpriv".to_string(), "--bounding-set=-all".to_string()];
    let t = Turnd::builder().extra("[limits]\nallocation_bandwidth = 0\n[xdp]\ninterfaces = [\"lo\"]\n").wrap(&wrap).start();
    t.wait_log("XDP fast path off, relaying on the socket path");
    assert!(t.log().contains("CAP_BPF"), "{}", t.log());
    relays_on_loopback(&t);
}
