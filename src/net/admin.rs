//! The admin API behind `turnctl status | sessions | disconnect | reload`.
//! Served on the local metrics listener; every request needs
//! `Authorization: Bearer <token>` (the token file named in the config).

use std::net::SocketAddr;

use serde_json::{json, Value};

use super::request::Request;
use super::Shard;
use crate::auth::quota_key;
use crate::stun::integrity::ct_eq;
use crate::turn::{Allocation, Transport};

type Response = (u16, &'static str, String);

fn ok(v: Value) -> Response {
    (200, "application/json", format!("{v}\n"))
}

fn err(code: u16, msg: &str) -> Response {
    (code, "application/json", format!("{}\n", json!({ "error": msg })))
}

/// Checks the bearer token in constant time. `None` when authorised.
pub(super) fn unauthorised(token: Option<&str>, req: &Request) -> Option<Response> {
    let Some(token) = token else { return Some(err(404, "the admin API is disabled (admin.enabled = false)")) };
    // RFC 7235: the auth-scheme is case-insensitive ("bearer", "BEARER").
    let given = req.headers.iter().find(|(k, _)| k == "authorization").and_then(|(_, v)| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(token)
    });
    match given {
        Some(g) if ct_eq(g.trim().as_bytes(), token.as_bytes()) => None,
        _ => Some(err(401, "missing or wrong admin token (see admin.token_file)")),
    }
}

fn session(a: &Allocation, now: std::time::Instant) -> Value {
    let relayed: Vec<String> = [a.v4, a.v6].iter().flatten().map(|r| r.advertised.to_string()).collect();
    let peers: Vec<String> = a.permissions.iter().filter(|p| p.expires > now).map(|p| p.ip.to_string()).collect();
    let channels: Vec<Value> = a
        .channels
        .iter()
        .filter(|c| c.expires > now)
        .map(|c| json!({ "number": c.number, "peer": c.peer.to_string() }))
        .collect();
    json!({
        "user": &*a.username,
        "client": a.tuple.client.to_string(),
        "transport": a.tuple.transport.label(),
        "relayed": relayed,
        "peers": peers,
        "channels": channels,
        "bytes_to_peer": a.bytes_to_peer,
        "bytes_from_peer": a.bytes_from_peer,
        "packets_to_peer": a.packets_to_peer,
        "packets_from_peer": a.packets_from_peer,
        "age_s": now.saturating_duration_since(a.created).as_secs(),
        "expires_in_s": a.expires.saturating_duration_since(now).as_secs(),
    })
}

/// Which allocations a disconnect request selects.
enum Selector {
    User(String),
    Client(String),
    Relayed(SocketAddr),
}

impl Selector {
    fn parse(body: &[u8]) -> Result<Selector, String> {
        let v: Value = serde_json::from_slice(body).map_err(|e| format!("body must be JSON: {e}"))?;
        if let Some(u) = v.get("user").and_then(Value::as_str) {
            return Ok(Selector::User(u.to_owned()));
        }
        if let Some(c) = v.get("client").and_then(Value::as_str) {
            if c.parse::<std::net::IpAddr>().is_err() && c.parse::<SocketAddr>().is_err() {
                return Err(format!("client: `{c}` is not IP or IP:PORT"));
            }
            return Ok(Selector::Client(c.to_owned()));
        }
        if let Some(r) = v.get("relayed").and_then(Value::as_str) {
            return r.parse().map(Selector::Relayed).map_err(|_| format!("relayed: `{r}` is not IP:PORT"));
        }
        Err("give one of user, client (IP or IP:PORT) or relayed (IP:PORT)".into())
    }

    fn matches(&self, a: &Allocation) -> bool {
        match self {
            // The whole username, or its USER part (EXPIRY:USER).
            Selector::User(u) => &*a.username == u || quota_key(&a.username) == u,
            Selector::Client(c) => a.tuple.client.to_string() == *c || a.tuple.client.ip().to_string() == *c,
            Selector::Relayed(r) => [a.v4, a.v6].iter().flatten().any(|x| x.advertised == *r),
        }
    }
}

pub(super) fn route(sh: &mut Shard, req: &Request) -> Option<Response> {
    let now = std::time::Instant::now();
    Some(match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/admin/status") => {
            let snap = sh.snapshot();
            let mut by = serde_json::Map::new();
            for t in Transport::ALL {
                let n: u64 = snap.allocations.iter().filter(|((tt, _), _)| *tt == t).map(|(_, n)| n).sum();
                by.insert(t.label().into(), n.into());
            }
            ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_s": snap.uptime_seconds,
                "draining": snap.draining,
                "listeners": sh.listener_names,
                "allocations": sh.server.allocation_count(),
                "allocations_by_transport": by,
                "connections": { "tcp": snap.connections[Transport::Tcp as usize], "tls": snap.connections[Transport::Tls as usize] },
                "relay_ports": { "in_use": snap.relay_ports_in_use, "total": snap.relay_ports_total },
                "relayed_packets": {
                    "to_peer": snap.stats.to_peer.iter().map(|f| f.packets).sum::<u64>(),
                    "to_client": snap.stats.from_peer.iter().map(|f| f.packets).sum::<u64>(),
                },
            }))
        }
        ("GET", "/admin/sessions") => ok(Value::Array(sh.server.allocations().map(|a| session(a, now)).collect())),
        ("POST", "/admin/disconnect") => match Selector::parse(&req.body) {
            Err(e) => err(400, &e),
            Ok(sel) => {
                let Shard { server, relays, .. } = sh;
                let n = server.disconnect(|a| sel.matches(a), now, relays);
                sh.after_control();
                ok(json!({ "disconnected": n }))
            }
        },
        (_, "/admin/status" | "/admin/sessions") => err(405, "use GET"),
        (_, "/admin/disconnect" | "/admin/reload") => err(405, "use POST"),
        _ => return None,
    })
}
