//! Batched UDP I/O: recvmmsg and sendmmsg (Linux), so one system call moves
//! many datagrams. Buffers are allocated once per shard and reused.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Bytes per outgoing datagram slot toward UDP clients. Larger messages are
/// not sent (media and TURN control fit well within an Ethernet MTU).
pub const SLOT: usize = 2048;
/// Room in front of relayed data for the Data indication header.
pub const HEADROOM: usize = 64;

/// Writes `addr` as the kernel's sockaddr for sendmsg; returns its length.
pub fn to_storage(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
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

/// Reads the address the kernel wrote (recvmsg); `None` for another family.
pub fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
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

/// Bytes per receive slot: a whole GRO batch (up to 64 KiB) fits.
pub const RECV_SLOT: usize = 65_536;
/// Distance between receive slots: a few cache lines more than a slot, so the
/// slots' first lines (the headers parsed first) do not all fall into the
/// same cache set, as they would 64 KiB apart.
const RECV_STRIDE: usize = RECV_SLOT + 5 * 64;

/// Asks the kernel to hand over runs of same-size datagrams from one source
/// as one buffer (UDP GRO), split again by [`RecvBatch::get`]. Older kernels
/// refuse; then datagrams arrive one by one as before.
pub fn enable_gro(fd: RawFd) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: a c_int option value, its size given.
    unsafe {
        libc::setsockopt(fd, libc::SOL_UDP, libc::UDP_GRO, (&on as *const libc::c_int).cast(), size_of::<libc::c_int>() as libc::socklen_t)
            == 0
    }
}

/// Receive buffers for one recvmmsg call.
pub struct RecvBatch {
    bufs: Box<[u8]>,
    addrs: Box<[libc::sockaddr_storage]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    ctrl: Box<[Cmsg]>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![0u8; RECV_STRIDE * BATCH].into_boxed_slice(),
            // SAFETY: all-zero is a valid value for these plain C structs.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..BATCH).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect(),
            // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            ctrl: vec![[0u64; 3]; BATCH].into_boxed_slice(),
        }
    }

    /// Receives up to BATCH buffers; returns how many (0 on WouldBlock).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i * RECV_STRIDE..].as_mut_ptr().cast(), iov_len: RECV_SLOT };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.ctrl[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = size_of::<Cmsg>();
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

    /// The i-th buffer of the last `recv`: (source, bytes, datagram size).
    /// The bytes are one datagram, or with GRO several of `datagram size`
    /// back to back (the last one possibly shorter). `None` when it was
    /// truncated or its address is unusable.
    #[inline]
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8], usize)> {
        let h = &self.hdrs[i];
        if h.msg_hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return None;
        }
        let len = h.msg_len as usize;
        let mut seg = len;
        if h.msg_hdr.msg_controllen >= size_of::<libc::cmsghdr>() {
            // SAFETY: the kernel wrote msg_controllen bytes of cmsgs into ctrl[i];
            // the first (and only one asked for) is read within them.
            unsafe {
                let c = self.ctrl[i].as_ptr() as *const libc::cmsghdr;
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let g = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                    if g > 0 {
                        seg = g as usize;
                    }
                }
            }
        }
        Some((from_storage(&self.addrs[i])?, &self.bufs[i * RECV_STRIDE..i * RECV_STRIDE + len], seg.max(1)))
    }
}

/// Largest UDP payload one GSO send may carry (IPv4 allows 65,507 bytes).
const GSO_MAX_BYTES: usize = 65_000;
/// Largest segment coalesced with UDP GSO: a datagram that fits an Ethernet
/// MTU over IPv6. A larger one needs IP fragmentation, which GSO refuses, so
/// it leaves on its own.
const GSO_MAX_SEGMENT: usize = 1452;
/// Room for one cmsg carrying a u16 (UDP_SEGMENT), 8-byte aligned.
type Cmsg = [u64; 3];

/// Whether `e` from a GSO send means the path cannot take GSO at all (no
/// checksum offload, an old kernel), so later sends should not try it.
fn gso_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP))
}

/// Refused GSO sends (other than for lack of support: e.g. EINVAL when a
/// route's MTU is below header + segment) after which GSO is given up.
const GSO_MAX_REFUSALS: u32 = 16;

/// Whether the kernel knows UDP_SEGMENT (Linux 4.18+). Older kernels ignore
/// the cmsg and would send a run as one large datagram, so it is probed
/// rather than assumed.
pub fn gso_supported(fd: RawFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a c_int out-value with its size.
    unsafe { libc::getsockopt(fd, libc::SOL_UDP, libc::UDP_SEGMENT, (&mut v as *mut libc::c_int).cast(), &mut len) == 0 }
}

/// [`gso_supported`] on a throwaway socket: whether this kernel has GSO.
pub fn gso_available() -> bool {
    use socket2::{Domain, Socket, Type};
    [Domain::IPV4, Domain::IPV6]
        .into_iter()
        .find_map(|d| Socket::new(d, Type::DGRAM, None).ok())
        .is_some_and(|s| gso_supported(std::os::fd::AsRawFd::as_raw_fd(&s)))
}

/// Fills `c` with a UDP_SEGMENT cmsg of `seg` bytes and returns its length.
fn gso_cmsg(c: &mut Cmsg, seg: usize) -> usize {
    // SAFETY: CMSG_SPACE(2) is 24 bytes on 64-bit Linux (16-byte header plus
    // padding), which is exactly the size of `Cmsg`, and it is 8-aligned.
    unsafe {
        let space = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
        debug_assert!(space <= size_of::<Cmsg>());
        let h = c.as_mut_ptr() as *mut libc::cmsghdr;
        (*h).cmsg_level = libc::SOL_UDP;
        (*h).cmsg_type = libc::UDP_SEGMENT;
        (*h).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(h) as *mut u16, seg as u16);
        space
    }
}

/// How many of `lens[i..]` (all to one destination, as `same(i, j)` says)
/// one GSO send carries: equal sizes, the last one possibly shorter.
#[inline]
fn gso_run(lens: &[usize], i: usize, end: usize, max: usize, same: impl Fn(usize, usize) -> bool) -> usize {
    let seg = lens[i];
    if seg > GSO_MAX_SEGMENT || seg == 0 {
        return 1;
    }
    let mut j = i + 1;
    let mut bytes = seg;
    while j < end && j - i < max && lens[j] <= seg && lens[j] > 0 && bytes + lens[j] <= GSO_MAX_BYTES && same(i, j) {
        bytes += lens[j];
        j += 1;
        if lens[j - 1] < seg {
            break;
        }
    }
    j - i
}

/// Outgoing datagrams for one socket, sent with sendmmsg. Consecutive
/// datagrams of one size to one destination (what a relay socket's batch from
/// one peer becomes) leave as one UDP GSO send: the kernel walks its send path
/// once for the run instead of once per datagram.
pub struct SendBatch {
    bufs: Box<[[u8; SLOT + HEADROOM]]>,
    lens: [usize; BATCH],
    dests: [Option<SocketAddr>; BATCH],
    addrs: Box<[libc::sockaddr_storage]>,
    addr_lens: [libc::socklen_t; BATCH],
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    /// Per message: the first datagram and how many it carries.
    runs: [(usize, usize); BATCH],
    ctrl: Box<[Cmsg]>,
    count: usize,
    /// Cleared when the socket's path refuses GSO.
    gso: bool,
    gso_refusals: u32,
    /// Messages that carried more than one datagram.
    pub coalesced: u64,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendBatch {
    pub fn new() -> Self {
        SendBatch {
            bufs: vec![[0u8; SLOT + HEADROOM]; BATCH].into_boxed_slice(),
            lens: [0; BATCH],
            dests: [None; BATCH],
            // SAFETY: all-zero is a valid value for these plain C structs.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            addr_lens: [0; BATCH],
            iovs: (0..BATCH).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect(),
            // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            runs: [(0, 0); BATCH],
            ctrl: vec![[0u64; 3]; BATCH].into_boxed_slice(),
            count: 0,
            gso: true,
            gso_refusals: 0,
            coalesced: 0,
        }
    }

    /// For sending on `fd`: with GSO if the kernel has it.
    pub fn for_socket(fd: RawFd) -> Self {
        if gso_supported(fd) {
            Self::new()
        } else {
            Self::without_gso()
        }
    }

    /// Without UDP GSO: one message per datagram.
    pub fn without_gso() -> Self {
        SendBatch { gso: false, ..Self::new() }
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
        self.dests[i] = Some(to);
        self.addr_lens[i] = to_storage(to, &mut self.addrs[i]);
        self.count += 1;
    }

    /// Sends everything queued; returns (sent, dropped) datagrams. A full
    /// socket buffer drops the rest, as a congested network would.
    pub fn flush(&mut self, fd: RawFd) -> (usize, usize) {
        let total = self.count;
        if total == 0 {
            return (0, 0);
        }
        self.count = 0;
        for i in 0..total {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.lens[i] };
        }
        // Group runs into messages.
        let mut msgs = 0;
        let mut i = 0;
        while i < total {
            let k = if self.gso { gso_run(&self.lens, i, total, BATCH, |a, b| self.dests[a] == self.dests[b]) } else { 1 };
            self.runs[msgs] = (i, k);
            let h = &mut self.hdrs[msgs];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = self.addr_lens[i];
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = k;
            if k > 1 {
                h.msg_hdr.msg_controllen = gso_cmsg(&mut self.ctrl[msgs], self.lens[i]);
                h.msg_hdr.msg_control = self.ctrl[msgs].as_mut_ptr().cast();
            } else {
                h.msg_hdr.msg_control = std::ptr::null_mut();
                h.msg_hdr.msg_controllen = 0;
            }
            h.msg_hdr.msg_flags = 0;
            msgs += 1;
            i += k;
        }
        let mut sent = 0;
        let mut dropped = 0;
        let mut m = 0;
        while m < msgs {
            // SAFETY: headers m..msgs point at live buffers, addresses and
            // control data owned by self.
            let n = unsafe { libc::sendmmsg(fd, self.hdrs[m..].as_mut_ptr(), (msgs - m) as libc::c_uint, libc::MSG_DONTWAIT) };
            if n > 0 {
                for r in &self.runs[m..m + n as usize] {
                    sent += r.1;
                    self.coalesced += (r.1 > 1) as u64;
                }
                m += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            let (first, k) = self.runs[m];
            if e.kind() == io::ErrorKind::WouldBlock {
                // The socket buffer is full: the rest is dropped, as a
                // congested network would, without a call per datagram.
                for r in &self.runs[m..msgs] {
                    dropped += r.1;
                }
                break;
            }
            if k > 1 {
                // The path refused the GSO send: send its datagrams one by
                // one, and stop trying GSO on this socket if it never can.
                self.gso_refusals += 1;
                if gso_unsupported(&e) || self.gso_refusals >= GSO_MAX_REFUSALS {
                    self.gso = false;
                }
                for d in first..first + k {
                    let ok = self.dests[d].is_some_and(|to| send_to(fd, &self.bufs[d][..self.lens[d]], to));
                    if ok {
                        sent += 1
                    } else {
                        dropped += 1
                    }
                }
            } else {
                // An error for this datagram (e.g. an ICMP error queued by an
                // earlier send): drop it and go on.
                dropped += k;
            }
            m += 1;
        }
        (sent, dropped)
    }
}

/// Datagrams on their way from clients to peers, each through its
/// allocation's relay socket, gathered over one received batch so that a run
/// to one peer leaves in one system call (UDP GSO, or sendmmsg without it).
///
/// It holds pointers into the receive batch the datagrams came from:
/// [`PeerSends::flush`] must run before that batch receives again. The relay
/// socket is looked up at flush time by its [`RelayId`], so a datagram whose
/// allocation ended meanwhile is dropped, never sent from a reused socket.
pub struct PeerSends {
    relays: [crate::turn::RelayId; BATCH],
    peers: [SocketAddr; BATCH],
    lens: [usize; BATCH],
    iovs: [libc::iovec; BATCH],
    addrs: Box<[libc::sockaddr_storage]>,
    hdrs: Box<[libc::mmsghdr]>,
    ctrl: Cmsg,
    count: usize,
    gso: bool,
    gso_refusals: u32,
    /// System calls that carried more than one datagram.
    pub coalesced: u64,
}

impl PeerSends {
    /// `gso`: whether the kernel has UDP GSO ([`gso_available`]).
    pub fn new(gso: bool) -> Self {
        const UNSPEC: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        PeerSends {
            relays: [crate::turn::RelayId(0); BATCH],
            peers: [UNSPEC; BATCH],
            lens: [0; BATCH],
            iovs: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH],
            // SAFETY: all-zero is a valid value for these plain C structs.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            ctrl: [0; 3],
            count: 0,
            gso,
            gso_refusals: 0,
            coalesced: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == BATCH
    }

    /// Forgets what is queued without sending it.
    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// Queues `data` for `flush`.
    ///
    /// # Safety
    /// `data` must stay valid and unchanged until the next `flush` or
    /// `clear`: the queue keeps a pointer to it, not a copy.
    #[inline]
    pub unsafe fn push(&mut self, relay: crate::turn::RelayId, peer: SocketAddr, data: &[u8]) {
        let i = self.count;
        self.relays[i] = relay;
        self.peers[i] = peer;
        self.lens[i] = data.len();
        self.iovs[i] = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
        self.count += 1;
    }

    /// Sends what is queued; `fd_of` gives a live relay socket's descriptor.
    /// Returns (sent, dropped) datagrams.
    pub fn flush(&mut self, fd_of: impl Fn(crate::turn::RelayId) -> Option<RawFd>) -> (usize, usize) {
        let total = self.count;
        self.count = 0;
        let (mut sent, mut dropped) = (0, 0);
        let mut i = 0;
        while i < total {
            let k = if self.gso {
                gso_run(&self.lens, i, total, BATCH, |a, b| self.relays[a] == self.relays[b] && self.peers[a] == self.peers[b])
            } else {
                let mut j = i + 1;
                while j < total && self.relays[j] == self.relays[i] && self.peers[j] == self.peers[i] {
                    j += 1;
                }
                j - i
            };
            let Some(fd) = fd_of(self.relays[i]) else {
                dropped += k;
                i += k;
                continue;
            };
            let (s, d) = if k == 1 {
                // SAFETY: the caller keeps the queued data valid until flush.
                let data = unsafe { std::slice::from_raw_parts(self.iovs[i].iov_base as *const u8, self.lens[i]) };
                if send_to(fd, data, self.peers[i]) {
                    (1, 0)
                } else {
                    (0, 1)
                }
            } else if self.gso {
                self.send_gso(fd, i, k)
            } else {
                self.send_each(fd, i, k)
            };
            sent += s;
            dropped += d;
            i += k;
        }
        (sent, dropped)
    }

    fn send_gso(&mut self, fd: RawFd, i: usize, k: usize) -> (usize, usize) {
        let namelen = to_storage(self.peers[i], &mut self.addrs[0]);
        // SAFETY: zeroed msghdr is valid; every pointer set below is live for the call.
        let mut h: libc::msghdr = unsafe { zeroed() };
        h.msg_name = (&mut self.addrs[0] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = namelen;
        h.msg_iov = &mut self.iovs[i];
        h.msg_iovlen = k;
        h.msg_controllen = gso_cmsg(&mut self.ctrl, self.lens[i]);
        h.msg_control = self.ctrl.as_mut_ptr().cast();
        // SAFETY: as above; the iovecs point at data the caller keeps valid.
        let n = unsafe { libc::sendmsg(fd, &h, libc::MSG_DONTWAIT) };
        if n >= 0 {
            self.coalesced += 1;
            return (k, 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return (0, k);
        }
        self.gso_refusals += 1;
        if gso_unsupported(&e) || self.gso_refusals >= GSO_MAX_REFUSALS {
            self.gso = false;
        }
        self.send_each(fd, i, k)
    }

    fn send_each(&mut self, fd: RawFd, i: usize, k: usize) -> (usize, usize) {
        for j in 0..k {
            let namelen = to_storage(self.peers[i + j], &mut self.addrs[j]);
            let h = &mut self.hdrs[j];
            h.msg_hdr.msg_name = (&mut self.addrs[j] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = namelen;
            h.msg_hdr.msg_iov = &mut self.iovs[i + j];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
        }
        let (mut sent, mut dropped) = (0, 0);
        while sent + dropped < k {
            let start = sent + dropped;
            // SAFETY: headers start..k point at live addresses and queued data.
            let n = unsafe { libc::sendmmsg(fd, self.hdrs[start..].as_mut_ptr(), (k - start) as libc::c_uint, libc::MSG_DONTWAIT) };
            if n > 0 {
                sent += n as usize;
                self.coalesced += (n > 1) as u64;
            } else if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                dropped = k - sent;
            } else {
                dropped += 1;
            }
        }
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
                let (from, data, _) = rb.get(i).unwrap();
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

    /// Receives until `want` datagrams arrived (bounded), in order.
    fn drain(sock: &std::net::UdpSocket, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        drain_counting(sock, want).0
    }

    /// Also counts the buffers that held more than one datagram (GRO).
    fn drain_counting(sock: &std::net::UdpSocket, want: usize) -> (Vec<(SocketAddr, Vec<u8>)>, usize) {
        let mut rb = RecvBatch::new();
        let mut got = Vec::new();
        let mut grouped = 0;
        for _ in 0..500 {
            let n = rb.recv(sock.as_raw_fd()).unwrap();
            for i in 0..n {
                let (from, data, seg) = rb.get(i).unwrap();
                grouped += (data.len() > seg) as usize;
                for d in data.chunks(seg) {
                    got.push((from, d.to_vec()));
                }
            }
            if got.len() >= want {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        (got, grouped)
    }

    fn datagram(tag: u8, len: usize) -> Vec<u8> {
        (0..len).map(|k| tag.wrapping_add(k as u8)).collect()
    }

    /// Runs of one size to one destination leave as GSO sends (or one by one
    /// without GSO); either way every datagram arrives whole, in order, with
    /// its own length, interleaved destinations included.
    #[test]
    fn coalesced_sends_arrive_as_separate_datagrams() {
        // IPv4, then IPv6 where the host has ::1.
        let v6 = std::net::UdpSocket::bind("[::1]:0").is_ok();
        for (ip, gso) in [("127.0.0.1", true), ("127.0.0.1", false), ("::1", true), ("::1", false)] {
            if ip == "::1" && !v6 {
                continue;
            }
            let a = std::net::UdpSocket::bind((ip, 0)).unwrap();
            let b = std::net::UdpSocket::bind((ip, 0)).unwrap();
            let c = std::net::UdpSocket::bind((ip, 0)).unwrap();
            b.set_nonblocking(true).unwrap();
            c.set_nonblocking(true).unwrap();
            // b takes GRO runs whole (split again on receipt); c one by one.
            assert!(enable_gro(b.as_raw_fd()));
            let (tb, tc) = (b.local_addr().unwrap(), c.local_addr().unwrap());
            let mut sb = if gso { SendBatch::new() } else { SendBatch::without_gso() };
            // 10 equal to b, a shorter one ending the run, 3 to c, 2 to b, one
            // too large to coalesce, then 2 more equal ones to b.
            let plan: Vec<(SocketAddr, usize)> = std::iter::repeat_n((tb, 1204), 10)
                .chain([(tb, 100)])
                .chain(std::iter::repeat_n((tc, 1204), 3))
                .chain([(tb, 500), (tb, 500), (tb, 2000), (tb, 40), (tb, 40)])
                .collect();
            for (i, (to, len)) in plan.iter().enumerate() {
                let d = datagram(i as u8, *len);
                sb.slot()[..*len].copy_from_slice(&d);
                sb.commit(*len, *to);
            }
            assert_eq!(sb.flush(a.as_raw_fd()), (plan.len(), 0), "gso={gso}");
            // Runs: 10+1 to b, 3 to c, 2×500 and 2×40 to b; the 2000 alone.
            assert_eq!(sb.coalesced, if gso { 4 } else { 0 }, "gso={gso}");
            let want_b: Vec<Vec<u8>> =
                plan.iter().enumerate().filter(|(_, p)| p.0 == tb).map(|(i, p)| datagram(i as u8, p.1)).collect();
            let want_c: Vec<Vec<u8>> =
                plan.iter().enumerate().filter(|(_, p)| p.0 == tc).map(|(i, p)| datagram(i as u8, p.1)).collect();
            let (got_b, grouped) = drain_counting(&b, want_b.len());
            let got_b: Vec<Vec<u8>> = got_b.into_iter().map(|x| x.1).collect();
            // Over loopback a GSO send reaches a GRO socket as one buffer.
            assert_eq!(grouped > 0, gso, "gso={gso}");
            let got_c: Vec<Vec<u8>> = drain(&c, want_c.len()).into_iter().map(|x| x.1).collect();
            assert_eq!(got_b, want_b, "gso={gso}");
            assert_eq!(got_c, want_c, "gso={gso}");
        }
    }

    #[test]
    fn peer_sends_go_out_of_their_relay_socket_and_skip_ended_ones() {
        use crate::turn::{Family, RelayId};
        let r1 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let r2 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_nonblocking(true).unwrap();
        let to = peer.local_addr().unwrap();
        let (id1, id2, gone) = (RelayId::new(1, 0, Family::V4), RelayId::new(2, 0, Family::V4), RelayId::new(3, 0, Family::V4));
        let payloads: Vec<(RelayId, Vec<u8>)> = (0..12u8)
            .map(|i| (if i < 6 { id1 } else if i < 9 { gone } else { id2 }, datagram(i, if i == 5 { 300 } else { 1000 })))
            .collect();
        for gso in [true, false] {
            let mut ps = PeerSends::new(gso);
            for (id, d) in &payloads {
                // SAFETY: `payloads` outlives the flush below.
                unsafe { ps.push(*id, to, d) };
            }
            let fd_of = |id: RelayId| {
                if id == id1 {
                    Some(r1.as_raw_fd())
                } else if id == id2 {
                    Some(r2.as_raw_fd())
                } else {
                    None
                }
            };
            assert_eq!(ps.flush(fd_of), (9, 3), "gso={gso}");
            // 5+1 through r1 and 3 through r2, GSO or sendmmsg.
            assert_eq!(ps.coalesced, 2, "gso={gso}");
            assert!(ps.is_empty());
            let got = drain(&peer, 9);
            let want: Vec<(SocketAddr, Vec<u8>)> = payloads
                .iter()
                .filter(|p| p.0 != gone)
                .map(|(id, d)| (if *id == id1 { r1.local_addr().unwrap() } else { r2.local_addr().unwrap() }, d.clone()))
                .collect();
            assert_eq!(got, want, "gso={gso}");
        }
    }
}
