//! The sans-IO TURN server (RFC 8656).
//!
//! [`Server`] takes bytes, the addresses they travelled between and the
//! current time, and returns what to send where. It owns no socket, clock or
//! runtime: relay sockets are opened and closed through the [`RelayPorts`]
//! trait the I/O layer implements, so tests drive it with a fake.
//!
//! # Driving it
//!
//! The I/O layer owes the core these calls, and nothing else reaches it:
//!
//! 1. Each datagram, or framed stream message, from a client goes to
//!    [`Server::handle_client`]. Its [`Output`] is acted on at once: `Reply`
//!    goes back to the client on the same transport; `Relay` leaves from
//!    relay socket `relay` to `peer` (the bytes borrow the input: send or
//!    queue-and-flush them before reusing that buffer).
//! 2. Each datagram on a relay socket goes to [`Server::handle_peer`]; what
//!    it returns goes to that client.
//! 3. Time: sleep until [`Server::poll_timeout`]; then call
//!    [`Server::expire`] (a bounded batch) until it says nothing more is due.
//! 4. After any call, drain [`Server::poll_event`]: logs, metrics, a fast
//!    path mirroring channel bindings, and [`Event::DeadlineMoved`], which
//!    means the sleep of step 3 must end sooner (read `poll_timeout` again).
//!    Report an ended TCP/TLS connection with [`Server::connection_closed`].
//!
//! The core reaches back only through [`RelayPorts`], synchronously, inside
//! those calls: the I/O layer opens a socket there and starts receiving on it
//! once the call returns.
//!
//! ```
//! use std::net::SocketAddr;
//! use turnd::auth::{Authenticator, NonceKey};
//! use turnd::turn::*;
//!
//! /// A real layer binds UDP sockets here and starts receiving on them.
//! struct Sockets(Vec<RelayId>);
//! impl RelayPorts for Sockets {
//!     fn open(&mut self, id: RelayId, _: Family, _: Placement, _: bool) -> Result<SocketAddr, OpenError> {
//!         self.0.push(id);
//!         Ok("198.18.0.1:50000".parse().unwrap())
//!     }
//!     fn close(&mut self, id: RelayId) {
//!         self.0.retain(|o| *o != id);
//!     }
//!     fn release(&mut self, _: Family, _: u16) {}
//! }
//!
//! let auth = Authenticator::new("example", vec![b"secret".to_vec()], &[], NonceKey::new([7; 32], 600));
//! let policy = PeerPolicy::new(vec![], vec![], vec![], (49152, 65535));
//! let mut server = Server::new(ServerConfig::default(), auth, policy);
//! let mut relays = Sockets(Vec::new());
//! let mut out = vec![0u8; 65_536];
//! let client: SocketAddr = "198.18.0.2:40000".parse().unwrap();
//! let tuple = FiveTuple { client, server: "198.18.0.1:3478".parse().unwrap(), transport: Transport::Udp, conn: 0 };
//!
//! // 1. A STUN Binding request from the client: answered.
//! let mut binding = [0u8; 20];
//! binding[1] = 0x01;
//! binding[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
//! binding[8..20].copy_from_slice(b"transaction1");
//! match server.handle_client(tuple, &binding, Now::system(), &mut out, &mut relays) {
//!     Output::Reply(bytes) => assert_eq!(bytes[..2], [0x01, 0x01]), // a Binding success, to `client`
//!     Output::Relay { .. } | Output::None => unreachable!(),
//! }
//! // 2. Datagrams from peers go to `server.handle_peer(relay, from, bytes, now, &mut out)`.
//!
//! // 4. Events, after every call (a Binding files no deadline).
//! while let Some(event) = server.poll_event() {
//!     assert_ne!(event, Event::DeadlineMoved);
//! }
//! // 3. Timers: nothing is due without an allocation.
//! assert_eq!(server.poll_timeout(), None);
//! if let Some(at) = server.poll_timeout() {
//!     while server.expire(at, &mut relays, 256) {}
//! }
//! assert!(relays.0.is_empty());
//! ```

#![forbid(unsafe_code)]

mod allocation;
pub mod bandwidth;
pub mod health;
pub mod ledger;
pub mod policy;
pub mod ratelimit;
mod server;
mod slab;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

pub use allocation::{Allocation, Channel, Permission, CHANNEL_COOLDOWN};
pub use ledger::{Ledger, LocalLedger, QuotaRefusal, Reservation};
pub use policy::{Cidr, PeerPolicy};
pub use server::{AdoptError, Carried, CarriedBucket, CarriedChannel, CarriedRelay, HANDOVER_FORMAT, Alternate, Footprint, RelayAddr, Server, ServerConfig, AMPLIFICATION_FACTOR, DEFAULT_UNAUTH_RATE};

/// The transport a client reached us over.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::Udp, Transport::Tcp, Transport::Tls];

    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// Identifies a client: its address, our address, the transport, and the
/// I/O layer's handle for the socket or connection (`conn`), which the core
/// hands back untouched so the I/O layer finds where to send without a lookup.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FiveTuple {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: Transport,
    pub conn: u32,
}

/// Address family of a relayed address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Family {
    V4,
    V6,
}

/// Names one relay socket: allocation slot, slot generation and family.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RelayId(pub u64);

impl RelayId {
    pub(crate) fn new(slot: u32, generation: u32, family: Family) -> Self {
        let f = matches!(family, Family::V6) as u64;
        RelayId(((generation as u64) << 33) | ((slot as u64) << 1) | f)
    }
    pub(crate) fn slot(self) -> u32 {
        ((self.0 >> 1) & 0xFFFF_FFFF) as u32
    }
    pub(crate) fn generation(self) -> u32 {
        (self.0 >> 33) as u32
    }
    pub fn family(self) -> Family {
        if self.0 & 1 == 1 { Family::V6 } else { Family::V4 }
    }
}

/// Why a relay socket could not be opened.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OpenError {
    /// No relay address of that family is configured (440).
    FamilyUnsupported,
    /// No free port, or the system refused a socket (508).
    Exhausted,
    /// The socket cannot set the DF bit that DONT-FRAGMENT asked for (420
    /// with DONT-FRAGMENT in UNKNOWN-ATTRIBUTES, RFC 8656 7.2).
    DontFragmentUnsupported,
}

/// Where a new relay socket should go.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Placement {
    /// Any free port in the range, picked at random.
    Any,
    /// A random even port (EVEN-PORT).
    Even,
    /// A random even port whose successor is free too; the successor is
    /// held back (EVEN-PORT with the R bit) until `claim`ed or `release`d.
    EvenReserveNext,
    /// The port held back earlier by `EvenReserveNext` (RESERVATION-TOKEN).
    Reserved(u16),
    /// The socket on this port that the previous process handed over with
    /// the allocation (an upgrade in place: see [`Server::adopt`]).
    Carried(u16),
}

/// Relay sockets, as the I/O layer provides them.
pub trait RelayPorts {
    /// Opens a UDP socket on the relay address of `family` as `placement`
    /// says, and returns its local address. With `dont_fragment` (the
    /// Allocate carried DONT-FRAGMENT) every datagram the socket sends must
    /// leave with the DF bit set (RFC 8656 14), or the open fails with
    /// [`OpenError::DontFragmentUnsupported`].
    fn open(&mut self, id: RelayId, family: Family, placement: Placement, dont_fragment: bool) -> Result<SocketAddr, OpenError>;
    /// Closes the socket; no more packets for `id` will be accepted.
    fn close(&mut self, id: RelayId);
    /// Gives back a port held for a reservation that was never claimed.
    fn release(&mut self, family: Family, port: u16);
}

/// The current time, as two clocks: a monotonic one for lifetimes and the
/// wall clock (unix seconds) for credential and nonce expiry.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub mono: Instant,
    pub unix: u64,
}

impl Now {
    /// Reads the system clocks (for the I/O layer; the core never calls it).
    pub fn system() -> Self {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Now { mono: Instant::now(), unix }
    }
    pub fn advance(self, d: Duration) -> Self {
        Now { mono: self.mono + d, unix: self.unix + d.as_secs() }
    }
}

/// What to do with a packet received from a client: an answer written into
/// the caller's output buffer (`'o`), or relayed data, which lies in the
/// packet itself (`'p`).
#[derive(Debug, PartialEq, Eq)]
pub enum Output<'p, 'o> {
    /// Nothing to send (dropped, or an indication that needs no answer).
    None,
    /// Send these bytes back to the client on the same transport.
    Reply(&'o [u8]),
    /// Send `data` from relay socket `relay` to `peer`. `dont_fragment`: a
    /// Send indication with DONT-FRAGMENT, so this datagram must leave with
    /// the DF bit set even if the socket does not set it on all it sends
    /// (RFC 8656 11.3, 14).
    Relay { relay: RelayId, peer: SocketAddr, data: &'p [u8], dont_fragment: bool },
}

/// Things the core tells the I/O layer about, for logs, metrics and
/// (later) an in-kernel fast path that needs to know channel bindings.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    AllocationCreated {
        tuple: FiveTuple,
        username: String,
        relayed: Vec<SocketAddr>,
        lifetime: u32,
    },
    AllocationEnded {
        tuple: FiveTuple,
        username: String,
        reason: EndReason,
        duration: Duration,
        bytes_to_peer: u64,
        bytes_from_peer: u64,
        /// Each leg's loss, jitter and round trip, as far as known.
        health: health::Summary,
    },
    /// A channel was bound or its binding refreshed. Every binding is later
    /// matched by one `ChannelUnbound`, so a fast path that mirrors the
    /// bindings (e.g. in the kernel) can add and remove entries exactly.
    ChannelBound {
        relay: RelayId,
        tuple: FiveTuple,
        channel: u16,
        peer: SocketAddr,
        /// Until when the channel relays, unless refreshed: the earliest of
        /// its binding, its peer's permission and the allocation's expiry.
        /// A fast path stops relaying on its own at that instant.
        until: Instant,
        /// The allocation's own bandwidth cap, in bytes per second in each
        /// direction (0: none; a check allocation's is lower): a fast path
        /// holds the channel's packets to it, charging what they take on the
        /// wire as the core does, and reports what it relayed and dropped
        /// through [`Server::credit_fast_path`]. The relay's total cap
        /// (`ServerConfig::total_bytes_per_second`) is the fast path's to
        /// take from the configuration.
        cap: u64,
    },
    /// What a fast path must know of a bound channel changed without a
    /// ChannelBind: a Refresh or CreatePermission moved `until`, or a
    /// reconfiguration may have changed `cap`. Not matched by a
    /// `ChannelUnbound` of its own (the binding's one ends it).
    ChannelRefreshed {
        relay: RelayId,
        tuple: FiveTuple,
        channel: u16,
        peer: SocketAddr,
        until: Instant,
        cap: u64,
    },
    /// A channel binding expired or its allocation ended.
    ChannelUnbound {
        relay: RelayId,
        tuple: FiveTuple,
        channel: u16,
        peer: SocketAddr,
    },
    /// A request refused by the peer policy (403).
    PeerRefused { tuple: FiveTuple, peer: IpAddr },
    /// An allocation first went over its bandwidth cap (reported once per
    /// allocation; what is dropped after is only counted).
    OverBandwidth { tuple: FiveTuple, username: String },
    /// A deadline earlier than any before was filed: an I/O layer sleeping
    /// until the old [`Server::poll_timeout`] must read it again and wake
    /// sooner. Reported once however many were filed, and never dropped.
    DeadlineMoved,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    Expired,
    Deleted,
    ConnectionClosed,
    Disconnected,
}

impl EndReason {
    pub const ALL: [EndReason; 4] = [EndReason::Expired, EndReason::Deleted, EndReason::ConnectionClosed, EndReason::Disconnected];
}

impl EndReason {
    pub fn label(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Deleted => "deleted",
            EndReason::ConnectionClosed => "connection_closed",
            EndReason::Disconnected => "disconnected",
        }
    }
}

/// Packets and bytes relayed in one direction.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Flow {
    pub packets: u64,
    pub bytes: u64,
}

/// What a fast path relayed and dropped for one relayed address (see
/// [`Server::credit_fast_path`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathCounts {
    pub to_peer: Flow,
    pub from_peer: Flow,
    /// Packets dropped over the allocation's cap and over the relay's total.
    pub dropped_allocation_bandwidth: u64,
    pub dropped_total_bandwidth: u64,
}

/// Counters the core keeps; the metrics layer reads them at scrape time, so
/// they are live. Indexed arrays instead of maps keep the hot path to an add.
#[derive(Clone, Default, Debug)]
pub struct Stats {
    pub allocations_created: u64,
    /// Of those, made with check credentials.
    pub check_allocations_created: u64,
    /// Ended allocations by [`EndReason`] (`reason as usize`).
    pub allocations_ended: [u64; 4],
    /// Each leg's loss, jitter and round trip, filed when an allocation ends.
    pub legs: health::LegHistograms,
    /// Client to peer, by transport (`transport as usize`).
    pub to_peer: [Flow; 3],
    /// Peer to client, by transport.
    pub from_peer: [Flow; 3],
    /// Of those, what a fast path (the XDP program) relayed: to peers, to clients.
    pub fast_path: [Flow; 2],
    pub dropped_malformed: u64,
    pub dropped_no_allocation: u64,
    pub dropped_no_permission: u64,
    pub dropped_no_channel: u64,
    /// Indications with a comprehension-required attribute the method does not know (RFC 8489 6.3.1).
    pub dropped_unknown_attribute: u64,
    /// Unsigned UDP answers not sent: over the per-source rate (`limits.unauth_rate`).
    pub dropped_rate_limited: u64,
    /// Unsigned UDP answers not sent: larger than AMPLIFICATION_FACTOR times the request.
    pub dropped_amplification: u64,
    /// Relayed packets dropped over an allocation's bandwidth cap (`limits.allocation_bandwidth`).
    pub dropped_allocation_bandwidth: u64,
    /// Relayed packets dropped over the relay's bandwidth cap (`limits.total_bandwidth`).
    pub dropped_total_bandwidth: u64,
    pub peer_refusals: u64,
    pub quota_refusals: u64,
    pub capacity_refusals: u64,
    /// Allocates sent to a sibling relay while draining (300 Try Alternate).
    pub redirected: u64,
    /// Authentication failures by [`crate::auth::AuthFailure`] (`failure as usize`).
    pub auth_failures: [u64; 7],
    /// Responses sent, by (method, code); code 200 for success.
    pub responses: std::collections::BTreeMap<(u16, u16), u64>,
}

impl Stats {
    pub fn total_ended(&self) -> u64 {
        self.allocations_ended.iter().sum()
    }

    /// Adds another core's counters to these (the sum over a relay's cores).
    pub fn add(&mut self, o: &Stats) {
        fn add_all<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        self.allocations_created += o.allocations_created;
        self.check_allocations_created += o.check_allocations_created;
        add_all(&mut self.allocations_ended, &o.allocations_ended);
        self.legs.add(&o.legs);
        for (a, b) in self.to_peer.iter_mut().chain(self.from_peer.iter_mut()).chain(self.fast_path.iter_mut()).zip(o.to_peer.iter().chain(&o.from_peer).chain(&o.fast_path)) {
            a.packets += b.packets;
            a.bytes += b.bytes;
        }
        self.dropped_malformed += o.dropped_malformed;
        self.dropped_no_allocation += o.dropped_no_allocation;
        self.dropped_no_permission += o.dropped_no_permission;
        self.dropped_no_channel += o.dropped_no_channel;
        self.dropped_unknown_attribute += o.dropped_unknown_attribute;
        self.dropped_rate_limited += o.dropped_rate_limited;
        self.dropped_amplification += o.dropped_amplification;
        self.dropped_allocation_bandwidth += o.dropped_allocation_bandwidth;
        self.dropped_total_bandwidth += o.dropped_total_bandwidth;
        self.peer_refusals += o.peer_refusals;
        self.quota_refusals += o.quota_refusals;
        self.capacity_refusals += o.capacity_refusals;
        self.redirected += o.redirected;
        add_all(&mut self.auth_failures, &o.auth_failures);
        for (k, n) in &o.responses {
            *self.responses.entry(*k).or_insert(0) += n;
        }
    }
}
