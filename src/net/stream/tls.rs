//! TLS: certificates from PEM files (as certbot and Caddy write them) or
//! from turnd's own ACME client, swapped in without a restart. A broken new
//! certificate keeps the old one.

use std::path::{Path, PathBuf};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::ConfigError;

/// ALPN names for TURN over TLS (RFC 7443). Clients that offer no ALPN are accepted too.
pub const ALPN: &[&[u8]] = &[b"stun.turn", b"stun.nat-discovery"];

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// What a PEM file holds, by the labels of its sections.
fn pem_labels(text: &str) -> Vec<&str> {
    text.lines().filter_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----")).collect()
}

/// Why a file that should be PEM is not usable, in an operator's words.
fn pem_trouble(path: &Path, want_key: bool) -> Option<String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => return Some(format!("cannot read {}: {e}", path.display())),
    };
    let what = if want_key { "private key" } else { "certificate" };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Some(format!("{} is empty", path.display()));
    }
    if bytes.first() == Some(&0x30) {
        let conv = if want_key { "openssl pkey -inform der -in FILE -out FILE.pem" } else { "openssl x509 -inform der -in FILE -out FILE.pem" };
        return Some(format!("{} is DER, not PEM: convert it ({conv})", path.display()));
    }
    let text = String::from_utf8_lossy(&bytes);
    let labels = pem_labels(&text);
    let is_key = |l: &&str| l.ends_with("PRIVATE KEY");
    if labels.is_empty() {
        return Some(format!("{} holds no PEM {what} (no -----BEGIN line)", path.display()));
    }
    if labels.contains(&"ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Some(format!(
            "{} is encrypted with a passphrase; turnd needs the key unencrypted (openssl pkey -in FILE -out FILE.plain), readable only by turnd",
            path.display()
        ));
    }
    match (want_key, labels.iter().any(is_key), labels.contains(&"CERTIFICATE")) {
        (true, false, true) => Some(format!("{} holds a certificate, not a private key: are tls.cert and tls.key swapped?", path.display())),
        (false, true, false) => Some(format!("{} holds a private key, not a certificate: are tls.cert and tls.key swapped?", path.display())),
        (true, false, false) => Some(format!("{} holds no PEM private key (found {})", path.display(), labels.join(", "))),
        (false, _, false) => Some(format!("{} holds no PEM certificate (found {})", path.display(), labels.join(", "))),
        _ => None,
    }
}

/// Loads a certificate chain and its key, checking that they belong together.
/// Errors say what is wrong with which file, under the key that names it
/// (`tls.cert` or `tls.key`).
pub fn load_key(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, ConfigError> {
    let on_cert = |msg: String| ConfigError { key: "tls.cert".into(), msg };
    let on_key = |msg: String| ConfigError { key: "tls.key".into(), msg };
    if let Some(t) = pem_trouble(cert, false) {
        return Err(on_cert(t));
    }
    if let Some(t) = pem_trouble(key, true) {
        return Err(on_key(t));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| on_cert(format!("cannot read certificate {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| on_cert(format!("certificate {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(on_cert(format!("certificate {} holds no PEM certificate", cert.display())));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| on_key(format!("private key {}: {e}", key.display())))?;
    CertifiedKey::from_der(chain, der, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            on_key(format!("the private key {} does not belong to the certificate {}", key.display(), cert.display()))
        }
        e => on_cert(format!("certificate {} and key {}: {e}", cert.display(), key.display())),
    })
}

/// The leaf certificate's expiry (unix seconds), if it can be read.
pub fn not_after(ck: &CertifiedKey) -> Option<i64> {
    info(ck).map(|i| i.not_after)
}

/// Names, issuer and validity of the leaf certificate.
pub fn info(ck: &CertifiedKey) -> Option<crate::certinfo::CertInfo> {
    ck.cert.first().and_then(|c| crate::certinfo::CertInfo::parse(c.as_ref()))
}

/// The ALPN protocol of the ACME TLS-ALPN-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The certificate TLS listeners serve, shared by every shard: from PEM
/// files (re-read when they change), or installed by the ACME client, which
/// also puts its TLS-ALPN-01 challenge certificates here while an order is
/// pending. Read once per handshake, never per packet.
#[derive(Debug)]
pub struct CertStore {
    /// The files it came from; `None` when ACME keeps it.
    files: Mutex<Option<(PathBuf, PathBuf)>>,
    provider: Arc<CryptoProvider>,
    /// `None` until ACME has obtained the first certificate.
    current: RwLock<Option<Arc<CertifiedKey>>>,
    stamp: Mutex<Option<(SystemTime, SystemTime)>>,
    /// Challenge certificates by lower-case name.
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CertStore {
    fn new(files: Option<(PathBuf, PathBuf)>, current: Option<CertifiedKey>, provider: Arc<CryptoProvider>) -> Arc<CertStore> {
        let stamp = files.as_ref().and_then(|(c, k)| mtime(c).zip(mtime(k)));
        Arc::new(CertStore {
            files: Mutex::new(files),
            provider,
            current: RwLock::new(current.map(Arc::new)),
            stamp: Mutex::new(stamp),
            challenges: Mutex::default(),
        })
    }

    /// A store serving the certificate in these files.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertStore>, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ck = load_key(cert, key, &provider)?;
        Ok(Self::new(Some((cert.to_owned(), key.to_owned())), Some(ck), provider))
    }

    /// A store for ACME: empty until [`CertStore::install_key`].
    pub fn for_acme() -> Arc<CertStore> {
        Self::new(None, None, Arc::new(rustls::crypto::ring::default_provider()))
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// Whether the certificate comes from files (not ACME).
    pub fn from_files(&self) -> bool {
        lock(&self.files).is_some()
    }

    /// Whether these are the files already in use.
    pub fn same_paths(&self, cert: &Path, key: &Path) -> bool {
        *lock(&self.files) == Some((cert.to_owned(), key.to_owned()))
    }

    /// Loads other files (a reload), without installing them yet.
    pub fn load_other(&self, cert: &Path, key: &Path) -> Result<CertifiedKey, ConfigError> {
        load_key(cert, key, &self.provider)
    }

    /// Serves `ck`, loaded by [`CertStore::load_other`] from these files, from now on.
    pub fn install(&self, cert: &Path, key: &Path, ck: CertifiedKey) {
        *lock(&self.files) = Some((cert.to_owned(), key.to_owned()));
        *lock(&self.stamp) = mtime(cert).zip(mtime(key));
        self.install_key(ck);
    }

    /// Serves `ck` from the next handshake on; connections already open keep theirs.
    pub fn install_key(&self, ck: CertifiedKey) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(ck));
    }

    /// The certificate being served, if there is one yet.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Answers TLS-ALPN-01 for `name` with `ck` until [`CertStore::clear_challenges`].
    pub fn set_challenge(&self, name: &str, ck: CertifiedKey) {
        lock(&self.challenges).insert(name.to_ascii_lowercase(), Arc::new(ck));
    }

    pub fn clear_challenges(&self) {
        lock(&self.challenges).clear();
    }

    /// Loads the files again. On error the current certificate keeps
    /// serving. Nothing to do when ACME keeps the certificate.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let Some((cert, key)) = lock(&self.files).clone() else { return Ok(()) };
        let stamp = mtime(&cert).zip(mtime(&key));
        let ck = load_key(&cert, &key, &self.provider);
        *lock(&self.stamp) = stamp;
        self.install_key(ck?);
        Ok(())
    }

    /// Reloads when either file's modification time changed; `None` when unchanged (or ACME).
    pub fn reload_if_changed(&self) -> Option<Result<(), ConfigError>> {
        let (cert, key) = lock(&self.files).clone()?;
        let now = mtime(&cert).zip(mtime(&key));
        if now.is_none() || *lock(&self.stamp) == now {
            return None;
        }
        Some(self.reload())
    }

    /// The listeners' TLS settings: TURN's ALPN names, with `acme` the
    /// TLS-ALPN-01 challenge's (answered only for a name with a pending
    /// challenge), HTTP/1.1 for browsers (readiness, the check page).
    pub fn server_config(self: &Arc<Self>, acme: bool) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        if acme {
            cfg.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
        }
        // Browsers offer h2 and http/1.1: readiness and the check page answer the latter.
        cfg.alpn_protocols.push(super::https::ALPN.to_vec());
        Arc::new(cfg)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // RFC 8737 3: the validator offers acme-tls/1 alone, and gets the
        // challenge certificate for the name it asks for, or nothing.
        if hello.alpn().is_some_and(|mut a| a.any(|p| p == ACME_TLS_ALPN)) {
            let name = hello.server_name()?.to_ascii_lowercase();
            return lock(&self.challenges).get(&name).cloned();
        }
        self.current()
    }
}
