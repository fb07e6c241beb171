//! Upgrade in place: `turnctl upgrade` hands the listening sockets and every
//! UDP allocation to a new process while media flows, and TCP/TLS
//! connections finish on the old one. Failed upgrades (a binary that exits,
//! a configuration the new binary refuses, a new process killed in the
//! middle of the handover) leave the old process serving everything.

mod common;
#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{turnctl_upgrade, Turnd, SECRET};
use harness::{channel, A};
use serde_json::Value;
use turnd::stun::{method, ChannelData, Class};
use wire::{peer_at, StreamClient, UdpClient};

/// Kills the processes an upgrade started (not children of the test) however the test ends.
struct Reaper(Mutex<Vec<u32>>);

impl Reaper {
    fn new() -> Reaper {
        Reaper(Mutex::new(Vec::new()))
    }
    fn add(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in self.0.lock().unwrap().iter() {
            // SAFETY: kill takes plain integers; a gone pid only fails.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

fn alive(pid: u32) -> bool {
    // Not a zombie: the new process is not our child, the old one is reaped by the harness.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| !r.trim_start().starts_with('Z')))
}

/// A copy of the binary under test elsewhere, as a package upgrade installs one.
fn second_binary(dir: &Path) -> PathBuf {
    let p = dir.join("turnd-next");
    std::fs::copy(env!("CARGO_BIN_EXE_turnd"), &p).unwrap();
    p
}

/// Permission and channel `number` for `peer` on a client's allocation.
fn bind(transact: &mut dyn FnMut(u16, &[A]) -> harness::Resp, number: u16, peer: SocketAddr) {
    assert_eq!(transact(method::CREATE_PERMISSION, &[peer_at(peer)]).class(), Class::Success);
    assert_eq!(transact(method::CHANNEL_BIND, &[channel(number), peer_at(peer)]).class(), Class::Success);
}

/// Media both ways on many UDP allocations through their channels, at a
/// steady rate, counted exactly: every datagram names its allocation and
/// sequence number.
struct Load {
    stop: Arc<AtomicBool>,
    sender: std::thread::JoinHandle<(u64, u64)>,
    receiver: std::thread::JoinHandle<Received>,
    sent_done: Arc<Mutex<Option<(u64, u64)>>>,
}

#[derive(Debug, Default)]
struct Received {
    to_peer: u64,
    to_client: u64,
    wrong: u64,
    /// Longest time without any datagram arriving, each way.
    gap_to_peer: Duration,
    gap_to_client: Duration,
}

const FIRST_CHANNEL: u16 = 0x4000;

impl Load {
    /// `clients[i]` has channel FIRST_CHANNEL + i to `peer` and relayed address `relayed[i]`.
    fn start(clients: Vec<UdpSocket>, relayed: Vec<SocketAddr>, peer: UdpSocket, server: SocketAddr, round: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent_done = Arc::new(Mutex::new(None));
        // The peer receives every flow: room for a few hundred milliseconds of
        // them, so a test thread kept off the CPU a moment loses nothing.
        for fd in clients.iter().map(|c| c.as_raw_fd()).chain([peer.as_raw_fd()]) {
            let size: libc::c_int = 8 << 20;
            // SAFETY: a live socket and an int option of the size we pass (FORCE: root may exceed rmem_max).
            unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size as *const _ as *const libc::c_void, 4) };
        }
        let clients = Arc::new(clients);
        let peer = Arc::new(peer);
        let sender = {
            let (stop, clients, peer, relayed) = (stop.clone(), clients.clone(), peer.clone(), relayed.clone());
            std::thread::spawn(move || {
                let (mut to_peer, mut to_client) = (0u64, 0u64);
                let mut seq = 0u32;
                let mut next = Instant::now();
                // Bounded: the test stops it; 120 s is far past any test's length.
                let until = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    for (i, c) in clients.iter().enumerate() {
                        let mut p = [0u8; 12];
                        p[..4].copy_from_slice(&(i as u32).to_be_bytes());
                        p[4..8].copy_from_slice(&seq.to_be_bytes());
                        let mut b = ChannelData::header(FIRST_CHANNEL + i as u16, p.len()).to_vec();
                        b.extend_from_slice(&p);
                        c.send_to(&b, server).unwrap();
                        to_peer += 1;
                        peer.send_to(&p, relayed[i]).unwrap();
                        to_client += 1;
                    }
                    seq += 1;
                    next += round;
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(d);
                    }
                }
                (to_peer, to_client)
            })
        };
        let receiver = {
            let (stop, clients, peer, done) = (stop.clone(), clients.clone(), peer.clone(), sent_done.clone());
            std::thread::spawn(move || {
                let index: HashMap<SocketAddr, usize> = relayed.iter().enumerate().map(|(i, a)| (*a, i)).collect();
                let mut fds: Vec<libc::pollfd> = clients.iter().map(|c| c.as_raw_fd()).chain([peer.as_raw_fd()]).map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
                for c in clients.iter() {
                    c.set_nonblocking(true).unwrap();
                }
                peer.set_nonblocking(true).unwrap();
                let mut r = Received::default();
                let (mut last_peer, mut last_client) = (Instant::now(), Instant::now());
                let mut buf = [0u8; 2048];
                let deadline = Instant::now() + Duration::from_secs(150);
                loop {
                    assert!(Instant::now() < deadline, "the load ran past its bound");
                    if stop.load(Ordering::Relaxed)
                        && let Some((p, c)) = *done.lock().unwrap()
                        && r.to_peer + r.wrong >= p
                        && r.to_client >= c
                    {
                        return r;
                    }
                    // SAFETY: poll reads and writes the array we pass, of the length we pass.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
                    if n <= 0 {
                        if stop.load(Ordering::Relaxed) && done.lock().unwrap().is_some() && last_peer.elapsed() > Duration::from_secs(3) && last_client.elapsed() > Duration::from_secs(3) {
                            return r; // what is missing is lost
                        }
                        continue;
                    }
                    let now = Instant::now();
                    for (k, f) in fds.iter_mut().enumerate() {
                        if f.revents == 0 {
                            continue;
                        }
                        f.revents = 0;
                        if k == clients.len() {
                            while let Ok((n, from)) = peer.recv_from(&mut buf) {
                                let i = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                                if n == 12 && index.get(&from) == Some(&i) {
                                    r.to_peer += 1;
                                } else {
                                    r.wrong += 1;
                                }
                                r.gap_to_peer = r.gap_to_peer.max(now.duration_since(last_peer));
                                last_peer = now;
                            }
                        } else {
                            while let Ok(n) = clients[k].recv(&mut buf) {
                                // A late answer to a retransmitted setup request is not media.
                                if turnd::stun::Message::parse(&buf[..n]).is_ok_and(|m| m.class() != Class::Indication) {
                                    continue;
                                }
                                let ok = ChannelData::parse(&buf[..n]).is_some_and(|cd| {
                                    cd.channel == FIRST_CHANNEL + k as u16 && cd.data.len() == 12 && u32::from_be_bytes(cd.data[..4].try_into().unwrap()) as usize == k
                                });
                                if ok {
                                    r.to_client += 1;
                                } else {
                                    r.wrong += 1;
                                }
                                r.gap_to_client = r.gap_to_client.max(now.duration_since(last_client));
                                last_client = now;
                            }
                        }
                    }
                }
            })
        };
        Load { stop, sender, receiver, sent_done }
    }

    /// Stops sending, waits (bounded) for what is in flight; (sent each way, received).
    fn finish(self) -> ((u64, u64), Received) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.join().unwrap();
        *self.sent_done.lock().unwrap() = Some(sent);
        (sent, self.receiver.join().unwrap())
    }
}

/// `n` UDP allocations, each with a permission and channel FIRST_CHANNEL + i
/// to `peer`: their sockets and relayed addresses.
fn udp_allocations(server: SocketAddr, peer: SocketAddr, n: usize) -> (Vec<UdpSocket>, Vec<SocketAddr>) {
    let (mut socks, mut relayed) = (Vec::new(), Vec::new());
    for i in 0..n {
        let mut c = UdpClient::new("127.0.0.1", server);
        relayed.push(c.allocate(&format!("u{i}"), SECRET));
        bind(&mut |m, a| c.transact(m, a), FIRST_CHANNEL + i as u16, peer);
        socks.push(c.sock);
    }
    (socks, relayed)
}

/// UDP sessions by client address (a TCP client may have the same address and port).
fn sessions(server: &Turnd) -> HashMap<String, Value> {
    let all = server.admin_get("/admin/sessions");
    all.as_array().unwrap().iter().filter(|s| s["transport"] == "udp").map(|s| (s["client"].as_str().unwrap().to_owned(), s.clone())).collect()
}

/// A stream client's round trip through its channel to `peer`, both ways.
fn stream_round_trip(c: &mut StreamClient, number: u16, relayed: SocketAddr, peer: &UdpSocket, tag: &[u8]) {
    c.send_channel(number, tag);
    let mut buf = [0u8; 256];
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (n, from) = peer.recv_from(&mut buf).expect("the peer got the stream client's data");
    assert_eq!((&buf[..n], from), (tag, relayed));
    peer.send_to(tag, relayed).unwrap();
    match c.recv(Duration::from_secs(5)) {
        Some(wire::Incoming::Channel { number: got, data }) => assert_eq!((got, &data[..]), (number, tag)),
        other => panic!("the stream client got {other:?} back"),
    }
}

#[test]
fn an_upgrade_under_load_loses_no_datagram_and_resets_no_connection() {
    let reaper = Reaper::new();
    let mut server = Turnd::builder().streams().extra("[limits]\nallocation_bandwidth = \"20 Mbit/s\"\n").start();
    let old_pid = server.pid();
    let peer = UdpSocket::bind((common::PEER_IP, 0)).unwrap();
    let (clients, relayed) = udp_allocations(server.addr, peer.local_addr().unwrap(), 200);
    let client_addrs: Vec<String> = clients.iter().map(|c| c.local_addr().unwrap().to_string()).collect();

    // 20 TCP and 20 TLS clients, each with a channel to a peer of their own.
    let stream_peer = UdpSocket::bind((common::PEER_IP, 0)).unwrap();
    let sp = stream_peer.local_addr().unwrap();
    let mut streams: Vec<(StreamClient, u16, SocketAddr)> = Vec::new();
    for i in 0..40 {
        let mut c = if i < 20 { StreamClient::tcp(server.addr) } else { StreamClient::tls(SocketAddr::new(server.addr.ip(), server.tls_port)) };
        let r = c.allocate(&format!("s{i}"), SECRET);
        let number = 0x4800 + i as u16;
        bind(&mut |m, a| c.transact(m, a), number, sp);
        streams.push((c, number, r));
    }
    for (i, (c, n, r)) in streams.iter_mut().enumerate() {
        stream_round_trip(c, *n, *r, &stream_peer, format!("before {i}").as_bytes());
    }

    // 200 allocations x 2 directions x 50 rounds/s: 20,000 datagrams a second.
    let load = Load::start(clients, relayed.clone(), peer, server.addr, Duration::from_millis(20));
    // A second of steady load, then a snapshot of what must be carried.
    std::thread::sleep(Duration::from_secs(1));
    let before = sessions(&server);
    let asked = Instant::now();
    let binary = second_binary(&server.dir);
    let (code, out) = turnctl_upgrade(&server, &binary);
    assert_eq!(code, 0, "turnctl upgrade: {out}\n{}", server.log());
    let status = server.admin_get("/admin/status");
    let new_pid = status["pid"].as_u64().unwrap() as u32;
    reaper.add(new_pid);
    assert_ne!(new_pid, old_pid, "{out}");
    assert!(out.contains(&format!("process {new_pid} serves the listeners and 200 UDP allocations")), "{out}");

    // A new participant is served by the new process at once.
    let mut fresh = UdpClient::new("127.0.0.1", server.addr);
    fresh.allocate("fresh", SECRET);
    let served_in = asked.elapsed();
    let after = sessions(&server);
    assert!(after.contains_key(&fresh.sock.local_addr().unwrap().to_string()), "the new allocation is the new process's");

    // Another second of load through the new process.
    std::thread::sleep(Duration::from_secs(1));
    let (sent, got) = load.finish();
    assert_eq!(got.wrong, 0, "{got:?}");
    assert_eq!((got.to_peer, got.to_client), sent, "every datagram arrived, each way: {got:?}\n{}", server.log());
    eprintln!("sent {sent:?}; longest gap to peer {:?}, to client {:?}; new allocations served {:?} after the command", got.gap_to_peer, got.gap_to_client, served_in);

    // Every UDP allocation's state came along: relayed address, permission,
    // channel, expiry; its counters went on from where they were.
    for a in &client_addrs {
        let (b, n) = (&before[a], &after[a]);
        assert_eq!(b["relayed"], n["relayed"], "{a}");
        assert_eq!(b["peers"], n["peers"], "{a}");
        assert_eq!(b["channels"], n["channels"], "{a}");
        assert_eq!(n["transport"], "udp");
        let (be, ne) = (b["expires_in_s"].as_i64().unwrap(), n["expires_in_s"].as_i64().unwrap());
        assert!(ne <= be && be - ne <= 3, "{a}: expiry {be} s before, {ne} s after");
        assert!(n["packets_to_peer"].as_u64() >= b["packets_to_peer"].as_u64(), "{a}");
        assert!(n["age_s"].as_u64() >= b["age_s"].as_u64(), "{a}");
    }
    // The stream clients stay with the old process, not reset, relaying.
    let streams_after = server.admin_get("/admin/sessions").as_array().unwrap().iter().filter(|s| s["transport"] != "udp").count();
    assert_eq!(streams_after, 0, "TCP/TLS allocations stay with the old process");
    assert!(alive(old_pid));
    for (i, (c, n, r)) in streams.iter_mut().enumerate() {
        stream_round_trip(c, *n, *r, &stream_peer, format!("after {i}").as_bytes());
    }
    // Once they end, the old process exits by itself.
    drop(streams);
    let st = server.wait_exit(Duration::from_secs(10)).expect("the old process exits once its connections ended");
    assert!(st.success(), "{st}");
    assert!(alive(new_pid), "the new process serves on");
    let log = server.log();
    assert!(log.contains("took over from the previous process"), "{log}");
    assert!(log.contains("every connection ended"), "{log}");
}

/// A relay with one UDP allocation relaying steadily, for the failure cases.
fn relaying_server() -> (Turnd, Load) {
    let server = Turnd::builder().streams().start();
    let peer = UdpSocket::bind((common::PEER_IP, 0)).unwrap();
    let (clients, relayed) = udp_allocations(server.addr, peer.local_addr().unwrap(), 20);
    let load = Load::start(clients, relayed, peer, server.addr, Duration::from_millis(10));
    (server, load)
}

#[test]
fn failed_upgrades_leave_the_old_process_serving_everything() {
    let reaper = Reaper::new();
    let (mut server, load) = relaying_server();
    let old_pid = server.pid();

    // 1. A binary that exits at once.
    let (code, out) = turnctl_upgrade(&server, Path::new("/bin/false"));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("exited") && out.contains("exit status: 1"), "{out}");

    // 2. A configuration the new binary refuses (the running one is not reloaded).
    let good = std::fs::read_to_string(&server.config).unwrap();
    std::fs::write(&server.config, format!("{good}\n[relay]\nports = \"9-8\"\n")).unwrap();
    let (code, out) = turnctl_upgrade(&server, &second_binary(&server.dir));
    std::fs::write(&server.config, &good).unwrap();
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("refused") && out.contains("configuration error"), "{out}");

    // 3. A new process killed in the middle of the handover: after it has
    // every socket, before it serves.
    let dying = server.dir.join("turnd-dies");
    std::fs::write(&dying, format!("#!/bin/sh\nTURND_TEST_HANDOVER_DIE=1 exec {} \"$@\"\n", env!("CARGO_BIN_EXE_turnd"))).unwrap();
    std::fs::set_permissions(&dying, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (code, out) = turnctl_upgrade(&server, &dying);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("failed before it took over"), "{out}");

    // 4. A binary another user could have written: not started at all.
    let writable = server.dir.join("turnd-writable");
    std::fs::copy(env!("CARGO_BIN_EXE_turnd"), &writable).unwrap();
    std::fs::set_permissions(&writable, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let (code, out) = turnctl_upgrade(&server, &writable);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("writable by other users"), "{out}");

    // Nothing was lost meanwhile, and the old process serves everything.
    assert_eq!(server.admin_get("/admin/status")["pid"].as_u64(), Some(old_pid as u64));
    let mut fresh = UdpClient::new("127.0.0.1", server.addr);
    fresh.allocate("fresh", SECRET);
    let mut tcp = StreamClient::tcp(server.addr);
    tcp.allocate("tcp", SECRET);
    let (sent, got) = load.finish();
    assert_eq!((got.to_peer, got.to_client, got.wrong), (sent.0, sent.1, 0), "{got:?}\n{}", server.log());
    assert!(server.log().matches("upgrade failed, this process serves on").count() == 4, "{}", server.log());

    // And an upgrade after them works.
    let (code, out) = turnctl_upgrade(&server, &second_binary(&server.dir));
    assert_eq!(code, 0, "{out}");
    reaper.add(server.admin_get("/admin/status")["pid"].as_u64().unwrap() as u32);
    drop(tcp);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
}

/// What a notify socket received, with the sender's pid (SO_PASSCRED), as
/// systemd sees it.
fn recv_notify(sock: &std::os::unix::net::UnixDatagram) -> Option<(u32, String)> {
    let mut body = [0u8; 512];
    let mut iov = libc::iovec { iov_base: body.as_mut_ptr() as *mut libc::c_void, iov_len: body.len() };
    let mut control = [0u64; 8];
    // SAFETY: recvmsg fills the buffers the header points at, which outlive
    // the call; CMSG_* walk what it wrote within msg_controllen.
    unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        mh.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut mh, 0);
        if n < 0 {
            return None;
        }
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                let cred = (libc::CMSG_DATA(c) as *const libc::ucred).read_unaligned();
                return Some((cred.pid as u32, String::from_utf8_lossy(&body[..n as usize]).into_owned()));
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    None
}

#[test]
fn under_systemd_the_main_pid_moves_and_the_watchdog_stays_fed() {
    let reaper = Reaper::new();
    let dir = common::temp_dir("notify");
    let path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let on: libc::c_int = 1;
    // SAFETY: a live socket and an int option of the size we pass.
    let rc = unsafe { libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PASSCRED, &on as *const _ as *const libc::c_void, 4) };
    assert_eq!(rc, 0);
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    // A 1 s watchdog, as WatchdogSec=1 would set it.
    let wrap = ["env".to_owned(), format!("NOTIFY_SOCKET={}", path.display()), "WATCHDOG_USEC=1000000".to_owned()];
    let mut server = Turnd::builder().wrap(&wrap).start();
    let old = server.pid();

    // Follow the messages as systemd with NotifyAccess=main does: only the
    // main process's count, and MAINPID= moves it.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut main = old;
            let mut last_ping: Option<Instant> = None;
            let mut longest = Duration::ZERO;
            let mut log = Vec::new();
            let until = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                let Some((pid, msg)) = recv_notify(&sock) else { continue };
                log.push(format!("{pid}: {msg:?}"));
                if pid != main {
                    continue;
                }
                for field in msg.lines() {
                    if field == "WATCHDOG=1" {
                        let now = Instant::now();
                        if let Some(l) = last_ping {
                            longest = longest.max(now - l);
                        }
                        last_ping = Some(now);
                    }
                    if field == "STOPPING=1" {
                        log.push("the main process said it stops".into());
                    }
                    if let Some(p) = field.strip_prefix("MAINPID=") {
                        main = p.parse().unwrap();
                    }
                }
            }
            (main, longest, log)
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let (code, out) = turnctl_upgrade(&server, &second_binary(&server.dir));
    assert_eq!(code, 0, "{out}");
    let new = server.admin_get("/admin/status")["pid"].as_u64().unwrap() as u32;
    reaper.add(new);
    // The old process has nothing left: it exits; the new one goes on pinging.
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let (main, longest, log) = watcher.join().unwrap();
    assert_eq!(main, new, "MAINPID moved to the new process: {log:#?}");
    assert!(log.iter().any(|l| l.starts_with(&format!("{new}: ")) && l.contains("WATCHDOG=1")), "the new process pings: {log:#?}");
    assert!(longest < Duration::from_secs(1), "the watchdog went {longest:?} without a ping from the main process: {log:#?}");
    assert!(!log.iter().any(|l| l.contains("stops")), "{log:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigusr2_upgrades_to_the_binary_at_the_path_turnd_started_from() {
    let reaper = Reaper::new();
    let (mut server, load) = relaying_server();
    let old_pid = server.pid();
    server.signal("USR2");
    server.wait_log("upgrade: the new process serves the listeners and UDP allocations");
    let status = server.admin_get("/admin/status");
    let new_pid = status["pid"].as_u64().unwrap() as u32;
    reaper.add(new_pid);
    assert_ne!(new_pid, old_pid);
    assert_eq!(status["allocations"], 20, "{status}");
    // Metrics go on from the new process: the gauges hold every allocation.
    let (code, metrics) = server.http_get("/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("turnd_ready 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("turnd_allocations{") && l.contains("\"udp\"") && l.ends_with(" 20")), "{metrics}");
    let (sent, got) = load.finish();
    assert_eq!((got.to_peer, got.to_client, got.wrong), (sent.0, sent.1, 0), "{got:?}\n{}", server.log());
    assert!(server.wait_exit(Duration::from_secs(10)).is_some(), "the old process exits");
}

#[test]
fn a_drained_relay_stays_drained_through_an_upgrade() {
    let reaper = Reaper::new();
    let mut server = Turnd::builder().start();
    let admin = format!("127.0.0.1:{}", server.metrics_port);
    let token = server.dir.join("admin-token");
    let out = Command::new(env!("CARGO_BIN_EXE_turnctl")).args(["drain", "--admin", &admin]).arg("--token-file").arg(&token).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, out) = turnctl_upgrade(&server, &second_binary(&server.dir));
    assert_eq!(code, 0, "{out}");
    let status = server.admin_get("/admin/status");
    reaper.add(status["pid"].as_u64().unwrap() as u32);
    assert_ne!(status["pid"].as_u64(), Some(server.pid() as u64));
    assert_eq!(status["drain"]["state"], "draining", "{status}");
    assert_eq!(server.http_get("/readyz").0, 503);
    // New participants are refused from the first packet the new process reads (no sibling: 508).
    let mut c = UdpClient::new("127.0.0.1", server.addr);
    assert_eq!(c.try_allocate("late", SECRET).code(), Some(508));
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
}
