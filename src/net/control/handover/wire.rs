//! The handover's messages and how they travel: one JSON message per
//! datagram of a Unix SOCK_SEQPACKET socket pair, with the sockets it hands
//! over attached as SCM_RIGHTS. Every message names the format version in
//! the first one (the offer): a process that reads another version refuses.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::turn::Carried;

/// Largest message: an allocation with 64 permissions and channels is a few kB.
const MAX_MESSAGE: usize = 256 * 1024;
/// Most descriptors one message carries (an allocation's two relay sockets).
const MAX_FDS: usize = 4;

/// What kind of listening socket a [`Msg::Listener`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Udp,
    Stream,
    Metrics,
    CheckHttp,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
pub enum Msg {
    /// Old to new, first: what is on offer and in which format.
    /// `draining`: `turnctl drain` is in force, and stays so in the new process.
    Offer {
        format: u32,
        version: String,
        pid: u32,
        threads: usize,
        nonce_key: Vec<u8>,
        #[serde(default)]
        draining: bool,
    },
    /// New to old: ready to take it.
    Accept { pid: u32 },
    /// New to old: will not take it, and why (the old process serves on).
    Refuse { reason: String },
    /// Old to new, with one socket: a listening socket of `kind` for the
    /// configured `address` (for groups, shard `shard`'s socket).
    Listener { kind: Kind, address: SocketAddr, shard: usize },
    /// Old to new, with the allocation's relay sockets.
    Allocation { shard: usize, mono_ns: u64, carried: Box<Carried> },
    /// Old to new: everything has been sent.
    Done { listeners: usize, allocations: usize },
    /// New to old: serving all of it; the old process lets go.
    Serving { pid: u32, allocations: usize },
}

/// A socket pair for the handover: (ours, the child's). Both close on exec;
/// the child's end is kept open across the exec by the spawn.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into the array we pass.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Bounds how long a receive (`Some`) waits; `None` waits for ever.
pub fn set_timeout(fd: BorrowedFd, t: Option<Duration>) -> io::Result<()> {
    let t = t.unwrap_or_default();
    let tv = libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: a live socket and a timeval of the size we pass.
        let rc = unsafe {
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, &tv as *const libc::timeval as *const libc::c_void, std::mem::size_of::<libc::timeval>() as libc::socklen_t)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends one message with `fds` attached.
pub fn send(sock: BorrowedFd, msg: &Msg, fds: &[BorrowedFd]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if body.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(io::Error::other("handover message too large"));
    }
    let mut iov = libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() };
    // u64 keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: an all-zero msghdr is valid; the fields set below point at
    // buffers that outlive the sendmsg call.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds);
        // SAFETY: CMSG_* compute sizes and positions inside `control`, which
        // is large enough for MAX_FDS descriptors (checked above).
        unsafe {
            mh.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            mh.msg_controllen = libc::CMSG_SPACE(payload as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            let data = libc::CMSG_DATA(c) as *mut RawFd;
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: a live socket and the msghdr built above.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message and the descriptors that came with it; `None` when
/// the other end closed. A receive timeout is an error of kind `WouldBlock`.
pub fn recv(sock: BorrowedFd) -> io::Result<Option<(Msg, Vec<OwnedFd>)>> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut iov = libc::iovec { iov_base: body.as_mut_ptr() as *mut libc::c_void, iov_len: body.len() };
    let mut control = [0u64; 16];
    // SAFETY: as in `send`; recvmsg fills the buffers we point it at.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    mh.msg_controllen = std::mem::size_of_val(&control) as _;
    let n = loop {
        // SAFETY: a live socket and the msghdr built above.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walks the control messages recvmsg wrote, within msg_controllen;
    // each SCM_RIGHTS descriptor is new in this process and ours to own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    if mh.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::other("handover message truncated"));
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&body[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("unreadable handover message: {e}")))?;
    Ok(Some((msg, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_and_sockets_cross_the_pair() {
        let (a, b) = pair().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        send(a.as_fd(), &Msg::Listener { kind: Kind::Udp, address: addr, shard: 1 }, &[udp.as_fd()]).unwrap();
        drop(udp);
        let (msg, fds) = recv(b.as_fd()).unwrap().unwrap();
        assert!(matches!(msg, Msg::Listener { kind: Kind::Udp, shard: 1, .. }));
        assert_eq!(fds.len(), 1);
        // The same socket: still bound to the address, though our copy closed.
        let got = std::net::UdpSocket::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), addr);
        drop(a);
        assert!(recv(b.as_fd()).unwrap().is_none(), "a closed end reads as the end");
    }
}
