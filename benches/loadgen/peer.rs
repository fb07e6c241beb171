//! The echo peer, and the TLS client configuration.

use super::*;

// ---------------------------------------------------------------------------
// The echo peer

pub(super) struct Peer {
    pub(super) addr: SocketAddr,
    pub(super) rx: Arc<AtomicU64>,
    pub(super) tx: Arc<AtomicU64>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

/// What the echo peer measures of a timed window (participants mode): the
/// datagrams it received whose send stamp falls in the window, how many of
/// those it echoed, and their one-way latency client → relay → peer (the
/// generator and the peer share `base`, so the stamp is comparable).
pub(super) struct PeerWin {
    pub(super) base: Instant,
    pub(super) tag: u32,
    pub(super) start_ns: AtomicU64,
    pub(super) end_ns: AtomicU64,
    pub(super) rx: AtomicU64,
    pub(super) tx: AtomicU64,
    pub(super) oneway: std::sync::Mutex<Histogram>,
}

impl PeerWin {
    pub(super) fn new(base: Instant, tag: u32) -> PeerWin {
        PeerWin {
            base,
            tag,
            start_ns: AtomicU64::new(u64::MAX),
            end_ns: AtomicU64::new(u64::MAX),
            rx: AtomicU64::new(0),
            tx: AtomicU64::new(0),
            oneway: std::sync::Mutex::new(Histogram::new()),
        }
    }

    /// Starts a new window (counts and histogram emptied); it ends at `end_ns`.
    pub(super) fn reset(&self, start_ns: u64, end_ns: u64) {
        self.rx.store(0, Ordering::Relaxed);
        self.tx.store(0, Ordering::Relaxed);
        *self.oneway.lock().unwrap() = Histogram::new();
        self.end_ns.store(end_ns, Ordering::Relaxed);
        self.start_ns.store(start_ns, Ordering::Relaxed);
    }

    /// Counts slots `0..n` of a received batch; `sent` of them were echoed.
    fn account(&self, m: &Mmsg, n: usize, sent: usize, in_win: &mut [bool]) {
        let (lo, hi) = (self.start_ns.load(Ordering::Relaxed), self.end_ns.load(Ordering::Relaxed));
        let now = self.base.elapsed().as_nanos() as u64;
        let mut h = self.oneway.lock().unwrap();
        let (mut rx, mut tx) = (0, 0);
        for (i, w) in in_win.iter_mut().enumerate().take(n) {
            let d = m.data(i);
            *w = false;
            if d.len() < STAMP {
                continue;
            }
            let p = &d[d.len() - STAMP..];
            let ts = u64::from_be_bytes(p[0..8].try_into().unwrap());
            if u32::from_be_bytes(p[20..24].try_into().unwrap()) != self.tag || ts < lo || ts >= hi {
                continue;
            }
            *w = true;
            rx += 1;
            tx += (i < sent) as u64;
            h.record(now.saturating_sub(ts));
        }
        self.rx.fetch_add(rx, Ordering::Relaxed);
        self.tx.fetch_add(tx, Ordering::Relaxed);
    }
}

impl Peer {
    pub(super) fn start(ip: IpAddr, port: u16, batch: usize, cap: usize, gso: bool) -> Result<Peer> {
        Self::start_with(ip, port, batch, cap, gso, None, None)
    }

    /// As `start`, and with `win` counts what each timed window sent it;
    /// with `flows`, what each flow sent it and what it echoed (--flows).
    pub(super) fn start_with(
        ip: IpAddr,
        port: u16,
        batch: usize,
        cap: usize,
        gso: bool,
        win: Option<Arc<PeerWin>>,
        flows: Option<Arc<PeerFlows>>,
    ) -> Result<Peer> {
        let sock = UdpSocket::bind((ip, port)).with_context(|| format!("echo peer: bind {ip}:{port}"))?;
        sock.set_nonblocking(true)?;
        set_buffers(sock.as_raw_fd());
        let addr = sock.local_addr()?;
        let (rx, tx, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (rx2, tx2, stop2) = (rx.clone(), tx.clone(), stop.clone());
        let mut ep = Epoll::new(4)?;
        ep.add(sock.as_raw_fd(), libc::EPOLLIN as u32, 0)?;
        let thread = std::thread::Builder::new().name("echo-peer".into()).spawn(move || {
            let fd = sock.as_raw_fd();
            let mut m = Mmsg::new(batch, cap);
            let mut gso = gso;
            let mut in_win = vec![false; batch];
            while !stop2.load(Ordering::Relaxed) {
                ep.wait(50);
                // Drain the socket, echoing each batch back to its senders.
                loop {
                    let n = match m.recv(fd, true) {
                        Ok(n) if n > 0 => n,
                        _ => break,
                    };
                    rx2.fetch_add(n as u64, Ordering::Relaxed);
                    for i in 0..n {
                        m.prepare_echo(i);
                    }
                    let sent = if gso {
                        match m.send_gso(fd, n) {
                            Ok(k) => k,
                            Err(e) => {
                                eprintln!("loadgen: echo peer: UDP GSO refused ({e}); plain sendmmsg from now on");
                                gso = false;
                                m.send(fd, 0, n)
                            }
                        }
                    } else {
                        m.send(fd, 0, n)
                    };
                    tx2.fetch_add(sent as u64, Ordering::Relaxed);
                    if let Some(w) = &win {
                        // prepare_echo kept each slot's data and length.
                        w.account(&m, n, sent, &mut in_win);
                    }
                    if let Some(f) = &flows {
                        f.account(&m, n, sent);
                    }
                    if n < m.slots() {
                        break;
                    }
                }
            }
            drop(sock);
        })?;
        Ok(Peer { addr, rx, tx, stop, thread: Some(thread) })
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}


/// TLS without certificate checks (a benchmark talks to a self-signed
/// server): the client side turnctl check uses, in its insecure mode.
pub(super) fn tls_config() -> Result<Arc<ClientConfig>> {
    turnd::client::cert::client_config(None, true).map(|(cfg, _)| cfg).map_err(|e| anyhow!(e))
}
