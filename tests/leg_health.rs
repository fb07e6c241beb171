//! Each leg's health as turnd reports it, from a wire-level call: a client
//! relays paced RTP (48 kHz timestamps) with every 20th packet missing, the
//! peer answers with a complete stream of its own, and each side answers
//! the other's consent check (a STUN Binding inside the relayed data) after
//! a delay of its own. `turnctl sessions --json` must show the client leg's
//! loss as sent, none on the peer leg, a jitter figure, and each leg's
//! round trip; the allocation's end logs the summary and files it in the
//! histograms. The browser call with loss injected by the kernel is in
//! tests/call_health.rs.

mod common;
#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Turnd, PEER_IP, SECRET};
use harness::{channel, A};
use turnd::stun::{attr, method, Class};
use wire::{peer_at, Incoming, UdpClient};

fn rtp(seq: u16, ts: u32, ssrc: u32) -> Vec<u8> {
    let mut p = vec![0u8; 172];
    p[0] = 0x80;
    p[1] = 111;
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&ts.to_be_bytes());
    p[8..12].copy_from_slice(&ssrc.to_be_bytes());
    p
}

fn binding(class: u16, tid: &[u8; 12]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0..2].copy_from_slice(&class.to_be_bytes());
    p[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    p[8..20].copy_from_slice(tid);
    p
}

fn sessions(server: &Turnd) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_turnctl"))
        .args(["sessions", "--json", "--admin", &format!("127.0.0.1:{}", server.metrics_port), "--token-file"])
        .arg(server.dir.join("admin-token"))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn sessions_show_each_legs_loss_jitter_and_round_trip() {
    let server = Turnd::start("");
    let mut c = UdpClient::new("127.0.0.1", server.addr);
    let relayed = c.allocate("health", SECRET);
    let peer = UdpSocket::bind((PEER_IP, 0)).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    assert_eq!(c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(peer_addr)]).class(), Class::Success);

    // 300 packets, 5 ms apart in time and in RTP time (240 ticks at 48 kHz):
    // 1.5 s, enough for the clock rate to be inferred. Every 20th is not sent.
    let (n, every) = (300u16, 20u16);
    let t0 = Instant::now();
    let mut from_client = 0;
    for i in 0..n {
        let due = t0 + Duration::from_millis(5 * i as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if i % every != every - 1 {
            c.send_channel(0x4000, &rtp(1000 + i, 240 * i as u32, 0xc1));
            let mut buf = [0u8; 2048];
            let (len, from) = peer.recv_from(&mut buf).expect("the peer gets what the client sent");
            assert_eq!((from, len), (relayed, 172));
            from_client += 1;
        }
        // The peer's stream back, complete.
        peer.send_to(&rtp(7000 + i, 240 * i as u32, 0x9e), relayed).unwrap();
        assert!(matches!(c.recv(Duration::from_secs(2)), Some(Incoming::Channel { number: 0x4000, .. })));
    }
    // Consent checks: the client asks, the peer answers 30 ms later (the
    // peer leg's round trip); the peer asks, the client answers 60 ms later.
    c.send_channel(0x4000, &binding(0x0001, b"client-asks1"));
    let mut buf = [0u8; 2048];
    peer.recv_from(&mut buf).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    peer.send_to(&binding(0x0101, b"client-asks1"), relayed).unwrap();
    assert!(c.recv(Duration::from_secs(2)).is_some());
    peer.send_to(&binding(0x0001, b"peer-asks-01"), relayed).unwrap();
    assert!(c.recv(Duration::from_secs(2)).is_some());
    std::thread::sleep(Duration::from_millis(60));
    c.send_channel(0x4000, &binding(0x0101, b"peer-asks-01"));
    peer.recv_from(&mut buf).unwrap();

    let all = sessions(&server);
    let h = &all[0]["health"];
    let (cl, pl) = (&h["client_leg"], &h["peer_leg"]);
    // Sent: all but every 20th of 300; the last one sent is number 298.
    let expected = 299u64;
    let lost = expected - from_client;
    assert_eq!(cl["rtp_streams"][0]["expected"], expected, "{h:#}");
    assert_eq!(cl["rtp_streams"][0]["lost"], lost, "{h:#}");
    assert!((cl["loss"].as_f64().unwrap() - lost as f64 / expected as f64).abs() < 1e-9, "{h:#}");
    assert_eq!(cl["rtp_streams"][0]["clock_hz"], 48_000, "{h:#}");
    assert!(cl["jitter_ms"].as_f64().is_some_and(|j| j < 20.0), "{h:#}");
    assert_eq!(pl["loss"], 0.0, "{h:#}");
    assert_eq!(pl["rtp_streams"][0]["expected"], n as u64, "{h:#}");
    let rtt = |l: &serde_json::Value| l["rtt_ms"].as_f64().unwrap_or_else(|| panic!("no round trip: {h:#}"));
    assert!((30.0..80.0).contains(&rtt(pl)), "peer leg {h:#}");
    assert!((60.0..110.0).contains(&rtt(cl)), "client leg {h:#}");
    assert_eq!(cl["other_packets"], 2, "the consent request and answer are no RTP: {h:#}");
    // The human table.
    let out = Command::new(env!("CARGO_BIN_EXE_turnctl"))
        .args(["sessions", "--admin", &format!("127.0.0.1:{}", server.metrics_port), "--token-file"])
        .arg(server.dir.join("admin-token"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let pct = format!("{:.1}%/0.0%", 100.0 * lost as f64 / expected as f64);
    assert!(table.contains("LOSS C/P") && table.contains(&pct), "{table}");

    // The end: logged and filed.
    let r = c.transact(method::REFRESH, &[A::U32(attr::LIFETIME, 0)]);
    assert_eq!(r.class(), Class::Success);
    server.wait_log("allocation ended");
    let line = server.log().lines().find(|l| l.contains("allocation ended")).unwrap().to_owned();
    assert!(line.contains(&format!("client_loss={:.1}%", 100.0 * lost as f64 / expected as f64)) && line.contains("peer_loss=0.0%"), "{line}");
    assert_eq!(server.metric("turnd_leg_loss_ratio_count{leg=\"client\"}"), 1.0);
    assert_eq!(server.metric("turnd_leg_loss_ratio_bucket{leg=\"client\",le=\"0.05\"}"), 1.0);
    assert_eq!(server.metric("turnd_leg_loss_ratio_bucket{leg=\"client\",le=\"0.02\"}"), 0.0);
    assert_eq!(server.metric("turnd_leg_rtt_seconds_count{leg=\"peer\"}"), 1.0);
}
