//! A real browser on the test page: Debian's Chromium, headless, loads
//! `tests/browser/relay.html`, whose two RTCPeerConnections (relay-only, the
//! one TURN server under test) open a data channel, exchange messages both
//! ways and report the selected candidate pair. The page POSTs its result as
//! JSON to a tiny HTTP server here, and the test asserts on it. Include it
//! from a test file that also has `mod common;`, with
//! `#[path = "common/browser.rs"] mod browser;`.
//!
//! Chromium flags that matter (Chromium 156, Debian bookworm):
//! - `--ignore-certificate-errors`: Chromium's TURN over TLS honours it and
//!   then accepts turnd's self-signed certificate (whatever name or address
//!   the `turns:` URL has); without it every `turns:` allocation fails
//!   (icecandidateerror 701 "Failed to establish connection") and no
//!   candidate is gathered.
//! - `--allow-loopback-in-peer-connection` ([`LOOPBACK`]): lets WebRTC use
//!   the loopback interface. Not needed on a host with another interface
//!   (there the TURN sockets still reach 127.0.0.1), but without it a
//!   network namespace with only `lo` gathers no candidate at all. Only the
//!   relay page gets it (`run_browser_case`); a call (`common/call.rs`)
//!   must not: there the side with host candidates would also offer
//!   127.0.0.1, which turnd refuses as a peer (403), and Chromium's ICE
//!   reports `failed` whenever that refusal prunes its only pair before it
//!   has paired the next candidate of the same answer.
//!
//! No switch is needed for TURN servers on loopback or for relay candidates
//! at 127.0.0.1, nor for a secure context: the page is always served from
//! 127.0.0.1 (in a network namespace, from the namespace's own `lo`, see
//! `NetNs::tcp_listener`). With a host name (`turns:localhost`) Chromium
//! makes two allocations per connection (two relay candidates); with an IP,
//! one. Needs the `chromium` package (test.sh installs it).
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::common::{self, SECRET};

const PAGE: &str = include_str!("../browser/relay.html");
/// Messages each data channel end sends.
pub const MESSAGES: u32 = 20;
/// The page gives up (and reports why) after this long, unless the case
/// asks for another bound.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(15);
/// How much longer than the page's own bound the test waits for its result
/// (Chromium's start-up on a loaded machine).
const RESULT_MARGIN: Duration = Duration::from_secs(10);
/// The HTTP server thread ends by itself after this long at the latest.
const SERVER_LIFETIME: Duration = Duration::from_secs(180);

/// Chromium's flags for every test (see the file comment).
const FLAGS: &[&str] = &[
    "chromium",
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    // TURN over TLS to a self-signed certificate (see the file comment).
    "--ignore-certificate-errors",
];

/// Chromium's own log of its TURN allocations, permissions and channel
/// binds (with each error code) and of every ICE pair and state change,
/// added when `TURND_TEST_KEEP_LOGS` keeps the logs.
const WEBRTC_LOG: &[&str] = &[
    "--enable-logging=stderr",
    "--v=0",
    "--vmodule=*turn_port*=3,*p2p_transport_channel*=2,*connection*=2,*peer_connection*=1",
];

/// WebRTC may use `lo` (needed when it is the only interface); for the
/// relay page only (see the file comment).
pub const LOOPBACK: &str = "--allow-loopback-in-peer-connection";

/// Builds the command that runs Chromium from its argv (`chromium`, flags,
/// page URL). `None` runs it directly; a test can instead run it in a
/// network namespace: `|argv| { let mut c = Command::new("ip");
/// c.args(["netns", "exec", NAME]).args(argv); c }`.
pub type Wrap<'a> = &'a dyn Fn(&[OsString]) -> Command;

/// Serves the test page and collects what the page POSTs to /result.
pub struct PageServer {
    pub addr: SocketAddr,
    results: Receiver<String>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PageServer {
    /// Listens on `ip` (port chosen by the OS) until dropped or for
    /// SERVER_LIFETIME, whichever comes first.
    pub fn start(ip: &str) -> PageServer {
        Self::on(TcpListener::bind((ip, 0)).expect("bind the page server"))
    }

    /// Serves on a listener the caller made (e.g. one bound inside a network
    /// namespace), until dropped or for SERVER_LIFETIME.
    pub fn on(listener: TcpListener) -> PageServer {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, results) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + SERVER_LIFETIME;
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, _)) => {
                        if let Err(e) = serve_one(conn, &tx) {
                            eprintln!("page server: {e}");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        eprintln!("page server: accept: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        });
        PageServer { addr, results, stop, thread: Some(thread) }
    }

    pub fn page_url(&self) -> String {
        format!("http://{}/relay.html", self.addr)
    }

    /// Where a page served from elsewhere POSTs its result.
    pub fn result_url(&self) -> String {
        format!("http://{}/result", self.addr)
    }

    /// The body of the next POST to /result, waiting at most `timeout`.
    pub fn recv_result(&self, timeout: Duration) -> Option<String> {
        self.results.recv_timeout(timeout).ok()
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one HTTP/1.1 request from `conn` (5 s timeouts, at most 1 MiB):
/// method, path without the query, body.
pub fn read_request(conn: &TcpStream) -> std::io::Result<(String, String, Vec<u8>)> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?).take(1 << 20);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            content_length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; content_length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("").to_owned();
    Ok((method, path, body))
}

/// One HTTP/1.1 request per connection (`Connection: close`), bounded in time
/// and size: GET /relay.html, POST /result, anything else 404.
fn serve_one(conn: TcpStream, results: &mpsc::Sender<String>) -> std::io::Result<()> {
    let (method, path, body) = read_request(&conn)?;
    let (method, path) = (method.as_str(), path.as_str());
    let mut out = conn;
    match (method, path) {
        ("GET", "/relay.html") => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nCache-Control: no-store\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                PAGE.len()
            );
            out.write_all(head.as_bytes())?;
            out.write_all(PAGE.as_bytes())?;
        }
        ("POST", "/result") => {
            out.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")?;
            let _ = results.send(String::from_utf8_lossy(&body).into_owned());
        }
        _ => out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?,
    }
    out.flush()
}

/// A running Chromium in its own process group; the whole group is killed
/// and the profile removed on drop (also when the test panics).
pub struct Browser {
    child: Child,
    profile: PathBuf,
    log: PathBuf,
}

impl Browser {
    /// Starts headless Chromium on `url` with the flags of this file
    /// (plus `extra`; not [`LOOPBACK`] unless there), in its own process group, optionally through `wrap`
    /// (e.g. in a network namespace). Killed with its group on drop.
    pub fn launch(url: &str, extra: &[&str], wrap: Option<Wrap>) -> Browser {
        assert!(
            chromium_installed(),
            "chromium is missing: this test needs Debian's `chromium` package \
             (test.sh installs it: apt-get install -y chromium)"
        );
        let profile = common::temp_dir("chromium-profile");
        let log = profile.join("chromium.log");
        let webrtc_log = if common::keep_logs_dir().is_some() { WEBRTC_LOG } else { &[] };
        let mut argv: Vec<OsString> = FLAGS.iter().chain(webrtc_log).chain(extra).map(OsString::from).collect();
        let mut dir_arg = OsString::from("--user-data-dir=");
        dir_arg.push(profile.as_os_str());
        argv.push(dir_arg);
        argv.push(OsString::from(url));
        let mut cmd = match wrap {
            Some(w) => w(&argv),
            None => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        let log_file = std::fs::File::create(&log).expect("create the chromium log");
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        Browser { child, profile, log }
    }

    /// Whether Chromium has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of Chromium's own output.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The renderer, GPU, network and zygote processes go with it.
        common::kill_group(&mut self.child);
        common::keep_log(&self.log, &format!("chromium-{}.log", self.child.id()));
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

pub fn chromium_installed() -> bool {
    common::on_path("chromium")
}

/// Percent-encodes a query-string value.
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Starts Chromium on the test page for one TURN server and returns the JSON
/// the page posted. `page_url` is where the browser finds the page (served
/// by `server`); nothing about the TURN server's address is fixed here, so
/// the same helper serves a browser in a network namespace (see `Wrap`).
/// The page reports failure after `page_timeout` at the latest; the test
/// gives up RESULT_MARGIN later.
pub fn run_browser_case(
    server: &PageServer,
    page_url: &str,
    turn_url: &str,
    username: &str,
    password: &str,
    page_timeout: Duration,
    wrap: Option<Wrap>,
) -> Value {
    run_browser_case_with(server, page_url, turn_url, username, password, page_timeout, wrap, &[])
}

/// `run_browser_case` with more Chromium flags (e.g. `--proxy-server=...`).
#[allow(clippy::too_many_arguments)]
pub fn run_browser_case_with(
    server: &PageServer,
    page_url: &str,
    turn_url: &str,
    username: &str,
    password: &str,
    page_timeout: Duration,
    wrap: Option<Wrap>,
    extra: &[&str],
) -> Value {
    let url = format!(
        "{page_url}?turn={}&user={}&pass={}&n={MESSAGES}&timeout={}",
        query_escape(turn_url),
        query_escape(username),
        query_escape(password),
        page_timeout.as_millis()
    );
    let flags: Vec<&str> = std::iter::once(LOOPBACK).chain(extra.iter().copied()).collect();
    let mut browser = Browser::launch(&url, &flags, wrap);

    let result_timeout = page_timeout + RESULT_MARGIN;
    let deadline = Instant::now() + result_timeout;
    loop {
        match server.results.recv_timeout(Duration::from_millis(200)) {
            Ok(body) => {
                return serde_json::from_str(&body).unwrap_or_else(|e| panic!("the page posted bad JSON ({e}): {body}"));
            }
            Err(RecvTimeoutError::Disconnected) => panic!("the page server stopped"),
            Err(RecvTimeoutError::Timeout) => {}
        }
        if let Ok(Some(st)) = browser.child.try_wait() {
            panic!(
                "chromium exited ({st}) before the page reported on {turn_url}\n--- chromium log ---\n{}",
                browser.log()
            );
        }
        if Instant::now() >= deadline {
            panic!(
                "no result from the page within {result_timeout:?} for {turn_url}\n--- chromium log ---\n{}",
                browser.log()
            );
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// REST API credentials for the test secret, valid for an hour.
pub fn credentials() -> (String, String) {
    let username = format!("{}:browser", unix_now() + 3600);
    let password = turnd::auth::rest_password(SECRET.as_bytes(), &username);
    (username, password)
}

/// The page's result, pretty-printed, for failure messages.
pub fn pretty(r: &Value) -> String {
    serde_json::to_string_pretty(r).unwrap()
}

/// Asserts the page relayed all messages both ways through `turn_url`: both
/// peer connections gathered relay candidates only, from `turn_url`, and
/// each selected pair
/// is relay/relay between turnd's relayed addresses (`relay_ip`, relay port
/// range), its local end allocated over `relay_protocol` ("udp", "tcp",
/// "tls") from `turn_url`. `context` describes the case for failures.
pub fn assert_relayed(r: &Value, turn_url: &str, relay_protocol: &str, relay_ip: &str, context: &dyn Fn() -> String) {
    assert_eq!(r["ok"], Value::Bool(true), "the page reported a failure: {}", context());
    assert_eq!(r["turn"].as_str(), Some(turn_url), "{}", context());
    assert_eq!(r["receivedByA"].as_u64(), Some(MESSAGES as u64), "{}", context());
    assert_eq!(r["receivedByB"].as_u64(), Some(MESSAGES as u64), "{}", context());
    for pc in ["a", "b"] {
        let gathered = r["gathered"][pc].as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(!gathered.is_empty(), "peer connection {pc} gathered no candidate: {}", context());
        for c in gathered {
            assert_eq!(c["type"].as_str(), Some("relay"), "{pc} gathered a non-relay candidate: {}", context());
            assert_eq!(c["url"].as_str(), Some(turn_url), "{pc}: {}", context());
            // Chromium 156 leaves RTCIceCandidate.relayProtocol null (the
            // stats below carry it); check it should it ever be set.
            if !c["relayProtocol"].is_null() {
                assert_eq!(c["relayProtocol"].as_str(), Some(relay_protocol), "{pc}: {}", context());
            }
        }
    }
    for side in ["pairA", "pairB"] {
        let pair = &r[side];
        assert_eq!(pair["state"].as_str(), Some("succeeded"), "{side}: {}", context());
        for end in ["local", "remote"] {
            assert_eq!(pair[end]["candidateType"].as_str(), Some("relay"), "{side}.{end} is not a relay candidate: {}", context());
            // Both relayed addresses are turnd's relay address on its relay ports.
            assert_eq!(pair[end]["address"].as_str(), Some(relay_ip), "{side}.{end}: {}", context());
            let port = pair[end]["port"].as_u64().unwrap_or(0);
            assert!(
                common::RELAY_PORTS.contains(&(port as u16)),
                "{side}.{end} port {port} outside the relay range: {}",
                context()
            );
        }
        // The local relay candidate says how it reached the TURN server.
        assert_eq!(pair["local"]["relayProtocol"].as_str(), Some(relay_protocol), "{side}: {}", context());
        assert_eq!(pair["local"]["url"].as_str(), Some(turn_url), "{side}: {}", context());
    }
}

/// One line about a relayed result (after `assert_relayed`).
pub fn describe(r: &Value) -> String {
    let local = &r["pairA"]["local"];
    format!(
        "browser relayed {MESSAGES}+{MESSAGES} messages via {}: local {}:{} relayProtocol={} url={}, remote {}:{}, page {} ms",
        r["turn"].as_str().unwrap_or("?"),
        local["address"].as_str().unwrap_or("?"),
        local["port"],
        local["relayProtocol"].as_str().unwrap_or("?"),
        local["url"].as_str().unwrap_or("?"),
        r["pairA"]["remote"]["address"].as_str().unwrap_or("?"),
        r["pairA"]["remote"]["port"],
        r["elapsedMs"],
    )
}
