//! The metrics/admin listener under pressure and the admin API's edges:
//! idle connections there stay inside the descriptor reserve (allocations
//! and /readyz unaffected), the bearer scheme is case-insensitive, and
//! `turnctl disconnect` refuses a selector that can match nothing.

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Turnd;

/// One HTTP request on the metrics/admin port: (status, body), or `None` when
/// no answer came within 3 s (connection refused, reset, or silence).
fn http(port: u16, method: &str, path: &str, auth: Option<&str>, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split(' ').nth(1)?.parse().ok()?;
    Some((status, resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()))
}

/// 300 idle connections to the metrics listener of a turnd limited to 64
/// descriptors: before, they took every descriptor (Allocate 508, /readyz
/// unreachable); now at most a fixed few are held, inside the reserve.
#[test]
fn idle_metrics_connections_do_not_starve_allocations_or_readyz() {
    let server = Turnd::builder().nofile(64).start();
    let mut idle = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(format!("127.0.0.1:{}", server.metrics_port)) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let ready = loop {
        match http(server.metrics_port, "GET", "/readyz", None, "") {
            Some(r) => break Some(r),
            None if Instant::now() < deadline => continue,
            None => break None,
        }
    };
    assert_eq!(ready.map(|r| r.0), Some(200), "/readyz answers despite 300 idle connections:\n{}", server.log());
    for i in 0..8 {
        let mut c = wire::UdpClient::new("127.0.0.1", server.addr);
        let r = c.try_allocate(&format!("idle{i}"), common::SECRET);
        assert_eq!(r.code(), None, "allocation {i} despite idle metrics connections:\n{}", server.log());
    }
    // Still a scrape, while the idle connections stay open on our side.
    assert_eq!(http(server.metrics_port, "GET", "/metrics", None, "").map(|r| r.0), Some(200));
    drop(idle);
}

#[test]
fn bearer_scheme_is_case_insensitive() {
    let server = Turnd::start("");
    let token = server.admin_token();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = http(server.metrics_port, "GET", "/admin/status", Some(&format!("{scheme} {token}")), "");
        assert_eq!(r.as_ref().map(|r| r.0), Some(200), "{scheme}: {r:?}");
    }
    for bad in [format!("Basic {token}"), format!("Bearer{token}"), format!("Bearer x{token}"), "Bearer".to_owned()] {
        let r = http(server.metrics_port, "GET", "/admin/status", Some(&bad), "");
        assert_eq!(r.map(|r| r.0), Some(401), "{bad}");
    }
}

fn turnctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_turnctl")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn disconnect_refuses_a_client_that_is_not_an_address() {
    let server = Turnd::start("");
    let admin = format!("127.0.0.1:{}", server.metrics_port);
    let token = server.dir.join("admin-token");
    let token = token.to_str().unwrap();
    for bad in ["garbage", "1.2.3", "127.0.0.1:", "127.0.0.1:99999", ""] {
        let (rc, out, err) = turnctl(&["disconnect", "--client", bad, "--admin", &admin, "--token-file", token]);
        assert_eq!(rc, 2, "--client {bad:?}: {out}{err}");
        assert!(err.contains("--client") && err.contains("IP:PORT"), "a clear message: {err}");
    }
    // Well-formed selectors that match nothing are fine.
    for good in ["198.51.100.7", "198.51.100.7:40000", "::1", "[::1]:40000"] {
        let (rc, out, err) = turnctl(&["disconnect", "--client", good, "--admin", &admin, "--token-file", token]);
        assert_eq!(rc, 0, "--client {good}: {err}");
        assert!(out.contains("disconnected 0"), "{out}");
    }
    // The API itself refuses it too (other clients than turnctl).
    let auth = format!("Bearer {}", server.admin_token());
    let r = http(server.metrics_port, "POST", "/admin/disconnect", Some(&auth), "{\"client\":\"garbage\"}");
    let (code, body) = r.expect("an answer");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("client"), "{body}");
}
