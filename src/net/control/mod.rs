//! The control plane: the process around the shards. [`lifecycle`] starts,
//! reloads (a transaction across shards: [`reload`] says why one was
//! refused), drains and handles signals; [`shards`] fans commands out to the
//! shard threads; [`preflight`] checks a configuration against this host;
//! [`http`] serves metrics, health and the admin API ([`admin`]);
//! [`systemd`] speaks sd_notify; [`certs`] keeps the TLS certificate (files
//! or ACME).

mod admin;
mod certs;
pub mod handover;
mod http;
mod lifecycle;
pub mod preflight;
mod reload;
mod request;
mod shards;
mod systemd;

pub use lifecycle::{run, Reload, SetLog};
pub use reload::ReloadError;
