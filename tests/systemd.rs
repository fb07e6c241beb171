//! The systemd unit verifies, and turnd speaks sd_notify: READY=1 when
//! listening, RELOADING=1/READY=1 around a SIGHUP, STOPPING=1 on SIGTERM,
//! and WATCHDOG=1 pings when the watchdog is on.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd/turnd.service");

#[test]
fn unit_verifies_and_is_hardened() {
    let text = std::fs::read_to_string(UNIT).unwrap();
    for key in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "StateDirectory=turnd",
    ] {
        assert!(text.lines().any(|l| l.starts_with(key)), "unit lacks {key}");
    }
    let analyze = Command::new("sh").arg("-c").arg("command -v systemd-analyze").output().unwrap();
    if !analyze.status.success() {
        eprintln!("systemd-analyze is not installed: checked the unit's keys only");
        return;
    }
    // Verify a copy whose ExecStart points at the binary under test (verify
    // requires an executable there).
    let dir = common::temp_dir("unit");
    let unit = dir.join("turnd.service");
    std::fs::write(&unit, text.replace("/usr/local/bin/turnd", env!("CARGO_BIN_EXE_turnd"))).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn recv_until(sock: &UnixDatagram, want: &str, deadline: Instant) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.contains(want);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
    panic!("no {want} from turnd; got {seen:?}");
}

#[test]
fn sd_notify_readiness_reload_watchdog_and_stop() {
    let dir = common::temp_dir("notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let port = common::free_port();
    let cfg = dir.join("turnd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[auth]\nsecrets = [\"x\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
             [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n[metrics]\nlisten = \"\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnd"))
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    recv_until(&sock, "READY=1", deadline);
    recv_until(&sock, "WATCHDOG=1", deadline);
    Command::new("kill").arg("-HUP").arg(child.id().to_string()).status().unwrap();
    let seen = recv_until(&sock, "READY=1", deadline);
    assert!(seen.iter().any(|m| m.contains("RELOADING=1")), "{seen:?}");
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    recv_until(&sock, "STOPPING=1", deadline);
    let exit_deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < exit_deadline, "turnd did not exit after draining no allocations");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
