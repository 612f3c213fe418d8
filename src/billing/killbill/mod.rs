//! The KillBill backend (the KillBill 0.22/0.24 REST API, as the real server answers it; the
//! test suite runs against a real server).
//!
//! Objects are found by key, never by scanning: accounts by `externalKey` = project id (or,
//! for an account the Python service made, by the project custom field it carries, through
//! KillBill's custom-field search: see `lookup.rs`), subscriptions by `externalKey` = instance
//! uuid. "Already exists" answers are success:
//! 409/3000 for an account, 400/9000 for a custom field, 400/50000 for a usage trackingId,
//! 500/1031 for a second cancel, 400/1014 or 1015 for a second subscription create (found
//! again by key). Connect errors, timeouts, 5xx and 429 are transient; other 4xx are
//! permanent, with the status and body kept for the dead-letter reason.
//!
//! Dates the server refuses are never sent: a cancellation or plan change is dated no earlier
//! than the subscription's last transition (its start, or an earlier plan change), and a usage
//! record no earlier than the subscription's start (KillBill stores earlier records but never
//! invoices them). A deleted project's account is not closed in KillBill (closing switches
//! invoicing off, and the last partial period would never be invoiced): its subscriptions are
//! cancelled and the account carries `openstack_closed_at`.

mod accounts;
mod billing;
mod bootstrap;
mod client;
mod figures;
mod lookup;
mod wire;

pub use bootstrap::{
    bootstrap_configured, catalog_effective_dates, catalog_gaps, configured_gaps, BootstrapError, Bootstrapped,
    CATALOG_XML,
};
pub use figures::month_of;
pub use lookup::AccountPreview;

use lookup::Known;
use wire::{kb_date, kb_day};

use std::time::Duration;

use crate::billing::BillingError;
use crate::{
    config::{KillBillSettings, KillBillVersion},
    event::Timestamp,
};

/// Custom field holding the OpenStack project id, on accounts and subscriptions. It is the
/// field the Python service's older releases (V11) put on their accounts already; the accounts
/// of its current releases carry `project_cloud_id` instead, and get this one when adopted.
pub const FIELD_PROJECT: &str = "openstack_project_id";
/// Custom field holding the subscribed resource's uuid (an instance's, a volume's …), on
/// subscriptions.
pub const FIELD_INSTANCE: &str = "openstack_instance_id";
/// Custom field holding the flavor name (a volume's type), on subscriptions.
pub const FIELD_FLAVOR: &str = "openstack_flavor";
/// Custom field holding the resource's display name, on subscriptions.
pub const FIELD_DISPLAY_NAME: &str = "openstack_display_name";
/// Custom field holding the kind of the subscribed resource (`instance`, `volume`,
/// `floating_ip` …), on subscriptions: the plan's product says it too, but only through the
/// catalog.
pub const FIELD_RESOURCE_TYPE: &str = "resource_type";
/// Custom field recording when the project was deleted, on accounts: a subscription created
/// afterwards (a late message) is cancelled at that time.
pub const FIELD_CLOSED_AT: &str = "openstack_closed_at";

/// A KillBill client.
#[derive(Debug)]
pub struct KillBill {
    http: reqwest::Client,
    settings: KillBillSettings,
    known: std::sync::Mutex<Known>,
}

impl KillBill {
    /// A client for the configured server.
    ///
    /// # Errors
    /// When `killbill.ca_file` cannot be read or holds no certificate (checked at config load),
    /// or the HTTP client cannot be built (TLS roots unavailable).
    pub fn new(settings: KillBillSettings) -> Result<Self, BillingError> {
        let http = crate::outbound::client(
            Duration::from_millis(settings.timeout_ms),
            Duration::from_millis(settings.connect_timeout_ms),
        )
        .pool_max_idle_per_host(settings.pool_max_idle);
        let http = crate::outbound::trusting(http, "killbill.ca_file", settings.ca_file.as_deref())
            .map_err(|detail| BillingError::Protocol { what: "configure KillBill".into(), detail })?
            .build()
            .map_err(|source| BillingError::Http { what: "building the HTTP client".into(), source })?;
        Ok(Self { http, settings, known: std::sync::Mutex::new(Known::default()) })
    }

    /// A subscription or usage date as this server reads it: a date-time (0.24) or the UTC day
    /// (0.22, which refuses date-times).
    fn date(&self, t: Timestamp) -> String {
        kb_date(self.settings.server_version, t)
    }

    /// Whether a record dated `date` is within a subscription that ends at `end`, as the server
    /// compares them (0.22 compares days).
    fn within(&self, date: Timestamp, end: Timestamp) -> bool {
        match self.settings.server_version {
            KillBillVersion::V0_24 => date <= end,
            KillBillVersion::V0_22 => kb_day(date) <= kb_day(end),
        }
    }
}

#[cfg(test)]
mod tests {
    use reqwest::StatusCode;
    use rust_decimal::Decimal;

    use super::{
        client::Answer,
        wire::{kb_parse, kb_time, usage_body, SubscriptionJson},
        *,
    };
    use crate::event::{PlanName, ResourceKind, Unit};

    #[test]
    fn a_month_runs_from_its_first_to_its_last_day() {
        let (start, end) = month_of(time::macros::date!(2024 - 02 - 10));
        assert_eq!((start.to_string(), end.to_string()), ("2024-02-01".into(), "2024-02-29".into()));
    }

    #[test]
    fn usage_amounts_go_out_as_the_exact_decimal_never_through_f64() {
        let t = Timestamp::parse("2025-03-03T09:10:00Z").unwrap();
        let unit = Unit::parse("openstack-billed-memory").unwrap();
        // 0.1 + 0.2 in f64 is 0.30000000000000004; 1/3 to 9 places stays 9 places.
        let records = vec![
            (unit.clone(), t, "0.3".parse::<Decimal>().unwrap()),
            (unit, t, "0.333333333".parse::<Decimal>().unwrap()),
        ];
        let json = serde_json::to_string(&usage_body("sub", "track", &records, KillBillVersion::V0_24)).unwrap();
        assert!(json.contains(r#""amount":0.3}"#) && json.contains(r#""amount":0.333333333}"#), "{json}");
    }

    #[test]
    fn a_catalogs_versions_are_compared_as_instants_whatever_their_spelling() {
        let uploaded = "<catalog><effectiveDate>2025-01-01T00:00:00+00:00</effectiveDate></catalog>";
        // KillBill's rendering of its versions (GET /1.0/kb/catalog/xml).
        let served = "<catalogs><versions><version><effectiveDate>2024-06-01T00:00:00Z</effectiveDate></version>\
                      <version><effectiveDate>2025-01-01T00:00:00Z</effectiveDate></version></versions></catalogs>";
        let ours = catalog_effective_dates(uploaded)[0];
        assert!(catalog_effective_dates(served).contains(&ours));
        assert_eq!(catalog_effective_dates(served).len(), 2);
    }

    #[test]
    fn the_bundled_catalog_lacks_nothing_the_default_config_bills_and_a_missing_unit_is_named() {
        let settings = crate::config::Settings::embedded();
        let billing = &settings.billing;
        let r = &billing.resources;
        // Written out rather than taken from billed_units/billed_plans, which are checked too.
        let mut units: Vec<String> = billing.meters.values().map(|m| m.unit.to_string()).collect();
        for kind in ResourceKind::ALL {
            units.extend(crate::timeline::Kind::billing(kind).into_iter().map(|k| billing.time.unit_name(k)));
        }
        let plans: Vec<&str> = std::iter::once(&billing.default_plan)
            .chain(billing.plans.values())
            .chain([&r.volume_plan, &r.snapshot_plan, &r.floating_ip_plan, &r.image_plan, &r.network_plan])
            .chain(r.volume_types.values())
            .map(PlanName::as_str)
            .collect();
        assert!(units.contains(&"openstack-volume-gib-seconds".to_owned()), "{units:?}");
        assert!(units.contains(&"openstack-network-egress-gib".to_owned()), "{units:?}");
        assert_eq!(catalog_gaps(CATALOG_XML, units.iter().map(String::as_str), plans), Vec::<String>::new());
        assert_eq!(configured_gaps(billing, CATALOG_XML), Vec::<String>::new());
        let gaps = catalog_gaps(CATALOG_XML, ["openstack-volume-gib-hours"], ["openstack-nothing"]);
        assert_eq!(gaps, vec!["unit openstack-volume-gib-hours".to_owned(), "plan openstack-nothing".to_owned()]);
    }

    #[test]
    fn a_catalog_without_the_resource_plans_and_units_is_refused_naming_them() {
        let settings = crate::config::Settings::embedded();
        let lacking = CATALOG_XML
            .replace("<unit name=\"openstack-floating-ip-seconds\"/>", "")
            .replace("<plan name=\"openstack-snapshot-monthly\">", "<plan name=\"openstack-snapshot-removed\">");
        assert_eq!(
            configured_gaps(&settings.billing, &lacking),
            ["unit openstack-floating-ip-seconds", "plan openstack-snapshot-monthly"]
        );
    }

    #[test]
    fn the_catalog_declares_every_unit_of_the_time_unit_in_use_only() {
        // An operator who bills in hours needs a catalog in hours: the bundled one is in seconds.
        let settings = crate::config::Settings::from_toml(
            &crate::config::DEFAULT_TOML.replace("unit = \"seconds\"", "unit = \"hours\""),
            "t.toml",
        )
        .unwrap();
        let gaps = configured_gaps(&settings.billing, CATALOG_XML);
        assert!(gaps.contains(&"unit openstack-volume-gib-hours".to_owned()), "{gaps:?}");
        assert!(!gaps.iter().any(|g| g.starts_with("plan ")), "{gaps:?}");
    }

    #[test]
    fn a_cancellation_or_plan_change_is_never_dated_before_the_last_transition() {
        let json = r#"{"subscriptionId":"s","startDate":"2025-03-03T09:00:41.000Z","billingStartDate":"2025-03-03T09:00:41.000Z",
            "events":[{"eventType":"START_ENTITLEMENT","effectiveDate":"2025-03-03T09:00:41.000Z"},
                      {"eventType":"CHANGE","effectiveDate":"2025-03-03T09:26:30.000Z"},
                      {"eventType":"STOP_BILLING","effectiveDate":"2025-03-03T10:00:00.000Z"}]}"#;
        let subscription: SubscriptionJson = serde_json::from_str(json).unwrap();
        assert_eq!(subscription.floor(), Some(Timestamp::parse("2025-03-03T09:26:30Z").unwrap()));
    }

    #[test]
    fn usage_after_the_end_is_recognised_in_both_servers_words_and_nothing_else_is() {
        let answer = |body: &str| Answer { status: StatusCode::BAD_REQUEST, location: None, body: body.into() };
        assert!(answer("").after_end(), "0.24: an empty 400");
        assert!(answer(r#"{"message":"Bad Request","url":"/1.0/kb/usages","status":"400"}"#).after_end(), "0.22");
        let killbill_error =
            r#"{"className":"java.lang.IllegalArgumentException","code":null,"message":"Bad Request"}"#;
        assert!(!answer(killbill_error).after_end());
        assert!(!answer("<html>Bad Request</html>").after_end());
    }

    #[test]
    fn a_killbill_local_date_is_the_start_of_that_day() {
        assert_eq!(kb_parse("2026-12-05"), Timestamp::parse("2026-12-05T00:00:00Z").ok());
        assert_eq!(kb_parse("2026-12-05T10:00:00.000Z"), Timestamp::parse("2026-12-05T10:00:00Z").ok());
        assert_eq!(kb_parse("garbage"), None);
    }

    #[test]
    fn times_go_out_as_utc_with_milliseconds() {
        let t = Timestamp::parse("2025-03-03 09:00:41.123456").unwrap();
        assert_eq!(kb_time(t), "2025-03-03T09:00:41.123Z");
    }
}
