//! The I/O layer: sockets around the sans-IO core.
//!
//! One thread runs a tokio current-thread runtime. A [`Shard`] owns the core
//! [`Server`], the client-facing sockets and the relay sockets; tasks for each
//! socket wait for readiness, then borrow the shard and drain what is queued
//! with recvmmsg. Datagrams to UDP clients are written straight into a
//! per-listener send batch and leave with one sendmmsg when the tasks woken
//! together have run. Nothing is awaited while the shard is borrowed, and
//! packets live in buffers allocated once: no allocation per packet.

mod admin;
pub mod batch;
mod http;
mod lifecycle;
pub mod passthrough;
pub mod preflight;
mod peek;
pub mod proxy;
pub mod relay;
mod request;
pub mod sni;
mod stream;
mod systemd;
pub mod tls;
mod udp;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::auth::{Authenticator, NonceKey};
use crate::config::Config;
use crate::turn::{Event, FiveTuple, Now, Output, RelayId, Server, Transport};
use batch::{PeerSends, RecvBatch, SendBatch};
use relay::RelaySockets;
use stream::StreamOut;

pub use lifecycle::{run, Reload, SetLog};

/// Largest message on a TCP/TLS stream (a STUN message or padded ChannelData).
pub const MAX_DATAGRAM: usize = 65_535;
/// Room for the Data indication header added around peer data.
const OUT_HEADROOM: usize = 64;

/// A non-blocking UDP socket registered with the runtime.
pub type Udp = AsyncFd<std::net::UdpSocket>;

/// A UDP listener and the datagrams queued for its clients.
pub struct UdpListener {
    pub socket: Rc<Udp>,
    out: SendBatch,
    /// Removed by a reload: serves only the allocations made through it,
    /// and closes when they have ended.
    retiring: bool,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for UdpListener {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub struct Shard {
    pub server: Server,
    pub relays: RelaySockets,
    /// UDP listeners by `conn`; `None` once removed by a reload.
    udp: Vec<Option<UdpListener>>,
    /// Wakes the task that flushes the listeners' send batches.
    flush: Rc<Notify>,
    /// TCP/TLS connections by the `conn` of their 5-tuple.
    streams: Vec<Option<Rc<StreamOut>>>,
    free_streams: Vec<u32>,
    stream_count: usize,
    /// Accepted connections still reading their PROXY header.
    pending_proxy: usize,
    /// TLS connections passed through to the web server (`[tls.passthrough]`):
    /// each holds two descriptors and counts as a connection.
    passed_through: usize,
    per_ip: HashMap<IpAddr, u32>,
    connections: [u64; 3],
    limits: StreamLimits,
    /// SNI routing on TLS listeners (`[tls.passthrough]`), replaced on reload.
    passthrough: Option<Rc<crate::config::Passthrough>>,
    nonce_key: NonceKey,
    started: std::time::Instant,
    draining: bool,
    pub tls_handshake_failures: u64,
    pub connections_refused: u64,
    /// "udp 0.0.0.0:3478" and so on, for status.
    listener_names: Vec<String>,
    admin_token: Option<String>,
    /// Asks the main loop to reload; it answers on the oneshot.
    reload_tx: ReloadSender,
    warnings: WarnLimiter,
    /// Receive buffers shared by the UDP tasks (one runs at a time).
    rx_batch: Rc<RefCell<RecvBatch>>,
    tx: Box<[u8]>,
    /// Client datagrams of the batch being handled, on their way to peers.
    to_peers: PeerSends,
    pub send_failures: u64,
    /// Wakes the timer task when the core filed an earlier deadline.
    timer: Rc<Notify>,
    /// Media dropped toward TCP/TLS clients for being too old.
    stale: Rc<stream::StaleDrops>,
    this: Weak<RefCell<Shard>>,
}

/// How the admin API asks the main loop to reload; it answers on the oneshot.
pub(crate) type ReloadSender = tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<Result<String, String>>>;

impl Shard {
    /// A datagram from a client on UDP listener `conn`.
    fn on_client(&mut self, conn: u32, local: SocketAddr, from: SocketAddr, pkt: &[u8], now: Now) {
        let tuple = FiveTuple { client: from, server: local, transport: Transport::Udp, conn };
        let Shard { server, relays, udp, send_failures, flush, to_peers, .. } = self;
        let Some(Some(l)) = udp.get_mut(conn as usize) else { return };
        if l.retiring && !server.has_allocation(&tuple) {
            server.stats.dropped_no_allocation += 1;
            return;
        }
        if l.out.is_full() {
            let (_, dropped) = l.out.flush(l.socket.get_ref().as_raw_fd());
            *send_failures += dropped as u64;
        }
        match server.handle_client(tuple, pkt, now, l.out.slot(), relays) {
            Output::None => {}
            Output::Reply(b) => {
                let n = b.len();
                if l.out.is_empty() {
                    flush.notify_one();
                }
                l.out.commit(n, from);
            }
            Output::Relay { relay, peer, data, dont_fragment: true } => {
                // DF asked for this datagram alone: after what is queued, on its own.
                let (_, dropped) = to_peers.flush(|id| relays.fd(id));
                *send_failures += dropped as u64 + !relays.send(relay, peer, data, true) as u64;
            }
            Output::Relay { relay, peer, data, .. } => {
                if to_peers.is_full() {
                    let (_, dropped) = to_peers.flush(|id| relays.fd(id));
                    *send_failures += dropped as u64;
                }
                // SAFETY: `data` lies in `pkt`, in the receive batch that
                // recv_loop holds borrowed until it has called flush_to_peers
                // (and it clears the queue before receiving again).
                unsafe { to_peers.push(relay, peer, data) };
            }
        }
        if server.has_events() || !relays.opened.is_empty() {
            self.after_control();
        }
    }

    /// A datagram from a peer on relay socket `id`.
    #[inline]
    fn on_peer(&mut self, id: RelayId, from: SocketAddr, data: &[u8], now: std::time::Instant) {
        let Shard { server, udp, streams, tx, send_failures, flush, .. } = self;
        // Where the answer goes decides where the core writes it: straight into
        // the listener's send batch for UDP clients.
        let Some(tuple) = server.client_of(id) else {
            server.stats.dropped_no_allocation += 1;
            return;
        };
        match tuple.transport {
            Transport::Udp => {
                let Some(Some(l)) = udp.get_mut(tuple.conn as usize) else {
                    *send_failures += 1;
                    return;
                };
                if l.out.is_full() {
                    let (_, dropped) = l.out.flush(l.socket.get_ref().as_raw_fd());
                    *send_failures += dropped as u64;
                }
                if let Some((_, bytes)) = server.handle_peer(id, from, data, now, l.out.slot()) {
                    let n = bytes.len();
                    if l.out.is_empty() {
                        flush.notify_one();
                    }
                    l.out.commit(n, tuple.client);
                }
            }
            Transport::Tcp | Transport::Tls => {
                if let Some((_, bytes)) = server.handle_peer(id, from, data, now, tx) {
                    match streams.get(tuple.conn as usize) {
                        Some(Some(out)) if out.push(bytes, true, now) => {}
                        _ => *send_failures += 1,
                    }
                }
            }
        }
    }

    /// Sends the client datagrams of the batch just handled to their peers.
    fn flush_to_peers(&mut self) {
        if !self.to_peers.is_empty() {
            let Shard { relays, to_peers, .. } = self;
            let (_, dropped) = to_peers.flush(|id| relays.fd(id));
            self.send_failures += dropped as u64;
        }
    }

    /// Sends every queued datagram to UDP clients.
    fn flush_udp(&mut self) {
        for l in self.udp.iter_mut().flatten() {
            if !l.out.is_empty() {
                let (_, dropped) = l.out.flush(l.socket.get_ref().as_raw_fd());
                self.send_failures += dropped as u64;
            }
        }
    }

    /// One framed message from a TCP/TLS client. Relayed data joins
    /// `to_peers`, which stream::handle_frames flushes after the read.
    fn on_stream(&mut self, tuple: FiveTuple, msg: &[u8]) {
        let Shard { server, relays, streams, tx, send_failures, to_peers, .. } = self;
        match server.handle_client(tuple, msg, Now::system(), tx, relays) {
            Output::None => {}
            Output::Reply(b) => match streams.get(tuple.conn as usize) {
                Some(Some(out)) if out.push(b, false, std::time::Instant::now()) => {}
                _ => *send_failures += 1,
            },
            Output::Relay { relay, peer, data, dont_fragment: true } => {
                // DF asked for this datagram alone: after what is queued, on its own.
                let (_, dropped) = to_peers.flush(|id| relays.fd(id));
                *send_failures += dropped as u64 + !relays.send(relay, peer, data, true) as u64;
            }
            Output::Relay { relay, peer, data, .. } => {
                if to_peers.is_full() {
                    let (_, dropped) = to_peers.flush(|id| relays.fd(id));
                    *send_failures += dropped as u64;
                }
                // SAFETY: `data` lies in `msg`, in the read buffer that
                // stream::handle_frames holds borrowed until it has called
                // flush_to_peers (and it clears the queue before it starts).
                unsafe { to_peers.push(relay, peer, data) };
            }
        }
        self.after_control();
    }

    /// Tells the relay sockets how many descriptors connections hold.
    fn sync_stream_fds(&mut self) {
        self.relays.stream_fds = self.stream_count + self.pending_proxy + 2 * self.passed_through;
    }

    /// Registers a new connection if the limits allow; returns its conn id.
    fn stream_opened(&mut self, client: IpAddr, transport: Transport, out: Rc<StreamOut>) -> Option<u32> {
        let key = stream::per_ip_key(client, self.limits.ipv6_prefix);
        // 0 means unlimited, as for the quotas.
        let over_total = self.limits.max_total != 0 && self.stream_count + self.passed_through >= self.limits.max_total as usize;
        if over_total || self.ip_limit_reached(key) || !self.relays.fds_left_for_connection() {
            self.connections_refused += 1;
            return None;
        }
        out.ip_key.set(key);
        *self.per_ip.entry(key).or_insert(0) += 1;
        self.stream_count += 1;
        self.sync_stream_fds();
        self.connections[transport as usize] += 1;
        let conn = match self.free_streams.pop() {
            Some(c) => {
                self.streams[c as usize] = Some(out);
                c
            }
            None => {
                self.streams.push(Some(out));
                (self.streams.len() - 1) as u32
            }
        };
        Some(conn)
    }

    fn stream_closed(&mut self, tuple: FiveTuple) {
        if let Some(slot) = self.streams.get_mut(tuple.conn as usize)
            && let Some(out) = slot.take() {
                self.free_streams.push(tuple.conn);
                self.stream_count -= 1;
                self.sync_stream_fds();
                self.connections[tuple.transport as usize] -= 1;
                self.ip_uncount(out.ip_key.get());
            }
        let Shard { server, relays, .. } = self;
        server.connection_closed(&tuple, std::time::Instant::now(), relays);
        self.after_control();
    }

    /// Whether `key` ([`stream::per_ip_key`]) holds its share of connections.
    /// Whether `key` holds its share of connections (0 = unlimited).
    fn ip_limit_reached(&self, key: IpAddr) -> bool {
        self.limits.max_per_ip != 0 && self.per_ip.get(&key).copied().unwrap_or(0) >= self.limits.max_per_ip
    }

    fn ip_uncount(&mut self, key: IpAddr) {
        if let Some(c) = self.per_ip.get_mut(&key) {
            *c -= 1;
            if *c == 0 {
                self.per_ip.remove(&key);
            }
        }
    }

    /// Starts receive tasks for relay sockets the core just opened, and logs events.
    pub(crate) fn after_control(&mut self) {
        while let Some(id) = self.relays.opened.pop() {
            if let Some(e) = self.relays.get(id) {
                let task = tokio::task::spawn_local(relay_loop(self.this.clone(), id, e.socket.clone(), self.rx_batch.clone()));
                self.relays.set_task(id, task);
            }
        }
        while let Some(e) = self.server.poll_event() {
            log_event(&e, &mut self.warnings);
        }
        if self.server.take_timer_moved() {
            self.timer.notify_one();
        }
    }

    /// Everything a metrics scrape reports.
    pub fn snapshot(&self) -> crate::metrics::Snapshot {
        let mut by: HashMap<(Transport, &'static str), u64> = HashMap::new();
        for a in self.server.allocations() {
            let fam = match (a.v4.is_some(), a.v6.is_some()) {
                (true, true) => "dual",
                (false, true) => "ipv6",
                _ => "ipv4",
            };
            *by.entry((a.tuple.transport, fam)).or_insert(0) += 1;
        }
        crate::metrics::Snapshot {
            stats: self.server.stats.clone(),
            allocations: by.into_iter().collect(),
            connections: self.connections,
            tls_handshake_failures: self.tls_handshake_failures,
            connections_refused: self.connections_refused,
            send_failures: self.send_failures,
            stale_media: self.stale.messages.get(),
            relay_ports_in_use: self.relays.in_use() as u64,
            relay_ports_total: self.relays.port_range_size() as u64,
            uptime_seconds: self.started.elapsed().as_secs(),
            draining: self.draining,
        }
    }

    /// Why the relay cannot take new allocations, if it cannot.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.draining {
            Some("draining: shutting down")
        } else if self.relays.in_use() >= self.relays.port_range_size() {
            Some("no relay port free")
        } else if self.relays.out_of_fds() {
            Some("out of file descriptors: raise the open-files limit")
        } else {
            None
        }
    }

    /// Applies a reloaded configuration to the core. Existing allocations stay.
    fn apply(&mut self, cfg: &Config) {
        let auth = Authenticator::new(&cfg.realm, cfg.secrets.clone(), &cfg.static_users, self.nonce_key.clone());
        self.server.reconfigure(cfg.core.clone(), auth, peer_policy(cfg));
        self.relays.reconfigure(cfg.core.relay_v4.map(|r| r.local), cfg.core.relay_v6.map(|r| r.local), cfg.ports);
        self.limits = StreamLimits::from(cfg);
        self.passthrough = cfg.passthrough.clone().map(Rc::new);
    }

    /// Expires what the core has due, a bounded batch at a time; returns
    /// whether more is due.
    fn expire_due(&mut self) -> bool {
        let Shard { server, relays, .. } = self;
        let more = server.expire(std::time::Instant::now(), relays, EXPIRE_BATCH);
        self.after_control();
        more
    }

    /// Once a second: retired UDP listeners whose allocations have all ended close.
    fn housekeeping(&mut self) {
        for conn in 0..self.udp.len() as u32 {
            if self.udp[conn as usize].as_ref().is_some_and(|l| l.retiring) && self.udp_allocations(conn) == 0 {
                self.close_udp(conn);
            }
        }
    }

    /// The core's settings from `cfg`, a shard with no listener yet, and its
    /// flush and timer tasks.
    fn start(cfg: &Config, reload_tx: ReloadSender) -> Rc<RefCell<Shard>> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS random generator is available");
        let nonce_key = NonceKey::new(key, cfg.nonce_lifetime);
        let auth = Authenticator::new(&cfg.realm, cfg.secrets.clone(), &cfg.static_users, nonce_key.clone());
        let relays = RelaySockets::new(cfg.core.relay_v4.map(|r| r.local), cfg.core.relay_v6.map(|r| r.local), cfg.ports);
        let flush = Rc::new(Notify::new());
        let shard = Rc::new_cyclic(|this| {
            RefCell::new(Shard {
                server: Server::new(cfg.core.clone(), auth, peer_policy(cfg)),
                relays,
                udp: Vec::new(),
                streams: Vec::new(),
                free_streams: Vec::new(),
                stream_count: 0,
                pending_proxy: 0,
                passed_through: 0,
                per_ip: HashMap::new(),
                connections: [0; 3],
                limits: StreamLimits::from(cfg),
                passthrough: cfg.passthrough.clone().map(Rc::new),
                nonce_key,
                started: std::time::Instant::now(),
                draining: false,
                tls_handshake_failures: 0,
                connections_refused: 0,
                listener_names: Vec::new(),
                admin_token: cfg.admin_token.clone(),
                reload_tx,
                warnings: WarnLimiter::new(),
                rx_batch: Rc::new(RefCell::new(RecvBatch::new())),
                flush: flush.clone(),
                tx: vec![0u8; MAX_DATAGRAM + OUT_HEADROOM].into_boxed_slice(),
                to_peers: PeerSends::new(batch::gso_available()),
                send_failures: 0,
                timer: Rc::new(Notify::new()),
                stale: stream::StaleDrops::new(),
                this: this.clone(),
            })
        });
        tokio::task::spawn_local(flush_loop(Rc::downgrade(&shard), flush));
        let timer = shard.borrow().timer.clone();
        tokio::task::spawn_local(timer_loop(Rc::downgrade(&shard), timer));
        let house = Rc::downgrade(&shard);
        tokio::task::spawn_local(async move {
            let mut iv = tokio::time::interval(Duration::from_secs(1));
            loop {
                iv.tick().await;
                let Some(s) = house.upgrade() else { return };
                s.borrow_mut().housekeeping();
            }
        });
        shard
    }

    /// Serves a new UDP listener socket; returns its `conn`.
    fn add_udp(shard: &Rc<RefCell<Shard>>, s: Udp) -> u32 {
        let s = Rc::new(s);
        let mut sh = shard.borrow_mut();
        let out = SendBatch::for_socket(s.get_ref().as_raw_fd());
        let conn = sh.udp.len() as u32;
        let task = tokio::task::spawn_local(udp::listener_loop(Rc::downgrade(shard), conn, s.clone(), sh.rx_batch.clone()));
        sh.udp.push(Some(UdpListener { socket: s, out, retiring: false, task: Some(task) }));
        conn
    }

    /// Allocations made through UDP listener `conn`.
    fn udp_allocations(&self, conn: u32) -> usize {
        self.server.allocations().filter(|a| a.tuple.transport == Transport::Udp && a.tuple.conn == conn).count()
    }

    /// A reload removed UDP listener `conn`: it closes now if no allocation
    /// uses it, else it keeps serving those until they end.
    fn retire_udp(&mut self, conn: u32) {
        let n = self.udp_allocations(conn);
        let Some(Some(l)) = self.udp.get_mut(conn as usize) else { return };
        if n == 0 {
            self.close_udp(conn);
        } else {
            l.retiring = true;
            let addr = l.socket.get_ref().local_addr().ok();
            tracing::info!(listener = ?addr, allocations = n, "removed UDP listener keeps serving its allocations until they end");
        }
    }

    fn close_udp(&mut self, conn: u32) {
        if let Some(slot) = self.udp.get_mut(conn as usize)
            && let Some(l) = slot.take() {
                tracing::info!(listener = ?l.socket.get_ref().local_addr().ok(), "UDP listener closed");
            }
    }

    /// A retiring UDP listener bound to `addr`, if there is one.
    fn retiring_udp(&self, addr: SocketAddr) -> Option<u32> {
        self.udp.iter().position(|l| l.as_ref().is_some_and(|l| l.retiring && l.socket.get_ref().local_addr().ok() == Some(addr))).map(|i| i as u32)
    }

    /// A reload wants a retiring listener again: it serves everyone.
    fn revive_udp(&mut self, conn: u32) {
        if let Some(Some(l)) = self.udp.get_mut(conn as usize) {
            l.retiring = false;
        }
    }
}

/// Lets through at most `WARN_BURST` warnings about refused requests per
/// `WARN_WINDOW`, then counts the rest, so an attack cannot flood the log.
pub struct WarnLimiter {
    window_start: std::time::Instant,
    in_window: u32,
    suppressed: u64,
}

/// The configured peer policy, with the port rule extended to every address
/// of this host (read at start and on reload).
fn peer_policy(cfg: &Config) -> crate::turn::PeerPolicy {
    cfg.peer_policy().with_host_ips(host_addresses())
}

/// The host's interface addresses; empty if they cannot be read.
fn host_addresses() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(list) => list.into_iter().map(|i| i.ip()).collect(),
        Err(e) => {
            tracing::warn!("cannot list the host's addresses: {e}");
            Vec::new()
        }
    }
}

/// Deadlines handled before the timer task lets other tasks run.
const EXPIRE_BATCH: usize = 256;

const WARN_BURST: u32 = 10;
const WARN_WINDOW: Duration = Duration::from_secs(10);

impl WarnLimiter {
    fn new() -> Self {
        WarnLimiter { window_start: std::time::Instant::now(), in_window: 0, suppressed: 0 }
    }

    /// Whether to log this warning now.
    fn allow(&mut self) -> bool {
        let now = std::time::Instant::now();
        if now.duration_since(self.window_start) >= WARN_WINDOW {
            if self.suppressed > 0 {
                tracing::warn!(suppressed = self.suppressed, "more refused requests in the last interval were not logged");
            }
            *self = WarnLimiter { window_start: now, in_window: 0, suppressed: 0 };
        }
        if self.in_window < WARN_BURST {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

fn log_event(e: &Event, warnings: &mut WarnLimiter) {
    match e {
        Event::AllocationCreated { tuple, username, relayed, lifetime } => tracing::info!(
            user = %username, client = %tuple.client, transport = tuple.transport.label(),
            relayed = ?relayed, lifetime, "allocation created"
        ),
        Event::AllocationEnded { tuple, username, reason, duration, bytes_to_peer, bytes_from_peer } => tracing::info!(
            user = %username, client = %tuple.client, transport = tuple.transport.label(),
            reason = reason.label(), duration_s = duration.as_secs(), bytes_to_peer, bytes_from_peer,
            "allocation ended"
        ),
        Event::ChannelBound { tuple, channel, peer, .. } => {
            tracing::debug!(client = %tuple.client, channel, %peer, "channel bound")
        }
        Event::ChannelUnbound { tuple, channel, peer, .. } => {
            tracing::debug!(client = %tuple.client, channel, %peer, "channel unbound")
        }
        Event::PeerRefused { tuple, peer } => {
            if warnings.allow() {
                tracing::warn!(client = %tuple.client, %peer, "peer refused by policy (403)")
            }
        }
        Event::OverBandwidth { tuple, username } => {
            if warnings.allow() {
                tracing::warn!(
                    user = %username, client = %tuple.client, transport = tuple.transport.label(),
                    "allocation over limits.allocation_bandwidth: packets beyond it are dropped (a leaked credential?)"
                )
            }
        }
    }
}

/// Waits for datagrams on `socket`, receives them in batches and hands each
/// to `on` with the shard borrowed. Ends when the socket or the shard goes.
pub(super) async fn recv_loop<T: Copy>(
    shard: Weak<RefCell<Shard>>,
    socket: Rc<Udp>,
    rx: Rc<RefCell<RecvBatch>>,
    now: impl Fn() -> T,
    on: impl Fn(&mut Shard, SocketAddr, &[u8], T),
) {
    let fd = socket.get_ref().as_raw_fd();
    loop {
        let Ok(mut guard) = socket.readable().await else { return };
        let full = {
            let Some(shard) = shard.upgrade() else { return };
            let mut sh = shard.borrow_mut();
            let mut rb = rx.borrow_mut();
            // Nothing queued may point into `rb` once it receives again (only
            // a batch cut short by a panic could have left something).
            sh.to_peers.clear();
            // Errors (an ICMP error queued by an earlier send) surface once; go on.
            let n = rb.recv(fd).unwrap_or(0);
            let t = now();
            for i in 0..n {
                match rb.get(i) {
                    // One datagram, or a GRO run of them: each goes on alone.
                    Some((from, data, seg)) => {
                        for d in data.chunks(seg) {
                            on(&mut sh, from, d, t);
                        }
                    }
                    None => sh.server.stats.dropped_malformed += 1,
                }
            }
            // Before `rb` can receive again: datagrams queued for peers point into it.
            sh.flush_to_peers();
            n == batch::BATCH
        };
        if full {
            // More is queued: let the other sockets (and the flush) have a
            // turn before the next batch, so one busy socket cannot starve them.
            drop(guard);
            tokio::task::yield_now().await;
        } else {
            // A short batch drained the queue; a new datagram re-arms readiness.
            guard.clear_ready();
        }
    }
}

async fn relay_loop(shard: Weak<RefCell<Shard>>, id: RelayId, socket: Rc<Udp>, rx: Rc<RefCell<RecvBatch>>) {
    recv_loop(shard, socket, rx, std::time::Instant::now, move |sh, from, data, now| sh.on_peer(id, from, data, now)).await
}

/// Sleeps until the core's next deadline (or until it files an earlier
/// one), then lets it expire what is due, in batches.
async fn timer_loop(shard: Weak<RefCell<Shard>>, moved: Rc<Notify>) {
    loop {
        let next = match shard.upgrade() {
            Some(s) => s.borrow().server.poll_timeout(),
            None => return,
        };
        match next {
            Some(at) => tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = moved.notified() => continue,
            },
            None => {
                moved.notified().await;
                continue;
            }
        }
        let Some(s) = shard.upgrade() else { return };
        let more = s.borrow_mut().expire_due();
        drop(s);
        if more {
            tokio::task::yield_now().await;
        }
    }
}

/// Flushes the UDP send batches after the tasks woken together have queued.
async fn flush_loop(shard: Weak<RefCell<Shard>>, notify: Rc<Notify>) {
    loop {
        notify.notified().await;
        let Some(sh) = shard.upgrade() else { return };
        sh.borrow_mut().flush_udp();
    }
}

/// Receive and send buffer asked for on UDP listeners.
const UDP_LISTENER_BUFFER: usize = 4 << 20;

fn bind_udp(addr: SocketAddr) -> std::io::Result<Udp> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    // Media arrives in bursts; a larger buffer absorbs them (the kernel caps it at rmem_max).
    let _ = s.set_recv_buffer_size(UDP_LISTENER_BUFFER);
    let _ = s.set_send_buffer_size(UDP_LISTENER_BUFFER);
    // Linux reports twice what it granted (bookkeeping included).
    if let Ok(got) = s.recv_buffer_size()
        && got / 2 < UDP_LISTENER_BUFFER {
            tracing::warn!(
                listener = %addr, granted_kib = got / 2 / 1024, wanted_kib = UDP_LISTENER_BUFFER / 1024,
                "UDP receive buffer smaller than wanted: bursts may be dropped under load; raise net.core.rmem_max (see deploy/README.md)"
            );
        }
    s.bind(&addr.into())?;
    batch::enable_gro(s.as_raw_fd());
    register_udp(s.into())
}

/// Registers a non-blocking UDP socket with the runtime, for reading.
pub fn register_udp(sock: std::net::UdpSocket) -> std::io::Result<Udp> {
    // SAFETY: a std UdpSocket owns its descriptor, which stays open and the
    // same until the socket (moved into the AsyncFd) is dropped.
    unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

#[derive(Clone, Copy, Debug)]
struct StreamLimits {
    max_total: u32,
    max_per_ip: u32,
    ipv6_prefix: u8,
    handshake: Duration,
    idle: Duration,
}

async fn accept_loop(
    shard: Weak<RefCell<Shard>>,
    listener: Rc<TcpListener>,
    l: crate::config::Listener,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let Ok(local) = listener.local_addr() else { return };
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Some(limits) = shard.upgrade().map(|s| s.borrow().limits) else { return };
        let shard = shard.clone();
        let tls = tls.clone();
        let proxy = l.proxy_protocol;
        let transport = l.transport;
        if proxy && !l.proxy_protocol_from.iter().any(|c| c.contains(peer.ip().to_canonical())) {
            // Only the configured load balancers may say who the client is.
            if let Some(sh) = shard.upgrade() {
                sh.borrow_mut().connections_refused += 1;
            }
            tracing::debug!(%peer, "connection closed: not from listen.proxy_protocol_from");
            continue;
        }
        // A connection waiting for its PROXY header holds a descriptor before
        // it counts as a connection: count it meanwhile, so slow headers
        // cannot eat the descriptor reserve.
        let waiting = if proxy {
            match PendingProxy::new(&shard, peer.ip()) {
                Some(w) => Some(w),
                None => continue,
            }
        } else {
            None
        };
        tokio::task::spawn_local(async move {
            let client = if proxy {
                let r = stream::proxy_source(&tcp, limits.handshake).await;
                drop(waiting);
                match r {
                    Ok(Some(src)) => src,
                    Ok(None) => peer,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "bad PROXY protocol header");
                        return;
                    }
                }
            } else {
                peer
            };
            let tcp = match tls {
                Some(_) => match route_hello(&shard, tcp, client, local, limits.handshake).await {
                    Some(t) => t,
                    None => return,
                },
                None => tcp,
            };
            stream::limit_kernel_unsent(&tcp);
            let Some(stale) = shard.upgrade().map(|s| s.borrow().stale.clone()) else { return };
            let out = StreamOut::new(tls.is_some(), stale);
            let conn = {
                let Some(sh) = shard.upgrade() else { return };
                let mut sh = sh.borrow_mut();
                match sh.stream_opened(client.ip(), transport, out.clone()) {
                    Some(c) => c,
                    None => {
                        tracing::debug!(%client, "connection refused: connection limit reached");
                        return;
                    }
                }
            };
            let tuple = FiveTuple { client, server: local, transport, conn };
            match tls {
                Some(acceptor) => match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(tls_stream)) => stream::serve(shard, tls_stream, tuple, out, limits.idle).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%client, error = %e, "TLS handshake failed");
                        close_unused(&shard, tuple, true);
                    }
                    Err(_) => {
                        tracing::debug!(%client, "TLS handshake timed out");
                        close_unused(&shard, tuple, true);
                    }
                },
                None => stream::serve(shard, tcp, tuple, out, limits.idle).await,
            }
        });
    }
}

/// With `[tls.passthrough]`: peeks at the ClientHello and, for a name that
/// is not TURN's, passes the connection to the backend ([`PassedThrough`]
/// counts it). Gives the connection back when
/// TURN is to take it.
async fn route_hello(
    shard: &Weak<RefCell<Shard>>,
    tcp: tokio::net::TcpStream,
    client: SocketAddr,
    local: SocketAddr,
    timeout: Duration,
) -> Option<tokio::net::TcpStream> {
    let Some(route) = shard.upgrade().and_then(|s| s.borrow().passthrough.clone()) else { return Some(tcp) };
    let hello = match passthrough::peek_hello(&tcp, timeout).await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(%client, error = %e, "connection closed: no readable TLS ClientHello");
            if let Some(sh) = shard.upgrade() {
                sh.borrow_mut().tls_handshake_failures += 1;
            }
            return None;
        }
    };
    if !passthrough::to_backend(&route, &hello) {
        return Some(tcp);
    }
    let _counted = PassedThrough::new(shard, client.ip())?;
    if let Err(e) = passthrough::serve(tcp, client, local, &route, timeout).await {
        tracing::debug!(%client, backend = %route.backend, error = %e, "passed-through connection ended");
    }
    None
}

/// A connection passed through to the web server, counted against the
/// connection limits (total and per IP) and the descriptor budget (two: the
/// client's and the backend's) until dropped.
struct PassedThrough(Weak<RefCell<Shard>>, IpAddr);

impl PassedThrough {
    /// None (the connection is to be closed) when a limit is reached.
    fn new(shard: &Weak<RefCell<Shard>>, source: IpAddr) -> Option<Self> {
        let sh = shard.upgrade()?;
        let mut sh = sh.borrow_mut();
        let key = stream::per_ip_key(source, sh.limits.ipv6_prefix);
        let over_total = sh.limits.max_total != 0 && sh.stream_count + sh.passed_through >= sh.limits.max_total as usize;
        if over_total || sh.ip_limit_reached(key) || !sh.relays.fds_left_for_connection() {
            sh.connections_refused += 1;
            tracing::debug!(client = %source, "connection refused: connection limit reached");
            return None;
        }
        *sh.per_ip.entry(key).or_insert(0) += 1;
        sh.passed_through += 1;
        sh.sync_stream_fds();
        Some(PassedThrough(shard.clone(), key))
    }
}

impl Drop for PassedThrough {
    fn drop(&mut self) {
        if let Some(sh) = self.0.upgrade()
            && let Ok(mut sh) = sh.try_borrow_mut()
        {
            sh.passed_through -= 1;
            sh.sync_stream_fds();
            sh.ip_uncount(self.1);
        }
    }
}

/// An accepted connection still reading its PROXY header, counted against
/// the descriptor budget and the per-IP limit of its TCP source until dropped.
struct PendingProxy(Weak<RefCell<Shard>>, IpAddr);

impl PendingProxy {
    /// None (the connection is to be closed) when no descriptor is to spare
    /// or its source holds its share of connections.
    fn new(shard: &Weak<RefCell<Shard>>, source: IpAddr) -> Option<Self> {
        let sh = shard.upgrade()?;
        let mut sh = sh.borrow_mut();
        let key = stream::per_ip_key(source, sh.limits.ipv6_prefix);
        if !sh.relays.fds_left_for_connection() || sh.ip_limit_reached(key) {
            sh.connections_refused += 1;
            return None;
        }
        *sh.per_ip.entry(key).or_insert(0) += 1;
        sh.pending_proxy += 1;
        sh.sync_stream_fds();
        Some(PendingProxy(shard.clone(), key))
    }
}

impl Drop for PendingProxy {
    fn drop(&mut self) {
        if let Some(sh) = self.0.upgrade()
            && let Ok(mut sh) = sh.try_borrow_mut() {
                sh.pending_proxy -= 1;
                sh.sync_stream_fds();
                sh.ip_uncount(self.1);
            }
    }
}

fn close_unused(shard: &Weak<RefCell<Shard>>, tuple: FiveTuple, handshake_failed: bool) {
    if let Some(sh) = shard.upgrade() {
        let mut sh = sh.borrow_mut();
        sh.tls_handshake_failures += handshake_failed as u64;
        sh.stream_closed(tuple);
    }
}

impl From<&Config> for StreamLimits {
    fn from(cfg: &Config) -> Self {
        StreamLimits {
            max_total: cfg.max_connections,
            max_per_ip: cfg.max_connections_per_ip,
            ipv6_prefix: cfg.ipv6_prefix_per_ip,
            handshake: Duration::from_secs(cfg.tls_handshake_timeout as u64),
            idle: Duration::from_secs(cfg.idle_timeout as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WarnLimiter;

    #[test]
    fn refused_request_warnings_are_capped_per_window() {
        let mut w = WarnLimiter::new();
        let allowed = (0..1000).filter(|_| w.allow()).count();
        assert_eq!(allowed, super::WARN_BURST as usize);
        assert_eq!(w.suppressed, 1000 - super::WARN_BURST as u64);
    }
}
