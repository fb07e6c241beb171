//! The client side of TLS: which roots to trust, and a verifier that records
//! what the server presented and what verification said about it. The facts
//! an operator wants from a certificate live in [`crate::certinfo`], which
//! the server uses too.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme};

pub use crate::certinfo::{format_date, format_timestamp, CertInfo};

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
