//! RFC 5769 test vectors through our codec: parsing, FINGERPRINT,
//! MESSAGE-INTEGRITY with short- and long-term credentials, XOR addresses.

#[path = "vectors/rfc5769.rs"]
mod v;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use turnd::stun::attr;
use turnd::stun::integrity::long_term_key;
use turnd::stun::{method, Class, Message, MessageWriter, ParseError};

#[test]
fn sample_request_short_term() {
    let m = Message::parse(v::REQ).expect("parses");
    assert_eq!(m.method(), method::BINDING);
    assert_eq!(m.class(), Class::Request);
    assert_eq!(m.transaction_id(), &v::TRANSACTION_ID);
    assert!(m.has_fingerprint());
    assert_eq!(m.get(attr::USERNAME), Some(v::REQ_USERNAME.as_bytes()));
    assert_eq!(m.get(attr::SOFTWARE), Some(v::REQ_SOFTWARE.as_bytes()));
    assert_eq!(m.get(0x0024), Some(&v::REQ_PRIORITY.to_be_bytes()[..]));
    assert!(m.verify_integrity(v::SHORT_TERM_PASSWORD.as_bytes()));
    assert!(!m.verify_integrity(b"VOkJxbRl1RmTxUk/WvJxBu"));
}

#[test]
fn sample_ipv4_response() {
    let m = Message::parse(v::RESP_V4).expect("parses");
    assert_eq!(m.class(), Class::Success);
    assert_eq!(m.get(attr::SOFTWARE), Some(v::RESP_SOFTWARE.as_bytes()));
    let mapped = attr::decode_xor_address(m.get(attr::XOR_MAPPED_ADDRESS).unwrap(), m.transaction_id()).unwrap();
    assert_eq!(mapped, SocketAddr::new(IpAddr::from(v::RESP_V4_MAPPED_IP), v::RESP_V4_MAPPED_PORT));
    assert!(m.verify_integrity(v::SHORT_TERM_PASSWORD.as_bytes()));
    // Our encoder produces the same XOR-MAPPED-ADDRESS bytes.
    let mut enc = [0u8; 20];
    let n = attr::encode_xor_address(mapped, &v::TRANSACTION_ID, &mut enc);
    assert_eq!(&enc[..n], m.get(attr::XOR_MAPPED_ADDRESS).unwrap());
}

#[test]
fn sample_ipv6_response() {
    let m = Message::parse(v::RESP_V6).expect("parses");
    let mapped = attr::decode_xor_address(m.get(attr::XOR_MAPPED_ADDRESS).unwrap(), m.transaction_id()).unwrap();
    let ip = Ipv6Addr::from(v::RESP_V6_MAPPED_IP);
    assert_eq!(mapped, SocketAddr::new(IpAddr::V6(ip), v::RESP_V6_MAPPED_PORT));
    assert!(m.verify_integrity(v::SHORT_TERM_PASSWORD.as_bytes()));
    let mut enc = [0u8; 20];
    let n = attr::encode_xor_address(mapped, &v::TRANSACTION_ID, &mut enc);
    assert_eq!(&enc[..n], m.get(attr::XOR_MAPPED_ADDRESS).unwrap());
}

#[test]
fn sample_request_long_term() {
    let key = long_term_key(v::LT_USERNAME, v::LT_REALM, v::LT_PASSWORD_SASLPREP);
    assert_eq!(key, v::LT_KEY);
    let m = Message::parse(v::REQ_LONG_TERM).expect("parses");
    assert!(!m.has_fingerprint());
    assert_eq!(m.get(attr::USERNAME), Some(v::LT_USERNAME.as_bytes()));
    assert_eq!(m.get(attr::REALM), Some(v::LT_REALM.as_bytes()));
    assert_eq!(m.get(attr::NONCE), Some(v::LT_NONCE.as_bytes()));
    assert_eq!(m.transaction_id(), &v::LT_TRANSACTION_ID);
    assert!(m.verify_integrity(&key));
    assert!(!m.verify_integrity(&long_term_key(v::LT_USERNAME, v::LT_REALM, "TheMatrix")));
}

#[test]
fn corrupted_vectors_are_rejected() {
    // A flipped bit under FINGERPRINT: the message is dropped at parse.
    let mut bad = v::REQ.to_vec();
    bad[30] ^= 1;
    assert_eq!(Message::parse(&bad).err(), Some(ParseError::BadFingerprint));
    // Without FINGERPRINT, a flipped bit fails MESSAGE-INTEGRITY instead.
    let mut bad = v::REQ_LONG_TERM.to_vec();
    bad[40] ^= 1;
    let m = Message::parse(&bad).unwrap();
    assert!(!m.verify_integrity(&v::LT_KEY));
    // Truncation anywhere is a parse error, never a panic.
    for cut in 0..v::REQ.len() {
        assert!(Message::parse(&v::REQ[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn writer_round_trips_with_integrity_and_fingerprint() {
    let mut buf = [0xAAu8; 256];
    let n = MessageWriter::new(&mut buf, method::BINDING, Class::Success, &v::TRANSACTION_ID)
        .attr(attr::SOFTWARE, v::RESP_SOFTWARE.as_bytes())
        .xor_address(attr::XOR_MAPPED_ADDRESS, "192.0.2.1:32853".parse().unwrap())
        .integrity(v::SHORT_TERM_PASSWORD.as_bytes())
        .fingerprint()
        .finish()
        .unwrap();
    // Same length and layout as the RFC's IPv4 response; padding is zeros, not stale bytes.
    assert_eq!(n, v::RESP_V4.len());
    assert_eq!(&buf[20 + 4 + 11], &0u8);
    let m = Message::parse(&buf[..n]).unwrap();
    assert!(m.has_fingerprint());
    assert!(m.verify_integrity(v::SHORT_TERM_PASSWORD.as_bytes()));
    // A buffer too small is an error, not a panic.
    let mut small = [0u8; 40];
    let r = MessageWriter::new(&mut small, method::BINDING, Class::Success, &v::TRANSACTION_ID)
        .attr(attr::SOFTWARE, v::RESP_SOFTWARE.as_bytes())
        .integrity(b"k")
        .finish();
    assert!(r.is_err());
}
