//! The deploy files: deploy/setup.sh in a private copy of deploy/ (both sides
//! from one set of answers, one secret, a second run changes nothing), the
//! relay config it renders (its certificate by ACME, or from files as
//! documented, turnd accepts both; the firewall rules open exactly its
//! ports), the prosody entries (numeric ports), the compose files
//! (`docker-compose config`, then the keys that matter), the Kubernetes
//! DaemonSet and the docs' references.

mod common;
#[path = "common/deploy.rs"]
mod deploy;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const MEET: &str = "meet.example.com";
const TURN: &str = "turn.example.com";
const MEET_IP: &str = "198.51.100.20";
const TURN_IP: &str = "203.0.113.10";

const ANSWERS: &[&str] = &[
    "--meet-domain", MEET,
    "--turn-domain", TURN,
    "--meet-ip", MEET_IP,
    "--turn-ip", TURN_IP,
    "--email", "ops@example.com",
];

/// A temporary directory holding a copy of deploy/, removed when dropped.
struct Site {
    dir: PathBuf,
    deploy: PathBuf,
}

impl Site {
    fn new(name: &str) -> Site {
        let dir = common::temp_dir(name);
        let deploy = deploy::copy_deploy(&dir);
        Site { dir, deploy }
    }

    /// A copy set up with ANSWERS.
    fn set_up(name: &str) -> Site {
        let s = Site::new(name);
        deploy::ok(&deploy::setup(&s.deploy, ANSWERS));
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.deploy.join(rel)
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read deploy/{rel}: {e}"))
    }

    fn jitsi_env(&self) -> BTreeMap<String, String> {
        deploy::read_env(&self.path("jitsi/.env"))
    }

    fn secret(&self) -> String {
        deploy::first_secret(&self.path("turn/etc/secret"))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every file and directory under `root`: content, mode, owner and mtime.
/// Each file under a tree: (content, mode, uid, gid, mtime s, mtime ns), by path.
type Snapshot = BTreeMap<String, (Vec<u8>, u32, u32, u32, i64, i64)>;

fn snapshot(root: &Path) -> Snapshot {
    fn walk(root: &Path, p: &Path, out: &mut Snapshot) {
        let m = std::fs::symlink_metadata(p).unwrap();
        let content = if m.is_file() { std::fs::read(p).unwrap() } else { Vec::new() };
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        out.insert(rel, (content, m.mode(), m.uid(), m.gid(), m.mtime(), m.mtime_nsec()));
        if m.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(root, &e.unwrap().path(), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_same(a: &Snapshot, b: &Snapshot, what: &str) {
    let keys_a: BTreeSet<_> = a.keys().collect();
    let keys_b: BTreeSet<_> = b.keys().collect();
    assert_eq!(keys_a, keys_b, "{what}: files were added or removed");
    for (k, va) in a {
        assert!(va == &b[k], "{what}: deploy/{k} changed (content, mode, owner or mtime)");
    }
}

fn is_hex_secret(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[test]
fn setup_writes_both_sides_from_one_secret_and_a_rerun_changes_nothing() {
    let site = Site::new("deploy-setup");
    let first = deploy::ok(&deploy::setup(&site.deploy, ANSWERS));
    assert!(first.contains(&format!("with {}", env!("CARGO_BIN_EXE_turnctl"))), "turnctl secret was not used:\n{first}");
    for f in ["site.env", "turn/etc/secret", "turn/etc/turnd.toml", "turn/.env", "jitsi/.env", "jitsi/prosody-external-services.cfg.lua"] {
        assert!(site.path(f).is_file(), "setup.sh did not write deploy/{f}:\n{first}");
    }
    // It prints the DNS records and both machines' firewall rules.
    assert!(first.contains(&format!("{MEET}.  A  {MEET_IP}")), "DNS record for the site:\n{first}");
    assert!(first.contains(&format!("{TURN}.  A  {TURN_IP}")), "DNS record for the relay:\n{first}");
    assert!(first.contains("ufw allow 3478/udp") && first.contains("ufw allow 10000/udp"), "firewall rules:\n{first}");
    // Its closing steps name everything a fresh VPS needs, in order: the
    // firewall with SSH kept, the relay's start (which gets its certificate
    // by ACME: no certbot) and how to watch that, and the Jitsi data directories.
    let next = first.split("Next").nth(1).unwrap_or_else(|| panic!("no closing \"Next\" steps:\n{first}"));
    let mut at = 0;
    for step in [
        "deploy/setup.sh",
        "ufw allow OpenSSH && deploy/turn/ufw.sh && ufw enable",
        "docker compose up -d --build",
        "Let's Encrypt",
        "turnctl status",
        "/readyz",
        "turnctl check",
        "ufw allow OpenSSH && ./ufw.sh && ufw enable",
        "chown -R 1000:1000 config",
        "docker compose up -d",
    ] {
        let i = next[at..].find(step).unwrap_or_else(|| panic!("\"Next\" lacks {step:?} (in order):\n{next}"));
        at += i + step.len();
    }
    assert!(
        !next.contains("certbot certonly") && !next.contains("apt-get install certbot"),
        "the relay gets its certificate itself; \"Next\" still runs certbot:\n{next}"
    );
    assert!(!next.contains("TURNS_PORT is"), "no port note with TURNS_PORT 443:\n{next}");

    // One secret, generated by turnctl, on both sides.
    let secret = site.secret();
    assert!(is_hex_secret(&secret), "secret {secret:?} is not 32 random bytes in hex");
    let env = site.jitsi_env();
    assert_eq!(env["TURN_CREDENTIALS"], secret, "TURN_CREDENTIALS in jitsi/.env differs from turn/etc/secret");
    for (k, v) in [
        ("TURN_HOST", TURN), ("TURNS_HOST", TURN), ("TURN_PORT", "3478"), ("TURNS_PORT", "443"),
        ("TURN_TRANSPORT", "udp,tcp"), ("TURN_TTL", "86400"), ("PUBLIC_URL", "https://meet.example.com"),
        ("JVB_ADVERTISE_IPS", MEET_IP), ("MEET_DOMAIN", MEET),
    ] {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "jitsi/.env {k}");
    }
    for k in ["JICOFO_AUTH_PASSWORD", "JVB_AUTH_PASSWORD"] {
        assert!(env[k].len() >= 32, "jitsi/.env {k} was not generated");
    }
    // Secrets are not world-readable.
    let mode = |f: &str| std::fs::metadata(site.path(f)).unwrap().mode() & 0o777;
    assert_eq!(mode("jitsi/.env"), 0o600);
    assert_eq!(mode("turn/etc/secret"), 0o640);
    assert_eq!(mode("jitsi/prosody-external-services.cfg.lua"), 0o600);
    if is_root() {
        let gid = std::fs::metadata(site.path("turn/etc/secret")).unwrap().gid();
        assert_eq!(gid, 65532, "as root, the relay's files belong to the container's group");
    }

    // Twice more: with the same flags, and with no answers at all (they come
    // from site.env). Not a byte, mode or mtime changes.
    let before = snapshot(&site.deploy);
    let again = deploy::ok(&deploy::setup(&site.deploy, ANSWERS));
    assert!(again.contains("Nothing changed"), "second run reported changes:\n{again}");
    assert_same(&before, &snapshot(&site.deploy), "second run with the same answers");
    deploy::ok(&deploy::setup(&site.deploy, &[]));
    assert_same(&before, &snapshot(&site.deploy), "third run with the saved answers");
    // Answers from the environment work the same way.
    let env_answers = [
        ("MEET_DOMAIN", MEET), ("TURN_DOMAIN", TURN), ("MEET_IP", MEET_IP), ("TURN_IP", TURN_IP),
        ("ACME_EMAIL", "ops@example.com"), ("TURNCTL", env!("CARGO_BIN_EXE_turnctl")),
    ];
    deploy::ok(&deploy::setup_env(&site.deploy, &[], &env_answers));
    assert_same(&before, &snapshot(&site.deploy), "run with answers from the environment");
}

#[test]
fn setup_keeps_the_secret_rotates_it_on_request_and_refuses_two_secrets() {
    let site = Site::set_up("deploy-secret");
    let secret = site.secret();

    // A changed answer changes the rendered files, never the secret.
    deploy::ok(&deploy::setup(&site.deploy, &["--turn-ip", "203.0.113.77"]));
    assert!(site.read("turn/etc/turnd.toml").contains("external_ip = \"203.0.113.77\""));
    assert_eq!(site.secret(), secret);
    assert_eq!(site.jitsi_env()["TURN_CREDENTIALS"], secret);
    assert_eq!(site.jitsi_env()["MEET_DOMAIN"], MEET, "the other answers were kept");

    // Rotation: the relay accepts the new and the old secret, prosody signs with the new one.
    deploy::ok(&deploy::setup(&site.deploy, &["--rotate-secret"]));
    let lines: Vec<String> = site.read("turn/etc/secret").lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "new and old secret: {lines:?}");
    assert_eq!(lines[1], secret);
    assert!(is_hex_secret(&lines[0]) && lines[0] != secret);
    assert_eq!(site.jitsi_env()["TURN_CREDENTIALS"], lines[0]);
    let before = snapshot(&site.deploy);
    deploy::ok(&deploy::setup(&site.deploy, &[]));
    assert_same(&before, &snapshot(&site.deploy), "run after rotation");

    // The operator drops the old secret from the relay: still consistent.
    std::fs::write(site.path("turn/etc/secret"), format!("{}\n", lines[0])).unwrap();
    deploy::ok(&deploy::setup(&site.deploy, &[]));
    assert_eq!(site.jitsi_env()["TURN_CREDENTIALS"], lines[0]);

    // Two unrelated secrets (a .env from another site, say): refused, nothing written.
    let env_path = site.path("jitsi/.env");
    let env_text = std::fs::read_to_string(&env_path).unwrap();
    std::fs::write(&env_path, env_text.replace(&lines[0], &"ab".repeat(32))).unwrap();
    let before = snapshot(&site.deploy);
    let out = deploy::setup(&site.deploy, &[]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("differ"), "mismatched secrets were not refused: {text}");
    assert_same(&before, &snapshot(&site.deploy), "refused run");

    // Only the Jitsi .env present (copied from the other machine): its secret is adopted.
    let other = Site::new("deploy-secret-copy");
    std::fs::create_dir_all(other.path("jitsi")).unwrap();
    std::fs::copy(site.path("site.env"), other.path("site.env")).unwrap();
    std::fs::write(other.path("jitsi/.env"), format!("TURN_CREDENTIALS={}\n", "cd".repeat(32))).unwrap();
    deploy::ok(&deploy::setup(&other.deploy, &[]));
    assert_eq!(other.secret(), "cd".repeat(32));
}

/// Copies `files` (relative to deploy/, a directory whole) from `from` into a
/// fresh copy of deploy/, as an operator copies part of a set-up checkout.
fn partial_copy(from: &Site, name: &str, files: &[&str]) -> Site {
    let to = Site::new(name);
    for f in files {
        let out = Command::new("cp").arg("-a").arg(from.path(f)).arg(to.path(f)).output().unwrap();
        assert!(out.status.success(), "cp deploy/{f}: {}", String::from_utf8_lossy(&out.stderr));
    }
    to
}

/// Re-runs on copies that hold part of a set-up site (the relay's files, the
/// Jitsi .env, only the answers) keep what the first run generated: the
/// shared secret and the internal XMPP passwords, of which no second version
/// is made anywhere.
#[test]
fn a_rerun_on_a_partial_copy_keeps_the_secret_and_the_internal_passwords() {
    let site = Site::set_up("deploy-partial");
    let secret = site.secret();
    let env = site.jitsi_env();
    let passwords = |e: &BTreeMap<String, String>| (e["JICOFO_AUTH_PASSWORD"].clone(), e["JVB_AUTH_PASSWORD"].clone());

    // The relay's copy (deploy/README.md, step 4): turn/etc and site.env.
    let relay = partial_copy(&site, "deploy-partial-relay", &["site.env", "turn/etc"]);
    let text = deploy::ok(&deploy::setup(&relay.deploy, &[]));
    assert!(
        !relay.path("jitsi/.env").exists(),
        "a re-run on the relay's copy wrote a jitsi/.env (internal passwords {:?}, the site's are {:?}):\n{text}",
        passwords(&relay.jitsi_env()),
        passwords(&env)
    );
    for f in ["jitsi/prosody-external-services.cfg.lua", "jitsi/config"] {
        assert!(!relay.path(f).exists(), "a re-run on the relay's copy wrote deploy/{f}:\n{text}");
    }
    assert!(text.contains("Left out the Jitsi side"), "it says what it left out:\n{text}");
    assert_eq!(relay.secret(), secret);
    for f in ["turn/etc/secret", "turn/etc/turnd.toml"] {
        assert_eq!(relay.read(f), site.read(f), "deploy/{f} on the relay's copy");
    }
    let before = snapshot(&relay.deploy);
    deploy::ok(&deploy::setup(&relay.deploy, &[]));
    assert_same(&before, &snapshot(&relay.deploy), "second re-run on the relay's copy");
    // Rotating there would leave prosody signing with the old secret: refused, nothing written.
    let out = deploy::setup(&relay.deploy, &["--rotate-secret"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--rotate-secret"), "rotation without jitsi/.env");
    assert_same(&before, &snapshot(&relay.deploy), "refused rotation on the relay's copy");

    // The Jitsi side's copy: site.env and jitsi/.env. Both passwords and the secret are kept.
    let jitsi = partial_copy(&site, "deploy-partial-jitsi", &["site.env", "jitsi/.env"]);
    deploy::ok(&deploy::setup(&jitsi.deploy, &[]));
    assert_eq!(jitsi.read("jitsi/.env"), site.read("jitsi/.env"), "jitsi/.env changed on a re-run of the Jitsi side's copy");
    assert_eq!(jitsi.secret(), secret);

    // A .env that lost one password gets only that one new; the other stays.
    let edited: String = site.read("jitsi/.env").lines().filter(|l| !l.starts_with("JVB_AUTH_PASSWORD=")).map(|l| format!("{l}\n")).collect();
    std::fs::write(jitsi.path("jitsi/.env"), edited).unwrap();
    deploy::ok(&deploy::setup(&jitsi.deploy, &[]));
    let (jicofo, jvb) = passwords(&jitsi.jitsi_env());
    assert_eq!(jicofo, env["JICOFO_AUTH_PASSWORD"], "JICOFO_AUTH_PASSWORD was there and must stay");
    assert!(jvb.len() >= 32 && jvb != env["JVB_AUTH_PASSWORD"], "the missing JVB_AUTH_PASSWORD is generated");

    // Only the answers: no secret to keep, and a new one would match nothing.
    let bare = partial_copy(&site, "deploy-partial-bare", &["site.env"]);
    let before = snapshot(&bare.deploy);
    let out = deploy::setup(&bare.deploy, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("set up before") && err.contains("delete"), "a copy with no secret: {err}");
    assert_same(&before, &snapshot(&bare.deploy), "refused run on a copy with only site.env");
}

#[test]
fn setup_generates_the_secret_with_openssl_when_turnctl_is_not_built() {
    let site = Site::new("deploy-openssl");
    // No turnctl on PATH (system directories only) and none built next to the copy.
    let out = deploy::setup_env(&site.deploy, ANSWERS, &[("PATH", "/usr/bin:/bin")]);
    assert!(deploy::ok(&out).contains("with openssl rand"), "the fallback was not used");
    let secret = site.secret();
    assert!(is_hex_secret(&secret), "fallback secret {secret:?}");
    assert_eq!(site.jitsi_env()["TURN_CREDENTIALS"], secret);
}

#[test]
fn setup_refuses_bad_answers_and_names_them() {
    let site = Site::new("deploy-bad");
    let cases: &[(&[&str], &str)] = &[
        (&["--meet-domain", MEET, "--turn-domain", TURN, "--meet-ip", MEET_IP, "--turn-ip", TURN_IP], "--email"),
        (&["--turn-port", "34x"], "TURN_PORT"),
        (&["--turn-ip", "203.0.113.300"], "TURN_IP"),
        (&["--turn-domain", MEET], "must differ"),
        (&["--relay-ports", "400-60000"], "RELAY_PORTS"),
        (&["--turns-port", "50000"], "contains the listener port 50000"),
        (&["--bogus"], "unknown argument"),
    ];
    for (args, needle) in cases {
        // The complete answers first, then the case's override (the last flag wins).
        let mut all: Vec<&str> = if needle == &"--email" { Vec::new() } else { ANSWERS.to_vec() };
        all.extend_from_slice(args);
        let out = deploy::setup(&site.deploy, &all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(needle), "{args:?}: the message does not name {needle:?}: {err}");
        assert!(!site.path("jitsi/.env").exists(), "{args:?}: files written despite the error");
    }
}

#[test]
fn rendered_relay_config_is_accepted_and_the_firewall_opens_exactly_its_ports() {
    let site = Site::set_up("deploy-relay");
    let path = site.path("turn/etc/turnd.toml");

    // turnd itself accepts the production config: the file alone, since its
    // certificate and addresses belong to the relay host (the secret file is
    // at its in-container path in the config, so point it at the copy).
    let state = site.dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let check_file_only = |config: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_turnd"))
            .arg("--config")
            .arg(config)
            .arg("--secret-file")
            .arg(site.path("turn/etc/secret"))
            .args(["--check-config", "--file-only"])
            .env("STATE_DIRECTORY", &state)
            .output()
            .unwrap();
        assert!(out.status.success(), "turnd --check-config on {}: {}", config.display(), String::from_utf8_lossy(&out.stderr));
    };
    check_file_only(&path);

    let cfg: toml::Table = site.read("turn/etc/turnd.toml").parse().unwrap();
    assert_eq!(cfg["realm"].as_str(), Some(TURN));
    assert_eq!(cfg["auth"]["secret_file"].as_str(), Some("/etc/turnd/secret"));
    assert_eq!(cfg["relay"]["external_ip"].as_str(), Some(TURN_IP));
    assert_eq!(cfg["relay"]["ports"].as_str(), Some("49152-65535"));
    assert_eq!(cfg["metrics"]["listen"].as_str(), Some("127.0.0.1:9641"), "metrics on loopback only");
    // The certificate by ACME: turnd obtains it for the relay's name, with
    // the operator's address as the contact, and keeps it in its state
    // directory (the compose file's `state` volume, the unit's StateDirectory).
    let tls = cfg["tls"].as_table().expect("a [tls] table");
    assert!(tls.get("cert").is_none() && tls.get("key").is_none(), "certificate files by default: {tls:?}");
    let acme = tls["acme"].as_table().expect("[tls.acme]");
    assert_eq!(acme["names"].as_array().unwrap(), &vec![toml::Value::from(TURN)], "tls.acme.names");
    assert_eq!(acme["contact"].as_str(), Some("ops@example.com"), "tls.acme.contact");
    assert!(acme["state_dir"].as_str().unwrap().starts_with("/var/lib/turnd/"), "tls.acme.state_dir in the state volume: {acme:?}");
    assert!(acme.get("directory").is_none(), "Let's Encrypt's production directory by default: {acme:?}");

    // The documented switch to certificate files: delete the [tls.acme]
    // table, uncomment the [tls] table below it. turnd accepts that too, with
    // the files where compose's commented mount and the certbot hook put them.
    let rendered = site.read("turn/etc/turnd.toml");
    let mut in_acme = false;
    let mut files = String::new();
    for line in rendered.lines() {
        if line.starts_with('[') {
            in_acme = line == "[tls.acme]";
        }
        if in_acme && (line == "[tls.acme]" || ["names", "contact", "state_dir"].iter().any(|k| line.starts_with(&format!("{k} =")))) {
            continue;
        }
        let line = match line.strip_prefix("# ") {
            Some(l) if l == "[tls]" || l.starts_with("cert = ") || l.starts_with("key = ") => l,
            _ => line,
        };
        files.push_str(line);
        files.push('\n');
    }
    let files_cfg: toml::Table = files.parse().unwrap_or_else(|e| panic!("the config switched to certificate files: {e}\n{files}"));
    assert!(files_cfg["tls"].get("acme").is_none(), "[tls.acme] is gone");
    let hook_dir = "/etc/turnd/tls/";
    for (k, f) in [("cert", "fullchain.pem"), ("key", "privkey.pem")] {
        assert_eq!(files_cfg["tls"][k].as_str(), Some(format!("{hook_dir}{f}").as_str()), "tls.{k} where the hook puts it");
    }
    let compose = site.read("turn/compose.yaml");
    assert!(
        compose.lines().any(|l| l.trim() == "# - ${TURND_TLS_DIR:-/etc/turnd/tls}:/etc/turnd/tls:ro"),
        "compose.yaml keeps the certificate-files mount as a comment"
    );
    let files_path = site.dir.join("turnd-files.toml");
    std::fs::write(&files_path, &files).unwrap();
    check_file_only(&files_path);
    let listeners: BTreeSet<String> = cfg["listen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| format!("{} {}", l["transport"].as_str().unwrap(), l["address"].as_str().unwrap()))
        .collect();
    let expect: BTreeSet<String> =
        ["udp 0.0.0.0:3478", "tcp 0.0.0.0:3478", "tls 0.0.0.0:443"].iter().map(|s| s.to_string()).collect();
    assert_eq!(listeners, expect);

    // ufw: one rule per listener (TLS is TCP) and the relay range, nothing else.
    let out = Command::new(site.path("turn/ufw.sh")).arg("--print").output().unwrap();
    assert!(out.status.success());
    let ports: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            assert!(l.starts_with("ufw allow "), "unexpected firewall command {l:?}");
            l.split_whitespace().nth(2).unwrap().to_owned()
        })
        .collect();
    let mut want: BTreeSet<String> = cfg["listen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let port = l["address"].as_str().unwrap().rsplit_once(':').unwrap().1;
            let proto = if l["transport"].as_str() == Some("udp") { "udp" } else { "tcp" };
            format!("{port}/{proto}")
        })
        .collect();
    want.insert(format!("{}/udp", cfg["relay"]["ports"].as_str().unwrap().replace('-', ":")));
    // No TCP 80: the ACME challenge (TLS-ALPN-01) arrives on the TLS listener.
    assert_eq!(ports, want, "firewall rules vs. the relay's listeners and port range");

    // TLS on another port than 443: Let's Encrypt still validates on 443,
    // and setup.sh says so.
    let text = deploy::ok(&deploy::setup(&site.deploy, &["--turns-port", "5349"]));
    assert!(text.contains("TURNS_PORT is 5349") && text.contains("Certificate files instead"), "no note on ACME and port 443:\n{text}");
}

#[test]
fn prosody_entries_have_numeric_ports() {
    assert!(deploy::have("lua5.4"), "lua5.4 is missing: ./test.sh installs prosody, which brings it");
    let site = Site::set_up("deploy-lua");
    let lua = site.read("jitsi/prosody-external-services.cfg.lua");
    let quoted = lua.lines().any(|l| l.trim_start().starts_with("port = \"") || l.contains(" port = \""));
    assert!(!quoted, "a quoted port:\n{lua}");
    // Lua itself: every entry's port is an integer, as prosody requires.
    let out = Command::new("lua5.4")
        .arg("-e")
        .arg(format!(
            "dofile('{}'); for _, s in ipairs(external_services) do \
             print(s.type, s.host, math.type(s.port), s.port, s.transport, tostring(s.secret), tostring(s.algorithm)) end; \
             print('secret', type(external_service_secret))",
            site.path("jitsi/prosody-external-services.cfg.lua").display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "lua: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(|l| l.replace('\t', " ")).collect();
    assert_eq!(
        lines,
        [
            format!("stun {TURN} integer 3478 udp nil nil"),
            format!("turn {TURN} integer 3478 udp true turn"),
            format!("turn {TURN} integer 3478 tcp true turn"),
            format!("turns {TURN} integer 443 tcp true turn"),
            "secret string".to_owned(),
        ]
    );

    // Several relays sharing the secret: comma lists become one entry per host.
    let env = site.path("jitsi/.env");
    let text = std::fs::read_to_string(&env).unwrap();
    let multi = site.dir.join("multi.env");
    std::fs::write(
        &multi,
        text.replace(&format!("TURN_HOST={TURN}"), "TURN_HOST=turn1.example.com,turn2.example.com")
            .replace(&format!("TURNS_HOST={TURN}"), "TURNS_HOST=turn1.example.com,turn2.example.com"),
    )
    .unwrap();
    let out = Command::new(site.path("jitsi/external-services.sh")).arg(&multi).output().unwrap();
    let lua = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(lua.matches("type = \"turn\"").count(), 4, "2 hosts x udp,tcp:\n{lua}");
    assert_eq!(lua.matches("type = \"turns\"").count(), 2, "2 TURNS hosts:\n{lua}");

    // A quoted or non-numeric port is an error, not a silently dropped entry.
    std::fs::write(&multi, text.replace("TURN_PORT=3478", "TURN_PORT=3478/udp")).unwrap();
    let out = Command::new(site.path("jitsi/external-services.sh")).arg(&multi).output().unwrap();
    assert!(!out.status.success(), "a non-numeric port was accepted");
}

/// `${NAME}` and `${NAME:-default}` from `env`, as compose interpolates.
fn interpolate(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').expect("closing brace") + i;
        let inner = &rest[i + 2..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        let v = env.get(name).filter(|v| !v.is_empty()).cloned().or(default.map(str::to_owned)).unwrap_or_default();
        out.push_str(&v);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The compose file as the engine would see it: `docker-compose config` when
/// installed, else PyYAML plus our own interpolation of .env. Returns the
/// services with `environment` as a map.
fn resolved_compose(dir: &Path) -> BTreeMap<String, Value> {
    let env = deploy::read_env(&dir.join(".env"));
    let mut services: BTreeMap<String, Value> = if deploy::have("docker-compose") {
        let out = Command::new("timeout")
            .args(["60", "docker-compose", "config"])
            .current_dir(dir)
            .output()
            .expect("run docker-compose");
        assert!(out.status.success(), "docker-compose config in {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
        let resolved = dir.join("resolved.yaml");
        std::fs::write(&resolved, &out.stdout).unwrap();
        let doc = deploy::yaml_to_json(&resolved).remove(0);
        doc["services"].as_object().unwrap().clone().into_iter().collect()
    } else {
        eprintln!("docker-compose is not installed: checking {} with PyYAML only", dir.display());
        let doc = deploy::yaml_to_json(&dir.join("compose.yaml")).remove(0);
        let text = serde_json::to_string(&doc).unwrap();
        let doc: Value = serde_json::from_str(&interpolate(&text, &env)).unwrap();
        doc["services"].as_object().unwrap().clone().into_iter().collect()
    };
    for svc in services.values_mut() {
        if let Some(list) = svc.get("environment").and_then(Value::as_array).cloned() {
            let map: serde_json::Map<String, Value> = list
                .iter()
                .filter_map(|v| v.as_str())
                .filter_map(|name| env.get(name).map(|v| (name.to_owned(), Value::String(v.clone()))))
                .collect();
            svc["environment"] = Value::Object(map);
        }
    }
    services
}

fn ports_of(svc: &Value) -> Vec<String> {
    // docker-compose 1.29 prints long syntax ({published, target, protocol}); short strings otherwise.
    svc.get("ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| match p {
                    Value::String(s) => s.clone(),
                    p => format!(
                        "{}:{}/{}",
                        p["published"].as_u64().map(|v| v.to_string()).or(p["published"].as_str().map(str::to_owned)).unwrap_or_default(),
                        p["target"],
                        p.get("protocol").and_then(Value::as_str).unwrap_or("tcp")
                    ),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_files_parse_and_wire_the_relay_into_prosody() {
    let site = Site::set_up("deploy-compose");
    let env = site.jitsi_env();
    let secret = site.secret();

    // The relay.
    let turn = resolved_compose(&site.path("turn"));
    let t = &turn["turnd"];
    assert_eq!(t["network_mode"], "host");
    assert_eq!(t["user"], "65532:65532", "non-root");
    assert_eq!(t["cap_add"], serde_json::json!(["NET_BIND_SERVICE"]));
    assert_eq!(t["cap_drop"], serde_json::json!(["ALL"]));
    assert_eq!(t["read_only"], true);
    let volumes: Vec<String> = t["volumes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    let etc = volumes.iter().find(|v| v.contains(":/etc/turnd:")).expect("etc mounted at /etc/turnd");
    let host_etc = etc.split(':').next().unwrap();
    assert!(
        Path::new(host_etc) == site.path("turn/etc") || host_etc == "./etc",
        "/etc/turnd comes from deploy/turn/etc: {etc}"
    );
    assert!(etc.ends_with(":ro"));
    // turnd's state: a named volume at /var/lib/turnd, writable (the root
    // file system is read-only), declared at the top level.
    let state = volumes.iter().find(|v| v.split(':').nth(1) == Some("/var/lib/turnd")).expect("a volume at /var/lib/turnd");
    let source = state.split(':').next().unwrap();
    assert!(!state.ends_with(":ro"), "/var/lib/turnd must be writable: {state}");
    assert!(!source.starts_with('/') && !source.starts_with('.'), "a named volume (filled from the image, owner included): {state}");
    let raw_turn = deploy::yaml_to_json(&deploy::repo().join("deploy/turn/compose.yaml")).remove(0);
    assert!(raw_turn["volumes"].get(source).is_some(), "volume {source} is not declared: {raw_turn}");
    // The certificate comes by ACME into that volume: no certificate files
    // are mounted by default (the mount stays in compose.yaml as a comment).
    assert!(!volumes.iter().any(|v| v.contains("/etc/turnd/tls")), "a certificate-files mount by default: {volumes:?}");
    assert_eq!(volumes.len(), 2, "config and state only: {volumes:?}");
    let context = t["build"]["context"].as_str().unwrap();
    let context = if Path::new(context).is_absolute() { PathBuf::from(context) } else { site.path("turn").join(context) };
    let dockerfile = t["build"]["dockerfile"].as_str().unwrap();
    assert!(context.join(dockerfile).is_file(), "no {dockerfile} in the build context {}", context.display());
    // In the checkout, that context is the repository root (the sources).
    let raw = deploy::yaml_to_json(&deploy::repo().join("deploy/turn/compose.yaml")).remove(0);
    let raw_context = deploy::repo().join("deploy/turn").join(raw["services"]["turnd"]["build"]["context"].as_str().unwrap());
    assert!(raw_context.join("Cargo.toml").is_file() && raw_context.join(dockerfile).is_file());
    let df = site.read("turn/Dockerfile");
    assert_eq!(df.lines().filter(|l| l.starts_with("FROM ")).count(), 2, "multi-stage Dockerfile");
    assert!(df.contains("USER 65532:65532") && df.contains("distroless") && df.contains("setcap cap_net_bind_service"));
    // The image's state directory: the container user's, 0700, where turnd looks.
    assert!(df.lines().any(|l| l == "ENV STATE_DIRECTORY=/var/lib/turnd"), "STATE_DIRECTORY in the image");
    assert!(df.contains("install -d -m 0700 /out/var/lib/turnd"), "the state directory is made 0700 in the build stage");
    // Copied as a directory (the contents of its parent), so that it keeps
    // its mode and takes the owner: a directory whose contents are copied is
    // created 0755.
    assert!(df.lines().any(|l| l == "COPY --from=build --chown=65532:65532 /out/var/lib/ /var/lib/"), "owned by the container user");
    assert!(site.read("turn/Dockerfile.dockerignore").lines().any(|l| l.trim() == "*"), "the build context is filtered");

    // The Jitsi stack.
    let jitsi = resolved_compose(&site.path("jitsi"));
    let names: BTreeSet<&str> = jitsi.keys().map(String::as_str).collect();
    assert_eq!(names, ["caddy", "jicofo", "jvb", "prosody", "web"].into_iter().collect());
    let tag = &env["JITSI_IMAGE_VERSION"];
    assert!(
        tag.strip_prefix("stable-").is_some_and(|t| t.split('-').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))),
        "JITSI_IMAGE_VERSION {tag} is not a pinned stable tag"
    );
    for svc in ["web", "prosody", "jicofo", "jvb"] {
        assert_eq!(jitsi[svc]["image"], format!("ghcr.io/jitsi/{svc}:{tag}"), "{svc} image");
    }
    let caddy_image = jitsi["caddy"]["image"].as_str().unwrap();
    assert!(caddy_image.starts_with("caddy:2.") && caddy_image.matches('.').count() == 2, "pinned Caddy: {caddy_image}");
    // The defaults in compose.yaml name the same tag as the .env template.
    let raw = site.read("jitsi/compose.yaml");
    assert_eq!(raw.matches(&format!("JITSI_IMAGE_VERSION:-{tag}}}")).count(), 4, "compose defaults pin {tag}");

    let p = &jitsi["prosody"]["environment"];
    assert_eq!(p["TURN_CREDENTIALS"], secret.as_str(), "prosody signs with the relay's secret");
    for (k, v) in [("TURN_HOST", TURN), ("TURNS_HOST", TURN), ("TURN_PORT", "3478"), ("TURNS_PORT", "443"), ("TURN_TRANSPORT", "udp,tcp")] {
        assert_eq!(p[k], v, "prosody {k}");
    }
    assert!(p["TURN_TTL"].as_str().unwrap().bytes().all(|b| b.is_ascii_digit()));
    for (name, svc) in &jitsi {
        if name != "prosody" {
            assert!(svc["environment"].get("TURN_CREDENTIALS").is_none(), "{name} gets the TURN secret");
        }
    }
    let web = &jitsi["web"]["environment"];
    assert_eq!(web["PUBLIC_URL"], format!("https://{MEET}"), "no trailing slash (Cal.com appends /<booking id>)");
    assert_eq!(web["DISABLE_HTTPS"], "1", "Caddy terminates TLS");
    assert_eq!(jitsi["jvb"]["environment"]["JVB_ADVERTISE_IPS"], MEET_IP);
    // The bridge offers its public address only: its container's private
    // address would reach the relay as a (refused) peer.
    assert_eq!(env.get("JVB_ADVERTISE_PRIVATE_CANDIDATES").map(String::as_str), Some("0"), "jitsi/.env");
    assert_eq!(jitsi["jvb"]["environment"]["JVB_ADVERTISE_PRIVATE_CANDIDATES"], "0", "jvb's environment");
    // Variables go only to the containers whose templates read them
    // (docker-jitsi-meet stable-11146-2: ENABLE_LOBBY in prosody's
    // jitsi-meet.cfg.lua; PUBLIC_URL in web's and prosody's templates, none of jvb's).
    for (svc, var) in [("web", "ENABLE_LOBBY"), ("jvb", "PUBLIC_URL"), ("jicofo", "PUBLIC_URL")] {
        let raw_env = &deploy::yaml_to_json(&site.path("jitsi/compose.yaml"))[0]["services"][svc]["environment"];
        assert!(!raw_env.as_array().unwrap().iter().any(|v| v == var), "{svc} is given {var}, which its image ignores");
    }
    let jvb_ports = ports_of(&jitsi["jvb"]);
    assert!(jvb_ports.iter().any(|p| p.starts_with("10000:10000") && p.ends_with("/udp")), "jvb publishes UDP 10000: {jvb_ports:?}");
    let caddy_ports = ports_of(&jitsi["caddy"]);
    for want in ["80:80/tcp", "443:443/tcp"] {
        assert!(caddy_ports.iter().any(|p| p == want || format!("{p}/tcp") == want), "caddy publishes {want}: {caddy_ports:?}");
    }
    for (svc, internal) in [("jicofo", "8888"), ("jvb", "8080")] {
        for p in ports_of(&jitsi[svc]).iter().filter(|p| p.contains(&format!(":{internal}"))) {
            assert!(p.starts_with("127.0.0.1:") || !p.contains(':'), "{svc} REST port published beyond loopback: {p}");
        }
    }
    let caddyfile = site.read("jitsi/Caddyfile");
    assert!(caddyfile.contains("{$MEET_DOMAIN}") && caddyfile.contains("reverse_proxy web:8000"));
}

#[test]
fn kubernetes_daemonset_runs_the_relay_with_its_secret_probes_and_scrape_annotations() {
    let docs = deploy::yaml_to_json(&deploy::repo().join("deploy/k8s/turnd-daemonset.yaml"));
    let find = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}")).clone();
    let ds = find("DaemonSet");
    assert_eq!(ds["apiVersion"], "apps/v1");
    let pod = &ds["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"], ds["spec"]["selector"]["matchLabels"]);
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/path"], "/metrics");
    let spec = &pod["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    let c = &spec["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let metrics_port = ann["prometheus.io/port"].as_str().unwrap().to_owned();
    assert_eq!(c["livenessProbe"]["httpGet"]["port"].to_string(), metrics_port);
    assert_eq!(c["readinessProbe"]["httpGet"]["port"].to_string(), metrics_port);
    assert_eq!(c["securityContext"]["capabilities"]["add"], serde_json::json!(["NET_BIND_SERVICE"]));

    // The secret comes from a Kubernetes Secret, mounted where the config reads it.
    let volumes = spec["volumes"].as_array().unwrap();
    let secret_vol = volumes.iter().find(|v| v["secret"]["secretName"] == "turnd-secret").expect("a Secret volume");
    let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == secret_vol["name"]).unwrap();
    let toml_text = find("ConfigMap")["data"]["turnd.toml"].as_str().unwrap().to_owned();
    let cfg: toml::Table = toml_text.parse().unwrap();
    let secret_file = cfg["auth"]["secret_file"].as_str().unwrap();
    assert!(secret_file.starts_with(&format!("{}/", mount["mountPath"].as_str().unwrap())), "{secret_file} is not in the Secret mount");
    assert_eq!(cfg["metrics"]["listen"].as_str().unwrap().rsplit_once(':').unwrap().1, metrics_port);
    let ports: BTreeSet<String> = c["ports"].as_array().unwrap().iter().map(|p| format!("{}/{}", p["containerPort"], p["protocol"].as_str().unwrap())).collect();
    for l in cfg["listen"].as_array().unwrap() {
        let port = l["address"].as_str().unwrap().rsplit_once(':').unwrap().1;
        let proto = if l["transport"].as_str() == Some("udp") { "UDP" } else { "TCP" };
        assert!(ports.contains(&format!("{port}/{proto}")), "listener {port}/{proto} not declared: {ports:?}");
    }

    // turnd accepts the ConfigMap's configuration.
    let dir = common::temp_dir("deploy-k8s");
    let cfg_path = dir.join("turnd.toml");
    std::fs::write(&cfg_path, &toml_text).unwrap();
    std::fs::write(dir.join("secret"), "0123456789abcdef0123456789abcdef\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnd"))
        .arg("--config")
        .arg(&cfg_path)
        .arg("--secret-file")
        .arg(dir.join("secret"))
        .args(["--check-config", "--file-only"])
        .env("STATE_DIRECTORY", &dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "turnd --check-config on the ConfigMap: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn docs_name_the_pinned_release_the_tools_and_the_systemd_route() {
    let repo = deploy::repo();
    let read = |p: &str| std::fs::read_to_string(repo.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let template = read("deploy/jitsi/env.template");
    let tag = template.lines().find_map(|l| l.strip_prefix("JITSI_IMAGE_VERSION=")).expect("a pinned tag").trim().to_owned();
    let readme = read("deploy/README.md");
    for needle in [
        tag.as_str(),
        "turnctl check",
        "--secret-file",
        "--json",
        "deploy/systemd/turnd.service",
        "deploy/k8s/turnd-daemonset.yaml",
        "trailing slash",
        "TURN_HOST",
        "one-way",
    ] {
        assert!(readme.contains(needle), "deploy/README.md does not mention {needle:?}");
    }
    let turn_readme = read("deploy/turn/README.md");
    assert!(turn_readme.contains("deploy/systemd/turnd.service"), "deploy/turn/README.md must point to the systemd unit");
    // The systemd route lists every step itself, in order, with the config
    // setup.sh wrote; the example config, which would replace it (and its
    // secret), is not one of them.
    let route = turn_readme.split("## The systemd route").nth(1).expect("a systemd route section");
    let block = route.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("its commands");
    let mut at = 0;
    for step in [
        "cargo build --release",
        "install -m 0755 target/release/turnd target/release/turnctl /usr/local/bin/",
        "install -m 0644 deploy/systemd/turnd.service /etc/systemd/system/",
        "groupadd --system ssl-cert",
        "install -d -m 0750 -g ssl-cert /etc/turnd",
        "install -m 0640 -g ssl-cert deploy/turn/etc/turnd.toml deploy/turn/etc/secret /etc/turnd/",
        "turnd --config /etc/turnd/turnd.toml --check-config",
        "systemctl daemon-reload && systemctl enable --now turnd",
        "turnctl status",
    ] {
        let i = block[at..].find(step).unwrap_or_else(|| panic!("the systemd route lacks {step:?} (in order):\n{block}"));
        at += i + step.len();
    }
    assert!(!block.contains("config/turnd.toml"), "the systemd route installs the example config over setup.sh's:\n{block}");
    assert!(!block.contains("certbot"), "setup.sh's config gets its certificate by ACME; the systemd route runs certbot:\n{block}");
    assert!(repo.join("deploy/systemd/turnd.service").is_file());
    for script in ["deploy/setup.sh", "deploy/turn/ufw.sh", "deploy/jitsi/ufw.sh", "deploy/jitsi/external-services.sh", "deploy/turn/certbot-deploy-hook.sh"] {
        let m = std::fs::metadata(repo.join(script)).unwrap();
        assert!(m.mode() & 0o111 != 0, "{script} is not executable");
        let out = Command::new("bash").arg("-n").arg(repo.join(script)).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Wherever the deploy docs (and setup.sh's closing words) tell the operator
/// to restart prosody, they say that it interrupts the meetings in progress.
#[test]
fn docs_say_that_restarting_prosody_interrupts_meetings() {
    let repo = deploy::repo();
    for doc in ["deploy/README.md", "deploy/turn/README.md", "deploy/setup.sh"] {
        let text = std::fs::read_to_string(repo.join(doc)).unwrap();
        // A paragraph, or one row of a table (or one echo block of the script).
        let units = text.split("\n\n").flat_map(|p| if p.starts_with('|') { p.lines().collect() } else { vec![p] });
        let mut seen = 0;
        for unit in units.filter(|u| u.contains("up -d prosody")) {
            seen += 1;
            assert!(unit.contains("interrupts") && unit.contains("meeting"), "{doc}: a prosody restart without its cost:\n{unit}");
        }
        assert!(seen > 0, "{doc} no longer restarts prosody anywhere: update this test");
    }
}

/// The container's user and group (deploy/turn/Dockerfile, compose.yaml).
const CONTAINER_ID: u32 = 65532;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether uid/gid 65532 (no supplementary groups) can read `path` (and, for
/// a directory, enter it), asked of the kernel by running `test` as that user.
fn container_can_read(path: &Path) -> bool {
    let flag = if path.is_dir() { "-x" } else { "-r" };
    let out = Command::new("setpriv")
        .arg(format!("--reuid={CONTAINER_ID}"))
        .arg(format!("--regid={CONTAINER_ID}"))
        .arg("--clear-groups")
        .args(["--", "test", flag])
        .arg(path)
        .output()
        .expect("run setpriv (util-linux)");
    out.status.success()
}

#[test]
fn setup_leaves_the_relay_files_readable_by_the_container_also_after_a_copy() {
    if !is_root() {
        eprintln!("not root: file ownership cannot be checked");
        return;
    }
    let site = Site::set_up("deploy-perms");
    let files = ["turn/etc", "turn/etc/tls", "turn/etc/secret", "turn/etc/turnd.toml"];
    for f in files {
        assert!(container_can_read(&site.path(f)), "set up as root: uid/gid {CONTAINER_ID} cannot read deploy/{f}");
    }
    // Generated elsewhere and copied over with scp: the files now belong to
    // the user who copied them, group included.
    let out = Command::new("chown").arg("-R").arg("4321:4321").arg(site.path("turn/etc")).output().unwrap();
    assert!(out.status.success());
    assert!(!container_can_read(&site.path("turn/etc/secret")), "the simulated copy kept the container's access");
    // setup.sh again, as root on the relay, with the answers saved in site.env.
    let text = deploy::ok(&deploy::setup(&site.deploy, &[]));
    for f in files {
        assert!(container_can_read(&site.path(f)), "after a copy and a re-run: uid/gid {CONTAINER_ID} cannot read deploy/{f}:\n{text}");
    }
    let m = std::fs::metadata(site.path("turn/etc/secret")).unwrap();
    assert_eq!(m.mode() & 0o007, 0, "the secret is not for everyone");
}

/// Runs deploy/turn/certbot-deploy-hook.sh as certbot would, for a lineage in
/// `dir/live` and the TLS directory `tls`.
fn run_hook(dir: &Path, tls: &Path, group: Option<&str>) -> String {
    let mut c = Command::new("timeout");
    c.arg("30")
        .arg(deploy::repo().join("deploy/turn/certbot-deploy-hook.sh"))
        .env("RENEWED_LINEAGE", dir.join("live"))
        .env("TURND_TLS_DIR", tls)
        .env_remove("TURND_TLS_GROUP");
    if let Some(g) = group {
        c.env("TURND_TLS_GROUP", g);
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "certbot-deploy-hook.sh: {text}");
    text
}

#[test]
fn certbot_hook_installs_a_key_the_container_can_read_in_every_order() {
    if !is_root() {
        eprintln!("not root: the hook installs files as root; not checked");
        return;
    }
    let dir = common::temp_dir("deploy-hook");
    let _cleanup = RemoveOnDrop(dir.clone());
    // certbot's lineage: the key readable by root only.
    let live = dir.join("live");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::write(live.join("fullchain.pem"), "CHAIN 1\n").unwrap();
    std::fs::write(live.join("privkey.pem"), "KEY 1\n").unwrap();
    std::fs::set_permissions(live.join("privkey.pem"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let check = |tls: &Path, gid: u32, what: &str| {
        for f in ["fullchain.pem", "privkey.pem"] {
            let m = std::fs::metadata(tls.join(f)).unwrap();
            assert_eq!((m.uid(), m.gid()), (0, gid), "{what}: owner of {f}");
        }
        let key = std::fs::metadata(tls.join("privkey.pem")).unwrap();
        assert_eq!(key.mode() & 0o777, 0o640, "{what}: the key is for root and the group only");
        if gid == CONTAINER_ID {
            assert!(container_can_read(tls), "{what}: the container cannot enter {}", tls.display());
            assert!(container_can_read(&tls.join("privkey.pem")), "{what}: the container cannot read the key");
            assert!(container_can_read(&tls.join("fullchain.pem")), "{what}: the container cannot read the chain");
        }
        assert!(!tls.join(".privkey.pem.new").exists(), "{what}: a temporary file was left");
    };

    // 1. certbot first: the directory does not exist yet.
    let tls = dir.join("tls-first");
    run_hook(&dir, &tls, None);
    check(&tls, CONTAINER_ID, "hook before compose");
    // ...and a renewal later keeps it so.
    std::fs::write(live.join("privkey.pem"), "KEY 2\n").unwrap();
    run_hook(&dir, &tls, None);
    check(&tls, CONTAINER_ID, "renewal");
    assert_eq!(std::fs::read_to_string(tls.join("privkey.pem")).unwrap(), "KEY 2\n");

    // 2. `docker compose up` first: Docker created the missing bind-mount
    // source as root:root 0755.
    let tls = dir.join("tls-docker");
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::set_permissions(&tls, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    Command::new("chown").arg("0:0").arg(&tls).status().unwrap();
    run_hook(&dir, &tls, None);
    check(&tls, CONTAINER_ID, "compose before the hook");

    // 3. A group chosen for the systemd route at the first issue is kept at renewals.
    let tls = dir.join("tls-systemd");
    run_hook(&dir, &tls, Some("4242"));
    check(&tls, 4242, "first issue with TURND_TLS_GROUP");
    run_hook(&dir, &tls, None);
    check(&tls, 4242, "renewal without TURND_TLS_GROUP");
}

/// Removes a directory when dropped, also when an assertion fails.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn kubernetes_steps_create_the_namespace_before_what_lives_in_it() {
    // The documented steps: the `kubectl` lines in the DaemonSet file's header comment.
    let manifest = deploy::repo().join("deploy/k8s/turnd-daemonset.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let steps: Vec<String> = text
        .lines()
        .take_while(|l| l.starts_with('#') || l.trim().is_empty())
        .filter_map(|l| l.trim_start_matches('#').trim().strip_prefix("kubectl ").map(str::to_owned))
        .collect();
    assert!(steps.len() >= 4, "no kubectl steps in the header of {}: {steps:?}", manifest.display());

    // Run them against a model of the cluster: namespaces, and (namespace, kind, name) objects.
    let mut namespaces: BTreeSet<String> = BTreeSet::new();
    let mut objects: BTreeSet<(String, String, String)> = BTreeSet::new();
    let mut applied_daemonset = false;
    for step in &steps {
        let words: Vec<&str> = step.split_whitespace().collect();
        match words.as_slice() {
            ["apply", "-f", file] => {
                for doc in deploy::yaml_to_json(&deploy::repo().join(file)) {
                    let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{file}: an object without kind"));
                    assert!(doc["apiVersion"].is_string(), "{file}: {kind} without apiVersion");
                    let name = doc["metadata"]["name"].as_str().unwrap_or_else(|| panic!("{file}: {kind} without a name"));
                    if kind == "Namespace" {
                        assert!(doc["metadata"].get("namespace").is_none(), "a Namespace is not namespaced");
                        namespaces.insert(name.to_owned());
                        continue;
                    }
                    let ns = doc["metadata"]["namespace"].as_str().unwrap_or_else(|| panic!("{file}: {kind} {name} names no namespace"));
                    assert!(namespaces.contains(ns), "`kubectl {step}`: {kind} {name} goes into namespace {ns}, which no earlier step created");
                    if kind == "DaemonSet" {
                        // Everything its pods mount exists before they start.
                        for v in doc["spec"]["template"]["spec"]["volumes"].as_array().unwrap() {
                            for (key, field, k) in [("secret", "secretName", "Secret"), ("configMap", "name", "ConfigMap")] {
                                if let Some(n) = v[key][field].as_str() {
                                    assert!(
                                        objects.contains(&(ns.to_owned(), k.to_owned(), n.to_owned())),
                                        "the DaemonSet mounts {k} {ns}/{n}, which no earlier step created"
                                    );
                                }
                            }
                        }
                        applied_daemonset = true;
                    }
                    objects.insert((ns.to_owned(), kind.to_owned(), name.to_owned()));
                }
            }
            ["-n", ns, "create", "secret", _type, name, ..] => {
                assert!(namespaces.contains(*ns), "`kubectl {step}` runs before namespace {ns} exists");
                objects.insert((ns.to_string(), "Secret".to_owned(), name.to_string()));
            }
            ["label", "node", ..] => {}
            _ => panic!("a step the check does not know: kubectl {step}"),
        }
    }
    assert!(applied_daemonset, "no step applies the DaemonSet: {steps:?}");
}

#[test]
fn docs_troubleshoot_peer_refusals_without_opening_a_private_range() {
    let readme = std::fs::read_to_string(deploy::repo().join("deploy/README.md")).unwrap();
    let row = readme.lines().find(|l| l.contains("No audio or video for anyone")).expect("the no-media row");
    let step = row.split("turnd_peer_refusals_total").nth(1).expect("the row explains turnd_peer_refusals_total");
    assert!(step.contains("JVB_ADVERTISE_PRIVATE_CANDIDATES"), "the peer-refusal step does not point at the bridge's setting: {step}");
    assert!(!step.contains("[peers] allow") || step.contains("never"), "the peer-refusal step tells the operator to allow a peer range: {step}");
    // Which prosody the tests run and which the pinned image runs.
    let deb = format!("turnd_{}_amd64.deb", env!("CARGO_PKG_VERSION"));
    for needle in ["prosody 0.12", "prosody 13", "renew", "?transport=udp", "forceTurnRelay", "deploy/debian/build-deb.sh", &deb] {
        assert!(readme.contains(needle), "deploy/README.md does not mention {needle:?}");
    }
}

/// The relay's certificate in both deploy guides: by ACME (no certbot
/// --standalone, no port 80 on the relay), watched and renewed with turnctl,
/// alerted on by the rules; certbot with DNS-01 and the hook as the
/// documented alternative.
#[test]
fn docs_get_the_relay_certificate_by_acme_with_certbot_files_as_the_alternative() {
    let repo = deploy::repo();
    for doc in ["deploy/README.md", "deploy/turn/README.md"] {
        let text = std::fs::read_to_string(repo.join(doc)).unwrap();
        for needle in [
            "TLS-ALPN-01",
            "turnctl status",
            "turnctl cert renew",
            "/readyz",
            "turnd-rules.yaml",
            "Certificate files instead",
            "DNS-01",
            "certbot-deploy-hook.sh",
        ] {
            assert!(text.contains(needle), "{doc} does not mention {needle:?}");
        }
        for stale in ["--standalone", "80/tcp", "apt-get install certbot\n"] {
            assert!(!text.contains(stale), "{doc} still has {stale:?}: certbot's HTTP-01 route for the relay");
        }
    }
    // The alternative's certbot command installs the hook.
    let turn = std::fs::read_to_string(repo.join("deploy/turn/README.md")).unwrap();
    let alt = turn.split("### Certificate files instead").nth(1).expect("a \"Certificate files instead\" section");
    let cmd = alt.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("its commands");
    assert!(cmd.contains("certbot certonly --dns-") && cmd.contains("--deploy-hook /opt/turnd/deploy/turn/certbot-deploy-hook.sh"), "{cmd}");
}
