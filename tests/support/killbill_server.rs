//! The KillBill the contract tests run against: the real server when
//! `CONCERTIM_BILLING_KILLBILL_URL` names one (`deploy/dev/test.sh` starts it), each test on a
//! tenant of its own; the fake of `killbill/` otherwise, for fast local runs. With
//! `CONCERTIM_BILLING_REQUIRE_KILLBILL` set (as `.ci/run` does) a missing URL fails the test.
//!
//! Both are read back the same way, through [`KillBillServer::snapshot`]: what KillBill would
//! bill, in the ledger's terms. For the real server that is read through its REST API (accounts
//! of the tenant, their bundles, custom fields, and each subscription's rolled-up usage).

use std::collections::BTreeMap;

use concertim_billing::{
    billing::{
        killbill::CATALOG_XML,
        ledger::{AccountRow, Snapshot, SubscriptionRow, UsageRow},
        KillBill,
    },
    config::{KillBillSettings, Secret},
    event::{InstanceId, PlanName, ProjectId, ResourceKind, Timestamp, Unit},
};
use rust_decimal::Decimal;
use serde_json::Value;

use super::killbill::FakeKillBill;

/// The environment variable naming the real server's base URL.
pub const URL_VAR: &str = "CONCERTIM_BILLING_KILLBILL_URL";
/// Set where the real server is required (CI): its absence is then a failure, never a skip.
pub const REQUIRE_VAR: &str = "CONCERTIM_BILLING_REQUIRE_KILLBILL";

/// The real server's URL, when one is configured.
pub fn real_url() -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os(REQUIRE_VAR).is_none(),
                "{REQUIRE_VAR} is set but {URL_VAR} is not: start KillBill with deploy/dev/killbill.sh start"
            );
            None
        }
    }
}

/// A tenant of its own on the real server, bootstrapped with the bundled catalog.
#[derive(Clone)]
pub struct RealKillBill {
    settings: KillBillSettings,
    http: reqwest::Client,
}

/// A server for one test.
pub enum KillBillServer {
    /// The in-process fake.
    Fake(FakeKillBill),
    /// The real KillBill, on a fresh tenant.
    Real(RealKillBill),
}

impl KillBillServer {
    /// The real server (a fresh tenant) when configured, else a fake as bootstrap leaves it.
    pub async fn start() -> Self {
        match real_url() {
            Some(url) => Self::Real(RealKillBill::start(&url).await),
            None => Self::Fake(FakeKillBill::start().await),
        }
    }

    /// Settings for the backend to talk to this server.
    pub fn settings(&self) -> KillBillSettings {
        match self {
            Self::Fake(fake) => fake.settings(),
            Self::Real(real) => real.settings.clone(),
        }
    }

    /// A client on this server.
    pub fn client(&self) -> KillBill {
        KillBill::new(self.settings()).unwrap()
    }

    /// True for the real server.
    pub fn is_real(&self) -> bool {
        matches!(self, Self::Real(_))
    }

    /// What KillBill would bill, in the ledger's terms.
    pub async fn snapshot(&self) -> Snapshot {
        match self {
            Self::Fake(fake) => fake.snapshot(),
            Self::Real(real) => real.snapshot().await,
        }
    }

    /// Custom fields of the subscription with this key, as (name, value).
    pub async fn subscription_fields(&self, key: &str) -> Vec<(String, String)> {
        match self {
            Self::Fake(fake) => fake.fields_of(&fake.subscription_id(key).expect("the subscription exists")),
            Self::Real(real) => {
                let sub = real.get(&format!("/1.0/kb/subscriptions?externalKey={key}")).await;
                real.fields("subscriptions", sub["subscriptionId"].as_str().unwrap()).await
            }
        }
    }

    /// Removes every custom field of the subscription with this key (as if the call that adds
    /// them had never been made).
    pub async fn delete_subscription_fields(&self, key: &str) {
        match self {
            Self::Fake(fake) => fake.delete_fields(&fake.subscription_id(key).expect("the subscription exists")),
            Self::Real(real) => {
                let sub = real.get(&format!("/1.0/kb/subscriptions?externalKey={key}")).await;
                let id = sub["subscriptionId"].as_str().unwrap().to_owned();
                let fields = real.get(&format!("/1.0/kb/subscriptions/{id}/customFields")).await;
                let ids: Vec<&str> =
                    fields.as_array().unwrap().iter().map(|f| f["customFieldId"].as_str().unwrap()).collect();
                let path = format!("/1.0/kb/subscriptions/{id}/customFields?customField={}", ids.join("&customField="));
                let (status, body) = real.call(reqwest::Method::DELETE, &path, None).await;
                assert_eq!(status, 204, "{body}");
            }
        }
    }

    /// The subscription's rolled-up usage of every unit, from `day` on.
    pub async fn usage_since(&self, key: &str, day: &str) -> Decimal {
        match self {
            Self::Fake(fake) => fake.usage_since(key, day),
            Self::Real(real) => {
                let sub = real.get(&format!("/1.0/kb/subscriptions?externalKey={key}")).await;
                let id = sub["subscriptionId"].as_str().unwrap();
                let usage = real.get(&format!("/1.0/kb/usages/{id}?startDate={day}&endDate=2100-01-01")).await;
                usage["rolledUpUnits"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|u| u["amount"].to_string().parse::<Decimal>().unwrap())
                    .sum()
            }
        }
    }

    /// The project's upcoming invoice as the service asks for it (`POST /1.0/kb/invoices/dryRun`,
    /// `UPCOMING_INVOICE`, the last day of `today`'s month as target date): its amount (zero for
    /// a 204), and the amount of its subscription items (USAGE, RECURRING, FIXED) by the
    /// subscription's external key, read from the account's bundles. `None` without an account.
    pub async fn upcoming_invoice(
        &self,
        project: &str,
        today: time::Date,
    ) -> Option<(Decimal, BTreeMap<String, Decimal>)> {
        let settings = self.settings();
        let http = reqwest::Client::new();
        let get = |path: String| {
            let request = authed(&http, &settings, reqwest::Method::GET, &path);
            async move {
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                (status, response.text().await.unwrap())
            }
        };
        let (status, body) = get(format!("/1.0/kb/accounts?externalKey={project}")).await;
        if status == 404 {
            return None;
        }
        let account: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("account {status}: {e}: {body}"));
        let id = account["accountId"].as_str().unwrap().to_owned();
        let last = today.replace_day(today.month().length(today.year())).unwrap();
        let path = format!("/1.0/kb/invoices/dryRun?accountId={id}&targetDate={last}");
        let response = authed(&http, &settings, reqwest::Method::POST, &path)
            .json(&serde_json::json!({"dryRunType": "UPCOMING_INVOICE"}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        if status == 204 {
            return Some((Decimal::ZERO, BTreeMap::new()));
        }
        assert_eq!(status, 200, "dry run: {text}");
        let invoice: Value = serde_json::from_str(&text).unwrap();
        let (_, bundles) = get(format!("/1.0/kb/accounts/{id}/bundles")).await;
        let bundles: Value = serde_json::from_str(&bundles).unwrap();
        let keys: BTreeMap<&str, &str> = bundles
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|b| b["subscriptions"].as_array().unwrap())
            .map(|x| (x["subscriptionId"].as_str().unwrap(), x["externalKey"].as_str().unwrap()))
            .collect();
        let amount = |v: &Value| v.to_string().parse::<Decimal>().unwrap();
        let mut by_key: BTreeMap<String, Decimal> = BTreeMap::new();
        for item in invoice["items"].as_array().unwrap() {
            let charges = matches!(item["itemType"].as_str(), Some("USAGE" | "RECURRING" | "FIXED"));
            if let (true, Some(key)) = (charges, item["subscriptionId"].as_str().and_then(|s| keys.get(s))) {
                *by_key.entry((*key).to_owned()).or_default() += amount(&item["amount"]);
            }
        }
        Some((amount(&invoice["amount"]), by_key))
    }

    /// Any request to this server (real or fake) as a tenant's client sends it: status and body.
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, String) {
        let mut request = authed(&reqwest::Client::new(), &self.settings(), method, path);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// A GET answered 200 with JSON.
    async fn read(&self, path: &str) -> Value {
        let (status, text) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    /// Makes an account as the Python service did (`reference/original-service.md` §1.2): no
    /// externalKey (KillBill keys it by its own id), then the custom field `field` holding the
    /// project id. Its id.
    pub async fn python_account(&self, project: &str, field: &str) -> String {
        let body = serde_json::json!({"name": format!("team of {project}"), "email": null, "billCycleDayLocal": 31, "currency": "USD"});
        let response = authed(&reqwest::Client::new(), &self.settings(), reqwest::Method::POST, "/1.0/kb/accounts")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 201, "{:?}", response.text().await);
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let id = location.rsplit('/').next().unwrap().to_owned();
        let fields = serde_json::json!([{"name": field, "value": project}]);
        let (status, text) =
            self.call(reqwest::Method::POST, &format!("/1.0/kb/accounts/{id}/customFields"), Some(&fields)).await;
        assert_eq!(status, 201, "{text}");
        id
    }

    /// The id of the account whose externalKey is `key`, if there is one.
    pub async fn account_keyed(&self, key: &str) -> Option<String> {
        let (status, text) =
            self.call(reqwest::Method::GET, &format!("/1.0/kb/accounts?externalKey={key}"), None).await;
        match status {
            404 => None,
            200 => Some(serde_json::from_str::<Value>(&text).unwrap()["accountId"].as_str().unwrap().to_owned()),
            _ => panic!("account by key {key}: {status} {text}"),
        }
    }

    /// The ids of the accounts that carry a custom field whose value is `value` (KillBill's
    /// custom-field search, every hit in one page).
    pub async fn accounts_carrying(&self, value: &str) -> std::collections::BTreeSet<String> {
        let hits = self.read(&format!("/1.0/kb/customFields/search/{value}?offset=0&limit=10000")).await;
        hits.as_array()
            .unwrap()
            .iter()
            .filter(|f| f["objectType"] == "ACCOUNT" && f["value"] == value)
            .map(|f| f["objectId"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The custom fields of the account with this id, as (name, value).
    pub async fn account_fields(&self, id: &str) -> Vec<(String, String)> {
        name_values(&self.read(&format!("/1.0/kb/accounts/{id}/customFields")).await)
    }

    /// The account id of the subscription with this key.
    pub async fn subscription_account(&self, key: &str) -> String {
        let sub = self.read(&format!("/1.0/kb/subscriptions?externalKey={key}")).await;
        sub["accountId"].as_str().unwrap().to_owned()
    }

    /// Bodies the fake's OpenAPI check rejected (the real server has its own checks, and
    /// answers them).
    pub fn violations(&self) -> Vec<String> {
        match self {
            Self::Fake(fake) => fake.violations(),
            Self::Real(_) => Vec::new(),
        }
    }
}

impl RealKillBill {
    /// A new tenant on the server at `url`, with the bundled catalog uploaded by the client's
    /// own `bootstrap`.
    pub async fn start(url: &str) -> Self {
        let settings = Self::settings_for(url);
        let client = KillBill::new(settings.clone()).unwrap();
        let done = client.bootstrap(CATALOG_XML, "concertim-billing-tests").await.unwrap_or_else(|e| {
            panic!("cannot bootstrap a tenant on the KillBill at {url} (is it running? deploy/dev/killbill.sh status): {e}")
        });
        assert!(done.tenant_created && done.catalog_uploaded, "{done:?}");
        Self { settings, http: reqwest::Client::new() }
    }

    /// Settings for a new tenant (not created yet) on the server at `url`.
    pub fn settings_for(url: &str) -> KillBillSettings {
        let tenant = unique("t");
        KillBillSettings {
            url: url.trim_end_matches('/').to_owned(),
            username: "admin".into(),
            password: Secret::new("password"),
            api_key: tenant.clone(),
            api_secret: Secret::new(format!("{tenant}-secret")),
            created_by: "concertim-billing-tests".into(),
            currency: "USD".into(),
            ca_file: None,
            // The real server on two loaded cores answers some first calls slowly.
            timeout_ms: 60_000,
            connect_timeout_ms: 2_000,
            pool_max_idle: 4,
            // The server deploy/dev/killbill.sh runs (Maven Central serves no 0.24 war).
            server_version: concertim_billing::config::KillBillVersion::V0_22,
        }
    }

    /// The tenant's settings.
    pub fn settings(&self) -> KillBillSettings {
        self.settings.clone()
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        authed(&self.http, &self.settings, method, path)
    }

    /// A GET answered 200 with JSON.
    pub async fn get(&self, path: &str) -> Value {
        let response = self.request(reqwest::Method::GET, path).send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    /// Any request: status and body.
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, String) {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn fields(&self, object: &str, id: &str) -> Vec<(String, String)> {
        name_values(&self.get(&format!("/1.0/kb/{object}/{id}/customFields")).await)
    }

    /// Every account of the tenant with its subscriptions and usage, in the ledger's terms.
    pub async fn snapshot(&self) -> Snapshot {
        let accounts = self.get("/1.0/kb/accounts/pagination?offset=0&limit=10000").await;
        let mut snapshot =
            Snapshot { accounts: Vec::new(), subscriptions: Vec::new(), usage: Vec::new(), late_records: 0 };
        for account in accounts.as_array().unwrap() {
            let id = account["accountId"].as_str().unwrap();
            let project = ProjectId::parse(account["externalKey"].as_str().unwrap()).unwrap();
            let closed = self.fields("accounts", id).await.iter().any(|(name, _)| name == "openstack_closed_at");
            snapshot
                .accounts
                .push(AccountRow { project_id: project.clone(), state: if closed { "closed" } else { "open" } });
            let bundles = self.get(&format!("/1.0/kb/accounts/{id}/bundles")).await;
            for sub in bundles.as_array().unwrap().iter().flat_map(|b| b["subscriptions"].as_array().unwrap()) {
                let key = InstanceId::parse(sub["externalKey"].as_str().unwrap()).unwrap();
                let end = sub["billingEndDate"].as_str().and_then(kb_time);
                let sub_id = sub["subscriptionId"].as_str().unwrap();
                // The kind as the service wrote it; a subscription without it is an instance's.
                let resource_type = self
                    .fields("subscriptions", sub_id)
                    .await
                    .iter()
                    .find(|(name, _)| name == "resource_type")
                    .and_then(|(_, value)| ResourceKind::parse(value))
                    .unwrap_or_default();
                snapshot.subscriptions.push(SubscriptionRow {
                    instance_id: key.clone(),
                    resource_type,
                    project_id: project.clone(),
                    plan: PlanName::parse(sub["planName"].as_str().unwrap()).unwrap(),
                    state: if sub["state"] == "CANCELLED" { "cancelled" } else { "active" },
                    start: kb_time(sub["startDate"].as_str().unwrap()).unwrap(),
                    end,
                });
                let usage = self.get(&format!("/1.0/kb/usages/{sub_id}?startDate=2000-01-01&endDate=2100-01-01")).await;
                let mut totals: BTreeMap<String, Decimal> = BTreeMap::new();
                for unit in usage["rolledUpUnits"].as_array().into_iter().flatten() {
                    let amount: Decimal = unit["amount"].to_string().parse().unwrap();
                    *totals.entry(unit["unitType"].as_str().unwrap().to_owned()).or_default() += amount;
                }
                snapshot.usage.extend(totals.into_iter().filter(|(_, a)| !a.is_zero()).map(|(unit, amount)| {
                    UsageRow { instance_id: key.clone(), unit: Unit::parse(unit).unwrap(), amount: amount.normalize() }
                }));
            }
        }
        snapshot.accounts.sort_by(|a, b| a.project_id.cmp(&b.project_id));
        snapshot.subscriptions.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        snapshot.usage.sort_by(|a, b| (&a.instance_id, &a.unit).cmp(&(&b.instance_id, &b.unit)));
        snapshot
    }
}

/// A request to the KillBill of `settings` (real or fake) with its basic auth and tenant
/// headers, as a tenant's client sends them.
pub fn authed(
    http: &reqwest::Client,
    settings: &KillBillSettings,
    method: reqwest::Method,
    path: &str,
) -> reqwest::RequestBuilder {
    http.request(method, format!("{}{path}", settings.url.trim_end_matches('/')))
        .basic_auth(&settings.username, Some(settings.password.expose()))
        .header("X-Killbill-ApiKey", &settings.api_key)
        .header("X-Killbill-ApiSecret", settings.api_secret.expose())
        .header("X-Killbill-CreatedBy", "concertim-billing-tests")
        .header("Accept", "application/json")
}

/// A KillBill date or date-time (0.22 answers subscription dates as days).
pub fn kb_time(text: &str) -> Option<Timestamp> {
    super::killbill::parse_time(Some(&text.to_owned()))
}

/// A name no other test (or earlier run against the same server) has used.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}{nanos:x}{}{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// KillBill's custom fields (a JSON array) as (name, value) pairs.
fn name_values(fields: &Value) -> Vec<(String, String)> {
    fields
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_owned(), f["value"].as_str().unwrap().to_owned()))
        .collect()
}
