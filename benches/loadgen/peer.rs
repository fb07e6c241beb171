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

impl Peer {
    pub(super) fn start(ip: IpAddr, port: u16, batch: usize, cap: usize, gso: bool) -> Result<Peer> {
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
