//! Soak: allocation churn with relayed traffic against a real turnd, then a
//! check that memory and file descriptors come back to where they were.
//! Bounded (a few minutes) and outside the default test run (`#[ignore]`):
//!
//! ```sh
//! cargo test --release --test soak -- --ignored --nocapture    # SOAK_SECONDS=120 by default
//! ```
//!
//! Workers churn allocations over UDP (deleted with Refresh 0, or abandoned
//! to expire), TCP and TLS (freed when the connection closes), each relaying
//! packets through a channel or Send indications to an echo peer. Before the
//! churn, a warm-up of the same mix (also drained to zero) sets the baseline,
//! so the allocator's and tables' working size is already there; after the
//! churn, once every allocation has ended, RSS and the open descriptors of
//! turnd (/proc/PID/status, /proc/PID/fd) must be back to that baseline.

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::Resp;
use turnd::stun::{method, Class};
use wire::{peer_at, Incoming, StreamClient, UdpClient};

const LIFETIME: u64 = 60;

#[derive(Clone, Copy, Debug)]
struct Mem {
    rss_kib: u64,
    hwm_kib: u64,
    fds: usize,
}

fn mem(pid: u32) -> Mem {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    Mem { rss_kib: field("VmRSS:"), hwm_kib: field("VmHWM:"), fds }
}

#[derive(Default)]
struct Counts {
    allocations: AtomicU64,
    sent: AtomicU64,
    echoed: AtomicU64,
}

/// One allocation's life in mode `i % 5`; returns after it is over. An
/// abandoned UDP allocation's socket goes to `keep` (its port must not be
/// reused by a later client while the allocation lives: that would be 437).
fn one_allocation(i: u64, worker: usize, server: &common::Turnd, peer: std::net::SocketAddr, counts: &Counts, keep: &mut Vec<UdpClient>) {
    let tcp = std::net::SocketAddr::new(server.addr.ip(), server.port);
    let tls = std::net::SocketAddr::new(server.addr.ip(), server.tls_port);
    let packets = 10 + (i % 20) as usize;
    let payload = |k: usize| vec![(k % 251) as u8; 40 + (k * 37) % 1200];
    let mode = i % 5;
    let user = format!("soak{}", worker);
    match mode {
        0 | 1 => {
            // UDP from this worker's own loopback address (the unauthenticated
            // rate limit is per source IP, as for real clients).
            let mut c = UdpClient::new(&format!("127.0.1.{}", worker + 1), server.addr);
            c.allocate(&user, common::SECRET);
            counts.allocations.fetch_add(1, Ordering::Relaxed);
            let channel = mode == 0;
            let r: Resp = if channel {
                c.transact(method::CHANNEL_BIND, &[harness::channel(0x4000), peer_at(peer)])
            } else {
                c.transact(method::CREATE_PERMISSION, &[peer_at(peer)])
            };
            assert_eq!(r.class(), Class::Success);
            for k in 0..packets {
                if channel {
                    c.send_channel(0x4000, &payload(k));
                } else {
                    c.send_indication(peer, &payload(k));
                }
                counts.sent.fetch_add(1, Ordering::Relaxed);
                if c.recv(Duration::from_millis(500)).is_some() {
                    counts.echoed.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !i.is_multiple_of(50) {
                assert_eq!(c.transact(method::REFRESH, &[harness::A::U32(turnd::stun::attr::LIFETIME, 0)]).class(), Class::Success);
            } else {
                // Abandoned, to expire after LIFETIME.
                keep.push(c);
            }
        }
        _ => {
            let mut c = if mode == 4 { StreamClient::tls(tls) } else { StreamClient::tcp(tcp) };
            c.allocate(&user, common::SECRET);
            counts.allocations.fetch_add(1, Ordering::Relaxed);
            assert_eq!(c.transact(method::CHANNEL_BIND, &[harness::channel(0x4000), peer_at(peer)]).class(), Class::Success);
            for k in 0..packets {
                c.send_channel(0x4000, &payload(k));
                counts.sent.fetch_add(1, Ordering::Relaxed);
                if let Some(Incoming::Channel { .. }) = c.recv(Duration::from_millis(500)) {
                    counts.echoed.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Dropped: the connection closes and frees the allocation.
        }
    }
}

/// Churns with `workers` threads for `secs` seconds.
fn churn(server: &Arc<common::Turnd>, peer: std::net::SocketAddr, workers: usize, secs: u64) -> (Arc<Counts>, Vec<UdpClient>) {
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (server, counts, stop) = (server.clone(), counts.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = w as u64;
                let mut keep = Vec::new();
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    one_allocation(i, w, &server, peer, &counts, &mut keep);
                    i += workers as u64;
                }
                keep
            })
        })
        .collect();
    let mut abandoned = Vec::new();
    for h in handles {
        match h.join() {
            Ok(keep) => abandoned.extend(keep),
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                panic!("a churn worker failed");
            }
        }
    }
    (counts, abandoned)
}

/// Waits (bounded) until turnd holds no allocation, connection or relay port.
fn wait_drained(server: &common::Turnd, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (_, body) = server.http_get("/metrics");
        let sum = |prefix: &str| -> f64 {
            body.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
        };
        let busy = sum("turnd_allocations{") + sum("turnd_connections{") + sum("turnd_relay_ports{state=\"in_use\"}");
        if busy == 0.0 {
            return;
        }
        assert!(Instant::now() < deadline, "turnd did not drain within {limit:?}: {busy} still in use");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
#[ignore = "soak: minutes long; run with --ignored"]
fn soak_allocation_churn_returns_to_baseline() {
    let secs: u64 = std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    let workers = 8;
    let server = Arc::new(common::Turnd::builder().extra(&format!(
        "[limits]\ndefault_lifetime = \"{LIFETIME}s\"\nchannel_lifetime = \"60s\"\n"
    )).streams().start());
    let peer = common::EchoPeer::start();
    let pid = server.pid();
    let fresh = mem(pid);
    let drain = Duration::from_secs(LIFETIME + 30);

    // As long as an abandoned allocation lives, so the warm-up reaches the
    // churn's steady state (how many allocations are alive at once).
    let warm_secs = LIFETIME + 10;
    let (warm, abandoned) = churn(&server, peer.addr, workers, warm_secs);
    wait_drained(&server, drain);
    drop(abandoned);
    let base = mem(pid);

    let t0 = Instant::now();
    let (c, abandoned) = churn(&server, peer.addr, workers, secs);
    let during = mem(pid);
    let churn_time = t0.elapsed();
    wait_drained(&server, drain);
    drop(abandoned);
    let after = mem(pid);

    let (allocs, sent, echoed) = (c.allocations.load(Ordering::Relaxed), c.sent.load(Ordering::Relaxed), c.echoed.load(Ordering::Relaxed));
    eprintln!("soak: {workers} workers, {secs} s (after a {warm_secs} s warm-up: {} allocations)", warm.allocations.load(Ordering::Relaxed));
    eprintln!(
        "  churn: {allocs} allocations ({:.0}/s) over UDP/TCP/TLS, {sent} packets relayed, {echoed} echoed ({:.2}% lost)",
        allocs as f64 / churn_time.as_secs_f64(),
        100.0 * (sent - echoed) as f64 / sent.max(1) as f64
    );
    for (when, m) in [("fresh", fresh), ("baseline (after warm-up, drained)", base), ("end of churn", during), ("after churn, drained", after)] {
        eprintln!("  {when:<36} RSS {:>7} KiB  peak {:>7} KiB  fds {}", m.rss_kib, m.hwm_kib, m.fds);
    }
    assert!(allocs > 100, "the churn ran ({allocs} allocations)");
    assert!(echoed as f64 >= sent as f64 * 0.99, "relayed traffic: {echoed}/{sent}");
    assert!(after.fds <= base.fds + 2, "file descriptors: {} before, {} after", base.fds, after.fds);
    assert!(after.fds <= fresh.fds + 2, "file descriptors: {} fresh, {} after", fresh.fds, after.fds);
    // Memory: back to the warmed-up baseline within 5% + 2 MiB (allocator
    // slack; a leak of 10 bytes per allocation would already exceed it).
    let tolerance = base.rss_kib / 20 + 2048;
    assert!(after.rss_kib <= base.rss_kib + tolerance, "RSS {} KiB after, baseline {} KiB", after.rss_kib, base.rss_kib);
    assert_eq!(server.metric("turnd_allocations_created_total") as u64, allocs + warm.allocations.load(Ordering::Relaxed));
    peer.finish();
}
