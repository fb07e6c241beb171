//! A real call relayed by the XDP fast path (feature `xdp`): two headless
//! Chromium processes with fake camera and microphone (`common/call.rs`),
//! the participant relay-only over `turn:HOST:PORT?transport=udp` from the
//! client's namespace of the XDP rig (`common/xdp.rs`, IPv4 only), the
//! other side in the peer's namespace with its host candidate, as a
//! videobridge. Audio and video flow both ways with next to no loss, and
//! the host ends' redirect counters show that the program, not turnd's
//! sockets, carried the call's media: each moved by thousands (at least
//! 1,500), and by at least nine in ten of the RTP packets the receiving
//! browser counted.
//!
//! Compiled only with `--features xdp`. Needs root, `ip netns`, ethtool
//! and chromium. Fails, never skips.
#![cfg(feature = "xdp")]

mod common;
#[path = "common/browser.rs"]
mod browser;
#[path = "common/call.rs"]
mod call;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/xdp.rs"]
mod xdp_rig;

use std::time::Duration;

use serde_json::Value;

use xdp_rig::Rig;

/// RTP packets (audio and video) a side received since its call began.
fn packets_received(r: &Value) -> u64 {
    let end = &r["end"]["inbound"];
    ["audio", "video"].iter().map(|k| end[*k]["packetsReceived"].as_u64().unwrap_or(0)).sum()
}

#[test]
fn a_calls_media_is_relayed_by_the_program() {
    let rig = Rig::start_v4("");
    let turn_url = format!("turn:{}?transport=udp", rig.server);
    let relay_ip = rig.peer_ns.host_ip().to_string();
    let other_ip = rig.peer_ns.ns_ip().to_string();
    // From the first packet on, the program finds its next hops.
    rig.resolve_neighbours();
    let before = rig.redirects();
    let context = || format!("--- turnd log ---\n{}", rig.turnd.log());
    // 20 s of 640x480 video (the fake camera gives 20 frames/s) and audio:
    // about 2,500 packets each way, of which audio alone is over 1,000.
    let media = call::Media { duration: Duration::from_secs(20), video: (640, 480, 30) };
    let (p, b) = call::run_call_with(&rig.client_ns, &turn_url, &[], &rig.peer_ns, &media, &context);
    let after = rig.redirects();
    call::assert_call(&p, &b, &turn_url, "udp", &relay_ip, &other_ip, &context);
    for (name, r) in [("participant", &p), ("other side", &b)] {
        for kind in ["audio", "video"] {
            let loss = call::loss_pct(r, kind);
            assert!(loss < 1.0, "{name}: {kind} loss {loss:.2}% over the call\n{}", context());
        }
    }
    // Toward the other side: what the participant sent, redirected on the
    // client's host end; toward the participant: on the peer's.
    let moved = (after.0 - before.0, after.1 - before.1);
    let received = (packets_received(&b), packets_received(&p));
    eprintln!("{}", call::figures("participant receives", &p));
    eprintln!("{}", call::figures("other side receives", &b));
    eprintln!("redirected by the program (toward the other side, toward the participant): {moved:?}; RTP received {received:?}");
    for (dir, moved, received) in [("toward the other side", moved.0, received.0), ("toward the participant", moved.1, received.1)] {
        assert!(moved >= 1500, "{dir}: the program relayed only {moved} packets of the call\n{}", context());
        assert!(
            moved * 10 >= received * 9,
            "{dir}: the program relayed {moved} packets, the receiving browser counted {received} RTP packets\n{}",
            context()
        );
    }
}
