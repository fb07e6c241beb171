//! A browser given only a draining relay relays through its sibling:
//! headless Chromium in a network namespace loads the page of
//! tests/browser_chromium.rs (two relay-only peer connections and a data
//! channel) with one TURN URL, that of relay A, which `turnctl drain` has
//! taken out of service. A answers Chromium's authenticated Allocate with
//! 300 Try Alternate naming relay B; Chromium (libwebrtc's TurnPort:
//! `OnTryAlternate`, `SetAlternateServer`, `TryAlternateServer`) allocates
//! on B with the same credentials and the nonce of the 300, and both peer
//! connections relay through B, over UDP, TCP and TLS.
//!
//! Each relay has a realm of its own (as setup.sh makes each relay's name
//! its realm): Chromium keeps A's realm at B, which B accepts with the
//! redirect nonce.
//!
//! Both relays listen on the host end of the namespace's veth (Chromium
//! refuses to be redirected to a loopback address), on their own ports, and
//! relay from their own port ranges there: A's relay ports are 20000-24999,
//! B's 25000-29999, so a relayed address says which relay holds it. A names
//! B by IP:PORT, the port of B's listener for the transport under test.
//! Needs root, `ip netns` and the `chromium` package (test.sh installs it).

mod common;
#[path = "common/browser.rs"]
mod browser;
#[path = "common/netns.rs"]
mod netns;

use std::ffi::OsString;
use std::process::Command;
use std::time::Instant;

use browser::{PageServer, PAGE_TIMEOUT};
use common::{turnctl, Turnd, SECRET};
use netns::NetNs;

/// A relay on `host`: UDP and TCP on `port`, TLS on `tls_port` (a
/// self-signed certificate), relaying from `host` on `ports`, with `extra`.
/// Its realm is its own, as setup.sh makes each relay's name its realm.
fn relay(realm: &str, host: &str, port: u16, tls_port: u16, ports: &str, extra: &str) -> Turnd {
    let probe = format!("{host}:{port}").parse().unwrap();
    let (host, ports, realm) = (host.to_owned(), ports.to_owned(), realm.to_owned());
    Turnd::builder()
        .config(probe, move |dir| {
            common::make_cert(dir, "cert.pem", "key.pem", "turnd-fleet");
            format!(
                "realm = \"{realm}\"\n[auth]\nsecrets = [\"{SECRET}\"]\n\
                 [[listen]]\ntransport = \"udp\"\naddress = \"{host}:{port}\"\n\
                 [[listen]]\ntransport = \"tcp\"\naddress = \"{host}:{port}\"\n\
                 [[listen]]\ntransport = \"tls\"\naddress = \"{host}:{tls_port}\"\n\
                 [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
                 [relay]\nip = \"{host}\"\nports = \"{ports}\"\n[limits]\nlegacy_channel_numbers = true\n",
                dir.join("cert.pem").display(),
                dir.join("key.pem").display(),
            )
        })
        .extra(extra)
        .start()
}

/// "allocation created" lines of `log` for `client_ip` over `transport`.
fn allocations(log: &str, client_ip: &str, transport: &str) -> usize {
    let client = format!("client={client_ip}:");
    log.lines()
        .filter(|l| l.contains("allocation created") && l.contains(&client) && l.contains(&format!("transport=\"{transport}\"")))
        .count()
}

/// Chromium in the namespace, given only A's URL for `transport` while A
/// drains toward B: both peer connections relay through B.
fn follows_the_redirect(transport: &str) {
    let t0 = Instant::now();
    let ns = NetNs::create_open();
    let host = ns.host_ip().to_string();
    let ns_ip = ns.ns_ip().to_string();
    let (b_port, b_tls) = (common::free_port(), common::free_port());
    let b = relay("turn2.fleet.test", &host, b_port, b_tls, "25000-29999", "");
    // A sends each transport's clients to B's listener of that transport.
    // (With --ignore-certificate-errors, Chromium takes B's certificate
    // whatever it names: B may take TLS clients.)
    let to = if transport == "tls" { format!("{b_tls}\"\ntls_clients = true") } else { format!("{b_port}\"") };
    let (a_port, a_tls) = (common::free_port(), common::free_port());
    let a = relay("turn1.fleet.test", &host, a_port, a_tls, "20000-24999", &format!("[[drain.alternate]]\naddress = \"{host}:{to}\n"));
    let (rc, out) = turnctl(&a, &["drain"]);
    assert_eq!(rc, 0, "{out}");
    assert_eq!(a.http_get("/readyz").0, 503);

    let url = match transport {
        "udp" => format!("turn:{host}:{a_port}?transport=udp"),
        "tcp" => format!("turn:{host}:{a_port}?transport=tcp"),
        _ => format!("turns:{host}:{a_tls}?transport=tcp"),
    };
    let page = PageServer::on(ns.tcp_listener("127.0.0.1:0".parse().unwrap()));
    let in_ns = |argv: &[OsString]| {
        let mut c = ns.command(argv[0].to_str().unwrap());
        c.args(&argv[1..]);
        c
    };
    let (username, password) = browser::credentials();
    let r = browser::run_browser_case(&page, &page.page_url(), &url, &username, &password, PAGE_TIMEOUT, Some(&in_ns));
    let context = || {
        format!(
            "{url} (A draining toward B): page result:\n{}\n--- A's log ---\n{}\n--- B's log ---\n{}",
            browser::pretty(&r),
            a.log(),
            b.log()
        )
    };
    // Relayed, relay/relay, over the transport of A's URL, from relayed
    // addresses on the host end.
    browser::assert_relayed(&r, &url, transport, &host, &context);
    // ... and those are B's: its port range, its allocations; A made none.
    for side in ["pairA", "pairB"] {
        for end in ["local", "remote"] {
            let port = r[side][end]["port"].as_u64().unwrap_or(0);
            assert!((25000..=29999).contains(&port), "{side}.{end} port {port} is not one of B's: {}", context());
        }
    }
    let on_b = allocations(&b.log(), &ns_ip, transport);
    assert!(on_b >= 2, "B logged {on_b} {transport} allocations from {ns_ip}, expected one per peer connection: {}", context());
    assert_eq!(allocations(&a.log(), &ns_ip, transport), 0, "A allocated while draining: {}", context());
    let redirected = a.metric("turnd_allocations_redirected_total");
    assert!(redirected >= 2.0, "A redirected {redirected} Allocates: {}", context());
    for reason in ["stale_nonce", "wrong_realm", "bad_integrity"] {
        let n = b.metric(&format!("turnd_auth_failures_total{{reason=\"{reason}\"}}"));
        assert_eq!(n, 0.0, "B refused the redirected Allocate ({reason}): {}", context());
    }
    eprintln!(
        "{transport}: Chromium given only {url} (draining) relayed through B: {}; A redirected {redirected} Allocates, B made {on_b} allocations; {:.1} s",
        browser::describe(&r),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn chromium_follows_300_to_the_sibling_over_udp() {
    follows_the_redirect("udp");
}

#[test]
fn chromium_follows_300_to_the_sibling_over_tcp() {
    follows_the_redirect("tcp");
}

#[test]
fn chromium_follows_300_to_the_sibling_over_tls() {
    follows_the_redirect("tls");
}

/// A test CA and leaf certificates it signs, each for the names and
/// addresses given; files in a temporary directory, removed on drop.
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn new(leaves: &[(&str, &str)]) -> Pki {
        let dir = common::temp_dir("fleet-pki");
        let openssl = |args: &[&str]| {
            let out = Command::new("timeout").args(["20", "openssl"]).args(args).current_dir(&dir).output().expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(&[&["req", "-x509"][..], &ec, &["-days", "2", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=turnd fleet test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]].concat());
        for (leaf, san) in leaves {
            let (key, csr, pem, ext) = (format!("{leaf}.key"), format!("{leaf}.csr"), format!("{leaf}.pem"), format!("{leaf}.ext"));
            std::fs::write(dir.join(&ext), format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")).unwrap();
            openssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={leaf}")]].concat());
            openssl(&["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-out", &pem, "-extfile", &ext]);
        }
        Pki { dir }
    }

    /// A `$HOME` whose NSS database (what Chromium on Linux trusts) trusts the CA.
    fn chromium_home(&self) -> std::path::PathBuf {
        let home = self.dir.join("home");
        let db = home.join(".pki/nssdb");
        std::fs::create_dir_all(&db).unwrap();
        let db = format!("sql:{}", db.display());
        let ca = self.dir.join("ca.pem");
        for args in [&["-N", "-d", &db, "--empty-password"][..], &["-A", "-d", &db, "-t", "C,,", "-n", "fleet-test-ca", "-i", ca.to_str().unwrap()]] {
            let out = Command::new("timeout").args(["10", "certutil"]).args(args).output().expect("certutil (libnss3-tools; test.sh installs it)");
            assert!(out.status.success(), "certutil {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        home
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A relay like [`relay`] whose TLS certificate is the PKI's `leaf`.
fn relay_with_cert(host: &str, port: u16, tls_port: u16, ports: &str, pki: &Pki, leaf: &str, extra: &str) -> Turnd {
    let probe = format!("{host}:{port}").parse().unwrap();
    let realm = format!("{}.fleet.test", leaf.trim_end_matches("-ip"));
    let (cert, key) = (pki.dir.join(format!("{leaf}.pem")), pki.dir.join(format!("{leaf}.key")));
    let (host, ports) = (host.to_owned(), ports.to_owned());
    Turnd::builder()
        .config(probe, move |_| {
            format!(
                "realm = \"{realm}\"\n[auth]\nsecrets = [\"{SECRET}\"]\n\
                 [[listen]]\ntransport = \"udp\"\naddress = \"{host}:{port}\"\n\
                 [[listen]]\ntransport = \"tcp\"\naddress = \"{host}:{port}\"\n\
                 [[listen]]\ntransport = \"tls\"\naddress = \"{host}:{tls_port}\"\n\
                 [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
                 [relay]\nip = \"{host}\"\nports = \"{ports}\"\n",
                cert.display(),
                key.display(),
            )
        })
        .extra(extra)
        .start()
}

/// Over TLS with the certificate checked for real (no
/// `--ignore-certificate-errors`; the test CA in Chromium's NSS database),
/// Chromium connects to the address of ALTERNATE-SERVER and checks the
/// sibling's certificate against that address: libwebrtc keeps only the
/// address of the 300 (not the name of the URL) and does not read
/// ALTERNATE-DOMAIN. So a sibling takes TLS clients only with
/// `tls_clients = true`: without it they get 508 and the sibling sees
/// nothing; with it, a sibling whose certificate names only its DNS name
/// fails the handshake (no relay candidate), and one whose certificate also
/// names its IP address relays.
#[test]
fn chromium_over_tls_checks_the_siblings_certificate_against_its_address() {
    let mut ns = NetNs::create_open();
    let host = ns.host_ip().to_string();
    let ns_ip = ns.ns_ip().to_string();
    let pki = Pki::new(&[
        ("turn1", "DNS:turn1.fleet.test"),
        ("turn2", "DNS:turn2.fleet.test"),
        ("turn2-ip", &format!("DNS:turn2.fleet.test,IP:{host}")),
    ]);
    ns.set_hosts(&[(ns.host_ip(), "turn1.fleet.test"), (ns.host_ip(), "turn2.fleet.test")]);
    let home = pki.chromium_home();
    let page = PageServer::on(ns.tcp_listener("127.0.0.1:0".parse().unwrap()));
    let ns_name = ns.name().to_owned();
    let checked = move |argv: &[OsString]| {
        let argv: Vec<&OsString> = argv.iter().filter(|a| a.to_str() != Some("--ignore-certificate-errors")).collect();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns_name]).args(argv).env("HOME", &home);
        c
    };
    let (username, password) = browser::credentials();
    let (a_port, a_tls, b_port, b_tls) = (common::free_port(), common::free_port(), common::free_port(), common::free_port());
    let url = format!("turns:turn1.fleet.test:{a_tls}?transport=tcp");
    let run = |timeout| browser::run_browser_case(&page, &page.page_url(), &url, &username, &password, timeout, Some(&checked));
    let short = std::time::Duration::from_secs(8);
    let errors = |r: &serde_json::Value| -> Vec<u64> {
        r["candidateErrors"].as_array().into_iter().flatten().filter_map(|e| e["errorCode"].as_u64()).collect()
    };

    // Control: A serving, its certificate checked by name: relays through A.
    let a = relay_with_cert(&host, a_port, a_tls, "20000-24999", &pki, "turn1", &format!("[[drain.alternate]]\naddress = \"{host}:{b_tls}\"\n"));
    let r = run(PAGE_TIMEOUT);
    browser::assert_relayed(&r, &url, "tls", &host, &|| format!("control: A serving over TLS:\n{}\n{}", browser::pretty(&r), a.log()));
    eprintln!("control: {}", browser::describe(&r));
    let (rc, out) = turnctl(&a, &["drain"]);
    assert_eq!(rc, 0, "{out}");

    {
        // B's certificate names only turn2.fleet.test.
        let b = relay_with_cert(&host, b_port, b_tls, "25000-29999", &pki, "turn2", "");
        // 1. B not marked for TLS clients: 508 from A, nothing reaches B.
        let r = run(short);
        let context = || format!("{}\n--- A ---\n{}\n--- B ---\n{}", browser::pretty(&r), a.log(), b.log());
        assert_eq!(r["ok"], false, "{}", context());
        assert!(errors(&r).contains(&508), "no 508: {}", context());
        assert_eq!(a.metric("turnd_allocations_redirected_total"), 0.0, "{}", context());
        assert_eq!(b.metric("turnd_tls_handshake_failures_total"), 0.0, "{}", context());
        eprintln!("B not taking TLS clients: A answered 508 (candidate errors {:?})", errors(&r));

        // 2. Marked (a reload), with its name as ALTERNATE-DOMAIN: Chromium
        //    follows the 300 and fails the handshake, its certificate not
        //    naming the address it was sent to.
        let cfg = std::fs::read_to_string(&a.config).unwrap().replace(
            &format!("address = \"{host}:{b_tls}\"\n"),
            &format!("address = \"{host}:{b_tls}\"\ntls_clients = true\ndomain = \"turn2.fleet.test\"\n"),
        );
        std::fs::write(&a.config, cfg).unwrap();
        let (rc, out) = common::turnctl_reload(&a);
        assert_eq!(rc, 0, "{out}");
        let r = run(short);
        let context = || format!("{}\n--- A ---\n{}\n--- B ---\n{}", browser::pretty(&r), a.log(), b.log());
        assert_eq!(r["ok"], false, "relayed through a sibling whose certificate does not name its address: {}", context());
        for pc in ["a", "b"] {
            assert_eq!(r["gathered"][pc].as_array().map(Vec::len), Some(0), "{pc} gathered a candidate: {}", context());
        }
        assert!(a.metric("turnd_allocations_redirected_total") >= 2.0, "A redirected nothing: {}", context());
        assert!(b.metric("turnd_tls_handshake_failures_total") >= 1.0, "B saw no failed handshake: {}", context());
        assert_eq!(allocations(&b.log(), &ns_ip, "tls"), 0, "{}", context());
        eprintln!(
            "B's certificate for turn2.fleet.test only: no candidate ({} handshake(s) failed on B; candidate errors {:?})",
            b.metric("turnd_tls_handshake_failures_total"),
            errors(&r)
        );
    }
    // 3. The same B with a certificate that also names its address: relays.
    let b = relay_with_cert(&host, b_port, b_tls, "25000-29999", &pki, "turn2-ip", "");
    let r = run(PAGE_TIMEOUT);
    let context = || format!("{}\n--- A ---\n{}\n--- B ---\n{}", browser::pretty(&r), a.log(), b.log());
    browser::assert_relayed(&r, &url, "tls", &host, &context);
    let port = r["pairA"]["local"]["port"].as_u64().unwrap_or(0);
    assert!((25000..=29999).contains(&port), "not relayed by B: {}", context());
    assert!(allocations(&b.log(), &ns_ip, "tls") >= 2, "{}", context());
    eprintln!("B's certificate naming {host} too: {}", browser::describe(&r));
}
