//! CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320) for FINGERPRINT.

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32 of the concatenation of `a` and `b`.
pub fn crc32(a: &[u8], b: &[u8]) -> u32 {
    !crc32_update(crc32_update(!0, a), b)
}

/// Feeds `bytes` into a running CRC-32 state: start from `!0`, finish with `!`.
/// (The load generator keeps the state over a message's fixed prefix.)
pub fn crc32_update(mut c: u32, bytes: &[u8]) -> u32 {
    for &x in bytes {
        c = TABLE[((c ^ x as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    c
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_value() {
        // The standard check value for "123456789".
        assert_eq!(super::crc32(b"1234", b"56789"), 0xCBF4_3926);
    }
}
