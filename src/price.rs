//! Prices: the KillBill catalog file read as a price list, and usage priced the way KillBill
//! invoices it, so the embedded ledger says what KillBill would charge.
//!
//! Pure: no I/O, no clock. The catalog is the file `killbill bootstrap` uploads
//! (`deploy/killbill/catalog.xml`): each plan's usage section gives, per unit, a block size, a
//! price per currency and a maximum number of blocks. KillBill bills consumable usage in arrear
//! per subscription, plan and monthly billing period (aligned to the account's billing day): each
//! unit's total in the period is rounded up to whole blocks, times the block price; the item is
//! the sum over its units, rounded once to the currency's precision, half up.

use std::collections::BTreeMap;

use rust_decimal::{Decimal, RoundingStrategy};
use time::{Date, Month, OffsetDateTime, Time};

use crate::event::Timestamp;

/// The catalog written for this project (`deploy/killbill/catalog.xml`): one version of
/// usage-only plans, billing instances, volumes, snapshots, floating IPs and images by the
/// second and network traffic by the GiB, and still billing the sample-counted units of an
/// earlier version. `killbill bootstrap` uploads it; the ledger prices usage from it.
pub const CATALOG_XML: &str = include_str!("../deploy/killbill/catalog.xml");

/// Why a catalog cannot be read as prices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    /// The file is not XML.
    #[error("the catalog is not XML: {0}")]
    Xml(String),
    /// An element the price model needs is missing or not a number.
    #[error("the catalog's {what} is missing or not a number")]
    Field {
        /// Which element, e.g. `plan openstack-standard-monthly: block size of openstack-vcpu-seconds`.
        what: String,
    },
}

/// The first child element named `name`.
fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

/// An element's text, trimmed ("" when absent).
fn text<'a>(node: Option<roxmltree::Node<'a, '_>>) -> &'a str {
    node.and_then(|n| n.text()).map_or("", str::trim)
}

/// One unit's price in a plan: blocks of `size` units at `price` each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Units per block (KillBill rounds each period's total up to whole blocks).
    pub size: Decimal,
    /// The price of one block, in the catalog's currency.
    pub price: Decimal,
}

/// The catalog as prices: the currency, and each plan's price per unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    /// The currency every price is in (the first `<currency>` the catalog lists).
    pub currency: String,
    /// Plan name → unit → block.
    pub plans: BTreeMap<String, BTreeMap<String, Block>>,
}

impl Catalog {
    /// Reads the prices of a catalog document, in its first currency.
    ///
    /// # Errors
    /// [`PriceError`] when the text is not XML, or a block has no size or price in the currency.
    pub fn parse(xml: &str) -> Result<Catalog, PriceError> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| PriceError::Xml(e.to_string()))?;
        let root = doc.root_element();
        let currency = child(root, "currencies")
            .and_then(|c| child(c, "currency"))
            .map(|c| text(Some(c)).to_owned())
            .filter(|c| !c.is_empty())
            .ok_or_else(|| PriceError::Field { what: "currencies".into() })?;
        let mut plans = BTreeMap::new();
        for plan in root.descendants().filter(|n| n.has_tag_name("plan") && n.attribute("name").is_some()) {
            let name = plan.attribute("name").unwrap_or_default().to_owned();
            let mut units = BTreeMap::new();
            for block in plan.descendants().filter(|n| n.has_tag_name("tieredBlock")) {
                let unit = text(child(block, "unit")).to_owned();
                let what = |field: &str| PriceError::Field { what: format!("plan {name}: {field} of {unit}") };
                let size: Decimal = text(child(block, "size")).parse().map_err(|_| what("block size"))?;
                let price = child(block, "prices")
                    .into_iter()
                    .flat_map(|p| p.children().filter(|c| c.has_tag_name("price")))
                    .find(|p| text(child(*p, "currency")) == currency)
                    .map(|p| text(child(p, "value")))
                    .ok_or_else(|| what(&format!("{currency} price")))?
                    .parse::<Decimal>()
                    .map_err(|_| what("price"))?;
                if size <= Decimal::ZERO {
                    return Err(what("block size"));
                }
                units.insert(unit, Block { size, price });
            }
            plans.insert(name, units);
        }
        Ok(Catalog { currency, plans })
    }

    /// The catalog `killbill bootstrap` uploads by default, read once per process.
    ///
    /// # Errors
    /// Never for the bundled file (a unit test reads it); the signature is [`Catalog::parse`]'s.
    pub fn bundled() -> Result<&'static Catalog, PriceError> {
        static BUNDLED: std::sync::OnceLock<Result<Catalog, PriceError>> = std::sync::OnceLock::new();
        BUNDLED.get_or_init(|| Catalog::parse(CATALOG_XML)).as_ref().map_err(Clone::clone)
    }

    /// The digits after the point of the currency's smallest unit (ISO 4217, as KillBill's
    /// rounding uses them).
    pub fn precision(&self) -> u32 {
        match self.currency.as_str() {
            "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX" | "UYI" | "VND"
            | "VUV" | "XAF" | "XOF" | "XPF" => 0,
            "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
            _ => 2,
        }
    }

    /// Prices one invoice item: the totals of each unit a subscription used on `plan` in one
    /// billing period. Each unit is rounded up to whole blocks; the item is rounded once.
    /// A unit the plan does not price costs nothing (KillBill ignores it too), and is listed
    /// with no price.
    pub fn item(&self, plan: &str, totals: &BTreeMap<String, Decimal>) -> PricedItem {
        let prices = self.plans.get(plan);
        let mut units = Vec::new();
        let mut exact = Decimal::ZERO;
        for (unit, quantity) in totals {
            let block = prices.and_then(|p| p.get(unit));
            let amount = block.map_or(Decimal::ZERO, |b| (quantity / b.size).ceil() * b.price);
            exact += amount;
            units.push(PricedUnit { unit: unit.clone(), quantity: *quantity, price: block.map(|b| b.price), amount });
        }
        let mut amount = exact.round_dp_with_strategy(self.precision(), RoundingStrategy::MidpointAwayFromZero);
        // Written with the currency's digits: 0.20, not 0.2.
        amount.rescale(self.precision());
        PricedItem { plan: plan.to_owned(), units, amount }
    }
}

/// One unit of a priced item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PricedUnit {
    /// The unit.
    pub unit: String,
    /// Its total in the period.
    pub quantity: Decimal,
    /// The price of one block, when the plan prices the unit.
    pub price: Option<Decimal>,
    /// Whole blocks × price, not rounded.
    pub amount: Decimal,
}

/// One invoice item: a subscription's usage on one plan in one billing period.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PricedItem {
    /// The plan.
    pub plan: String,
    /// Each unit's quantity and amount.
    pub units: Vec<PricedUnit>,
    /// The item's amount, rounded once to the currency's precision.
    pub amount: Decimal,
}

/// The monthly billing period holding `t` for an account whose billing day is `bcd` (1–31): from
/// that day of the month at midnight UTC (the month's last day when it is shorter) to the same
/// day of the next month.
pub fn period(bcd: u8, t: Timestamp) -> (Timestamp, Timestamp) {
    let date = t.as_offset().date();
    let start_in = |year: i32, month: Month| -> Date {
        let day = bcd.clamp(1, month.length(year));
        Date::from_calendar_date(year, month, day).unwrap_or(date)
    };
    let this = start_in(date.year(), date.month());
    let (start, next) = if date >= this {
        let (y, m) = next_month(date.year(), date.month());
        (this, start_in(y, m))
    } else {
        let (y, m) = previous_month(date.year(), date.month());
        (start_in(y, m), this)
    };
    (midnight(start), midnight(next))
}

fn next_month(year: i32, month: Month) -> (i32, Month) {
    if month == Month::December {
        (year + 1, Month::January)
    } else {
        (year, month.next())
    }
}

fn previous_month(year: i32, month: Month) -> (i32, Month) {
    if month == Month::January {
        (year - 1, Month::December)
    } else {
        (year, month.previous())
    }
}

fn midnight(date: Date) -> Timestamp {
    let t = OffsetDateTime::new_utc(date, Time::MIDNIGHT).unix_timestamp();
    Timestamp::from_unix(t).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// The billing day an account gets from its first subscription's start (KillBill's ACCOUNT
/// billing alignment, in UTC).
pub fn billing_day(first_start: Timestamp) -> u8 {
    first_start.as_offset().day()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> Timestamp {
        Timestamp::parse(text).unwrap()
    }

    #[test]
    fn the_bundled_catalog_prices_every_plan_in_usd() {
        let c = Catalog::bundled().unwrap();
        assert_eq!((c.currency.as_str(), c.precision()), ("USD", 2));
        let standard = &c.plans["openstack-standard-monthly"];
        assert_eq!(standard["openstack-vcpu-seconds"].price, "0.00001".parse().unwrap());
        assert_eq!(c.plans["openstack-volume-monthly"]["openstack-volume-gib-seconds"].size, Decimal::ONE);
    }

    #[test]
    fn an_item_rounds_each_unit_up_to_whole_blocks_and_the_sum_once_half_up() {
        let c = Catalog::bundled().unwrap();
        // 2 GiB × 25 days of image: 4 320 000 GiB-s × 0.00000002 = 0.0864 → 0.09 (as KillBill
        // invoiced it).
        let totals = BTreeMap::from([("openstack-image-gib-seconds".to_owned(), Decimal::from(4_320_000))]);
        assert_eq!(c.item("openstack-image-monthly", &totals).amount, "0.09".parse().unwrap());
        // A fractional total is a whole block more: 0.5 GiB of egress costs a whole GiB.
        let totals = BTreeMap::from([("openstack-network-egress-gib".to_owned(), "2.5".parse().unwrap())]);
        assert_eq!(c.item("openstack-network-monthly", &totals).units[0].amount, "0.27".parse().unwrap());
        // A unit the plan does not price costs nothing.
        let totals = BTreeMap::from([("nobody".to_owned(), Decimal::from(5))]);
        assert_eq!(c.item("openstack-standard-monthly", &totals).amount, Decimal::ZERO);
    }

    #[test]
    fn a_billing_period_runs_from_the_billing_day_to_the_same_day_next_month_or_its_last() {
        assert_eq!(period(3, t("2025-03-09T10:00:00Z")), (t("2025-03-03T00:00:00Z"), t("2025-04-03T00:00:00Z")));
        assert_eq!(period(3, t("2025-03-02T23:59:59Z")).0, t("2025-02-03T00:00:00Z"));
        assert_eq!(period(31, t("2025-02-28T12:00:00Z")), (t("2025-02-28T00:00:00Z"), t("2025-03-31T00:00:00Z")));
        assert_eq!(period(1, t("2026-12-15T00:00:00Z")).1, t("2027-01-01T00:00:00Z"));
        assert_eq!(billing_day(t("2026-11-01T00:30:00Z")), 1);
    }

    #[test]
    fn a_catalog_without_a_price_in_its_currency_is_refused_naming_the_block() {
        let xml = r#"<catalog><currencies><currency>EUR</currency></currencies><plans><plan name="p"><tieredBlock><unit>u</unit><size>1</size><prices><price><currency>USD</currency><value>1</value></price></prices></tieredBlock></plan></plans></catalog>"#;
        let err = Catalog::parse(xml).unwrap_err();
        assert_eq!(err.to_string(), "the catalog's plan p: EUR price of u is missing or not a number");
        assert!(matches!(Catalog::parse("not xml"), Err(PriceError::Xml(_))));
    }
}
