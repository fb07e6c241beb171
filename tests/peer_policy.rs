//! The peer policy's configuration, through the core: public peers (plain
//! and in IPv4-in-IPv6 forms) pass, `peers.allow` overrides the deny list and
//! `peers.deny` adds to it. Every refused address form on every peer-carrying
//! path, our own ports, and requests naming several peers are in the abuse
//! suite (tests/abuse_core.rs, tests/abuse_wire.rs). An exact `IP:PORT` allow
//! entry opens one port on the relay's own address (a videobridge on the same
//! VPS) and nothing else, in the core and on the wire.

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
mod common;

use harness::*;
use turnd::stun::attr;
use turnd::stun::{method, Class};
use turnd::turn::{Cidr, PeerPolicy};

const ALLOWED: &[&str] = &["8.8.8.8", "1.1.1.1", "2606:4700::1111", "2a00:1450::1", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"];

fn peer_addr(ip: &str, port: u16) -> A {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    A::Addr(attr::XOR_PEER_ADDRESS, std::net::SocketAddr::new(ip, port))
}

#[test]
fn public_peers_pass() {
    let mut c = Core::new();
    let t = tuple(41002);
    let cr = c.rest_creds(t, "", 3600, SECRET);
    let fam = A::Raw(attr::ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0]);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp(), fam], Some(&cr)).class(), Class::Success);
    for ip in ALLOWED {
        let r = c.request(t, method::CREATE_PERMISSION, &[peer_addr(ip, 1)], Some(&cr));
        assert_eq!(r.class(), Class::Success, "{ip}");
    }
}

#[test]
fn allow_list_overrides_and_deny_list_adds() {
    let allow: Vec<Cidr> = vec!["10.8.0.0/16".parse().unwrap()];
    let deny: Vec<Cidr> = vec!["8.8.4.0/24".parse().unwrap()];
    let own = vec!["10.0.0.5".parse().unwrap(), "192.0.2.5".parse().unwrap()];
    let mut c = Core::with(config(), PeerPolicy::new(allow, deny, own, (49152, 65535)), vec![SECRET.to_vec()]);
    let t = tuple(41004);
    let (cr, _) = c.allocate(t, "");
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer_addr("10.8.1.1", 1)], Some(&cr)).class(), Class::Success);
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer_addr("10.9.1.1", 1)], Some(&cr)).code(), Some(403));
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer_addr("8.8.4.4", 1)], Some(&cr)).code(), Some(403));
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer_addr("8.8.8.8", 1)], Some(&cr)).class(), Class::Success);
}

fn send_ind(c: &mut Core, to: std::net::SocketAddr, d: &[u8]) -> Vec<u8> {
    let tid = c.next_tid();
    c.build(method::SEND, Class::Indication, tid, &[wire::peer_at(to), wire::data(d)], None, false)
}

/// A videobridge on the relay's external address 192.0.2.5 at :10000, named
/// exactly: that port relays on every path; the address's other ports below
/// the relay range (listener, TLS, metrics, ssh) stay refused.
#[test]
fn an_exact_address_entry_opens_one_port_of_our_own_address() {
    let own = vec!["10.0.0.5".parse().unwrap(), "192.0.2.5".parse().unwrap()];
    let bridge: std::net::SocketAddr = "192.0.2.5:10000".parse().unwrap();
    let policy = PeerPolicy::new(vec![], vec![], own, (49152, 65535)).with_allowed_addresses(vec![bridge]);
    let mut c = Core::with(config(), policy, vec![SECRET.to_vec()]);
    let t = tuple(41006);
    let (cr, _) = c.allocate(t, "");
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[wire::peer_at(bridge)], Some(&cr)).class(), Class::Success);
    let ind = send_ind(&mut c, bridge, b"media");
    let (_, to, d) = c.feed_relay(t, &ind).expect("a Send indication to the videobridge relays");
    // Behind 1:1 NAT the relay sends to its own external address on the local one.
    let local_bridge: std::net::SocketAddr = "10.0.0.5:10000".parse().unwrap();
    assert_eq!((to, d.as_slice()), (local_bridge, &b"media"[..]));
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), wire::peer_at(bridge)], Some(&cr)).class(), Class::Success);
    let (_, to, _) = c.feed_relay(t, &[0x40, 0, 0, 4, 1, 2, 3, 4]).expect("ChannelData to the videobridge relays");
    assert_eq!(to, local_bridge);
    for (ch, p) in (0x4001u16..).zip(["192.0.2.5:3478", "192.0.2.5:443", "192.0.2.5:9641", "192.0.2.5:22", "192.0.2.5:10001", "10.0.0.5:10000"]) {
        let p: std::net::SocketAddr = p.parse().unwrap();
        assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(ch), wire::peer_at(p)], Some(&cr)).code(), Some(403), "ChannelBind {p}");
        let ind = send_ind(&mut c, p, b"GET / HTTP/1.0\r\n\r\n");
        assert!(c.feed_relay(t, &ind).is_none(), "Send indication to {p}");
    }
    let ind = send_ind(&mut c, "192.0.2.5:50001".parse().unwrap(), b"hi");
    assert!(c.feed_relay(t, &ind).is_some(), "relay ports of our own address as before");
}

/// On the wire: turnd relays from 127.0.0.1 with loopback not allowed as a
/// range, a UDP echo "videobridge" listens on 127.0.0.1:PORT and
/// `peers.allow` names exactly that address. Relaying there works both ways;
/// turnd's own listener, metrics and admin ports on the same address stay
/// refused (403 on ChannelBind, nothing sent by Send indication).
#[test]
fn wire_a_videobridge_on_the_relay_address_is_reachable_and_nothing_else() {
    use std::time::Duration;
    use wire::{Incoming, UdpClient};
    let bridge = common::EchoPeer::start_on("127.0.0.1");
    let server = common::Turnd::builder().extra(&format!("[peers]\nallow = [\"{}\"]\n", bridge.addr)).no_loopback_peers().start();
    let own = |port: u16| std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), port);
    let mut a = UdpClient::new("127.0.0.1", server.addr);
    let ra = a.allocate("alice", common::SECRET);
    assert_eq!(ra.ip(), bridge.addr.ip(), "the relay and the videobridge share the address");
    assert_eq!(a.transact(method::CREATE_PERMISSION, &[wire::peer_at(bridge.addr)]).class(), Class::Success);
    a.send_indication(bridge.addr, b"hello bridge");
    assert_eq!(a.recv(Duration::from_secs(2)), Some(Incoming::Data { peer: bridge.addr, data: b"hello bridge".to_vec() }));
    assert_eq!(a.transact(method::CHANNEL_BIND, &[channel(0x4000), wire::peer_at(bridge.addr)]).class(), Class::Success);
    a.send_channel(0x4000, b"over a channel");
    assert_eq!(a.recv(Duration::from_secs(2)), Some(Incoming::Channel { number: 0x4000, data: b"over a channel".to_vec() }));
    let refused = [(own(server.port), "own UDP listener"), (own(server.metrics_port), "own metrics and admin API (TCP)")];
    for (ch, (p, why)) in (0x4001u16..).zip(refused) {
        assert_eq!(a.transact(method::CHANNEL_BIND, &[channel(ch), wire::peer_at(p)]).code(), Some(403), "{why}");
        let mut probe = [0u8; 20];
        probe[1] = 1;
        probe[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
        a.send_indication(p, &probe);
    }
    assert_eq!(a.recv(Duration::from_millis(500)), None, "nothing came back from our own ports");
    assert!(server.metric("turnd_peer_refusals_total") >= 4.0, "two ChannelBinds and two Send indications refused");
    assert_eq!(bridge.finish(), 2, "the videobridge got exactly the two datagrams for it");
}
