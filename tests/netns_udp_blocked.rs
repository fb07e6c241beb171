//! TURN over TLS on 443 from a network that blocks UDP, built for real: a
//! network namespace joined to the host by a veth pair, whose firewall drops
//! all outgoing UDP and lets TCP out only to port 443. turnd listens on the
//! host end (UDP and TCP 3478, TLS 443) and relays on the host's loopback.
//! From inside the namespace
//! - coturn's turnutils_uclient cannot allocate over UDP, and allocates and
//!   relays to an echo peer on the server side (127.0.0.2) without loss
//!   over TLS;
//! - headless Chromium (the page of tests/browser_chromium.rs) gathers no
//!   relay candidate from a `turn:...?transport=udp` URL that works from the
//!   host, and relays its data channel through `turns:HOST:443`.
//!
//! Needs root, `ip netns`, iptables (or nft), turnutils_uclient and
//! chromium; test.sh installs the packages. Fails, never skips, when
//! something is missing.

mod common;
#[path = "common/browser.rs"]
mod browser;
#[path = "common/netns.rs"]
mod netns;

use std::ffi::OsString;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use browser::{PageServer, PAGE_TIMEOUT};
use common::{EchoPeer, Turnd, SECRET};
use netns::NetNs;

const TLS_PORT: u16 = 443;
const PLAIN_PORT: u16 = 3478;

/// Starts `program args` inside the namespace under `timeout -k 2 SECS`, so
/// it is killed however it hangs.
fn spawn_in(ns: &NetNs, secs: u32, program: &str, args: &[&str]) -> Child {
    ns.command("timeout")
        .args(["-k", "2", &secs.to_string(), program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", ns.name()))
}

/// Waits for a child started by `spawn_in` (bounded by its `timeout`).
fn finish(child: Child) -> (i32, String) {
    let out: Output = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// turnutils_uclient's end-of-run summary: (sent, received, lost).
fn summary(text: &str) -> Option<(u64, u64, u64)> {
    let mut s = None;
    let mut lost = None;
    for line in text.lines() {
        if let Some(rest) = line.split(": start_mclient: tot_send_msgs=").nth(1) {
            let mut it = rest.split(", tot_recv_msgs=");
            if let (Some(a), Some(b)) =
                (it.next().and_then(|v| v.trim().parse().ok()), it.next().and_then(|v| v.trim().parse().ok()))
            {
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

/// "allocation created" lines of turnd's log for `client_ip` over `transport`.
fn allocations(log: &str, client_ip: &str, transport: &str) -> usize {
    let client = format!("client={client_ip}:");
    log.lines()
        .filter(|l| l.contains("allocation created") && l.contains(&client))
        .filter(|l| l.contains(&format!("transport={transport}")) || l.contains(&format!("transport=\"{transport}\"")))
        .count()
}

/// turnd on the namespace's host end: UDP and TCP on 3478, TLS on 443 (a
/// self-signed certificate), relaying on 127.0.0.1 to peers on 127.0.0.0/8.
/// Ready once a UDP Binding from the host to HOST:3478 is answered.
fn start_turnd(ns: &NetNs) -> Turnd {
    let extra = "[peers]\nallow = [\"127.0.0.0/8\"]\n[limits]\nlegacy_channel_numbers = true\n[log]\nlevel = \"debug\"\n";
    Turnd::builder().three(&ns.host_ip().to_string(), PLAIN_PORT, TLS_PORT, "127.0.0.1").extra(extra).start()
}

#[test]
fn udp_blocked_network_allocates_over_tls_on_443() {
    let t0 = Instant::now();
    assert!(
        Command::new("sh").args(["-c", "command -v turnutils_uclient"]).output().unwrap().status.success(),
        "turnutils_uclient is missing: test.sh installs Debian's coturn package"
    );

    let ns = NetNs::create_udp_blocked();
    let host = ns.host_ip().to_string();
    let ns_ip = ns.ns_ip().to_string();
    let server = start_turnd(&ns);
    // turnd answered a UDP Binding on host:3478 from the host (the harness
    // waits for it), so its UDP listener works outside the namespace.
    let peer = EchoPeer::start();
    let peer_port = peer.addr.port().to_string();
    let diag = |what: &str, text: &str| {
        format!(
            "{what}\n--- output ---\n{text}\n--- firewall in {} ---\n{}\n--- turnd log ---\n{}",
            ns.name(),
            ns.firewall_rules(),
            server.log()
        )
    };

    // Controls on the host side: turnd's TCP listeners accept from the host.
    for port in [PLAIN_PORT, TLS_PORT] {
        let a: SocketAddr = format!("{host}:{port}").parse().unwrap();
        TcpStream::connect_timeout(&a, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("turnd's TCP listener {a} refuses the host itself: {e}"));
    }

    // The same TURN-over-UDP run, from the host and from inside the namespace.
    let udp_args =
        ["-c", "-e", common::PEER_IP, "-r", &peer_port, "-n", "5", "-m", "1", "-p", "3478", "-W", SECRET, &host];
    // Control: from the host, this command line allocates and relays over UDP.
    let host_udp = Command::new("timeout")
        .args(["-k", "2", "25", "turnutils_uclient"])
        .args(udp_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run turnutils_uclient");
    // From inside the namespace, at the same time:
    //  - TURN over UDP to host:3478: the firewall's DROP makes send() fail
    //    with EPERM at once ("send: Operation not permitted", rc 1); a
    //    silent drop further away would hang it until `timeout` (rc 124),
    //  - a plain TCP connect to host:3478 (turnd's TCP listener): blocked,
    //  - a plain TCP connect to host:443: allowed.
    let drops_before = ns.udp_drops();
    let udp_try = spawn_in(&ns, 5, "turnutils_uclient", &udp_args);
    let tcp_3478 = spawn_in(&ns, 3, "bash", &["-c", &format!("exec 3<>/dev/tcp/{host}/{PLAIN_PORT}")]);
    let tcp_443 = spawn_in(&ns, 3, "bash", &["-c", &format!("exec 3<>/dev/tcp/{host}/{TLS_PORT}")]);
    let (rc_443, text_443) = finish(tcp_443);
    let (rc_3478, text_3478) = finish(tcp_3478);
    let (rc_udp, text_udp) = finish(udp_try);
    let drops = ns.udp_drops() - drops_before;

    assert_eq!(rc_443, 0, "{}", diag("a TCP connect to port 443 from the namespace must succeed", &text_443));
    assert_ne!(rc_3478, 0, "{}", diag("a TCP connect to port 3478 from the namespace must be blocked", &text_3478));
    assert!(
        rc_udp == 124 || (rc_udp != 0 && text_udp.contains("Operation not permitted")),
        "{}",
        diag(&format!("TURN over UDP from the namespace must fail by the block (rc {rc_udp})"), &text_udp)
    );
    assert!(summary(&text_udp).is_none(), "{}", diag("TURN over UDP relayed something", &text_udp));
    assert!(drops > 0, "{}", diag("the namespace's firewall dropped no UDP: the UDP failure is not the block", &text_udp));
    let log = server.log();
    assert_eq!(allocations(&log, &ns_ip, "udp"), 0, "{}", diag("turnd allocated over UDP for the namespace", &text_udp));
    eprintln!(
        "UDP from {ns_ip}: rc {rc_udp} ({}), {drops} datagram(s) dropped by the namespace's firewall; \
         TCP 3478 rc {rc_3478}; TCP 443 rc 0",
        text_udp.lines().last().unwrap_or("").trim()
    );

    let (rc_host, text_host) = finish(host_udp);
    assert_eq!(rc_host, 0, "{}", diag("control: TURN over UDP from the host failed", &text_host));
    let host_sum = summary(&text_host);
    assert_eq!(host_sum, Some((5, 5, 0)), "{}", diag("control: TURN over UDP from the host lost data", &text_host));
    // The log check above is not vacuous: the host's UDP allocation is there.
    assert!(
        allocations(&server.log(), &host, "udp") >= 1,
        "{}",
        diag("control: turnd logged no UDP allocation from the host", "")
    );

    // TURN over TLS on 443 from inside the namespace: allocations, channels,
    // and data relayed to the echo peer on the server side, without loss.
    let (sessions, messages) = (2u64, 20u64);
    let tls_run = spawn_in(
        &ns,
        25,
        "turnutils_uclient",
        &[
            "-t", "-S", "-c", "-e", common::PEER_IP, "-r", &peer_port, "-m", &sessions.to_string(), "-n",
            &messages.to_string(), "-l", "200", "-p", &TLS_PORT.to_string(), "-W", SECRET, &host,
        ],
    );
    let (rc_tls, text_tls) = finish(tls_run);
    assert_eq!(rc_tls, 0, "{}", diag("TURN over TLS on 443 from the namespace failed", &text_tls));
    let (sent, received, lost) =
        summary(&text_tls).unwrap_or_else(|| panic!("{}", diag("no summary from turnutils_uclient", &text_tls)));
    let echoed = peer.finish();
    eprintln!("TLS on 443 from {ns_ip}: sent {sent} received {received} lost {lost} (peer echoed {echoed})");
    assert_eq!(sent, sessions * messages, "{}", diag("wrong message count", &text_tls));
    assert_eq!((received, lost), (sent, 0), "{}", diag("loss through turnd over TLS", &text_tls));
    assert!(echoed >= sent, "the echo peer saw only {echoed} of {sent} messages");

    let log = server.log();
    let tls_allocs = allocations(&log, &ns_ip, "tls");
    assert!(
        tls_allocs as u64 >= sessions,
        "{}",
        diag(&format!("turnd logged {tls_allocs} TLS allocations from {ns_ip}, expected >= {sessions}"), "")
    );
    assert_eq!(allocations(&log, &ns_ip, "udp"), 0, "{}", diag("turnd allocated over UDP for the namespace", ""));
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}

/// How long the page in the namespace gets to gather a candidate over TURN
/// on UDP before it reports failure. Chromium ignores the EPERM of its
/// blocked sends and retransmits: only after ~40 s does it fire
/// icecandidateerror 701 "TURN allocate request timed out." and end
/// gathering. From the host the same URL yields candidates in well under a
/// second, so a few seconds without one is the failure.
const UDP_CONTROL_TIMEOUT: Duration = Duration::from_secs(6);

#[test]
fn browser_in_udp_blocked_network_relays_over_tls_on_443() {
    let t0 = Instant::now();
    let ns = NetNs::create_udp_blocked();
    let host = ns.host_ip().to_string();
    let ns_ip = ns.ns_ip().to_string();
    let server = start_turnd(&ns);
    let (username, password) = browser::credentials();
    // The page server listens on the namespace's own loopback: the browser
    // in the namespace loads the page and posts its result without the
    // namespace's firewall being opened for anything.
    let page = PageServer::on(ns.tcp_listener("127.0.0.1:0".parse().unwrap()));
    let in_ns = |argv: &[OsString]| {
        let mut c = ns.command(argv[0].to_str().unwrap());
        c.args(&argv[1..]);
        c
    };
    let diag = |what: &str, r: &serde_json::Value| {
        format!(
            "{what}\n--- page result ---\n{}\n--- firewall in {} ---\n{}\n--- turnd log ---\n{}",
            browser::pretty(r),
            ns.name(),
            ns.firewall_rules(),
            server.log()
        )
    };

    // Control: the same TURN-over-UDP URL, at the same time from the host
    // (relays) and from inside the namespace (no relay candidate at all).
    let udp_url = format!("turn:{host}:{PLAIN_PORT}?transport=udp");
    let drops_before = ns.udp_drops();
    let (host_udp, ns_udp) = std::thread::scope(|s| {
        let from_host = s.spawn(|| {
            let page = PageServer::start("127.0.0.1");
            browser::run_browser_case(&page, &page.page_url(), &udp_url, &username, &password, PAGE_TIMEOUT, None)
        });
        let from_ns = browser::run_browser_case(
            &page,
            &page.page_url(),
            &udp_url,
            &username,
            &password,
            UDP_CONTROL_TIMEOUT,
            Some(&in_ns),
        );
        (from_host.join().unwrap_or_else(|e| std::panic::resume_unwind(e)), from_ns)
    });
    let drops = ns.udp_drops() - drops_before;

    browser::assert_relayed(&host_udp, &udp_url, "udp", "127.0.0.1", &|| {
        diag("control: the browser on the host did not relay over TURN/UDP", &host_udp)
    });
    assert!(
        allocations(&server.log(), &host, "udp") >= 1,
        "{}",
        diag("control: turnd logged no UDP allocation from the host", &host_udp)
    );
    eprintln!("from the host: {}", browser::describe(&host_udp));

    assert_eq!(ns_udp["ok"], serde_json::Value::Bool(false), "{}", diag("TURN over UDP worked from the namespace", &ns_udp));
    // The page failed for want of a candidate, not for a broken page.
    let error = ns_udp["error"].as_str().unwrap_or("");
    assert!(
        error.starts_with("timed out after ") || error.ends_with(&format!("no relay candidate from {udp_url}")),
        "{}",
        diag(&format!("the page in the namespace failed for another reason: {error:?}"), &ns_udp)
    );
    for pc in ["a", "b"] {
        let gathered = ns_udp["gathered"][pc].as_array().map(Vec::len);
        assert_eq!(gathered, Some(0), "{}", diag(&format!("{pc} gathered a candidate over UDP from the namespace"), &ns_udp));
    }
    assert!(
        ns_udp["pairA"].is_null() && ns_udp["pairB"].is_null(),
        "{}",
        diag("a candidate pair over UDP from the namespace", &ns_udp)
    );
    assert!(drops > 0, "{}", diag("the namespace's firewall dropped no UDP: the failure is not the block", &ns_udp));
    assert_eq!(
        allocations(&server.log(), &ns_ip, "udp"),
        0,
        "{}",
        diag("turnd allocated over UDP for the namespace", &ns_udp)
    );
    eprintln!(
        "from {ns_ip} via {udp_url}: no candidate, page failed after {} ms ({}), {drops} datagram(s) dropped; \
         candidate errors: {}",
        ns_udp["elapsedMs"],
        ns_udp["error"].as_str().unwrap_or("?"),
        ns_udp["candidateErrors"]
    );

    // TURN over TLS on 443 from inside the namespace, relay-only: both peer
    // connections allocate on turnd and the data channel goes through.
    let tls_url = format!("turns:{host}:{TLS_PORT}?transport=tcp");
    let r = browser::run_browser_case(&page, &page.page_url(), &tls_url, &username, &password, PAGE_TIMEOUT, Some(&in_ns));
    browser::assert_relayed(&r, &tls_url, "tls", "127.0.0.1", &|| {
        diag("the browser in the namespace did not relay over TLS on 443", &r)
    });
    let log = server.log();
    let tls_allocs = allocations(&log, &ns_ip, "tls");
    assert!(tls_allocs >= 2, "{}", diag(&format!("turnd logged {tls_allocs} TLS allocations from {ns_ip}, expected >= 2"), &r));
    assert_eq!(allocations(&log, &ns_ip, "udp"), 0, "{}", diag("turnd allocated over UDP for the namespace", &r));
    eprintln!("from {ns_ip}: {} ({tls_allocs} TLS allocations)", browser::describe(&r));
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}
