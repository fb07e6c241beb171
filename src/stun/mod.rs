//! STUN message codec (RFC 8489) and TURN framing (RFC 8656).
//!
//! Parsing borrows the input and never allocates; writing goes into a caller
//! buffer and never panics on a short buffer (it reports [`WriteError`]).

#![forbid(unsafe_code)]

pub mod attr;
mod channel;
mod crc32;
mod error_code;
pub mod integrity;
mod message;
mod writer;

pub use crc32::crc32_update;
pub use error_code::ErrorCode;
pub use channel::{ChannelData, frame_len, FrameLen, CHANNEL_MAX, CHANNEL_MAX_RFC5766, CHANNEL_MIN};
pub use message::{Attributes, Class, IntegrityKind, Message, ParseError};
pub use writer::{MessageWriter, WriteError, MAX_MESSAGE};

/// The magic cookie every RFC 5389+ message carries in bytes 4..8.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the fixed STUN header.
pub const HEADER_LEN: usize = 20;

/// STUN/TURN method numbers.
pub mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;

    /// A short name for logs and metric labels.
    pub fn name(m: u16) -> &'static str {
        match m {
            BINDING => "binding",
            ALLOCATE => "allocate",
            REFRESH => "refresh",
            SEND => "send",
            DATA => "data",
            CREATE_PERMISSION => "create_permission",
            CHANNEL_BIND => "channel_bind",
            _ => "other",
        }
    }
}

/// Packs a method and class into the 14-bit STUN message type.
pub const fn message_type(method: u16, class: Class) -> u16 {
    let c = class as u16;
    let m = method & 0x0FFF;
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

/// Splits a message type into method and class.
pub const fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
    let class = match ((t >> 4) & 1) | ((t >> 7) & 2) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_types_round_trip() {
        assert_eq!(message_type(method::BINDING, Class::Request), 0x0001);
        assert_eq!(message_type(method::BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(method::BINDING, Class::Error), 0x0111);
        assert_eq!(message_type(method::SEND, Class::Indication), 0x0016);
        assert_eq!(message_type(method::DATA, Class::Indication), 0x0017);
        assert_eq!(message_type(method::CHANNEL_BIND, Class::Success), 0x0109);
        for m in 0..0x1000u16 {
            for c in [Class::Request, Class::Indication, Class::Success, Class::Error] {
                assert_eq!(split_type(message_type(m, c)), (m, c));
            }
        }
    }
}
