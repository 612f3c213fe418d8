//! The fake KillBill's HTTP side: authentication, the catalog and tenant calls, the body check,
//! and a handler for each call of `/1.0/kb`, answering as KillBill 0.22.26 does (status, error
//! class and code, message, `Location`).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use concertim_billing::event::Timestamp;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::{
    fake_server::{form_pairs, percent_decode},
    model::{now, parse_time, Account, Fake, Field, Subscription, Usage},
    schema, API_KEY, API_SECRET, BASIC_AUTH,
};

/// The fake's state, as the handlers share it.
pub(super) type Shared = Arc<Mutex<Fake>>;

/// The routes of the fake, over `state`.
pub(super) fn app(state: Shared) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// A response's KillBill error code, for [`super::FakeKillBill::answered_code`].
#[derive(Clone, Copy)]
struct ErrorCode(i64);

/// What a call carries besides its path: the decoded query and the JSON body (null if none).
struct Call {
    query: BTreeMap<String, String>,
    body: Value,
}

async fn handle(State(state): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    match cancel_wait(&state, &method, &uri) {
        Some(Wait::Commit(hold, id)) => {
            // The server commits whether or not the client is still waiting: the work goes on
            // in a task of its own, which a client's disconnection does not cancel.
            let task = tokio::spawn(async move {
                // The injected commit time (a slow cancel), not a synchronisation.
                tokio::time::sleep(hold).await;
                let answer = finish(&state, &method, &uri, &headers, &body);
                state.lock().unwrap().committed.send_modify(|committed| {
                    committed.insert(id);
                });
                answer
            });
            return task.await.unwrap();
        }
        // The row lock is released by the commit itself, however late its task runs.
        Some(Wait::Row(id)) => {
            let mut committed = state.lock().unwrap().committed.subscribe();
            committed.wait_for(|committed| committed.contains(&id)).await.unwrap();
        }
        None => {}
    }
    finish(&state, &method, &uri, &headers, &body)
}

/// What a cancel waits for before it is served.
enum Wait {
    /// The subscription's first cancel: it commits after this long.
    Commit(std::time::Duration, String),
    /// A cancel that finds the row held (by this subscription's first cancel): it is served
    /// once that one has committed.
    Row(String),
}

fn cancel_wait(state: &Shared, method: &Method, uri: &Uri) -> Option<Wait> {
    let mut s = state.lock().unwrap();
    let hold = s.cancel_hold?;
    let id = uri.path().strip_prefix("/1.0/kb/subscriptions/").filter(|_| method == Method::DELETE)?;
    if !s.cancel_locks.insert(id.to_owned()) {
        // Served once the first cancel has committed.
        return (!s.committed.borrow().contains(id)).then(|| Wait::Row(id.to_owned()));
    }
    Some(Wait::Commit(hold, id.to_owned()))
}

/// Serves a request that has waited whatever it had to, counting the error code it answers.
fn finish(state: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Response {
    let mut s = state.lock().unwrap();
    let answer = serve(&mut s, method, uri, headers, body);
    if let Some(ErrorCode(code)) = answer.extensions().get::<ErrorCode>() {
        *s.codes.entry(*code).or_default() += 1;
    }
    answer
}

/// Serves one request: authentication, then the catalog and tenant calls, then the body check
/// and the call's handler.
fn serve(s: &mut Fake, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let path = uri.path();
    if let Some(refused) = authenticate(method, path, &header) {
        return refused;
    }
    if path == "/1.0/kb/catalog/xml" {
        return catalog(s, method, &header("content-type"), body);
    }
    let json: Option<Value> = if body.is_empty() { None } else { serde_json::from_slice(body).ok() };
    if !body.is_empty() && json.is_none() && header("content-type").contains("json") {
        return bad_request("Unrecognized body: not JSON");
    }
    let call = Call { query: form_pairs(uri.query().unwrap_or_default()), body: json.unwrap_or(Value::Null) };
    if path == "/1.0/kb/tenants" {
        return tenants(s, method, &call);
    }
    let segments: Vec<&str> = path.trim_start_matches("/1.0/kb/").split('/').collect();
    let problems = schema::problems(method, &segments, &call.body);
    if !problems.is_empty() {
        s.violations.extend(problems.iter().cloned());
        return bad_request(&problems.join("; "));
    }
    route(s, method, &segments, &call)
}

/// Basic auth, the tenant's headers (but on `/1.0/kb/tenants`) and `X-Killbill-CreatedBy` on
/// writes; the refusal when one is missing or wrong.
fn authenticate(method: &Method, path: &str, header: &impl Fn(&str) -> String) -> Option<Response> {
    if header("authorization") != BASIC_AUTH {
        return Some(empty(StatusCode::UNAUTHORIZED));
    }
    if path != "/1.0/kb/tenants"
        && (header("x-killbill-apikey") != API_KEY || header("x-killbill-apisecret") != API_SECRET)
    {
        // A servlet error page, not the JSON error body.
        return Some(
            (StatusCode::UNAUTHORIZED, "Make sure to set the X-Killbill-ApiKey and X-Killbill-ApiSecret headers")
                .into_response(),
        );
    }
    let write = matches!(*method, Method::POST | Method::PUT | Method::DELETE);
    if write && header("x-killbill-createdby").is_empty() {
        return Some(bad_request("Header X-Killbill-CreatedBy needs to be set"));
    }
    None
}

/// `/1.0/kb/catalog/xml`: an upload (one version per effective date), or the versions read back.
fn catalog(s: &mut Fake, method: &Method, content_type: &str, body: &Bytes) -> Response {
    match *method {
        Method::POST if content_type.starts_with("text/xml") => {
            let xml = String::from_utf8_lossy(body).into_owned();
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
                let message = format!(
                    "Invalid catalog for tenant : Catalog effective date '{}' already exists for a previous version",
                    kb_time(*date)
                );
                return error(
                    StatusCode::BAD_REQUEST,
                    "org.killbill.billing.catalog.api.CatalogApiException",
                    Some(2080),
                    &message,
                );
            }
            s.upload_catalog(&xml);
            created(s, "/1.0/kb/catalog")
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
    }
}

/// `/1.0/kb/tenants`: the one tenant, looked up by its API key or created.
fn tenants(s: &mut Fake, method: &Method, call: &Call) -> Response {
    match *method {
        Method::GET if call.query.get("apiKey").map(String::as_str) == Some(API_KEY) && s.tenant => json_ok(
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
            if call.body["apiKey"] != API_KEY || call.body["apiSecret"] != API_SECRET {
                return bad_request("TenantJson apiKey and apiSecret need to be set");
            }
            s.tenant = true;
            created(s, "/1.0/kb/tenants/00000000-0000-4000-8000-0000000000aa")
        }
        _ => empty(StatusCode::METHOD_NOT_ALLOWED),
    }
}

/// The handler of a call to `/1.0/kb/{segments}`.
fn route(s: &mut Fake, method: &Method, segments: &[&str], call: &Call) -> Response {
    match (method, segments) {
        (&Method::POST, ["accounts"]) => create_account(s, call),
        (&Method::GET, ["accounts"]) => account_by_key(s, call),
        (&Method::GET, ["accounts", account]) => match s.accounts.iter().find(|a| a.id == *account) {
            Some(a) => json_ok(with_balance(s, a, call)),
            None => not_found_object(account, "ACCOUNT"),
        },
        (&Method::GET, ["accounts", account, "invoices"]) => match s.accounts.iter().find(|a| a.id == *account) {
            Some(a) => json_ok(invoices(s, &a.id, call)),
            None => not_found_object(account, "ACCOUNT"),
        },
        (&Method::DELETE, ["accounts", account]) => close_account(s, account),
        (&Method::GET, ["accounts", account, "bundles"]) => bundles(s, account),
        (&Method::POST, [kind @ ("accounts" | "subscriptions"), object, "customFields"]) => {
            add_fields(s, kind, object, call)
        }
        (&Method::GET, ["customFields", "search", key]) => search_fields(s, &percent_decode(key), call),
        (&Method::GET, [_, object, "customFields"]) => fields(s, object),
        (&Method::POST, ["subscriptions"]) => create_subscription(s, call),
        (&Method::GET, ["subscriptions"]) => subscription_by_key(s, call),
        (&Method::GET, ["subscriptions", sub]) => match s.subscriptions.iter().find(|x| x.id == *sub) {
            Some(x) => json_ok(subscription_json(x)),
            None => not_found_object(sub, "SUBSCRIPTION"),
        },
        (&Method::PUT, ["subscriptions", sub]) => change_plan(s, sub, call),
        (&Method::DELETE, ["subscriptions", sub]) => cancel(s, sub, call),
        (&Method::POST, ["usages"]) => record_usage(s, call),
        (&Method::GET, ["usages", sub, rest @ ..]) => rolled_up_usage(s, sub, rest.first().copied(), call),
        (&Method::POST, ["credits"]) => credit(s, call),
        (&Method::POST, ["invoices", "dryRun"]) => dry_run(s, call),
        _ => error(StatusCode::NOT_FOUND, "javax.ws.rs.NotFoundException", None, "HTTP 404 Not Found"),
    }
}

/// `POST /1.0/kb/accounts`: 409/3000 for a key already taken.
fn create_account(s: &mut Fake, call: &Call) -> Response {
    let key = call.body["externalKey"].as_str().map(str::to_owned);
    if let Some(key) = &key {
        if s.account_by_key(key).is_some() {
            let message = format!("Account already exists for key {key}");
            return error(
                StatusCode::CONFLICT,
                "org.killbill.billing.account.api.AccountApiException",
                Some(3000),
                &message,
            );
        }
    }
    let account_id = s.id();
    let external_key = key.unwrap_or_else(|| account_id.clone());
    let currency = call.body["currency"].as_str().map(str::to_owned);
    let name = call.body["name"].as_str().map(str::to_owned);
    s.accounts.push(Account { id: account_id.clone(), external_key, name, currency, closed: None });
    created(s, &format!("/1.0/kb/accounts/{account_id}"))
}

/// `GET /1.0/kb/accounts?externalKey=`: 404/3003 for an unknown key; with its balance and credit
/// when asked.
fn account_by_key(s: &Fake, call: &Call) -> Response {
    let Some(key) = call.query.get("externalKey") else { return bad_request("externalKey needs to be set") };
    let Some(a) = s.account_by_key(key) else {
        return error(
            StatusCode::NOT_FOUND,
            "org.killbill.billing.account.api.AccountApiException",
            Some(3003),
            &format!("Account does not exist for key {key}"),
        );
    };
    json_ok(with_balance(s, a, call))
}

/// The account, with its balance and credit when the call asks for them.
fn with_balance(s: &Fake, a: &Account, call: &Call) -> Value {
    let mut account = account_json(a);
    if call.query.get("accountWithBalanceAndCBA").map(String::as_str) == Some("true") {
        let cba = s.credits.get(&a.id).copied().unwrap_or_default();
        account["accountCBA"] = decimal_json(cba);
        account["accountBalance"] = decimal_json(-cba);
    }
    account
}

/// `GET /1.0/kb/accounts/{id}/invoices`: the account's credit invoices, each with its `CBA_ADJ`
/// and `CREDIT_ADJ` items (`includeInvoiceComponents=true`), as the real server lists them. Not
/// reproduced: usage is never invoiced here (no invoice runs, no test clock), so an account's
/// only invoices are its credits'.
fn invoices(s: &Fake, account_id: &str, call: &Call) -> Value {
    let with_items = call.query.get("includeInvoiceComponents").map(String::as_str) == Some("true");
    let list: Vec<Value> = s
        .deposits
        .iter()
        .enumerate()
        .filter(|(_, d)| d.0 == account_id)
        .map(|(n, (account, invoice, cba_item, credit_item, amount, description))| {
            let items = if with_items {
                json!([
                    {"invoiceItemId": cba_item, "invoiceId": invoice, "accountId": account, "itemType": "CBA_ADJ",
                     "amount": decimal_json(*amount), "currency": "USD", "description": "Adjustment (account credit)",
                     "startDate": "2026-12-06", "endDate": "2026-12-06", "subscriptionId": null, "auditLogs": []},
                    {"invoiceItemId": credit_item, "invoiceId": invoice, "accountId": account, "itemType": "CREDIT_ADJ",
                     "amount": decimal_json(-*amount), "currency": "USD", "description": description,
                     "startDate": "2026-12-06", "endDate": "2026-12-06", "subscriptionId": null, "auditLogs": []},
                ])
            } else {
                json!([])
            };
            json!({"amount": 0.0, "currency": "USD", "status": "COMMITTED", "creditAdj": decimal_json(*amount),
                "refundAdj": 0.0, "invoiceId": invoice, "invoiceDate": "2026-12-06", "targetDate": "2026-12-06",
                "invoiceNumber": (n + 1).to_string(), "balance": 0.0, "accountId": account, "bundleKeys": null,
                "credits": null, "items": items, "trackingIds": [], "isParentInvoice": false,
                "parentInvoiceId": null, "parentAccountId": null, "auditLogs": []})
        })
        .collect();
    Value::Array(list)
}

/// `DELETE /1.0/kb/accounts/{id}`: closes the account (once).
fn close_account(s: &mut Fake, account: &str) -> Response {
    match s.accounts.iter_mut().find(|a| a.id == account) {
        Some(a) => {
            a.closed.get_or_insert_with(now);
            empty(StatusCode::NO_CONTENT)
        }
        None => not_found_object(account, "ACCOUNT"),
    }
}

/// `GET /1.0/kb/accounts/{id}/bundles`: a bundle per subscription, as the service creates them.
fn bundles(s: &Fake, account: &str) -> Response {
    if !s.accounts.iter().any(|a| a.id == account) {
        return not_found_object(account, "ACCOUNT");
    }
    let bundles: Vec<Value> = s
        .subscriptions
        .iter()
        .filter(|x| x.account_id == account)
        .map(|x| {
            json!({"accountId": account, "bundleId": x.bundle_id, "externalKey": x.external_key,
                "subscriptions": [subscription_json(x)], "timeline": null, "auditLogs": []})
        })
        .collect();
    json_ok(Value::Array(bundles))
}

/// `POST /1.0/kb/{accounts|subscriptions}/{id}/customFields`: 400/9000 for a field already there
/// with the same value.
fn add_fields(s: &mut Fake, kind: &str, object: &str, call: &Call) -> Response {
    let exists = if kind == "accounts" {
        s.accounts.iter().any(|a| a.id == object)
    } else {
        s.subscriptions.iter().any(|x| x.id == object)
    };
    if !exists {
        return not_found_object(object, if kind == "accounts" { "ACCOUNT" } else { "SUBSCRIPTION" });
    }
    let Some(items) = call.body.as_array() else { return bad_request("CustomFieldJson list needs to be set") };
    let mut new = Vec::new();
    for item in items {
        let (Some(name), Some(value)) = (item["name"].as_str(), item["value"].as_str()) else {
            return bad_request("CustomFieldJson name and value need to be set");
        };
        if name.is_empty() || value.is_empty() {
            return bad_request("CustomFieldJson name and value need to be set");
        }
        if s.fields.iter().any(|f| f.object_id == object && f.name == name && f.value == value) {
            return error(
                StatusCode::BAD_REQUEST,
                "org.killbill.billing.util.api.CustomFieldApiException",
                Some(9000),
                &format!("The custom field {name} already exists"),
            );
        }
        let object_type = if kind == "accounts" { "ACCOUNT" } else { "SUBSCRIPTION" };
        let id = s.id();
        new.push(Field { id, object_id: object.to_owned(), object_type, name: name.into(), value: value.into() });
    }
    s.fields.extend(new);
    created(s, &format!("/1.0/kb/{kind}/{object}/customFields"))
}

/// `GET /1.0/kb/{kind}/{id}/customFields`.
fn fields(s: &Fake, object: &str) -> Response {
    let fields: Vec<Value> = s.fields.iter().filter(|f| f.object_id == object).map(field_json).collect();
    json_ok(Value::Array(fields))
}

fn field_json(f: &Field) -> Value {
    json!({"customFieldId": f.id, "objectId": f.object_id, "objectType": f.object_type, "name": f.name, "value": f.value, "auditLogs": []})
}

/// `GET /1.0/kb/customFields/search/{key}`: every field of the tenant whose object id, object
/// type, name or value contains the key (case-sensitive), in the order made, a page at a time
/// (`offset`, `limit`, default 0 and 100), with KillBill's pagination headers; 200 with `[]`
/// when nothing matches. KillBill's `LIKE` wildcards (`%`, `_`) in the key are taken literally
/// here.
fn search_fields(s: &Fake, key: &str, call: &Call) -> Response {
    let number = |name: &str, default: usize| call.query.get(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    let (offset, limit) = (number("offset", 0), number("limit", 100));
    let matching: Vec<&Field> = s
        .fields
        .iter()
        .filter(|f| [f.object_id.as_str(), f.object_type, &f.name, &f.value].iter().any(|t| t.contains(key)))
        .collect();
    let page: Vec<Value> = matching.iter().skip(offset).take(limit).map(|f| field_json(f)).collect();
    let mut response = json_ok(Value::Array(page));
    let headers = response.headers_mut();
    let mut put = |name: &'static str, value: String| {
        headers.insert(name, value.parse().expect("a header value of digits and a path"));
    };
    put("X-Killbill-Pagination-CurrentOffset", offset.to_string());
    put("X-Killbill-Pagination-TotalNbRecords", matching.len().to_string());
    // KillBill counts every field of the tenant here.
    put("X-Killbill-Pagination-MaxNbRecords", s.fields.len().to_string());
    if offset + limit < matching.len() {
        let next = offset + limit;
        put("X-Killbill-Pagination-NextOffset", next.to_string());
        put(
            "X-Killbill-Pagination-NextPageUri",
            format!("/1.0/kb/customFields/search/{key}?offset={next}&limit={limit}&audit=NONE"),
        );
    }
    response
}

/// `POST /1.0/kb/subscriptions`: by plan name, in a bundle of its own; 400/1015 for an active
/// bundle key, a SQL error for a key taken by a cancelled one, 400/2021 for an unknown plan,
/// 400/6000 on a closed account.
fn create_subscription(s: &mut Fake, call: &Call) -> Response {
    let body = &call.body;
    let Some(account_id) = body["accountId"].as_str().map(str::to_owned) else {
        return bad_request("SubscriptionJson accountId needs to be set");
    };
    let plan = body["planName"].as_str().map(str::to_owned);
    let triplet = ["productName", "productCategory", "billingPeriod", "priceList"].map(|k| !body[k].is_null());
    let plan = match (plan, triplet.iter().any(|x| *x)) {
        (Some(_), true) => return bad_request(
            "SubscriptionJson productName, billingPeriod and priceList should not be set when planName is specified",
        ),
        (Some(plan), false) => plan,
        (None, _) => {
            return bad_request(
                "SubscriptionJson planName or productName, productCategory, billingPeriod and priceList need to be set",
            )
        }
    };
    let Some(account) = s.accounts.iter().find(|a| a.id == account_id) else {
        return not_found_object(&account_id, "ACCOUNT");
    };
    if !s.plans.contains(&plan) {
        return no_such_plan(&plan);
    }
    let start = parse_time(call.query.get("entitlementDate")).unwrap_or_else(now);
    if account.closed.is_some_and(|closed| start >= closed) {
        return blocked(&account_id);
    }
    let subscription_id = s.id();
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
    if s.subscription_by_key(&external_key).is_some() {
        // A cancelled bundle is renamed, then the subscription key's unique index fails.
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "java.sql.SQLIntegrityConstraintViolationException",
            None,
            "Duplicate entry for key 'subscriptions_external_key'",
        );
    }
    let bundle_id = s.id();
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

/// `GET /1.0/kb/subscriptions?externalKey=`: 404/1083 for an unknown key.
fn subscription_by_key(s: &Fake, call: &Call) -> Response {
    let Some(key) = call.query.get("externalKey") else { return bad_request("externalKey needs to be set") };
    match s.subscription_by_key(key) {
        Some(x) => json_ok(subscription_json(x)),
        None => error(
            StatusCode::NOT_FOUND,
            "org.killbill.billing.subscription.api.user.SubscriptionBaseApiException",
            Some(1083),
            &format!("Subscription with external key {key} does not exist"),
        ),
    }
}

/// `PUT /1.0/kb/subscriptions/{id}`: a plan change, refused with a date and a policy (400), for
/// an unknown plan (400/2021), a cancelled subscription or a closed account (400/6000), a date
/// before the start (500/1021) or before the last transition (400/1001).
fn change_plan(s: &mut Fake, sub: &str, call: &Call) -> Response {
    let q = &call.query;
    if q.contains_key("requestedDate") && q.contains_key("billingPolicy") {
        // SubscriptionResource: a Preconditions check, mapped to a 400 without a code.
        return bad_request("Only one of requestedDate or billingPolicy should be specified");
    }
    let Some(plan) = call.body["planName"].as_str().map(str::to_owned) else {
        return bad_request("SubscriptionJson planName needs to be set");
    };
    if !s.plans.contains(&plan) {
        return no_such_plan(&plan);
    }
    let at = parse_time(q.get("requestedDate")).unwrap_or_else(now);
    let Some(x) = s.subscriptions.iter().find(|x| x.id == sub) else {
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
    let x = s.subscriptions.iter_mut().find(|x| x.id == sub).unwrap();
    x.plan = plan;
    x.changes.push(at);
    empty(StatusCode::NO_CONTENT)
}

/// `DELETE /1.0/kb/subscriptions/{id}`: 500/1031 when already cancelled, 400/1001 for a date
/// before the last transition.
fn cancel(s: &mut Fake, sub: &str, call: &Call) -> Response {
    let at = if call.query.contains_key("entitlementPolicy") {
        // §1.8: with a policy the requested date is ignored.
        None
    } else {
        parse_time(call.query.get("requestedDate"))
    };
    match s.subscriptions.iter_mut().find(|x| x.id == sub) {
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

/// `POST /1.0/kb/usages`: Jetty's 400 for usage after the subscription's end, 400/50000 for a
/// trackingId already stored for the subscription.
fn record_usage(s: &mut Fake, call: &Call) -> Response {
    let body = &call.body;
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
            return (StatusCode::BAD_REQUEST, [("content-type", "application/json")], page.to_string()).into_response();
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
        s.usage.push(Usage { subscription_id: sub_id.clone(), tracking_id: tracking.clone(), unit, date, amount });
    }
    empty(StatusCode::CREATED)
}

/// `GET /1.0/kb/usages/{subscription}[/{unit}]`: the usage rolled up over the half-open window
/// `[startDate, endDate)`.
fn rolled_up_usage(s: &Fake, sub: &str, unit: Option<&str>, call: &Call) -> Response {
    let (Some(start), Some(end)) = (parse_time(call.query.get("startDate")), parse_time(call.query.get("endDate")))
    else {
        return bad_request("startDate and endDate need to be set");
    };
    let mut totals: BTreeMap<String, Decimal> = BTreeMap::new();
    for u in s.usage.iter().filter(|u| u.subscription_id == sub && u.date >= start && u.date < end) {
        if unit.is_none_or(|unit| unit == u.unit) {
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

/// `POST /1.0/kb/credits`.
fn credit(s: &mut Fake, call: &Call) -> Response {
    // §1.11: only the first item is checked; 200 with the created items.
    let Some(first) = call.body.as_array().and_then(|a| a.first()) else {
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
    let item_id = s.id();
    let (invoice, cba_item) = (s.id(), s.id());
    let description = first["description"].as_str().unwrap_or_default().to_owned();
    s.deposits.push((account_id.to_owned(), invoice, cba_item, item_id.clone(), amount, description));
    json_ok(json!([{"invoiceItemId": item_id, "accountId": account_id, "itemType": "CREDIT_ADJ",
        "amount": decimal_json(amount), "currency": "USD", "auditLogs": []}]))
}

/// `POST /1.0/kb/invoices/dryRun`: the usage at the test's prices, an item per subscription and
/// unit, 204 when nothing is due. Not reproduced: KillBill's `UPCOMING_INVOICE` ignores the
/// target date and invoices up to the account's next bill cycle day (its `targetDate` says
/// which), lists an item for every unit of the plan (zero ones too), and rounds each item to
/// cents.
fn dry_run(s: &Fake, call: &Call) -> Response {
    let Some(account_id) = call.query.get("accountId").cloned() else {
        return bad_request("accountId needs to be set");
    };
    if !s.accounts.iter().any(|a| a.id == account_id) {
        return not_found_object(&account_id, "ACCOUNT");
    }
    if call.body["dryRunType"].as_str().is_none() {
        return bad_request("InvoiceDryRunJson dryRunType needs to be set");
    }
    let amount = s.upcoming(&account_id);
    if amount.is_zero() {
        // §1.10: nothing to invoice is a 204 with an empty body.
        return empty(StatusCode::NO_CONTENT);
    }
    let invoice_id = "00000000-0000-4000-8000-00000000dddd";
    // A USAGE item per subscription and unit, as KillBill 0.22.26 renders them: the usage
    // section's name, no quantity, and the unit's tier in `itemDetails` (a JSON string).
    let items: Vec<Value> = s
        .upcoming_items(&account_id)
        .into_iter()
        .enumerate()
        .map(|(n, (sub, unit, quantity, amount))| {
            let usage = format!("{}-usage", sub.plan);
            let price = s.prices.get(&unit).copied().unwrap_or_default();
            let details = json!({"tierDetails": [{"tier": 1, "tierUnit": unit, "tierPrice": decimal_json(price),
                "tierBlockSize": 1, "quantity": decimal_json(quantity), "amount": decimal_json(amount)}],
                "amount": decimal_json(amount)});
            json!({"invoiceItemId": format!("00000000-0000-4000-8000-0000000e{n:04x}"), "invoiceId": invoice_id,
                "linkedInvoiceItemId": null, "accountId": account_id, "childAccountId": null,
                "bundleId": sub.bundle_id, "subscriptionId": sub.id, "productName": "Instance",
                "planName": sub.plan, "phaseName": format!("{}-evergreen", sub.plan), "usageName": usage,
                "prettyProductName": null, "prettyPlanName": null, "prettyPhaseName": null,
                "prettyUsageName": null, "itemType": "USAGE", "description": usage,
                "startDate": call.query.get("targetDate"), "endDate": call.query.get("targetDate"),
                "amount": decimal_json(amount), "rate": null, "currency": "USD", "quantity": null,
                "itemDetails": details.to_string(), "catalogEffectiveDate": null, "childItems": null,
                "auditLogs": []})
        })
        .collect();
    // A dry run's invoice is COMMITTED (never saved, so it has no number).
    json_ok(json!({"amount": decimal_json(amount), "currency": "USD", "status": "COMMITTED", "creditAdj": 0,
        "refundAdj": 0, "invoiceId": invoice_id, "invoiceDate": "2025-01-31",
        "targetDate": call.query.get("targetDate"), "invoiceNumber": null, "balance": decimal_json(amount),
        "accountId": account_id, "bundleKeys": null, "credits": null, "items": items, "trackingIds": [], "auditLogs": []}))
}

/// KillBill's JSON error body; the code is also kept on the response for counting.
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

fn empty(status: StatusCode) -> Response {
    status.into_response()
}

fn json_ok(value: Value) -> Response {
    (StatusCode::OK, [("content-type", "application/json")], value.to_string()).into_response()
}

/// A create's 201: no body, an absolute `Location`.
fn created(s: &Fake, path: &str) -> Response {
    (StatusCode::CREATED, [("location", format!("{}{path}", s.base))]).into_response()
}

fn kb_time(t: Timestamp) -> String {
    let text = t.to_rfc3339();
    // RFC 3339 from the ledger type; KillBill always writes milliseconds.
    match text.split_once('.') {
        Some((head, _)) => format!("{head}.{:03}Z", t.as_offset().millisecond()),
        None => format!("{}.000Z", text.trim_end_matches('Z')),
    }
}

fn decimal_json(d: Decimal) -> Value {
    serde_json::from_str(&d.normalize().to_string()).unwrap()
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

fn account_json(a: &Account) -> Value {
    json!({
        "accountId": a.id, "name": a.name, "firstNameLength": null, "externalKey": a.external_key,
        "email": null, "billCycleDayLocal": 0, "currency": a.currency, "parentAccountId": null,
        "isPaymentDelegatedToParent": false, "paymentMethodId": null, "referenceTime": "2025-01-01T00:00:00.000Z",
        "timeZone": "UTC", "address1": null, "address2": null, "postalCode": null, "company": null, "city": null,
        "state": null, "country": null, "locale": null, "phone": null, "notes": null, "isMigrated": null,
        "accountBalance": null, "accountCBA": null, "auditLogs": [],
    })
}
