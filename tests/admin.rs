//! turnctl status, sessions, disconnect and reload against a live turnd.

mod common;

use std::process::Command;

use common::{EchoPeer, Turnd, PEER_IP, SECRET};

fn turnctl(server: &Turnd, args: &[&str]) -> (i32, String, String) {
    turnctl_token(server, args, &server.dir.join("admin-token"))
}

fn turnctl_token(server: &Turnd, args: &[&str], token: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_turnctl"))
        .args(args)
        .args(["--admin", &format!("127.0.0.1:{}", server.metrics_port)])
        .arg("--token-file")
        .arg(token)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Two allocations by "alice" (uclient leaves its probe allocation open).
fn alice_session(server: &Turnd, peer: &EchoPeer) {
    let out = Command::new("timeout")
        .args(["60", "turnutils_uclient", "-c", "-u", "alice", "-e", PEER_IP, "-r"])
        .arg(peer.addr.port().to_string())
        .args(["-m", "1", "-n", "5", "-p"])
        .arg(server.port.to_string())
        .args(["-W", SECRET, "127.0.0.1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn status_sessions_disconnect() {
    let server = Turnd::start("[limits]\nlegacy_channel_numbers = true\n");
    let peer = EchoPeer::start();
    alice_session(&server, &peer);

    let (rc, out, err) = turnctl(&server, &["status", "--json"]);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["allocations"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["listeners"].to_string().contains(&format!("udp 127.0.0.1:{}", server.port)), "{v}");
    assert!(v["relayed_packets"]["to_peer"].as_u64().unwrap() >= 5, "{v}");
    let (rc, human, _) = turnctl(&server, &["status"]);
    assert_eq!(rc, 0);
    assert!(human.contains("allocations:") && human.contains("relay ports:"), "{human}");

    let (rc, out, _) = turnctl(&server, &["sessions", "--json"]);
    assert_eq!(rc, 0);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mine: Vec<_> = list.iter().filter(|s| s["user"].as_str().unwrap().ends_with(":alice")).collect();
    assert!(!mine.is_empty(), "{out}");
    assert_eq!(mine[0]["transport"], "udp");
    assert!(mine[0]["relayed"][0].as_str().unwrap().starts_with("127.0.0.1:"));
    let (_, table, _) = turnctl(&server, &["sessions"]);
    assert!(table.starts_with("USER") && table.contains(":alice"), "{table}");

    let before = server.metric("turnd_allocations{family=\"ipv4\",transport=\"udp\"}");
    assert!(before >= 1.0);
    let (rc, out, err) = turnctl(&server, &["disconnect", "--user", "alice"]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains(&format!("disconnected {}", mine.len())), "{out}");
    let (_, out, _) = turnctl(&server, &["sessions", "--json"]);
    assert!(!out.contains(":alice"), "{out}");
    assert_eq!(server.metric("turnd_allocations_ended_total{reason=\"disconnected\"}"), mine.len() as f64);

    // Wrong token: refused, with a hint.
    let bad = server.dir.join("bad-token");
    std::fs::write(&bad, "nope\n").unwrap();
    let (rc, _, err) = turnctl_token(&server, &["status"], &bad);
    assert_eq!(rc, 1);
    assert!(err.contains("token"), "{err}");
    // Unknown selector values are errors, not silent no-ops.
    let (rc, _, err) = turnctl(&server, &["disconnect", "--relayed", "not-an-address"]);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("--relayed"), "{err}");
}

#[test]
fn reload_applies_or_refuses_whole() {
    let server = Turnd::start("[limits]\nlegacy_channel_numbers = true\n");
    let (rc, out, err) = turnctl(&server, &["reload"]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("reloaded"), "{out}");
    let cfg = std::fs::read_to_string(&server.config).unwrap();
    std::fs::write(&server.config, cfg.replace("[limits]", "[limits]\nmax_permissions = 0")).unwrap();
    let (rc, _, err) = turnctl(&server, &["reload"]);
    assert_eq!(rc, 1);
    assert!(err.contains("limits.max_permissions"), "the refusal names the key: {err}");
    // Still serving with the old configuration.
    let peer = EchoPeer::start();
    alice_session(&server, &peer);
}
