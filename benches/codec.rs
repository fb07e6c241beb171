//! Criterion micro-benchmarks of the codec and the sans-IO core's hot path.
//!
//! `cargo bench --bench codec` (add a filter after `--` to run some:
//! `cargo bench --bench codec -- channel`). What each one measures:
//!
//! - `binding/parse+respond`: parse a Binding request (with FINGERPRINT) and
//!   write the success response (XOR-MAPPED-ADDRESS, FINGERPRINT).
//! - `allocate/verify_key`: parse an authenticated Allocate and check its
//!   MESSAGE-INTEGRITY with the long-term key already known.
//! - `allocate/verify_rest`: the same plus deriving the key from the REST
//!   secret (HMAC-SHA1 password, MD5 long-term key), as the server does for
//!   every authenticated request.
//! - `allocate/sign_response`: write an Allocate success response with
//!   MESSAGE-INTEGRITY and FINGERPRINT.
//! - `channel_data/parse`: parse a 1200-byte ChannelData message.
//! - `core/client_channel_data`: `Server::handle_client` on ChannelData for an
//!   existing allocation with a bound channel (the per-packet routing lookup,
//!   client to peer).
//! - `core/peer_to_client`: `Server::handle_peer` on a datagram from that
//!   peer (lookup and ChannelData header written into the output buffer).
//! - `core/send_indication`: `Server::handle_client` on a Send indication.

use std::collections::HashSet;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use turnd::auth::{rest_password, rest_username, Authenticator, NonceKey};
use turnd::stun::integrity::long_term_key;
use turnd::stun::{attr, method, ChannelData, Class, Message, MessageWriter};
use turnd::turn::{
    Family, FiveTuple, Now, OpenError, Output, PeerPolicy, Placement, RelayAddr, RelayId, RelayPorts, Server,
    ServerConfig, Transport,
};

const SECRET: &[u8] = b"bench-secret";
const REALM: &str = "bench";
const PAYLOAD: usize = 1200;

fn build(m: u16, class: Class, tid: [u8; 12], f: impl FnOnce(&mut MessageWriter)) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let mut w = MessageWriter::new(&mut buf, m, class, &tid);
    f(&mut w);
    let n = w.finish().expect("fits");
    buf.truncate(n);
    buf
}

fn bench_binding(c: &mut Criterion) {
    let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let req = build(method::BINDING, Class::Request, *b"binding-tid1", |w| {
        w.fingerprint();
    });
    let mut out = [0u8; 256];
    c.bench_function("binding/parse+respond", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&req)).unwrap();
            let mut w = MessageWriter::new(&mut out, method::BINDING, Class::Success, m.transaction_id());
            w.xor_address(attr::XOR_MAPPED_ADDRESS, black_box(client)).fingerprint();
            black_box(w.finish().unwrap())
        })
    });
}

fn bench_allocate(c: &mut Criterion) {
    let username = rest_username(4_000_000_000, Some("alice"));
    let password = rest_password(SECRET, &username);
    let key = long_term_key(&username, REALM, &password);
    let nonce = [0x42u8; 40];
    let req = build(method::ALLOCATE, Class::Request, *b"allocate-tid", |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .u32(attr::LIFETIME, 600)
            .attr(attr::USERNAME, username.as_bytes())
            .attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, &nonce)
            .integrity(&key)
            .fingerprint();
    });
    let mut g = c.benchmark_group("allocate");
    g.bench_function("verify_key", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&req)).unwrap();
            assert!(m.verify(black_box(&key)));
        })
    });
    g.bench_function("verify_rest", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&req)).unwrap();
            let user = attr::decode_str(m.get(attr::USERNAME).unwrap(), 508).unwrap();
            let k = long_term_key(user, REALM, &rest_password(black_box(SECRET), user));
            assert!(m.verify(&k));
        })
    });
    let relayed: SocketAddr = "192.0.2.5:50000".parse().unwrap();
    let mapped: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let mut out = [0u8; 512];
    g.bench_function("sign_response", |b| {
        b.iter(|| {
            let mut w = MessageWriter::new(&mut out, method::ALLOCATE, Class::Success, b"allocate-tid");
            w.xor_address(attr::XOR_RELAYED_ADDRESS, relayed)
                .xor_address(attr::XOR_MAPPED_ADDRESS, mapped)
                .u32(attr::LIFETIME, 600)
                .integrity(black_box(&key))
                .fingerprint();
            black_box(w.finish().unwrap())
        })
    });
    g.finish();
}

fn channel_data(channel: u16, len: usize) -> Vec<u8> {
    let mut v = ChannelData::header(channel, len).to_vec();
    v.resize(4 + len, 0x5a);
    v
}

fn bench_channel_data(c: &mut Criterion) {
    let pkt = channel_data(0x4000, PAYLOAD);
    let mut g = c.benchmark_group("channel_data");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse", |b| {
        b.iter(|| {
            let cd = ChannelData::parse(black_box(&pkt)).unwrap();
            black_box((cd.channel, cd.data.len()))
        })
    });
    g.finish();
}

/// Relay ports without sockets (as tests/common/core.rs does).
struct FakeRelays {
    next_port: u16,
    open: HashSet<RelayId>,
}

impl RelayPorts for FakeRelays {
    fn open(&mut self, id: RelayId, family: Family, _placement: Placement, _dont_fragment: bool) -> Result<SocketAddr, OpenError> {
        if family != Family::V4 {
            return Err(OpenError::FamilyUnsupported);
        }
        let port = self.next_port;
        self.next_port += 2;
        self.open.insert(id);
        Ok(SocketAddr::new("10.0.0.5".parse().unwrap(), port))
    }
    fn close(&mut self, id: RelayId) {
        self.open.remove(&id);
    }
    fn release(&mut self, _family: Family, _port: u16) {}
}

/// A core with `n` allocations, each with a channel and a permission to one
/// peer; returns the core, the tuples and relayed addresses and the peer.
struct Core {
    server: Server,
    relays: FakeRelays,
    now: Now,
    tuples: Vec<FiveTuple>,
    peer: SocketAddr,
}

fn tuple(i: usize) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new("198.51.100.7".parse().unwrap(), 10_000 + i as u16),
        server: "192.0.2.10:3478".parse().unwrap(),
        transport: Transport::Udp,
        conn: 0,
    }
}

fn core_with(n: usize) -> Core {
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let auth = Authenticator::new(REALM, vec![SECRET.to_vec()], &[], NonceKey::new([7; 32], 600));
    let cfg = ServerConfig {
        relay_v4: Some(RelayAddr { local: "10.0.0.5".parse().unwrap(), external: "10.0.0.5".parse().unwrap() }),
        total_quota: 0,
        ..ServerConfig::default()
    };
    // The peer is in a documentation range, which the default policy refuses.
    let allow = vec!["203.0.113.0/24".parse().unwrap()];
    let policy = PeerPolicy::new(allow, vec![], vec!["10.0.0.5".parse().unwrap()], (49152, 65535));
    let mut core = Core {
        server: Server::new(cfg, auth, policy),
        relays: FakeRelays { next_port: 50000, open: HashSet::new() },
        now: Now { mono: Instant::now(), unix },
        tuples: Vec::new(),
        peer: "203.0.113.9:5000".parse().unwrap(),
    };
    let mut out = vec![0u8; 4096];
    let username = rest_username(unix + 3600, Some("bench"));
    let password = rest_password(SECRET, &username);
    for i in 0..n {
        let t = tuple(i);
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&(i as u64).to_be_bytes());
        // Unauthenticated Allocate: 401 with REALM and NONCE.
        let req = build(method::ALLOCATE, Class::Request, tid, |w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        });
        let nonce = match core.server.handle_client(t, &req, core.now, &mut out, &mut core.relays) {
            Output::Reply(r) => Message::parse(r).unwrap().get(attr::NONCE).unwrap().to_vec(),
            other => panic!("expected a 401, got {other:?}"),
        };
        let key = long_term_key(&username, REALM, &password);
        let authed = |m: u16, tid: [u8; 12], f: &dyn Fn(&mut MessageWriter)| {
            build(m, Class::Request, tid, |w| {
                f(w);
                w.attr(attr::USERNAME, username.as_bytes())
                    .attr(attr::REALM, REALM.as_bytes())
                    .attr(attr::NONCE, &nonce)
                    .integrity(&key);
            })
        };
        tid[11] = 1;
        let req = authed(method::ALLOCATE, tid, &|w| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        });
        expect_success(core.server.handle_client(t, &req, core.now, &mut out, &mut core.relays), "allocate");
        tid[11] = 2;
        let peer = core.peer;
        let req = authed(method::CHANNEL_BIND, tid, &|w| {
            w.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0]).xor_address(attr::XOR_PEER_ADDRESS, peer);
        });
        expect_success(core.server.handle_client(t, &req, core.now, &mut out, &mut core.relays), "channel bind");
        core.tuples.push(t);
    }
    while core.server.poll_event().is_some() {}
    core
}

fn expect_success(o: Output<'_, '_>, what: &str) {
    match o {
        Output::Reply(r) => {
            let m = Message::parse(r).unwrap();
            assert_eq!(m.class(), Class::Success, "{what} failed: {:?}", m.get(attr::ERROR_CODE).and_then(attr::decode_error_code));
        }
        other => panic!("{what}: expected a reply, got {other:?}"),
    }
}

fn bench_core(c: &mut Criterion) {
    // 1000 allocations so the lookup is not into a one-entry table.
    let mut core = core_with(1000);
    let t = core.tuples[500];
    let pkt = channel_data(0x4000, PAYLOAD);
    let mut out = vec![0u8; 2048];
    // The relay id of allocation 500, and a Send indication for it.
    let relay = match core.server.handle_client(t, &pkt, core.now, &mut out, &mut core.relays) {
        Output::Relay { relay, peer, data, .. } => {
            assert_eq!(peer, core.peer);
            assert_eq!(data.len(), PAYLOAD);
            relay
        }
        other => panic!("ChannelData was not relayed: {other:?}"),
    };
    let payload = vec![0x5au8; PAYLOAD];
    let send = build(method::SEND, Class::Indication, *b"send-tid-000", |w| {
        w.xor_address(attr::XOR_PEER_ADDRESS, core.peer).attr(attr::DATA, &payload);
    });

    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(1));
    g.bench_function("client_channel_data", |b| {
        b.iter(|| match core.server.handle_client(black_box(t), black_box(&pkt), core.now, &mut out, &mut core.relays) {
            Output::Relay { relay, data, .. } => black_box((relay, data.len())),
            _ => unreachable!(),
        })
    });
    g.bench_function("peer_to_client", |b| {
        b.iter(|| {
            let (to, bytes) =
                core.server.handle_peer(black_box(relay), black_box(core.peer), black_box(&payload), core.now.mono, &mut out).unwrap();
            black_box((to, bytes.len()))
        })
    });
    // A Send indication needs a permission, which the channel installed.
    g.bench_function("send_indication", |b| {
        b.iter(|| match core.server.handle_client(black_box(t), black_box(&send), core.now, &mut out, &mut core.relays) {
            Output::Relay { relay, data, .. } => black_box((relay, data.len())),
            other => panic!("Send indication was not relayed: {other:?}"),
        })
    });
    g.finish();
}

criterion_group!(benches, bench_binding, bench_allocate, bench_channel_data, bench_core);
criterion_main!(benches);
