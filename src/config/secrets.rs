//! Secrets and the state directory: secret files (one secret a line), the
//! secret and admin token turnd generates when none is configured, and
//! where it keeps them.

use std::path::{Path, PathBuf};

use super::{bad, ConfigError};

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
pub(super) fn readable_by_others(path: &Path, key: &str) -> Option<String> {
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

pub(super) fn load_or_create_secret_at(path: &Path, key: &str) -> Result<SecretFile, ConfigError> {
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
