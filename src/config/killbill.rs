//! `[killbill]`: the KillBill server and its API version.

use serde::{Deserialize, Serialize};

use super::*;

/// The KillBill server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KillBillSettings {
    /// Base URL, e.g. `https://killbill.example:8443` (TLS verified against `ca_file`, or the
    /// system roots).
    pub url: String,
    /// Basic-auth user.
    pub username: String,
    /// Basic-auth password.
    pub password: Secret,
    /// The tenant's API key (`X-Killbill-ApiKey`).
    pub api_key: String,
    /// The tenant's API secret (`X-Killbill-ApiSecret`).
    pub api_secret: Secret,
    /// `X-Killbill-CreatedBy` on every write.
    #[serde(default = "default_created_by")]
    pub created_by: String,
    /// Currency of new accounts (immutable in KillBill).
    #[serde(default = "default_currency")]
    pub currency: String,
    /// A PEM bundle of the CAs KillBill's certificate is verified against, instead of the
    /// system roots (a private CA).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Whole-request timeout (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Connection timeout (ms).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Idle connections kept per host.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: usize,
    /// The server's release line, which decides how dates and amounts are written.
    #[serde(default)]
    pub server_version: KillBillVersion,
}

impl std::fmt::Display for KillBillVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KillBillVersion::V0_24 => "0.24",
            KillBillVersion::V0_22 => "0.22",
        })
    }
}

/// The KillBill release lines this client speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum KillBillVersion {
    /// 0.24: subscription and usage dates are date-times, usage amounts decimals.
    #[default]
    #[serde(rename = "0.24")]
    V0_24,
    /// 0.22: subscription and usage dates are days (`yyyy-MM-dd`, refused otherwise) and usage
    /// amounts whole numbers (a fraction is silently truncated by the server, so this client
    /// refuses to send one).
    #[serde(rename = "0.22")]
    V0_22,
}

pub(super) fn default_created_by() -> String {
    "concertim-billing".to_owned()
}
pub(super) fn default_currency() -> String {
    "USD".to_owned()
}
pub(super) fn default_pool_max_idle() -> usize {
    32
}

impl KillBillSettings {
    pub(super) fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("killbill.url {:?} must start with http:// or https://", self.url));
        }
        check_ca_file("killbill", self.ca_file.as_deref(), true)
    }
}
