//! TCP and TLS client connections (RFC 8656 stream framing): STUN messages
//! and ChannelData (padded to 4 bytes) back to back on one byte stream. One
//! allocation per connection; closing the connection frees it.

use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::rc::{Rc, Weak};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::Shard;
use crate::stun::{frame_len, FrameLen};
use crate::turn::FiveTuple;

/// Bytes queued toward one client before further data is dropped (a slow
/// reader loses packets, as on UDP, instead of growing memory).
pub const MAX_QUEUED: usize = 256 * 1024;
/// Largest frame: a 64 KiB STUN message or padded ChannelData.
const MAX_FRAME: usize = 20 + 65_535 + 3;
const READ_CHUNK: usize = 16 * 1024;

/// The send side of one connection, filled by the core's replies and relayed data.
pub struct StreamOut {
    buf: RefCell<Vec<u8>>,
    notify: Notify,
    /// Write each message in its own TLS record (some clients read one message per record).
    per_message: bool,
    closed: Cell<bool>,
    pub dropped: Cell<u64>,
    /// What the connection counts against in the per-IP limit ([`per_ip_key`]),
    /// kept so a reload that changes the prefix still uncounts it right.
    pub ip_key: Cell<IpAddr>,
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
    pub fn new(per_message: bool) -> Rc<Self> {
        Rc::new(StreamOut {
            buf: RefCell::new(Vec::new()),
            notify: Notify::new(),
            per_message,
            closed: Cell::new(false),
            dropped: Cell::new(0),
            ip_key: Cell::new(IpAddr::from([0u8; 4])),
        })
    }

    /// Queues one framed message; false (and dropped) when the queue is full.
    pub fn push(&self, msg: &[u8]) -> bool {
        if self.closed.get() {
            return false;
        }
        let mut b = self.buf.borrow_mut();
        if b.len() + msg.len() > MAX_QUEUED {
            self.dropped.set(self.dropped.get() + 1);
            return false;
        }
        b.extend_from_slice(msg);
        drop(b);
        self.notify.notify_one();
        true
    }

    pub fn close(&self) {
        self.closed.set(true);
        self.notify.notify_one();
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, out: Rc<StreamOut>) -> std::io::Result<()> {
    let mut pending = Vec::new();
    loop {
        out.notify.notified().await;
        // Everything queued goes out, also after close (answers to what the
        // client sent before it half-closed); then the write side shuts.
        let closed = out.closed.get();
        std::mem::swap(&mut pending, &mut *out.buf.borrow_mut());
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
        if pending.capacity() > 4 * READ_CHUNK {
            pending.shrink_to(READ_CHUNK);
        }
        if closed {
            let _ = wr.shutdown().await;
            return Ok(());
        }
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
    let write = write_loop(wr, out.clone());
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
    use super::proxy::{parse, Parsed, MAX_HEADER};
    let mut buf = [0u8; MAX_HEADER];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match parse(&buf[..n]) {
            Ok(Parsed::Done { len, source }) => {
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
                return Ok(source);
            }
            Ok(Parsed::Incomplete) if n < MAX_HEADER => {
                // Wait for more bytes without busy-looping on the same peek.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            _ => return Err(std::io::ErrorKind::InvalidData.into()),
        }
    }
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
