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

/// turnd (with `threads` shards, or its default) under a notify socket and a
/// 400 ms watchdog, as systemd runs it; killed and cleaned up however the
/// test ends.
struct Notified {
    child: std::process::Child,
    sock: UnixDatagram,
    dir: std::path::PathBuf,
}

impl Notified {
    fn start(name: &str, threads: Option<usize>) -> Notified {
        let dir = common::temp_dir(name);
        let sock_path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let port = common::free_port();
        let cfg = dir.join("turnd.toml");
        let threads = threads.map(|n| format!("threads = {n}\n")).unwrap_or_default();
        std::fs::write(
            &cfg,
            format!(
                "{threads}[auth]\nsecrets = [\"x\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
                 [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n[metrics]\nlisten = \"\"\n"
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_turnd"))
            .arg("--config")
            .arg(&cfg)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "400000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Notified { child, sock, dir }
    }

    fn signal(&self, sig: &str) {
        Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn sd_notify_readiness_reload_watchdog_and_stop() {
    let mut t = Notified::start("notify", None);
    let deadline = Instant::now() + Duration::from_secs(10);
    recv_until(&t.sock, "READY=1", deadline);
    recv_until(&t.sock, "WATCHDOG=1", deadline);
    t.signal("HUP");
    let seen = recv_until(&t.sock, "READY=1", deadline);
    assert!(seen.iter().any(|m| m.contains("RELOADING=1")), "{seen:?}");
    t.signal("TERM");
    recv_until(&t.sock, "STOPPING=1", deadline);
    let exit_deadline = Instant::now() + Duration::from_secs(5);
    while t.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < exit_deadline, "turnd did not exit after draining no allocations");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a WATCHDOG=1 ping arrives within `wait`.
fn pinged_within(sock: &UnixDatagram, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                return true;
            }
    }
    false
}

#[test]
fn the_watchdog_is_fed_only_while_every_shard_answers() {
    let t = Notified::start("watchdog", Some(2));
    recv_until(&t.sock, "WATCHDOG=1", Instant::now() + Duration::from_secs(10));
    {
        let _stuck = common::StoppedThread::stop(common::thread_named(t.child.id(), "turnd-shard-1"));
        // A ping already on its way may still arrive; then none while the shard is stuck.
        pinged_within(&t.sock, Duration::from_millis(400));
        assert!(!pinged_within(&t.sock, Duration::from_millis(1500)), "the watchdog was fed while a shard was stuck");
    }
    assert!(pinged_within(&t.sock, Duration::from_secs(3)), "no watchdog ping after the shard ran again");
}

/// Address families by the names systemd's RestrictAddressFamilies= takes.
fn family(name: &str) -> i32 {
    match name {
        "AF_UNIX" => libc::AF_UNIX,
        "AF_INET" => libc::AF_INET,
        "AF_INET6" => libc::AF_INET6,
        "AF_NETLINK" => libc::AF_NETLINK,
        "AF_PACKET" => libc::AF_PACKET,
        other => panic!("add {other} to the test's table of address families"),
    }
}

/// A seccomp filter with systemd's meaning of `RestrictAddressFamilies=LIST`
/// (an allow list): socket() with any other family fails with
/// EAFNOSUPPORT; every other system call passes.
fn address_family_filter(allowed: &[i32]) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
    const JEQ_K: u16 = 0x15; // BPF_JMP (5) | BPF_JEQ (0x10) | BPF_K (0)
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64
    let stmt = |code, k| libc::sock_filter { code, jt: 0, jf: 0, k };
    let jump = |k, jt, jf| libc::sock_filter { code: JEQ_K, jt, jf, k };
    // struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low half on little-endian).
    let n = allowed.len() as u8;
    let mut p = vec![
        stmt(LD_W_ABS, 4),
        // Another architecture's calling convention: leave it alone (allow).
        jump(ARCH, 0, n + 4),
        stmt(LD_W_ABS, 0),
        jump(libc::SYS_socket as u32, 0, n + 2),
        stmt(LD_W_ABS, 16),
    ];
    for (i, af) in allowed.iter().enumerate() {
        // A listed family: jump over the rest of the list and the refusal.
        p.push(jump(*af as u32, n - i as u8, 0));
    }
    p.push(stmt(RET_K, libc::SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32));
    p.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
    p
}

/// Starts turnd under the address families `allowed` (as systemd would with
/// the unit's RestrictAddressFamilies=), waits for "turnd ready" and returns
/// its log.
fn start_under_families(allowed: &[i32], name: &str) -> String {
    use std::os::unix::process::CommandExt as _;
    let dir = common::temp_dir(name);
    let port = common::free_port();
    let cfg = dir.join("turnd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[auth]\nsecrets = [\"x\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
             [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
            common::free_port()
        ),
    )
    .unwrap();
    let log_path = dir.join("turnd.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let filter = address_family_filter(allowed);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_turnd"));
    cmd.arg("--config").arg(&cfg).env("STATE_DIRECTORY", &dir).stdout(Stdio::null()).stderr(log);
    // SAFETY: between fork and exec the closure only makes two prctl calls on
    // memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut libc::sock_filter };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    /// Stops turnd and removes its directory, also when an assertion fails.
    struct Run(std::process::Child, std::path::PathBuf);
    impl Drop for Run {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let mut run = Run(cmd.spawn().expect("start turnd under the seccomp filter"), dir.clone());
    let child = &mut run.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    // The log up to "turnd ready" (the guard then stops turnd).
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("turnd ready") {
            break text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("turnd exited ({status}) under the filter: {text}");
        }
        assert!(Instant::now() < deadline, "turnd not ready within 10 s under the filter: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unit_address_families_let_turnd_read_the_host_addresses() {
    // systemd is not PID 1 here: the unit's RestrictAddressFamilies= is
    // applied the way systemd applies it, as a seccomp filter on socket().
    let text = std::fs::read_to_string(UNIT).unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("RestrictAddressFamilies=")).expect("the unit restricts address families");
    assert!(!line.starts_with('~'), "expected an allow list: {line}");
    let allowed: Vec<i32> = line.split_whitespace().map(family).collect();
    let log = start_under_families(&allowed, "unit-families");
    assert!(
        !log.contains("cannot list the host's addresses"),
        "under RestrictAddressFamilies={line} turnd cannot read the host's addresses:\n{log}"
    );
    // The filter has teeth: without AF_NETLINK, getifaddrs() fails.
    let without: Vec<i32> = allowed.iter().copied().filter(|&f| f != libc::AF_NETLINK).collect();
    let log = start_under_families(&without, "unit-families-nonetlink");
    assert!(log.contains("cannot list the host's addresses"), "the filter without AF_NETLINK let getifaddrs() through:\n{log}");
}
