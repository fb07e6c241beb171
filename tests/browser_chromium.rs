//! A real browser relays through turnd: Debian's Chromium, headless, loads
//! `tests/browser/relay.html` (two relay-only RTCPeerConnections and a data
//! channel, see `common/browser.rs` for the harness and the Chromium flags
//! that matter), here with turnd and the browser both on loopback, over
//! each of TURN's transports. tests/netns_udp_blocked.rs runs the same page
//! from a network namespace where UDP is blocked.
//! Needs the `chromium` package (test.sh installs it).

mod common;
#[path = "common/browser.rs"]
mod browser;

use std::time::Instant;

use browser::{PageServer, PAGE_TIMEOUT};
use common::Turnd;

/// Runs the page against `turn_url` on a fresh turnd and checks the data
/// channel went through relay candidates of the expected relay protocol.
fn relay_case(turn_url: impl Fn(&Turnd) -> String, relay_protocol: &str) {
    let turnd = Turnd::builder().extra("[limits]\nlegacy_channel_numbers = true\n").streams().start();
    let turn_url = turn_url(&turnd);
    let server = PageServer::start("127.0.0.1");
    let (username, password) = browser::credentials();
    let started = Instant::now();
    let r = browser::run_browser_case(&server, &server.page_url(), &turn_url, &username, &password, PAGE_TIMEOUT, None);
    let context = || format!("{turn_url}: page result:\n{}\n--- turnd log ---\n{}", browser::pretty(&r), turnd.log());
    browser::assert_relayed(&r, &turn_url, relay_protocol, "127.0.0.1", &context);
    eprintln!("{}, case {} ms", browser::describe(&r), started.elapsed().as_millis());
}

#[test]
fn chromium_relays_over_turn_udp() {
    relay_case(|t| format!("turn:127.0.0.1:{}?transport=udp", t.port), "udp");
}

#[test]
fn chromium_relays_over_turn_tcp() {
    relay_case(|t| format!("turn:127.0.0.1:{}?transport=tcp", t.port), "tcp");
}

#[test]
fn chromium_relays_over_turns_tls() {
    relay_case(|t| format!("turns:localhost:{}?transport=tcp", t.tls_port), "tls");
}

/// REST usernames and passwords contain `:`, `+`, `/` and `=`.
#[test]
fn query_escape_covers_rest_credentials() {
    assert_eq!(browser::query_escape("1700000000:bob"), "1700000000%3Abob");
    assert_eq!(browser::query_escape("a+b/c=="), "a%2Bb%2Fc%3D%3D");
}
