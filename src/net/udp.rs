//! The UDP listener: STUN, TURN control and ChannelData from clients,
//! received in batches.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::{Rc, Weak};

use super::batch::{RecvBatch, BATCH};
use super::{Shard, Udp};
use crate::turn::Now;

pub(super) async fn listener_loop(shard: Weak<RefCell<Shard>>, conn: u32, socket: Rc<Udp>, rx: Rc<RefCell<RecvBatch>>) {
    let Ok(local) = socket.get_ref().local_addr() else { return };
    let fd = socket.get_ref().as_raw_fd();
    loop {
        let Ok(mut guard) = socket.readable().await else { return };
        let Some(shard) = shard.upgrade() else { return };
        let mut sh = shard.borrow_mut();
        let mut rb = rx.borrow_mut();
        match rb.recv(fd) {
            Ok(n) => {
                let now = Now::system();
                for i in 0..n {
                    match rb.get(i) {
                        Some((from, pkt)) => sh.on_client(conn, local, from, pkt, now),
                        None => sh.server.stats.dropped_malformed += 1,
                    }
                }
                if n < BATCH {
                    guard.clear_ready();
                }
            }
            Err(_) => {}
        }
    }
}
