//! A network whose only way out is an HTTP proxy, built for real: three
//! parties, addresses from 198.18.0.0/15 only.
//! - the server: turnd on the host (UDP and TCP 3478, TLS 443), on the host
//!   end of the proxy namespace's veth;
//! - the proxy: a namespace joined to the host, running Debian's squid with
//!   the stock access rules of /etc/squid/squid.conf (CONNECT only to port
//!   443: `http_access deny CONNECT !SSL_ports`), plus one line allowing
//!   this test's clients;
//! - the client: a namespace joined only to the proxy namespace, with no
//!   route but its /30 (namespaces do not forward): it reaches squid and
//!   nothing else.
//!
//! From the client, headless Chromium with `--proxy-server` relays its data
//! channel through `turns:HOST:443` (the selected pair relay over TLS) and
//! squid logs the CONNECT; a real call (fake camera and microphone, see
//! `common/call.rs`) carries audio and video both ways between Chromium
//! there and Chromium in a fourth namespace with plain UDP (where the
//! videobridge stands), which turnd relays to; `turnctl check --proxy` (and with HTTPS_PROXY)
//! relays over TLS on 443 through the proxy, reports TCP 3478 refused by
//! the proxy and UDP not tried, and exits 0.
//!
//! Needs root, `ip netns`, squid and chromium; test.sh installs the
//! packages. Fails, never skips, when something is missing.

mod common;
#[path = "common/browser.rs"]
mod browser;
#[path = "common/call.rs"]
mod call;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/squid.rs"]
mod squid;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use browser::{PageServer, PAGE_TIMEOUT};
use common::{Turnd, SECRET};
use netns::NetNs;
use serde_json::Value;
use squid::Squid;

const TLS_PORT: u16 = 443;
const PLAIN_PORT: u16 = 3478;
const PROXY_PORT: u16 = 3128;

/// "allocation created" lines of turnd's log for `client_ip` over `transport`.
fn allocations(log: &str, client_ip: &str, transport: &str) -> usize {
    let client = format!("client={client_ip}:");
    log.lines()
        .filter(|l| l.contains("allocation created") && l.contains(&client))
        .filter(|l| l.contains(&format!("transport={transport}")) || l.contains(&format!("transport=\"{transport}\"")))
        .count()
}

/// `turnctl check` in the client namespace (bounded by `timeout`), with
/// no proxy variables but those in `env`: (exit status, stdout, stderr).
fn check_in(ns: &NetNs, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = ns.command("timeout");
    c.args(["-k", "2", "40", env!("CARGO_BIN_EXE_turnctl"), "check"]).args(args);
    for v in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy"] {
        c.env_remove(v);
    }
    c.envs(env.iter().copied());
    let out = c.stdin(Stdio::null()).output().expect("run turnctl check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn proxy_only_network_relays_over_tls_443_through_squid() {
    let t0 = Instant::now();
    let proxy_ns = NetNs::create_open();
    let client_ns = NetNs::create_behind(&proxy_ns);
    let host = proxy_ns.host_ip().to_string(); // turnd, on the host
    let proxy_out = proxy_ns.ns_ip().to_string(); // squid, towards turnd
    let proxy_in = client_ns.host_ip(); // squid, towards the client
    let proxy_url = format!("http://{proxy_in}:{PROXY_PORT}");
    // Where the videobridge stands: ordinary UDP, reached from the relay.
    let bridge_ns = NetNs::create_open();
    let relay_ip = bridge_ns.host_ip().to_string();
    let bridge_ip = bridge_ns.ns_ip().to_string();

    let server = Turnd::builder().three(&host, PLAIN_PORT, TLS_PORT, &relay_ip).extra(&format!("[peers]\nallow = [\"{bridge_ip}/32\"]\n")).start();
    let squid = Squid::start(&proxy_ns, SocketAddr::new(proxy_in.into(), PROXY_PORT));
    let diag = |what: &str, text: &str| {
        format!(
            "{what}\n--- output ---\n{text}\n--- squid access.log ---\n{}\n--- squid cache.log ---\n{}\n--- turnd log ---\n{}",
            squid.access_log(),
            squid.cache_log(),
            server.log()
        )
    };

    // The client has no way out but the proxy: a direct TCP connect to
    // turnd's port 443 fails at once (no route).
    let direct = client_ns
        .command("timeout")
        .args(["-k", "1", "5", "bash", "-c", &format!("exec 3<>/dev/tcp/{host}/{TLS_PORT}")])
        .output()
        .expect("run bash");
    let direct_err = String::from_utf8_lossy(&direct.stderr).into_owned();
    assert!(!direct.status.success(), "{}", diag("the client reached turnd without the proxy", &direct_err));
    assert!(direct_err.contains("unreachable"), "{}", diag("a direct connect failed for another reason than no route", &direct_err));

    // Chromium behind the proxy: relay-only over turns:443, data channel.
    let (username, password) = browser::credentials();
    let page = PageServer::on(client_ns.tcp_listener("127.0.0.1:0".parse().unwrap()));
    let in_client = |argv: &[OsString]| {
        let mut c = client_ns.command(argv[0].to_str().unwrap());
        c.args(&argv[1..]);
        c
    };
    let tls_url = format!("turns:{host}:{TLS_PORT}?transport=tcp");
    let proxy_flag = format!("--proxy-server={proxy_url}");
    let r = browser::run_browser_case_with(
        &page,
        &page.page_url(),
        &tls_url,
        &username,
        &password,
        PAGE_TIMEOUT,
        Some(&in_client),
        &[&proxy_flag],
    );
    browser::assert_relayed(&r, &tls_url, "tls", &relay_ip, &|| diag("Chromium behind the proxy did not relay", &browser::pretty(&r)));
    eprintln!("Chromium behind {proxy_url}: {}", browser::describe(&r));
    // Through squid: turnd sees the proxy's address, squid logs the tunnel.
    let tls_allocs = allocations(&server.log(), &proxy_out, "tls");
    assert!(tls_allocs >= 2, "{}", diag(&format!("turnd logged {tls_allocs} TLS allocations from the proxy {proxy_out}"), ""));
    let line = squid.wait_access(&["CONNECT", &format!("{host}:{TLS_PORT}"), "TCP_TUNNEL/200"]);
    eprintln!("squid: {line}");

    // A real call from behind the proxy: camera and microphone both ways
    // between the participant (relay-only over turns:443 through squid)
    // and the other side on plain UDP.
    let tunnels = |log: &str| log.lines().filter(|l| l.contains("TCP_TUNNEL/200") && l.contains(&format!("{host}:{TLS_PORT}"))).count();
    let tunnels_before = tunnels(&squid.access_log());
    let context = || diag("", "");
    let (p, b) = call::run_call(&client_ns, &tls_url, &[&proxy_flag], &bridge_ns, &context);
    call::assert_call(&p, &b, &tls_url, "tls", &relay_ip, &bridge_ip, &context);
    let refused: Vec<String> = server.log().lines().filter(|l| l.contains("peer refused by policy")).map(str::to_owned).collect();
    assert!(refused.is_empty(), "{}", diag("turnd refused a peer during the call: the other side offered an address it may not reach", &refused.join("\n")));
    eprintln!("call from behind {proxy_url} to {bridge_ip}, relayed via {relay_ip}:");
    eprintln!("{}", call::figures("participant receives", &p));
    eprintln!("{}", call::figures("other side receives", &b));
    // The call's TURN connection went through squid too (logged once the
    // browser, and with it the tunnel, is gone).
    let deadline = Instant::now() + Duration::from_secs(10);
    while tunnels(&squid.access_log()) <= tunnels_before {
        assert!(Instant::now() < deadline, "{}", diag("squid logged no CONNECT tunnel for the call", ""));
        std::thread::sleep(Duration::from_millis(50));
    }

    // turnctl check through the proxy, by flag: TLS on 443 relays, TCP
    // 3478 is refused by the proxy's stock rule, UDP is not tried.
    let (rc, out, err) = check_in(&client_ns, &[&host, "--secret", SECRET, "--insecure", "--proxy", &proxy_url], &[]);
    let text = format!("{out}{err}");
    eprintln!("turnctl check --proxy {proxy_url} (exit {rc}):\n{out}{err}");
    assert_eq!(rc, 0, "{}", diag("turnctl check through the proxy must exit 0 (TLS relays)", &text));
    let lower = out.to_lowercase();
    assert!(
        lower.contains("the proxy refuses connect to port 3478: only 443 passes; browsers behind it can use turns: on 443"),
        "{}",
        diag("no clear word on the proxy refusing port 3478", &text)
    );
    assert!(lower.contains("udp was not tried"), "{}", diag("the report does not say UDP was not tried", &text));
    assert!(out.contains(&format!("through the HTTP proxy {proxy_url}")), "{}", diag("the report does not name the proxy", &text));
    squid.wait_access(&["TCP_DENIED/403", "CONNECT", &format!("{host}:{PLAIN_PORT}")]);

    // The same from the environment (HTTPS_PROXY), as JSON.
    let (rc, out, err) = check_in(&client_ns, &[&host, "--secret", SECRET, "--insecure", "--json"], &[("HTTPS_PROXY", &proxy_url)]);
    let j: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{}", diag(&format!("bad JSON ({e})"), &format!("{out}{err}"))));
    let ctx = || diag("turnctl check --json with HTTPS_PROXY", &format!("{out}{err}"));
    assert_eq!(rc, 0, "{}", ctx());
    assert_eq!(j["proxy"].as_str(), Some(proxy_url.as_str()), "{}", ctx());
    assert_eq!(j["relaying"], serde_json::json!(["tls"]), "{}", ctx());
    let t = |name: &str| j["transports"].as_array().and_then(|a| a.iter().find(|t| t["transport"] == name)).cloned().unwrap_or_default();
    assert_eq!(t("udp")["binding"]["status"], "skipped", "{}", ctx());
    assert!(t("udp")["binding"]["detail"].as_str().unwrap_or("").contains("UDP cannot go through an HTTP proxy"), "{}", ctx());
    assert_eq!(t("tcp")["binding"]["error"], "proxy_refused", "{}", ctx());
    assert!(t("tcp")["binding"]["detail"].as_str().unwrap_or("").contains("403"), "{}", ctx());
    assert_eq!(t("tls")["relays"], true, "{}", ctx());
    // Seen by the relay as the proxy.
    assert_eq!(t("tls")["mapped_address"].as_str().map(|a| a.split(':').next().unwrap_or("")), Some(proxy_out.as_str()), "{}", ctx());

    // NO_PROXY naming the relay turns the environment's proxy off: then
    // nothing gets out of this network at all.
    let (rc, out, _) = check_in(
        &client_ns,
        &[&host, "--secret", SECRET, "--insecure", "--timeout", "1s", "--json"],
        &[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", &host)],
    );
    let j: Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(rc, 1, "{}", diag("without the proxy nothing may relay from the client", &out));
    assert!(j["proxy"].is_null(), "{}", diag("NO_PROXY was ignored", &out));
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}
