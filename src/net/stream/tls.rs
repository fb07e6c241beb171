//! TLS: certificates from PEM files (as certbot and Caddy write them),
//! swapped in without a restart. A broken new certificate keeps the old one.

use std::path::{Path, PathBuf};
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

#[derive(Debug)]
pub struct CertStore {
    paths: Mutex<(PathBuf, PathBuf)>,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    stamp: Mutex<Option<(SystemTime, SystemTime)>>,
}

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
    ck.cert.first().and_then(|c| crate::certinfo::CertInfo::parse(c.as_ref())).map(|i| i.not_after)
}

impl CertStore {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertStore>, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ck = load_key(cert, key, &provider)?;
        Ok(Arc::new(CertStore {
            paths: Mutex::new((cert.to_owned(), key.to_owned())),
            provider,
            current: RwLock::new(Arc::new(ck)),
            stamp: Mutex::new(mtime(cert).zip(mtime(key))),
        }))
    }

    fn paths(&self) -> (PathBuf, PathBuf) {
        self.paths.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether these are the files already in use.
    pub fn same_paths(&self, cert: &Path, key: &Path) -> bool {
        self.paths() == (cert.to_owned(), key.to_owned())
    }

    /// Loads other files (a reload), without installing them yet.
    pub fn load_other(&self, cert: &Path, key: &Path) -> Result<CertifiedKey, ConfigError> {
        load_key(cert, key, &self.provider)
    }

    /// Serves `ck`, loaded by [`CertStore::load_other`] from these files, from now on.
    pub fn install(&self, cert: &Path, key: &Path, ck: CertifiedKey) {
        *self.paths.lock().unwrap_or_else(|e| e.into_inner()) = (cert.to_owned(), key.to_owned());
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = mtime(cert).zip(mtime(key));
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ck);
    }

    /// The certificate being served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads the files again. On error the current certificate keeps serving.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let (cert, key) = self.paths();
        let stamp = mtime(&cert).zip(mtime(&key));
        let ck = load_key(&cert, &key, &self.provider);
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        let ck = ck?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ck);
        Ok(())
    }

    /// Reloads when either file's modification time changed; `None` when unchanged.
    pub fn reload_if_changed(&self) -> Option<Result<(), ConfigError>> {
        let (cert, key) = self.paths();
        let now = mtime(&cert).zip(mtime(&key));
        if now.is_none() || *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) == now {
            return None;
        }
        Some(self.reload())
    }

    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}
