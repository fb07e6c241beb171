//! The new process's side of an upgrade: it finds the socket pair in its
//! environment, refuses or accepts the offer, and receives the sockets and
//! allocations, which [`super::super::lifecycle`] puts in place before
//! anything is served.

use std::cell::Cell;
use std::net::SocketAddr;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::wire::{self, Kind, Msg};
use crate::net::shard::handover::{monotonic_ns, Adoption};
use crate::turn::{Carried, HANDOVER_FORMAT};

/// The environment variable naming the new process's end of the pair.
pub const ENV: &str = "TURND_HANDOVER_FD";
/// How long the new process waits for each message of the old one.
const WAIT: Duration = Duration::from_secs(30);

/// The new process's end of an upgrade in progress.
pub struct Incoming {
    sock: OwnedFd,
    /// Said Serving or Refuse: nothing more to say.
    finished: Cell<bool>,
}

/// What the old process handed over.
pub struct Received {
    pub nonce_key: [u8; 32],
    pub old_pid: u32,
    /// The old process was draining (`turnctl drain`): so is this one.
    pub draining: bool,
    listeners: Vec<(Kind, SocketAddr, usize, Option<OwnedFd>)>,
    /// (shard, export moment, allocation, relay sockets).
    allocations: Vec<(usize, u64, Carried, Vec<OwnedFd>)>,
}

impl Incoming {
    /// The pair's end named by the environment, taken out of it (so nothing
    /// this process starts inherits it). `None` for an ordinary start.
    pub fn from_env() -> Option<Incoming> {
        let v = std::env::var(ENV).ok()?;
        // SAFETY: the variable is removed before any thread is started.
        unsafe { std::env::remove_var(ENV) };
        let fd: RawFd = v.trim().parse().ok().filter(|&fd| fd > 2)?;
        // SAFETY: the old process passed us this descriptor, open, for us
        // alone; F_GETFD checks that it is open before we own it.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return None;
        }
        // SAFETY: as above; from now on it closes on exec.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: open (checked above) and passed to this process alone.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Some(Incoming { sock, finished: Cell::new(false) })
    }

    /// Tells the old process this one will not take over, and why (it
    /// serves on). Once only; nothing after Serving.
    pub fn refuse(&self, reason: &str) {
        if !self.finished.replace(true) {
            let _ = wire::send(self.sock.as_fd(), &Msg::Refuse { reason: reason.to_owned() }, &[]);
        }
    }

    /// Reads the offer; refuses it when this binary reads another format or
    /// the configuration has another shard count; else accepts and receives
    /// everything.
    pub fn receive(&self, threads: usize) -> anyhow::Result<Received> {
        wire::set_timeout(self.sock.as_fd(), Some(WAIT))?;
        let (nonce_key, old_pid, draining) = match self.next()? {
            (Msg::Offer { format, version, pid, threads: old, nonce_key, draining }, _) => {
                if format != HANDOVER_FORMAT {
                    let why = format!("turnd {} hands over in format {format}; this binary ({}) reads format {HANDOVER_FORMAT} only: restart instead", version, env!("CARGO_PKG_VERSION"));
                    self.refuse(&why);
                    anyhow::bail!(why);
                }
                if old != threads {
                    let why = format!("threads: the running relay has {old} shards and the configuration {threads}; an upgrade keeps the shard count (restart to change it)");
                    self.refuse(&why);
                    anyhow::bail!(why);
                }
                let key: [u8; 32] = nonce_key.try_into().map_err(|_| anyhow::anyhow!("handover: a nonce key of the wrong size"))?;
                (key, pid, draining)
            }
            (m, _) => anyhow::bail!("handover: expected the offer, got {m:?}"),
        };
        wire::send(self.sock.as_fd(), &Msg::Accept { pid: std::process::id() }, &[])?;
        let mut got = Received { nonce_key, old_pid, draining, listeners: Vec::new(), allocations: Vec::new() };
        loop {
            match self.next()? {
                (Msg::Listener { kind, address, shard }, mut fds) if fds.len() == 1 => got.listeners.push((kind, address, shard, fds.pop())),
                (Msg::Allocation { shard, mono_ns, carried }, fds) => got.allocations.push((shard, mono_ns, *carried, fds)),
                (Msg::Done { listeners, allocations }, _) => {
                    anyhow::ensure!(
                        listeners == got.listeners.len() && allocations == got.allocations.len(),
                        "handover: {} listeners and {} allocations arrived of {listeners} and {allocations} sent",
                        got.listeners.len(),
                        got.allocations.len()
                    );
                    if std::env::var_os("TURND_TEST_HANDOVER_DIE").is_some() {
                        // Test hook: a new process that dies in the middle of the handover.
                        std::process::abort();
                    }
                    return Ok(got);
                }
                (m, _) => anyhow::bail!("handover: unexpected message {m:?}"),
            }
        }
    }

    fn next(&self) -> anyhow::Result<(Msg, Vec<OwnedFd>)> {
        match wire::recv(self.sock.as_fd()) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => anyhow::bail!("handover: the old process closed the connection"),
            Err(e) => anyhow::bail!("handover: {e}"),
        }
    }

    /// Tells the old process everything is served here: it lets go.
    pub fn serving(&self, allocations: usize) -> std::io::Result<()> {
        self.finished.set(true);
        wire::send(self.sock.as_fd(), &Msg::Serving { pid: std::process::id(), allocations }, &[])
    }
}

impl Received {
    fn take(&mut self, kind: Kind, address: SocketAddr, shard: usize) -> Option<OwnedFd> {
        self.listeners.iter_mut().find(|(k, a, s, fd)| *k == kind && *a == address && *s == shard && fd.is_some())?.3.take()
    }

    /// The group of `n` sockets of the listener configured at `address`,
    /// when every one of them came.
    fn group(&mut self, kind: Kind, address: SocketAddr, n: usize) -> Option<Vec<OwnedFd>> {
        if !(0..n).all(|s| self.listeners.iter().any(|(k, a, sh, fd)| *k == kind && *a == address && *sh == s && fd.is_some())) {
            return None;
        }
        (0..n).map(|s| self.take(kind, address, s)).collect()
    }

    pub fn udp_group(&mut self, address: SocketAddr, n: usize) -> Option<Vec<std::net::UdpSocket>> {
        Some(self.group(Kind::Udp, address, n)?.into_iter().map(std::net::UdpSocket::from).collect())
    }

    pub fn stream_group(&mut self, address: SocketAddr, n: usize) -> Option<Vec<std::net::TcpListener>> {
        Some(self.group(Kind::Stream, address, n)?.into_iter().map(std::net::TcpListener::from).collect())
    }

    /// The metrics or check-page listener configured at `address`.
    pub fn single(&mut self, kind: Kind, address: SocketAddr) -> Option<tokio::net::TcpListener> {
        let l = std::net::TcpListener::from(self.take(kind, address, 0)?);
        tokio::net::TcpListener::from_std(l).ok()
    }

    /// The allocations for each of `shards` shards, their times moved to
    /// this process's clock.
    pub fn adoptions(&mut self, shards: usize) -> Vec<Adoption> {
        let (now, mono) = (Instant::now(), monotonic_ns());
        let mut out: Vec<Adoption> = (0..shards).map(|_| Adoption { at: now, allocations: Vec::new() }).collect();
        for (shard, mono_ns, c, fds) in self.allocations.drain(..) {
            let Some(a) = out.get_mut(shard) else { continue };
            a.at = now.checked_sub(Duration::from_nanos(mono.saturating_sub(mono_ns))).unwrap_or(now);
            a.allocations.push((c, fds));
        }
        out
    }

    /// How many allocations came.
    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }
}
