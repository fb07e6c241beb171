//! Per-flow accounting (benches/upgrade.sh: a relay upgraded or restarted
//! under load).
//!
//! `--flows`: every datagram's flow (its client) and sequence number are
//! recorded where it arrives: at the echo peer (client → relay → peer) and
//! back at its client (the echo: peer → relay → client). Per flow and
//! direction: distinct datagrams, duplicates, and the longest time between
//! two arrivals, its longest gap, from the start of the timed window to the
//! end of sending (a flow that stopped counts its silence up to the end).
//! Loss is then exact each way: what the clients sent less what the peer
//! received, and what the peer echoed less what the clients received.

use std::sync::Mutex;

use super::*;

/// Longest sequence number tracked per flow (bits): 4 Mi, far beyond a
/// 280 s run at any per-flow rate the generator reaches.
const MAX_SEQ: u64 = 1 << 22;
/// A flow that received nothing in this last stretch of sending has stopped.
const STOPPED_NS: u64 = 250_000_000;

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
