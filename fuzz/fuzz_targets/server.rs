//! The sans-IO TURN server under arbitrary message sequences: five clients
//! (UDP over IPv4 and IPv6, two sharing an IP, TCP and TLS), a fake clock and
//! fake relay ports. The input is a list of operations (format in
//! `fuzz/seeds/make_seeds.py`): raw datagrams, well-formed requests built
//! from the input (valid, wrong or stale credentials, any attributes, an
//! optional byte flip after signing), Send indications, ChannelData, peer data
//! into `handle_peer`, clock jumps, closed connections, drain, admin
//! disconnects and port exhaustion.
//!
//! Besides "no panic", it checks what the server must never do:
//! - send to a peer the policy refuses (our own non-relay ports included),
//! - answer with a malformed message, another transaction, or over UDP an
//!   unsigned answer more than 3x the request,
//! - hand a client a Data indication or ChannelData that does not frame,
//! - exceed its quotas, leak or double-close relay ports, or keep state once
//!   everything has expired.

#![no_main]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use turnd::auth::{quota_key, rest_password, Authenticator, NonceKey};
use turnd::stun::integrity::long_term_key;
use turnd::stun::{attr, frame_len, method, ChannelData, Class, FrameLen, Message, MessageWriter};
use turnd::turn::{
    Event, Family, FiveTuple, Now, OpenError, Output, PeerPolicy, Placement, RelayAddr, RelayId, RelayPorts, Server,
    ServerConfig, Transport, AMPLIFICATION_FACTOR,
};

const SECRET: &[u8] = b"fuzz-secret";
const REALM: &str = "turnd";
const NONCE_KEY: [u8; 32] = [0x5A; 32];
const USER_QUOTA: u32 = 2;
const TOTAL_QUOTA: u32 = 4;
const RELAY_PORTS: (u16, u16) = (49152, 65535);

/// FUZZ_TRACE=1 prints what each operation did (to check seeds by hand:
/// `cargo fuzz run server fuzz/seeds/server/FILE`).
fn trace() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some())
}

struct FakeRelays {
    next_port: u16,
    open: HashMap<RelayId, SocketAddr>,
    reserved: HashSet<u16>,
    exhausted: bool,
}

impl RelayPorts for FakeRelays {
    fn open(&mut self, id: RelayId, family: Family, placement: Placement, _dont_fragment: bool) -> Result<SocketAddr, OpenError> {
        assert!(!self.open.contains_key(&id), "relay {id:?} opened twice");
        assert_eq!(id.family(), family);
        let port = match placement {
            Placement::Reserved(p) => {
                assert!(self.reserved.remove(&p), "claimed port {p} that was not reserved");
                p
            }
            _ if self.exhausted => return Err(OpenError::Exhausted),
            _ => {
                let mut p = self.next_port;
                if placement != Placement::Any && p % 2 == 1 {
                    p += 1;
                }
                if p >= RELAY_PORTS.1 - 2 {
                    p = RELAY_PORTS.0;
                }
                self.next_port = p + 2;
                if placement == Placement::EvenReserveNext {
                    assert!(self.reserved.insert(p + 1));
                }
                p
            }
        };
        let ip: IpAddr = match family {
            Family::V4 => "10.0.0.5".parse().unwrap(),
            Family::V6 => "2001:db8:5::5".parse().unwrap(),
        };
        let a = SocketAddr::new(ip, port);
        self.open.insert(id, a);
        Ok(a)
    }
    fn close(&mut self, id: RelayId) {
        assert!(self.open.remove(&id).is_some(), "closed relay {id:?} that was not open");
    }
    fn release(&mut self, _family: Family, port: u16) {
        assert!(self.reserved.remove(&port), "released port {port} that was not reserved");
    }
}

/// Reads the input front to back; past the end everything is zero.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

fn clients() -> [FiveTuple; 5] {
    let t = |c: &str, tr, conn| FiveTuple { client: c.parse().unwrap(), server: "192.0.2.10:3478".parse().unwrap(), transport: tr, conn };
    [
        t("198.51.100.7:40000", Transport::Udp, 0),
        t("198.51.100.7:40001", Transport::Udp, 0),
        t("[2001:db8:77::7]:40000", Transport::Udp, 1),
        t("203.0.113.9:50000", Transport::Tcp, 1),
        t("198.51.100.8:1", Transport::Tls, 2),
    ]
}

/// Peers the input picks from: public, refused, our own ports, hairpin forms.
const PEERS: &[&str] = &[
    "8.8.8.8:5000",
    "8.8.8.8:5001",
    "1.1.1.1:53",
    "[2606:4700::1111]:443",
    "127.0.0.1:3478",
    "169.254.169.254:80",
    "192.0.2.5:3478",
    "192.0.2.5:50001",
    "10.0.0.5:50003",
    "[::ffff:127.0.0.1]:80",
    "[64:ff9b::a9fe:a9fe]:80",
    "[2001:db8:5::5]:49154",
    "[::1]:9641",
    "10.0.0.1:1",
    "[fd00:ec2::254]:80",
    "0.0.0.0:0",
];

struct Fuzz {
    server: Server,
    relays: FakeRelays,
    policy: PeerPolicy,
    nonces: NonceKey,
    now: Now,
    clients: [FiveTuple; 5],
    tokens: Vec<Vec<u8>>,
    tid: u32,
    out: Vec<u8>,
    /// Channel bindings as a fast path would mirror them from the events.
    bound: HashMap<(RelayId, u16), SocketAddr>,
}

impl Fuzz {
    fn new() -> Self {
        let relay_v4 = Some(RelayAddr { local: "10.0.0.5".parse().unwrap(), external: "192.0.2.5".parse().unwrap() });
        let relay_v6 = Some(RelayAddr { local: "2001:db8:5::5".parse().unwrap(), external: "2001:db8:5::5".parse().unwrap() });
        let cfg = ServerConfig {
            relay_v4,
            relay_v6,
            user_quota: USER_QUOTA,
            total_quota: TOTAL_QUOTA,
            max_permissions: 4,
            unauth_rate: 20,
            ..ServerConfig::default()
        };
        let own: Vec<IpAddr> = ["10.0.0.5", "192.0.2.5", "2001:db8:5::5", "192.0.2.10"].iter().map(|s| s.parse().unwrap()).collect();
        let policy = PeerPolicy::new(vec![], vec![], own, RELAY_PORTS);
        let nonces = NonceKey::new(NONCE_KEY, 600);
        let auth = Authenticator::new(REALM, vec![SECRET.to_vec()], &[("static".into(), "pw".into())], nonces.clone());
        Fuzz {
            server: Server::new(cfg, auth, policy.clone()),
            relays: FakeRelays { next_port: 50000, open: HashMap::new(), reserved: HashSet::new(), exhausted: false },
            policy,
            nonces,
            now: Now { mono: Instant::now(), unix: 1_800_000_000 },
            clients: clients(),
            tokens: Vec::new(),
            tid: 0,
            out: vec![0u8; 70_000],
            bound: HashMap::new(),
        }
    }

    fn client(&self, sel: u8) -> FiveTuple {
        self.clients[sel as usize % self.clients.len()]
    }

    fn peer(&self, inp: &mut Input) -> SocketAddr {
        let sel = inp.u8();
        if sel < 0xF0 {
            return PEERS[sel as usize % PEERS.len()].parse().unwrap();
        }
        let ip: IpAddr = if sel & 1 == 0 {
            std::net::Ipv4Addr::from(inp.u32()).into()
        } else {
            let mut o = [0u8; 16];
            o.copy_from_slice(&[inp.bytes(16), &[0u8; 16][..]].concat()[..16]);
            std::net::Ipv6Addr::from(o).into()
        };
        SocketAddr::new(ip, inp.u16())
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tid += 1;
        let mut t = [0u8; 12];
        t[8..].copy_from_slice(&self.tid.to_be_bytes());
        t
    }

    /// Feeds bytes from a client and checks what comes back.
    fn client_packet(&mut self, t: FiveTuple, pkt: &[u8]) {
        let req = Message::parse(pkt).ok().map(|m| (*m.transaction_id(), m.method(), m.class()));
        match self.server.handle_client(t, pkt, self.now, &mut self.out, &mut self.relays) {
            Output::None => {}
            Output::Reply(b) => {
                let m = Message::parse(b).expect("a reply is a well-formed STUN message");
                if trace() {
                    let code = m.get(attr::ERROR_CODE).and_then(attr::decode_error_code).map_or(200, |(c, _)| c);
                    eprintln!("{} {:#x} -> {code}", t.client, m.method());
                }
                let (tid, meth, class) = req.expect("only STUN requests are answered");
                assert_eq!(class, Class::Request);
                assert_eq!((m.transaction_id(), m.method()), (&tid, meth), "the reply answers the request");
                assert!(matches!(m.class(), Class::Success | Class::Error));
                if t.transport == Transport::Udp && !m.has_integrity() {
                    assert!(b.len() <= AMPLIFICATION_FACTOR * pkt.len(), "{} byte answer to {} bytes", b.len(), pkt.len());
                }
                if let Some(tok) = m.get(attr::RESERVATION_TOKEN) {
                    self.tokens.push(tok.to_vec());
                }
            }
            Output::Relay { relay, peer, data, .. } => {
                if trace() {
                    eprintln!("{} -> relay {relay:?} to {peer}, {} bytes", t.client, data.len());
                }
                let from = self.relays.open.get(&relay).copied().expect("relayed from an open relay socket");
                assert_eq!(from.is_ipv4(), peer.is_ipv4(), "relay family matches the peer");
                assert!(self.policy.permits(peer), "relayed to a refused peer {peer}");
                assert!(data.len() <= pkt.len());
            }
        }
    }

    fn peer_packet(&mut self, relay: RelayId, from: SocketAddr, data: &[u8]) {
        let r = self.server.handle_peer(relay, from, data, self.now.mono, &mut self.out);
        if trace() {
            eprintln!("peer {from} on {relay:?}, {} bytes -> {:?}", data.len(), r.as_ref().map(|(t, b)| (t.client, b.len())));
        }
        if let Some((t, bytes)) = r {
            assert!(self.clients.contains(&t), "delivered to a known client");
            if ChannelData::is_channel_data(bytes) {
                let cd = ChannelData::parse(bytes).expect("ChannelData parses");
                assert_eq!(cd.data, data);
                let want = if t.transport.is_stream() { (4 + data.len() + 3) & !3 } else { 4 + data.len() };
                assert_eq!(bytes.len(), want);
            } else {
                let m = Message::parse(bytes).expect("a Data indication parses (its length field did not wrap)");
                assert_eq!((m.method(), m.class()), (method::DATA, Class::Indication));
                assert_eq!(m.get(attr::DATA), Some(data));
            }
            if t.transport.is_stream() {
                assert_eq!(frame_len(bytes), FrameLen::Complete(bytes.len()), "frames exactly on a stream");
            }
        }
    }

    /// A request (or other message) built from the input.
    fn build_request(&mut self, inp: &mut Input, t: FiveTuple) -> Vec<u8> {
        let m = match inp.u8() % 8 {
            0 => method::BINDING,
            1 => method::ALLOCATE,
            2 => method::REFRESH,
            3 => method::CREATE_PERMISSION,
            4 => method::CHANNEL_BIND,
            5 => method::SEND,
            6 => method::DATA,
            _ => inp.u16() & 0x0FFF,
        };
        let auth = inp.u8() % 7;
        let flags = inp.u8();
        let class = match (flags >> 2) & 3 {
            0 => Class::Request,
            1 => Class::Indication,
            2 => Class::Success,
            _ => Class::Error,
        };
        let tid = self.next_tid();
        let mut buf = vec![0u8; 4096];
        let mut w = MessageWriter::new(&mut buf, m, class, &tid);
        let nattrs = inp.u8() % 12;
        for _ in 0..nattrs {
            match inp.u8() % 12 {
                0 => {
                    let p = inp.u8();
                    w.attr(attr::REQUESTED_TRANSPORT, &[if p < 200 { 17 } else { p }, 0, 0, 0]);
                }
                1 => {
                    let l = inp.u32();
                    w.u32(attr::LIFETIME, l);
                }
                2 => {
                    let p = self.peer(inp);
                    w.xor_address(attr::XOR_PEER_ADDRESS, p);
                }
                3 => {
                    let c = 0x4000 | (inp.u16() & 0x3FFF);
                    w.attr(attr::CHANNEL_NUMBER, &[(c >> 8) as u8, c as u8, 0, 0]);
                }
                4 => {
                    let e = inp.u8();
                    w.attr(attr::EVEN_PORT, &[e & 0x80]);
                }
                5 => {
                    let s = inp.u8();
                    let tok = match self.tokens.last() {
                        Some(t) if s % 2 == 0 => t.clone(),
                        _ => vec![s; 8],
                    };
                    w.attr(attr::RESERVATION_TOKEN, &tok);
                }
                6 => {
                    let f = inp.u8() % 4;
                    w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[f, 0, 0, 0]);
                }
                7 => {
                    let f = inp.u8() % 4;
                    w.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[f, 0, 0, 0]);
                }
                8 => {
                    w.attr(attr::DONT_FRAGMENT, &[]);
                }
                9 => {
                    let n = inp.u8() as usize;
                    w.attr(attr::DATA, inp.bytes(n));
                }
                10 => {
                    let typ = inp.u16();
                    let n = inp.u8() as usize % 64;
                    w.attr(typ, inp.bytes(n));
                }
                _ => {
                    let n = inp.u8() as usize % 40;
                    w.attr(attr::SOFTWARE, &vec![b'x'; n]);
                }
            }
        }
        let ip = t.client.ip();
        let user = |name: &str, ttl: i64, unix: u64| {
            let u = format!("{}:{name}", (unix as i64 + ttl) as u64);
            let p = rest_password(SECRET, &u);
            (u.clone(), long_term_key(&u, REALM, &p))
        };
        let unix = self.now.unix;
        let creds = match auth {
            0 => None,
            1 => Some((user("alice", 3600, unix), self.nonces.make(ip, unix).to_vec(), false)),
            2 => Some((user("bob", 3600, unix), self.nonces.make(ip, unix).to_vec(), false)),
            3 => Some(((user("alice", 3600, unix).0, [7u8; 16]), self.nonces.make(ip, unix).to_vec(), false)),
            4 => Some((user("alice", 3600, unix), self.nonces.make(ip, unix.saturating_sub(700)).to_vec(), false)),
            5 => Some((user("alice", 3600, unix), self.nonces.make(ip, unix).to_vec(), true)),
            _ => Some((user("carol", -5, unix), self.nonces.make(ip, unix).to_vec(), false)),
        };
        if let Some(((username, key), nonce, sha256)) = creds {
            w.attr(attr::USERNAME, username.as_bytes()).attr(attr::REALM, REALM.as_bytes()).attr(attr::NONCE, &nonce);
            if sha256 {
                w.integrity_sha256(&key);
            } else {
                w.integrity(&key);
            }
        }
        if flags & 1 != 0 {
            w.fingerprint();
        }
        let n = w.finish().unwrap_or(20);
        buf.truncate(n);
        if flags & 2 != 0 && !buf.is_empty() {
            // A byte flipped after signing.
            let at = inp.u16() as usize % buf.len();
            buf[at] ^= inp.u8() | 1;
        }
        buf
    }

    fn op(&mut self, inp: &mut Input) {
        match inp.u8() % 11 {
            0 => {
                let t = self.client(inp.u8());
                let n = inp.u16() as usize;
                let pkt = inp.bytes(n).to_vec();
                self.client_packet(t, &pkt);
            }
            1 | 2 => {
                let t = self.client(inp.u8());
                let pkt = self.build_request(inp, t);
                self.client_packet(t, &pkt);
            }
            3 => {
                let t = self.client(inp.u8());
                let p = self.peer(inp);
                let n = inp.u8() as usize;
                let tid = self.next_tid();
                let mut buf = vec![0u8; 512];
                let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, &tid);
                w.xor_address(attr::XOR_PEER_ADDRESS, p).attr(attr::DATA, inp.bytes(n));
                let len = w.finish().unwrap();
                buf.truncate(len);
                self.client_packet(t, &buf);
            }
            4 => {
                let t = self.client(inp.u8());
                let ch = inp.u16();
                let delta = inp.u8() as i8 as isize;
                let n = inp.u8() as usize;
                let d = inp.bytes(n);
                let mut pkt = ChannelData::header(ch, (d.len() as isize + delta).clamp(0, 0xFFFF) as usize).to_vec();
                pkt.extend_from_slice(d);
                self.client_packet(t, &pkt);
            }
            5 => {
                let mut ids: Vec<RelayId> = self.relays.open.keys().copied().collect();
                ids.sort_by_key(|r| r.0);
                let sel = inp.u8();
                let relay = if ids.is_empty() || sel == 0xFF { RelayId(inp.u32() as u64) } else { ids[sel as usize % ids.len()] };
                let from = self.peer(inp);
                let n = match inp.u8() {
                    0xFF => 65_535,
                    0xFE => 65_527,
                    0xFD => 65_516 + (inp.u8() as usize % 20),
                    x => x as usize,
                };
                let fill = inp.u8();
                // At most 32 bytes from the input; the rest is `fill`.
                let k = inp.u8() as usize % 33;
                let mut d = inp.bytes(k.min(n)).to_vec();
                d.resize(n, fill);
                self.peer_packet(relay, from, &d);
            }
            6 => {
                let secs = match inp.u8() {
                    0xFF => 3600,
                    x => x as u64 % 64,
                };
                self.now = self.now.advance(Duration::from_secs(secs));
                // Everything due, or a bounded batch as the I/O layer runs it.
                match inp.u8() % 4 {
                    0 => {
                        let _ = self.server.expire(self.now.mono, &mut self.relays, inp.u8() as usize % 4);
                    }
                    _ => self.server.handle_timeout(self.now.mono, &mut self.relays),
                }
            }
            7 => {
                let t = self.client(inp.u8());
                if t.transport.is_stream() {
                    self.server.connection_closed(&t, self.now.mono, &mut self.relays);
                }
            }
            8 => {
                let a = inp.u8() % 2 == 0;
                self.server.set_accepting(a);
            }
            9 => {
                let sel = inp.u8();
                let name = ["alice", "bob", "static"][sel as usize % 3];
                self.server.disconnect(|a| quota_key(&a.username) == name, self.now.mono, &mut self.relays);
            }
            _ => {
                self.relays.exhausted = inp.u8() % 2 == 1;
            }
        }
        self.check_invariants();
    }

    fn check_invariants(&mut self) {
        let mut relays = 0;
        let mut per_user: HashMap<String, u32> = HashMap::new();
        for a in self.server.allocations() {
            for r in [a.v4, a.v6].iter().flatten() {
                assert!(self.relays.open.contains_key(&r.id), "allocation relay {:?} is open", r.id);
                relays += 1;
            }
            assert!(a.permissions.len() <= 4);
            assert!(a.channels.len() <= 4);
            *per_user.entry(quota_key(&a.username).to_owned()).or_default() += 1;
        }
        assert_eq!(relays, self.relays.open.len(), "no relay socket outlives its allocation");
        assert!(self.server.allocation_count() <= TOTAL_QUOTA as usize);
        assert!(per_user.values().all(|&n| n <= USER_QUOTA), "{per_user:?}");
        self.mirror_events();
    }

    /// Applies channel events to `bound`: a binding is (re)bound to one peer
    /// and unbound exactly once.
    fn mirror_events(&mut self) {
        while let Some(e) = self.server.poll_event() {
            match e {
                Event::ChannelBound { relay, channel, peer, .. } => {
                    if let Some(p) = self.bound.insert((relay, channel), peer) {
                        assert_eq!(p, peer, "a bound channel keeps its peer");
                    }
                }
                Event::ChannelUnbound { relay, channel, peer, .. } => {
                    assert_eq!(self.bound.remove(&(relay, channel)), Some(peer), "unbound what was bound");
                }
                _ => {}
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut f = Fuzz::new();
    let mut inp = Input(data);
    let mut ops = 0;
    while !inp.done() && ops < 256 {
        f.op(&mut inp);
        ops += 1;
    }
    // Once everything has expired nothing is left.
    f.now = f.now.advance(Duration::from_secs(2 * 86_400));
    f.server.handle_timeout(f.now.mono, &mut f.relays);
    f.mirror_events();
    assert!(f.bound.is_empty(), "bindings never unbound: {:?}", f.bound);
    assert_eq!(f.server.allocation_count(), 0);
    assert!(f.relays.open.is_empty(), "relay sockets leaked: {:?}", f.relays.open);
    assert!(f.relays.reserved.is_empty(), "reserved ports leaked: {:?}", f.relays.reserved);
    let fp = f.server.footprint();
    assert_eq!((fp.allocations, fp.tuples, fp.users, fp.reservations), (0, 0, 0, 0), "{fp:?}");
});
