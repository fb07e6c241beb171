//! Attribute type numbers and typed value codecs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::MAGIC_COOKIE;

// RFC 8489 comprehension-required
pub const MAPPED_ADDRESS: u16 = 0x0001;
pub const USERNAME: u16 = 0x0006;
pub const MESSAGE_INTEGRITY: u16 = 0x0008;
pub const ERROR_CODE: u16 = 0x0009;
pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
pub const REALM: u16 = 0x0014;
pub const NONCE: u16 = 0x0015;
pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
pub const PASSWORD_ALGORITHM: u16 = 0x001D;
pub const USERHASH: u16 = 0x001E;
pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
// RFC 8656 comprehension-required
pub const CHANNEL_NUMBER: u16 = 0x000C;
pub const LIFETIME: u16 = 0x000D;
pub const XOR_PEER_ADDRESS: u16 = 0x0012;
pub const DATA: u16 = 0x0013;
pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
pub const EVEN_PORT: u16 = 0x0018;
pub const REQUESTED_TRANSPORT: u16 = 0x0019;
pub const DONT_FRAGMENT: u16 = 0x001A;
pub const RESERVATION_TOKEN: u16 = 0x0022;
// comprehension-optional
pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
/// RFC 8489 14.16: the name to verify a TLS alternate's certificate against.
pub const ALTERNATE_DOMAIN: u16 = 0x8003;
pub const ICMP: u16 = 0x8004;
pub const SOFTWARE: u16 = 0x8022;
pub const ALTERNATE_SERVER: u16 = 0x8023;
pub const FINGERPRINT: u16 = 0x8028;

/// Attribute types below 0x8000 must be understood by the receiver (RFC 8489 14).
pub const fn comprehension_required(typ: u16) -> bool {
    typ < 0x8000
}

/// Address family codes used by the address attributes and REQUESTED-ADDRESS-FAMILY.
pub const FAMILY_IPV4: u8 = 0x01;
pub const FAMILY_IPV6: u8 = 0x02;

/// Decodes an XOR-*-ADDRESS value. `None` for a malformed value.
pub fn decode_xor_address(v: &[u8], tid: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    match v[1] {
        FAMILY_IPV4 if v.len() == 8 => {
            let raw = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC_COOKIE;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(raw)), port))
        }
        FAMILY_IPV6 if v.len() == 20 => {
            let mut b = [0u8; 16];
            let mask = xor_mask(tid);
            for i in 0..16 {
                b[i] = v[4 + i] ^ mask[i];
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), port))
        }
        _ => None,
    }
}

/// Encodes an XOR-*-ADDRESS value into `out`, returning its length (8 or 20).
pub fn encode_xor_address(addr: SocketAddr, tid: &[u8; 12], out: &mut [u8; 20]) -> usize {
    out[0] = 0;
    out[2..4].copy_from_slice(&(addr.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = FAMILY_IPV4;
            out[4..8].copy_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
            8
        }
        IpAddr::V6(ip) => {
            out[1] = FAMILY_IPV6;
            let mask = xor_mask(tid);
            let o = ip.octets();
            for i in 0..16 {
                out[4 + i] = o[i] ^ mask[i];
            }
            20
        }
    }
}

/// Encodes a plain (not XOR'd) address value, as MAPPED-ADDRESS and
/// ALTERNATE-SERVER carry it (RFC 8489 14.1), into `out`; its length (8 or 20).
pub fn encode_address(addr: SocketAddr, out: &mut [u8; 20]) -> usize {
    out[0] = 0;
    out[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = FAMILY_IPV4;
            out[4..8].copy_from_slice(&ip.octets());
            8
        }
        IpAddr::V6(ip) => {
            out[1] = FAMILY_IPV6;
            out[4..20].copy_from_slice(&ip.octets());
            20
        }
    }
}

/// Decodes a plain address value (MAPPED-ADDRESS, ALTERNATE-SERVER).
pub fn decode_address(v: &[u8]) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]);
    match v[1] {
        FAMILY_IPV4 if v.len() == 8 => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(v[4], v[5], v[6], v[7])), port)),
        FAMILY_IPV6 if v.len() == 20 => {
            let b: [u8; 16] = v[4..20].try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), port))
        }
        _ => None,
    }
}

fn xor_mask(tid: &[u8; 12]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[4..].copy_from_slice(tid);
    m
}

/// A 32-bit attribute value (LIFETIME).
pub fn decode_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

/// ERROR-CODE value: (code, reason).
pub fn decode_error_code(v: &[u8]) -> Option<(u16, &str)> {
    if v.len() < 4 {
        return None;
    }
    let code = (v[2] & 0x07) as u16 * 100 + v[3] as u16;
    Some((code, std::str::from_utf8(&v[4..]).ok()?))
}

/// Whether a value is a legal STUN string: UTF-8 and under `max` bytes.
pub fn decode_str(v: &[u8], max: usize) -> Option<&str> {
    if v.len() > max {
        return None;
    }
    std::str::from_utf8(v).ok()
}
