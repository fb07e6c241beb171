//! TURN setup: credentials, Allocate, CreatePermission, ChannelBind.

use super::*;

// ---------------------------------------------------------------------------
// TURN setup

pub(super) struct Creds {
    pub(super) username: String,
    pub(super) password: String,
}

pub(super) struct Session {
    pub(super) realm: String,
    pub(super) nonce: Vec<u8>,
    pub(super) key: [u8; 16],
}

pub(super) fn next_tid(counter: &mut u64) -> [u8; 12] {
    *counter += 1;
    let mut t = [0u8; 12];
    t[..4].copy_from_slice(b"LGEN");
    t[4..].copy_from_slice(&counter.to_be_bytes());
    t
}

pub(super) fn build(m: u16, class: Class, tid: [u8; 12], f: impl FnOnce(&mut MessageWriter)) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let mut w = MessageWriter::new(&mut buf, m, class, &tid);
    f(&mut w);
    let n = w.finish().expect("request fits");
    buf.truncate(n);
    buf
}

pub(super) fn error_of(m: &Message<'_>) -> Option<(u16, String)> {
    m.get(attr::ERROR_CODE).and_then(attr::decode_error_code).map(|(c, r)| (c, r.to_owned()))
}

/// A request signed with the session's credentials; retried once on 438 (stale nonce).
pub(super) fn authed_request(
    conn: &mut Conn,
    creds: &Creds,
    s: &mut Session,
    tids: &mut u64,
    m: u16,
    what: &str,
    f: &dyn Fn(&mut MessageWriter),
) -> Result<Vec<u8>> {
    for _ in 0..2 {
        let req = build(m, Class::Request, next_tid(tids), |w| {
            f(w);
            w.attr(attr::USERNAME, creds.username.as_bytes())
                .attr(attr::REALM, s.realm.as_bytes())
                .attr(attr::NONCE, &s.nonce)
                .integrity(&s.key)
                .fingerprint();
        });
        let resp = conn.transact(&req, Duration::from_secs(3))?.ok_or_else(|| anyhow!("{what}: no answer in 3 s"))?;
        let msg = Message::parse(&resp).map_err(|e| anyhow!("{what}: malformed answer: {e}"))?;
        match msg.class() {
            Class::Success => return Ok(resp),
            _ => match error_of(&msg) {
                Some((438, _)) => {
                    s.nonce = msg.get(attr::NONCE).ok_or_else(|| anyhow!("{what}: 438 without NONCE"))?.to_vec();
                }
                Some((c, r)) => bail!("{what}: error {c} {r}"),
                None => bail!("{what}: error without ERROR-CODE"),
            },
        }
    }
    bail!("{what}: stale nonce twice")
}

/// Allocates and binds a channel (or installs a permission) to `peer`.
pub(super) fn setup_turn(conn: &mut Conn, creds: &Creds, peer: SocketAddr, indications: bool, tids: &mut u64) -> Result<(Session, SocketAddr)> {
    let first = build(method::ALLOCATE, Class::Request, next_tid(tids), |w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).u32(attr::LIFETIME, 600).fingerprint();
    });
    let resp = conn.transact(&first, Duration::from_secs(3))?.ok_or_else(|| anyhow!("Allocate: no answer in 3 s"))?;
    let msg = Message::parse(&resp).map_err(|e| anyhow!("Allocate: malformed answer: {e}"))?;
    match error_of(&msg) {
        Some((401, _)) => {}
        Some((c, r)) => bail!("unauthenticated Allocate: error {c} {r} (expected 401)"),
        None => bail!("unauthenticated Allocate succeeded: the server must require credentials"),
    }
    let realm = msg.get(attr::REALM).map(|v| String::from_utf8_lossy(v).into_owned()).ok_or_else(|| anyhow!("401 without REALM"))?;
    let nonce = msg.get(attr::NONCE).ok_or_else(|| anyhow!("401 without NONCE"))?.to_vec();
    let key = long_term_key(&creds.username, &realm, &creds.password);
    let mut s = Session { realm, nonce, key };
    let resp = authed_request(conn, creds, &mut s, tids, method::ALLOCATE, "Allocate", &|w| {
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).u32(attr::LIFETIME, 600);
    })?;
    let msg = Message::parse(&resp).unwrap();
    let relayed = msg
        .get(attr::XOR_RELAYED_ADDRESS)
        .and_then(|v| attr::decode_xor_address(v, msg.transaction_id()))
        .ok_or_else(|| anyhow!("Allocate success without XOR-RELAYED-ADDRESS"))?;
    if indications {
        authed_request(conn, creds, &mut s, tids, method::CREATE_PERMISSION, "CreatePermission", &|w| {
            w.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })?;
    } else {
        let ch = CHANNEL.to_be_bytes();
        authed_request(conn, creds, &mut s, tids, method::CHANNEL_BIND, "ChannelBind", &|w| {
            w.attr(attr::CHANNEL_NUMBER, &[ch[0], ch[1], 0, 0]).xor_address(attr::XOR_PEER_ADDRESS, peer);
        })?;
    }
    Ok((s, relayed))
}

/// Waits until the server answers a Binding (UDP) or accepts a connection.
pub(super) fn wait_ready(server: SocketAddr, kind: Kind, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    if kind != Kind::Udp {
        // Conn::connect retries until the deadline.
        return Ok(());
    }
    let local: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let s = UdpSocket::bind(local)?;
    s.connect(server)?;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    let req = build(method::BINDING, Class::Request, *b"LGENreadines", |_| {});
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let _ = s.send(&req);
        if let Ok(n) = s.recv(&mut buf)
            && n >= 20
            && buf[8..20] == req[8..20]
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{server} did not answer a STUN Binding within {timeout:?}")
}
