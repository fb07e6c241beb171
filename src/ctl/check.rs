//! `turnctl check HOST`: can participants reach this relay, and over what?
//!
//! Run from a participant's network. For each transport (UDP and TCP on
//! `--port`, TLS on `--tls-port`): a STUN Binding; with the shared secret an
//! authenticated Allocate (two, so they can be paired) and a relay round
//! trip between two of the relay's own allocations (each sends a Send
//! indication to the other's relayed address and expects it back as a Data
//! indication). Then the TLS certificate's facts, and what it all means for
//! participants, as a table or as JSON. Exit status 0 when some transport
//! relays (without a secret: when some Binding works), 1 otherwise, 2 for
//! usage errors.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::ServerName;
use rustls::CertificateError;
use serde_json::{json, Value};

use crate::auth::{rest_password, rest_username};
use crate::client::cert::{self, CertInfo, Trust};
use crate::client::{fmt_duration, Allocation, Client, Credentials, Error as ClientError, TlsTarget, Transport};

/// How long the check's own credentials are valid.
pub const CREDENTIAL_TTL: u64 = 3600;
/// Warn when the certificate expires in fewer days than this.
pub const EXPIRY_WARN_DAYS: i64 = 14;
/// How far ahead the clock-skew probe looks for an expiry the relay accepts.
const SKEW_PROBE_SPAN: u64 = 400 * 86400;

/// `turnctl check` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// The relay's host name or address, as participants are given it.
    pub host: String,
    /// The relay's shared secret (auth.secrets); without it only Binding and TLS are checked.
    /// Other users of this host can read it in the process list: prefer --secret-file.
    #[arg(long, conflicts_with = "secret_file")]
    pub secret: Option<String>,
    /// File holding the shared secret (first non-comment line).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// User part of the credential (EXPIRY:USER).
    #[arg(long, default_value = "turnctl-check")]
    pub user: String,
    /// UDP and TCP port.
    #[arg(long, default_value_t = 3478)]
    pub port: u16,
    /// TLS port.
    #[arg(long, default_value_t = 443)]
    pub tls_port: u16,
    /// Name for TLS (SNI and certificate check); default HOST.
    #[arg(long, value_name = "NAME")]
    pub tls_host: Option<String>,
    /// Also trust the certificates in this PEM file (a private CA, or a self-signed certificate).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Go on over TLS even if the certificate does not verify (its facts are still reported).
    #[arg(long)]
    pub insecure: bool,
    /// Longest wait for each answer (e.g. 3s, 500ms).
    #[arg(long, default_value = "3s")]
    pub timeout: String,
    /// One JSON object, for monitoring.
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub no_udp: bool,
    #[arg(long)]
    pub no_tcp: bool,
    #[arg(long)]
    pub no_tls: bool,
}

/// Runs the check for `turnctl` and prints the result; returns the exit status.
pub fn main(args: CheckArgs) -> u8 {
    let opts = match Options::from_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("turnctl check: {e}");
            return 2;
        }
    };
    let report = run(&opts);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json()).unwrap_or_default());
    } else {
        print!("{}", report.render());
    }
    report.exit_code()
}

/// A checked, ready-to-run configuration.
pub struct Options {
    pub host: String,
    pub secret: Option<String>,
    pub user: String,
    pub port: u16,
    pub tls_port: u16,
    pub tls_name: String,
    pub timeout: Duration,
    pub transports: Vec<Transport>,
    pub insecure: bool,
    tls: Option<(Arc<rustls::ClientConfig>, Arc<cert::Observer>, ServerName<'static>)>,
}

impl Options {
    pub fn from_args(a: &CheckArgs) -> Result<Options, String> {
        let secret = match (&a.secret, &a.secret_file) {
            (Some(s), _) => Some(s.trim().to_owned()),
            (None, Some(f)) => Some(read_secret(f)?),
            (None, None) => None,
        };
        if secret.as_deref() == Some("") {
            return Err("--secret is empty".into());
        }
        let timeout = parse_timeout(&a.timeout)?;
        let transports: Vec<Transport> = [(Transport::Udp, a.no_udp), (Transport::Tcp, a.no_tcp), (Transport::Tls, a.no_tls)]
            .into_iter()
            .filter(|(_, off)| !off)
            .map(|(t, _)| t)
            .collect();
        if transports.is_empty() {
            return Err("--no-udp, --no-tcp and --no-tls together leave nothing to check".into());
        }
        let host = a.host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err("HOST is empty".into());
        }
        let tls_name = a.tls_host.clone().unwrap_or_else(|| host.clone());
        let tls = if transports.contains(&Transport::Tls) {
            let name = ServerName::try_from(tls_name.clone())
                .map_err(|_| format!("`{tls_name}` is not a valid TLS name (use --tls-host NAME)"))?;
            let (cfg, observer) = cert::client_config(a.ca.as_deref(), a.insecure)?;
            Some((cfg, observer, name))
        } else {
            None
        };
        Ok(Options {
            host,
            secret,
            user: a.user.clone(),
            port: a.port,
            tls_port: a.tls_port,
            tls_name,
            timeout,
            transports,
            insecure: a.insecure,
            tls,
        })
    }
}

fn read_secret(path: &std::path::Path) -> Result<String, String> {
    crate::config::SecretFile::read(path).map(|f| f.first()).map_err(|e| format!("--secret-file: {e}"))
}

/// `3s`, `3`, `500ms`, `1m`.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = match s.trim().strip_suffix("ms") {
        Some(ms) => ms.trim().parse::<u64>().map(Duration::from_millis).map_err(|_| ()),
        None => s.parse::<crate::config::Seconds>().map(|v| Duration::from_secs(v.0)).map_err(|_| ()),
    };
    match d {
        Ok(d) if d >= Duration::from_millis(10) && d <= Duration::from_secs(600) => Ok(d),
        _ => Err(format!("--timeout: `{s}` is not a duration between 10ms and 10m (e.g. 3s, 500ms)")),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Why a step failed, in words an operator acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    Dns,
    Timeout,
    Refused,
    Blocked,
    Unreachable,
    Closed,
    Certificate,
    Tls,
    WrongSecret,
    ClockSkew,
    ErrorResponse,
    Protocol,
    Io,
}

impl FailKind {
    pub fn label(self) -> &'static str {
        match self {
            FailKind::Dns => "dns",
            FailKind::Timeout => "timeout",
            FailKind::Refused => "refused",
            FailKind::Blocked => "blocked",
            FailKind::Unreachable => "unreachable",
            FailKind::Closed => "closed",
            FailKind::Certificate => "certificate",
            FailKind::Tls => "tls",
            FailKind::WrongSecret => "wrong_secret",
            FailKind::ClockSkew => "clock_skew",
            FailKind::ErrorResponse => "error_response",
            FailKind::Protocol => "protocol",
            FailKind::Io => "io",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Outcome {
    Ok(String),
    Failed(FailKind, String),
    Skipped(String),
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }
    pub fn failure(&self) -> Option<FailKind> {
        match self {
            Outcome::Failed(k, _) => Some(*k),
            _ => None,
        }
    }
    fn word(&self) -> &'static str {
        match self {
            Outcome::Ok(_) => "ok",
            Outcome::Failed(..) => "FAILED",
            Outcome::Skipped(_) => "-",
        }
    }
    fn to_json(&self) -> Value {
        match self {
            Outcome::Ok(d) => json!({"status": "ok", "detail": d}),
            Outcome::Failed(k, d) => json!({"status": "failed", "error": k.label(), "detail": d}),
            Outcome::Skipped(d) => json!({"status": "skipped", "detail": d}),
        }
    }
}

/// One transport's results.
#[derive(Clone, Debug)]
pub struct TransportResult {
    pub transport: Transport,
    pub port: u16,
    pub binding: Outcome,
    pub allocate: Outcome,
    pub relay: Outcome,
    pub mapped: Option<SocketAddr>,
    pub relayed: Option<SocketAddr>,
    pub round_trip: Option<Duration>,
    pub tls_version: Option<String>,
}

impl TransportResult {
    fn new(transport: Transport, port: u16) -> Self {
        let not = || Outcome::Skipped(String::new());
        TransportResult {
            transport,
            port,
            binding: not(),
            allocate: not(),
            relay: not(),
            mapped: None,
            relayed: None,
            round_trip: None,
            tls_version: None,
        }
    }
    pub fn relays(&self) -> bool {
        self.relay.is_ok()
    }
    fn name(&self) -> &'static str {
        match self.transport {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }
    /// The first failure, if any.
    fn failure(&self) -> Option<(FailKind, &str)> {
        [&self.binding, &self.allocate, &self.relay].into_iter().find_map(|o| match o {
            Outcome::Failed(k, d) => Some((*k, d.as_str())),
            _ => None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertProblem {
    UnknownIssuer,
    NameMismatch,
    Expired,
    NotYetValid,
    Other,
}

impl CertProblem {
    pub fn label(self) -> &'static str {
        match self {
            CertProblem::UnknownIssuer => "unknown_issuer",
            CertProblem::NameMismatch => "name_mismatch",
            CertProblem::Expired => "expired",
            CertProblem::NotYetValid => "not_yet_valid",
            CertProblem::Other => "invalid",
        }
    }
}

/// What the TLS port presented.
#[derive(Clone, Debug)]
pub struct CertReport {
    pub port: u16,
    /// The name it was checked for.
    pub name: String,
    pub trust: Option<Trust>,
    pub problem: Option<(CertProblem, String)>,
    pub info: Option<CertInfo>,
    pub chain_len: usize,
    pub days_left: Option<i64>,
}

impl CertReport {
    fn from_seen(seen: cert::Seen, port: u16, name: &str) -> CertReport {
        let info = CertInfo::parse(&seen.end_entity);
        let days_left = info.as_ref().map(|i| (i.not_after - unix_now() as i64).div_euclid(86400));
        let (trust, problem) = match &seen.verdict {
            Ok(t) => (Some(*t), None),
            Err(e) => (None, Some(classify_cert_error(e, info.as_ref()))),
        };
        CertReport { port, name: name.to_owned(), trust, problem, info, chain_len: seen.chain_len, days_left }
    }
}

fn classify_cert_error(e: &rustls::Error, info: Option<&CertInfo>) -> (CertProblem, String) {
    use CertificateError as C;
    let date = |t: &rustls::pki_types::UnixTime| cert::format_date(t.as_secs() as i64);
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                let self_signed = info.is_some_and(|i| i.self_signed);
                let what = if self_signed { "self-signed, not trusted" } else { "not signed by a trusted CA (unknown issuer)" };
                (CertProblem::UnknownIssuer, what.to_owned())
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => (CertProblem::NameMismatch, "does not name the host".into()),
            C::ExpiredContext { not_after, .. } => (CertProblem::Expired, format!("expired on {}", date(not_after))),
            C::Expired => (CertProblem::Expired, "expired".into()),
            C::NotValidYetContext { not_before, .. } => (CertProblem::NotYetValid, format!("not valid until {}", date(not_before))),
            C::NotValidYet => (CertProblem::NotYetValid, "not valid yet".into()),
            // webpki refuses a self-signed (CA) certificate as a server's own
            // before it looks for an issuer: to a client it is untrusted all the same.
            _ if info.is_some_and(|i| i.self_signed) => (CertProblem::UnknownIssuer, "self-signed, not trusted".into()),
            other => (CertProblem::Other, format!("{}", rustls::Error::InvalidCertificate(other.clone()))),
        },
        other => (CertProblem::Other, other.to_string()),
    }
}

/// How the credentials fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthState {
    /// No secret given.
    NotChecked,
    /// No Allocate reached the relay (nothing answered).
    Untested,
    Ok,
    WrongSecret,
    /// The relay's clock is this many seconds ahead of ours (at least).
    ClockSkew(i64),
    /// Refused, and the cause could not be narrowed down.
    Refused,
}

/// Everything the check found.
#[derive(Clone, Debug)]
pub struct Report {
    pub host: String,
    pub address: Option<IpAddr>,
    pub resolve_error: Option<String>,
    pub relay_checked: bool,
    pub timeout: Duration,
    pub insecure: bool,
    pub auth: AuthState,
    pub transports: Vec<TransportResult>,
    pub cert: Option<CertReport>,
    pub meanings: Vec<String>,
}

impl Report {
    /// Some transport relays (without a secret: some Binding works).
    pub fn ok(&self) -> bool {
        if self.relay_checked {
            self.transports.iter().any(TransportResult::relays)
        } else {
            self.transports.iter().any(|t| t.binding.is_ok())
        }
    }

    pub fn exit_code(&self) -> u8 {
        if self.ok() { 0 } else { 1 }
    }

    fn get(&self, t: Transport) -> Option<&TransportResult> {
        self.transports.iter().find(|r| r.transport == t)
    }
}

/// A working allocation kept for the relay round trip.
struct Held {
    transport: Transport,
    client: Client,
    alloc: Allocation,
}

/// One transport's first phase: Binding, and two Allocates.
struct Probe {
    result: TransportResult,
    held: Vec<Held>,
    /// A client whose Allocate got 401 (kept to diagnose why).
    unauthorized: Option<Client>,
}

fn credentials(secret: &str, user: &str, expiry: u64) -> Credentials {
    let username = rest_username(expiry, Some(user));
    let password = rest_password(secret.as_bytes(), &username);
    Credentials { username, password }
}

fn describe(e: &ClientError, t: Transport, port: u16) -> (FailKind, String) {
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
    }
}

/// "operation not permitted" for "Operation not permitted (os error 1)".
fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    let s = s.split(" (os error").next().unwrap_or(&s);
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `0.42 ms`, `12 ms`.
fn fmt_ms(d: Duration) -> String {
    if d < Duration::from_millis(10) { format!("{:.2} ms", d.as_secs_f64() * 1000.0) } else { format!("{} ms", d.as_millis()) }
}

fn failed(e: &ClientError, t: Transport, port: u16) -> Outcome {
    let (k, d) = describe(e, t, port);
    Outcome::Failed(k, d)
}

/// Resolves `host` within `timeout` (getaddrinfo has no timeout of its own).
fn resolve(host: &str, timeout: Duration) -> Result<IpAddr, String> {
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

fn probe(t: Transport, ip: IpAddr, o: &Options) -> Probe {
    let port = if t == Transport::Tls { o.tls_port } else { o.port };
    let server = SocketAddr::new(ip, port);
    let mut p = Probe { result: TransportResult::new(t, port), held: Vec::new(), unauthorized: None };
    let tls = o.tls.as_ref().map(|(cfg, _, name)| TlsTarget { config: cfg.clone(), name: name.clone() });
    let r = &mut p.result;
    let mut a = match Client::connect(t, server, o.timeout, tls.as_ref()) {
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
    if let Ok(mut b) = Client::connect(t, server, o.timeout, tls.as_ref()) {
        b.set_credentials(creds);
        if let Ok(alloc) = b.allocate() {
            p.held.push(Held { transport: t, client: b, alloc });
        }
    }
    p
}

/// Whether the relay accepts a credential expiring at `expiry`: Refresh on
/// a 5-tuple without an allocation authenticates first, then answers 437.
fn accepts(c: &mut Client, secret: &str, user: &str, expiry: u64) -> Result<bool, ClientError> {
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
fn diagnose(c: &mut Client, secret: &str, user: &str) -> AuthState {
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
fn one_way(from: &mut Client, to: &mut Client, to_relayed: SocketAddr, timeout: Duration) -> Result<(), (FailKind, String)> {
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
fn round_trip(a: &mut Held, b: &mut Held, timeout: Duration) -> Result<Duration, (FailKind, String)> {
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
fn pair_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &mut T) {
    assert_ne!(i, j);
    if i < j {
        let (x, y) = v.split_at_mut(j);
        (&mut x[i], &mut y[0])
    } else {
        let (x, y) = v.split_at_mut(i);
        (&mut y[0], &mut x[j])
    }
}

/// Runs the whole check. Never panics on network trouble: every failure is
/// in the report.
pub fn run(o: &Options) -> Report {
    let mut report = Report {
        host: o.host.clone(),
        address: None,
        resolve_error: None,
        relay_checked: o.secret.is_some(),
        timeout: o.timeout,
        insecure: o.insecure,
        auth: if o.secret.is_some() { AuthState::Untested } else { AuthState::NotChecked },
        transports: Vec::new(),
        cert: None,
        meanings: Vec::new(),
    };
    let ip = match resolve(&o.host, o.timeout) {
        Ok(ip) => ip,
        Err(e) => {
            for &t in &o.transports {
                let port = if t == Transport::Tls { o.tls_port } else { o.port };
                let mut r = TransportResult::new(t, port);
                r.binding = Outcome::Failed(FailKind::Dns, format!("cannot resolve {}", o.host));
                report.transports.push(r);
            }
            report.resolve_error = Some(e);
            report.meanings = meanings(&report);
            return report;
        }
    };
    report.address = Some(ip);

    // Phase 1, all transports at once: Binding and Allocates.
    let probes: Vec<Probe> = std::thread::scope(|s| {
        let handles: Vec<_> = o.transports.iter().map(|&t| s.spawn(move || probe(t, ip, o))).collect();
        handles.into_iter().map(|h| h.join().expect("probe thread")).collect()
    });
    let mut held = Vec::new();
    let mut unauthorized = None;
    for p in probes {
        report.transports.push(p.result);
        held.extend(p.held);
        if unauthorized.is_none() {
            unauthorized = p.unauthorized;
        }
    }

    // Why credentials were refused.
    if !held.is_empty() {
        report.auth = AuthState::Ok;
    }
    if let (Some(mut c), Some(secret)) = (unauthorized, &o.secret) {
        let state = diagnose(&mut c, secret, &o.user);
        if report.auth != AuthState::Ok {
            report.auth = state;
        }
        for r in &mut report.transports {
            if r.allocate.failure() == Some(FailKind::WrongSecret) {
                r.allocate = match state {
                    AuthState::WrongSecret => {
                        Outcome::Failed(FailKind::WrongSecret, "401 Unauthorized: the secret does not match the relay's".into())
                    }
                    AuthState::ClockSkew(s) => Outcome::Failed(
                        FailKind::ClockSkew,
                        format!("401: credential already expired by the relay's clock ({} ahead)", fmt_span(s)),
                    ),
                    _ => r.allocate.clone(),
                };
            }
        }
    }

    // Phase 2: relay round trips, each transport's allocation paired with a
    // second one on the same transport, else with another transport's.
    for r in report.transports.iter_mut() {
        let t = r.transport;
        if !r.allocate.is_ok() {
            r.relay = Outcome::Skipped(String::new());
            continue;
        }
        let Some(i) = held.iter().position(|h| h.transport == t) else { continue };
        let j = held
            .iter()
            .enumerate()
            .position(|(k, h)| k != i && h.transport == t)
            .or_else(|| held.iter().enumerate().position(|(k, _)| k != i));
        let Some(j) = j else {
            r.relay = Outcome::Skipped("no second allocation to pair with".into());
            continue;
        };
        let (a, b) = pair_mut(&mut held, i, j);
        let with = if b.transport == t { String::new() } else { format!(" (paired with {})", b.transport.label().to_uppercase()) };
        match round_trip(a, b, o.timeout) {
            Ok(d) => {
                r.round_trip = Some(d);
                r.relay = Outcome::Ok(format!("round trip {}{with}", fmt_ms(d)));
            }
            Err((k, d)) => r.relay = Outcome::Failed(k, format!("{d}{with}")),
        }
    }

    // Phase 3: delete the allocations (best effort, briefly).
    for h in &mut held {
        h.client.set_timeout(o.timeout.min(Duration::from_secs(1)));
        let _ = h.client.refresh(0);
    }

    if let Some((_, observer, _)) = &o.tls {
        report.cert = observer.seen().map(|s| CertReport::from_seen(s, o.tls_port, &o.tls_name));
    }
    report.meanings = meanings(&report);
    report
}

/// `45 s`, `12 min`, `2 h 5 min`, `3 h`, `3 d 4 h`: to the nearest minute above two minutes.
pub fn fmt_span(secs: i64) -> String {
    let s = secs.unsigned_abs();
    if s < 120 {
        return format!("{s} s");
    }
    let min = (s + 30) / 60;
    let unit = |n: u64, a: &str, m: u64, b: &str| if m == 0 { format!("{n} {a}") } else { format!("{n} {a} {m} {b}") };
    match min {
        0..=59 => format!("{min} min"),
        60..=2879 => unit(min / 60, "h", min % 60, "min"),
        _ => unit(min / 1440, "d", min % 1440 / 60, "h"),
    }
}

fn plural(n: i64, one: &str) -> String {
    if n == 1 || n == -1 { format!("{n} {one}") } else { format!("{n} {one}s") }
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => v.is_private() || v.is_loopback() || v.is_link_local() || v.is_unspecified() || v.octets()[0] == 100 && (v.octets()[1] & 0xC0) == 64,
        IpAddr::V6(v) => v.is_loopback() || v.is_unspecified() || (v.segments()[0] & 0xFE00) == 0xFC00 || (v.segments()[0] & 0xFFC0) == 0xFE80,
    }
}

/// Plain sentences: what the results mean for participants.
fn meanings(r: &Report) -> Vec<String> {
    let mut m = Vec::new();
    if let Some(e) = &r.resolve_error {
        m.push(format!(
            "Cannot resolve {}: {e}. Check the name in DNS (the A/AAAA record participants' browsers look up) and this machine's resolver.",
            r.host
        ));
        return m;
    }
    let addr = r.address.map(|a| a.to_string()).unwrap_or_default();
    let udp = r.get(Transport::Udp);
    let tcp = r.get(Transport::Tcp);
    let tls = r.get(Transport::Tls);
    let port_of = |t: Option<&TransportResult>| t.map(|x| x.port).unwrap_or(0);

    // Nothing answered at all.
    if !r.transports.iter().any(|t| t.binding.is_ok()) {
        let kinds: Vec<FailKind> = r.transports.iter().filter_map(|t| t.binding.failure()).collect();
        let list = r.transports.iter().map(|t| format!("{} {}", t.name(), t.port)).collect::<Vec<_>>().join(", ");
        if kinds.iter().all(|k| *k == FailKind::Refused) {
            m.push(format!(
                "Nothing listens at {addr} on {list} (refused): is turnd running, with listeners on these ports ([[listen]] in turnd.toml)?"
            ));
        } else if kinds.iter().all(|k| *k == FailKind::Blocked) {
            m.push(format!("This machine's own firewall blocks {list}: run the check from a machine that may reach the relay."));
        } else if !kinds.iter().all(|k| *k == FailKind::Certificate) {
            let mut open: Vec<String> = Vec::new();
            for t in &r.transports {
                let p = format!("{} {}", if t.transport == Transport::Udp { "UDP" } else { "TCP" }, t.port);
                if !open.contains(&p) {
                    open.push(p);
                }
            }
            m.push(format!(
                "The relay does not answer at {addr} from here ({list}): check the address (DNS), that turnd is running, and that the \
                 firewall or cloud security group lets in {}.",
                open.join(", ")
            ));
        }
    }

    // Credentials.
    match r.auth {
        AuthState::NotChecked => m.push(
            "Relaying was not checked: pass --secret or --secret-file (the relay's shared secret) to test allocations and a relay round trip."
                .into(),
        ),
        AuthState::WrongSecret => m.push(
            "Authentication failed: the secret does not match the relay's (check TURN_CREDENTIALS / auth.secrets): the relay refuses every \
             credential made with it, so participants given such credentials get no relay."
                .into(),
        ),
        AuthState::ClockSkew(s) => m.push(format!(
            "Your clock or the server's is off: the relay's clock is about {} ahead of this machine's, so a credential made here \
             (valid {}) had an expiry in the past by the time the relay checked it. Turn on time sync on both (timedatectl set-ntp true); \
             credentials from prosody fail the same way when its clock lags the relay's by more than their lifetime.",
            fmt_span(s),
            fmt_span(CREDENTIAL_TTL as i64)
        )),
        AuthState::Refused => m.push("The relay refused the credentials, and the cause could not be narrowed down (see the table).".into()),
        AuthState::Ok | AuthState::Untested => {}
    }

    let works = |t: Option<&TransportResult>| {
        t.is_some_and(|t| if r.relay_checked { t.relays() } else { t.binding.is_ok() })
    };
    let tried_and_failed = |t: Option<&TransportResult>| t.is_some_and(|t| !works(Some(t)));
    let any_binding = r.transports.iter().any(|t| t.binding.is_ok());
    let auth_problem = matches!(r.auth, AuthState::WrongSecret | AuthState::ClockSkew(_) | AuthState::Refused);

    if any_binding && !auth_problem {
        let udp_blocked = udp.is_some_and(|u| matches!(u.binding.failure(), Some(FailKind::Timeout | FailKind::Blocked | FailKind::Unreachable)));
        let udp_refused = udp.is_some_and(|u| u.binding.failure() == Some(FailKind::Refused));
        let all_work = r.transports.iter().all(|t| works(Some(t)));
        if all_work {
            let list = r.transports.iter().map(|t| format!("{} {}", t.name(), t.port)).collect::<Vec<_>>().join(", ");
            let what = if r.relay_checked { "relays" } else { "answers" };
            if r.transports.len() == 3 {
                m.push(format!(
                    "Every transport {what} ({list}): participants on any network that can reach this relay get through."
                ));
            } else {
                m.push(format!("Every transport checked {what} ({list})."));
            }
        } else if works(udp) {
            m.push(format!(
                "UDP works: participants on networks like this one get the best path (UDP {}).",
                port_of(udp)
            ));
        } else if udp_blocked || udp_refused {
            let lead = if udp_refused {
                format!("Nothing listens on UDP {} (refused)", port_of(udp))
            } else {
                "UDP blocked here".to_owned()
            };
            if works(tls) {
                m.push(format!(
                    "{lead}: browsers will fall back to TLS on {}; media still flows but with more latency.",
                    port_of(tls)
                ));
            } else if works(tcp) {
                m.push(format!(
                    "{lead}: clients will fall back to TCP {}; media still flows but with more latency.",
                    port_of(tcp)
                ));
            } else {
                m.push(format!("{lead}."));
            }
        }
        if tried_and_failed(tcp) && tcp.is_some_and(|t| t.binding.failure().is_some()) {
            if works(tls) {
                m.push(format!("TCP {} does not work from here; TLS on {} covers the same participants.", port_of(tcp), port_of(tls)));
            } else {
                m.push(format!("TCP {} does not work from here.", port_of(tcp)));
            }
        }
        if tried_and_failed(tls) {
            m.push(format!(
                "TLS on {} does not work from here: participants behind firewalls that only allow HTTPS will see no video.",
                port_of(tls)
            ));
        }
        // Allocations made, but no data went through.
        for t in &r.transports {
            if t.allocate.is_ok() && t.relay.failure().is_some() {
                m.push(format!(
                    "{} allocates but did not carry data between two of the relay's own allocations: check that the relay ports \
                     (relay.ports) are open in the relay's firewall and that relay.ip / relay.external_ip are the relay's addresses.",
                    t.name()
                ));
            }
            if let Outcome::Failed(FailKind::ErrorResponse, d) = &t.allocate {
                m.push(format!("{}: the relay refused the allocation ({d}): it may be draining, full, or over a quota.", t.name()));
            }
        }
        if r.relay_checked
            && let Some(t) = r.transports.iter().find_map(|t| t.relayed.filter(|a| is_private(a.ip())))
            && r.address.is_some_and(|a| !is_private(a))
        {
            m.push(format!(
                "The relay hands out relayed addresses like {t}, which peers elsewhere cannot reach: set relay.external_ip to its \
                 public address (unless every peer is on that network)."
            ));
        }
    }
    if !r.ok() {
        if r.relay_checked {
            m.push("Nothing relays: participants behind strict firewalls will see no video.".into());
        } else {
            m.push("No transport answered: participants cannot reach the relay from a network like this one.".into());
        }
    }

    // The certificate.
    if let Some(c) = &r.cert {
        let names = c.info.as_ref().map(|i| i.names.join(", ")).filter(|s| !s.is_empty()).unwrap_or_else(|| "no names".into());
        match c.problem {
            Some((CertProblem::UnknownIssuer, _)) if c.info.as_ref().is_some_and(|i| i.self_signed) => m.push(
                "The certificate is self-signed: browsers refuse it for turns:. Use a certificate from a public CA (e.g. Let's Encrypt), \
                 or pass --ca FILE to check against your own."
                    .into(),
            ),
            Some((CertProblem::UnknownIssuer, _)) => m.push(
                "The certificate is not signed by a CA this machine trusts: serve the full chain (fullchain.pem, not cert.pem), or pass \
                 --ca FILE for a private CA."
                    .into(),
            ),
            Some((CertProblem::NameMismatch, _)) => m.push(format!(
                "The certificate does not name {} (it names {names}): clients refuse it. Get one for {}, or pass --tls-host with the name \
                 clients use.",
                c.name, c.name
            )),
            Some((CertProblem::Expired, _)) => {
                let when = c.info.as_ref().map(|i| cert::format_date(i.not_after)).unwrap_or_default();
                m.push(format!(
                    "The certificate expired on {when}: TLS clients refuse it. Renew it (e.g. certbot renew; turnd picks up renewed files \
                     within 5 s). If it is not really expired, this machine's clock is wrong."
                ));
            }
            Some((CertProblem::NotYetValid, _)) => {
                let when = c.info.as_ref().map(|i| cert::format_date(i.not_before)).unwrap_or_default();
                m.push(format!(
                    "The certificate is not valid until {when}: this machine's clock (or the certificate's issuer's) is off."
                ));
            }
            Some((CertProblem::Other, ref d)) => m.push(format!("The certificate does not verify: {d}.")),
            None => {
                if let Some(days) = c.days_left.filter(|d| *d < EXPIRY_WARN_DAYS) {
                    m.push(format!(
                        "Certificate expires in {}: renew it soon (e.g. certbot renew; turnd picks up renewed files within 5 s).",
                        plural(days, "day")
                    ));
                }
            }
        }
        if c.problem.is_some() && r.insecure {
            m.push("(--insecure: the TLS checks went on despite the certificate; real clients will not.)".into());
        } else if c.problem.is_some() {
            m.push("Pass --insecure to check relaying over TLS despite the certificate.".into());
        }
    }
    m
}

impl Report {
    /// The human report: a table, the certificate, what it means.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let addr = match (self.address, &self.resolve_error) {
            (Some(a), _) if a.to_string() != self.host => format!(" ({a})"),
            (None, Some(_)) => " (unresolved)".into(),
            _ => String::new(),
        };
        out += &format!("turnctl check {}{addr}\n", self.host);
        let mapped = self.get(Transport::Udp).and_then(|t| t.mapped).or_else(|| self.transports.iter().find_map(|t| t.mapped));
        if let Some(m) = mapped {
            out += &format!("this machine, as the relay sees it: {}\n", m.ip());
        }
        out += "\n";
        let rows: Vec<[String; 6]> = std::iter::once(["transport", "port", "binding", "allocate", "relay", "notes"].map(String::from))
            .chain(self.transports.iter().map(|t| {
                let notes = match t.failure() {
                    Some((_, d)) => d.to_owned(),
                    None => {
                        let mut n = Vec::new();
                        if let Some(a) = t.relayed {
                            n.push(format!("relayed {a}"));
                        }
                        if let Some(d) = t.round_trip {
                            n.push(format!("round trip {}", fmt_ms(d)));
                        }
                        if let Outcome::Ok(d) = &t.relay
                            && let Some(p) = d.find(" (paired")
                        {
                            n.push(d[p + 2..d.len() - 1].to_owned());
                        }
                        if let Some(v) = &t.tls_version {
                            n.push(v.clone());
                        }
                        if let Outcome::Skipped(d) = &t.relay
                            && !d.is_empty()
                        {
                            n.push(format!("relay not tried: {d}"));
                        }
                        n.join("; ")
                    }
                };
                [
                    t.name().to_owned(),
                    t.port.to_string(),
                    t.binding.word().to_owned(),
                    t.allocate.word().to_owned(),
                    t.relay.word().to_owned(),
                    notes,
                ]
            }))
            .collect();
        let mut width = [0usize; 5];
        for row in &rows {
            for (w, c) in width.iter_mut().zip(row.iter()) {
                *w = (*w).max(c.chars().count());
            }
        }
        for row in &rows {
            let mut line = String::new();
            for (i, c) in row.iter().enumerate() {
                if i < 5 {
                    line += &format!("{c:<w$}  ", w = width[i]);
                } else {
                    line += c;
                }
            }
            out += line.trim_end();
            out += "\n";
        }
        if let Some(c) = &self.cert {
            out += "\n";
            let verdict = match (&c.trust, &c.problem) {
                (Some(Trust::Chain), _) => "verified".to_owned(),
                (Some(Trust::Pinned), _) => "verified (the certificate given with --ca)".to_owned(),
                (None, Some((_, d))) => format!("NOT verified: {d}"),
                (None, None) => "not verified".to_owned(),
            };
            out += &format!("certificate  TLS {} for {}: {verdict}\n", c.port, c.name);
            if let Some(i) = &c.info {
                let mut who = Vec::new();
                if !i.names.is_empty() {
                    who.push(format!("names {}", i.names.join(", ")));
                }
                if let Some(cn) = &i.subject_cn {
                    who.push(format!("CN {cn}"));
                }
                if i.self_signed {
                    who.push("self-signed".into());
                } else if let Some(cn) = &i.issuer_cn {
                    who.push(format!("issued by {cn}"));
                }
                who.push(format!("chain of {}", c.chain_len));
                out += &format!("             {}\n", who.join("; "));
                let date = cert::format_date(i.not_after);
                out += &match c.days_left {
                    Some(d) if d < 0 => format!("             EXPIRED {date} ({} ago)\n", plural(-d, "day")),
                    Some(d) if d < EXPIRY_WARN_DAYS => format!("             expires {date} ({} left)  <- renew soon\n", plural(d, "day")),
                    Some(d) => format!("             expires {date} ({} left)\n", plural(d, "day")),
                    None => String::new(),
                };
            }
        } else if self.transports.iter().any(|t| t.transport == Transport::Tls) {
            out += "\ncertificate  none seen (no TLS handshake got that far)\n";
        }
        out += "\nWhat it means:\n";
        for s in &self.meanings {
            out += &format!("  - {s}\n");
        }
        out
    }

    /// One JSON object for monitoring.
    pub fn to_json(&self) -> Value {
        let transports: Vec<Value> = self
            .transports
            .iter()
            .map(|t| {
                json!({
                    "transport": t.transport.label(),
                    "port": t.port,
                    "binding": t.binding.to_json(),
                    "allocate": t.allocate.to_json(),
                    "relay": t.relay.to_json(),
                    "relays": t.relays(),
                    "mapped_address": t.mapped.map(|a| a.to_string()),
                    "relayed_address": t.relayed.map(|a| a.to_string()),
                    "round_trip_ms": t.round_trip.map(|d| (d.as_secs_f64() * 100_000.0).round() / 100.0),
                    "tls_version": t.tls_version,
                })
            })
            .collect();
        let cert = self.cert.as_ref().map(|c| {
            let i = c.info.clone().unwrap_or_default();
            let parsed = c.info.is_some();
            json!({
                "port": c.port,
                "name": c.name,
                "verified": c.trust.is_some(),
                "trust": c.trust.map(|t| match t { Trust::Chain => "chain", Trust::Pinned => "ca_file" }),
                "error": c.problem.as_ref().map(|p| p.0.label()),
                "error_detail": c.problem.as_ref().map(|p| p.1.clone()),
                "subject_cn": i.subject_cn,
                "issuer_cn": i.issuer_cn,
                "names": i.names,
                "self_signed": i.self_signed,
                "not_before": parsed.then(|| cert::format_timestamp(i.not_before)),
                "not_after": parsed.then(|| cert::format_timestamp(i.not_after)),
                "not_after_unix": parsed.then_some(i.not_after),
                "days_left": c.days_left,
                "expires_soon": c.days_left.is_some_and(|d| d < EXPIRY_WARN_DAYS),
                "chain_length": c.chain_len,
            })
        });
        let (auth, skew) = match self.auth {
            AuthState::NotChecked => ("not_checked", None),
            AuthState::Untested => ("untested", None),
            AuthState::Ok => ("ok", None),
            AuthState::WrongSecret => ("wrong_secret", None),
            AuthState::ClockSkew(s) => ("clock_skew", Some(s)),
            AuthState::Refused => ("refused", None),
        };
        json!({
            "host": self.host,
            "address": self.address.map(|a| a.to_string()),
            "resolve_error": self.resolve_error,
            "ok": self.ok(),
            "exit_code": self.exit_code(),
            "relay_checked": self.relay_checked,
            "auth": auth,
            "clock_skew_seconds": skew,
            "timeout_ms": self.timeout.as_millis() as u64,
            "relaying": self.transports.iter().filter(|t| t.relays()).map(|t| t.transport.label()).collect::<Vec<_>>(),
            "transports": transports,
            "certificate": cert,
            "meanings": self.meanings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_timeout("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn spans() {
        assert_eq!(fmt_span(45), "45 s");
        assert_eq!(fmt_span(3600), "1 h");
        assert_eq!(fmt_span(10_798), "3 h");
        assert_eq!(fmt_span(7500), "2 h 5 min");
        assert_eq!(fmt_span(3 * 86400 + 4 * 3600 + 5), "3 d 4 h");
        assert_eq!(fmt_span(-600), "10 min");
    }
}
