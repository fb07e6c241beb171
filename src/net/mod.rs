//! The I/O layer: sockets around the sans-IO core.
//!
//! One thread runs a tokio current-thread runtime. A [`Shard`] owns the core
//! [`Server`], the client-facing sockets and the relay sockets; tasks for each
//! socket wait for readiness, then borrow the shard and drain what is queued
//! with non-blocking calls. Nothing is awaited while the shard is borrowed,
//! and packets are handled in shard-owned buffers: no allocation per packet.

pub mod proxy;
pub mod relay;
mod stream;
pub mod tls;
mod udp;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::{Rc, Weak};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};

use crate::auth::{Authenticator, NonceKey};
use crate::config::{Config, SecretSource};
use crate::turn::{Event, FiveTuple, Now, Output, RelayId, Server, Transport};
use relay::RelaySockets;
use stream::StreamOut;

/// Largest datagram handled; larger ones are truncated by the kernel and dropped.
pub const MAX_DATAGRAM: usize = 65_535;
/// Room for the Data indication header added around peer data.
const OUT_HEADROOM: usize = 64;

pub struct Shard {
    pub server: Server,
    pub relays: RelaySockets,
    udp: Vec<Rc<UdpSocket>>,
    /// TCP/TLS connections by the `conn` of their 5-tuple.
    streams: Vec<Option<Rc<StreamOut>>>,
    free_streams: Vec<u32>,
    stream_count: usize,
    per_ip: HashMap<IpAddr, u32>,
    rx: Box<[u8]>,
    tx: Box<[u8]>,
    pub send_failures: u64,
    this: Weak<RefCell<Shard>>,
}

impl Shard {
    /// A datagram from a client on UDP listener `conn`.
    fn on_client(&mut self, conn: u32, local: SocketAddr, from: SocketAddr, len: usize) {
        let tuple = FiveTuple { client: from, server: local, transport: Transport::Udp, conn };
        let Shard { server, relays, udp, rx, tx, send_failures, .. } = self;
        match server.handle_client(tuple, &rx[..len], Now::system(), tx, relays) {
            Output::None => {}
            Output::Reply(b) => {
                if udp[conn as usize].try_send_to(b, from).is_err() {
                    *send_failures += 1;
                }
            }
            Output::Relay { relay, peer, data } => {
                if !relays.send(relay, peer, data) {
                    *send_failures += 1;
                }
            }
        }
        self.after_control();
    }

    /// A datagram from a peer on relay socket `id`.
    fn on_peer(&mut self, id: RelayId, from: SocketAddr, len: usize) {
        let Shard { server, udp, rx, tx, send_failures, .. } = self;
        let now = std::time::Instant::now();
        if let Some((tuple, bytes)) = server.handle_peer(id, from, &rx[..len], now, tx) {
            match tuple.transport {
                Transport::Udp => {
                    if udp[tuple.conn as usize].try_send_to(bytes, tuple.client).is_err() {
                        *send_failures += 1;
                    }
                }
                Transport::Tcp | Transport::Tls => match self.streams.get(tuple.conn as usize) {
                    Some(Some(out)) if out.push(bytes) => {}
                    _ => *send_failures += 1,
                },
            }
        }
    }

    /// One framed message from a TCP/TLS client.
    fn on_stream(&mut self, tuple: FiveTuple, msg: &[u8]) {
        let Shard { server, relays, streams, tx, send_failures, .. } = self;
        match server.handle_client(tuple, msg, Now::system(), tx, relays) {
            Output::None => {}
            Output::Reply(b) => match streams.get(tuple.conn as usize) {
                Some(Some(out)) if out.push(b) => {}
                _ => *send_failures += 1,
            },
            Output::Relay { relay, peer, data } => {
                if !relays.send(relay, peer, data) {
                    *send_failures += 1;
                }
            }
        }
        self.after_control();
    }

    /// Registers a new connection if the limits allow; returns its conn id.
    fn stream_opened(&mut self, client: IpAddr, out: Rc<StreamOut>, max_total: u32, max_per_ip: u32) -> Option<u32> {
        let n = self.per_ip.get(&client).copied().unwrap_or(0);
        if self.stream_count >= max_total as usize || n >= max_per_ip {
            return None;
        }
        *self.per_ip.entry(client).or_insert(0) += 1;
        self.stream_count += 1;
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
        if let Some(slot) = self.streams.get_mut(tuple.conn as usize) {
            if slot.take().is_some() {
                self.free_streams.push(tuple.conn);
                self.stream_count -= 1;
                if let Some(c) = self.per_ip.get_mut(&tuple.client.ip()) {
                    *c -= 1;
                    if *c == 0 {
                        self.per_ip.remove(&tuple.client.ip());
                    }
                }
            }
        }
        let Shard { server, relays, .. } = self;
        server.connection_closed(&tuple, std::time::Instant::now(), relays);
        self.after_control();
    }

    /// Starts receive tasks for relay sockets the core just opened, and logs events.
    fn after_control(&mut self) {
        while let Some(id) = self.relays.opened.pop() {
            if let Some(e) = self.relays.get(id) {
                let task = tokio::task::spawn_local(relay_loop(self.this.clone(), id, e.socket.clone()));
                self.relays.set_task(id, task);
            }
        }
        while let Some(e) = self.server.poll_event() {
            log_event(&e);
        }
    }

    fn tick(&mut self) {
        let Shard { server, relays, .. } = self;
        server.handle_timeout(std::time::Instant::now(), relays);
        self.after_control();
    }
}

fn log_event(e: &Event) {
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
        Event::PeerRefused { tuple, peer } => {
            tracing::debug!(client = %tuple.client, %peer, "peer refused by policy")
        }
    }
}

/// Packets drained per readiness wake-up before yielding to other sockets.
const BATCH: usize = 64;

async fn relay_loop(shard: Weak<RefCell<Shard>>, id: RelayId, socket: Rc<UdpSocket>) {
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let Some(shard) = shard.upgrade() else { return };
        let mut sh = shard.borrow_mut();
        for _ in 0..BATCH {
            match socket.try_recv_from(&mut sh.rx) {
                Ok((n, from)) => sh.on_peer(id, from, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // ICMP errors from earlier sends surface here; keep going.
                Err(_) => break,
            }
        }
    }
}

fn bind_udp(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    // Media arrives in bursts; a larger buffer absorbs them (the kernel caps it at rmem_max).
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into()).with_context(|| format!("cannot bind UDP {addr}"))?;
    Ok(UdpSocket::from_std(s.into())?)
}

fn bind_tcp(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into()).with_context(|| {
        if addr.port() < 1024 {
            format!("cannot bind TCP {addr} (ports below 1024 need root or CAP_NET_BIND_SERVICE)")
        } else {
            format!("cannot bind TCP {addr}")
        }
    })?;
    s.listen(1024)?;
    Ok(TcpListener::from_std(s.into())?)
}

#[derive(Clone, Copy)]
struct StreamLimits {
    max_total: u32,
    max_per_ip: u32,
    handshake: Duration,
    idle: Duration,
}

async fn accept_loop(
    shard: Weak<RefCell<Shard>>,
    listener: TcpListener,
    l: crate::config::Listener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: StreamLimits,
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
        let shard = shard.clone();
        let tls = tls.clone();
        let proxy = l.proxy_protocol;
        let transport = l.transport;
        tokio::task::spawn_local(async move {
            let client = if proxy {
                match stream::proxy_source(&tcp, limits.handshake).await {
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
            let out = StreamOut::new(tls.is_some());
            let conn = {
                let Some(sh) = shard.upgrade() else { return };
                let mut sh = sh.borrow_mut();
                match sh.stream_opened(client.ip(), out.clone(), limits.max_total, limits.max_per_ip) {
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
                        close_unused(&shard, tuple);
                    }
                    Err(_) => {
                        tracing::debug!(%client, "TLS handshake timed out");
                        close_unused(&shard, tuple);
                    }
                },
                None => stream::serve(shard, tcp, tuple, out, limits.idle).await,
            }
        });
    }
}

fn close_unused(shard: &Weak<RefCell<Shard>>, tuple: FiveTuple) {
    if let Some(sh) = shard.upgrade() {
        sh.borrow_mut().stream_closed(tuple);
    }
}

/// Builds the core from a validated config.
pub fn build_server(cfg: &Config) -> Server {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).expect("the OS random generator is available");
    let auth = Authenticator::new(&cfg.realm, cfg.secrets.clone(), &cfg.static_users, NonceKey::new(key, cfg.nonce_lifetime));
    Server::new(cfg.server_config(), auth, cfg.peer_policy())
}

/// Runs the relay until SIGINT or SIGTERM. Must be called inside a `LocalSet`.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    match &cfg.secret_source {
        SecretSource::Generated(p) => tracing::info!(file = %p.display(), "using the shared secret in this file (generated if it was missing)"),
        SecretSource::File(p) => tracing::info!(file = %p.display(), secrets = cfg.secrets.len(), "shared secrets loaded"),
        SecretSource::Inline => tracing::info!(secrets = cfg.secrets.len(), "shared secrets from the config"),
        SecretSource::None => tracing::info!("no shared secret: static users only"),
    }
    let certs = match &cfg.tls {
        Some(t) => Some(tls::CertStore::load(&t.cert, &t.key).context("tls")?),
        None => None,
    };
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    let mut bound = Vec::new();
    for l in &cfg.listeners {
        match l.transport {
            Transport::Udp => {
                let s = bind_udp(l.address)?;
                bound.push(format!("udp {}", s.local_addr()?));
                udp.push(Rc::new(s));
            }
            Transport::Tcp | Transport::Tls => {
                let s = bind_tcp(l.address)?;
                bound.push(format!("{} {}", l.transport.label(), s.local_addr()?));
                tcp.push((s, l.clone()));
            }
        }
    }
    if udp.is_empty() && tcp.is_empty() {
        anyhow::bail!("listen: no listener configured");
    }
    let relays = RelaySockets::new(cfg.relay_v4.map(|r| r.local), cfg.relay_v6.map(|r| r.local), cfg.ports);
    let shard = Rc::new_cyclic(|this| {
        RefCell::new(Shard {
            server: build_server(&cfg),
            relays,
            udp: udp.clone(),
            streams: Vec::new(),
            free_streams: Vec::new(),
            stream_count: 0,
            per_ip: HashMap::new(),
            rx: vec![0u8; MAX_DATAGRAM].into_boxed_slice(),
            tx: vec![0u8; MAX_DATAGRAM + OUT_HEADROOM].into_boxed_slice(),
            send_failures: 0,
            this: this.clone(),
        })
    });
    for (i, s) in udp.iter().enumerate() {
        tokio::task::spawn_local(udp::listener_loop(Rc::downgrade(&shard), i as u32, s.clone()));
    }
    let tls_config = match &certs {
        Some(c) => Some(c.server_config()?),
        None => None,
    };
    for (listener, l) in tcp {
        let acceptor = match l.transport {
            Transport::Tls => tls_config.clone().map(tokio_rustls::TlsAcceptor::from),
            _ => None,
        };
        let limits = StreamLimits {
            max_total: cfg.max_connections,
            max_per_ip: cfg.max_connections_per_ip,
            handshake: Duration::from_secs(cfg.tls_handshake_timeout as u64),
            idle: Duration::from_secs(cfg.idle_timeout as u64),
        };
        tokio::task::spawn_local(accept_loop(Rc::downgrade(&shard), listener, l, acceptor, limits));
    }
    if let Some(certs) = certs.clone() {
        // Certificates renewed on disk (certbot, Caddy) are picked up without a restart.
        tokio::task::spawn_local(async move {
            let mut iv = tokio::time::interval(Duration::from_secs(5));
            loop {
                iv.tick().await;
                match certs.reload_if_changed() {
                    Some(Ok(())) => tracing::info!("TLS certificate reloaded (files changed)"),
                    Some(Err(e)) => tracing::warn!("TLS certificate not reloaded, keeping the old one: {e:#}"),
                    None => {}
                }
            }
        });
    }
    let ticker = Rc::downgrade(&shard);
    tokio::task::spawn_local(async move {
        let mut iv = tokio::time::interval(Duration::from_secs(1));
        loop {
            iv.tick().await;
            let Some(s) = ticker.upgrade() else { return };
            s.borrow_mut().tick();
        }
    });
    tracing::info!(
        listeners = ?bound,
        relay_v4 = ?cfg.relay_v4.map(|r| (r.local, r.external)),
        relay_v6 = ?cfg.relay_v6.map(|r| (r.local, r.external)),
        ports = %format!("{}-{}", cfg.ports.0, cfg.ports.1),
        realm = %cfg.realm,
        "turnd ready"
    );
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                if let Some(c) = &certs {
                    match c.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                        Err(e) => tracing::warn!("SIGHUP: TLS certificate not reloaded, keeping the old one: {e:#}"),
                    }
                }
            }
        }
    }
    tracing::info!(allocations = shard.borrow().server.allocation_count(), "shutting down");
    Ok(())
}
