//! Small blocking TURN clients over real sockets (UDP, TCP, TLS), built on
//! our codec and the core harness's types, for tests against a real turnd.
//! Every wait is bounded. Include next to the harness:
//!
//! ```ignore
//! #[path = "common/core.rs"] mod harness;
//! #[path = "common/wire.rs"] mod wire;
//! ```
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::{transport_udp, Creds, Resp, A};
use turnd::auth::rest_password;
use turnd::stun::integrity::long_term_key;
use turnd::stun::{attr, frame_len, method, ChannelData, Class, FrameLen, Message};

pub use crate::harness::build;

pub fn peer_at(a: SocketAddr) -> A {
    A::Addr(attr::XOR_PEER_ADDRESS, a)
}

pub fn data(d: &[u8]) -> A {
    A::Raw(attr::DATA, d.to_vec())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// REST credentials for `user` under `secret`, from a 401 answer.
pub fn rest_creds(challenge: &Resp, user: &str, secret: &str) -> Creds {
    assert_eq!(challenge.code(), Some(401), "expected a challenge");
    let username = format!("{}:{user}", unix_now() + 3600);
    let realm = String::from_utf8(challenge.get(attr::REALM).unwrap()).unwrap();
    let password = rest_password(secret.as_bytes(), &username);
    Creds { key: long_term_key(&username, &realm, &password), username, nonce: challenge.get(attr::NONCE).unwrap(), realm, sha256: false }
}

/// What a client receives besides responses.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Data { peer: SocketAddr, data: Vec<u8> },
    Channel { number: u16, data: Vec<u8> },
}

fn incoming(b: &[u8]) -> Option<Incoming> {
    if let Some(cd) = ChannelData::parse(b) {
        return Some(Incoming::Channel { number: cd.channel, data: cd.data.to_vec() });
    }
    let m = Message::parse(b).ok()?;
    if m.method() == method::DATA && m.class() == Class::Indication {
        let peer = attr::decode_xor_address(m.get(attr::XOR_PEER_ADDRESS)?, m.transaction_id())?;
        return Some(Incoming::Data { peer, data: m.get(attr::DATA)?.to_vec() });
    }
    None
}

fn tid_for(salt: u32, n: u64) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..4].copy_from_slice(&salt.to_be_bytes());
    t[4..].copy_from_slice(&n.to_be_bytes());
    t
}

/// A TURN client over UDP: one socket, so at most one allocation.
pub struct UdpClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub creds: Option<Creds>,
    tid: u64,
    salt: u32,
}

impl UdpClient {
    pub fn new(bind_ip: &str, server: SocketAddr) -> Self {
        let sock = UdpSocket::bind((bind_ip, 0)).unwrap();
        let salt = sock.local_addr().unwrap().port() as u32 ^ std::process::id().rotate_left(16);
        UdpClient { sock, server, creds: None, tid: 0, salt }
    }

    pub fn next_tid(&mut self) -> [u8; 12] {
        self.tid += 1;
        tid_for(self.salt, self.tid)
    }

    /// Sends a request (signed once credentials are known), retransmitting
    /// every 200 ms for up to 5 s; returns the response.
    pub fn transact(&mut self, m: u16, attrs: &[A]) -> Resp {
        let tid = self.next_tid();
        let req = build(m, Class::Request, tid, attrs, self.creds.as_ref(), false);
        let mut buf = vec![0u8; 70_000];
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            self.sock.send_to(&req, self.server).unwrap();
            let until = (Instant::now() + Duration::from_millis(200)).min(deadline);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                self.sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
                let Ok((n, _)) = self.sock.recv_from(&mut buf) else { break };
                if Message::parse(&buf[..n]).is_ok_and(|m| *m.transaction_id() == tid) {
                    return Resp { bytes: buf[..n].to_vec() };
                }
            }
        }
        panic!("no answer to {m:#x} from {} within 5 s", self.server);
    }

    /// 401, then an authenticated Allocate with REST credentials; the relayed address.
    pub fn allocate(&mut self, user: &str, secret: &str) -> SocketAddr {
        let r = self.try_allocate(user, secret);
        assert_eq!(r.class(), Class::Success, "allocate: {:?}", r.code());
        r.addr(attr::XOR_RELAYED_ADDRESS).unwrap()
    }

    /// 401, then an authenticated Allocate with REST credentials; its answer, whatever it is.
    pub fn try_allocate(&mut self, user: &str, secret: &str) -> Resp {
        let r = self.transact(method::ALLOCATE, &[transport_udp()]);
        self.creds = Some(rest_creds(&r, user, secret));
        self.transact(method::ALLOCATE, &[transport_udp()])
    }

    pub fn send_indication(&mut self, peer: SocketAddr, d: &[u8]) {
        let tid = self.next_tid();
        let b = build(method::SEND, Class::Indication, tid, &[peer_at(peer), data(d)], None, false);
        self.sock.send_to(&b, self.server).unwrap();
    }

    pub fn send_channel(&self, number: u16, d: &[u8]) {
        let mut b = ChannelData::header(number, d.len()).to_vec();
        b.extend_from_slice(d);
        self.sock.send_to(&b, self.server).unwrap();
    }

    /// The next Data indication or ChannelData within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Incoming> {
        let until = Instant::now() + timeout;
        let mut buf = vec![0u8; 70_000];
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            self.sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            let Ok((n, _)) = self.sock.recv_from(&mut buf) else { return None };
            if let Some(i) = incoming(&buf[..n]) {
                return Some(i);
            }
        }
    }
}

/// Reads and writes with a deadline: what a stream client needs of its transport.
pub trait Stream: Read + Write + Send {
    fn set_timeout(&mut self, d: Duration);
}

impl Stream for TcpStream {
    fn set_timeout(&mut self, d: Duration) {
        self.set_read_timeout(Some(d.max(Duration::from_millis(1)))).unwrap();
    }
}

impl Stream for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn set_timeout(&mut self, d: Duration) {
        self.sock.set_read_timeout(Some(d.max(Duration::from_millis(1)))).unwrap();
    }
}

/// A TURN client over TCP or TLS (RFC 8656 framing; ChannelData padded).
pub struct StreamClient {
    pub stream: Box<dyn Stream>,
    pub creds: Option<Creds>,
    buf: Vec<u8>,
    pending: std::collections::VecDeque<Incoming>,
    tid: u64,
    salt: u32,
}

impl StreamClient {
    pub fn tcp(server: SocketAddr) -> Self {
        let s = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
        s.set_nodelay(true).unwrap();
        Self::over(Box::new(s))
    }

    /// TLS without certificate checks (tests only), SNI "localhost".
    pub fn tls(server: SocketAddr) -> Self {
        let tcp = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
        tcp.set_nodelay(true).unwrap();
        let conn = rustls::ClientConnection::new(insecure_tls_config(), "localhost".try_into().unwrap()).unwrap();
        Self::over(Box::new(rustls::StreamOwned::new(conn, tcp)))
    }

    pub fn over(stream: Box<dyn Stream>) -> Self {
        static SALT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let salt = SALT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) ^ std::process::id().rotate_left(16);
        StreamClient { stream, creds: None, buf: Vec::new(), pending: Default::default(), tid: 0, salt }
    }

    fn read_frame(&mut self, until: Instant) -> Option<Vec<u8>> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let FrameLen::Complete(n) = frame_len(&self.buf) {
                return Some(self.buf.drain(..n).collect());
            }
            let left = until.checked_duration_since(Instant::now())?;
            self.stream.set_timeout(left);
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return None,
                Err(_) => return None,
            }
        }
    }

    pub fn transact_raw(&mut self, req: &[u8]) -> Resp {
        self.stream.write_all(req).unwrap();
        self.stream.flush().unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while let Some(f) = self.read_frame(until) {
            if Message::parse(&f).is_ok_and(|m| m.transaction_id()[..] == req[8..20]) {
                return Resp { bytes: f };
            }
            if let Some(i) = incoming(&f) {
                self.pending.push_back(i);
            }
        }
        panic!("no answer over the stream within 5 s");
    }

    pub fn transact(&mut self, m: u16, attrs: &[A]) -> Resp {
        self.tid += 1;
        let req = build(m, Class::Request, tid_for(self.salt, self.tid), attrs, self.creds.as_ref(), false);
        self.transact_raw(&req)
    }

    pub fn allocate(&mut self, user: &str, secret: &str) -> SocketAddr {
        let r = self.transact(method::ALLOCATE, &[transport_udp()]);
        self.creds = Some(rest_creds(&r, user, secret));
        let r = self.transact(method::ALLOCATE, &[transport_udp()]);
        assert_eq!(r.class(), Class::Success, "allocate: {:?}", r.code());
        r.addr(attr::XOR_RELAYED_ADDRESS).unwrap()
    }

    pub fn send_channel(&mut self, number: u16, d: &[u8]) {
        let mut b = ChannelData::header(number, d.len()).to_vec();
        b.extend_from_slice(d);
        b.resize((b.len() + 3) & !3, 0);
        self.stream.write_all(&b).unwrap();
        self.stream.flush().unwrap();
    }

    pub fn recv(&mut self, timeout: Duration) -> Option<Incoming> {
        if let Some(i) = self.pending.pop_front() {
            return Some(i);
        }
        let until = Instant::now() + timeout;
        loop {
            let f = self.read_frame(until)?;
            if let Some(i) = incoming(&f) {
                return Some(i);
            }
        }
    }
}

/// A rustls client configuration that accepts any certificate (tests only).
pub fn insecure_tls_config() -> Arc<rustls::ClientConfig> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AnyCert(Arc<CryptoProvider>);
    impl ServerCertVerifier for AnyCert {
        fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    Arc::new(cfg)
}
