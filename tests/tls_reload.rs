//! Certificate reload while an allocation relays over TLS: the traffic goes
//! on without loss, new connections get the new certificate, and a broken new
//! certificate keeps the old one serving.

mod common;

use std::process::Command;

use common::{file_cert_fingerprint, make_cert, served_cert_fingerprint, EchoPeer, Turnd, SECRET};

#[test]
fn sighup_swaps_the_certificate_without_dropping_traffic() {
    let server = Turnd::builder().extra("[limits]\nlegacy_channel_numbers = true\n").streams().start();
    let tls_addr = format!("127.0.0.1:{}", server.tls_port);
    let old = file_cert_fingerprint(&server.dir.join("cert.pem"));
    assert!(old.contains("Fingerprint"), "openssl printed {old:?}");
    assert_eq!(served_cert_fingerprint(&tls_addr), old);

    // A TLS client relays 2 x 150 messages at 20 ms intervals (about 3 s of traffic).
    let peer = EchoPeer::start();
    let child = Command::new("timeout")
        .args(["60", "turnutils_uclient", "-c", "-t", "-S", "-e", common::PEER_IP, "-r"])
        .arg(peer.addr.port().to_string())
        .args(["-m", "2", "-n", "150", "-l", "120", "-p"])
        .arg(server.tls_port.to_string())
        .args(["-W", SECRET, "127.0.0.1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run turnutils_uclient");

    // Wait (bounded) until its allocations exist, then swap the files and reload.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while server.log().matches("transport=\"tls\"").count() < 2 {
        assert!(std::time::Instant::now() < deadline, "no TLS allocation: {}", server.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A broken certificate first: rejected, the old one keeps serving.
    std::fs::write(server.dir.join("cert.pem"), "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n").unwrap();
    server.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !server.log().contains("not reloaded") {
        assert!(std::time::Instant::now() < deadline, "no reload failure logged: {}", server.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(served_cert_fingerprint(&tls_addr), old);

    make_cert(&server.dir, "cert.pem", "key.pem", "turnd-test-b");
    let new = file_cert_fingerprint(&server.dir.join("cert.pem"));
    assert_ne!(new, old);
    server.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if served_cert_fingerprint(&tls_addr) == new {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "new certificate not served: {}", server.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let line = text.lines().rfind(|l| l.contains("Total lost packets")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("Total lost packets 0 "), "traffic lost across the reload: {line}");
    assert!(text.contains("tot_send_msgs=300, tot_recv_msgs=300"), "{text}");
}
