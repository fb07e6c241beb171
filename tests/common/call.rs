//! A real call between two headless Chromium processes, each in its own
//! network namespace, with fake camera and microphone: the page
//! `tests/browser/call.html` on each side, the offer and answer (with all
//! candidates) carried by an HTTP server of the test that serves each page
//! on its namespace's own `lo` (`NetNs::tcp_listener`), so no firewall is
//! opened for signalling. The participant offers, relay-only through one
//! TURN URL; the other side answers with no TURN server at all, offering
//! only its host candidate, as a videobridge offers its public address.
//! Neither browser gets `--allow-loopback-in-peer-connection` (both have a
//! namespace's veth): with it the other side would also offer 127.0.0.1,
//! which turnd refuses as a peer, and the participant's ICE would be
//! `failed` for a moment whenever that 403 came back before Chromium had
//! paired the answer's real candidate (see `common/browser.rs`).
//! Include it from a test file that also has `mod common;` and the
//! `browser` and `netns` modules, with `#[path = "common/call.rs"] mod call;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::browser::{self, Browser};
use crate::common;
use crate::netns::NetNs;

const PAGE: &str = include_str!("../browser/call.html");
/// How long audio and video are measured once the first frame is decoded.
pub const DURATION: Duration = Duration::from_secs(8);
/// The page gives up (and reports why) after this long plus the call's
/// measured window.
const PAGE_TIMEOUT: Duration = Duration::from_secs(32);
/// How long the test waits for both results beyond the page's own bound
/// (Chromium's start-up on a loaded machine).
const RESULT_MARGIN: Duration = Duration::from_secs(10);

/// What both pages send, and for how long they measure it.
#[derive(Clone, Copy, Debug)]
pub struct Media {
    /// The measured window, from the first decoded video frame.
    pub duration: Duration,
    /// Camera width, height and frame rate (the fake device scales to them).
    pub video: (u32, u32, u32),
}

impl Default for Media {
    /// DURATION of 320x240 video at 15 frames/s, plus audio.
    fn default() -> Media {
        Media { duration: DURATION, video: (320, 240, 15) }
    }
}

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
    let (method, path, body) = browser::read_request(&conn)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    let (method, path) = (method.as_str(), path.as_str());
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

/// Runs one call: Chromium in `participant` (offer, relay-only through
/// `turn_url`, plus `extra` flags) and in `other` (answer, host candidates
/// only), both with fake camera and microphone, until both pages report
/// (bounded). `context` adds to failure messages. Returns the participant's
/// and the other side's results.
pub fn run_call(participant: &NetNs, turn_url: &str, extra: &[&str], other: &NetNs, context: &dyn Fn() -> String) -> (Value, Value) {
    run_call_with(participant, turn_url, extra, other, &Media::default(), context)
}

/// [`run_call`] with other `media`: a longer window, a larger picture.
pub fn run_call_with(
    participant: &NetNs,
    turn_url: &str,
    extra: &[&str],
    other: &NetNs,
    media: &Media,
    context: &dyn Fn() -> String,
) -> (Value, Value) {
    let page_timeout = PAGE_TIMEOUT + media.duration;
    let result_timeout = page_timeout + RESULT_MARGIN;
    let calls = CallServer::new(vec![
        participant.tcp_listener("127.0.0.1:0".parse().unwrap()),
        other.tcp_listener("127.0.0.1:0".parse().unwrap()),
    ]);
    let (username, password) = browser::credentials();
    let (w, h, fps) = media.video;
    let url = |addr: SocketAddr, role: &str, turn: &str, policy: &str| {
        format!(
            "http://{addr}/call.html?role={role}&turn={}&user={}&pass={}&policy={policy}&duration={}&timeout={}&video={w}x{h}x{fps}",
            browser::query_escape(turn),
            browser::query_escape(&username),
            browser::query_escape(&password),
            media.duration.as_millis(),
            page_timeout.as_millis()
        )
    };
    let flags = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--autoplay-policy=no-user-gesture-required"];
    let wrap_in = |ns: &NetNs| {
        let name = ns.name().to_owned();
        move |argv: &[OsString]| {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", &name]).args(argv);
            c
        }
    };
    let (in_participant, in_other) = (wrap_in(participant), wrap_in(other));
    let p_flags: Vec<&str> = flags.iter().chain(extra).copied().collect();
    let mut p = Browser::launch(&url(calls.addrs[0], "offer", turn_url, "relay"), &p_flags, Some(&in_participant));
    let mut b = Browser::launch(&url(calls.addrs[1], "answer", "", "all"), &flags, Some(&in_other));

    let mut results: HashMap<String, Value> = HashMap::new();
    let deadline = Instant::now() + result_timeout;
    while results.len() < 2 {
        if let Ok((role, body)) = calls.results.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("the {role} page posted bad JSON ({e}): {body}"));
            results.insert(role, v);
        }
        for (name, br) in [("participant", &mut p), ("other side", &mut b)] {
            if let Some(st) = br.exited() {
                panic!("chromium ({name}) exited ({st}) before its page reported\n--- log ---\n{}\n{}", br.log(), context());
            }
        }
        assert!(
            Instant::now() < deadline,
            "no result from both pages within {result_timeout:?} (have {:?})\n--- participant ---\n{}\n--- other side ---\n{}\n{}",
            results.keys().collect::<Vec<_>>(),
            p.log(),
            b.log(),
            context()
        );
    }
    (results.remove("offer").unwrap(), results.remove("answer").unwrap())
}

/// Asserts a call carried audio and video both ways over the window, the
/// participant's selected pair a local relay candidate (allocated over
/// `relay_protocol` from `turn_url`, at `relay_ip` on a relay port) to the
/// other side's `other_ip`, and the other side's pair its own UDP host
/// address to the relayed one.
#[allow(clippy::too_many_arguments)]
pub fn assert_call(
    p: &Value,
    b: &Value,
    turn_url: &str,
    relay_protocol: &str,
    relay_ip: &str,
    other_ip: &str,
    context: &dyn Fn() -> String,
) {
    let diag = |what: &str| {
        format!(
            "{what}\n--- participant (offer) ---\n{}\n--- other side (answer) ---\n{}\n{}",
            browser::pretty(p),
            browser::pretty(b),
            context()
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
        // Chromium marks the pair "in-progress" from each consent check
        // until its answer: with answers received before, that is still
        // the working pair, caught between a check and its answer (or with
        // the answer lost, on a lossy link, until the next check succeeds).
        let pair = &r["end"]["pair"];
        let working = match pair["state"].as_str() {
            Some("succeeded") => true,
            Some("in-progress") => pair["responsesReceived"].as_u64().is_some_and(|n| n > 0),
            _ => false,
        };
        assert!(working, "{}", diag(&format!("{name}: selected pair {}", pair["state"])));
    }
    let pair = &p["end"]["pair"];
    assert_eq!(pair["local"]["candidateType"].as_str(), Some("relay"), "{}", diag("participant: local is not relay"));
    assert_eq!(pair["local"]["relayProtocol"].as_str(), Some(relay_protocol), "{}", diag("participant: relay protocol"));
    assert_eq!(pair["local"]["url"].as_str(), Some(turn_url), "{}", diag("participant: relay URL"));
    assert_eq!(pair["local"]["address"].as_str(), Some(relay_ip), "{}", diag("participant: relayed address"));
    assert!(
        common::RELAY_PORTS.contains(&(pair["local"]["port"].as_u64().unwrap_or(0) as u16)),
        "{}",
        diag("participant: relayed port outside the relay range")
    );
    assert_eq!(pair["remote"]["address"].as_str(), Some(other_ip), "{}", diag("participant: remote address"));
    let pair = &b["end"]["pair"];
    assert_eq!(pair["local"]["candidateType"].as_str(), Some("host"), "{}", diag("other side: local is not its host"));
    assert_eq!(pair["local"]["protocol"].as_str(), Some("udp"), "{}", diag("other side: not UDP"));
    assert_eq!(pair["local"]["address"].as_str(), Some(other_ip), "{}", diag("other side: local address"));
    assert_eq!(pair["remote"]["address"].as_str(), Some(relay_ip), "{}", diag("other side: remote address"));
    // What each side offered: the participant relay candidates only, the
    // other side its one address only (no loopback, which the relay would
    // have to refuse and Chromium would take for a failed pair).
    for (name, r, want) in [("participant", p, None), ("other side", b, Some(other_ip))] {
        let offered = r["candidates"].as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(!offered.is_empty(), "{}", diag(&format!("{name} gathered no candidate")));
        for c in offered {
            match want {
                None => assert_eq!(c["type"].as_str(), Some("relay"), "{}", diag(&format!("{name} offered {c}"))),
                Some(ip) => assert_eq!(c["address"].as_str(), Some(ip), "{}", diag(&format!("{name} offered {c}"))),
            }
        }
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Growth of a counter over the measured window.
pub fn delta(r: &Value, path: &[&str]) -> f64 {
    let get = |which: &str| path.iter().fold(&r[which], |v, k| &v[*k]).clone();
    num(&get("end")) - num(&get("start"))
}

/// Lost share of (received + lost) packets of `kind` over the window, in percent.
pub fn loss_pct(r: &Value, kind: &str) -> f64 {
    let lost = delta(r, &["inbound", kind, "packetsLost"]);
    let got = delta(r, &["inbound", kind, "packetsReceived"]);
    if got + lost > 0.0 { 100.0 * lost / (got + lost) } else { 0.0 }
}

/// One line of figures for a side.
pub fn figures(name: &str, r: &Value) -> String {
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
