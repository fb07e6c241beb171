//! What a start checks before it serves, and all that `--check-config` does:
//! the certificate and key load and belong together, listen, metrics and
//! relay addresses belong to this host and their ports are free. Errors name
//! the key at fault, so a start and a check fail the same way (exit 2).

use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::CertSource;
use crate::config::{Config, ConfigError};

/// Certificates that expire within this many days get a warning.
pub const CERT_WARN_DAYS: i64 = 14;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Before a start: a busy port is an error whoever holds it.
    Start,
    /// `--check-config`: a port held by a running turnd is expected (the
    /// check before a reload), and only noted.
    Check,
    /// A start by an upgrade: the running turnd hands its listening
    /// sockets over, so their ports are not probed.
    Upgrade,
}

fn bad(key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), msg: msg.into() }
}

/// Runs every check; returns notes for the log (warnings that do not stop turnd).
pub fn check(cfg: &Config, mode: Mode, now_unix: i64) -> Result<Vec<String>, ConfigError> {
    let mut notes = Vec::new();
    match &cfg.tls {
        Some(CertSource::Files { cert, key }) => {
            let provider = rustls::crypto::ring::default_provider();
            let ck = crate::net::stream::tls::load_key(cert, key, &provider)?;
            notes.extend(expiry_note(crate::net::stream::tls::not_after(&ck), now_unix, cert));
        }
        Some(CertSource::Acme(a)) => notes.extend(acme_note(a)?),
        None => {}
    }
    for (key, relay) in [("relay.ip", cfg.core.relay_v4), ("relay.ipv6", cfg.core.relay_v6)] {
        if let Some(r) = relay {
            check_relay_ip(key, r.local)?;
        }
    }
    if mode != Mode::Upgrade {
        for (i, l) in cfg.listeners.iter().enumerate() {
            let key = format!("listen[{i}].address");
            notes.extend(check_bind(&key, l.address, l.transport.is_stream(), mode)?);
        }
        if let Some(m) = cfg.metrics_listen {
            notes.extend(check_bind("metrics.listen", m, true, mode)?);
        }
    }
    if let Some(p) = &cfg.passthrough {
        notes.extend(backend_note(p.backend));
    }
    Ok(notes)
}

/// What ACME will start from: the certificate in the state directory, or
/// none yet. An error when the state directory cannot be created or written.
fn acme_note(a: &crate::config::Acme) -> Result<Option<String>, ConfigError> {
    let dir = &a.state_dir;
    let mut probe = dir.clone();
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p.to_owned(),
            None => break,
        }
    }
    // SAFETY: access() only reads the NUL-terminated path.
    let writable = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0);
    if !writable {
        return Err(bad(
            "tls.acme.state_dir",
            format!("{} is not writable by this user ({}): turnd keeps its ACME account and certificate there", dir.display(), probe.display()),
        ));
    }
    if let Some(root) = &a.ca_root {
        let pem = std::fs::read_to_string(root).map_err(|e| bad("tls.acme.ca_root", format!("cannot read {}: {e}", root.display())))?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(bad("tls.acme.ca_root", format!("{} holds no PEM certificate", root.display())));
        }
    }
    let provider = rustls::crypto::ring::default_provider();
    Ok(Some(match crate::acme::State::new(dir).certificate(&provider) {
        Ok(Some(ck)) => match crate::net::stream::tls::info(&ck) {
            Some(i) => format!(
                "tls.acme: {} holds a certificate for {} until {}; turnd renews it by itself",
                dir.display(),
                i.names.join(", "),
                crate::certinfo::format_date(i.not_after)
            ),
            None => format!("tls.acme: the certificate in {} does not parse; turnd obtains a new one", dir.display()),
        },
        Ok(None) => format!(
            "tls.acme: no certificate yet in {}: at start turnd asks {} for {} over TLS-ALPN-01 (port 443 must be reachable under those names); TURN over TLS answers once it arrives",
            dir.display(),
            a.directory,
            a.names.join(", ")
        ),
        Err(e) => format!("tls.acme: the stored certificate is unusable ({e}); turnd obtains a new one"),
    }))
}

/// A note when nothing accepts connections at the passthrough backend (yet:
/// the web server may start after turnd, so this does not stop it).
fn backend_note(backend: SocketAddr) -> Option<String> {
    match std::net::TcpStream::connect_timeout(&backend, std::time::Duration::from_secs(1)) {
        Ok(_) => None,
        Err(e) => Some(format!(
            "tls.passthrough.backend: nothing accepts connections at {backend} now ({e}): connections for other names than tls.turn_names are closed until the web server listens there"
        )),
    }
}

/// A note when the certificate has expired or expires within CERT_WARN_DAYS.
pub fn expiry_note(not_after: Option<i64>, now_unix: i64, cert: &std::path::Path) -> Option<String> {
    let end = not_after?;
    let date = crate::certinfo::format_date(end);
    if end <= now_unix {
        Some(format!("tls.cert: {} expired on {date}: browsers refuse turns: until it is renewed", cert.display()))
    } else if end - now_unix < CERT_WARN_DAYS * 86_400 {
        let days = (end - now_unix) / 86_400;
        Some(format!("tls.cert: {} expires on {date} (in {days} days): renew it (turnd picks up renewed files by itself)", cert.display()))
    } else {
        None
    }
}

/// The relay address must be one of this host's: sockets bind to it.
pub fn check_relay_ip(key: &str, ip: IpAddr) -> Result<(), ConfigError> {
    match probe(SocketAddr::new(ip, 0), false) {
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Err(bad(
            key,
            format!(
                "{ip} is not an address of this host, so no relay socket can bind to it (behind 1:1 NAT, set it to the private address and relay.external_ip to the public one)"
            ),
        )),
        Err(e) => Err(bad(key, format!("cannot open a socket on {ip}: {e}"))),
        Ok(()) => Ok(()),
    }
}

/// Binds `addr` as the listener would, and lets go at once.
fn probe(addr: SocketAddr, stream: bool) -> std::io::Result<()> {
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let s = if stream {
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s
    } else {
        Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?
    };
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())
}

fn check_bind(key: &str, addr: SocketAddr, stream: bool, mode: Mode) -> Result<Option<String>, ConfigError> {
    match probe(addr, stream) {
        Ok(()) => Ok(None),
        Err(e) => bind_problem(key, addr, stream, &e, mode).map(Some),
    }
}

/// Why `addr` could not be bound, naming `key`, for a start or a reload.
pub fn bind_error(key: &str, addr: SocketAddr, stream: bool, e: &std::io::Error, mode: Mode) -> ConfigError {
    match bind_problem(key, addr, stream, e, mode) {
        Err(e) => e,
        Ok(note) => bad(key, note),
    }
}

/// An error for a bind that failed, or (for `--check-config` only) a note
/// when a running turnd holds the port, or when the check may not bind a
/// privileged port that the service may.
fn bind_problem(key: &str, addr: SocketAddr, stream: bool, e: &std::io::Error, mode: Mode) -> Result<String, ConfigError> {
    let proto = if stream { "TCP" } else { "UDP" };
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => Err(bad(key, format!("{} is not an address of this host", addr.ip()))),
        Some(libc::EACCES) if addr.port() < 1024 => {
            let need = format!("{proto} {addr}: ports below 1024 need root or CAP_NET_BIND_SERVICE");
            if mode == Mode::Start {
                return Err(bad(key, need));
            }
            // The check runs as the service's user, but without the
            // capability the systemd unit or the container grants it, so the
            // kernel refuses before it says whether the port is free. Who
            // holds a port is in /proc/net for every user to read.
            if bound_elsewhere(stream, addr) {
                return in_use(key, addr, stream, mode);
            }
            Ok(format!(
                "{key}: {need}, which this check runs without, so it did not bind the port (no socket holds it now); turnd's systemd unit and container grant CAP_NET_BIND_SERVICE; a start without it fails"
            ))
        }
        Some(libc::EADDRINUSE) => in_use(key, addr, stream, mode),
        _ => Err(bad(key, format!("cannot bind {proto} {addr}: {e}"))),
    }
}

/// `addr` is taken: by whom, and whether that stops a start or (for a check
/// before a reload) is the running turnd.
fn in_use(key: &str, addr: SocketAddr, stream: bool, mode: Mode) -> Result<String, ConfigError> {
    let proto = if stream { "TCP" } else { "UDP" };
    match port_owner(stream, addr.port()) {
        Some((pid, _)) if pid == std::process::id() => Err(bad(
            key,
            format!("{proto} {addr} overlaps a listener this turnd already has on port {} (a restart applies this change)", addr.port()),
        )),
        Some((pid, name)) if name == "turnd" && mode == Mode::Check => {
            Ok(format!("{key}: {proto} {addr} is held by a running turnd (pid {pid}); a reload keeps it"))
        }
        Some((pid, name)) => Err(bad(key, format!("{proto} {addr} is in use by {name} (pid {pid})"))),
        // Held by a process this check cannot see (another user's
        // process, another container): perhaps the running turnd itself,
        // but only if a turnd runs here at all.
        None if mode == Mode::Check && another_turnd_runs() => Ok(format!(
            "{key}: {proto} {addr} is in use by a process this check cannot see; unless it is the running turnd, a start will fail"
        )),
        None if mode == Mode::Check => Err(bad(
            key,
            format!("{proto} {addr} is in use by a process this check cannot see, and no turnd runs on this host: a start would fail"),
        )),
        None => Err(bad(key, format!("{proto} {addr} is in use by another program"))),
    }
}

/// Whether a process named turnd other than this one runs on this host
/// (every user can read a process's name).
fn another_turnd_runs() -> bool {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else { return true };
    procs.flatten().any(|p| {
        p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()).is_some_and(|pid| {
            pid != me && std::fs::read_to_string(p.path().join("comm")).is_ok_and(|c| c.trim() == "turnd")
        })
    })
}

/// The sockets of this network namespace that hold a local address (TCP
/// listening, or UDP bound), from /proc/net (readable by every user): each
/// one's address and inode.
fn bound_sockets(stream: bool) -> Vec<(SocketAddr, String)> {
    let tables: &[&str] = if stream { &["/proc/net/tcp", "/proc/net/tcp6"] } else { &["/proc/net/udp", "/proc/net/udp6"] };
    let mut out = Vec::new();
    for t in tables {
        let Ok(text) = std::fs::read_to_string(t) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (field 9)
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else { continue };
            // TCP: only listening sockets (state 0A) hold a listener's port.
            if (stream && *state != "0A") || *inode == "0" {
                continue;
            }
            if let Some(a) = proc_net_address(local) {
                out.push((a, (*inode).to_owned()));
            }
        }
    }
    out
}

/// A /proc/net local address, `0100007F:0D96` or 32 hex digits for IPv6:
/// the address as the kernel holds it, printed as 32-bit words in this
/// machine's byte order, then the port.
fn proc_net_address(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| ip.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_ne_bytes);
    let ip: IpAddr = match ip.len() {
        8 => IpAddr::from(word(0)?),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::from(b)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether a socket of another process holds `addr`'s port on its address
/// or on the wildcard (the same family; an IPv4-mapped IPv6 address counts
/// as IPv4), so that binding `addr` would fail.
fn bound_elsewhere(stream: bool, addr: SocketAddr) -> bool {
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let want = plain(addr.ip());
    bound_sockets(stream).into_iter().any(|(a, _)| {
        let held = plain(a.ip());
        a.port() == addr.port()
            && held.is_ipv4() == want.is_ipv4()
            && (held == want || held.is_unspecified() || want.is_unspecified())
    })
}

/// The process holding a socket bound to local `port` (TCP listening or UDP),
/// from /proc: the socket's inode in /proc/net, then the process whose
/// descriptors include it. `None` when it cannot be seen (another user's
/// process without root, another network namespace).
pub fn port_owner(stream: bool, port: u16) -> Option<(u32, String)> {
    let inodes: Vec<String> =
        bound_sockets(stream).into_iter().filter(|(a, _)| a.port() == port).map(|(_, inode)| format!("socket:[{inode}]")).collect();
    if inodes.is_empty() {
        return None;
    }
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                let name = std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default().trim().to_owned();
                return Some((pid, if name.is_empty() { "another program".into() } else { name }));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_port_names_its_owner() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (pid, _name) = port_owner(true, addr.port()).expect("our own listener is found");
        assert_eq!(pid, std::process::id());
        let e = check_bind("metrics.listen", addr, true, Mode::Start).unwrap_err();
        assert_eq!(e.key, "metrics.listen");
        // Held by this very process: a listener of ours.
        assert!(e.msg.contains("overlaps a listener"), "{}", e.msg);
        drop(l);
        assert_eq!(check_bind("metrics.listen", addr, true, Mode::Start).unwrap(), None);
    }

    #[test]
    fn an_address_not_on_this_host_is_refused() {
        // 198.18.0.0/15 (benchmarking) is on no interface of a test machine.
        let ip: IpAddr = "198.19.255.254".parse().unwrap();
        let e = check_relay_ip("relay.ip", ip).unwrap_err();
        assert!(e.msg.contains("not an address of this host"), "{}", e.msg);
        let e = check_bind("listen[0].address", SocketAddr::new(ip, 3478), false, Mode::Check).unwrap_err();
        assert!(e.msg.contains("not an address of this host"), "{}", e.msg);
        assert!(check_relay_ip("relay.ip", "127.0.0.1".parse().unwrap()).is_ok());
    }

    #[test]
    fn proc_net_addresses_and_who_holds_a_port() {
        let v4 = u32::from_ne_bytes([127, 0, 0, 1]);
        assert_eq!(proc_net_address(&format!("{v4:08X}:0D96")), Some("127.0.0.1:3478".parse().unwrap()));
        let one = u32::from_ne_bytes([0, 0, 0, 1]);
        assert_eq!(proc_net_address(&format!("000000000000000000000000{one:08X}:01BB")), Some("[::1]:443".parse().unwrap()));
        assert_eq!(proc_net_address("garbage"), None);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        assert!(bound_elsewhere(true, a));
        assert!(bound_elsewhere(true, SocketAddr::new("0.0.0.0".parse().unwrap(), a.port())));
        assert!(bound_elsewhere(true, SocketAddr::new("::ffff:127.0.0.1".parse().unwrap(), a.port())));
        assert!(!bound_elsewhere(true, SocketAddr::new("127.0.0.2".parse().unwrap(), a.port())));
        assert!(!bound_elsewhere(false, a), "a TCP listener holds no UDP port");
        drop(l);
        assert!(!bound_elsewhere(true, a));
    }

    #[test]
    fn expiry_notes() {
        let p = std::path::Path::new("c.pem");
        assert!(expiry_note(Some(1000), 2000, p).unwrap().contains("expired"));
        assert!(expiry_note(Some(2000 + 3 * 86_400), 2000, p).unwrap().contains("in 3 days"));
        assert_eq!(expiry_note(Some(2000 + 30 * 86_400), 2000, p), None);
    }
}
