//! Log lines for what the core reports: allocations and channels coming
//! and going (info and debug), refused peers and bandwidth overruns (warn,
//! rate-limited so a flood cannot fill the log).

use std::time::Duration;

use super::stream::TcpFigures;
use crate::turn::Event;

/// Lets through at most `WARN_BURST` warnings about refused requests per
/// `WARN_WINDOW`, then counts the rest, so an attack cannot flood the log.
pub(super) struct WarnLimiter {
    window_start: std::time::Instant,
    in_window: u32,
    suppressed: u64,
}

const WARN_BURST: u32 = 10;
const WARN_WINDOW: Duration = Duration::from_secs(10);

impl WarnLimiter {
    pub(super) fn new() -> Self {
        WarnLimiter { window_start: std::time::Instant::now(), in_window: 0, suppressed: 0 }
    }

    /// Whether to log this warning now.
    pub(super) fn allow(&mut self) -> bool {
        let now = std::time::Instant::now();
        if now.duration_since(self.window_start) >= WARN_WINDOW {
            if self.suppressed > 0 {
                tracing::warn!(suppressed = self.suppressed, "more refused requests in the last interval were not logged");
            }
            *self = WarnLimiter { window_start: now, in_window: 0, suppressed: 0 };
        }
        if self.in_window < WARN_BURST {
            self.in_window += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// Logs `e`; `tcp` is the connection's TCP figures when `e` is the end of
/// a TCP/TLS client's allocation.
pub(super) fn log_event(e: &Event, tcp: Option<&TcpFigures>, warnings: &mut WarnLimiter) {
    match e {
        Event::DeadlineMoved => {}
        Event::AllocationCreated { tuple, username, relayed, lifetime } => tracing::info!(
            user = %username, client = %tuple.client, transport = tuple.transport.label(),
            relayed = ?relayed, lifetime, "allocation created"
        ),
        Event::AllocationEnded { tuple, username, reason, duration, bytes_to_peer, bytes_from_peer, health } => {
            let (c, p) = (health.client, health.peer);
            tracing::info!(
                user = %username, client = %tuple.client, transport = tuple.transport.label(),
                reason = reason.label(), duration_s = duration.as_secs(), bytes_to_peer, bytes_from_peer,
                client_loss = %percent(c.loss), client_jitter = %millis(c.jitter), client_rtt = %millis(c.rtt.map(|d| d.as_secs_f64())),
                peer_loss = %percent(p.loss), peer_jitter = %millis(p.jitter), peer_rtt = %millis(p.rtt.map(|d| d.as_secs_f64())),
                tcp_rtt_ms = tcp.map(|t| t.rtt_ms), tcp_rttvar_ms = tcp.map(|t| t.rttvar_ms),
                tcp_retransmits = tcp.map(|t| t.retransmits), tcp_unacked = tcp.map(|t| t.unacked),
                tcp_notsent_bytes = tcp.and_then(|t| t.notsent_bytes),
                "allocation ended"
            )
        }
        Event::ChannelBound { tuple, channel, peer, .. } => {
            tracing::debug!(client = %tuple.client, channel, %peer, "channel bound")
        }
        Event::ChannelUnbound { tuple, channel, peer, .. } => {
            tracing::debug!(client = %tuple.client, channel, %peer, "channel unbound")
        }
        Event::ChannelRefreshed { .. } => {}
        Event::PeerRefused { tuple, peer } => {
            if warnings.allow() {
                tracing::warn!(client = %tuple.client, %peer, "peer refused by policy (403)")
            }
        }
        Event::OverBandwidth { tuple, username } => {
            if warnings.allow() {
                tracing::warn!(
                    user = %username, client = %tuple.client, transport = tuple.transport.label(),
                    "allocation over limits.allocation_bandwidth: packets beyond it are dropped (a leaked credential?)"
                )
            }
        }
    }
}

/// A ratio as a percentage with one decimal, or "-" when unknown.
fn percent(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

/// Seconds as milliseconds, or "-" when unknown.
fn millis(s: Option<f64>) -> String {
    s.map_or_else(|| "-".to_owned(), |s| format!("{:.0}ms", s * 1000.0))
}

#[cfg(test)]
mod tests {
    use super::WarnLimiter;

    #[test]
    fn refused_request_warnings_are_capped_per_window() {
        let mut w = WarnLimiter::new();
        let allowed = (0..1000).filter(|_| w.allow()).count();
        assert_eq!(allowed, super::WARN_BURST as usize);
        assert_eq!(w.suppressed, 1000 - super::WARN_BURST as u64);
    }
}
