//! The process around the shard: start, reload as a transaction, drain and
//! signals, and the listeners a reload adds, keeps and removes.
//!
//! A reload first does everything that can fail (read and validate the file,
//! load certificates, check relay addresses, bind every new socket) without
//! touching what runs; only when all of it succeeded does it switch. A
//! refused reload leaves the running configuration and every socket as they
//! were, and says why. A UDP listener that a reload removes keeps serving the
//! allocations made through it until they end, then closes; new clients get
//! no answer on it.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::{accept_loop, bind_tcp, bind_udp, http, preflight, systemd, tls, Shard, Udp};
use crate::config::{Bandwidth, Config, ConfigError, Listener, Overrides, SecretSource};
use crate::turn::Transport;

/// Sets the log level (or filter) and whether lines are JSON.
pub type SetLog = Box<dyn Fn(&str, bool)>;

/// Where a reload reads the configuration from, and how it changes the log level.
pub struct Reload {
    pub path: Option<std::path::PathBuf>,
    pub overrides: Overrides,
    pub set_log: SetLog,
}

/// A listener's socket, kept across reloads while its address stays.
enum Socket {
    /// Index of the listener in the shard's UDP listeners (its `conn`).
    Udp(u32),
    Stream(Rc<TcpListener>),
}

struct Active {
    l: Listener,
    socket: Socket,
    /// The accept loop of a TCP/TLS listener (a UDP listener's task lives
    /// with its socket in the shard).
    task: Option<JoinHandle<()>>,
}

impl Drop for Active {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// What a reload does with one wanted listener, decided before anything changes.
enum Step {
    /// Already running at this address: `active[i]`, possibly with new flags.
    Keep(usize, Listener),
    /// A removed UDP listener still serving its allocations: serve again.
    Revive(u32, Listener),
    Bind(Listener, NewSocket),
}

enum NewSocket {
    Udp(Udp),
    Stream(TcpListener),
}

fn name(l: &Listener) -> String {
    format!("{} {}", l.transport.label(), l.address)
}

/// Same socket: the same address, both stream or both datagram (a TCP
/// listener can become TLS, or change its PROXY setting, on one socket).
fn same_socket(a: &Listener, b: &Listener) -> bool {
    a.address == b.address && a.transport.is_stream() == b.transport.is_stream()
}

#[derive(Default)]
struct Listeners {
    active: Vec<Active>,
}

impl Listeners {
    /// Binds what `wanted` adds. Nothing running changes; on error the
    /// sockets bound so far are closed again.
    fn prepare(&self, shard: &Shard, wanted: &[Listener]) -> Result<Vec<Step>, ConfigError> {
        let mut steps = Vec::new();
        for (i, l) in wanted.iter().enumerate() {
            if let Some(a) = self.active.iter().position(|a| same_socket(&a.l, l)) {
                steps.push(Step::Keep(a, l.clone()));
                continue;
            }
            if l.transport == Transport::Udp
                && let Some(conn) = shard.retiring_udp(l.address) {
                    steps.push(Step::Revive(conn, l.clone()));
                    continue;
                }
            let key = format!("listen[{i}].address");
            let stream = l.transport.is_stream();
            let socket = if stream { bind_tcp(l.address).map(NewSocket::Stream) } else { bind_udp(l.address).map(NewSocket::Udp) };
            match socket {
                Ok(s) => steps.push(Step::Bind(l.clone(), s)),
                Err(e) => return Err(preflight::bind_error(&key, l.address, stream, &e, preflight::Mode::Start)),
            }
        }
        Ok(steps)
    }

    /// Puts a prepared set of listeners in service; what `steps` does not
    /// keep is stopped (a UDP listener with allocations retires instead).
    fn commit(&mut self, shard: &Rc<RefCell<Shard>>, steps: Vec<Step>, acceptor: Option<&TlsAcceptor>) {
        let mut old: Vec<Option<Active>> = std::mem::take(&mut self.active).into_iter().map(Some).collect();
        for step in steps {
            let active = match step {
                Step::Keep(i, l) => {
                    let Some(mut a) = old[i].take() else { continue };
                    if a.l != l {
                        if let Socket::Stream(s) = &a.socket {
                            if let Some(t) = a.task.take() {
                                t.abort();
                            }
                            a.task = Some(spawn_accept(shard, s.clone(), &l, acceptor));
                            tracing::info!(listener = %name(&l), proxy_protocol = l.proxy_protocol, "listener changed");
                        }
                        a.l = l;
                    }
                    a
                }
                Step::Revive(conn, l) => {
                    shard.borrow_mut().revive_udp(conn);
                    tracing::info!(listener = %name(&l), "listener serving again");
                    Active { l, socket: Socket::Udp(conn), task: None }
                }
                Step::Bind(l, NewSocket::Udp(s)) => {
                    let conn = Shard::add_udp(shard, s);
                    tracing::info!(listener = %name(&l), "listener started");
                    Active { l, socket: Socket::Udp(conn), task: None }
                }
                Step::Bind(l, NewSocket::Stream(s)) => {
                    let s = Rc::new(s);
                    let task = spawn_accept(shard, s.clone(), &l, acceptor);
                    tracing::info!(listener = %name(&l), "listener started");
                    Active { l, socket: Socket::Stream(s), task: Some(task) }
                }
            };
            self.active.push(active);
        }
        for a in old.into_iter().flatten() {
            if let Socket::Udp(conn) = a.socket {
                shard.borrow_mut().retire_udp(conn);
            }
            tracing::info!(listener = %name(&a.l), "listener removed");
        }
        shard.borrow_mut().listener_names = self.active.iter().map(|a| name(&a.l)).collect();
    }
}

fn spawn_accept(shard: &Rc<RefCell<Shard>>, s: Rc<TcpListener>, l: &Listener, acceptor: Option<&TlsAcceptor>) -> JoinHandle<()> {
    let tls = if l.transport == Transport::Tls { acceptor.cloned() } else { None };
    tokio::task::spawn_local(accept_loop(Rc::downgrade(shard), s, l.clone(), tls))
}

fn log_secrets(cfg: &Config) {
    match &cfg.secret_source {
        SecretSource::Generated(p) => tracing::info!(file = %p.display(), "using the shared secret in this file (generated if it was missing)"),
        SecretSource::File(p) => tracing::info!(file = %p.display(), secrets = cfg.secrets.len(), "shared secrets loaded"),
        SecretSource::Inline => tracing::info!(secrets = cfg.secrets.len(), "shared secrets from the config"),
        SecretSource::None => tracing::info!("no shared secret: static users only"),
    }
}

/// Runs the relay until SIGINT or SIGTERM (then drains). Must be called
/// inside a `LocalSet`. A configuration the host cannot serve (a busy port,
/// an address not on the host, a certificate that does not load) ends it
/// with a [`ConfigError`] naming the key.
pub async fn run(cfg: Config, reload: Reload) -> anyhow::Result<()> {
    log_secrets(&cfg);
    let certs = match &cfg.tls {
        Some(t) => Some(tls::CertStore::load(&t.cert, &t.key).map_err(|e| ConfigError { key: "tls".into(), msg: format!("{e:#}") })?),
        None => None,
    };
    let acceptor = match &certs {
        Some(c) => Some(TlsAcceptor::from(c.server_config()?)),
        None => None,
    };
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let shard = Shard::start(&cfg, reload_tx);
    let mut listeners = Listeners::default();
    let steps = listeners.prepare(&shard.borrow(), &cfg.listeners)?;
    listeners.commit(&shard, steps, acceptor.as_ref());
    let metrics = match cfg.metrics_listen {
        Some(addr) => {
            let l = bind_tcp(addr).map_err(|e| preflight::bind_error("metrics.listen", addr, true, &e, preflight::Mode::Start))?;
            Some((addr, tokio::task::spawn_local(http::serve(Rc::downgrade(&shard), l))))
        }
        None => None,
    };
    // Certificates renewed on disk (certbot, Caddy) are picked up without a restart.
    let mut cert_poll = tokio::time::interval(Duration::from_secs(5));
    tracing::info!(
        listeners = ?shard.borrow().listener_names,
        metrics = ?cfg.metrics_listen,
        relay_v4 = ?cfg.core.relay_v4.map(|r| (r.local, r.external)),
        relay_v6 = ?cfg.core.relay_v6.map(|r| (r.local, r.external)),
        ports = %format!("{}-{}", cfg.ports.0, cfg.ports.1),
        realm = %cfg.realm,
        allocation_bandwidth = %Bandwidth(cfg.core.allocation_bytes_per_second * 8),
        total_bandwidth = %Bandwidth(cfg.core.total_bytes_per_second * 8),
        "turnd ready"
    );
    systemd::notify("READY=1");
    systemd::spawn_watchdog();
    let mut running = Running { cfg, certs, acceptor, listeners, metrics };

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = cert_poll.tick() => {
                if let Some(c) = &running.certs {
                    match c.reload_if_changed() {
                        Some(Ok(())) => tracing::info!("TLS certificate reloaded (files changed)"),
                        Some(Err(e)) => tracing::warn!("TLS certificate not reloaded, keeping the old one: {e:#}"),
                        None => {}
                    }
                }
            }
            _ = hup.recv() => {
                let _ = running.reload(&reload, &shard);
            }
            Some(reply) = reload_rx.recv() => {
                let reply: tokio::sync::oneshot::Sender<Result<String, String>> = reply;
                let _ = reply.send(running.reload(&reload, &shard));
            }
        }
    }
    drain(&shard, Duration::from_secs(running.cfg.drain_timeout as u64), &mut term, &mut int).await;
    Ok(())
}

/// What a reload may replace besides the core's settings.
struct Running {
    cfg: Config,
    certs: Option<Arc<tls::CertStore>>,
    acceptor: Option<TlsAcceptor>,
    listeners: Listeners,
    metrics: Option<(SocketAddr, JoinHandle<()>)>,
}

/// How a reload changes TLS, decided before anything changes.
enum TlsStep {
    Unchanged,
    /// Same files: load them again (renewed in place). A broken one keeps the
    /// old certificate serving but does not hold up the rest of the reload.
    Reread,
    /// Other files, loaded.
    Other(std::path::PathBuf, std::path::PathBuf, rustls::sign::CertifiedKey),
    /// TLS configured for the first time.
    New(Arc<tls::CertStore>, TlsAcceptor),
}

impl Running {
    /// Re-reads the configuration and applies it whole, or refuses it whole.
    /// Returns a summary or the reason for refusing.
    fn reload(&mut self, reload: &Reload, shard: &Rc<RefCell<Shard>>) -> Result<String, String> {
        systemd::notify("RELOADING=1");
        let r = self.apply(reload, shard);
        if let Err(e) = &r {
            tracing::error!("reload refused, the running configuration stays: {e}");
        }
        systemd::notify("READY=1");
        r
    }

    fn apply(&mut self, reload: &Reload, shard: &Rc<RefCell<Shard>>) -> Result<String, String> {
        // Everything that can fail, with nothing running touched.
        let new = crate::config::load_for_reload(reload.path.as_deref(), &reload.overrides).map_err(|e| format!("{e:#}"))?;
        let tls_step = match (&new.tls, &self.certs) {
            (Some(t), Some(c)) if c.same_paths(&t.cert, &t.key) => TlsStep::Reread,
            (Some(t), Some(c)) => TlsStep::Other(t.cert.clone(), t.key.clone(), c.load_other(&t.cert, &t.key).map_err(|e| format!("tls: {e:#}"))?),
            (Some(t), None) => {
                let c = tls::CertStore::load(&t.cert, &t.key).map_err(|e| format!("tls: {e:#}"))?;
                let sc = c.server_config().map_err(|e| format!("tls: {e:#}"))?;
                TlsStep::New(c, TlsAcceptor::from(sc))
            }
            (None, _) => TlsStep::Unchanged,
        };
        for (key, now, was) in [("relay.ip", new.core.relay_v4, self.cfg.core.relay_v4), ("relay.ipv6", new.core.relay_v6, self.cfg.core.relay_v6)] {
            if let Some(r) = now.filter(|r| Some(r.local) != was.map(|w| w.local)) {
                preflight::check_relay_ip(key, r.local).map_err(|e| e.to_string())?;
            }
        }
        let steps = self.listeners.prepare(&shard.borrow(), &new.listeners).map_err(|e| e.to_string())?;
        let metrics_changed = new.metrics_listen != self.metrics.as_ref().map(|m| m.0);
        let metrics_socket = match new.metrics_listen {
            Some(addr) if metrics_changed => Some(
                bind_tcp(addr).map_err(|e| preflight::bind_error("metrics.listen", addr, true, &e, preflight::Mode::Start).to_string())?,
            ),
            _ => None,
        };

        // Nothing below fails: switch.
        match tls_step {
            TlsStep::Unchanged => {}
            TlsStep::Reread => match self.certs.as_ref().map(|c| c.reload()) {
                Some(Err(e)) => tracing::warn!("TLS certificate not reloaded, keeping the old one: {e:#}"),
                _ => tracing::info!("TLS certificate reloaded"),
            },
            TlsStep::Other(cert, key, ck) => {
                if let Some(c) = &self.certs {
                    c.install(&cert, &key, ck);
                }
                tracing::info!(cert = %cert.display(), "TLS certificate switched");
            }
            TlsStep::New(c, a) => {
                self.certs = Some(c);
                self.acceptor = Some(a);
            }
        }
        {
            let mut sh = shard.borrow_mut();
            sh.apply(&new);
            sh.admin_token = new.admin_token.clone();
        }
        self.listeners.commit(shard, steps, self.acceptor.as_ref());
        if metrics_changed {
            if let Some((_, t)) = self.metrics.take() {
                t.abort();
            }
            if let (Some(addr), Some(l)) = (new.metrics_listen, metrics_socket) {
                self.metrics = Some((addr, tokio::task::spawn_local(http::serve(Rc::downgrade(shard), l))));
            }
        }
        (reload.set_log)(&new.log_level, new.log_json);
        log_secrets(&new);
        for n in &new.notes {
            tracing::warn!("{n}");
        }
        let n = shard.borrow().server.allocation_count();
        tracing::info!(allocations = n, "configuration reloaded");
        self.cfg = new;
        Ok(format!("configuration reloaded; {n} allocations kept"))
    }
}

/// Graceful shutdown: refuse new allocations, let existing ones run until
/// they end or `timeout` passes. A second SIGTERM or SIGINT ends it at once.
async fn drain(
    shard: &Rc<RefCell<Shard>>,
    timeout: Duration,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) {
    systemd::notify("STOPPING=1");
    {
        let mut sh = shard.borrow_mut();
        sh.draining = true;
        sh.server.set_accepting(false);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    tracing::info!(allocations = shard.borrow().server.allocation_count(), timeout_s = timeout.as_secs(), "draining: no new allocations; send SIGTERM again to stop now");
    let mut check = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("second signal: stopping now"); break; }
            _ = int.recv() => { tracing::info!("second signal: stopping now"); break; }
            _ = tokio::time::sleep_until(deadline) => { tracing::info!("drain timeout reached"); break; }
            _ = check.tick() => {
                if shard.borrow().server.allocation_count() == 0 {
                    tracing::info!("all allocations ended");
                    break;
                }
            }
        }
    }
    tracing::info!(allocations = shard.borrow().server.allocation_count(), "shutting down");
}
