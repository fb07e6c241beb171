//! Zero-copy STUN message parsing.

use super::attr;
use super::crc32::crc32;
use super::{split_type, HEADER_LEN, MAGIC_COOKIE};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Class {
    Request = 0,
    Indication = 1,
    Success = 2,
    Error = 3,
}

/// Why a buffer is not a STUN message. The server drops all of these silently.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum ParseError {
    #[error("shorter than a STUN header")]
    TooShort,
    #[error("not a STUN message (leading bits or magic cookie)")]
    NotStun,
    #[error("length field does not match the datagram")]
    BadLength,
    #[error("attribute overruns the message")]
    TruncatedAttribute,
    #[error("attribute after FINGERPRINT")]
    AfterFingerprint,
    #[error("FINGERPRINT does not match")]
    BadFingerprint,
}

#[derive(Clone, Copy, Default, Debug)]
struct Slot {
    /// Offset of the attribute header within the message.
    at: u32,
    len: u16,
}

/// A parsed STUN message that borrows its buffer.
///
/// Any number of attributes (a 64 KiB message holds at most 16,379): lookups
/// walk the attribute headers, which `parse` has checked, so parsing needs
/// neither a fixed-size table nor the heap.
#[derive(Clone)]
pub struct Message<'a> {
    buf: &'a [u8],
    method: u16,
    class: Class,
    /// Where the attributes before the integrity attribute end.
    end: u32,
    integrity: Option<Slot>,
    integrity_sha256: Option<Slot>,
    fingerprint: bool,
}

impl<'a> Message<'a> {
    /// Quick check on the first bytes: could this be a STUN message?
    pub fn looks_like_stun(buf: &[u8]) -> bool {
        buf.len() >= HEADER_LEN
            && buf[0] & 0xC0 == 0
            && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) == MAGIC_COOKIE
    }

    /// Parses exactly one message occupying all of `buf`.
    ///
    /// Attributes after MESSAGE-INTEGRITY are ignored except
    /// MESSAGE-INTEGRITY-SHA256 and FINGERPRINT; a FINGERPRINT that is present
    /// is verified here.
    pub fn parse(buf: &'a [u8]) -> Result<Self, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        if !Self::looks_like_stun(buf) {
            return Err(ParseError::NotStun);
        }
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if !len.is_multiple_of(4) || HEADER_LEN + len != buf.len() {
            return Err(ParseError::BadLength);
        }
        let (method, class) = split_type(u16::from_be_bytes([buf[0], buf[1]]));
        let mut msg = Message {
            buf,
            method,
            class,
            end: buf.len() as u32,
            integrity: None,
            integrity_sha256: None,
            fingerprint: false,
        };
        let mut at = HEADER_LEN;
        while at < buf.len() {
            if msg.fingerprint {
                return Err(ParseError::AfterFingerprint);
            }
            if at + 4 > buf.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            let typ = u16::from_be_bytes([buf[at], buf[at + 1]]);
            let vlen = u16::from_be_bytes([buf[at + 2], buf[at + 3]]);
            let padded = (vlen as usize + 3) & !3;
            if at + 4 + padded > buf.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            let slot = Slot { at: at as u32, len: vlen };
            match typ {
                attr::FINGERPRINT => {
                    if vlen != 4 {
                        return Err(ParseError::BadFingerprint);
                    }
                    let want = crc32(&with_length(buf, at + 8), &buf[HEADER_LEN..at]) ^ 0x5354_554E;
                    let got = u32::from_be_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
                    if want != got {
                        return Err(ParseError::BadFingerprint);
                    }
                    msg.fingerprint = true;
                }
                attr::MESSAGE_INTEGRITY_SHA256
                    if msg.integrity_sha256.is_none() => {
                        msg.integrity_sha256 = Some(slot);
                    }
                _ if msg.integrity.is_some() || msg.integrity_sha256.is_some() => {}
                attr::MESSAGE_INTEGRITY => msg.integrity = Some(slot),
                _ => {}
            }
            if typ == attr::FINGERPRINT || msg.integrity.is_some() || msg.integrity_sha256.is_some() {
                msg.end = msg.end.min(at as u32);
            }
            at += 4 + padded;
        }
        Ok(msg)
    }

    pub fn method(&self) -> u16 {
        self.method
    }
    pub fn class(&self) -> Class {
        self.class
    }
    pub fn transaction_id(&self) -> &'a [u8; 12] {
        self.buf[8..20].try_into().expect("header checked")
    }
    pub fn bytes(&self) -> &'a [u8] {
        self.buf
    }
    pub fn has_fingerprint(&self) -> bool {
        self.fingerprint
    }
    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some() || self.integrity_sha256.is_some()
    }

    /// The value of the first attribute of type `typ` (RFC 8489: later duplicates are ignored).
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attributes().find(|(t, _)| *t == typ).map(|(_, v)| v)
    }

    /// Values of every attribute of type `typ`, in order (e.g. several XOR-PEER-ADDRESS).
    pub fn get_all(&self, typ: u16) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.attributes().filter(move |(t, _)| *t == typ).map(|(_, v)| v)
    }

    /// Every attribute before the integrity attribute as (type, value), in order.
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes { buf: &self.buf[..self.end as usize], at: HEADER_LEN }
    }

    /// All attribute types before the integrity attribute, in order.
    pub fn attribute_types(&self) -> impl Iterator<Item = u16> + 'a {
        self.attributes().map(|(t, _)| t)
    }

    /// How many attributes precede the integrity attribute.
    pub fn attribute_count(&self) -> usize {
        self.attributes().count()
    }

    fn value(&self, s: &Slot) -> &'a [u8] {
        let start = s.at as usize + 4;
        &self.buf[start..start + s.len as usize]
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1) against `key`, in constant time.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        match self.integrity {
            Some(s) if s.len == 20 => {
                let at = s.at as usize;
                super::integrity::verify_sha1(key, &with_length(self.buf, at + 24), &self.buf[HEADER_LEN..at], self.value(&s))
            }
            _ => false,
        }
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 (possibly truncated to 16..32 bytes) against `key`.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> bool {
        match self.integrity_sha256 {
            Some(s) if (16..=32).contains(&s.len) && s.len % 4 == 0 => {
                let at = s.at as usize;
                let end = at + 4 + s.len as usize;
                super::integrity::verify_sha256(key, &with_length(self.buf, end), &self.buf[HEADER_LEN..at], self.value(&s))
            }
            _ => false,
        }
    }

    /// Which integrity attribute the client used (SHA-256 preferred when both are present).
    pub fn integrity_kind(&self) -> Option<IntegrityKind> {
        if self.integrity_sha256.is_some() {
            Some(IntegrityKind::Sha256)
        } else if self.integrity.is_some() {
            Some(IntegrityKind::Sha1)
        } else {
            None
        }
    }

    /// Checks whichever integrity attribute the message carries.
    pub fn verify(&self, key: &[u8]) -> bool {
        match self.integrity_kind() {
            Some(IntegrityKind::Sha256) => self.verify_integrity_sha256(key),
            Some(IntegrityKind::Sha1) => self.verify_integrity(key),
            None => false,
        }
    }
}

/// Walks the attribute headers `Message::parse` checked: (type, value) in order.
#[derive(Clone)]
pub struct Attributes<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = (u16, &'a [u8]);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let h = self.buf.get(self.at..self.at + 4)?;
        let typ = u16::from_be_bytes([h[0], h[1]]);
        let len = u16::from_be_bytes([h[2], h[3]]) as usize;
        let value = self.buf.get(self.at + 4..self.at + 4 + len)?;
        self.at += 4 + ((len + 3) & !3);
        Some((typ, value))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IntegrityKind {
    Sha1,
    Sha256,
}

/// The header with its length field rewritten so the message appears to end at `end`.
fn with_length(buf: &[u8], end: usize) -> [u8; HEADER_LEN] {
    let mut h: [u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("header checked");
    let len = (end - HEADER_LEN) as u16;
    h[2..4].copy_from_slice(&len.to_be_bytes());
    h
}
