//! What a check found: per transport, for the certificate, for credentials.

use super::*;

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
    /// The HTTP proxy answered CONNECT with a refusal.
    ProxyRefused,
    /// The HTTP proxy could not be reached or used.
    Proxy,
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
            FailKind::ProxyRefused => "proxy_refused",
            FailKind::Proxy => "proxy",
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
    pub(super) fn word(&self) -> &'static str {
        match self {
            Outcome::Ok(_) => "ok",
            Outcome::Failed(..) => "FAILED",
            Outcome::Skipped(_) => "-",
        }
    }
    pub(super) fn to_json(&self) -> Value {
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
    pub(super) fn new(transport: Transport, port: u16) -> Self {
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
    pub(super) fn name(&self) -> &'static str {
        match self.transport {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }
    /// The first failure, if any.
    pub(super) fn failure(&self) -> Option<(FailKind, &str)> {
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
    pub(super) fn from_seen(seen: cert::Seen, port: u16, name: &str) -> CertReport {
        let info = CertInfo::parse(&seen.end_entity);
        let days_left = info.as_ref().map(|i| (i.not_after - unix_now() as i64).div_euclid(86400));
        let (trust, problem) = match &seen.verdict {
            Ok(t) => (Some(*t), None),
            Err(e) => (None, Some(classify_cert_error(e, info.as_ref()))),
        };
        CertReport { port, name: name.to_owned(), trust, problem, info, chain_len: seen.chain_len, days_left }
    }
}

/// The peer leg tested from outside the relay: a datagram from this
/// machine's own UDP socket straight to a relayed address (as a videobridge
/// sends media), expected back at the client as a Data indication. The
/// relay round trip between two of its own allocations never leaves the
/// relay host, so only this sees a firewall on the relay port range.
#[derive(Clone, Debug)]
pub struct PeerLeg {
    /// Ok: it arrived. Failed: it did not (or the test broke). Skipped with
    /// a reason: not testable from here; with none: nothing to test (no
    /// secret, no allocation).
    pub outcome: Outcome,
    /// This machine's socket as the relay sees it.
    pub from: Option<SocketAddr>,
    /// The relayed address it was sent to.
    pub to: Option<SocketAddr>,
}

impl PeerLeg {
    pub(super) fn skipped(why: impl Into<String>) -> PeerLeg {
        PeerLeg { outcome: Outcome::Skipped(why.into()), from: None, to: None }
    }
    /// Tried, and nothing came through.
    pub fn failed(&self) -> bool {
        self.outcome.failure().is_some()
    }
    /// Not testable from here (a reason is given).
    pub fn untested(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Skipped(d) if !d.is_empty() => Some(d),
            _ => None,
        }
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
    pub peer_leg: PeerLeg,
    pub cert: Option<CertReport>,
    pub meanings: Vec<String>,
    /// The HTTP proxy TCP and TLS went through (password hidden).
    pub proxy: Option<String>,
}

impl Report {
    /// Some transport relays and peers reach the relayed address (or that
    /// leg could not be tested from here); without a secret: some Binding
    /// works. A relay whose peers cannot reach it carries no call.
    pub fn ok(&self) -> bool {
        if self.relay_checked {
            self.transports.iter().any(TransportResult::relays) && !self.peer_leg.failed()
        } else {
            self.transports.iter().any(|t| t.binding.is_ok())
        }
    }

    pub fn exit_code(&self) -> u8 {
        if self.ok() { 0 } else { 1 }
    }

    pub(super) fn get(&self, t: Transport) -> Option<&TransportResult> {
        self.transports.iter().find(|r| r.transport == t)
    }
}

pub(super) fn classify_cert_error(e: &rustls::Error, info: Option<&CertInfo>) -> (CertProblem, String) {
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

