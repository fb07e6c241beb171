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
//! or as JSON. With an HTTP proxy (`--proxy`, or HTTPS_PROXY/ALL_PROXY unless
//! NO_PROXY names the relay), TCP and TLS go through it with CONNECT, and UDP
//! (and with it the peer leg) is not tried. Exit status 0 when some transport
//! relays and peers reach the relayed address (or that leg cannot be tested
//! from here: UDP blocked; without a secret: when some Binding works), 1
//! otherwise, 2 for usage errors.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::ServerName;
use rustls::CertificateError;
use serde_json::{json, Value};

use crate::auth::{rest_password, rest_username};
use crate::client::cert::{self, CertInfo, Trust};
use crate::client::proxy::HttpProxy;
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
    /// Reach the relay's TCP and TLS ports through this HTTP proxy (CONNECT), as browsers behind
    /// it do: http://[USER:PASS@]HOST:PORT. Default: HTTPS_PROXY or ALL_PROXY (unless NO_PROXY
    /// names the relay); `--proxy ''` ignores them. UDP is not tried: a proxy cannot carry it.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    /// The proxy's credentials, USER:PASS on the first line of FILE, kept out of the process
    /// list (a password in --proxy's URL is visible to other users of this host). Also read
    /// from the TURNCTL_PROXY_AUTH environment variable.
    #[arg(long, value_name = "FILE")]
    pub proxy_auth_file: Option<PathBuf>,
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
    /// TCP and TLS go through this proxy; UDP is then not tried.
    pub proxy: Option<HttpProxy>,
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
        let proxy = match a.proxy.as_deref().map(str::trim) {
            Some("") => None,
            Some(url) => Some(HttpProxy::parse(url).map_err(|e| format!("--proxy: {e}"))?),
            None => HttpProxy::from_env(&host, |k| std::env::var(k).ok()).transpose()?,
        };
        let auth = match &a.proxy_auth_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("--proxy-auth-file: cannot read {}: {e}", f.display()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            None => std::env::var("TURNCTL_PROXY_AUTH").ok().filter(|v| !v.trim().is_empty()),
        };
        let proxy = match (proxy, auth) {
            (Some(p), Some(up)) => Some(p.with_auth(&up).map_err(|e| format!("--proxy-auth-file: {e}"))?),
            (None, Some(_)) if a.proxy_auth_file.is_some() => return Err("--proxy-auth-file: no proxy (give --proxy or HTTPS_PROXY)".into()),
            (p, _) => p,
        };
        Ok(Options {
            proxy,
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

impl Options {
    /// A client to `server` over `t`: through the proxy for TCP and TLS
    /// when there is one (the tunnel goes to HOST as given, for the proxy to
    /// resolve), else directly.
    pub(super) fn connect(&self, t: Transport, server: SocketAddr, tls: Option<&TlsTarget>) -> Result<Client, ClientError> {
        match &self.proxy {
            Some(p) if t != Transport::Udp => Client::connect_via(p, t, &self.host, server.port(), self.timeout, tls),
            _ => Client::connect(t, server, self.timeout, tls),
        }
    }
}

/// UDP when TCP and TLS go through a proxy: not tried, and why.
fn udp_not_proxied(o: &Options) -> Probe {
    let mut result = TransportResult::new(Transport::Udp, o.port);
    result.binding = Outcome::Skipped("not tried: UDP cannot go through an HTTP proxy".into());
    Probe { result, held: Vec::new(), unauthorized: None }
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
        proxy: o.proxy.as_ref().map(HttpProxy::display),
    };
    // Through a proxy, the proxy resolves the name (this network may have
    // no DNS for it); `ip` then only carries the port.
    let through_proxy = o.proxy.is_some() && o.host.parse::<IpAddr>().is_err();
    let resolved = if through_proxy { Ok(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)) } else { resolve(&o.host, o.timeout) };
    let ip = match resolved {
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
    report.address = (!through_proxy).then_some(ip);

    // Phase 1, all transports at once: Binding and Allocates.
    let probes: Vec<Probe> = std::thread::scope(|s| {
        let handles: Vec<_> = o.transports.iter().map(|&t| s.spawn(move || if t == Transport::Udp && o.proxy.is_some() { udp_not_proxied(o) } else { probe(t, ip, o) })).collect();
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

    /// A report through a proxy: UDP skipped, TCP 3478 refused by the proxy
    /// with `tcp`, TLS relaying.
    fn proxied(tcp: Outcome) -> Report {
        let mut udp = TransportResult::new(Transport::Udp, 3478);
        udp.binding = Outcome::Skipped("not tried: UDP cannot go through an HTTP proxy".into());
        let mut t = TransportResult::new(Transport::Tcp, 3478);
        t.binding = tcp;
        let mut tls = TransportResult::new(Transport::Tls, 443);
        tls.binding = Outcome::Ok(String::new());
        tls.allocate = Outcome::Ok(String::new());
        tls.relay = Outcome::Ok(String::new());
        let mut r = Report {
            host: "turn.example.com".into(),
            address: None,
            resolve_error: None,
            relay_checked: true,
            timeout: Duration::from_secs(3),
            insecure: false,
            auth: AuthState::Ok,
            transports: vec![udp, t, tls],
            peer_leg: PeerLeg::skipped("not tested: UDP does not go through an HTTP proxy"),
            cert: None,
            meanings: Vec::new(),
            proxy: Some("http://proxy:3128".into()),
        };
        r.meanings = meanings(&r);
        r
    }

    #[test]
    fn proxy_meanings() {
        let refused = |status: u16, reason: &str| {
            let (k, d) = probes::describe(
                &ClientError::ProxyRefused { proxy: "p".into(), target: "t:3478".into(), status, reason: reason.into() },
                Transport::Tcp,
                3478,
            );
            Outcome::Failed(k, d)
        };
        let r = proxied(refused(403, "Forbidden"));
        assert_eq!(r.exit_code(), 0);
        let all = r.meanings.join("\n");
        assert!(
            all.contains("The proxy refuses CONNECT to port 3478: only 443 passes; browsers behind it can use turns: on 443."),
            "{all}"
        );
        assert!(all.contains("UDP was not tried"), "{all}");
        assert!(!all.contains("TCP 3478 does not work from here"), "{all}");
        assert!(r.render().contains("through the HTTP proxy http://proxy:3128"));
        let r = proxied(refused(407, "Proxy Authentication Required"));
        let all = r.meanings.join("\n");
        assert!(all.contains("The proxy wants credentials (407)"), "{all}");
        assert!(!all.contains("refuses CONNECT"), "{all}");
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
