//! The XDP fast path (cargo feature `xdp`, config `[xdp]`).
//!
//! bpf/relay.bpf.c, compiled by build.rs and embedded here, relays the
//! ChannelData of UDP clients over IPv4 and IPv6 in the kernel, both ways, for the
//! channels turnd mirrors into its maps; everything else passes to the
//! sockets unchanged. [`FastPath`] is the loaded program (one per process,
//! attached to every interface `xdp.interfaces` names, its maps shared by
//! the shards); [`Mirror`] is one shard's part: it turns the core's channel
//! events into map entries and the kernel's per-channel counters back into
//! the core's (sessions, metrics, the log line of an ended allocation).
//!
//! A client and its peer of different families (an IPv4 client relaying to
//! IPv6, as turnd does) are relayed too: each entry says its other side's
//! family, and the program writes that family's headers.
//!
//! What stays on the socket path: TCP/TLS clients, a channel to one
//! of the relay's own addresses, and per packet: anything after the entry's
//! `until` (the earliest of binding, permission and allocation expiry, on
//! CLOCK_MONOTONIC, the clock of `Instant`), padded ChannelData, datagrams
//! that would not fit the egress MTU with the 4-byte header, and packets
//! with no route or neighbour yet. Clients of a wildcard listener (0.0.0.0,
//! `::`) are keyed with a zero listener address; toward them the program
//! sends from the address its route lookup derives (BPF_FIB_LOOKUP_SRC,
//! Linux 6.7 and later; before, those datagrams take the socket path), as
//! the kernel does for turnd's wildcard socket.
//!
//! Bandwidth caps hold in the kernel as in the core: each allocation with a
//! cap (`limits.allocation_bandwidth`, a check allocation's) gets a token
//! bucket per direction in the `buckets` map, shared by its channels, and
//! the relay's total (`limits.total_bandwidth`) has one too; a packet over
//! either is dropped there and counted. What the kernel relayed is charged
//! to the core's buckets as well when it is credited, so the socket-path
//! packets of the same allocation get only what is left.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use aya::maps::{Array, HashMap as BpfHash, MapData, PerCpuArray};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, Pod};

use crate::turn::{FastPathCounts, FiveTuple, Flow, RelayId, Server, Transport};

/// The compiled program (build.rs), 8-aligned as the ELF parser wants.
#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);
static OBJECT: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/relay.bpf.o")));

/// Entries of each map, as bpf/relay.bpf.c sizes them.
const MAX_ENTRIES: u32 = 65_536;

// The map layouts of bpf/relay.bpf.c: addresses and ports in network order,
// an address of either family in 16 bytes (an IPv4 one in the first 4).

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Chan4Key {
    client_ip: u32,
    listen_ip: u32,
    client_port: u16,
    listen_port: u16,
    channel: u16,
    pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Chan6Key {
    client_ip: [u8; 16],
    listen_ip: [u8; 16],
    client_port: u16,
    listen_port: u16,
    channel: u16,
    pad: u16,
}

/// The value of `chan4` and `chan6`: where a client's ChannelData goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ToPeer {
    relay_ip: [u8; 16],
    peer_ip: [u8; 16],
    relay_port: u16,
    peer_port: u16,
    stat: u32,
    bucket: u32,
    peer_v6: u8,
    pad: [u8; 3],
    expires_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Peer4Key {
    relay_ip: u32,
    peer_ip: u32,
    relay_port: u16,
    peer_port: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Peer6Key {
    relay_ip: [u8; 16],
    peer_ip: [u8; 16],
    relay_port: u16,
    peer_port: u16,
}

/// The value of `peer4` and `peer6`: where a peer's datagrams go as ChannelData.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ToClient {
    client_ip: [u8; 16],
    listen_ip: [u8; 16],
    client_port: u16,
    listen_port: u16,
    channel: u16,
    client_v6: u8,
    pad: u8,
    stat: u32,
    bucket: u32,
    expires_ns: u64,
}

/// One channel's counters (per CPU in the kernel, summed here).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub from_peer_packets: u64,
    pub from_peer_bytes: u64,
    pub dropped_allocation: u64,
    pub dropped_total: u64,
}

/// A bandwidth cap's token buckets (to the peer, from the peer), in
/// byte-nanoseconds as `turn::bandwidth::Bucket`; `lock` is the kernel's
/// `bpf_spin_lock`, taken by a write with `BPF_F_LOCK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    lock: u32,
    pad: u32,
    rate: u64,
    level: [u64; 2],
    last: [u64; 2],
}

impl Bucket {
    /// Full, at `rate` bytes per second (0: no cap).
    fn full(rate: u64) -> Bucket {
        let level = rate.saturating_mul(1_000_000_000);
        Bucket { rate, level: [level; 2], ..Default::default() }
    }
}

/// The bucket index of a channel whose allocation has no cap of its own
/// (the program finds no entry there and checks the total only).
const NO_BUCKET: u32 = u32::MAX;
/// The relay's total cap's bucket.
const TOTAL_BUCKET: u32 = 0;
/// `BPF_F_LOCK`: an update that takes the value's spin lock.
const BPF_F_LOCK: u64 = 4;

// SAFETY: each is repr(C) of integers laid out without implicit padding
// (explicit `pad` fields), so every bit pattern is a valid value and the
// kernel reads and writes them as the C structs of bpf/relay.bpf.c.
unsafe impl Pod for Chan4Key {}
// SAFETY: as above.
unsafe impl Pod for Chan6Key {}
// SAFETY: as above.
unsafe impl Pod for ToPeer {}
// SAFETY: as above.
unsafe impl Pod for Peer4Key {}
// SAFETY: as above.
unsafe impl Pod for Peer6Key {}
// SAFETY: as above.
unsafe impl Pod for ToClient {}
// SAFETY: as above.
unsafe impl Pod for Stat {}
// SAFETY: as above (`lock` is the kernel's 4-byte bpf_spin_lock).
unsafe impl Pod for Bucket {}

/// How the program is attached (`xdp.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// In the driver: the fast one, where the driver supports it.
    Native,
    /// In the kernel's generic receive path: any interface, less gain.
    Generic,
}

fn ip4(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// CLOCK_MONOTONIC in nanoseconds, read with an `Instant` taken at the same
/// time, so an `Instant` converts to what `bpf_ktime_get_ns` compares with.
#[derive(Clone, Copy)]
struct Clock {
    at: Instant,
    ns: u64,
}

impl Clock {
    fn now() -> Clock {
        let at = Instant::now();
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec it is given, which lives on this stack.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Clock { at, ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64 }
    }

    fn ns(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.at) {
            Some(d) => self.ns.saturating_add(d.as_nanos() as u64),
            None => self.ns.saturating_sub(self.at.duration_since(t).as_nanos() as u64),
        }
    }
}

struct Maps {
    chan4: BpfHash<MapData, Chan4Key, ToPeer>,
    chan6: BpfHash<MapData, Chan6Key, ToPeer>,
    peer4: BpfHash<MapData, Peer4Key, ToClient>,
    peer6: BpfHash<MapData, Peer6Key, ToClient>,
    stats: PerCpuArray<MapData, Stat>,
    buckets: Array<MapData, Bucket>,
    /// The interfaces attached, by index: the program sends only there.
    egress: BpfHash<MapData, u32, u32>,
    /// Counter slots given back, and the next never used.
    free: Vec<u32>,
    next: u32,
    /// Bucket slots (from 1; 0 is the total) given back, and the next never used.
    free_buckets: Vec<u32>,
    next_bucket: u32,
    /// The total cap's rate as last written.
    total: u64,
}

/// The loaded program, attached to its interfaces until detached or dropped
/// (the links are the process's: they go when turnd exits, however it exits).
pub struct FastPath {
    maps: Mutex<Maps>,
    clock: Clock,
    pub interfaces: Vec<String>,
    mode: Mode,
    /// The program, and its links to the interfaces it is attached to.
    prog: Mutex<(Ebpf, Vec<(String, XdpLinkId)>)>,
}

impl FastPath {
    /// Loads the program and its maps, for `interfaces` in `mode` (see
    /// [`FastPath::attach`]). An error says why in a sentence for the log
    /// (no privileges, a kernel that refuses it).
    pub fn load(interfaces: &[String], mode: Mode) -> Result<Arc<FastPath>, String> {
        let mut ebpf = Ebpf::load(&OBJECT.0).map_err(|e| format!("cannot load the XDP program: {e} (turnd needs root or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)"))?;
        let prog: &mut Xdp = ebpf
            .program_mut("xdp_relay")
            .ok_or("the XDP object has no xdp_relay program")?
            .try_into()
            .map_err(|e| format!("xdp_relay is not an XDP program: {e}"))?;
        prog.load().map_err(|e| format!("the kernel refused the XDP program (turnd needs root or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN): {e}"))?;
        let chan4 = BpfHash::try_from(ebpf.take_map("chan4").ok_or("no chan4 map")?).map_err(|e| e.to_string())?;
        let peer4 = BpfHash::try_from(ebpf.take_map("peer4").ok_or("no peer4 map")?).map_err(|e| e.to_string())?;
        let chan6 = BpfHash::try_from(ebpf.take_map("chan6").ok_or("no chan6 map")?).map_err(|e| e.to_string())?;
        let peer6 = BpfHash::try_from(ebpf.take_map("peer6").ok_or("no peer6 map")?).map_err(|e| e.to_string())?;
        let stats = PerCpuArray::try_from(ebpf.take_map("stats").ok_or("no stats map")?).map_err(|e| e.to_string())?;
        let buckets = Array::try_from(ebpf.take_map("buckets").ok_or("no buckets map")?).map_err(|e| e.to_string())?;
        let egress = BpfHash::try_from(ebpf.take_map("egress").ok_or("no egress map")?).map_err(|e| e.to_string())?;
        Ok(Arc::new(FastPath {
            maps: Mutex::new(Maps { chan4, peer4, chan6, peer6, stats, buckets, egress, free: Vec::new(), next: 0, free_buckets: Vec::new(), next_bucket: 1, total: 0 }),
            clock: Clock::now(),
            interfaces: interfaces.to_vec(),
            mode,
            prog: Mutex::new((ebpf, Vec::new())),
        }))
    }

    /// Attaches the program to every interface it is not attached to yet.
    /// An error names the first that refused (no such interface, no XDP in
    /// this mode, another program there: the previous process's, during an
    /// upgrade); those attached before it stay.
    pub fn attach(&self) -> Result<(), String> {
        let mut guard = self.prog.lock().unwrap_or_else(|e| e.into_inner());
        let (ebpf, links) = &mut *guard;
        let prog: &mut Xdp = ebpf.program_mut("xdp_relay").ok_or("the XDP object has no xdp_relay program")?.try_into().map_err(|e| format!("xdp_relay is not an XDP program: {e}"))?;
        let flags = match self.mode {
            Mode::Native => XdpMode::Driver,
            Mode::Generic => XdpMode::Skb,
        };
        for i in &self.interfaces {
            if links.iter().any(|(name, _)| name == i) {
                continue;
            }
            let id = prog.attach(i, flags).map_err(|e| format!("cannot attach the XDP program to {i} ({:?} mode): {e}", self.mode))?;
            links.push((i.clone(), id));
            let index = std::ffi::CString::new(i.as_str()).map(|c| {
                // SAFETY: if_nametoindex reads the NUL-terminated name it is given, which lives until the call returns.
                unsafe { libc::if_nametoindex(c.as_ptr()) }
            });
            match index {
                Ok(index) if index != 0 => self.maps().egress.insert(index, 1, 0).map_err(|e| format!("cannot note {i} as an egress of the XDP program: {e}"))?,
                _ => return Err(format!("{i}: no such interface")),
            }
        }
        Ok(())
    }

    /// Detaches the program from every interface: packets reach the sockets
    /// again (this process's, or after an upgrade the new process's, which
    /// attaches its own program then).
    pub fn detach(&self) {
        let mut guard = self.prog.lock().unwrap_or_else(|e| e.into_inner());
        let (ebpf, links) = &mut *guard;
        let Some(prog) = ebpf.program_mut("xdp_relay").and_then(|p| <&mut Xdp>::try_from(p).ok()) else { return };
        for (i, id) in links.drain(..) {
            if let Err(e) = prog.detach(id) {
                tracing::warn!(interface = %i, error = %e, "XDP: cannot detach the program");
            }
        }
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the relay's total bandwidth, in bytes per second in each
    /// direction (0: none), to `rate` in the kernel too (at start and on
    /// every reload; a bucket refills when its rate changes).
    pub fn set_total(&self, rate: u64) {
        let mut m = self.maps();
        if m.total != rate {
            match m.buckets.set(TOTAL_BUCKET, Bucket::full(rate), BPF_F_LOCK) {
                Ok(()) => m.total = rate,
                Err(e) => tracing::warn!(error = %e, "XDP: cannot set the total bandwidth cap in the kernel"),
            }
        }
    }
}

impl Maps {
    fn insert(&mut self, keys: &Keys, stat: u32, bucket: u32, expires_ns: u64) -> Result<(), aya::maps::MapError> {
        let to_peer = ToPeer { stat, bucket, expires_ns, ..keys.to_peer };
        let to_client = ToClient { stat, bucket, expires_ns, ..keys.to_client };
        match keys.chan {
            ChanKey::V4(k) => self.chan4.insert(k, to_peer, 0)?,
            ChanKey::V6(k) => self.chan6.insert(k, to_peer, 0)?,
        }
        match keys.peer {
            PeerKey::V4(k) => self.peer4.insert(k, to_client, 0),
            PeerKey::V6(k) => self.peer6.insert(k, to_client, 0),
        }
    }

    fn remove(&mut self, keys: &Keys) {
        let _ = match keys.chan {
            ChanKey::V4(k) => self.chan4.remove(&k),
            ChanKey::V6(k) => self.chan6.remove(&k),
        };
        let _ = match keys.peer {
            PeerKey::V4(k) => self.peer4.remove(&k),
            PeerKey::V6(k) => self.peer6.remove(&k),
        };
    }

    fn read(&self, slot: u32) -> Stat {
        let Ok(per_cpu) = self.stats.get(&slot, 0) else { return Stat::default() };
        per_cpu.iter().fold(Stat::default(), |a, s| Stat {
            to_peer_packets: a.to_peer_packets + s.to_peer_packets,
            to_peer_bytes: a.to_peer_bytes + s.to_peer_bytes,
            from_peer_packets: a.from_peer_packets + s.from_peer_packets,
            from_peer_bytes: a.from_peer_bytes + s.from_peer_bytes,
            dropped_allocation: a.dropped_allocation + s.dropped_allocation,
            dropped_total: a.dropped_total + s.dropped_total,
        })
    }

    /// A bucket slot for an allocation's cap, full at `rate`; `None` when
    /// every slot is taken.
    fn bucket(&mut self, rate: u64) -> Option<u32> {
        let slot = match self.free_buckets.pop() {
            Some(s) => s,
            None if self.next_bucket <= MAX_ENTRIES => {
                self.next_bucket += 1;
                self.next_bucket - 1
            }
            None => return None,
        };
        if let Err(e) = self.buckets.set(slot, Bucket::full(rate), BPF_F_LOCK) {
            tracing::warn!(error = %e, "XDP: cannot set an allocation's bandwidth cap in the kernel");
            self.free_buckets.push(slot);
            return None;
        }
        Some(slot)
    }

    fn slot(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        (self.next < MAX_ENTRIES).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

/// A channel's keys (its client's, by the listener it sends to; its peer's,
/// by the relayed address), each of its own family, and the addresses and
/// ports of its map values.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Keys {
    chan: ChanKey,
    peer: PeerKey,
    to_peer: ToPeer,
    to_client: ToClient,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChanKey {
    V4(Chan4Key),
    V6(Chan6Key),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PeerKey {
    V4(Peer4Key),
    V6(Peer6Key),
}

/// An address in 16 bytes, an IPv4 one in the first 4; whether it is IPv6.
fn wide(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(a) => {
            let mut w = [0; 16];
            w[..4].copy_from_slice(&a.octets());
            (w, 0)
        }
        IpAddr::V6(a) => (a.octets(), 1),
    }
}

impl Keys {
    /// The keys of a channel, when it may take the fast path: a UDP client,
    /// the listener and the client of one family, the relayed address and
    /// the peer of one family (the same or the other), no relayed address a
    /// wildcard, and no hairpin.
    fn of(b: &Binding) -> Option<Keys> {
        let relayed = b.relayed?;
        let (client, listen, peer) = (b.tuple.client, b.tuple.server, b.peer);
        if b.tuple.transport != Transport::Udp || relayed.ip().is_unspecified() {
            return None;
        }
        // Another allocation of this relay, or the listener: the kernel would
        // hand the datagram to itself; leave such hairpins to the sockets.
        if peer.ip() == relayed.ip() || peer.ip() == listen.ip() {
            return None;
        }
        let port = |a: SocketAddr| a.port().to_be();
        let channel = b.channel.to_be();
        let chan = match (client.ip(), listen.ip()) {
            (IpAddr::V4(c), IpAddr::V4(l)) => ChanKey::V4(Chan4Key { client_ip: ip4(c), listen_ip: ip4(l), client_port: port(client), listen_port: port(listen), channel, pad: 0 }),
            (IpAddr::V6(c), IpAddr::V6(l)) => ChanKey::V6(Chan6Key { client_ip: c.octets(), listen_ip: l.octets(), client_port: port(client), listen_port: port(listen), channel, pad: 0 }),
            _ => return None,
        };
        let peer_key = match (relayed.ip(), peer.ip()) {
            (IpAddr::V4(r), IpAddr::V4(p)) => PeerKey::V4(Peer4Key { relay_ip: ip4(r), peer_ip: ip4(p), relay_port: port(relayed), peer_port: port(peer) }),
            (IpAddr::V6(r), IpAddr::V6(p)) => PeerKey::V6(Peer6Key { relay_ip: r.octets(), peer_ip: p.octets(), relay_port: port(relayed), peer_port: port(peer) }),
            _ => return None,
        };
        let ((relay_ip, peer_v6), (peer_ip, _)) = (wide(relayed.ip()), wide(peer.ip()));
        let ((client_ip, client_v6), (listen_ip, _)) = (wide(client.ip()), wide(listen.ip()));
        Some(Keys {
            chan,
            peer: peer_key,
            to_peer: ToPeer { relay_ip, peer_ip, relay_port: port(relayed), peer_port: port(peer), peer_v6, ..Default::default() },
            to_client: ToClient { client_ip, listen_ip, client_port: port(client), listen_port: port(listen), channel, client_v6, ..Default::default() },
        })
    }
}

/// One mirrored channel.
struct Entry {
    keys: Keys,
    /// Its counter slot, and what was read of it last (counters are never
    /// reset: a reused slot starts from what its last owner left).
    stat: u32,
    last: Stat,
    /// Its allocation, and whether it holds a share of the allocation's cap.
    tuple: FiveTuple,
    capped: bool,
}

/// An allocation's bandwidth cap in the kernel: one bucket, shared by its
/// mirrored channels.
struct Cap {
    slot: u32,
    rate: u64,
    channels: u32,
}

/// A shard's channels in the kernel's maps.
pub struct Mirror {
    fast: Arc<FastPath>,
    entries: HashMap<(RelayId, u16), Entry>,
    caps: HashMap<FiveTuple, Cap>,
}

/// What a channel event says, as the mirror needs it.
pub struct Binding {
    pub relay: RelayId,
    pub tuple: FiveTuple,
    pub channel: u16,
    pub peer: SocketAddr,
    pub until: Instant,
    /// The allocation's own cap, bytes per second each way (0: none).
    pub cap: u64,
    /// The relayed address's socket, as bound.
    pub relayed: Option<SocketAddr>,
}

impl Mirror {
    pub fn new(fast: Arc<FastPath>) -> Mirror {
        Mirror { fast, entries: HashMap::new(), caps: HashMap::new() }
    }

    /// The relay's total cap (see [`FastPath::set_total`]).
    pub fn set_total(&self, rate: u64) {
        self.fast.set_total(rate);
    }

    /// A channel bound or refreshed: adds or updates its entries, or removes
    /// them when it may not take the fast path (any more).
    pub fn bound(&mut self, b: &Binding, server: &mut Server, now: Instant) {
        let key = (b.relay, b.channel);
        let Some(keys) = Keys::of(b) else {
            self.unbound(b.relay, b.channel, server, now);
            return;
        };
        // The same channel number to another peer (bound again after its
        // cooldown): the old entries go first.
        if self.entries.get(&key).is_some_and(|e| e.keys != keys) {
            self.unbound(b.relay, b.channel, server, now);
        }
        let fast = self.fast.clone();
        let mut m = fast.maps();
        if let std::collections::hash_map::Entry::Vacant(v) = self.entries.entry(key) {
            let Some(stat) = m.slot() else { return };
            let last = m.read(stat);
            v.insert(Entry { keys, stat, last, tuple: b.tuple, capped: false });
        }
        let Some(bucket) = self.hold_cap(&mut m, key, b.cap) else {
            drop(m);
            self.unbound(b.relay, b.channel, server, now);
            return;
        };
        let stat = self.entries[&key].stat;
        if let Err(e) = m.insert(&keys, stat, bucket, fast.clock.ns(b.until)) {
            tracing::warn!(error = %e, channel = b.channel, client = %b.tuple.client, "XDP: cannot add a channel to the fast path; it stays on the socket path");
            drop(m);
            self.unbound(b.relay, b.channel, server, now);
        }
    }

    /// The bucket the channel `key` is to be held to at `rate` (0: none,
    /// [`NO_BUCKET`]): its allocation's, made on its first capped channel and
    /// refilled at a new rate when a reload changes it. `None` when no slot
    /// is left (the channel stays on the socket path).
    fn hold_cap(&mut self, m: &mut Maps, key: (RelayId, u16), rate: u64) -> Option<u32> {
        let e = self.entries.get_mut(&key)?;
        if rate == 0 {
            if std::mem::take(&mut e.capped) {
                release(&mut self.caps, m, e.tuple);
            }
            return Some(NO_BUCKET);
        }
        let cap = match self.caps.entry(e.tuple) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Cap { slot: m.bucket(rate)?, rate, channels: 0 }),
        };
        if cap.rate != rate {
            match m.buckets.set(cap.slot, Bucket::full(rate), BPF_F_LOCK) {
                Ok(()) => cap.rate = rate,
                Err(err) => tracing::warn!(error = %err, "XDP: cannot change an allocation's bandwidth cap in the kernel"),
            }
        }
        if !std::mem::replace(&mut e.capped, true) {
            cap.channels += 1;
        }
        Some(cap.slot)
    }

    /// A channel unbound (expired, its allocation ended): its entries go,
    /// and what the kernel relayed since the last sync is credited. Returns
    /// the bytes (to peer, from peer) of that which the allocation, already
    /// gone, could not take: its "allocation ended" line follows.
    pub fn unbound(&mut self, relay: RelayId, channel: u16, server: &mut Server, now: Instant) -> (u64, u64) {
        let Some(e) = self.entries.remove(&(relay, channel)) else { return (0, 0) };
        let mut m = self.fast.maps();
        m.remove(&e.keys);
        if e.capped {
            release(&mut self.caps, &mut m, e.tuple);
        }
        let counts = m.read(e.stat);
        m.free.push(e.stat);
        drop(m);
        credit(server, relay, &e.last, &counts, now)
    }

    /// Credits the core with what the kernel relayed since the last sync.
    pub fn sync(&mut self, server: &mut Server, now: Instant) {
        if self.entries.is_empty() {
            return;
        }
        let m = self.fast.maps();
        for ((relay, _), e) in self.entries.iter_mut() {
            let counts = m.read(e.stat);
            credit(server, *relay, &e.last, &counts, now);
            e.last = counts;
        }
    }
}

/// One channel of the allocation of `tuple` no longer holds its cap; the
/// last one gives the bucket slot back.
fn release(caps: &mut HashMap<FiveTuple, Cap>, m: &mut Maps, tuple: FiveTuple) {
    if let Some(c) = caps.get_mut(&tuple) {
        c.channels -= 1;
        if c.channels == 0 {
            m.free_buckets.push(c.slot);
            caps.remove(&tuple);
        }
    }
}

/// Credits the core with the counts between `last` and `counts`; returns the
/// bytes an allocation already gone could not take (see [`Mirror::unbound`]).
fn credit(server: &mut Server, relay: RelayId, last: &Stat, counts: &Stat, now: Instant) -> (u64, u64) {
    let n = FastPathCounts {
        to_peer: Flow { packets: counts.to_peer_packets.wrapping_sub(last.to_peer_packets), bytes: counts.to_peer_bytes.wrapping_sub(last.to_peer_bytes) },
        from_peer: Flow { packets: counts.from_peer_packets.wrapping_sub(last.from_peer_packets), bytes: counts.from_peer_bytes.wrapping_sub(last.from_peer_bytes) },
        dropped_allocation_bandwidth: counts.dropped_allocation.wrapping_sub(last.dropped_allocation),
        dropped_total_bandwidth: counts.dropped_total.wrapping_sub(last.dropped_total),
    };
    if n != FastPathCounts::default() && !server.credit_fast_path(relay, Transport::Udp, n, now) {
        return (n.to_peer.bytes, n.from_peer.bytes);
    }
    (0, 0)
}

/// The forwarding sysctls of `iface` that are off (`net.ipv4.conf.IFACE.forwarding`,
/// `net.ipv6.conf.IFACE.forwarding`), or that cannot be read (under systemd's
/// `ProcSubset=pid`): the program's route lookup answers only on an interface
/// that forwards, so every packet of that family arriving there takes the
/// socket path. Each with what is wrong: "is 0" or "cannot be read".
pub fn forwarding_off(iface: &str) -> Vec<(String, &'static str)> {
    ["ipv4", "ipv6"]
        .into_iter()
        .map(|f| format!("net.{f}.conf.{iface}.forwarding"))
        .filter_map(|k| match std::fs::read_to_string(format!("/proc/sys/{}", k.replace('.', "/"))) {
            Ok(s) if s.trim() == "0" => Some((k, "is 0")),
            Ok(_) => None,
            Err(_) => Some((k, "cannot be read")),
        })
        .collect()
}
