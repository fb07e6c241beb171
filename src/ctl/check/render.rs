//! The report as a table for people and as JSON for monitoring.

use super::*;

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
        if let Some(p) = &self.proxy {
            out += &format!("through the HTTP proxy {p} (TCP and TLS; UDP cannot go through it)\n");
        }
        if let Some(m) = mapped {
            let whose = if self.proxy.is_some() { " (the proxy's address)" } else { "" };
            out += &format!("this machine, as the relay sees it: {}{whose}\n", m.ip());
        }
        out += "\n";
        let rows: Vec<[String; 6]> = std::iter::once(["transport", "port", "binding", "allocate", "relay", "notes"].map(String::from))
            .chain(self.transports.iter().map(|t| {
                let notes = match t.failure() {
                    Some((_, d)) => d.to_owned(),
                    None => {
                        let mut n = Vec::new();
                        if let Outcome::Skipped(d) = &t.binding
                            && !d.is_empty()
                        {
                            n.push(d.clone());
                        }
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
        match (&self.peer_leg.outcome, self.peer_leg.from, self.peer_leg.to) {
            (Outcome::Ok(d), Some(f), Some(t)) => out += &format!("\npeer leg     ok: UDP from {f} straight to relayed {t} {d}\n"),
            (Outcome::Failed(_, d), _, _) => out += &format!("\npeer leg     FAILED: {d}\n"),
            (Outcome::Skipped(d), _, _) if !d.is_empty() => out += &format!("\npeer leg     not tested: {d}\n"),
            _ => {}
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
            "peer_leg": {
                "tested": !matches!(self.peer_leg.outcome, Outcome::Skipped(_)),
                "result": self.peer_leg.outcome.to_json(),
                "from": self.peer_leg.from.map(|a| a.to_string()),
                "to": self.peer_leg.to.map(|a| a.to_string()),
            },
            "certificate": cert,
            "meanings": self.meanings,
            "proxy": self.proxy,
        })
    }
}

