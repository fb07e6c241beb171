//! One client's connection to the server, over UDP, TCP or TLS.

use super::*;

// ---------------------------------------------------------------------------
// One client's connection to the server

pub(super) enum Link {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(TcpStream, Box<ClientConnection>),
}

pub(super) struct Conn {
    pub(super) link: Link,
    /// Stream bytes received and not yet framed.
    pub(super) rbuf: Vec<u8>,
    /// Stream bytes (TCP: raw; TLS: already handed to rustls) not yet written.
    pub(super) wbuf: Vec<u8>,
    pub(super) wpos: usize,
    pub(super) closed: bool,
}

impl Conn {
    pub(super) fn connect(server: SocketAddr, kind: Kind, tls: Option<&Arc<ClientConfig>>, deadline: Instant) -> Result<Conn> {
        let link = match kind {
            Kind::Udp => {
                let local: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
                let s = UdpSocket::bind(local)?;
                s.connect(server)?;
                Link::Udp(s)
            }
            Kind::Tcp | Kind::Tls => {
                let s = loop {
                    match TcpStream::connect_timeout(&server, Duration::from_secs(1)) {
                        Ok(s) => break s,
                        Err(e) if Instant::now() < deadline => {
                            let _ = e;
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(e) => return Err(e).with_context(|| format!("connect {server}")),
                    }
                };
                s.set_nodelay(true)?;
                if kind == Kind::Tls {
                    let name = ServerName::from(server.ip());
                    let c = ClientConnection::new(tls.expect("tls config").clone(), name)?;
                    Link::Tls(s, Box::new(c))
                } else {
                    Link::Tcp(s)
                }
            }
        };
        let mut c = Conn { link, rbuf: Vec::with_capacity(1 << 16), wbuf: Vec::new(), wpos: 0, closed: false };
        set_buffers(c.fd());
        if let Link::Tls(s, t) = &mut c.link {
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            while t.is_handshaking() {
                t.complete_io(s).context("TLS handshake")?;
            }
        }
        Ok(c)
    }

    pub(super) fn fd(&self) -> RawFd {
        match &self.link {
            Link::Udp(s) => s.as_raw_fd(),
            Link::Tcp(s) | Link::Tls(s, _) => s.as_raw_fd(),
        }
    }

    pub(super) fn is_stream(&self) -> bool {
        !matches!(self.link, Link::Udp(_))
    }

    // --- blocking use, for setup and teardown ---

    pub(super) fn send_blocking(&mut self, msg: &[u8]) -> io::Result<()> {
        match &mut self.link {
            Link::Udp(s) => s.send(msg).map(|_| ()),
            Link::Tcp(s) => s.write_all(msg),
            Link::Tls(s, t) => {
                t.writer().write_all(msg)?;
                while t.wants_write() {
                    t.write_tls(s)?;
                }
                Ok(())
            }
        }
    }

    /// One message (a datagram or one framed stream message), or `None` when
    /// `deadline` passes first.
    pub(super) fn recv_blocking(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 65536];
        loop {
            if self.is_stream() {
                match frame_len(&self.rbuf) {
                    FrameLen::Complete(n) => return Ok(Some(self.rbuf.drain(..n).collect())),
                    FrameLen::Invalid => return Err(io::Error::new(io::ErrorKind::InvalidData, "unframeable stream")),
                    FrameLen::Incomplete => {}
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let left = left.max(Duration::from_millis(1));
            let r = match &mut self.link {
                Link::Udp(s) => {
                    s.set_read_timeout(Some(left))?;
                    match s.recv(&mut buf) {
                        Ok(n) => return Ok(Some(buf[..n].to_vec())),
                        Err(e) => Err(e),
                    }
                }
                Link::Tcp(s) => {
                    s.set_read_timeout(Some(left))?;
                    s.read(&mut buf).inspect(|&n| self.rbuf.extend_from_slice(&buf[..n]))
                }
                Link::Tls(s, t) => {
                    s.set_read_timeout(Some(left))?;
                    match t.reader().read(&mut buf) {
                        Ok(n) if n > 0 => {
                            self.rbuf.extend_from_slice(&buf[..n]);
                            Ok(n)
                        }
                        Ok(_) => Ok(0),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => match t.read_tls(s) {
                            Ok(0) => Ok(0),
                            Ok(n) => {
                                t.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                                Ok(n)
                            }
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    }
                }
            };
            match r {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection")),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a request and waits for the response with its transaction id
    /// (UDP: retransmitted at 250 ms, 500 ms, ...). `None` on timeout.
    pub(super) fn transact(&mut self, req: &[u8], timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let tid: [u8; 12] = req[8..20].try_into().unwrap();
        let end = Instant::now() + timeout;
        let mut rto = Duration::from_millis(250);
        loop {
            self.send_blocking(req)?;
            let next = if self.is_stream() { end } else { (Instant::now() + rto).min(end) };
            rto *= 2;
            loop {
                match self.recv_blocking(next)? {
                    Some(m) if m.len() >= 20 && m[0] & 0xC0 == 0 && m[8..20] == tid => return Ok(Some(m)),
                    Some(_) => continue, // stray data or an old answer
                    None => break,
                }
            }
            if Instant::now() >= end {
                return Ok(None);
            }
        }
    }

    // --- non-blocking use, in the data phase ---

    /// Writes what is pending; true when everything went out.
    pub(super) fn flush(&mut self) -> bool {
        loop {
            let r = match &mut self.link {
                Link::Udp(_) => return true,
                Link::Tcp(s) => {
                    if self.wpos == self.wbuf.len() {
                        self.wbuf.clear();
                        self.wpos = 0;
                        return true;
                    }
                    s.write(&self.wbuf[self.wpos..]).map(|n| self.wpos += n)
                }
                Link::Tls(s, t) => {
                    if !t.wants_write() {
                        return true;
                    }
                    t.write_tls(s).map(|_| ())
                }
            };
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => {
                    self.closed = true;
                    return false;
                }
            }
        }
    }

    /// Whether stream bytes wait for the socket to take them.
    pub(super) fn pending(&self) -> bool {
        match &self.link {
            Link::Udp(_) => false,
            Link::Tcp(_) => self.wpos < self.wbuf.len(),
            Link::Tls(_, t) => t.wants_write(),
        }
    }

    /// Queues one framed message on a stream.
    pub(super) fn queue(&mut self, msg: &[u8]) {
        match &mut self.link {
            Link::Udp(_) => unreachable!(),
            Link::Tcp(_) => self.wbuf.extend_from_slice(msg),
            Link::Tls(_, t) => {
                // Unlimited buffer (set at setup): the whole message is taken.
                let _ = t.writer().write_all(msg);
            }
        }
    }

    /// Reads what the stream has; appends plaintext to `rbuf`. False once the stream is closed.
    pub(super) fn fill(&mut self, scratch: &mut [u8]) -> bool {
        loop {
            let r = match &mut self.link {
                Link::Udp(_) => return true,
                Link::Tcp(s) => s.read(scratch).inspect(|&n| self.rbuf.extend_from_slice(&scratch[..n])),
                Link::Tls(s, t) => match t.read_tls(s) {
                    Ok(0) => Ok(0),
                    Ok(n) => {
                        if t.process_new_packets().is_err() {
                            self.closed = true;
                            return false;
                        }
                        loop {
                            match t.reader().read(scratch) {
                                Ok(0) => break,
                                Ok(k) => self.rbuf.extend_from_slice(&scratch[..k]),
                                Err(_) => break,
                            }
                        }
                        Ok(n)
                    }
                    Err(e) => Err(e),
                },
            };
            match r {
                Ok(0) => {
                    self.closed = true;
                    return false;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => {
                    self.closed = true;
                    return false;
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    Udp,
    Tcp,
    Tls,
}
