//! Every method and error code of the sans-IO core, with a controlled clock.

#[path = "common/core.rs"]
mod harness;

use harness::*;
use turnd::stun::attr;
use turnd::stun::integrity::long_term_key;
use turnd::stun::{method, ChannelData, Class, Message};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use turnd::auth::{Authenticator, NonceKey};
use turnd::turn::{Alternate, Event, Family, FiveTuple, Output, PeerPolicy, RelayId, Server, ServerConfig, Transport};

#[test]
fn binding_returns_the_mapped_address_compactly() {
    let mut c = Core::new();
    let t = tuple(40000);
    let tid = c.next_tid();
    let req = c.build(method::BINDING, Class::Request, tid, &[], None, false);
    assert_eq!(req.len(), 20);
    let r = c.feed(t, &req).unwrap();
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.addr(attr::XOR_MAPPED_ADDRESS), Some(t.client));
    assert!(r.get(attr::SOFTWARE).is_none(), "no SOFTWARE by default");
    assert!(!r.msg().has_fingerprint(), "no FINGERPRINT unless the request had one");
    assert!(r.bytes.len() <= 2 * req.len(), "bare Binding answer is {} bytes", r.bytes.len());
    // With FINGERPRINT in the request, the response carries one.
    let req = c.build(method::BINDING, Class::Request, tid, &[], None, true);
    let r = c.feed(t, &req).unwrap();
    assert!(r.msg().has_fingerprint());
}

#[test]
fn unknown_comprehension_required_attribute_gets_420() {
    let mut c = Core::new();
    let t = tuple(40001);
    let r = c.request(t, method::BINDING, &[A::Raw(0x7777, vec![1, 2, 3, 4]), A::Raw(0x8777, vec![0; 4])], None);
    assert_eq!(r.code(), Some(420));
    assert_eq!(r.get(attr::UNKNOWN_ATTRIBUTES), Some(vec![0x77, 0x77]), "only the comprehension-required one is listed");
    // Comprehension-optional unknowns alone are ignored.
    let r = c.request(t, method::BINDING, &[A::Raw(0x8777, vec![0; 4])], None);
    assert_eq!(r.class(), Class::Success);
}

#[test]
fn attributes_after_message_integrity_are_ignored() {
    let mut c = Core::new();
    let t = tuple(40002);
    let (creds, _) = c.allocate(t, "alice");
    // A Refresh whose LIFETIME 0 sits after MESSAGE-INTEGRITY: ignored, so the
    // allocation is refreshed with the default rather than deleted.
    let tid = c.next_tid();
    let mut b = c.build(method::REFRESH, Class::Request, tid, &[], Some(&creds), false);
    b.extend_from_slice(&[0x00, 0x0D, 0x00, 0x04, 0, 0, 0, 0]);
    let len = (b.len() - 20) as u16;
    b[2..4].copy_from_slice(&len.to_be_bytes());
    let r = c.feed(t, &b).unwrap();
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.lifetime(), Some(600));
    assert_eq!(c.server.allocation_count(), 1);
}

#[test]
fn malformed_input_is_dropped_silently() {
    let mut c = Core::new();
    let t = tuple(40003);
    let tid = c.next_tid();
    let good = c.build(method::BINDING, Class::Request, tid, &[], None, true);
    let mut bad_fp = good.clone();
    bad_fp[10] ^= 0xFF;
    let mut bad_cookie = good.clone();
    bad_cookie[4] = 0;
    let mut bad_len = good.clone();
    bad_len[3] = 200;
    for pkt in [&[][..], &[0u8; 3][..], &good[..19], &bad_fp[..], &bad_cookie[..], &bad_len[..], &[0xFF; 64][..]] {
        assert!(c.feed(t, pkt).is_none());
    }
    // ChannelData with a length beyond the datagram, or without an allocation.
    assert!(c.feed_relay(t, &[0x40, 0x00, 0x00, 0x10, 1, 2]).is_none());
    assert!(c.feed_relay(t, &[0x40, 0x00, 0x00, 0x02, 1, 2]).is_none());
    assert!(c.server.stats.dropped_malformed >= 6);
}

#[test]
fn allocate_challenge_then_success() {
    let mut c = Core::new();
    let t = tuple(40004);
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], None);
    assert_eq!(r.code(), Some(401));
    assert_eq!(r.get(attr::REALM), Some(REALM.as_bytes().to_vec()));
    assert_eq!(r.get(attr::NONCE).map(|n| n.len()), Some(16));
    let (creds, relayed) = c.allocate(t, "alice");
    assert_eq!(relayed.ip().to_string(), "192.0.2.5", "advertises the external address");
    assert_eq!(creds.username.split(':').nth(1), Some("alice"));
    assert_eq!(c.server.allocation_count(), 1);
    assert_eq!(c.relays.open.len(), 1);
}

#[test]
fn allocate_lifetime_is_clamped() {
    let mut c = Core::new();
    for (req, want) in [(99_999u32, 3600u32), (10, 600), (1200, 1200)] {
        let t = tuple(41000 + req as u16 % 1000);
        let cr = c.rest_creds(t, "bob", 3600, SECRET);
        let r = c.request(t, method::ALLOCATE, &[transport_udp(), A::U32(attr::LIFETIME, req)], Some(&cr));
        assert_eq!(r.lifetime(), Some(want), "requested {req}");
    }
}

#[test]
fn allocate_transport_and_attribute_errors() {
    let mut c = Core::new();
    let t = tuple(40005);
    let cr = c.rest_creds(t, "", 3600, SECRET);
    let tcp = A::Raw(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0]);
    assert_eq!(c.request(t, method::ALLOCATE, &[tcp], Some(&cr)).code(), Some(442));
    assert_eq!(c.request(t, method::ALLOCATE, &[], Some(&cr)).code(), Some(400));
    // EVEN-PORT together with RESERVATION-TOKEN is a bad request.
    let ev = A::Raw(attr::EVEN_PORT, vec![0]);
    let tok = A::Raw(attr::RESERVATION_TOKEN, vec![0; 8]);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp(), ev, tok], Some(&cr)).code(), Some(400));
    // An unknown address family is 440.
    let fam = A::Raw(attr::REQUESTED_ADDRESS_FAMILY, vec![3, 0, 0, 0]);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp(), fam], Some(&cr)).code(), Some(440));
    assert_eq!(c.server.allocation_count(), 0);
    // Error responses after authentication are signed.
    let r = c.request(t, method::ALLOCATE, &[], Some(&cr));
    assert!(r.msg().verify_integrity(&cr.key));
}

#[test]
fn even_port_and_dont_fragment_are_honoured() {
    let mut c = Core::new();
    let t = tuple(40006);
    let cr = c.rest_creds(t, "", 3600, SECRET);
    let r = c.request(
        t,
        method::ALLOCATE,
        &[transport_udp(), A::Raw(attr::EVEN_PORT, vec![0]), A::Raw(attr::DONT_FRAGMENT, vec![])],
        Some(&cr),
    );
    assert_eq!(r.class(), Class::Success);
    assert!(c.relays.last_even);
    assert_eq!(r.addr(attr::XOR_RELAYED_ADDRESS).unwrap().port() % 2, 0);
}

#[test]
fn allocation_mismatch_and_retransmission() {
    let mut c = Core::new();
    let t = tuple(40007);
    let cr = c.rest_creds(t, "", 3600, SECRET);
    let tid = c.next_tid();
    let req = c.build(method::ALLOCATE, Class::Request, tid, &[transport_udp()], Some(&cr), false);
    let first = c.feed(t, &req).unwrap();
    assert_eq!(first.class(), Class::Success);
    // The same transaction again (lost response): same answer, no new allocation.
    let again = c.feed(t, &req).unwrap();
    assert_eq!(again.class(), Class::Success);
    assert_eq!(again.addr(attr::XOR_RELAYED_ADDRESS), first.addr(attr::XOR_RELAYED_ADDRESS));
    assert_eq!(c.server.allocation_count(), 1);
    // A new transaction on the same 5-tuple: 437.
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).code(), Some(437));
}

#[test]
fn credentials_are_checked() {
    let mut c = Core::with(config(), policy(), vec![b"new-secret".to_vec(), SECRET.to_vec()]);
    let t = tuple(40008);
    // Both secrets verify during a rotation.
    for s in [&b"new-secret"[..], SECRET] {
        let cr = c.rest_creds(t, "carol", 600, s);
        let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
        assert_eq!(r.class(), Class::Success);
        let del = c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 0)], Some(&cr));
        assert_eq!(del.class(), Class::Success);
    }
    let bad = |c: &mut Core, cr: &Creds| c.request(t, method::ALLOCATE, &[transport_udp()], Some(cr)).code();
    let wrong = c.rest_creds(t, "carol", 600, b"other-secret");
    assert_eq!(bad(&mut c, &wrong), Some(401));
    let expired = c.rest_creds(t, "carol", -1, SECRET);
    assert_eq!(bad(&mut c, &expired), Some(401));
    let swapped_name = format!("carol:{}", c.now.unix + 600);
    let swapped = c.creds_for(t, &swapped_name, &turnd::auth::rest_password(SECRET, &swapped_name));
    assert_eq!(bad(&mut c, &swapped), Some(401));
    let mut wrong_realm = c.rest_creds(t, "carol", 600, SECRET);
    wrong_realm.realm = "other.org".into();
    wrong_realm.key = long_term_key(&wrong_realm.username, "other.org", &turnd::auth::rest_password(SECRET, &wrong_realm.username));
    assert_eq!(bad(&mut c, &wrong_realm), Some(401));
    // Integrity without USERNAME/REALM/NONCE: 400.
    let tid = c.next_tid();
    let mut w_buf = vec![0u8; 256];
    let n = turnd::stun::MessageWriter::new(&mut w_buf, method::ALLOCATE, Class::Request, &tid)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::USERNAME, b"1")
        .integrity(b"key")
        .finish()
        .unwrap();
    assert_eq!(c.feed(t, &w_buf[..n]).unwrap().code(), Some(400));
    // Static users work too.
    let st = c.creds_for(t, "static", "pw");
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&st)).class(), Class::Success);
    // Failures were counted by reason.
    assert!(c.server.stats.auth_failures.iter().sum::<u64>() >= 5);
}

#[test]
fn stale_and_foreign_nonces_get_438() {
    let mut c = Core::new();
    let t = tuple(40009);
    let cr = c.rest_creds(t, "dave", 7200, SECRET);
    c.advance(601);
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
    assert_eq!(r.code(), Some(438));
    let fresh = r.get(attr::NONCE).unwrap();
    assert_ne!(fresh, cr.nonce);
    assert!(r.get(attr::REALM).is_some());
    // The same nonce from another client address is not accepted either.
    let mut other = tuple(40010);
    other.client = "198.51.100.99:40010".parse().unwrap();
    let cr2 = Creds { nonce: fresh.clone(), ..cr.clone() };
    assert_eq!(c.request(other, method::ALLOCATE, &[transport_udp()], Some(&cr2)).code(), Some(438));
    // With the fresh nonce, the original client succeeds.
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr2)).class(), Class::Success);
}

#[test]
fn sha256_integrity_is_answered_in_kind() {
    let mut c = Core::new();
    let t = tuple(40011);
    let mut cr = c.rest_creds(t, "", 3600, SECRET);
    cr.sha256 = true;
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    assert!(r.msg().verify_integrity_sha256(&cr.key));
    assert!(r.msg().get(attr::MESSAGE_INTEGRITY).is_none());
}

#[test]
fn refresh_extends_deletes_and_checks_owner() {
    let mut c = Core::new();
    let t = tuple(40012);
    let (cr, _) = c.allocate(t, "erin");
    let r = c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 99_999)], Some(&cr));
    assert_eq!(r.lifetime(), Some(3600));
    c.advance(3000);
    assert_eq!(c.server.allocation_count(), 1, "refresh extended the lifetime");
    // Another user on the same 5-tuple: 441.
    let other = c.rest_creds(t, "mallory", 3600, SECRET);
    assert_eq!(c.request(t, method::REFRESH, &[], Some(&other)).code(), Some(441));
    // LIFETIME 0 deletes; the relay socket is closed.
    let cr = Creds { nonce: other.nonce.clone(), ..cr };
    let r = c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 0)], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.lifetime(), Some(0));
    assert_eq!(c.server.allocation_count(), 0);
    assert!(c.relays.open.is_empty());
    assert_eq!(c.request(t, method::REFRESH, &[], Some(&cr)).code(), Some(437));
}

#[test]
fn allocations_expire_on_the_clock() {
    let mut c = Core::new();
    let t = tuple(40013);
    c.allocate(t, "frank");
    c.advance(599);
    assert_eq!(c.server.allocation_count(), 1);
    c.advance(2);
    assert_eq!(c.server.allocation_count(), 0);
    assert!(c.relays.open.is_empty());
    assert_eq!(c.server.stats.allocations_ended[turnd::turn::EndReason::Expired as usize], 1);
    assert_eq!(c.server.stats.total_ended(), 1);
}

fn send_indication(c: &mut Core, to: &str, data: &[u8]) -> Vec<u8> {
    let tid = c.next_tid();
    c.build(method::SEND, Class::Indication, tid, &[peer(to), A::Raw(attr::DATA, data.to_vec())], None, false)
}

#[test]
fn permissions_gate_send_indications_and_expire() {
    let mut c = Core::new();
    let t = tuple(40014);
    let (cr, _) = c.allocate(t, "gina");
    let ind = send_indication(&mut c, "8.8.8.8:5000", b"hello");
    assert!(c.feed_relay(t, &ind).is_none(), "no permission yet");
    let r = c.request(t, method::CREATE_PERMISSION, &[peer("8.8.8.8:1")], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    assert!(r.msg().verify_integrity(&cr.key));
    let (relay, to, data) = c.feed_relay(t, &ind).expect("relayed");
    assert_eq!(relay.family(), Family::V4);
    assert_eq!(to, "8.8.8.8:5000".parse().unwrap(), "permission covers every port of the IP");
    assert_eq!(data, b"hello");
    c.advance(301);
    assert!(c.feed_relay(t, &ind).is_none(), "permission expired after 300 s");
    // Without an allocation, a Send indication is dropped.
    assert!(c.feed_relay(tuple(49999), &ind).is_none());
}

#[test]
fn create_permission_errors() {
    let mut c = Core::new();
    let t = tuple(40015);
    assert!(!c.rest_creds(t, "", 60, SECRET).username.is_empty());
    let (cr, _) = c.allocate(t, "hank");
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[], Some(&cr)).code(), Some(400));
    // An IPv6 peer on an IPv4-only allocation: 443.
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer("[2606:4700::1]:1")], Some(&cr)).code(), Some(443));
    // One refused peer fails the whole request; the allowed one is not installed.
    let r = c.request(t, method::CREATE_PERMISSION, &[peer("8.8.4.4:1"), peer("10.1.2.3:1")], Some(&cr));
    assert_eq!(r.code(), Some(403));
    let ind = send_indication(&mut c, "8.8.4.4:5000", b"x");
    assert!(c.feed_relay(t, &ind).is_none());
    // Without an allocation: 437.
    let t2 = tuple(40016);
    let cr2 = c.rest_creds(t2, "", 60, SECRET);
    assert_eq!(c.request(t2, method::CREATE_PERMISSION, &[peer("8.8.8.8:1")], Some(&cr2)).code(), Some(437));
}

#[test]
fn permissions_per_allocation_are_capped() {
    let cfg = ServerConfig { max_permissions: 3, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let t = tuple(40017);
    let (cr, _) = c.allocate(t, "ivy");
    for i in 1..=3 {
        let r = c.request(t, method::CREATE_PERMISSION, &[peer(&format!("8.8.8.{i}:1"))], Some(&cr));
        assert_eq!(r.class(), Class::Success);
    }
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer("8.8.8.9:1")], Some(&cr)).code(), Some(508));
    // Refreshing an existing one is fine.
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer("8.8.8.1:1")], Some(&cr)).class(), Class::Success);
}

#[test]
fn channels_bind_relay_and_follow_the_rules() {
    let mut c = Core::new();
    let t = tuple(40018);
    let (cr, _) = c.allocate(t, "jack");
    let r = c.request(t, method::CHANNEL_BIND, &[channel(0x4001), peer("8.8.8.8:5000")], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    let (_, to, data) = c.feed_relay(t, &[0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c', 0]).expect("relayed");
    assert_eq!((to, data), ("8.8.8.8:5000".parse().unwrap(), b"abc".to_vec()));
    // Unbound channel: dropped.
    assert!(c.feed_relay(t, &[0x40, 0x02, 0x00, 0x01, 1, 0, 0, 0]).is_none());
    // Rebinding the number to another peer, or the peer to another number: 400.
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4001), peer("8.8.8.8:5001")], Some(&cr)).code(), Some(400));
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4002), peer("8.8.8.8:5000")], Some(&cr)).code(), Some(400));
    // Refreshing the same binding is fine.
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4001), peer("8.8.8.8:5000")], Some(&cr)).class(), Class::Success);
    // Numbers outside 0x4000-0x4FFF, and missing attributes: 400.
    for n in [0x3FFF, 0x5000, 0x7FFF, 0x8000] {
        assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(n), peer("8.8.8.8:6000")], Some(&cr)).code(), Some(400), "{n:#x}");
    }
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[peer("8.8.8.8:6000")], Some(&cr)).code(), Some(400));
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4003)], Some(&cr)).code(), Some(400));
    // A refused peer: 403.
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4003), peer("127.0.0.1:6000")], Some(&cr)).code(), Some(403));
}

#[test]
fn a_reload_that_refuses_a_peer_ends_its_permission_and_channel_at_once() {
    let mut c = Core::new();
    let t = tuple(40020);
    let (cr, _) = c.allocate(t, "jill");
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4001), peer("8.8.8.8:5000")], Some(&cr)).class(), Class::Success);
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer("1.1.1.1:1")], Some(&cr)).class(), Class::Success);
    let (relay, _, _) = c.feed_relay(t, &[0x40, 0x01, 0x00, 0x01, b'a', 0, 0, 0]).expect("relayed before the reload");
    std::iter::from_fn(|| c.server.poll_event()).for_each(drop);
    // 8.8.8.0/24 taken out: denied from now on.
    let deny = PeerPolicy::new(vec![], vec!["8.8.8.0/24".parse().unwrap()], vec!["10.0.0.5".parse().unwrap(), "192.0.2.5".parse().unwrap()], (49152, 65535));
    let auth = Authenticator::new(REALM, vec![SECRET.to_vec()], &[], NonceKey::new([9; 32], 600));
    assert_eq!(c.server.reconfigure(config(), auth, deny, c.now.mono), 2, "its permission and its channel");
    let unbound: Vec<_> = std::iter::from_fn(|| c.server.poll_event()).filter_map(|e| match e {
        Event::ChannelUnbound { channel, peer, .. } => Some((channel, peer)),
        _ => None,
    }).collect();
    assert_eq!(unbound, vec![(0x4001, "8.8.8.8:5000".parse().unwrap())], "a fast path is told to stop relaying it");
    assert!(c.feed_relay(t, &[0x40, 0x01, 0x00, 0x01, b'b', 0, 0, 0]).is_none(), "the client's ChannelData is dropped");
    let from_peer = c.server.handle_peer(relay, "8.8.8.8:5000".parse().unwrap(), b"in", c.now.mono, &mut c.out).is_some();
    assert!(!from_peer, "the refused peer's datagrams are dropped");
    // The peer still allowed keeps its permission.
    assert!(c.server.handle_peer(relay, "1.1.1.1:1".parse().unwrap(), b"in", c.now.mono, &mut c.out).is_some());
    // And the refused one cannot be bound again.
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4002), peer("8.8.8.8:5000")], Some(&cr)).code(), Some(403));
}

#[test]
fn channel_needs_a_live_permission_and_expires() {
    let mut c = Core::new();
    let t = tuple(40019);
    let (cr, _) = c.allocate(t, "kim");
    c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 3600)], Some(&cr));
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer("8.8.8.8:5000")], Some(&cr)).class(), Class::Success);
    let cd = [0x40, 0x00, 0x00, 0x01, 7, 0, 0, 0];
    c.advance(299);
    assert!(c.feed_relay(t, &cd).is_some());
    c.advance(2);
    assert!(c.feed_relay(t, &cd).is_none(), "permission (300 s) expired though the channel (600 s) lives");
    // The allocation's username must stay the same; only the nonce is renewed.
    let cr = Creds { nonce: c.rest_creds(t, "kim", 3600, SECRET).nonce, ..cr };
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer("8.8.8.8:1")], Some(&cr)).class(), Class::Success);
    assert!(c.feed_relay(t, &cd).is_some());
    c.advance(300);
    let cr = Creds { nonce: c.rest_creds(t, "kim", 3600, SECRET).nonce, ..cr };
    c.request(t, method::CREATE_PERMISSION, &[peer("8.8.8.8:1")], Some(&cr));
    assert!(c.feed_relay(t, &cd).is_none(), "channel expired after 600 s");
    // During the cooldown the number cannot go to another peer.
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer("8.8.8.8:7000")], Some(&cr)).code(), Some(400));
}

#[test]
fn legacy_channel_numbers_when_enabled() {
    let cfg = ServerConfig { channel_max: turnd::stun::CHANNEL_MAX_RFC5766, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let t = tuple(40020);
    let (cr, _) = c.allocate(t, "leo");
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x7000), peer("8.8.8.8:5000")], Some(&cr)).class(), Class::Success);
    assert!(c.feed_relay(t, &[0x70, 0x00, 0x00, 0x01, 7]).is_some());
}

#[test]
fn peer_data_becomes_channel_data_or_data_indication() {
    let mut c = Core::new();
    let t = tuple(40021);
    let (cr, _) = c.allocate(t, "mia");
    c.request(t, method::CREATE_PERMISSION, &[peer("8.8.8.8:1")], Some(&cr));
    let ind = send_indication(&mut c, "8.8.8.8:5000", b"x");
    let (relay, _, _) = c.feed_relay(t, &ind).unwrap();
    let now = c.now.mono;
    // Data indication from a permitted peer.
    let (to, bytes) = c.server.handle_peer(relay, "8.8.8.8:5000".parse().unwrap(), b"pong", now, &mut c.out).unwrap();
    assert_eq!(to, t);
    let m = Message::parse(bytes).unwrap();
    assert_eq!((m.method(), m.class()), (method::DATA, Class::Indication));
    assert_eq!(m.get(attr::DATA), Some(&b"pong"[..]));
    assert_eq!(attr::decode_xor_address(m.get(attr::XOR_PEER_ADDRESS).unwrap(), m.transaction_id()), Some("8.8.8.8:5000".parse().unwrap()));
    // From an IP without permission: dropped.
    assert!(c.server.handle_peer(relay, "9.9.9.9:5000".parse().unwrap(), b"x", now, &mut c.out).is_none());
    // With a channel: ChannelData, unpadded on UDP.
    c.request(t, method::CHANNEL_BIND, &[channel(0x4444), peer("8.8.8.8:5000")], Some(&cr));
    let (_, bytes) = c.server.handle_peer(relay, "8.8.8.8:5000".parse().unwrap(), b"12345", now, &mut c.out).unwrap();
    let cd = ChannelData::parse(bytes).unwrap();
    assert_eq!((cd.channel, cd.data, bytes.len()), (0x4444, &b"12345"[..], 9));
    assert_eq!(c.server.stats.from_peer[0].packets, 2);
}

#[test]
fn stream_transports_pad_channel_data() {
    let mut c = Core::new();
    let mut t = tuple(40022);
    t.transport = turnd::turn::Transport::Tcp;
    let (cr, _) = c.allocate(t, "ned");
    c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer("8.8.8.8:5000")], Some(&cr));
    let ind = [0x40, 0x00, 0x00, 0x01, 1, 0, 0, 0];
    let (relay, _, _) = c.feed_relay(t, &ind).unwrap();
    let now = c.now.mono;
    let (_, bytes) = c.server.handle_peer(relay, "8.8.8.8:5000".parse().unwrap(), b"12345", now, &mut c.out).unwrap();
    assert_eq!(bytes.len(), 12);
    assert_eq!(&bytes[9..], &[0, 0, 0]);
}

#[test]
fn quotas_give_486_and_508() {
    let cfg = ServerConfig { user_quota: 1, total_quota: 2, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    c.allocate(tuple(40023), "olga");
    let t = tuple(40024);
    let cr = c.rest_creds(t, "olga", 3600, SECRET);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).code(), Some(486));
    c.allocate(tuple(40025), "pete");
    let t = tuple(40026);
    let cr = c.rest_creds(t, "quinn", 3600, SECRET);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).code(), Some(508));
    assert_eq!(c.server.stats.quota_refusals, 1);
    // Out of relay ports: 508 too.
    let mut c = Core::new();
    c.relays.exhausted = true;
    let t = tuple(40027);
    let cr = c.rest_creds(t, "", 3600, SECRET);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).code(), Some(508));
}

#[test]
fn ipv6_and_dual_allocations() {
    let mut c = Core::new();
    let t = tuple(40028);
    let cr = c.rest_creds(t, "", 3600, SECRET);
    let v6 = A::Raw(attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0]);
    let r = c.request(t, method::ALLOCATE, &[transport_udp(), v6], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    assert!(r.addr(attr::XOR_RELAYED_ADDRESS).unwrap().is_ipv6());
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer("8.8.8.8:1")], Some(&cr)).code(), Some(443));
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer("[2606:4700::1]:1")], Some(&cr)).class(), Class::Success);
    // Dual: ADDITIONAL-ADDRESS-FAMILY IPv6 gives both.
    let t2 = tuple(40029);
    let cr = c.rest_creds(t2, "", 3600, SECRET);
    let r = c.request(t2, method::ALLOCATE, &[transport_udp(), A::Raw(attr::ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0])], Some(&cr));
    let addrs = r.addrs(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(addrs.len(), 2);
    assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6());
    // ADDITIONAL-ADDRESS-FAMILY IPv4 is a bad request.
    let t3 = tuple(40030);
    let cr = c.rest_creds(t3, "", 3600, SECRET);
    let r = c.request(t3, method::ALLOCATE, &[transport_udp(), A::Raw(attr::ADDITIONAL_ADDRESS_FAMILY, vec![1, 0, 0, 0])], Some(&cr));
    assert_eq!(r.code(), Some(400));
    // Without an IPv6 relay: a v6 request is 440; dual gives IPv4 plus ADDRESS-ERROR-CODE.
    let cfg = ServerConfig { relay_v6: None, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let cr = c.rest_creds(t, "", 3600, SECRET);
    let v6 = A::Raw(attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0]);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp(), v6], Some(&cr)).code(), Some(440));
    let r = c.request(t, method::ALLOCATE, &[transport_udp(), A::Raw(attr::ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0])], Some(&cr));
    assert_eq!(r.addrs(attr::XOR_RELAYED_ADDRESS).len(), 1);
    let ae = r.get(attr::ADDRESS_ERROR_CODE).unwrap();
    assert_eq!((ae[0], ae[2] as u16 * 100 + ae[3] as u16), (2, 440));
}

#[test]
fn two_allocations_on_this_server_relay_to_each_other() {
    let mut c = Core::new();
    let (a, b) = (tuple(40031), tuple(40032));
    let (ca, ra) = c.allocate(a, "rita");
    let (cb, rb) = c.allocate(b, "sam");
    // Each permits the other's relayed (external) address: allowed, though it is "ours".
    assert_eq!(c.request(a, method::CHANNEL_BIND, &[channel(0x4000), A::Addr(attr::XOR_PEER_ADDRESS, rb)], Some(&ca)).class(), Class::Success);
    assert_eq!(c.request(b, method::CREATE_PERMISSION, &[A::Addr(attr::XOR_PEER_ADDRESS, ra)], Some(&cb)).class(), Class::Success);
    let (relay_a, to, _) = c.feed_relay(a, &[0x40, 0x00, 0x00, 0x02, 1, 2, 0, 0]).unwrap();
    // Sent to B's local relay address (hairpin behind 1:1 NAT).
    assert_eq!(to, std::net::SocketAddr::new("10.0.0.5".parse().unwrap(), rb.port()));
    // B's relay receives from A's local address; B sees A's external address.
    let from_a = std::net::SocketAddr::new("10.0.0.5".parse().unwrap(), ra.port());
    let relay_b = turnd::turn::RelayId(relay_a.0 + 2); // slot 1, same generation
    let now = c.now.mono;
    let (to, bytes) = c.server.handle_peer(relay_b, from_a, &[1, 2], now, &mut c.out).expect("delivered to B");
    assert_eq!(to, b);
    let m = Message::parse(bytes).unwrap();
    assert_eq!(attr::decode_xor_address(m.get(attr::XOR_PEER_ADDRESS).unwrap(), m.transaction_id()), Some(ra));
    // But the server's own listener port is not reachable as a peer.
    let own = A::Addr(attr::XOR_PEER_ADDRESS, "192.0.2.5:3478".parse().unwrap());
    assert_eq!(c.request(a, method::CHANNEL_BIND, &[channel(0x4001), own], Some(&ca)).code(), Some(403));
    let ind = send_indication(&mut c, "192.0.2.5:3478", b"x");
    assert!(c.feed_relay(b, &ind).is_none());
}

#[test]
fn unknown_methods_and_responses() {
    let mut c = Core::new();
    let t = tuple(40033);
    assert_eq!(c.request(t, 0x0FF, &[], None).code(), Some(400));
    // Responses and unknown indications from clients are ignored.
    let tid = c.next_tid();
    let resp = c.build(method::BINDING, Class::Success, tid, &[], None, false);
    assert!(c.feed(t, &resp).is_none());
    let ind = c.build(method::DATA, Class::Indication, tid, &[], None, false);
    assert!(matches!(c.server.handle_client(t, &ind, c.now, &mut c.out, &mut c.relays), Output::None));
}

#[test]
fn draining_refuses_new_allocations() {
    let mut c = Core::new();
    c.allocate(tuple(40034), "tom");
    c.server.set_accepting(false);
    let t = tuple(40035);
    let cr = c.rest_creds(t, "", 3600, SECRET);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).code(), Some(508));
    assert_eq!(c.server.allocation_count(), 1);
}

/// A draining core that sends new clients to `alternates`.
fn draining_core(alternates: Vec<Alternate>) -> Core {
    let mut c = Core::with(ServerConfig { alternates, ..config() }, policy(), vec![SECRET.to_vec()]);
    c.server.set_accepting(false);
    c
}

/// A sibling; with a name it takes TLS clients too (its certificate names its address).
fn sibling(ip: &str, port: Option<u16>, domain: Option<&str>) -> Alternate {
    Alternate { ip: ip.parse().unwrap(), port, tls: domain.is_some(), domain: domain.map(Arc::from) }
}

/// The ALTERNATE-SERVER of a response (a plain address, not XOR'd).
fn alternate_server(r: &Resp) -> Option<SocketAddr> {
    attr::decode_address(&r.get(attr::ALTERNATE_SERVER)?)
}

#[test]
fn draining_with_a_sibling_answers_an_authenticated_allocate_with_a_signed_300() {
    let mut c = draining_core(vec![sibling("203.0.113.20", None, Some("turn2.example.org"))]);
    let t = tuple(40100);
    let cr = c.rest_creds(t, "ann", 3600, SECRET);
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
    assert_eq!(r.class(), Class::Error);
    assert_eq!(r.code(), Some(300));
    let (_, reason) = attr::decode_error_code(&r.get(attr::ERROR_CODE).unwrap()).map(|(c, s)| (c, s.to_owned())).unwrap();
    assert_eq!(reason, "Try Alternate");
    // RFC 8489 10: protected with the integrity of the request it answers.
    assert!(r.msg().verify_integrity(&cr.key), "the 300 is signed with the user's key");
    assert!(!r.msg().verify_integrity(&long_term_key(&cr.username, REALM, "wrong")));
    // The sibling's address, on the port the request came in on (3478 here);
    // encoded as MAPPED-ADDRESS is, without the XOR.
    assert_eq!(alternate_server(&r), Some("203.0.113.20:3478".parse().unwrap()));
    let raw = r.get(attr::ALTERNATE_SERVER).unwrap();
    assert_eq!(raw, vec![0, 1, 0x0D, 0x96, 203, 0, 113, 20], "family 1, port 3478, the address as is");
    // Over UDP no ALTERNATE-DOMAIN: it is for TLS clients.
    assert!(r.get(attr::ALTERNATE_DOMAIN).is_none());
    // REALM, and a NONCE browsers carry over to the sibling.
    assert_eq!(r.get(attr::REALM), Some(REALM.as_bytes().to_vec()));
    assert_eq!(r.get(attr::NONCE).map(|n| n.len()), Some(16));
    assert_eq!(c.server.allocation_count(), 0, "nothing allocated here");
    assert_eq!(c.server.stats.redirected, 1);
    assert_eq!(c.server.stats.capacity_refusals, 0);
    assert_eq!(c.server.stats.responses.get(&(method::ALLOCATE, 300)), Some(&1));
    // A retransmission of the same request is redirected again, not allocated.
    let tid = c.next_tid();
    let req = c.build(method::ALLOCATE, Class::Request, tid, &[transport_udp()], Some(&cr), true);
    let once = c.feed(t, &req).unwrap();
    let twice = c.feed(t, &req).unwrap();
    assert_eq!((once.code(), twice.code()), (Some(300), Some(300)));
    assert!(once.msg().has_fingerprint(), "FINGERPRINT when the request had one");
}

#[test]
fn the_300_nonce_is_accepted_by_a_sibling_sharing_the_secret() {
    let mut c = draining_core(vec![sibling("203.0.113.20", Some(3478), None)]);
    let t = tuple(40101);
    let cr = c.rest_creds(t, "bea", 3600, SECRET);
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
    assert_eq!(r.code(), Some(300));
    let carried = Creds { nonce: r.get(attr::NONCE).unwrap(), ..cr.clone() };
    // The sibling: another process (its own random nonce key), the same
    // secret and realm. Chromium sends it the redirected Allocate with the
    // nonce of the 300 and the same credentials, and gives up on a 401 or 438.
    let mut s = Core::new();
    s.server = Server::new(config(), Authenticator::new(REALM, vec![SECRET.to_vec()], &[], NonceKey::new([42; 32], 600)), policy());
    let a = s.request(t, method::ALLOCATE, &[transport_udp()], Some(&carried));
    assert_eq!(a.class(), Class::Success, "the sibling refused the carried nonce: {:?}", a.code());
    assert!(a.msg().verify_integrity(&cr.key));
    // The draining relay's own nonce (the one of its 401) is no good there.
    let mut s2 = Core::new();
    s2.server = Server::new(config(), Authenticator::new(REALM, vec![SECRET.to_vec()], &[], NonceKey::new([42; 32], 600)), policy());
    assert_eq!(s2.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).code(), Some(438));
    // Nor is the carried nonce from another address, nor at a relay with another secret.
    let mut other = t;
    other.client = "198.51.100.99:40101".parse().unwrap();
    assert_eq!(s2.request(other, method::ALLOCATE, &[transport_udp()], Some(&carried)).code(), Some(438));
    let mut s3 = Core::new();
    s3.server = Server::new(config(), Authenticator::new(REALM, vec![b"another".to_vec()], &[], NonceKey::new([42; 32], 600)), policy());
    assert_eq!(s3.request(t, method::ALLOCATE, &[transport_udp()], Some(&carried)).code(), Some(438));
    // During a rotation (new secret first, old second) the sibling still takes it.
    let mut s4 = Core::new();
    s4.server = Server::new(config(), Authenticator::new(REALM, vec![b"new".to_vec(), SECRET.to_vec()], &[], NonceKey::new([43; 32], 600)), policy());
    assert_eq!(s4.request(t, method::ALLOCATE, &[transport_udp()], Some(&carried)).class(), Class::Success);
    // A sibling with a realm of its own (setup.sh makes each relay's name its
    // realm): the redirected client keeps the realm it had, and with a
    // redirect nonce that is accepted for REST credentials.
    let mut s5 = Core::new();
    s5.server = Server::new(config(), Authenticator::new("turn2.example.org", vec![SECRET.to_vec()], &[], NonceKey::new([44; 32], 600)), policy());
    let a = s5.request(t, method::ALLOCATE, &[transport_udp()], Some(&carried));
    assert_eq!(a.class(), Class::Success, "{:?}", a.code());
    assert!(a.msg().verify_integrity(&cr.key), "signed with the key of the client's realm");
    let refresh = s5.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 600)], Some(&carried));
    assert_eq!(refresh.class(), Class::Success, "{:?}", refresh.code());
    // Its own nonce with another realm is the wrong realm, as ever.
    let mut t2 = t;
    t2.client.set_port(40199);
    let own = s5.rest_creds(t2, "", 3600, SECRET);
    let foreign = Creds { realm: REALM.into(), key: long_term_key(&own.username, REALM, &turnd::auth::rest_password(SECRET, &own.username)), ..own };
    assert_eq!(s5.request(t2, method::ALLOCATE, &[transport_udp()], Some(&foreign)).code(), Some(401));
}

#[test]
fn a_tls_client_also_gets_the_siblings_name_and_sha256_is_answered_in_kind() {
    let mut c = draining_core(vec![sibling("203.0.113.20", None, Some("turn2.example.org"))]);
    let mut t = tuple(40102);
    t.transport = Transport::Tls;
    t.server = "192.0.2.10:443".parse().unwrap();
    let mut cr = c.rest_creds(t, "", 3600, SECRET);
    cr.sha256 = true;
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
    assert_eq!(r.code(), Some(300));
    assert!(r.msg().verify_integrity_sha256(&cr.key));
    assert!(r.get(attr::MESSAGE_INTEGRITY).is_none());
    assert_eq!(alternate_server(&r), Some("203.0.113.20:443".parse().unwrap()), "the port TLS came in on");
    assert_eq!(r.get(attr::ALTERNATE_DOMAIN), Some(b"turn2.example.org".to_vec()));
}

#[test]
fn tls_clients_go_only_to_siblings_that_take_them() {
    // Browsers check a TLS sibling's certificate against its address: a
    // sibling not marked for TLS clients gets UDP and TCP clients only.
    let mut c = draining_core(vec![sibling("203.0.113.20", None, None), sibling("203.0.113.21", None, Some("turn3.example.org"))]);
    let mut tls = tuple(40110);
    tls.transport = Transport::Tls;
    tls.server = "192.0.2.10:443".parse().unwrap();
    for i in 0..20u8 {
        let mut t = tls;
        t.client = SocketAddr::new(format!("198.51.100.{}", 100 + i).parse().unwrap(), 40110);
        let cr = c.rest_creds(t, "", 3600, SECRET);
        let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
        assert_eq!(alternate_server(&r), Some("203.0.113.21:443".parse().unwrap()));
    }
    // None that takes TLS clients: 508 for them, the redirect for the others.
    let mut c = draining_core(vec![sibling("203.0.113.20", None, None)]);
    let cr = c.rest_creds(tls, "", 3600, SECRET);
    assert_eq!(c.request(tls, method::ALLOCATE, &[transport_udp()], Some(&cr)).code(), Some(508));
    let mut tcp = tls;
    tcp.transport = Transport::Tcp;
    tcp.server = "192.0.2.10:3478".parse().unwrap();
    let cr = c.rest_creds(tcp, "", 3600, SECRET);
    let r = c.request(tcp, method::ALLOCATE, &[transport_udp()], Some(&cr));
    assert_eq!(alternate_server(&r), Some("203.0.113.20:3478".parse().unwrap()));
    assert!(r.get(attr::ALTERNATE_DOMAIN).is_none());
}

#[test]
fn draining_answers_unauthenticated_and_wrong_allocates_as_before() {
    let mut c = draining_core(vec![sibling("203.0.113.20", None, None)]);
    let t = tuple(40103);
    // No credentials: the usual 401 challenge (a 300 only ever goes to an
    // authenticated request, RFC 8489 14.8), unsigned and without ALTERNATE-SERVER.
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], None);
    assert_eq!(r.code(), Some(401));
    assert!(r.get(attr::ALTERNATE_SERVER).is_none());
    // Wrong password: 401 too.
    let bad = c.creds_for(t, &format!("{}:eve", c.now.unix + 600), "guess");
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&bad));
    assert_eq!(r.code(), Some(401));
    assert!(r.get(attr::ALTERNATE_SERVER).is_none());
    // A bad request is still one, before any redirect.
    let cr = c.rest_creds(t, "", 3600, SECRET);
    assert_eq!(c.request(t, method::ALLOCATE, &[A::Raw(0x7777, vec![0; 4])], Some(&cr)).code(), Some(420));
    assert_eq!(c.server.stats.redirected, 0);
}

#[test]
fn other_requests_and_existing_allocations_are_unaffected_while_draining() {
    let mut c = Core::with(ServerConfig { alternates: vec![sibling("203.0.113.20", None, None)], ..config() }, policy(), vec![SECRET.to_vec()]);
    let t = tuple(40104);
    let (cr, _) = c.allocate(t, "old");
    c.server.set_accepting(false);
    // Binding, Refresh, CreatePermission and ChannelBind answer as ever.
    let r = c.request(t, method::BINDING, &[], None);
    assert_eq!(r.class(), Class::Success);
    for (m, attrs) in [
        (method::REFRESH, vec![A::U32(attr::LIFETIME, 600)]),
        (method::CREATE_PERMISSION, vec![peer("8.8.8.8:53")]),
        (method::CHANNEL_BIND, vec![channel(0x4001), peer("8.8.4.4:53")]),
    ] {
        let r = c.request(t, m, &attrs, Some(&cr));
        assert_eq!(r.class(), Class::Success, "{} while draining: {:?}", method::name(m), r.code());
        assert!(r.get(attr::ALTERNATE_SERVER).is_none());
    }
    // The allocation relays.
    assert!(c.feed_relay(t, &[0x40, 0x01, 0x00, 0x01, 7, 0, 0, 0]).is_some());
    // An Allocate on the tuple that holds one is a mismatch, as ever.
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).code(), Some(437));
    assert_eq!(c.server.stats.redirected, 0);
    // A refresh to 0 still ends it.
    assert_eq!(c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 0)], Some(&cr)).class(), Class::Success);
    assert_eq!(c.server.allocation_count(), 0);
}

#[test]
fn without_a_sibling_of_the_clients_family_draining_answers_508() {
    // Only an IPv6 sibling, an IPv4 client: nothing it could use (RFC 8489
    // 10: the same family as the request's source).
    let mut c = draining_core(vec![sibling("2001:db8::20", None, None)]);
    let t = tuple(40105);
    let cr = c.rest_creds(t, "", 3600, SECRET);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).code(), Some(508));
    // An IPv6 client goes there.
    let mut t6 = tuple(40106);
    t6.client = "[2001:db8:7::7]:40106".parse().unwrap();
    t6.server = "[2001:db8::10]:3478".parse().unwrap();
    let cr6 = c.rest_creds(t6, "", 3600, SECRET);
    let r = c.request(t6, method::ALLOCATE, &[transport_udp()], Some(&cr6));
    assert_eq!(alternate_server(&r), Some("[2001:db8::20]:3478".parse().unwrap()));
    // Resumed: allocations again, no redirect.
    c.server.set_accepting(true);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).class(), Class::Success);
}

#[test]
fn clients_spread_over_the_siblings_and_each_stays_with_one() {
    let mut c = draining_core(vec![sibling("203.0.113.20", Some(3478), None), sibling("203.0.113.21", Some(3478), None), sibling("2001:db8::20", None, None)]);
    let mut seen = std::collections::HashMap::new();
    for i in 0..40u16 {
        let mut t = tuple(40200 + i);
        t.client = SocketAddr::new(format!("198.51.100.{}", 10 + i).parse().unwrap(), 40200 + i);
        let cr = c.rest_creds(t, "", 3600, SECRET);
        let first = alternate_server(&c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr))).unwrap();
        // The same address from another port (its TCP leg) goes to the same sibling.
        let mut again = t;
        again.client.set_port(50000 + i);
        let cr2 = c.rest_creds(again, "", 3600, SECRET);
        assert_eq!(alternate_server(&c.request(again, method::ALLOCATE, &[transport_udp()], Some(&cr2))), Some(first));
        assert!(first.is_ipv4());
        *seen.entry(first).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both IPv4 siblings get clients: {seen:?}");
    assert!(seen.values().all(|&n| n >= 5), "{seen:?}");
}

#[test]
fn a_reload_changes_the_siblings_and_check_credentials_are_not_redirected() {
    let mut c = draining_core(vec![sibling("203.0.113.20", None, None)]);
    let t = tuple(40107);
    let cr = c.rest_creds(t, "", 3600, SECRET);
    let auth = || Authenticator::new(REALM, vec![SECRET.to_vec()], &[], NonceKey::new([9; 32], 600));
    c.server.reconfigure(ServerConfig { alternates: vec![sibling("203.0.113.30", Some(5349), None)], ..config() }, auth(), policy(), c.now.mono);
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
    assert_eq!(alternate_server(&r), Some("203.0.113.30:5349".parse().unwrap()));
    c.server.reconfigure(config(), auth(), policy(), c.now.mono);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).code(), Some(508), "no sibling left: 508");
    // Check credentials (signed with this relay's own key) stay here: 508.
    c.server.reconfigure(ServerConfig { alternates: vec![sibling("203.0.113.20", None, None)], ..config() }, auth().with_check(Some(60)), policy(), c.now.mono);
    let key = turnd::auth::check_key(&NonceKey::new([9; 32], 600));
    let (user, pass) = turnd::auth::check_credentials(&key, c.now.unix + 30);
    let ck = c.creds_for(t, &user, &pass);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&ck)).code(), Some(508));
}

#[test]
fn even_port_reservations_hand_over_the_next_port() {
    let mut c = Core::new();
    let t = tuple(40036);
    let cr = c.rest_creds(t, "", 3600, SECRET);
    let r = c.request(t, method::ALLOCATE, &[transport_udp(), A::Raw(attr::EVEN_PORT, vec![0x80])], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    let even = r.addr(attr::XOR_RELAYED_ADDRESS).unwrap().port();
    assert_eq!(even % 2, 0);
    let token = r.get(attr::RESERVATION_TOKEN).expect("a token for the reserved port");
    assert_eq!(token.len(), 8);
    assert!(c.relays.reserved.contains(&(even + 1)));
    // Another client claims the reserved port with the token, once.
    let t2 = tuple(40037);
    let cr2 = c.rest_creds(t2, "", 3600, SECRET);
    let r = c.request(t2, method::ALLOCATE, &[transport_udp(), A::Raw(attr::RESERVATION_TOKEN, token.clone())], Some(&cr2));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.addr(attr::XOR_RELAYED_ADDRESS).unwrap().port(), even + 1);
    let t3 = tuple(40038);
    let cr3 = c.rest_creds(t3, "", 3600, SECRET);
    let again = c.request(t3, method::ALLOCATE, &[transport_udp(), A::Raw(attr::RESERVATION_TOKEN, token)], Some(&cr3));
    assert_eq!(again.code(), Some(508), "a token works once");
    let bogus = c.request(t3, method::ALLOCATE, &[transport_udp(), A::Raw(attr::RESERVATION_TOKEN, vec![0; 8])], Some(&cr3));
    assert_eq!(bogus.code(), Some(508));
    // An unclaimed reservation is released after 30 s.
    let t4 = tuple(40039);
    let cr4 = c.rest_creds(t4, "", 3600, SECRET);
    c.request(t4, method::ALLOCATE, &[transport_udp(), A::Raw(attr::EVEN_PORT, vec![0x80])], Some(&cr4));
    assert_eq!(c.relays.reserved.len(), 1);
    c.advance(31);
    assert!(c.relays.reserved.is_empty());
}

/// How many times the core said its next deadline moved earlier, drained.
fn deadline_moves(c: &mut Core) -> usize {
    std::iter::from_fn(|| c.server.poll_event()).filter(|e| *e == turnd::turn::Event::DeadlineMoved).count()
}

/// The channel events a fast path mirrors, drained from the core.
fn channel_events(c: &mut Core) -> Vec<(bool, u16, std::net::SocketAddr)> {
    let mut v = Vec::new();
    while let Some(e) = c.server.poll_event() {
        match e {
            turnd::turn::Event::ChannelBound { channel, peer, .. } => v.push((true, channel, peer)),
            turnd::turn::Event::ChannelUnbound { channel, peer, .. } => v.push((false, channel, peer)),
            _ => {}
        }
    }
    v
}

#[test]
fn every_channel_binding_is_matched_by_one_unbinding() {
    let mut c = Core::new();
    let t = tuple(40031);
    let (cr, _) = c.allocate(t, "uma");
    c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 3600)], Some(&cr));
    let p1: std::net::SocketAddr = "8.8.8.8:5000".parse().unwrap();
    let p2: std::net::SocketAddr = "8.8.4.4:6000".parse().unwrap();
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer("8.8.8.8:5000")], Some(&cr)).class(), Class::Success);
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4001), peer("8.8.4.4:6000")], Some(&cr)).class(), Class::Success);
    assert_eq!(channel_events(&mut c), vec![(true, 0x4000, p1), (true, 0x4001, p2)]);
    // 0x4001 is refreshed at 300 s; 0x4000 expires at 600 s, reported once.
    c.advance(300);
    let cr = Creds { nonce: c.rest_creds(t, "uma", 3600, SECRET).nonce, ..cr };
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4001), peer("8.8.4.4:6000")], Some(&cr)).class(), Class::Success);
    assert_eq!(channel_events(&mut c), vec![(true, 0x4001, p2)]);
    c.advance(301);
    assert_eq!(channel_events(&mut c), vec![(false, 0x4000, p1)]);
    c.advance(10);
    assert_eq!(channel_events(&mut c), vec![], "an expiry is reported once");
    // Rebound during its cooldown (same number, same peer): bound again.
    let cr = Creds { nonce: c.rest_creds(t, "uma", 3600, SECRET).nonce, ..cr };
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer("8.8.8.8:5000")], Some(&cr)).class(), Class::Success);
    assert_eq!(channel_events(&mut c), vec![(true, 0x4000, p1)]);
    // Deleting the allocation unbinds what is still bound.
    c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 0)], Some(&cr));
    let mut ev = channel_events(&mut c);
    ev.sort();
    assert_eq!(ev, vec![(false, 0x4000, p1), (false, 0x4001, p2)]);
}

#[test]
fn the_core_reports_its_next_deadline_and_expires_in_bounded_batches() {
    let mut c = Core::new();
    assert_eq!(c.server.poll_timeout(), None, "nothing pending");
    let start = c.now.mono;
    for i in 0..10 {
        c.allocate(tuple(40100 + i), "vic");
    }
    assert_eq!(c.server.poll_timeout(), Some(start + Duration::from_secs(600)), "the allocations' lifetime");
    assert_eq!(deadline_moves(&mut c), 1, "an earlier deadline than none was filed: reported once");
    assert_eq!(deadline_moves(&mut c), 0);
    // A permission (300 s) is due before its allocation (600 s).
    let t = tuple(40100);
    let cr = c.rest_creds(t, "vic", 3600, SECRET);
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer("8.8.8.8:1")], Some(&cr)).class(), Class::Success);
    assert_eq!(c.server.poll_timeout(), Some(start + Duration::from_secs(300)));
    assert_eq!(deadline_moves(&mut c), 1, "the I/O layer is told to wake sooner");
    // Before it, nothing to do.
    assert!(!c.server.expire(start + Duration::from_secs(299), &mut c.relays, 100));
    assert_eq!(c.server.allocation_count(), 10);
    // At it, the permission goes and the allocation's own lifetime is next.
    assert!(!c.server.expire(start + Duration::from_secs(300), &mut c.relays, 100));
    assert_eq!(c.server.footprint().permissions, 0);
    assert_eq!(c.server.poll_timeout(), Some(start + Duration::from_secs(600)));
    // Past the lifetime, three at a time: the caller is told when more is due.
    let late = start + Duration::from_secs(601);
    let (mut left, mut calls) = (10, 0);
    loop {
        let more = c.server.expire(late, &mut c.relays, 3);
        let now_left = c.server.allocation_count();
        assert!(left - now_left <= 3, "at most 3 deadlines a call: {left} -> {now_left}");
        left = now_left;
        calls += 1;
        assert!(calls <= 6, "bounded");
        if !more {
            break;
        }
    }
    assert_eq!(left, 0);
    assert!(calls >= 4, "ten allocations take four calls or more at three a call");
    assert!(c.relays.open.is_empty());
    assert_eq!(c.server.poll_timeout(), None);
    // A refreshed allocation is not ended at its old deadline.
    c.now.mono = late;
    let t = tuple(40200);
    let (cr, _) = c.allocate(t, "wes");
    assert_eq!(c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 3600)], Some(&cr)).class(), Class::Success);
    assert!(!c.server.expire(late + Duration::from_secs(601), &mut c.relays, 100));
    assert_eq!(c.server.allocation_count(), 1, "refreshed to an hour");
    assert_eq!(c.server.poll_timeout(), Some(late + Duration::from_secs(3600)));
}

/// Sends `n` ChannelData packets of `len` bytes on channel 0x4000 at
/// `now + i * gap`; returns how many the core relays, and their relay.
fn relay_paced(c: &mut Core, t: FiveTuple, n: u32, len: usize, gap: Duration) -> (u32, Option<RelayId>) {
    let mut cd = vec![0u8; 4 + len];
    cd[..4].copy_from_slice(&ChannelData::header(0x4000, len));
    let start = c.now.mono;
    let (mut passed, mut relay) = (0, None);
    for i in 0..n {
        c.now.mono = start + gap * i;
        if let Some((r, _, _)) = c.feed_relay(t, &cd) {
            passed += 1;
            relay = Some(r);
        }
    }
    (passed, relay)
}

#[test]
fn bandwidth_caps_hold_each_direction_and_the_whole_relay() {
    // 1 Mbit/s per allocation (125,000 bytes a second, one second's burst).
    let cfg = ServerConfig { allocation_bytes_per_second: 125_000, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let t = tuple(40040);
    let (cr, _) = c.allocate(t, "cap");
    c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 3600)], Some(&cr));
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer("8.8.8.8:5000")], Some(&cr)).class(), Class::Success);
    // 4 Mbit/s offered for 10 s (1,000-byte packets every 2 ms): the burst
    // and then 1 Mbit/s pass, each packet charged what it takes on the wire
    // (1,000 bytes + 28 of IPv4/UDP + 4 of ChannelData): 125,000 x 11 / 1,032.
    let (passed, relay) = relay_paced(&mut c, t, 5_000, 1_000, Duration::from_millis(2));
    assert!((1_329..=1_335).contains(&passed), "{passed} of 5000 passed");
    assert_eq!(c.server.stats.dropped_allocation_bandwidth, 5_000 - passed as u64);
    assert_eq!(c.server.stats.to_peer[0].packets, passed as u64, "only what passed is counted as relayed");
    // Reported once, however many are dropped.
    let over: Vec<_> = std::iter::from_fn(|| c.server.poll_event()).filter(|e| matches!(e, Event::OverBandwidth { .. })).collect();
    assert_eq!(over.len(), 1, "{over:?}");

    // The other direction has its own budget: peer data still flows, and is held to the rate too.
    let relay = relay.unwrap();
    let base = c.now.mono;
    let mut from_peer = 0;
    for i in 0..2_000u32 {
        let now = base + Duration::from_millis(i as u64);
        from_peer += c.server.handle_peer(relay, "8.8.8.8:5000".parse().unwrap(), &[0u8; 1_000], now, &mut c.out).is_some() as u32;
    }
    // 125,000 x 3 / 1,032.
    assert!((360..=366).contains(&from_peer), "{from_peer} of 2000 peer packets passed");

    // A relay-wide cap of 1 Mbit/s shared by two allocations without their own cap.
    let cfg = ServerConfig { total_bytes_per_second: 125_000, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let (a, b) = (tuple(40041), tuple(40042));
    for (t, user) in [(a, "a"), (b, "b")] {
        let (cr, _) = c.allocate(t, user);
        c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer("8.8.8.8:5000")], Some(&cr));
    }
    let mut cd = vec![0u8; 1_004];
    cd[..4].copy_from_slice(&ChannelData::header(0x4000, 1_000));
    let start = c.now.mono;
    let mut passed = [0u32; 2];
    for i in 0..2_500u32 {
        c.now.mono = start + Duration::from_millis(2) * i;
        for (k, t) in [a, b].into_iter().enumerate() {
            passed[k] += c.feed_relay(t, &cd).is_some() as u32;
        }
    }
    let total = passed[0] + passed[1];
    // 125,000 x 6 / 1,032.
    assert!((723..=729).contains(&total), "{passed:?} passed in 5 s");
    assert_eq!(c.server.stats.dropped_total_bandwidth, 5_000 - total as u64);
    assert_eq!(c.server.stats.dropped_allocation_bandwidth, 0);
}

#[test]
fn what_a_fast_path_relayed_is_charged_to_the_caps_and_its_drops_counted() {
    use turnd::turn::{FastPathCounts, Flow};
    let cfg = ServerConfig { allocation_bytes_per_second: 125_000, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let t = tuple(40044);
    let (cr, _) = c.allocate(t, "fast");
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer("8.8.8.8:5000")], Some(&cr)).class(), Class::Success);
    // The fast path learns the allocation's cap with the binding.
    let (relay, cap) = std::iter::from_fn(|| c.server.poll_event())
        .find_map(|e| match e {
            Event::ChannelBound { relay, cap, .. } => Some((relay, cap)),
            _ => None,
        })
        .expect("a ChannelBound");
    assert_eq!(cap, 125_000);
    // It relayed 121 packets of 1,000 bytes (124,872 bytes on the wire of
    // the one second's burst) and dropped 5 over the cap.
    let counts = FastPathCounts { to_peer: Flow { packets: 121, bytes: 121_000 }, dropped_allocation_bandwidth: 5, ..Default::default() };
    assert!(c.server.credit_fast_path(relay, Transport::Udp, counts, c.now.mono));
    assert_eq!(c.server.stats.to_peer[0].packets, 121);
    assert_eq!(c.server.stats.dropped_allocation_bandwidth, 5);
    let over = std::iter::from_fn(|| c.server.poll_event()).filter(|e| matches!(e, Event::OverBandwidth { .. })).count();
    assert_eq!(over, 1, "the first drops in the kernel are reported as the core's own are");
    // What is left of the allocation's budget at that instant is less than
    // one more such packet: the socket path drops it.
    let (passed, _) = relay_paced(&mut c, t, 1, 1_000, Duration::ZERO);
    assert_eq!(passed, 0, "the kernel's bytes were charged to the core's budget");
    assert_eq!(c.server.stats.dropped_allocation_bandwidth, 6);
    // The other direction was not charged.
    let from_peer = c.server.handle_peer(relay, "8.8.8.8:5000".parse().unwrap(), &[0u8; 1_000], c.now.mono, &mut c.out).is_some();
    assert!(from_peer, "the peer's direction keeps its own budget");
    // A second later the budget has refilled.
    c.now.mono += Duration::from_secs(1);
    assert_eq!(relay_paced(&mut c, t, 1, 1_000, Duration::ZERO).0, 1);
}

#[test]
fn a_fast_path_and_the_socket_path_together_keep_to_the_cap() {
    use turnd::turn::{FastPathCounts, Flow};
    let cfg = ServerConfig { allocation_bytes_per_second: 125_000, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let t = tuple(40045);
    let (cr, _) = c.allocate(t, "both");
    c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 3600)], Some(&cr));
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer("8.8.8.8:5000")], Some(&cr)).class(), Class::Success);
    let relay = std::iter::from_fn(|| c.server.poll_event())
        .find_map(|e| match e {
            Event::ChannelBound { relay, .. } => Some(relay),
            _ => None,
        })
        .unwrap();
    let start = c.now.mono;
    let mut socket = [0u32; 5];
    for (sec, passed) in socket.iter_mut().enumerate() {
        // The socket path is offered 4 Mbit/s (a packet every 2 ms)...
        let from = start + Duration::from_secs(sec as u64);
        c.now.mono = from;
        *passed = relay_paced(&mut c, t, 500, 1_000, Duration::from_millis(2)).0;
        // ...while the fast path relays the cap's worth, read back each second.
        c.now.mono = from + Duration::from_secs(1);
        let counts = FastPathCounts { to_peer: Flow { packets: 121, bytes: 121_000 }, ..Default::default() };
        assert!(c.server.credit_fast_path(relay, Transport::Udp, counts, c.now.mono));
    }
    // The first second, before the first read, the two get the cap each
    // (the socket path its burst and a second at the rate); after, what the
    // fast path relays is owed by the socket path, and together they keep to it.
    assert!((240..=244).contains(&socket[0]), "{socket:?}");
    assert!(socket[1..].iter().all(|&n| n <= 1), "the socket path after the fast path took the cap: {socket:?} a second");
}

#[test]
fn empty_and_tiny_messages_are_charged_what_they_take_on_the_wire() {
    // 1 Mbit/s: 200,000 empty ChannelData messages in 2 s. Each empty one is
    // worth its headers on the wire (28 bytes of IPv4/UDP to the peer, 4 of
    // ChannelData from the client), so the burst and 2 s at the rate pass:
    // 125,000 x 3 / 32 = 11,718, not all 200,000.
    let cfg = ServerConfig { allocation_bytes_per_second: 125_000, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let t = tuple(40043);
    let (cr, _) = c.allocate(t, "tiny");
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer("8.8.8.8:5000")], Some(&cr)).class(), Class::Success);
    let start = c.now.mono;
    let empty = ChannelData::header(0x4000, 0);
    let mut passed = 0u32;
    for i in 0..200_000u32 {
        c.now.mono = start + Duration::from_micros(10) * i;
        if let Some((_, _, data)) = c.feed_relay(t, &empty) {
            assert!(data.is_empty());
            passed += 1;
        }
    }
    assert!((11_700..=11_720).contains(&passed), "{passed} of 200,000 empty messages passed");
    // 1-byte messages: what leaves on the wire (payload and IPv4/UDP
    // headers) stays under the cap, however small the payload.
    let (passed, _) = relay_paced(&mut c, t, 100_000, 1, Duration::from_micros(20));
    let wire_bits_per_s = passed as f64 * (1.0 + 28.0) * 8.0 / 2.0;
    assert!(wire_bits_per_s <= 1_000_000.0, "{passed} one-byte messages in 2 s: {wire_bits_per_s} bit/s on the wire");
}

/// What a fast path mirrors of each channel: until when it relays (the
/// earliest of binding, permission and allocation) and whether a cap keeps
/// it in the core, reported again whenever a Refresh or CreatePermission
/// moves it.
#[test]
fn channel_events_say_until_when_a_channel_relays() {
    use turnd::turn::Event;
    let mut c = Core::new();
    let t = tuple(40041);
    let (cr, _) = c.allocate(t, "una");
    let start = c.now.mono;
    c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 3600)], Some(&cr));
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer("8.8.8.8:5000")], Some(&cr)).class(), Class::Success);
    let evs: Vec<Event> = std::iter::from_fn(|| c.server.poll_event()).collect();
    let bound = evs.iter().find_map(|e| match e {
        Event::ChannelBound { until, cap, .. } => Some((*until, *cap)),
        _ => None,
    });
    assert_eq!(bound, Some((start + Duration::from_secs(300), 0)), "the permission (300 s) ends before the binding (600 s)");
    c.advance(100);
    let cr = Creds { nonce: c.rest_creds(t, "una", 3600, SECRET).nonce, ..cr };
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer("8.8.8.8:1")], Some(&cr)).class(), Class::Success);
    let refreshed: Vec<_> = std::iter::from_fn(|| c.server.poll_event())
        .filter_map(|e| match e {
            Event::ChannelRefreshed { channel, until, .. } => Some((channel, until)),
            _ => None,
        })
        .collect();
    assert_eq!(refreshed, vec![(0x4000, start + Duration::from_secs(400))]);
    // Another peer's permission leaves the channel alone.
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer("8.8.4.4:1")], Some(&cr)).class(), Class::Success);
    assert!(!std::iter::from_fn(|| c.server.poll_event()).any(|e| matches!(e, Event::ChannelRefreshed { .. })));
    // A Refresh reports it again (now bounded by the binding: 600 s from the bind).
    c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 3600)], Some(&cr));
    let refreshed: Vec<_> = std::iter::from_fn(|| c.server.poll_event())
        .filter_map(|e| match e {
            Event::ChannelRefreshed { until, .. } => Some(until),
            _ => None,
        })
        .collect();
    assert_eq!(refreshed, vec![start + Duration::from_secs(400)]);
}
