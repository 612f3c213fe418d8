//! Hooks around a backend, for the tests and the load generator: [`Hooked`] runs a [`Hooks`]
//! before and after each call of the backend it wraps (to inject a failure, count effects or
//! time them). The service itself never wraps its backend.

use super::{AccountFigures, Applied, Billing, BillingError, Context};
use crate::{
    event::{InstanceId, PlanName, ProjectId, Timestamp},
    plan::{SubscriptionSpec, UsageSpec},
};

/// One call to a backend, as hooks see it.
#[derive(Debug, Clone, Copy)]
pub enum Call<'a> {
    /// `ensure_account`.
    EnsureAccount(&'a ProjectId),
    /// `close_account`, at that time.
    CloseAccount(&'a ProjectId, Timestamp),
    /// `ensure_subscription`.
    EnsureSubscription(&'a SubscriptionSpec),
    /// `change_plan`, effective then.
    ChangePlan(&'a InstanceId, &'a PlanName, Timestamp),
    /// `cancel_subscription`, at that time.
    CancelSubscription(&'a InstanceId, Timestamp),
    /// `record_usage`.
    RecordUsage(&'a UsageSpec),
}

/// What runs around each call; each does nothing unless overridden.
pub trait Hooks: Send + Sync {
    /// Before the call: an error here is the call's answer, and the backend is not called.
    fn before(&self, _call: Call<'_>, _ctx: Context<'_>) -> Result<(), BillingError> {
        Ok(())
    }

    /// After the call, with its answer.
    fn after(&self, _call: Call<'_>, _ctx: Context<'_>, _result: &Result<Applied, BillingError>) {}
}

/// `inner`, with `hooks` run around each of its calls; commits and figures go straight through.
/// The backend is shared, so several hooked services can bill into one (the sharded replicas
/// of a test).
#[derive(Debug, Default)]
pub struct Hooked<B, H> {
    /// The backend doing the work.
    pub inner: std::sync::Arc<B>,
    /// What runs around it.
    pub hooks: H,
}

impl<B: Billing, H: Hooks> Hooked<B, H> {
    async fn around(
        &self,
        call: Call<'_>,
        ctx: Context<'_>,
        work: impl std::future::Future<Output = Result<Applied, BillingError>>,
    ) -> Result<Applied, BillingError> {
        self.hooks.before(call, ctx)?;
        let result = work.await;
        self.hooks.after(call, ctx, &result);
        result
    }
}

impl<B: Billing, H: Hooks> Billing for Hooked<B, H> {
    async fn ensure_account(&self, p: &ProjectId, ctx: Context<'_>) -> Result<Applied, BillingError> {
        self.around(Call::EnsureAccount(p), ctx, self.inner.ensure_account(p, ctx)).await
    }
    async fn close_account(&self, p: &ProjectId, at: Timestamp, ctx: Context<'_>) -> Result<Applied, BillingError> {
        self.around(Call::CloseAccount(p, at), ctx, self.inner.close_account(p, at, ctx)).await
    }
    async fn ensure_subscription(&self, s: &SubscriptionSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        self.around(Call::EnsureSubscription(s), ctx, self.inner.ensure_subscription(s, ctx)).await
    }
    async fn change_plan(
        &self,
        i: &InstanceId,
        p: &PlanName,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        self.around(Call::ChangePlan(i, p, at), ctx, self.inner.change_plan(i, p, at, ctx)).await
    }
    async fn cancel_subscription(
        &self,
        i: &InstanceId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        self.around(Call::CancelSubscription(i, at), ctx, self.inner.cancel_subscription(i, at, ctx)).await
    }
    async fn record_usage(&self, u: &UsageSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        self.around(Call::RecordUsage(u), ctx, self.inner.record_usage(u, ctx)).await
    }
    async fn commit(&self) -> Result<(), BillingError> {
        self.inner.commit().await
    }
    async fn account_ref(&self, p: &ProjectId) -> Result<Option<String>, BillingError> {
        self.inner.account_ref(p).await
    }
    async fn account_figures(&self, p: &ProjectId, today: time::Date) -> Result<Option<AccountFigures>, BillingError> {
        self.inner.account_figures(p, today).await
    }
}
