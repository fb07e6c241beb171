//! What the admin API shows of an allocation, and which allocations a
//! disconnect selects: worked out by each shard on its own allocations.

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::auth::quota_key;
use crate::turn::Allocation;

/// One allocation as `turnctl sessions` shows it.
pub fn session(a: &Allocation, now: std::time::Instant, shard: usize) -> Value {
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
        "shard": shard,
        "health": { "client_leg": leg(&a.health.client), "peer_leg": leg(&a.health.peer) },
    })
}

/// One leg's health: its RTP streams, their loss together, the round trip.
fn leg(l: &crate::turn::health::Leg) -> Value {
    let ms = |s: f64| (s * 10_000.0).round() / 10.0;
    let streams: Vec<Value> = l
        .streams()
        .map(|s| {
            json!({
                "ssrc": s.ssrc,
                "received": s.received,
                "expected": s.expected,
                "lost": s.lost,
                "loss": (s.expected > 0).then(|| s.lost as f64 / s.expected as f64),
                "reordered": s.reordered,
                "duplicates": s.duplicates,
                "jitter_ms": s.jitter.map(ms),
                "clock_hz": s.clock,
            })
        })
        .collect();
    json!({
        "rtp_streams": streams,
        "loss": l.loss(),
        "jitter_ms": l.jitter().map(ms),
        "untracked_packets": l.untracked_packets,
        "other_packets": l.other_packets,
        "rtt_ms": l.rtt().map(|d| ms(d.as_secs_f64())),
    })
}

/// Which allocations a disconnect request selects.
pub enum Selector {
    User(String),
    Client(String),
    Relayed(SocketAddr),
}

impl Selector {
    pub fn parse(body: &[u8]) -> Result<Selector, String> {
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

    pub fn matches(&self, a: &Allocation) -> bool {
        match self {
            // The whole username, or its USER part (EXPIRY:USER).
            Selector::User(u) => &*a.username == u || quota_key(&a.username) == u,
            Selector::Client(c) => a.tuple.client.to_string() == *c || a.tuple.client.ip().to_string() == *c,
            Selector::Relayed(r) => [a.v4, a.v6].iter().flatten().any(|x| x.advertised == *r),
        }
    }
}

