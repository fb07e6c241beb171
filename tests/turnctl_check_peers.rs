//! `turnctl check` tests the peer leg from outside the relay. turnd runs in
//! a network namespace on its veth address (198.18.x.2, not loopback) and
//! relays from it; `turnctl check` runs on the host end. With a firewall in
//! the namespace that drops inbound UDP to the relay port range on the veth
//! (as a provider's firewall would), the relay's round trip between its own
//! allocations still works (it stays inside the host), but a datagram from
//! the checking machine to a relayed address never arrives: check must say
//! so, name the cause and what to open, and exit 1. Without the firewall it
//! passes cleanly.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::{Turnd, SECRET};
use netns::NetNs;
use serde_json::Value;

const TURNCTL: &str = env!("CARGO_BIN_EXE_turnctl");

#[test]
fn check_sees_a_firewall_on_the_relay_port_range_and_passes_without_it() {
    let ns = NetNs::create_open();
    let relay = ns.ns_ip().to_string();
    let probe: SocketAddr = format!("{relay}:3478").parse().unwrap();
    let wrap: Vec<String> = ["ip", "netns", "exec", ns.name()].iter().map(|s| s.to_string()).collect();
    // The checking machine's address (198.18.x.1) is in a range refused by
    // default: allow it as a peer, as a public address would be.
    let server = Turnd::builder().wrap(&wrap).config(probe, |_| {
        format!(
            "realm = \"{realm}\"\n[auth]\nsecrets = [\"{SECRET}\"]\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"{relay}:3478\"\n\
             [[listen]]\ntransport = \"tcp\"\naddress = \"{relay}:3478\"\n\
             [relay]\nip = \"{relay}\"\nports = \"20000-29999\"\n\
             [peers]\nallow = [\"198.18.0.0/15\"]\n",
            realm = common::REALM
        )
    }).start();
    let check = |extra: &[&str]| {
        let mut c = Command::new(TURNCTL);
        c.args(["check", &relay, "--secret", SECRET, "--no-tls", "--timeout", "2s"]).args(extra);
        common::run_bounded(&mut c, Duration::from_secs(40))
    };
    let diag = |r: &common::Run| {
        format!("exit {}\n--- stdout ---\n{}--- stderr ---\n{}--- firewall ---\n{}--- turnd ---\n{}", r.code, r.stdout, r.stderr, ns.firewall_rules(), server.log())
    };
    let json = |r: &common::Run| -> Value { serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", diag(r))) };
    let host = ns.host_ip().to_string();

    // Open: every leg works, exit 0.
    let r = check(&["--json"]);
    assert_eq!(r.code, 0, "{}", diag(&r));
    let j = json(&r);
    let leg = &j["peer_leg"];
    assert_eq!(leg["tested"], true, "{}", diag(&r));
    assert_eq!(leg["result"]["status"], "ok", "{}", diag(&r));
    assert_eq!(leg["from"].as_str().unwrap().split(':').next(), Some(host.as_str()), "{leg}");
    assert_eq!(leg["to"].as_str().unwrap().split(':').next(), Some(relay.as_str()), "{leg}");
    let r = check(&[]);
    assert_eq!(r.code, 0, "{}", diag(&r));
    assert!(r.stdout.contains("peer leg     ok: UDP from "), "{}", diag(&r));
    assert!(!r.stdout.contains("Peers cannot reach the relay"), "{}", diag(&r));

    // The provider's firewall: inbound UDP to the relay ports dropped on the veth.
    ns.drop_inbound_udp(20000, 29999);
    let r = check(&["--json"]);
    assert_eq!(r.code, 1, "a relay whose peers cannot reach it carries no call: {}", diag(&r));
    let j = json(&r);
    assert_eq!(j["ok"], false);
    let udp = j["transports"].as_array().unwrap().iter().find(|t| t["transport"] == "udp").unwrap();
    assert_eq!(udp["relay"]["status"], "ok", "the round trip inside the relay host never crosses the firewall: {}", diag(&r));
    let leg = &j["peer_leg"];
    assert_eq!(leg["tested"], true, "{}", diag(&r));
    assert_eq!(leg["result"]["status"], "failed", "{}", diag(&r));
    assert_eq!(leg["result"]["error"], "timeout", "{}", diag(&r));
    let meanings = j["meanings"].to_string();
    assert!(meanings.contains("drops inbound UDP to the relay port range"), "{}", diag(&r));
    let r = check(&[]);
    assert_eq!(r.code, 1, "{}", diag(&r));
    for needle in [
        "peer leg     FAILED: sent from ",
        "Peers cannot reach the relay",
        "firewall or its provider's",
        "open inbound UDP on the relay port range, UDP LOW-HIGH as in relay.ports (49152-65535 by default) (the relayed port 2",
        "Clients reach the relay, but media from peers does not",
    ] {
        assert!(r.stdout.contains(needle), "missing {needle:?}: {}", diag(&r));
    }
    assert!(!r.stdout.contains("ran on the relay host itself"), "checked from another machine: {}", diag(&r));
    eprintln!("{}", r.stdout);

    // Firewall gone: clean again.
    ns.allow_inbound_udp();
    let r = check(&[]);
    assert_eq!(r.code, 0, "{}", diag(&r));
}
