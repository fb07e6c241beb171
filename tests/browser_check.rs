//! The check page (`/check`, src/check/page.html) as participants use it:
//! headless Chromium and headless Firefox ESR load it from turnd itself
//! over HTTPS (`https://turn.check.test/check`, a certificate from a test
//! CA that each browser's own certificate store trusts, no switch to ignore
//! certificate errors), the page fetches turnd's check credentials and
//! tries each of turnd's transports with two relay-only peer connections,
//! and POSTs its result to the test (`?report=http://127.0.0.1:PORT/...`).
//! Networks, built with network namespaces (addresses from 198.18.0.0/15;
//! the relay's name in the namespace's /etc/hosts):
//! - open: every transport relays, over its own protocol; the verdict says
//!   UDP gets through;
//! - UDP dropped, TCP only to 443 (the firewall of `NetNs::create_udp_blocked`):
//!   only TLS on 443 relays, and the verdict says UDP is blocked and media
//!   goes over TLS on 443;
//! - only an HTTP proxy (Debian's squid, stock rules: CONNECT to 443 only;
//!   Chromium with `--proxy-server`, Firefox with its proxy prefs): the page
//!   itself and TLS on 443 come through the proxy, nothing else;
//! - a relay whose certificate is for another name (the page from
//!   `check.http_listen`): the verdict names the certificate.
//!
//! Browser switches that matter, beyond the usual headless ones: the report
//! hook is a page on the relay's address posting to loopback, which Local
//! Network Access would stop (Chromium: `--disable-features=LocalNetworkAccessChecks`,
//! Firefox: `network.lna.enabled` false); nothing else in the page needs it.
//!
//! Needs root, `ip netns`, iptables (or nft), chromium, firefox-esr,
//! certutil, openssl and squid; test.sh installs the packages. Fails, never
//! skips, when something is missing.

mod common;
#[path = "common/browser.rs"]
mod browser;
#[path = "common/firefox.rs"]
mod firefox;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/squid.rs"]
mod squid;

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use browser::{Browser, PageServer};
use common::{Turnd, SECRET};
use firefox::Firefox;
use netns::NetNs;
use serde_json::Value;
use squid::Squid;

/// The relay's name, as participants would type it.
const NAME: &str = "turn.check.test";
/// What the wrong certificate is for.
const OTHER_NAME: &str = "other.check.test";
const PLAIN_PORT: u16 = 3478;
const TLS_PORT: u16 = 443;
/// `check.http_listen`.
const HTTP_PORT: u16 = 8080;
const PROXY_PORT: u16 = 3128;
const TOKEN: &str = "check-token-0123456789";
/// The page reports within 14 s (its own hard bound); browsers start in a
/// few seconds even on a loaded machine.
const RESULT_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Chromium,
    Firefox,
}

const BROWSERS: [Kind; 2] = [Kind::Chromium, Kind::Firefox];

/// A test CA and two leaf certificates signed by it: one for [`NAME`], one
/// for [`OTHER_NAME`]. Files in a temporary directory, removed on drop.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = common::temp_dir("check-pki");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(&dir).output().expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(&[&["req", "-x509"][..], &ec, &["-days", "2", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=turnd check test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]].concat());
        for (leaf, name) in [("good", NAME), ("wrong", OTHER_NAME)] {
            let (key, csr, pem, ext) = (format!("{leaf}.key"), format!("{leaf}.csr"), format!("{leaf}.pem"), format!("{leaf}.ext"));
            std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")).unwrap();
            openssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={name}")]].concat());
            openssl(&["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-out", &pem, "-extfile", &ext]);
        }
        Pki { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// turnd on `host` (the host end of a test namespace's veth): UDP and TCP
/// on 3478, TLS on 443 with the `leaf` certificate ("good" or "wrong"),
/// relaying on `host`, the check on, behind `token` when given, and on
/// plain HTTP at `host:HTTP_PORT`.
fn start_turnd(host: Ipv4Addr, pki: &Pki, leaf: &str, token: Option<&str>) -> Turnd {
    let probe = SocketAddr::new(host.into(), PLAIN_PORT);
    let (cert, key) = (pki.dir.join(format!("{leaf}.pem")), pki.dir.join(format!("{leaf}.key")));
    let token = token.map(|t| format!("token = \"{t}\"\n")).unwrap_or_default();
    Turnd::builder()
        .config(probe, move |_dir| {
            format!(
                "realm = \"{}\"\n[auth]\nsecrets = [\"{SECRET}\"]\n\
                 [[listen]]\ntransport = \"udp\"\naddress = \"{host}:{PLAIN_PORT}\"\n\
                 [[listen]]\ntransport = \"tcp\"\naddress = \"{host}:{PLAIN_PORT}\"\n\
                 [[listen]]\ntransport = \"tls\"\naddress = \"{host}:{TLS_PORT}\"\n\
                 [tls]\ncert = \"{}\"\nkey = \"{}\"\n\
                 [relay]\nip = \"{host}\"\nports = \"20000-29999\"\n\
                 [check]\nenabled = true\nhttp_listen = \"{host}:{HTTP_PORT}\"\n{token}",
                common::REALM,
                cert.display(),
                key.display(),
            )
        })
        .start()
}

/// What a browser run needs besides the page's address.
struct Run<'a> {
    /// Where the browser runs (and the page's collector listens, on its `lo`).
    ns: &'a NetNs,
    /// The CA the browser's certificate store trusts.
    ca: &'a Path,
    /// An HTTP proxy the browser must use.
    proxy: Option<SocketAddr>,
}

/// Either browser, killed (with its process group) on drop.
enum Running {
    Chromium(Browser, PathBuf),
    Firefox(Firefox),
}

impl Running {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        match self {
            Running::Chromium(b, _) => b.exited(),
            Running::Firefox(f) => f.exited(),
        }
    }

    fn log(&self) -> String {
        match self {
            Running::Chromium(b, _) => b.log(),
            Running::Firefox(f) => f.log(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::Chromium(_, home) = self {
            let _ = std::fs::remove_dir_all(home);
        }
    }
}

/// Opens `url` (the check page; `?report=` is added) in `kind` inside
/// `run.ns` and returns the result the page posted.
fn check_page(kind: Kind, url: &str, run: &Run) -> Value {
    let collector = PageServer::on(run.ns.tcp_listener("127.0.0.1:0".parse().unwrap()));
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}report={}", browser::query_escape(&collector.result_url()));
    let ns_name = run.ns.name().to_owned();
    let started = Instant::now();
    let mut running = match kind {
        Kind::Chromium => {
            // Chromium on Linux trusts what the NSS database in
            // $HOME/.pki/nssdb trusts.
            let home = common::temp_dir("chromium-home");
            let db = home.join(".pki/nssdb");
            std::fs::create_dir_all(&db).unwrap();
            let db = format!("sql:{}", db.display());
            firefox::certutil(&["-N", "-d", &db, "--empty-password"]);
            firefox::certutil(&["-A", "-d", &db, "-t", "C,,", "-n", "check-test-ca", "-i", run.ca.to_str().unwrap()]);
            let home2 = home.clone();
            let wrap = move |argv: &[OsString]| {
                // The certificate is checked for real.
                let argv: Vec<&OsString> = argv.iter().filter(|a| a.to_str() != Some("--ignore-certificate-errors")).collect();
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns_name]).args(argv).env("HOME", &home2);
                c
            };
            let mut flags = vec!["--disable-features=LocalNetworkAccessChecks".to_owned()];
            if let Some(p) = run.proxy {
                flags.push(format!("--proxy-server=http://{p}"));
            }
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            Running::Chromium(Browser::launch(&url, &flags, Some(&wrap)), home)
        }
        Kind::Firefox => {
            let mut prefs = vec![("network.lna.enabled", "false".to_owned())];
            if let Some(p) = run.proxy {
                prefs.extend([
                    ("network.proxy.type", "1".to_owned()),
                    ("network.proxy.http", format!("\"{}\"", p.ip())),
                    ("network.proxy.http_port", p.port().to_string()),
                    ("network.proxy.ssl", format!("\"{}\"", p.ip())),
                    ("network.proxy.ssl_port", p.port().to_string()),
                    // The collector on loopback is reached directly.
                    ("network.proxy.allow_hijacking_localhost", "false".to_owned()),
                ]);
            }
            let wrap = move |argv: &[String]| {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns_name]).args(argv);
                c
            };
            Running::Firefox(Firefox::launch(&url, &[run.ca], &prefs, Some(&wrap)))
        }
    };
    let deadline = started + RESULT_TIMEOUT;
    loop {
        if let Some(body) = collector.recv_result(Duration::from_millis(200)) {
            let r: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{kind:?}: the page posted bad JSON ({e}): {body}"));
            eprintln!("{kind:?}: the page reported after {:.1} s (its check took {} ms)", started.elapsed().as_secs_f64(), r["elapsedMs"]);
            for t in r["transports"].as_array().into_iter().flatten() {
                eprintln!(
                    "  {:<8} relayed={} over={} rtt={}ms loss={}% proxy={} in {}ms{}",
                    t["label"].as_str().unwrap_or("?"),
                    t["relayed"],
                    t["relayProtocol"].as_str().unwrap_or("-"),
                    t["rttMs"],
                    t["lossPercent"],
                    t["proxy"].as_str().unwrap_or("?"),
                    t["elapsedMs"],
                    t["failure"].as_str().map(|f| format!(": {f}")).unwrap_or_default(),
                );
            }
            return r;
        }
        if let Some(st) = running.exited() {
            panic!("{kind:?} exited ({st}) before the page reported\n--- browser log ---\n{}", running.log());
        }
        assert!(
            Instant::now() < deadline,
            "{kind:?}: no result from the page within {RESULT_TIMEOUT:?} ({url})\n--- browser log ---\n{}",
            running.log()
        );
    }
}

/// The page's entry for transport `id`.
fn transport<'a>(r: &'a Value, id: &str) -> &'a Value {
    r["transports"].as_array().and_then(|ts| ts.iter().find(|t| t["id"] == id)).unwrap_or_else(|| panic!("no transport {id:?} in\n{}", pretty(r)))
}

fn pretty(r: &Value) -> String {
    serde_json::to_string_pretty(r).unwrap()
}

fn verdict(r: &Value) -> &str {
    r["verdict"]["text"].as_str().unwrap_or("")
}

/// The transports the relay offered, as the page got them: turnd's three
/// listeners under the name the page was loaded with.
fn assert_offers(r: &Value, context: &dyn Fn() -> String) {
    let urls: Vec<&str> = r["transports"].as_array().map(|ts| ts.iter().filter_map(|t| t["url"].as_str()).collect()).unwrap_or_default();
    assert_eq!(
        urls,
        [
            format!("turn:{NAME}:{PLAIN_PORT}?transport=udp"),
            format!("turn:{NAME}:{PLAIN_PORT}?transport=tcp"),
            format!("turns:{NAME}:{TLS_PORT}?transport=tcp"),
        ],
        "{}",
        context()
    );
    assert_eq!(r["credentials"]["status"], 200, "{}", context());
    // The whole check within about ten seconds (the page's hard bound is 14).
    let ms = r["elapsedMs"].as_u64().unwrap_or(u64::MAX);
    assert!(ms <= 14_000, "the check took {ms} ms: {}", context());
}

/// `id` relayed test messages through turnd over `protocol` (the local
/// relay candidate's relayProtocol), with a round trip and little loss.
fn assert_relayed(r: &Value, id: &str, protocol: &str, context: &dyn Fn() -> String) {
    let t = transport(r, id);
    assert_eq!(t["relayed"], true, "{id} did not relay: {}", context());
    assert_eq!(t["relayProtocol"], protocol, "{id}: {}", context());
    assert_eq!(t["selectedPair"]["local"]["candidateType"], "relay", "{id}: {}", context());
    assert_eq!(t["selectedPair"]["remote"]["candidateType"], "relay", "{id}: {}", context());
    assert!(t["rttMs"].as_u64().is_some(), "{id} has no round trip: {}", context());
    let loss = t["lossPercent"].as_u64().unwrap_or(100);
    assert!(loss <= 10, "{id} lost {loss} % on a local link: {}", context());
    assert_eq!(t["sent"], 50, "{id}: {}", context());
}

fn assert_not_relayed(r: &Value, id: &str, context: &dyn Fn() -> String) {
    let t = transport(r, id);
    assert_eq!(t["relayed"], false, "{id} relayed where it cannot: {}", context());
    assert!(t["failure"].as_str().is_some_and(|f| !f.is_empty()), "{id} failed without a word: {}", context());
}

/// "allocation created" lines of turnd's log for check credentials from
/// `client_ip` over `transport`.
fn check_allocations(log: &str, client_ip: Ipv4Addr, transport: &str) -> usize {
    let client = format!("client={client_ip}:");
    log.lines()
        .filter(|l| l.contains("allocation created") && l.contains(":turnd-check ") && l.contains(&client))
        .filter(|l| l.contains(&format!("transport=\"{transport}\"")) || l.contains(&format!("transport={transport} ")))
        .count()
}

#[test]
fn open_network_every_transport_relays() {
    let t0 = Instant::now();
    let pki = Pki::new();
    let mut ns = NetNs::create_open();
    let host = ns.host_ip();
    ns.set_hosts(&[(host, NAME)]);
    let server = start_turnd(host, &pki, "good", Some(TOKEN));
    let run = Run { ns: &ns, ca: &pki.ca(), proxy: None };
    for kind in BROWSERS {
        let log_before = server.log().len();
        let r = check_page(kind, &format!("https://{NAME}/check?token={TOKEN}"), &run);
        let context = || format!("{kind:?} on the open network:\n{}\n--- turnd log ---\n{}", pretty(&r), server.log());
        assert_offers(&r, &context);
        for (id, protocol) in [("udp", "udp"), ("tcp", "tcp"), ("tls", "tls")] {
            assert_relayed(&r, id, protocol, &context);
        }
        assert_eq!(r["verdict"]["ok"], true, "{}", context());
        assert_eq!(r["verdict"]["kind"], "udp", "{}", context());
        assert!(verdict(&r).starts_with("Calls will work: UDP gets through to the relay (UDP 3478)"), "{}", context());
        assert!(!verdict(&r).contains("blocks UDP") && !verdict(&r).contains("Note:"), "{}", context());
        // The page loaded over the same TLS listener: the certificate is
        // known to be accepted.
        assert_eq!(transport(&r, "tls")["certificate"]["accepted"], true, "{}", context());
        // turnd saw the browser's check allocations on every transport.
        let log = server.log()[log_before..].to_owned();
        for t in ["udp", "tcp", "tls"] {
            assert!(check_allocations(&log, ns.ns_ip(), t) >= 2, "turnd logged no {t} check allocations from {}: {}", ns.ns_ip(), context());
        }
        eprintln!("{kind:?}, open network: {}", verdict(&r));
    }
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn udp_blocked_network_relays_over_tls_on_443() {
    let t0 = Instant::now();
    let pki = Pki::new();
    let mut ns = NetNs::create_udp_blocked();
    let host = ns.host_ip();
    ns.set_hosts(&[(host, NAME)]);
    let server = start_turnd(host, &pki, "good", None);
    let run = Run { ns: &ns, ca: &pki.ca(), proxy: None };
    for kind in BROWSERS {
        let drops = ns.udp_drops();
        let r = check_page(kind, &format!("https://{NAME}/check"), &run);
        let context = || {
            format!("{kind:?} in the UDP-blocked network:\n{}\n--- firewall ---\n{}\n--- turnd log ---\n{}", pretty(&r), ns.firewall_rules(), server.log())
        };
        assert_offers(&r, &context);
        assert_not_relayed(&r, "udp", &context);
        assert_not_relayed(&r, "tcp", &context);
        assert_relayed(&r, "tls", "tls", &context);
        // The browser did try UDP: the firewall dropped it.
        assert!(ns.udp_drops() > drops, "the firewall dropped no UDP: the browser never tried it: {}", context());
        assert_eq!(r["verdict"]["ok"], true, "{}", context());
        assert_eq!(r["verdict"]["kind"], "tls", "{}", context());
        assert!(
            verdict(&r).starts_with("Calls will work: your network blocks UDP, so media goes over TLS on 443"),
            "{}",
            context()
        );
        eprintln!("{kind:?}, UDP blocked: {}", verdict(&r));
    }
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn proxy_only_network_relays_over_tls_on_443_through_the_proxy() {
    let t0 = Instant::now();
    let pki = Pki::new();
    let mut proxy_ns = NetNs::create_open();
    let mut client_ns = NetNs::create_behind(&proxy_ns);
    let host = proxy_ns.host_ip(); // turnd, on the host
    let proxy_out = proxy_ns.ns_ip(); // squid, as turnd sees it
    let proxy_in = SocketAddr::new(client_ns.host_ip().into(), PROXY_PORT); // squid, for the client
    // squid resolves the relay's name; so does the client (Chromium looks
    // TURN servers up itself), though it reaches nothing but squid.
    proxy_ns.set_hosts(&[(host, NAME)]);
    client_ns.set_hosts(&[(host, NAME)]);
    let server = start_turnd(host, &pki, "good", None);
    let squid = Squid::start(&proxy_ns, proxy_in);
    let run = Run { ns: &client_ns, ca: &pki.ca(), proxy: Some(proxy_in) };
    for kind in BROWSERS {
        let log_before = server.log().len();
        let r = check_page(kind, &format!("https://{NAME}/check"), &run);
        let context = || {
            format!(
                "{kind:?} behind the proxy:\n{}\n--- squid access.log ---\n{}\n--- turnd log ---\n{}",
                pretty(&r),
                squid.access_log(),
                server.log()
            )
        };
        assert_offers(&r, &context);
        assert_not_relayed(&r, "udp", &context);
        assert_not_relayed(&r, "tcp", &context);
        assert_relayed(&r, "tls", "tls", &context);
        // Chromium does not say whether a proxy carried a candidate, and
        // the page must not guess; Firefox may say so.
        let proxy = transport(&r, "tls")["proxy"].as_str().unwrap_or("");
        match kind {
            Kind::Chromium => assert_eq!(proxy, "unknown", "{}", context()),
            Kind::Firefox => assert!(proxy == "yes" || proxy == "unknown", "{}", context()),
        }
        assert_eq!(r["verdict"]["ok"], true, "{}", context());
        assert_eq!(r["verdict"]["kind"], "tls", "{}", context());
        assert!(
            verdict(&r).starts_with("Calls will work: your network blocks UDP, so media goes over TLS on 443"),
            "{}",
            context()
        );
        // turnd saw the check allocations come from the proxy.
        let log = server.log()[log_before..].to_owned();
        assert!(check_allocations(&log, proxy_out, "tls") >= 2, "no TLS check allocations from the proxy {proxy_out}: {}", context());
        eprintln!("{kind:?}, behind the proxy (proxy: {proxy}): {}", verdict(&r));
    }
    // The page and the relay's TLS through squid's tunnels; 3478 refused.
    squid.wait_access(&["CONNECT", &format!("{NAME}:{TLS_PORT}"), "TCP_TUNNEL/200"]);
    squid.wait_access(&["CONNECT", &format!(":{PLAIN_PORT}"), "TCP_DENIED/403"]);
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn wrong_certificate_is_named_in_the_verdict() {
    let t0 = Instant::now();
    let pki = Pki::new();
    let mut ns = NetNs::create_open();
    let host = ns.host_ip();
    ns.set_hosts(&[(host, NAME)]);
    // A certificate from the trusted CA, for another name: browsers refuse
    // it for turn.check.test. The page comes over check.http_listen.
    let server = start_turnd(host, &pki, "wrong", None);
    let run = Run { ns: &ns, ca: &pki.ca(), proxy: None };
    for kind in BROWSERS {
        let r = check_page(kind, &format!("http://{NAME}:{HTTP_PORT}/check"), &run);
        let context = || format!("{kind:?} against a relay with a wrong certificate:\n{}\n--- turnd log ---\n{}", pretty(&r), server.log());
        assert_offers(&r, &context);
        assert_relayed(&r, "udp", "udp", &context);
        assert_relayed(&r, "tcp", "tcp", &context);
        assert_not_relayed(&r, "tls", &context);
        assert_eq!(transport(&r, "tls")["certificate"]["accepted"], false, "{}", context());
        // Calls work here (over UDP), and the verdict says what is wrong
        // with TLS on 443 and for whom.
        assert_eq!(r["verdict"]["ok"], true, "{}", context());
        assert!(
            verdict(&r).contains(&format!("TLS 443 failed (the browser did not accept the relay's certificate for {NAME})")),
            "{}",
            context()
        );
        assert!(verdict(&r).contains("only port 443"), "{}", context());
        eprintln!("{kind:?}, wrong certificate: {}", verdict(&r));
    }
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}
