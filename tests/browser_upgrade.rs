//! A real call through an upgrade in place: two headless Chromium
//! processes (fake camera and microphone, as in `tests/browser_call.rs`),
//! the participant relay-only over `turn:HOST:3478?transport=udp` from its
//! own network namespace, the other side in a second namespace where the
//! videobridge stands. Once media flows through turnd, `turnctl upgrade`
//! hands the relay to a second copy of the binary. The call goes on as if
//! nothing happened: both browsers' getStats show audio and video the
//! whole window, no video freeze, next to no loss; the allocation is the
//! new process's, on the same relayed address.
//!
//! Needs root, `ip netns` and chromium; test.sh installs the packages.
//! Fails, never skips, when something is missing.

mod common;
#[path = "common/browser.rs"]
mod browser;
#[path = "common/call.rs"]
mod call;
#[path = "common/netns.rs"]
mod netns;

use std::time::{Duration, Instant};

use serde_json::Value;

use common::Turnd;
use netns::NetNs;

const PLAIN_PORT: u16 = 3478;
const TLS_PORT: u16 = 443;

/// The participant's UDP allocation, once it has relayed `packets` to the peer.
fn flowing(server: &Turnd, client_ip: &str, packets: u64) -> Option<Value> {
    let prefix = format!("{client_ip}:");
    server.admin_get("/admin/sessions").as_array()?.iter().find(|s| s["client"].as_str().is_some_and(|c| c.starts_with(&prefix)) && s["transport"] == "udp" && s["packets_to_peer"].as_u64().unwrap_or(0) >= packets).cloned()
}

#[test]
fn a_call_goes_on_through_an_upgrade_in_place() {
    let participant = NetNs::create_open();
    let other = NetNs::create_open();
    let host = participant.host_ip().to_string();
    let participant_ip = participant.ns_ip().to_string();
    let relay_ip = other.host_ip().to_string();
    let other_ip = other.ns_ip().to_string();
    let mut server = Turnd::builder().three(&host, PLAIN_PORT, TLS_PORT, &relay_ip).extra(&format!("[peers]\nallow = [\"{other_ip}/32\"]\n")).start();
    let old_pid = server.pid();
    let turn_url = format!("turn:{host}:{PLAIN_PORT}?transport=udp");
    let binary = server.dir.join("turnd-next");
    std::fs::copy(env!("CARGO_BIN_EXE_turnd"), &binary).unwrap();

    let upgraded = std::thread::scope(|scope| {
        // Mid-call: once the participant's media flows through the relay.
        let upgrader = scope.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(40);
            let before = loop {
                if let Some(s) = flowing(&server, &participant_ip, 300) {
                    break s;
                }
                assert!(Instant::now() < deadline, "no media through turnd within 40 s:\n{}", server.log());
                std::thread::sleep(Duration::from_millis(100));
            };
            let (code, said) = common::turnctl_upgrade(&server, &binary);
            assert_eq!(code, 0, "turnctl upgrade: {said}\n{}", server.log());
            let pid = server.admin_get("/admin/status")["pid"].as_u64().unwrap() as u32;
            (before, pid, said)
        });
        let context = || format!("--- turnd log ---\n{}", server.log());
        let (p, b) = call::run_call(&participant, &turn_url, &[], &other, &context);
        let up = upgrader.join().unwrap();
        (p, b, up)
    });
    let (p, b, (before, new_pid, said)) = upgraded;
    // Reaped however the test ends below: the new process is not our child.
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _kill = Kill(new_pid);
    assert_ne!(new_pid, old_pid, "{said}");
    let context = || format!("{said}\n--- turnd log ---\n{}", server.log());
    call::assert_call(&p, &b, &turn_url, "udp", &relay_ip, &other_ip, &context);
    for (name, r) in [("participant", &p), ("other side", &b)] {
        for kind in ["audio", "video"] {
            let loss = call::loss_pct(r, kind);
            assert!(loss < 1.0, "{name}: {kind} loss {loss:.2}% over the call\n{}", context());
        }
        let freezes = call::delta(r, &["inbound", "video", "freezeCount"]);
        assert_eq!(freezes, 0.0, "{name}: the video froze {freezes} times\n{}", context());
    }
    // The same allocation, now the new process's: same relayed address, counters went on.
    let after = flowing(&server, &participant_ip, 0).expect("the participant's allocation is in the new process");
    assert_eq!(after["relayed"], before["relayed"]);
    assert!(after["packets_to_peer"].as_u64() > before["packets_to_peer"].as_u64());
    assert!(server.log().contains("took over from the previous process"));
    // The old process had only UDP: it has exited.
    assert!(server.wait_exit(Duration::from_secs(10)).is_some(), "the old process is gone");
    eprintln!("{}", call::figures("participant receives", &p));
    eprintln!("{}", call::figures("other side receives", &b));
    eprintln!("{}", said.trim());
}
