//! Test harness: start a real turnd on loopback, wait until it answers,
//! and provide a UDP echo peer. Every wait is bounded.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const SECRET: &str = "test-secret-0123456789";
pub const REALM: &str = "test";
/// Peers live on a different loopback address than the relay: the relay's own
/// address is reachable only on relay ports.
pub const PEER_IP: &str = "127.0.0.2";
/// Relay ports given to turnd: below Linux's ephemeral range, so client
/// sockets never collide with them.
pub const RELAY_PORTS: std::ops::RangeInclusive<u16> = 20000..=29999;

/// A free port on 127.0.0.1 for both UDP and TCP (as free as loopback can promise).
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = u.local_addr().unwrap().port();
        // Stay out of the relay range given to turnd below (it refuses a
        // listener port inside its relay port range).
        if RELAY_PORTS.contains(&p) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port");
}

pub fn temp_dir(name: &str) -> PathBuf {
    // A counter, not only a free port: two tests of one process may be
    // handed the same free port, and must never share a directory.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("turnd-test-{}-{}-{}-{}", name, std::process::id(), n, free_port()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub struct Turnd {
    child: Child,
    pub port: u16,
    /// TLS port when started with `start_all`, else 0.
    pub tls_port: u16,
    /// The /metrics, /healthz, /readyz port on 127.0.0.1 (0 if the caller's config set it).
    pub metrics_port: u16,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
}

/// A config file of the test's making: the UDP address that answers when
/// turnd is ready, and the text (made in the server's fresh directory).
type MakeConfig<'a> = Box<dyn FnOnce(&std::path::Path) -> String + 'a>;

/// How a test starts turnd: [`Turnd::builder`], what differs from the
/// default, then [`Builder::start`]. The default is UDP on a free port of
/// 127.0.0.1, relaying from 127.0.0.1, with 127.0.0.0/8 peers allowed.
#[must_use]
pub struct Builder<'a> {
    extra: String,
    allow_loopback: bool,
    streams: bool,
    wrap: Vec<String>,
    config: Option<(SocketAddr, MakeConfig<'a>)>,
}

impl<'a> Builder<'a> {
    /// TOML appended to the config (whole sections).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra += toml;
        self
    }

    /// No `[peers] allow` for loopback: the default peer policy.
    pub fn no_loopback_peers(mut self) -> Self {
        self.allow_loopback = false;
        self
    }

    /// TCP on the UDP port too, and TLS on another free port with a fresh
    /// self-signed certificate for 127.0.0.1 (`dir/cert.pem`, `dir/key.pem`).
    pub fn streams(mut self) -> Self {
        self.streams = true;
        self
    }

    /// turnd's open-files limit, soft and hard.
    pub fn nofile(self, n: u64) -> Self {
        self.wrap(&["prlimit".into(), format!("--nofile={n}:{n}"), "--".into()])
    }

    /// Runs turnd through `wrap`, a command that execs the rest of its
    /// arguments (`ip netns exec NAME`, `env VAR=VALUE`, prlimit).
    pub fn wrap(mut self, wrap: &[String]) -> Self {
        self.wrap.extend_from_slice(wrap);
        self
    }

    /// A complete config of the caller's making instead of the default:
    /// `make` gets the server's fresh directory (for certificates and the
    /// like, removed on drop) and returns the TOML text; ready when `probe`,
    /// one of its UDP listeners, answers a STUN Binding. `extra` is appended.
    pub fn config(mut self, probe: SocketAddr, make: impl FnOnce(&std::path::Path) -> String + 'a) -> Self {
        self.config = Some((probe, Box::new(make)));
        self
    }

    /// UDP and TCP on `host:plain_port` and TLS on `host:tls_port` (a fresh
    /// self-signed certificate), relaying from `relay_ip`: turnd on the host
    /// end of a test's namespace. `extra` (peers, limits, log) is appended.
    pub fn three(self, host: &str, plain_port: u16, tls_port: u16, relay_ip: &str) -> Self {
        let probe: SocketAddr = format!("{host}:{plain_port}").parse().unwrap();
        let (host, relay_ip) = (host.to_owned(), relay_ip.to_owned());
        self.config(probe, move |dir| {
            make_cert(dir, "cert.pem", "key.pem", "turnd-netns");
            format!(
                "realm = \"{REALM}\"\n[auth]\nsecrets = [\"{SECRET}\"]\n\
                 [[listen]]\ntransport = \"udp\"\naddress = \"{host}:{plain_port}\"\n\
                 [[listen]]\ntransport = \"tcp\"\naddress = \"{host}:{plain_port}\"\n\
                 [[listen]]\ntransport = \"tls\"\naddress = \"{host}:{tls_port}\"\n\
                 [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
                 [relay]\nip = \"{relay_ip}\"\nports = \"20000-29999\"\n",
                dir.join("cert.pem").display(),
                dir.join("key.pem").display(),
            )
        })
    }

    /// Starts turnd and waits until it answers (bounded).
    pub fn start(self) -> Turnd {
        let dir = temp_dir("turnd");
        if let Some((probe, make)) = self.config {
            let cfg = make(&dir) + "\n" + &self.extra;
            return Turnd::spawn(dir, &cfg, probe, 0, &self.wrap);
        }
        let port = free_port();
        let tls_port = if self.streams { free_port() } else { 0 };
        let allow = if self.allow_loopback { "[peers]\nallow = [\"127.0.0.0/8\"]\n" } else { "" };
        let mut listen = format!("[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n");
        if self.streams {
            make_cert(&dir, "cert.pem", "key.pem", "turnd-test-a");
            listen += &format!(
                "[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n\
                 [[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:{tls_port}\"\n\
                 [tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                dir.join("cert.pem").display(),
                dir.join("key.pem").display()
            );
        }
        let cfg = format!(
            "realm = \"{REALM}\"\n[auth]\nsecrets = [\"{SECRET}\"]\n{listen}\
             [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n{allow}{}",
            self.extra
        );
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        Turnd::spawn(dir, &cfg, addr, tls_port, &self.wrap)
    }
}

impl Turnd {
    /// How to start one: see [`Builder`].
    pub fn builder<'a>() -> Builder<'a> {
        Builder { extra: String::new(), allow_loopback: true, streams: false, wrap: Vec::new(), config: None }
    }

    /// The default turnd (see [`Builder`]) with `extra` TOML appended.
    pub fn start(extra: &str) -> Turnd {
        Self::builder().extra(extra).start()
    }

    /// Writes `cfg` to `dir/turnd.toml`, runs turnd on it (log in
    /// `dir/turnd.log`, through `wrap` when it is not empty: a command that
    /// execs the rest of its arguments) and waits until `addr` answers over UDP.
    fn spawn(dir: PathBuf, cfg: &str, addr: SocketAddr, tls_port: u16, wrap: &[String]) -> Turnd {
        let config = dir.join("turnd.toml");
        // Each server gets its own metrics port unless the caller set one
        // (the default 127.0.0.1:9641 would clash between parallel tests).
        let (mut cfg, metrics_port) = if cfg.contains("[metrics]") {
            (cfg.to_owned(), 0)
        } else {
            let p = free_port();
            (format!("{cfg}\n[metrics]\nlisten = \"127.0.0.1:{p}\"\n"), p)
        };
        if !cfg.contains("[admin]") {
            cfg += &format!("\n[admin]\ntoken_file = \"{}\"\n", dir.join("admin-token").display());
        }
        std::fs::write(&config, &cfg).unwrap();
        let log = std::fs::File::create(dir.join("turnd.log")).unwrap();
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(env!("CARGO_BIN_EXE_turnd"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_turnd")),
        };
        // ./test.sh runs the suite again with one shard (TURND_TEST_THREADS=1),
        // except where a test's config sets the number itself.
        if let Ok(n) = std::env::var("TURND_TEST_THREADS")
            && !cfg.lines().any(|l| l.trim_start().starts_with("threads"))
        {
            cmd.arg("--threads").arg(n);
        }
        let child = cmd
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn turnd");
        let mut t = Turnd { child, port: addr.port(), tls_port, metrics_port, addr, dir, config };
        t.wait_ready();
        t
    }

    /// Ready when a STUN Binding request gets an answer (bounded: 5 s).
    fn wait_ready(&mut self) {
        let local = match self.addr.ip() {
            ip if ip.is_loopback() && ip.is_ipv4() => "127.0.0.1:0",
            ip if ip.is_ipv6() => "[::]:0",
            _ => "0.0.0.0:0",
        };
        let s = UdpSocket::bind(local).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut req = [0u8; 20];
        req[1] = 1;
        req[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
        req[8..20].copy_from_slice(b"readiness-01");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("turnd exited early with {st}: {}", self.log());
            }
            let _ = s.send_to(&req, self.addr);
            if let Ok((n, _)) = s.recv_from(&mut buf)
                && n >= 20 && buf[0] == 0x01 && buf[1] == 0x01 {
                    return;
                }
        }
        panic!("turnd did not answer a Binding within 5 s: {}", self.log());
    }

    /// Sends a signal (e.g. "HUP", "TERM") to turnd.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(st.success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("turnd.log")).unwrap_or_default()
    }

    /// The admin API token (generated by turnd in its directory).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin-token")).unwrap_or_default().trim().to_owned()
    }

    /// Waits (bounded) for turnd to exit; `None` if it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// GET `path` on the metrics/health endpoint: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(&format!("127.0.0.1:{}", self.metrics_port), path)
    }

    /// The value of one Prometheus series (exact name with labels), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// Waits (bounded: 10 s) until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "turnd never logged {needle:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET an admin API path with the server's token: the JSON answer (Null if none).
    pub fn admin_get(&self, path: &str) -> serde_json::Value {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", self.admin_token()).unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        serde_json::from_str(resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default()).unwrap_or(serde_json::Value::Null)
    }
}

/// Where a test run keeps the logs of the turnd and Chromium processes it
/// started (`TURND_TEST_KEEP_LOGS=DIR`), to hunt a flake after the fact;
/// with it Chromium also logs its TURN and ICE steps (see
/// `common/browser.rs`). Unset: logs go with their temporary directories.
pub fn keep_logs_dir() -> Option<PathBuf> {
    std::env::var_os("TURND_TEST_KEEP_LOGS").filter(|d| !d.is_empty()).map(PathBuf::from)
}

/// Copies `log` into the keep-logs directory, if one is set, as `name`.
pub fn keep_log(log: &std::path::Path, name: &str) {
    if let Some(d) = keep_logs_dir() {
        let _ = std::fs::create_dir_all(&d);
        if let Err(e) = std::fs::copy(log, d.join(name)) {
            eprintln!("TURND_TEST_KEEP_LOGS: cannot keep {}: {e}", log.display());
        }
    }
}

impl Drop for Turnd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        keep_log(&self.dir.join("turnd.log"), &format!("turnd-{}-{}.log", self.child.id(), self.port));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A UDP echo peer on PEER_IP (and optionally port+1, as turnutils_uclient's
/// RTCP session expects). Stops when dropped.
pub struct EchoPeer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Datagrams echoed so far, by both sockets.
    echoed: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<JoinHandle<u64>>,
}

impl EchoPeer {
    pub fn start() -> EchoPeer {
        Self::start_on(PEER_IP)
    }

    pub fn start_on(ip: &str) -> EchoPeer {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for _ in 0..100 {
            let a = UdpSocket::bind((ip, 0)).unwrap();
            let port = a.local_addr().unwrap().port();
            let Ok(b) = UdpSocket::bind((ip, port.wrapping_add(1))) else { continue };
            let threads = [a, b]
                .into_iter()
                .map(|s| {
                    let (stop, count) = (stop.clone(), count.clone());
                    std::thread::spawn(move || {
                        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                        let mut buf = [0u8; 65536];
                        let mut echoed = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok((n, from)) = s.recv_from(&mut buf) {
                                // Counted before it leaves: whoever receives
                                // the echo then reads a count that has it.
                                echoed += 1;
                                count.fetch_add(1, Ordering::Release);
                                let _ = s.send_to(&buf[..n], from);
                            }
                        }
                        echoed
                    })
                })
                .collect();
            return EchoPeer { addr: format!("{ip}:{port}").parse().unwrap(), stop, echoed: count, threads };
        }
        panic!("no free port pair for the echo peer");
    }

    /// Datagrams echoed so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Acquire)
    }

    /// Stops the peer and returns how many datagrams it echoed.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.drain(..).map(|t| t.join().unwrap()).sum()
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Writes a self-signed certificate for 127.0.0.1/localhost with the given CN
/// into `dir` (openssl CLI, present on Debian).
pub fn make_cert(dir: &std::path::Path, cert: &str, key: &str, cn: &str) {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .arg("-keyout")
        .arg(dir.join(key))
        .arg("-out")
        .arg(dir.join(cert))
        .args(["-subj", &format!("/CN={cn}"), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// SHA-256 fingerprint of the certificate a TLS server presents (openssl s_client).
pub fn served_cert_fingerprint(addr: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "timeout 10 openssl s_client -connect {addr} -alpn stun.turn </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .expect("run openssl s_client");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// SHA-256 fingerprint of a certificate file.
pub fn file_cert_fingerprint(path: &std::path::Path) -> String {
    let out = Command::new("openssl").args(["x509", "-noout", "-fingerprint", "-sha256", "-in"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A minimal HTTP/1.1 GET (bounded by a 5 s timeout): (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// What a bounded run of a command gave.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// stdout as JSON (the test fails when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
    }

    /// Everything it printed, for an assertion message.
    pub fn text(&self) -> String {
        format!("exit {} after {:?}\n--- stdout ---\n{}--- stderr ---\n{}", self.code, self.elapsed, self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion, reading its output as it goes; kills it after
/// `limit` (then the test fails).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Run {
    use std::io::Read;
    let t0 = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still ran after {limit:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run { code: status.code().unwrap_or(-1), stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap(), elapsed: t0.elapsed() }
}

/// Stops one thread of another process (not the whole process, as SIGSTOP
/// would) with ptrace; it runs again when dropped.
pub struct StoppedThread(libc::pid_t);

impl StoppedThread {
    pub fn stop(tid: libc::pid_t) -> StoppedThread {
        // SAFETY: plain ptrace calls on a thread id; no memory is shared.
        unsafe {
            assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0), 0, "PTRACE_SEIZE: {}", std::io::Error::last_os_error());
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0, "PTRACE_INTERRUPT: {}", std::io::Error::last_os_error());
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid, "waitpid: {}", std::io::Error::last_os_error());
        }
        StoppedThread(tid)
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        // SAFETY: detaching lets the thread run on.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

/// The thread id of `name` in process `pid`.
pub fn thread_named(pid: u32, name: &str) -> libc::pid_t {
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name) {
            return e.file_name().to_string_lossy().parse().unwrap();
        }
    }
    panic!("no thread {name} in {pid}");
}

/// Sends `segs` (equal sizes, the last possibly shorter) to `to` as one UDP GSO send.
pub fn send_gso(sock: &UdpSocket, to: SocketAddr, segs: &[Vec<u8>]) {
    let seg = segs[0].len();
    assert!(segs.iter().all(|s| s.len() <= seg));
    let buf: Vec<u8> = segs.concat();
    let SocketAddr::V4(v4) = to else { panic!("IPv4 only") };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let mut ctrl = [0u64; 3];
    // SAFETY: plain C structs filled field by field; the cmsg fits `ctrl`
    // (CMSG_SPACE(2) = 24 bytes) and every pointer outlives the call.
    let n = unsafe {
        let mut h: libc::msghdr = std::mem::zeroed();
        h.msg_name = (&sin as *const libc::sockaddr_in as *mut libc::sockaddr_in).cast();
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        h.msg_control = ctrl.as_mut_ptr().cast();
        h.msg_controllen = libc::CMSG_SPACE(2) as usize;
        let c = libc::CMSG_FIRSTHDR(&h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg as u16);
        libc::sendmsg(std::os::fd::AsRawFd::as_raw_fd(sock), &h, 0)
    };
    assert_eq!(n, buf.len() as isize, "GSO send: {}", std::io::Error::last_os_error());
}

/// `turnctl ARGS` against `server`'s admin API (bounded: 30 s): (exit
/// status, what it printed on stdout and stderr).
pub fn turnctl(server: &Turnd, args: &[&str]) -> (i32, String) {
    let out = Command::new("timeout")
        .arg("30")
        .arg(env!("CARGO_BIN_EXE_turnctl"))
        .args(args)
        .args(["--admin", &format!("127.0.0.1:{}", server.metrics_port)])
        .arg("--token-file")
        .arg(server.dir.join("admin-token"))
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `turnctl reload` against `server`'s admin API: (exit status, what it printed).
pub fn turnctl_reload(server: &Turnd) -> (i32, String) {
    turnctl(server, &["reload"])
}

/// `turnctl upgrade --binary BINARY` against `server`'s admin API: (exit status, what it printed).
pub fn turnctl_upgrade(server: &Turnd, binary: &std::path::Path) -> (i32, String) {
    turnctl(server, &["upgrade", "--binary", &binary.to_string_lossy()])
}

/// Kills `child` with its process group (it leads one: `process_group(0)`,
/// or `ip netns exec` exec'ing it keeps it the leader), and reaps it.
pub fn kill_group(child: &mut Child) {
    let pgid = child.id() as libc::pid_t;
    // SAFETY: kill takes plain integers; a stale group id only fails with ESRCH.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether `program` is on the PATH.
pub fn on_path(program: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {program}")).stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// The end-of-run summary turnutils_uclient (coturn) prints.
pub struct UclientSummary {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
}

/// Reads turnutils_uclient's summary from what it printed (stdout and
/// stderr); the test fails when it has none.
pub fn uclient_summary(text: &str) -> UclientSummary {
    let mut s = None;
    let mut lost = None;
    for line in text.lines() {
        if let Some(rest) = line.split("start_mclient: tot_send_msgs=").nth(1) {
            let mut it = rest.split(", tot_recv_msgs=");
            let sent = it.next().and_then(|v| v.trim().parse().ok());
            let recv = it.next().and_then(|v| v.trim().parse().ok());
            if let (Some(a), Some(b)) = (sent, recv) {
                s = Some((a, b));
            }
        }
        if let Some(rest) = line.split("Total lost packets ").nth(1) {
            lost = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        }
    }
    let (sent, received) = s.unwrap_or_else(|| panic!("no summary in turnutils_uclient output:\n{text}"));
    UclientSummary { sent, received, lost: lost.unwrap_or_else(|| panic!("no loss line:\n{text}")) }
}
