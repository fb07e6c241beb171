//! coturn's turnutils_uclient relays through turnd to a UDP echo peer.
//! The client is independent of our code: it checks integrity on every
//! response and counts every echoed message.

mod common;

use std::process::Command;

use common::{EchoPeer, Turnd, SECRET};

fn uclient_port(args: &[&str], port: u16, server: &Turnd) -> (i32, String) {
    let bin = "turnutils_uclient";
    assert!(
        Command::new("sh").arg("-c").arg(format!("command -v {bin}")).output().unwrap().status.success(),
        "{bin} is missing: the README's test command installs Debian's coturn package"
    );
    let _ = server;
    let port = port.to_string();
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin)
        .args(args)
        .args(["-p", &port, "-W", SECRET, "127.0.0.1"])
        .output()
        .expect("run turnutils_uclient");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn relay_run(mode: &[&str], clients: u32, messages: u32) {
    relay_run_sessions(mode, clients, messages, false)
}

/// With `rtcp`, each client makes an RTP/RTCP pair of allocations using
/// EVEN-PORT with the R bit and RESERVATION-TOKEN (no `-c`).
fn relay_run_sessions(mode: &[&str], clients: u32, messages: u32, rtcp: bool) {
    let server = Turnd::builder().extra("[limits]\nlegacy_channel_numbers = true\n").streams().start();
    let peer = EchoPeer::start();
    let peer_port = peer.addr.port().to_string();
    let m = clients.to_string();
    let n = messages.to_string();
    let mut args = vec!["-e", common::PEER_IP, "-r", &peer_port, "-m", &m, "-n", &n, "-l", "200"];
    args.extend_from_slice(mode);
    if !rtcp {
        args.push("-c");
    }
    // Without -c, uclient rounds the client count up to even RTP/RTCP pairs.
    let sessions = if rtcp { clients.div_ceil(2) * 2 } else { clients };
    let port = if mode.contains(&"-S") { server.tls_port } else { server.port };
    let (rc, text) = uclient_port(&args, port, &server);
    assert_eq!(rc, 0, "turnutils_uclient failed:\n{text}\n--- turnd log ---\n{}", server.log());
    let s = common::uclient_summary(&text);
    let echoed = peer.finish();
    eprintln!("uclient {mode:?}: sent {} received {} lost {} (peer echoed {echoed})", s.sent, s.received, s.lost);
    assert_eq!(s.sent, (sessions * messages) as u64, "{text}");
    assert_eq!(s.received, s.sent, "loss through turnd:\n{text}");
    assert_eq!(s.lost, 0);
    assert!(echoed >= s.sent, "the peer saw every message ({echoed} < {})", s.sent);
}

#[test]
fn uclient_udp_channels_no_loss() {
    relay_run(&[], 4, 100);
}

#[test]
fn uclient_udp_rtp_rtcp_pairs_with_reservations() {
    relay_run_sessions(&[], 4, 50, true);
}

#[test]
fn uclient_udp_send_indications_no_loss() {
    relay_run(&["-s"], 4, 100);
}

#[test]
fn uclient_tcp_no_loss() {
    relay_run(&["-t"], 4, 100);
}

#[test]
fn uclient_tls_no_loss() {
    relay_run(&["-t", "-S"], 4, 100);
}

#[test]
fn uclient_wrong_secret_is_refused() {
    let server = Turnd::start("");
    let peer = EchoPeer::start();
    let port = server.port.to_string();
    let peer_port = peer.addr.port().to_string();
    let out = Command::new("timeout")
        .args(["60", "turnutils_uclient", "-c", "-e", common::PEER_IP, "-r", &peer_port, "-n", "2", "-p", &port])
        .args(["-W", "not-the-secret", "127.0.0.1"])
        .output()
        .expect("run turnutils_uclient");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("Cannot complete Allocation"), "{text}");
    assert_eq!(peer.finish(), 0, "nothing reached the peer");
}
