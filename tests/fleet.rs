//! Several relays: a relay taken out of service with `turnctl drain` sends
//! new clients to a sibling (300 Try Alternate with ALTERNATE-SERVER) while
//! its own calls go on, and its /readyz turns 503 for DNS health checks.
//!
//! The client is coturn's turnutils_uclient, which we did not write: it
//! checks the MESSAGE-INTEGRITY of the 300, follows ALTERNATE-SERVER, and
//! allocates and relays to an echo peer on the sibling, over UDP, TCP and
//! TLS. The draining relay (A) listens on 127.0.0.1, the sibling (B) on
//! 127.0.0.3 on the same ports, and A names B by address only: each client
//! is sent to the port it came in on. Every wait is bounded.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{turnctl, EchoPeer, Turnd, REALM, SECRET};
use turnd::client::{Client, Credentials};
use turnd::turn::Transport;

const SIBLING_IP: &str = "127.0.0.3";

/// A (127.0.0.1, UDP and TCP on one port, TLS on another) naming `alternates`
/// in `[[drain.alternate]]` (TOML tables; may be empty).
fn start_a(alternates: &str) -> Turnd {
    Turnd::builder().streams().extra(&format!("[limits]\nlegacy_channel_numbers = true\n{alternates}")).start()
}

/// B, the sibling: UDP, TCP and TLS on SIBLING_IP with A's ports, the same
/// secret and realm, relaying on 127.0.0.1 from its own port range.
fn start_b(a: &Turnd) -> Turnd {
    let (port, tls_port) = (a.port, a.tls_port);
    let probe = format!("{SIBLING_IP}:{port}").parse().unwrap();
    Turnd::builder()
        .config(probe, move |dir| {
            common::make_cert(dir, "cert.pem", "key.pem", "turnd-sibling");
            format!(
                "realm = \"{REALM}\"\n[auth]\nsecrets = [\"{SECRET}\"]\n\
                 [[listen]]\ntransport = \"udp\"\naddress = \"{SIBLING_IP}:{port}\"\n\
                 [[listen]]\ntransport = \"tcp\"\naddress = \"{SIBLING_IP}:{port}\"\n\
                 [[listen]]\ntransport = \"tls\"\naddress = \"{SIBLING_IP}:{tls_port}\"\n\
                 [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
                 [relay]\nip = \"127.0.0.1\"\nports = \"25000-29999\"\n\
                 [peers]\nallow = [\"127.0.0.0/8\"]\n[limits]\nlegacy_channel_numbers = true\n",
                dir.join("cert.pem").display(),
                dir.join("key.pem").display()
            )
        })
        .start()
}

/// turnutils_uclient against 127.0.0.1 (A) over `mode` (`[]` UDP, `["-t"]`
/// TCP, `["-t", "-S"]` TLS): one client, `n` messages to the echo peer.
fn uclient(a: &Turnd, mode: &[&str], peer: &EchoPeer, n: u32) -> (i32, String) {
    assert!(common::on_path("turnutils_uclient"), "turnutils_uclient is missing: test.sh installs Debian's coturn package");
    let port = if mode.contains(&"-S") { a.tls_port } else { a.port };
    let out = Command::new("timeout")
        .args(["-k", "2", "30", "turnutils_uclient"])
        .args(mode)
        .args(["-c", "-e", common::PEER_IP, "-r", &peer.addr.port().to_string(), "-m", "1", "-n", &n.to_string(), "-l", "120"])
        .args(["-p", &port.to_string(), "-W", SECRET, "127.0.0.1"])
        .output()
        .expect("run turnutils_uclient");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// (sent, received, lost) from turnutils_uclient's summary.
fn summary(text: &str) -> Option<(u64, u64, u64)> {
    let mut s = None;
    let mut lost = None;
    for line in text.lines() {
        if let Some(rest) = line.split("start_mclient: tot_send_msgs=").nth(1) {
            let mut it = rest.split(", tot_recv_msgs=");
            if let (Some(a), Some(b)) = (it.next().and_then(|v| v.trim().parse().ok()), it.next().and_then(|v| v.trim().parse().ok())) {
                s = Some((a, b));
            }
        }
        if let Some(rest) = line.split("Total lost packets ").nth(1) {
            lost = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        }
    }
    let (sent, received) = s?;
    Some((sent, received, lost?))
}

/// `/readyz` over HTTPS on `server`'s TLS listener, where a DNS health
/// check of the fleet asks: (status, body).
fn readyz_https(server: &Turnd) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5", "-w", "\n%{http_code}", &format!("https://127.0.0.1:{}/readyz", server.tls_port)])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// "allocation created" lines in a log, over `transport` ("" for any).
fn created(log: &str, transport: &str) -> usize {
    log.lines().filter(|l| l.contains("allocation created") && l.contains(&format!("transport=\"{transport}"))).count()
}

fn credentials() -> Credentials {
    let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let username = format!("{expiry}:held");
    Credentials { password: turnd::auth::rest_password(SECRET.as_bytes(), &username), username }
}

/// A call in progress on `server`: a UDP allocation with a permission for
/// the echo peer.
fn held_allocation(server: &Turnd, peer: &EchoPeer) -> Client {
    let mut c = Client::connect(Transport::Udp, server.addr, Duration::from_secs(3), None).unwrap();
    c.set_credentials(credentials());
    c.allocate().unwrap();
    c.create_permission(peer.addr).unwrap();
    c
}

/// The held allocation still relays: a datagram to the echo peer comes back.
fn relays(c: &mut Client, peer: &EchoPeer, what: &str) {
    c.send_indication(peer.addr, what.as_bytes()).unwrap();
    let (from, data) = c.recv_data(Duration::from_secs(3)).unwrap_or_else(|e| panic!("{what}: no echo through the held allocation: {e}"));
    assert_eq!((from, data.as_slice()), (peer.addr, what.as_bytes()), "{what}");
}

#[test]
fn turnctl_drain_sends_new_clients_to_the_sibling_while_calls_go_on() {
    // uclient does not check certificates: B takes TLS clients too.
    let a = start_a(&format!("[[drain.alternate]]\naddress = \"{SIBLING_IP}\"\ntls_clients = true\n"));
    let b = start_b(&a);
    let peer = EchoPeer::start();
    let diag = |what: &str, text: &str| format!("{what}\n--- output ---\n{text}\n--- A's log ---\n{}\n--- B's log ---\n{}", a.log(), b.log());

    // Serving: ready, and the status says where a drain would send clients.
    let mut held = held_allocation(&a, &peer);
    relays(&mut held, &peer, "before");
    assert_eq!(a.http_get("/readyz").0, 200);
    assert_eq!(readyz_https(&a).0, 200);
    let (rc, status) = turnctl(&a, &["status"]);
    assert_eq!(rc, 0, "{status}");
    assert!(status.contains(&format!("draining:    no (turnctl drain would send new allocations to {SIBLING_IP})")), "{status}");
    // Control: before the drain, uclient allocates on A itself.
    let (rc, text) = uclient(&a, &[], &peer, 5);
    assert_eq!((rc, summary(&text)), (0, Some((5, 5, 0))), "{}", diag("control: uclient on A", &text));
    assert!(created(&a.log(), "udp") > 1, "{}", diag("control: A allocated nothing for uclient", &text));

    // Drain.
    let (rc, out) = turnctl(&a, &["drain"]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains(&format!("new allocations go to {SIBLING_IP} (300 Try Alternate)")), "{out}");
    assert!(out.contains("allocation(s) keep relaying until they end"), "{out}");
    // /readyz: 503 with the reason, for a DNS health check.
    let (code, body) = a.http_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining") && body.contains("turnctl drain"), "{body}");
    // The same on the public TLS port, where a DNS health check asks.
    let (code, body) = readyz_https(&a);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(a.metric("turnd_draining"), 1.0);
    assert_eq!(a.metric("turnd_ready"), 0.0);
    assert_eq!(b.http_get("/readyz").0, 200, "the sibling stays ready");
    let (rc, status) = turnctl(&a, &["status"]);
    assert_eq!(rc, 0, "{status}");
    assert!(status.lines().next().unwrap_or("").ends_with("DRAINING"), "{status}");
    assert!(status.contains("draining:    yes (turnctl drain;"), "{status}");
    assert!(status.contains(&format!("new allocations go to {SIBLING_IP} (300 Try Alternate), 0 so far")), "{status}");
    let (rc, json) = turnctl(&a, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json} (rc {rc})"));
    assert_eq!(v["drain"]["state"], "draining", "{v}");
    assert_eq!(v["drain"]["alternates"][0], SIBLING_IP, "{v}");

    // New clients over each transport: the 300 sends them to B, where they
    // allocate and relay without loss; A allocates nothing more.
    let a_before = created(&a.log(), "");
    for (mode, transport) in [(&[][..], "udp"), (&["-t"][..], "tcp"), (&["-t", "-S"][..], "tls")] {
        let b_before = created(&b.log(), transport);
        let (rc, text) = uclient(&a, mode, &peer, 10);
        assert_eq!(rc, 0, "{}", diag(&format!("uclient over {transport} while A drains"), &text));
        assert!(text.contains("error 300 (Try Alternate)"), "{}", diag(&format!("{transport}: uclient saw no 300"), &text));
        assert_eq!(summary(&text), Some((10, 10, 0)), "{}", diag(&format!("{transport}: relayed through the sibling"), &text));
        assert!(created(&b.log(), transport) > b_before, "{}", diag(&format!("{transport}: B logged no allocation"), &text));
        eprintln!("{transport}: redirected to {SIBLING_IP}, 10 of 10 echoed through the sibling");
    }
    assert_eq!(created(&a.log(), ""), a_before, "{}", diag("A allocated while draining", ""));
    // turnctl check (our own client, which does not follow redirects) says why.
    let out = Command::new("timeout")
        .arg("30")
        .arg(env!("CARGO_BIN_EXE_turnctl"))
        .args(["check", "127.0.0.1", "--port", &a.port.to_string(), "--no-tls", "--secret", SECRET, "--timeout", "2s"])
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("the relay is draining (turnctl drain) and sends new clients to a sibling relay"), "{text}");
    let redirected = a.metric("turnd_allocations_redirected_total");
    assert!(redirected >= 3.0, "redirected {redirected}");
    assert_eq!(a.metric("turnd_responses_total{code=\"300\",method=\"allocate\"}"), redirected);
    let (_, status) = turnctl(&a, &["status"]);
    assert!(status.contains(&format!("(300 Try Alternate), {redirected} so far")), "{status}");

    // The call that was there goes on: it relays, refreshes and adds a peer.
    relays(&mut held, &peer, "while draining");
    assert!(held.refresh(600).unwrap() > 0);
    held.create_permission("127.0.0.2:9".parse().unwrap()).unwrap();
    relays(&mut held, &peer, "after a refresh");

    // Resume: ready again, and new clients stay on A.
    let (rc, out) = turnctl(&a, &["resume"]);
    assert_eq!((rc, out.trim()), (0, "resumed: new allocations are taken again"));
    assert_eq!(a.http_get("/readyz").0, 200);
    assert_eq!(readyz_https(&a).0, 200);
    assert_eq!(a.metric("turnd_draining"), 0.0);
    let (rc, text) = uclient(&a, &[], &peer, 5);
    assert_eq!((rc, summary(&text)), (0, Some((5, 5, 0))), "{}", diag("uclient on A after resume", &text));
    assert!(!text.contains("error 300"), "{}", diag("a 300 after resume", &text));
    assert!(created(&a.log(), "") > a_before, "{}", diag("A allocated nothing after resume", &text));
    let (rc, out) = turnctl(&a, &["resume"]);
    assert_eq!((rc, out.trim()), (0, "was not draining: new allocations are taken"));

    // SIGTERM drains for good: resume and drain are refused, /readyz says why.
    a.signal("TERM");
    a.wait_log("draining: no new allocations");
    let (code, body) = a.http_get("/readyz");
    assert_eq!((code, body.trim()), (503, "draining: shutting down"));
    let (rc, out) = turnctl(&a, &["resume"]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("shutting down") && out.contains("cannot take new allocations"), "{out}");
    let (rc, out) = turnctl(&a, &["drain"]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("shutting down already"), "{out}");
    let (_, status) = turnctl(&a, &["status"]);
    assert!(status.contains("draining:    yes (shutting down (SIGTERM)"), "{status}");
    // The held call still relays after SIGTERM (until it ends or drain_timeout).
    relays(&mut held, &peer, "after SIGTERM");
}

#[test]
fn without_a_sibling_a_drain_refuses_with_508_until_a_reload_names_one() {
    let mut a = start_a("");
    let b = start_b(&a);
    let peer = EchoPeer::start();
    let diag = |what: &str, text: &str| format!("{what}\n--- output ---\n{text}\n--- A's log ---\n{}\n--- B's log ---\n{}", a.log(), b.log());
    let (rc, status) = turnctl(&a, &["status"]);
    assert!(rc == 0 && status.contains("draining:    no\n"), "{status}");
    let (rc, out) = turnctl(&a, &["drain"]);
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("new allocations are refused (508: no [[drain.alternate]] configured)"), "{out}");
    assert_eq!(a.http_get("/readyz").0, 503);
    let (_, status) = turnctl(&a, &["status"]);
    assert!(status.contains("new allocations are refused (508; no [[drain.alternate]] configured)"), "{status}");
    // Today's answer: 508, and no allocation anywhere.
    let (rc, text) = uclient(&a, &[], &peer, 3);
    assert_ne!(rc, 0, "{}", diag("uclient allocated on a drained relay without a sibling", &text));
    assert!(text.contains("error 508"), "{}", diag("no 508", &text));
    assert_eq!(created(&a.log(), "") + created(&b.log(), ""), 0, "{}", diag("an allocation was made", &text));
    // A reload names the sibling: the drain now sends clients there.
    let cfg = std::fs::read_to_string(&a.config).unwrap() + &format!("\n[[drain.alternate]]\naddress = \"{SIBLING_IP}\"\n");
    std::fs::write(&a.config, cfg).unwrap();
    let (rc, out) = common::turnctl_reload(&a);
    assert_eq!(rc, 0, "{out}");
    let (_, status) = turnctl(&a, &["status"]);
    assert!(status.contains("draining:    yes (turnctl drain;") && status.contains(&format!("new allocations go to {SIBLING_IP}")), "{status}");
    let (rc, text) = uclient(&a, &["-t"], &peer, 5);
    assert_eq!((rc, summary(&text)), (0, Some((5, 5, 0))), "{}", diag("uclient after the reload", &text));
    assert!(created(&b.log(), "tcp") >= 1, "{}", diag("B did not get the client", &text));
    // A reload keeps the drain (it is the operator's, not the file's).
    assert_eq!(a.http_get("/readyz").0, 503);
    a.signal("TERM");
    assert!(a.wait_exit(Duration::from_secs(10)).is_some(), "with no allocation, SIGTERM ends A at once");
}

#[test]
fn turnctl_drain_wait_returns_when_the_last_call_ends() {
    let a = start_a(&format!("[[drain.alternate]]\naddress = \"{SIBLING_IP}\"\n"));
    let peer = EchoPeer::start();
    let mut held = held_allocation(&a, &peer);
    // A call that outlives the wait: exit 1, saying how many are left.
    let t = Instant::now();
    let (rc, out) = turnctl(&a, &["drain", "--wait", "2s"]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("1 allocation(s) left") && out.contains("still running after --wait 2s"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(10), "--wait 2s took {:?}", t.elapsed());
    // Waiting again; the call ends (the client releases it): exit 0.
    let waiting = Command::new("timeout")
        .arg("30")
        .arg(env!("CARGO_BIN_EXE_turnctl"))
        .args(["drain", "--wait", "20s", "--admin", &format!("127.0.0.1:{}", a.metrics_port)])
        .arg("--token-file")
        .arg(a.dir.join("admin-token"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(held.refresh(0).unwrap(), 0);
    let out = waiting.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("(it was already)") && text.trim_end().ends_with("drained: no allocation left"), "{text}");
    let (rc, out) = turnctl(&a, &["drain", "--wait", "soon"]);
    assert_eq!(rc, 2, "{out}");
    assert!(out.contains("--wait"), "{out}");
}
