//! Upgrade in place: the running turnd starts a new binary and hands it,
//! over a Unix socket pair with SCM_RIGHTS, its listening sockets (the same
//! sockets, so SO_REUSEPORT keeps spreading clients over the shards as
//! before) and its UDP allocations with their relay sockets and whole state.
//! TCP and TLS connections stay with the old process, which relays them
//! until they end (or `limits.drain_timeout`), then exits.
//!
//! The exchange (see [`wire::Msg`]): the old process offers (format
//! version, shard count, nonce key); the new one, its configuration read
//! and checked, accepts or refuses; the old one stops reading what moves and
//! sends every socket and allocation; the new one takes them up, serves, and
//! says so; only then does the old one let go. Anything short of that (a
//! binary that does not start, refuses, dies or does not answer in time)
//! and the old process kills the new one and serves on: an allocation is
//! read by one process at a time.

pub mod child;
pub mod parent;
pub mod wire;

pub use child::{Incoming, Received};
pub use parent::{UpgradeError, Upgraded};
