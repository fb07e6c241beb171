//! `--check-config` run by an unprivileged user (as the Debian package's
//! documented check step runs it) on a listener port another program holds:
//! the check cannot see the owner's descriptors, and since no turnd runs on
//! this host it cannot be the running relay, so it is an error, not a note.
//! On a port below 1024, which that user may not bind without the capability
//! the service gets: a note when the port is free, still an error when another
//! program holds it, and a start without the capability fails.
//! Its own file: no other test's turnd may run while it does.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Mutex, PoisonError};

mod common;

/// One test at a time: each runs turnd, which the other's check would take
/// for a running relay.
static ONE: Mutex<()> = Mutex::new(());

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// turnd ARGS --config CFG as uid/gid 65532 with no groups, with `caps`
/// (e.g. "+net_bind_service") inheritable and ambient; bounded: 10 s.
fn turnd_as_user(cfg: &Path, caps: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new("timeout");
    c.args(["10", "setpriv", "--reuid", "65532", "--regid", "65532", "--clear-groups"]);
    if let Some(caps) = caps {
        c.arg(format!("--inh-caps={caps}")).arg(format!("--ambient-caps={caps}"));
    }
    c.args(["--", env!("CARGO_BIN_EXE_turnd"), "--config"]).arg(cfg).args(args);
    c.env("STATE_DIRECTORY", cfg.parent().unwrap()).output().expect("run setpriv (util-linux)")
}

/// A TCP listener on a free loopback port below 1024, bound as root.
fn privileged_listener() -> std::net::TcpListener {
    (900..1024).rev().find_map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok()).expect("a free port below 1024 on 127.0.0.1")
}

#[test]
fn a_privileged_port_is_a_note_for_the_check_and_an_error_for_a_start() {
    if !is_root() {
        eprintln!("not root: cannot run the check as another user here");
        return;
    }
    let _one = ONE.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = common::temp_dir("privileged");
    std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = dir.join("turnd.toml");
    let write = |port: u16| {
        std::fs::write(
            &cfg,
            format!(
                "[auth]\nsecrets = [\"s3cret\"]\n[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n\
                 [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n[metrics]\nlisten = \"\"\n[admin]\nenabled = false\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&cfg, PermissionsExt::from_mode(0o644)).unwrap();
    };
    let text = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);

    // Free: the check, without the capability, passes and says why it did not bind.
    let port = privileged_listener().local_addr().unwrap().port();
    write(port);
    let out = turnd_as_user(&cfg, None, &["--check-config"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "the check as the service's user: {said}");
    assert!(
        said.contains(&format!("warning: listen[0].address: TCP 127.0.0.1:{port}: ports below 1024 need root or CAP_NET_BIND_SERVICE"))
            && said.contains("systemd unit and container grant CAP_NET_BIND_SERVICE; a start without it fails"),
        "{said}"
    );
    // With the capability the service gets, the check binds it and has nothing to say.
    let out = turnd_as_user(&cfg, Some("+net_bind_service"), &["--check-config"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(!said.contains("warning"), "{said}");
    // A start without the capability fails, naming the key and the capability.
    let out = turnd_as_user(&cfg, None, &[]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "a start without CAP_NET_BIND_SERVICE: {said}");
    assert!(said.contains(&format!("configuration error: listen[0].address: TCP 127.0.0.1:{port}: ports below 1024 need root or CAP_NET_BIND_SERVICE")), "{said}");

    // Held by another program (root's, unseen by this user): still an error.
    let held = privileged_listener();
    let port = held.local_addr().unwrap().port();
    write(port);
    let out = turnd_as_user(&cfg, None, &["--check-config"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains(&format!("listen[0].address: TCP 127.0.0.1:{port} is in use")) && said.contains("no turnd runs"), "{said}");
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_busy_port_held_by_an_unseen_program_fails_the_check() {
    if !is_root() {
        eprintln!("not root: cannot run the check as another user here");
        return;
    }
    let _one = ONE.lock().unwrap_or_else(PoisonError::into_inner);
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
