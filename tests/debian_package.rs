//! The relay's Debian package: deploy/debian/build-deb.sh (cargo-deb) packages
//! the binaries this test run built (no second, release build), dpkg installs it
//! on this machine, the files, the conffile, the user and the state directory
//! are where they belong, the installed turnd accepts the installed config and
//! answers a STUN Binding on loopback as the turnd user, the documented check
//! passes as that user with a TLS listener on 443 (which only the service's
//! capability may bind; a start without it fails), installing the package
//! again over the running relay upgrades it in place (postinst runs `turnctl
//! upgrade`) without losing a datagram of a flow through it, and `dpkg
//! --purge` leaves nothing behind.
//!
//! A second test installs over the state turnd leaves when run as root before
//! the package (/var/lib/turnd/secret owned by root, mode 0600): postinst says
//! it hands the directory to the turnd user, the service's documented check
//! then passes as that user, and a symbolic link in its place is refused.
//!
//! They change the real system (/usr/bin, /etc/turnd, /var/lib/turnd, a
//! `turnd` user), so they run only as root, one at a time, from a clean state:
//! an existing /etc/turnd or /var/lib/turnd is moved aside and put back
//! exactly, and the package purged, even when an assertion fails. They refuse
//! to touch a turnd package, or a turnd user, they did not create.

mod common;
#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use turnd::stun::{attr, method, Class, Message};

const PACKAGE: &str = "turnd";
/// What the package (or turnd run as root) creates outside its own files.
const STATE: &str = "/var/lib/turnd";
const CONFIG_DIR: &str = "/etc/turnd";

/// One test at a time installs the package: cargo runs a file's tests in
/// parallel threads, and both use the same system paths.
static SYSTEM: Mutex<()> = Mutex::new(());

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// dpkg's state of the package: "installed", "half-configured", ..., or
/// "not-installed".
fn status() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", PACKAGE])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(|| "not-installed".to_owned(), |o| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn installed() -> bool {
    status() != "not-installed"
}

/// Purges the package (and stops the turnd it started) when dropped, so a
/// failed assertion does not leave the package installed, then puts back
/// what was at /var/lib/turnd and /etc/turnd before the test.
struct Installed {
    child: Option<Child>,
    /// The process a package upgrade handed the relay to (not our child).
    upgraded: Option<u32>,
    dir: PathBuf,
    /// (path, where the test moved what was there).
    aside: Vec<(PathBuf, PathBuf)>,
    _serial: MutexGuard<'static, ()>,
}

impl Installed {
    /// The system as the package's first install finds it, or `None` when
    /// this is not root with dpkg: the package not installed (refused), no
    /// turnd user (purge would delete it: refused), no /etc/turnd and no
    /// /var/lib/turnd (moved aside, to be restored on drop).
    fn begin(name: &str) -> Option<Installed> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 || !common_have("dpkg") {
            eprintln!("not root or no dpkg: the package is not installed here");
            return None;
        }
        // A test that failed released the lock poisoned; the state it left
        // was restored by its guard.
        let serial = SYSTEM.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(
            !installed(),
            "a {PACKAGE} package is already installed on this machine; this test installs and purges its own \
             (remove it first: dpkg --purge {PACKAGE})"
        );
        for db in ["passwd", "group"] {
            let found = Command::new("getent").args([db, "turnd"]).output().unwrap();
            assert!(
                !found.status.success(),
                "a turnd entry exists in {db} without the package: this test's purge would delete it; \
                 remove it first or run the test elsewhere: {}",
                String::from_utf8_lossy(&found.stdout).trim()
            );
        }
        let dir = common::temp_dir(name);
        std::fs::set_permissions(&dir, PermissionsExt::from_mode(0o755)).unwrap();
        let mut guard = Installed { child: None, upgraded: None, dir, aside: Vec::new(), _serial: serial };
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        for p in [STATE, CONFIG_DIR] {
            let p = Path::new(p);
            if p.symlink_metadata().is_ok() {
                // Beside it, so the rename keeps it whole (same file system).
                let to = PathBuf::from(format!("{}.debian-package-test-{}-{stamp}", p.display(), std::process::id()));
                std::fs::rename(p, &to).unwrap_or_else(|e| panic!("move {} aside to {}: {e}", p.display(), to.display()));
                eprintln!("moved {} aside to {} until the test ends", p.display(), to.display());
                guard.aside.push((p.to_owned(), to));
            }
        }
        Some(guard)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self.upgraded.take() {
            // SAFETY: kill takes plain integers; a gone pid only fails.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = Command::new("timeout").args(["60", "dpkg", "--purge", PACKAGE]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
        // What the test made there (purge removes it; a failed test may not
        // have got that far) goes, what was there before comes back.
        for p in [STATE, CONFIG_DIR] {
            let p = Path::new(p);
            let removed = match p.symlink_metadata() {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
                Ok(_) => std::fs::remove_file(p),
                Err(_) => Ok(()),
            };
            if let Err(e) = removed {
                eprintln!("cannot remove {} the test left: {e}", p.display());
            }
        }
        for (p, from) in self.aside.drain(..) {
            match std::fs::rename(&from, &p) {
                Ok(()) => eprintln!("restored {}", p.display()),
                Err(e) => eprintln!("cannot restore {} from {}: {e}", p.display(), from.display()),
            }
        }
    }
}

/// A call's worth of media through the relay: one UDP allocation with a
/// channel to an echo peer, a datagram every millisecond, every echo counted.
struct EchoFlow {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
    _peer: common::EchoPeer,
}

impl EchoFlow {
    fn start(server: SocketAddr) -> EchoFlow {
        let peer = common::EchoPeer::start();
        let secret = std::fs::read_to_string(format!("{STATE}/secret")).expect("the generated secret");
        let mut c = wire::UdpClient::new("127.0.0.1", server);
        c.allocate("pkg", secret.trim());
        assert_eq!(c.transact(method::CREATE_PERMISSION, &[wire::peer_at(peer.addr)]).class(), Class::Success);
        assert_eq!(c.transact(method::CHANNEL_BIND, &[harness::channel(0x4000), wire::peer_at(peer.addr)]).class(), Class::Success);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut sent, mut echoed) = (0u64, 0u64);
            c.sock.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 2048];
            let mut drain = |echoed: &mut u64| {
                while let Ok(n) = c.sock.recv(&mut buf) {
                    *echoed += turnd::stun::ChannelData::parse(&buf[..n]).is_some_and(|cd| cd.channel == 0x4000) as u64;
                }
            };
            // Bounded: the test stops it long before.
            let until = Instant::now() + Duration::from_secs(120);
            while !s.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                c.send_channel(0x4000, &sent.to_be_bytes());
                sent += 1;
                drain(&mut echoed);
                std::thread::sleep(Duration::from_millis(1));
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while echoed < sent && Instant::now() < deadline {
                drain(&mut echoed);
                std::thread::sleep(Duration::from_millis(5));
            }
            (sent, echoed)
        });
        EchoFlow { stop, thread, _peer: peer }
    }

    /// Stops sending; (sent, echoed back) once the last echoes are in (bounded).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Builds the package from the binaries of this test run (target/debug), not
/// a release build, into `dir`.
fn build_deb(dir: &Path) -> PathBuf {
    assert!(Path::new(env!("CARGO_BIN_EXE_turnd")).parent().unwrap().ends_with("debug"));
    let out = run(Command::new("timeout")
        .arg("120")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/debian/build-deb.sh"))
        .args(["--no-build", "--profile", "dev", "--fast", "--out"])
        .arg(dir));
    let deb = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let arch = String::from_utf8(run(Command::new("dpkg").arg("--print-architecture")).stdout).unwrap();
    assert_eq!(
        deb.file_name().unwrap().to_str().unwrap(),
        format!("turnd_{}_{}.deb", env!("CARGO_PKG_VERSION"), arch.trim()),
        "package file name"
    );
    deb
}

fn dpkg_install(deb: &Path) -> Command {
    let mut c = Command::new("timeout");
    c.arg("120").args(["dpkg", "-i"]).arg(deb).env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// The config check exactly as deploy/README.md gives it to operators (as
/// the turnd user); its output.
fn documented_check() -> Output {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/README.md")).unwrap();
    let check = readme
        .lines()
        .find(|l| l.starts_with("runuser -u turnd") && l.contains("--check-config"))
        .expect("deploy/README.md shows the package's config check");
    Command::new("timeout").args(["30", "sh", "-c", check]).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").output().unwrap()
}

/// Runs the documented check and asserts it passes; `when` names the moment.
/// Its warnings (stderr).
fn assert_documented_check_passes(when: &str) -> String {
    let out = documented_check();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("configuration ok"),
        "the documented check as turnd {when} ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn turnd_ids() -> (u32, u32) {
    let pw = String::from_utf8(run(Command::new("getent").args(["passwd", "turnd"])).stdout).unwrap();
    let fields: Vec<&str> = pw.trim().split(':').collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

/// (owner, group, permission bits) of `path`, not following a link.
fn owner_mode(path: &str) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// Purges the package and checks that nothing of it, its user or its state
/// is left.
fn purge_leaves_nothing(files: &[String]) {
    let out = run(Command::new("timeout").args(["60", "dpkg", "--purge", PACKAGE]));
    assert!(!installed(), "still installed after purge");
    let left: Vec<&String> = files.iter().filter(|f| {
        let p = Path::new(f.as_str());
        // Shared directories (/usr/bin, /usr/share/man, ...) stay, as they should.
        p.exists() && !(p.is_dir() && std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some()))
    }).collect();
    assert!(left.is_empty(), "left after purge: {left:?}\n{}", String::from_utf8_lossy(&out.stdout));
    for p in [CONFIG_DIR, STATE, "/usr/share/turnd"] {
        assert!(Path::new(p).symlink_metadata().is_err(), "{p} is left after purge");
    }
    let user = Command::new("getent").args(["passwd", "turnd"]).output().unwrap();
    assert!(!user.status.success(), "the turnd user is left after purge");
    let group = Command::new("getent").args(["group", "turnd"]).output().unwrap();
    assert!(!group.status.success(), "the turnd group is left after purge");
}

fn package_files() -> Vec<String> {
    String::from_utf8(run(Command::new("dpkg").args(["-L", PACKAGE])).stdout).unwrap().lines().map(str::to_owned).collect()
}

fn gunzip(path: &Path) -> String {
    String::from_utf8(run(Command::new("gzip").arg("-dc").arg(path)).stdout).unwrap()
}

/// A STUN Binding to `server` from a fresh socket, repeated every 100 ms
/// until answered or `deadline`; the address the server saw us at.
fn binding(server: SocketAddr, deadline: Instant) -> Option<(SocketAddr, SocketAddr)> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    let tid: [u8; 12] = std::array::from_fn(|i| (std::process::id() >> (i % 4 * 8)) as u8 ^ i as u8);
    req.extend_from_slice(&tid);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        sock.send_to(&req, server).unwrap();
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let m = Message::parse(&buf[..n]).expect("a STUN answer");
            assert_eq!((m.method(), m.class()), (method::BINDING, Class::Success), "Binding answer");
            assert_eq!(m.transaction_id(), &tid);
            assert_eq!(from, server);
            let mapped = attr::decode_xor_address(m.get(attr::XOR_MAPPED_ADDRESS).expect("XOR-MAPPED-ADDRESS"), &tid).unwrap();
            return Some((mapped, sock.local_addr().unwrap()));
        }
    }
    None
}

#[test]
fn package_builds_installs_runs_and_purges_cleanly() {
    let Some(mut guard) = Installed::begin("deb") else { return };
    let started = Instant::now();
    let dir = guard.dir.clone();
    let deb = build_deb(&dir);
    let built = started.elapsed();

    // Install.
    let out = run(&mut dpkg_install(&deb));
    assert!(installed());
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("already existed"),
        "a first install into a clean state takes over nothing:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let files = package_files();
    let listed: BTreeSet<&str> = files.iter().map(String::as_str).collect();
    for f in [
        "/usr/bin/turnd",
        "/usr/bin/turnctl",
        "/lib/systemd/system/turnd.service",
        "/etc/turnd/turnd.toml",
        "/usr/share/man/man1/turnd.1.gz",
        "/usr/share/man/man1/turnctl.1.gz",
        "/usr/share/man/man1/turnctl-check.1.gz",
        "/usr/share/bash-completion/completions/turnd",
        "/usr/share/bash-completion/completions/turnctl",
        "/usr/share/zsh/vendor-completions/_turnd",
        "/usr/share/zsh/vendor-completions/_turnctl",
        "/usr/share/fish/vendor_completions.d/turnd.fish",
        "/usr/share/fish/vendor_completions.d/turnctl.fish",
        "/usr/share/turnd/certbot-deploy-hook.sh",
    ] {
        assert!(listed.contains(f), "the package does not list {f}: {files:?}");
        assert!(Path::new(f).is_file(), "{f} is not installed");
    }
    for b in ["/usr/bin/turnd", "/usr/bin/turnctl"] {
        assert_eq!(std::fs::metadata(b).unwrap().mode() & 0o777, 0o755, "{b} mode");
        let v = run(Command::new(b).arg("--version"));
        assert!(String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")), "{b} --version");
    }

    // The config is the documented one, and a conffile (upgrades keep edits).
    let conf = std::fs::read_to_string("/etc/turnd/turnd.toml").unwrap();
    assert_eq!(conf, std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/turnd.toml")).unwrap());
    let conffiles = String::from_utf8(run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE])).stdout).unwrap();
    assert!(conffiles.contains("/etc/turnd/turnd.toml"), "not a conffile: {conffiles:?}");

    // The unit runs the installed binary as the package's user.
    let unit = std::fs::read_to_string("/lib/systemd/system/turnd.service").unwrap();
    for line in ["ExecStart=/usr/bin/turnd --config /etc/turnd/turnd.toml", "User=turnd", "Group=turnd", "StateDirectory=turnd", "Type=notify"] {
        assert!(unit.lines().any(|l| l == line), "the installed unit lacks {line:?}:\n{unit}");
    }
    assert!(!unit.contains("DynamicUser=yes") && !unit.contains("SupplementaryGroups="), "static user only:\n{unit}");
    if common_have("systemd-analyze") {
        let out = Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/turnd.service"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify on the installed unit: {err}");
    }

    // Man pages and completions come from the clap definitions.
    let man = gunzip(Path::new("/usr/share/man/man1/turnd.1.gz"));
    assert!(man.contains(".TH turnd 1") && man.contains("check\\-config"), "turnd(1):\n{man}");
    let man = gunzip(Path::new("/usr/share/man/man1/turnctl-check.1.gz"));
    assert!(man.contains(".TH turnctl-check 1") && man.contains("secret\\-file"), "turnctl-check(1):\n{man}");
    if common_have("man") {
        let out = run(Command::new("man").args(["-P", "cat", "turnd"]).env("MANWIDTH", "80"));
        assert!(String::from_utf8_lossy(&out.stdout).contains("--check-config"), "man turnd");
    }
    let bash = std::fs::read_to_string("/usr/share/bash-completion/completions/turnctl").unwrap();
    assert!(bash.contains("complete -F") && bash.contains("credentials") && bash.contains("--secret-file"), "bash completion");
    let out = run(Command::new("bash").arg("-n").arg("/usr/share/bash-completion/completions/turnctl"));
    assert!(out.stderr.is_empty());
    assert!(std::fs::read_to_string("/usr/share/zsh/vendor-completions/_turnd").unwrap().starts_with("#compdef turnd"));
    assert!(std::fs::read_to_string("/usr/share/fish/vendor_completions.d/turnd.fish").unwrap().contains("complete -c turnd"));

    // The system user and its state directory.
    let pw = String::from_utf8(run(Command::new("getent").args(["passwd", "turnd"])).stdout).unwrap();
    let fields: Vec<&str> = pw.trim().split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "a system user: {pw}");
    assert_eq!(fields[5], "/var/lib/turnd");
    assert!(fields[6].ends_with("nologin"), "no login shell: {pw}");
    let gid: u32 = fields[3].parse().unwrap();
    assert_eq!(owner_mode(STATE), (uid, gid, 0o700), "{STATE}");
    // turnd writes its state there, under the unit's sandbox too: ProtectSystem=strict
    // leaves StateDirectory= writable, and nothing in the unit takes that back.
    for line in ["StateDirectory=turnd", "StateDirectoryMode=0700", "ProtectSystem=strict"] {
        assert!(unit.lines().any(|l| l == line), "the installed unit lacks {line:?}:\n{unit}");
    }
    for l in unit.lines().filter(|l| l.starts_with("ReadOnlyPaths=") || l.starts_with("InaccessiblePaths=")) {
        assert!(!l.contains("/var/lib"), "the unit takes the state directory back: {l}");
    }
    let sub = format!("{STATE}/written-by-turnd");
    run(Command::new("setpriv").args(["--reuid=turnd", "--regid=turnd", "--init-groups", "--", "mkdir", &sub]));
    assert_eq!(owner_mode(&sub).0, uid, "the turnd user makes directories in {STATE}");
    std::fs::remove_dir(&sub).unwrap();

    // The installed turnd, as the turnd user (as the unit runs it), accepts
    // the installed config.
    // (setpriv execs the program: the child's pid is turnd's.)
    let as_turnd = |cmd: &mut Command| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=turnd", "--regid=turnd", "--init-groups", "--"])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .env("STATE_DIRECTORY", "/var/lib/turnd");
        c
    };
    assert_documented_check_passes("after install");
    for f in ["/var/lib/turnd/secret", "/var/lib/turnd/admin-token"] {
        let m = std::fs::metadata(f).unwrap_or_else(|e| panic!("{f} after the check: {e}"));
        assert_eq!(m.uid(), uid, "{f} belongs to turnd, so the service can read it");
    }
    tls_on_443_passes_the_documented_check(&dir, &conf, gid, &as_turnd);

    // A real start: the installed config with its listeners and metrics moved
    // to free loopback ports (other tests run beside this one).
    let port = common::free_port();
    let metrics = common::free_port();
    let mut cfg: toml::Table = conf.parse().unwrap();
    cfg.get_mut("metrics").and_then(|m| m.as_table_mut()).expect("a [metrics] table").insert("listen".into(), format!("127.0.0.1:{metrics}").into());
    // Written over the installed conffile: a package upgrade finds the
    // running relay through it.
    let cfg_path = PathBuf::from("/etc/turnd/turnd.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();
    std::fs::set_permissions(&cfg_path, PermissionsExt::from_mode(0o644)).unwrap();
    let log_path = dir.join("turnd.log");
    let child = as_turnd(
        Command::new("/usr/bin/turnd")
            .arg("--config")
            .arg(&cfg_path)
            .args(["--listen", &format!("udp://127.0.0.1:{port}"), "--relay-ip", "127.0.0.1", "--ports", "20000-29999", "--allow-peer", "127.0.0.0/8"]),
    )
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log_path).unwrap())
    .spawn()
    .unwrap();
    guard.child = Some(child);
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let answer = binding(server, Instant::now() + Duration::from_secs(10));
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let (mapped, local) = answer.unwrap_or_else(|| panic!("no Binding answer from the installed turnd within 10 s:\n{log}"));
    assert_eq!(mapped, local, "XOR-MAPPED-ADDRESS is where the request came from");
    // The metrics listener, once turnd says it is ready (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log_path).unwrap_or_default().contains("turnd ready") {
        assert!(Instant::now() < deadline, "no \"turnd ready\" within 10 s:\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, _) = common::http_get(&format!("127.0.0.1:{metrics}"), "/healthz");
    assert_eq!(code, 200, "/healthz of the installed turnd");

    // A package upgrade while media flows: the new binary takes over in
    // place, and not one datagram of a call is lost.
    let old_pid = guard.child.as_ref().unwrap().id();
    let flow = EchoFlow::start(server);
    let out = run(&mut dpkg_install(&deb));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("upgraded: process"), "the package upgraded the running relay in place:\n{said}{}", String::from_utf8_lossy(&out.stderr));
    let new_pid: u32 = said.split("upgraded: process ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|p| p.parse().ok()).expect("the new pid");
    guard.upgraded = Some(new_pid);
    assert_ne!(new_pid, old_pid);
    let (sent, echoed) = flow.finish();
    assert!(sent > 100, "{sent} datagrams sent during the upgrade");
    assert_eq!(echoed, sent, "every datagram of the flow came back through the upgrade");
    // The old process had no TCP/TLS connections: it exits by itself.
    let mut child = guard.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the old process did not exit after the upgrade");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, _) = common::http_get(&format!("127.0.0.1:{metrics}"), "/healthz");
    assert_eq!(code, 200, "/healthz of the upgraded turnd");
    // Gone before the purge, which deletes its user.
    let pid = guard.upgraded.take().unwrap();
    // SAFETY: kill takes plain integers.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "the upgraded turnd {pid} is still there 10 s after SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Purge: nothing of the package, its user or its state is left.
    purge_leaves_nothing(&files);
    eprintln!("package built in {built:?}; whole test {:?}", started.elapsed());
}

/// The installed config with a TLS listener on 443, as a relay serves
/// `turns:`, and a self-signed certificate in `dir` that the turnd user can
/// read. The documented check runs as turnd without the CAP_NET_BIND_SERVICE
/// the unit grants: it passes and says why it did not bind 443. With that
/// capability, as the service runs, it binds 443 and has nothing to say of
/// it. A start without the capability fails with the reason.
fn tls_on_443_passes_the_documented_check(dir: &Path, conf: &str, gid: u32, as_turnd: &dyn Fn(&mut Command) -> Command) {
    let free = std::net::TcpListener::bind("127.0.0.1:443");
    assert!(free.is_ok(), "TCP 127.0.0.1:443 is busy on this machine ({:?}): this test needs it free", free.err());
    drop(free);
    let tls = dir.join("tls");
    std::fs::create_dir(&tls).unwrap();
    std::fs::set_permissions(&tls, PermissionsExt::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(&tls, Some(0), Some(gid)).unwrap();
    let (cert, key) = (tls.join("fullchain.pem"), tls.join("privkey.pem"));
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "90"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-subj", "/CN=turn.example.com", "-addext", "subjectAltName=DNS:turn.example.com"]));
    for (f, mode) in [(&cert, 0o644), (&key, 0o640)] {
        std::fs::set_permissions(f, PermissionsExt::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(f, Some(0), Some(gid)).unwrap();
    }
    let mut cfg: toml::Table = conf.parse().unwrap();
    let mut listener = toml::Table::new();
    listener.insert("transport".into(), "tls".into());
    listener.insert("address".into(), "127.0.0.1:443".into());
    cfg.get_mut("listen").and_then(|l| l.as_array_mut()).expect("[[listen]] entries").push(listener.into());
    let mut section = toml::Table::new();
    section.insert("cert".into(), cert.display().to_string().into());
    section.insert("key".into(), key.display().to_string().into());
    cfg.insert("tls".into(), section.into());
    std::fs::write("/etc/turnd/turnd.toml", toml::to_string(&cfg).unwrap()).unwrap();

    let said = assert_documented_check_passes("with TLS on 443");
    let i = cfg["listen"].as_array().unwrap().len() - 1;
    assert!(
        said.contains(&format!("warning: listen[{i}].address: TCP 127.0.0.1:443: ports below 1024 need root or CAP_NET_BIND_SERVICE"))
            && said.contains("turnd's systemd unit and container grant CAP_NET_BIND_SERVICE; a start without it fails"),
        "the documented check says why it did not bind 443:\n{said}"
    );
    // The check as the unit runs turnd: with CAP_NET_BIND_SERVICE (ambient).
    let out = run(Command::new("timeout").args([
        "30", "setpriv", "--reuid=turnd", "--regid=turnd", "--init-groups",
        "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service",
        "--", "/usr/bin/turnd", "--config", "/etc/turnd/turnd.toml", "--check-config",
    ]).env("STATE_DIRECTORY", STATE));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok") && !err.contains(":443"), "with the unit's capability:\n{err}");
    // A start without it binds nothing and says why.
    let out = as_turnd(Command::new("timeout").args(["30", "/usr/bin/turnd", "--config", "/etc/turnd/turnd.toml"])).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a start as turnd without CAP_NET_BIND_SERVICE:\n{err}");
    assert!(
        err.contains(&format!("configuration error: listen[{i}].address: TCP 127.0.0.1:443: ports below 1024 need root or CAP_NET_BIND_SERVICE")),
        "{err}"
    );
}

fn common_have(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).output().is_ok_and(|o| o.status.success())
}

/// turnd run as root before the package (`cargo run --bin turnd`, or a
/// manual install) leaves its secret and admin token in /var/lib/turnd owned
/// by root; the package hands them to its user, says so, and the documented
/// check then passes as that user with the same secret. A symbolic link in
/// place of the directory is refused, and what it points to left alone.
#[test]
fn package_takes_over_state_that_turnd_made_as_root() {
    let Some(guard) = Installed::begin("deb-takeover") else { return };
    let started = Instant::now();
    let deb = build_deb(&guard.dir);

    // turnd as root, with no StateDirectory: its state goes to /var/lib/turnd.
    let out = run(Command::new("timeout")
        .arg("30")
        .arg(env!("CARGO_BIN_EXE_turnd"))
        .arg("--config")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/turnd.toml"))
        .arg("--check-config")
        .env_remove("STATE_DIRECTORY"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration ok"));
    let secret = format!("{STATE}/secret");
    let token = format!("{STATE}/admin-token");
    assert_eq!(owner_mode(&secret), (0, 0, 0o600), "{secret} as turnd run as root leaves it");
    assert_eq!(owner_mode(&token), (0, 0, 0o600), "{token} as turnd run as root leaves it");
    assert_eq!(owner_mode(STATE).0, 0, "{STATE} as turnd run as root leaves it");
    let secret_before = std::fs::read(&secret).unwrap();

    let out = run(&mut dpkg_install(&deb));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(installed());
    assert!(
        said.contains("turnd: /var/lib/turnd already existed; it and what it holds now belong to the turnd user")
            && said.lines().any(|l| l.trim() == secret)
            && said.lines().any(|l| l.trim() == token),
        "postinst says which files it handed to turnd:\n{said}"
    );
    let (uid, gid) = turnd_ids();
    assert_eq!(owner_mode(STATE), (uid, gid, 0o700), "{STATE}");
    assert_eq!(owner_mode(&secret), (uid, gid, 0o600), "{secret}");
    assert_eq!(owner_mode(&token), (uid, gid, 0o600), "{token}");
    assert_eq!(std::fs::read(&secret).unwrap(), secret_before, "the secret is kept (clients use it), only its owner changes");

    assert_documented_check_passes("after the takeover");

    // Configuring again (a reinstall, an upgrade) finds nothing to take over.
    let out = run(&mut dpkg_install(&deb));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("already existed"), "{}", String::from_utf8_lossy(&out.stdout));
    let files = package_files();
    purge_leaves_nothing(&files);

    // /var/lib/turnd a symbolic link: chown -R there would hand over what it
    // points to. The package refuses to configure and changes nothing there.
    let elsewhere = guard.dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("secret"), "not turnd's\n").unwrap();
    std::fs::set_permissions(elsewhere.join("secret"), PermissionsExt::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&elsewhere, STATE).unwrap();
    let out = dpkg_install(&deb).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "dpkg -i with {STATE} a symbolic link succeeded:\n{err}");
    assert!(
        err.contains("turnd: /var/lib/turnd is a symbolic link") && err.contains("dpkg --configure turnd"),
        "postinst says why it refuses and what to do:\n{err}"
    );
    assert_eq!(status(), "half-configured", "the package is left unconfigured");
    assert!(std::fs::symlink_metadata(STATE).unwrap().file_type().is_symlink(), "{STATE} is left as it was");
    let s = elsewhere.join("secret");
    assert_eq!(owner_mode(s.to_str().unwrap()), (0, 0, 0o600), "the link's target is untouched");
    assert_eq!(owner_mode(elsewhere.to_str().unwrap()).0, 0, "the link's target is untouched");
    purge_leaves_nothing(&files);
    assert!(s.is_file(), "purge removes the link, not what it points to");
    eprintln!("takeover test {:?}", started.elapsed());
}
