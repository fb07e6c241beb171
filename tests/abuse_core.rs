//! The abuse suite against the sans-IO core, with a fake clock and fake
//! relay ports: what an attacker on the internet can send turnd, and what it
//! must do about it.
//!
//! - Peer policy: every refused address form on every peer-carrying path
//!   (CreatePermission, ChannelBind, Send indication, ChannelData, peer data),
//!   the server's own non-relay ports, requests naming several peers; relaying
//!   between two allocations on this server still works.
//! - Credentials: expiry forms, username forms, realm, nonces, rotation.
//! - Protocol: lengths near 65535, truncation, ChannelData lengths, channel
//!   numbers, LIFETIME extremes, REQUESTED-TRANSPORT, duplicate attributes.
//! - Amplification: unsigned UDP answers stay within 3x the request (2x for a
//!   bare Binding) and are rate-limited per source.
//! - Exhaustion: unauthenticated floods create no state; quotas and caps hold.
//! - Regressions the fuzzer found.
//!
//! The same attacks over real sockets against a real turnd: tests/abuse_wire.rs.

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use harness::*;
use turnd::auth::{rest_password, Authenticator, NonceKey};
use turnd::stun::attr;
use turnd::stun::integrity::long_term_key;
use turnd::stun::{method, ChannelData, Class, Message, MessageWriter};
use turnd::turn::{Footprint, Output, RelayId, Server, ServerConfig, Transport, AMPLIFICATION_FACTOR};
use wire::{build, data, peer_at};


// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn send_ind(c: &mut Core, to: SocketAddr, d: &[u8]) -> Vec<u8> {
    let tid = c.next_tid();
    c.build(method::SEND, Class::Indication, tid, &[peer_at(to), data(d)], None, false)
}

/// The core's tables, without the bounded event queue the I/O layer drains.
fn state(c: &Core) -> Footprint {
    Footprint { events: 0, ..c.server.footprint() }
}

/// Feeds bytes and returns whatever the core did, owned.
enum Did {
    Nothing,
    Reply(Resp),
    Relay(RelayId, SocketAddr, Vec<u8>),
}

fn feed_any(c: &mut Core, t: turnd::turn::FiveTuple, bytes: &[u8]) -> Did {
    match c.server.handle_client(t, bytes, c.now, &mut c.out, &mut c.relays) {
        Output::None => Did::Nothing,
        Output::Reply(b) => Did::Reply(Resp { bytes: b.to_vec() }),
        Output::Relay { relay, peer, data, .. } => Did::Relay(relay, peer, data.to_vec()),
    }
}

/// A client tuple with its own IP (the harness's `tuple` varies only the port).
fn tuple_at(client: &str) -> turnd::turn::FiveTuple {
    turnd::turn::FiveTuple { client: addr(client), server: addr("192.0.2.10:3478"), transport: Transport::Udp, conn: 0 }
}

/// A dual-stack (IPv4 + IPv6) allocation, so every address form reaches the policy.
fn dual_allocation(c: &mut Core, t: turnd::turn::FiveTuple, user: &str) -> Creds {
    let cr = c.rest_creds(t, user, 3600, SECRET);
    let fam = A::Raw(attr::ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0]);
    let r = c.request(t, method::ALLOCATE, &[transport_udp(), fam], Some(&cr));
    assert_eq!(r.class(), Class::Success, "{:?}", r.code());
    assert_eq!(r.addrs(attr::XOR_RELAYED_ADDRESS).len(), 2);
    cr
}

/// Relay ids of an allocation (IPv4, IPv6), found by relaying to public peers.
fn relay_ids(c: &mut Core, t: turnd::turn::FiveTuple, cr: &Creds) -> (RelayId, RelayId) {
    let (p4, p6) = (addr("8.8.8.8:9"), addr("[2606:4700::1111]:9"));
    for p in [p4, p6] {
        assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer_at(p)], Some(cr)).class(), Class::Success);
    }
    let mut id = |p| {
        let ind = send_ind(c, p, b"id");
        c.feed_relay(t, &ind).expect("public peer relays").0
    };
    (id(p4), id(p6))
}

// ---------------------------------------------------------------------------
// Peer policy on every peer-carrying path
// ---------------------------------------------------------------------------

/// Every refused address form, with why. Ports vary; for addresses that are
/// not ours the port never matters (50001 is inside the relay port range).
const REFUSED: &[(&str, &str)] = &[
    // IPv4 specials
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback, top of 127/8"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network 0/8"),
    ("10.0.0.1", "RFC 1918"),
    ("10.255.255.255", "RFC 1918"),
    ("172.16.0.1", "RFC 1918"),
    ("172.31.255.1", "RFC 1918"),
    ("192.168.1.1", "RFC 1918"),
    ("100.64.0.1", "shared address space (CGNAT)"),
    ("100.100.100.200", "Alibaba Cloud metadata (in 100.64/10)"),
    ("169.254.169.254", "link-local, cloud metadata"),
    ("169.254.0.1", "link-local"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.1", "benchmarking"),
    ("192.0.0.1", "IETF protocol assignments"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.1", "documentation"),
    ("203.0.113.1", "documentation"),
    ("192.88.99.1", "6to4 relay anycast"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast (SSDP)"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    // IPv6 specials
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fc00::1", "unique local"),
    ("fd00:ec2::254", "AWS metadata (unique local)"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast, global scope"),
    ("100::1", "discard-only"),
    ("2001:db8::1", "documentation"),
    ("2001:2::1", "benchmarking"),
    ("2001:10::1", "ORCHID"),
    ("2001:20::1", "ORCHIDv2"),
    ("3fff::1", "documentation"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("5f00::1", "SRv6"),
    // IPv4 inside IPv6
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:0.0.0.0", "IPv4-mapped unspecified"),
    ("::ffff:10.0.0.1", "IPv4-mapped RFC 1918"),
    ("::127.0.0.1", "IPv4-compatible loopback"),
    ("64:ff9b::7f00:1", "NAT64 loopback"),
    ("2002:7f00:1::1", "6to4 loopback"),
    ("::ffff:169.254.169.254", "IPv4-mapped metadata"),
    ("::169.254.169.254", "IPv4-compatible metadata"),
    ("64:ff9b::a9fe:a9fe", "NAT64 metadata"),
    ("2002:a9fe:a9fe::1", "6to4 metadata"),
    ("64:ff9b::a00:1", "NAT64 RFC 1918"),
    ("::ffff:100.100.100.200", "IPv4-mapped Alibaba metadata"),
    ("2002:c0a8:101::1", "6to4 RFC 1918"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo, client 127.0.0.1"),
    ("2001:0:a00:1:8000:63bf:3fff:fdd2", "Teredo, server 10.0.0.1"),
    ("2001:0:4136:e378:8000:63bf:5601:5601", "Teredo, client 169.254.169.254"),
];

/// The server's own addresses on ports that are not relay ports: its
/// listeners, metrics and admin API. 10.0.0.5 is the relay's local address,
/// 192.0.2.5 its external one (1:1 NAT), 2001:db8:5::5 its IPv6 address.
const OWN_PORTS: &[(&str, &str)] = &[
    ("192.0.2.5:3478", "own listener (external address)"),
    ("192.0.2.5:443", "own TLS listener"),
    ("192.0.2.5:9641", "own metrics and admin API"),
    ("192.0.2.5:49151", "just below the relay range"),
    ("10.0.0.5:3478", "own listener (local address)"),
    ("10.0.0.5:9641", "own metrics (local address)"),
    ("[::ffff:192.0.2.5]:3478", "own listener, IPv4-mapped"),
    ("[64:ff9b::c000:205]:9641", "own metrics, NAT64 form"),
    ("[2002:c000:205::1]:3478", "own listener, 6to4 form"),
    ("[2001:db8:5::5]:3478", "own IPv6 listener"),
    ("[2001:db8:5::5]:9641", "own IPv6 metrics"),
];

#[test]
fn every_refused_form_on_every_peer_path() {
    let mut c = Core::new();
    let t = tuple(41000);
    let cr = dual_allocation(&mut c, t, "mallory");
    let (r4, r6) = relay_ids(&mut c, t, &cr);
    let base = state(&c);
    let now = c.now.mono;
    for (ch, (ip, why)) in (0x4000u16..).zip(REFUSED) {
        let ip: IpAddr = ip.parse().unwrap();
        for port in [50001u16, 3478, 80] {
            let p = SocketAddr::new(ip, port);
            let r = c.request(t, method::CREATE_PERMISSION, &[peer_at(p)], Some(&cr));
            assert_eq!(r.code(), Some(403), "CreatePermission {p} ({why})");
            assert!(r.msg().verify_integrity(&cr.key), "the refusal is signed");
            let r = c.request(t, method::CHANNEL_BIND, &[channel(ch), peer_at(p)], Some(&cr));
            assert_eq!(r.code(), Some(403), "ChannelBind {p} ({why})");
            let ind = send_ind(&mut c, p, b"GET / HTTP/1.0\r\n\r\n");
            assert!(c.feed_relay(t, &ind).is_none(), "Send indication to {p} ({why})");
            // Nothing bound, so ChannelData on that number goes nowhere.
            assert!(c.feed_relay(t, &[(ch >> 8) as u8, ch as u8, 0, 1, 0x55, 0, 0, 0]).is_none(), "ChannelData {p}");
            // And that peer cannot send in.
            let relay = if ip.is_ipv4() { r4 } else { r6 };
            assert!(c.server.handle_peer(relay, p, b"in", now, &mut c.out).is_none(), "data from {p} ({why})");
        }
    }
    assert_eq!(state(&c), base, "no permission or channel was installed");
    assert!(c.server.stats.peer_refusals as usize >= 2 * 3 * REFUSED.len());
}

#[test]
fn own_listener_metrics_and_admin_ports_are_refused() {
    let mut c = Core::new();
    let t = tuple(41001);
    let cr = dual_allocation(&mut c, t, "mallory");
    for (ch, (p, why)) in (0x4100u16..).zip(OWN_PORTS) {
        let p = addr(p);
        let r = c.request(t, method::CHANNEL_BIND, &[channel(ch), peer_at(p)], Some(&cr));
        assert_eq!(r.code(), Some(403), "ChannelBind {p} ({why})");
        // Permissions are per IP (RFC 8656): our own IP is allowed so that two
        // allocations on this server can talk, but never on a non-relay port.
        let r = c.request(t, method::CREATE_PERMISSION, &[peer_at(p)], Some(&cr));
        assert_eq!(r.class(), Class::Success, "CreatePermission {p}: own addresses are permitted per IP");
        let ind = send_ind(&mut c, p, b"\x00\x01\x00\x00\x21\x12\xa4\x42binding-req!");
        assert!(c.feed_relay(t, &ind).is_none(), "Send indication to {p} ({why})");
        // With that permission, a relay port of the same address does relay.
        let relay_port = SocketAddr::new(p.ip(), 50001);
        let ind = send_ind(&mut c, relay_port, b"hi");
        assert!(c.feed_relay(t, &ind).is_some(), "{relay_port} is another allocation's relay port");
    }
}

#[test]
fn a_request_naming_several_peers_with_one_refused_fails_whole() {
    let mut c = Core::new();
    let t = tuple(41002);
    let cr = dual_allocation(&mut c, t, "mallory");
    let base = state(&c);
    let good = ["8.8.8.8:1", "1.1.1.1:1", "[2606:4700::1111]:1", "9.9.9.9:1"];
    for (bad, _) in REFUSED.iter().step_by(3) {
        let bad = SocketAddr::new(bad.parse().unwrap(), 1);
        // The refused one first, in the middle and last.
        for at in [0, 2, 4] {
            let mut peers: Vec<A> = good.iter().map(|g| peer_at(addr(g))).collect();
            peers.insert(at, peer_at(bad));
            let r = c.request(t, method::CREATE_PERMISSION, &peers, Some(&cr));
            assert_eq!(r.code(), Some(403), "{bad} at {at}");
        }
    }
    assert_eq!(state(&c), base, "all or nothing: none of the good peers was installed");
    let ind = send_ind(&mut c, addr("9.9.9.9:1"), b"x");
    assert!(c.feed_relay(t, &ind).is_none());
    // ChannelBind takes one peer; a second XOR-PEER-ADDRESS is ignored
    // (first of duplicates wins), and never installed.
    let r = c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer_at(addr("8.8.8.8:7")), peer_at(addr("127.0.0.1:7"))], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    let r = c.request(t, method::CHANNEL_BIND, &[channel(0x4001), peer_at(addr("127.0.0.1:7")), peer_at(addr("8.8.8.8:8"))], Some(&cr));
    assert_eq!(r.code(), Some(403));
    let a = c.server.allocations().next().unwrap();
    assert!(a.permissions.iter().all(|p| p.ip == "8.8.8.8".parse::<IpAddr>().unwrap()), "{:?}", a.permissions);
}

#[test]
fn relaying_between_two_allocations_on_this_server_keeps_working() {
    let mut c = Core::new();
    let (a, b) = (tuple(41003), tuple(41004));
    let ca = dual_allocation(&mut c, a, "alice");
    // Mallory on the same server hammers the policy first.
    let m = tuple(41005);
    let cm = dual_allocation(&mut c, m, "mallory");
    for (ip, _) in REFUSED {
        let p = SocketAddr::new(ip.parse().unwrap(), 50001);
        assert_eq!(c.request(m, method::CREATE_PERMISSION, &[peer_at(p)], Some(&cm)).code(), Some(403));
    }
    let (cb, rb) = c.allocate(b, "bob");
    let ra = c.server.allocations().find(|x| x.tuple == a).unwrap().v4.unwrap().advertised;
    // Both sides behind firewalls: each relays to the other's relayed address.
    assert_eq!(c.request(a, method::CHANNEL_BIND, &[channel(0x4000), peer_at(rb)], Some(&ca)).class(), Class::Success);
    assert_eq!(c.request(b, method::CREATE_PERMISSION, &[peer_at(ra)], Some(&cb)).class(), Class::Success);
    let now = c.now.mono;
    for i in 0..10u8 {
        // A -> B over ChannelData: leaves A's relay toward B's local relay address.
        let (relay_a, to, d) = c.feed_relay(a, &[0x40, 0x00, 0x00, 0x01, i, 0, 0, 0]).expect("A relays to B");
        assert_eq!((to, d), (SocketAddr::new("10.0.0.5".parse().unwrap(), rb.port()), vec![i]));
        let ind = send_ind(&mut c, ra, &[i]);
        let relay_b = c.feed_relay(b, &ind).expect("B relays to A").0;
        // B's relay socket receives from A's local address; B sees A's advertised one.
        let from_a = SocketAddr::new("10.0.0.5".parse().unwrap(), ra.port());
        let (to, bytes) = c.server.handle_peer(relay_b, from_a, &[i], now, &mut c.out).expect("delivered to B");
        assert_eq!(to, b);
        let msg = Message::parse(bytes).unwrap();
        assert_eq!(attr::decode_xor_address(msg.get(attr::XOR_PEER_ADDRESS).unwrap(), msg.transaction_id()), Some(ra));
        // B -> A arrives on A's channel.
        let from_b = SocketAddr::new("10.0.0.5".parse().unwrap(), rb.port());
        let (to, bytes) = c.server.handle_peer(relay_a, from_b, &[i], now, &mut c.out).expect("delivered to A");
        assert_eq!(to, a);
        assert_eq!(ChannelData::parse(bytes).map(|cd| (cd.channel, cd.data.to_vec())), Some((0x4000, vec![i])));
    }
}

// ---------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------

use turnd::auth::AuthFailure;

/// An Allocate with `username` signed with the REST password under `secret`:
/// the answer's error code (None on success).
fn allocate_as(c: &mut Core, t: turnd::turn::FiveTuple, username: &str, secret: &[u8]) -> Option<u16> {
    let cr = c.creds_for(t, username, &rest_password(secret, username));
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
    if r.class() == Class::Success {
        // Free the 5-tuple for the next case.
        let del = c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 0)], Some(&cr));
        assert_eq!(del.class(), Class::Success);
        return None;
    }
    assert!(r.msg().get(attr::MESSAGE_INTEGRITY).is_none(), "an auth failure is not signed");
    r.code()
}

#[test]
fn rest_usernames_expiry_forms() {
    let mut c = Core::new();
    let t = tuple(42000);
    let now = c.now.unix;
    let failures = |c: &Core, f: AuthFailure| c.server.stats.auth_failures[f as usize];
    let cases: Vec<(String, Option<u16>, Option<AuthFailure>, &str)> = vec![
        (format!("{}:alice", now + 600), None, None, "valid"),
        (format!("{now}:alice"), None, None, "expires this second: still valid"),
        (format!("{}:alice", now - 1), Some(401), Some(AuthFailure::Expired), "expired a second ago"),
        (format!("{}", now - 86_400), Some(401), Some(AuthFailure::Expired), "expired, no user part"),
        ("0:alice".into(), Some(401), Some(AuthFailure::Expired), "epoch"),
        ("abc:alice".into(), Some(401), Some(AuthFailure::UnknownUser), "non-numeric"),
        (format!("{}x:alice", now + 600), Some(401), Some(AuthFailure::UnknownUser), "trailing garbage"),
        (format!("0x{:x}:alice", now + 600), Some(401), Some(AuthFailure::UnknownUser), "hex"),
        (format!("-{}:alice", now + 600), Some(401), Some(AuthFailure::UnknownUser), "negative"),
        ("-1:alice".into(), Some(401), Some(AuthFailure::UnknownUser), "minus one"),
        (format!("+{}:alice", now + 600), Some(401), Some(AuthFailure::UnknownUser), "plus sign"),
        (format!(" {}:alice", now + 600), Some(401), Some(AuthFailure::UnknownUser), "leading space"),
        ("18446744073709551616:alice".into(), Some(401), Some(AuthFailure::UnknownUser), "2^64"),
        ("99999999999999999999999999:alice".into(), Some(401), Some(AuthFailure::UnknownUser), "far past 64 bits"),
        ("340282366920938463463374607431768211456:alice".into(), Some(401), Some(AuthFailure::UnknownUser), "2^128"),
        // The issuer's signature vouches for the expiry, however far: no overflow.
        ("18446744073709551615:alice".into(), None, None, "u64::MAX, signed"),
        (format!("000{}:alice", now + 600), None, None, "leading zeros"),
        (format!("alice:{}", now + 600), Some(401), Some(AuthFailure::UnknownUser), "user:expiry order"),
        (":alice".into(), Some(401), Some(AuthFailure::UnknownUser), "empty expiry"),
        (":".into(), Some(401), Some(AuthFailure::UnknownUser), "just a colon"),
        ("".into(), Some(401), Some(AuthFailure::UnknownUser), "empty username"),
        ("\u{0661}\u{0662}\u{0663}:alice".into(), Some(401), Some(AuthFailure::UnknownUser), "non-ASCII digits"),
        (format!("{}:{}", now + 600, "a".repeat(480)), None, None, "long user part (under 509 bytes)"),
        (format!("{}:{}", now + 600, "a".repeat(600)), Some(400), Some(AuthFailure::BadRequest), "USERNAME over 508 bytes"),
    ];
    for (username, want, reason, why) in cases {
        let before = reason.map(|f| failures(&c, f));
        assert_eq!(allocate_as(&mut c, t, &username, SECRET), want, "{why}: {username:?}");
        if let (Some(f), Some(b)) = (reason, before) {
            assert_eq!(failures(&c, f), b + 1, "{why}: counted as {f:?}");
        }
    }
    assert_eq!(c.server.allocation_count(), 0);
    assert_eq!(state(&c), Footprint::default());
}

#[test]
fn realm_nonce_and_integrity_forms() {
    let mut c = Core::new();
    let t = tuple(42001);
    let good = c.rest_creds(t, "bob", 3600, SECRET);
    let code = |c: &mut Core, t, cr: &Creds| c.request(t, method::ALLOCATE, &[transport_udp()], Some(cr)).code();
    // Wrong realm (key computed for it, so only the realm is wrong): 401 with ours.
    let mut wrong_realm = good.clone();
    wrong_realm.realm = "evil.example".into();
    wrong_realm.key = long_term_key(&good.username, "evil.example", &rest_password(SECRET, &good.username));
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&wrong_realm));
    assert_eq!(r.code(), Some(401));
    assert_eq!(r.get(attr::REALM), Some(REALM.as_bytes().to_vec()));
    // Realm differing only in case or trailing bytes.
    for realm in ["EXAMPLE.ORG", "example.org.", "example.org\0"] {
        let mut cr = good.clone();
        cr.realm = realm.into();
        assert_eq!(code(&mut c, t, &cr), Some(401), "realm {realm:?}");
    }
    // Forged, truncated, empty, overlong and non-base64 nonces: 438 with a fresh one.
    let mut flipped = good.nonce.clone();
    flipped[15] = if flipped[15] == b'A' { b'B' } else { b'A' };
    let mut extended = good.nonce.clone();
    extended.extend_from_slice(b"AAAA");
    for (nonce, why) in [(flipped, "one character changed"), (good.nonce[..15].to_vec(), "truncated"), (vec![], "empty"), (extended, "overlong"), (b"!!!!!!!!!!!!!!!!".to_vec(), "not base64")] {
        let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&Creds { nonce, ..good.clone() }));
        assert_eq!(r.code(), Some(438), "{why}");
        assert_eq!(r.get(attr::NONCE).map(|n| n.len()), Some(16), "{why}: a fresh nonce");
    }
    // A nonce issued to another client address: 438, on IPv4 and IPv6.
    for other in ["198.51.100.8:42001", "[2001:db8::7]:42001"] {
        let o = tuple_at(other);
        assert_eq!(code(&mut c, o, &good), Some(438), "nonce from {other}");
    }
    // The same IP on another port may use it (nonces bind the IP, as NAT rebinding needs).
    assert_eq!(code(&mut c, tuple(42002), &good), None);
    // Stale: issued 600 s ago, valid until then, 438 after; retry with the new one works.
    let t3 = tuple(42003);
    let old = c.rest_creds(t3, "bob", 7200, SECRET);
    c.advance(600);
    let r = c.request(t3, method::REFRESH, &[], Some(&old));
    assert_eq!(r.code(), Some(437), "at 600 s the nonce is still good (no allocation: 437)");
    c.advance(1);
    let r = c.request(t3, method::ALLOCATE, &[transport_udp()], Some(&old));
    assert_eq!(r.code(), Some(438));
    let fresh = Creds { nonce: r.get(attr::NONCE).unwrap(), ..old };
    assert_eq!(code(&mut c, t3, &fresh), None);
    // Integrity attributes of the wrong size never verify and never panic.
    let t4 = tuple(42004);
    let cr = c.rest_creds(t4, "bob", 3600, SECRET);
    for (typ, len) in [(attr::MESSAGE_INTEGRITY, 0), (attr::MESSAGE_INTEGRITY, 19), (attr::MESSAGE_INTEGRITY, 21), (attr::MESSAGE_INTEGRITY_SHA256, 12), (attr::MESSAGE_INTEGRITY_SHA256, 18), (attr::MESSAGE_INTEGRITY_SHA256, 36)] {
        let tid = c.next_tid();
        let mut buf = vec![0u8; 512];
        let n = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, &tid)
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::USERNAME, cr.username.as_bytes())
            .attr(attr::REALM, cr.realm.as_bytes())
            .attr(attr::NONCE, &cr.nonce)
            .attr(typ, &vec![0xAB; len])
            .finish()
            .unwrap();
        assert_eq!(c.feed(t4, &buf[..n]).and_then(|r| r.code()), Some(401), "{typ:#x} of {len} bytes");
    }
    // SHA-256 integrity truncated to 16 bytes (RFC 8489 allows it) is accepted... when correct.
    let tid = c.next_tid();
    let mut buf = vec![0u8; 512];
    let n = {
        let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, &tid);
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).attr(attr::USERNAME, cr.username.as_bytes()).attr(attr::REALM, cr.realm.as_bytes()).attr(attr::NONCE, &cr.nonce);
        w.finish().unwrap()
    };
    let mut full = buf[..n].to_vec();
    let len = (n - 20 + 4 + 16) as u16;
    full[2..4].copy_from_slice(&len.to_be_bytes());
    let mac = turnd::stun::integrity::hmac_sha256(&cr.key, &[&full]);
    full.extend_from_slice(&[0x00, 0x1C, 0x00, 0x10]);
    full.extend_from_slice(&mac[..16]);
    let r = c.feed(t4, &full).unwrap();
    assert_eq!(r.class(), Class::Success, "truncated SHA-256 integrity: {:?}", r.code());
    // Integrity present but USERNAME, REALM or NONCE missing, or USERNAME not UTF-8: 400.
    let t5 = tuple(42005);
    let cr = c.rest_creds(t5, "bob", 3600, SECRET);
    let parts: [(u16, Vec<u8>); 3] = [(attr::USERNAME, cr.username.clone().into_bytes()), (attr::REALM, cr.realm.clone().into_bytes()), (attr::NONCE, cr.nonce.clone())];
    // Case 3: USERNAME that is not UTF-8.
    for skip in 0..4 {
        let tid = c.next_tid();
        let mut buf = vec![0u8; 512];
        let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, &tid);
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        for (i, (typ, v)) in parts.iter().enumerate() {
            match (i, skip) {
                (0, 3) => {
                    w.attr(attr::USERNAME, &[0xFF, 0xFE, 0xFD]);
                }
                (i, s) if i == s => {}
                _ => {
                    w.attr(*typ, v);
                }
            }
        }
        w.integrity(&cr.key);
        let n = w.finish().unwrap();
        assert_eq!(c.feed(t5, &buf[..n]).and_then(|r| r.code()), Some(400), "case {skip}");
    }
    assert_eq!(c.server.stats.allocations_created, 3, "only the three good credentials allocated");
}

#[test]
fn secret_rotation_old_and_new() {
    const OLD: &[u8] = b"old-secret";
    const NEW: &[u8] = b"new-secret";
    let nonce_key = || NonceKey::new([9; 32], 600);
    let mut c = Core::with(config(), policy(), vec![OLD.to_vec()]);
    let (a, b) = (tuple(42010), tuple(42011));
    // A is on the old secret, with a channel to a public peer.
    let ca = c.rest_creds(a, "alice", 3600, OLD);
    assert_eq!(c.request(a, method::ALLOCATE, &[transport_udp()], Some(&ca)).class(), Class::Success);
    assert_eq!(c.request(a, method::CHANNEL_BIND, &[channel(0x4000), peer_at(addr("8.8.8.8:53"))], Some(&ca)).class(), Class::Success);
    // Rotation starts: new secret first (what turnctl signs with), old still listed.
    c.server.reconfigure(config(), Authenticator::new(REALM, vec![NEW.to_vec(), OLD.to_vec()], &[], nonce_key()), policy(), c.now.mono);
    let cb = c.rest_creds(b, "bob", 3600, NEW);
    assert_eq!(c.request(b, method::ALLOCATE, &[transport_udp()], Some(&cb)).class(), Class::Success);
    assert_eq!(c.request(a, method::REFRESH, &[], Some(&ca)).class(), Class::Success, "old credentials still refresh");
    // Rotation ends: the old secret is gone.
    c.server.reconfigure(config(), Authenticator::new(REALM, vec![NEW.to_vec()], &[], nonce_key()), policy(), c.now.mono);
    assert_eq!(c.request(a, method::REFRESH, &[], Some(&ca)).code(), Some(401), "old credentials are refused");
    assert_eq!(c.request(b, method::REFRESH, &[], Some(&cb)).class(), Class::Success);
    let carol = format!("{}:carol", c.now.unix + 60);
    assert_eq!(allocate_as(&mut c, tuple(42012), &carol, OLD), Some(401));
    assert_eq!(allocate_as(&mut c, tuple(42012), &carol, NEW), None);
    // A's allocation keeps relaying until it expires (ChannelData carries no credentials).
    assert!(c.feed_relay(a, &[0x40, 0x00, 0x00, 0x01, 9, 0, 0, 0]).is_some());
    assert_eq!(c.server.allocation_count(), 2);
}

// ---------------------------------------------------------------------------
// Protocol edge cases
// ---------------------------------------------------------------------------

/// Sets the STUN length field to `len`.
fn with_len(mut b: Vec<u8>, len: u16) -> Vec<u8> {
    b[2..4].copy_from_slice(&len.to_be_bytes());
    b
}

/// What the core sent to a client must frame exactly on a stream: a STUN
/// message whose length field covers it, or ChannelData (padded on streams).
fn assert_frames(bytes: &[u8], stream: bool) {
    if ChannelData::is_channel_data(bytes) {
        let cd = ChannelData::parse(bytes).expect("ChannelData parses");
        let want = if stream { (4 + cd.data.len() + 3) & !3 } else { 4 + cd.data.len() };
        assert_eq!(bytes.len(), want);
    } else {
        let m = Message::parse(bytes).expect("a STUN message whose length field matches");
        assert_eq!(m.bytes().len(), bytes.len());
    }
    if stream || !ChannelData::is_channel_data(bytes) {
        assert_eq!(turnd::stun::frame_len(bytes), turnd::stun::FrameLen::Complete(bytes.len()), "frames exactly");
    }
}

#[test]
fn length_fields_near_65535() {
    let mut c = Core::new();
    let t = tuple(43000);
    let (cr, _) = c.allocate(t, "len");
    let p = addr("8.8.8.8:5004");
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer_at(p)], Some(&cr)).class(), Class::Success);
    // The largest Send indication: length 65532 (XOR-PEER-ADDRESS 12 + DATA 4 + 65516).
    let tid = c.next_tid();
    let big = build(method::SEND, Class::Indication, tid, &[peer_at(p), data(&vec![0x5A; 65516])], None, false);
    assert_eq!(big.len(), 20 + 65532);
    match feed_any(&mut c, t, &big) {
        Did::Relay(_, to, d) => assert_eq!((to, d.len()), (p, 65516)),
        _ => panic!("the largest legal Send indication relays"),
    }
    // Length fields that disagree with the datagram, or are not a multiple of 4.
    let mut exact_65535 = with_len(big.clone(), 0xFFFF);
    exact_65535.extend_from_slice(&[0; 3]);
    let variants = [
        with_len(big.clone(), 0xFFFF),
        with_len(big.clone(), 65533),
        with_len(big.clone(), 65528),
        big[..big.len() - 4].to_vec(),
        big[..big.len() - 1].to_vec(),
        exact_65535,
        [&big[..], &[0; 4]].concat(),
    ];
    for b in variants {
        let len = u16::from_be_bytes([b[2], b[3]]);
        assert!(matches!(feed_any(&mut c, t, &b), Did::Nothing), "length {len}, {} bytes", b.len());
    }
    // An attribute claiming 65535 bytes inside a short message.
    let mut b = build(method::SEND, Class::Indication, tid, &[peer_at(p), data(b"short")], None, false);
    let at = 20 + 12;
    b[at + 2..at + 4].copy_from_slice(&0xFFFFu16.to_be_bytes());
    assert!(matches!(feed_any(&mut c, t, &b), Did::Nothing));
    // A 65 KB authenticated request (padded with an optional attribute) is handled.
    let pad = A::Raw(0x8888, vec![0; 65_000]);
    let b = build(method::REFRESH, Class::Request, c.next_tid(), &[pad], Some(&cr), true);
    assert_eq!(c.feed(t, &b).unwrap().class(), Class::Success);
    // Peer data of every size up to 65535 comes out as a well-framed message,
    // or not at all: never a message whose length field wrapped around.
    let now = c.now.mono;
    let ind = send_ind(&mut c, p, b"x");
    let relay = match feed_any(&mut c, t, &ind) {
        Did::Relay(r, ..) => r,
        _ => panic!(),
    };
    for n in [0usize, 1, 65_000, 65_507, 65_512, 65_516, 65_517, 65_527, 65_535] {
        let d = vec![7u8; n];
        if let Some((_, bytes)) = c.server.handle_peer(relay, p, &d, now, &mut c.out) {
            assert_frames(bytes, false);
            let m = Message::parse(bytes).unwrap();
            assert_eq!(m.get(attr::DATA).map(|v| v.len()), Some(n));
        } else {
            assert!(n > 65_516, "{n} bytes fit a Data indication");
        }
    }
    // With a channel, ChannelData carries up to 65535 bytes (padded on streams).
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer_at(p)], Some(&cr)).class(), Class::Success);
    for n in [0usize, 3, 65_535] {
        let (_, bytes) = c.server.handle_peer(relay, p, &vec![1u8; n], now, &mut c.out).expect("ChannelData");
        assert_frames(bytes, false);
    }
}

#[test]
fn ipv6_peer_data_that_does_not_fit_a_data_indication_is_dropped() {
    // Regression: 65527 bytes from an IPv6 peer (the largest IPv6 UDP payload)
    // made a 65576-byte Data indication whose 16-bit length field wrapped to
    // 20; on TCP/TLS the client would then parse the peer's bytes as messages
    // of their own (forged Data indications, ChannelData).
    for transport in [Transport::Udp, Transport::Tcp] {
        let mut c = Core::new();
        let mut t = tuple(43001);
        t.transport = transport;
        let cr = c.rest_creds(t, "v6", 3600, SECRET);
        let v6 = A::Raw(attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0]);
        assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp(), v6], Some(&cr)).class(), Class::Success);
        let p = addr("[2606:4700::1111]:443");
        assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer_at(p)], Some(&cr)).class(), Class::Success);
        let ind = send_ind(&mut c, p, b"x");
        let (relay, ..) = c.feed_relay(t, &ind).unwrap();
        let mut forged = vec![0u8; 65_527];
        // What the peer would like the client to see as a second message.
        forged[..8].copy_from_slice(&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]);
        let now = c.now.mono;
        for n in [65_504, 65_527] {
            match c.server.handle_peer(relay, p, &forged[..n], now, &mut c.out) {
                Some((_, bytes)) => assert_frames(bytes, transport.is_stream()),
                None => assert!(n > 65_504, "{n}"),
            }
        }
        assert!(c.server.stats.dropped_malformed >= 1);
    }
    // The writer itself refuses a message over 65552 bytes.
    let mut buf = vec![0u8; 70_000];
    let mut w = MessageWriter::new(&mut buf, method::DATA, Class::Indication, &[0; 12]);
    w.attr(attr::DATA, &[0u8; 65_535]);
    assert!(w.finish().is_err());
    let mut w = MessageWriter::new(&mut buf, method::DATA, Class::Indication, &[0; 12]);
    w.attr(attr::DATA, &[0u8; 65_528]).fingerprint();
    assert!(w.finish().is_err(), "FINGERPRINT past the limit");
    let mut w = MessageWriter::new(&mut buf, method::DATA, Class::Indication, &[0; 12]);
    w.attr(attr::DATA, &[0u8; 65_528]);
    assert_eq!(w.finish(), Ok(turnd::stun::MAX_MESSAGE));
}

#[test]
fn truncated_and_overrunning_attributes() {
    let mut c = Core::new();
    let t = tuple(43002);
    let cr = c.rest_creds(t, "trunc", 3600, SECRET);
    let tid = c.next_tid();
    // No FINGERPRINT: cutting it off alone would leave a valid signed request.
    let full = build(method::ALLOCATE, Class::Request, tid, &[transport_udp(), A::U32(attr::LIFETIME, 600)], Some(&cr), false);
    for cut in 1..full.len() - 20 {
        let mut b = full[..full.len() - cut].to_vec();
        // Truncated with the length field left alone, and with it patched to match.
        let _ = feed_any(&mut c, t, &b);
        let len = (b.len() - 20) as u16;
        b[2..4].copy_from_slice(&len.to_be_bytes());
        if let Did::Reply(r) = feed_any(&mut c, t, &b) {
            assert_ne!(r.class(), Class::Success, "cut {cut}: a truncated request never succeeds");
        }
    }
    // Each attribute's length field grown or shrunk by 4: dropped or refused.
    let mut at = 20;
    while at + 4 <= full.len() {
        let vlen = u16::from_be_bytes([full[at + 2], full[at + 3]]);
        for delta in [4i32, -4, 1, 0xFFFF] {
            let v = vlen as i32 + delta;
            if !(0..=0xFFFF).contains(&v) {
                continue;
            }
            let mut b = full.clone();
            b[at + 2..at + 4].copy_from_slice(&(v as u16).to_be_bytes());
            if let Did::Reply(r) = feed_any(&mut c, t, &b) {
                assert_ne!(r.class(), Class::Success, "attribute at {at} length {v}");
            }
        }
        at += 4 + ((vlen as usize + 3) & !3);
    }
    assert_eq!(state(&c), Footprint::default());
    // Many attributes (no fixed cap: 33, 1,000) are answered.
    let many = |n: usize| (0..n).map(|i| A::Raw(0x8100 + i as u16, vec![])).collect::<Vec<_>>();
    for n in [32, 33, 1000] {
        let b = build(method::BINDING, Class::Request, tid, &many(n), None, false);
        assert!(matches!(feed_any(&mut c, t, &b), Did::Reply(_)), "{n} attributes");
    }
    // Still intact: the untouched request allocates.
    assert_eq!(c.feed(t, &full).unwrap().class(), Class::Success);
}

#[test]
fn channel_data_lengths_and_numbers() {
    let mut c = Core::new();
    let t = tuple(43003);
    let (cr, _) = c.allocate(t, "chan");
    let p = addr("8.8.8.8:7000");
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peer_at(p)], Some(&cr)).class(), Class::Success);
    let malformed = c.server.stats.dropped_malformed;
    // Length beyond the datagram, header cut short: dropped as malformed.
    for b in [&[0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4][..], &[0x40, 0x00, 0xFF, 0xFF, 1][..], &[0x40, 0x00, 0x00][..], &[0x40][..]] {
        assert!(c.feed_relay(t, b).is_none(), "{b:?}");
    }
    assert_eq!(c.server.stats.dropped_malformed, malformed + 4);
    // Shorter than the datagram (UDP padding, or junk): only the declared bytes go.
    assert_eq!(c.feed_relay(t, &[0x40, 0x00, 0x00, 0x02, 1, 2, 3, 4, 5, 6, 7, 8]).map(|r| r.2), Some(vec![1, 2]));
    assert_eq!(c.feed_relay(t, &[0x40, 0x00, 0x00, 0x00]).map(|r| r.2), Some(vec![]));
    // Numbers that are not bound, inside or outside 0x4000-0x4FFF: dropped.
    for n in [0x4001u16, 0x4FFF, 0x5000, 0x7FFF] {
        let h = n.to_be_bytes();
        assert!(c.feed_relay(t, &[h[0], h[1], 0, 1, 9, 0, 0, 0]).is_none(), "{n:#x}");
    }
    // A first byte of 0x80-0xFF is neither ChannelData nor STUN.
    assert!(c.feed(t, &[0x80, 0x00, 0x00, 0x01, 9, 0, 0, 0]).is_none());
    assert!(c.feed(t, &[0xFF; 20]).is_none());
    // ChannelBind outside 0x4000-0x4FFF, or a CHANNEL-NUMBER of the wrong size: 400.
    for n in [0x0000u16, 0x0001, 0x3FFF, 0x5000, 0x6FFF, 0x7FFF, 0x8000, 0xBFFF, 0xFFFF] {
        let r = c.request(t, method::CHANNEL_BIND, &[channel(n), peer_at(addr("8.8.4.4:1"))], Some(&cr));
        assert_eq!(r.code(), Some(400), "{n:#x}");
    }
    for v in [vec![0x40, 0x01], vec![0x40, 0x01, 0, 0, 0, 0, 0, 0], vec![]] {
        let r = c.request(t, method::CHANNEL_BIND, &[A::Raw(attr::CHANNEL_NUMBER, v.clone()), peer_at(addr("8.8.4.4:1"))], Some(&cr));
        assert_eq!(r.code(), Some(400), "{v:?}");
    }
    // RFFU bytes are ignored (RFC 8656 14.1).
    let r = c.request(t, method::CHANNEL_BIND, &[A::Raw(attr::CHANNEL_NUMBER, vec![0x40, 0x02, 0xFF, 0xFF]), peer_at(addr("8.8.4.4:1"))], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    // Malformed XOR-PEER-ADDRESS: unknown family, wrong length.
    for v in [vec![0, 3, 0, 1, 1, 2, 3, 4], vec![0, 1, 0, 1, 1, 2, 3], vec![0, 2, 0, 1, 1, 2, 3, 4], vec![]] {
        let r = c.request(t, method::CHANNEL_BIND, &[channel(0x4003), A::Raw(attr::XOR_PEER_ADDRESS, v.clone())], Some(&cr));
        assert_eq!(r.code(), Some(400), "{v:?}");
        let r = c.request(t, method::CREATE_PERMISSION, &[A::Raw(attr::XOR_PEER_ADDRESS, v.clone())], Some(&cr));
        assert_eq!(r.code(), Some(400), "{v:?}");
    }
    // Stream framing: ChannelData is padded to 4, STUN lengths must be multiples of 4.
    use turnd::stun::{frame_len, FrameLen};
    assert_eq!(frame_len(&[0x40, 0x00, 0x00, 0x05]), FrameLen::Incomplete);
    assert_eq!(frame_len(&[0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0]), FrameLen::Complete(12));
    assert_eq!(frame_len(&[0x40, 0x00, 0xFF, 0xFF]), FrameLen::Incomplete);
    assert_eq!(frame_len(&[0x00, 0x01, 0x00, 0x03]), FrameLen::Invalid);
    assert_eq!(frame_len(&[0x80, 0x01, 0x00, 0x04]), FrameLen::Invalid);
}

#[test]
fn lifetime_extremes() {
    let mut c = Core::new();
    let lt = |r: &Resp| r.lifetime();
    for (i, (req, want)) in [(0u32, Some(600u32)), (1, Some(600)), (u32::MAX, Some(3600)), (u32::MAX - 1, Some(3600))].into_iter().enumerate() {
        let t = tuple(43100 + i as u16);
        let cr = c.rest_creds(t, "life", 3600, SECRET);
        let r = c.request(t, method::ALLOCATE, &[transport_udp(), A::U32(attr::LIFETIME, req)], Some(&cr));
        assert_eq!(lt(&r), want, "Allocate LIFETIME {req}");
        let r = c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, req)], Some(&cr));
        if req == 0 {
            assert_eq!(lt(&r), Some(0), "Refresh 0 deletes");
        } else {
            assert_eq!(lt(&r), want, "Refresh LIFETIME {req}: min(requested, max), at least the default");
        }
    }
    assert_eq!(c.server.allocation_count(), 3);
    // A LIFETIME that is not 4 bytes: 400, on Allocate and Refresh.
    let t = tuple(43200);
    let cr = c.rest_creds(t, "life", 3600, SECRET);
    for v in [vec![], vec![0, 0, 1], vec![0, 0, 0, 0, 0, 0, 2, 0]] {
        let r = c.request(t, method::ALLOCATE, &[transport_udp(), A::Raw(attr::LIFETIME, v.clone())], Some(&cr));
        assert_eq!(r.code(), Some(400), "Allocate LIFETIME {v:?}");
    }
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).class(), Class::Success);
    let r = c.request(t, method::REFRESH, &[A::Raw(attr::LIFETIME, vec![0, 0, 1])], Some(&cr));
    assert_eq!(r.code(), Some(400));
    // u32::MAX seconds on the clock does not overflow expiry: after an hour it is gone.
    c.advance(3601);
    assert_eq!(c.server.allocation_count(), 0);
    assert!(c.relays.open.is_empty());
}

#[test]
fn requested_transport_other_than_udp() {
    let mut c = Core::new();
    let t = tuple(43300);
    let cr = c.rest_creds(t, "rt", 3600, SECRET);
    for proto in [6u8, 0, 1, 41, 132, 255] {
        let r = c.request(t, method::ALLOCATE, &[A::Raw(attr::REQUESTED_TRANSPORT, vec![proto, 0, 0, 0])], Some(&cr));
        assert_eq!(r.code(), Some(442), "protocol {proto}");
    }
    for v in [vec![], vec![17], vec![17, 0, 0], vec![17, 0, 0, 0, 0, 0, 0, 0]] {
        let r = c.request(t, method::ALLOCATE, &[A::Raw(attr::REQUESTED_TRANSPORT, v.clone())], Some(&cr));
        assert_eq!(r.code(), Some(400), "{v:?}");
    }
    assert_eq!(c.request(t, method::ALLOCATE, &[], Some(&cr)).code(), Some(400), "missing");
    assert_eq!(state(&c), Footprint::default());
    // RFFU bytes are ignored.
    let r = c.request(t, method::ALLOCATE, &[A::Raw(attr::REQUESTED_TRANSPORT, vec![17, 1, 2, 3])], Some(&cr));
    assert_eq!(r.class(), Class::Success);
}

#[test]
fn duplicate_attributes_first_one_wins() {
    let mut c = Core::new();
    let tcp = || A::Raw(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0]);
    let t = tuple(43400);
    let cr = c.rest_creds(t, "dup", 3600, SECRET);
    assert_eq!(c.request(t, method::ALLOCATE, &[tcp(), transport_udp()], Some(&cr)).code(), Some(442));
    let v4 = || A::Raw(attr::REQUESTED_ADDRESS_FAMILY, vec![1, 0, 0, 0]);
    let v6 = || A::Raw(attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0]);
    let r = c.request(t, method::ALLOCATE, &[transport_udp(), tcp(), A::U32(attr::LIFETIME, 1200), A::U32(attr::LIFETIME, 60), v4(), v6()], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.lifetime(), Some(1200));
    assert!(r.addr(attr::XOR_RELAYED_ADDRESS).unwrap().is_ipv4());
    // Duplicate CHANNEL-NUMBER: the first; duplicate peers in CreatePermission: one permission.
    let p = addr("8.8.8.8:1");
    let r = c.request(t, method::CHANNEL_BIND, &[channel(0x4005), channel(0x3000), peer_at(p)], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    assert!(c.feed_relay(t, &[0x40, 0x05, 0, 1, 1, 0, 0, 0]).is_some());
    let same: Vec<A> = (0..20).map(|_| peer_at(addr("9.9.9.9:1"))).collect();
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &same, Some(&cr)).class(), Class::Success);
    assert_eq!(state(&c).permissions, 2);
    // Duplicate DATA in a Send indication: the first.
    let tid = c.next_tid();
    let ind = c.build(method::SEND, Class::Indication, tid, &[peer_at(p), data(b"first"), data(b"second")], None, false);
    assert_eq!(c.feed_relay(t, &ind).map(|r| r.2), Some(b"first".to_vec()));
    // Duplicate USERNAME/REALM/NONCE: the first set is what is checked.
    let tid = c.next_tid();
    let mut buf = vec![0u8; 1024];
    let n = MessageWriter::new(&mut buf, method::REFRESH, Class::Request, &tid)
        .attr(attr::USERNAME, cr.username.as_bytes())
        .attr(attr::USERNAME, b"1:someone-else")
        .attr(attr::REALM, cr.realm.as_bytes())
        .attr(attr::REALM, b"other")
        .attr(attr::NONCE, &cr.nonce)
        .attr(attr::NONCE, b"AAAAAAAAAAAAAAAA")
        .integrity(&cr.key)
        .finish()
        .unwrap();
    assert_eq!(c.feed(t, &buf[..n]).unwrap().class(), Class::Success);
    // Two MESSAGE-INTEGRITY: what follows the first is ignored (RFC 8489 14.5).
    let mut b = build(method::REFRESH, Class::Request, c.next_tid(), &[], Some(&cr), false);
    b.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    b.extend_from_slice(&[0xEE; 20]);
    let b = with_len(b.clone(), (b.len() - 20) as u16);
    assert_eq!(c.feed(t, &b).unwrap().class(), Class::Success);
    // Two FINGERPRINTs: malformed, dropped.
    let mut b = build(method::BINDING, Class::Request, c.next_tid(), &[], None, true);
    let fp = b[b.len() - 8..].to_vec();
    b.extend_from_slice(&fp);
    let b = with_len(b.clone(), (b.len() - 20) as u16);
    assert!(c.feed(t, &b).is_none());
    // Duplicate LIFETIME on Refresh: the first (0) deletes.
    let r = c.request(t, method::REFRESH, &[A::U32(attr::LIFETIME, 0), A::U32(attr::LIFETIME, 3600)], Some(&cr));
    assert_eq!(r.lifetime(), Some(0));
    assert_eq!(c.server.allocation_count(), 0);
}

#[test]
fn odd_classes_methods_and_unknown_attributes() {
    let mut c = Core::new();
    let t = tuple(43500);
    let (cr, _) = c.allocate(t, "odd");
    // Requests of the wrong class are ignored: no answer, no state.
    for class in [Class::Indication, Class::Success, Class::Error] {
        for m in [method::ALLOCATE, method::REFRESH, method::CREATE_PERMISSION, method::CHANNEL_BIND, method::BINDING, method::DATA] {
            let tid = c.next_tid();
            let b = c.build(m, class, tid, &[transport_udp(), peer_at(addr("8.8.8.8:1"))], Some(&cr), false);
            assert!(matches!(feed_any(&mut c, t, &b), Did::Nothing), "{m:#x} as {class:?}");
        }
    }
    // Unknown methods: 400, unsigned.
    for m in [0x000u16, 0x002, 0x005, 0x00A, 0x0FF, 0xFFF] {
        let r = c.request(t, m, &[], None);
        assert_eq!(r.code(), Some(400), "method {m:#x}");
    }
    // Unknown comprehension-required attributes: 420 listing them (at most 8).
    let unknown: Vec<A> = (0..12u16).map(|i| A::Raw(0x7000 + i, vec![0; 4])).collect();
    let r = c.request(t, method::BINDING, &unknown, None);
    assert_eq!(r.code(), Some(420));
    assert_eq!(r.get(attr::UNKNOWN_ATTRIBUTES).map(|v| v.len()), Some(16));
    let r = c.request(t, method::REFRESH, &[A::Raw(0x0003, vec![0; 4])], Some(&cr));
    assert_eq!(r.code(), Some(420), "CHANGE-REQUEST (RFC 5780) is not ours");
    assert!(r.msg().verify_integrity(&cr.key), "a 420 after authentication is signed");
    assert_eq!(c.server.allocation_count(), 1);
}

// ---------------------------------------------------------------------------
// Amplification and the unauthenticated rate limit
// ---------------------------------------------------------------------------

/// The unauthenticated requests an attacker can send from a spoofed source,
/// as (name, client, bytes). Built from `c` (for nonces and keys).
fn unauthenticated_requests(c: &mut Core) -> Vec<(&'static str, turnd::turn::FiveTuple, Vec<u8>)> {
    let v4 = tuple_at("198.51.100.20:5000");
    let v6 = tuple_at("[2001:db8:77::20]:5000");
    let mut tid = || c.next_tid();
    let unknown = A::Raw(0x7777, vec![]);
    let mut v = vec![
        ("Binding, bare (IPv4)", v4, build(method::BINDING, Class::Request, tid(), &[], None, false)),
        ("Binding, bare (IPv6)", v6, build(method::BINDING, Class::Request, tid(), &[], None, false)),
        ("Binding + FINGERPRINT", v4, build(method::BINDING, Class::Request, tid(), &[], None, true)),
        ("Binding + unknown attribute (420)", v4, build(method::BINDING, Class::Request, tid(), &[A::Raw(0x7777, vec![])], None, false)),
        ("Binding + unknown attribute (420, IPv6)", v6, build(method::BINDING, Class::Request, tid(), &[A::Raw(0x7777, vec![])], None, false)),
        ("Binding + 8 unknown attributes (420)", v4, build(method::BINDING, Class::Request, tid(), &(0..8).map(|i| A::Raw(0x7000 + i, vec![])).collect::<Vec<_>>(), None, false)),
        ("Allocate, REQUESTED-TRANSPORT (401)", v4, build(method::ALLOCATE, Class::Request, tid(), &[transport_udp()], None, false)),
        ("Allocate, REQUESTED-TRANSPORT (401, IPv6)", v6, build(method::ALLOCATE, Class::Request, tid(), &[transport_udp()], None, false)),
        ("Allocate, bare (401)", v4, build(method::ALLOCATE, Class::Request, tid(), &[], None, false)),
        ("Allocate, bare (401, IPv6)", v6, build(method::ALLOCATE, Class::Request, tid(), &[], None, false)),
        ("Allocate + FINGERPRINT (401)", v4, build(method::ALLOCATE, Class::Request, tid(), &[transport_udp()], None, true)),
        ("Allocate + unknown attribute (401)", v4, build(method::ALLOCATE, Class::Request, tid(), &[transport_udp(), unknown], None, false)),
        ("Refresh, bare (401)", v4, build(method::REFRESH, Class::Request, tid(), &[], None, false)),
        ("CreatePermission, bare (401)", v4, build(method::CREATE_PERMISSION, Class::Request, tid(), &[], None, false)),
        ("CreatePermission + peer (401)", v4, build(method::CREATE_PERMISSION, Class::Request, tid(), &[peer_at(addr("8.8.8.8:1"))], None, false)),
        ("ChannelBind, bare (401)", v4, build(method::CHANNEL_BIND, Class::Request, tid(), &[], None, false)),
        ("unknown method (400)", v4, build(0x0FF, Class::Request, tid(), &[], None, false)),
    ];
    // Requests that carry credentials but fail them.
    let cr = c.rest_creds(v4, "amp", 3600, SECRET);
    let wrong = Creds { key: [0; 16], ..cr.clone() };
    v.push(("Allocate, wrong key (401)", v4, build(method::ALLOCATE, Class::Request, c.next_tid(), &[transport_udp()], Some(&wrong), false)));
    let stale = Creds { nonce: b"AAAAAAAAAAAAAAAA".to_vec(), ..cr.clone() };
    v.push(("Allocate, stale nonce (438)", v4, build(method::ALLOCATE, Class::Request, c.next_tid(), &[transport_udp()], Some(&stale), false)));
    let short = Creds { username: "1".into(), realm: "r".into(), nonce: b"n".to_vec(), ..cr };
    v.push(("Allocate, minimal creds (438)", v4, build(method::ALLOCATE, Class::Request, c.next_tid(), &[], Some(&short), false)));
    v
}

/// Runs every unauthenticated request through `c`: (name, request, answer) sizes.
fn measure(c: &mut Core) -> Vec<(&'static str, usize, Option<usize>)> {
    unauthenticated_requests(c)
        .into_iter()
        .map(|(name, t, req)| {
            let resp = c.feed(t, &req).map(|r| {
                assert!(r.msg().get(attr::MESSAGE_INTEGRITY).is_none(), "{name}: unsigned");
                r.bytes.len()
            });
            (name, req.len(), resp)
        })
        .collect()
}

fn with_realm(realm: &str, software: Option<&str>) -> Core {
    let mut c = Core::new();
    let cfg = ServerConfig { software: software.map(Into::into), ..config() };
    c.server = Server::new(cfg, Authenticator::new(realm, vec![SECRET.to_vec()], &[], NonceKey::new([9; 32], 600)), policy());
    c
}

#[test]
fn unauthenticated_answers_stay_within_3x() {
    // The default realm; the harness's; the longest the configuration accepts
    // (32); and a long SOFTWARE, which is dropped from answers it would bloat.
    let setups: [(&str, Option<&str>); 4] = [
        ("turnd", None),
        ("example.org", None),
        ("turn.meet.example-company.co.uk1", None),
        ("turnd", Some("turnd/0.1.0 (built for a very verbose operator)")),
    ];
    for (realm, software) in setups {
        assert!(realm.len() <= turnd::config::MAX_REALM);
        let mut c = with_realm(realm, software);
        eprintln!("\nrealm {realm:?}, software {software:?}:");
        eprintln!("  {:<44} {:>7} {:>7} {:>6}", "request", "bytes", "answer", "ratio");
        for (name, req, resp) in measure(&mut c) {
            let ratio = resp.map(|r| r as f64 / req as f64);
            eprintln!(
                "  {name:<44} {req:>7} {:>7} {:>6}",
                resp.map_or("-".into(), |r| r.to_string()),
                ratio.map_or("drop".into(), |r| format!("{r:.2}x"))
            );
            if let Some(r) = resp {
                assert!(r <= AMPLIFICATION_FACTOR * req, "{name}: {r} bytes for {req} ({realm:?})");
            }
            if name.starts_with("Binding, bare (IPv4)") {
                assert!(resp.unwrap() <= 2 * req, "bare Binding over IPv4: {resp:?}");
            }
            // Honest first requests are always answered: a Binding, and an
            // Allocate with REQUESTED-TRANSPORT, whatever the realm.
            if name.starts_with("Binding") || name.starts_with("Allocate, REQUESTED-TRANSPORT") {
                assert!(resp.is_some(), "{name} must be answered ({realm:?})");
            }
        }
        assert_eq!(state(&c), Footprint::default(), "no state from any of it");
    }
    // With the default realm every request above gets an answer, the bare
    // 20-byte Allocate included (compacted to exactly 3x: no reason phrase).
    let mut c = with_realm("turnd", None);
    for (name, req, resp) in measure(&mut c) {
        assert!(resp.is_some(), "{name} ({req} bytes) unanswered with the default realm");
    }
    // With the harness's 11-character realm the bare Allocate cannot fit: dropped, and counted.
    let mut c = with_realm("example.org", None);
    let t = tuple_at("198.51.100.21:1");
    let bare = build(method::ALLOCATE, Class::Request, c.next_tid(), &[], None, false);
    assert!(c.feed(t, &bare).is_none());
    assert_eq!(c.server.stats.dropped_amplification, 1);
    // The full 401 (with its reason phrase) where it fits.
    let b = build(method::ALLOCATE, Class::Request, c.next_tid(), &[transport_udp()], None, false);
    let r = c.feed(t, &b).unwrap();
    assert_eq!(r.msg().get(attr::ERROR_CODE).and_then(attr::decode_error_code), Some((401, "Unauthorized")));
    // Over TCP the source is proven by the handshake: no trimming, no dropping.
    let mut tcp = t;
    tcp.transport = Transport::Tcp;
    let r = c.feed(tcp, &bare).expect("answered over TCP");
    assert_eq!(r.code(), Some(401));
    assert_eq!(r.msg().get(attr::ERROR_CODE).and_then(attr::decode_error_code), Some((401, "Unauthorized")));
}

#[test]
fn unauthenticated_answers_are_rate_limited_per_source() {
    let cfg = ServerConfig { unauth_rate: 5, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let a = tuple_at("198.51.100.30:1000");
    // Credentials first (one token), then the bucket is drained.
    let cr = c.rest_creds(a, "rl", 3600, SECRET);
    let binding = |c: &mut Core, t| {
        let b = build(method::BINDING, Class::Request, c.next_tid(), &[], None, false);
        c.feed(t, &b).is_some()
    };
    let challenge = |c: &mut Core, t| {
        let b = build(method::ALLOCATE, Class::Request, c.next_tid(), &[transport_udp()], None, false);
        c.feed(t, &b).is_some()
    };
    let mut answered = 0;
    for port in 0..50u16 {
        // Any port of the same IP draws from the same bucket.
        let t = tuple_at(&format!("198.51.100.30:{}", 2000 + port));
        answered += binding(&mut c, t) as u32 + challenge(&mut c, t) as u32;
    }
    assert_eq!(answered, 4, "a burst of 5, one spent on the first challenge");
    assert_eq!(c.server.stats.dropped_rate_limited, 96);
    // Another source is not affected.
    assert!(binding(&mut c, tuple_at("198.51.100.31:1000")));
    assert!(challenge(&mut c, tuple_at("[2001:db8::31]:1000")));
    // Signed answers are never limited: the drained source still allocates and refreshes.
    let r = c.request(a, method::ALLOCATE, &[transport_udp()], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    for _ in 0..20 {
        assert_eq!(c.request(a, method::REFRESH, &[], Some(&cr)).class(), Class::Success);
    }
    // Nor are wrong credentials on a stream (TCP clients do not retransmit).
    let mut tcp = a;
    tcp.transport = Transport::Tcp;
    assert!((0..20).all(|_| challenge(&mut c, tcp)));
    // The bucket refills at 5 a second.
    assert!(!binding(&mut c, a));
    c.now = c.now.advance(Duration::from_millis(200));
    assert!(binding(&mut c, a), "one token after 200 ms");
    assert!(!binding(&mut c, a));
    c.now = c.now.advance(Duration::from_secs(10));
    assert_eq!((0..10).filter(|_| binding(&mut c, a)).count(), 5, "refilled to the burst, no more");
    // 0 turns it off (and a reload applies the new rate).
    let mut cfg = config();
    cfg.unauth_rate = 0;
    c.server.reconfigure(cfg, Authenticator::new(REALM, vec![SECRET.to_vec()], &[], NonceKey::new([9; 32], 600)), policy(), c.now.mono);
    assert!((0..1000).all(|_| binding(&mut c, a)));
}

// ---------------------------------------------------------------------------
// Exhaustion
// ---------------------------------------------------------------------------

/// A deterministic pseudo-random source address (xorshift), IPv4 or IPv6.
fn spoofed(i: u64) -> turnd::turn::FiveTuple {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let ip: IpAddr = if i.is_multiple_of(4) {
        std::net::Ipv6Addr::from(((x as u128) << 64) | (x.rotate_left(32) as u128)).into()
    } else {
        std::net::Ipv4Addr::from(x as u32).into()
    };
    turnd::turn::FiveTuple { client: SocketAddr::new(ip, (x >> 40) as u16), server: addr("192.0.2.10:3478"), transport: Transport::Udp, conn: 0 }
}

#[test]
fn spoofed_floods_create_no_state() {
    let cfg = ServerConfig { unauth_rate: turnd::turn::DEFAULT_UNAUTH_RATE, total_quota: 10, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    // A real client's allocation exists throughout.
    let honest = tuple(44000);
    let (hc, _) = c.allocate(honest, "honest");
    while c.server.poll_event().is_some() {}
    let base = state(&c);
    let key = long_term_key("1:x", REALM, "guess");
    let nonce_key = NonceKey::new([1; 32], 600);
    let (mut answered, n) = (0u32, 30_000u64);
    for i in 0..n {
        let t = spoofed(i);
        let tid = c.next_tid();
        // A nonce the attacker got for its own address, or a made-up one.
        let creds = Creds { username: format!("{}:x", c.now.unix + 600), key, nonce: nonce_key.make(t.client.ip(), c.now.unix).to_vec(), realm: REALM.into(), sha256: i % 2 == 0 };
        let pkt = match i % 8 {
            0 => build(method::ALLOCATE, Class::Request, tid, &[transport_udp()], None, false),
            1 => build(method::ALLOCATE, Class::Request, tid, &[], None, false),
            2 => build(method::ALLOCATE, Class::Request, tid, &[transport_udp(), A::Raw(attr::EVEN_PORT, vec![0x80])], Some(&creds), false),
            3 => build(method::REFRESH, Class::Request, tid, &[A::U32(attr::LIFETIME, 3600)], Some(&creds), false),
            4 => build(method::CREATE_PERMISSION, Class::Request, tid, &[peer_at(addr("8.8.8.8:1"))], None, false),
            5 => build(method::CHANNEL_BIND, Class::Request, tid, &[channel(0x4000), peer_at(addr("8.8.8.8:1"))], Some(&creds), false),
            6 => build(method::SEND, Class::Indication, tid, &[peer_at(addr("8.8.8.8:1")), data(b"x")], None, false),
            _ => vec![0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4],
        };
        match feed_any(&mut c, t, &pkt) {
            Did::Reply(r) => {
                answered += 1;
                assert_ne!(r.class(), Class::Success, "{i}");
                assert!(r.bytes.len() <= AMPLIFICATION_FACTOR * pkt.len());
            }
            Did::Relay(..) => panic!("relayed for a spoofed source"),
            Did::Nothing => {}
        }
        if i % 1000 == 999 {
            c.now = c.now.advance(Duration::from_millis(100));
        }
    }
    assert_eq!(state(&c), base, "tables unchanged by {n} spoofed requests");
    assert_eq!(c.server.footprint().events, 0, "no events either");
    assert_eq!(c.relays.open.len(), 1, "only the honest relay socket");
    assert!(c.relays.reserved.is_empty());
    assert_eq!(c.server.stats.allocations_created, 1);
    assert!(answered > 0);
    // The honest client was never disturbed.
    assert_eq!(c.request(honest, method::REFRESH, &[], Some(&hc)).class(), Class::Success);
    let ind = send_ind(&mut c, addr("8.8.8.8:1"), b"x");
    assert!(c.feed_relay(honest, &ind).is_none(), "no permission yet");
    assert_eq!(c.request(honest, method::CREATE_PERMISSION, &[peer_at(addr("8.8.8.8:1"))], Some(&hc)).class(), Class::Success);
}

#[test]
fn quotas_hold_under_a_flood_of_valid_credentials() {
    let cfg = ServerConfig { user_quota: 3, total_quota: 10, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    // One user from 50 source addresses: 3 allocations, then 486.
    let mut codes = std::collections::BTreeMap::new();
    for i in 0..50u16 {
        let t = tuple_at(&format!("198.51.100.{}:{}", 40 + i % 50, 5000 + i));
        let cr = c.rest_creds(t, "greedy", 3600, SECRET);
        let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
        *codes.entry(r.code().unwrap_or(200)).or_insert(0) += 1;
    }
    assert_eq!(codes, [(200, 3), (486, 47)].into_iter().collect());
    // Users sharing one quota key (EXPIRY:USER with different expiries) count together.
    let t = tuple(44100);
    let cr = c.rest_creds(t, "greedy", 7200, SECRET);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).code(), Some(486));
    // Many users: the total of 10, then 508.
    let mut codes = std::collections::BTreeMap::new();
    for i in 0..30u16 {
        let t = tuple(44200 + i);
        let cr = c.rest_creds(t, &format!("user{i}"), 3600, SECRET);
        let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
        *codes.entry(r.code().unwrap_or(200)).or_insert(0) += 1;
    }
    assert_eq!(codes, [(200, 7), (508, 23)].into_iter().collect());
    assert_eq!(c.server.allocation_count(), 10);
    assert_eq!(c.relays.open.len(), 10);
    // Quota comes back when allocations end (here: expiry).
    c.advance(601);
    assert_eq!(c.server.allocation_count(), 0);
    assert_eq!(state(&c), Footprint::default());
    let t = tuple(44300);
    let cr = c.rest_creds(t, "greedy", 3600, SECRET);
    assert_eq!(c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr)).class(), Class::Success);
}

#[test]
fn permissions_and_channels_per_allocation_are_capped() {
    let cfg = ServerConfig { max_permissions: 8, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let t = tuple(44400);
    let (cr, _) = c.allocate(t, "cap");
    let peers = |from: u32, n: u32| (from..from + n).map(|i| peer_at(SocketAddr::new(std::net::Ipv4Addr::from(0x0808_0000 + i).into(), 1))).collect::<Vec<_>>();
    // Nine in one request: 508, none installed.
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &peers(0, 9), Some(&cr)).code(), Some(508));
    assert_eq!(state(&c).permissions, 0);
    // Eight: fine; one more: 508; refreshing the eight: fine.
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &peers(0, 8), Some(&cr)).class(), Class::Success);
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &peers(8, 1), Some(&cr)).code(), Some(508));
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &peers(0, 8), Some(&cr)).class(), Class::Success);
    // A channel to a ninth peer would add a permission: 508.
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4000), peers(8, 1).remove(0)], Some(&cr)).code(), Some(508));
    // Channels to permitted peers, one per port: up to the cap.
    let mut ok = 0;
    for i in 0..20u16 {
        let p = peer_at(SocketAddr::new("8.8.0.0".parse().unwrap(), 1000 + i));
        if c.request(t, method::CHANNEL_BIND, &[channel(0x4000 + i), p], Some(&cr)).class() == Class::Success {
            ok += 1;
        }
    }
    assert_eq!(ok, 8);
    assert_eq!(state(&c).channels, 8);
    assert!(c.server.stats.quota_refusals >= 4);
    // More peers in one request than the cap (any number parses): 508, not silence.
    let b = build(method::CREATE_PERMISSION, Class::Request, c.next_tid(), &peers(100, 40), Some(&cr), false);
    assert_eq!(c.feed(t, &b).expect("an answer").code(), Some(508));
    // Expired permissions make room again (channels stay reserved for their cooldown).
    c.advance(301);
    let cr = Creds { nonce: c.rest_creds(t, "cap", 3600, SECRET).nonce, ..cr };
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &peers(50, 8), Some(&cr)).class(), Class::Success);
}

// ---------------------------------------------------------------------------
// Regressions found by fuzzing (fuzz/)
// ---------------------------------------------------------------------------

#[test]
fn a_refused_claim_does_not_swallow_the_reserved_port() {
    // Found by the `server` fuzz target (seed regression_reservation_token_leak):
    // an Allocate with a RESERVATION-TOKEN that was then refused (486 over the
    // user quota, 508 over the total, 400 for a bad LIFETIME or
    // ADDITIONAL-ADDRESS-FAMILY) took the reservation out of the table without
    // releasing its port: the reserved socket stayed open forever. With valid
    // credentials and EVEN-PORT R-bit allocations, that leaks ports and file
    // descriptors at will.
    let cfg = ServerConfig { user_quota: 1, total_quota: 3, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let t1 = tuple(45000);
    let cr1 = c.rest_creds(t1, "alice", 3600, SECRET);
    let r = c.request(t1, method::ALLOCATE, &[transport_udp(), A::Raw(attr::EVEN_PORT, vec![0x80])], Some(&cr1));
    let token = r.get(attr::RESERVATION_TOKEN).expect("a token");
    let port = r.addr(attr::XOR_RELAYED_ADDRESS).unwrap().port() + 1;
    assert!(c.relays.reserved.contains(&port));
    let tok = || A::Raw(attr::RESERVATION_TOKEN, token.clone());
    // Refused claims: the user quota, a bad LIFETIME, a bad additional family.
    let t2 = tuple(45001);
    let cr2 = c.rest_creds(t2, "alice", 3600, SECRET);
    assert_eq!(c.request(t2, method::ALLOCATE, &[transport_udp(), tok()], Some(&cr2)).code(), Some(486));
    let t3 = tuple(45002);
    let cr3 = c.rest_creds(t3, "bob", 3600, SECRET);
    assert_eq!(c.request(t3, method::ALLOCATE, &[transport_udp(), tok(), A::Raw(attr::LIFETIME, vec![1])], Some(&cr3)).code(), Some(400));
    let v4 = A::Raw(attr::ADDITIONAL_ADDRESS_FAMILY, vec![1, 0, 0, 0]);
    assert_eq!(c.request(t3, method::ALLOCATE, &[transport_udp(), tok(), v4], Some(&cr3)).code(), Some(400));
    assert_eq!(state(&c).reservations, 1, "still reserved");
    // The total quota: fill it, refuse a claim, free a slot.
    let t4 = tuple(45003);
    c.allocate(t4, "carol");
    let t5 = tuple(45004);
    let cr5 = c.rest_creds(t5, "dave", 3600, SECRET);
    assert_eq!(c.request(t5, method::ALLOCATE, &[transport_udp()], Some(&cr5)).class(), Class::Success);
    let t6 = tuple(45005);
    let cr6 = c.rest_creds(t6, "erin", 3600, SECRET);
    assert_eq!(c.request(t6, method::ALLOCATE, &[transport_udp(), tok()], Some(&cr6)).code(), Some(508));
    assert_eq!(c.request(t5, method::REFRESH, &[A::U32(attr::LIFETIME, 0)], Some(&cr5)).class(), Class::Success);
    // A valid claim still gets the port.
    let r = c.request(t3, method::ALLOCATE, &[transport_udp(), tok()], Some(&cr3));
    assert_eq!(r.class(), Class::Success, "{:?}", r.code());
    assert_eq!(r.addr(attr::XOR_RELAYED_ADDRESS).unwrap().port(), port);
    assert!(c.relays.reserved.is_empty());
    // And once everything expires nothing is held.
    c.advance(3601);
    assert!(c.relays.reserved.is_empty() && c.relays.open.is_empty());
    assert_eq!(state(&c), Footprint::default());
}

#[test]
fn unclaimed_reservations_are_released_even_when_claims_fail() {
    // The same leak through the other door: every claim refused, then expiry.
    let cfg = ServerConfig { user_quota: 1, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let t1 = tuple(45010);
    let cr1 = c.rest_creds(t1, "alice", 3600, SECRET);
    let r = c.request(t1, method::ALLOCATE, &[transport_udp(), A::Raw(attr::EVEN_PORT, vec![0x80])], Some(&cr1));
    let token = r.get(attr::RESERVATION_TOKEN).unwrap();
    let t2 = tuple(45011);
    let cr2 = c.rest_creds(t2, "alice", 3600, SECRET);
    for _ in 0..5 {
        let r = c.request(t2, method::ALLOCATE, &[transport_udp(), A::Raw(attr::RESERVATION_TOKEN, token.clone())], Some(&cr2));
        assert_eq!(r.code(), Some(486));
    }
    assert_eq!(c.relays.reserved.len(), 1);
    c.advance(31);
    assert!(c.relays.reserved.is_empty(), "the reserved port was released when the reservation expired");
}

