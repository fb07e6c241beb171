//! The TOML configuration: parsing, defaults and validation.
//!
//! Every key is documented in `config/turnd.toml`. Validation names the key
//! and says what is wrong; unknown keys are errors, so typos do not pass.
//! [`schema`] is the file as TOML says it, [`validate`] checks it section by
//! section into a [`Config`], [`secrets`] reads secret files and keeps what
//! turnd generates (the secret, the admin token) in its state directory.

mod bandwidth;
mod duration;
mod schema;
mod secrets;
mod validate;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

pub use bandwidth::Bandwidth;
pub use duration::Seconds;
pub use schema::*;
pub use secrets::{default_admin_token_path, default_secret_path, generate_secret, load_or_create_token, state_path, SecretFile};
pub use validate::{detect_ip, parse_port_range, validate, MAX_THREADS};

use crate::turn::{Cidr, PeerPolicy, ServerConfig, Transport};

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

fn bad(key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), msg: msg.into() }
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

/// Where the TLS listeners' certificate comes from, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files kept by someone else (certbot, a private CA), re-read when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// Obtained and renewed by turnd itself (`[tls.acme]`).
    Acme(Acme),
}

/// Let's Encrypt's directories, the default and the `letsencrypt-staging` shorthand.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// `[tls.acme]`, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acme {
    /// Lower-case DNS names the certificate covers (no wildcards: TLS-ALPN-01 cannot prove them).
    pub names: Vec<String>,
    /// `mailto:` contacts for the CA's expiry and policy mail; may be empty.
    pub contact: Vec<String>,
    /// The CA's directory URL.
    pub directory: String,
    /// Account key and certificate live here.
    pub state_dir: PathBuf,
    /// A PEM root to trust for the directory's HTTPS instead of the system's (a private CA, tests).
    pub ca_root: Option<PathBuf>,
}

/// `[check]`, checked: the check page is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Needed in the link (`/check?token=...`) when set.
    pub token: Option<String>,
    /// A plain HTTP port serving the page too.
    pub http_listen: Option<SocketAddr>,
    /// How long check credentials are valid (seconds).
    pub credential_ttl: u64,
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
    /// Where TLS listeners get their certificate.
    pub tls: Option<CertSource>,
    /// SNI routing on TLS listeners (`[tls] turn_names`, `[tls.passthrough]`).
    pub passthrough: Option<Passthrough>,
    /// The check page, when on.
    pub check: Option<Check>,
    /// The XDP fast path (`[xdp]`), when interfaces are named.
    pub xdp: Option<Xdp>,
    pub log_level: String,
    pub log_json: bool,
    /// Warnings about the configuration that do not stop turnd (a secret
    /// file others can read, metrics on a wildcard address, ...): logged at
    /// start and on every reload.
    pub notes: Vec<String>,
}

/// `[xdp]`, checked: where the fast path attaches, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xdp {
    pub interfaces: Vec<String>,
    /// Generic (skb) mode instead of the driver's.
    pub generic: bool,
}

/// What loading reads besides the configuration file itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reads {
    /// What a start reads: the secret file, the admin token file, and the
    /// secret and token turnd generates in its state directory when missing.
    Host,
    /// The file alone (`--check-config --file-only`, for a file meant for
    /// another host): no file it names is read, none is created. The
    /// [`Config`] then has no secrets and no admin token: it is for checking,
    /// not for serving.
    FileOnly,
}

/// Reads and validates `path` (or the defaults when `None`) with overrides.
/// An empty file is taken as all defaults, with a note saying so.
pub fn load(path: Option<&Path>, ov: &Overrides) -> anyhow::Result<Config> {
    load_reading(path, ov, Reads::Host)
}

/// Like [`load`], reading only what `reads` allows besides `path`.
pub fn load_reading(path: Option<&Path>, ov: &Overrides, reads: Reads) -> anyhow::Result<Config> {
    let (file, empty) = read(path)?;
    let mut cfg = validate::validate_reading(file, ov, reads)?;
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
