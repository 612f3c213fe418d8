//! The fake KillBill's state (tenant, catalog, accounts, subscriptions, custom fields, usage,
//! credits) and the arithmetic it bills by: what is read back as a ledger snapshot and what a
//! dry-run invoice amounts to.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use concertim_billing::{
    billing::ledger::{AccountRow, Snapshot, SubscriptionRow, UsageRow},
    event::{InstanceId, PlanName, ProjectId, ResourceKind, Timestamp, Unit},
};
use rust_decimal::Decimal;

/// Everything the fake holds, behind one lock.
#[derive(Default)]
pub(super) struct Fake {
    /// The server's base URL, for `Location` headers.
    pub(super) base: String,
    pub(super) next_id: u64,
    pub(super) accounts: Vec<Account>,
    pub(super) subscriptions: Vec<Subscription>,
    pub(super) fields: Vec<Field>,
    pub(super) usage: Vec<Usage>,
    pub(super) tenant: bool,
    pub(super) catalogs: Vec<String>,
    /// Effective dates, plans and units of the uploaded catalogs.
    pub(super) versions: Vec<Timestamp>,
    pub(super) plans: BTreeSet<String>,
    pub(super) units: BTreeSet<String>,
    /// Request bodies the OpenAPI spec rejects.
    pub(super) violations: Vec<String>,
    /// Credit (CBA) per account id, from `POST /1.0/kb/credits`.
    pub(super) credits: BTreeMap<String, Decimal>,
    /// Each credit, in order: (account id, invoice id, CBA item id, credit item id, amount,
    /// description). Each is an invoice of its own, as KillBill makes it.
    pub(super) deposits: Vec<(String, String, String, String, Decimal, String)>,
    /// USD per unit of usage, for dry-run invoices (the test's own price list).
    pub(super) prices: BTreeMap<String, Decimal>,
    /// Error codes answered so far (1031, 50000, 3000, 9000 …), by code.
    pub(super) codes: BTreeMap<i64, usize>,
    /// The first cancel of each subscription takes this long to commit.
    pub(super) cancel_hold: Option<std::time::Duration>,
    /// Subscriptions whose first cancel has started (it holds their row until it commits).
    pub(super) cancel_locks: HashSet<String>,
    /// Subscriptions whose first cancel has committed (their row is free again); a cancel
    /// waiting for the row watches it.
    pub(super) committed: tokio::sync::watch::Sender<HashSet<String>>,
    /// (subscription id, trackingId) of every usage call stored: KillBill's unique index, so
    /// that a long run does not scan every row per call.
    pub(super) tracking: HashSet<(String, String)>,
}

pub(super) struct Account {
    pub(super) id: String,
    /// The account id when it was made without one, as KillBill keys it.
    pub(super) external_key: String,
    pub(super) name: Option<String>,
    pub(super) currency: Option<String>,
    /// When `DELETE /1.0/kb/accounts/{id}` closed it: KillBill then tags it
    /// AUTO_INVOICING_OFF and blocks changes (400/6000) from then on.
    pub(super) closed: Option<Timestamp>,
}

pub(super) struct Subscription {
    pub(super) id: String,
    pub(super) account_id: String,
    pub(super) bundle_id: String,
    pub(super) external_key: String,
    pub(super) plan: String,
    pub(super) start: Timestamp,
    pub(super) cancelled: Option<Timestamp>,
    /// Dates of its plan changes: a cancel or change dated before the last one is refused.
    pub(super) changes: Vec<Timestamp>,
}

impl Subscription {
    /// The previous transition: KillBill refuses cancellations and changes dated before it.
    pub(super) fn last_transition(&self) -> Timestamp {
        self.changes.iter().copied().fold(self.start, Timestamp::max)
    }
}

pub(super) struct Field {
    /// Its `customFieldId`.
    pub(super) id: String,
    pub(super) object_id: String,
    pub(super) object_type: &'static str,
    pub(super) name: String,
    pub(super) value: String,
}

pub(super) struct Usage {
    pub(super) subscription_id: String,
    pub(super) tracking_id: String,
    pub(super) unit: String,
    pub(super) date: Timestamp,
    pub(super) amount: Decimal,
}

impl Fake {
    /// A fresh object id, in KillBill's UUID form.
    pub(super) fn id(&mut self) -> String {
        self.next_id += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.next_id)
    }

    /// The account of a project (its external key).
    pub(super) fn account_by_key(&self, key: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| a.external_key == key)
    }

    /// The subscription with this external key.
    pub(super) fn subscription_by_key(&self, key: &str) -> Option<&Subscription> {
        self.subscriptions.iter().find(|x| x.external_key == key)
    }

    /// Records a catalog version with its plans and units.
    pub(super) fn upload_catalog(&mut self, xml: &str) {
        self.catalogs.push(xml.to_owned());
        self.versions.extend(concertim_billing::billing::killbill::catalog_effective_dates(xml).first().copied());
        let names = |tag: &str| -> Vec<String> {
            xml.split(&format!("<{tag} name=\""))
                .skip(1)
                .filter_map(|rest| rest.split('"').next())
                .map(str::to_owned)
                .collect()
        };
        self.plans.extend(names("plan"));
        self.units.extend(names("unit"));
    }

    /// Usage of the account's subscriptions at the test's prices.
    pub(super) fn upcoming(&self, account_id: &str) -> Decimal {
        self.usage
            .iter()
            .filter(|u| self.subscriptions.iter().any(|x| x.id == u.subscription_id && x.account_id == account_id))
            .map(|u| u.amount * self.prices.get(&u.unit).copied().unwrap_or_default())
            .sum()
    }

    /// The dry-run invoice's usage items: one per subscription and unit with a price, as
    /// (subscription, unit, quantity, amount), in the order the subscriptions were made.
    pub(super) fn upcoming_items(&self, account_id: &str) -> Vec<(&Subscription, String, Decimal, Decimal)> {
        let mut items = Vec::new();
        for sub in self.subscriptions.iter().filter(|x| x.account_id == account_id) {
            let mut units: BTreeMap<&str, Decimal> = BTreeMap::new();
            for u in self.usage.iter().filter(|u| u.subscription_id == sub.id) {
                *units.entry(u.unit.as_str()).or_default() += u.amount;
            }
            for (unit, quantity) in units {
                let Some(price) = self.prices.get(unit) else { continue };
                items.push((sub, unit.to_owned(), quantity, quantity * price));
            }
        }
        items
    }

    /// Every usage row stored: (subscription external key, unit, trackingId, amount).
    pub(super) fn usage_records(&self) -> Vec<(String, String, String, Decimal)> {
        let keys: BTreeMap<&str, &str> =
            self.subscriptions.iter().map(|x| (x.id.as_str(), x.external_key.as_str())).collect();
        self.usage
            .iter()
            .map(|u| {
                let key = keys.get(u.subscription_id.as_str()).copied().unwrap_or_default().to_owned();
                (key, u.unit.clone(), u.tracking_id.clone(), u.amount)
            })
            .collect()
    }

    /// The usage recorded for the subscription with this key, dated `from` or later.
    pub(super) fn usage_since(&self, key: &str, from: Timestamp) -> Decimal {
        let Some(sub) = self.subscription_by_key(key) else { return Decimal::ZERO };
        self.usage.iter().filter(|u| u.subscription_id == sub.id && u.date >= from).map(|u| u.amount).sum()
    }

    /// What KillBill would bill, in the ledger's terms: accounts by key, subscriptions by key,
    /// usage per unit counting records dated up to the subscription's end.
    pub(super) fn snapshot(&self) -> Snapshot {
        let mut accounts: Vec<AccountRow> = self
            .accounts
            .iter()
            .map(|a| AccountRow {
                project_id: ProjectId::parse(a.external_key.clone()).unwrap(),
                // The service's deletion policy keeps the account open in KillBill and marks it.
                state: if a.closed.is_some()
                    || self.fields.iter().any(|f| f.object_id == a.id && f.name == "openstack_closed_at")
                {
                    "closed"
                } else {
                    "open"
                },
            })
            .collect();
        accounts.sort_by(|a, b| a.project_id.cmp(&b.project_id));
        let mut subscriptions: Vec<SubscriptionRow> = self
            .subscriptions
            .iter()
            .map(|x| SubscriptionRow {
                instance_id: InstanceId::parse(x.external_key.clone()).unwrap(),
                // The kind as the service wrote it; a subscription without it is an instance's.
                resource_type: self
                    .fields
                    .iter()
                    .find(|f| f.object_id == x.id && f.name == "resource_type")
                    .and_then(|f| ResourceKind::parse(&f.value))
                    .unwrap_or_default(),
                project_id: ProjectId::parse(
                    self.accounts.iter().find(|a| a.id == x.account_id).unwrap().external_key.clone(),
                )
                .unwrap(),
                plan: PlanName::parse(x.plan.clone()).unwrap(),
                state: if x.cancelled.is_some() { "cancelled" } else { "active" },
                start: x.start,
                end: x.cancelled,
            })
            .collect();
        subscriptions.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        let mut totals: BTreeMap<(String, String), Decimal> = BTreeMap::new();
        for u in &self.usage {
            let sub = self.subscriptions.iter().find(|x| x.id == u.subscription_id).unwrap();
            // What an invoice bills: records from the start up to the end, in catalog units.
            if u.date >= sub.start && sub.cancelled.is_none_or(|end| u.date <= end) && self.units.contains(&u.unit) {
                *totals.entry((sub.external_key.clone(), u.unit.clone())).or_default() += u.amount;
            }
        }
        let usage = totals
            .into_iter()
            .map(|((instance, unit), amount)| UsageRow {
                instance_id: InstanceId::parse(instance).unwrap(),
                unit: Unit::parse(unit).unwrap(),
                amount: amount.normalize(),
            })
            .collect();
        Snapshot { accounts, subscriptions, usage, late_records: 0 }
    }
}

/// The fake's clock: the real time (KillBill's, outside its test mode).
pub(super) fn now() -> Timestamp {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp::from_unix(since.as_secs() as i64).unwrap()
}

/// KillBill takes a date (midnight UTC) or a date-time wherever it takes a date.
pub fn parse_time(text: Option<&String>) -> Option<Timestamp> {
    let text = text?;
    Timestamp::parse(text).ok().or_else(|| Timestamp::parse(&format!("{text}T00:00:00Z")).ok())
}
