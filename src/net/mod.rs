//! The I/O layer: sockets and threads around the sans-IO core.
//!
//! Where a packet goes: a listener socket of a [`shard`] receives it (the
//! kernel spreads clients over the shards' SO_REUSEPORT sockets: see
//! [`sockets`]), the shard's core decides, and the shard sends it from its
//! own relay socket ([`relay`]) or listener, batched ([`batch`]). TCP and
//! TLS clients come in through [`accept`] and are served by [`stream`].
//! What all shards share (quotas, reservations, connection limits, the
//! descriptor budget) is in [`shared`]; the process around them (start,
//! reload, drain, signals) is [`lifecycle`], which reaches the shards
//! through [`control`]. Metrics and the admin API are [`http`] and
//! [`admin`]; log lines for the core's events are [`events`].

mod accept;
mod admin;
pub mod batch;
mod control;
mod events;
mod http;
mod lifecycle;
pub mod passthrough;
mod peek;
pub mod preflight;
pub mod proxy;
pub mod relay;
mod reload;
mod request;
mod sessions;
mod shard;
mod shared;
pub mod sni;
mod sockets;
mod stream;
mod systemd;
pub mod tls;

pub use lifecycle::{run, Reload, SetLog};
pub use reload::ReloadError;
pub use sockets::{register_udp, Udp};

use events::WarnLimiter;
