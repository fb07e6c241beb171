//! A shard: one thread with a tokio current-thread runtime, its own sans-IO
//! [`Server`], its listener sockets (one of each SO_REUSEPORT group), its
//! relay sockets and its TCP/TLS connections. Every packet is handled on
//! the shard whose socket received it, with no lock and no hop to another
//! thread.
//!
//! Tasks for each socket wait for readiness, then borrow the shard and
//! drain what is queued with recvmmsg. Datagrams to UDP clients are written
//! straight into a per-listener send batch and leave with one sendmmsg when
//! the tasks woken together have run. Nothing is awaited while the shard is
//! borrowed, and packets live in buffers allocated once: no allocation per
//! packet. The process around the shards ([`super::control`]) talks to each
//! through its [`Command`] inbox.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::events::{log_event, WarnLimiter};
use super::sessions::{session, Selector};
use super::shared::{Shared, SharedLedger};
use super::stream::{self, accept_loop, Host, StaleDrops, StreamLimits, StreamOut, TcpFigures};
use super::udp::batch::{self, PeerSends, RecvBatch, SendBatch};
use super::udp::relay::{Receive, RelaySockets};
use super::udp::{register_udp, Udp};

pub mod handover;
use crate::auth::{Authenticator, NonceKey};
use crate::config::{Config, Listener};
use crate::turn::{Event, FiveTuple, Now, Output, PeerPolicy, RelayId, Server, Transport};

/// Largest message on a TCP/TLS stream (a STUN message or padded ChannelData).
pub const MAX_DATAGRAM: usize = 65_535;
/// Room for the Data indication header added around peer data.
const OUT_HEADROOM: usize = 64;
/// Deadlines handled before the timer task lets other tasks run.
const EXPIRE_BATCH: usize = 256;

/// What the process asks of a shard.
pub enum Command {
    /// First phase of a start or reload: take the new listener sockets into
    /// this shard's runtime (what can fail here) and hold the new settings;
    /// answers whether it could. Nothing running changes.
    Prepare(Box<Apply>),
    /// Second phase: switch to what reload `id` prepared. Cannot fail.
    Commit(u64, oneshot::Sender<()>),
    /// Reload `id` is refused on some shard: drop what it prepared here.
    Abort(u64),
    Snapshot(oneshot::Sender<crate::metrics::Snapshot>),
    Sessions(oneshot::Sender<Vec<serde_json::Value>>),
    Disconnect(Arc<Selector>, oneshot::Sender<usize>),
    /// Allocations made through UDP listener group `conn`.
    UdpAllocations(u32, oneshot::Sender<usize>),
    /// Closes retired UDP listener group `conn` (no shard has allocations on it).
    CloseUdp(u32),
    /// Refuse new allocations (graceful shutdown, `turnctl drain`).
    Drain,
    /// Take new allocations again after `turnctl drain` (`turnctl resume`).
    Undrain,
    /// Answered by a live event loop (the systemd watchdog asks).
    Ping(oneshot::Sender<()>),
    /// An upgrade: stop reading the listeners and the UDP allocations of
    /// these UDP listener groups, and answer with what the next process
    /// needs to serve them.
    Export(Arc<[u32]>, oneshot::Sender<std::io::Result<handover::Export>>),
    /// The upgrade failed: serve what [`Command::Export`] stopped again.
    Resume,
    /// The next process serves what was exported: let go of it here
    /// (the TCP/TLS connections stay). Answers how many allocations left.
    Release(oneshot::Sender<usize>),
}

pub struct Apply {
    /// The reload this belongs to (its Commit or Abort names it).
    pub id: u64,
    pub settings: Settings,
    pub steps: Vec<Step>,
    /// Whether this shard could take every step; why not.
    pub done: oneshot::Sender<Result<(), StepFailed>>,
}

/// What a start or reload sets on every shard besides its listeners.
pub struct Settings {
    pub cfg: Arc<Config>,
    pub policy: PeerPolicy,
    /// Serves TLS handshakes from now on, on every TLS listener.
    pub acceptor: Option<TlsAcceptor>,
    /// The check page, when `[check]` is on.
    pub check: Option<Arc<crate::check::Site>>,
}

/// A step a shard could not prepare: which listener, and the error.
#[derive(Debug, Clone)]
pub struct StepFailed {
    pub listener: String,
    pub error: String,
}

/// An [`Apply`] whose fallible part is done, waiting for its Commit.
struct Prepared {
    id: u64,
    settings: Settings,
    steps: Vec<Ready>,
}

/// A [`Step`] with its socket already registered in this shard's runtime.
enum Ready {
    AddUdp(u32, Udp),
    RetireUdp(u32),
    ReviveUdp(u32),
    AddStream(u32, TcpListener, Listener),
    ChangeStream(u32, Listener),
    RemoveStream(u32),
    Adopt(handover::Adoption),
}

/// One change to a shard's listeners; a listener group has the same id on
/// every shard.
pub enum Step {
    AddUdp(u32, std::net::UdpSocket),
    /// Removed by a reload: serve only the allocations made through it.
    RetireUdp(u32),
    /// Added again while retiring: serve everyone.
    ReviveUdp(u32),
    AddStream(u32, std::net::TcpListener, Listener),
    /// Same socket, other settings (PROXY protocol, TCP became TLS).
    ChangeStream(u32, Listener),
    RemoveStream(u32),
    /// Take up the UDP allocations the previous process handed over (after
    /// the listeners they arrive on are in place).
    Adopt(handover::Adoption),
}

/// A UDP listener and the datagrams queued for its clients.
struct UdpListener {
    socket: Rc<Udp>,
    out: SendBatch,
    /// Removed by a reload: serves only the allocations made through it,
    /// and closes when they have ended.
    retiring: bool,
    task: JoinHandle<()>,
}

impl Drop for UdpListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct StreamListener {
    socket: Rc<TcpListener>,
    listener: Listener,
    task: JoinHandle<()>,
}

impl Drop for StreamListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Shard {
    pub index: usize,
    pub server: Server,
    pub relays: RelaySockets,
    pub shared: Arc<Shared>,
    /// UDP listeners by `conn` (the id of their group); `None` when closed.
    udp: Vec<Option<UdpListener>>,
    /// TCP/TLS listeners by the id of their group.
    stream_listeners: HashMap<u32, StreamListener>,
    acceptor: Option<TlsAcceptor>,
    check: Option<Arc<crate::check::Site>>,
    /// Wakes the task that flushes the listeners' send batches.
    flush: Rc<Notify>,
    /// TCP/TLS connections by the `conn` of their 5-tuple.
    streams: Vec<Option<Rc<StreamOut>>>,
    free_streams: Vec<u32>,
    connections: [u64; 3],
    pub limits: StreamLimits,
    /// SNI routing on TLS listeners (`[tls.passthrough]`), replaced on reload.
    pub passthrough: Option<Rc<crate::config::Passthrough>>,
    nonce_key: NonceKey,
    pub tls_handshake_failures: u64,
    pub connections_refused: u64,
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
    pub stale: Rc<StaleDrops>,
    /// A prepared reload waiting for its Commit or Abort.
    prepared: Option<Prepared>,
    /// What an upgrade in progress stopped reading, to resume or release.
    exported: Option<handover::Paused>,
    /// Test hook (`TURND_TEST_REFUSE_PREPARE=INDEX:PORT`): shard INDEX cannot
    /// take a new listener socket on PORT, as a shard whose runtime refuses a
    /// socket would; the reload tests use it to fail one shard only.
    refuse_prepare: Option<u16>,
    /// This shard's channels in the XDP fast path's maps.
    #[cfg(feature = "xdp")]
    xdp: Option<super::xdp::Mirror>,
    /// Bytes the fast path relayed for allocations that ended, between
    /// their channels' ChannelUnbound and their AllocationEnded.
    #[cfg(feature = "xdp")]
    xdp_ended: HashMap<FiveTuple, (u64, u64)>,
    this: Weak<RefCell<Shard>>,
}

impl Shard {
    /// A datagram from a client on UDP listener `conn`; what it relays to
    /// a peer joins `batch`.
    fn on_client<'a>(&mut self, batch: &ToPeers<'a>, conn: u32, local: SocketAddr, from: SocketAddr, pkt: &'a [u8], now: Now) {
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
            Output::Relay { relay, peer, data, dont_fragment } => {
                *send_failures += to_peer(batch, to_peers, relays, relay, peer, data, dont_fragment);
            }
        }
        if server.has_events() {
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

    /// Runs `f` with a [`ToPeers`] batch for client data borrowed for `'a`
    /// (the buffer it was received into), then sends what `f` queued: every
    /// datagram a read or a batch of reads relays leaves together (GSO,
    /// sendmmsg), and the queue is empty again before that buffer can change.
    pub(super) fn relaying<'a, R>(&mut self, f: impl FnOnce(&mut Shard, &ToPeers<'a>) -> R) -> R {
        // Nothing queued may point elsewhere: only a batch cut short by a
        // panic could have left something, and it is never sent.
        self.to_peers.clear();
        let r = f(self, &ToPeers(PhantomData));
        self.flush_to_peers();
        r
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

    /// One framed message from a TCP/TLS client; what it relays to a peer
    /// joins `batch`.
    fn on_stream<'a>(&mut self, batch: &ToPeers<'a>, tuple: FiveTuple, msg: &'a [u8]) {
        let Shard { server, relays, streams, tx, send_failures, to_peers, .. } = self;
        match server.handle_client(tuple, msg, Now::system(), tx, relays) {
            Output::None => {}
            Output::Reply(b) => match streams.get(tuple.conn as usize) {
                Some(Some(out)) if out.push(b, false, std::time::Instant::now()) => {}
                _ => *send_failures += 1,
            },
            Output::Relay { relay, peer, data, dont_fragment } => {
                *send_failures += to_peer(batch, to_peers, relays, relay, peer, data, dont_fragment);
            }
        }
        self.after_control();
    }

    /// Drains the core's events: logs them (an allocation of a TCP/TLS
    /// client that ends with its connection's TCP figures), and wakes the
    /// timer task when a deadline moved earlier.
    pub(crate) fn after_control(&mut self) {
        while let Some(e) = self.server.poll_event() {
            #[cfg(feature = "xdp")]
            let e = self.mirror(e);
            match e {
                Event::DeadlineMoved => self.timer.notify_one(),
                e => {
                    let tcp = match &e {
                        Event::AllocationEnded { tuple, .. } => self.tcp_figures(tuple),
                        _ => None,
                    };
                    log_event(&e, tcp.as_ref(), &mut self.warnings)
                }
            }
        }
        // Every AllocationEnded came with its ChannelUnbounds, in this drain.
        #[cfg(feature = "xdp")]
        self.xdp_ended.clear();
    }

    /// Mirrors a channel event into the XDP fast path's maps. An ended
    /// allocation's bytes get what the kernel relayed for it since the last
    /// sync (its channels were unbound just before, when it was gone).
    #[cfg(feature = "xdp")]
    fn mirror(&mut self, mut e: Event) -> Event {
        let Shard { xdp: Some(m), server, relays, xdp_ended, .. } = self else { return e };
        match e {
            Event::ChannelBound { relay, tuple, channel, peer, until, cap } | Event::ChannelRefreshed { relay, tuple, channel, peer, until, cap } => {
                let relayed = relays.get(relay).and_then(|r| r.socket.get_ref().local_addr().ok());
                m.bound(&super::xdp::Binding { relay, tuple, channel, peer, until, cap, relayed }, server, std::time::Instant::now());
            }
            Event::ChannelUnbound { relay, tuple, channel, .. } => {
                let (to, from) = m.unbound(relay, channel, server, std::time::Instant::now());
                if to != 0 || from != 0 {
                    let n = xdp_ended.entry(tuple).or_default();
                    n.0 += to;
                    n.1 += from;
                }
            }
            Event::AllocationEnded { ref tuple, ref mut bytes_to_peer, ref mut bytes_from_peer, .. } => {
                if let Some((to, from)) = xdp_ended.remove(tuple) {
                    *bytes_to_peer += to;
                    *bytes_from_peer += from;
                }
            }
            _ => {}
        }
        e
    }

    /// Credits the core with what the XDP fast path relayed.
    #[cfg(feature = "xdp")]
    fn sync_xdp(&mut self) {
        if let Shard { xdp: Some(m), server, .. } = self {
            m.sync(server, std::time::Instant::now());
        }
    }

    /// The TCP figures of the connection of `tuple`, when it is a TCP/TLS
    /// connection still open.
    fn tcp_figures(&self, tuple: &FiveTuple) -> Option<TcpFigures> {
        if tuple.transport == Transport::Udp {
            return None;
        }
        self.streams.get(tuple.conn as usize)?.as_ref()?.tcp_figures()
    }

    /// The admin API's sessions of this shard: each allocation, and for a
    /// TCP/TLS client its connection's TCP figures (`health.client_leg.tcp`).
    fn sessions(&self) -> Vec<serde_json::Value> {
        let now = std::time::Instant::now();
        self.server
            .allocations()
            .map(|a| {
                let mut v = session(a, now, self.index);
                if let Some(t) = self.tcp_figures(&a.tuple) {
                    v["health"]["client_leg"]["tcp"] = t.json();
                }
                v
            })
            .collect()
    }

    /// This shard's part of a metrics scrape (the process sums the shards).
    fn snapshot(&self) -> crate::metrics::Snapshot {
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
            shards: vec![crate::metrics::ShardCounts {
                index: self.index,
                allocations: self.server.allocation_count() as u64,
                connections: self.connections.iter().sum(),
            }],
            ..Default::default()
        }
    }

    /// First phase: registers every new socket with this shard's runtime
    /// (the part of a listener change that can fail) and keeps the result
    /// for [`Shard::commit`]. On failure nothing is kept (the sockets
    /// registered so far close) and nothing changed.
    fn prepare(&mut self, a: Apply) {
        let Apply { id, settings, steps, done } = a;
        let answer = steps.into_iter().map(|step| self.ready(step)).collect::<Result<Vec<_>, _>>().map(|steps| {
            self.prepared = Some(Prepared { id, settings, steps });
        });
        if let Err(f) = &answer {
            tracing::error!(shard = self.index, listener = %f.listener, error = %f.error, "cannot take a listener socket: the reload is refused");
        }
        let _ = done.send(answer);
    }

    /// One step with its socket (if it brings one) registered here.
    fn ready(&self, step: Step) -> Result<Ready, StepFailed> {
        let failed = |listener: String, e: std::io::Error| StepFailed { listener, error: e.to_string() };
        Ok(match step {
            Step::AddUdp(conn, socket) => {
                let addr = socket.local_addr().ok();
                let listener = addr.map(|a| format!("udp {a}")).unwrap_or_else(|| "udp".into());
                let s = self.refused(addr).and_then(|()| register_udp(socket)).map_err(|e| failed(listener, e))?;
                Ready::AddUdp(conn, s)
            }
            Step::AddStream(id, socket, l) => {
                let listener = format!("{} {}", l.transport.label(), l.address);
                let s = self.refused(Some(l.address)).and_then(|()| TcpListener::from_std(socket)).map_err(|e| failed(listener, e))?;
                Ready::AddStream(id, s, l)
            }
            Step::RetireUdp(c) => Ready::RetireUdp(c),
            Step::ReviveUdp(c) => Ready::ReviveUdp(c),
            Step::ChangeStream(id, l) => Ready::ChangeStream(id, l),
            Step::RemoveStream(id) => Ready::RemoveStream(id),
            Step::Adopt(a) => Ready::Adopt(a),
        })
    }

    /// The test hook's refusal of a new listener at `addr`, as an I/O error.
    fn refused(&self, addr: Option<SocketAddr>) -> std::io::Result<()> {
        match addr {
            Some(a) if self.refuse_prepare == Some(a.port()) => Err(std::io::Error::other("refused by TURND_TEST_REFUSE_PREPARE")),
            _ => Ok(()),
        }
    }

    /// Second phase: switches to the configuration reload `id` prepared.
    /// Existing allocations stay. Nothing here fails.
    fn commit(&mut self, id: u64) {
        let Some(p) = self.prepared.take_if(|p| p.id == id) else {
            tracing::error!(shard = self.index, reload = id, "asked to switch to a configuration it did not prepare");
            return;
        };
        let Settings { cfg, policy, acceptor, check } = p.settings;
        let auth = Authenticator::new(&cfg.realm, cfg.secrets.clone(), &cfg.static_users, self.nonce_key.clone()).with_check(cfg.check.as_ref().map(|c| c.credential_ttl));
        self.check = check;
        let revoked = self.server.reconfigure(core_config(&cfg), auth, policy, std::time::Instant::now());
        #[cfg(feature = "xdp")]
        if let Some(m) = &self.xdp {
            m.set_total(cfg.core.total_bytes_per_second);
        }
        self.relays.reconfigure(cfg.core.relay_v4.map(|r| r.local), cfg.core.relay_v6.map(|r| r.local), cfg.ports);
        // The core reported every channel again (a cap may have come or
        // gone): a fast path follows at once.
        self.after_control();
        if revoked > 0 {
            tracing::info!(shard = self.index, revoked, "reload: permissions and channels of peers the new peer policy refuses have ended");
        }
        self.limits = StreamLimits::from(&*cfg);
        self.passthrough = cfg.passthrough.clone().map(Rc::new);
        if acceptor.is_some() {
            self.acceptor = acceptor;
        }
        let Some(shard) = self.this.upgrade() else { return };
        for step in p.steps {
            self.step(&shard, step);
        }
    }

    fn step(&mut self, shard: &Rc<RefCell<Shard>>, step: Ready) {
        match step {
            Ready::AddUdp(conn, s) => {
                let s = Rc::new(s);
                let out = SendBatch::for_socket(s.get_ref().as_raw_fd());
                let task = tokio::task::spawn_local(listener_loop(Rc::downgrade(shard), conn, s.clone(), self.rx_batch.clone()));
                let i = conn as usize;
                if self.udp.len() <= i {
                    self.udp.resize_with(i + 1, || None);
                }
                self.udp[i] = Some(UdpListener { socket: s, out, retiring: false, task });
            }
            Ready::RetireUdp(conn) | Ready::ReviveUdp(conn) => {
                if let Some(Some(l)) = self.udp.get_mut(conn as usize) {
                    l.retiring = matches!(step, Ready::RetireUdp(_));
                }
            }
            Ready::AddStream(id, s, l) => {
                let s = Rc::new(s);
                let task = self.spawn_accept(shard, s.clone(), &l);
                self.stream_listeners.insert(id, StreamListener { socket: s, listener: l, task });
            }
            Ready::ChangeStream(id, l) => {
                if let Some(s) = self.stream_listeners.get(&id).map(|sl| sl.socket.clone()) {
                    let task = self.spawn_accept(shard, s.clone(), &l);
                    // Dropping the old one aborts its accept loop.
                    self.stream_listeners.insert(id, StreamListener { socket: s, listener: l, task });
                }
            }
            Ready::RemoveStream(id) => {
                self.stream_listeners.remove(&id);
            }
            Ready::Adopt(a) => self.adopt(a),
        }
    }

    fn spawn_accept(&self, shard: &Rc<RefCell<Shard>>, s: Rc<TcpListener>, l: &Listener) -> JoinHandle<()> {
        tokio::task::spawn_local(accept_loop(Rc::downgrade(shard), s, l.clone(), l.transport == Transport::Tls))
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Prepare(a) => self.prepare(*a),
            Command::Commit(id, done) => {
                self.commit(id);
                let _ = done.send(());
            }
            Command::Abort(id) => {
                if self.prepared.take_if(|p| p.id == id).is_some() {
                    tracing::info!(shard = self.index, "reload refused elsewhere: what this shard prepared is dropped");
                }
            }
            Command::Snapshot(tx) => {
                #[cfg(feature = "xdp")]
                self.sync_xdp();
                let _ = tx.send(self.snapshot());
            }
            Command::Sessions(tx) => {
                #[cfg(feature = "xdp")]
                self.sync_xdp();
                let _ = tx.send(self.sessions());
            }
            Command::Disconnect(sel, tx) => {
                let Shard { server, relays, .. } = self;
                let n = server.disconnect(|a| sel.matches(a), std::time::Instant::now(), relays);
                self.after_control();
                let _ = tx.send(n);
            }
            Command::UdpAllocations(conn, tx) => {
                let n = self.server.allocations().filter(|a| a.tuple.transport == Transport::Udp && a.tuple.conn == conn).count();
                let _ = tx.send(n);
            }
            Command::CloseUdp(conn) => {
                if let Some(slot) = self.udp.get_mut(conn as usize) {
                    *slot = None;
                }
            }
            Command::Drain => self.server.set_accepting(false),
            Command::Undrain => self.server.set_accepting(true),
            Command::Ping(tx) => {
                let _ = tx.send(());
            }
            Command::Export(conns, tx) => {
                let _ = tx.send(self.export(&conns));
            }
            Command::Resume => self.resume(),
            Command::Release(tx) => {
                let _ = tx.send(self.release());
            }
        }
    }

    /// Expires what the core has due, a bounded batch at a time; returns
    /// whether more is due.
    fn expire_due(&mut self) -> bool {
        let Shard { server, relays, .. } = self;
        let more = server.expire(std::time::Instant::now(), relays, EXPIRE_BATCH);
        self.after_control();
        more
    }

    /// A shard with no listener yet, and its flush and timer tasks. Must
    /// run inside a `LocalSet`.
    fn start(index: usize, cfg: &Config, shared: Arc<Shared>, nonce_key: NonceKey, policy: PeerPolicy) -> Rc<RefCell<Shard>> {
        let auth = Authenticator::new(&cfg.realm, cfg.secrets.clone(), &cfg.static_users, nonce_key.clone()).with_check(cfg.check.as_ref().map(|c| c.credential_ttl));
        let rx_batch = Rc::new(RefCell::new(RecvBatch::new()));
        let ledger = Box::new(SharedLedger(shared.clone()));
        let flush = Rc::new(Notify::new());
        #[cfg(feature = "xdp")]
        let xdp = shared.xdp.get().map(|f| super::xdp::Mirror::new(f.clone()));
        let shard = Rc::new_cyclic(|this: &Weak<RefCell<Shard>>| {
            // A relay socket the core opens starts receiving at once.
            let receive: Receive = {
                let (this, rx) = (this.clone(), rx_batch.clone());
                Box::new(move |id, socket| tokio::task::spawn_local(relay_loop(this.clone(), id, socket, rx.clone())))
            };
            let (v4, v6) = (cfg.core.relay_v4.map(|r| r.local), cfg.core.relay_v6.map(|r| r.local));
            RefCell::new(Shard {
                index,
                server: Server::with_ledger(core_config(cfg), auth, policy, ledger),
                relays: RelaySockets::new(v4, v6, cfg.ports, shared.clone(), receive),
                shared,
                udp: Vec::new(),
                stream_listeners: HashMap::new(),
                acceptor: None,
                check: None,
                streams: Vec::new(),
                free_streams: Vec::new(),
                connections: [0; 3],
                limits: StreamLimits::from(cfg),
                passthrough: cfg.passthrough.clone().map(Rc::new),
                nonce_key,
                tls_handshake_failures: 0,
                connections_refused: 0,
                warnings: WarnLimiter::new(),
                rx_batch,
                flush: flush.clone(),
                tx: vec![0u8; MAX_DATAGRAM + OUT_HEADROOM].into_boxed_slice(),
                to_peers: PeerSends::new(batch::gso_available()),
                send_failures: 0,
                timer: Rc::new(Notify::new()),
                stale: stream::StaleDrops::new(),
                prepared: None,
                exported: None,
                refuse_prepare: refuse_prepare_hook(index),
                #[cfg(feature = "xdp")]
                xdp,
                #[cfg(feature = "xdp")]
                xdp_ended: HashMap::new(),
                this: this.clone(),
            })
        });
        tokio::task::spawn_local(flush_loop(Rc::downgrade(&shard), flush));
        let timer = shard.borrow().timer.clone();
        tokio::task::spawn_local(timer_loop(Rc::downgrade(&shard), timer));
        #[cfg(feature = "xdp")]
        if shard.borrow().xdp.is_some() {
            tokio::task::spawn_local(xdp_loop(Rc::downgrade(&shard)));
        }
        shard
    }
}

/// The port `TURND_TEST_REFUSE_PREPARE=INDEX:PORT` makes shard `index` refuse.
fn refuse_prepare_hook(index: usize) -> Option<u16> {
    let v = std::env::var("TURND_TEST_REFUSE_PREPARE").ok()?;
    let (shard, port) = v.trim().split_once(':')?;
    (shard.parse::<usize>().ok()? == index).then(|| port.parse().ok()).flatten()
}

impl Host for Shard {
    fn limits(&self) -> StreamLimits {
        self.limits
    }

    fn passthrough(&self) -> Option<Rc<crate::config::Passthrough>> {
        self.passthrough.clone()
    }

    fn acceptor(&self) -> Option<TlsAcceptor> {
        self.acceptor.clone()
    }

    fn check_site(&self) -> Option<Arc<crate::check::Site>> {
        self.check.clone()
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn stale(&self) -> Rc<StaleDrops> {
        self.stale.clone()
    }

    fn refused(&mut self) {
        self.connections_refused += 1;
    }

    fn handshake_failed(&mut self) {
        self.tls_handshake_failures += 1;
    }

    fn opened(&mut self, transport: Transport, out: Rc<StreamOut>) -> u32 {
        self.connections[transport as usize] += 1;
        match self.free_streams.pop() {
            Some(c) => {
                self.streams[c as usize] = Some(out);
                c
            }
            None => {
                self.streams.push(Some(out));
                (self.streams.len() - 1) as u32
            }
        }
    }

    fn on_messages<'a>(&mut self, tuple: FiveTuple, messages: impl Iterator<Item = &'a [u8]>) {
        self.relaying(|sh, batch| {
            for m in messages {
                sh.on_stream(batch, tuple, m);
            }
        });
    }

    fn has_allocation(&self, tuple: &FiveTuple) -> bool {
        self.server.has_allocation(tuple)
    }

    fn closed(&mut self, tuple: FiveTuple) {
        // The allocation ends first, while the connection is still known
        // here: its log line has the connection's TCP figures.
        let Shard { server, relays, .. } = self;
        server.connection_closed(&tuple, std::time::Instant::now(), relays);
        self.after_control();
        if let Some(slot) = self.streams.get_mut(tuple.conn as usize)
            && slot.take().is_some() {
                self.free_streams.push(tuple.conn);
                self.connections[tuple.transport as usize] -= 1;
            }
    }
}

/// Proof of a batch of client data on its way to peers, open for data
/// borrowed for `'a`: only [`Shard::relaying`] makes one, and it sends the
/// queue before it returns, so what the queue points into (data of `'a`,
/// which outlives that call) is still there when it is sent. Invariant in
/// `'a`, so no shorter borrow can stand in.
pub(super) struct ToPeers<'a>(PhantomData<Cell<&'a [u8]>>);

/// Queues a client's datagram for `peer` on relay socket `relay`, to leave
/// with the batch; one that asked for DONT-FRAGMENT leaves alone, after what
/// is queued. Returns the datagrams that could not be sent.
#[inline]
fn to_peer<'a>(_batch: &ToPeers<'a>, to_peers: &mut PeerSends, relays: &RelaySockets, relay: RelayId, peer: SocketAddr, data: &'a [u8], dont_fragment: bool) -> u64 {
    if dont_fragment {
        let (_, dropped) = to_peers.flush(|id| relays.fd(id));
        return dropped as u64 + !relays.send(relay, peer, data, true) as u64;
    }
    let mut failed = 0;
    if to_peers.is_full() {
        let (_, dropped) = to_peers.flush(|id| relays.fd(id));
        failed = dropped as u64;
    }
    // SAFETY: `data` is borrowed for `'a`, the lifetime of the batch, which
    // outlives the `Shard::relaying` call that sends the queue before it
    // returns (and the queue is only sent or cleared there or above).
    unsafe { to_peers.push(relay, peer, data) };
    failed
}

/// The core's settings for one of `cfg.threads` shards: the relay's total
/// bandwidth cap is split evenly between them (each relays its own clients).
fn core_config(cfg: &Config) -> crate::turn::ServerConfig {
    let mut core = cfg.core.clone();
    if core.total_bytes_per_second > 0 {
        core.total_bytes_per_second = core.total_bytes_per_second.div_ceil(cfg.threads.max(1) as u64);
    }
    core
}

/// What a shard thread starts from.
pub struct Spawn {
    pub index: usize,
    pub cfg: Arc<Config>,
    pub shared: Arc<Shared>,
    pub nonce_key: NonceKey,
    pub policy: PeerPolicy,
    pub inbox: mpsc::UnboundedReceiver<Command>,
}

/// Runs shard `s.index` on this thread until its inbox closes. Says on
/// `started` whether its runtime could be built.
pub fn run(s: Spawn, started: std::sync::mpsc::Sender<std::io::Result<()>>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    let _ = started.send(Ok(()));
    let local = tokio::task::LocalSet::new();
    let Spawn { index, cfg, shared, nonce_key, policy, mut inbox } = s;
    local.block_on(&rt, async move {
        let shard = Shard::start(index, &cfg, shared, nonce_key, policy);
        drop(cfg);
        while let Some(c) = inbox.recv().await {
            shard.borrow_mut().command(c);
        }
    });
}

/// Waits for datagrams on `socket`, receives them in batches and hands each
/// to `on` with the shard borrowed, within one [`Shard::relaying`] batch.
/// Ends when the socket or the shard goes.
async fn recv_loop<T: Copy>(
    shard: Weak<RefCell<Shard>>,
    socket: Rc<Udp>,
    rx: Rc<RefCell<RecvBatch>>,
    now: impl Fn() -> T,
    on: impl for<'a> Fn(&mut Shard, &ToPeers<'a>, SocketAddr, &'a [u8], T),
) {
    let fd = socket.get_ref().as_raw_fd();
    loop {
        let Ok(mut guard) = socket.readable().await else { return };
        let full = {
            let Some(shard) = shard.upgrade() else { return };
            let mut sh = shard.borrow_mut();
            let mut rb = rx.borrow_mut();
            // Errors (an ICMP error queued by an earlier send) surface once; go on.
            let n = rb.recv(fd).unwrap_or(0);
            let t = now();
            let rb = &*rb;
            sh.relaying(|sh, batch| {
                for i in 0..n {
                    match rb.get(i) {
                        // One datagram, or a GRO run of them: each goes on alone.
                        // An empty datagram is one too (chunks would yield none).
                        Some((from, data, _)) if data.is_empty() => on(sh, batch, from, data, t),
                        Some((from, data, seg)) => {
                            for d in data.chunks(seg) {
                                on(sh, batch, from, d, t);
                            }
                        }
                        None => sh.server.stats.dropped_malformed += 1,
                    }
                }
            });
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

/// A UDP listener: STUN, TURN control and ChannelData from clients.
async fn listener_loop(shard: Weak<RefCell<Shard>>, conn: u32, socket: Rc<Udp>, rx: Rc<RefCell<RecvBatch>>) {
    let Ok(local) = socket.get_ref().local_addr() else { return };
    recv_loop(shard, socket, rx, Now::system, move |sh, batch, from, pkt, now| sh.on_client(batch, conn, local, from, pkt, now)).await
}

/// A relay socket: datagrams from peers.
async fn relay_loop(shard: Weak<RefCell<Shard>>, id: RelayId, socket: Rc<Udp>, rx: Rc<RefCell<RecvBatch>>) {
    recv_loop(shard, socket, rx, std::time::Instant::now, move |sh, _, from, data, now| sh.on_peer(id, from, data, now)).await
}

/// Reads the XDP fast path's counters into the core once a second, so
/// sessions, metrics and ended allocations count what it relayed.
#[cfg(feature = "xdp")]
async fn xdp_loop(shard: Weak<RefCell<Shard>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(s) = shard.upgrade() else { return };
        s.borrow_mut().sync_xdp();
    }
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
