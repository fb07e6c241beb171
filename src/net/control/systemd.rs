//! systemd readiness and watchdog notifications (sd_notify protocol), with
//! no dependency: one datagram to $NOTIFY_SOCKET. A no-op outside systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` (e.g. "READY=1") to systemd when it supervises us.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = UnixDatagram::unbound() else { return };
    let p = path.to_string_lossy();
    let _ = if let Some(abstract_name) = p.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        match std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()) {
            Ok(addr) => sock.send_to_addr(state.as_bytes(), &addr),
            Err(e) => Err(e),
        }
    } else {
        sock.send_to(state.as_bytes(), &*p)
    };
}

/// How often to ping the watchdog when systemd runs one: half its interval.
pub fn watchdog_period() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?.parse::<u64>().ok()?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(100)))
}
