//! The I/O layer: sockets and threads around the sans-IO core.
//!
//! Where a packet goes: a listener socket of a [`shard`] receives it (the
//! kernel spreads clients over the shards' SO_REUSEPORT sockets), the
//! shard's core decides, and the shard sends it from its own relay socket
//! or listener, batched. The rooms:
//!
//! - [`udp`]: the UDP packet path's sockets (listener groups, relay
//!   sockets, recvmmsg/sendmmsg with GRO/GSO).
//! - [`stream`]: TCP and TLS clients, from accept (PROXY header, SNI
//!   routing, limits, handshake) to the framed connection; they reach their
//!   shard only through `stream::Host`.
//! - [`shard`]: one thread's event loop, where every packet is handled.
//! - [`shared`]: what all shards share (quotas, reservations, connection
//!   limits, the descriptor budget).
//! - [`control`]: the process around the shards (start, reload, drain,
//!   signals, metrics and the admin API).
//!
//! - `xdp` (feature `xdp`): the in-kernel fast path for UDP clients'
//!   channels, and each shard's mirror of its channels in its maps.
//!
//! Log lines for the core's events are in [`events`]; the sessions the
//! admin API lists, in [`sessions`].

mod control;
mod events;
mod sessions;
mod shard;
mod shared;
mod stream;
mod udp;
#[cfg(feature = "xdp")]
mod xdp;

pub use control::{handover, preflight, run, Reload, ReloadError, SetLog};
pub use stream::{passthrough, proxy, sni, tls};
pub use udp::{batch, relay};
