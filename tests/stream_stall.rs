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
    let server = Turnd::builder().extra("").streams().start();
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

/// turnd's resident memory (VmRSS), in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Clients that send requests and never read the answers cost turnd a
/// bounded amount each: the answers queued toward a client are bounded, and
/// turnd stops reading from it until they drain (the rest waits in the
/// kernel's buffers, where TCP's flow control stops the client). 64 TCP
/// connections each send Binding requests (no credentials needed) as fast
/// as turnd takes them, up to 1 MiB, never reading; turnd's memory may grow
/// by less than 200 KiB per connection.
#[test]
fn clients_that_never_read_cost_bounded_memory() {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::io::{Read, Write};
    const CONNECTIONS: usize = 64;
    const SEND_UP_TO: usize = 1 << 20;
    let server = Turnd::builder().extra("[limits]\nmax_connections_per_ip = 0\n").streams().start();
    let addr: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    let before = rss_kib(server.pid());
    // Small kernel buffers on the client's side, so that what waits is in turnd.
    let conns: Vec<std::net::TcpStream> = (0..CONNECTIONS)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            s.set_send_buffer_size(16 * 1024).unwrap();
            s.connect_timeout(&addr.into(), Duration::from_secs(5)).unwrap();
            s.set_nonblocking(true).unwrap();
            s.into()
        })
        .collect();
    // 64 Binding requests per write.
    let burst: Vec<u8> = (0..64u8).flat_map(|i| harness::build(method::BINDING, Class::Request, [i; 12], &[], None, false)).collect();
    let mut sent = [0usize; CONNECTIONS];
    let mut progress = [Instant::now(); CONNECTIONS];
    // Done: 1 MiB sent, or turnd has taken nothing for 1 s (it stopped reading).
    let done = |sent: usize, progress: Instant| sent >= SEND_UP_TO || progress.elapsed() > Duration::from_secs(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all_done = true;
        for ((mut c, sent), progress) in conns.iter().zip(sent.iter_mut()).zip(progress.iter_mut()) {
            if done(*sent, *progress) {
                continue;
            }
            all_done = false;
            let at = *sent % burst.len();
            match c.write(&burst[at..]) {
                Ok(n) => {
                    *sent += n;
                    *progress = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("write: {e} after {} bytes: {}", *sent, server.log()),
            }
        }
        if all_done {
            break;
        }
        assert!(Instant::now() < deadline, "still sending after 60 s: {sent:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let after = rss_kib(server.pid());
    let per_conn = after.saturating_sub(before) / CONNECTIONS as u64;
    let stalled = sent.iter().filter(|s| **s < SEND_UP_TO).count();
    println!(
        "turnd RSS {before} KiB before, {after} KiB with {CONNECTIONS} connections not reading: {per_conn} KiB each; \
         {stalled} of them stopped by turnd before 1 MiB (sent {} to {} bytes)",
        sent.iter().min().unwrap(),
        sent.iter().max().unwrap()
    );
    assert!(per_conn < 200, "{per_conn} KiB of turnd's memory per connection that does not read");
    // Once they read, every request sent is answered: what turnd held back
    // goes on as the answers drain (bounded: 30 s).
    let request_len = burst.len() / 64;
    let mut answered = [0usize; CONNECTIONS];
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); CONNECTIONS];
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = true;
        for (i, mut c) in conns.iter().enumerate() {
            if answered[i] == sent[i] / request_len {
                continue;
            }
            all = false;
            match c.read(&mut chunk) {
                Ok(0) => panic!("connection {i} closed after {} of {} answers", answered[i], sent[i] / request_len),
                Ok(n) => bufs[i].extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
            let mut at = 0;
            while let turnd::stun::FrameLen::Complete(n) = turnd::stun::frame_len(&bufs[i][at..]) {
                at += n;
                answered[i] += 1;
            }
            bufs[i].drain(..at);
        }
        if all {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
        assert!(Instant::now() < deadline, "not every request answered within 30 s: {answered:?} of {:?}", sent.map(|s| s / request_len));
    }
}
