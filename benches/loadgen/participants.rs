//! Participants mode: N simulated video-call participants, each with one
//! allocation and a channel to the one shared echo peer (standing in for a
//! videobridge, which every participant relays to). Each participant sends
//! video as frames (`--fps` a second, each a burst of `--frame-pkts`
//! 1200-byte packets, ≈2.5 Mbit/s at the defaults) and `--audio-pps` audio
//! packets of 100-160 bytes, on its own clock: random phase, every frame and
//! audio packet up to `--jitter-ms` early or late. The peer answers every
//! packet back to the relayed address it came from, same size.
//!
//! Measured per window: round trip (generator clock, stamp in the payload),
//! one way client → relay → peer (the peer shares the clock), loss per
//! direction (sent vs received by the peer, echoed by the peer vs received
//! back), the server's and the generator's CPU. `--participants N` runs one
//! window; `--participants-search` grows N (doubling) until a step fails
//! `--max-loss` / `--max-p99-ms`, then bisects, each step a fresh set of
//! participants against the same server, bounded in steps and seconds.

use super::*;
use serde_json::{json, Value};

/// Video payload bytes.
const VIDEO: usize = 1200;
/// RTP payload types with --rtp (WebRTC's usual dynamic ones): video at
/// 90 kHz, audio (Opus) at 48 kHz.
const RTP_VIDEO: u8 = 96;
const RTP_AUDIO: u8 = 111;

/// The next RTP packet of the stream in ChannelData message `m` (built by
/// [`message`] with RTP): its sequence number one up, its timestamp the
/// send time on the stream's clock (a frame's packets share it).
pub(super) fn rtp_advance(m: &mut [u8], now_ns: u64) {
    let p = &mut m[4..];
    let seq = u16::from_be_bytes([p[2], p[3]]).wrapping_add(1);
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    let clock: u128 = if p[1] & 0x7f == RTP_VIDEO { 90_000 } else { 48_000 };
    let ts = (now_ns as u128 * clock / 1_000_000_000) as u32;
    p[4..8].copy_from_slice(&ts.to_be_bytes());
}
/// Participants pace on this tick at the finest.
const MIN_TICK_US: u64 = 500;
/// A send due longer ago than this is skipped (the generator fell behind)
/// rather than sent late in a burst; skipped sends mark a generator-limited step.
const LATE_NS: u64 = 20_000_000;
/// The generator counts as saturated above this share of its core.
const GEN_BUSY_PCT: f64 = 90.0;

struct Ctx<'a> {
    args: &'a Args,
    kind: Kind,
    tls: Option<Arc<ClientConfig>>,
    creds: Creds,
    peer: SocketAddr,
    win: Arc<PeerWin>,
    tag: u32,
    rng: u64,
    tids: u64,
}

impl Ctx<'_> {
    /// xorshift64*: uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A jitter draw in nanoseconds, shifted to be non-negative (0..2*jitter).
    fn jitter(&mut self) -> u64 {
        (self.uniform() * 2.0 * self.args.jitter_ms * 1e6) as u64
    }
}

/// One participant's clock and its audio message (the video one is the client's template).
struct Sched {
    next_frame: u64,
    frame_due: u64,
    next_audio: u64,
    audio_due: u64,
    audio: (Vec<u8>, usize),
}

struct Step {
    n: usize,
    pass: bool,
    json: Value,
}

pub(super) fn run(args: &Args) -> Result<()> {
    let kind = if args.tls {
        Kind::Tls
    } else if args.tcp {
        Kind::Tcp
    } else {
        Kind::Udp
    };
    let secret = args.secret.as_ref().ok_or_else(|| anyhow!("--secret is required"))?;
    if args.peer_ip == args.server.ip() {
        bail!("--peer-ip must differ from the server's address (relays refuse their own address)");
    }
    let max_n = if args.participants_search { args.search_max } else { args.participants.unwrap_or(0) };
    if max_n == 0 || max_n > MAX_CLIENTS || args.search_start == 0 {
        bail!("participants must be 1..={MAX_CLIENTS}");
    }
    if args.fps == 0 || args.fps > 120 || args.frame_pkts == 0 || args.frame_pkts > 64 || args.audio_pps > 200 {
        bail!("--fps must be 1..=120, --frame-pkts 1..=64, --audio-pps at most 200");
    }
    if !(0.0..=15.0).contains(&args.jitter_ms) {
        bail!("--jitter-ms must be 0..=15");
    }
    let (wu, du) = if args.participants_search { (args.step_warmup, args.step_duration) } else { (args.warmup, args.duration) };
    if wu.is_nan() || du.is_nan() || wu < 0.0 || du <= 0.0 || wu + du > 60.0 || !(1.0..=600.0).contains(&args.search_secs) {
        bail!("a window's warm-up + duration must be positive and at most 60 s, --search-secs 1..=600");
    }
    let tag = (SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u32) ^ std::process::id().rotate_left(16);
    let base = Instant::now();
    let win = Arc::new(PeerWin::new(base, tag));
    let peer = Peer::start_with(args.peer_ip, args.peer_port, args.batch, VIDEO + 128, args.gso, Some(win.clone()), None)?;
    wait_ready(args.server, kind, Duration::from_secs_f64(args.ready_timeout))?;
    let unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let username = rest_username(unix + 3600, Some(&args.user));
    let password = rest_password(secret.as_bytes(), &username);
    let mut cx = Ctx {
        args,
        kind,
        tls: if kind == Kind::Tls { Some(tls_config()?) } else { None },
        creds: Creds { username, password },
        peer: peer.addr,
        win,
        tag,
        rng: (tag as u64) << 32 | 0x9E37_79B9,
        tids: 0,
    };
    let out = if args.participants_search {
        search(&mut cx, base, wu, du)?
    } else {
        let s = step(&mut cx, base, max_n, wu, du)?;
        s.json
    };
    drop(peer);
    let mut out = out;
    out["label"] = json!(args.label);
    out["server"] = json!(args.server.to_string());
    if args.json {
        println!("{out}");
    } else {
        print_text(&out);
    }
    Ok(())
}

/// Grows N from --search-start (doubling) until a step fails, then bisects
/// to about 5%; bounded by --search-max, --search-steps and --search-secs.
fn search(cx: &mut Ctx, base: Instant, wu: f64, du: f64) -> Result<Value> {
    let a = cx.args;
    let t0 = Instant::now();
    let (mut lo, mut hi) = (None::<Step>, None::<Step>);
    let mut steps = Vec::new();
    let mut n = a.search_start.min(a.search_max);
    let mut stop = "steps";
    while steps.len() < a.search_steps {
        if t0.elapsed().as_secs_f64() > a.search_secs {
            stop = "time";
            break;
        }
        let s = step(cx, base, n, wu, du)?;
        eprintln!(
            "loadgen: participants {n}: {} (loss {:.3} %, p99 {:.1} ms, server cpu {:.0} % (waited {:.0} %), loadgen cpu {:.0} %)",
            if s.pass { "pass" } else { "fail" },
            s.json["loss_pct"].as_f64().unwrap_or(f64::NAN),
            s.json["rtt_us"]["p99"].as_f64().unwrap_or(f64::NAN) / 1000.0,
            s.json["server_cpu_pct"].as_f64().unwrap_or(f64::NAN),
            s.json["server_wait_pct"].as_f64().unwrap_or(f64::NAN),
            s.json["loadgen_cpu_pct"].as_f64().unwrap_or(f64::NAN),
        );
        steps.push(s.json.clone());
        if s.pass {
            lo = Some(s);
        } else {
            hi = Some(s);
        }
        let l = lo.as_ref().map_or(0, |s| s.n);
        n = match &hi {
            None if l >= a.search_max => {
                stop = "cap";
                break;
            }
            None => (l * 2).min(a.search_max),
            Some(h) => {
                if h.n - l <= (l / 20).max(1) {
                    stop = "resolution";
                    break;
                }
                (l + h.n) / 2
            }
        };
    }
    // What stopped N from growing: the busiest side in the smallest failing step.
    let limit = match &hi {
        None => "cap: every step passed",
        Some(h) => match h.json["limit"].as_str() {
            Some("generator") => "generator: its core was saturated or it fell behind in the failing step",
            Some("both") => "both: the server's core and the generator's were saturated in the failing step",
            Some("contention") => "contention: neither core saturated, the server waited for its core (other programs)",
            _ => "server: loss or latency with the generator below saturation",
        },
    };
    let mut out = lo.as_ref().map_or_else(|| json!({}), |s| s.json.clone());
    out["mode"] = json!("participants-search");
    out["transport"] = json!(transport(cx.kind));
    out["max_participants"] = json!(lo.as_ref().map_or(0, |s| s.n));
    out["first_failing"] = json!(hi.as_ref().map(|s| s.n));
    out["limit"] = json!(limit);
    out["generator_limited"] = json!(hi.as_ref().is_some_and(|s| s.json["generator_busy"] == json!(true)));
    out["search_stop"] = json!(stop);
    out["search_s"] = json!(t0.elapsed().as_secs_f64());
    out["criteria"] = json!({"max_loss_pct": cx.args.max_loss, "max_rtt_p99_ms": cx.args.max_p99_ms});
    out["steps"] = Value::Array(steps);
    Ok(out)
}

fn transport(k: Kind) -> &'static str {
    match k {
        Kind::Udp => "udp",
        Kind::Tcp => "tcp",
        Kind::Tls => "tls",
    }
}

/// The message a participant sends: ChannelData with `size` payload bytes,
/// the stamp at the end; returns it and the stamp's offset. With `rtp`
/// (payload type, SSRC) the payload starts with an RTP header, whose
/// sequence number and timestamp [`rtp_advance`] sets per send.
fn message(size: usize, stream: bool, rtp: Option<(u8, u32)>) -> (Vec<u8>, usize) {
    let mut m = ChannelData::header(CHANNEL, size).to_vec();
    m.resize(4 + size, 0x5a);
    if let Some((pt, ssrc)) = rtp {
        m[4..16].fill(0);
        m[4] = 0x80; // version 2, no padding, extension or CSRC
        m[5] = pt;
        m[12..16].copy_from_slice(&ssrc.to_be_bytes());
    }
    m[4 + size - STAMP..].fill(0);
    if stream {
        // RFC 8656 12.5: ChannelData is padded to 4 on streams.
        m.resize((m.len() + 3) & !3, 0);
    }
    (m, 4 + size - STAMP)
}

/// N fresh participants for one warm-up + window; torn down at the end.
fn step(cx: &mut Ctx, base: Instant, n: usize, wu: f64, du: f64) -> Result<Step> {
    let a = cx.args;
    let ready = Duration::from_secs_f64(a.ready_timeout);
    let setup_start = Instant::now();
    let mut clients = Vec::with_capacity(n);
    let mut sched = Vec::with_capacity(n);
    let mut retries = 0u32;
    let frame_ns = 1_000_000_000 / a.fps as u64;
    let audio_ns = if a.audio_pps > 0 { 1_000_000_000 / a.audio_pps as u64 } else { u64::MAX / 4 };
    for i in 0..n {
        let mut attempt = 0;
        let (mut conn, session) = loop {
            let mut conn = Conn::connect(a.server, cx.kind, cx.tls.as_ref(), Instant::now() + ready)
                .with_context(|| format!("participant {i}: connect"))?;
            match setup_turn(&mut conn, &cx.creds, cx.peer, false, &mut cx.tids) {
                Ok((session, _relayed)) => break (conn, session),
                // A UDP port of an earlier step's participant, whose
                // allocation the server still holds (its Refresh 0 lost):
                // another socket, another port.
                Err(e) if attempt < 3 && cx.kind == Kind::Udp && format!("{e:#}").contains("error 437") => {
                    attempt += 1;
                    retries += 1;
                }
                Err(e) => return Err(e).with_context(|| format!("participant {i}")),
            }
        };
        if let Link::Tls(_, t) = &mut conn.link {
            t.set_buffer_limit(None);
        }
        match &conn.link {
            Link::Udp(s) => s.set_nonblocking(true)?,
            Link::Tcp(s) | Link::Tls(s, _) => s.set_nonblocking(true)?,
        }
        let stream = conn.is_stream();
        // An SSRC per participant and stream.
        let ssrc = |k: u32| (cx.tag << 16) ^ ((i as u32) << 1 | k);
        let (v_rtp, a_rtp) = if a.rtp { (Some((RTP_VIDEO, ssrc(0))), Some((RTP_AUDIO, ssrc(1)))) } else { (None, None) };
        let (tmpl, off) = message(VIDEO, stream, v_rtp);
        let audio = message(100 + (cx.uniform() * 61.0) as usize, stream, a_rtp);
        clients.push(Client { conn, tmpl, off, crc_prefix: None, sent_seq: 0, rx_seq: 0, last_rx_ns: 0, session: Some(session) });
        sched.push(Sched { next_frame: 0, frame_due: 0, next_audio: 0, audio_due: 0, audio });
    }
    let setup_secs = setup_start.elapsed().as_secs_f64();

    let mut ep = Epoll::new(n + 2)?;
    let stream = cx.kind != Kind::Udp;
    for (i, c) in clients.iter().enumerate() {
        let ev = if stream { (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32 } else { libc::EPOLLIN as u32 };
        ep.add(c.conn.fd(), ev, i as u64)?;
    }
    const TICK: u64 = u64::MAX;
    let ticker = Ticker::new(Duration::from_micros(a.tick_us.max(MIN_TICK_US)))?;
    ep.add(ticker.0, libc::EPOLLIN as u32, TICK)?;
    let mut g = Gen {
        args: a,
        gso: a.gso && cx.kind == Kind::Udp,
        tag: cx.tag,
        base,
        clients,
        c: Counters::default(),
        hist: Histogram::new(),
        win: Window { start_ns: u64::MAX, end_ns: u64::MAX },
        flows: None,
    };
    let t0 = g.now_ns();
    // Random phase: frame clocks spread over a frame interval, audio over its own.
    for s in sched.iter_mut() {
        s.next_frame = t0 + (cx.uniform() * frame_ns as f64) as u64;
        s.frame_due = s.next_frame + cx.jitter();
        s.next_audio = t0 + (cx.uniform() * audio_ns.min(1_000_000_000) as f64) as u64;
        s.audio_due = s.next_audio + cx.jitter();
    }
    let ws = t0 + (wu * 1e9) as u64;
    let we = ws + (du * 1e9) as u64;
    let pid = a.server_pid.map(|p| p.to_string());
    let cpu = |pid: &Option<String>| {
        let server = pid.as_deref();
        [server.and_then(cpu_seconds), cpu_seconds("self"), server.and_then(sched_wait_seconds), sched_wait_seconds("self")]
    };
    let (mut c0, mut c1) = (None, None);
    let (mut unsent0, mut unsent1, mut skipped0, mut skipped1) = (0, 0, 0, 0);
    let mut m = Mmsg::new(a.batch.max(a.frame_pkts), VIDEO + 128);
    let mut scratch = vec![0u8; 1 << 16];
    let mut drain_deadline = None::<u64>;
    loop {
        let now = g.now_ns();
        if c0.is_none() && now >= ws {
            g.win = Window { start_ns: ws, end_ns: we };
            cx.win.reset(ws, we);
            c0 = Some(cpu(&pid));
            (unsent0, skipped0) = (g.c.unsent, g.c.skipped);
        }
        if c1.is_none() && now >= we {
            c1 = Some(cpu(&pid));
            (unsent1, skipped1) = (g.c.unsent, g.c.skipped);
            drain_deadline = Some(now + DRAIN.as_nanos() as u64);
        }
        if let Some(d) = drain_deadline
            && (now >= d || g.c.rx_window >= g.c.sent_window)
        {
            break;
        }
        if drain_deadline.is_none() {
            let in_window = now >= ws;
            for (ci, s) in sched.iter_mut().enumerate() {
                while s.frame_due <= now {
                    if now - s.frame_due > LATE_NS {
                        g.c.skipped += a.frame_pkts as u64;
                    } else {
                        g.send(ci, a.frame_pkts, now, in_window, &mut m);
                    }
                    s.next_frame += frame_ns;
                    s.frame_due = s.next_frame + cx.jitter();
                }
                while s.audio_due <= now {
                    if now - s.audio_due > LATE_NS {
                        g.c.skipped += 1;
                    } else {
                        let cl = &mut g.clients[ci];
                        std::mem::swap(&mut cl.tmpl, &mut s.audio.0);
                        std::mem::swap(&mut cl.off, &mut s.audio.1);
                        g.send(ci, 1, now, in_window, &mut m);
                        let cl = &mut g.clients[ci];
                        std::mem::swap(&mut cl.tmpl, &mut s.audio.0);
                        std::mem::swap(&mut cl.off, &mut s.audio.1);
                    }
                    s.next_audio += audio_ns;
                    s.audio_due = s.next_audio + cx.jitter();
                }
            }
        }
        let k = ep.wait(1);
        for i in 0..k {
            let (tok, _ev) = ep.event(i);
            if tok == TICK {
                ticker.clear();
                continue;
            }
            g.receive(tok as usize, &mut m, &mut scratch);
        }
        if g.clients.iter().all(|c| c.conn.closed) {
            bail!("the server closed every connection");
        }
    }
    let closed = g.clients.iter().filter(|c| c.conn.closed).count();
    if cx.kind == Kind::Udp {
        deallocate(&g.clients, &cx.creds, &mut cx.tids);
    }
    drop(ep);
    let (c0, c1) = (c0.unwrap(), c1.unwrap());
    let delta = |k: usize| c0[k].zip(c1[k]).map(|(a, b)| b - a);
    let hist = std::mem::replace(&mut g.hist, Histogram::new());
    let (sent, echoed, unsent, skipped) = (g.c.sent_window, g.c.rx_window, unsent1 - unsent0, skipped1 - skipped0);
    drop(g); // closes the connections
    // Let the server retire the allocations before the next step.
    std::thread::sleep(Duration::from_millis(300));

    let secs = du;
    let peer_rx = cx.win.rx.load(Ordering::Relaxed);
    let peer_tx = cx.win.tx.load(Ordering::Relaxed);
    let oneway = std::mem::replace(&mut *cx.win.oneway.lock().unwrap(), Histogram::new());
    let pct = |part: u64, whole: u64| if whole > 0 { 100.0 * (1.0 - part as f64 / whole as f64) } else { 0.0 };
    // Messages the socket would not take count as lost: the relay did not keep up.
    let offered = sent + unsent;
    let loss = pct(echoed, offered);
    let forwarded = (peer_rx + echoed) as f64;
    let server_cpu = delta(0);
    let loadgen_pct = delta(1).map(|c| 100.0 * c / secs);
    let server_pct = server_cpu.map(|c| 100.0 * c / secs);
    let server_wait = delta(2).map(|c| 100.0 * c / secs);
    let us = |h: &Histogram, q: f64| h.quantile(q).map(|ns| ns as f64 / 1000.0);
    let p99 = us(&hist, 0.99);
    let gen_busy = loadgen_pct.is_some_and(|p| p >= GEN_BUSY_PCT) || skipped * 1000 > offered;
    let server_busy = server_pct.is_some_and(|p| p >= GEN_BUSY_PCT);
    let limit = if server_busy && gen_busy {
        "both"
    } else if server_busy {
        "server"
    } else if gen_busy {
        "generator"
    } else if server_wait.is_some_and(|w| w >= 5.0) {
        "contention"
    } else {
        "server"
    };
    let pass = closed == 0 && sent > 0 && loss <= a.max_loss && p99.is_some_and(|p| p <= a.max_p99_ms * 1000.0);
    let json = json!({
        "mode": "participants",
        "transport": transport(cx.kind),
        "participants": n,
        "clients": n,
        "fps": a.fps, "frame_pkts": a.frame_pkts, "audio_pps": a.audio_pps, "jitter_ms": a.jitter_ms,
        "gso": a.gso,
        "warmup_s": wu,
        "duration_s": secs,
        "setup_s": setup_secs,
        "setup_437_retries": retries,
        "offered_mps": offered as f64 / secs,
        "forwarded_pps": forwarded / secs,
        "to_peer_pps": peer_rx as f64 / secs,
        "to_client_pps": echoed as f64 / secs,
        "sent_window": sent,
        "peer_received_window": peer_rx,
        "peer_echoed_window": peer_tx,
        "echoed_window": echoed,
        "unsent": unsent,
        "skipped": skipped,
        "loss_pct": loss,
        "loss_to_peer_pct": pct(peer_rx, sent),
        "loss_to_client_pct": pct(echoed, peer_tx),
        "closed_connections": closed,
        "rtt_us": {
            "p50": us(&hist, 0.5), "p99": us(&hist, 0.99), "p999": us(&hist, 0.999),
            "max": (hist.total > 0).then(|| hist.max as f64 / 1000.0),
        },
        "oneway_to_peer_us": { "p50": us(&oneway, 0.5), "p99": us(&oneway, 0.99) },
        "server_pid": a.server_pid,
        "server_cpu_pct": server_pct,
        "server_wait_pct": server_wait,
        "loadgen_wait_pct": delta(3).map(|c| 100.0 * c / secs),
        "server_cpu_us_per_pkt": server_cpu.filter(|_| forwarded > 0.0).map(|c| c * 1e6 / forwarded),
        "loadgen_cpu_pct": loadgen_pct,
        "pass": pass,
        "generator_busy": gen_busy,
        "limit": (!pass).then_some(limit),
    });
    Ok(Step { n, pass, json })
}

fn print_text(j: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| if x.abs() < 10.0 { format!("{x:.3}") } else { format!("{x:.1}") });
    if let Some(steps) = j["steps"].as_array() {
        for s in steps {
            println!(
                "step  {:>5} participants  {}  loss {} % (to peer {}, to client {})  rtt p99 {} µs  server cpu {} % (waited {} %)  loadgen cpu {} %",
                s["participants"],
                if s["pass"].as_bool() == Some(true) { "pass" } else { "FAIL" },
                f(&s["loss_pct"]),
                f(&s["loss_to_peer_pct"]),
                f(&s["loss_to_client_pct"]),
                f(&s["rtt_us"]["p99"]),
                f(&s["server_cpu_pct"]),
                f(&s["server_wait_pct"]),
                f(&s["loadgen_cpu_pct"])
            );
        }
        println!("max participants  {}  (limit: {}; stopped by {})", j["max_participants"], j["limit"].as_str().unwrap_or("?"), j["search_stop"]);
        if j["participants"].is_null() {
            return;
        }
        println!("at that N:");
    }
    println!("participants {} over {}: offered {} msgs/s, forwarded {} pkts/s", j["participants"], j["transport"], f(&j["offered_mps"]), f(&j["forwarded_pps"]));
    println!(
        "loss         {} %  (to peer {} %, back to clients {} %; not taken by the socket {}, skipped {})",
        f(&j["loss_pct"]),
        f(&j["loss_to_peer_pct"]),
        f(&j["loss_to_client_pct"]),
        j["unsent"],
        j["skipped"]
    );
    println!(
        "rtt µs       p50 {}  p99 {}  p99.9 {};  one way to peer p50 {}  p99 {}",
        f(&j["rtt_us"]["p50"]),
        f(&j["rtt_us"]["p99"]),
        f(&j["rtt_us"]["p999"]),
        f(&j["oneway_to_peer_us"]["p50"]),
        f(&j["oneway_to_peer_us"]["p99"])
    );
    println!(
        "server cpu   {} % of a core (waited for it {} %), {} µs per relayed packet",
        f(&j["server_cpu_pct"]),
        f(&j["server_wait_pct"]),
        j["server_cpu_us_per_pkt"].as_f64().map_or("-".into(), |x| format!("{x:.2}"))
    );
    println!("loadgen cpu  {} %", f(&j["loadgen_cpu_pct"]));
}
