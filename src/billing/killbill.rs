//! The KillBill backend (KillBill 0.24 REST API, as `reference/billing-apis.md` §1 describes the
//! server's real behaviour).
//!
//! Objects are found by key, never by scanning: accounts by `externalKey` = project id,
//! subscriptions by `externalKey` = instance uuid. "Already exists" answers are success:
//! 409/3000 for an account, 400/9000 for a custom field, 400/50000 for a usage trackingId,
//! 500/1031 for a second cancel. Connect errors, timeouts, 5xx and 429 are transient; other
//! 4xx are permanent, with the status and body kept for the dead-letter reason.

use std::time::Duration;

use reqwest::{header::HeaderMap, Method, RequestBuilder, Response, StatusCode};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use rust_decimal::Decimal;

use super::{AccountFigures, Applied, Billing, BillingError, Context};
use crate::{
    config::KillBillSettings,
    event::{InstanceId, PlanName, ProjectId, Timestamp},
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
    subscriptions: std::collections::HashMap<InstanceId, String>,
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
    plan_name: Option<String>,
    #[serde(default)]
    state: Option<String>,
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
    amount: f64,
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
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .pool_max_idle_per_host(settings.pool_max_idle)
            .build()
            .map_err(|source| BillingError::Http { what: "building the HTTP client".into(), source })?;
        Ok(Self { http, settings, known: std::sync::Mutex::new(Known::default()) })
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
        let location = response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = response.text().await.map_err(|source| BillingError::Http { what: what.to_owned(), source })?;
        Ok(Answer { status, location, body })
    }

    fn refused(what: &str, answer: &Answer) -> BillingError {
        BillingError::Status {
            what: what.to_owned(),
            status: answer.status.as_u16(),
            body: answer.body.chars().take(2000).collect(),
        }
    }

    fn parse<T: DeserializeOwned>(what: &str, answer: &Answer) -> Result<T, BillingError> {
        serde_json::from_str(&answer.body).map_err(|e| BillingError::Protocol {
            what: what.to_owned(),
            detail: format!("unreadable answer ({e}): {}", answer.body.chars().take(300).collect::<String>()),
        })
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
        // Tenant calls take basic auth only: the tenant headers do not exist yet.
        let what = "find the tenant";
        let answer = self
            .send(
                what,
                auth(self.http.get(format!("{base}/1.0/kb/tenants")))
                    .query(&[("apiKey", self.settings.api_key.as_str())]),
            )
            .await?;
        let tenant_created = match answer.status {
            StatusCode::OK => false,
            StatusCode::NOT_FOUND => {
                let what = "create the tenant";
                let body = NewTenant { api_key: &self.settings.api_key, api_secret: self.settings.api_secret.expose() };
                let answer =
                    self.send(what, auth(self.http.post(format!("{base}/1.0/kb/tenants"))).json(&body)).await?;
                match answer.status {
                    StatusCode::CREATED => true,
                    StatusCode::CONFLICT if answer.code() == Some(TENANT_ALREADY_EXISTS) => false,
                    _ => return Err(Self::refused(what, &answer)),
                }
            }
            _ => return Err(Self::refused(what, &answer)),
        };
        let effective = catalog_xml
            .split("<effectiveDate>")
            .nth(1)
            .and_then(|rest| rest.split("</effectiveDate>").next())
            .ok_or_else(|| BillingError::Protocol {
                what: "read the catalog".into(),
                detail: "no <effectiveDate>".into(),
            })?;
        let what = "read the catalog";
        let answer = self
            .send(what, self.request(Method::GET, "/1.0/kb/catalog/xml", None).header("Accept", "text/xml"))
            .await?;
        if answer.status == StatusCode::OK
            && answer.body.contains(&format!("<effectiveDate>{effective}</effectiveDate>"))
        {
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

    fn remember_subscription(&self, instance: &InstanceId, id: &str) {
        let mut known = self.known();
        if known.subscriptions.len() >= KNOWN_MAX {
            known.subscriptions.clear();
        }
        known.subscriptions.insert(instance.clone(), id.to_owned());
    }

    /// The subscription's id: remembered, or looked up by key.
    async fn subscription_id(&self, instance: &InstanceId) -> Result<String, BillingError> {
        if let Some(id) = self.known().subscriptions.get(instance) {
            return Ok(id.clone());
        }
        let id = self.existing_subscription(instance).await?.subscription_id;
        self.remember_subscription(instance, &id);
        Ok(id)
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

    async fn existing_subscription(&self, instance: &InstanceId) -> Result<SubscriptionJson, BillingError> {
        self.subscription(instance).await?.ok_or_else(|| BillingError::NoSubscription(instance.clone()))
    }

    /// Adds custom fields; an identical field already there (400/9000) is success.
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

    async fn cancel(&self, subscription_id: &str, at: Timestamp, ctx: Context<'_>) -> Result<Applied, BillingError> {
        let what = format!("cancel subscription {subscription_id}");
        let path = format!("/1.0/kb/subscriptions/{subscription_id}");
        // A requested date with no policies: the date drives the entitlement, and
        // useRequestedDateForBilling makes billing stop then too (§1.8: policies would make
        // KillBill ignore the date and cancel now).
        let request = self
            .request(Method::DELETE, &path, Some(ctx))
            .query(&[("requestedDate", kb_time(at).as_str()), ("useRequestedDateForBilling", "true")]);
        let answer = self.send(&what, request).await?;
        match answer.status {
            StatusCode::NO_CONTENT => Ok(Applied::Done),
            StatusCode::INTERNAL_SERVER_ERROR if answer.code() == Some(CANCEL_BAD_STATE) => Ok(Applied::AlreadyDone),
            _ => Err(Self::refused(&what, &answer)),
        }
    }
}

impl Billing for KillBill {
    async fn ensure_account(&self, project: &ProjectId, ctx: Context<'_>) -> Result<Applied, BillingError> {
        if self.account_id(project).await?.is_some() {
            return Ok(Applied::AlreadyDone);
        }
        Ok(self.create_account(project, ctx).await?.1)
    }

    async fn close_account(
        &self,
        project: &ProjectId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let id = match self.account_id(project).await? {
            Some(id) => id,
            None => self.create_account(project, ctx).await?.0,
        };
        if self.closed_at(&id).await?.is_some() {
            return Ok(Applied::AlreadyDone);
        }
        let what = format!("list subscriptions of account {project}");
        let answer =
            self.send(&what, self.request(Method::GET, &format!("/1.0/kb/accounts/{id}/bundles"), None)).await?;
        if answer.status != StatusCode::OK {
            return Err(Self::refused(&what, &answer));
        }
        let bundles: Vec<BundleJson> = Self::parse(&what, &answer)?;
        for subscription in bundles.iter().flat_map(|b| &b.subscriptions) {
            if subscription.state.as_deref() != Some("CANCELLED") {
                self.cancel(&subscription.subscription_id, at, ctx).await?;
            }
        }
        // Recorded before closing, so a retry after a crash between the two still closes.
        self.add_fields("accounts", &id, &[(FIELD_CLOSED_AT, &kb_time(at))], ctx).await?;
        let what = format!("close account {project}");
        let answer =
            self.send(&what, self.request(Method::DELETE, &format!("/1.0/kb/accounts/{id}"), Some(ctx))).await?;
        match answer.status {
            StatusCode::NO_CONTENT => Ok(Applied::Done),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        if self.known().subscriptions.contains_key(&spec.instance) {
            return Ok(Applied::AlreadyDone);
        }
        if let Some(existing) = self.subscription(&spec.instance).await? {
            self.remember_subscription(&spec.instance, &existing.subscription_id);
            return Ok(Applied::AlreadyDone);
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
        let start = kb_time(spec.start);
        let request = self
            .request(Method::POST, "/1.0/kb/subscriptions", Some(ctx))
            .query(&[("entitlementDate", start.as_str()), ("billingDate", start.as_str())])
            .json(&body);
        let answer = self.send(&what, request).await?;
        if answer.status != StatusCode::CREATED {
            return Err(Self::refused(&what, &answer));
        }
        let id = Self::created_id(&what, &answer)?;
        let fields = [
            (FIELD_PROJECT, spec.project.as_str()),
            (FIELD_INSTANCE, spec.instance.as_str()),
            (FIELD_FLAVOR, spec.flavor.as_deref().unwrap_or_default()),
            (FIELD_DISPLAY_NAME, spec.display_name.as_deref().unwrap_or_default()),
        ];
        self.add_fields("subscriptions", &id, &fields, ctx).await?;
        // A late message for a deleted project: the subscription ends when the project did.
        if let Some(closed_at) = self.closed_at(&account_id).await? {
            self.cancel(&id, closed_at.max(spec.start), ctx).await?;
        }
        // Remembered only now: a retry after a failure above must run those steps again.
        self.remember_subscription(&spec.instance, &id);
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
        let request = self
            .request(Method::PUT, &path, Some(ctx))
            .query(&[("requestedDate", kb_time(effective).as_str()), ("billingPolicy", "IMMEDIATE")])
            .json(&PlanChange { plan_name: plan.as_str() });
        let answer = self.send(&what, request).await?;
        match answer.status {
            StatusCode::NO_CONTENT => Ok(Applied::Done),
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
        self.cancel(&subscription.subscription_id, at, ctx).await
    }

    async fn record_usage(&self, usage: &UsageSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        let subscription_id = self.subscription_id(&usage.instance).await?;
        let mut units: Vec<UnitRecords<'_>> = Vec::new();
        for record in &usage.records {
            let entry = Record {
                record_date: kb_time(record.date),
                amount: rust_decimal::prelude::ToPrimitive::to_f64(&record.amount).unwrap_or_default(),
            };
            match units.iter_mut().find(|u| u.unit_type == record.unit.as_str()) {
                Some(unit) => unit.usage_records.push(entry),
                None => units.push(UnitRecords { unit_type: record.unit.as_str(), usage_records: vec![entry] }),
            }
        }
        let what = format!("record usage {} on {}", usage.tracking_id, usage.instance);
        let body =
            UsageBody { subscription_id: &subscription_id, tracking_id: &usage.tracking_id, unit_usage_records: units };
        let answer = self.send(&what, self.request(Method::POST, "/1.0/kb/usages", Some(ctx)).json(&body)).await?;
        match answer.status {
            s if s.is_success() => Ok(Applied::Done),
            StatusCode::BAD_REQUEST if answer.code() == Some(TRACKING_ID_ALREADY_EXISTS) => Ok(Applied::AlreadyDone),
            // The only empty-bodied 400 of this call: records dated after the subscription's end.
            StatusCode::BAD_REQUEST if answer.body.trim().is_empty() => Ok(Applied::Late),
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
    fn times_go_out_as_utc_with_milliseconds() {
        let t = Timestamp::parse("2025-03-03 09:00:41.123456").unwrap();
        assert_eq!(kb_time(t), "2025-03-03T09:00:41.123Z");
    }
}
