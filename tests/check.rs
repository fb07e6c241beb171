//! The check page's server side, from outside: what turnd answers over
//! HTTPS on its TLS listener (curl, ALPN http/1.1) and what the credentials
//! it hands out can do over TURN. Off by default (404, such credentials
//! refused); with it on, check credentials reach only the relay's own
//! relayed addresses (not a peer `peers.allow` lets normal credentials
//! reach, not another port of the relay's address), four allocations per
//! client address, a small bandwidth cap, a short lifetime; they expire;
//! credential requests are rate limited per address and gated by the token;
//! `/readyz` answers over HTTPS and turns unready while draining. The page
//! itself is exercised by browsers in tests/browser_check.rs.

mod common;
#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{EchoPeer, Turnd, SECRET};
use harness::{channel, transport_udp, Creds, Resp, A};
use turnd::stun::integrity::long_term_key;
use turnd::stun::{attr, method, Class};
use wire::{peer_at, Incoming, UdpClient};

const NAME: &str = "turn.check.test";

/// An HTTPS request to turnd's TLS port (curl, certificate not checked
/// here): status, headers (lower-case names), body.
fn https(server: &Turnd, path: &str) -> (u16, String, String) {
    curl(&format!("https://{NAME}:{}{path}", server.tls_port), &["--resolve", &format!("{NAME}:{}:127.0.0.1", server.tls_port)])
}

fn curl(url: &str, extra: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sk", "--http1.1", "--max-time", "10", "-D", "-"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Fetches check credentials: (username, password, the whole answer).
fn credentials(server: &Turnd, query: &str) -> (String, String, serde_json::Value) {
    let (status, _, body) = https(server, &format!("/check/credentials{query}"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (v["username"].as_str().unwrap().to_owned(), v["password"].as_str().unwrap().to_owned(), v)
}

/// Credentials for this username and password, from a 401 challenge.
fn creds(challenge: &Resp, username: &str, password: &str) -> Creds {
    assert_eq!(challenge.code(), Some(401), "expected a challenge");
    let realm = String::from_utf8(challenge.get(attr::REALM).unwrap()).unwrap();
    Creds { key: long_term_key(username, &realm, password), username: username.to_owned(), nonce: challenge.get(attr::NONCE).unwrap(), realm, sha256: false }
}

/// An Allocate with these credentials (LIFETIME asked: an hour); the answer.
fn allocate_with(c: &mut UdpClient, username: &str, password: &str) -> Resp {
    let r = c.transact(method::ALLOCATE, &[transport_udp()]);
    c.creds = Some(creds(&r, username, password));
    c.transact(method::ALLOCATE, &[transport_udp(), A::U32(attr::LIFETIME, 3600)])
}

fn check_server(extra: &str) -> Turnd {
    Turnd::builder().streams().extra(&format!("[check]\nenabled = true\n{extra}")).start()
}

#[test]
fn off_by_default_the_page_is_404_readyz_answers_and_check_credentials_are_refused() {
    let server = Turnd::builder().streams().start();
    for p in ["/check", "/check/credentials", "/"] {
        assert_eq!(https(&server, p).0, 404, "{p}");
    }
    let (status, _, body) = https(&server, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    // A "turnd-check" username signed with the shared secret is no check
    // credential (nor anything else): refused.
    let mut c = UdpClient::new("127.0.0.1", server.addr);
    let username = format!("{}:turnd-check", wire::unix_now() + 30);
    let password = turnd::auth::rest_password(SECRET.as_bytes(), &username);
    let r = allocate_with(&mut c, &username, &password);
    assert_eq!(r.code(), Some(401), "a forged check credential");
    assert_eq!(server.metric("turnd_check_credentials_total{result=\"issued\"}"), 0.0);
}

#[test]
fn check_credentials_reach_only_the_relays_own_relayed_addresses() {
    // An echo peer on the relay's own address, outside the relay range (as
    // a videobridge on the relay's host is): peers.allow lets normal
    // credentials reach it by its exact address, and 127.0.0.0/8.
    let echo = EchoPeer::start_on("127.0.0.1");
    let peers = format!("[peers]\nallow = [\"127.0.0.0/8\", \"127.0.0.1:{}\"]\n", echo.addr.port());
    let server = Turnd::builder().streams().no_loopback_peers().extra(&format!("[check]\nenabled = true\n{peers}")).start();
    let (user, pass, v) = credentials(&server, "");
    assert!(user.ends_with(":turnd-check"), "{user}");
    let urls: Vec<&str> = v["transports"].as_array().unwrap().iter().map(|t| t["url"].as_str().unwrap()).collect();
    assert_eq!(
        urls,
        [
            format!("turn:{NAME}:{}?transport=udp", server.port),
            format!("turn:{NAME}:{}?transport=tcp", server.port),
            format!("turns:{NAME}:{}?transport=tcp", server.tls_port)
        ]
    );

    let (mut a, mut b) = (UdpClient::new("127.0.0.1", server.addr), UdpClient::new("127.0.0.1", server.addr));
    let ra = allocate_with(&mut a, &user, &pass);
    let rb = allocate_with(&mut b, &user, &pass);
    assert_eq!((ra.class(), rb.class()), (Class::Success, Class::Success), "{:?} {:?}", ra.code(), rb.code());
    assert_eq!(ra.lifetime(), Some(60), "an hour asked, a minute at most");
    let (relayed_a, relayed_b) = (ra.addr(attr::XOR_RELAYED_ADDRESS).unwrap(), rb.addr(attr::XOR_RELAYED_ADDRESS).unwrap());

    // Not a peer peers.allow admits, not the echo peer's allowed address.
    let refused = server.metric("turnd_peer_refusals_total");
    assert_eq!(a.transact(method::CREATE_PERMISSION, &[harness::peer("127.0.0.2:9")]).code(), Some(403));
    assert_eq!(a.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(echo.addr)]).code(), Some(403));
    // The relay's own address is permitted, but Send to a port outside the
    // relay range goes nowhere.
    let r = a.transact(method::CREATE_PERMISSION, &[peer_at(echo.addr)]);
    assert_eq!(r.class(), Class::Success, "{:?}", r.code());
    a.send_indication(echo.addr, b"to the echo peer");
    // The other check allocation: both ways.
    assert_eq!(a.transact(method::CHANNEL_BIND, &[channel(0x4001), peer_at(relayed_b)]).class(), Class::Success);
    assert_eq!(b.transact(method::CREATE_PERMISSION, &[peer_at(relayed_a)]).class(), Class::Success);
    a.send_channel(0x4001, b"hello b");
    match b.recv(Duration::from_secs(2)) {
        Some(Incoming::Data { peer, data }) => assert_eq!((peer, data.as_slice()), (relayed_a, &b"hello b"[..])),
        other => panic!("b got {other:?}"),
    }
    b.send_indication(relayed_a, b"hello a");
    assert!(matches!(a.recv(Duration::from_secs(2)), Some(Incoming::Channel { number: 0x4001, data }) if data == b"hello a"));
    assert!(server.metric("turnd_peer_refusals_total") >= refused + 3.0);

    // Normal credentials from the same address do reach the echo peer: the
    // refusals above are the check credentials' own.
    let mut n = UdpClient::new("127.0.0.1", server.addr);
    n.allocate("normal", SECRET);
    assert_eq!(n.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(echo.addr)]).class(), Class::Success);
    n.send_channel(0x4000, b"echo me");
    assert!(matches!(n.recv(Duration::from_secs(2)), Some(Incoming::Channel { number: 0x4000, .. })));
    assert_eq!(echo.echoed(), 1, "only the normal allocation's datagram reached the echo peer");

    // A third and a fourth check allocation from this address (Chromium's
    // second network), a fifth: quota.
    let mut more: Vec<UdpClient> = (0..3).map(|_| UdpClient::new("127.0.0.1", server.addr)).collect();
    assert_eq!(allocate_with(&mut more[0], &user, &pass).class(), Class::Success);
    assert_eq!(allocate_with(&mut more[1], &user, &pass).class(), Class::Success);
    assert_eq!(allocate_with(&mut more[2], &user, &pass).code(), Some(486));
    assert_eq!(server.metric("turnd_check_allocations_total"), 4.0);
    assert_eq!(server.metric("turnd_check_credentials_total{result=\"issued\"}"), 1.0);
}

#[test]
fn check_allocations_are_capped_at_512_kbits() {
    let server = check_server("");
    let (user, pass, _) = credentials(&server, "");
    let (mut a, mut b) = (UdpClient::new("127.0.0.1", server.addr), UdpClient::new("127.0.0.1", server.addr));
    let relayed_a = allocate_with(&mut a, &user, &pass).addr(attr::XOR_RELAYED_ADDRESS).unwrap();
    let relayed_b = allocate_with(&mut b, &user, &pass).addr(attr::XOR_RELAYED_ADDRESS).unwrap();
    assert_eq!(a.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(relayed_b)]).class(), Class::Success);
    assert_eq!(b.transact(method::CREATE_PERMISSION, &[peer_at(relayed_a)]).class(), Class::Success);
    // 300 datagrams of 1,000 bytes as fast as the socket takes them (about
    // 300 kB, over four times what 64 kB/s allows in the first second).
    let payload = vec![7u8; 1000];
    let t0 = Instant::now();
    for _ in 0..300 {
        a.send_channel(0x4000, &payload);
    }
    let sent_in = t0.elapsed();
    let mut got = 0;
    while let Some(Incoming::Data { .. }) = b.recv(Duration::from_millis(500)) {
        got += 1;
    }
    // A full bucket (one second's worth) plus what the rate refills meanwhile.
    // Each datagram costs its payload, IPv4 and UDP headers and ChannelData's 4 bytes.
    let allowed = (64_000.0 * (1.0 + sent_in.as_secs_f64())) / (1000.0 + 28.0 + 4.0);
    assert!(got as f64 <= allowed + 1.0 && got > 10, "{got} of 300 relayed in {sent_in:?}, {allowed:.0} allowed");
    assert!(server.metric("turnd_dropped_packets_total{reason=\"allocation_bandwidth\"}") >= (300 - got) as f64 - 1.0);
}

#[test]
fn check_credentials_expire() {
    let server = check_server("credential_ttl = \"5s\"\n");
    let (user, pass, v) = credentials(&server, "");
    assert_eq!(v["ttl"], 5);
    let expiry: u64 = user.split(':').next().unwrap().parse().unwrap();
    // Wait (bounded) until the expiry has passed, by the clock.
    let deadline = Instant::now() + Duration::from_secs(10);
    while wire::unix_now() <= expiry {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = UdpClient::new("127.0.0.1", server.addr);
    assert_eq!(allocate_with(&mut c, &user, &pass).code(), Some(401), "an expired check credential");
    assert_eq!(server.metric("turnd_auth_failures_total{reason=\"expired\"}"), 1.0);
    let (user, pass, _) = credentials(&server, "");
    let mut c = UdpClient::new("127.0.0.1", server.addr);
    assert_eq!(allocate_with(&mut c, &user, &pass).class(), Class::Success, "a fresh one works");
}

#[test]
fn the_token_gates_the_page_and_credentials_are_rate_limited_per_address() {
    let token = "tok-0123456789abcdef";
    let server = check_server(&format!("token = \"{token}\"\n"));
    assert_eq!(https(&server, "/check").0, 403);
    assert_eq!(https(&server, "/check/credentials?token=wrong-token-000000").0, 403);
    let (status, head, body) = https(&server, &format!("/check?token={token}"));
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html") && body.contains("<html"), "{head}");
    assert!(head.contains("content-security-policy: default-src 'none'"), "{head}");
    // The relay's name redirects to the page.
    let (status, head, _) = https(&server, &format!("/?token={token}"));
    assert_eq!(status, 302);
    assert!(head.contains(&format!("location: /check?token={token}")), "{head}");
    for i in 0..10 {
        assert_eq!(https(&server, &format!("/check/credentials?token={token}")).0, 200, "request {i}");
    }
    let (status, head, body) = https(&server, &format!("/check/credentials?token={token}"));
    assert_eq!(status, 429, "{body}");
    assert!(head.contains("retry-after: "), "{head}");
    assert_eq!(server.metric("turnd_check_credentials_total{result=\"issued\"}"), 10.0);
    assert_eq!(server.metric("turnd_check_credentials_total{result=\"rate_limited\"}"), 1.0);
    assert_eq!(server.metric("turnd_check_credentials_total{result=\"bad_token\"}"), 2.0);
}

#[test]
fn readyz_over_https_turns_unready_while_draining_and_http_listen_serves_the_page() {
    let http = common::free_port();
    let mut server = check_server(&format!("http_listen = \"127.0.0.1:{http}\"\n[limits]\ndrain_timeout = \"20s\"\n"));
    let (status, _, body) = curl(&format!("http://127.0.0.1:{http}/check/credentials"), &["-H", &format!("Host: {NAME}")]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("turns:{NAME}:{}", server.tls_port)), "{body}");
    assert_eq!(curl(&format!("http://127.0.0.1:{http}/check"), &[]).0, 200);
    // An allocation holds the drain open.
    let mut c = UdpClient::new("127.0.0.1", server.addr);
    c.allocate("drain", SECRET);
    assert_eq!(https(&server, "/readyz").0, 200);
    server.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = https(&server, "/readyz");
        if status == 503 {
            assert!(body.contains("draining"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "still {status} {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
}

#[test]
fn check_settings_are_validated_key_by_key() {
    let base = |extra: &str| {
        format!(
            "[auth]\nsecrets = [\"s3cret\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:3478\"\n\
             [[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:3478\"\n[check]\nenabled = true\n{extra}"
        )
    };
    for (extra, key, says) in [
        ("", "check.enabled", "tls listeners"),
        ("token = \"short\"\nhttp_listen = \"127.0.0.1:8081\"\n", "check.token", "16 to 128"),
        ("http_listen = \"127.0.0.1:3478\"\n", "check.http_listen", "already a TURN"),
        ("http_listen = \"nowhere\"\n", "check.http_listen", "not IP:PORT"),
        ("http_listen = \"127.0.0.1:8081\"\ncredential_ttl = \"1h\"\n", "check.credential_ttl", "at most"),
    ] {
        let dir = common::temp_dir("check-config");
        let path = dir.join("t.toml");
        std::fs::write(&path, base(extra)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_turnd")).arg("--config").arg(&path).args(["--check-config", "--file-only"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra}: {err}");
        assert!(err.contains(key) && err.contains(says), "{extra}: expected {key}: {says}, got {err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
