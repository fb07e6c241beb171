//! turnd's batched UDP paths end to end: a client or peer that sends a burst
//! with UDP GSO reaches turnd as one GRO buffer, which turnd must split back
//! into the datagrams it held; what turnd sends on (GSO runs toward clients,
//! gathered sends toward peers) must arrive as the same datagrams, in order.
//! Over loopback, so GSO and GRO really happen (the batch unit tests check
//! that a GSO send reaches a GRO socket as one buffer).

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::send_gso;
use harness::*;
use turnd::stun::{method, ChannelData, Class};
use wire::{data, peer_at, Incoming, UdpClient};

/// Receives `n` datagrams on `sock` (bounded: 5 s in all).
fn recv_n(sock: &UdpSocket, n: usize) -> Vec<(SocketAddr, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 70_000];
    let mut got = Vec::new();
    while got.len() < n {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        match sock.recv_from(&mut buf) {
            Ok((k, from)) => got.push((from, buf[..k].to_vec())),
            Err(_) => break,
        }
    }
    got
}

/// (source, length, first byte) of each datagram: a readable failure message.
fn summary(v: &[(SocketAddr, Vec<u8>)]) -> Vec<(SocketAddr, usize, u8)> {
    v.iter().map(|(a, d)| (*a, d.len(), d.first().copied().unwrap_or(0))).collect()
}

/// Payload `i` of a burst: its index in every byte, `len` bytes.
fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i * 7 + k) as u8).collect()
}

#[test]
fn gso_bursts_through_the_relay_arrive_as_the_datagrams_sent() {
    let server = common::Turnd::start("");
    let peer = UdpSocket::bind((common::PEER_IP, 0)).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut c = UdpClient::new("127.0.0.1", server.addr);
    let relayed = c.allocate("gso", common::SECRET);
    assert_eq!(c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(peer_addr)]).class(), Class::Success);

    // Client -> peer: 24 ChannelData of one size and a shorter last one, in
    // one GSO send (turnd receives them as one GRO buffer).
    let sizes: Vec<usize> = std::iter::repeat_n(300, 24).chain([120]).collect();
    let msgs: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut m = ChannelData::header(0x4000, len).to_vec();
            m.extend_from_slice(&payload(i, len));
            m
        })
        .collect();
    send_gso(&c.sock, server.addr, &msgs);
    let got = recv_n(&peer, msgs.len());
    let want: Vec<(SocketAddr, Vec<u8>)> = sizes.iter().enumerate().map(|(i, &len)| (relayed, payload(i, len))).collect();
    assert_eq!(summary(&got), summary(&want), "the peer gets each ChannelData's payload, in order, from the relayed address");
    assert!(got == want, "payload bytes differ");

    // Peer -> client: a GSO burst to the relayed address (one GRO buffer on
    // the relay socket) comes back as one ChannelData per datagram.
    let back: Vec<Vec<u8>> = (0..30).map(|i| payload(100 + i, 500)).collect();
    send_gso(&peer, relayed, &back);
    let mut seen = Vec::new();
    for _ in 0..back.len() {
        match c.recv(Duration::from_secs(5)) {
            Some(Incoming::Channel { number: 0x4000, data }) => seen.push(data),
            other => panic!("expected ChannelData, got {other:?} after {}", seen.len()),
        }
    }
    assert!(seen == back, "ChannelData payloads differ from what the peer sent");

    // Send indications of equal size in one GSO send: each reaches the peer.
    let inds: Vec<Vec<u8>> = (0..10)
        .map(|i| {
            let tid = c.next_tid();
            build(method::SEND, Class::Indication, tid, &[peer_at(peer_addr), data(&payload(200 + i, 64))], None, false)
        })
        .collect();
    assert!(inds.windows(2).all(|w| w[0].len() == w[1].len()));
    send_gso(&c.sock, server.addr, &inds);
    let got = recv_n(&peer, inds.len());
    let want: Vec<(SocketAddr, Vec<u8>)> = (0..10).map(|i| (relayed, payload(200 + i, 64))).collect();
    assert_eq!(summary(&got), summary(&want));
    assert!(got == want, "payload bytes differ");
}
