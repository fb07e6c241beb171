//! What ACME keeps on disk, in its state directory: the account (key and
//! URL, per CA directory) and the certificate with its key. Files are
//! written whole or not at all (a temporary file, synced, then renamed) and
//! readable by turnd's user alone; the directory too.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;

pub struct State {
    dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

impl State {
    pub fn new(dir: &Path) -> State {
        State { dir: dir.to_owned() }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    /// Creates the directory (mode 0700) if it is missing, and makes an
    /// existing one private.
    pub fn prepare(&self) -> std::io::Result<()> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)?;
        let mode = std::fs::metadata(&self.dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(mode & 0o700))?;
        }
        Ok(())
    }

    /// The stored account for `directory`; `None` when there is none (or
    /// it belongs to another CA, or does not parse).
    pub fn account(&self, directory: &str) -> Option<AccountCredentials> {
        let text = std::fs::read_to_string(self.account_path()).ok()?;
        match serde_json::from_str::<StoredAccount>(&text) {
            Ok(a) if a.directory == directory => Some(a.credentials),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(file = %self.account_path().display(), "ACME account file unreadable, a new account will be made: {e}");
                None
            }
        }
    }

    pub fn save_account(&self, directory: &str, credentials: AccountCredentials) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(&StoredAccount { directory: directory.to_owned(), credentials })?;
        write_private(&self.account_path(), &json)
    }

    /// The stored certificate and key, if both are there and belong together.
    pub fn certificate(&self, provider: &CryptoProvider) -> Result<Option<CertifiedKey>, String> {
        let (cert, key) = (self.cert_path(), self.key_path());
        if !cert.exists() && !key.exists() {
            return Ok(None);
        }
        crate::net::tls::load_key(&cert, &key, provider).map(Some).map_err(|e| e.msg)
    }

    /// Keeps a new certificate: the key first, so a crash between the two
    /// leaves a pair that does not load (and is obtained again), never an
    /// old key served with a new certificate.
    pub fn save_certificate(&self, chain_pem: &str, key_pem: &str) -> std::io::Result<()> {
        write_private(&self.key_path(), key_pem.as_bytes())?;
        write_private(&self.cert_path(), chain_pem.as_bytes())
    }
}

/// Writes `bytes` to `path` whole or not at all, mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_private_and_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("turnd-acme-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let st = State::new(&dir.join("acme"));
        st.prepare().unwrap();
        let p = dir.join("acme/x.pem");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.join("acme")).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(!dir.join("acme/x.tmp").exists());
        // An existing directory others could read is made private.
        std::fs::set_permissions(dir.join("acme"), std::fs::Permissions::from_mode(0o755)).unwrap();
        st.prepare().unwrap();
        assert_eq!(std::fs::metadata(dir.join("acme")).unwrap().permissions().mode() & 0o777, 0o700);
        let provider = rustls::crypto::ring::default_provider();
        assert!(matches!(st.certificate(&provider), Ok(None)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
