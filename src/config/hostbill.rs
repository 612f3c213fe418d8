//! `[hostbill]`: the HostBill server.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::*;

/// The HostBill server. Every key may be absent in the file (so `config check` can name each
/// missing one); the ones a HostBill deployment needs are checked at load.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostBillSettings {
    /// Base URL of HostBill, e.g. `https://billing.example`; calls go to `<url>/admin/api.php`
    /// (TLS verified against `ca_file`, or the system roots).
    pub url: Option<String>,
    /// API id (Settings → Security → API Access).
    pub api_id: Option<String>,
    /// API key.
    pub api_key: Option<Secret>,
    /// Plan name → HostBill product id of a Metered Billing product whose variables are the
    /// units its plan bills. Every plan the configuration can subscribe to needs one: the
    /// instance plans (`default_plan`, `[billing.plans]`), the volume, snapshot, floating IP and
    /// image plans of `[billing.resources]` (and each plan of `volume_types`), and its network
    /// plan while traffic is billed.
    #[serde(default)]
    pub products: BTreeMap<String, String>,
    /// Clients are found again by the email `<project id>@<client_email_domain>`.
    #[serde(default = "default_client_email_domain")]
    pub client_email_domain: String,
    /// Billing cycle of new orders (`m` monthly, `q`, `s`, `a`, …).
    #[serde(default = "default_cycle")]
    pub cycle: String,
    /// A PEM bundle of the CAs HostBill's certificate is verified against, instead of the
    /// system roots (a private CA).
    #[serde(default)]
    pub ca_file: Option<String>,
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

impl HostBillSettings {
    /// The keys a HostBill deployment needs, and a product for every plan `billing` bills
    /// ([`BillingSettings::billed_plans`]).
    pub(super) fn validate(&self, billing: &BillingSettings) -> Result<(), String> {
        let mut missing = Vec::new();
        if self.url.is_none() {
            missing.push("hostbill.url (e.g. \"https://billing.example\")".to_owned());
        }
        if self.api_id.is_none() {
            missing.push("hostbill.api_id".to_owned());
        }
        if self.api_key.is_none() {
            missing.push("hostbill.api_key (or CONCERTIM_BILLING_HOSTBILL__API_KEY)".to_owned());
        }
        for plan in billing.billed_plans() {
            if !self.products.contains_key(plan.as_str()) {
                missing.push(format!("hostbill.products.\"{plan}\" (the HostBill product id for plan {plan})"));
            }
        }
        if !missing.is_empty() {
            return Err(format!("billing.backend = \"hostbill\" needs: {}", missing.join(", ")));
        }
        check_ca_file("hostbill", self.ca_file.as_deref(), true)
    }
}
