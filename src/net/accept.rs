//! Accepting TCP and TLS connections: the PROXY header when configured,
//! SNI routing to a web server sharing port 443, the connection limits, the
//! TLS handshake; then the stream code serves the connection.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::shared::{ConnectionLimits, Held, Shared};
use super::passthrough;
use super::stream::{self, Host, StreamOut};
use crate::config::Config;
use crate::turn::FiveTuple;

#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    pub connections: ConnectionLimits,
    pub ipv6_prefix: u8,
    handshake: Duration,
    idle: Duration,
}

pub(super) async fn accept_loop<H: Host>(
    shard: Weak<RefCell<H>>,
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
        let Some((limits, passthrough)) = shard.upgrade().map(|s| {
            let s = s.borrow();
            (s.limits(), if tls.is_some() { s.passthrough() } else { None })
        }) else {
            return;
        };
        let shard = shard.clone();
        let tls = tls.clone();
        let proxy = l.proxy_protocol;
        let transport = l.transport;
        if proxy && !l.proxy_protocol_from.iter().any(|c| c.contains(peer.ip().to_canonical())) {
            // Only the configured load balancers may say who the client is.
            if let Some(sh) = shard.upgrade() {
                sh.borrow_mut().refused();
            }
            tracing::debug!(%peer, "connection closed: not from listen.proxy_protocol_from");
            continue;
        }
        // Counted from here until it closes: a connection still reading its
        // PROXY header or its ClientHello holds a descriptor too, and may
        // not eat the descriptor reserve or the per-IP limit meanwhile.
        let waits = proxy || passthrough.is_some();
        let Some(mut admission) = Admission::new(&shard, peer.ip(), if waits { Held::Waiting } else { Held::Connection }) else {
            continue;
        };
        tokio::task::spawn_local(async move {
            let client = if proxy {
                let source = match stream::proxy_source(&tcp, limits.handshake).await {
                    Ok(Some(src)) => src,
                    Ok(None) => peer,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "bad PROXY protocol header");
                        return;
                    }
                };
                // From now on counted as the client's, not the load balancer's.
                let held = if passthrough.is_some() { Held::Waiting } else { Held::Connection };
                if !admission.recount(&shard, source.ip(), held) {
                    return;
                }
                source
            } else {
                peer
            };
            let tcp = match &passthrough {
                Some(route) => match route_hello(&shard, tcp, client, local, route, &mut admission, limits.handshake).await {
                    Some(t) => t,
                    None => return,
                },
                None => tcp,
            };
            if admission.held != Held::Connection && !admission.recount(&shard, client.ip(), Held::Connection) {
                return;
            }
            stream::limit_kernel_unsent(&tcp);
            let Some(stale) = shard.upgrade().map(|s| s.borrow().stale()) else { return };
            let out = StreamOut::new(tls.is_some(), stale);
            let Some(conn) = shard.upgrade().map(|sh| sh.borrow_mut().opened(transport, out.clone())) else { return };
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
            // Counted until here.
            drop(admission);
        });
    }
}

/// With `[tls.passthrough]`: peeks at the ClientHello and, for a name that
/// is not TURN's, passes the connection to the backend (counted as such
/// by `admission`). Gives the connection back when TURN is to take it.
async fn route_hello<H: Host>(
    shard: &Weak<RefCell<H>>,
    tcp: tokio::net::TcpStream,
    client: SocketAddr,
    local: SocketAddr,
    route: &crate::config::Passthrough,
    admission: &mut Admission,
    timeout: Duration,
) -> Option<tokio::net::TcpStream> {
    let hello = match passthrough::peek_hello(&tcp, timeout).await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(%client, error = %e, "connection closed: no readable TLS ClientHello");
            if let Some(sh) = shard.upgrade() {
                sh.borrow_mut().handshake_failed();
            }
            return None;
        }
    };
    if !passthrough::to_backend(route, &hello) {
        return Some(tcp);
    }
    if !admission.recount(shard, client.ip(), Held::PassedThrough) {
        return None;
    }
    if let Err(e) = passthrough::serve(tcp, client, local, route, timeout).await {
        tracing::debug!(%client, backend = %route.backend, error = %e, "passed-through connection ended");
    }
    None
}

/// A TCP/TLS connection counted against the limits every shard shares
/// (total and per IP) and the descriptor budget, from its accept until
/// dropped, as whatever it holds meanwhile ([`Held`]).
struct Admission {
    shared: Arc<Shared>,
    key: IpAddr,
    held: Held,
}

impl Admission {
    /// None (the connection is to be closed) when a limit is reached; the
    /// shard counts the refusal.
    fn new<H: Host>(shard: &Weak<RefCell<H>>, source: IpAddr, held: Held) -> Option<Self> {
        let sh = shard.upgrade()?;
        let mut sh = sh.borrow_mut();
        let limits = sh.limits();
        let key = stream::per_ip_key(source, limits.ipv6_prefix);
        if !sh.shared().admit(key, limits.connections, held) {
            sh.refused();
            tracing::debug!(client = %source, "connection refused: connection limit reached");
            return None;
        }
        Some(Admission { shared: sh.shared().clone(), key, held })
    }

    /// Counts it as `held` from `source` instead (the PROXY header named
    /// the client, the ClientHello said where it goes); false (the
    /// connection is to be closed, still counted as before until dropped)
    /// when a limit is reached.
    fn recount<H: Host>(&mut self, shard: &Weak<RefCell<H>>, source: IpAddr, held: Held) -> bool {
        let Some(sh) = shard.upgrade() else { return false };
        let mut sh = sh.borrow_mut();
        let limits = sh.limits();
        let key = stream::per_ip_key(source, limits.ipv6_prefix);
        if !self.shared.recount(self.key, self.held, key, held, limits.connections) {
            sh.refused();
            tracing::debug!(client = %source, "connection refused: connection limit reached");
            return false;
        }
        self.key = key;
        self.held = held;
        true
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.shared.release(self.key, self.held);
    }
}

fn close_unused<H: Host>(shard: &Weak<RefCell<H>>, tuple: FiveTuple, handshake_failed: bool) {
    if let Some(sh) = shard.upgrade() {
        let mut sh = sh.borrow_mut();
        if handshake_failed {
            sh.handshake_failed();
        }
        sh.closed(tuple);
    }
}

impl From<&Config> for StreamLimits {
    fn from(cfg: &Config) -> Self {
        StreamLimits {
            connections: ConnectionLimits { max_total: cfg.max_connections, max_per_ip: cfg.max_connections_per_ip },
            ipv6_prefix: cfg.ipv6_prefix_per_ip,
            handshake: Duration::from_secs(cfg.tls_handshake_timeout as u64),
            idle: Duration::from_secs(cfg.idle_timeout as u64),
        }
    }
}

