//! The core's half of an upgrade in place: an allocation written down by
//! one server ([`Server::carry`]) and taken up by another ([`Server::adopt`])
//! is the same allocation: relayed addresses, permissions, channels,
//! expiry, counters and bandwidth budgets; nonces of the old server stay
//! good on the new one (the nonce key travels too); the old one lets go
//! without reporting an end.

#[path = "common/core.rs"]
mod harness;

use harness::*;
use turnd::stun::{method, ChannelData, Class};
use turnd::turn::{AdoptError, Carried, Event, ServerConfig};

const PEER: &str = "8.8.8.8:7000";

/// A server with one allocation that has a permission, a channel and has
/// relayed, under a bandwidth cap; its client's credentials.
fn busy() -> (Core, Creds) {
    let mut c = Core::with(ServerConfig { allocation_bytes_per_second: 125_000, ..config() }, policy(), vec![SECRET.to_vec()]);
    let t = tuple(40000);
    let cr = c.rest_creds(t, "alice", 3600, SECRET);
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&cr));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[peer(PEER)], Some(&cr)).class(), Class::Success);
    assert_eq!(c.request(t, method::CHANNEL_BIND, &[channel(0x4001), peer(PEER)], Some(&cr)).class(), Class::Success);
    let mut cd = ChannelData::header(0x4001, 1000).to_vec();
    cd.extend_from_slice(&[7; 1000]);
    for _ in 0..20 {
        assert!(c.feed_relay(t, &cd).is_some());
    }
    c.advance(30);
    (c, cr)
}

/// A second server, as a new process would start: same settings and nonce key, the same moment.
fn successor(old: &Core) -> Core {
    let mut n = Core::with(ServerConfig { allocation_bytes_per_second: 125_000, ..config() }, policy(), vec![SECRET.to_vec()]);
    n.now = old.now;
    n
}

#[test]
fn an_adopted_allocation_is_the_carried_one_and_keeps_relaying() {
    let (mut old, cr) = busy();
    let carried = old.server.carry(old.now.mono, |_| true);
    assert_eq!(carried.len(), 1);
    let (c, ids) = &carried[0];
    assert_eq!(ids.len(), 1, "one relay socket (IPv4)");
    assert_eq!(c.channels.len(), 1);
    assert_eq!(c.permissions.len(), 1);
    assert_eq!(c.packets_to_peer, 20);
    assert!(c.budget_to_peer.last_us_ago.is_some(), "the bucket has been drawn on");
    // What travels is plain data: it survives the handover's encoding.
    let json = serde_json::to_string(c).unwrap();
    let c: Carried = serde_json::from_str(&json).unwrap();

    let mut new = successor(&old);
    let t = tuple(40000);
    new.server.adopt(&c, t, new.now.mono, &mut new.relays).unwrap();
    // Written down again, it is what came.
    let again = new.server.carry(new.now.mono, |_| true);
    assert_eq!(again[0].0, c);
    assert_eq!(new.relays.open.len(), 1);

    // It relays both ways on its channel, and the old nonce is good here.
    let mut cd = ChannelData::header(0x4001, 4).to_vec();
    cd.extend_from_slice(b"ping");
    let (_, to, data) = new.feed_relay(t, &cd).expect("ChannelData relayed by the new server");
    assert_eq!((to, &data[..]), (PEER.parse().unwrap(), &b"ping"[..]));
    let relay = *new.relays.open.iter().next().unwrap();
    let mut out = vec![0u8; 2048];
    let (to_client, bytes) = new.server.handle_peer(relay, PEER.parse().unwrap(), b"pong", new.now.mono, &mut out).expect("peer data relayed");
    assert_eq!(to_client, t);
    let back = ChannelData::parse(bytes).unwrap();
    assert_eq!((back.channel, back.data), (0x4001, &b"pong"[..]));
    let r = new.request(t, method::REFRESH, &[], Some(&cr));
    assert_eq!(r.class(), Class::Success, "a refresh with the nonce the old server gave: {:?}", r.code());

    // The refresh renewed its 600 s lifetime here, 30 s after its creation there.
    new.advance(599);
    assert_eq!(new.server.allocation_count(), 1);
    new.advance(2);
    assert_eq!(new.server.allocation_count(), 0);
    assert!(new.relays.open.is_empty());

    // The old server lets go silently: nothing ended, no quota held.
    while old.server.poll_event().is_some() {}
    assert_eq!(old.server.forget(|_| true, &mut old.relays), 1);
    assert_eq!(old.server.allocation_count(), 0);
    assert!(old.relays.open.is_empty(), "its relay socket closed there");
    assert_eq!(old.server.footprint().users, 0);
    while let Some(e) = old.server.poll_event() {
        assert!(!matches!(e, Event::AllocationEnded { .. }), "a handed-over allocation did not end: {e:?}");
    }
}

#[test]
fn a_bucket_carried_empty_stays_empty() {
    // Over its cap before the handover, still over it after: the budget travels.
    let (old, _) = busy();
    let t = tuple(40000);
    let mut c = old.server.carry(old.now.mono, |_| true).remove(0).0;
    c.budget_to_peer.level = 0;
    c.budget_to_peer.last_us_ago = Some(0);
    let mut new = successor(&old);
    new.server.adopt(&c, t, new.now.mono, &mut new.relays).unwrap();
    let mut cd = ChannelData::header(0x4001, 1000).to_vec();
    cd.extend_from_slice(&[1; 1000]);
    assert!(new.feed_relay(t, &cd).is_none(), "an empty budget drops at once");
}

#[test]
fn adoption_refuses_what_it_cannot_take_whole() {
    let (old, _) = busy();
    let c = old.server.carry(old.now.mono, |_| true).remove(0).0;
    let mut new = successor(&old);
    let t = tuple(40000);
    // No relay socket came for it: refused, nothing left open.
    new.relays.exhausted = true;
    assert_eq!(new.server.adopt(&c, t, new.now.mono, &mut new.relays), Err(AdoptError::NoSocket));
    assert_eq!(new.server.allocation_count(), 0);
    new.relays.exhausted = false;
    new.server.adopt(&c, t, new.now.mono, &mut new.relays).unwrap();
    // The same client twice: refused.
    assert_eq!(new.server.adopt(&c, t, new.now.mono, &mut new.relays), Err(AdoptError::Conflict));
    // A stream client's allocation is not carried.
    let mut tcp = t;
    tcp.transport = turnd::turn::Transport::Tcp;
    assert_eq!(new.server.adopt(&c, tcp, new.now.mono, &mut new.relays), Err(AdoptError::Conflict));
    // A relay without IPv4 cannot take an IPv4 allocation.
    let mut v6only = Core::with(ServerConfig { relay_v4: None, ..config() }, policy(), vec![SECRET.to_vec()]);
    assert_eq!(v6only.server.adopt(&c, t, v6only.now.mono, &mut v6only.relays), Err(AdoptError::FamilyUnsupported));
}
