//! Reload as a transaction and careless configurations, against a real
//! turnd: an empty file, a listener removed under a call, a port that cannot
//! be bound, a secret file saved by a Windows editor, unlimited connection
//! limits, bandwidth caps on the wire.

mod common;
#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{turnctl_reload, EchoPeer, Turnd, SECRET};
use harness::{channel, A};
use turnd::stun::{attr, method, Class};
use wire::{peer_at, Incoming, StreamClient, UdpClient};

/// A client with an allocation and channel 0x4000 bound to `peer`.
fn call(server: SocketAddr, peer: SocketAddr) -> UdpClient {
    let mut c = UdpClient::new("127.0.0.1", server);
    c.allocate("caller", SECRET);
    assert_eq!(c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(peer)]).class(), Class::Success);
    c
}

/// Sends `n` messages on the channel and counts the echoes that come back.
fn round_trips(c: &UdpClient, n: usize) -> usize {
    let mut got = 0;
    for i in 0..n {
        c.send_channel(0x4000, format!("media {i}").as_bytes());
        if let Some(Incoming::Channel { data, .. }) = c.recv(Duration::from_millis(500)) {
            got += (data == format!("media {i}").as_bytes()) as usize;
        }
    }
    got
}

/// Whether a STUN Binding sent to `addr` gets an answer within 600 ms.
fn answers_binding(addr: SocketAddr) -> bool {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut req = [0u8; 20];
    req[1] = 1;
    req[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    req[8..20].copy_from_slice(b"probe-binder");
    let mut buf = [0u8; 512];
    (0..3).any(|_| {
        let _ = s.send_to(&req, addr);
        s.recv_from(&mut buf).is_ok_and(|(n, _)| n >= 20 && buf[..2] == [0x01, 0x01])
    })
}

#[test]
fn an_empty_file_is_refused_on_reload_and_the_call_goes_on() {
    let server = Turnd::start("");
    let peer = EchoPeer::start();
    let c = call(server.addr, peer.addr);
    assert_eq!(round_trips(&c, 20), 20);
    let good = std::fs::read_to_string(&server.config).unwrap();
    std::fs::write(&server.config, "").unwrap();
    let (rc, text) = turnctl_reload(&server);
    assert_ne!(rc, 0, "an empty file is refused: {text}");
    assert!(text.contains("is empty"), "{text}");
    server.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.log().matches("reload refused").count() < 2 {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing changed: the call relays, the secret and the listener stay.
    assert_eq!(round_trips(&c, 20), 20);
    let mut other = UdpClient::new("127.0.0.1", server.addr);
    other.allocate("newcomer", SECRET);
    std::fs::write(&server.config, good).unwrap();
    let (rc, text) = turnctl_reload(&server);
    assert_eq!(rc, 0, "{text}");
}

#[test]
fn a_removed_udp_listener_serves_its_allocations_until_they_end() {
    let second = common::free_port();
    let server = Turnd::start(&format!("[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{second}\"\n"));
    let second: SocketAddr = format!("127.0.0.1:{second}").parse().unwrap();
    let peer = EchoPeer::start();
    let mut c = call(second, peer.addr);
    assert_eq!(round_trips(&c, 10), 10);
    let with = std::fs::read_to_string(&server.config).unwrap();
    let without = with.replace(&format!("[[listen]]\ntransport = \"udp\"\naddress = \"{second}\"\n"), "");
    assert_ne!(with, without);
    std::fs::write(&server.config, &without).unwrap();
    let (rc, text) = turnctl_reload(&server);
    assert_eq!(rc, 0, "{text}");
    // The call through the removed listener goes on; newcomers get no answer there.
    assert_eq!(round_trips(&c, 20), 20, "{}", server.log());
    assert!(!answers_binding(second), "a removed listener answers only its allocations");
    assert!(answers_binding(server.addr));
    // Put back while it still serves: it serves everyone again.
    std::fs::write(&server.config, &with).unwrap();
    assert_eq!(turnctl_reload(&server).0, 0);
    assert!(answers_binding(second));
    // Removed again; once its last allocation ends, it closes and frees the port.
    std::fs::write(&server.config, &without).unwrap();
    assert_eq!(turnctl_reload(&server).0, 0);
    assert_eq!(round_trips(&c, 5), 5);
    assert_eq!(c.transact(method::REFRESH, &[A::U32(attr::LIFETIME, 0)]).class(), Class::Success);
    let deadline = Instant::now() + Duration::from_secs(5);
    while UdpSocket::bind(second).is_err() {
        assert!(Instant::now() < deadline, "the retired listener never closed: {}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.log().contains("UDP listener closed"), "{}", server.log());
}

#[test]
fn a_reload_that_cannot_bind_changes_nothing() {
    let server = Turnd::builder().extra("").streams().start();
    let peer = EchoPeer::start();
    let c = call(server.addr, peer.addr);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let good = std::fs::read_to_string(&server.config).unwrap();

    // The metrics (and admin) listener moved to a busy port, with a new secret.
    let moved = good
        .replace(&format!("listen = \"127.0.0.1:{}\"", server.metrics_port), &format!("listen = \"127.0.0.1:{busy_port}\""))
        .replace(SECRET, "another-secret");
    assert_ne!(good, moved);
    std::fs::write(&server.config, &moved).unwrap();
    let (rc, text) = turnctl_reload(&server);
    assert_ne!(rc, 0, "{text}");
    assert!(text.contains("metrics.listen") && text.contains("in use"), "{text}");
    // The old metrics port still answers, the old secret still works, the call goes on.
    assert_eq!(server.http_get("/healthz").0, 200);
    let mut newcomer = UdpClient::new("127.0.0.1", server.addr);
    newcomer.allocate("newcomer", SECRET);
    assert_eq!(round_trips(&c, 10), 10);

    // A new TCP listener on a busy port: refused whole as well.
    let added = format!("{}\n[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:{busy_port}\"\n", good.replace(SECRET, "another-secret"));
    std::fs::write(&server.config, &added).unwrap();
    let (rc, text) = turnctl_reload(&server);
    assert_ne!(rc, 0, "{text}");
    assert!(text.contains("listen[") && text.contains("in use"), "{text}");
    let mut newcomer = UdpClient::new("127.0.0.1", server.addr);
    newcomer.allocate("newcomer2", SECRET);
    // TCP and TLS listeners untouched.
    let mut t = StreamClient::tcp(format!("127.0.0.1:{}", server.port).parse().unwrap());
    assert_eq!(t.transact(method::BINDING, &[]).class(), Class::Success);
    drop(busy);
}

#[test]
fn a_secret_file_from_a_windows_editor_still_signs() {
    let dir = common::temp_dir("bom");
    let file = dir.join("secret");
    std::fs::write(&file, format!("\u{feff}{SECRET}\r\n")).unwrap();
    let server = Turnd::start("");
    let cfg = std::fs::read_to_string(&server.config).unwrap();
    std::fs::write(&server.config, cfg.replace(&format!("secrets = [\"{SECRET}\"]"), &format!("secret_file = \"{}\"", file.display()))).unwrap();
    assert_eq!(turnctl_reload(&server).0, 0);
    server.wait_log("byte-order mark");
    // Credentials from the clean secret (as prosody computes them) work.
    let mut c = UdpClient::new("127.0.0.1", server.addr);
    c.allocate("windows", SECRET);
    // turnctl reads the same file the same way.
    let out = Command::new(env!("CARGO_BIN_EXE_turnctl"))
        .args(["credentials", "--user", "w", "--json", "--secret-file"])
        .arg(&file)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let user = v["username"].as_str().unwrap();
    assert_eq!(v["password"].as_str().unwrap(), turnd::auth::rest_password(SECRET.as_bytes(), user));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zero_connection_limits_mean_unlimited() {
    let server = Turnd::builder().extra("[limits]\nmax_connections = 0\nmax_connections_per_ip = 0\n").streams().start();
    let mut clients: Vec<StreamClient> = (0..3).map(|_| StreamClient::tcp(format!("127.0.0.1:{}", server.port).parse().unwrap())).collect();
    for c in &mut clients {
        assert_eq!(c.transact(method::BINDING, &[]).class(), Class::Success);
    }
}

#[test]
fn the_open_files_warning_counts_the_reserve() {
    // 100 allocations and 50 connections need 150 descriptors, plus the
    // reserve for listeners, metrics and reloads; 256 is below that sum only
    // with the reserve counted, and the warning names the sum.
    let reserve = turnd::net::relay::FD_RESERVE as u64;
    let limit = 150 + reserve - 1;
    let server = Turnd::builder().extra("[limits]\ntotal_quota = 100\nmax_connections = 50\n").nofile(limit).start();
    server.wait_log(&format!("{reserve} descriptors kept for listeners, metrics and reloads"));
    server.wait_log(&format!("open_files_limit={limit} needed={}", 150 + reserve));
}

#[test]
fn an_allocation_is_held_to_its_bandwidth() {
    let server = Turnd::start("[limits]\nallocation_bandwidth = \"1 Mbit/s\"\n");
    let peer = EchoPeer::start();
    let c = call(server.addr, peer.addr);
    // 1,000-byte packets every 2 ms (4 Mbit/s) for 2 s.
    let payload = vec![7u8; 1_000];
    let start = Instant::now();
    for i in 0..1_000u32 {
        c.send_channel(0x4000, &payload);
        if let Some(wait) = (start + Duration::from_millis(2) * (i + 1)).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Until the peer has echoed every packet turnd relayed to it (bounded: 5 s).
    let relayed = "turnd_relayed_packets_total{direction=\"to_peer\",transport=\"udp\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    while (peer.echoed() as f64) < server.metric(relayed) {
        assert!(Instant::now() < deadline, "the peer echoed {} of {} relayed", peer.echoed(), server.metric(relayed));
        std::thread::sleep(Duration::from_millis(20));
    }
    let echoed = peer.finish() as f64;
    // One second's burst (125 packets) plus 125 a second.
    let most = 125.0 + 125.0 * (elapsed + 0.3);
    assert!(echoed >= 200.0 && echoed <= most, "{echoed} packets relayed in {elapsed:.2} s (at most {most:.0})");
    let dropped = server.metric("turnd_dropped_packets_total{reason=\"allocation_bandwidth\"}");
    assert!(dropped >= 1_000.0 - most, "dropped {dropped}");
    server.wait_log("over limits.allocation_bandwidth");
}
