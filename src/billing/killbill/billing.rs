//! The [`Billing`] implementation and the calls it is made of.

use super::client::{
    Answer, ACCOUNT_ALREADY_EXISTS, BUNDLE_HAS_BASE, BUNDLE_KEY_EXISTS, CANCEL_BAD_STATE, CHANGE_NON_ACTIVE,
    CUSTOM_FIELD_ALREADY_EXISTS, INVALID_REQUESTED_DATE, TRACKING_ID_ALREADY_EXISTS,
};
use super::wire::{
    kb_time, usage_body, BundleJson, CustomFieldJson, NewAccount, NewCustomField, NewSubscription, PlanChange,
    SubscriptionJson, UsageBody,
};
use super::{
    KillBill, FIELD_CLOSED_AT, FIELD_DISPLAY_NAME, FIELD_FLAVOR, FIELD_INSTANCE, FIELD_PROJECT, FIELD_RESOURCE_TYPE,
};
use reqwest::{Method, StatusCode};

use rust_decimal::Decimal;

use crate::billing::{AccountFigures, Applied, Billing, BillingError, Context};
use crate::{
    config::KillBillVersion,
    event::{InstanceId, PlanName, ProjectId, Timestamp, Unit},
    plan::{SubscriptionSpec, UsageSpec},
};

impl KillBill {
    /// Adds custom fields; an identical field already there (400/9000) is success. KillBill
    /// refuses the whole batch when one of its fields exists, so batches of more than one go
    /// through [`KillBill::ensure_fields`].
    pub(super) async fn add_fields(
        &self,
        object: &str,
        id: &str,
        fields: &[(&str, &str)],
        ctx: Context<'_>,
    ) -> Result<(), BillingError> {
        let fields: Vec<NewCustomField<'_>> = fields
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(name, value)| NewCustomField { name, value })
            .collect();
        if fields.is_empty() {
            return Ok(());
        }
        let what = format!("add custom fields to {object} {id}");
        let path = format!("/1.0/kb/{object}/{id}/customFields");
        let answer = self.send(&what, self.request(Method::POST, &path, Some(ctx)).json(&fields)).await?;
        match answer.status {
            StatusCode::CREATED => Ok(()),
            StatusCode::BAD_REQUEST if answer.code() == Some(CUSTOM_FIELD_ALREADY_EXISTS) => Ok(()),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    /// Adds the fields the object lacks (by name); true when it added any. A retry after a
    /// failure between a create and its fields finishes the job this way.
    pub(super) async fn ensure_fields(
        &self,
        object: &str,
        id: &str,
        wanted: &[(&str, &str)],
        ctx: Context<'_>,
    ) -> Result<bool, BillingError> {
        let present = self.fields(object, id).await?;
        let missing: Vec<(&str, &str)> = wanted
            .iter()
            .filter(|(name, value)| !value.is_empty() && !present.iter().any(|f| f.name == *name))
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(false);
        }
        self.add_fields(object, id, &missing, ctx).await?;
        Ok(true)
    }

    pub(super) async fn fields(&self, object: &str, id: &str) -> Result<Vec<CustomFieldJson>, BillingError> {
        let what = format!("read custom fields of {object} {id}");
        let path = format!("/1.0/kb/{object}/{id}/customFields");
        let answer = self.send(&what, self.request(Method::GET, &path, None)).await?;
        match answer.status {
            StatusCode::OK => Self::parse(&what, &answer),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    /// When the project was deleted, if the account records it.
    pub(super) async fn closed_at(&self, account_id: &str) -> Result<Option<Timestamp>, BillingError> {
        let fields = self.fields("accounts", account_id).await?;
        Ok(fields.iter().filter(|f| f.name == FIELD_CLOSED_AT).filter_map(|f| Timestamp::parse(&f.value).ok()).min())
    }

    pub(super) async fn create_account(
        &self,
        project: &ProjectId,
        ctx: Context<'_>,
    ) -> Result<(String, Applied), BillingError> {
        let what = format!("create account {project}");
        let body =
            NewAccount { external_key: project.as_str(), name: project.as_str(), currency: &self.settings.currency };
        let answer = self.send(&what, self.request(Method::POST, "/1.0/kb/accounts", Some(ctx)).json(&body)).await?;
        let (id, applied) = match answer.status {
            StatusCode::CREATED => (Self::created_id(&what, &answer)?, Applied::Done),
            StatusCode::CONFLICT if answer.code() == Some(ACCOUNT_ALREADY_EXISTS) => {
                let id = self.account_id(project).await?.ok_or_else(|| BillingError::Protocol {
                    what: what.clone(),
                    detail: "409 account exists, but no account has that key".into(),
                })?;
                (id, Applied::AlreadyDone)
            }
            _ => return Err(Self::refused(&what, &answer)),
        };
        // Also on 409: an earlier attempt may have stopped between the two calls.
        self.add_fields("accounts", &id, &[(FIELD_PROJECT, project.as_str())], ctx).await?;
        self.remember_account(project, &id);
        Ok((id, applied))
    }

    /// Cancels at `at`, or at the subscription's last transition when `at` is earlier (KillBill
    /// refuses earlier dates with 400/1001: a delete dated before its launch by clock skew, a
    /// project deleted before an instance's resize). A cancel that finds the subscription
    /// cancelled (500/1031) is success.
    pub(super) async fn cancel(
        &self,
        subscription: &SubscriptionJson,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let id = &subscription.subscription_id;
        let mut at = subscription.floor().map_or(at, |floor| at.max(floor));
        let mut reread = false;
        loop {
            let answer = self.send_cancel(id, at, ctx).await?;
            match answer.status {
                StatusCode::NO_CONTENT => {
                    self.remember_end(id, at);
                    return Ok(Applied::Done);
                }
                StatusCode::INTERNAL_SERVER_ERROR if answer.code() == Some(CANCEL_BAD_STATE) => {
                    return Ok(Applied::AlreadyDone)
                }
                // A transition we did not know of (a plan change made meanwhile): read it, once.
                StatusCode::BAD_REQUEST if answer.code() == Some(INVALID_REQUESTED_DATE) && !reread => {
                    reread = true;
                    let fresh = self.subscription_by_id(id).await?;
                    at = fresh.floor().map_or(at, |floor| at.max(floor));
                }
                _ => return Err(Self::refused(&format!("cancel subscription {id}"), &answer)),
            }
        }
    }

    pub(super) async fn send_cancel(&self, id: &str, at: Timestamp, ctx: Context<'_>) -> Result<Answer, BillingError> {
        let what = format!("cancel subscription {id}");
        let path = format!("/1.0/kb/subscriptions/{id}");
        // A requested date with no policies: the date drives the entitlement, and
        // useRequestedDateForBilling makes billing stop then too (§1.8: policies would make
        // KillBill ignore the date and cancel now).
        let request = self
            .request(Method::DELETE, &path, Some(ctx))
            .query(&[("requestedDate", self.date(at).as_str()), ("useRequestedDateForBilling", "true")]);
        self.send(&what, request).await
    }

    /// What a subscription found by key (a retry, a restart, a lost answer) may still lack: its
    /// custom fields, and its cancellation when its project was deleted. True when anything
    /// was missing.
    /// `fresh`: created by this very call, so it has no fields yet.
    pub(super) async fn finish_subscription(
        &self,
        spec: &SubscriptionSpec,
        subscription: &SubscriptionJson,
        account_id: &str,
        fresh: bool,
        ctx: Context<'_>,
    ) -> Result<bool, BillingError> {
        let fields = [
            (FIELD_PROJECT, spec.project.as_str()),
            (FIELD_INSTANCE, spec.instance.as_str()),
            (FIELD_RESOURCE_TYPE, spec.kind.as_str()),
            (FIELD_FLAVOR, spec.flavor.as_deref().unwrap_or_default()),
            (FIELD_DISPLAY_NAME, spec.display_name.as_deref().unwrap_or_default()),
        ];
        let id = &subscription.subscription_id;
        let mut changed = if fresh {
            self.add_fields("subscriptions", id, &fields, ctx).await?;
            true
        } else {
            self.ensure_fields("subscriptions", id, &fields, ctx).await?
        };
        // A late message for a deleted project: the subscription ends when the project did.
        if subscription.state.as_deref() != Some("CANCELLED") && subscription.end().is_none() {
            if let Some(closed_at) = self.closed_at(account_id).await? {
                changed |= self.cancel(subscription, closed_at, ctx).await? == Applied::Done;
            }
        }
        Ok(changed)
    }

    /// Posts one usage call; the answer decides.
    pub(super) async fn post_usage(
        &self,
        what: &str,
        body: &UsageBody<'_>,
        ctx: Context<'_>,
    ) -> Result<Answer, BillingError> {
        self.send(what, self.request(Method::POST, "/1.0/kb/usages", Some(ctx)).json(body)).await
    }
}

impl Billing for KillBill {
    async fn ensure_account(&self, project: &ProjectId, ctx: Context<'_>) -> Result<Applied, BillingError> {
        if self.account_id(project).await?.is_some() {
            return Ok(Applied::AlreadyDone);
        }
        Ok(self.create_account(project, ctx).await?.1)
    }

    /// The account stays open: closing it in KillBill tags it AUTO_INVOICING_OFF, and the
    /// usage between its last invoice and the deletion would never be invoiced. Its
    /// subscriptions end at `at`, and `openstack_closed_at` records the deletion; the next
    /// scheduled invoice bills the last partial period. Every step is checked again on a
    /// retry, so a failure halfway is finished by the next attempt.
    async fn close_account(
        &self,
        project: &ProjectId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let (id, mut changed) = match self.account_id(project).await? {
            Some(id) => (id, false),
            None => (self.create_account(project, ctx).await?.0, true),
        };
        let closed_at = self.closed_at(&id).await?;
        // A second deletion message keeps the first deletion's time.
        let at = closed_at.map_or(at, |first| first.min(at));
        let what = format!("list subscriptions of account {project}");
        let answer =
            self.send(&what, self.request(Method::GET, &format!("/1.0/kb/accounts/{id}/bundles"), None)).await?;
        if answer.status != StatusCode::OK {
            return Err(Self::refused(&what, &answer));
        }
        let bundles: Vec<BundleJson> = Self::parse(&what, &answer)?;
        for subscription in bundles.iter().flat_map(|b| &b.subscriptions) {
            if subscription.state.as_deref() != Some("CANCELLED") && subscription.end().is_none() {
                changed |= self.cancel(subscription, at, ctx).await? == Applied::Done;
            }
        }
        if closed_at.is_none() {
            self.add_fields("accounts", &id, &[(FIELD_CLOSED_AT, &kb_time(at))], ctx).await?;
            changed = true;
        }
        Ok(if changed { Applied::Done } else { Applied::AlreadyDone })
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        let known = self.known().subscriptions.get(&spec.instance).map(|k| k.account_id.clone());
        if let Some(owner) = known {
            if let Some(owner) = owner {
                self.check_owner(spec, &owner).await?;
            }
            return Ok(Applied::AlreadyDone);
        }
        if let Some(existing) = self.subscription(&spec.instance).await? {
            let account_id = existing.account_id.clone().unwrap_or_default();
            self.check_owner(spec, &account_id).await?;
            let changed = self.finish_subscription(spec, &existing, &account_id, false, ctx).await?;
            self.remember_subscription(&spec.instance, &existing);
            return Ok(if changed { Applied::Done } else { Applied::AlreadyDone });
        }
        let account_id = match self.account_id(&spec.project).await? {
            Some(id) => id,
            None => self.create_account(&spec.project, ctx).await?.0,
        };
        let what = format!("create subscription {}", spec.instance);
        let body = NewSubscription {
            account_id: &account_id,
            external_key: spec.instance.as_str(),
            bundle_external_key: spec.instance.as_str(),
            plan_name: spec.plan.as_str(),
        };
        let start = self.date(spec.start);
        let request = self
            .request(Method::POST, "/1.0/kb/subscriptions", Some(ctx))
            .query(&[("entitlementDate", start.as_str()), ("billingDate", start.as_str())])
            .json(&body);
        let answer = self.send(&what, request).await?;
        let mut created = match answer.status {
            // Just created: what KillBill holds is what was sent, so nothing is read back.
            StatusCode::CREATED => SubscriptionJson::created(Self::created_id(&what, &answer)?, spec.start),
            // The bundle exists: an earlier attempt created it (its answer lost, or still
            // committing when the retry looked). Found again by key, it is finished below.
            StatusCode::BAD_REQUEST if matches!(answer.code(), Some(BUNDLE_KEY_EXISTS | BUNDLE_HAS_BASE)) => {
                self.existing_subscription(&spec.instance).await?
            }
            s if s.is_server_error() => match self.subscription(&spec.instance).await? {
                Some(found) => found,
                None => return Err(Self::refused(&what, &answer)),
            },
            _ => return Err(Self::refused(&what, &answer)),
        };
        created.account_id.get_or_insert_with(|| account_id.clone());
        let fresh = answer.status == StatusCode::CREATED;
        self.finish_subscription(spec, &created, &account_id, fresh, ctx).await?;
        // Remembered only now: a retry after a failure above must run those steps again.
        self.remember_subscription(&spec.instance, &created);
        Ok(Applied::Done)
    }

    async fn change_plan(
        &self,
        instance: &InstanceId,
        plan: &PlanName,
        effective: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let subscription = self.existing_subscription(instance).await?;
        if subscription.plan_name.as_deref() == Some(plan.as_str())
            || subscription.state.as_deref() == Some("CANCELLED")
        {
            return Ok(Applied::AlreadyDone);
        }
        let what = format!("change plan of {instance} to {plan}");
        let path = format!("/1.0/kb/subscriptions/{}", subscription.subscription_id);
        // The date alone: KillBill refuses a date together with a billing policy (400), and a
        // policy alone would ignore the date. It may not precede the last transition.
        let at = subscription.floor().map_or(effective, |floor| effective.max(floor));
        let request = self
            .request(Method::PUT, &path, Some(ctx))
            .query(&[("requestedDate", self.date(at).as_str())])
            .json(&PlanChange { plan_name: plan.as_str() });
        let answer = self.send(&what, request).await?;
        match answer.status {
            StatusCode::NO_CONTENT => Ok(Applied::Done),
            // Cancelled meanwhile: a cancelled subscription keeps its plan.
            StatusCode::INTERNAL_SERVER_ERROR if answer.code() == Some(CHANGE_NON_ACTIVE) => Ok(Applied::AlreadyDone),
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    async fn cancel_subscription(
        &self,
        instance: &InstanceId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        let subscription = self.existing_subscription(instance).await?;
        if subscription.state.as_deref() == Some("CANCELLED") {
            return Ok(Applied::AlreadyDone);
        }
        self.cancel(&subscription, at, ctx).await
    }

    async fn record_usage(&self, usage: &UsageSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        let subscription = self.known_subscription(&usage.instance).await?;
        // KillBill stores a record dated before the subscription's start and never invoices
        // it; dated at the start, it is invoiced. (Only samples taken before `launched_at`
        // are moved, which the plan's start makes rare.)
        let records: Vec<(Unit, Timestamp, Decimal)> = usage
            .records
            .iter()
            .filter(|r| subscription.end.is_none_or(|end| r.date <= end))
            .map(|r| (r.unit.clone(), subscription.start.map_or(r.date, |start| r.date.max(start)), r.amount))
            .collect();
        if records.is_empty() {
            return Ok(Applied::Late);
        }
        let what = format!("record usage {} on {}", usage.tracking_id, usage.instance);
        if self.settings.server_version == KillBillVersion::V0_22 {
            if let Some((unit, _, amount)) = records.iter().find(|(_, _, amount)| !amount.fract().is_zero()) {
                return Err(BillingError::Protocol {
                    what: what.clone(),
                    detail: format!(
                        "KillBill 0.22 stores usage amounts as whole numbers and would truncate {amount} {unit}: \
                         bill this meter in a smaller unit (a factor that makes its amounts whole)"
                    ),
                });
            }
        }
        let body = usage_body(&subscription.id, &usage.tracking_id, &records, self.settings.server_version);
        let answer = self.post_usage(&what, &body, ctx).await?;
        match answer.status {
            // KillBill records usage with a 201 and nothing else: any other 2xx is someone else's.
            StatusCode::CREATED => Ok(Applied::Done),
            s if s.is_success() => Err(Self::not_the_answer(&what, &answer)),
            StatusCode::BAD_REQUEST if answer.code() == Some(TRACKING_ID_ALREADY_EXISTS) => Ok(Applied::AlreadyDone),
            // A record dated after the subscription's end refuses the whole call. The records up
            // to the end are posted again alone, under the same trackingId (nothing of the
            // refused call was stored).
            StatusCode::BAD_REQUEST if answer.after_end() => {
                // Only a subscription with an end refuses records after it: a bare 400 for one
                // without is an intermediary's, and nothing is taken as late.
                let Some(end) = self.subscription_by_id(&subscription.id).await?.end() else {
                    return Err(Self::not_the_answer(&what, &answer));
                };
                let within: Vec<(Unit, Timestamp, Decimal)> =
                    records.into_iter().filter(|(_, date, _)| self.within(*date, end)).collect();
                if within.is_empty() {
                    return Ok(Applied::Late);
                }
                let body = usage_body(&subscription.id, &usage.tracking_id, &within, self.settings.server_version);
                let answer = self.post_usage(&what, &body, ctx).await?;
                match answer.status {
                    StatusCode::CREATED => Ok(Applied::Done),
                    s if s.is_success() => Err(Self::not_the_answer(&what, &answer)),
                    StatusCode::BAD_REQUEST if answer.code() == Some(TRACKING_ID_ALREADY_EXISTS) => {
                        Ok(Applied::AlreadyDone)
                    }
                    StatusCode::BAD_REQUEST if answer.after_end() => Ok(Applied::Late),
                    _ => Err(Self::refused(&what, &answer)),
                }
            }
            _ => Err(Self::refused(&what, &answer)),
        }
    }

    async fn account_ref(&self, project: &ProjectId) -> Result<Option<String>, BillingError> {
        self.account_id(project).await
    }

    async fn account_figures(
        &self,
        project: &ProjectId,
        today: time::Date,
    ) -> Result<Option<AccountFigures>, BillingError> {
        self.figures(project, today).await
    }
}
