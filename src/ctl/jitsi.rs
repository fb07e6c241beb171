//! What `turnctl credentials` prints for Jitsi and browsers, for one relay
//! or several: docker-jitsi-meet's `.env` lines for the prosody container,
//! prosody's own `external_services` (XEP-0215) as Lua, an RTCIceServer
//! array, and the TURN URIs. Every relay of a fleet shares the secret, so
//! one set of credentials serves them all. Ports: 3478 for UDP and TCP,
//! 443 for TLS (what deploy/setup.sh configures).

/// The port of `turn:` URLs (UDP and TCP).
pub const TURN_PORT: u16 = 3478;
/// The port of `turns:` URLs (TLS).
pub const TURNS_PORT: u16 = 443;

/// Whether `h` can stand in a URI, a comma-separated `.env` list and a Lua
/// string as it is: a DNS name or an IP address (IPv6 in brackets).
pub fn valid_host(h: &str) -> bool {
    let bracketed = h.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
    match bracketed {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !h.is_empty() && h.len() <= 253 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'),
    }
}

/// The TURN URIs of each relay: UDP, TCP, then TLS on 443.
pub fn uris(hosts: &[String]) -> Vec<String> {
    hosts
        .iter()
        .flat_map(|h| {
            [
                format!("turn:{h}:{TURN_PORT}?transport=udp"),
                format!("turn:{h}:{TURN_PORT}?transport=tcp"),
                format!("turns:{h}:{TURNS_PORT}?transport=tcp"),
            ]
        })
        .collect()
}

/// docker-jitsi-meet's variables for the prosody container, which computes
/// the credentials itself from TURN_CREDENTIALS; several relays are
/// comma-separated in TURN_HOST and TURNS_HOST, as its template reads them.
pub fn env(secret: &str, hosts: &[String], ttl: u64) -> String {
    let list = hosts.join(",");
    format!(
        "TURN_CREDENTIALS={secret}\nTURN_HOST={list}\nTURN_PORT={TURN_PORT}\nTURN_TRANSPORT=udp,tcp\nTURNS_HOST={list}\nTURNS_PORT={TURNS_PORT}\nTURN_TTL={ttl}\n"
    )
}

/// A Lua string literal.
fn lua_string(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o += "\\\"",
            '\\' => o += "\\\\",
            c if c.is_control() => o += &format!("\\{}", c as u32),
            c => o.push(c),
        }
    }
    o + "\""
}

/// prosody's `external_service_secret` and `external_services`, as
/// mod_external_services reads them (ports as numbers: a quoted port is
/// dropped): per relay, in the order given (nearest first), `turn` over UDP
/// and TCP and `turns` on 443, each signed with the shared secret for `ttl`
/// seconds. For a prosody outside Docker (a file in /etc/prosody/conf.d/;
/// "external_services" in modules_enabled); docker-jitsi-meet's prosody
/// makes the same entries from [`env`].
pub fn prosody(secret: &str, hosts: &[String], ttl: u64) -> String {
    let mut o = String::from(
        "-- XEP-0215 external services for prosody (turnctl credentials --format prosody).\n\
         -- Needs \"external_services\" in modules_enabled. Every relay listed shares this secret.\n",
    );
    o += &format!("external_service_secret = {};\n", lua_string(secret));
    o += "external_services = {\n";
    for h in hosts {
        let host = lua_string(h);
        for (kind, port, transport) in [("turn", TURN_PORT, "udp"), ("turn", TURN_PORT, "tcp"), ("turns", TURNS_PORT, "tcp")] {
            o += &format!(
                "  {{ type = \"{kind}\", host = {host}, port = {port}, transport = \"{transport}\", ttl = {ttl}, secret = true, algorithm = \"turn\" }},\n"
            );
        }
    }
    o + "};\n"
}

/// RTCIceServer entries for a browser: one per relay, each with its URIs
/// and the credentials.
pub fn ice(hosts: &[String], username: &str, password: &str) -> serde_json::Value {
    let per: Vec<serde_json::Value> = if hosts.is_empty() {
        vec![serde_json::json!({ "urls": [], "username": username, "credential": password })]
    } else {
        hosts
            .iter()
            .map(|h| serde_json::json!({ "urls": uris(std::slice::from_ref(h)), "username": username, "credential": password }))
            .collect()
    };
    serde_json::Value::Array(per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_would_break_a_uri_or_a_lua_string_are_refused() {
        for ok in ["turn.example.com", "203.0.113.10", "[2001:db8::10]", "turn-2.example.com"] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in ["", "turn.example.com:3478", "a b", "x\"y", "2001:db8::10", "[nope]", "turn,two"] {
            assert!(!valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn lua_strings_are_escaped() {
        assert_eq!(lua_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\10\"");
    }
}
