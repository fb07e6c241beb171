//! loadgen: a TURN load generator (and a protocol-free reference relay).
//!
//! N clients each allocate on a TURN server with REST credentials, bind a
//! channel (or install a permission for Send/Data indications) to an echo
//! peer this program runs on its own thread, then send fixed-size messages
//! through the relay for a warm-up and a timed window. Each payload carries
//! its send time, so the echo gives the round-trip time. Sockets are
//! non-blocking and driven by epoll; UDP uses recvmmsg/sendmmsg in the clients
//! and in the peer. TCP and TLS streams are framed with `turnd::stun::frame_len`,
//! so several messages in one read or one TLS record are all counted.
//!
//! Reported for the timed window: offered messages/s, forwarded packets/s
//! (what the server sent: to the peer plus back to the clients, two per echoed
//! message), loss, round-trip percentiles, and with `--server-pid` the
//! server's CPU time (utime+stime from /proc/PID/stat) per forwarded packet.
//!
//! `--floor-relay LISTEN --floor-peer PEER` instead runs the simplest relay
//! there is (one thread, recvmmsg/sendmmsg, no protocol: one relay socket per
//! client, as TURN has), which `--raw` clients drive, to show the kernel's
//! floor on this machine. See benches/README.md.
//!
//! `--scale N` instead holds N allocations at once (the capacity
//! targets): the authenticated setup rate, and the server's RSS and
//! descriptors per allocation; see `scale.rs` beside this file.
//!
//! Everything is bounded: setup requests time out, the run lasts warm-up +
//! duration + a short drain, and at most 10,000 clients (scale mode has its
//! own bounds).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use turnd::auth::{rest_password, rest_username};
use turnd::net::batch::{from_storage, to_storage};
use turnd::stun::integrity::long_term_key;
use turnd::stun::{attr, frame_len, method, ChannelData, Class, FrameLen, Message, MessageWriter};

/// `--scale N`: many allocations held at once (benches/loadgen/scale.rs).
mod conn;
mod floor;
mod batch_io;
mod flows;
mod participants;
mod peer;
mod scale;
mod setup;
mod stats;
mod traffic;

use conn::*;
use floor::*;
use batch_io::*;
use flows::*;
use peer::*;
use setup::*;
use stats::*;
use traffic::*;

/// Bytes at the end of every payload: send time (ns since start), the
/// client's sequence number, client index, run tag. At the end so that a
/// FINGERPRINT can be finished from a CRC state cached over everything before.
const STAMP: usize = 24;
const MAX_CLIENTS: usize = 10_000;
/// Requested lifetimes are 600 s (allocation) and 300 s (permission); runs are
/// kept shorter so that no refresh is needed.
const MAX_RUN_SECS: f64 = 280.0;
/// Socket buffers asked for (the kernel caps them at net.core.[rw]mem_max).
const SOCK_BUF: usize = 4 << 20;
const CHANNEL: u16 = 0x4000;
/// After the window, wait this long at most for the last echoes.
const DRAIN: Duration = Duration::from_millis(1000);
/// At rate 0, a client that has heard nothing for this long is assumed to
/// have lost what it had in flight, so the window does not stall.
const STALL_NS: u64 = 100_000_000;

#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", about = "TURN load generator: N allocations relaying to an echo peer; see benches/README.md")]
struct Args {
    /// TURN server address.
    #[arg(long, default_value = "127.0.0.1:3478")]
    server: SocketAddr,
    /// TURN REST shared secret (coturn's static-auth-secret).
    #[arg(long)]
    secret: Option<String>,
    /// User part of the REST username (EXPIRY:USER).
    #[arg(long, default_value = "loadgen")]
    user: String,
    /// Number of allocations (one socket or connection each).
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Send/Data indications instead of a channel.
    #[arg(long)]
    indications: bool,
    /// Reach the server over TCP.
    #[arg(long, conflicts_with = "tls")]
    tcp: bool,
    /// Reach the server over TLS (certificate not verified).
    #[arg(long)]
    tls: bool,
    /// No TURN at all: send bare payloads to --server (a --floor-relay).
    #[arg(long, conflicts_with_all = ["tcp", "tls", "indications"])]
    raw: bool,
    /// No server at all: bare payloads straight to the echo peer, the
    /// generator's own round trip (what a relay's latency is measured against).
    #[arg(long, conflicts_with_all = ["tcp", "tls", "indications", "raw"])]
    direct: bool,
    /// Messages per second offered in total; 0 = as fast as the window allows.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// At --rate 0: messages in flight per client.
    #[arg(long, default_value_t = 16)]
    window: u32,
    /// Payload bytes per message (at least 24).
    #[arg(long, default_value_t = 1200)]
    size: usize,
    /// Length of the timed window, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Traffic before the timed window, seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Address of the echo peer (not the relay's own address).
    #[arg(long, default_value = "127.0.0.2")]
    peer_ip: IpAddr,
    /// Port of the echo peer; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    peer_port: u16,
    /// The server's process id, for CPU time per forwarded packet.
    #[arg(long)]
    server_pid: Option<u32>,
    /// CPUs (e.g. 0,1) whose /proc/stat times over the window go into the
    /// JSON's `cpu_stat`: all their programs' and the kernel's softirq work.
    #[arg(long, value_delimiter = ',')]
    cpu_stat: Vec<usize>,
    /// UDP GSO (UDP_SEGMENT) for the clients' and the echo peer's sends:
    /// each burst to one address crosses the stack once, which makes the
    /// generator cheaper; the server still receives separate datagrams.
    #[arg(long)]
    gso: bool,
    /// With --indications: add FINGERPRINT to each Send indication (as
    /// turnutils_uclient does), so the server checks a CRC-32 per message.
    #[arg(long, requires = "indications")]
    fingerprint: bool,
    /// Most messages per sendmmsg/recvmmsg.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// At a fixed rate: the pacing interval, microseconds.
    #[arg(long, default_value_t = 200)]
    tick_us: u64,
    /// How long to wait for the server to answer at all, seconds.
    #[arg(long, default_value_t = 5.0)]
    ready_timeout: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// A free-form label copied into the JSON (e.g. the server's name).
    #[arg(long, default_value = "")]
    label: String,
    /// Run the protocol-free reference relay on this address instead.
    #[arg(long)]
    floor_relay: Option<SocketAddr>,
    /// The echo peer the reference relay forwards to.
    #[arg(long, requires = "floor_relay")]
    floor_peer: Option<SocketAddr>,
    /// The reference relay exits after this many seconds.
    #[arg(long, default_value_t = 900)]
    floor_max_secs: u64,
    /// Scale mode: hold N allocations (one UDP socket each, over worker
    /// processes and --scale-ips source addresses), each set up with
    /// Allocate (401), Allocate, CreatePermission and ChannelBind; report the
    /// setup rate, and with --server-pid the server's RSS per allocation and
    /// descriptors. See benches/README.md.
    #[arg(long, conflicts_with_all = ["tcp", "tls", "raw", "indications", "floor_relay"])]
    scale: Option<usize>,
    /// Scale: setups in progress at once, over all worker processes.
    #[arg(long, default_value_t = 1024)]
    scale_window: usize,
    /// Scale: source addresses for the client sockets ("A-B" ranges and/or a comma list).
    #[arg(long, default_value = "127.0.0.10-127.0.0.50")]
    scale_ips: String,
    /// Scale: worker processes (at least what RLIMIT_NOFILE's hard limit requires).
    #[arg(long, default_value_t = 0)]
    scale_procs: usize,
    /// Scale: "full" (Allocate 401, Allocate, CreatePermission, ChannelBind) or "allocate" (the first two).
    #[arg(long, default_value = "full")]
    scale_steps: String,
    /// Scale: "unique" (a REST user per allocation, USER-INDEX) or "shared" (all the same --user).
    #[arg(long, default_value = "unique")]
    scale_users: String,
    /// Scale: once all are held, send one ChannelData per allocation through the echo peer and count the echoes.
    #[arg(long)]
    scale_data: bool,
    /// Scale: leave the allocations in place at the end (no Refresh 0).
    #[arg(long)]
    scale_no_teardown: bool,
    /// Scale: seconds to wait after setup before reading the server's memory.
    #[arg(long, default_value_t = 1.0)]
    scale_hold: f64,
    /// Scale: bound on each phase (setup, data, teardown), seconds.
    #[arg(long, default_value_t = 120.0)]
    scale_timeout: f64,
    /// Scale: also write the JSON result to this file (the text report still goes to stdout).
    #[arg(long)]
    scale_json: Option<std::path::PathBuf>,
    /// Scale, internal: run as a worker process of the coordinator.
    #[arg(long, hide = true)]
    scale_worker: bool,
    #[arg(long, hide = true, default_value_t = 0)]
    scale_id: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    scale_offset: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    scale_count: usize,
    #[arg(long, hide = true)]
    scale_peer: Option<SocketAddr>,
    #[arg(long, hide = true, default_value_t = 0)]
    scale_expiry: u64,
    /// Participants mode: N simulated video participants (frame bursts and
    /// audio, see participants.rs) for one --warmup + --duration window.
    #[arg(long, conflicts_with_all = ["raw", "direct", "indications", "floor_relay", "scale"])]
    participants: Option<usize>,
    /// Participants mode: find the largest N that meets --max-loss and
    /// --max-p99-ms, in short steps (--step-warmup + --step-duration each).
    #[arg(long, conflicts_with_all = ["participants", "raw", "direct", "indications", "floor_relay", "scale"])]
    participants_search: bool,
    /// Participants: video frames per second per participant.
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// Participants: packets per video frame (1200 bytes each).
    #[arg(long, default_value_t = 9)]
    frame_pkts: usize,
    /// Participants: audio packets per second per participant (100-160 bytes).
    #[arg(long, default_value_t = 50)]
    audio_pps: u32,
    /// Participants: each frame and audio packet leaves up to this much
    /// early or late (uniform), milliseconds.
    #[arg(long, default_value_t = 2.0)]
    jitter_ms: f64,
    /// Participants: each payload starts with an RTP header, as SRTP leaves
    /// it in the clear (video payload type 96 at 90 kHz, audio 111 at 48
    /// kHz, an SSRC per stream, sequence numbers in order, timestamps from
    /// the send time): what the relay's per-call health bookkeeping reads.
    /// Without it the payload is not RTP and only its first byte is looked at.
    #[arg(long)]
    rtp: bool,
    /// Search: the first N tried (then doubled until a step fails, then bisected).
    #[arg(long, default_value_t = 50)]
    search_start: usize,
    /// Search: the largest N tried.
    #[arg(long, default_value_t = 1500)]
    search_max: usize,
    /// Search: most steps.
    #[arg(long, default_value_t = 12)]
    search_steps: usize,
    /// Search: no new step starts after this many seconds.
    #[arg(long, default_value_t = 150.0)]
    search_secs: f64,
    /// Search: seconds of traffic before each step's window.
    #[arg(long, default_value_t = 1.0)]
    step_warmup: f64,
    /// Search: each step's timed window, seconds.
    #[arg(long, default_value_t = 3.0)]
    step_duration: f64,
    /// Search: a step passes with at most this loss, percent.
    #[arg(long, default_value_t = 0.5)]
    max_loss: f64,
    /// Search: and at most this p99 round trip through the relay, milliseconds.
    #[arg(long, default_value_t = 20.0)]
    max_p99_ms: f64,
    /// Per-flow accounting (UDP): every datagram's flow and sequence number
    /// are recorded at the peer and back at the client, for exact loss each
    /// way, duplicates, and each flow's longest gap between arrivals.
    #[arg(long, conflicts_with_all = ["raw", "direct", "scale", "participants", "participants_search", "floor_relay"])]
    flows: bool,
    /// Run the command given after `--` this many seconds into the timed
    /// window, and probe with Allocates for the server process that answers
    /// afterwards (see flows.rs and benches/upgrade.sh).
    #[arg(long, requires = "flows")]
    exec_at: Option<f64>,
    /// With --exec-at: the probe counts a success as the new process's when it
    /// carries this SOFTWARE; without it, any success after the command returned.
    #[arg(long, requires = "exec_at")]
    probe_software: Option<String>,
    /// With --exec-at: milliseconds between the probe's Allocates.
    #[arg(long, default_value_t = 2.0)]
    probe_interval_ms: f64,
    /// The command --exec-at runs, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
    /// Ignored: `cargo bench` appends it.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let mut args = Args::parse();
    // `cargo bench -- ARGS -- CMD` appends --bench after the command.
    if args.command.last().is_some_and(|a| a == "--bench") {
        args.command.pop();
        args.bench = true;
    }
    let r = if args.scale_worker {
        scale::worker(&args)
    } else if args.scale.is_some() {
        scale::run(&args)
    } else {
        match args.floor_relay {
            Some(listen) => floor_relay(listen, &args),
            None if args.participants.is_some() || args.participants_search => participants::run(&args),
            None => run(&args),
        }
    };
    if let Err(e) = r {
        eprintln!("loadgen: {e:#}");
        std::process::exit(1);
    }
}


#[derive(Clone, Copy, Default)]
struct Snap {
    t_ns: u64,
    server_cpu: Option<f64>,
    own_cpu: Option<f64>,
    /// Time the server's and the generator's threads waited for a CPU.
    server_wait: Option<f64>,
    own_wait: Option<f64>,
    peer_rx: u64,
    rx: u64,
    sent: u64,
}

fn run(args: &Args) -> Result<()> {
    let mut args = args.clone();
    if args.direct {
        args.raw = true;
    }
    let args = &mut args;
    let kind = if args.tls {
        Kind::Tls
    } else if args.tcp {
        Kind::Tcp
    } else {
        Kind::Udp
    };
    if args.clients == 0 || args.clients > MAX_CLIENTS {
        bail!("--clients must be 1..={MAX_CLIENTS}");
    }
    if args.size < STAMP || args.size > 8192 {
        bail!("--size must be {STAMP}..=8192");
    }
    if args.duration.is_nan() || args.duration <= 0.0 || args.warmup.is_nan() || args.warmup < 0.0 || args.duration + args.warmup > MAX_RUN_SECS {
        bail!("--duration must be positive and --warmup + --duration at most {MAX_RUN_SECS} s (no refreshes are sent)");
    }
    if args.batch == 0 || args.batch > 1024 || args.window == 0 || args.window > 4096 {
        bail!("--batch must be 1..=1024 and --window 1..=4096");
    }
    if !args.raw && args.secret.is_none() {
        bail!("--secret is required (or --raw for a protocol-free relay)");
    }
    if args.peer_ip == args.server.ip() && !args.direct {
        bail!("--peer-ip must differ from the server's address (relays refuse their own address)");
    }
    match args.exec_at {
        Some(at) if !(at >= 0.0 && at < args.duration) => bail!("--exec-at must be within the timed window (0 to --duration)"),
        Some(_) if args.command.is_empty() => bail!("--exec-at needs the command after `--`"),
        None if !args.command.is_empty() => bail!("a command after `--` needs --exec-at"),
        _ => {}
    }
    if args.flows && kind != Kind::Udp {
        bail!("--flows is for UDP clients");
    }
    let cap = args.size + 128;
    let tag = (SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u32) ^ std::process::id().rotate_left(16);
    let peer_flows = args.flows.then(|| Arc::new(PeerFlows::new(args.clients, tag)));
    let peer = Peer::start_with(args.peer_ip, args.peer_port, args.batch, cap, args.gso, None, peer_flows.clone())?;
    if args.direct {
        args.server = peer.addr;
    }

    // --- setup ---
    let setup_start = Instant::now();
    let ready = Duration::from_secs_f64(args.ready_timeout);
    if !args.raw {
        wait_ready(args.server, kind, ready)?;
    }
    let tls = if kind == Kind::Tls { Some(tls_config()?) } else { None };
    let unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let creds = args.secret.as_ref().map(|secret| {
        let username = rest_username(unix + 3600, Some(&args.user));
        let password = rest_password(secret.as_bytes(), &username);
        Creds { username, password }
    });
    let mut tids = 0u64;
    let mut clients = Vec::with_capacity(args.clients);
    let payload = {
        let mut p = vec![0x5au8; args.size];
        p[args.size - STAMP..].fill(0);
        p
    };
    let stamp_at = args.size - STAMP;
    for i in 0..args.clients {
        let mut conn = Conn::connect(args.server, kind, tls.as_ref(), Instant::now() + ready)
            .with_context(|| format!("client {i}: connect"))?;
        let (session, tmpl, off) = if args.raw {
            (None, payload.clone(), stamp_at)
        } else {
            let (s, relayed) = setup_turn(&mut conn, creds.as_ref().unwrap(), peer.addr, args.indications, &mut tids)
                .with_context(|| format!("client {i}"))?;
            if let Some(pf) = &peer_flows {
                pf.set_relayed(i, relayed);
            }
            if args.indications {
                let m = build(method::SEND, Class::Indication, next_tid(&mut tids), |w| {
                    w.xor_address(attr::XOR_PEER_ADDRESS, peer.addr).attr(attr::DATA, &payload);
                    if args.fingerprint {
                        w.fingerprint();
                    }
                });
                let fp = if args.fingerprint { 8 } else { 0 };
                let data_at = m.len() - fp - ((args.size + 3) & !3);
                (Some(s), m, data_at + stamp_at)
            } else {
                let mut m = ChannelData::header(CHANNEL, args.size).to_vec();
                m.extend_from_slice(&payload);
                if conn.is_stream() {
                    // RFC 8656 12.5: ChannelData is padded to 4 on streams.
                    m.resize((m.len() + 3) & !3, 0);
                }
                (Some(s), m, 4 + stamp_at)
            }
        };
        let crc_prefix = (args.fingerprint && args.indications).then(|| crc32_update(!0, &tmpl[..off]));
        if let Link::Tls(_, t) = &mut conn.link {
            t.set_buffer_limit(None);
        }
        match &conn.link {
            Link::Udp(s) => s.set_nonblocking(true)?,
            Link::Tcp(s) | Link::Tls(s, _) => s.set_nonblocking(true)?,
        }
        clients.push(Client { conn, tmpl, off, crc_prefix, sent_seq: 0, rx_seq: 0, last_rx_ns: 0, session });
    }
    let setup_secs = setup_start.elapsed().as_secs_f64();

    // --- data ---
    let mut ep = Epoll::new(args.clients + 2)?;
    let stream = kind != Kind::Udp;
    for (i, c) in clients.iter().enumerate() {
        let ev = if stream { (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32 } else { libc::EPOLLIN as u32 };
        ep.add(c.conn.fd(), ev, i as u64)?;
    }
    const TICK: u64 = u64::MAX;
    let ticker = if args.rate > 0 {
        let t = Ticker::new(Duration::from_micros(args.tick_us.max(10)))?;
        ep.add(t.0, libc::EPOLLIN as u32, TICK)?;
        Some(t)
    } else {
        None
    };
    let mut g = Gen {
        args,
        gso: args.gso && kind == Kind::Udp,
        tag,
        base: Instant::now(),
        clients,
        c: Counters::default(),
        hist: Histogram::new(),
        win: Window { start_ns: u64::MAX, end_ns: u64::MAX },
        flows: args.flows.then(|| FlowLog::new(args.clients)),
    };
    let pid = args.server_pid.map(|p| p.to_string());
    let snap = |g: &Gen, t_ns: u64| Snap {
        t_ns,
        server_cpu: pid.as_deref().and_then(cpu_seconds),
        own_cpu: cpu_seconds("self"),
        server_wait: pid.as_deref().and_then(sched_wait_seconds),
        own_wait: sched_wait_seconds("self"),
        peer_rx: peer.rx.load(Ordering::Relaxed),
        rx: g.c.rx,
        sent: g.c.sent,
    };
    let warm_ns = (args.warmup * 1e9) as u64;
    let end_ns = warm_ns + (args.duration * 1e9) as u64;
    let exec = match args.exec_at {
        Some(at) => Some(Exec::start(
            ExecPlan {
                command: args.command.clone(),
                at_ns: warm_ns + (at * 1e9) as u64,
                until_ns: end_ns,
                server: args.server,
                creds: creds.as_ref().map(|c| (c.username.clone(), c.password.clone())),
                marker: args.probe_software.clone().map_or(Marker::AfterReturn, Marker::Software),
                interval: Duration::from_secs_f64(args.probe_interval_ms.max(0.0) / 1e3),
            },
            g.base,
        )?),
        None => None,
    };
    let (mut s0, mut s1) = (None::<Snap>, None::<Snap>);
    let (mut cpus0, mut cpus1) = (None, None);
    let mut m = Mmsg::new(args.batch, cap);
    let mut scratch = vec![0u8; 1 << 16];
    let n = g.clients.len();
    let refill_min = (args.window / 2).max(1);
    let mut rr = 0usize;
    // After a stall (the generator descheduled) catch up at most 2 ms worth at
    // once, so the server is not hit by a burst the offered rate never had.
    let max_burst = (args.rate / 500).max(n as u64 * 4);
    let mut drain_deadline = None::<u64>;
    let udp_drops0 = udp_rcvbuf_errors();
    loop {
        let now = g.now_ns();
        // Phases: warm-up, timed window, drain.
        if s0.is_none() && now >= warm_ns {
            g.win.start_ns = now;
            s0 = Some(snap(&g, now));
            cpus0 = cpu_times(&args.cpu_stat);
            if let Some(f) = &mut g.flows {
                f.start(now);
            }
            if let Some(pf) = &peer_flows {
                pf.log.lock().unwrap().start(pf.to_own(g.base, now));
            }
        }
        if s1.is_none() && now >= end_ns {
            g.win.end_ns = now;
            s1 = Some(snap(&g, now));
            cpus1 = cpu_times(&args.cpu_stat);
            drain_deadline = Some(now + DRAIN.as_nanos() as u64);
        }
        // (With --flows every echo counts, not only the window's.)
        if let Some(d) = drain_deadline
            && (now >= d || if args.flows { g.c.rx >= g.c.sent } else { g.c.rx_window >= g.c.sent_window })
        {
            break;
        }
        let sending = drain_deadline.is_none();
        let in_window = s0.is_some() && s1.is_none();
        // Offer load.
        let mut more_to_send = false;
        if sending && args.rate == 0 {
            for ci in 0..n {
                let cl = &mut g.clients[ci];
                if cl.inflight() == 0 {
                    cl.last_rx_ns = now;
                } else if now.saturating_sub(cl.last_rx_ns) > STALL_NS {
                    // Nothing back for a while: presume all of it lost (loss
                    // is counted from the window totals, not here).
                    cl.rx_seq = cl.sent_seq;
                    cl.last_rx_ns = now;
                }
                if cl.conn.closed || (cl.conn.pending() && !cl.conn.flush()) {
                    continue; // a stream still blocked on earlier data
                }
                let deficit = args.window.saturating_sub(cl.inflight());
                if deficit >= refill_min {
                    let k = (deficit as usize).min(args.batch);
                    g.send(ci, k, now, in_window, &mut m);
                }
            }
        } else if sending {
            let target = (args.rate as u128 * now as u128 / 1_000_000_000) as u64;
            let mut due = target.saturating_sub(g.c.sent + g.c.unsent + g.c.skipped);
            if due > max_burst {
                // Too far behind (a stall): skip rather than burst.
                g.c.skipped += due - max_burst;
                due = max_burst;
            }
            let per = due / n as u64;
            let extra = (due % n as u64) as usize;
            for j in 0..n {
                let ci = (rr + j) % n;
                let mut k = per + (j < extra) as u64;
                while k > 0 {
                    let b = k.min(args.batch as u64) as usize;
                    let sent = g.send(ci, b, now, in_window, &mut m);
                    if sent < b {
                        // The rest of this share is dropped (counted in send()).
                        g.c.unsent += k - b as u64;
                        k = 0;
                    } else {
                        k -= b as u64;
                    }
                }
            }
            rr = (rr + extra) % n;
        }
        if sending && args.rate == 0 {
            // (A stream still blocked on earlier data waits for EPOLLOUT instead.)
            more_to_send = g
                .clients
                .iter()
                .any(|c| !c.conn.closed && !c.conn.pending() && args.window.saturating_sub(c.inflight()) >= refill_min);
        }
        let timeout = if more_to_send { 0 } else { 1 };
        let k = ep.wait(timeout);
        for i in 0..k {
            let (tok, _ev) = ep.event(i);
            if tok == TICK {
                if let Some(t) = &ticker {
                    t.clear();
                }
                continue;
            }
            g.receive(tok as usize, &mut m, &mut scratch);
        }
        if g.clients.iter().all(|c| c.conn.closed) {
            bail!("the server closed every connection");
        }
    }
    let closed = g.clients.iter().filter(|c| c.conn.closed).count();
    let udp_drops = udp_drops0.zip(udp_rcvbuf_errors()).map(|(a, b)| b.saturating_sub(a));
    let exec = exec.map(Exec::finish);

    // --- teardown: Refresh(0) on UDP, best effort; streams just close ---
    if !args.raw && kind == Kind::Udp {
        deallocate(&g.clients, creds.as_ref().unwrap(), &mut tids);
    }
    let (peer_rx, peer_tx) = peer_stop(peer);

    let (s0, s1) = match (s0, s1) {
        (Some(a), Some(b)) => (a, b),
        _ => bail!("the run ended before its timed window"),
    };
    let flows = match (g.flows.as_mut(), &peer_flows) {
        (Some(cl), Some(pf)) => {
            let sent: Vec<u64> = g.clients.iter().map(|c| c.sent_seq).collect();
            // Gap starts are given from the command, or else from the window's start.
            let mark = exec.as_ref().and_then(|e| e["at_ns"].as_u64()).unwrap_or(g.win.start_ns);
            let mut j = report_flows(cl, pf, &sent, g.base, g.win.end_ns, mark);
            j["kernel_udp_rcvbuf_drops"] = udp_drops.into();
            Some(j)
        }
        _ => None,
    };
    let cpu_stat = match (cpus0, cpus1) {
        (Some(a), Some(b)) if !args.cpu_stat.is_empty() => {
            let per = |(c, (a, b)): (&usize, (&[f64; 8], &[f64; 8]))| {
                let f: serde_json::Map<_, _> = CPU_STAT_FIELDS.iter().zip(a.iter().zip(b)).map(|(n, (x, y))| (n.to_string(), (y - x).into())).collect();
                (format!("cpu{c}"), serde_json::Value::Object(f))
            };
            Some(serde_json::Value::Object(args.cpu_stat.iter().zip(a.iter().zip(b.iter())).map(per).collect()))
        }
        _ => None,
    };
    let extra = Extra { flows, exec, cpu_stat, totals: (peer_rx, g.c.rx) };
    report(args, kind, &g, s0, s1, setup_secs, closed, peer_rx.saturating_sub(peer_tx), extra)
}

/// What --flows, --exec-at and --cpu-stat add to the report.
struct Extra {
    flows: Option<serde_json::Value>,
    exec: Option<serde_json::Value>,
    /// `--cpu-stat`: each CPU's /proc/stat times over the window, seconds.
    cpu_stat: Option<serde_json::Value>,
    /// Datagrams the echo peer and the clients received over the whole run
    /// (setup, warm-up and drain too; data only).
    totals: (u64, u64),
}

/// Refresh with LIFETIME 0 for every UDP client, best effort (streams simply close).
fn deallocate(clients: &[Client], creds: &Creds, tids: &mut u64) {
    for cl in clients {
        if let (Some(s), Link::Udp(u)) = (&cl.session, &cl.conn.link) {
            let req = build(method::REFRESH, Class::Request, next_tid(tids), |w| {
                w.u32(attr::LIFETIME, 0)
                    .attr(attr::USERNAME, creds.username.as_bytes())
                    .attr(attr::REALM, s.realm.as_bytes())
                    .attr(attr::NONCE, &s.nonce)
                    .integrity(&s.key)
                    .fingerprint();
            });
            let _ = u.send(&req);
        }
    }
    std::thread::sleep(Duration::from_millis(50));
}

/// Stops the peer thread; returns its totals.
fn peer_stop(p: Peer) -> (u64, u64) {
    let r = (p.rx.load(Ordering::Relaxed), p.tx.load(Ordering::Relaxed));
    drop(p);
    r
}

#[allow(clippy::too_many_arguments)]
fn report(args: &Args, kind: Kind, g: &Gen, s0: Snap, s1: Snap, setup_secs: f64, closed: usize, peer_unechoed: u64, extra: Extra) -> Result<()> {
    let secs = (s1.t_ns - s0.t_ns) as f64 / 1e9;
    let to_peer = (s1.peer_rx - s0.peer_rx) as f64;
    let to_client = (s1.rx - s0.rx) as f64;
    let forwarded = to_peer + to_client;
    let offered = (s1.sent - s0.sent) as f64 / secs;
    let loss = if g.c.sent_window > 0 { 100.0 * (1.0 - g.c.rx_window as f64 / g.c.sent_window as f64) } else { 0.0 };
    let server_cpu = match (s0.server_cpu, s1.server_cpu) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let own_cpu = match (s0.own_cpu, s1.own_cpu) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let us = |q: f64| g.hist.quantile(q).map(|ns| ns as f64 / 1000.0);
    let transport = match kind {
        Kind::Udp => "udp",
        Kind::Tcp => "tcp",
        Kind::Tls => "tls",
    };
    let mode = if args.direct {
        "direct"
    } else if args.raw {
        "raw"
    } else if args.indications {
        "indications"
    } else {
        "channel"
    };
    let cpu_per_pkt = server_cpu.filter(|_| forwarded > 0.0).map(|c| c * 1e6 / forwarded);
    let j = serde_json::json!({
        "label": args.label,
        "server": args.server.to_string(),
        "transport": transport,
        "mode": mode,
        "clients": args.clients,
        "size": args.size,
        "rate": args.rate,
        "window": if args.rate == 0 { Some(args.window) } else { None },
        "gso": args.gso,
        "fingerprint": args.fingerprint,
        "warmup_s": args.warmup,
        "duration_s": secs,
        "setup_s": setup_secs,
        "offered_mps": offered,
        "forwarded_pps": forwarded / secs,
        "to_peer_pps": to_peer / secs,
        "to_client_pps": to_client / secs,
        "sent_window": g.c.sent_window,
        "echoed_window": g.c.rx_window,
        "loss_pct": loss,
        "unsent": g.c.unsent,
        "skipped": g.c.skipped,
        "stray": g.c.stray,
        "peer_unechoed": peer_unechoed,
        "closed_connections": closed,
        "rtt_us": {
            "p50": us(0.50), "p99": us(0.99), "p999": us(0.999),
            "max": if g.hist.total > 0 { Some(g.hist.max as f64 / 1000.0) } else { None },
            "mean": if g.hist.total > 0 { Some(g.hist.sum as f64 / g.hist.total as f64 / 1000.0) } else { None },
        },
        "server_pid": args.server_pid,
        "server_cpu_pct": server_cpu.map(|c| 100.0 * c / secs),
        "server_cpu_us_per_pkt": cpu_per_pkt,
        "loadgen_cpu_pct": own_cpu.map(|c| 100.0 * c / secs),
        // Of the process --server-pid names: after an upgrade or a restart, the first one's (up to its end).
        "server_wait_pct": s0.server_wait.zip(s1.server_wait).map(|(a, b)| 100.0 * (b - a) / secs),
        "loadgen_wait_pct": s0.own_wait.zip(s1.own_wait).map(|(a, b)| 100.0 * (b - a) / secs),
        "to_peer_total": extra.totals.0,
        "to_client_total": extra.totals.1,
        "cpu_stat": extra.cpu_stat,
        "flows": extra.flows,
        "exec": extra.exec,
    });
    if args.json {
        println!("{j}");
        return Ok(());
    }
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.1}"));
    println!(
        "loadgen: {transport} {mode}, {} clients, {} B, {}, {:.1} s window after {:.1} s warm-up (setup {:.2} s)",
        args.clients,
        args.size,
        if args.rate == 0 { format!("rate 0 (window {}/client)", args.window) } else { format!("rate {} msgs/s", args.rate) },
        secs,
        args.warmup,
        setup_secs
    );
    println!("offered      {offered:.0} msgs/s");
    println!("forwarded    {:.0} pkts/s  (to peer {:.0}, to clients {:.0})", forwarded / secs, to_peer / secs, to_client / secs);
    println!(
        "loss         {loss:.3} %  (sent {}, echoed {}; not taken by the socket {}, skipped by a stalled pacer {})",
        g.c.sent_window, g.c.rx_window, g.c.unsent, g.c.skipped
    );
    println!(
        "rtt µs       p50 {}  p99 {}  p99.9 {}  max {}",
        f(us(0.5)),
        f(us(0.99)),
        f(us(0.999)),
        f((g.hist.total > 0).then(|| g.hist.max as f64 / 1000.0))
    );
    match (server_cpu, cpu_per_pkt) {
        (Some(c), Some(p)) => println!("server cpu   {:.1} % of a core, {p:.2} µs per forwarded packet", 100.0 * c / secs),
        _ => println!("server cpu   - (give --server-pid)"),
    }
    println!("loadgen cpu  {} % (generator and echo peer)", f(own_cpu.map(|c| 100.0 * c / secs)));
    if closed > 0 {
        println!("warning      {closed} connections closed by the server");
    }
    if let Some(fl) = j["flows"].as_object() {
        for (dir, name) in [("to_peer", "to peer"), ("to_client", "to client")] {
            let d = &fl[dir];
            println!(
                "{name:<12} lost {} of {}, {} duplicates, {} misrouted; longest gap {} ms (median flow {} ms), {} flows stopped",
                d["lost"], d["expected"], d["duplicates"], d["misrouted"], d["gap_ms"]["max"], d["gap_ms"]["p50"], d["flows_stopped"]
            );
        }
    }
    if let Some(e) = j["exec"].as_object() {
        println!("command      {} (exit {}, returned after {} ms): {}", e["command"], e["exit_code"], e["returned_ms"], e["output"]);
        if let Some(p) = e["probe"].as_object() {
            println!(
                "probe        first Allocate answered by the new process {} ms after the command ({} probes: {} old, {} new, {} refused, {} timed out)",
                p["first_new_answer_ms"], p["sent"], p["answered_old"], p["answered_new"], p["refused"], p["timeouts"]
            );
        }
    }
    Ok(())
}

