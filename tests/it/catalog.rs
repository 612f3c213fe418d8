//! The bundled KillBill catalog on a server that has the previous version: what
//! `killbill bootstrap` uploads, and (on the real server) that the subscriptions which started
//! under the previous version are invoiced in the new units. Runs against the real KillBill
//! when `CONCERTIM_BILLING_KILLBILL_URL` names one, else against the fake, which keeps the
//! catalog versions but does not invoice.

use std::{collections::BTreeMap, time::Duration};

use concertim_billing::{
    billing::{
        killbill::{catalog_effective_dates, Bootstrapped, CATALOG_XML},
        KillBill,
    },
    config::KillBillSettings,
};
use reqwest::{Method, RequestBuilder};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::support::{
    killbill::FakeKillBill,
    killbill_server::{real_url, unique, RealKillBill},
    wait::eventually,
};

/// The version `deploy/killbill/catalog.xml` held before the time units (effectiveDate
/// 2025-01-01), which servers bootstrapped by earlier releases have.
const PREVIOUS_CATALOG: &str = include_str!("../support/killbill/catalog-2025-01-01.xml");

/// A request on the tenant of `settings`, as a tenant's client sends it.
fn request(http: &reqwest::Client, settings: &KillBillSettings, method: Method, path: &str) -> RequestBuilder {
    http.request(method, format!("{}{path}", settings.url.trim_end_matches('/')))
        .basic_auth(&settings.username, Some(settings.password.expose()))
        .header("X-Killbill-ApiKey", &settings.api_key)
        .header("X-Killbill-ApiSecret", settings.api_secret.expose())
        .header("X-Killbill-CreatedBy", "concertim-billing-tests")
}

/// Sends, expects `status`, and answers the body.
async fn expect(request: RequestBuilder, status: u16, what: &str) -> reqwest::Response {
    let response = request.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    if response.status().as_u16() != status {
        let got = response.status();
        panic!("{what}: expected {status}, got {got}: {}", response.text().await.unwrap_or_default());
    }
    response
}

/// The id at the end of a create's `Location`.
fn created_id(response: &reqwest::Response) -> String {
    let location = response.headers()["location"].to_str().unwrap();
    location.rsplit('/').next().unwrap().to_owned()
}

/// A JSON number as a decimal: KillBill writes small prices in exponent form (`1.0E-5`).
fn decimal(v: &Value) -> Decimal {
    let text = v.to_string();
    text.parse().or_else(|_| Decimal::from_scientific(&text)).unwrap_or_else(|_| panic!("{v} is not a decimal"))
}

/// The 1st of the month after `date`'s.
fn next_first(date: time::Date) -> time::Date {
    let year = if date.month() == time::Month::December { date.year() + 1 } else { date.year() };
    time::Date::from_calendar_date(year, date.month().next(), 1).unwrap()
}

/// The price of `unit` on `plan` in the bundled catalog.
fn catalog_price(plan: &str, unit: &str) -> Decimal {
    let plan = CATALOG_XML.split(&format!("<plan name=\"{plan}\">")).nth(1).unwrap().split("</plan>").next().unwrap();
    let block = plan.split("<tieredBlock>").find(|b| b.contains(&format!("<unit>{unit}</unit>"))).unwrap();
    block.split("<value>").nth(1).unwrap().split("</value>").next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn bootstrap_brings_a_server_with_the_previous_catalog_to_this_one_and_then_changes_nothing() {
    // A tenant as an earlier release's bootstrap left it: the previous version only.
    let (settings, fake) = match real_url() {
        Some(url) => {
            let mut settings = RealKillBill::settings_for(&url);
            settings.api_key = unique("upgrade");
            (settings, None)
        }
        None => {
            let fake = FakeKillBill::start_empty().await;
            (fake.settings(), Some(fake))
        }
    };
    let kb = KillBill::new(settings.clone()).unwrap();
    let before = kb.bootstrap(PREVIOUS_CATALOG, "tests").await.unwrap();
    assert_eq!(before, Bootstrapped { tenant_created: true, catalog_uploaded: true });
    let http = reqwest::Client::new();
    // An instance billed since before this version (real server only: the fake does not invoice).
    let existing = if fake.is_some() { None } else { Some(subscribe_before_this_version(&http, &settings).await) };

    let upgraded = kb.bootstrap(CATALOG_XML, "tests").await.unwrap();
    let again = kb.bootstrap(CATALOG_XML, "tests").await.unwrap();

    assert_eq!(upgraded, Bootstrapped { tenant_created: false, catalog_uploaded: true });
    assert_eq!(again, Bootstrapped { tenant_created: false, catalog_uploaded: false });
    let served = expect(
        request(&http, &settings, Method::GET, "/1.0/kb/catalog/xml").header("Accept", "text/xml"),
        200,
        "read the catalog",
    )
    .await
    .text()
    .await
    .unwrap();
    let mut versions = catalog_effective_dates(&served);
    versions.sort();
    let expected = [catalog_effective_dates(PREVIOUS_CATALOG)[0], catalog_effective_dates(CATALOG_XML)[0]];
    assert_eq!(versions, expected, "the versions the server holds: {served}");
    if let Some(fake) = fake {
        assert_eq!(fake.catalogs(), [PREVIOUS_CATALOG, CATALOG_XML]);
    }
    if let Some((account, subscription)) = existing {
        invoices_the_time_units_of_a_subscription_older_than_this_version(&http, &settings, &account, &subscription)
            .await;
    }
}

/// An account and a subscription that started on 2025-12-01, under the previous version:
/// (account id, subscription id).
async fn subscribe_before_this_version(http: &reqwest::Client, settings: &KillBillSettings) -> (String, String) {
    let body = json!({"externalKey": unique("project"), "currency": "USD", "name": "catalog upgrade"});
    let answer =
        expect(request(http, settings, Method::POST, "/1.0/kb/accounts").json(&body), 201, "create account").await;
    let account = created_id(&answer);
    let key = unique("instance");
    let body = json!({
        "accountId": account,
        "externalKey": key,
        "bundleExternalKey": key,
        "planName": "openstack-standard-monthly",
    });
    let path = "/1.0/kb/subscriptions?entitlementDate=2025-12-01&billingDate=2025-12-01";
    let answer = expect(request(http, settings, Method::POST, path).json(&body), 201, "create subscription").await;
    (account, created_id(&answer))
}

/// Usage recorded today in the time units and in a previous unit, on a subscription that
/// started under the previous version, is in the invoice of the current period at this
/// version's prices. Without `effectiveDateForExistingSubscriptions` on its plan, KillBill
/// would keep the subscription on the previous version and silently leave the time units out.
async fn invoices_the_time_units_of_a_subscription_older_than_this_version(
    http: &reqwest::Client,
    settings: &KillBillSettings,
    account: &str,
    subscription: &str,
) {
    // The server's own day (its clock may have been moved by another test), as KillBill
    // invoices by it.
    let clock: Value = expect(request(http, settings, Method::GET, "/1.0/kb/test/clock"), 200, "read the clock")
        .await
        .json()
        .await
        .unwrap();
    let today = clock["localDate"].as_str().unwrap().to_owned();
    // One hour of an instance with 2 vCPUs, 2 GiB of RAM and 20 GiB of disk, in whole
    // unit-seconds (KillBill 0.22 keeps usage amounts as whole numbers), plus 30 units of the
    // previous kind.
    let posted: BTreeMap<&str, u64> = BTreeMap::from([
        ("openstack-instance-seconds", 3_600),
        ("openstack-vcpu-seconds", 7_200),
        ("openstack-memory-gib-seconds", 7_200),
        ("openstack-disk-gib-seconds", 72_000),
        ("openstack-billed-vcpus", 30),
    ]);
    let records: Vec<Value> = posted
        .iter()
        .map(|(unit, amount)| json!({"unitType": unit, "usageRecords": [{"recordDate": today, "amount": amount}]}))
        .collect();
    let body = json!({"subscriptionId": subscription, "trackingId": unique("hour"), "unitUsageRecords": records});
    expect(request(http, settings, Method::POST, "/1.0/kb/usages").json(&body), 201, "record usage").await;

    // The account's bill cycle day is the 1st (its subscription started on a 1st). Creating a
    // subscription in the past makes KillBill invoice each past period in the background, and a
    // dry run answers from a half-invoiced account meanwhile: wait until every period since the
    // subscription started is invoiced (target dates 2026-01-01 … the 1st of this month).
    let day = time::Date::parse(&today, time::macros::format_description!("[year]-[month]-[day]")).unwrap();
    let mut past = Vec::new();
    let mut period = time::macros::date!(2026 - 01 - 01);
    while period <= day {
        past.push(period.to_string());
        period = next_first(period);
    }
    let path = format!("/1.0/kb/accounts/{account}/invoices");
    eventually(&format!("KillBill to invoice account {account} for {past:?}"), Duration::from_secs(120), || {
        let request = request(http, settings, Method::GET, &path);
        let past = &past;
        async move {
            let invoices: Value = request.send().await.ok()?.json().await.ok()?;
            let invoiced: Vec<&str> = invoices.as_array()?.iter().filter_map(|i| i["targetDate"].as_str()).collect();
            past.iter().all(|p| invoiced.contains(&p.as_str())).then_some(())
        }
    })
    .await;
    // The current period's invoice: KillBill's dry run answers the invoice of the last billing
    // day up to its target date.
    let target = next_first(day);
    let path = format!("/1.0/kb/invoices/dryRun?accountId={account}&targetDate={target}");
    let invoice: Value = expect(
        request(http, settings, Method::POST, &path).json(&json!({"dryRunType": "TARGET_DATE"})),
        200,
        "dry-run the invoice",
    )
    .await
    .json()
    .await
    .unwrap();
    let mut invoiced: BTreeMap<String, Decimal> = BTreeMap::new();
    for item in invoice["items"].as_array().unwrap().iter().filter(|i| i["itemType"] == "USAGE") {
        let details: Value = serde_json::from_str(item["itemDetails"].as_str().unwrap()).unwrap();
        for tier in details["tierDetails"].as_array().unwrap() {
            let quantity = decimal(&tier["quantity"]);
            if quantity.is_zero() {
                continue;
            }
            let unit = tier["tierUnit"].as_str().unwrap().to_owned();
            let price = catalog_price("openstack-standard-monthly", &unit);
            assert_eq!(decimal(&tier["tierPrice"]), price, "{unit}: this version's price");
            assert_eq!(decimal(&tier["amount"]), quantity * price, "{unit}: {quantity} × {price}");
            *invoiced.entry(unit).or_default() += quantity;
        }
    }
    let posted: BTreeMap<String, Decimal> = posted.into_iter().map(|(u, a)| (u.to_owned(), Decimal::from(a))).collect();
    assert_eq!(invoiced, posted, "invoice {invoice}");
}
