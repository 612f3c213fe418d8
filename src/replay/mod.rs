//! `replay`: feeds fixture files through the executor, with no broker, and reports what would
//! be billed.
//!
//! Owns the walk over fixture files, the per-message problem lines, and the report (human
//! tables, or the JSON object operators and tests compare). A file or line that cannot be read
//! is reported by name and position; the rest still replays.

mod publish;

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

use rust_decimal::{prelude::ToPrimitive, Decimal};
use serde::Serialize;

pub use publish::{publish, Published};

use crate::fixture::{self, FixtureDelivery, Position};
use crate::{
    billing::{
        ledger::{AccountRow, Cost, Snapshot, SubscriptionRow},
        Backend, BackendError, Billing, BillingError,
    },
    bus::BusError,
    config::{BackendKind, Settings},
    event::{ResourceKind, Timestamp},
    executor::{Executor, Outcome},
    price::Catalog,
    settle::Horizon,
    store::{Store, StoreError},
};

/// Why a replay or a publish could not run (a message that fails is counted, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The command line asks for nothing that can be done.
    #[error("{0}")]
    Usage(String),
    /// The fixture files cannot be listed.
    #[error("{0}")]
    Fixture(#[from] fixture::FixtureError),
    /// The billing backend cannot be built.
    #[error("{0}")]
    Backend(#[from] BackendError),
    /// The ledger cannot be opened or written.
    #[error("{0}")]
    Ledger(#[from] BillingError),
    /// The broker failed.
    #[error("{0}")]
    Bus(#[from] BusError),
    /// The state store failed.
    #[error("state store: {0}")]
    Store(#[from] StoreError),
}

/// Replays every fixture in `paths` through the executor, into the embedded ledger (kept in
/// `ledger` when given, written once at the end) or, with `apply`, into the configured billing
/// application; `on_note` hears each problem line and note. Returns the report.
///
/// # Errors
/// When the files cannot be listed, the backend cannot be built, or the ledger cannot be
/// written.
pub async fn local(
    settings: Settings,
    paths: &[PathBuf],
    ledger: Option<&std::path::Path>,
    apply: bool,
    as_of: Option<Timestamp>,
    mut on_note: impl FnMut(String),
) -> Result<Report, ReplayError> {
    let files = fixture::collect_files(paths)?;
    let backend = if apply {
        on_note(format!("applying to {}", Backend::describe(&settings, None)));
        Backend::from_settings(&settings, None).await?
    } else {
        if settings.billing.backend != BackendKind::Ledger {
            on_note(format!(
                "note: replaying into the embedded ledger, not into {} (--apply sends it there)",
                Backend::describe(&settings, None)
            ));
        }
        let store = match ledger {
            Some(file) => Some(std::sync::Arc::new(Store::open(&file.to_string_lossy()).await?)),
            None => None,
        };
        Backend::embedded(store).await?
    };
    // The ledger file is written once, after the last message (below).
    let executor = Executor::new(settings, backend).committing_at_the_end();
    let counts = replay_files(&executor, &files, |problem| on_note(problem.to_string())).await;
    let settlement = settle(&executor, as_of.or(counts.latest), &mut on_note).await?;
    executor.commit().await?;
    let snapshot = match executor.billing().ledger() {
        Some(ledger) => ledger.snapshot(),
        None => {
            on_note("note: billing went to the billing application; its accounts, subscriptions and usage are not listed here".into());
            Snapshot::default()
        }
    };
    let costs = match (executor.billing().ledger(), Catalog::bundled()) {
        (Some(ledger), Ok(catalog)) => project_costs(ledger.costs(catalog), &catalog.currency),
        _ => Vec::new(),
    };
    // Each subscription keeps its resource's kind; usage is always under a subscription.
    let kinds: BTreeMap<String, ResourceKind> =
        snapshot.subscriptions.iter().map(|s| (s.instance_id.to_string(), s.resource_type)).collect();
    Ok(Report::new(counts, snapshot, &kinds).with_settlement(settlement).with_costs(costs))
}

/// Settles every timeline the replay built, as of `as_of` (the latest notification read,
/// unless the command line names a time): ended instances to their end, running ones to it.
///
/// # Errors
/// When the in-memory state store fails.
pub async fn settle<B: Billing>(
    executor: &Executor<B>,
    as_of: Option<Timestamp>,
    on_note: &mut impl FnMut(String),
) -> Result<Settlement, ReplayError> {
    let Some(as_of) = as_of else { return Ok(Settlement::default()) };
    let pass = executor.settler().await?.pass(Horizon::AsOf(as_of.unix())).await?;
    for failure in &pass.failures {
        on_note(format!("settlement: {failure}"));
    }
    Ok(Settlement {
        as_of: Some(as_of),
        periods_posted: pass.posted,
        corrections: pass.corrections,
        shortfalls: pass
            .shortfalls
            .iter()
            .map(|s| ShortfallRow {
                instance_id: s.resource.clone(),
                period_start: Timestamp::from_unix(s.period_start).unwrap_or(Timestamp::UNIX_EPOCH),
                unit: s.unit.clone(),
                billed: s.billed.clone(),
                due: s.due.clone(),
            })
            .collect(),
        audit_mismatches: pass
            .audits
            .iter()
            .map(|(id, a)| AuditRow {
                instance_id: id.clone(),
                audit_begin: Timestamp::from_unix(a.begin).unwrap_or(Timestamp::UNIX_EPOCH),
                audit_end: Timestamp::from_unix(a.end).unwrap_or(Timestamp::UNIX_EPOCH),
                audited_vcpu_seconds: a.audited_vcpu_s.to_string(),
                timeline_vcpu_seconds: a.timeline_vcpu_s.to_string(),
            })
            .collect(),
        failures: pass.failures,
    })
}

/// What the settlement at the end of a replay did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Settlement {
    /// Running instances are billed up to this time.
    pub as_of: Option<Timestamp>,
    /// Usage calls posted (periods and corrections).
    pub periods_posted: usize,
    /// Of which corrections.
    pub corrections: usize,
    /// Recomputed periods below what was posted: listed for a credit or review.
    pub shortfalls: Vec<ShortfallRow>,
    /// Nova audits that disagree with the timeline.
    pub audit_mismatches: Vec<AuditRow>,
    /// Steps that failed.
    pub failures: Vec<String>,
}

/// A period billed above what its facts now say.
#[derive(Debug, Clone, Serialize)]
pub struct ShortfallRow {
    /// The instance.
    pub instance_id: String,
    /// The period.
    pub period_start: Timestamp,
    /// The unit.
    pub unit: String,
    /// What was posted.
    pub billed: String,
    /// What the facts say is due.
    pub due: String,
}

/// A Nova audit that disagrees with the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    /// The instance.
    pub instance_id: String,
    /// The audit window's start.
    pub audit_begin: Timestamp,
    /// The audit window's end.
    pub audit_end: Timestamp,
    /// vCPU-seconds by Nova's audit.
    pub audited_vcpu_seconds: String,
    /// vCPU-seconds by the timeline.
    pub timeline_vcpu_seconds: String,
}

/// Message counts by outcome, and what processed messages did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Messages read (including malformed lines).
    pub messages: usize,
    /// Processed: every action succeeded or was already done.
    pub processed: usize,
    /// Ignored: nothing to bill.
    pub ignored: usize,
    /// Invalid: malformed lines and messages that cannot be decoded or planned.
    pub invalid: usize,
    /// Failed: an action failed (transient or permanent), or a file could not be read.
    pub failed: usize,
    /// Actions that found their work already done.
    pub already_done: usize,
    /// Usage calls dated after their subscription's end (counted, not billed).
    pub late_usage: usize,
    /// The latest notification time read: where a replay settles running instances to.
    pub latest: Option<Timestamp>,
}

impl Counts {
    /// Whether every message was processed or ignored.
    pub fn all_ok(&self) -> bool {
        self.invalid == 0 && self.failed == 0
    }

    fn add(&mut self, outcome: &Outcome) {
        self.messages += 1;
        match outcome {
            Outcome::Processed { effects, .. } => {
                self.processed += 1;
                self.already_done += effects.already_done;
                self.late_usage += effects.late;
            }
            Outcome::Ignored { .. } => self.ignored += 1,
            Outcome::Invalid(_) => self.invalid += 1,
            Outcome::Failed { .. } => self.failed += 1,
        }
    }
}

/// A message that was not processed, with where it came from and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// File and line.
    pub position: String,
    /// `invalid`, `transient`, `permanent`, or `unreadable`.
    pub class: &'static str,
    /// The reason, with its cause chain.
    pub reason: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.position, self.class, self.reason)
    }
}

/// Replays every fixture of `files` in order; `on_problem` hears about each message or file
/// that was not processed, as it happens.
pub async fn replay_files<B: Billing>(
    executor: &Executor<B>,
    files: &[PathBuf],
    mut on_problem: impl FnMut(Problem),
) -> Counts {
    let mut counts = Counts::default();
    // One file in memory at a time: a capture can be large.
    for (position, fixture) in files.iter().flat_map(|f| fixture::read_all(std::slice::from_ref(f))) {
        match fixture {
            Ok(delivery) => run_one(executor, &delivery, &position, &mut counts, &mut on_problem).await,
            Err(e @ fixture::FixtureError::Io { .. }) => {
                counts.failed += 1;
                on_problem(Problem { position: position.to_string(), class: "unreadable", reason: e.to_string() });
            }
            Err(e) => {
                counts.messages += 1;
                counts.invalid += 1;
                on_problem(Problem { position: position.to_string(), class: "invalid", reason: e.to_string() });
            }
        }
    }
    counts
}

async fn run_one<B: Billing>(
    executor: &Executor<B>,
    delivery: &FixtureDelivery,
    position: &Position,
    counts: &mut Counts,
    on_problem: &mut impl FnMut(Problem),
) {
    let outcome = match executor.decode(&delivery.body) {
        Ok(notification) => {
            let t = notification.meta.timestamp;
            counts.latest = Some(counts.latest.map_or(t, |l| l.max(t)));
            executor.handle_decoded(&notification, delivery.redelivered).await
        }
        Err(e) => Outcome::Invalid(e.into()),
    };
    counts.add(&outcome);
    let Some(reason) = outcome.reason() else { return };
    let class = outcome.class().map_or("failed", |c| c.as_str());
    on_problem(Problem { position: position.to_string(), class, reason });
}

/// The replay report, exactly as `--report json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Messages read.
    pub messages: usize,
    /// Processed messages.
    pub processed: usize,
    /// Ignored messages.
    pub ignored: usize,
    /// Invalid messages.
    pub invalid: usize,
    /// Failed messages.
    pub failed: usize,
    /// Accounts by project id.
    pub accounts: Vec<AccountRow>,
    /// Subscriptions by resource id.
    pub subscriptions: Vec<SubscriptionRow>,
    /// Billed usage by resource and unit.
    pub usage: Vec<UsageAmount>,
    /// What the settlement did.
    pub settlement: Settlement,
    /// What the usage costs at the catalog's prices, per project and billing period (empty when
    /// billing went to a billing application).
    pub costs: Vec<ProjectCost>,
    /// The kind of each subscription's resource, for the tables (the JSON's subscriptions are
    /// the ledger's rows as they are).
    #[serde(skip)]
    subscription_kinds: Vec<Option<ResourceKind>>,
    #[serde(skip)]
    late_records: usize,
    #[serde(skip)]
    already_done: usize,
}

/// What one project's usage costs in one billing period, as KillBill would invoice it.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectCost {
    /// The project (the account).
    pub project_id: String,
    /// The billing period's start (the account's billing day).
    pub period_start: Timestamp,
    /// The period's end.
    pub period_end: Timestamp,
    /// The catalog's currency.
    pub currency: String,
    /// The sum of the items, each rounded to the currency's precision (decimal text).
    pub total: Decimal,
    /// Per unit: whole blocks × price, before the items' rounding.
    pub units: BTreeMap<String, Decimal>,
    /// Per resource and plan: the item's amount.
    pub resources: Vec<ResourceCost>,
}

/// One invoice item of a [`ProjectCost`].
#[derive(Debug, Clone, Serialize)]
pub struct ResourceCost {
    /// The resource's id.
    pub resource_id: String,
    /// Its kind.
    pub resource_type: ResourceKind,
    /// The plan the usage is priced on.
    pub plan: String,
    /// The item's amount, rounded once (decimal text).
    pub amount: Decimal,
}

/// Groups a ledger's items by project and period.
pub fn project_costs(costs: Vec<Cost>, currency: &str) -> Vec<ProjectCost> {
    let mut out: Vec<ProjectCost> = Vec::new();
    for cost in costs {
        let same = out.last().is_some_and(|p| p.project_id == cost.project.as_str() && p.period_start == cost.period.0);
        if !same {
            out.push(ProjectCost {
                project_id: cost.project.to_string(),
                period_start: cost.period.0,
                period_end: cost.period.1,
                currency: currency.to_owned(),
                total: Decimal::ZERO,
                units: BTreeMap::new(),
                resources: Vec::new(),
            });
        }
        let Some(project) = out.last_mut() else { continue };
        project.total += cost.item.amount;
        for unit in &cost.item.units {
            let sum = project.units.entry(unit.unit.clone()).or_default();
            *sum = (*sum + unit.amount).normalize();
        }
        project.resources.push(ResourceCost {
            resource_id: cost.resource.to_string(),
            resource_type: cost.kind,
            plan: cost.item.plan.clone(),
            amount: cost.item.amount,
        });
    }
    out
}

/// Billed usage of one unit on one resource.
#[derive(Debug, Clone, Serialize)]
pub struct UsageAmount {
    /// The instance uuid, on an instance's lines only: the field readers of the reports before
    /// other kinds were billed look for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The resource's id (an instance, volume, snapshot, floating IP or image uuid, or a
    /// network interface's Ceilometer id).
    pub resource_id: String,
    /// Its kind (`instance`, `volume`, `snapshot`, `floating_ip`, `image`,
    /// `network_interface`); `null` when neither the state store nor the unit says.
    pub resource_type: Option<ResourceKind>,
    /// The billing unit.
    pub unit: String,
    /// The total amount (9 decimal places at most).
    pub amount: f64,
}

impl Report {
    /// Whether every message was processed or ignored (the exit status of `replay`).
    pub fn all_ok(&self) -> bool {
        self.invalid == 0 && self.failed == 0
    }

    /// Builds the report from the counts of this run, the ledger's content and the kind of
    /// each resource it names, by id.
    pub fn new(counts: Counts, snapshot: Snapshot, kinds: &BTreeMap<String, ResourceKind>) -> Self {
        let kind_of = |id: &str| kinds.get(id).copied();
        Self {
            messages: counts.messages,
            processed: counts.processed,
            ignored: counts.ignored,
            invalid: counts.invalid,
            failed: counts.failed,
            accounts: snapshot.accounts,
            subscription_kinds: snapshot.subscriptions.iter().map(|s| kind_of(s.instance_id.as_str())).collect(),
            subscriptions: snapshot.subscriptions,
            usage: snapshot
                .usage
                .into_iter()
                .map(|u| UsageAmount {
                    instance_id: (kind_of(u.instance_id.as_str()) == Some(ResourceKind::Instance))
                        .then(|| u.instance_id.to_string()),
                    resource_id: u.instance_id.to_string(),
                    resource_type: kind_of(u.instance_id.as_str()),
                    unit: u.unit.to_string(),
                    // Amounts have at most 9 decimal places and 15 digits, within f64's exact range
                    // for the shortest round-trip text.
                    amount: u.amount.to_f64().unwrap_or(f64::NAN),
                })
                .collect(),
            settlement: Settlement::default(),
            costs: Vec::new(),
            late_records: snapshot.late_records,
            already_done: counts.already_done,
        }
    }

    /// The report with what the usage costs.
    #[must_use]
    pub fn with_costs(mut self, costs: Vec<ProjectCost>) -> Self {
        self.costs = costs;
        self
    }

    /// The report with what the settlement did.
    #[must_use]
    pub fn with_settlement(mut self, settlement: Settlement) -> Self {
        self.settlement = settlement;
        self
    }

    /// The JSON report.
    pub fn to_json(&self) -> String {
        // Plain structs of strings and numbers: serialising them cannot fail.
        serde_json::to_string_pretty(self).expect("the report serialises")
    }

    /// The human summary: accounts, subscriptions and usage per unit (resources grouped by
    /// kind, instances first), counts by outcome.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let accounts: Vec<[String; 2]> =
            self.accounts.iter().map(|a| [a.project_id.to_string(), a.state.to_owned()]).collect();
        table(&mut out, "Accounts", ["project", "state"], &accounts);
        let mut subscriptions: Vec<(Option<ResourceKind>, [String; 7])> = self
            .subscriptions
            .iter()
            .zip(&self.subscription_kinds)
            .map(|(s, kind)| {
                (
                    *kind,
                    [
                        kind_name(*kind),
                        s.instance_id.to_string(),
                        s.project_id.to_string(),
                        s.plan.to_string(),
                        s.state.to_owned(),
                        s.start.to_string(),
                        s.end.map_or_else(|| "-".to_owned(), |e| e.to_string()),
                    ],
                )
            })
            .collect();
        let subscriptions = by_kind(&mut subscriptions);
        table(
            &mut out,
            "Subscriptions",
            ["kind", "resource", "project", "plan", "state", "start", "end"],
            &subscriptions,
        );
        let mut usage: Vec<(Option<ResourceKind>, [String; 4])> = self
            .usage
            .iter()
            .map(|u| {
                let row = [kind_name(u.resource_type), u.resource_id.clone(), u.unit.clone(), u.amount.to_string()];
                (u.resource_type, row)
            })
            .collect();
        let usage = by_kind(&mut usage);
        table(&mut out, "Usage", ["kind", "resource", "unit", "amount"], &usage);
        if !self.costs.is_empty() {
            let mut rows: Vec<[String; 6]> = Vec::new();
            for p in &self.costs {
                let period = format!("{} – {}", p.period_start, p.period_end);
                for r in &p.resources {
                    let row = [
                        p.project_id.clone(),
                        period.clone(),
                        r.resource_type.to_string(),
                        r.resource_id.clone(),
                        r.plan.clone(),
                        format!("{} {}", r.amount, p.currency),
                    ];
                    rows.push(row);
                }
                rows.push([
                    p.project_id.clone(),
                    period,
                    String::new(),
                    "total".into(),
                    String::new(),
                    format!("{} {}", p.total, p.currency),
                ]);
            }
            table(
                &mut out,
                "Costs at the catalog's prices, per billing period (as KillBill invoices them)",
                ["project", "period", "kind", "resource", "plan", "amount"],
                &rows,
            );
        }
        let _ = writeln!(
            out,
            "Messages: {} — processed {}, ignored {}, invalid {}, failed {}",
            self.messages, self.processed, self.ignored, self.invalid, self.failed
        );
        let _ = writeln!(
            out,
            "Already done (duplicates, replays, early arrivals): {} actions; usage records after their subscription's end (not billed): {}",
            self.already_done, self.late_records
        );
        let s = &self.settlement;
        if let Some(as_of) = s.as_of {
            let _ = writeln!(
                out,
                "Settled as of {as_of}: {} usage calls posted ({} corrections), {} failed",
                s.periods_posted,
                s.corrections,
                s.failures.len()
            );
        }
        if !s.shortfalls.is_empty() {
            let rows: Vec<[String; 5]> = s
                .shortfalls
                .iter()
                .map(|r| {
                    [r.instance_id.clone(), r.period_start.to_string(), r.unit.clone(), r.billed.clone(), r.due.clone()]
                })
                .collect();
            out.push('\n');
            table(
                &mut out,
                "Shortfalls: billed above what is due (not posted as negative usage; credit or review)",
                ["instance", "period", "unit", "billed", "due"],
                &rows,
            );
        }
        if !s.audit_mismatches.is_empty() {
            let rows: Vec<[String; 5]> = s
                .audit_mismatches
                .iter()
                .map(|r| {
                    [
                        r.instance_id.clone(),
                        r.audit_begin.to_string(),
                        r.audit_end.to_string(),
                        r.audited_vcpu_seconds.clone(),
                        r.timeline_vcpu_seconds.clone(),
                    ]
                })
                .collect();
            out.push('\n');
            table(
                &mut out,
                "Nova audits that disagree with the timeline",
                ["instance", "audit begin", "audit end", "audited vCPU-s", "timeline vCPU-s"],
                &rows,
            );
        }
        out
    }
}

/// A kind as the tables print it (`-` when unknown).
fn kind_name(kind: Option<ResourceKind>) -> String {
    kind.map_or_else(|| "-".to_owned(), |k| k.as_str().to_owned())
}

/// The rows in the order of their kinds (instances first, as [`ResourceKind::ALL`] lists them,
/// unknown last), each kind's rows in the ledger's order.
fn by_kind<const N: usize>(rows: &mut [(Option<ResourceKind>, [String; N])]) -> Vec<[String; N]> {
    // Stable: the ledger's order (by id, then unit) holds within a kind.
    rows.sort_by_key(|(kind, _)| (kind.is_none(), *kind));
    rows.iter().map(|(_, row)| row.clone()).collect()
}

fn table<const N: usize>(out: &mut String, title: &str, headers: [&str; N], rows: &[[String; N]]) {
    let _ = writeln!(out, "{title} ({})", rows.len());
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)\n");
        return;
    }
    let mut widths = headers.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: [&str; N]| {
        let mut text = String::from(" ");
        for (cell, w) in cells.iter().zip(widths) {
            let _ = write!(text, " {cell:<w$}");
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(out, headers);
    for row in rows {
        line(out, row.each_ref().map(String::as_str));
    }
    out.push('\n');
}
