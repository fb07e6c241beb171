//! Configuration: defaults, the generated secret, and errors that name the key.

use std::process::Command;

mod common;

fn check(toml: &str) -> (i32, String) {
    check_args(toml, &["--check-config"])
}

/// Runs turnd on `toml` with `args`; (exit status, stderr).
fn check_args(toml: &str, args: &[&str]) -> (i32, String) {
    let dir = common::temp_dir("config");
    let p = dir.join("turnd.toml");
    std::fs::write(&p, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnd")).arg("--config").arg(&p).args(args).env("STATE_DIRECTORY", &dir).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A config that a start on this host accepts: loopback listeners on free
/// ports, metrics off, relay on loopback; then `extra`.
fn local(extra: &str) -> String {
    format!(
        "[auth]\nsecrets = [\"s3cret\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{}\"\n\
         [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n[metrics]\nlisten = \"\"\n{extra}",
        common::free_port()
    )
}

#[test]
fn the_shipped_example_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/turnd.toml")).unwrap();
    assert_eq!(check(&text).0, 0);
}

#[test]
fn errors_name_the_key() {
    let cases: &[(&str, &str)] = &[
        ("[relay]\nports = \"70000-1\"\n", "relay.ports"),
        ("[relay]\nports = \"100-200\"\n", "relay.ports"),
        ("[relay]\nip = \"not-an-ip\"\n", "relay.ip"),
        ("[relay]\nip = \"0.0.0.0\"\n", "relay.ip"),
        ("[relay]\nexternal_ip = \"::1\"\n", "relay.external_ip"),
        ("[[listen]]\ntransport = \"sctp\"\naddress = \"0.0.0.0:3478\"\n", "listen[0].transport"),
        ("[[listen]]\ntransport = \"udp\"\naddress = \"0.0.0.0\"\n", "listen[0].address"),
        ("[[listen]]\ntransport = \"tls\"\naddress = \"0.0.0.0:443\"\n", "listen[0].transport"),
        ("[peers]\nallow = [\"10.0.0.0/40\"]\n", "peers.allow"),
        ("[peers]\ndeny = [\"nope\"]\n", "peers.deny"),
        ("[peers]\nallow = [\"203.0.113.10:0\"]\n", "peers.allow"),
        ("[peers]\nallow = [\"203.0.113.10:99999\"]\n", "peers.allow"),
        ("[peers]\nallow = [\"::1:10000\"]\n", "peers.allow"),
        ("[peers]\ndeny = [\"203.0.113.10:10000\"]\n", "peers.deny"),
        ("[tls]\ncert = \"c\"\nkey = \"k\"\nturn_names = [\"turn.example.com\"]\n", "tls.turn_names"),
        ("[tls]\ncert = \"c\"\nkey = \"k\"\n[tls.passthrough]\nbackend = \"127.0.0.1:8443\"\n", "tls.turn_names"),
        ("[tls]\ncert = \"c\"\nkey = \"k\"\nturn_names = [\"a b\"]\n[tls.passthrough]\nbackend = \"127.0.0.1:8443\"\n", "tls.turn_names"),
        ("[tls]\ncert = \"c\"\nkey = \"k\"\nturn_names = [\"t.example\"]\n[tls.passthrough]\nbackend = \"web:8443\"\n", "tls.passthrough.backend"),
        ("[tls]\ncert = \"c\"\nkey = \"k\"\nturn_names = [\"t.example\"]\n[tls.passthrough]\nbackend = \"127.0.0.1:8443\"\nproxy_protocol = \"v3\"\n", "tls.passthrough.proxy_protocol"),
        ("[tls]\ncert = \"c\"\nkey = \"k\"\nturn_names = [\"t.example\"]\n[tls.passthrough]\nbackend = \"127.0.0.1:8443\"\n", "tls.passthrough"),
        ("[tls]\ncert = \"c\"\nkey = \"k\"\nturn_names = [\"t.example\"]\n[tls.passthrough]\nbackend = \"127.0.0.1:8443\"\nport = 1\n", "port"),
        ("[limits]\nmax_lifetime = \"10s\"\n", "limits.max_lifetime"),
        ("[limits]\ndefault_lifetime = \"2h\"\n", "limits.default_lifetime"),
        ("[limits]\nmax_permissions = 0\n", "limits.max_permissions"),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("realm = \"has space\"\n", "realm"),
        ("realm = \"a-realm-of-33-characters.example1\"\n", "realm"),
        ("[limits]\nunauth_rate = 2000000\n", "limits.unauth_rate"),
        ("[limits]\nunauth_rate = -1\n", "unauth_rate"),
        ("[auth]\nsecrets = [\"\"]\n", "auth.secrets[0]"),
        ("[auth]\nsecret_file = \"/nonexistent/secret\"\n", "auth.secret_file"),
        ("[relya]\nports = \"1-2\"\n", "relya"),
        ("[limits]\nnonce_lifetime = 5\n", "nonce_lifetime"),
        ("[xdp]\nmode = \"fast\"\n", "xdp.mode"),
        ("[xdp]\ninterfaces = [\"eth0\", \"a/b\"]\n", "xdp.interfaces[1]"),
        ("[xdp]\ninterfaces = [\"eth0\", \"eth0\"]\n", "xdp.interfaces[1]"),
        #[cfg(not(feature = "xdp"))]
        ("[xdp]\ninterfaces = [\"eth0\"]\n", "built without the XDP fast path"),
    ];
    for (toml, key) in cases {
        let (rc, err) = check(toml);
        assert_eq!(rc, 2, "{toml:?} should fail");
        assert!(err.contains(key), "{toml:?}: message should name {key}: {err}");
    }
}

#[test]
fn exact_peer_addresses_are_accepted_in_allow() {
    let (rc, err) = check(&local("[peers]\nallow = [\"10.0.0.0/8\", \"127.0.0.1:10000\", \"[::1]:10000\"]\n"));
    assert_eq!(rc, 0, "{err}");
}

#[test]
fn a_passthrough_backend_that_does_not_listen_is_noted() {
    let dir = common::temp_dir("config-sni");
    common::make_cert(&dir, "cert.pem", "key.pem", "turn.example");
    let toml = local(&format!(
        "[[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:{}\"\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\nturn_names = [\"turn.example\"]\n\
         [tls.passthrough]\nbackend = \"127.0.0.1:{}\"\nproxy_protocol = \"v2\"\n",
        common::free_port(),
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        common::free_port()
    ));
    let (rc, err) = check(&toml);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("tls.passthrough.backend: nothing accepts connections"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_config_generates_and_keeps_a_secret() {
    let dir = std::env::temp_dir().join(format!("turnd-nocfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = || Command::new(env!("CARGO_BIN_EXE_turnd")).arg("--check-config").env("STATE_DIRECTORY", &dir).output().unwrap();
    assert!(run().status.success());
    let secret = std::fs::read_to_string(dir.join("secret")).unwrap();
    assert_eq!(secret.trim().len(), 64);
    assert!(secret.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(dir.join("secret")).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(run().status.success());
    assert_eq!(std::fs::read_to_string(dir.join("secret")).unwrap(), secret, "kept across restarts");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn strict_values_for_software_and_log_level() {
    let long = "x".repeat(128);
    let (rc, err) = check(&format!("software = \"{long}\"\n{}", local("")));
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("software"), "{err}");
    let ok = "x".repeat(127);
    assert_eq!(check(&format!("software = \"{ok}\"\n{}", local(""))).0, 0);
    for level in ["warning", "debug ", "turnd=loud", ""] {
        let (rc, err) = check(&local(&format!("[log]\nlevel = \"{level}\"\n")));
        assert_eq!(rc, 2, "{level:?} accepted");
        assert!(err.contains("log.level"), "{err}");
    }
    for level in ["warn", "info,turnd=debug", "off", "DEBUG"] {
        let (rc, err) = check(&local(&format!("[log]\nlevel = \"{level}\"\n")));
        assert_eq!(rc, 0, "{level:?}: {err}");
    }
    for bw in ["\"fast\"", "50", "\"200 Gbit/s\""] {
        let (rc, err) = check(&local(&format!("[limits]\nallocation_bandwidth = {bw}\n")));
        assert_eq!(rc, 2, "{bw} accepted");
        assert!(err.contains("allocation_bandwidth"), "{err}");
    }
}

#[test]
fn an_empty_file_is_noted() {
    let (rc, err) = check_args("", &["--check-config", "--file-only"]);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("is empty: running on the defaults"), "{err}");
}

/// A file meant for another host names that host's files: --file-only reads
/// none of them (a secret file that is not here, the admin token) and creates
/// nothing in the state directory.
#[test]
fn file_only_reads_and_creates_no_file_the_config_names() {
    let dir = common::temp_dir("config-file-only");
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let missing = dir.join("not-on-this-host");
    let run = |toml: &str| {
        let p = dir.join("turnd.toml");
        std::fs::write(&p, toml).unwrap();
        Command::new(env!("CARGO_BIN_EXE_turnd"))
            .arg("--config")
            .arg(&p)
            .args(["--check-config", "--file-only"])
            .env("STATE_DIRECTORY", &state)
            .output()
            .unwrap()
    };
    // The other host's secret file and admin token (metrics on by default).
    let toml = format!(
        "[auth]\nsecret_file = \"{}/secret\"\n[admin]\ntoken_file = \"{}/admin-token\"\n",
        missing.display(),
        missing.display()
    );
    let out = run(&toml);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("configuration ok"), "--file-only read a file the config names: {err}");
    // No secret and no token configured: nothing generated here either.
    let out = run("[[listen]]\ntransport = \"udp\"\naddress = \"0.0.0.0:3478\"\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let made: Vec<_> = std::fs::read_dir(&state).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(made.is_empty(), "--file-only created {made:?} in the state directory");
    assert!(!missing.exists());
    // The file itself is still checked.
    let out = run(&format!("{toml}[relay]\nports = \"70000-1\"\n"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("relay.ports"));
    // Without --file-only the check reads them, and names the key.
    let (rc, err) = check(&toml);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("auth.secret_file") && err.contains("not-on-this-host"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn addresses_must_be_on_this_host_and_ports_free() {
    // 198.18.0.0/15 is on no interface here.
    let (rc, err) = check(&local("").replace("ip = \"127.0.0.1\"", "ip = \"198.19.255.254\""));
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("relay.ip") && err.contains("not an address of this host"), "{err}");
    let (rc, err) = check(&local("[[listen]]\ntransport = \"tcp\"\naddress = \"198.19.255.254:3478\"\n"));
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("listen[1].address"), "{err}");
    // --file-only skips what depends on the host.
    assert_eq!(check_args(&local("").replace("ip = \"127.0.0.1\"", "ip = \"198.19.255.254\""), &["--check-config", "--file-only"]).0, 0);

    // A busy port names the program holding it, for a check and for a start.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let cfg = local(&format!("[[listen]]\ntransport = \"tcp\"\naddress = \"127.0.0.1:{port}\"\n"));
    let (rc, err) = check(&cfg);
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("listen[1].address") && err.contains("in use by") && err.contains(&format!("pid {}", std::process::id())), "{err}");
    let (rc, err) = check_args(&cfg, &[]);
    assert_eq!(rc, 2, "a start fails the same way: {err}");
    assert!(err.contains("listen[1].address"), "{err}");
    let (rc, err) = check(&local("").replace("[metrics]\nlisten = \"\"", &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"")));
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("metrics.listen"), "{err}");
}

#[test]
fn certificates_and_keys_are_loaded_and_matched() {
    let dir = common::temp_dir("certs");
    common::make_cert(&dir, "a.pem", "a.key", "a");
    common::make_cert(&dir, "b.pem", "b.key", "b");
    let run = |dir: &std::path::Path, cert: &str, key: &str, args: &[&str]| {
        let tls_port = common::free_port();
        check_args(
            &local(&format!(
                "[[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:{tls_port}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                dir.join(cert).display(),
                dir.join(key).display()
            )),
            args,
        )
    };
    let ok = run(&dir, "a.pem", "a.key", &["--check-config"]);
    assert_eq!(ok.0, 0, "{}", ok.1);
    assert!(ok.1.contains("expires on"), "a certificate valid for 2 days gets a warning: {}", ok.1);
    // DER, empty, encrypted.
    let der = Command::new("openssl").args(["x509", "-outform", "der", "-in"]).arg(dir.join("a.pem")).output().unwrap();
    std::fs::write(dir.join("a.der"), der.stdout).unwrap();
    std::fs::write(dir.join("empty.key"), "").unwrap();
    let enc = Command::new("openssl")
        .args(["pkey", "-aes256", "-passout", "pass:secret", "-in"])
        .arg(dir.join("a.key"))
        .arg("-out")
        .arg(dir.join("enc.key"))
        .output()
        .unwrap();
    assert!(enc.status.success());
    // Each error names the key of the file at fault.
    let cases = [
        ("missing.pem", "a.key", "tls.cert", "cannot read"),
        ("a.der", "a.key", "tls.cert", "DER, not PEM"),
        ("a.key", "a.pem", "tls.cert", "swapped"),
        ("a.pem", "missing.key", "tls.key", "cannot read"),
        ("a.pem", "b.key", "tls.key", "does not belong"),
        ("a.pem", "empty.key", "tls.key", "is empty"),
        ("a.pem", "enc.key", "tls.key", "encrypted"),
    ];
    for (cert, key, name, words) in cases {
        for args in [&["--check-config"][..], &[][..]] {
            let (rc, err) = run(&dir, cert, key, args);
            assert_eq!(rc, 2, "{cert} {key} {args:?}: {err}");
            assert!(err.contains(&format!("configuration error: {name}: ")) && err.contains(words), "{cert} {key} {args:?}: {err}");
        }
    }
    // Expired: made 10 days ago, valid for 2.
    let out = Command::new("faketime")
        .args(["-f", "-10d", "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .arg("-keyout")
        .arg(dir.join("old.key"))
        .arg("-out")
        .arg(dir.join("old.pem"))
        .args(["-subj", "/CN=old"])
        .output()
        .expect("faketime (test.sh installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (rc, err) = run(&dir, "old.pem", "old.key", &["--check-config"]);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("warning: tls.cert") && err.contains("expired on"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn warnings_for_open_secrets_and_a_wildcard_admin_listener() {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::temp_dir("warn");
    let secret = dir.join("secret");
    std::fs::write(&secret, "\u{feff}s3cret\r\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = local("").replace("secrets = [\"s3cret\"]", &format!("secret_file = \"{}\"", secret.display()));
    let (rc, err) = check(&cfg);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("auth.secret_file") && err.contains("readable by every user"), "{err}");
    assert!(err.contains("byte-order mark"), "{err}");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&secret, "s3cret\n").unwrap();
    let (rc, err) = check(&cfg);
    assert_eq!(rc, 0, "{err}");
    assert!(!err.contains("warning"), "no warning for a private, clean file: {err}");

    let m = common::free_port();
    let (rc, err) = check(&local("").replace("[metrics]\nlisten = \"\"", &format!("[metrics]\nlisten = \"0.0.0.0:{m}\"\n[admin]\ntoken_file = \"{}\"", dir.join("token").display())));
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("warning: metrics.listen") && err.contains("admin API"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_admin_section_is_documented_with_its_keys() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/turnd.toml")).unwrap();
    let section = text.split("\n[admin]\n").nth(1).expect("config/turnd.toml documents [admin]");
    let section = section.split("\n[").next().unwrap();
    for key in ["enabled = ", "token_file = "] {
        assert!(section.lines().any(|l| l.trim_start_matches("# ").starts_with(key)), "[admin] {key} is not documented");
    }
}

#[test]
fn a_passthrough_backend_that_is_turnds_own_listener_in_any_spelling_is_a_loop() {
    // --file-only binds nothing; a port below the default relay range.
    let port = 4443;
    for (listen, backend) in [
        ("127.0.0.1", format!("127.0.0.1:{port}")),
        ("127.0.0.1", format!("[::ffff:127.0.0.1]:{port}")),
        ("0.0.0.0", format!("[::ffff:127.0.0.1]:{port}")),
        ("0.0.0.0", format!("198.18.0.1:{port}")),
        ("[::]", format!("[::1]:{port}")),
    ] {
        let toml = format!(
            "[auth]\nsecrets = [\"s3cret\"]\n[[listen]]\ntransport = \"tls\"\naddress = \"{listen}:{port}\"\n\
             [tls]\ncert = \"c\"\nkey = \"k\"\nturn_names = [\"turn.example\"]\n[tls.passthrough]\nbackend = \"{backend}\"\n"
        );
        let (rc, err) = check_args(&toml, &["--check-config", "--file-only"]);
        assert_eq!(rc, 2, "{listen} {backend}: {err}");
        assert!(err.contains("tls.passthrough.backend") && err.contains("a loop"), "{listen} {backend}: {err}");
    }
    // Another port, or the other family on a wildcard listener, is no loop.
    let toml = format!(
        "[auth]\nsecrets = [\"s3cret\"]\n[[listen]]\ntransport = \"tls\"\naddress = \"0.0.0.0:{port}\"\n\
         [tls]\ncert = \"c\"\nkey = \"k\"\nturn_names = [\"turn.example\"]\n[tls.passthrough]\nbackend = \"[::1]:{port}\"\n"
    );
    let (_, err) = check_args(&toml, &["--check-config", "--file-only"]);
    assert!(!err.contains("a loop"), "{err}");
}

/// The shipped config with every commented example uncommented: a line
/// `# key = value` or `# [section]` whose text is TOML on its own (prose
/// that merely starts like a key is left alone). Trailing `# example`
/// remarks stay, as TOML comments.
fn uncommented_examples(text: &str) -> (String, usize) {
    let mut n = 0;
    let out = text
        .lines()
        .map(|l| {
            let Some(body) = l.strip_prefix("# ") else { return l.to_owned() };
            let header = body.starts_with('[') && body.trim_end().ends_with(']') && !body.contains(' ');
            let key_value = body.split_once(" = ").is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                && toml::from_str::<toml::Table>(body).is_ok();
            if header || key_value {
                n += 1;
                body.to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    (out, n)
}

#[test]
fn every_commented_example_in_the_shipped_config_parses_and_validates() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/turnd.toml")).unwrap();
    let (all, n) = uncommented_examples(&text);
    assert!(n >= 20, "only {n} commented examples found: the scan no longer matches the file");
    // The schema: every key known, every value of its type.
    if let Err(e) = turnd::config::parse_str(&all) {
        panic!("the shipped config with its examples uncommented does not parse: {e}\n{all}");
    }
    // And the whole file validates as a file for another host would (with
    // the example secret and admin token files in a temporary directory,
    // so nothing is written to /var/lib/turnd).
    let dir = common::temp_dir("examples");
    std::fs::write(dir.join("secret"), "example-secret-0123456789").unwrap();
    let all = all
        .replace("\"/etc/turnd/secret\"", &format!("\"{}\"", dir.join("secret").display()))
        .replace("\"/var/lib/turnd/admin-token\"", &format!("\"{}\"", dir.join("admin-token").display()));
    let all = all.replace("\"/var/lib/turnd/acme\"", &format!("\"{}\"", dir.join("acme").display()));
    let outside: Vec<&str> = all.lines().filter(|l| !l.starts_with('#') && l.contains("/var/lib/turnd")).collect();
    assert!(outside.is_empty(), "the check would write outside its directory: {outside:?}");
    // The certificate comes from files or from ACME, not both: the file
    // validates with either alternative's lines.
    let without = |skip: &dyn Fn(&str) -> bool| all.lines().filter(|l| !skip(l)).collect::<Vec<_>>().join("\n");
    let files = without(&|l| l.starts_with("[tls.acme]") || ["names = ", "contact = ", "directory = ", "state_dir = ", "ca_root = "].iter().any(|k| l.starts_with(k)));
    let acme = without(&|l| l.starts_with("cert = ") || l.starts_with("key = "));
    assert_ne!(files, acme);
    for (route, text) in [("certificate files", files), ("ACME", acme)] {
        let (rc, err) = check_args(&text, &["--check-config", "--file-only"]);
        assert_eq!(rc, 0, "{route}: {err}\n{text}");
    }
    let (rc, err) = check_args(&all, &["--check-config", "--file-only"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(rc, 2, "both routes at once are refused");
    assert!(err.contains("tls.acme") && err.contains("not both") || err.contains("remove one of them"), "{err}");
}

#[test]
fn tls_acme_is_checked_key_by_key() {
    let base = "[auth]\nsecrets = [\"s3cret\"]\n[[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:4443\"\n";
    for (tls, key, says) in [
        ("[tls]\ncert = \"c\"\nkey = \"k\"\n[tls.acme]\nnames = [\"turn.example.com\"]\n", "tls.acme", "remove one of them"),
        ("[tls]\ncert = \"c\"\n", "tls.key", "missing"),
        ("[tls]\n", "tls", "[tls.acme]"),
        ("[tls.acme]\nnames = []\n", "tls.acme.names", "must list"),
        ("[tls.acme]\nnames = [\"*.example.com\"]\n", "tls.acme.names", "DNS-01"),
        ("[tls.acme]\nnames = [\"198.51.100.7\"]\n", "tls.acme.names", "an address"),
        ("[tls.acme]\nnames = [\"turn\"]\n", "tls.acme.names", "not a DNS name"),
        ("[tls.acme]\nnames = [\"turn.example.com\"]\ncontact = \"not-an-address\"\n", "tls.acme.contact", "not an email address"),
        ("[tls.acme]\nnames = [\"turn.example.com\"]\ndirectory = \"http://ca.example/dir\"\n", "tls.acme.directory", "https://"),
        ("[tls.acme]\nnames = [\"turn.example.com\"]\nstate_dir = \"acme\"\n", "tls.acme.state_dir", "absolute"),
        ("[tls.acme]\nnames = [\"turn.example.com\"]\nrenew = true\n", "renew", "unknown field"),
    ] {
        let (rc, err) = check_args(&format!("{base}{tls}"), &["--check-config", "--file-only"]);
        assert_eq!(rc, 2, "{tls}: {err}");
        assert!(err.contains(key) && err.contains(says), "{tls}: expected {key}: {says}, got {err}");
    }
    // A good one, with Let's Encrypt staging by its short name.
    let ok = format!("{base}[tls.acme]\nnames = [\"Turn.Example.com.\"]\ncontact = \"mailto:ops@example.com\"\ndirectory = \"letsencrypt-staging\"\nstate_dir = \"/tmp/acme-x\"\n");
    let (rc, err) = check_args(&ok, &["--check-config", "--file-only"]);
    assert_eq!(rc, 0, "{err}");
}

#[test]
fn drain_alternates_are_checked_key_by_key() {
    let base = "[auth]\nsecrets = [\"s3cret\"]\n[[listen]]\ntransport = \"udp\"\naddress = \"192.0.2.10:3478\"\n[relay]\nip = \"192.0.2.10\"\n";
    for (drain, key, says) in [
        ("[[drain.alternate]]\naddress = \"turn2.example.com\"\n", "drain.alternate[0].address", "not an IP address"),
        ("[[drain.alternate]]\naddress = \"203.0.113.20:0\"\n", "drain.alternate[0].address", "port 0"),
        ("[[drain.alternate]]\naddress = \"0.0.0.0\"\n", "drain.alternate[0].address", "not an address a client can reach"),
        ("[[drain.alternate]]\naddress = \"192.0.2.10\"\n", "drain.alternate[0].address", "own listener"),
        ("[[drain.alternate]]\naddress = \"192.0.2.10:3478\"\n", "drain.alternate[0].address", "own listener"),
        (
            "[[drain.alternate]]\naddress = \"203.0.113.20\"\n[[drain.alternate]]\naddress = \"203.0.113.20\"\n",
            "drain.alternate[1].address",
            "listed twice",
        ),
        ("[[drain.alternate]]\naddress = \"203.0.113.20\"\ntls_clients = true\ndomain = \"not a name\"\n", "drain.alternate[0].domain", "not a DNS name"),
        ("[[drain.alternate]]\naddress = \"203.0.113.20\"\ndomain = \"turn2.example.com\"\n", "drain.alternate[0].domain", "needs tls_clients = true"),
        ("[[drain.alternate]]\naddress = \"203.0.113.20\"\ntls_clients = \"yes\"\n", "tls_clients", "invalid type"),
        ("[[drain.alternate]]\naddress = \"203.0.113.20\"\nport = 3478\n", "port", "unknown field"),
        ("[drain]\nalternates = [\"203.0.113.20\"]\n", "alternates", "unknown field"),
    ] {
        let (rc, err) = check_args(&format!("{base}{drain}"), &["--check-config", "--file-only"]);
        assert_eq!(rc, 2, "{drain}: {err}");
        assert!(err.contains(key) && err.contains(says), "{drain}: expected {key}: {says}, got {err}");
    }
    // Good ones: by IP (the port the client came in on), IP:PORT, IPv6, a
    // name for TLS clients; this relay's address on another port is a sibling.
    let ok = format!(
        "{base}[[drain.alternate]]\naddress = \"203.0.113.20\"\ntls_clients = true\ndomain = \"Turn2.Example.com.\"\n\
         [[drain.alternate]]\naddress = \"[2001:db8::20]:3478\"\n[[drain.alternate]]\naddress = \"192.0.2.10:3479\"\n"
    );
    let (rc, err) = check_args(&ok, &["--check-config", "--file-only"]);
    assert_eq!(rc, 0, "{err}");
    // A loopback sibling is allowed (for tests and local clients) with a warning.
    let (rc, err) = check_args(&format!("{base}[[drain.alternate]]\naddress = \"127.0.0.2\"\n"), &["--check-config", "--file-only"]);
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("drain.alternate[0].address") && err.contains("loopback"), "{err}");
}
