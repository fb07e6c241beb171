//! TCP and TLS clients: [`accept`] takes a connection (PROXY header, SNI
//! routing to a web server sharing the port ([`passthrough`], [`sni`]),
//! the connection limits, the TLS handshake ([`tls`])), then [`conn`]
//! serves it (RFC 8656 framing, the queue toward the client). Both reach
//! their shard only through [`Host`].

mod accept;
mod conn;
pub mod https;
pub mod passthrough;
mod peek;
pub mod proxy;
pub mod sni;
mod tcpinfo;
pub mod tls;

pub(super) use accept::accept_loop;
pub(super) use conn::{Host, StaleDrops, StreamLimits, StreamOut};
pub(super) use tcpinfo::TcpFigures;
