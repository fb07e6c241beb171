//! The TLS ClientHello, read before the handshake: the server name (SNI)
//! and the ALPN protocols a client asks for, so one TLS port can serve TURN
//! and pass web traffic through to a web server. Sans-IO: give it the first
//! bytes of the connection (peeked, not consumed), it says whether they hold
//! a whole ClientHello and what it names. Bounded: one TLS record at most
//! (5 + 16384 bytes); a ClientHello spread over several records is refused
//! (browsers send theirs in one). Never panics on any input.

/// Largest prefix of a connection worth peeking at: one TLS record.
pub const MAX_HELLO: usize = 5 + 16_384;

/// What a ClientHello asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Hello {
    /// The first `host_name` of the server_name extension, lower-cased.
    pub server_name: Option<String>,
    /// The ALPN protocol names, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Peeked {
    /// Need more bytes (fewer than [`MAX_HELLO`] so far).
    Incomplete,
    Hello(Hello),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("not a TLS handshake record")]
    NotTls,
    #[error("not a ClientHello")]
    NotClientHello,
    #[error("malformed ClientHello")]
    Malformed,
    #[error("ClientHello spans more than one TLS record")]
    SpansRecords,
}

/// A cursor over a byte slice that fails instead of reading past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Invalid> {
        if self.0.len() < n {
            return Err(Invalid::Malformed);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<usize, Invalid> {
        Ok(self.take(1)?[0] as usize)
    }
    fn u16(&mut self) -> Result<usize, Invalid> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    /// A vector with a 1- or 2-byte length prefix.
    fn vec8(&mut self) -> Result<&'a [u8], Invalid> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], Invalid> {
        let n = self.u16()?;
        self.take(n)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

const SERVER_NAME: usize = 0;
const ALPN: usize = 16;

/// Parses the start of a connection. `Incomplete` until the first record is
/// whole; an error as soon as the bytes cannot be a ClientHello.
pub fn parse(buf: &[u8]) -> Result<Peeked, Invalid> {
    // Record header: content type 22 (handshake), version 3.x, length.
    if buf.is_empty() {
        return Ok(Peeked::Incomplete);
    }
    if buf[0] != 22 || (buf.len() > 1 && buf[1] != 3) {
        return Err(Invalid::NotTls);
    }
    if buf.len() < 5 {
        return Ok(Peeked::Incomplete);
    }
    let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if len == 0 || len > MAX_HELLO - 5 {
        return Err(Invalid::Malformed);
    }
    // The handshake header can tell early that this is no ClientHello.
    if buf.len() > 5 && buf[5] != 1 {
        return Err(Invalid::NotClientHello);
    }
    if buf.len() < 5 + len {
        return Ok(Peeked::Incomplete);
    }
    let record = &buf[5..5 + len];
    if record.len() < 4 {
        return Err(Invalid::Malformed);
    }
    let hs_len = u32::from_be_bytes([0, record[1], record[2], record[3]]) as usize;
    if 4 + hs_len > record.len() {
        return Err(Invalid::SpansRecords);
    }
    client_hello(&record[4..4 + hs_len]).map(Peeked::Hello)
}

fn client_hello(body: &[u8]) -> Result<Hello, Invalid> {
    let mut r = Reader(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let session = r.vec8()?;
    if session.len() > 32 {
        return Err(Invalid::Malformed);
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(Invalid::Malformed);
    }
    if r.vec8()?.is_empty() {
        return Err(Invalid::Malformed); // compression methods: at least "null"
    }
    let mut hello = Hello::default();
    if r.is_empty() {
        return Ok(hello); // no extensions at all (old clients)
    }
    let mut exts = Reader(r.vec16()?);
    if !r.is_empty() {
        return Err(Invalid::Malformed);
    }
    let (mut seen_sni, mut seen_alpn) = (false, false);
    while !exts.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        match ty {
            SERVER_NAME if !seen_sni => {
                seen_sni = true;
                hello.server_name = server_name(data)?;
            }
            ALPN if !seen_alpn => {
                seen_alpn = true;
                hello.alpn = alpn(data)?;
            }
            // A repeated extension is forbidden (RFC 8446 4.2).
            SERVER_NAME | ALPN => return Err(Invalid::Malformed),
            _ => {}
        }
    }
    Ok(hello)
}

fn server_name(data: &[u8]) -> Result<Option<String>, Invalid> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec16()?);
    if !r.is_empty() {
        return Err(Invalid::Malformed);
    }
    let mut name = None;
    while !list.is_empty() {
        let ty = list.u8()?;
        let n = list.vec16()?;
        if ty == 0 && name.is_none() {
            if n.is_empty() || n.len() > 255 || !n.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')) {
                return Err(Invalid::Malformed);
            }
            let s = std::str::from_utf8(n).map_err(|_| Invalid::Malformed)?;
            name = Some(s.trim_end_matches('.').to_ascii_lowercase());
        }
    }
    Ok(name)
}

fn alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, Invalid> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec16()?);
    if !r.is_empty() {
        return Err(Invalid::Malformed);
    }
    let mut out = Vec::new();
    while !list.is_empty() {
        let p = list.vec8()?;
        if p.is_empty() {
            return Err(Invalid::Malformed);
        }
        out.push(p.to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello record with the given extensions (type, data).
    pub(crate) fn hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one suite
        body.extend([1, 0]); // null compression
        let mut e = Vec::new();
        for (t, d) in exts {
            e.extend(t.to_be_bytes());
            e.extend((d.len() as u16).to_be_bytes());
            e.extend(d);
        }
        body.extend((e.len() as u16).to_be_bytes());
        body.extend(e);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![22, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    fn sni(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name.as_bytes());
        let mut d = (entry.len() as u16).to_be_bytes().to_vec();
        d.extend(entry);
        (0, d)
    }

    fn alpn_ext(names: &[&str]) -> (u16, Vec<u8>) {
        let mut l = Vec::new();
        for n in names {
            l.push(n.len() as u8);
            l.extend(n.as_bytes());
        }
        let mut d = (l.len() as u16).to_be_bytes().to_vec();
        d.extend(l);
        (16, d)
    }

    #[test]
    fn reads_server_name_and_alpn() {
        let rec = hello(&[(10, vec![0, 2, 0, 29]), sni("Web.Example."), alpn_ext(&["h2", "http/1.1"])]);
        let Ok(Peeked::Hello(h)) = parse(&rec) else { panic!() };
        assert_eq!(h.server_name.as_deref(), Some("web.example"));
        assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        let Ok(Peeked::Hello(h)) = parse(&hello(&[])) else { panic!() };
        assert_eq!(h, Hello::default());
    }

    #[test]
    fn every_prefix_is_incomplete_and_trailing_bytes_are_ignored() {
        let rec = hello(&[sni("turn.example"), alpn_ext(&["stun.turn"])]);
        for n in 0..rec.len() {
            assert_eq!(parse(&rec[..n]), Ok(Peeked::Incomplete), "{n}");
        }
        let mut more = rec.clone();
        more.extend([23, 3, 3, 0, 1, 0]);
        assert!(matches!(parse(&more), Ok(Peeked::Hello(_))));
    }

    #[test]
    fn refuses_what_is_not_a_client_hello() {
        assert_eq!(parse(b"\x00\x01\x00\x00"), Err(Invalid::NotTls));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Invalid::NotTls));
        assert_eq!(parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]), Err(Invalid::NotClientHello));
        assert_eq!(parse(&[22, 3, 1, 0, 0]), Err(Invalid::Malformed));
        assert_eq!(parse(&[22, 3, 1, 0x50, 0]), Err(Invalid::Malformed), "longer than a record may be");
        // A handshake longer than its record: spread over records.
        let mut rec = hello(&[sni("a.example")]);
        rec[7] = rec[7].wrapping_add(1);
        assert_eq!(parse(&rec), Err(Invalid::SpansRecords));
        // An extension that overruns its list.
        let mut rec = hello(&[sni("a.example")]);
        let n = rec.len();
        rec[n - "a.example".len() - 2] = 0xff; // the name length
        assert!(parse(&rec).is_err());
        // Bad names, a repeated extension.
        assert_eq!(parse(&hello(&[sni("a b")])), Err(Invalid::Malformed));
        assert_eq!(parse(&hello(&[sni("a.example"), sni("b.example")])), Err(Invalid::Malformed));
        assert_eq!(parse(&hello(&[alpn_ext(&[""])])), Err(Invalid::Malformed));
    }

    #[test]
    fn never_panics_on_mutations() {
        let rec = hello(&[sni("turn.example"), alpn_ext(&["stun.turn", "h2"])]);
        for i in 0..rec.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut m = rec.clone();
                m[i] = v;
                let _ = parse(&m);
                let _ = parse(&m[..i]);
            }
        }
    }
}
