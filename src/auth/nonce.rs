//! Stateless nonces: `base64url(expiry_be32 || HMAC-SHA256(key, expiry || ip)[..8])`.
//!
//! The server keeps no table: any nonce it issued verifies until it expires,
//! and only for the client IP it was issued to.

use std::net::IpAddr;

use base64::Engine as _;

use crate::stun::integrity::{ct_eq, hmac_sha256};

/// Characters in a nonce: 12 bytes in unpadded base64url.
pub const NONCE_LEN: usize = 16;

#[derive(Clone)]
pub struct NonceKey {
    key: [u8; 32],
    ttl: u64,
}

impl NonceKey {
    /// `key` should be random per process (or shared by a cluster); `ttl` in seconds.
    pub fn new(key: [u8; 32], ttl: u64) -> Self {
        NonceKey { key, ttl }
    }

    /// The key every relay that shares `secret` derives alike: nonces made
    /// with it verify on each of them (see [`super::Authenticator::fleet_nonce`]).
    /// Same lifetime as this key.
    pub fn derive(&self, secret: &[u8]) -> NonceKey {
        NonceKey { key: hmac_sha256(secret, &[b"turnd fleet nonce"]), ttl: self.ttl }
    }

    /// The key itself, for the process an upgrade hands the relay to.
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    fn mac(&self, expiry: u32, ip: IpAddr) -> [u8; 8] {
        let ip16 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let full = hmac_sha256(&self.key, &[&expiry.to_be_bytes(), &ip16]);
        full[..8].try_into().expect("8 of 32 bytes")
    }

    /// A 16-byte key for another keyed function (a hash table's), derived
    /// from this one and `label`, so tests and fuzzing that fix the nonce
    /// key fix it too.
    pub fn subkey(&self, label: &[u8]) -> [u8; 16] {
        hmac_sha256(&self.key, &[b"subkey", label])[..16].try_into().expect("16 of 32 bytes")
    }

    /// A keyed 8-byte tag over `parts`, domain-separated from nonces.
    pub fn token(&self, parts: &[&[u8]]) -> [u8; 8] {
        let mut all: Vec<&[u8]> = vec![b"reservation-token"];
        all.extend_from_slice(parts);
        hmac_sha256(&self.key, &all)[..8].try_into().expect("8 of 32 bytes")
    }

    pub fn make(&self, ip: IpAddr, unix_now: u64) -> [u8; NONCE_LEN] {
        let expiry = (unix_now + self.ttl).min(u32::MAX as u64) as u32;
        let mut raw = [0u8; 12];
        raw[..4].copy_from_slice(&expiry.to_be_bytes());
        raw[4..].copy_from_slice(&self.mac(expiry, ip));
        let mut out = [0u8; NONCE_LEN];
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode_slice(raw, &mut out)
            .expect("12 bytes encode to 16 characters");
        out
    }

    pub fn check(&self, nonce: &[u8], ip: IpAddr, unix_now: u64) -> bool {
        if nonce.len() != NONCE_LEN {
            return false;
        }
        let mut raw = [0u8; 12];
        match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode_slice(nonce, &mut raw) {
            Ok(12) => {}
            _ => return false,
        }
        let expiry = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        ct_eq(&raw[4..], &self.mac(expiry, ip)) && expiry as u64 >= unix_now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_expires_and_is_bound_to_ip() {
        let k = NonceKey::new([7; 32], 600);
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let n = k.make(a, 1_000);
        assert!(k.check(&n, a, 1_000));
        assert!(k.check(&n, a, 1_600));
        assert!(!k.check(&n, a, 1_601));
        assert!(!k.check(&n, b, 1_000));
        let mut forged = n;
        forged[15] = if forged[15] == b'A' { b'B' } else { b'A' };
        assert!(!k.check(&forged, a, 1_000));
        assert!(!NonceKey::new([8; 32], 600).check(&n, a, 1_000));
        assert!(!k.check(b"short", a, 1_000));
    }

    #[test]
    fn derived_keys_agree_across_processes_and_differ_by_secret() {
        // Two relays with their own random keys, one shared secret.
        let (one, two) = (NonceKey::new([1; 32], 600), NonceKey::new([2; 32], 900));
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let n = one.derive(b"shared").make(a, 1_000);
        assert!(two.derive(b"shared").check(&n, a, 1_000));
        assert!(!two.check(&n, a, 1_000), "a derived nonce is not one of the process key");
        assert!(!two.derive(b"other").check(&n, a, 1_000));
        assert!(!two.derive(b"shared").check(&n, "198.51.100.2".parse().unwrap(), 1_000));
        // The lifetime is the deriving key's.
        assert!(one.derive(b"shared").check(&n, a, 1_600) && !one.derive(b"shared").check(&n, a, 1_601));
    }
}
