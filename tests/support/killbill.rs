//! A fake KillBill that answers as the real server does (KillBill 0.22.26, the one
//! `deploy/dev/killbill.sh` runs; the differential test `tests/it/killbill_differential.rs`
//! checks every scripted answer against it): basic auth and tenant headers (401),
//! `X-Killbill-CreatedBy` on writes (400), creates as 201 with an empty body and an absolute
//! `Location` (usage: no `Location`), 409/3000, 404/3003, 404/1083, 500/1031, 400/9000,
//! 400/50000, 400/1015 for a second subscription on an active bundle key, 400/2021 for an
//! unknown plan, 400 (no code) for a plan change with a date and a policy, 500/1021 for one dated
//! before the start, 400/1001 for a cancel or change before the last transition, 400/6000 for a
//! change of a cancelled subscription or on a closed account, 400/2080 for a catalog version
//! uploaded twice (and the catalog read back as KillBill renders it), Jetty's JSON 400 for usage
//! after a subscription's end, and the half-open window of `GET /1.0/kb/usages`. Dates may be
//! days or date-times. Every request body is checked against the definitions of
//! `../shared/killbill/killbill-openapi.json` (ignoring its known-wrong `required` lists); a body
//! the spec would reject is answered 400 and recorded as a violation.
//!
//! What it cannot reproduce: invoices (its dry run sums usage at the test's own prices, not
//! KillBill's invoice of the bill cycle), the test clock, usage amounts truncated to whole
//! numbers by 0.22, two concurrent usage calls with one trackingId both being stored (its check
//! and insert are atomic; KillBill's are not), and column limits (field sizes, 4-byte UTF-8).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use concertim_billing::{
    billing::ledger::{AccountRow, Snapshot, SubscriptionRow, UsageRow},
    config::{KillBillSettings, Secret},
    event::{InstanceId, PlanName, ProjectId, Timestamp, Unit},
};
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// `admin:password`, base64: the docs' demo credentials.
const BASIC_AUTH: &str = "Basic YWRtaW46cGFzc3dvcmQ=";
const API_KEY: &str = "bob";
const API_SECRET: &str = "lazar";

#[derive(Default)]
struct Fake {
    base: String,
    next_id: u64,
    accounts: Vec<Account>,
    subscriptions: Vec<Subscription>,
    fields: Vec<Field>,
    usage: Vec<Usage>,
    fail_next: VecDeque<u16>,
    tenant: bool,
    catalogs: Vec<String>,
    /// Effective dates, plans and units of the uploaded catalogs.
    versions: Vec<Timestamp>,
    plans: std::collections::BTreeSet<String>,
    units: std::collections::BTreeSet<String>,
    violations: Vec<String>,
    requests: usize,
    /// Every answer waits this long first (a server's latency).
    latency: std::time::Duration,
    /// Credit (CBA) per account id, from `POST /1.0/kb/credits`.
    credits: BTreeMap<String, Decimal>,
    /// USD per unit of usage, for dry-run invoices (the test's own price list).
    prices: BTreeMap<String, Decimal>,
    /// Until then, every request is answered 503 or left hanging (alternately).
    outage_until: Option<std::time::Instant>,
    /// How long a hanging request hangs before its (unread) 503.
    hang: std::time::Duration,
    /// Writes whose answer is lost after they took effect: every `lose_every`-th write, while
    /// `lose_left` is above zero.
    lose_every: usize,
    lose_left: usize,
    writes: usize,
    /// Error codes answered so far (1031, 50000, 3000, 9000 …), by code.
    codes: BTreeMap<i64, usize>,
    /// The first cancel of each subscription takes this long to commit.
    cancel_hold: Option<std::time::Duration>,
    /// Subscriptions whose first cancel has started (it holds their row until it commits).
    cancel_locks: std::collections::HashSet<String>,
    /// Subscriptions whose first cancel has committed (their row is free again).
    committed: std::collections::HashSet<String>,
    /// (subscription id, trackingId) of every usage call stored: KillBill's unique index, so
    /// that a long run does not scan every row per call.
    tracking: std::collections::HashSet<(String, String)>,
}

struct Account {
    id: String,
    external_key: String,
    currency: Option<String>,
    /// When `DELETE /1.0/kb/accounts/{id}` closed it: KillBill then tags it
    /// AUTO_INVOICING_OFF and blocks changes (400/6000) from then on.
    closed: Option<Timestamp>,
}

struct Subscription {
    id: String,
    account_id: String,
    bundle_id: String,
    external_key: String,
    plan: String,
    start: Timestamp,
    cancelled: Option<Timestamp>,
    /// Dates of its plan changes: a cancel or change dated before the last one is refused.
    changes: Vec<Timestamp>,
}

impl Subscription {
    /// The previous transition: KillBill refuses cancellations and changes dated before it.
    fn last_transition(&self) -> Timestamp {
        self.changes.iter().copied().fold(self.start, Timestamp::max)
    }
}

struct Field {
    object_id: String,
    object_type: &'static str,
    name: String,
    value: String,
}

struct Usage {
    subscription_id: String,
    tracking_id: String,
    unit: String,
    date: Timestamp,
    amount: Decimal,
}

/// The running fake.
#[derive(Clone)]
pub struct FakeKillBill {
    /// Its base URL.
    pub url: String,
    state: Arc<Mutex<Fake>>,
}

fn error(status: StatusCode, class: &str, code: Option<i64>, message: &str) -> Response {
    let body = json!({"className": class, "code": code, "message": message, "causeClassName": null, "causeMessage": null, "stackTrace": []});
    let mut response = (status, [("content-type", "application/json")], body.to_string()).into_response();
    if let Some(code) = code {
        response.extensions_mut().insert(ErrorCode(code));
    }
    response
}

fn bad_request(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "java.lang.IllegalArgumentException", None, message)
}

fn not_found_object(id: &str, kind: &str) -> Response {
    let message = format!("Object id={id} type={kind} doesn't exist!");
    error(
        StatusCode::NOT_FOUND,
        "org.killbill.billing.callcontext.InternalCallContextFactory$ObjectDoesNotExist",
        None,
        &message,
    )
}

fn empty(status: StatusCode) -> Response {
    status.into_response()
}

fn json_ok(value: Value) -> Response {
    (StatusCode::OK, [("content-type", "application/json")], value.to_string()).into_response()
}

fn kb_time(t: Timestamp) -> String {
    let text = t.to_rfc3339();
    // RFC 3339 from the ledger type; KillBill always writes milliseconds.
    match text.split_once('.') {
        Some((head, _)) => format!("{head}.{:03}Z", t.as_offset().millisecond()),
        None => format!("{}.000Z", text.trim_end_matches('Z')),
    }
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The OpenAPI definitions, for checking request bodies (read once per process).
fn spec() -> Option<&'static Value> {
    static SPEC: std::sync::OnceLock<Option<Value>> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/killbill/killbill-openapi.json");
        let text = std::fs::read_to_string(&path).ok()?;
        serde_json::from_str::<Value>(&text).ok().map(|s| s["definitions"].clone())
    })
    .as_ref()
}

/// Checks `value` against a schema of the spec; every problem is a line in `problems`.
fn check(definitions: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    if value.is_null() {
        return;
    }
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/definitions/");
        return check(definitions, &definitions[name], value, at, problems);
    }
    let expected = schema["type"].as_str().unwrap_or("object");
    let ok = match expected {
        "string" => value.as_str().is_some_and(|s| match schema["format"].as_str() {
            Some("uuid") => s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4,
            // KillBill 0.22 takes days where the spec (0.24) says date-time.
            Some("date-time") => parse_time(Some(&s.to_owned())).is_some(),
            Some("date") => s.len() == 10,
            _ => schema["enum"].as_array().is_none_or(|e| e.iter().any(|v| v == value)),
        }),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => match value.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check(definitions, &schema["items"], item, &format!("{at}[{i}]"), problems);
                }
                true
            }
            None => false,
        },
        _ => match value.as_object() {
            Some(map) => {
                let properties = &schema["properties"];
                for (key, v) in map {
                    if properties.get(key).is_none() && schema.get("additionalProperties").is_none() {
                        problems.push(format!("{at}.{key}: not a property of the spec's definition"));
                    } else if let Some(p) = properties.get(key) {
                        check(definitions, p, v, &format!("{at}.{key}"), problems);
                    }
                }
                true
            }
            None => false,
        },
    };
    if !ok {
        problems.push(format!("{at}: {value} is not a {expected} ({schema})"));
    }
}

impl FakeKillBill {
    /// Starts the fake on a free port, as `killbill bootstrap` leaves a server: the tenant
    /// exists and the bundled catalog is uploaded.
    pub async fn start() -> Self {
        let fake = Self::start_empty().await;
        {
            let mut s = fake.state.lock().unwrap();
            s.tenant = true;
            upload_catalog(&mut s, concertim_billing::billing::killbill::CATALOG_XML);
            s.catalogs.clear();
        }
        fake
    }

    /// Starts the fake on a free port with no tenant and no catalog.
    pub async fn start_empty() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(Fake { base: url.clone(), ..Fake::default() }));
        let app = Router::new().fallback(handle).with_state(Arc::clone(&state));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, state }
    }

    /// Settings for the backend to talk to this fake.
    pub fn settings(&self) -> KillBillSettings {
        KillBillSettings {
            url: self.url.clone(),
            username: "admin".into(),
            password: Secret::new("password"),
            api_key: API_KEY.into(),
            api_secret: Secret::new(API_SECRET),
            created_by: "concertim-billing-tests".into(),
            currency: "USD".into(),
            timeout_ms: 5_000,
            connect_timeout_ms: 1_000,
            pool_max_idle: 4,
            server_version: Default::default(),
        }
    }

    /// Every answer takes `latency` (requests are still served concurrently).
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    /// Dry-run invoices price each unit of `unit` at `price` (other units cost nothing): the
    /// fake does not compute KillBill invoices, it sums usage at the test's prices.
    pub fn set_price(&self, unit: &str, price: Decimal) {
        self.state.lock().unwrap().prices.insert(unit.to_owned(), price);
    }

    /// Credits the project's account, as `POST /1.0/kb/credits` would.
    pub fn add_credit(&self, project: &str, amount: Decimal) {
        let mut s = self.state.lock().unwrap();
        let id = s.accounts.iter().find(|a| a.external_key == project).expect("the account exists").id.clone();
        *s.credits.entry(id).or_default() += amount;
    }

    /// What a dry-run invoice of the project's account amounts to now.
    pub fn upcoming_amount(&self, project: &str) -> Decimal {
        let s = self.state.lock().unwrap();
        s.accounts.iter().find(|a| a.external_key == project).map_or(Decimal::ZERO, |a| upcoming(&s, &a.id))
    }

    /// The account id of a project.
    pub fn account_id(&self, project: &str) -> Option<String> {
        let s = self.state.lock().unwrap();
        s.accounts.iter().find(|a| a.external_key == project).map(|a| a.id.clone())
    }

    /// For `duration` from now, every request is answered 503 with an empty body (as the proxy
    /// in front of a KillBill that is down does) or, alternately, hangs for `hang` first: a
    /// client with a shorter timeout sees a timeout.
    pub fn set_outage(&self, duration: std::time::Duration, hang: std::time::Duration) {
        let mut s = self.state.lock().unwrap();
        s.outage_until = Some(std::time::Instant::now() + duration);
        s.hang = hang;
    }

    /// Every `every`-th write (POST, PUT, DELETE), `count` times, takes effect and then its
    /// answer is lost: the client gets the empty 504 of the gateway in front of KillBill, as when
    /// KillBill committed but answered too late. A retry then meets what KillBill answers to a
    /// repeated write: 409/3000, 500/1031, 400/50000, 400/9000.
    pub fn lose_answers(&self, every: usize, count: usize) {
        let mut s = self.state.lock().unwrap();
        s.lose_every = every.max(1);
        s.lose_left = count;
    }

    /// The first cancel of each subscription takes `hold` to commit, holding the subscription's
    /// row meanwhile, as a slow KillBill does: a client that times out and cancels again waits
    /// for the first cancel to commit, and then meets 500/1031.
    pub fn slow_cancels(&self, hold: std::time::Duration) {
        self.state.lock().unwrap().cancel_hold = Some(hold);
    }

    /// Answers lost so far are all spent.
    pub fn lost_answers_left(&self) -> usize {
        self.state.lock().unwrap().lose_left
    }

    /// How many answers carried this KillBill error code (1031, 50000 …).
    pub fn answered_code(&self, code: i64) -> usize {
        self.state.lock().unwrap().codes.get(&code).copied().unwrap_or(0)
    }

    /// Every usage row stored: (subscription external key, unit, trackingId, amount).
    pub fn usage_records(&self) -> Vec<(String, String, String, Decimal)> {
        let s = self.state.lock().unwrap();
        let keys: BTreeMap<&str, &str> =
            s.subscriptions.iter().map(|x| (x.id.as_str(), x.external_key.as_str())).collect();
        s.usage
            .iter()
            .map(|u| {
                let key = keys.get(u.subscription_id.as_str()).copied().unwrap_or_default().to_owned();
                (key, u.unit.clone(), u.tracking_id.clone(), u.amount)
            })
            .collect()
    }

    /// The next requests are answered with these statuses (empty body), whatever they are.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.state.lock().unwrap().fail_next.extend(statuses);
    }

    /// The catalogs uploaded, in order.
    pub fn catalogs(&self) -> Vec<String> {
        self.state.lock().unwrap().catalogs.clone()
    }

    /// Bodies the OpenAPI spec would reject.
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    /// Requests served so far.
    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    /// Usage rows stored (each record of each call).
    pub fn usage_rows(&self) -> usize {
        self.state.lock().unwrap().usage.len()
    }

    /// Custom fields on the object with this id.
    pub fn fields_of(&self, object_id: &str) -> Vec<(String, String)> {
        let s = self.state.lock().unwrap();
        s.fields.iter().filter(|f| f.object_id == object_id).map(|f| (f.name.clone(), f.value.clone())).collect()
    }

    /// Removes every custom field of the object with this id.
    pub fn delete_fields(&self, object_id: &str) {
        self.state.lock().unwrap().fields.retain(|f| f.object_id != object_id);
    }

    /// The usage recorded for the subscription with this key, dated `day` or later.
    pub fn usage_since(&self, key: &str, day: &str) -> Decimal {
        let s = self.state.lock().unwrap();
        let from = parse_time(Some(&day.to_owned())).unwrap();
        let Some(sub) = s.subscriptions.iter().find(|x| x.external_key == key) else { return Decimal::ZERO };
        s.usage.iter().filter(|u| u.subscription_id == sub.id && u.date >= from).map(|u| u.amount).sum()
    }

    /// The id of the subscription with this key.
    pub fn subscription_id(&self, key: &str) -> Option<String> {
        let s = self.state.lock().unwrap();
        s.subscriptions.iter().find(|x| x.external_key == key).map(|x| x.id.clone())
    }

    /// What KillBill would bill, in the ledger's terms: accounts by key, subscriptions by key,
    /// usage per unit counting records dated up to the subscription's end.
    pub fn snapshot(&self) -> Snapshot {
        let s = self.state.lock().unwrap();
        let mut accounts: Vec<AccountRow> = s
            .accounts
            .iter()
            .map(|a| AccountRow {
                project_id: ProjectId::parse(a.external_key.clone()).unwrap(),
                // The service's deletion policy keeps the account open in KillBill and marks it.
                state: if a.closed.is_some()
                    || s.fields.iter().any(|f| f.object_id == a.id && f.name == "openstack_closed_at")
                {
                    "closed"
                } else {
                    "open"
                },
            })
            .collect();
        accounts.sort_by(|a, b| a.project_id.cmp(&b.project_id));
        let mut subscriptions: Vec<SubscriptionRow> = s
            .subscriptions
            .iter()
            .map(|x| SubscriptionRow {
                instance_id: InstanceId::parse(x.external_key.clone()).unwrap(),
                project_id: ProjectId::parse(
                    s.accounts.iter().find(|a| a.id == x.account_id).unwrap().external_key.clone(),
                )
                .unwrap(),
                plan: PlanName::parse(x.plan.clone()).unwrap(),
                state: if x.cancelled.is_some() { "cancelled" } else { "active" },
                start: x.start,
                end: x.cancelled,
            })
            .collect();
        subscriptions.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        let mut totals: BTreeMap<(String, String), Decimal> = BTreeMap::new();
        for u in &s.usage {
            let sub = s.subscriptions.iter().find(|x| x.id == u.subscription_id).unwrap();
            // What an invoice bills: records from the start up to the end, in catalog units.
            if u.date >= sub.start && sub.cancelled.is_none_or(|end| u.date <= end) && s.units.contains(&u.unit) {
                *totals.entry((sub.external_key.clone(), u.unit.clone())).or_default() += u.amount;
            }
        }
        let usage = totals
            .into_iter()
            .map(|((instance, unit), amount)| UsageRow {
                instance_id: InstanceId::parse(instance).unwrap(),
                unit: Unit::parse(unit).unwrap(),
                amount: amount.normalize(),
            })
            .collect();
        Snapshot { accounts, subscriptions, usage, late_records: 0 }
    }
}

async fn handle(
    State(state): State<Arc<Mutex<Fake>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = state.lock().unwrap().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let hang = {
        let mut s = state.lock().unwrap();
        match s.outage_until {
            Some(until) if std::time::Instant::now() < until => {
                s.requests += 1;
                if s.requests.is_multiple_of(2) {
                    return empty(StatusCode::SERVICE_UNAVAILABLE);
                }
                Some(s.hang)
            }
            _ => None,
        }
    };
    if let Some(hang) = hang {
        tokio::time::sleep(hang).await;
        return empty(StatusCode::SERVICE_UNAVAILABLE);
    }
    match cancel_wait(&state, &method, &uri) {
        Some(Wait::Commit(hold, id)) => {
            // The server commits whether or not the client is still waiting: the work goes on
            // in a task of its own, which a client's disconnection does not cancel.
            let task = tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                let answer = finish(&state, method, uri, headers, body);
                state.lock().unwrap().committed.insert(id);
                answer
            });
            return task.await.unwrap();
        }
        // The row lock is released by the commit itself, however late its task runs.
        Some(Wait::Row(id)) => {
            while !state.lock().unwrap().committed.contains(&id) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        None => {}
    }
    finish(&state, method, uri, headers, body)
}

/// Serves a request that has waited whatever it had to, losing its answer when told to.
fn finish(state: &Arc<Mutex<Fake>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let lose = {
        let mut s = state.lock().unwrap();
        let write = matches!(method, Method::POST | Method::PUT | Method::DELETE);
        if write && s.lose_left > 0 {
            s.writes += 1;
            let lose = s.writes.is_multiple_of(s.lose_every);
            if lose {
                s.lose_left -= 1;
            }
            lose
        } else {
            false
        }
    };
    let answer = serve(state, method, uri, headers, body);
    let mut s = state.lock().unwrap();
    if let Some(code) = answer.1 {
        *s.codes.entry(code).or_default() += 1;
    }
    if lose {
        return empty(StatusCode::GATEWAY_TIMEOUT);
    }
    answer.0
}

/// What a cancel waits for before it is served.
enum Wait {
    /// The subscription's first cancel: it commits after this long.
    Commit(std::time::Duration, String),
    /// A cancel that finds the row held (by this subscription's first cancel): it is served
    /// once that one has committed.
    Row(String),
}

fn cancel_wait(state: &Arc<Mutex<Fake>>, method: &Method, uri: &Uri) -> Option<Wait> {
    let mut s = state.lock().unwrap();
    let hold = s.cancel_hold?;
    let id = uri.path().strip_prefix("/1.0/kb/subscriptions/").filter(|_| method == Method::DELETE)?;
    if !s.cancel_locks.insert(id.to_owned()) {
        // Served once the first cancel has committed.
        return (!s.committed.contains(id)).then(|| Wait::Row(id.to_owned()));
    }
    Some(Wait::Commit(hold, id.to_owned()))
}

/// Serves one request; returns the answer and the KillBill error code it carries.
fn serve(
    state: &Arc<Mutex<Fake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (Response, Option<i64>) {
    let response = serve_inner(state, method, uri, headers, body);
    let code = response.extensions().get::<ErrorCode>().map(|c| c.0);
    (response, code)
}

/// A response's KillBill error code, for [`FakeKillBill::answered_code`].
#[derive(Clone, Copy)]
struct ErrorCode(i64);

fn serve_inner(state: &Arc<Mutex<Fake>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let mut s = state.lock().unwrap();
    s.requests += 1;
    if let Some(status) = s.fail_next.pop_front() {
        return empty(StatusCode::from_u16(status).unwrap());
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    if header("authorization") != BASIC_AUTH {
        return empty(StatusCode::UNAUTHORIZED);
    }
    let path = uri.path().to_owned();
    if path != "/1.0/kb/tenants"
        && (header("x-killbill-apikey") != API_KEY || header("x-killbill-apisecret") != API_SECRET)
    {
        // A servlet error page, not the JSON error body.
        return (StatusCode::UNAUTHORIZED, "Make sure to set the X-Killbill-ApiKey and X-Killbill-ApiSecret headers")
            .into_response();
    }
    let write = matches!(method, Method::POST | Method::PUT | Method::DELETE);
    if write && header("x-killbill-createdby").is_empty() {
        return bad_request("Header X-Killbill-CreatedBy needs to be set");
    }
    if path == "/1.0/kb/catalog/xml" {
        return match method {
            Method::POST if header("content-type").starts_with("text/xml") => {
                let xml = String::from_utf8_lossy(&body).into_owned();
                let dates = concertim_billing::billing::killbill::catalog_effective_dates(&xml);
                let Some(date) = dates.first() else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "org.killbill.billing.catalog.api.CatalogApiException",
                        Some(2080),
                        "Invalid catalog for tenant : no effectiveDate",
                    );
                };
                if s.versions.contains(date) {
                    let message = format!("Invalid catalog for tenant : Catalog effective date '{}' already exists for a previous version", kb_time(*date));
                    return error(
                        StatusCode::BAD_REQUEST,
                        "org.killbill.billing.catalog.api.CatalogApiException",
                        Some(2080),
                        &message,
                    );
                }
                upload_catalog(&mut s, &xml);
                created(&s, "/1.0/kb/catalog")
            }
            Method::POST => empty(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            // KillBill renders its versions (JAXB), never the uploaded text.
            _ => {
                let versions: String = s
                    .versions
                    .iter()
                    .map(|d| {
                        format!(
                            "<version><effectiveDate>{}</effectiveDate><catalogName>OpenStack</catalogName></version>",
                            d.to_rfc3339()
                        )
                    })
                    .collect();
                let xml = format!("<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?><catalogs><versions>{versions}</versions><catalogName>OpenStack</catalogName></catalogs>");
                (StatusCode::OK, [("content-type", "text/xml")], xml).into_response()
            }
        };
    }
    let json: Option<Value> = if body.is_empty() { None } else { serde_json::from_slice(&body).ok() };
    if !body.is_empty() && json.is_none() && header("content-type").contains("json") {
        return bad_request("Unrecognized body: not JSON");
    }
    let q = query(&uri);
    if path == "/1.0/kb/tenants" {
        return match method {
            Method::GET if q.get("apiKey").map(String::as_str) == Some(API_KEY) && s.tenant => json_ok(
                json!({"tenantId": "00000000-0000-4000-8000-0000000000aa", "externalKey": null, "apiKey": API_KEY, "apiSecret": null, "auditLogs": []}),
            ),
            Method::GET => error(
                StatusCode::NOT_FOUND,
                "org.killbill.billing.tenant.api.TenantApiException",
                Some(20003),
                "Tenant does not exist",
            ),
            Method::POST if s.tenant => error(
                StatusCode::CONFLICT,
                "org.killbill.billing.tenant.api.TenantApiException",
                Some(20000),
                "Tenant already exists",
            ),
            Method::POST => {
                let ok = json.as_ref().is_some_and(|b| b["apiKey"] == API_KEY && b["apiSecret"] == API_SECRET);
                if !ok {
                    return bad_request("TenantJson apiKey and apiSecret need to be set");
                }
                s.tenant = true;
                created(&s, "/1.0/kb/tenants/00000000-0000-4000-8000-0000000000aa")
            }
            _ => empty(StatusCode::METHOD_NOT_ALLOWED),
        };
    }
    let segments: Vec<String> = path.trim_start_matches("/1.0/kb/").split('/').map(str::to_owned).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let definition = match (&method, segments.as_slice()) {
        (&Method::POST, ["accounts"]) => Some("Account"),
        (&Method::POST, ["subscriptions"]) | (&Method::PUT, ["subscriptions", _]) => Some("Subscription"),
        (&Method::POST, ["usages"]) => Some("SubscriptionUsageRecord"),
        (&Method::POST, [_, _, "customFields"]) => Some("CustomField[]"),
        _ => None,
    };
    if let (Some(name), Some(value)) = (definition, &json) {
        if let Some(definitions) = spec() {
            let mut problems = Vec::new();
            let schema = match name.strip_suffix("[]") {
                Some(item) => json!({"type": "array", "items": {"$ref": format!("#/definitions/{item}")}}),
                None => json!({"$ref": format!("#/definitions/{name}")}),
            };
            check(definitions, &schema, value, name, &mut problems);
            if !problems.is_empty() {
                s.violations.extend(problems.iter().cloned());
                return bad_request(&problems.join("; "));
            }
        }
    }
    route(&mut s, &method, &segments, &q, json)
}

/// The fake's clock: the real time (KillBill's, outside its test mode).
fn now() -> Timestamp {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp::from_unix(since.as_secs() as i64).unwrap()
}

/// 400/1001: a date before the subscription's previous transition.
fn invalid_date(at: Timestamp, previous: Timestamp) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "org.killbill.billing.subscription.api.user.SubscriptionBaseApiException",
        Some(1001),
        &format!(
            "Requested date {} is not allowed to be prior to the previous transition {}",
            kb_time(at),
            kb_time(previous)
        ),
    )
}

/// 400/2021: a plan the tenant's catalog does not have.
fn no_such_plan(plan: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "org.killbill.billing.catalog.api.CatalogApiException",
        Some(2021),
        &format!("Could not find any plans named '{plan}'"),
    )
}

/// 400/6000: a change on a closed account (its CLOSE_ACCOUNT blocking state blocks changes).
fn blocked(account_id: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "org.killbill.billing.entitlement.api.BlockingApiException",
        Some(6000),
        &format!("The action CHANGE is block on this ACCOUNT with id={account_id}"),
    )
}

/// Records a catalog version with its plans and units.
fn upload_catalog(s: &mut Fake, xml: &str) {
    s.catalogs.push(xml.to_owned());
    s.versions.extend(concertim_billing::billing::killbill::catalog_effective_dates(xml).first().copied());
    let names = |tag: &str| -> Vec<String> {
        xml.split(&format!("<{tag} name=\""))
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_owned)
            .collect()
    };
    s.plans.extend(names("plan"));
    s.units.extend(names("unit"));
}

fn id(s: &mut Fake) -> String {
    s.next_id += 1;
    format!("00000000-0000-4000-8000-{:012x}", s.next_id)
}

fn created(s: &Fake, path: &str) -> Response {
    (StatusCode::CREATED, [("location", format!("{}{path}", s.base))]).into_response()
}

fn subscription_json(x: &Subscription) -> Value {
    let cancelled = x.cancelled.map(kb_time);
    let event = |kind: &str, at: Timestamp| json!({"eventType": kind, "effectiveDate": kb_time(at), "plan": x.plan});
    let mut events = vec![event("START_ENTITLEMENT", x.start), event("START_BILLING", x.start)];
    events.extend(x.changes.iter().map(|at| event("CHANGE", *at)));
    events.extend(x.cancelled.iter().flat_map(|at| [event("STOP_ENTITLEMENT", *at), event("STOP_BILLING", *at)]));
    json!({
        "accountId": x.account_id, "bundleId": x.bundle_id, "bundleExternalKey": x.external_key,
        "subscriptionId": x.id, "externalKey": x.external_key, "startDate": kb_time(x.start),
        "productName": "Instance", "productCategory": "BASE", "billingPeriod": "NO_BILLING_PERIOD",
        "phaseType": "EVERGREEN", "priceList": "DEFAULT", "planName": x.plan,
        "state": if x.cancelled.is_some() { "CANCELLED" } else { "ACTIVE" }, "sourceType": "NATIVE",
        "cancelledDate": cancelled, "chargedThroughDate": null, "billingStartDate": kb_time(x.start),
        "billingEndDate": cancelled, "billCycleDayLocal": 1, "quantity": 1, "events": events,
        "priceOverrides": null, "prices": [], "auditLogs": [],
    })
}

/// Usage of the account's subscriptions at the test's prices.
fn upcoming(s: &Fake, account_id: &str) -> Decimal {
    s.usage
        .iter()
        .filter(|u| s.subscriptions.iter().any(|x| x.id == u.subscription_id && x.account_id == account_id))
        .map(|u| u.amount * s.prices.get(&u.unit).copied().unwrap_or_default())
        .sum()
}

fn decimal_json(d: Decimal) -> Value {
    serde_json::from_str(&d.normalize().to_string()).unwrap()
}

fn account_json(a: &Account) -> Value {
    json!({
        "accountId": a.id, "name": a.external_key, "firstNameLength": null, "externalKey": a.external_key,
        "email": null, "billCycleDayLocal": 0, "currency": a.currency, "parentAccountId": null,
        "isPaymentDelegatedToParent": false, "paymentMethodId": null, "referenceTime": "2025-01-01T00:00:00.000Z",
        "timeZone": "UTC", "address1": null, "address2": null, "postalCode": null, "company": null, "city": null,
        "state": null, "country": null, "locale": null, "phone": null, "notes": null, "isMigrated": null,
        "accountBalance": null, "accountCBA": null, "auditLogs": [],
    })
}

/// KillBill takes a date (midnight UTC) or a date-time wherever it takes a date.
pub fn parse_time(text: Option<&String>) -> Option<Timestamp> {
    let text = text?;
    Timestamp::parse(text).ok().or_else(|| Timestamp::parse(&format!("{text}T00:00:00Z")).ok())
}

fn route(
    s: &mut Fake,
    method: &Method,
    segments: &[&str],
    q: &BTreeMap<String, String>,
    json: Option<Value>,
) -> Response {
    let body = json.unwrap_or(Value::Null);
    match (method, segments) {
        (&Method::POST, ["accounts"]) => {
            let key = body["externalKey"].as_str().map(str::to_owned);
            if let Some(key) = &key {
                if s.accounts.iter().any(|a| &a.external_key == key) {
                    let message = format!("Account already exists for key {key}");
                    return error(
                        StatusCode::CONFLICT,
                        "org.killbill.billing.account.api.AccountApiException",
                        Some(3000),
                        &message,
                    );
                }
            }
            let account_id = id(s);
            let external_key = key.unwrap_or_else(|| account_id.clone());
            let currency = body["currency"].as_str().map(str::to_owned);
            s.accounts.push(Account { id: account_id.clone(), external_key, currency, closed: None });
            created(s, &format!("/1.0/kb/accounts/{account_id}"))
        }
        (&Method::GET, ["accounts"]) => {
            let Some(key) = q.get("externalKey") else { return bad_request("externalKey needs to be set") };
            match s.accounts.iter().find(|a| &a.external_key == key) {
                Some(a) => {
                    let mut account = account_json(a);
                    if q.get("accountWithBalanceAndCBA").map(String::as_str) == Some("true") {
                        let cba = s.credits.get(&a.id).copied().unwrap_or_default();
                        account["accountCBA"] = decimal_json(cba);
                        account["accountBalance"] = decimal_json(-cba);
                    }
                    json_ok(account)
                }
                None => error(
                    StatusCode::NOT_FOUND,
                    "org.killbill.billing.account.api.AccountApiException",
                    Some(3003),
                    &format!("Account does not exist for key {key}"),
                ),
            }
        }
        (&Method::GET, ["accounts", account]) => match s.accounts.iter().find(|a| a.id == *account) {
            Some(a) => json_ok(account_json(a)),
            None => not_found_object(account, "ACCOUNT"),
        },
        (&Method::DELETE, ["accounts", account]) => match s.accounts.iter_mut().find(|a| a.id == *account) {
            Some(a) => {
                a.closed.get_or_insert_with(now);
                empty(StatusCode::NO_CONTENT)
            }
            None => not_found_object(account, "ACCOUNT"),
        },
        (&Method::GET, ["accounts", account, "bundles"]) => {
            if !s.accounts.iter().any(|a| a.id == *account) {
                return not_found_object(account, "ACCOUNT");
            }
            let bundles: Vec<Value> = s
                .subscriptions
                .iter()
                .filter(|x| x.account_id == *account)
                .map(|x| {
                    json!({"accountId": account, "bundleId": x.bundle_id, "externalKey": x.external_key,
                        "subscriptions": [subscription_json(x)], "timeline": null, "auditLogs": []})
                })
                .collect();
            json_ok(Value::Array(bundles))
        }
        (&Method::POST, [kind @ ("accounts" | "subscriptions"), object, "customFields"]) => {
            let exists = if *kind == "accounts" {
                s.accounts.iter().any(|a| a.id == *object)
            } else {
                s.subscriptions.iter().any(|x| x.id == *object)
            };
            if !exists {
                return not_found_object(object, if *kind == "accounts" { "ACCOUNT" } else { "SUBSCRIPTION" });
            }
            let Some(items) = body.as_array() else { return bad_request("CustomFieldJson list needs to be set") };
            let mut new = Vec::new();
            for item in items {
                let (Some(name), Some(value)) = (item["name"].as_str(), item["value"].as_str()) else {
                    return bad_request("CustomFieldJson name and value need to be set");
                };
                if name.is_empty() || value.is_empty() {
                    return bad_request("CustomFieldJson name and value need to be set");
                }
                if s.fields.iter().any(|f| f.object_id == *object && f.name == name && f.value == value) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "org.killbill.billing.util.api.CustomFieldApiException",
                        Some(9000),
                        &format!("The custom field {name} already exists"),
                    );
                }
                let object_type = if *kind == "accounts" { "ACCOUNT" } else { "SUBSCRIPTION" };
                new.push(Field {
                    object_id: (*object).to_owned(),
                    object_type,
                    name: name.into(),
                    value: value.into(),
                });
            }
            s.fields.extend(new);
            created(s, &format!("/1.0/kb/{kind}/{object}/customFields"))
        }
        (&Method::GET, [_, object, "customFields"]) => {
            let fields: Vec<Value> = s
                .fields
                .iter()
                .filter(|f| f.object_id == *object)
                .map(|f| json!({"customFieldId": "00000000-0000-4000-8000-00000000ffff", "objectId": f.object_id, "objectType": f.object_type, "name": f.name, "value": f.value, "auditLogs": []}))
                .collect();
            json_ok(Value::Array(fields))
        }
        (&Method::POST, ["subscriptions"]) => {
            let Some(account_id) = body["accountId"].as_str().map(str::to_owned) else {
                return bad_request("SubscriptionJson accountId needs to be set");
            };
            let plan = body["planName"].as_str().map(str::to_owned);
            let triplet = ["productName", "productCategory", "billingPeriod", "priceList"].map(|k| !body[k].is_null());
            let plan = match (plan, triplet.iter().any(|x| *x)) {
                (Some(_), true) => return bad_request("SubscriptionJson productName, billingPeriod and priceList should not be set when planName is specified"),
                (Some(plan), false) => plan,
                (None, _) => return bad_request("SubscriptionJson planName or productName, productCategory, billingPeriod and priceList need to be set"),
            };
            let Some(account) = s.accounts.iter().find(|a| a.id == account_id) else {
                return not_found_object(&account_id, "ACCOUNT");
            };
            if !s.plans.contains(&plan) {
                return no_such_plan(&plan);
            }
            let start = parse_time(q.get("entitlementDate")).unwrap_or_else(now);
            if account.closed.is_some_and(|closed| start >= closed) {
                return blocked(&account_id);
            }
            let subscription_id = id(s);
            let external_key = body["externalKey"].as_str().map_or_else(|| subscription_id.clone(), str::to_owned);
            let bundle_key = body["bundleExternalKey"].as_str().unwrap_or(&external_key).to_owned();
            if s.subscriptions.iter().any(|x| x.external_key == bundle_key && x.cancelled.is_none()) {
                // The bundle check runs before the subscription key's unique index (0.24 may
                // answer 1014 for an active bundle key; 0.22.26 answers 1015).
                return error(
                    StatusCode::BAD_REQUEST,
                    "org.killbill.billing.entitlement.api.EntitlementApiException",
                    Some(1015),
                    &format!("Subscription bundle {bundle_key} already has a base subscription"),
                );
            }
            if s.subscriptions.iter().any(|x| x.external_key == external_key) {
                // A cancelled bundle is renamed, then the subscription key's unique index fails.
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "java.sql.SQLIntegrityConstraintViolationException",
                    None,
                    "Duplicate entry for key 'subscriptions_external_key'",
                );
            }
            let bundle_id = id(s);
            s.subscriptions.push(Subscription {
                id: subscription_id.clone(),
                account_id,
                bundle_id,
                external_key,
                plan,
                start,
                cancelled: None,
                changes: Vec::new(),
            });
            created(s, &format!("/1.0/kb/subscriptions/{subscription_id}"))
        }
        (&Method::GET, ["subscriptions"]) => {
            let Some(key) = q.get("externalKey") else { return bad_request("externalKey needs to be set") };
            match s.subscriptions.iter().find(|x| &x.external_key == key) {
                Some(x) => json_ok(subscription_json(x)),
                None => error(
                    StatusCode::NOT_FOUND,
                    "org.killbill.billing.subscription.api.user.SubscriptionBaseApiException",
                    Some(1083),
                    &format!("Subscription with external key {key} does not exist"),
                ),
            }
        }
        (&Method::GET, ["subscriptions", sub]) => match s.subscriptions.iter().find(|x| x.id == *sub) {
            Some(x) => json_ok(subscription_json(x)),
            None => not_found_object(sub, "SUBSCRIPTION"),
        },
        (&Method::PUT, ["subscriptions", sub]) => {
            if q.contains_key("requestedDate") && q.contains_key("billingPolicy") {
                // SubscriptionResource: a Preconditions check, mapped to a 400 without a code.
                return bad_request("Only one of requestedDate or billingPolicy should be specified");
            }
            let Some(plan) = body["planName"].as_str().map(str::to_owned) else {
                return bad_request("SubscriptionJson planName needs to be set");
            };
            if !s.plans.contains(&plan) {
                return no_such_plan(&plan);
            }
            let at = parse_time(q.get("requestedDate")).unwrap_or_else(now);
            let Some(x) = s.subscriptions.iter().find(|x| x.id == *sub) else {
                return not_found_object(sub, "SUBSCRIPTION");
            };
            if x.cancelled.is_some() {
                // A cancelled entitlement is blocked (BLOCK_BLOCKED_ACTION).
                return error(
                    StatusCode::BAD_REQUEST,
                    "org.killbill.billing.entitlement.api.BlockingApiException",
                    Some(6000),
                    &format!("The action CHANGE is block on this SUBSCRIPTION with id={sub}"),
                );
            }
            if at < x.start {
                // SUB_CHANGE_NON_ACTIVE, a server error: before its start the subscription is
                // not active at the requested date.
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "org.killbill.billing.entitlement.api.EntitlementApiException",
                    Some(1021),
                    &format!("Subscription {sub} is in state ACTIVE: Failed to change plan"),
                );
            }
            if at < x.last_transition() {
                return invalid_date(at, x.last_transition());
            }
            let account_closed = s.accounts.iter().find(|a| a.id == x.account_id).and_then(|a| a.closed);
            if account_closed.is_some_and(|closed| at >= closed) {
                let account_id = x.account_id.clone();
                return blocked(&account_id);
            }
            let x = s.subscriptions.iter_mut().find(|x| x.id == *sub).unwrap();
            x.plan = plan;
            x.changes.push(at);
            empty(StatusCode::NO_CONTENT)
        }
        (&Method::DELETE, ["subscriptions", sub]) => {
            let at = if q.contains_key("entitlementPolicy") {
                // §1.8: with a policy the requested date is ignored.
                None
            } else {
                parse_time(q.get("requestedDate"))
            };
            match s.subscriptions.iter_mut().find(|x| x.id == *sub) {
                Some(x) if x.cancelled.is_some() => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "org.killbill.billing.subscription.api.user.SubscriptionBaseApiException",
                    Some(1031),
                    "Subscription is already cancelled",
                ),
                Some(x) => {
                    let at = at.unwrap_or_else(now);
                    if at < x.last_transition() {
                        return invalid_date(at, x.last_transition());
                    }
                    x.cancelled = Some(at);
                    empty(StatusCode::NO_CONTENT)
                }
                None => not_found_object(sub, "SUBSCRIPTION"),
            }
        }
        (&Method::POST, ["usages"]) => {
            let Some(sub_id) = body["subscriptionId"].as_str().map(str::to_owned) else {
                return bad_request("SubscriptionUsageRecordJson subscriptionId needs to be set");
            };
            let Some(units) = body["unitUsageRecords"].as_array().filter(|u| !u.is_empty()) else {
                return bad_request("SubscriptionUsageRecordJson unitUsageRecords needs to be set");
            };
            let mut rows = Vec::new();
            for unit in units {
                let Some(unit_type) = unit["unitType"].as_str() else {
                    return bad_request("UnitUsageRecordJson unitType need to be set");
                };
                let Some(records) = unit["usageRecords"].as_array().filter(|r| !r.is_empty()) else {
                    return bad_request("UnitUsageRecordJson usageRecords must have at least one element.");
                };
                for r in records {
                    let (Some(date), Some(amount)) =
                        (parse_time(r["recordDate"].as_str().map(str::to_owned).as_ref()), r["amount"].as_f64())
                    else {
                        return bad_request("UsageRecordJson recordDate and amount need to be set");
                    };
                    let amount: Decimal = amount.to_string().parse().unwrap();
                    rows.push((unit_type.to_owned(), date, amount));
                }
            }
            let Some(sub) = s.subscriptions.iter().find(|x| x.id == sub_id) else {
                return not_found_object(&sub_id, "SUBSCRIPTION");
            };
            let tracking = body["trackingId"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .unwrap_or_else(|| format!("generated-{}", s.next_id));
            // UsageResource checks the end before the trackingId, and answers a bare 400, which
            // Jetty (0.22's container here) writes as its own JSON error page.
            if let Some(end) = sub.cancelled {
                if rows.iter().any(|(_, date, _)| *date > end) {
                    let page = json!({"message": "Bad Request", "url": "/1.0/kb/usages", "status": "400"});
                    return (StatusCode::BAD_REQUEST, [("content-type", "application/json")], page.to_string())
                        .into_response();
                }
            }
            if s.tracking.contains(&(sub_id.clone(), tracking.clone())) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "org.killbill.billing.usage.api.UsageApiException",
                    Some(50000),
                    &format!("A usage record with tracking ID {tracking} already exists"),
                );
            }
            s.tracking.insert((sub_id.clone(), tracking.clone()));
            for (unit, date, amount) in rows {
                s.usage.push(Usage {
                    subscription_id: sub_id.clone(),
                    tracking_id: tracking.clone(),
                    unit,
                    date,
                    amount,
                });
            }
            empty(StatusCode::CREATED)
        }
        (&Method::GET, ["usages", sub, rest @ ..]) => {
            let (Some(start), Some(end)) = (parse_time(q.get("startDate")), parse_time(q.get("endDate"))) else {
                return bad_request("startDate and endDate need to be set");
            };
            let mut totals: BTreeMap<String, Decimal> = BTreeMap::new();
            for u in s.usage.iter().filter(|u| u.subscription_id == *sub && u.date >= start && u.date < end) {
                if rest.first().is_none_or(|unit| *unit == u.unit) {
                    *totals.entry(u.unit.clone()).or_default() += u.amount;
                }
            }
            let units: Vec<Value> = totals
                .into_iter()
                .map(|(unit, amount)| json!({"unitType": unit, "amount": amount.to_string().parse::<f64>().unwrap()}))
                .collect();
            json_ok(
                json!({"subscriptionId": sub, "startDate": kb_time(start), "endDate": kb_time(end), "rolledUpUnits": units}),
            )
        }
        (&Method::POST, ["credits"]) => {
            // §1.11: only the first item is checked; 200 with the created items.
            let Some(first) = body.as_array().and_then(|a| a.first()) else {
                return bad_request("CreditJson needs to be set");
            };
            let (Some(account_id), Some(amount)) = (first["accountId"].as_str(), first["amount"].as_f64()) else {
                return bad_request("CreditJson accountId and amount need to be set");
            };
            if !s.accounts.iter().any(|a| a.id == account_id) {
                return not_found_object(account_id, "ACCOUNT");
            }
            let amount: Decimal = amount.to_string().parse().unwrap();
            *s.credits.entry(account_id.to_owned()).or_default() += amount;
            let item_id = id(s);
            json_ok(json!([{"invoiceItemId": item_id, "accountId": account_id, "itemType": "CREDIT_ADJ",
                "amount": decimal_json(amount), "currency": "USD", "auditLogs": []}]))
        }
        (&Method::POST, ["invoices", "dryRun"]) => {
            let Some(account_id) = q.get("accountId").cloned() else {
                return bad_request("accountId needs to be set");
            };
            if !s.accounts.iter().any(|a| a.id == account_id) {
                return not_found_object(&account_id, "ACCOUNT");
            }
            if body["dryRunType"].as_str().is_none() {
                return bad_request("InvoiceDryRunJson dryRunType needs to be set");
            }
            let amount = upcoming(s, &account_id);
            if amount.is_zero() {
                // §1.10: nothing to invoice is a 204 with an empty body.
                return empty(StatusCode::NO_CONTENT);
            }
            json_ok(json!({"amount": decimal_json(amount), "currency": "USD", "status": "DRAFT", "creditAdj": 0,
                "refundAdj": 0, "invoiceId": "00000000-0000-4000-8000-00000000dddd", "invoiceDate": "2025-01-31",
                "targetDate": q.get("targetDate"), "invoiceNumber": null, "balance": decimal_json(amount),
                "accountId": account_id, "items": [], "trackingIds": [], "auditLogs": []}))
        }
        _ => error(StatusCode::NOT_FOUND, "javax.ws.rs.NotFoundException", None, "HTTP 404 Not Found"),
    }
}
