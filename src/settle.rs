//! Settlement: the instances' timelines → usage posted once per (instance, period).
//!
//! A pass reads the instances with work due from the state store, rebuilds each one's timeline
//! from its facts, and posts what is due through the billing backend:
//! - the subscription (from the first launch, on the first flavor's plan), once;
//! - each plan change at the launch that changed the flavor's plan, once;
//! - each settled period's usage, all units in one call, under the trackingId `tb1:<period>`;
//! - a recomputed period's positive difference under `tb1:<period>:c<hash of the new totals>`
//!   (replicas that saw the same facts compute the same id); a negative one is never posted as
//!   usage: it is recorded as a shortfall, counted and logged, for a credit or a review;
//! - the cancel at the end, once the last period is posted.
//!
//! Every step is claimed in the store before it is sent and marked posted only after the backend
//! confirmed it, so a crash anywhere loses nothing, and a step that a dead replica claimed is
//! taken over after `state.claim_lease_s` and sent again under the same id (the backend answers
//! "already recorded"). `run` passes every `billing.time.settle_every_s` (a period is due once
//! its end, or the instance's end, plus `billing.time.grace_s` has passed); `replay` passes once,
//! as of the latest notification it read, with the running instances' last period cut there.

use std::{collections::BTreeMap, sync::Arc};

use rust_decimal::Decimal;

use crate::{
    billing::{self, Applied, Billing, Context},
    config::Settings,
    event::{InstanceId, MessageId, Meta, ProjectId, Timestamp, Unit},
    plan::{Action, SubscriptionSpec, UsageRecord, UsageSpec},
    store::{Claim, PostingState, Shortfall, Store, StoreError},
    timeline::{self, fnv64, AuditMismatch, Fact, Kind, Timeline},
};

/// Metric: settlement steps by what became of them.
pub const SETTLED: &str = "concertim_billing_settlement_steps_total";
/// Metric: recomputed periods below what was posted (never posted as negative usage).
pub const SHORTFALLS: &str = "concertim_billing_settlement_shortfalls_total";
/// Metric: Nova audits that disagree with the timeline.
pub const AUDIT_MISMATCHES: &str = "concertim_billing_audit_mismatches_total";

/// Periods one review settles at most; the rest wait for the next pass (an instance first seen
/// a year after its launch must not hold a pass for minutes).
const MAX_PERIODS_PER_REVIEW: usize = 2_000;

/// Up to when a pass settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Horizon {
    /// `run`: periods whose end (or the instance's end) plus the grace is at or before `now`.
    Now(i64),
    /// `replay`: everything before this time, the running instances' last period cut there.
    AsOf(i64),
}

impl Horizon {
    fn now(self) -> i64 {
        match self {
            Horizon::Now(t) | Horizon::AsOf(t) => t,
        }
    }
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Pass {
    /// Instances reviewed.
    pub reviewed: usize,
    /// Usage calls this pass sent (periods and corrections; not the ones it found posted by
    /// another replica).
    pub posted: usize,
    /// Of which corrections of a period settled before.
    pub corrections: usize,
    /// Steps the backend already had (a replay, a taken-over claim).
    pub already_done: usize,
    /// Usage calls the backend refused as dated after the subscription's end.
    pub late: usize,
    /// Recomputed periods below what was posted.
    pub shortfalls: Vec<Shortfall>,
    /// Nova audits that disagree with a timeline: (instance, the figures).
    pub audits: Vec<(String, AuditMismatch)>,
    /// Steps that failed (retried on the next pass), in words.
    pub failures: Vec<String>,
    /// Instances skipped because another replica holds one of their steps.
    pub held: usize,
}

/// Settles instance timelines into a billing backend.
#[derive(Debug)]
pub struct Settler<B> {
    settings: Settings,
    billing: Arc<B>,
    store: Arc<Store>,
    /// Who claims steps: unique per process, so a restarted replica never mistakes a dead
    /// predecessor's claim for its own.
    owner: String,
}

/// Why one review stopped early.
enum Stop {
    /// Another replica holds a step.
    Held,
    /// A step failed: its reason.
    Failed(String),
}

impl<B: Billing> Settler<B> {
    /// A settler over a backend and a store.
    pub fn new(settings: Settings, billing: Arc<B>, store: Arc<Store>) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let owner = format!("{}-{}-{:x}", hostname(), std::process::id(), nanos);
        Self { settings, billing, store, owner }
    }

    /// The store it reads.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Settles everything due at the horizon.
    ///
    /// # Errors
    /// When the store cannot be read or written (a backend failure is not an error: it is in
    /// [`Pass::failures`] and retried on the next pass).
    pub async fn pass(&self, horizon: Horizon) -> Result<Pass, StoreError> {
        let mut pass = Pass::default();
        let mut seen = std::collections::HashSet::new();
        loop {
            let due = self.store.due(horizon.now(), 10_000).await?;
            let fresh: Vec<String> = due.into_iter().filter(|id| seen.insert(id.clone())).collect();
            if fresh.is_empty() {
                break;
            }
            for id in &fresh {
                pass.reviewed += 1;
                match self.review(id, horizon, &mut pass).await? {
                    Ok(()) => {}
                    Err(Stop::Held) => pass.held += 1,
                    Err(Stop::Failed(reason)) => {
                        tracing::warn!(instance = %id, %reason, "settlement step failed; the next pass tries again");
                        pass.failures.push(format!("{id}: {reason}"));
                    }
                }
            }
        }
        for s in &pass.shortfalls {
            metrics::counter!(SHORTFALLS).increment(1);
            tracing::warn!(
                instance = %s.resource, project = %s.project, period = %at(s.period_start), unit = %s.unit,
                billed = %s.billed, due = %s.due,
                "a recomputed period is below what was posted: not posted as negative usage; credit or review it"
            );
        }
        for (id, a) in &pass.audits {
            metrics::counter!(AUDIT_MISMATCHES).increment(1);
            tracing::warn!(
                instance = %id, audit_begin = %at(a.begin), audit_end = %at(a.end),
                audited_vcpu_seconds = %a.audited_vcpu_s, timeline_vcpu_seconds = %a.timeline_vcpu_s,
                "Nova's usage audit disagrees with the timeline"
            );
        }
        Ok(pass)
    }

    async fn review(&self, id: &str, horizon: Horizon, pass: &mut Pass) -> Result<Result<(), Stop>, StoreError> {
        let Some(res) = self.store.resource(id).await? else { return Ok(Ok(())) };
        let mut facts = Vec::with_capacity(res.facts.len());
        for text in &res.facts {
            match serde_json::from_str::<Fact>(text) {
                Ok(fact) => facts.push(fact),
                Err(e) => return Ok(Err(Stop::Failed(format!("a stored fact is unreadable ({e}): {text:.200}")))),
            }
        }
        let (Ok(instance), Ok(project)) = (InstanceId::parse(&res.id), ProjectId::parse(&res.project)) else {
            return Ok(Err(Stop::Failed("the stored instance or project id is not an id".into())));
        };
        let tl = Timeline::of(&facts, res.project_closed_at);
        if res.dirty_from.is_some() {
            pass.audits.extend(timeline::audit(&facts, &tl).into_iter().map(|a| (res.id.clone(), a)));
        }
        let (Some(first), Some(size)) = (tl.first_launch, tl.first_size()) else {
            // Never launched (a failed build), or ended before it ran: nothing is billed, and no
            // subscription is left behind. A later launch fact makes it due again.
            self.store.reviewed(id, res.version, None, res.settled_through).await?;
            return Ok(Ok(()));
        };
        let time = &self.settings.billing.time;
        let len = time.period.seconds();
        let first_period = time.period.start_of(first);
        let end = tl.end;
        let grace = i64::try_from(time.grace_s).unwrap_or(i64::MAX);
        let until = |p0: i64| end.map_or(p0 + len, |e| e.min(p0 + len));
        let due = |p0: i64| match horizon {
            Horizon::Now(now) => end.is_none_or(|e| p0 < e) && until(p0).saturating_add(grace) <= now,
            Horizon::AsOf(t) => p0 < end.map_or(t, |e| e.min(t)),
        };
        let window_end = |p0: i64| match horizon {
            Horizon::Now(_) => p0 + len,
            Horizon::AsOf(t) => (p0 + len).min(t),
        };
        let mut start = res.settled_through.unwrap_or(first_period).max(first_period);
        if let Some(dirty) = res.dirty_from {
            start = start.min(time.period.start_of(dirty)).max(first_period);
        }
        let mut stepper = Steps { settler: self, instance: &instance, now: horizon.now(), pass };

        // The subscription, from the first launch on the first flavor's plan.
        let plan = self.settings.billing.plan_for(Some(size.name.as_str()).filter(|n| !n.is_empty())).clone();
        let spec = SubscriptionSpec {
            instance: instance.clone(),
            project: project.clone(),
            plan,
            start: ts(first),
            flavor: Some(size.name.clone()).filter(|n| !n.is_empty()),
            display_name: None,
        };
        let subscribe = [Action::EnsureAccount { project: project.clone() }, Action::EnsureSubscription(spec)];
        if let Err(stop) = stepper.once("sub", Some(first), "", &subscribe).await? {
            return Ok(Err(stop));
        }

        let postings = self.store.postings(id, Some(start)).await?;
        let mut by_period: BTreeMap<i64, Vec<&crate::store::Posting>> = BTreeMap::new();
        for p in postings.iter().filter(|p| p.id.starts_with("tb1:")) {
            if let Some(p0) = p.period_start {
                by_period.entry(p0).or_default().push(p);
            }
        }
        let changes = tl.flavor_changes();
        let mut p0 = start;
        let mut reviewed_periods = 0;
        while due(p0) && reviewed_periods < MAX_PERIODS_PER_REVIEW {
            // A plan change inside the period goes first, at the launch that made it.
            let mut previous = self.settings.billing.plan_for(Some(size.name.as_str())).clone();
            for (t, name) in &changes {
                let plan = self.settings.billing.plan_for(Some(name)).clone();
                if (p0..p0 + len).contains(t) && plan != previous {
                    let change =
                        [Action::ChangePlan { instance: instance.clone(), plan: plan.clone(), effective: ts(*t) }];
                    if let Err(stop) =
                        stepper.once(&format!("plan:{}", at(*t)), Some(*t), plan.as_str(), &change).await?
                    {
                        return Ok(Err(stop));
                    }
                }
                previous = plan;
            }
            let held = tl.held(p0, window_end(p0), &time.policy());
            let Some(amounts) = timeline::amounts(&held, time.unit) else {
                return Ok(Err(Stop::Failed(format!("the amounts of period {} overflow", at(p0)))));
            };
            let amounts: Vec<(String, Decimal)> = amounts.into_iter().map(|(k, a)| (time.unit_name(k), a)).collect();
            if let Some((unit, amount)) = amounts.iter().find(|(_, a)| *a > self.settings.billing.max_record_amount) {
                return Ok(Err(Stop::Failed(format!(
                    "period {}: {unit} amount {amount} is above billing.max_record_amount; raise it if this is real usage",
                    at(p0)
                ))));
            }
            let date = ts(p0.max(first));
            let existing = by_period.get(&p0).map(Vec::as_slice).unwrap_or_default();
            // A step claimed by a replica that died is sent again as it was claimed: the
            // backend may hold it already under that id.
            for p in existing.iter().filter(|p| p.state == PostingState::Claimed) {
                let records = decode_body(&p.body);
                let usage = [usage_action(&instance, &p.id, &records, date)];
                if let Err(stop) = stepper.once(&p.id, Some(p0), &p.body, &usage).await? {
                    return Ok(Err(stop));
                }
            }
            let mut billed: BTreeMap<String, Decimal> = BTreeMap::new();
            for p in existing {
                for (unit, amount) in decode_body(&p.body) {
                    *billed.entry(unit).or_default() += amount;
                }
            }
            let base = format!("tb1:{}", at(p0));
            if existing.is_empty() {
                if !amounts.is_empty() {
                    let body = encode_body(&amounts);
                    let usage = [usage_action(&instance, &base, &amounts, date)];
                    match stepper.once(&base, Some(p0), &body, &usage).await? {
                        Ok(sent) => stepper.pass.posted += usize::from(sent),
                        Err(stop) => return Ok(Err(stop)),
                    }
                }
            } else {
                let mut more = Vec::new();
                let units: std::collections::BTreeSet<&String> =
                    billed.keys().chain(amounts.iter().map(|(u, _)| u)).collect();
                for unit in units {
                    let due_amount = amounts.iter().find(|(u, _)| u == unit).map_or(Decimal::ZERO, |(_, a)| *a);
                    let was = billed.get(unit).copied().unwrap_or_default();
                    if due_amount > was {
                        more.push((unit.clone(), due_amount - was));
                    } else if due_amount < was {
                        let shortfall = Shortfall {
                            resource: res.id.clone(),
                            project: res.project.clone(),
                            period_start: p0,
                            unit: unit.clone(),
                            billed: was.normalize().to_string(),
                            due: due_amount.normalize().to_string(),
                            noticed_at: horizon.now(),
                        };
                        if self.store.add_shortfall(&shortfall).await? {
                            stepper.pass.shortfalls.push(shortfall);
                        }
                    }
                }
                if !more.is_empty() {
                    let id = format!("{base}:c{:016x}", fnv64(encode_body(&amounts).as_bytes()));
                    let usage = [usage_action(&instance, &id, &more, date)];
                    match stepper.once(&id, Some(p0), &encode_body(&more), &usage).await? {
                        Ok(sent) => {
                            stepper.pass.posted += usize::from(sent);
                            stepper.pass.corrections += usize::from(sent);
                        }
                        Err(stop) => return Ok(Err(stop)),
                    }
                }
            }
            p0 += len;
            reviewed_periods += 1;
        }
        // The cancel, once every period up to the end is posted.
        let ended = end.filter(|e| {
            p0 >= *e && matches!(horizon, Horizon::Now(_)) || matches!(horizon, Horizon::AsOf(t) if *e <= t && p0 >= *e)
        });
        if let Some(e) = ended {
            let cancel = [Action::CancelSubscription { instance: instance.clone(), at: ts(e) }];
            if let Err(stop) = stepper.once("cancel", Some(e), "", &cancel).await? {
                return Ok(Err(stop));
            }
        }
        let next_due = match (ended, horizon) {
            (Some(_), _) => None,
            (None, Horizon::Now(_)) => Some(until(p0).saturating_add(grace)),
            (None, Horizon::AsOf(t)) => Some(t.max(p0)),
        };
        self.store.reviewed(id, res.version, next_due, Some(p0)).await?;
        Ok(Ok(()))
    }
}

/// One review's steps: each claimed, sent, and marked posted.
struct Steps<'a, B> {
    settler: &'a Settler<B>,
    instance: &'a InstanceId,
    now: i64,
    pass: &'a mut Pass,
}

impl<B: Billing> Steps<'_, B> {
    /// Claims `id`, runs `actions` through the backend, and marks it posted: `Ok(true)`; or
    /// finds it posted already (by another replica since this review read the postings), and
    /// sends nothing: `Ok(false)`.
    async fn once(
        &mut self,
        id: &str,
        period_start: Option<i64>,
        body: &str,
        actions: &[Action],
    ) -> Result<Result<bool, Stop>, StoreError> {
        let s = self.settler;
        let store = &s.store;
        let lease = i64::try_from(s.settings.state.claim_lease_s).unwrap_or(i64::MAX);
        let key = self.instance.as_str();
        match store.claim(key, id, period_start, body, &s.owner, self.now, lease).await? {
            Claim::Posted { .. } => return Ok(Ok(false)),
            Claim::Held => return Ok(Err(Stop::Held)),
            Claim::Won => {}
        }
        let meta = settlement_meta(self.now);
        let ctx = Context { meta: &meta, redelivered: false };
        for action in actions {
            match billing::apply(&*s.billing, action, ctx).await {
                Ok(applied) => {
                    let label = match applied {
                        Applied::Done => "done",
                        Applied::AlreadyDone => {
                            self.pass.already_done += 1;
                            "already_done"
                        }
                        Applied::Late => {
                            self.pass.late += 1;
                            "late"
                        }
                    };
                    metrics::counter!(SETTLED, "result" => label).increment(1);
                }
                Err(error) => {
                    metrics::counter!(SETTLED, "result" => "failed").increment(1);
                    store.release(key, id, &s.owner).await?;
                    return Ok(Err(Stop::Failed(format!("{id}: {}", crate::class::chain(&error)))));
                }
            }
        }
        if let Err(error) = s.billing.commit().await {
            store.release(key, id, &s.owner).await?;
            return Ok(Err(Stop::Failed(format!("{id}: make the changes durable: {}", crate::class::chain(&error)))));
        }
        store.posted(key, id, &s.owner, self.now).await?;
        Ok(Ok(true))
    }
}

fn usage_action(instance: &InstanceId, id: &str, amounts: &[(String, Decimal)], date: Timestamp) -> Action {
    let records = amounts
        .iter()
        .filter_map(|(unit, amount)| {
            Some(UsageRecord { unit: Unit::parse(unit.as_str()).ok()?, date, amount: *amount })
        })
        .collect();
    Action::RecordUsage(UsageSpec { instance: instance.clone(), tracking_id: id.to_owned(), records })
}

/// A posting's body: `[[unit, amount], …]`.
fn encode_body(amounts: &[(String, Decimal)]) -> String {
    let pairs: Vec<(&str, String)> = amounts.iter().map(|(u, a)| (u.as_str(), a.normalize().to_string())).collect();
    serde_json::to_string(&pairs).unwrap_or_default()
}

fn decode_body(body: &str) -> Vec<(String, Decimal)> {
    let pairs: Vec<(String, String)> = serde_json::from_str(body).unwrap_or_default();
    pairs.into_iter().filter_map(|(u, a)| Some((u, a.parse().ok()?))).collect()
}

/// The envelope facts a settlement step is sent with (KillBill's audit reason names it).
fn settlement_meta(now: i64) -> Meta {
    Meta {
        message_id: MessageId::settlement(),
        event_type: "settlement".into(),
        publisher_id: "concertim-billing".into(),
        priority: "INFO".into(),
        timestamp: ts(now),
    }
}

fn ts(t: i64) -> Timestamp {
    // Fact times are checked against their notification's, so they are always in range.
    Timestamp::from_unix(t).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn at(t: i64) -> String {
    ts(t).to_rfc3339()
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "host".into())
}

/// The unit names of the instance kinds under the settings (what the catalog must declare).
pub fn instance_units(settings: &Settings) -> Vec<String> {
    Kind::ALL.iter().map(|k| settings.billing.time.unit_name(*k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{billing::Ledger, timeline::Size};

    #[tokio::test]
    async fn a_period_found_posted_at_its_claim_is_not_counted_as_posted_by_this_pass() {
        // Arrange: an instance that ran 12:00–12:30, and its hour's usage posted by another
        // replica between this review's read of the postings and its claim (stored without its
        // period here, so that the read misses it as it misses one posted meanwhile).
        let store = Arc::new(Store::in_memory().await.unwrap());
        let (instance, project) = ("00000000-0000-4000-8000-000000000001", "0000000000000000000000000000000a");
        let start = 1_741_003_200; // 2025-03-03T12:00:00Z
        let size = Size { name: "m1.small".into(), vcpus: 1, memory_mb: 2048, disk_gb: 20 };
        let facts = [
            Fact::Launch { at: start, source: timeline::Source::Nova, seen: start, size },
            Fact::End { at: start + 1_800, terminated: true },
        ];
        let rows: Vec<(String, i64)> = facts.iter().map(|f| (f.key(), f.effective())).collect();
        store.add_facts(instance, project, &rows).await.unwrap();
        let id = format!("tb1:{}", at(start));
        assert_eq!(store.claim(instance, &id, None, "[]", "other", start, 60).await.unwrap(), Claim::Won);
        assert!(store.posted(instance, &id, "other", start).await.unwrap());
        let mut settings = Settings::embedded();
        settings.billing.time.grace_s = 0;
        let ledger = Arc::new(Ledger::in_memory());
        let settler = Settler::new(settings, Arc::clone(&ledger), store);
        // Act
        let pass = settler.pass(Horizon::Now(start + 7_200)).await.unwrap();
        // Assert
        assert!(pass.failures.is_empty(), "{:?}", pass.failures);
        assert!(ledger.snapshot().usage.is_empty(), "this pass sent no usage");
        assert_eq!(pass.posted, 0, "usage calls this pass posted");
    }
}
