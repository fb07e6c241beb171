//! The old process's side of an upgrade: start the new binary with its end
//! of the socket pair, offer, and on acceptance send every socket and
//! allocation and wait for the new process to serve them. Blocking calls,
//! made off the event loop; every wait is bounded.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::child::ENV;
use super::wire::{self, Kind, Msg};
use crate::turn::Carried;

/// How long the new binary has to read its configuration and accept, and
/// then to put everything in place and serve.
/// (Each; both fit in the admin API's 30 s for one request.)
const WAIT: Duration = Duration::from_secs(10);

/// A finished upgrade.
#[derive(Debug)]
pub struct Upgraded {
    pub pid: u32,
    pub allocations: usize,
    pub listeners: usize,
    pub elapsed: Duration,
}

/// Why an upgrade did not happen; the old process serves on.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot start {0}: {1}")]
    Start(String, std::io::Error),
    #[error("the new process refused to take over: {0}")]
    Refused(String),
    #[error("the new process failed before it took over: {0}")]
    Failed(String),
    #[error("this process cannot hand over: {0}")]
    Local(String),
}

/// A new turnd process being handed the relay.
pub struct Child {
    proc: std::process::Child,
    sock: OwnedFd,
    started: Instant,
}

/// Whether `binary` may be started as this relay: a regular file owned by
/// root or by this process's user, that no other user may write. The admin
/// API names the binary, and its token must not be a way to run any program
/// as the relay's user.
fn trusted(binary: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(binary)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let refuse = |why: String| Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, why));
    if !m.is_file() {
        return refuse("not a regular file".into());
    }
    if m.uid() != 0 && m.uid() != me {
        return refuse(format!("owned by uid {}, neither root nor this relay's user", m.uid()));
    }
    if m.mode() & 0o022 != 0 {
        return refuse(format!("writable by other users (mode {:o})", m.mode() & 0o7777));
    }
    Ok(())
}

/// Starts `binary` with this process's arguments and the pair's other end,
/// and makes the offer.
pub fn spawn(binary: &Path, offer: &Msg) -> Result<Child, UpgradeError> {
    let start = |e| UpgradeError::Start(binary.display().to_string(), e);
    trusted(binary).map_err(start)?;
    let (ours, theirs) = wire::pair().map_err(start)?;
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.args(std::env::args_os().skip(1)).env(ENV, fd.to_string()).stdin(Stdio::null());
    // SAFETY: fcntl is async-signal-safe; it only keeps the pair's end open
    // across the exec in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let proc = cmd.spawn().map_err(start)?;
    drop(theirs);
    let mut child = Child { proc, sock: ours, started: Instant::now() };
    if let Err(e) = wire::set_timeout(child.sock.as_fd(), Some(WAIT)).and_then(|()| wire::send(child.sock.as_fd(), offer, &[])) {
        let why = child.failure(&e.to_string());
        child.abandon();
        return Err(why);
    }
    Ok(child)
}

impl Child {
    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// Waits (bounded) for the new process to accept or refuse the offer.
    pub fn accepted(&mut self) -> Result<(), UpgradeError> {
        match wire::recv(self.sock.as_fd()) {
            Ok(Some((Msg::Accept { .. }, _))) => Ok(()),
            Ok(Some((Msg::Refuse { reason }, _))) => Err(UpgradeError::Refused(reason)),
            Ok(Some((m, _))) => Err(UpgradeError::Failed(format!("unexpected message {m:?}"))),
            Ok(None) => Err(UpgradeError::Failed(self.ended("it closed the connection"))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(UpgradeError::Failed(format!("no answer to the offer within {} s", WAIT.as_secs()))),
            Err(e) => Err(self.failure(&e.to_string())),
        }
    }

    /// Sends every listening socket and allocation, then waits (bounded)
    /// for the new process to serve them. Returns how many allocations it
    /// says it serves.
    pub fn hand_over(&mut self, listeners: &[(Kind, SocketAddr, usize, OwnedFd)], allocations: Vec<(usize, u64, Carried, Vec<OwnedFd>)>) -> Result<usize, UpgradeError> {
        let failed = |c: &mut Child, e: std::io::Error| c.failure(&e.to_string());
        for (kind, address, shard, fd) in listeners {
            wire::send(self.sock.as_fd(), &Msg::Listener { kind: *kind, address: *address, shard: *shard }, &[fd.as_fd()]).map_err(|e| failed(self, e))?;
        }
        let n = allocations.len();
        for (shard, mono_ns, carried, fds) in allocations {
            let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            wire::send(self.sock.as_fd(), &Msg::Allocation { shard, mono_ns, carried: Box::new(carried) }, &fds).map_err(|e| failed(self, e))?;
        }
        wire::send(self.sock.as_fd(), &Msg::Done { listeners: listeners.len(), allocations: n }, &[]).map_err(|e| failed(self, e))?;
        match wire::recv(self.sock.as_fd()) {
            Ok(Some((Msg::Serving { allocations, .. }, _))) => Ok(allocations),
            Ok(Some((Msg::Refuse { reason }, _))) => Err(UpgradeError::Refused(reason)),
            Ok(Some((m, _))) => Err(UpgradeError::Failed(format!("unexpected message {m:?}"))),
            Ok(None) => Err(UpgradeError::Failed(self.ended("it closed the connection during the handover"))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(UpgradeError::Failed(format!("it did not serve within {} s of receiving everything", WAIT.as_secs())))
            }
            Err(e) => Err(failed(self, e)),
        }
    }

    /// `what` happened; with the exit status when the process has ended.
    /// A refusal it sent before closing (a configuration error found
    /// before our offer even reached it) is the better answer.
    fn failure(&mut self, what: &str) -> UpgradeError {
        let _ = wire::set_timeout(self.sock.as_fd(), Some(Duration::from_millis(100)));
        if let Ok(Some((Msg::Refuse { reason }, _))) = wire::recv(self.sock.as_fd()) {
            return UpgradeError::Refused(reason);
        }
        UpgradeError::Failed(self.ended(what))
    }

    /// `what` happened; with the exit status when the process has ended.
    fn ended(&mut self, what: &str) -> String {
        // A process that closed its end is usually exiting: give it a moment.
        let until = Instant::now() + Duration::from_millis(500);
        loop {
            match self.proc.try_wait() {
                Ok(Some(status)) => return format!("{what}; it exited ({status}) {} ms after it started", self.started.elapsed().as_millis()),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
                _ => return what.to_owned(),
            }
        }
    }

    /// Stops the new process (it serves nothing) and reaps it.
    pub fn abandon(mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }

    /// The new process serves now: forget it (it outlives this one).
    pub fn release(self) {}
}
