//! The billing API's account calls on the embedded ledger, so the API can be tried without a
//! billing application. An account's id is its project's id.
//!
//! Invoices are computed, never stored: one per finished billing period that has priced usage
//! (dated at the period's end, one `cost` line per resource), and one per deposit (a `credits`
//! line), as KillBill makes them. Credits are used as KillBill uses its credit balance: a
//! period's invoice takes what the balance holds at its date, up to its amount (a negative
//! `credits` line, `credit_adj`), and leaves the rest as its `balance`, which a later deposit
//! pays (oldest invoice first).

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::{Deposit, Key, Ledger, Order};
use crate::billing::accounts::{Accounts, AccountsError, Invoice, InvoiceLine, InvoicePage};
use crate::billing::{Billing, BillingError};
use crate::event::{ProjectId, Timestamp};
use crate::price::Catalog;

/// An order's id: the request's key, shortened (it is a digest, so still unique).
fn order_id(key: &str) -> String {
    format!("order-{}", key.chars().take(32).collect::<String>())
}

/// The UTC day of `t`, `YYYY-MM-DD`.
fn day(t: Timestamp) -> String {
    t.as_offset().date().to_string()
}

/// An account's invoices as of a moment, and its credit balance then.
struct Statement {
    /// Finished periods' and deposits' invoices, oldest first.
    invoices: Vec<Invoice>,
    /// The current period's invoice, when it has usage.
    draft: Option<Invoice>,
    /// The credit balance.
    cba: Decimal,
}

impl Ledger {
    fn project_of(&self, account: &str) -> Result<ProjectId, AccountsError> {
        let unknown = || AccountsError::NotFound(format!("billing account {account} does not exist"));
        let project = ProjectId::parse(account).map_err(|_| unknown())?;
        if self.lock().accounts.contains_key(&project) {
            Ok(project)
        } else {
            Err(unknown())
        }
    }

    fn statement(&self, project: &ProjectId, at: Timestamp) -> Result<Statement, AccountsError> {
        let catalog = Catalog::bundled()
            .map_err(|e| BillingError::Protocol { what: "price the ledger's usage".into(), detail: e.to_string() })?;
        let currency = catalog.currency.clone();
        // Period start → (end, resource → (kind, amount)).
        let mut periods: BTreeMap<Timestamp, (Timestamp, BTreeMap<String, Decimal>)> = BTreeMap::new();
        for cost in self.costs_of(catalog, |p| p == project) {
            let (end, lines) = periods.entry(cost.period.0).or_insert_with(|| (cost.period.1, BTreeMap::new()));
            *end = cost.period.1;
            *lines.entry(cost.resource.to_string()).or_default() += cost.item.amount;
        }
        let mut deposits: Vec<Deposit> =
            self.lock().deposits.values().filter(|d| &d.project == project).cloned().collect();
        deposits.sort_by(|a, b| (a.at, &a.key).cmp(&(b.at, &b.key)));
        let account = project.to_string();
        let invoice = |id: String, date: Timestamp, status: &str, items: BTreeMap<String, InvoiceLine>| {
            let amount = items.values().filter(|l| l.kind == "cost").map(|l| l.amount).sum();
            Invoice {
                invoice_id: id,
                account_id: account.clone(),
                invoice_number: None,
                invoice_date: Some(day(date)),
                target_date: Some(day(date)),
                status: status.to_owned(),
                currency: currency.clone(),
                amount,
                balance: amount,
                credit_adj: Decimal::ZERO,
                refund_adj: Decimal::ZERO,
                items,
            }
        };
        let line = |kind: &'static str, amount: Decimal, from: Timestamp, to: Timestamp, resource: Option<String>| {
            InvoiceLine {
                kind,
                amount,
                start_date: Some(day(from)),
                end_date: Some(day(to)),
                currency: currency.clone(),
                openstack_stack_id: None,
                openstack_stack_name: None,
                resource_id: resource,
            }
        };
        // (date, invoice) of every finished period and deposit, then the balance run over them.
        let mut dated: Vec<(Timestamp, Invoice)> = Vec::new();
        let mut draft = None;
        for (start, (end, resources)) in periods {
            let items = resources
                .into_iter()
                .map(|(resource, amount)| (resource.clone(), line("cost", amount, start, end, Some(resource))))
                .collect();
            let id = format!("{account}/{}", day(start));
            if end <= at {
                dated.push((end, invoice(id, end, "COMMITTED", items)));
            } else if start <= at {
                draft = Some(invoice(id, end, "DRAFT", items));
            }
        }
        for d in deposits.iter().filter(|d| d.at <= at) {
            let items = BTreeMap::from([(d.key.clone(), line("credits", d.amount, d.at, d.at, None))]);
            dated.push((d.at, invoice(format!("{account}/credit/{}", order_id(&d.key)), d.at, "COMMITTED", items)));
        }
        dated.sort_by(|a, b| (a.0, &a.1.invoice_id).cmp(&(b.0, &b.1.invoice_id)));
        let mut cba = Decimal::ZERO;
        let mut invoices: Vec<Invoice> = Vec::with_capacity(dated.len());
        for (n, (date, mut inv)) in dated.into_iter().enumerate() {
            inv.invoice_number = Some((n + 1).to_string());
            let credited: Decimal = inv.items.values().filter(|l| l.kind == "credits").map(|l| l.amount).sum();
            cba += credited;
            invoices.push(inv);
            // A new invoice takes the balance; a deposit pays what earlier invoices still owe,
            // oldest first (as KillBill does).
            let owing: Vec<usize> = if credited > Decimal::ZERO { (0..invoices.len()).collect() } else { vec![n] };
            for i in owing {
                let paid = &mut invoices[i];
                let used = cba.min(paid.balance).max(Decimal::ZERO);
                if used > Decimal::ZERO {
                    cba -= used;
                    paid.credit_adj -= used;
                    paid.balance -= used;
                    let id = format!("{}/credits/{}", paid.invoice_id, paid.items.len());
                    paid.items.insert(id, line("credits", -used, date, date, None));
                }
            }
        }
        Ok(Statement { invoices, draft, cba })
    }

    /// The account's credit balance at the end of `today`'s month (what its invoices left of its
    /// deposits; none when it cannot be priced).
    pub(super) fn credit_balance(&self, project: &ProjectId, today: time::Date) -> Decimal {
        self.statement(project, Timestamp::now().min(end_of(today))).map_or(Decimal::ZERO, |s| s.cba)
    }

    /// Writes the API's change now, so its answer is never ahead of what the ledger keeps.
    async fn keep(&self) -> Result<(), AccountsError> {
        Ok(self.commit().await?)
    }
}

fn end_of(today: time::Date) -> Timestamp {
    let (_, end) = crate::billing::killbill::month_of(today);
    let next = end.next_day().unwrap_or(end);
    let midnight = time::OffsetDateTime::new_utc(next, time::Time::MIDNIGHT);
    Timestamp::from_unix(midnight.unix_timestamp() - 1).unwrap_or_else(|_| Timestamp::now())
}

impl Accounts for Ledger {
    async fn deposit(&self, account: &str, amount: Decimal, key: &str) -> Result<Decimal, AccountsError> {
        let project = self.project_of(account)?;
        {
            let mut state = self.lock();
            if let Some(done) = state.deposits.get(key) {
                return Ok(done.amount);
            }
            let deposit = Deposit { key: key.to_owned(), project, amount, at: Timestamp::now() };
            state.deposits.insert(key.to_owned(), deposit);
            state.changed.insert(Key::Deposit(key.to_owned()));
        }
        self.keep().await?;
        Ok(amount)
    }

    async fn remaining_credits(&self, account: &str, today: time::Date) -> Result<Decimal, AccountsError> {
        let project = self.project_of(account)?;
        let statement = self.statement(&project, Timestamp::now().min(end_of(today)))?;
        let upcoming = statement.draft.map_or(Decimal::ZERO, |d| d.amount);
        Ok(statement.cba - upcoming.max(Decimal::ZERO))
    }

    async fn draft_invoice(&self, account: &str, today: time::Date) -> Result<Option<Invoice>, AccountsError> {
        let project = self.project_of(account)?;
        Ok(self.statement(&project, Timestamp::now().min(end_of(today)))?.draft)
    }

    async fn invoices(&self, account: &str, offset: u64, limit: u64) -> Result<InvoicePage, AccountsError> {
        let project = self.project_of(account)?;
        let all = self.statement(&project, Timestamp::now())?.invoices;
        let total = u64::try_from(all.len()).unwrap_or(u64::MAX);
        let invoices = all
            .into_iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .collect();
        Ok(InvoicePage { total, invoices })
    }

    async fn invoice(&self, account: &str, invoice_id: &str) -> Result<Invoice, AccountsError> {
        let project = self.project_of(account)?;
        self.statement(&project, Timestamp::now())?
            .invoices
            .into_iter()
            .find(|i| i.invoice_id == invoice_id)
            .ok_or_else(|| AccountsError::NotFound(format!("account {account} has no invoice {invoice_id}")))
    }

    async fn create_order(&self, account: &str, key: &str, _plan: &str) -> Result<String, AccountsError> {
        let project = self.project_of(account)?;
        let id = order_id(key);
        {
            let mut state = self.lock();
            if state.orders.contains_key(&id) {
                return Ok(id);
            }
            let order =
                Order { id: id.clone(), project, created: Timestamp::now(), cancelled: None, tags: BTreeMap::new() };
            state.orders.insert(id.clone(), order);
            state.changed.insert(Key::Order(id.clone()));
        }
        self.keep().await?;
        Ok(id)
    }

    async fn delete_order(&self, order: &str, _key: &str) -> Result<String, AccountsError> {
        {
            let mut state = self.lock();
            let found = state
                .orders
                .get_mut(order)
                .ok_or_else(|| AccountsError::NotFound(format!("order {order} does not exist")))?;
            if found.cancelled.is_some() {
                return Ok(order.to_owned());
            }
            found.cancelled = Some(Timestamp::now());
            state.changed.insert(Key::Order(order.to_owned()));
        }
        self.keep().await?;
        Ok(order.to_owned())
    }

    async fn tag_order(&self, order: &str, name: &str, value: &str, _key: &str) -> Result<String, AccountsError> {
        {
            let mut state = self.lock();
            let found = state
                .orders
                .get_mut(order)
                .ok_or_else(|| AccountsError::NotFound(format!("order {order} does not exist")))?;
            match found.tags.get(name) {
                Some(v) if v == value => return Ok(order.to_owned()),
                Some(v) => {
                    return Err(AccountsError::Invalid(format!(
                        "order {order} is tagged {name}={v:?} already; a tag is set once"
                    )))
                }
                None => {}
            }
            found.tags.insert(name.to_owned(), value.to_owned());
            state.changed.insert(Key::Order(order.to_owned()));
        }
        self.keep().await?;
        Ok(order.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        billing::{Billing, Context},
        event::{InstanceId, MessageId, Meta, PlanName, ResourceKind, Unit},
        plan::{SubscriptionSpec, UsageRecord, UsageSpec},
        store::Store,
    };

    fn ts(text: &str) -> Timestamp {
        Timestamp::parse(text).unwrap()
    }

    /// An account `p` whose instance used 3600 vCPU-seconds (0.036 → 0.04 USD) on 2025-03-03,
    /// and an account `q` with nothing.
    async fn billed(ledger: &Ledger) {
        let meta = Meta {
            message_id: MessageId::parse("m").unwrap(),
            event_type: "t".into(),
            publisher_id: "x".into(),
            priority: "INFO".into(),
            timestamp: ts("2025-03-03T09:00:00Z"),
            project_name: None,
        };
        let ctx = Context { meta: &meta, redelivered: false };
        for p in ["p", "q"] {
            ledger.ensure_account(&ProjectId::parse(p).unwrap(), ctx).await.unwrap();
        }
        let spec = SubscriptionSpec {
            instance: InstanceId::parse("i").unwrap(),
            kind: ResourceKind::Instance,
            project: ProjectId::parse("p").unwrap(),
            plan: PlanName::parse("openstack-standard-monthly").unwrap(),
            start: ts("2025-03-03T09:00:00Z"),
            flavor: None,
            display_name: None,
        };
        ledger.ensure_subscription(&spec, ctx).await.unwrap();
        let usage = UsageSpec {
            instance: InstanceId::parse("i").unwrap(),
            tracking_id: "h1".into(),
            records: vec![UsageRecord {
                unit: Unit::parse("openstack-vcpu-seconds").unwrap(),
                date: ts("2025-03-03T09:00:00Z"),
                amount: Decimal::from(3_600),
            }],
        };
        ledger.record_usage(&usage, ctx).await.unwrap();
    }

    #[tokio::test]
    async fn a_finished_period_is_an_invoice_that_a_later_deposit_pays_leaving_the_rest_as_credits() {
        let ledger = Ledger::in_memory();
        billed(&ledger).await;
        let page = ledger.invoices("p", 0, 100).await.unwrap();
        assert_eq!(page.total, 1);
        let march = &page.invoices[0];
        assert_eq!(
            (march.amount, march.balance, march.status.as_str()),
            (Decimal::new(4, 2), Decimal::new(4, 2), "COMMITTED")
        );
        assert_eq!(march.items["i"].resource_id.as_deref(), Some("i"));
        assert_eq!(ledger.remaining_credits("p", time::macros::date!(2026 - 12 - 06)).await.unwrap(), Decimal::ZERO);

        ledger.deposit("p", Decimal::from(10), "k1").await.unwrap();
        let page = ledger.invoices("p", 0, 100).await.unwrap();
        assert_eq!(page.total, 2, "the deposit is an invoice of its own");
        let march = &page.invoices[0];
        assert_eq!((march.balance, march.credit_adj), (Decimal::ZERO, Decimal::new(-4, 2)));
        assert_eq!(
            ledger.remaining_credits("p", time::macros::date!(2026 - 12 - 06)).await.unwrap(),
            Decimal::new(996, 2)
        );
        let deposit = &page.invoices[1];
        assert!(deposit.items.values().any(|l| l.kind == "credits" && l.amount == Decimal::from(10)));
    }

    #[tokio::test]
    async fn an_invoice_is_found_only_under_its_own_account() {
        let ledger = Ledger::in_memory();
        billed(&ledger).await;
        let id = ledger.invoices("p", 0, 1).await.unwrap().invoices[0].invoice_id.clone();
        assert_eq!(ledger.invoice("p", &id).await.unwrap().invoice_id, id);
        assert!(matches!(ledger.invoice("q", &id).await, Err(AccountsError::NotFound(_))));
        assert!(matches!(ledger.invoices("nobody", 0, 1).await, Err(AccountsError::NotFound(_))));
    }

    #[tokio::test]
    async fn a_deposit_or_an_order_sent_again_under_its_key_is_made_once_and_kept_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let ledger = Ledger::in_store(Arc::new(Store::open(&url).await.unwrap())).await.unwrap();
        billed(&ledger).await;
        for _ in 0..2 {
            assert_eq!(ledger.deposit("q", Decimal::from(30), "key-1").await.unwrap(), Decimal::from(30));
        }
        let order = ledger.create_order("q", "key-2", "plan").await.unwrap();
        assert_eq!(ledger.create_order("q", "key-2", "plan").await.unwrap(), order);
        assert_ne!(ledger.create_order("q", "key-3", "plan").await.unwrap(), order);
        ledger.tag_order(&order, "openstack_stack_id", "s1", "key-4").await.unwrap();
        ledger.tag_order(&order, "openstack_stack_id", "s1", "key-5").await.unwrap();
        assert!(matches!(
            ledger.tag_order(&order, "openstack_stack_id", "s2", "k").await,
            Err(AccountsError::Invalid(_))
        ));
        ledger.delete_order(&order, "key-6").await.unwrap();
        ledger.delete_order(&order, "key-7").await.unwrap();
        assert!(matches!(ledger.delete_order("order-nope", "k").await, Err(AccountsError::NotFound(_))));
        drop(ledger);

        let reopened = Ledger::in_store(Arc::new(Store::open(&url).await.unwrap())).await.unwrap();
        assert_eq!(
            reopened.remaining_credits("q", time::macros::date!(2026 - 12 - 06)).await.unwrap(),
            Decimal::from(30)
        );
        let state = reopened.lock();
        assert_eq!(state.deposits.len(), 1);
        assert_eq!(state.orders[&order].tags["openstack_stack_id"], "s1");
        assert!(state.orders[&order].cancelled.is_some());
    }
}
