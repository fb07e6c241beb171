//! TCP and TLS client connections (RFC 8656 stream framing): STUN messages
//! and ChannelData (padded to 4 bytes) back to back on one byte stream. One
//! allocation per connection; closing the connection frees it. What a
//! connection may ask of its shard is [`Host`], all it knows of the shard.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ServerConnection;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::{Config, Passthrough};
use crate::net::events::WarnLimiter;
use crate::net::shared::{ConnectionLimits, Shared};
use crate::stun::{frame_len, FrameLen};
use crate::turn::{FiveTuple, Transport};

use super::tcpinfo::TcpFigures;

/// Limits of new TCP/TLS connections (replaced on reload).
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    pub connections: ConnectionLimits,
    pub ipv6_prefix: u8,
    pub handshake: Duration,
    pub idle: Duration,
}

impl From<&Config> for StreamLimits {
    fn from(cfg: &Config) -> Self {
        StreamLimits {
            connections: ConnectionLimits { max_total: cfg.max_connections, max_per_ip: cfg.max_connections_per_ip },
            ipv6_prefix: cfg.ipv6_prefix_per_ip,
            handshake: Duration::from_secs(cfg.tls_handshake_timeout as u64),
            idle: Duration::from_secs(cfg.idle_timeout as u64),
        }
    }
}

/// What a connection task (accepting, then serving a TCP/TLS client) may ask
/// of the shard it runs on. The shard implements it; the connection code
/// knows nothing else of the shard.
pub(in crate::net) trait Host: 'static {
    /// Limits for new connections (replaced on reload).
    fn limits(&self) -> StreamLimits;
    /// SNI routing on TLS listeners, if configured (replaced on reload).
    fn passthrough(&self) -> Option<Rc<Passthrough>>;
    /// The TLS settings handshakes use now (replaced on reload).
    fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor>;
    /// The check page, when on (replaced on reload).
    fn check_site(&self) -> Option<Arc<crate::check::Site>>;
    /// What every shard shares: connection counts, the descriptor budget.
    fn shared(&self) -> &Arc<Shared>;
    /// Stale media dropped on this shard's connections.
    fn stale(&self) -> Rc<StaleDrops>;
    /// Counts a connection refused by a limit.
    fn refused(&mut self);
    /// Counts a TLS handshake that failed or timed out.
    fn handshake_failed(&mut self);
    /// Registers a connection to serve; its conn id (in its 5-tuple).
    fn opened(&mut self, transport: Transport, out: Rc<StreamOut>) -> u32;
    /// Handles framed messages from the client, in order; what they relay
    /// to peers leaves together once they are handled.
    fn on_messages<'a>(&mut self, tuple: FiveTuple, messages: impl Iterator<Item = &'a [u8]>);
    /// Whether the client has an allocation (an idle connection with one stays).
    fn has_allocation(&self, tuple: &FiveTuple) -> bool;
    /// The connection ended: frees its allocation.
    fn closed(&mut self, tuple: FiveTuple);
}

/// Bytes of media queued toward one client before further media is dropped
/// (a slow reader loses packets, as on UDP, instead of growing memory).
pub const MAX_QUEUED: usize = 256 * 1024;
/// Messages (media and answers) queued toward one client before further
/// media is dropped: small messages cost an entry each besides their bytes.
const MAX_QUEUED_MSGS: usize = 2048;
/// Answers queued toward one client (bytes, messages) at which turnd stops
/// reading from it until they drain: a client that does not read its
/// answers is held back by TCP's flow control, at the cost of kernel
/// buffers, instead of growing turnd's memory.
const ANSWERS_BACKLOG: usize = 32 * 1024;
const ANSWERS_BACKLOG_MSGS: usize = 256;
/// Capacity the queue keeps once drained; a stall's larger buffers are
/// given back then (a steady flow stays below this, so nothing is
/// allocated per packet).
const KEEP_BYTES: usize = 64 * 1024;
const KEEP_MSGS: usize = 256;
/// Media (relayed ChannelData and Data indications) older than this when the
/// connection could take it is dropped instead of sent: after a stalled
/// link comes back, a call wants what is being said now, not a backlog that
/// keeps it seconds behind. Answers to requests are never dropped.
pub const MAX_MEDIA_AGE: Duration = Duration::from_millis(200);
/// What one write hands to TLS and the kernel at most; between writes the
/// queue is checked for stale media again.
const WRITE_CHUNK: usize = 16 * 1024;
/// Unsent bytes the kernel keeps for a connection before it stops taking
/// more (TCP_NOTSENT_LOWAT): little, so media waits in the queue above,
/// where it can still be dropped when it grows old, not in the kernel.
pub const KERNEL_UNSENT: u32 = 16 * 1024;
/// Largest frame: a 64 KiB STUN message or padded ChannelData.
const MAX_FRAME: usize = 20 + 65_535 + 3;

/// The send side of one connection, filled by the core's replies and relayed data.
pub struct StreamOut {
    queue: RefCell<Queue>,
    notify: Notify,
    /// Write each message in its own TLS record (some clients read one message per record).
    per_message: bool,
    closed: Cell<bool>,
    /// Where dropped stale media is counted and reported.
    stale: Rc<StaleDrops>,
    /// The connection's socket once it is served (after the TLS handshake),
    /// for its TCP figures; gone when the connection is.
    socket: OnceCell<Weak<TcpStream>>,
}

/// Framed messages waiting for the connection, back to back in `bytes` from
/// `head`, with one entry per message (no allocation per message once the
/// buffers have grown).
#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    head: usize,
    msgs: VecDeque<Queued>,
    media_bytes: usize,
    /// Answers among `msgs`.
    answers: usize,
}

#[derive(Clone, Copy)]
struct Queued {
    len: u32,
    media: bool,
    at: Instant,
}

/// Stale media dropped on every connection, for the metrics and a
/// rate-limited log line.
pub struct StaleDrops {
    pub messages: Cell<u64>,
    log: RefCell<WarnLimiter>,
}

impl StaleDrops {
    pub fn new() -> Rc<Self> {
        Rc::new(StaleDrops { messages: Cell::new(0), log: RefCell::new(WarnLimiter::new()) })
    }

    fn record(&self, client: SocketAddr, n: u64, bytes: usize) {
        self.messages.set(self.messages.get() + n);
        if self.log.borrow_mut().allow() {
            tracing::info!(
                %client, messages = n, bytes, max_age_ms = MAX_MEDIA_AGE.as_millis() as u64,
                "client not reading fast enough: dropped media that would have arrived late"
            );
        }
    }
}

impl Queue {
    fn pending(&self) -> usize {
        self.bytes.len() - self.head
    }

    /// Whether the answers waiting are as many as a client that reads
    /// them may have ([`ANSWERS_BACKLOG`]).
    fn backlogged(&self) -> bool {
        self.pending() - self.media_bytes >= ANSWERS_BACKLOG || self.answers >= ANSWERS_BACKLOG_MSGS
    }

    /// Takes the front message out (its bytes stay until `head` moves on).
    fn pop(&mut self) -> Option<Queued> {
        let m = self.msgs.pop_front()?;
        self.head += m.len as usize;
        if m.media {
            self.media_bytes -= m.len as usize;
        } else {
            self.answers -= 1;
        }
        Some(m)
    }

    /// Moves the bytes still queued to the front of `bytes` once enough
    /// have been sent before them.
    fn compact(&mut self) {
        if self.head > MAX_QUEUED {
            self.bytes.drain(..self.head);
            self.head = 0;
        }
    }

    /// Drops media older than MAX_MEDIA_AGE from the front (up to the first
    /// answer or fresh message), to make room for newer media; returns the
    /// messages dropped.
    fn drop_stale_front(&mut self, now: Instant) -> u64 {
        let mut n = 0;
        while let Some(m) = self.msgs.front().copied() {
            if !m.media || now.saturating_duration_since(m.at) <= MAX_MEDIA_AGE {
                break;
            }
            self.pop();
            n += 1;
        }
        n
    }

    /// Moves what is fresh from the front into `out` (about `max` bytes, at
    /// least one message), dropping media older than MAX_MEDIA_AGE on the
    /// way; returns the messages and bytes dropped.
    fn take(&mut self, out: &mut Vec<u8>, now: Instant, max: usize) -> (u64, usize) {
        let (mut dropped, mut dropped_bytes) = (0u64, 0usize);
        while let Some(m) = self.msgs.front().copied() {
            let len = m.len as usize;
            let stale = m.media && now.saturating_duration_since(m.at) > MAX_MEDIA_AGE;
            if !stale && !out.is_empty() && out.len() + len > max {
                break;
            }
            let at = self.head;
            self.pop();
            if stale {
                dropped += 1;
                dropped_bytes += len;
            } else {
                out.extend_from_slice(&self.bytes[at..at + len]);
            }
        }
        if self.msgs.is_empty() {
            self.bytes.clear();
            self.head = 0;
            // Drained: give back what a stall made grow.
            if self.bytes.capacity() > KEEP_BYTES {
                self.bytes.shrink_to(KEEP_BYTES);
            }
            if self.msgs.capacity() > KEEP_MSGS {
                self.msgs.shrink_to(KEEP_MSGS);
            }
        } else {
            self.compact();
        }
        (dropped, dropped_bytes)
    }
}

/// Keeps the kernel's unsent data for `tcp` small (TCP_NOTSENT_LOWAT), so
/// that what a slow client cannot take waits where old media can still be
/// dropped. Best effort: without it, the kernel's send buffer holds more.
pub fn limit_kernel_unsent(tcp: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let v: libc::c_int = KERNEL_UNSENT as libc::c_int;
    // SAFETY: the descriptor is the open socket `tcp` owns; the option value
    // is a c_int of the size passed.
    let r = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "TCP_NOTSENT_LOWAT not set");
    }
}

impl StreamOut {
    pub fn new(per_message: bool, stale: Rc<StaleDrops>) -> Rc<Self> {
        Rc::new(StreamOut {
            queue: RefCell::new(Queue::default()),
            notify: Notify::new(),
            per_message,
            closed: Cell::new(false),
            stale,
            socket: OnceCell::new(),
        })
    }

    /// The connection's TCP figures now (TCP_INFO); `None` before it is
    /// served or after it closed.
    pub fn tcp_figures(&self) -> Option<TcpFigures> {
        TcpFigures::read(&*self.socket.get()?.upgrade()?)
    }

    /// Queues one framed message, `media` (relayed data, which may be dropped
    /// when it grows old) or an answer (never dropped: the connection stops
    /// reading requests while answers are backlogged); false (and dropped)
    /// when the queue is full.
    pub fn push(&self, msg: &[u8], media: bool, now: Instant) -> bool {
        if self.closed.get() {
            return false;
        }
        let mut q = self.queue.borrow_mut();
        let full = |q: &Queue| {
            if media {
                q.media_bytes + msg.len() > MAX_QUEUED || q.msgs.len() >= MAX_QUEUED_MSGS
            } else {
                // Only reached by a bug: reading stops long before.
                q.pending() - q.media_bytes + msg.len() > MAX_QUEUED
            }
        };
        if media && full(&q) {
            // A stalled client: the oldest media goes first, so what it gets
            // when it reads again is the newest.
            let n = q.drop_stale_front(now);
            self.stale.messages.set(self.stale.messages.get() + n);
            q.compact();
        }
        if full(&q) {
            return false;
        }
        q.bytes.extend_from_slice(msg);
        q.msgs.push_back(Queued { len: msg.len() as u32, media, at: now });
        if media {
            q.media_bytes += msg.len();
        } else {
            q.answers += 1;
        }
        drop(q);
        self.notify.notify_one();
        true
    }

    pub fn close(&self) {
        self.closed.set(true);
        self.notify.notify_one();
    }

    /// Whether the client has left so many answers unread that its
    /// connection stops reading requests until they drain.
    fn backlogged(&self) -> bool {
        self.queue.borrow().backlogged()
    }
}

/// What [`serve`] takes: a TCP connection, or a TLS one whose handshake is done.
pub(in crate::net) trait Accepted {
    fn into_parts(self) -> (TcpStream, Option<ServerConnection>);
}

impl Accepted for TcpStream {
    fn into_parts(self) -> (TcpStream, Option<ServerConnection>) {
        (self, None)
    }
}

impl Accepted for tokio_rustls::server::TlsStream<TcpStream> {
    fn into_parts(self) -> (TcpStream, Option<ServerConnection>) {
        let (tcp, tls) = self.into_inner();
        (tcp, Some(tls))
    }
}

/// Bytes read from a socket per system call at most.
const READ_SIZE: usize = 64 * 1024;
/// Reads per wake-up before the other tasks get a turn.
const READS_PER_WAKE: usize = 8;
/// Plaintext gathered from TLS records before its messages are handled.
const TLS_HANDLE_AT: usize = 16 * 1024;

thread_local! {
    /// What every connection of this thread's shard reads into: one buffer
    /// for all, since a read is handled whole before another task runs.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_SIZE].into_boxed_slice());
}

/// Non-blocking reads and writes on the socket for rustls: WouldBlock when
/// the socket is not ready.
pub(super) struct TryIo<'a>(pub(super) &'a TcpStream);

impl std::io::Read for TryIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl std::io::Write for TryIo<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hands every complete frame at the front of `data` to the core and sends
/// what they relay to peers, gathered (a burst to one peer leaves in one
/// system call); returns the bytes used. Stops early, before a frame, when
/// the answers queued in `out` are backlogged.
fn handle_frames<H: Host>(host: &Weak<RefCell<H>>, tuple: FiveTuple, out: &StreamOut, data: &[u8]) -> std::io::Result<usize> {
    let Some(h) = host.upgrade() else { return Err(std::io::ErrorKind::NotConnected.into()) };
    let (mut at, mut invalid) = (0, false);
    let frames = std::iter::from_fn(|| match frame_len(&data[at..]) {
        FrameLen::Complete(_) if out.backlogged() => None,
        FrameLen::Complete(len) => {
            at += len;
            Some(&data[at - len..at])
        }
        FrameLen::Incomplete => None,
        FrameLen::Invalid => {
            invalid = true;
            None
        }
    });
    h.borrow_mut().on_messages(tuple, frames);
    if invalid {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok(at)
}

/// How a read ended.
enum Read {
    /// The socket has nothing more for now.
    Drained,
    /// Reads left off with more waiting, to let other tasks run.
    More,
    /// The client closed its side (FIN, or TLS close_notify).
    Closed,
    /// Reads left off because the client's answers are backlogged.
    Backlogged,
}

/// One client connection: its socket, TLS state and buffers.
struct Conn {
    /// Shared with nothing: [`StreamOut`] holds only a weak reference, for
    /// the TCP figures.
    tcp: Rc<TcpStream>,
    tls: Option<ServerConnection>,
    /// The start of a message not complete yet (and, over TLS, plaintext
    /// not handled yet).
    rx: Vec<u8>,
    /// Over TCP, messages taken from the queue and not yet written
    /// (`tx_at` of them written); over TLS, rustls holds them as records.
    tx: Vec<u8>,
    tx_at: usize,
    /// `rx` starts with complete messages held back while the client's
    /// answers are backlogged.
    held: bool,
}

impl Conn {
    /// Handles the complete messages in `rx` followed by `data`, keeping the
    /// start of an incomplete one (and, while the client's answers are
    /// backlogged, the messages after it); returns whether a message was
    /// complete.
    fn feed<H: Host>(&mut self, shard: &Weak<RefCell<H>>, tuple: FiveTuple, out: &StreamOut, data: &[u8]) -> std::io::Result<bool> {
        let used = if self.rx.is_empty() {
            let used = handle_frames(shard, tuple, out, data)?;
            self.rx.extend_from_slice(&data[used..]);
            used
        } else {
            self.rx.extend_from_slice(data);
            let used = handle_frames(shard, tuple, out, &self.rx)?;
            self.rx.drain(..used);
            used
        };
        self.held = matches!(frame_len(&self.rx), FrameLen::Complete(_));
        if self.rx.len() > MAX_FRAME && !self.held {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        if self.rx.is_empty() && self.rx.capacity() > 2 * READ_SIZE {
            self.rx = Vec::new();
        }
        Ok(used > 0)
    }

    /// Reads what the socket holds and handles every complete message in
    /// it; `got` is set when one was complete.
    fn read_ready<H: Host>(&mut self, shard: &Weak<RefCell<H>>, tuple: FiveTuple, out: &StreamOut, got: &mut bool) -> std::io::Result<Read> {
        SCRATCH.with_borrow_mut(|scratch| {
            for _ in 0..READS_PER_WAKE {
                if self.held || out.backlogged() {
                    return Ok(Read::Backlogged);
                }
                let (n, drained) = match self.read_some(scratch) {
                    Ok((0, _)) if self.tls.is_some() => {
                        // The TCP connection ended without close_notify: what
                        // it carried may be cut short.
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    Ok((0, _)) => return Ok(Read::Closed),
                    Ok(r) => r,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Read::Drained),
                    Err(e) => return Err(e),
                };
                if self.tls.is_none() {
                    *got |= self.feed(shard, tuple, out, &scratch[..n])?;
                } else if self.decrypt(shard, tuple, out, &scratch[..n], got)? {
                    return Ok(Read::Closed);
                }
                if drained {
                    return Ok(Read::Drained);
                }
            }
            Ok(Read::More)
        })
    }

    /// One read into `buf`: the bytes read, and whether that emptied the
    /// socket (a read shorter than `buf`). Then the socket's readiness is
    /// cleared at once, sparing the read that would only say WouldBlock
    /// (data arriving meanwhile sets it again: tokio clears only the
    /// readiness it had seen before the read).
    fn read_some(&self, buf: &mut [u8]) -> std::io::Result<(usize, bool)> {
        use std::os::fd::AsRawFd as _;
        let mut n = 0;
        let r = self.tcp.try_io(tokio::io::Interest::READABLE, || {
            let k = loop {
                // SAFETY: `buf` is valid for writes of its length for the
                // call; the descriptor is the open socket `self.tcp` owns.
                let k = unsafe { libc::recv(self.tcp.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if k >= 0 {
                    break k;
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            };
            n = k as usize;
            if n > 0 && n < buf.len() {
                Err(std::io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => Ok((n, false)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && n > 0 => Ok((n, true)),
            Err(e) => Err(e),
        }
    }

    /// Takes TLS records from `input`, handling the messages they carry;
    /// returns true when the client sent close_notify.
    fn decrypt<H: Host>(&mut self, shard: &Weak<RefCell<H>>, tuple: FiveTuple, out: &StreamOut, mut input: &[u8], got: &mut bool) -> std::io::Result<bool> {
        let mut closed = false;
        loop {
            let tls = self.tls.as_mut().expect("a TLS connection");
            // After close_notify rustls takes nothing more: what follows it is dropped.
            if !input.is_empty() && tls.read_tls(&mut input)? == 0 {
                input = &[];
            }
            let state = match tls.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    // Tell the client why (an alert), as far as the socket takes it.
                    let _ = tls.write_tls(&mut TryIo(&self.tcp));
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                }
            };
            closed |= state.peer_has_closed();
            if state.plaintext_bytes_to_read() > 0 {
                let mut r = tls.reader();
                while let Ok(chunk) = std::io::BufRead::fill_buf(&mut r) {
                    if chunk.is_empty() {
                        break;
                    }
                    self.rx.extend_from_slice(chunk);
                    let n = chunk.len();
                    std::io::BufRead::consume(&mut r, n);
                }
            }
            if (input.is_empty() || self.rx.len() >= TLS_HANDLE_AT) && !self.held {
                *got |= self.feed(shard, tuple, out, &[])?;
            }
            if input.is_empty() {
                return Ok(closed);
            }
        }
    }

    /// Writes what waits, one system call at a time until done or the
    /// socket is full; false when it is full.
    fn write_pending(&mut self) -> std::io::Result<bool> {
        match &mut self.tls {
            Some(tls) => {
                // All records waiting go in one writev.
                while tls.wants_write() {
                    match tls.write_tls(&mut TryIo(&self.tcp)) {
                        Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) => return Err(e),
                    }
                }
            }
            None => {
                while self.tx_at < self.tx.len() {
                    match self.tcp.try_write(&self.tx[self.tx_at..]) {
                        Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                        Ok(n) => self.tx_at += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) => return Err(e),
                    }
                }
                self.tx.clear();
                self.tx_at = 0;
            }
        }
        Ok(true)
    }

    /// Writes what is queued for the client: all the messages queued (up to
    /// WRITE_CHUNK at a time) leave in one system call, over TLS each in its
    /// own record when `per_message`. Returns false when the socket is full
    /// and something still waits.
    fn write_ready(&mut self, out: &StreamOut, client: SocketAddr) -> std::io::Result<bool> {
        loop {
            if !self.write_pending()? {
                return Ok(false);
            }
            let (dropped, bytes) = out.queue.borrow_mut().take(&mut self.tx, Instant::now(), WRITE_CHUNK);
            if dropped > 0 {
                out.stale.record(client, dropped, bytes);
            }
            if self.tx.is_empty() {
                return Ok(true);
            }
            if let Some(tls) = &mut self.tls {
                let mut w = tls.writer();
                if out.per_message {
                    let mut at = 0;
                    while let FrameLen::Complete(n) = frame_len(&self.tx[at..]) {
                        std::io::Write::write_all(&mut w, &self.tx[at..at + n])?;
                        at += n;
                    }
                } else {
                    std::io::Write::write_all(&mut w, &self.tx)?;
                }
                self.tx.clear();
            }
        }
    }

    /// Sends what is left, then close_notify over TLS, then FIN; gives up at `deadline`.
    async fn shutdown(&mut self, deadline: tokio::time::Instant) -> std::io::Result<()> {
        if let Some(tls) = &mut self.tls {
            tls.send_close_notify();
        }
        while !self.write_pending()? {
            match tokio::time::timeout_at(deadline, self.tcp.writable()).await {
                Ok(r) => r?,
                Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            }
        }
        socket2::SockRef::from(&*self.tcp).shutdown(std::net::Shutdown::Write)
    }

    /// Serves the connection until the client closes (and what is queued
    /// for it has gone), the stream breaks framing, or it idles without an
    /// allocation.
    async fn run<H: Host>(&mut self, shard: &Weak<RefCell<H>>, tuple: FiveTuple, out: &StreamOut, idle: Duration) -> std::io::Result<()> {
        use tokio::time::Instant as TokioInstant;
        let mut reading = true;
        // The client closed its side: ours closes once every message it sent
        // has been handled (some may be held back while its answers are
        // backlogged) and every answer has gone.
        let mut closing = false;
        // Idle time counts from the last complete message, so a client that
        // trickles a partial frame a byte at a time (slowloris) is cut too.
        let mut last_msg = TokioInstant::now();
        let sleep = tokio::time::sleep_until(last_msg + idle);
        tokio::pin!(sleep);
        // What the handshake read past its end is already decrypted.
        if self.tls.is_some() {
            let mut got = false;
            if self.decrypt(shard, tuple, out, &[], &mut got)? {
                reading = false;
                closing = true;
                sleep.as_mut().reset(TokioInstant::now() + idle);
            }
        }
        loop {
            // Everything queued goes out, also after close (answers to what
            // the client sent before it closed its side); then ours closes.
            let sent = self.write_ready(out, tuple.client)?;
            if self.held && !out.backlogged() {
                // The client has read enough of its answers: the messages
                // held back go on (and reading after them).
                if self.feed(shard, tuple, out, &[])? {
                    last_msg = TokioInstant::now();
                }
                continue;
            }
            if closing && !self.held {
                out.close();
            }
            if sent && out.closed.get() {
                return self.shutdown(TokioInstant::now() + idle).await;
            }
            // Backlogged answers leave `sent` false: the writable branch
            // below wakes this loop as they drain.
            let backlogged = self.held || out.backlogged();
            tokio::select! {
                r = self.tcp.readable(), if reading && !backlogged => {
                    r?;
                    let mut got = false;
                    let read = self.read_ready(shard, tuple, out, &mut got)?;
                    if got {
                        last_msg = TokioInstant::now();
                    }
                    match read {
                        Read::Drained | Read::Backlogged => {}
                        Read::More => tokio::task::yield_now().await,
                        Read::Closed => {
                            // Handle what it sent (a TLS read may bring the
                            // close with messages still held back) and send
                            // the answers before closing, within the idle
                            // timeout (it may not be reading).
                            reading = false;
                            closing = true;
                            sleep.as_mut().reset(TokioInstant::now() + idle);
                        }
                    }
                }
                r = self.tcp.writable(), if !sent => r?,
                _ = out.notify.notified(), if sent => {}
                _ = &mut sleep => {
                    if !reading {
                        return Err(std::io::ErrorKind::TimedOut.into());
                    }
                    let now = TokioInstant::now();
                    if now < last_msg + idle {
                        sleep.as_mut().reset(last_msg + idle);
                        continue;
                    }
                    // Idle: fine while an allocation lives (media may pause), not otherwise.
                    let Some(sh) = shard.upgrade() else { return Ok(()) };
                    if sh.borrow().has_allocation(&tuple) {
                        last_msg = now;
                        sleep.as_mut().reset(now + idle);
                    } else {
                        reading = false;
                        out.close();
                        sleep.as_mut().reset(now + idle);
                    }
                }
            }
        }
    }
}

/// Runs one client connection to the end, then frees its allocation.
pub(in crate::net) async fn serve<H: Host>(shard: Weak<RefCell<H>>, stream: impl Accepted, tuple: FiveTuple, out: Rc<StreamOut>, idle: Duration) {
    let (tcp, tls) = stream.into_parts();
    let tcp = Rc::new(tcp);
    let _ = out.socket.set(Rc::downgrade(&tcp));
    let mut conn = Conn { tcp, tls, rx: Vec::new(), tx: Vec::new(), tx_at: 0, held: false };
    if let Err(e) = conn.run(&shard, tuple, &out, idle).await {
        tracing::debug!(client = %tuple.client, error = %e, "connection ended");
    }
    out.close();
    if let Some(sh) = shard.upgrade() {
        sh.borrow_mut().closed(tuple);
    }
}
