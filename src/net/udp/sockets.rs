//! Listener sockets: one per shard for each listen address, joined in a
//! SO_REUSEPORT group so the kernel spreads clients over the shards. For UDP
//! it picks a group's socket by hashing the client's address and port, so
//! a client's datagrams all reach the same shard as long as the group keeps
//! its size; a group is therefore opened and closed whole, never resized.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;

use super::batch;

/// A non-blocking UDP socket registered with the runtime.
pub type Udp = AsyncFd<std::net::UdpSocket>;

/// Receive and send buffer asked for on UDP listeners.
const UDP_LISTENER_BUFFER: usize = 4 << 20;

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let s = Socket::new(domain, ty, Some(proto))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Fails as a plain bind would when anything holds `addr`: a group socket
/// could otherwise join the group of another program of the same user
/// (another turnd started by mistake) and share its clients.
fn check_free(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let s = socket(addr, ty, proto)?;
    if ty == Type::STREAM {
        // A connection of an earlier run in TIME_WAIT is not in the way.
        s.set_reuse_address(true)?;
    }
    s.bind(&addr.into())
}

/// `n` sockets bound to `addr` in one group; with port 0, the port the
/// first one got.
fn group(addr: SocketAddr, n: usize, ty: Type, proto: Protocol, setup: impl Fn(&Socket) -> io::Result<()>) -> io::Result<Vec<Socket>> {
    check_free(addr, ty, proto)?;
    let mut at = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let s = socket(at, ty, proto)?;
        s.set_reuse_port(true)?;
        setup(&s)?;
        s.bind(&at.into())?;
        if let Some(a) = s.local_addr()?.as_socket() {
            at = a;
        }
        out.push(s);
    }
    Ok(out)
}

/// The UDP listener sockets of `addr`, one per shard.
pub fn bind_udp_group(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let socks = group(addr, n, Type::DGRAM, Protocol::UDP, |s| {
        // Media arrives in bursts; a larger buffer absorbs them (the kernel caps it at rmem_max).
        let _ = s.set_recv_buffer_size(UDP_LISTENER_BUFFER);
        let _ = s.set_send_buffer_size(UDP_LISTENER_BUFFER);
        Ok(())
    })?;
    // Linux reports twice what it granted (bookkeeping included).
    if let Some(got) = socks.first().and_then(|s| s.recv_buffer_size().ok())
        && got / 2 < UDP_LISTENER_BUFFER {
            tracing::warn!(
                listener = %addr, granted_kib = got / 2 / 1024, wanted_kib = UDP_LISTENER_BUFFER / 1024,
                "UDP receive buffer smaller than wanted: bursts may be dropped under load; raise net.core.rmem_max (see deploy/README.md)"
            );
        }
    Ok(socks
        .into_iter()
        .map(|s| {
            batch::enable_gro(s.as_raw_fd());
            s.into()
        })
        .collect())
}

/// The TCP/TLS listener sockets of `addr`, one per shard, listening.
pub fn bind_tcp_group(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let socks = group(addr, n, Type::STREAM, Protocol::TCP, |s| s.set_reuse_address(true))?;
    socks
        .into_iter()
        .map(|s| {
            s.listen(1024)?;
            Ok(s.into())
        })
        .collect()
}

/// One TCP listener (metrics and admin).
pub fn bind_tcp(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let s = socket(addr, Type::STREAM, Protocol::TCP)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// Registers a non-blocking UDP socket with the runtime, for reading.
pub fn register_udp(sock: std::net::UdpSocket) -> io::Result<Udp> {
    // SAFETY: a std UdpSocket owns its descriptor, which stays open and the
    // same until the socket (moved into the AsyncFd) is dropped.
    unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_shares_one_port_and_refuses_a_port_held_by_another_socket() {
        let g = bind_udp_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = g[0].local_addr().unwrap().port();
        assert!(g.iter().all(|s| s.local_addr().unwrap().port() == port));
        // A second group on the same port (another turnd of the same user) is refused.
        let e = bind_udp_group(SocketAddr::new("127.0.0.1".parse().unwrap(), port), 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let t = bind_tcp_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let tport = t[0].local_addr().unwrap().port();
        assert_eq!(t[1].local_addr().unwrap().port(), tport);
        assert!(bind_tcp_group(SocketAddr::new("127.0.0.1".parse().unwrap(), tport), 1).is_err());
    }
}
