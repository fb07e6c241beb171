//! A real call through turnd from a network that blocks UDP: two headless
//! Chromium processes with fake camera and microphone
//! (`--use-fake-device-for-media-stream --use-fake-ui-for-media-stream`),
//! audio and video both ways for DURATION, asserted from getStats on both
//! sides.
//!
//! - The participant runs in a network namespace whose firewall drops all
//!   outgoing UDP and lets TCP out only to port 443 (`NetNs::create_udp_blocked`).
//!   It is relay-only (`iceTransportPolicy: "relay"`) over
//!   `turns:HOST:443?transport=tcp`.
//! - The other side stands where the videobridge stands: in a second
//!   namespace with ordinary UDP and no firewall (`NetNs::create_open`), with
//!   no TURN server at all, offering only its host candidate, as a
//!   videobridge offers its public address. So the media path is the one a
//!   Jitsi participant behind such a firewall gets: browser -TLS/TCP 443->
//!   turnd -UDP-> the other side's own address. (It is a namespace rather
//!   than the host itself because turnd refuses peers on its own host's
//!   addresses outside its relay ports.)
//!
//! turnd listens on the participant namespace's host end (TLS 443, plus
//! UDP/TCP 3478) and relays from the other namespace's host end, allowed to
//! reach exactly that namespace's address. The two browsers are separate
//! processes: the test's HTTP server carries the offer and the answer (with
//! all candidates; no trickle). Each page is served from its own
//! namespace's `lo` (`NetNs::tcp_listener`), both by this process with one
//! shared state, so no firewall rule is opened for signalling.
//!
//! Needs root, `ip netns`, iptables (or nft) and chromium; test.sh installs
//! the packages. Fails, never skips, when something is missing.

mod common;
#[path = "common/browser.rs"]
mod browser;
#[path = "common/call.rs"]
mod call;
#[path = "common/netns.rs"]
mod netns;

use std::time::Instant;

use common::Turnd;
use netns::NetNs;

const TLS_PORT: u16 = 443;
const PLAIN_PORT: u16 = 3478;

/// turnd with UDP/TCP 3478 and TLS 443 on `host`, relaying from `relay_ip`
/// to `peer_ip` only.
fn start_turnd(host: &str, relay_ip: &str, peer_ip: &str) -> Turnd {
    Turnd::builder().three(host, PLAIN_PORT, TLS_PORT, relay_ip).extra(&format!("[peers]\nallow = [\"{peer_ip}/32\"]\n[log]\nlevel = \"debug\"\n")).start()
}

/// "allocation created" lines of turnd's log for `client_ip` over `transport`.
fn allocations(log: &str, client_ip: &str, transport: &str) -> usize {
    let client = format!("client={client_ip}:");
    log.lines()
        .filter(|l| l.contains("allocation created") && l.contains(&client))
        .filter(|l| l.contains(&format!("transport={transport}")) || l.contains(&format!("transport=\"{transport}\"")))
        .count()
}

#[test]
fn call_from_udp_blocked_network_carries_audio_and_video_over_tls_443() {
    let t0 = Instant::now();
    let blocked = NetNs::create_udp_blocked();
    let open = NetNs::create_open();
    let host = blocked.host_ip().to_string();
    let blocked_ip = blocked.ns_ip().to_string();
    let relay_ip = open.host_ip().to_string();
    let bridge_ip = open.ns_ip().to_string();

    // turnd: listeners on the blocked namespace's host end, relaying from
    // the open namespace's host end to the other side's address only.
    let server = start_turnd(&host, &relay_ip, &bridge_ip);
    let turn_url = format!("turns:{host}:{TLS_PORT}?transport=tcp");
    let context = || format!("--- firewall in {} ---\n{}\n--- turnd log ---\n{}", blocked.name(), blocked.firewall_rules(), server.log());
    let (p, b) = call::run_call(&blocked, &turn_url, &[], &open, &context);
    call::assert_call(&p, &b, &turn_url, "tls", &relay_ip, &bridge_ip, &context);
    let log = server.log();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("peer refused by policy")).collect();
    assert!(refused.is_empty(), "turnd refused a peer during the call (the other side offered an address it may not reach):\n{}\n{}", refused.join("\n"), context());
    assert!(allocations(&log, &blocked_ip, "tls") >= 1, "turnd logged no TLS allocation from the participant\n{}", context());
    assert_eq!(allocations(&log, &blocked_ip, "udp"), 0, "turnd allocated over UDP for the participant\n{}", context());

    eprintln!("participant {blocked_ip} (UDP blocked, turns:{host}:443) <-> other side {bridge_ip} (UDP, host candidate), relayed via {relay_ip}");
    eprintln!("{}", call::figures("participant receives", &p));
    eprintln!("{}", call::figures("other side receives", &b));
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}
