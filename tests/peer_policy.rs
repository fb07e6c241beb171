//! The default peer deny list, through the core: every refused range and
//! every IPv4-in-IPv6 form gets 403 on CreatePermission and ChannelBind, and a
//! Send indication to it goes nowhere. Public peers and our own relay ports pass.

#[path = "common/core.rs"]
mod harness;

use harness::*;
use turnd::stun::attr;
use turnd::stun::{method, Class};
use turnd::turn::{Cidr, PeerPolicy};

/// One address from every default-denied range, plus embedded forms.
const REFUSED: &[&str] = &[
    // IPv4
    "0.0.0.0", "0.1.2.3", "10.0.0.1", "10.255.255.255", "100.64.0.1", "100.100.100.200", "127.0.0.1",
    "127.255.255.254", "169.254.169.254", "169.254.0.1", "172.16.0.1", "172.31.255.1", "192.0.0.1",
    "192.0.2.1", "192.88.99.1", "192.168.1.1", "198.18.0.1", "198.19.255.1", "198.51.100.1", "203.0.113.1",
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    // IPv6
    "::", "::1", "fc00::1", "fd00:ec2::254", "fe80::1", "fec0::1", "ff02::1", "ff0e::1", "100::1",
    "2001:db8::1", "2001:2::1", "2001:10::1", "3fff::1", "64:ff9b:1::1", "5f00::1",
    // IPv4 embedded in IPv6
    "::ffff:127.0.0.1", "::ffff:0.0.0.0", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1",
    "::169.254.169.254", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1", "2002:7f00:1::1",
    "2002:a9fe:a9fe::1", "2002:c0a8:101::1",
    // Teredo: server 65.54.227.120 (public), client 127.0.0.1 (inverted: 80ff:fffe)
    "2001:0:4136:e378:8000:63bf:80ff:fffe",
    // Teredo with a private server address
    "2001:0:a00:1:8000:63bf:3fff:fdd2",
];

const ALLOWED: &[&str] = &["8.8.8.8", "1.1.1.1", "2606:4700::1111", "2a00:1450::1", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"];

fn peer_addr(ip: &str, port: u16) -> A {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    A::Addr(attr::XOR_PEER_ADDRESS, std::net::SocketAddr::new(ip, port))
}

#[test]
fn every_refused_range_gets_403() {
    let mut c = Core::new();
    let v4 = tuple(41000);
    let v6 = tuple(41001);
    let (c4, _) = c.allocate(v4, "u4");
    let c6 = c.rest_creds(v6, "u6", 3600, SECRET);
    let fam = A::Raw(attr::ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0]);
    assert_eq!(c.request(v6, method::ALLOCATE, &[transport_udp(), fam], Some(&c6)).class(), Class::Success);
    let mut ch = 0x4000u16;
    for ip in REFUSED {
        let addr: std::net::IpAddr = ip.parse().unwrap();
        let (t, cr) = if addr.is_ipv4() { (v4, &c4) } else { (v6, &c6) };
        let r = c.request(t, method::CREATE_PERMISSION, &[peer_addr(ip, 5000)], Some(cr));
        assert_eq!(r.code(), Some(403), "CreatePermission {ip}");
        let r = c.request(t, method::CHANNEL_BIND, &[channel(ch), peer_addr(ip, 5000)], Some(cr));
        assert_eq!(r.code(), Some(403), "ChannelBind {ip}");
        ch += 1;
        let tid = c.next_tid();
        let ind = c.build(method::SEND, Class::Indication, tid, &[peer_addr(ip, 5000), A::Raw(attr::DATA, vec![1])], None, false);
        assert!(c.feed_relay(t, &ind).is_none(), "Send {ip}");
    }
    assert!(c.server.stats.peer_refusals as usize >= 2 * REFUSED.len());
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
fn a_request_with_one_refused_peer_fails_whole() {
    let mut c = Core::new();
    let t = tuple(41003);
    let (cr, _) = c.allocate(t, "");
    let r = c.request(t, method::CREATE_PERMISSION, &[peer_addr("8.8.8.8", 1), peer_addr("1.1.1.1", 1), peer_addr("169.254.169.254", 1)], Some(&cr));
    assert_eq!(r.code(), Some(403));
    let tid = c.next_tid();
    let ind = c.build(method::SEND, Class::Indication, tid, &[peer_addr("8.8.8.8", 1), A::Raw(attr::DATA, vec![1])], None, false);
    assert!(c.feed_relay(t, &ind).is_none(), "the allowed peer was not installed either");
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
