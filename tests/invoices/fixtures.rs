//! The bundled fixtures, invoiced.

use std::collections::BTreeMap;

use concertim_billing::{
    billing::{Billing, Ledger},
    event::Timestamp,
    executor::Executor,
    fixture::FixtureDelivery,
    price::Catalog,
    settle::Horizon,
};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::Value;

use crate::{
    helpers::{catalog_prices, decimal, set_clock, CLOCK},
    support::{
        assert_no_failures, billable,
        killbill_server::{real_url, RealKillBill},
        run_through,
    },
};

#[tokio::test]
async fn the_fixture_lifecycles_are_invoiced_as_the_ledger_prices_them() {
    // real_url() fails the test when CONCERTIM_BILLING_REQUIRE_KILLBILL is set (CI).
    let Some(url) = real_url() else {
        eprintln!("skipped: no real KillBill (CONCERTIM_BILLING_KILLBILL_URL); deploy/dev/test.sh starts one");
        return;
    };
    let _clock = CLOCK.lock().await;
    let real = RealKillBill::start(&url).await;
    // After the fixtures' last notification (2025-03-09 10:00), so every date they carry is past.
    set_clock(&real, Some("2025-03-10T00:00:00.000Z")).await;
    let all = billable();
    let fixtures: Vec<&FixtureDelivery> = all.iter().collect();
    let mut settings = real.settings();
    settings.server_version = concertim_billing::config::KillBillVersion::V0_22;
    let (executor, outcomes) =
        run_through(concertim_billing::billing::KillBill::new(settings).unwrap(), &fixtures).await;
    assert_no_failures(&outcomes);
    // Instance time is billed by the settlement, the running instances up to the clock.
    settle(&executor).await;
    // Past every account's billing day (the 3rd to the 8th, from each first subscription's
    // start day): every usage period of March is invoiced.
    set_clock(&real, Some("2025-04-10T00:00:00.000Z")).await;
    let prices = catalog_prices();
    let mut invoiced: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    let mut money: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    let mut items = 0;
    let accounts = real.get("/1.0/kb/accounts/pagination?offset=0&limit=1000").await;
    for account in accounts.as_array().unwrap() {
        let id = account["accountId"].as_str().unwrap();
        let invoices = real.get(&format!("/1.0/kb/accounts/{id}/invoices?withItems=true")).await;
        for invoice in invoices.as_array().unwrap() {
            let mut total = Decimal::ZERO;
            for item in invoice["items"].as_array().unwrap().iter().filter(|i| i["itemType"] == "USAGE") {
                items += 1;
                let plan = item["planName"].as_str().unwrap();
                let sub =
                    real.get(&format!("/1.0/kb/subscriptions/{}", item["subscriptionId"].as_str().unwrap())).await;
                let instance = sub["externalKey"].as_str().unwrap().to_owned();
                let details: Value = serde_json::from_str(item["itemDetails"].as_str().unwrap()).unwrap();
                let mut exact = Decimal::ZERO;
                for tier in details["tierDetails"].as_array().unwrap() {
                    let unit = tier["tierUnit"].as_str().unwrap().to_owned();
                    let quantity = decimal(&tier["quantity"]);
                    let price = prices[&(plan.to_owned(), unit.clone())];
                    // The catalog's price, times the quantity, exactly.
                    assert_eq!(decimal(&tier["tierPrice"]), price, "{plan} {unit}");
                    assert_eq!(decimal(&tier["amount"]), quantity * price, "{instance} {unit}: {quantity} × {price}");
                    exact += quantity * price;
                    *invoiced.entry((instance.clone(), unit)).or_default() += quantity;
                }
                // One rounding per item, to the currency's cents, half up.
                let amount = decimal(&item["amount"]);
                assert_eq!(
                    amount,
                    exact.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero),
                    "{instance}"
                );
                total += amount;
                *money.entry((instance, plan.to_owned())).or_default() += amount;
            }
            assert_eq!(decimal(&invoice["amount"]), total, "invoice {}", invoice["invoiceNumber"]);
        }
    }
    set_clock(&real, None).await;
    assert!(items > 0, "KillBill invoiced nothing");
    // Every quantity the ledger bills was invoiced, and nothing else: the deleted project's
    // instance too, whose account was left open (closed, KillBill would never invoice it).
    let (ledger, _) = run_through(Ledger::in_memory(), &fixtures).await;
    settle(&ledger).await;
    let ledger_costs = ledger.billing();
    let ledger = ledger.billing().snapshot();
    let expected: BTreeMap<(String, String), Decimal> =
        ledger.usage.iter().map(|u| ((u.instance_id.to_string(), u.unit.to_string()), u.amount)).collect();
    invoiced.retain(|_, quantity| !quantity.is_zero());
    assert!(!expected.is_empty(), "the ledger bills nothing: the comparison would prove nothing");
    assert_eq!(invoiced, expected);
    // And what the ledger says it costs is what KillBill invoiced, item by item, to the cent.
    let catalog = Catalog::bundled().unwrap();
    let mut priced: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    for cost in ledger_costs.costs(catalog) {
        *priced.entry((cost.resource.to_string(), cost.item.plan.clone())).or_default() += cost.item.amount;
    }
    money.retain(|_, amount| !amount.is_zero());
    priced.retain(|_, amount| !amount.is_zero());
    eprintln!("the fixtures cost {} USD", priced.values().sum::<Decimal>());
    assert!(!priced.is_empty(), "the fixtures cost nothing: the comparison would prove nothing");
    assert_eq!(money, priced);
}

/// Settles everything up to the clock (2025-03-10), as `replay` would.
async fn settle<B: Billing>(executor: &Executor<B>) {
    let as_of = Timestamp::parse("2025-03-10T00:00:00Z").unwrap().unix();
    let pass = executor.settler().await.unwrap().pass(Horizon::AsOf(as_of)).await.unwrap();
    assert!(pass.failures.is_empty(), "{:?}", pass.failures);
}
