//! turnctl credentials: the TURN REST API algorithm, checked against an
//! independent computation (openssl's HMAC-SHA1, base64).

use std::process::Command;

fn turnctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_turnctl")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn openssl_rest_password(secret: &str, username: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("printf '%s' \"$U\" | openssl dgst -sha1 -hmac \"$S\" -binary | base64")
        .env("U", username)
        .env("S", secret)
        .output()
        .expect("openssl");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn field<'a>(text: &'a str, name: &str) -> &'a str {
    let key = format!("\"{name}\":");
    let at = text.find(&key).unwrap_or_else(|| panic!("no {name} in {text}")) + key.len();
    let rest = &text[at..];
    if let Some(r) = rest.strip_prefix('"') {
        &r[..r.find('"').unwrap()]
    } else {
        rest.split([',', '}']).next().unwrap()
    }
}

#[test]
fn credentials_json_matches_openssl_and_prosody_algorithm() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (rc, out, err) = turnctl(&["credentials", "--secret", "s3cr3t-value", "--user", "alice", "--ttl", "2h", "--host", "turn.example.com", "--json"]);
    assert_eq!(rc, 0, "{err}");
    let username = field(&out, "username");
    let (expiry, user) = username.split_once(':').unwrap();
    let expiry: u64 = expiry.parse().unwrap();
    assert_eq!(user, "alice");
    assert!((now + 7200..=now + 7202).contains(&expiry), "expiry {expiry} vs now {now}");
    assert_eq!(field(&out, "ttl"), "7200");
    assert_eq!(field(&out, "password"), openssl_rest_password("s3cr3t-value", username));
    assert!(out.contains("\"turns:turn.example.com:443?transport=tcp\""), "{out}");
    assert!(out.contains("\"turn:turn.example.com:3478?transport=udp\""), "{out}");
}

#[test]
fn credentials_without_user_and_from_a_secret_file() {
    let dir = std::env::temp_dir().join(format!("turnctl-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("secret");
    std::fs::write(&f, "# rotated in 2026\nfirst-secret\nsecond-secret\n").unwrap();
    let (rc, out, err) = turnctl(&["credentials", "--secret-file", f.to_str().unwrap(), "--ttl", "600"]);
    assert_eq!(rc, 0, "{err}");
    let username = out.lines().find_map(|l| l.strip_prefix("username: ")).unwrap();
    let password = out.lines().find_map(|l| l.strip_prefix("password: ")).unwrap();
    assert!(username.bytes().all(|b| b.is_ascii_digit()), "bare EXPIRY username: {username}");
    assert_eq!(password, openssl_rest_password("first-secret", username), "the first secret signs");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_arguments_are_explained() {
    let (rc, _, err) = turnctl(&["credentials", "--secret", "x", "--ttl", "soon"]);
    assert_eq!(rc, 2);
    assert!(err.contains("--ttl"), "{err}");
    let (rc, _, err) = turnctl(&["credentials", "--secret-file", "/nonexistent/secret"]);
    assert_eq!(rc, 2);
    assert!(err.contains("/nonexistent/secret"), "{err}");
    let (rc, out, _) = turnctl(&["secret"]);
    assert_eq!(rc, 0);
    assert_eq!(out.trim().len(), 64);
}

#[test]
fn ice_server_and_jitsi_env_formats() {
    let (rc, out, err) = turnctl(&["credentials", "--secret", "k", "--user", "bob", "--host", "turn.example.com", "--format", "ice"]);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    let s = &v[0];
    let username = s["username"].as_str().unwrap();
    assert!(username.ends_with(":bob"));
    assert_eq!(s["credential"].as_str().unwrap(), openssl_rest_password("k", username));
    let urls: Vec<&str> = s["urls"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    assert!(urls.contains(&"turns:turn.example.com:443?transport=tcp"), "{urls:?}");
    let (rc, out, err) = turnctl(&["credentials", "--secret", "k", "--host", "turn.example.com", "--ttl", "1h", "--format", "env"]);
    assert_eq!(rc, 0, "{err}");
    for line in ["TURN_CREDENTIALS=k", "TURN_HOST=turn.example.com", "TURNS_HOST=turn.example.com", "TURNS_PORT=443", "TURN_TTL=3600"] {
        assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
    }
    let (rc, _, err) = turnctl(&["credentials", "--secret", "k", "--format", "env"]);
    assert_eq!(rc, 2);
    assert!(err.contains("--host"), "{err}");
}

#[test]
fn the_secret_flag_says_others_can_read_it() {
    let (rc, out, _) = turnctl(&["credentials", "--help"]);
    assert_eq!(rc, 0);
    assert!(out.contains("process list") && out.contains("--secret-file"), "{out}");
}
