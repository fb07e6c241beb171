//! The TLS listeners' certificate as the control plane keeps it: the store
//! every shard's handshakes read, where the certificate comes from (files,
//! re-read when they change, or turnd's ACME client), and what status,
//! metrics and readiness say about it. A reload decides its [`TlsStep`]
//! before anything changes, and commits it only when every shard switched.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio_rustls::TlsAcceptor;

use crate::acme;
use crate::certinfo::format_date;
use crate::config::{CertSource, ConfigError};
use crate::net::stream::tls::{self, CertStore};

pub struct Certs {
    pub store: Arc<CertStore>,
    /// The ACME client, when turnd obtains the certificate itself.
    pub acme: Option<acme::Handle>,
}

impl Certs {
    /// Loads the files, or starts the ACME client (on the current
    /// `LocalSet`) with whatever certificate its state directory holds.
    /// `keep` serves meanwhile when ACME has none yet (a reload from files
    /// to ACME).
    pub fn start(source: &CertSource, keep: Option<&Certs>) -> Result<Certs, ConfigError> {
        match source {
            CertSource::Files { cert, key } => {
                Ok(Certs { store: CertStore::load(cert, key)?, acme: None })
            }
            CertSource::Acme(a) => {
                let store = CertStore::for_acme();
                if let Some(ck) = keep.and_then(|k| k.store.current()) {
                    store.install_key((*ck).clone());
                }
                let acme = acme::Handle::spawn(a.clone(), store.clone());
                Ok(Certs { store, acme: Some(acme) })
            }
        }
    }

    /// The TLS settings for handshakes: TURN's ALPN, ACME's challenge
    /// protocol with ACME, HTTP/1.1 for browsers (readiness, the check page).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.store.server_config(self.acme.is_some()))
    }

    /// Why TLS listeners cannot serve TURN yet, if they cannot.
    pub fn not_serving(&self) -> Option<String> {
        if self.store.current().is_some() {
            return None;
        }
        let why = match &self.acme {
            Some(a) => {
                let s = a.status.borrow();
                let what = format!("tls: no certificate yet for {} from {}", a.cfg.names.join(", "), a.cfg.directory);
                match &s.last_error {
                    Some(e) => format!("{what}: the last attempt failed: {e}"),
                    None => format!("{what}: being obtained"),
                }
            }
            None => "tls: no certificate".to_owned(),
        };
        Some(why)
    }

    /// The served certificate's expiry (unix seconds).
    pub fn expiry(&self) -> Option<i64> {
        self.store.current().and_then(|ck| tls::not_after(&ck))
    }

    /// For `turnctl status`: names, issuer, validity, and the ACME client's state.
    pub fn status(&self, now: i64) -> Value {
        let mut v = match self.store.current().and_then(|ck| tls::info(&ck)) {
            Some(i) => json!({
                "names": i.names,
                "issuer": i.issuer_cn,
                "not_before": i.not_before,
                "not_after": i.not_after,
                "expires": format_date(i.not_after),
                "days_left": (i.not_after - now).div_euclid(86_400),
            }),
            None => json!({ "names": [], "missing": self.not_serving() }),
        };
        v["source"] = json!(if self.acme.is_some() { "acme" } else { "files" });
        if let Some(a) = &self.acme {
            let s = a.status.borrow();
            v["acme"] = json!({
                "directory": a.cfg.directory,
                "state_dir": a.cfg.state_dir,
                "next_attempt": s.next_attempt,
                "next_attempt_date": s.next_attempt.map(format_date),
                "renewal_window": s.window.map(|(a, b)| [a, b]),
                "attempting": s.attempting,
                "last_error": s.last_error,
                "renewals": { "success": s.renewals_ok, "failure": s.renewals_failed },
            });
        }
        v
    }
}

/// How a reload changes TLS, decided before anything changes.
pub enum TlsStep {
    Unchanged,
    /// Same files: load them again (renewed in place). A broken one keeps the
    /// old certificate serving but does not hold up the rest of the reload.
    Reread,
    /// Other files, loaded.
    Other(std::path::PathBuf, std::path::PathBuf, rustls::sign::CertifiedKey),
    /// ACME with other settings: a new client on the same store (the
    /// certificate serves on until the new one arrives, if it covers the names).
    Acme(crate::config::Acme),
    /// TLS configured for the first time, or from another source.
    New(Certs),
}

impl TlsStep {
    pub fn plan(new: Option<&CertSource>, running: Option<&Certs>) -> Result<TlsStep, ConfigError> {
        Ok(match (new, running) {
            (None, _) => TlsStep::Unchanged,
            (Some(CertSource::Files { cert, key }), Some(c)) if c.acme.is_none() => {
                if c.store.same_paths(cert, key) {
                    TlsStep::Reread
                } else {
                    TlsStep::Other(cert.clone(), key.clone(), c.store.load_other(cert, key)?)
                }
            }
            (Some(CertSource::Acme(a)), Some(Certs { acme: Some(h), .. })) if h.cfg == *a => TlsStep::Unchanged,
            (Some(CertSource::Acme(a)), Some(Certs { acme: Some(_), .. })) => TlsStep::Acme(a.clone()),
            (Some(source), running) => TlsStep::New(Certs::start(source, running)?),
        })
    }

    /// The TLS settings shards get with this step.
    pub fn acceptor(&self, running: Option<&Certs>) -> Option<TlsAcceptor> {
        match self {
            TlsStep::New(c) => Some(c.acceptor()),
            _ => running.map(|c| c.acceptor()),
        }
    }

    /// Applies it (every shard has switched).
    pub fn commit(self, slot: &mut Option<Certs>) {
        match self {
            TlsStep::Unchanged => {}
            TlsStep::Reread => match slot.as_ref().map(|c| c.store.reload()) {
                Some(Err(e)) => tracing::warn!("TLS certificate not reloaded, keeping the old one: {e:#}"),
                _ => tracing::info!("TLS certificate reloaded"),
            },
            TlsStep::Other(cert, key, ck) => {
                if let Some(c) = slot {
                    c.store.install(&cert, &key, ck);
                }
                tracing::info!(cert = %cert.display(), "TLS certificate switched");
            }
            TlsStep::Acme(a) => {
                if let Some(c) = slot {
                    tracing::info!(names = ?a.names, directory = %a.directory, "ACME settings changed");
                    // The old client stops as its handle drops.
                    c.acme = Some(acme::Handle::spawn(a, c.store.clone()));
                }
            }
            TlsStep::New(c) => *slot = Some(c),
        }
    }
}
