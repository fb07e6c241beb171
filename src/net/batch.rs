//! Batched UDP I/O: recvmmsg and sendmmsg (Linux), so one system call moves
//! many datagrams. Buffers are allocated once per shard and reused.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Bytes per datagram slot. Larger datagrams arrive truncated and are dropped
/// (media and TURN control fit well within an Ethernet MTU).
pub const SLOT: usize = 2048;
/// Room in front of relayed data for the Data indication header.
pub const HEADROOM: usize = 64;

fn to_storage(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(out as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from(*a.ip()).to_be() };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(out as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for AF_INET.
            let sin = unsafe { &*(s as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 for AF_INET6.
            let sin6 = unsafe { &*(s as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), sin6.sin6_flowinfo, sin6.sin6_scope_id)))
        }
        _ => None,
    }
}

/// Receive buffers for one recvmmsg call.
pub struct RecvBatch {
    bufs: Box<[[u8; SLOT]]>,
    addrs: Box<[libc::sockaddr_storage]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
}

impl RecvBatch {
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![[0u8; SLOT]; BATCH].into_boxed_slice(),
            // SAFETY: all-zero is a valid value for these plain C structs.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..BATCH).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect(),
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
        }
    }

    /// Receives up to BATCH datagrams; returns how many (0 on WouldBlock).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: SLOT };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at live buffers owned by self, sized as declared.
        let n = unsafe { libc::recvmmsg(fd, self.hdrs.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        Ok(n as usize)
    }

    /// The i-th datagram of the last `recv`: (source, bytes). `None` when it
    /// was truncated or its address is unusable.
    #[inline]
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        let h = &self.hdrs[i];
        if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            return None;
        }
        Some((from_storage(&self.addrs[i])?, &self.bufs[i][..h.msg_len as usize]))
    }
}

/// Outgoing datagrams for one socket, sent with sendmmsg.
pub struct SendBatch {
    bufs: Box<[[u8; SLOT + HEADROOM]]>,
    lens: [usize; BATCH],
    addrs: Box<[libc::sockaddr_storage]>,
    addr_lens: [libc::socklen_t; BATCH],
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    count: usize,
}

impl SendBatch {
    pub fn new() -> Self {
        SendBatch {
            bufs: vec![[0u8; SLOT + HEADROOM]; BATCH].into_boxed_slice(),
            lens: [0; BATCH],
            // SAFETY: all-zero is a valid value for these plain C structs.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            addr_lens: [0; BATCH],
            iovs: (0..BATCH).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect(),
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            count: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == BATCH
    }

    /// The next free slot to write a datagram into; `commit` it afterwards.
    #[inline]
    pub fn slot(&mut self) -> &mut [u8] {
        &mut self.bufs[self.count]
    }

    #[inline]
    pub fn commit(&mut self, len: usize, to: SocketAddr) {
        let i = self.count;
        self.lens[i] = len;
        self.addr_lens[i] = to_storage(to, &mut self.addrs[i]);
        self.count += 1;
    }

    /// Sends everything queued; returns (sent, dropped). A full socket buffer
    /// drops the rest, as a congested network would.
    pub fn flush(&mut self, fd: RawFd) -> (usize, usize) {
        let total = self.count;
        if total == 0 {
            return (0, 0);
        }
        for i in 0..total {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.lens[i] };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = self.addr_lens[i];
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
        }
        let mut sent = 0;
        let mut dropped = 0;
        while sent + dropped < total {
            let start = sent + dropped;
            // SAFETY: headers start..total point at live buffers owned by self.
            let n = unsafe {
                libc::sendmmsg(fd, self.hdrs[start..].as_mut_ptr(), (total - start) as libc::c_uint, libc::MSG_DONTWAIT)
            };
            if n > 0 {
                sent += n as usize;
            } else {
                // WouldBlock, or an error for the first datagram (e.g. an ICMP
                // error queued by an earlier send): skip it and go on.
                dropped += 1;
            }
        }
        self.count = 0;
        (sent, dropped)
    }
}

/// Sends one datagram without waiting; false when it could not be sent.
#[inline]
pub fn send_to(fd: RawFd, data: &[u8], to: SocketAddr) -> bool {
    // SAFETY: zeroed sockaddr_storage is valid; to_storage fills it.
    let mut st: libc::sockaddr_storage = unsafe { zeroed() };
    let len = to_storage(to, &mut st);
    // SAFETY: data and st are live for the call.
    let n = unsafe {
        libc::sendto(fd, data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT, (&st as *const libc::sockaddr_storage).cast(), len)
    };
    n >= 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn batches_round_trip_over_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_nonblocking(true).unwrap();
        let to = b.local_addr().unwrap();
        let mut sb = SendBatch::new();
        for i in 0..5u8 {
            sb.slot()[..3].copy_from_slice(&[i, i, i]);
            sb.commit(3, to);
        }
        assert_eq!(sb.flush(a.as_raw_fd()), (5, 0));
        let mut rb = RecvBatch::new();
        let mut got = Vec::new();
        for _ in 0..100 {
            let n = rb.recv(b.as_raw_fd()).unwrap();
            for i in 0..n {
                let (from, data) = rb.get(i).unwrap();
                assert_eq!(from, a.local_addr().unwrap());
                got.push(data.to_vec());
            }
            if got.len() == 5 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got, (0..5u8).map(|i| vec![i, i, i]).collect::<Vec<_>>());
        assert!(send_to(a.as_raw_fd(), b"x", to));
    }
}
