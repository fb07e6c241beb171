//! The I/O layer: sockets around the sans-IO core.
//!
//! One thread runs a tokio current-thread runtime. A [`Shard`] owns the core
//! [`Server`], the client-facing sockets and the relay sockets; tasks for each
//! socket wait for readiness, then borrow the shard and drain what is queued
//! with non-blocking calls. Nothing is awaited while the shard is borrowed,
//! and packets are handled in shard-owned buffers: no allocation per packet.

pub mod relay;
mod udp;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::UdpSocket;

use crate::auth::{Authenticator, NonceKey};
use crate::config::{Config, SecretSource};
use crate::turn::{Event, FiveTuple, Now, Output, RelayId, Server, Transport};
use relay::RelaySockets;

/// Largest datagram handled; larger ones are truncated by the kernel and dropped.
pub const MAX_DATAGRAM: usize = 65_535;
/// Room for the Data indication header added around peer data.
const OUT_HEADROOM: usize = 64;

pub struct Shard {
    pub server: Server,
    pub relays: RelaySockets,
    udp: Vec<Rc<UdpSocket>>,
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
                Transport::Tcp | Transport::Tls => {}
            }
        }
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
    let mut udp = Vec::new();
    let mut bound = Vec::new();
    for l in &cfg.listeners {
        match l.transport {
            Transport::Udp => {
                let s = bind_udp(l.address)?;
                bound.push(format!("udp {}", s.local_addr()?));
                udp.push(Rc::new(s));
            }
            Transport::Tcp | Transport::Tls => {
                tracing::warn!(address = %l.address, transport = l.transport.label(), "TCP/TLS listeners are not available in this build; skipped");
            }
        }
    }
    if udp.is_empty() {
        anyhow::bail!("listen: no usable listener configured");
    }
    let relays = RelaySockets::new(cfg.relay_v4.map(|r| r.local), cfg.relay_v6.map(|r| r.local), cfg.ports);
    let shard = Rc::new_cyclic(|this| {
        RefCell::new(Shard {
            server: build_server(&cfg),
            relays,
            udp: udp.clone(),
            rx: vec![0u8; MAX_DATAGRAM].into_boxed_slice(),
            tx: vec![0u8; MAX_DATAGRAM + OUT_HEADROOM].into_boxed_slice(),
            send_failures: 0,
            this: this.clone(),
        })
    });
    for (i, s) in udp.iter().enumerate() {
        tokio::task::spawn_local(udp::listener_loop(Rc::downgrade(&shard), i as u32, s.clone()));
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
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(allocations = shard.borrow().server.allocation_count(), "shutting down");
    Ok(())
}
