//! The admin API behind `turnctl status | sessions | disconnect | reload |
//! drain | resume`.
//! Served on the local metrics listener; every request needs
//! `Authorization: Bearer <token>` (the token file named in the config).

use serde_json::{json, Value};

use super::request::Request;
use super::shards::Control;
use crate::net::sessions::Selector;
use crate::net::shared::Drain;
use crate::stun::integrity::ct_eq;
use crate::turn::Transport;

type Response = (u16, &'static str, String);

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

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

pub(super) async fn route(ctl: &Control, req: &Request) -> Option<Response> {
    Some(match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/admin/status") => {
            let snap = ctl.snapshot().await;
            let mut by = serde_json::Map::new();
            for t in Transport::ALL {
                let n: u64 = snap.allocations.iter().filter(|((tt, _), _)| *tt == t).map(|(_, n)| n).sum();
                by.insert(t.label().into(), n.into());
            }
            ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "uptime_s": snap.uptime_seconds,
                "draining": snap.draining,
                "drain": {
                    "state": ctl.shared.drain_state().label(),
                    "alternates": ctl.alternates.borrow().iter().map(super::shards::alternate_label).collect::<Vec<_>>(),
                    "redirected": snap.stats.redirected,
                },
                "listeners": *ctl.listener_names.borrow(),
                "allocations": ctl.shared.allocations(),
                "shards": snap.shards.iter().map(|s| json!({ "shard": s.index, "allocations": s.allocations, "connections": s.connections })).collect::<Vec<_>>(),
                "shards_not_answering": snap.silent_shards,
                "allocations_by_transport": by,
                "connections": { "tcp": snap.connections[Transport::Tcp as usize], "tls": snap.connections[Transport::Tls as usize] },
                "relay_ports": { "in_use": snap.relay_ports_in_use, "total": snap.relay_ports_total },
                "tls": ctl.certs.borrow().as_ref().map(|c| c.status(unix_now())),
                "relayed_packets": {
                    "to_peer": snap.stats.to_peer.iter().map(|f| f.packets).sum::<u64>(),
                    "to_client": snap.stats.from_peer.iter().map(|f| f.packets).sum::<u64>(),
                },
            }))
        }
        ("GET", "/admin/sessions") => ok(Value::Array(ctl.sessions().await)),
        ("POST", "/admin/drain") => match ctl.drain_by_operator() {
            Drain::Stopping => err(409, "turnd is shutting down already (SIGTERM): it refuses new allocations until it exits"),
            was => ok(json!({
                "draining": true,
                "was": was.label(),
                "allocations": ctl.shared.allocations(),
                "alternates": ctl.alternates.borrow().iter().map(super::shards::alternate_label).collect::<Vec<_>>(),
            })),
        },
        ("POST", "/admin/resume") => match ctl.resume() {
            Drain::Stopping => err(409, "turnd is shutting down (SIGTERM): it cannot take new allocations again; start it anew"),
            was => ok(json!({ "draining": false, "was": was.label() })),
        },
        ("POST", "/admin/cert/renew") => {
            let asked = match ctl.certs.borrow().as_ref() {
                None => Err(err(409, "TLS is not configured")),
                Some(c) => match &c.acme {
                    None => Err(err(409, "the certificate comes from tls.cert and tls.key: renew it where it is made (certbot renew); turnd picks up the new files by itself")),
                    Some(a) => Ok(a.renew()),
                },
            };
            match asked {
                Err(r) => r,
                Ok(rx) => match rx.await {
                    Ok(Ok(msg)) => ok(json!({ "renewed": true, "message": msg })),
                    Ok(Err(e)) => (502, "application/json", format!("{}\n", json!({ "renewed": false, "error": e }))),
                    Err(_) => err(503, "the ACME client stopped (a reload changed it?)"),
                },
            }
        }
        ("POST", "/admin/disconnect") => match Selector::parse(&req.body) {
            Err(e) => err(400, &e),
            Ok(sel) => ok(json!({ "disconnected": ctl.disconnect(sel).await })),
        },
        (_, "/admin/status" | "/admin/sessions") => err(405, "use GET"),
        (_, "/admin/disconnect" | "/admin/reload" | "/admin/cert/renew" | "/admin/drain" | "/admin/resume") => err(405, "use POST"),
        _ => return None,
    })
}
