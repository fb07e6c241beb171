//! ACME (RFC 8555): turnd obtains and renews its own TLS certificate,
//! proving each name with the TLS-ALPN-01 challenge (RFC 8737) on its own
//! TLS listeners, so no port 80 and no certbot. The protocol is
//! instant-acme's; this module decides when ([`schedule`], sans-IO), keeps
//! the account and certificate on disk ([`state`]), answers the challenges
//! through the listeners' [`CertStore`] and installs what it gets there, so
//! every shard serves it from the next handshake on; connections already
//! open keep theirs. A failed renewal keeps the current certificate and is
//! retried with backoff.

mod challenge;
mod order;
pub mod schedule;
mod state;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};
use tokio::sync::{mpsc, oneshot};

use crate::certinfo::{format_date, CertInfo};
use crate::config::Acme;
use crate::net::tls::{self, CertStore};
pub use state::State;

/// The longest one attempt (account, order, validation, issuance) may take.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(300);
/// The renewal time is looked at again at least this often (the CA's
/// suggested window may move, the clock may jump).
const RECHECK: i64 = 6 * 3600;

/// What the ACME client reports: status, metrics, readiness.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub renewals_ok: u64,
    pub renewals_failed: u64,
    /// Why the last attempt failed; cleared by a success.
    pub last_error: Option<String>,
    /// An attempt is under way.
    pub attempting: bool,
    /// When the next attempt is due (unix seconds).
    pub next_attempt: Option<i64>,
    /// The CA's suggested renewal window, when it offers one.
    pub window: Option<(i64, i64)>,
}

/// The answer to a forced renewal: what was obtained, or why not.
pub type RenewReply = oneshot::Sender<Result<String, String>>;

/// The running ACME client; dropping it stops it.
pub struct Handle {
    pub cfg: Acme,
    pub status: Rc<RefCell<Status>>,
    renew: mpsc::UnboundedSender<RenewReply>,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// Starts the client for `cfg` on the current `LocalSet`; it installs
    /// the stored certificate (if it is good) before the first handshake can ask.
    pub fn spawn(cfg: Acme, store: Arc<CertStore>) -> Handle {
        let status = Rc::new(RefCell::new(Status::default()));
        let state = State::new(&cfg.state_dir);
        let stored = load_stored(&cfg, &state, &store);
        let (renew, rx) = mpsc::unbounded_channel();
        let task = tokio::task::spawn_local(manage(cfg.clone(), state, store, status.clone(), rx, stored));
        Handle { cfg, status, renew, task }
    }

    /// Asks for a renewal now, whatever the schedule says.
    pub fn renew(&self) -> oneshot::Receiver<Result<String, String>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.renew.send(tx);
        rx
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Whether `info` is a certificate for every one of `names`.
fn covers(info: &CertInfo, names: &[String]) -> bool {
    names.iter().all(|n| info.names.iter().any(|m| m.eq_ignore_ascii_case(n)))
}

/// Installs the stored certificate when it covers the names and has not
/// expired. Says why not otherwise; whether one was installed.
fn load_stored(cfg: &Acme, state: &State, store: &CertStore) -> bool {
    if let Err(e) = state.prepare() {
        tracing::error!(dir = %cfg.state_dir.display(), "tls.acme.state_dir: cannot create it: {e}");
    }
    match state.certificate(store.provider()) {
        Ok(Some(ck)) => match tls::info(&ck) {
            Some(i) if covers(&i, &cfg.names) && i.not_after > unix_now() => {
                tracing::info!(names = ?i.names, issuer = i.issuer_cn.as_deref().unwrap_or("?"), expires = %format_date(i.not_after), "TLS certificate from the ACME state directory");
                store.install_key(ck);
                return true;
            }
            Some(i) if i.not_after <= unix_now() => tracing::warn!(expired = %format_date(i.not_after), "the stored ACME certificate has expired: obtaining a new one"),
            _ => tracing::info!(names = ?cfg.names, "the stored ACME certificate does not cover tls.acme.names: obtaining a new one"),
        },
        Ok(None) => tracing::info!(names = ?cfg.names, directory = %cfg.directory, dir = %cfg.state_dir.display(), "no TLS certificate yet: asking the ACME CA; TLS listeners serve TURN once it arrives"),
        Err(e) => tracing::warn!("the stored ACME certificate is unusable ({e}): obtaining a new one"),
    }
    false
}

async fn manage(cfg: Acme, state: State, store: Arc<CertStore>, status: Rc<RefCell<Status>>, mut renew: mpsc::UnboundedReceiver<RenewReply>, stored: bool) {
    let mut account = None;
    let (mut failures, mut last_failure) = (0u32, 0i64);
    let mut window: Option<(i64, i64)> = None;
    // Looked up at once when a stored certificate serves.
    let mut ari_next = if stored { 0 } else { i64::MAX };
    let jitter = {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("the OS random generator is available");
        (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
    };
    loop {
        let now = unix_now();
        let current = store.current().and_then(|ck| tls::info(&ck)).filter(|i| covers(i, &cfg.names));
        if current.is_some() && ari_next <= now {
            let (w, recheck) = renewal_window(&cfg, &state, &store, &mut account).await;
            window = w;
            ari_next = now + recheck;
        }
        let due = current.as_ref().map_or(now, |i| schedule::renew_at(i.not_before, i.not_after, window, jitter));
        let next = if failures > 0 {
            due.max(last_failure + schedule::retry_in(failures, current.as_ref().map(|i| i.not_after - last_failure)))
        } else {
            due
        };
        {
            let mut s = status.borrow_mut();
            s.next_attempt = Some(next);
            s.window = window;
        }
        let wait = (next.min(ari_next).min(now + RECHECK) - now).max(0) as u64;
        let reply = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(wait)) => None,
            r = renew.recv() => match r {
                Some(reply) => Some(reply),
                None => return,
            },
        };
        if reply.is_none() && unix_now() < next {
            continue;
        }
        status.borrow_mut().attempting = true;
        let result = attempt(&cfg, &state, &store, &mut account).await;
        let mut s = status.borrow_mut();
        s.attempting = false;
        let answer = match result {
            Ok(i) => {
                failures = 0;
                s.renewals_ok += 1;
                s.last_error = None;
                window = None;
                ari_next = unix_now() + RECHECK;
                let msg = format!("certificate for {} from {} until {}", i.names.join(", "), i.issuer_cn.as_deref().unwrap_or("?"), format_date(i.not_after));
                tracing::info!(names = ?i.names, issuer = i.issuer_cn.as_deref().unwrap_or("?"), expires = %format_date(i.not_after), "TLS certificate obtained by ACME, serving it from the next handshake on");
                Ok(msg)
            }
            Err(e) => {
                let forced = reply.is_some() && current.as_ref().is_some_and(|i| unix_now() < schedule::renew_at(i.not_before, i.not_after, window, jitter));
                if !forced {
                    failures += 1;
                    last_failure = unix_now();
                }
                s.renewals_failed += 1;
                let e = format!("{e:#}");
                s.last_error = Some(e.clone());
                match &current {
                    Some(i) => tracing::warn!(expires = %format_date(i.not_after), "ACME renewal failed, keeping the current certificate: {e}"),
                    None => tracing::error!("ACME could not obtain a certificate: TLS listeners cannot serve TURN until it does: {e}"),
                }
                Err(e)
            }
        };
        drop(s);
        if let Some(reply) = reply {
            let _ = reply.send(answer);
        }
    }
}

/// One attempt: account, order, validation, issuance; stores and installs
/// the certificate. Bounded by [`ATTEMPT_LIMIT`].
async fn attempt(cfg: &Acme, state: &State, store: &CertStore, account: &mut Option<instant_acme::Account>) -> anyhow::Result<CertInfo> {
    let work = async {
        state.prepare().with_context(|| format!("tls.acme.state_dir {}", cfg.state_dir.display()))?;
        if account.is_none() {
            *account = Some(order::account(cfg, state).await?);
        }
        let acct = account.as_ref().ok_or_else(|| anyhow!("no account"))?;
        let (chain, key) = order::issue(acct, cfg, store).await?;
        state.save_certificate(&chain, &key).with_context(|| format!("storing the certificate in {}", cfg.state_dir.display()))?;
        let ck = state.certificate(store.provider()).map_err(|e| anyhow!("the certificate the CA sent: {e}"))?.ok_or_else(|| anyhow!("the stored certificate vanished"))?;
        let info = tls::info(&ck).ok_or_else(|| anyhow!("the certificate the CA sent does not parse"))?;
        store.install_key(ck);
        Ok(info)
    };
    let r = tokio::time::timeout(ATTEMPT_LIMIT, work).await.unwrap_or_else(|_| Err(anyhow!("no certificate within {} s", ATTEMPT_LIMIT.as_secs())));
    store.clear_challenges();
    if r.is_err() {
        // Fetched again next time: the CA may have moved or forgotten it.
        *account = None;
    }
    r
}

/// The CA's suggested renewal window for the served certificate, and when
/// to ask again; `None` when the CA offers none (then two thirds of the
/// lifetime), or it could not be asked.
async fn renewal_window(cfg: &Acme, state: &State, store: &CertStore, account: &mut Option<instant_acme::Account>) -> (Option<(i64, i64)>, i64) {
    let Some(der) = store.current().and_then(|ck| ck.cert.first().cloned()) else { return (None, RECHECK) };
    let Ok(id) = instant_acme::CertificateIdentifier::try_from(&der) else { return (None, RECHECK) };
    if account.is_none() {
        match order::account(cfg, state).await {
            Ok(a) => *account = Some(a),
            Err(e) => {
                tracing::debug!("ACME renewal information not asked (no account): {e:#}");
                return (None, 3600);
            }
        }
    }
    let Some(acct) = account.as_ref() else { return (None, RECHECK) };
    match acct.renewal_info(&id).await {
        Ok((info, retry)) => {
            let w = (info.suggested_window.start.unix_timestamp(), info.suggested_window.end.unix_timestamp());
            tracing::debug!(start = %format_date(w.0), end = %format_date(w.1), "ACME renewal window from the CA");
            (Some(w), (retry.as_secs() as i64).clamp(3600, RECHECK))
        }
        Err(instant_acme::Error::Unsupported(_)) => (None, i64::MAX / 4),
        Err(e) => {
            tracing::debug!("ACME renewal information unavailable: {e}");
            (None, 3600)
        }
    }
}
