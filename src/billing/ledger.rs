//! The embedded ledger: the default billing backend, in memory or in a file.
//!
//! It keeps accounts by project id, subscriptions by instance uuid, and usage by
//! (instance, trackingId), with KillBill's idempotency rules (billing-apis.md §1.6-1.9): a
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
//! crash mid-write leaves the previous ledger intact.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{Applied, Billing, BillingError, Context};
use crate::{
    event::{InstanceId, PlanName, ProjectId, Timestamp, Unit},
    plan::{SubscriptionSpec, UsageSpec},
};

/// The ledger file's format marker; bumped on incompatible changes.
const FORMAT: &str = "concertim-billing-ledger/1";

/// The embedded billing backend.
#[derive(Debug, Default)]
pub struct Ledger {
    // A std Mutex: no lock is held across an await, and every operation is a few map lookups.
    state: Mutex<State>,
    path: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    format: String,
    accounts: BTreeMap<ProjectId, Account>,
    subscriptions: BTreeMap<InstanceId, Subscription>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Account {
    closed_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Subscription {
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
    /// The instance uuid (external key).
    pub instance_id: InstanceId,
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
        Ok(Self { state: Mutex::new(state), path: Some(path.to_owned()) })
    }

    /// Writes the ledger to its file (a no-op in memory): temporary file, fsync, rename, so a
    /// crash leaves either the old or the new ledger, never a torn one.
    ///
    /// # Errors
    /// When the file or its directory cannot be written.
    pub fn persist(&self) -> Result<(), BillingError> {
        let Some(path) = &self.path else { return Ok(()) };
        let io = |source| BillingError::LedgerIo { path: path.display().to_string(), source };
        let mut state = self.lock().clone();
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
        Ok(Applied::Done)
    }

    async fn close_account(
        &self,
        project: &ProjectId,
        at: Timestamp,
        _ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let mut state = self.lock();
        let mut changed = false;
        for s in state.subscriptions.values_mut().filter(|s| &s.project == project) {
            let end = earliest(s.end, at);
            changed |= s.end != Some(end);
            s.end = Some(end);
        }
        let account = state.accounts.entry(project.clone()).or_default();
        let closed_at = earliest(account.closed_at, at);
        changed |= account.closed_at != Some(closed_at);
        account.closed_at = Some(closed_at);
        Ok(if changed { Applied::Done } else { Applied::AlreadyDone })
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
            s.start = s.start.min(spec.start);
            s.plans.insert((spec.start, spec.plan.clone()));
            return Ok(Applied::AlreadyDone);
        }
        state.subscriptions.insert(
            spec.instance.clone(),
            Subscription {
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
        Ok(if inserted && s.plan() != &before { Applied::Done } else { Applied::AlreadyDone })
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
        Ok(if late { Applied::Late } else { Applied::Done })
    }

    async fn commit(&self) -> Result<(), BillingError> {
        self.persist()
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
        }
    }

    fn spec(start: &str, plan: &str) -> SubscriptionSpec {
        SubscriptionSpec {
            instance: InstanceId::parse("i").unwrap(),
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

    #[test]
    fn a_file_that_is_not_a_ledger_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        fs::write(&path, "{\"x\":1}").unwrap();
        let err = Ledger::open(&path).unwrap_err().to_string();
        assert!(err.contains("ledger.json") && err.contains("not a concertim-billing ledger"), "{err}");
    }
}
