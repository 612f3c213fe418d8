//! A billing backend with a watcher told of the effects that tests and the load generator
//! measure: every other call goes straight through.

use concertim_billing::{
    billing::{AccountFigures, Applied, Billing, BillingError, Context},
    event::{InstanceId, PlanName, ProjectId, Timestamp},
    plan::{SubscriptionSpec, UsageSpec},
};

/// What a watcher hears of; each does nothing unless overridden.
pub trait Watch: Send + Sync {
    /// An account was ensured (or failed to be).
    fn account(&self, _project: &ProjectId, _ctx: Context<'_>, _result: &Result<Applied, BillingError>) {}
    /// A subscription was ensured (or failed to be).
    fn subscription(&self, _spec: &SubscriptionSpec, _ctx: Context<'_>, _result: &Result<Applied, BillingError>) {}
    /// Usage was recorded (or failed to be).
    fn usage(&self, _usage: &UsageSpec, _ctx: Context<'_>, _result: &Result<Applied, BillingError>) {}
}

/// `inner`, with `watch` told of its accounts, subscriptions and usage.
pub struct Watched<B, W> {
    /// The backend doing the work.
    pub inner: B,
    /// Who is told.
    pub watch: W,
}

impl<B: Billing, W: Watch> Billing for Watched<B, W> {
    async fn ensure_account(&self, p: &ProjectId, ctx: Context<'_>) -> Result<Applied, BillingError> {
        let result = self.inner.ensure_account(p, ctx).await;
        self.watch.account(p, ctx, &result);
        result
    }
    async fn close_account(&self, p: &ProjectId, at: Timestamp, ctx: Context<'_>) -> Result<Applied, BillingError> {
        self.inner.close_account(p, at, ctx).await
    }
    async fn ensure_subscription(&self, s: &SubscriptionSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        let result = self.inner.ensure_subscription(s, ctx).await;
        self.watch.subscription(s, ctx, &result);
        result
    }
    async fn change_plan(
        &self,
        i: &InstanceId,
        p: &PlanName,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        self.inner.change_plan(i, p, at, ctx).await
    }
    async fn cancel_subscription(
        &self,
        i: &InstanceId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        self.inner.cancel_subscription(i, at, ctx).await
    }
    async fn record_usage(&self, u: &UsageSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        let result = self.inner.record_usage(u, ctx).await;
        self.watch.usage(u, ctx, &result);
        result
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
