//! The deploy, end to end on loopback: deploy/setup.sh writes the Jitsi .env
//! and the relay's secret; the prosody configuration those TURN settings turn
//! into (deploy/jitsi/external-services.sh, the file setup.sh writes) is loaded
//! into a real prosody (Debian's 0.12), which an XMPP client (slixmpp) asks for
//! external services (XEP-0215, urn:xmpp:extdisco:2) as a Jitsi browser does.
//! With exactly the hosts, ports, transports and credentials prosody hands out,
//! coturn's turnutils_uclient allocates and relays on a turnd running the
//! deploy's turnd.toml (addresses swapped for loopback, a test certificate in
//! place of its ACME) over UDP, TCP and TLS;
//! a credential whose expiry has passed is refused.

mod common;
#[path = "common/deploy.rs"]
mod deploy;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, make_cert, temp_dir, EchoPeer, Turnd, RELAY_PORTS};

/// The XMPP domain of the test's prosody (docker-jitsi-meet's default).
const XMPP_DOMAIN: &str = "meet.jitsi";

/// A prosody of our own: loopback only, its own port and data directory, no
/// system service. Stopped (SIGTERM, then SIGKILL) when dropped.
struct Prosody {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prosody {
    /// Starts prosody with `external_services_file` included in its global
    /// section; ready when its client port accepts connections (bounded: 10 s).
    fn start(dir: &Path, external_services_file: &Path) -> Prosody {
        let port = free_port();
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        let d = dir.display();
        let cfg = format!(
            r#"-- Test-only prosody: one client port on 127.0.0.1, nothing else.
run_as_root = true
daemonize = false
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
certificates = "{d}/certs"
interfaces = {{ "127.0.0.1" }}
local_interfaces = {{ "127.0.0.1" }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
component_ports = {{ }}
modules_enabled = {{ "saslauth"; "disco"; "ping"; "external_services"; }}
modules_disabled = {{ "s2s"; "offline"; "tls"; }}
c2s_require_encryption = false
-- Jitsi guests log in anonymously.
authentication = "anonymous"
storage = "memory"
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{d}/prosody.log" }} }}

-- What the deploy's .env makes docker-jitsi-meet's prosody configure.
Include "{}"

VirtualHost "{XMPP_DOMAIN}"
"#,
            external_services_file.display()
        );
        let config = dir.join("prosody.cfg.lua");
        std::fs::write(&config, cfg).unwrap();
        let out = std::fs::File::create(dir.join("prosody.out")).unwrap();
        let child = Command::new("prosody")
            .arg("-F")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn prosody");
        let mut p = Prosody { child, port, dir: dir.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("prosody exited with {st}:\n{}", p.log());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return p;
            }
            assert!(Instant::now() < deadline, "prosody did not listen on {addr} within 10 s:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        read("prosody.out") + &read("prosody.log")
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes a directory tree when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One XEP-0215 <service/>, attributes as prosody sent them.
#[derive(Debug, Clone)]
struct Service {
    kind: String,
    host: String,
    port: String,
    transport: String,
    username: Option<String>,
    password: Option<String>,
    restricted: Option<String>,
    expires: Option<String>,
}

/// Asks prosody for external services, as a logged-in (anonymous) client.
fn extdisco(prosody: &Prosody) -> Vec<Service> {
    let script = deploy::repo().join("tests/prosody/extdisco.py");
    let out = Command::new("timeout")
        .arg("30")
        .arg(deploy::python())
        .arg(&script)
        .arg("127.0.0.1")
        .arg(prosody.port.to_string())
        .arg(XMPP_DOMAIN)
        .output()
        .expect("run extdisco.py");
    assert!(
        out.status.success(),
        "XEP-0215 query failed ({}): {}\n--- prosody ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        prosody.log()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from extdisco.py");
    let attr = |s: &serde_json::Value, k: &str| s.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    v.as_array()
        .expect("a list of services")
        .iter()
        .map(|s| Service {
            kind: attr(s, "type").expect("type"),
            host: attr(s, "host").expect("host"),
            port: attr(s, "port").unwrap_or_default(),
            transport: attr(s, "transport").unwrap_or_default(),
            username: attr(s, "username"),
            password: attr(s, "password"),
            restricted: attr(s, "restricted"),
            expires: attr(s, "expires"),
        })
        .collect()
}

/// What turnutils_uclient reports at the end of a run.
struct Summary {
    rc: i32,
    sent: u64,
    received: u64,
    lost: u64,
    text: String,
}

/// Runs turnutils_uclient with explicit long-term credentials (-u/-w, as a
/// browser uses what prosody handed out) against `host:port`. Bounded: 60 s.
fn uclient(mode: &[&str], host: &str, port: &str, user: &str, pass: &str, peer: SocketAddr, n: u32) -> Summary {
    let peer_ip = peer.ip().to_string();
    let peer_port = peer.port().to_string();
    let n_s = n.to_string();
    let out = Command::new("timeout")
        .arg("60")
        .arg("turnutils_uclient")
        .args(mode)
        // One allocation, channels; a 200-byte payload.
        .args(["-c", "-m", "1", "-n", &n_s, "-l", "200"])
        .args(["-e", &peer_ip, "-r", &peer_port, "-u", user, "-w", pass, "-p", port, host])
        .output()
        .expect("run turnutils_uclient");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let (mut sent, mut received, mut lost) = (0, 0, u64::MAX);
    for line in text.lines() {
        if let Some(rest) = line.split("start_mclient: tot_send_msgs=").nth(1) {
            let mut it = rest.split(", tot_recv_msgs=");
            if let (Some(a), Some(b)) = (it.next(), it.next())
                && let (Ok(a), Ok(b)) = (a.trim().parse(), b.trim().parse()) {
                    (sent, received) = (a, b);
                }
        }
        if let Some(rest) = line.split("Total lost packets ").nth(1) {
            lost = rest.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
        }
    }
    Summary { rc: out.status.code().unwrap_or(-1), sent, received, lost, text }
}

/// turnd with the deploy's production config, moved to loopback: listeners on
/// 127.0.0.1 (ports from the deploy), a test certificate in files instead of
/// the deploy's [tls.acme], the deploy's secret file, relay sockets on
/// 127.0.0.1 with the echo peer's loopback range allowed, and its own
/// metrics port.
fn start_turnd(deploy_dir: &Path, metrics_port: u16) -> Turnd {
    let rendered = std::fs::read_to_string(deploy_dir.join("turn/etc/turnd.toml")).unwrap();
    let mut cfg: toml::Table = rendered.parse().expect("the deploy's turnd.toml is TOML");
    let secret_file = deploy_dir.join("turn/etc/secret");
    let mut udp_probe = None;
    for l in cfg["listen"].as_array_mut().expect("[[listen]] entries") {
        let t = l.as_table_mut().unwrap();
        let addr = t["address"].as_str().unwrap().to_owned();
        let port = addr.rsplit_once(':').unwrap().1.to_owned();
        assert!(addr.starts_with("0.0.0.0:"), "production listener on all addresses: {addr}");
        let local = format!("127.0.0.1:{port}");
        if t["transport"].as_str() == Some("udp") {
            udp_probe = Some(local.parse::<SocketAddr>().unwrap());
        }
        t.insert("address".into(), local.into());
    }
    let probe = udp_probe.expect("a UDP listener in the deploy's turnd.toml");
    Turnd::builder().config(probe, |dir| {
        make_cert(dir, "cert.pem", "key.pem", "turnd-prosody-test");
        let mut cfg = cfg.clone();
        // The deploy gets its certificate by ACME from Let's Encrypt, which
        // this test has no CA for (and a relay named 127.0.0.1 could not get
        // one): the [tls.acme] table becomes a [tls] table with a test
        // certificate, the documented alternative. tests/acme.rs covers ACME
        // itself, against Pebble.
        let tls = cfg["tls"].as_table_mut().unwrap();
        let acme = tls.remove("acme").expect("the deploy's turnd.toml gets its certificate by [tls.acme]");
        assert_eq!(acme["names"].as_array().map(Vec::len), Some(1), "tls.acme.names: the relay's name: {acme:?}");
        tls.insert("cert".into(), dir.join("cert.pem").display().to_string().into());
        tls.insert("key".into(), dir.join("key.pem").display().to_string().into());
        cfg["auth"].as_table_mut().unwrap().insert("secret_file".into(), secret_file.display().to_string().into());
        let relay = cfg["relay"].as_table_mut().unwrap();
        relay.insert("ip".into(), "127.0.0.1".into());
        cfg["peers"].as_table_mut().unwrap().insert("allow".into(), toml::Value::Array(vec!["127.0.0.0/8".into()]));
        // turnutils_uclient picks RFC 5766 channel numbers.
        cfg["limits"].as_table_mut().unwrap().insert("legacy_channel_numbers".into(), true.into());
        cfg["metrics"].as_table_mut().unwrap().insert("listen".into(), format!("127.0.0.1:{metrics_port}").into());
        cfg.insert("admin".into(), toml::Value::Table(toml::Table::new()));
        cfg["admin"].as_table_mut().unwrap().insert("token_file".into(), dir.join("admin-token").display().to_string().into());
        toml::to_string(&cfg).unwrap()
    }).start()
}

fn auth_failures(metrics_port: u16, reason: &str) -> f64 {
    let (_, body) = common::http_get(&format!("127.0.0.1:{metrics_port}"), "/metrics");
    let series = format!("turnd_auth_failures_total{{reason=\"{reason}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

#[test]
fn prosody_hands_out_the_relay_and_its_credentials_work_over_udp_tcp_tls() {
    for tool in ["prosody", "turnutils_uclient", "openssl"] {
        assert!(deploy::have(tool), "{tool} is missing: ./test.sh installs it (Debian packages prosody, coturn, openssl)");
    }
    let started = Instant::now();
    let tmp = TempDir(temp_dir("prosody"));
    let deploy_dir = deploy::copy_deploy(&tmp.0);

    // The deploy, set up for a relay "turn" at 127.0.0.1 on free ports.
    let (turn_port, turns_port) = (free_port().to_string(), free_port().to_string());
    let relay_ports = format!("{}-{}", RELAY_PORTS.start(), RELAY_PORTS.end());
    deploy::ok(&deploy::setup(
        &deploy_dir,
        &[
            "--meet-domain", "meet.localhost",
            "--turn-domain", "127.0.0.1",
            "--meet-ip", "127.0.0.1",
            "--turn-ip", "127.0.0.1",
            "--email", "ops@example.com",
            "--turn-port", &turn_port,
            "--turns-port", &turns_port,
            "--relay-ports", &relay_ports,
        ],
    ));
    let secret = deploy::first_secret(&deploy_dir.join("turn/etc/secret"));
    let env = deploy::read_env(&deploy_dir.join("jitsi/.env"));
    assert_eq!(env["TURN_CREDENTIALS"], secret, "one secret on both sides");
    let ttl: u64 = env["TURN_TTL"].parse().unwrap();

    let metrics_port = free_port();
    let turnd = start_turnd(&deploy_dir, metrics_port);
    let prosody_dir = tmp.0.join("prosody");
    std::fs::create_dir_all(&prosody_dir).unwrap();
    let prosody = Prosody::start(&prosody_dir, &deploy_dir.join("jitsi/prosody-external-services.cfg.lua"));

    // What a Jitsi browser gets after logging in.
    let asked_at = deploy::now();
    let services = extdisco(&prosody);
    let listed: Vec<String> =
        services.iter().map(|s| format!("{}:{}:{}/{}", s.kind, s.host, s.port, s.transport)).collect();
    let expect = [
        format!("stun:127.0.0.1:{turn_port}/udp"),
        format!("turn:127.0.0.1:{turn_port}/udp"),
        format!("turn:127.0.0.1:{turn_port}/tcp"),
        format!("turns:127.0.0.1:{turns_port}/tcp"),
    ];
    assert_eq!(listed, expect, "the services prosody announces ({services:?})");
    for s in services.iter().filter(|s| s.kind != "stun") {
        let user = s.username.as_deref().unwrap_or_else(|| panic!("no username in {s:?}"));
        let pass = s.password.as_deref().unwrap_or_else(|| panic!("no password in {s:?}"));
        // Username = the expiry, now + TURN_TTL; password = HMAC of the deploy's secret.
        let expiry: u64 = user.parse().unwrap_or_else(|_| panic!("username {user:?} is not an expiry time"));
        assert!(
            expiry >= asked_at + ttl - 5 && expiry <= deploy::now() + ttl + 5,
            "expiry {expiry} is not now + TURN_TTL ({ttl})"
        );
        assert_eq!(pass, deploy::openssl_rest_password(&secret, user), "password of {s:?}");
        assert_eq!(s.restricted.as_deref(), Some("1"));
        assert!(s.expires.as_deref().is_some_and(|e| e.ends_with('Z')), "expires of {s:?}");
    }

    // Each entry's own host, port, transport and credential, through turnd.
    let peer = EchoPeer::start();
    let n = 10;
    let runs: Vec<_> = services
        .iter()
        .filter(|s| s.kind != "stun")
        .map(|s| {
            let s = s.clone();
            let peer = peer.addr;
            std::thread::spawn(move || {
                let mode: &[&str] = match (s.kind.as_str(), s.transport.as_str()) {
                    ("turn", "udp") => &[],
                    ("turn", "tcp") => &["-t"],
                    ("turns", "tcp") => &["-t", "-S"],
                    other => panic!("unexpected service {other:?}"),
                };
                let r = uclient(mode, &s.host, &s.port, s.username.as_deref().unwrap(), s.password.as_deref().unwrap(), peer, n);
                (s, r)
            })
        })
        .collect();
    for h in runs {
        let (s, r) = h.join().unwrap();
        let what = format!("{}:{}:{}?transport={}", s.kind, s.host, s.port, s.transport);
        assert_eq!(r.rc, 0, "{what}: turnutils_uclient failed:\n{}\n--- turnd ---\n{}", r.text, turnd.log());
        assert_eq!((r.sent, r.received, r.lost), (n as u64, n as u64, 0), "{what}: relay lost data:\n{}", r.text);
    }
    assert!(peer.finish() >= 3 * n as u64, "the echo peer saw the relayed data");

    // A credential signed with the same secret whose expiry has passed.
    let before = auth_failures(metrics_port, "expired");
    let stale = (deploy::now() - 60).to_string();
    let stale_pass = deploy::openssl_rest_password(&secret, &stale);
    let peer = EchoPeer::start();
    let r = uclient(&[], "127.0.0.1", &turn_port, &stale, &stale_pass, peer.addr, 2);
    assert_ne!(r.rc, 0, "an expired credential was accepted:\n{}", r.text);
    assert!(r.text.contains("Cannot complete Allocation"), "refusal not reported as expected:\n{}", r.text);
    assert!(auth_failures(metrics_port, "expired") > before, "turnd did not count the refusal as expired");
    drop(peer);

    drop(prosody);
    drop(turnd);
    eprintln!("prosody end-to-end test took {:.1} s", started.elapsed().as_secs_f64());
}
