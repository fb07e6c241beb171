//! Answers: how a response is signed and framed, which attributes each
//! method understands (420 for the rest), and shrinking unsigned answers.

use super::*;

/// How to sign and frame a response to one request.
pub(super) struct Reply {
    method: u16,
    tid: [u8; 12],
    key: Option<[u8; 16]>,
    sha256: bool,
    fingerprint: bool,
    software: Option<Arc<str>>,
}

impl Reply {
    /// Writes the response; `code` is 200 for a success.
    pub(super) fn write(&self, out: &mut [u8], class: Class, code: u16, f: impl FnOnce(&mut MessageWriter)) -> Handled {
        let mut w = MessageWriter::new(out, self.method, class, &self.tid);
        f(&mut w);
        if let Some(s) = &self.software {
            w.attr(attr::SOFTWARE, s.as_bytes());
        }
        if let Some(k) = &self.key {
            if self.sha256 {
                w.integrity_sha256(k);
            } else {
                w.integrity(k);
            }
        }
        if self.fingerprint {
            w.fingerprint();
        }
        let len = w.finish().ok()?;
        Some(Answer { len, code, signed: self.key.is_some() })
    }

    pub(super) fn ok(&self, out: &mut [u8], f: impl FnOnce(&mut MessageWriter)) -> Handled {
        self.write(out, Class::Success, 200, f)
    }

    pub(super) fn err(&self, out: &mut [u8], e: ErrorCode) -> Handled {
        self.write(out, Class::Error, e.code(), |w| {
            w.error_code(e.code(), e.reason());
        })
    }

    /// 420 with the attribute types (2 bytes each) the request should not have carried.
    pub(super) fn unknown_attributes(&self, out: &mut [u8], types: &[u8]) -> Handled {
        let e = ErrorCode::UnknownAttribute;
        self.write(out, Class::Error, e.code(), |w| {
            w.error_code(e.code(), e.reason()).attr(attr::UNKNOWN_ATTRIBUTES, types);
        })
    }
}

pub(super) fn known_attribute(m: u16, t: u16) -> bool {
    use attr::*;
    if matches!(t, USERNAME | REALM | NONCE) {
        return true;
    }
    match m {
        method::BINDING => matches!(t, 0x0024 | 0x0025), // ICE PRIORITY, USE-CANDIDATE
        method::ALLOCATE => matches!(
            t,
            REQUESTED_TRANSPORT | LIFETIME | DONT_FRAGMENT | EVEN_PORT | RESERVATION_TOKEN | REQUESTED_ADDRESS_FAMILY
        ),
        method::REFRESH => matches!(t, LIFETIME | REQUESTED_ADDRESS_FAMILY),
        method::CREATE_PERMISSION => t == XOR_PEER_ADDRESS,
        method::CHANNEL_BIND => matches!(t, CHANNEL_NUMBER | XOR_PEER_ADDRESS),
        method::SEND => matches!(t, XOR_PEER_ADDRESS | DATA | DONT_FRAGMENT),
        _ => false,
    }
}

/// A response written into the output buffer.
pub(super) struct Answer {
    pub(super) len: usize,
    /// 200 for a success, else the error code (for the metrics).
    pub(super) code: u16,
    /// Whether it carries MESSAGE-INTEGRITY (unsigned UDP answers are capped).
    pub(super) signed: bool,
}

/// The outcome of a handler: a response to send, or nothing.
pub(super) type Handled = Option<Answer>;

/// Rewrites the unsigned response in `out[..n]` smaller: without SOFTWARE,
/// and with `no_reason` also with an empty reason phrase. Returns the new length.
pub(super) fn compact(out: &mut [u8], n: usize, no_reason: bool) -> Option<usize> {
    let mut orig = [0u8; 576];
    orig.get_mut(..n)?.copy_from_slice(out.get(..n)?);
    let m = Message::parse(&orig[..n]).ok()?;
    let mut w = MessageWriter::new(out, m.method(), m.class(), m.transaction_id());
    for (t, v) in m.attributes() {
        match t {
            attr::SOFTWARE => {}
            attr::ERROR_CODE if no_reason => {
                w.attr(t, v.get(..4)?);
            }
            _ => {
                w.attr(t, v);
            }
        }
    }
    if m.has_fingerprint() {
        w.fingerprint();
    }
    w.finish().ok()
}

impl Server {
    pub(super) fn reply_for(&self, msg: &Message, key: Option<[u8; 16]>) -> Reply {
        Reply {
            method: msg.method(),
            tid: *msg.transaction_id(),
            key,
            sha256: msg.integrity_kind() == Some(IntegrityKind::Sha256),
            fingerprint: msg.has_fingerprint(),
            software: self.cfg.software.clone(),
        }
    }

    /// Lists comprehension-required attributes this method does not know.
    pub(super) fn unknown_types(msg: &Message) -> ([u16; MAX_UNKNOWN], usize) {
        let mut list = [0u16; MAX_UNKNOWN];
        let mut n = 0;
        for t in msg.attribute_types() {
            if comprehension_required(t) && !known_attribute(msg.method(), t) && n < MAX_UNKNOWN && !list[..n].contains(&t) {
                list[n] = t;
                n += 1;
            }
        }
        (list, n)
    }

    pub(super) fn unknown_reply(&self, msg: &Message, key: Option<[u8; 16]>, out: &mut [u8]) -> Handled {
        let (list, n) = Self::unknown_types(msg);
        if n == 0 {
            return None;
        }
        let mut v = [0u8; 2 * MAX_UNKNOWN];
        for (i, t) in list[..n].iter().enumerate() {
            v[2 * i..2 * i + 2].copy_from_slice(&t.to_be_bytes());
        }
        self.reply_for(msg, key).unknown_attributes(out, &v[..2 * n])
    }
}
