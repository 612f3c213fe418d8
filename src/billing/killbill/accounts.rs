//! The billing API's account calls on KillBill (`reference/original-service.md` §1.2, §1.4,
//! §2.1): credits, the upcoming invoice, invoices, and orders as subscriptions.
//!
//! Every write is idempotent through KillBill itself, so a replica that dies mid-request and a
//! client that retries never double it: a deposit's credit carries the request's key in its
//! description and is looked for before another is made; an order is a subscription whose
//! external key is the request's key.

use std::collections::BTreeMap;

use reqwest::{Method, StatusCode};
use rust_decimal::Decimal;
use serde::Deserialize;

use super::client::{BUNDLE_HAS_BASE, BUNDLE_KEY_EXISTS, CANCEL_BAD_STATE, SUBSCRIPTION_NOT_FOUND_BY_KEY};
use super::wire::{NewCredit, NewSubscription, SubscriptionJson};
use super::KillBill;
use crate::billing::accounts::{Accounts, AccountsError, Invoice, InvoiceLine, InvoicePage};
use crate::billing::{BillingError, ExactAmount};

/// An order's subscription key: the request's key under this prefix, which also tells an order
/// from a resource's subscription (keyed by the resource's uuid).
pub const ORDER_KEY_PREFIX: &str = "order-";
/// The tags of an order that name its stack (§1.2 step 3).
const STACK_TAGS: [&str; 2] = ["openstack_stack_id", "openstack_stack_name"];

/// An account with its balance (`accountWithBalanceAndCBA=true`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct KbAccount {
    pub(super) account_id: String,
    // KillBill spells it so: not the camel case of `account_cba`.
    #[serde(default, rename = "accountCBA", deserialize_with = "kb_decimal")]
    pub(super) account_cba: Decimal,
    #[serde(default)]
    currency: Option<String>,
}

/// An invoice with its items.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct KbInvoice {
    #[serde(default)]
    invoice_id: Option<String>,
    #[serde(default)]
    account_id: Option<String>,
    #[serde(default)]
    invoice_number: Option<String>,
    #[serde(default)]
    invoice_date: Option<String>,
    #[serde(default)]
    target_date: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default, deserialize_with = "kb_decimal")]
    pub(super) amount: Decimal,
    #[serde(default, deserialize_with = "kb_decimal")]
    balance: Decimal,
    #[serde(default, deserialize_with = "kb_decimal")]
    credit_adj: Decimal,
    #[serde(default, deserialize_with = "kb_decimal")]
    refund_adj: Decimal,
    #[serde(default)]
    pub(super) items: Vec<KbItem>,
}

/// An invoice item.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct KbItem {
    #[serde(default)]
    invoice_item_id: Option<String>,
    #[serde(default)]
    pub(super) item_type: Option<String>,
    #[serde(default)]
    pub(super) subscription_id: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    start_date: Option<String>,
    #[serde(default)]
    end_date: Option<String>,
    #[serde(default, deserialize_with = "kb_decimal")]
    pub(super) amount: Decimal,
    #[serde(default)]
    currency: Option<String>,
}

/// A KillBill amount: a JSON number (or null), read through its text so no digit changes.
pub(super) fn kb_decimal<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    let n: Option<serde_json::Number> = Option::deserialize(d)?;
    n.map_or(Ok(Decimal::ZERO), |n| {
        let text = n.to_string();
        text.parse::<Decimal>()
            .or_else(|_| Decimal::from_scientific(&text))
            .map_err(|_| serde::de::Error::custom(format!("amount {text} is not a decimal")))
    })
}

/// The description a deposit's credit carries: how a retry finds it.
fn deposit_description(key: &str) -> String {
    format!("Credits added in Concertim (request {key})")
}

impl KillBill {
    /// A write outside a notification's handling, with the reason KillBill's audit log shows.
    pub(super) fn writing(&self, method: Method, path: &str, reason: &str) -> reqwest::RequestBuilder {
        self.request(method, path, None)
            .header("X-Killbill-CreatedBy", &self.settings.created_by)
            .header("X-Killbill-Reason", reason)
    }

    async fn account_by_id(&self, account: &str) -> Result<KbAccount, AccountsError> {
        let what = format!("read account {account}");
        let path = format!("/1.0/kb/accounts/{}", path_segment(account)?);
        let request = self.request(Method::GET, &path, None).query(&[("accountWithBalanceAndCBA", "true")]);
        let answer = self.send(&what, request).await?;
        match answer.status {
            StatusCode::OK => Ok(Self::parse(&what, &answer)?),
            // An unknown uuid, and (from KillBill's parameter check) a malformed one.
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => {
                Err(AccountsError::NotFound(format!("billing account {account} does not exist")))
            }
            _ => Err(Self::refused(&what, &answer).into()),
        }
    }

    async fn all_invoices(&self, account: &str) -> Result<Vec<KbInvoice>, AccountsError> {
        let what = format!("list the invoices of account {account}");
        let path = format!("/1.0/kb/accounts/{}/invoices", path_segment(account)?);
        let request = self.request(Method::GET, &path, None).query(&[("includeInvoiceComponents", "true")]);
        let answer = self.send(&what, request).await?;
        match answer.status {
            StatusCode::OK => Ok(Self::parse(&what, &answer)?),
            StatusCode::NOT_FOUND => Err(AccountsError::NotFound(format!("billing account {account} does not exist"))),
            _ => Err(Self::refused(&what, &answer).into()),
        }
    }

    /// The `UPCOMING_INVOICE` dry run up to the last day of `today`'s month (§1.4); `None`
    /// when nothing is to be invoiced (204).
    // FIXME(killbill): KillBill 0.22 answers UPCOMING_INVOICE up to the account's next bill
    // cycle day whatever the target date (an account whose first subscription started on the
    // 6th is invoiced from the 6th to the 6th), so the cost shown can cover another span than
    // the calendar month shown as the period.
    pub(super) async fn upcoming(&self, account: &str, today: time::Date) -> Result<Option<KbInvoice>, BillingError> {
        let what = format!("dry-run the upcoming invoice of account {account}");
        let (_, end) = super::month_of(today);
        let target = end.to_string();
        let request = self
            .writing(Method::POST, "/1.0/kb/invoices/dryRun", "Draft invoice shown in Concertim")
            .query(&[("accountId", account), ("targetDate", target.as_str())])
            .json(&serde_json::json!({"dryRunType": "UPCOMING_INVOICE"}));
        let answer = self.send(&what, request).await?;
        match answer.status {
            StatusCode::OK => Ok(Some(Self::parse(&what, &answer)?)),
            StatusCode::NO_CONTENT => Ok(None),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    /// What each subscription of the account is: a resource's (its uuid) or an order's (its
    /// stack tags).
    async fn subscription_names(&self, account: &str) -> Result<BTreeMap<String, Named>, AccountsError> {
        let mut names = BTreeMap::new();
        for (subscription, key) in self.subscription_keys(path_segment(account)?).await? {
            let named = if key.starts_with(ORDER_KEY_PREFIX) {
                let fields = self.fields("subscriptions", &subscription).await?;
                let tag = |name: &str| fields.iter().find(|f| f.name == name).map(|f| f.value.clone());
                Named::Order { stack_id: tag(STACK_TAGS[0]), stack_name: tag(STACK_TAGS[1]) }
            } else {
                Named::Resource(key)
            };
            names.insert(subscription, named);
        }
        Ok(names)
    }

    async fn shown(&self, account: &str, invoice: KbInvoice) -> Result<Invoice, AccountsError> {
        let needs_names = invoice.items.iter().any(|i| i.subscription_id.is_some());
        let names = if needs_names { self.subscription_names(account).await? } else { BTreeMap::new() };
        Ok(show(account, invoice, &names, &self.settings.currency))
    }

    async fn order(&self, order: &str) -> Result<SubscriptionJson, AccountsError> {
        let what = format!("read order {order}");
        let path = format!("/1.0/kb/subscriptions/{}", path_segment(order)?);
        let answer = self.send(&what, self.request(Method::GET, &path, None)).await?;
        let not_found = || AccountsError::NotFound(format!("order {order} does not exist"));
        let subscription: SubscriptionJson = match answer.status {
            StatusCode::OK => Self::parse(&what, &answer)?,
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => return Err(not_found()),
            _ => return Err(Self::refused(&what, &answer).into()),
        };
        // A resource's subscription is billing's own: the API never cancels or tags one.
        if !subscription.external_key.as_deref().is_some_and(|k| k.starts_with(ORDER_KEY_PREFIX)) {
            return Err(not_found());
        }
        Ok(subscription)
    }

    async fn order_by_key(&self, key: &str) -> Result<Option<String>, AccountsError> {
        let what = format!("find order {key}");
        let request = self.request(Method::GET, "/1.0/kb/subscriptions", None).query(&[("externalKey", key)]);
        let answer = self.send(&what, request).await?;
        match answer.status {
            StatusCode::OK => Ok(Some(Self::parse::<SubscriptionJson>(&what, &answer)?.subscription_id)),
            StatusCode::NOT_FOUND if answer.code() == Some(SUBSCRIPTION_NOT_FOUND_BY_KEY) => Ok(None),
            _ => Err(Self::refused(&what, &answer).into()),
        }
    }
}

/// What a subscription bills.
enum Named {
    Resource(String),
    Order { stack_id: Option<String>, stack_name: Option<String> },
}

/// KillBill's invoice as the Python service showed it (§2.1, `_build_invoice_dict`): charges
/// summed per subscription (`cost`), credit balance items (`CBA_ADJ`) one by one (`credits`).
fn show(account: &str, invoice: KbInvoice, names: &BTreeMap<String, Named>, currency: &str) -> Invoice {
    let currency = invoice.currency.clone().unwrap_or_else(|| currency.to_owned());
    let mut items: BTreeMap<String, InvoiceLine> = BTreeMap::new();
    for item in invoice.items {
        let item_currency = item.currency.clone().unwrap_or_else(|| currency.clone());
        match (item.item_type.as_deref(), item.subscription_id) {
            (Some("USAGE" | "RECURRING" | "FIXED"), Some(subscription)) => {
                let line = items.entry(subscription.clone()).or_insert_with(|| {
                    let (resource_id, stack_id, stack_name) = match names.get(&subscription) {
                        Some(Named::Resource(id)) => (Some(id.clone()), None, None),
                        Some(Named::Order { stack_id, stack_name }) => (None, stack_id.clone(), stack_name.clone()),
                        None => (None, None, None),
                    };
                    InvoiceLine {
                        kind: "cost",
                        amount: Decimal::ZERO,
                        start_date: item.start_date.clone(),
                        end_date: item.end_date.clone(),
                        currency: item_currency,
                        openstack_stack_id: stack_id,
                        openstack_stack_name: stack_name,
                        resource_id,
                    }
                });
                line.amount += item.amount;
                line.start_date = earlier(line.start_date.take(), item.start_date);
                line.end_date = later(line.end_date.take(), item.end_date);
            }
            (Some("CBA_ADJ"), _) => {
                let id = item.invoice_item_id.unwrap_or_default();
                items.insert(
                    id,
                    InvoiceLine {
                        kind: "credits",
                        amount: item.amount,
                        start_date: item.start_date,
                        end_date: item.end_date,
                        currency: item_currency,
                        openstack_stack_id: None,
                        openstack_stack_name: None,
                        resource_id: None,
                    },
                );
            }
            _ => {}
        }
    }
    Invoice {
        invoice_id: invoice.invoice_id.unwrap_or_default(),
        account_id: invoice.account_id.unwrap_or_else(|| account.to_owned()),
        invoice_number: invoice.invoice_number,
        invoice_date: invoice.invoice_date,
        target_date: invoice.target_date,
        status: invoice.status.unwrap_or_else(|| "DRAFT".to_owned()),
        currency,
        amount: invoice.amount,
        balance: invoice.balance,
        credit_adj: invoice.credit_adj,
        refund_adj: invoice.refund_adj,
        items,
    }
}

fn earlier(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn later(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// An id that goes into a URL path: KillBill's ids are uuids, so anything else (a `/`, `..`,
/// a query) is refused before it can change the request.
fn path_segment(id: &str) -> Result<&str, AccountsError> {
    if !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        Ok(id)
    } else {
        Err(AccountsError::NotFound(format!("{id:?} is not a KillBill id")))
    }
}

impl Accounts for KillBill {
    async fn deposit(&self, account: &str, amount: Decimal, key: &str) -> Result<Decimal, AccountsError> {
        let found = self.account_by_id(account).await?;
        let description = deposit_description(key);
        let made = self.all_invoices(&found.account_id).await?.into_iter().flat_map(|i| i.items).any(|item| {
            item.item_type.as_deref() == Some("CREDIT_ADJ") && item.description.as_deref() == Some(&description)
        });
        if made {
            return Ok(amount);
        }
        let what = format!("credit account {account}");
        let currency = found.currency.unwrap_or_else(|| self.settings.currency.clone());
        // Typed, not a `serde_json::Value`, which would carry the amount as an f64.
        let body = [NewCredit {
            account_id: &found.account_id,
            amount: ExactAmount(amount),
            currency: &currency,
            description: &description,
        }];
        let request = self
            .writing(Method::POST, "/1.0/kb/credits", "Credits added in Concertim")
            .query(&[("autoCommit", "true")])
            .json(&body);
        let answer = self.send(&what, request).await?;
        match answer.status {
            StatusCode::OK | StatusCode::CREATED => Ok(amount),
            StatusCode::NOT_FOUND => Err(AccountsError::NotFound(format!("billing account {account} does not exist"))),
            _ => Err(Self::refused(&what, &answer).into()),
        }
    }

    async fn remaining_credits(&self, account: &str, today: time::Date) -> Result<Decimal, AccountsError> {
        let found = self.account_by_id(account).await?;
        let upcoming = self.upcoming(&found.account_id, today).await?.map_or(Decimal::ZERO, |i| i.amount);
        Ok(found.account_cba - upcoming.max(Decimal::ZERO))
    }

    async fn draft_invoice(&self, account: &str, today: time::Date) -> Result<Option<Invoice>, AccountsError> {
        let found = self.account_by_id(account).await?;
        match self.upcoming(&found.account_id, today).await? {
            Some(invoice) => Ok(Some(self.shown(&found.account_id, invoice).await?)),
            None => Ok(None),
        }
    }

    async fn invoices(&self, account: &str, offset: u64, limit: u64) -> Result<InvoicePage, AccountsError> {
        // The whole list, paged here: an account has an invoice a month and one per deposit,
        // and this call, unlike the paginated one, carries the items on every server version.
        let all = self.all_invoices(account).await?;
        let total = u64::try_from(all.len()).unwrap_or(u64::MAX);
        let page: Vec<KbInvoice> = all
            .into_iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .collect();
        let names = if page.iter().flat_map(|i| &i.items).any(|i| i.subscription_id.is_some()) {
            self.subscription_names(account).await?
        } else {
            BTreeMap::new()
        };
        let invoices = page.into_iter().map(|i| show(account, i, &names, &self.settings.currency)).collect();
        Ok(InvoicePage { total, invoices })
    }

    async fn invoice(&self, account: &str, invoice_id: &str) -> Result<Invoice, AccountsError> {
        // Looked for among the account's own: another account's invoice is not found.
        let invoice = self
            .all_invoices(account)
            .await?
            .into_iter()
            .find(|i| i.invoice_id.as_deref() == Some(invoice_id))
            .ok_or_else(|| AccountsError::NotFound(format!("account {account} has no invoice {invoice_id}")))?;
        self.shown(account, invoice).await
    }

    async fn create_order(&self, account: &str, key: &str, plan: &str) -> Result<String, AccountsError> {
        let external_key = format!("{ORDER_KEY_PREFIX}{key}");
        if let Some(id) = self.order_by_key(&external_key).await? {
            return Ok(id);
        }
        let found = self.account_by_id(account).await?;
        let what = format!("create an order on account {account}");
        let body = NewSubscription {
            account_id: &found.account_id,
            external_key: &external_key,
            bundle_external_key: &external_key,
            plan_name: plan,
        };
        let request = self.writing(Method::POST, "/1.0/kb/subscriptions", "Order created in Concertim").json(&body);
        let answer = self.send(&what, request).await?;
        match answer.status {
            StatusCode::CREATED => Ok(Self::created_id(&what, &answer)?),
            // An earlier attempt made it (its answer lost): found again by key.
            StatusCode::BAD_REQUEST if matches!(answer.code(), Some(BUNDLE_KEY_EXISTS | BUNDLE_HAS_BASE)) => {
                self.order_by_key(&external_key).await?.ok_or_else(|| {
                    BillingError::Protocol { what, detail: "the order's key exists, but no order has it".into() }.into()
                })
            }
            _ => Err(Self::refused(&what, &answer).into()),
        }
    }

    async fn delete_order(&self, order: &str, _key: &str) -> Result<String, AccountsError> {
        let subscription = self.order(order).await?;
        if subscription.state.as_deref() == Some("CANCELLED") {
            return Ok(subscription.subscription_id);
        }
        let what = format!("cancel order {order}");
        let path = format!("/1.0/kb/subscriptions/{}", subscription.subscription_id);
        let answer = self.send(&what, self.writing(Method::DELETE, &path, "Order deleted in Concertim")).await?;
        match answer.status {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(subscription.subscription_id),
            s if s.is_server_error() && answer.code() == Some(CANCEL_BAD_STATE) => Ok(subscription.subscription_id),
            _ => Err(Self::refused(&what, &answer).into()),
        }
    }

    async fn tag_order(&self, order: &str, name: &str, value: &str, _key: &str) -> Result<String, AccountsError> {
        let subscription = self.order(order).await?;
        let id = subscription.subscription_id;
        let present = self.fields("subscriptions", &id).await?;
        match present.iter().find(|f| f.name == name) {
            Some(f) if f.value == value => return Ok(id),
            Some(f) => {
                return Err(AccountsError::Invalid(format!(
                    "order {order} is tagged {name}={:?} already; a tag is set once",
                    f.value
                )))
            }
            None => {}
        }
        let what = format!("tag order {order}");
        let fields = serde_json::json!([{"name": name, "value": value}]);
        let path = format!("/1.0/kb/subscriptions/{id}/customFields");
        let answer =
            self.send(&what, self.writing(Method::POST, &path, "Order tagged in Concertim").json(&fields)).await?;
        match answer.status {
            StatusCode::CREATED | StatusCode::OK => Ok(id),
            _ => Err(Self::refused(&what, &answer).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invoice(items: serde_json::Value) -> KbInvoice {
        serde_json::from_value(serde_json::json!({
            "invoiceId": "i1", "accountId": "a1", "amount": 3.5, "balance": 0, "creditAdj": -3.5,
            "refundAdj": 0, "currency": "USD", "status": "COMMITTED", "items": items
        }))
        .unwrap()
    }

    #[test]
    fn charges_are_summed_per_subscription_and_name_their_resource_or_their_orders_stack() {
        let kb = invoice(serde_json::json!([
            {"invoiceItemId": "x1", "itemType": "USAGE", "subscriptionId": "s1", "amount": 1.25,
             "startDate": "2026-11-01", "endDate": "2026-12-01"},
            {"invoiceItemId": "x2", "itemType": "USAGE", "subscriptionId": "s1", "amount": 2.00,
             "startDate": "2026-11-01", "endDate": "2026-12-01"},
            {"invoiceItemId": "x3", "itemType": "RECURRING", "subscriptionId": "s2", "amount": 0.25},
            {"invoiceItemId": "x4", "itemType": "CBA_ADJ", "amount": -3.5},
            {"invoiceItemId": "x5", "itemType": "CREDIT_ADJ", "amount": -10},
        ]));
        let names = BTreeMap::from([
            ("s1".to_owned(), Named::Resource("vm-1".to_owned())),
            ("s2".to_owned(), Named::Order { stack_id: Some("st-1".into()), stack_name: Some("hpc".into()) }),
        ]);
        let shown = show("a1", kb, &names, "USD");
        assert_eq!(shown.items.len(), 3, "{:?}", shown.items);
        assert_eq!(shown.items["s1"].amount, Decimal::new(325, 2));
        assert_eq!(shown.items["s1"].resource_id.as_deref(), Some("vm-1"));
        assert_eq!(shown.items["s2"].openstack_stack_name.as_deref(), Some("hpc"));
        assert_eq!(shown.items["x4"].kind, "credits");
        assert_eq!(shown.credit_adj, Decimal::new(-35, 1));
    }

    #[test]
    fn the_credit_balance_is_read_from_killbills_account_cba_field() {
        let account: KbAccount =
            serde_json::from_str(r#"{"accountId":"a1","accountCBA":12.5,"currency":"USD"}"#).unwrap();
        assert_eq!(account.account_cba, Decimal::new(125, 1));
    }

    #[test]
    fn an_id_that_could_change_the_path_is_refused() {
        assert!(path_segment("3f0c1c5e-0b8e-4f6e-9d63-6d1d3c1b2a10").is_ok());
        for bad in ["", "../tenants", "a/b", "a?b=c", "a%2F"] {
            assert!(matches!(path_segment(bad), Err(AccountsError::NotFound(_))), "{bad}");
        }
    }
}
