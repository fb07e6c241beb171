//! Scale mode (`--scale N`): the capacity targets.
//!
//! N allocations, each from its own UDP socket, each doing the full
//! authenticated setup: Allocate (answered 401) -> Allocate with
//! MESSAGE-INTEGRITY -> CreatePermission -> ChannelBind, pipelined (up to
//! `--scale-window` setups in progress at once, across all processes). While
//! all N are held, the server's VmRSS, VmHWM and open descriptors are read
//! from /proc, then (with `--scale-data`) one ChannelData per allocation goes
//! through the relay to the echo peer and back, and finally every allocation
//! is released with Refresh(LIFETIME 0).
//!
//! One process cannot hold more sockets than its RLIMIT_NOFILE, so the
//! clients are spread over worker processes (this same program, started with
//! `--scale-worker`), each with at most hard limit - 64 sockets, and over
//! several loopback source addresses (`--scale-ips`) so that no address runs
//! out of ephemeral ports. The coordinator (this process) runs the echo peer,
//! talks to the workers over their stdin/stdout (one JSON line per phase),
//! starts them together and merges their results; times come from
//! CLOCK_MONOTONIC, which all processes share.
//!
//! Each client socket is connected to the server, non-blocking, and
//! registered in the worker's epoll; a worker sends one request per system
//! call (sendmmsg cannot batch across sockets) and reads one answer per ready
//! event. Retransmissions follow RFC 8489's doubling from 500 ms; a step not
//! answered within 6 s fails as a timeout. Everything is bounded by
//! `--scale-timeout` per phase.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write as _};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;

use serde_json::{json, Value};

use super::*;

/// Most allocations one run asks for.
const MAX_SCALE: usize = 1_000_000;
/// Descriptors a worker keeps for itself (epoll, pipes, stdio) besides its sockets.
const FD_RESERVE: u64 = 64;
const RTO_NS: u64 = 500_000_000;
const RTO_MAX_NS: u64 = 2_000_000_000;
/// A step with no answer this long after its first send fails (4 sends: 0, 0.5, 1.5, 3.5 s).
const STEP_TIMEOUT_NS: u64 = 6_000_000_000;
/// How often the retransmission timers are looked at.
const SCAN_NS: u64 = 5_000_000;
/// A ChannelData not echoed within this long counts as lost.
const DATA_TIMEOUT_NS: u64 = 2_000_000_000;
const DATA_LEN: usize = 32;
/// 438 Stale Nonce answers followed per step before giving up.
const MAX_STALE: u8 = 3;

fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Raises the soft RLIMIT_NOFILE as far as the hard limit allows; returns (soft, hard).
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
fn raise_nofile() -> (u64, u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: r is a valid rlimit to write.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    let mut hard = r.rlim_max as u64;
    if r.rlim_max == libc::RLIM_INFINITY {
        // NOFILE can never go past fs.nr_open.
        hard = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20);
    }
    if (r.rlim_cur as u64) < hard {
        let want = libc::rlimit { rlim_cur: hard as libc::rlim_t, rlim_max: r.rlim_max };
        // SAFETY: want is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            r.rlim_cur = hard as libc::rlim_t;
        }
    }
    (r.rlim_cur as u64, hard)
}

/// "127.0.0.10-127.0.0.50", "127.0.0.10,127.0.0.11" or a mix.
fn parse_ips(s: &str) -> Result<Vec<Ipv4Addr>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: Ipv4Addr = a.trim().parse().with_context(|| format!("--scale-ips: {a}"))?;
                let b: Ipv4Addr = b.trim().parse().with_context(|| format!("--scale-ips: {b}"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a || b - a > 4096 {
                    bail!("--scale-ips: bad range {part}");
                }
                v.extend((a..=b).map(Ipv4Addr::from));
            }
            None => v.push(part.parse().with_context(|| format!("--scale-ips: {part}"))?),
        }
    }
    if v.is_empty() {
        bail!("--scale-ips: no address");
    }
    Ok(v)
}

// ---------------------------------------------------------------------------
// /proc readings of the server

#[derive(Clone, Copy, Default, Debug)]
struct ServerSnap {
    rss_kb: u64,
    hwm_kb: u64,
    threads: u64,
    fds: u64,
    cpu_s: f64,
}

fn status_field(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

impl ServerSnap {
    fn read(pid: Option<u32>) -> Option<ServerSnap> {
        let pid = pid?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
        Some(ServerSnap {
            rss_kb: status_field(&status, "VmRSS:")?,
            hwm_kb: status_field(&status, "VmHWM:").unwrap_or(0),
            threads: status_field(&status, "Threads:").unwrap_or(0),
            fds,
            cpu_s: cpu_seconds(&pid.to_string()).unwrap_or(0.0),
        })
    }
    fn json(&self) -> Value {
        json!({"rss_kb": self.rss_kb, "hwm_kb": self.hwm_kb, "threads": self.threads, "fds": self.fds, "cpu_s": self.cpu_s})
    }
}

/// A field of /proc/meminfo in kB (system-wide).
fn meminfo_kb(name: &str) -> Option<u64> {
    status_field(&std::fs::read_to_string("/proc/meminfo").ok()?, name)
}

// ---------------------------------------------------------------------------
// The worker: a share of the clients

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    /// Allocate without credentials, answered 401 with REALM and NONCE.
    Challenge,
    Allocate,
    Permission,
    Bind,
    /// Refresh with LIFETIME 0.
    Release,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Challenge => "Allocate(401)",
            Step::Allocate => "Allocate",
            Step::Permission => "CreatePermission",
            Step::Bind => "ChannelBind",
            Step::Release => "Refresh(0)",
        }
    }
    fn method(self) -> u16 {
        match self {
            Step::Challenge | Step::Allocate => method::ALLOCATE,
            Step::Permission => method::CREATE_PERMISSION,
            Step::Bind => method::CHANNEL_BIND,
            Step::Release => method::REFRESH,
        }
    }
}

const SETUP_FULL: &[Step] = &[Step::Challenge, Step::Allocate, Step::Permission, Step::Bind];
const SETUP_ALLOCATE: &[Step] = &[Step::Challenge, Step::Allocate];
const TEARDOWN: &[Step] = &[Step::Release];

struct ScaleClient {
    sock: UdpSocket,
    username: Box<str>,
    password: Box<str>,
    key: [u8; 16],
    nonce: Vec<u8>,
    /// Index into the phase's plan.
    step: u8,
    /// 438 answers followed in this step (part of the transaction id).
    stale: u8,
    begin_ns: u64,
    step_ns: u64,
    sent_ns: u64,
    rto_ns: u64,
    /// Position in the active list, while a phase runs for this client.
    pos: u32,
    active: bool,
    allocated: bool,
    bound: bool,
    got_data: bool,
}

#[derive(Default)]
struct PhaseOut {
    start_ns: u64,
    end_ns: u64,
    asked: u64,
    ok: u64,
    allocated: u64,
    last_alloc_ns: u64,
    failed: BTreeMap<String, u64>,
    retransmits: u64,
    stale: u64,
    send_errors: u64,
    stray: u64,
    cpu_s: f64,
    lat: Option<Histogram>,
}

impl PhaseOut {
    fn fail(&mut self, what: String) {
        *self.failed.entry(what).or_insert(0) += 1;
    }
}

fn hist_json(h: &Histogram) -> Value {
    let buckets: Vec<(usize, u64)> = h.counts.iter().enumerate().filter(|(_, c)| **c > 0).map(|(i, c)| (i, *c)).collect();
    json!({"buckets": buckets, "total": h.total, "sum": h.sum as f64, "max": h.max})
}

fn hist_merge(into: &mut Histogram, v: &Value) {
    if let Some(b) = v["buckets"].as_array() {
        for e in b {
            if let (Some(i), Some(c)) = (e[0].as_u64(), e[1].as_u64())
                && (i as usize) < into.counts.len()
            {
                into.counts[i as usize] += c;
            }
        }
    }
    into.total += v["total"].as_u64().unwrap_or(0);
    into.sum += v["sum"].as_f64().unwrap_or(0.0) as u128;
    into.max = into.max.max(v["max"].as_u64().unwrap_or(0));
}

struct Worker {
    id: u8,
    offset: usize,
    peer: SocketAddr,
    clients: Vec<ScaleClient>,
    ep: Epoll,
    realm: String,
    tag: [u8; 4],
    window: usize,
    timeout_ns: u64,
}

fn send_fd(fd: RawFd, b: &[u8]) -> bool {
    // SAFETY: b is valid for b.len() bytes for the call.
    let r = unsafe { libc::send(fd, b.as_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
    r == b.len() as isize
}

fn recv_fd(fd: RawFd, b: &mut [u8]) -> Option<usize> {
    // SAFETY: b is valid for writes of b.len() bytes for the call.
    let r = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), b.len(), libc::MSG_DONTWAIT) };
    (r > 0).then_some(r as usize)
}

impl Worker {
    fn tid(&self, k: usize, step: Step, stale: u8) -> [u8; 12] {
        let mut t = [0u8; 12];
        t[0] = b'S';
        t[1] = self.id;
        t[2..6].copy_from_slice(&(k as u32).to_be_bytes());
        t[6] = step as u8;
        t[7] = stale;
        t[8..].copy_from_slice(&self.tag);
        t
    }

    /// Writes client `k`'s request for `step` into `out`; the same bytes on every retransmission.
    fn request(&self, k: usize, step: Step, out: &mut [u8]) -> usize {
        let c = &self.clients[k];
        let tid = self.tid(k, step, c.stale);
        let mut w = MessageWriter::new(out, step.method(), Class::Request, &tid);
        match step {
            Step::Challenge | Step::Allocate => {
                w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).u32(attr::LIFETIME, 600);
            }
            Step::Permission => {
                w.xor_address(attr::XOR_PEER_ADDRESS, self.peer);
            }
            Step::Bind => {
                let ch = CHANNEL.to_be_bytes();
                w.attr(attr::CHANNEL_NUMBER, &[ch[0], ch[1], 0, 0]).xor_address(attr::XOR_PEER_ADDRESS, self.peer);
            }
            Step::Release => {
                w.u32(attr::LIFETIME, 0);
            }
        }
        if step != Step::Challenge {
            w.attr(attr::USERNAME, c.username.as_bytes())
                .attr(attr::REALM, self.realm.as_bytes())
                .attr(attr::NONCE, &c.nonce)
                .integrity(&c.key);
        }
        w.fingerprint();
        w.finish().expect("request fits")
    }

    fn send_step(&mut self, k: usize, plan: &[Step], now: u64, fresh_step: bool, buf: &mut [u8], out: &mut PhaseOut) {
        let step = plan[self.clients[k].step as usize];
        let n = self.request(k, step, buf);
        let c = &mut self.clients[k];
        if fresh_step {
            c.step_ns = now;
            c.rto_ns = RTO_NS;
        }
        c.sent_ns = now;
        if !send_fd(c.sock.as_raw_fd(), &buf[..n]) {
            // Left to the retransmission timer.
            out.send_errors += 1;
        }
    }

    fn finish(&mut self, k: usize, result: Result<(), String>, now: u64, active: &mut Vec<u32>, out: &mut PhaseOut) {
        let pos = self.clients[k].pos as usize;
        debug_assert_eq!(active[pos] as usize, k);
        active.swap_remove(pos);
        if pos < active.len() {
            let moved = active[pos] as usize;
            self.clients[moved].pos = pos as u32;
        }
        let c = &mut self.clients[k];
        c.active = false;
        match result {
            Ok(()) => {
                out.ok += 1;
                if let Some(h) = out.lat.as_mut() {
                    h.record(now.saturating_sub(c.begin_ns));
                }
            }
            Err(what) => out.fail(what),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_answer(&mut self, k: usize, plan: &[Step], data: &[u8], now: u64, active: &mut Vec<u32>, buf: &mut [u8], out: &mut PhaseOut) {
        if !self.clients[k].active {
            out.stray += 1;
            return;
        }
        let step = plan[self.clients[k].step as usize];
        let Ok(msg) = Message::parse(data) else {
            out.stray += 1;
            return;
        };
        if *msg.transaction_id() != self.tid(k, step, self.clients[k].stale) {
            out.stray += 1; // an answer to an earlier transmission
            return;
        }
        let advance = match (step, msg.class()) {
            (Step::Challenge, Class::Error) => match error_of(&msg) {
                Some((401, _)) => {
                    let (Some(realm), Some(nonce)) = (msg.get(attr::REALM), msg.get(attr::NONCE)) else {
                        return self.finish(k, Err(format!("{}: 401 without REALM or NONCE", step.name())), now, active, out);
                    };
                    let realm = String::from_utf8_lossy(realm);
                    if self.realm != realm {
                        self.realm = realm.into_owned();
                    }
                    let c = &mut self.clients[k];
                    c.key = long_term_key(&c.username, &self.realm, &c.password);
                    c.nonce.clear();
                    c.nonce.extend_from_slice(nonce);
                    true
                }
                Some((code, _)) => return self.finish(k, Err(format!("{}:{code}", step.name())), now, active, out),
                None => return self.finish(k, Err(format!("{}:no-error-code", step.name())), now, active, out),
            },
            (Step::Challenge, _) => {
                return self.finish(k, Err("Allocate:no-credentials-required".into()), now, active, out);
            }
            (_, Class::Success) => {
                let c = &mut self.clients[k];
                match step {
                    Step::Allocate => {
                        c.allocated = true;
                        out.allocated += 1;
                        out.last_alloc_ns = now;
                    }
                    Step::Bind => c.bound = true,
                    Step::Release => {
                        c.allocated = false;
                        c.bound = false;
                    }
                    _ => {}
                }
                true
            }
            (_, Class::Error) => match error_of(&msg) {
                Some((438, _)) => {
                    out.stale += 1;
                    let c = &mut self.clients[k];
                    if c.stale >= MAX_STALE {
                        return self.finish(k, Err(format!("{}:438", step.name())), now, active, out);
                    }
                    c.stale += 1;
                    if let Some(n) = msg.get(attr::NONCE) {
                        c.nonce.clear();
                        c.nonce.extend_from_slice(n);
                    }
                    self.send_step(k, plan, now, true, buf, out);
                    return;
                }
                Some((code, _)) => return self.finish(k, Err(format!("{}:{code}", step.name())), now, active, out),
                None => return self.finish(k, Err(format!("{}:no-error-code", step.name())), now, active, out),
            },
            _ => {
                out.stray += 1;
                return;
            }
        };
        if advance {
            let c = &mut self.clients[k];
            c.step += 1;
            c.stale = 0;
            if c.step as usize == plan.len() {
                self.finish(k, Ok(()), now, active, out);
            } else {
                self.send_step(k, plan, now, true, buf, out);
            }
        }
    }

    /// Runs `plan` for every client `select` picks, `window` at a time.
    fn phase(&mut self, plan: &[Step], select: impl Fn(&ScaleClient) -> bool) -> PhaseOut {
        let todo: Vec<u32> = (0..self.clients.len()).filter(|&k| select(&self.clients[k])).map(|k| k as u32).collect();
        let mut out = PhaseOut { asked: todo.len() as u64, lat: Some(Histogram::new()), ..Default::default() };
        let cpu0 = cpu_seconds("self");
        let mut active: Vec<u32> = Vec::with_capacity(self.window);
        let mut next = 0usize;
        let mut sbuf = vec![0u8; 2048];
        let mut rbuf = vec![0u8; 2048];
        out.start_ns = mono_ns();
        let deadline = out.start_ns + self.timeout_ns;
        let mut next_scan = out.start_ns + SCAN_NS;
        loop {
            let now = mono_ns();
            while active.len() < self.window && next < todo.len() {
                let k = todo[next] as usize;
                next += 1;
                let c = &mut self.clients[k];
                c.step = 0;
                c.stale = 0;
                c.begin_ns = now;
                c.pos = active.len() as u32;
                c.active = true;
                active.push(k as u32);
                self.send_step(k, plan, now, true, &mut sbuf, &mut out);
            }
            if active.is_empty() && next >= todo.len() {
                break;
            }
            if now >= deadline {
                for _ in 0..active.len() {
                    let k = active[0] as usize;
                    self.finish(k, Err("phase-timeout".into()), now, &mut active, &mut out);
                }
                for _ in next..todo.len() {
                    out.fail("not-started (phase timeout)".into());
                }
                break;
            }
            let more = active.len() < self.window && next < todo.len();
            let nev = self.ep.wait(if more { 0 } else { 2 });
            let now = mono_ns();
            for i in 0..nev {
                let (tok, _) = self.ep.event(i);
                let k = tok as usize;
                // One datagram per event: level-triggered epoll reports the socket again if more wait.
                let Some(n) = recv_fd(self.clients[k].sock.as_raw_fd(), &mut rbuf) else { continue };
                self.on_answer(k, plan, &rbuf[..n], now, &mut active, &mut sbuf, &mut out);
            }
            if now >= next_scan {
                next_scan = now + SCAN_NS;
                let mut i = 0;
                while i < active.len() {
                    let k = active[i] as usize;
                    let c = &self.clients[k];
                    if now.saturating_sub(c.step_ns) >= STEP_TIMEOUT_NS {
                        let what = format!("{}:timeout", plan[c.step as usize].name());
                        self.finish(k, Err(what), now, &mut active, &mut out);
                        continue; // another client moved into position i
                    }
                    if now.saturating_sub(c.sent_ns) >= c.rto_ns {
                        let c = &mut self.clients[k];
                        c.rto_ns = (c.rto_ns * 2).min(RTO_MAX_NS);
                        out.retransmits += 1;
                        self.send_step(k, plan, now, false, &mut sbuf, &mut out);
                    }
                    i += 1;
                }
            }
        }
        out.end_ns = mono_ns();
        out.cpu_s = match (cpu0, cpu_seconds("self")) {
            (Some(a), Some(b)) => b - a,
            _ => 0.0,
        };
        out
    }

    /// One ChannelData per bound client, through the relay to the echo peer and back.
    fn data(&mut self) -> Value {
        let todo: Vec<usize> = (0..self.clients.len()).filter(|&k| self.clients[k].bound).collect();
        for c in self.clients.iter_mut() {
            c.got_data = false;
        }
        let cpu0 = cpu_seconds("self");
        let mut lat = Histogram::new();
        let (mut sent, mut relayed, mut lost, mut send_errors, mut stray) = (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut inflight: VecDeque<usize> = VecDeque::with_capacity(self.window);
        let mut next = 0usize;
        let mut msg = [0u8; 4 + DATA_LEN];
        msg[..2].copy_from_slice(&CHANNEL.to_be_bytes());
        msg[2..4].copy_from_slice(&(DATA_LEN as u16).to_be_bytes());
        msg[4..8].copy_from_slice(&self.tag);
        let mut rbuf = vec![0u8; 2048];
        let start = mono_ns();
        let deadline = start + self.timeout_ns;
        loop {
            let now = mono_ns();
            while let Some(&k) = inflight.front() {
                let c = &self.clients[k];
                if c.got_data {
                    inflight.pop_front();
                } else if now.saturating_sub(c.sent_ns) > DATA_TIMEOUT_NS || now >= deadline {
                    inflight.pop_front();
                    lost += 1;
                } else {
                    break;
                }
            }
            while inflight.len() < self.window && next < todo.len() && now < deadline {
                let k = todo[next];
                next += 1;
                msg[8..12].copy_from_slice(&((self.offset + k) as u32).to_be_bytes());
                let c = &mut self.clients[k];
                c.sent_ns = now;
                if send_fd(c.sock.as_raw_fd(), &msg) {
                    sent += 1;
                    inflight.push_back(k);
                } else {
                    send_errors += 1;
                }
            }
            if inflight.is_empty() && (next >= todo.len() || now >= deadline) {
                break;
            }
            let nev = self.ep.wait(2);
            let now = mono_ns();
            for i in 0..nev {
                let (tok, _) = self.ep.event(i);
                let k = tok as usize;
                let Some(n) = recv_fd(self.clients[k].sock.as_raw_fd(), &mut rbuf) else { continue };
                let d = &rbuf[..n];
                let ok = n >= 4 + DATA_LEN
                    && d[..2] == CHANNEL.to_be_bytes()
                    && d[4..8] == self.tag
                    && d[8..12] == ((self.offset + k) as u32).to_be_bytes();
                let c = &mut self.clients[k];
                if ok && !c.got_data {
                    c.got_data = true;
                    relayed += 1;
                    lat.record(now.saturating_sub(c.sent_ns));
                } else {
                    stray += 1;
                }
            }
        }
        let end = mono_ns();
        let cpu = match (cpu0, cpu_seconds("self")) {
            (Some(a), Some(b)) => b - a,
            _ => 0.0,
        };
        json!({"event": "data", "start_ns": start, "end_ns": end, "asked": todo.len(), "sent": sent, "relayed": relayed,
               "lost": lost, "send_errors": send_errors, "stray": stray, "cpu_s": cpu, "lat": hist_json(&lat)})
    }
}

fn phase_json(event: &str, o: &PhaseOut) -> Value {
    json!({
        "event": event, "start_ns": o.start_ns, "end_ns": o.end_ns, "asked": o.asked, "ok": o.ok,
        "allocated": o.allocated, "last_alloc_ns": o.last_alloc_ns, "failed": o.failed,
        "retransmits": o.retransmits, "stale": o.stale, "send_errors": o.send_errors, "stray": o.stray,
        "cpu_s": o.cpu_s, "lat": o.lat.as_ref().map(hist_json),
    })
}

fn say(v: &Value) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{v}");
    let _ = o.flush();
}

/// `--scale-worker`: opens this worker's sockets, then runs the phases the coordinator asks for on stdin.
pub fn worker(args: &Args) -> Result<()> {
    let r = worker_inner(args);
    if let Err(e) = &r {
        say(&json!({"event": "error", "error": format!("{e:#}")}));
    }
    r
}

fn worker_inner(args: &Args) -> Result<()> {
    let (soft, _hard) = raise_nofile();
    let count = args.scale_count;
    if count as u64 + FD_RESERVE > soft {
        bail!("worker {}: {count} sockets do not fit in RLIMIT_NOFILE {soft}", args.scale_id);
    }
    let secret = args.secret.as_ref().ok_or_else(|| anyhow!("--secret is required"))?;
    let peer = args.scale_peer.ok_or_else(|| anyhow!("--scale-peer is required"))?;
    let ips = parse_ips(&args.scale_ips)?;
    let unique = match args.scale_users.as_str() {
        "unique" => true,
        "shared" => false,
        u => bail!("--scale-users must be unique or shared, not {u}"),
    };
    let plan = match args.scale_steps.as_str() {
        "full" => SETUP_FULL,
        "allocate" => SETUP_ALLOCATE,
        s => bail!("--scale-steps must be full or allocate, not {s}"),
    };
    let ep = Epoll::new(1024)?;
    let mut clients = Vec::with_capacity(count);
    let shared = rest_username(args.scale_expiry, Some(&args.user));
    let shared_pass = rest_password(secret.as_bytes(), &shared);
    for k in 0..count {
        let g = args.scale_offset + k;
        let ip = ips[g % ips.len()];
        let sock = UdpSocket::bind((ip, 0)).with_context(|| format!("client {g}: bind {ip}:0 (ephemeral ports of {ip} used up? add --scale-ips)"))?;
        sock.connect(args.server).with_context(|| format!("client {g}: connect"))?;
        sock.set_nonblocking(true)?;
        ep.add(sock.as_raw_fd(), libc::EPOLLIN as u32, k as u64)?;
        let (username, password) = if unique {
            let u = rest_username(args.scale_expiry, Some(&format!("{}-{g}", args.user)));
            let p = rest_password(secret.as_bytes(), &u);
            (u, p)
        } else {
            (shared.clone(), shared_pass.clone())
        };
        clients.push(ScaleClient {
            sock,
            username: username.into(),
            password: password.into(),
            key: [0; 16],
            nonce: Vec::with_capacity(48),
            step: 0,
            stale: 0,
            begin_ns: 0,
            step_ns: 0,
            sent_ns: 0,
            rto_ns: RTO_NS,
            pos: 0,
            active: false,
            allocated: false,
            bound: false,
            got_data: false,
        });
    }
    let tag = (SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u32) ^ std::process::id().rotate_left(16);
    let mut w = Worker {
        id: args.scale_id as u8,
        offset: args.scale_offset,
        peer,
        clients,
        ep,
        realm: String::new(),
        tag: tag.to_be_bytes(),
        window: args.scale_window.max(1),
        timeout_ns: (args.scale_timeout * 1e9) as u64,
    };
    say(&json!({"event": "ready", "sockets": count, "nofile": soft}));
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        match line.trim() {
            "setup" => {
                let o = w.phase(plan, |_| true);
                say(&phase_json("setup", &o));
            }
            "data" => say(&w.data()),
            "teardown" => {
                let o = w.phase(TEARDOWN, |c| c.allocated);
                say(&phase_json("teardown", &o));
            }
            "exit" => break,
            other => bail!("worker: unknown command {other:?}"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The coordinator

struct Workers {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    rx: mpsc::Receiver<(usize, Option<String>)>,
}

impl Workers {
    fn tell(&mut self, cmd: &str) -> Result<()> {
        for (i, s) in self.stdins.iter_mut().enumerate() {
            writeln!(s, "{cmd}").and_then(|_| s.flush()).with_context(|| format!("worker {i}: write"))?;
        }
        Ok(())
    }

    /// One `event` line from every worker, in worker order.
    fn collect(&mut self, event: &str, timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<Value>> = vec![None; self.children.len()];
        while got.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("workers did not report {event} within {timeout:?}");
            }
            match self.rx.recv_timeout(left) {
                Ok((i, Some(line))) => {
                    let v: Value = serde_json::from_str(&line).with_context(|| format!("worker {i}: bad line {line:?}"))?;
                    if v["event"] == "error" {
                        bail!("worker {i}: {}", v["error"].as_str().unwrap_or("?"));
                    }
                    if v["event"] == event {
                        got[i] = Some(v);
                    }
                }
                Ok((i, None)) => bail!("worker {i} exited before reporting {event}"),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("every worker exited"),
            }
        }
        Ok(got.into_iter().map(Option::unwrap).collect())
    }

    fn stop(mut self) {
        let _ = self.tell("exit");
        drop(std::mem::take(&mut self.stdins));
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in self.children.iter_mut() {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Merged results of one phase over the workers.
struct Merged {
    start_ns: u64,
    end_ns: u64,
    asked: u64,
    ok: u64,
    allocated: u64,
    last_alloc_ns: u64,
    failed: BTreeMap<String, u64>,
    retransmits: u64,
    stale: u64,
    send_errors: u64,
    stray: u64,
    cpu_s: f64,
    lat: Histogram,
}

impl Merged {
    fn of(vs: &[Value]) -> Merged {
        let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
        let mut m = Merged {
            start_ns: vs.iter().map(|v| u(v, "start_ns")).min().unwrap_or(0),
            end_ns: vs.iter().map(|v| u(v, "end_ns")).max().unwrap_or(0),
            asked: vs.iter().map(|v| u(v, "asked")).sum(),
            ok: vs.iter().map(|v| u(v, "ok")).sum(),
            allocated: vs.iter().map(|v| u(v, "allocated")).sum(),
            last_alloc_ns: vs.iter().map(|v| u(v, "last_alloc_ns")).max().unwrap_or(0),
            failed: BTreeMap::new(),
            retransmits: vs.iter().map(|v| u(v, "retransmits")).sum(),
            stale: vs.iter().map(|v| u(v, "stale")).sum(),
            send_errors: vs.iter().map(|v| u(v, "send_errors")).sum(),
            stray: vs.iter().map(|v| u(v, "stray")).sum(),
            cpu_s: vs.iter().map(|v| v["cpu_s"].as_f64().unwrap_or(0.0)).sum(),
            lat: Histogram::new(),
        };
        for v in vs {
            if let Some(f) = v["failed"].as_object() {
                for (k, c) in f {
                    *m.failed.entry(k.clone()).or_insert(0) += c.as_u64().unwrap_or(0);
                }
            }
            hist_merge(&mut m.lat, &v["lat"]);
        }
        m
    }
    fn secs(&self) -> f64 {
        self.end_ns.saturating_sub(self.start_ns) as f64 / 1e9
    }
    fn rate(&self) -> f64 {
        let s = self.secs();
        if s > 0.0 { self.ok as f64 / s } else { 0.0 }
    }
    fn alloc_rate(&self) -> f64 {
        let s = self.last_alloc_ns.saturating_sub(self.start_ns) as f64 / 1e9;
        if s > 0.0 { self.allocated as f64 / s } else { 0.0 }
    }
    fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

fn ms(h: &Histogram, q: f64) -> Option<f64> {
    h.quantile(q).map(|ns| ns as f64 / 1e6)
}

fn lat_json(h: &Histogram) -> Value {
    json!({"p50": ms(h, 0.5), "p99": ms(h, 0.99), "max": (h.total > 0).then(|| h.max as f64 / 1e6)})
}

fn fmt_mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

fn failures_text(f: &BTreeMap<String, u64>) -> String {
    if f.is_empty() {
        return "none".into();
    }
    f.iter().map(|(k, c)| format!("{k} x{c}")).collect::<Vec<_>>().join(", ")
}

/// `--scale N`: the coordinator.
pub fn run(args: &Args) -> Result<()> {
    let n = args.scale.unwrap_or(0);
    if n == 0 || n > MAX_SCALE {
        bail!("--scale must be 1..={MAX_SCALE}");
    }
    let secret = args.secret.as_ref().ok_or_else(|| anyhow!("--secret is required"))?;
    if args.peer_ip == args.server.ip() {
        bail!("--peer-ip must differ from the server's address (relays refuse their own address)");
    }
    if !args.server.is_ipv4() {
        bail!("--scale needs an IPv4 server address (the client sockets bind to --scale-ips)");
    }
    let ips = parse_ips(&args.scale_ips)?;
    if !(args.scale_timeout > 0.0 && args.scale_timeout <= 600.0 && (0.0..=60.0).contains(&args.scale_hold)) {
        bail!("--scale-timeout must be in (0, 600] s and --scale-hold in [0, 60] s");
    }
    let full = match args.scale_steps.as_str() {
        "full" => true,
        "allocate" => false,
        s => bail!("--scale-steps must be full or allocate, not {s}"),
    };
    let (soft, hard) = raise_nofile();
    let per_proc = hard.saturating_sub(FD_RESERVE) as usize;
    if per_proc < 16 {
        bail!("RLIMIT_NOFILE hard limit {hard} is too low");
    }
    let procs = args.scale_procs.max(n.div_ceil(per_proc)).clamp(1, n.min(250));
    let window = args.scale_window.max(procs);
    let peer = Peer::start(args.peer_ip, args.peer_port, 32, 2048, false)?;
    wait_ready(args.server, Kind::Udp, Duration::from_secs_f64(args.ready_timeout))?;
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let exe = std::env::current_exe().context("current_exe")?;
    let timeout = Duration::from_secs_f64(args.scale_timeout);
    let (tx, rx) = mpsc::channel();
    let mut ws = Workers { children: Vec::new(), stdins: Vec::new(), rx };
    let mut offset = 0;
    for w in 0..procs {
        let count = n / procs + (w < n % procs) as usize;
        let mut child = Command::new(&exe)
            .arg("--scale-worker")
            .args(["--server", &args.server.to_string(), "--secret", secret, "--user", &args.user])
            .args(["--scale-id", &w.to_string(), "--scale-offset", &offset.to_string(), "--scale-count", &count.to_string()])
            .args(["--scale-peer", &peer.addr.to_string(), "--scale-ips", &args.scale_ips])
            .args(["--scale-expiry", &expiry.to_string(), "--scale-window", &(window / procs).max(1).to_string()])
            .args(["--scale-steps", &args.scale_steps, "--scale-users", &args.scale_users])
            .args(["--scale-timeout", &args.scale_timeout.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start worker {w} ({})", exe.display()))?;
        offset += count;
        ws.stdins.push(child.stdin.take().unwrap());
        let out = child.stdout.take().unwrap();
        ws.children.push(child);
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) => {
                        if tx.send((w, Some(l))).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send((w, None));
        });
    }
    drop(tx);
    ws.collect("ready", Duration::from_secs(120))?;

    // --- setup ---
    let slab0 = meminfo_kb("Slab:");
    let before = ServerSnap::read(args.server_pid);
    ws.tell("setup")?;
    let setup = Merged::of(&ws.collect("setup", timeout + Duration::from_secs(30))?);
    let srv_setup_end = ServerSnap::read(args.server_pid);
    std::thread::sleep(Duration::from_secs_f64(args.scale_hold));
    let held = ServerSnap::read(args.server_pid);
    let slab1 = meminfo_kb("Slab:");
    let held_allocs = setup.allocated;

    // --- one ChannelData each ---
    let data = if args.scale_data && full {
        ws.tell("data")?;
        let vs = ws.collect("data", timeout + Duration::from_secs(30))?;
        let sum = |k: &str| vs.iter().map(|v| v[k].as_u64().unwrap_or(0)).sum::<u64>();
        let mut lat = Histogram::new();
        for v in &vs {
            hist_merge(&mut lat, &v["lat"]);
        }
        let start = vs.iter().map(|v| v["start_ns"].as_u64().unwrap_or(0)).min().unwrap_or(0);
        let end = vs.iter().map(|v| v["end_ns"].as_u64().unwrap_or(0)).max().unwrap_or(0);
        Some((sum("asked"), sum("sent"), sum("relayed"), sum("lost"), sum("send_errors"), lat, (end - start) as f64 / 1e9))
    } else {
        None
    };
    let after_data = ServerSnap::read(args.server_pid);

    // --- teardown ---
    let teardown = if args.scale_no_teardown {
        None
    } else {
        ws.tell("teardown")?;
        let t = Merged::of(&ws.collect("teardown", timeout + Duration::from_secs(30))?);
        std::thread::sleep(Duration::from_millis(500));
        Some(t)
    };
    let after = ServerSnap::read(args.server_pid);
    ws.stop();
    let (peer_rx, peer_tx) = peer_stop(peer);

    // --- report ---
    let per_alloc = |b: Option<ServerSnap>, h: Option<ServerSnap>| match (b, h) {
        (Some(b), Some(h)) if held_allocs > 0 => Some((h.rss_kb as f64 - b.rss_kb as f64) * 1024.0 / held_allocs as f64),
        _ => None,
    };
    let rss_per_alloc = per_alloc(before, held);
    let srv_cpu = match (before, srv_setup_end) {
        (Some(b), Some(e)) => Some(e.cpu_s - b.cpu_s),
        _ => None,
    };
    // The workers' own CPU time over their setup phase (the coordinator idles meanwhile).
    let gen_cpu = setup.cpu_s;
    let slab_delta = slab0.zip(slab1).map(|(a, b)| b as i64 - a as i64);
    let steps_label = if full { "Allocate(401) + Allocate + CreatePermission + ChannelBind" } else { "Allocate(401) + Allocate" };
    let j = json!({
        "label": args.label,
        "server": args.server.to_string(),
        "server_pid": args.server_pid,
        "asked": n,
        "steps": args.scale_steps,
        "users": args.scale_users,
        "procs": procs,
        "source_ips": ips.len(),
        "window": window,
        "nofile": {"soft": soft, "hard": hard},
        "setup": {
            "secs": setup.secs(),
            "ok": setup.ok,
            "allocated": setup.allocated,
            "setups_per_s": setup.rate(),
            "allocations_per_s": setup.alloc_rate(),
            "failed": setup.failed,
            "failures": setup.failures(),
            "retransmits": setup.retransmits,
            "stale_nonces": setup.stale,
            "send_errors": setup.send_errors,
            "stray": setup.stray,
            "latency_ms": lat_json(&setup.lat),
            "server_cpu_s": srv_cpu,
            "server_cpu_pct": srv_cpu.map(|c| 100.0 * c / setup.secs().max(1e-9)),
            "server_cpu_us_per_setup": srv_cpu.filter(|_| setup.ok > 0).map(|c| c * 1e6 / setup.ok as f64),
            "loadgen_cpu_s": gen_cpu,
            "loadgen_cpu_pct": 100.0 * gen_cpu / setup.secs().max(1e-9),
        },
        "server_before": before.map(|s| s.json()),
        "server_held": held.map(|s| s.json()),
        "server_after_data": after_data.map(|s| s.json()),
        "server_after_teardown": after.map(|s| s.json()),
        "held_allocations": held_allocs,
        "rss_per_allocation_bytes": rss_per_alloc,
        "rss_held_mb": held.map(|s| s.rss_kb as f64 / 1024.0),
        "fds_held": held.map(|s| s.fds),
        "system_slab_delta_kb": slab_delta,
        "data": data.as_ref().map(|(asked, sent, relayed, lost, errs, lat, secs)| json!({
            "asked": asked, "sent": sent, "relayed": relayed, "lost": lost, "send_errors": errs, "secs": secs,
            "rtt_ms": lat_json(lat), "peer_rx": peer_rx, "peer_tx": peer_tx,
        })),
        "teardown": teardown.as_ref().map(|t| json!({
            "asked": t.asked, "ok": t.ok, "secs": t.secs(), "per_s": t.rate(), "failed": t.failed,
        })),
    });
    if let Some(p) = &args.scale_json {
        std::fs::write(p, format!("{j}\n")).with_context(|| format!("write {}", p.display()))?;
    }
    if args.json {
        println!("{j}");
        return Ok(());
    }
    println!(
        "scale: {n} allocations asked of {}, {procs} generator process(es) (RLIMIT_NOFILE {soft}/{hard}), {} source IPs, {window} setups in flight, {} users",
        args.server,
        ips.len(),
        args.scale_users
    );
    println!("steps        {steps_label}");
    println!(
        "setup        {} complete in {:.2} s: {:.0} setups/s; {} allocations: {:.0} allocations/s",
        setup.ok,
        setup.secs(),
        setup.rate(),
        setup.allocated,
        setup.alloc_rate()
    );
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.1}"));
    println!(
        "latency      setup p50 {} ms  p99 {} ms  max {} ms; retransmits {}, stale nonces {}",
        f(ms(&setup.lat, 0.5)),
        f(ms(&setup.lat, 0.99)),
        f((setup.lat.total > 0).then(|| setup.lat.max as f64 / 1e6)),
        setup.retransmits,
        setup.stale
    );
    println!("failures     {} ({})", setup.failures(), failures_text(&setup.failed));
    match (before, held) {
        (Some(b), Some(h)) => {
            println!(
                "server RSS   {} before -> {} held (+{}): {} per allocation; VmHWM {}",
                fmt_mb(b.rss_kb),
                fmt_mb(h.rss_kb),
                fmt_mb(h.rss_kb.saturating_sub(b.rss_kb)),
                rss_per_alloc.map_or("-".into(), |x| format!("{x:.0} B")),
                fmt_mb(h.hwm_kb)
            );
            println!("server fds   {} before -> {} held; threads {}", b.fds, h.fds, h.threads);
        }
        _ => println!("server RSS   - (give --server-pid)"),
    }
    if let Some(c) = srv_cpu {
        println!(
            "server cpu   {c:.2} s during setup ({:.0} % of a core, {:.1} µs per setup)",
            100.0 * c / setup.secs().max(1e-9),
            if setup.ok > 0 { c * 1e6 / setup.ok as f64 } else { 0.0 }
        );
    }
    println!("loadgen cpu  {gen_cpu:.2} s during setup ({:.0} % of a core, all workers)", 100.0 * gen_cpu / setup.secs().max(1e-9));
    if let Some(d) = slab_delta {
        println!("kernel slab  {d:+} kB system-wide while held (server relay sockets and generator client sockets)");
    }
    if let Some((asked, sent, relayed, lost, errs, lat, secs)) = &data {
        println!(
            "data         one ChannelData per allocation: {sent} of {asked} sent in {secs:.2} s, {relayed} relayed back ({:.2} %), {lost} lost, {errs} send errors; RTT p50 {} ms p99 {} ms",
            if *sent > 0 { 100.0 * *relayed as f64 / *sent as f64 } else { 0.0 },
            f(ms(lat, 0.5)),
            f(ms(lat, 0.99))
        );
    }
    if let Some(t) = &teardown {
        println!(
            "teardown     Refresh(0): {} of {} in {:.2} s ({:.0}/s); failures {}",
            t.ok,
            t.asked,
            t.secs(),
            t.rate(),
            failures_text(&t.failed)
        );
    }
    if let (Some(a), Some(b)) = (after_data, after) {
        println!("server RSS   {} after the data, {} after teardown (VmHWM {})", fmt_mb(a.rss_kb), fmt_mb(b.rss_kb), fmt_mb(b.hwm_kb));
    }
    Ok(())
}
