//! The fake KillBill kept honest: one scripted sequence of requests, covering every call
//! `src/billing/killbill.rs` makes and the error cases the client relies on, is sent to the real
//! server (a fresh tenant) and to the fake, and every answer's status and KillBill error code
//! must be the same. Where they differ, the fake is wrong.

use concertim_billing::{billing::killbill::CATALOG_XML, config::KillBillSettings};
use reqwest::Method;
use serde_json::{json, Value};

use crate::support::{
    killbill::FakeKillBill,
    killbill_server::{authed, real_url, unique, RealKillBill},
};

/// One request of the script. `{name}` in the path, query or body is replaced by an id captured
/// earlier from a `Location` header (`capture`), or by the run's own keys (`{p}`, `{i}`, `{j}`).
struct Step {
    what: &'static str,
    method: Method,
    path: &'static str,
    body: Option<Value>,
    capture: Option<&'static str>,
}

fn step(what: &'static str, method: Method, path: &'static str, body: Option<Value>) -> Step {
    Step { what, method, path, body, capture: None }
}

fn capturing(mut s: Step, name: &'static str) -> Step {
    s.capture = Some(name);
    s
}

/// The script: what the client sends, in the dialect of the server the suite runs (0.22: days).
fn script() -> Vec<Step> {
    let account = json!({"externalKey": "{p}", "name": "{p}", "currency": "USD"});
    let sub = |key: &str, plan: &str| json!({"accountId": "{account}", "externalKey": key, "bundleExternalKey": key, "planName": plan});
    let usage = |tracking: &str, unit: &str, day: &str| {
        json!({"subscriptionId": "{sub}", "trackingId": tracking,
               "unitUsageRecords": [{"unitType": unit, "usageRecords": [{"recordDate": day, "amount": 10}]}]})
    };
    let field = json!([{"name": "openstack_project_id", "value": "{p}"}]);
    let plan = |name: &str| json!({"planName": name});
    vec![
        capturing(step("create an account", Method::POST, "/1.0/kb/accounts", Some(account.clone())), "account"),
        step("create it again", Method::POST, "/1.0/kb/accounts", Some(account)),
        step("find it by key", Method::GET, "/1.0/kb/accounts?externalKey={p}", None),
        step("find an unknown key", Method::GET, "/1.0/kb/accounts?externalKey={p}-none", None),
        step(
            "dry-run the upcoming invoice of an account with nothing due",
            Method::POST,
            "/1.0/kb/invoices/dryRun?accountId={account}&targetDate=2025-03-31",
            Some(json!({"dryRunType": "UPCOMING_INVOICE"})),
        ),
        step("read the bundles of an account with none", Method::GET, "/1.0/kb/accounts/{account}/bundles", None),
        step("add a custom field", Method::POST, "/1.0/kb/accounts/{account}/customFields", Some(field.clone())),
        step("add the same field again", Method::POST, "/1.0/kb/accounts/{account}/customFields", Some(field)),
        step("read the fields", Method::GET, "/1.0/kb/accounts/{account}/customFields", None),
        capturing(
            step(
                "create an account as the Python service did (no externalKey)",
                Method::POST,
                "/1.0/kb/accounts",
                Some(json!({"name": "team {p}", "email": null, "billCycleDayLocal": 31, "currency": "USD"})),
            ),
            "python",
        ),
        step("find it by its own id as key", Method::GET, "/1.0/kb/accounts?externalKey={python}", None),
        step(
            "add the Python service's project field",
            Method::POST,
            "/1.0/kb/accounts/{python}/customFields",
            Some(json!([{"name": "project_cloud_id", "value": "{p}"}])),
        ),
        step("search the fields carrying the project id", Method::GET, "/1.0/kb/customFields/search/{p}", None),
        step(
            "search them a page of one at a time",
            Method::GET,
            "/1.0/kb/customFields/search/{p}?offset=1&limit=1",
            None,
        ),
        step("search by a field's name", Method::GET, "/1.0/kb/customFields/search/project_cloud_id", None),
        step("search a key nothing carries", Method::GET, "/1.0/kb/customFields/search/{p}-none", None),
        step(
            "subscribe on an unknown plan",
            Method::POST,
            "/1.0/kb/subscriptions?entitlementDate=2025-03-03&billingDate=2025-03-03",
            Some(sub("{i}", "openstack-no-such-plan")),
        ),
        capturing(
            step(
                "subscribe",
                Method::POST,
                "/1.0/kb/subscriptions?entitlementDate=2025-03-03&billingDate=2025-03-03",
                Some(sub("{i}", "openstack-standard-monthly")),
            ),
            "sub",
        ),
        step(
            "subscribe the same key again (a retried create)",
            Method::POST,
            "/1.0/kb/subscriptions?entitlementDate=2025-03-03&billingDate=2025-03-03",
            Some(sub("{i}", "openstack-standard-monthly")),
        ),
        capturing(
            step(
                "subscribe a second instance",
                Method::POST,
                "/1.0/kb/subscriptions?entitlementDate=2025-03-03&billingDate=2025-03-03",
                Some(sub("{j}", "openstack-standard-monthly")),
            ),
            "sub2",
        ),
        step("find the subscription by key", Method::GET, "/1.0/kb/subscriptions?externalKey={i}", None),
        step("find an unknown subscription key", Method::GET, "/1.0/kb/subscriptions?externalKey={i}-none", None),
        step("read the subscription", Method::GET, "/1.0/kb/subscriptions/{sub}", None),
        step(
            "change plan with a date and a policy",
            Method::PUT,
            "/1.0/kb/subscriptions/{sub}?requestedDate=2025-03-04&billingPolicy=IMMEDIATE",
            Some(plan("openstack-large-monthly")),
        ),
        step(
            "change plan dated before the start",
            Method::PUT,
            "/1.0/kb/subscriptions/{sub}?requestedDate=2025-03-01",
            Some(plan("openstack-large-monthly")),
        ),
        step(
            "change plan to an unknown plan",
            Method::PUT,
            "/1.0/kb/subscriptions/{sub}?requestedDate=2025-03-04",
            Some(plan("openstack-no-such-plan")),
        ),
        step(
            "change plan with the date alone",
            Method::PUT,
            "/1.0/kb/subscriptions/{sub}?requestedDate=2025-03-04",
            Some(plan("openstack-large-monthly")),
        ),
        step("record usage", Method::POST, "/1.0/kb/usages", Some(usage("u1", "openstack-billed-vcpus", "2025-03-04"))),
        step(
            "record it again",
            Method::POST,
            "/1.0/kb/usages",
            Some(usage("u1", "openstack-billed-vcpus", "2025-03-04")),
        ),
        step(
            "record usage in a unit the catalog lacks",
            Method::POST,
            "/1.0/kb/usages",
            Some(usage("u2", "openstack-no-such-unit", "2025-03-04")),
        ),
        step(
            "record usage dated before the start",
            Method::POST,
            "/1.0/kb/usages",
            Some(usage("u3", "openstack-billed-vcpus", "2025-03-01")),
        ),
        step("read usage without an end date", Method::GET, "/1.0/kb/usages/{sub}?startDate=2025-03-01", None),
        step("read usage", Method::GET, "/1.0/kb/usages/{sub}?startDate=2025-03-01&endDate=2025-04-01", None),
        step(
            "cancel dated before the start",
            Method::DELETE,
            "/1.0/kb/subscriptions/{sub}?requestedDate=2025-03-01&useRequestedDateForBilling=true",
            None,
        ),
        step(
            "cancel",
            Method::DELETE,
            "/1.0/kb/subscriptions/{sub}?requestedDate=2025-03-05&useRequestedDateForBilling=true",
            None,
        ),
        step(
            "cancel again",
            Method::DELETE,
            "/1.0/kb/subscriptions/{sub}?requestedDate=2025-03-05&useRequestedDateForBilling=true",
            None,
        ),
        step(
            "change the plan of a cancelled subscription",
            Method::PUT,
            "/1.0/kb/subscriptions/{sub}?requestedDate=2025-03-06",
            Some(plan("openstack-compute-monthly")),
        ),
        step(
            "record usage dated after the end",
            Method::POST,
            "/1.0/kb/usages",
            Some(usage("u4", "openstack-billed-vcpus", "2025-03-10")),
        ),
        step(
            "record usage on the end's day",
            Method::POST,
            "/1.0/kb/usages",
            Some(usage("u5", "openstack-billed-vcpus", "2025-03-05")),
        ),
        step("read the account's bundles", Method::GET, "/1.0/kb/accounts/{account}/bundles", None),
        step("close the account", Method::DELETE, "/1.0/kb/accounts/{account}", None),
        step(
            "change plan on the closed account",
            Method::PUT,
            "/1.0/kb/subscriptions/{sub2}?requestedDate=2099-01-01",
            Some(plan("openstack-large-monthly")),
        ),
        step(
            "read an unknown subscription id",
            Method::GET,
            "/1.0/kb/subscriptions/00000000-0000-4000-8000-000000000000",
            None,
        ),
    ]
}

/// An answer reduced to what must match: the status, KillBill's error code, whether the body
/// was empty, and how many elements a JSON array body has (the search's hits; a list of
/// fields, bundles or invoices).
#[derive(Debug, PartialEq, Eq)]
struct Reduced {
    status: u16,
    code: Option<i64>,
    empty: bool,
    items: Option<usize>,
}

async fn run(settings: &KillBillSettings, keys: &[(&str, String)]) -> Vec<(String, Reduced)> {
    let http = reqwest::Client::new();
    let mut names: Vec<(String, String)> = keys.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let fill = |text: &str, names: &[(String, String)]| {
        names.iter().fold(text.to_owned(), |t, (name, value)| t.replace(&format!("{{{name}}}"), value))
    };
    let mut answers = Vec::new();
    for s in script() {
        let path = fill(s.path, &names);
        let mut request = authed(&http, settings, s.method.clone(), &path);
        if let Some(body) = &s.body {
            request = request.header("Content-Type", "application/json").body(fill(&body.to_string(), &names));
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let location = response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = response.text().await.unwrap();
        if let (Some(name), Some(location)) = (s.capture, location) {
            names.push((name.to_owned(), location.rsplit('/').next().unwrap().to_owned()));
        }
        let json = serde_json::from_str::<Value>(&text).ok();
        let code = json.as_ref().and_then(|v| v["code"].as_i64());
        let items = json.as_ref().and_then(Value::as_array).map(Vec::len);
        let excerpt: String = text.chars().take(160).collect();
        let reduced = Reduced { status, code, empty: text.trim().is_empty(), items };
        answers.push((format!("{} ({excerpt})", s.what), reduced));
    }
    answers
}

#[tokio::test]
async fn the_fake_answers_every_scripted_request_as_the_real_killbill_does() {
    let Some(url) = real_url() else {
        eprintln!(
            "skipped: no real KillBill ({}); deploy/dev/test.sh starts one",
            crate::support::killbill_server::URL_VAR
        );
        return;
    };
    let real = RealKillBill::start(&url).await;
    let fake = FakeKillBill::start().await;
    let keys = |tag: &str| vec![("p", unique(tag)), ("i", unique("i")), ("j", unique("j"))];
    let from_real = run(&real.settings(), &keys("p")).await;
    let from_fake = run(&fake.settings(), &keys("p")).await;
    let differences: Vec<String> = from_real
        .iter()
        .zip(&from_fake)
        .filter(|(r, f)| r.1 != f.1)
        .map(|(r, f)| format!("{}: real {:?}, fake {:?}", r.0, r.1, f.1))
        .collect();
    assert!(differences.is_empty(), "the fake differs from the real KillBill:\n{}", differences.join("\n"));
    // The catalog too: a second upload of the same version is refused alike.
    let upload = |settings: KillBillSettings| async move {
        let answer = authed(&reqwest::Client::new(), &settings, Method::POST, "/1.0/kb/catalog/xml")
            .header("Content-Type", "text/xml")
            .body(CATALOG_XML)
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        let code = serde_json::from_str::<Value>(&answer.text().await.unwrap()).ok().and_then(|v| v["code"].as_i64());
        (status, code)
    };
    assert_eq!(upload(real.settings()).await, upload(fake.settings()).await);
    for (what, answer) in &from_real {
        println!("{what}: {answer:?}");
    }
}
