//! Accepting TCP and TLS connections: the PROXY header when configured,
//! SNI routing to a web server sharing port 443, the connection limits, the
//! TLS handshake; then the stream code serves the connection.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::conn::{self, Host, StreamOut};
use super::passthrough;
use crate::net::shared::{Held, Shared};
use crate::turn::FiveTuple;

pub(in crate::net) async fn accept_loop<H: Host>(
    shard: Weak<RefCell<H>>,
    listener: Rc<TcpListener>,
    l: crate::config::Listener,
    is_tls: bool,
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
        let Some((limits, passthrough, tls, site)) = shard.upgrade().map(|s| {
            let s = s.borrow();
            if is_tls {
                (s.limits(), s.passthrough(), s.acceptor(), s.check_site())
            } else {
                (s.limits(), None, None, None)
            }
        }) else {
            return;
        };
        if is_tls && tls.is_none() {
            continue;
        }
        let shard = shard.clone();
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
                let source = match proxy_source(&tcp, limits.handshake).await {
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
            conn::limit_kernel_unsent(&tcp);
            let Some(stale) = shard.upgrade().map(|s| s.borrow().stale()) else { return };
            let out = StreamOut::new(tls.is_some(), stale);
            let Some(conn) = shard.upgrade().map(|sh| sh.borrow_mut().opened(transport, out.clone())) else { return };
            let tuple = FiveTuple { client, server: local, transport, conn };
            match tls {
                Some(acceptor) => match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(tls_stream)) if tls_stream.get_ref().1.alpn_protocol() == Some(super::tls::ACME_TLS_ALPN) => {
                        // The CA validated TLS-ALPN-01 with the handshake alone (RFC 8737 3).
                        tracing::debug!(%client, "ACME TLS-ALPN-01 validation connection");
                        let mut tls_stream = tls_stream;
                        let _ = tokio::time::timeout(limits.handshake, tokio::io::AsyncWriteExt::shutdown(&mut tls_stream)).await;
                        close_unused(&shard, tuple, false);
                    }
                    Ok(Ok(mut tls_stream)) if tls_stream.get_ref().1.alpn_protocol() == Some(super::https::ALPN) => {
                        if starts_with_stun(&mut tls_stream, limits.handshake).await {
                            // TURN from a browser's HTTP stack: Firefox behind
                            // an HTTP proxy offers its usual ALPN (h2, http/1.1).
                            conn::serve(shard, tls_stream, tuple, out, limits.idle).await
                        } else if let Some(site) = site {
                            // A browser: the check page, its credentials, /readyz.
                            let shared = shard.upgrade().map(|s| s.borrow().shared().clone());
                            let not_ready = move || shared.as_ref().and_then(|s| s.not_ready()).map(str::to_owned);
                            super::https::serve(tls_stream, client, site, not_ready, limits.handshake).await;
                            close_unused(&shard, tuple, false);
                        } else {
                            close_unused(&shard, tuple, false);
                        }
                    }
                    Ok(Ok(tls_stream)) => conn::serve(shard, tls_stream, tuple, out, limits.idle).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%client, error = %e, "TLS handshake failed");
                        close_unused(&shard, tuple, true);
                    }
                    Err(_) => {
                        tracing::debug!(%client, "TLS handshake timed out");
                        close_unused(&shard, tuple, true);
                    }
                },
                None => conn::serve(shard, tcp, tuple, out, limits.idle).await,
            }
            // Counted until here.
            drop(admission);
        });
    }
}

/// Whether the first plaintext of a TLS connection that negotiated
/// http/1.1 starts a STUN message (TURN) rather than an HTTP request. A
/// client's first TURN message is a STUN request, whose first byte is below
/// 0x40 (ChannelData, 0x40 to 0x4f, needs a channel bound first); every HTTP
/// request starts with a method name in capitals. Peeks without taking the
/// bytes (the TURN connection and hyper read them after); false when
/// nothing comes within `limit`.
async fn starts_with_stun(tls: &mut tokio_rustls::server::TlsStream<tokio::net::TcpStream>, limit: Duration) -> bool {
    let peek = async {
        loop {
            let (tcp, conn) = tls.get_mut();
            match std::io::BufRead::fill_buf(&mut conn.reader()) {
                Ok(b) => return b.first().is_some_and(|&first| first < 0x40),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
            if tcp.readable().await.is_err() {
                return false;
            }
            match conn.read_tls(&mut conn::TryIo(tcp)) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return false,
            }
            if conn.process_new_packets().is_err() {
                return false;
            }
        }
    };
    tokio::time::timeout(limit, peek).await.unwrap_or(false)
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
        let key = per_ip_key(source, limits.ipv6_prefix);
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
        let key = per_ip_key(source, limits.ipv6_prefix);
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

/// The key the per-IP connection limit counts by: an IPv4 address itself
/// (also when written IPv4-mapped), an IPv6 address cut to its first
/// `v6_prefix` bits, since one subscriber or host usually holds a whole /64.
pub fn per_ip_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = v6_prefix.min(128) as u32;
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
        v4 => v4,
    }
}

/// Where a connection came from, after an optional PROXY protocol header.
async fn proxy_source(tcp: &tokio::net::TcpStream, timeout: Duration) -> std::io::Result<Option<SocketAddr>> {
    use super::peek::{peek_until, Peeked};
    use super::proxy::{parse, Parsed, MAX_HEADER};
    let mut buf = [0u8; MAX_HEADER];
    let (len, source) = peek_until(tcp, &mut buf, timeout, |b| match parse(b) {
        Ok(Parsed::Done { len, source }) => Peeked::Done((len, source)),
        Ok(Parsed::Incomplete) => Peeked::More,
        _ => Peeked::Invalid,
    })
    .await?;
    // Consume exactly the header; what follows is TLS or STUN.
    let mut skip = vec![0u8; len];
    let mut got = 0;
    while got < len {
        tcp.readable().await?;
        match tcp.try_read(&mut skip[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::per_ip_key;
    use std::net::IpAddr;

    fn key(ip: &str, prefix: u8) -> IpAddr {
        per_ip_key(ip.parse().unwrap(), prefix)
    }

    #[test]
    fn ipv6_clients_count_by_prefix_and_ipv4_by_address() {
        // Every address of one /64 is one key; the next /64 is another.
        let a = key("2001:db8:1:2::1", 64);
        assert_eq!(a, key("2001:db8:1:2:ffff:ffff:ffff:ffff", 64));
        assert_eq!(a, key("2001:db8:1:2:abcd::9", 64));
        assert_eq!(a, "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(a, key("2001:db8:1:3::1", 64));
        // Other prefixes.
        assert_eq!(key("2001:db8:1:2::1", 56), key("2001:db8:1:ff::1", 56));
        assert_ne!(key("2001:db8:1:2::1", 56), key("2001:db8:1:100::1", 56));
        assert_ne!(key("2001:db8::1", 128), key("2001:db8::2", 128));
        // IPv4, also IPv4-mapped, stays per address.
        assert_eq!(key("198.51.100.7", 64), "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(key("::ffff:198.51.100.7", 64), key("198.51.100.7", 64));
        assert_ne!(key("198.51.100.7", 64), key("198.51.100.8", 64));
        assert_eq!(key("::1", 64), "::".parse::<IpAddr>().unwrap());
    }
}
