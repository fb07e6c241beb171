//! The file as TOML says it: one struct per section, every key optional,
//! unknown keys refused. Nothing here checks a value; [`super::validate`] does.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Bandwidth, Seconds};

/// Deserializes a value written as a string or a bare number (`90`, "90s",
/// "50 Mbit/s", 0) through its `FromStr`, which says what is wrong.
pub(super) fn text_or_number<'de, D, T>(d: D, expecting: &'static str) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    struct V<T>(&'static str, std::marker::PhantomData<T>);
    impl<T: std::str::FromStr<Err = String>> serde::de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(self.0)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
            v.to_string().parse().map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
            v.to_string().parse().map_err(E::custom)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            v.parse().map_err(E::custom)
        }
    }
    d.deserialize_any(V(expecting, std::marker::PhantomData))
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub realm: Option<String>,
    pub software: Option<String>,
    pub threads: Option<NumberOrText>,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub listen: Vec<ListenSection>,
    #[serde(default)]
    pub relay: RelaySection,
    #[serde(default)]
    pub peers: PeersSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub log: LogSection,
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub check: CheckSection,
    #[serde(default)]
    pub xdp: XdpSection,
    #[serde(default)]
    pub drain: DrainSection,
}

/// `[xdp]`: the in-kernel fast path for UDP clients' channels (feature `xdp`).
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct XdpSection {
    #[serde(default)]
    pub interfaces: Vec<String>,
    pub mode: Option<String>,
}

/// `[drain]`: where new clients go while this relay drains.
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct DrainSection {
    #[serde(default)]
    pub alternate: Vec<AlternateSection>,
}

/// `[[drain.alternate]]`: one sibling relay.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AlternateSection {
    pub address: String,
    pub tls_clients: Option<bool>,
    pub domain: Option<String>,
}

/// `[check]`: the check page participants open in their browser.
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct CheckSection {
    pub enabled: Option<bool>,
    pub token: Option<String>,
    pub http_listen: Option<String>,
    pub credential_ttl: Option<Seconds>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub enabled: Option<bool>,
    pub token_file: Option<PathBuf>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub listen: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Certificate chain and key files (certbot, a private CA); absent with `acme`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Server names (SNI) that TLS listeners answer as TURN when
    /// `passthrough` sends other names to a web server.
    #[serde(default)]
    pub turn_names: Vec<String>,
    #[serde(default)]
    pub passthrough: Option<PassthroughSection>,
    #[serde(default)]
    pub acme: Option<AcmeSection>,
}

/// `[tls.acme]`: turnd obtains and renews its certificate itself.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AcmeSection {
    #[serde(default)]
    pub names: Vec<String>,
    pub contact: Option<String>,
    pub directory: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub ca_root: Option<PathBuf>,
}

/// `[tls.passthrough]`: TLS connections for other names go, untouched, to a
/// web server on another local port.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct PassthroughSection {
    pub backend: String,
    pub proxy_protocol: Option<String>,
    pub idle_timeout: Option<Seconds>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    #[serde(default)]
    pub secrets: Vec<String>,
    pub secret_file: Option<PathBuf>,
    pub nonce_lifetime: Option<Seconds>,
    #[serde(default)]
    pub static_users: Vec<StaticUser>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct StaticUser {
    pub username: String,
    pub password: String,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    pub transport: String,
    pub address: String,
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Load balancers allowed to send the PROXY header (CIDRs).
    #[serde(default)]
    pub proxy_protocol_from: Vec<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    pub ip: Option<String>,
    pub ipv6: Option<String>,
    pub external_ip: Option<String>,
    pub external_ipv6: Option<String>,
    pub ports: Option<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct PeersSection {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub default_lifetime: Option<Seconds>,
    pub max_lifetime: Option<Seconds>,
    pub permission_lifetime: Option<Seconds>,
    pub channel_lifetime: Option<Seconds>,
    pub user_quota: Option<u32>,
    pub total_quota: Option<u32>,
    pub max_permissions: Option<u32>,
    pub legacy_channel_numbers: Option<bool>,
    pub max_connections: Option<u32>,
    pub max_connections_per_ip: Option<u32>,
    pub tls_handshake_timeout: Option<Seconds>,
    pub idle_timeout: Option<Seconds>,
    pub drain_timeout: Option<Seconds>,
    pub unauth_rate: Option<u32>,
    pub allocation_bandwidth: Option<Bandwidth>,
    pub total_bandwidth: Option<Bandwidth>,
    pub ipv6_prefix_per_ip: Option<u8>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub level: Option<String>,
    pub format: Option<String>,
}

/// Parses TOML text into the file structure (no validation).
pub fn parse_str(text: &str) -> Result<File, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
}

/// A key written as a bare number or as text (`threads = 4`, `threads = "auto"`).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum NumberOrText {
    Number(i64),
    Text(String),
}

impl NumberOrText {
    pub(super) fn into_text(self) -> String {
        match self {
            NumberOrText::Number(n) => n.to_string(),
            NumberOrText::Text(s) => s,
        }
    }
}
