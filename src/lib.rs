//! turnd: a TURN/STUN relay (RFC 8489, RFC 8656).
//!
//! Where a packet goes: [`net`] receives it and hands the bytes, addresses and
//! current time to the sans-IO [`turn::Server`], which parses it with [`stun`],
//! checks credentials with [`auth`] and the peer policy, and returns what to
//! send where. [`net`] then performs those sends.

pub mod acme;
pub mod auth;
pub mod certinfo;
pub mod check;
pub mod cli;
pub mod client;
pub mod config;
pub mod ctl;
pub mod metrics;
pub mod net;
pub mod stun;
pub mod turn;
