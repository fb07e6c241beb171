//! Bursts on the TCP and TLS legs, as a video call sends them: a frame's
//! packets arrive from a participant as many records in one read and leave
//! toward the peer gathered (one GSO send for a run to one peer), and a run
//! of datagrams from the peer (one GRO buffer on the relay socket) goes back
//! to the participant as records written together. Every message must
//! arrive whole and in order on the other side.

mod common;
#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{send_gso, Turnd, PEER_IP, SECRET};
use harness::channel;
use turnd::net::batch::{enable_gro, gso_available, RecvBatch};
use turnd::stun::{method, ChannelData, Class};
use wire::{insecure_tls_config, peer_at, Incoming, StreamClient};

/// Payload `i` of a burst: `len` bytes that differ from one message to the next.
fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i * 13 + k * 7) as u8).collect()
}

/// One ChannelData message on a stream (padded to 4 bytes).
fn channel_data(number: u16, data: &[u8]) -> Vec<u8> {
    let mut m = ChannelData::header(number, data.len()).to_vec();
    m.extend_from_slice(data);
    m.resize((m.len() + 3) & !3, 0);
    m
}

/// Receives `n` datagrams on `sock` (bounded: 5 s), splitting GRO buffers;
/// also returns how many buffers held more than one datagram.
fn recv_n(sock: &UdpSocket, n: usize) -> (Vec<(SocketAddr, Vec<u8>)>, usize) {
    let mut rb = RecvBatch::new();
    let mut got = Vec::new();
    let mut grouped = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < n && Instant::now() < deadline {
        let k = rb.recv(sock.as_raw_fd()).unwrap();
        for i in 0..k {
            let (from, data, seg) = rb.get(i).expect("a whole datagram");
            grouped += (data.len() > seg) as usize;
            got.extend(data.chunks(seg).map(|d| (from, d.to_vec())));
        }
        if k == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    (got, grouped)
}

/// A peer socket that takes GSO runs whole (GRO), to see how turnd sent them.
fn gro_peer() -> UdpSocket {
    let peer = UdpSocket::bind((PEER_IP, 0)).unwrap();
    peer.set_nonblocking(true).unwrap();
    assert!(enable_gro(peer.as_raw_fd()));
    socket2::SockRef::from(&peer).set_recv_buffer_size(1 << 20).unwrap();
    peer
}

/// The burst a participant sends: 60 ChannelData of a video frame's size
/// (more than one 64 KiB read), a few of other sizes (padding) among them.
fn burst_sizes() -> Vec<usize> {
    (0..60).map(|i| if i % 17 == 16 { 301 + i } else { 1200 }).collect()
}

/// Sends the burst as one write: over TLS each message in its own record,
/// all records in that one write.
fn send_burst(tls: Option<&mut rustls::ClientConnection>, tcp: &mut TcpStream, msgs: &[Vec<u8>]) {
    let bytes = match tls {
        Some(conn) => {
            let mut records = Vec::new();
            for m in msgs {
                conn.writer().write_all(m).unwrap();
                while conn.wants_write() {
                    conn.write_tls(&mut records).unwrap();
                }
            }
            records
        }
        None => msgs.concat(),
    };
    tcp.write_all(&bytes).unwrap();
}

/// A TLS client stream shared between the StreamClient (setup) and the
/// test, which writes the burst's records itself.
#[derive(Clone)]
struct SharedTls(Arc<Mutex<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>>);

impl Read for SharedTls {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().read(buf)
    }
}

impl Write for SharedTls {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap().flush()
    }
}

impl wire::Stream for SharedTls {
    fn set_timeout(&mut self, d: Duration) {
        self.0.lock().unwrap().sock.set_read_timeout(Some(d.max(Duration::from_millis(1)))).unwrap();
    }
}

fn burst_reaches_the_peer(tls: bool) {
    let server = Turnd::builder().extra("").streams().start();
    let addr: SocketAddr = format!("127.0.0.1:{}", if tls { server.tls_port } else { server.port }).parse().unwrap();
    let peer = gro_peer();
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    tcp.set_nodelay(true).unwrap();
    let shared = SharedTls(Arc::new(Mutex::new(rustls::StreamOwned::new(
        rustls::ClientConnection::new(insecure_tls_config(), "localhost".try_into().unwrap()).unwrap(),
        tcp.try_clone().unwrap(),
    ))));
    let mut c = if tls { StreamClient::over(Box::new(shared.clone())) } else { StreamClient::over(Box::new(tcp.try_clone().unwrap())) };
    let relayed = c.allocate("burst", SECRET);
    assert_eq!(c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(peer.local_addr().unwrap())]).class(), Class::Success);

    let sizes = burst_sizes();
    let msgs: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &len)| channel_data(0x4000, &payload(i, len))).collect();
    let mut raw = tcp;
    if tls {
        send_burst(Some(&mut shared.0.lock().unwrap().conn), &mut raw, &msgs);
    } else {
        send_burst(None, &mut raw, &msgs);
    }
    let (got, grouped) = recv_n(&peer, msgs.len());
    let want: Vec<(SocketAddr, Vec<u8>)> = sizes.iter().enumerate().map(|(i, &len)| (relayed, payload(i, len))).collect();
    let summary = |v: &[(SocketAddr, Vec<u8>)]| v.iter().map(|(a, d)| (*a, d.len(), d[0])).collect::<Vec<_>>();
    assert_eq!(summary(&got), summary(&want), "the peer gets every message of the burst, whole and in order (tls={tls})");
    assert!(got == want, "payload bytes differ (tls={tls})");
    if gso_available() {
        // Runs of one size to one peer left together (GSO), not one by one.
        assert!(grouped > 0, "the burst left turnd one datagram per system call (tls={tls})");
    }
}

#[test]
fn tls_records_in_one_read_reach_the_peer_whole_and_in_order() {
    burst_reaches_the_peer(true);
}

#[test]
fn tcp_messages_in_one_read_reach_the_peer_whole_and_in_order() {
    burst_reaches_the_peer(false);
}

#[test]
fn gro_run_from_a_peer_reaches_the_tls_client_whole_and_in_order() {
    let server = Turnd::builder().extra("").streams().start();
    let mut c = StreamClient::tls(format!("127.0.0.1:{}", server.tls_port).parse().unwrap());
    let relayed = c.allocate("gro", SECRET);
    let peer = UdpSocket::bind((PEER_IP, 0)).unwrap();
    assert_eq!(c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(peer.local_addr().unwrap())]).class(), Class::Success);
    // Two runs from the peer (one GRO buffer each on the relay socket): 45
    // datagrams of 1,200 bytes and a shorter last one, then 30 of 301 bytes
    // (ChannelData padded on the stream).
    let runs: [Vec<Vec<u8>>; 2] = [
        (0..46).map(|i| payload(i, if i == 45 { 700 } else { 1200 })).collect(),
        (0..30).map(|i| payload(100 + i, 301)).collect(),
    ];
    for run in &runs {
        send_gso(&peer, relayed, run);
    }
    let want: Vec<Vec<u8>> = runs.concat();
    let mut seen = Vec::new();
    while seen.len() < want.len() {
        match c.recv(Duration::from_secs(5)) {
            Some(Incoming::Channel { number: 0x4000, data }) => seen.push(data),
            other => panic!("expected ChannelData, got {other:?} after {} of {}", seen.len(), want.len()),
        }
    }
    let lens = |v: &[Vec<u8>]| v.iter().map(|d| (d.len(), d[0])).collect::<Vec<_>>();
    assert_eq!(lens(&seen), lens(&want), "every datagram of the runs arrives whole and in order");
    assert!(seen == want, "payload bytes differ");
    // Nothing more than was sent.
    assert!(c.recv(Duration::from_millis(200)).is_none());
}

/// Bytes after a client's close_notify, in the same read as it, are
/// ignored: the requests before it are answered and the connection closes
/// (rustls takes nothing after close_notify, so they must not be offered
/// to it again and again).
#[test]
fn bytes_after_close_notify_in_the_same_read_are_ignored() {
    use turnd::stun::Message;
    let server = Turnd::builder().extra("").streams().start();
    let addr: SocketAddr = format!("127.0.0.1:{}", server.tls_port).parse().unwrap();
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut conn = rustls::ClientConnection::new(insecure_tls_config(), "localhost".try_into().unwrap()).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    let mut bytes = Vec::new();
    for i in 0..20u8 {
        let req = harness::build(method::BINDING, Class::Request, [i; 12], &[], None, false);
        conn.writer().write_all(&req).unwrap();
    }
    conn.send_close_notify();
    while conn.wants_write() {
        conn.write_tls(&mut bytes).unwrap();
    }
    // Records after the close_notify, in the same write: more than rustls
    // takes in at once (4 KiB), so some are still to be offered to it after
    // it has seen the close_notify.
    for _ in 0..3 {
        bytes.extend_from_slice(&[0x17, 0x03, 0x03, 0x10, 0x00]);
        bytes.extend_from_slice(&[0x5a; 0x1000]);
    }
    tcp.write_all(&bytes).unwrap();
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
    let mut chunk = [0u8; 4096];
    while Instant::now() < until {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("read: {e} after {} bytes", got.len()),
        }
    }
    let mut at = 0;
    let mut answers = 0;
    while let turnd::stun::FrameLen::Complete(len) = turnd::stun::frame_len(&got[at..]) {
        answers += Message::parse(&got[at..at + len]).is_ok_and(|m| m.class() == Class::Success) as usize;
        at += len;
    }
    assert_eq!(answers, 20, "every request before the close_notify answered, then the connection closed");
}

/// Message `seq` of client `who` in the stress test below: its size cycles
/// through small and large ones (below and above a TLS record and the 16
/// KiB turnd writes at once), its bytes say whose and which it is.
fn stress_message(who: u8, seq: u32) -> Vec<u8> {
    const SIZES: [usize; 10] = [8, 1400, 60, 1200, 4, 3000, 200, 17_000, 33, 9000];
    let len = SIZES[seq as usize % SIZES.len()];
    let mut m = vec![0u8; len.max(5)];
    m[0] = who;
    m[1..5].copy_from_slice(&seq.to_be_bytes());
    for (k, b) in m.iter_mut().enumerate().skip(5) {
        *b = (seq as usize * 31 + k * 7 + who as usize) as u8;
    }
    m
}

/// A lost wake-up anywhere between a client's stream and a relay socket
/// leaves the last messages of a burst waiting for traffic that never
/// comes. Six clients (three over TCP, three over TLS, half of them with a
/// small receive buffer so turnd's writes wait), each with a channel
/// to its own UDP echo peer, send bursts of 40 messages of mixed sizes in
/// one write each and must get every one echoed back within 5 s; the next
/// burst goes only when the last has come back whole, so nothing but a
/// missed wake-up can hold one back, or turnd's drop of media that waited
/// over 200 ms for a client that did not read (which happens when a busy
/// machine leaves a client's thread unscheduled that long): such a burst
/// is excused only when turnd counted at least as many stale drops during
/// it, and only a few may be.
#[test]
fn bursts_both_ways_over_tcp_and_tls_all_arrive_in_time() {
    const CLIENTS: u8 = 6;
    const BURSTS: u32 = 50;
    const PER_BURST: u32 = 40;
    let server = Turnd::builder().extra("").streams().start();
    let tcp: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    let tls: SocketAddr = format!("127.0.0.1:{}", server.tls_port).parse().unwrap();
    let metrics = server.metrics_port;
    let stale = move || -> f64 {
        let (_, body) = common::http_get(&format!("127.0.0.1:{metrics}"), "/metrics");
        let series = "turnd_dropped_packets_total{reason=\"stale\"} ";
        body.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
    };
    let threads: Vec<_> = (0..CLIENTS)
        .map(|who| {
            std::thread::spawn(move || -> Result<u32, String> {
                let over_tls = who % 2 == 1;
                // Half of them take little at a time (8 KiB receive buffer),
                // so that turnd's writes to them fill the socket and wait.
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                if who >= CLIENTS / 2 {
                    sock.set_recv_buffer_size(8 * 1024).unwrap();
                }
                let to = if over_tls { tls } else { tcp };
                sock.connect_timeout(&to.into(), Duration::from_secs(5)).unwrap();
                let sock: TcpStream = sock.into();
                sock.set_nodelay(true).unwrap();
                let mut c = if over_tls {
                    let conn = rustls::ClientConnection::new(insecure_tls_config(), "localhost".try_into().unwrap()).unwrap();
                    StreamClient::over(Box::new(rustls::StreamOwned::new(conn, sock)))
                } else {
                    StreamClient::over(Box::new(sock))
                };
                let peer = common::EchoPeer::start();
                c.allocate(&format!("stress{who}"), SECRET);
                let r = c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(peer.addr)]);
                if r.class() != Class::Success {
                    return Err(format!("client {who}: ChannelBind {:?}", r.code()));
                }
                let mut excused = 0;
                for burst in 0..BURSTS {
                    let stale_before = stale();
                    let seqs = burst * PER_BURST..(burst + 1) * PER_BURST;
                    let bytes: Vec<u8> = seqs.clone().flat_map(|s| channel_data(0x4000, &stress_message(who, s))).collect();
                    let sent_at = Instant::now();
                    c.stream.write_all(&bytes).map_err(|e| format!("client {who}: write: {e}"))?;
                    c.stream.flush().map_err(|e| format!("client {who}: flush: {e}"))?;
                    let mut missing: std::collections::BTreeSet<u32> = seqs.collect();
                    let deadline = sent_at + Duration::from_secs(5);
                    while !missing.is_empty() {
                        let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
                        match c.recv(left) {
                            Some(Incoming::Channel { number: 0x4000, data }) => {
                                let seq = u32::from_be_bytes(data[1..5].try_into().unwrap());
                                if data != stress_message(who, seq) {
                                    return Err(format!("client {who}: message {seq} came back altered ({} bytes)", data.len()));
                                }
                                missing.remove(&seq);
                            }
                            Some(other) => return Err(format!("client {who}: unexpected {other:?}")),
                            None => break,
                        }
                    }
                    if !missing.is_empty() && stale() - stale_before >= missing.len() as f64 {
                        eprintln!("client {who}: burst {burst}: {} messages dropped as stale", missing.len());
                        excused += 1;
                        continue;
                    }
                    if !missing.is_empty() {
                        return Err(format!(
                            "client {who} ({}): burst {burst}: {} of {PER_BURST} messages not back within 5 s: {missing:?}",
                            if over_tls { "TLS" } else { "TCP" },
                            missing.len()
                        ));
                    }
                }
                Ok(excused)
            })
        })
        .collect();
    let results: Vec<Result<u32, String>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let excused: u32 = results.iter().filter_map(|r| r.as_ref().ok()).sum();
    assert!(
        failures.is_empty(),
        "{}\nturnd counted {} stale media drops, {} send failures",
        failures.iter().map(|f| f.as_str()).collect::<Vec<_>>().join("\n"),
        server.metric("turnd_dropped_packets_total{reason=\"stale\"}"),
        server.metric("turnd_dropped_packets_total{reason=\"send_failed\"}")
    );
    assert!(excused <= CLIENTS as u32 * BURSTS / 10, "{excused} bursts lost media as stale: the test checked little");
}
