//! turnd with two shards (threads = 2) on loopback: clients spread over
//! both, and everything that must hold for the whole relay does: quotas
//! under concurrent Allocates, an EVEN-PORT reservation claimed from the
//! other shard, hairpin between shards, reload, drain, metrics and the admin
//! API across shards, a stopped shard that does not stall the other, and a
//! reload that one shard cannot take, refused on every shard.

mod common;
#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{thread_named, EchoPeer, StoppedThread, Turnd, SECRET};
use harness::{transport_udp, A};
use serde_json::Value;
use turnd::stun::{attr, method, Class};
use wire::{peer_at, Incoming, UdpClient};

fn start(limits: &str) -> Turnd {
    start_wrapped(limits, &[])
}

/// `start`, with turnd run through `wrap` (e.g. `env VAR=VALUE`).
fn start_wrapped(limits: &str, wrap: &[String]) -> Turnd {
    let port = common::free_port();
    let probe: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    Turnd::builder().wrap(wrap).config(probe, move |dir| {
        let secret = dir.join("secret");
        std::fs::write(&secret, SECRET).unwrap();
        format!(
            "threads = 2\nrealm = \"test\"\n[auth]\nsecret_file = \"{}\"\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
             [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n\
             [peers]\nallow = [\"127.0.0.0/8\"]\n[limits]\n{limits}\n",
            secret.display()
        )
    }).start()
}

/// An admin API request with the server's token: (status, JSON body).
fn admin(t: &Turnd, method: &str, path: &str, body: &str) -> (u16, Value) {
    let addr = format!("127.0.0.1:{}", t.metrics_port);
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        t.admin_token(),
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The shard holding the allocation of the client at `client`, from the admin API.
fn shard_of(t: &Turnd, client: SocketAddr) -> Option<u64> {
    let (_, sessions) = admin(t, "GET", "/admin/sessions", "");
    sessions.as_array()?.iter().find(|s| s["client"] == client.to_string()).and_then(|s| s["shard"].as_u64())
}

/// Allocated clients until there are at least `per_shard` on each shard
/// (at most 64 tries): (clients on shard 0, clients on shard 1), each with
/// its relayed address.
fn clients_on_both(t: &Turnd, per_shard: usize) -> [Vec<(UdpClient, SocketAddr)>; 2] {
    clients_on_both_with(t, per_shard, SECRET)
}

/// [`clients_on_both`], allocating with `secret` (panics if one is refused).
fn clients_on_both_with(t: &Turnd, per_shard: usize, secret: &str) -> [Vec<(UdpClient, SocketAddr)>; 2] {
    let mut on: [Vec<(UdpClient, SocketAddr)>; 2] = [Vec::new(), Vec::new()];
    for i in 0..64 {
        if on.iter().all(|v| v.len() >= per_shard) {
            break;
        }
        let mut c = UdpClient::new("127.0.0.1", t.addr);
        let relayed = c.allocate(&format!("user{i}"), secret);
        let shard = shard_of(t, c.sock.local_addr().unwrap()).expect("the session lists its shard") as usize;
        on[shard].push((c, relayed));
    }
    assert!(on.iter().all(|v| v.len() >= per_shard), "64 clients did not reach both shards: {} and {}", on[0].len(), on[1].len());
    on
}

fn permit(c: &mut UdpClient, peer: SocketAddr) {
    let r = c.transact(method::CREATE_PERMISSION, &[peer_at(peer)]);
    assert_eq!(r.class(), Class::Success, "CreatePermission for {peer}: {:?}", r.code());
}

/// Sends `payload` to the echo peer through the relay; whether it came back within `wait`.
fn echoes(c: &mut UdpClient, peer: SocketAddr, payload: &[u8], wait: Duration) -> bool {
    c.send_indication(peer, payload);
    let until = Instant::now() + wait;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match c.recv(left) {
            Some(Incoming::Data { data, .. }) if data == payload => return true,
            Some(_) => continue,
            None => return false,
        }
    }
    false
}

fn sessions_by_shard(t: &Turnd) -> [usize; 2] {
    let (status, sessions) = admin(t, "GET", "/admin/sessions", "");
    assert_eq!(status, 200);
    let mut n = [0; 2];
    for s in sessions.as_array().unwrap() {
        n[s["shard"].as_u64().unwrap() as usize] += 1;
    }
    n
}

#[test]
fn clients_spread_over_both_shards_and_every_view_sees_them() {
    let t = start("");
    let mut on = clients_on_both(&t, 3);
    let total = on[0].len() + on[1].len();

    // Status and metrics count both shards.
    let (status, s) = admin(&t, "GET", "/admin/status", "");
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["allocations"], total, "{s}");
    let shards = s["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2, "{s}");
    assert_eq!(shards[0]["allocations"], on[0].len(), "{s}");
    assert_eq!(shards[1]["allocations"], on[1].len(), "{s}");
    assert_eq!(t.metric("turnd_allocations{family=\"ipv4\",transport=\"udp\"}"), total as f64);
    assert_eq!(t.metric("turnd_shards"), 2.0);
    assert_eq!(sessions_by_shard(&t), [on[0].len(), on[1].len()]);

    // Each shard relays.
    let peer = EchoPeer::start();
    for (shard, clients) in on.iter_mut().enumerate() {
        let (c, _) = &mut clients[0];
        permit(c, peer.addr);
        assert!(echoes(c, peer.addr, format!("via shard {shard}").as_bytes(), Duration::from_secs(2)), "no echo through shard {shard}");
    }
    let relayed = t.metric("turnd_relayed_packets_total{direction=\"to_peer\",transport=\"udp\"}");
    assert_eq!(relayed, 2.0, "the scrape sums both shards' counters");

    // Hairpin between shards: through the kernel, from one relay socket to the other.
    let [on0, on1] = &mut on;
    let ((a, a_relayed), (b, b_relayed)) = (&mut on0[0], &mut on1[0]);
    permit(a, *b_relayed);
    permit(b, *a_relayed);
    a.send_indication(*b_relayed, b"across shards");
    match b.recv(Duration::from_secs(2)) {
        Some(Incoming::Data { peer, data }) => {
            assert_eq!(peer, *a_relayed);
            assert_eq!(data, b"across shards");
        }
        other => panic!("hairpin across shards: {other:?}"),
    }

    // Disconnect reaches every shard: one client on each, then everyone left.
    for clients in &on {
        let client = clients[1].0.sock.local_addr().unwrap();
        let (_, r) = admin(&t, "POST", "/admin/disconnect", &format!("{{\"client\":\"{client}\"}}"));
        assert_eq!(r["disconnected"], 1, "{r}");
    }
    assert_eq!(sessions_by_shard(&t), [on[0].len() - 1, on[1].len() - 1]);
    let (_, r) = admin(&t, "POST", "/admin/disconnect", "{\"client\":\"127.0.0.1\"}");
    assert_eq!(r["disconnected"], total - 2, "{r}");
    assert_eq!(sessions_by_shard(&t), [0, 0]);
}

#[test]
fn quotas_hold_exactly_under_concurrent_allocates_on_both_shards() {
    let t = start("user_quota = 4\ntotal_quota = 10");
    // Each answer with its client: the socket (the allocation's 5-tuple) stays open.
    let attempt = |users: Vec<String>| -> Vec<(Option<u16>, UdpClient)> {
        let barrier = Arc::new(Barrier::new(users.len()));
        let threads: Vec<_> = users
            .into_iter()
            .map(|user| {
                let (barrier, server) = (barrier.clone(), t.addr);
                std::thread::spawn(move || {
                    let mut c = UdpClient::new("127.0.0.1", server);
                    let challenge = c.transact(method::ALLOCATE, &[transport_udp()]);
                    c.creds = Some(wire::rest_creds(&challenge, &user, SECRET));
                    barrier.wait();
                    let r = c.transact(method::ALLOCATE, &[transport_udp()]);
                    (r.code(), c)
                })
            })
            .collect();
        threads.into_iter().map(|h| h.join().unwrap()).collect()
    };
    // One user, 16 clients at once: exactly the user's quota succeeds.
    let first = attempt((0..16).map(|_| "same".to_owned()).collect());
    let codes: Vec<_> = first.iter().map(|(c, _)| *c).collect();
    assert_eq!(codes.iter().filter(|c| c.is_none()).count(), 4, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == Some(486)).count(), 12, "{codes:?}");
    // 16 other users at once: exactly what is left of the total.
    let second = attempt((0..16).map(|i| format!("other{i}")).collect());
    let codes: Vec<_> = second.iter().map(|(c, _)| *c).collect();
    assert_eq!(codes.iter().filter(|c| c.is_none()).count(), 6, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == Some(508)).count(), 10, "{codes:?}");
    let by_shard = sessions_by_shard(&t);
    assert_eq!(by_shard[0] + by_shard[1], 10);
    assert!(by_shard[0] > 0 && by_shard[1] > 0, "the allocations landed on one shard only: {by_shard:?}");
}

#[test]
fn an_even_port_reservation_is_claimed_from_the_other_shard() {
    let t = start("");
    let mut a = UdpClient::new("127.0.0.1", t.addr);
    let challenge = a.transact(method::ALLOCATE, &[transport_udp()]);
    a.creds = Some(wire::rest_creds(&challenge, "reserver", SECRET));
    let r = a.transact(method::ALLOCATE, &[transport_udp(), A::Raw(attr::EVEN_PORT, vec![0x80])]);
    assert_eq!(r.class(), Class::Success, "{:?}", r.code());
    let first = r.addr(attr::XOR_RELAYED_ADDRESS).unwrap();
    let token = r.get(attr::RESERVATION_TOKEN).expect("a reservation token");
    let a_shard = shard_of(&t, a.sock.local_addr().unwrap()).unwrap();

    // A client that lands on the other shard: learn where a socket lands by
    // allocating, then free that allocation and claim the token from the
    // same socket (the kernel keeps its 4-tuple on that shard).
    for _ in 0..64 {
        let mut b = UdpClient::new("127.0.0.1", t.addr);
        b.allocate("claimer", SECRET);
        let b_shard = shard_of(&t, b.sock.local_addr().unwrap()).unwrap();
        let r = b.transact(method::REFRESH, &[A::U32(attr::LIFETIME, 0)]);
        assert_eq!(r.class(), Class::Success, "{:?}", r.code());
        if b_shard == a_shard {
            continue;
        }
        let r = b.transact(method::ALLOCATE, &[transport_udp(), A::Raw(attr::RESERVATION_TOKEN, token.clone())]);
        assert_eq!(r.class(), Class::Success, "claiming from shard {b_shard} a token of shard {a_shard}: {:?}", r.code());
        let second = r.addr(attr::XOR_RELAYED_ADDRESS).unwrap();
        assert_eq!(second.port(), first.port() + 1, "the reserved port");
        assert_eq!(shard_of(&t, b.sock.local_addr().unwrap()), Some(b_shard));
        return;
    }
    panic!("64 clients all landed on shard {a_shard}");
}

fn rewrite(t: &Turnd, from: &str, to: &str) {
    let cfg = std::fs::read_to_string(&t.config).unwrap();
    assert!(cfg.contains(from), "{cfg}");
    std::fs::write(&t.config, cfg.replace(from, to)).unwrap();
}

#[test]
fn reload_and_drain_reach_every_shard() {
    let t = start("drain_timeout = \"30s\"");
    let mut before = clients_on_both(&t, 1);
    let peer = EchoPeer::start();
    for clients in before.iter_mut() {
        permit(&mut clients[0].0, peer.addr);
    }

    // A new secret applies on both shards; allocations made before stay.
    std::fs::write(t.dir.join("secret"), NEW_SECRET).unwrap();
    let (status, r) = admin(&t, "POST", "/admin/reload", "");
    assert_eq!(status, 200, "{r}");
    assert!(secret_refused(&t, SECRET), "the old secret must be refused");
    let _after = clients_on_both_with(&t, 1, NEW_SECRET);

    // The number of shards is not for a reload.
    rewrite(&t, "threads = 2", "threads = 3");
    let (status, r) = admin(&t, "POST", "/admin/reload", "");
    assert_eq!(status, 400, "{r}");
    assert!(r["error"].as_str().unwrap().contains("threads"), "{r}");
    rewrite(&t, "threads = 3", "threads = 2");

    // Drain: no new allocation on either shard; calls on both go on.
    t.signal("TERM");
    t.wait_log("draining");
    for i in 0..16 {
        let mut c = UdpClient::new("127.0.0.1", t.addr);
        assert_eq!(c.try_allocate(&format!("late{i}"), NEW_SECRET).code(), Some(508));
    }
    assert_eq!(t.http_get("/readyz").0, 503);
    for (shard, clients) in before.iter_mut().enumerate() {
        assert!(echoes(&mut clients[0].0, peer.addr, b"still here", Duration::from_secs(2)), "shard {shard} stopped relaying while draining");
    }
}

#[test]
fn a_stopped_shard_does_not_stall_the_other() {
    let t = start("");
    let mut on = clients_on_both(&t, 1);
    let peer = EchoPeer::start();
    for clients in on.iter_mut() {
        permit(&mut clients[0].0, peer.addr);
    }
    let stopped = StoppedThread::stop(thread_named(t.pid(), "turnd-shard-0"));
    // Shard 1 relays while shard 0 cannot run; shard 0's client gets nothing.
    for i in 0..20 {
        assert!(echoes(&mut on[1][0].0, peer.addr, format!("alive {i}").as_bytes(), Duration::from_secs(1)), "shard 1 stalled with shard 0");
    }
    assert!(!echoes(&mut on[0][0].0, peer.addr, b"frozen", Duration::from_millis(300)), "shard 0 relayed while stopped");
    drop(stopped);
    // Shard 0 runs again: what waited in its socket is relayed, then new packets.
    assert!(echoes(&mut on[0][0].0, peer.addr, b"thawed", Duration::from_secs(2)), "shard 0 did not resume");
}

/// Whether `secret` is refused (401) on both shards: 16 fresh clients, the
/// kernel's hash spreads them (2^-16 odds that all land on one shard).
fn secret_refused(t: &Turnd, secret: &str) -> bool {
    (0..16).all(|i| UdpClient::new("127.0.0.1", t.addr).try_allocate(&format!("refused{i}"), secret).code() == Some(401))
}

const NEW_SECRET: &str = "the-new-secret-0123456789";

/// Adds a UDP listener on `port` to the config file and switches the secret.
fn stage_reload(t: &Turnd, port: u16) {
    std::fs::write(t.dir.join("secret"), NEW_SECRET).unwrap();
    let cfg = std::fs::read_to_string(&t.config).unwrap();
    std::fs::write(&t.config, format!("{cfg}\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n")).unwrap();
}

#[test]
fn a_listener_one_shard_cannot_take_refuses_the_reload_on_every_shard() {
    let extra = common::free_port();
    // Shard 1 cannot take a socket for port `extra` (the test hook stands in
    // for a runtime that refuses a socket); shard 0 can.
    let hook = format!("TURND_TEST_REFUSE_PREPARE=1:{extra}");
    let t = start_wrapped("", &["env".to_owned(), hook]);
    let _ = clients_on_both(&t, 1);
    let original = std::fs::read_to_string(&t.config).unwrap();
    stage_reload(&t, extra);
    let (status, r) = admin(&t, "POST", "/admin/reload", "");
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["reloaded"], false, "{r}");
    assert_eq!(r["shard"], 1, "{r}");
    assert_eq!(r["step"], "shard prepare", "{r}");
    let msg = r["error"].as_str().unwrap();
    assert!(msg.contains(&format!("shard 1 cannot serve listener udp 127.0.0.1:{extra}")) && msg.contains("no shard switched"), "{msg}");
    assert!(t.log().contains("reload refused"), "{}", t.log());
    // Every shard runs the old configuration: the old secret on both, the new
    // one on neither, and no shard serves the new port (the test can bind it
    // without SO_REUSEPORT, so every socket of that group is closed).
    clients_on_both_with(&t, 1, SECRET);
    assert!(secret_refused(&t, NEW_SECRET), "a shard switched to the new secret");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::UdpSocket::bind(("127.0.0.1", extra)).is_err() {
        assert!(Instant::now() < deadline, "port {extra} is still held after the refused reload");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The bookkeeping went back too: the file without the refused listener
    // (and the new secret) reloads, on both shards.
    std::fs::write(&t.config, original).unwrap();
    let (status, r) = admin(&t, "POST", "/admin/reload", "");
    assert_eq!(status, 200, "{r}");
    // Had the refused listener stayed in the books, this reload would remove it.
    assert!(!t.log().contains(&format!("listener removed: udp 127.0.0.1:{extra}")), "{}", t.log());
    assert!(!t.log().contains(&format!("listener started: udp 127.0.0.1:{extra}")), "{}", t.log());
    clients_on_both_with(&t, 1, NEW_SECRET);
    assert!(secret_refused(&t, SECRET), "a shard kept the old secret");
}

#[test]
fn a_stopped_shard_refuses_the_reload_and_status_names_it() {
    let t = start("");
    let _ = clients_on_both(&t, 1);
    let extra = common::free_port();
    stage_reload(&t, extra);
    let stopped = StoppedThread::stop(thread_named(t.pid(), "turnd-shard-1"));
    let (status, r) = admin(&t, "POST", "/admin/reload", "");
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["shard"], 1, "{r}");
    assert!(r["error"].as_str().unwrap().contains("shard 1 did not answer"), "{r}");
    // Status says which shard is missing, in JSON and for people.
    let (status, s) = admin(&t, "GET", "/admin/status", "");
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["shards_not_answering"], serde_json::json!([1]), "{s}");
    assert_eq!(s["shards"].as_array().unwrap().len(), 1, "{s}");
    let text = turnd::ctl::admin::render_status(&s);
    assert!(text.contains("WARNING:     shard 1 did not answer"), "{text}");
    drop(stopped);
    // Running again, shard 1 drops what it prepared: both shards run the old
    // configuration, and status lists both.
    clients_on_both_with(&t, 1, SECRET);
    assert!(secret_refused(&t, NEW_SECRET), "a shard switched to the new secret");
    let (_, s) = admin(&t, "GET", "/admin/status", "");
    assert_eq!(s["shards_not_answering"], serde_json::json!([]), "{s}");
    assert_eq!(s["shards"].as_array().unwrap().len(), 2, "{s}");
}
