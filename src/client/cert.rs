//! The client side of TLS: which roots to trust, a verifier that records what
//! the server presented and what verification said about it, and the few
//! facts an operator wants from a certificate (names, expiry), read with a
//! minimal DER walk.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme};

/// Where Debian (and most distributions) keep the system's trusted roots.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What the server presented on the first handshake, and the verdict.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The end-entity certificate (DER).
    pub end_entity: Vec<u8>,
    /// Certificates sent, end-entity included.
    pub chain_len: usize,
    /// `Ok` when the certificate is trusted for the name, else why not.
    pub verdict: Result<Trust, TlsError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Chains to a trusted root.
    Chain,
    /// Is itself one of the certificates given with `--ca` (a self-signed
    /// certificate), valid now and for the name.
    Pinned,
}

/// A certificate verifier that remembers what it saw. With `insecure` it
/// accepts any certificate (handshake signatures are still checked) so the
/// rest of a check can go on; the verdict is recorded either way.
#[derive(Debug)]
pub struct Observer {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    pinned: Vec<CertificateDer<'static>>,
    insecure: bool,
    algs: WebPkiSupportedAlgorithms,
    seen: Mutex<Option<Seen>>,
}

impl Observer {
    /// The first certificate seen, if a handshake got that far.
    pub fn seen(&self) -> Option<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn verify_pinned(&self, ee: &CertificateDer<'_>, name: &ServerName<'_>, now: UnixTime) -> Result<Trust, TlsError> {
        let parsed = rustls::server::ParsedCertificate::try_from(ee)?;
        rustls::client::verify_server_name(&parsed, name)?;
        let info = CertInfo::parse(ee).ok_or(CertificateError::BadEncoding)?;
        let t = now.as_secs() as i64;
        let at = |s: i64| UnixTime::since_unix_epoch(Duration::from_secs(s.max(0) as u64));
        if t < info.not_before {
            return Err(CertificateError::NotValidYetContext { time: now, not_before: at(info.not_before) }.into());
        }
        if t > info.not_after {
            return Err(CertificateError::ExpiredContext { time: now, not_after: at(info.not_after) }.into());
        }
        Ok(Trust::Pinned)
    }
}

impl ServerCertVerifier for Observer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let by_chain = match &self.webpki {
            Some(v) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now).map(|_| Trust::Chain),
            None => Err(CertificateError::UnknownIssuer.into()),
        };
        let verdict = match by_chain {
            Err(_) if self.pinned.iter().any(|p| p.as_ref() == end_entity.as_ref()) => {
                // webpki refuses a self-signed CA certificate as a server's own
                // (CaUsedAsEndEntity); one the operator named exactly with --ca
                // is trusted if it is valid now and for the name.
                self.verify_pinned(end_entity, server_name, now)
            }
            other => other,
        };
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.is_none() {
                *seen = Some(Seen {
                    end_entity: end_entity.as_ref().to_vec(),
                    chain_len: 1 + intermediates.len(),
                    verdict: verdict.clone(),
                });
            }
        }
        match verdict {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(_) if self.insecure => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A client configuration trusting the system's roots plus the certificates
/// in `ca` (PEM), with ALPN `stun.turn` (RFC 7443), and the observer that
/// records each handshake's certificate. `Err` names an unreadable `ca`.
pub fn client_config(ca: Option<&Path>, insecure: bool) -> Result<(Arc<rustls::ClientConfig>, Arc<Observer>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    let bundle = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from).unwrap_or_else(|| SYSTEM_BUNDLE.into());
    // A missing system bundle leaves only --ca: every other certificate then
    // reports "unknown issuer", which is what the check should say.
    if let Ok(iter) = CertificateDer::pem_file_iter(&bundle) {
        roots.add_parsable_certificates(iter.flatten());
    }
    let mut pinned = Vec::new();
    if let Some(ca) = ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("--ca {}: {e}", ca.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--ca {}: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(format!("--ca {}: no PEM certificate in it", ca.display()));
        }
        roots.add_parsable_certificates(certs.iter().cloned());
        pinned = certs;
    }
    let webpki = if roots.is_empty() {
        None
    } else {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().ok()
    };
    let observer = Arc::new(Observer {
        webpki,
        pinned,
        insecure,
        algs: provider.signature_verification_algorithms,
        seen: Mutex::new(None),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(observer.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"stun.turn".to_vec()];
    Ok((Arc::new(cfg), observer))
}

/// What an operator wants to know of a certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's common name, if any.
    pub subject_cn: Option<String>,
    /// The issuer's common name, if any.
    pub issuer_cn: Option<String>,
    /// subjectAltName DNS names and IP addresses, in order.
    pub names: Vec<String>,
    /// Validity, unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Issuer and subject are the same name.
    pub self_signed: bool,
}

const SEQUENCE: u8 = 0x30;
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_SAN: &[u8] = &[0x55, 0x1D, 0x11];

impl CertInfo {
    /// Reads the TBSCertificate of an X.509 certificate (RFC 5280 4.1):
    /// issuer, validity, subject and the subjectAltName extension. `None`
    /// when the DER does not have that shape.
    pub fn parse(der: &[u8]) -> Option<CertInfo> {
        let (SEQUENCE, cert, _) = tlv(der)? else { return None };
        let (SEQUENCE, tbs, _) = tlv(cert)? else { return None };
        let (mut tag, _, mut rest) = tlv(tbs)?;
        if tag == 0xA0 {
            // explicit [0] version; the serial number follows
            (tag, _, rest) = tlv(rest)?;
        }
        if tag != 0x02 {
            return None;
        }
        let (SEQUENCE, _signature, rest) = tlv(rest)? else { return None };
        let (SEQUENCE, issuer, rest) = tlv(rest)? else { return None };
        let (SEQUENCE, validity, rest) = tlv(rest)? else { return None };
        let (SEQUENCE, subject, rest) = tlv(rest)? else { return None };
        let (SEQUENCE, _spki, mut rest) = tlv(rest)? else { return None };
        let (t1, v1, after) = tlv(validity)?;
        let (t2, v2, _) = tlv(after)?;
        let mut info = CertInfo {
            subject_cn: name_cn(subject),
            issuer_cn: name_cn(issuer),
            names: Vec::new(),
            not_before: der_time(t1, v1)?,
            not_after: der_time(t2, v2)?,
            self_signed: issuer == subject,
        };
        while let Some((tag, v, r)) = tlv(rest) {
            if tag == 0xA3 {
                info.names = san_names(v).unwrap_or_default();
            }
            rest = r;
        }
        Some(info)
    }
}

/// One DER element: (tag, value, what follows).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = if l0 < 0x80 {
        (l0 as usize, rest)
    } else {
        let n = (l0 & 0x7F) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |a, &b| a << 8 | b as usize), &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The first commonName in a Name (SEQUENCE OF SET OF AttributeTypeAndValue).
fn name_cn(mut name: &[u8]) -> Option<String> {
    while let Some((_, mut set, rest)) = tlv(name) {
        while let Some((_, atv, more)) = tlv(set) {
            let (tag, oid, after) = tlv(atv)?;
            if tag == 0x06 && oid == OID_CN {
                let (_, v, _) = tlv(after)?;
                return Some(String::from_utf8_lossy(v).into_owned());
            }
            set = more;
        }
        name = rest;
    }
    None
}

/// DNS names and IP addresses of the subjectAltName extension, given the
/// value of the [3] extensions wrapper.
fn san_names(wrapper: &[u8]) -> Option<Vec<String>> {
    let (SEQUENCE, mut exts, _) = tlv(wrapper)? else { return None };
    while let Some((_, ext, rest)) = tlv(exts) {
        let (_, oid, after) = tlv(ext)?;
        let (mut tag, mut value, after) = tlv(after)?;
        if tag == 0x01 {
            // the critical flag
            (tag, value, _) = tlv(after)?;
        }
        if oid == OID_SAN && tag == 0x04 {
            let (SEQUENCE, mut names, _) = tlv(value)? else { return None };
            let mut out = Vec::new();
            while let Some((tag, v, more)) = tlv(names) {
                match (tag, v.len()) {
                    (0x82, _) => out.push(String::from_utf8_lossy(v).into_owned()),
                    (0x87, 4) => out.push(std::net::Ipv4Addr::new(v[0], v[1], v[2], v[3]).to_string()),
                    (0x87, 16) => {
                        let b: [u8; 16] = v.try_into().ok()?;
                        out.push(std::net::Ipv6Addr::from(b).to_string());
                    }
                    _ => {}
                }
                names = more;
            }
            return Some(out);
        }
        exts = rest;
    }
    Some(Vec::new())
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ) as unix seconds.
fn der_time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|b| b.is_ascii_digit()) { t.parse().ok() } else { None }
    };
    let (year, at) = match tag {
        0x17 if s.len() == 13 => {
            let yy = num(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        0x18 if s.len() == 15 => (num(0..4)?, 4),
        _ => return None,
    };
    if !s.ends_with('Z') {
        return None;
    }
    let (mo, d, h, mi, sec) = (num(at..at + 2)?, num(at + 2..at + 4)?, num(at + 4..at + 6)?, num(at + 6..at + 8)?, num(at + 8..at + 10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, mo, d) * 86400 + h * 3600 + mi * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` of a unix time (UTC).
pub fn format_date(unix: i64) -> String {
    let z = unix.div_euclid(86400) + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a unix time.
pub fn format_timestamp(unix: i64) -> String {
    let t = unix.rem_euclid(86400);
    format!("{}T{:02}:{:02}:{:02}Z", format_date(unix), t / 3600, t % 3600 / 60, t % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        for (unix, s) in [(0, "1970-01-01"), (19_782 * 86400 + 5, "2024-02-29"), (-1, "1969-12-31"), (4_102_444_800, "2100-01-01")] {
            assert_eq!(format_date(unix), s);
        }
        assert_eq!(format_timestamp(19_782 * 86400 + 3723), "2024-02-29T01:02:03Z");
        assert_eq!(format_timestamp(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn times() {
        assert_eq!(der_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(der_time(0x17, b"491231235959Z"), Some(days_from_civil(2049, 12, 31) * 86400 + 86399));
        assert_eq!(der_time(0x18, b"20500101000000Z"), Some(days_from_civil(2050, 1, 1) * 86400));
        assert_eq!(der_time(0x17, b"7001010000Z"), None);
        assert_eq!(der_time(0x17, b"701301000000Z"), None);
    }

    #[test]
    fn long_lengths() {
        let mut v = vec![0x04, 0x82, 0x01, 0x00];
        v.extend(std::iter::repeat_n(7u8, 256));
        v.push(0xFF);
        let (t, val, rest) = tlv(&v).unwrap();
        assert_eq!((t, val.len(), rest), (0x04, 256, &[0xFF][..]));
        assert!(tlv(&[0x04, 0x05, 1, 2]).is_none());
        assert!(tlv(&[0x04, 0x80]).is_none());
    }
}
