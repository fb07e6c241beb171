//! The UDP listener: STUN, TURN control and ChannelData from clients,
//! received in batches.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use super::batch::RecvBatch;
use super::{recv_loop, Shard, Udp};
use crate::turn::Now;

pub(super) async fn listener_loop(shard: Weak<RefCell<Shard>>, conn: u32, socket: Rc<Udp>, rx: Rc<RefCell<RecvBatch>>) {
    let Ok(local) = socket.get_ref().local_addr() else { return };
    recv_loop(shard, socket, rx, Now::system, move |sh, from, pkt, now| sh.on_client(conn, local, from, pkt, now)).await
}
