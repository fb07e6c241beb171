//! The check page: what a participant opens in their own browser to learn
//! whether calls will be relayed from their network, and over what. turnd
//! serves the page (`page.html`, embedded), short-lived check credentials
//! for it and a public readiness answer, over HTTPS on its TLS listeners
//! (ALPN http/1.1) and optionally on a plain HTTP port.
//!
//! Sans-IO: [`Site::handle`] takes a request's method, path, Host header,
//! client address and the time, and returns the answer; the I/O layer
//! (hyper) only carries bytes. Check credentials are `EXPIRY:turnd-check`
//! signed with turnd's own key ([`crate::auth::check_key`]); the core lets
//! their allocations reach only the relay's own relayed addresses, two per
//! client address, with a small bandwidth cap and a short lifetime.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::auth::check_credentials;
use crate::config::{Check, Listener};
use crate::turn::Transport;

/// The page, HTML with its script and style inline: nothing is loaded from elsewhere.
pub const PAGE: &str = include_str!("page.html");

/// Credential requests one address may make per [`WINDOW`] seconds.
pub const PER_ADDRESS: u32 = 10;
pub const WINDOW: u64 = 60;
/// Addresses the rate limit remembers; beyond this, new ones wait for old windows to end.
const MAX_ADDRESSES: usize = 16_384;

/// A transport the relay offers, as the page tries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    pub id: String,
    pub label: String,
    /// `turn` or `turns`.
    scheme: &'static str,
    port: u16,
    /// `udp` or `tcp`.
    transport: &'static str,
}

/// Every transport of these listeners, once per (transport, port): the
/// first of each kind is named after it ("udp", "tcp", "tls"), others add
/// the port ("udp443").
pub fn offers(listeners: &[Listener]) -> Vec<Offer> {
    let mut out: Vec<Offer> = Vec::new();
    let mut seen = Vec::new();
    for l in listeners {
        let port = l.address.port();
        if seen.contains(&(l.transport, port)) {
            continue;
        }
        seen.push((l.transport, port));
        let (name, scheme, transport, label) = match l.transport {
            Transport::Udp => ("udp", "turn", "udp", "UDP"),
            Transport::Tcp => ("tcp", "turn", "tcp", "TCP"),
            Transport::Tls => ("tls", "turns", "tcp", "TLS"),
        };
        let id = if out.iter().any(|o| o.id.starts_with(name)) { format!("{name}{port}") } else { name.to_owned() };
        out.push(Offer { id, label: format!("{label} {port}"), scheme, port, transport });
    }
    out
}

/// What the check site counts (for /metrics).
#[derive(Debug, Default)]
pub struct Counts {
    pub issued: AtomicU64,
    pub rate_limited: AtomicU64,
    pub bad_token: AtomicU64,
}

/// One HTTP answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// Seconds to wait, for a 429.
    pub retry_after: Option<u64>,
    /// Where a redirect goes.
    pub location: Option<String>,
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Answer {
        Answer { status, content_type: "text/plain; charset=utf-8", body: body.into(), retry_after: None, location: None }
    }
}

/// The site on turnd's TLS listeners: always `/readyz`; the check page and
/// its credentials when `[check]` is on (else 404).
pub struct Site {
    key: [u8; 16],
    check: Option<Check>,
    offers: Vec<Offer>,
    limit: Mutex<HashMap<IpAddr, (u64, u32)>>,
    pub counts: Arc<Counts>,
}

/// The `token` query parameter, if any.
fn query_token(query: &str) -> Option<&str> {
    query.split('&').find_map(|kv| kv.strip_prefix("token="))
}

/// The host name of a Host header, if it is one a URL may carry (a DNS
/// name, an IPv4 address or a bracketed IPv6 address; the port dropped).
fn host_name(host: &str) -> Option<&str> {
    let host = host.trim();
    let name = if host.starts_with('[') { &host[..=host.find(']')?] } else { host.rsplit_once(':').map_or(host, |(h, _)| h) };
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':'));
    ok.then_some(name)
}

impl Site {
    pub fn new(key: [u8; 16], check: Option<Check>, offers: Vec<Offer>, counts: Arc<Counts>) -> Site {
        Site { key, check, offers, limit: Mutex::default(), counts }
    }

    /// Whether `given` is the configured token (constant time); true when none is configured.
    fn token_ok(&self, given: Option<&str>) -> bool {
        match self.check.as_ref().and_then(|c| c.token.as_ref()) {
            None => true,
            Some(t) => given.is_some_and(|g| crate::stun::integrity::ct_eq(g.as_bytes(), t.as_bytes())),
        }
    }

    /// Counts a credential request from `ip`; `Err(seconds to wait)` past the limit.
    fn admit(&self, ip: IpAddr, now: u64) -> Result<(), u64> {
        let mut t = self.limit.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() >= MAX_ADDRESSES && !t.contains_key(&ip) {
            t.retain(|_, (start, _)| now < *start + WINDOW);
            if t.len() >= MAX_ADDRESSES {
                return Err(WINDOW);
            }
        }
        let e = t.entry(ip).or_insert((now, 0));
        if now >= e.0 + WINDOW {
            *e = (now, 0);
        }
        if e.1 >= PER_ADDRESS {
            return Err(e.0 + WINDOW - now);
        }
        e.1 += 1;
        Ok(())
    }

    /// Answers one request. `not_ready` is why the relay is not ready, if it is not.
    pub fn handle(&self, method: &str, target: &str, host: Option<&str>, client: IpAddr, now: u64, not_ready: Option<&str>) -> Answer {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if method != "GET" && method != "HEAD" {
            return Answer::text(405, "use GET\n");
        }
        let on = self.check.is_some();
        match path {
            "/readyz" => match not_ready {
                None => Answer::text(200, "ready\n"),
                Some(why) => Answer::text(503, format!("{why}\n")),
            },
            "/" if on => {
                // Participants type the relay's name: the page, with its token if given.
                let mut a = Answer::text(302, "the check is at /check\n");
                a.location = Some(if query.is_empty() { "/check".to_owned() } else { format!("/check?{query}") });
                a
            }
            "/check" | "/check/" if on => {
                if !self.token_ok(query_token(query)) {
                    self.counts.bad_token.fetch_add(1, Ordering::Relaxed);
                    return Answer::text(403, "This check needs the link with its token: ask the relay's operator for it.\n");
                }
                Answer { status: 200, content_type: "text/html; charset=utf-8", body: PAGE.to_owned(), retry_after: None, location: None }
            }
            "/check/credentials" if on => self.credentials(query, host, client, now),
            _ => Answer::text(404, "not found\n"),
        }
    }

    fn credentials(&self, query: &str, host: Option<&str>, client: IpAddr, now: u64) -> Answer {
        if !self.token_ok(query_token(query)) {
            self.counts.bad_token.fetch_add(1, Ordering::Relaxed);
            return Answer::text(403, "wrong or missing token\n");
        }
        let Some(name) = host.and_then(host_name) else {
            return Answer::text(400, "no usable Host header\n");
        };
        if let Err(wait) = self.admit(client.to_canonical(), now) {
            self.counts.rate_limited.fetch_add(1, Ordering::Relaxed);
            let mut a = Answer::text(429, format!("too many checks from {}: try again in {wait} s\n", client.to_canonical()));
            a.retry_after = Some(wait);
            return a;
        }
        self.counts.issued.fetch_add(1, Ordering::Relaxed);
        let ttl = self.check.as_ref().map_or(crate::auth::CHECK_TTL, |c| c.credential_ttl);
        let (username, password) = check_credentials(&self.key, now + ttl);
        let transports: Vec<_> = self
            .offers
            .iter()
            .map(|o| json!({ "id": o.id, "label": o.label, "url": format!("{}:{name}:{}?transport={}", o.scheme, o.port, o.transport) }))
            .collect();
        let body = json!({ "username": username, "password": password, "ttl": ttl, "transports": transports });
        Answer { status: 200, content_type: "application/json", body: format!("{body}\n"), retry_after: None, location: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Listener;

    fn l(t: Transport, a: &str) -> Listener {
        Listener { transport: t, address: a.parse().unwrap(), proxy_protocol: false, proxy_protocol_from: vec![] }
    }

    fn site(token: Option<&str>) -> Site {
        let offers = offers(&[l(Transport::Udp, "0.0.0.0:3478"), l(Transport::Udp, "[::]:3478"), l(Transport::Tcp, "0.0.0.0:3478"), l(Transport::Tls, "0.0.0.0:443"), l(Transport::Udp, "0.0.0.0:443")]);
        let check = Check { token: token.map(str::to_owned), http_listen: None, credential_ttl: 60 };
        Site::new([9; 16], Some(check), offers, Arc::default())
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 7));

    #[test]
    fn offers_every_transport_once_with_urls_for_the_name_asked() {
        let s = site(None);
        let a = s.handle("GET", "/check/credentials", Some("turn.example.com:443"), IP, 1000, None);
        assert_eq!(a.status, 200, "{a:?}");
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        let urls: Vec<&str> = v["transports"].as_array().unwrap().iter().map(|t| t["url"].as_str().unwrap()).collect();
        assert_eq!(
            urls,
            ["turn:turn.example.com:3478?transport=udp", "turn:turn.example.com:3478?transport=tcp", "turns:turn.example.com:443?transport=tcp", "turn:turn.example.com:443?transport=udp"]
        );
        assert_eq!(v["transports"][3]["id"], "udp443");
        assert_eq!(v["username"], "1060:turnd-check");
        assert_eq!(v["password"], crate::auth::rest_password(&[9; 16], "1060:turnd-check"));
        assert_eq!(v["ttl"], 60);
    }

    #[test]
    fn rate_limited_per_address_and_window() {
        let s = site(None);
        for _ in 0..PER_ADDRESS {
            assert_eq!(s.handle("GET", "/check/credentials", Some("h.example"), IP, 1000, None).status, 200);
        }
        let a = s.handle("GET", "/check/credentials", Some("h.example"), IP, 1010, None);
        assert_eq!((a.status, a.retry_after), (429, Some(50)));
        // Another address is not affected; the window ends.
        assert_eq!(s.handle("GET", "/check/credentials", Some("h.example"), "198.18.0.8".parse().unwrap(), 1010, None).status, 200);
        assert_eq!(s.handle("GET", "/check/credentials", Some("h.example"), IP, 1060, None).status, 200);
        assert_eq!(s.counts.rate_limited.load(Ordering::Relaxed), 1);
        assert_eq!(s.counts.issued.load(Ordering::Relaxed), PER_ADDRESS as u64 + 2);
    }

    #[test]
    fn the_token_gates_page_and_credentials() {
        let s = site(Some("s3cret-token-123"));
        assert_eq!(s.handle("GET", "/check", Some("h"), IP, 1, None).status, 403);
        assert_eq!(s.handle("GET", "/check/credentials?token=nope", Some("h"), IP, 1, None).status, 403);
        assert_eq!(s.handle("GET", "/check?token=s3cret-token-123", Some("h"), IP, 1, None).status, 200);
        assert_eq!(s.handle("GET", "/check/credentials?x=1&token=s3cret-token-123", Some("h"), IP, 1, None).status, 200);
        assert_eq!(s.counts.bad_token.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn off_it_answers_readiness_alone() {
        let s = Site::new([9; 16], None, vec![], Arc::default());
        for p in ["/check", "/check/credentials", "/"] {
            assert_eq!(s.handle("GET", p, Some("h"), IP, 1, None).status, 404, "{p}");
        }
        assert_eq!(s.handle("GET", "/readyz", Some("h"), IP, 1, None).status, 200);
        let on = site(None);
        let a = on.handle("GET", "/?token=abc", Some("h"), IP, 1, None);
        assert_eq!((a.status, a.location.as_deref()), (302, Some("/check?token=abc")));
    }

    #[test]
    fn readiness_other_paths_and_bad_hosts() {
        let s = site(None);
        assert_eq!(s.handle("GET", "/readyz", None, IP, 1, None), Answer::text(200, "ready\n"));
        assert_eq!(s.handle("GET", "/readyz", None, IP, 1, Some("draining: shutting down")).status, 503);
        assert_eq!(s.handle("GET", "/metrics", None, IP, 1, None).status, 404);
        assert_eq!(s.handle("POST", "/check", None, IP, 1, None).status, 405);
        assert_eq!(s.handle("GET", "/check/credentials", Some("evil\"host"), IP, 1, None).status, 400);
        assert_eq!(s.handle("GET", "/check/credentials", None, IP, 1, None).status, 400);
        assert_eq!(host_name("[2001:db8::1]:443"), Some("[2001:db8::1]"));
        assert_eq!(host_name("turn.example.com"), Some("turn.example.com"));
    }
}
