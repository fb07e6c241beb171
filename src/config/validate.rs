//! From the parsed file and the command line's overrides to a checked
//! [`Config`], one section at a time; every error names its key.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;

use super::schema::*;
use super::secrets::{default_admin_token_path, default_secret_path, load_or_create_secret_at, load_or_create_token, readable_by_others, SecretFile};
use super::*;
use crate::turn::RelayAddr;
use crate::turn::{Cidr, ServerConfig, Transport};

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

/// A host name, lower-cased and without a trailing dot; `None` when it is not one.
fn host_name(n: &str) -> Option<String> {
    let l = n.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !l.is_empty()
        && l.len() <= 253
        && l.split('.').all(|p| !p.is_empty() && p.len() <= 63 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    ok.then_some(l)
}

/// Checks `[tls]`: certificate files or `[tls.acme]`, not both.
fn cert_source(t: &TlsSection) -> Result<CertSource, ConfigError> {
    match (&t.cert, &t.key, &t.acme) {
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => Err(bad(
            "tls.acme",
            "turnd either obtains its certificate ([tls.acme]) or reads it from tls.cert and tls.key: remove one of them",
        )),
        (Some(cert), Some(key), None) => Ok(CertSource::Files { cert: cert.clone(), key: key.clone() }),
        (Some(_), None, None) => Err(bad("tls.key", "missing: tls.cert needs the private key file beside it")),
        (None, Some(_), None) => Err(bad("tls.cert", "missing: tls.key needs the certificate chain file beside it")),
        (None, None, None) => Err(bad(
            "tls",
            "needs a certificate: either [tls.acme] with names = [\"turn.example.com\"] (turnd obtains and renews it), or tls.cert and tls.key (PEM files)",
        )),
        (None, None, Some(a)) => acme(a).map(CertSource::Acme),
    }
}

/// Checks `[tls.acme]`.
fn acme(a: &AcmeSection) -> Result<Acme, ConfigError> {
    if a.names.is_empty() {
        return Err(bad("tls.acme.names", "must list the name(s) clients use for turns:, e.g. [\"turn.example.com\"]"));
    }
    let mut names = Vec::new();
    for n in &a.names {
        if n.trim().starts_with("*.") {
            return Err(bad(
                "tls.acme.names",
                format!("`{n}`: a wildcard needs the DNS-01 challenge, which turnd does not answer; use certbot with your DNS provider and tls.cert/tls.key"),
            ));
        }
        if n.trim().parse::<IpAddr>().is_ok() {
            return Err(bad("tls.acme.names", format!("`{n}` is an address: list the DNS name clients use for turns:")));
        }
        let Some(l) = host_name(n).filter(|l| l.contains('.')) else {
            return Err(bad("tls.acme.names", format!("`{n}` is not a DNS name (e.g. turn.example.com)")));
        };
        if !names.contains(&l) {
            names.push(l);
        }
    }
    let contact = match a.contact.as_deref().map(str::trim) {
        None | Some("") => Vec::new(),
        Some(c) => {
            let addr = c.strip_prefix("mailto:").unwrap_or(c);
            let ok = addr.split_once('@').is_some_and(|(u, d)| !u.is_empty() && d.contains('.') && !addr.contains(char::is_whitespace) && !addr.contains(','));
            if !ok {
                return Err(bad("tls.acme.contact", format!("`{c}` is not an email address (the CA writes there about expiry and policy)")));
            }
            vec![format!("mailto:{addr}")]
        }
    };
    let directory = match a.directory.as_deref().map(str::trim) {
        None | Some("letsencrypt") => LETSENCRYPT.to_owned(),
        Some("letsencrypt-staging") => LETSENCRYPT_STAGING.to_owned(),
        Some(u) if u.starts_with("https://") && u.len() > "https://".len() && !u.contains(char::is_whitespace) => u.to_owned(),
        Some(u) => {
            return Err(bad(
                "tls.acme.directory",
                format!("`{u}` is not an https:// URL of an ACME directory (or letsencrypt, letsencrypt-staging)"),
            ))
        }
    };
    let state_dir = match &a.state_dir {
        Some(d) if !d.is_absolute() => return Err(bad("tls.acme.state_dir", format!("`{}` must be an absolute path", d.display()))),
        Some(d) => d.clone(),
        None => super::secrets::state_path("acme"),
    };
    Ok(Acme { names, contact, directory, state_dir, ca_root: a.ca_root.clone() })
}

/// Checks `[check]`.
fn check(c: &CheckSection, listeners: &[Listener], metrics: Option<SocketAddr>, notes: &mut Vec<String>) -> Result<Option<Check>, ConfigError> {
    if !c.enabled.unwrap_or(false) {
        if c.token.is_some() || c.http_listen.is_some() || c.credential_ttl.is_some() {
            notes.push("check.enabled is off (the default): the other check keys have no effect until it is true".into());
        }
        return Ok(None);
    }
    let token = match c.token.as_deref() {
        None => None,
        Some(t) if t.len() >= 16 && t.len() <= 128 && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') => Some(t.to_owned()),
        Some(_) => return Err(bad("check.token", "must be 16 to 128 letters, digits, - or _ (it goes into a link), e.g. from `turnctl secret`")),
    };
    let http_listen = match c.http_listen.as_deref() {
        None | Some("") => None,
        Some(a) => {
            let addr: SocketAddr = a.parse().map_err(|_| bad("check.http_listen", format!("`{a}` is not IP:PORT")))?;
            if listeners.iter().any(|l| l.transport.is_stream() && l.address.port() == addr.port()) || metrics.is_some_and(|m| m.port() == addr.port()) {
                return Err(bad("check.http_listen", format!("port {} is already a TURN or metrics listener", addr.port())));
            }
            Some(addr)
        }
    };
    if http_listen.is_none() && !listeners.iter().any(|l| l.transport == Transport::Tls) {
        return Err(bad("check.enabled", "the page is served on tls listeners (HTTPS) and check.http_listen: configure one of them"));
    }
    let ttl = secs("check.credential_ttl", c.credential_ttl, crate::auth::CHECK_TTL as u32, 5)?;
    if ttl > 600 {
        return Err(bad("check.credential_ttl", "at most 10m: check credentials are for one check, not a call"));
    }
    Ok(Some(Check { token, http_listen, credential_ttl: ttl as u64 }))
}

/// Checks `[tls] turn_names` and `[tls.passthrough]`. With `[tls.acme]`,
/// its names are TURN names too (their certificate is turnd's).
fn parse_passthrough(t: &TlsSection, source: &CertSource, listeners: &[Listener]) -> Result<Option<Passthrough>, ConfigError> {
    let Some(p) = &t.passthrough else {
        if !t.turn_names.is_empty() {
            return Err(bad("tls.turn_names", "has an effect only with [tls.passthrough] (a backend for the other names)"));
        }
        return Ok(None);
    };
    let acme_names: &[String] = match source {
        CertSource::Acme(a) => &a.names,
        CertSource::Files { .. } => &[],
    };
    if t.turn_names.is_empty() && acme_names.is_empty() {
        return Err(bad("tls.turn_names", "must list the TURN host name(s) when [tls.passthrough] is set, e.g. [\"turn.example.com\"]"));
    }
    let mut names = Vec::new();
    for n in &t.turn_names {
        let Some(l) = host_name(n) else {
            return Err(bad("tls.turn_names", format!("`{n}` is not a host name")));
        };
        names.push(l);
    }
    for n in acme_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
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

fn secs(key: &str, v: Option<Seconds>, default: u32, min: u32) -> Result<u32, ConfigError> {
    let s = v.map(|s| s.0).unwrap_or(default as u64);
    if s < min as u64 || s > u32::MAX as u64 {
        return Err(bad(key, format!("{s} s is out of range (at least {min} s)")));
    }
    Ok(s as u32)
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

/// Checks the parsed file, reading the secret and token files it names (and
/// creating the generated ones), as a start does.
pub fn validate(f: File, ov: &Overrides) -> Result<Config, ConfigError> {
    validate_reading(f, ov, Reads::Host)
}

/// Checks the parsed file, reading only what `reads` allows.
pub(super) fn validate_reading(f: File, ov: &Overrides, reads: Reads) -> Result<Config, ConfigError> {
    let (realm, software) = identity(&f, ov)?;
    let threads = parse_threads(ov.threads.clone().or(f.threads.clone().map(NumberOrText::into_text)))?;
    let mut notes = Vec::new();
    let auth = auth(&f.auth, ov, reads, &mut notes)?;
    let listeners = listeners(&f, ov)?;
    let Relay { v4: relay_v4, v6: relay_v6, ports } = relay(&f.relay, ov, &listeners)?;
    let Peers { allow, allow_addrs, deny } = peers(&f.peers, ov)?;
    let l = &f.limits;
    let lifetimes = lifetimes(l)?;
    let (max_permissions, ipv6_prefix_per_ip, unauth_rate) = limits(l)?;
    let MetricsAdmin { listen: metrics_listen, token: admin_token, token_file: admin_token_file } = metrics_and_admin(&f, &listeners, reads, &mut notes)?;
    let (log_level, log_json) = log(&f.log, ov)?;
    let tls = f.tls.as_ref().map(cert_source).transpose()?;
    let check = check(&f.check, &listeners, metrics_listen, &mut notes)?;
    let xdp = xdp(&f.xdp)?;
    let passthrough = match (&f.tls, &tls) {
        (Some(t), Some(source)) => parse_passthrough(t, source, &listeners)?,
        _ => None,
    };

    let alternates = alternates(&f.drain, &listeners, relay_v4, relay_v6, &mut notes)?;

    let legacy_channels = l.legacy_channel_numbers.unwrap_or(false);
    let core = ServerConfig {
        software: software.as_deref().map(Arc::from),
        default_lifetime: lifetimes.default,
        max_lifetime: lifetimes.max,
        permission_lifetime: lifetimes.permission,
        channel_lifetime: lifetimes.channel,
        user_quota: l.user_quota.unwrap_or(0),
        total_quota: l.total_quota.unwrap_or(10_000),
        max_permissions: max_permissions as usize,
        channel_max: if legacy_channels { crate::stun::CHANNEL_MAX_RFC5766 } else { crate::stun::CHANNEL_MAX },
        relay_v4,
        relay_v6,
        unauth_rate,
        allocation_bytes_per_second: l.allocation_bandwidth.unwrap_or(DEFAULT_ALLOCATION_BANDWIDTH).bytes_per_second(),
        total_bytes_per_second: l.total_bandwidth.unwrap_or(Bandwidth(0)).bytes_per_second(),
        alternates,
    };
    Ok(Config {
        realm,
        threads,
        core,
        secrets: auth.secrets,
        secret_source: auth.source,
        static_users: auth.static_users,
        nonce_lifetime: auth.nonce_lifetime,
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
        check,
        xdp,
        tls,
        log_level,
        log_json,
        notes,
    })
}

/// `[xdp]`: interface names as the kernel takes them, and a mode. Refused
/// when this binary was built without the fast path, rather than ignored.
fn xdp(x: &XdpSection) -> Result<Option<Xdp>, ConfigError> {
    let generic = match x.mode.as_deref() {
        None | Some("native") => false,
        Some("generic") => true,
        Some(m) => return Err(bad("xdp.mode", format!("`{m}` is not a mode: use \"native\" (in the driver) or \"generic\""))),
    };
    if x.interfaces.is_empty() {
        return Ok(None);
    }
    for (i, name) in x.interfaces.iter().enumerate() {
        // IFNAMSIZ less the NUL; no '/', ':' or whitespace (what dev_valid_name refuses).
        if name.is_empty() || name.len() > 15 || name == "." || name == ".." || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
            return Err(bad(format!("xdp.interfaces[{i}]"), format!("`{name}` is not a network interface name")));
        }
        if x.interfaces[..i].contains(name) {
            return Err(bad(format!("xdp.interfaces[{i}]"), format!("`{name}` is named twice")));
        }
    }
    if !cfg!(feature = "xdp") {
        return Err(bad(
            "xdp.interfaces",
            "this turnd was built without the XDP fast path (the cargo feature `xdp`): leave the list empty, or build with `cargo build --release --features xdp`",
        ));
    }
    Ok(Some(Xdp { interfaces: x.interfaces.clone(), generic }))
}

/// `realm` and `software`.
fn identity(f: &File, ov: &Overrides) -> Result<(String, Option<String>), ConfigError> {
    let realm = ov.realm.clone().or(f.realm.clone()).unwrap_or_else(|| "turnd".into());
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
    let software = f.software.clone().filter(|s| !s.is_empty());
    if let Some(sw) = &software
        && (sw.chars().count() > MAX_SOFTWARE || sw.chars().any(char::is_control)) {
            return Err(bad("software", format!("must be at most {MAX_SOFTWARE} characters without control characters (RFC 8489)")));
        }

    Ok((realm, software))
}

/// `[auth]`: what authenticates clients.
struct Auth {
    secrets: Vec<Vec<u8>>,
    source: SecretSource,
    static_users: Vec<(String, String)>,
    nonce_lifetime: u64,
}

/// `[auth]`: secrets inline, from a file, or generated on first start;
/// static users; the nonce lifetime. Notes what does not stop turnd. With
/// [`Reads::FileOnly`], no secret file is read or generated (the secrets are
/// then the inline ones only).
fn auth(a: &AuthSection, ov: &Overrides, reads: Reads, notes: &mut Vec<String>) -> Result<Auth, ConfigError> {
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    for (i, s) in a.secrets.iter().enumerate() {
        if s.trim().is_empty() {
            return Err(bad(format!("auth.secrets[{i}]"), "is empty"));
        }
        secrets.push(s.trim().as_bytes().to_vec());
    }
    let secret_file = ov.secret_file.clone().or(a.secret_file.clone());
    let mut secret_source = if secrets.is_empty() { SecretSource::None } else { SecretSource::Inline };
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
        if reads == Reads::Host {
            let file = SecretFile::read(p).map_err(|e| bad("auth.secret_file", e))?;
            secrets.extend(read_secrets(p, "auth.secret_file", file, notes));
        }
        secret_source = SecretSource::File(p.clone());
    }
    let static_users: Vec<(String, String)> =
        a.static_users.iter().map(|u| (u.username.clone(), u.password.clone())).collect();
    for (i, (u, p)) in static_users.iter().enumerate() {
        if u.is_empty() || p.is_empty() || u.len() > crate::auth::MAX_USERNAME {
            return Err(bad(format!("auth.static_users[{i}]"), "username and password must be non-empty"));
        }
    }
    if secret_file.is_none() && secrets.is_empty() && static_users.is_empty() {
        let p = default_secret_path();
        if reads == Reads::Host {
            let file = load_or_create_secret_at(&p, "auth.secret_file")?;
            secrets = read_secrets(&p, "auth.secret_file", file, notes);
        }
        secret_source = SecretSource::Generated(p);
    }
    let nonce_lifetime = secs("auth.nonce_lifetime", a.nonce_lifetime, 600, 10)? as u64;

    Ok(Auth { secrets, source: secret_source, static_users, nonce_lifetime })
}

/// `[[listen]]` (or `--listen`): the listeners, UDP and TCP on 0.0.0.0:3478
/// when none is given.
fn listeners(f: &File, ov: &Overrides) -> Result<Vec<Listener>, ConfigError> {
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
            return Err(bad(format!("{key}.transport"), "a tls listener needs a [tls] section: [tls.acme] names (turnd gets the certificate) or tls.cert and tls.key"));
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

    Ok(listeners)
}

/// `[relay]`: the relay addresses (local and advertised) and port range.
/// What `[relay]` says, checked.
struct Relay {
    v4: Option<RelayAddr>,
    v6: Option<RelayAddr>,
    ports: (u16, u16),
}

fn relay(r: &RelaySection, ov: &Overrides, listeners: &[Listener]) -> Result<Relay, ConfigError> {
    let ip = ov.relay_ip.clone().or(r.ip.clone());
    let local_v4 = match ip {
        Some(s) => Some(parse_ip("relay.ip", &s)?),
        None => Some(detect_ip(false).unwrap_or(IpAddr::from([127, 0, 0, 1]))),
    };
    if let Some(ip) = local_v4
        && (!ip.is_ipv4() || ip.is_unspecified()) {
            return Err(bad("relay.ip", format!("`{ip}` must be a concrete IPv4 address of this host")));
        }
    let ext_v4 = match ov.external_ip.clone().or(r.external_ip.clone()) {
        Some(s) => {
            let e = parse_ip("relay.external_ip", &s)?;
            if !e.is_ipv4() {
                return Err(bad("relay.external_ip", "must be an IPv4 address"));
            }
            Some(e)
        }
        None => None,
    };
    let local_v6 = match r.ipv6.clone() {
        Some(s) => {
            let ip = parse_ip("relay.ipv6", &s)?;
            if !ip.is_ipv6() || ip.is_unspecified() {
                return Err(bad("relay.ipv6", format!("`{ip}` must be a concrete IPv6 address of this host")));
            }
            Some(ip)
        }
        None => None,
    };
    let ext_v6 = match r.external_ipv6.clone() {
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
    let ports_s = ov.ports.clone().or(r.ports.clone()).unwrap_or_else(|| "49152-65535".into());
    let ports = parse_port_range(&ports_s).map_err(|e| bad("relay.ports", e))?;
    for l in listeners {
        if (relay_v4.map(|r| r.local) == Some(l.address.ip()) || l.address.ip().is_unspecified())
            && (ports.0..=ports.1).contains(&l.address.port()) {
                return Err(bad("relay.ports", format!("overlaps the listener port {}", l.address.port())));
            }
    }

    Ok(Relay { v4: relay_v4, v6: relay_v6, ports })
}

/// `[peers]` (and `--allow-peer`): allowed ranges, exact allowed addresses, denied ranges.
struct Peers {
    allow: Vec<Cidr>,
    allow_addrs: Vec<SocketAddr>,
    deny: Vec<Cidr>,
}

fn peers(p: &PeersSection, ov: &Overrides) -> Result<Peers, ConfigError> {
    let mut allow_s = p.allow.clone();
    allow_s.extend(ov.allow_peers.iter().cloned());
    let (allow, allow_addrs) = parse_allow("peers.allow", &allow_s)?;
    let deny = parse_cidrs("peers.deny", &p.deny)?;

    Ok(Peers { allow, allow_addrs, deny })
}

/// Lifetimes of allocations, permissions and channels (`[limits]`).
struct Lifetimes {
    default: u32,
    max: u32,
    permission: u32,
    channel: u32,
}

fn lifetimes(l: &LimitsSection) -> Result<Lifetimes, ConfigError> {
    let max_lifetime = secs("limits.max_lifetime", l.max_lifetime, 3600, 60)?;
    let default_lifetime = secs("limits.default_lifetime", l.default_lifetime, 600.min(max_lifetime), 60)?;
    if default_lifetime > max_lifetime {
        return Err(bad("limits.default_lifetime", "must not exceed limits.max_lifetime"));
    }
    let permission_lifetime = secs("limits.permission_lifetime", l.permission_lifetime, 300, 30)?;
    let channel_lifetime = secs("limits.channel_lifetime", l.channel_lifetime, 600, 60)?;
    Ok(Lifetimes { default: default_lifetime, max: max_lifetime, permission: permission_lifetime, channel: channel_lifetime })
}

/// The other `[limits]` that need a check: (max_permissions,
/// ipv6_prefix_per_ip, unauth_rate).
fn limits(l: &LimitsSection) -> Result<(u32, u8, u32), ConfigError> {
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

    Ok((max_permissions, ipv6_prefix_per_ip, unauth_rate))
}

/// Siblings listed at most (one per address family is what clients read;
/// more spread the redirected clients).
pub const MAX_ALTERNATES: usize = 64;

/// `[[drain.alternate]]`: the sibling relays new clients are sent to while
/// this one drains, checked. An address is an IP (the client is sent to the
/// port it came in on) or IP:PORT; never this relay's own listener.
fn alternates(
    d: &DrainSection,
    listeners: &[Listener],
    relay_v4: Option<RelayAddr>,
    relay_v6: Option<RelayAddr>,
    notes: &mut Vec<String>,
) -> Result<Vec<crate::turn::Alternate>, ConfigError> {
    if d.alternate.len() > MAX_ALTERNATES {
        return Err(bad("drain.alternate", format!("lists {} relays; at most {MAX_ALTERNATES}", d.alternate.len())));
    }
    let own: Vec<IpAddr> = [relay_v4, relay_v6].iter().flatten().flat_map(|r| [r.local, r.external]).collect();
    let mut out: Vec<crate::turn::Alternate> = Vec::new();
    for (i, a) in d.alternate.iter().enumerate() {
        let key = format!("drain.alternate[{i}].address");
        let text = a.address.trim();
        let (ip, port) = match (text.parse::<IpAddr>(), text.parse::<SocketAddr>()) {
            (Ok(ip), _) => (ip, None),
            (_, Ok(sa)) if sa.port() == 0 => return Err(bad(key, format!("`{text}` names port 0: give the sibling's port, or only its IP address"))),
            (_, Ok(sa)) => (sa.ip(), Some(sa.port())),
            _ => {
                return Err(bad(
                    key,
                    format!("`{text}` is not an IP address or IP:PORT ([IPv6]:PORT): a redirect carries an address, not a name (put the name in domain)"),
                ))
            }
        };
        let ip = ip.to_canonical();
        if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
            return Err(bad(key, format!("`{ip}` is not an address a client can reach")));
        }
        // This relay itself: clients would be sent back here (browsers then give up).
        let loops = listeners.iter().any(|l| {
            let lip = l.address.ip().to_canonical();
            (lip == ip || (lip.is_unspecified() && own.contains(&ip))) && port.is_none_or(|p| p == l.address.port())
        });
        if loops {
            return Err(bad(key, format!("`{text}` is this relay's own listener: name a sibling relay")));
        }
        if ip.is_loopback() {
            notes.push(format!("{key}: `{text}` is a loopback address: browsers refuse to be redirected there (only other clients on this host follow)"));
        }
        let domain = match a.domain.as_deref() {
            None => None,
            Some(n) => match host_name(n).filter(|l| l.contains('.') && l.len() < 128) {
                Some(l) => Some(Arc::from(l.as_str())),
                None => return Err(bad(format!("drain.alternate[{i}].domain"), format!("`{n}` is not a DNS name (the name in that relay's certificate, e.g. turn2.example.com)"))),
            },
        };
        let tls = a.tls_clients.unwrap_or(false);
        if domain.is_some() && !tls {
            return Err(bad(format!("drain.alternate[{i}].domain"), "is sent to TLS clients only: it needs tls_clients = true"));
        }
        let alt = crate::turn::Alternate { ip, port, tls, domain };
        if out.iter().any(|o| o.ip == alt.ip && o.port == alt.port) {
            return Err(bad(key, format!("`{text}` is listed twice")));
        }
        out.push(alt);
    }
    Ok(out)
}

/// `[metrics]` and `[admin]`: where metrics are served, and the admin token
/// (read, or generated on first start) when the admin API is on; with
/// [`Reads::FileOnly`] the token file is named but neither read nor created.
struct MetricsAdmin {
    listen: Option<SocketAddr>,
    token: Option<String>,
    token_file: Option<std::path::PathBuf>,
}

fn metrics_and_admin(f: &File, listeners: &[Listener], reads: Reads, notes: &mut Vec<String>) -> Result<MetricsAdmin, ConfigError> {
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
        if reads == Reads::FileOnly {
            (None, Some(p))
        } else {
            let token = load_or_create_token(&p, "admin.token_file")?;
            notes.extend(readable_by_others(&p, "admin.token_file"));
            (Some(token), Some(p))
        }
    } else {
        (None, None)
    };
    Ok(MetricsAdmin { listen: metrics_listen, token: admin_token, token_file: admin_token_file })
}

/// `[log]` (and `--log-level`, `--log-format`): the level or filter, and whether lines are JSON.
fn log(l: &LogSection, ov: &Overrides) -> Result<(String, bool), ConfigError> {
    let log_level = ov.log_level.clone().or(l.level.clone()).unwrap_or_else(|| "info".into());
    check_log_level(&log_level).map_err(|e| bad("log.level", e))?;
    let log_format = ov.log_format.clone().or(l.format.clone()).unwrap_or_else(|| "text".into());
    let log_json = match log_format.as_str() {
        "text" => false,
        "json" => true,
        other => return Err(bad("log.format", format!("`{other}` is not text or json"))),
    };

    Ok((log_level, log_json))
}
