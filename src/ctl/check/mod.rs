//! `turnctl check HOST`: can participants reach this relay, and over what?
//!
//! Run from a participant's network. For each transport (UDP and TCP on
//! `--port`, TLS on `--tls-port`): a STUN Binding; with the shared secret an
//! authenticated Allocate (two, so they can be paired) and a relay round
//! trip between two of the relay's own allocations (each sends a Send
//! indication to the other's relayed address and expects it back as a Data
//! indication). Then the peer leg from outside the relay: from its own plain
//! UDP socket, after a CreatePermission for its own address as the relay
//! sees it, this machine sends straight to a relayed address, as a
//! videobridge sends media, and expects the datagram at the client as a Data
//! indication (the round trip above never leaves the relay host, so a
//! firewall on the relay port range is only seen here). Then the TLS
//! certificate's facts, and what it all means for participants, as a table
//! or as JSON. Exit status 0 when some transport relays and peers reach the
//! relayed address (or that leg cannot be tested from here: UDP blocked;
//! without a secret: when some Binding works), 1 otherwise, 2 for usage
//! errors.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::ServerName;
use rustls::CertificateError;
use serde_json::{json, Value};

use crate::auth::{rest_password, rest_username};
use crate::client::cert::{self, CertInfo, Trust};
use crate::client::{fmt_duration, Allocation, Client, Credentials, Error as ClientError, TlsTarget, Transport, UdpPeer};

mod advice;
mod peer;
mod probes;
mod render;
mod report;

pub use advice::fmt_span;
pub use report::*;
use advice::{meanings, plural};
use peer::peer_leg;
use probes::*;

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
        peer_leg: PeerLeg::skipped(""),
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

    // Phase 2b: the peer leg, from outside the relay.
    report.peer_leg = peer_leg(&mut held, &report.transports, ip, o);

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
