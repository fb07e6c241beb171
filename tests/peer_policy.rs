//! The peer policy's configuration, through the core: public peers (plain
//! and in IPv4-in-IPv6 forms) pass, `peers.allow` overrides the deny list and
//! `peers.deny` adds to it. Every refused address form on every peer-carrying
//! path, our own ports, and requests naming several peers are in the abuse
//! suite (tests/abuse_core.rs, tests/abuse_wire.rs).

#[path = "common/core.rs"]
mod harness;

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
