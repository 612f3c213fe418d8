//! Billing adapters: the [`Billing`] trait every backend implements, and the backends.
//!
//! A backend carries out plan actions against a billing application. Every method is
//! idempotent by key: "already exists" and "already cancelled" answers are success
//! ([`Applied::AlreadyDone`]), and the backend, which knows its protocol, classes every other
//! failure ([`BillingError::class`]). Backends know `event` and `plan` types, never the bus.

pub mod accounts;
pub mod hooks;
pub mod hostbill;
pub mod killbill;
pub mod ledger;

use std::future::Future;

use crate::{
    class::ErrorClass,
    config::{BackendKind, Settings},
    event::{InstanceId, Meta, PlanName, ProjectId, Timestamp},
    plan::{Action, SubscriptionSpec, UsageSpec},
};

pub use hostbill::HostBill;
pub use killbill::KillBill;
pub use ledger::Ledger;

/// What an action did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The change was made.
    Done,
    /// The key already existed in the wanted state: nothing to do (a redelivery, a replay, or
    /// a message that arrived after one that already did the work).
    AlreadyDone,
    /// Usage dated after the subscription's end: counted and acknowledged, not billed.
    Late,
}

/// Why the notification is being acted on: backends name it in audit fields
/// (KillBill's `X-Killbill-Reason`) and use `redelivered` to decide when to check for a
/// previous attempt.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The notification's envelope facts.
    pub meta: &'a Meta,
    /// The broker says this delivery may have been seen before.
    pub redelivered: bool,
}

/// A billing backend failure.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The embedded ledger could not read or write its file.
    #[error("ledger file {path}: {source}")]
    LedgerIo {
        /// The ledger file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The ledger file exists but is not a ledger.
    #[error("ledger file {path} is not a concertim-billing ledger: {reason}")]
    LedgerCorrupt {
        /// The ledger file.
        path: String,
        /// What the parser said.
        reason: String,
    },
    /// The embedded ledger's store could not be read or written, or holds a row it did not
    /// write.
    #[error("ledger: {0}")]
    Store(#[from] crate::store::StoreError),
    /// An action named a subscription that does not exist (plans always ensure it first, so
    /// this is a bug or a hand-edited ledger).
    #[error("subscription {0} does not exist")]
    NoSubscription(InstanceId),
    /// A notification names an instance under a project that does not own it. Billing it
    /// would charge the owner (and bypass a `projects.exclude` of the owner), so it is invalid.
    #[error("instance {instance} belongs to {owner}, not to project {claimed}: not billed")]
    ProjectMismatch {
        /// The instance.
        instance: InstanceId,
        /// Who owns it: the project, or the billing app's account.
        owner: String,
        /// The project the notification named.
        claimed: ProjectId,
    },
    /// The billing server could not be reached or did not answer in time.
    #[error("{what}: {source}")]
    Http {
        /// The operation.
        what: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The billing server's TLS certificate is not signed by a trusted CA (or names another
    /// host).
    #[error("{what}: {server}'s TLS certificate was not trusted ({reason}); set {key} to the PEM bundle of the CA that signed it")]
    Untrusted {
        /// The operation.
        what: String,
        /// The server: `KillBill`, `HostBill`.
        server: &'static str,
        /// The setting that trusts its CA: `killbill.ca_file`.
        key: &'static str,
        /// The TLS verifier's verdict (`invalid peer certificate: UnknownIssuer`).
        reason: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The billing server refused; its answer is kept for the dead-letter reason.
    #[error("{what}: HTTP {status}: {body}")]
    Status {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The response body (bounded).
        body: String,
    },
    /// The billing server said no, in its own words (HostBill's `success: false`).
    #[error("{what}: refused (HTTP {status}): {error}")]
    Refused {
        /// The operation.
        what: String,
        /// The HTTP status it came with.
        status: u16,
        /// The server's error text.
        error: String,
    },
    /// The billing server answered with a redirect, which is never followed (it would carry
    /// the credentials elsewhere): the configured URL is not the server's.
    #[error("{what}: HTTP {status} redirecting to {location}: redirects are never followed; set the URL to the server's own address")]
    Redirected {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// Where it pointed.
        location: String,
    },
    /// An answer that is not the one the protocol promises (a proxy's or maintenance page, a
    /// 200 where a 201 is due, an unreadable or oversized body): nothing is taken as done, and
    /// the call is tried again.
    #[error("{what}: not the server's answer (HTTP {status}): {excerpt}")]
    Unexpected {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// What was wrong, with a short excerpt of the body.
        excerpt: String,
    },
    /// Several billing accounts name the project (KillBill accounts the Python service made,
    /// found by their project custom field): none is picked, an operator settles which is the
    /// project's (removing the field from the others).
    #[error("several KillBill accounts name project {project}: {}; remove the project's custom field from all but the project's own", accounts.join(", "))]
    AmbiguousAccount {
        /// The project.
        project: ProjectId,
        /// The accounts' ids.
        accounts: Vec<String>,
    },
    /// The billing server answered something that is not its protocol.
    #[error("{what}: {detail}")]
    Protocol {
        /// The operation.
        what: String,
        /// What was wrong with the answer.
        detail: String,
    },
}

impl BillingError {
    /// A non-protocol answer: the status and the start of the body, on one line.
    pub fn unexpected(what: &str, status: u16, why: &str, body: &str) -> Self {
        let excerpt: String = body.chars().take(200).map(|c| if c.is_control() { ' ' } else { c }).collect();
        BillingError::Unexpected { what: what.to_owned(), status, excerpt: format!("{why}: {excerpt}") }
    }

    /// The error of a request that got no answer from `server`: its certificate not trusted
    /// (naming `key`, its `ca_file` setting), or any other connection failure.
    pub(crate) fn unanswered(what: &str, server: &'static str, key: &'static str, source: reqwest::Error) -> Self {
        match crate::outbound::untrusted(&source) {
            Some(reason) => BillingError::Untrusted { what: what.to_owned(), server, key, reason, source },
            None => BillingError::Http { what: what.to_owned(), source },
        }
    }

    /// The error of a body that could not be read.
    pub fn from_body(what: &str, status: u16, error: crate::outbound::BodyError) -> Self {
        match error {
            crate::outbound::BodyError::Http(source) => BillingError::Http { what: what.to_owned(), source },
            e @ crate::outbound::BodyError::TooLarge { .. } => {
                BillingError::Unexpected { what: what.to_owned(), status, excerpt: e.to_string() }
            }
        }
    }

    /// The failure class, which decides between retry and dead-letter.
    pub fn class(&self) -> ErrorClass {
        match self {
            // A full disk or a permissions slip can be fixed without changing the message.
            BillingError::LedgerIo { .. } => ErrorClass::Transient,
            BillingError::Store(e) => e.class(),
            BillingError::ProjectMismatch { .. } => ErrorClass::Invalid,
            BillingError::LedgerCorrupt { .. }
            | BillingError::NoSubscription(_)
            | BillingError::AmbiguousAccount { .. }
            | BillingError::Protocol { .. }
            | BillingError::Redirected { .. }
            | BillingError::Refused { .. } => ErrorClass::Permanent,
            // Like a redirect, a setting to fix (`ca_file`): no retry makes the handshake pass.
            BillingError::Untrusted { .. } => ErrorClass::Permanent,
            // A proxy's page or a maintenance answer passes; the message is tried again.
            BillingError::Unexpected { .. } => ErrorClass::Transient,
            // Connection refused, reset, timed out: the server may be back soon.
            BillingError::Http { .. } => ErrorClass::Transient,
            BillingError::Status { status, .. } if *status >= 500 || *status == 429 => ErrorClass::Transient,
            BillingError::Status { .. } => ErrorClass::Permanent,
        }
    }
}

/// Runs one backend action. The state store's actions (facts, a project's end) are not the
/// backend's: they do nothing here.
pub async fn apply<B: Billing>(b: &B, action: &Action, ctx: Context<'_>) -> Result<Applied, BillingError> {
    match action {
        Action::EnsureAccount { project } => b.ensure_account(project, ctx).await,
        Action::CloseAccount { project, at } => b.close_account(project, *at, ctx).await,
        Action::EnsureSubscription(spec) => b.ensure_subscription(spec, ctx).await,
        Action::ChangePlan { instance, plan, effective } => b.change_plan(instance, plan, *effective, ctx).await,
        Action::CancelSubscription { instance, at } => b.cancel_subscription(instance, *at, ctx).await,
        Action::RecordUsage(usage) => b.record_usage(usage, ctx).await,
        Action::RecordFacts { .. } | Action::EndProject { .. } | Action::AdmitProject { .. } => {
            Ok(Applied::AlreadyDone)
        }
    }
}

/// A billing application: KillBill, HostBill, or the embedded ledger.
// FIXME(billing): subscriptions and usage are keyed by `InstanceId`: a meter of another
// resource (a volume, a floating IP) mapped in `billing.meters` would be billed as an instance's
// usage. Keying them by a resource id with its kind comes with billing those resources.
pub trait Billing: Send + Sync {
    /// Creates the project's account unless its key exists, in any state.
    fn ensure_account(
        &self,
        project: &ProjectId,
        ctx: Context<'_>,
    ) -> impl Future<Output = Result<Applied, BillingError>> + Send;

    /// Cancels the project's subscriptions at `at` and marks its account closed (the backend
    /// decides what closed means: KillBill keeps the account open so that its last period is
    /// invoiced), creating it closed when it does not exist.
    fn close_account(
        &self,
        project: &ProjectId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> impl Future<Output = Result<Applied, BillingError>> + Send;

    /// Creates the instance's subscription unless its key exists, in any state.
    fn ensure_subscription(
        &self,
        spec: &SubscriptionSpec,
        ctx: Context<'_>,
    ) -> impl Future<Output = Result<Applied, BillingError>> + Send;

    /// Moves the subscription to `plan` from `effective` on, when its plan differs.
    fn change_plan(
        &self,
        instance: &InstanceId,
        plan: &PlanName,
        effective: Timestamp,
        ctx: Context<'_>,
    ) -> impl Future<Output = Result<Applied, BillingError>> + Send;

    /// Cancels the subscription at `at`; cancelling a cancelled subscription is success.
    fn cancel_subscription(
        &self,
        instance: &InstanceId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> impl Future<Output = Result<Applied, BillingError>> + Send;

    /// Records one notification's usage for one instance, once per tracking id.
    fn record_usage(
        &self,
        usage: &UsageSpec,
        ctx: Context<'_>,
    ) -> impl Future<Output = Result<Applied, BillingError>> + Send;

    /// Makes the changes so far durable before the message is acknowledged. Remote backends
    /// are durable once they answer, so the default does nothing.
    fn commit(&self) -> impl Future<Output = Result<(), BillingError>> + Send {
        async { Ok(()) }
    }

    /// The project's account id in the billing application (what Concertim stores as the
    /// team's `billing_acct_id`), or `None` when it has no account or the backend has no ids.
    fn account_ref(&self, _project: &ProjectId) -> impl Future<Output = Result<Option<String>, BillingError>> + Send {
        async { Ok(None) }
    }

    /// The project's billing figures for the period containing `today`, or `None` when it has no
    /// account or the backend does not compute them.
    fn account_figures(
        &self,
        _project: &ProjectId,
        _today: time::Date,
    ) -> impl Future<Output = Result<Option<AccountFigures>, BillingError>> + Send {
        async { Ok(None) }
    }
}

/// What Concertim reads of a billing application, and nothing more: a project's account id and
/// its figures. Every [`Billing`] backend is one.
pub trait Figures: Send + Sync {
    /// As [`Billing::account_ref`].
    fn team_account(&self, project: &ProjectId) -> impl Future<Output = Result<Option<String>, BillingError>> + Send;

    /// As [`Billing::account_figures`].
    fn team_figures(
        &self,
        project: &ProjectId,
        today: time::Date,
    ) -> impl Future<Output = Result<Option<AccountFigures>, BillingError>> + Send;
}

impl<B: Billing> Figures for B {
    async fn team_account(&self, project: &ProjectId) -> Result<Option<String>, BillingError> {
        Billing::account_ref(self, project).await
    }
    async fn team_figures(
        &self,
        project: &ProjectId,
        today: time::Date,
    ) -> Result<Option<AccountFigures>, BillingError> {
        Billing::account_figures(self, project, today).await
    }
}

/// A decimal written as the JSON number it is, digit for digit: what KillBill reads into a
/// `BigDecimal`, and the billing API's money. Going through `f64` (as `serde_json::Value` does)
/// could change an amount like 0.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExactAmount(pub rust_decimal::Decimal);

impl serde::Serialize for ExactAmount {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // `Decimal`'s text never has an exponent, so it is a valid JSON number.
        let raw = serde_json::value::RawValue::from_string(self.0.normalize().to_string())
            .map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

/// What Concertim shows of a team's billing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountFigures {
    /// The account id.
    pub account_id: String,
    /// The upcoming invoice's amount (never negative).
    pub cost: rust_decimal::Decimal,
    /// The account's credit balance minus the upcoming invoice.
    pub credits: rust_decimal::Decimal,
    /// First day of the billing period.
    pub period_start: time::Date,
    /// Last day of the billing period.
    pub period_end: time::Date,
    /// The cost of each resource so far in the period, one entry per resource. Costs that are
    /// no resource's (an account-wide charge) are in `cost` only, so these sum to `cost` or less.
    pub resources: Vec<ResourceCost>,
}

/// What one resource has cost so far in the billing period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceCost {
    /// The resource's OpenStack id (what Concertim keeps as a device's `openstack_instance_id`).
    pub resource_id: String,
    /// Its cost in the account's currency.
    pub amount: rust_decimal::Decimal,
}

impl ResourceCost {
    /// One entry per resource, in id order: amounts of the same resource are added.
    pub fn summed(parts: impl IntoIterator<Item = (String, rust_decimal::Decimal)>) -> Vec<ResourceCost> {
        let mut totals: std::collections::BTreeMap<String, rust_decimal::Decimal> = std::collections::BTreeMap::new();
        for (resource_id, amount) in parts {
            *totals.entry(resource_id).or_default() += amount;
        }
        totals.into_iter().map(|(resource_id, amount)| ResourceCost { resource_id, amount }).collect()
    }
}

/// The configured backend.
#[derive(Debug)]
pub enum Backend {
    /// The embedded ledger.
    Ledger(Ledger),
    /// KillBill.
    KillBill(KillBill),
    /// HostBill.
    HostBill(HostBill),
}

/// Why the configured backend cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `--ledger FILE` asks for the embedded ledger, but another backend is configured.
    #[error("--ledger keeps the embedded ledger, but billing.backend is \"{0}\"")]
    LedgerWithRemote(&'static str),
    /// The backend's section is missing.
    #[error("billing.backend = \"killbill\" needs a [killbill] section")]
    MissingKillBill,
    /// The service would bill into memory, and lose it all when it stops.
    #[error(
        "no billing backend is configured (billing.backend is \"ledger\", the embedded default): \
         this replica would bill into memory and lose it. Set billing.backend with its [killbill] or \
         [hostbill] section (--config FILE), or ask for the embedded ledger with --ledger FILE \
         (or --ledger-in-memory to try the service out)"
    )]
    WouldBillIntoMemory,
    /// The client or the ledger file could not be made.
    #[error(transparent)]
    Billing(#[from] BillingError),
}

impl Backend {
    /// The backend `settings` configure; `ledger_store` keeps the embedded ledger in a state
    /// store (`--ledger FILE`; in memory without one).
    ///
    /// # Errors
    /// As [`BackendError`].
    pub async fn from_settings(
        settings: &Settings,
        ledger_store: Option<std::sync::Arc<crate::store::Store>>,
    ) -> Result<Self, BackendError> {
        Ok(match settings.billing.backend {
            BackendKind::Ledger => Self::embedded(ledger_store).await?,
            BackendKind::Killbill if ledger_store.is_some() => return Err(BackendError::LedgerWithRemote("killbill")),
            BackendKind::Hostbill if ledger_store.is_some() => return Err(BackendError::LedgerWithRemote("hostbill")),
            BackendKind::Killbill => {
                Backend::KillBill(KillBill::new(settings.killbill.clone().ok_or(BackendError::MissingKillBill)?)?)
            }
            BackendKind::Hostbill => Backend::HostBill(HostBill::new(settings.hostbill.clone().unwrap_or_default())?),
        })
    }

    /// The backend `run` bills into: as [`Backend::from_settings`], except that the embedded
    /// ledger in memory must be asked for (`in_memory`) rather than fallen into.
    ///
    /// # Errors
    /// [`BackendError::WouldBillIntoMemory`]; as [`Backend::from_settings`].
    pub async fn for_service(
        settings: &Settings,
        ledger_store: Option<std::sync::Arc<crate::store::Store>>,
        in_memory: bool,
    ) -> Result<Self, BackendError> {
        Self::check_for_service(settings, ledger_store.is_some(), in_memory)?;
        Self::from_settings(settings, ledger_store).await
    }

    /// The rule of [`Backend::for_service`] alone, so `run` can refuse before it opens or
    /// creates anything: a configuration that names no backend bills into the embedded ledger
    /// only when asked for (`--ledger FILE` or `--ledger-in-memory`).
    ///
    /// # Errors
    /// [`BackendError::WouldBillIntoMemory`].
    pub fn check_for_service(settings: &Settings, ledger_file: bool, in_memory: bool) -> Result<(), BackendError> {
        if settings.billing.backend == BackendKind::Ledger && !ledger_file && !in_memory {
            return Err(BackendError::WouldBillIntoMemory);
        }
        Ok(())
    }

    /// The embedded ledger, in a state store or in memory.
    ///
    /// # Errors
    /// When the store cannot be read or holds rows that are not a ledger's.
    pub async fn embedded(store: Option<std::sync::Arc<crate::store::Store>>) -> Result<Self, BillingError> {
        Ok(Backend::Ledger(match store {
            Some(store) => Ledger::in_store(store).await?,
            None => Ledger::in_memory(),
        }))
    }

    /// Where billing goes, in one line for the start-up log, `config check` and `/readyz` (no
    /// secrets: these URLs carry none).
    pub fn describe(settings: &Settings, ledger_file: Option<&std::path::Path>) -> String {
        match settings.billing.backend {
            BackendKind::Ledger => match ledger_file {
                Some(path) => format!("embedded ledger in {}", path.display()),
                None => "embedded ledger (run needs --ledger FILE or --ledger-in-memory)".to_owned(),
            },
            BackendKind::Killbill => match &settings.killbill {
                Some(kb) => format!("KillBill {} at {} (tenant {})", kb.server_version, kb.url, kb.api_key),
                None => "KillBill, but the [killbill] section is missing".to_owned(),
            },
            BackendKind::Hostbill => match settings.hostbill.as_ref().and_then(|h| h.url.as_deref()) {
                Some(url) => format!("HostBill at {url}"),
                None => "HostBill, but hostbill.url is missing".to_owned(),
            },
        }
    }

    /// The ledger, when that is the backend.
    pub fn ledger(&self) -> Option<&Ledger> {
        match self {
            Backend::Ledger(l) => Some(l),
            Backend::KillBill(_) | Backend::HostBill(_) => None,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            Backend::Ledger($b) => $call.await,
            Backend::KillBill($b) => $call.await,
            Backend::HostBill($b) => $call.await,
        }
    };
}

impl Billing for Backend {
    async fn ensure_account(&self, project: &ProjectId, ctx: Context<'_>) -> Result<Applied, BillingError> {
        dispatch!(self, b => b.ensure_account(project, ctx))
    }

    async fn close_account(
        &self,
        project: &ProjectId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        dispatch!(self, b => b.close_account(project, at, ctx))
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        dispatch!(self, b => b.ensure_subscription(spec, ctx))
    }

    async fn change_plan(
        &self,
        instance: &InstanceId,
        plan: &PlanName,
        effective: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        dispatch!(self, b => b.change_plan(instance, plan, effective, ctx))
    }

    async fn cancel_subscription(
        &self,
        instance: &InstanceId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        dispatch!(self, b => b.cancel_subscription(instance, at, ctx))
    }

    async fn record_usage(&self, usage: &UsageSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        dispatch!(self, b => b.record_usage(usage, ctx))
    }

    async fn commit(&self) -> Result<(), BillingError> {
        dispatch!(self, b => b.commit())
    }

    async fn account_ref(&self, project: &ProjectId) -> Result<Option<String>, BillingError> {
        dispatch!(self, b => b.account_ref(project))
    }

    async fn account_figures(
        &self,
        project: &ProjectId,
        today: time::Date,
    ) -> Result<Option<AccountFigures>, BillingError> {
        dispatch!(self, b => b.account_figures(project, today))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_amounts_of_one_resource_are_added_into_one_entry_per_resource() {
        let d = |s: &str| s.parse::<rust_decimal::Decimal>().unwrap();
        let parts = [("b".to_owned(), d("1.5")), ("a".to_owned(), d("2")), ("b".to_owned(), d("0.25"))];
        let summed = ResourceCost::summed(parts);
        assert_eq!(
            summed,
            [
                ResourceCost { resource_id: "a".into(), amount: d("2") },
                ResourceCost { resource_id: "b".into(), amount: d("1.75") }
            ]
        );
    }
}
