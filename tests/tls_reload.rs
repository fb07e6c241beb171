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

    // The served file certificate's expiry, as openssl reads it, is a metric
    // and in turnctl status, as for ACME.
    let end = Command::new("openssl").args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in"]).arg(server.dir.join("cert.pem")).output().unwrap();
    let end = String::from_utf8_lossy(&end.stdout).trim().trim_start_matches("notAfter=").to_owned();
    let epoch = Command::new("date").args(["-u", "-d", &end, "+%s"]).output().unwrap();
    let epoch: f64 = String::from_utf8_lossy(&epoch.stdout).trim().parse().unwrap_or_else(|_| panic!("openssl's end date {end:?}"));
    assert_eq!(server.metric("turnd_tls_certificate_expiry_timestamp_seconds"), epoch);
    let st = Command::new(env!("CARGO_BIN_EXE_turnctl"))
        .args(["status", "--json", "--admin", &format!("127.0.0.1:{}", server.metrics_port), "--token-file"])
        .arg(server.dir.join("admin-token"))
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["tls"]["source"], "files");
    assert_eq!(st["tls"]["not_after"].as_f64(), Some(epoch));
    assert_eq!(st["tls"]["names"], serde_json::json!(["127.0.0.1", "localhost"]));

    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let line = text.lines().rfind(|l| l.contains("Total lost packets")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("Total lost packets 0 "), "traffic lost across the reload: {line}");
    assert!(text.contains("tot_send_msgs=300, tot_recv_msgs=300"), "{text}");
}
