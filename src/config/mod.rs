//! The TOML configuration: parsing, defaults and validation.
//!
//! Every key is documented in `config/turnd.toml`. Validation names the key
//! and says what is wrong; unknown keys are errors, so typos do not pass.

mod bandwidth;
mod duration;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

pub use bandwidth::Bandwidth;
pub use duration::Seconds;

use crate::turn::RelayAddr;
use crate::turn::{Cidr, PeerPolicy, ServerConfig, Transport};

/// Deserializes a value written as a string or a bare number (`90`, "90s",
/// "50 Mbit/s", 0) through its `FromStr`, which says what is wrong.
fn text_or_number<'de, D, T>(d: D, expecting: &'static str) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    struct V<T>(&'static str, std::marker::PhantomData<T>);
    impl<T: std::str::FromStr<Err = String>> serde::de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(self.0)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
            v.to_string().parse().map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
            v.to_string().parse().map_err(E::custom)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            v.parse().map_err(E::custom)
        }
    }
    d.deserialize_any(V(expecting, std::marker::PhantomData))
}

/// An error that names the configuration key at fault.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {msg}")]
pub struct ConfigError {
    pub key: String,
    pub msg: String,
}

/// Longest realm accepted (see `validate`).
pub const MAX_REALM: usize = 32;
/// What one allocation may relay in each direction unless configured: far
/// above a video call (Jitsi sends at most a few Mbit/s per participant and
/// receives a few streams more), far below what a leaked credential could
/// otherwise push through the relay.
pub const DEFAULT_ALLOCATION_BANDWIDTH: Bandwidth = Bandwidth(50_000_000);
/// Longest SOFTWARE value: RFC 8489 asks for fewer than 128 characters.
pub const MAX_SOFTWARE: usize = 127;
/// The log levels `log.level` takes, alone or in `target=level` directives.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A level from the list, or a tracing filter whose every directive names a
/// level from it ("info,turnd=debug"). tracing itself would take "warning"
/// or "debug " as a filter for a target of that name: a filter that matches
/// nothing and silences every line, errors included.
fn check_log_level(s: &str) -> Result<(), String> {
    let hint = "use error, warn, info, debug or trace, or a filter such as \"info,turnd=debug\"";
    if s.is_empty() || s.chars().any(char::is_whitespace) {
        return Err(format!("`{s}` is not a log level: {hint} (no spaces)"));
    }
    for d in s.split(',') {
        let level = match d.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            _ => d,
        };
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!("`{level}` in `{s}` is not a log level: {hint}"));
        }
    }
    tracing_subscriber::EnvFilter::try_new(s).map(|_| ()).map_err(|e| format!("`{s}`: {e}"))
}

fn bad(key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), msg: msg.into() }
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub realm: Option<String>,
    pub software: Option<String>,
    pub threads: Option<NumberOrText>,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub listen: Vec<ListenSection>,
    #[serde(default)]
    pub relay: RelaySection,
    #[serde(default)]
    pub peers: PeersSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub log: LogSection,
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub admin: AdminSection,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub enabled: Option<bool>,
    pub token_file: Option<PathBuf>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub listen: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Server names (SNI) that TLS listeners answer as TURN when
    /// `passthrough` sends other names to a web server.
    #[serde(default)]
    pub turn_names: Vec<String>,
    #[serde(default)]
    pub passthrough: Option<PassthroughSection>,
}

/// `[tls.passthrough]`: TLS connections for other names go, untouched, to a
/// web server on another local port.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct PassthroughSection {
    pub backend: String,
    pub proxy_protocol: Option<String>,
    pub idle_timeout: Option<Seconds>,
}

/// Which header goes first to the passthrough backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    None,
    V1,
    V2,
}

/// SNI routing on TLS listeners, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Passthrough {
    /// Lower-case names answered as TURN; other names go to `backend`.
    pub turn_names: Vec<String>,
    pub backend: SocketAddr,
    pub proxy_header: ProxyHeader,
    /// A passed-through connection with no byte either way for this long closes.
    pub idle_timeout: u32,
}

/// Checks `[tls] turn_names` and `[tls.passthrough]`.
fn parse_passthrough(t: &TlsSection, listeners: &[Listener]) -> Result<Option<Passthrough>, ConfigError> {
    let Some(p) = &t.passthrough else {
        if !t.turn_names.is_empty() {
            return Err(bad("tls.turn_names", "has an effect only with [tls.passthrough] (a backend for the other names)"));
        }
        return Ok(None);
    };
    if t.turn_names.is_empty() {
        return Err(bad("tls.turn_names", "must list the TURN host name(s) when [tls.passthrough] is set, e.g. [\"turn.example.com\"]"));
    }
    let mut names = Vec::new();
    for n in &t.turn_names {
        let l = n.trim().trim_end_matches('.').to_ascii_lowercase();
        let ok = !l.is_empty() && l.len() <= 253 && l.split('.').all(|p| !p.is_empty() && p.len() <= 63 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        if !ok {
            return Err(bad("tls.turn_names", format!("`{n}` is not a host name")));
        }
        names.push(l);
    }
    let backend: SocketAddr = p
        .backend
        .trim()
        .parse()
        .map_err(|_| bad("tls.passthrough.backend", format!("`{}` is not IP:PORT (the web server, e.g. 127.0.0.1:8443)", p.backend)))?;
    // `[::ffff:127.0.0.1]:443` is 127.0.0.1:443: compare (and connect) in
    // canonical form, or a loop through turnd's own listener would pass.
    let backend = SocketAddr::new(backend.ip().to_canonical(), backend.port());
    if backend.port() == 0 || backend.ip().is_unspecified() {
        return Err(bad("tls.passthrough.backend", format!("`{backend}` needs a concrete address and port")));
    }
    let proxy_header = match p.proxy_protocol.as_deref().unwrap_or("none") {
        "none" => ProxyHeader::None,
        "v1" => ProxyHeader::V1,
        "v2" => ProxyHeader::V2,
        other => return Err(bad("tls.passthrough.proxy_protocol", format!("`{other}` is not none, v1 or v2"))),
    };
    let idle_timeout = secs("tls.passthrough.idle_timeout", p.idle_timeout, 600, 1)?;
    let tls_listeners: Vec<&Listener> = listeners.iter().filter(|l| l.transport == Transport::Tls).collect();
    if tls_listeners.is_empty() {
        return Err(bad("tls.passthrough", "needs a [[listen]] with transport = \"tls\""));
    }
    if tls_listeners.iter().any(|l| {
        let ip = l.address.ip().to_canonical();
        l.address.port() == backend.port() && (ip == backend.ip() || (ip.is_unspecified() && ip.is_ipv4() == backend.is_ipv4()))
    }) {
        return Err(bad("tls.passthrough.backend", format!("`{backend}` is turnd's own TLS listener (a loop)")));
    }
    Ok(Some(Passthrough { turn_names: names, backend, proxy_header, idle_timeout }))
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    #[serde(default)]
    pub secrets: Vec<String>,
    pub secret_file: Option<PathBuf>,
    pub nonce_lifetime: Option<Seconds>,
    #[serde(default)]
    pub static_users: Vec<StaticUser>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct StaticUser {
    pub username: String,
    pub password: String,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    pub transport: String,
    pub address: String,
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Load balancers allowed to send the PROXY header (CIDRs).
    #[serde(default)]
    pub proxy_protocol_from: Vec<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    pub ip: Option<String>,
    pub ipv6: Option<String>,
    pub external_ip: Option<String>,
    pub external_ipv6: Option<String>,
    pub ports: Option<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct PeersSection {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub default_lifetime: Option<Seconds>,
    pub max_lifetime: Option<Seconds>,
    pub permission_lifetime: Option<Seconds>,
    pub channel_lifetime: Option<Seconds>,
    pub user_quota: Option<u32>,
    pub total_quota: Option<u32>,
    pub max_permissions: Option<u32>,
    pub legacy_channel_numbers: Option<bool>,
    pub max_connections: Option<u32>,
    pub max_connections_per_ip: Option<u32>,
    pub tls_handshake_timeout: Option<Seconds>,
    pub idle_timeout: Option<Seconds>,
    pub drain_timeout: Option<Seconds>,
    pub unauth_rate: Option<u32>,
    pub allocation_bandwidth: Option<Bandwidth>,
    pub total_bandwidth: Option<Bandwidth>,
    pub ipv6_prefix_per_ip: Option<u8>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub level: Option<String>,
    pub format: Option<String>,
}

/// Command-line values that override the file.
#[derive(Default, Debug, Clone)]
pub struct Overrides {
    pub realm: Option<String>,
    pub listen: Vec<String>,
    pub relay_ip: Option<String>,
    pub external_ip: Option<String>,
    pub ports: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub allow_peers: Vec<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub threads: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub transport: Transport,
    pub address: SocketAddr,
    /// Expect a PROXY protocol v1/v2 header first (TCP/TLS only).
    pub proxy_protocol: bool,
    /// Sources allowed to send that header; connections from elsewhere are closed.
    pub proxy_protocol_from: Vec<Cidr>,
}

/// Where the shared secrets came from, for the start-up log.
#[derive(Clone, Debug)]
pub enum SecretSource {
    Inline,
    File(PathBuf),
    Generated(PathBuf),
    None,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub realm: String,
    /// Shards: threads that each relay for the clients the kernel hands them.
    pub threads: usize,
    /// The sans-IO core's settings: lifetimes, quotas, relay addresses,
    /// channel numbers, SOFTWARE, rate and bandwidth limits.
    pub core: ServerConfig,
    pub secrets: Vec<Vec<u8>>,
    pub secret_source: SecretSource,
    pub static_users: Vec<(String, String)>,
    pub nonce_lifetime: u64,
    pub listeners: Vec<Listener>,
    pub ports: (u16, u16),
    pub allow: Vec<Cidr>,
    /// Exact `IP:PORT` entries of `peers.allow`: that address and port only.
    pub allow_addrs: Vec<SocketAddr>,
    pub deny: Vec<Cidr>,
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    /// IPv6 clients count against `max_connections_per_ip` by this prefix (/64).
    pub ipv6_prefix_per_ip: u8,
    pub tls_handshake_timeout: u32,
    pub idle_timeout: u32,
    pub drain_timeout: u32,
    /// Where /metrics, /healthz and /readyz are served; `None` when disabled.
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token of the admin API (served on the metrics listener); `None` when disabled.
    pub admin_token: Option<String>,
    pub admin_token_file: Option<PathBuf>,
    /// Certificate chain and key (PEM) for TLS listeners.
    pub tls: Option<TlsSection>,
    /// SNI routing on TLS listeners (`[tls] turn_names`, `[tls.passthrough]`).
    pub passthrough: Option<Passthrough>,
    pub log_level: String,
    pub log_json: bool,
    /// Warnings about the configuration that do not stop turnd (a secret
    /// file others can read, metrics on a wildcard address, ...): logged at
    /// start and on every reload.
    pub notes: Vec<String>,
}

/// Reads and validates `path` (or the defaults when `None`) with overrides.
/// An empty file is taken as all defaults, with a note saying so.
pub fn load(path: Option<&Path>, ov: &Overrides) -> anyhow::Result<Config> {
    let (file, empty) = read(path)?;
    let mut cfg = validate(file, ov)?;
    if let (Some(p), true) = (path, empty) {
        cfg.notes.push(format!("config {} is empty: running on the defaults", p.display()));
    }
    Ok(cfg)
}

/// Like [`load`], for a reload: an empty file is refused, since it is far
/// more often a failed save than a wish to fall back to every default
/// (listeners moved, a new secret generated).
pub fn load_for_reload(path: Option<&Path>, ov: &Overrides) -> anyhow::Result<Config> {
    let (file, empty) = read(path)?;
    if let (Some(p), true) = (path, empty) {
        anyhow::bail!("config {} is empty (a failed save?); refused: an empty file would reset every setting to its default", p.display());
    }
    Ok(validate(file, ov)?)
}

/// The parsed file, and whether the file is empty (nothing but whitespace).
fn read(path: Option<&Path>) -> anyhow::Result<(File, bool)> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", p.display()))?;
            let file = parse_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", p.display()))?;
            Ok((file, text.trim_start_matches('\u{feff}').trim().is_empty()))
        }
        None => Ok((File::default(), false)),
    }
}

/// Parses TOML text into the file structure (no validation).
pub fn parse_str(text: &str) -> Result<File, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
}

fn parse_ip(key: &str, s: &str) -> Result<IpAddr, ConfigError> {
    s.trim().parse().map_err(|_| bad(key, format!("`{s}` is not an IP address")))
}

fn parse_cidrs(key: &str, list: &[String]) -> Result<Vec<Cidr>, ConfigError> {
    list.iter().map(|s| s.parse::<Cidr>().map_err(|e| bad(key, e))).collect()
}

/// `peers.allow`: CIDRs (or single addresses) and exact `IP:PORT` /
/// `[IPv6]:PORT` entries.
fn parse_allow(key: &str, list: &[String]) -> Result<(Vec<Cidr>, Vec<SocketAddr>), ConfigError> {
    let (mut cidrs, mut addrs) = (Vec::new(), Vec::new());
    for s in list {
        match s.parse::<Cidr>() {
            Ok(c) => {
                cidrs.push(c);
                continue;
            }
            Err(e) if s.contains('/') => return Err(bad(key, e)),
            Err(_) => {}
        }
        match s.trim().parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => return Err(bad(key, format!("`{s}` names port 0; give the peer's real port"))),
            Ok(a) => addrs.push(a),
            Err(_) => {
                return Err(bad(key, format!("`{s}` is not an IP address, a CIDR, or IP:PORT ([IPv6]:PORT for IPv6)")));
            }
        }
    }
    Ok((cidrs, addrs))
}

/// Parses `LOW-HIGH`.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let err = || format!("`{s}` is not a port range: expected LOW-HIGH, e.g. 49152-65535, with 1024 <= LOW <= HIGH");
    let (a, b) = s.split_once('-').ok_or_else(err)?;
    let lo: u16 = a.trim().parse().map_err(|_| err())?;
    let hi: u16 = b.trim().parse().map_err(|_| err())?;
    if lo < 1024 || lo > hi {
        return Err(err());
    }
    Ok((lo, hi))
}

/// The address this host would use to reach the internet, found from the
/// routing table (a UDP `connect` sends nothing).
pub fn detect_ip(v6: bool) -> Option<IpAddr> {
    let (bind, probe) = if v6 { ("[::]:0", "[2001:db8::1]:9") } else { ("0.0.0.0:0", "192.0.2.1:9") };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(probe).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The secrets of a secret file: one per line, blank lines and `#` comments
/// skipped. A UTF-8 byte-order mark and carriage returns (a file saved by a
/// Windows editor) are not part of any secret: they are stripped, and
/// `stripped` says so, for a note in the log.
#[derive(Debug)]
pub struct SecretFile {
    pub secrets: Vec<Vec<u8>>,
    pub stripped: bool,
}

impl SecretFile {
    pub fn parse(text: &str) -> SecretFile {
        let body = text.strip_prefix('\u{feff}');
        let stripped = body.is_some() || text.contains('\r');
        let secrets = body
            .unwrap_or(text)
            .lines()
            .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}'))
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.as_bytes().to_vec())
            .collect();
        SecretFile { secrets, stripped }
    }

    /// Reads `path`; an error when it cannot be read or holds no secret.
    pub fn read(path: &Path) -> Result<SecretFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let f = SecretFile::parse(&text);
        if f.secrets.is_empty() {
            return Err(format!("{} holds no secret", path.display()));
        }
        Ok(f)
    }

    /// The first secret, as text (the one turnctl signs with).
    pub fn first(&self) -> String {
        String::from_utf8_lossy(&self.secrets[0]).into_owned()
    }
}

/// A note when a file holding a secret can be read by every user of the host.
fn readable_by_others(path: &Path, key: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| {
        format!("{key}: {} is readable by every user of this host (mode {:o}); chmod 600 it (or 640 with turnd's group)", path.display(), mode & 0o777)
    })
}

/// Where turnd keeps state it generates (the secret, the admin token):
/// $STATE_DIRECTORY (systemd), /var/lib/turnd as root, else the current directory.
pub fn state_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY") {
        // systemd StateDirectory= may list several; take the first.
        let first = dir.to_string_lossy().split(':').next().unwrap_or("").to_owned();
        return PathBuf::from(first).join(name);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/turnd").join(name)
    } else {
        PathBuf::from(format!("turnd-{name}"))
    }
}

/// The file a generated secret is kept in when none is configured.
pub fn default_secret_path() -> PathBuf {
    state_path("secret")
}

/// The admin API token file when `admin.token_file` is not set.
pub fn default_admin_token_path() -> PathBuf {
    state_path("admin-token")
}

/// A new random secret: 32 bytes as 64 hex characters.
pub fn generate_secret() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random generator is available");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads the first secret-like line of `path`, creating the file with a
/// fresh random value (mode 0600) when it does not exist.
pub fn load_or_create_token(path: &Path, key: &str) -> Result<String, ConfigError> {
    Ok(load_or_create_secret_at(path, key)?.first())
}

fn load_or_create_secret_at(path: &Path, key: &str) -> Result<SecretFile, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(t) => {
            let f = SecretFile::parse(&t);
            if f.secrets.is_empty() {
                return Err(bad(key, format!("{} holds no secret", path.display())));
            }
            Ok(f)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| bad(key, format!("cannot create {}: {e}", dir.display())))?;
            }
            let secret = generate_secret();
            match write_private(path, &format!("{secret}\n")) {
                Ok(()) => Ok(SecretFile { secrets: vec![secret.into_bytes()], stripped: false }),
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_secret_at(path, key),
                Err(e) => Err(bad(key, format!("cannot write {}: {e}", path.display()))),
            }
        }
        Err(e) => Err(bad(key, format!("cannot read {}: {e}", path.display()))),
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())
}

fn secs(key: &str, v: Option<Seconds>, default: u32, min: u32) -> Result<u32, ConfigError> {
    let s = v.map(|s| s.0).unwrap_or(default as u64);
    if s < min as u64 || s > u32::MAX as u64 {
        return Err(bad(key, format!("{s} s is out of range (at least {min} s)")));
    }
    Ok(s as u32)
}

/// A key written as a bare number or as text (`threads = 4`, `threads = "auto"`).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum NumberOrText {
    Number(i64),
    Text(String),
}

impl NumberOrText {
    fn into_text(self) -> String {
        match self {
            NumberOrText::Number(n) => n.to_string(),
            NumberOrText::Text(s) => s,
        }
    }
}

/// Most shards accepted: far beyond any relay's cores, low enough that a
/// typo does not start thousands of threads.
pub const MAX_THREADS: usize = 256;

/// `threads`: a number, or "auto" (the default): one per CPU turnd may run
/// on (its affinity mask and CPU quota).
fn parse_threads(v: Option<String>) -> Result<usize, ConfigError> {
    let auto = || std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS);
    match v.as_deref().map(str::trim) {
        None | Some("auto") => Ok(auto()),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
            _ => Err(bad("threads", format!("`{s}` is not a thread count: use 1 to {MAX_THREADS}, or \"auto\" for one per CPU turnd may run on"))),
        },
    }
}

pub fn validate(f: File, ov: &Overrides) -> Result<Config, ConfigError> {
    let realm = ov.realm.clone().or(f.realm).unwrap_or_else(|| "turnd".into());
    // At most 32: the 401 challenge to a minimal Allocate (28 bytes) must stay
    // within 3x its size (amplification), and carries REALM and a 16-byte NONCE.
    if realm.is_empty() || realm.len() > MAX_REALM || !realm.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "realm",
            format!("must be 1 to {MAX_REALM} printable ASCII characters without spaces (a longer realm would make the 401 challenge more than 3x the size of the request)"),
        ));
    }

    // RFC 8489 14.14: fewer than 128 characters. It rides in answers, so a
    // longer one could push them past what a datagram or the 3x bound allows.
    let software = f.software.filter(|s| !s.is_empty());
    if let Some(sw) = &software
        && (sw.chars().count() > MAX_SOFTWARE || sw.chars().any(char::is_control)) {
            return Err(bad("software", format!("must be at most {MAX_SOFTWARE} characters without control characters (RFC 8489)")));
        }

    let threads = parse_threads(ov.threads.clone().or(f.threads.map(NumberOrText::into_text)))?;

    // Secrets: inline, from a file, or generated on first start.
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    for (i, s) in f.auth.secrets.iter().enumerate() {
        if s.trim().is_empty() {
            return Err(bad(format!("auth.secrets[{i}]"), "is empty"));
        }
        secrets.push(s.trim().as_bytes().to_vec());
    }
    let secret_file = ov.secret_file.clone().or(f.auth.secret_file);
    let mut secret_source = if secrets.is_empty() { SecretSource::None } else { SecretSource::Inline };
    let mut notes = Vec::new();
    let read_secrets = |p: &Path, key: &str, file: SecretFile, notes: &mut Vec<String>| {
        if file.stripped {
            notes.push(format!(
                "{key}: {} has a byte-order mark or Windows line endings; they were stripped and are not part of the secret",
                p.display()
            ));
        }
        notes.extend(readable_by_others(p, key));
        file.secrets
    };
    if let Some(p) = &secret_file {
        let file = SecretFile::read(p).map_err(|e| bad("auth.secret_file", e))?;
        secrets.extend(read_secrets(p, "auth.secret_file", file, &mut notes));
        secret_source = SecretSource::File(p.clone());
    }
    let static_users: Vec<(String, String)> =
        f.auth.static_users.iter().map(|u| (u.username.clone(), u.password.clone())).collect();
    for (i, (u, p)) in static_users.iter().enumerate() {
        if u.is_empty() || p.is_empty() || u.len() > crate::auth::MAX_USERNAME {
            return Err(bad(format!("auth.static_users[{i}]"), "username and password must be non-empty"));
        }
    }
    if secrets.is_empty() && static_users.is_empty() {
        let p = default_secret_path();
        let file = load_or_create_secret_at(&p, "auth.secret_file")?;
        secrets = read_secrets(&p, "auth.secret_file", file, &mut notes);
        secret_source = SecretSource::Generated(p);
    }
    let nonce_lifetime = secs("auth.nonce_lifetime", f.auth.nonce_lifetime, 600, 10)? as u64;

    // Listeners.
    let mut listen: Vec<(String, String, bool)> =
        f.listen.iter().map(|l| (l.transport.clone(), l.address.clone(), l.proxy_protocol)).collect();
    let proxy_from: Vec<Vec<String>> = f.listen.iter().map(|l| l.proxy_protocol_from.clone()).collect();
    if !ov.listen.is_empty() {
        listen = ov
            .listen
            .iter()
            .map(|s| match s.split_once("://") {
                Some((t, a)) => (t.to_owned(), a.to_owned(), false),
                None => ("udp".to_owned(), s.clone(), false),
            })
            .collect();
    }
    if listen.is_empty() {
        listen = vec![("udp".into(), "0.0.0.0:3478".into(), false), ("tcp".into(), "0.0.0.0:3478".into(), false)];
    }
    let mut listeners: Vec<Listener> = Vec::new();
    for (i, (t, a, proxy_protocol)) in listen.iter().enumerate() {
        let key = format!("listen[{i}]");
        let transport = match t.as_str() {
            "udp" => Transport::Udp,
            "tcp" => Transport::Tcp,
            "tls" => Transport::Tls,
            _ => return Err(bad(format!("{key}.transport"), format!("`{t}` is not one of udp, tcp, tls"))),
        };
        let address: SocketAddr =
            a.parse().map_err(|_| bad(format!("{key}.address"), format!("`{a}` is not IP:PORT")))?;
        if *proxy_protocol && transport == Transport::Udp {
            return Err(bad(format!("{key}.proxy_protocol"), "applies to tcp and tls listeners only"));
        }
        if transport == Transport::Tls && f.tls.is_none() {
            return Err(bad(format!("{key}.transport"), "a tls listener needs a [tls] section with cert and key"));
        }
        let from_key = format!("{key}.proxy_protocol_from");
        let proxy_protocol_from = match proxy_from.get(i).filter(|_| ov.listen.is_empty()) {
            Some(list) => parse_cidrs(&from_key, list)?,
            None => Vec::new(),
        };
        if *proxy_protocol && proxy_protocol_from.is_empty() {
            return Err(bad(
                from_key,
                "list the addresses (CIDRs) of the load balancers that send the PROXY header, e.g. [\"10.0.0.0/8\"] \
                 ([\"127.0.0.1/32\"] when it runs on this host): otherwise anyone reaching this port could claim any client address",
            ));
        }
        if !*proxy_protocol && !proxy_protocol_from.is_empty() {
            return Err(bad(from_key, "applies only with proxy_protocol = true"));
        }
        let l = Listener { transport, address, proxy_protocol: *proxy_protocol, proxy_protocol_from };
        if listeners.iter().any(|o| o.address == l.address && o.transport.is_stream() == l.transport.is_stream()) {
            return Err(bad(key, format!("{t} {a} is listed twice")));
        }
        listeners.push(l);
    }

    // Relay addresses.
    let ip = ov.relay_ip.clone().or(f.relay.ip);
    let local_v4 = match ip {
        Some(s) => Some(parse_ip("relay.ip", &s)?),
        None => Some(detect_ip(false).unwrap_or(IpAddr::from([127, 0, 0, 1]))),
    };
    if let Some(ip) = local_v4
        && (!ip.is_ipv4() || ip.is_unspecified()) {
            return Err(bad("relay.ip", format!("`{ip}` must be a concrete IPv4 address of this host")));
        }
    let ext_v4 = match ov.external_ip.clone().or(f.relay.external_ip) {
        Some(s) => {
            let e = parse_ip("relay.external_ip", &s)?;
            if !e.is_ipv4() {
                return Err(bad("relay.external_ip", "must be an IPv4 address"));
            }
            Some(e)
        }
        None => None,
    };
    let local_v6 = match f.relay.ipv6 {
        Some(s) => {
            let ip = parse_ip("relay.ipv6", &s)?;
            if !ip.is_ipv6() || ip.is_unspecified() {
                return Err(bad("relay.ipv6", format!("`{ip}` must be a concrete IPv6 address of this host")));
            }
            Some(ip)
        }
        None => None,
    };
    let ext_v6 = match f.relay.external_ipv6 {
        Some(s) => {
            let e = parse_ip("relay.external_ipv6", &s)?;
            if !e.is_ipv6() || local_v6.is_none() {
                return Err(bad("relay.external_ipv6", "must be an IPv6 address, and relay.ipv6 must be set"));
            }
            Some(e)
        }
        None => None,
    };
    let relay_v4 = local_v4.map(|l| RelayAddr { local: l, external: ext_v4.unwrap_or(l) });
    let relay_v6 = local_v6.map(|l| RelayAddr { local: l, external: ext_v6.unwrap_or(l) });
    let ports_s = ov.ports.clone().or(f.relay.ports).unwrap_or_else(|| "49152-65535".into());
    let ports = parse_port_range(&ports_s).map_err(|e| bad("relay.ports", e))?;
    for l in &listeners {
        if (relay_v4.map(|r| r.local) == Some(l.address.ip()) || l.address.ip().is_unspecified())
            && (ports.0..=ports.1).contains(&l.address.port()) {
                return Err(bad("relay.ports", format!("overlaps the listener port {}", l.address.port())));
            }
    }

    let mut allow_s = f.peers.allow.clone();
    allow_s.extend(ov.allow_peers.iter().cloned());
    let (allow, allow_addrs) = parse_allow("peers.allow", &allow_s)?;
    let deny = parse_cidrs("peers.deny", &f.peers.deny)?;

    let l = &f.limits;
    let max_lifetime = secs("limits.max_lifetime", l.max_lifetime, 3600, 60)?;
    let default_lifetime = secs("limits.default_lifetime", l.default_lifetime, 600.min(max_lifetime), 60)?;
    if default_lifetime > max_lifetime {
        return Err(bad("limits.default_lifetime", "must not exceed limits.max_lifetime"));
    }
    let permission_lifetime = secs("limits.permission_lifetime", l.permission_lifetime, 300, 30)?;
    let channel_lifetime = secs("limits.channel_lifetime", l.channel_lifetime, 600, 60)?;
    let max_permissions = l.max_permissions.unwrap_or(64);
    if max_permissions == 0 {
        return Err(bad("limits.max_permissions", "must be at least 1"));
    }

    let ipv6_prefix_per_ip = l.ipv6_prefix_per_ip.unwrap_or(64);
    if !(32..=128).contains(&ipv6_prefix_per_ip) {
        return Err(bad("limits.ipv6_prefix_per_ip", format!("{ipv6_prefix_per_ip} is not a prefix length from 32 to 128 (64: one count per /64)")));
    }

    let unauth_rate = l.unauth_rate.unwrap_or(crate::turn::DEFAULT_UNAUTH_RATE);
    if unauth_rate > 1_000_000 {
        return Err(bad("limits.unauth_rate", format!("{unauth_rate} is too large (at most 1000000 answers a second; 0 = no limit)")));
    }

    let metrics_listen = match f.metrics.listen.as_deref().unwrap_or("127.0.0.1:9641") {
        "" => None,
        a => Some(a.parse::<SocketAddr>().map_err(|_| bad("metrics.listen", format!("`{a}` is not IP:PORT (or \"\" to disable)")))?),
    };
    if let Some(m) = metrics_listen {
        if listeners.iter().any(|l| l.transport.is_stream() && l.address.port() == m.port()) {
            return Err(bad("metrics.listen", format!("port {} is also a TURN listener", m.port())));
        }
        if m.ip().is_unspecified() {
            notes.push(format!(
                "metrics.listen: {m} serves metrics and the admin API (reload, disconnect) in cleartext on every address of this host; keep it on loopback or a private address, or firewall the port"
            ));
        }
    }
    let (admin_token, admin_token_file) = if f.admin.enabled.unwrap_or(true) && metrics_listen.is_some() {
        let p = f.admin.token_file.clone().unwrap_or_else(default_admin_token_path);
        let token = load_or_create_token(&p, "admin.token_file")?;
        notes.extend(readable_by_others(&p, "admin.token_file"));
        (Some(token), Some(p))
    } else {
        (None, None)
    };
    let log_level = ov.log_level.clone().or(f.log.level).unwrap_or_else(|| "info".into());
    check_log_level(&log_level).map_err(|e| bad("log.level", e))?;
    let log_format = ov.log_format.clone().or(f.log.format).unwrap_or_else(|| "text".into());
    let log_json = match log_format.as_str() {
        "text" => false,
        "json" => true,
        other => return Err(bad("log.format", format!("`{other}` is not text or json"))),
    };

    let passthrough = match &f.tls {
        Some(t) => parse_passthrough(t, &listeners)?,
        None => None,
    };

    let legacy_channels = l.legacy_channel_numbers.unwrap_or(false);
    let core = ServerConfig {
        software: software.as_deref().map(Arc::from),
        default_lifetime,
        max_lifetime,
        permission_lifetime,
        channel_lifetime,
        user_quota: l.user_quota.unwrap_or(0),
        total_quota: l.total_quota.unwrap_or(10_000),
        max_permissions: max_permissions as usize,
        channel_max: if legacy_channels { crate::stun::CHANNEL_MAX_RFC5766 } else { crate::stun::CHANNEL_MAX },
        relay_v4,
        relay_v6,
        unauth_rate,
        allocation_bytes_per_second: l.allocation_bandwidth.unwrap_or(DEFAULT_ALLOCATION_BANDWIDTH).bytes_per_second(),
        total_bytes_per_second: l.total_bandwidth.unwrap_or(Bandwidth(0)).bytes_per_second(),
    };
    Ok(Config {
        realm,
        threads,
        core,
        secrets,
        secret_source,
        static_users,
        nonce_lifetime,
        listeners,
        ports,
        allow,
        allow_addrs,
        deny,
        max_connections: l.max_connections.unwrap_or(10_000),
        max_connections_per_ip: l.max_connections_per_ip.unwrap_or(64),
        ipv6_prefix_per_ip,
        tls_handshake_timeout: secs("limits.tls_handshake_timeout", l.tls_handshake_timeout, 10, 1)?,
        idle_timeout: secs("limits.idle_timeout", l.idle_timeout, 30, 1)?,
        drain_timeout: secs("limits.drain_timeout", l.drain_timeout, 60, 0)?,
        metrics_listen,
        admin_token,
        admin_token_file,
        passthrough,
        tls: f.tls.clone(),
        log_level,
        log_json,
        notes,
    })
}

impl Config {
    /// The server's own addresses, which peers may reach only on relay ports.
    pub fn own_ips(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = Vec::new();
        for r in [self.core.relay_v4, self.core.relay_v6].iter().flatten() {
            v.push(r.local);
            v.push(r.external);
        }
        v.extend(self.listeners.iter().map(|l| l.address.ip()).filter(|ip| !ip.is_unspecified()));
        v.sort();
        v.dedup();
        v
    }

    pub fn peer_policy(&self) -> PeerPolicy {
        PeerPolicy::new(self.allow.clone(), self.deny.clone(), self.own_ips(), self.ports)
            .with_allowed_addresses(self.allow_addrs.clone())
    }
}
