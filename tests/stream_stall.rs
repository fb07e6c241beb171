//! A participant's link stalls: a TLS client stops reading for 3 s while a
//! peer sends it media at a call's rate, then reads again. What arrives
//! after the stall must be recent (media that grew old waiting is dropped,
//! and counted), not seconds of backlog that keep the call behind.

mod common;
#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Turnd, PEER_IP, SECRET};
use harness::channel;
use turnd::stun::{method, Class};
use wire::{insecure_tls_config, peer_at, Incoming, StreamClient};

/// A TLS client whose socket takes little into its receive buffer, so that a
/// client that stops reading pushes back on turnd at once, as a stalled
/// link does.
fn tls_client_with_small_buffer(server: SocketAddr) -> StreamClient {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect_timeout(&server.into(), Duration::from_secs(5)).unwrap();
    let tcp: std::net::TcpStream = s.into();
    tcp.set_nodelay(true).unwrap();
    let conn = rustls::ClientConnection::new(insecure_tls_config(), "localhost".try_into().unwrap()).unwrap();
    StreamClient::over(Box::new(rustls::StreamOwned::new(conn, tcp)))
}

#[test]
fn after_a_stalled_link_returns_the_media_is_recent() {
    let server = Turnd::start_all("");
    let mut c = tls_client_with_small_buffer(format!("127.0.0.1:{}", server.tls_port).parse().unwrap());
    let relayed = c.allocate("stall", SECRET);
    let peer = UdpSocket::bind((PEER_IP, 0)).unwrap();
    assert_eq!(c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(peer.local_addr().unwrap())]).class(), Class::Success);

    // The peer: 1,200-byte packets every 4 ms (about 2.4 Mbit/s) for 6 s,
    // each carrying its send time.
    let start = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut pkt = [0u8; 1200];
            for i in 0..1500u32 {
                let at = start + Duration::from_millis(4) * i;
                if let Some(wait) = at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                pkt[..8].copy_from_slice(&(start.elapsed().as_micros() as u64).to_be_bytes());
                let _ = peer.send_to(&pkt, relayed);
            }
            done.store(true, Ordering::Relaxed);
        })
    };
    // Read for 1.5 s, stall for 3 s, then read again until the peer is done.
    let mut ages_after = Vec::new();
    let mut before = 0usize;
    let stall_from = start + Duration::from_millis(1500);
    let stall_to = stall_from + Duration::from_secs(3);
    while Instant::now() < stall_from {
        if let Some(Incoming::Channel { .. }) = c.recv(Duration::from_millis(50)) {
            before += 1;
        }
    }
    std::thread::sleep(stall_to.saturating_duration_since(Instant::now()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match c.recv(Duration::from_millis(300)) {
            Some(Incoming::Channel { data, .. }) => {
                let sent = Duration::from_micros(u64::from_be_bytes(data[..8].try_into().unwrap()));
                ages_after.push(start.elapsed().saturating_sub(sent));
            }
            Some(_) => {}
            None if done.load(Ordering::Relaxed) => break,
            None => {}
        }
    }
    sender.join().unwrap();
    let old = ages_after.iter().filter(|a| **a > Duration::from_millis(300)).count();
    let stale_dropped = server.metric("turnd_dropped_packets_total{reason=\"stale\"}");
    println!(
        "before the stall {before} packets; after it {} packets, {old} of them older than 300 ms (at most {:?}); {stale_dropped} dropped as stale",
        ages_after.len(),
        ages_after.iter().max()
    );
    assert!(before > 300, "media flowed before the stall: {before}");
    assert!(ages_after.len() > 200, "media flows again after the stall: {}", ages_after.len());
    // What was already in the kernel's buffers when the link stalled still
    // arrives late (a few dozen packets); nothing queued in turnd does.
    assert!(old <= 60, "{old} packets older than 300 ms arrived after the stall (turnd kept a backlog)");
    assert!(stale_dropped > 300.0, "the media that grew old was dropped and counted: {stale_dropped}");
    server.wait_log("dropped media that would have arrived late");
}
