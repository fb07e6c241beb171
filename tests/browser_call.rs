//! A real call through turnd from a network that blocks UDP: two headless
//! Chromium processes with fake camera and microphone
//! (`--use-fake-device-for-media-stream --use-fake-ui-for-media-stream`),
//! audio and video both ways for DURATION, asserted from getStats on both
//! sides.
//!
//! - The participant runs in a network namespace whose firewall drops all
//!   outgoing UDP and lets TCP out only to port 443 (`NetNs::create_udp_blocked`).
//!   It is relay-only (`iceTransportPolicy: "relay"`) over
//!   `turns:HOST:443?transport=tcp`.
//! - The other side stands where the videobridge stands: in a second
//!   namespace with ordinary UDP and no firewall (`NetNs::create_open`), with
//!   no TURN server at all, offering only its host candidate, as a
//!   videobridge offers its public address. So the media path is the one a
//!   Jitsi participant behind such a firewall gets: browser -TLS/TCP 443->
//!   turnd -UDP-> the other side's own address. (It is a namespace rather
//!   than the host itself because turnd refuses peers on its own host's
//!   addresses outside its relay ports.)
//!
//! turnd listens on the participant namespace's host end (TLS 443, plus
//! UDP/TCP 3478) and relays from the other namespace's host end, allowed to
//! reach exactly that namespace's address. The two browsers are separate
//! processes: the test's HTTP server carries the offer and the answer (with
//! all candidates; no trickle). Each page is served from its own
//! namespace's `lo` (`NetNs::tcp_listener`), both by this process with one
//! shared state, so no firewall rule is opened for signalling.
//!
//! Needs root, `ip netns`, iptables (or nft) and chromium; test.sh installs
//! the packages. Fails, never skips, when something is missing.

mod common;
#[path = "common/browser.rs"]
mod browser;
#[path = "common/netns.rs"]
mod netns;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use browser::Browser;
use common::{Turnd, SECRET};
use netns::NetNs;
use serde_json::Value;

const PAGE: &str = include_str!("browser/call.html");
const TLS_PORT: u16 = 443;
const PLAIN_PORT: u16 = 3478;
/// How long audio and video are measured once the first frame is decoded.
const DURATION: Duration = Duration::from_secs(8);
/// The page gives up (and reports why) after this long.
const PAGE_TIMEOUT: Duration = Duration::from_secs(40);
/// How long the test waits for both results (Chromium's start-up on a
/// loaded machine on top of the page's own bound).
const RESULT_TIMEOUT: Duration = Duration::from_secs(50);

/// Serves the page, carries the offer and answer between the two browsers
/// and collects their results. One thread per listener (each in its own
/// namespace), one shared state; every thread ends when dropped or after
/// two minutes.
struct CallServer {
    results: Receiver<(String, String)>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    addrs: Vec<SocketAddr>,
}

impl CallServer {
    fn new(listeners: Vec<TcpListener>) -> CallServer {
        let (tx, results) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let state: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let mut threads = Vec::new();
        let mut addrs = Vec::new();
        for l in listeners {
            l.set_nonblocking(true).unwrap();
            addrs.push(l.local_addr().unwrap());
            let (tx, stop, state) = (tx.clone(), stop.clone(), state.clone());
            threads.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match l.accept() {
                        Ok((conn, _)) => {
                            if let Err(e) = serve(conn, &state, &tx) {
                                eprintln!("call server: {e}");
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
        }
        CallServer { results, stop, threads, addrs }
    }
}

impl Drop for CallServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One request per connection, bounded in time and size: GET /call.html,
/// POST and GET /signal/offer|answer, POST /result/ROLE.
fn serve(conn: TcpStream, state: &Mutex<HashMap<String, String>>, results: &Sender<(String, String)>) -> std::io::Result<()> {
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
    let body = String::from_utf8_lossy(&body).into_owned();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
    let reply = |status: &str, ctype: &str, text: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nCache-Control: no-store\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{text}",
            text.len()
        )
    };
    let out = match (method, path) {
        ("GET", "/call.html") => reply("200 OK", "text/html; charset=utf-8", PAGE),
        ("POST", p) if p == "/signal/offer" || p == "/signal/answer" => {
            state.lock().unwrap().insert(p.to_owned(), body);
            reply("204 No Content", "text/plain", "")
        }
        ("GET", p) if p.starts_with("/signal/") => match state.lock().unwrap().get(p) {
            Some(desc) => reply("200 OK", "application/json", desc),
            None => reply("204 No Content", "text/plain", ""),
        },
        ("POST", p) if p.starts_with("/result/") => {
            let _ = results.send((p["/result/".len()..].to_owned(), body));
            reply("204 No Content", "text/plain", "")
        }
        _ => reply("404 Not Found", "text/plain", ""),
    };
    let mut conn = conn;
    conn.write_all(out.as_bytes())?;
    conn.flush()
}

/// "allocation created" lines of turnd's log for `client_ip` over `transport`.
fn allocations(log: &str, client_ip: &str, transport: &str) -> usize {
    let client = format!("client={client_ip}:");
    log.lines()
        .filter(|l| l.contains("allocation created") && l.contains(&client))
        .filter(|l| l.contains(&format!("transport={transport}")) || l.contains(&format!("transport=\"{transport}\"")))
        .count()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Growth of a counter over the measured window.
fn delta(r: &Value, path: &[&str]) -> f64 {
    let get = |which: &str| path.iter().fold(&r[which], |v, k| &v[*k]).clone();
    num(&get("end")) - num(&get("start"))
}

/// Lost share of (received + lost) packets of `kind` over the window, in percent.
fn loss_pct(r: &Value, kind: &str) -> f64 {
    let lost = delta(r, &["inbound", kind, "packetsLost"]);
    let got = delta(r, &["inbound", kind, "packetsReceived"]);
    if got + lost > 0.0 { 100.0 * lost / (got + lost) } else { 0.0 }
}

/// One line of figures for a side.
fn figures(name: &str, r: &Value) -> String {
    let secs = num(&r["seconds"]).max(0.001);
    let end = &r["end"];
    let v = &end["inbound"]["video"];
    let rtt_pair = end["pair"]["currentRoundTripTime"].as_f64();
    let rtt_rtcp = end["remoteInbound"]["video"]["roundTripTime"].as_f64().or(end["remoteInbound"]["audio"]["roundTripTime"].as_f64());
    let ms = |x: Option<f64>| x.map(|s| format!("{:.1} ms", s * 1000.0)).unwrap_or_else(|| "n/a".into());
    format!(
        "{name}: video {:.1} frames/s decoded ({}x{} {}, {:.0} kbit/s in), loss {:.2}%; audio {:.0} samples/s, {:.0} packets/s, \
         loss {:.2}%; round trip {} (ICE), {} (RTCP); NACKs {}",
        delta(r, &["inbound", "video", "framesDecoded"]) / secs,
        v["frameWidth"],
        v["frameHeight"],
        v["codec"].as_str().unwrap_or("?"),
        delta(r, &["inbound", "video", "bytesReceived"]) * 8.0 / 1000.0 / secs,
        loss_pct(r, "video"),
        delta(r, &["inbound", "audio", "totalSamplesReceived"]) / secs,
        delta(r, &["inbound", "audio", "packetsReceived"]) / secs,
        loss_pct(r, "audio"),
        ms(rtt_pair),
        ms(rtt_rtcp),
        v["nackCount"],
    )
}

#[test]
fn call_from_udp_blocked_network_carries_audio_and_video_over_tls_443() {
    let t0 = Instant::now();
    let blocked = NetNs::create_udp_blocked();
    let open = NetNs::create_open();
    let host = blocked.host_ip().to_string();
    let blocked_ip = blocked.ns_ip().to_string();
    let relay_ip = open.host_ip().to_string();
    let bridge_ip = open.ns_ip().to_string();

    // turnd: listeners on the blocked namespace's host end, relaying from
    // the open namespace's host end to the other side's address only.
    let udp_addr: SocketAddr = format!("{host}:{PLAIN_PORT}").parse().unwrap();
    let server = Turnd::start_config(udp_addr, |dir| {
        common::make_cert(dir, "cert.pem", "key.pem", "turnd-call");
        format!(
            "realm = \"{realm}\"\n\
             [auth]\nsecrets = [\"{SECRET}\"]\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"{host}:{PLAIN_PORT}\"\n\
             [[listen]]\ntransport = \"tcp\"\naddress = \"{host}:{PLAIN_PORT}\"\n\
             [[listen]]\ntransport = \"tls\"\naddress = \"{host}:{TLS_PORT}\"\n\
             [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             [relay]\nip = \"{relay_ip}\"\nports = \"20000-29999\"\n\
             [peers]\nallow = [\"{bridge_ip}/32\"]\n\
             [log]\nlevel = \"debug\"\n",
            realm = common::REALM,
            cert = dir.join("cert.pem").display(),
            key = dir.join("key.pem").display(),
        )
    });

    let calls = CallServer::new(vec![
        blocked.tcp_listener("127.0.0.1:0".parse().unwrap()),
        open.tcp_listener("127.0.0.1:0".parse().unwrap()),
    ]);
    let (username, password) = browser::credentials();
    let turn_url = format!("turns:{host}:{TLS_PORT}?transport=tcp");
    let url = |addr: SocketAddr, role: &str, turn: &str, policy: &str| {
        format!(
            "http://{addr}/call.html?role={role}&turn={}&user={}&pass={}&policy={policy}&duration={}&timeout={}",
            browser::query_escape(turn),
            browser::query_escape(&username),
            browser::query_escape(&password),
            DURATION.as_millis(),
            PAGE_TIMEOUT.as_millis()
        )
    };
    let media = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--autoplay-policy=no-user-gesture-required"];
    let wrap_in = |ns: &NetNs| {
        let name = ns.name().to_owned();
        move |argv: &[OsString]| {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", &name]).args(argv);
            c
        }
    };
    let (in_blocked, in_open) = (wrap_in(&blocked), wrap_in(&open));
    let mut participant = Browser::launch(&url(calls.addrs[0], "offer", &turn_url, "relay"), &media, Some(&in_blocked));
    let mut bridge = Browser::launch(&url(calls.addrs[1], "answer", "", "all"), &media, Some(&in_open));

    let mut results: HashMap<String, Value> = HashMap::new();
    let deadline = Instant::now() + RESULT_TIMEOUT;
    while results.len() < 2 {
        if let Ok((role, body)) = calls.results.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("the {role} page posted bad JSON ({e}): {body}"));
            results.insert(role, v);
        }
        for (name, b) in [("participant", &mut participant), ("other side", &mut bridge)] {
            if let Some(st) = b.exited() {
                panic!("chromium ({name}) exited ({st}) before its page reported\n--- log ---\n{}", b.log());
            }
        }
        assert!(
            Instant::now() < deadline,
            "no result from both pages within {RESULT_TIMEOUT:?} (have {:?})\n--- participant ---\n{}\n--- other side ---\n{}\n--- turnd ---\n{}",
            results.keys().collect::<Vec<_>>(),
            participant.log(),
            bridge.log(),
            server.log()
        );
    }
    drop(participant);
    drop(bridge);
    let (p, b) = (&results["offer"], &results["answer"]);
    let diag = |what: &str| {
        format!(
            "{what}\n--- participant (offer) ---\n{}\n--- other side (answer) ---\n{}\n--- firewall in {} ---\n{}\n--- turnd log ---\n{}",
            browser::pretty(p),
            browser::pretty(b),
            blocked.name(),
            blocked.firewall_rules(),
            server.log()
        )
    };

    for (name, r) in [("participant", p), ("other side", b)] {
        assert_eq!(r["ok"], Value::Bool(true), "{}", diag(&format!("the {name}'s page failed")));
        let kinds: Vec<&str> = r["remoteKinds"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        assert!(kinds.contains(&"audio") && kinds.contains(&"video"), "{}", diag(&format!("{name}: remote tracks {kinds:?}")));
        // Video decoded and audio received, and both still flowing over the
        // whole measured window.
        let end = &r["end"]["inbound"];
        assert!(num(&end["video"]["framesDecoded"]) > 0.0, "{}", diag(&format!("{name}: no video frame decoded")));
        assert!(num(&end["audio"]["totalSamplesReceived"]) > 0.0, "{}", diag(&format!("{name}: no audio samples")));
        let secs = num(&r["seconds"]);
        assert!(secs >= DURATION.as_secs_f64() * 0.9, "{}", diag(&format!("{name}: window of {secs} s")));
        let fps = delta(r, &["inbound", "video", "framesDecoded"]) / secs;
        assert!(fps >= 2.0, "{}", diag(&format!("{name}: only {fps:.1} video frames/s decoded over the window")));
        let samples = delta(r, &["inbound", "audio", "totalSamplesReceived"]) / secs;
        assert!(samples >= 8000.0, "{}", diag(&format!("{name}: only {samples:.0} audio samples/s over the window")));
        assert!(delta(r, &["inbound", "audio", "packetsReceived"]) > 0.0, "{}", diag(&format!("{name}: no audio packets")));
        assert_eq!(r["end"]["pair"]["state"].as_str(), Some("succeeded"), "{}", diag(&format!("{name}: selected pair")));
    }

    // The participant's media leaves over TLS to turnd on 443, from a relay
    // candidate on turnd's relay address, to the other side's own address.
    let pair = &p["end"]["pair"];
    assert_eq!(pair["local"]["candidateType"].as_str(), Some("relay"), "{}", diag("participant: local is not relay"));
    assert_eq!(pair["local"]["relayProtocol"].as_str(), Some("tls"), "{}", diag("participant: relay not over TLS"));
    assert_eq!(pair["local"]["url"].as_str(), Some(turn_url.as_str()), "{}", diag("participant: relay URL"));
    assert_eq!(pair["local"]["address"].as_str(), Some(relay_ip.as_str()), "{}", diag("participant: relayed address"));
    assert!(
        common::RELAY_PORTS.contains(&(pair["local"]["port"].as_u64().unwrap_or(0) as u16)),
        "{}",
        diag("participant: relayed port outside the relay range")
    );
    assert_eq!(pair["remote"]["address"].as_str(), Some(bridge_ip.as_str()), "{}", diag("participant: remote address"));
    // The other side talks plain UDP from its own address to the relayed one.
    let pair = &b["end"]["pair"];
    assert_eq!(pair["local"]["candidateType"].as_str(), Some("host"), "{}", diag("other side: local is not its host"));
    assert_eq!(pair["local"]["protocol"].as_str(), Some("udp"), "{}", diag("other side: not UDP"));
    assert_eq!(pair["local"]["address"].as_str(), Some(bridge_ip.as_str()), "{}", diag("other side: local address"));
    assert_eq!(pair["remote"]["address"].as_str(), Some(relay_ip.as_str()), "{}", diag("other side: remote address"));
    let log = server.log();
    assert!(allocations(&log, &blocked_ip, "tls") >= 1, "{}", diag("turnd logged no TLS allocation from the participant"));
    assert_eq!(allocations(&log, &blocked_ip, "udp"), 0, "{}", diag("turnd allocated over UDP for the participant"));

    eprintln!("participant {blocked_ip} (UDP blocked, turns:{host}:443) <-> other side {bridge_ip} (UDP, host candidate), relayed via {relay_ip}");
    eprintln!("{}", figures("participant receives", p));
    eprintln!("{}", figures("other side receives", b));
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}
