//! STUN long-term credentials with TURN REST API usernames.
//!
//! A username is `EXPIRY` or `EXPIRY:USER` (unix seconds); its password is
//! base64(HMAC-SHA1(secret, username)). Several secrets may be configured so
//! one can be rotated in while the old one still verifies. Nonces are
//! stateless: they carry their own expiry and an HMAC bound to the client IP.

#![forbid(unsafe_code)]

mod nonce;

use std::collections::HashMap;
use std::net::IpAddr;

use base64::Engine as _;

pub use nonce::NonceKey;

use crate::stun::attr;
use crate::stun::integrity::{hmac_sha1, long_term_key};
use crate::stun::Message;

/// Longest USERNAME accepted (RFC 8489 14.3: under 509 bytes).
pub const MAX_USERNAME: usize = 508;

/// The TURN REST API password for `username` under `secret`.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(hmac_sha1(secret, &[username.as_bytes()]))
}

/// The TURN REST API username: `EXPIRY` or `EXPIRY:USER`.
pub fn rest_username(expiry_unix: u64, user: Option<&str>) -> String {
    match user {
        Some(u) if !u.is_empty() => format!("{expiry_unix}:{u}"),
        _ => expiry_unix.to_string(),
    }
}

/// Splits a REST username into its expiry and user part.
/// Only ASCII digits are accepted as the expiry; anything else is not a REST username.
pub fn parse_rest_username(username: &str) -> Option<(u64, &str)> {
    let (exp, user) = match username.split_once(':') {
        Some((e, u)) => (e, u),
        None => (username, ""),
    };
    if exp.is_empty() || exp.len() > 20 || !exp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((exp.parse().ok()?, user))
}

/// Why a request failed authentication. Each maps to one STUN error code.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AuthFailure {
    /// No MESSAGE-INTEGRITY: the normal first step, answered with a 401 challenge.
    Challenge,
    /// Integrity present but USERNAME, REALM or NONCE missing or malformed (400).
    BadRequest,
    /// The nonce expired, was forged, or was issued to another address (438).
    StaleNonce,
    /// The REALM is not ours (401).
    WrongRealm,
    /// A REST username whose expiry has passed (401).
    Expired,
    /// Neither a static user nor a REST username (401).
    UnknownUser,
    /// The integrity check failed for every configured secret (401).
    BadIntegrity,
}

impl AuthFailure {
    pub fn code(self) -> crate::stun::ErrorCode {
        use crate::stun::ErrorCode;
        match self {
            AuthFailure::BadRequest => ErrorCode::BadRequest,
            AuthFailure::StaleNonce => ErrorCode::StaleNonce,
            _ => ErrorCode::Unauthorized,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::Challenge => "challenge",
            AuthFailure::BadRequest => "bad_request",
            AuthFailure::StaleNonce => "stale_nonce",
            AuthFailure::WrongRealm => "wrong_realm",
            AuthFailure::Expired => "expired",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::BadIntegrity => "bad_integrity",
        }
    }
}

/// A request that passed authentication.
#[derive(Clone, Copy, Debug)]
pub struct Authenticated<'a> {
    pub username: &'a str,
    /// The long-term key, used to sign the response.
    pub key: [u8; 16],
    /// A check credential (see [`CHECK_USER`]): its allocations may reach
    /// only the relay's own relayed addresses.
    pub check: bool,
}

/// The user part of the credentials turnd hands to its own check page
/// (`EXPIRY:turnd-check`), signed with a key of turnd's own, never with the
/// shared secret: prosody's credentials can never be check credentials, nor
/// the other way round.
pub const CHECK_USER: &str = "turnd-check";
/// How long a check credential is valid unless configured (`check.credential_ttl`).
pub const CHECK_TTL: u64 = 60;

/// The key check credentials are signed with, derived from the nonce key
/// every shard shares (so any shard accepts what any other handed out).
pub fn check_key(nonce: &NonceKey) -> [u8; 16] {
    nonce.subkey(b"check credentials")
}

/// A check credential valid until `expiry`: (username, password).
pub fn check_credentials(key: &[u8; 16], expiry: u64) -> (String, String) {
    let username = rest_username(expiry, Some(CHECK_USER));
    let password = rest_password(key, &username);
    (username, password)
}

/// Credential checking state; cheap to rebuild on reload.
pub struct Authenticator {
    realm: String,
    secrets: Vec<Vec<u8>>,
    static_keys: HashMap<String, [u8; 16]>,
    nonce: NonceKey,
    /// Nonce keys derived from each shared secret, alike on every relay that
    /// shares it: a client this relay redirects (300 Try Alternate) brings
    /// a nonce made with the first to a sibling, which accepts it (browsers
    /// reuse the nonce after a redirect and give up on a 438).
    fleet: Vec<NonceKey>,
    /// The check credentials' key and their validity, when the check page is on.
    check: Option<([u8; 16], u64)>,
}

impl Authenticator {
    /// See [`NonceKey::subkey`].
    pub fn subkey(&self, label: &[u8]) -> [u8; 16] {
        self.nonce.subkey(label)
    }

    pub fn new(realm: &str, secrets: Vec<Vec<u8>>, static_users: &[(String, String)], nonce: NonceKey) -> Self {
        let static_keys =
            static_users.iter().map(|(u, p)| (u.clone(), long_term_key(u, realm, p))).collect();
        let fleet = secrets.iter().map(|s| nonce.derive(s)).collect();
        Authenticator { realm: realm.to_owned(), secrets, static_keys, nonce, fleet, check: None }
    }

    /// Accepts check credentials valid for `ttl` seconds too (`[check]` on).
    pub fn with_check(mut self, ttl: Option<u64>) -> Self {
        self.check = ttl.map(|t| (check_key(&self.nonce), t));
        self
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// A fresh nonce for a challenge to `ip`.
    pub fn nonce(&self, ip: IpAddr, unix_now: u64) -> [u8; nonce::NONCE_LEN] {
        self.nonce.make(ip, unix_now)
    }

    /// An unguessable 8-byte RESERVATION-TOKEN for this slot and moment.
    pub fn token(&self, slot: u32, generation: u32, unix_now: u64) -> [u8; 8] {
        self.nonce.token(&[&slot.to_be_bytes(), &generation.to_be_bytes(), &unix_now.to_be_bytes()])
    }

    /// A nonce for `ip` that every relay sharing the first secret accepts
    /// (to hand a redirected client along); `None` without a shared secret.
    pub fn fleet_nonce(&self, ip: IpAddr, unix_now: u64) -> Option<[u8; nonce::NONCE_LEN]> {
        self.fleet.first().map(|k| k.make(ip, unix_now))
    }

    /// Whether `nonce` is one we issued to `ip` that has not expired, or
    /// one a relay sharing a secret with us issued to `ip` for a redirect.
    pub fn nonce_valid(&self, nonce: &[u8], ip: IpAddr, unix_now: u64) -> bool {
        self.nonce.check(nonce, ip, unix_now) || self.fleet.iter().any(|k| k.check(nonce, ip, unix_now))
    }

    /// RFC 8489 9.2.4 checks, in the RFC's order.
    pub fn authenticate<'a>(&self, msg: &Message<'a>, ip: IpAddr, unix_now: u64) -> Result<Authenticated<'a>, AuthFailure> {
        if !msg.has_integrity() {
            return Err(AuthFailure::Challenge);
        }
        let username = msg.get(attr::USERNAME).and_then(|v| attr::decode_str(v, MAX_USERNAME));
        let realm = msg.get(attr::REALM).and_then(|v| attr::decode_str(v, 762));
        let nonce = msg.get(attr::NONCE);
        let (Some(username), Some(realm), Some(nonce)) = (username, realm, nonce) else {
            return Err(AuthFailure::BadRequest);
        };
        let own = self.nonce.check(nonce, ip, unix_now);
        let redirected = !own && self.fleet.iter().any(|k| k.check(nonce, ip, unix_now));
        if !own && !redirected {
            return Err(AuthFailure::StaleNonce);
        }
        // A client another relay of the fleet sent here (its nonce is a
        // fleet nonce) brings that relay's realm, and browsers cannot change
        // it before they allocate. REST credentials do not depend on the
        // realm (the password is an HMAC of the username), so for them the
        // key is made with the realm the client used; nothing else may.
        let realm_ok = realm == self.realm;
        if !realm_ok && !redirected {
            return Err(AuthFailure::WrongRealm);
        }
        if let Some(key) = self.static_keys.get(username) {
            if !realm_ok {
                return Err(AuthFailure::WrongRealm);
            }
            return if msg.verify(key) {
                Ok(Authenticated { username, key: *key, check: false })
            } else {
                Err(AuthFailure::BadIntegrity)
            };
        }
        if let Some((expiry, CHECK_USER)) = parse_rest_username(username) {
            let Some((check, ttl)) = &self.check else { return Err(AuthFailure::UnknownUser) };
            if !realm_ok {
                return Err(AuthFailure::WrongRealm);
            }
            if expiry < unix_now {
                return Err(AuthFailure::Expired);
            }
            let key = long_term_key(username, &self.realm, &rest_password(check, username));
            // Never longer-lived than turnd hands them out.
            if expiry > unix_now + ttl || !msg.verify(&key) {
                return Err(AuthFailure::BadIntegrity);
            }
            return Ok(Authenticated { username, key, check: true });
        }
        if self.secrets.is_empty() {
            return Err(AuthFailure::UnknownUser);
        }
        let Some((expiry, _)) = parse_rest_username(username) else {
            return Err(AuthFailure::UnknownUser);
        };
        if expiry < unix_now {
            return Err(AuthFailure::Expired);
        }
        for secret in &self.secrets {
            let key = long_term_key(username, realm, &rest_password(secret, username));
            if msg.verify(&key) {
                return Ok(Authenticated { username, key, check: false });
            }
        }
        Err(AuthFailure::BadIntegrity)
    }
}

/// The part of a username that quotas count: the USER of `EXPIRY:USER`,
/// otherwise the whole username.
pub fn quota_key(username: &str) -> &str {
    match parse_rest_username(username) {
        Some((_, user)) if !user.is_empty() => user,
        _ => username,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_usernames() {
        assert_eq!(parse_rest_username("1700000000"), Some((1700000000, "")));
        assert_eq!(parse_rest_username("1700000000:alice"), Some((1700000000, "alice")));
        assert_eq!(parse_rest_username("1700000000:a:b"), Some((1700000000, "a:b")));
        assert_eq!(parse_rest_username("alice:1700000000"), None);
        assert_eq!(parse_rest_username("-5"), None);
        assert_eq!(parse_rest_username("+5"), None);
        assert_eq!(parse_rest_username(""), None);
        assert_eq!(parse_rest_username("99999999999999999999"), None);
        assert_eq!(parse_rest_username(" 17"), None);
        assert_eq!(quota_key("1700000000:alice"), "alice");
        assert_eq!(quota_key("1700000000"), "1700000000");
    }

    #[test]
    fn rest_password_matches_independent_hmac() {
        // HMAC-SHA1("north", "1700000000:bob"), computed with Python's hmac module.
        assert_eq!(rest_password(b"north", "1700000000:bob"), "7tNSWpJ3gOxGfEgOjt+kaWhBC20=");
    }
}
