//! Relay sockets: one UDP socket per relayed address, on a random port.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use socket2::{Domain, Protocol, Socket, Type};
use std::os::fd::AsRawFd;

use tokio::task::JoinHandle;

use super::sockets::{register_udp, Udp};

use std::sync::Arc;

pub use crate::net::shared::FD_RESERVE;
use crate::net::shared::Shared;
use crate::turn::{Family, OpenError, Placement, RelayId, RelayPorts};

/// Attempts at a random port before reporting the range exhausted.
const PORT_ATTEMPTS: usize = 64;

pub struct RelayEntry {
    pub id: RelayId,
    pub socket: Rc<Udp>,
    /// Every datagram leaves with DF (the Allocate carried DONT-FRAGMENT).
    dont_fragment: bool,
    task: Option<JoinHandle<()>>,
}

/// Sets (or clears) the DF bit on everything `fd` sends: IPv4 path MTU
/// discovery "do" (never fragment locally; too large fails with EMSGSIZE) or
/// its default "want"; IPv6 IPV6_DONTFRAG.
fn set_dont_fragment(fd: std::os::fd::RawFd, v6: bool, on: bool) -> io::Result<()> {
    let (level, name, value) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, on as libc::c_int)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, if on { libc::IP_PMTUDISC_DO } else { libc::IP_PMTUDISC_WANT })
    };
    // SAFETY: a live socket, and an int option of the size we pass.
    let rc = unsafe {
        libc::setsockopt(fd, level, name, &value as *const libc::c_int as *const libc::c_void, std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Whether `fd` sets DF on everything it sends (see [`set_dont_fragment`]).
fn sets_dont_fragment(fd: std::os::fd::RawFd, v6: bool) -> bool {
    let (level, name, on) = if v6 { (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1) } else { (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO) };
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a live socket, and an int option with its size.
    let rc = unsafe { libc::getsockopt(fd, level, name, &mut value as *mut libc::c_int as *mut libc::c_void, &mut len) };
    rc == 0 && value == on
}

/// The open relay sockets, indexed like the core's allocation slots so the
/// hot path finds a socket without hashing.
pub struct RelaySockets {
    v4: Option<IpAddr>,
    v6: Option<IpAddr>,
    ports: (u16, u16),
    entries: Vec<Option<RelayEntry>>,
    /// Starts receiving on a socket just opened (the task it returns ends
    /// when the socket closes).
    receive: Receive,
    /// What every shard counts: ports in use, reserved ports' sockets
    /// (EVEN-PORT with R), descriptors.
    shared: Arc<Shared>,
    /// Sockets handed over by the previous process, by (IPv6, port), until
    /// the allocation they belong to takes them ([`Placement::Carried`]).
    carried: HashMap<(bool, u16), std::net::UdpSocket>,
}

/// A random u32 from the OS CSPRNG (never a predictable sequence).
fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the OS random generator is available");
    u32::from_ne_bytes(b)
}

fn index(id: RelayId) -> usize {
    (id.0 & 0x1_FFFF_FFFF) as usize
}

/// What [`RelaySockets`] calls to receive on a socket it opened for `RelayId`.
pub type Receive = Box<dyn Fn(RelayId, Rc<Udp>) -> JoinHandle<()>>;

impl RelaySockets {
    pub fn new(v4: Option<IpAddr>, v6: Option<IpAddr>, ports: (u16, u16), shared: Arc<Shared>, receive: Receive) -> Self {
        RelaySockets { v4, v6, ports, entries: Vec::new(), receive, shared, carried: HashMap::new() }
    }

    /// New relay addresses and port range apply to sockets opened from now on.
    pub fn reconfigure(&mut self, v4: Option<IpAddr>, v6: Option<IpAddr>, ports: (u16, u16)) {
        self.v4 = v4;
        self.v6 = v6;
        self.ports = ports;
    }

    /// Relay sockets open on every shard plus ports held for reservations.
    pub fn in_use(&self) -> usize {
        self.shared.relay_ports_in_use()
    }

    /// Starts or extends an out-of-descriptors episode, logged once.
    fn fds_exhausted(&mut self, e: &io::Error) {
        if self.shared.fds_exhausted() {
            tracing::error!(
                error = %e, descriptors_in_use = self.shared.fds_in_use(),
                "out of file descriptors: new allocations get 508 and /readyz fails; raise the open-files limit (LimitNOFILE) or lower limits.total_quota"
            );
        }
    }

    pub fn port_range_size(&self) -> usize {
        (self.ports.1 - self.ports.0) as usize + 1
    }

    #[inline]
    pub fn get(&self, id: RelayId) -> Option<&RelayEntry> {
        self.entries.get(index(id))?.as_ref().filter(|e| e.id == id)
    }


    /// The descriptor of a live relay socket.
    #[inline]
    pub fn fd(&self, id: RelayId) -> Option<std::os::fd::RawFd> {
        self.get(id).map(|e| e.socket.get_ref().as_raw_fd())
    }

    /// Sends without waiting: a full socket buffer drops the datagram, as the
    /// network would. With `dont_fragment` (a Send indication with
    /// DONT-FRAGMENT) the datagram leaves with DF set: when the socket does
    /// not set it on everything, it is switched on for this one send (a rare
    /// path: browsers do not ask for it). Too large for the path, it is dropped.
    #[inline]
    pub fn send(&self, id: RelayId, peer: SocketAddr, data: &[u8], dont_fragment: bool) -> bool {
        let Some(e) = self.get(id) else { return false };
        let fd = e.socket.get_ref().as_raw_fd();
        if !dont_fragment || e.dont_fragment {
            return super::batch::send_to(fd, data, peer);
        }
        let v6 = id.family() == Family::V6;
        if set_dont_fragment(fd, v6, true).is_err() {
            return false;
        }
        let sent = super::batch::send_to(fd, data, peer);
        let _ = set_dont_fragment(fd, v6, false);
        sent
    }

    /// Holds a socket handed over by the previous process until the
    /// allocation it belongs to is taken up; `false` when it is not a UDP
    /// socket bound to one of this relay's addresses.
    pub fn hand_in(&mut self, sock: std::net::UdpSocket) -> bool {
        let Ok(local) = sock.local_addr() else { return false };
        if Some(local.ip()) != if local.is_ipv4() { self.v4 } else { self.v6 } {
            return false;
        }
        self.carried.insert((local.is_ipv6(), local.port()), sock);
        true
    }

    /// Closes the handed-over sockets no allocation took.
    pub fn drop_unclaimed(&mut self) -> usize {
        let n = self.carried.len();
        self.carried.clear();
        n
    }

    /// Stops receiving on relay socket `id` (an upgrade is handing it over).
    pub fn pause(&mut self, id: RelayId) {
        if let Some(Some(e)) = self.entries.get_mut(index(id))
            && e.id == id
            && let Some(t) = e.task.take() {
                t.abort();
            }
    }

    /// Receives on relay socket `id` again (the handover failed).
    pub fn resume(&mut self, id: RelayId) {
        if let Some(Some(e)) = self.entries.get_mut(index(id))
            && e.id == id
            && e.task.is_none() {
                e.task = Some((self.receive)(id, e.socket.clone()));
            }
    }

    /// A second descriptor of relay socket `id`, for the next process.
    pub fn duplicate(&self, id: RelayId) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.get(id).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?.socket.get_ref().as_fd().try_clone_to_owned()
    }

    fn bind(ip: IpAddr, port: u16) -> io::Result<std::net::UdpSocket> {
        let domain = if ip.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        if ip.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::new(ip, port).into())?;
        super::batch::enable_gro(s.as_raw_fd());
        Ok(s.into())
    }
}

impl RelaySockets {
    /// Binds a socket as `placement` asks, retrying random ports.
    fn bind_placed(&mut self, ip: IpAddr, placement: Placement) -> Result<std::net::UdpSocket, OpenError> {
        if let Placement::Reserved(port) = placement {
            return self.shared.take_reserved(port).ok_or(OpenError::Exhausted);
        }
        if let Placement::Carried(port) = placement {
            return self.carried.remove(&(ip.is_ipv6(), port)).ok_or(OpenError::Exhausted);
        }
        let (lo, hi) = self.ports;
        let span = (hi - lo) as u32 + 1;
        if self.in_use() >= span as usize {
            return Err(OpenError::Exhausted);
        }
        let need = if placement == Placement::EvenReserveNext { 2 } else { 1 };
        if self.shared.fds_in_use() + need > self.shared.fd_budget() {
            self.fds_exhausted(&io::Error::from_raw_os_error(libc::EMFILE));
            return Err(OpenError::Exhausted);
        }
        let even = placement != Placement::Any;
        // Random ports first; when the range is nearly full, random picks
        // mostly hit taken ports, so then walk the whole range once from a
        // random start rather than refuse while ports are still free.
        let start = random_u32();
        for attempt in 0..PORT_ATTEMPTS as u32 + span {
            let offset = if attempt < PORT_ATTEMPTS as u32 { random_u32() } else { start.wrapping_add(attempt) };
            let mut port = lo as u32 + offset % span;
            if even && port % 2 == 1 {
                port -= 1;
                if port < lo as u32 {
                    continue;
                }
            }
            if placement == Placement::EvenReserveNext && port + 1 > hi as u32 {
                continue;
            }
            let sock = match Self::bind(ip, port as u16) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    self.fds_exhausted(&e);
                    return Err(OpenError::Exhausted);
                }
                Err(e) => {
                    tracing::warn!(error = %e, %ip, "cannot open a relay socket");
                    return Err(OpenError::Exhausted);
                }
            };
            if placement == Placement::EvenReserveNext {
                match Self::bind(ip, port as u16 + 1) {
                    Ok(next) => self.shared.hold_reserved(port as u16 + 1, next),
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                        self.fds_exhausted(&e);
                        return Err(OpenError::Exhausted);
                    }
                    Err(_) => continue,
                }
            }
            return Ok(sock);
        }
        Err(OpenError::Exhausted)
    }
}

impl RelayPorts for RelaySockets {
    fn open(&mut self, id: RelayId, family: Family, placement: Placement, dont_fragment: bool) -> Result<SocketAddr, OpenError> {
        let ip = match family {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
        .ok_or(OpenError::FamilyUnsupported)?;
        let std_sock = self.bind_placed(ip, placement)?;
        // A handed-over socket keeps the DF setting its allocation asked for.
        let dont_fragment = dont_fragment || (matches!(placement, Placement::Carried(_)) && sets_dont_fragment(std_sock.as_raw_fd(), ip.is_ipv6()));
        if dont_fragment && let Err(e) = set_dont_fragment(std_sock.as_raw_fd(), ip.is_ipv6(), true) {
            tracing::warn!(error = %e, "cannot set DF on a relay socket: DONT-FRAGMENT gets 420");
            if placement == Placement::EvenReserveNext && let Ok(a) = std_sock.local_addr() {
                drop(self.shared.take_reserved(a.port() + 1));
            }
            return Err(OpenError::DontFragmentUnsupported);
        }
        let local = std_sock.local_addr().map_err(|_| OpenError::Exhausted)?;
        let socket = match register_udp(std_sock) {
            Ok(s) => Rc::new(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot register a relay socket");
                return Err(OpenError::Exhausted);
            }
        };
        let i = index(id);
        if self.entries.len() <= i {
            self.entries.resize_with(i + 1, || None);
        }
        let task = Some((self.receive)(id, socket.clone()));
        self.entries[i] = Some(RelayEntry { id, socket, dont_fragment, task });
        self.shared.relay_opened();
        Ok(local)
    }

    fn release(&mut self, _family: Family, port: u16) {
        drop(self.shared.take_reserved(port));
    }

    fn close(&mut self, id: RelayId) {
        let i = index(id);
        if let Some(slot) = self.entries.get_mut(i)
            && slot.as_ref().is_some_and(|e| e.id == id)
                && let Some(e) = slot.take() {
                    if let Some(t) = e.task {
                        t.abort();
                    }
                    self.shared.relay_closed();
                }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(slot: u32) -> RelayId {
        RelayId::new(slot, 0, Family::V4)
    }

    #[tokio::test]
    async fn a_nearly_full_range_still_finds_the_last_free_port() {
        // Ten ports: random picks alone would often miss the last free ones.
        // Below the ephemeral range and the test relay range, so nothing else holds them.
        let base = 12000 + (std::process::id() % 100) as u16 * 10;
        let mut r = RelaySockets::new(Some("127.0.0.1".parse().unwrap()), None, (base, base + 9), Shared::new(1000, 10), Box::new(|_, _| tokio::spawn(async {})));
        let mut ports = Vec::new();
        for slot in 0..10 {
            match r.open(id(slot), Family::V4, Placement::Any, false) {
                Ok(a) => ports.push(a.port()),
                Err(e) => panic!("slot {slot}: {e:?} with {} of 10 in use", r.in_use()),
            }
        }
        ports.sort();
        assert_eq!(ports, (base..=base + 9).collect::<Vec<_>>());
        assert_eq!(r.open(id(10), Family::V4, Placement::Any, false), Err(OpenError::Exhausted));
        r.close(id(3));
        assert!(r.open(id(11), Family::V4, Placement::Any, false).is_ok());
        assert_eq!(r.open(id(12), Family::V6, Placement::Any, false), Err(OpenError::FamilyUnsupported));
    }
}
