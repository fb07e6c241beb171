//! loadgen: a TURN load generator (and a protocol-free reference relay).
//!
//! N clients each allocate on a TURN server with REST credentials, bind a
//! channel (or install a permission for Send/Data indications) to an echo
//! peer this program runs on its own thread, then send fixed-size messages
//! through the relay for a warm-up and a timed window. Each payload carries
//! its send time, so the echo gives the round-trip time. Sockets are
//! non-blocking and driven by epoll; UDP uses recvmmsg/sendmmsg in the clients
//! and in the peer. TCP and TLS streams are framed with `turnd::stun::frame_len`,
//! so several messages in one read or one TLS record are all counted.
//!
//! Reported for the timed window: offered messages/s, forwarded packets/s
//! (what the server sent: to the peer plus back to the clients, two per echoed
//! message), loss, round-trip percentiles, and with `--server-pid` the
//! server's CPU time (utime+stime from /proc/PID/stat) per forwarded packet.
//!
//! `--floor-relay LISTEN --floor-peer PEER` instead runs the simplest relay
//! there is (one thread, recvmmsg/sendmmsg, no protocol: one relay socket per
//! client, as TURN has), which `--raw` clients drive, to show the kernel's
//! floor on this machine. See benches/README.md.
//!
//! `--scale N` instead holds N allocations at once (issue 7's capacity
//! targets): the authenticated setup rate, and the server's RSS and
//! descriptors per allocation; see `scale.rs` beside this file.
//!
//! Everything is bounded: setup requests time out, the run lasts warm-up +
//! duration + a short drain, and at most 10,000 clients (scale mode has its
//! own bounds).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use turnd::auth::{rest_password, rest_username};
use turnd::net::batch::{from_storage, to_storage};
use turnd::stun::integrity::long_term_key;
use turnd::stun::{attr, frame_len, method, ChannelData, Class, FrameLen, Message, MessageWriter};

/// `--scale N`: many allocations held at once (benches/loadgen/scale.rs).
#[path = "loadgen/scale.rs"]
mod scale;

/// Bytes at the end of every payload: send time (ns since start), the
/// client's sequence number, client index, run tag. At the end so that a
/// FINGERPRINT can be finished from a CRC state cached over everything before.
const STAMP: usize = 24;
const MAX_CLIENTS: usize = 10_000;
/// Requested lifetimes are 600 s (allocation) and 300 s (permission); runs are
/// kept shorter so that no refresh is needed.
const MAX_RUN_SECS: f64 = 280.0;
/// Socket buffers asked for (the kernel caps them at net.core.[rw]mem_max).
const SOCK_BUF: usize = 4 << 20;
const CHANNEL: u16 = 0x4000;
/// After the window, wait this long at most for the last echoes.
const DRAIN: Duration = Duration::from_millis(1000);
/// At rate 0, a client that has heard nothing for this long is assumed to
/// have lost what it had in flight, so the window does not stall.
const STALL_NS: u64 = 100_000_000;

#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", about = "TURN load generator: N allocations relaying to an echo peer; see benches/README.md")]
struct Args {
    /// TURN server address.
    #[arg(long, default_value = "127.0.0.1:3478")]
    server: SocketAddr,
    /// TURN REST shared secret (coturn's static-auth-secret).
    #[arg(long)]
    secret: Option<String>,
    /// User part of the REST username (EXPIRY:USER).
    #[arg(long, default_value = "loadgen")]
    user: String,
    /// Number of allocations (one socket or connection each).
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Send/Data indications instead of a channel.
    #[arg(long)]
    indications: bool,
    /// Reach the server over TCP.
    #[arg(long, conflicts_with = "tls")]
    tcp: bool,
    /// Reach the server over TLS (certificate not verified).
    #[arg(long)]
    tls: bool,
    /// No TURN at all: send bare payloads to --server (a --floor-relay).
    #[arg(long, conflicts_with_all = ["tcp", "tls", "indications"])]
    raw: bool,
    /// No server at all: bare payloads straight to the echo peer, the
    /// generator's own round trip (what a relay's latency is measured against).
    #[arg(long, conflicts_with_all = ["tcp", "tls", "indications", "raw"])]
    direct: bool,
    /// Messages per second offered in total; 0 = as fast as the window allows.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// At --rate 0: messages in flight per client.
    #[arg(long, default_value_t = 16)]
    window: u32,
    /// Payload bytes per message (at least 24).
    #[arg(long, default_value_t = 1200)]
    size: usize,
    /// Length of the timed window, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Traffic before the timed window, seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Address of the echo peer (not the relay's own address).
    #[arg(long, default_value = "127.0.0.2")]
    peer_ip: IpAddr,
    /// Port of the echo peer; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    peer_port: u16,
    /// The server's process id, for CPU time per forwarded packet.
    #[arg(long)]
    server_pid: Option<u32>,
    /// UDP GSO (UDP_SEGMENT) for the clients' and the echo peer's sends:
    /// each burst to one address crosses the stack once, which makes the
    /// generator cheaper; the server still receives separate datagrams.
    #[arg(long)]
    gso: bool,
    /// With --indications: add FINGERPRINT to each Send indication (as
    /// turnutils_uclient does), so the server checks a CRC-32 per message.
    #[arg(long, requires = "indications")]
    fingerprint: bool,
    /// Most messages per sendmmsg/recvmmsg.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// At a fixed rate: the pacing interval, microseconds.
    #[arg(long, default_value_t = 200)]
    tick_us: u64,
    /// How long to wait for the server to answer at all, seconds.
    #[arg(long, default_value_t = 5.0)]
    ready_timeout: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// A free-form label copied into the JSON (e.g. the server's name).
    #[arg(long, default_value = "")]
    label: String,
    /// Run the protocol-free reference relay on this address instead.
    #[arg(long)]
    floor_relay: Option<SocketAddr>,
    /// The echo peer the reference relay forwards to.
    #[arg(long, requires = "floor_relay")]
    floor_peer: Option<SocketAddr>,
    /// The reference relay exits after this many seconds.
    #[arg(long, default_value_t = 900)]
    floor_max_secs: u64,
    /// Scale mode: hold N allocations (one UDP socket each, over worker
    /// processes and --scale-ips source addresses), each set up with
    /// Allocate (401), Allocate, CreatePermission and ChannelBind; report the
    /// setup rate, and with --server-pid the server's RSS per allocation and
    /// descriptors. See benches/README.md.
    #[arg(long, conflicts_with_all = ["tcp", "tls", "raw", "indications", "floor_relay"])]
    scale: Option<usize>,
    /// Scale: setups in progress at once, over all worker processes.
    #[arg(long, default_value_t = 1024)]
    scale_window: usize,
    /// Scale: source addresses for the client sockets ("A-B" ranges and/or a comma list).
    #[arg(long, default_value = "127.0.0.10-127.0.0.50")]
    scale_ips: String,
    /// Scale: worker processes (at least what RLIMIT_NOFILE's hard limit requires).
    #[arg(long, default_value_t = 0)]
    scale_procs: usize,
    /// Scale: "full" (Allocate 401, Allocate, CreatePermission, ChannelBind) or "allocate" (the first two).
    #[arg(long, default_value = "full")]
    scale_steps: String,
    /// Scale: "unique" (a REST user per allocation, USER-INDEX) or "shared" (all the same --user).
    #[arg(long, default_value = "unique")]
    scale_users: String,
    /// Scale: once all are held, send one ChannelData per allocation through the echo peer and count the echoes.
    #[arg(long)]
    scale_data: bool,
    /// Scale: leave the allocations in place at the end (no Refresh 0).
    #[arg(long)]
    scale_no_teardown: bool,
    /// Scale: seconds to wait after setup before reading the server's memory.
    #[arg(long, default_value_t = 1.0)]
    scale_hold: f64,
    /// Scale: bound on each phase (setup, data, teardown), seconds.
    #[arg(long, default_value_t = 120.0)]
    scale_timeout: f64,
    /// Scale: also write the JSON result to this file (the text report still goes to stdout).
    #[arg(long)]
    scale_json: Option<std::path::PathBuf>,
    /// Scale, internal: run as a worker process of the coordinator.
    #[arg(long, hide = true)]
    scale_worker: bool,
    #[arg(long, hide = true, default_value_t = 0)]
    scale_id: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    scale_offset: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    scale_count: usize,
    #[arg(long, hide = true)]
    scale_peer: Option<SocketAddr>,
    #[arg(long, hide = true, default_value_t = 0)]
    scale_expiry: u64,
    /// Ignored: `cargo bench` appends it.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    let r = if args.scale_worker {
        scale::worker(&args)
    } else if args.scale.is_some() {
        scale::run(&args)
    } else {
        match args.floor_relay {
            Some(listen) => floor_relay(listen, &args),
            None => run(&args),
        }
    };
    if let Err(e) = r {
        eprintln!("loadgen: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// Batched UDP I/O

/// Buffers and headers for one recvmmsg/sendmmsg call. The headers point into
/// the vectors' heap storage, which never moves after `new`.
struct Mmsg {
    cap: usize,
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    hdrs: Vec<libc::mmsghdr>,
    /// Headers and control buffers for GSO sends (one per run of slots).
    ghdrs: Vec<libc::mmsghdr>,
    ctrl: Vec<[u64; 4]>,
    runs: Vec<(usize, usize)>,
}

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
/// Linux takes at most 64 segments and 64 KiB per GSO send.
const GSO_MAX_SEGS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;

impl Mmsg {
    fn new(n: usize, cap: usize) -> Mmsg {
        let mut m = Mmsg {
            cap,
            bufs: vec![0u8; n * cap],
            iovs: Vec::with_capacity(n),
            // SAFETY: all-zero is a valid sockaddr_storage.
            addrs: vec![unsafe { zeroed() }; n],
            hdrs: Vec::with_capacity(n),
            // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
            ghdrs: vec![unsafe { zeroed() }; n],
            ctrl: vec![[0u64; 4]; n],
            runs: Vec::with_capacity(n),
        };
        for i in 0..n {
            m.iovs.push(libc::iovec { iov_base: m.bufs[i * cap..].as_mut_ptr().cast(), iov_len: cap });
        }
        for i in 0..n {
            // SAFETY: all-zero is a valid mmsghdr; its pointers are set below.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_iov = &mut m.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            m.hdrs.push(h);
        }
        m
    }

    fn slots(&self) -> usize {
        self.hdrs.len()
    }

    fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * self.cap..(i + 1) * self.cap]
    }

    fn data(&self, i: usize) -> &[u8] {
        &self.bufs[i * self.cap..i * self.cap + self.hdrs[i].msg_len as usize]
    }

    fn addr(&self, i: usize) -> Option<SocketAddr> {
        from_storage(&self.addrs[i])
    }

    /// Receives up to `slots()` datagrams (with their source addresses if `with_addr`).
    fn recv(&mut self, fd: RawFd, with_addr: bool) -> io::Result<usize> {
        self.recv_into(fd, 0, self.slots(), with_addr)
    }

    /// Receives into slots `from..to`; returns how many arrived.
    fn recv_into(&mut self, fd: RawFd, from: usize, to: usize, with_addr: bool) -> io::Result<usize> {
        for i in from..to {
            self.iovs[i].iov_len = self.cap;
            let h = &mut self.hdrs[i];
            h.msg_len = 0;
            h.msg_hdr.msg_flags = 0;
            if with_addr {
                h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            } else {
                h.msg_hdr.msg_name = std::ptr::null_mut();
                h.msg_hdr.msg_namelen = 0;
            }
        }
        // SAFETY: the headers point into buffers, addresses and iovecs this batch owns and keeps alive across the call.
        let r = unsafe {
            libc::recvmmsg(fd, self.hdrs[from..].as_mut_ptr(), (to - from) as u32, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
    }

    /// Sets slot `i` up to send `len` bytes of its buffer (to `to`, or on a connected socket).
    fn prepare(&mut self, i: usize, len: usize, to: Option<SocketAddr>) {
        self.iovs[i].iov_len = len;
        let h = &mut self.hdrs[i];
        match to {
            Some(a) => {
                let l = to_storage(a, &mut self.addrs[i]);
                h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = l;
            }
            None => {
                h.msg_hdr.msg_name = std::ptr::null_mut();
                h.msg_hdr.msg_namelen = 0;
            }
        }
    }

    /// For an echo: slot `i` goes back to where it came from, with the length it arrived with.
    fn prepare_echo(&mut self, i: usize) {
        self.iovs[i].iov_len = self.hdrs[i].msg_len as usize;
        self.hdrs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
    }

    /// Sends slots `0..n` (already prepared) with UDP GSO: runs of slots of
    /// equal length to the same destination go out as one datagram train
    /// (one pass through the stack; the receiver still gets separate
    /// datagrams). Returns how many slots went out, or an error other than
    /// EAGAIN (e.g. no GSO support) when nothing did.
    fn send_gso(&mut self, fd: RawFd, n: usize) -> io::Result<usize> {
        self.runs.clear();
        let mut i = 0;
        while i < n {
            let len = self.iovs[i].iov_len;
            let name = self.hdrs[i].msg_hdr.msg_namelen as usize;
            let mut j = i + 1;
            while j < n
                && j - i < GSO_MAX_SEGS
                && (j - i + 1) * len <= GSO_MAX_BYTES
                && self.iovs[j].iov_len == len
                && self.hdrs[j].msg_hdr.msg_namelen as usize == name
                && (name == 0 || same_addr(&self.addrs[i], &self.addrs[j], name))
            {
                j += 1;
            }
            self.runs.push((i, j - i));
            i = j;
        }
        for r in 0..self.runs.len() {
            let (start, count) = self.runs[r];
            let g = &mut self.ghdrs[r];
            g.msg_len = 0;
            g.msg_hdr.msg_iov = &mut self.iovs[start];
            g.msg_hdr.msg_iovlen = count as _;
            g.msg_hdr.msg_name = self.hdrs[start].msg_hdr.msg_name;
            g.msg_hdr.msg_namelen = self.hdrs[start].msg_hdr.msg_namelen;
            g.msg_hdr.msg_flags = 0;
            if count > 1 {
                let c = &mut self.ctrl[r];
                *c = [0; 4];
                g.msg_hdr.msg_control = c.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE only computes a size.
                g.msg_hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
                // SAFETY: the control buffer is large enough for one u16 cmsg (CMSG_SPACE(2) above), so the header pointers stay inside it.
                unsafe {
                    let cm = libc::CMSG_FIRSTHDR(&g.msg_hdr);
                    (*cm).cmsg_level = SOL_UDP;
                    (*cm).cmsg_type = UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), self.iovs[start].iov_len as u16);
                }
            } else {
                g.msg_hdr.msg_control = std::ptr::null_mut();
                g.msg_hdr.msg_controllen = 0;
            }
        }
        let nruns = self.runs.len();
        let mut at = 0;
        let mut sent = 0;
        while at < nruns {
            // SAFETY: the headers point into this batch's buffers, alive for the call; the count stays within the slice.
            let r = unsafe { libc::sendmmsg(fd, self.ghdrs[at..].as_mut_ptr(), (nruns - at) as u32, libc::MSG_DONTWAIT) };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if r < 0 && e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if r < 0 && sent == 0 && e.kind() != io::ErrorKind::WouldBlock {
                    return Err(e);
                }
                break;
            }
            for k in at..at + r as usize {
                sent += self.runs[k].1;
            }
            at += r as usize;
        }
        Ok(sent)
    }

    /// Sends slots `from..to` with as few sendmmsg calls as the socket allows.
    /// Returns how many went out; stops at EAGAIN (or any error).
    fn send(&mut self, fd: RawFd, from: usize, to: usize) -> usize {
        let mut at = from;
        while at < to {
            // SAFETY: as above: the headers point into this batch's buffers; the count stays within the slice.
            let r = unsafe { libc::sendmmsg(fd, self.hdrs[at..].as_mut_ptr(), (to - at) as u32, libc::MSG_DONTWAIT) };
            if r <= 0 {
                if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            at += r as usize;
        }
        at - from
    }
}

fn same_addr(a: &libc::sockaddr_storage, b: &libc::sockaddr_storage, len: usize) -> bool {
    // SAFETY: both references are to sockaddr_storage (128 bytes) and len is a sockaddr length the kernel or to_storage wrote, at most that.
    let a = unsafe { std::slice::from_raw_parts((a as *const libc::sockaddr_storage).cast::<u8>(), len) };
    // SAFETY: as above.
    let b = unsafe { std::slice::from_raw_parts((b as *const libc::sockaddr_storage).cast::<u8>(), len) };
    a == b
}

struct Epoll {
    fd: RawFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    fn new(max: usize) -> Result<Epoll> {
        // SAFETY: epoll_create1 takes a flag and returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("epoll_create1");
        }
        Ok(Epoll { fd, events: vec![libc::epoll_event { events: 0, u64: 0 }; max] })
    }

    fn add(&self, fd: RawFd, events: u32, token: u64) -> Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev is a valid epoll_event for the duration of the call.
        if unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error()).context("epoll_ctl");
        }
        Ok(())
    }

    /// Waits up to `timeout_ms`; returns the number of ready events.
    fn wait(&mut self, timeout_ms: i32) -> usize {
        // SAFETY: events has room for events.len() entries, the count passed.
        let n = unsafe { libc::epoll_wait(self.fd, self.events.as_mut_ptr(), self.events.len() as i32, timeout_ms) };
        n.max(0) as usize
    }

    fn event(&self, i: usize) -> (u64, u32) {
        let e = self.events[i];
        (e.u64, e.events)
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: this Epoll owns the descriptor and closes it once.
        unsafe { libc::close(self.fd) };
    }
}

/// A periodic timer for pacing, registered in epoll.
struct Ticker(RawFd);

impl Ticker {
    fn new(period: Duration) -> Result<Ticker> {
        // SAFETY: timerfd_create takes flags and returns a new descriptor or -1.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("timerfd_create");
        }
        let ts = libc::timespec { tv_sec: period.as_secs() as _, tv_nsec: period.subsec_nanos() as _ };
        let spec = libc::itimerspec { it_interval: ts, it_value: ts };
        // SAFETY: spec is a valid itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error()).context("timerfd_settime");
        }
        Ok(Ticker(fd))
    }
    fn clear(&self) {
        let mut b = [0u8; 8];
        // SAFETY: b has room for the 8 bytes read.
        unsafe { libc::read(self.0, b.as_mut_ptr().cast(), 8) };
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        // SAFETY: this Ticker owns the descriptor and closes it once.
        unsafe { libc::close(self.0) };
    }
}

fn set_buffers(fd: RawFd) {
    // SAFETY: the caller's socket stays open for the duration of this function.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let sock = socket2::SockRef::from(&fd);
    let _ = sock.set_recv_buffer_size(SOCK_BUF);
    let _ = sock.set_send_buffer_size(SOCK_BUF);
}

// ---------------------------------------------------------------------------
// CPU accounting

/// utime + stime of a process, in seconds (all its threads).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // Field 3 (state) is f[0]; utime is field 14, stime field 15.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

// ---------------------------------------------------------------------------
// Latency histogram: log-linear, 64 sub-buckets per power of two (under 1.6% error).

struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    max: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram { counts: vec![0; 128 + 64 * 58], total: 0, sum: 0, max: 0 }
    }
    fn index(v: u64) -> usize {
        if v < 128 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros() as usize; // >= 7
        let m = (v >> (e - 6)) as usize; // 64..=127
        128 + (e - 7) * 64 + (m - 64)
    }
    fn lower(i: usize) -> u64 {
        if i < 128 {
            return i as u64;
        }
        let e = (i - 128) / 64 + 7;
        let m = ((i - 128) % 64 + 64) as u64;
        m << (e - 6)
    }
    fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum += ns as u128;
        self.max = self.max.max(ns);
    }
    /// The value at quantile `q`, in nanoseconds (bucket midpoint).
    fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let lo = Self::lower(i);
                let hi = Self::lower(i + 1);
                return Some(((lo + hi) / 2).min(self.max));
            }
        }
        Some(self.max)
    }
}

// ---------------------------------------------------------------------------
// The echo peer

struct Peer {
    addr: SocketAddr,
    rx: Arc<AtomicU64>,
    tx: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Peer {
    fn start(ip: IpAddr, port: u16, batch: usize, cap: usize, gso: bool) -> Result<Peer> {
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
fn tls_config() -> Result<Arc<ClientConfig>> {
    turnd::client::cert::client_config(None, true).map(|(cfg, _)| cfg).map_err(|e| anyhow!(e))
}

// ---------------------------------------------------------------------------
// One client's connection to the server

enum Link {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(TcpStream, Box<ClientConnection>),
}

struct Conn {
    link: Link,
    /// Stream bytes received and not yet framed.
    rbuf: Vec<u8>,
    /// Stream bytes (TCP: raw; TLS: already handed to rustls) not yet written.
    wbuf: Vec<u8>,
    wpos: usize,
    closed: bool,
}

impl Conn {
    fn connect(server: SocketAddr, kind: Kind, tls: Option<&Arc<ClientConfig>>, deadline: Instant) -> Result<Conn> {
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

    fn fd(&self) -> RawFd {
        match &self.link {
            Link::Udp(s) => s.as_raw_fd(),
            Link::Tcp(s) | Link::Tls(s, _) => s.as_raw_fd(),
        }
    }

    fn is_stream(&self) -> bool {
        !matches!(self.link, Link::Udp(_))
    }

    // --- blocking use, for setup and teardown ---

    fn send_blocking(&mut self, msg: &[u8]) -> io::Result<()> {
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
    fn recv_blocking(&mut self, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
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
    fn transact(&mut self, req: &[u8], timeout: Duration) -> io::Result<Option<Vec<u8>>> {
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
    fn flush(&mut self) -> bool {
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
    fn pending(&self) -> bool {
        match &self.link {
            Link::Udp(_) => false,
            Link::Tcp(_) => self.wpos < self.wbuf.len(),
            Link::Tls(_, t) => t.wants_write(),
        }
    }

    /// Queues one framed message on a stream.
    fn queue(&mut self, msg: &[u8]) {
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
    fn fill(&mut self, scratch: &mut [u8]) -> bool {
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
enum Kind {
    Udp,
    Tcp,
    Tls,
}

// ---------------------------------------------------------------------------
// TURN setup

struct Creds {
    username: String,
    password: String,
}

struct Session {
    realm: String,
    nonce: Vec<u8>,
    key: [u8; 16],
}

fn next_tid(counter: &mut u64) -> [u8; 12] {
    *counter += 1;
    let mut t = [0u8; 12];
    t[..4].copy_from_slice(b"LGEN");
    t[4..].copy_from_slice(&counter.to_be_bytes());
    t
}

fn build(m: u16, class: Class, tid: [u8; 12], f: impl FnOnce(&mut MessageWriter)) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let mut w = MessageWriter::new(&mut buf, m, class, &tid);
    f(&mut w);
    let n = w.finish().expect("request fits");
    buf.truncate(n);
    buf
}

fn error_of(m: &Message<'_>) -> Option<(u16, String)> {
    m.get(attr::ERROR_CODE).and_then(attr::decode_error_code).map(|(c, r)| (c, r.to_owned()))
}

/// A request signed with the session's credentials; retried once on 438 (stale nonce).
fn authed_request(
    conn: &mut Conn,
    creds: &Creds,
    s: &mut Session,
    tids: &mut u64,
    m: u16,
    what: &str,
    f: &dyn Fn(&mut MessageWriter),
) -> Result<Vec<u8>> {
    for _ in 0..2 {
        let req = build(m, Class::Request, next_tid(tids), |w| {
            f(w);
            w.attr(attr::USERNAME, creds.username.as_bytes())
                .attr(attr::REALM, s.realm.as_bytes())
                .attr(attr::NONCE, &s.nonce)
                .integrity(&s.key)
                .fingerprint();
        });
        let resp = conn.transact(&req, Duration::from_secs(3))?.ok_or_else(|| anyhow!("{what}: no answer in 3 s"))?;
        let msg = Message::parse(&resp).map_err(|e| anyhow!("{what}: malformed answer: {e}"))?;
        match msg.class() {
            Class::Success => return Ok(resp),
            _ => match error_of(&msg) {
                Some((438, _)) => {
                    s.nonce = msg.get(attr::NONCE).ok_or_else(|| anyhow!("{what}: 438 without NONCE"))?.to_vec();
                }
                Some((c, r)) => bail!("{what}: error {c} {r}"),
                None => bail!("{what}: error without ERROR-CODE"),
            },
        }
    }
    bail!("{what}: stale nonce twice")
}

/// Allocates and binds a channel (or installs a permission) to `peer`.
fn setup_turn(conn: &mut Conn, creds: &Creds, peer: SocketAddr, indications: bool, tids: &mut u64) -> Result<(Session, SocketAddr)> {
    let first = build(method::ALLOCATE, Class::Request, next_tid(tids), |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).u32(attr::LIFETIME, 600).fingerprint();
    });
    let resp = conn.transact(&first, Duration::from_secs(3))?.ok_or_else(|| anyhow!("Allocate: no answer in 3 s"))?;
    let msg = Message::parse(&resp).map_err(|e| anyhow!("Allocate: malformed answer: {e}"))?;
    match error_of(&msg) {
        Some((401, _)) => {}
        Some((c, r)) => bail!("unauthenticated Allocate: error {c} {r} (expected 401)"),
        None => bail!("unauthenticated Allocate succeeded: the server must require credentials"),
    }
    let realm = msg.get(attr::REALM).map(|v| String::from_utf8_lossy(v).into_owned()).ok_or_else(|| anyhow!("401 without REALM"))?;
    let nonce = msg.get(attr::NONCE).ok_or_else(|| anyhow!("401 without NONCE"))?.to_vec();
    let key = long_term_key(&creds.username, &realm, &creds.password);
    let mut s = Session { realm, nonce, key };
    let resp = authed_request(conn, creds, &mut s, tids, method::ALLOCATE, "Allocate", &|w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).u32(attr::LIFETIME, 600);
    })?;
    let msg = Message::parse(&resp).unwrap();
    let relayed = msg
        .get(attr::XOR_RELAYED_ADDRESS)
        .and_then(|v| attr::decode_xor_address(v, msg.transaction_id()))
        .ok_or_else(|| anyhow!("Allocate success without XOR-RELAYED-ADDRESS"))?;
    if indications {
        authed_request(conn, creds, &mut s, tids, method::CREATE_PERMISSION, "CreatePermission", &|w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })?;
    } else {
        let ch = CHANNEL.to_be_bytes();
        authed_request(conn, creds, &mut s, tids, method::CHANNEL_BIND, "ChannelBind", &|w| {
            w.attr(attr::CHANNEL_NUMBER, &[ch[0], ch[1], 0, 0]).xor_address(attr::XOR_PEER_ADDRESS, peer);
        })?;
    }
    Ok((s, relayed))
}

/// Waits until the server answers a Binding (UDP) or accepts a connection.
fn wait_ready(server: SocketAddr, kind: Kind, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    if kind != Kind::Udp {
        // Conn::connect retries until the deadline.
        return Ok(());
    }
    let local: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let s = UdpSocket::bind(local)?;
    s.connect(server)?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let req = build(method::BINDING, Class::Request, *b"LGENreadines", |_| {});
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let _ = s.send(&req);
        if let Ok(n) = s.recv(&mut buf)
            && n >= 20
            && buf[8..20] == req[8..20]
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{server} did not answer a STUN Binding within {timeout:?}")
}

// ---------------------------------------------------------------------------
// The data phase

struct Client {
    conn: Conn,
    /// The message as sent, with the stamp at `off..off + STAMP`.
    tmpl: Vec<u8>,
    off: usize,
    /// With --fingerprint: the CRC-32 state over `tmpl[..off]`.
    crc_prefix: Option<u32>,
    /// Messages sent, and the highest sequence number echoed: what is in
    /// flight is the difference (the relay keeps a client's order, and a gap
    /// below the highest echo is a loss).
    sent_seq: u64,
    rx_seq: u64,
    last_rx_ns: u64,
    session: Option<Session>,
}

impl Client {
    fn inflight(&self) -> u32 {
        (self.sent_seq - self.rx_seq).min(u32::MAX as u64) as u32
    }
}

#[derive(Default)]
struct Counters {
    sent: u64,
    /// Messages the socket would not take (EAGAIN, or a stream still blocked on earlier data).
    unsent: u64,
    /// Messages the pacer dropped after falling more than 2 ms behind (the generator was stalled).
    skipped: u64,
    /// Echoes received (any time).
    rx: u64,
    /// Sent during the timed window, and of those, echoed.
    sent_window: u64,
    rx_window: u64,
    /// Received frames that were not an echo of ours.
    stray: u64,
}

struct Window {
    start_ns: u64,
    end_ns: u64,
}

impl Window {
    fn contains(&self, ts: u64) -> bool {
        ts >= self.start_ns && ts < self.end_ns
    }
}

use turnd::stun::crc32_update;

/// Rewrites the FINGERPRINT (the last 8 bytes of `msg`) after the bytes
/// from `from` on changed; `prefix` is the CRC state over `msg[..from]`.
fn finish_fingerprint(msg: &mut [u8], from: usize, prefix: u32) {
    let end = msg.len() - 8;
    let crc = !crc32_update(prefix, &msg[from..end]) ^ 0x5354_554E;
    msg[end + 4..].copy_from_slice(&crc.to_be_bytes());
}

/// Where the payload is in an echoed message, without checking more than needed.
fn payload_of(msg: &[u8], indications: bool, raw: bool) -> Option<&[u8]> {
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

struct Gen<'a> {
    args: &'a Args,
    gso: bool,
    tag: u32,
    base: Instant,
    clients: Vec<Client>,
    c: Counters,
    hist: Histogram,
    win: Window,
}

impl Gen<'_> {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Accounts one received message from client `ci`.
    fn on_message(&mut self, ci: usize, msg: &[u8], now: u64) {
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
        if self.win.contains(ts) {
            self.c.rx_window += 1;
            self.hist.record(now.saturating_sub(ts));
        }
    }

    /// Sends `k` messages from client `ci`; returns how many went out.
    fn send(&mut self, ci: usize, k: usize, now: u64, in_window: bool, m: &mut Mmsg) -> usize {
        let stream = self.clients[ci].conn.is_stream();
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

    fn receive(&mut self, ci: usize, m: &mut Mmsg, scratch: &mut [u8]) {
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

#[derive(Clone, Copy, Default)]
struct Snap {
    t_ns: u64,
    server_cpu: Option<f64>,
    own_cpu: Option<f64>,
    peer_rx: u64,
    rx: u64,
    sent: u64,
}

fn run(args: &Args) -> Result<()> {
    let mut args = args.clone();
    if args.direct {
        args.raw = true;
    }
    let args = &mut args;
    let kind = if args.tls {
        Kind::Tls
    } else if args.tcp {
        Kind::Tcp
    } else {
        Kind::Udp
    };
    if args.clients == 0 || args.clients > MAX_CLIENTS {
        bail!("--clients must be 1..={MAX_CLIENTS}");
    }
    if args.size < STAMP || args.size > 8192 {
        bail!("--size must be {STAMP}..=8192");
    }
    if args.duration.is_nan() || args.duration <= 0.0 || args.warmup.is_nan() || args.warmup < 0.0 || args.duration + args.warmup > MAX_RUN_SECS {
        bail!("--duration must be positive and --warmup + --duration at most {MAX_RUN_SECS} s (no refreshes are sent)");
    }
    if args.batch == 0 || args.batch > 1024 || args.window == 0 || args.window > 4096 {
        bail!("--batch must be 1..=1024 and --window 1..=4096");
    }
    if !args.raw && args.secret.is_none() {
        bail!("--secret is required (or --raw for a protocol-free relay)");
    }
    if args.peer_ip == args.server.ip() && !args.direct {
        bail!("--peer-ip must differ from the server's address (relays refuse their own address)");
    }
    let cap = args.size + 128;
    let peer = Peer::start(args.peer_ip, args.peer_port, args.batch, cap, args.gso)?;
    if args.direct {
        args.server = peer.addr;
    }
    let tag = (SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u32) ^ std::process::id().rotate_left(16);

    // --- setup ---
    let setup_start = Instant::now();
    let ready = Duration::from_secs_f64(args.ready_timeout);
    if !args.raw {
        wait_ready(args.server, kind, ready)?;
    }
    let tls = if kind == Kind::Tls { Some(tls_config()?) } else { None };
    let unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let creds = args.secret.as_ref().map(|secret| {
        let username = rest_username(unix + 3600, Some(&args.user));
        let password = rest_password(secret.as_bytes(), &username);
        Creds { username, password }
    });
    let mut tids = 0u64;
    let mut clients = Vec::with_capacity(args.clients);
    let payload = {
        let mut p = vec![0x5au8; args.size];
        p[args.size - STAMP..].fill(0);
        p
    };
    let stamp_at = args.size - STAMP;
    for i in 0..args.clients {
        let mut conn = Conn::connect(args.server, kind, tls.as_ref(), Instant::now() + ready)
            .with_context(|| format!("client {i}: connect"))?;
        let (session, tmpl, off) = if args.raw {
            (None, payload.clone(), stamp_at)
        } else {
            let (s, _relayed) = setup_turn(&mut conn, creds.as_ref().unwrap(), peer.addr, args.indications, &mut tids)
                .with_context(|| format!("client {i}"))?;
            if args.indications {
                let m = build(method::SEND, Class::Indication, next_tid(&mut tids), |w| {
                    w.xor_address(attr::XOR_PEER_ADDRESS, peer.addr).attr(attr::DATA, &payload);
                    if args.fingerprint {
                        w.fingerprint();
                    }
                });
                let fp = if args.fingerprint { 8 } else { 0 };
                let data_at = m.len() - fp - ((args.size + 3) & !3);
                (Some(s), m, data_at + stamp_at)
            } else {
                let mut m = ChannelData::header(CHANNEL, args.size).to_vec();
                m.extend_from_slice(&payload);
                if conn.is_stream() {
                    // RFC 8656 12.5: ChannelData is padded to 4 on streams.
                    m.resize((m.len() + 3) & !3, 0);
                }
                (Some(s), m, 4 + stamp_at)
            }
        };
        let crc_prefix = (args.fingerprint && args.indications).then(|| crc32_update(!0, &tmpl[..off]));
        if let Link::Tls(_, t) = &mut conn.link {
            t.set_buffer_limit(None);
        }
        match &conn.link {
            Link::Udp(s) => s.set_nonblocking(true)?,
            Link::Tcp(s) | Link::Tls(s, _) => s.set_nonblocking(true)?,
        }
        clients.push(Client { conn, tmpl, off, crc_prefix, sent_seq: 0, rx_seq: 0, last_rx_ns: 0, session });
    }
    let setup_secs = setup_start.elapsed().as_secs_f64();

    // --- data ---
    let mut ep = Epoll::new(args.clients + 2)?;
    let stream = kind != Kind::Udp;
    for (i, c) in clients.iter().enumerate() {
        let ev = if stream { (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32 } else { libc::EPOLLIN as u32 };
        ep.add(c.conn.fd(), ev, i as u64)?;
    }
    const TICK: u64 = u64::MAX;
    let ticker = if args.rate > 0 {
        let t = Ticker::new(Duration::from_micros(args.tick_us.max(10)))?;
        ep.add(t.0, libc::EPOLLIN as u32, TICK)?;
        Some(t)
    } else {
        None
    };
    let mut g = Gen {
        args,
        gso: args.gso && kind == Kind::Udp,
        tag,
        base: Instant::now(),
        clients,
        c: Counters::default(),
        hist: Histogram::new(),
        win: Window { start_ns: u64::MAX, end_ns: u64::MAX },
    };
    let pid = args.server_pid.map(|p| p.to_string());
    let snap = |g: &Gen, t_ns: u64| Snap {
        t_ns,
        server_cpu: pid.as_deref().and_then(cpu_seconds),
        own_cpu: cpu_seconds("self"),
        peer_rx: peer.rx.load(Ordering::Relaxed),
        rx: g.c.rx,
        sent: g.c.sent,
    };
    let warm_ns = (args.warmup * 1e9) as u64;
    let end_ns = warm_ns + (args.duration * 1e9) as u64;
    let (mut s0, mut s1) = (None::<Snap>, None::<Snap>);
    let mut m = Mmsg::new(args.batch, cap);
    let mut scratch = vec![0u8; 1 << 16];
    let n = g.clients.len();
    let refill_min = (args.window / 2).max(1);
    let mut rr = 0usize;
    // After a stall (the generator descheduled) catch up at most 2 ms worth at
    // once, so the server is not hit by a burst the offered rate never had.
    let max_burst = (args.rate / 500).max(n as u64 * 4);
    let mut drain_deadline = None::<u64>;
    loop {
        let now = g.now_ns();
        // Phases: warm-up, timed window, drain.
        if s0.is_none() && now >= warm_ns {
            g.win.start_ns = now;
            s0 = Some(snap(&g, now));
        }
        if s1.is_none() && now >= end_ns {
            g.win.end_ns = now;
            s1 = Some(snap(&g, now));
            drain_deadline = Some(now + DRAIN.as_nanos() as u64);
        }
        if let Some(d) = drain_deadline
            && (now >= d || g.c.rx_window >= g.c.sent_window)
        {
            break;
        }
        let sending = drain_deadline.is_none();
        let in_window = s0.is_some() && s1.is_none();
        // Offer load.
        let mut more_to_send = false;
        if sending && args.rate == 0 {
            for ci in 0..n {
                let cl = &mut g.clients[ci];
                if cl.inflight() == 0 {
                    cl.last_rx_ns = now;
                } else if now.saturating_sub(cl.last_rx_ns) > STALL_NS {
                    // Nothing back for a while: presume all of it lost (loss
                    // is counted from the window totals, not here).
                    cl.rx_seq = cl.sent_seq;
                    cl.last_rx_ns = now;
                }
                if cl.conn.closed || (cl.conn.pending() && !cl.conn.flush()) {
                    continue; // a stream still blocked on earlier data
                }
                let deficit = args.window.saturating_sub(cl.inflight());
                if deficit >= refill_min {
                    let k = (deficit as usize).min(args.batch);
                    g.send(ci, k, now, in_window, &mut m);
                }
            }
        } else if sending {
            let target = (args.rate as u128 * now as u128 / 1_000_000_000) as u64;
            let mut due = target.saturating_sub(g.c.sent + g.c.unsent + g.c.skipped);
            if due > max_burst {
                // Too far behind (a stall): skip rather than burst.
                g.c.skipped += due - max_burst;
                due = max_burst;
            }
            let per = due / n as u64;
            let extra = (due % n as u64) as usize;
            for j in 0..n {
                let ci = (rr + j) % n;
                let mut k = per + (j < extra) as u64;
                while k > 0 {
                    let b = k.min(args.batch as u64) as usize;
                    let sent = g.send(ci, b, now, in_window, &mut m);
                    if sent < b {
                        // The rest of this share is dropped (counted in send()).
                        g.c.unsent += k - b as u64;
                        k = 0;
                    } else {
                        k -= b as u64;
                    }
                }
            }
            rr = (rr + extra) % n;
        }
        if sending && args.rate == 0 {
            // (A stream still blocked on earlier data waits for EPOLLOUT instead.)
            more_to_send = g
                .clients
                .iter()
                .any(|c| !c.conn.closed && !c.conn.pending() && args.window.saturating_sub(c.inflight()) >= refill_min);
        }
        let timeout = if more_to_send { 0 } else { 1 };
        let k = ep.wait(timeout);
        for i in 0..k {
            let (tok, _ev) = ep.event(i);
            if tok == TICK {
                if let Some(t) = &ticker {
                    t.clear();
                }
                continue;
            }
            g.receive(tok as usize, &mut m, &mut scratch);
        }
        if g.clients.iter().all(|c| c.conn.closed) {
            bail!("the server closed every connection");
        }
    }
    let closed = g.clients.iter().filter(|c| c.conn.closed).count();

    // --- teardown: Refresh(0) on UDP, best effort; streams just close ---
    if !args.raw && kind == Kind::Udp {
        let creds = creds.as_ref().unwrap();
        for cl in g.clients.iter_mut() {
            if let Some(s) = &cl.session {
                let req = build(method::REFRESH, Class::Request, next_tid(&mut tids), |w| {
                    w.u32(attr::LIFETIME, 0)
                        .attr(attr::USERNAME, creds.username.as_bytes())
                        .attr(attr::REALM, s.realm.as_bytes())
                        .attr(attr::NONCE, &s.nonce)
                        .integrity(&s.key)
                        .fingerprint();
                });
                if let Link::Udp(u) = &cl.conn.link {
                    let _ = u.send(&req);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (peer_rx, peer_tx) = peer_stop(peer);

    let (s0, s1) = match (s0, s1) {
        (Some(a), Some(b)) => (a, b),
        _ => bail!("the run ended before its timed window"),
    };
    report(args, kind, &g, s0, s1, setup_secs, closed, peer_rx.saturating_sub(peer_tx))
}

/// Stops the peer thread; returns its totals.
fn peer_stop(p: Peer) -> (u64, u64) {
    let r = (p.rx.load(Ordering::Relaxed), p.tx.load(Ordering::Relaxed));
    drop(p);
    r
}

#[allow(clippy::too_many_arguments)]
fn report(args: &Args, kind: Kind, g: &Gen, s0: Snap, s1: Snap, setup_secs: f64, closed: usize, peer_unechoed: u64) -> Result<()> {
    let secs = (s1.t_ns - s0.t_ns) as f64 / 1e9;
    let to_peer = (s1.peer_rx - s0.peer_rx) as f64;
    let to_client = (s1.rx - s0.rx) as f64;
    let forwarded = to_peer + to_client;
    let offered = (s1.sent - s0.sent) as f64 / secs;
    let loss = if g.c.sent_window > 0 { 100.0 * (1.0 - g.c.rx_window as f64 / g.c.sent_window as f64) } else { 0.0 };
    let server_cpu = match (s0.server_cpu, s1.server_cpu) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let own_cpu = match (s0.own_cpu, s1.own_cpu) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let us = |q: f64| g.hist.quantile(q).map(|ns| ns as f64 / 1000.0);
    let transport = match kind {
        Kind::Udp => "udp",
        Kind::Tcp => "tcp",
        Kind::Tls => "tls",
    };
    let mode = if args.direct {
        "direct"
    } else if args.raw {
        "raw"
    } else if args.indications {
        "indications"
    } else {
        "channel"
    };
    let cpu_per_pkt = server_cpu.filter(|_| forwarded > 0.0).map(|c| c * 1e6 / forwarded);
    let j = serde_json::json!({
        "label": args.label,
        "server": args.server.to_string(),
        "transport": transport,
        "mode": mode,
        "clients": args.clients,
        "size": args.size,
        "rate": args.rate,
        "window": if args.rate == 0 { Some(args.window) } else { None },
        "gso": args.gso,
        "fingerprint": args.fingerprint,
        "warmup_s": args.warmup,
        "duration_s": secs,
        "setup_s": setup_secs,
        "offered_mps": offered,
        "forwarded_pps": forwarded / secs,
        "to_peer_pps": to_peer / secs,
        "to_client_pps": to_client / secs,
        "sent_window": g.c.sent_window,
        "echoed_window": g.c.rx_window,
        "loss_pct": loss,
        "unsent": g.c.unsent,
        "skipped": g.c.skipped,
        "stray": g.c.stray,
        "peer_unechoed": peer_unechoed,
        "closed_connections": closed,
        "rtt_us": {
            "p50": us(0.50), "p99": us(0.99), "p999": us(0.999),
            "max": if g.hist.total > 0 { Some(g.hist.max as f64 / 1000.0) } else { None },
            "mean": if g.hist.total > 0 { Some(g.hist.sum as f64 / g.hist.total as f64 / 1000.0) } else { None },
        },
        "server_pid": args.server_pid,
        "server_cpu_pct": server_cpu.map(|c| 100.0 * c / secs),
        "server_cpu_us_per_pkt": cpu_per_pkt,
        "loadgen_cpu_pct": own_cpu.map(|c| 100.0 * c / secs),
    });
    if args.json {
        println!("{j}");
        return Ok(());
    }
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.1}"));
    println!(
        "loadgen: {transport} {mode}, {} clients, {} B, {}, {:.1} s window after {:.1} s warm-up (setup {:.2} s)",
        args.clients,
        args.size,
        if args.rate == 0 { format!("rate 0 (window {}/client)", args.window) } else { format!("rate {} msgs/s", args.rate) },
        secs,
        args.warmup,
        setup_secs
    );
    println!("offered      {offered:.0} msgs/s");
    println!("forwarded    {:.0} pkts/s  (to peer {:.0}, to clients {:.0})", forwarded / secs, to_peer / secs, to_client / secs);
    println!(
        "loss         {loss:.3} %  (sent {}, echoed {}; not taken by the socket {}, skipped by a stalled pacer {})",
        g.c.sent_window, g.c.rx_window, g.c.unsent, g.c.skipped
    );
    println!(
        "rtt µs       p50 {}  p99 {}  p99.9 {}  max {}",
        f(us(0.5)),
        f(us(0.99)),
        f(us(0.999)),
        f((g.hist.total > 0).then(|| g.hist.max as f64 / 1000.0))
    );
    match (server_cpu, cpu_per_pkt) {
        (Some(c), Some(p)) => println!("server cpu   {:.1} % of a core, {p:.2} µs per forwarded packet", 100.0 * c / secs),
        _ => println!("server cpu   - (give --server-pid)"),
    }
    println!("loadgen cpu  {} % (generator and echo peer)", f(own_cpu.map(|c| 100.0 * c / secs)));
    if closed > 0 {
        println!("warning      {closed} connections closed by the server");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The reference relay: no protocol, one thread, recvmmsg/sendmmsg.

/// Client -> listener -> (relay socket of that client) -> peer -> relay
/// socket -> listener -> client. One relay socket per client address, as a
/// TURN server has one per allocation.
fn floor_relay(listen: SocketAddr, args: &Args) -> Result<()> {
    let peer = args.floor_peer.ok_or_else(|| anyhow!("--floor-peer is required"))?;
    let lsock = UdpSocket::bind(listen).with_context(|| format!("bind {listen}"))?;
    lsock.set_nonblocking(true)?;
    set_buffers(lsock.as_raw_fd());
    let lfd = lsock.as_raw_fd();
    let relay_ip: IpAddr = listen.ip();
    let mut ep = Epoll::new(1024)?;
    const LISTENER: u64 = u64::MAX;
    ep.add(lfd, libc::EPOLLIN as u32, LISTENER)?;
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    let mut relays: Vec<(UdpSocket, SocketAddr)> = Vec::new();
    let batch = args.batch.max(1);
    let cap = 65536.min(args.size + 128).max(2048);
    let mut inb = Mmsg::new(batch, cap);
    let mut out = Mmsg::new(batch, cap);
    let deadline = Instant::now() + Duration::from_secs(args.floor_max_secs);
    eprintln!("floor relay on {listen}, peer {peer}");
    while Instant::now() < deadline {
        let k = ep.wait(100);
        let mut outn = 0usize;
        for e in 0..k {
            let (tok, _) = ep.event(e);
            if tok == LISTENER {
                for _ in 0..4 {
                    let n = match inb.recv(lfd, true) {
                        Ok(n) if n > 0 => n,
                        _ => break,
                    };
                    // Forward runs of datagrams from one client with one sendmmsg.
                    let mut i = 0;
                    while i < n {
                        let Some(from) = inb.addr(i) else {
                            i += 1;
                            continue;
                        };
                        let r = match by_client.get(&from) {
                            Some(&r) => r,
                            None => {
                                if relays.len() >= MAX_CLIENTS {
                                    i += 1;
                                    continue;
                                }
                                let s = UdpSocket::bind((relay_ip, 0))?;
                                s.connect(peer)?;
                                s.set_nonblocking(true)?;
                                set_buffers(s.as_raw_fd());
                                ep.add(s.as_raw_fd(), libc::EPOLLIN as u32, relays.len() as u64)?;
                                relays.push((s, from));
                                by_client.insert(from, relays.len() - 1);
                                relays.len() - 1
                            }
                        };
                        let mut j = i;
                        while j < n && inb.addr(j) == Some(from) {
                            inb.iovs[j].iov_len = inb.hdrs[j].msg_len as usize;
                            inb.hdrs[j].msg_hdr.msg_name = std::ptr::null_mut();
                            inb.hdrs[j].msg_hdr.msg_namelen = 0;
                            j += 1;
                        }
                        inb.send(relays[r].0.as_raw_fd(), i, j);
                        i = j;
                    }
                    if n < inb.slots() {
                        break;
                    }
                }
            } else {
                let (s, client) = &relays[tok as usize];
                let fd = s.as_raw_fd();
                let client = *client;
                // Gather from relay sockets into one batch for the listener.
                loop {
                    if outn == out.slots() {
                        out.send(lfd, 0, outn);
                        outn = 0;
                    }
                    let got = match out.recv_into(fd, outn, out.slots(), false) {
                        Ok(n) if n > 0 => n,
                        _ => break,
                    };
                    for i in outn..outn + got {
                        let len = out.hdrs[i].msg_len as usize;
                        out.prepare(i, len, Some(client));
                    }
                    outn += got;
                    if outn < out.slots() {
                        break;
                    }
                }
            }
        }
        if outn > 0 {
            out.send(lfd, 0, outn);
        }
    }
    Ok(())
}
