//! PROXY protocol only from the configured load balancers, connections still
//! reading their PROXY header counted per IP, and the per-IP limit by IPv6
//! prefix (its keying is unit-tested in src/net/stream/accept.rs; loopback has one
//! IPv6 address, so on the wire only the configuration is checked here).

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Turnd, REALM, SECRET};
use turnd::stun::{attr, method, Class, Message};

fn check(toml: &str) -> (i32, String) {
    let dir = common::temp_dir("proxy-config");
    let p = dir.join("turnd.toml");
    std::fs::write(&p, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnd")).arg("--config").arg(&p).arg("--check-config").env("STATE_DIRECTORY", &dir).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// turnd with UDP (for the readiness probe) and a TCP listener with PROXY
/// protocol from `from` on the same port, plus `limits`.
fn proxied(from: &str, limits: &str) -> Turnd {
    let port = common::free_port();
    let probe: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    Turnd::builder().config(probe, |_| {
        format!(
            "realm = \"{REALM}\"\n[auth]\nsecrets = [\"{SECRET}\"]\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
             [[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:{port}\"\nproxy_protocol = true\nproxy_protocol_from = {from}\n\
             [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n[limits]\n{limits}"
        )
    }).start()
}

/// A TCP connection from `local_ip` to `server`.
fn connect_from(local_ip: &str, server: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&format!("{local_ip}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
    s.connect_timeout(&server.into(), Duration::from_secs(3)).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// Sends a PROXY v1 header claiming `claimed`, then a Binding; returns the
/// XOR-MAPPED-ADDRESS answered, or None when the connection was closed unanswered.
fn binding_through_proxy(s: &mut TcpStream, claimed: SocketAddr, server: SocketAddr) -> Option<SocketAddr> {
    let header = format!("PROXY TCP4 {} {} {} {}\r\n", claimed.ip(), server.ip(), claimed.port(), server.port());
    let req = wire::build(method::BINDING, Class::Request, *b"proxy-test-1", &[], None, false);
    // The server may already have closed: a write error is "no answer".
    s.write_all(header.as_bytes()).ok()?;
    s.write_all(&req).ok()?;
    read_mapped(s)
}

/// Reads a Binding answer (bounded: 3 s): its XOR-MAPPED-ADDRESS, or None
/// when the connection was closed, or nothing whole came in time.
fn read_mapped(s: &mut TcpStream) -> Option<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 512];
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).ok()?;
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => return None,
            Ok(k) => got += k,
        }
        if let Ok(m) = Message::parse(&buf[..got]) {
            return attr::decode_xor_address(m.get(attr::XOR_MAPPED_ADDRESS)?, m.transaction_id());
        }
    }
    None
}

#[test]
fn proxy_header_is_taken_only_from_configured_sources() {
    let server = proxied("[\"127.0.0.2/32\"]", "");
    let claimed: SocketAddr = "203.0.113.9:40000".parse().unwrap();
    // From the load balancer: the header names the client.
    let mut lb = connect_from("127.0.0.2", server.addr);
    assert_eq!(binding_through_proxy(&mut lb, claimed, server.addr), Some(claimed));
    // From anywhere else: closed, nothing answered, the address not forged.
    let mut direct = connect_from("127.0.0.1", server.addr);
    assert_eq!(binding_through_proxy(&mut direct, claimed, server.addr), None, "a direct client cannot forge its address");
    let mut other = connect_from("127.0.0.3", server.addr);
    assert_eq!(binding_through_proxy(&mut other, claimed, server.addr), None);
    assert!(server.metric("turnd_connections_refused_total") >= 2.0);
}

#[test]
fn connections_waiting_for_their_proxy_header_count_per_ip() {
    let server = proxied("[\"127.0.0.0/8\"]", "max_connections_per_ip = 3\n");
    // Three connections from 127.0.0.3 that never send their header.
    let mut waiting: Vec<TcpStream> = (0..3).map(|_| connect_from("127.0.0.3", server.addr)).collect();
    // Until turnd has accepted and counted them, a fourth may still be
    // answered; wait (bounded by time, however busy the machine) until a
    // fourth is refused. The shards accept in their own order: a fourth
    // accepted before the third waiting one holds the last place while it
    // reads its header, and turnd refuses (closes) that waiting one instead,
    // as it should. Such a one is connected again, so three wait.
    let claimed: SocketAddr = "203.0.113.10:40000".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        for w in waiting.iter_mut() {
            if closed_by_server(w) {
                *w = connect_from("127.0.0.3", server.addr);
            }
        }
        let mut fourth = connect_from("127.0.0.3", server.addr);
        if binding_through_proxy(&mut fourth, claimed, server.addr).is_none() {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
    };
    assert!(refused, "a fourth connection from 127.0.0.3 while three wait for their header is refused");
    // Another source is not affected.
    let mut other = connect_from("127.0.0.4", server.addr);
    assert_eq!(binding_through_proxy(&mut other, claimed, server.addr), Some(claimed));
    // Once the waiting ones go, 127.0.0.3 connects again (bounded: 10 s).
    drop(waiting);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = connect_from("127.0.0.3", server.addr);
        if binding_through_proxy(&mut again, claimed, server.addr) == Some(claimed) {
            break;
        }
        assert!(Instant::now() < deadline, "127.0.0.3 refused after its waiting connections closed");
    }
}

/// Whether the server closed `s` (the client has sent nothing on it).
fn closed_by_server(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    // Nothing to read but the end (or a reset): the server sends nothing else here.
    let closed = !matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    closed
}

/// A Binding over a plain TCP connection: the mapped address, or None when
/// the connection was closed unanswered.
fn binding_over(s: &mut TcpStream) -> Option<SocketAddr> {
    let req = wire::build(method::BINDING, Class::Request, *b"limit-test-1", &[], None, false);
    s.write_all(&req).ok()?;
    read_mapped(s)
}

/// The per-IP limit on the wire: per address for IPv4, per /64 for IPv6 (on
/// loopback only ::1 exists, so this checks the IPv6 path counts and uncounts;
/// the grouping of a /64 is the unit test in src/net/stream/accept.rs).
#[test]
fn per_ip_limit_holds_over_ipv4_and_ipv6() {
    let port = common::free_port();
    let v6_port = common::free_port();
    let probe: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Turnd::builder().config(probe, |_| {
        format!(
            "realm = \"{REALM}\"\n[auth]\nsecrets = [\"{SECRET}\"]\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
             [[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n\
             [[listen]]\ntransport = \"tcp\"\naddress = \"[::1]:{v6_port}\"\n\
             [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n[limits]\nmax_connections_per_ip = 3\nipv6_prefix_per_ip = 64\n"
        )
    }).start();
    let v6: SocketAddr = format!("[::1]:{v6_port}").parse().unwrap();
    let open = |from: &str, to: SocketAddr| -> (TcpStream, Option<SocketAddr>) {
        let mut s = if from == "::1" {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s
        } else {
            connect_from(from, to)
        };
        let r = binding_over(&mut s);
        (s, r)
    };
    for (from, to) in [("127.0.0.3", server.addr), ("::1", v6)] {
        let held: Vec<TcpStream> = (0..3)
            .map(|i| {
                let (s, r) = open(from, to);
                assert!(r.is_some(), "connection {i} from {from} answered");
                s
            })
            .collect();
        assert_eq!(open(from, to).1, None, "a fourth connection from {from} is refused");
        if from != "::1" {
            assert!(open("127.0.0.4", to).1.is_some(), "another IPv4 address is counted on its own");
        }
        // Closing them gives the room back (bounded: 10 s).
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        while open(from, to).1.is_none() {
            assert!(Instant::now() < deadline, "{from} still refused after its connections closed");
        }
    }
}

#[test]
fn proxy_protocol_needs_its_sources_and_the_ipv6_prefix_is_validated() {
    let listen = "[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:3478\"\nproxy_protocol = true\n";
    let (rc, err) = check(listen);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("listen[0].proxy_protocol_from"), "names the key: {err}");
    assert!(err.contains("forge") || err.contains("claim"), "says why: {err}");

    let (rc, err) = check(&format!("{listen}proxy_protocol_from = [\"10.0.0.0/33\"]\n"));
    assert_eq!(rc, 2);
    assert!(err.contains("listen[0].proxy_protocol_from"), "{err}");
    let (rc, err) = check("[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:3478\"\nproxy_protocol_from = [\"10.0.0.0/8\"]\n");
    assert_eq!(rc, 2);
    assert!(err.contains("listen[0].proxy_protocol_from") && err.contains("proxy_protocol = true"), "{err}");
    let (rc, err) = check(&format!("{listen}proxy_protocol_from = [\"10.0.0.0/8\", \"127.0.0.1\"]\n"));
    assert_eq!(rc, 0, "{err}");

    for bad in ["0", "16", "129"] {
        let (rc, err) = check(&format!("[limits]\nipv6_prefix_per_ip = {bad}\n"));
        assert_eq!(rc, 2, "{bad}: {err}");
        assert!(err.contains("limits.ipv6_prefix_per_ip"), "{err}");
    }
    for good in ["48", "64", "128"] {
        assert_eq!(check(&format!("[limits]\nipv6_prefix_per_ip = {good}\n")).0, 0, "{good}");
    }
}

#[test]
fn half_a_proxy_header_is_cut_at_the_handshake_timeout() {
    let server = proxied("[\"127.0.0.0/8\"]", "tls_handshake_timeout = 1\n");
    let mut s = connect_from("127.0.0.1", server.addr);
    s.write_all(b"PROXY TCP4 1.2.3.4 ").unwrap();
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
    let mut b = [0u8; 16];
    let r = std::io::Read::read(&mut s, &mut b);
    let waited = started.elapsed();
    assert!(matches!(r, Ok(0) | Err(_)) && waited < Duration::from_secs(3), "still open after {waited:?}: {r:?}");
}
