//! The UDP packet path's sockets: listener groups (one SO_REUSEPORT
//! socket per shard, [`sockets`]), relay sockets on random ports
//! ([`relay`]), and the batched system calls both use ([`batch`]:
//! recvmmsg/sendmmsg, GRO/GSO).

pub mod batch;
pub mod relay;
mod sockets;

pub use sockets::{bind_tcp, bind_tcp_group, bind_udp_group, register_udp, Udp};
