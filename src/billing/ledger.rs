//! The embedded ledger: the default billing backend, in memory, in a file, or in the store.
//!
//! It keeps accounts by project id, subscriptions by resource uuid (each with its kind:
//! instance, volume, snapshot …), and usage by (resource, trackingId), with KillBill's idempotency rules (billing-apis.md §1.6-1.9): a
//! create finds an existing key and does nothing, a second cancel succeeds, a repeated
//! trackingId is "already recorded", and usage after the end is counted but not billed.
//!
//! It goes one step further than KillBill so that its final state does not depend on the order
//! messages arrive in, which is what lets `replay` answer "what would be billed" for any
//! capture:
//! - a subscription's start is the earliest `launched_at` any message reported for it;
//! - its end is the earliest cancel (instance delete, or project delete);
//! - its plan is the plan of the latest-dated evidence (creation at start, or a resize);
//! - usage totals count the records dated up to the end, whenever the end became known.
//!
//! The file is written whole to a temporary file beside it, synced, then renamed over it, so a
//! crash mid-write leaves the previous ledger intact. In the store ([`Ledger::in_store`]) each
//! account, subscription and usage record is a row, and a commit writes only the rows changed
//! since the previous one, in one transaction.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

mod accounts;

use super::{AccountFigures, Applied, Billing, BillingError, Context};
use crate::{
    event::{InstanceId, PlanName, ProjectId, ResourceKind, Timestamp, Unit},
    plan::{SubscriptionSpec, UsageSpec},
    price::{Catalog, PricedItem},
    store::{Store, StoreError},
};

/// The ledger file's format marker (also the store's `format` row); bumped on incompatible
/// changes.
const FORMAT: &str = "concertim-billing-ledger/1";

/// The embedded billing backend.
#[derive(Debug, Default)]
pub struct Ledger {
    // A std Mutex: no lock is held across an await, and every operation is a few map lookups.
    state: Mutex<State>,
    durable: Durable,
}

/// Where a commit makes the ledger durable.
#[derive(Debug, Default)]
enum Durable {
    /// Nowhere: lost at exit.
    #[default]
    Memory,
    /// A JSON file, rewritten whole.
    File(PathBuf),
    /// The store's ledger rows, written as they change.
    Store {
        store: Arc<Store>,
        /// Held from taking the changed rows to their write: two commits taking turns could
        /// otherwise write an older value of a row after a newer one.
        commits: tokio::sync::Mutex<()>,
    },
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    format: String,
    accounts: BTreeMap<ProjectId, Account>,
    subscriptions: BTreeMap<InstanceId, Subscription>,
    /// Credits deposited through the billing API, by request key.
    #[serde(default)]
    deposits: BTreeMap<String, Deposit>,
    /// Orders made through the billing API, by order id.
    #[serde(default)]
    orders: BTreeMap<String, Order>,
    /// What changed since the last commit: the store's rows to write.
    #[serde(skip)]
    changed: BTreeSet<Key>,
}

/// A row of the ledger in the store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    /// The format marker.
    Format,
    /// `account/<project>`.
    Account(ProjectId),
    /// `sub/<instance>`: the subscription without its usage.
    Subscription(InstanceId),
    /// `usage/<instance>/<tracking id>`: one notification's records.
    Usage(InstanceId, String),
    /// `deposit/<request key>`: credits deposited.
    Deposit(String),
    /// `order/<order id>`: an order.
    Order(String),
}

impl Key {
    fn row(&self) -> String {
        match self {
            Key::Format => "format".to_owned(),
            Key::Account(project) => format!("account/{project}"),
            Key::Subscription(instance) => format!("sub/{instance}"),
            Key::Usage(instance, tracking_id) => format!("usage/{instance}/{tracking_id}"),
            Key::Deposit(key) => format!("deposit/{key}"),
            Key::Order(id) => format!("order/{id}"),
        }
    }
}

/// An account's row. Each row names its own ids, so that loading never parses a key.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountValue {
    project: ProjectId,
    closed_at: Option<Timestamp>,
}

/// A subscription's row: everything but its usage, which has rows of its own.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionValue {
    instance: InstanceId,
    /// Rows written before resources other than instances were billed have none.
    #[serde(default)]
    kind: ResourceKind,
    project: ProjectId,
    start: Timestamp,
    end: Option<Timestamp>,
    plans: BTreeSet<(Timestamp, PlanName)>,
    flavor: Option<String>,
    display_name: Option<String>,
}

/// One tracking id's usage records.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageValue {
    instance: InstanceId,
    tracking_id: String,
    records: Vec<Record>,
}

/// A row's JSON value.
fn json(value: &impl Serialize) -> String {
    // Structs of strings, ids, timestamps and decimals (as text), in sequences: serialising them
    // cannot fail.
    serde_json::to_string(value).expect("ledger rows serialise")
}

impl State {
    /// The row of `key` as the store keeps it, or `None` when the ledger holds nothing under
    /// it (nothing is ever removed, so a changed key always has a row).
    fn row(&self, key: &Key) -> Option<(String, String)> {
        let value = match key {
            Key::Format => json(&FORMAT),
            Key::Account(project) => {
                let a = self.accounts.get(project)?;
                json(&AccountValue { project: project.clone(), closed_at: a.closed_at })
            }
            Key::Subscription(instance) => {
                let s = self.subscriptions.get(instance)?;
                json(&SubscriptionValue {
                    instance: instance.clone(),
                    kind: s.kind,
                    project: s.project.clone(),
                    start: s.start,
                    end: s.end,
                    plans: s.plans.clone(),
                    flavor: s.flavor.clone(),
                    display_name: s.display_name.clone(),
                })
            }
            Key::Usage(instance, tracking_id) => {
                let records = self.subscriptions.get(instance)?.usage.get(tracking_id)?;
                json(&UsageValue {
                    instance: instance.clone(),
                    tracking_id: tracking_id.clone(),
                    records: records.clone(),
                })
            }
            Key::Deposit(key) => json(self.deposits.get(key)?),
            Key::Order(id) => json(self.orders.get(id)?),
        };
        Some((key.row(), value))
    }

    /// The state the store's rows hold.
    ///
    /// # Errors
    /// The row that is not one the ledger writes, and why.
    fn from_rows(rows: &[(String, String)]) -> Result<State, (String, String)> {
        let mut state = State { format: FORMAT.to_owned(), ..State::default() };
        let mut usage = Vec::new();
        for (row, value) in rows {
            let bad = |detail: String| (row.clone(), detail);
            let parse_error = |e: serde_json::Error| bad(e.to_string());
            let key = if row == "format" {
                let format: String = serde_json::from_str(value).map_err(parse_error)?;
                if format != FORMAT {
                    return Err(bad(format!("format {format:?}, expected {FORMAT:?}")));
                }
                Key::Format
            } else if row.starts_with("account/") {
                let a: AccountValue = serde_json::from_str(value).map_err(parse_error)?;
                let key = Key::Account(a.project.clone());
                state.accounts.insert(a.project, Account { closed_at: a.closed_at });
                key
            } else if row.starts_with("sub/") {
                let s: SubscriptionValue = serde_json::from_str(value).map_err(parse_error)?;
                if s.plans.is_empty() {
                    return Err(bad("a subscription without a plan".to_owned()));
                }
                let key = Key::Subscription(s.instance.clone());
                state.subscriptions.insert(
                    s.instance,
                    Subscription {
                        kind: s.kind,
                        project: s.project,
                        start: s.start,
                        end: s.end,
                        plans: s.plans,
                        flavor: s.flavor,
                        display_name: s.display_name,
                        usage: BTreeMap::new(),
                    },
                );
                key
            } else if row.starts_with("usage/") {
                let u: UsageValue = serde_json::from_str(value).map_err(parse_error)?;
                let key = Key::Usage(u.instance.clone(), u.tracking_id.clone());
                usage.push((row, u));
                key
            } else if row.starts_with("deposit/") {
                let d: Deposit = serde_json::from_str(value).map_err(parse_error)?;
                let key = Key::Deposit(d.key.clone());
                state.deposits.insert(d.key.clone(), d);
                key
            } else if row.starts_with("order/") {
                let o: Order = serde_json::from_str(value).map_err(parse_error)?;
                let key = Key::Order(o.id.clone());
                state.orders.insert(o.id.clone(), o);
                key
            } else {
                return Err(bad("not a ledger row".to_owned()));
            };
            // A row under another key than its ids' would be written again under theirs.
            if key.row() != *row {
                return Err(bad(format!("its value belongs under {:?}", key.row())));
            }
        }
        for (row, u) in usage {
            let s = state
                .subscriptions
                .get_mut(&u.instance)
                .ok_or_else(|| (row.clone(), format!("usage of subscription {}, which has no row", u.instance)))?;
            s.usage.insert(u.tracking_id, u.records);
        }
        Ok(state)
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Account {
    closed_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Subscription {
    /// What the subscribed id is. Ledger files written before resources other than instances
    /// were billed have none.
    #[serde(default)]
    kind: ResourceKind,
    project: ProjectId,
    start: Timestamp,
    end: Option<Timestamp>,
    /// (effective from, plan): the creation plan at its start, and each resize.
    plans: BTreeSet<(Timestamp, PlanName)>,
    flavor: Option<String>,
    display_name: Option<String>,
    /// trackingId → records.
    usage: BTreeMap<String, Vec<Record>>,
}

/// Credits deposited through the billing API (its row names its own key).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Deposit {
    key: String,
    project: ProjectId,
    amount: Decimal,
    at: Timestamp,
}

/// An order made through the billing API (its row names its own id).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Order {
    id: String,
    project: ProjectId,
    created: Timestamp,
    cancelled: Option<Timestamp>,
    tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    unit: Unit,
    date: Timestamp,
    amount: Decimal,
}

impl Subscription {
    fn plan(&self) -> &PlanName {
        // Never empty: creation inserts the first entry.
        &self.plans.last().expect("a subscription has a plan").1
    }

    /// The end as billed: never before the start.
    fn billed_end(&self) -> Option<Timestamp> {
        self.end.map(|end| end.max(self.start))
    }
}

fn earliest(current: Option<Timestamp>, new: Timestamp) -> Timestamp {
    current.map_or(new, |c| c.min(new))
}

/// An account as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountRow {
    /// The project id (external key).
    pub project_id: ProjectId,
    /// `open` or `closed`.
    pub state: &'static str,
}

/// A subscription as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionRow {
    /// The resource's uuid (external key): an instance's, a volume's …
    pub instance_id: InstanceId,
    /// The kind of resource subscribed (`instance`, `volume`, `floating_ip` …). Left out of the
    /// serialised row: the columns a report prints are the report's to choose.
    #[serde(skip)]
    pub resource_type: ResourceKind,
    /// Its account.
    pub project_id: ProjectId,
    /// The current plan.
    pub plan: PlanName,
    /// `active` or `cancelled`.
    pub state: &'static str,
    /// Billing start.
    pub start: Timestamp,
    /// Billing end, when cancelled.
    pub end: Option<Timestamp>,
}

/// Billed usage of one unit on one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// The instance uuid.
    pub instance_id: InstanceId,
    /// The unit.
    pub unit: Unit,
    /// Sum of the records dated up to the subscription's end.
    pub amount: Decimal,
}

/// An item's key: (project, period start, resource, plan).
type ItemKey = (ProjectId, Timestamp, InstanceId, PlanName);

/// One invoice item the ledger's usage comes to (see [`Ledger::costs`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cost {
    /// The account's project.
    pub project: ProjectId,
    /// The billing period: [start, end).
    pub period: (Timestamp, Timestamp),
    /// The subscribed resource.
    pub resource: InstanceId,
    /// Its kind.
    pub kind: ResourceKind,
    /// The plan, the quantities and what they cost.
    pub item: PricedItem,
}

/// The ledger's whole content, in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Accounts by project id.
    pub accounts: Vec<AccountRow>,
    /// Subscriptions by instance uuid.
    pub subscriptions: Vec<SubscriptionRow>,
    /// Usage by instance uuid, then unit.
    pub usage: Vec<UsageRow>,
    /// Records dated after their subscription's end: kept, not billed.
    pub late_records: usize,
}

impl Ledger {
    /// An empty in-memory ledger.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Opens the ledger stored at `path`, or an empty one that [`Ledger::persist`] will create
    /// there.
    ///
    /// # Errors
    /// When the file exists but cannot be read or is not a ledger.
    pub fn open(path: &Path) -> Result<Self, BillingError> {
        let io = |source| BillingError::LedgerIo { path: path.display().to_string(), source };
        let state = match fs::read(path) {
            Ok(bytes) => {
                let state: State = serde_json::from_slice(&bytes).map_err(|e| BillingError::LedgerCorrupt {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                if state.format != FORMAT {
                    return Err(BillingError::LedgerCorrupt {
                        path: path.display().to_string(),
                        reason: format!("format {:?}, expected {FORMAT:?}", state.format),
                    });
                }
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io(e)),
        };
        Ok(Self { state: Mutex::new(state), durable: Durable::File(path.to_owned()) })
    }

    /// Opens the ledger kept in `store`'s ledger rows (empty when it has none). Each
    /// [`Billing::commit`] writes the rows changed since the previous one, in one transaction.
    ///
    /// # Errors
    /// When the store cannot be read, or holds a ledger row this version did not write.
    pub async fn in_store(store: Arc<Store>) -> Result<Ledger, BillingError> {
        let rows = store.ledger_rows().await?;
        let mut state = State::from_rows(&rows).map_err(|(row, detail)| StoreError::Corrupt {
            what: format!("store ({}): ledger row {row}", store.describe()),
            detail,
        })?;
        if rows.is_empty() {
            // A new ledger: its first commit marks the rows with their format.
            state.changed.insert(Key::Format);
        }
        let commits = tokio::sync::Mutex::new(());
        Ok(Self { state: Mutex::new(state), durable: Durable::Store { store, commits } })
    }

    /// Writes the rows changed since the last commit to the store; how many it wrote. On
    /// failure they stay marked as changed, for the next commit.
    async fn write_changes(&self, store: &Store, commits: &tokio::sync::Mutex<()>) -> Result<usize, BillingError> {
        let _turn = commits.lock().await;
        let (keys, rows) = {
            let mut state = self.lock();
            let keys = std::mem::take(&mut state.changed);
            let rows: Vec<_> = keys.iter().filter_map(|key| state.row(key)).collect();
            (keys, rows)
        };
        if let Err(e) = store.ledger_put(&rows).await {
            self.lock().changed.extend(keys);
            return Err(e.into());
        }
        Ok(rows.len())
    }

    /// Writes the ledger to its file (a no-op in memory or in the store, which
    /// [`Billing::commit`] writes): temporary file, fsync, rename, so a crash leaves either the
    /// old or the new ledger, never a torn one.
    ///
    /// # Errors
    /// When the file or its directory cannot be written.
    pub fn persist(&self) -> Result<(), BillingError> {
        let Durable::File(path) = &self.durable else { return Ok(()) };
        let io = |source| BillingError::LedgerIo { path: path.display().to_string(), source };
        let mut state = {
            let mut state = self.lock();
            // The file is written whole: what changed needs no tracking.
            state.changed.clear();
            state.clone()
        };
        state.format = FORMAT.to_owned();
        // Maps keyed by string newtypes, timestamps and decimals as strings: cannot fail.
        let bytes = serde_json::to_vec_pretty(&state).expect("ledger state serialises");
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        tmp.write_all(&bytes).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        // The rename is durable only once the directory entry is.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Everything the ledger holds, in key order.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let accounts = state
            .accounts
            .iter()
            .map(|(project, a)| AccountRow {
                project_id: project.clone(),
                state: if a.closed_at.is_some() { "closed" } else { "open" },
            })
            .collect();
        let mut subscriptions = Vec::new();
        let mut usage = Vec::new();
        let mut late_records = 0;
        for (instance, s) in &state.subscriptions {
            let end = s.billed_end();
            subscriptions.push(SubscriptionRow {
                instance_id: instance.clone(),
                resource_type: s.kind,
                project_id: s.project.clone(),
                plan: s.plan().clone(),
                state: if end.is_some() { "cancelled" } else { "active" },
                start: s.start,
                end,
            });
            let mut totals: BTreeMap<&Unit, Decimal> = BTreeMap::new();
            for record in s.usage.values().flatten() {
                if end.is_some_and(|end| record.date > end) {
                    late_records += 1;
                } else {
                    // Each record is at most billing.max_record_amount, so no real sum comes
                    // near Decimal's range; saturating keeps a forged ledger file from panicking.
                    let total = totals.entry(&record.unit).or_default();
                    *total = total.saturating_add(record.amount);
                }
            }
            usage.extend(totals.into_iter().map(|(unit, amount)| UsageRow {
                instance_id: instance.clone(),
                unit: unit.clone(),
                amount: amount.normalize(),
            }));
        }
        Snapshot { accounts, subscriptions, usage, late_records }
    }

    /// What the ledger's usage costs at the catalog's prices, as KillBill would invoice it: one
    /// item per subscription, plan and monthly billing period, the period aligned to the
    /// account's billing day (its first subscription's start day, UTC). A record is priced on
    /// the plan in force at its date; records after the subscription's end are not billed.
    /// Items in (project, period, resource, plan) order.
    // FIXME(billing): KillBill 0.22 dates a plan change by its day, so on that server the
    // records of a resize's day are priced at the new plan; here, as on 0.24, at the plan of
    // their instant.
    pub fn costs(&self, catalog: &Catalog) -> Vec<Cost> {
        self.costs_of(catalog, |_| true)
    }

    /// [`Ledger::costs`] of the projects `wanted` keeps.
    fn costs_of(&self, catalog: &Catalog, wanted: impl Fn(&ProjectId) -> bool) -> Vec<Cost> {
        let state = self.lock();
        let mut first: BTreeMap<&ProjectId, Timestamp> = BTreeMap::new();
        for s in state.subscriptions.values() {
            let start = first.entry(&s.project).or_insert(s.start);
            *start = (*start).min(s.start);
        }
        // (project, period start, resource, plan) → (period end, unit → total)
        let mut grouped: BTreeMap<ItemKey, (Timestamp, BTreeMap<String, Decimal>)> = BTreeMap::new();
        for (instance, s) in state.subscriptions.iter().filter(|(_, s)| wanted(&s.project)) {
            // `first` has every subscription's project: the index cannot miss.
            let bcd = crate::price::billing_day(first[&s.project]);
            let end = s.billed_end();
            for record in s.usage.values().flatten() {
                if end.is_some_and(|end| record.date > end) {
                    continue;
                }
                let plan = s.plans.iter().rev().find(|(from, _)| *from <= record.date).or(s.plans.first());
                let Some((_, plan)) = plan else { continue };
                let (from, to) = crate::price::period(bcd, record.date);
                let key = (s.project.clone(), from, instance.clone(), plan.clone());
                let entry = grouped.entry(key).or_insert_with(|| (to, BTreeMap::new()));
                let total = entry.1.entry(record.unit.to_string()).or_default();
                *total = total.saturating_add(record.amount);
            }
        }
        grouped
            .into_iter()
            .map(|((project, from, instance, plan), (to, totals))| {
                let kind = state.subscriptions.get(&instance).map(|s| s.kind).unwrap_or_default();
                Cost {
                    project,
                    period: (from, to),
                    resource: instance,
                    kind,
                    item: catalog.item(plan.as_str(), &totals),
                }
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (each operation mutates at
        // the end), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn subscription<'s>(state: &'s mut State, instance: &InstanceId) -> Result<&'s mut Subscription, BillingError> {
        state.subscriptions.get_mut(instance).ok_or_else(|| BillingError::NoSubscription(instance.clone()))
    }
}

impl Billing for Ledger {
    async fn ensure_account(&self, project: &ProjectId, _ctx: Context<'_>) -> Result<Applied, BillingError> {
        let mut state = self.lock();
        if state.accounts.contains_key(project) {
            return Ok(Applied::AlreadyDone);
        }
        state.accounts.insert(project.clone(), Account::default());
        state.changed.insert(Key::Account(project.clone()));
        Ok(Applied::Done)
    }

    async fn close_account(
        &self,
        project: &ProjectId,
        at: Timestamp,
        _ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let mut state = self.lock();
        let State { accounts, subscriptions, changed, .. } = &mut *state;
        let mut did = false;
        for (instance, s) in subscriptions.iter_mut().filter(|(_, s)| &s.project == project) {
            let end = earliest(s.end, at);
            if s.end != Some(end) {
                s.end = Some(end);
                changed.insert(Key::Subscription(instance.clone()));
                did = true;
            }
        }
        let account = accounts.entry(project.clone()).or_default();
        let closed_at = earliest(account.closed_at, at);
        if account.closed_at != Some(closed_at) {
            account.closed_at = Some(closed_at);
            changed.insert(Key::Account(project.clone()));
            did = true;
        }
        Ok(if did { Applied::Done } else { Applied::AlreadyDone })
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec, _ctx: Context<'_>) -> Result<Applied, BillingError> {
        let mut state = self.lock();
        let closed_at = state.accounts.get(&spec.project).and_then(|a| a.closed_at);
        if let Some(s) = state.subscriptions.get_mut(&spec.instance) {
            if s.project != spec.project {
                return Err(BillingError::ProjectMismatch {
                    instance: spec.instance.clone(),
                    owner: format!("project {}", s.project),
                    claimed: spec.project.clone(),
                });
            }
            // The key exists: KillBill would do nothing. The ledger keeps the earliest launch
            // and the creation evidence, so its state is the same in any arrival order.
            let start = s.start.min(spec.start);
            let moved = start != s.start;
            s.start = start;
            let evidence = s.plans.insert((spec.start, spec.plan.clone()));
            if moved || evidence {
                state.changed.insert(Key::Subscription(spec.instance.clone()));
            }
            return Ok(Applied::AlreadyDone);
        }
        state.subscriptions.insert(
            spec.instance.clone(),
            Subscription {
                kind: spec.kind,
                project: spec.project.clone(),
                start: spec.start,
                // A subscription created on a closed account ends when the account closed.
                end: closed_at,
                plans: BTreeSet::from([(spec.start, spec.plan.clone())]),
                flavor: spec.flavor.clone(),
                display_name: spec.display_name.clone(),
                usage: BTreeMap::new(),
            },
        );
        state.changed.insert(Key::Subscription(spec.instance.clone()));
        Ok(Applied::Done)
    }

    async fn change_plan(
        &self,
        instance: &InstanceId,
        plan: &PlanName,
        effective: Timestamp,
        _ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let mut state = self.lock();
        let s = Self::subscription(&mut state, instance)?;
        let before = s.plan().clone();
        let inserted = s.plans.insert((effective, plan.clone()));
        let moved = s.plan() != &before;
        if inserted {
            state.changed.insert(Key::Subscription(instance.clone()));
        }
        Ok(if inserted && moved { Applied::Done } else { Applied::AlreadyDone })
    }

    async fn cancel_subscription(
        &self,
        instance: &InstanceId,
        at: Timestamp,
        _ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let mut state = self.lock();
        let s = Self::subscription(&mut state, instance)?;
        let end = earliest(s.end, at);
        let changed = s.end != Some(end);
        s.end = Some(end);
        if changed {
            state.changed.insert(Key::Subscription(instance.clone()));
        }
        Ok(if changed { Applied::Done } else { Applied::AlreadyDone })
    }

    async fn record_usage(&self, usage: &UsageSpec, _ctx: Context<'_>) -> Result<Applied, BillingError> {
        let mut state = self.lock();
        let s = Self::subscription(&mut state, &usage.instance)?;
        if s.usage.contains_key(&usage.tracking_id) {
            return Ok(Applied::AlreadyDone);
        }
        let end = s.billed_end();
        let late = usage.records.iter().any(|r| end.is_some_and(|end| r.date > end));
        let records =
            usage.records.iter().map(|r| Record { unit: r.unit.clone(), date: r.date, amount: r.amount }).collect();
        s.usage.insert(usage.tracking_id.clone(), records);
        state.changed.insert(Key::Usage(usage.instance.clone(), usage.tracking_id.clone()));
        Ok(if late { Applied::Late } else { Applied::Done })
    }

    async fn commit(&self) -> Result<(), BillingError> {
        match &self.durable {
            Durable::Memory => {
                self.lock().changed.clear();
                Ok(())
            }
            Durable::File(_) => self.persist(),
            Durable::Store { store, commits } => self.write_changes(store, commits).await.map(|_| ()),
        }
    }

    /// The ledger's account id is the project's id (what the billing API is called with).
    async fn account_ref(&self, project: &ProjectId) -> Result<Option<String>, BillingError> {
        Ok(self.lock().accounts.contains_key(project).then(|| project.to_string()))
    }

    /// Its figures: the cost of the
    /// project's usage in the billing period holding `today` (the upcoming invoice), at the bundled catalog's prices (see [`Ledger::costs`]), shown for the calendar
    /// month as KillBill's figures are; the credits are what the billing API deposited less
    /// the invoices, less this cost (§1.4).
    // FIXME(billing): a deployment that bootstraps KillBill with a catalog of its own
    // (`killbill bootstrap --catalog FILE`) sees the bundled catalog's prices here.
    async fn account_figures(
        &self,
        project: &ProjectId,
        today: time::Date,
    ) -> Result<Option<AccountFigures>, BillingError> {
        let (known, first) = {
            let state = self.lock();
            let first = state.subscriptions.values().filter(|s| &s.project == project).map(|s| s.start).min();
            (state.accounts.contains_key(project), first)
        };
        let (month_start, month_end) = super::killbill::month_of(today);
        let Some(first) = first else {
            return Ok(known.then(|| AccountFigures {
                account_id: project.to_string(),
                cost: Decimal::ZERO,
                credits: self.credit_balance(project, today),
                period_start: month_start,
                period_end: month_end,
                resources: Vec::new(),
            }));
        };
        let catalog = Catalog::bundled()
            .map_err(|e| BillingError::Protocol { what: "price the ledger's usage".into(), detail: e.to_string() })?;
        let midnight = time::OffsetDateTime::new_utc(today, time::Time::MIDNIGHT);
        let today_ts = Timestamp::from_unix(midnight.unix_timestamp()).unwrap_or(first);
        let (start, _) = crate::price::period(crate::price::billing_day(first), today_ts);
        // The team's cost and each device's come from the same priced items, so they agree.
        let items: Vec<(String, Decimal)> = self
            .costs_of(catalog, |p| p == project)
            .into_iter()
            .filter(|c| c.period.0 == start)
            .map(|c| (c.resource.to_string(), c.item.amount))
            .collect();
        let cost: Decimal = items.iter().map(|(_, amount)| *amount).sum();
        Ok(Some(AccountFigures {
            account_id: project.to_string(),
            cost,
            credits: self.credit_balance(project, today) - cost,
            // The period Concertim shows is the calendar month, as with KillBill.
            period_start: month_start,
            period_end: month_end,
            resources: super::ResourceCost::summed(items),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{MessageId, Meta},
        plan::UsageRecord,
    };

    fn ts(text: &str) -> Timestamp {
        Timestamp::parse(text).unwrap()
    }

    fn meta() -> Meta {
        Meta {
            message_id: MessageId::parse("m").unwrap(),
            event_type: "t".into(),
            publisher_id: "t".into(),
            priority: "INFO".into(),
            timestamp: ts("2025-01-01T00:00:00Z"),
            project_name: None,
        }
    }

    fn spec(start: &str, plan: &str) -> SubscriptionSpec {
        SubscriptionSpec {
            instance: InstanceId::parse("i").unwrap(),
            kind: crate::event::ResourceKind::Instance,
            project: ProjectId::parse("p").unwrap(),
            plan: PlanName::parse(plan).unwrap(),
            start: ts(start),
            flavor: None,
            display_name: None,
        }
    }

    fn usage(tracking: &str, date: &str, amount: i64) -> UsageSpec {
        UsageSpec {
            instance: InstanceId::parse("i").unwrap(),
            tracking_id: tracking.into(),
            records: vec![UsageRecord {
                unit: Unit::parse("u").unwrap(),
                date: ts(date),
                amount: Decimal::from(amount),
            }],
        }
    }

    #[tokio::test]
    async fn a_second_create_finds_the_key_and_does_nothing() {
        let ledger = Ledger::in_memory();
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let p = ProjectId::parse("p").unwrap();
        assert_eq!(ledger.ensure_account(&p, ctx).await.unwrap(), Applied::Done);
        assert_eq!(ledger.ensure_account(&p, ctx).await.unwrap(), Applied::AlreadyDone);
        let s = spec("2025-01-01T10:00:00Z", "a");
        assert_eq!(ledger.ensure_subscription(&s, ctx).await.unwrap(), Applied::Done);
        assert_eq!(ledger.ensure_subscription(&s, ctx).await.unwrap(), Applied::AlreadyDone);
    }

    #[tokio::test]
    async fn a_repeated_tracking_id_is_already_recorded_and_counted_once() {
        let ledger = Ledger::in_memory();
        let m = meta();
        let ctx = Context { meta: &m, redelivered: true };
        ledger.ensure_subscription(&spec("2025-01-01T10:00:00Z", "a"), ctx).await.unwrap();
        let u = usage("t1", "2025-01-01T11:00:00Z", 2);
        assert_eq!(ledger.record_usage(&u, ctx).await.unwrap(), Applied::Done);
        assert_eq!(ledger.record_usage(&u, ctx).await.unwrap(), Applied::AlreadyDone);
        assert_eq!(ledger.snapshot().usage[0].amount, Decimal::from(2));
    }

    #[tokio::test]
    async fn usage_after_the_end_is_late_and_not_billed_whatever_the_order() {
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let i = InstanceId::parse("i").unwrap();
        let early = Ledger::in_memory();
        early.ensure_subscription(&spec("2025-01-01T10:00:00Z", "a"), ctx).await.unwrap();
        early.cancel_subscription(&i, ts("2025-01-01T12:00:00Z"), ctx).await.unwrap();
        assert_eq!(early.record_usage(&usage("t", "2025-01-01T13:00:00Z", 1), ctx).await.unwrap(), Applied::Late);
        let late = Ledger::in_memory();
        late.ensure_subscription(&spec("2025-01-01T10:00:00Z", "a"), ctx).await.unwrap();
        late.record_usage(&usage("t", "2025-01-01T13:00:00Z", 1), ctx).await.unwrap();
        late.cancel_subscription(&i, ts("2025-01-01T12:00:00Z"), ctx).await.unwrap();
        assert_eq!(early.snapshot(), late.snapshot());
        assert!(early.snapshot().usage.is_empty());
        assert_eq!(early.snapshot().late_records, 1);
    }

    #[tokio::test]
    async fn project_deleted_before_created_leaves_a_closed_account_and_cancels_later_subscriptions() {
        let ledger = Ledger::in_memory();
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let p = ProjectId::parse("p").unwrap();
        ledger.close_account(&p, ts("2025-01-02T00:00:00Z"), ctx).await.unwrap();
        assert_eq!(ledger.ensure_account(&p, ctx).await.unwrap(), Applied::AlreadyDone);
        ledger.ensure_subscription(&spec("2025-01-01T10:00:00Z", "a"), ctx).await.unwrap();
        let snap = ledger.snapshot();
        assert_eq!(snap.accounts[0].state, "closed");
        assert_eq!(snap.subscriptions[0].end, Some(ts("2025-01-02T00:00:00Z")));
    }

    #[tokio::test]
    async fn costs_are_one_item_per_plan_and_billing_period_from_the_accounts_billing_day_rounded_once() {
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let i = InstanceId::parse("i").unwrap();
        let xml = r#"<catalog><currencies><currency>USD</currency></currencies><plans>
            <plan name="small"><tieredBlock><unit>u</unit><size>1</size><prices><price><currency>USD</currency><value>0.001</value></price></prices></tieredBlock></plan>
            <plan name="big"><tieredBlock><unit>u</unit><size>10</size><prices><price><currency>USD</currency><value>0.1</value></price></prices></tieredBlock></plan>
            </plans></catalog>"#;
        let catalog = Catalog::parse(xml).unwrap();
        let ledger = Ledger::in_memory();
        // Billing day: the 3rd (the start); the plan changes on the 10th; the end is on 04-05.
        ledger.ensure_subscription(&spec("2025-03-03T09:00:00Z", "small"), ctx).await.unwrap();
        ledger.change_plan(&i, &PlanName::parse("big").unwrap(), ts("2025-03-10T00:00:00Z"), ctx).await.unwrap();
        ledger.record_usage(&usage("a", "2025-03-03T09:00:00Z", 1_005), ctx).await.unwrap();
        ledger.record_usage(&usage("b", "2025-03-12T00:00:00Z", 15), ctx).await.unwrap();
        ledger.record_usage(&usage("c", "2025-04-03T00:00:00Z", 5), ctx).await.unwrap();
        ledger.record_usage(&usage("late", "2025-04-06T00:00:00Z", 1_000), ctx).await.unwrap();
        ledger.cancel_subscription(&i, ts("2025-04-05T00:00:00Z"), ctx).await.unwrap();
        let costs: Vec<(String, String, String)> = ledger
            .costs(&catalog)
            .into_iter()
            .map(|c| (c.period.0.to_string(), c.item.plan, c.item.amount.to_string()))
            .collect();
        assert_eq!(
            costs,
            [
                // 1005 × 0.001 = 1.005 → 1.01 (half up); 15 in blocks of 10 → 2 × 0.1.
                ("2025-03-03T00:00:00Z".into(), "big".into(), "0.20".into()),
                ("2025-03-03T00:00:00Z".into(), "small".into(), "1.01".into()),
                // The next period; the record after the end is not billed.
                ("2025-04-03T00:00:00Z".into(), "big".into(), "0.10".into()),
            ]
        );
    }

    #[tokio::test]
    async fn a_teams_figures_are_its_current_periods_cost_at_the_bundled_prices_and_no_credits() {
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let ledger = Ledger::in_memory();
        let p = ProjectId::parse("p").unwrap();
        ledger.ensure_account(&p, ctx).await.unwrap();
        ledger.ensure_subscription(&spec("2025-03-03T09:00:00Z", "openstack-standard-monthly"), ctx).await.unwrap();
        let mut hour = usage("tb1:09", "2025-03-03T09:00:00Z", 3_600);
        hour.records[0].unit = Unit::parse("openstack-vcpu-seconds").unwrap();
        ledger.record_usage(&hour, ctx).await.unwrap();
        let today = time::macros::date!(2025 - 03 - 20);
        let figures = ledger.account_figures(&p, today).await.unwrap().unwrap();
        // 3600 vCPU-s × 0.00001 = 0.036 → 0.04: the invoice of the period from the 3rd.
        assert_eq!((figures.account_id.as_str(), figures.cost.to_string()), ("p", "0.04".to_owned()));
        assert_eq!(figures.credits, -figures.cost);
        assert_eq!(
            (figures.period_start, figures.period_end),
            (time::macros::date!(2025 - 03 - 01), time::macros::date!(2025 - 03 - 31))
        );
        // The next period has no usage yet.
        let april = ledger.account_figures(&p, time::macros::date!(2025 - 04 - 03)).await.unwrap().unwrap();
        assert_eq!(april.cost, Decimal::ZERO);
        assert_eq!(ledger.account_figures(&ProjectId::parse("q").unwrap(), today).await.unwrap(), None);
        // Its account id is the project's.
        assert_eq!(ledger.account_ref(&p).await.unwrap().as_deref(), Some("p"));
    }

    #[tokio::test]
    async fn each_resources_cost_is_its_own_priced_items_and_they_sum_to_the_teams_cost() {
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let ledger = Ledger::in_memory();
        let p = ProjectId::parse("p").unwrap();
        ledger.ensure_account(&p, ctx).await.unwrap();
        let vcpu = Unit::parse("openstack-vcpu-seconds").unwrap();
        for (id, seconds) in [("i", 3_600), ("j", 36_000)] {
            let mut s = spec("2025-03-03T09:00:00Z", "openstack-standard-monthly");
            s.instance = InstanceId::parse(id).unwrap();
            ledger.ensure_subscription(&s, ctx).await.unwrap();
            let mut u = usage(&format!("t-{id}"), "2025-03-03T09:00:00Z", seconds);
            u.instance = s.instance.clone();
            u.records[0].unit = vcpu.clone();
            ledger.record_usage(&u, ctx).await.unwrap();
        }
        let figures = ledger.account_figures(&p, time::macros::date!(2025 - 03 - 20)).await.unwrap().unwrap();
        // Each rounded on its own item: 3600 × 0.00001 = 0.036 → 0.04; 36000 × 0.00001 = 0.36.
        let shown: Vec<(&str, String)> =
            figures.resources.iter().map(|r| (r.resource_id.as_str(), r.amount.to_string())).collect();
        assert_eq!(shown, [("i", "0.04".to_owned()), ("j", "0.36".to_owned())]);
        assert_eq!(figures.resources.iter().map(|r| r.amount).sum::<Decimal>(), figures.cost);
    }

    #[tokio::test]
    async fn the_plan_is_the_latest_dated_one_in_any_order() {
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let i = InstanceId::parse("i").unwrap();
        let big = PlanName::parse("big").unwrap();
        let a = Ledger::in_memory();
        a.ensure_subscription(&spec("2025-01-01T10:00:00Z", "small"), ctx).await.unwrap();
        a.change_plan(&i, &big, ts("2025-01-01T11:00:00Z"), ctx).await.unwrap();
        let b = Ledger::in_memory();
        b.ensure_subscription(&spec("2025-01-01T10:30:00Z", "big"), ctx).await.unwrap();
        b.change_plan(&i, &big, ts("2025-01-01T11:00:00Z"), ctx).await.unwrap();
        b.ensure_subscription(&spec("2025-01-01T10:00:00Z", "small"), ctx).await.unwrap();
        assert_eq!(a.snapshot(), b.snapshot());
        assert_eq!(a.snapshot().subscriptions[0].plan, big);
    }

    #[tokio::test]
    async fn a_persisted_ledger_reopens_with_the_same_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let ledger = Ledger::open(&path).unwrap();
        ledger.ensure_subscription(&spec("2025-01-01T10:00:00Z", "a"), ctx).await.unwrap();
        ledger.record_usage(&usage("t", "2025-01-01T11:00:00Z", 3), ctx).await.unwrap();
        ledger.persist().unwrap();
        assert_eq!(Ledger::open(&path).unwrap().snapshot(), ledger.snapshot());
    }

    /// A ledger with an account, a subscription resized and cancelled, and two usage records.
    async fn fill(ledger: &Ledger, ctx: Context<'_>) {
        let i = InstanceId::parse("i").unwrap();
        ledger.ensure_account(&ProjectId::parse("p").unwrap(), ctx).await.unwrap();
        ledger.ensure_subscription(&spec("2025-01-01T10:00:00Z", "small"), ctx).await.unwrap();
        ledger.change_plan(&i, &PlanName::parse("big").unwrap(), ts("2025-01-01T11:00:00Z"), ctx).await.unwrap();
        ledger.record_usage(&usage("t1", "2025-01-01T11:30:00Z", 3), ctx).await.unwrap();
        ledger.record_usage(&usage("t2", "2025-01-01T13:00:00Z", 4), ctx).await.unwrap();
        ledger.cancel_subscription(&i, ts("2025-01-01T12:00:00Z"), ctx).await.unwrap();
    }

    #[tokio::test]
    async fn a_ledger_committed_into_a_sqlite_store_reopens_with_the_same_content() {
        // Arrange
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let store = Arc::new(Store::open(&url).await.unwrap());
        let ledger = Ledger::in_store(Arc::clone(&store)).await.unwrap();
        fill(&ledger, ctx).await;
        // Act
        ledger.commit().await.unwrap();
        drop(ledger);
        drop(store);
        let reopened = Ledger::in_store(Arc::new(Store::open(&url).await.unwrap())).await.unwrap();
        // Assert
        let snapshot = reopened.snapshot();
        assert_eq!(snapshot.subscriptions[0].plan, PlanName::parse("big").unwrap());
        assert_eq!((snapshot.usage[0].amount, snapshot.late_records), (Decimal::from(3), 1));
        let expected = Ledger::in_memory();
        fill(&expected, ctx).await;
        assert_eq!(snapshot, expected.snapshot());
    }

    #[tokio::test]
    async fn a_commit_writes_only_the_rows_changed_since_the_last_one() {
        // Arrange: a committed ledger (format, account, subscription, two usage rows).
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let store = Arc::new(Store::in_memory().await.unwrap());
        let ledger = Ledger::in_store(Arc::clone(&store)).await.unwrap();
        fill(&ledger, ctx).await;
        let Durable::Store { commits, .. } = &ledger.durable else { unreachable!("a store ledger") };
        assert_eq!(ledger.write_changes(&store, commits).await.unwrap(), 5);
        // Act: one more record.
        ledger.record_usage(&usage("t3", "2025-01-01T11:45:00Z", 1), ctx).await.unwrap();
        let written = ledger.write_changes(&store, commits).await.unwrap();
        // Assert
        assert_eq!(written, 1);
        assert_eq!(store.ledger_rows().await.unwrap().len(), 6);
        assert_eq!(ledger.write_changes(&store, commits).await.unwrap(), 0, "nothing changed since");
        // Closing the project before the cancel changes the account and the subscription.
        let p = ProjectId::parse("p").unwrap();
        ledger.close_account(&p, ts("2025-01-01T11:50:00Z"), ctx).await.unwrap();
        assert_eq!(ledger.write_changes(&store, commits).await.unwrap(), 2);
        let reopened = Ledger::in_store(Arc::clone(&store)).await.unwrap();
        assert_eq!(reopened.snapshot(), ledger.snapshot());
    }

    #[tokio::test]
    async fn a_repeated_message_changes_no_row() {
        let m = meta();
        let ctx = Context { meta: &m, redelivered: true };
        let store = Arc::new(Store::in_memory().await.unwrap());
        let ledger = Ledger::in_store(Arc::clone(&store)).await.unwrap();
        fill(&ledger, ctx).await;
        ledger.commit().await.unwrap();
        fill(&ledger, ctx).await;
        let Durable::Store { commits, .. } = &ledger.durable else { unreachable!("a store ledger") };
        assert_eq!(ledger.write_changes(&store, commits).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_failed_commit_keeps_its_changes_for_the_next_one() {
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let store = Arc::new(Store::in_memory().await.unwrap());
        let ledger = Ledger::in_store(Arc::clone(&store)).await.unwrap();
        fill(&ledger, ctx).await;
        store.pool.close().await;
        let err = ledger.commit().await.unwrap_err();
        assert_eq!(err.class(), crate::class::ErrorClass::Transient, "{err}");
        assert_eq!(ledger.lock().changed.len(), 5);
    }

    #[tokio::test]
    async fn a_store_row_the_ledger_did_not_write_is_refused_naming_it() {
        let store = Arc::new(Store::in_memory().await.unwrap());
        store.ledger_put(&[("sub/x".to_owned(), "{}".to_owned())]).await.unwrap();
        let err = Ledger::in_store(Arc::clone(&store)).await.unwrap_err();
        assert_eq!(err.class(), crate::class::ErrorClass::Permanent);
        assert!(err.to_string().contains("ledger row sub/x"), "{err}");
    }

    /// A volume's subscription, as `spec` makes an instance's.
    fn volume_spec() -> SubscriptionSpec {
        SubscriptionSpec {
            instance: InstanceId::parse("v").unwrap(),
            kind: ResourceKind::Volume,
            plan: PlanName::parse("openstack-volume-monthly").unwrap(),
            flavor: Some("ssd".into()),
            ..spec("2025-01-01T10:00:00Z", "a")
        }
    }

    /// The kind of each subscription, by id.
    fn kinds(ledger: &Ledger) -> Vec<(String, ResourceKind)> {
        ledger.snapshot().subscriptions.into_iter().map(|s| (s.instance_id.to_string(), s.resource_type)).collect()
    }

    #[tokio::test]
    async fn a_subscription_keeps_its_kind_in_the_file_and_in_the_store() {
        // Arrange
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let file = Ledger::open(&path).unwrap();
        let store = Arc::new(Store::in_memory().await.unwrap());
        let stored = Ledger::in_store(Arc::clone(&store)).await.unwrap();
        for ledger in [&file, &stored] {
            ledger.ensure_subscription(&spec("2025-01-01T10:00:00Z", "a"), ctx).await.unwrap();
            ledger.ensure_subscription(&volume_spec(), ctx).await.unwrap();
            // Act
            ledger.commit().await.unwrap();
        }
        // Assert
        let expected = vec![("i".to_owned(), ResourceKind::Instance), ("v".to_owned(), ResourceKind::Volume)];
        assert_eq!(kinds(&Ledger::open(&path).unwrap()), expected);
        assert_eq!(kinds(&Ledger::in_store(store).await.unwrap()), expected);
    }

    #[tokio::test]
    async fn a_subscription_stored_without_a_kind_reads_as_an_instance() {
        // Arrange: a file and a store row as written before kinds, with a volume in them.
        let m = meta();
        let ctx = Context { meta: &m, redelivered: false };
        // A whole file holds subscriptions by id; a store row is one subscription.
        let without_kind = |text: &str| {
            let strip = |s: &mut serde_json::Value| s.as_object_mut().unwrap().remove("kind").expect("a kind");
            let mut value: serde_json::Value = serde_json::from_str(text).unwrap();
            match value.get_mut("subscriptions") {
                Some(subs) => subs.as_object_mut().unwrap().values_mut().for_each(|s| {
                    strip(s);
                }),
                None => {
                    strip(&mut value);
                }
            }
            value.to_string()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let file = Ledger::open(&path).unwrap();
        file.ensure_subscription(&volume_spec(), ctx).await.unwrap();
        file.persist().unwrap();
        fs::write(&path, without_kind(&fs::read_to_string(&path).unwrap())).unwrap();
        let store = Arc::new(Store::in_memory().await.unwrap());
        let stored = Ledger::in_store(Arc::clone(&store)).await.unwrap();
        stored.ensure_subscription(&volume_spec(), ctx).await.unwrap();
        stored.commit().await.unwrap();
        let rows: Vec<(String, String)> = store
            .ledger_rows()
            .await
            .unwrap()
            .into_iter()
            .map(|(row, value)| if row.starts_with("sub/") { (row, without_kind(&value)) } else { (row, value) })
            .collect();
        store.ledger_put(&rows).await.unwrap();
        // Act
        let reopened = [Ledger::open(&path).unwrap(), Ledger::in_store(store).await.unwrap()];
        // Assert
        for ledger in reopened {
            assert_eq!(kinds(&ledger), [("v".to_owned(), ResourceKind::Instance)]);
        }
    }

    #[test]
    fn a_file_that_is_not_a_ledger_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        fs::write(&path, "{\"x\":1}").unwrap();
        let err = Ledger::open(&path).unwrap_err().to_string();
        assert!(err.contains("ledger.json") && err.contains("not a concertim-billing ledger"), "{err}");
    }
}
