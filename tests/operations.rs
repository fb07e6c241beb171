//! Operating turnd: live metrics, health endpoints, SIGHUP reload (secret
//! rotation, invalid config kept out), and SIGTERM draining.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{EchoPeer, Turnd, PEER_IP, SECRET};

/// Runs turnutils_uclient to completion: (exit code, output).
fn uclient(server: &Turnd, peer: &EchoPeer, secret: &str, n: u32) -> (i32, String) {
    let out = Command::new("timeout")
        .args(["60", "turnutils_uclient", "-c", "-e", PEER_IP, "-r"])
        .arg(peer.addr.port().to_string())
        .args(["-m", "1", "-n", &n.to_string(), "-l", "100", "-p"])
        .arg(server.port.to_string())
        .args(["-W", secret, "127.0.0.1"])
        .output()
        .expect("run turnutils_uclient");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn uclient_background(server: &Turnd, peer: &EchoPeer, secret: &str, n: u32) -> std::process::Child {
    Command::new("timeout")
        .args(["60", "turnutils_uclient", "-c", "-e", PEER_IP, "-r"])
        .arg(peer.addr.port().to_string())
        .args(["-m", "1", "-n", &n.to_string(), "-l", "100", "-p"])
        .arg(server.port.to_string())
        .args(["-W", secret, "127.0.0.1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run turnutils_uclient")
}

fn no_loss(code: i32, text: &str, sent: u32) {
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(&format!("tot_send_msgs={sent}, tot_recv_msgs={sent}")), "{text}");
}

#[test]
fn metrics_follow_a_scripted_session() {
    let server = Turnd::start("[limits]\nlegacy_channel_numbers = true\n");
    assert_eq!(server.http_get("/healthz"), (200, "ok\n".into()));
    assert_eq!(server.http_get("/readyz").0, 200);
    assert_eq!(server.metric("turnd_allocations_created_total"), 0.0);
    let peer = EchoPeer::start();
    let (code, text) = uclient(&server, &peer, SECRET, 20);
    no_loss(code, &text, 20);
    // Live values: uclient's probe allocation is still there; 20 messages went each way.
    assert!(server.metric("turnd_allocations{family=\"ipv4\",transport=\"udp\"}") >= 1.0);
    assert!(server.metric("turnd_allocations_created_total") >= 2.0);
    assert!(server.metric("turnd_relayed_packets_total{direction=\"to_peer\",transport=\"udp\"}") >= 20.0);
    assert!(server.metric("turnd_relayed_packets_total{direction=\"to_client\",transport=\"udp\"}") >= 20.0);
    assert!(server.metric("turnd_relayed_bytes_total{direction=\"to_peer\",transport=\"udp\"}") >= 2000.0);
    assert!(server.metric("turnd_responses_total{code=\"200\",method=\"allocate\"}") >= 2.0);
    assert!(server.metric("turnd_responses_total{code=\"401\",method=\"allocate\"}") >= 2.0);
    assert!(server.metric("turnd_auth_failures_total{reason=\"challenge\"}") >= 2.0);
    assert!(server.metric("turnd_relay_ports{state=\"in_use\"}") >= 1.0);
    assert_eq!(server.metric("turnd_build_info{version=\"0.1.0\"}"), 1.0);
    // A wrong secret shows up as bad_integrity.
    let (code, _) = uclient(&server, &peer, "wrong-secret", 2);
    assert_ne!(code, 0);
    assert!(server.metric("turnd_auth_failures_total{reason=\"bad_integrity\"}") >= 1.0);
    let (_, body) = server.http_get("/metrics");
    assert!(!body.contains("user="), "no per-user labels");
}

#[test]
fn refused_peers_are_counted() {
    // Without the loopback allowance, the echo peer on 127.0.0.2 is refused.
    let server = Turnd::builder().extra("[limits]\nlegacy_channel_numbers = true\n").no_loopback_peers().start();
    let peer = EchoPeer::start();
    let (code, text) = uclient(&server, &peer, SECRET, 2);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("403"), "{text}");
    assert!(server.metric("turnd_peer_refusals_total") >= 1.0);
    assert!(server.log().contains("peer refused by policy"), "a refusal is logged as a warning");
    assert!(server.metric("turnd_responses_total{code=\"403\",method=\"channel_bind\"}") >= 1.0);
    assert_eq!(peer.finish(), 0, "nothing reached the refused peer");
}

#[test]
fn sighup_rotates_the_secret_and_keeps_allocations() {
    let dir = common::temp_dir("rotate");
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, "old-secret-123\n").unwrap();
    let server = Turnd::start("[limits]\nlegacy_channel_numbers = true\n[log]\nlevel = \"info\"\n# secret file\n");
    // Point the running config at a secret file, via reload.
    let cfg = std::fs::read_to_string(&server.config).unwrap();
    let with_file = cfg.replace(&format!("secrets = [\"{SECRET}\"]"), &format!("secret_file = \"{}\"", secret_file.display()));
    assert_ne!(cfg, with_file);
    std::fs::write(&server.config, &with_file).unwrap();
    server.signal("HUP");
    server.wait_log("configuration reloaded");
    let peer = EchoPeer::start();
    let (code, text) = uclient(&server, &peer, "old-secret-123", 5);
    no_loss(code, &text, 5);
    let (code, _) = uclient(&server, &peer, SECRET, 2);
    assert_ne!(code, 0, "the secret removed from the config no longer works");

    // A long session with the old secret, then rotate to the new one only.
    let running = uclient_background(&server, &peer, "old-secret-123", 150);
    let log_before = server.log().matches("allocation created").count();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.log().matches("allocation created").count() < log_before + 2 {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&secret_file, "new-secret-456\n").unwrap();
    server.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.log().matches("configuration reloaded").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, text) = uclient(&server, &peer, "new-secret-456", 5);
    no_loss(code, &text, 5);
    let (code, _) = uclient(&server, &peer, "old-secret-123", 2);
    assert_ne!(code, 0, "the rotated-out secret is refused for new allocations");
    let out = running.wait_with_output().unwrap();
    no_loss(out.status.code().unwrap_or(-1), &String::from_utf8_lossy(&out.stdout), 150);

    // An invalid config is refused whole; the running one stays.
    std::fs::write(&server.config, with_file.replace("[log]", "[log]\nformat = \"xml\"")).unwrap();
    server.signal("HUP");
    server.wait_log("reload refused");
    assert!(server.log().contains("log.format"), "the reason names the key");
    let (code, text) = uclient(&server, &peer, "new-secret-456", 5);
    no_loss(code, &text, 5);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_drains_then_exits() {
    let mut server = Turnd::start("[limits]\nlegacy_channel_numbers = true\ndrain_timeout = \"15s\"\n");
    let peer = EchoPeer::start();
    let running = uclient_background(&server, &peer, SECRET, 100);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.log().matches("allocation created").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // uclient starts sending 1-6 s after allocating and sends for 2 s: the
    // 15 s drain covers it with room to spare.
    server.signal("TERM");
    server.wait_log("draining");
    // Ready no more, and new allocations are refused, while the session relays on.
    assert_eq!(server.http_get("/readyz").0, 503);
    let other = EchoPeer::start();
    let (code, text) = uclient(&server, &other, SECRET, 2);
    assert_ne!(code, 0, "a new allocation during the drain: {text}");
    let out = running.wait_with_output().unwrap();
    no_loss(out.status.code().unwrap_or(-1), &String::from_utf8_lossy(&out.stdout), 100);
    // uclient leaves its probe allocation behind on UDP, so the drain runs to its timeout.
    let st = server.wait_exit(Duration::from_secs(20)).expect("turnd exits when the drain times out");
    assert!(st.success());
    assert!(server.log().contains("drain timeout reached"), "{}", server.log());
}

#[test]
fn second_sigterm_stops_at_once() {
    let mut server = Turnd::start("[limits]\nlegacy_channel_numbers = true\ndrain_timeout = \"1h\"\n");
    let peer = EchoPeer::start();
    let (code, text) = uclient(&server, &peer, SECRET, 2);
    no_loss(code, &text, 2);
    server.signal("TERM");
    server.wait_log("draining");
    assert!(server.wait_exit(Duration::from_millis(300)).is_none(), "still draining");
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(5)).is_some(), "second SIGTERM ends it");
    assert!(server.log().contains("second signal"));
}

#[test]
fn grafana_dashboard_uses_only_exported_metrics() {
    let server = Turnd::start("");
    let (_, body) = server.http_get("/metrics");
    let dash = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/turnd.json")).unwrap();
    let mut names: Vec<&str> = dash
        .match_indices("turnd_")
        .map(|(i, _)| {
            let rest = &dash[i..];
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    for n in names {
        // A histogram's series are NAME_bucket, NAME_sum and NAME_count,
        // declared once as `# TYPE NAME histogram`.
        let histogram = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| n.strip_suffix(suffix))
            .is_some_and(|base| body.contains(&format!("# TYPE {base} histogram")));
        assert!(histogram || body.contains(&format!("# TYPE {n} ")), "dashboard uses {n}, which /metrics does not export");
    }
    // Bucket bounds the dashboard picks (`le="0.02"`) are bounds turnd exports.
    for (i, _) in dash.match_indices("le=\\\"") {
        let rest = &dash[i + 5..];
        let bound = &rest[..rest.find('\\').unwrap_or(rest.len())];
        assert!(body.contains(&format!("le=\"{bound}\"")), "dashboard uses the bucket le=\"{bound}\", which /metrics does not have");
    }
}

#[test]
fn log_format_switches_on_reload() {
    let server = Turnd::start("[log]\nlevel = \"info\"\n");
    server.wait_log("turnd ready");
    let cfg = std::fs::read_to_string(&server.config).unwrap();
    let json = cfg.replace("[log]\nlevel = \"info\"\n", "[log]\nlevel = \"info\"\nformat = \"json\"\n");
    assert_ne!(cfg, json);
    std::fs::write(&server.config, json).unwrap();
    server.signal("HUP");
    server.wait_log("configuration reloaded");
    let log = server.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let switch = lines.iter().position(|l| l.contains("log format changed")).expect("the switch is logged");
    assert!(!lines[0].starts_with('{'), "text before the switch: {log}");
    // The switch line itself and everything after it are JSON objects.
    let after = &lines[switch..];
    assert!(after.len() >= 2, "{log}");
    for l in after {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{log}"));
        assert!(v.get("fields").is_some(), "{l}");
    }
}
