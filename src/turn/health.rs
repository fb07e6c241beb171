//! A call's health as the relay sees it, without decrypting anything: SRTP
//! leaves the RTP header in the clear, so each stream's sequence numbers
//! and timestamps tell loss, reordering and jitter on the leg the packets
//! crossed before they reached the relay; relayed ICE consent checks
//! (STUN Binding inside the relayed payload) give each leg's round trip.
//!
//! Sans-IO and bounded: every relayed payload is classified by its first
//! byte (RFC 7983: 0-3 STUN, 20-63 DTLS, 128-191 RTP or RTCP, RTCP by a
//! second byte of 192-223, RFC 5761); RTP is tracked per SSRC in a fixed
//! table of [`MAX_STREAMS`] per leg (a new SSRC counts only after two
//! packets in sequence, RFC 3550 A.1's probation, so bytes that merely look
//! like RTP are not tracked). No heap allocation per packet.
//!
//! Loss is RFC 3550's: packets expected (highest extended sequence number
//! minus the first, plus one) minus packets received (duplicates not
//! counted). Jitter is RFC 3550's interarrival jitter, which needs the RTP
//! clock rate; signalling carries it and the relay does not see signalling,
//! so it is inferred from the stream itself (RTP timestamp advance over
//! arrival time, after a second) and accepted only when it is within 20 %
//! of a rate WebRTC uses (8, 16, 48 or 90 kHz); otherwise no jitter figure
//! is given rather than a wrong one. Data that is not RTP (data channels,
//! DTLS alone) gets no loss or jitter figure.

use std::time::{Duration, Instant};

/// RTP streams tracked per leg; further ones are counted, not tracked.
pub const MAX_STREAMS: usize = 4;
/// RFC 3550 A.1: a jump of more than this many sequence numbers ahead, or
/// of more than [`MAX_MISORDER`] back, is a restart (two in a row) or noise.
const MAX_DROPOUT: u16 = 3000;
const MAX_MISORDER: u16 = 100;
/// RTP clock rates WebRTC uses (G.711, G.722 and Opus audio, video).
const CLOCKS: [u32; 4] = [8_000, 16_000, 48_000, 90_000];
/// How long a stream is watched before its clock rate is inferred.
const CLOCK_PROBE: Duration = Duration::from_secs(1);

/// What a relayed payload is, by its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Stun,
    Dtls,
    Rtp,
    Rtcp,
    Other,
}

/// RFC 7983 demultiplexing, with RFC 5761 for RTCP. RTP needs a whole
/// fixed header (12 bytes and its CSRCs).
pub fn classify(p: &[u8]) -> Kind {
    match p.first() {
        Some(0..=3) => Kind::Stun,
        Some(20..=63) => Kind::Dtls,
        Some(&b @ 128..=191) => match p.get(1) {
            Some(192..=223) => Kind::Rtcp,
            Some(_) if p.len() >= 12 + 4 * (b & 0x0f) as usize => Kind::Rtp,
            _ => Kind::Other,
        },
        _ => Kind::Other,
    }
}

/// One RTP stream's bookkeeping (RFC 3550 A.1 and A.8).
#[derive(Clone, Copy, Debug)]
struct Stream {
    ssrc: u32,
    /// First extended sequence number.
    base: u64,
    max_seq: u16,
    cycles: u64,
    /// A sequence number after a large jump: the stream restarts when the next one follows it.
    bad_seq: Option<u16>,
    received: u64,
    duplicates: u64,
    reordered: u64,
    /// Which of the 64 sequence numbers up to `max_seq` arrived (bit 0: `max_seq`).
    seen: u64,
    first: (Instant, u32),
    last: (Instant, u32),
    clock: Option<u32>,
    /// RFC 3550 jitter, in seconds.
    jitter: f64,
}

impl Stream {
    fn new(ssrc: u32, seq: u16, ts: u32, now: Instant) -> Stream {
        Stream {
            ssrc,
            base: seq as u64,
            max_seq: seq,
            cycles: 0,
            bad_seq: None,
            received: 1,
            duplicates: 0,
            reordered: 0,
            seen: 1,
            first: (now, ts),
            last: (now, ts),
            clock: None,
            jitter: 0.0,
        }
    }

    fn extended_max(&self) -> u64 {
        self.cycles + self.max_seq as u64
    }

    fn expected(&self) -> u64 {
        (self.extended_max() + 1).saturating_sub(self.base)
    }

    fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    fn packet(&mut self, seq: u16, ts: u32, now: Instant) {
        let ahead = seq.wrapping_sub(self.max_seq);
        let behind = self.max_seq.wrapping_sub(seq);
        if ahead == 0 {
            self.duplicates += 1;
        } else if ahead < MAX_DROPOUT {
            // In order, possibly with a gap (or across the wrap).
            if seq < self.max_seq {
                self.cycles += 1 << 16;
            }
            self.seen = if ahead >= 64 { 1 } else { (self.seen << ahead) | 1 };
            self.max_seq = seq;
            self.received += 1;
            self.bad_seq = None;
            self.timing(ts, now);
        } else if behind <= MAX_MISORDER {
            // Late: reordered, or a duplicate of one already counted.
            let bit = 1u64.checked_shl(behind as u32).unwrap_or(0);
            if bit != 0 && self.seen & bit != 0 {
                self.duplicates += 1;
            } else {
                // Its extended number: this cycle, or the one before if it is from before the wrap.
                let ext = (self.cycles + seq as u64).checked_sub(if seq > self.max_seq { 1 << 16 } else { 0 });
                if ext.is_some_and(|e| e >= self.base) {
                    self.seen |= bit;
                    self.received += 1;
                    self.reordered += 1;
                }
            }
        } else if self.bad_seq == Some(seq) {
            // Two in sequence after a jump: the source restarted.
            *self = Stream::new(self.ssrc, seq, ts, now);
        } else {
            self.bad_seq = Some(seq.wrapping_add(1));
        }
    }

    /// Clock inference, then RFC 3550 A.8 jitter for an in-order packet.
    fn timing(&mut self, ts: u32, now: Instant) {
        if self.clock.is_none() && now.saturating_duration_since(self.first.0) >= CLOCK_PROBE {
            let secs = now.saturating_duration_since(self.first.0).as_secs_f64();
            let rate = ts.wrapping_sub(self.first.1) as f64 / secs;
            self.clock = CLOCKS.iter().copied().find(|&c| (rate / c as f64 - 1.0).abs() < 0.2);
        }
        if let Some(clock) = self.clock {
            let arrival = now.saturating_duration_since(self.last.0).as_secs_f64();
            let sent = ts.wrapping_sub(self.last.1) as i32 as f64 / clock as f64;
            let d = (arrival - sent).abs();
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.last = (now, ts);
    }
}

/// What one leg's RTP streams add up to.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StreamFigures {
    pub ssrc: u32,
    pub received: u64,
    pub expected: u64,
    pub lost: u64,
    pub reordered: u64,
    pub duplicates: u64,
    /// None until the clock rate is known.
    pub jitter: Option<f64>,
    pub clock: Option<u32>,
}

/// One leg of an allocation: what arrives at the relay from the client, or
/// from the peers, and the round trip from the relay over that leg.
#[derive(Clone, Debug, Default)]
pub struct Leg {
    streams: [Option<Stream>; MAX_STREAMS],
    /// New SSRCs on probation: SSRC and last sequence number (streams
    /// start interleaved: audio and video at once).
    candidates: [Option<(u32, u16)>; MAX_STREAMS],
    /// The candidate slot the next unknown SSRC takes when all are full.
    next_candidate: usize,
    /// RTP packets of streams beyond the table.
    pub untracked_packets: u64,
    /// Packets that are not RTP (STUN, DTLS, RTCP, anything else).
    pub other_packets: u64,
    /// A consent check sent over the other leg, waiting for this leg's answer.
    pending: Option<([u8; 12], Instant)>,
    /// Smoothed round trip (RFC 6298's 1/8), and the last sample.
    srtt: Option<Duration>,
    pub rtt_samples: u64,
}

impl Leg {
    fn rtp(&mut self, p: &[u8], now: Instant) {
        let seq = u16::from_be_bytes([p[2], p[3]]);
        let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
        let ssrc = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
        if let Some(s) = self.streams.iter_mut().flatten().find(|s| s.ssrc == ssrc) {
            s.packet(seq, ts, now);
            return;
        }
        match self.candidates.iter().position(|c| c.is_some_and(|(s, _)| s == ssrc)) {
            Some(i) => match self.candidates[i] {
                Some((_, last)) if seq == last.wrapping_add(1) => {
                    self.candidates[i] = None;
                    match self.streams.iter_mut().find(|s| s.is_none()) {
                        Some(slot) => {
                            let mut s = Stream::new(ssrc, last, ts, now);
                            s.packet(seq, ts, now);
                            *slot = Some(s);
                        }
                        None => self.untracked_packets += 2,
                    }
                }
                _ => self.candidates[i] = Some((ssrc, seq)),
            },
            None => {
                let i = self.candidates.iter().position(Option::is_none).unwrap_or_else(|| {
                    self.next_candidate = (self.next_candidate + 1) % MAX_STREAMS;
                    self.next_candidate
                });
                self.candidates[i] = Some((ssrc, seq));
            }
        }
    }

    fn rtt_sample(&mut self, sample: Duration) {
        self.rtt_samples += 1;
        self.srtt = Some(match self.srtt {
            None => sample,
            Some(s) => (s * 7 + sample) / 8,
        });
    }

    /// Each tracked stream's figures.
    pub fn streams(&self) -> impl Iterator<Item = StreamFigures> + '_ {
        self.streams.iter().flatten().map(|s| StreamFigures {
            ssrc: s.ssrc,
            received: s.received,
            expected: s.expected(),
            lost: s.lost(),
            reordered: s.reordered,
            duplicates: s.duplicates,
            jitter: s.clock.map(|_| s.jitter),
            clock: s.clock,
        })
    }

    /// Loss over all tracked streams (0..1); None without RTP.
    pub fn loss(&self) -> Option<f64> {
        let (lost, expected) = self.streams().fold((0, 0), |(l, e), s| (l + s.lost, e + s.expected));
        (expected > 0).then(|| lost as f64 / expected as f64)
    }

    /// The leg's jitter (seconds), where known: its audio stream's (the
    /// busiest, at an audio clock rate), else its busiest stream's. Not the
    /// largest: a video retransmission stream (RFC 4588) carries the
    /// original packets' timestamps, so its "jitter" is the repair delay.
    pub fn jitter(&self) -> Option<f64> {
        let timed = || self.streams().filter(|s| s.jitter.is_some());
        let audio = timed().filter(|s| matches!(s.clock, Some(8_000 | 16_000 | 48_000))).max_by_key(|s| s.received);
        audio.or_else(|| timed().max_by_key(|s| s.received)).and_then(|s| s.jitter)
    }

    /// The smoothed round trip over this leg, once a consent check was answered.
    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }
}

/// A STUN Binding request's or answer's transaction id; `None` for anything else.
fn binding(p: &[u8]) -> Option<(bool, [u8; 12])> {
    if p.len() < 20 || p[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let request = match u16::from_be_bytes([p[0], p[1]]) {
        0x0001 => true,
        0x0101 | 0x0111 => false,
        _ => return None,
    };
    Some((request, p[8..20].try_into().ok()?))
}

/// An allocation's two legs.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Between the client and the relay.
    pub client: Leg,
    /// Between the relay and its peers.
    pub peer: Leg,
}

impl Health {
    /// A payload the client sent, on its way to a peer.
    pub fn from_client(&mut self, p: &[u8], now: Instant) {
        Self::observe(&mut self.client, &mut self.peer, p, now);
    }

    /// A payload a peer sent, on its way to the client.
    pub fn from_peer(&mut self, p: &[u8], now: Instant) {
        Self::observe(&mut self.peer, &mut self.client, p, now);
    }

    /// `p` arrived over `leg`; a consent check in it goes on over `other`,
    /// whose answer then times `other`'s round trip (and the other way).
    fn observe(leg: &mut Leg, other: &mut Leg, p: &[u8], now: Instant) {
        match classify(p) {
            Kind::Rtp => leg.rtp(p, now),
            Kind::Stun => {
                leg.other_packets += 1;
                match binding(p) {
                    Some((true, tid)) => other.pending = Some((tid, now)),
                    Some((false, tid)) => {
                        if let Some((t, sent)) = leg.pending
                            && t == tid
                        {
                            leg.pending = None;
                            leg.rtt_sample(now.saturating_duration_since(sent));
                        }
                    }
                    None => {}
                }
            }
            _ => leg.other_packets += 1,
        }
    }

    /// What the end-of-allocation log line and the histograms take.
    pub fn summary(&self) -> Summary {
        let leg = |l: &Leg| LegSummary { loss: l.loss(), jitter: l.jitter(), rtt: l.rtt() };
        Summary { client: leg(&self.client), peer: leg(&self.peer) }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LegSummary {
    pub loss: Option<f64>,
    pub jitter: Option<f64>,
    pub rtt: Option<Duration>,
}

/// Both legs in a few numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub client: LegSummary,
    pub peer: LegSummary,
}

/// A histogram with fixed bounds, as the core's stats keep it (summed over shards).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Histogram<const N: usize> {
    /// Observations at or below each bound (not cumulative); the rest are above the last.
    pub buckets: [u64; N],
    pub count: u64,
    pub sum: f64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram { buckets: [0; N], count: 0, sum: 0.0 }
    }
}

impl<const N: usize> Histogram<N> {
    pub fn observe(&mut self, bounds: &[f64; N], v: f64) {
        if let Some(i) = bounds.iter().position(|b| v <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }

    pub fn add(&mut self, o: &Self) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
        self.count += o.count;
        self.sum += o.sum;
    }
}

/// Histogram bounds: loss ratio, jitter and round trip in seconds.
pub const LOSS_BOUNDS: [f64; 9] = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];
pub const JITTER_BOUNDS: [f64; 9] = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32];
pub const RTT_BOUNDS: [f64; 9] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6];

/// Per-leg histograms of ended allocations (index 0: client, 1: peer).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LegHistograms {
    pub loss: [Histogram<9>; 2],
    pub jitter: [Histogram<9>; 2],
    pub rtt: [Histogram<9>; 2],
}

impl LegHistograms {
    /// Files an ended allocation's figures (what is unknown is left out).
    pub fn observe(&mut self, s: &Summary) {
        for (i, l) in [s.client, s.peer].iter().enumerate() {
            if let Some(v) = l.loss {
                self.loss[i].observe(&LOSS_BOUNDS, v);
            }
            if let Some(v) = l.jitter {
                self.jitter[i].observe(&JITTER_BOUNDS, v);
            }
            if let Some(v) = l.rtt {
                self.rtt[i].observe(&RTT_BOUNDS, v.as_secs_f64());
            }
        }
    }

    pub fn add(&mut self, o: &Self) {
        for i in 0..2 {
            self.loss[i].add(&o.loss[i]);
            self.jitter[i].add(&o.jitter[i]);
            self.rtt[i].add(&o.rtt[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(seq: u16, ts: u32, ssrc: u32) -> [u8; 20] {
        let mut p = [0u8; 20];
        p[0] = 0x80;
        p[1] = 111;
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p[4..8].copy_from_slice(&ts.to_be_bytes());
        p[8..12].copy_from_slice(&ssrc.to_be_bytes());
        p
    }

    #[test]
    fn classifies_by_the_first_bytes() {
        assert_eq!(classify(&[0, 1, 0, 0]), Kind::Stun);
        assert_eq!(classify(&[22, 254, 253]), Kind::Dtls);
        assert_eq!(classify(&rtp(1, 2, 3)), Kind::Rtp);
        assert_eq!(classify(&[0x80, 200, 0, 1]), Kind::Rtcp);
        assert_eq!(classify(&[0x80, 111, 0]), Kind::Other, "too short for RTP");
        assert_eq!(classify(&[0x8f; 40]), Kind::Other, "15 CSRCs do not fit");
        assert_eq!(classify(&[]), Kind::Other);
        assert_eq!(classify(&[0x40, 0]), Kind::Other);
    }

    /// A 48 kHz stream of 20 ms packets, `n` of them from `seq0`, skipping `drop`.
    fn feed(leg: &mut Health, t0: Instant, seq0: u16, n: u16, drop: impl Fn(u16) -> bool) {
        for i in 0..n {
            let seq = seq0.wrapping_add(i);
            if !drop(i) {
                leg.from_client(&rtp(seq, 960 * i as u32, 7), t0 + Duration::from_millis(20 * i as u64));
            }
        }
    }

    #[test]
    fn loss_across_the_wrap_and_jitter_once_the_clock_is_known() {
        let t0 = Instant::now();
        let mut h = Health::default();
        // 1000 packets starting near the wrap, every 20th lost (5 %).
        feed(&mut h, t0, 65_000, 1000, |i| i % 20 == 19);
        let s: Vec<_> = h.client.streams().collect();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].expected, s[0].lost), (999, 49), "the last packet lost is not yet expected");
        assert!((h.client.loss().unwrap() - 49.0 / 999.0).abs() < 1e-9);
        assert_eq!(s[0].clock, Some(48_000));
        assert!(s[0].jitter.unwrap() < 1e-6, "perfectly paced: {:?}", s[0].jitter);
        assert_eq!(h.peer.loss(), None, "nothing from the peer");
    }

    #[test]
    fn jitter_follows_rfc_3550_for_alternating_delays() {
        let t0 = Instant::now();
        let mut h = Health::default();
        // Packets 20 ms apart in RTP time, arriving alternately 5 ms early and late.
        for i in 0..400u32 {
            let skew = if i % 2 == 0 { 0 } else { 10 };
            h.from_client(&rtp(i as u16, 960 * i, 9), t0 + Duration::from_millis(20 * i as u64 + skew));
        }
        // |D| is 10 ms every packet: J converges to 10 ms.
        let j = h.client.jitter().unwrap();
        assert!((j - 0.010).abs() < 0.001, "{j}");
    }

    #[test]
    fn the_legs_jitter_is_its_audio_streams_not_a_retransmission_streams() {
        let t0 = Instant::now();
        let mut h = Health::default();
        for i in 0..200u32 {
            let at = t0 + Duration::from_millis(20 * i as u64);
            // Audio, perfectly paced; video (90 kHz), paced; and a sparse
            // repair stream whose timestamps lag by a varying repair delay.
            h.from_client(&rtp(i as u16, 960 * i, 1), at);
            h.from_client(&rtp(i as u16, 1800 * i, 2), at);
            if i % 10 == 0 {
                h.from_client(&rtp((i / 10) as u16, 1800 * i.saturating_sub(3 + i % 7), 3), at);
            }
        }
        let worst = h.client.streams().filter_map(|s| s.jitter).reduce(f64::max).unwrap();
        assert!(worst > 0.001, "the repair stream looks jittery: {worst}");
        assert!(h.client.jitter().unwrap() < 1e-6, "{:?}", h.client.jitter());
    }

    #[test]
    fn streams_that_start_interleaved_are_tracked_from_their_second_packet() {
        let t0 = Instant::now();
        let mut h = Health::default();
        for seq in 0..2u16 {
            for ssrc in [11, 12, 13] {
                h.from_client(&rtp(seq, 0, ssrc), t0);
            }
        }
        let mut tracked: Vec<u32> = h.client.streams().map(|s| s.ssrc).collect();
        tracked.sort();
        assert_eq!(tracked, [11, 12, 13]);
        assert!(h.client.streams().all(|s| s.expected == 2 && s.lost == 0));
    }

    #[test]
    fn reordering_and_duplicates_are_not_loss() {
        let t0 = Instant::now();
        let mut h = Health::default();
        for seq in [1u16, 2, 4, 3, 5, 5, 6, 2, 7] {
            h.from_client(&rtp(seq, seq as u32 * 960, 1), t0);
        }
        let s = h.client.streams().next().unwrap();
        assert_eq!((s.expected, s.received, s.lost, s.reordered, s.duplicates), (7, 7, 0, 1, 2));
    }

    #[test]
    fn a_new_ssrc_needs_two_in_sequence_and_the_table_is_bounded() {
        let t0 = Instant::now();
        let mut h = Health::default();
        // Garbage that looks like RTP: random SSRCs and sequence numbers.
        let mut x = 12345u32;
        for _ in 0..10_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            h.from_client(&rtp((x >> 8) as u16, x, x.rotate_left(7)), t0);
        }
        assert!(h.client.streams().count() <= 1, "garbage was tracked");
        // Six real streams: four tracked, the others counted.
        for ssrc in 100..106 {
            for seq in 0..10 {
                h.from_client(&rtp(seq, 0, ssrc), t0);
            }
        }
        assert_eq!(h.client.streams().count(), MAX_STREAMS);
        assert!(h.client.untracked_packets >= 16);
    }

    #[test]
    fn an_ssrc_restart_after_a_jump_starts_over() {
        let t0 = Instant::now();
        let mut h = Health::default();
        for seq in 0..50u16 {
            h.from_client(&rtp(seq, 0, 3), t0);
        }
        // A jump: one stray packet is ignored, two in sequence restart it.
        h.from_client(&rtp(40_000, 0, 3), t0);
        assert_eq!(h.client.streams().next().unwrap().expected, 50);
        h.from_client(&rtp(40_001, 0, 3), t0);
        h.from_client(&rtp(40_002, 0, 3), t0);
        let s = h.client.streams().next().unwrap();
        assert_eq!((s.expected, s.lost), (2, 0));
    }

    #[test]
    fn consent_checks_time_each_leg() {
        let t0 = Instant::now();
        let mut h = Health::default();
        let mut req = [0u8; 20];
        req[1] = 1;
        req[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        req[8..20].copy_from_slice(b"transaction1");
        let mut resp = req;
        resp[0] = 1;
        resp[1] = 1;
        // The client asks the peer: the answer times the peer leg.
        h.from_client(&req, t0);
        h.from_peer(&resp, t0 + Duration::from_millis(30));
        assert_eq!(h.peer.rtt(), Some(Duration::from_millis(30)));
        assert_eq!(h.client.rtt(), None);
        // The peer asks the client: the client leg.
        req[19] = b'2';
        resp[19] = b'2';
        h.from_peer(&req, t0);
        h.from_client(&resp, t0 + Duration::from_millis(80));
        assert_eq!(h.client.rtt(), Some(Duration::from_millis(80)));
        // An answer to nothing asked is ignored.
        resp[19] = b'9';
        h.from_client(&resp, t0 + Duration::from_secs(5));
        assert_eq!(h.client.rtt(), Some(Duration::from_millis(80)));
        assert_eq!(h.client.loss(), None, "STUN is no RTP");
    }

    #[test]
    fn histograms_file_what_is_known() {
        let mut hs = LegHistograms::default();
        hs.observe(&Summary { client: LegSummary { loss: Some(0.03), jitter: None, rtt: Some(Duration::from_millis(40)) }, peer: LegSummary::default() });
        assert_eq!(hs.loss[0].buckets[4], 1);
        assert_eq!(hs.loss[0].count, 1);
        assert_eq!(hs.jitter[0].count, 0);
        assert_eq!(hs.rtt[0].buckets[3], 1);
        assert_eq!(hs.loss[1].count, 0);
    }
}
