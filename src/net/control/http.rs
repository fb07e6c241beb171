//! The local HTTP endpoint: /metrics (Prometheus), /healthz, /readyz.
//! Kept off the public ports (default 127.0.0.1:9641); requests are small,
//! bounded in size and time, and answered with `Connection: close`.

use std::rc::Weak;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::request::{read_request, Request};
use super::shards::Control;
use crate::net::shared::HTTP_CONNECTIONS;

/// A request must arrive whole within this time.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection lives (a reload it asked for re-reads files).
const TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once (their descriptors are kept in reserve: see
/// [`HTTP_CONNECTIONS`]); a new connection beyond this closes the oldest, so
/// /readyz and a scrape always get through however many are left open.
const MAX_CONNECTIONS: usize = HTTP_CONNECTIONS;

pub(super) async fn serve(ctl: Weak<Control>, listener: TcpListener) {
    let mut open: std::collections::VecDeque<tokio::task::JoinHandle<()>> = std::collections::VecDeque::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        open.retain(|t| !t.is_finished());
        while open.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = open.pop_front() {
                oldest.abort();
            }
        }
        let ctl = ctl.clone();
        open.push_back(tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(TIMEOUT, handle(ctl, stream)).await;
        }));
    }
}

async fn handle(ctl: Weak<Control>, mut stream: TcpStream) {
    let Ok(Some(req)) = tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await else { return };
    let (status, ctype, body) = match ctl.upgrade() {
        None => (503, "text/plain", "shutting down\n".to_owned()),
        Some(ctl) if req.path == "/admin/reload" && req.method == "POST" => {
            // The reload itself runs in the main loop; wait for its verdict.
            let asked = {
                let token = ctl.admin_token.borrow().clone();
                match super::admin::unauthorised(token.as_deref(), &req) {
                    Some(r) => Err(r),
                    None => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        match ctl.reload_tx.send(tx) {
                            Ok(()) => Ok(rx),
                            Err(_) => Err((503, "application/json", format!("{}\n", serde_json::json!({ "error": "shutting down" })))),
                        }
                    }
                }
            };
            match asked {
                Err(r) => r,
                Ok(rx) => match rx.await {
                    Ok(Ok(msg)) => (200, "application/json", format!("{}\n", serde_json::json!({ "reloaded": true, "message": msg }))),
                    Ok(Err(e)) => (
                        400,
                        "application/json",
                        format!("{}\n", serde_json::json!({ "reloaded": false, "error": e.to_string(), "step": e.step(), "shard": e.shard() })),
                    ),
                    Err(_) => (503, "application/json", "{\"error\":\"shutting down\"}\n".to_owned()),
                },
            }
        }
        Some(ctl) if req.path == "/admin/upgrade" && req.method == "POST" => upgrade(&ctl, &req).await,
        Some(ctl) => route(&ctl, &req).await,
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        409 => "Conflict",
        502 => "Bad Gateway",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// `turnctl upgrade`: the upgrade runs in the main loop; this waits for
/// its verdict. The body may name the new binary: `{"binary": "/path"}`.
async fn upgrade(ctl: &Control, req: &Request) -> (u16, &'static str, String) {
    let json = |status, v: serde_json::Value| (status, "application/json", format!("{v}\n"));
    let token = ctl.admin_token.borrow().clone();
    if let Some(r) = super::admin::unauthorised(token.as_deref(), req) {
        return r;
    }
    let binary = if req.body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<serde_json::Value>(&req.body) {
            Ok(v) => match v.get("binary") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(p)) => Some(std::path::PathBuf::from(p)),
                Some(_) => return json(400, serde_json::json!({ "error": "binary: a path as a string" })),
            },
            Err(e) => return json(400, serde_json::json!({ "error": format!("not JSON: {e}") })),
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if ctl.upgrade_tx.send((binary, tx)).is_err() {
        return json(503, serde_json::json!({ "error": "shutting down" }));
    }
    match rx.await {
        Ok(Ok(u)) => json(200, serde_json::json!({
            "upgraded": true, "pid": u.pid, "allocations": u.allocations, "listeners": u.listeners,
            "elapsed_ms": u.elapsed.as_millis() as u64, "previous_pid": std::process::id(),
        })),
        Ok(Err(e)) => json(502, serde_json::json!({ "upgraded": false, "error": e.to_string() })),
        Err(_) => json(503, serde_json::json!({ "error": "shutting down, or another upgrade took over" })),
    }
}

async fn route(ctl: &Control, req: &Request) -> (u16, &'static str, String) {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/metrics") => (200, "text/plain; version=0.0.4", crate::metrics::render(&ctl.snapshot().await)),
        ("GET", "/healthz") => (200, "text/plain", "ok\n".into()),
        ("GET", "/readyz") => match ctl.not_ready() {
            None => (200, "text/plain", "ready\n".into()),
            Some(why) => (503, "text/plain", format!("{why}\n")),
        },
        (_, "/metrics" | "/healthz" | "/readyz") => (405, "text/plain", "use GET\n".into()),
        (_, p) if p.starts_with("/admin/") => {
            let token = ctl.admin_token.borrow().clone();
            match super::admin::unauthorised(token.as_deref(), req) {
                Some(r) => r,
                None => super::admin::route(ctl, req).await.unwrap_or((404, "text/plain", "not found\n".into())),
            }
        }
        _ => (404, "text/plain", "not found\n".into()),
    }
}
