//! The client side of TLS: which roots to trust, a verifier that records what
//! the server presented and what verification said about it, and the few
//! facts an operator wants from a certificate (names, expiry), read with
//! x509-parser.

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


impl CertInfo {
    /// Reads an X.509 certificate (DER): issuer and subject common names,
    /// validity and the subjectAltName's DNS names and IP addresses. `None`
    /// when it does not parse.
    pub fn parse(der: &[u8]) -> Option<CertInfo> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let cn = |name: &x509_parser::x509::X509Name<'_>| name.iter_common_name().next().and_then(|a| a.as_str().ok()).map(str::to_owned);
        let names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
                        16 => <[u8; 16]>::try_from(*b).ok().map(|b| std::net::Ipv6Addr::from(b).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Some(CertInfo {
            subject_cn: cn(cert.subject()),
            issuer_cn: cn(cert.issuer()),
            names,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
        })
    }
}

fn utc(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// `YYYY-MM-DD` of a unix time (UTC).
pub fn format_date(unix: i64) -> String {
    utc(unix).date().to_string()
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a unix time.
pub fn format_timestamp(unix: i64) -> String {
    let t = utc(unix);
    format!("{}T{:02}:{:02}:{:02}Z", t.date(), t.hour(), t.minute(), t.second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        for (unix, s) in [(0, "1970-01-01"), (19_782 * 86400 + 5, "2024-02-29"), (-1, "1969-12-31"), (4_102_444_800, "2100-01-01")] {
            assert_eq!(format_date(unix), s);
        }
        assert_eq!(format_timestamp(19_782 * 86400 + 3723), "2024-02-29T01:02:03Z");
        assert_eq!(format_timestamp(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn reads_a_certificate() {
        let dir = std::env::temp_dir().join(format!("turnd-certinfo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3", "-outform", "der"])
            .arg("-keyout")
            .arg(dir.join("k.pem"))
            .arg("-out")
            .arg(dir.join("c.der"))
            .args(["-subj", "/CN=turn.example.com", "-addext", "subjectAltName=DNS:turn.example.com,IP:192.0.2.7,IP:2001:db8::7"])
            .output()
            .expect("openssl");
        assert!(out.status.success());
        let info = CertInfo::parse(&std::fs::read(dir.join("c.der")).unwrap()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(info.subject_cn.as_deref(), Some("turn.example.com"));
        assert!(info.self_signed);
        assert_eq!(info.names, ["turn.example.com", "192.0.2.7", "2001:db8::7"]);
        assert!((info.not_after - info.not_before - 3 * 86400).abs() <= 1);
        assert!(CertInfo::parse(b"not a certificate").is_none());
    }
}
