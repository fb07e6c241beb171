//! The TCP figures of a TLS client's connection (TCP_INFO of turnd's
//! socket), where the client's path has a known delay: a network namespace
//! joined to the host by a TUN pair whose wire holds each packet for a
//! delay the test sets (tests/common/netns.rs, `create_delayed`). turnd
//! listens on the host end. A client from inside makes a TLS allocation
//! and exchanges Binding requests back to back, with no delay and then
//! with 50 ms each way; the admin API's sessions (`health.client_leg.tcp`),
//! `turnctl sessions` and the "allocation ended" log line must show the
//! round trip: below 20 ms without the delay (the wire thread's own
//! wake-ups are a fraction of a millisecond), 100 ms ± 30 ms with it.
//!
//! Needs root, `ip netns` and /dev/net/tun. Fails, never skips.

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Turnd;
use netns::NetNs;
use serde_json::Value;
use turnd::stun::{method, Class};
use wire::StreamClient;

const TLS_PORT: u16 = 443;
const PLAIN_PORT: u16 = 3478;
/// The added delay each way, and how far the reported round trip may be
/// from twice it.
const ONE_WAY: Duration = Duration::from_millis(50);
const TOLERANCE_MS: f64 = 30.0;
/// The most the round trip may be with no delay added.
const UNDELAYED_MAX_MS: f64 = 20.0;

/// A TLS client from inside `ns`: its TURN client and its own address.
fn tls_client(ns: &NetNs, server: SocketAddr) -> (StreamClient, SocketAddr) {
    let tcp = ns.tcp_connect(server);
    tcp.set_nodelay(true).unwrap();
    let local = tcp.local_addr().unwrap();
    let conn = rustls::ClientConnection::new(wire::insecure_tls_config(), "localhost".try_into().unwrap()).unwrap();
    (StreamClient::over(Box::new(rustls::StreamOwned::new(conn, tcp))), local)
}

/// Binding requests back to back: each answer's acknowledgement leaves with
/// the next request at once, so every round trip turnd's TCP measures is
/// the path's, with no delayed ACK in it.
fn ping_pong(c: &mut StreamClient, n: usize) {
    for _ in 0..n {
        let r = c.transact(method::BINDING, &[]);
        assert_eq!(r.class(), Class::Success);
    }
}

/// An admin API request with the server's token: the JSON body.
fn admin_get(t: &Turnd, path: &str) -> Value {
    let addr = format!("127.0.0.1:{}", t.metrics_port);
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", t.admin_token()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("admin {path}: {e}: {resp}"))
}

/// The `health.client_leg.tcp` object of `client`'s session.
fn tcp_of(t: &Turnd, client: SocketAddr) -> Value {
    let sessions = admin_get(t, "/admin/sessions");
    let s = sessions
        .as_array()
        .and_then(|a| a.iter().find(|s| s["client"] == client.to_string()))
        .unwrap_or_else(|| panic!("no session of {client} in {sessions:#}"));
    assert_eq!(s["transport"], "tls", "{s:#}");
    let tcp = s["health"]["client_leg"]["tcp"].clone();
    for k in ["rtt_ms", "rttvar_ms"] {
        assert!(tcp[k].is_f64(), "{k} missing in {s:#}");
    }
    for k in ["retransmits", "unacked", "notsent_bytes"] {
        assert!(tcp[k].is_u64(), "{k} missing in {s:#}");
    }
    tcp
}

/// The TCP RTT column of `client`'s row in `turnctl sessions`.
fn turnctl_rtt(t: &Turnd, client: SocketAddr) -> f64 {
    let out = Command::new(env!("CARGO_BIN_EXE_turnctl"))
        .args(["sessions", "--admin", &format!("127.0.0.1:{}", t.metrics_port), "--token-file"])
        .arg(t.dir.join("admin-token"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "turnctl sessions: {table}{}", String::from_utf8_lossy(&out.stderr));
    let at = table.lines().next().and_then(|h| h.find("TCP RTT MS")).unwrap_or_else(|| panic!("no TCP RTT column:\n{table}"));
    let row = table.lines().find(|l| l.contains(&client.to_string())).unwrap_or_else(|| panic!("no row of {client}:\n{table}"));
    row.get(at..).and_then(|c| c.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no RTT in {row:?}:\n{table}"))
}

/// `tcp_rtt_ms` of the "allocation ended" line of `client` (waits up to 10 s).
fn ended_rtt(t: &Turnd, client: SocketAddr) -> f64 {
    let needle = format!("client={client}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = t.log();
        if let Some(line) = log.lines().find(|l| l.contains("allocation ended") && l.contains(&needle)) {
            let v = line.split_whitespace().find_map(|f| f.strip_prefix("tcp_rtt_ms="));
            return v.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no tcp_rtt_ms in {line:?}"));
        }
        assert!(Instant::now() < deadline, "no \"allocation ended\" line for {client}:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tls_round_trip_with_and_without_path_delay() {
    let ns = NetNs::create_delayed(Duration::ZERO);
    let host = ns.host_ip().to_string();
    let server = Turnd::builder().three(&host, PLAIN_PORT, TLS_PORT, "127.0.0.1").extra("[log]\nlevel = \"info\"\n").start();
    let tls: SocketAddr = format!("{host}:{TLS_PORT}").parse().unwrap();

    // No delay: the round trip is the wire thread's wake-ups.
    let (mut near, near_addr) = tls_client(&ns, tls);
    near.allocate("near", common::SECRET);
    ping_pong(&mut near, 20);
    let t = tcp_of(&server, near_addr);
    let rtt = t["rtt_ms"].as_f64().unwrap();
    eprintln!("no added delay: {t}");
    assert!(rtt < UNDELAYED_MAX_MS, "round trip {rtt} ms with no delay added: {t}");

    // 50 ms each way, on a new connection (the smoothed round trip of the
    // first would take many exchanges to forget its start).
    ns.set_delay(ONE_WAY);
    let expected = 2.0 * ONE_WAY.as_secs_f64() * 1000.0;
    let (mut far, far_addr) = tls_client(&ns, tls);
    far.allocate("far", common::SECRET);
    ping_pong(&mut far, 10);
    let t = tcp_of(&server, far_addr);
    let rtt = t["rtt_ms"].as_f64().unwrap();
    eprintln!("{} ms added each way: {t}", ONE_WAY.as_millis());
    assert!((rtt - expected).abs() <= TOLERANCE_MS, "round trip {rtt} ms, expected {expected} ± {TOLERANCE_MS} ms: {t}");
    let shown = turnctl_rtt(&server, far_addr);
    assert!((shown - rtt).abs() <= TOLERANCE_MS, "turnctl sessions shows {shown} ms, the API {rtt} ms");
    assert!(turnctl_rtt(&server, near_addr) < UNDELAYED_MAX_MS);

    // The connection closes: the allocation's last line has its figures.
    drop(far);
    let logged = ended_rtt(&server, far_addr);
    eprintln!("allocation ended with tcp_rtt_ms={logged}");
    assert!((logged - expected).abs() <= TOLERANCE_MS, "allocation ended with tcp_rtt_ms={logged}, expected {expected} ± {TOLERANCE_MS}");
    drop(near);
}
