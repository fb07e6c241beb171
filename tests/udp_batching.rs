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
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use harness::*;
use turnd::stun::{method, ChannelData, Class};
use wire::{data, peer_at, Incoming, UdpClient};

/// Sends `segs` (equal sizes, the last possibly shorter) to `to` as one UDP GSO send.
fn send_gso(sock: &UdpSocket, to: SocketAddr, segs: &[Vec<u8>]) {
    let seg = segs[0].len();
    assert!(segs.iter().all(|s| s.len() <= seg));
    let buf: Vec<u8> = segs.concat();
    let std::net::SocketAddr::V4(v4) = to else { panic!("IPv4 only") };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let mut ctrl = [0u64; 3];
    // SAFETY: plain C structs filled field by field; the cmsg fits `ctrl`
    // (CMSG_SPACE(2) = 24 bytes) and every pointer outlives the call.
    let n = unsafe {
        let mut h: libc::msghdr = std::mem::zeroed();
        h.msg_name = (&sin as *const libc::sockaddr_in as *mut libc::sockaddr_in).cast();
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        h.msg_control = ctrl.as_mut_ptr().cast();
        h.msg_controllen = libc::CMSG_SPACE(2) as usize;
        let c = libc::CMSG_FIRSTHDR(&h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg as u16);
        libc::sendmsg(sock.as_raw_fd(), &h, 0)
    };
    assert_eq!(n, buf.len() as isize, "GSO send: {}", std::io::Error::last_os_error());
}

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
