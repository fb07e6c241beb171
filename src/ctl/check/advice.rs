//! What the results mean for participants, in plain sentences.

use super::*;

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

pub(super) fn plural(n: i64, one: &str) -> String {
    if n == 1 || n == -1 { format!("{n} {one}") } else { format!("{n} {one}s") }
}

pub(super) fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => v.is_private() || v.is_loopback() || v.is_link_local() || v.is_unspecified() || v.octets()[0] == 100 && (v.octets()[1] & 0xC0) == 64,
        IpAddr::V6(v) => v.is_loopback() || v.is_unspecified() || (v.segments()[0] & 0xFE00) == 0xFC00 || (v.segments()[0] & 0xFFC0) == 0xFE80,
    }
}

/// Plain sentences: what the results mean for participants.
pub(super) fn meanings(r: &Report) -> Vec<String> {
    let mut m = Vec::new();
    if let Some(e) = &r.resolve_error {
        m.push(format!(
            "Cannot resolve {}: {e}. Check the name in DNS (the A/AAAA record participants' browsers look up) and this machine's resolver.",
            r.host
        ));
        return m;
    }
    // Through a proxy the name may not be resolved here: say the name.
    let addr = r.address.map(|a| a.to_string()).unwrap_or_else(|| r.host.clone());
    let udp = r.get(Transport::Udp);
    let tcp = r.get(Transport::Tcp);
    let tls = r.get(Transport::Tls);
    let port_of = |t: Option<&TransportResult>| t.map(|x| x.port).unwrap_or(0);

    let proxy_trouble =
        r.transports.iter().any(|t| matches!(t.binding.failure(), Some(FailKind::Proxy | FailKind::ProxyRefused)));

    // Nothing answered at all.
    if !r.transports.iter().any(|t| t.binding.is_ok()) && !proxy_trouble {
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

    if let Some(p) = &r.proxy {
        proxy_meanings(r, p, &works, &mut m);
    }
    let any_binding = r.transports.iter().any(|t| t.binding.is_ok());
    let auth_problem = matches!(r.auth, AuthState::WrongSecret | AuthState::ClockSkew(_) | AuthState::Refused);

    if any_binding && !auth_problem {
        let udp_blocked = udp.is_some_and(|u| matches!(u.binding.failure(), Some(FailKind::Timeout | FailKind::Blocked | FailKind::Unreachable)));
        let udp_refused = udp.is_some_and(|u| u.binding.failure() == Some(FailKind::Refused));
        let all_work = r.transports.iter().all(|t| works(Some(t)));
        if all_work {
            let list = r.transports.iter().map(|t| format!("{} {}", t.name(), t.port)).collect::<Vec<_>>().join(", ");
            let what = if r.relay_checked { "relays" } else { "answers" };
            if r.peer_leg.failed() {
                m.push(format!("Every transport {what} between two of the relay's own allocations ({list}), but see below."));
            } else if r.transports.len() == 3 {
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
        if tried_and_failed(tcp) && tcp.is_some_and(|t| t.binding.failure().is_some_and(|k| k != FailKind::ProxyRefused)) {
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
                if d.contains("300 Try Alternate") {
                    m.push(format!(
                        "{}: the relay is draining (turnctl drain) and sends new clients to a sibling relay ({d}); browsers follow it. \
                         Check the sibling (turnctl status on this relay names it), or run `turnctl resume` here.",
                        t.name()
                    ));
                } else {
                    m.push(format!("{}: the relay refused the allocation ({d}): it may be draining, full, or over a quota.", t.name()));
                }
            }
        }
        if r.peer_leg.failed() {
            let port = r.peer_leg.to.map(|t| format!(" (the relayed port {} is one of them)", t.port())).unwrap_or_default();
            m.push(format!(
                "Peers cannot reach the relay: a UDP datagram sent from this machine straight to a relayed address, as a videobridge \
                 sends media, never arrived, although the relay reaches its own allocations inside the host. The relay host's firewall \
                 or its provider's (cloud security group) most likely drops inbound UDP to the relay port range: open inbound UDP \
                 on the relay port range, UDP LOW-HIGH as in relay.ports (49152-65535 by default){port}. Until then participants join \
                 but get no audio or video through this relay."
            ));
            let on_relay_host = match (r.peer_leg.from, r.peer_leg.to) {
                (Some(f), Some(t)) => f.ip() == t.ip() || r.address == Some(f.ip()),
                _ => false,
            };
            if on_relay_host {
                m.push(
                    "This check ran on the relay host itself: sending to its own public address needs the provider to loop it back \
                     (hairpin NAT), which some do not. Run it from another machine (the videobridge host) to be sure."
                        .into(),
                );
            }
        } else if let Some(why) = r.peer_leg.untested() {
            m.push(format!(
                "The peer leg (media from the videobridge into relayed addresses) was not tested from here: {why}."
            ));
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
        if r.proxy.is_some() && r.relay_checked {
            m.push("Nothing relays through the proxy: participants behind it will see no video.".into());
        } else if r.proxy.is_some() {
            m.push("No transport answered through the proxy: participants behind it cannot reach the relay.".into());
        } else if r.relay_checked && r.transports.iter().any(TransportResult::relays) {
            m.push("Clients reach the relay, but media from peers does not: calls through this relay carry no audio or video.".into());
        } else if r.relay_checked {
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
                    "The certificate expired on {when}: TLS clients refuse it. Renew it (turnctl cert renew on the relay with [tls.acme], \
                     or certbot renew: turnd picks up renewed files within 5 s). If it is not really expired, this machine's clock is wrong."
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
                        "Certificate expires in {}: renew it soon (turnctl cert renew with [tls.acme], which renews by itself well before; \
                         certbot renew for files, picked up within 5 s).",
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


/// What going through an HTTP proxy found: refusals of CONNECT by port, a
/// proxy that cannot be used, and that only TCP/TLS can pass it.
fn proxy_meanings(r: &Report, proxy: &str, works: &dyn Fn(Option<&TransportResult>) -> bool, m: &mut Vec<String>) {
    let tls = r.get(Transport::Tls);
    let tls_port = tls.map(|t| t.port).unwrap_or(443);
    if r.transports.iter().any(|t| t.binding.failure() == Some(FailKind::Proxy)) {
        m.push(format!(
            "Cannot use the proxy {proxy} (see the table): check its address and port (--proxy, HTTPS_PROXY) and that this machine \
             may reach it."
        ));
    }
    let refused = |t: &&TransportResult| t.binding.failure() == Some(FailKind::ProxyRefused);
    let wants_credentials = |t: &TransportResult| matches!(&t.binding, Outcome::Failed(_, d) if d.contains("(407)"));
    if r.transports.iter().filter(refused).any(wants_credentials) {
        m.push(
            "The proxy wants credentials (407): give them in the URL, --proxy http://USER:PASS@HOST:PORT (or in HTTPS_PROXY)."
                .into(),
        );
    }
    for t in r.transports.iter().filter(refused).filter(|t| !wants_credentials(t)) {
        if t.transport != Transport::Tls && works(tls) {
            m.push(format!(
                "The proxy refuses CONNECT to port {}: only {tls_port} passes; browsers behind it can use turns: on {tls_port}.",
                t.port
            ));
        } else {
            m.push(format!(
                "The proxy refuses CONNECT to port {}: participants behind it cannot reach the relay there. Serve TURN over TLS on 443 \
                 (the port such proxies allow) or ask the proxy's administrators to allow CONNECT to {}:{}.",
                t.port, r.host, t.port
            ));
        }
    }
    if r.transports.iter().any(|t| t.transport == Transport::Udp) {
        m.push(format!(
            "UDP was not tried: an HTTP proxy carries no UDP. Participants behind this proxy reach the relay only over TCP through \
             it, in practice turns: on {tls_port}, which browsers send through the proxy with CONNECT. If this network also lets UDP \
             out directly, check that without the proxy (NO_PROXY={} or --proxy '').",
            r.host
        ));
    }
}
