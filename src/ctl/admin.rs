//! Client side of turnd's admin API (status, sessions, disconnect, reload,
//! drain, resume):
//! a minimal HTTP/1.1 client over loopback with a bearer token.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Where to reach the admin API and how to authenticate.
pub struct Admin {
    pub addr: SocketAddr,
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach turnd's admin API at {0}: {1} (is turnd running, and is metrics.listen this address?)")]
    Unreachable(SocketAddr, std::io::Error),
    #[error("the admin token was refused: use the token in turnd's admin.token_file (--token-file)")]
    Unauthorised,
    #[error("turnd answered {0}: {1}")]
    Status(u16, String),
    #[error("unreadable answer from turnd: {0}")]
    Protocol(String),
}

impl Admin {
    /// Reads the token from `path` (first non-empty line).
    pub fn from_token_file(addr: SocketAddr, path: &Path) -> Result<Admin, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the admin token {}: {e} (run as root, or pass --token-file)", path.display()))?;
        let token = text.lines().map(str::trim).find(|l| !l.is_empty()).ok_or_else(|| format!("{} is empty", path.display()))?;
        Ok(Admin { addr, token: token.to_owned() })
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, AdminError> {
        // A reload re-reads files; give it time.
        self.request_within(method, path, body, Duration::from_secs(30))
    }

    fn request_within(&self, method: &str, path: &str, body: Option<&Value>, wait: Duration) -> Result<Value, AdminError> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).map_err(|e| AdminError::Unreachable(self.addr, e))?;
        s.set_read_timeout(Some(wait)).ok();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            self.token,
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| AdminError::Unreachable(self.addr, e))?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).map_err(|e| AdminError::Unreachable(self.addr, e))?;
        let text = String::from_utf8_lossy(&resp);
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| AdminError::Protocol("no HTTP header".into()))?;
        let status: u16 = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| AdminError::Protocol(head.into()))?;
        let v: Value = serde_json::from_str(body).map_err(|e| AdminError::Protocol(format!("{e}: {body}")))?;
        match status {
            200 => Ok(v),
            401 => Err(AdminError::Unauthorised),
            _ => Err(AdminError::Status(status, v.get("error").and_then(Value::as_str).unwrap_or(body).to_owned())),
        }
    }

    pub fn status(&self) -> Result<Value, AdminError> {
        self.request("GET", "/admin/status", None)
    }

    pub fn sessions(&self) -> Result<Value, AdminError> {
        self.request("GET", "/admin/sessions", None)
    }

    /// `selector` is one of {"user": ..}, {"client": ..}, {"relayed": ..}.
    pub fn disconnect(&self, selector: &Value) -> Result<Value, AdminError> {
        self.request("POST", "/admin/disconnect", Some(selector))
    }

    pub fn reload(&self) -> Result<Value, AdminError> {
        self.request("POST", "/admin/reload", None)
    }

    /// New allocations go to the siblings (or are refused); turnd keeps running.
    pub fn drain(&self) -> Result<Value, AdminError> {
        self.request("POST", "/admin/drain", None)
    }

    /// New allocations again after [`Admin::drain`].
    pub fn resume(&self) -> Result<Value, AdminError> {
        self.request("POST", "/admin/resume", None)
    }

    /// Asks turnd to hand over to a new process running `binary` (default:
    /// its own path); answers once the new process serves, or why not.
    pub fn upgrade(&self, binary: Option<&Path>) -> Result<Value, AdminError> {
        let body = binary.map(|b| serde_json::json!({ "binary": b.to_string_lossy() }));
        self.request("POST", "/admin/upgrade", body.as_ref())
    }

    /// Asks turnd's ACME client to renew now; answers when it has (or failed).
    pub fn renew_cert(&self) -> Result<Value, AdminError> {
        // turnd bounds one attempt at 300 s.
        self.request_within("POST", "/admin/cert/renew", None, Duration::from_secs(320))
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Human-readable status.
pub fn render_status(v: &Value) -> String {
    let mut o = String::new();
    o += &format!("turnd {}  up {}s{}\n", s(&v["version"]), s(&v["uptime_s"]), if v["draining"] == true { "  DRAINING" } else { "" });
    o += &render_drain(&v["drain"]);
    if let Some(ls) = v["listeners"].as_array() {
        o += &format!("listeners:   {}\n", ls.iter().map(s).collect::<Vec<_>>().join(", "));
    }
    let by = &v["allocations_by_transport"];
    o += &format!(
        "allocations: {} (udp {}, tcp {}, tls {})\n",
        s(&v["allocations"]),
        s(&by["udp"]),
        s(&by["tcp"]),
        s(&by["tls"])
    );
    o += &format!("connections: tcp {}, tls {}\n", s(&v["connections"]["tcp"]), s(&v["connections"]["tls"]));
    if let Some(sh) = v["shards"].as_array() {
        let each: Vec<String> = sh.iter().map(|x| format!("{}/{}", s(&x["allocations"]), s(&x["connections"]))).collect();
        o += &format!("shards:      {} (allocations/connections each: {})\n", sh.len(), each.join(" "));
    }
    if let Some(silent) = v["shards_not_answering"].as_array().filter(|a| !a.is_empty()) {
        let list: Vec<String> = silent.iter().map(s).collect();
        o += &format!("WARNING:     shard {} did not answer in time (its thread is stuck or stopped): its counts are missing above\n", list.join(", "));
    }
    if v["tls"].is_object() {
        o += &render_cert(&v["tls"]);
    }
    o += &format!("relay ports: {} in use of {}\n", s(&v["relay_ports"]["in_use"]), s(&v["relay_ports"]["total"]));
    o += &format!(
        "relayed:     {} packets to peers, {} to clients\n",
        s(&v["relayed_packets"]["to_peer"]),
        s(&v["relayed_packets"]["to_client"])
    );
    o
}

/// The drain lines of the status: whether new allocations are taken, and
/// where they go while draining.
fn render_drain(d: &Value) -> String {
    let to: Vec<String> = d["alternates"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default();
    let whom = if to.is_empty() { None } else { Some(to.join(", ")) };
    match d["state"].as_str() {
        Some("draining") | Some("stopping") => {
            let why = if d["state"] == "stopping" {
                "shutting down (SIGTERM): exits when the allocations end or at limits.drain_timeout"
            } else {
                "turnctl drain; /readyz answers 503; `turnctl resume` takes new allocations again"
            };
            let dest = match whom {
                Some(w) => format!("new allocations go to {w} (300 Try Alternate), {} so far", s(&d["redirected"])),
                None => "new allocations are refused (508; no [[drain.alternate]] configured)".to_owned(),
            };
            format!("draining:    yes ({why})\n             {dest}\n")
        }
        Some(_) => match whom {
            Some(w) => format!("draining:    no (turnctl drain would send new allocations to {w})\n"),
            None => "draining:    no\n".to_owned(),
        },
        // An older turnd without the drain fields.
        None => String::new(),
    }
}

/// The certificate lines of the status.
fn render_cert(t: &Value) -> String {
    let mut o = match t["names"].as_array().filter(|n| !n.is_empty()) {
        Some(names) => format!(
            "certificate: {} from {}, expires {} ({} days) [{}]\n",
            names.iter().map(s).collect::<Vec<_>>().join(", "),
            s(&t["issuer"]),
            s(&t["expires"]),
            s(&t["days_left"]),
            s(&t["source"])
        ),
        None => format!("certificate: NONE: {}\n", s(&t["missing"])),
    };
    let a = &t["acme"];
    if a.is_object() {
        let r = &a["renewals"];
        o += &format!(
            "acme:        {}next attempt {}, renewals {} ok / {} failed, {}\n",
            if a["attempting"] == true { "attempting now, " } else { "" },
            s(&a["next_attempt_date"]),
            s(&r["success"]),
            s(&r["failure"]),
            s(&a["directory"])
        );
        if !a["last_error"].is_null() {
            o += &format!("acme error:  {}\n", s(&a["last_error"]));
        }
    }
    o
}

/// A TCP/TLS client's round trip as the relay's kernel measures it
/// (`health.client_leg.tcp.rtt_ms`), "-" for UDP clients.
fn tcp_rtt(session: &Value) -> String {
    match session["health"]["client_leg"]["tcp"]["rtt_ms"].as_f64() {
        Some(ms) => format!("{ms:.1}"),
        None => "-".into(),
    }
}

/// Human-readable session table.
pub fn render_sessions(v: &Value) -> String {
    let rows: Vec<[String; 11]> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    let list = |k: &str| x[k].as_array().map(|l| l.iter().map(s).collect::<Vec<_>>().join(",")).unwrap_or_default();
                    let h = &x["health"];
                    // Loss and jitter of what arrived from each side; the round trips to each.
                    let pct = |v: &Value| v.as_f64().map_or_else(|| "-".to_owned(), |r| format!("{:.1}%", r * 100.0));
                    let ms = |v: &Value| v.as_f64().map_or_else(|| "-".to_owned(), |m| format!("{m:.0}"));
                    let (c, p) = (&h["client_leg"], &h["peer_leg"]);
                    [
                        s(&x["user"]),
                        s(&x["client"]),
                        s(&x["transport"]),
                        list("relayed"),
                        list("peers"),
                        format!("{}/{}", s(&x["bytes_to_peer"]), s(&x["bytes_from_peer"])),
                        format!("{}/{}", pct(&c["loss"]), pct(&p["loss"])),
                        format!("{}/{}", ms(&c["jitter_ms"]), ms(&p["jitter_ms"])),
                        format!("{}/{}", ms(&c["rtt_ms"]), ms(&p["rtt_ms"])),
                        tcp_rtt(x),
                        s(&x["age_s"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let head = ["USER", "CLIENT", "TRANSPORT", "RELAYED", "PEERS", "BYTES OUT/IN", "LOSS C/P", "JITTER MS C/P", "RTT MS C/P", "TCP RTT MS", "AGE S"].map(String::from);
    let mut widths = head.clone().map(|h| h.len());
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |r: &[String; 11]| r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect::<Vec<_>>().join("  ").trim_end().to_owned() + "\n";
    let mut o = line(&head);
    for r in &rows {
        o += &line(r);
    }
    o += &format!("{} allocation(s)\n", rows.len());
    o
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn session_table_shows_the_tcp_round_trip_of_stream_clients() {
        let v = json!([
            {"user": "1:a", "client": "192.0.2.1:5000", "transport": "tls", "relayed": [], "peers": [],
             "health": {"client_leg": {"tcp": {"rtt_ms": 101.27, "rttvar_ms": 3.0}}}},
            {"user": "1:b", "client": "192.0.2.2:5000", "transport": "udp", "relayed": [], "peers": []},
        ]);
        let t = super::render_sessions(&v);
        let lines: Vec<&str> = t.lines().collect();
        let at = lines[0].find("TCP RTT MS").expect("a TCP RTT column");
        let cell = |l: &str| l[at..].split_whitespace().next().unwrap_or("").to_owned();
        assert_eq!(cell(lines[1]), "101.3", "{t}");
        assert_eq!(cell(lines[2]), "-", "{t}");
    }
}
