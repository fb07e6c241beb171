//! What the shards of one relay share: the allocation quotas and EVEN-PORT
//! reservations (the core's [`Ledger`]), the sockets holding reserved ports,
//! the TCP/TLS connection limits, the open-files budget and whether the
//! relay is draining.
//!
//! Everything here is touched when an allocation or a connection starts or
//! ends, never per packet: a mutex is cheap at that rate, and keeps the
//! limits exact however many shards count at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::turn::ledger::{expire_from, give_back_to, take_from};
use crate::turn::{Ledger, QuotaRefusal, Reservation};

/// Connections the metrics and admin endpoint serves at once (`http.rs`).
/// Their descriptors are part of [`FD_RESERVE`], which relay sockets and
/// TURN connections never use, so idle connections there cannot starve
/// allocations of descriptors.
pub const HTTP_CONNECTIONS: usize = 16;

/// Descriptors kept free of relay sockets and TURN connections, for the
/// listeners, reloads and certificate files (32), and the connections to the
/// metrics and admin endpoint (capped at [`HTTP_CONNECTIONS`]): so
/// /readyz can still answer "out of file descriptors", and idle connections
/// there cannot take a relay socket's descriptor.
pub const FD_RESERVE: usize = 32 + HTTP_CONNECTIONS;

/// The open-files soft limit (0 if unknown).
pub fn open_files_limit() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

/// Descriptors relay sockets and connections may use: the open-files limit
/// less [`FD_RESERVE`].
pub fn fd_budget() -> usize {
    match open_files_limit() {
        0 => usize::MAX,
        n => n.saturating_sub(FD_RESERVE),
    }
}

/// How long after running out of file descriptors the relay reports itself
/// not ready (so a load balancer or probe sends new sessions elsewhere).
pub const OUT_OF_FDS_HOLD: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Default)]
struct Quotas {
    total: usize,
    per_user: HashMap<Box<str>, u32>,
    reservations: HashMap<[u8; 8], Reservation>,
}

#[derive(Default)]
struct Connections {
    /// Connections counted against `limits.max_connections`.
    total: usize,
    /// Connections by their per-IP key (an IPv6 client by its prefix: see
    /// `per_ip_key` in `stream/accept.rs`).
    per_ip: HashMap<IpAddr, u32>,
}

/// What a counted connection holds (see [`Shared::admit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// A TCP/TLS client connection: one descriptor, one connection.
    Connection,
    /// A TLS connection passed through to the web server: two descriptors
    /// (the client's and the backend's), one connection.
    PassedThrough,
    /// An accepted connection still reading what decides what it is (its
    /// PROXY header, or with SNI routing its ClientHello): one descriptor,
    /// counted per IP (of its TCP source while the header is read), not yet
    /// a connection.
    Waiting,
}

impl Held {
    fn fds(self) -> usize {
        if self == Held::PassedThrough { 2 } else { 1 }
    }

    fn is_connection(self) -> bool {
        self != Held::Waiting
    }
}

/// Connection limits as configured (0 = unlimited).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_total: u32,
    pub max_per_ip: u32,
}

/// Whether the relay takes new allocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    Serving = 0,
    /// `turnctl drain`: new allocations go elsewhere; the process keeps
    /// running, and `turnctl resume` undoes it.
    Draining = 1,
    /// SIGTERM: draining until the allocations end or `limits.drain_timeout`.
    Stopping = 2,
}

impl Drain {
    fn from_u8(n: u8) -> Drain {
        match n {
            0 => Drain::Serving,
            1 => Drain::Draining,
            _ => Drain::Stopping,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Drain::Serving => "serving",
            Drain::Draining => "draining",
            Drain::Stopping => "stopping",
        }
    }
}

pub struct Shared {
    quotas: Mutex<Quotas>,
    /// Sockets holding ports reserved by EVEN-PORT's R bit, by port: the
    /// shard that claims the token may not be the one that reserved it.
    reserved: Mutex<HashMap<u16, std::net::UdpSocket>>,
    connections: Mutex<Connections>,
    /// Relay sockets open on every shard (reserved ports not included).
    relay_sockets: AtomicUsize,
    /// Descriptors held by TCP/TLS connections on every shard.
    stream_fds: AtomicUsize,
    /// Descriptors relay sockets and connections may use: the open-files
    /// limit less a reserve.
    fd_budget: usize,
    out_of_fds_at: Mutex<Option<Instant>>,
    /// Ports in the relay range (changed by a reload).
    port_range: AtomicUsize,
    /// A [`Drain`] as a number.
    drain: AtomicU8,
    pub started: Instant,
    /// The XDP fast path, when loaded at start (each shard mirrors its
    /// channels into its maps).
    #[cfg(feature = "xdp")]
    pub xdp: std::sync::OnceLock<Arc<super::xdp::FastPath>>,
}

/// A poisoned lock only means another shard panicked while holding it; the
/// counts inside are still whole (every update is a single step).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(fd_budget: usize, port_range: usize) -> Arc<Shared> {
        Arc::new(Shared {
            quotas: Mutex::default(),
            reserved: Mutex::default(),
            connections: Mutex::default(),
            relay_sockets: AtomicUsize::new(0),
            stream_fds: AtomicUsize::new(0),
            fd_budget,
            out_of_fds_at: Mutex::new(None),
            port_range: AtomicUsize::new(port_range),
            drain: AtomicU8::new(Drain::Serving as u8),
            started: Instant::now(),
            #[cfg(feature = "xdp")]
            xdp: std::sync::OnceLock::new(),
        })
    }

    /// Allocations on every shard.
    pub fn allocations(&self) -> usize {
        lock(&self.quotas).total
    }

    pub fn set_port_range(&self, n: usize) {
        self.port_range.store(n, Ordering::Relaxed);
    }

    pub fn port_range(&self) -> usize {
        self.port_range.load(Ordering::Relaxed)
    }

    /// Shutting down (SIGTERM): new allocations refused until the process
    /// ends; `turnctl resume` cannot undo it.
    pub fn set_draining(&self) {
        self.drain.store(Drain::Stopping as u8, Ordering::Relaxed);
    }

    /// Draining on the operator's word (`turnctl drain`): new allocations
    /// refused (sent to a sibling), the process keeps running. Returns the
    /// state it was in.
    pub fn drain_by_operator(&self) -> Drain {
        match self.drain.compare_exchange(Drain::Serving as u8, Drain::Draining as u8, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => Drain::Serving,
            Err(now) => Drain::from_u8(now),
        }
    }

    /// Takes new allocations again after [`Shared::drain_by_operator`];
    /// returns the state it was in (a shutdown stays one).
    pub fn resume(&self) -> Drain {
        match self.drain.compare_exchange(Drain::Draining as u8, Drain::Serving as u8, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => Drain::Draining,
            Err(now) => Drain::from_u8(now),
        }
    }

    pub fn drain_state(&self) -> Drain {
        Drain::from_u8(self.drain.load(Ordering::Relaxed))
    }

    /// Why the relay cannot take new allocations, if it cannot.
    pub fn not_ready(&self) -> Option<&'static str> {
        match self.drain_state() {
            Drain::Stopping => Some("draining: shutting down"),
            Drain::Draining => Some("draining: new allocations go to other relays (turnctl drain; turnctl resume takes them again)"),
            Drain::Serving if self.relay_ports_in_use() >= self.port_range() => Some("no relay port free"),
            Drain::Serving if self.out_of_fds() => Some("out of file descriptors: raise the open-files limit"),
            Drain::Serving => None,
        }
    }

    pub fn draining(&self) -> bool {
        self.drain_state() != Drain::Serving
    }

    /// Relay ports in use on every shard: open sockets and reserved ports.
    pub fn relay_ports_in_use(&self) -> usize {
        self.relay_sockets.load(Ordering::Relaxed) + lock(&self.reserved).len()
    }

    pub fn relay_opened(&self) {
        self.relay_sockets.fetch_add(1, Ordering::Relaxed);
    }

    pub fn relay_closed(&self) {
        self.relay_sockets.fetch_sub(1, Ordering::Relaxed);
    }

    /// Holds `socket` for a reserved port until it is claimed or released.
    pub fn hold_reserved(&self, port: u16, socket: std::net::UdpSocket) {
        lock(&self.reserved).insert(port, socket);
    }

    /// The socket of a reserved port, taken out (claimed, or dropped to release it).
    pub fn take_reserved(&self, port: u16) -> Option<std::net::UdpSocket> {
        lock(&self.reserved).remove(&port)
    }

    /// Descriptors in use by relay sockets and connections.
    pub fn fds_in_use(&self) -> usize {
        self.relay_ports_in_use() + self.stream_fds.load(Ordering::Relaxed)
    }

    pub fn fd_budget(&self) -> usize {
        self.fd_budget
    }

    /// Whether a new connection would eat into the descriptor reserve.
    pub fn fds_left_for_connection(&self) -> bool {
        self.fds_in_use() < self.fd_budget
    }

    /// Starts or extends an out-of-descriptors episode; true when it starts
    /// (the caller logs it once).
    pub fn fds_exhausted(&self) -> bool {
        let mut at = lock(&self.out_of_fds_at);
        let new = !at.is_some_and(|t| t.elapsed() < OUT_OF_FDS_HOLD);
        *at = Some(Instant::now());
        new
    }

    /// Whether a relay socket failed for want of descriptors recently.
    pub fn out_of_fds(&self) -> bool {
        lock(&self.out_of_fds_at).is_some_and(|t| t.elapsed() < OUT_OF_FDS_HOLD)
    }

    /// Counts a connection from `key` (its per-IP key) if the limits and the
    /// descriptor budget allow; false when it is to be closed. Every `true`
    /// is matched by one [`Shared::release`] with the same arguments (or a
    /// [`Shared::recount`] that moves it).
    pub fn admit(&self, key: IpAddr, limits: ConnectionLimits, held: Held) -> bool {
        self.admit_in(&mut lock(&self.connections), key, limits, held)
    }

    fn admit_in(&self, c: &mut Connections, key: IpAddr, limits: ConnectionLimits, held: Held) -> bool {
        let over_total = held.is_connection() && limits.max_total != 0 && c.total >= limits.max_total as usize;
        let over_ip = limits.max_per_ip != 0 && c.per_ip.get(&key).copied().unwrap_or(0) >= limits.max_per_ip;
        if over_total || over_ip || !self.fds_left_for_connection() {
            return false;
        }
        self.count_in(c, key, held);
        true
    }

    fn count_in(&self, c: &mut Connections, key: IpAddr, held: Held) {
        *c.per_ip.entry(key).or_insert(0) += 1;
        c.total += held.is_connection() as usize;
        self.stream_fds.fetch_add(held.fds(), Ordering::Relaxed);
    }

    pub fn release(&self, key: IpAddr, held: Held) {
        self.release_in(&mut lock(&self.connections), key, held)
    }

    fn release_in(&self, c: &mut Connections, key: IpAddr, held: Held) {
        if let Some(n) = c.per_ip.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&key);
            }
        }
        c.total -= held.is_connection() as usize;
        self.stream_fds.fetch_sub(held.fds(), Ordering::Relaxed);
    }

    /// Moves a count admitted as (`key`, `held`) to (`to_key`, `to_held`)
    /// if the limits allow it without the old count, in one step; false
    /// when refused, the old count kept (to be released as before).
    pub fn recount(&self, key: IpAddr, held: Held, to_key: IpAddr, to_held: Held, limits: ConnectionLimits) -> bool {
        let mut c = lock(&self.connections);
        self.release_in(&mut c, key, held);
        if self.admit_in(&mut c, to_key, limits, to_held) {
            return true;
        }
        self.count_in(&mut c, key, held);
        false
    }

    /// Reservations not claimed by `now`, taken out; their sockets close.
    fn expire_reservations(&self, now: Instant, release: &mut dyn FnMut(u16)) {
        expire_from(&mut lock(&self.quotas).reservations, now, release)
    }
}

/// The core's [`Ledger`], shared by every shard.
pub struct SharedLedger(pub Arc<Shared>);

impl Ledger for SharedLedger {
    fn take(&mut self, user: &str, user_quota: u32, total_quota: u32) -> Result<(), QuotaRefusal> {
        let q = &mut *lock(&self.0.quotas);
        take_from(&mut q.total, &mut q.per_user, user, user_quota, total_quota)
    }

    fn give_back(&mut self, user: &str) {
        let q = &mut *lock(&self.0.quotas);
        give_back_to(&mut q.total, &mut q.per_user, user)
    }

    fn allocations(&self) -> usize {
        self.0.allocations()
    }

    fn users(&self) -> usize {
        lock(&self.0.quotas).per_user.len()
    }

    fn reservations(&self) -> usize {
        lock(&self.0.quotas).reservations.len()
    }

    fn reserve(&mut self, token: [u8; 8], r: Reservation) {
        lock(&self.0.quotas).reservations.insert(token, r);
    }

    fn reservation(&self, token: &[u8; 8]) -> Option<Reservation> {
        lock(&self.0.quotas).reservations.get(token).copied()
    }

    fn unreserve(&mut self, token: &[u8; 8]) -> Option<Reservation> {
        lock(&self.0.quotas).reservations.remove(token)
    }

    fn expire_reservations(&mut self, now: Instant, release: &mut dyn FnMut(u16)) {
        self.0.expire_reservations(now, release)
    }

    fn next_reservation_expiry(&self) -> Option<Instant> {
        lock(&self.0.quotas).reservations.values().map(|r| r.expires).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_hold_across_every_holder() {
        let s = Shared::new(10, 100);
        let lim = ConnectionLimits { max_total: 3, max_per_ip: 2 };
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        assert!(s.admit(a, lim, Held::Connection));
        assert!(s.admit(a, lim, Held::PassedThrough));
        assert!(!s.admit(a, lim, Held::Connection), "per IP");
        // A wait for a PROXY header or a ClientHello counts per IP, not as a connection.
        assert!(s.admit(b, lim, Held::Waiting));
        assert!(s.admit(b, lim, Held::Connection));
        assert!(!s.admit(b, lim, Held::Waiting), "per IP");
        assert_eq!(s.fds_in_use(), 5);
        s.release(a, Held::PassedThrough);
        s.release(b, Held::Waiting);
        assert_eq!(s.fds_in_use(), 2);
        assert!(s.admit(b, lim, Held::Connection));
        assert!(!s.admit("198.18.0.3".parse().unwrap(), lim, Held::Connection), "total");
    }

    #[test]
    fn a_count_moves_whole_or_not_at_all() {
        let s = Shared::new(10, 100);
        let lim = ConnectionLimits { max_total: 2, max_per_ip: 2 };
        let lb: IpAddr = "198.18.0.1".parse().unwrap();
        let client: IpAddr = "198.18.0.2".parse().unwrap();
        // A wait at the full per-IP limit becomes a connection of the same address.
        assert!(s.admit(client, lim, Held::Waiting));
        assert!(s.admit(client, lim, Held::Waiting));
        assert!(s.recount(client, Held::Waiting, client, Held::Connection, lim));
        assert!(s.recount(client, Held::Connection, client, Held::PassedThrough, lim));
        assert_eq!(s.fds_in_use(), 3);
        // The total is full: another wait may not become a connection, and stays counted as it was.
        assert!(s.admit(lb, lim, Held::Connection));
        assert!(!s.recount(client, Held::Waiting, client, Held::Connection, lim));
        assert_eq!(s.fds_in_use(), 4);
        s.release(lb, Held::Connection);
        // From the load balancer's address to the client's, which is full.
        assert!(s.admit(lb, lim, Held::Waiting));
        assert!(!s.recount(lb, Held::Waiting, client, Held::Connection, lim), "per IP");
        s.release(client, Held::Waiting);
        assert!(s.recount(lb, Held::Waiting, client, Held::Connection, lim));
        s.release(client, Held::PassedThrough);
        s.release(client, Held::Connection);
        assert_eq!(s.fds_in_use(), 0);
        assert!(lock(&s.connections).per_ip.is_empty());
    }

    #[test]
    fn the_descriptor_budget_counts_relay_ports_and_connections() {
        let s = Shared::new(3, 100);
        let lim = ConnectionLimits { max_total: 0, max_per_ip: 0 };
        s.relay_opened();
        s.hold_reserved(40000, std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        assert_eq!(s.relay_ports_in_use(), 2);
        assert!(s.admit("198.18.0.1".parse().unwrap(), lim, Held::Connection));
        assert!(!s.fds_left_for_connection());
        assert!(!s.admit("198.18.0.1".parse().unwrap(), lim, Held::Connection));
        drop(s.take_reserved(40000));
        assert!(s.fds_left_for_connection());
    }
}
