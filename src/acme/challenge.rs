//! The TLS-ALPN-01 challenge certificate (RFC 8737 3): self-signed, for
//! the one name being validated, carrying the SHA-256 digest of the key
//! authorization in a critical acmeIdentifier extension.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

pub fn certificate(name: &str, digest: &[u8], provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider.key_provider.load_private_key(der)?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_name_and_carries_the_digest_in_a_critical_extension() {
        let provider = rustls::crypto::ring::default_provider();
        let digest = [7u8; 32];
        let ck = certificate("turn.example.com", &digest, &provider).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(ck.cert[0].as_ref()).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(format!("{:?}", san.value.general_names), "[DNSName(\"turn.example.com\")]");
        let oid = x509_parser::oid_registry::Oid::from(&[1, 3, 6, 1, 5, 5, 7, 1, 31]).unwrap();
        let ext = cert.extensions().iter().find(|e| e.oid == oid).expect("acmeIdentifier");
        assert!(ext.critical);
        // DER OCTET STRING of the 32-byte digest.
        let mut want = vec![0x04, 32];
        want.extend(digest);
        assert_eq!(ext.value, &want[..]);
    }
}
