//! ChannelData messages (RFC 8656 12.4) and stream framing (RFC 8656 12.5).

use super::HEADER_LEN;

pub const CHANNEL_MIN: u16 = 0x4000;
/// Highest channel number RFC 8656 allows.
pub const CHANNEL_MAX: u16 = 0x4FFF;
/// Highest channel number RFC 5766 allowed (older clients, coturn's tools).
pub const CHANNEL_MAX_RFC5766: u16 = 0x7FFF;

/// A ChannelData message borrowed from its buffer.
#[derive(Clone, Copy, Debug)]
pub struct ChannelData<'a> {
    pub channel: u16,
    pub data: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Whether the first byte marks a ChannelData message (leading bits 01).
    #[inline]
    pub fn is_channel_data(buf: &[u8]) -> bool {
        !buf.is_empty() && buf[0] & 0xC0 == 0x40
    }

    /// Parses a ChannelData message. Trailing bytes (padding on UDP is
    /// optional) are ignored; a length beyond the buffer is rejected. Any
    /// number with leading bits 01 parses; only bound channels relay.
    #[inline]
    pub fn parse(buf: &'a [u8]) -> Option<Self> {
        if buf.len() < 4 {
            return None;
        }
        let channel = u16::from_be_bytes([buf[0], buf[1]]);
        if !(CHANNEL_MIN..=CHANNEL_MAX_RFC5766).contains(&channel) {
            return None;
        }
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        let data = buf.get(4..4 + len)?;
        Some(ChannelData { channel, data })
    }

    /// Writes the 4-byte header for `len` bytes of data on `channel`.
    #[inline]
    pub fn header(channel: u16, len: usize) -> [u8; 4] {
        let c = channel.to_be_bytes();
        let l = (len as u16).to_be_bytes();
        [c[0], c[1], l[0], l[1]]
    }
}

/// Result of looking for one framed message at the start of a stream buffer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FrameLen {
    /// Need more bytes to know.
    Incomplete,
    /// The first message occupies this many bytes (ChannelData padding included).
    Complete(usize),
    /// Neither STUN nor ChannelData: the stream cannot be resynchronised.
    Invalid,
}

/// Frames STUN and ChannelData messages on a TCP/TLS stream.
pub fn frame_len(buf: &[u8]) -> FrameLen {
    if buf.len() < 4 {
        return FrameLen::Incomplete;
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let total = match buf[0] & 0xC0 {
        0x00 => {
            if !len.is_multiple_of(4) {
                return FrameLen::Invalid;
            }
            HEADER_LEN + len
        }
        0x40 => 4 + ((len + 3) & !3),
        _ => return FrameLen::Invalid,
    };
    if buf.len() < total { FrameLen::Incomplete } else { FrameLen::Complete(total) }
}
