//! The KillBill backend (the KillBill 0.22/0.24 REST API, as the real server answers it; the
//! test suite runs against a real server).
//!
//! Objects are found by key, never by scanning: accounts by `externalKey` = project id,
//! subscriptions by `externalKey` = instance uuid. "Already exists" answers are success:
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

use std::time::Duration;

use reqwest::{header::HeaderMap, Method, RequestBuilder, Response, StatusCode};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use rust_decimal::Decimal;

use super::{AccountFigures, Applied, Billing, BillingError, Context};
use crate::{
    config::{KillBillSettings, KillBillVersion},
    event::{InstanceId, PlanName, ProjectId, Timestamp, Unit},
    plan::{SubscriptionSpec, UsageSpec},
};

/// Custom field holding the OpenStack project id, on accounts and subscriptions.
pub const FIELD_PROJECT: &str = "openstack_project_id";
/// Custom field holding the instance uuid, on subscriptions.
pub const FIELD_INSTANCE: &str = "openstack_instance_id";
/// Custom field holding the flavor name, on subscriptions.
pub const FIELD_FLAVOR: &str = "openstack_flavor";
/// Custom field holding the instance's display name, on subscriptions.
pub const FIELD_DISPLAY_NAME: &str = "openstack_display_name";
/// Custom field recording when the project was deleted, on accounts: a subscription created
/// afterwards (a late message) is cancelled at that time.
pub const FIELD_CLOSED_AT: &str = "openstack_closed_at";

/// The catalog written for this project (`deploy/killbill/catalog.xml`): usage-only plans in the
/// units of the default meters.
pub const CATALOG_XML: &str = include_str!("../../deploy/killbill/catalog.xml");

/// What `bootstrap` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootstrapped {
    /// The tenant was created (false: it existed).
    pub tenant_created: bool,
    /// The catalog was uploaded (false: this version was there already).
    pub catalog_uploaded: bool,
}

/// KillBill's error codes that mean "already done".
const ACCOUNT_ALREADY_EXISTS: i64 = 3000;
const ACCOUNT_NOT_FOUND_BY_KEY: i64 = 3003;
const SUBSCRIPTION_NOT_FOUND_BY_KEY: i64 = 1083;
const CANCEL_BAD_STATE: i64 = 1031;
const CHANGE_NON_ACTIVE: i64 = 1021;
const INVALID_REQUESTED_DATE: i64 = 1001;
const BUNDLE_KEY_EXISTS: i64 = 1014;
const BUNDLE_HAS_BASE: i64 = 1015;
const CATALOG_INVALID_FOR_TENANT: i64 = 2080;
const CUSTOM_FIELD_ALREADY_EXISTS: i64 = 9000;
const TRACKING_ID_ALREADY_EXISTS: i64 = 50000;
const TENANT_ALREADY_EXISTS: i64 = 20000;

/// A KillBill client.
#[derive(Debug)]
pub struct KillBill {
    http: reqwest::Client,
    settings: KillBillSettings,
    known: std::sync::Mutex<Known>,
}

/// Ids of objects seen to exist. Accounts and subscriptions are never deleted in KillBill
/// (closing and cancelling keep them), so an id once seen stays right; remembering it saves the
/// lookup by key that every usage call would otherwise start with.
#[derive(Debug, Default)]
struct Known {
    accounts: std::collections::HashMap<ProjectId, String>,
    subscriptions: std::collections::HashMap<InstanceId, KnownSubscription>,
}

/// A subscription seen to exist, with its start and end as last seen: usage dated before the
/// start is moved to it, where KillBill invoices it, and usage after the end is late (KillBill
/// 0.22 compares days, so it would bill the rest of the end's day).
#[derive(Debug, Clone)]
struct KnownSubscription {
    id: String,
    /// The account it belongs to, when the answer said.
    account_id: Option<String>,
    start: Option<Timestamp>,
    // FIXME(billing): an end set by another replica after this one remembered the
    // subscription is not seen here; on KillBill 0.22 usage later that same day is then billed.
    end: Option<Timestamp>,
}

/// Beyond this many remembered ids the memory is cleared and refilled on demand.
const KNOWN_MAX: usize = 200_000;

/// An answer: status, body text.
struct Answer {
    status: StatusCode,
    location: Option<String>,
    body: String,
}

impl Answer {
    /// The usage call's answer to a record dated after the subscription's end: the resource
    /// returns a bare 400, which 0.24 sends with an empty body and 0.22 (through Jetty) with the
    /// container's `{"message":"Bad Request","url":…,"status":"400"}`: never KillBill's own error
    /// JSON, which names a `className`.
    fn after_end(&self) -> bool {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct ContainerError {
            message: String,
            #[serde(default)]
            class_name: Option<String>,
        }
        let body = self.body.trim();
        body.is_empty()
            || serde_json::from_str::<ContainerError>(body)
                .is_ok_and(|e| e.class_name.is_none() && e.message == "Bad Request")
    }

    /// The KillBill error code of a JSON error body, when there is one.
    fn code(&self) -> Option<i64> {
        #[derive(Deserialize)]
        struct ErrorBody {
            code: Option<i64>,
        }
        serde_json::from_str::<ErrorBody>(&self.body).ok()?.code
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NewAccount<'a> {
    external_key: &'a str,
    name: &'a str,
    currency: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccountJson {
    account_id: String,
}

#[derive(Serialize)]
struct NewCustomField<'a> {
    name: &'a str,
    value: &'a str,
}

#[derive(Deserialize)]
struct CustomFieldJson {
    name: String,
    value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NewSubscription<'a> {
    account_id: &'a str,
    external_key: &'a str,
    bundle_external_key: &'a str,
    plan_name: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlanChange<'a> {
    plan_name: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionJson {
    subscription_id: String,
    #[serde(default)]
    account_id: Option<String>,
    #[serde(default)]
    plan_name: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    start_date: Option<String>,
    #[serde(default)]
    billing_start_date: Option<String>,
    #[serde(default)]
    cancelled_date: Option<String>,
    #[serde(default)]
    billing_end_date: Option<String>,
    #[serde(default)]
    events: Vec<SubscriptionEventJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionEventJson {
    #[serde(default)]
    effective_date: Option<String>,
    #[serde(default)]
    event_type: Option<String>,
}

impl SubscriptionJson {
    /// A subscription this client has just created, as KillBill holds it.
    fn created(subscription_id: String, start: Timestamp) -> Self {
        Self {
            subscription_id,
            account_id: None,
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
    fn start(&self) -> Option<Timestamp> {
        [&self.start_date, &self.billing_start_date].into_iter().filter_map(|t| t.as_deref().and_then(kb_parse)).max()
    }

    /// When billing ends, if the subscription is cancelled (now or in the future).
    fn end(&self) -> Option<Timestamp> {
        [&self.billing_end_date, &self.cancelled_date].into_iter().filter_map(|t| t.as_deref().and_then(kb_parse)).min()
    }

    /// The earliest date KillBill accepts for a cancellation or a plan change: the previous
    /// transition (`DefaultSubscriptionBaseApiService.validateEffectiveDate`), i.e. the start or
    /// a later plan change.
    fn floor(&self) -> Option<Timestamp> {
        let changes = self.events.iter().filter(|e| {
            matches!(e.event_type.as_deref(), Some("START_ENTITLEMENT" | "START_BILLING" | "CHANGE" | "PHASE"))
        });
        changes.filter_map(|e| e.effective_date.as_deref().and_then(kb_parse)).chain(self.start()).max()
    }
}

#[derive(Deserialize)]
struct BundleJson {
    #[serde(default)]
    subscriptions: Vec<SubscriptionJson>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UsageBody<'a> {
    subscription_id: &'a str,
    tracking_id: &'a str,
    unit_usage_records: Vec<UnitRecords<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UnitRecords<'a> {
    unit_type: &'a str,
    usage_records: Vec<Record>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    record_date: String,
    amount: ExactAmount,
}

/// A decimal written as the JSON number it is, digit for digit (KillBill reads it into a
/// `BigDecimal`; going through `f64` would change amounts like 0.1).
struct ExactAmount(Decimal);

impl Serialize for ExactAmount {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // `Decimal`'s text never has an exponent, so it is a valid JSON number.
        let raw = serde_json::value::RawValue::from_string(self.0.normalize().to_string())
            .map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

/// One usage call's body: the records grouped by unit, in their order.
fn usage_body<'a>(
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
fn kb_parse(text: &str) -> Option<Timestamp> {
    Timestamp::parse(text)
        .ok()
        .or_else(|| (text.len() == 10).then(|| Timestamp::parse(&format!("{text}T00:00:00Z")).ok()).flatten())
}

/// A date as a server of `version` reads it: a date-time (0.24), or the UTC day (0.22, which
/// refuses date-times).
fn kb_date(version: KillBillVersion, t: Timestamp) -> String {
    match version {
        KillBillVersion::V0_24 => kb_time(t),
        KillBillVersion::V0_22 => kb_day(t),
    }
}

/// The UTC day of a time, as KillBill's `LocalDate`s are written.
fn kb_day(t: Timestamp) -> String {
    let t = t.as_offset();
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

/// KillBill writes DateTimes as ISO-8601 UTC with milliseconds; it reads the same.
fn kb_time(t: Timestamp) -> String {
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

impl KillBill {
    /// A client for the configured server.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS roots unavailable).
    pub fn new(settings: KillBillSettings) -> Result<Self, BillingError> {
        let http = crate::outbound::client(
            Duration::from_millis(settings.timeout_ms),
            Duration::from_millis(settings.connect_timeout_ms),
        )
        .pool_max_idle_per_host(settings.pool_max_idle)
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

    fn request(&self, method: Method, path: &str, ctx: Option<Context<'_>>) -> RequestBuilder {
        let url = format!("{}{path}", self.settings.url.trim_end_matches('/'));
        let mut headers = HeaderMap::new();
        let mut put = |name: &'static str, value: &str| {
            if let Ok(value) = value.parse() {
                headers.insert(name, value);
            }
        };
        put("X-Killbill-ApiKey", &self.settings.api_key);
        put("X-Killbill-ApiSecret", self.settings.api_secret.expose());
        put("Accept", "application/json");
        if let Some(ctx) = ctx {
            put("X-Killbill-CreatedBy", &self.settings.created_by);
            // The audit log says which OpenStack event caused each write.
            put("X-Killbill-Reason", &ctx.meta.event_type);
            put("X-Killbill-Comment", &format!("OpenStack notification {}", ctx.meta.message_id));
        }
        self.http
            .request(method, url)
            .basic_auth(&self.settings.username, Some(self.settings.password.expose()))
            .headers(headers)
    }

    async fn send(&self, what: &str, request: RequestBuilder) -> Result<Answer, BillingError> {
        let response: Response =
            request.send().await.map_err(|source| BillingError::Http { what: what.to_owned(), source })?;
        let status = response.status();
        if let Some(location) = crate::outbound::redirect_target(&response) {
            return Err(BillingError::Redirected { what: what.to_owned(), status: status.as_u16(), location });
        }
        let location = response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = crate::outbound::text(response, crate::outbound::MAX_BODY_BYTES)
            .await
            .map_err(|e| BillingError::from_body(what, status.as_u16(), e))?;
        Ok(Answer { status, location, body })
    }

    fn refused(what: &str, answer: &Answer) -> BillingError {
        if answer.status.is_success() {
            return Self::not_the_answer(what, answer);
        }
        BillingError::Status {
            what: what.to_owned(),
            status: answer.status.as_u16(),
            body: answer.body.chars().take(2000).collect(),
        }
    }

    fn parse<T: DeserializeOwned>(what: &str, answer: &Answer) -> Result<T, BillingError> {
        serde_json::from_str(&answer.body).map_err(|e| {
            BillingError::unexpected(what, answer.status.as_u16(), &format!("unreadable answer ({e})"), &answer.body)
        })
    }

    /// A 2xx that is not the one the call promises (a proxy's page, a login form).
    fn not_the_answer(what: &str, answer: &Answer) -> BillingError {
        BillingError::unexpected(what, answer.status.as_u16(), "not the answer KillBill gives this call", &answer.body)
    }

    /// The id at the end of a `Location` header.
    fn created_id(what: &str, answer: &Answer) -> Result<String, BillingError> {
        answer
            .location
            .as_deref()
            .and_then(|l| l.trim_end_matches('/').rsplit('/').next())
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| BillingError::Protocol {
                what: what.to_owned(),
                detail: "201 without a Location header".into(),
            })
    }

    /// Creates the tenant when absent, then uploads `catalog_xml` unless a catalog with its
    /// `effectiveDate` is already there. Safe to repeat.
    ///
    /// # Errors
    /// When KillBill refuses or cannot be reached.
    pub async fn bootstrap(&self, catalog_xml: &str, created_by: &str) -> Result<Bootstrapped, BillingError> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct NewTenant<'a> {
            api_key: &'a str,
            api_secret: &'a str,
        }
        let base = self.settings.url.trim_end_matches('/');
        let auth = |request: RequestBuilder| {
            request
                .basic_auth(&self.settings.username, Some(self.settings.password.expose()))
                .header("X-Killbill-CreatedBy", created_by)
        };
        // Tenant calls take basic auth only: the tenant headers do not exist yet. The tenant is
        // created outright, 409/20000 meaning it exists: a look-up first would not do, since
        // KillBill answers an unknown apiKey with a 500 (its tenant cache finds nothing).
        let what = "create the tenant";
        let body = NewTenant { api_key: &self.settings.api_key, api_secret: self.settings.api_secret.expose() };
        let answer = self.send(what, auth(self.http.post(format!("{base}/1.0/kb/tenants"))).json(&body)).await?;
        let tenant_created = match answer.status {
            StatusCode::CREATED => true,
            StatusCode::CONFLICT if answer.code() == Some(TENANT_ALREADY_EXISTS) => false,
            _ => return Err(Self::refused(what, &answer)),
        };
        let effective = catalog_effective_dates(catalog_xml).into_iter().next().ok_or_else(|| {
            BillingError::Protocol { what: "read the catalog".into(), detail: "no <effectiveDate>".into() }
        })?;
        let what = "read the catalog";
        let answer = self
            .send(what, self.request(Method::GET, "/1.0/kb/catalog/xml", None).header("Accept", "text/xml"))
            .await?;
        // KillBill answers its own rendering of every version (JAXB, `…T00:00:00Z`), not the
        // text that was uploaded: versions are compared as instants.
        if answer.status == StatusCode::OK && catalog_effective_dates(&answer.body).contains(&effective) {
            return Ok(Bootstrapped { tenant_created, catalog_uploaded: false });
        }
        let what = "upload the catalog";
        let request = self
            .request(Method::POST, "/1.0/kb/catalog/xml", None)
            .header("X-Killbill-CreatedBy", created_by)
            .header("Content-Type", "text/xml")
            .body(catalog_xml.to_owned());
        let answer = self.send(what, request).await?;
        match answer.status {
            StatusCode::CREATED => Ok(Bootstrapped { tenant_created, catalog_uploaded: true }),
            // 2080 is also KillBill's answer to a version whose effectiveDate exists (a concurrent
            // bootstrap uploaded it meanwhile); its message does not say which, so look again.
            StatusCode::BAD_REQUEST if answer.code() == Some(CATALOG_INVALID_FOR_TENANT) => {
                let again = self
                    .send(
                        "read the catalog",
                        self.request(Method::GET, "/1.0/kb/catalog/xml", None).header("Accept", "text/xml"),
                    )
                    .await?;
                if again.status == StatusCode::OK && catalog_effective_dates(&again.body).contains(&effective) {
                    Ok(Bootstrapped { tenant_created, catalog_uploaded: false })
                } else {
                    Err(Self::refused(what, &answer))
                }
            }
            _ => Err(Self::refused(what, &answer)),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember_account(&self, project: &ProjectId, id: &str) {
        let mut known = self.known();
        if known.accounts.len() >= KNOWN_MAX {
            known.accounts.clear();
        }
        known.accounts.insert(project.clone(), id.to_owned());
    }

    /// Refuses a subscription spec whose project is not the account that owns the instance.
    async fn check_owner(&self, spec: &SubscriptionSpec, owner_account: &str) -> Result<(), BillingError> {
        if self.account_id(&spec.project).await?.as_deref() == Some(owner_account) {
            return Ok(());
        }
        Err(BillingError::ProjectMismatch {
            instance: spec.instance.clone(),
            owner: format!("KillBill account {owner_account}"),
            claimed: spec.project.clone(),
        })
    }

    fn remember_subscription(&self, instance: &InstanceId, found: &SubscriptionJson) {
        let mut known = self.known();
        if known.subscriptions.len() >= KNOWN_MAX {
            known.subscriptions.clear();
        }
        let entry = KnownSubscription {
            id: found.subscription_id.clone(),
            account_id: found.account_id.clone(),
            start: found.start(),
            end: found.end(),
        };
        known.subscriptions.insert(instance.clone(), entry);
    }

    /// Records an end this client set, on the subscription it remembers.
    fn remember_end(&self, subscription_id: &str, at: Timestamp) {
        let mut known = self.known();
        if let Some(entry) = known.subscriptions.values_mut().find(|k| k.id == subscription_id) {
            entry.end = Some(entry.end.map_or(at, |end| end.min(at)));
        }
    }

    /// The subscription's id and start: remembered, or looked up by key.
    async fn known_subscription(&self, instance: &InstanceId) -> Result<KnownSubscription, BillingError> {
        if let Some(known) = self.known().subscriptions.get(instance) {
            return Ok(known.clone());
        }
        let found = self.existing_subscription(instance).await?;
        self.remember_subscription(instance, &found);
        Ok(KnownSubscription {
            id: found.subscription_id.clone(),
            account_id: found.account_id.clone(),
            start: found.start(),
            end: found.end(),
        })
    }

    async fn account_id(&self, project: &ProjectId) -> Result<Option<String>, BillingError> {
        if let Some(id) = self.known().accounts.get(project) {
            return Ok(Some(id.clone()));
        }
        let what = format!("find account {project}");
        let answer = self
            .send(
                &what,
                self.request(Method::GET, "/1.0/kb/accounts", None).query(&[("externalKey", project.as_str())]),
            )
            .await?;
        match answer.status {
            StatusCode::OK => {
                let id = Self::parse::<AccountJson>(&what, &answer)?.account_id;
                self.remember_account(project, &id);
                Ok(Some(id))
            }
            StatusCode::NOT_FOUND if answer.code() == Some(ACCOUNT_NOT_FOUND_BY_KEY) => Ok(None),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    async fn subscription(&self, instance: &InstanceId) -> Result<Option<SubscriptionJson>, BillingError> {
        let what = format!("find subscription {instance}");
        let answer = self
            .send(
                &what,
                self.request(Method::GET, "/1.0/kb/subscriptions", None).query(&[("externalKey", instance.as_str())]),
            )
            .await?;
        match answer.status {
            StatusCode::OK => Ok(Some(Self::parse(&what, &answer)?)),
            StatusCode::NOT_FOUND if answer.code() == Some(SUBSCRIPTION_NOT_FOUND_BY_KEY) => Ok(None),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    async fn subscription_by_id(&self, id: &str) -> Result<SubscriptionJson, BillingError> {
        let what = format!("read subscription {id}");
        let answer = self.send(&what, self.request(Method::GET, &format!("/1.0/kb/subscriptions/{id}"), None)).await?;
        match answer.status {
            StatusCode::OK => Self::parse(&what, &answer),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    async fn existing_subscription(&self, instance: &InstanceId) -> Result<SubscriptionJson, BillingError> {
        self.subscription(instance).await?.ok_or_else(|| BillingError::NoSubscription(instance.clone()))
    }

    /// Adds custom fields; an identical field already there (400/9000) is success. KillBill
    /// refuses the whole batch when one of its fields exists, so batches of more than one go
    /// through [`KillBill::ensure_fields`].
    async fn add_fields(
        &self,
        object: &str,
        id: &str,
        fields: &[(&str, &str)],
        ctx: Context<'_>,
    ) -> Result<(), BillingError> {
        let fields: Vec<NewCustomField<'_>> = fields
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| NewCustomField { name, value })
            .collect();
        if fields.is_empty() {
            return Ok(());
        }
        let what = format!("add custom fields to {object} {id}");
        let path = format!("/1.0/kb/{object}/{id}/customFields");
        let answer = self.send(&what, self.request(Method::POST, &path, Some(ctx)).json(&fields)).await?;
        match answer.status {
            StatusCode::CREATED => Ok(()),
            StatusCode::BAD_REQUEST if answer.code() == Some(CUSTOM_FIELD_ALREADY_EXISTS) => Ok(()),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    /// Adds the fields the object lacks (by name); true when it added any. A retry after a
    /// failure between a create and its fields finishes the job this way.
    async fn ensure_fields(
        &self,
        object: &str,
        id: &str,
        wanted: &[(&str, &str)],
        ctx: Context<'_>,
    ) -> Result<bool, BillingError> {
        let present = self.fields(object, id).await?;
        let missing: Vec<(&str, &str)> = wanted
            .iter()
            .filter(|(name, value)| !value.is_empty() && !present.iter().any(|f| f.name == *name))
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(false);
        }
        self.add_fields(object, id, &missing, ctx).await?;
        Ok(true)
    }

    async fn fields(&self, object: &str, id: &str) -> Result<Vec<CustomFieldJson>, BillingError> {
        let what = format!("read custom fields of {object} {id}");
        let path = format!("/1.0/kb/{object}/{id}/customFields");
        let answer = self.send(&what, self.request(Method::GET, &path, None)).await?;
        match answer.status {
            StatusCode::OK => Self::parse(&what, &answer),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    /// When the project was deleted, if the account records it.
    async fn closed_at(&self, account_id: &str) -> Result<Option<Timestamp>, BillingError> {
        let fields = self.fields("accounts", account_id).await?;
        Ok(fields.iter().filter(|f| f.name == FIELD_CLOSED_AT).filter_map(|f| Timestamp::parse(&f.value).ok()).min())
    }

    async fn create_account(&self, project: &ProjectId, ctx: Context<'_>) -> Result<(String, Applied), BillingError> {
        let what = format!("create account {project}");
        let body =
            NewAccount { external_key: project.as_str(), name: project.as_str(), currency: &self.settings.currency };
        let answer = self.send(&what, self.request(Method::POST, "/1.0/kb/accounts", Some(ctx)).json(&body)).await?;
        let (id, applied) = match answer.status {
            StatusCode::CREATED => (Self::created_id(&what, &answer)?, Applied::Done),
            StatusCode::CONFLICT if answer.code() == Some(ACCOUNT_ALREADY_EXISTS) => {
                let id = self.account_id(project).await?.ok_or_else(|| BillingError::Protocol {
                    what: what.clone(),
                    detail: "409 account exists, but no account has that key".into(),
                })?;
                (id, Applied::AlreadyDone)
            }
            _ => return Err(Self::refused(&what, &answer)),
        };
        // Also on 409: an earlier attempt may have stopped between the two calls.
        self.add_fields("accounts", &id, &[(FIELD_PROJECT, project.as_str())], ctx).await?;
        self.remember_account(project, &id);
        Ok((id, applied))
    }

    /// Cancels at `at`, or at the subscription's last transition when `at` is earlier (KillBill
    /// refuses earlier dates with 400/1001: a delete dated before its launch by clock skew, a
    /// project deleted before an instance's resize). A cancel that finds the subscription
    /// cancelled (500/1031) is success.
    async fn cancel(
        &self,
        subscription: &SubscriptionJson,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let id = &subscription.subscription_id;
        let mut at = subscription.floor().map_or(at, |floor| at.max(floor));
        let mut reread = false;
        loop {
            let answer = self.send_cancel(id, at, ctx).await?;
            match answer.status {
                StatusCode::NO_CONTENT => {
                    self.remember_end(id, at);
                    return Ok(Applied::Done);
                }
                StatusCode::INTERNAL_SERVER_ERROR if answer.code() == Some(CANCEL_BAD_STATE) => {
                    return Ok(Applied::AlreadyDone)
                }
                // A transition we did not know of (a plan change made meanwhile): read it, once.
                StatusCode::BAD_REQUEST if answer.code() == Some(INVALID_REQUESTED_DATE) && !reread => {
                    reread = true;
                    let fresh = self.subscription_by_id(id).await?;
                    at = fresh.floor().map_or(at, |floor| at.max(floor));
                }
                _ => return Err(Self::refused(&format!("cancel subscription {id}"), &answer)),
            }
        }
    }

    async fn send_cancel(&self, id: &str, at: Timestamp, ctx: Context<'_>) -> Result<Answer, BillingError> {
        let what = format!("cancel subscription {id}");
        let path = format!("/1.0/kb/subscriptions/{id}");
        // A requested date with no policies: the date drives the entitlement, and
        // useRequestedDateForBilling makes billing stop then too (§1.8: policies would make
        // KillBill ignore the date and cancel now).
        let request = self
            .request(Method::DELETE, &path, Some(ctx))
            .query(&[("requestedDate", self.date(at).as_str()), ("useRequestedDateForBilling", "true")]);
        self.send(&what, request).await
    }

    /// What a subscription found by key (a retry, a restart, a lost answer) may still lack: its
    /// custom fields, and its cancellation when its project was deleted. True when anything
    /// was missing.
    /// `fresh`: created by this very call, so it has no fields yet.
    async fn finish_subscription(
        &self,
        spec: &SubscriptionSpec,
        subscription: &SubscriptionJson,
        account_id: &str,
        fresh: bool,
        ctx: Context<'_>,
    ) -> Result<bool, BillingError> {
        let fields = [
            (FIELD_PROJECT, spec.project.as_str()),
            (FIELD_INSTANCE, spec.instance.as_str()),
            (FIELD_FLAVOR, spec.flavor.as_deref().unwrap_or_default()),
            (FIELD_DISPLAY_NAME, spec.display_name.as_deref().unwrap_or_default()),
        ];
        let id = &subscription.subscription_id;
        let mut changed = if fresh {
            self.add_fields("subscriptions", id, &fields, ctx).await?;
            true
        } else {
            self.ensure_fields("subscriptions", id, &fields, ctx).await?
        };
        // A late message for a deleted project: the subscription ends when the project did.
        if subscription.state.as_deref() != Some("CANCELLED") && subscription.end().is_none() {
            if let Some(closed_at) = self.closed_at(account_id).await? {
                changed |= self.cancel(subscription, closed_at, ctx).await? == Applied::Done;
            }
        }
        Ok(changed)
    }

    /// Posts one usage call; the answer decides.
    async fn post_usage(&self, what: &str, body: &UsageBody<'_>, ctx: Context<'_>) -> Result<Answer, BillingError> {
        self.send(what, self.request(Method::POST, "/1.0/kb/usages", Some(ctx)).json(body)).await
    }
}

impl Billing for KillBill {
    async fn ensure_account(&self, project: &ProjectId, ctx: Context<'_>) -> Result<Applied, BillingError> {
        if self.account_id(project).await?.is_some() {
            return Ok(Applied::AlreadyDone);
        }
        Ok(self.create_account(project, ctx).await?.1)
    }

    /// The account stays open: closing it in KillBill tags it AUTO_INVOICING_OFF, and the
    /// usage between its last invoice and the deletion would never be invoiced. Its
    /// subscriptions end at `at`, and `openstack_closed_at` records the deletion; the next
    /// scheduled invoice bills the last partial period. Every step is checked again on a
    /// retry, so a failure halfway is finished by the next attempt.
    async fn close_account(
        &self,
        project: &ProjectId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let (id, mut changed) = match self.account_id(project).await? {
            Some(id) => (id, false),
            None => (self.create_account(project, ctx).await?.0, true),
        };
        let closed_at = self.closed_at(&id).await?;
        // A second deletion message keeps the first deletion's time.
        let at = closed_at.map_or(at, |first| first.min(at));
        let what = format!("list subscriptions of account {project}");
        let answer =
            self.send(&what, self.request(Method::GET, &format!("/1.0/kb/accounts/{id}/bundles"), None)).await?;
        if answer.status != StatusCode::OK {
            return Err(Self::refused(&what, &answer));
        }
        let bundles: Vec<BundleJson> = Self::parse(&what, &answer)?;
        for subscription in bundles.iter().flat_map(|b| &b.subscriptions) {
            if subscription.state.as_deref() != Some("CANCELLED") && subscription.end().is_none() {
                changed |= self.cancel(subscription, at, ctx).await? == Applied::Done;
            }
        }
        if closed_at.is_none() {
            self.add_fields("accounts", &id, &[(FIELD_CLOSED_AT, &kb_time(at))], ctx).await?;
            changed = true;
        }
        Ok(if changed { Applied::Done } else { Applied::AlreadyDone })
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        let known = self.known().subscriptions.get(&spec.instance).map(|k| k.account_id.clone());
        if let Some(owner) = known {
            if let Some(owner) = owner {
                self.check_owner(spec, &owner).await?;
            }
            return Ok(Applied::AlreadyDone);
        }
        if let Some(existing) = self.subscription(&spec.instance).await? {
            let account_id = existing.account_id.clone().unwrap_or_default();
            self.check_owner(spec, &account_id).await?;
            let changed = self.finish_subscription(spec, &existing, &account_id, false, ctx).await?;
            self.remember_subscription(&spec.instance, &existing);
            return Ok(if changed { Applied::Done } else { Applied::AlreadyDone });
        }
        let account_id = match self.account_id(&spec.project).await? {
            Some(id) => id,
            None => self.create_account(&spec.project, ctx).await?.0,
        };
        let what = format!("create subscription {}", spec.instance);
        let body = NewSubscription {
            account_id: &account_id,
            external_key: spec.instance.as_str(),
            bundle_external_key: spec.instance.as_str(),
            plan_name: spec.plan.as_str(),
        };
        let start = self.date(spec.start);
        let request = self
            .request(Method::POST, "/1.0/kb/subscriptions", Some(ctx))
            .query(&[("entitlementDate", start.as_str()), ("billingDate", start.as_str())])
            .json(&body);
        let answer = self.send(&what, request).await?;
        let mut created = match answer.status {
            // Just created: what KillBill holds is what was sent, so nothing is read back.
            StatusCode::CREATED => SubscriptionJson::created(Self::created_id(&what, &answer)?, spec.start),
            // The bundle exists: an earlier attempt created it (its answer lost, or still
            // committing when the retry looked). Found again by key, it is finished below.
            StatusCode::BAD_REQUEST if matches!(answer.code(), Some(BUNDLE_KEY_EXISTS | BUNDLE_HAS_BASE)) => {
                self.existing_subscription(&spec.instance).await?
            }
            s if s.is_server_error() => match self.subscription(&spec.instance).await? {
                Some(found) => found,
                None => return Err(Self::refused(&what, &answer)),
            },
            _ => return Err(Self::refused(&what, &answer)),
        };
        created.account_id.get_or_insert_with(|| account_id.clone());
        let fresh = answer.status == StatusCode::CREATED;
        self.finish_subscription(spec, &created, &account_id, fresh, ctx).await?;
        // Remembered only now: a retry after a failure above must run those steps again.
        self.remember_subscription(&spec.instance, &created);
        Ok(Applied::Done)
    }

    async fn change_plan(
        &self,
        instance: &InstanceId,
        plan: &PlanName,
        effective: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let subscription = self.existing_subscription(instance).await?;
        if subscription.plan_name.as_deref() == Some(plan.as_str())
            || subscription.state.as_deref() == Some("CANCELLED")
        {
            return Ok(Applied::AlreadyDone);
        }
        let what = format!("change plan of {instance} to {plan}");
        let path = format!("/1.0/kb/subscriptions/{}", subscription.subscription_id);
        // The date alone: KillBill refuses a date together with a billing policy (400), and a
        // policy alone would ignore the date. It may not precede the last transition.
        let at = subscription.floor().map_or(effective, |floor| effective.max(floor));
        let request = self
            .request(Method::PUT, &path, Some(ctx))
            .query(&[("requestedDate", self.date(at).as_str())])
            .json(&PlanChange { plan_name: plan.as_str() });
        let answer = self.send(&what, request).await?;
        match answer.status {
            StatusCode::NO_CONTENT => Ok(Applied::Done),
            // Cancelled meanwhile: a cancelled subscription keeps its plan.
            StatusCode::INTERNAL_SERVER_ERROR if answer.code() == Some(CHANGE_NON_ACTIVE) => Ok(Applied::AlreadyDone),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    async fn cancel_subscription(
        &self,
        instance: &InstanceId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let subscription = self.existing_subscription(instance).await?;
        if subscription.state.as_deref() == Some("CANCELLED") {
            return Ok(Applied::AlreadyDone);
        }
        self.cancel(&subscription, at, ctx).await
    }

    async fn record_usage(&self, usage: &UsageSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        let subscription = self.known_subscription(&usage.instance).await?;
        // KillBill stores a record dated before the subscription's start and never invoices
        // it; dated at the start, it is invoiced. (Only samples taken before `launched_at`
        // are moved, which the plan's start makes rare.)
        let records: Vec<(Unit, Timestamp, Decimal)> = usage
            .records
            .iter()
            .filter(|r| subscription.end.is_none_or(|end| r.date <= end))
            .map(|r| (r.unit.clone(), subscription.start.map_or(r.date, |start| r.date.max(start)), r.amount))
            .collect();
        if records.is_empty() {
            return Ok(Applied::Late);
        }
        let what = format!("record usage {} on {}", usage.tracking_id, usage.instance);
        if self.settings.server_version == KillBillVersion::V0_22 {
            if let Some((unit, _, amount)) = records.iter().find(|(_, _, amount)| !amount.fract().is_zero()) {
                return Err(BillingError::Protocol {
                    what: what.clone(),
                    detail: format!(
                        "KillBill 0.22 stores usage amounts as whole numbers and would truncate {amount} {unit}: \
                         bill this meter in a smaller unit (a factor that makes its amounts whole)"
                    ),
                });
            }
        }
        let body = usage_body(&subscription.id, &usage.tracking_id, &records, self.settings.server_version);
        let answer = self.post_usage(&what, &body, ctx).await?;
        match answer.status {
            // KillBill records usage with a 201 and nothing else: any other 2xx is someone else's.
            StatusCode::CREATED => Ok(Applied::Done),
            s if s.is_success() => Err(Self::not_the_answer(&what, &answer)),
            StatusCode::BAD_REQUEST if answer.code() == Some(TRACKING_ID_ALREADY_EXISTS) => Ok(Applied::AlreadyDone),
            // A record dated after the subscription's end refuses the whole call. The records up
            // to the end are posted again alone, under the same trackingId (nothing of the
            // refused call was stored).
            StatusCode::BAD_REQUEST if answer.after_end() => {
                // Only a subscription with an end refuses records after it: a bare 400 for one
                // without is an intermediary's, and nothing is taken as late.
                let Some(end) = self.subscription_by_id(&subscription.id).await?.end() else {
                    return Err(Self::not_the_answer(&what, &answer));
                };
                let within: Vec<(Unit, Timestamp, Decimal)> =
                    records.into_iter().filter(|(_, date, _)| self.within(*date, end)).collect();
                if within.is_empty() {
                    return Ok(Applied::Late);
                }
                let body = usage_body(&subscription.id, &usage.tracking_id, &within, self.settings.server_version);
                let answer = self.post_usage(&what, &body, ctx).await?;
                match answer.status {
                    StatusCode::CREATED => Ok(Applied::Done),
                    s if s.is_success() => Err(Self::not_the_answer(&what, &answer)),
                    StatusCode::BAD_REQUEST if answer.code() == Some(TRACKING_ID_ALREADY_EXISTS) => {
                        Ok(Applied::AlreadyDone)
                    }
                    StatusCode::BAD_REQUEST if answer.after_end() => Ok(Applied::Late),
                    _ => Err(Self::refused(&what, &answer)),
                }
            }
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    async fn account_ref(&self, project: &ProjectId) -> Result<Option<String>, BillingError> {
        self.account_id(project).await
    }

    /// Credits as `reference/original-service.md` §1.4 computes them: the account's credit
    /// balance (`accountCBA`) minus the upcoming invoice's amount when that is not negative.
    async fn account_figures(
        &self,
        project: &ProjectId,
        today: time::Date,
    ) -> Result<Option<AccountFigures>, BillingError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Balance {
            account_id: String,
            #[serde(default)]
            account_cba: Option<serde_json::Number>,
        }
        #[derive(Deserialize)]
        struct Invoice {
            #[serde(default)]
            amount: Option<serde_json::Number>,
        }
        let decimal = |what: &str, n: Option<serde_json::Number>| -> Result<Decimal, BillingError> {
            n.map_or(Ok(Decimal::ZERO), |n| {
                let text = n.to_string();
                text.parse::<Decimal>().or_else(|_| Decimal::from_scientific(&text)).map_err(|_| {
                    BillingError::Protocol { what: what.to_owned(), detail: format!("amount {text} is not a decimal") }
                })
            })
        };
        let what = format!("read the balance of account {project}");
        let request = self
            .request(Method::GET, "/1.0/kb/accounts", None)
            .query(&[("externalKey", project.as_str()), ("accountWithBalanceAndCBA", "true")]);
        let answer = self.send(&what, request).await?;
        let balance: Balance = match answer.status {
            StatusCode::OK => Self::parse(&what, &answer)?,
            StatusCode::NOT_FOUND if answer.code() == Some(ACCOUNT_NOT_FOUND_BY_KEY) => return Ok(None),
            _ => return Err(Self::refused(&what, &answer)),
        };
        let cba = decimal(&what, balance.account_cba)?;
        let (period_start, period_end) = month_of(today);
        let what = format!("dry-run the upcoming invoice of account {project}");
        let target = format!("{:04}-{:02}-{:02}", period_end.year(), u8::from(period_end.month()), period_end.day());
        let request = self
            .request(Method::POST, "/1.0/kb/invoices/dryRun", None)
            .header("X-Killbill-CreatedBy", &self.settings.created_by)
            .query(&[("accountId", balance.account_id.as_str()), ("targetDate", target.as_str())])
            .json(&serde_json::json!({"dryRunType": "UPCOMING_INVOICE"}));
        let answer = self.send(&what, request).await?;
        let upcoming = match answer.status {
            StatusCode::OK => decimal(&what, Self::parse::<Invoice>(&what, &answer)?.amount)?,
            // Nothing to invoice.
            StatusCode::NO_CONTENT => Decimal::ZERO,
            _ => return Err(Self::refused(&what, &answer)),
        };
        let cost = upcoming.max(Decimal::ZERO);
        Ok(Some(AccountFigures { account_id: balance.account_id, cost, credits: cba - cost, period_start, period_end }))
    }
}

/// Every `<effectiveDate>` of a catalog document (uploaded form or KillBill's rendering of its
/// versions), as instants.
pub fn catalog_effective_dates(xml: &str) -> Vec<Timestamp> {
    xml.split("<effectiveDate>")
        .skip(1)
        .filter_map(|rest| rest.split("</effectiveDate>").next())
        .filter_map(|text| Timestamp::parse(text.trim()).ok())
        .collect()
}

/// The units and plans named in `wanted` that the catalog does not declare: usage in an
/// unknown unit, or a subscription on an unknown plan, is accepted by KillBill and then never
/// invoiced (units) or refused (plans), so `bootstrap` refuses such a catalog.
pub fn catalog_gaps<'a>(
    xml: &str,
    units: impl IntoIterator<Item = &'a str>,
    plans: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let declared = |tag: &str, name: &str| {
        xml.contains(&format!("<{tag} name=\"{name}\"/>"))
            || xml.contains(&format!("<{tag} name=\"{name}\">"))
            || xml.contains(&format!("<{tag} name=\"{name}\" "))
    };
    let mut gaps: Vec<String> = Vec::new();
    for unit in units {
        if !declared("unit", unit) && !gaps.iter().any(|g| g.ends_with(&format!(" {unit}"))) {
            gaps.push(format!("unit {unit}"));
        }
    }
    for plan in plans {
        if !declared("plan", plan) && !gaps.iter().any(|g| g == &format!("plan {plan}")) {
            gaps.push(format!("plan {plan}"));
        }
    }
    gaps
}

/// The first and last day of `day`'s calendar month: the billing period Concertim shows (as the
/// Python service computed it), and the dry run's target date.
pub fn month_of(day: time::Date) -> (time::Date, time::Date) {
    let start = day.replace_day(1).unwrap_or(day);
    let end = day.replace_day(day.month().length(day.year())).unwrap_or(day);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let units: Vec<&str> = settings.billing.meters.values().map(|m| m.unit.as_str()).collect();
        let plans: Vec<&str> = std::iter::once(settings.billing.default_plan.as_str())
            .chain(settings.billing.plans.values().map(PlanName::as_str))
            .collect();
        assert_eq!(catalog_gaps(CATALOG_XML, units.iter().copied(), plans.iter().copied()), Vec::<String>::new());
        let gaps = catalog_gaps(CATALOG_XML, ["openstack-volume-gib-seconds"], ["openstack-nothing"]);
        assert_eq!(gaps, vec!["unit openstack-volume-gib-seconds".to_owned(), "plan openstack-nothing".to_owned()]);
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
