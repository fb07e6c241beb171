//! TLS: certificates from PEM files (as certbot and Caddy write them),
//! swapped in without a restart. A broken new certificate keeps the old one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use anyhow::{anyhow, Context as _};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

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

fn load_key(cert: &Path, key: &Path, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(anyhow!("certificate {} holds no PEM certificate", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow!("private key {}: {e}", key.display()))?;
    CertifiedKey::from_der(chain, der, provider).map_err(|e| anyhow!("certificate {} and key {}: {e}", cert.display(), key.display()))
}

impl CertStore {
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertStore>> {
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

    /// Points at other files (config reload) and loads them; on error the
    /// current certificate and paths stay.
    pub fn set_paths(&self, cert: &Path, key: &Path) -> anyhow::Result<()> {
        let ck = load_key(cert, key, &self.provider)?;
        *self.paths.lock().unwrap_or_else(|e| e.into_inner()) = (cert.to_owned(), key.to_owned());
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = mtime(cert).zip(mtime(key));
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ck);
        Ok(())
    }

    /// Loads the files again. On error the current certificate keeps serving.
    pub fn reload(&self) -> anyhow::Result<()> {
        let (cert, key) = self.paths();
        let stamp = mtime(&cert).zip(mtime(&key));
        let ck = load_key(&cert, &key, &self.provider);
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        let ck = ck?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ck);
        Ok(())
    }

    /// Reloads when either file's modification time changed; `None` when unchanged.
    pub fn reload_if_changed(&self) -> Option<anyhow::Result<()>> {
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
