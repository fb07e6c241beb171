//! TCP and TLS client connections (RFC 8656 stream framing): STUN messages
//! and ChannelData (padded to 4 bytes) back to back on one byte stream. One
//! allocation per connection; closing the connection frees it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::Shard;
use crate::stun::{frame_len, FrameLen};
use crate::turn::FiveTuple;

/// Bytes of media queued toward one client before further media is dropped
/// (a slow reader loses packets, as on UDP, instead of growing memory).
/// Answers to its requests may take as much again.
pub const MAX_QUEUED: usize = 256 * 1024;
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
const READ_CHUNK: usize = 16 * 1024;

/// The send side of one connection, filled by the core's replies and relayed data.
pub struct StreamOut {
    queue: RefCell<Queue>,
    notify: Notify,
    /// Write each message in its own TLS record (some clients read one message per record).
    per_message: bool,
    closed: Cell<bool>,
    /// Where dropped stale media is counted and reported.
    stale: Rc<StaleDrops>,
    /// What the connection counts against in the per-IP limit ([`per_ip_key`]),
    /// kept so a reload that changes the prefix still uncounts it right.
    pub ip_key: Cell<IpAddr>,
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
}

#[derive(Clone, Copy)]
struct Queued {
    len: usize,
    at: Instant,
    media: bool,
}

/// Stale media dropped on every connection, for the metrics and a
/// rate-limited log line.
pub struct StaleDrops {
    pub messages: Cell<u64>,
    log: RefCell<super::WarnLimiter>,
}

impl StaleDrops {
    pub fn new() -> Rc<Self> {
        Rc::new(StaleDrops { messages: Cell::new(0), log: RefCell::new(super::WarnLimiter::new()) })
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

    /// Drops media older than MAX_MEDIA_AGE from the front (up to the first
    /// answer or fresh message), to make room for newer media; returns the
    /// messages dropped.
    fn drop_stale_front(&mut self, now: Instant) -> u64 {
        let mut n = 0;
        while let Some(m) = self.msgs.front().copied() {
            if !m.media || now.saturating_duration_since(m.at) <= MAX_MEDIA_AGE {
                break;
            }
            self.msgs.pop_front();
            self.head += m.len;
            self.media_bytes -= m.len;
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
            let stale = m.media && now.saturating_duration_since(m.at) > MAX_MEDIA_AGE;
            if !stale && !out.is_empty() && out.len() + m.len > max {
                break;
            }
            self.msgs.pop_front();
            let bytes = &self.bytes[self.head..self.head + m.len];
            self.head += m.len;
            if m.media {
                self.media_bytes -= m.len;
            }
            if stale {
                dropped += 1;
                dropped_bytes += m.len;
            } else {
                out.extend_from_slice(bytes);
            }
        }
        if self.msgs.is_empty() {
            self.bytes.clear();
            self.head = 0;
            if self.bytes.capacity() > 4 * MAX_QUEUED {
                self.bytes.shrink_to(MAX_QUEUED);
            }
        } else if self.head > MAX_QUEUED {
            self.bytes.drain(..self.head);
            self.head = 0;
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

/// The key the per-IP connection limit counts by: an IPv4 address itself
/// (also when written IPv4-mapped), an IPv6 address cut to its first
/// `v6_prefix` bits, since one subscriber or host usually holds a whole /64.
pub fn per_ip_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = v6_prefix.min(128) as u32;
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
        v4 => v4,
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
            ip_key: Cell::new(IpAddr::from([0u8; 4])),
        })
    }

    /// Queues one framed message, `media` (relayed data, which may be dropped
    /// when it grows old) or an answer (never dropped); false (and dropped)
    /// when the queue is full.
    pub fn push(&self, msg: &[u8], media: bool, now: Instant) -> bool {
        if self.closed.get() {
            return false;
        }
        let mut q = self.queue.borrow_mut();
        if media && q.media_bytes + msg.len() > MAX_QUEUED {
            // A stalled client: the oldest media goes first, so what it gets
            // when it reads again is the newest.
            let n = q.drop_stale_front(now);
            self.stale.messages.set(self.stale.messages.get() + n);
            if q.head > MAX_QUEUED {
                let h = q.head;
                q.bytes.drain(..h);
                q.head = 0;
            }
        }
        let full = if media { q.media_bytes + msg.len() > MAX_QUEUED } else { q.pending() + msg.len() > 2 * MAX_QUEUED };
        if full {
            return false;
        }
        q.bytes.extend_from_slice(msg);
        q.msgs.push_back(Queued { len: msg.len(), at: now, media });
        if media {
            q.media_bytes += msg.len();
        }
        drop(q);
        self.notify.notify_one();
        true
    }

    pub fn close(&self) {
        self.closed.set(true);
        self.notify.notify_one();
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, out: Rc<StreamOut>, client: SocketAddr) -> std::io::Result<()> {
    let mut pending = Vec::new();
    loop {
        // Everything queued goes out, also after close (answers to what the
        // client sent before it half-closed); then the write side shuts.
        let closed = out.closed.get();
        let (dropped, bytes) = out.queue.borrow_mut().take(&mut pending, Instant::now(), WRITE_CHUNK);
        if dropped > 0 {
            out.stale.record(client, dropped, bytes);
        }
        if pending.is_empty() {
            if closed {
                let _ = wr.shutdown().await;
                return Ok(());
            }
            out.notify.notified().await;
            continue;
        }
        if out.per_message {
            let mut at = 0;
            while let FrameLen::Complete(n) = frame_len(&pending[at..]) {
                wr.write_all(&pending[at..at + n]).await?;
                at += n;
            }
        } else {
            wr.write_all(&pending).await?;
        }
        wr.flush().await?;
        pending.clear();
    }
}

/// Reads frames and hands them to the core until the peer closes, the stream
/// breaks framing, or the connection idles without an allocation.
async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    shard: &Weak<RefCell<Shard>>,
    tuple: FiveTuple,
    idle: Duration,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    // Idle time counts from the last complete message, so a client that
    // trickles a partial frame a byte at a time (slowloris) is cut too.
    let mut deadline = tokio::time::Instant::now() + idle;
    loop {
        if buf.capacity() - buf.len() < 2048 {
            buf.reserve(READ_CHUNK.min(MAX_FRAME + READ_CHUNK - buf.len()));
        }
        let n = match tokio::time::timeout_at(deadline, rd.read_buf(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => {
                // Idle: fine while an allocation lives (media may pause), not otherwise.
                let Some(sh) = shard.upgrade() else { return Ok(()) };
                if sh.borrow().server.has_allocation(&tuple) {
                    deadline = tokio::time::Instant::now() + idle;
                    continue;
                }
                return Ok(());
            }
        };
        if n == 0 {
            return Ok(());
        }
        let Some(sh) = shard.upgrade() else { return Ok(()) };
        let mut sh = sh.borrow_mut();
        let mut at = 0;
        loop {
            match frame_len(&buf[at..]) {
                FrameLen::Complete(len) => {
                    sh.on_stream(tuple, &buf[at..at + len]);
                    at += len;
                }
                FrameLen::Incomplete => break,
                FrameLen::Invalid => return Err(std::io::ErrorKind::InvalidData.into()),
            }
        }
        if at > 0 {
            deadline = tokio::time::Instant::now() + idle;
        }
        buf.drain(..at);
        if buf.len() > MAX_FRAME {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
}

/// Runs one client connection to the end, then frees its allocation.
pub(super) async fn serve<S: AsyncRead + AsyncWrite>(
    shard: Weak<RefCell<Shard>>,
    stream: S,
    tuple: FiveTuple,
    out: Rc<StreamOut>,
    idle: Duration,
) {
    let (rd, wr) = tokio::io::split(stream);
    let write = write_loop(wr, out.clone(), tuple.client);
    tokio::pin!(write);
    let result = tokio::select! {
        r = read_loop(rd, &shard, tuple, idle) => match r {
            // The client closed its side (or idled out): every message it
            // sent has been handled; send the answers queued for it before
            // closing, within the idle timeout (it may not be reading).
            Ok(()) => {
                out.close();
                match tokio::time::timeout(idle, &mut write).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
                }
            }
            Err(e) => Err(e),
        },
        r = &mut write => r,
    };
    if let Err(e) = result {
        tracing::debug!(client = %tuple.client, error = %e, "connection ended");
    }
    out.close();
    if let Some(sh) = shard.upgrade() {
        sh.borrow_mut().stream_closed(tuple);
    }
}

/// Where a connection came from, after an optional PROXY protocol header.
pub(super) async fn proxy_source(tcp: &tokio::net::TcpStream, timeout: Duration) -> std::io::Result<Option<SocketAddr>> {
    use super::peek::{peek_until, Peeked};
    use super::proxy::{parse, Parsed, MAX_HEADER};
    let mut buf = [0u8; MAX_HEADER];
    let (len, source) = peek_until(tcp, &mut buf, timeout, |b| match parse(b) {
        Ok(Parsed::Done { len, source }) => Peeked::Done((len, source)),
        Ok(Parsed::Incomplete) => Peeked::More,
        _ => Peeked::Invalid,
    })
    .await?;
    // Consume exactly the header; what follows is TLS or STUN.
    let mut skip = vec![0u8; len];
    let mut got = 0;
    while got < len {
        tcp.readable().await?;
        match tcp.try_read(&mut skip[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(source)
}

#[cfg(test)]
mod tests {
    use super::per_ip_key;
    use std::net::IpAddr;

    fn key(ip: &str, prefix: u8) -> IpAddr {
        per_ip_key(ip.parse().unwrap(), prefix)
    }

    #[test]
    fn ipv6_clients_count_by_prefix_and_ipv4_by_address() {
        // Every address of one /64 is one key; the next /64 is another.
        let a = key("2001:db8:1:2::1", 64);
        assert_eq!(a, key("2001:db8:1:2:ffff:ffff:ffff:ffff", 64));
        assert_eq!(a, key("2001:db8:1:2:abcd::9", 64));
        assert_eq!(a, "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(a, key("2001:db8:1:3::1", 64));
        // Other prefixes.
        assert_eq!(key("2001:db8:1:2::1", 56), key("2001:db8:1:ff::1", 56));
        assert_ne!(key("2001:db8:1:2::1", 56), key("2001:db8:1:100::1", 56));
        assert_ne!(key("2001:db8::1", 128), key("2001:db8::2", 128));
        // IPv4, also IPv4-mapped, stays per address.
        assert_eq!(key("198.51.100.7", 64), "198.51.100.7".parse::<IpAddr>().unwrap());
        assert_eq!(key("::ffff:198.51.100.7", 64), key("198.51.100.7", 64));
        assert_ne!(key("198.51.100.7", 64), key("198.51.100.8", 64));
        assert_eq!(key("::1", 64), "::".parse::<IpAddr>().unwrap());
    }
}
