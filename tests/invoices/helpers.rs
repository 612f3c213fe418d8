//! What the invoice tests share: the server's one test clock, and the catalog's prices.

use std::collections::BTreeMap;

use concertim_billing::billing::killbill::CATALOG_XML;
use rust_decimal::Decimal;
use serde_json::Value;

use crate::support::killbill_server::RealKillBill;

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
