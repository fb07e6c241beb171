//! The UDP listener: STUN, TURN control and ChannelData from clients.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use tokio::net::UdpSocket;

use super::{Shard, BATCH};

pub(super) async fn listener_loop(shard: Weak<RefCell<Shard>>, conn: u32, socket: Rc<UdpSocket>) {
    let Ok(local) = socket.local_addr() else { return };
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let Some(shard) = shard.upgrade() else { return };
        let mut sh = shard.borrow_mut();
        for _ in 0..BATCH {
            match socket.try_recv_from(&mut sh.rx) {
                Ok((n, from)) => sh.on_client(conn, local, from, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
    }
}
