//! The data phase: paced generation, echoes matched to what was sent.

use super::*;

// ---------------------------------------------------------------------------
// The data phase

pub(super) struct Client {
    pub(super) conn: Conn,
    /// The message as sent, with the stamp at `off..off + STAMP`.
    pub(super) tmpl: Vec<u8>,
    pub(super) off: usize,
    /// With --fingerprint: the CRC-32 state over `tmpl[..off]`.
    pub(super) crc_prefix: Option<u32>,
    /// Messages sent, and the highest sequence number echoed: what is in
    /// flight is the difference (the relay keeps a client's order, and a gap
    /// below the highest echo is a loss).
    pub(super) sent_seq: u64,
    pub(super) rx_seq: u64,
    pub(super) last_rx_ns: u64,
    pub(super) session: Option<Session>,
}

impl Client {
    pub(super) fn inflight(&self) -> u32 {
        (self.sent_seq - self.rx_seq).min(u32::MAX as u64) as u32
    }
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) sent: u64,
    /// Messages the socket would not take (EAGAIN, or a stream still blocked on earlier data).
    pub(super) unsent: u64,
    /// Messages the pacer dropped after falling more than 2 ms behind (the generator was stalled).
    pub(super) skipped: u64,
    /// Echoes received (any time).
    pub(super) rx: u64,
    /// Sent during the timed window, and of those, echoed.
    pub(super) sent_window: u64,
    pub(super) rx_window: u64,
    /// Received frames that were not an echo of ours.
    pub(super) stray: u64,
}

pub(super) struct Window {
    pub(super) start_ns: u64,
    pub(super) end_ns: u64,
}

impl Window {
    pub(super) fn contains(&self, ts: u64) -> bool {
        ts >= self.start_ns && ts < self.end_ns
    }
}

pub(super) use turnd::stun::crc32_update;

/// Rewrites the FINGERPRINT (the last 8 bytes of `msg`) after the bytes
/// from `from` on changed; `prefix` is the CRC state over `msg[..from]`.
pub(super) fn finish_fingerprint(msg: &mut [u8], from: usize, prefix: u32) {
    let end = msg.len() - 8;
    let crc = !crc32_update(prefix, &msg[from..end]) ^ 0x5354_554E;
    msg[end + 4..].copy_from_slice(&crc.to_be_bytes());
}

/// Where the payload is in an echoed message, without checking more than needed.
pub(super) fn payload_of(msg: &[u8], indications: bool, raw: bool) -> Option<&[u8]> {
    if raw {
        return Some(msg);
    }
    if !indications {
        return ChannelData::parse(msg).map(|c| c.data);
    }
    // A Data indication (0x0017): walk to the DATA attribute.
    if msg.len() < 20 || msg[0] != 0x00 || msg[1] != 0x17 {
        return None;
    }
    let end = (20 + u16::from_be_bytes([msg[2], msg[3]]) as usize).min(msg.len());
    let mut at = 20;
    while at + 4 <= end {
        let t = u16::from_be_bytes([msg[at], msg[at + 1]]);
        let l = u16::from_be_bytes([msg[at + 2], msg[at + 3]]) as usize;
        if at + 4 + l > end {
            return None;
        }
        if t == attr::DATA {
            return Some(&msg[at + 4..at + 4 + l]);
        }
        at += 4 + ((l + 3) & !3);
    }
    None
}

pub(super) struct Gen<'a> {
    pub(super) args: &'a Args,
    pub(super) gso: bool,
    pub(super) tag: u32,
    pub(super) base: Instant,
    pub(super) clients: Vec<Client>,
    pub(super) c: Counters,
    pub(super) hist: Histogram,
    pub(super) win: Window,
    /// With --flows: what each client received back, by sequence number.
    pub(super) flows: Option<FlowLog>,
}

impl Gen<'_> {
    pub(super) fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Accounts one received message from client `ci`.
    pub(super) fn on_message(&mut self, ci: usize, msg: &[u8], now: u64) {
        let Some(p) = payload_of(msg, self.args.indications, self.args.raw) else {
            self.c.stray += 1;
            return;
        };
        if p.len() < STAMP {
            self.c.stray += 1;
            return;
        }
        let p = &p[p.len() - STAMP..];
        if u32::from_be_bytes(p[20..24].try_into().unwrap()) != self.tag {
            self.c.stray += 1;
            return;
        }
        let ts = u64::from_be_bytes(p[0..8].try_into().unwrap());
        self.c.rx += 1;
        let cl = &mut self.clients[ci];
        let seq = u64::from_be_bytes(p[8..16].try_into().unwrap());
        cl.rx_seq = cl.rx_seq.max(seq.min(cl.sent_seq));
        cl.last_rx_ns = now;
        if let Some(f) = &mut self.flows {
            // Another client's datagram on this socket counts as misrouted.
            let from = u32::from_be_bytes(p[16..20].try_into().unwrap()) as usize;
            f.arrived(if from == ci { ci } else { usize::MAX }, seq, now);
        }
        if self.win.contains(ts) {
            self.c.rx_window += 1;
            self.hist.record(now.saturating_sub(ts));
        }
    }

    /// Sends `k` messages from client `ci`; returns how many went out.
    pub(super) fn send(&mut self, ci: usize, k: usize, now: u64, in_window: bool, m: &mut Mmsg) -> usize {
        let stream = self.clients[ci].conn.is_stream();
        let rtp = self.args.rtp;
        let mut stamp = [0u8; STAMP];
        stamp[0..8].copy_from_slice(&now.to_be_bytes());
        stamp[16..20].copy_from_slice(&(ci as u32).to_be_bytes());
        stamp[20..24].copy_from_slice(&self.tag.to_be_bytes());
        let sent = if stream {
            let cl = &mut self.clients[ci];
            if cl.conn.closed || !cl.conn.flush() {
                // Still blocked on earlier data: offer nothing more now.
                0
            } else {
                for i in 0..k {
                    let seq = cl.sent_seq + 1 + i as u64;
                    stamp[8..16].copy_from_slice(&seq.to_be_bytes());
                    if rtp {
                        super::participants::rtp_advance(&mut cl.tmpl, now);
                    }
                    let off = cl.off;
                    cl.tmpl[off..off + STAMP].copy_from_slice(&stamp);
                    if let Some(c) = cl.crc_prefix {
                        finish_fingerprint(&mut cl.tmpl, off, c);
                    }
                    cl.conn.queue(&cl.tmpl);
                }
                cl.conn.flush();
                k
            }
        } else {
            let k = k.min(m.slots());
            let cl = &mut self.clients[ci];
            let len = cl.tmpl.len();
            for i in 0..k {
                let seq = cl.sent_seq + 1 + i as u64;
                stamp[8..16].copy_from_slice(&seq.to_be_bytes());
                if rtp {
                    super::participants::rtp_advance(&mut cl.tmpl, now);
                }
                let b = m.buf_mut(i);
                b[..len].copy_from_slice(&cl.tmpl);
                b[cl.off..cl.off + STAMP].copy_from_slice(&stamp);
                if let Some(c) = cl.crc_prefix {
                    finish_fingerprint(&mut b[..len], cl.off, c);
                }
                m.prepare(i, len, None);
            }
            if self.gso {
                match m.send_gso(cl.conn.fd(), k) {
                    Ok(sent) => sent,
                    Err(e) => {
                        eprintln!("loadgen: UDP GSO refused ({e}); plain sendmmsg from now on");
                        self.gso = false;
                        m.send(cl.conn.fd(), 0, k)
                    }
                }
            } else {
                m.send(cl.conn.fd(), 0, k)
            }
        };
        self.c.sent += sent as u64;
        self.c.unsent += (k - sent) as u64;
        if in_window {
            self.c.sent_window += sent as u64;
        }
        self.clients[ci].sent_seq += sent as u64;
        sent
    }

    pub(super) fn receive(&mut self, ci: usize, m: &mut Mmsg, scratch: &mut [u8]) {
        if self.clients[ci].conn.is_stream() {
            let cl = &mut self.clients[ci];
            cl.conn.fill(scratch);
            cl.conn.flush();
            let now = self.now_ns();
            let mut rbuf = std::mem::take(&mut self.clients[ci].conn.rbuf);
            let mut at = 0;
            loop {
                match frame_len(&rbuf[at..]) {
                    FrameLen::Complete(n) => {
                        self.on_message(ci, &rbuf[at..at + n], now);
                        at += n;
                    }
                    FrameLen::Incomplete => break,
                    FrameLen::Invalid => {
                        self.clients[ci].conn.closed = true;
                        at = rbuf.len();
                        break;
                    }
                }
            }
            rbuf.drain(..at);
            self.clients[ci].conn.rbuf = rbuf;
        } else {
            let fd = self.clients[ci].conn.fd();
            for _ in 0..4 {
                let n = match m.recv(fd, false) {
                    Ok(n) if n > 0 => n,
                    _ => break,
                };
                let now = self.now_ns();
                for i in 0..n {
                    self.on_message(ci, m.data(i), now);
                }
                if n < m.slots() {
                    break;
                }
            }
        }
    }
}
