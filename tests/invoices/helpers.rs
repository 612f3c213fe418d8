//! What the invoice tests share: the server's one test clock, and the catalog's prices.

use std::collections::BTreeMap;

use concertim_billing::{
    billing::{killbill::CATALOG_XML, KillBill},
    config::Settings,
    event::Timestamp,
    executor::{Delivery, Executor, Outcome},
    settle::Horizon,
};
use rust_decimal::Decimal;
use serde_json::Value;

use crate::support::{assert_no_failures, killbill_server::RealKillBill};

/// The catalog's price of each (plan, unit), read from the bundled catalog file.
pub fn catalog_prices() -> BTreeMap<(String, String), Decimal> {
    let mut prices = BTreeMap::new();
    for plan in CATALOG_XML.split("<plan name=\"").skip(1) {
        let name = plan.split('"').next().unwrap().to_owned();
        for block in plan.split("<tieredBlock>").skip(1) {
            let unit = block.split("<unit>").nth(1).unwrap().split("</unit>").next().unwrap();
            let value = block.split("<value>").nth(1).unwrap().split("</value>").next().unwrap();
            prices.insert((name.clone(), unit.to_owned()), value.parse().unwrap());
        }
    }
    prices
}

/// A JSON number (or numeric string) as the decimal it is.
pub fn decimal(v: &Value) -> Decimal {
    v.to_string().parse().unwrap_or_else(|_| panic!("{v} is not a decimal"))
}

/// One test at a time moves the server's clock.
pub static CLOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Moves KillBill's test clock to `to` (`None`: back to the real time); KillBill 0.22 moves it
/// with a POST, and answers once the notifications due meanwhile (the invoices) have run.
pub async fn set_clock(real: &RealKillBill, to: Option<&str>) -> Value {
    let path = match to {
        Some(to) => format!("/1.0/kb/test/clock?requestedDate={to}"),
        None => "/1.0/kb/test/clock".to_owned(),
    };
    let (status, body) = real.call(reqwest::Method::POST, &path, None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// One USAGE item as KillBill invoiced it.
#[derive(Debug)]
pub struct Item {
    /// The subscription's external key: the resource id.
    pub resource: String,
    /// The item's plan.
    pub plan: String,
    /// Its interval.
    pub from: String,
    /// Its interval's end.
    pub to: String,
    /// Its amount, in USD.
    pub amount: Decimal,
    /// (unit, quantity, tier price, tier amount)
    pub tiers: Vec<(String, Decimal, Decimal, Decimal)>,
}

/// Every USAGE item of the account's invoices, and each invoice's (date, amount, item count).
pub async fn invoiced(real: &RealKillBill, account_id: &str) -> (Vec<Item>, Vec<(String, Decimal, usize)>) {
    let invoices = real.get(&format!("/1.0/kb/accounts/{account_id}/invoices?withItems=true")).await;
    let mut items = Vec::new();
    let mut totals = Vec::new();
    for invoice in invoices.as_array().unwrap() {
        let all = invoice["items"].as_array().unwrap();
        totals.push((
            invoice["invoiceDate"].as_str().unwrap_or_default().to_owned(),
            decimal(&invoice["amount"]),
            all.len(),
        ));
        for item in all.iter().filter(|i| i["itemType"] == "USAGE") {
            let sub = real.get(&format!("/1.0/kb/subscriptions/{}", item["subscriptionId"].as_str().unwrap())).await;
            let details: Value = serde_json::from_str(item["itemDetails"].as_str().unwrap()).unwrap();
            items.push(Item {
                resource: sub["externalKey"].as_str().unwrap().to_owned(),
                plan: item["planName"].as_str().unwrap().to_owned(),
                from: item["startDate"].as_str().unwrap_or_default().to_owned(),
                to: item["endDate"].as_str().unwrap_or_default().to_owned(),
                amount: decimal(&item["amount"]),
                tiers: details["tierDetails"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| {
                        (
                            t["tierUnit"].as_str().unwrap().to_owned(),
                            decimal(&t["quantity"]),
                            decimal(&t["tierPrice"]),
                            decimal(&t["amount"]),
                        )
                    })
                    .collect(),
            });
        }
    }
    (items, totals)
}

/// Prints the invoices, so a failing comparison shows what KillBill billed.
pub fn print_invoices(items: &[Item], totals: &[(String, Decimal, usize)]) {
    for (date, amount, n) in totals {
        eprintln!("invoice of {date}: {amount} USD, {n} items");
    }
    for i in items {
        eprintln!("  {} {} [{}, {}) {} USD", i.resource, i.plan, i.from, i.to, i.amount);
        for (unit, quantity, price, amount) in &i.tiers {
            eprintln!("    {unit}: {quantity} × {price} = {amount}");
        }
    }
}

/// Checks each item against the catalog (each tier's price is the catalog's, each tier exactly
/// quantity × price, the item rounded once to the cent) and sums them per (resource, plan):
/// the quantity of each unit billed, and the amount. Items that bill nothing are left out.
pub fn priced(items: &[Item]) -> BTreeMap<(String, String), (BTreeMap<String, Decimal>, Decimal)> {
    let prices = catalog_prices();
    let mut seen: BTreeMap<(String, String), (BTreeMap<String, Decimal>, Decimal)> = BTreeMap::new();
    for item in items {
        let mut exact = Decimal::ZERO;
        let entry = seen.entry((item.resource.clone(), item.plan.clone())).or_default();
        for (unit, quantity, price, amount) in &item.tiers {
            assert_eq!(*price, prices[&(item.plan.clone(), unit.clone())], "{} {unit}", item.plan);
            assert_eq!(*amount, quantity * price, "{} {unit}: {quantity} × {price}", item.resource);
            exact += quantity * price;
            // The previous catalog version's units are listed too, with nothing in them.
            if !quantity.is_zero() {
                *entry.0.entry(unit.clone()).or_default() += quantity;
            }
        }
        assert_eq!(
            item.amount,
            exact.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero),
            "{item:?}"
        );
        entry.1 += item.amount;
    }
    seen.retain(|_, (units, amount)| !amount.is_zero() || units.values().any(|q| !q.is_zero()));
    seen
}

/// Bills November 2026 into the real KillBill and lets it invoice: the deliveries (body,
/// redelivered) through an executor over the KillBill backend with the clock at
/// 2026-11-30T23:00:00Z (every date of the month past, the billing day not reached), one
/// settlement as of 2026-12-01T00:00:00Z, then the clock past the billing day, so KillBill runs
/// the invoice of 12-01 (a cancelled subscription's usage is invoiced at its cancellation).
/// Returns the account id of `project`.
pub async fn bill_november(
    real: &RealKillBill,
    settings: Settings,
    deliveries: &[(Vec<u8>, bool)],
    project: &str,
) -> String {
    set_clock(real, Some("2026-11-30T23:00:00.000Z")).await;
    let executor = Executor::new(settings, KillBill::new(real.settings()).unwrap());
    let mut outcomes = Vec::new();
    for (body, redelivered) in deliveries {
        outcomes.push(executor.handle(Delivery { body, redelivered: *redelivered }).await);
    }
    assert_no_failures(&outcomes);
    assert!(outcomes.iter().all(|o| !matches!(o, Outcome::Invalid(_))), "{outcomes:?}");
    let as_of = Timestamp::parse("2026-12-01T00:00:00Z").unwrap().unix();
    let pass = executor.settler().await.unwrap().pass(Horizon::AsOf(as_of)).await.unwrap();
    assert!(pass.failures.is_empty(), "{:?}", pass.failures);
    assert_eq!((pass.late, pass.shortfalls.len()), (0, 0), "{pass:?}");
    set_clock(real, Some("2026-12-02T00:00:00.000Z")).await;
    let account = real.get(&format!("/1.0/kb/accounts?externalKey={project}")).await;
    account["accountId"].as_str().unwrap().to_owned()
}
