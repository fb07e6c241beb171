//! A shard's part of an upgrade in place. In the old process: stop reading
//! the listeners and the UDP allocations that move ([`Shard::export`]),
//! then either let go of them ([`Shard::release`]) or serve them again
//! ([`Shard::resume`]). In the new process: take the allocations up once the
//! listeners they arrive on are in place ([`Shard::adopt`]).
//!
//! While stopped, nothing reads those sockets: what arrives waits in their
//! kernel buffers for whichever process reads next. An allocation is never
//! served by both, since the old shard reads none of it again unless the
//! new process is gone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::time::Instant;

use super::{listener_loop, Shard};
use crate::turn::{Carried, FiveTuple, RelayId, Transport};

/// What one shard hands to the next process.
pub struct Export {
    pub index: usize,
    /// The moment the carried times count from, as CLOCK_MONOTONIC
    /// nanoseconds (the clock `Instant` reads, the same in every process).
    pub mono_ns: u64,
    /// UDP listener sockets by group id.
    pub udp: Vec<(u32, OwnedFd)>,
    /// TCP/TLS listener sockets by group id.
    pub stream: Vec<(u32, OwnedFd)>,
    /// Each allocation with its relay sockets, in [`Carried::relay_ports`] order.
    pub allocations: Vec<(Carried, Vec<OwnedFd>)>,
}

/// What an export stopped, for a resume or a release.
pub struct Paused {
    conns: Rc<[u32]>,
    relays: Vec<RelayId>,
}

/// The allocations a shard of the new process takes up.
pub struct Adoption {
    /// The instant here that corresponds to the export's moment.
    pub at: Instant,
    pub allocations: Vec<(Carried, Vec<OwnedFd>)>,
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Shard {
    /// Stops reading the UDP listener groups `conns`, their allocations'
    /// relay sockets and every TCP/TLS listener, and answers with second
    /// descriptors of all of them and the allocations' state. On error
    /// nothing stays stopped.
    pub(super) fn export(&mut self, conns: &[u32]) -> std::io::Result<Export> {
        if self.exported.is_some() {
            self.resume();
        }
        self.flush_udp();
        // What the XDP program relayed up to now travels with the allocations.
        #[cfg(feature = "xdp")]
        self.sync_xdp();
        let conns: Rc<[u32]> = conns.iter().copied().filter(|&c| matches!(self.udp.get(c as usize), Some(Some(l)) if !l.retiring)).collect();
        let (now, mono_ns) = (Instant::now(), monotonic_ns());
        let carried = self.server.carry(now, |t| conns.contains(&t.conn));
        self.exported = Some(Paused { conns: conns.clone(), relays: carried.iter().flat_map(|(_, ids)| ids.iter().copied()).collect() });
        match self.stop_and_duplicate(&conns, carried, mono_ns) {
            Ok(e) => Ok(e),
            Err(e) => {
                self.resume();
                Err(e)
            }
        }
    }

    fn stop_and_duplicate(&mut self, conns: &[u32], carried: Vec<(Carried, Vec<RelayId>)>, mono_ns: u64) -> std::io::Result<Export> {
        let mut udp = Vec::new();
        for &c in conns {
            if let Some(Some(l)) = self.udp.get(c as usize) {
                l.task.abort();
                udp.push((c, l.socket.get_ref().as_fd().try_clone_to_owned()?));
            }
        }
        let mut stream = Vec::new();
        for (&id, l) in &self.stream_listeners {
            l.task.abort();
            stream.push((id, l.socket.as_fd().try_clone_to_owned()?));
        }
        let mut allocations = Vec::with_capacity(carried.len());
        for (c, ids) in carried {
            let mut fds = Vec::with_capacity(ids.len());
            for id in ids {
                self.relays.pause(id);
                fds.push(self.relays.duplicate(id)?);
            }
            allocations.push((c, fds));
        }
        Ok(Export { index: self.index, mono_ns, udp, stream, allocations })
    }

    /// Serves again what the export stopped (the upgrade failed).
    pub(super) fn resume(&mut self) {
        let Some(p) = self.exported.take() else { return };
        let Some(shard) = self.this.upgrade() else { return };
        for &c in p.conns.iter() {
            if let Some(Some(l)) = self.udp.get_mut(c as usize) {
                l.task = tokio::task::spawn_local(listener_loop(Rc::downgrade(&shard), c, l.socket.clone(), self.rx_batch.clone()));
            }
        }
        let ids: Vec<u32> = self.stream_listeners.keys().copied().collect();
        for id in ids {
            if let Some((s, l)) = self.stream_listeners.get(&id).map(|sl| (sl.socket.clone(), sl.listener.clone())) {
                let task = self.spawn_accept(&shard, s, &l);
                if let Some(sl) = self.stream_listeners.get_mut(&id) {
                    sl.task = task;
                }
            }
        }
        for id in p.relays {
            self.relays.resume(id);
        }
        tracing::info!(shard = self.index, "upgrade abandoned: serving every listener and allocation again");
    }

    /// Lets go of what the export stopped: the next process serves it now.
    /// Returns how many allocations left.
    pub(super) fn release(&mut self) -> usize {
        let Some(p) = self.exported.take() else { return 0 };
        let Shard { server, relays, .. } = self;
        let n = server.forget(|t| p.conns.contains(&t.conn), relays);
        for &c in p.conns.iter() {
            if let Some(slot) = self.udp.get_mut(c as usize) {
                *slot = None;
            }
        }
        self.stream_listeners.clear();
        n
    }

    /// Takes up carried allocations on the UDP listeners now in place.
    pub(super) fn adopt(&mut self, a: Adoption) {
        let conn_of: HashMap<SocketAddr, u32> = self
            .udp
            .iter()
            .enumerate()
            .filter_map(|(i, l)| Some((l.as_ref().filter(|l| !l.retiring)?.socket.get_ref().local_addr().ok()?, i as u32)))
            .collect();
        let (mut taken, mut failed) = (0usize, 0usize);
        for (c, fds) in a.allocations {
            for fd in fds {
                if !self.relays.hand_in(std::net::UdpSocket::from(fd)) {
                    tracing::warn!(client = %c.client, "a handed-over relay socket is not on this relay's addresses: closed");
                }
            }
            let Some(&conn) = conn_of.get(&c.server) else {
                tracing::warn!(client = %c.client, listener = %c.server, "a handed-over allocation's listener is not configured here: dropped");
                failed += 1;
                continue;
            };
            let tuple = FiveTuple { client: c.client, server: c.server, transport: Transport::Udp, conn };
            let Shard { server, relays, .. } = self;
            match server.adopt(&c, tuple, a.at, relays) {
                Ok(()) => taken += 1,
                Err(e) => {
                    tracing::warn!(client = %c.client, error = ?e, "a handed-over allocation could not be taken up: dropped");
                    failed += 1;
                }
            }
        }
        let unclaimed = self.relays.drop_unclaimed();
        // A fast path mirrors the channels of what was taken up.
        self.server.announce_channels();
        self.after_control();
        tracing::info!(shard = self.index, allocations = taken, dropped = failed, unclaimed_sockets = unclaimed, "took over UDP allocations from the previous process");
    }
}
