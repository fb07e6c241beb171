//! The probes: resolve the host, connect over each transport, Binding,
//! allocations, the relay round trip, and what went wrong in words.

use super::*;

/// A working allocation kept for the relay round trip.
pub(super) struct Held {
    pub(super) transport: Transport,
    pub(super) client: Client,
    pub(super) alloc: Allocation,
}

/// One transport's first phase: Binding, and two Allocates.
pub(super) struct Probe {
    pub(super) result: TransportResult,
    pub(super) held: Vec<Held>,
    /// A client whose Allocate got 401 (kept to diagnose why).
    pub(super) unauthorized: Option<Client>,
}

pub(super) fn credentials(secret: &str, user: &str, expiry: u64) -> Credentials {
    let username = rest_username(expiry, Some(user));
    let password = rest_password(secret.as_bytes(), &username);
    Credentials { username, password }
}

pub(super) fn describe(e: &ClientError, t: Transport, port: u16) -> (FailKind, String) {
    use std::io::ErrorKind as K;
    let proto = if t == Transport::Udp { "UDP" } else { "TCP" };
    match e {
        ClientError::Timeout(d) => (FailKind::Timeout, format!("no answer within {}", fmt_duration(*d))),
        ClientError::ConnectTimeout(d) => (
            FailKind::Timeout,
            format!("no TCP connection within {} (dropped on the way, or the host is down)", fmt_duration(*d)),
        ),
        ClientError::Io(io) => match io.kind() {
            K::ConnectionRefused if t == Transport::Udp => {
                (FailKind::Refused, format!("refused: nothing listens on UDP {port} (ICMP port unreachable)"))
            }
            K::ConnectionRefused => (FailKind::Refused, format!("connection refused: nothing listens on TCP {port}")),
            K::PermissionDenied => (FailKind::Blocked, format!("blocked by this machine's firewall ({proto} {port}: {})", io_text(io))),
            K::HostUnreachable | K::NetworkUnreachable => (FailKind::Unreachable, format!("unreachable: {}", io_text(io))),
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                (FailKind::Closed, format!("the connection was cut: {}", io_text(io)))
            }
            _ => (FailKind::Io, io_text(io)),
        },
        ClientError::Tls(rustls::Error::InvalidCertificate(_)) => {
            (FailKind::Certificate, "the certificate does not verify (see below)".into())
        }
        ClientError::Tls(other) => (FailKind::Tls, format!("TLS handshake failed: {other}")),
        ClientError::Unauthorized => (FailKind::WrongSecret, "401 Unauthorized: credentials refused".into()),
        ClientError::Response { code, reason } => (FailKind::ErrorResponse, format!("refused: {code} {reason}")),
        ClientError::Closed => (FailKind::Closed, "the relay closed the connection".into()),
        ClientError::Protocol(p) => (FailKind::Protocol, p.clone()),
        ClientError::ProxyRefused { status: 407, .. } => (
            FailKind::ProxyRefused,
            "the proxy wants credentials (407): give them in the URL, http://USER:PASS@HOST:PORT".into(),
        ),
        ClientError::ProxyRefused { status, reason, .. } => {
            (FailKind::ProxyRefused, format!("the proxy refused CONNECT to port {port} ({status} {reason})"))
        }
        ClientError::Proxy(d) => (FailKind::Proxy, format!("cannot use the proxy {d}")),
    }
}

/// "operation not permitted" for "Operation not permitted (os error 1)".
pub(super) fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    let s = s.split(" (os error").next().unwrap_or(&s);
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `0.42 ms`, `12 ms`.
pub(super) fn fmt_ms(d: Duration) -> String {
    if d < Duration::from_millis(10) { format!("{:.2} ms", d.as_secs_f64() * 1000.0) } else { format!("{} ms", d.as_millis()) }
}

pub(super) fn failed(e: &ClientError, t: Transport, port: u16) -> Outcome {
    let (k, d) = describe(e, t, port);
    Outcome::Failed(k, d)
}

/// Resolves `host` within `timeout` (getaddrinfo has no timeout of its own).
pub(super) fn resolve(host: &str, timeout: Duration) -> Result<IpAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let h = host.to_owned();
    std::thread::spawn(move || {
        let r = (h.as_str(), 0u16).to_socket_addrs().map(|it| it.collect::<Vec<_>>());
        let _ = tx.send(r);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(addrs)) => {
            // Prefer IPv4: what most participants' browsers will end up using.
            addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).map(|a| a.ip()).ok_or_else(|| "no address".into())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer from DNS within {}", fmt_duration(timeout))),
    }
}

pub(super) fn probe(t: Transport, ip: IpAddr, o: &Options) -> Probe {
    let port = if t == Transport::Tls { o.tls_port } else { o.port };
    let server = SocketAddr::new(ip, port);
    let mut p = Probe { result: TransportResult::new(t, port), held: Vec::new(), unauthorized: None };
    let tls = o.tls.as_ref().map(|(cfg, _, name)| TlsTarget { config: cfg.clone(), name: name.clone() });
    let r = &mut p.result;
    let mut a = match o.connect(t, server, tls.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            r.binding = failed(&e, t, port);
            return p;
        }
    };
    r.tls_version = a.tls_info().map(|(v, _)| v);
    match a.binding() {
        Ok(mapped) => {
            r.mapped = Some(mapped);
            r.binding = Outcome::Ok(format!("seen as {mapped}"));
        }
        Err(e) => {
            r.binding = failed(&e, t, port);
            return p;
        }
    }
    let Some(secret) = &o.secret else {
        r.allocate = Outcome::Skipped("no secret given".into());
        return p;
    };
    let creds = credentials(secret, &o.user, unix_now() + CREDENTIAL_TTL);
    a.set_credentials(creds.clone());
    match a.allocate() {
        Ok(alloc) => {
            r.relayed = Some(alloc.relayed);
            r.allocate = Outcome::Ok(format!("relayed address {}", alloc.relayed));
            p.held.push(Held { transport: t, client: a, alloc });
        }
        Err(e) => {
            r.allocate = failed(&e, t, port);
            if matches!(e, ClientError::Unauthorized) {
                p.unauthorized = Some(a);
            }
            return p;
        }
    }
    // A second allocation on the same transport, to pair with the first.
    if let Ok(mut b) = o.connect(t, server, tls.as_ref()) {
        b.set_credentials(creds);
        if let Ok(alloc) = b.allocate() {
            p.held.push(Held { transport: t, client: b, alloc });
        }
    }
    p
}

/// Whether the relay accepts a credential expiring at `expiry`: Refresh on
/// a 5-tuple without an allocation authenticates first, then answers 437.
pub(super) fn accepts(c: &mut Client, secret: &str, user: &str, expiry: u64) -> Result<bool, ClientError> {
    c.set_credentials(credentials(secret, user, expiry));
    match c.refresh(0) {
        Ok(_) | Err(ClientError::Response { code: 437, .. }) => Ok(true),
        Err(ClientError::Unauthorized) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Why a credential made here was refused: a far-future expiry the relay
/// accepts means the secret is right and the relay's clock is ahead of
/// ours; a binary search on the expiry then finds the relay's time.
pub(super) fn diagnose(c: &mut Client, secret: &str, user: &str) -> AuthState {
    let now = unix_now();
    match accepts(c, secret, user, now + SKEW_PROBE_SPAN) {
        Ok(false) => return AuthState::WrongSecret,
        Err(_) => return AuthState::Refused,
        Ok(true) => {}
    }
    // The relay accepts an expiry at or after its own time: lo refused, hi accepted.
    let (mut lo, mut hi) = (now + CREDENTIAL_TTL, now + SKEW_PROBE_SPAN);
    for _ in 0..40 {
        if hi - lo <= 1 {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        match accepts(c, secret, user, mid) {
            Ok(true) => hi = mid,
            Ok(false) => lo = mid,
            Err(_) => break,
        }
    }
    AuthState::ClockSkew(hi as i64 - now as i64)
}

/// Sends a random payload from `from` to `to_relayed` until `to` receives it (bounded).
pub(super) fn one_way(from: &mut Client, to: &mut Client, to_relayed: SocketAddr, timeout: Duration) -> Result<(), (FailKind, String)> {
    let mut payload = *b"turnctl-check-0123456789abcdef";
    let mut r = [0u8; 16];
    getrandom::fill(&mut r).expect("the OS random generator is available");
    payload[14..].copy_from_slice(&r);
    let deadline = Instant::now() + timeout;
    loop {
        from.send_indication(to_relayed, &payload).map_err(|e| (describe(&e, Transport::Udp, 0).0, format!("Send indication: {e}")))?;
        let left = deadline.saturating_duration_since(Instant::now());
        match to.recv_data(left.min(Duration::from_millis(300))) {
            Ok((_, d)) if d == payload => return Ok(()),
            Ok(_) => {}
            Err(ClientError::Timeout(_)) if Instant::now() < deadline => {}
            Err(ClientError::Timeout(_)) => {
                return Err((
                    FailKind::Timeout,
                    format!("no data came back through the relay within {}", fmt_duration(timeout)),
                ));
            }
            Err(e) => return Err((describe(&e, Transport::Udp, 0).0, format!("receiving: {e}"))),
        }
    }
}

/// Permissions both ways, then a payload A -> B and another B -> A.
pub(super) fn round_trip(a: &mut Held, b: &mut Held, timeout: Duration) -> Result<Duration, (FailKind, String)> {
    let perm = |e: ClientError| match e {
        ClientError::Response { code, reason } => {
            (FailKind::ErrorResponse, format!("CreatePermission for the relay's own address refused: {code} {reason}"))
        }
        e => (describe(&e, Transport::Udp, 0).0, format!("CreatePermission: {e}")),
    };
    a.client.create_permission(b.alloc.relayed).map_err(perm)?;
    b.client.create_permission(a.alloc.relayed).map_err(perm)?;
    let t0 = Instant::now();
    one_way(&mut a.client, &mut b.client, b.alloc.relayed, timeout)?;
    one_way(&mut b.client, &mut a.client, a.alloc.relayed, timeout)?;
    Ok(t0.elapsed())
}

/// Two distinct elements of a slice, mutably.
pub(super) fn pair_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j);
    if i < j {
        let (x, y) = v.split_at_mut(j);
        (&mut x[i], &mut y[0])
    } else {
        let (x, y) = v.split_at_mut(i);
        (&mut y[0], &mut x[j])
    }
}

