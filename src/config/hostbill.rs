//! `[hostbill]`: the HostBill server.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;

/// The HostBill server. Every key may be absent in the file (so `config check` can name each
/// missing one); the ones a HostBill deployment needs are checked at load.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostBillSettings {
    /// Base URL of HostBill, e.g. `https://billing.example`; calls go to `<url>/admin/api.php`.
    pub url: Option<String>,
    /// API id (Settings → Security → API Access).
    pub api_id: Option<String>,
    /// API key.
    pub api_key: Option<Secret>,
    /// Plan name (from `[billing.plans]` and `default_plan`) → HostBill product id of a
    /// Metered Billing product whose variables are the meter units.
    #[serde(default)]
    pub products: BTreeMap<String, String>,
    /// Clients are found again by the email `<project id>@<client_email_domain>`.
    #[serde(default = "default_client_email_domain")]
    pub client_email_domain: String,
    /// Billing cycle of new orders (`m` monthly, `q`, `s`, `a`, …).
    #[serde(default = "default_cycle")]
    pub cycle: String,
    /// Whole-request timeout (ms).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Connection timeout (ms).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

pub(super) fn default_client_email_domain() -> String {
    "openstack.invalid".to_owned()
}
pub(super) fn default_cycle() -> String {
    "m".to_owned()
}
