//! The abuse suite over real sockets, against a real turnd on loopback (and a
//! network namespace), where the I/O layer matters: own ports and hairpin,
//! amplification ratios on the wire, a flood next to an honest client,
//! slowloris and idle connections, running out of descriptors, another host
//! address only on relay ports, an allocation expiring on the real clock.
//!
//! The same attacks against the sans-IO core: tests/abuse_core.rs.

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
mod common;
#[path = "common/netns.rs"]
mod netns;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use harness::*;
use turnd::stun::attr;
use turnd::stun::{method, Class};
use turnd::turn::AMPLIFICATION_FACTOR;
use wire::{build, peer_at, unix_now, Incoming, StreamClient, UdpClient};

// ---------------------------------------------------------------------------
// Over real sockets, against a real turnd on loopback
// ---------------------------------------------------------------------------

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};

#[test]
fn wire_own_ports_refused_and_hairpin_relays() {
    // No loopback allowance: the only loopback address a peer may be is our
    // own relay address, on relay ports.
    let server = common::Turnd::builder().extra("").no_loopback_peers().start();
    let own = |port: u16| SocketAddr::new("127.0.0.1".parse().unwrap(), port);
    let mut a = UdpClient::new("127.0.0.1", server.addr);
    let mut b = UdpClient::new("127.0.0.1", server.addr);
    let ra = a.allocate("alice", common::SECRET);
    let rb = b.allocate("bob", common::SECRET);
    assert_eq!(ra.ip(), own(0).ip());
    let echo = common::EchoPeer::start();
    for (p, why) in [(own(server.port), "own UDP listener"), (own(server.metrics_port), "own metrics and admin API"), (echo.addr, "127.0.0.2, loopback")] {
        let r = a.transact(method::CHANNEL_BIND, &[channel(0x4001), peer_at(p)]);
        assert_eq!(r.code(), Some(403), "{why}");
    }
    // Permission for our own IP (per IP, for other allocations) does not open
    // the listener: a Binding request sent there through the relay is never
    // answered back through it.
    assert_eq!(a.transact(method::CREATE_PERMISSION, &[peer_at(own(server.port))]).class(), Class::Success);
    let mut probe = [0u8; 20];
    probe[1] = 1;
    probe[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    a.send_indication(own(server.port), &probe);
    a.send_indication(own(server.metrics_port), b"GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(a.recv(Duration::from_millis(500)), None, "nothing came back from our own ports");
    // Two allocations on this server relay to each other, both ways.
    assert_eq!(a.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(rb)]).class(), Class::Success);
    assert_eq!(b.transact(method::CREATE_PERMISSION, &[peer_at(ra)]).class(), Class::Success);
    for i in 0..20u8 {
        a.send_channel(0x4000, &[i; 100]);
        assert_eq!(b.recv(Duration::from_secs(2)), Some(Incoming::Data { peer: ra, data: vec![i; 100] }), "A -> B #{i}");
        b.send_indication(ra, &[i; 50]);
        assert_eq!(a.recv(Duration::from_secs(2)), Some(Incoming::Channel { number: 0x4000, data: vec![i; 50] }), "B -> A #{i}");
    }
    assert!(server.metric("turnd_peer_refusals_total") >= 3.0);
    assert_eq!(echo.finish(), 0, "nothing reached the refused loopback peer");
}

/// A Turnd with UDP listeners on 127.0.0.1 and [::1] and the default realm.
fn dual_stack_turnd(extra: &str) -> (common::Turnd, SocketAddr) {
    let p4 = common::free_port();
    let p6 = (0..100)
        .map(|_| common::free_port())
        .find(|p| UdpSocket::bind(("::1", *p)).is_ok())
        .expect("a free port on ::1");
    let v6: SocketAddr = format!("[::1]:{p6}").parse().unwrap();
    let probe: SocketAddr = format!("127.0.0.1:{p4}").parse().unwrap();
    let server = common::Turnd::builder().config(probe, |_| {
        format!(
            "[auth]\nsecrets = [\"{}\"]\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{p4}\"\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"[::1]:{p6}\"\n\
             [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n{extra}",
            common::SECRET
        )
    }).start();
    (server, v6)
}

/// One request from a fresh socket: the size of the answer, if any (1 s).
fn answer_size(to: SocketAddr, req: &[u8]) -> Option<usize> {
    let s = UdpSocket::bind(if to.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s.send_to(req, to).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    assert_eq!(&buf[8..20], &req[8..20], "the answer to this request");
    Some(n)
}

#[test]
fn wire_amplification_ratios() {
    let (server, v6) = dual_stack_turnd("");
    let v4 = server.addr;
    let mut tid = 0u64;
    let mut next = || {
        tid += 1;
        let mut t = [7u8; 12];
        t[4..].copy_from_slice(&tid.to_be_bytes());
        t
    };
    // A nonce and realm from the server, for requests with failing credentials.
    let r = Resp { bytes: {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.send_to(&build(method::ALLOCATE, Class::Request, next(), &[transport_udp()], None, false), v4).unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = s.recv_from(&mut buf).unwrap();
        buf[..n].to_vec()
    } };
    let realm = String::from_utf8(r.get(attr::REALM).unwrap()).unwrap();
    assert_eq!(realm, "turnd", "the default realm");
    let wrong = Creds { username: format!("{}:x", unix_now() + 60), key: [0; 16], nonce: r.get(attr::NONCE).unwrap(), realm, sha256: false };
    let cases: Vec<(&str, SocketAddr, Vec<u8>)> = vec![
        ("Binding, bare (IPv4)", v4, build(method::BINDING, Class::Request, next(), &[], None, false)),
        ("Binding, bare (IPv6)", v6, build(method::BINDING, Class::Request, next(), &[], None, false)),
        ("Binding + FINGERPRINT (IPv4)", v4, build(method::BINDING, Class::Request, next(), &[], None, true)),
        ("Binding + unknown attribute: 420 (IPv4)", v4, build(method::BINDING, Class::Request, next(), &[A::Raw(0x7777, vec![])], None, false)),
        ("Allocate: 401 (IPv4)", v4, build(method::ALLOCATE, Class::Request, next(), &[transport_udp()], None, false)),
        ("Allocate: 401 (IPv6)", v6, build(method::ALLOCATE, Class::Request, next(), &[transport_udp()], None, false)),
        ("Allocate, bare 20 bytes: 401 (IPv4)", v4, build(method::ALLOCATE, Class::Request, next(), &[], None, false)),
        ("Allocate, bare 20 bytes: 401 (IPv6)", v6, build(method::ALLOCATE, Class::Request, next(), &[], None, false)),
        ("Allocate + unknown attribute: 401", v4, build(method::ALLOCATE, Class::Request, next(), &[transport_udp(), A::Raw(0x7777, vec![])], None, false)),
        ("Refresh, bare: 401", v4, build(method::REFRESH, Class::Request, next(), &[], None, false)),
        ("CreatePermission, bare: 401", v4, build(method::CREATE_PERMISSION, Class::Request, next(), &[], None, false)),
        ("ChannelBind, bare: 401", v6, build(method::CHANNEL_BIND, Class::Request, next(), &[], None, false)),
        ("unknown method: 400", v4, build(0x0FF, Class::Request, next(), &[], None, false)),
        ("Allocate, wrong credentials: 401", v4, build(method::ALLOCATE, Class::Request, next(), &[transport_udp()], Some(&wrong), false)),
    ];
    eprintln!("\nunauthenticated request -> answer on the wire (realm \"turnd\", no SOFTWARE):");
    for (name, to, req) in &cases {
        let resp = answer_size(*to, req).unwrap_or_else(|| panic!("{name}: no answer"));
        let ratio = resp as f64 / req.len() as f64;
        eprintln!("  {name:<42} {:>4} -> {resp:>3} bytes  {ratio:.2}x", req.len());
        assert!(resp <= AMPLIFICATION_FACTOR * req.len(), "{name}");
        if name.starts_with("Binding, bare (IPv4)") {
            assert!(resp <= 2 * req.len(), "{name}");
        }
    }
}

#[test]
fn wire_flood_does_not_starve_an_honest_client() {
    const FLOOD_SECS: u64 = 3;
    const FLOOD_PPS: u64 = 15_000;
    let server = common::Turnd::start("");
    let echo = common::EchoPeer::start();
    let target = server.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The flooder: another loopback address, a fixed rate, a fixed count, a time limit.
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let s = UdpSocket::bind("127.0.0.3:0").unwrap();
            s.set_nonblocking(true).unwrap();
            let kinds: Vec<Vec<u8>> = vec![
                build(method::ALLOCATE, Class::Request, [1; 12], &[transport_udp()], None, false),
                build(method::ALLOCATE, Class::Request, [2; 12], &[], None, false),
                build(method::BINDING, Class::Request, [3; 12], &[], None, false),
                build(method::REFRESH, Class::Request, [4; 12], &[A::U32(attr::LIFETIME, 0)], None, false),
                (0..120u8).map(|i| i.wrapping_mul(37)).collect(), // garbage
                vec![0x40, 0x00, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8], // ChannelData, no allocation
            ];
            let (mut sent, mut answers) = (0u64, 0u64);
            let mut buf = [0u8; 2048];
            let start = Instant::now();
            let total = FLOOD_SECS * FLOOD_PPS;
            while sent < total && start.elapsed() < Duration::from_secs(FLOOD_SECS + 2) && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Pace: as many as the elapsed time allows, in small bursts.
                let due = (start.elapsed().as_micros() as u64 * FLOOD_PPS / 1_000_000).min(total);
                while sent < due {
                    let _ = s.send_to(&kinds[(sent % kinds.len() as u64) as usize], target);
                    sent += 1;
                }
                while s.recv_from(&mut buf).is_ok() {
                    answers += 1;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            let deadline = Instant::now() + Duration::from_millis(300);
            while Instant::now() < deadline {
                if s.recv_from(&mut buf).is_ok() {
                    answers += 1;
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            (sent, answers, start.elapsed())
        })
    };
    // Let the flood get going (it is paced from its own start), then the honest
    // client allocates, binds a channel and relays through it, during the flood.
    while server.metric("turnd_dropped_packets_total{reason=\"malformed\"}") < 100.0 {
        std::thread::sleep(Duration::from_millis(20));
        assert!(!flooder.is_finished(), "the flood ended before it was seen");
    }
    let t0 = Instant::now();
    let mut c = UdpClient::new("127.0.0.1", target);
    c.allocate("honest", common::SECRET);
    assert_eq!(c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(echo.addr)]).class(), Class::Success);
    let setup = t0.elapsed();
    let (mut sent, mut rtts) = (0u32, Vec::new());
    // Every echo that comes back, late ones included: one echo held up
    // longer than the wait below must not make every later one look lost.
    let mut echoed = std::collections::HashSet::new();
    // 100 packets a second for as long as the flood lasts (at most 3 s).
    while sent < 300 && !flooder.is_finished() {
        let payload = sent.to_be_bytes();
        let at = Instant::now();
        c.send_channel(0x4000, &payload);
        sent += 1;
        let until = at + Duration::from_millis(200);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match c.recv(left) {
                Some(Incoming::Channel { data, .. }) => {
                    let matched = data == payload;
                    echoed.insert(data);
                    if matched {
                        rtts.push(at.elapsed());
                        break;
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        std::thread::sleep(Duration::from_millis(10).saturating_sub(at.elapsed()));
    }
    // The last ones may still be on their way.
    while let Some(Incoming::Channel { data, .. }) = c.recv(Duration::from_millis(300)) {
        echoed.insert(data);
    }
    let got = echoed.len() as u32;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (flood_sent, flood_answers, flood_time) = flooder.join().unwrap();
    rtts.sort();
    let rate_limited = server.metric("turnd_dropped_packets_total{reason=\"rate_limited\"}");
    let malformed = server.metric("turnd_dropped_packets_total{reason=\"malformed\"}");
    eprintln!(
        "flood: {flood_sent} packets in {flood_time:.1?} ({:.0}/s) from 127.0.0.3, {flood_answers} answers; \
         turnd dropped {malformed} malformed, {rate_limited} rate-limited\n\
         honest client: set up in {setup:.1?}, {got}/{sent} echoed during the flood ({} within 200 ms), rtt median {:?}, max {:?}",
        flood_sent as f64 / flood_time.as_secs_f64(),
        rtts.len(),
        rtts.get(rtts.len() / 2),
        rtts.last()
    );
    assert!(sent >= 150, "the honest client relayed during the flood ({sent})");
    assert!(got as f64 >= sent as f64 * 0.98, "honest loss under the flood: {got}/{sent}");
    // Not starved either: nearly all came back within 200 ms (a pause of the
    // whole machine may hold up a few).
    assert!(rtts.len() as f64 >= sent as f64 * 0.9, "honest echoes within 200 ms: {} of {sent}", rtts.len());
    assert!(flood_sent >= FLOOD_SECS * FLOOD_PPS * 8 / 10, "the flood ran ({flood_sent})");
    // The flooding source got at most its burst plus its rate (100/s) of answers.
    let budget = turnd::turn::DEFAULT_UNAUTH_RATE as f64 * (1.0 + flood_time.as_secs_f64() + 1.0);
    assert!((flood_answers as f64) <= budget, "{flood_answers} answers to the flooder (budget {budget})");
    assert!(rate_limited > 1000.0);
    assert_eq!(server.metric("turnd_allocations{family=\"ipv4\",transport=\"udp\"}"), 1.0, "the flood allocated nothing");
    echo.finish();
}

/// How long until the server closes `s` (reads until EOF or an error, bounded).
fn closed_after(s: TcpStream, started: Instant, limit: Duration) -> Option<Duration> {
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    read_until_closed(s, started, limit)
}

/// Reads `s` (whose reads time out) until EOF or an error: how long that took, within `limit`.
fn read_until_closed(mut s: impl Read, started: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

/// Writes `bytes` one at a time, `gap` apart, until the server closes or `limit` passes.
fn trickle(s: TcpStream, bytes: &[u8], gap: Duration, started: Instant, limit: Duration) -> Option<Duration> {
    let reader = s.try_clone().unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (mut s, bytes, done) = (s, bytes.to_vec(), done.clone());
        std::thread::spawn(move || {
            for b in bytes.iter().cycle().take(1000) {
                if done.load(std::sync::atomic::Ordering::Relaxed) || started.elapsed() > limit || s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(gap);
            }
        })
    };
    let r = closed_after(reader, started, limit);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    r
}

#[test]
fn wire_slowloris_and_idle_connections_are_cut() {
    let server = common::Turnd::builder().extra("[limits]\ntls_handshake_timeout = \"1s\"\nidle_timeout = \"2s\"\n").streams().start();
    let tcp = SocketAddr::new(server.addr.ip(), server.port);
    let tls = SocketAddr::new(server.addr.ip(), server.tls_port);
    let limit = Duration::from_secs(8);
    // A ClientHello's first bytes (a TLS record header and the start of the handshake).
    let hello: Vec<u8> = [&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03][..], &[0x42; 64][..]].concat();
    let binding = build(method::BINDING, Class::Request, [9; 12], &[], None, false);
    type Case = (&'static str, Duration, Duration, Box<dyn FnOnce(Instant) -> Option<Duration> + Send>);
    let cases: Vec<Case> = vec![
        ("TLS, silent", Duration::from_millis(900), Duration::from_secs(3), Box::new(move |t0| closed_after(TcpStream::connect(tls).unwrap(), t0, limit))),
        ("TLS, partial ClientHello then silent", Duration::from_millis(900), Duration::from_secs(3), {
            let hello = hello.clone();
            Box::new(move |t0| {
                let mut s = TcpStream::connect(tls).unwrap();
                s.write_all(&hello[..20]).unwrap();
                closed_after(s, t0, limit)
            })
        }),
        ("TLS, ClientHello trickled a byte per 100 ms", Duration::from_millis(900), Duration::from_secs(3), {
            let hello = hello.clone();
            Box::new(move |t0| trickle(TcpStream::connect(tls).unwrap(), &hello, Duration::from_millis(100), t0, limit))
        }),
        ("TLS, handshake done, then silent", Duration::from_millis(1900), Duration::from_secs(4), Box::new(move |t0| {
            let mut tcp = TcpStream::connect(tls).unwrap();
            let mut conn = rustls::ClientConnection::new(wire::insecure_tls_config(), "localhost".try_into().unwrap()).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).expect("TLS handshake");
            }
            tcp.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            read_until_closed(rustls::StreamOwned::new(conn, tcp), t0, limit)
        })),
        ("TCP, silent", Duration::from_millis(1900), Duration::from_secs(4), Box::new(move |t0| closed_after(TcpStream::connect(tcp).unwrap(), t0, limit))),
        ("TCP, a STUN header trickled a byte per 300 ms", Duration::from_millis(1900), Duration::from_secs(4), {
            let b = binding.clone();
            Box::new(move |t0| trickle(TcpStream::connect(tcp).unwrap(), &b[..19], Duration::from_millis(300), t0, limit))
        }),
        ("TCP, Bindings every 700 ms for 2.8 s, then silent", Duration::from_millis(4500), Duration::from_secs(7), {
            let b = binding.clone();
            Box::new(move |t0| {
                let mut s = TcpStream::connect(tcp).unwrap();
                let reader = s.try_clone().unwrap();
                for _ in 0..5 {
                    s.write_all(&b).unwrap();
                    std::thread::sleep(Duration::from_millis(700));
                }
                closed_after(reader, t0, limit)
            })
        }),
    ];
    let handles: Vec<_> = cases
        .into_iter()
        .map(|(name, min, max, f)| {
            std::thread::spawn(move || {
                let t0 = Instant::now();
                (name, min, max, f(t0))
            })
        })
        .collect();
    // Meanwhile a TCP client with an allocation stays connected past the idle timeout.
    let mut alloc = StreamClient::tcp(tcp);
    alloc.allocate("tcp", common::SECRET);
    for h in handles {
        let (name, min, max, got) = h.join().unwrap();
        eprintln!("{name}: closed after {got:.2?}");
        let got = got.unwrap_or_else(|| panic!("{name}: still open after {limit:?}"));
        assert!(got >= min && got <= max, "{name}: closed after {got:?}, expected {min:?}..{max:?}");
    }
    let r = alloc.transact(method::REFRESH, &[]);
    assert_eq!(r.class(), Class::Success, "the connection with an allocation outlived the idle timeout");
    assert!(server.metric("turnd_tls_handshake_failures_total") >= 3.0);
    assert_eq!(server.metric("turnd_connections{transport=\"tcp\"}"), 1.0);
    assert_eq!(server.metric("turnd_connections{transport=\"tls\"}"), 0.0);
}

/// Out of file descriptors: Allocate gets 508 (not a crash or a hang), the
/// log says why once, and /readyz fails so probes send new sessions elsewhere.
#[test]
fn running_out_of_descriptors_refuses_allocations_and_reports_not_ready() {
    // 64 descriptors: the reserve (turnd's own listeners, metrics, epoll,
    // log, and room for metrics/admin connections) and a dozen relay sockets.
    let server = common::Turnd::builder().nofile(64).start();
    assert_eq!(server.http_get("/readyz").0, 200);
    let mut held = Vec::new();
    let mut refused = None;
    for i in 0..64 {
        let mut c = wire::UdpClient::new("127.0.0.1", server.addr);
        match c.try_allocate(&format!("fd{i}"), common::SECRET).code() {
            None => held.push(c),
            Some(code) => {
                refused = Some(code);
                break;
            }
        }
    }
    assert_eq!(refused, Some(508), "held {} allocations", held.len());
    assert!((10..48).contains(&held.len()), "held {}", held.len());
    let (code, body) = server.http_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("file descriptors"), "{body}");
    // Once, not per refused request.
    let mut c = wire::UdpClient::new("127.0.0.1", server.addr);
    assert_eq!(c.try_allocate("fd-again", common::SECRET).code(), Some(508));
    assert_eq!(server.log().matches("out of file descriptors").count(), 1, "{}", server.log());
    // What is held still relays.
    let peer = common::EchoPeer::start();
    let a = &mut held[0];
    a.transact(method::CREATE_PERMISSION, &[peer_at(peer.addr)]);
    a.send_indication(peer.addr, b"still here");
    assert!(a.recv(Duration::from_secs(2)).is_some());
}

/// Another address of the host, inside an allowed range: only relay ports.
/// A network namespace puts a 198.18.x.1 address on the host (its veth end);
/// turnd reads it from the interfaces, so its metrics port there is refused
/// while a relay port there, and the namespace's own address, are not.
#[test]
fn wire_other_host_addresses_are_reachable_only_on_relay_ports() {
    let ns = netns::NetNs::create_udp_blocked();
    let host = std::net::IpAddr::V4(ns.host_ip());
    let other = std::net::IpAddr::V4(ns.ns_ip());
    let server = common::Turnd::builder().extra("[peers]\nallow = [\"127.0.0.0/8\", \"198.18.0.0/15\"]\n").no_loopback_peers().start();
    let mut c = wire::UdpClient::new("127.0.0.1", server.addr);
    c.allocate("hostaddr", common::SECRET);
    let bind = |c: &mut wire::UdpClient, n: u16, to: SocketAddr| c.transact(method::CHANNEL_BIND, &[channel(n), peer_at(to)]).code();
    assert_eq!(bind(&mut c, 0x4000, SocketAddr::new(host, server.metrics_port)), Some(403), "the host's metrics port via its veth address");
    assert_eq!(bind(&mut c, 0x4001, SocketAddr::new(host, 22)), Some(403));
    assert_eq!(bind(&mut c, 0x4002, SocketAddr::new(host, 25_000)), None, "a relay port on a host address");
    assert_eq!(bind(&mut c, 0x4003, SocketAddr::new(other, server.metrics_port)), None, "not a host address: the allow list decides");
}

/// The I/O layer's sweep really ends allocations on the clock (the core's
/// expiry is tested with a fake clock; this is the timer that drives it):
/// with 60 s lifetimes, the shortest allowed, an allocation left alone ends
/// after 60 s, not before, and its relay port is free again.
#[test]
fn wire_an_unrefreshed_allocation_expires_and_frees_its_port() {
    let server = common::Turnd::start("[limits]\ndefault_lifetime = \"60s\"\nmax_lifetime = \"60s\"\n");
    let mut c = UdpClient::new("127.0.0.1", server.addr);
    c.allocate("expiry", common::SECRET);
    let t0 = Instant::now();
    let in_use = "turnd_relay_ports{state=\"in_use\"}";
    let expired = "turnd_allocations_ended_total{reason=\"expired\"}";
    assert_eq!(server.metric(in_use), 1.0);
    while server.metric(expired) < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(75), "not expired after 75 s:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(59), "ended early, after {took:?}");
    assert!(took < Duration::from_secs(65), "the sweep visits every allocation about once a second; took {took:?}");
    assert_eq!(server.metric(in_use), 0.0, "the relay port is free again");
}
