//! A small synchronous TURN client (RFC 8656) over UDP, TCP or TLS, built on
//! our codec: Binding, Allocate with long-term credentials (401 challenge,
//! 438 stale nonce), CreatePermission, Send and Data indications, Refresh.
//! One client is one 5-tuple, so at most one allocation. Every call is
//! bounded by the client's timeout. TCP and TLS can go through an HTTP
//! proxy ([`Client::connect_via`], `proxy.rs`). `turnctl check` uses it; so may a load
//! generator.

pub mod cert;
pub mod proxy;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use crate::stun::integrity::long_term_key;
use crate::stun::{attr, frame_len, method, Class, FrameLen, Message, MessageWriter};
pub use crate::turn::Transport;

/// Largest message this client writes or reads (a STUN header plus a bit
/// more than an Ethernet MTU of data).
const BUF: usize = 2048;
/// First UDP retransmission after this; doubled each time (RFC 8489 6.2.1 uses 500 ms).
const FIRST_RTO: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no answer within {}", fmt_duration(*.0))]
    Timeout(Duration),
    #[error("no TCP connection within {}", fmt_duration(*.0))]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    /// 401 to a request that carried credentials: the relay does not accept them.
    #[error("401 Unauthorized: the relay refused the credentials")]
    Unauthorized,
    #[error("{code} {reason}")]
    Response { code: u16, reason: String },
    #[error("the relay closed the connection")]
    Closed,
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// The HTTP proxy answered CONNECT with something other than 2xx.
    #[error("the proxy {proxy} refused CONNECT {target}: {status} {reason}")]
    ProxyRefused { proxy: String, target: String, status: u16, reason: String },
    /// The HTTP proxy could not be reached or did not speak HTTP.
    #[error("proxy {0}")]
    Proxy(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `3 s`, `500 ms`.
pub fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{} s", d.as_secs()) } else { format!("{} ms", d.as_millis()) }
}

/// TURN REST credentials (or any long-term username and password).
#[derive(Clone, Debug)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// What a successful Allocate returned.
#[derive(Clone, Copy, Debug)]
pub struct Allocation {
    pub relayed: SocketAddr,
    pub mapped: Option<SocketAddr>,
    pub lifetime: u32,
}

/// How to reach the server over TLS.
#[derive(Clone, Debug)]
pub struct TlsTarget {
    pub config: Arc<rustls::ClientConfig>,
    /// SNI and the name the certificate is verified for.
    pub name: ServerName<'static>,
}

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

pub struct Client {
    conn: Conn,
    /// Bytes read from a stream but not yet framed.
    rx: Vec<u8>,
    timeout: Duration,
    creds: Option<Credentials>,
    realm: Option<String>,
    nonce: Option<Vec<u8>>,
    key: Option<[u8; 16]>,
    /// Data indications that arrived while waiting for a response.
    data: VecDeque<(SocketAddr, Vec<u8>)>,
}

fn random_tid() -> [u8; 12] {
    let mut t = [0u8; 12];
    getrandom::fill(&mut t).expect("the OS random generator is available");
    t
}

/// The rustls error inside an I/O error from a TLS stream, if any.
fn tls_error(e: io::Error) -> Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => Error::Tls(t.clone()),
        None => Error::Io(e),
    }
}

impl Client {
    /// Opens a 5-tuple to `server`: a connected UDP socket, or a TCP
    /// connection (with a completed TLS handshake when `transport` is TLS).
    pub fn connect(transport: Transport, server: SocketAddr, timeout: Duration, tls: Option<&TlsTarget>) -> Result<Client> {
        let conn = match transport {
            Transport::Udp => {
                let local: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
                let s = UdpSocket::bind(local)?;
                // Connected: ICMP errors (port unreachable) come back as ECONNREFUSED.
                s.connect(server)?;
                Conn::Udp(s)
            }
            Transport::Tcp | Transport::Tls => {
                let s = TcpStream::connect_timeout(&server, timeout).map_err(|e| match e.kind() {
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Error::ConnectTimeout(timeout),
                    _ => Error::Io(e),
                })?;
                over_stream(transport, s, timeout, tls)?
            }
        };
        Ok(Client::new(conn, timeout))
    }

    /// Like [`Client::connect`] over TCP or TLS, through an HTTP proxy: a
    /// CONNECT tunnel to `host:port` (the proxy resolves `host`), then TURN
    /// (or the TLS handshake and TURN) inside it. UDP cannot go through a
    /// proxy: asking for it is an error.
    pub fn connect_via(
        proxy: &proxy::HttpProxy,
        transport: Transport,
        host: &str,
        port: u16,
        timeout: Duration,
        tls: Option<&TlsTarget>,
    ) -> Result<Client> {
        if transport == Transport::Udp {
            return Err(Error::Protocol("UDP cannot go through an HTTP proxy".into()));
        }
        let s = proxy.connect(host, port, timeout)?;
        Ok(Client::new(over_stream(transport, s, timeout, tls)?, timeout))
    }

    fn new(conn: Conn, timeout: Duration) -> Client {
        Client {
            conn,
            rx: Vec::new(),
            timeout,
            creds: None,
            realm: None,
            nonce: None,
            key: None,
            data: VecDeque::new(),
        }
    }

    /// The credentials for requests that need them (Allocate, Refresh,
    /// CreatePermission). Replacing them keeps the realm and nonce.
    pub fn set_credentials(&mut self, creds: Credentials) {
        self.key = self.realm.as_deref().map(|r| long_term_key(&creds.username, r, &creds.password));
        self.creds = Some(creds);
    }

    /// The longest wait for each answer from now on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The negotiated TLS version and ALPN protocol, for TLS clients.
    pub fn tls_info(&self) -> Option<(String, Option<String>)> {
        match &self.conn {
            Conn::Tls(s) => Some((
                s.conn.protocol_version().map(|v| format!("{v:?}").replace('_', ".")).unwrap_or_default(),
                s.conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
            )),
            _ => None,
        }
    }

    /// STUN Binding: our address as the server sees it.
    pub fn binding(&mut self) -> Result<SocketAddr> {
        let resp = self.request(method::BINDING, false, &|_| {})?;
        let m = parse(&resp)?;
        m.get(attr::XOR_MAPPED_ADDRESS)
            .and_then(|v| attr::decode_xor_address(v, m.transaction_id()))
            .ok_or_else(|| Error::Protocol("Binding response without XOR-MAPPED-ADDRESS".into()))
    }

    /// Allocate a UDP relay with the credentials set before.
    pub fn allocate(&mut self) -> Result<Allocation> {
        let resp = self.request(method::ALLOCATE, true, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        })?;
        let m = parse(&resp)?;
        let tid = m.transaction_id();
        let relayed = m
            .get(attr::XOR_RELAYED_ADDRESS)
            .and_then(|v| attr::decode_xor_address(v, tid))
            .ok_or_else(|| Error::Protocol("Allocate response without XOR-RELAYED-ADDRESS".into()))?;
        let mapped = m.get(attr::XOR_MAPPED_ADDRESS).and_then(|v| attr::decode_xor_address(v, tid));
        let lifetime = m.get(attr::LIFETIME).and_then(attr::decode_u32).unwrap_or(0);
        Ok(Allocation { relayed, mapped, lifetime })
    }

    /// Installs a permission for `peer`'s IP address.
    pub fn create_permission(&mut self, peer: SocketAddr) -> Result<()> {
        self.request(method::CREATE_PERMISSION, true, &|w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })
        .map(drop)
    }

    /// Refreshes the allocation; `0` deletes it.
    pub fn refresh(&mut self, lifetime: u32) -> Result<u32> {
        let resp = self.request(method::REFRESH, true, &|w| {
            w.u32(attr::LIFETIME, lifetime);
        })?;
        Ok(parse(&resp)?.get(attr::LIFETIME).and_then(attr::decode_u32).unwrap_or(0))
    }

    /// Sends `data` to `peer` through the relay (a Send indication; no answer).
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) -> Result<()> {
        let tid = random_tid();
        let mut buf = [0u8; BUF];
        let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, &tid);
        w.xor_address(attr::XOR_PEER_ADDRESS, peer).attr(attr::DATA, data).fingerprint();
        let n = w.finish().map_err(|_| Error::Protocol("data too large for one message".into()))?;
        self.send(&buf[..n])
    }

    /// The next Data indication: (peer, data), waiting at most `wait`.
    pub fn recv_data(&mut self, wait: Duration) -> Result<(SocketAddr, Vec<u8>)> {
        if let Some(d) = self.data.pop_front() {
            return Ok(d);
        }
        let deadline = Instant::now() + wait;
        loop {
            let msg = self.recv(deadline).map_err(|e| match e {
                Error::Timeout(_) => Error::Timeout(wait),
                e => e,
            })?;
            if let Some(d) = data_indication(&msg) {
                return Ok(d);
            }
        }
    }

    /// Sends a request and returns the final response (success, or an
    /// error other than the 401 challenge and one 438 retry).
    fn request(&mut self, method: u16, auth: bool, add: &dyn Fn(&mut MessageWriter)) -> Result<Vec<u8>> {
        let mut signed = false;
        let mut stale = 0;
        loop {
            let tid = random_tid();
            let mut buf = [0u8; BUF];
            let mut w = MessageWriter::new(&mut buf, method, Class::Request, &tid);
            add(&mut w);
            let mut key = None;
            if auth && let (Some(c), Some(realm), Some(nonce), Some(k)) = (&self.creds, &self.realm, &self.nonce, self.key) {
                w.attr(attr::USERNAME, c.username.as_bytes()).attr(attr::REALM, realm.as_bytes()).attr(attr::NONCE, nonce).integrity(&k);
                key = Some(k);
            }
            w.fingerprint();
            let n = w.finish().map_err(|_| Error::Protocol("request too large".into()))?;
            let resp = self.transact(&buf[..n], &tid)?;
            let m = parse(&resp)?;
            if m.class() == Class::Success {
                if let Some(k) = key
                    && !m.verify(&k)
                {
                    return Err(Error::Protocol("response MESSAGE-INTEGRITY does not match the credentials".into()));
                }
                return Ok(resp);
            }
            let (code, reason) = m
                .get(attr::ERROR_CODE)
                .and_then(attr::decode_error_code)
                .map(|(c, r)| (c, r.to_owned()))
                .ok_or_else(|| Error::Protocol("error response without ERROR-CODE".into()))?;
            let challenge = || -> Option<(String, Vec<u8>)> {
                let realm = m.get(attr::REALM).and_then(|v| attr::decode_str(v, 763))?;
                Some((realm.to_owned(), m.get(attr::NONCE)?.to_vec()))
            };
            match code {
                401 if auth && key.is_none() && !signed && self.creds.is_some() => {
                    let (realm, nonce) = challenge().ok_or_else(|| Error::Protocol("401 without REALM and NONCE".into()))?;
                    self.learn(realm, nonce);
                    signed = true;
                }
                401 if key.is_some() => return Err(Error::Unauthorized),
                438 if auth && stale < 2 => {
                    let (realm, nonce) = challenge().ok_or_else(|| Error::Protocol("438 without REALM and NONCE".into()))?;
                    self.learn(realm, nonce);
                    stale += 1;
                }
                _ => return Err(Error::Response { code, reason }),
            }
        }
    }

    fn learn(&mut self, realm: String, nonce: Vec<u8>) {
        if let Some(c) = &self.creds {
            self.key = Some(long_term_key(&c.username, &realm, &c.password));
        }
        self.realm = Some(realm);
        self.nonce = Some(nonce);
    }

    /// Sends `req` and waits for the response with its transaction ID,
    /// retransmitting over UDP (250 ms, doubling) until the timeout.
    fn transact(&mut self, req: &[u8], tid: &[u8; 12]) -> Result<Vec<u8>> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut rto = FIRST_RTO;
        let mut resend = start + rto;
        self.send(req)?;
        loop {
            let udp = matches!(self.conn, Conn::Udp(_));
            let until = if udp { resend.min(deadline) } else { deadline };
            match self.recv(until) {
                Ok(msg) => {
                    if let Some(d) = data_indication(&msg) {
                        self.data.push_back(d);
                        continue;
                    }
                    match Message::parse(&msg) {
                        Ok(m) if m.transaction_id() == tid && matches!(m.class(), Class::Success | Class::Error) => return Ok(msg),
                        _ => continue,
                    }
                }
                Err(Error::Timeout(_)) if udp && Instant::now() < deadline => {
                    rto *= 2;
                    resend = Instant::now() + rto;
                    self.send(req)?;
                }
                Err(Error::Timeout(_)) => return Err(Error::Timeout(self.timeout)),
                Err(e) => return Err(e),
            }
        }
    }

    fn send(&mut self, msg: &[u8]) -> Result<()> {
        match &mut self.conn {
            Conn::Udp(s) => s.send(msg).map(drop).map_err(Error::Io),
            Conn::Tcp(s) => s.write_all(msg).map_err(Error::Io),
            Conn::Tls(s) => s.write_all(msg).and_then(|_| s.flush()).map_err(tls_error),
        }
    }

    /// One whole message (STUN or ChannelData), by `deadline`.
    fn recv(&mut self, deadline: Instant) -> Result<Vec<u8>> {
        loop {
            if let Conn::Udp(_) = self.conn {
            } else {
                match frame_len(&self.rx) {
                    FrameLen::Complete(n) => return Ok(self.rx.drain(..n).collect()),
                    FrameLen::Invalid => return Err(Error::Protocol("the stream carries neither STUN nor ChannelData".into())),
                    FrameLen::Incomplete => {}
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(self.timeout));
            }
            // A zero read timeout means "block forever" to the OS: keep a floor.
            let left = Some(left.max(Duration::from_millis(1)));
            let mut buf = [0u8; BUF];
            let r = match &mut self.conn {
                Conn::Udp(s) => s.set_read_timeout(left).and_then(|_| s.recv(&mut buf)),
                Conn::Tcp(s) => s.set_read_timeout(left).and_then(|_| s.read(&mut buf)),
                Conn::Tls(s) => s.sock.set_read_timeout(left).and_then(|_| s.read(&mut buf)),
            };
            match r {
                Ok(0) if !matches!(self.conn, Conn::Udp(_)) => return Err(Error::Closed),
                Ok(n) => {
                    if let Conn::Udp(_) = self.conn {
                        return Ok(buf[..n].to_vec());
                    }
                    self.rx.extend_from_slice(&buf[..n]);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(Error::Closed),
                Err(e) => return Err(tls_error(e)),
            }
        }
    }
}

/// A connected TCP stream as a TURN connection: as is for TCP, after a
/// completed TLS handshake (within `timeout`) for TLS.
fn over_stream(transport: Transport, mut s: TcpStream, timeout: Duration, tls: Option<&TlsTarget>) -> Result<Conn> {
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(timeout))?;
    if transport != Transport::Tls {
        return Ok(Conn::Tcp(s));
    }
    let t = tls.ok_or_else(|| Error::Protocol("TLS without a TLS configuration".into()))?;
    let mut c = rustls::ClientConnection::new(t.config.clone(), t.name.clone()).map_err(Error::Tls)?;
    let deadline = Instant::now() + timeout;
    while c.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout(timeout));
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match c.complete_io(&mut s) {
            Ok((0, 0)) if c.is_handshaking() => return Err(Error::Closed),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(Error::Timeout(timeout));
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(Error::Closed),
            Err(e) => return Err(tls_error(e)),
        }
    }
    Ok(Conn::Tls(Box::new(rustls::StreamOwned::new(c, s))))
}

fn parse(buf: &[u8]) -> Result<Message<'_>> {
    Message::parse(buf).map_err(|e| Error::Protocol(format!("malformed STUN message: {e}")))
}

fn data_indication(buf: &[u8]) -> Option<(SocketAddr, Vec<u8>)> {
    let m = Message::parse(buf).ok()?;
    if m.method() != method::DATA || m.class() != Class::Indication {
        return None;
    }
    let peer = attr::decode_xor_address(m.get(attr::XOR_PEER_ADDRESS)?, m.transaction_id())?;
    Some((peer, m.get(attr::DATA)?.to_vec()))
}

/// A plain UDP socket standing where a peer (a videobridge) stands: it
/// learns its own address as the relay sees it (a STUN Binding to the
/// relay's UDP listener) and sends datagrams straight to relayed addresses,
/// from outside the relay, as media from a videobridge arrives.
pub struct UdpPeer {
    sock: UdpSocket,
    timeout: Duration,
}

impl UdpPeer {
    /// An unconnected socket of `toward`'s address family on any port.
    pub fn bind(toward: SocketAddr, timeout: Duration) -> Result<UdpPeer> {
        let local: SocketAddr = if toward.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
        Ok(UdpPeer { sock: UdpSocket::bind(local)?, timeout })
    }

    /// This socket's address as `server` sees it (STUN Binding,
    /// retransmitted from 250 ms, doubling, until the timeout).
    pub fn binding(&self, server: SocketAddr) -> Result<SocketAddr> {
        let tid = random_tid();
        let mut req = [0u8; 64];
        let mut w = MessageWriter::new(&mut req, method::BINDING, Class::Request, &tid);
        w.fingerprint();
        let n = w.finish().map_err(|_| Error::Protocol("request too large".into()))?;
        let deadline = Instant::now() + self.timeout;
        let mut rto = FIRST_RTO;
        let mut buf = [0u8; BUF];
        loop {
            self.sock.send_to(&req[..n], server)?;
            let resend = (Instant::now() + rto).min(deadline);
            rto *= 2;
            loop {
                let left = resend.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                self.sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                match self.sock.recv_from(&mut buf) {
                    Ok((len, from)) if from == server => {
                        let Ok(m) = Message::parse(&buf[..len]) else { continue };
                        if m.transaction_id() != &tid || m.class() != Class::Success {
                            continue;
                        }
                        return m
                            .get(attr::XOR_MAPPED_ADDRESS)
                            .and_then(|v| attr::decode_xor_address(v, m.transaction_id()))
                            .ok_or_else(|| Error::Protocol("Binding response without XOR-MAPPED-ADDRESS".into()));
                    }
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
                    Err(e) => return Err(Error::Io(e)),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(self.timeout));
            }
        }
    }

    /// One datagram to `to`, straight from this socket.
    pub fn send_to(&self, to: SocketAddr, data: &[u8]) -> Result<()> {
        self.sock.send_to(data, to).map(drop).map_err(Error::Io)
    }
}
