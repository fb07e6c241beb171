//! The codec on arbitrary bytes: STUN parsing and every attribute decoder,
//! integrity and fingerprint checks, re-encoding, ChannelData, stream framing,
//! the PROXY protocol parser, the TLS ClientHello reader (SNI, ALPN), REST usernames and nonces; and the writer on
//! arbitrary attribute lists and buffer sizes.
//!
//! Besides "no panic": whatever parses re-encodes to the same attributes,
//! framing never claims more bytes than it was given, and whatever the writer
//! finishes parses back with a length field that matches.

#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use turnd::auth::{parse_rest_username, quota_key, NonceKey};
use turnd::net::{proxy, sni};
use turnd::stun::{attr, frame_len, message_type, split_type, ChannelData, FrameLen, Message, MessageWriter, HEADER_LEN, MAX_MESSAGE};

fn stun(data: &[u8]) {
    let Ok(m) = Message::parse(data) else { return };
    assert_eq!(m.bytes().len(), data.len());
    assert!(data.len() >= HEADER_LEN && data.len() % 4 == 0);
    let tid = *m.transaction_id();
    assert_eq!(split_type(message_type(m.method(), m.class())), (m.method(), m.class()));
    for (t, v) in m.attributes() {
        if let Some(a) = attr::decode_xor_address(v, &tid) {
            let mut enc = [0u8; 20];
            let n = attr::encode_xor_address(a, &tid, &mut enc);
            assert_eq!(attr::decode_xor_address(&enc[..n], &tid), Some(a));
        }
        let _ = attr::decode_u32(v);
        if let Some((_, reason)) = attr::decode_error_code(v) {
            assert_eq!(reason.len() + 4, v.len());
        }
        let _ = attr::decode_str(v, 763);
        assert!(m.get(t).is_some());
    }
    let _ = m.get_all(attr::XOR_PEER_ADDRESS).count();
    let _ = (m.verify(b"key"), m.verify_integrity(&[0; 16]), m.verify_integrity_sha256(&[0; 16]), m.integrity_kind());
    // Re-encode the attributes: the result parses to the same list.
    let mut buf = vec![0u8; data.len() + 64];
    let mut w = MessageWriter::new(&mut buf, m.method(), m.class(), &tid);
    for (t, v) in m.attributes() {
        w.attr(t, v);
    }
    if let Ok(n) = w.finish() {
        let m2 = Message::parse(&buf[..n]).expect("re-encoded message parses");
        assert!(m.attributes().eq(m2.attributes()));
    }
}

fn channel_data(data: &[u8]) {
    if let Some(cd) = ChannelData::parse(data) {
        assert!(ChannelData::is_channel_data(data));
        assert!(4 + cd.data.len() <= data.len());
        assert!((0x4000..=0x7FFF).contains(&cd.channel));
    }
    match frame_len(data) {
        FrameLen::Complete(n) => {
            assert!(n <= data.len() && n >= 4);
            if data[0] & 0xC0 == 0 {
                assert_eq!(n, HEADER_LEN + u16::from_be_bytes([data[2], data[3]]) as usize);
            } else {
                assert_eq!(n % 4, 0);
                assert!(ChannelData::parse(&data[..n]).is_some() || !(0x4000..=0x7FFF).contains(&u16::from_be_bytes([data[0], data[1]])));
            }
        }
        FrameLen::Incomplete => assert!(data.len() < HEADER_LEN + 65_535 + 4),
        FrameLen::Invalid => assert!(data.len() >= 4),
    }
}

fn proxy_header(data: &[u8]) {
    match proxy::parse(data) {
        Ok(proxy::Parsed::Done { len, .. }) => assert!(len <= data.len() && len <= proxy::MAX_HEADER),
        Ok(proxy::Parsed::Incomplete) => assert!(data.len() < proxy::MAX_HEADER + 16),
        Err(_) => {}
    }
}

fn credentials(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some((_, user)) = parse_rest_username(s) {
            assert!(s.ends_with(user));
        }
        assert!(s.contains(quota_key(s)));
    }
    let k = NonceKey::new([3; 32], 600);
    let ip: IpAddr = "198.51.100.1".parse().unwrap();
    let _ = k.check(data, ip, 1_800_000_000);
    // A nonce we made checks, for its IP only.
    let n = k.make(ip, 1_800_000_000);
    assert!(k.check(&n, ip, 1_800_000_000));
    if data.len() >= 4 {
        let other = IpAddr::from([data[0], data[1], data[2], data[3]]);
        assert_eq!(k.check(&n, other, 1_800_000_000), other == ip);
    }
}

/// Writes attributes described by `data` into a buffer of a size it chooses.
fn writer(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    static FILL: [u8; 65_536] = [0xA5; 65_536];
    thread_local!(static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0xEE; 2 * 65_536]));
    let size = u16::from_be_bytes([data[0], data[1]]) as usize * 2;
    BUF.with_borrow_mut(|buf| write_into(&mut buf[..size], data, &FILL));
}

fn write_into(buf: &mut [u8], data: &[u8], fill: &[u8]) {
    let size = buf.len();
    let tid = [9u8; 12];
    let mut w = MessageWriter::new(buf, 0x003, turnd::stun::Class::Request, &tid);
    let mut rest = &data[2..];
    // Whatever finishes must parse (any number of attributes does).
    let mut count = 0;
    while rest.len() >= 4 && count < 30 {
        count += 1;
        let typ = u16::from_be_bytes([rest[0], rest[1]]);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        rest = &rest[4..];
        match typ % 8 {
            0 => {
                w.integrity(&[1; 16]);
            }
            1 => {
                w.integrity_sha256(&[1; 16]);
            }
            2 => {
                w.error_code(400 + (len % 200) as u16, "reason");
            }
            _ => {
                // Large values come from a static buffer: short inputs still reach 64 KiB.
                if typ | 0x8000 != attr::FINGERPRINT {
                    w.attr(typ | 0x8000, &fill[..len]);
                }
            }
        }
    }
    if data[2] & 1 == 1 {
        w.fingerprint();
    }
    if let Ok(n) = w.finish() {
        assert!(n <= MAX_MESSAGE && n <= size);
        let m = Message::parse(&buf[..n]).expect("what the writer finished parses");
        assert_eq!(m.bytes().len(), n);
    }
}

/// The ClientHello reader: never panics; a result needs at most one record,
/// and a name it returns is a plausible lower-case host name.
fn client_hello(data: &[u8]) {
    match sni::parse(data) {
        Ok(sni::Peeked::Hello(h)) => {
            assert!(data.len() > 5);
            if let Some(n) = h.server_name {
                assert!(!n.is_empty() && n.len() <= 255 && !n.bytes().any(|b| b.is_ascii_uppercase()));
            }
            assert!(h.alpn.iter().all(|a| !a.is_empty()));
        }
        Ok(sni::Peeked::Incomplete) => assert!(data.len() < sni::MAX_HELLO),
        Err(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    stun(data);
    client_hello(data);
    channel_data(data);
    proxy_header(data);
    credentials(data);
    writer(data);
});
