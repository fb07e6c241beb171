//! `--check-config` run by an unprivileged user (as the Debian package's
//! documented check step runs it) on a listener port another program holds:
//! the check cannot see the owner's descriptors, and since no turnd runs on
//! this host it cannot be the running relay, so it is an error, not a note.
//! Its own file: no other test's turnd may run while it does.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

mod common;

#[test]
fn a_busy_port_held_by_an_unseen_program_fails_the_check() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: cannot run the check as another user here");
        return;
    }
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = common::temp_dir("busy");
    std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = dir.join("turnd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[auth]\nsecrets = [\"s3cret\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
             [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n[metrics]\nlisten = \"\"\n[admin]\nenabled = false\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid", "65532", "--regid", "65532", "--clear-groups", env!("CARGO_BIN_EXE_turnd"), "--check-config", "--config"])
        .arg(&cfg)
        .env("STATE_DIRECTORY", &dir)
        .output()
        .expect("run setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("listen[0].address: UDP 127.0.0.1:{port} is in use")) && err.contains("no turnd runs"), "{err}");
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}
