//! Concertim's figures of an account: credits, the period's cost and each resource's share of
//! it, the billing period.

use std::collections::HashMap;

use super::accounts::{KbAccount, KbItem};
use super::wire::BundleJson;
use super::KillBill;
use reqwest::{Method, StatusCode};

use rust_decimal::Decimal;

use crate::billing::{AccountFigures, BillingError, ResourceCost};
use crate::event::ProjectId;

/// The item types that charge a subscription for its plan or its usage: a resource's cost.
/// Adjustments and credits (`CBA_ADJ`, `CREDIT_ADJ`, `ITEM_ADJ`, `REPAIR_ADJ`, taxes) are the
/// account's and stay in the team's cost only.
const RESOURCE_ITEM_TYPES: [&str; 3] = ["USAGE", "RECURRING", "FIXED"];

/// Each resource's share of the invoice: the items charging a subscription, under the
/// subscription's external key (the resource id this client subscribed it with). Items of a
/// subscription with no key here (made by hand, or by another client) are nobody's device's.
fn resource_costs(items: &[KbItem], keys: &HashMap<String, String>) -> Vec<ResourceCost> {
    let parts = items.iter().filter_map(|item| {
        if !item.item_type.as_deref().is_some_and(|t| RESOURCE_ITEM_TYPES.contains(&t)) {
            return None;
        }
        let key = item.subscription_id.as_ref().and_then(|id| keys.get(id))?;
        Some((key.clone(), item.amount))
    });
    ResourceCost::summed(parts)
}

impl KillBill {
    /// Credits as `reference/original-service.md` §1.4 computes them: the account's credit
    /// balance (`accountCBA`) minus the upcoming invoice's amount when that is not negative.
    /// The account is the project's as [`KillBill::account_id`] finds it (an adopted one too),
    /// read by id with its balance: once remembered, that is the one read the key gave.
    pub(super) async fn figures(
        &self,
        project: &ProjectId,
        today: time::Date,
    ) -> Result<Option<AccountFigures>, BillingError> {
        let Some(account_id) = self.account_id(project).await? else { return Ok(None) };
        let what = format!("read the balance of account {account_id} of project {project}");
        let request = self
            .request(Method::GET, &format!("/1.0/kb/accounts/{account_id}"), None)
            .query(&[("accountWithBalanceAndCBA", "true")]);
        let answer = self.send(&what, request).await?;
        let balance: KbAccount = match answer.status {
            StatusCode::OK => Self::parse(&what, &answer)?,
            // Accounts are never deleted in KillBill: an id once found stays readable.
            _ => return Err(Self::refused(&what, &answer)),
        };
        let (period_start, period_end) = month_of(today);
        let invoice = self.upcoming(&balance.account_id, today).await?;
        let cost = invoice.as_ref().map_or(Decimal::ZERO, |i| i.amount).max(Decimal::ZERO);
        let items = invoice.map(|i| i.items).unwrap_or_default();
        let resources = if items.iter().any(|i| i.subscription_id.is_some()) {
            resource_costs(&items, &self.subscription_keys(&balance.account_id).await?)
        } else {
            Vec::new()
        };
        Ok(Some(AccountFigures {
            account_id: balance.account_id,
            cost,
            credits: balance.account_cba - cost,
            period_start,
            period_end,
            resources,
        }))
    }

    /// The external key of every subscription of the account, by subscription id.
    pub(super) async fn subscription_keys(&self, account_id: &str) -> Result<HashMap<String, String>, BillingError> {
        let what = format!("list the subscriptions of account {account_id}");
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

    fn items(json: serde_json::Value) -> Vec<KbItem> {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_subscriptions_usage_and_recurring_items_are_its_resources_cost_and_other_items_nobodys() {
        let keys: HashMap<String, String> =
            [("s1", "instance-a"), ("s2", "volume-b")].map(|(s, k)| (s.to_owned(), k.to_owned())).into();
        let items = items(serde_json::json!([
            {"itemType": "USAGE", "subscriptionId": "s1", "amount": 1.25},
            {"itemType": "RECURRING", "subscriptionId": "s1", "amount": 10},
            {"itemType": "USAGE", "subscriptionId": "s2", "amount": 0.5},
            // A subscription this client did not make: in the team's cost only.
            {"itemType": "USAGE", "subscriptionId": "s3", "amount": 7},
            // The account's, not a subscription's charge.
            {"itemType": "CBA_ADJ", "amount": -3},
            {"itemType": "ITEM_ADJ", "subscriptionId": "s2", "amount": -0.5},
        ]));
        let costs = resource_costs(&items, &keys);
        let shown: Vec<(&str, String)> = costs.iter().map(|c| (c.resource_id.as_str(), c.amount.to_string())).collect();
        assert_eq!(shown, [("instance-a", "11.25".to_owned()), ("volume-b", "0.5".to_owned())]);
    }

    #[test]
    fn an_item_amount_that_is_no_decimal_is_refused_when_read_not_a_panic() {
        let read = serde_json::from_value::<Vec<KbItem>>(serde_json::json!([{"itemType": "USAGE", "amount": 1e300}]));
        assert!(read.is_err());
    }
}
