//! The executor: one delivery in, one [`Outcome`] out — decode, plan, each action through the
//! billing backend in order, the commit that makes the changes durable, and the Concertim
//! follow-up.
//!
//! This single step is what the bus's billing handler, `replay` and the tests all call. It never
//! acknowledges anything itself: [`Outcome::fate`] says what becomes of the message.

use crate::{
    billing::{Applied, Billing, BillingError, Context},
    class::{chain, ErrorClass, Fate, Label},
    concertim::{self, Work},
    config::Settings,
    event::{InstanceId, Notification, ProjectId},
    notification::{decode, DecodeError},
    plan::{plan, Action, PlanError},
    settle::Settler,
    store::{Store, StoreError},
    timeline::{Fact, Size, Source},
};

/// A message as the bus (or a fixture) delivers it.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The body, byte for byte.
    pub body: &'a [u8],
    /// The broker may have delivered it before.
    pub redelivered: bool,
}

/// What happened to one message.
#[derive(Debug)]
pub enum Outcome {
    /// Every action succeeded (or found its work already done), and the changes are durable.
    Processed {
        /// The notification's event type.
        event_type: String,
        /// How many actions made a change, found it done, or were late usage.
        effects: Effects,
        /// What Concertim is to show of it, when Concertim is configured (boxed: most
        /// outcomes have none, and every outcome is moved around).
        follow_up: Option<Box<Work>>,
    },
    /// Nothing to bill: an unhandled event type, a project outside the filter, an event with
    /// no billing effect.
    Ignored {
        /// The notification's event type.
        event_type: String,
        /// Why.
        reason: &'static str,
        /// What Concertim is to show of it (a state change bills nothing but is shown).
        follow_up: Option<Box<Work>>,
    },
    /// The message can never be processed as it is.
    Invalid(InvalidMessage),
    /// An action failed; `error.class()` says whether to retry.
    Failed {
        /// The notification's event type.
        event_type: String,
        /// The action that failed, in words.
        action: String,
        /// The backend's error.
        error: BillingError,
    },
}

/// Why a message is invalid.
#[derive(Debug, thiserror::Error)]
pub enum InvalidMessage {
    /// It could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// It decoded, but no plan could be made from it.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// Counts of what a processed message's actions did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effects {
    /// Actions that changed the billing state.
    pub done: usize,
    /// Actions whose work was already done (redelivery, replay, early arrival of a later step).
    pub already_done: usize,
    /// Usage calls dated after their subscription's end.
    pub late: usize,
    /// Billing actions of a project outside the managed scope (`projects.managed_by`), not
    /// carried out: its facts are kept and billed once it is admitted.
    pub held: usize,
}

impl Outcome {
    /// The failure class, when the message failed.
    pub fn class(&self) -> Option<ErrorClass> {
        match self {
            Outcome::Processed { .. } | Outcome::Ignored { .. } => None,
            Outcome::Invalid(_) => Some(ErrorClass::Invalid),
            Outcome::Failed { error, .. } => Some(error.class()),
        }
    }

    /// Why it failed, with the causes (`<event type>: <action>: <error>` for a failed action),
    /// when it did: the one text the dead-letter headers, the logs and `replay` show.
    pub fn reason(&self) -> Option<String> {
        match self {
            Outcome::Processed { .. } | Outcome::Ignored { .. } => None,
            Outcome::Invalid(e) => Some(chain(e)),
            Outcome::Failed { event_type, action, error } => Some(format!("{event_type}: {action}: {}", chain(error))),
        }
    }

    /// What becomes of the message: done, retried, or dead-lettered with its reason.
    pub fn fate(&self) -> Fate {
        match self {
            Outcome::Processed { .. } => Fate::Done(Label::Processed),
            Outcome::Ignored { .. } => Fate::Done(Label::Ignored),
            Outcome::Invalid(e) => Fate::DeadLetter(ErrorClass::Invalid, chain(e)),
            Outcome::Failed { error, .. } => Fate::failed(error.class(), self.reason().unwrap_or_default()),
        }
    }

    /// The Concertim work of a message that is done.
    pub fn follow_up(&self) -> Option<&Work> {
        match self {
            Outcome::Processed { follow_up, .. } | Outcome::Ignored { follow_up, .. } => follow_up.as_deref(),
            Outcome::Invalid(_) | Outcome::Failed { .. } => None,
        }
    }
}

/// Runs messages through decode → plan → billing → commit.
#[derive(Debug)]
pub struct Executor<B> {
    settings: Settings,
    billing: std::sync::Arc<B>,
    /// Whether each processed message is committed before its outcome is returned.
    commit_each: bool,
    /// Where the facts go: the configured store, or one in memory made on first use.
    store: tokio::sync::OnceCell<std::sync::Arc<Store>>,
    /// How far the notifications handled have got: see [`Executor::watermark`].
    progress: Progress,
    /// Projects known to be admitted (`projects.managed_by`, `include_names`).
    admitted: std::sync::Mutex<std::collections::HashSet<ProjectId>>,
    /// The launches this process has committed (see [`Launches`]).
    launches: Launches,
}

/// The latest notification time handled, and when (wall clock) a message was last handled.
#[derive(Debug, Default)]
struct Progress {
    latest_sent: std::sync::atomic::AtomicI64,
    last_handled: std::sync::atomic::AtomicI64,
}

impl<B: Billing> Executor<B> {
    /// An executor over a billing backend that commits every processed message before
    /// returning its outcome (what a message must have before it is acknowledged).
    pub fn new(settings: Settings, billing: B) -> Self {
        Self {
            settings,
            billing: std::sync::Arc::new(billing),
            commit_each: true,
            store: tokio::sync::OnceCell::new(),
            progress: Progress::default(),
            admitted: std::sync::Mutex::default(),
            launches: Launches::default(),
        }
    }

    /// The same executor, keeping facts in `store` (without it, an in-memory store is made on
    /// first use: what `replay` and the tests want).
    #[must_use]
    pub fn with_store(self, store: std::sync::Arc<Store>) -> Self {
        Self { store: tokio::sync::OnceCell::new_with(Some(store)), ..self }
    }

    /// Up to when the settlement may bill, at wall-clock time `now`: `now` while the consumer
    /// is idle (no message handled for `idle_s` seconds), else the latest notification time
    /// handled. So a backlog being drained after an outage (creates and deletes of the last
    /// hours still queued) is never settled past the point the consumer has read: an instance
    /// whose delete is still queued is not billed up to now.
    pub fn watermark(&self, now: i64, idle_s: i64) -> i64 {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.progress.last_handled.load(Relaxed);
        if now.saturating_sub(last) >= idle_s {
            return now;
        }
        self.progress.latest_sent.load(Relaxed).min(now)
    }

    /// Keeps the facts in `store` from now on; false when a store is already in use.
    pub fn use_store(&self, store: std::sync::Arc<Store>) -> bool {
        self.store.set(store).is_ok()
    }

    /// The state store the facts go to.
    ///
    /// # Errors
    /// When the in-memory store cannot be made.
    pub async fn store(&self) -> Result<std::sync::Arc<Store>, StoreError> {
        self.store.get_or_try_init(|| async { Store::in_memory().await.map(std::sync::Arc::new) }).await.cloned()
    }

    /// A settlement over this executor's backend and store.
    ///
    /// # Errors
    /// When the in-memory store cannot be made.
    pub async fn settler(&self) -> Result<Settler<B>, StoreError> {
        Ok(Settler::new(self.settings.clone(), self.shared_billing(), self.store().await?))
    }

    /// The same executor, leaving the commit to its caller's [`Executor::commit`] once a whole
    /// batch is done (`replay` into a ledger file: nothing is acknowledged, and a crash loses
    /// only this run's writes, which a second run makes again).
    #[must_use]
    pub fn committing_at_the_end(mut self) -> Self {
        self.commit_each = false;
        self
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The billing backend.
    pub fn billing(&self) -> &B {
        &self.billing
    }

    /// The billing backend, shared (the Concertim worker reads team figures through it).
    pub fn shared_billing(&self) -> std::sync::Arc<B> {
        std::sync::Arc::clone(&self.billing)
    }

    /// Handles one delivery to its outcome. Never panics on any input.
    pub async fn handle(&self, delivery: Delivery<'_>) -> Outcome {
        match self.decode(delivery.body) {
            Ok(notification) => self.handle_decoded(&notification, delivery.redelivered).await,
            Err(e) => Outcome::Invalid(e.into()),
        }
    }

    /// Decodes a body under the configured limits (the bus decodes first to pick a lane, then
    /// calls [`Executor::handle_decoded`]).
    ///
    /// # Errors
    /// As [`decode`].
    pub fn decode(&self, body: &[u8]) -> Result<Notification, DecodeError> {
        decode(body, self.settings.decode)
    }

    /// Makes the backend's changes durable (the ledger's file).
    ///
    /// # Errors
    /// As the backend's commit.
    pub async fn commit(&self) -> Result<(), BillingError> {
        self.billing.commit().await
    }

    /// [`Executor::handle`] after the decode: plans and runs a notification, commits its
    /// changes, and adds its Concertim work once it is done.
    pub async fn handle_decoded(&self, notification: &Notification, redelivered: bool) -> Outcome {
        {
            use std::sync::atomic::Ordering::Relaxed;
            let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            self.progress.last_handled.store(i64::try_from(wall).unwrap_or(i64::MAX), Relaxed);
            self.progress.latest_sent.fetch_max(notification.meta.timestamp.unix(), Relaxed);
        }
        let mut outcome = self.execute(notification, redelivered).await;
        if let Outcome::Processed { event_type, .. } = &outcome {
            if self.commit_each {
                if let Err(error) = self.commit().await {
                    let event_type = event_type.clone();
                    return Outcome::Failed { event_type, action: "make the changes durable".to_owned(), error };
                }
            }
        }
        if let Outcome::Processed { follow_up, .. } | Outcome::Ignored { follow_up, .. } = &mut outcome {
            if self.settings.concertim.is_some() {
                *follow_up = concertim::work(notification, &self.settings).map(Box::new);
            }
        }
        outcome
    }

    /// Plans and runs a decoded notification.
    async fn execute(&self, notification: &Notification, redelivered: bool) -> Outcome {
        let event_type = notification.meta.event_type.clone();
        let actions = match plan(notification, &self.settings) {
            Ok(actions) => actions,
            Err(e) => return Outcome::Invalid(e.into()),
        };
        if actions.is_empty() {
            let reason = match &notification.event {
                crate::event::Event::Ignored { reason } => reason,
                _ => "no billing effect",
            };
            return Outcome::Ignored { event_type, reason, follow_up: None };
        }
        let ctx = Context { meta: &notification.meta, redelivered };
        let mut effects = Effects::default();
        let mut admitted: std::collections::HashMap<ProjectId, bool> = std::collections::HashMap::new();
        for action in &actions {
            // A project outside the managed scope is not billed (yet): its facts are kept, and
            // the settlement bills them from their start once the project is admitted.
            match self.in_scope(action, &actions, &mut admitted).await {
                Ok(true) => {}
                Ok(false) => {
                    effects.held += 1;
                    continue;
                }
                Err(error) => return Outcome::Failed { event_type, action: describe(action), error },
            }
            match self.apply(action, ctx).await {
                Ok(Applied::Done) => effects.done += 1,
                Ok(Applied::AlreadyDone) => effects.already_done += 1,
                Ok(Applied::Late) => effects.late += 1,
                Err(error) => return Outcome::Failed { event_type, action: describe(action), error },
            }
        }
        Outcome::Processed { event_type, effects, follow_up: None }
    }

    /// Admits `project` to the managed scope from `at` (what a role assignment of
    /// `projects.managed_by`, or a name matching `include_names`, does); true when it was not
    /// admitted yet.
    ///
    /// # Errors
    /// When the state store fails.
    pub async fn admit(&self, project: &ProjectId, at: crate::event::Timestamp) -> Result<bool, BillingError> {
        let action = Action::AdmitProject { project: project.clone(), at };
        let meta = crate::event::Meta {
            message_id: crate::event::MessageId::settlement(),
            event_type: "admission".into(),
            publisher_id: "concertim-billing".into(),
            priority: "INFO".into(),
            timestamp: at,
            project_name: None,
        };
        Ok(self.apply(&action, Context { meta: &meta, redelivered: false }).await? == Applied::Done)
    }

    /// Whether `action` may reach the billing application: always, unless `projects.managed_by`
    /// is set and the action's project has not been admitted. Facts and project ends are the
    /// state store's, never held. `admitted` caches the answers of one message.
    async fn in_scope(
        &self,
        action: &Action,
        plan: &[Action],
        admitted: &mut std::collections::HashMap<ProjectId, bool>,
    ) -> Result<bool, BillingError> {
        if !self.settings.projects.managed_scope() {
            return Ok(true);
        }
        let project = match action {
            Action::RecordFacts { .. } | Action::EndProject { .. } | Action::AdmitProject { .. } => return Ok(true),
            Action::EnsureAccount { project } | Action::CloseAccount { project, .. } => Some(project),
            Action::EnsureSubscription(spec) => Some(&spec.project),
            // Usage and plan changes ride with their subscription's spec in the same plan.
            // FIXME(billing): a delta-metered sample (`RecordUsage`) of a project not admitted
            // yet is held and never billed, unlike time and cumulative readings, which are kept
            // as facts: a metered meter's usage before the admission is lost.
            Action::RecordUsage(usage) => subscription_project(plan, &usage.instance),
            Action::ChangePlan { instance, .. } | Action::CancelSubscription { instance, .. } => {
                subscription_project(plan, instance)
            }
        };
        let Some(project) = project else { return Ok(false) };
        if let Some(known) = admitted.get(project) {
            return Ok(*known);
        }
        let known = self.is_admitted(project).await?;
        admitted.insert(project.clone(), known);
        Ok(known)
    }

    /// Whether `project` is admitted: remembered once true (an admission is never undone; a
    /// removed role ends the project's timelines instead).
    async fn is_admitted(&self, project: &ProjectId) -> Result<bool, BillingError> {
        if self.admitted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(project) {
            return Ok(true);
        }
        let known = self.store().await?.admitted(project.as_str()).await?;
        if known {
            self.admitted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(project.clone());
        }
        Ok(known)
    }

    async fn apply(&self, action: &Action, ctx: Context<'_>) -> Result<Applied, BillingError> {
        match action {
            Action::RecordFacts { instance, kind, project, facts } => {
                let store = self.store().await?;
                // An instance's facts come from its own project only: another project's (a
                // sample naming an instance it does not own) would shape the owner's bill, so
                // the message is invalid, as such usage is. The project that first named the
                // instance owns it, as the billing applications' subscriptions do. (Two
                // projects naming a new instance at once, on two lanes, may both get through.)
                if let Some(project) = project {
                    let owner = store.owner(instance.as_str()).await?;
                    if let Some(owner) = owner.filter(|o| !o.is_empty() && o != project.as_str()) {
                        return Err(BillingError::ProjectMismatch {
                            instance: instance.clone(),
                            owner,
                            claimed: project.clone(),
                        });
                    }
                }
                let news = self.launches.fresh(instance, facts);
                if news.is_empty() {
                    return Ok(Applied::AlreadyDone);
                }
                let keyed: Vec<(String, i64)> = news.iter().map(|f| (f.key(), f.effective())).collect();
                let project = project.as_ref().map_or("", ProjectId::as_str);
                let new = store.add_facts(instance.as_str(), kind.as_str(), project, &keyed).await?;
                self.launches.committed(instance, &news);
                Ok(if new > 0 { Applied::Done } else { Applied::AlreadyDone })
            }
            Action::EndProject { project, at } => {
                self.store().await?.close_project(project.as_str(), at.unix()).await?;
                Ok(Applied::Done)
            }
            Action::AdmitProject { project, at } => {
                // Every message naming a matching project admits it: the store is asked once.
                if self.is_admitted(project).await? {
                    return Ok(Applied::AlreadyDone);
                }
                self.store().await?.admit_project(project.as_str(), at.unix()).await?;
                self.admitted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(project.clone());
                Ok(Applied::Done)
            }
            other => crate::billing::apply(&*self.billing, other, ctx).await,
        }
    }
}

/// The best report of each launch this process has committed, by instance and `launched_at`:
/// what [`crate::timeline::Timeline::of`] keeps of a launch's reports (Nova before samples,
/// then the earliest message, then the smallest flavor). A later report that does not beat it
/// changes no timeline, so it is not written: every Ceilometer sample of a running instance
/// repeats its launch, seen later, and would otherwise cost the store a transaction per message.
#[derive(Debug, Default)]
struct Launches(std::sync::Mutex<std::collections::HashMap<InstanceId, std::collections::BTreeMap<i64, Report>>>);

/// A launch report as [`crate::timeline::Timeline::of`] ranks it: source, then when it was
/// seen, then the flavor.
type Report = (Source, i64, Size);

/// Instances remembered, at most; the map starts over when full.
const LAUNCHES_MAX: usize = 1 << 17;

impl Launches {
    /// The facts of `instance` still to write: all but the launch reports that a committed one
    /// beats or equals.
    fn fresh<'f>(&self, instance: &InstanceId, facts: &'f [Fact]) -> Vec<&'f Fact> {
        let best = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = best.get(instance);
        let superseded = |fact: &Fact| {
            let Fact::Launch { at, source, seen, size } = fact else { return false };
            known.and_then(|k| k.get(at)).is_some_and(|(s, t, z)| (*s, *t, z) <= (*source, *seen, size))
        };
        facts.iter().filter(|f| !superseded(f)).collect()
    }

    /// Remembers the launch reports of `facts`, now committed.
    fn committed(&self, instance: &InstanceId, facts: &[&Fact]) {
        let mut best = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for fact in facts {
            let Fact::Launch { at, source, seen, size } = fact else { continue };
            if best.len() >= LAUNCHES_MAX && !best.contains_key(instance) {
                best.clear();
            }
            let candidate = (*source, *seen, size.clone());
            let report = best.entry(instance.clone()).or_default().entry(*at).or_insert_with(|| candidate.clone());
            if candidate < *report {
                *report = candidate;
            }
        }
    }
}

/// The project of `instance`'s subscription in `plan`, if the plan subscribes it.
fn subscription_project<'p>(plan: &'p [Action], instance: &InstanceId) -> Option<&'p ProjectId> {
    plan.iter().find_map(|a| match a {
        Action::EnsureSubscription(spec) if &spec.instance == instance => Some(&spec.project),
        _ => None,
    })
}

/// An action in words, for logs and dead-letter reasons (ids only, no secrets).
fn describe(action: &Action) -> String {
    match action {
        Action::EnsureAccount { project } => format!("ensure account {project}"),
        Action::CloseAccount { project, .. } => format!("close account {project}"),
        Action::EnsureSubscription(spec) => format!("ensure subscription {}", spec.instance),
        Action::ChangePlan { instance, plan, .. } => format!("change plan of {instance} to {plan}"),
        Action::CancelSubscription { instance, .. } => format!("cancel subscription {instance}"),
        Action::RecordUsage(usage) => format!("record usage {} on {}", usage.tracking_id, usage.instance),
        Action::RecordFacts { instance, facts, .. } => format!("record {} facts of {instance}", facts.len()),
        Action::EndProject { project, .. } => format!("end the timelines of project {project}"),
        Action::AdmitProject { project, .. } => format!("admit project {project}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{billing::Ledger, event::Timestamp};

    fn executor() -> Executor<Ledger> {
        Executor::new(Settings::embedded(), Ledger::in_memory())
    }

    async fn handle(e: &Executor<Ledger>, body: &str) -> Outcome {
        e.handle(Delivery { body: body.as_bytes(), redelivered: false }).await
    }

    #[tokio::test]
    async fn a_project_created_message_is_processed_once_then_already_done() {
        let e = executor();
        let body = r#"{"message_id":"m1","event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00","payload":{"resource_info":"p1"}}"#;
        let Outcome::Processed { effects, .. } = handle(&e, body).await else { panic!() };
        assert_eq!(effects, Effects { done: 1, already_done: 0, late: 0, held: 0 });
        let Outcome::Processed { effects, .. } = handle(&e, body).await else { panic!() };
        assert_eq!(effects, Effects { done: 0, already_done: 1, late: 0, held: 0 });
    }

    #[tokio::test]
    async fn a_sample_republished_under_new_ids_is_billed_once() {
        let text = crate::config::DEFAULT_TOML.replace(
            "[billing.meters]\n",
            "[billing.meters.\"network.outgoing.bytes.delta\"]\nunit = \"egress\"\nfactor = \"1\"\ncounter = \"delta\"\n",
        );
        let e = Executor::new(Settings::from_toml(&text, "t").unwrap(), Ledger::in_memory());
        let sample = |id: &str| {
            format!(
                r#"{{"message_id":"{id}","event_type":"metering","timestamp":"2025-01-01 00:00:05","payload":[{{"counter_name":"network.outgoing.bytes.delta","counter_type":"delta","counter_unit":"B","counter_volume":512,"project_id":"p1","resource_id":"r1","timestamp":"2025-01-01T00:00:00Z","resource_metadata":{{}}}}]}}"#
            )
        };
        for id in ["first", "republished-by-ceilometer", "and-again"] {
            assert!(matches!(handle(&e, &sample(id)).await, Outcome::Processed { .. }));
        }
        let usage = e.billing().snapshot().usage;
        assert_eq!(usage.len(), 1, "{usage:?}");
        assert_eq!(usage[0].amount, rust_decimal::Decimal::from(512));
    }

    #[tokio::test]
    async fn the_watermark_is_the_latest_notification_while_busy_and_now_once_idle() {
        let e = executor();
        let now = 1_800_000_000;
        assert_eq!(e.watermark(now, 5), now, "nothing handled yet");
        let body = r#"{"message_id":"m1","event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00","payload":{"resource_info":"p1"}}"#;
        handle(&e, body).await;
        let wall = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs())
            .unwrap();
        let sent = Timestamp::parse("2025-01-01T00:00:00Z").unwrap().unix();
        assert_eq!(e.watermark(wall, 5), sent, "a backlog of old notifications holds the settlement back");
        assert_eq!(e.watermark(wall + 5, 5), wall + 5, "idle: settled up to now");
    }

    #[tokio::test]
    async fn unhandled_and_malformed_messages_are_ignored_and_invalid() {
        let e = executor();
        let body = r#"{"message_id":"m1","event_type":"image.update","timestamp":"2025-01-01 00:00:00","payload":{}}"#;
        assert!(matches!(handle(&e, body).await, Outcome::Ignored { reason: "unhandled event type", .. }));
        let outcome = handle(&e, "{not json").await;
        assert_eq!(outcome.class(), Some(ErrorClass::Invalid));
    }

    /// A Ceilometer message with one gauge sample of instance i-1, as `project` names it.
    fn gauge(message: &str, project: &str, launched_at: &str) -> String {
        format!(
            r#"{{"message_id":"{message}","event_type":"metering","timestamp":"2025-01-01 00:10:00","payload":[{{"counter_name":"vcpus","counter_type":"gauge","counter_unit":"vcpu","counter_volume":2,"project_id":"{project}","resource_id":"i-1","timestamp":"2025-01-01T00:10:00Z","resource_metadata":{{"flavor_name":"m1.tiny","launched_at":"{launched_at}"}}}}]}}"#
        )
    }

    #[tokio::test]
    async fn facts_about_an_instance_from_a_project_that_does_not_own_it_are_invalid_and_change_nothing() {
        // Arrange: p1's sample makes p1 the instance's owner.
        let e = executor();
        assert!(matches!(handle(&e, &gauge("m1", "p1", "2025-01-01T00:00:00")).await, Outcome::Processed { .. }));
        let store = e.store().await.unwrap();
        let before = store.resource("i-1").await.unwrap().unwrap();
        // Act: p2 names the instance, with a launch of its own that would add a segment.
        let outcome = handle(&e, &gauge("m2", "p2", "2025-01-01T00:05:00")).await;
        // Assert
        assert_eq!(outcome.class(), Some(ErrorClass::Invalid));
        let reason = outcome.reason().unwrap();
        assert!(reason.contains("instance i-1 belongs to p1, not to project p2"), "{reason}");
        let after = store.resource("i-1").await.unwrap().unwrap();
        assert_eq!((after.project, after.facts, after.version), (before.project, before.facts, before.version));
    }

    #[tokio::test]
    async fn a_launch_reported_again_later_is_not_written_again_and_an_earlier_report_is() {
        let e = executor();
        let seen_at = |message: &str, minute: u32| {
            gauge(message, "p1", "2025-01-01T00:00:00").replace("00:10:00", &format!("00:{minute:02}:00"))
        };
        let launches = || async {
            let resource = e.store().await.unwrap().resource("i-1").await.unwrap().unwrap();
            (resource.facts.iter().filter(|f| f.contains("launch")).count(), resource.version)
        };
        assert!(matches!(handle(&e, &seen_at("m1", 10)).await, Outcome::Processed { .. }));
        let first = launches().await;
        // Every later sample of the running instance repeats its launch: nothing to write.
        for (message, minute) in [("m2", 20), ("m3", 30), ("m4", 10)] {
            let Outcome::Processed { effects, .. } = handle(&e, &seen_at(message, minute)).await else { panic!() };
            assert_eq!(effects.done, 0, "{message}");
        }
        assert_eq!(launches().await, first);
        // An earlier report can change the flavor the launch is billed at: it is written.
        let Outcome::Processed { effects, .. } = handle(&e, &seen_at("m5", 5)).await else { panic!() };
        assert!(effects.done >= 1);
        assert_eq!(launches().await.0, 2);
    }

    #[tokio::test]
    async fn each_outcome_has_one_fate_and_one_reason() {
        let e = executor();
        let created = r#"{"message_id":"m1","event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00","payload":{"resource_info":"p1"}}"#;
        assert_eq!(handle(&e, created).await.fate(), Fate::Done(Label::Processed));
        let ignored =
            r#"{"message_id":"m2","event_type":"image.update","timestamp":"2025-01-01 00:00:00","payload":{}}"#;
        assert_eq!(handle(&e, ignored).await.fate(), Fate::Done(Label::Ignored));
        let Fate::DeadLetter(ErrorClass::Invalid, reason) = handle(&e, "{not json").await.fate() else { panic!() };
        assert!(reason.starts_with("body is not valid"), "{reason}");
        let failed = |error| Outcome::Failed { event_type: "metering".into(), action: "record usage".into(), error };
        let down = BillingError::Status { what: "record usage".into(), status: 503, body: String::new() };
        assert!(matches!(failed(down).fate(), Fate::Retry(reason) if reason.starts_with("metering: record usage: ")));
        let refused = BillingError::Status { what: "record usage".into(), status: 400, body: String::new() };
        assert!(matches!(failed(refused).fate(), Fate::DeadLetter(ErrorClass::Permanent, _)));
    }
}
