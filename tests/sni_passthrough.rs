//! One TLS port for TURN and a web server (SNI routing). turnd peeks at the
//! ClientHello: the TURN name (or ALPN stun.turn) gets TURN over TLS, any
//! other name passes through untouched to the web server behind it, with a
//! PROXY protocol header when configured. Here the web server is
//! `openssl s_server -www`, fetched with curl by its name on turnd's port,
//! and a raw TCP backend checks the PROXY v2 header and that the bytes after
//! it are exactly the client's. Chromium relays over `turns:` by the TURN
//! name on that same port.

#[path = "common/core.rs"]
mod harness;
#[path = "common/wire.rs"]
mod wire;
mod common;
#[path = "common/browser.rs"]
mod browser;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::channel;
use turnd::stun::{method, Class};
use wire::{peer_at, Incoming, StreamClient};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// turnd with UDP on a free port (for readiness) and TLS on `tls_port`,
/// SNI routing to `backend`.
fn turnd(tls_port: u16, backend: SocketAddr, proxy: &str) -> common::Turnd {
    turnd_with(tls_port, backend, proxy, "")
}

fn turnd_with(tls_port: u16, backend: SocketAddr, proxy: &str, extra: &str) -> common::Turnd {
    let port = common::free_port();
    let probe: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    common::Turnd::builder().config(probe, |dir| {
        common::make_cert(dir, "cert.pem", "key.pem", "turn.example");
        format!(
            "realm = \"{realm}\"\n[auth]\nsecrets = [\"{secret}\"]\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"127.0.0.1:{port}\"\n\
             [[listen]]\ntransport = \"tls\"\naddress = \"127.0.0.1:{tls_port}\"\n\
             [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nturn_names = [\"turn.example\"]\n\
             [tls.passthrough]\nbackend = \"{backend}\"\nproxy_protocol = \"{proxy}\"\n\
             [relay]\nip = \"127.0.0.1\"\nports = \"20000-29999\"\n\
             [peers]\nallow = [\"127.0.0.0/8\"]\n{extra}",
            realm = common::REALM,
            secret = common::SECRET,
            cert = dir.join("cert.pem").display(),
            key = dir.join("key.pem").display(),
        )
    }).start()
}

/// Takes the connection turnd's start-up check makes to see that the
/// backend listens (it sends nothing and closes), so that the next one
/// accepted is a client's.
fn skip_probe(backend: &TcpListener) {
    backend.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut b = loop {
        match backend.accept() {
            Ok((b, _)) => break b,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("turnd never checked that the backend listens: {e}"),
        }
    };
    b.set_nonblocking(false).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(b.read(&mut [0u8; 64]).unwrap(), 0, "the start-up check sends nothing");
}

/// A TLS client stream to `addr` with `sni` and `alpn`.
fn tls_to(addr: SocketAddr, sni: &str, alpn: &[&str]) -> Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let mut cfg = (*wire::insecure_tls_config()).clone();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    tcp.set_nodelay(true).unwrap();
    // A handshake that goes nowhere fails the test instead of hanging it.
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), sni.to_owned().try_into().unwrap()).unwrap();
    Box::new(rustls::StreamOwned::new(conn, tcp))
}

fn relays(mut c: StreamClient, echo: SocketAddr, what: &str) {
    let _ = c.allocate("alice", common::SECRET);
    assert_eq!(c.transact(method::CHANNEL_BIND, &[channel(0x4000), peer_at(echo)]).class(), Class::Success, "{what}");
    c.send_channel(0x4000, b"over one port");
    assert_eq!(c.recv(Duration::from_secs(3)), Some(Incoming::Channel { number: 0x4000, data: b"over one port".to_vec() }), "{what}");
}

#[test]
fn one_port_serves_https_by_name_and_turn_by_the_turn_name() {
    let dir = common::temp_dir("sni-web");
    common::make_cert(&dir, "web.pem", "web-key.pem", "web.example");
    let web_port = common::free_port();
    let web = Killed(
        Command::new("openssl")
            .args(["s_server", "-www", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{web_port}"))
            .arg("-cert")
            .arg(dir.join("web.pem"))
            .arg("-key")
            .arg(dir.join("web-key.pem"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    let web_addr: SocketAddr = format!("127.0.0.1:{web_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect_timeout(&web_addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not listen within 5 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tls_port = common::free_port();
    let server = turnd(tls_port, web_addr, "none");
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();

    // The web page, by the web name, on turnd's TLS port.
    let out = Command::new("timeout")
        .args(["20", "curl", "-sk", "--resolve", &format!("web.example:{tls_port}:127.0.0.1")])
        .arg(format!("https://web.example:{tls_port}/"))
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && page.contains("s_server"), "curl: {out:?}\n{}", server.log());
    // The certificate curl saw is the web server's, not turnd's.
    let out = Command::new("timeout")
        .args(["20", "curl", "-skv", "-o", "/dev/null", "--resolve", &format!("web.example:{tls_port}:127.0.0.1")])
        .arg(format!("https://web.example:{tls_port}/"))
        .output()
        .unwrap();
    let verbose = String::from_utf8_lossy(&out.stderr);
    assert!(verbose.contains("CN=web.example"), "{verbose}");

    // TURN by the TURN name, and by ALPN stun.turn whatever the name.
    let echo = common::EchoPeer::start();
    relays(StreamClient::over(tls_to(tls_addr, "turn.example", &[])), echo.addr, "SNI turn.example");
    relays(StreamClient::over(tls_to(tls_addr, "web.example", &["stun.turn"])), echo.addr, "ALPN stun.turn");
    drop(web);
}

#[test]
fn passthrough_sends_a_proxy_v2_header_then_the_client_bytes_untouched() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let tls_port = common::free_port();
    let server = turnd(tls_port, backend_addr, "v2");
    skip_probe(&backend);
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();

    // The client's first flight: a ClientHello for web.example.
    let mut conn = rustls::ClientConnection::new(wire::insecure_tls_config(), "web.example".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let mut c = TcpStream::connect(tls_addr).unwrap();
    // In two TCP segments, to be read across them.
    c.set_nodelay(true).unwrap();
    c.write_all(&hello[..7]).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    c.write_all(&hello[7..]).unwrap();

    backend.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut b = loop {
        match backend.accept() {
            Ok((b, _)) => break b,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("the backend got no connection within 5 s ({e}): {}", server.log()),
        }
    };
    b.set_nonblocking(false).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = vec![0u8; 28 + hello.len()];
    b.read_exact(&mut got).unwrap_or_else(|e| panic!("backend read: {e}\n{}", server.log()));
    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(&got[12..16], &[0x21, 0x11, 0, 12]);
    let client = c.local_addr().unwrap();
    assert_eq!(&got[16..20], &[127, 0, 0, 1]);
    assert_eq!(&got[24..26], &client.port().to_be_bytes(), "the client's port");
    assert_eq!(&got[26..28], &tls_port.to_be_bytes());
    assert_eq!(&got[28..], &hello[..], "the ClientHello, untouched");
    // And both ways after that.
    b.write_all(b"from the web server").unwrap();
    let mut back = [0u8; 19];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"from the web server");
    drop(c);
    let mut rest = Vec::new();
    assert_eq!(b.read_to_end(&mut rest).unwrap(), 0, "the client's close reaches the backend");
}

/// Whether a connection for web.example reaches `backend` within 3 s.
fn reaches(tls_addr: SocketAddr, backend: &TcpListener) -> bool {
    let mut conn = rustls::ClientConnection::new(wire::insecure_tls_config(), "web.example".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    let mut c = TcpStream::connect(tls_addr).unwrap();
    c.write_all(&hello).unwrap();
    backend.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok((mut b, _)) = backend.accept() {
            b.set_nonblocking(false).unwrap();
            b.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut got = vec![0u8; hello.len()];
            return b.read_exact(&mut got).is_ok() && got == hello;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn reload(server: &common::Turnd, cfg: &str) {
    std::fs::write(&server.config, cfg).unwrap();
    let (rc, text) = common::turnctl_reload(server);
    assert_eq!(rc, 0, "reload: {text}\n{}", server.log());
}

#[test]
fn passthrough_is_switched_off_and_moved_by_a_reload() {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    let tls_port = common::free_port();
    let server = turnd(tls_port, a.local_addr().unwrap(), "none");
    skip_probe(&a);
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    assert!(reaches(tls_addr, &a), "{}", server.log());
    let original = std::fs::read_to_string(&server.config).unwrap();

    // Off: web.example is answered by turnd itself (TURN relays for it).
    let (head, tail) = original.split_once("turn_names").unwrap();
    let tail = &tail[tail.find("[relay]").unwrap()..];
    reload(&server, &format!("{head}{tail}"));
    let echo = common::EchoPeer::start();
    relays(StreamClient::over(tls_to(tls_addr, "web.example", &[])), echo.addr, "passthrough off");

    // On again, to another backend.
    reload(&server, &original.replace(&a.local_addr().unwrap().to_string(), &b.local_addr().unwrap().to_string()));
    assert!(reaches(tls_addr, &b), "{}", server.log());
}

#[test]
fn chromium_relays_by_the_turn_name_on_the_shared_port() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let tls_port = common::free_port();
    let turnd = turnd_with(tls_port, backend.local_addr().unwrap(), "none", "[limits]\nlegacy_channel_numbers = true\n");
    let turn_url = format!("turns:turn.example:{tls_port}?transport=tcp");
    let server = browser::PageServer::start("127.0.0.1");
    let (username, password) = browser::credentials();
    // turn.example resolves to 127.0.0.1 inside Chromium only.
    let wrap = |argv: &[std::ffi::OsString]| {
        let mut c = Command::new(&argv[0]);
        c.arg("--host-resolver-rules=MAP turn.example 127.0.0.1").args(&argv[1..]);
        c
    };
    let r = browser::run_browser_case(&server, &server.page_url(), &turn_url, &username, &password, browser::PAGE_TIMEOUT, Some(&wrap));
    let context = || format!("{turn_url}: page result:\n{}\n--- turnd log ---\n{}", browser::pretty(&r), turnd.log());
    browser::assert_relayed(&r, &turn_url, "tls", "127.0.0.1", &context);
    skip_probe(&backend);
    assert!(backend.accept().is_err(), "nothing went to the web server");
    eprintln!("{}", browser::describe(&r));
}

/// A passed-through connection counts against the per-IP limit: with one
/// connection per IP, a second one from the same address is closed, for
/// the web server as for TURN, until the first ends.
#[test]
fn passed_through_connections_count_against_the_per_ip_limit() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let tls_port = common::free_port();
    let server = turnd_with(tls_port, backend.local_addr().unwrap(), "none", "[limits]\nmax_connections_per_ip = 1\n");
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    skip_probe(&backend);
    let first = TcpStream::connect(tls_addr).unwrap();
    assert!(reaches_with(&first, &backend), "{}", server.log());
    // The second: turnd closes it without passing it on.
    let mut second = TcpStream::connect(tls_addr).unwrap();
    second.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    second.write_all(&client_hello("web.example")).unwrap();
    assert_eq!(second.read(&mut [0u8; 64]).unwrap_or(0), 0, "closed");
    assert!(backend.accept().is_err(), "the second never reached the web server");
    // The first ends: the address may connect again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let again = TcpStream::connect(tls_addr).unwrap();
        if reaches_with(&again, &backend) {
            break;
        }
        assert!(Instant::now() < deadline, "the limit was not released: {}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn client_hello(name: &str) -> Vec<u8> {
    let mut conn = rustls::ClientConnection::new(wire::insecure_tls_config(), name.to_owned().try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// Sends a ClientHello for web.example on `c`; whether `backend` gets it within 1 s.
fn reaches_with(mut c: &TcpStream, backend: &TcpListener) -> bool {
    let hello = client_hello("web.example");
    if c.write_all(&hello).is_err() {
        return false;
    }
    backend.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if let Ok((mut b, _)) = backend.accept() {
            b.set_nonblocking(false).unwrap();
            b.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut got = vec![0u8; hello.len()];
            return b.read_exact(&mut got).is_ok() && got == hello;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A client that sends no (or half a) ClientHello is closed after
/// limits.tls_handshake_timeout, and bytes that are not TLS at once.
#[test]
fn a_missing_or_bad_client_hello_is_closed_in_time() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let tls_port = common::free_port();
    let server = turnd_with(tls_port, backend.local_addr().unwrap(), "none", "[limits]\ntls_handshake_timeout = 1\n");
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    skip_probe(&backend);
    let hello = client_hello("web.example");
    for (what, bytes, within) in [
        ("nothing", &[][..], Duration::from_secs(3)),
        ("half a ClientHello", &hello[..hello.len() / 2], Duration::from_secs(3)),
        ("HTTP", &b"GET / HTTP/1.1\r\nHost: web.example\r\n\r\n"[..], Duration::from_millis(900)),
    ] {
        let mut c = TcpStream::connect(tls_addr).unwrap();
        c.write_all(bytes).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t0 = Instant::now();
        let n = c.read(&mut [0u8; 64]).unwrap_or(0);
        assert_eq!(n, 0, "{what}: closed without an answer");
        assert!(t0.elapsed() < within, "{what}: closed after {:?}: {}", t0.elapsed(), server.log());
    }
    assert!(backend.accept().is_err(), "nothing reached the web server");
}

/// Connections waiting for their ClientHello count against the per-IP
/// limit, as one waiting for its PROXY header does: from one address, 50
/// silent connections get 8 held by turnd (max_connections_per_ip = 8) and
/// the rest closed at once, not all held until the handshake timeout (which
/// let one address take every descriptor).
#[test]
fn connections_waiting_for_their_client_hello_count_per_ip() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let tls_port = common::free_port();
    let server =
        turnd_with(tls_port, backend.local_addr().unwrap(), "none", "[limits]\nmax_connections_per_ip = 8\ntls_handshake_timeout = 60\n");
    let tls_addr: SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    skip_probe(&backend);
    let silent: Vec<TcpStream> = (0..50)
        .map(|_| {
            let s = TcpStream::connect_timeout(&tls_addr, Duration::from_secs(5)).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    // Which of them turnd has closed (EOF or reset), polled until 42 are,
    // within 10 s (the handshake timeout is 60 s).
    let mut closed = [false; 50];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (s, c) in silent.iter().zip(closed.iter_mut()) {
            if !*c {
                match (&*s).read(&mut [0u8; 16]) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Ok(0) | Err(_) => *c = true,
                    Ok(n) => panic!("turnd sent {n} bytes to a client that sent nothing"),
                }
            }
        }
        let n = closed.iter().filter(|c| **c).count();
        if n >= 42 {
            break;
        }
        assert!(Instant::now() < deadline, "{} of 50 silent connections from one address still open after 10 s (limit 8 per IP): {}", 50 - n, server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = closed.iter().filter(|c| !**c).count();
    assert_eq!(held, 8, "turnd holds exactly the 8 the per-IP limit allows until their handshake timeout");
    assert!(backend.accept().is_err(), "nothing reached the web server");
    // They go: the address is served again (bounded: 10 s).
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let again = TcpStream::connect(tls_addr).unwrap();
        if reaches_with(&again, &backend) {
            break;
        }
        assert!(Instant::now() < deadline, "the waiting connections' count was not released: {}", server.log());
    }
}
