//! One TLS port for TURN and a web server: before the handshake, turnd
//! peeks at the ClientHello ([`super::sni`]); the TURN names, ALPN
//! `stun.turn`/`stun.nat-discovery` and clients without SNI get TURN over
//! TLS here, every other name is passed through untouched to the configured
//! backend, optionally after a PROXY protocol header (v1 or v2) so the web
//! server sees the client's address. Buffers are bounded (one record to
//! peek, 16 KiB each way to copy); the connection closes after the idle
//! timeout with no byte either way.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::sni::{self, Hello, Peeked, MAX_HELLO};
use crate::config::{Passthrough, ProxyHeader};

const COPY_CHUNK: usize = 16 * 1024;

/// Whether `hello` goes to the backend rather than to TURN here.
pub fn to_backend(p: &Passthrough, hello: &Hello) -> bool {
    if hello.alpn.iter().any(|a| super::tls::ALPN.contains(&a.as_slice())) {
        return false;
    }
    match &hello.server_name {
        None => false,
        Some(n) => !p.turn_names.iter().any(|t| t == n),
    }
}

/// Peeks (does not consume) until the first record holds a whole
/// ClientHello, within `timeout`.
pub async fn peek_hello(tcp: &TcpStream, timeout: Duration) -> std::io::Result<Hello> {
    let mut buf = vec![0u8; MAX_HELLO];
    super::peek::peek_until(tcp, &mut buf, timeout, |b| match sni::parse(b) {
        Ok(Peeked::Hello(h)) => super::peek::Peeked::Done(h),
        Ok(Peeked::Incomplete) => super::peek::Peeked::More,
        Err(_) => super::peek::Peeked::Invalid,
    })
    .await
}

/// The PROXY protocol header naming `client` -> `local` (IPv4 written as
/// IPv4 unless the other side is IPv6, then both IPv6).
pub fn proxy_header(kind: ProxyHeader, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (c, l) = (client.ip().to_canonical(), local.ip().to_canonical());
    let (c, l) = match (c, l) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (IpAddr::V4(a), IpAddr::V4(b)),
        (a, b) => (IpAddr::V6(v6(a)), IpAddr::V6(v6(b))),
    };
    match kind {
        ProxyHeader::None => Vec::new(),
        ProxyHeader::V1 => {
            let fam = if c.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {fam} {c} {l} {} {}\r\n", client.port(), local.port()).into_bytes()
        }
        ProxyHeader::V2 => {
            let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            h.push(0x21); // version 2, PROXY
            let (fam, addrs): (u8, Vec<u8>) = match (c, l) {
                (IpAddr::V4(a), IpAddr::V4(b)) => (0x11, [a.octets(), b.octets()].concat()),
                _ => (0x21, [v6(c).octets(), v6(l).octets()].concat()),
            };
            h.push(fam);
            h.extend(((addrs.len() + 4) as u16).to_be_bytes());
            h.extend(addrs);
            h.extend(client.port().to_be_bytes());
            h.extend(local.port().to_be_bytes());
            h
        }
    }
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Connects to the backend (within `connect_timeout`), sends the PROXY
/// header, then copies both ways until both sides close or nothing moves
/// for `idle`.
pub async fn serve(client: TcpStream, peer: SocketAddr, local: SocketAddr, p: &Passthrough, connect_timeout: Duration) -> std::io::Result<()> {
    let mut backend = tokio::time::timeout(connect_timeout, TcpStream::connect(p.backend))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = backend.set_nodelay(true);
    let header = proxy_header(p.proxy_header, peer, local);
    if !header.is_empty() {
        backend.write_all(&header).await?;
    }
    let idle = Duration::from_secs(p.idle_timeout as u64);
    let last = Cell::new(Instant::now());
    let (mut cr, mut cw) = client.into_split();
    let (mut br, mut bw) = backend.into_split();
    let up = pump(&mut cr, &mut bw, &last);
    let down = pump(&mut br, &mut cw, &last);
    let both = async { tokio::try_join!(up, down).map(drop) };
    let watchdog = async {
        loop {
            let until = last.get() + idle;
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    };
    tokio::select! {
        r = both => r,
        _ = watchdog => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Copies `from` to `to` until `from` ends, then half-closes `to`.
async fn pump<R, W>(from: &mut R, to: &mut W, last: &Cell<Instant>) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_CHUNK];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        last.set(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Passthrough {
        Passthrough {
            turn_names: vec!["turn.example".into()],
            backend: "127.0.0.1:8443".parse().unwrap(),
            proxy_header: ProxyHeader::V2,
            idle_timeout: 600,
        }
    }

    fn hello(name: Option<&str>, alpn: &[&str]) -> Hello {
        Hello { server_name: name.map(String::from), alpn: alpn.iter().map(|a| a.as_bytes().to_vec()).collect() }
    }

    #[test]
    fn routes_by_name_and_alpn() {
        let p = route();
        assert!(to_backend(&p, &hello(Some("web.example"), &["h2", "http/1.1"])));
        assert!(!to_backend(&p, &hello(Some("turn.example"), &[])));
        assert!(!to_backend(&p, &hello(None, &["h2"])), "no SNI: TURN");
        assert!(!to_backend(&p, &hello(Some("web.example"), &["stun.turn"])), "ALPN stun.turn: TURN");
    }

    #[test]
    fn proxy_headers_parse_back() {
        let c: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let l: SocketAddr = "203.0.113.1:443".parse().unwrap();
        for kind in [ProxyHeader::V1, ProxyHeader::V2] {
            let h = proxy_header(kind, c, l);
            assert_eq!(crate::net::stream::proxy::parse(&h), Ok(crate::net::stream::proxy::Parsed::Done { len: h.len(), source: Some(c) }), "{kind:?}");
        }
        let c6: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let h = proxy_header(ProxyHeader::V2, c6, l);
        assert_eq!(crate::net::stream::proxy::parse(&h), Ok(crate::net::stream::proxy::Parsed::Done { len: h.len(), source: Some(c6) }));
        assert_eq!(proxy_header(ProxyHeader::V1, "[::ffff:198.51.100.7]:1".parse().unwrap(), l), b"PROXY TCP4 198.51.100.7 203.0.113.1 1 443\r\n");
        assert!(proxy_header(ProxyHeader::None, c, l).is_empty());
    }
}
