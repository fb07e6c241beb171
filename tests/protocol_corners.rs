//! Protocol corners: DONT-FRAGMENT (RFC 8656 7.2, 11.3, 14), indications with
//! unknown comprehension-required attributes (RFC 8489 6.3.1), messages with
//! many attributes, and a TCP client that half-closes after pipelining.
//!
//! The core tests drive the sans-IO server with fake relay ports; the `wire_*`
//! tests run a real turnd (one of them across a network namespace's veth, MTU
//! 1500, where a 3,000-byte datagram must be fragmented to pass).

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
mod common;
#[path = "common/netns.rs"]
mod netns;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Turnd, SECRET as WIRE_SECRET};
use harness::*;
use turnd::stun::attr;
use turnd::stun::{method, Class, Message};
use turnd::turn::{Output, ServerConfig};
use wire::{data, peer_at, UdpClient};

/// A public peer address for peer number `i` (0..=65535).
fn public_peer(i: usize) -> SocketAddr {
    format!("45.{}.{}.7:5000", i / 256, i % 256).parse().unwrap()
}

/// A Send indication from `t` to `peer` carrying `extra` attributes besides the peer and data.
fn send_indication(c: &mut Core, peer: SocketAddr, payload: &[u8], extra: Vec<A>) -> Vec<u8> {
    let mut attrs = vec![A::Addr(attr::XOR_PEER_ADDRESS, peer), A::Raw(attr::DATA, payload.to_vec())];
    attrs.extend(extra);
    let tid = c.next_tid();
    build(method::SEND, Class::Indication, tid, &attrs, None, false)
}

// ---------------------------------------------------------------------------
// Unknown comprehension-required attributes in a Send indication

#[test]
fn send_with_unknown_comprehension_required_attribute_is_discarded() {
    let mut c = Core::new();
    let t = tuple(4000);
    let (creds, _) = c.allocate(t, "alice");
    let p: SocketAddr = "45.1.2.3:9000".parse().unwrap();
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &[A::Addr(attr::XOR_PEER_ADDRESS, p)], Some(&creds)).class(), Class::Success);

    // Control: the same indication without it is relayed.
    let ok = send_indication(&mut c, p, b"hello", vec![]);
    assert!(c.feed_relay(t, &ok).is_some(), "a plain Send is relayed");

    // 0x0000-0x7FFF are comprehension-required: unknown ones discard the indication.
    for typ in [0x0030u16, 0x7FFF, 0x0001 /* MAPPED-ADDRESS: not a Send attribute */] {
        let before = c.server.stats.dropped_unknown_attribute;
        let bad = send_indication(&mut c, p, b"hello", vec![A::Raw(typ, vec![1, 2, 3, 4])]);
        assert_eq!(c.feed_relay(t, &bad), None, "Send with unknown comprehension-required {typ:#06x} is not relayed");
        assert_eq!(c.server.stats.dropped_unknown_attribute, before + 1, "and counted");
    }
    // Before the peer and data, too.
    let tid = c.next_tid();
    let first = build(
        method::SEND,
        Class::Indication,
        tid,
        &[A::Raw(0x0031, vec![0; 4]), A::Addr(attr::XOR_PEER_ADDRESS, p), A::Raw(attr::DATA, b"x".to_vec())],
        None,
        false,
    );
    assert_eq!(c.feed_relay(t, &first), None);

    // Comprehension-optional unknown ones (0x8000-0xFFFF) are ignored: relayed.
    let optional = send_indication(&mut c, p, b"hello", vec![A::Raw(0x8050, vec![1, 2, 3, 4]), A::Raw(attr::SOFTWARE, b"x".to_vec())]);
    let (_, peer, d) = c.feed_relay(t, &optional).expect("unknown comprehension-optional attributes are ignored");
    assert_eq!((peer, d.as_slice()), (p, &b"hello"[..]));
    // DONT-FRAGMENT is known to Send.
    let df = send_indication(&mut c, p, b"hello", vec![A::Raw(attr::DONT_FRAGMENT, vec![])]);
    assert!(c.feed_relay(t, &df).is_some());
}

// ---------------------------------------------------------------------------
// DONT-FRAGMENT

#[test]
fn allocate_with_dont_fragment_opens_a_df_socket() {
    let mut c = Core::new();
    let t = tuple(4001);
    let creds = c.rest_creds(t, "alice", 3600, SECRET);
    let r = c.request(t, method::ALLOCATE, &[transport_udp(), A::Raw(attr::DONT_FRAGMENT, vec![])], Some(&creds));
    assert_eq!(r.class(), Class::Success, "{:?}", r.code());
    assert!(c.relays.last_dont_fragment, "the relay socket was asked to set DF on all it sends");

    let t2 = tuple(4002);
    c.allocate(t2, "bob");
    assert!(!c.relays.last_dont_fragment, "without DONT-FRAGMENT the socket is left as it is");
}

#[test]
fn allocate_with_dont_fragment_gets_420_when_df_cannot_be_set() {
    let mut c = Core::new();
    c.relays.no_dont_fragment = true;
    let t = tuple(4003);
    let creds = c.rest_creds(t, "alice", 3600, SECRET);
    let r = c.request(t, method::ALLOCATE, &[transport_udp(), A::Raw(attr::DONT_FRAGMENT, vec![])], Some(&creds));
    assert_eq!(r.code(), Some(420));
    assert_eq!(r.get(attr::UNKNOWN_ATTRIBUTES), Some(attr::DONT_FRAGMENT.to_be_bytes().to_vec()), "DONT-FRAGMENT is named");
    assert!(r.msg().verify_integrity(&creds.key), "signed like every authenticated answer");
    assert_eq!(c.server.allocation_count(), 0);
    assert!(c.relays.open.is_empty(), "no socket left open");
    // Without it, the same client allocates.
    let r = c.request(t, method::ALLOCATE, &[transport_udp()], Some(&creds));
    assert_eq!(r.class(), Class::Success);
}

#[test]
fn send_with_dont_fragment_asks_the_io_layer_for_df() {
    let mut c = Core::new();
    let t = tuple(4004);
    let (creds, _) = c.allocate(t, "alice");
    let p: SocketAddr = "45.1.2.3:9000".parse().unwrap();
    c.request(t, method::CREATE_PERMISSION, &[A::Addr(attr::XOR_PEER_ADDRESS, p)], Some(&creds));
    let relay_df = |c: &mut Core, extra: Vec<A>| {
        let b = send_indication(c, p, &[7u8; 3000], extra);
        match c.server.handle_client(t, &b, c.now, &mut c.out, &mut c.relays) {
            Output::Relay { dont_fragment, data, .. } => {
                assert_eq!(data.len(), 3000);
                dont_fragment
            }
            other => panic!("not relayed: {other:?}"),
        }
    };
    assert!(relay_df(&mut c, vec![A::Raw(attr::DONT_FRAGMENT, vec![])]), "DF asked for this datagram");
    assert!(!relay_df(&mut c, vec![]), "not without DONT-FRAGMENT");
}

// ---------------------------------------------------------------------------
// Many attributes

#[test]
fn create_permission_with_many_peers_up_to_max_permissions() {
    let cfg = ServerConfig { max_permissions: 200, ..config() };
    let mut c = Core::with(cfg, policy(), vec![SECRET.to_vec()]);
    let t = tuple(4005);
    let (creds, _) = c.allocate(t, "alice");
    // 30 peers plus USERNAME, REALM, NONCE, MESSAGE-INTEGRITY, FINGERPRINT: 35 attributes.
    let peers: Vec<A> = (0..30).map(|i| A::Addr(attr::XOR_PEER_ADDRESS, public_peer(i))).collect();
    let tid = c.next_tid();
    let req = build(method::CREATE_PERMISSION, Class::Request, tid, &peers, Some(&creds), true);
    assert!(Message::parse(&req).unwrap().attribute_count() > 32);
    let r = c.feed(t, &req).expect("an answer to a CreatePermission with 35 attributes");
    assert_eq!(r.class(), Class::Success, "{:?}", r.code());
    let a = c.server.allocations().next().unwrap();
    assert_eq!(a.permissions.len(), 30, "every peer permitted");

    // Up to the cap in one request: 170 more make exactly 200.
    let more: Vec<A> = (30..200).map(|i| A::Addr(attr::XOR_PEER_ADDRESS, public_peer(i))).collect();
    assert_eq!(c.request(t, method::CREATE_PERMISSION, &more, Some(&creds)).class(), Class::Success);
    assert_eq!(c.server.allocations().next().unwrap().permissions.len(), 200);
    // One past it: 508, nothing added.
    let over = c.request(t, method::CREATE_PERMISSION, &[A::Addr(attr::XOR_PEER_ADDRESS, public_peer(200))], Some(&creds));
    assert_eq!(over.code(), Some(508));

    // A fresh allocation asked for more peers in one request than the cap: 508.
    let t2 = tuple(4006);
    let (creds2, _) = c.allocate(t2, "bob");
    let too_many: Vec<A> = (0..201).map(|i| A::Addr(attr::XOR_PEER_ADDRESS, public_peer(i))).collect();
    assert_eq!(c.request(t2, method::CREATE_PERMISSION, &too_many, Some(&creds2)).code(), Some(508));
    let a2 = c.server.allocations().find(|a| a.tuple == t2).unwrap();
    assert!(a2.permissions.is_empty());
}

#[test]
fn a_message_with_thousands_of_attributes_parses_and_is_answered() {
    // A Binding with 5,000 comprehension-optional attributes (ignored): answered.
    let mut c = Core::new();
    let attrs: Vec<A> = (0..5000).map(|i| A::Raw(0x8100 + (i % 0x7000) as u16, vec![])).collect();
    let tid = c.next_tid();
    let req = build(method::BINDING, Class::Request, tid, &attrs, None, true);
    assert_eq!(Message::parse(&req).unwrap().attribute_count(), 5000);
    let r = c.feed(tuple(4007), &req).expect("answered");
    assert_eq!(r.class(), Class::Success);
    // The largest message: 16,379 empty attributes fill 65,535 bytes.
    let attrs: Vec<A> = (0..16_379).map(|_| A::Raw(0x8123, vec![])).collect();
    let req = build(method::BINDING, Class::Indication, tid, &attrs, None, false);
    assert_eq!(req.len(), 20 + 65_516);
    assert_eq!(Message::parse(&req).unwrap().attribute_count(), 16_379);
}

// ---------------------------------------------------------------------------
// On the wire

#[test]
fn wire_create_permission_with_thirty_and_sixty_four_peers() {
    let server = Turnd::start("");
    let mut client = UdpClient::new("127.0.0.1", server.addr);
    client.allocate("alice", WIRE_SECRET);
    for n in [30usize, 64] {
        let peers: Vec<A> = (0..n).map(|i| peer_at(public_peer(i))).collect();
        let r = client.transact(method::CREATE_PERMISSION, &peers);
        assert_eq!(r.class(), Class::Success, "{n} peers: {:?}", r.code());
    }
    // 64 is the default limits.max_permissions: one more peer is refused.
    let r = client.transact(method::CREATE_PERMISSION, &[peer_at(public_peer(5000))]);
    assert_eq!(r.code(), Some(508));
}

/// Waits (bounded) for datagrams on `rx`; returns the sizes received until
/// `want` arrived or `timeout` passed.
fn sizes_until(rx: &std::net::UdpSocket, want: usize, timeout: Duration) -> Vec<usize> {
    let mut got = Vec::new();
    let until = Instant::now() + timeout;
    let mut buf = vec![0u8; 70_000];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        rx.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        let Ok((n, _)) = rx.recv_from(&mut buf) else { break };
        got.push(n);
        if n == want {
            break;
        }
    }
    got
}

fn send_df(client: &mut UdpClient, peer: SocketAddr, len: usize, df: bool) {
    let tid = client.next_tid();
    let mut attrs = vec![peer_at(peer), data(&vec![0x5A; len])];
    if df {
        attrs.push(A::Raw(attr::DONT_FRAGMENT, vec![]));
    }
    let b = build(method::SEND, Class::Indication, tid, &attrs, None, false);
    client.sock.send_to(&b, client.server).unwrap();
}

/// turnd relays from the host end of a veth (MTU 1500) to a peer in a
/// network namespace: a 3,000-byte datagram only passes as fragments. With
/// DONT-FRAGMENT (on the Send, or on the Allocate) it must leave with DF set,
/// so the kernel refuses to fragment it and nothing arrives; without, it
/// arrives (reassembled).
#[test]
fn wire_dont_fragment_is_not_fragmented() {
    let ns = netns::NetNs::create_udp_blocked();
    let rx = ns.udp_socket(SocketAddr::new(ns.ns_ip().into(), 0));
    let peer = rx.local_addr().unwrap();
    let port = common::free_port();
    let probe: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let host = ns.host_ip();
    let ns_ip = ns.ns_ip();
    let server = Turnd::builder().config(probe, |_| {
        format!(
            "realm = \"{}\"\n[auth]\nsecrets = [\"{WIRE_SECRET}\"]\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
             [relay]\nip = \"{host}\"\nports = \"20000-29999\"\n\
             [peers]\nallow = [\"{ns_ip}/32\"]\n",
            common::REALM
        )
    }).start();

    let mut client = UdpClient::new("127.0.0.1", server.addr);
    client.allocate("alice", WIRE_SECRET);
    assert_eq!(client.transact(method::CREATE_PERMISSION, &[peer_at(peer)]).class(), Class::Success);

    // The path works, fragmented: 3,000 bytes without DF arrive whole.
    send_df(&mut client, peer, 3000, false);
    assert_eq!(sizes_until(&rx, 3000, Duration::from_secs(5)), vec![3000], "a 3,000-byte datagram without DF passes as fragments");
    // With DF: refused by the kernel at the 1,500-byte link; a small one after it arrives, alone.
    send_df(&mut client, peer, 3000, true);
    send_df(&mut client, peer, 1000, true);
    let got = sizes_until(&rx, 1000, Duration::from_secs(5));
    assert_eq!(got, vec![1000], "the 3,000-byte Send with DONT-FRAGMENT must not leave fragmented");
    // The socket is back to normal for datagrams without DF.
    send_df(&mut client, peer, 3000, false);
    assert_eq!(sizes_until(&rx, 3000, Duration::from_secs(5)), vec![3000]);

    // An allocation made with DONT-FRAGMENT: DF on everything it relays.
    let mut df_client = UdpClient::new("127.0.0.1", server.addr);
    let r = df_client.transact(method::ALLOCATE, &[transport_udp()]);
    df_client.creds = Some(wire::rest_creds(&r, "bob", WIRE_SECRET));
    let r = df_client.transact(method::ALLOCATE, &[transport_udp(), A::Raw(attr::DONT_FRAGMENT, vec![])]);
    assert_eq!(r.class(), Class::Success, "{:?}", r.code());
    assert_eq!(df_client.transact(method::CREATE_PERMISSION, &[peer_at(peer)]).class(), Class::Success);
    send_df(&mut df_client, peer, 3000, false);
    send_df(&mut df_client, peer, 1000, false);
    assert_eq!(sizes_until(&rx, 1000, Duration::from_secs(5)), vec![1000], "an allocation with DONT-FRAGMENT sends nothing fragmented");
    assert!(server.metric("turnd_dropped_packets_total{reason=\"send_failed\"}") >= 2.0, "the refused sends are counted");
}

// ---------------------------------------------------------------------------
// Half-close after pipelining

/// 1,000 Binding requests back to back, as one write.
fn pipelined_bindings(n: usize) -> Vec<u8> {
    let mut all = Vec::new();
    for i in 0..n {
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&(i as u64).to_be_bytes());
        all.extend(build(method::BINDING, Class::Request, tid, &[], None, false));
    }
    all
}

/// Counts the Binding answers in a byte stream read to its end.
fn count_answers(bytes: &[u8]) -> usize {
    let mut at = 0;
    let mut n = 0;
    while let turnd::stun::FrameLen::Complete(len) = turnd::stun::frame_len(&bytes[at..]) {
        if Message::parse(&bytes[at..at + len]).is_ok_and(|m| m.method() == method::BINDING && m.class() == Class::Success) {
            n += 1;
        }
        at += len;
    }
    n
}

/// Reads until the server closes (bounded: 10 s).
fn read_to_close(r: &mut dyn std::io::Read) -> Vec<u8> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        match r.read(&mut chunk) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("read: {e} after {} bytes", got.len()),
        }
    }
    got
}

#[test]
fn wire_tcp_half_close_after_pipelining_gets_every_answer() {
    use std::io::Write;
    let server = Turnd::builder().extra("").streams().start();
    for _round in 0..3 {
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&pipelined_bindings(1000)).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let got = read_to_close(&mut s);
        assert_eq!(count_answers(&got), 1000, "every pipelined request answered before the close");
    }
}

/// A TLS client of `addr` (any certificate), reads bounded by 10 s.
fn tls_client(addr: SocketAddr) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(wire::insecure_tls_config(), "localhost".try_into().unwrap()).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

#[test]
fn wire_tls_close_notify_after_pipelining_gets_every_answer() {
    use std::io::Write;
    let server = Turnd::builder().extra("").streams().start();
    let addr: SocketAddr = format!("127.0.0.1:{}", server.tls_port).parse().unwrap();
    for _round in 0..3 {
        let mut tls = tls_client(addr);
        tls.write_all(&pipelined_bindings(1000)).unwrap();
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        while tls.conn.wants_write() {
            tls.conn.write_tls(&mut tls.sock).unwrap();
        }
        tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let got = read_to_close(&mut tls);
        assert_eq!(count_answers(&got), 1000, "every pipelined request answered before the close");
    }
}

#[test]
fn wire_tls_close_notify_in_the_read_that_backlogs_answers_gets_every_answer() {
    // 1,000 pipelined requests and the close_notify in one TCP write, so one
    // read brings them all: the answers backlog (turnd holds the rest of
    // the requests back until they drain) and the close arrives with them.
    // Every request is still answered before turnd closes.
    use std::io::Write;
    let server = Turnd::builder().streams().start();
    let addr: SocketAddr = format!("127.0.0.1:{}", server.tls_port).parse().unwrap();
    for _round in 0..3 {
        let mut tls = tls_client(addr);
        // The handshake first, on its own.
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).unwrap();
        }
        tls.conn.writer().write_all(&pipelined_bindings(1000)).unwrap();
        tls.conn.send_close_notify();
        let mut records = Vec::new();
        while tls.conn.wants_write() {
            tls.conn.write_tls(&mut records).unwrap();
        }
        assert!(records.len() < 60 * 1024, "one read of turnd's takes it all: {} bytes", records.len());
        tls.sock.write_all(&records).unwrap();
        tls.sock.shutdown(std::net::Shutdown::Write).unwrap();
        let got = read_to_close(&mut tls);
        assert_eq!(count_answers(&got), 1000, "every pipelined request answered before the close");
    }
}

#[test]
fn wire_tls_with_http_alpn_still_carries_turn() {
    // Firefox behind an HTTP proxy sends TURN over TLS through its HTTP
    // stack, which offers the browser's usual ALPN (h2, http/1.1): turnd
    // negotiates http/1.1 there (for the check page) and must still answer
    // STUN. A browser's HTTP request on such a connection gets HTTP.
    use std::io::{Read, Write};
    let server = Turnd::builder().streams().extra("[check]\nenabled = true\n").start();
    let addr: SocketAddr = format!("127.0.0.1:{}", server.tls_port).parse().unwrap();
    let client = |alpn: &[&[u8]]| {
        let mut cfg = (*wire::insecure_tls_config()).clone();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).unwrap();
        }
        assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]), "turnd picks http/1.1 from h2, http/1.1");
        tls
    };
    let mut turn = client(&[b"h2", b"http/1.1"]);
    turn.write_all(&pipelined_bindings(3)).unwrap();
    turn.flush().unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let until = Instant::now() + Duration::from_secs(10);
    while count_answers(&got) < 3 && Instant::now() < until {
        match turn.read(&mut chunk) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&chunk[..k]),
            Err(e) => panic!("read: {e} after {} bytes: {}", got.len(), server.log()),
        }
    }
    assert_eq!(count_answers(&got), 3, "STUN over TLS with ALPN http/1.1 answered: {}", server.log());

    let mut web = client(&[b"h2", b"http/1.1"]);
    web.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    web.flush().unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut web)).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ready\n"), "{answer}");
}

#[test]
fn an_empty_datagram_from_a_peer_reaches_the_client() {
    // A zero-length UDP datagram is a datagram: relayed as an empty
    // ChannelData on a channel, or a Data indication with an empty DATA.
    let server = Turnd::start("");
    let peer = std::net::UdpSocket::bind((common::PEER_IP, 0)).unwrap();
    let p = peer.local_addr().unwrap();
    let mut c = UdpClient::new("127.0.0.1", server.addr);
    let relayed = c.allocate("empty", WIRE_SECRET);
    assert_eq!(c.transact(method::CREATE_PERMISSION, &[peer_at(p)]).class(), Class::Success);
    peer.send_to(&[], relayed).unwrap();
    match c.recv(Duration::from_secs(5)) {
        Some(wire::Incoming::Data { peer: from, data }) => assert_eq!((from, data.len()), (p, 0)),
        other => panic!("expected an empty Data indication, got {other:?}"),
    }
    assert_eq!(c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(p)]).class(), Class::Success);
    peer.send_to(&[], relayed).unwrap();
    match c.recv(Duration::from_secs(5)) {
        Some(wire::Incoming::Channel { number, data }) => assert_eq!((number, data.len()), (0x4000, 0)),
        other => panic!("expected an empty ChannelData, got {other:?}"),
    }
}
