//! The few facts an operator wants from a certificate (names, issuer,
//! expiry), read with x509-parser, and how dates are written: shared by the
//! server (expiry warnings) and the client side (`turnctl check`).

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
