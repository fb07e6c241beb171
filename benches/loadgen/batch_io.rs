//! Batched UDP I/O (recvmmsg/sendmmsg with GSO), epoll and a timerfd ticker.

use super::*;

// ---------------------------------------------------------------------------
// Batched UDP I/O

/// Buffers and headers for one recvmmsg/sendmmsg call. The headers point into
/// the vectors' heap storage, which never moves after `new`.
pub(super) struct Mmsg {
    pub(super) cap: usize,
    pub(super) bufs: Vec<u8>,
    pub(super) iovs: Vec<libc::iovec>,
    pub(super) addrs: Vec<libc::sockaddr_storage>,
    pub(super) hdrs: Vec<libc::mmsghdr>,
    /// Headers and control buffers for GSO sends (one per run of slots).
    pub(super) ghdrs: Vec<libc::mmsghdr>,
    pub(super) ctrl: Vec<[u64; 4]>,
    pub(super) runs: Vec<(usize, usize)>,
}

pub(super) const SOL_UDP: libc::c_int = 17;
pub(super) const UDP_SEGMENT: libc::c_int = 103;
/// Linux takes at most 64 segments and 64 KiB per GSO send.
pub(super) const GSO_MAX_SEGS: usize = 64;
pub(super) const GSO_MAX_BYTES: usize = 65_000;

impl Mmsg {
    pub(super) fn new(n: usize, cap: usize) -> Mmsg {
        let mut m = Mmsg {
            cap,
            bufs: vec![0u8; n * cap],
            iovs: Vec::with_capacity(n),
            // SAFETY: all-zero is a valid sockaddr_storage.
            addrs: vec![unsafe { zeroed() }; n],
            hdrs: Vec::with_capacity(n),
            // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
            ghdrs: vec![unsafe { zeroed() }; n],
            ctrl: vec![[0u64; 4]; n],
            runs: Vec::with_capacity(n),
        };
        for i in 0..n {
            m.iovs.push(libc::iovec { iov_base: m.bufs[i * cap..].as_mut_ptr().cast(), iov_len: cap });
        }
        for i in 0..n {
            // SAFETY: all-zero is a valid mmsghdr; its pointers are set below.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_iov = &mut m.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            m.hdrs.push(h);
        }
        m
    }

    pub(super) fn slots(&self) -> usize {
        self.hdrs.len()
    }

    pub(super) fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * self.cap..(i + 1) * self.cap]
    }

    pub(super) fn data(&self, i: usize) -> &[u8] {
        &self.bufs[i * self.cap..i * self.cap + self.hdrs[i].msg_len as usize]
    }

    pub(super) fn addr(&self, i: usize) -> Option<SocketAddr> {
        from_storage(&self.addrs[i])
    }

    /// Receives up to `slots()` datagrams (with their source addresses if `with_addr`).
    pub(super) fn recv(&mut self, fd: RawFd, with_addr: bool) -> io::Result<usize> {
        self.recv_into(fd, 0, self.slots(), with_addr)
    }

    /// Receives into slots `from..to`; returns how many arrived.
    pub(super) fn recv_into(&mut self, fd: RawFd, from: usize, to: usize, with_addr: bool) -> io::Result<usize> {
        for i in from..to {
            self.iovs[i].iov_len = self.cap;
            let h = &mut self.hdrs[i];
            h.msg_len = 0;
            h.msg_hdr.msg_flags = 0;
            if with_addr {
                h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            } else {
                h.msg_hdr.msg_name = std::ptr::null_mut();
                h.msg_hdr.msg_namelen = 0;
            }
        }
        // SAFETY: the headers point into buffers, addresses and iovecs this batch owns and keeps alive across the call.
        let r = unsafe {
            libc::recvmmsg(fd, self.hdrs[from..].as_mut_ptr(), (to - from) as u32, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
    }

    /// Sets slot `i` up to send `len` bytes of its buffer (to `to`, or on a connected socket).
    pub(super) fn prepare(&mut self, i: usize, len: usize, to: Option<SocketAddr>) {
        self.iovs[i].iov_len = len;
        let h = &mut self.hdrs[i];
        match to {
            Some(a) => {
                let l = to_storage(a, &mut self.addrs[i]);
                h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = l;
            }
            None => {
                h.msg_hdr.msg_name = std::ptr::null_mut();
                h.msg_hdr.msg_namelen = 0;
            }
        }
    }

    /// For an echo: slot `i` goes back to where it came from, with the length it arrived with.
    pub(super) fn prepare_echo(&mut self, i: usize) {
        self.iovs[i].iov_len = self.hdrs[i].msg_len as usize;
        self.hdrs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
    }

    /// Sends slots `0..n` (already prepared) with UDP GSO: runs of slots of
    /// equal length to the same destination go out as one datagram train
    /// (one pass through the stack; the receiver still gets separate
    /// datagrams). Returns how many slots went out, or an error other than
    /// EAGAIN (e.g. no GSO support) when nothing did.
    pub(super) fn send_gso(&mut self, fd: RawFd, n: usize) -> io::Result<usize> {
        self.runs.clear();
        let mut i = 0;
        while i < n {
            let len = self.iovs[i].iov_len;
            let name = self.hdrs[i].msg_hdr.msg_namelen as usize;
            let mut j = i + 1;
            while j < n
                && j - i < GSO_MAX_SEGS
                && (j - i + 1) * len <= GSO_MAX_BYTES
                && self.iovs[j].iov_len == len
                && self.hdrs[j].msg_hdr.msg_namelen as usize == name
                && (name == 0 || same_addr(&self.addrs[i], &self.addrs[j], name))
            {
                j += 1;
            }
            self.runs.push((i, j - i));
            i = j;
        }
        for r in 0..self.runs.len() {
            let (start, count) = self.runs[r];
            let g = &mut self.ghdrs[r];
            g.msg_len = 0;
            g.msg_hdr.msg_iov = &mut self.iovs[start];
            g.msg_hdr.msg_iovlen = count as _;
            g.msg_hdr.msg_name = self.hdrs[start].msg_hdr.msg_name;
            g.msg_hdr.msg_namelen = self.hdrs[start].msg_hdr.msg_namelen;
            g.msg_hdr.msg_flags = 0;
            if count > 1 {
                let c = &mut self.ctrl[r];
                *c = [0; 4];
                g.msg_hdr.msg_control = c.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE only computes a size.
                g.msg_hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
                // SAFETY: the control buffer is large enough for one u16 cmsg (CMSG_SPACE(2) above), so the header pointers stay inside it.
                unsafe {
                    let cm = libc::CMSG_FIRSTHDR(&g.msg_hdr);
                    (*cm).cmsg_level = SOL_UDP;
                    (*cm).cmsg_type = UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), self.iovs[start].iov_len as u16);
                }
            } else {
                g.msg_hdr.msg_control = std::ptr::null_mut();
                g.msg_hdr.msg_controllen = 0;
            }
        }
        let nruns = self.runs.len();
        let mut at = 0;
        let mut sent = 0;
        while at < nruns {
            // SAFETY: the headers point into this batch's buffers, alive for the call; the count stays within the slice.
            let r = unsafe { libc::sendmmsg(fd, self.ghdrs[at..].as_mut_ptr(), (nruns - at) as u32, libc::MSG_DONTWAIT) };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if r < 0 && e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if r < 0 && sent == 0 && e.kind() != io::ErrorKind::WouldBlock {
                    return Err(e);
                }
                break;
            }
            for k in at..at + r as usize {
                sent += self.runs[k].1;
            }
            at += r as usize;
        }
        Ok(sent)
    }

    /// Sends slots `from..to` with as few sendmmsg calls as the socket allows.
    /// Returns how many went out; stops at EAGAIN (or any error).
    pub(super) fn send(&mut self, fd: RawFd, from: usize, to: usize) -> usize {
        let mut at = from;
        while at < to {
            // SAFETY: as above: the headers point into this batch's buffers; the count stays within the slice.
            let r = unsafe { libc::sendmmsg(fd, self.hdrs[at..].as_mut_ptr(), (to - at) as u32, libc::MSG_DONTWAIT) };
            if r <= 0 {
                if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            at += r as usize;
        }
        at - from
    }
}

pub(super) fn same_addr(a: &libc::sockaddr_storage, b: &libc::sockaddr_storage, len: usize) -> bool {
    // SAFETY: both references are to sockaddr_storage (128 bytes) and len is a sockaddr length the kernel or to_storage wrote, at most that.
    let a = unsafe { std::slice::from_raw_parts((a as *const libc::sockaddr_storage).cast::<u8>(), len) };
    // SAFETY: as above.
    let b = unsafe { std::slice::from_raw_parts((b as *const libc::sockaddr_storage).cast::<u8>(), len) };
    a == b
}

pub(super) struct Epoll {
    pub(super) fd: RawFd,
    pub(super) events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub(super) fn new(max: usize) -> Result<Epoll> {
        // SAFETY: epoll_create1 takes a flag and returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("epoll_create1");
        }
        Ok(Epoll { fd, events: vec![libc::epoll_event { events: 0, u64: 0 }; max] })
    }

    pub(super) fn add(&self, fd: RawFd, events: u32, token: u64) -> Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error()).context("epoll_ctl");
        }
        Ok(())
    }

    /// Waits up to `timeout_ms`; returns the number of ready events.
    pub(super) fn wait(&mut self, timeout_ms: i32) -> usize {
        // SAFETY: events has room for events.len() entries, the count passed.
        let n = unsafe { libc::epoll_wait(self.fd, self.events.as_mut_ptr(), self.events.len() as i32, timeout_ms) };
        n.max(0) as usize
    }

    pub(super) fn event(&self, i: usize) -> (u64, u32) {
        let e = self.events[i];
        (e.u64, e.events)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: this Epoll owns the descriptor and closes it once.
        unsafe { libc::close(self.fd) };
    }
}

/// A periodic timer for pacing, registered in epoll.
pub(super) struct Ticker(pub(super) RawFd);

impl Ticker {
    pub(super) fn new(period: Duration) -> Result<Ticker> {
        // SAFETY: timerfd_create takes flags and returns a new descriptor or -1.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("timerfd_create");
        }
        let ts = libc::timespec { tv_sec: period.as_secs() as _, tv_nsec: period.subsec_nanos() as _ };
        let spec = libc::itimerspec { it_interval: ts, it_value: ts };
        // SAFETY: spec is a valid itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error()).context("timerfd_settime");
        }
        Ok(Ticker(fd))
    }
    pub(super) fn clear(&self) {
        let mut b = [0u8; 8];
        // SAFETY: b has room for the 8 bytes read.
        unsafe { libc::read(self.0, b.as_mut_ptr().cast(), 8) };
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        // SAFETY: this Ticker owns the descriptor and closes it once.
        unsafe { libc::close(self.0) };
    }
}

pub(super) fn set_buffers(fd: RawFd) {
    // SAFETY: the caller's socket stays open for the duration of this function.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let sock = socket2::SockRef::from(&fd);
    let _ = sock.set_recv_buffer_size(SOCK_BUF);
    let _ = sock.set_send_buffer_size(SOCK_BUF);
}
