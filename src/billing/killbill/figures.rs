//! Concertim's figures of an account: credits, the period's cost, the billing period.

use super::client::ACCOUNT_NOT_FOUND_BY_KEY;
use super::KillBill;
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use rust_decimal::Decimal;

use crate::billing::{AccountFigures, BillingError};
use crate::event::ProjectId;

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
        }
        let decimal = |what: &str, n: Option<serde_json::Number>| -> Result<Decimal, BillingError> {
            n.map_or(Ok(Decimal::ZERO), |n| {
                let text = n.to_string();
                text.parse::<Decimal>().or_else(|_| Decimal::from_scientific(&text)).map_err(|_| {
                    BillingError::Protocol { what: what.to_owned(), detail: format!("amount {text} is not a decimal") }
                })
            })
        };
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
        let cba = decimal(&what, balance.account_cba)?;
        let (period_start, period_end) = month_of(today);
        let what = format!("dry-run the upcoming invoice of account {project}");
        let target = format!("{:04}-{:02}-{:02}", period_end.year(), u8::from(period_end.month()), period_end.day());
        let request = self
            .request(Method::POST, "/1.0/kb/invoices/dryRun", None)
            .header("X-Killbill-CreatedBy", &self.settings.created_by)
            .query(&[("accountId", balance.account_id.as_str()), ("targetDate", target.as_str())])
            .json(&serde_json::json!({"dryRunType": "UPCOMING_INVOICE"}));
        let answer = self.send(&what, request).await?;
        let upcoming = match answer.status {
            StatusCode::OK => decimal(&what, Self::parse::<Invoice>(&what, &answer)?.amount)?,
            // Nothing to invoice.
            StatusCode::NO_CONTENT => Decimal::ZERO,
            _ => return Err(Self::refused(&what, &answer)),
        };
        let cost = upcoming.max(Decimal::ZERO);
        Ok(Some(AccountFigures { account_id: balance.account_id, cost, credits: cba - cost, period_start, period_end }))
    }
}

/// The first and last day of `day`'s calendar month: the billing period Concertim shows (as the
/// Python service computed it), and the dry run's target date.
pub fn month_of(day: time::Date) -> (time::Date, time::Date) {
    let start = day.replace_day(1).unwrap_or(day);
    let end = day.replace_day(day.month().length(day.year())).unwrap_or(day);
    (start, end)
}
