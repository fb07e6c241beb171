//! Per-flow accounting, and a command run in the middle of the timed window
//! (benches/upgrade.sh: a relay upgraded or restarted under load).
//!
//! `--flows`: every datagram's flow (its client) and sequence number are
//! recorded where it arrives: at the echo peer (client → relay → peer) and
//! back at its client (the echo: peer → relay → client). Per flow and
//! direction: distinct datagrams, duplicates, and the longest time between
//! two arrivals, its longest gap, from the start of the timed window to the
//! end of sending (a flow that stopped counts its silence up to the end).
//! Loss is then exact each way: what the clients sent less what the peer
//! received, and what the peer echoed less what the clients received.
//!
//! `--exec-at S -- CMD ARGS...`: S seconds into the timed window, CMD runs
//! (`turnctl upgrade`, a script restarting the server); the report has when
//! it returned, its exit status and output. Meanwhile a probe sends
//! authenticated Allocates, one at a time, each from a fresh socket, to find
//! when a new server process first answers one: the first success carrying
//! SOFTWARE `--probe-software` (only the new process's configuration has
//! it), or without that option the first success after CMD returned (a
//! restart: the old process is gone by then). Each probe allocation is
//! released again (Refresh 0) as soon as it is answered.

use std::process::{Command, Stdio};
use std::sync::Mutex;

use super::*;

/// Longest sequence number tracked per flow (bits): 4 Mi, far beyond a
/// 280 s run at any per-flow rate the generator reaches.
const MAX_SEQ: u64 = 1 << 22;
/// A flow that received nothing in this last stretch of sending has stopped.
const STOPPED_NS: u64 = 250_000_000;
/// The probe stops after this many answers from the new process.
const PROBE_NEW_ANSWERS: u64 = 3;
/// A probe request is resent after this long without an answer, and given up after `PROBE_GIVE_UP`.
const PROBE_RTO: Duration = Duration::from_millis(250);
const PROBE_GIVE_UP: Duration = Duration::from_secs(2);
/// How long the command may run past the end of sending before it is killed.
const EXEC_GRACE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Per-flow accounting

#[derive(Default, Clone)]
pub(super) struct FlowRx {
    /// Sequence numbers seen, a bit each.
    seen: Vec<u64>,
    distinct: u64,
    dups: u64,
    /// Echoes sent back (the peer's side only).
    echoed: u64,
    last_ns: u64,
    max_gap_ns: u64,
    /// When the longest gap ended (an arrival, or the end of sending).
    max_gap_end_ns: u64,
}

/// What arrived per flow in one direction; times in ns of the owner's clock.
pub(super) struct FlowLog {
    flows: Vec<FlowRx>,
    /// Gaps count from here: the start of the timed window (u64::MAX until then).
    from_ns: u64,
    /// Datagrams naming a flow that should not arrive where they did (another
    /// client's socket, or at the peer from another allocation's relayed address).
    misrouted: u64,
}

impl FlowLog {
    pub(super) fn new(n: usize) -> FlowLog {
        FlowLog { flows: vec![FlowRx::default(); n], from_ns: u64::MAX, misrouted: 0 }
    }

    pub(super) fn start(&mut self, from_ns: u64) {
        self.from_ns = from_ns;
    }

    /// Flow `f` received its datagram `seq` at `now`.
    pub(super) fn arrived(&mut self, f: usize, seq: u64, now: u64) {
        let Some(fl) = self.flows.get_mut(f) else {
            self.misrouted += 1;
            return;
        };
        if seq < MAX_SEQ {
            let (w, b) = ((seq / 64) as usize, seq % 64);
            if w >= fl.seen.len() {
                fl.seen.resize((w + 1).next_power_of_two(), 0);
            }
            if fl.seen[w] & (1 << b) != 0 {
                fl.dups += 1;
            } else {
                fl.seen[w] |= 1 << b;
                fl.distinct += 1;
            }
        }
        if now >= self.from_ns {
            let gap = now - fl.last_ns.max(self.from_ns);
            if gap > fl.max_gap_ns {
                fl.max_gap_ns = gap;
                fl.max_gap_end_ns = now;
            }
        }
        fl.last_ns = fl.last_ns.max(now);
    }

    /// Sending ended at `end_ns`: each flow's silence since its last arrival is a gap too.
    fn close(&mut self, end_ns: u64) {
        let from = self.from_ns.min(end_ns);
        for fl in &mut self.flows {
            let tail = end_ns.saturating_sub(fl.last_ns.max(from));
            if tail > fl.max_gap_ns {
                fl.max_gap_ns = tail;
                fl.max_gap_end_ns = end_ns;
            }
        }
    }
}

/// The echo peer's side: it counts what arrives per flow and what it echoes.
pub(super) struct PeerFlows {
    base: Instant,
    tag: u32,
    pub(super) log: Mutex<FlowLog>,
    /// Each flow's relayed address (where its datagrams must come from), once known.
    relayed: Mutex<Vec<Option<SocketAddr>>>,
}

impl PeerFlows {
    pub(super) fn new(n: usize, tag: u32) -> PeerFlows {
        PeerFlows { base: Instant::now(), tag, log: Mutex::new(FlowLog::new(n)), relayed: Mutex::new(vec![None; n]) }
    }

    pub(super) fn set_relayed(&self, f: usize, addr: SocketAddr) {
        if let Some(r) = self.relayed.lock().unwrap().get_mut(f) {
            *r = Some(addr);
        }
    }

    /// This log's clock reading for `base_ns` on a clock that started at `base`.
    pub(super) fn to_own(&self, base: Instant, base_ns: u64) -> u64 {
        base_ns + base.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Counts slots `0..n` of a received batch; the first `sent` were echoed.
    pub(super) fn account(&self, m: &Mmsg, n: usize, sent: usize) {
        let now = self.base.elapsed().as_nanos() as u64;
        let relayed = self.relayed.lock().unwrap();
        let mut log = self.log.lock().unwrap();
        for i in 0..n {
            let d = m.data(i);
            if d.len() < STAMP {
                continue;
            }
            let p = &d[d.len() - STAMP..];
            if u32::from_be_bytes(p[20..24].try_into().unwrap()) != self.tag {
                continue;
            }
            let seq = u64::from_be_bytes(p[8..16].try_into().unwrap());
            let f = u32::from_be_bytes(p[16..20].try_into().unwrap()) as usize;
            if let Some(Some(want)) = relayed.get(f)
                && m.addr(i) != Some(*want)
            {
                log.misrouted += 1;
                continue;
            }
            log.arrived(f, seq, now);
            if i < sent
                && let Some(fl) = log.flows.get_mut(f)
            {
                fl.echoed += 1;
            }
        }
    }
}

/// Quantile `q` of sorted `v` (nearest rank).
fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// One direction's figures: `expected[f]` datagrams should have reached flow
/// `f`; `log` says what did. `end_ns` (end of sending) and `mark_ns` (the
/// command, or the window's start) are on the log's clock.
fn direction(log: &mut FlowLog, expected: &[u64], end_ns: u64, mark_ns: u64) -> serde_json::Value {
    log.close(end_ns);
    let ms = |ns: u64| ns as f64 / 1e6;
    let mut lost = 0u64;
    let mut received = 0u64;
    let mut dups = 0u64;
    let mut flows_with_loss = 0usize;
    for (fl, &want) in log.flows.iter().zip(expected) {
        received += fl.distinct;
        dups += fl.dups;
        let l = want.saturating_sub(fl.distinct + fl.dups);
        lost += l;
        flows_with_loss += (l > 0) as usize;
    }
    let mut gaps: Vec<u64> = log.flows.iter().map(|f| f.max_gap_ns).collect();
    gaps.sort_unstable();
    let stopped = log.flows.iter().filter(|f| end_ns.saturating_sub(f.last_ns) > STOPPED_NS).count();
    let worst = log.flows.iter().enumerate().max_by_key(|(_, f)| f.max_gap_ns);
    // Where the gaps sat: the median flow's longest gap began this long after the mark.
    let mut starts: Vec<i64> = log.flows.iter().map(|f| f.max_gap_end_ns as i64 - f.max_gap_ns as i64 - mark_ns as i64).collect();
    starts.sort_unstable();
    let median_start = starts.get(starts.len() / 2).copied().unwrap_or(0);
    serde_json::json!({
        "expected": expected.iter().sum::<u64>(),
        "received": received,
        "duplicates": dups,
        "lost": lost,
        "flows_with_loss": flows_with_loss,
        "misrouted": log.misrouted,
        "flows_stopped": stopped,
        "gap_ms": {
            "max": ms(quantile(&gaps, 1.0)),
            "p50": ms(quantile(&gaps, 0.5)),
            "p90": ms(quantile(&gaps, 0.9)),
            "min": ms(gaps.first().copied().unwrap_or(0)),
        },
        "worst_flow": worst.map(|(i, _)| i),
        "worst_gap_start_ms": worst.map(|(_, f)| (f.max_gap_end_ns as i64 - f.max_gap_ns as i64 - mark_ns as i64) as f64 / 1e6),
        "median_gap_start_ms": median_start as f64 / 1e6,
    })
}

/// The flows report: loss each way and the gaps. `sent[f]` is what client
/// `f` sent; `client` is the clients' log (on the generator's clock), `peer`
/// the echo peer's. Times `end_ns` and `mark_ns` are on the generator's clock,
/// which started at `base`.
pub(super) fn report_flows(client: &mut FlowLog, peer: &PeerFlows, sent: &[u64], base: Instant, end_ns: u64, mark_ns: u64) -> serde_json::Value {
    let mut plog = peer.log.lock().unwrap();
    let echoed: Vec<u64> = plog.flows.iter().map(|f| f.echoed).collect();
    let (pend, pmark) = (peer.to_own(base, end_ns), peer.to_own(base, mark_ns));
    let to_peer = direction(&mut plog, sent, pend, pmark);
    let to_client = direction(client, &echoed, end_ns, mark_ns);
    serde_json::json!({ "flows": sent.len(), "to_peer": to_peer, "to_client": to_client })
}

// ---------------------------------------------------------------------------
// The command and the probe

/// How a probe tells the new process's answers from the old one's.
#[derive(Clone)]
pub(super) enum Marker {
    /// The new process's answers carry this SOFTWARE.
    Software(String),
    /// Any answer after the command returned (a restart: the old process is gone).
    AfterReturn,
}

#[derive(Default)]
struct Probe {
    sent: u64,
    old: u64,
    new: u64,
    /// Answered by the old process after the new one had answered one.
    old_after_new: u64,
    refused: u64,
    timeouts: u64,
    errors: Vec<String>,
    first_new_sent_ns: Option<u64>,
    first_new_answer_ns: Option<u64>,
    last_old_answer_ns: Option<u64>,
}

pub(super) struct Exec {
    pub(super) thread: std::thread::JoinHandle<serde_json::Value>,
}

pub(super) struct ExecPlan {
    pub(super) command: Vec<String>,
    pub(super) at_ns: u64,
    pub(super) until_ns: u64,
    pub(super) server: SocketAddr,
    pub(super) creds: Option<(String, String)>,
    pub(super) marker: Marker,
    pub(super) interval: Duration,
}

impl Exec {
    /// Starts the thread that runs the command at `plan.at_ns` (on the
    /// clock that started at `base`) and probes until the new process
    /// answers or `plan.until_ns`.
    pub(super) fn start(plan: ExecPlan, base: Instant) -> Result<Exec> {
        let thread = std::thread::Builder::new().name("exec".into()).spawn(move || run_exec(plan, base))?;
        Ok(Exec { thread })
    }

    pub(super) fn finish(self) -> serde_json::Value {
        self.thread.join().unwrap_or_else(|_| serde_json::json!({ "error": "the exec thread panicked" }))
    }
}

fn run_exec(plan: ExecPlan, base: Instant) -> serde_json::Value {
    let now_ns = || base.elapsed().as_nanos() as u64;
    let ms = |ns: u64| ns as f64 / 1e6;
    // The probe's credentials: a challenge now, so that each probe is one round trip.
    let mut auth = plan.creds.as_ref().map(|(u, p)| challenge(plan.server, u, p));
    let wait = Duration::from_nanos(plan.at_ns.saturating_sub(now_ns()));
    std::thread::sleep(wait);

    let out_path = std::env::temp_dir().join(format!("loadgen-exec-{}.out", std::process::id()));
    let out = match std::fs::File::create(&out_path).and_then(|f| Ok((f.try_clone()?, f))) {
        Ok(o) => o,
        Err(e) => return serde_json::json!({ "error": format!("output file {}: {e}", out_path.display()) }),
    };
    let at = now_ns();
    let child = Command::new(&plan.command[0]).args(&plan.command[1..]).stdin(Stdio::null()).stdout(out.0).stderr(out.1).spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return serde_json::json!({ "error": format!("cannot run {}: {e}", plan.command[0]) }),
    };
    let pid = child.id();
    let returned = Arc::new(AtomicU64::new(0));
    let waiter = {
        let returned = returned.clone();
        std::thread::spawn(move || {
            let st = child.wait();
            returned.store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
            st.ok().and_then(|s| s.code())
        })
    };
    let probe = match auth.as_mut() {
        Some(Ok(a)) => Some(probe(&plan, a, base, &returned)),
        _ => None,
    };
    // The command may still run (a restart script, a slow handover): wait, bounded.
    let kill_at = plan.until_ns + EXEC_GRACE.as_nanos() as u64;
    let mut killed = false;
    while returned.load(Ordering::SeqCst) == 0 {
        if now_ns() > kill_at {
            // SAFETY: kill takes plain integers; the child is ours and not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let code = waiter.join().ok().flatten();
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let ret = returned.load(Ordering::SeqCst);
    let probe = probe.map(|p| {
        let rel = |t: Option<u64>| t.map(|t| ms(t.saturating_sub(at)));
        serde_json::json!({
            "sent": p.sent,
            "answered_old": p.old,
            "answered_new": p.new,
            "old_after_new": p.old_after_new,
            "refused": p.refused,
            "timeouts": p.timeouts,
            "errors": p.errors,
            "first_new_answer_ms": rel(p.first_new_answer_ns),
            "first_new_sent_ms": rel(p.first_new_sent_ns),
            "last_old_answer_ms": rel(p.last_old_answer_ns),
        })
    });
    serde_json::json!({
        "command": plan.command.join(" "),
        "at_ns": at,
        "returned_ms": (ret > 0).then(|| ms(ret.saturating_sub(at))),
        "exit_code": code,
        "killed": killed,
        "output": output.trim_end(),
        "probe": probe,
        "probe_error": match &auth { Some(Err(e)) => Some(format!("{e:#}")), _ => None },
    })
}

/// A probe's credentials and the server's current realm and nonce.
struct Auth {
    username: String,
    password: String,
    realm: String,
    nonce: Vec<u8>,
    key: [u8; 16],
}

impl Auth {
    /// Takes REALM and NONCE from a 401 or 438 answer.
    fn renew(&mut self, m: &Message<'_>) -> bool {
        let Some(nonce) = m.get(attr::NONCE) else { return false };
        self.nonce = nonce.to_vec();
        if let Some(r) = m.get(attr::REALM) {
            self.realm = String::from_utf8_lossy(r).into_owned();
        }
        self.key = long_term_key(&self.username, &self.realm, &self.password);
        true
    }
}

/// An unauthenticated Allocate, for the realm and a nonce.
fn challenge(server: SocketAddr, username: &str, password: &str) -> Result<Auth> {
    let mut conn = Conn::connect(server, Kind::Udp, None, Instant::now())?;
    let mut tids = 1u64 << 40;
    let req = build(method::ALLOCATE, Class::Request, next_tid(&mut tids), |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).fingerprint();
    });
    let resp = conn.transact(&req, Duration::from_secs(3))?.ok_or_else(|| anyhow!("probe: no answer to the challenge"))?;
    let m = Message::parse(&resp).map_err(|e| anyhow!("probe: malformed challenge: {e}"))?;
    let mut a = Auth { username: username.to_owned(), password: password.to_owned(), realm: String::new(), nonce: Vec::new(), key: [0; 16] };
    if !a.renew(&m) {
        bail!("probe: the challenge had no NONCE");
    }
    Ok(a)
}

enum Answer {
    Success(Option<String>),
    Challenge,
    Error(String),
    Refused,
    Timeout,
}

/// One request and its answer over `sock`, resent every `PROBE_RTO`.
fn ask(sock: &UdpSocket, req: &[u8], auth: &mut Auth) -> Answer {
    let end = Instant::now() + PROBE_GIVE_UP;
    let mut buf = [0u8; 2048];
    loop {
        if let Err(e) = sock.send(req) {
            return if e.kind() == io::ErrorKind::ConnectionRefused { Answer::Refused } else { Answer::Error(e.to_string()) };
        }
        let resend = (Instant::now() + PROBE_RTO).min(end);
        loop {
            let left = resend.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = sock.set_read_timeout(Some(left));
            match sock.recv(&mut buf) {
                Ok(n) if n >= 20 && buf[8..20] == req[8..20] => {
                    let Ok(m) = Message::parse(&buf[..n]) else { return Answer::Error("malformed answer".into()) };
                    return match m.class() {
                        Class::Success => Answer::Success(m.get(attr::SOFTWARE).map(|s| String::from_utf8_lossy(s).into_owned())),
                        _ => match error_of(&m) {
                            Some((401 | 438, _)) if auth.renew(&m) => Answer::Challenge,
                            Some((c, r)) => Answer::Error(format!("{c} {r}")),
                            None => Answer::Error("error without ERROR-CODE".into()),
                        },
                    };
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Answer::Refused,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Answer::Error(e.to_string()),
            }
        }
        if Instant::now() >= end {
            return Answer::Timeout;
        }
    }
}

fn signed(m: u16, tids: &mut u64, a: &Auth, f: impl FnOnce(&mut MessageWriter)) -> Vec<u8> {
    build(m, Class::Request, next_tid(tids), |w| {
        f(w);
        w.attr(attr::USERNAME, a.username.as_bytes())
            .attr(attr::REALM, a.realm.as_bytes())
            .attr(attr::NONCE, &a.nonce)
            .integrity(&a.key)
            .fingerprint();
    })
}

/// Allocates from fresh sockets, one at a time every `plan.interval`, until
/// the new process has answered `PROBE_NEW_ANSWERS` or `plan.until_ns`.
fn probe(plan: &ExecPlan, auth: &mut Auth, base: Instant, returned: &AtomicU64) -> Probe {
    let now_ns = || base.elapsed().as_nanos() as u64;
    let mut p = Probe::default();
    let mut tids = 2u64 << 40;
    while now_ns() < plan.until_ns && p.new < PROBE_NEW_ANSWERS {
        let start = Instant::now();
        let sent_ns = now_ns();
        p.sent += 1;
        let sock = match UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect(plan.server).map(|()| s)) {
            Ok(s) => s,
            Err(e) => {
                p.errors.push(format!("socket: {e}"));
                break;
            }
        };
        // A new nonce (a restarted server knows none of the old ones) is one more round trip.
        for _ in 0..3 {
            let req = signed(method::ALLOCATE, &mut tids, auth, |w| {
                w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).u32(attr::LIFETIME, 600);
            });
            match ask(&sock, &req, auth) {
                Answer::Challenge => continue,
                Answer::Success(software) => {
                    let t = now_ns();
                    let is_new = match &plan.marker {
                        Marker::Software(s) => software.as_deref() == Some(s.as_str()),
                        Marker::AfterReturn => {
                            let r = returned.load(Ordering::SeqCst);
                            r > 0 && t >= r
                        }
                    };
                    if is_new {
                        p.new += 1;
                        if p.first_new_answer_ns.is_none() {
                            p.first_new_answer_ns = Some(t);
                            p.first_new_sent_ns = Some(sent_ns);
                        }
                    } else {
                        p.old += 1;
                        p.old_after_new += p.first_new_answer_ns.is_some() as u64;
                        p.last_old_answer_ns = Some(t);
                    }
                    // Released at once: the probe should not add to what is handed over.
                    let refresh = signed(method::REFRESH, &mut tids, auth, |w| {
                        w.u32(attr::LIFETIME, 0);
                    });
                    let _ = sock.send(&refresh);
                }
                Answer::Refused => p.refused += 1,
                Answer::Timeout => p.timeouts += 1,
                Answer::Error(e) => {
                    if p.errors.len() < 5 {
                        p.errors.push(e);
                    }
                }
            }
            break;
        }
        if let Some(d) = plan.interval.checked_sub(start.elapsed()) {
            std::thread::sleep(d);
        }
    }
    p
}
