//! Concertim's figures of an account: credits, the period's cost and each resource's share of
//! it, the billing period.

use std::collections::HashMap;

use super::client::ACCOUNT_NOT_FOUND_BY_KEY;
use super::wire::BundleJson;
use super::KillBill;
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use rust_decimal::Decimal;

use crate::billing::{AccountFigures, BillingError, ResourceCost};
use crate::event::ProjectId;

/// An item of the dry-run invoice, as far as a resource's cost needs it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Item {
    #[serde(default)]
    item_type: Option<String>,
    #[serde(default)]
    subscription_id: Option<String>,
    #[serde(default)]
    amount: Option<serde_json::Number>,
}

/// The item types that charge a subscription for its plan or its usage: a resource's cost.
/// Adjustments and credits (`CBA_ADJ`, `CREDIT_ADJ`, `ITEM_ADJ`, `REPAIR_ADJ`, taxes) are the
/// account's and stay in the team's cost only.
const RESOURCE_ITEM_TYPES: [&str; 3] = ["USAGE", "RECURRING", "FIXED"];

fn decimal(what: &str, n: Option<&serde_json::Number>) -> Result<Decimal, BillingError> {
    n.map_or(Ok(Decimal::ZERO), |n| {
        let text = n.to_string();
        text.parse::<Decimal>().or_else(|_| Decimal::from_scientific(&text)).map_err(|_| BillingError::Protocol {
            what: what.to_owned(),
            detail: format!("amount {text} is not a decimal"),
        })
    })
}

/// Each resource's share of the invoice: the items charging a subscription, under the
/// subscription's external key (the resource id this client subscribed it with). Items of a
/// subscription with no key here (made by hand, or by another client) are nobody's device's.
fn resource_costs(
    what: &str,
    items: &[Item],
    keys: &HashMap<String, String>,
) -> Result<Vec<ResourceCost>, BillingError> {
    let mut parts = Vec::new();
    for item in items {
        if !item.item_type.as_deref().is_some_and(|t| RESOURCE_ITEM_TYPES.contains(&t)) {
            continue;
        }
        let Some(key) = item.subscription_id.as_ref().and_then(|id| keys.get(id)) else { continue };
        parts.push((key.clone(), decimal(what, item.amount.as_ref())?));
    }
    Ok(ResourceCost::summed(parts))
}

impl KillBill {
    /// Credits as `reference/original-service.md` §1.4 computes them: the account's credit
    /// balance (`accountCBA`) minus the upcoming invoice's amount when that is not negative.
    pub(super) async fn figures(
        &self,
        project: &ProjectId,
        today: time::Date,
    ) -> Result<Option<AccountFigures>, BillingError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Balance {
            account_id: String,
            // KillBill spells it so: not the camel case of `account_cba`.
            #[serde(default, rename = "accountCBA")]
            account_cba: Option<serde_json::Number>,
        }
        #[derive(Deserialize)]
        struct Invoice {
            #[serde(default)]
            amount: Option<serde_json::Number>,
            #[serde(default)]
            items: Vec<Item>,
        }
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
        let cba = decimal(&what, balance.account_cba.as_ref())?;
        // FIXME(killbill): KillBill 0.22 answers UPCOMING_INVOICE up to the account's next bill
        // cycle day whatever the target date (an account whose first subscription started on
        // the 6th is invoiced from the 6th to the 6th), so the cost shown can cover another
        // span than the calendar month shown as the period.
        let (period_start, period_end) = month_of(today);
        let what = format!("dry-run the upcoming invoice of account {project}");
        let target = format!("{:04}-{:02}-{:02}", period_end.year(), u8::from(period_end.month()), period_end.day());
        let request = self
            .request(Method::POST, "/1.0/kb/invoices/dryRun", None)
            .header("X-Killbill-CreatedBy", &self.settings.created_by)
            .query(&[("accountId", balance.account_id.as_str()), ("targetDate", target.as_str())])
            .json(&serde_json::json!({"dryRunType": "UPCOMING_INVOICE"}));
        let answer = self.send(&what, request).await?;
        let invoice = match answer.status {
            StatusCode::OK => Self::parse::<Invoice>(&what, &answer)?,
            // Nothing to invoice.
            StatusCode::NO_CONTENT => Invoice { amount: None, items: Vec::new() },
            _ => return Err(Self::refused(&what, &answer)),
        };
        let cost = decimal(&what, invoice.amount.as_ref())?.max(Decimal::ZERO);
        let resources = if invoice.items.iter().any(|i| i.subscription_id.is_some()) {
            let keys = self.subscription_keys(&balance.account_id, project).await?;
            resource_costs(&what, &invoice.items, &keys)?
        } else {
            Vec::new()
        };
        Ok(Some(AccountFigures {
            account_id: balance.account_id,
            cost,
            credits: cba - cost,
            period_start,
            period_end,
            resources,
        }))
    }

    /// The external key of every subscription of the account, by subscription id.
    async fn subscription_keys(
        &self,
        account_id: &str,
        project: &ProjectId,
    ) -> Result<HashMap<String, String>, BillingError> {
        let what = format!("list subscriptions of account {project}");
        let path = format!("/1.0/kb/accounts/{account_id}/bundles");
        let answer = self.send(&what, self.request(Method::GET, &path, None)).await?;
        if answer.status != StatusCode::OK {
            return Err(Self::refused(&what, &answer));
        }
        let bundles: Vec<BundleJson> = Self::parse(&what, &answer)?;
        Ok(bundles
            .into_iter()
            .flat_map(|b| b.subscriptions)
            .filter_map(|s| Some((s.subscription_id, s.external_key?)))
            .collect())
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

    fn item(kind: &str, subscription: Option<&str>, amount: &str) -> Item {
        Item {
            item_type: Some(kind.to_owned()),
            subscription_id: subscription.map(str::to_owned),
            amount: Some(amount.parse().unwrap()),
        }
    }

    #[test]
    fn a_subscriptions_usage_and_recurring_items_are_its_resources_cost_and_other_items_nobodys() {
        let keys: HashMap<String, String> =
            [("s1", "instance-a"), ("s2", "volume-b")].map(|(s, k)| (s.to_owned(), k.to_owned())).into();
        let items = [
            item("USAGE", Some("s1"), "1.25"),
            item("RECURRING", Some("s1"), "10"),
            item("USAGE", Some("s2"), "0.5"),
            // A subscription this client did not make: in the team's cost only.
            item("USAGE", Some("s3"), "7"),
            // The account's, not a subscription's charge.
            item("CBA_ADJ", None, "-3"),
            item("ITEM_ADJ", Some("s2"), "-0.5"),
        ];
        let costs = resource_costs("dry run", &items, &keys).unwrap();
        let shown: Vec<(&str, String)> = costs.iter().map(|c| (c.resource_id.as_str(), c.amount.to_string())).collect();
        assert_eq!(shown, [("instance-a", "11.25".to_owned()), ("volume-b", "0.5".to_owned())]);
    }

    #[test]
    fn an_item_amount_that_is_no_decimal_is_a_protocol_error_not_a_panic() {
        let keys: HashMap<String, String> = [("s1".to_owned(), "a".to_owned())].into();
        let items = [item("USAGE", Some("s1"), "1e300")];
        let err = resource_costs("dry run", &items, &keys).unwrap_err();
        assert!(matches!(err, BillingError::Protocol { .. }), "{err:?}");
    }
}
