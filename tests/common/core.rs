//! Driving the sans-IO core directly: a fake relay-port provider, a
//! controlled clock, and a small client that builds requests with our writer.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use turnd::auth::{rest_password, Authenticator, NonceKey};
use turnd::stun::attr;
use turnd::stun::integrity::long_term_key;
use turnd::stun::{method, Class, Message, MessageWriter};
use turnd::turn::{Family, FiveTuple, Now, OpenError, Output, PeerPolicy, Placement, RelayAddr, RelayId, RelayPorts, Server, ServerConfig, Transport};

pub const SECRET: &[u8] = b"core-secret";
pub const REALM: &str = "example.org";
pub const UNIX0: u64 = 1_800_000_000;

/// Hands out sequential ports on 192.0.2.x-style relay addresses without sockets.
pub struct FakeRelays {
    pub next_port: u16,
    pub open: HashSet<RelayId>,
    pub exhausted: bool,
    pub last_even: bool,
    /// Whether the last socket opened was asked to set DF on all it sends.
    pub last_dont_fragment: bool,
    /// Refuse DONT-FRAGMENT, as a platform that cannot set DF would.
    pub no_dont_fragment: bool,
    pub reserved: HashSet<u16>,
}

impl RelayPorts for FakeRelays {
    fn open(&mut self, id: RelayId, family: Family, placement: Placement, dont_fragment: bool) -> Result<SocketAddr, OpenError> {
        if self.exhausted {
            return Err(OpenError::Exhausted);
        }
        if dont_fragment && self.no_dont_fragment {
            return Err(OpenError::DontFragmentUnsupported);
        }
        self.last_dont_fragment = dont_fragment;
        self.last_even = placement != Placement::Any;
        let port = match placement {
            Placement::Reserved(p) => {
                assert!(self.reserved.remove(&p), "claimed a port that was not reserved");
                p
            }
            // The socket an upgrade handed over for this port.
            Placement::Carried(p) => p,
            _ => {
                let mut port = self.next_port;
                if placement != Placement::Any && port % 2 == 1 {
                    port += 1;
                }
                self.next_port = port + 1;
                if placement == Placement::EvenReserveNext {
                    self.reserved.insert(port + 1);
                    self.next_port = port + 2;
                }
                port
            }
        };
        self.open.insert(id);
        let ip: IpAddr = match family {
            Family::V4 => "10.0.0.5".parse().unwrap(),
            Family::V6 => "2001:db8:5::5".parse().unwrap(),
        };
        Ok(SocketAddr::new(ip, port))
    }
    fn release(&mut self, _family: Family, port: u16) {
        assert!(self.reserved.remove(&port), "released a port that was not reserved");
    }
    fn close(&mut self, id: RelayId) {
        assert!(self.open.remove(&id), "closed a relay that was not open");
    }
}

pub struct Core {
    pub server: Server,
    pub relays: FakeRelays,
    pub now: Now,
    pub out: Vec<u8>,
    tid: u64,
}

pub fn tuple(port: u16) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new("198.51.100.7".parse().unwrap(), port),
        server: "192.0.2.10:3478".parse().unwrap(),
        transport: Transport::Udp,
        conn: 0,
    }
}

/// Relay 10.0.0.5 behind 1:1 NAT as 192.0.2.5 (external), IPv6 2001:db8:5::5.
pub fn config() -> ServerConfig {
    ServerConfig {
        relay_v4: Some(RelayAddr { local: "10.0.0.5".parse().unwrap(), external: "192.0.2.5".parse().unwrap() }),
        relay_v6: Some(RelayAddr { local: "2001:db8:5::5".parse().unwrap(), external: "2001:db8:5::5".parse().unwrap() }),
        ..ServerConfig::default()
    }
}

pub fn policy() -> PeerPolicy {
    let own = vec!["10.0.0.5".parse().unwrap(), "192.0.2.5".parse().unwrap(), "2001:db8:5::5".parse().unwrap()];
    PeerPolicy::new(vec![], vec![], own, (49152, 65535))
}

/// An owned view of a response.
pub struct Resp {
    pub bytes: Vec<u8>,
}

impl Resp {
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.bytes).expect("server sent a well-formed message")
    }
    pub fn class(&self) -> Class {
        self.msg().class()
    }
    pub fn code(&self) -> Option<u16> {
        self.msg().get(attr::ERROR_CODE).and_then(attr::decode_error_code).map(|(c, _)| c)
    }
    pub fn get(&self, t: u16) -> Option<Vec<u8>> {
        self.msg().get(t).map(|v| v.to_vec())
    }
    pub fn addr(&self, t: u16) -> Option<SocketAddr> {
        let m = self.msg();
        attr::decode_xor_address(m.get(t)?, m.transaction_id())
    }
    pub fn addrs(&self, t: u16) -> Vec<SocketAddr> {
        let m = self.msg();
        m.get_all(t).filter_map(|v| attr::decode_xor_address(v, m.transaction_id())).collect()
    }
    pub fn lifetime(&self) -> Option<u32> {
        self.msg().get(attr::LIFETIME).and_then(attr::decode_u32)
    }
}

/// Credentials a client presents.
#[derive(Clone)]
pub struct Creds {
    pub username: String,
    pub key: [u8; 16],
    pub nonce: Vec<u8>,
    pub realm: String,
    pub sha256: bool,
}

/// One request attribute.
pub enum A {
    Raw(u16, Vec<u8>),
    Addr(u16, SocketAddr),
    U32(u16, u32),
}

pub fn transport_udp() -> A {
    A::Raw(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])
}
pub fn peer(a: &str) -> A {
    A::Addr(attr::XOR_PEER_ADDRESS, a.parse().unwrap())
}
pub fn channel(n: u16) -> A {
    let b = n.to_be_bytes();
    A::Raw(attr::CHANNEL_NUMBER, vec![b[0], b[1], 0, 0])
}

impl Core {
    pub fn new() -> Core {
        Self::with(config(), policy(), vec![SECRET.to_vec()])
    }

    pub fn with(cfg: ServerConfig, policy: PeerPolicy, secrets: Vec<Vec<u8>>) -> Core {
        let auth = Authenticator::new(REALM, secrets, &[("static".into(), "pw".into())], NonceKey::new([9; 32], 600));
        Core {
            server: Server::new(cfg, auth, policy),
            relays: FakeRelays { next_port: 50001, open: HashSet::new(), exhausted: false, last_even: false, last_dont_fragment: false, no_dont_fragment: false, reserved: HashSet::new() },
            now: Now { mono: Instant::now(), unix: UNIX0 },
            out: vec![0u8; 70_000],
            tid: 0,
        }
    }

    pub fn advance(&mut self, secs: u64) {
        self.now = self.now.advance(Duration::from_secs(secs));
        self.server.handle_timeout(self.now.mono, &mut self.relays);
    }

    pub fn next_tid(&mut self) -> [u8; 12] {
        self.tid += 1;
        let mut t = [0u8; 12];
        t[4..].copy_from_slice(&self.tid.to_be_bytes());
        t
    }

    /// Builds a message; with `creds`, adds USERNAME/REALM/NONCE and integrity.
    pub fn build(&self, m: u16, class: Class, tid: [u8; 12], attrs: &[A], creds: Option<&Creds>, fingerprint: bool) -> Vec<u8> {
        build(m, class, tid, attrs, creds, fingerprint)
    }

    /// Feeds raw bytes from a client; returns the reply, if any.
    pub fn feed(&mut self, t: FiveTuple, bytes: &[u8]) -> Option<Resp> {
        match self.server.handle_client(t, bytes, self.now, &mut self.out, &mut self.relays) {
            Output::Reply(b) => Some(Resp { bytes: b.to_vec() }),
            Output::None => None,
            Output::Relay { .. } => panic!("expected a reply, got a relay action"),
        }
    }

    /// Feeds bytes that should be relayed; returns (relay, peer, data).
    pub fn feed_relay(&mut self, t: FiveTuple, bytes: &[u8]) -> Option<(RelayId, SocketAddr, Vec<u8>)> {
        match self.server.handle_client(t, bytes, self.now, &mut self.out, &mut self.relays) {
            Output::Relay { relay, peer, data, .. } => Some((relay, peer, data.to_vec())),
            Output::None => None,
            Output::Reply(_) => panic!("expected a relay action, got a reply"),
        }
    }

    pub fn request(&mut self, t: FiveTuple, m: u16, attrs: &[A], creds: Option<&Creds>) -> Resp {
        let tid = self.next_tid();
        let b = self.build(m, Class::Request, tid, attrs, creds, false);
        let r = self.feed(t, &b).expect("a request gets an answer");
        assert_eq!(r.msg().transaction_id(), &tid, "response echoes the transaction id");
        assert_eq!(r.msg().method(), m);
        r
    }

    /// REST credentials for `user` valid for `ttl` seconds from now (may be negative).
    pub fn rest_creds(&mut self, t: FiveTuple, user: &str, ttl: i64, secret: &[u8]) -> Creds {
        let expiry = (self.now.unix as i64 + ttl) as u64;
        let username = if user.is_empty() { expiry.to_string() } else { format!("{expiry}:{user}") };
        self.creds_for(t, &username, &rest_password(secret, &username))
    }

    /// Gets a nonce by sending an unauthenticated Allocate, and derives the key.
    pub fn creds_for(&mut self, t: FiveTuple, username: &str, password: &str) -> Creds {
        let r = self.request(t, method::ALLOCATE, &[transport_udp()], None);
        assert_eq!(r.code(), Some(401));
        assert!(r.msg().get(attr::MESSAGE_INTEGRITY).is_none());
        let realm = String::from_utf8(r.get(attr::REALM).unwrap()).unwrap();
        Creds {
            username: username.to_owned(),
            key: long_term_key(username, &realm, password),
            nonce: r.get(attr::NONCE).unwrap(),
            realm,
            sha256: false,
        }
    }

    /// Allocates on `t` for `user`; asserts success and returns the creds and relayed address.
    pub fn allocate(&mut self, t: FiveTuple, user: &str) -> (Creds, SocketAddr) {
        let c = self.rest_creds(t, user, 3600, SECRET);
        let r = self.request(t, method::ALLOCATE, &[transport_udp()], Some(&c));
        assert_eq!(r.class(), Class::Success, "allocate failed with {:?}", r.code());
        assert!(r.msg().verify_integrity(&c.key), "success is signed with the user's key");
        (c, r.addr(attr::XOR_RELAYED_ADDRESS).unwrap())
    }
}

/// Builds a message (up to 64 KiB); with `creds`, adds USERNAME/REALM/NONCE
/// and integrity, and FINGERPRINT when asked.
pub fn build(m: u16, class: Class, tid: [u8; 12], attrs: &[A], creds: Option<&Creds>, fingerprint: bool) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    let mut w = MessageWriter::new(&mut buf, m, class, &tid);
    for a in attrs {
        match a {
            A::Raw(t, v) => w.attr(*t, v),
            A::Addr(t, s) => w.xor_address(*t, *s),
            A::U32(t, v) => w.u32(*t, *v),
        };
    }
    if let Some(c) = creds {
        w.attr(attr::USERNAME, c.username.as_bytes()).attr(attr::REALM, c.realm.as_bytes()).attr(attr::NONCE, &c.nonce);
        if c.sha256 {
            w.integrity_sha256(&c.key);
        } else {
            w.integrity(&c.key);
        }
    }
    if fingerprint {
        w.fingerprint();
    }
    let n = w.finish().expect("test message fits");
    buf.truncate(n);
    buf
}
