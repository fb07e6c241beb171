//! PROXY protocol v1 and v2 headers (HAProxy), so turnd behind an L4 load
//! balancer still sees client addresses. Sans-IO: give it the first bytes of
//! the connection, it says how many belong to the header and the source.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest header we read: v1 is at most 107 bytes; v2 with TLVs is bounded here.
pub const MAX_HEADER: usize = 536;

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Need more bytes.
    Incomplete,
    /// The header is `len` bytes; `source` is the client (None for LOCAL/UNKNOWN).
    Done { len: usize, source: Option<SocketAddr> },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid PROXY protocol header")]
pub struct Invalid;

pub fn parse(buf: &[u8]) -> Result<Parsed, Invalid> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    if buf[0] == b'P' {
        return parse_v1(buf);
    }
    let n = buf.len().min(12);
    if buf[..n] != V2_SIG[..n] {
        return Err(Invalid);
    }
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(Invalid);
    }
    let len = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > MAX_HEADER {
        return Err(Invalid);
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let body = &buf[16..len];
    let source = match (ver_cmd & 0x0F, buf[13]) {
        (0, _) => None, // LOCAL: health checks from the balancer itself
        (1, 0x11) | (1, 0x12) if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([body[8], body[9]])))
        }
        (1, 0x21) | (1, 0x22) if body.len() >= 36 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&body[..16]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), u16::from_be_bytes([body[32], body[33]])))
        }
        (1, 0x00) => None,
        _ => return Err(Invalid),
    };
    Ok(Parsed::Done { len, source })
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Invalid> {
    let n = buf.len().min(6);
    if buf[..n] != b"PROXY "[..n] {
        return Err(Invalid);
    }
    let Some(end) = buf.windows(2).take(107).position(|w| w == b"\r\n") else {
        return if buf.len() >= 107 { Err(Invalid) } else { Ok(Parsed::Incomplete) };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| Invalid)?;
    let parts: Vec<&str> = line.split(' ').collect();
    let source = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| Invalid)?;
            if (*fam == "TCP4") != ip.is_ipv4() {
                return Err(Invalid);
            }
            Some(SocketAddr::new(ip, sport.parse().map_err(|_| Invalid)?))
        }
        _ => return Err(Invalid),
    };
    Ok(Parsed::Done { len: end + 2, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1() {
        let h = b"PROXY TCP4 198.51.100.1 192.0.2.1 40000 443\r\nrest";
        assert_eq!(parse(h), Ok(Parsed::Done { len: 45, source: Some("198.51.100.1:40000".parse().unwrap()) }));
        assert_eq!(parse(b"PROXY TCP4 198.51"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Parsed::Done { len: 15, source: None }));
        assert_eq!(parse(b"PROXY TCP4 ::1 ::1 1 2\r\n"), Err(Invalid));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Invalid));
        assert_eq!(parse(&[b'P'; 200]), Err(Invalid));
    }

    #[test]
    fn v2() {
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 12, 198, 51, 100, 1, 192, 0, 2, 1, 0x9C, 0x40, 0x01, 0xBB]);
        assert_eq!(parse(&h), Ok(Parsed::Done { len: 28, source: Some("198.51.100.1:40000".parse().unwrap()) }));
        assert_eq!(parse(&h[..20]), Ok(Parsed::Incomplete));
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Parsed::Done { len: 16, source: None }));
        let mut bad = h.clone();
        bad[12] = 0x11;
        assert_eq!(parse(&bad), Err(Invalid));
        let mut huge = V2_SIG.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(parse(&huge), Err(Invalid));
    }
}
