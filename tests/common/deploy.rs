//! Helpers for the deploy tests: a private copy of deploy/ to run
//! deploy/setup.sh in, reading the KEY=VALUE files it writes, and the Python
//! interpreter ./test.sh prepares. Included with
//! `#[path = "common/deploy.rs"] mod deploy;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Files deploy/setup.sh writes (relative to deploy/); never copied, so every
/// test starts from what a fresh checkout has.
const GENERATED: &[&str] = &[
    "site.env",
    "turn/.env",
    "turn/etc",
    "jitsi/.env",
    "jitsi/prosody-external-services.cfg.lua",
    "jitsi/config",
];

/// Copies the repository's deploy/ (without generated files) to `dir/deploy`
/// and returns that path.
pub fn copy_deploy(dir: &Path) -> PathBuf {
    fn walk(src: &Path, dst: &Path, rel: &Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if GENERATED.iter().any(|g| Path::new(g) == r) {
                continue;
            }
            let (s, d) = (e.path(), dst.join(e.file_name()));
            if e.file_type().unwrap().is_dir() {
                walk(&s, &d, &r);
            } else {
                // Keeps the mode (the scripts stay executable).
                std::fs::copy(&s, &d).unwrap();
            }
        }
    }
    let dst = dir.join("deploy");
    walk(&repo().join("deploy"), &dst, Path::new(""));
    dst
}

/// Runs `deploy/setup.sh ARGS` in the copy, non-interactively, with turnctl
/// from this build and none of the answer variables inherited from the
/// caller's environment. Bounded: 60 s.
pub fn setup(deploy: &Path, args: &[&str]) -> Output {
    setup_env(deploy, args, &[("TURNCTL", env!("CARGO_BIN_EXE_turnctl"))])
}

pub fn setup_env(deploy: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("timeout");
    c.arg("60").arg(deploy.join("setup.sh")).arg("--non-interactive").args(args).stdin(std::process::Stdio::null());
    for k in [
        "MEET_DOMAIN", "TURN_DOMAIN", "MEET_IP", "TURN_IP", "ACME_EMAIL", "TURN_PORT", "TURNS_PORT", "RELAY_PORTS",
        "TURN_TTL", "TURNCTL",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run deploy/setup.sh")
}

/// Fails with setup.sh's output unless it succeeded.
pub fn ok(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "deploy/setup.sh failed ({}):\n{text}", out.status);
    text
}

/// KEY=VALUE lines of a .env-style file (comments and blank lines skipped;
/// the last assignment wins, as in docker compose).
pub fn read_env(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .collect()
}

/// The first secret in a secret file (blank lines and # comments skipped).
pub fn first_secret(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .find(|l| !l.is_empty())
        .expect("a secret")
        .to_owned()
}

/// The Python of the repository's virtualenv (.venv, created by ./test.sh
/// with slixmpp and PyYAML).
pub fn python() -> PathBuf {
    let p = repo().join(".venv/bin/python3");
    assert!(
        p.exists(),
        "{} is missing: ./test.sh creates it (python3 -m venv .venv && .venv/bin/pip install slixmpp PyYAML)",
        p.display()
    );
    p
}

/// Whether a command is on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).output().map(|o| o.status.success()).unwrap_or(false)
}

/// base64(HMAC-SHA1(secret, username)) computed by openssl, independently of turnd and prosody.
pub fn openssl_rest_password(secret: &str, username: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("printf '%s' \"$2\" | openssl dgst -sha1 -hmac \"$1\" -binary | openssl base64 -A")
        .arg("sh")
        .arg(secret)
        .arg(username)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Converts YAML (every document of a file) to JSON with the virtualenv's PyYAML.
pub fn yaml_to_json(path: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("timeout")
        .arg("30")
        .arg(python())
        .arg("-c")
        .arg("import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))")
        .arg(path)
        .output()
        .expect("run python");
    assert!(out.status.success(), "YAML parse of {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}
