//! The shards as the rest of the process sees them: their threads, and the
//! fan-out of everything that concerns all of them. A start or reload is
//! applied to every shard in two phases (every shard prepares, then all
//! switch, or none does: see [`Control::apply`]); a scrape sums their snapshots; the admin API's
//! sessions and disconnect go to each; the systemd watchdog is fed only
//! while every shard's event loop answers.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;

use super::handover::{UpgradeError, Upgraded};
use super::reload::ReloadError;
use crate::net::sessions::Selector;
use crate::net::shard::{self, Apply, Command, Settings, Step};
use crate::net::shared::{Drain, Shared};
use crate::auth::NonceKey;
use crate::config::Config;
use crate::metrics::Snapshot;
use crate::turn::PeerPolicy;

/// How long a scrape or an admin request waits for a shard.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// How the admin API asks the main loop to reload; it answers on the oneshot.
pub(crate) type ReloadSender = mpsc::UnboundedSender<oneshot::Sender<Result<String, ReloadError>>>;

/// How the admin API asks the main loop to upgrade (to this binary, or the
/// one running); it answers on the oneshot.
pub(crate) type UpgradeSender = mpsc::UnboundedSender<(Option<std::path::PathBuf>, oneshot::Sender<Result<Upgraded, UpgradeError>>)>;

pub struct Control {
    inboxes: Vec<mpsc::UnboundedSender<Command>>,
    pub shared: Arc<Shared>,
    /// The admin API's bearer token; replaced on reload.
    pub admin_token: RefCell<Option<String>>,
    /// "udp 0.0.0.0:3478" and so on, for status.
    pub listener_names: RefCell<Vec<String>>,
    pub reload_tx: ReloadSender,
    pub upgrade_tx: UpgradeSender,
    /// Numbers the applies, so a late Commit or Abort cannot hit another one.
    applies: std::cell::Cell<u64>,
    /// The TLS listeners' certificate, when TLS is configured.
    pub certs: RefCell<Option<super::certs::Certs>>,
    /// The check page, when on; replaced on reload.
    pub check: RefCell<Option<Arc<crate::check::Site>>>,
    /// What the check page counts, kept across reloads.
    pub check_counts: Arc<crate::check::Counts>,
    /// The key check credentials are signed with (from the shared nonce key).
    pub check_key: [u8; 16],
    /// The siblings new clients go to while draining (`[[drain.alternate]]`), for status.
    pub alternates: RefCell<Vec<crate::turn::Alternate>>,
    /// The nonce key every shard uses; an upgrade hands it on, so nonces
    /// stay good across it.
    pub nonce_key: [u8; 32],
}

impl Control {
    /// Starts `cfg.threads` shard threads, with no listener yet, with the
    /// nonce key an upgrade handed over or a new random one.
    pub fn start(cfg: &Config, policy: &PeerPolicy, shared: Arc<Shared>, reload_tx: ReloadSender, upgrade_tx: UpgradeSender, key: Option<[u8; 32]>) -> anyhow::Result<Control> {
        let key = key.unwrap_or_else(|| {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).expect("the OS random generator is available");
            key
        });
        // One nonce key for all: a nonce handed out by one shard is good on
        // another (a client's TCP and UDP legs may land on different ones).
        let nonce_key = NonceKey::new(key, cfg.nonce_lifetime);
        let cfg = Arc::new(cfg.clone());
        let mut inboxes = Vec::new();
        for index in 0..cfg.threads {
            let (tx, inbox) = mpsc::unbounded_channel();
            let (started_tx, started) = std::sync::mpsc::channel();
            let spawn = shard::Spawn { index, cfg: cfg.clone(), shared: shared.clone(), nonce_key: nonce_key.clone(), policy: policy.clone(), inbox };
            std::thread::Builder::new()
                .name(format!("turnd-shard-{index}"))
                .spawn(move || shard::run(spawn, started_tx))
                .map_err(|e| anyhow::anyhow!("cannot start shard thread {index}: {e}"))?;
            match started.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => anyhow::bail!("cannot start the runtime of shard {index}: {e}"),
                Err(_) => anyhow::bail!("shard {index} ended at start"),
            }
            inboxes.push(tx);
        }
        Ok(Control { inboxes, shared, admin_token: RefCell::new(cfg.admin_token.clone()), listener_names: RefCell::default(), reload_tx, upgrade_tx, nonce_key: key,
            applies: Default::default(),
            certs: RefCell::default(),
            check: RefCell::default(),
            check_counts: Arc::default(),
            check_key: crate::auth::check_key(&nonce_key),
            alternates: RefCell::default(),
        })
    }

    /// Sends a command to every shard.
    pub fn tell_all(&self, make: impl Fn() -> Command) {
        for tx in &self.inboxes {
            let _ = tx.send(make());
        }
    }

    /// Asks every shard and waits for each answer up to `wait`; `None` for
    /// a shard that did not answer in time.
    async fn ask_all<T>(&self, make: impl Fn(oneshot::Sender<T>) -> Command, wait: Duration) -> Vec<Option<T>> {
        self.ask_each(|_, tx| make(tx), wait).await
    }

    /// [`Control::ask_all`] with a command of its own for each shard
    /// (`make` gets the shard's index).
    async fn ask_each<T>(&self, mut make: impl FnMut(usize, oneshot::Sender<T>) -> Command, wait: Duration) -> Vec<Option<T>> {
        let mut pending = Vec::with_capacity(self.inboxes.len());
        for (i, tx) in self.inboxes.iter().enumerate() {
            let (otx, orx) = oneshot::channel();
            let _ = tx.send(make(i, otx));
            pending.push(orx);
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::with_capacity(pending.len());
        for (i, rx) in pending.into_iter().enumerate() {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(v)) => out.push(Some(v)),
                _ => {
                    tracing::warn!(shard = i, "shard did not answer in time");
                    out.push(None);
                }
            }
        }
        out
    }

    /// Applies settings and listener changes to every shard (`steps[i]` to
    /// shard i), all or nothing: every shard first prepares (takes its new
    /// sockets into its runtime, the part that can fail) and says so; only
    /// when every one has within [`ANSWER_WAIT`] do all switch. A shard that
    /// fails or does not answer refuses the change on every shard.
    pub async fn apply(&self, cfg: Arc<Config>, policy: &PeerPolicy, acceptor: Option<&TlsAcceptor>, check: Option<Arc<crate::check::Site>>, steps: Vec<Vec<Step>>) -> Result<(), ReloadError> {
        let id = self.applies.get() + 1;
        self.applies.set(id);
        let mut steps = steps.into_iter();
        let prepare = |_, done| {
            let settings = Settings { cfg: cfg.clone(), policy: policy.clone(), acceptor: acceptor.cloned(), check: check.clone() };
            Command::Prepare(Box::new(Apply { id, settings, steps: steps.next().unwrap_or_default(), done }))
        };
        let answers = self.ask_each(prepare, ANSWER_WAIT).await;
        // The first shard, in order, that refused or stayed silent.
        let refused = answers.into_iter().enumerate().find_map(|(shard, a)| match a {
            Some(Ok(())) => None,
            Some(Err(f)) => Some(ReloadError::ShardStep { shard, listener: f.listener, error: f.error }),
            None => Some(ReloadError::ShardSilent { shard, wait: ANSWER_WAIT }),
        });
        if let Some(e) = refused {
            // A shard that answers later finds the Abort next in its inbox.
            self.tell_all(|| Command::Abort(id));
            return Err(e);
        }
        for (shard, ok) in self.ask_all(|done| Command::Commit(id, done), ANSWER_WAIT).await.into_iter().enumerate() {
            if ok.is_none() {
                // It prepared, so the switch is next in its inbox and cannot fail.
                tracing::warn!(shard, "shard prepared the change but has not confirmed the switch yet");
            }
        }
        *self.alternates.borrow_mut() = cfg.core.alternates.clone();
        Ok(())
    }

    /// The metrics of every shard, summed.
    pub async fn snapshot(&self) -> Snapshot {
        let mut sum = Snapshot::default();
        for (i, s) in self.ask_all(Command::Snapshot, ANSWER_WAIT).await.iter().enumerate() {
            match s {
                Some(s) => sum.add(s),
                None => sum.silent_shards.push(i),
            }
        }
        sum.relay_ports_in_use = self.shared.relay_ports_in_use() as u64;
        sum.relay_ports_total = self.shared.port_range() as u64;
        sum.uptime_seconds = self.shared.started.elapsed().as_secs();
        sum.draining = self.shared.draining();
        sum.ready = self.not_ready().is_none() && sum.silent_shards.is_empty();
        if self.check.borrow().is_some() {
            let c = &self.check_counts;
            let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            sum.check_credentials = Some((n(&c.issued), n(&c.rate_limited), n(&c.bad_token)));
        }
        if let Some(c) = self.certs.borrow().as_ref() {
            sum.cert_expiry = c.expiry();
            sum.acme_renewals = c.acme.as_ref().map(|a| {
                let s = a.status.borrow();
                (s.renewals_ok, s.renewals_failed)
            });
        }
        sum
    }

    /// Every allocation, as the admin API lists them.
    pub async fn sessions(&self) -> Vec<serde_json::Value> {
        self.ask_all(Command::Sessions, ANSWER_WAIT).await.into_iter().flatten().flatten().collect()
    }

    /// Ends the allocations `sel` selects on every shard; how many.
    pub async fn disconnect(&self, sel: Selector) -> usize {
        let sel = Arc::new(sel);
        self.ask_all(|tx| Command::Disconnect(sel.clone(), tx), ANSWER_WAIT).await.into_iter().flatten().sum()
    }

    /// Allocations made through UDP listener group `conn` on every shard;
    /// `None` when a shard did not say.
    pub async fn udp_allocations(&self, conn: u32) -> Option<usize> {
        self.ask_all(|tx| Command::UdpAllocations(conn, tx), ANSWER_WAIT).await.into_iter().sum()
    }

    /// An upgrade: every shard stops reading its listeners and the UDP
    /// allocations of groups `conns` and answers with them; `None` for a
    /// shard that did not in time.
    pub async fn export(&self, conns: Arc<[u32]>) -> Vec<Option<std::io::Result<shard::handover::Export>>> {
        self.ask_all(|tx| Command::Export(conns.clone(), tx), ANSWER_WAIT).await
    }

    /// The new process serves what was exported: every shard lets go of
    /// it. How many allocations left.
    pub async fn release(&self) -> usize {
        self.ask_all(Command::Release, ANSWER_WAIT).await.into_iter().flatten().sum()
    }

    /// Whether every shard's event loop answers within `wait`.
    pub async fn alive(&self, wait: Duration) -> bool {
        self.ask_all(Command::Ping, wait).await.iter().all(Option::is_some)
    }

    /// Graceful shutdown: every shard refuses new allocations.
    pub fn drain(&self) {
        self.shared.set_draining();
        self.tell_all(|| Command::Drain);
    }

    /// `turnctl drain`: every shard sends new allocations to the siblings
    /// (or refuses them), and the process keeps running. Returns the state
    /// the relay was in.
    pub fn drain_by_operator(&self) -> Drain {
        let was = self.shared.drain_by_operator();
        if was == Drain::Serving {
            self.tell_all(|| Command::Drain);
            let to: Vec<String> = self.alternates.borrow().iter().map(alternate_label).collect();
            tracing::info!(allocations = self.shared.allocations(), alternates = ?to, "draining (turnctl drain): new allocations go to other relays; existing ones keep relaying");
        }
        was
    }

    /// `turnctl resume`: new allocations again after `turnctl drain` (not
    /// after SIGTERM). Returns the state the relay was in.
    pub fn resume(&self) -> Drain {
        let was = self.shared.resume();
        if was == Drain::Draining {
            self.tell_all(|| Command::Undrain);
            tracing::info!("resumed (turnctl resume): taking new allocations again");
        }
        was
    }

    /// Why the relay cannot take new allocations (or TLS listeners cannot
    /// serve TURN), if it cannot.
    pub fn not_ready(&self) -> Option<String> {
        match self.shared.not_ready() {
            Some(why) => Some(why.into()),
            None => self.certs.borrow().as_ref().and_then(|c| c.not_serving()),
        }
    }
}

/// A sibling as configured: `IP` (the port the client came in on) or
/// `IP:PORT`, with its name for TLS clients.
pub fn alternate_label(a: &crate::turn::Alternate) -> String {
    let addr = match a.port {
        Some(p) => std::net::SocketAddr::new(a.ip, p).to_string(),
        None => a.ip.to_string(),
    };
    match &a.domain {
        Some(d) => format!("{addr} ({d})"),
        None => addr,
    }
}
