//! KillBill's JSON, as this client writes and reads it, and its date forms.

use crate::billing::ExactAmount;
use serde::{Deserialize, Serialize};

use rust_decimal::Decimal;

use crate::{
    config::KillBillVersion,
    event::{Timestamp, Unit},
};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct NewAccount<'a> {
    pub(super) external_key: &'a str,
    pub(super) name: &'a str,
    pub(super) currency: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AccountJson {
    pub(super) account_id: String,
}

#[derive(Serialize)]
pub(super) struct NewCustomField<'a> {
    pub(super) name: &'a str,
    pub(super) value: &'a str,
}

/// A hit of `GET /1.0/kb/customFields/search/{key}`: a custom field with its object.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct FoundFieldJson {
    #[serde(default)]
    pub(super) object_id: String,
    #[serde(default)]
    pub(super) object_type: Option<String>,
    pub(super) name: String,
    pub(super) value: String,
}

#[derive(Deserialize)]
pub(super) struct CustomFieldJson {
    pub(super) name: String,
    pub(super) value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct NewSubscription<'a> {
    pub(super) account_id: &'a str,
    pub(super) external_key: &'a str,
    pub(super) bundle_external_key: &'a str,
    pub(super) plan_name: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PlanChange<'a> {
    pub(super) plan_name: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SubscriptionJson {
    pub(super) subscription_id: String,
    #[serde(default)]
    pub(super) account_id: Option<String>,
    /// The resource id the subscription bills (this client's key; another's may differ).
    #[serde(default)]
    pub(super) external_key: Option<String>,
    #[serde(default)]
    pub(super) plan_name: Option<String>,
    #[serde(default)]
    pub(super) state: Option<String>,
    #[serde(default)]
    pub(super) start_date: Option<String>,
    #[serde(default)]
    pub(super) billing_start_date: Option<String>,
    #[serde(default)]
    pub(super) cancelled_date: Option<String>,
    #[serde(default)]
    pub(super) billing_end_date: Option<String>,
    #[serde(default)]
    pub(super) events: Vec<SubscriptionEventJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SubscriptionEventJson {
    #[serde(default)]
    pub(super) effective_date: Option<String>,
    #[serde(default)]
    pub(super) event_type: Option<String>,
}

impl SubscriptionJson {
    /// A subscription this client has just created, as KillBill holds it.
    pub(super) fn created(subscription_id: String, start: Timestamp) -> Self {
        Self {
            subscription_id,
            account_id: None,
            external_key: None,
            plan_name: None,
            state: Some("ACTIVE".into()),
            start_date: Some(kb_time(start)),
            billing_start_date: None,
            cancelled_date: None,
            billing_end_date: None,
            events: Vec::new(),
        }
    }

    /// When the subscription starts (entitlement or billing, whichever KillBill says is later).
    pub(super) fn start(&self) -> Option<Timestamp> {
        [&self.start_date, &self.billing_start_date].into_iter().filter_map(|t| t.as_deref().and_then(kb_parse)).max()
    }

    /// When billing ends, if the subscription is cancelled (now or in the future).
    pub(super) fn end(&self) -> Option<Timestamp> {
        [&self.billing_end_date, &self.cancelled_date].into_iter().filter_map(|t| t.as_deref().and_then(kb_parse)).min()
    }

    /// The earliest date KillBill accepts for a cancellation or a plan change: the previous
    /// transition (`DefaultSubscriptionBaseApiService.validateEffectiveDate`), i.e. the start or
    /// a later plan change.
    pub(super) fn floor(&self) -> Option<Timestamp> {
        let changes = self.events.iter().filter(|e| {
            matches!(e.event_type.as_deref(), Some("START_ENTITLEMENT" | "START_BILLING" | "CHANGE" | "PHASE"))
        });
        changes.filter_map(|e| e.effective_date.as_deref().and_then(kb_parse)).chain(self.start()).max()
    }
}

#[derive(Deserialize)]
pub(super) struct BundleJson {
    #[serde(default)]
    pub(super) subscriptions: Vec<SubscriptionJson>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct UsageBody<'a> {
    pub(super) subscription_id: &'a str,
    pub(super) tracking_id: &'a str,
    pub(super) unit_usage_records: Vec<UnitRecords<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct UnitRecords<'a> {
    pub(super) unit_type: &'a str,
    pub(super) usage_records: Vec<Record>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Record {
    pub(super) record_date: String,
    pub(super) amount: ExactAmount,
}

/// A credit's body (`POST /1.0/kb/credits` takes an array of them).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct NewCredit<'a> {
    pub(super) account_id: &'a str,
    pub(super) amount: ExactAmount,
    pub(super) currency: &'a str,
    pub(super) description: &'a str,
}

/// One usage call's body: the records grouped by unit, in their order.
pub(super) fn usage_body<'a>(
    subscription_id: &'a str,
    tracking_id: &'a str,
    records: &'a [(Unit, Timestamp, Decimal)],
    version: KillBillVersion,
) -> UsageBody<'a> {
    let mut units: Vec<UnitRecords<'a>> = Vec::new();
    for (unit, date, amount) in records {
        let entry = Record { record_date: kb_date(version, *date), amount: ExactAmount(*amount) };
        match units.iter_mut().find(|u| u.unit_type == unit.as_str()) {
            Some(existing) => existing.usage_records.push(entry),
            None => units.push(UnitRecords { unit_type: unit.as_str(), usage_records: vec![entry] }),
        }
    }
    UsageBody { subscription_id, tracking_id, unit_usage_records: units }
}

/// A date KillBill wrote: a DateTime, or (0.22's subscription dates) a `LocalDate`, which is
/// the start of that day in the account's time zone (UTC for the accounts made here).
pub(super) fn kb_parse(text: &str) -> Option<Timestamp> {
    Timestamp::parse(text)
        .ok()
        .or_else(|| (text.len() == 10).then(|| Timestamp::parse(&format!("{text}T00:00:00Z")).ok()).flatten())
}

/// A date as a server of `version` reads it: a date-time (0.24), or the UTC day (0.22, which
/// refuses date-times).
pub(super) fn kb_date(version: KillBillVersion, t: Timestamp) -> String {
    match version {
        KillBillVersion::V0_24 => kb_time(t),
        KillBillVersion::V0_22 => kb_day(t),
    }
}

/// The UTC day of a time, as KillBill's `LocalDate`s are written.
pub(super) fn kb_day(t: Timestamp) -> String {
    let t = t.as_offset();
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

/// KillBill writes DateTimes as ISO-8601 UTC with milliseconds; it reads the same.
pub(super) fn kb_time(t: Timestamp) -> String {
    let t = t.as_offset();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}
