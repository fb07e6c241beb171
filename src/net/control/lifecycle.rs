//! The process around the shards: start, reload as a transaction, drain and
//! signals, and the listeners a reload adds, keeps and removes.
//!
//! A reload first does everything that can fail (read and validate the file,
//! load certificates, check relay addresses, bind every new socket of every
//! shard) without touching what runs; only when all of it succeeded does it
//! switch, on every shard. A
//! refused reload leaves the running configuration and every socket as they
//! were, and says why. A UDP listener that a reload removes keeps serving the
//! allocations made through it until they end, then closes; new clients get
//! no answer on it.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::certs::{Certs, TlsStep};
use super::handover::{self, wire::Kind, Incoming, Received, UpgradeError, Upgraded};
use super::reload::ReloadError;
use super::shards::Control;
use super::{http, preflight, systemd};
use crate::net::shard::{Command, Step as ShardStep};
use crate::net::shared::{self, Shared};
use crate::net::udp::{bind_tcp, bind_tcp_group, bind_udp_group};
use crate::config::{Bandwidth, Config, ConfigError, Listener, Overrides, SecretSource};
use crate::turn::{PeerPolicy, Transport};

/// Sets the log level (or filter) and whether lines are JSON.
pub type SetLog = Box<dyn Fn(&str, bool)>;

/// Where a reload reads the configuration from, and how it changes the log level.
pub struct Reload {
    pub path: Option<std::path::PathBuf>,
    pub overrides: Overrides,
    pub set_log: SetLog,
}

/// A listener's group of sockets (one per shard), by the id the shards know
/// it by; kept across reloads while its address stays.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    Udp(u32),
    Stream(u32),
}

#[derive(Clone)]
struct Active {
    l: Listener,
    group: Group,
}

/// What a reload does with one wanted listener, decided before anything changes.
enum Step {
    /// Already running at this address: `active[i]`, possibly with new flags.
    Keep(usize, Listener),
    /// A removed UDP listener still serving its allocations: serve again.
    Revive(u32, Listener),
    Bind(Listener, NewGroup),
}

/// Sockets bound for a new listener, one per shard.
enum NewGroup {
    Udp(Vec<std::net::UdpSocket>),
    Stream(Vec<std::net::TcpListener>),
}

fn name(l: &Listener) -> String {
    format!("{} {}", l.transport.label(), l.address)
}

/// Same socket: the same address, both stream or both datagram (a TCP
/// listener can become TLS, or change its PROXY setting, on one socket).
fn same_socket(a: &Listener, b: &Listener) -> bool {
    a.address == b.address && a.transport.is_stream() == b.transport.is_stream()
}

#[derive(Clone)]
struct Listeners {
    shards: usize,
    active: Vec<Active>,
    /// UDP listeners a reload removed, serving the allocations made through
    /// them until those end; their groups close whole, never shrink.
    retiring: Vec<(u32, Listener)>,
    next_id: u32,
}

impl Listeners {
    fn new(shards: usize) -> Self {
        Listeners { shards, active: Vec::new(), retiring: Vec::new(), next_id: 0 }
    }

    /// Binds what `wanted` adds, a socket per shard (or takes the group an
    /// upgrade handed over for that address). Nothing running changes; on
    /// error the sockets bound so far are closed again.
    fn prepare(&self, wanted: &[Listener], mut inherited: Option<&mut Received>) -> Result<Vec<Step>, ConfigError> {
        let mut steps = Vec::new();
        for (i, l) in wanted.iter().enumerate() {
            if let Some(a) = self.active.iter().position(|a| same_socket(&a.l, l)) {
                steps.push(Step::Keep(a, l.clone()));
                continue;
            }
            if l.transport == Transport::Udp
                && let Some((conn, _)) = self.retiring.iter().find(|(_, r)| r.address == l.address) {
                    steps.push(Step::Revive(*conn, l.clone()));
                    continue;
                }
            let key = format!("listen[{i}].address");
            let stream = l.transport.is_stream();
            let handed = inherited.as_deref_mut().and_then(|r| {
                if stream { r.stream_group(l.address, self.shards).map(NewGroup::Stream) } else { r.udp_group(l.address, self.shards).map(NewGroup::Udp) }
            });
            let group = match handed {
                Some(g) => Ok(g),
                None if stream => bind_tcp_group(l.address, self.shards).map(NewGroup::Stream),
                None => bind_udp_group(l.address, self.shards).map(NewGroup::Udp),
            };
            match group {
                Ok(g) => steps.push(Step::Bind(l.clone(), g)),
                Err(e) => return Err(preflight::bind_error(&key, l.address, stream, &e, preflight::Mode::Start)),
            }
        }
        Ok(steps)
    }

    /// Puts a prepared set of listeners in service: returns what each shard
    /// is to do, and what to log once every shard has done it. What `steps`
    /// does not keep is stopped (a UDP listener retires instead, until its
    /// allocations end: see [`Listeners::close_finished`]).
    fn commit(&mut self, steps: Vec<Step>) -> (Vec<Vec<ShardStep>>, Vec<String>) {
        let mut per: Vec<Vec<ShardStep>> = (0..self.shards).map(|_| Vec::new()).collect();
        let mut log = Vec::new();
        let mut all = |make: &dyn Fn() -> ShardStep| per.iter_mut().for_each(|p| p.push(make()));
        let mut old: Vec<Option<Active>> = std::mem::take(&mut self.active).into_iter().map(Some).collect();
        let mut adds: Vec<(u32, NewGroup, Listener)> = Vec::new();
        for step in steps {
            let active = match step {
                Step::Keep(i, l) => {
                    let Some(mut a) = old[i].take() else { continue };
                    if a.l != l {
                        if let Group::Stream(id) = a.group {
                            all(&|| ShardStep::ChangeStream(id, l.clone()));
                            log.push(format!("listener changed: {} (proxy_protocol {})", name(&l), l.proxy_protocol));
                        }
                        a.l = l;
                    }
                    a
                }
                Step::Revive(conn, l) => {
                    self.retiring.retain(|(c, _)| *c != conn);
                    all(&|| ShardStep::ReviveUdp(conn));
                    log.push(format!("listener serving again: {}", name(&l)));
                    Active { l, group: Group::Udp(conn) }
                }
                Step::Bind(l, g) => {
                    let id = self.next_id;
                    self.next_id += 1;
                    log.push(format!("listener started: {} (on {} shards)", name(&l), self.shards));
                    let group = match g {
                        NewGroup::Udp(_) => Group::Udp(id),
                        NewGroup::Stream(_) => Group::Stream(id),
                    };
                    adds.push((id, g, l.clone()));
                    Active { l, group }
                }
            };
            self.active.push(active);
        }
        for a in old.into_iter().flatten() {
            match a.group {
                Group::Udp(conn) => {
                    all(&|| ShardStep::RetireUdp(conn));
                    log.push(format!("listener removed: {} (it serves the allocations made through it until they end)", name(&a.l)));
                    self.retiring.push((conn, a.l));
                }
                Group::Stream(id) => {
                    all(&|| ShardStep::RemoveStream(id));
                    log.push(format!("listener removed: {}", name(&a.l)));
                }
            }
        }
        for (id, g, l) in adds {
            match g {
                NewGroup::Udp(socks) => {
                    for (p, s) in per.iter_mut().zip(socks) {
                        p.push(ShardStep::AddUdp(id, s));
                    }
                }
                NewGroup::Stream(socks) => {
                    for (p, s) in per.iter_mut().zip(socks) {
                        p.push(ShardStep::AddStream(id, s, l.clone()));
                    }
                }
            }
        }
        (per, log)
    }

    /// The groups an upgrade hands over: every active listener's sockets
    /// (UDP ones also carry their allocations; retiring ones stay here).
    fn udp_groups(&self) -> std::sync::Arc<[u32]> {
        self.active.iter().filter_map(|a| if let Group::Udp(c) = a.group { Some(c) } else { None }).collect()
    }

    /// The configured address of the listener of group `id`, and its kind.
    fn address_of(&self, group: Group) -> Option<SocketAddr> {
        self.active.iter().find(|a| a.group == group).map(|a| a.l.address)
    }

    fn names(&self) -> Vec<String> {
        self.active.iter().map(|a| name(&a.l)).collect()
    }

    /// Closes the groups of retired UDP listeners no allocation uses on any
    /// shard any more.
    async fn close_finished(&mut self, ctl: &Control) {
        let mut i = 0;
        while i < self.retiring.len() {
            let (conn, _) = self.retiring[i];
            if ctl.udp_allocations(conn).await == Some(0) {
                let (_, l) = self.retiring.remove(i);
                ctl.tell_all(|| Command::CloseUdp(conn));
                tracing::info!(listener = %name(&l), "UDP listener closed");
            } else {
                i += 1;
            }
        }
    }
}

fn log_secrets(cfg: &Config) {
    match &cfg.secret_source {
        SecretSource::Generated(p) => tracing::info!(file = %p.display(), "using the shared secret in this file (generated if it was missing)"),
        SecretSource::File(p) => tracing::info!(file = %p.display(), secrets = cfg.secrets.len(), "shared secrets loaded"),
        SecretSource::Inline => tracing::info!(secrets = cfg.secrets.len(), "shared secrets from the config"),
        SecretSource::None => tracing::info!("no shared secret: static users only"),
    }
}

/// The configured peer policy, with the port rule extended to every address
/// of this host (read at start and on reload).
fn peer_policy(cfg: &Config) -> PeerPolicy {
    cfg.peer_policy().with_host_ips(host_addresses())
}

/// The host's interface addresses; empty if they cannot be read.
fn host_addresses() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(list) => list.into_iter().map(|i| i.ip()).collect(),
        Err(e) => {
            tracing::warn!("cannot list the host's addresses: {e}");
            Vec::new()
        }
    }
}

fn port_range(cfg: &Config) -> usize {
    (cfg.ports.1 - cfg.ports.0) as usize + 1
}

/// Runs the relay until SIGINT or SIGTERM (then drains). Must be called
/// inside a `LocalSet`. A configuration the host cannot serve (a busy port,
/// an address not on the host, a certificate that does not load) ends it
/// with a [`ConfigError`] naming the key.
///
/// With `incoming` (this process was started by a running turnd's upgrade),
/// it first receives that process's sockets and UDP allocations, and serves
/// them from the first packet after saying so.
pub async fn run(cfg: Config, reload: Reload, incoming: Option<Rc<Incoming>>) -> anyhow::Result<()> {
    log_secrets(&cfg);
    let mut received = match &incoming {
        Some(i) => Some(i.receive(cfg.threads)?),
        None => None,
    };
    let certs = cfg.tls.as_ref().map(|source| Certs::start(source, None)).transpose()?;
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let (upgrade_tx, mut upgrade_rx) = tokio::sync::mpsc::unbounded_channel();
    let policy = peer_policy(&cfg);
    let shared = Shared::new(shared::fd_budget(), port_range(&cfg));
    #[cfg(feature = "xdp")]
    start_xdp(&cfg, &shared, incoming.is_some());
    let mut listeners = Listeners::new(cfg.threads);
    let steps = listeners.prepare(&cfg.listeners, received.as_mut())?;
    // Bound before any shard serves: once a client gets an answer, /metrics,
    // /readyz and the admin API answer too.
    let metrics_socket = match cfg.metrics_listen {
        Some(addr) => Some((addr, single(received.as_mut(), Kind::Metrics, addr, "metrics.listen")?)),
        None => None,
    };
    let check_socket = match cfg.check.as_ref().and_then(|c| c.http_listen) {
        Some(addr) => Some((addr, single(received.as_mut(), Kind::CheckHttp, addr, "check.http_listen")?)),
        None => None,
    };
    let nonce_key = received.as_ref().map(|r| r.nonce_key);
    let ctl = Rc::new(Control::start(&cfg, &policy, shared, reload_tx, upgrade_tx, nonce_key)?);
    *ctl.certs.borrow_mut() = certs;
    let metrics = metrics_socket.map(|(addr, (l, fd))| Served { addr, fd, task: tokio::task::spawn_local(http::serve(Rc::downgrade(&ctl), l)) });
    let (mut per_shard, log) = listeners.commit(steps);
    // Handed-over allocations are taken up with the listeners, before
    // either reads a packet.
    if let Some(r) = received.as_mut() {
        for (steps, a) in per_shard.iter_mut().zip(r.adoptions(cfg.threads)) {
            steps.push(ShardStep::Adopt(a));
        }
    }
    // A relay drained by `turnctl drain` stays so: before any listener serves.
    if received.as_ref().is_some_and(|r| r.draining) {
        ctl.drain_by_operator();
    }
    let acceptor = ctl.certs.borrow().as_ref().map(|c| c.acceptor());
    let site = Some(check_site(&ctl, &cfg));
    *ctl.check.borrow_mut() = site.clone();
    ctl.apply(Arc::new(cfg.clone()), &policy, acceptor.as_ref(), site, per_shard).await?;
    let check_http = check_socket.map(|(addr, (l, fd))| Served { addr, fd, task: tokio::task::spawn_local(serve_check_http(Rc::downgrade(&ctl), l)) });
    log.iter().for_each(|l| tracing::info!("{l}"));
    if let (Some(i), Some(r)) = (&incoming, &received) {
        let n = ctl.shared.allocations();
        i.serving(n)?;
        tracing::info!(from_pid = r.old_pid, allocations = n, "took over from the previous process: serving its listeners and UDP allocations");
    }
    drop(received);
    *ctl.listener_names.borrow_mut() = listeners.names();
    // Certificates renewed on disk (certbot, Caddy) are picked up without a restart.
    let mut cert_poll = tokio::time::interval(Duration::from_secs(5));
    // Retired UDP listeners close once their allocations have ended.
    let mut retired_poll = tokio::time::interval(Duration::from_secs(1));
    tracing::info!(
        listeners = ?listeners.names(),
        threads = cfg.threads,
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
    let watchdog = systemd::watchdog_period().map(|period| tokio::task::spawn_local(watchdog(Rc::downgrade(&ctl), period)));
    // The binary this process runs, by the path it was started from: an
    // upgrade starts what is there then (a package upgrade replaced it).
    let exe = std::env::current_exe().ok();
    let mut running = Running { cfg, listeners, metrics, check_http, exe, watchdog };

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut handed_over = None;
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = usr2.recv() => {
                if let Ok(u) = running.upgrade(None, &ctl).await {
                    handed_over = Some(u.pid);
                    break;
                }
            }
            Some((binary, reply)) = upgrade_rx.recv() => {
                let (binary, reply): (Option<std::path::PathBuf>, tokio::sync::oneshot::Sender<Result<Upgraded, UpgradeError>>) = (binary, reply);
                match running.upgrade(binary, &ctl).await {
                    Ok(u) => {
                        handed_over = Some(u.pid);
                        let _ = reply.send(Ok(u));
                        break;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            _ = cert_poll.tick() => {
                if let Some(c) = ctl.certs.borrow().as_ref() {
                    match c.store.reload_if_changed() {
                        Some(Ok(())) => tracing::info!("TLS certificate reloaded (files changed)"),
                        Some(Err(e)) => tracing::warn!("TLS certificate not reloaded, keeping the old one: {e:#}"),
                        None => {}
                    }
                }
            }
            _ = retired_poll.tick() => running.listeners.close_finished(&ctl).await,
            _ = hup.recv() => {
                let _ = running.reload(&reload, &ctl).await;
            }
            Some(reply) = reload_rx.recv() => {
                let reply: tokio::sync::oneshot::Sender<Result<String, ReloadError>> = reply;
                let _ = reply.send(running.reload(&reload, &ctl).await);
            }
        }
    }
    let timeout = Duration::from_secs(running.cfg.drain_timeout as u64);
    match handed_over {
        Some(pid) => finish_connections(&ctl, pid, timeout, &mut term, &mut int).await,
        None => drain(&ctl, timeout, &mut term, &mut int).await,
    }
    Ok(())
}

/// A TCP listener of the process's own (metrics, check page): the task
/// serving it, and a second descriptor of it for an upgrade.
struct Served {
    addr: SocketAddr,
    fd: std::os::fd::OwnedFd,
    task: JoinHandle<()>,
}

/// The metrics or check-page listener at `addr`: handed over by an upgrade,
/// or bound; with a second descriptor for the next upgrade.
fn single(received: Option<&mut Received>, kind: Kind, addr: SocketAddr, key: &str) -> Result<(tokio::net::TcpListener, std::os::fd::OwnedFd), ConfigError> {
    use std::os::fd::AsFd;
    let bind_error = |e: std::io::Error| preflight::bind_error(key, addr, true, &e, preflight::Mode::Start);
    let l = match received.and_then(|r| r.single(kind, addr)) {
        Some(l) => l,
        None => bind_tcp(addr).map_err(bind_error)?,
    };
    let fd = l.as_fd().try_clone_to_owned().map_err(bind_error)?;
    Ok((l, fd))
}

/// The site TLS listeners serve browsers: readiness, and the check page when `[check]` is on.
fn check_site(ctl: &Control, cfg: &Config) -> Arc<crate::check::Site> {
    Arc::new(crate::check::Site::new(ctl.check_key, cfg.check.clone(), crate::check::offers(&cfg.listeners), ctl.check_counts.clone()))
}

/// The check page on `check.http_listen` (plain HTTP), until the process ends.
async fn serve_check_http(ctl: std::rc::Weak<Control>, l: tokio::net::TcpListener) {
    loop {
        let (tcp, client) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "check.http_listen: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(c) = ctl.upgrade() else { return };
        let Some(site) = c.check.borrow().clone() else { continue };
        let weak = ctl.clone();
        let not_ready = move || weak.upgrade().and_then(|c| c.not_ready());
        tokio::task::spawn_local(crate::net::stream::https::serve(tcp, client, site, not_ready, Duration::from_secs(10)));
    }
}

/// Pings the systemd watchdog at `period` while every shard's event loop
/// answers within it, so a stuck shard stops the pings and systemd
/// restarts the service.
async fn watchdog(ctl: std::rc::Weak<Control>, period: Duration) {
    let mut iv = tokio::time::interval(period);
    loop {
        iv.tick().await;
        let Some(c) = ctl.upgrade() else { return };
        if c.alive(period).await {
            systemd::notify("WATCHDOG=1");
        }
    }
}

/// What a reload may replace besides the core's settings.
struct Running {
    cfg: Config,
    listeners: Listeners,
    metrics: Option<Served>,
    check_http: Option<Served>,
    /// The path this binary was started from (what an upgrade starts by default).
    exe: Option<std::path::PathBuf>,
    watchdog: Option<JoinHandle<()>>,
}

impl Running {
    /// Re-reads the configuration and applies it whole to every shard, or
    /// refuses it whole. Returns a summary or the reason for refusing.
    async fn reload(&mut self, reload: &Reload, ctl: &Rc<Control>) -> Result<String, ReloadError> {
        systemd::notify("RELOADING=1");
        let r = self.apply(reload, ctl).await;
        if let Err(e) = &r {
            tracing::error!(step = e.step(), shard = e.shard(), "reload refused, the running configuration stays: {e}");
        }
        systemd::notify("READY=1");
        r
    }

    async fn apply(&mut self, reload: &Reload, ctl: &Rc<Control>) -> Result<String, ReloadError> {
        // Everything that can fail, with nothing running touched.
        let new = crate::config::load_for_reload(reload.path.as_deref(), &reload.overrides).map_err(|e| ReloadError::File(format!("{e:#}")))?;
        if new.threads != self.cfg.threads {
            return Err(ReloadError::Threads { running: self.cfg.threads, file: new.threads });
        }
        let tls_step = TlsStep::plan(new.tls.as_ref(), ctl.certs.borrow().as_ref())?;
        if new.check.as_ref().and_then(|c| c.http_listen) != self.cfg.check.as_ref().and_then(|c| c.http_listen) {
            tracing::warn!("check.http_listen: a change applies at the next restart");
        }
        for (key, now, was) in [("relay.ip", new.core.relay_v4, self.cfg.core.relay_v4), ("relay.ipv6", new.core.relay_v6, self.cfg.core.relay_v6)] {
            if let Some(r) = now.filter(|r| Some(r.local) != was.map(|w| w.local)) {
                preflight::check_relay_ip(key, r.local)?;
            }
        }
        let steps = self.listeners.prepare(&new.listeners, None)?;
        let metrics_changed = new.metrics_listen != self.metrics.as_ref().map(|m| m.addr);
        let metrics_socket = match new.metrics_listen {
            Some(addr) if metrics_changed => Some(single(None, Kind::Metrics, addr, "metrics.listen")?),
            _ => None,
        };

        // Every shard prepares, then all switch, or none does (and the
        // listener bookkeeping goes back to what runs).
        let before = self.listeners.clone();
        let (per_shard, log) = self.listeners.commit(steps);
        let acceptor = tls_step.acceptor(ctl.certs.borrow().as_ref());
        let site = Some(check_site(ctl, &new));
        if let Err(e) = ctl.apply(Arc::new(new.clone()), &peer_policy(&new), acceptor.as_ref(), site.clone(), per_shard).await {
            self.listeners = before;
            return Err(e);
        }

        // Nothing below fails.
        log.iter().for_each(|l| tracing::info!("{l}"));
        tls_step.commit(&mut ctl.certs.borrow_mut());
        *ctl.check.borrow_mut() = site;
        ctl.shared.set_port_range(port_range(&new));
        *ctl.admin_token.borrow_mut() = new.admin_token.clone();
        *ctl.listener_names.borrow_mut() = self.listeners.names();
        if metrics_changed {
            if let Some(m) = self.metrics.take() {
                m.task.abort();
            }
            if let (Some(addr), Some((l, fd))) = (new.metrics_listen, metrics_socket) {
                self.metrics = Some(Served { addr, fd, task: tokio::task::spawn_local(http::serve(Rc::downgrade(ctl), l)) });
            }
        }
        (reload.set_log)(&new.log_level, new.log_json);
        log_secrets(&new);
        for n in &new.notes {
            tracing::warn!("{n}");
        }
        let n = ctl.shared.allocations();
        tracing::info!(allocations = n, "configuration reloaded");
        self.cfg = new;
        Ok(format!("configuration reloaded; {n} allocations kept"))
    }
}

impl Running {
    /// Hands the relay to a new process running `binary` (by default the
    /// binary at the path this one was started from). On success this
    /// process serves only its TCP/TLS connections (and UDP allocations of
    /// listeners a reload removed) from now on; on failure it serves on
    /// as before.
    async fn upgrade(&mut self, binary: Option<std::path::PathBuf>, ctl: &Rc<Control>) -> Result<Upgraded, UpgradeError> {
        let started = std::time::Instant::now();
        let binary = binary.or_else(|| self.exe.clone()).ok_or_else(|| UpgradeError::Local("cannot tell the path of this binary: name the new one".into()))?;
        tracing::info!(binary = %binary.display(), "upgrade: starting the new process");
        let r = self.hand_over(&binary, ctl, started).await;
        match &r {
            Ok(u) => tracing::info!(
                new_pid = u.pid, allocations = u.allocations, listeners = u.listeners, elapsed_ms = u.elapsed.as_millis() as u64,
                "upgrade: the new process serves the listeners and UDP allocations"
            ),
            Err(e) => tracing::error!(binary = %binary.display(), "upgrade failed, this process serves on: {e}"),
        }
        r
    }

    async fn hand_over(&mut self, binary: &std::path::Path, ctl: &Rc<Control>, started: std::time::Instant) -> Result<Upgraded, UpgradeError> {
        use handover::wire::Msg;
        use std::os::fd::AsFd;
        let joined = |e: tokio::task::JoinError| UpgradeError::Local(format!("the handover thread failed: {e}"));
        let offer = Msg::Offer {
            format: crate::turn::HANDOVER_FORMAT,
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            threads: self.cfg.threads,
            nonce_key: ctl.nonce_key.to_vec(),
            draining: ctl.shared.drain_state() == crate::net::shared::Drain::Draining,
        };
        let binary = binary.to_owned();
        let mut child = tokio::task::spawn_blocking(move || {
            let mut c = handover::parent::spawn(&binary, &offer)?;
            match c.accepted() {
                Ok(()) => Ok(c),
                Err(e) => {
                    c.abandon();
                    Err(e)
                }
            }
        })
        .await
        .map_err(joined)??;
        // From here on, what moves is not read here unless the handover fails.
        let exports = ctl.export(self.listeners.udp_groups()).await;
        let mut listeners = Vec::new();
        let mut allocations = Vec::new();
        let mut failure = None;
        for (i, e) in exports.into_iter().enumerate() {
            let e = match e {
                Some(Ok(e)) => e,
                Some(Err(err)) => {
                    failure = Some(format!("shard {i}: {err}"));
                    continue;
                }
                None => {
                    failure = Some(format!("shard {i} did not answer"));
                    continue;
                }
            };
            for (conn, fd) in e.udp {
                if let Some(addr) = self.listeners.address_of(Group::Udp(conn)) {
                    listeners.push((Kind::Udp, addr, e.index, fd));
                }
            }
            for (id, fd) in e.stream {
                if let Some(addr) = self.listeners.address_of(Group::Stream(id)) {
                    listeners.push((Kind::Stream, addr, e.index, fd));
                }
            }
            allocations.extend(e.allocations.into_iter().map(|(c, fds)| (e.index, e.mono_ns, c, fds)));
        }
        for (kind, served) in [(Kind::Metrics, &self.metrics), (Kind::CheckHttp, &self.check_http)] {
            if let Some(s) = served {
                match s.fd.as_fd().try_clone_to_owned() {
                    Ok(fd) => listeners.push((kind, s.addr, 0, fd)),
                    Err(e) => failure = Some(format!("{}: {e}", s.addr)),
                }
            }
        }
        if let Some(f) = failure {
            ctl.tell_all(|| Command::Resume);
            tokio::task::spawn_blocking(move || child.abandon());
            return Err(UpgradeError::Local(f));
        }
        let count = listeners.len();
        let (child, served) = tokio::task::spawn_blocking(move || {
            let r = child.hand_over(&listeners, allocations);
            (child, r)
        })
        .await
        .map_err(joined)?;
        let pid = child.pid();
        if let Err(e) = served {
            // Stopped before it serves anything read here again.
            tokio::task::spawn_blocking(move || child.abandon()).await.map_err(joined)?;
            ctl.tell_all(|| Command::Resume);
            return Err(e);
        }
        child.release();
        let moved = ctl.release().await;
        // The new process attaches its own fast path once this one's is gone.
        #[cfg(feature = "xdp")]
        if let Some(f) = ctl.shared.xdp.get() {
            f.detach();
        }
        // The new process answers metrics, the admin API and the check page
        // now, and runs the ACME client and the watchdog.
        for s in [self.metrics.take(), self.check_http.take()].into_iter().flatten() {
            s.task.abort();
        }
        if let Some(w) = self.watchdog.take() {
            w.abort();
        }
        if let Some(c) = ctl.certs.borrow_mut().as_mut() {
            c.acme = None;
        }
        // The new process is the service's main process from now on; the ping
        // keeps the watchdog fed until its first one.
        systemd::notify(&format!("MAINPID={pid}\nWATCHDOG=1"));
        Ok(Upgraded { pid, allocations: moved, listeners: count, elapsed: started.elapsed() })
    }
}

/// After an upgrade: serve the TCP/TLS connections (and what else stayed)
/// until they end, `timeout` passes or a signal says stop.
async fn finish_connections(
    ctl: &Control,
    new_pid: u32,
    timeout: Duration,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) {
    tracing::info!(new_pid, allocations = ctl.shared.allocations(), timeout_s = timeout.as_secs(), "handed over: serving this process's TCP/TLS connections until they end");
    // The first look comes after the admin API's answer to the upgrade left.
    let ended = || async { ctl.snapshot().await.connections.iter().sum::<u64>() == 0 && ctl.shared.allocations() == 0 };
    wait_until_ended(timeout, Duration::from_millis(250), term, int, ended, "every connection ended", "signal: stopping now").await;
    tracing::info!(allocations = ctl.shared.allocations(), "the previous process exits");
}

/// Graceful shutdown: refuse new allocations, let existing ones run until
/// they end or `timeout` passes. A second SIGTERM or SIGINT ends it at once.
async fn drain(
    ctl: &Control,
    timeout: Duration,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) {
    systemd::notify("STOPPING=1");
    ctl.drain();
    tracing::info!(allocations = ctl.shared.allocations(), timeout_s = timeout.as_secs(), "draining: no new allocations; send SIGTERM again to stop now");
    let ended = || async { ctl.shared.allocations() == 0 };
    wait_until_ended(timeout, Duration::ZERO, term, int, ended, "all allocations ended", "second signal: stopping now").await;
    tracing::info!(allocations = ctl.shared.allocations(), "shutting down");
}

/// Looks every 250 ms (the first time after `first_look`) whether `ended`
/// says so, until then, `timeout` or SIGTERM/SIGINT, whichever comes first;
/// logs which.
async fn wait_until_ended<F: std::future::Future<Output = bool>>(
    timeout: Duration,
    first_look: Duration,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
    ended: impl Fn() -> F,
    ended_log: &str,
    signal_log: &str,
) {
    let now = tokio::time::Instant::now();
    let deadline = now + timeout;
    let mut check = tokio::time::interval_at(now + first_look, Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("{signal_log}"); break; }
            _ = int.recv() => { tracing::info!("{signal_log}"); break; }
            _ = tokio::time::sleep_until(deadline) => { tracing::info!("drain timeout reached"); break; }
            _ = check.tick() => {
                if ended().await {
                    tracing::info!("{ended_log}");
                    break;
                }
            }
        }
    }
}

/// Loads and attaches the XDP fast path when `[xdp]` names interfaces; says
/// in the log why it is off (turnd relays on the sockets then, as without
/// it). Started by an upgrade, the previous process still holds the
/// interfaces: the program's maps are filled from the first channel on, and
/// it attaches as soon as that process lets go (within a few seconds), the
/// sockets relaying until then.
#[cfg(feature = "xdp")]
fn start_xdp(cfg: &Config, shared: &Shared, upgrading: bool) {
    use crate::net::xdp::{forwarding_off, FastPath, Mode};
    let Some(x) = &cfg.xdp else { return };
    let mode = if x.generic { Mode::Generic } else { Mode::Native };
    let fast = match FastPath::load(&x.interfaces, mode) {
        Ok(fast) => fast,
        Err(why) => {
            tracing::warn!(interfaces = ?x.interfaces, "XDP fast path off, relaying on the socket path: {why}");
            return;
        }
    };
    for i in &x.interfaces {
        for (key, what) in forwarding_off(i) {
            tracing::warn!(interface = %i, "XDP fast path: {key} {what} (under systemd, ProcSubset=all lets turnd read it), and the program's route lookup fails unless it is 1: packets of that family arriving on {i} then take the socket path");
        }
    }
    fast.set_total(cfg.core.total_bytes_per_second);
    let attached = || tracing::info!(interfaces = ?x.interfaces, ?mode, "XDP fast path attached: UDP clients' channels are relayed in the kernel");
    match fast.attach() {
        Ok(()) => attached(),
        Err(why) if upgrading => {
            tracing::info!(interfaces = ?x.interfaces, "XDP fast path: attaching once the previous process lets go of the interfaces ({why})");
            let (fast, interfaces) = (fast.clone(), x.interfaces.clone());
            std::thread::spawn(move || {
                // The previous process detaches right after this one says it serves.
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                loop {
                    std::thread::sleep(Duration::from_millis(20));
                    match fast.attach() {
                        Ok(()) => return tracing::info!(?interfaces, ?mode, "XDP fast path attached: UDP clients' channels are relayed in the kernel"),
                        Err(why) if std::time::Instant::now() >= deadline => {
                            fast.detach();
                            return tracing::warn!(?interfaces, "XDP fast path off, relaying on the socket path: {why}");
                        }
                        Err(_) => {}
                    }
                }
            });
        }
        Err(why) => {
            fast.detach();
            tracing::warn!(interfaces = ?x.interfaces, "XDP fast path off, relaying on the socket path: {why}");
            return;
        }
    }
    let _ = shared.xdp.set(fast);
}
