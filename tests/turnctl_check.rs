//! `turnctl check` against real turnd processes: every transport relays; a
//! wrong secret; a clock-skewed machine (faketime); nothing listening; a host
//! that never answers; certificate problems; and, from a network namespace
//! where UDP is blocked, UDP fails while TLS on 443 relays.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{Run, Turnd, SECRET};
use netns::NetNs;
use serde_json::Value;

const TURNCTL: &str = env!("CARGO_BIN_EXE_turnctl");

/// Runs `cmd` to completion (see [`common::run_bounded`]), without the
/// proxy variables: turnctl check honours them, and these runs go direct.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Run {
    for v in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        cmd.env_remove(v);
    }
    common::run_bounded(cmd, limit)
}

fn check(args: &[&str]) -> Run {
    run_bounded(Command::new(TURNCTL).arg("check").args(args), Duration::from_secs(60))
}

/// The JSON entry of one transport.
fn transport<'a>(j: &'a Value, name: &str) -> &'a Value {
    j["transports"].as_array().unwrap().iter().find(|t| t["transport"] == name).unwrap_or_else(|| panic!("no {name} in {j}"))
}

/// The table row of one transport, split on whitespace.
fn row<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    out.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} row in:\n{out}"))
        .split_whitespace()
        .collect()
}

fn all_args<'a>(port: &'a str, tls_port: &'a str, ca: &'a str) -> Vec<&'a str> {
    vec!["127.0.0.1", "--port", port, "--tls-port", tls_port, "--ca", ca, "--timeout", "3s"]
}

#[test]
fn every_transport_relays_against_a_running_turnd() {
    let s = Turnd::builder().extra("").streams().start();
    let (port, tls_port) = (s.port.to_string(), s.tls_port.to_string());
    let ca = s.dir.join("cert.pem").to_string_lossy().into_owned();
    let base = all_args(&port, &tls_port, &ca);

    let r = check(&[&base[..], &["--secret", SECRET, "--json"]].concat());
    assert_eq!(r.code, 0, "{}\n{}", r.text(), s.log());
    let j = r.json();
    assert_eq!(j["ok"], true);
    assert_eq!(j["auth"], "ok");
    for name in ["udp", "tcp", "tls"] {
        let t = transport(&j, name);
        for step in ["binding", "allocate", "relay"] {
            assert_eq!(t[step]["status"], "ok", "{name} {step}: {}", r.text());
        }
        assert_eq!(t["relays"], true);
        assert!(t["relayed_address"].as_str().unwrap().starts_with("127.0.0.1:"), "{t}");
        assert!(t["mapped_address"].as_str().unwrap().starts_with("127.0.0.1:"), "{t}");
        assert!(t["round_trip_ms"].as_f64().unwrap() < 3000.0);
    }
    assert_eq!(transport(&j, "tls")["port"], s.tls_port);
    let c = &j["certificate"];
    assert_eq!(c["verified"], true, "{}", r.text());
    assert_eq!(c["trust"], "ca_file");
    assert_eq!(c["subject_cn"], "turnd-test-a");
    assert_eq!(c["names"], serde_json::json!(["127.0.0.1", "localhost"]));
    assert_eq!(c["self_signed"], true);
    // The harness makes certificates valid for 2 days.
    assert!(matches!(c["days_left"].as_i64(), Some(1 | 2)), "{c}");
    assert_eq!(c["expires_soon"], true);

    let r = check(&[&base[..], &["--secret", SECRET]].concat());
    assert_eq!(r.code, 0, "{}", r.text());
    for (name, p) in [("UDP", &port), ("TCP", &port), ("TLS", &tls_port)] {
        assert_eq!(&row(&r.stdout, name)[..5], &[name, p.as_str(), "ok", "ok", "ok"], "{}", r.text());
    }
    assert!(r.stdout.contains(&format!("Every transport relays (UDP {port}, TCP {port}, TLS {tls_port})")), "{}", r.text());
    assert!(r.stdout.contains("peer leg     ok: UDP from 127.0.0.1:"), "{}", r.text());
    assert!(r.stdout.contains(&format!("certificate  TLS {tls_port} for 127.0.0.1: verified")), "{}", r.text());
    assert!(r.stdout.contains("Certificate expires in "), "{}", r.text());

    // Without a secret: Binding only, and it says so.
    let r = check(&base);
    assert_eq!(r.code, 0, "{}", r.text());
    assert_eq!(&row(&r.stdout, "UDP")[..5], &["UDP", port.as_str(), "ok", "-", "-"], "{}", r.text());
    assert!(r.stdout.contains("Relaying was not checked"), "{}", r.text());
    eprintln!("{}", r.stdout);
}

#[test]
fn wrong_secret_is_an_authentication_failure() {
    let s = Turnd::builder().extra("").streams().start();
    let (port, tls_port) = (s.port.to_string(), s.tls_port.to_string());
    let ca = s.dir.join("cert.pem").to_string_lossy().into_owned();
    let base = all_args(&port, &tls_port, &ca);

    let r = check(&[&base[..], &["--secret", "not-the-secret", "--json"]].concat());
    assert_eq!(r.code, 1, "{}", r.text());
    let j = r.json();
    assert_eq!(j["ok"], false);
    assert_eq!(j["auth"], "wrong_secret", "{}", r.text());
    for name in ["udp", "tcp", "tls"] {
        let t = transport(&j, name);
        assert_eq!(t["binding"]["status"], "ok", "{}", r.text());
        assert_eq!(t["allocate"]["status"], "failed");
        assert_eq!(t["allocate"]["error"], "wrong_secret");
        assert_eq!(t["relays"], false);
    }

    let r = check(&[&base[..], &["--secret", "not-the-secret"]].concat());
    assert_eq!(r.code, 1, "{}", r.text());
    assert_eq!(&row(&r.stdout, "UDP")[..5], &["UDP", port.as_str(), "ok", "FAILED", "-"], "{}", r.text());
    assert!(
        r.stdout.contains("Authentication failed: the secret does not match the relay's (check TURN_CREDENTIALS / auth.secrets)"),
        "{}",
        r.text()
    );
    assert!(r.stdout.contains("Nothing relays"), "{}", r.text());
}

/// This machine's clock 3 h behind the relay's (faketime on turnctl only):
/// its 1-hour credentials have an expiry in the past by the relay's clock.
#[test]
fn clock_skew_is_reported_with_its_size() {
    have_faketime();
    let s = Turnd::builder().extra("").streams().start();
    let port = s.port.to_string();
    let mut cmd = Command::new("faketime");
    cmd.args(["-f", "-3h", TURNCTL, "check", "127.0.0.1", "--port", &port, "--no-tls", "--secret", SECRET, "--json"])
        // Only the wall clock: timeouts keep working.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let r = run_bounded(&mut cmd, Duration::from_secs(60));
    assert_eq!(r.code, 1, "{}", r.text());
    let j = r.json();
    assert_eq!(j["auth"], "clock_skew", "{}", r.text());
    let skew = j["clock_skew_seconds"].as_i64().unwrap();
    assert!((10_790..=10_810).contains(&skew), "skew {skew}: {}", r.text());
    assert_eq!(transport(&j, "udp")["allocate"]["error"], "clock_skew");
    let said = j["meanings"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect::<Vec<_>>().join("\n");
    assert!(said.contains("Your clock or the server's is off: the relay's clock is about 3 h ahead"), "{said}");
    assert!(said.contains("expiry in the past"), "{said}");
    assert!(!said.contains("secret does not match"), "{said}");
}

#[test]
fn nothing_listening_is_refused_at_once() {
    let (port, tls_port) = (common::free_port(), common::free_port());
    let r = check(&[
        "127.0.0.1", "--port", &port.to_string(), "--tls-port", &tls_port.to_string(), "--secret", SECRET, "--timeout", "2s", "--json",
    ]);
    assert_eq!(r.code, 1, "{}", r.text());
    assert!(r.elapsed < Duration::from_secs(2), "refusals should not wait for the timeout: {}", r.text());
    let j = r.json();
    for name in ["udp", "tcp", "tls"] {
        assert_eq!(transport(&j, name)["binding"]["error"], "refused", "{}", r.text());
    }
    assert_eq!(j["auth"], "untested");
    let said = j["meanings"].to_string();
    assert!(said.contains("Nothing listens at 127.0.0.1"), "{said}");
    assert!(said.contains("is turnd running"), "{said}");
}

/// A "host" that takes packets and connections and never answers: each
/// transport reports the timeout, all of it within about one timeout.
#[test]
fn a_host_that_never_answers_times_out_within_the_timeout() {
    let (udp, tcp, tls) = loop {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = u.local_addr().unwrap().port();
        if let Ok(t) = TcpListener::bind(("127.0.0.1", p)) {
            break (u, t, TcpListener::bind("127.0.0.1:0").unwrap());
        }
    };
    let port = udp.local_addr().unwrap().port().to_string();
    let tls_port = tls.local_addr().unwrap().port().to_string();
    let r = check(&["127.0.0.1", "--port", &port, "--tls-port", &tls_port, "--secret", SECRET, "--timeout", "1s", "--json"]);
    drop((udp, tcp, tls));
    assert_eq!(r.code, 1, "{}", r.text());
    assert!(r.elapsed < Duration::from_secs(4), "took {:?}: {}", r.elapsed, r.text());
    let j = r.json();
    for name in ["udp", "tcp", "tls"] {
        let b = &transport(&j, name)["binding"];
        assert_eq!(b["error"], "timeout", "{name}: {}", r.text());
        assert_eq!(b["detail"], "no answer within 1 s");
    }
    let said = j["meanings"].to_string();
    assert!(said.contains("The relay does not answer at 127.0.0.1 from here"), "{said}");
}

#[test]
fn certificate_problems_are_explained() {
    let s = Turnd::builder().extra("").streams().start();
    let (port, tls_port) = (s.port.to_string(), s.tls_port.to_string());
    let ca = s.dir.join("cert.pem").to_string_lossy().into_owned();

    // Not trusted (no --ca): the TLS handshake fails, the others relay.
    let r = check(&["127.0.0.1", "--port", &port, "--tls-port", &tls_port, "--secret", SECRET, "--json"]);
    assert_eq!(r.code, 0, "{}", r.text());
    let j = r.json();
    assert_eq!(transport(&j, "tls")["binding"]["error"], "certificate", "{}", r.text());
    assert_eq!(j["certificate"]["verified"], false);
    assert_eq!(j["certificate"]["error"], "unknown_issuer", "{}", r.text());
    assert!(j["meanings"].to_string().contains("The certificate is self-signed"), "{}", r.text());

    // --insecure goes on over TLS and still reports the certificate.
    let r = check(&["127.0.0.1", "--port", &port, "--tls-port", &tls_port, "--secret", SECRET, "--insecure", "--json"]);
    assert_eq!(r.code, 0, "{}", r.text());
    let j = r.json();
    assert_eq!(transport(&j, "tls")["relays"], true, "{}", r.text());
    assert_eq!(j["certificate"]["verified"], false);
    assert_eq!(j["certificate"]["error"], "unknown_issuer");
    assert!(j["certificate"]["days_left"].is_i64());

    // Trusted, but checked for a name it does not carry.
    let r = check(&[
        "127.0.0.1", "--port", &port, "--tls-port", &tls_port, "--ca", &ca, "--tls-host", "turn.example.com", "--no-udp", "--no-tcp",
    ]);
    assert_eq!(r.code, 1, "{}", r.text());
    assert!(r.stdout.contains("NOT verified: does not name the host"), "{}", r.text());
    assert!(r.stdout.contains("The certificate does not name turn.example.com (it names 127.0.0.1, localhost)"), "{}", r.text());
}

fn openssl(dir: &std::path::Path, faketime: Option<&str>, args: &[&str]) {
    let mut c = match faketime {
        Some(offset) => {
            let mut c = Command::new("faketime");
            c.args(["-f", offset, "openssl"]);
            c
        }
        None => Command::new("openssl"),
    };
    let out = c.current_dir(dir).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn have_faketime() {
    assert!(
        Command::new("sh").args(["-c", "command -v faketime"]).output().unwrap().status.success(),
        "faketime is missing: test.sh installs Debian's faketime package"
    );
}

/// turnd with UDP on `port` and TLS on `tls_port`, serving `cert` and `key`
/// (files `make` writes into turnd's directory).
fn start_tls(port: u16, tls_port: u16, cert: &str, key: &str, make: impl FnOnce(&std::path::Path)) -> Turnd {
    Turnd::builder().config(format!("127.0.0.1:{port}").parse().unwrap(), |dir| {
        make(dir);
        format!(
            "realm = \"{realm}\"\n[auth]\nsecrets = [\"{SECRET}\"]\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
             [[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:{tls_port}\"\n\
             [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n",
            realm = common::REALM,
            cert = dir.join(cert).display(),
            key = dir.join(key).display(),
        )
    }).start()
}

/// A private CA and a server certificate it signed for turn.test (and
/// 127.0.0.1); turnd serves the chain, turnctl trusts the CA with --ca.
#[test]
fn a_private_ca_chain_verifies_for_its_name() {
    let (port, tls_port) = (common::free_port(), common::free_port());
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let s = start_tls(port, tls_port, "full.pem", "leaf.key", |dir| {
        openssl(dir, None, &[&["req", "-x509"][..], &ec, &["-days", "30", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=Test Root CA"]].concat());
        openssl(dir, None, &[&["req"][..], &ec, &["-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=turn.test"]].concat());
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:turn.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(dir, None, &[
            "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "20", "-extfile", "ext.cnf",
            "-out", "leaf.pem",
        ]);
        let full = std::fs::read_to_string(dir.join("leaf.pem")).unwrap() + &std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        std::fs::write(dir.join("full.pem"), full).unwrap();
    });
    let ca = s.dir.join("ca.pem").to_string_lossy().into_owned();
    let (p, tp) = (port.to_string(), tls_port.to_string());
    let args = ["127.0.0.1", "--port", &p, "--tls-port", &tp, "--ca", &ca, "--tls-host", "turn.test", "--secret", SECRET, "--no-tcp"];
    let r = check(&[&args[..], &["--json"]].concat());
    assert_eq!(r.code, 0, "{}\n{}", r.text(), s.log());
    let j = r.json();
    let c = &j["certificate"];
    assert_eq!((c["verified"].clone(), c["trust"].clone(), c["chain_length"].clone()), (true.into(), "chain".into(), 2.into()), "{c}");
    assert_eq!(c["issuer_cn"], "Test Root CA");
    assert_eq!(c["self_signed"], false);
    assert_eq!(c["names"], serde_json::json!(["turn.test", "127.0.0.1"]));
    assert!(matches!(c["days_left"].as_i64(), Some(19 | 20)), "{c}");
    assert_eq!(c["expires_soon"], false);
    assert_eq!(transport(&j, "tls")["relays"], true);
    assert_eq!(j["relaying"], serde_json::json!(["udp", "tls"]));

    let r = check(&args);
    assert_eq!(r.code, 0, "{}", r.text());
    assert!(r.stdout.contains(&format!("certificate  TLS {tls_port} for turn.test: verified\n")), "{}", r.text());
    assert!(r.stdout.contains("issued by Test Root CA; chain of 2"), "{}", r.text());
    assert!(r.stdout.contains(&format!("Every transport checked relays (UDP {port}, TLS {tls_port}).")), "{}", r.text());
    assert!(!r.stdout.contains("renew"), "{}", r.text());
}

/// A certificate that expired (made 10 days ago, valid for 2): TLS fails,
/// the others still relay, and the report says to renew.
#[test]
fn an_expired_certificate_says_renew() {
    have_faketime();
    let (port, tls_port) = (common::free_port(), common::free_port());
    let s = start_tls(port, tls_port, "old.pem", "old.key", |dir| {
        openssl(dir, Some("-10d"), &[
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-keyout", "old.key",
            "-out", "old.pem", "-subj", "/CN=old", "-addext", "subjectAltName=IP:127.0.0.1",
        ]);
    });
    let ca = s.dir.join("old.pem").to_string_lossy().into_owned();
    let (p, tp) = (port.to_string(), tls_port.to_string());
    let r = check(&["127.0.0.1", "--port", &p, "--tls-port", &tp, "--ca", &ca, "--secret", SECRET, "--no-tcp", "--json"]);
    assert_eq!(r.code, 0, "{}", r.text());
    let j = r.json();
    assert_eq!(transport(&j, "tls")["binding"]["error"], "certificate", "{}", r.text());
    assert_eq!(transport(&j, "udp")["relays"], true);
    let c = &j["certificate"];
    assert_eq!(c["error"], "expired", "{c}");
    assert!(matches!(c["days_left"].as_i64(), Some(-9 | -8)), "{c}");
    let said = j["meanings"].to_string();
    assert!(said.contains("The certificate expired on ") && said.contains("Renew it"), "{said}");
    assert!(said.contains(&format!("TLS on {tls_port} does not work")), "{said}");
}

/// turnd on the host end of a namespace's veth, UDP and TCP on 3478 and TLS
/// on 443 (certificate for localhost), as in tests/netns_udp_blocked.rs.
fn start_turnd_for(ns: &NetNs) -> Turnd {
    let host = ns.host_ip().to_string();
    let udp_addr: SocketAddr = format!("{host}:3478").parse().unwrap();
    Turnd::builder().config(udp_addr, |dir| {
        common::make_cert(dir, "cert.pem", "key.pem", "turnd-check-netns");
        format!(
            "realm = \"{realm}\"\n\
             [auth]\nsecrets = [\"{SECRET}\"]\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"{host}:3478\"\n\
             [[listen]]\ntransport = \"tcp\"\naddress = \"{host}:3478\"\n\
             [[listen]]\ntransport = \"tls\"\naddress = \"{host}:443\"\n\
             [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n",
            realm = common::REALM,
            cert = dir.join("cert.pem").display(),
            key = dir.join("key.pem").display(),
        )
    }).start()
}

#[test]
fn from_a_udp_blocked_network_tls_on_443_relays() {
    let ns = NetNs::create_udp_blocked();
    let server = start_turnd_for(&ns);
    let host = ns.host_ip().to_string();
    let ca = server.dir.join("cert.pem").to_string_lossy().into_owned();
    let in_ns = |extra: &[&str]| {
        let mut c = ns.command("timeout");
        c.args(["-k", "2", "40", TURNCTL, "check", &host, "--secret", SECRET, "--tls-host", "localhost", "--ca", &ca]).args(extra);
        run_bounded(&mut c, Duration::from_secs(50))
    };
    let diag = |r: &Run| format!("{}\n--- firewall ---\n{}\n--- turnd log ---\n{}", r.text(), ns.firewall_rules(), server.log());

    let r = in_ns(&["--json"]);
    assert_eq!(r.code, 0, "{}", diag(&r));
    let j = r.json();
    let udp = transport(&j, "udp");
    assert_eq!(udp["port"], 3478);
    assert_eq!(udp["binding"]["status"], "failed", "{}", diag(&r));
    assert!(matches!(udp["binding"]["error"].as_str(), Some("blocked" | "timeout")), "{}", diag(&r));
    assert_eq!(udp["relays"], false);
    assert_eq!(transport(&j, "tcp")["relays"], false);
    let tls = transport(&j, "tls");
    assert_eq!(tls["port"], 443);
    assert_eq!(tls["relays"], true, "{}", diag(&r));
    assert_eq!(tls["mapped_address"].as_str().unwrap().split(':').next(), Some(ns.ns_ip().to_string().as_str()));
    assert_eq!(j["certificate"]["verified"], true, "{}", diag(&r));
    // The peer leg needs UDP from here: not tested, and that is no failure.
    assert_eq!(j["peer_leg"]["tested"], false, "{}", diag(&r));
    assert!(j["peer_leg"]["result"]["detail"].as_str().unwrap().contains("run turnctl check on the videobridge host"), "{}", diag(&r));

    let r = in_ns(&[]);
    assert_eq!(r.code, 0, "{}", diag(&r));
    assert_eq!(row(&r.stdout, "UDP")[..3], ["UDP", "3478", "FAILED"], "{}", diag(&r));
    assert_eq!(row(&r.stdout, "TLS")[..5], ["TLS", "443", "ok", "ok", "ok"], "{}", diag(&r));
    assert!(
        r.stdout.contains("UDP blocked here: browsers will fall back to TLS on 443; media still flows but with more latency"),
        "{}",
        diag(&r)
    );
    assert!(r.stdout.contains("peer leg     not tested: UDP does not get out from here"), "{}", diag(&r));
    eprintln!("{}", r.stdout);
}

/// The CONNECT requests a fake HTTP proxy on loopback receives (up to `n`,
/// each answered 403), and its address.
fn refusing_proxy(n: usize) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{Read, Write};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let mut heads = Vec::new();
        // Bounded: nobody connecting within 20 s ends the wait.
        l.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while heads.len() < n && std::time::Instant::now() < deadline {
            let mut c = match l.accept() {
                Ok((c, _)) => c,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            c.set_nonblocking(false).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            let _ = c.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
            heads.push(String::from_utf8_lossy(&head).into_owned());
        }
        heads
    });
    (addr, t)
}

#[test]
fn proxy_credentials_come_from_a_file_or_the_environment_not_the_command_line() {
    // base64("carol:s3cret:pw")
    const BASIC: &str = "Proxy-Authorization: Basic Y2Fyb2w6czNjcmV0OnB3\r\n";
    let dir = common::temp_dir("proxy-auth");
    let file = dir.join("proxy-auth");
    std::fs::write(&file, "carol:s3cret:pw\n").unwrap();
    let (proxy, seen) = refusing_proxy(1);
    let url = format!("http://{proxy}");
    let r = check(&["198.18.0.1", "--no-udp", "--no-tls", "--timeout", "2s", "--proxy", &url, "--proxy-auth-file", file.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.text());
    let heads = seen.join().unwrap();
    assert!(!heads.is_empty() && heads[0].starts_with("CONNECT 198.18.0.1:3478 ") && heads[0].contains(BASIC), "{heads:?}");

    let (proxy, seen) = refusing_proxy(1);
    let url = format!("http://{proxy}");
    let mut cmd = Command::new(TURNCTL);
    cmd.args(["check", "198.18.0.1", "--no-udp", "--no-tls", "--timeout", "2s", "--proxy", &url]).env("TURNCTL_PROXY_AUTH", "carol:s3cret:pw");
    let r = run_bounded(&mut cmd, Duration::from_secs(60));
    assert_eq!(r.code, 1, "{}", r.text());
    let heads = seen.join().unwrap();
    assert!(heads.first().is_some_and(|h| h.contains(BASIC)), "{heads:?}");

    // Without a proxy the file is a usage error, named.
    let r = check(&["198.18.0.1", "--proxy", "", "--proxy-auth-file", file.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.text());
    assert!(r.text().contains("--proxy-auth-file"), "{}", r.text());
    let _ = std::fs::remove_dir_all(&dir);
}
