//! Call health under real packet loss: a real call through turnd (two
//! headless Chromium processes with fake camera and microphone, as in
//! `tests/browser_call.rs`) while the participant's own uplink loses packets,
//! and what turnd's admin API reports of it against what was dropped and
//! what the receiving browser's getStats counted.
//!
//! - The participant runs in a network namespace with ordinary UDP
//!   (`NetNs::create_open`), relay-only (`iceTransportPolicy: "relay"`) over
//!   `turn:HOST:3478?transport=udp`: media over UDP, because loss on a TCP
//!   or TLS connection is repaired by TCP before turnd sees the packets.
//! - Inside that namespace an nftables table on the egress of its veth
//!   drops, on their way out to turnd (destination turnd's address and
//!   port), a random N % of the UDP datagrams (`numgen random mod 100 < N
//!   drop`): RTP, RTCP, STUN and DTLS alike, as a lossy uplink does (see
//!   `Loss` for why the device's egress and not the `output` hook).
//!   Counters on the rule for RTP in ChannelData (first two bits 01, then
//!   an RTP version-2 header whose second byte is not an RTCP packet type,
//!   RFC 5761) tell how many RTP packets left and how many of them were
//!   dropped: the loss actually injected. Random dropping spreads it around
//!   N by chance (a standard deviation of 0.45 points at 5 % of 2,300
//!   packets), so turnd is held to what was dropped, and the injection
//!   itself to N within five standard deviations.
//! - The other side stands where the videobridge stands, in a second
//!   namespace with no TURN server and only its host candidate, as in
//!   `tests/browser_call.rs`; nothing drops there.
//!
//! One call per rate (0 %, 2 %, 5 %), each with its own allocation, for
//! WINDOW of 640x480 video at 30 frames/s plus audio (some thousands of RTP
//! packets from the participant). After each call (both browsers gone, the
//! allocation still there) `turnctl sessions --json` gives the allocation's
//! `health`: `client_leg` is what arrived from the participant, `peer_leg`
//! what arrived from the other side. Asserted:
//!
//! - turnd's `client_leg.loss` (all RTP streams together) is within 0.5
//!   percentage points of the injected loss, and under 0.5 % when nothing
//!   is dropped;
//! - for the audio and the video stream (matched by SSRC), and for the two
//!   together, turnd's loss agrees within 1 point with the receiving
//!   browser's cumulative `packetsLost / (packetsLost + packetsReceived -
//!   retransmittedPacketsReceived)`: Chromium counts the video
//!   retransmissions (RTX, after NACKs and as bandwidth probes) in
//!   `packetsReceived`, which without the correction understates the loss
//!   (4.36 % by turnd, 3.36 % by the plain ratio, in one 5 % run);
//! - `peer_leg.loss`, the direction nothing drops, stays under 0.5 %;
//! - both legs have a round trip from the relayed consent checks, and the
//!   audio and video streams the clock rates Opus and video use (48 and
//!   90 kHz), inferred by turnd from the streams;
//! - ended with `turnctl disconnect`, the allocation's "allocation ended"
//!   log line carries the same loss figures.
//!
//! The figures (injected, turnd, browser; jitter and round trips; the
//! `turnctl sessions` table and the log line) are printed with
//! `--nocapture`. Needs root, `ip netns`, `nft` and chromium;
//! test.sh installs the packages. Fails, never skips, when something is
//! missing.

mod common;
#[path = "common/browser.rs"]
mod browser;
#[path = "common/call.rs"]
mod call;
#[path = "common/netns.rs"]
mod netns;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::Turnd;
use netns::NetNs;

const PLAIN_PORT: u16 = 3478;
/// `Builder::three` also opens TLS; this test does not use it.
const TLS_PORT: u16 = 443;
/// Loss injected on the participant's uplink, in percent, one call each.
const RATES: [u32; 3] = [0, 2, 5];
/// How long each call is measured once video flows.
const WINDOW: Duration = Duration::from_secs(18);
/// turnd against the injected loss, and the healthy direction's ceiling.
const TURND_TOLERANCE: f64 = 0.005;
/// turnd against the receiving browser.
const BROWSER_TOLERANCE: f64 = 0.01;
/// Fewer RTP packets from the participant in a call mean it hardly ran.
const MIN_RTP: u64 = 1500;
/// Bound on each nft and turnctl run.
const CMD_LIMIT: Duration = Duration::from_secs(10);
/// Name of the nftables table this test adds in the participant's namespace.
const TABLE: &str = "turnd_loss";

/// Random loss on the datagrams a namespace sends to `dst:port`, with
/// counters; removed on drop (and with the namespace).
///
/// The rules sit on the egress hook of the namespace's veth (family
/// `netdev`), after the sending socket has handed the datagram over, not on
/// the `output` hook: a drop there fails the `sendmsg` with EPERM, Chromium
/// sends the datagram again, and only about N² % would be lost. A drop at
/// the device's egress goes unnoticed by a socket without IP_RECVERR, as on
/// a real lossy link. (Needs Linux 5.16 or later.)
struct Loss<'a> {
    ns: &'a NetNs,
}

impl<'a> Loss<'a> {
    fn inject(ns: &'a NetNs, dst: Ipv4Addr, port: u16, percent: u32) -> Loss<'a> {
        // Chain `rtp` sees RTP in ChannelData only: its counters are the RTP
        // packets sent and the RTP packets dropped. Everything else to turnd
        // is dropped at the same rate by the second rule of `egress`.
        let rules = format!(
            "table netdev {TABLE} {{\n\
               chain egress {{\n\
                 type filter hook egress device \"{dev}\" priority 0; policy accept;\n\
                 ip daddr {dst} udp dport {port} @th,64,2 1 @th,96,2 2 @th,104,8 != 192-223 goto rtp\n\
                 ip daddr {dst} udp dport {port} numgen random mod 100 < {percent} counter drop\n\
               }}\n\
               chain rtp {{\n\
                 counter\n\
                 numgen random mod 100 < {percent} counter drop\n\
               }}\n\
             }}\n",
            dev = ns.ns_if()
        );
        let path = std::env::temp_dir().join(format!("{}-loss.nft", ns.name()));
        std::fs::write(&path, rules).expect("write nft rules");
        let run = common::run_bounded(ns.command("nft").arg("-f").arg(&path), CMD_LIMIT);
        let _ = std::fs::remove_file(&path);
        assert_eq!(run.code, 0, "nft -f failed in {} (a netdev egress hook needs Linux 5.16 or later): {}", ns.name(), run.text());
        Loss { ns }
    }

    /// (RTP packets sent to turnd, RTP packets dropped, other datagrams dropped).
    fn counts(&self) -> (u64, u64, u64) {
        let run = common::run_bounded(self.ns.command("nft").args(["list", "table", "netdev", TABLE]), CMD_LIMIT);
        assert_eq!(run.code, 0, "nft list failed: {}", run.text());
        let packets = |line: &str| -> u64 {
            line.split("packets ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                panic!("no counter in {line:?} of:\n{}", run.stdout)
            })
        };
        let (mut seen, mut dropped, mut other) = (None, None, None);
        let mut in_rtp = false;
        for line in run.stdout.lines().map(str::trim) {
            if line.starts_with("chain ") {
                in_rtp = line.starts_with("chain rtp");
            } else if line.starts_with("counter ") && in_rtp {
                seen = Some(packets(line));
            } else if line.contains("numgen") && line.contains("counter") {
                let n = packets(line);
                if in_rtp { dropped = Some(n) } else { other = Some(n) }
            }
        }
        match (seen, dropped, other) {
            (Some(s), Some(d), Some(o)) => (s, d, o),
            _ => panic!("unexpected nft listing:\n{}", run.stdout),
        }
    }

    fn rules(&self) -> String {
        common::run_bounded(self.ns.command("nft").args(["list", "ruleset"]), CMD_LIMIT).stdout
    }
}

impl Drop for Loss<'_> {
    fn drop(&mut self) {
        let _ = Command::new("timeout").args(["10", "ip", "netns", "exec", self.ns.name(), "nft", "delete", "table", "netdev", TABLE]).output();
    }
}

/// `turnctl ARGS` against `server`'s admin API (bounded; it must succeed).
fn turnctl(server: &Turnd, args: &[&str]) -> common::Run {
    let run = common::run_bounded(
        Command::new(env!("CARGO_BIN_EXE_turnctl"))
            .args(args)
            .args(["--admin", &format!("127.0.0.1:{}", server.metrics_port)])
            .arg("--token-file")
            .arg(server.dir.join("admin-token")),
        CMD_LIMIT,
    );
    assert_eq!(run.code, 0, "turnctl {args:?}: {}", run.text());
    run
}

/// Every allocation turnd lists (`turnctl sessions --json`).
fn sessions(server: &Turnd) -> Vec<Value> {
    let run = turnctl(server, &["sessions", "--json"]);
    run.json().as_array().cloned().unwrap_or_else(|| panic!("turnctl sessions --json is not a list: {}", run.stdout))
}

/// Ends the allocation relayed at `relayed` (`turnctl disconnect`) and
/// returns turnd's "allocation ended" line for `client` (bounded).
fn disconnect(server: &Turnd, relayed: &str, client: &str) -> String {
    turnctl(server, &["disconnect", "--relayed", relayed]);
    let needle = format!("client={client} ");
    let deadline = Instant::now() + CMD_LIMIT;
    loop {
        if let Some(l) = server.log().lines().find(|l| l.contains("allocation ended") && l.contains(&needle)) {
            return l.to_owned();
        }
        assert!(Instant::now() < deadline, "no \"allocation ended\" for {client} within {CMD_LIMIT:?}:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ratio(lost: f64, expected: f64) -> Option<f64> {
    (expected > 0.0).then(|| lost / expected)
}

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.2}%", v * 100.0)).unwrap_or_else(|| "n/a".into())
}

/// One stream of a leg as turnd lists it, by SSRC.
fn stream(leg: &Value, ssrc: u64) -> Option<&Value> {
    leg["rtp_streams"].as_array()?.iter().find(|s| s["ssrc"].as_u64() == Some(ssrc))
}

/// (lost, expected) of a stream, 0 when turnd has none.
fn stream_counts(s: Option<&Value>) -> (f64, f64) {
    s.map(|s| (s["lost"].as_f64().unwrap_or(0.0), s["expected"].as_f64().unwrap_or(0.0))).unwrap_or((0.0, 0.0))
}

/// One line about a leg: its loss over all RTP streams, each stream, round trip.
fn describe_leg(name: &str, leg: &Value) -> String {
    let streams: Vec<String> = leg["rtp_streams"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| {
            format!(
                "ssrc {} {}/{} lost {} ({}) reordered {} dup {} jitter {} ms @{} Hz",
                s["ssrc"], s["received"], s["expected"], s["lost"], pct(s["loss"].as_f64()), s["reordered"], s["duplicates"], s["jitter_ms"],
                s["clock_hz"]
            )
        })
        .collect();
    format!(
        "{name}: loss {}, jitter {} ms, rtt {} ms, untracked RTP {}, other packets {}; {}",
        pct(leg["loss"].as_f64()),
        leg["jitter_ms"],
        leg["rtt_ms"],
        leg["untracked_packets"],
        leg["other_packets"],
        streams.join("; ")
    )
}

/// One kind of media from the participant, as turnd and as the receiving
/// browser saw it: (lost, expected) packets.
struct Kind {
    name: &'static str,
    turnd: Option<f64>,
    /// `packetsLost / (packetsLost + packetsReceived - retransmittedPacketsReceived)`:
    /// packetsReceived counts the retransmissions (RTX, a subset of it in the
    /// webrtc-stats definition) that the sender made after a NACK and for
    /// bandwidth probing, which are no packets of the original stream.
    browser: Option<f64>,
    /// `packetsLost / (packetsLost + packetsReceived)`, printed only.
    browser_raw: Option<f64>,
}

/// What one call gave.
struct Outcome {
    rate: u32,
    /// RTP packets sent to turnd, and dropped, by the firewall's counters.
    rtp_sent: u64,
    rtp_dropped: u64,
    other_dropped: u64,
    turnd_client: Option<f64>,
    turnd_peer: Option<f64>,
    /// Audio, video and the two together.
    kinds: Vec<Kind>,
    /// The clock rate turnd inferred for the audio and the video stream.
    clocks: [Option<u64>; 2],
    /// Each leg's round trip, ms.
    rtt_ms: [Option<f64>; 2],
    /// turnd's "allocation ended" line once the test disconnected it.
    ended: String,
    seconds: f64,
}

impl Outcome {
    fn injected(&self) -> Option<f64> {
        ratio(self.rtp_dropped as f64, self.rtp_sent as f64)
    }

    fn line(&self) -> String {
        let kinds: Vec<String> = self
            .kinds
            .iter()
            .map(|k| format!("{} turnd {} browser {} ({} counting retransmissions)", k.name, pct(k.turnd), pct(k.browser), pct(k.browser_raw)))
            .collect();
        format!(
            "injected {}%: {} of {} RTP packets dropped ({}), {} other datagrams dropped; turnd client_leg {} \
             peer_leg {}; {} ({:.1} s)",
            self.rate,
            self.rtp_dropped,
            self.rtp_sent,
            pct(self.injected()),
            self.other_dropped,
            pct(self.turnd_client),
            pct(self.turnd_peer),
            kinds.join(", "),
            self.seconds
        )
    }
}

#[test]
fn turnd_reports_the_loss_of_the_participants_uplink() {
    let t0 = Instant::now();
    let participant = NetNs::create_open();
    let other = NetNs::create_open();
    let host = participant.host_ip();
    let relay_ip = other.host_ip().to_string();
    let bridge_ip = other.ns_ip().to_string();
    let server = Turnd::builder()
        .three(&host.to_string(), PLAIN_PORT, TLS_PORT, &relay_ip)
        .extra(&format!("[peers]\nallow = [\"{bridge_ip}/32\"]\n"))
        .start();
    let turn_url = format!("turn:{host}:{PLAIN_PORT}?transport=udp");
    let media = call::Media { duration: WINDOW, video: (640, 480, 30) };

    let mut outcomes = Vec::new();
    for rate in RATES {
        let t_call = Instant::now();
        let loss = Loss::inject(&participant, host, PLAIN_PORT, rate);
        let context = || format!("--- nft in {} ---\n{}\n--- turnd log ---\n{}", participant.name(), loss.rules(), server.log());
        let (p, b) = call::run_call_with(&participant, &turn_url, &[], &other, &media, &context);
        call::assert_call(&p, &b, &turn_url, "udp", &relay_ip, &bridge_ip, &context);
        // Both browsers are gone: the allocation's counters are final.
        let (rtp_sent, rtp_dropped, other_dropped) = loss.counts();
        drop(loss);

        let local = &p["end"]["pair"]["local"];
        let relayed = format!("{}:{}", local["address"].as_str().unwrap_or("?"), local["port"]);
        let all = sessions(&server);
        let session = all
            .iter()
            .find(|s| s["relayed"].as_array().is_some_and(|r| r.iter().any(|a| a.as_str() == Some(relayed.as_str()))))
            .unwrap_or_else(|| panic!("no session relayed at {relayed} (the participant's relay candidate) in:\n{all:#?}"));
        assert!(
            session["client"].as_str().is_some_and(|c| c.starts_with(&format!("{}:", participant.ns_ip()))),
            "the session at {relayed} is not the participant's: {session:#}"
        );
        let health = &session["health"];
        let (client, peer) = (&health["client_leg"], &health["peer_leg"]);
        eprintln!("{}% injected, turnd {}", rate, describe_leg("client_leg", client));
        eprintln!("{}% injected, turnd {}", rate, describe_leg("peer_leg", peer));
        eprint!("{}% injected, turnctl sessions:\n{}", rate, turnctl(&server, &["sessions"]).stdout);
        let ended = disconnect(&server, &relayed, session["client"].as_str().unwrap_or("?"));
        eprintln!("{rate}% injected, turnd's log: {ended}");
        eprintln!("{}", call::figures("other side receives (the participant's uplink)", &b));
        eprintln!("{}", call::figures("participant receives", &p));

        // The receiving browser's cumulative counters for each kind, and
        // turnd's stream of the same SSRC.
        let mut kinds = Vec::new();
        let (mut t_sum, mut b_sum, mut raw_sum) = ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0));
        let mut ssrcs = [0; 2];
        for (i, name) in ["audio", "video"].into_iter().enumerate() {
            let inbound = &b["end"]["inbound"][name];
            let ssrc = inbound["ssrc"].as_u64().unwrap_or_else(|| panic!("the other side reports no {name} SSRC: {inbound}"));
            ssrcs[i] = ssrc;
            let count = |k: &str| inbound[k].as_f64().unwrap_or(0.0);
            let (b_lost, b_got, b_rtx) = (count("packetsLost"), count("packetsReceived"), count("retransmittedPacketsReceived"));
            let (t_lost, t_expected) = stream_counts(stream(client, ssrc));
            eprintln!(
                "{rate}% injected, {name} ssrc {ssrc}: turnd lost {t_lost} of {t_expected}; the receiving browser lost {b_lost} and \
                 received {b_got}, {b_rtx} of them retransmissions ({} NACKs sent)",
                inbound["nackCount"]
            );
            t_sum = (t_sum.0 + t_lost, t_sum.1 + t_expected);
            b_sum = (b_sum.0 + b_lost, b_sum.1 + b_lost + b_got - b_rtx);
            raw_sum = (raw_sum.0 + b_lost, raw_sum.1 + b_lost + b_got);
            kinds.push(Kind {
                name,
                turnd: ratio(t_lost, t_expected),
                browser: ratio(b_lost, b_lost + b_got - b_rtx),
                browser_raw: ratio(b_lost, b_lost + b_got),
            });
        }
        kinds.push(Kind {
            name: "audio+video",
            turnd: ratio(t_sum.0, t_sum.1),
            browser: ratio(b_sum.0, b_sum.1),
            browser_raw: ratio(raw_sum.0, raw_sum.1),
        });
        let outcome = Outcome {
            rate,
            rtp_sent,
            rtp_dropped,
            other_dropped,
            turnd_client: client["loss"].as_f64(),
            turnd_peer: peer["loss"].as_f64(),
            clocks: [0, 1].map(|i| stream(client, ssrcs[i]).and_then(|s| s["clock_hz"].as_u64())),
            rtt_ms: [client["rtt_ms"].as_f64(), peer["rtt_ms"].as_f64()],
            ended,
            kinds,
            seconds: t_call.elapsed().as_secs_f64(),
        };
        eprintln!("{}", outcome.line());
        outcomes.push(outcome);
    }

    // Asserted once every call has run and been printed.
    let all = outcomes.iter().map(Outcome::line).collect::<Vec<_>>().join("\n");
    let fail = |what: String| -> String { format!("{what}\n--- all calls ---\n{all}\n--- turnd log ---\n{}", server.log()) };
    for o in &outcomes {
        let injected = o.injected().unwrap_or_else(|| panic!("{}", fail(format!("{}%: the firewall counted no RTP to turnd", o.rate))));
        assert!(o.rtp_sent >= MIN_RTP, "{}", fail(format!("{}%: only {} RTP packets left the participant", o.rate, o.rtp_sent)));
        // The injection itself: nothing at 0 %, and near N % otherwise (five
        // standard deviations of the binomial spread; not a check of turnd).
        let n = o.rtp_sent as f64;
        let p = o.rate as f64 / 100.0;
        let spread = 5.0 * (p * (1.0 - p) / n).sqrt();
        assert!((injected - p).abs() <= spread, "{}", fail(format!("{}%: the firewall dropped {} of RTP", o.rate, pct(Some(injected)))));

        let client = o.turnd_client.unwrap_or_else(|| panic!("{}", fail(format!("{}%: turnd reports no client_leg loss", o.rate))));
        if o.rate == 0 {
            assert!(client < TURND_TOLERANCE, "{}", fail(format!("no loss injected, yet turnd reports {} on the client leg", pct(Some(client)))));
        } else {
            assert!(
                (client - injected).abs() <= TURND_TOLERANCE,
                "{}",
                fail(format!(
                    "{}%: turnd's client_leg loss {} is not within 0.5 points of the injected {}",
                    o.rate,
                    pct(Some(client)),
                    pct(Some(injected))
                ))
            );
        }
        let peer = o.turnd_peer.unwrap_or_else(|| panic!("{}", fail(format!("{}%: turnd reports no peer_leg loss", o.rate))));
        assert!(peer < TURND_TOLERANCE, "{}", fail(format!("{}%: peer_leg (nothing dropped) loss {}", o.rate, pct(Some(peer)))));
        for k in &o.kinds {
            let (Some(t), Some(b)) = (k.turnd, k.browser) else {
                panic!("{}", fail(format!("{}%: no {} loss from turnd ({:?}) or the browser ({:?})", o.rate, k.name, k.turnd, k.browser)));
            };
            assert!(
                (t - b).abs() <= BROWSER_TOLERANCE,
                "{}",
                fail(format!("{}%: {}: turnd {} against the receiving browser's {}", o.rate, k.name, pct(Some(t)), pct(Some(b))))
            );
        }
        // The end-of-allocation summary gives the same figures, as the log
        // formats them.
        for (leg, loss) in [("client", Some(client)), ("peer", Some(peer))] {
            let want = format!("{leg}_loss={}", loss.map_or("-".to_owned(), |r| format!("{:.1}%", r * 100.0)));
            assert!(o.ended.contains(&want), "{}", fail(format!("{}%: {want} is not in turnd's line: {}", o.rate, o.ended)));
        }
        assert_eq!(o.clocks, [Some(48_000), Some(90_000)], "{}", fail(format!("{}%: audio and video clock rates", o.rate)));
        for (leg, rtt) in ["client_leg", "peer_leg"].iter().zip(o.rtt_ms) {
            assert!(
                rtt.is_some_and(|ms| ms < 500.0),
                "{}",
                fail(format!("{}%: {leg} round trip {rtt:?} ms (consent checks cross both legs every few seconds)", o.rate))
            );
        }
    }
    eprintln!("--- injected vs turnd vs the receiving browser ---\n{all}");
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}
