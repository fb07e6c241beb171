//! Debian's Firefox ESR, headless, on a page: a fresh profile whose
//! certificate store (NSS, `cert9.db` in the profile) trusts the CAs a
//! test gives, with prefs in its `user.js`. Include it from a test file that
//! also has `mod common;`, with `#[path = "common/firefox.rs"] mod firefox;`.
//! Needs the `firefox-esr` package and `certutil` (libnss3-tools); test.sh
//! installs both.
//!
//! What matters for WebRTC (Firefox ESR 153, Debian bookworm): without a
//! camera or microphone grant Firefox gathers only on the interface of its
//! default route towards the address the page came from, so the page must
//! come from a routed address (a loopback page gathers nothing at all);
//! `turns:` URLs need a host name, not an address.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common;

/// Prefs for every run: no first-run pages, no updates, telemetry or
/// other background traffic.
const PREFS: &[(&str, &str)] = &[
    ("browser.shell.checkDefaultBrowser", "false"),
    ("browser.startup.homepage_override.mstone", "\"ignore\""),
    ("startup.homepage_welcome_url", "\"\""),
    ("startup.homepage_welcome_url.additional", "\"\""),
    ("browser.aboutwelcome.enabled", "false"),
    ("datareporting.policy.dataSubmissionEnabled", "false"),
    ("datareporting.healthreport.uploadEnabled", "false"),
    ("toolkit.telemetry.reportingpolicy.firstRun", "false"),
    ("app.update.disabledForTesting", "true"),
    ("extensions.update.enabled", "false"),
    ("browser.safebrowsing.malware.enabled", "false"),
    ("browser.safebrowsing.phishing.enabled", "false"),
    ("network.captive-portal-service.enabled", "false"),
    ("network.connectivity-service.enabled", "false"),
    // The page's console in Firefox's output (kept in the log).
    ("devtools.console.stdout.content", "true"),
];

/// Builds the command that runs Firefox from its argv (e.g. in a network
/// namespace: `ip netns exec NAME` and the argv).
pub type Wrap<'a> = &'a dyn Fn(&[String]) -> Command;

/// A running Firefox in its own process group; the whole group is killed
/// and the profile removed on drop (also when the test panics).
pub struct Firefox {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl Firefox {
    /// Starts headless Firefox ESR on `url` with a fresh profile that trusts
    /// `cas` (PEM files) and has `prefs` (name, value as JavaScript: `true`,
    /// `3128`, `"text"`) on top of [`PREFS`]. `wrap` builds the command from
    /// the argv (e.g. to run it in a network namespace); `None` runs it as is.
    pub fn launch(url: &str, cas: &[&Path], prefs: &[(&str, String)], wrap: Option<Wrap>) -> Firefox {
        assert!(
            installed(),
            "firefox-esr is missing: this test needs Debian's `firefox-esr` package \
             (test.sh installs it: apt-get install -y firefox-esr)"
        );
        let dir = common::temp_dir("firefox");
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile).unwrap();
        let db = format!("sql:{}", profile.display());
        certutil(&["-N", "-d", &db, "--empty-password"]);
        for (i, ca) in cas.iter().enumerate() {
            certutil(&["-A", "-d", &db, "-t", "C,,", "-n", &format!("test-ca-{i}"), "-i", ca.to_str().unwrap()]);
        }
        let mut user_js = String::new();
        for (k, v) in PREFS.iter().map(|(k, v)| (*k, v.to_string())).chain(prefs.iter().map(|(k, v)| (*k, v.clone()))) {
            user_js += &format!("user_pref(\"{k}\", {v});\n");
        }
        std::fs::write(profile.join("user.js"), user_js).unwrap();
        let log = dir.join("firefox.log");
        let argv: Vec<String> = ["firefox-esr", "--headless", "--no-remote", "--profile", profile.to_str().unwrap(), url]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut cmd = match wrap {
            Some(w) => w(&argv),
            None => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        let out = std::fs::File::create(&log).expect("create the firefox log");
        // Its caches and the like go to the test's directory, not root's home.
        cmd.env("HOME", &dir)
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        Firefox { child, dir, log }
    }

    /// Whether Firefox has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines of Firefox's own output (the page's console included).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Firefox {
    fn drop(&mut self) {
        // The content, socket and GPU processes go with it.
        common::kill_group(&mut self.child);
        common::keep_log(&self.log, &format!("firefox-{}.log", self.child.id()));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn installed() -> bool {
    common::on_path("firefox-esr")
}

/// Runs NSS's certutil (bounded by `timeout`), failing the test when it fails.
pub fn certutil(args: &[&str]) {
    let out = Command::new("timeout")
        .args(["10", "certutil"])
        .args(args)
        .output()
        .expect("run certutil (Debian's libnss3-tools; test.sh installs it)");
    assert!(out.status.success(), "certutil {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
