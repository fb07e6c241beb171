//! turnd obtains, serves and renews its own certificate over ACME with the
//! TLS-ALPN-01 challenge, against Debian's Pebble (Let's Encrypt's test CA)
//! with pebble-challtestsrv answering DNS for the test name: everything on
//! loopback, Pebble validating on turnd's TLS port. Certificates are checked
//! against Pebble's own root (openssl and rustls, not our code), a restart
//! reuses the stored account and certificate, renewals (forced with
//! `turnctl cert renew`, and due by the clock with a short-lived
//! certificate) swap the certificate while a TLS allocation relays, a CA
//! that fails or refuses leaves the certificate serving and is counted, and
//! with SNI routing a web server's own `acme-tls/1` passes through.

mod common;
#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
#[path = "common/browser.rs"]
mod browser;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;

use harness::channel;
use turnd::stun::{method, Class};
use wire::{peer_at, Incoming, StreamClient};
use common::{free_port, temp_dir, EchoPeer, Turnd, SECRET};

const NAME: &str = "turn.acme.test";

/// Pebble and its DNS, on loopback; killed on drop.
struct Pebble {
    children: Vec<Child>,
    dir: PathBuf,
    /// The ACME directory URL.
    url: String,
    /// The CA of Pebble's own HTTPS (turnd's tls.acme.ca_root).
    https_ca: PathBuf,
    /// Pebble's issuing root (what clients of turnd trust).
    root: PathBuf,
    dns_management: u16,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Waits (bounded) until something accepts TCP connections at `addr`.
fn wait_listening(addr: SocketAddr, what: &str, children: &mut [Child]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        for c in children.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("{what} exited with {st}");
            }
        }
        assert!(Instant::now() < deadline, "{what} does not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Pebble {
    /// Pebble validating TLS-ALPN-01 on `tls_port`, issuing certificates
    /// valid for `validity` (Pebble's default: five years).
    fn start(tls_port: u16, validity: Option<Duration>) -> Pebble {
        for bin in ["pebble", "pebble-challtestsrv"] {
            assert!(
                Command::new("sh").args(["-c", &format!("command -v {bin}")]).stdout(Stdio::null()).status().unwrap().success(),
                "{bin} is missing: this test needs Debian's `pebble` package (test.sh installs it)"
            );
        }
        let dir = temp_dir("pebble");
        // Pebble's HTTPS: a CA and a certificate for 127.0.0.1 it signs.
        openssl(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=pebble test https ca", "-keyout", "ca.key", "-out", "ca.pem"], &dir);
        openssl(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "https.key", "-out", "https.csr"], &dir);
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").unwrap();
        openssl(&["x509", "-req", "-in", "https.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "https.pem"], &dir);
        let (acme_port, mgmt_port, dns_port, dns_mgmt) = (free_port(), free_port(), free_port(), free_port());
        let validity = validity.map(|v| format!(",\n    \"certificateValidityPeriod\": {}", v.as_secs())).unwrap_or_default();
        std::fs::write(
            dir.join("pebble.json"),
            format!(
                "{{\n  \"pebble\": {{\n    \"listenAddress\": \"127.0.0.1:{acme_port}\",\n    \"managementListenAddress\": \"127.0.0.1:{mgmt_port}\",\n    \
                 \"certificate\": \"{d}/https.pem\",\n    \"privateKey\": \"{d}/https.key\",\n    \"httpPort\": {http},\n    \"tlsPort\": {tls_port},\n    \
                 \"ocspResponderURL\": \"\",\n    \"externalAccountBindingRequired\": false{validity}\n  }}\n}}\n",
                d = dir.display(),
                http = free_port(),
            ),
        )
        .unwrap();
        let log = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
        let dns = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns_port}"), "-management", &format!("127.0.0.1:{dns_mgmt}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .expect("start pebble-challtestsrv");
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            // No random validation delays or refused nonces, and every
            // order validated anew (so each renewal proves the challenge).
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("start pebble");
        let mut children = vec![dns, pebble];
        wait_listening(format!("127.0.0.1:{dns_mgmt}").parse().unwrap(), "pebble-challtestsrv", &mut children);
        wait_listening(format!("127.0.0.1:{acme_port}").parse().unwrap(), "pebble", &mut children);
        wait_listening(format!("127.0.0.1:{mgmt_port}").parse().unwrap(), "pebble (management)", &mut children);
        let p = Pebble {
            children,
            url: format!("https://127.0.0.1:{acme_port}/dir"),
            https_ca: dir.join("ca.pem"),
            root: dir.join("root.pem"),
            dir,
            dns_management: dns_mgmt,
        };
        let root = p.curl(&format!("https://127.0.0.1:{mgmt_port}/roots/0"), None);
        assert!(root.contains("BEGIN CERTIFICATE"), "Pebble's root: {root}");
        std::fs::write(&p.root, root).unwrap();
        p
    }

    /// No Pebble: its directory URL answers nothing.
    fn absent() -> Pebble {
        let url = format!("https://127.0.0.1:{}/dir", free_port());
        let dir = temp_dir("no-pebble");
        openssl(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=unused ca", "-keyout", "ca.key", "-out", "ca.pem"], &dir);
        Pebble { children: vec![], https_ca: dir.join("ca.pem"), dir, url, root: PathBuf::new(), dns_management: 0 }
    }

    /// GET (or POST `body`) with curl, trusting Pebble's HTTPS CA.
    fn curl(&self, url: &str, body: Option<&str>) -> String {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "10", "--cacert"]).arg(&self.https_ca).arg(url);
        if let Some(b) = body {
            c.args(["-X", "POST", "--data", b]);
        }
        let out = c.output().expect("run curl");
        assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Makes the test DNS answer `addr` for `NAME` (Pebble then validates there).
    fn point_name_at(&self, addr: &str) {
        let url = format!("http://127.0.0.1:{}/add-a", self.dns_management);
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-X", "POST", "--data", &format!("{{\"host\":\"{NAME}.\",\"addresses\":[\"{addr}\"]}}"), &url])
            .output()
            .unwrap();
        assert!(out.status.success(), "challtestsrv add-a: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        common::keep_log(&self.dir.join("pebble.log"), "pebble.log");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// turnd with UDP on a free port and TLS on `tls_port`, its certificate from
/// Pebble by ACME, its state in `state` (so a restart can reuse it).
fn turnd(p: &Pebble, tls_port: u16, state: &Path, extra: &str) -> Turnd {
    let udp = free_port();
    let probe: SocketAddr = format!("127.0.0.1:{udp}").parse().unwrap();
    let (url, ca, state) = (p.url.clone(), p.https_ca.clone(), state.to_owned());
    Turnd::builder()
        .config(probe, move |_| {
            format!(
                "realm = \"{}\"\n[auth]\nsecrets = [\"{SECRET}\"]\n\
                 [[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{udp}\"\n\
                 [[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:{tls_port}\"\n\
                 [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n\
                 [peers]\nallow = [\"127.0.0.0/8\"]\n\
                 [log]\nlevel = \"info,turnd=debug\"\n\
                 [tls.acme]\nnames = [\"{NAME}\"]\ncontact = \"ops@acme.test\"\ndirectory = \"{url}\"\nstate_dir = \"{}\"\nca_root = \"{}\"\n",
                common::REALM,
                state.display(),
                ca.display()
            )
        })
        .extra(extra)
        .start()
}

/// The SHA-256 fingerprint of the certificate served for `NAME` on
/// `tls_port`, after openssl verified it against `root` for that name.
fn verified_fingerprint(tls_port: u16, root: &Path) -> Result<String, String> {
    verified_fingerprint_for(NAME, tls_port, root)
}

/// [`verified_fingerprint`] for another name.
fn verified_fingerprint_for(name: &str, tls_port: u16, root: &Path) -> Result<String, String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "timeout 10 openssl s_client -connect 127.0.0.1:{tls_port} -servername {name} -verify_hostname {name} -CAfile {} -verify_return_error -alpn stun.turn </dev/null 2>&1 > out.txt; \
             st=$?; cat out.txt; exit $st",
            root.display()
        ))
        .current_dir(temp_dir("s_client"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !text.contains("Verify return code: 0 (ok)") {
        return Err(text);
    }
    let mut x = Command::new("openssl").args(["x509", "-noout", "-fingerprint", "-sha256"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    x.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let fp = String::from_utf8_lossy(&x.wait_with_output().unwrap().stdout).trim().to_owned();
    assert!(fp.contains("Fingerprint"), "no certificate in s_client's output: {text}");
    Ok(fp)
}

/// Waits (bounded) until turnd serves a certificate for `NAME` that
/// verifies against Pebble's root and differs from `not`.
fn wait_verified(tls_port: u16, root: &Path, not: Option<&str>, limit: Duration, server: &Turnd) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let got = verified_fingerprint(tls_port, root);
        match &got {
            Ok(fp) if Some(fp.as_str()) != not => return fp.clone(),
            _ if Instant::now() > deadline => panic!("no (new) verified certificate within {limit:?}: {got:?}\n--- turnd ---\n{}", server.log()),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn turnctl(server: &Turnd, args: &[&str]) -> common::Run {
    let mut c = Command::new(env!("CARGO_BIN_EXE_turnctl"));
    c.args(args).args(["--admin", &format!("127.0.0.1:{}", server.metrics_port), "--token-file"]).arg(server.dir.join("admin-token"));
    common::run_bounded(&mut c, Duration::from_secs(120))
}

/// A TLS client that verifies turnd's certificate against `root` for `NAME`.
fn verifying_client(tls_port: u16, root: &Path) -> StreamClient {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(root).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().unwrap().with_root_certificates(roots).with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    tcp.set_nodelay(true).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), NAME.try_into().unwrap()).unwrap();
    StreamClient::over(Box::new(rustls::StreamOwned::new(conn, tcp)))
}

/// Sends one ChannelData message through `c` and waits for its echo.
fn echo_once(c: &mut StreamClient, k: u32) -> bool {
    let msg = format!("acme-{k}");
    c.send_channel(0x4000, msg.as_bytes());
    matches!(c.recv(Duration::from_secs(2)), Some(Incoming::Channel { number: 0x4000, data }) if data == msg.as_bytes())
}

#[test]
fn obtains_serves_and_keeps_a_certificate_over_tls_alpn_01() {
    let tls_port = free_port();
    let state = temp_dir("acme-state");
    // turnd first, with the CA not up yet: UDP serves at once, TLS waits,
    // and readiness says why.
    let server = turnd(&Pebble::absent(), tls_port, &state, "");
    server.wait_log("no TLS certificate yet");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (code, why) = loop {
        let (code, body) = server.http_get("/readyz");
        if body.contains("the last attempt failed") || Instant::now() > deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, 503, "{why}");
    assert!(why.contains(NAME) && why.contains("no certificate yet"), "{why}");
    assert_eq!(server.metric("turnd_ready"), 0.0);
    assert_eq!(server.metric("turnd_acme_renewals_total{result=\"failure\"}"), 1.0);
    assert!(server.log().contains("ACME could not obtain a certificate"), "{}", server.log());
    drop(server);

    // Now with Pebble: from an empty state directory to a served certificate.
    let pebble = Pebble::start(tls_port, None);
    let _ = std::fs::remove_dir_all(&state);
    let server = turnd(&pebble, tls_port, &state, "");
    let t0 = Instant::now();
    let fp = wait_verified(tls_port, &pebble.root, None, Duration::from_secs(60), &server);
    eprintln!("certificate obtained and served {:?} after start", t0.elapsed());
    assert_eq!(server.http_get("/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(server.metric("turnd_ready"), 1.0);
    assert_eq!(server.metric("turnd_acme_renewals_total{result=\"success\"}"), 1.0);
    let expiry = server.metric("turnd_tls_certificate_expiry_timestamp_seconds");
    let now = wire::unix_now() as f64;
    assert!(expiry > now + 300.0 * 86_400.0, "Pebble's default is five years: {expiry} vs now {now}");
    // The account and the certificate are kept, private.
    use std::os::unix::fs::PermissionsExt;
    for f in ["account.json", "cert.pem", "key.pem"] {
        let m = std::fs::metadata(state.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
    }
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(common::file_cert_fingerprint(&state.join("cert.pem")), fp);

    // TURN over TLS with that certificate, verified by rustls: relays.
    let peer = EchoPeer::start();
    let mut c = verifying_client(tls_port, &pebble.root);
    c.allocate("acme-user", SECRET);
    assert_eq!(c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(peer.addr)]).class(), Class::Success);
    assert!(echo_once(&mut c, 0));

    // turnctl status shows it.
    let st = turnctl(&server, &["status"]);
    assert_eq!(st.code, 0, "{}", st.text());
    assert!(st.stdout.contains(&format!("certificate: {NAME} from Pebble")) && st.stdout.contains("[acme]"), "{}", st.text());
    let js = turnctl(&server, &["status", "--json"]).json();
    assert_eq!(js["tls"]["names"][0], NAME);
    assert_eq!(js["tls"]["not_after"].as_f64(), Some(expiry));
    assert_eq!(js["tls"]["acme"]["renewals"]["success"], 1);

    // A restart reuses the stored account and certificate: the same
    // certificate serves before any order (Pebble is stopped first).
    drop(c);
    drop(server);
    let mut pebble = pebble;
    let root = std::fs::read(&pebble.root).unwrap();
    pebble.stop();
    let root_copy = state.with_extension("root.pem");
    std::fs::write(&root_copy, root).unwrap();
    let server = turnd(&pebble, tls_port, &state, "");
    server.wait_log("TLS certificate from the ACME state directory");
    assert_eq!(verified_fingerprint(tls_port, &root_copy).unwrap(), fp);
    assert_eq!(server.http_get("/readyz").0, 200);
    assert!(!server.log().contains("ACME account created"), "{}", server.log());
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(&root_copy);
}

#[test]
fn renewals_swap_the_certificate_while_a_tls_allocation_relays_and_failures_keep_it() {
    let tls_port = free_port();
    let state = temp_dir("acme-state");
    // Short-lived certificates: one renewal falls due (two thirds of 24 s)
    // while the test runs.
    let mut pebble = Pebble::start(tls_port, Some(Duration::from_secs(24)));
    let server = turnd(&pebble, tls_port, &state, "");
    let first = wait_verified(tls_port, &pebble.root, None, Duration::from_secs(60), &server);

    let peer = EchoPeer::start();
    let mut c = verifying_client(tls_port, &pebble.root);
    c.allocate("acme-renew", SECRET);
    assert_eq!(c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(peer.addr)]).class(), Class::Success);

    // A forced renewal: turnctl waits for it and says what it got.
    let r = turnctl(&server, &["cert", "renew"]);
    assert_eq!(r.code, 0, "{}", r.text());
    assert!(r.stdout.contains(&format!("renewed: certificate for {NAME} from Pebble")), "{}", r.text());
    let forced = wait_verified(tls_port, &pebble.root, Some(&first), Duration::from_secs(10), &server);
    assert!(echo_once(&mut c, 1), "the TLS allocation relays after the forced renewal");

    // One due by the clock, while the allocation relays all along.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut k = 2;
    let by_clock = loop {
        assert!(echo_once(&mut c, k), "echo {k} lost");
        k += 1;
        if let Ok(fp) = verified_fingerprint(tls_port, &pebble.root)
            && fp != forced
        {
            break fp;
        }
        assert!(Instant::now() < deadline, "no renewal by the clock within 40 s:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(by_clock, first);
    for _ in 0..10 {
        assert!(echo_once(&mut c, k), "echo {k} lost after the renewal");
        k += 1;
    }
    assert!(server.metric("turnd_acme_renewals_total{result=\"success\"}") >= 3.0);
    assert_eq!(server.metric("turnd_acme_renewals_total{result=\"failure\"}"), 0.0);

    // The CA refuses (its DNS now points elsewhere, so validation fails):
    // the certificate keeps serving, turnctl says why, it is counted.
    pebble.point_name_at("127.0.0.2");
    let r = turnctl(&server, &["cert", "renew"]);
    assert_ne!(r.code, 0, "{}", r.text());
    assert!(r.stderr.contains("did not validate") || r.stderr.contains("API error"), "{}", r.text());
    let kept = verified_fingerprint(tls_port, &pebble.root).expect("still served");
    assert_eq!(server.metric("turnd_acme_renewals_total{result=\"failure\"}"), 1.0);
    assert!(server.log().contains("ACME renewal failed, keeping the current certificate"), "{}", server.log());
    // The CA is down: the same.
    pebble.stop();
    let r = turnctl(&server, &["cert", "renew"]);
    assert_ne!(r.code, 0, "{}", r.text());
    assert_eq!(server.metric("turnd_acme_renewals_total{result=\"failure\"}"), 2.0);
    let st = turnctl(&server, &["status"]);
    assert!(st.stdout.contains("acme error:"), "{}", st.text());
    // Still serving the same certificate, and the allocation still relays.
    let out = Command::new("openssl").args(["x509", "-noout", "-fingerprint", "-sha256", "-in"]).arg(state.join("cert.pem")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), kept);
    assert!(echo_once(&mut c, k));
    let _ = std::fs::remove_dir_all(&state);
}

/// Chromium relays over `turns:` with the certificate turnd obtained,
/// checking it for real: its certificate store (NSS, in the profile's home)
/// trusts Pebble's root, and it runs without the harness's
/// `--ignore-certificate-errors`. The same page against a certificate it
/// does not trust (Pebble's root missing from the store) gathers nothing,
/// so the check is not a formality.
#[test]
fn chromium_relays_over_turns_with_the_obtained_certificate() {
    use std::ffi::OsString;
    let tls_port = free_port();
    let state = temp_dir("acme-state");
    let pebble = Pebble::start(tls_port, None);
    let server = turnd(&pebble, tls_port, &state, "\n[limits]\nlegacy_channel_numbers = true\n");
    wait_verified(tls_port, &pebble.root, None, Duration::from_secs(60), &server);

    let run = |trust: bool| {
        let home = temp_dir("chromium-home");
        let db = format!("sql:{}", home.join(".pki/nssdb").display());
        std::fs::create_dir_all(home.join(".pki/nssdb")).unwrap();
        let certutil = |args: &[&str]| {
            let out = Command::new("certutil").args(args).output().expect("certutil (Debian's libnss3-tools; test.sh installs it)");
            assert!(out.status.success(), "certutil {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        certutil(&["-N", "-d", &db, "--empty-password"]);
        if trust {
            certutil(&["-A", "-d", &db, "-t", "C,,", "-n", "pebble-test-root", "-i", pebble.root.to_str().unwrap()]);
        }
        let wrap = move |argv: &[OsString]| {
            let argv: Vec<&OsString> = argv.iter().filter(|a| a.to_str() != Some("--ignore-certificate-errors")).collect();
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]).env("HOME", &home);
            c
        };
        let page = browser::PageServer::start("127.0.0.1");
        let (user, pass) = browser::credentials();
        let turn_url = format!("turns:{NAME}:{tls_port}?transport=tcp");
        let rules = format!("--host-resolver-rules=MAP {NAME} 127.0.0.1");
        let r = browser::run_browser_case_with(&page, &page.page_url(), &turn_url, &user, &pass, browser::PAGE_TIMEOUT, Some(&wrap), &[&rules]);
        (turn_url, r)
    };
    let (turn_url, r) = run(true);
    let context = || format!("{turn_url}: page result:\n{}\n--- turnd log ---\n{}", browser::pretty(&r), server.log());
    browser::assert_relayed(&r, &turn_url, "tls", "127.0.0.1", &context);
    eprintln!("trusted: {}", browser::describe(&r));
    let (_, r) = run(false);
    assert_ne!(r["ok"], true, "Chromium relayed through a certificate it cannot trust:\n{}", browser::pretty(&r));
    let refused = r["candidateErrors"].as_array().is_some_and(|e| !e.is_empty() && e.iter().all(|e| e["errorCode"] == 701));
    assert!(refused, "expected Chromium's TLS refusal (701) for every turns: attempt:\n{}", browser::pretty(&r));
    let _ = std::fs::remove_dir_all(&state);
}

/// With SNI routing, turnd answers the challenge for its own name, and a
/// web server behind it gets its own `acme-tls/1` ClientHello untouched.
#[test]
fn sni_routing_keeps_acme_tls_alpn_for_its_owner() {
    let tls_port = free_port();
    let state = temp_dir("acme-state");
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let pebble = Pebble::start(tls_port, None);
    let server = turnd(&pebble, tls_port, &state, &format!("\n[tls.passthrough]\nbackend = \"{backend_addr}\"\n"));
    // Pebble validated turnd's name through the router.
    wait_verified(tls_port, &pebble.root, None, Duration::from_secs(60), &server);

    // A validator's hello for the web server's name, offering acme-tls/1 only.
    let got = std::thread::spawn(move || {
        // turnd's start-up check connected once without a byte; the first
        // connection with data is the passed-through one.
        for _ in 0..5 {
            let (mut s, _) = backend.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            if n > 0 {
                buf.truncate(n);
                return buf;
            }
        }
        Vec::new()
    });
    // Its handshake goes nowhere (the backend is not TLS): only what reached the backend counts.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("timeout 5 openssl s_client -connect 127.0.0.1:{tls_port} -servername web.acme.test -alpn acme-tls/1 </dev/null >/dev/null 2>&1; true"))
        .status();
    let hello = got.join().unwrap();
    assert_eq!(hello.first(), Some(&0x16), "a TLS record reached the backend");
    let has = |needle: &[u8]| hello.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"web.acme.test") && has(b"acme-tls/1"), "the backend got the ClientHello as sent");

    // A reload that adds a name: a new order for both, validated through
    // the router again (the new name is a TURN name now), served for both.
    let cfg = std::fs::read_to_string(&server.config).unwrap().replace(&format!("names = [\"{NAME}\"]"), &format!("names = [\"{NAME}\", \"relay.acme.test\"]"));
    std::fs::write(&server.config, cfg).unwrap();
    let (rc, out) = common::turnctl_reload(&server);
    assert_eq!(rc, 0, "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let fp = loop {
        match verified_fingerprint_for("relay.acme.test", tls_port, &pebble.root) {
            Ok(fp) => break fp,
            Err(e) => assert!(Instant::now() < deadline, "relay.acme.test never served a valid certificate: {e}\n{}", server.log()),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(verified_fingerprint(tls_port, &pebble.root).unwrap(), fp, "one certificate for both names");
    assert!(server.log().contains("ACME settings changed"), "{}", server.log());
    let _ = std::fs::remove_dir_all(&state);
}
