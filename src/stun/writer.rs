//! Building STUN messages into a caller-provided buffer.

use std::net::SocketAddr;

use super::attr;
use super::crc32::crc32;
use super::integrity::{hmac_sha1, hmac_sha256};
use super::{message_type, Class, HEADER_LEN, MAGIC_COOKIE};

#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[error("output buffer too small for the STUN message")]
pub struct WriteError;

/// Longest message: the 16-bit length field counts 4-byte words (65532).
pub const MAX_MESSAGE: usize = HEADER_LEN + 0xFFFC;

/// Writes a message attribute by attribute. Every byte written, padding
/// included, is set explicitly, so no stale buffer content can leak.
pub struct MessageWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
    overflow: bool,
    tid: [u8; 12],
}

impl<'a> MessageWriter<'a> {
    pub fn new(buf: &'a mut [u8], method: u16, class: Class, tid: &[u8; 12]) -> Self {
        let mut w = MessageWriter { buf, len: 0, overflow: false, tid: *tid };
        if w.buf.len() < HEADER_LEN {
            w.overflow = true;
            return w;
        }
        w.buf[0..2].copy_from_slice(&message_type(method, class).to_be_bytes());
        w.buf[2..4].copy_from_slice(&[0, 0]);
        w.buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        w.buf[8..20].copy_from_slice(tid);
        w.len = HEADER_LEN;
        w
    }

    /// Room for `extra` more bytes, within the buffer and the STUN length limit.
    fn fits(&self, extra: usize) -> bool {
        !self.overflow && self.len + extra <= self.buf.len().min(MAX_MESSAGE)
    }

    fn reserve(&mut self, vlen: usize) -> Option<&mut [u8]> {
        let padded = (vlen + 3) & !3;
        if vlen > u16::MAX as usize || !self.fits(4 + padded) {
            self.overflow = true;
            return None;
        }
        let start = self.len;
        self.len += 4 + padded;
        let slot = &mut self.buf[start..start + 4 + padded];
        slot[4 + vlen..].fill(0);
        Some(slot)
    }

    /// Appends an attribute with the given value.
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        if let Some(s) = self.reserve(value.len()) {
            s[0..2].copy_from_slice(&typ.to_be_bytes());
            s[2..4].copy_from_slice(&(value.len() as u16).to_be_bytes());
            s[4..4 + value.len()].copy_from_slice(value);
        }
        self
    }

    pub fn u32(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    pub fn xor_address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let mut v = [0u8; 20];
        let n = attr::encode_xor_address(addr, &self.tid, &mut v);
        self.attr(typ, &v[..n])
    }

    /// A plain address attribute (ALTERNATE-SERVER, MAPPED-ADDRESS).
    pub fn address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let mut v = [0u8; 20];
        let n = attr::encode_address(addr, &mut v);
        self.attr(typ, &v[..n])
    }

    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Self {
        let r = reason.as_bytes();
        let vlen = 4 + r.len();
        if let Some(s) = self.reserve(vlen) {
            s[0..2].copy_from_slice(&attr::ERROR_CODE.to_be_bytes());
            s[2..4].copy_from_slice(&(vlen as u16).to_be_bytes());
            s[4..8].copy_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
            s[8..8 + r.len()].copy_from_slice(r);
        }
        self
    }

    fn set_length(&mut self, end: usize) {
        let l = (end - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&l.to_be_bytes());
    }

    /// Appends MESSAGE-INTEGRITY computed with `key`.
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        if !self.fits(24) {
            self.overflow = true;
            return self;
        }
        let at = self.len;
        self.set_length(at + 24);
        let mac = hmac_sha1(key, &[&self.buf[..at]]);
        self.attr(attr::MESSAGE_INTEGRITY, &mac)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (full 32 bytes) computed with `key`.
    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        if !self.fits(36) {
            self.overflow = true;
            return self;
        }
        let at = self.len;
        self.set_length(at + 36);
        let mac = hmac_sha256(key, &[&self.buf[..at]]);
        self.attr(attr::MESSAGE_INTEGRITY_SHA256, &mac)
    }

    /// Appends FINGERPRINT. Must be the last attribute.
    pub fn fingerprint(&mut self) -> &mut Self {
        if !self.fits(8) {
            self.overflow = true;
            return self;
        }
        let at = self.len;
        self.set_length(at + 8);
        let fp = crc32(&self.buf[..at], &[]) ^ 0x5354_554E;
        self.attr(attr::FINGERPRINT, &fp.to_be_bytes())
    }

    /// Finalises the length field and returns the message length.
    pub fn finish(&mut self) -> Result<usize, WriteError> {
        if self.overflow {
            return Err(WriteError);
        }
        let end = self.len;
        self.set_length(end);
        Ok(end)
    }
}
