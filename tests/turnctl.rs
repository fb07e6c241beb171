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

/// Evaluates prosody's Lua settings in `file` with Lua 5.4 (what prosody
/// runs on): the secret, then one line per external service, sorted.
fn lua_services(file: &std::path::Path) -> (String, Vec<String>) {
    let out = Command::new("timeout")
        .args(["10", "lua5.4", "-e"])
        .arg(format!(
            "dofile('{}'); print(external_service_secret); for _, s in ipairs(external_services) do \
             print(s.type, s.host, math.type(s.port), s.port, s.transport, s.ttl, tostring(s.secret), tostring(s.algorithm)) end",
            file.display()
        ))
        .output()
        .expect("lua5.4 (./test.sh installs prosody, which brings it)");
    assert!(out.status.success(), "lua: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).replace('\t', " ");
    let mut lines = text.lines().map(str::to_owned);
    let secret = lines.next().unwrap_or_default();
    let mut services: Vec<String> = lines.collect();
    services.sort();
    (secret, services)
}

#[test]
fn one_relay_prints_what_it_always_printed() {
    let (rc, out, err) = turnctl(&["credentials", "--secret", "k", "--host", "turn.example.com", "--ttl", "1h", "--format", "env"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        out,
        "TURN_CREDENTIALS=k\nTURN_HOST=turn.example.com\nTURN_PORT=3478\nTURN_TRANSPORT=udp,tcp\nTURNS_HOST=turn.example.com\nTURNS_PORT=443\nTURN_TTL=3600\n"
    );
    let (rc, out, err) = turnctl(&["credentials", "--secret", "k", "--host", "turn.example.com", "--format", "ice"]);
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(
        v[0]["urls"],
        serde_json::json!(["turn:turn.example.com:3478?transport=udp", "turn:turn.example.com:3478?transport=tcp", "turns:turn.example.com:443?transport=tcp"])
    );
    let keys: Vec<&String> = v[0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["credential", "urls", "username"]);
}

#[test]
fn several_relays_for_docker_jitsi_meet_prosody_and_browsers() {
    let hosts = ["turn.example.com", "turn2.example.com", "203.0.113.30"];
    let args = |format: &'static str| {
        let mut a = vec!["credentials", "--secret", "s3cr3t", "--ttl", "24h", "--format", format];
        for h in hosts {
            a.extend(["--host", h]);
        }
        a
    };
    // docker-jitsi-meet: comma-separated lists, as its prosody template reads them.
    let (rc, env, err) = turnctl(&args("env"));
    assert_eq!(rc, 0, "{err}");
    let list = hosts.join(",");
    assert_eq!(
        env,
        format!("TURN_CREDENTIALS=s3cr3t\nTURN_HOST={list}\nTURN_PORT=3478\nTURN_TRANSPORT=udp,tcp\nTURNS_HOST={list}\nTURNS_PORT=443\nTURN_TTL=86400\n")
    );
    // The same with one comma-separated --host.
    let (_, same, _) = turnctl(&["credentials", "--secret", "s3cr3t", "--ttl", "24h", "--format", "env", "--host", &list]);
    assert_eq!(same, env);

    // prosody's own settings: three entries per relay, in the order given,
    // ports as Lua integers, signed with the secret for the TTL.
    let (rc, lua, err) = turnctl(&args("prosody"));
    assert_eq!(rc, 0, "{err}");
    let dir = std::env::temp_dir().join(format!("turnctl-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("services.cfg.lua"), &lua).unwrap();
    let (secret, services) = lua_services(&dir.join("services.cfg.lua"));
    assert_eq!(secret, "s3cr3t");
    let mut expected: Vec<String> = hosts
        .iter()
        .flat_map(|h| {
            [
                format!("turn {h} integer 3478 udp 86400 true turn"),
                format!("turn {h} integer 3478 tcp 86400 true turn"),
                format!("turns {h} integer 443 tcp 86400 true turn"),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(services, expected, "{lua}");
    let order: Vec<usize> = hosts.iter().map(|h| lua.find(&format!("host = \"{h}\"")).unwrap()).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "relays out of the given order:\n{lua}");
    // What docker-jitsi-meet's prosody makes of the env lines above (its
    // template, as deploy/jitsi/external-services.sh renders it) is the same.
    std::fs::write(dir.join("jitsi.env"), &env).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/jitsi/external-services.sh");
    let out = Command::new("bash").arg(script).arg(dir.join("jitsi.env")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("from-env.cfg.lua"), &out.stdout).unwrap();
    assert_eq!(lua_services(&dir.join("from-env.cfg.lua")), (secret, services), "turnctl's prosody settings differ from the .env's");

    // Browsers: one RTCIceServer per relay, the same credentials.
    let (rc, ice, err) = turnctl(&args("ice"));
    assert_eq!(rc, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&ice).unwrap();
    let servers = v.as_array().unwrap();
    assert_eq!(servers.len(), hosts.len(), "{v}");
    for (s, h) in servers.iter().zip(hosts) {
        let urls: Vec<&str> = s["urls"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
        assert_eq!(urls, [format!("turn:{h}:3478?transport=udp"), format!("turn:{h}:3478?transport=tcp"), format!("turns:{h}:443?transport=tcp")]);
        assert_eq!(s["credential"].as_str().unwrap(), openssl_rest_password("s3cr3t", s["username"].as_str().unwrap()));
        assert_eq!(s["username"], servers[0]["username"]);
    }
    let mut json_args = vec!["credentials", "--secret", "s3cr3t", "--json"];
    for h in hosts {
        json_args.extend(["--host", h]);
    }
    let (_, json, _) = turnctl(&json_args);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["uris"].as_array().map(Vec::len), Some(9), "{v}");
    let _ = std::fs::remove_dir_all(&dir);

    // A host that would break a URI, an .env list or Lua is refused.
    for bad in ["turn.example.com:3478", "x\"y", "2001:db8::1"] {
        let (rc, _, err) = turnctl(&["credentials", "--secret", "k", "--format", "prosody", "--host", "turn.example.com", "--host", bad]);
        assert_eq!(rc, 2, "{bad}: {err}");
        assert!(err.contains("--host") && err.contains(bad), "{err}");
    }
    let (rc, _, err) = turnctl(&["credentials", "--secret", "k", "--format", "prosody"]);
    assert_eq!(rc, 2);
    assert!(err.contains("--host"), "{err}");
}
