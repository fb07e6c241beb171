//! Configuration: defaults, the generated secret, and errors that name the key.

use std::process::Command;

fn check(toml: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("turnd-config-{}-{}", std::process::id(), toml.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("turnd.toml");
    std::fs::write(&p, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnd")).arg("--config").arg(&p).arg("--check-config").env("STATE_DIRECTORY", &dir).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
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
    ];
    for (toml, key) in cases {
        let (rc, err) = check(toml);
        assert_eq!(rc, 2, "{toml:?} should fail");
        assert!(err.contains(key), "{toml:?}: message should name {key}: {err}");
    }
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
