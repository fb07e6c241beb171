//! The XDP fast path (feature `xdp`) on real interfaces: the rig of
//! `common/xdp.rs`, a client's and a peer's network namespace joined to the
//! host by veth pairs, turnd on the host listening on the client's host end
//! and relaying from the peer's, the program attached in native mode to
//! both host ends.
//!
//! Proves: both directions are relayed by the program (the veths'
//! `xdp_redirect` counters move by one per packet) with the same bytes and
//! addresses the socket path sends; turnd counts them (metrics and
//! sessions); after a permission expires, after a disconnect, for a peer
//! whose ChannelBind was refused, and after a reload that takes the peer's
//! range out of `peers.allow`, nothing is relayed by the program; the
//! allocation's and the relay's bandwidth caps hold in the kernel (a burst
//! passes one second's worth, the rest is dropped and counted); IPv6 as
//! IPv4, and across them (an IPv4 client with an IPv6 peer and the other
//! way round, the program writing the other family's headers); clients
//! of a wildcard listener are relayed from the address the route chooses,
//! as the socket path answers them; an upgrade in place keeps the fast path; the capabilities of
//! deploy/systemd/xdp.conf are enough, and without CAP_PERFMON the log
//! says so; a datagram that would not fit the client's MTU with the
//! ChannelData header goes the socket path, whole; and coturn's
//! turnutils_uclient, a client independent of ours, relays through the
//! program to coturn's turnutils_peer without loss over IPv4 and IPv6.
//!
//! Every wait is a condition with a bound: the warm-up of each channel
//! lasts until the program relays a round both ways, turnd's counters are
//! read until they match (it reads the program's back about once a second),
//! a datagram that must arrive may take 5 s, and "nothing arrives" is a
//! quiet window of 400 ms. The one fixed wait is the permission's lifetime.
//!
//! Compiled only with `--features xdp`. Needs root, `ip netns`, ethtool and
//! coturn's turnutils. Fails, never skips.
#![cfg(feature = "xdp")]

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
mod common;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/xdp.rs"]
mod xdp_rig;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Turnd, SECRET};
use harness::A;
use turnd::stun::{attr, method, ChannelData, Class};
use wire::{peer_at, UdpClient};
use xdp_rig::{must, settle, Rig};

/// How long a datagram that must arrive may take (a loaded machine).
const ARRIVES: Duration = Duration::from_secs(5);
/// How long a socket must stay silent to show that nothing was relayed.
const QUIET: Duration = Duration::from_millis(400);
/// How long turnd may take to publish what the program relayed.
const SETTLES: Duration = Duration::from_secs(10);

const WARM_TO_PEER: &[u8] = b"warm-to-peer";
const WARM_TO_CLIENT: &[u8] = b"warm-to-client";

/// A client in the client's namespace, toward the IPv4 listener.
fn client(rig: &Rig) -> UdpClient {
    let mut c = UdpClient::new("127.0.0.1", rig.server);
    c.sock = rig.client_ns.udp_socket(SocketAddr::new(rig.client_ns.ns_ip().into(), 0));
    c
}

/// A client over IPv6 with an IPv6 relayed address.
fn client6(rig: &Rig) -> (UdpClient, SocketAddr) {
    let mut c = UdpClient::new("127.0.0.1", rig.server6.unwrap());
    c.sock = rig.client_ns.udp_socket(SocketAddr::new(rig.ns6.unwrap().0.into(), 0));
    let family = || A::Raw(attr::REQUESTED_ADDRESS_FAMILY, vec![0x02, 0, 0, 0]);
    let r = c.transact(method::ALLOCATE, &[harness::transport_udp(), family()]);
    c.creds = Some(wire::rest_creds(&r, "vic", SECRET));
    let r = c.transact(method::ALLOCATE, &[harness::transport_udp(), family()]);
    assert_eq!(r.class(), Class::Success, "allocate over IPv6: {:?}", r.code());
    (c, r.addr(attr::XOR_RELAYED_ADDRESS).unwrap())
}

/// A peer in the peer's namespace, on its IPv4 address.
fn peer(rig: &Rig) -> UdpSocket {
    rig.peer_ns.udp_socket(SocketAddr::new(rig.peer_ns.ns_ip().into(), 0))
}

fn peer6(rig: &Rig) -> UdpSocket {
    rig.peer_ns.udp_socket(SocketAddr::new(rig.ns6.unwrap().1.into(), 0))
}

fn bind(c: &mut UdpClient, number: u16, peer: SocketAddr) -> Class {
    let b = number.to_be_bytes();
    c.transact(method::CHANNEL_BIND, &[A::Raw(attr::CHANNEL_NUMBER, vec![b[0], b[1], 0, 0]), peer_at(peer)]).class()
}

fn recv_within(s: &UdpSocket, limit: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 70_000];
    s.set_read_timeout(Some(limit)).unwrap();
    s.recv_from(&mut buf).ok().map(|(n, from)| (buf[..n].to_vec(), from))
}

/// The next datagram on `s`, one that must arrive (within ARRIVES): bytes and source.
fn recv(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    recv_within(s, ARRIVES)
}

/// Whatever arrives on `s` within the QUIET window: for checks that nothing does.
fn recv_quiet(s: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    recv_within(s, QUIET)
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

/// Warms channel `number` up: a round is WARM_TO_PEER from the client and
/// WARM_TO_CLIENT from the peer, each checked to arrive with the bytes and
/// source the socket path sends; rounds go on until one went through the
/// program both ways (the first may take the socket path while the host
/// resolves the namespaces' neighbours). Bounded: 5 s. Returns the number
/// of rounds, which turnd counts like any datagram.
fn warm(rig: &Rig, c: &UdpClient, peer: &UdpSocket, number: u16, relayed: SocketAddr) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rounds = 0u64;
    loop {
        let before = rig.redirects();
        c.send_channel(number, WARM_TO_PEER);
        assert_eq!(recv(peer), Some((WARM_TO_PEER.to_vec(), relayed)), "warm-up round {rounds}: to the peer");
        peer.send_to(WARM_TO_CLIENT, relayed).unwrap();
        assert_eq!(recv(&c.sock), Some((channel_data(number, WARM_TO_CLIENT), c.server)), "warm-up round {rounds}: to the client");
        rounds += 1;
        let after = rig.redirects();
        if after.0 > before.0 && after.1 > before.1 {
            return rounds;
        }
        assert!(
            Instant::now() < deadline,
            "after {rounds} rounds in 5 s, no round went through the program both ways (last: {before:?} -> {after:?})\n{}",
            rig.turnd.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client in the client's namespace with an allocation for `user` and
/// channel 0x4000 bound to a peer in the peer's namespace, warmed up until
/// the program relays it both ways: (client, peer, relayed address).
fn warmed_channel(rig: &Rig, user: &str) -> (UdpClient, UdpSocket, SocketAddr) {
    let mut c = client(rig);
    let relayed = c.allocate(user, SECRET);
    let peer = peer(rig);
    assert_eq!(bind(&mut c, 0x4000, peer.local_addr().unwrap()), Class::Success);
    warm(rig, &c, &peer, 0x4000, relayed);
    (c, peer, relayed)
}

/// turnd's relayed packets and bytes over UDP, as /metrics says:
/// (packets to the peer, to the client, bytes to the peer, to the client).
fn relayed_metrics(t: &Turnd) -> (u64, u64, u64, u64) {
    let m = |dir: &str, what: &str| t.metric(&format!("turnd_relayed_{what}_total{{direction=\"{dir}\",transport=\"udp\"}}")) as u64;
    (m("to_peer", "packets"), m("to_client", "packets"), m("to_peer", "bytes"), m("to_client", "bytes"))
}

/// The session of `client` as `turnctl sessions` lists it: (packets to the
/// peer, from the peer, bytes to the peer, from the peer); None without one.
fn session_counts(rig: &Rig, client: SocketAddr) -> Option<(u64, u64, u64, u64)> {
    let s = rig.session(client)?;
    let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s:#}"));
    Some((n("packets_to_peer"), n("packets_from_peer"), n("bytes_to_peer"), n("bytes_from_peer")))
}

#[test]
fn both_directions_are_relayed_in_the_kernel_with_the_socket_paths_bytes() {
    let rig = Rig::start("");
    let mut c = client(&rig);
    let relayed = c.allocate("alice", SECRET);
    let peer = peer(&rig);
    let peer_addr = peer.local_addr().unwrap();
    assert_eq!(bind(&mut c, 0x4000, peer_addr), Class::Success);
    // The first round may take the socket path (the host has not resolved
    // the peer yet): what turnd's sockets send is what the warm-up checks,
    // and what the program must send below.
    let rounds = warm(&rig, &c, &peer, 0x4000, relayed);

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

    // turnd counts them, the warm-up's too: metrics and sessions, once it
    // has read the program's counters back (about once a second).
    let k = n as u64 + rounds;
    let want = (k, k, bytes_to + rounds * WARM_TO_PEER.len() as u64, bytes_from + rounds * WARM_TO_CLIENT.len() as u64);
    let got = settle(SETTLES, &want, || relayed_metrics(&rig.turnd));
    assert_eq!(got, want, "relayed packets and bytes on /metrics (to peer, to client; {rounds} warm-up rounds)");
    let me = c.sock.local_addr().unwrap();
    let got = settle(SETTLES, &Some(want), || session_counts(&rig, me));
    assert_eq!(got, Some(want), "the session's packets and bytes: {:#}", rig.admin_sessions());

    // A reload that sets the default bandwidth cap: the program relays on,
    // holding the channel to it.
    reload(&rig, &[("allocation_bandwidth = 0", "allocation_bandwidth = \"50 Mbit/s\"")]);
    let before = rig.redirects();
    c.send_channel(0x4000, b"capped");
    assert_eq!(recv(&peer).map(|r| r.0), Some(b"capped".to_vec()));
    peer.send_to(b"capped back", relayed).unwrap();
    assert_eq!(recv(&c.sock).map(|r| r.0), Some(channel_data(0x4000, b"capped back")));
    let after = rig.redirects();
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1), "under a cap the program relays on");
}

/// Rewrites turnd's config file (each `from` to its `to`) and reloads it.
fn reload(rig: &Rig, edits: &[(&str, &str)]) {
    let mut cfg = std::fs::read_to_string(&rig.turnd.config).unwrap();
    for (from, to) in edits {
        assert!(cfg.contains(from), "{from} not in the config:\n{cfg}");
        cfg = cfg.replace(from, to);
    }
    std::fs::write(&rig.turnd.config, cfg).unwrap();
    let (rc, out) = common::turnctl_reload(&rig.turnd);
    assert_eq!(rc, 0, "reload: {out}");
}

#[test]
fn ipv6_both_directions_are_relayed_in_the_kernel() {
    let rig = Rig::start("");
    let (mut c, relayed) = client6(&rig);
    assert!(relayed.is_ipv6(), "{relayed}");
    let peer = peer6(&rig);
    assert_eq!(bind(&mut c, 0x4001, peer.local_addr().unwrap()), Class::Success);
    let rounds = warm(&rig, &c, &peer, 0x4001, relayed);
    let before = rig.redirects();
    let n = 100usize;
    for i in 0..n {
        let d = payload(i, [0, 1, 3, 4, 100, 1000, 1400][i % 7]);
        c.send_channel(0x4001, &d);
        assert_eq!(recv(&peer), Some((d, relayed)), "datagram {i} to the peer");
        let d = payload(i + 1000, [1, 2, 5, 64, 999, 1400][i % 6]);
        peer.send_to(&d, relayed).unwrap();
        assert_eq!(recv(&c.sock), Some((channel_data(0x4001, &d), rig.server6.unwrap())), "datagram {i} to the client");
    }
    let after = rig.redirects();
    assert_eq!((after.0 - before.0, after.1 - before.1), (n as u64, n as u64), "every datagram was redirected by the program");
    let k = n as u64 + rounds;
    let packets = || {
        let m = relayed_metrics(&rig.turnd);
        (m.0, m.1)
    };
    assert_eq!(settle(SETTLES, &(k, k), packets), (k, k), "relayed packets on /metrics (to peer, to client; {rounds} warm-up rounds)");
}

#[test]
fn nothing_is_relayed_in_the_kernel_after_expiry_disconnect_or_for_another_peer() {
    let rig = Rig::start("permission_lifetime = 30\n");
    let peer = peer(&rig);
    let peer_addr = peer.local_addr().unwrap();

    // A disconnect removes the allocation's channels at once.
    let mut d = client(&rig);
    let relayed_d = d.allocate("dora", SECRET);
    assert_eq!(bind(&mut d, 0x4000, peer_addr), Class::Success);
    let rounds = warm(&rig, &d, &peer, 0x4000, relayed_d);
    let before = rig.redirects();
    d.send_channel(0x4000, b"fast");
    assert_eq!(recv(&peer).map(|r| r.0), Some(b"fast".to_vec()));
    assert_eq!(rig.redirects().0, before.0 + 1, "relayed by the program before the disconnect");
    let (rc, out) = common::turnctl(&rig.turnd, &["disconnect", "--user", "dora"]);
    assert_eq!(rc, 0, "turnctl disconnect: {out}");
    let before = rig.redirects();
    d.send_channel(0x4000, b"after disconnect");
    peer.send_to(b"after disconnect", relayed_d).unwrap();
    assert_eq!(recv_quiet(&peer), None, "nothing reaches the peer after a disconnect");
    assert_eq!(recv_quiet(&d.sock), None, "nothing reaches the client after a disconnect");
    assert_eq!(rig.redirects(), before, "the program relays nothing after a disconnect");
    // The ended allocation's log line counts what the program relayed in
    // its last second too (the warm-up's and "fast").
    let ended = |log: String| log.lines().find(|l| l.contains("allocation ended") && l.contains("dora")).map(str::to_owned);
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        match ended(rig.turnd.log()) {
            Some(l) => break l,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!("no allocation ended line for dora:\n{}", rig.turnd.log()),
        }
    };
    let to_peer = rounds * WARM_TO_PEER.len() as u64 + 4;
    let from_peer = rounds * WARM_TO_CLIENT.len() as u64;
    let field = |f: String| line.split_whitespace().any(|w| w == f);
    assert!(field(format!("bytes_to_peer={to_peer}")) && field(format!("bytes_from_peer={from_peer}")), "{rounds} warm-up rounds: {line}");

    // A peer the client has no channel to: its datagrams stay Data
    // indications (the socket path), and a ChannelBind of the bound number
    // to it is refused, so the channel keeps its peer.
    let mut c = client(&rig);
    let relayed = c.allocate("carl", SECRET);
    assert_eq!(bind(&mut c, 0x4000, peer_addr), Class::Success);
    let bound_at = Instant::now();
    warm(&rig, &c, &peer, 0x4000, relayed);
    let other = self::peer(&rig);
    let other_addr = other.local_addr().unwrap();
    assert_eq!(bind(&mut c, 0x4000, other_addr), Class::Error, "a bound number keeps its peer");
    let before = rig.redirects();
    other.send_to(b"from another peer", relayed).unwrap();
    match c.recv(ARRIVES) {
        Some(wire::Incoming::Data { peer, data }) => assert_eq!((peer, data.as_slice()), (other_addr, &b"from another peer"[..])),
        other => panic!("expected a Data indication, got {other:?}"),
    }
    c.send_channel(0x4000, b"to the bound peer");
    assert_eq!(recv(&peer).map(|r| r.0), Some(b"to the bound peer".to_vec()));
    assert_eq!(recv_quiet(&other), None);
    let after = rig.redirects();
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 0), "the program relays the bound channel only");

    // Once the permission (30 s from the ChannelBind) has expired, the
    // program relays nothing, though the binding (600 s) still stands:
    // turnd drops both ways. (A lifetime, not a readiness: waited out.)
    let expired = bound_at + Duration::from_secs(31);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    let before = rig.redirects();
    c.send_channel(0x4000, b"after expiry");
    peer.send_to(b"after expiry", relayed).unwrap();
    assert_eq!(recv_quiet(&peer), None, "nothing reaches the peer after the permission expired");
    assert_eq!(recv_quiet(&c.sock), None, "nothing reaches the client after the permission expired");
    assert_eq!(rig.redirects(), before, "the program relays nothing once the permission expired");
}

#[test]
fn a_datagram_that_would_not_fit_the_clients_mtu_goes_the_socket_path() {
    let rig = Rig::start("");
    // The client's link carries 1400-byte packets; the peer's 1500.
    must(Command::new("ip").args(["link", "set", "dev", &rig.client_ns.host_if(), "mtu", "1400"]));
    must(rig.client_ns.command("ip").args(["link", "set", "dev", &rig.client_ns.ns_if(), "mtu", "1400"]));
    let (c, peer, relayed) = warmed_channel(&rig, "mia");
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

/// coturn's turnutils_peer, a UDP echo, in the rig's peer namespace on
/// `ip` (port PEER_PORT); killed when dropped, however the test ends.
struct CoturnPeer(std::process::Child);

/// turnutils_peer's port; the peer's namespace is the test's own, so it is free.
const PEER_PORT: u16 = 3480;

impl CoturnPeer {
    /// Starts it and waits until it echoes (bounded: 5 s).
    fn start(rig: &Rig, ip: std::net::IpAddr) -> CoturnPeer {
        use std::os::unix::process::CommandExt;
        assert!(common::on_path("turnutils_peer"), "turnutils_peer is missing: test.sh installs Debian's coturn package");
        let child = rig
            .peer_ns
            .command("turnutils_peer")
            .args(["-L", &ip.to_string(), "-p", &PEER_PORT.to_string()])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run turnutils_peer");
        let mut peer = CoturnPeer(child);
        // From the peer's namespace itself: nothing crosses the veths.
        let probe = rig.peer_ns.udp_socket(SocketAddr::new(ip, 0));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            probe.send_to(b"are you there", (ip, PEER_PORT)).unwrap();
            if recv_within(&probe, Duration::from_millis(100)).is_some_and(|(d, _)| d == b"are you there") {
                return peer;
            }
            if let Ok(Some(st)) = peer.0.try_wait() {
                panic!("turnutils_peer exited ({st}) before it echoed");
            }
            assert!(Instant::now() < deadline, "turnutils_peer on {ip}:{PEER_PORT} did not echo within 5 s");
        }
    }
}

impl Drop for CoturnPeer {
    fn drop(&mut self) {
        common::kill_group(&mut self.0);
    }
}

/// coturn's turnutils_uclient in the client's namespace: `clients`
/// allocations (`-m`, no RTCP pairs: `-c`), each binding a channel to
/// turnutils_peer in the peer's namespace and sending `messages` ChannelData
/// of 200 bytes, which the peer echoes. No loss, and the program relayed at
/// least every message both ways (the host resolved both namespaces'
/// neighbours first, so not even the first one takes the socket path).
fn uclient_relays_through_the_program(ipv6: bool) {
    // uclient picks channel numbers up to 0x7FFF, as RFC 5766 allowed.
    let rig = Rig::start("legacy_channel_numbers = true\n");
    let (server, peer_ip) = match (rig.server6, rig.ns6) {
        (Some(s6), Some((_, p6))) if ipv6 => (s6, p6.into()),
        _ => (rig.server, rig.peer_ns.ns_ip().into()),
    };
    let _peer = CoturnPeer::start(&rig, peer_ip);
    rig.resolve_neighbours();
    assert!(common::on_path("turnutils_uclient"), "turnutils_uclient is missing: test.sh installs Debian's coturn package");
    let (clients, messages) = (4u64, 100u64);
    let mut cmd = rig.client_ns.command("turnutils_uclient");
    cmd.args(["-c", "-m", &clients.to_string(), "-n", &messages.to_string(), "-l", "200"])
        .args(["-e", &peer_ip.to_string(), "-r", &PEER_PORT.to_string()])
        .args(["-p", &server.port().to_string(), "-W", SECRET]);
    if ipv6 {
        // An IPv6 relayed address (without it the relay's family is IPv4).
        cmd.arg("-x");
    }
    cmd.arg(server.ip().to_string());
    let before = rig.redirects();
    let run = common::run_bounded(&mut cmd, Duration::from_secs(60));
    let after = rig.redirects();
    let text = format!("{}{}", run.stdout, run.stderr);
    assert_eq!(run.code, 0, "turnutils_uclient failed:\n{}\n--- turnd log ---\n{}", run.text(), rig.turnd.log());
    let s = common::uclient_summary(&text);
    let moved = (after.0 - before.0, after.1 - before.1);
    eprintln!("uclient over IPv{}: sent {} received {} lost {}; redirected {moved:?} in {:?}", if ipv6 { 6 } else { 4 }, s.sent, s.received, s.lost, run.elapsed);
    assert_eq!(s.sent, clients * messages, "{text}");
    assert_eq!((s.received, s.lost), (s.sent, 0), "loss through the fast path:\n{text}");
    assert!(moved.0 >= s.sent, "the program relayed {} of {} messages toward the peer:\n{text}", moved.0, s.sent);
    assert!(moved.1 >= s.sent, "the program relayed {} of {} echoes toward the client:\n{text}", moved.1, s.sent);
}

#[test]
fn coturn_uclient_relays_through_the_program_without_loss() {
    uclient_relays_through_the_program(false);
}

#[test]
fn coturn_uclient_relays_through_the_program_over_ipv6() {
    uclient_relays_through_the_program(true);
}

/// Relays a datagram each way through a channel of a turnd on 127.0.0.1.
fn relays_on_loopback(t: &Turnd) {
    let mut c = UdpClient::new("127.0.0.1", t.addr);
    let relayed = c.allocate("lou", SECRET);
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
    // CAP_BPF and CAP_NET_ADMIN without CAP_PERFMON: the verifier refuses
    // the program's variable packet offsets, and the log names what is missing.
    let wrap = ["setpriv".to_string(), "--bounding-set=-all,+bpf,+net_admin,+net_bind_service".to_string()];
    let t = Turnd::builder().extra("[xdp]\ninterfaces = [\"lo\"]\n").wrap(&wrap).start();
    t.wait_log("XDP fast path off, relaying on the socket path");
    assert!(t.log().contains("CAP_PERFMON"), "{}", t.log());
    relays_on_loopback(&t);
}

/// Lets `s` queue a burst (8 MiB, past net.core.rmem_max: SO_RCVBUFFORCE as root).
fn big_receive_buffer(s: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt reads an int from a pointer to a live local of that size.
    let rc = unsafe { libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size as *const _ as *const libc::c_void, 4) };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

/// Sends `n` datagrams with `send` as fast as it goes, then counts what
/// reaches `to` until it has been quiet for QUIET; returns the count and
/// how long the sending took.
fn burst(n: usize, mut send: impl FnMut(), to: &UdpSocket) -> (u64, Duration) {
    let start = Instant::now();
    for _ in 0..n {
        send();
    }
    let took = start.elapsed();
    let mut arrived = 0;
    while recv_quiet(to).is_some() {
        arrived += 1;
    }
    (arrived, took)
}

/// What a full bucket of `rate` bytes a second lets through of packets
/// costing `cost` wire bytes, sent over `took`: one second's worth at
/// least, and what refilled while they were sent at most (and one more for
/// the fraction in hand).
fn within_bucket(passed: u64, rate: u64, cost: u64, took: Duration) -> bool {
    let burst = rate / cost;
    let refill = (rate as f64 * took.as_secs_f64() / cost as f64).ceil() as u64;
    (burst..=burst + refill + 1).contains(&passed)
}

#[test]
fn bandwidth_caps_hold_in_the_kernel() {
    let rig = Rig::start_v4("");
    let (c, peer, relayed) = warmed_channel(&rig, "cap");
    big_receive_buffer(&peer);
    big_receive_buffer(&c.sock);
    let dropped = |reason: &str| rig.turnd.metric(&format!("turnd_dropped_packets_total{{reason=\"{reason}\"}}")) as u64;
    let n = 300;
    let d = payload(3, 1_000);
    // 1 Mbit/s for each allocation, each way: a full bucket holds one
    // second's worth, 125,000 bytes on the wire, and a datagram of 1,000
    // bytes costs 1,032 (28 of IPv4 and UDP, 4 of ChannelData).
    reload(&rig, &[("allocation_bandwidth = 0", "allocation_bandwidth = \"1 Mbit/s\"")]);
    let before = rig.redirects();
    let (to_peer, took) = burst(n, || c.send_channel(0x4000, &d), &peer);
    assert!(within_bucket(to_peer, 125_000, 1_032, took), "{to_peer} of {n} reached the peer in {took:?}");
    assert_eq!(rig.redirects().0 - before.0, to_peer, "every one that passed was relayed by the program");
    let (to_client, took) = burst(n, || drop(peer.send_to(&d, relayed)), &c.sock);
    assert!(within_bucket(to_client, 125_000, 1_032, took), "{to_client} of {n} reached the client in {took:?}");
    assert_eq!(rig.redirects().1 - before.1, to_client, "every one that passed was relayed by the program");
    // The program's drops are turnd's: counted by the cap that stopped them.
    // Held to the rate beyond the burst: 250,000 bytes a second offered for
    // 2 s (a datagram every 4 ms, twice the cap) pass at the cap's refill,
    // plus what refilled since the burst (one second's worth at most).
    let start = Instant::now();
    let mut offered = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        let due = start + Duration::from_millis(4 * offered);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        c.send_channel(0x4000, &d);
        offered += 1;
    }
    let took = start.elapsed();
    let mut paced = 0u64;
    while recv_quiet(&peer).is_some() {
        paced += 1;
    }
    let most = ((125_000.0 * (1.0 + took.as_secs_f64())) / 1_032.0).ceil() as u64 + 1;
    let least = (125_000.0 * took.as_secs_f64() * 0.7 / 1_032.0) as u64;
    assert!((least..=most).contains(&paced), "{paced} of {offered} paced datagrams passed in {took:?} (between {least} and {most})");
    let want = 2 * n as u64 + offered - to_peer - to_client - paced;
    assert_eq!(settle(SETTLES, &want, || dropped("allocation_bandwidth")), want, "drops over the allocation's cap on /metrics");

    // The relay's total, 1 Mbit/s, for allocations without a cap of their own.
    reload(&rig, &[("allocation_bandwidth = \"1 Mbit/s\"", "allocation_bandwidth = 0"), ("total_bandwidth = 0", "total_bandwidth = \"1 Mbit/s\"")]);
    let before = rig.redirects();
    let (to_peer, took) = burst(n, || c.send_channel(0x4000, &d), &peer);
    assert!(within_bucket(to_peer, 125_000, 1_032, took), "{to_peer} of {n} reached the peer in {took:?} under the total cap");
    assert_eq!(rig.redirects().0 - before.0, to_peer);
    let want = n as u64 - to_peer;
    assert_eq!(settle(SETTLES, &want, || dropped("total_bandwidth")), want, "drops over the relay's total on /metrics");
    // What the program relayed, as turnd tells it (the veths are the rig's own, so their counts are all of it).
    let fast = || {
        let m = |dir: &str| rig.turnd.metric(&format!("turnd_fast_path_packets_total{{direction=\"{dir}\"}}")) as u64;
        (m("to_peer"), m("to_client"))
    };
    let want = rig.redirects();
    assert_eq!(settle(SETTLES, &want, fast), want, "turnd_fast_path_packets_total against the veths' redirects");
}


/// `n` datagrams each way through channel `number`, each checked to arrive
/// whole from the right address; returns how many of each the program
/// relayed (the veths' redirect counts).
fn relay_rounds(rig: &Rig, c: &UdpClient, peer: &UdpSocket, number: u16, relayed: SocketAddr, n: usize) -> (u64, u64) {
    let before = rig.redirects();
    for i in 0..n {
        let d = payload(i, 100 + i);
        c.send_channel(number, &d);
        assert_eq!(recv(peer), Some((d.clone(), relayed)), "datagram {i} to the peer");
        peer.send_to(&d, relayed).unwrap();
        assert_eq!(recv(&c.sock), Some((channel_data(number, &d), c.server)), "datagram {i} to the client");
    }
    let after = rig.redirects();
    (after.0 - before.0, after.1 - before.1)
}

#[test]
fn a_wildcard_listeners_clients_are_relayed_in_the_kernel() {
    let rig = Rig::start_with("", xdp_rig::Opts { ipv6: true, wildcard: true, ..Default::default() });
    assert!(rig.turnd.log().contains("0.0.0.0:"), "listening on the wildcard address:\n{}", rig.turnd.log());
    let mut c = client(&rig);
    let relayed = c.allocate("wanda", SECRET);
    let peer = peer(&rig);
    assert_eq!(bind(&mut c, 0x4000, peer.local_addr().unwrap()), Class::Success);
    // warm and relay_rounds check that each ChannelData comes from the
    // address the client sent to (the host end's only one, which the route
    // chooses), as from the socket path.
    warm(&rig, &c, &peer, 0x4000, relayed);
    assert_eq!(relay_rounds(&rig, &c, &peer, 0x4000, relayed, 50), (50, 50), "every datagram relayed by the program over IPv4");
    let (mut c6, relayed6) = client6(&rig);
    let peer6 = peer6(&rig);
    assert_eq!(bind(&mut c6, 0x4001, peer6.local_addr().unwrap()), Class::Success);
    warm(&rig, &c6, &peer6, 0x4001, relayed6);
    assert_eq!(relay_rounds(&rig, &c6, &peer6, 0x4001, relayed6, 50), (50, 50), "every datagram relayed by the program over IPv6");
}

#[test]
fn a_reload_that_takes_the_peers_range_out_of_peers_allow_stops_the_program_at_once() {
    let rig = Rig::start_v4("");
    let (mut c, peer, relayed) = warmed_channel(&rig, "rita");
    let allowed = format!("allow = [\"{}/32\"]", rig.peer_ns.ns_ip());
    reload(&rig, &[(allowed.as_str(), "allow = []")]);
    rig.turnd.wait_log("permissions and channels of peers the new peer policy refuses have ended");
    let before = rig.redirects();
    c.send_channel(0x4000, b"after the reload");
    peer.send_to(b"after the reload", relayed).unwrap();
    assert_eq!(recv_quiet(&peer), None, "nothing reaches the refused peer");
    assert_eq!(recv_quiet(&c.sock), None, "nothing from the refused peer reaches the client");
    assert_eq!(rig.redirects(), before, "the program relays nothing to or from a peer the policy now refuses");
    // And it cannot be bound again.
    assert_eq!(bind(&mut c, 0x4001, peer.local_addr().unwrap()), Class::Error);
}

#[test]
fn an_upgrade_in_place_keeps_the_fast_path() {
    let rig = Rig::start_v4("");
    let (c, peer, relayed) = warmed_channel(&rig, "uma");
    let (rc, out) = common::turnctl_upgrade(&rig.turnd, std::path::Path::new(env!("CARGO_BIN_EXE_turnd")));
    assert_eq!(rc, 0, "turnctl upgrade: {out}");
    // The new process is not the test's child: killed when the test ends, however it ends.
    let new_pid = rig.turnd.admin_get("/admin/status")["pid"].as_u64().expect("the new process's pid") as i32;
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill takes plain integers; a gone pid only fails.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _kill = Kill(new_pid);
    assert_ne!(new_pid as u32, rig.turnd.pid(), "a new process answers");
    // The new process attaches once the old one has let go.
    let attached = || rig.turnd.log().matches("XDP fast path attached").count();
    assert_eq!(settle(SETTLES, &2, attached), 2, "the new process attached its program:\n{}", rig.turnd.log());
    // The allocation it took over relays through its program, both ways.
    assert_eq!(relay_rounds(&rig, &c, &peer, 0x4000, relayed, 50), (50, 50), "relayed by the new process's program:\n{}", rig.turnd.log());
    // And the new process counts what its program relayed.
    let me = c.sock.local_addr().unwrap();
    let counted = || session_counts(&rig, me).map(|(to, from, ..)| to >= 50 && from >= 50);
    assert_eq!(settle(SETTLES, &Some(true), counted), Some(true), "the new process's sessions: {:#}", rig.admin_sessions());
}

#[test]
fn the_capabilities_the_systemd_drop_in_gives_are_enough() {
    // deploy/systemd/xdp.conf adds these to the unit's CAP_NET_BIND_SERVICE.
    let dropin = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd/xdp.conf")).unwrap();
    let caps: Vec<String> = dropin
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities= in the drop-in")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert_eq!(caps, ["+bpf", "+perfmon", "+net_admin"]);
    // Root with only these (and binding low ports) in its bounding set.
    let wrap = ["setpriv".to_string(), format!("--bounding-set=-all,+net_bind_service,{}", caps.join(","))];
    let rig = Rig::start_with("", xdp_rig::Opts { wrap: wrap.to_vec(), ..Default::default() });
    // The warm-up goes on until the program relays the channel both ways.
    warmed_channel(&rig, "cap");
}

/// Allocates for `c` a relayed address of `family` (REQUESTED-ADDRESS-FAMILY:
/// 0x01 IPv4, 0x02 IPv6), whatever family `c` reaches turnd over.
fn allocate_family(c: &mut UdpClient, user: &str, family: u8) -> SocketAddr {
    let family = || A::Raw(attr::REQUESTED_ADDRESS_FAMILY, vec![family, 0, 0, 0]);
    let r = c.transact(method::ALLOCATE, &[harness::transport_udp(), family()]);
    c.creds = Some(wire::rest_creds(&r, user, SECRET));
    let r = c.transact(method::ALLOCATE, &[harness::transport_udp(), family()]);
    assert_eq!(r.class(), Class::Success, "allocate: {:?}", r.code());
    r.addr(attr::XOR_RELAYED_ADDRESS).unwrap()
}

#[test]
fn across_families_the_program_writes_the_other_familys_headers() {
    let rig = Rig::start("");
    // A client over IPv4 relaying to a peer over IPv6.
    let mut c = client(&rig);
    let relayed = allocate_family(&mut c, "xena", 0x02);
    assert!(relayed.is_ipv6(), "{relayed}");
    let p6 = peer6(&rig);
    assert_eq!(bind(&mut c, 0x4000, p6.local_addr().unwrap()), Class::Success);
    warm(&rig, &c, &p6, 0x4000, relayed);
    assert_eq!(relay_rounds(&rig, &c, &p6, 0x4000, relayed, 50), (50, 50), "IPv4 client, IPv6 peer: every datagram relayed by the program");
    // A client over IPv6 relaying to a peer over IPv4.
    let mut c6 = UdpClient::new("127.0.0.1", rig.server6.unwrap());
    c6.sock = rig.client_ns.udp_socket(SocketAddr::new(rig.ns6.unwrap().0.into(), 0));
    let relayed4 = allocate_family(&mut c6, "yann", 0x01);
    assert!(relayed4.is_ipv4(), "{relayed4}");
    let p4 = peer(&rig);
    assert_eq!(bind(&mut c6, 0x4001, p4.local_addr().unwrap()), Class::Success);
    warm(&rig, &c6, &p4, 0x4001, relayed4);
    assert_eq!(relay_rounds(&rig, &c6, &p4, 0x4001, relayed4, 50), (50, 50), "IPv6 client, IPv4 peer: every datagram relayed by the program");
    // turnd counts both allocations' datagrams.
    let k = |c: &UdpClient| session_counts(&rig, c.sock.local_addr().unwrap()).map(|(to, from, ..)| to >= 50 && from >= 50);
    assert_eq!(settle(SETTLES, &Some(true), || k(&c)), Some(true));
    assert_eq!(settle(SETTLES, &Some(true), || k(&c6)), Some(true));
}
